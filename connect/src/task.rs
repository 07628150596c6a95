//! A connector's task: the source and sink loops.
//!
//! A source task opens its connector at the position last committed to
//! `__connect_offsets`, polls batches, runs them through the transform chain, produces
//! them (acks=all), and only then commits the position the batch ended at. Batch k is
//! read and sent while batch k-1 is acknowledged and its position committed, so after a
//! crash at most those two batches are produced again: at least once, never lost.
//!
//! A sink task reads its topics as consumer group `connect-NAME`, runs each batch through
//! the chain, hands it to the connector's `write`, and commits the group's offsets only
//! after `write` returned ok, that is after the outside system acknowledged it.
//!
//! Transient failures (the connector's `retry`, an outside system that is down) are
//! retried with exponential backoff while the state says `Retrying` and why; a failed
//! call to the cluster (a broker that is down, a right the principal lacks) restarts the
//! task a second later, `Retrying` with the reason until the cluster answers; records the
//! connector or a transform refuses go to the error policy; a fatal failure stops the
//! connector in state `Failed` with the message. Other connectors are not affected.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{
    Acks, Client, ConsumerConfig, ConsumerRecord, Delivery, GroupConfig, GroupConsumer, Header,
    Producer, ProducerConfig, ProducerRecord, StartFrom, next_offsets,
};
use runnel_streams::host::LogBuffer;
use runnel_streams::input::Inputs;
use runnel_streams::offsets::AckedOffsets;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wasmtime::component::Component;

use crate::OFFSETS_TOPIC;
use crate::chain::{Step, chain_blocking};
use crate::host::{CallError, Sandbox, Setup, SinkInstance, SourceInstance, WriteError};
use crate::positions::{read_position, send_position};
use crate::spec::{self, ConnectorSpec, Kind, Policy, Secrets};
use crate::worker::{Components, Control, State, Stats, Worker, group_name, hex, lock};

/// A record between the outside system and a topic.
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub(crate) key: Option<Bytes>,
    pub(crate) value: Option<Bytes>,
    pub(crate) headers: Vec<Header>,
    /// -1: stamped when produced.
    pub(crate) timestamp_ms: i64,
    /// Index of the record it came from (in the connector's batch).
    pub(crate) origin: usize,
}

impl Rec {
    /// A record emitted in the flat output format, sharing `bytes`.
    pub(crate) fn from_output(
        bytes: &Bytes,
        output: &runnel_flat::FlatOutput<'_>,
        origin: usize,
    ) -> Rec {
        Rec {
            key: output.key.map(|k| bytes.slice_ref(k)),
            value: output.value.map(|v| bytes.slice_ref(v)),
            headers: runnel_flat::headers(output.headers)
                .map(|(k, v)| Header {
                    key: k.to_string(),
                    value: v.map(|v| bytes.slice_ref(v)),
                })
                .collect(),
            timestamp_ms: output.timestamp_ms,
            origin,
        }
    }
}

/// What comes out of the transform chain, and the records it refused (index, reason).
pub(crate) type Chained = (Vec<Rec>, Vec<(usize, String)>);

/// See [`Task::prepare`].
type Prepared = (Producer, Vec<Step>, Opener);

/// What it takes to open the connector, on a blocking thread.
#[derive(Clone)]
pub(crate) struct Opener {
    worker: Worker,
    component: Arc<Component>,
    setup: Setup,
}

impl Opener {
    fn source(&self, position: Option<&[u8]>) -> Result<SourceInstance, CallError> {
        self.worker
            .inner
            .host
            .open_source(&self.component, &self.setup, position)
    }

    fn sink(&self) -> Result<SinkInstance, CallError> {
        self.worker
            .inner
            .host
            .open_sink(&self.component, &self.setup)
    }
}

/// A source batch sent to the broker and not yet acknowledged.
pub(crate) struct InFlight {
    pub(crate) deliveries: Vec<(usize, Delivery)>,
    /// Records a transform refused (index into `records`, reason).
    pub(crate) failures: Vec<(usize, String)>,
    /// The records as the connector returned them, for the dead-letter topic.
    pub(crate) records: Vec<Rec>,
    pub(crate) position: Option<Vec<u8>>,
    pub(crate) count: u64,
}

