//! The connector host: the only module of the connect runtime that touches wasmtime.
//!
//! A connector gets WASI with exactly what its file grants: each directory under
//! `capabilities.dirs` is pre-opened at its own path (read-only unless `read-write`), and
//! TCP connections are allowed only to the addresses the `capabilities.network` entries
//! resolve to. No environment, no inherited stdio. Clocks and randomness are real (a
//! connector talks to the outside world; it is not replayed like a transform). Each call
//! has a wall-clock deadline (`call-timeout-ms`), which also stops a connector that loops.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use runnel_streams::host::{LogBuffer, deadline_ticks, panic_message, tick_epochs_of};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use crate::spec::{DirGrant, HostGrant};

mod source {
    wasmtime::component::bindgen!({
        world: "source-connector",
        path: "../proto/wit/connect",
    });
}

mod sink {
    wasmtime::component::bindgen!({
        world: "sink-connector",
        path: "../proto/wit/connect",
        with: {
            "runnel:connect/host": super::source::runnel::connect::host,
            "runnel:connect/types": super::source::runnel::connect::types,
        },
    });
}

use source::runnel::connect::host::Level;
use source::runnel::connect::types::{Failure as WitFailure, WriteError as WitWriteError};

/// Bytes of guest stderr kept per instance.
const STDERR_BYTES_MAX: usize = 64 * 1024;

/// A connector instance's host-side state.
pub struct ConnectorState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    name: String,
    log: LogBuffer,
    redact: Arc<dyn Fn(&str) -> String + Send + Sync>,
    stderr: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
    dirs: Vec<DirGrant>,
    hosts: Vec<HostGrant>,
}

impl WasiView for ConnectorState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl source::runnel::connect::host::Host for ConnectorState {
    fn log(&mut self, level: Level, message: String) {
        let mut message = (self.redact)(&message);
        message.truncate(4096);
        let name = &self.name;
        let level = match level {
            Level::Trace | Level::Debug => {
                tracing::debug!(connector = %name, "{message}");
                "debug"
            }
            Level::Info => {
                tracing::info!(connector = %name, "{message}");
                "info"
            }
            Level::Warn => {
                tracing::warn!(connector = %name, "{message}");
                "warn"
            }
            Level::Error => {
                tracing::error!(connector = %name, "{message}");
                "error"
            }
        };
        self.log.push(format!("[connector {level}] {message}"));
    }

    fn granted_dirs(&mut self) -> Vec<source::runnel::connect::host::DirGrant> {
        self.dirs
            .iter()
            .map(|d| source::runnel::connect::host::DirGrant {
                path: d.path.display().to_string(),
                writable: d.write,
            })
            .collect()
    }

    fn granted_hosts(&mut self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| format!("{}:{}", h.host, h.port))
            .collect()
    }
}

impl source::runnel::connect::types::Host for ConnectorState {}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Transient: retry with backoff.
    #[error("{0}")]
    Retry(String),
    /// The connector says it cannot go on, or it trapped, timed out or is broken.
    #[error("{0}")]
    Fatal(String),
}

impl From<WitFailure> for CallError {
    fn from(failure: WitFailure) -> Self {
        match failure {
            WitFailure::Retry(m) => CallError::Retry(m),
            WitFailure::Fatal(m) => CallError::Fatal(m),
        }
    }
}

/// Why a sink's write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    Call(CallError),
    /// (index in the batch, reason) of refused records; the rest were written.
    Rejected(Vec<(u32, String)>),
}

/// What a source returned from one poll.
#[derive(Debug, Clone, Default)]
pub struct Polled {
    /// Flat output format.
    pub records: Vec<u8>,
    pub position: Option<Vec<u8>>,
    pub idle_ms: u32,
}

/// What an instance is granted and limited to.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub dirs: Vec<DirGrant>,
    pub network: Vec<HostGrant>,
    pub memory_bytes: u64,
    pub call_timeout_ms: u32,
}

/// Everything an instance is given besides its component.
#[derive(Clone)]
pub struct Setup {
    /// The connector's name, for logs.
    pub name: String,
    pub sandbox: Sandbox,
    /// Config values with secrets filled in.
    pub config: Vec<(String, String)>,
    pub log: LogBuffer,
    /// Replaces secret values in what the guest logs.
    pub redact: Arc<dyn Fn(&str) -> String + Send + Sync>,
}

/// Compiles connector components and instantiates them in their sandbox.
pub struct ConnectorHost {
    engine: Engine,
    source_linker: Linker<ConnectorState>,
    sink_linker: Linker<ConnectorState>,
}

