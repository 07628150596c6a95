//! The broker: the partitions this node hosts, and the operations clients call.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use runnel_broker_storage::{KNOWN_KEYS, LogConfig};
use runnel_controller::state::{BrokerRecord, NO_LEADER, PartitionRecord, TopicRecord};
use runnel_controller::{Command, ControllerClient, MetadataImage, Outcome, Quorum};
use runnel_proto::v1;
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::now_ms;
use crate::partition::{Partition, ReadBuffers};

/// Largest fetch response the broker builds, whatever the client asks.
pub const FETCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Longest a fetch may be held waiting for data.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;
/// Topic config keys the broker itself interprets (the rest belong to the log).
pub const BROKER_TOPIC_KEYS: &[&str] = &[
    "min.insync.replicas",
    runnel_controller::state::UNCLEAN_ELECTION_KEY,
];
/// Longest an admin operation waits for the controller quorum.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(15);
/// The file in a partition's directory naming the topic id it belongs to.
const TOPIC_ID_FILE: &str = "topic.id";
/// Replicas of each internal topic partition, when as many brokers are live.
const INTERNAL_REPLICATION_FACTOR: u32 =
    runnel_controller::state::INTERNAL_REPLICATION_FACTOR as u32;
/// How long a starting cluster waits for brokers before creating its internal topics.
const INTERNAL_TOPIC_WAIT: Duration = Duration::from_secs(10);
/// Producer ids a broker takes from the controller at a time.
const PRODUCER_ID_BLOCK: u32 = 1000;

/// The partitions of one topic this broker holds a replica of.
struct HostedTopic {
    id: u64,
    configs: BTreeMap<String, String>,
    partitions: BTreeMap<u32, Arc<Partition>>,
}

pub struct Broker {
    pub(crate) config: BrokerConfig,
    log_defaults: LogConfig,
    /// The metadata image this broker last acted on: opened, closed and led partitions
    /// by. Every answer about the cluster comes from it, never from a newer image.
    applied: watch::Sender<Arc<MetadataImage>>,
    pub(crate) controller: Arc<ControllerClient>,
    pub(crate) quorum: Option<Arc<Quorum>>,
    /// This process's identity towards the controller; a restart changes it.
    pub(crate) incarnation: String,
    pub(crate) advertised: String,
    topics: RwLock<HashMap<String, HostedTopic>>,
    pub(crate) coordinator: Mutex<crate::group::Coordinator>,
    pub(crate) offsets: Mutex<crate::offsets::OffsetStore>,
    /// The `__consumer_offsets` partitions whose groups this broker coordinates, with the
    /// leader epoch it replayed them in.
    pub(crate) coordination: Mutex<HashMap<u32, i32>>,
    pub(crate) read_buffers: ReadBuffers,
    /// Picks the partition of the keyless records of a produce request with messages.
    keyless_partition: std::sync::atomic::AtomicU32,
    /// Producer ids this broker may hand out: `next..end`, a block from the controller.
    producer_ids: tokio::sync::Mutex<(i64, i64)>,
    /// What this leader may still send to replicas catching up for a reassignment.
    reassignment_throttle: crate::throttle::Throttle,
    pub(crate) replicas: crate::replica::ReplicaManager,
    pub(crate) txn_coordinator: Mutex<crate::txn_ops::TxnCoordinator>,
    /// Channels to other brokers (transaction coordinators and partition leaders).
    pub(crate) peers: Mutex<HashMap<u32, (String, runnel_proto::auth::Conn)>>,
    /// What Prometheus scrapes (`metrics.rs`).
    pub metrics: crate::metrics::BrokerMetrics,
    /// How this broker reaches other brokers: over TLS when the cluster uses it.
    pub client_tls: Option<runnel_proto::tls::ClientTls>,
    /// What this broker (and its streams and connect runtimes) proves itself with to
    /// brokers and voters: the cluster secret, when auth is on.
    pub internal_credentials: Option<Arc<runnel_proto::auth::Credentials>>,
}

fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

impl Broker {
    /// A broker with no partitions yet: they open as metadata images are applied.
    ///
    /// # Errors
    /// Invalid topic defaults in the config.
    pub fn new(
        config: BrokerConfig,
        advertised: String,
        controller: Arc<ControllerClient>,
        quorum: Option<Arc<Quorum>>,
        internal_credentials: Option<Arc<runnel_proto::auth::Credentials>>,
    ) -> anyhow::Result<Self> {
        let log_defaults = config.log_defaults()?;
        let client_tls = config.client_tls()?;
        Ok(Broker {
            log_defaults,
            applied: watch::Sender::new(Arc::new(MetadataImage::default())),
            controller,
            quorum,
            incarnation: runnel_controller::new_id("incarnation"),
            advertised,
            topics: RwLock::new(HashMap::new()),
            coordinator: Mutex::new(crate::group::Coordinator::default()),
            offsets: Mutex::new(crate::offsets::OffsetStore::default()),
            coordination: Mutex::new(HashMap::new()),
            reassignment_throttle: crate::throttle::Throttle::default(),
            keyless_partition: std::sync::atomic::AtomicU32::new(0),
            producer_ids: tokio::sync::Mutex::new((0, 0)),
            read_buffers: ReadBuffers::new(crate::partition::READ_BUFFERS),
            txn_coordinator: Mutex::new(crate::txn_ops::TxnCoordinator::default()),
            peers: Mutex::new(HashMap::new()),
            metrics: crate::metrics::BrokerMetrics::default(),
            replicas: crate::replica::ReplicaManager::new(
                config.node_id,
                crate::replica::ReplicationSettings::from_config(&config),
                client_tls.clone(),
                internal_credentials.clone(),
            ),
            client_tls,
            internal_credentials,
            config,
        })
    }

    /// The metadata this broker acts on.
    pub fn node_id(&self) -> u32 {
        self.config.node_id
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.applied.borrow().clone()
    }

