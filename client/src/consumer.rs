//! The consumer: assign partitions, seek, poll.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use runnel_batch::{AbortedFilter, Header, decode_records_shared};
use runnel_proto::v1::{self, ErrorCode};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;

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
    /// `ReadUncommitted` (the default, as in Kafka) returns everything up to the high
    /// watermark; `ReadCommitted` only what committed transactions and non-transactional
    /// producers wrote, up to the last stable offset.
    pub isolation: v1::IsolationLevel,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            max_bytes: 16 * 1024 * 1024,
            partition_max_bytes: 4 * 1024 * 1024,
            auto_offset_reset: Some(StartFrom::Latest),
            isolation: v1::IsolationLevel::ReadUncommitted,
        }
    }
}

/// A record as the consumer returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Shared by every record of a fetch: no allocation per record.
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// A record batch as the consumer fetched it, its records not decoded: for a reader that
/// walks them in place (`runnel_batch::for_each_record`). Control batches and those of
/// aborted transactions (under `ReadCommitted`) are left out, as by [`Consumer::poll`].
#[derive(Debug, Clone)]
pub struct FetchedBatch {
    pub topic: Arc<str>,
    pub partition: u32,
    /// The whole batch, as the broker stored it.
    pub bytes: Bytes,
    /// The first offset not returned before: the batch's records below it are to be
    /// skipped (a fetch may start inside a batch).
    pub from_offset: i64,
    /// The offset after the batch: what a consumer commits once it has handled it.
    pub next_offset: i64,
}

type Positions = BTreeMap<(String, u32), i64>;

/// The offset after each partition's last record in `records`: what a consumer commits
/// once it has handled them.
pub fn next_offsets(records: &[ConsumerRecord]) -> BTreeMap<(String, u32), i64> {
    // Records come in runs of one partition: group by run, then key by owned names.
    let mut runs: Vec<(&Arc<str>, u32, i64)> = Vec::new();
    for r in records {
        match runs
            .iter_mut()
            .find(|(topic, partition, _)| *partition == r.partition && **topic == r.topic)
        {
            Some((_, _, next)) => *next = (*next).max(r.offset + 1),
            None => runs.push((&r.topic, r.partition, r.offset + 1)),
        }
    }
    runs.into_iter()
        .map(|(topic, partition, next)| ((topic.to_string(), partition), next))
        .collect()
}

/// Fetch responses a session keeps ready beyond the one being handled.
const SESSION_RESPONSES_AHEAD: usize = 2;
/// The pause before fetching again after a retriable failure.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// Reads assigned partitions from positions it keeps itself. Records stream from each
/// leader on a `FetchStream`: the broker sends the next response as soon as the previous
/// one is on its way, so the consumer never waits on a round trip while data is there. A
/// seek, a new assignment or an error ends the streams; the next poll opens them again at
/// the consumer's positions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    positions: Positions,
    session: Option<FetchSession>,
}

