//! Runnel's guest SDK: write a transform in a few lines of Rust, compile it to a Wasm
//! component, deploy it with `runnel transform deploy`.
//!
//! ```no_run
//! use runnel_sdk::{Config, Output, Record, Transform};
//!
//! struct Shout;
//!
//! impl Transform for Shout {
//!     fn init(_config: &Config) -> Result<Self, String> {
//!         Ok(Shout)
//!     }
//!
//!     fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
//!         let text = record.value_str().ok_or("the value is not UTF-8")?;
//!         out.emit(record.key(), Some(text.to_uppercase().as_bytes()));
//!         Ok(())
//!     }
//! }
//!
//! runnel_sdk::export_transform!(Shout);
//! ```
//!
//! Build with `rustup target add wasm32-wasip2` once, then
//! `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the component.
//!
//! The host calls the transform once per batch; the SDK walks the batch and calls
//! [`Transform::process`] per record, writing emitted records straight into the batch's
//! output buffer (no allocation per record). Returning `Err` marks that input record as
//! bad: what it emitted is dropped and the deployment's error policy decides what happens
//! (fail, skip, or dead-letter).
//!
//! The contract is `proto/wit/transform.wit`; bindings are generated from it. Transforms
//! with state (stores, timers, windows) implement [`stateful::StatefulTransform`]
//! instead, against `proto/wit/transform-0.2/transform.wit`.

// The generated bindings name this crate by its public path, also from inside it.
extern crate self as runnel_sdk;

use std::cell::RefCell;

use runnel_flat::{FlatOutput, FlatRecord};

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// `debug`, `info`, `warn` and `error`, each calling the `write(Level, &str)` in scope:
/// transforms and connectors log through different host interfaces.
macro_rules! log_functions {
    () => {
        pub fn debug(message: &str) {
            write(Level::Debug, message);
        }

        pub fn info(message: &str) {
            write(Level::Info, message);
        }

        pub fn warn(message: &str) {
            write(Level::Warn, message);
        }

        pub fn error(message: &str) {
            write(Level::Error, message);
        }
    };
}

pub mod connect;

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "transformer",
        path: "../proto/wit",
        pub_export_macro: true,
        export_macro_name: "__export_transformer",
        default_bindings_module: "runnel_sdk::__bindings",
        runtime_path: "runnel_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub mod __bindings_v2 {
    wit_bindgen::generate!({
        world: "runnel:transform/stateful-transformer@0.2.0",
        path: "../proto/wit/transform-0.2",
        pub_export_macro: true,
        export_macro_name: "__export_stateful_transformer",
        default_bindings_module: "runnel_sdk::__bindings_v2",
        runtime_path: "runnel_sdk::__wit_bindgen::rt",
    });
}

pub mod stateful;

use __bindings::runnel::transform::types::{Output as BatchOutput, RecordError};

/// The deployment's config values and output topics.
#[derive(Debug, Clone, Default)]
pub struct Config {
    entries: Vec<(String, String)>,
    outputs: Vec<String>,
}

impl Config {
    pub fn new(entries: Vec<(String, String)>, outputs: Vec<String>) -> Self {
        Config { entries, outputs }
    }

    /// A config value given at deploy time (`--config key=value`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// # Errors
    /// The key was not given; the message says which key is missing.
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("missing config value {key:?}: set {key} in the config"))
    }

    /// Every config value, in the order given.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The output topics declared by the deployment, the first being the default.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }
}

/// One input record.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    inner: FlatRecord<'a>,
}

impl<'a> Record<'a> {
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    pub fn offset(&self) -> i64 {
        self.inner.offset
    }

    /// Milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.inner.timestamp_ms
    }

    pub fn key(&self) -> Option<&'a [u8]> {
        self.inner.key
    }

    /// `None` for a tombstone.
    pub fn value(&self) -> Option<&'a [u8]> {
        self.inner.value
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&'a str> {
        self.inner.key.and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value as UTF-8, if it is.
    pub fn value_str(&self) -> Option<&'a str> {
        self.inner.value.and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v)
    }

    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> {
        runnel_flat::headers(self.inner.headers)
    }
}

/// A record to emit, when more than key and value must be set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Emit<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    /// `None`: the input record's timestamp.
    pub timestamp_ms: Option<i64>,
}

/// Where a transform writes what it emits for the current input record.
pub struct Output {
    pub(crate) buf: Vec<u8>,
    outputs: Vec<String>,
    pub(crate) input_index: u32,
    pub(crate) input_timestamp_ms: i64,
    scratch: Vec<u8>,
}

impl Output {
    pub(crate) fn new(outputs: Vec<String>) -> Self {
        Output {
            buf: Vec::new(),
            outputs,
            input_index: 0,
            input_timestamp_ms: 0,
            scratch: Vec::new(),
        }
    }

    fn index_of(&self, topic: &str) -> Result<u32, String> {
        self.outputs
            .iter()
            .position(|t| t == topic)
            .map(|i| i as u32)
            .ok_or_else(|| {
                format!(
                    "emitted to undeclared topic {topic:?}; the deployment declares {:?}",
                    self.outputs
                )
            })
    }

    /// Emits a record with this key and value to the first output topic.
    pub fn emit(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.write(
            0,
            &Emit {
                key,
                value,
                ..Emit::default()
            },
        );
    }

