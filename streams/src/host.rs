//! The Wasm host: the only module that touches wasmtime.
//!
//! One [`Engine`] per runtime with epoch interruption on; a ticker thread advances the
//! epoch every [`EPOCH_TICK_MS`], and each call gets a deadline of `cpu_limit_ms`, so a
//! guest that loops is stopped with a trap instead of holding a core. Memory is capped per
//! instance by a [`StoreLimits`]. Compiled components are cached by the SHA-256 of their
//! bytes, and pre-instantiated once; an instance lives across batches until it traps
//! (a trapped instance is never called again).
//!
//! Guests get WASI with nothing granted: no files, no sockets, no environment, clocks
//! that read zero, and randomness from a fixed seed (so a guest cannot observe the host,
//! and its output depends only on its input and config).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    world: "transformer",
    path: "../proto/wit",
});

/// Bindings of `runnel:transform@0.2.0`: the world with state and timers.
pub mod v2 {
    wasmtime::component::bindgen!({
        world: "runnel:transform/stateful-transformer@0.2.0",
        path: "../proto/wit/transform-0.2",
    });
}

use runnel::transform::host::Level;

use crate::state::{StateError, TaskState, Timer};

/// How often the epoch advances; the granularity of the CPU limit.
pub const EPOCH_TICK_MS: u64 = 5;
pub const MEMORY_LIMIT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
pub const CPU_LIMIT_MS_DEFAULT: u32 = 2_000;
/// Lines of guest and runtime log kept per deployment.
pub const LOG_LINES_MAX: usize = 1_000;

/// A deployment's log: guest lines and runtime events, newest last.
#[derive(Debug, Clone, Default)]
pub struct LogBuffer(Arc<Mutex<std::collections::VecDeque<String>>>);

impl LogBuffer {
    pub fn push(&self, line: String) {
        let mut lines = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lines.len() == LOG_LINES_MAX {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// The deadline in epoch ticks for a call limited to `ms` milliseconds.
pub fn deadline_ticks(ms: u32) -> u64 {
    (u64::from(ms) / EPOCH_TICK_MS).max(1)
}

/// A guest instance's host-side state.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    name: String,
    log: LogBuffer,
    /// What the guest writes to stderr (Rust panic messages), bounded.
    stderr: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
    /// The stores of the partition being processed (stateful components, during a call).
    task: Option<TaskState>,
    /// Subtracted from the largest timestamp seen to give the watermark.
    allowed_lateness_ms: i64,
}

impl GuestState {
    fn task(&mut self) -> Result<&mut TaskState, String> {
        self.task
            .as_mut()
            .ok_or_else(|| "state is only available while a batch or timers are processed".into())
    }
}

/// Bytes of guest stderr kept per instance.
const STDERR_BYTES_MAX: usize = 64 * 1024;

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl runnel::transform::host::Host for GuestState {
    fn log(&mut self, level: Level, message: String) {
        let name = &self.name;
        match level {
            Level::Trace | Level::Debug => tracing::debug!(transform = %name, "{message}"),
            Level::Info => tracing::info!(transform = %name, "{message}"),
            Level::Warn => tracing::warn!(transform = %name, "{message}"),
            Level::Error => tracing::error!(transform = %name, "{message}"),
        }
        // A guest cannot flood the runtime's memory: lines are bounded in length and count.
        let mut message = message;
        message.truncate(4096);
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.log.push(format!("[guest {level}] {message}"));
    }
}

impl runnel::transform::types::Host for GuestState {}

impl v2::runnel::transform::host::Host for GuestState {
    fn log(&mut self, level: v2::runnel::transform::host::Level, message: String) {
        use v2::runnel::transform::host::Level as L2;
        let level = match level {
            L2::Trace => Level::Trace,
            L2::Debug => Level::Debug,
            L2::Info => Level::Info,
            L2::Warn => Level::Warn,
            L2::Error => Level::Error,
        };
        runnel::transform::host::Host::log(self, level, message);
    }
}

impl v2::runnel::transform::types::Host for GuestState {}

fn refused(err: StateError) -> String {
    err.to_string()
}

impl v2::runnel::transform::state::Host for GuestState {
    fn get(&mut self, store: u32, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        self.task()?.get(store, &key).map_err(refused)
    }

    fn put(&mut self, store: u32, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        self.task()?.put(store, key, value).map_err(refused)
    }

    fn delete(&mut self, store: u32, key: Vec<u8>) -> Result<(), String> {
        self.task()?.delete(store, key).map_err(refused)
    }

    fn range(
        &mut self,
        store: u32,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        limit: u32,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        self.task()?
            .range(store, &from, to.as_deref(), limit)
            .map_err(refused)
    }
}

use v2::runnel::transform::timers::{Clock, Timer as GuestTimer};

/// The internal encoding of a timer's clock.
fn clock_id(clock: Clock) -> u8 {
    match clock {
        Clock::EventTime => 0,
        Clock::WallClock => 1,
    }
}

fn stored_timer(timer: GuestTimer) -> Timer {
    Timer {
        clock: clock_id(timer.clock),
        at_ms: timer.at_ms,
        key: timer.key,
    }
}

impl v2::runnel::transform::timers::Host for GuestState {
    fn schedule(&mut self, timer: GuestTimer) -> Result<(), String> {
        self.task()?.schedule(&stored_timer(timer)).map_err(refused)
    }

    fn cancel(&mut self, timer: GuestTimer) -> Result<(), String> {
        self.task()?.cancel(&stored_timer(timer)).map_err(refused)
    }

    fn watermark(&mut self) -> i64 {
        let lateness = self.allowed_lateness_ms;
        self.task
            .as_ref()
            .map_or(i64::MIN, |t| watermark(t.max_timestamp_ms(), lateness))
    }
}

/// The event time below which a partition is complete.
pub fn watermark(max_timestamp_ms: i64, allowed_lateness_ms: i64) -> i64 {
    max_timestamp_ms.saturating_sub(allowed_lateness_ms)
}

/// Clocks that always read zero: a guest sees no time unless a deployment grants it.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}

/// The result of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResult {
    /// Emitted records in the flat output format.
    pub records: Vec<u8>,
    /// (input index, message) for each refused input record.
    pub errors: Vec<(u32, String)>,
}

/// The guest failed as a whole: trapped, ran out of CPU time or memory, or was broken.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct GuestFailure(pub String);

/// Limits of one instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_ms: u32,
}

