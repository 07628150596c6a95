//! A consumer that is a member of a consumer group.
//!
//! A background task heartbeats to the broker, which answers with the partitions this
//! member may read. `poll` applies changes first: revoked partitions have their positions
//! committed, are dropped, and the next heartbeat reports them released (only then does
//! another member get them); new partitions start at the group's committed offset, or at
//! `auto_offset_reset` when there is none. Offsets are committed automatically every
//! `auto_commit_interval` (inside `poll`, so only records already returned are covered),
//! on revocation and on `close`, or explicitly with `commit`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runnel_proto::v1::{self, ErrorCode};
use tokio::sync::Notify;

use crate::client::Client;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord, FetchedBatch, StartFrom};
use crate::error::ClientError;

type TopicPartition = (String, u32);

/// How long commits and offset lookups retry while the group's coordinator moves.
const GROUP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Shown by `group describe` as CLIENT-ID.
    pub client_id: String,
    /// The broker removes this member when no heartbeat arrives for this long.
    pub session_timeout: Duration,
    /// `None` turns automatic commits off (then call [`GroupConsumer::commit`]).
    pub auto_commit_interval: Option<Duration>,
    /// Commit a revoked partition's position before giving it up. Off for callers that
    /// commit only what they finished themselves (the new owner then re-reads the rest).
    pub commit_on_revoke: bool,
    /// Where a partition starts when the group has no committed offset for it.
    pub auto_offset_reset: StartFrom,
    pub consumer: ConsumerConfig,
    /// Members besides its owner that should keep each partition's state warm (standby
    /// replicas): the coordinator names them in [`GroupConsumer::standby`], and prefers a
    /// member that reports a partition warm ([`GroupConsumer::set_warm`]) when the
    /// partition must move. 0: none.
    pub standby_replicas: u32,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            client_id: "runnel-client".into(),
            session_timeout: Duration::from_secs(10),
            auto_commit_interval: Some(Duration::from_secs(5)),
            commit_on_revoke: true,
            auto_offset_reset: StartFrom::Latest,
            consumer: ConsumerConfig::default(),
            standby_replicas: 0,
        }
    }
}

/// What the heartbeat task and `poll` share.
#[derive(Debug, Default)]
struct Membership {
    member_id: String,
    epoch: i32,
    /// What the broker says this member may read.
    assignment: BTreeSet<TopicPartition>,
    /// What `poll` reads now; reported in heartbeats.
    owned: BTreeSet<TopicPartition>,
    /// Partitions to keep warm, as the broker last said.
    standby: BTreeSet<TopicPartition>,
    /// Partitions kept warm, reported in heartbeats.
    warm: BTreeSet<TopicPartition>,
    /// The broker forgot this member: drop everything without committing, rejoin.
    fenced: bool,
    error: Option<ClientError>,
    heartbeats: u64,
}

fn to_proto(partitions: &BTreeSet<TopicPartition>) -> Vec<v1::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, partition) in partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, partitions)| v1::TopicPartitions {
            topic: topic.to_string(),
            partitions,
        })
        .collect()
}

fn from_proto(partitions: &[v1::TopicPartitions]) -> BTreeSet<TopicPartition> {
    partitions
        .iter()
        .flat_map(|tp| tp.partitions.iter().map(|p| (tp.topic.clone(), *p)))
        .collect()
}

/// Who a group member is, for offsets committed in a transaction
/// ([`crate::Producer::send_offsets_to_transaction`]): the coordinator accepts them only
/// from a member that owns the partitions (a member of an older generation is fenced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMetadata {
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: i32,
}

