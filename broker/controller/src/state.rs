//! The cluster metadata the controller log carries, and the commands that change it.
//!
//! [`ClusterMetadata::apply`] is the state machine: every controller applies the same
//! committed commands in the same order and reaches the same metadata, so it depends on
//! nothing but the command and the metadata before it (no clock, no randomness, no I/O).
//! Validation lives here too, so that a command checked against an older image and
//! proposed later is checked again, in log order, when it applies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::security::{AclFilter, AclRecord, CredentialRecord, UserRecord};

/// A broker's id (`node.id`). Ids start at 1; 0 means "no broker" in a partition's leader.
pub type BrokerId = u32;

/// The leader of a partition that has none (every in-sync replica is fenced).
pub const NO_LEADER: BrokerId = 0;
/// Longest topic name accepted (Kafka's limit).
pub const TOPIC_NAME_LENGTH_MAX: usize = 249;
/// Most partitions a topic may have.
pub const PARTITIONS_MAX: u32 = 10_000;
/// The topic config (and broker default) that allows electing an out-of-sync replica.
pub const UNCLEAN_ELECTION_KEY: &str = "unclean.leader.election.enable";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerRecord {
    pub id: BrokerId,
    pub address: String,
    /// Changes at every start of the broker's process.
    #[serde(default)]
    pub incarnation: String,
    /// A fenced broker missed its heartbeats: it leads nothing until it is back.
    #[serde(default)]
    pub fenced: bool,
    /// Stopping (controlled shutdown): it leads nothing and joins no ISR until its
    /// process registers again.
    #[serde(default)]
    pub shutting_down: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRecord {
    /// [`NO_LEADER`] while the partition is offline.
    pub leader: BrokerId,
    /// Bumped at every change of leader: batches carry it, and a replica truncates by it.
    pub leader_epoch: i32,
    pub replicas: Vec<BrokerId>,
    pub isr: Vec<BrokerId>,
    /// Bumped by every change of the leader or the ISR: a leader's ISR change names the
    /// epoch it saw, so that a change based on stale state is refused.
    #[serde(default)]
    pub partition_epoch: i32,
    /// The replicas a reassignment moves the partition to, while it runs (KIP-455);
    /// empty otherwise. Meanwhile `replicas` holds these first, then the ones leaving;
    /// once every one of these is in the ISR, they become the replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target: Vec<BrokerId>,
}

impl PartitionRecord {
    /// Replicas catching up for a reassignment: in the target, not yet in the ISR.
    pub fn catching_up(&self) -> Vec<BrokerId> {
        self.target
            .iter()
            .copied()
            .filter(|r| !self.isr.contains(r))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicRecord {
    /// Unique over the cluster's life: a topic deleted and created again gets a new id,
    /// so that a broker never mistakes the old topic's log for the new one.
    #[serde(default)]
    pub id: u64,
    pub replication_factor: u32,
    pub partitions: Vec<PartitionRecord>,
    /// Only the overrides; defaults come from the broker config.
    pub configs: BTreeMap<String, String>,
    pub internal: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMetadata {
    /// Empty until the quorum's first leader bootstraps the cluster.
    pub cluster_id: String,
    /// Sorted by id.
    pub brokers: Vec<BrokerRecord>,
    pub topics: BTreeMap<String, TopicRecord>,
    /// The next topic id to hand out.
    #[serde(default)]
    pub next_topic_id: u64,
    /// Bytes per second a leader sends to all replicas catching up for a reassignment
    /// together; 0: no limit. Set by the reassignment that starts, cleared when the last
    /// one finishes.
    #[serde(default)]
    pub reassignment_throttle_bytes: u64,
    /// The first producer id not handed out yet.
    #[serde(default)]
    pub next_producer_id: i64,
    /// SCRAM users, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, UserRecord>,
    /// Sorted, without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acls: Vec<AclRecord>,
}

/// Most producer ids one `AllocateProducerIds` hands out.
pub const PRODUCER_ID_BLOCK_MAX: u32 = 100_000;

/// Replicas of each internal topic partition, when as many brokers are live.
pub const INTERNAL_REPLICATION_FACTOR: usize = 3;

/// A change to the metadata, as proposed to the quorum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Names the cluster (only the first name applies) and takes in the metadata of a
    /// single-node data directory from before the quorum (`metadata.json`) when the
    /// proposer has one. Imported topics whose names exist already are kept as they are,
    /// so proposing the same import twice changes nothing.
    Bootstrap {
        cluster_id: String,
        import: Option<ClusterMetadata>,
    },
    /// A broker's process started (or its address changed). Leaderships it held under an
    /// earlier incarnation get a new leader epoch: a restart is a new leadership.
    RegisterBroker {
        id: BrokerId,
        address: String,
        incarnation: String,
    },
    /// The broker missed its heartbeats: its leaderships move to other in-sync replicas,
    /// or the partition goes offline when there is none.
    FenceBroker {
        id: BrokerId,
    },
    /// A fenced broker heartbeats again: it leads the offline partitions it is in sync for.
    UnfenceBroker {
        id: BrokerId,
    },
    /// A broker about to stop hands its leaderships to in-sync peers and leaves the
    /// ISRs (Kafka's controlled shutdown), so that its exit interrupts nothing.
    ShutdownBroker {
        id: BrokerId,
        incarnation: String,
    },
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u32,
        configs: BTreeMap<String, String>,
        internal: bool,
    },
    DeleteTopic {
        name: String,
    },
    SetConfigs {
        name: String,
        configs: BTreeMap<String, String>,
    },
    AddPartitions {
        name: String,
        total: u32,
    },
    /// A leader's change of its partition's ISR (shrink or expand), valid only while
    /// `leader`, `leader_epoch` and `partition_epoch` are still current.
    AlterIsr {
        topic: String,
        partition: u32,
        leader: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: Vec<BrokerId>,
    },
    /// Makes `leader` lead the partition. Without `unclean`, only a live ISR member may;
    /// with it, any live replica, which becomes the whole ISR (what the old ISR had
    /// beyond its log is lost).
    ElectLeader {
        topic: String,
        partition: u32,
        leader: BrokerId,
        unclean: bool,
    },
    /// Gives each listed partition back to its preferred replica (the first of its
    /// replicas) where that replica is live, in the ISR and not leading it already;
    /// partitions where it is not are left alone.
    ElectPreferred {
        partitions: Vec<(String, u32)>,
    },
    /// A broker's replica of a partition failed (its disk is full, or it failed an
    /// I/O): when another live ISR member exists, it takes over the leadership and the
    /// failed replica leaves the ISR until it has caught up again. Otherwise nothing
    /// changes (the failed replica is all there is).
    ReplicaOffline {
        topic: String,
        partition: u32,
        broker: BrokerId,
    },
    /// Moves partitions to new replica lists (the first one preferred): the new replicas
    /// catch up as followers, and once all are in the ISR the old ones leave. A
    /// partition whose list is what it has already is left alone.
    Reassign {
        partitions: Vec<(String, u32, Vec<BrokerId>)>,
        /// Bytes per second for catching up, over all reassignments; 0: no limit.
        throttle_bytes: u64,
    },
    /// Hands a broker the next `count` producer ids (KIP-730): ids are unique in the
    /// cluster because only the metadata log hands them out.
    AllocateProducerIds {
        count: u32,
    },
    /// Creates a user, or replaces its credential for one mechanism (its other
    /// mechanisms' credentials stay). With `create_only`, refused when the user exists.
    UpsertUser {
        name: String,
        mechanism: String,
        credential: CredentialRecord,
        create_only: bool,
    },
    DeleteUser {
        name: String,
    },
    /// Adds ACLs; ones that exist already are left as they are.
    CreateAcls {
        acls: Vec<AclRecord>,
    },
    /// Removes every ACL the filter matches.
    DeleteAcls {
        filter: AclFilter,
    },
}

/// What an applied command produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Topic(TopicRecord),
    /// Producer ids `first..first + count` belong to the proposer.
    ProducerIds {
        first: i64,
        count: u32,
    },
    /// The ACLs a `DeleteAcls` removed.
    Acls(Vec<AclRecord>),
}

/// A command the metadata refused; the message says which rule was broken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("unknown topic {topic:?}")]
    UnknownTopic { topic: String },
    #[error("invalid topic name {name:?}: {rule}")]
    InvalidTopicName { name: String, rule: String },
    #[error("topic {name:?} already exists")]
    TopicAlreadyExists { name: String },
    #[error("invalid partition count: {reason}")]
    InvalidPartitions { reason: String },
    #[error("invalid replication factor {requested}: {reason}")]
    InvalidReplicationFactor { requested: u32, reason: String },
    #[error("{reason}")]
    InvalidRequest { reason: String },
    #[error("stale partition state: {reason}")]
    StaleEpoch { reason: String },
    #[error("unknown user {name:?}")]
    UnknownUser { name: String },
    #[error(
        "user {name:?} already exists; change its password with `runnel user set-password {name}`"
    )]
    UserAlreadyExists { name: String },
}

