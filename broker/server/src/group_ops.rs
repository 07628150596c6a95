//! The broker's consumer-group operations: membership through [`crate::group`], committed
//! offsets through [`crate::offsets`] and the `__consumer_offsets` topic.
//!
//! The coordinator of a group is the leader of the group's `__consumer_offsets`
//! partition. Invariants:
//! - A broker answers a group call only while it leads that partition and has replayed
//!   the partition's log (up to its log end) for the leader epoch it leads in; otherwise
//!   NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE or COORDINATOR_LOAD_IN_PROGRESS.
//! - Losing the leadership drops the partition's groups from memory at once; taking it
//!   replays them from the log. Nothing else carries group state between brokers.
//! - Commits and membership changes are acknowledged only once every in-sync replica of
//!   the partition holds them (acks=all, with the topic's `min.insync.replicas`), so a
//!   new coordinator knows every acknowledged commit.
//! - A membership record (every member and what it holds: assigned or still read) is
//!   appended, in the order the changes were made, before a member hears of a partition,
//!   and every heartbeat answer waits until what the coordinator wrote before it is
//!   replicated. A new coordinator restores the members with what they hold, so no
//!   partition is handed to a second member while the first may still read it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use runnel_batch::{BatchOptions, Record};
use runnel_controller::state::NO_LEADER;
use runnel_proto::v1;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::group::{
    GroupRecord, HEARTBEAT_INTERVAL_MS, Heartbeat, HeartbeatOutcome, TopicPartition,
    validate_group_id,
};
use crate::now_ms;
use crate::offsets::{
    Committed, METADATA_BYTES_MAX, OFFSETS_TOPIC, Stored, decode_record, encode_group_key,
    encode_group_value, encode_key, encode_value, partition_for_group,
};
use crate::partition::{Appended, Partition};

