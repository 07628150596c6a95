//! The consumer: assign partitions, seek, poll.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use runnel_batch::{Header, batches, decode_records_shared};
use runnel_proto::v1::{self, ErrorCode};

use crate::client::Client;
use crate::error::{ClientError, check};

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The log start offset (`--from-beginning`).
    Earliest,
    /// The high watermark: only records produced from now on.
    Latest,
    Offset(i64),
    /// The first record whose timestamp is `>=` this (ms since the Unix epoch).
    Timestamp(i64),
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long the broker holds a fetch that has no data yet.
    pub max_wait: Duration,
    /// Upper bound of one fetch response.
    pub max_bytes: u32,
    /// Upper bound per partition in one fetch.
    pub partition_max_bytes: u32,
    /// What to do when a position falls outside the log (trimmed, or beyond the end):
    /// `Some` resets there, `None` returns the error.
    pub auto_offset_reset: Option<StartFrom>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            max_bytes: 16 * 1024 * 1024,
            partition_max_bytes: 4 * 1024 * 1024,
            auto_offset_reset: Some(StartFrom::Latest),
        }
    }
}

/// A record as the consumer returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

type Positions = BTreeMap<(String, u32), i64>;
type Prefetch = (
    Positions,
    tokio::task::JoinHandle<Result<Vec<v1::FetchResponse>, ClientError>>,
);

/// Reads assigned partitions from positions it keeps itself. While the caller handles one
/// poll's records, the next fetch is already on its way (it is discarded on a seek).
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    positions: Positions,
    prefetch: Option<Prefetch>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.prefetch.take() {
            handle.abort();
        }
    }
}

