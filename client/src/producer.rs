//! The producer: batching, key partitioning, pipelining over one stream per broker,
//! acks and retries.
//!
//! Records are gathered per partition into batches that are sent when they reach
//! `batch_size_bytes` or have waited `linger`. Batches travel on a `ProduceStream` per
//! leader broker with up to `max_in_flight` requests outstanding. Keyed records go to
//! Kafka's murmur2 partition; records without a key stick to one partition per topic until
//! that partition's batch is sent, then move to the next (Kafka's sticky partitioner).
//! A retriable failure (not leader, transport error) refreshes metadata and resends the
//! same batch, so a record may be written twice (at-least-once) and, with several requests
//! in flight, retried batches may land after later ones.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use runnel_batch::{BatchBuilder, BatchOptions, Compression, Header, Record};
use runnel_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::error::{ClientError, check};
use crate::partitioner::partition_for_key;

/// What the producer waits for before a record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Do not wait for durability (acks=0).
    None,
    /// The leader appended it under its flush policy (acks=1).
    #[default]
    Leader,
    /// Every in-sync replica has it (acks=all).
    All,
}

impl Acks {
    fn to_proto(self) -> v1::Acks {
        match self {
            Acks::None => v1::Acks::None,
            Acks::Leader => v1::Acks::Leader,
            Acks::All => v1::Acks::All,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: Acks,
    /// How long a batch may wait for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it holds this many bytes.
    pub batch_size_bytes: usize,
    /// Records buffered but not yet acknowledged; `send` waits when this is reached.
    pub buffer_bytes: usize,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub compression: Compression,
    /// Requests outstanding per broker stream.
    pub max_in_flight: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(5),
            batch_size_bytes: 256 * 1024,
            buffer_bytes: 64 * 1024 * 1024,
            retries: 5,
            retry_backoff: Duration::from_millis(100),
            compression: Compression::None,
            max_in_flight: 16,
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    pub topic: String,
    /// `None`: chosen from the key, or sticky when there is no key.
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// `None`: now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<String>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            ..Default::default()
        }
    }

    #[must_use]
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    #[must_use]
    pub fn value(mut self, value: impl Into<Bytes>) -> Self {
        self.value = Some(value.into());
        self
    }

    #[must_use]
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    #[must_use]
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    fn size_bytes(&self) -> usize {
        24 + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + 4)
                .sum::<usize>()
    }
}

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
}

type DeliveryResult = Result<RecordMetadata, ClientError>;

/// Resolves when the record is acknowledged or has failed for good.
pub struct Delivery(oneshot::Receiver<DeliveryResult>);

impl Future for Delivery {
    type Output = DeliveryResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::ProducerClosed)))
    }
}

enum Command {
    Send(ProducerRecord, oneshot::Sender<DeliveryResult>),
    Flush(oneshot::Sender<()>),
}

/// Sends records in batches; cheap to share behind an `Arc`.
pub struct Producer {
    commands: mpsc::Sender<Command>,
}

impl Producer {
    /// Starts the producer's background task on the current tokio runtime.
    pub fn new(client: Client, config: ProducerConfig) -> Self {
        let (commands, rx) = mpsc::channel(8192);
        let (events_tx, events) = mpsc::channel(1024);
        let task = Task {
            client,
            config,
            commands: rx,
            events_tx,
            events,
            open: HashMap::new(),
            sticky: HashMap::new(),
            next_sticky: 0,
            in_flight: HashMap::new(),
            streams: HashMap::new(),
            retries: VecDeque::new(),
            flush_waiters: Vec::new(),
            next_request_id: 0,
            pending_bytes: 0,
        };
        tokio::spawn(task.run());
        Producer { commands }
    }

    /// Queues a record. Waits only when the producer's buffer is full. The returned
    /// [`Delivery`] resolves when the broker acknowledged the record.
    ///
    /// # Errors
    /// An empty topic name, or a closed producer.
    pub async fn send(&self, record: ProducerRecord) -> Result<Delivery, ClientError> {
        if record.topic.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the record has no topic".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Send(record, tx))
            .await
            .map_err(|_| ClientError::ProducerClosed)?;
        Ok(Delivery(rx))
    }

    /// Sends everything buffered now and waits until every record sent so far is
    /// acknowledged or has failed.
    ///
    /// # Errors
    /// A closed producer.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| ClientError::ProducerClosed)?;
        rx.await.map_err(|_| ClientError::ProducerClosed)
    }
}

struct Waiter {
    tx: oneshot::Sender<DeliveryResult>,
    timestamp_ms: i64,
}

struct OpenBatch {
    builder: BatchBuilder,
    waiters: Vec<Waiter>,
    started: Instant,
    size_bytes: usize,
}

struct Sent {
    topic: String,
    partition: u32,
    records: Bytes,
    waiters: Vec<Waiter>,
    leader: u32,
    attempts: u32,
    size_bytes: usize,
}

enum Event {
    Response(v1::ProduceResponse),
    StreamFailed(u32, ClientError),
}

