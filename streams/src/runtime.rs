//! Deployments: each a task that reads its input topic as consumer group
//! `transform-NAME`, runs the guest once per batch, produces what it emits, and commits
//! the input offsets only after every emitted record was acknowledged (at-least-once).
//!
//! A guest error value for a record, or a trap isolated to one record, goes to the error
//! policy: `fail` stops the deployment without committing the batch, `skip` logs and
//! drops the record, `dead-letter` writes the input record with the error in headers to
//! the dead-letter topic. The loop is written so that exactly-once (output, state and
//! offsets in one transaction) can replace the produce-then-commit step.
//!
//! Deployments are defined cluster-wide in the deployment store (`store.rs`): every
//! broker runs one member of every transform, so the members share the input
//! partitions through the group, and a broker's death hands its partitions to the
//! others. A command taken by any broker writes the store; each broker's runtime then
//! reconciles what it runs with what the store says. Status, list and logs gather what
//! every live broker reports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use runnel_client::{
    Acks, Admin, BatchBuilder, BatchOptions, Client, ConnectOptions, ConsumerConfig, Delivery,
    GroupConfig, GroupConsumer, Header, LazyClient, Producer, ProducerConfig, ProducerRecord,
    RecordParts, StartFrom, v1,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::host::{
    BatchResult, CPU_LIMIT_MS_DEFAULT, GuestFailure, Instance, Limits, LogBuffer,
    MEMORY_LIMIT_BYTES_DEFAULT, WasmHost,
};
use crate::host::{Prepared, Setup};
use crate::input::Inputs;
use crate::offsets::AckedOffsets;
use crate::spec::{self, Start};
use crate::standby::Standbys;
use crate::state::{self, ChangelogWrite, TaskState, Timer};
use crate::store::{self, Definition, Kind, Reconciler, Store};
use crate::tasks::{self, SharedTasks};

/// How long a command waits for the live brokers to run what it changed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a runtime looks for local state of removed deployments.
const GARBAGE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a broker waits for another's status.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a deploy or an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown transform {0:?}")]
    Unknown(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Default)]
struct Stats {
    records_in: AtomicU64,
    records_out: AtomicU64,
    record_errors: AtomicU64,
    /// How long the guest took per batch (state and output encoding included).
    batch_duration: runnel_metrics::Histogram,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Failed(String),
}

/// The spec of a deployment as stored, with (not stored in the spec itself) the
/// component, version and pause flag of the definition it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Saved {
    name: String,
    input_topic: String,
    pub(crate) output_topics: Vec<String>,
    config: BTreeMap<String, String>,
    error_policy: i32,
    dead_letter_topic: String,
    start: String,
    memory_limit_bytes: u64,
    cpu_limit_ms: u32,
    #[serde(default)]
    processing: i32,
    #[serde(default)]
    commit_interval_ms: u32,
    #[serde(default)]
    stores: Vec<String>,
    /// Table stores: store → the compacted topic it is kept from.
    #[serde(default)]
    tables: BTreeMap<String, String>,
    #[serde(default)]
    allowed_lateness_ms: i64,
    #[serde(default)]
    standby_replicas: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    principal: String,
    #[serde(skip)]
    sha256: String,
    #[serde(skip)]
    version: u32,
    #[serde(skip)]
    paused: bool,
}

/// A deployment saved on one broker's disk before definitions were stored cluster-wide;
/// imported into the store once.
#[derive(Deserialize)]
struct LocalSaved {
    #[serde(flatten)]
    spec: Saved,
    sha256: String,
    version: u32,
    paused: bool,
}

impl Saved {
    pub(crate) fn from_spec(spec: &v1::TransformSpec) -> Saved {
        Saved {
            name: spec.name.clone(),
            input_topic: spec.input_topic.clone(),
            output_topics: spec.output_topics.clone(),
            config: spec.config.clone().into_iter().collect(),
            error_policy: spec.error_policy,
            dead_letter_topic: spec.dead_letter_topic.clone(),
            start: spec.start.clone(),
            memory_limit_bytes: spec.memory_limit_bytes,
            cpu_limit_ms: spec.cpu_limit_ms,
            processing: spec.processing,
            commit_interval_ms: spec.commit_interval_ms,
            stores: spec.stores.clone(),
            tables: spec.tables.clone().into_iter().collect(),
            allowed_lateness_ms: spec.allowed_lateness_ms,
            standby_replicas: spec.standby_replicas,
            principal: spec.principal.clone(),
            sha256: String::new(),
            version: 0,
            paused: false,
        }
    }

    fn from_definition(definition: &Definition) -> anyhow::Result<Saved> {
        let mut saved: Saved = serde_json::from_value(definition.spec.clone())
            .context("the stored transform spec is unreadable")?;
        saved.sha256 = definition
            .components
            .first()
            .cloned()
            .context("the stored transform names no component")?;
        saved.version = definition.version;
        saved.paused = definition.paused;
        Ok(saved)
    }

    fn definition(&self) -> anyhow::Result<Definition> {
        Ok(Definition {
            spec: serde_json::to_value(self)?,
            components: vec![self.sha256.clone()],
            paused: self.paused,
            version: self.version,
            restarts: 0,
        })
    }

    fn spec(&self) -> v1::TransformSpec {
        v1::TransformSpec {
            name: self.name.clone(),
            input_topic: self.input_topic.clone(),
            output_topics: self.output_topics.clone(),
            config: self.config.clone().into_iter().collect(),
            error_policy: self.error_policy,
            dead_letter_topic: self.dead_letter_topic.clone(),
            start: self.start.clone(),
            memory_limit_bytes: self.memory_limit_bytes,
            cpu_limit_ms: self.cpu_limit_ms,
            processing: self.processing,
            commit_interval_ms: self.commit_interval_ms,
            stores: self.stores.clone(),
            tables: self.tables.clone().into_iter().collect(),
            allowed_lateness_ms: self.allowed_lateness_ms,
            standby_replicas: self.standby_replicas,
            principal: self.principal.clone(),
        }
    }

    pub(crate) fn layout(&self) -> state::Layout {
        state::Layout {
            declared: self.stores.clone(),
            tables: self
                .tables
                .iter()
                .map(|(store, topic)| (store.clone(), topic.clone()))
                .collect(),
        }
    }

    /// `stores`: the layout's guest names.
    fn setup<'a>(
        &'a self,
        config: &'a [(String, String)],
        stores: &'a [String],
        log: LogBuffer,
    ) -> Setup<'a> {
        Setup {
            name: &self.name,
            config,
            outputs: &self.output_topics,
            stores,
            allowed_lateness_ms: self.allowed_lateness_ms,
            limits: self.limits(),
            log,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            memory_bytes: if self.memory_limit_bytes == 0 {
                MEMORY_LIMIT_BYTES_DEFAULT
            } else {
                self.memory_limit_bytes
            },
            cpu_ms: if self.cpu_limit_ms == 0 {
                CPU_LIMIT_MS_DEFAULT
            } else {
                self.cpu_limit_ms
            },
        }
    }
}

struct Deployment {
    saved: Saved,
    /// Stateful components: this broker's tasks.
    tasks: Option<SharedTasks>,
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    control: watch::Sender<Control>,
    log: LogBuffer,
    task: tokio::task::JoinHandle<()>,
}