/// The open fetch streams and the positions their next responses continue from.
struct FetchSession {
    expected: Positions,
    /// Whether the streams hand batches over undecoded ([`Consumer::poll_batches`]).
    raw: bool,
    responses: mpsc::Receiver<Result<Vec<Fetched>, ClientError>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One partition of a fetch response, decoded by its stream's task: decoding overlaps
/// the caller's handling of the records before.
enum Fetched {
    /// The broker answered the partition with an error.
    Failed(v1::FetchedPartition),
    Read {
        topic: Arc<str>,
        partition: u32,
        /// Each batch, and the offset after it.
        batches: Vec<(Chunk, i64)>,
    },
}

/// One fetched batch as a session hands it over.
enum Chunk {
    /// Its records.
    Records(Vec<ConsumerRecord>),
    /// Its bytes, undecoded.
    Batch(Bytes),
    /// A control batch or an aborted transaction's batch: nothing for the application.
    Skipped,
}

/// Decodes a fetch response's records (only splits it into batches when `raw`), leaving
/// out what aborted transactions wrote. `local`: the response came from the broker in
/// this process, whose log reads verified every batch's CRC already.
fn decode_response(
    response: v1::FetchResponse,
    raw: bool,
    local: bool,
) -> Result<Vec<Fetched>, ClientError> {
    let mut decoded = Vec::with_capacity(response.partitions.len());
    for fetched in response.partitions {
        if fetched.error.is_some() {
            decoded.push(Fetched::Failed(fetched));
            continue;
        }
        let topic: Arc<str> = Arc::from(fetched.topic.as_str());
        let mut aborted = AbortedFilter::new(
            fetched
                .aborted_transactions
                .iter()
                .map(|a| (a.producer_id, a.first_offset)),
        );
        let mut batches = Vec::new();
        let mut at = 0usize;
        let split = if local {
            runnel_batch::batches_verified(&fetched.records)
        } else {
            runnel_batch::batches(&fetched.records)
        };
        for batch in split {
            let (header, batch_bytes) =
                batch.map_err(|err| ClientError::Corrupt(err.to_string()))?;
            let shared = fetched.records.slice(at..at + batch_bytes.len());
            at += batch_bytes.len();
            if !aborted.keep(&header, batch_bytes) {
                batches.push((Chunk::Skipped, header.next_offset()));
                continue;
            }
            if raw {
                batches.push((Chunk::Batch(shared), header.next_offset()));
                continue;
            }
            let records = decode_records_shared(&shared)
                .map_err(|err| ClientError::Corrupt(err.to_string()))?
                .into_iter()
                .map(|record| ConsumerRecord {
                    topic: topic.clone(),
                    partition: fetched.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers: record.headers,
                })
                .collect();
            batches.push((Chunk::Records(records), header.next_offset()));
        }
        decoded.push(Fetched::Read {
            topic,
            partition: fetched.partition,
            batches,
        });
    }
    Ok(decoded)
}

impl Drop for FetchSession {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FetchSession {
    /// Opens a stream to the leader of every partition in `positions`.
    async fn open(
        client: &Client,
        config: &ConsumerConfig,
        positions: &Positions,
        raw: bool,
    ) -> Result<Self, ClientError> {
        let mut by_leader: BTreeMap<u32, Vec<v1::FetchPartition>> = BTreeMap::new();
        for ((topic, partition), offset) in positions {
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
        let (tx, responses) = mpsc::channel(SESSION_RESPONSES_AHEAD);
        // Built first, so that streams already opened are closed if a later one fails.
        let mut session = FetchSession {
            expected: positions.clone(),
            raw,
            responses,
            tasks: Vec::with_capacity(by_leader.len()),
        };
        for (leader, partitions) in by_leader {
            let request = v1::FetchRequest {
                partitions,
                max_wait_ms: config.max_wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                min_bytes: 1,
                max_bytes: config.max_bytes,
                format: v1::RecordFormat::Batches as i32,
                isolation: config.isolation as i32,
            };
            let local = client.local(leader);
            let in_process = local.is_some();
            let mut stream: BoxStream<v1::FetchResponse> = match local {
                Some(local) => local.fetch_stream(request, client.acting_as()),
                None => Box::pin(
                    client
                        .consumer_rpc(client.channel_to(leader)?)
                        .fetch_stream(request)
                        .await?
                        .into_inner(),
                ),
            };
            let tx = tx.clone();
            session.tasks.push(tokio::spawn(async move {
                loop {
                    let item = match stream.next().await {
                        Some(Ok(response)) => decode_response(response, raw, in_process),
                        None => Err(ClientError::Transport {
                            code: tonic::Code::Unavailable,
                            message: format!("broker {leader} ended the fetch stream"),
                        }),
                        Some(Err(status)) => Err(status.into()),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            }));
        }
        Ok(session)
    }
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Self {
        Consumer {
            client,
            config,
            positions: BTreeMap::new(),
            session: None,
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
        self.client
            .offset_of(topic, partition, spec, self.config.isolation)
            .await
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

    /// The latest offsets of the assigned partitions: the high watermarks, or with
    /// `ReadCommitted` the last stable offsets.
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

    /// Returns what is available after the current positions, waiting up to `max_wait`
    /// when nothing is, and advances the positions past what it returns.
    ///
    /// Cancel safe: a poll dropped while waiting loses nothing; positions only move for
    /// records that were returned.
    ///
    /// # Errors
    /// A broker or transport error that retrying does not cure; an out-of-range position
    /// when `auto_offset_reset` is `None`. Retriable failures (a leader moved, a broker
    /// went away) are not errors: the next poll looks the leaders up again.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        self.poll_into(false, Self::take).await
    }

    /// Like [`Consumer::poll`], returning whole batches with their records undecoded:
    /// for a reader that walks them in place, with no allocation per record.
    ///
    /// # Errors
    /// As [`Consumer::poll`].
    pub async fn poll_batches(&mut self) -> Result<Vec<FetchedBatch>, ClientError> {
        self.poll_into(true, Self::take_batches).await
    }

    /// One poll of a session that decodes records (or, `raw`, only splits batches), each
    /// partition read handed to `take`; then the open streams continue from the positions.
    async fn poll_into<T>(
        &mut self,
        raw: bool,
        take: fn(&mut Self, Fetched, &mut Vec<T>),
    ) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        for fetched in self.poll_retrying(raw).await? {
            take(self, fetched, &mut out);
        }
        if let Some(session) = self.session.as_mut() {
            session.expected.clone_from(&self.positions);
        }
        Ok(out)
    }

    /// One poll; a retriable failure is not an error but an empty poll after a pause,
    /// with the leaders to be looked up again.
    async fn poll_retrying(&mut self, raw: bool) -> Result<Vec<Fetched>, ClientError> {
        match self.poll_once(raw).await {
            Err(err) if err.is_retriable() => {
                self.session = None;
                for topic in self
                    .positions
                    .keys()
                    .map(|(t, _)| t)
                    .collect::<BTreeSet<_>>()
                {
                    self.client.forget_topic(topic);
                }
                tracing::warn!(error = %err, "fetching failed; looking the leaders up again");
                tokio::time::sleep(RETRY_BACKOFF).await;
                Ok(Vec::new())
            }
            other => other,
        }
    }

    /// The partitions a response read, for the caller to take from.
    async fn poll_once(&mut self, raw: bool) -> Result<Vec<Fetched>, ClientError> {
        if self.positions.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the consumer has no assigned partitions".into(),
            ));
        }
        if self
            .session
            .as_ref()
            .is_none_or(|s| s.expected != self.positions || s.raw != raw)
        {
            self.session = None;
            self.session =
                Some(FetchSession::open(&self.client, &self.config, &self.positions, raw).await?);
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(Vec::new());
        };
        let received = tokio::time::timeout(self.config.max_wait, session.responses.recv()).await;
        let response = match received {
            Err(_elapsed) => return Ok(Vec::new()),
            Ok(Some(Ok(response))) => response,
            Ok(Some(Err(err))) => {
                self.session = None;
                return Err(err);
            }
            Ok(None) => {
                self.session = None;
                return Err(ClientError::Transport {
                    code: tonic::Code::Unavailable,
                    message: "the fetch streams closed".into(),
                });
            }
        };
        let (failed, read): (Vec<_>, Vec<_>) = response
            .into_iter()
            .partition(|p| matches!(p, Fetched::Failed(_)));
        if !failed.is_empty() {
            // The streams would repeat the error: close them, deal with it, reopen.
            self.session = None;
            for partition in failed {
                if let Fetched::Failed(partition) = partition {
                    self.recover(partition).await?;
                }
            }
            return Ok(Vec::new());
        }
        Ok(read)
    }

