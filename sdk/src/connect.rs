//! Connectors: move data between Runnel topics and outside systems.
//!
//! A [`Source`] reads an outside system (a file, an HTTP endpoint) into a topic; a
//! [`Sink`] writes records read from topics into one. Both compile to Wasm components
//! like transforms, and run under `runnel connect run FILE.yaml` or
//! `runnel connector create FILE.yaml`. The contract is `proto/wit/connect/connect.wit`.
//!
//! ```no_run
//! use runnel_sdk::Config;
//! use runnel_sdk::connect::{Batch, Failure, Source};
//!
//! struct Counter {
//!     next: u64,
//! }
//!
//! impl Source for Counter {
//!     fn open(_config: &Config, position: Option<&[u8]>) -> Result<Self, Failure> {
//!         let next = position
//!             .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
//!             .unwrap_or(0);
//!         Ok(Counter { next })
//!     }
//!
//!     fn poll(&mut self, batch: &mut Batch) -> Result<(), Failure> {
//!         while !batch.is_full() {
//!             batch.emit(None, Some(self.next.to_string().as_bytes()));
//!             self.next += 1;
//!         }
//!         batch.set_position(self.next.to_string());
//!         Ok(())
//!     }
//! }
//!
//! runnel_sdk::export_source!(Counter);
//! ```
//!
//! Files and sockets are reached through Rust's `std::fs` and `std::net`: the host grants
//! the directories and hosts listed under `capabilities:` in the connector file, and
//! nothing else.

use std::cell::RefCell;

use runnel_flat::FlatOutput;

use crate::{Config, Emit, Record};

#[doc(hidden)]
pub mod __source {
    wit_bindgen::generate!({
        world: "source-connector",
        path: "../proto/wit/connect",
        pub_export_macro: true,
        export_macro_name: "__export_source",
        default_bindings_module: "runnel_sdk::connect::__source",
        runtime_path: "runnel_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub mod __sink {
    wit_bindgen::generate!({
        world: "sink-connector",
        path: "../proto/wit/connect",
        pub_export_macro: true,
        export_macro_name: "__export_sink",
        default_bindings_module: "runnel_sdk::connect::__sink",
        runtime_path: "runnel_sdk::__wit_bindgen::rt",
        with: {
            "runnel:connect/host@0.1.0": runnel_sdk::connect::__source::runnel::connect::host,
            "runnel:connect/types@0.1.0": runnel_sdk::connect::__source::runnel::connect::types,
        },
    });
}

use __source::runnel::connect::types as wit;

/// Why a connector call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The outside system is down, slow or overloaded: the host retries with backoff.
    Retry(String),
    /// Bad config, a missing capability, corrupt data: the connector stops with this.
    Fatal(String),
}

impl Failure {
    fn into_wit(self) -> wit::Failure {
        match self {
            Failure::Retry(m) => wit::Failure::Retry(m),
            Failure::Fatal(m) => wit::Failure::Fatal(m),
        }
    }
}

/// Why a sink's write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// Transient: the host retries the whole batch with backoff.
    Retry(String),
    /// These records (index in the batch, reason) were refused for good; the others were
    /// written. The connector's error policy handles them.
    Rejected(Vec<(u32, String)>),
    /// Permanent: the connector stops with this message.
    Fatal(String),
}

impl From<Failure> for WriteError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Retry(m) => WriteError::Retry(m),
            Failure::Fatal(m) => WriteError::Fatal(m),
        }
    }
}

/// Where a source puts the records of one poll.
pub struct Batch {
    buf: Vec<u8>,
    len: u32,
    max: u32,
    position: Option<Vec<u8>>,
    idle_ms: u32,
    scratch: Vec<u8>,
}

/// How long the host waits after an empty poll unless the source says otherwise.
pub const IDLE_MS_DEFAULT: u32 = 100;

impl Batch {
    fn new(max: u32) -> Self {
        Batch {
            buf: Vec::new(),
            len: 0,
            max,
            position: None,
            idle_ms: IDLE_MS_DEFAULT,
            scratch: Vec::new(),
        }
    }

    /// Adds a record with this key and value, stamped when produced.
    pub fn emit(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.emit_record(&Emit {
            key,
            value,
            ..Emit::default()
        });
    }

