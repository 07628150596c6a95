//! The Runnel broker: hosted partitions and the gRPC services, on the controller
//! quorum's metadata.
//!
//! [`start`] binds the listener, starts this node's controller voter (when it is one),
//! follows the committed metadata, opens (and recovers) the partitions it assigns here,
//! and serves the Producer, Consumer, Admin and Groups services (and the Quorum service
//! on a controller) plus gRPC health and reflection (v1 and v1alpha). It is used by
//! `runnel dev`, `runnel broker start` and the end-to-end tests.
//!
//! **Invariant:** gRPC status codes are produced only in [`error`]; storage knows nothing
//! of the network.

pub mod broker;
pub mod config;
pub mod data_dir;
pub mod error;
pub mod group;
mod group_ops;
pub mod metrics;
pub mod offsets;
pub mod partition;
mod records;
pub mod replica;
pub mod security;
mod service;
#[cfg(test)]
mod simulation;
mod throttle;
pub mod tls;
pub mod txn;
mod txn_ops;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use runnel_controller::{ControllerClient, MetadataImage, Quorum, QuorumConfig};
use runnel_proto::v1::{
    admin_server::AdminServer, consumer_server::ConsumerServer, groups_server::GroupsServer,
    producer_server::ProducerServer, replication_server::ReplicationServer,
    security_server::SecurityServer, transactions_server::TransactionsServer,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use broker::Broker;
pub use config::BrokerConfig;
pub use data_dir::{DataDirLock, DataDirLockError};
pub use error::BrokerError;

/// Largest gRPC message accepted or sent (a produce request or a fetch response).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 80 * 1024 * 1024;
/// HTTP/2 flow-control windows (per stream and per connection).
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame this server accepts. With the 16 KiB default a 1 MiB produce
/// request arrives as 64 frames, and as many socket reads.
pub const HTTP2_FRAME_BYTES_MAX: u32 = 1024 * 1024;
/// How often interval flush policies are checked, whatever the housekeeping interval.
const FLUSH_TICK_MS: u64 = 100;
/// Longest a stopping broker waits for its leaderships to move.
const CONTROLLED_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often transaction coordinators look for timed-out and unfinished transactions.
const TXN_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How often a leader checks whether its ISR should shrink or grow.
const ISR_CHECK_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A broker serving on a bound address until [`RunningBroker::shutdown`].
pub struct RunningBroker {
    pub local_addr: SocketAddr,
    /// The listener's TLS, which the metrics endpoint serves with too.
    server_tls: Option<Arc<tls::ServerTls>>,
    pub broker: Arc<Broker>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
    quorum: Option<Arc<Quorum>>,
}

/// Binds `config.listen` (port 0 picks a free port), opens every partition and serves.
///
/// # Errors
/// The address cannot be bound, the config is invalid, or a partition cannot be opened.
pub async fn start(config: BrokerConfig) -> anyhow::Result<RunningBroker> {
    start_with(config, |_, _, _, routes| routes).await
}

/// Like [`start`], and `extend` may add services (the streams runtime's) to the server;
/// it gets the bound address, the broker's in-process data path and the credentials
/// the broker's own clients prove themselves with, so that those services can reach
/// the broker as clients.
///
/// # Errors
/// As [`start`].
pub async fn start_with(
    config: BrokerConfig,
    extend: impl FnOnce(
        SocketAddr,
        Arc<dyn runnel_proto::local::LocalBroker>,
        Option<Arc<runnel_proto::auth::Credentials>>,
        tonic::service::Routes,
    ) -> tonic::service::Routes,
) -> anyhow::Result<RunningBroker> {
    // TLS files are checked before anything else starts.
    let server_tls = config.tls.as_ref().map(tls::ServerTls::load).transpose()?;
    let client_tls = config.client_tls()?;
    let (cluster_secret, send_secret) = config.cluster_secret()?;
    let internal_credentials = if send_secret {
        Some(
            runnel_proto::auth::Credentials::cluster(&cluster_secret)
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    let open_listener = match config.auth.open_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding auth.open_listen {address}"))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let advertised = config
        .advertised_address
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    let housekeeping_ms = config.housekeeping_interval_ms.max(FLUSH_TICK_MS);
    let voters = config.voters(&advertised)?;
    let metadata_dir = config.data_dir.join("__cluster_metadata");
    let quorum = if config.is_controller() {
        let mut quorum_config =
            QuorumConfig::new(config.node_id, voters.clone(), metadata_dir.clone());
        quorum_config.broker_session_timeout =
            Duration::from_millis(config.broker_session_timeout_ms);
        quorum_config.import = legacy_metadata(&metadata_dir)?;
        quorum_config.unclean_leader_election = config
            .topic_defaults
            .get(runnel_controller::state::UNCLEAN_ELECTION_KEY)
            .map_or(config.unclean_leader_election_enable, |v| v == "true");
        quorum_config.leader_rebalance_interval = config
            .auto_leader_rebalance_enable
            .then(|| Duration::from_millis(config.leader_imbalance_check_interval_ms.max(100)));
        quorum_config.tls = client_tls.clone();
        quorum_config.credentials = internal_credentials.clone();
        Some(
            Quorum::start(quorum_config)
                .await
                .context("starting the controller")?,
        )
    } else {
        None
    };
    let controller = Arc::new(ControllerClient::new(
        voters,
        quorum.clone(),
        client_tls,
        internal_credentials.clone(),
    ));
    let images = match &quorum {
        Some(quorum) => quorum.images(),
        None => {
            let (tx, rx) = watch::channel(Arc::new(MetadataImage::default()));
            tokio::spawn(controller.clone().follow_metadata(tx));
            rx
        }
    };
    let broker = Arc::new(Broker::new(
        config.clone(),
        advertised,
        controller,
        quorum.clone(),
        internal_credentials,
    )?);

    let security = security::Security::new(broker.clone(), cluster_secret);
    let service = service::Service::new(broker.clone(), security.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ProducerServer<service::Service>>()
        .await;
    health_reporter
        .set_serving::<ConsumerServer<service::Service>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<service::Service>>()
        .await;
    health_reporter
        .set_serving::<GroupsServer<service::Service>>()
        .await;
    health_reporter
        .set_serving::<TransactionsServer<service::Service>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let routes = tonic::service::Routes::new(
        ProducerServer::new(service.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
    )
    .add_service(
        ConsumerServer::new(service.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
    )
    .add_service(AdminServer::new(service.clone()))
    .add_service(GroupsServer::new(service.clone()))
    .add_service(TransactionsServer::new(service.clone()))
    .add_service(SecurityServer::new(security::SecurityService(
        security.clone(),
    )))
    .add_service(health_service)
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha);
    let routes = routes.add_service(
        ReplicationServer::new(service.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
    );
    let routes = match &quorum {
        Some(quorum) => routes.add_service(quorum.service()),
        None => routes,
    };
    let routes = extend(
        local_addr,
        Arc::new(service.clone()),
        broker.internal_credentials.clone(),
        routes,
    );
    let server = |required: bool| {
        tonic::transport::Server::builder()
            .layer(metrics::MeasureLayer(broker.clone()))
            .layer(security::AuthLayer {
                security: security.clone(),
                required,
            })
            .tcp_nodelay(true)
            // HTTP/2's default 64 KiB windows would stall every large batch for window
            // updates; these let many batches be in flight on one stream.
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(HTTP2_FRAME_BYTES_MAX)
    };
    let router = server(config.auth.require_authentication).add_routes(routes.clone());
    // Nagle's algorithm would hold small answers (acks, a follower's next fetch) for the
    // peer's delayed ACK, 40 ms: the builder's `tcp_nodelay` covers only listeners it
    // binds itself.
    let (open_shutdown_tx, open_shutdown_rx) = watch::channel(false);
    let shutdown = async move {
        let _ = shutdown_rx.await;
        let _ = open_shutdown_tx.send(true);
    };
    let mut tasks = Vec::new();
    if let Some(listener) = open_listener {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stop = open_shutdown_rx;
        let open = server(false)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
        tasks.push(tokio::spawn(async move {
            if let Err(err) = open.await {
                tracing::error!(error = %err, "the open listener failed");
            }
        }));
    }
    let server = match server_tls.clone() {
        Some(server_tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(tls::incoming(listener, server_tls), shutdown),
        ),
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };

    let keeper = broker.clone();
    let housekeeping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(FLUSH_TICK_MS));
        let mut since_clean_ms = 0u64;
        loop {
            tick.tick().await;
            since_clean_ms += FLUSH_TICK_MS;
            let clean = since_clean_ms >= housekeeping_ms;
            if clean {
                since_clean_ms = 0;
            }
            let keeper = keeper.clone();
            if tokio::task::spawn_blocking(move || keeper.housekeeping(clean))
                .await
                .is_err()
            {
                tracing::error!("housekeeping task panicked");
            }
        }
    });
    tasks.push(housekeeping);
    tasks.push(tokio::spawn(apply_images(broker.clone(), images)));
    if config.is_broker() {
        let resolver = broker.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TXN_CHECK_INTERVAL);
            loop {
                tick.tick().await;
                resolver.expire_transactions();
            }
        }));
        tasks.push(tokio::spawn(heartbeat(broker.clone())));
        tasks.push(tokio::spawn(replica::maintain_isr(
            broker.clone(),
            ISR_CHECK_INTERVAL,
        )));
    }
    let running = RunningBroker {
        server_tls,
        local_addr,
        broker: broker.clone(),
        shutdown: Some(shutdown_tx),
        server,
        tasks,
        quorum,
    };
    broker.become_ready().await?;
    tracing::info!(address = %local_addr, data_dir = %config.data_dir.display(), node_id = config.node_id, "broker serving");
    Ok(running)
}