    /// Emits a record with this key and value to `topic`, one of the declared outputs.
    ///
    /// # Errors
    /// `topic` is not one of the deployment's output topics.
    pub fn emit_to(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(), String> {
        let index = self.index_of(topic)?;
        self.write(
            index,
            &Emit {
                key,
                value,
                ..Emit::default()
            },
        );
        Ok(())
    }

    /// Emits a record with headers or its own timestamp; `topic` `None` is the first output.
    ///
    /// # Errors
    /// `topic` is not one of the deployment's output topics.
    pub fn emit_record(&mut self, topic: Option<&str>, record: &Emit<'_>) -> Result<(), String> {
        let index = match topic {
            Some(topic) => self.index_of(topic)?,
            None => 0,
        };
        self.write(index, record);
        Ok(())
    }

    /// Passes the input record on unchanged (key, value, headers, timestamp) to the first
    /// output topic.
    pub fn forward(&mut self, record: &Record<'_>) {
        self.write_flat(
            0,
            record.inner.timestamp_ms,
            record.inner.key,
            record.inner.value,
            record.inner.headers,
        );
    }

    /// Passes the input record on unchanged to `topic`.
    ///
    /// # Errors
    /// `topic` is not one of the deployment's output topics.
    pub fn forward_to(&mut self, topic: &str, record: &Record<'_>) -> Result<(), String> {
        let index = self.index_of(topic)?;
        self.write_flat(
            index,
            record.inner.timestamp_ms,
            record.inner.key,
            record.inner.value,
            record.inner.headers,
        );
        Ok(())
    }

    fn write(&mut self, output_index: u32, record: &Emit<'_>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        runnel_flat::write_headers(&mut scratch, record.headers.iter().copied());
        let timestamp = record.timestamp_ms.unwrap_or(self.input_timestamp_ms);
        self.write_flat(output_index, timestamp, record.key, record.value, &scratch);
        self.scratch = scratch;
    }

    fn write_flat(
        &mut self,
        output_index: u32,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[u8],
    ) {
        runnel_flat::write_output(
            &mut self.buf,
            &FlatOutput {
                input_index: self.input_index,
                output_index,
                timestamp_ms,
                key,
                value,
                headers,
            },
        );
    }
}

/// A transform. One value of the type lives in each Wasm instance and sees every batch.
pub trait Transform: 'static {
    /// Builds the transform from the deployment's config.
    ///
    /// # Errors
    /// A message saying what is wrong with the config; the deployment does not start.
    fn init(config: &Config) -> Result<Self, String>
    where
        Self: Sized;

    /// Handles one input record: emit zero, one or many records.
    ///
    /// # Errors
    /// A message saying why this record is bad; the error policy handles it.
    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String>;
}

/// Logging to the deployment's log (`runnel transform logs NAME`). Connectors log with
/// [`connect::log`] instead.
pub mod log {
    #[cfg(target_arch = "wasm32")]
    fn write(level: crate::__bindings::runnel::transform::host::Level, message: &str) {
        crate::__bindings::runnel::transform::host::log(level, message);
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn write(level: crate::__bindings::runnel::transform::host::Level, message: &str) {
        eprintln!("[{level:?}] {message}");
    }

    use crate::__bindings::runnel::transform::host::Level;

    log_functions!();
}

struct Instance {
    transform: Box<dyn Transform>,
    output: Output,
}

thread_local! {
    static INSTANCE: RefCell<Option<Instance>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub mod __runtime {
    use super::*;

    pub fn init<T: Transform>(
        config: Vec<(String, String)>,
        outputs: Vec<String>,
    ) -> Result<(), String> {
        let config = Config::new(config, outputs);
        let transform = T::init(&config)?;
        INSTANCE.with(|slot| {
            *slot.borrow_mut() = Some(Instance {
                transform: Box::new(transform),
                output: Output::new(config.outputs),
            });
        });
        Ok(())
    }

    pub fn process(input: Vec<u8>) -> BatchOutput {
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(instance) = slot.as_mut() else {
                return BatchOutput {
                    records: Vec::new(),
                    errors: vec![RecordError {
                        index: u32::MAX,
                        message: "process called before init".into(),
                    }],
                };
            };
            run_batch(instance, &input)
        })
    }

    fn run_batch(instance: &mut Instance, input: &[u8]) -> BatchOutput {
        let out = &mut instance.output;
        out.buf.clear();
        out.buf.reserve(input.len());
        let mut errors = Vec::new();
        for (index, record) in runnel_flat::read_inputs(input).enumerate() {
            let record = match record {
                Ok(record) => record,
                Err(err) => {
                    errors.push(RecordError {
                        index: u32::MAX,
                        message: err.to_string(),
                    });
                    break;
                }
            };
            out.input_index = index as u32;
            out.input_timestamp_ms = record.timestamp_ms;
            let mark = out.buf.len();
            if let Err(message) = instance.transform.process(&Record { inner: record }, out) {
                out.buf.truncate(mark);
                errors.push(RecordError {
                    index: index as u32,
                    message,
                });
            }
        }
        BatchOutput {
            records: std::mem::take(&mut out.buf),
            errors,
        }
    }
}

/// Exports a [`Transform`] implementation as the component's entry points.
#[macro_export]
macro_rules! export_transform {
    ($ty:ty) => {
        struct __RunnelTransformExport;

        impl $crate::__bindings::Guest for __RunnelTransformExport {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                outputs: ::std::vec::Vec<::std::string::String>,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__runtime::init::<$ty>(config, outputs)
            }

            fn process(input: ::std::vec::Vec<u8>) -> $crate::__bindings::Output {
                $crate::__runtime::process(input)
            }
        }

        $crate::__bindings::__export_transformer!(__RunnelTransformExport with_types_in $crate::__bindings);
    };
}
