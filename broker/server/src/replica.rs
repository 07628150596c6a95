//! The replica manager: how this broker keeps the partitions it follows in step with
//! their leaders, and how, as a leader, it keeps its ISR current.
//!
//! A follower runs one fetcher per leader broker. The fetcher holds one `Replication.Fetch`
//! stream open to that leader and asks, in lockstep, for every partition it follows
//! there: at its log end offset, naming the epoch of its last batch. The leader answers
//! with the batches it lacks, or with the point where the follower's log diverges, which
//! the follower truncates to before it fetches again. What comes is appended as the
//! leader stored it, and synced under the default flush policy, before the next fetch
//! tells the leader how far the follower got: so a leader counts a follower's offset
//! towards the high watermark only once the follower holds it durably.
//!
//! **Invariants:**
//! - A replica appends only batches that continue its log, at the offsets the leader
//!   gave them; it never re-stamps them.
//! - A follower truncates only to a divergence point the leader names from its epoch
//!   cache (never only to a high watermark), or resets to the leader's log start.
//! - ISR changes go through the controller with the leader epoch and partition epoch the
//!   leader saw; the controller refuses a change from a stale leader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_controller::MetadataImage;
use runnel_controller::state::Command;
use runnel_proto::auth::{Conn, Credentials};
use runnel_proto::tls::ClientTls;
use runnel_proto::v1;
use runnel_proto::v1::replication_client::ReplicationClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::now_ms;
use crate::partition::Partition;

/// How long a partition whose fetch failed waits before it is asked for again.
const PARTITION_BACKOFF: Duration = Duration::from_millis(300);
/// How long a fetcher waits before it reconnects to a leader it lost.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// How long a proposed ISR change may take to commit.
const ISR_PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Replication settings of a broker.
#[derive(Debug, Clone, Copy)]
pub struct ReplicationSettings {
    pub fetch_wait_max: Duration,
    pub fetch_bytes_max: u32,
    /// `replica.lag.time.max.ms`.
    pub lag_time_max_ms: i64,
}

impl ReplicationSettings {
    pub fn from_config(config: &crate::BrokerConfig) -> Self {
        ReplicationSettings {
            fetch_wait_max: Duration::from_millis(config.replica_fetch_wait_max_ms),
            fetch_bytes_max: config.replica_fetch_max_bytes,
            lag_time_max_ms: i64::try_from(config.replica_lag_time_max_ms).unwrap_or(i64::MAX),
        }
    }
}

/// A partition this broker follows, and the leader epoch it follows it under.
#[derive(Clone)]
pub struct Followed {
    pub topic: String,
    pub topic_id: u64,
    pub partition: Arc<Partition>,
    pub leader_epoch: i32,
}

struct Fetcher {
    followed: watch::Sender<Vec<Followed>>,
    task: JoinHandle<()>,
}

/// The fetchers of this broker, one per leader it follows partitions of.
pub struct ReplicaManager {
    node_id: u32,
    pub(crate) settings: ReplicationSettings,
    runtime: Option<tokio::runtime::Handle>,
    fetchers: Mutex<HashMap<u32, Fetcher>>,
    /// TLS towards the leaders, when the cluster uses it.
    tls: Option<ClientTls>,
    /// What this broker proves itself with to the leaders.
    credentials: Option<Arc<Credentials>>,
}

impl ReplicaManager {
    pub fn new(
        node_id: u32,
        settings: ReplicationSettings,
        tls: Option<ClientTls>,
        credentials: Option<Arc<Credentials>>,
    ) -> Self {
        ReplicaManager {
            node_id,
            settings,
            runtime: tokio::runtime::Handle::try_current().ok(),
            fetchers: Mutex::new(HashMap::new()),
            tls,
            credentials,
        }
    }