fn to_proto(partitions: &BTreeSet<TopicPartition>) -> Vec<v1::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, partition) in partitions {
        by_topic.entry(topic.as_str()).or_default().push(*partition);
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

impl Broker {
    fn coordinator(&self) -> std::sync::MutexGuard<'_, crate::group::Coordinator> {
        self.coordinator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn offset_store(&self) -> std::sync::MutexGuard<'_, crate::offsets::OffsetStore> {
        self.offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Join, heartbeat or leave.
    ///
    /// # Errors
    /// Invalid group id, unknown member, a subscription to an unknown topic, or this
    /// broker does not coordinate the group.
    pub async fn group_heartbeat(
        &self,
        request: v1::HeartbeatRequest,
        host: String,
    ) -> Result<v1::HeartbeatResponse, BrokerError> {
        let partition = self.check_coordinator(&request.group_id)?;
        if request.member_epoch != -1 {
            for topic in &request.topics {
                if self.partition_count(topic).is_none() {
                    return Err(BrokerError::UnknownTopic {
                        topic: topic.clone(),
                    });
                }
            }
        }
        let group_id = request.group_id.clone();
        let heartbeat = Heartbeat {
            group_id: request.group_id,
            member_id: request.member_id,
            member_epoch: request.member_epoch,
            client_id: request.client_id,
            host,
            topics: request.topics,
            session_timeout_ms: request.session_timeout_ms,
            owned: from_proto(&request.owned),
            standby_replicas: request.standby_replicas,
            warm: from_proto(&request.warm),
        };
        let counts = |topic: &str| self.partition_count(topic);
        let (outcome, end) = {
            let mut coordinator = self.coordinator();
            let outcome = coordinator.heartbeat(heartbeat, &counts, now_ms())?;
            let end = match coordinator.take_changed(&group_id) {
                Some(record) => {
                    let written = self.append_group_state(&partition, &group_id, record.as_ref());
                    match written {
                        Ok(appended) => appended.end_offset,
                        Err(err) => {
                            coordinator.forget_stored(&group_id);
                            return Err(err);
                        }
                    }
                }
                None => partition.log_end_offset(),
            };
            (outcome, end)
        };
        // Answer only once what this coordinator wrote so far is on every in-sync replica.
        self.await_internal(&partition, end).await?;
        Ok(match outcome {
            HeartbeatOutcome::Member {
                member_id,
                epoch,
                assignment,
                standby,
            } => v1::HeartbeatResponse {
                member_id,
                member_epoch: epoch,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                assignment: to_proto(&assignment),
                standby: to_proto(&standby),
            },
            HeartbeatOutcome::Left => v1::HeartbeatResponse {
                member_epoch: -1,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                ..Default::default()
            },
        })
    }

    /// Appends a group's membership record (or its tombstone) to its partition, in the
    /// order the caller holds the coordinator lock.
    fn append_group_state(
        &self,
        partition: &Partition,
        group_id: &str,
        record: Option<&GroupRecord>,
    ) -> Result<Appended, BrokerError> {
        let record = Record {
            offset: 0,
            timestamp_ms: now_ms(),
            key: Some(encode_group_key(group_id)),
            value: record.map(encode_group_value),
            headers: Vec::new(),
        };
        self.append_internal(partition, &[record])
    }

    pub(crate) fn expire_members(&self, now: i64) {
        let mut coordinator = self.coordinator();
        let expired = coordinator.expire(now);
        let groups: BTreeSet<String> = expired.iter().map(|(g, _)| g.clone()).collect();
        for (group, member) in expired {
            tracing::info!(
                group,
                member,
                "member session expired; its partitions are reassigned"
            );
        }
        for group in groups {
            let Some(record) = coordinator.take_changed(&group) else {
                continue;
            };
            let written = self
                .offsets_partition_led(&group)
                .and_then(|p| self.append_group_state(&p, &group, record.as_ref()));
            if let Err(err) = written {
                coordinator.forget_stored(&group);
                tracing::warn!(group, error = %err, "could not store the group's membership");
            }
        }
    }

    /// Makes commits durable in `__consumer_offsets`, then visible.
    ///
    /// # Errors
    /// A fenced or unknown member, an unknown topic or partition, oversized metadata, or a
    /// storage failure.
    pub async fn commit_offsets(
        &self,
        request: v1::CommitOffsetsRequest,
    ) -> Result<(), BrokerError> {
        let partition = self.check_coordinator(&request.group_id)?;
        let now = now_ms();
        let mut records = Vec::with_capacity(request.offsets.len());
        {
            let coordinator = self.coordinator();
            for commit in &request.offsets {
                self.check_partition_exists(&commit.topic, commit.partition)?;
                coordinator.check_commit(
                    &request.group_id,
                    &request.member_id,
                    &(commit.topic.clone(), commit.partition),
                )?;
                if commit.metadata.len() > METADATA_BYTES_MAX {
                    return Err(BrokerError::InvalidRequest {
                        reason: format!(
                            "commit metadata has {} bytes; at most {METADATA_BYTES_MAX}",
                            commit.metadata.len()
                        ),
                    });
                }
                if commit.offset < 0 {
                    return Err(BrokerError::InvalidRequest {
                        reason: format!(
                            "cannot commit negative offset {} for {}-{}",
                            commit.offset, commit.topic, commit.partition
                        ),
                    });
                }
                records.push(Record {
                    offset: 0,
                    timestamp_ms: now,
                    key: Some(encode_key(
                        &request.group_id,
                        &commit.topic,
                        commit.partition,
                    )),
                    value: Some(encode_value(&Committed {
                        offset: commit.offset,
                        metadata: commit.metadata.clone(),
                        commit_timestamp_ms: now,
                    })),
                    headers: Vec::new(),
                });
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        if !request.transactional_id.is_empty() {
            return self
                .commit_txn_offsets(&partition, request, records, now)
                .await;
        }
        let appended = self.append_internal(&partition, &records)?;
        self.await_internal(&partition, appended.end_offset).await?;
        let mut store = self.offset_store();
        for commit in request.offsets {
            store.apply(
                &request.group_id,
                &commit.topic,
                commit.partition,
                Some(Committed {
                    offset: commit.offset,
                    metadata: commit.metadata,
                    commit_timestamp_ms: now,
                }),
            );
        }
        Ok(())
    }

    /// A commit inside a producer's transaction: the partition joins the transaction,
    /// the records are appended as the producer's transactional batch, and the offsets
    /// wait for the transaction's marker.
    async fn commit_txn_offsets(
        &self,
        partition: &Arc<Partition>,
        request: v1::CommitOffsetsRequest,
        records: Vec<Record>,
        now: i64,
    ) -> Result<(), BrokerError> {
        let epoch = crate::txn_ops::producer_epoch(request.producer_epoch)?;
        let producer_id = request.producer_id;
        if partition.open_transaction_epoch(producer_id) != Some(epoch) {
            self.add_to_transaction(
                &request.transactional_id,
                producer_id,
                epoch,
                OFFSETS_TOPIC,
                vec![partition.index],
            )
            .await?;
        }
        let min_insync = self.min_insync_replicas(OFFSETS_TOPIC)?;
        let isr = partition.isr_len();
        if isr < min_insync {
            return Err(BrokerError::NotEnoughReplicas {
                topic: OFFSETS_TOPIC.to_string(),
                partition: partition.index,
                isr,
                min_insync,
            });
        }
        let options = BatchOptions {
            producer_id,
            producer_epoch: epoch,
            base_sequence: partition.next_sequence(producer_id, epoch),
            transactional: true,
            ..BatchOptions::default()
        };
        let appended = partition.append(&runnel_batch::encode(&records, options))?;
        self.await_internal(partition, appended.end_offset).await?;
        let mut store = self.offset_store();
        for commit in request.offsets {
            store.stage(
                producer_id,
                &request.group_id,
                &commit.topic,
                commit.partition,
                Committed {
                    offset: commit.offset,
                    metadata: commit.metadata,
                    commit_timestamp_ms: now,
                },
            );
        }
        Ok(())
    }

    /// A transaction's marker reached `__consumer_offsets` partition `index`: the
    /// offsets it committed there take effect (commit) or are dropped (abort).
    pub(crate) fn end_txn_offsets(&self, producer_id: i64, commit: bool, index: u32) {
        self.offset_store()
            .end_transaction(producer_id, commit, index);
    }

    /// Appends records to a partition of an internal topic this broker leads
    /// (`__consumer_offsets`, `__transaction_state`), refusing when fewer replicas are
    /// in sync than the topic's `min.insync.replicas`.
    pub(crate) fn append_internal(
        &self,
        partition: &Partition,
        records: &[Record],
    ) -> Result<Appended, BrokerError> {
        let min_insync = self.min_insync_replicas(&partition.topic)?;
        let isr = partition.isr_len();
        if isr < min_insync {
            return Err(BrokerError::NotEnoughReplicas {
                topic: partition.topic.clone(),
                partition: partition.index,
                isr,
                min_insync,
            });
        }
        partition.append(&runnel_batch::encode(records, BatchOptions::default()))
    }

    /// Waits until everything below `end` is durable here and on every in-sync replica.
    pub(crate) async fn await_internal(
        &self,
        partition: &Partition,
        end: i64,
    ) -> Result<(), BrokerError> {
        partition.wait_durable(end).await?;
        let min_insync = self.min_insync_replicas(&partition.topic)?;
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        partition
            .wait_replicated(end, end, min_insync, timeout)
            .await
    }

    /// # Errors
    /// This broker does not coordinate the group.
    pub fn fetch_offsets(
        &self,
        request: &v1::FetchOffsetsRequest,
    ) -> Result<v1::FetchOffsetsResponse, BrokerError> {
        self.check_coordinator(&request.group_id)?;
        let store = self.offset_store();
        if let Some((topic, partition)) = store
            .pending_partitions(&request.group_id)
            .find(|(topic, _)| request.topics.is_empty() || request.topics.contains(topic))
        {
            return Err(BrokerError::UnstableOffsetCommit {
                group: request.group_id.clone(),
                topic,
                partition,
            });
        }
        let offsets = store
            .group(&request.group_id)
            .into_iter()
            .flatten()
            .filter(|((topic, _), _)| request.topics.is_empty() || request.topics.contains(topic))
            .map(|((topic, partition), c)| v1::CommittedOffset {
                topic: topic.clone(),
                partition: *partition,
                offset: c.offset,
                metadata: c.metadata.clone(),
                commit_timestamp_ms: c.commit_timestamp_ms,
            })
            .collect();
        Ok(v1::FetchOffsetsResponse { offsets })
    }

    /// The groups this broker coordinates.
    pub fn list_groups(&self) -> v1::ListGroupsResponse {
        let coordinated = self.coordinated_partitions();
        let coordinator = self.coordinator();
        let store = self.offset_store();
        let ids: BTreeSet<&String> = coordinator.group_ids().chain(store.group_ids()).collect();
        let groups = ids
            .into_iter()
            .filter(|id| coordinated.contains_key(&partition_for_group(id)))
            .map(|id| {
                let group = coordinator.group(id);
                v1::GroupSummary {
                    group_id: id.clone(),
                    state: group.map_or("Empty", |g| g.state()).to_string(),
                    members: group.map_or(0, |g| g.members.len() as u32),
                }
            })
            .collect();
        v1::ListGroupsResponse { groups }
    }

    /// Members, and per partition the committed offset, log end offset, lag and owner.
    ///
    /// # Errors
    /// An unknown group.
    pub fn describe_group(&self, group_id: &str) -> Result<v1::DescribeGroupResponse, BrokerError> {
        self.check_coordinator(group_id)?;
        let coordinator = self.coordinator();
        let group = coordinator
            .group(group_id)
            .filter(|g| !g.members.is_empty());
        let committed = self
            .offset_store()
            .group(group_id)
            .cloned()
            .unwrap_or_default();
        if group.is_none() && committed.is_empty() {
            return Err(BrokerError::UnknownGroup {
                group: group_id.to_string(),
            });
        }
        let mut partitions: BTreeSet<TopicPartition> = committed.keys().cloned().collect();
        let mut owner: BTreeMap<TopicPartition, &crate::group::Member> = BTreeMap::new();
        let mut members = Vec::new();
        if let Some(group) = group {
            partitions.extend(group.target.keys().cloned());
            for member in group.members.values() {
                for tp in &member.assigned {
                    owner.insert(tp.clone(), member);
                }
                members.push(v1::GroupMember {
                    member_id: member.member_id.clone(),
                    client_id: member.client_id.clone(),
                    host: member.host.clone(),
                    member_epoch: member.epoch,
                    topics: member.topics.iter().cloned().collect(),
                    assignment: to_proto(&member.assigned),
                    standby: to_proto(&group.standby_of(&member.member_id)),
                });
            }
        }
        let rows = partitions
            .into_iter()
            .map(|tp| {
                let log_end_offset = self
                    .partition(&tp.0, tp.1)
                    .map_or(-1, |p| p.high_watermark());
                let current = committed.get(&tp).map_or(-1, |c| c.offset);
                let member = owner.get(&tp);
                v1::GroupPartition {
                    current_offset: current,
                    log_end_offset,
                    lag: if current >= 0 && log_end_offset >= 0 {
                        (log_end_offset - current).max(0)
                    } else {
                        -1
                    },
                    member_id: member.map(|m| m.member_id.clone()).unwrap_or_default(),
                    host: member.map(|m| m.host.clone()).unwrap_or_default(),
                    client_id: member.map(|m| m.client_id.clone()).unwrap_or_default(),
                    topic: tp.0,
                    partition: tp.1,
                }
            })
            .collect();
        Ok(v1::DescribeGroupResponse {
            group_id: group_id.to_string(),
            state: group.map_or("Empty", |g| g.state()).to_string(),
            group_epoch: group.map_or(0, |g| g.epoch),
            members,
            partitions: rows,
            coordinator: self.config.node_id,
        })
    }

    fn require_no_members(&self, group_id: &str) -> Result<(), BrokerError> {
        let members = self.coordinator().members_of(group_id);
        if members.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::GroupNotEmpty {
                group: group_id.to_string(),
                members,
            })
        }
    }

    /// Computes (and unless `dry_run`, commits) new offsets for every partition of a topic.
    ///
    /// # Errors
    /// Live members, an unknown group or topic, or a storage failure.
    pub async fn reset_offsets(
        &self,
        request: v1::ResetOffsetsRequest,
    ) -> Result<v1::ResetOffsetsResponse, BrokerError> {
        self.check_coordinator(&request.group_id)?;
        self.require_no_members(&request.group_id)?;
        let committed = self
            .offset_store()
            .group(&request.group_id)
            .cloned()
            .unwrap_or_default();
        if committed.is_empty() {
            return Err(BrokerError::UnknownGroup {
                group: request.group_id.clone(),
            });
        }
        let count =
            self.partition_count(&request.topic)
                .ok_or_else(|| BrokerError::UnknownTopic {
                    topic: request.topic.clone(),
                })?;
        let to = request.to.ok_or_else(|| BrokerError::InvalidRequest {
            reason: "say where to reset to: earliest, latest, an offset, a timestamp or a shift"
                .into(),
        })?;
        let mut offsets = Vec::new();
        for index in 0..count {
            let partition = self.partition(&request.topic, index)?;
            let (start, end) = (partition.log_start_offset(), partition.high_watermark());
            let current = committed
                .get(&(request.topic.clone(), index))
                .map(|c| c.offset);
            let target = match to {
                v1::reset_offsets_request::To::Earliest(_) => start,
                v1::reset_offsets_request::To::Latest(_) => end,
                v1::reset_offsets_request::To::Offset(offset) => offset,
                v1::reset_offsets_request::To::TimestampMs(ts) => {
                    partition.offset_for_timestamp(ts)?
                }
                v1::reset_offsets_request::To::ShiftBy(shift) => {
                    current.unwrap_or(start).saturating_add(shift)
                }
            }
            .clamp(start, end);
            offsets.push(v1::OffsetCommit {
                topic: request.topic.clone(),
                partition: index,
                offset: target,
                metadata: String::new(),
            });
        }
        let now = now_ms();
        let response = v1::ResetOffsetsResponse {
            offsets: offsets
                .iter()
                .map(|c| v1::CommittedOffset {
                    topic: c.topic.clone(),
                    partition: c.partition,
                    offset: c.offset,
                    metadata: String::new(),
                    commit_timestamp_ms: now,
                })
                .collect(),
        };
        if !request.dry_run {
            self.commit_offsets(v1::CommitOffsetsRequest {
                group_id: request.group_id,
                member_id: String::new(),
                member_epoch: 0,
                offsets,
                ..Default::default()
            })
            .await?;
        }
        Ok(response)
    }

    /// Deletes a group's committed offsets (tombstones in `__consumer_offsets`).
    ///
    /// # Errors
    /// Live members, an unknown group, or a storage failure.
    pub async fn delete_group(&self, group_id: &str) -> Result<(), BrokerError> {
        let partition = self.check_coordinator(group_id)?;
        self.require_no_members(group_id)?;
        let committed = self
            .offset_store()
            .group(group_id)
            .cloned()
            .unwrap_or_default();
        if committed.is_empty() {
            return Err(BrokerError::UnknownGroup {
                group: group_id.to_string(),
            });
        }
        let now = now_ms();
        let tombstones: Vec<Record> = committed
            .keys()
            .map(|(topic, partition)| Record {
                offset: 0,
                timestamp_ms: now,
                key: Some(encode_key(group_id, topic, *partition)),
                value: None,
                headers: Vec::new(),
            })
            .collect();
        let appended = self.append_internal(&partition, &tombstones)?;
        self.await_internal(&partition, appended.end_offset).await?;
        let mut store = self.offset_store();
        for (topic, partition) in committed.keys() {
            store.apply(group_id, topic, *partition, None);
        }
        Ok(())
    }
}

/// What replaying a `__consumer_offsets` partition finds, in log order.
enum Replayed {
    /// A record, with the producer id when a transaction wrote it.
    Stored(Option<i64>, Stored),
    /// A producer's transaction ended (commit or abort).
    End(i64, bool),
}

impl Broker {
    /// The `__consumer_offsets` partitions this broker coordinates, with the leader epoch
    /// whose log it replayed.
    fn coordinated_partitions(&self) -> HashMap<u32, i32> {
        self.coordination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The group's `__consumer_offsets` partition, when this broker leads it.
    fn offsets_partition_led(&self, group_id: &str) -> Result<Arc<Partition>, BrokerError> {
        let index = partition_for_group(group_id);
        match self.hosted_partition(OFFSETS_TOPIC, index) {
            Some(partition) if partition.is_leader() => Ok(partition),
            _ => Err(self.not_coordinator(group_id, index)),
        }
    }

    /// The partition holding the group's state, when this broker coordinates the group.
    ///
    /// # Errors
    /// An invalid group id, or NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE or
    /// COORDINATOR_LOAD_IN_PROGRESS.
    fn check_coordinator(&self, group_id: &str) -> Result<Arc<Partition>, BrokerError> {
        validate_group_id(group_id)?;
        let partition = self.offsets_partition_led(group_id)?;
        let loaded = self
            .coordination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition.index)
            .copied();
        if loaded != Some(partition.leader_epoch()) {
            return Err(BrokerError::CoordinatorLoadInProgress {
                group: group_id.to_string(),
            });
        }
        Ok(partition)
    }

    /// Why this broker does not coordinate a group, per the applied metadata.
    fn not_coordinator(&self, group_id: &str, index: u32) -> BrokerError {
        let group = group_id.to_string();
        let image = self.image();
        let record = image
            .metadata
            .topics
            .get(OFFSETS_TOPIC)
            .and_then(|t| t.partitions.get(index as usize));
        match record {
            None => BrokerError::CoordinatorNotAvailable {
                group,
                reason: format!("the internal topic {OFFSETS_TOPIC} is not created yet"),
            },
            Some(p) if p.leader == NO_LEADER => BrokerError::CoordinatorNotAvailable {
                group,
                reason: format!("partition {index} of {OFFSETS_TOPIC} has no leader"),
            },
            Some(p) if p.leader == self.config.node_id => {
                BrokerError::CoordinatorLoadInProgress { group }
            }
            Some(p) => BrokerError::NotCoordinator {
                group,
                coordinator: format!("broker {} coordinates it", p.leader),
            },
        }
    }

    /// Which broker coordinates `group_id`, per this broker's applied metadata.
    ///
    /// # Errors
    /// An invalid group id, or the group's partition has no leader (or does not exist).
    pub fn find_coordinator(
        &self,
        group_id: &str,
    ) -> Result<v1::FindCoordinatorResponse, BrokerError> {
        validate_group_id(group_id)?;
        let index = partition_for_group(group_id);
        let image = self.image();
        let leader = image
            .metadata
            .topics
            .get(OFFSETS_TOPIC)
            .and_then(|t| t.partitions.get(index as usize))
            .map(|p| p.leader)
            .filter(|leader| *leader != NO_LEADER);
        let broker = leader.and_then(|id| image.metadata.broker(id));
        match broker {
            Some(broker) => Ok(v1::FindCoordinatorResponse {
                node_id: broker.id,
                address: broker.address.clone(),
            }),
            None => Err(self.not_coordinator(group_id, index)),
        }
    }

    /// Follows the leadership of the `__consumer_offsets` partitions after a metadata
    /// image was applied: drops the groups of partitions this broker no longer leads (or
    /// leads in a new epoch), and replays the log of those it now leads. Blocks (it reads
    /// logs): call it from a blocking thread.
    pub(crate) fn sync_coordination(&self) {
        let led: HashMap<u32, Arc<Partition>> = self
            .hosted(OFFSETS_TOPIC)
            .into_iter()
            .filter(|p| p.is_leader())
            .map(|p| (p.index, p))
            .collect();
        let mut coordination = self
            .coordination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let lost: Vec<u32> = coordination
            .iter()
            .filter(|(index, epoch)| led.get(index).is_none_or(|p| p.leader_epoch() != **epoch))
            .map(|(index, _)| *index)
            .collect();
        for index in lost {
            coordination.remove(&index);
            self.drop_groups_of(index);
            tracing::info!(
                partition = index,
                "no longer coordinating the groups of {OFFSETS_TOPIC} partition"
            );
        }
        for (index, partition) in led {
            if coordination.contains_key(&index) {
                continue;
            }
            let epoch = partition.leader_epoch();
            match self.replay_groups(&partition) {
                Ok(groups) => {
                    coordination.insert(index, epoch);
                    tracing::info!(
                        partition = index,
                        leader_epoch = epoch,
                        groups,
                        "coordinating the groups of {OFFSETS_TOPIC} partition"
                    );
                }
                Err(err) => {
                    // The partition stays unloaded: its groups get
                    // COORDINATOR_LOAD_IN_PROGRESS, every other group is served.
                    tracing::error!(partition = index, error = %err, "cannot replay the groups of {OFFSETS_TOPIC} partition");
                }
            }
        }
    }

    fn drop_groups_of(&self, index: u32) {
        let keep = |group: &str| partition_for_group(group) != index;
        self.coordinator().retain(keep);
        self.offset_store().retain(keep);
    }

    /// Replaces the in-memory state of the partition's groups with what its log holds,
    /// up to its log end; returns how many groups have members or offsets.
    fn replay_groups(&self, partition: &Partition) -> Result<usize, BrokerError> {
        let end = partition.log_end_offset();
        let mut offset = partition.log_start_offset();
        let mut stored = Vec::new();
        while offset < end {
            let fetched = partition.read_below(offset, 4 * 1024 * 1024, end, &self.read_buffers)?;
            if fetched.records.is_empty() {
                break;
            }
            for batch in runnel_batch::batches(&fetched.records) {
                let corrupt = |err: runnel_batch::BatchError| BrokerError::Storage {
                    topic: OFFSETS_TOPIC.to_string(),
                    partition: partition.index,
                    reason: err.to_string(),
                };
                let (header, raw) = batch.map_err(corrupt)?;
                if header.next_offset() <= offset {
                    continue;
                }
                if header.is_control() {
                    if let Ok(kind) = runnel_batch::control_type(raw) {
                        let commit = kind == runnel_batch::ControlType::Commit;
                        stored.push(Replayed::End(header.producer_id, commit));
                    }
                    continue;
                }
                let records = runnel_batch::decode_records(raw).map_err(corrupt)?;
                let producer = header.is_transactional().then_some(header.producer_id);
                for record in records.into_iter().filter(|r| r.offset >= offset) {
                    match decode_record(record.key.as_deref(), record.value.as_deref()) {
                        Some(item) => stored.push(Replayed::Stored(producer, item)),
                        None => tracing::warn!(
                            partition = partition.index,
                            offset = record.offset,
                            "skipping a malformed record in {OFFSETS_TOPIC}"
                        ),
                    }
                }
            }
            offset = fetched.next_offset;
        }
        self.drop_groups_of(partition.index);
        let now = now_ms();
        let mut memberships = BTreeMap::new();
        let mut groups = BTreeSet::new();
        let mut store = self.offset_store();
        for item in stored {
            match item {
                Replayed::Stored(
                    producer,
                    Stored::Offset {
                        group,
                        topic,
                        partition: index,
                        value,
                    },
                ) => {
                    match (producer, value) {
                        (Some(producer), Some(value)) => {
                            store.stage(producer, &group, &topic, index, value);
                        }
                        (_, value) => store.apply(&group, &topic, index, value),
                    }
                    groups.insert(group);
                }
                Replayed::Stored(_, Stored::Group { group, value }) => {
                    memberships.insert(group, value);
                }
                Replayed::End(producer, commit) => {
                    store.end_transaction(producer, commit, partition.index);
                }
            }
        }
        drop(store);
        let mut coordinator = self.coordinator();
        for (group, value) in memberships {
            if value.is_some() {
                groups.insert(group.clone());
            }
            coordinator.restore(&group, value, now);
        }
        Ok(groups.len())
    }
}