/// Compiles, caches and instantiates transform components.
pub struct WasmHost {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: Mutex<HashMap<String, Arc<Prepared>>>,
}

/// A compiled component, pre-instantiated, in the world version it exports.
pub enum Prepared {
    /// `runnel:transform@0.1.0`.
    Stateless(TransformerPre<GuestState>),
    /// `runnel:transform@0.2.0`: state stores and timers.
    Stateful(v2::StatefulTransformerPre<GuestState>),
}

impl Prepared {
    pub fn is_stateful(&self) -> bool {
        matches!(self, Prepared::Stateful(_))
    }
}

/// What an instance is made with.
pub struct Setup<'a> {
    pub name: &'a str,
    pub config: &'a [(String, String)],
    pub outputs: &'a [String],
    /// The deployment's stores (stateful components only).
    pub stores: &'a [String],
    pub allowed_lateness_ms: i64,
    pub limits: Limits,
    pub log: LogBuffer,
}

/// Advances the epoch of every engine created in this process (the streams runtime's and
/// the connect runtime's) from one thread.
pub fn tick_epochs_of(engine: Engine) {
    static ENGINES: OnceLock<Mutex<Vec<Engine>>> = OnceLock::new();
    let mut started = false;
    let engines = ENGINES.get_or_init(|| {
        started = true;
        Mutex::new(Vec::new())
    });
    engines
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(engine);
    if !started {
        return;
    }
    std::thread::Builder::new()
        .name("runnel-wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                for engine in engines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                {
                    engine.increment_epoch();
                }
            }
        })
        .map(|_| ())
        .unwrap_or_else(|err| tracing::error!("cannot start the Wasm epoch ticker: {err}"));
}

impl WasmHost {
    /// # Errors
    /// The engine or linker cannot be set up.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // wasmtime has its own error type; keep its whole chain in the message.
        let wt = |err: wasmtime::Error| anyhow::anyhow!("{err:#}");
        let engine = Engine::new(&config).map_err(wt)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wt)?;
        Transformer::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(wt)?;
        v2::StatefulTransformer::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(wt)?;
        tick_epochs_of(engine.clone());
        Ok(WasmHost {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Compiles `wasm` (or takes it from the cache by `sha256`).
    ///
    /// # Errors
    /// The bytes are not a component, or it does not match the transformer world.
    pub fn prepare(&self, sha256: &str, wasm: &[u8]) -> Result<Arc<Prepared>, GuestFailure> {
        if let Some(pre) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sha256)
        {
            return Ok(pre.clone());
        }
        let component = Component::new(&self.engine, wasm)
            .map_err(|err| GuestFailure(format!("not a valid Wasm component: {err:#}")))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|err| {
            GuestFailure(format!(
                "the component does not fit the runnel:transform world: {err:#}"
            ))
        })?;
        let pre = Arc::new(match v2::StatefulTransformerPre::new(pre.clone()) {
            Ok(stateful) => Prepared::Stateful(stateful),
            Err(_) => Prepared::Stateless(TransformerPre::new(pre).map_err(|err| {
                GuestFailure(format!(
                    "the component exports neither runnel:transform@0.1.0 (init, process) nor @0.2.0 (init, process, fire): {err:#}"
                ))
            })?),
        });
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sha256.to_string(), pre.clone());
        Ok(pre)
    }

    /// A fresh, initialised instance.
    ///
    /// # Errors
    /// Instantiation failed, or the guest's `init` refused the config.
    pub fn instantiate(&self, pre: &Prepared, setup: Setup<'_>) -> Result<Instance, GuestFailure> {
        let Setup {
            name,
            config,
            outputs,
            stores,
            allowed_lateness_ms,
            limits,
            log,
        } = setup;
        let stderr = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(STDERR_BYTES_MAX);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0))
            .insecure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = GuestState {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
                .instances(16)
                .trap_on_grow_failure(true)
                .build(),
            name: name.to_string(),
            log,
            stderr,
            task: None,
            allowed_lateness_ms,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(deadline_ticks(limits.cpu_ms));
        let failed = |err: wasmtime::Error| GuestFailure(format!("instantiation failed: {err:#}"));
        let bindings = match pre {
            Prepared::Stateless(pre) => {
                Bindings::Stateless(pre.instantiate(&mut store).map_err(failed)?)
            }
            Prepared::Stateful(pre) => {
                Bindings::Stateful(pre.instantiate(&mut store).map_err(failed)?)
            }
        };
        store.set_epoch_deadline(deadline_ticks(limits.cpu_ms));
        let init = match &bindings {
            Bindings::Stateless(b) => b.call_init(&mut store, config, outputs),
            Bindings::Stateful(b) => b.call_init(&mut store, config, outputs, stores),
        };
        init.map_err(|err| GuestFailure(format!("init trapped: {err:#}")))?
            .map_err(|message| GuestFailure(format!("init refused the config: {message}")))?;
        Ok(Instance {
            store,
            bindings,
            cpu_ms: limits.cpu_ms,
        })
    }
}