    /// Follows exactly `by_leader` (leader id → partitions): starts fetchers for new
    /// leaders, hands each running fetcher its new set, and stops the fetchers of
    /// leaders this broker no longer follows anything of.
    pub fn follow(
        &self,
        by_leader: HashMap<u32, Vec<Followed>>,
        images: &watch::Sender<Arc<MetadataImage>>,
    ) {
        let mut fetchers = self
            .fetchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fetchers.retain(|leader, fetcher| {
            let keep = by_leader.contains_key(leader) && !fetcher.task.is_finished();
            if !keep {
                fetcher.task.abort();
            }
            keep
        });
        for (leader, followed) in by_leader {
            if let Some(fetcher) = fetchers.get(&leader) {
                fetcher.followed.send_replace(followed);
                continue;
            }
            let Some(runtime) = &self.runtime else {
                tracing::error!("no async runtime to run replica fetchers on");
                return;
            };
            let (tx, rx) = watch::channel(followed);
            let task = runtime.spawn(run_fetcher(
                leader,
                self.node_id,
                rx,
                images.subscribe(),
                self.settings,
                self.tls.clone(),
                self.credentials.clone(),
            ));
            fetchers.insert(leader, Fetcher { followed: tx, task });
        }
    }

    /// Stops every fetcher.
    pub fn stop(&self) {
        let mut fetchers = self
            .fetchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, fetcher) in fetchers.drain() {
            fetcher.task.abort();
        }
    }
}

