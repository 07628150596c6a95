//! TLS towards brokers: what a client (the CLI, the Rust client, a broker reaching
//! another broker or a controller voter) needs to connect over TLS, and the channel
//! endpoint every one of them builds with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The CA that signed the brokers' certificates and, for mutual TLS, this client's own
/// certificate and key; all PEM. Read from files, they are read again each time a
/// channel is built with them (a broker's replica fetchers, which build one per
/// connection, pick up its rotated certificate when they reconnect); a read that fails
/// keeps the last good ones.
#[derive(Clone)]
pub struct ClientTls {
    files: Option<Arc<Files>>,
    loaded: Arc<Mutex<Loaded>>,
}

struct Files {
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone)]
struct Loaded {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.has_identity())
            .finish_non_exhaustive()
    }
}

/// A TLS file that cannot be used, with the reason.
#[derive(Debug)]
pub struct TlsFileError(pub String);

impl std::fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFileError {}

/// Reads a PEM file that must hold at least one `what` block (`CERTIFICATE`, `PRIVATE KEY`).
///
/// # Errors
/// The file cannot be read or holds no such block; the message names the file.
pub fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, TlsFileError> {
    let bytes = std::fs::read(path)
        .map_err(|err| TlsFileError(format!("reading {}: {err}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(what) {
        return Err(TlsFileError(format!(
            "{} holds no PEM {what}: give a PEM file (-----BEGIN ...-----)",
            path.display()
        )));
    }
    Ok(bytes)
}

impl ClientTls {
    /// Reads the CA certificate(s) and, for mutual TLS, the client certificate and key.
    ///
    /// # Errors
    /// A file cannot be read or is not PEM, or only one of `cert` and `key` is given.
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsFileError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert.to_path_buf(), key.to_path_buf())),
            (None, None) => None,
            _ => {
                return Err(TlsFileError(
                    "a client certificate needs its key and a key its certificate: give both (--tls-cert and --tls-key)".into(),
                ));
            }
        };
        let files = Files {
            ca: ca.to_path_buf(),
            identity,
        };
        let loaded = files.load()?;
        Ok(ClientTls {
            files: Some(Arc::new(files)),
            loaded: Arc::new(Mutex::new(loaded)),
        })
    }

    /// From PEM bytes held in memory: the CA, and for mutual TLS the certificate and key.
    pub fn from_pem(ca: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        ClientTls {
            files: None,
            loaded: Arc::new(Mutex::new(Loaded { ca, identity })),
        }
    }

    pub fn has_identity(&self) -> bool {
        self.current().identity.is_some()
    }

    fn current(&self) -> Loaded {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn config(&self) -> ClientTlsConfig {
        if let Some(files) = &self.files
            && let Ok(fresh) = files.load()
        {
            *self
                .loaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        }
        let loaded = self.current();
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&loaded.ca));
        match &loaded.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

impl Files {
    fn load(&self) -> Result<Loaded, TlsFileError> {
        let ca = read_pem(&self.ca, "CERTIFICATE")?;
        let identity = match &self.identity {
            Some((cert, key)) => Some((
                read_pem(cert, "CERTIFICATE")?,
                read_pem(key, "PRIVATE KEY")?,
            )),
            None => None,
        };
        Ok(Loaded { ca, identity })
    }
}

/// The endpoint of a broker at `address` (`HOST:PORT`, or a URI), over TLS when `tls`
/// is given, with the settings every Runnel connection uses: large HTTP/2 windows and
/// frames, keepalives that notice a peer cut off within seconds, no Nagle delay.
///
/// # Errors
/// An address that is not a valid URI, or a TLS configuration tonic refuses.
pub fn endpoint(
    address: &str,
    tls: Option<&ClientTls>,
) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_string()
    } else if tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        // With the 64 KiB defaults every large batch or fetch response waits for window
        // updates, and arrives in one read per 16 KiB frame.
        .initial_stream_window_size(16 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024)
        .max_frame_size(1024 * 1024);
    match tls {
        Some(tls) => endpoint.tls_config(tls.config()),
        None => Ok(endpoint),
    }
}