/// The result of applying a command, as the proposer sees it.
pub type CommandResult = Result<Outcome, MetadataError>;

/// Checks a topic name against the rules users rely on; the error names the rule.
///
/// # Errors
/// [`MetadataError::InvalidTopicName`] for a broken rule, including a name that collides
/// with an existing one because `.` and `_` are interchangeable in metric names.
pub fn validate_topic_name<'a>(
    name: &str,
    existing: impl Iterator<Item = &'a str>,
    allow_internal: bool,
) -> Result<(), MetadataError> {
    let invalid = |rule: String| MetadataError::InvalidTopicName {
        name: name.to_string(),
        rule,
    };
    if name.is_empty() {
        return Err(invalid("a topic name may not be empty".into()));
    }
    if name == "." || name == ".." {
        return Err(invalid("a topic name may not be \".\" or \"..\"".into()));
    }
    if name.len() > TOPIC_NAME_LENGTH_MAX {
        return Err(invalid(format!(
            "a topic name may have at most {TOPIC_NAME_LENGTH_MAX} characters, this one has {}",
            name.len()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!(
            "character {bad:?} is not allowed; use only ASCII letters, digits, '.', '_' and '-'"
        )));
    }
    if name.starts_with("__") && !allow_internal {
        return Err(invalid(
            "names beginning with \"__\" are reserved for internal topics".into(),
        ));
    }
    let normalized = name.replace('.', "_");
    for other in existing {
        if other != name && other.replace('.', "_") == normalized {
            return Err(invalid(format!(
                "it collides with existing topic {other:?}: names that differ only by '.' versus '_' are not allowed"
            )));
        }
    }
    Ok(())
}

impl ClusterMetadata {
    /// # Errors
    /// [`MetadataError::UnknownTopic`].
    pub fn topic(&self, name: &str) -> Result<&TopicRecord, MetadataError> {
        self.topics
            .get(name)
            .ok_or_else(|| MetadataError::UnknownTopic {
                topic: name.to_string(),
            })
    }

    pub fn broker(&self, id: BrokerId) -> Option<&BrokerRecord> {
        self.brokers.iter().find(|b| b.id == id)
    }

    /// Brokers that may lead and hold new replicas, by id.
    pub fn live_brokers(&self) -> Vec<BrokerId> {
        self.brokers
            .iter()
            .filter(|b| !b.fenced && !b.shutting_down)
            .map(|b| b.id)
            .collect()
    }

    /// Checks a topic creation without changing anything, and returns the topic as it
    /// would be created.
    ///
    /// # Errors
    /// The rule that was broken.
    pub fn check_create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        configs: &BTreeMap<String, String>,
        internal: bool,
    ) -> Result<TopicRecord, MetadataError> {
        if self.topics.contains_key(name) {
            return Err(MetadataError::TopicAlreadyExists {
                name: name.to_string(),
            });
        }
        validate_topic_name(name, self.topics.keys().map(String::as_str), internal)?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(MetadataError::InvalidPartitions {
                reason: format!(
                    "{partitions} requested; a topic needs between 1 and {PARTITIONS_MAX} partitions"
                ),
            });
        }
        let live = self.live_brokers();
        let count = live.len() as u32;
        if replication_factor == 0 || replication_factor > count {
            return Err(MetadataError::InvalidReplicationFactor {
                requested: replication_factor,
                reason: format!(
                    "it must be between 1 and the number of live brokers ({count}); the cluster has {count} live broker{}",
                    if count == 1 { "" } else { "s" }
                ),
            });
        }
        let start = placement_start(name, count);
        Ok(TopicRecord {
            id: self.next_topic_id,
            replication_factor,
            partitions: (0..partitions)
                .map(|p| place(&live, start + p as usize, replication_factor))
                .collect(),
            configs: configs.clone(),
            internal,
        })
    }

    /// Checks growing a topic to `total` partitions and returns the new partitions.
    ///
    /// # Errors
    /// Unknown topic, a total not larger than today's or above the limit, or too few
    /// live brokers for the replication factor.
    pub fn check_add_partitions(
        &self,
        name: &str,
        total: u32,
    ) -> Result<Vec<PartitionRecord>, MetadataError> {
        let topic = self.topic(name)?;
        let current = topic.partitions.len() as u32;
        if total <= current {
            return Err(MetadataError::InvalidPartitions {
                reason: format!(
                    "topic {name:?} has {current} partitions; the new total must be larger ({total} requested) because partitions can be added but never removed"
                ),
            });
        }
        if total > PARTITIONS_MAX {
            return Err(MetadataError::InvalidPartitions {
                reason: format!("{total} requested; at most {PARTITIONS_MAX} partitions per topic"),
            });
        }
        let live = self.live_brokers();
        let rf = topic.replication_factor;
        if (live.len() as u32) < rf {
            return Err(MetadataError::InvalidReplicationFactor {
                requested: rf,
                reason: format!(
                    "topic {name:?} has replication factor {rf} but only {} broker(s) are live",
                    live.len()
                ),
            });
        }
        let start = placement_start(name, live.len() as u32);
        Ok((current..total)
            .map(|p| place(&live, start + p as usize, rf))
            .collect())
    }

    /// Applies one committed command. Deterministic: the same command on the same
    /// metadata gives the same result on every controller.
    pub fn apply(&mut self, command: Command) -> CommandResult {
        match command {
            Command::Bootstrap { cluster_id, import } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id;
                }
                if let Some(metadata) = import {
                    self.import(metadata);
                }
                Ok(Outcome::Done)
            }
            Command::RegisterBroker {
                id,
                address,
                incarnation,
            } => {
                if id == NO_LEADER {
                    return Err(MetadataError::InvalidRequest {
                        reason: "broker id 0 is reserved; node ids start at 1".into(),
                    });
                }
                let restarted = match self.brokers.iter_mut().find(|b| b.id == id) {
                    Some(broker) => {
                        let restarted = broker.incarnation != incarnation;
                        broker.address = address;
                        broker.incarnation = incarnation;
                        broker.fenced = false;
                        broker.shutting_down = false;
                        restarted
                    }
                    None => {
                        self.brokers.push(BrokerRecord {
                            id,
                            address,
                            incarnation,
                            fenced: false,
                            shutting_down: false,
                        });
                        self.brokers.sort_by_key(|b| b.id);
                        true
                    }
                };
                if restarted {
                    // A new process holds nothing of the old one: it leaves the ISRs it
                    // was in (it must catch up again) and hands its leaderships to
                    // in-sync peers; where it was the only in-sync replica it leads
                    // again, under a new epoch.
                    self.drop_from_partitions(id);
                }
                self.elect_offline_for(id);
                Ok(Outcome::Done)
            }
            Command::FenceBroker { id } => {
                self.set_fenced(id, true)?;
                self.drop_from_partitions(id);
                Ok(Outcome::Done)
            }
            Command::UnfenceBroker { id } => {
                self.set_fenced(id, false)?;
                self.elect_offline_for(id);
                Ok(Outcome::Done)
            }
            Command::ShutdownBroker { id, incarnation } => {
                let Some(broker) = self
                    .brokers
                    .iter_mut()
                    .find(|b| b.id == id && b.incarnation == incarnation)
                else {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!("broker {id} has restarted since it asked to stop"),
                    });
                };
                broker.shutting_down = true;
                self.drop_from_partitions(id);
                Ok(Outcome::Done)
            }
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
                internal,
            } => {
                let topic = self.check_create_topic(
                    &name,
                    partitions,
                    replication_factor,
                    &configs,
                    internal,
                )?;
                self.next_topic_id += 1;
                self.topics.insert(name, topic.clone());
                Ok(Outcome::Topic(topic))
            }
            Command::DeleteTopic { name } => {
                let topic = self.topic(&name)?;
                if topic.internal {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!("{name:?} is an internal topic and cannot be deleted"),
                    });
                }
                self.topics.remove(&name);
                Ok(Outcome::Done)
            }
            Command::SetConfigs { name, configs } => {
                let topic = self.topic_mut(&name)?;
                topic.configs = configs;
                Ok(Outcome::Topic(topic.clone()))
            }
            Command::AddPartitions { name, total } => {
                let added = self.check_add_partitions(&name, total)?;
                let topic = self.topic_mut(&name)?;
                topic.partitions.extend(added);
                Ok(Outcome::Topic(topic.clone()))
            }
            Command::AlterIsr {
                topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
            } => self.alter_isr(
                &topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
            ),
            Command::ElectLeader {
                topic,
                partition,
                leader,
                unclean,
            } => self.elect_leader(&topic, partition, leader, unclean),
            Command::Reassign {
                partitions,
                throttle_bytes,
            } => self.reassign(partitions, throttle_bytes),
            Command::ReplicaOffline {
                topic,
                partition,
                broker,
            } => {
                let live = self.live_brokers();
                let record = self.partition_mut(&topic, partition)?;
                let next = record
                    .isr
                    .iter()
                    .copied()
                    .find(|r| *r != broker && live.contains(r));
                if let Some(next) = next {
                    record.isr.retain(|r| *r != broker);
                    if record.leader == broker {
                        record.leader = next;
                        record.leader_epoch += 1;
                    }
                    record.partition_epoch += 1;
                }
                Ok(Outcome::Done)
            }
            Command::AllocateProducerIds { count } => {
                if count == 0 || count > PRODUCER_ID_BLOCK_MAX {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!(
                            "{count} producer ids asked; between 1 and {PRODUCER_ID_BLOCK_MAX} at a time"
                        ),
                    });
                }
                let first = self.next_producer_id;
                self.next_producer_id += i64::from(count);
                Ok(Outcome::ProducerIds { first, count })
            }
            Command::UpsertUser {
                name,
                mechanism,
                credential,
                create_only,
            } => {
                runnel_proto::scram::validate_user_name(&name).map_err(|err| {
                    MetadataError::InvalidRequest {
                        reason: err.to_string(),
                    }
                })?;
                if runnel_proto::scram::Mechanism::parse(&mechanism).is_none() {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!("unknown SCRAM mechanism {mechanism:?}"),
                    });
                }
                if create_only && self.users.contains_key(&name) {
                    return Err(MetadataError::UserAlreadyExists { name });
                }
                self.users
                    .entry(name)
                    .or_default()
                    .credentials
                    .insert(mechanism, credential);
                Ok(Outcome::Done)
            }
            Command::DeleteUser { name } => match self.users.remove(&name) {
                Some(_) => Ok(Outcome::Done),
                None => Err(MetadataError::UnknownUser { name }),
            },
            Command::CreateAcls { acls } => {
                self.acls.extend(acls);
                self.acls.sort();
                self.acls.dedup();
                Ok(Outcome::Done)
            }
            Command::DeleteAcls { filter } => {
                let (removed, kept) = std::mem::take(&mut self.acls)
                    .into_iter()
                    .partition(|acl| filter.matches(acl));
                self.acls = kept;
                Ok(Outcome::Acls(removed))
            }
            Command::ElectPreferred { partitions } => {
                for (topic, partition) in partitions {
                    if let Some(preferred) = self.preferred_if_electable(&topic, partition) {
                        self.elect_leader(&topic, partition, preferred, false)?;
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }

    /// Takes in legacy single-node metadata: its cluster id while the cluster has no
    /// user topics yet, and the topics and brokers it does not know.
    fn import(&mut self, metadata: ClusterMetadata) {
        if self.topics.values().all(|t| t.internal) && !metadata.cluster_id.is_empty() {
            self.cluster_id = metadata.cluster_id;
        }
        for (name, mut topic) in metadata.topics {
            if self.topics.contains_key(&name) {
                continue;
            }
            topic.id = self.next_topic_id;
            self.next_topic_id += 1;
            // The process that led them is gone: whoever leads next does so under a
            // new epoch.
            for partition in &mut topic.partitions {
                partition.leader_epoch += 1;
            }
            self.topics.insert(name, topic);
        }
        for broker in metadata.brokers {
            if self.broker(broker.id).is_none() {
                self.brokers.push(BrokerRecord {
                    fenced: true,
                    ..broker
                });
            }
        }
        self.brokers.sort_by_key(|b| b.id);
    }

    fn topic_mut(&mut self, name: &str) -> Result<&mut TopicRecord, MetadataError> {
        self.topics
            .get_mut(name)
            .ok_or_else(|| MetadataError::UnknownTopic {
                topic: name.to_string(),
            })
    }

    fn set_fenced(&mut self, id: BrokerId, fenced: bool) -> Result<(), MetadataError> {
        let broker = self
            .brokers
            .iter_mut()
            .find(|b| b.id == id)
            .ok_or_else(|| MetadataError::InvalidRequest {
                reason: format!("unknown broker {id}"),
            })?;
        broker.fenced = fenced;
        Ok(())
    }

    fn each_partition(&mut self, mut f: impl FnMut(&mut PartitionRecord)) {
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                f(partition);
            }
        }
    }

    /// Elects `id` for the offline partitions whose ISR holds it.
    fn elect_offline_for(&mut self, id: BrokerId) {
        if !self.live_brokers().contains(&id) {
            return;
        }
        self.each_partition(|p| {
            if p.leader == NO_LEADER && p.isr.contains(&id) {
                p.leader = id;
                p.leader_epoch += 1;
                p.partition_epoch += 1;
            }
        });
    }

    /// Takes broker `id` (fenced, or restarted as a new process) out of every ISR and
    /// moves its leaderships to live in-sync replicas. The last ISR member stays: it
    /// alone has everything acknowledged, so a partition whose ISR is down to it waits
    /// for it, offline, rather than lose data (unless an unclean election is allowed).
    fn drop_from_partitions(&mut self, id: BrokerId) {
        let live = self.live_brokers();
        self.each_partition(|p| {
            if !p.isr.contains(&id) && p.leader != id {
                return;
            }
            let next = p
                .replicas
                .iter()
                .copied()
                .find(|r| *r != id && p.isr.contains(r) && live.contains(r));
            if p.isr.len() > 1 {
                p.isr.retain(|r| *r != id);
            }
            if p.leader == id {
                p.leader = match next {
                    Some(next) => next,
                    None if live.contains(&id) => id,
                    None => NO_LEADER,
                };
                p.leader_epoch += 1;
            }
            p.partition_epoch += 1;
        });
    }

    /// Checks and applies a leader's ISR change.
    fn alter_isr(
        &mut self,
        topic: &str,
        partition: u32,
        leader: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: Vec<BrokerId>,
    ) -> CommandResult {
        let live = self.live_brokers();
        let record = self.partition_mut(topic, partition)?;
        if record.leader != leader
            || record.leader_epoch != leader_epoch
            || record.partition_epoch != partition_epoch
        {
            return Err(MetadataError::StaleEpoch {
                reason: format!(
                    "{topic}-{partition} is led by {} at leader epoch {} and partition epoch {}; the change came from {leader} at {leader_epoch}/{partition_epoch}",
                    record.leader, record.leader_epoch, record.partition_epoch
                ),
            });
        }
        if !isr.contains(&leader) || isr.iter().any(|r| !record.replicas.contains(r)) {
            return Err(MetadataError::InvalidRequest {
                reason: format!(
                    "ISR {isr:?} of {topic}-{partition} must hold its leader and only its replicas {:?}",
                    record.replicas
                ),
            });
        }
        if let Some(dead) = isr
            .iter()
            .find(|r| !record.isr.contains(r) && !live.contains(r))
        {
            return Err(MetadataError::InvalidRequest {
                reason: format!(
                    "broker {dead} is fenced and cannot join the ISR of {topic}-{partition}"
                ),
            });
        }
        let mut isr = isr;
        isr.sort_unstable();
        isr.dedup();
        record.isr = isr;
        record.partition_epoch += 1;
        self.finish_reassignment(topic, partition, &live);
        Ok(Outcome::Done)
    }

    /// Checks every move, then starts them (all or none).
    fn reassign(
        &mut self,
        partitions: Vec<(String, u32, Vec<BrokerId>)>,
        throttle_bytes: u64,
    ) -> CommandResult {
        for (topic, partition, target) in &partitions {
            let record = self
                .topic(topic)?
                .partitions
                .get(*partition as usize)
                .ok_or_else(|| MetadataError::InvalidRequest {
                    reason: format!("{topic:?} has no partition {partition}"),
                })?;
            let mut unique = target.clone();
            unique.sort_unstable();
            unique.dedup();
            if target.is_empty() || unique.len() != target.len() {
                return Err(MetadataError::InvalidRequest {
                    reason: format!(
                        "{topic}-{partition}: the new replicas {target:?} must be a non-empty list without repeats"
                    ),
                });
            }
            if let Some(unknown) = target.iter().find(|b| self.broker(**b).is_none()) {
                return Err(MetadataError::InvalidRequest {
                    reason: format!(
                        "{topic}-{partition}: broker {unknown} is not registered (brokers: {})",
                        self.brokers
                            .iter()
                            .map(|b| b.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            if !record.target.is_empty() && record.target != *target {
                return Err(MetadataError::InvalidRequest {
                    reason: format!(
                        "{topic}-{partition} is being moved to {:?} already; wait until that finishes (`topic reassign --verify`)",
                        record.target
                    ),
                });
            }
        }
        let live = self.live_brokers();
        for (topic, partition, target) in partitions {
            let record = self.partition_mut(&topic, partition)?;
            if record.replicas == target || record.target == target {
                continue;
            }
            let leaving: Vec<BrokerId> = record
                .replicas
                .iter()
                .copied()
                .filter(|r| !target.contains(r))
                .collect();
            record.replicas = target.iter().copied().chain(leaving).collect();
            record.target = target;
            record.partition_epoch += 1;
            if throttle_bytes > 0 {
                self.reassignment_throttle_bytes = throttle_bytes;
            }
            self.finish_reassignment(&topic, partition, &live);
        }
        Ok(Outcome::Done)
    }

    /// Ends the partition's reassignment once every target replica is in the ISR: the
    /// target becomes the replica list, the leaving replicas leave the ISR, and a leader
    /// that is leaving hands over to the first live in-sync target replica under a new
    /// epoch. The throttle goes with the last reassignment.
    fn finish_reassignment(&mut self, topic: &str, partition: u32, live: &[BrokerId]) {
        let Ok(record) = self.partition_mut(topic, partition) else {
            return;
        };
        if record.target.is_empty() || !record.catching_up().is_empty() {
            return;
        }
        let target = std::mem::take(&mut record.target);
        record.isr.retain(|r| target.contains(r));
        if !target.contains(&record.leader) {
            record.leader = target
                .iter()
                .copied()
                .find(|r| live.contains(r) && record.isr.contains(r))
                .unwrap_or(NO_LEADER);
            record.leader_epoch += 1;
        }
        record.replicas = target;
        record.partition_epoch += 1;
        let moving = self
            .topics
            .values()
            .any(|t| t.partitions.iter().any(|p| !p.target.is_empty()));
        if !moving {
            self.reassignment_throttle_bytes = 0;
        }
    }

    /// Checks and applies an election.
    fn elect_leader(
        &mut self,
        topic: &str,
        partition: u32,
        leader: BrokerId,
        unclean: bool,
    ) -> CommandResult {
        let live = self.live_brokers();
        let record = self.partition_mut(topic, partition)?;
        if !record.replicas.contains(&leader) || !live.contains(&leader) {
            return Err(MetadataError::InvalidRequest {
                reason: format!(
                    "broker {leader} is not a live replica of {topic}-{partition} (replicas {:?})",
                    record.replicas
                ),
            });
        }
        if record.leader == leader {
            return Ok(Outcome::Done);
        }
        if !unclean && !record.isr.contains(&leader) {
            return Err(MetadataError::InvalidRequest {
                reason: format!(
                    "broker {leader} is not in the ISR {:?} of {topic}-{partition}; only an unclean election may choose it",
                    record.isr
                ),
            });
        }
        if unclean {
            record.isr = vec![leader];
        }
        record.leader = leader;
        record.leader_epoch += 1;
        record.partition_epoch += 1;
        Ok(Outcome::Done)
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<&mut PartitionRecord, MetadataError> {
        self.topic_mut(topic)?
            .partitions
            .get_mut(partition as usize)
            .ok_or_else(|| MetadataError::InvalidRequest {
                reason: format!("{topic:?} has no partition {partition}"),
            })
    }

    /// The preferred replica of a partition when a preferred election would move the
    /// leadership to it: it is live, in the ISR, and not the leader.
    pub fn preferred_if_electable(&self, topic: &str, partition: u32) -> Option<BrokerId> {
        let record = self.topics.get(topic)?.partitions.get(partition as usize)?;
        let preferred = *record.replicas.first()?;
        let eligible = record.leader != preferred
            && record.isr.contains(&preferred)
            && self.live_brokers().contains(&preferred);
        eligible.then_some(preferred)
    }

    /// Internal topics get min(3, live brokers) replicas: the moves that add replicas to
    /// internal partitions created when fewer brokers were live (new replicas spread
    /// round-robin from the partition's index; none for a partition already moving).
    pub fn internal_replicas_to_add(&self) -> Vec<(String, u32, Vec<BrokerId>)> {
        let live = self.live_brokers();
        let wanted = live.len().min(INTERNAL_REPLICATION_FACTOR);
        let mut moves = Vec::new();
        for (name, topic) in self.topics.iter().filter(|(_, t)| t.internal) {
            for (index, p) in topic.partitions.iter().enumerate() {
                if p.replicas.len() >= wanted || !p.target.is_empty() {
                    continue;
                }
                let mut target = p.replicas.clone();
                for i in 0..live.len() {
                    let candidate = live[(index + i) % live.len()];
                    if target.len() < wanted && !target.contains(&candidate) {
                        target.push(candidate);
                    }
                }
                moves.push((name.clone(), index as u32, target));
            }
        }
        moves
    }

    /// Every partition a preferred election would move.
    pub fn preferred_candidates(&self) -> Vec<(String, u32)> {
        self.topics
            .iter()
            .flat_map(|(name, topic)| {
                (0..topic.partitions.len() as u32).map(move |p| (name.clone(), p))
            })
            .filter(|(name, p)| self.preferred_if_electable(name, *p).is_some())
            .collect()
    }

    /// Partitions with no leader whose every ISR member is fenced, and a live replica
    /// outside the ISR that an unclean election could choose.
    pub fn unclean_candidates(&self) -> Vec<(String, u32, BrokerId)> {
        let live = self.live_brokers();
        let mut found = Vec::new();
        for (name, topic) in &self.topics {
            for (index, p) in topic.partitions.iter().enumerate() {
                if p.leader != NO_LEADER || p.isr.iter().any(|r| live.contains(r)) {
                    continue;
                }
                if let Some(candidate) = p.replicas.iter().find(|r| live.contains(r)) {
                    found.push((name.clone(), index as u32, *candidate));
                }
            }
        }
        found
    }
}

/// Where a topic's round-robin placement starts: varied by name, so that small topics do
/// not all land on the first broker.
fn placement_start(name: &str, brokers: u32) -> usize {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(brokers.max(1))) as usize
}

/// The replicas of one partition: `rf` consecutive live brokers from `at`; the first
/// leads.
fn place(live: &[BrokerId], at: usize, rf: u32) -> PartitionRecord {
    let replicas: Vec<BrokerId> = (0..rf as usize)
        .map(|i| live[(at + i) % live.len()])
        .collect();
    PartitionRecord {
        leader: replicas[0],
        leader_epoch: 0,
        isr: replicas.clone(),
        replicas,
        partition_epoch: 0,
        target: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(meta: &mut ClusterMetadata, id: BrokerId, incarnation: &str) {
        meta.apply(Command::RegisterBroker {
            id,
            address: format!("127.0.0.1:{id}"),
            incarnation: incarnation.into(),
        })
        .expect("register");
    }

    /// Metadata with brokers 1, 2 and 3 registered (incarnation "a") and live.
    fn three_brokers() -> ClusterMetadata {
        let mut meta = ClusterMetadata::default();
        for id in 1..=3 {
            register(&mut meta, id, "a");
        }
        meta
    }

    fn create(meta: &mut ClusterMetadata, name: &str, partitions: u32, rf: u32) -> CommandResult {
        meta.apply(Command::CreateTopic {
            name: name.into(),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
            internal: false,
        })
    }

    #[test]
    fn topic_name_rules_each_say_what_was_wrong() {
        let none = std::iter::empty();
        let cases = [
            ("", "may not be empty"),
            (".", "may not be \".\""),
            ("..", "may not be \".\""),
            ("a/b", "not allowed"),
            ("héllo", "not allowed"),
            ("__consumer_offsets", "reserved"),
        ];
        for (name, rule) in cases {
            let err = validate_topic_name(name, none.clone(), false).expect_err(name);
            assert!(err.to_string().contains(rule), "{name}: {err}");
        }
        assert!(validate_topic_name(&"a".repeat(250), none.clone(), false).is_err());
        assert!(validate_topic_name(&"a".repeat(249), none.clone(), false).is_ok());
        let err = validate_topic_name("my_topic", ["my.topic"].into_iter(), false)
            .expect_err("collision");
        assert!(err.to_string().contains("collides"), "{err}");
        assert!(validate_topic_name("__consumer_offsets", none, true).is_ok());
    }

    #[test]
    fn topics_are_validated_and_spread_over_live_brokers() {
        let mut meta = three_brokers();
        let err = create(&mut meta, "t", 3, 4).expect_err("rf > brokers");
        assert!(
            err.to_string().contains("4") && err.to_string().contains("live brokers (3)"),
            "{err}"
        );
        assert!(create(&mut meta, "t", 0, 1).is_err());
        let Ok(Outcome::Topic(topic)) = create(&mut meta, "t", 6, 1) else {
            panic!("create");
        };
        let mut leaders: Vec<BrokerId> = topic.partitions.iter().map(|p| p.leader).collect();
        leaders.sort_unstable();
        assert_eq!(leaders, vec![1, 1, 2, 2, 3, 3]);
        // Small topics start at different brokers.
        let firsts: std::collections::BTreeSet<BrokerId> = (0..20)
            .map(|i| {
                let Ok(Outcome::Topic(t)) = create(&mut meta, &format!("s{i}"), 1, 1) else {
                    panic!("create");
                };
                t.partitions[0].leader
            })
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
        assert!(matches!(
            create(&mut meta, "t", 1, 1),
            Err(MetadataError::TopicAlreadyExists { .. })
        ));
        let err = meta
            .apply(Command::AddPartitions {
                name: "t".into(),
                total: 2,
            })
            .expect_err("shrink");
        assert!(err.to_string().contains("never removed"), "{err}");
    }

    #[test]
    fn fencing_moves_leadership_to_the_isr_or_takes_the_partition_offline() {
        let mut meta = three_brokers();
        create(&mut meta, "one", 1, 1).expect("create");
        create(&mut meta, "three", 1, 3).expect("create");
        let one = meta.topics["one"].partitions[0].clone();
        let three = meta.topics["three"].partitions[0].clone();
        meta.apply(Command::FenceBroker { id: one.leader })
            .expect("fence");
        let after = &meta.topics["one"].partitions[0];
        assert_eq!(after.leader, NO_LEADER);
        assert_eq!(after.isr, one.isr, "the last in-sync replica stays");
        assert_eq!(after.leader_epoch, one.leader_epoch + 1);
        meta.apply(Command::UnfenceBroker { id: one.leader })
            .expect("unfence");
        let back = &meta.topics["one"].partitions[0];
        assert_eq!(back.leader, one.leader);
        assert_eq!(back.leader_epoch, one.leader_epoch + 2);

        meta.apply(Command::FenceBroker { id: three.leader })
            .expect("fence");
        let moved = &meta.topics["three"].partitions[0];
        assert_ne!(moved.leader, three.leader);
        assert_ne!(moved.leader, NO_LEADER);
        assert!(!moved.isr.contains(&three.leader));
        assert_eq!(moved.leader_epoch, three.leader_epoch + 1);
    }

    #[test]
    fn a_fenced_follower_leaves_the_isr_and_only_the_current_leader_changes_it() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 1, 3).expect("create");
        let p = meta.topics["t"].partitions[0].clone();
        let follower = *p
            .replicas
            .iter()
            .find(|r| **r != p.leader)
            .expect("a follower");
        meta.apply(Command::FenceBroker { id: follower })
            .expect("fence");
        let after = meta.topics["t"].partitions[0].clone();
        assert_eq!(
            after.leader, p.leader,
            "a follower's death moves no leadership"
        );
        assert_eq!(after.leader_epoch, p.leader_epoch);
        assert!(!after.isr.contains(&follower));
        assert!(after.partition_epoch > p.partition_epoch);

        let alter =
            |meta: &mut ClusterMetadata, leader, leader_epoch, partition_epoch, isr: Vec<u32>| {
                meta.apply(Command::AlterIsr {
                    topic: "t".into(),
                    partition: 0,
                    leader,
                    leader_epoch,
                    partition_epoch,
                    isr,
                })
            };
        let stale = alter(
            &mut meta,
            p.leader,
            p.leader_epoch,
            p.partition_epoch,
            p.replicas.clone(),
        );
        assert!(
            matches!(stale, Err(MetadataError::StaleEpoch { .. })),
            "{stale:?}"
        );
        let dead = alter(
            &mut meta,
            p.leader,
            after.leader_epoch,
            after.partition_epoch,
            p.replicas.clone(),
        );
        assert!(dead.is_err(), "a fenced broker cannot join: {dead:?}");
        meta.apply(Command::UnfenceBroker { id: follower })
            .expect("unfence");
        let now = meta.topics["t"].partitions[0].clone();
        alter(
            &mut meta,
            p.leader,
            now.leader_epoch,
            now.partition_epoch,
            p.replicas.clone(),
        )
        .expect("the leader's expansion");
        let grown = &meta.topics["t"].partitions[0];
        let mut all = p.replicas.clone();
        all.sort_unstable();
        assert_eq!(grown.isr, all);
        assert_eq!(grown.partition_epoch, now.partition_epoch + 1);
    }

    #[test]
    fn a_stopping_broker_hands_over_and_is_never_elected_until_it_registers_again() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 3, 3).expect("create");
        let refused = meta.apply(Command::ShutdownBroker {
            id: 1,
            incarnation: "old".into(),
        });
        assert!(refused.is_err(), "only the process that asked may stop");
        meta.apply(Command::ShutdownBroker {
            id: 1,
            incarnation: "a".into(),
        })
        .expect("shutdown");
        for p in &meta.topics["t"].partitions {
            assert_ne!(p.leader, 1);
            assert!(!p.isr.contains(&1));
        }
        assert!(!meta.live_brokers().contains(&1));
        register(&mut meta, 1, "b");
        assert!(meta.live_brokers().contains(&1));
    }

    #[test]
    fn a_restarted_follower_must_catch_up_and_unclean_elections_take_any_live_replica() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 1, 3).expect("create");
        let p = meta.topics["t"].partitions[0].clone();
        let follower = *p
            .replicas
            .iter()
            .find(|r| **r != p.leader)
            .expect("a follower");
        register(&mut meta, follower, "b");
        assert!(
            !meta.topics["t"].partitions[0].isr.contains(&follower),
            "a new process of a broker is out of the ISR until it catches up"
        );
        // Every ISR member dies; the out-of-sync follower lives.
        let isr = meta.topics["t"].partitions[0].isr.clone();
        for id in &isr {
            meta.apply(Command::FenceBroker { id: *id }).expect("fence");
        }
        let offline = meta.topics["t"].partitions[0].clone();
        assert_eq!(offline.leader, NO_LEADER);
        assert_eq!(
            meta.unclean_candidates(),
            vec![("t".to_string(), 0, follower)]
        );
        let clean = meta.apply(Command::ElectLeader {
            topic: "t".into(),
            partition: 0,
            leader: follower,
            unclean: false,
        });
        assert!(clean.is_err(), "a clean election needs an ISR member");
        meta.apply(Command::ElectLeader {
            topic: "t".into(),
            partition: 0,
            leader: follower,
            unclean: true,
        })
        .expect("unclean election");
        let elected = &meta.topics["t"].partitions[0];
        assert_eq!(elected.leader, follower);
        assert_eq!(elected.isr, vec![follower]);
        assert!(elected.leader_epoch > offline.leader_epoch);
    }

    #[test]
    fn a_restarted_broker_leads_under_a_new_epoch() {
        let mut meta = ClusterMetadata::default();
        register(&mut meta, 1, "a");
        create(&mut meta, "t", 2, 1).expect("create");
        register(&mut meta, 1, "a");
        assert!(
            meta.topics["t"]
                .partitions
                .iter()
                .all(|p| p.leader_epoch == 0)
        );
        register(&mut meta, 1, "b");
        assert!(
            meta.topics["t"]
                .partitions
                .iter()
                .all(|p| p.leader == 1 && p.leader_epoch == 1)
        );
    }

    #[test]
    fn import_keeps_the_old_cluster_and_its_topics() {
        let legacy = r#"{"cluster_id":"runnel-old","controller_id":1,
            "brokers":[{"id":1,"address":"127.0.0.1:7070"}],
            "topics":{"orders":{"replication_factor":1,"partitions":[
                {"leader":1,"leader_epoch":4,"replicas":[1],"isr":[1]}],
                "configs":{"retention.ms":"1000"},"internal":false}}}"#;
        let metadata: ClusterMetadata = serde_json::from_str(legacy).expect("legacy parses");
        let mut meta = ClusterMetadata::default();
        meta.apply(Command::Bootstrap {
            cluster_id: "new".into(),
            import: Some(metadata.clone()),
        })
        .expect("bootstrap");
        meta.apply(Command::Bootstrap {
            cluster_id: "other".into(),
            import: Some(metadata),
        })
        .expect("import twice");
        assert_eq!(meta.topics.len(), 1);
        register(&mut meta, 1, "x");
        assert_eq!(meta.cluster_id, "runnel-old");
        let orders = &meta.topics["orders"];
        assert_eq!(orders.configs["retention.ms"], "1000");
        assert!(orders.partitions[0].leader_epoch > 4);
    }

    #[test]
    fn a_preferred_election_returns_leadership_to_a_live_in_sync_first_replica() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 3, 3).expect("create");
        let preferred = meta.topics["t"].partitions[0].replicas[0];
        assert!(
            meta.preferred_candidates().is_empty(),
            "every leader is preferred"
        );
        meta.apply(Command::FenceBroker { id: preferred })
            .expect("fence");
        let moved = meta.topics["t"].partitions[0].clone();
        assert_ne!(moved.leader, preferred);
        // Back, but not in the ISR yet: nothing to elect.
        register(&mut meta, preferred, "b");
        assert_eq!(meta.preferred_if_electable("t", 0), None);
        meta.apply(Command::AlterIsr {
            topic: "t".into(),
            partition: 0,
            leader: moved.leader,
            leader_epoch: moved.leader_epoch,
            partition_epoch: moved.partition_epoch,
            isr: vec![1, 2, 3],
        })
        .expect("rejoin");
        let candidates = meta.preferred_candidates();
        assert!(candidates.contains(&("t".to_string(), 0)), "{candidates:?}");
        meta.apply(Command::ElectPreferred {
            partitions: candidates,
        })
        .expect("elect");
        let back = &meta.topics["t"].partitions[0];
        assert_eq!(back.leader, preferred);
        assert!(back.leader_epoch > moved.leader_epoch);
        assert!(meta.preferred_candidates().is_empty());
        // Listing a partition that has nothing to move changes nothing.
        let before = meta.clone();
        meta.apply(Command::ElectPreferred {
            partitions: vec![("t".into(), 1)],
        })
        .expect("no-op");
        assert_eq!(meta, before);
    }

    #[test]
    fn a_reassignment_adds_replicas_then_drops_the_old_ones_once_all_are_in_sync() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 1, 3).expect("create");
        register(&mut meta, 4, "a");
        let before = meta.topics["t"].partitions[0].clone();
        let target: Vec<BrokerId> = vec![4, before.replicas[1], before.replicas[2]];
        let refused = meta.apply(Command::Reassign {
            partitions: vec![("t".into(), 0, vec![4, 4])],
            throttle_bytes: 0,
        });
        assert!(refused.is_err(), "repeated replicas are refused");
        let unknown = meta.apply(Command::Reassign {
            partitions: vec![("t".into(), 0, vec![9])],
            throttle_bytes: 0,
        });
        assert!(format!("{unknown:?}").contains("broker 9 is not registered"));
        meta.apply(Command::Reassign {
            partitions: vec![("t".into(), 0, target.clone())],
            throttle_bytes: 1000,
        })
        .expect("reassign");
        let moving = meta.topics["t"].partitions[0].clone();
        assert_eq!(moving.target, target);
        assert_eq!(moving.replicas.len(), 4, "old and new replicas meanwhile");
        assert_eq!(moving.catching_up(), vec![4]);
        assert_eq!(moving.leader, before.leader);
        assert_eq!(meta.reassignment_throttle_bytes, 1000);
        // Another move of the same partition waits for this one.
        let busy = meta.apply(Command::Reassign {
            partitions: vec![("t".into(), 0, vec![1, 2])],
            throttle_bytes: 0,
        });
        assert!(format!("{busy:?}").contains("being moved"));
        // Broker 4 catches up and joins the ISR: the move finishes, the old preferred
        // leader (not in the target) hands over.
        let mut isr = moving.isr.clone();
        isr.push(4);
        meta.apply(Command::AlterIsr {
            topic: "t".into(),
            partition: 0,
            leader: moving.leader,
            leader_epoch: moving.leader_epoch,
            partition_epoch: moving.partition_epoch,
            isr,
        })
        .expect("join");
        let done = &meta.topics["t"].partitions[0];
        assert!(done.target.is_empty());
        assert_eq!(done.replicas, target);
        assert!(done.isr.iter().all(|r| target.contains(r)));
        assert!(!done.isr.contains(&before.replicas[0]));
        assert!(target.contains(&done.leader));
        assert!(done.leader_epoch > before.leader_epoch);
        assert_eq!(meta.reassignment_throttle_bytes, 0);
    }

    #[test]
    fn internal_topics_created_on_fewer_brokers_get_more_replicas_when_brokers_join() {
        let mut meta = ClusterMetadata::default();
        register(&mut meta, 1, "a");
        meta.apply(Command::CreateTopic {
            name: "__consumer_offsets".into(),
            partitions: 2,
            replication_factor: 1,
            configs: BTreeMap::new(),
            internal: true,
        })
        .expect("create");
        create(&mut meta, "user", 1, 1).expect("create");
        assert!(
            meta.internal_replicas_to_add().is_empty(),
            "one broker: one replica"
        );
        register(&mut meta, 2, "a");
        register(&mut meta, 3, "a");
        register(&mut meta, 4, "a");
        let moves = meta.internal_replicas_to_add();
        assert_eq!(moves.len(), 2, "{moves:?}");
        for (topic, partition, target) in &moves {
            assert_eq!(topic, "__consumer_offsets");
            assert_eq!(target.len(), 3);
            assert_eq!(target[0], 1, "the current replica stays first");
            let _ = partition;
        }
        meta.apply(Command::Reassign {
            partitions: moves,
            throttle_bytes: 0,
        })
        .expect("reassign");
        assert!(
            meta.internal_replicas_to_add().is_empty(),
            "nothing more while the moves run"
        );
    }

    #[test]
    fn a_failed_replica_hands_its_leadership_to_an_in_sync_one_unless_it_is_the_last() {
        let mut meta = three_brokers();
        create(&mut meta, "t", 1, 3).expect("create");
        let before = meta.topics["t"].partitions[0].clone();
        let failed = before.leader;
        meta.apply(Command::ReplicaOffline {
            topic: "t".into(),
            partition: 0,
            broker: failed,
        })
        .expect("offline");
        let after = meta.topics["t"].partitions[0].clone();
        assert_ne!(after.leader, failed);
        assert!(after.isr.contains(&after.leader));
        assert!(!after.isr.contains(&failed));
        assert!(after.leader_epoch > before.leader_epoch);
        // The last in-sync replica keeps the partition: there is nothing else.
        create(&mut meta, "single", 1, 1).expect("create");
        let only = meta.topics["single"].partitions[0].clone();
        meta.apply(Command::ReplicaOffline {
            topic: "single".into(),
            partition: 0,
            broker: only.leader,
        })
        .expect("offline");
        assert_eq!(meta.topics["single"].partitions[0], only);
    }
}