/// A source's position commits: the last durable one and the one in flight.
pub(crate) struct Commits {
    /// Records produced up to the last position sent.
    pub(crate) total: u64,
    pub(crate) committed: Option<(Vec<u8>, u64)>,
    pub(crate) pending: Option<(Delivery, Vec<u8>, u64)>,
}

/// How a task ended.
pub(crate) enum Stop {
    /// Stopped on request.
    Done,
    /// Fatal: the connector stays failed.
    Failed(String),
}

/// A broker or transport problem: start over from what was committed.
pub(crate) type Interrupted = anyhow::Error;

pub(crate) struct Task {
    pub(crate) worker: Worker,
    pub(crate) spec: ConnectorSpec,
    pub(crate) components: Components,
    pub(crate) stats: Arc<Stats>,
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) control: watch::Receiver<Control>,
    pub(crate) log: LogBuffer,
    pub(crate) secrets: Secrets,
}

impl Task {
    pub(crate) async fn run(mut self) {
        let name = self.spec.name.clone();
        loop {
            let result = match self.spec.kind {
                Kind::Source => self.run_source().await,
                Kind::Sink => self.run_sink().await,
            };
            match result {
                Ok(Stop::Done) => {
                    *lock(&self.state) = State::Stopped;
                    return;
                }
                Ok(Stop::Failed(reason)) => {
                    let reason = self.secrets.redact(&reason);
                    tracing::error!(connector = %name, error = %reason, "connector failed");
                    self.log.push(format!("[runtime] failed: {reason}"));
                    *lock(&self.state) = State::Failed(reason);
                    return;
                }
                Err(err) => {
                    let reason = self.secrets.redact(&format!("{err:#}"));
                    tracing::warn!(connector = %name, error = %reason, "connector interrupted; restarting");
                    self.log.push(format!(
                        "[runtime] interrupted, restarting in 1 s: {reason}"
                    ));
                    self.set_state(State::Retrying(reason));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if *self.control.borrow() == Control::Stop {
                        *lock(&self.state) = State::Stopped;
                        return;
                    }
                }
            }
        }
    }

    fn set_state(&self, state: State) {
        *lock(&self.state) = state;
    }

    /// After a restart: the cluster answers again (the connector's group joined or its
    /// position read), so it is no longer `Retrying`.
    fn running_again(&self) {
        let mut state = lock(&self.state);
        if matches!(*state, State::Retrying(_)) {
            *state = State::Running;
        }
    }

    /// Waits while paused; `false` when asked to stop.
    async fn keep_going(&mut self) -> bool {
        loop {
            let control = *self.control.borrow_and_update();
            match control {
                Control::Run => return true,
                Control::Stop => return false,
                Control::Pause => {
                    self.set_state(State::Paused);
                    if self.control.changed().await.is_err() {
                        return false;
                    }
                    if *self.control.borrow() == Control::Run {
                        self.set_state(State::Running);
                    }
                }
            }
        }
    }