fn wt(err: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{err:#}")
}

impl ConnectorHost {
    /// # Errors
    /// The engine or linkers cannot be set up.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(wt)?;
        let mut source_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut source_linker).map_err(wt)?;
        source::SourceConnector::add_to_linker::<_, HasSelf<_>>(&mut source_linker, |s| s)
            .map_err(wt)?;
        let mut sink_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut sink_linker).map_err(wt)?;
        sink::SinkConnector::add_to_linker::<_, HasSelf<_>>(&mut sink_linker, |s| s).map_err(wt)?;
        tick_epochs_of(engine.clone());
        Ok(ConnectorHost {
            engine,
            source_linker,
            sink_linker,
        })
    }

    /// Compiles a component.
    ///
    /// # Errors
    /// The bytes are not a Wasm component.
    pub fn compile(&self, wasm: &[u8]) -> Result<Component, String> {
        Component::new(&self.engine, wasm)
            .map_err(|err| format!("not a valid Wasm component: {err:#}"))
    }

    /// Checks that `wasm` is a component of the world for `kind`.
    ///
    /// # Errors
    /// Not a component, or it does not fit.
    pub fn check(&self, wasm: &[u8], kind: crate::spec::Kind) -> Result<(), String> {
        let component = self.compile(wasm)?;
        let misfit = |world: &str, err: wasmtime::Error| {
            format!("the component does not fit the runnel:connect/{world} world: {err:#}")
        };
        match kind {
            crate::spec::Kind::Source => self
                .source_linker
                .instantiate_pre(&component)
                .and_then(source::SourceConnectorPre::new)
                .map(|_| ())
                .map_err(|err| misfit("source-connector", err)),
            crate::spec::Kind::Sink => self
                .sink_linker
                .instantiate_pre(&component)
                .and_then(sink::SinkConnectorPre::new)
                .map(|_| ())
                .map_err(|err| misfit("sink-connector", err)),
        }
    }

    fn store(&self, setup: &Setup) -> Result<Store<ConnectorState>, CallError> {
        let sandbox = &setup.sandbox;
        let stderr = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(STDERR_BYTES_MAX);
        let mut builder = WasiCtx::builder();
        builder.stderr(stderr.clone());
        for dir in &sandbox.dirs {
            let perms = if dir.write {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            let guest = dir.path.display().to_string();
            builder
                .preopened_dir(&dir.path, &guest, perms)
                .map_err(|err| {
                    CallError::Fatal(format!(
                        "capabilities.dirs: cannot open {}: {err:#}; create it or fix the path",
                        dir.path.display()
                    ))
                })?;
        }
        if !sandbox.network.is_empty() {
            let mut allowed: HashSet<SocketAddr> = HashSet::new();
            for grant in &sandbox.network {
                match (grant.host.as_str(), grant.port).to_socket_addrs() {
                    Ok(addrs) => allowed.extend(addrs),
                    Err(err) => {
                        return Err(CallError::Retry(format!(
                            "capabilities.network: cannot resolve {}:{}: {err}",
                            grant.host, grant.port
                        )));
                    }
                }
            }
            let allowed = Arc::new(allowed);
            builder
                .allow_tcp(true)
                .allow_udp(false)
                .allow_ip_name_lookup(true)
                .socket_addr_check(move |addr, use_| {
                    let ok = match use_ {
                        SocketAddrUse::TcpConnect => allowed.contains(&addr),
                        // The implicit bind of an outgoing connection.
                        SocketAddrUse::TcpBind => addr.port() == 0,
                        _ => false,
                    };
                    Box::pin(async move { ok })
                });
        } else {
            builder
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false);
        }
        let state = ConnectorState {
            wasi: builder.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(sandbox.memory_bytes).unwrap_or(usize::MAX))
                .instances(16)
                .trap_on_grow_failure(true)
                .build(),
            name: setup.name.clone(),
            log: setup.log.clone(),
            redact: setup.redact.clone(),
            stderr,
            dirs: sandbox.dirs.clone(),
            hosts: sandbox.network.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(deadline_ticks(sandbox.call_timeout_ms));
        Ok(store)
    }

    /// Instantiates a source and opens it at `position`.
    ///
    /// # Errors
    /// The component does not fit the source world, or `open` failed.
    pub fn open_source(
        &self,
        component: &Component,
        setup: &Setup,
        position: Option<&[u8]>,
    ) -> Result<SourceInstance, CallError> {
        let mut store = self.store(setup)?;
        let bindings = source::SourceConnector::instantiate(
            &mut store,
            component,
            &self.source_linker,
        )
        .map_err(|err| {
            CallError::Fatal(format!(
                "the component is not a source connector (runnel:connect/source-connector): {err:#}"
            ))
        })?;
        let mut instance = SourceInstance {
            store,
            bindings,
            timeout_ms: setup.sandbox.call_timeout_ms,
        };
        // Instantiation used part of the deadline the store started with.
        instance
            .store
            .set_epoch_deadline(deadline_ticks(instance.timeout_ms));
        let result = instance.bindings.runnel_connect_source().call_open(
            &mut instance.store,
            &setup.config,
            position,
        );
        trap_reason(result, &instance.store, instance.timeout_ms)?.map_err(CallError::from)?;
        Ok(instance)
    }

    /// Instantiates a sink and opens it.
    ///
    /// # Errors
    /// The component does not fit the sink world, or `open` failed.
    pub fn open_sink(
        &self,
        component: &Component,
        setup: &Setup,
    ) -> Result<SinkInstance, CallError> {
        let mut store = self.store(setup)?;
        let bindings = sink::SinkConnector::instantiate(&mut store, component, &self.sink_linker)
            .map_err(|err| {
            CallError::Fatal(format!(
                "the component is not a sink connector (runnel:connect/sink-connector): {err:#}"
            ))
        })?;
        let mut instance = SinkInstance {
            store,
            bindings,
            timeout_ms: setup.sandbox.call_timeout_ms,
        };
        instance
            .store
            .set_epoch_deadline(deadline_ticks(instance.timeout_ms));
        let result = instance
            .bindings
            .runnel_connect_sink()
            .call_open(&mut instance.store, &setup.config);
        trap_reason(result, &instance.store, instance.timeout_ms)?.map_err(CallError::from)?;
        Ok(instance)
    }
}

