//! The broker: the partitions this node hosts, and the operations clients call.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use runnel_broker_storage::{KNOWN_KEYS, LogConfig};
use runnel_proto::v1;

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::metadata::{BROKER_TOPIC_KEYS, BrokerRecord, Controller, TopicRecord};
use crate::now_ms;
use crate::partition::{Partition, ReadBuffers};

/// Largest fetch response the broker builds, whatever the client asks.
pub const FETCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Longest a fetch may be held waiting for data.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

pub struct Broker {
    pub(crate) config: BrokerConfig,
    log_defaults: LogConfig,
    controller: Mutex<Controller>,
    topics: RwLock<HashMap<String, Vec<Arc<Partition>>>>,
    pub(crate) coordinator: Mutex<crate::group::Coordinator>,
    pub(crate) offsets: Mutex<crate::offsets::OffsetStore>,
    read_buffers: ReadBuffers,
}

fn partition_dir(data_dir: &std::path::Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

impl Broker {
    /// Opens the controller and every partition this broker hosts, recovering their logs.
    ///
    /// # Errors
    /// Invalid config, unreadable metadata, or a partition whose log cannot be opened.
    pub fn open(config: BrokerConfig, advertised_address: String) -> anyhow::Result<Self> {
        let log_defaults = config.log_defaults()?;
        let broker = BrokerRecord {
            id: config.node_id,
            address: advertised_address,
        };
        let controller = Controller::open(&config.data_dir.join("__cluster_metadata"), broker)?;
        let mut topics = HashMap::new();
        for (name, topic) in &controller.metadata().topics {
            let log_config = topic_log_config(&log_defaults, &topic.configs)?;
            let mut partitions = Vec::new();
            for (index, record) in topic.partitions.iter().enumerate() {
                let dir = partition_dir(&config.data_dir, name, index as u32);
                // A log that fails closed fences its partition alone: the broker still
                // starts and serves every other partition.
                let partition = Partition::open(
                    &dir,
                    name,
                    index as u32,
                    log_config.clone(),
                    record.leader_epoch,
                )
                .unwrap_or_else(|err| {
                    tracing::error!(
                        topic = %name, partition = index, error = %err,
                        "the partition's log cannot be opened; it is fenced and every other partition is served"
                    );
                    Partition::unavailable(name, index as u32, err.to_string(), record.leader_epoch)
                });
                partitions.push(Arc::new(partition));
            }
            topics.insert(name.clone(), partitions);
        }
        let broker = Broker {
            config,
            log_defaults,
            controller: Mutex::new(controller),
            topics: RwLock::new(topics),
            coordinator: Mutex::new(crate::group::Coordinator::default()),
            offsets: Mutex::new(crate::offsets::OffsetStore::default()),
            read_buffers: ReadBuffers::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
        };
        broker.ensure_offsets_topic()?;
        broker.load_offsets()?;
        Ok(broker)
    }

    /// Creates the compacted internal topics on first start: `__consumer_offsets` (written
    /// by the broker) and `__connect_offsets` (written by connect workers).
    fn ensure_offsets_topic(&self) -> anyhow::Result<()> {
        use crate::offsets::{
            CONNECT_OFFSETS_TOPIC, CONNECT_OFFSETS_TOPIC_PARTITIONS, OFFSETS_TOPIC,
            OFFSETS_TOPIC_PARTITIONS,
        };
        self.ensure_internal_topic(OFFSETS_TOPIC, OFFSETS_TOPIC_PARTITIONS)?;
        self.ensure_internal_topic(CONNECT_OFFSETS_TOPIC, CONNECT_OFFSETS_TOPIC_PARTITIONS)
    }

    fn ensure_internal_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        if self.partitions_of(name).is_some() {
            return Ok(());
        }
        let configs: BTreeMap<String, String> = [
            ("cleanup.policy", "compact"),
            ("segment.bytes", "104857600"),
            ("retention.ms", "-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let log_config = topic_log_config(&self.log_defaults, &configs)?;
        let mut opened = Vec::new();
        for index in 0..partitions {
            let dir = partition_dir(&self.config.data_dir, name, index);
            let partition = Partition::open(&dir, name, index, log_config.clone(), 0)
                .map_err(|err| anyhow::anyhow!("opening {name}-{index}: {err}"))?;
            opened.push(Arc::new(partition));
        }
        self.controller()
            .create_topic(name, partitions, 1, configs, true, false)?;
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), opened);
        Ok(())
    }

    /// Replays `__consumer_offsets` into memory.
    fn load_offsets(&self) -> anyhow::Result<()> {
        let partitions = self
            .partitions_of(crate::offsets::OFFSETS_TOPIC)
            .unwrap_or_default();
        let mut store = self
            .offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for partition in partitions {
            let mut offset = partition.log_start_offset();
            let end = partition.high_watermark();
            while offset < end {
                let fetched = match partition.read(offset, 4 * 1024 * 1024, &self.read_buffers) {
                    Ok(fetched) => fetched,
                    Err(err) => {
                        // A fenced offsets partition leaves its groups' offsets unknown;
                        // the broker still serves everything else.
                        tracing::error!(partition = partition.index, error = %err, "cannot replay committed offsets");
                        break;
                    }
                };
                if fetched.records.is_empty() {
                    break;
                }
                for batch in runnel_batch::batches(&fetched.records) {
                    let (_, raw) = batch?;
                    for record in runnel_batch::decode_records(raw)? {
                        if record.offset >= offset {
                            store.apply_record(record.key.as_deref(), record.value.as_deref());
                        }
                    }
                }
                offset = fetched.next_offset;
            }
        }
        Ok(())
    }

    pub(crate) fn partition_count(&self, topic: &str) -> Option<u32> {
        self.partitions_of(topic).map(|p| p.len() as u32)
    }

    fn controller(&self) -> MutexGuard<'_, Controller> {
        self.controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn partitions_of(&self, topic: &str) -> Option<Vec<Arc<Partition>>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .cloned()
    }

    pub(crate) fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Partition>, BrokerError> {
        let partitions = self
            .partitions_of(topic)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: topic.to_string(),
            })?;
        partitions
            .get(partition as usize)
            .cloned()
            .ok_or(BrokerError::UnknownPartition {
                topic: topic.to_string(),
                partition,
                count: partitions.len() as u32,
            })
    }

    /// Every hosted partition, for housekeeping and shutdown.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    // ---------------------------------------------------------------------------------
    // Producing

    /// Appends the request's batches now, in call order, and returns a future that
    /// resolves to the response once the requested acks are satisfied. Calling this for
    /// requests in order and awaiting the futures in any order keeps per-partition order.
    pub fn produce(
        self: &Arc<Self>,
        request: v1::ProduceRequest,
    ) -> BoxFuture<'static, v1::ProduceResponse> {
        let request_id = request.request_id;
        let whole_failure = |err: BrokerError| {
            let response = v1::ProduceResponse {
                request_id,
                partitions: Vec::new(),
                error: Some(err.to_proto()),
            };
            async move { response }.boxed()
        };
        let acks = v1::Acks::try_from(request.acks).unwrap_or(v1::Acks::Leader);
        let partitions = match self.partitions_for_produce(&request.topic) {
            Ok(partitions) => partitions,
            Err(err) => return whole_failure(err),
        };
        let min_insync = match self.min_insync_replicas(&request.topic) {
            Ok(min) => min,
            Err(err) => return whole_failure(err),
        };
        let mut pending = Vec::with_capacity(request.partitions.len());
        for data in &request.partitions {
            let result = partitions
                .get(data.partition as usize)
                .cloned()
                .ok_or(BrokerError::UnknownPartition {
                    topic: request.topic.clone(),
                    partition: data.partition,
                    count: partitions.len() as u32,
                })
                .and_then(|partition| {
                    // One replica is in sync in a cluster of one: this broker.
                    let isr = 1usize;
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
                            tokio::spawn(async move {
                                if let Err(err) = partition.wait_durable(end).await {
                                    tracing::error!(error = %err, "flush after acks=0 produce failed");
                                }
                            });
                            Ok(())
                        } else {
                            partition.wait_durable(appended.end_offset).await
                        };
                        durable.map(|()| appended)
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
                error: None,
            }
        }
        .boxed()
    }

    fn partitions_for_produce(&self, topic: &str) -> Result<Vec<Arc<Partition>>, BrokerError> {
        if topic.starts_with("__")
            && topic != crate::offsets::CONNECT_OFFSETS_TOPIC
            && self.partitions_of(topic).is_some()
        {
            return Err(BrokerError::InvalidRequest {
                reason: format!("topic {topic:?} is internal: only the broker writes to it"),
            });
        }
        if let Some(partitions) = self.partitions_of(topic) {
            return Ok(partitions);
        }
        if !self.config.auto_create_topics {
            return Err(BrokerError::UnknownTopic {
                topic: topic.to_string(),
            });
        }
        match self.create_topic(v1::CreateTopicRequest {
            name: topic.to_string(),
            ..Default::default()
        }) {
            Ok(_) | Err(BrokerError::TopicAlreadyExists { .. }) => {}
            Err(err) => return Err(err),
        }
        self.partitions_of(topic)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: topic.to_string(),
            })
    }

    fn min_insync_replicas(&self, topic: &str) -> Result<usize, BrokerError> {
        let controller = self.controller();
        let value = controller
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
        let wait = Duration::from_millis(u64::from(request.max_wait_ms.min(FETCH_WAIT_MS_MAX)));
        let deadline = tokio::time::Instant::now() + wait;
        let min_bytes = request.min_bytes.max(1) as usize;
        loop {
            let mut watchers = Vec::new();
            let response = self.fetch_once(request, &mut watchers);
            let bytes: usize = response.partitions.iter().map(|p| p.records.len()).sum();
            let errors = response.partitions.iter().any(|p| p.error.is_some());
            if bytes >= min_bytes
                || errors
                || watchers.is_empty()
                || tokio::time::Instant::now() >= deadline
            {
                return response;
            }
            let changed = futures::future::select_all(
                watchers
                    .iter_mut()
                    .map(|w| Box::pin(w.changed().map(|_| ())) as BoxFuture<'_, ()>),
            );
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.fetch_once(request, &mut Vec::new());
            }
        }
    }

    fn fetch_once(
        &self,
        request: &v1::FetchRequest,
        watchers: &mut Vec<tokio::sync::watch::Receiver<i64>>,
    ) -> v1::FetchResponse {
        let mut budget = match request.max_bytes {
            0 => FETCH_BYTES_MAX,
            n => (n as usize).min(FETCH_BYTES_MAX),
        };
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
                            .read(wanted.offset, 0, &self.read_buffers)
                            .map(|mut f| {
                                f.records = bytes::Bytes::new();
                                f.next_offset = wanted.offset;
                                f
                            })
                    } else {
                        partition.read(wanted.offset, max.max(1), &self.read_buffers)
                    }?;
                    watchers.push(watcher);
                    Ok(fetched)
                });
            match result {
                Ok(fetched) => {
                    budget = budget.saturating_sub(fetched.records.len());
                    out.high_watermark = fetched.high_watermark;
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
                                Ok(p.high_watermark())
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
    pub fn metadata(&self, request: &v1::MetadataRequest) -> v1::MetadataResponse {
        if self.config.auto_create_topics {
            for name in &request.topics {
                if let Err(err) = self.partitions_for_produce(name) {
                    tracing::debug!(topic = %name, error = %err, "auto-creation refused");
                }
            }
        }
        let controller = self.controller();
        let meta = controller.metadata();
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
            controller_id: meta.controller_id,
            brokers: brokers(&meta.brokers),
            topics,
        }
    }

    pub fn cluster_info(&self) -> v1::ClusterInfoResponse {
        let controller = self.controller();
        let meta = controller.metadata();
        v1::ClusterInfoResponse {
            cluster_id: meta.cluster_id.clone(),
            controller_id: meta.controller_id,
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
        }
    }

    /// # Errors
    /// The rule the request broke.
    pub fn create_topic(
        &self,
        request: v1::CreateTopicRequest,
    ) -> Result<v1::CreateTopicResponse, BrokerError> {
        let configs: BTreeMap<String, String> = request.configs.into_iter().collect();
        let log_config = topic_log_config(&self.log_defaults, &configs)?;
        let partitions = if request.partitions == 0 {
            self.config.default_partitions
        } else {
            request.partitions
        };
        let rf = if request.replication_factor == 0 {
            self.config.default_replication_factor
        } else {
            request.replication_factor
        };
        let mut controller = self.controller();
        let name = request.name.clone();
        let checked =
            controller.create_topic(&name, partitions, rf, configs.clone(), false, true)?;
        if request.validate_only {
            return Ok(v1::CreateTopicResponse {
                topic: Some(topic_metadata(&name, &checked, &self.log_defaults)),
            });
        }
        // Open the logs before the metadata commits, so a topic never exists without them.
        let mut opened = Vec::new();
        for index in 0..partitions {
            let dir = partition_dir(&self.config.data_dir, &name, index);
            // A leftover directory of a deleted topic with this name must not resurface.
            let _ = std::fs::remove_dir_all(&dir);
            let partition = Partition::open(&dir, &name, index, log_config.clone(), 0)
                .map_err(|err| BrokerError::from_storage(&name, index, &err))?;
            opened.push(Arc::new(partition));
        }
        let topic = match controller.create_topic(&name, partitions, rf, configs, false, false) {
            Ok(topic) => topic,
            Err(err) => {
                for index in 0..opened.len() as u32 {
                    let _ =
                        std::fs::remove_dir_all(partition_dir(&self.config.data_dir, &name, index));
                }
                return Err(err);
            }
        };
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), opened);
        tracing::info!(topic = %name, partitions, replication_factor = rf, "created topic");
        Ok(v1::CreateTopicResponse {
            topic: Some(topic_metadata(&name, &topic, &self.log_defaults)),
        })
    }

    /// # Errors
    /// Unknown topic, or a storage error.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let mut controller = self.controller();
        controller.topic(name)?;
        if controller.topic(name)?.internal {
            return Err(BrokerError::InvalidRequest {
                reason: format!("{name:?} is an internal topic and cannot be deleted"),
            });
        }
        controller.delete_topic(name)?;
        let partitions = self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .unwrap_or_default();
        drop(controller);
        for partition in partitions {
            let index = partition.index;
            drop(partition);
            let dir = partition_dir(&self.config.data_dir, name, index);
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %err, "could not remove a deleted partition's directory");
            }
        }
        tracing::info!(topic = %name, "deleted topic");
        Ok(())
    }

    pub fn list_topics(&self, include_internal: bool) -> v1::ListTopicsResponse {
        let controller = self.controller();
        let topics = controller
            .metadata()
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
        let topic = self.controller().topic(name)?.clone();
        let hosted = self.partitions_of(name).unwrap_or_default();
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
                    log_start_offset: -1,
                    log_end_offset: -1,
                    high_watermark: -1,
                    ..Default::default()
                };
                if let Some(partition) = hosted.get(index) {
                    if let Some(snapshot) = partition.snapshot() {
                        description.log_start_offset = snapshot.log_start_offset;
                        description.log_end_offset = snapshot.log_end_offset;
                        description.high_watermark = partition.high_watermark();
                        description.size_bytes = snapshot.size_bytes;
                        description.segment_count = snapshot.segment_count as u32;
                    }
                    description.error = partition.check_fenced().err().map(|e| e.to_proto());
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
        let min_insync = overrides
            .get("min.insync.replicas")
            .or_else(|| self.config.topic_defaults.get("min.insync.replicas"))
            .cloned()
            .unwrap_or_else(|| "1".into());
        entries.push(v1::ConfigEntry {
            key: "min.insync.replicas".into(),
            value: min_insync,
            is_override: overrides.contains_key("min.insync.replicas"),
        });
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }

    /// # Errors
    /// Unknown topic, an unknown key or an invalid value (nothing is changed then).
    pub fn alter_topic_config(
        &self,
        request: v1::AlterTopicConfigRequest,
    ) -> Result<v1::AlterTopicConfigResponse, BrokerError> {
        let mut controller = self.controller();
        let mut configs = controller.topic(&request.name)?.configs.clone();
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
        let log_config = topic_log_config(&self.log_defaults, &configs)?;
        controller.set_configs(&request.name, configs.clone())?;
        drop(controller);
        for partition in self.partitions_of(&request.name).unwrap_or_default() {
            partition.set_config(log_config.clone());
        }
        Ok(v1::AlterTopicConfigResponse {
            configs: self.config_entries(&configs),
        })
    }

    /// # Errors
    /// Unknown topic, a total not larger than today's, or a storage error.
    pub fn add_partitions(
        &self,
        name: &str,
        total: u32,
    ) -> Result<v1::AddPartitionsResponse, BrokerError> {
        let mut controller = self.controller();
        let topic = controller.topic(name)?.clone();
        let current = topic.partitions.len() as u32;
        let log_config = topic_log_config(&self.log_defaults, &topic.configs)?;
        let mut opened = Vec::new();
        if total > current && total <= crate::metadata::PARTITIONS_MAX {
            for index in current..total {
                let dir = partition_dir(&self.config.data_dir, name, index);
                let _ = std::fs::remove_dir_all(&dir);
                let partition = Partition::open(&dir, name, index, log_config.clone(), 0)
                    .map_err(|err| BrokerError::from_storage(name, index, &err))?;
                opened.push(Arc::new(partition));
            }
        }
        let topic = controller.add_partitions(name, total)?;
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .extend(opened);
        Ok(v1::AddPartitionsResponse {
            topic: Some(topic_metadata(name, &topic, &self.log_defaults)),
        })
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
        let topics: Vec<_> = self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        for (_, partitions) in topics {
            for partition in partitions {
                let (topic, index) = (partition.topic.clone(), partition.index);
                if let Err(err) = partition.close() {
                    tracing::error!(topic, partition = index, error = %err, "closing partition failed");
                }
            }
        }
    }
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

/// The log settings of a topic: broker defaults with the topic's overrides applied.
fn topic_log_config(
    defaults: &LogConfig,
    overrides: &BTreeMap<String, String>,
) -> Result<LogConfig, BrokerError> {
    let mut config = defaults.clone();
    for (key, value) in overrides {
        if key == "min.insync.replicas" {
            if value
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|v| *v >= 1)
                .is_none()
            {
                return Err(BrokerError::InvalidConfig {
                    reason: format!(
                        "invalid value {value:?} for min.insync.replicas: a positive integer"
                    ),
                });
            }
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
        })
        .collect()
}
