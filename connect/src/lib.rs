//! The connect runtime: Wasm source and sink connectors, configured by YAML files, that
//! move records between Runnel topics and outside systems.
//!
//! `spec` reads connector files; `host` is the only module that touches wasmtime;
//! `worker` runs connectors (in `runnel connect run`, or inside the broker process behind
//! the `runnel.v1.Connectors` service in `service`). The guest ABI is
//! `proto/wit/connect/connect.wit`.
//!
//! It reaches the broker only through `runnel-client`, never the broker crates; only
//! `host` (and the transform host it borrows from `runnel-streams`) touches wasmtime.

pub mod builtin;
mod chain;
pub mod host;
mod positions;
pub mod service;
pub mod spec;
mod task;
pub mod worker;

pub use worker::Worker;

/// The compacted internal topic where sources commit their positions.
pub const OFFSETS_TOPIC: &str = "__connect_offsets";
