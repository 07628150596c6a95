//! TLS on the broker's listener (rustls with ring), optionally mutual: clients must then
//! present a certificate signed by the configured CA.
//!
//! The certificate, key and CA files are read at start and again whenever one of them
//! changes (checked every [`RELOAD_CHECK`]), so certificates rotate without a restart:
//! each new connection's handshake uses the configuration read last, open connections
//! keep theirs. Files that do not load are refused with a log line and the previous
//! configuration stays.
//!
//! **Invariant:** with TLS configured, the listener completes no gRPC exchange with a
//! peer that did not finish a TLS handshake (plaintext is refused at the handshake).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

/// How often the files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);
/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS configuration, reloaded when its files change.
pub struct ServerTls {
    files: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamps: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn build(files: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .with_context(|| format!("{} holds no PEM private key", files.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if files.client_auth {
        let ca = files.ca_file.as_ref().context(
            "tls.client_auth needs tls.ca_file: the CA whose certificates clients must present",
        )?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("a certificate of {} is not a usable CA", ca.display()))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "the key {} does not fit the certificate {}",
            files.key_file.display(),
            files.cert_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl ServerTls {
    /// Loads the files.
    ///
    /// # Errors
    /// A file that cannot be read or used, named in the message.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Arc<Self>> {
        let config = build(files)?;
        Ok(Arc::new(ServerTls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            stamps: std::sync::Mutex::new(Self::stamps_of(files)),
        }))
    }

    fn paths(files: &TlsConfig) -> Vec<PathBuf> {
        let mut paths = vec![files.cert_file.clone(), files.key_file.clone()];
        paths.extend(files.ca_file.clone());
        paths
    }

    fn stamps_of(files: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
        Self::paths(files).iter().map(|p| stamp(p)).collect()
    }

    /// The current configuration for HTTP/1.1 (the metrics endpoint) instead of gRPC's
    /// HTTP/2.
    pub fn http1_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = (*self.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again if one changed since they were last read.
    pub fn reload_if_changed(&self) {
        let now = Self::stamps_of(&self.files);
        {
            let mut stamps = self
                .stamps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *stamps == now {
                return;
            }
            *stamps = now;
        }
        match build(&self.files) {
            Ok(config) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                tracing::info!(cert = %self.files.cert_file.display(), "reloaded the TLS certificate and key");
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "the changed TLS files do not load; keeping the previous ones");
            }
        }
    }
}

/// Connections of `listener` that completed a TLS handshake, as a stream for the gRPC
/// server; the files are checked for changes meanwhile.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let reloading = tls.clone();
    let closed = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let tls = reloading.clone();
                    let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
                }
                () = closed.closed() => return,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            // The server stopped taking connections: the listener closes with this task.
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake refused");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