/// Turns a trap into a fatal error that says why.
fn trap_reason<T>(
    result: wasmtime::Result<T>,
    store: &Store<ConnectorState>,
    timeout_ms: u32,
) -> Result<T, CallError> {
    result.map_err(|err| {
        let cause = err.root_cause().to_string();
        let reason = if err.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            format!("the connector did not return within its call timeout of {timeout_ms} ms and was stopped")
        } else if cause.contains("growing memory") {
            format!("the connector exceeded its memory limit ({cause})")
        } else {
            match panic_message(&store.data().stderr.contents()) {
                Some(panic) => format!("the connector trapped: {cause}: {panic}"),
                None => format!("the connector trapped: {cause}"),
            }
        };
        CallError::Fatal(reason)
    })
}

/// A live source; after an error it must not be called again.
pub struct SourceInstance {
    store: Store<ConnectorState>,
    bindings: source::SourceConnector,
    timeout_ms: u32,
}

impl SourceInstance {
    /// # Errors
    /// What the connector reported, or a trap.
    pub fn poll(&mut self, max_records: u32) -> Result<Polled, CallError> {
        self.store
            .set_epoch_deadline(deadline_ticks(self.timeout_ms));
        let result = self
            .bindings
            .runnel_connect_source()
            .call_poll(&mut self.store, max_records);
        let batch = trap_reason(result, &self.store, self.timeout_ms)?.map_err(CallError::from)?;
        Ok(Polled {
            records: batch.records,
            position: batch.position,
            idle_ms: batch.idle_ms,
        })
    }
}

/// A live sink; after an error other than a rejection it must not be called again.
pub struct SinkInstance {
    store: Store<ConnectorState>,
    bindings: sink::SinkConnector,
    timeout_ms: u32,
}

impl SinkInstance {
    /// Writes records from `topic` in the flat input format.
    ///
    /// # Errors
    /// What the connector reported, or a trap.
    pub fn write(&mut self, topic: &str, records: &[u8]) -> Result<(), WriteError> {
        self.store
            .set_epoch_deadline(deadline_ticks(self.timeout_ms));
        let result =
            self.bindings
                .runnel_connect_sink()
                .call_write(&mut self.store, topic, records);
        let result = trap_reason(result, &self.store, self.timeout_ms).map_err(WriteError::Call)?;
        result.map_err(|err| match err {
            WitWriteError::Retry(m) => WriteError::Call(CallError::Retry(m)),
            WitWriteError::Fatal(m) => WriteError::Call(CallError::Fatal(m)),
            WitWriteError::Rejected(list) => {
                WriteError::Rejected(list.into_iter().map(|e| (e.index, e.message)).collect())
            }
        })
    }
}