    /// Sleeps `duration` unless told to stop or pause; `false` when told to stop.
    async fn sleep(&mut self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            _ = self.control.changed() => *self.control.borrow() != Control::Stop,
        }
    }

    /// Waits out one backoff step after a transient failure. `Err` when retries are
    /// exhausted, `Ok(false)` when told to stop.
    async fn backoff(
        &mut self,
        attempt: &mut u32,
        since: &mut Option<tokio::time::Instant>,
        reason: &str,
    ) -> Result<bool, Stop> {
        let reason = self.secrets.redact(reason);
        let first = *since.get_or_insert_with(tokio::time::Instant::now);
        if let Some(limit) = self.spec.retry.give_up_after
            && first.elapsed() >= limit
        {
            return Err(Stop::Failed(format!(
                "gave up after retrying for {} ms: {reason}",
                limit.as_millis()
            )));
        }
        let delay = self
            .spec
            .retry
            .initial
            .saturating_mul(1u32 << (*attempt).min(16))
            .min(self.spec.retry.max);
        *attempt += 1;
        self.log.push(format!(
            "[runtime] retrying in {} ms (attempt {attempt}): {reason}",
            delay.as_millis()
        ));
        self.set_state(State::Retrying(reason));
        Ok(self.sleep(delay).await)
    }

    fn chain(&self) -> Result<Vec<Step>, Stop> {
        let mut steps = Vec::new();
        for (i, (step, wasm)) in self
            .spec
            .transforms
            .iter()
            .zip(&self.components.transforms)
            .enumerate()
        {
            let pre = self
                .worker
                .inner
                .transforms
                .prepare(&hex(&Sha256::digest(wasm)), wasm)
                .map_err(|e| Stop::Failed(format!("transforms[{i}]: {}", e.0)))?;
            steps.push(Step {
                pre,
                config: spec::resolve(&step.config, &self.secrets),
                instance: None,
            });
        }
        Ok(steps)
    }

    /// What both loops need: a producer (records, dead letters, positions), the
    /// transform chain, the resolved config and the compiled connector.
    fn prepare(&self, client: &Client) -> Result<Prepared, Stop> {
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::All,
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        );
        let steps = self.chain()?;
        let component = self
            .worker
            .inner
            .host
            .compile(&self.components.connector)
            .map_err(Stop::Failed)?;
        let secrets = self.secrets.clone();
        let opener = Opener {
            worker: self.worker.clone(),
            component: Arc::new(component),
            setup: Setup {
                name: self.spec.name.clone(),
                sandbox: Sandbox {
                    dirs: self.spec.dirs.clone(),
                    network: self.spec.network.clone(),
                    memory_bytes: self.spec.memory_limit_bytes,
                    call_timeout_ms: self.spec.call_timeout_ms,
                },
                config: spec::resolve(&self.spec.config, &self.secrets),
                log: self.log.clone(),
                redact: Arc::new(move |text: &str| secrets.redact(text)),
            },
        };
        Ok((producer, steps, opener))
    }

    fn load_secrets(&mut self) -> Result<(), Stop> {
        self.secrets = spec::read_secrets(&self.spec).map_err(|e| Stop::Failed(e.0))?;
        Ok(())
    }

    /// The worker's client, acting as the connector's principal when it names one.
    async fn client(&self) -> anyhow::Result<runnel_client::Client> {
        let client = self.worker.client().await?;
        Ok(match &self.spec.principal {
            Some(principal) => client.run_as(principal),
            None => client,
        })
    }

    async fn run_source(&mut self) -> Result<Stop, Interrupted> {
        if let Err(stop) = self.load_secrets() {
            return Ok(stop);
        }
        let client = self.client().await?;
        let topic = self.spec.topics[0].clone();
        let position = read_position(&client, &self.spec.name).await?;
        self.running_again();
        if let Some((p, records)) = &position {
            *lock(&self.stats.position) = String::from_utf8_lossy(p).into_owned();
            self.log.push(format!(
                "[runtime] resuming after {records} records at the committed position"
            ));
        }
        let (producer, mut steps, opener) = match self.prepare(&client) {
            Ok(prepared) => prepared,
            Err(stop) => return Ok(stop),
        };
        let mut instance: Option<SourceInstance> = None;
        let mut commits = Commits {
            total: position.as_ref().map_or(0, |(_, n)| *n),
            committed: position,
            pending: None,
        };
        let mut attempt = 0u32;
        let mut since = None;
        let mut inflight: Option<InFlight> = None;
        loop {
            if *self.control.borrow() != Control::Run {
                // Finish what is in flight before pausing or stopping.
                if let Some(stop) = self
                    .settle(&producer, inflight.take(), &mut commits)
                    .await?
                {
                    return Ok(stop);
                }
                self.drain(&mut commits).await?;
            }
            if !self.keep_going().await {
                return Ok(Stop::Done);
            }
            // Call the connector on a blocking thread: it may wait on files or sockets.
            let current = instance.take();
            let opener = opener.clone();
            let start_at = commits.committed.as_ref().map(|(p, _)| p.clone());
            let max = self.spec.batch_records;
            let (current, polled) = tokio::task::spawn_blocking(move || {
                let mut current = match current {
                    Some(live) => live,
                    None => match opener.source(start_at.as_deref()) {
                        Ok(live) => live,
                        Err(err) => return (None, Err(err)),
                    },
                };
                let polled = current.poll(max);
                (Some(current), polled)
            })
            .await?;
            let mut polled = match polled {
                Ok(polled) => {
                    instance = current;
                    polled
                }
                Err(CallError::Retry(reason)) => {
                    // A retry value leaves the instance usable; a failed open does not exist.
                    instance = current;
                    match self.backoff(&mut attempt, &mut since, &reason).await {
                        Ok(true) => continue,
                        Ok(false) => return Ok(Stop::Done),
                        Err(stop) => return Ok(stop),
                    }
                }
                Err(CallError::Fatal(reason)) => return Ok(Stop::Failed(reason)),
            };
            if attempt > 0 {
                attempt = 0;
                since = None;
                self.set_state(State::Running);
            }
            let records = match decode_source_batch(std::mem::take(&mut polled.records)) {
                Ok(records) => records,
                Err(reason) => return Ok(Stop::Failed(reason)),
            };
            if records.is_empty() {
                if let Some(stop) = self
                    .settle(&producer, inflight.take(), &mut commits)
                    .await?
                {
                    return Ok(stop);
                }
                if let Some(new) = polled.position
                    && commits.committed.as_ref().map(|(p, _)| p) != Some(&new)
                {
                    let delivery =
                        send_position(&producer, &self.spec.name, &new, commits.total).await?;
                    commits.pending = Some((delivery, new, commits.total));
                    self.drain(&mut commits).await?;
                }
                if !self
                    .sleep(Duration::from_millis(u64::from(polled.idle_ms.max(1))))
                    .await
                {
                    return Ok(Stop::Done);
                }
                continue;
            }
            let count = records.len() as u64;
            let (outputs, failures) = match self.run_chain(&mut steps, records.clone()).await {
                Ok(done) => done,
                Err(stop) => return Ok(stop),
            };
            let mut deliveries: Vec<(usize, Delivery)> = Vec::with_capacity(outputs.len());
            for rec in outputs {
                let origin = rec.origin;
                deliveries.push((origin, producer.send(to_producer(&topic, rec)).await?));
            }
            // The previous batch is acknowledged, and its position committed, while this
            // one is on its way.
            let previous = inflight.replace(InFlight {
                deliveries,
                failures,
                records,
                position: polled.position,
                count,
            });
            if let Some(stop) = self.settle(&producer, previous, &mut commits).await? {
                return Ok(stop);
            }
        }
    }

    /// Waits for a batch's acknowledgements, applies the error policy to what was
    /// refused, then sends the commit of the batch's position. The commit is awaited by
    /// the next call (or [`Task::drain`]), so it does not queue behind the next batch.
    /// `Some` when the connector must stop.
    async fn settle(
        &self,
        producer: &Producer,
        flight: Option<InFlight>,
        commits: &mut Commits,
    ) -> Result<Option<Stop>, Interrupted> {
        self.drain(commits).await?;
        let Some(flight) = flight else {
            return Ok(None);
        };
        let mut refused = flight.failures;
        for (origin, delivery) in flight.deliveries {
            if let Err(err) = delivery.await {
                if err.is_retriable() {
                    return Err(anyhow::Error::from(err).context("producing to the topic"));
                }
                refused.push((origin, format!("the broker refused the record: {err}")));
            }
        }
        let records = &flight.records;
        if let Some(stop) = self
            .handle_refused(producer, &refused, |i| {
                let r = &records[i];
                (r.key.clone(), r.value.clone(), r.headers.clone(), None)
            })
            .await?
        {
            return Ok(Some(stop));
        }
        commits.total += flight.count;
        self.stats
            .records
            .fetch_add(flight.count, Ordering::Relaxed);
        if let Some(new) = flight.position {
            let delivery = send_position(producer, &self.spec.name, &new, commits.total).await?;
            commits.pending = Some((delivery, new, commits.total));
        }
        Ok(None)
    }

    /// Waits for the position commit in flight, if any.
    async fn drain(&self, commits: &mut Commits) -> Result<(), Interrupted> {
        if let Some((delivery, position, total)) = commits.pending.take() {
            delivery.await.map_err(|err| {
                anyhow::anyhow!("committing the position to {OFFSETS_TOPIC}: {err}")
            })?;
            *lock(&self.stats.position) = String::from_utf8_lossy(&position).into_owned();
            commits.committed = Some((position, total));
        }
        Ok(())
    }

    /// Applies the error policy to refused records; `Some` when the connector must stop.
    async fn handle_refused<'r>(
        &self,
        producer: &Producer,
        refused: &[(usize, String)],
        original: impl Fn(
            usize,
        ) -> (
            Option<Bytes>,
            Option<Bytes>,
            Vec<Header>,
            Option<&'r ConsumerRecord>,
        ),
    ) -> Result<Option<Stop>, Interrupted> {
        if refused.is_empty() {
            return Ok(None);
        }
        self.stats
            .record_errors
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        let mut deliveries = Vec::new();
        for (index, reason) in refused {
            let (key, value, headers, from) = original(*index);
            let where_ = from.map_or_else(
                || format!("record {index} of the batch"),
                |r| format!("record {}-{}@{}", r.topic, r.partition, r.offset),
            );
            let reason = self.secrets.redact(reason);
            match self.spec.policy {
                Policy::Fail => {
                    return Ok(Some(Stop::Failed(format!(
                        "connector {:?} failed on {where_}: {reason}",
                        self.spec.name
                    ))));
                }
                Policy::Skip => self
                    .log
                    .push(format!("[runtime] skipped {where_}: {reason}")),
                Policy::DeadLetter => {
                    let dlq = self.spec.dead_letter_topic.clone().unwrap_or_default();
                    self.log.push(format!(
                        "[runtime] dead-lettered {where_} to {dlq}: {reason}"
                    ));
                    let mut record = ProducerRecord::new(dlq);
                    record.key = key;
                    record.value = value;
                    record.headers = headers;
                    let mut extra = vec![
                        ("runnel.error", reason.clone()),
                        ("runnel.connector", self.spec.name.clone()),
                    ];
                    if let Some(r) = from {
                        record.timestamp_ms = Some(r.timestamp_ms);
                        extra.push(("runnel.source.topic", r.topic.to_string()));
                        extra.push(("runnel.source.partition", r.partition.to_string()));
                        extra.push(("runnel.source.offset", r.offset.to_string()));
                    }
                    for (k, v) in extra {
                        record.headers.push(Header {
                            key: k.into(),
                            value: Some(Bytes::from(v)),
                        });
                    }
                    deliveries.push(producer.send(record).await?);
                }
            }
        }
        for delivery in deliveries {
            delivery
                .await
                .map_err(|err| anyhow::anyhow!("writing to the dead-letter topic: {err}"))?;
        }
        Ok(None)
    }

    /// Runs records through the transform chain: what comes out (with the index of the
    /// record it came from) and the records a transform refused.
    async fn run_chain(&self, steps: &mut Vec<Step>, records: Vec<Rec>) -> Result<Chained, Stop> {
        if steps.is_empty() {
            return Ok((records, Vec::new()));
        }
        let worker = self.worker.clone();
        let name = self.spec.name.clone();
        let log = self.log.clone();
        let mut owned = std::mem::take(steps);
        let (owned, result) = tokio::task::spawn_blocking(move || {
            let result = chain_blocking(&worker.inner.transforms, &name, &log, &mut owned, records);
            (owned, result)
        })
        .await
        .map_err(|err| Stop::Failed(format!("transform task failed: {err}")))?;
        *steps = owned;
        result
    }

    async fn run_sink(&mut self) -> Result<Stop, Interrupted> {
        if let Err(stop) = self.load_secrets() {
            return Ok(stop);
        }
        let client = self.client().await?;
        let mut member = GroupConsumer::join(
            client.clone(),
            &group_name(&self.spec.name),
            &self.spec.topics,
            GroupConfig {
                client_id: group_name(&self.spec.name),
                session_timeout: Duration::from_secs(10),
                auto_commit_interval: None,
                commit_on_revoke: false,
                auto_offset_reset: StartFrom::Earliest,
                consumer: ConsumerConfig {
                    max_wait: Duration::from_millis(200),
                    auto_offset_reset: Some(StartFrom::Earliest),
                    ..ConsumerConfig::default()
                },
                standby_replicas: 0,
            },
        )
        .await?;
        self.running_again();
        let (producer, mut steps, opener) = match self.prepare(&client) {
            Ok(prepared) => prepared,
            Err(stop) => {
                member.leave().await;
                return Ok(stop);
            }
        };
        let mut instance: Option<SinkInstance> = None;
        // Open now, so a bad config or a missing capability shows before any record.
        if let Err(stop) = self.open_sink(&mut instance, &opener).await {
            member.leave().await;
            return Ok(stop);
        }
        // Only what the outside system acknowledged is committed, every commit interval
        // and whenever the input is quiet or the task pauses or stops.
        let mut acknowledged = AckedOffsets::new(Duration::from_millis(
            runnel_streams::runtime::COMMIT_INTERVAL_MS_DEFAULT,
        ));
        let result = loop {
            if *self.control.borrow() != Control::Run {
                acknowledged.commit(&mut member).await?;
            }
            if !self.keep_going().await {
                break Ok(Stop::Done);
            }
            let records = tokio::select! {
                records = member.poll() => records?,
                _ = self.control.changed() => continue,
            };
            if records.is_empty() {
                acknowledged.commit(&mut member).await?;
                continue;
            }
            let mut by_topic: BTreeMap<Arc<str>, Vec<usize>> = BTreeMap::new();
            for (i, r) in records.iter().enumerate() {
                by_topic.entry(r.topic.clone()).or_default().push(i);
            }
            let mut stop = None;
            for (topic, indexes) in by_topic {
                let recs: Vec<Rec> = indexes
                    .iter()
                    .map(|&i| {
                        let r = &records[i];
                        Rec {
                            key: r.key.clone(),
                            value: r.value.clone(),
                            headers: r.headers.clone(),
                            timestamp_ms: r.timestamp_ms,
                            origin: i,
                        }
                    })
                    .collect();
                let (outputs, mut refused) = match self.run_chain(&mut steps, recs).await {
                    Ok(done) => done,
                    Err(s) => {
                        stop = Some(s);
                        break;
                    }
                };
                match self
                    .write_with_retry(&mut instance, &opener, &topic, &records, &outputs)
                    .await
                {
                    Ok(rejected) => refused.extend(rejected),
                    Err(s) => {
                        stop = Some(s);
                        break;
                    }
                }
                if let Some(s) = self
                    .handle_refused(&producer, &refused, |i| {
                        let r = &records[i];
                        (r.key.clone(), r.value.clone(), r.headers.clone(), Some(r))
                    })
                    .await?
                {
                    stop = Some(s);
                    break;
                }
            }
            if let Some(stop) = stop {
                break Ok(stop);
            }
            self.stats
                .records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            acknowledged
                .add(next_offsets(&records), &mut member)
                .await?;
        };
        // What was written before a stop is committed; a failed batch is not added.
        if let Err(err) = acknowledged.commit(&mut member).await {
            tracing::warn!(connector = %self.spec.name, error = %err, "committing the sink's last offsets failed; the next owner writes those records again");
        }
        member.leave().await;
        result
    }

    /// Opens the sink, retrying transient failures.
    async fn open_sink(
        &mut self,
        instance: &mut Option<SinkInstance>,
        opener: &Opener,
    ) -> Result<(), Stop> {
        let mut attempt = 0u32;
        let mut since = None;
        loop {
            let opener = opener.clone();
            let opened = tokio::task::spawn_blocking(move || opener.sink())
                .await
                .map_err(|err| Stop::Failed(format!("connector task failed: {err}")))?;
            match opened {
                Ok(live) => {
                    *instance = Some(live);
                    if attempt > 0 {
                        self.set_state(State::Running);
                    }
                    return Ok(());
                }
                Err(CallError::Fatal(reason)) => return Err(Stop::Failed(reason)),
                Err(CallError::Retry(reason)) => {
                    match self.backoff(&mut attempt, &mut since, &reason).await {
                        Ok(true) => {}
                        Ok(false) => return Err(Stop::Done),
                        Err(stop) => return Err(stop),
                    }
                }
            }
        }
    }

    /// Writes `outputs` (from `topic`) with retries; the records the sink rejected, as
    /// indexes into `records`.
    async fn write_with_retry(
        &mut self,
        instance: &mut Option<SinkInstance>,
        opener: &Opener,
        topic: &str,
        records: &[ConsumerRecord],
        outputs: &[Rec],
    ) -> Result<Vec<(usize, String)>, Stop> {
        let flat = Arc::new(sink_input(records, outputs));
        let mut attempt = 0u32;
        let mut since = None;
        loop {
            let current = instance.take();
            let opener = opener.clone();
            let topic_owned = topic.to_string();
            let flat = flat.clone();
            let (current, result) = tokio::task::spawn_blocking(move || {
                let mut current = match current {
                    Some(live) => live,
                    None => match opener.sink() {
                        Ok(live) => live,
                        Err(err) => return (None, Err(WriteError::Call(err))),
                    },
                };
                let result = current.write(&topic_owned, &flat);
                (Some(current), result)
            })
            .await
            .map_err(|err| Stop::Failed(format!("connector task failed: {err}")))?;
            match result {
                Ok(()) => {
                    *instance = current;
                    if attempt > 0 {
                        self.set_state(State::Running);
                    }
                    return Ok(Vec::new());
                }
                Err(WriteError::Rejected(list)) => {
                    *instance = current;
                    return Ok(list
                        .into_iter()
                        .map(|(index, message)| {
                            let origin = outputs.get(index as usize).map_or(0, |r| r.origin);
                            (origin, message)
                        })
                        .collect());
                }
                Err(WriteError::Call(CallError::Retry(reason))) => {
                    *instance = current;
                    match self.backoff(&mut attempt, &mut since, &reason).await {
                        Ok(true) => {}
                        Ok(false) => return Err(Stop::Done),
                        Err(stop) => return Err(stop),
                    }
                }
                Err(WriteError::Call(CallError::Fatal(reason))) => {
                    return Err(Stop::Failed(reason));
                }
            }
        }
    }
}

