//! The worker: runs connectors, each as a task (`task.rs`), and answers for them: create
//! (refusing a name that exists), status, list, pause, resume, restart, delete. Inside a
//! broker, connectors are defined in the deployment store (`runnel_streams::store`) and
//! each runs on the live broker that owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use runnel_client::{Admin, Client, ConnectOptions, LazyClient, v1};
use runnel_streams::host::{LogBuffer, WasmHost};
use runnel_streams::store::{self, Definition, Kind as Stored, Reconciler, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::host::ConnectorHost;
use crate::spec::{self, ConnectorSpec, Kind, Secrets};
use crate::task::Task;

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
pub(crate) enum Control {
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Running,
    Retrying(String),
    Paused,
    Failed(String),
    Stopped,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) records: AtomicU64,
    pub(crate) record_errors: AtomicU64,
    /// The last committed source position, as text.
    pub(crate) position: Mutex<String>,
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
    /// The stored definition's version, restart count and pause flag it was started
    /// from (a standalone worker's are 0 and its own).
    version: u32,
    restarts: u32,
    paused: bool,
}

/// Runs connectors; cheap to clone.
///
/// Inside a broker ([`Worker::run_from`]) the connectors are defined cluster-wide in
/// the deployment store and each runs on one live broker, chosen by
/// [`store::owner`]; commands taken by any broker write the store, and every broker
/// starts and stops what it owns. Standalone (`runnel connect run`) it runs what it is
/// given, in this process.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) host: ConnectorHost,
    pub(crate) transforms: WasmHost,
    client: LazyClient,
    /// Where connectors were saved on this broker before the store (imported once).
    local_dir: Option<PathBuf>,
    store: std::sync::OnceLock<(Store, u32)>,
    connectors: Mutex<BTreeMap<String, Running>>,
    reconciling: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the store holds of a connector beyond its [`Definition`]: its file, and the
/// components it names that are not built in.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    file: String,
    yaml: String,
    /// `None` for a connector that ships with Runnel.
    #[serde(default)]
    connector_sha256: Option<String>,
    transform_sha256: Vec<String>,
    /// The principal it acts as when its file names none: its creator's.
    #[serde(default)]
    principal: Option<String>,
}

/// A connector saved on one broker's disk before definitions were stored cluster-wide.
#[derive(Debug, Deserialize)]
struct LocalSaved {
    file: String,
    yaml: String,
    connector_sha256: String,
    transform_sha256: Vec<String>,
    paused: bool,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a command waits for the owner of a connector to report what it changed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a broker waits for another's status.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a broker checks which connectors it owns (brokers come and go).
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);