struct Task {
    client: Client,
    config: ProducerConfig,
    commands: mpsc::Receiver<Command>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    open: HashMap<(String, u32), OpenBatch>,
    sticky: HashMap<String, u32>,
    next_sticky: u32,
    in_flight: HashMap<u64, Sent>,
    streams: HashMap<u32, mpsc::Sender<v1::ProduceRequest>>,
    retries: VecDeque<(Instant, Sent)>,
    flush_waiters: Vec<oneshot::Sender<()>>,
    next_request_id: u64,
    pending_bytes: usize,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Task {
    async fn run(mut self) {
        let mut commands_open = true;
        loop {
            let linger_deadline = self
                .open
                .values()
                .map(|b| b.started + self.config.linger)
                .min();
            let retry_deadline = self.retries.front().map(|(at, _)| *at);
            let wake = [linger_deadline, retry_deadline]
                .into_iter()
                .flatten()
                .min();
            let accepting = commands_open && self.pending_bytes < self.config.buffer_bytes;
            tokio::select! {
                command = self.commands.recv(), if accepting => match command {
                    Some(Command::Send(record, tx)) => self.accept(record, tx).await,
                    Some(Command::Flush(tx)) => {
                        self.flush_waiters.push(tx);
                        self.send_all_open().await;
                    }
                    None => {
                        commands_open = false;
                        self.send_all_open().await;
                    }
                },
                Some(event) = self.events.recv() => self.handle(event).await,
                () = sleep_until(wake), if wake.is_some() => {
                    self.send_expired().await;
                    self.send_due_retries().await;
                }
            }
            if !self.flush_waiters.is_empty() && !self.open.is_empty() {
                self.send_all_open().await;
            }
            let idle = self.open.is_empty() && self.in_flight.is_empty() && self.retries.is_empty();
            if idle {
                for waiter in self.flush_waiters.drain(..) {
                    let _ = waiter.send(());
                }
                if !commands_open {
                    return;
                }
            }
        }
    }

    async fn choose_partition(&mut self, record: &ProducerRecord) -> Result<u32, ClientError> {
        let count = self.client.partition_count(&record.topic).await?;
        match (record.partition, &record.key) {
            (Some(p), _) if p < count => Ok(p),
            (Some(p), _) => {
                // The topic may have grown; ask again before refusing.
                let count = self
                    .client
                    .refresh_topic(&record.topic)
                    .await?
                    .leaders
                    .len() as u32;
                if p < count {
                    Ok(p)
                } else {
                    Err(ClientError::Broker {
                        code: v1::ErrorCode::UnknownPartition,
                        message: format!(
                            "topic {:?} has {count} partitions (0..={}); partition {p} does not exist",
                            record.topic,
                            count.saturating_sub(1)
                        ),
                    })
                }
            }
            (None, Some(key)) => Ok(partition_for_key(key, count)),
            (None, None) => {
                let next = self.next_sticky;
                let p = *self
                    .sticky
                    .entry(record.topic.clone())
                    .or_insert(next % count.max(1));
                Ok(p % count.max(1))
            }
        }
    }

    async fn accept(&mut self, record: ProducerRecord, tx: oneshot::Sender<DeliveryResult>) {
        let partition = match self.choose_partition(&record).await {
            Ok(p) => p,
            Err(err) => {
                let _ = tx.send(Err(err));
                return;
            }
        };
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let size = record.size_bytes();
        let options = BatchOptions {
            compression: self.config.compression,
            ..BatchOptions::default()
        };
        let key = (record.topic.clone(), partition);
        let batch = self.open.entry(key.clone()).or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(options),
            waiters: Vec::new(),
            started: Instant::now(),
            size_bytes: 0,
        });
        batch.builder.push(&Record {
            offset: 0,
            timestamp_ms,
            key: record.key,
            value: record.value,
            headers: record.headers,
        });
        batch.waiters.push(Waiter { tx, timestamp_ms });
        batch.size_bytes += size;
        self.pending_bytes += size;
        if batch.builder.size_bytes() >= self.config.batch_size_bytes {
            self.send_batch(key).await;
        }
    }

    async fn send_expired(&mut self) {
        let now = Instant::now();
        let expired: Vec<(String, u32)> = self
            .open
            .iter()
            .filter(|(_, b)| b.started + self.config.linger <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.send_batch(key).await;
        }
    }

    async fn send_all_open(&mut self) {
        let keys: Vec<(String, u32)> = self.open.keys().cloned().collect();
        for key in keys {
            self.send_batch(key).await;
        }
    }

    async fn send_batch(&mut self, key: (String, u32)) {
        let Some(batch) = self.open.remove(&key) else {
            return;
        };
        let (topic, partition) = key;
        if self.sticky.get(&topic) == Some(&partition) {
            // Sticky partitioning: the next keyless batch of this topic goes elsewhere.
            self.next_sticky = self.next_sticky.wrapping_add(1);
            self.sticky.remove(&topic);
        }
        let sent = Sent {
            topic,
            partition,
            records: batch.builder.build(),
            waiters: batch.waiters,
            leader: 0,
            attempts: 0,
            size_bytes: batch.size_bytes,
        };
        self.dispatch(sent).await;
    }

    /// Sends (or resends) a batch on its leader's stream.
    async fn dispatch(&mut self, mut sent: Sent) {
        let stream = match self.stream_for(&sent.topic, sent.partition).await {
            Ok((leader, stream)) => {
                sent.leader = leader;
                stream
            }
            Err(err) => return self.fail_or_retry(sent, err),
        };
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let request = v1::ProduceRequest {
            request_id,
            topic: sent.topic.clone(),
            partitions: vec![v1::PartitionRecords {
                partition: sent.partition,
                records: sent.records.clone(),
            }],
            acks: self.config.acks.to_proto() as i32,
            timeout_ms: 0,
        };
        self.in_flight.insert(request_id, sent);
        if stream.send(request).await.is_err() {
            let leader = self.in_flight.get(&request_id).map_or(0, |s| s.leader);
            self.streams.remove(&leader);
            if let Some(sent) = self.in_flight.remove(&request_id) {
                self.fail_or_retry(
                    sent,
                    ClientError::Transport {
                        code: tonic::Code::Unavailable,
                        message: "produce stream closed".into(),
                    },
                );
            }
        }
    }

    async fn stream_for(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<(u32, mpsc::Sender<v1::ProduceRequest>), ClientError> {
        let info = self.client.topic(topic).await?;
        let leader = *info
            .leaders
            .get(partition as usize)
            .ok_or_else(|| ClientError::Broker {
                code: v1::ErrorCode::UnknownPartition,
                message: format!("partition {partition} of {topic:?} is unknown"),
            })?;
        if let Some(stream) = self.streams.get(&leader) {
            return Ok((leader, stream.clone()));
        }
        let channel = self.client.channel_to(leader)?;
        let (tx, rx) = mpsc::channel(self.config.max_in_flight.max(1));
        let mut responses = self
            .client
            .producer_rpc(channel)
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            while let Some(item) = responses.next().await {
                let event = match item {
                    Ok(response) => Event::Response(response),
                    Err(status) => Event::StreamFailed(leader, status.into()),
                };
                let failed = matches!(event, Event::StreamFailed(..));
                if events.send(event).await.is_err() || failed {
                    return;
                }
            }
            let _ = events
                .send(Event::StreamFailed(
                    leader,
                    ClientError::Transport {
                        code: tonic::Code::Unavailable,
                        message: "the broker closed the produce stream".into(),
                    },
                ))
                .await;
        });
        self.streams.insert(leader, tx.clone());
        Ok((leader, tx))
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Response(response) => {
                let Some(sent) = self.in_flight.remove(&response.request_id) else {
                    return;
                };
                let outcome = check(response.error.as_ref()).and_then(|()| {
                    let result = response
                        .partitions
                        .iter()
                        .find(|p| p.partition == sent.partition)
                        .ok_or_else(|| {
                            ClientError::Corrupt("produce response lacks the partition".into())
                        })?;
                    check(result.error.as_ref())
                        .map(|()| (result.base_offset, result.log_append_time_ms))
                });
                match outcome {
                    Ok((base_offset, append_time)) => self.complete(sent, base_offset, append_time),
                    Err(err) => {
                        if err.is_retriable() {
                            let _ = self.client.refresh_topic(&sent.topic).await;
                            self.streams.remove(&sent.leader);
                        }
                        self.fail_or_retry(sent, err);
                    }
                }
            }
            Event::StreamFailed(leader, err) => {
                self.streams.remove(&leader);
                let ids: Vec<u64> = self
                    .in_flight
                    .iter()
                    .filter(|(_, s)| s.leader == leader)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    if let Some(sent) = self.in_flight.remove(&id) {
                        self.fail_or_retry(sent, err.clone());
                    }
                }
            }
        }
    }

    fn complete(&mut self, sent: Sent, base_offset: i64, log_append_time_ms: i64) {
        self.pending_bytes = self.pending_bytes.saturating_sub(sent.size_bytes);
        for (i, waiter) in sent.waiters.into_iter().enumerate() {
            let _ = waiter.tx.send(Ok(RecordMetadata {
                topic: sent.topic.clone(),
                partition: sent.partition,
                offset: base_offset + i as i64,
                timestamp_ms: if log_append_time_ms >= 0 {
                    log_append_time_ms
                } else {
                    waiter.timestamp_ms
                },
            }));
        }
    }

    fn fail_or_retry(&mut self, mut sent: Sent, err: ClientError) {
        if err.is_retriable() && sent.attempts < self.config.retries {
            sent.attempts += 1;
            tracing::debug!(topic = %sent.topic, partition = sent.partition, attempt = sent.attempts, error = %err, "retrying batch");
            self.retries
                .push_back((Instant::now() + self.config.retry_backoff, sent));
            return;
        }
        self.pending_bytes = self.pending_bytes.saturating_sub(sent.size_bytes);
        for waiter in sent.waiters {
            let _ = waiter.tx.send(Err(err.clone()));
        }
    }

    async fn send_due_retries(&mut self) {
        let now = Instant::now();
        while self.retries.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, sent)) = self.retries.pop_front() {
                self.dispatch(sent).await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