/// One fetch of every partition in `positions`, a request per leader.
async fn fetch_at(
    client: Client,
    config: ConsumerConfig,
    positions: Positions,
) -> Result<Vec<v1::FetchResponse>, ClientError> {
    let mut by_leader: BTreeMap<u32, Vec<v1::FetchPartition>> = BTreeMap::new();
    for ((topic, partition), offset) in &positions {
        let info = client.topic(topic).await?;
        let leader = info.leaders.get(*partition as usize).copied().unwrap_or(0);
        by_leader
            .entry(leader)
            .or_default()
            .push(v1::FetchPartition {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                max_bytes: config.partition_max_bytes,
            });
    }
    let mut responses = Vec::with_capacity(by_leader.len());
    for (leader, partitions) in by_leader {
        let channel = client.channel_to(leader)?;
        let response = client
            .consumer_rpc(channel)
            .fetch(v1::FetchRequest {
                partitions,
                max_wait_ms: config.max_wait.as_millis() as u32,
                min_bytes: 1,
                max_bytes: config.max_bytes,
            })
            .await?
            .into_inner();
        responses.push(response);
    }
    Ok(responses)
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Self {
        Consumer {
            client,
            config,
            positions: BTreeMap::new(),
            prefetch: None,
        }
    }

    /// Assigns `partitions` of `topic` (all of them when `None`), each starting at `start`.
    ///
    /// # Errors
    /// Unknown topic or partition, or an offset lookup failure.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<Vec<u32>>,
        start: StartFrom,
    ) -> Result<(), ClientError> {
        let count = self.client.refresh_topic(topic).await?.leaders.len() as u32;
        let partitions = partitions.unwrap_or_else(|| (0..count).collect());
        if let Some(bad) = partitions.iter().find(|p| **p >= count) {
            return Err(ClientError::Broker {
                code: ErrorCode::UnknownPartition,
                message: format!(
                    "topic {topic:?} has {count} partitions (0..={}); partition {bad} does not exist",
                    count.saturating_sub(1)
                ),
            });
        }
        for partition in partitions {
            self.seek(topic, partition, start).await?;
        }
        Ok(())
    }

    /// Moves the position of one partition (assigning it if needed).
    ///
    /// # Errors
    /// The offset lookup failed.
    pub async fn seek(
        &mut self,
        topic: &str,
        partition: u32,
        start: StartFrom,
    ) -> Result<(), ClientError> {
        let offset = match start {
            StartFrom::Offset(offset) => offset,
            other => self.lookup(topic, partition, other).await?,
        };
        self.positions
            .insert((topic.to_string(), partition), offset);
        Ok(())
    }

    async fn lookup(
        &self,
        topic: &str,
        partition: u32,
        start: StartFrom,
    ) -> Result<i64, ClientError> {
        let spec = match start {
            StartFrom::Earliest => v1::offset_query::Spec::Earliest(true),
            StartFrom::Latest => v1::offset_query::Spec::Latest(true),
            StartFrom::Timestamp(ts) => v1::offset_query::Spec::TimestampMs(ts),
            StartFrom::Offset(offset) => return Ok(offset),
        };
        let channel = self.client.leader_channel(topic, partition).await?;
        let answer = self
            .client
            .consumer_rpc(channel)
            .list_offsets(v1::ListOffsetsRequest {
                queries: vec![v1::OffsetQuery {
                    topic: topic.to_string(),
                    partition,
                    spec: Some(spec),
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

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        self.positions.remove(&(topic.to_string(), partition));
    }

    /// The next offset this consumer will read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.positions.get(&(topic.to_string(), partition)).copied()
    }

    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.positions.keys().cloned().collect()
    }

    /// The latest offsets (high watermarks) of the assigned partitions.
    ///
    /// # Errors
    /// An offset lookup failure.
    pub async fn end_offsets(&self) -> Result<BTreeMap<(String, u32), i64>, ClientError> {
        let mut ends = BTreeMap::new();
        for (topic, partition) in self.positions.keys() {
            let end = self.lookup(topic, *partition, StartFrom::Latest).await?;
            ends.insert((topic.clone(), *partition), end);
        }
        Ok(ends)
    }

    /// Fetches what is available after the current positions, waiting up to `max_wait`
    /// when nothing is, and advances the positions past what it returns.
    ///
    /// # Errors
    /// A broker or transport error; an out-of-range position when `auto_offset_reset` is
    /// `None`.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        if self.positions.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the consumer has no assigned partitions".into(),
            ));
        }
        let responses = match self.prefetch.take() {
            Some((positions, handle)) if positions == self.positions => handle
                .await
                .map_err(|err| ClientError::Corrupt(format!("prefetch task failed: {err}")))??,
            Some((_, handle)) => {
                handle.abort();
                fetch_at(
                    self.client.clone(),
                    self.config.clone(),
                    self.positions.clone(),
                )
                .await?
            }
            None => {
                fetch_at(
                    self.client.clone(),
                    self.config.clone(),
                    self.positions.clone(),
                )
                .await?
            }
        };
        // Start the next fetch from where these responses end, unless something went wrong.
        let clean = responses
            .iter()
            .flat_map(|r| &r.partitions)
            .all(|p| p.error.is_none());
        let got_data = responses
            .iter()
            .flat_map(|r| &r.partitions)
            .any(|p| !p.records.is_empty());
        if clean && got_data {
            let mut next = self.positions.clone();
            for fetched in responses.iter().flat_map(|r| &r.partitions) {
                if let Some(position) = next.get_mut(&(fetched.topic.clone(), fetched.partition)) {
                    *position = (*position).max(fetched.next_offset);
                }
            }
            let handle = tokio::spawn(fetch_at(
                self.client.clone(),
                self.config.clone(),
                next.clone(),
            ));
            self.prefetch = Some((next, handle));
        }
        let mut records = Vec::new();
        for response in responses {
            for fetched in response.partitions {
                self.take(fetched, &mut records).await?;
            }
        }
        Ok(records)
    }

    async fn take(
        &mut self,
        fetched: v1::FetchedPartition,
        out: &mut Vec<ConsumerRecord>,
    ) -> Result<(), ClientError> {
        let key = (fetched.topic.clone(), fetched.partition);
        if let Err(err) = check(fetched.error.as_ref()) {
            match (err.code(), self.config.auto_offset_reset) {
                (Some(ErrorCode::OffsetOutOfRange), Some(reset)) => {
                    let offset = self
                        .lookup(&fetched.topic, fetched.partition, reset)
                        .await?;
                    self.positions.insert(key, offset);
                    return Ok(());
                }
                (Some(ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable), _) => {
                    self.client.refresh_topic(&fetched.topic).await?;
                    return Ok(());
                }
                _ => return Err(err),
            }
        }
        let Some(position) = self.positions.get_mut(&key) else {
            return Ok(());
        };
        let mut at = 0usize;
        for batch in batches(&fetched.records) {
            let (header, raw) = batch.map_err(|err| ClientError::Corrupt(err.to_string()))?;
            let shared = fetched.records.slice(at..at + raw.len());
            at += raw.len();
            if header.is_control() {
                *position = (*position).max(header.next_offset());
                continue;
            }
            for record in decode_records_shared(&shared)
                .map_err(|err| ClientError::Corrupt(err.to_string()))?
            {
                if record.offset < *position {
                    continue;
                }
                out.push(ConsumerRecord {
                    topic: fetched.topic.clone(),
                    partition: fetched.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers: record.headers,
                });
            }
            *position = (*position).max(header.next_offset());
        }
        Ok(())
    }
}
