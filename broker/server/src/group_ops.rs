//! The broker's consumer-group operations: membership through [`crate::group`], committed
//! offsets through [`crate::offsets`] and the `__consumer_offsets` topic.

use std::collections::{BTreeMap, BTreeSet};

use runnel_batch::{BatchOptions, Record};
use runnel_proto::v1;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::group::{
    HEARTBEAT_INTERVAL_MS, Heartbeat, HeartbeatOutcome, TopicPartition, validate_group_id,
};
use crate::now_ms;
use crate::offsets::{
    Committed, METADATA_BYTES_MAX, OFFSETS_TOPIC, encode_key, encode_value, partition_for_group,
};

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
    /// Invalid group id, unknown member, or a subscription to an unknown topic.
    pub fn group_heartbeat(
        &self,
        request: v1::HeartbeatRequest,
        host: String,
    ) -> Result<v1::HeartbeatResponse, BrokerError> {
        if request.member_epoch != -1 {
            for topic in &request.topics {
                if self.partition_count(topic).is_none() {
                    return Err(BrokerError::UnknownTopic {
                        topic: topic.clone(),
                    });
                }
            }
        }
        let heartbeat = Heartbeat {
            group_id: request.group_id.clone(),
            member_id: request.member_id,
            member_epoch: request.member_epoch,
            client_id: request.client_id,
            host,
            topics: request.topics,
            session_timeout_ms: request.session_timeout_ms,
            owned: from_proto(&request.owned),
        };
        let counts = |topic: &str| self.partition_count(topic);
        let outcome = self.coordinator().heartbeat(heartbeat, &counts, now_ms())?;
        Ok(match outcome {
            HeartbeatOutcome::Member {
                member_id,
                epoch,
                assignment,
            } => v1::HeartbeatResponse {
                member_id,
                member_epoch: epoch,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                assignment: to_proto(&assignment),
            },
            HeartbeatOutcome::Left => v1::HeartbeatResponse {
                member_epoch: -1,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                ..Default::default()
            },
        })
    }

    pub(crate) fn expire_members(&self, now: i64) {
        for (group, member) in self.coordinator().expire(now) {
            tracing::info!(
                group,
                member,
                "member session expired; its partitions are reassigned"
            );
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
        validate_group_id(&request.group_id)?;
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
        self.write_offsets(&request.group_id, &records).await?;
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

    async fn write_offsets(&self, group: &str, records: &[Record]) -> Result<(), BrokerError> {
        let partition = self.partition(OFFSETS_TOPIC, partition_for_group(group))?;
        let batch = runnel_batch::encode(records, BatchOptions::default());
        let appended = partition.append(&batch)?;
        partition.wait_durable(appended.end_offset).await
    }

    pub fn fetch_offsets(&self, request: &v1::FetchOffsetsRequest) -> v1::FetchOffsetsResponse {
        let store = self.offset_store();
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
        v1::FetchOffsetsResponse { offsets }
    }

    pub fn list_groups(&self) -> v1::ListGroupsResponse {
        let coordinator = self.coordinator();
        let store = self.offset_store();
        let ids: BTreeSet<&String> = coordinator.group_ids().chain(store.group_ids()).collect();
        let groups = ids
            .into_iter()
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
        validate_group_id(&request.group_id)?;
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
        validate_group_id(group_id)?;
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
        self.write_offsets(group_id, &tombstones).await?;
        let mut store = self.offset_store();
        for (topic, partition) in committed.keys() {
            store.apply(group_id, topic, *partition, None);
        }
        Ok(())
    }
}
