//! Cluster metadata and the controller that changes it.
//!
//! The controller owns the cluster's metadata: brokers, topics, their configs, partition
//! assignment, leaders, leader epochs and ISRs. Every change is validated here and made
//! durable before it is acknowledged. In this release the controller is the single
//! broker's own (a cluster of one), and its store is a JSON file replaced atomically; the
//! model is the one a replicated controller log will carry, so brokers and clients do not
//! change when the store becomes a Raft log.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// Longest topic name accepted (Kafka's limit).
pub const TOPIC_NAME_LENGTH_MAX: usize = 249;
/// Most partitions a topic may have.
pub const PARTITIONS_MAX: u32 = 10_000;
/// Topic config keys the broker itself interprets (the rest belong to the log).
pub const BROKER_TOPIC_KEYS: &[&str] = &["min.insync.replicas"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerRecord {
    pub id: u32,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRecord {
    pub leader: u32,
    pub leader_epoch: i32,
    pub replicas: Vec<u32>,
    pub isr: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicRecord {
    pub replication_factor: u32,
    pub partitions: Vec<PartitionRecord>,
    /// Only the overrides; defaults come from the broker config.
    pub configs: BTreeMap<String, String>,
    pub internal: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMetadata {
    pub cluster_id: String,
    pub controller_id: u32,
    pub brokers: Vec<BrokerRecord>,
    pub topics: BTreeMap<String, TopicRecord>,
}

/// Checks a topic name against the rules users rely on; the error names the rule.
///
/// # Errors
/// [`BrokerError::InvalidTopicName`] for a broken rule, including a name that collides
/// with an existing one because `.` and `_` are interchangeable in metric names.
pub fn validate_topic_name<'a>(
    name: &str,
    existing: impl Iterator<Item = &'a str>,
    allow_internal: bool,
) -> Result<(), BrokerError> {
    let invalid = |rule: String| BrokerError::InvalidTopicName {
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

/// The controller: validates and applies metadata changes, and keeps them durable.
#[derive(Debug)]
pub struct Controller {
    path: PathBuf,
    metadata: ClusterMetadata,
}

impl Controller {
    /// Loads the metadata in `dir` (or starts a new cluster), registers `broker`, and
    /// elects it leader of the partitions it hosts, bumping their leader epochs.
    ///
    /// # Errors
    /// I/O errors, or a metadata file that cannot be parsed.
    pub fn open(dir: &Path, broker: BrokerRecord) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("metadata.json");
        let mut metadata = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {err}", path.display()),
                )
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => ClusterMetadata {
                cluster_id: new_cluster_id(),
                controller_id: broker.id,
                brokers: Vec::new(),
                topics: BTreeMap::new(),
            },
            Err(err) => return Err(err),
        };
        metadata.controller_id = broker.id;
        metadata.brokers.retain(|b| b.id != broker.id);
        metadata.brokers.push(broker.clone());
        metadata.brokers.sort_by_key(|b| b.id);
        for topic in metadata.topics.values_mut() {
            for partition in &mut topic.partitions {
                if partition.replicas.contains(&broker.id) {
                    partition.leader = broker.id;
                    partition.leader_epoch += 1;
                    partition.isr = vec![broker.id];
                }
            }
        }
        let controller = Controller { path, metadata };
        controller.persist()?;
        Ok(controller)
    }

    pub fn metadata(&self) -> &ClusterMetadata {
        &self.metadata
    }

    pub fn topic(&self, name: &str) -> Result<&TopicRecord, BrokerError> {
        self.metadata
            .topics
            .get(name)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: name.to_string(),
            })
    }

    fn persist(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.metadata)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn persist_or_fail(&self) -> Result<(), BrokerError> {
        self.persist().map_err(|err| BrokerError::Storage {
            topic: "__cluster_metadata".into(),
            partition: 0,
            reason: format!("writing {}: {err}", self.path.display()),
        })
    }

    fn assign(&self, partition: u32, replication_factor: u32) -> PartitionRecord {
        let brokers = &self.metadata.brokers;
        let replicas: Vec<u32> = (0..replication_factor as usize)
            .map(|i| brokers[(partition as usize + i) % brokers.len()].id)
            .collect();
        PartitionRecord {
            leader: replicas[0],
            leader_epoch: 0,
            isr: replicas.clone(),
            replicas,
        }
    }

    /// Creates a topic after checking its name, partition count, replication factor and
    /// configs (`check_configs` validates the overrides). With `validate_only` nothing
    /// changes.
    ///
    /// # Errors
    /// The rule that was broken, or a storage error persisting the change.
    pub fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        configs: BTreeMap<String, String>,
        internal: bool,
        validate_only: bool,
    ) -> Result<TopicRecord, BrokerError> {
        if self.metadata.topics.contains_key(name) {
            return Err(BrokerError::TopicAlreadyExists {
                name: name.to_string(),
            });
        }
        validate_topic_name(
            name,
            self.metadata.topics.keys().map(String::as_str),
            internal,
        )?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(BrokerError::InvalidPartitions {
                reason: format!(
                    "{partitions} requested; a topic needs between 1 and {PARTITIONS_MAX} partitions"
                ),
            });
        }
        let brokers = self.metadata.brokers.len() as u32;
        if replication_factor == 0 || replication_factor > brokers {
            return Err(BrokerError::InvalidReplicationFactor {
                requested: replication_factor,
                reason: format!(
                    "it must be between 1 and the number of brokers ({brokers}); the cluster has {brokers} broker{}",
                    if brokers == 1 { "" } else { "s" }
                ),
            });
        }
        let topic = TopicRecord {
            replication_factor,
            partitions: (0..partitions)
                .map(|p| self.assign(p, replication_factor))
                .collect(),
            configs,
            internal,
        };
        if !validate_only {
            self.metadata.topics.insert(name.to_string(), topic.clone());
            self.persist_or_fail()?;
        }
        Ok(topic)
    }

    /// # Errors
    /// Unknown topic, or a storage error.
    pub fn delete_topic(&mut self, name: &str) -> Result<TopicRecord, BrokerError> {
        let topic = self
            .metadata
            .topics
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: name.to_string(),
            })?;
        self.persist_or_fail()?;
        Ok(topic)
    }

    /// Replaces a topic's config overrides with `configs` (already validated).
    ///
    /// # Errors
    /// Unknown topic, or a storage error.
    pub fn set_configs(
        &mut self,
        name: &str,
        configs: BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let topic =
            self.metadata
                .topics
                .get_mut(name)
                .ok_or_else(|| BrokerError::UnknownTopic {
                    topic: name.to_string(),
                })?;
        topic.configs = configs;
        self.persist_or_fail()
    }

    /// Grows a topic to `total` partitions. Partitions are never removed.
    ///
    /// # Errors
    /// Unknown topic, a total not larger than today's, or a storage error.
    pub fn add_partitions(&mut self, name: &str, total: u32) -> Result<TopicRecord, BrokerError> {
        let topic = self.topic(name)?;
        let current = topic.partitions.len() as u32;
        if total <= current {
            return Err(BrokerError::InvalidPartitions {
                reason: format!(
                    "topic {name:?} has {current} partitions; the new total must be larger ({total} requested) because partitions can be added but never removed"
                ),
            });
        }
        if total > PARTITIONS_MAX {
            return Err(BrokerError::InvalidPartitions {
                reason: format!("{total} requested; at most {PARTITIONS_MAX} partitions per topic"),
            });
        }
        let rf = topic.replication_factor;
        let added: Vec<PartitionRecord> = (current..total).map(|p| self.assign(p, rf)).collect();
        let topic =
            self.metadata
                .topics
                .get_mut(name)
                .ok_or_else(|| BrokerError::UnknownTopic {
                    topic: name.to_string(),
                })?;
        topic.partitions.extend(added);
        let topic = topic.clone();
        self.persist_or_fail()?;
        Ok(topic)
    }
}

