//! Connections to brokers and the cached cluster metadata.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_proto::auth::{Conn, Credentials, Password};
use runnel_proto::local::LocalBroker;
use runnel_proto::tls::ClientTls;
use runnel_proto::v1::{
    self, admin_client::AdminClient, consumer_client::ConsumerClient, groups_client::GroupsClient,
    producer_client::ProducerClient, transactions_client::TransactionsClient,
    transforms_client::TransformsClient,
};
use tonic::transport::Endpoint;

use crate::error::{ClientError, check};

/// Where the client looks when no broker list is given (`runnel dev`'s default address).
pub const DEFAULT_BROKERS: &str = "127.0.0.1:7070";
/// Cached topic metadata older than this is fetched again (Kafka's
/// `metadata.max.age.ms`, 5 minutes), so a client learns of leadership moves and new
/// partitions even when no request failed.
const METADATA_MAX_AGE: Duration = Duration::from_secs(300);
/// Tries of an offset lookup whose leader moved or went away (200 ms apart).
const OFFSET_LOOKUP_ATTEMPTS: u32 = 50;
/// Largest gRPC message the client sends or accepts.
const GRPC_MESSAGE_BYTES_MAX: usize = 80 * 1024 * 1024;

/// What a coordinator coordinates: a consumer group or a transactional id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Coordinated {
    Group(String),
    Transaction(String),
}

/// A handle on the cluster, cheap to clone. Routes requests to partition leaders using
/// cached metadata, refreshed when a broker says it is not the leader.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    bootstrap: Conn,
    /// The addresses the client was given, for metadata when the bootstrap broker is
    /// down.
    bootstrap_addresses: Vec<String>,
    channels: Mutex<HashMap<u32, Conn>>,
    topics: Mutex<HashMap<String, Arc<TopicInfo>>>,
    brokers: Mutex<HashMap<u32, String>>,
    /// Each group's coordinator, as FindCoordinator last said.
    coordinators: Mutex<HashMap<Coordinated, Conn>>,
    /// The broker in this process, if any: the produce and fetch streams of the
    /// partitions it leads go to it directly.
    local: Option<Arc<dyn LocalBroker>>,
    tls: Option<ClientTls>,
    credentials: Option<Arc<Credentials>>,
}

/// What the client knows of a topic.
#[derive(Debug, Clone)]
pub(crate) struct TopicInfo {
    pub(crate) leaders: Vec<u32>,
    /// When it was fetched: older than [`METADATA_MAX_AGE`], it is fetched again.
    fetched: std::time::Instant,
    /// The topic's `max.message.bytes`; 0 when the broker did not say.
    pub(crate) max_message_bytes: usize,
}

fn endpoint(address: &str, tls: Option<&ClientTls>) -> Result<Endpoint, ClientError> {
    runnel_proto::tls::endpoint(address, tls).map_err(|err| {
        ClientError::InvalidArgument(format!("broker address {address:?} is invalid: {err}"))
    })
}

/// An error with its causes, `a: b: c` (tonic's transport errors say little at the top).
pub(crate) fn with_causes(err: &dyn std::error::Error) -> String {
    causes(err.to_string(), err.source())
}