    /// Handles a partition the broker answered with an error.
    async fn recover(&mut self, fetched: v1::FetchedPartition) -> Result<(), ClientError> {
        let Err(err) = check(fetched.error.as_ref()) else {
            return Ok(());
        };
        match (err.code(), self.config.auto_offset_reset) {
            (Some(ErrorCode::OffsetOutOfRange), Some(reset)) => {
                let offset = self
                    .lookup(&fetched.topic, fetched.partition, reset)
                    .await?;
                self.positions
                    .insert((fetched.topic, fetched.partition), offset);
                Ok(())
            }
            (Some(ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable), _) => {
                self.client.forget_topic(&fetched.topic);
                Ok(())
            }
            _ => Err(err),
        }
    }

    /// Takes a partition's records from its position on and advances the position.
    fn take(&mut self, fetched: Fetched, out: &mut Vec<ConsumerRecord>) {
        self.advance(fetched, |_, _, chunk, position, _| {
            if let Chunk::Records(records) = chunk {
                if out.is_empty() && records.first().is_some_and(|r| r.offset >= position) {
                    // The common case: the whole batch is new, and nothing came before it.
                    *out = records;
                } else {
                    out.reserve(records.len());
                    out.extend(records.into_iter().filter(|r| r.offset >= position));
                }
            }
        });
    }

    /// Takes a partition's batches that reach past its position, and advances it.
    fn take_batches(&mut self, fetched: Fetched, out: &mut Vec<FetchedBatch>) {
        self.advance(fetched, |topic, partition, chunk, position, next_offset| {
            if let Chunk::Batch(bytes) = chunk
                && next_offset > position
            {
                out.push(FetchedBatch {
                    topic: topic.clone(),
                    partition,
                    bytes,
                    from_offset: position,
                    next_offset,
                });
            }
        });
    }

    /// Hands each batch of a partition read to `each` (topic, partition, the batch, the
    /// position before it, the offset after it) and moves the position past it.
    fn advance(&mut self, fetched: Fetched, mut each: impl FnMut(&Arc<str>, u32, Chunk, i64, i64)) {
        let Fetched::Read {
            topic,
            partition,
            batches,
        } = fetched
        else {
            return;
        };
        let Some(position) = self.positions.get_mut(&(topic.to_string(), partition)) else {
            return;
        };
        for (chunk, next_offset) in batches {
            each(&topic, partition, chunk, *position, next_offset);
            *position = (*position).max(next_offset);
        }
    }
}