    /// Acts on a newer metadata image: opens the partitions this broker now holds a
    /// replica of, takes or gives up their leadership, applies config changes, and
    /// closes and removes deleted topics. Blocks (it opens logs): call it from a blocking
    /// thread, for images in log order.
    pub fn apply_image(&self, image: Arc<MetadataImage>) {
        let me = self.config.node_id;
        let hosts = self.config.is_broker();
        // A restarted broker first applies the metadata it had (its controller log
        // replays from old images): it leads nothing until the image registers this
        // process, which comes after every leadership move made while it was away.
        // Otherwise it would take appends, coordinate groups and transactions, and answer
        // from stale state for as long as it takes to catch up.
        let registered = !hosts
            || image
                .metadata
                .broker(me)
                .is_some_and(|b| !b.fenced && b.incarnation == self.incarnation);
        let mut removed = Vec::new();
        let mut by_leader: HashMap<u32, Vec<crate::replica::Followed>> = HashMap::new();
        {
            let mut topics = self
                .topics
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            topics.retain(|name, hosted| {
                let keep = image
                    .metadata
                    .topics
                    .get(name)
                    .is_some_and(|t| t.id == hosted.id);
                if !keep {
                    removed.push((name.clone(), std::mem::take(&mut hosted.partitions)));
                }
                keep
            });
            for (name, topic) in &image.metadata.topics {
                let mine: Vec<(u32, &PartitionRecord)> = topic
                    .partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| hosts && p.replicas.contains(&me))
                    .map(|(i, p)| (i as u32, p))
                    .collect();
                if mine.is_empty() && !topics.contains_key(name) {
                    continue;
                }
                let log_config = topic_log_config(&self.log_defaults, &topic.configs)
                    .unwrap_or_else(|err| {
                        tracing::error!(topic = %name, error = %err, "invalid topic configs in the metadata; using the broker defaults");
                        self.log_defaults.clone()
                    });
                let hosted = topics.entry(name.clone()).or_insert_with(|| HostedTopic {
                    id: topic.id,
                    configs: topic.configs.clone(),
                    partitions: BTreeMap::new(),
                });
                if hosted.configs != topic.configs {
                    for partition in hosted.partitions.values() {
                        partition.set_config(log_config.clone());
                    }
                    hosted.configs = topic.configs.clone();
                }
                // Replicas moved elsewhere by a reassignment: closed and removed below.
                let moved_away: BTreeMap<u32, Arc<Partition>> = hosted
                    .partitions
                    .extract_if(.., |index, _| !mine.iter().any(|(i, _)| i == index))
                    .collect();
                if !moved_away.is_empty() {
                    removed.push((name.clone(), moved_away));
                }
                for (index, record) in mine {
                    if let Some(damaged) = hosted.partitions.get(&index)
                        && !damaged.has_log()
                        && self.can_rebuild(record)
                    {
                        // Its log failed to open while no other broker could give it
                        // back; now one can.
                        damaged.retire();
                        hosted.partitions.remove(&index);
                    }
                    let partition = hosted.partitions.entry(index).or_insert_with(|| {
                        Arc::new(self.open_partition(
                            name,
                            index,
                            topic.id,
                            log_config.clone(),
                            record,
                        ))
                    });
                    let leading = registered && record.leader == me;
                    if leading != partition.is_leader()
                        || record.leader_epoch != partition.leader_epoch()
                    {
                        tracing::info!(topic = %name, partition = index, leader = record.leader, leader_epoch = record.leader_epoch, isr = ?record.isr, "leadership changed");
                    }
                    if record.leader == me && !leading {
                        let mut waiting = record.clone();
                        waiting.leader = NO_LEADER;
                        partition.set_replication(me, &waiting);
                    } else {
                        partition.set_replication(me, record);
                    }
                    if !leading && record.leader != NO_LEADER && record.leader != me {
                        by_leader.entry(record.leader).or_default().push(
                            crate::replica::Followed {
                                topic: name.clone(),
                                topic_id: topic.id,
                                partition: partition.clone(),
                                leader_epoch: record.leader_epoch,
                            },
                        );
                    }
                }
            }
        }
        for (name, partitions) in removed {
            for (index, partition) in partitions {
                partition.retire();
                drop(partition);
                let dir = partition_dir(&self.config.data_dir, &name, index);
                if let Err(err) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %err, "could not remove a deleted partition's directory");
                }
            }
            tracing::info!(topic = %name, "removed the topic's replicas from this broker");
        }
        self.applied.send_replace(image);
        self.replicas.follow(by_leader, &self.applied);
        self.sync_coordination();
        self.sync_txn_coordination();
    }

    /// Controlled shutdown: asks the controller to move this broker's leaderships to
    /// in-sync peers and take it out of the ISRs, and waits until this broker has applied
    /// that, so producers and consumers move on before it stops. Skipped when no other
    /// broker is live to take over; gives up after `timeout`.
    pub async fn controlled_shutdown(&self, timeout: Duration) {
        let me = self.config.node_id;
        let image = self.image();
        if !self.config.is_broker() || !image.metadata.live_brokers().iter().any(|b| *b != me) {
            return;
        }
        let command = Command::ShutdownBroker {
            id: me,
            incarnation: self.incarnation.clone(),
        };
        let done = async {
            let (index, result) = self.controller.propose(command, timeout).await?;
            result?;
            self.await_applied(index).await
        };
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(())) => tracing::info!("controlled shutdown: leaderships handed over"),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "controlled shutdown refused; stopping anyway")
            }
            Err(_) => tracing::warn!("controlled shutdown did not finish in time; stopping anyway"),
        }
    }

    /// Whether a replica of this partition can be fetched again from scratch: another
    /// broker leads it with an in-sync copy.
    fn can_rebuild(&self, record: &PartitionRecord) -> bool {
        let me = self.config.node_id;
        record.leader != me && record.leader != NO_LEADER && record.isr.iter().any(|r| *r != me)
    }

    /// Opens a replica's log. A directory left by an older topic of the same name (one
    /// deleted while this broker was away) is removed first. A log that fails closed is
    /// moved aside (`<dir>.damaged-<ms>`, kept for inspection) and started empty when
    /// another broker leads with an in-sync copy, so it is fetched again; otherwise it
    /// fences its partition alone and the broker still serves every other partition.
    fn open_partition(
        &self,
        topic: &str,
        index: u32,
        id: u64,
        config: LogConfig,
        record: &PartitionRecord,
    ) -> Partition {
        let dir = partition_dir(&self.config.data_dir, topic, index);
        let id_file = dir.join(TOPIC_ID_FILE);
        if let Ok(text) = std::fs::read_to_string(&id_file)
            && text.trim() != id.to_string()
        {
            tracing::info!(dir = %dir.display(), "removing the log of an older topic with the same name");
            let _ = std::fs::remove_dir_all(&dir);
        }
        let open = || {
            Partition::open(&dir, topic, index, config.clone()).and_then(|partition| {
                if !id_file.exists() {
                    std::fs::write(&id_file, id.to_string()).map_err(|source| {
                        runnel_broker_storage::StorageError::io(&id_file, source)
                    })?;
                }
                Ok(partition)
            })
        };
        let err = match open() {
            Ok(partition) => return partition,
            Err(err) => err,
        };
        if self.can_rebuild(record) {
            let aside = dir.with_file_name(format!(
                "{}.damaged-{}",
                dir.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                now_ms()
            ));
            match std::fs::rename(&dir, &aside) {
                Ok(()) => {
                    tracing::error!(
                        topic, partition = index, error = %err, kept = %aside.display(), leader = record.leader,
                        "the replica's log cannot be opened; it is kept aside and rebuilt from the leader"
                    );
                    match open() {
                        Ok(partition) => return partition,
                        Err(again) => {
                            return Partition::unavailable(topic, index, again.to_string());
                        }
                    }
                }
                Err(rename) => {
                    tracing::error!(topic, partition = index, error = %rename, "cannot move the damaged log aside");
                }
            }
        }
        tracing::error!(
            topic, partition = index, error = %err,
            "the partition's log cannot be opened; it is fenced and every other partition is served"
        );
        Partition::unavailable(topic, index, err.to_string())
    }

    /// Creates the compacted internal topics once the cluster is bootstrapped:
    /// `__consumer_offsets` and `__transaction_state` (written by the broker),
    /// `__connect_offsets` (written by connect workers) and `__deployments` (written by
    /// the streams and connect runtimes). Creating one that exists is not an error.
    ///
    /// # Errors
    /// The controller quorum did not answer.
    pub(crate) async fn ensure_internal_topics(&self) -> Result<(), BrokerError> {
        use crate::offsets::{
            CONNECT_OFFSETS_TOPIC, CONNECT_OFFSETS_TOPIC_PARTITIONS, DEPLOYMENTS_MAX_MESSAGE_BYTES,
            DEPLOYMENTS_TOPIC, DEPLOYMENTS_TOPIC_PARTITIONS, OFFSETS_TOPIC,
            OFFSETS_TOPIC_PARTITIONS,
        };
        use crate::txn::{TXN_TOPIC, TXN_TOPIC_PARTITIONS};
        let missing = |image: &MetadataImage| {
            [
                OFFSETS_TOPIC,
                CONNECT_OFFSETS_TOPIC,
                DEPLOYMENTS_TOPIC,
                TXN_TOPIC,
            ]
            .iter()
            .any(|name| !image.metadata.topics.contains_key(*name))
        };
        if !missing(&self.image()) {
            return Ok(());
        }
        let replication_factor = self.internal_replication_factor().await;
        for (name, partitions) in [
            (OFFSETS_TOPIC, OFFSETS_TOPIC_PARTITIONS),
            (CONNECT_OFFSETS_TOPIC, CONNECT_OFFSETS_TOPIC_PARTITIONS),
            (DEPLOYMENTS_TOPIC, DEPLOYMENTS_TOPIC_PARTITIONS),
            (TXN_TOPIC, TXN_TOPIC_PARTITIONS),
        ] {
            if self.image().metadata.topics.contains_key(name) {
                continue;
            }
            let min_insync = if replication_factor >= INTERNAL_REPLICATION_FACTOR {
                "2"
            } else {
                "1"
            };
            let mut configs = vec![
                ("cleanup.policy", "compact"),
                ("segment.bytes", "104857600"),
                ("retention.ms", "-1"),
                ("min.insync.replicas", min_insync),
            ];
            if name == DEPLOYMENTS_TOPIC {
                configs.push(("max.message.bytes", DEPLOYMENTS_MAX_MESSAGE_BYTES));
            }
            let configs: BTreeMap<String, String> = configs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let command = Command::CreateTopic {
                name: name.to_string(),
                partitions,
                replication_factor,
                configs,
                internal: true,
            };
            match self.propose(command).await {
                Ok(_) | Err(BrokerError::TopicAlreadyExists { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// The replication factor of new internal topics: 3, or fewer when fewer brokers are
    /// live. Waits up to [`INTERNAL_TOPIC_WAIT`] for as many brokers as the quorum has
    /// voters (up to 3) to register, so that a cluster starting together does not give
    /// its internal topics to whichever broker registered first.
    async fn internal_replication_factor(&self) -> u32 {
        let wanted = self
            .controller
            .voters()
            .len()
            .clamp(1, INTERNAL_REPLICATION_FACTOR as usize);
        let mut applied = self.applied.subscribe();
        let enough = applied.wait_for(|image| image.metadata.live_brokers().len() >= wanted);
        if tokio::time::timeout(INTERNAL_TOPIC_WAIT, enough)
            .await
            .is_err()
        {
            tracing::warn!(
                wanted,
                live = self.image().metadata.live_brokers().len(),
                "fewer brokers than wanted are live; creating the internal topics with fewer replicas"
            );
        }
        let live = self.image().metadata.live_brokers().len() as u32;
        live.clamp(1, INTERNAL_REPLICATION_FACTOR)
    }

    /// Proposes a metadata command and waits until this broker has applied it, so that
    /// the caller's next request sees its effect.
    pub(crate) async fn propose(&self, command: Command) -> Result<Outcome, BrokerError> {
        let (index, result) = self.controller.propose(command, CONTROLLER_TIMEOUT).await?;
        let outcome = result?;
        self.await_applied(index).await?;
        Ok(outcome)
    }

    /// Waits until this broker has acted on the metadata up to `index`.
    pub(crate) async fn await_applied(&self, index: u64) -> Result<(), BrokerError> {
        let mut applied = self.applied.subscribe();
        let reached = applied.wait_for(|image| image.index >= index);
        if let Ok(Ok(_)) = tokio::time::timeout(CONTROLLER_TIMEOUT, reached).await {
            return Ok(());
        }
        Err(BrokerError::ControllerUnavailable {
            reason: format!(
                "the change committed at index {index} but this broker has applied only up to {} after {} s",
                self.image().index,
                CONTROLLER_TIMEOUT.as_secs()
            ),
        })
    }

    /// Waits until the cluster is bootstrapped and (on a broker) this process is
    /// registered and live in the applied metadata, then creates the internal topics
    /// and replays committed offsets. Logs while it waits for a quorum to form.
    ///
    /// # Errors
    /// The controller refused the internal topics, or committed offsets cannot be read.
    pub(crate) async fn become_ready(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut applied = self.applied.subscribe();
        let ready = |image: &Arc<MetadataImage>| {
            let registered = !self.config.is_broker()
                || image
                    .metadata
                    .broker(self.config.node_id)
                    .is_some_and(|b| !b.fenced && b.incarnation == self.incarnation);
            !image.metadata.cluster_id.is_empty() && registered
        };
        while tokio::time::timeout(Duration::from_secs(5), applied.wait_for(ready))
            .await
            .is_err()
        {
            tracing::info!(
                voters = ?self.controller.voters(),
                "waiting for the controller quorum (a majority of its voters must run)"
            );
        }
        if !self.config.is_broker() {
            return Ok(());
        }
        loop {
            match self.ensure_internal_topics().await {
                Ok(()) => break,
                Err(BrokerError::ControllerUnavailable { reason }) => {
                    tracing::info!(%reason, "creating the internal topics; retrying");
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// The topic's partition count in the applied metadata.
    pub(crate) fn partition_count(&self, topic: &str) -> Option<u32> {
        self.image()
            .metadata
            .topics
            .get(topic)
            .map(|t| t.partitions.len() as u32)
    }

    /// The replicas of `topic` this broker holds, led or not.
    pub(crate) fn hosted(&self, topic: &str) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .map(|t| t.partitions.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn hosted_partition(&self, topic: &str, partition: u32) -> Option<Arc<Partition>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .and_then(|t| t.partitions.get(&partition).cloned())
    }

    /// Checks that the partition exists in the applied metadata.
    pub(crate) fn check_partition_exists(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(), BrokerError> {
        partition_record(&self.image(), topic, partition).map(|_| ())
    }

    /// The partition, when this broker leads it: what produce, fetch and offset requests
    /// need. A partition this broker hosts and leads exists in the applied metadata by
    /// construction, so only the other cases consult it.
    pub(crate) fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Partition>, BrokerError> {
        if let Some(hosted) = self.hosted_partition(topic, partition)
            && hosted.is_leader()
        {
            return Ok(hosted);
        }
        let image = self.image();
        let record = partition_record(&image, topic, partition)?;
        Err(if record.leader == NO_LEADER {
            BrokerError::LeaderNotAvailable {
                topic: topic.to_string(),
                partition,
                reason: format!(
                    "every in-sync replica ({}) is down; it comes back when one of them returns",
                    join_ids(&record.isr)
                ),
            }
        } else if record.leader == self.config.node_id {
            BrokerError::LeaderNotAvailable {
                topic: topic.to_string(),
                partition,
                reason: "this broker is taking over its leadership; retry".into(),
            }
        } else {
            BrokerError::NotLeader {
                topic: topic.to_string(),
                partition,
                leader: record.leader,
            }
        })
    }

    /// Every hosted partition, for housekeeping and shutdown.
    /// Replicas whose storage failed while serving (a full disk, an I/O error): each is
    /// reported once to the controller, so that a healthy ISR member leads it, and its
    /// log is reopened after [`Partition::reopen_delay_ms`]; once it opens, the replica serves
    /// again: as a follower it catches up and rejoins the ISR, as the only copy it leads
    /// again. Nothing unwritten was acknowledged, and the reopen truncates a torn tail.
    pub(crate) async fn recover_failed_replicas(self: &Arc<Self>) {
        let failed: Vec<(String, u64, Arc<Partition>)> = {
            let topics = self
                .topics
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            topics
                .iter()
                .flat_map(|(name, t)| {
                    t.partitions
                        .values()
                        .filter(|p| p.failed_while_serving())
                        .map(|p| (name.clone(), t.id, p.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        for (topic, topic_id, partition) in failed {
            if partition.report_failure() {
                tracing::warn!(
                    topic,
                    partition = partition.index,
                    reopen_in_ms = partition.reopen_delay_ms(),
                    "the replica's storage failed; asking the controller to let an in-sync replica lead"
                );
                let command = Command::ReplicaOffline {
                    topic: topic.clone(),
                    partition: partition.index,
                    broker: self.config.node_id,
                };
                if let Err(err) = self.propose(command).await {
                    tracing::warn!(topic, partition = partition.index, error = %err, "could not report the failed replica");
                }
            }
            if !partition.reopen_due(now_ms()) {
                continue;
            }
            let broker = self.clone();
            let reopened = tokio::task::spawn_blocking(move || {
                broker.reopen_failed(&topic, topic_id, &partition)
            })
            .await;
            if let Ok(true) = reopened {
                let broker = self.clone();
                let _ =
                    tokio::task::spawn_blocking(move || broker.apply_image(broker.image())).await;
            }
        }
    }

    /// Opens a failed replica's log again and puts it in place of the failed one;
    /// false while it still cannot be opened.
    fn reopen_failed(&self, topic: &str, topic_id: u64, failed: &Arc<Partition>) -> bool {
        let dir = partition_dir(&self.config.data_dir, topic, failed.index);
        let config = self
            .image()
            .metadata
            .topics
            .get(topic)
            .and_then(|t| topic_log_config(&self.log_defaults, &t.configs).ok())
            .unwrap_or_else(|| self.log_defaults.clone());
        let opened = match Partition::open(&dir, topic, failed.index, config) {
            Ok(opened) => opened,
            Err(err) => {
                tracing::debug!(topic, partition = failed.index, error = %err, "the failed replica's log does not open yet");
                return false;
            }
        };
        let mut topics = self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(hosted) = topics.get_mut(topic).filter(|t| t.id == topic_id) else {
            return false;
        };
        let Some(slot) = hosted.partitions.get_mut(&failed.index) else {
            return false;
        };
        if !Arc::ptr_eq(slot, failed) {
            return false;
        }
        opened.follows_failed(failed);
        failed.retire();
        *slot = Arc::new(opened);
        tracing::info!(
            topic,
            partition = failed.index,
            "the failed replica's log opened again; it serves again"
        );
        true
    }

    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flat_map(|t| t.partitions.values().cloned())
            .collect()
    }

    // ---------------------------------------------------------------------------------
    // Producing

    /// Appends the request's batches now, in call order, and returns a future that
    /// resolves to the response once the requested acks are satisfied. Calling this for
    /// requests in order and awaiting the futures in any order keeps per-partition order.
    pub fn produce(
        self: &Arc<Self>,
        mut request: v1::ProduceRequest,
    ) -> BoxFuture<'static, v1::ProduceResponse> {
        if crate::records::has_messages(&request) {
            let partitions = self
                .image()
                .metadata
                .topics
                .get(&request.topic)
                .map_or(0, |t| t.partitions.len() as u32);
            let encoded = if partitions == 0 {
                Err(BrokerError::UnknownTopic {
                    topic: request.topic.clone(),
                })
            } else {
                crate::records::encode_request(
                    &mut request,
                    partitions,
                    &self.keyless_partition,
                    now_ms(),
                )
            };
            let placements = match encoded {
                Ok(placements) => placements,
                Err(err) => {
                    let response = v1::ProduceResponse {
                        request_id: request.request_id,
                        error: Some(err.to_proto()),
                        ..Default::default()
                    };
                    return async move { response }.boxed();
                }
            };
            let produced = self.produce_batches(request);
            return async move {
                let mut response = produced.await;
                response.records = crate::records::record_results(
                    &placements,
                    &response.partitions,
                    response.error.as_ref(),
                );
                response
            }
            .boxed();
        }
        self.produce_batches(request)
    }

    /// [`Broker::produce`], after the partitions where the request's transactional
    /// batches start a transaction joined it at the coordinator. Awaiting this before
    /// the next request of a stream keeps the stream's order.
    pub async fn produce_joining(
        self: &Arc<Self>,
        request: v1::ProduceRequest,
    ) -> BoxFuture<'static, v1::ProduceResponse> {
        if let Err(err) = self.join_transactions(&request).await {
            let response = v1::ProduceResponse {
                request_id: request.request_id,
                partitions: request
                    .partitions
                    .iter()
                    .map(|data| v1::PartitionProduceResult {
                        partition: data.partition,
                        base_offset: -1,
                        log_append_time_ms: -1,
                        log_start_offset: -1,
                        error: Some(err.to_proto()),
                    })
                    .collect(),
                ..Default::default()
            };
            return async move { response }.boxed();
        }
        self.produce(request)
    }

    /// A new idempotent producer's id (unique in the cluster: the controller hands this
    /// broker blocks of them) and epoch 0.
    ///
    /// # Errors
    /// The controller quorum did not answer.
    pub async fn init_producer_id(&self) -> Result<v1::InitProducerIdResponse, BrokerError> {
        let mut block = self.producer_ids.lock().await;
        if block.0 >= block.1 {
            let command = Command::AllocateProducerIds {
                count: PRODUCER_ID_BLOCK,
            };
            match self.propose(command).await? {
                Outcome::ProducerIds { first, count } => *block = (first, first + i64::from(count)),
                other => {
                    return Err(BrokerError::ControllerUnavailable {
                        reason: format!(
                            "the controller answered {other:?} to a producer id request"
                        ),
                    });
                }
            }
        }
        let producer_id = block.0;
        block.0 += 1;
        Ok(v1::InitProducerIdResponse {
            producer_id,
            producer_epoch: 0,
        })
    }

    fn produce_batches(
        self: &Arc<Self>,
        request: v1::ProduceRequest,
    ) -> BoxFuture<'static, v1::ProduceResponse> {
        let request_id = request.request_id;
        let whole_failure = |err: BrokerError| {
            let response = v1::ProduceResponse {
                request_id,
                error: Some(err.to_proto()),
                ..Default::default()
            };
            async move { response }.boxed()
        };
        let acks = v1::Acks::try_from(request.acks).unwrap_or(v1::Acks::Leader);
        if let Err(err) = self.check_produce_topic(&request.topic) {
            return whole_failure(err);
        }
        let min_insync = match self.min_insync_replicas(&request.topic) {
            Ok(min) => min,
            Err(err) => return whole_failure(err),
        };
        let timeout = Duration::from_millis(match request.timeout_ms {
            0 => self.config.request_timeout_ms,
            ms => u64::from(ms),
        });
        let mut pending = Vec::with_capacity(request.partitions.len());
        for data in &request.partitions {
            let result = self
                .partition(&request.topic, data.partition)
                .and_then(|partition| {
                    let isr = partition.isr_len();
                    if acks == v1::Acks::All && isr < min_insync {
                        return Err(BrokerError::NotEnoughReplicas {
                            topic: request.topic.clone(),
                            partition: data.partition,
                            isr,
                            min_insync,
                        });
                    }
                    partition
                        .append(&data.records)
                        .map(|appended| (partition, appended))
                });
            pending.push((data.partition, result));
        }
        async move {
            let mut results = Vec::with_capacity(pending.len());
            for (index, result) in pending {
                let outcome = match result {
                    Ok((partition, appended)) => {
                        if appended.flush_due {
                            let flushing = partition.clone();
                            tokio::task::spawn_blocking(move || flushing.flush_if_due(now_ms()));
                        }
                        let durable = if acks == v1::Acks::None {
                            let end = appended.end_offset;
                            let flushing = partition.clone();
                            tokio::spawn(async move {
                                if let Err(err) = flushing.wait_durable(end).await {
                                    tracing::error!(error = %err, "flush after acks=0 produce failed");
                                }
                            });
                            Ok(())
                        } else {
                            partition.wait_durable(appended.end_offset).await
                        };
                        match durable {
                            Ok(()) if acks == v1::Acks::All => partition
                                .wait_replicated(
                                    appended.base_offset,
                                    appended.end_offset,
                                    min_insync,
                                    timeout,
                                )
                                .await
                                .map(|()| appended),
                            other => other.map(|()| appended),
                        }
                    }
                    Err(err) => Err(err),
                };
                results.push(match outcome {
                    Ok(appended) => v1::PartitionProduceResult {
                        partition: index,
                        base_offset: appended.base_offset,
                        log_append_time_ms: appended.log_append_time_ms.unwrap_or(-1),
                        log_start_offset: appended.log_start_offset,
                        error: None,
                    },
                    Err(err) => v1::PartitionProduceResult {
                        partition: index,
                        base_offset: -1,
                        log_append_time_ms: -1,
                        log_start_offset: -1,
                        error: Some(err.to_proto()),
                    },
                });
            }
            v1::ProduceResponse {
                request_id,
                partitions: results,
                ..Default::default()
            }
        }
        .boxed()
    }

    /// Refuses writes to internal topics but those the runtimes write
    /// (`__connect_offsets`, `__deployments`).
    fn check_produce_topic(&self, topic: &str) -> Result<(), BrokerError> {
        let internal = self
            .image()
            .metadata
            .topics
            .get(topic)
            .is_some_and(|t| t.internal);
        let written_by_runtimes = [
            crate::offsets::CONNECT_OFFSETS_TOPIC,
            crate::offsets::DEPLOYMENTS_TOPIC,
        ];
        if internal && !written_by_runtimes.contains(&topic) {
            return Err(BrokerError::InvalidRequest {
                reason: format!("topic {topic:?} is internal: only the broker writes to it"),
            });
        }
        Ok(())
    }

    /// Creates `topic` with the defaults when the broker auto-creates topics and it does
    /// not exist yet; a refusal is logged, and the request then finds no topic.
    pub(crate) async fn auto_create(&self, topic: &str) {
        if !self.config.auto_create_topics
            || topic.is_empty()
            || self.image().metadata.topics.contains_key(topic)
        {
            return;
        }
        let request = v1::CreateTopicRequest {
            name: topic.to_string(),
            ..Default::default()
        };
        match self.create_topic(request).await {
            Ok(_) | Err(BrokerError::TopicAlreadyExists { .. }) => {}
            Err(err) => tracing::debug!(topic, error = %err, "auto-creation refused"),
        }
    }

    pub(crate) fn min_insync_replicas(&self, topic: &str) -> Result<usize, BrokerError> {
        let image = self.image();
        let value = image
            .metadata
            .topic(topic)?
            .configs
            .get("min.insync.replicas")
            .or_else(|| self.config.topic_defaults.get("min.insync.replicas"))
            .cloned();
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(1))
    }

    // ---------------------------------------------------------------------------------
    // Consuming

    /// Long poll: returns once `min_bytes` are available across the requested partitions
    /// or `max_wait_ms` has passed.
    pub async fn fetch(&self, request: &v1::FetchRequest) -> v1::FetchResponse {
        let min_bytes = request.min_bytes.max(1) as usize;
        let mut response = long_poll(request.max_wait_ms, |watchers| {
            let response = self.fetch_once(request, watchers);
            let bytes: usize = response.partitions.iter().map(|p| p.records.len()).sum();
            let errors = response.partitions.iter().any(|p| p.error.is_some());
            let ready = bytes >= min_bytes || errors;
            (response, ready)
        })
        .await;
        if request.format == v1::RecordFormat::Messages as i32 {
            for (fetched, wanted) in response.partitions.iter_mut().zip(&request.partitions) {
                crate::records::decode_fetched(fetched, wanted.offset);
            }
        }
        response
    }

    fn fetch_once(
        &self,
        request: &v1::FetchRequest,
        watchers: &mut Vec<tokio::sync::watch::Receiver<i64>>,
    ) -> v1::FetchResponse {
        let mut budget = fetch_budget(request.max_bytes);
        let committed = request.isolation == v1::IsolationLevel::ReadCommitted as i32;
        let mut partitions = Vec::with_capacity(request.partitions.len());
        for wanted in &request.partitions {
            let mut out = v1::FetchedPartition {
                topic: wanted.topic.clone(),
                partition: wanted.partition,
                next_offset: wanted.offset,
                high_watermark: -1,
                log_start_offset: -1,
                ..Default::default()
            };
            let result = self
                .partition(&wanted.topic, wanted.partition)
                .and_then(|partition| {
                    let watcher = partition.subscribe();
                    let max = match wanted.max_bytes {
                        0 => budget,
                        n => (n as usize).min(budget),
                    };
                    let fetched = if budget == 0 {
                        partition
                            .read(wanted.offset, 0, committed, &self.read_buffers)
                            .map(|mut f| {
                                f.records = bytes::Bytes::new();
                                f.next_offset = wanted.offset;
                                f
                            })
                    } else {
                        partition.read(wanted.offset, max.max(1), committed, &self.read_buffers)
                    }?;
                    watchers.push(watcher);
                    Ok(fetched)
                });
            match result {
                Ok(fetched) => {
                    budget = budget.saturating_sub(fetched.records.len());
                    out.high_watermark = fetched.high_watermark;
                    out.last_stable_offset = fetched.last_stable_offset;
                    out.aborted_transactions = fetched
                        .aborted
                        .iter()
                        .map(|a| v1::AbortedTransaction {
                            producer_id: a.producer_id,
                            first_offset: a.first_offset,
                        })
                        .collect();
                    out.log_start_offset = fetched.log_start_offset;
                    out.next_offset = fetched.next_offset;
                    out.records = fetched.records;
                }
                Err(err) => out.error = Some(err.to_proto()),
            }
            partitions.push(out);
        }
        v1::FetchResponse { partitions }
    }

    // ---------------------------------------------------------------------------------
    // Replication (leader side)

    /// A follower's fetch: answers at once when any partition has records, a divergence
    /// or an error for it, else once new data is appended or `max_wait_ms` has passed.
    pub async fn replica_fetch(
        &self,
        request: &v1::ReplicaFetchRequest,
    ) -> v1::ReplicaFetchResponse {
        long_poll(request.max_wait_ms, |watchers| {
            let mut news = false;
            let response = self.replica_fetch_once(request, watchers, &mut news);
            (response, news)
        })
        .await
    }

    fn replica_fetch_once(
        &self,
        request: &v1::ReplicaFetchRequest,
        watchers: &mut Vec<watch::Receiver<i64>>,
        news: &mut bool,
    ) -> v1::ReplicaFetchResponse {
        let mut budget = fetch_budget(request.max_bytes);
        let throttle_rate = self.image().metadata.reassignment_throttle_bytes;
        let mut partitions = Vec::with_capacity(request.partitions.len());
        for wanted in &request.partitions {
            let mut max_bytes = budget;
            // Decided once per partition: the read below spends what it sends.
            let mut throttled = false;
            if throttle_rate > 0
                && let Some(partition) = self.hosted_partition(&wanted.topic, wanted.partition)
                && partition.is_catching_up(request.replica_id)
            {
                throttled = true;
                max_bytes = max_bytes.min(self.reassignment_throttle.allowance(throttle_rate));
                if max_bytes == 0 {
                    // Over the throttle: left out of this answer; the fetch waits.
                    watchers.push(partition.subscribe_log_end());
                    continue;
                }
            }
            let mut out = v1::ReplicaFetchedPartition {
                topic: wanted.topic.clone(),
                partition: wanted.partition,
                high_watermark: -1,
                log_start_offset: -1,
                ..Default::default()
            };
            let result = self
                .replica_partition(request.replica_id, wanted)
                .and_then(|partition| {
                    let read = partition.replica_read(
                        request.replica_id,
                        wanted.fetch_offset,
                        wanted.last_fetched_epoch,
                        wanted.high_watermark,
                        max_bytes.max(1),
                        &self.read_buffers,
                    );
                    if let Err(BrokerError::OffsetOutOfRange { .. }) = &read {
                        out.log_start_offset = partition.log_start_offset();
                    }
                    watchers.push(partition.subscribe_log_end());
                    watchers.push(partition.subscribe());
                    read
                });
            match result {
                Ok(crate::partition::ReplicaRead::Records {
                    records,
                    high_watermark,
                    log_start_offset,
                    high_watermark_moved,
                }) => {
                    *news |= high_watermark_moved || !records.is_empty();
                    budget = budget.saturating_sub(records.len());
                    if throttled {
                        self.reassignment_throttle.spend(records.len());
                    }
                    out.records = records;
                    out.high_watermark = high_watermark;
                    out.log_start_offset = log_start_offset;
                }
                Ok(crate::partition::ReplicaRead::Diverging { epoch, end_offset }) => {
                    *news = true;
                    out.diverging = Some(v1::DivergingEpoch { epoch, end_offset });
                }
                Err(err) => {
                    *news = true;
                    out.error = Some(err.to_proto());
                }
            }
            partitions.push(out);
        }
        v1::ReplicaFetchResponse { partitions }
    }

    /// The partition a follower asks for, when this broker leads it under the epoch the
    /// follower names and the follower is one of its replicas.
    fn replica_partition(
        &self,
        replica: u32,
        wanted: &v1::ReplicaFetchPartition,
    ) -> Result<Arc<Partition>, BrokerError> {
        let image = self.image();
        let topic = image.metadata.topic(&wanted.topic)?;
        if topic.id != wanted.topic_id {
            return Err(BrokerError::UnknownTopic {
                topic: wanted.topic.clone(),
            });
        }
        let record = partition_record(&image, &wanted.topic, wanted.partition)?;
        if !record.replicas.contains(&replica) {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "broker {replica} is not a replica of {}-{} (replicas {})",
                    wanted.topic,
                    wanted.partition,
                    join_ids(&record.replicas)
                ),
            });
        }
        let partition = self.partition(&wanted.topic, wanted.partition)?;
        let current = partition.leader_epoch();
        if wanted.leader_epoch < current {
            return Err(BrokerError::FencedLeaderEpoch {
                topic: wanted.topic.clone(),
                partition: wanted.partition,
                requested: wanted.leader_epoch,
                current,
            });
        }
        if wanted.leader_epoch > current {
            return Err(BrokerError::UnknownLeaderEpoch {
                topic: wanted.topic.clone(),
                partition: wanted.partition,
                requested: wanted.leader_epoch,
                current,
            });
        }
        Ok(partition)
    }

    pub fn list_offsets(&self, request: &v1::ListOffsetsRequest) -> v1::ListOffsetsResponse {
        let answers = request
            .queries
            .iter()
            .map(|query| {
                let result =
                    self.partition(&query.topic, query.partition)
                        .and_then(|p| match &query.spec {
                            Some(v1::offset_query::Spec::Earliest(_)) => Ok(p.log_start_offset()),
                            Some(v1::offset_query::Spec::Latest(_)) | None => {
                                let high_watermark = p.high_watermark();
                                if query.isolation == v1::IsolationLevel::ReadCommitted as i32 {
                                    Ok(p.last_stable_offset(high_watermark))
                                } else {
                                    Ok(high_watermark)
                                }
                            }
                            Some(v1::offset_query::Spec::TimestampMs(ts)) => {
                                p.offset_for_timestamp(*ts)
                            }
                        });
                match result {
                    Ok(offset) => v1::OffsetAnswer {
                        topic: query.topic.clone(),
                        partition: query.partition,
                        offset,
                        error: None,
                    },
                    Err(err) => v1::OffsetAnswer {
                        topic: query.topic.clone(),
                        partition: query.partition,
                        offset: -1,
                        error: Some(err.to_proto()),
                    },
                }
            })
            .collect();
        v1::ListOffsetsResponse { answers }
    }

    // ---------------------------------------------------------------------------------
    // Metadata and administration

    /// Metadata of the requested topics (all when none are named). As in Kafka, naming a
    /// missing topic creates it when the broker auto-creates topics.
    pub async fn metadata(&self, request: &v1::MetadataRequest) -> v1::MetadataResponse {
        for name in &request.topics {
            self.auto_create(name).await;
        }
        let image = self.image();
        let meta = &image.metadata;
        let topics = if request.topics.is_empty() {
            meta.topics
                .iter()
                .map(|(name, topic)| topic_metadata(name, topic, &self.log_defaults))
                .collect()
        } else {
            request
                .topics
                .iter()
                .map(|name| match meta.topics.get(name) {
                    Some(topic) => topic_metadata(name, topic, &self.log_defaults),
                    None => v1::TopicMetadata {
                        name: name.clone(),
                        error: Some(
                            BrokerError::UnknownTopic {
                                topic: name.clone(),
                            }
                            .to_proto(),
                        ),
                        ..Default::default()
                    },
                })
                .collect()
        };
        v1::MetadataResponse {
            cluster_id: meta.cluster_id.clone(),
            controller_id: self.active_controller(),
            brokers: brokers(&meta.brokers),
            topics,
        }
    }

    /// The active controller as this node knows it (0 while unknown).
    fn active_controller(&self) -> u32 {
        self.quorum
            .as_ref()
            .and_then(|q| q.leader())
            .or_else(|| self.controller.known_leader())
            .unwrap_or(0)
    }

    pub fn cluster_info(&self) -> v1::ClusterInfoResponse {
        let image = self.image();
        let meta = &image.metadata;
        let status = self.quorum.as_ref().map(|q| q.status());
        let voters = match &status {
            Some(status) => status
                .voters
                .iter()
                .map(|(id, address, matched)| v1::QuorumVoter {
                    id: *id,
                    address: address.clone(),
                    matched_index: *matched,
                })
                .collect(),
            None => self
                .controller
                .voters()
                .iter()
                .map(|(id, address)| v1::QuorumVoter {
                    id: *id,
                    address: address.clone(),
                    matched_index: 0,
                })
                .collect(),
        };
        v1::ClusterInfoResponse {
            cluster_id: meta.cluster_id.clone(),
            controller_id: self.active_controller(),
            brokers: brokers(&meta.brokers),
            // Like `topic list`, counts user topics only.
            topic_count: meta.topics.values().filter(|t| !t.internal).count() as u32,
            partition_count: meta
                .topics
                .values()
                .filter(|t| !t.internal)
                .map(|t| t.partitions.len() as u32)
                .sum(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            voters,
            metadata_index: image.index,
            controller_term: status.map_or(0, |s| s.term),
        }
    }

    /// # Errors
    /// The rule the request broke, or no answer from the controller quorum.
    pub async fn create_topic(
        &self,
        request: v1::CreateTopicRequest,
    ) -> Result<v1::CreateTopicResponse, BrokerError> {
        let configs: BTreeMap<String, String> = request.configs.into_iter().collect();
        topic_log_config(&self.log_defaults, &configs)?;
        let partitions = request.partitions.unwrap_or(self.config.default_partitions);
        let rf = request
            .replication_factor
            .unwrap_or(self.config.default_replication_factor);
        let name = request.name.clone();
        let checked = self
            .image()
            .metadata
            .check_create_topic(&name, partitions, rf, &configs, false)?;
        if request.validate_only {
            return Ok(v1::CreateTopicResponse {
                topic: Some(topic_metadata(&name, &checked, &self.log_defaults)),
            });
        }
        let command = Command::CreateTopic {
            name: name.clone(),
            partitions,
            replication_factor: rf,
            configs,
            internal: false,
        };
        let topic = match self.propose(command).await? {
            Outcome::Topic(topic) => topic,
            Outcome::Done | Outcome::ProducerIds { .. } | Outcome::Acls(_) => {
                self.image().metadata.topic(&name)?.clone()
            }
        };
        tracing::info!(topic = %name, partitions, replication_factor = rf, "created topic");
        Ok(v1::CreateTopicResponse {
            topic: Some(topic_metadata(&name, &topic, &self.log_defaults)),
        })
    }

    /// # Errors
    /// Unknown or internal topic, or no answer from the controller quorum.
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        self.propose(Command::DeleteTopic {
            name: name.to_string(),
        })
        .await?;
        Ok(())
    }

    pub fn list_topics(&self, include_internal: bool) -> v1::ListTopicsResponse {
        let image = self.image();
        let topics = image
            .metadata
            .topics
            .iter()
            .filter(|(_, t)| include_internal || !t.internal)
            .map(|(name, t)| v1::TopicSummary {
                name: name.clone(),
                partitions: t.partitions.len() as u32,
                replication_factor: t.replication_factor,
                internal: t.internal,
            })
            .collect();
        v1::ListTopicsResponse { topics }
    }

    /// # Errors
    /// Unknown topic.
    pub fn describe_topic(&self, name: &str) -> Result<v1::DescribeTopicResponse, BrokerError> {
        let topic = self.image().metadata.topic(name)?.clone();
        let partitions = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(index, record)| {
                let mut description = v1::PartitionDescription {
                    partition: index as u32,
                    leader: record.leader,
                    leader_epoch: record.leader_epoch,
                    replicas: record.replicas.clone(),
                    isr: record.isr.clone(),
                    target: record.target.clone(),
                    log_start_offset: -1,
                    log_end_offset: -1,
                    high_watermark: -1,
                    last_stable_offset: -1,
                    ..Default::default()
                };
                if let Some(partition) = self.hosted_partition(name, index as u32) {
                    if let Some(snapshot) = partition.snapshot() {
                        description.log_start_offset = snapshot.log_start_offset;
                        description.log_end_offset = snapshot.log_end_offset;
                        description.high_watermark = partition.high_watermark();
                        description.last_stable_offset =
                            partition.last_stable_offset(description.high_watermark);
                        description.open_transactions = partition
                            .open_transactions()
                            .into_iter()
                            .map(|t| v1::OpenTransaction {
                                producer_id: t.producer_id,
                                producer_epoch: i32::from(t.producer_epoch),
                                first_offset: t.first_offset,
                                last_write_ms: t.last_ms,
                            })
                            .collect();
                        description.size_bytes = snapshot.size_bytes;
                        description.segment_count = snapshot.segment_count as u32;
                    }
                    description.error = partition.check_fenced().err().map(|e| e.to_proto());
                }
                if description.error.is_none() && record.leader == NO_LEADER {
                    description.error = self
                        .partition(name, index as u32)
                        .err()
                        .map(|e| e.to_proto());
                }
                description
            })
            .collect();
        Ok(v1::DescribeTopicResponse {
            name: name.to_string(),
            internal: topic.internal,
            partitions,
            configs: self.config_entries(&topic.configs),
        })
    }

    fn config_entries(&self, overrides: &BTreeMap<String, String>) -> Vec<v1::ConfigEntry> {
        let effective = topic_log_config(&self.log_defaults, overrides)
            .unwrap_or_else(|_| self.log_defaults.clone());
        let mut entries: Vec<v1::ConfigEntry> = effective
            .entries()
            .into_iter()
            .map(|(key, value)| v1::ConfigEntry {
                key: key.to_string(),
                value,
                is_override: overrides.contains_key(key),
            })
            .collect();
        for key in BROKER_TOPIC_KEYS {
            let default = if *key == runnel_controller::state::UNCLEAN_ELECTION_KEY {
                self.config.unclean_leader_election_enable.to_string()
            } else {
                "1".to_string()
            };
            let value = overrides
                .get(*key)
                .or_else(|| self.config.topic_defaults.get(*key))
                .cloned()
                .unwrap_or(default);
            entries.push(v1::ConfigEntry {
                key: (*key).to_string(),
                value,
                is_override: overrides.contains_key(*key),
            });
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }

    /// # Errors
    /// Unknown topic, an unknown key or an invalid value (nothing is changed then).
    pub async fn alter_topic_config(
        &self,
        request: v1::AlterTopicConfigRequest,
    ) -> Result<v1::AlterTopicConfigResponse, BrokerError> {
        let mut configs = self.image().metadata.topic(&request.name)?.configs.clone();
        for key in &request.delete {
            if !KNOWN_KEYS.contains(&key.as_str()) && !BROKER_TOPIC_KEYS.contains(&key.as_str()) {
                return Err(BrokerError::InvalidConfig {
                    reason: format!(
                        "unknown config key {key:?}; known keys: {}",
                        known_keys().join(", ")
                    ),
                });
            }
            configs.remove(key);
        }
        configs.extend(request.set);
        topic_log_config(&self.log_defaults, &configs)?;
        self.propose(Command::SetConfigs {
            name: request.name.clone(),
            configs: configs.clone(),
        })
        .await?;
        Ok(v1::AlterTopicConfigResponse {
            configs: self.config_entries(&configs),
        })
    }

    /// # Errors
    /// Unknown topic, a total not larger than today's, or no answer from the controller.
    pub async fn add_partitions(
        &self,
        name: &str,
        total: u32,
    ) -> Result<v1::AddPartitionsResponse, BrokerError> {
        self.image().metadata.check_add_partitions(name, total)?;
        let topic = match self
            .propose(Command::AddPartitions {
                name: name.to_string(),
                total,
            })
            .await?
        {
            Outcome::Topic(topic) => topic,
            Outcome::Done | Outcome::ProducerIds { .. } | Outcome::Acls(_) => {
                self.image().metadata.topic(name)?.clone()
            }
        };
        Ok(v1::AddPartitionsResponse {
            topic: Some(topic_metadata(name, &topic, &self.log_defaults)),
        })
    }

    /// Starts moving partitions to new replica lists.
    ///
    /// # Errors
    /// An unknown topic, partition or broker, a list with repeats, a partition being
    /// moved already, or no answer from the controller.
    pub async fn reassign_partitions(
        &self,
        request: v1::ReassignPartitionsRequest,
    ) -> Result<(), BrokerError> {
        if request.moves.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: "the plan moves no partition".into(),
            });
        }
        let partitions = request
            .moves
            .into_iter()
            .map(|m| (m.topic, m.partition, m.replicas))
            .collect();
        self.propose(Command::Reassign {
            partitions,
            throttle_bytes: request.throttle_bytes,
        })
        .await?;
        Ok(())
    }

    /// Preferred leader election over `topics` (every topic when empty): proposes the
    /// partitions it would move, then reports every partition of them as it stands.
    ///
    /// # Errors
    /// An unknown topic, or no answer from the controller.
    pub async fn elect_preferred_leaders(
        &self,
        topics: Vec<String>,
    ) -> Result<v1::ElectLeadersResponse, BrokerError> {
        let before = self.image();
        let names: Vec<String> = if topics.is_empty() {
            before.metadata.topics.keys().cloned().collect()
        } else {
            for name in &topics {
                before.metadata.topic(name)?;
            }
            topics
        };
        let wanted: Vec<(String, u32)> = names
            .iter()
            .flat_map(|name| {
                let count = before.metadata.topics[name].partitions.len() as u32;
                (0..count).map(move |p| (name.clone(), p))
            })
            .collect();
        let candidates: Vec<(String, u32)> = wanted
            .iter()
            .filter(|(t, p)| before.metadata.preferred_if_electable(t, *p).is_some())
            .cloned()
            .collect();
        if !candidates.is_empty() {
            self.propose(Command::ElectPreferred {
                partitions: candidates.clone(),
            })
            .await?;
        }
        let after = self.image();
        let live = after.metadata.live_brokers();
        let results = wanted
            .into_iter()
            .filter_map(|(topic, partition)| {
                let record = after
                    .metadata
                    .topics
                    .get(&topic)?
                    .partitions
                    .get(partition as usize)?;
                let preferred = record.replicas.first().copied().unwrap_or(NO_LEADER);
                let reason = if record.leader == preferred {
                    String::new()
                } else if !live.contains(&preferred) {
                    format!("preferred replica {preferred} is not live")
                } else if !record.isr.contains(&preferred) {
                    format!(
                        "preferred replica {preferred} is not in the ISR ({}) yet",
                        join_ids(&record.isr)
                    )
                } else {
                    "the leadership moved again meanwhile; retry".to_string()
                };
                Some(v1::ElectionResult {
                    elected: candidates.contains(&(topic.clone(), partition))
                        && record.leader == preferred,
                    topic,
                    partition,
                    leader: record.leader,
                    preferred,
                    reason,
                })
            })
            .collect();
        Ok(v1::ElectLeadersResponse { results })
    }

    /// # Errors
    /// Unknown topic or partition, or an offset beyond the high watermark.
    pub fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<i64, BrokerError> {
        self.partition(topic, partition)?.delete_records(offset)
    }

    /// Runs retention, compaction and interval flushing on every partition, and removes
    /// group members whose session expired.
    pub fn housekeeping(&self, clean: bool) {
        let now = now_ms();
        self.expire_members(now);
        for partition in self.all_partitions() {
            partition.housekeeping(now, clean);
        }
    }

    /// Closes every log cleanly.
    pub fn close(&self) {
        self.replicas.stop();
        let topics: Vec<_> = self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        for (_, hosted) in topics {
            for (_, partition) in hosted.partitions {
                let (topic, index) = (partition.topic.clone(), partition.index);
                if let Err(err) = partition.close() {
                    tracing::error!(topic, partition = index, error = %err, "closing partition failed");
                }
            }
        }
    }
}

/// The partition's record in `image`, or why there is none.
fn partition_record<'a>(
    image: &'a MetadataImage,
    topic: &str,
    partition: u32,
) -> Result<&'a PartitionRecord, BrokerError> {
    let record = image
        .metadata
        .topics
        .get(topic)
        .ok_or_else(|| BrokerError::UnknownTopic {
            topic: topic.to_string(),
        })?;
    record
        .partitions
        .get(partition as usize)
        .ok_or(BrokerError::UnknownPartition {
            topic: topic.to_string(),
            partition,
            count: record.partitions.len() as u32,
        })
}

/// Answers a held request: `once` builds the answer and says whether it is ready to
/// go, registering what it waits on; until it is ready (or `max_wait_ms` has passed, or
/// there is nothing to wait on), it runs again whenever one of those moves.
async fn long_poll<R>(
    max_wait_ms: u32,
    mut once: impl FnMut(&mut Vec<watch::Receiver<i64>>) -> (R, bool),
) -> R {
    let wait = Duration::from_millis(u64::from(max_wait_ms.min(FETCH_WAIT_MS_MAX)));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut watchers = Vec::new();
        let (response, ready) = once(&mut watchers);
        if ready || watchers.is_empty() || tokio::time::Instant::now() >= deadline {
            return response;
        }
        let changed = futures::future::select_all(
            watchers
                .iter_mut()
                .map(|w| Box::pin(w.changed().map(|_| ())) as BoxFuture<'_, ()>),
        );
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return once(&mut Vec::new()).0;
        }
    }
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn known_keys() -> Vec<&'static str> {
    let mut keys: Vec<&str> = KNOWN_KEYS
        .iter()
        .chain(BROKER_TOPIC_KEYS)
        .copied()
        .collect();
    keys.sort_unstable();
    keys
}