/// Fetches from `leader` for as long as this broker follows anything there,
/// reconnecting after failures.
async fn run_fetcher(
    leader: u32,
    me: u32,
    mut followed: watch::Receiver<Vec<Followed>>,
    images: watch::Receiver<Arc<MetadataImage>>,
    settings: ReplicationSettings,
    tls: Option<ClientTls>,
    credentials: Option<Arc<Credentials>>,
) {
    let mut backoff: HashMap<(u64, u32), Instant> = HashMap::new();
    let mut failing = false;
    loop {
        if followed.borrow_and_update().is_empty() {
            if followed.changed().await.is_err() {
                return;
            }
            continue;
        }
        let address = images
            .borrow()
            .metadata
            .broker(leader)
            .map(|b| b.address.clone());
        let result = match address {
            Some(address) => match connect(&address, tls.as_ref()).await {
                Ok(channel) => {
                    let channel = Conn::new(channel, credentials.clone());
                    session(
                        leader,
                        me,
                        channel,
                        &mut followed,
                        &mut backoff,
                        settings,
                        &mut failing,
                    )
                    .await
                }
                Err(err) => Err(err),
            },
            None => Err(anyhow::anyhow!("broker {leader} is not in the metadata")),
        };
        if let Err(err) = result {
            if !failing {
                tracing::warn!(leader, error = %err, "replica fetching from the leader failed; retrying");
            }
            failing = true;
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    }
}

/// A channel to the leader at `address`.
async fn connect(
    address: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<tonic::transport::Channel> {
    Ok(runnel_proto::tls::endpoint(address, tls)?
        .connect_timeout(Duration::from_secs(2))
        // A leader cut off without a reset is noticed within seconds.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .initial_stream_window_size(crate::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::HTTP2_CONNECTION_WINDOW_BYTES)
        .connect()
        .await?)
}

/// One fetch stream to the leader, until it fails or nothing is followed there.
async fn session(
    leader: u32,
    me: u32,
    channel: Conn,
    followed: &mut watch::Receiver<Vec<Followed>>,
    backoff: &mut HashMap<(u64, u32), Instant>,
    settings: ReplicationSettings,
    failing: &mut bool,
) -> anyhow::Result<()> {
    let mut client = ReplicationClient::new(channel)
        .max_decoding_message_size(crate::GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(crate::GRPC_MESSAGE_BYTES_MAX);
    let (requests, outgoing) = mpsc::channel(1);
    let mut responses = client
        .fetch(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let answer_timeout = settings.fetch_wait_max + Duration::from_secs(30);
    loop {
        let now = Instant::now();
        backoff.retain(|_, until| *until > now);
        let mut asked = Vec::new();
        let mut partitions = Vec::new();
        {
            let current = followed.borrow_and_update();
            if current.is_empty() {
                return Ok(());
            }
            for f in current.iter() {
                if backoff.contains_key(&(f.topic_id, f.partition.index)) {
                    continue;
                }
                let Ok((fetch_offset, last_fetched_epoch, high_watermark)) =
                    f.partition.fetch_position()
                else {
                    continue;
                };
                partitions.push(v1::ReplicaFetchPartition {
                    topic: f.topic.clone(),
                    topic_id: f.topic_id,
                    partition: f.partition.index,
                    leader_epoch: f.leader_epoch,
                    fetch_offset,
                    last_fetched_epoch,
                    high_watermark,
                });
                asked.push(f.clone());
            }
        }
        if partitions.is_empty() {
            let wake = tokio::time::sleep(PARTITION_BACKOFF);
            tokio::select! {
                () = wake => {}
                changed = followed.changed() => if changed.is_err() { return Ok(()) },
            }
            continue;
        }
        let request = v1::ReplicaFetchRequest {
            replica_id: me,
            max_wait_ms: settings.fetch_wait_max.as_millis() as u32,
            max_bytes: settings.fetch_bytes_max,
            partitions,
        };
        requests
            .send(request)
            .await
            .map_err(|_| anyhow::anyhow!("the fetch stream to broker {leader} closed"))?;
        let response = tokio::time::timeout(answer_timeout, responses.message())
            .await
            .map_err(|_| anyhow::anyhow!("broker {leader} did not answer a fetch"))??
            .ok_or_else(|| anyhow::anyhow!("broker {leader} closed the fetch stream"))?;
        if *failing {
            tracing::info!(leader, "replica fetching from the leader again");
            *failing = false;
        }
        let failed = tokio::task::spawn_blocking(move || apply_response(asked, response)).await?;
        let until = Instant::now() + PARTITION_BACKOFF;
        for key in failed {
            backoff.insert(key, until);
        }
    }
}

/// Applies a leader's answer to the partitions it was about; returns those to leave
/// alone for a while (the leader refused them).
fn apply_response(asked: Vec<Followed>, response: v1::ReplicaFetchResponse) -> Vec<(u64, u32)> {
    let mut failed = Vec::new();
    for fetched in response.partitions {
        let Some(f) = asked
            .iter()
            .find(|f| f.topic == fetched.topic && f.partition.index == fetched.partition)
        else {
            continue;
        };
        let partition = &f.partition;
        let outcome = if let Some(error) = &fetched.error {
            if error.code() == v1::ErrorCode::OffsetOutOfRange && fetched.log_start_offset >= 0 {
                // The leader's log starts beyond this one's end: start over from there.
                partition
                    .truncate_replica(fetched.log_start_offset, true)
                    .map(|_| ())
            } else {
                tracing::debug!(topic = %f.topic, partition = partition.index, error = %error.message, "leader refused a replica fetch");
                failed.push((f.topic_id, partition.index));
                Ok(())
            }
        } else if let Some(diverging) = &fetched.diverging {
            partition
                .truncate_to_divergence(diverging.epoch, diverging.end_offset)
                .map(|_| ())
        } else {
            partition.append_replicated(&fetched.records, fetched.high_watermark)
        };
        if let Err(err) = outcome {
            tracing::warn!(topic = %f.topic, partition = partition.index, error = %err, "replicating from the leader failed");
            failed.push((f.topic_id, partition.index));
        }
    }
    failed
}

/// Keeps the ISR of every partition this broker leads current: proposes shrinks and
/// expansions to the controller as followers fall behind and catch up.
pub(crate) async fn maintain_isr(broker: Arc<Broker>, period: Duration) {
    let lag_max_ms = broker.replicas.settings.lag_time_max_ms;
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        broker.recover_failed_replicas().await;
        let now = now_ms();
        for partition in broker.all_partitions() {
            let Some(change) = partition.wanted_isr_change(now, lag_max_ms) else {
                continue;
            };
            tracing::info!(
                topic = %partition.topic, partition = partition.index, isr = ?change.isr,
                leader_epoch = change.leader_epoch, "proposing an ISR change"
            );
            let shrinks = change.isr.len() < partition.isr_len();
            let command = Command::AlterIsr {
                topic: partition.topic.clone(),
                partition: partition.index,
                leader: broker.config.node_id,
                leader_epoch: change.leader_epoch,
                partition_epoch: change.partition_epoch,
                isr: change.isr.clone(),
            };
            match broker
                .controller
                .propose(command, ISR_PROPOSAL_TIMEOUT)
                .await
            {
                Ok((_, Ok(_))) if shrinks => broker.metrics.isr_shrinks.add(1),
                Ok((_, Ok(_))) => broker.metrics.isr_expands.add(1),
                Ok((_, Err(err))) => {
                    tracing::info!(topic = %partition.topic, partition = partition.index, error = %err, "ISR change refused");
                    partition.isr_change_failed(&change);
                }
                Err(err) => {
                    tracing::warn!(topic = %partition.topic, partition = partition.index, error = %err, "ISR change not committed");
                    partition.isr_change_failed(&change);
                }
            }
        }
    }
}