/// The last Rust panic message the guest printed, if any.
pub fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.rfind("panicked at")?;
    let message: Vec<&str> = text[start..].lines().take(2).collect();
    Some(message.join(" ").trim().to_string())
}

enum Bindings {
    Stateless(Transformer),
    Stateful(v2::StatefulTransformer),
}

/// A live transform instance.
pub struct Instance {
    store: Store<GuestState>,
    bindings: Bindings,
    cpu_ms: u32,
}

impl Instance {
    /// Hands the instance the stores of the partition it processes next.
    pub fn enter(&mut self, task: TaskState) {
        self.store.data_mut().task = Some(task);
    }

    /// Takes the stores back (also from an instance that trapped).
    pub fn leave(&mut self) -> Option<TaskState> {
        self.store.data_mut().task.take()
    }

    /// Runs one batch (flat input format).
    ///
    /// # Errors
    /// A trap, CPU or memory limit breach: the instance must not be used again.
    pub fn process(&mut self, input: &[u8]) -> Result<BatchResult, GuestFailure> {
        self.store.set_epoch_deadline(deadline_ticks(self.cpu_ms));
        let output = match &self.bindings {
            Bindings::Stateless(b) => b.call_process(&mut self.store, input).map(|o| BatchResult {
                records: o.records,
                errors: o.errors.into_iter().map(|e| (e.index, e.message)).collect(),
            }),
            Bindings::Stateful(b) => b.call_process(&mut self.store, input).map(stateful_result),
        };
        output.map_err(|err| self.failure(&err))
    }

    /// Calls the guest back with timers that came due (stateful components).
    ///
    /// # Errors
    /// A trap or limit breach, or a component without timers.
    pub fn fire(&mut self, timers: &[Timer]) -> Result<BatchResult, GuestFailure> {
        let Bindings::Stateful(bindings) = &self.bindings else {
            return Err(GuestFailure(
                "a runnel:transform@0.1.0 component has no timers".into(),
            ));
        };
        let timers: Vec<GuestTimer> = timers
            .iter()
            .map(|t| GuestTimer {
                clock: if t.clock == 0 {
                    Clock::EventTime
                } else {
                    Clock::WallClock
                },
                at_ms: t.at_ms,
                key: t.key.clone(),
            })
            .collect();
        self.store.set_epoch_deadline(deadline_ticks(self.cpu_ms));
        bindings
            .call_fire(&mut self.store, &timers)
            .map(stateful_result)
            .map_err(|err| self.failure(&err))
    }

    /// Why a call failed, in words.
    fn failure(&self, err: &wasmtime::Error) -> GuestFailure {
        let cause = err.root_cause().to_string();
        GuestFailure(
            if err.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                format!(
                    "exceeded its CPU limit of {} ms and was stopped",
                    self.cpu_ms
                )
            } else if cause.contains("growing memory") {
                format!("exceeded its memory limit ({cause})")
            } else {
                match panic_message(&self.store.data().stderr.contents()) {
                    Some(panic) => format!("trapped: {cause}: {panic}"),
                    None => format!("trapped: {cause}"),
                }
            },
        )
    }
}

fn stateful_result(output: v2::runnel::transform::types::Output) -> BatchResult {
    BatchResult {
        records: output.records,
        errors: output
            .errors
            .into_iter()
            .map(|e| (e.index, e.message))
            .collect(),
    }
}
