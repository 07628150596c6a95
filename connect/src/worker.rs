//! The worker: runs connectors, each as a task (`task.rs`), and answers for them: create
//! (refusing a name that exists), status, list, pause, resume, restart, delete. Connectors
//! created in a broker process are saved under `<data>/__connect` and start again with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_client::{Admin, Client, v1};
use runnel_streams::host::{LogBuffer, WasmHost};
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
}

/// Runs connectors; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) host: ConnectorHost,
    pub(crate) transforms: WasmHost,
    brokers: std::sync::OnceLock<Vec<String>>,
    client: tokio::sync::OnceCell<Client>,
    /// Where created connectors are saved (inside a broker); `None` for `connect run`.
    dir: Option<PathBuf>,
    connectors: Mutex<BTreeMap<String, Running>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

pub(crate) fn hex(bytes: &[u8]) -> String {
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

    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
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
            self.save(
                &spec.name,
                &Saved {
                    file: spec.file.clone(),
                    yaml: yaml.clone(),
                    connector_sha256,
                    transform_sha256,
                    paused: false,
                },
            )
            .map_err(ConnectError::Internal)?;
        }
        let name = spec.name.clone();
        self.start(spec, yaml, components, false)?;
        self.status(&name).await
    }

    fn save(&self, name: &str, saved: &Saved) -> anyhow::Result<()> {
        let Some(dir) = &self.inner.dir else {
            return Ok(());
        };
        let path = dir.join(format!("{name}.json"));
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
        self.save(name, &saved)
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

    /// Stops a connector and starts it again from its committed position.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn restart(&self, name: &str) -> Result<v1::ConnectorStatus, ConnectError> {
        let (spec, yaml, components) = self.stop(name).await?;
        self.start(spec, yaml, components, false)?;
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