/// The flat input a sink receives: each output with the partition and offset of the
/// record it came from.
pub(crate) fn sink_input(records: &[ConsumerRecord], outputs: &[Rec]) -> Vec<u8> {
    let mut inputs = Inputs::default();
    for rec in outputs {
        let from = &records[rec.origin];
        inputs.push(
            (from.partition, from.offset, rec.timestamp_ms),
            rec.key.as_deref(),
            rec.value.as_deref(),
            runnel_client::Header::pairs(&rec.headers),
        );
    }
    inputs.into_flat()
}

/// Decodes a source's batch (flat output format).
pub(crate) fn decode_source_batch(buf: Vec<u8>) -> Result<Vec<Rec>, String> {
    let bytes = Bytes::from(buf);
    let mut records = Vec::new();
    for (i, output) in runnel_flat::read_outputs(&bytes).enumerate() {
        let output = output.map_err(|err| format!("the connector returned {err}"))?;
        records.push(Rec::from_output(&bytes, &output, i));
    }
    Ok(records)
}

pub(crate) fn to_producer(topic: &str, rec: Rec) -> ProducerRecord {
    let mut record = ProducerRecord::new(topic.to_string());
    record.key = rec.key;
    record.value = rec.value;
    record.headers = rec.headers;
    if rec.timestamp_ms >= 0 {
        record.timestamp_ms = Some(rec.timestamp_ms);
    }
    record
}
