//! The streams runtime: runs Wasm transforms between topics inside a broker process.
//!
//! Depends on the broker only as a client (`runnel-client`); the only module that uses
//! wasmtime is `host`. The guest ABI is `proto/wit/transform.wit`, and its flat record
//! format is `runnel-flat`.

pub mod harness;
pub mod host;
pub mod input;
pub mod offsets;
pub mod runtime;
pub mod service;
pub mod spec;
pub mod standby;
pub mod state;
pub mod store;
pub mod tasks;

pub use runtime::Runtime;
pub use service::Service;

/// Largest component accepted by a deploy.
pub const WASM_BYTES_MAX: usize = 32 * 1024 * 1024;