/// The metadata of a single-node data directory from before the controller quorum, to
/// take into a new controller log.
fn legacy_metadata(
    dir: &std::path::Path,
) -> anyhow::Result<Option<runnel_controller::ClusterMetadata>> {
    let path = dir.join("metadata.json");
    if dir.join("raft.log").exists() {
        return Ok(None);
    }
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading the single-node metadata {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Acts on each newer metadata image, in order, on a blocking thread.
async fn apply_images(broker: Arc<Broker>, mut images: watch::Receiver<Arc<MetadataImage>>) {
    loop {
        let image = images.borrow_and_update().clone();
        if image.index > broker.image().index {
            let applying = broker.clone();
            if tokio::task::spawn_blocking(move || applying.apply_image(image))
                .await
                .is_err()
            {
                tracing::error!("applying a metadata image panicked");
            }
        }
        if images.changed().await.is_err() {
            return;
        }
    }
}

/// Heartbeats to the active controller, which registers this broker on the first one.
async fn heartbeat(broker: Arc<Broker>) {
    let interval = Duration::from_millis(broker.config.broker_heartbeat_interval_ms.max(10));
    let timeout = Duration::from_millis(broker.config.broker_session_timeout_ms.max(100));
    let mut failing = false;
    loop {
        match broker
            .controller
            .heartbeat(
                broker.config.node_id,
                &broker.advertised,
                &broker.incarnation,
                timeout,
            )
            .await
        {
            Ok(_) if failing => {
                tracing::info!("reached the active controller again");
                failing = false;
            }
            Ok(_) => {}
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "heartbeat to the controller failed");
                }
                failing = true;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

impl RunningBroker {
    /// Hands this broker's leaderships to in-sync peers (controlled shutdown), stops
    /// accepting requests, waits for the server to stop, and closes every log cleanly.
    ///
    /// # Errors
    /// The server task failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.broker
            .controlled_shutdown(CONTROLLED_SHUTDOWN_TIMEOUT)
            .await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in &self.tasks {
            task.abort();
        }
        let served = (&mut self.server).await;
        if let Some(quorum) = &self.quorum {
            quorum.shutdown().await;
        }
        let broker = self.broker.clone();
        tokio::task::spawn_blocking(move || broker.close()).await?;
        served??;
        Ok(())
    }

    /// Serves the Prometheus endpoint where the config says (nothing when it is off):
    /// this broker's metrics, the process's, and those `collectors` add. Returns the
    /// bound address.
    ///
    /// # Errors
    /// An invalid metrics address, or one that cannot be bound.
    pub async fn serve_metrics(
        &mut self,
        collectors: Vec<metrics::Collector>,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let Some(address) = self.broker.config.metrics_address()? else {
            return Ok(None);
        };
        let listener = metrics::bind(address).await?;
        let bound = listener.local_addr()?;
        self.tasks.push(tokio::spawn(metrics::serve(
            listener,
            self.broker.clone(),
            collectors,
            self.server_tls.clone(),
        )));
        Ok(Some(bound))
    }

    /// Waits until the server stops by itself (it does not, unless it fails).
    ///
    /// # Errors
    /// The server failed.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.server).await??;
        Ok(())
    }
}
