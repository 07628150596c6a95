//! The worker: runs connectors, each as a task.
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
//! retried with exponential backoff while the state says `Retrying` and why; records the
//! connector or a transform refuses go to the error policy; a fatal failure stops the
//! connector in state `Failed` with the message. Other connectors are not affected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{
    Acks, Admin, Client, Consumer, ConsumerConfig, ConsumerRecord, Delivery, GroupConfig,
    GroupConsumer, Header, Producer, ProducerConfig, ProducerRecord, StartFrom, v1,
};
use runnel_streams::host::{GuestFailure, Instance, Limits, LogBuffer, WasmHost};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wasmtime::component::Component;

use crate::OFFSETS_TOPIC;
use crate::host::{CallError, ConnectorHost, Sandbox, SinkInstance, SourceInstance, WriteError};
use crate::spec::{self, ConnectorSpec, Kind, Policy, Secrets};

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Invalid(String),
    #[error("connector {0:?} already exists; delete it first or pick another name")]
    Exists(String),
    #[error("unknown connector {0:?}; `runnel connector list` shows the running ones")]
    Unknown(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

/// The consumer group a sink reads as.
pub fn group_name(connector: &str) -> String {
    format!("connect-{connector}")
}

/// The bytes of the components a connector runs.
#[derive(Clone)]
pub struct Components {
    pub connector: Arc<[u8]>,
    /// One per transform step, in order.
    pub transforms: Vec<Arc<[u8]>>,
}

impl Components {
    /// Reads them from the built-in set and the local disk.
    ///
    /// # Errors
    /// A file that cannot be read.
    pub fn load(spec: &ConnectorSpec) -> Result<Self, ConnectError> {
        Self::from_files(spec, &BTreeMap::new())
    }

    /// Takes them from `uploaded` (by absolute path), else from disk.
    ///
    /// # Errors
    /// A component that is neither uploaded nor readable.
    pub fn from_files(
        spec: &ConnectorSpec,
        uploaded: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, ConnectError> {
        let read = |path: &Path, what: &str| -> Result<Arc<[u8]>, ConnectError> {
            if let Some(bytes) = uploaded.get(&path.display().to_string()) {
                return Ok(Arc::from(bytes.as_slice()));
            }
            std::fs::read(path).map(Arc::from).map_err(|err| {
                ConnectError::Invalid(format!(
                    "{}: {what}: cannot read {}: {err}",
                    spec.file,
                    path.display()
                ))
            })
        };
        let connector = match &spec.component {
            spec::Component::Builtin(name) => crate::builtin::component(name)
                .map(Arc::from)
                .ok_or_else(|| ConnectError::Invalid(format!("unknown connector {name:?}")))?,
            spec::Component::File(path) => read(path, "connector")?,
        };
        let mut transforms = Vec::new();
        for (i, step) in spec.transforms.iter().enumerate() {
            transforms.push(read(&step.wasm, &format!("transforms[{i}].wasm"))?);
        }
        Ok(Components {
            connector,
            transforms,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Retrying(String),
    Paused,
    Failed(String),
    Stopped,
}

#[derive(Debug, Default)]
struct Stats {
    records: AtomicU64,
    record_errors: AtomicU64,
    /// The last committed source position, as text.
    position: Mutex<String>,
}

struct Running {
    spec: ConnectorSpec,
    yaml: String,
    components: Components,
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    control: watch::Sender<Control>,
    log: LogBuffer,
    task: tokio::task::JoinHandle<()>,
}

/// Runs connectors; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    host: ConnectorHost,
    transforms: WasmHost,
    brokers: std::sync::OnceLock<Vec<String>>,
    client: tokio::sync::OnceCell<Client>,
    /// Where created connectors are saved (inside a broker); `None` for `connect run`.
    dir: Option<PathBuf>,
    connectors: Mutex<BTreeMap<String, Running>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What is saved of a created connector.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    file: String,
    yaml: String,
    connector_sha256: String,
    transform_sha256: Vec<String>,
    paused: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Worker {
    /// A worker; `save_dir` keeps created connectors across restarts (inside a broker).
    ///
    /// # Errors
    /// The Wasm engines or the directory cannot be set up.
    pub fn new(save_dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match save_dir {
            Some(data) => {
                let dir = data.join("__connect");
                std::fs::create_dir_all(dir.join("wasm"))?;
                Some(dir)
            }
            None => None,
        };
        Ok(Worker {
            inner: Arc::new(Inner {
                host: ConnectorHost::new()?,
                transforms: WasmHost::new()?,
                brokers: std::sync::OnceLock::new(),
                client: tokio::sync::OnceCell::new(),
                dir,
                connectors: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Where the worker reaches the broker.
    pub fn connect_to(&self, brokers: Vec<String>) {
        let _ = self.inner.brokers.set(brokers);
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let brokers = self
            .inner
            .brokers
            .get()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the worker does not know where the broker is"))?;
        let client = self
            .inner
            .client
            .get_or_try_init(|| async move { Client::connect(&brokers).await })
            .await?;
        Ok(client.clone())
    }

    /// Restarts the connectors saved by earlier `create`s.
    ///
    /// # Errors
    /// The save directory cannot be read.
    pub async fn resume_saved(&self) -> anyhow::Result<()> {
        let Some(dir) = self.inner.dir.clone() else {
            return Ok(());
        };
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let result: anyhow::Result<()> = async {
                let saved: Saved = serde_json::from_slice(&std::fs::read(&path)?)?;
                let spec = spec::parse(&saved.file, &saved.yaml)?;
                let read = |sha: &str| -> anyhow::Result<Arc<[u8]>> {
                    Ok(Arc::from(std::fs::read(
                        dir.join("wasm").join(format!("{sha}.wasm")),
                    )?))
                };
                let connector = match &spec.component {
                    spec::Component::Builtin(name) => crate::builtin::component(name)
                        .map(Arc::from)
                        .ok_or_else(|| anyhow::anyhow!("unknown connector {name:?}"))?,
                    spec::Component::File(_) => read(&saved.connector_sha256)?,
                };
                let transforms = saved
                    .transform_sha256
                    .iter()
                    .map(|sha| read(sha))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                self.start(
                    spec,
                    saved.yaml,
                    Components {
                        connector,
                        transforms,
                    },
                    saved.paused,
                )?;
                Ok(())
            }
            .await;
            if let Err(err) = result {
                tracing::error!(file = %path.display(), error = %format!("{err:#}"), "cannot restart a saved connector");
            }
        }
        Ok(())
    }

    /// Checks a connector and starts it.
    ///
    /// # Errors
    /// The name exists; a secret is missing; a topic does not exist; a component is not
    /// Wasm or does not fit its world.
    pub async fn create(
        &self,
        spec: ConnectorSpec,
        yaml: String,
        components: Components,
    ) -> Result<v1::ConnectorStatus, ConnectError> {
        if lock(&self.inner.connectors).contains_key(&spec.name) {
            return Err(ConnectError::Exists(spec.name));
        }
        spec::read_secrets(&spec).map_err(|e| ConnectError::Invalid(e.0))?;
        let admin = Admin::new(self.client().await?);
        for topic in spec.topics.iter().chain(spec.dead_letter_topic.as_ref()) {
            if let Err(err) = admin.describe_topic(topic).await {
                return Err(ConnectError::Invalid(format!(
                    "connector {:?}: topic {topic:?}: {err}; create it with `runnel topic create {topic}`",
                    spec.name
                )));
            }
        }
        self.inner
            .host
            .check(&components.connector, spec.kind)
            .map_err(|m| ConnectError::Invalid(format!("connector {:?}: {m}", spec.name)))?;
        for (i, wasm) in components.transforms.iter().enumerate() {
            self.inner
                .transforms
                .prepare(&hex(&Sha256::digest(wasm)), wasm)
                .map_err(|e| {
                    ConnectError::Invalid(format!(
                        "connector {:?}: transforms[{i}]: {}",
                        spec.name, e.0
                    ))
                })?;
        }
        if let Some(dir) = &self.inner.dir {
            let connector_sha256 = hex(&Sha256::digest(&components.connector));
            let mut transform_sha256 = Vec::new();
            for wasm in &components.transforms {
                let sha = hex(&Sha256::digest(wasm));
                std::fs::write(dir.join("wasm").join(format!("{sha}.wasm")), wasm)
                    .map_err(anyhow::Error::from)?;
                transform_sha256.push(sha);
            }
            if matches!(spec.component, spec::Component::File(_)) {
                std::fs::write(
                    dir.join("wasm").join(format!("{connector_sha256}.wasm")),
                    &components.connector,
                )
                .map_err(anyhow::Error::from)?;
            }
            self.save(&Saved {
                file: spec.file.clone(),
                yaml: yaml.clone(),
                connector_sha256,
                transform_sha256,
                paused: false,
            })
            .map_err(ConnectError::Internal)?;
        }
        let name = spec.name.clone();
        self.start(spec, yaml, components, false)?;
        self.status(&name).await
    }

    fn save(&self, saved: &Saved) -> anyhow::Result<()> {
        let Some(dir) = &self.inner.dir else {
            return Ok(());
        };
        let spec = spec::parse(&saved.file, &saved.yaml)?;
        let path = dir.join(format!("{}.json", spec.name));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(saved)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn set_saved_paused(&self, name: &str, paused: bool) -> anyhow::Result<()> {
        let Some(dir) = &self.inner.dir else {
            return Ok(());
        };
        let path = dir.join(format!("{name}.json"));
        let mut saved: Saved = serde_json::from_slice(&std::fs::read(&path)?)?;
        saved.paused = paused;
        self.save(&saved)
    }

    fn start(
        &self,
        spec: ConnectorSpec,
        yaml: String,
        components: Components,
        paused: bool,
    ) -> anyhow::Result<()> {
        let stats = Arc::new(Stats::default());
        let state = Arc::new(Mutex::new(if paused {
            State::Paused
        } else {
            State::Running
        }));
        let (control, control_rx) =
            watch::channel(if paused { Control::Pause } else { Control::Run });
        let log = LogBuffer::default();
        log.push(format!(
            "[runtime] {} {:?} started",
            kind_name(spec.kind),
            spec.name
        ));
        let task = Task {
            worker: self.clone(),
            spec: spec.clone(),
            components: components.clone(),
            stats: stats.clone(),
            state: state.clone(),
            control: control_rx,
            log: log.clone(),
            secrets: Secrets::default(),
        };
        let task = tokio::spawn(task.run());
        lock(&self.inner.connectors).insert(
            spec.name.clone(),
            Running {
                spec,
                yaml,
                components,
                stats,
                state,
                control,
                log,
                task,
            },
        );
        Ok(())
    }

    /// # Errors
    /// Unknown connector.
    pub async fn status(&self, name: &str) -> Result<v1::ConnectorStatus, ConnectError> {
        let mut status = {
            let connectors = lock(&self.inner.connectors);
            let running = connectors
                .get(name)
                .ok_or_else(|| ConnectError::Unknown(name.to_string()))?;
            describe(running)
        };
        if status.kind == "sink" {
            status.lag = self.lag(name).await.unwrap_or(-1);
        }
        Ok(status)
    }

    async fn lag(&self, name: &str) -> anyhow::Result<i64> {
        let admin = Admin::new(self.client().await?);
        let group = admin.describe_group(&group_name(name)).await?;
        Ok(group
            .partitions
            .iter()
            .map(|p| {
                if p.lag >= 0 {
                    p.lag
                } else {
                    p.log_end_offset.max(0)
                }
            })
            .sum())
    }

    pub async fn list(&self) -> Vec<v1::ConnectorStatus> {
        let names: Vec<String> = lock(&self.inner.connectors).keys().cloned().collect();
        let mut out = Vec::new();
        for name in names {
            if let Ok(status) = self.status(&name).await {
                out.push(status);
            }
        }
        out
    }

    /// # Errors
    /// Unknown connector.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<v1::ConnectorStatus, ConnectError> {
        {
            let connectors = lock(&self.inner.connectors);
            let running = connectors
                .get(name)
                .ok_or_else(|| ConnectError::Unknown(name.to_string()))?;
            running
                .control
                .send_replace(if paused { Control::Pause } else { Control::Run });
            let mut state = lock(&running.state);
            if !matches!(*state, State::Failed(_)) {
                *state = if paused {
                    State::Paused
                } else {
                    State::Running
                };
            }
        }
        self.set_saved_paused(name, paused)?;
        self.status(name).await
    }

    async fn stop(&self, name: &str) -> Result<Running, ConnectError> {
        let running = lock(&self.inner.connectors)
            .remove(name)
            .ok_or_else(|| ConnectError::Unknown(name.to_string()))?;
        running.control.send_replace(Control::Stop);
        let abort = running.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(15), &mut { running.task })
            .await
            .is_err()
        {
            abort.abort();
        }
        Ok(Running {
            task: tokio::spawn(async {}),
            ..running
        })
    }

    /// Stops a connector and starts it again from its committed position.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn restart(&self, name: &str) -> Result<v1::ConnectorStatus, ConnectError> {
        let old = self.stop(name).await?;
        self.start(old.spec, old.yaml, old.components, false)?;
        self.set_saved_paused(name, false)?;
        self.status(name).await
    }

    /// Stops a connector and forgets it. Its committed source position and sink group
    /// offsets stay, so a connector created again with the name resumes.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn delete(&self, name: &str) -> Result<(), ConnectError> {
        self.stop(name).await?;
        if let Some(dir) = &self.inner.dir {
            let _ = std::fs::remove_file(dir.join(format!("{name}.json")));
        }
        Ok(())
    }

    /// Stops every connector, letting each commit what it finished.
    pub async fn shutdown(&self) {
        let names: Vec<String> = lock(&self.inner.connectors).keys().cloned().collect();
        for name in names {
            let _ = self.stop(&name).await;
        }
    }

    /// `(name, state, error)` of every connector.
    pub fn states(&self) -> Vec<(String, String, String)> {
        lock(&self.inner.connectors)
            .iter()
            .map(|(name, r)| {
                let (state, error) = state_text(&lock(&r.state));
                (name.clone(), state.to_string(), error)
            })
            .collect()
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Source => "source",
        Kind::Sink => "sink",
    }
}

fn state_text(state: &State) -> (&'static str, String) {
    match state {
        State::Running => ("Running", String::new()),
        State::Retrying(why) => ("Retrying", why.clone()),
        State::Paused => ("Paused", String::new()),
        State::Failed(why) => ("Failed", why.clone()),
        State::Stopped => ("Stopped", String::new()),
    }
}

fn describe(running: &Running) -> v1::ConnectorStatus {
    let spec = &running.spec;
    let (state, error) = state_text(&lock(&running.state));
    let log = running.log.lines();
    v1::ConnectorStatus {
        name: spec.name.clone(),
        kind: kind_name(spec.kind).into(),
        connector: match &spec.component {
            spec::Component::Builtin(name) => name.clone(),
            spec::Component::File(path) => path.display().to_string(),
        },
        topics: spec.topics.clone(),
        state: state.into(),
        error,
        records: running.stats.records.load(Ordering::Relaxed),
        record_errors: running.stats.record_errors.load(Ordering::Relaxed),
        lag: -1,
        position: lock(&running.stats.position).clone(),
        config: spec.config.iter().cloned().collect(),
        log: log[log.len().saturating_sub(20)..].to_vec(),
        file: spec.file.clone(),
    }
}

/// A record between the outside system and a topic.
#[derive(Debug, Clone)]
struct Rec {
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<Header>,
    /// -1: stamped when produced.
    timestamp_ms: i64,
    /// Index of the record it came from (in the connector's batch).
    origin: usize,
}

/// What comes out of the transform chain, and the records it refused (index, reason).
type Chained = (Vec<Rec>, Vec<(usize, String)>);

/// A source batch sent to the broker and not yet acknowledged.
struct InFlight {
    deliveries: Vec<(usize, Delivery)>,
    /// Records a transform refused (index into `records`, reason).
    failures: Vec<(usize, String)>,
    /// The records as the connector returned them, for the dead-letter topic.
    records: Vec<Rec>,
    position: Option<Vec<u8>>,
    count: u64,
}

/// A source's position commits: the last durable one and the one in flight.
struct Commits {
    /// Records produced up to the last position sent.
    total: u64,
    committed: Option<(Vec<u8>, u64)>,
    pending: Option<(Delivery, Vec<u8>, u64)>,
}

/// How a task ended.
enum Stop {
    /// Stopped on request.
    Done,
    /// Fatal: the connector stays failed.
    Failed(String),
}

/// A broker or transport problem: start over from what was committed.
type Interrupted = anyhow::Error;

struct Task {
    worker: Worker,
    spec: ConnectorSpec,
    components: Components,
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    control: watch::Receiver<Control>,
    log: LogBuffer,
    secrets: Secrets,
}

/// One step of the transform chain.
struct Step {
    pre: Arc<runnel_streams::host::TransformerPre<runnel_streams::host::GuestState>>,
    config: Vec<(String, String)>,
    instance: Option<Instance>,
}

impl Task {
    async fn run(mut self) {
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
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if *self.control.borrow() == Control::Stop {
                        *lock(&self.state) = State::Stopped;
                        return;
                    }
                }
            }
        }
    }

    fn sandbox(&self) -> Sandbox {
        Sandbox {
            dirs: self.spec.dirs.clone(),
            network: self.spec.network.clone(),
            memory_bytes: self.spec.memory_limit_bytes,
            call_timeout_ms: self.spec.call_timeout_ms,
        }
    }

    fn redactor(&self) -> Arc<dyn Fn(&str) -> String + Send + Sync> {
        let secrets = self.secrets.clone();
        Arc::new(move |text: &str| secrets.redact(text))
    }

    fn set_state(&self, state: State) {
        let mut current = lock(&self.state);
        if *current != state {
            *current = state;
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

    fn load_secrets(&mut self) -> Result<(), Stop> {
        self.secrets = spec::read_secrets(&self.spec).map_err(|e| Stop::Failed(e.0))?;
        Ok(())
    }

    async fn run_source(&mut self) -> Result<Stop, Interrupted> {
        if let Err(stop) = self.load_secrets() {
            return Ok(stop);
        }
        let client = self.worker.client().await?;
        let topic = self.spec.topics[0].clone();
        let position = read_position(&client, &self.spec.name).await?;
        if let Some((p, records)) = &position {
            *lock(&self.stats.position) = String::from_utf8_lossy(p).into_owned();
            self.log.push(format!(
                "[runtime] resuming after {records} records at the committed position"
            ));
        }
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::All,
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        );
        let mut steps = match self.chain() {
            Ok(steps) => steps,
            Err(stop) => return Ok(stop),
        };
        let config = spec::resolve(&self.spec.config, &self.secrets);
        let component = match self.worker.inner.host.compile(&self.components.connector) {
            Ok(c) => Arc::new(c),
            Err(m) => return Ok(Stop::Failed(m)),
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
            let worker = self.worker.clone();
            let sandbox = self.sandbox();
            let config = config.clone();
            let start_at = commits.committed.as_ref().map(|(p, _)| p.clone());
            let name = self.spec.name.clone();
            let log = self.log.clone();
            let redact = self.redactor();
            let component = component.clone();
            let max = self.spec.batch_records;
            let (current, polled) = tokio::task::spawn_blocking(move || {
                let mut current = match current {
                    Some(live) => live,
                    None => match worker.inner.host.open_source(
                        &component,
                        &name,
                        &sandbox,
                        &config,
                        start_at.as_deref(),
                        log,
                        redact,
                    ) {
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
                        extra.push(("runnel.source.topic", r.topic.clone()));
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
        let client = self.worker.client().await?;
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
            },
        )
        .await?;
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::All,
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        );
        let mut steps = match self.chain() {
            Ok(steps) => steps,
            Err(stop) => return Ok(stop),
        };
        let config = spec::resolve(&self.spec.config, &self.secrets);
        let component = match self.worker.inner.host.compile(&self.components.connector) {
            Ok(c) => Arc::new(c),
            Err(m) => return Ok(Stop::Failed(m)),
        };
        let mut instance: Option<SinkInstance> = None;
        // Open now, so a bad config or a missing capability shows before any record.
        if let Err(stop) = self.open_sink(&mut instance, &component, &config).await {
            member.leave().await;
            return Ok(stop);
        }
        let result = loop {
            if !self.keep_going().await {
                break Ok(Stop::Done);
            }
            let records = tokio::select! {
                records = member.poll() => records?,
                _ = self.control.changed() => continue,
            };
            if records.is_empty() {
                continue;
            }
            let mut by_topic: BTreeMap<String, Vec<usize>> = BTreeMap::new();
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
                    .write_with_retry(
                        &mut instance,
                        &component,
                        &config,
                        &topic,
                        &records,
                        &outputs,
                    )
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
            // Only what the outside system acknowledged is committed.
            let owned: std::collections::BTreeSet<(String, u32)> =
                member.assignment().into_iter().collect();
            let offsets = next_offsets(&records)
                .into_iter()
                .filter(|(tp, _)| owned.contains(tp))
                .collect();
            member.commit_offsets(offsets).await?;
        };
        member.leave().await;
        result
    }

    /// Opens the sink, retrying transient failures.
    async fn open_sink(
        &mut self,
        instance: &mut Option<SinkInstance>,
        component: &Arc<Component>,
        config: &[(String, String)],
    ) -> Result<(), Stop> {
        let mut attempt = 0u32;
        let mut since = None;
        loop {
            let worker = self.worker.clone();
            let sandbox = self.sandbox();
            let config = config.to_vec();
            let name = self.spec.name.clone();
            let log = self.log.clone();
            let redact = self.redactor();
            let component = component.clone();
            let opened = tokio::task::spawn_blocking(move || {
                worker
                    .inner
                    .host
                    .open_sink(&component, &name, &sandbox, &config, log, redact)
            })
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
    #[allow(clippy::too_many_arguments)]
    async fn write_with_retry(
        &mut self,
        instance: &mut Option<SinkInstance>,
        component: &Arc<Component>,
        config: &[(String, String)],
        topic: &str,
        records: &[ConsumerRecord],
        outputs: &[Rec],
    ) -> Result<Vec<(usize, String)>, Stop> {
        let flat = Arc::new(sink_input(records, outputs));
        let mut attempt = 0u32;
        let mut since = None;
        loop {
            let current = instance.take();
            let worker = self.worker.clone();
            let sandbox = self.sandbox();
            let config = config.to_vec();
            let name = self.spec.name.clone();
            let log = self.log.clone();
            let redact = self.redactor();
            let component = component.clone();
            let topic_owned = topic.to_string();
            let flat = flat.clone();
            let (current, result) = tokio::task::spawn_blocking(move || {
                let mut current = match current {
                    Some(live) => live,
                    None => match worker
                        .inner
                        .host
                        .open_sink(&component, &name, &sandbox, &config, log, redact)
                    {
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
fn sink_input(records: &[ConsumerRecord], outputs: &[Rec]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut headers = Vec::new();
    for rec in outputs {
        let from = &records[rec.origin];
        headers.clear();
        runnel_flat::write_headers(
            &mut headers,
            rec.headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_deref())),
        );
        runnel_flat::write_input(
            &mut buf,
            &runnel_flat::FlatRecord {
                partition: from.partition,
                offset: from.offset,
                timestamp_ms: rec.timestamp_ms,
                key: rec.key.as_deref(),
                value: rec.value.as_deref(),
                headers: &headers,
            },
        );
    }
    buf
}

/// Decodes a source's batch (flat output format).
fn decode_source_batch(buf: Vec<u8>) -> Result<Vec<Rec>, String> {
    let bytes = Bytes::from(buf);
    let mut records = Vec::new();
    for (i, output) in runnel_flat::read_outputs(&bytes).enumerate() {
        let output = output.map_err(|err| format!("the connector returned {err}"))?;
        records.push(Rec {
            key: output.key.map(|k| bytes.slice_ref(k)),
            value: output.value.map(|v| bytes.slice_ref(v)),
            headers: runnel_flat::headers(output.headers)
                .map(|(k, v)| Header {
                    key: k.to_string(),
                    value: v.map(|v| bytes.slice_ref(v)),
                })
                .collect(),
            timestamp_ms: output.timestamp_ms,
            origin: i,
        });
    }
    Ok(records)
}

fn to_producer(topic: &str, rec: Rec) -> ProducerRecord {
    let mut record = ProducerRecord::new(topic.to_string());
    record.key = rec.key;
    record.value = rec.value;
    record.headers = rec.headers;
    if rec.timestamp_ms >= 0 {
        record.timestamp_ms = Some(rec.timestamp_ms);
    }
    record
}

/// Runs records through every step; traps are isolated to their record.
fn chain_blocking(
    host: &WasmHost,
    name: &str,
    log: &LogBuffer,
    steps: &mut [Step],
    mut records: Vec<Rec>,
) -> Result<Chained, Stop> {
    let mut refused: Vec<(usize, String)> = Vec::new();
    for (i, step) in steps.iter_mut().enumerate() {
        let mut run = |input: &[Rec]| -> Result<Result<runnel_streams::host::BatchResult, GuestFailure>, Stop> {
            if step.instance.is_none() {
                let fresh = host
                    .instantiate(
                        &step.pre,
                        name,
                        &step.config,
                        &[String::from("out")],
                        Limits {
                            memory_bytes: runnel_streams::host::MEMORY_LIMIT_BYTES_DEFAULT,
                            cpu_ms: runnel_streams::host::CPU_LIMIT_MS_DEFAULT,
                        },
                        log.clone(),
                    )
                    .map_err(|e| Stop::Failed(format!("transforms[{i}]: {}", e.0)))?;
                step.instance = Some(fresh);
            }
            let Some(live) = step.instance.as_mut() else {
                return Err(Stop::Failed("no transform instance".into()));
            };
            let result = live.process(&chain_input(input));
            if result.is_err() {
                step.instance = None;
            }
            Ok(result)
        };
        let mut next: Vec<Rec> = Vec::with_capacity(records.len());
        match run(&records)? {
            Ok(result) => collect_step(i, &records, 0, result, &mut next, &mut refused),
            Err(failure) => {
                log.push(format!(
                    "[runtime] transforms[{i}] {}; isolating the record",
                    failure.0
                ));
                for (j, record) in records.iter().enumerate() {
                    match run(std::slice::from_ref(record))? {
                        Ok(result) => {
                            collect_step(i, &records[j..=j], 0, result, &mut next, &mut refused);
                        }
                        Err(failure) => {
                            refused.push((record.origin, format!("transforms[{i}] {}", failure.0)))
                        }
                    }
                }
            }
        }
        records = next;
    }
    Ok((records, refused))
}

fn chain_input(records: &[Rec]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut headers = Vec::new();
    for (i, r) in records.iter().enumerate() {
        headers.clear();
        runnel_flat::write_headers(
            &mut headers,
            r.headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_deref())),
        );
        runnel_flat::write_input(
            &mut buf,
            &runnel_flat::FlatRecord {
                partition: 0,
                offset: i as i64,
                timestamp_ms: r.timestamp_ms,
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                headers: &headers,
            },
        );
    }
    buf
}

fn collect_step(
    step: usize,
    inputs: &[Rec],
    _base: usize,
    result: runnel_streams::host::BatchResult,
    next: &mut Vec<Rec>,
    refused: &mut Vec<(usize, String)>,
) {
    let mut bad: BTreeMap<usize, String> = BTreeMap::new();
    for (index, message) in result.errors {
        let index = (index as usize).min(inputs.len().saturating_sub(1));
        bad.insert(index, format!("transforms[{step}]: {message}"));
    }
    let bytes = Bytes::from(result.records);
    let mut emitted = Vec::new();
    for output in runnel_flat::read_outputs(&bytes) {
        let Ok(output) = output else {
            bad.entry(0)
                .or_insert_with(|| format!("transforms[{step}] wrote a malformed batch"));
            break;
        };
        let Some(input) = inputs.get(output.input_index as usize) else {
            continue;
        };
        emitted.push((
            output.input_index as usize,
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
                origin: input.origin,
            },
        ));
    }
    next.extend(
        emitted
            .into_iter()
            .filter(|(i, _)| !bad.contains_key(i))
            .map(|(_, r)| r),
    );
    for (index, message) in bad {
        if let Some(input) = inputs.get(index) {
            refused.push((input.origin, message));
        }
    }
}

/// The offset after each partition's last record.
fn next_offsets(records: &[ConsumerRecord]) -> BTreeMap<(String, u32), i64> {
    let mut offsets = BTreeMap::new();
    for r in records {
        let next = offsets
            .entry((r.topic.clone(), r.partition))
            .or_insert(r.offset + 1);
        *next = (*next).max(r.offset + 1);
    }
    offsets
}

/// A source's committed progress, as stored in `__connect_offsets`.
#[derive(Debug, Serialize, Deserialize)]
struct Committed {
    /// The position, as UTF-8 text when it is, else hex.
    position: String,
    #[serde(default)]
    hex: bool,
    /// Records produced by the connector up to this position.
    records: u64,
}

/// Sends a source's position to `__connect_offsets`; the delivery says when it is durable.
async fn send_position(
    producer: &Producer,
    name: &str,
    position: &[u8],
    records: u64,
) -> Result<Delivery, Interrupted> {
    let committed = match std::str::from_utf8(position) {
        Ok(text) => Committed {
            position: text.to_string(),
            hex: false,
            records,
        },
        Err(_) => Committed {
            position: hex(position),
            hex: true,
            records,
        },
    };
    let record = ProducerRecord::new(OFFSETS_TOPIC)
        .key(name.to_string())
        .value(serde_json::to_vec(&committed)?);
    Ok(producer.send(record).await?)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The last position committed by connector `name`, with its record count.
async fn read_position(client: &Client, name: &str) -> Result<Option<(Vec<u8>, u64)>, Interrupted> {
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            max_wait: Duration::from_millis(50),
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign(OFFSETS_TOPIC, None, StartFrom::Earliest)
        .await?;
    let ends = consumer.end_offsets().await?;
    let mut last: Option<Option<Committed>> = None;
    loop {
        let done = ends.iter().all(|((topic, partition), end)| {
            consumer
                .position(topic, *partition)
                .is_none_or(|p| p >= *end)
        });
        if done {
            break;
        }
        for record in consumer.poll().await? {
            if record.key.as_deref() != Some(name.as_bytes()) {
                continue;
            }
            last = Some(
                record
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_slice::<Committed>(v).ok()),
            );
        }
    }
    Ok(last.flatten().and_then(|c| {
        let position = if c.hex {
            unhex(&c.position)?
        } else {
            c.position.into_bytes()
        };
        Some((position, c.records))
    }))
}