/// The record bytes a fetch may return: what it asks (0 = no limit), within the
/// broker's maximum.
fn fetch_budget(max_bytes: u32) -> usize {
    match max_bytes {
        0 => FETCH_BYTES_MAX,
        n => (n as usize).min(FETCH_BYTES_MAX),
    }
}

/// Checks the value of a topic config the broker interprets itself.
fn check_broker_topic_key(key: &str, value: &str) -> Result<(), BrokerError> {
    let (valid, expected) = if key == runnel_controller::state::UNCLEAN_ELECTION_KEY {
        (matches!(value, "true" | "false"), "true or false")
    } else {
        (
            value.trim().parse::<u32>().is_ok_and(|v| v >= 1),
            "a positive integer",
        )
    };
    if valid {
        return Ok(());
    }
    Err(BrokerError::InvalidConfig {
        reason: format!("invalid value {value:?} for {key}: {expected}"),
    })
}

/// The log settings of a topic: broker defaults with the topic's overrides applied.
fn topic_log_config(
    defaults: &LogConfig,
    overrides: &BTreeMap<String, String>,
) -> Result<LogConfig, BrokerError> {
    let mut config = defaults.clone();
    for (key, value) in overrides {
        if BROKER_TOPIC_KEYS.contains(&key.as_str()) {
            check_broker_topic_key(key, value)?;
            continue;
        }
        config.apply(key, value).map_err(|err| match err {
            runnel_broker_storage::ConfigError::UnknownKey { key } => BrokerError::InvalidConfig {
                reason: format!(
                    "unknown config key {key:?}; known keys: {}",
                    known_keys().join(", ")
                ),
            },
            other => other.into(),
        })?;
    }
    Ok(config)
}

fn topic_metadata(name: &str, topic: &TopicRecord, defaults: &LogConfig) -> v1::TopicMetadata {
    let max_message_bytes = topic_log_config(defaults, &topic.configs)
        .map_or(defaults.max_message_bytes, |c| c.max_message_bytes);
    v1::TopicMetadata {
        max_message_bytes: u32::try_from(max_message_bytes).unwrap_or(u32::MAX),
        name: name.to_string(),
        partitions: topic
            .partitions
            .iter()
            .enumerate()
            .map(|(index, p)| v1::PartitionMetadata {
                partition: index as u32,
                leader: p.leader,
                leader_epoch: p.leader_epoch,
                replicas: p.replicas.clone(),
                isr: p.isr.clone(),
            })
            .collect(),
        internal: topic.internal,
        error: None,
    }
}

fn brokers(records: &[BrokerRecord]) -> Vec<v1::BrokerInfo> {
    records
        .iter()
        .map(|b| v1::BrokerInfo {
            id: b.id,
            address: b.address.clone(),
            fenced: b.fenced,
            shutting_down: b.shutting_down,
        })
        .collect()
}