    /// Adds a record with headers or its own timestamp.
    pub fn emit_record(&mut self, record: &Emit<'_>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        runnel_flat::write_headers(&mut scratch, record.headers.iter().copied());
        runnel_flat::write_output(
            &mut self.buf,
            &FlatOutput {
                input_index: 0,
                output_index: 0,
                timestamp_ms: record.timestamp_ms.unwrap_or(-1),
                key: record.key,
                value: record.value,
                headers: &scratch,
            },
        );
        self.scratch = scratch;
        self.len += 1;
    }

    /// Records added so far.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True once the batch holds as many records as the host asked for. A source may stop
    /// earlier; it should not go much beyond.
    pub fn is_full(&self) -> bool {
        self.len >= self.max
    }

    /// Records the host asked for in this poll.
    pub fn capacity(&self) -> u32 {
        self.max
    }

    /// Where the source is after the records of this batch; committed once they are
    /// acknowledged, and handed back to [`Source::open`] after a restart.
    pub fn set_position(&mut self, position: impl Into<Vec<u8>>) {
        self.position = Some(position.into());
    }

    /// With an empty batch: how long the host waits before polling again.
    pub fn idle(&mut self, ms: u32) {
        self.idle_ms = ms;
    }
}

/// A source connector. One value lives in each Wasm instance.
pub trait Source: 'static {
    /// Connects to the outside system and seeks to `position` (the last one committed,
    /// `None` on the first start).
    ///
    /// # Errors
    /// [`Failure::Fatal`] for a bad config value, naming it; [`Failure::Retry`] if the
    /// outside system is unavailable.
    fn open(config: &Config, position: Option<&[u8]>) -> Result<Self, Failure>
    where
        Self: Sized;

    /// Adds what is available to `batch`, up to [`Batch::capacity`] records, and sets the
    /// position after them. An empty batch means "nothing now".
    ///
    /// # Errors
    /// As for [`Source::open`]; records added before an error are discarded.
    fn poll(&mut self, batch: &mut Batch) -> Result<(), Failure>;
}