/// A failed call's message with the causes of its failure.
fn status_with_causes(status: &tonic::Status) -> String {
    causes(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

fn causes(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// How a client connects: over TLS or not, and through a broker in its own process.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// TLS towards every broker (the CA to trust, and a client certificate for mutual
    /// TLS); `None`: plaintext.
    pub tls: Option<ClientTls>,
    /// The broker in this process (the streams and connect runtimes run inside one):
    /// the produce and fetch streams of the partitions it leads skip the network.
    pub local: Option<Arc<dyn LocalBroker>>,
    /// Who the client is: a SCRAM user (it authenticates on its first call and again
    /// before its session expires), or a broker's own runtimes (the cluster secret).
    /// `None`: anonymous, or the client certificate's name under mutual TLS.
    pub credentials: Option<Arc<Credentials>>,
}

impl ConnectOptions {
    /// Authenticates as `password.user` with SCRAM.
    pub fn with_password(mut self, password: Password) -> Self {
        self.credentials = Some(Credentials::scram(password));
        self
    }
}

impl Client {
    /// Connects to the first reachable broker of `brokers` (`host:port` each).
    ///
    /// # Errors
    /// No broker could be reached, or an address is malformed.
    pub async fn connect(brokers: &[String]) -> Result<Self, ClientError> {
        Self::connect_with(brokers, ConnectOptions::default()).await
    }

    /// Like [`Client::connect`], over TLS and/or through a broker in this process.
    ///
    /// # Errors
    /// As [`Client::connect`]; a TLS handshake that fails says why (an unknown CA, a
    /// certificate for another name, a client certificate the broker requires).
    pub async fn connect_with(
        brokers: &[String],
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        let ConnectOptions {
            tls,
            local,
            credentials,
        } = options;
        let list = brokers.join(",");
        let mut last_error = "no broker address given".to_string();
        for address in brokers.iter().map(|b| b.trim()).filter(|b| !b.is_empty()) {
            let connected = match endpoint(address, tls.as_ref())?
                .connect()
                .await
                .map(|channel| Conn::new(channel, credentials.clone()))
            {
                // A first call: a TLS handshake the broker refuses (plaintext towards TLS,
                // no client certificate where one is required) fails here, not at the
                // caller's first request.
                Ok(channel) => match AdminClient::new(channel.clone())
                    .metadata(v1::MetadataRequest { topics: Vec::new() })
                    .await
                {
                    // Every answer of a broker carries its error code; a failure
                    // without one never reached a broker's code (TLS, HTTP/2).
                    Err(status) if runnel_proto::status_error_code(&status).is_none() => {
                        Err(status_with_causes(&status))
                    }
                    // Refused credentials fail the connection, with the broker's words.
                    Err(status)
                        if matches!(
                            runnel_proto::status_error_code(&status),
                            Some(
                                v1::ErrorCode::AuthenticationFailed
                                    | v1::ErrorCode::AuthenticationRequired
                            )
                        ) =>
                    {
                        return Err(ClientError::from(status));
                    }
                    _ => Ok(channel),
                },
                Err(err) => Err(with_causes(&err)),
            };
            match connected {
                Ok(channel) => {
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            bootstrap: channel,
                            bootstrap_addresses: brokers
                                .iter()
                                .map(|b| b.trim().to_string())
                                .filter(|b| !b.is_empty())
                                .collect(),
                            channels: Mutex::new(HashMap::new()),
                            topics: Mutex::new(HashMap::new()),
                            brokers: Mutex::new(HashMap::new()),
                            coordinators: Mutex::new(HashMap::new()),
                            local,
                            tls,
                            credentials,
                        }),
                    });
                }
                Err(reason) => last_error = format!("{address}: {reason}"),
            }
        }
        Err(ClientError::Connect {
            brokers: list,
            reason: last_error,
        })
    }

    /// The same cluster, reached as `principal` (`User:NAME`): a broker's transform or
    /// connector whose calls are checked against that principal's ACLs. Only a client
    /// holding the cluster's credentials can act for another principal; any other client
    /// is returned as it is.
    pub fn run_as(&self, principal: &str) -> Client {
        let Some(credentials) = self
            .inner
            .credentials
            .as_ref()
            .and_then(|c| c.run_as(principal))
        else {
            return self.clone();
        };
        let lock = |m: &Mutex<HashMap<u32, String>>| {
            m.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        };
        Client {
            inner: Arc::new(Inner {
                bootstrap: self
                    .inner
                    .bootstrap
                    .with_credentials(Some(credentials.clone())),
                bootstrap_addresses: self.inner.bootstrap_addresses.clone(),
                channels: Mutex::new(HashMap::new()),
                topics: Mutex::new(HashMap::new()),
                brokers: Mutex::new(lock(&self.inner.brokers)),
                coordinators: Mutex::new(HashMap::new()),
                local: self.inner.local.clone(),
                tls: self.inner.tls.clone(),
                credentials: Some(credentials),
            }),
        }
    }

    /// The principal this client acts as for the broker in its process.
    pub(crate) fn acting_as(&self) -> Option<&str> {
        self.inner.credentials.as_ref().and_then(|c| c.acting_as())
    }

    /// The broker in this process, when it is `leader`.
    pub(crate) fn local(&self, leader: u32) -> Option<&Arc<dyn LocalBroker>> {
        self.inner
            .local
            .as_ref()
            .filter(|local| local.node_id() == leader)
    }

    /// The channel to the broker the client first reached.
    pub(crate) fn bootstrap_channel(&self) -> Conn {
        self.inner.bootstrap.clone()
    }

    pub(crate) fn admin_rpc(&self) -> AdminClient<Conn> {
        AdminClient::new(self.inner.bootstrap.clone())
    }

    /// The channel to the coordinator of `key`, found with FindCoordinator and cached.
    async fn coordinator_channel(&self, key: &Coordinated) -> Result<Conn, ClientError> {
        let cached = self
            .inner
            .coordinators
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned();
        if let Some(channel) = cached {
            return Ok(channel);
        }
        let found = match key {
            Coordinated::Group(group) => {
                let request = v1::FindCoordinatorRequest {
                    group_id: group.clone(),
                };
                self.ask_any(|channel| {
                    let request = request.clone();
                    async move { GroupsClient::new(channel).find_coordinator(request).await }
                })
                .await?
            }
            Coordinated::Transaction(id) => {
                let request = v1::FindTransactionCoordinatorRequest {
                    transactional_id: id.clone(),
                };
                self.ask_any(|channel| {
                    let request = request.clone();
                    async move {
                        TransactionsClient::new(channel)
                            .find_coordinator(request)
                            .await
                    }
                })
                .await?
            }
        };
        let channel = self.lazy(&found.address)?;
        self.inner
            .coordinators
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), channel.clone());
        Ok(channel)
    }

    /// Forgets a cached coordinator (it moved, or its broker went away).
    fn forget(&self, key: &Coordinated) {
        self.inner
            .coordinators
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Calls the coordinator of `group`. A retriable failure (the coordinator moved, is
    /// loading, or cannot be reached) forgets the coordinator and retries with backoff
    /// until `timeout` has passed; with a zero timeout the call is tried once.
    ///
    /// # Errors
    /// The call's own error, or the last retriable one once the time is up.
    pub(crate) async fn group_call<T, F, Fut>(
        &self,
        group: &str,
        timeout: Duration,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(GroupsClient<Conn>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let key = Coordinated::Group(group.to_string());
        self.coordinated_call(key, timeout, |channel| call(GroupsClient::new(channel)))
            .await
    }

    /// Calls the transaction coordinator of `transactional_id`, retrying as
    /// [`Client::group_call`] does (also while the previous transaction completes).
    ///
    /// # Errors
    /// The call's own error, or the last retriable one once the time is up.
    pub(crate) async fn txn_call<T, F, Fut>(
        &self,
        transactional_id: &str,
        timeout: Duration,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let key = Coordinated::Transaction(transactional_id.to_string());
        self.coordinated_call(key, timeout, call).await
    }

    async fn coordinated_call<T, F, Fut>(
        &self,
        key: Coordinated,
        timeout: Duration,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            let channel = self.coordinator_channel(&key).await;
            let result = match channel {
                Ok(channel) => call(channel)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(ClientError::from),
                Err(err) => Err(err),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(err) if err.is_retriable() => {
                    self.forget(&key);
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(err);
                    }
                    tracing::debug!(?key, error = %err, "coordinator call failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Every broker of the cluster, by id, with its address.
    ///
    /// # Errors
    /// No broker answered.
    pub(crate) async fn brokers(&self) -> Result<Vec<(u32, String)>, ClientError> {
        let response = self
            .metadata(v1::MetadataRequest { topics: Vec::new() })
            .await?;
        Ok(response
            .brokers
            .into_iter()
            .map(|b| (b.id, b.address))
            .collect())
    }

    /// A connected channel to `address`, or `None` when it cannot be reached.
    pub(crate) async fn connect_to(&self, address: &str) -> Option<Conn> {
        let channel = endpoint(address, self.inner.tls.as_ref())
            .ok()?
            .connect()
            .await
            .ok()?;
        Some(Conn::new(channel, self.inner.credentials.clone()))
    }

    /// A channel to `address` that connects on its first call.
    fn lazy(&self, address: &str) -> Result<Conn, ClientError> {
        Ok(Conn::new(
            endpoint(address, self.inner.tls.as_ref())?.connect_lazy(),
            self.inner.credentials.clone(),
        ))
    }

    /// The connect runtime's service (hosted by the broker process).
    pub(crate) fn connectors_rpc(
        &self,
    ) -> runnel_proto::v1::connectors_client::ConnectorsClient<Conn> {
        runnel_proto::v1::connectors_client::ConnectorsClient::new(self.inner.bootstrap.clone())
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }

    pub(crate) fn security_rpc(&self) -> v1::security_client::SecurityClient<Conn> {
        v1::security_client::SecurityClient::new(self.inner.bootstrap.clone())
    }

    /// The streams runtime's service (hosted by the broker process).
    pub(crate) fn transforms_rpc(&self) -> TransformsClient<Conn> {
        TransformsClient::new(self.inner.bootstrap.clone())
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }

    pub(crate) fn producer_rpc(&self, channel: Conn) -> ProducerClient<Conn> {
        ProducerClient::new(channel)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }

    pub(crate) fn consumer_rpc(&self, channel: Conn) -> ConsumerClient<Conn> {
        ConsumerClient::new(channel)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }

    /// Fetches metadata for `topic` from the cluster and caches it.
    ///
    /// # Errors
    /// Unknown topic, or the broker cannot be reached.
    pub(crate) async fn refresh_topic(&self, topic: &str) -> Result<Arc<TopicInfo>, ClientError> {
        let response = self
            .metadata(v1::MetadataRequest {
                topics: vec![topic.to_string()],
            })
            .await?;
        {
            let mut brokers = self
                .inner
                .brokers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for broker in &response.brokers {
                brokers.insert(broker.id, broker.address.clone());
            }
        }
        let meta = response
            .topics
            .into_iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| {
                ClientError::Corrupt(format!("metadata response lacks topic {topic:?}"))
            })?;
        check(meta.error.as_ref())?;
        let info = Arc::new(TopicInfo {
            fetched: std::time::Instant::now(),
            leaders: meta.partitions.iter().map(|p| p.leader).collect(),
            max_message_bytes: meta.max_message_bytes as usize,
        });
        self.inner
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_string(), info.clone());
        Ok(info)
    }

    /// Asks the bootstrap broker for metadata, and when it cannot be reached, every other
    /// broker the client knows of.
    async fn metadata(
        &self,
        request: v1::MetadataRequest,
    ) -> Result<v1::MetadataResponse, ClientError> {
        self.ask_any(|channel| {
            let request = request.clone();
            async move { AdminClient::new(channel).metadata(request).await }
        })
        .await
    }

    /// Makes a call that any broker answers: to the bootstrap broker, and when it cannot
    /// be reached, to every other broker the client knows of (those metadata named, then
    /// those it was given), until one answers.
    async fn ask_any<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let first = match call(self.inner.bootstrap.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => ClientError::from(status),
        };
        if !matches!(
            first,
            ClientError::Transport { .. } | ClientError::Connect { .. }
        ) {
            return Err(first);
        }
        let mut addresses: Vec<String> = self
            .inner
            .brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        addresses.sort();
        for address in &self.inner.bootstrap_addresses {
            if !addresses.contains(address) {
                addresses.push(address.clone());
            }
        }
        for address in addresses {
            let Some(channel) = self.connect_to(&address).await else {
                continue;
            };
            if let Ok(response) = call(channel).await {
                return Ok(response.into_inner());
            }
        }
        Err(first)
    }

    /// Drops the cached metadata of `topic`: the next request fetches it again (after a
    /// leader moved or a broker went away).
    pub(crate) fn forget_topic(&self, topic: &str) {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(topic);
    }

    /// Cached metadata for `topic`, fetched on first use.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicInfo>, ClientError> {
        let cached = self
            .inner
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .cloned();
        match cached {
            Some(info) if info.fetched.elapsed() < METADATA_MAX_AGE => Ok(info),
            _ => self.refresh_topic(topic).await,
        }
    }

    /// The topic's `max.message.bytes`: the largest record batch it accepts.
    ///
    /// # Errors
    /// Unknown topic, or the broker cannot be reached.
    pub async fn max_message_bytes(&self, topic: &str) -> Result<usize, ClientError> {
        Ok(match self.topic(topic).await?.max_message_bytes {
            0 => runnel_batch::BATCH_SIZE_BYTES_MAX,
            n => n,
        })
    }

    /// The end of a partition: its high watermark, or with `ReadCommitted` its last
    /// stable offset (what a read_committed consumer can read up to).
    ///
    /// # Errors
    /// Unknown topic or partition, or a leader still unreachable after retries.
    pub async fn end_offset(
        &self,
        topic: &str,
        partition: u32,
        isolation: v1::IsolationLevel,
    ) -> Result<i64, ClientError> {
        self.offset_of(
            topic,
            partition,
            v1::offset_query::Spec::Latest(true),
            isolation,
        )
        .await
    }

    /// Number of partitions of `topic`.
    ///
    /// # Errors
    /// Unknown topic, or the broker cannot be reached.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        Ok(self.topic(topic).await?.leaders.len() as u32)
    }

    /// Opens a `ProduceStream` to the leader of `topic`-`partition` for a caller that
    /// encodes record batches itself (the raw-batch path: `runnel-batch` builds them).
    /// Requests are sent as `requests` yields them, responses come back in order.
    ///
    /// # Errors
    /// Unknown topic or partition, or the broker cannot be reached.
    pub async fn produce_stream(
        &self,
        topic: &str,
        partition: u32,
        requests: impl tokio_stream::Stream<Item = v1::ProduceRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<v1::ProduceResponse>, ClientError> {
        let channel = self.leader_channel(topic, partition).await?;
        Ok(self
            .producer_rpc(channel)
            .produce_stream(requests)
            .await?
            .into_inner())
    }

    /// Asks the partition's leader for an offset: the earliest, the latest (high
    /// watermark) or the first at a timestamp.
    ///
    /// # Errors
    /// Unknown topic or partition, or a leader still unreachable after retries.
    pub(crate) async fn offset_of(
        &self,
        topic: &str,
        partition: u32,
        spec: v1::offset_query::Spec,
        isolation: v1::IsolationLevel,
    ) -> Result<i64, ClientError> {
        // A leader that moved or a broker that went away is looked up again, for a
        // while: lookups come between fetches, which ride out the same faults.
        let mut attempts = 0;
        loop {
            match self.offset_once(topic, partition, spec, isolation).await {
                Err(err) if err.is_retriable() && attempts < OFFSET_LOOKUP_ATTEMPTS => {
                    attempts += 1;
                    self.forget_topic(topic);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    async fn offset_once(
        &self,
        topic: &str,
        partition: u32,
        spec: v1::offset_query::Spec,
        isolation: v1::IsolationLevel,
    ) -> Result<i64, ClientError> {
        let channel = self.leader_channel(topic, partition).await?;
        let answer = self
            .consumer_rpc(channel)
            .list_offsets(v1::ListOffsetsRequest {
                queries: vec![v1::OffsetQuery {
                    topic: topic.to_string(),
                    partition,
                    spec: Some(spec),
                    isolation: isolation as i32,
                }],
            })
            .await?
            .into_inner()
            .answers
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Corrupt("empty list offsets response".into()))?;
        check(answer.error.as_ref())?;
        Ok(answer.offset)
    }

    /// A channel to broker `id`, or to the bootstrap broker when its address is unknown.
    pub(crate) fn channel_to(&self, id: u32) -> Result<Conn, ClientError> {
        if let Some(channel) = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return Ok(channel.clone());
        }
        let address = self
            .inner
            .brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        let channel = match address {
            Some(address) => self.lazy(&address)?,
            None => self.inner.bootstrap.clone(),
        };
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, channel.clone());
        Ok(channel)
    }

    /// The channel to the leader of `topic`-`partition`.
    pub(crate) async fn leader_channel(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Conn, ClientError> {
        let info = self.topic(topic).await?;
        let leader = match info.leaders.get(partition as usize) {
            Some(leader) => *leader,
            None => {
                // The topic may have grown since the metadata was cached.
                let info = self.refresh_topic(topic).await?;
                *info.leaders.get(partition as usize).ok_or_else(|| ClientError::Broker {
                    code: v1::ErrorCode::UnknownPartition,
                    message: format!(
                        "topic {topic:?} has {} partitions; partition {partition} does not exist",
                        info.leaders.len()
                    ),
                })?
            }
        };
        self.channel_to(leader)
    }
}

/// Where a broker is, for a runtime built before the broker listens: the addresses,
/// and the broker itself when it runs in this process.
type Target = (Vec<String>, ConnectOptions);

/// A client connected on first use, for the streams and connect runtimes: they are
/// built before their broker listens, and told where it is once it does.
#[derive(Default)]
pub struct LazyClient {
    target: std::sync::OnceLock<Target>,
    client: tokio::sync::OnceCell<Client>,
}

impl LazyClient {
    /// Where the broker is, and how to connect (`options.local`: the broker itself,
    /// when it runs in this process). Only the first call counts.
    pub fn connect_to(&self, brokers: Vec<String>, options: ConnectOptions) {
        let _ = self.target.set((brokers, options));
    }

    /// The client, connected on the first call.
    ///
    /// # Errors
    /// Not told where the broker is yet, or it cannot be reached.
    pub async fn get(&self) -> Result<Client, ClientError> {
        let (brokers, options) = self.target.get().ok_or_else(|| ClientError::Connect {
            brokers: "(none yet)".into(),
            reason: "the runtime was not told where its broker listens".into(),
        })?;
        let client = self
            .client
            .get_or_try_init(|| Client::connect_with(brokers, options.clone()))
            .await?;
        Ok(client.clone())
    }
}