fn new_cluster_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("runnel-{:x}-{:x}", nanos, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let long = "a".repeat(250);
        assert!(validate_topic_name(&long, none.clone(), false).is_err());
        assert!(validate_topic_name(&"a".repeat(249), none.clone(), false).is_ok());
        assert!(
            validate_topic_name("prd.marketing-team.sms_platform.json", none.clone(), false)
                .is_ok()
        );
        let err = validate_topic_name("my_topic", ["my.topic"].into_iter(), false)
            .expect_err("collision");
        assert!(
            err.to_string()
                .contains("collides with existing topic \"my.topic\""),
            "{err}"
        );
        assert!(validate_topic_name("__consumer_offsets", none, true).is_ok());
    }

    #[test]
    fn create_validates_and_survives_reopen_with_bumped_epochs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = BrokerRecord {
            id: 1,
            address: "127.0.0.1:1".into(),
        };
        let mut controller = Controller::open(dir.path(), broker.clone()).expect("open");
        let err = controller
            .create_topic("t", 3, 2, BTreeMap::new(), false, false)
            .expect_err("rf > brokers");
        assert!(err.to_string().contains("number of brokers (1)"), "{err}");
        assert!(
            controller
                .create_topic("t", 0, 1, BTreeMap::new(), false, false)
                .is_err()
        );
        controller
            .create_topic("t", 3, 1, BTreeMap::new(), false, true)
            .expect("validate only");
        assert!(controller.metadata().topics.is_empty());
        controller
            .create_topic("t", 3, 1, BTreeMap::new(), false, false)
            .expect("create");
        assert!(matches!(
            controller.create_topic("t", 3, 1, BTreeMap::new(), false, false),
            Err(BrokerError::TopicAlreadyExists { .. })
        ));
        let err = controller.add_partitions("t", 2).expect_err("shrink");
        assert!(err.to_string().contains("never removed"), "{err}");
        controller.add_partitions("t", 5).expect("grow");
        drop(controller);
        let controller = Controller::open(dir.path(), broker).expect("reopen");
        let topic = controller.topic("t").expect("topic");
        assert_eq!(topic.partitions.len(), 5);
        assert!(
            topic
                .partitions
                .iter()
                .all(|p| p.leader_epoch == 1 && p.leader == 1)
        );
    }
}