pub struct GroupConsumer {
    client: Client,
    group: String,
    config: GroupConfig,
    consumer: Consumer,
    shared: Arc<Mutex<Membership>>,
    wake: Arc<Notify>,
    heartbeat: tokio::task::JoinHandle<()>,
    owned: BTreeSet<TopicPartition>,
    /// The standbys the broker named with the assignment `owned` was last brought to.
    standby: BTreeSet<TopicPartition>,
    last_commit: Instant,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl GroupConsumer {
    /// Joins `group` subscribed to `topics` and waits for the first answer.
    ///
    /// # Errors
    /// An unknown topic, an invalid group id, or no answer from the broker.
    pub async fn join(
        client: Client,
        group: &str,
        topics: &[String],
        config: GroupConfig,
    ) -> Result<Self, ClientError> {
        for topic in topics {
            client.refresh_topic(topic).await?;
        }
        let shared = Arc::new(Mutex::new(Membership::default()));
        let wake = Arc::new(Notify::new());
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            group.to_string(),
            topics.to_vec(),
            config.clone(),
            shared.clone(),
            wake.clone(),
        ));
        let consumer = Consumer::new(client.clone(), config.consumer.clone());
        let member = GroupConsumer {
            client,
            group: group.to_string(),
            config,
            consumer,
            shared,
            wake,
            heartbeat,
            owned: BTreeSet::new(),
            standby: BTreeSet::new(),
            last_commit: Instant::now(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let mut state = member.state();
                if let Some(err) = state.error.take() {
                    return Err(err);
                }
                if !state.member_id.is_empty() {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(ClientError::Transport {
                    code: tonic::Code::DeadlineExceeded,
                    message: format!("no answer from the group coordinator for group {group:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(member)
    }

    fn state(&self) -> MutexGuard<'_, Membership> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn member_id(&self) -> String {
        self.state().member_id.clone()
    }

    /// The partitions this member reads now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().cloned().collect()
    }

    /// The partitions whose state this member should keep warm (with
    /// [`GroupConfig::standby_replicas`]): owned by other members, none of this one's.
    /// Named in the same answer as the assignment `poll` last applied.
    pub fn standby(&self) -> BTreeSet<TopicPartition> {
        self.standby.clone()
    }

    /// Reports the partitions this member keeps a current copy of state for; the next
    /// heartbeat tells the coordinator.
    pub fn set_warm(&self, warm: BTreeSet<TopicPartition>) {
        self.state().warm = warm;
    }

    /// How many heartbeats the broker has answered.
    pub fn heartbeats(&self) -> u64 {
        self.state().heartbeats
    }

    /// Applies assignment changes, commits if due, then fetches from the owned partitions.
    /// With no partitions it waits `max_wait` and returns nothing.
    ///
    /// # Errors
    /// A broker or transport error.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        if !self.ready_to_fetch().await? {
            return Ok(Vec::new());
        }
        self.consumer.poll().await
    }

    /// Like [`GroupConsumer::poll`], returning whole batches with their records undecoded
    /// ([`Consumer::poll_batches`]).
    ///
    /// # Errors
    /// A broker or transport error.
    pub async fn poll_batches(&mut self) -> Result<Vec<FetchedBatch>, ClientError> {
        if !self.ready_to_fetch().await? {
            return Ok(Vec::new());
        }
        self.consumer.poll_batches().await
    }

    /// Applies assignment changes and commits if due; false (after waiting `max_wait`)
    /// when no partitions are owned.
    async fn ready_to_fetch(&mut self) -> Result<bool, ClientError> {
        self.reconcile().await?;
        if let Some(interval) = self.config.auto_commit_interval
            && self.last_commit.elapsed() >= interval
        {
            self.commit().await?;
        }
        if self.owned.is_empty() {
            tokio::time::sleep(
                self.config
                    .consumer
                    .max_wait
                    .min(Duration::from_millis(200)),
            )
            .await;
            return Ok(false);
        }
        Ok(true)
    }

    async fn reconcile(&mut self) -> Result<(), ClientError> {
        let (assignment, standby, fenced) = {
            let mut state = self.state();
            if let Some(err) = state.error.take() {
                return Err(err);
            }
            let fenced = std::mem::take(&mut state.fenced);
            (state.assignment.clone(), state.standby.clone(), fenced)
        };
        self.standby = standby;
        if fenced {
            // Another member may own these now: stop without committing.
            for (topic, partition) in std::mem::take(&mut self.owned) {
                self.consumer.unassign(&topic, partition);
            }
            self.state().owned.clear();
        }
        let revoked: BTreeSet<TopicPartition> =
            self.owned.difference(&assignment).cloned().collect();
        if !revoked.is_empty() && self.config.commit_on_revoke {
            let offsets = self.positions(&revoked);
            match self.commit_offsets(offsets).await {
                Ok(()) => {}
                Err(err)
                    if matches!(
                        err.code(),
                        Some(ErrorCode::FencedMember | ErrorCode::UnknownMemberId)
                    ) =>
                {
                    tracing::warn!(group = %self.group, error = %err, "commit on revocation was fenced");
                }
                Err(err) => return Err(err),
            }
        }
        for (topic, partition) in &revoked {
            self.consumer.unassign(topic, *partition);
            self.owned.remove(&(topic.clone(), *partition));
        }
        let added: BTreeSet<TopicPartition> = assignment.difference(&self.owned).cloned().collect();
        if !added.is_empty() {
            let committed = self.committed().await?;
            for tp in &added {
                let start = committed
                    .get(tp)
                    .map_or(self.config.auto_offset_reset, |offset| {
                        StartFrom::Offset(*offset)
                    });
                self.consumer.seek(&tp.0, tp.1, start).await?;
                self.owned.insert(tp.clone());
            }
        }
        if !revoked.is_empty() || !added.is_empty() || fenced {
            self.state().owned = self.owned.clone();
            self.wake.notify_one();
        }
        Ok(())
    }

    fn positions(&self, partitions: &BTreeSet<TopicPartition>) -> BTreeMap<TopicPartition, i64> {
        partitions
            .iter()
            .filter_map(|(topic, partition)| {
                self.consumer
                    .position(topic, *partition)
                    .map(|offset| ((topic.clone(), *partition), offset))
            })
            .collect()
    }

    /// This member's identity, for [`crate::Producer::send_offsets_to_transaction`].
    pub fn group_metadata(&self) -> GroupMetadata {
        let state = self.state();
        GroupMetadata {
            group_id: self.group.clone(),
            member_id: state.member_id.clone(),
            member_epoch: state.epoch,
        }
    }

    /// The positions to commit for every owned partition (the offset after the last
    /// record `poll` returned): what a consume-transform-produce loop sends with
    /// [`crate::Producer::send_offsets_to_transaction`].
    pub fn owned_positions(&self) -> BTreeMap<TopicPartition, i64> {
        self.positions(&self.owned)
    }

    /// The group's committed offsets.
    ///
    /// # Errors
    /// A broker or transport error.
    pub async fn committed(&self) -> Result<BTreeMap<TopicPartition, i64>, ClientError> {
        let request = v1::FetchOffsetsRequest {
            group_id: self.group.clone(),
            topics: Vec::new(),
        };
        let response = self
            .client
            .group_call(&self.group, GROUP_CALL_TIMEOUT, |mut rpc| {
                let request = request.clone();
                async move { rpc.fetch_offsets(request).await }
            })
            .await?;
        Ok(response
            .offsets
            .into_iter()
            .map(|c| ((c.topic, c.partition), c.offset))
            .collect())
    }

    /// Commits the position of every owned partition (the offset after the last record
    /// `poll` returned).
    ///
    /// # Errors
    /// A fenced member, a broker or transport error.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let offsets = self.positions(&self.owned.clone());
        self.commit_offsets(offsets).await
    }