/// The streams runtime: hosts this broker's members of the cluster's deployments.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    host: Arc<WasmHost>,
    /// Where deployments were saved before the store (imported once).
    local_dir: PathBuf,
    /// The broker's data directory (tasks keep their stores under `__state`).
    data_dir: PathBuf,
    client: LazyClient,
    store: std::sync::OnceLock<(Store, u32)>,
    deployments: Mutex<BTreeMap<String, Deployment>>,
    /// One reconciliation at a time.
    reconciling: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Runtime {
    /// Creates the runtime. Tell it where the broker is with [`Runtime::connect_to`], and
    /// start it with [`Runtime::run_from`] once the broker serves.
    ///
    /// # Errors
    /// The Wasm engine cannot be set up.
    pub fn new(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Runtime {
            inner: Arc::new(Inner {
                host: Arc::new(WasmHost::new()?),
                local_dir: data_dir.join("__transforms"),
                data_dir: data_dir.to_path_buf(),
                client: LazyClient::default(),
                store: std::sync::OnceLock::new(),
                deployments: Mutex::new(BTreeMap::new()),
                reconciling: tokio::sync::Mutex::new(()),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// Where the runtime reaches the broker (as a client), and how (`options.local`:
    /// the broker when it runs in this process).
    pub fn connect_to(&self, brokers: Vec<String>, options: ConnectOptions) {
        self.inner.client.connect_to(brokers, options);
    }

    async fn client(&self) -> anyhow::Result<Client> {
        Ok(self.inner.client.get().await?)
    }

    fn store(&self) -> Result<(&Store, u32), DeployError> {
        self.inner
            .store
            .get()
            .map(|(store, id)| (store, *id))
            .ok_or_else(|| DeployError::Internal(anyhow::anyhow!("the runtime is not started")))
    }

    /// Runs this broker's members of the deployments in `store` (`node_id` is this
    /// broker), from now on and as the store changes. Deployments saved on this broker's
    /// disk by an earlier version are moved into the store first.
    ///
    /// # Errors
    /// The runtime was started already.
    pub fn run_from(&self, store: Store, node_id: u32) -> anyhow::Result<()> {
        self.inner
            .store
            .set((store.clone(), node_id))
            .map_err(|_| anyhow::anyhow!("the streams runtime is started already"))?;
        // Also periodically: another broker may have deleted a removed deployment's
        // changelogs, which frees this broker's copy of its state.
        store::spawn_reconciler(store, self.clone(), Some(GARBAGE_INTERVAL));
        Ok(())
    }
}

impl store::Reconciler for Runtime {
    /// Moves deployments saved under `<data>/__transforms` into the store (unless it
    /// has one of that name), renaming each file to `.imported`.
    async fn import_local(&self, store: &Store) -> anyhow::Result<()> {
        for (path, local) in store::saved_files::<LocalSaved>(&self.inner.local_dir)? {
            let name = local.spec.name.clone();
            if store.snapshot().get(Kind::Transform, &name).is_none() {
                let wasm_path = self
                    .inner
                    .local_dir
                    .join("wasm")
                    .join(format!("{}.wasm", local.sha256));
                let wasm = std::fs::read(&wasm_path)
                    .with_context(|| format!("reading {}", wasm_path.display()))?;
                let mut saved = local.spec;
                saved.sha256 = store.put_component(&wasm).await?;
                saved.version = local.version;
                saved.paused = local.paused;
                store
                    .put(Kind::Transform, &name, Some(&saved.definition()?))
                    .await?;
                tracing::info!(transform = %name, "imported a transform saved on this broker into {}", store::TOPIC);
            }
            store::mark_imported(&path)?;
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    /// Makes this broker run one member of every stored deployment, at its stored
    /// version and pause state, and nothing else.
    async fn reconcile(&self) {
        let Ok((store, _)) = self.store() else {
            return;
        };
        let _one = self.inner.reconciling.lock().await;
        if self.inner.stopping.load(Ordering::Relaxed) {
            return;
        }
        let snapshot = store.snapshot();
        if !snapshot.caught_up {
            return;
        }
        let wanted: BTreeMap<String, Definition> = snapshot
            .of(Kind::Transform)
            .map(|(name, d)| (name.clone(), d.clone()))
            .collect();
        let replaced: Vec<String> = lock(&self.inner.deployments)
            .iter()
            .filter(|(name, d)| {
                wanted
                    .get(*name)
                    .is_none_or(|w| w.version != d.saved.version)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in replaced {
            self.stop_local(&name).await;
        }
        for (name, definition) in wanted {
            let running = lock(&self.inner.deployments)
                .get(&name)
                .map(|d| d.saved.paused);
            match running {
                Some(paused) if paused == definition.paused => {}
                Some(_) => self.set_local_paused(&name, definition.paused),
                None => {
                    if let Err(err) = self.start_stored(store, &definition) {
                        tracing::error!(transform = %name, error = %format!("{err:#}"), "cannot start the transform");
                    }
                }
            }
        }
        self.collect_garbage().await;
    }
}

impl Runtime {
    fn start_stored(&self, store: &Store, definition: &Definition) -> anyhow::Result<()> {
        let saved = Saved::from_definition(definition)?;
        let wasm = store.component(&saved.sha256)?;
        self.start(saved, &wasm)
    }

    /// Deploys (or redeploys) a transform on every broker.
    ///
    /// # Errors
    /// An invalid spec, unknown topics, a component that does not compile or whose
    /// `init` refuses the config, or a store that cannot be written.
    pub async fn deploy(
        &self,
        spec: v1::TransformSpec,
        wasm: &[u8],
    ) -> Result<v1::TransformStatus, DeployError> {
        spec::validate(&spec).map_err(|err| DeployError::Invalid(format!("{err:#}")))?;
        let client = self.client().await?;
        let admin = Admin::new(client.clone());
        let mut topics: Vec<&String> = spec
            .output_topics
            .iter()
            .chain([&spec.input_topic])
            .collect();
        if !spec.dead_letter_topic.is_empty() {
            topics.push(&spec.dead_letter_topic);
        }
        for topic in topics {
            if let Err(err) = admin.describe_topic(topic).await {
                return Err(DeployError::Invalid(format!("topic {topic:?}: {err}")));
            }
        }
        let mut saved = Saved::from_spec(&spec);
        saved.sha256 = store::sha256_hex(wasm);
        // Compile and initialise once now, so a broken component or config is refused here.
        let pre = self
            .inner
            .host
            .prepare(&saved.sha256, wasm)
            .map_err(|e| DeployError::Invalid(e.0))?;
        let config: Vec<(String, String)> = saved.config.clone().into_iter().collect();
        self.inner
            .host
            .instantiate(
                &pre,
                saved.setup(&config, &saved.layout().guest_names(), LogBuffer::default()),
            )
            .map_err(|e| DeployError::Invalid(e.0))?;
        if pre.is_stateful() {
            create_changelogs(&client, &admin, &saved).await?;
        } else if !saved.layout().guest_names().is_empty() {
            return Err(DeployError::Invalid(format!(
                "the deployment declares stores {:?} but the component is a stateless runnel:transform@0.1.0 one; build it with runnel_sdk::export_stateful_transform! or declare no stores",
                saved.layout().guest_names()
            )));
        }
        let (store, _) = self.store()?;
        let snapshot = store.caught_up().await?;
        saved.version = snapshot
            .get(Kind::Transform, &spec.name)
            .map_or(1, |d| d.version + 1);
        store.put_component(wasm).await?;
        store
            .put(Kind::Transform, &spec.name, Some(&saved.definition()?))
            .await?;
        self.reconcile().await;
        self.settled_status(&spec.name, |s| s.state != "Starting")
            .await
    }

    /// The cluster's status of `name` once `done` holds of it (or after
    /// [`SETTLE_TIMEOUT`], as it is then).
    async fn settled_status(
        &self,
        name: &str,
        done: impl Fn(&v1::TransformStatus) -> bool,
    ) -> Result<v1::TransformStatus, DeployError> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        let live = self.live_count().await;
        loop {
            let status = self.status(name).await?;
            let everywhere = status.brokers.len() >= live;
            if (done(&status) && everywhere) || tokio::time::Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn live_count(&self) -> usize {
        match self.client().await {
            Ok(client) => store::live_brokers(&client).await.map_or(1, |b| b.len()),
            Err(_) => 1,
        }
    }

    fn start(&self, saved: Saved, wasm: &[u8]) -> anyhow::Result<()> {
        let pre = self
            .inner
            .host
            .prepare(&saved.sha256, wasm)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        let stats = Arc::new(Stats::default());
        let initial = if saved.paused {
            Control::Pause
        } else {
            Control::Run
        };
        let state = Arc::new(Mutex::new(if saved.paused {
            State::Paused
        } else {
            State::Running
        }));
        let (control, control_rx) = watch::channel(initial);
        let log = LogBuffer::default();
        let tasks = pre
            .is_stateful()
            .then(|| tasks::Tasks::new(&self.inner.data_dir, &saved.name, &saved.layout()));
        let standbys = tasks
            .as_ref()
            .filter(|_| saved.standby_replicas > 0)
            .map(|tasks| Standbys::new(tasks.clone(), &saved.name));
        log.push(format!(
            "[runtime] version {} started (component sha256 {})",
            saved.version, saved.sha256
        ));
        let task = tokio::spawn(run(
            self.clone(),
            Task {
                saved: saved.clone(),
                tasks: tasks.clone(),
                standbys,
                pre,
                stats: stats.clone(),
                state: state.clone(),
                control: control_rx,
                log: log.clone(),
            },
        ));
        lock(&self.inner.deployments).insert(
            saved.name.clone(),
            Deployment {
                saved,
                tasks,
                stats,
                state,
                control,
                log,
                task,
            },
        );
        Ok(())
    }

    /// Writes each deployment this broker runs: records in and out, errors, state,
    /// tasks and batch durations (Prometheus).
    pub fn collect_metrics(&self, out: &mut runnel_metrics::Exposition) {
        for status in self.local_list() {
            let Some(spec) = &status.spec else { continue };
            let labels = [("transform", spec.name.as_str())];
            let Some(deployment) = lock(&self.inner.deployments)
                .get(&spec.name)
                .map(|d| d.stats.clone())
            else {
                continue;
            };
            out.counter(
                "runnel_transform_records_in_total",
                "Input records a transform's member on this broker processed.",
                &labels,
                status.records_in,
            );
            out.counter(
                "runnel_transform_records_out_total",
                "Records a transform's member on this broker emitted.",
                &labels,
                status.records_out,
            );
            out.counter(
                "runnel_transform_record_errors_total",
                "Records and timers a transform's error policy handled on this broker.",
                &labels,
                status.record_errors,
            );
            for state in ["Running", "Paused", "Failed"] {
                out.gauge(
                    "runnel_transform_state",
                    "1 for the state a transform's member on this broker is in (Running, Paused or Failed).",
                    &[labels[0], ("state", state)],
                    f64::from(u8::from(status.state == state)),
                );
            }
            for state in ["Running", "Restoring", "Standby"] {
                out.gauge(
                    "runnel_transform_tasks",
                    "Tasks (input partitions) of a stateful transform on this broker, by state.",
                    &[labels[0], ("state", state)],
                    status.tasks.iter().filter(|t| t.state == state).count() as f64,
                );
            }
            out.histogram(
                "runnel_transform_batch_duration_seconds",
                "Time the guest took per batch, state and output encoding included.",
                &labels,
                &deployment.batch_duration,
            );
        }
    }

    /// What this broker runs, as it runs it (no lag: that is the cluster's).
    pub fn local_list(&self) -> Vec<v1::TransformStatus> {
        let own = self.store().map_or(0, |(_, id)| id);
        lock(&self.inner.deployments)
            .values()
            .map(|d| {
                let (state, error) = match lock(&d.state).clone() {
                    State::Running => ("Running", String::new()),
                    State::Paused => ("Paused", String::new()),
                    State::Failed(reason) => ("Failed", reason),
                };
                v1::TransformStatus {
                    spec: Some(d.saved.spec()),
                    state: state.into(),
                    error,
                    records_in: d.stats.records_in.load(Ordering::Relaxed),
                    records_out: d.stats.records_out.load(Ordering::Relaxed),
                    record_errors: d.stats.record_errors.load(Ordering::Relaxed),
                    lag: -1,
                    version: d.saved.version,
                    wasm_sha256: d.saved.sha256.clone(),
                    brokers: Vec::new(),
                    tasks: d
                        .tasks
                        .as_ref()
                        .map(|t| tasks::lock(t).statuses(own))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// What every live broker runs, by broker id, and with `logs_of` that deployment's
    /// log lines of each.
    async fn gather(
        &self,
        logs_of: Option<&str>,
    ) -> (BTreeMap<u32, Vec<v1::TransformStatus>>, Vec<String>) {
        let own = self.store().map_or(0, |(_, id)| id);
        let mut statuses = BTreeMap::new();
        let mut lines = Vec::new();
        statuses.insert(own, self.local_list());
        if let Some(name) = logs_of
            && let Ok(local) = self.local_logs(name)
        {
            lines.extend(local.into_iter().map(|l| format!("[broker {own}] {l}")));
        }
        let (live, admin) = match self.client().await {
            Ok(client) => (
                store::live_brokers(&client).await.unwrap_or_default(),
                Some(Admin::new(client)),
            ),
            Err(_) => (Vec::new(), None),
        };
        for broker in live.into_iter().filter(|b| b.id != own) {
            let Some(admin) = &admin else { break };
            let asked = tokio::time::timeout(
                PEER_TIMEOUT,
                admin.local_transforms(&broker.address, logs_of),
            )
            .await;
            match asked {
                Ok(Ok((list, broker_lines))) => {
                    statuses.insert(broker.id, list);
                    lines.extend(
                        broker_lines
                            .into_iter()
                            .map(|l| format!("[broker {}] {l}", broker.id)),
                    );
                }
                Ok(Err(err)) => {
                    tracing::debug!(broker = broker.id, error = %err, "no transform status from the broker");
                }
                Err(_) => {
                    tracing::debug!(
                        broker = broker.id,
                        "no transform status from the broker in time"
                    );
                }
            }
        }
        (statuses, lines)
    }

    /// The cluster's status of every deployment: the stored definition, and what the
    /// brokers running its current version report.
    async fn cluster_statuses(&self, only: Option<&str>) -> Vec<v1::TransformStatus> {
        let Ok((store, _)) = self.store() else {
            return Vec::new();
        };
        let snapshot = store.snapshot();
        let (statuses, _) = self.gather(None).await;
        let mut out = Vec::new();
        for (name, definition) in snapshot.of(Kind::Transform) {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let Ok(saved) = Saved::from_definition(definition) else {
                continue;
            };
            let mut status = v1::TransformStatus {
                spec: Some(saved.spec()),
                version: saved.version,
                wasm_sha256: saved.sha256.clone(),
                lag: -1,
                ..Default::default()
            };
            let mut failures = Vec::new();
            for (broker, list) in &statuses {
                let Some(member) = list.iter().find(|s| {
                    s.spec.as_ref().is_some_and(|spec| &spec.name == name)
                        && s.version == definition.version
                }) else {
                    continue;
                };
                status.brokers.push(*broker);
                status.records_in += member.records_in;
                status.records_out += member.records_out;
                status.record_errors += member.record_errors;
                status.tasks.extend(member.tasks.iter().cloned());
                if member.state == "Failed" {
                    failures.push(format!("broker {broker}: {}", member.error));
                }
            }
            status.state = if !failures.is_empty() {
                status.error = failures.join("; ");
                "Failed"
            } else if definition.paused {
                "Paused"
            } else if status.brokers.is_empty() {
                "Starting"
            } else {
                "Running"
            }
            .into();
            status.lag = self.lag(name, &saved.input_topic).await.unwrap_or(-1);
            out.push(status);
        }
        out
    }

    /// # Errors
    /// Unknown transform.
    pub async fn status(&self, name: &str) -> Result<v1::TransformStatus, DeployError> {
        self.cluster_statuses(Some(name))
            .await
            .pop()
            .ok_or_else(|| DeployError::Unknown(name.to_string()))
    }

    async fn lag(&self, name: &str, input: &str) -> anyhow::Result<i64> {
        let admin = Admin::new(self.client().await?);
        let group = admin.describe_group(&group_name(name)).await;
        let topic = admin.describe_topic(input).await?;
        let committed: BTreeMap<u32, i64> = match group {
            Ok(group) => group
                .partitions
                .iter()
                .filter(|p| p.topic == input && p.current_offset >= 0)
                .map(|p| (p.partition, p.current_offset))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        Ok(topic
            .partitions
            .iter()
            .map(|p| {
                let start = committed
                    .get(&p.partition)
                    .copied()
                    .unwrap_or(p.log_start_offset);
                (p.high_watermark - start).max(0)
            })
            .sum())
    }

    /// Every deployment of the cluster.
    pub async fn list(&self) -> Vec<v1::TransformStatus> {
        self.cluster_statuses(None).await
    }

    /// Pauses or resumes a deployment on every broker.
    ///
    /// # Errors
    /// Unknown transform, or a store that cannot be written.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<v1::TransformStatus, DeployError> {
        let (store, _) = self.store()?;
        let snapshot = store.caught_up().await?;
        let mut definition = snapshot
            .get(Kind::Transform, name)
            .cloned()
            .ok_or_else(|| DeployError::Unknown(name.to_string()))?;
        definition.paused = paused;
        store.put(Kind::Transform, name, Some(&definition)).await?;
        self.reconcile().await;
        self.status(name).await
    }

    fn set_local_paused(&self, name: &str, paused: bool) {
        let mut deployments = lock(&self.inner.deployments);
        let Some(d) = deployments.get_mut(name) else {
            return;
        };
        d.saved.paused = paused;
        d.control
            .send_replace(if paused { Control::Pause } else { Control::Run });
        let mut state = lock(&d.state);
        if !matches!(*state, State::Failed(_)) {
            *state = if paused {
                State::Paused
            } else {
                State::Running
            };
        }
        d.log.push(format!(
            "[runtime] {}",
            if paused { "paused" } else { "resumed" }
        ));
    }

    /// Stops and forgets a deployment on every broker; its consumer group's offsets stay.
    ///
    /// # Errors
    /// Unknown transform, or a store that cannot be written.
    pub async fn remove(&self, name: &str, delete_state: bool) -> Result<(), DeployError> {
        let (store, _) = self.store()?;
        let snapshot = store.caught_up().await?;
        let definition = snapshot
            .get(Kind::Transform, name)
            .ok_or_else(|| DeployError::Unknown(name.to_string()))?;
        let saved = Saved::from_definition(definition)?;
        store.put(Kind::Transform, name, None).await?;
        self.reconcile().await;
        if delete_state {
            self.delete_state(&saved).await?;
        }
        Ok(())
    }

    /// Deletes a removed deployment's state once no broker runs it: its changelogs
    /// (every broker then deletes its local stores, see [`Runtime::collect_garbage`])
    /// and its committed input offsets.
    async fn delete_state(&self, saved: &Saved) -> Result<(), DeployError> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let (running, _) = self.gather(None).await;
            let still = running.values().any(|list| {
                list.iter()
                    .any(|s| s.spec.as_ref().is_some_and(|sp| sp.name == saved.name))
            });
            if !still {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DeployError::Internal(anyhow::anyhow!(
                    "transform {:?} was removed, but a broker still runs it after {} s; its state was kept: run the remove with --delete-state again",
                    saved.name,
                    SETTLE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let admin = Admin::new(self.client().await?);
        for topic in saved.layout().produced(&saved.name) {
            match admin.delete_topic(&topic).await {
                Ok(()) => {}
                Err(err) if err.code() == Some(v1::ErrorCode::UnknownTopic) => {}
                Err(err) => {
                    return Err(DeployError::Internal(anyhow::anyhow!(
                        "deleting changelog {topic}: {err}"
                    )));
                }
            }
        }
        if let Err(err) = admin.delete_group(&group_name(&saved.name)).await {
            tracing::debug!(transform = %saved.name, error = %err, "no committed offsets to delete");
        }
        self.collect_garbage().await;
        Ok(())
    }

    /// Deletes local stores of deployments that are not defined and whose changelogs are
    /// gone (removed with `--delete-state`, on this broker or another).
    async fn collect_garbage(&self) {
        let Ok((store, _)) = self.store() else {
            return;
        };
        let root = self.inner.data_dir.join("__state");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        let Ok(client) = self.client().await else {
            return;
        };
        let admin = Admin::new(client);
        let snapshot = store.snapshot();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if snapshot.get(Kind::Transform, &name).is_some()
                || lock(&self.inner.deployments).contains_key(&name)
            {
                continue;
            }
            let internal = state::changelog_topic(&name, state::INTERNAL_STORE);
            if let Err(err) = admin.describe_topic(&internal).await
                && err.code() == Some(v1::ErrorCode::UnknownTopic)
            {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        tracing::info!(transform = %name, "deleted the local state of a removed transform")
                    }
                    Err(err) => {
                        tracing::warn!(transform = %name, error = %err, "cannot delete the local state of a removed transform")
                    }
                }
            }
        }
    }

    /// Reads a deployment's store: committed state of the tasks that own the key (or
    /// of every task, for a range), on this broker only with `query.local`.
    ///
    /// # Errors
    /// Unknown transform or store; no broker has the key's task open.
    pub async fn query_state(
        &self,
        query: v1::StateQuery,
    ) -> Result<Vec<v1::StateEntry>, DeployError> {
        let (store, own) = self.store()?;
        let definition = store
            .snapshot()
            .get(Kind::Transform, &query.name)
            .cloned()
            .ok_or_else(|| DeployError::Unknown(query.name.clone()))?;
        let saved = Saved::from_definition(&definition)?;
        let stores = saved.layout().guest_names();
        if !stores.contains(&query.store) {
            return Err(DeployError::Invalid(format!(
                "transform {:?} has no store {:?}; its stores: {stores:?}",
                query.name, query.store
            )));
        }
        let limit = match query.limit {
            0 => 1_000,
            n => n.min(state::RANGE_LIMIT_MAX),
        } as usize;
        let client = self.client().await?;
        let partition = match &query.key {
            Some(key) => {
                let count = Admin::new(client.clone())
                    .describe_topic(&saved.input_topic)
                    .await
                    .map_err(|err| DeployError::Internal(err.into()))?
                    .partitions
                    .len() as u32;
                Some(runnel_client::partition_for_key(key, count))
            }
            None => None,
        };
        let (from, to): (Vec<u8>, Option<Vec<u8>>) = match &query.key {
            Some(key) => {
                let mut next = key.to_vec();
                next.push(0);
                (key.to_vec(), Some(next))
            }
            None => (query.from.to_vec(), query.to.as_ref().map(|t| t.to_vec())),
        };
        let local = lock(&self.inner.deployments)
            .get(&query.name)
            .and_then(|d| d.tasks.clone());
        let mut entries = Vec::new();
        if let Some(tasks) = local {
            let store_name = query.store.clone();
            let found = tokio::task::spawn_blocking(move || {
                tasks::lock(&tasks).query(&store_name, partition, &from, to.as_deref(), limit)
            })
            .await
            .map_err(|err| DeployError::Internal(err.into()))??;
            entries.extend(
                found
                    .into_iter()
                    .map(|(partition, (key, value))| v1::StateEntry {
                        key: key.into(),
                        value: value.into(),
                        partition,
                    }),
            );
        }
        if query.local {
            return Ok(entries);
        }
        let live = store::live_brokers(&client).await.unwrap_or_default();
        let admin = Admin::new(client);
        for broker in live.into_iter().filter(|b| b.id != own) {
            match tokio::time::timeout(
                PEER_TIMEOUT,
                admin.local_state(&broker.address, query.clone()),
            )
            .await
            {
                Ok(Ok(found)) => entries.extend(found),
                Ok(Err(err)) => {
                    tracing::debug!(broker = broker.id, error = %err, "no state from the broker")
                }
                Err(_) => tracing::debug!(broker = broker.id, "no state from the broker in time"),
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries.truncate(limit);
        if let Some(partition) = partition
            && entries.is_empty()
        {
            let status = self.status(&query.name).await?;
            let open = status
                .tasks
                .iter()
                .any(|t| t.partition == partition && t.state == "Running");
            if !open {
                return Err(DeployError::Invalid(format!(
                    "no broker has the task of partition {partition} of transform {:?} open (it is restoring, moving, or the transform is not running); try again",
                    query.name
                )));
            }
        }
        Ok(entries)
    }

    /// Stops this broker's member of a deployment, letting it commit what was
    /// acknowledged.
    async fn stop_local(&self, name: &str) {
        let Some(deployment) = lock(&self.inner.deployments).remove(name) else {
            return;
        };
        deployment.control.send_replace(Control::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(10), deployment.task).await;
    }

    /// Stops every deployment on this broker, letting each commit what was acknowledged;
    /// the store still has them, so they start again with the broker.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        let _one = self.inner.reconciling.lock().await;
        let deployments: Vec<Deployment> = std::mem::take(&mut *lock(&self.inner.deployments))
            .into_values()
            .collect();
        for deployment in &deployments {
            deployment.control.send_replace(Control::Stop);
        }
        for deployment in deployments {
            let _ = tokio::time::timeout(Duration::from_secs(10), deployment.task).await;
        }
    }

    /// This broker's log lines of a deployment.
    ///
    /// # Errors
    /// This broker does not run it.
    pub fn local_logs(&self, name: &str) -> Result<Vec<String>, DeployError> {
        lock(&self.inner.deployments)
            .get(name)
            .map(|d| d.log.lines())
            .ok_or_else(|| DeployError::Unknown(name.to_string()))
    }

    /// A deployment's log lines from every broker running it, each marked with its
    /// broker.
    ///
    /// # Errors
    /// Unknown transform.
    pub async fn logs(&self, name: &str) -> Result<Vec<String>, DeployError> {
        let (store, _) = self.store()?;
        if store.snapshot().get(Kind::Transform, name).is_none() {
            return Err(DeployError::Unknown(name.to_string()));
        }
        Ok(self.gather(Some(name)).await.1)
    }
}

/// How often a deployment commits when its spec says 0: the transaction under
/// exactly-once (Kafka Streams' `commit.interval.ms` under exactly-once), the input offsets
/// of acknowledged batches under at-least-once. Sink connectors commit as often.
pub const COMMIT_INTERVAL_MS_DEFAULT: u64 = 100;

pub fn group_name(transform: &str) -> String {
    format!("transform-{transform}")
}

struct Task {
    saved: Saved,
    tasks: Option<SharedTasks>,
    /// With standby replicas: the warm copies this broker keeps of others' tasks.
    standbys: Option<Standbys>,
    pre: Arc<Prepared>,
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    control: watch::Receiver<Control>,
    log: LogBuffer,
}

/// A record that the `fail` policy stops on: the deployment stays stopped.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PolicyFailure(String);

async fn run(runtime: Runtime, mut task: Task) {
    run_until_stopped(&runtime, &mut task).await;
    if let Some(standbys) = &mut task.standbys {
        standbys.stop_all().await;
    }
}

async fn run_until_stopped(runtime: &Runtime, task: &mut Task) {
    let name = task.saved.name.clone();
    loop {
        match run_inner(runtime, task).await {
            Ok(()) => return,
            Err(err) if err.downcast_ref::<PolicyFailure>().is_some() => {
                let reason = format!("{err:#}");
                tracing::error!(transform = %name, error = %reason, "transform stopped");
                task.log.push(format!("[runtime] stopped: {reason}"));
                *lock(&task.state) = State::Failed(reason);
                return;
            }
            Err(err) => {
                // The broker went away or a request failed: nothing was committed for the
                // batch in hand, so starting over re-reads it (at-least-once).
                let reason = format!("{err:#}");
                tracing::warn!(transform = %name, error = %reason, "transform interrupted; restarting");
                task.log.push(format!(
                    "[runtime] interrupted, restarting in 1 s: {reason}"
                ));
                tokio::time::sleep(Duration::from_secs(1)).await;
                if *task.control.borrow() == Control::Stop {
                    return;
                }
            }
        }
    }
}

/// The outcome of a batch after isolating traps: what to emit (by input index, or
/// [`FROM_TIMER`]), the bad records, and (stateful components) the state writes for the
/// changelogs.
#[derive(Default)]
pub(crate) struct Processed {
    pub(crate) outputs: Vec<GuestOutput>,
    pub(crate) failures: Vec<(usize, String)>,
    /// (partition, write) of the calls that succeeded.
    pub(crate) changelog: Vec<(u32, ChangelogWrite)>,
    /// Timers the guest refused or trapped on (they are dropped).
    pub(crate) timer_failures: Vec<String>,
}

/// The input index of a record a timer emitted.
pub(crate) const FROM_TIMER: u32 = u32::MAX;

/// What one successful guest call emitted: its flat output buffer, read again where the
/// records are encoded into batches, with no record made of them in between.
#[derive(Debug)]
pub(crate) struct GuestOutput {
    buf: Vec<u8>,
    /// Input index of the call's first input; `None` for a call that fired timers.
    base: Option<usize>,
    /// Inputs the call was given.
    count: usize,
    /// The call's inputs (from 0) whose records are dropped: refused.
    refused: BTreeSet<usize>,
    /// Output topics the deployment declares.
    outputs: usize,
}

impl GuestOutput {
    /// The records to send, in the order emitted, with the input index each came from
    /// ([`FROM_TIMER`] for a timer's): those of refused inputs, and any the call got
    /// wrong (reported as failures by `collect`), are left out.
    pub(crate) fn records(&self) -> impl Iterator<Item = (u32, runnel_flat::FlatOutput<'_>)> {
        runnel_flat::read_outputs(&self.buf)
            .map_while(Result::ok)
            .filter(|o| {
                let input = o.input_index as usize;
                input < self.count
                    && (o.output_index as usize) < self.outputs
                    && !self.refused.contains(&input)
            })
            .map(|o| {
                let input = self
                    .base
                    .map_or(FROM_TIMER, |base| (base + o.input_index as usize) as u32);
                (input, o)
            })
    }
}

/// Work sent to the broker whose commit is outstanding: a batch (at-least-once) or a
/// transaction (exactly-once).
struct Pending {
    deliveries: Vec<Delivery>,
    /// (partition, store, delivery) of changelog records.
    changelog: Vec<(u32, u32, Delivery)>,
    offsets: BTreeMap<(String, u32), i64>,
    emitted: u64,
    /// The commit unit its state writes belong to.
    unit: u64,
}

impl Pending {
    fn empty(unit: u64) -> Self {
        Pending {
            deliveries: Vec::new(),
            changelog: Vec::new(),
            offsets: BTreeMap::new(),
            emitted: 0,
            unit,
        }
    }

    fn absorb(&mut self, batch: Pending) {
        self.deliveries.extend(batch.deliveries);
        self.changelog.extend(batch.changelog);
        self.offsets.extend(batch.offsets);
        self.emitted += batch.emitted;
    }

    /// Waits until every record is acknowledged; returns the changelog offsets reached
    /// (partition → store → next offset).
    async fn acknowledged(&mut self) -> anyhow::Result<BTreeMap<u32, BTreeMap<u32, i64>>> {
        for delivery in self.deliveries.drain(..) {
            delivery.await.context("producing the transform's output")?;
        }
        let mut checkpoints: BTreeMap<u32, BTreeMap<u32, i64>> = BTreeMap::new();
        for (partition, store, delivery) in self.changelog.drain(..) {
            let written = delivery.await.context("writing a state changelog")?;
            let next = checkpoints
                .entry(partition)
                .or_default()
                .entry(store)
                .or_insert(0);
            *next = (*next).max(written.offset + 1);
        }
        Ok(checkpoints)
    }
}

/// How a deployment commits what it processed.
struct Commits {
    exactly_once: bool,
    /// At-least-once: input offsets of acknowledged batches, committed every interval.
    /// Its interval is also how often an exactly-once transaction commits.
    acknowledged: AckedOffsets,
    /// At-least-once: the batch sent last. Exactly-once: the open transaction, with the
    /// batches of a commit interval and their input offsets.
    pending: Option<Pending>,
    /// At-least-once: the batch sent before the last, acknowledged while the next one is
    /// processed, then its state written and its input offsets committed.
    due: Option<Pending>,
    opened: Option<std::time::Instant>,
    /// The commit unit of the next batch's state writes: a batch (at-least-once) or a
    /// transaction (exactly-once).
    unit: u64,
    tasks: Option<SharedTasks>,
}

impl Commits {
    /// The commit unit of a batch about to be processed.
    fn unit_for_batch(&mut self) -> u64 {
        if !self.exactly_once {
            self.unit += 1;
        }
        self.unit
    }

    /// Before a batch's output is sent: opens a transaction if none is.
    fn begin(&mut self, producer: &Producer) -> anyhow::Result<()> {
        if self.exactly_once && self.pending.is_none() {
            producer.begin_transaction()?;
            self.pending = Some(Pending::empty(self.unit));
            self.opened = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// A batch's output was sent.
    async fn sent(
        &mut self,
        batch: Pending,
        producer: &Producer,
        member: &mut GroupConsumer,
        stats: &Stats,
    ) -> anyhow::Result<()> {
        if !self.exactly_once {
            // Batches finish in order: one still due finishes first.
            self.finish_due(member, stats).await?;
            self.due = self.pending.replace(batch);
            return Ok(());
        }
        if let Some(txn) = self.pending.as_mut() {
            txn.absorb(batch);
        }
        if self
            .opened
            .is_some_and(|since| since.elapsed() >= self.acknowledged.interval())
        {
            self.settle(producer, member, stats).await?;
        }
        Ok(())
    }

    /// At-least-once: finishes the batch sent before the last, if it is not yet; the
    /// task loop runs this while the guest processes the next batch.
    async fn finish_due(
        &mut self,
        member: &mut GroupConsumer,
        stats: &Stats,
    ) -> anyhow::Result<()> {
        match self.due.take() {
            Some(done) => self.finish(done, member, stats).await,
            None => Ok(()),
        }
    }

    /// At-least-once: once batch `done` is acknowledged, writes its state, and commits
    /// its input offsets with those of the batches before it once the interval passed.
    async fn finish(
        &mut self,
        mut done: Pending,
        member: &mut GroupConsumer,
        stats: &Stats,
    ) -> anyhow::Result<()> {
        let checkpoints = done.acknowledged().await?;
        stats.records_out.fetch_add(done.emitted, Ordering::Relaxed);
        if let Some(tasks) = &self.tasks {
            tasks::lock(tasks).commit(done.unit, &checkpoints)?;
        }
        self.acknowledged
            .add(done.offsets, member)
            .await
            .context("committing input offsets")
    }

    /// Commits everything outstanding (idle, pausing, stopping).
    async fn settle(
        &mut self,
        producer: &Producer,
        member: &mut GroupConsumer,
        stats: &Stats,
    ) -> anyhow::Result<()> {
        self.finish_due(member, stats).await?;
        if !self.exactly_once {
            if let Some(done) = self.pending.take() {
                self.finish(done, member, stats).await?;
            }
            return self
                .acknowledged
                .commit(member)
                .await
                .context("committing input offsets");
        }
        let Some(mut txn) = self.pending.take() else {
            return Ok(());
        };
        self.opened = None;
        let unit = self.unit;
        self.unit += 1;
        // Records read from a partition this member no longer owns must not
        // commit without their offsets: the new owner reads them again.
        let owned: std::collections::BTreeSet<(String, u32)> =
            member.assignment().into_iter().collect();
        if let Some((topic, partition)) = txn.offsets.keys().find(|tp| !owned.contains(*tp)) {
            producer.abort_transaction().await?;
            if let Some(tasks) = &self.tasks {
                tasks::lock(tasks).abort();
            }
            // Leave, so that the restart joins again at once.
            member.leave().await;
            anyhow::bail!(
                "{topic}-{partition} was reassigned during the transaction; it was aborted and the new owner processes those records"
            );
        }
        let checkpoints = txn.acknowledged().await?;
        if !txn.offsets.is_empty() {
            producer
                .send_offsets_to_transaction(&txn.offsets, &member.group_metadata())
                .await
                .context("committing input offsets in the transaction")?;
        }
        producer
            .commit_transaction()
            .await
            .context("committing the transaction")?;
        stats.records_out.fetch_add(txn.emitted, Ordering::Relaxed);
        if let Some(tasks) = &self.tasks {
            tasks::lock(tasks).commit(unit, &checkpoints)?;
        }
        Ok(())
    }

    /// Drops the open transaction's work (a batch the fail policy stops on).
    async fn abandon(
        &mut self,
        producer: &Producer,
        member: &mut GroupConsumer,
        stats: &Stats,
    ) -> anyhow::Result<()> {
        if !self.exactly_once {
            // The batches before it were good: they are committed.
            self.settle(producer, member, stats).await?;
        } else if self.pending.take().is_some() {
            self.opened = None;
            self.unit += 1;
            producer.abort_transaction().await?;
        }
        if let Some(tasks) = &self.tasks {
            tasks::lock(tasks).abort();
        }
        Ok(())
    }
}

/// Upper bound of an output batch (or the topic's `max.message.bytes` when smaller).
const OUTPUT_BATCH_BYTES: usize = 1024 * 1024;

/// What encoding output for a topic needs to know of it.
struct OutputTopic {
    name: String,
    partitions: u32,
    batch_bytes_max: usize,
}

/// Output records encoded for one partition.
struct OutputBatch {
    topic: String,
    partition: u32,
    builder: BatchBuilder,
}

/// Encodes a batch's output records into record batches per partition, in their order:
/// a record's partition is its key's, else `sticky`'s. `topics` are the deployment's
/// output topics, in the order the guest numbers them.
fn encode_outputs(
    outputs: &[GuestOutput],
    topics: &[OutputTopic],
    options: BatchOptions,
    sticky: u32,
) -> anyhow::Result<Vec<OutputBatch>> {
    let mut done: Vec<OutputBatch> = Vec::new();
    // The open batch of each (output, partition), in the order first written to; most
    // outputs go to one, so the last one used is tried first.
    let mut open: Vec<((usize, u32), BatchBuilder)> = Vec::new();
    let mut last = 0usize;
    for (_, record) in outputs.iter().flat_map(GuestOutput::records) {
        let index = record.output_index as usize;
        let topic = topics
            .get(index)
            .with_context(|| format!("output to undeclared output #{index}"))?;
        let count = topic.partitions.max(1);
        let partition = match record.key {
            Some(key) => runnel_client::partition_for_key(key, count),
            None => sticky % count,
        };
        let parts = RecordParts {
            timestamp_ms: record.timestamp_ms,
            key: record.key,
            value: record.value,
            headers: runnel_flat::headers(record.headers).map(|(k, v)| (k.as_bytes(), v)),
        };
        let at = (index, partition);
        if open.get(last).is_none_or(|(key, _)| *key != at) {
            last = match open.iter().position(|(key, _)| *key == at) {
                Some(found) => found,
                None => {
                    let builder = BatchBuilder::with_capacity(options, topic.batch_bytes_max);
                    open.push((at, builder));
                    open.len() - 1
                }
            };
        }
        let builder = &mut open[last].1;
        if !builder.push_parts_within(&parts, topic.batch_bytes_max) {
            let full = std::mem::replace(
                builder,
                BatchBuilder::with_capacity(options, topic.batch_bytes_max),
            );
            builder.push_parts_within(&parts, usize::MAX);
            done.push(OutputBatch {
                topic: topic.name.clone(),
                partition,
                builder: full,
            });
        }
    }
    done.extend(
        open.into_iter()
            .map(|((index, partition), builder)| OutputBatch {
                topic: topics[index].name.clone(),
                partition,
                builder,
            }),
    );
    Ok(done)
}

/// Upper bound of one fetch of a transform's input, and so of one batch.
const TRANSFORM_FETCH_BYTES_MAX: u32 = 1024 * 1024;

async fn run_inner(runtime: &Runtime, task: &mut Task) -> anyhow::Result<()> {
    let client = loop {
        match runtime.client().await {
            Ok(client) if task.saved.principal.is_empty() => break client,
            Ok(client) => break client.run_as(&task.saved.principal),
            Err(err) => {
                tracing::debug!(error = %err, "waiting for the broker");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Starting over: what the tasks hold uncommitted is gone with the old transaction.
    if let Some(tasks) = &task.tasks {
        tasks::lock(tasks).close_all();
    }
    let start = match spec::parse_start(&task.saved.start)? {
        Start::Earliest => StartFrom::Earliest,
        Start::Latest => StartFrom::Latest,
        Start::Offset(o) => StartFrom::Offset(o),
        Start::Timestamp(t) => StartFrom::Timestamp(t),
    };
    let exactly_once = task.saved.processing == v1::Processing::ExactlyOnce as i32;
    let mut member = GroupConsumer::join(
        client.clone(),
        &group_name(&task.saved.name),
        std::slice::from_ref(&task.saved.input_topic),
        GroupConfig {
            client_id: format!("transform-{}", task.saved.name),
            session_timeout: Duration::from_secs(10),
            auto_commit_interval: None,
            // Only acknowledged work is committed, by this loop; on a revocation the new
            // owner re-reads what was not (at-least-once).
            commit_on_revoke: false,
            auto_offset_reset: start,
            consumer: ConsumerConfig {
                max_wait: Duration::from_millis(200),
                // Batches of a megabyte or so: each batch's buffers (the records, the
                // guest's input and output, the records to send) are reused by the
                // allocator, where tens of megabytes would be mapped afresh every time.
                max_bytes: TRANSFORM_FETCH_BYTES_MAX,
                partition_max_bytes: TRANSFORM_FETCH_BYTES_MAX,
                auto_offset_reset: Some(start),
                isolation: if exactly_once {
                    v1::IsolationLevel::ReadCommitted
                } else {
                    v1::IsolationLevel::ReadUncommitted
                },
            },
            standby_replicas: if task.standbys.is_some() {
                task.saved.standby_replicas
            } else {
                0
            },
        },
    )
    .await?;
    let node_id = runtime.store().map_or(0, |(_, id)| id);
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            // State must survive a leader's death: changelogs are written with acks=all.
            acks: if exactly_once || task.tasks.is_some() {
                Acks::All
            } else {
                Acks::Leader
            },
            linger: Duration::from_millis(1),
            // One transactional id per broker's member: a restarted member fences its
            // previous instance; a member of another broker that lost the partitions
            // cannot commit their offsets (the group coordinator checks ownership).
            transactional_id: exactly_once
                .then(|| format!("transform-{}-{node_id}", task.saved.name)),
            // A member that dies with a transaction open holds its partitions' stable
            // offsets back until this passes (Kafka Streams' exactly-once default).
            transaction_timeout: Duration::from_secs(10),
            ..ProducerConfig::default()
        },
    );
    let interval = Duration::from_millis(match task.saved.commit_interval_ms {
        0 => COMMIT_INTERVAL_MS_DEFAULT,
        ms => u64::from(ms),
    });
    let mut commits = Commits {
        exactly_once,
        acknowledged: AckedOffsets::new(interval),
        pending: None,
        due: None,
        opened: None,
        unit: 0,
        tasks: task.tasks.clone(),
    };
    if exactly_once {
        producer
            .init_transactions()
            .await
            .context("initialising the transactional producer")?;
    }
    let changelogs = task.saved.layout().topics(&task.saved.name);
    let has_tables = !task.saved.tables.is_empty();
    let policy =
        v1::ErrorPolicy::try_from(task.saved.error_policy).unwrap_or(v1::ErrorPolicy::Fail);
    let config: Vec<(String, String)> = task.saved.config.clone().into_iter().collect();
    let mut instance: Option<Instance> = None;
    // Where keyless output goes: one partition per batch, the next one each batch.
    let mut sticky: u32 = 0;
    loop {
        let control = *task.control.borrow_and_update();
        if control != Control::Run {
            commits.settle(&producer, &mut member, &task.stats).await?;
        }
        match control {
            Control::Stop => {
                member.leave().await;
                return Ok(());
            }
            Control::Pause => {
                // Keep the membership (the heartbeat runs on) but read nothing.
                if task.control.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            Control::Run => {}
        }
        let fetched = tokio::select! {
            fetched = member.poll_batches() => fetched?,
            _ = task.control.changed() => continue,
        };
        if let Some(tasks) = &task.tasks {
            let assigned: Vec<u32> = member.assignment().into_iter().map(|(_, p)| p).collect();
            if commits.pending.is_none() && commits.due.is_none() {
                tasks::lock(tasks).close_unassigned(&assigned);
            }
            // Every assigned task restores before anything is processed, so that its
            // state can be queried and its timers fire even while its input is quiet.
            let mut wanted: Vec<u32> = fetched.iter().map(|b| b.partition).collect();
            wanted.extend(&assigned);
            wanted.sort_unstable();
            wanted.dedup();
            if let Some(standbys) = &mut task.standbys {
                let input = &task.saved.input_topic;
                let standby: BTreeSet<u32> = member
                    .standby()
                    .into_iter()
                    .filter(|(topic, _)| topic == input)
                    .map(|(_, p)| p)
                    .collect();
                let here = |p: u32| wanted.contains(&p) || tasks::lock(tasks).is_open(p);
                standbys.reconcile(&client, &standby, here).await;
                member.set_warm(
                    standbys
                        .warm()
                        .into_iter()
                        .map(|p| (input.clone(), p))
                        .collect(),
                );
            }
            for partition in wanted {
                if !tasks::lock(tasks).is_open(partition) {
                    let warm = match &mut task.standbys {
                        Some(standbys) => standbys.stop(partition).await,
                        None => false,
                    };
                    let began = std::time::Instant::now();
                    let restored = tasks::open(tasks, &client, partition)
                        .await
                        .with_context(|| format!("restoring the state of partition {partition}"))?;
                    let elapsed = began.elapsed();
                    let rate = restored as f64 / elapsed.as_secs_f64().max(1e-6);
                    tracing::info!(transform = %task.saved.name, partition, restored, from_standby = warm, elapsed_ms = elapsed.as_millis() as u64, "opened the state of a task");
                    task.log.push(format!(
                        "[runtime] opened the state of partition {partition}{}: replayed {restored} changelog records in {} ms ({rate:.0} records/s)",
                        if warm { " kept by its standby" } else { "" },
                        elapsed.as_millis()
                    ));
                }
            }
            if has_tables {
                let mut with_records: Vec<u32> = fetched.iter().map(|b| b.partition).collect();
                with_records.sort_unstable();
                with_records.dedup();
                for partition in with_records {
                    tasks::catch_up_tables(tasks, &client, partition)
                        .await
                        .with_context(|| format!("reading the tables of partition {partition}"))?;
                }
            }
        } else if fetched.is_empty() {
            commits.settle(&producer, &mut member, &task.stats).await?;
            continue;
        }
        let unit = commits.unit_for_batch();
        let mut outputs_info = Vec::with_capacity(task.saved.output_topics.len());
        for topic in &task.saved.output_topics {
            outputs_info.push(OutputTopic {
                name: topic.clone(),
                partitions: client.partition_count(topic).await?,
                batch_bytes_max: client
                    .max_message_bytes(topic)
                    .await?
                    .min(OUTPUT_BATCH_BYTES),
            });
        }
        let options = producer.batch_options();
        sticky = sticky.wrapping_add(1);
        let (inputs, processed, batches) = {
            let guest = Guest {
                host: runtime.inner.host.clone(),
                pre: task.pre.clone(),
                saved: task.saved.clone(),
                config: config.clone(),
                log: task.log.clone(),
            };
            let tasks = task.tasks.clone();
            let mut current = instance.take();
            if tasks.is_some() {
                // Writing state waits for the stores, which the guest holds while it
                // works: finish first.
                commits.finish_due(&mut member, &task.stats).await?;
            }
            let stats = task.stats.clone();
            let processing = tokio::task::spawn_blocking(move || {
                let began = std::time::Instant::now();
                let inputs = Inputs::from_batches(&fetched);
                let result = inputs
                    .as_ref()
                    .map_err(|err| anyhow::anyhow!("input batch: {err}"))
                    .and_then(|inputs| process(&guest, &mut current, inputs, tasks.as_ref(), unit))
                    .and_then(|mut processed| {
                        // Encoded here, beside the guest, so that the loop only hands
                        // batches on.
                        let outputs = std::mem::take(&mut processed.outputs);
                        let batches = encode_outputs(&outputs, &outputs_info, options, sticky)?;
                        Ok((processed, batches))
                    });
                let inputs = inputs.unwrap_or_default();
                if !inputs.is_empty() {
                    stats.batch_duration.observe(began.elapsed());
                }
                (current, inputs, result)
            });
            // The batch before the last finishes (acknowledgements, state, offsets)
            // while the guest works.
            let (processed, finished) =
                tokio::join!(processing, commits.finish_due(&mut member, &task.stats));
            let (current, inputs, result) = processed?;
            finished?;
            instance = current;
            let (processed, batches) = result?;
            (inputs, processed, batches)
        };
        if policy == v1::ErrorPolicy::Fail {
            let failure = match (processed.failures.first(), processed.timer_failures.first()) {
                (Some((index, reason)), _) => {
                    let (partition, offset) = inputs
                        .records()
                        .get(*index)
                        .map_or((0, -1), |r| (r.partition, r.offset));
                    Some(format!(
                        "transform {:?} failed on input {}-{partition}@{offset}: {reason}",
                        task.saved.name, task.saved.input_topic
                    ))
                }
                (None, Some(reason)) => Some(format!(
                    "transform {:?} failed on a timer: {reason}",
                    task.saved.name
                )),
                (None, None) => None,
            };
            if let Some(failure) = failure {
                // Emit nothing of this batch and commit nothing: the next version starts
                // at it.
                task.stats.record_errors.fetch_add(1, Ordering::Relaxed);
                commits.abandon(&producer, &mut member, &task.stats).await?;
                member.leave().await;
                return Err(PolicyFailure(failure).into());
            }
        }
        task.stats
            .records_in
            .fetch_add(inputs.len() as u64, Ordering::Relaxed);
        if inputs.is_empty() && batches.is_empty() && processed.changelog.is_empty() {
            commits.settle(&producer, &mut member, &task.stats).await?;
            continue;
        }
        let emitted: u64 = batches.iter().map(|b| b.builder.len() as u64).sum();
        commits.begin(&producer)?;
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(batches.len());
        for batch in batches {
            deliveries.push(
                producer
                    .send_batch(&batch.topic, batch.partition, batch.builder)
                    .await?,
            );
        }
        let mut changelog = Vec::with_capacity(processed.changelog.len());
        for (partition, write) in processed.changelog {
            let topic = changelogs
                .get(write.store as usize)
                .context("a state write names no store")?;
            let mut record = ProducerRecord::new(topic.clone()).partition(partition);
            record.key = Some(Bytes::from(write.key));
            record.value = write.value.map(Bytes::from);
            changelog.push((partition, write.store, producer.send(record).await?));
        }
        for reason in &processed.timer_failures {
            task.stats.record_errors.fetch_add(1, Ordering::Relaxed);
            task.log.push(format!("[runtime] dropped timers: {reason}"));
        }
        for (index, reason) in &processed.failures {
            let record = inputs
                .record(*index)
                .context("a failure names no input record")?;
            task.stats.record_errors.fetch_add(1, Ordering::Relaxed);
            let where_ = format!(
                "{}-{}@{}",
                task.saved.input_topic, record.partition, record.offset
            );
            if policy == v1::ErrorPolicy::DeadLetter {
                task.log.push(format!(
                    "[runtime] dead-lettered input {where_} to {}: {reason}",
                    task.saved.dead_letter_topic
                ));
                deliveries.push(
                    producer
                        .send(dead_letter(&task.saved, &record, reason))
                        .await?,
                );
            } else {
                task.log
                    .push(format!("[runtime] skipped input {where_}: {reason}"));
            }
        }
        let batch = Pending {
            deliveries,
            changelog,
            offsets: inputs.next_offsets(&task.saved.input_topic),
            emitted,
            unit,
        };
        commits
            .sent(batch, &producer, &mut member, &task.stats)
            .await?;
    }
}

/// Replicas of a changelog (fewer when fewer brokers are live), as of the internal topics.
const CHANGELOG_REPLICATION_FACTOR: u32 = 3;

/// Creates the changelogs of a stateful deployment: compacted, never deleted by time,
/// one partition per input partition, with 3 replicas and `min.insync.replicas` 2 (or
/// as many replicas as brokers are live, and 1). Existing ones are kept if their
/// partition count fits.
async fn create_changelogs(
    client: &Client,
    admin: &Admin,
    saved: &Saved,
) -> Result<(), DeployError> {
    let partitions = admin
        .describe_topic(&saved.input_topic)
        .await
        .map_err(|err| DeployError::Invalid(format!("topic {:?}: {err}", saved.input_topic)))?
        .partitions
        .len() as u32;
    let layout = saved.layout();
    let names = layout.guest_names();
    let mut seen = std::collections::BTreeSet::new();
    for store in &names {
        if store.is_empty() || store == state::INTERNAL_STORE || !seen.insert(store) {
            return Err(DeployError::Invalid(format!(
                "store names (stores and tables) must be unique, not empty and not {:?}; got {names:?}",
                state::INTERNAL_STORE,
            )));
        }
    }
    // A table's partition P holds the keys of input partition P (co-partitioned), as in
    // a Kafka Streams KStream-KTable join.
    for (store, topic) in &layout.tables {
        let table = admin.describe_topic(topic).await.map_err(|err| {
            DeployError::Invalid(format!("table {store:?}: topic {topic:?}: {err}"))
        })?;
        if table.partitions.len() as u32 != partitions {
            return Err(DeployError::Invalid(format!(
                "table {store:?}: topic {topic:?} has {} partitions but input {} has {partitions}; a table must be partitioned like the input (same count, keyed the same way)",
                table.partitions.len(),
                saved.input_topic
            )));
        }
    }
    for topic in layout.produced(&saved.name) {
        match admin.describe_topic(&topic).await {
            Ok(existing) if existing.partitions.len() as u32 == partitions => continue,
            Ok(existing) => {
                return Err(DeployError::Invalid(format!(
                    "changelog {topic} has {} partitions but input {} has {partitions}; remove the transform with --delete-state (or deploy under a new name)",
                    existing.partitions.len(),
                    saved.input_topic
                )));
            }
            Err(err) if err.code() == Some(v1::ErrorCode::UnknownTopic) => {}
            Err(err) => return Err(DeployError::Internal(err.into())),
        }
        // Replicated like the internal topics: state must outlive any one broker.
        let live = match store::live_brokers(client).await {
            Ok(live) => live.len() as u32,
            Err(err) => return Err(DeployError::Internal(err.into())),
        };
        let replication_factor = live.clamp(1, CHANGELOG_REPLICATION_FACTOR);
        let min_insync = if replication_factor >= CHANGELOG_REPLICATION_FACTOR {
            "2"
        } else {
            "1"
        };
        let configs = std::collections::HashMap::from([
            ("cleanup.policy".to_string(), "compact".to_string()),
            ("retention.ms".to_string(), "-1".to_string()),
            ("min.insync.replicas".to_string(), min_insync.to_string()),
        ]);
        match admin
            .create_topic(&topic, Some(partitions), Some(replication_factor), configs)
            .await
        {
            Ok(_) => {}
            Err(err) if err.code() == Some(v1::ErrorCode::TopicAlreadyExists) => {}
            Err(err) => {
                return Err(DeployError::Invalid(format!(
                    "cannot create changelog {topic}: {err}"
                )));
            }
        }
    }
    Ok(())
}

fn dead_letter(
    saved: &Saved,
    record: &runnel_flat::FlatRecord<'_>,
    reason: &str,
) -> ProducerRecord {
    let mut out = ProducerRecord::new(saved.dead_letter_topic.clone());
    out.key = record.key.map(Bytes::copy_from_slice);
    out.value = record.value.map(Bytes::copy_from_slice);
    out.timestamp_ms = Some(record.timestamp_ms);
    out.headers = runnel_flat::headers(record.headers)
        .map(|(key, value)| Header {
            key: key.to_string(),
            value: value.map(Bytes::copy_from_slice),
        })
        .collect();
    for (key, value) in [
        ("runnel.error", reason.to_string()),
        ("runnel.transform", saved.name.clone()),
        ("runnel.source.topic", saved.input_topic.clone()),
        ("runnel.source.partition", record.partition.to_string()),
        ("runnel.source.offset", record.offset.to_string()),
    ] {
        out.headers.push(Header {
            key: key.into(),
            value: Some(Bytes::from(value)),
        });
    }
    out
}

/// What a guest call needs besides its input.
pub(crate) struct Guest {
    pub(crate) host: Arc<WasmHost>,
    pub(crate) pre: Arc<Prepared>,
    pub(crate) saved: Saved,
    pub(crate) config: Vec<(String, String)>,
    pub(crate) log: LogBuffer,
}

impl Guest {
    /// Calls the guest on `input` (or with `timers`), in `task`'s stores for a stateful
    /// component, making a fresh instance if there is none.
    fn call(
        &self,
        instance: &mut Option<Instance>,
        task: &mut Option<TaskState>,
        input: Input<'_>,
    ) -> anyhow::Result<Result<BatchResult, GuestFailure>> {
        if instance.is_none() {
            let fresh = self
                .host
                .instantiate(
                    &self.pre,
                    self.saved.setup(
                        &self.config,
                        &self.saved.layout().guest_names(),
                        self.log.clone(),
                    ),
                )
                .map_err(|e| anyhow::anyhow!(e.0))?;
            *instance = Some(fresh);
        }
        let Some(live) = instance.as_mut() else {
            anyhow::bail!("no instance");
        };
        if let Some(state) = task.take() {
            live.enter(state);
        }
        let result = match input {
            Input::Records(flat) => live.process(flat),
            Input::Timers(timers) => live.fire(timers),
        };
        *task = live.leave();
        if result.is_err() {
            // A trapped instance is never called again.
            *instance = None;
        }
        Ok(result)
    }
}

enum Input<'a> {
    Records(&'a [u8]),
    Timers(&'a [Timer]),
}

/// Timers handed to one `fire` call.
const TIMERS_PER_CALL: usize = 1_000;
/// `fire` calls per task and batch, so that a flood of timers cannot starve the input.
const TIMER_CALLS_MAX: usize = 10;

/// Runs the guest over `records`: a stateful component partition by partition in each
/// partition's stores, then over the timers that came due in every open task.
pub(crate) fn process(
    guest: &Guest,
    instance: &mut Option<Instance>,
    inputs: &Inputs,
    tasks: Option<&SharedTasks>,
    unit: u64,
) -> anyhow::Result<Processed> {
    let mut processed = Processed::default();
    let Some(tasks) = tasks else {
        process_records(
            guest,
            instance,
            &mut None,
            inputs,
            0..inputs.len(),
            unit,
            &mut processed,
        )?;
        return Ok(processed);
    };
    let mut tasks = tasks::lock(tasks);
    let mut newest: BTreeMap<u32, i64> = BTreeMap::new();
    for (partition, range) in inputs.partition_runs() {
        let mut task = Some(
            tasks
                .take(partition)
                .with_context(|| format!("the state of partition {partition} is not open"))?,
        );
        let result = process_records(
            guest,
            instance,
            &mut task,
            inputs,
            range.clone(),
            unit,
            &mut processed,
        );
        if let Some(task) = task {
            tasks.put_back(task);
        }
        result?;
        let newest_here = inputs.records()[range]
            .iter()
            .map(|r| r.timestamp_ms)
            .max()
            .unwrap_or(i64::MIN);
        let entry = newest.entry(partition).or_insert(i64::MIN);
        *entry = (*entry).max(newest_here);
    }
    for partition in tasks.open_partitions() {
        let mut task = tasks.take(partition);
        let result = fire_timers(
            guest,
            instance,
            &mut task,
            newest.get(&partition).copied(),
            unit,
            &mut processed,
        );
        if let Some(task) = task {
            tasks.put_back(task);
        }
        result?;
    }
    Ok(processed)
}

/// Keeps or drops the running call's state writes.
fn end_call(task: &mut Option<TaskState>, keep: bool, unit: u64, processed: &mut Processed) {
    if let Some(task) = task.as_mut() {
        let partition = task.partition();
        let writes = task.end_call(keep, unit);
        processed
            .changelog
            .extend(writes.into_iter().map(|w| (partition, w)));
    }
}

/// Runs the guest over the inputs in `range` (input indexes from its start); on a trap,
/// runs them one by one in fresh instances to find the records that trap. State writes
/// of a call that trapped vanish.
fn process_records(
    guest: &Guest,
    instance: &mut Option<Instance>,
    task: &mut Option<TaskState>,
    inputs: &Inputs,
    range: std::ops::Range<usize>,
    unit: u64,
    processed: &mut Processed,
) -> anyhow::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let base = range.start;
    match guest.call(instance, task, Input::Records(inputs.flat(range.clone())))? {
        Ok(result) => {
            end_call(task, true, unit, processed);
            collect(&guest.saved, result, Some(base), range.len(), processed);
        }
        Err(failure) => {
            end_call(task, false, unit, processed);
            guest.log.push(format!(
                "[runtime] guest {}; isolating the record",
                failure.0
            ));
            for index in range {
                match guest.call(
                    instance,
                    task,
                    Input::Records(inputs.flat(index..index + 1)),
                )? {
                    Ok(result) => {
                        end_call(task, true, unit, processed);
                        collect(&guest.saved, result, Some(index), 1, processed);
                    }
                    Err(failure) => {
                        end_call(task, false, unit, processed);
                        processed
                            .failures
                            .push((index, format!("guest {}", failure.0)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Advances a task's event time to `newest` and calls the guest with the timers that
/// came due (event time against the watermark, wall clock against now). A timer is
/// deleted as it is handed over, in the same call's writes.
fn fire_timers(
    guest: &Guest,
    instance: &mut Option<Instance>,
    task: &mut Option<TaskState>,
    newest: Option<i64>,
    unit: u64,
    processed: &mut Processed,
) -> anyhow::Result<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for _ in 0..TIMER_CALLS_MAX {
        let Some(state) = task.as_mut() else {
            return Ok(());
        };
        if let Some(newest) = newest {
            state.observe_timestamp(newest);
        }
        let watermark =
            crate::host::watermark(state.max_timestamp_ms(), guest.saved.allowed_lateness_ms);
        let mut due = state.due_timers(0, watermark, TIMERS_PER_CALL)?;
        if due.len() < TIMERS_PER_CALL {
            due.extend(state.due_timers(1, now_ms, TIMERS_PER_CALL - due.len())?);
        }
        if due.is_empty() {
            end_call(task, true, unit, processed);
            return Ok(());
        }
        let drop_due = |state: &mut TaskState| -> anyhow::Result<()> {
            for timer in &due {
                state.cancel(timer)?;
            }
            Ok(())
        };
        drop_due(state)?;
        match guest.call(instance, task, Input::Timers(&due))? {
            Ok(result) => {
                end_call(task, true, unit, processed);
                let mut fired = Processed::default();
                collect(&guest.saved, result, None, due.len(), &mut fired);
                processed.outputs.extend(fired.outputs);
                processed
                    .timer_failures
                    .extend(fired.failures.into_iter().map(|(i, reason)| {
                        format!(
                            "timer at {} ms: {reason}",
                            due.get(i).map_or(0, |t| t.at_ms)
                        )
                    }));
            }
            Err(failure) => {
                // The call's writes vanish; the timers are dropped all the same.
                end_call(task, false, unit, processed);
                if let Some(state) = task.as_mut() {
                    if let Some(newest) = newest {
                        state.observe_timestamp(newest);
                    }
                    drop_due(state)?;
                }
                end_call(task, true, unit, processed);
                processed
                    .timer_failures
                    .push(format!("{} timers: guest {}", due.len(), failure.0));
            }
        }
    }
    Ok(())
}

/// Checks a batch result for `count` inputs starting at input `base` (`None`: timers,
/// failures then numbered from 0): the inputs the guest refused, or whose output is
/// wrong, become failures, and the output is kept for encoding without their records.
fn collect(
    saved: &Saved,
    result: BatchResult,
    base: Option<usize>,
    count: usize,
    processed: &mut Processed,
) {
    let mut refused: BTreeMap<usize, String> = BTreeMap::new();
    for (index, message) in result.errors {
        if index as usize >= count {
            refused.insert(0, format!("guest reported a malformed batch: {message}"));
        } else {
            refused.insert(index as usize, message);
        }
    }
    for output in runnel_flat::read_outputs(&result.records) {
        let output = match output {
            Ok(output) => output,
            Err(err) => {
                refused
                    .entry(0)
                    .or_insert_with(|| format!("guest wrote {err}"));
                break;
            }
        };
        if output.input_index as usize >= count {
            refused
                .entry(0)
                .or_insert_with(|| "guest emitted for an input that does not exist".into());
        } else if saved.output_topics.len() <= output.output_index as usize {
            refused
                .entry(output.input_index as usize)
                .or_insert_with(|| {
                    format!(
                        "emitted to undeclared output #{}; declared: {:?}",
                        output.output_index, saved.output_topics
                    )
                });
        }
    }
    let first = base.unwrap_or(0);
    processed.outputs.push(GuestOutput {
        buf: result.records,
        base,
        count,
        refused: refused.keys().copied().collect(),
        outputs: saved.output_topics.len(),
    });
    processed
        .failures
        .extend(refused.into_iter().map(|(i, reason)| (first + i, reason)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(input: u32, output: u32, key: Option<&str>, value: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        runnel_flat::write_output(
            &mut buf,
            &runnel_flat::FlatOutput {
                input_index: input,
                output_index: output,
                timestamp_ms: 1_000,
                key: key.map(str::as_bytes),
                value: Some(value.as_bytes()),
                headers: runnel_flat::NO_HEADERS,
            },
        );
        buf
    }

    #[test]
    fn outputs_are_encoded_per_topic_and_partition_in_order_and_split_when_full() {
        let topics = [
            OutputTopic {
                name: "a".into(),
                partitions: 2,
                batch_bytes_max: 200,
            },
            OutputTopic {
                name: "b".into(),
                partitions: 3,
                batch_bytes_max: 1 << 20,
            },
        ];
        let mut buf = Vec::new();
        let mut expected: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        for i in 0..40u32 {
            let (topic, key) = match i % 4 {
                0 | 1 => (0, Some(format!("key-{}", i % 3))),
                2 => (1, None),
                _ => (1, Some("key-9".to_string())),
            };
            let value = format!("value-{i}");
            buf.extend(output(i, topic, key.as_deref(), &value));
            // Input 5 is refused: nothing of it is sent.
            if i == 5 {
                continue;
            }
            let partition = match &key {
                Some(key) => runnel_client::partition_for_key(
                    key.as_bytes(),
                    topics[topic as usize].partitions,
                ),
                None => 7 % topics[topic as usize].partitions,
            };
            expected
                .entry((topics[topic as usize].name.clone(), partition))
                .or_default()
                .push(value);
        }
        let outputs = [GuestOutput {
            buf,
            base: Some(0),
            count: 40,
            refused: BTreeSet::from([5]),
            outputs: 2,
        }];
        let batches =
            encode_outputs(&outputs, &topics, BatchOptions::default(), 7).expect("encodes");
        let mut got: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        let mut batches_of_a: BTreeMap<u32, usize> = BTreeMap::new();
        for batch in batches {
            let bytes = batch.builder.build();
            assert!(
                batch.topic != "a" || bytes.len() <= 200,
                "a batch outgrew its topic's limit: {} bytes",
                bytes.len()
            );
            if batch.topic == "a" {
                *batches_of_a.entry(batch.partition).or_default() += 1;
            }
            let values = got.entry((batch.topic, batch.partition)).or_default();
            for record in runnel_batch::decode_records(&bytes).expect("decodes") {
                values
                    .push(String::from_utf8(record.value.expect("value").to_vec()).expect("utf-8"));
            }
        }
        assert_eq!(got, expected);
        assert!(
            batches_of_a.values().any(|n| *n > 1),
            "a full batch of topic a was split: {batches_of_a:?}"
        );
    }
}