/// A sink connector. One value lives in each Wasm instance.
pub trait Sink: 'static {
    /// # Errors
    /// [`Failure::Fatal`] for a bad config value, naming it; [`Failure::Retry`] if the
    /// outside system is unavailable.
    fn open(config: &Config) -> Result<Self, Failure>
    where
        Self: Sized;

    /// Writes `records`, read from `topic`, to the outside system. Return `Ok` only once
    /// the outside system holds them: the host commits their offsets then.
    ///
    /// # Errors
    /// See [`WriteError`].
    fn write(&mut self, topic: &str, records: &[Record<'_>]) -> Result<(), WriteError>;
}

/// Logging to the connector's log (`runnel connector status NAME`). Transforms log with
/// [`crate::log`] instead.
pub mod log {
    use super::__source::runnel::connect::host::Level;

    #[cfg(target_arch = "wasm32")]
    fn write(level: Level, message: &str) {
        super::__source::runnel::connect::host::log(level, message);
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn write(level: Level, message: &str) {
        eprintln!("[{level:?}] {message}");
    }

    log_functions!();
}

/// A directory the connector file grants under `capabilities.dirs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub path: String,
    pub writable: bool,
}

/// The directories this connector was granted.
pub fn granted_dirs() -> Vec<DirGrant> {
    #[cfg(target_arch = "wasm32")]
    {
        __source::runnel::connect::host::granted_dirs()
            .into_iter()
            .map(|d| DirGrant {
                path: d.path,
                writable: d.writable,
            })
            .collect()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Vec::new()
    }
}

/// The HOST:PORT entries this connector was granted under `capabilities.network`.
pub fn granted_hosts() -> Vec<String> {
    #[cfg(target_arch = "wasm32")]
    {
        __source::runnel::connect::host::granted_hosts()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Vec::new()
    }
}

/// Whether `path` (absolute) lies in a granted directory, writable if `write`.
pub fn is_granted(path: &str, write: bool) -> bool {
    let path = std::path::Path::new(path);
    granted_dirs()
        .iter()
        .any(|d| path.starts_with(&d.path) && (d.writable || !write))
}

thread_local! {
    static SOURCE: RefCell<Option<Box<dyn Source>>> = const { RefCell::new(None) };
    static SINK: RefCell<Option<Box<dyn Sink>>> = const { RefCell::new(None) };
}

fn not_open() -> wit::Failure {
    wit::Failure::Fatal("the connector was called before open".into())
}

#[doc(hidden)]
pub mod __runtime {
    use super::*;

    pub fn source_open<T: Source>(
        config: Vec<(String, String)>,
        position: Option<Vec<u8>>,
    ) -> Result<(), wit::Failure> {
        let config = Config::new(config, Vec::new());
        let source = T::open(&config, position.as_deref()).map_err(Failure::into_wit)?;
        SOURCE.with(|slot| *slot.borrow_mut() = Some(Box::new(source)));
        Ok(())
    }

    pub fn source_poll(max: u32) -> Result<wit::Batch, wit::Failure> {
        SOURCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let source = slot.as_mut().ok_or_else(not_open)?;
            let mut batch = Batch::new(max.max(1));
            source.poll(&mut batch).map_err(Failure::into_wit)?;
            Ok(wit::Batch {
                records: batch.buf,
                position: batch.position,
                idle_ms: batch.idle_ms,
            })
        })
    }

    pub fn sink_open<T: Sink>(config: Vec<(String, String)>) -> Result<(), wit::Failure> {
        let config = Config::new(config, Vec::new());
        let sink = T::open(&config).map_err(Failure::into_wit)?;
        SINK.with(|slot| *slot.borrow_mut() = Some(Box::new(sink)));
        Ok(())
    }

    pub fn sink_write(topic: String, input: Vec<u8>) -> Result<(), wit::WriteError> {
        let mut records = Vec::new();
        for record in runnel_flat::read_inputs(&input) {
            match record {
                Ok(inner) => records.push(Record { inner }),
                Err(err) => return Err(wit::WriteError::Fatal(err.to_string())),
            }
        }
        SINK.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(sink) = slot.as_mut() else {
                return Err(wit::WriteError::Fatal(
                    "the connector was called before open".into(),
                ));
            };
            sink.write(&topic, &records).map_err(|err| match err {
                WriteError::Retry(m) => wit::WriteError::Retry(m),
                WriteError::Fatal(m) => wit::WriteError::Fatal(m),
                WriteError::Rejected(list) => wit::WriteError::Rejected(
                    list.into_iter()
                        .map(|(index, message)| wit::RecordError { index, message })
                        .collect(),
                ),
            })
        })
    }
}

/// Exports a [`Source`] implementation as the component's entry points.
#[macro_export]
macro_rules! export_source {
    ($ty:ty) => {
        struct __RunnelSourceExport;

        impl $crate::connect::__source::exports::runnel::connect::source::Guest for __RunnelSourceExport {
            fn open(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                position: ::core::option::Option<::std::vec::Vec<u8>>,
            ) -> ::core::result::Result<(), $crate::connect::__source::runnel::connect::types::Failure> {
                $crate::connect::__runtime::source_open::<$ty>(config, position)
            }

            fn poll(
                max_records: u32,
            ) -> ::core::result::Result<
                $crate::connect::__source::runnel::connect::types::Batch,
                $crate::connect::__source::runnel::connect::types::Failure,
            > {
                $crate::connect::__runtime::source_poll(max_records)
            }
        }

        $crate::connect::__source::__export_source!(__RunnelSourceExport with_types_in $crate::connect::__source);
    };
}

/// Exports a [`Sink`] implementation as the component's entry points.
#[macro_export]
macro_rules! export_sink {
    ($ty:ty) => {
        struct __RunnelSinkExport;

        impl $crate::connect::__sink::exports::runnel::connect::sink::Guest for __RunnelSinkExport {
            fn open(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::core::result::Result<(), $crate::connect::__source::runnel::connect::types::Failure> {
                $crate::connect::__runtime::sink_open::<$ty>(config)
            }

            fn write(
                topic: ::std::string::String,
                records: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<(), $crate::connect::__source::runnel::connect::types::WriteError> {
                $crate::connect::__runtime::sink_write(topic, records)
            }
        }

        $crate::connect::__sink::__export_sink!(__RunnelSinkExport with_types_in $crate::connect::__sink);
    };
}