    /// Commits the given offsets (the next offset to read, per partition).
    ///
    /// # Errors
    /// A fenced member, a broker or transport error.
    pub async fn commit_offsets(
        &mut self,
        offsets: BTreeMap<TopicPartition, i64>,
    ) -> Result<(), ClientError> {
        self.last_commit = Instant::now();
        if offsets.is_empty() {
            return Ok(());
        }
        let (member_id, member_epoch) = {
            let state = self.state();
            (state.member_id.clone(), state.epoch)
        };
        let request = v1::CommitOffsetsRequest {
            group_id: self.group.clone(),
            member_id,
            member_epoch,
            offsets: offsets
                .into_iter()
                .map(|((topic, partition), offset)| v1::OffsetCommit {
                    topic,
                    partition,
                    offset,
                    metadata: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        self.client
            .group_call(&self.group, GROUP_CALL_TIMEOUT, |mut rpc| {
                let request = request.clone();
                async move { rpc.commit_offsets(request).await }
            })
            .await?;
        Ok(())
    }

    /// Commits (when auto-commit is on) and leaves the group, so that its partitions move
    /// to the other members at once instead of after the session timeout.
    ///
    /// # Errors
    /// The commit failed (the member still leaves).
    pub async fn close(mut self) -> Result<(), ClientError> {
        let committed = if self.config.auto_commit_interval.is_some() {
            self.commit().await
        } else {
            Ok(())
        };
        self.leave().await;
        committed
    }

    /// Leaves the group without committing.
    pub async fn leave(&mut self) {
        self.heartbeat.abort();
        let member_id = self.state().member_id.clone();
        if member_id.is_empty() {
            return;
        }
        let request = v1::HeartbeatRequest {
            group_id: self.group.clone(),
            member_id,
            member_epoch: -1,
            ..Default::default()
        };
        let _ = self
            .client
            .group_call(&self.group, Duration::ZERO, |mut rpc| {
                let request = request.clone();
                async move { rpc.heartbeat(request).await }
            })
            .await;
    }
}

async fn heartbeat_loop(
    client: Client,
    group: String,
    topics: Vec<String>,
    config: GroupConfig,
    shared: Arc<Mutex<Membership>>,
    wake: Arc<Notify>,
) {
    let lock = || {
        shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut interval = Duration::from_millis(250);
    let mut last_answer = Instant::now();
    loop {
        let request = {
            let state = lock();
            v1::HeartbeatRequest {
                group_id: group.clone(),
                member_id: state.member_id.clone(),
                member_epoch: if state.member_id.is_empty() {
                    0
                } else {
                    state.epoch
                },
                client_id: config.client_id.clone(),
                topics: topics.clone(),
                session_timeout_ms: config.session_timeout.as_millis() as u32,
                owned: to_proto(&state.owned),
                standby_replicas: config.standby_replicas,
                warm: to_proto(&state.warm),
            }
        };
        let sent = client
            .group_call(&group, Duration::ZERO, |mut rpc| {
                let request = request.clone();
                async move { rpc.heartbeat(request).await }
            })
            .await;
        match sent {
            Ok(response) => {
                last_answer = Instant::now();
                let mut state = lock();
                state.member_id = response.member_id;
                state.epoch = response.member_epoch;
                state.assignment = from_proto(&response.assignment);
                state.standby = from_proto(&response.standby);
                state.heartbeats += 1;
                interval = Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(50)));
            }
            Err(err) => {
                let mut state = lock();
                match err.code() {
                    Some(ErrorCode::UnknownMemberId) => {
                        tracing::warn!(group, error = %err, "rejoining the group");
                        state.member_id.clear();
                        state.epoch = 0;
                        state.assignment.clear();
                        state.standby.clear();
                        state.fenced = true;
                        continue;
                    }
                    _ if err.is_retriable() && last_answer.elapsed() > config.session_timeout => {
                        // The coordinator has surely expired this member and may have given
                        // its partitions to others: stop reading them and rejoin.
                        tracing::warn!(group, error = %err, "no heartbeat answered for a whole session; rejoining the group");
                        state.member_id.clear();
                        state.epoch = 0;
                        state.assignment.clear();
                        state.standby.clear();
                        state.fenced = true;
                        last_answer = Instant::now();
                    }
                    _ if err.is_retriable() => {
                        tracing::debug!(group, error = %err, "heartbeat failed; retrying")
                    }
                    _ => {
                        state.error = Some(err);
                        return;
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wake.notified() => {}
        }
    }
}