impl Worker {
    /// A worker; `data_dir` (inside a broker) is where connectors saved by an earlier
    /// version are imported from.
    ///
    /// # Errors
    /// The Wasm engines cannot be set up.
    pub fn new(data_dir: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Worker {
            inner: Arc::new(Inner {
                host: ConnectorHost::new()?,
                transforms: WasmHost::new()?,
                client: LazyClient::default(),
                local_dir: data_dir.map(|d| d.join("__connect")),
                store: std::sync::OnceLock::new(),
                connectors: Mutex::new(BTreeMap::new()),
                reconciling: tokio::sync::Mutex::new(()),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// Where the worker reaches the broker, and how (`options.local`: the broker when it
    /// runs in this process).
    pub fn connect_to(&self, brokers: Vec<String>, options: ConnectOptions) {
        self.inner.client.connect_to(brokers, options);
    }

    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        Ok(self.inner.client.get().await?)
    }

    fn store(&self) -> Option<(&Store, u32)> {
        self.inner.store.get().map(|(store, id)| (store, *id))
    }

    /// Runs, from now on and as the store and the live brokers change, the stored
    /// connectors this broker (`node_id`) owns. Connectors saved on this broker's disk by
    /// an earlier version are moved into the store first.
    ///
    /// # Errors
    /// The worker was started already.
    pub fn run_from(&self, store: Store, node_id: u32) -> anyhow::Result<()> {
        self.inner
            .store
            .set((store.clone(), node_id))
            .map_err(|_| anyhow::anyhow!("the connect worker is started already"))?;
        store::spawn_reconciler(store, self.clone(), Some(RECONCILE_INTERVAL));
        Ok(())
    }

    /// Writes a new connector's components and definition.
    async fn put_stored(
        &self,
        store: &Store,
        spec: &ConnectorSpec,
        yaml: &str,
        components: &Components,
        paused: bool,
    ) -> anyhow::Result<()> {
        let connector_sha256 = match spec.component {
            spec::Component::Builtin(_) => None,
            spec::Component::File(_) => Some(store.put_component(&components.connector).await?),
        };
        let mut transform_sha256 = Vec::new();
        for wasm in &components.transforms {
            transform_sha256.push(store.put_component(wasm).await?);
        }
        let saved = Saved {
            file: spec.file.clone(),
            yaml: yaml.to_string(),
            connector_sha256: connector_sha256.clone(),
            transform_sha256: transform_sha256.clone(),
            principal: spec.principal.clone(),
        };
        let definition = Definition {
            spec: serde_json::to_value(&saved)?,
            components: connector_sha256
                .into_iter()
                .chain(transform_sha256)
                .collect(),
            paused,
            version: 1,
            restarts: 0,
        };
        store
            .put(Stored::Connector, &spec.name, Some(&definition))
            .await?;
        Ok(())
    }

    /// A stored connector's spec, file text and components.
    fn load_stored(
        store: &Store,
        definition: &Definition,
    ) -> anyhow::Result<(ConnectorSpec, String, Components)> {
        let saved: Saved = serde_json::from_value(definition.spec.clone())
            .context("the stored connector is unreadable")?;
        let mut spec = spec::parse(&saved.file, &saved.yaml)?;
        if spec.principal.is_none() {
            spec.principal = saved.principal;
        }
        let connector =
            match (&spec.component, &saved.connector_sha256) {
                (spec::Component::Builtin(name), _) => crate::builtin::component(name)
                    .map(Arc::from)
                    .ok_or_else(|| anyhow::anyhow!("unknown connector {name:?}"))?,
                (spec::Component::File(_), Some(sha)) => Arc::from(store.component(sha)?),
                (spec::Component::File(path), None) => {
                    anyhow::bail!(
                        "the stored connector lacks its component {}",
                        path.display()
                    )
                }
            };
        let transforms = saved
            .transform_sha256
            .iter()
            .map(|sha| store.component(sha).map(Arc::from))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((
            spec,
            saved.yaml,
            Components {
                connector,
                transforms,
            },
        ))
    }

    /// The connectors the other brokers of `live` report running (those that answer).
    async fn running_elsewhere(&self, live: &[v1::BrokerInfo], me: u32) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let Ok(client) = self.client().await else {
            return names;
        };
        let admin = Admin::new(client);
        for broker in live.iter().filter(|b| b.id != me) {
            if let Ok(Ok(list)) =
                tokio::time::timeout(PEER_TIMEOUT, admin.local_connectors(&broker.address)).await
            {
                names.extend(list.into_iter().map(|s| s.name));
            }
        }
        names
    }

    /// Checks a connector before it is created: the name is free, secrets resolve,
    /// topics exist, components fit their worlds.
    async fn check(
        &self,
        spec: &ConnectorSpec,
        components: &Components,
        exists: bool,
    ) -> Result<(), ConnectError> {
        if exists {
            return Err(ConnectError::Exists(spec.name.clone()));
        }
        spec::read_secrets(spec).map_err(|e| ConnectError::Invalid(e.0))?;
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
            let pre = self
                .inner
                .transforms
                .prepare(&hex(&Sha256::digest(wasm)), wasm)
                .map_err(|e| {
                    ConnectError::Invalid(format!(
                        "connector {:?}: transforms[{i}]: {}",
                        spec.name, e.0
                    ))
                })?;
            if pre.is_stateful() {
                return Err(ConnectError::Invalid(format!(
                    "connector {:?}: transforms[{i}] is a stateful runnel:transform@0.2.0 component; a connector's transforms are stateless (deploy it with `runnel transform deploy` between topics instead)",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Checks a connector and starts it: inside a broker, on the live broker that owns
    /// it; standalone, here.
    ///
    /// # Errors
    /// The name exists; a secret is missing; a topic does not exist; a component is not
    /// Wasm or does not fit its world; the store cannot be written.
    pub async fn create(
        &self,
        spec: ConnectorSpec,
        yaml: String,
        components: Components,
    ) -> Result<v1::ConnectorStatus, ConnectError> {
        let name = spec.name.clone();
        let Some((store, _)) = self.store() else {
            let exists = lock(&self.inner.connectors).contains_key(&name);
            self.check(&spec, &components, exists).await?;
            self.start(spec, yaml, components, &Definition::default());
            return self.status(&name).await;
        };
        let snapshot = store.caught_up().await?;
        let exists = snapshot.get(Stored::Connector, &name).is_some();
        self.check(&spec, &components, exists).await?;
        self.put_stored(store, &spec, &yaml, &components, false)
            .await?;
        self.reconcile().await;
        self.settled_status(&name, |s| s.state != "Unassigned")
            .await
    }

    /// The status of `name` once `done` holds of it (or after [`SETTLE_TIMEOUT`], as it
    /// is then).
    async fn settled_status(
        &self,
        name: &str,
        done: impl Fn(&v1::ConnectorStatus) -> bool,
    ) -> Result<v1::ConnectorStatus, ConnectError> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let status = self.status(name).await?;
            if done(&status) || tokio::time::Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start(
        &self,
        spec: ConnectorSpec,
        yaml: String,
        components: Components,
        definition: &Definition,
    ) {
        let paused = definition.paused;
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
                version: definition.version,
                restarts: definition.restarts,
                paused,
            },
        );
    }

    /// The status of a connector: inside a broker, as the broker running it reports it.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn status(&self, name: &str) -> Result<v1::ConnectorStatus, ConnectError> {
        if self.store().is_some() {
            return self
                .cluster_statuses(Some(name))
                .await
                .pop()
                .ok_or_else(|| ConnectError::Unknown(name.to_string()));
        }
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

    /// The connectors this process runs, with their lag.
    pub async fn local_list(&self) -> Vec<v1::ConnectorStatus> {
        let own = self.store().map_or(0, |(_, id)| id);
        let mut out: Vec<v1::ConnectorStatus> = lock(&self.inner.connectors)
            .values()
            .map(describe)
            .collect();
        for status in &mut out {
            status.broker = own;
            if status.kind == "sink" {
                status.lag = self.lag(&status.name).await.unwrap_or(-1);
            }
        }
        out
    }

    /// Every stored connector (`only`: that one) as the broker running it reports it,
    /// or Unassigned from its definition while no live broker does.
    async fn cluster_statuses(&self, only: Option<&str>) -> Vec<v1::ConnectorStatus> {
        let Some((store, me)) = self.store() else {
            return Vec::new();
        };
        let snapshot = store.snapshot();
        let mut reported: BTreeMap<String, v1::ConnectorStatus> = BTreeMap::new();
        let keep = |s: &v1::ConnectorStatus| only.is_none_or(|o| o == s.name);
        for status in self.local_list().await.into_iter().filter(keep) {
            reported.insert(status.name.clone(), status);
        }
        let (live, admin) = match self.client().await {
            Ok(client) => (
                store::live_brokers(&client).await.unwrap_or_default(),
                Some(Admin::new(client)),
            ),
            Err(_) => (Vec::new(), None),
        };
        let ids: Vec<u32> = live.iter().map(|b| b.id).collect();
        for broker in live.iter().filter(|b| b.id != me) {
            let wanted = only.is_none_or(|o| store::owner(o, &ids) == Some(broker.id));
            let Some(admin) = admin.as_ref().filter(|_| wanted) else {
                continue;
            };
            match tokio::time::timeout(PEER_TIMEOUT, admin.local_connectors(&broker.address)).await
            {
                Ok(Ok(list)) => {
                    for status in list.into_iter().filter(keep) {
                        reported.insert(status.name.clone(), status);
                    }
                }
                Ok(Err(err)) => {
                    tracing::debug!(broker = broker.id, error = %err, "no connector status from the broker");
                }
                Err(_) => {
                    tracing::debug!(
                        broker = broker.id,
                        "no connector status from the broker in time"
                    );
                }
            }
        }
        let mut out = Vec::new();
        for (name, definition) in snapshot.of(Stored::Connector) {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            if let Some(status) = reported.remove(name) {
                out.push(status);
                continue;
            }
            let Ok((spec, _, _)) = Self::load_stored(store, definition) else {
                continue;
            };
            out.push(v1::ConnectorStatus {
                name: name.clone(),
                kind: kind_name(spec.kind).into(),
                connector: component_name(&spec),
                topics: spec.topics.clone(),
                state: "Unassigned".into(),
                lag: -1,
                config: spec.config.iter().cloned().collect(),
                file: spec.file.clone(),
                ..Default::default()
            });
        }
        out
    }

    /// Every connector (inside a broker: of the cluster).
    pub async fn list(&self) -> Vec<v1::ConnectorStatus> {
        if self.store().is_some() {
            return self.cluster_statuses(None).await;
        }
        self.local_list().await
    }

    /// Changes a stored connector's definition with `change`.
    async fn change_stored(
        &self,
        name: &str,
        change: impl FnOnce(&mut Definition),
    ) -> Result<(), ConnectError> {
        let Some((store, _)) = self.store() else {
            return Err(ConnectError::Unknown(name.to_string()));
        };
        let snapshot = store.caught_up().await?;
        let mut definition = snapshot
            .get(Stored::Connector, name)
            .cloned()
            .ok_or_else(|| ConnectError::Unknown(name.to_string()))?;
        change(&mut definition);
        store
            .put(Stored::Connector, name, Some(&definition))
            .await?;
        self.reconcile().await;
        Ok(())
    }

    /// Pauses or resumes a connector.
    ///
    /// # Errors
    /// Unknown connector, or a store that cannot be written.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<v1::ConnectorStatus, ConnectError> {
        if self.store().is_none() {
            if !lock(&self.inner.connectors).contains_key(name) {
                return Err(ConnectError::Unknown(name.to_string()));
            }
            self.set_local_paused(name, paused);
            return self.status(name).await;
        }
        self.change_stored(name, |d| d.paused = paused).await?;
        let want = if paused { "Paused" } else { "Running" };
        self.settled_status(name, |s| s.state == want || s.state == "Failed")
            .await
    }

    fn set_local_paused(&self, name: &str, paused: bool) {
        let mut connectors = lock(&self.inner.connectors);
        let Some(running) = connectors.get_mut(name) else {
            return;
        };
        running.paused = paused;
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

    /// Stops a connector (it commits what was acknowledged) and hands back what it was
    /// started from.
    async fn stop(&self, name: &str) -> Result<(ConnectorSpec, String, Components), ConnectError> {
        let running = lock(&self.inner.connectors)
            .remove(name)
            .ok_or_else(|| ConnectError::Unknown(name.to_string()))?;
        running.control.send_replace(Control::Stop);
        let mut task = running.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        Ok((running.spec, running.yaml, running.components))
    }

    /// Stops a connector and starts it again from its committed position (and
    /// unpaused).
    ///
    /// # Errors
    /// Unknown connector, or a store that cannot be written.
    pub async fn restart(&self, name: &str) -> Result<v1::ConnectorStatus, ConnectError> {
        if self.store().is_none() {
            let (spec, yaml, components) = self.stop(name).await?;
            self.start(spec, yaml, components, &Definition::default());
            return self.status(name).await;
        }
        self.change_stored(name, |d| {
            d.restarts += 1;
            d.paused = false;
        })
        .await?;
        self.settled_status(name, |s| s.state != "Unassigned").await
    }

    /// Stops a connector and forgets it. Its committed source position and sink group
    /// offsets stay, so a connector created again with the name resumes.
    ///
    /// # Errors
    /// Unknown connector, or a store that cannot be written.
    pub async fn delete(&self, name: &str) -> Result<(), ConnectError> {
        let Some((store, _)) = self.store() else {
            self.stop(name).await?;
            return Ok(());
        };
        let snapshot = store.caught_up().await?;
        if snapshot.get(Stored::Connector, name).is_none() {
            return Err(ConnectError::Unknown(name.to_string()));
        }
        store.put(Stored::Connector, name, None).await?;
        self.reconcile().await;
        Ok(())
    }

    /// Stops every connector this process runs, letting each commit what it finished.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        let _one = self.inner.reconciling.lock().await;
        let names: Vec<String> = lock(&self.inner.connectors).keys().cloned().collect();
        for name in names {
            let _ = self.stop(&name).await;
        }
    }

    /// Writes each connector's state, records and errors (Prometheus).
    pub fn collect_metrics(&self, out: &mut runnel_metrics::Exposition) {
        for running in lock(&self.inner.connectors).values() {
            let status = describe(running);
            let labels = [
                ("connector", status.name.as_str()),
                ("kind", status.kind.as_str()),
            ];
            out.counter(
                "runnel_connector_records_total",
                "Records a connector moved between its outside system and its topics.",
                &labels,
                status.records,
            );
            out.counter(
                "runnel_connector_record_errors_total",
                "Records a connector's error policy handled.",
                &labels,
                status.record_errors,
            );
            for state in ["Running", "Retrying", "Paused", "Failed"] {
                out.gauge(
                    "runnel_connector_state",
                    "1 for the state a connector run by this broker is in (Running, Retrying, Paused or Failed).",
                    &[labels[0], labels[1], ("state", state)],
                    f64::from(u8::from(status.state == state)),
                );
            }
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

impl store::Reconciler for Worker {
    /// Moves connectors saved under `<data>/__connect` into the store (unless it has one
    /// of that name), renaming each file to `.imported`.
    async fn import_local(&self, store: &Store) -> anyhow::Result<()> {
        let Some(dir) = self.inner.local_dir.clone() else {
            return Ok(());
        };
        for (path, local) in store::saved_files::<LocalSaved>(&dir)? {
            let spec = spec::parse(&local.file, &local.yaml)?;
            if store
                .snapshot()
                .get(Stored::Connector, &spec.name)
                .is_none()
            {
                let read = |sha: &str| -> anyhow::Result<Vec<u8>> {
                    let file = dir.join("wasm").join(format!("{sha}.wasm"));
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))
                };
                let connector = match &spec.component {
                    spec::Component::Builtin(name) => crate::builtin::component(name)
                        .map(Arc::from)
                        .ok_or_else(|| anyhow::anyhow!("unknown connector {name:?}"))?,
                    spec::Component::File(_) => Arc::from(read(&local.connector_sha256)?),
                };
                let transforms = local
                    .transform_sha256
                    .iter()
                    .map(|sha| read(sha).map(Arc::from))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let components = Components {
                    connector,
                    transforms,
                };
                self.put_stored(store, &spec, &local.yaml, &components, local.paused)
                    .await?;
                tracing::info!(connector = %spec.name, "imported a connector saved on this broker into {}", store::TOPIC);
            }
            store::mark_imported(&path)?;
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    /// Makes this broker run exactly the stored connectors it owns among the live
    /// brokers, at their stored version, restart count and pause state.
    async fn reconcile(&self) {
        let Some((store, me)) = self.store() else {
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
        // Without a view of the live brokers nothing moves: what runs goes on.
        let Ok(client) = self.client().await else {
            return;
        };
        let Ok(live) = store::live_brokers(&client).await else {
            return;
        };
        let ids: Vec<u32> = live.iter().map(|b| b.id).collect();
        let wanted: BTreeMap<String, Definition> = snapshot
            .of(Stored::Connector)
            .filter(|(name, _)| store::owner(name, &ids) == Some(me))
            .map(|(name, d)| (name.clone(), d.clone()))
            .collect();
        let stale: Vec<String> = lock(&self.inner.connectors)
            .iter()
            .filter(|(name, r)| {
                wanted
                    .get(*name)
                    .is_none_or(|w| w.version != r.version || w.restarts != r.restarts)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            tracing::info!(connector = %name, "stopping the connector here");
            let _ = self.stop(&name).await;
        }
        let starting = wanted
            .keys()
            .any(|name| !lock(&self.inner.connectors).contains_key(name));
        // A connector moves here only once its previous broker has stopped it: that
        // broker sees the change within a reconcile interval, and until then the two
        // would read the same source twice.
        let elsewhere = if starting {
            self.running_elsewhere(&live, me).await
        } else {
            BTreeSet::new()
        };
        for (name, definition) in wanted {
            let paused = lock(&self.inner.connectors).get(&name).map(|r| r.paused);
            match paused {
                Some(paused) if paused == definition.paused => {}
                Some(_) => self.set_local_paused(&name, definition.paused),
                None if elsewhere.contains(&name) => {
                    tracing::debug!(connector = %name, "waiting for its previous broker to stop it");
                }
                None => match Self::load_stored(store, &definition) {
                    Ok((spec, yaml, components)) => {
                        tracing::info!(connector = %name, "starting the connector here");
                        self.start(spec, yaml, components, &definition);
                    }
                    Err(err) => {
                        tracing::error!(connector = %name, error = %format!("{err:#}"), "cannot start the connector");
                    }
                },
            }
        }
    }
}

fn component_name(spec: &ConnectorSpec) -> String {
    match &spec.component {
        spec::Component::Builtin(name) => name.clone(),
        spec::Component::File(path) => path.display().to_string(),
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
        connector: component_name(spec),
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
        broker: 0,
    }
}
