//! A controller voter: its Raft node, the metadata it applied, and (while it is the
//! active controller) the brokers' sessions.
//!
//! **Invariant:** only the active controller fences brokers, and only a broker silent for
//! `broker_session_timeout` since the later of its last heartbeat and the moment this
//! voter became active: a new active controller first gives every broker a full session
//! to reach it, whether or not it heard of the broker yet.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;

use crate::network::Network;
use crate::raft_log::RaftLog;
use crate::state::{BrokerId, ClusterMetadata, Command, CommandResult, UNCLEAN_ELECTION_KEY};
use crate::state_machine::{MetadataImage, MetadataMachine};
use crate::{ControllerClient, Node, NodeId, TypeConfig};

/// Settings of a controller voter.
#[derive(Debug, Clone)]
pub struct QuorumConfig {
    pub node_id: BrokerId,
    /// Every voter of the quorum, this one included: id → `host:port`.
    pub voters: BTreeMap<BrokerId, String>,
    /// Where the Raft log, vote and snapshot live.
    pub dir: PathBuf,
    /// A broker silent this long is fenced (`broker.session.timeout.ms`).
    pub broker_session_timeout: Duration,
    pub raft_heartbeat: Duration,
    /// Elections start after a random timeout between this and twice it.
    pub election_timeout: Duration,
    /// The metadata of a single-node data directory from before the quorum, taken into
    /// the log once the cluster is bootstrapped.
    pub import: Option<ClusterMetadata>,
    /// `unclean.leader.election.enable` for topics that do not set it.
    pub unclean_leader_election: bool,
    /// How often the active controller gives partitions back to their preferred
    /// replicas (Kafka's `auto.leader.rebalance.enable` with
    /// `leader.imbalance.check.interval.seconds`) and gives internal topics created on
    /// fewer brokers more replicas; `None`: never.
    pub leader_rebalance_interval: Option<Duration>,
    /// TLS towards the other voters; `None`: plaintext.
    pub tls: Option<runnel_proto::tls::ClientTls>,
    /// What this voter proves itself with to the other voters.
    pub credentials: Option<std::sync::Arc<runnel_proto::auth::Credentials>>,
}

impl QuorumConfig {
    pub fn new(node_id: BrokerId, voters: BTreeMap<BrokerId, String>, dir: PathBuf) -> Self {
        QuorumConfig {
            node_id,
            voters,
            dir,
            broker_session_timeout: Duration::from_millis(2_500),
            raft_heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            import: None,
            unclean_leader_election: false,
            leader_rebalance_interval: Some(Duration::from_secs(30)),
            tls: None,
            credentials: None,
        }
    }
}

/// Why a proposal was not applied here.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("this controller is not the active one")]
    NotLeader { leader: Option<(BrokerId, String)> },
    #[error("the controller quorum failed: {0}")]
    Fatal(String),
}

/// What `cluster info` shows of the quorum.
#[derive(Debug, Clone, Default)]
pub struct QuorumStatus {
    pub leader: Option<BrokerId>,
    pub term: u64,
    /// Each voter's matched log index, as the active controller knows it.
    pub voters: Vec<(BrokerId, String, u64)>,
}

pub struct Quorum {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) machine: MetadataMachine,
    config: QuorumConfig,
    sessions: Mutex<HashMap<BrokerId, Instant>>,
    /// `config.import` until a bootstrap carrying it has committed.
    pending_import: Mutex<Option<ClusterMetadata>>,
    /// When this controller last checked leaders against their preferred replicas.
    rebalanced_at: Mutex<Instant>,
}

impl Quorum {
    /// Opens the log and state machine in `config.dir`, starts the Raft node, and forms
    /// the quorum on first start (every voter may do so with the same voters: openraft
    /// makes that safe). The returned quorum serves once its `service` is mounted.
    ///
    /// # Errors
    /// An unreadable or damaged log or snapshot, or invalid Raft settings.
    pub async fn start(config: QuorumConfig) -> anyhow::Result<Arc<Quorum>> {
        if !config.voters.contains_key(&config.node_id) {
            anyhow::bail!(
                "node {} is a controller but is not among the controller quorum's voters ({}); add it to --controller-quorum",
                config.node_id,
                config
                    .voters
                    .keys()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let log = RaftLog::open(&config.dir)?;
        let machine = MetadataMachine::open(&config.dir)?;
        let heartbeat_ms = config.raft_heartbeat.as_millis() as u64;
        let election_ms = config.election_timeout.as_millis() as u64;
        let raft_config = Config {
            cluster_name: "runnel-controller".into(),
            heartbeat_interval: heartbeat_ms,
            election_timeout_min: election_ms,
            election_timeout_max: election_ms * 2,
            install_snapshot_timeout: 5_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1_000),
            max_in_snapshot_log_to_keep: 100,
            ..Config::default()
        }
        .validate()?;
        let pristine = log.last_index() == 0;
        let network = Network {
            rpc_timeout: Duration::from_millis(heartbeat_ms.max(100) * 10),
            tls: config.tls.clone(),
            credentials: config.credentials.clone(),
        };
        let raft = Raft::new(
            u64::from(config.node_id),
            Arc::new(raft_config),
            network,
            log,
            machine.clone(),
        )
        .await?;
        if pristine {
            let members: BTreeMap<NodeId, Node> = config
                .voters
                .iter()
                .map(|(id, addr)| (u64::from(*id), Node::new(addr.clone())))
                .collect();
            if let Err(err) = raft.initialize(members).await {
                tracing::debug!(error = %err, "the quorum was formed already");
            }
        }
        let quorum = Arc::new(Quorum {
            raft,
            machine,
            pending_import: Mutex::new(config.import.clone()),
            config,
            sessions: Mutex::new(HashMap::new()),
            rebalanced_at: Mutex::new(Instant::now()),
        });
        tokio::spawn(Self::run_active_duties(Arc::downgrade(&quorum)));
        Ok(quorum)
    }

    pub fn node_id(&self) -> BrokerId {
        self.config.node_id
    }

    pub fn voters(&self) -> &BTreeMap<BrokerId, String> {
        &self.config.voters
    }

    /// The applied metadata: the current image, then each newer one.
    pub fn images(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.machine.subscribe()
    }

    /// The active controller as this voter knows it.
    pub fn leader(&self) -> Option<BrokerId> {
        self.raft
            .metrics()
            .borrow()
            .current_leader
            .and_then(|id| BrokerId::try_from(id).ok())
    }

    pub fn status(&self) -> QuorumStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let matched: BTreeMap<NodeId, u64> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, log)| (*id, log.map_or(0, |l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        QuorumStatus {
            leader: metrics
                .current_leader
                .and_then(|id| BrokerId::try_from(id).ok()),
            term: metrics.current_term,
            voters: self
                .config
                .voters
                .iter()
                .map(|(id, addr)| {
                    (
                        *id,
                        addr.clone(),
                        matched.get(&u64::from(*id)).copied().unwrap_or(0),
                    )
                })
                .collect(),
        }
    }

    fn leader_hint(&self) -> Option<(BrokerId, String)> {
        let leader = self.leader()?;
        let address = self.config.voters.get(&leader)?.clone();
        Some((leader, address))
    }

    /// Proposes `command` if this voter is the active controller, and waits until it is
    /// committed and applied. Returns the log index and the command's result.
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] with the active controller when known.
    pub async fn propose_local(
        &self,
        command: Command,
    ) -> Result<(u64, CommandResult), ProposeError> {
        match self.raft.client_write(command).await {
            Ok(response) => Ok((response.log_id.index, response.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let leader = forward.leader_id.and_then(|id| {
                    let id = BrokerId::try_from(id).ok()?;
                    let addr = forward
                        .leader_node
                        .map(|n| n.addr)
                        .or_else(|| self.config.voters.get(&id).cloned())?;
                    Some((id, addr))
                });
                Err(ProposeError::NotLeader { leader })
            }
            Err(err) => Err(ProposeError::Fatal(err.to_string())),
        }
    }

    /// A broker's heartbeat, on the active controller: records it, and registers or
    /// unfences the broker when the metadata does not show it live at this address and
    /// incarnation, and answers once that has committed.
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] when this voter is not the active controller.
    pub async fn heartbeat_local(
        &self,
        id: BrokerId,
        address: &str,
        incarnation: &str,
    ) -> Result<(), ProposeError> {
        if self.leader() != Some(self.config.node_id) {
            return Err(ProposeError::NotLeader {
                leader: self.leader_hint(),
            });
        }
        self.sessions().insert(id, Instant::now());
        let image = self.machine.current();
        let command = match image.metadata.broker(id) {
            Some(b) if b.address == address && b.incarnation == incarnation => {
                if !b.fenced {
                    return Ok(());
                }
                Command::UnfenceBroker { id }
            }
            _ => Command::RegisterBroker {
                id,
                address: address.to_string(),
                incarnation: incarnation.to_string(),
            },
        };
        let (_, result) = self.propose_local(command).await?;
        result.map_err(|err| ProposeError::Fatal(err.to_string()))?;
        Ok(())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<BrokerId, Instant>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Proposes the legacy metadata this voter holds (through the active controller,
    /// wherever it is), and while this voter is the active controller bootstraps the
    /// cluster and fences brokers whose sessions expired. Ends with the quorum.
    async fn run_active_duties(quorum: std::sync::Weak<Quorum>) {
        let mut active_since: Option<Instant> = None;
        loop {
            let Some(q) = quorum.upgrade() else { return };
            let tick = q.config.raft_heartbeat;
            q.propose_import(&q).await;
            let active = q.raft.metrics().borrow().state == ServerState::Leader;
            if !active {
                active_since = None;
            } else {
                // A full session for everyone before anyone is fenced: brokers heartbeat
                // to whoever was active before, and may not have found this voter yet.
                let since = *active_since.get_or_insert_with(Instant::now);
                q.active_duties(since).await;
            }
            drop(q);
            tokio::time::sleep(tick).await;
        }
    }

    /// Proposes a bootstrap carrying the legacy metadata, once; afterwards the old file
    /// is kept aside as `metadata.json.imported`, so that it is never imported again.
    async fn propose_import(&self, this: &Arc<Quorum>) {
        let Some(metadata) = self.pending().clone() else {
            return;
        };
        let client = ControllerClient::new(
            self.config.voters.clone(),
            Some(this.clone()),
            self.config.tls.clone(),
            self.config.credentials.clone(),
        );
        let command = Command::Bootstrap {
            cluster_id: new_id("runnel"),
            import: Some(metadata),
        };
        if let Err(err) = client
            .propose(command, self.config.election_timeout * 4)
            .await
        {
            tracing::debug!(error = %err, "import not committed yet");
            return;
        }
        *self.pending() = None;
        let legacy = self.config.dir.join("metadata.json");
        if let Err(err) = std::fs::rename(&legacy, self.config.dir.join("metadata.json.imported")) {
            tracing::warn!(error = %err, "could not rename the imported metadata.json");
        }
        tracing::info!("took the single-node metadata into the controller log");
    }

    fn pending(&self) -> MutexGuard<'_, Option<ClusterMetadata>> {
        self.pending_import
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bootstraps the cluster, or fences every live broker not heard from for a session
    /// since the later of its last heartbeat and `active_since`.
    async fn active_duties(&self, active_since: Instant) {
        let image = self.machine.current();
        if image.metadata.cluster_id.is_empty() {
            // Left to the import when there is one, so it comes before anything else.
            if self.pending().is_none() {
                let command = Command::Bootstrap {
                    cluster_id: new_id("runnel"),
                    import: None,
                };
                if let Err(err) = self.propose_local(command).await {
                    tracing::debug!(error = %err, "bootstrap not committed yet");
                }
            }
            return;
        }
        let expired: Vec<BrokerId> = {
            let sessions = self.sessions();
            image
                .metadata
                .brokers
                .iter()
                .filter(|b| !b.fenced)
                .filter(|b| {
                    let seen = sessions
                        .get(&b.id)
                        .map_or(active_since, |seen| (*seen).max(active_since));
                    seen.elapsed() > self.config.broker_session_timeout
                })
                .map(|b| b.id)
                .collect()
        };
        for id in expired {
            tracing::warn!(
                broker = id,
                timeout_ms = self.config.broker_session_timeout.as_millis() as u64,
                "broker missed its heartbeats; fencing it"
            );
            if let Err(err) = self.propose_local(Command::FenceBroker { id }).await {
                tracing::warn!(broker = id, error = %err, "fencing not committed");
            }
        }
        self.elect_unclean(&image.metadata).await;
        self.rebalance_leaders(&image.metadata).await;
    }

    /// Every `leader_rebalance_interval`, gives the partitions whose preferred replica is
    /// live and in sync back to it, so leadership spreads again after a broker returns.
    async fn rebalance_leaders(&self, metadata: &ClusterMetadata) {
        let Some(interval) = self.config.leader_rebalance_interval else {
            return;
        };
        {
            let mut last = self
                .rebalanced_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < interval {
                return;
            }
            *last = Instant::now();
        }
        let moves = metadata.internal_replicas_to_add();
        if !moves.is_empty() {
            tracing::info!(
                partitions = moves.len(),
                "more brokers are live: giving the internal topics more replicas"
            );
            let command = Command::Reassign {
                partitions: moves,
                throttle_bytes: 0,
            };
            if let Err(err) = self.propose_local(command).await {
                tracing::warn!(error = %err, "internal topic reassignment not committed");
            }
        }
        let partitions = metadata.preferred_candidates();
        if partitions.is_empty() {
            return;
        }
        tracing::info!(
            partitions = partitions.len(),
            "giving partitions back to their preferred replicas"
        );
        if let Err(err) = self
            .propose_local(Command::ElectPreferred { partitions })
            .await
        {
            tracing::warn!(error = %err, "preferred leader election not committed");
        }
    }

    /// Elects an out-of-sync live replica for each offline partition whose whole ISR is
    /// fenced, where `unclean.leader.election.enable` (the topic's, else the default)
    /// allows it. What the lost ISR had beyond the new leader's log is gone.
    async fn elect_unclean(&self, metadata: &ClusterMetadata) {
        for (topic, partition, leader) in metadata.unclean_candidates() {
            let allowed = metadata
                .topics
                .get(&topic)
                .and_then(|t| t.configs.get(UNCLEAN_ELECTION_KEY))
                .map_or(self.config.unclean_leader_election, |v| v == "true");
            if !allowed {
                continue;
            }
            let isr = metadata
                .topics
                .get(&topic)
                .and_then(|t| t.partitions.get(partition as usize))
                .map(|p| p.isr.clone())
                .unwrap_or_default();
            tracing::warn!(
                %topic, partition, leader, lost_isr = ?isr,
                "unclean leader election: every in-sync replica is down; records they had beyond the new leader's log end are lost (the new leader logs its end offset)"
            );
            let command = Command::ElectLeader {
                topic,
                partition,
                leader,
                unclean: true,
            };
            if let Err(err) = self.propose_local(command).await {
                tracing::warn!(error = %err, "unclean election not committed");
            }
        }
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        if let Err(err) = self.raft.shutdown().await {
            tracing::warn!(error = %err, "controller shutdown");
        }
    }
}

/// An id unique enough for cluster ids and incarnations: time and process.
pub fn new_id(prefix: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}-{:x}", std::process::id())
}
