//! What a deployment is: flags or a YAML file, turned into the wire `TransformSpec`.
//!
//! ```yaml
//! name: big-orders
//! input: orders
//! outputs: [big-orders]
//! wasm: target/wasm32-wasip2/release/filter.wasm
//! config:
//!   field: amount
//!   min: "100"
//! errors:
//!   policy: dead-letter          # fail | skip | dead-letter
//!   dead-letter-topic: orders-dlq
//! start: earliest                # earliest | latest | offset:N | timestamp:MS
//! memory-limit-mb: 64
//! cpu-limit-ms: 2000
//! processing: exactly-once       # at-least-once | exactly-once
//! stores: [counts]               # runnel:transform@0.2.0 components only
//! tables: {customers: customers} # read-only store kept from a compacted topic
//! allowed-lateness-ms: 5000      # watermark = largest timestamp seen - this
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use runnel_proto::v1;
use serde::Deserialize;

/// Longest deployment name.
pub const NAME_LENGTH_MAX: usize = 100;
/// Most standby replicas a deployment may ask for.
pub const STANDBY_REPLICAS_MAX: u32 = 8;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TransformFile {
    pub name: String,
    pub input: String,
    pub outputs: Vec<String>,
    pub wasm: PathBuf,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub errors: ErrorsSection,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    #[serde(default)]
    pub cpu_limit_ms: Option<u32>,
    /// `at-least-once` (the default) or `exactly-once`.
    #[serde(default)]
    pub processing: Option<String>,
    #[serde(default)]
    pub commit_interval_ms: Option<u32>,
    /// State stores (stateful components).
    #[serde(default)]
    pub stores: Vec<String>,
    /// Table stores: store name → the compacted topic it is kept from.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    #[serde(default)]
    pub allowed_lateness_ms: Option<i64>,
    /// Brokers besides a task's own that keep its stores warm.
    #[serde(default)]
    pub standby_replicas: Option<u32>,
    /// The principal the tasks act as (`User:NAME`).
    pub principal: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ErrorsSection {
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

/// Parses `fail`, `skip` or `dead-letter`.
///
/// # Errors
/// Anything else, with the accepted values.
pub fn parse_policy(text: &str) -> anyhow::Result<v1::ErrorPolicy> {
    match text {
        "fail" => Ok(v1::ErrorPolicy::Fail),
        "skip" => Ok(v1::ErrorPolicy::Skip),
        "dead-letter" => Ok(v1::ErrorPolicy::DeadLetter),
        other => anyhow::bail!("error policy must be fail, skip or dead-letter, not {other:?}"),
    }
}

/// Parses `at-least-once` or `exactly-once`.
///
/// # Errors
/// Anything else, with the accepted values.
pub fn parse_processing(text: &str) -> anyhow::Result<v1::Processing> {
    match text {
        "at-least-once" => Ok(v1::Processing::AtLeastOnce),
        "exactly-once" => Ok(v1::Processing::ExactlyOnce),
        other => {
            anyhow::bail!("processing must be at-least-once or exactly-once, not {other:?}")
        }
    }
}

pub fn processing_name(processing: v1::Processing) -> &'static str {
    match processing {
        v1::Processing::AtLeastOnce => "at-least-once",
        v1::Processing::ExactlyOnce => "exactly-once",
    }
}

pub fn policy_name(policy: v1::ErrorPolicy) -> &'static str {
    match policy {
        v1::ErrorPolicy::Fail => "fail",
        v1::ErrorPolicy::Skip => "skip",
        v1::ErrorPolicy::DeadLetter => "dead-letter",
    }
}

impl TransformFile {
    /// Reads and checks a deployment file. Relative `wasm` paths are relative to the file.
    ///
    /// # Errors
    /// Unreadable file, broken YAML, unknown or missing fields; the message names the file.
    pub fn load(path: &Path) -> anyhow::Result<(v1::TransformSpec, PathBuf)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: TransformFile = serde_saphyr::from_str(&text)
            .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
        let wasm = if file.wasm.is_relative() {
            path.parent().unwrap_or(Path::new(".")).join(&file.wasm)
        } else {
            file.wasm.clone()
        };
        let policy = parse_policy(file.errors.policy.as_deref().unwrap_or("fail"))
            .with_context(|| format!("{}: errors.policy", path.display()))?;
        let processing = parse_processing(file.processing.as_deref().unwrap_or("at-least-once"))
            .with_context(|| format!("{}: processing", path.display()))?;
        let spec = v1::TransformSpec {
            name: file.name,
            input_topic: file.input,
            output_topics: file.outputs,
            config: file.config.into_iter().collect(),
            error_policy: policy as i32,
            dead_letter_topic: file.errors.dead_letter_topic.unwrap_or_default(),
            start: file.start.unwrap_or_else(|| "earliest".into()),
            memory_limit_bytes: file.memory_limit_mb.unwrap_or(0) * 1024 * 1024,
            cpu_limit_ms: file.cpu_limit_ms.unwrap_or(0),
            processing: processing as i32,
            commit_interval_ms: file.commit_interval_ms.unwrap_or(0),
            stores: file.stores,
            tables: file.tables.into_iter().collect(),
            allowed_lateness_ms: file.allowed_lateness_ms.unwrap_or(0),
            standby_replicas: file.standby_replicas.unwrap_or(0),
            principal: file.principal.clone().unwrap_or_default(),
        };
        validate(&spec).with_context(|| format!("invalid deployment file {}", path.display()))?;
        Ok((spec, wasm))
    }
}

/// Where a new deployment starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
    Offset(i64),
    Timestamp(i64),
}

/// # Errors
/// Anything but `earliest`, `latest`, `offset:N` or `timestamp:MS`.
pub fn parse_start(text: &str) -> anyhow::Result<Start> {
    let bad = || {
        anyhow::anyhow!("start must be earliest, latest, offset:N or timestamp:MS, not {text:?}")
    };
    Ok(match text {
        "" | "earliest" => Start::Earliest,
        "latest" => Start::Latest,
        other => match other.split_once(':') {
            Some(("offset", n)) => Start::Offset(n.parse().map_err(|_| bad())?),
            Some(("timestamp", n)) => Start::Timestamp(n.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        },
    })
}

/// Checks what can be checked without the cluster.
///
/// # Errors
/// The first problem found, saying what to change.
pub fn validate(spec: &v1::TransformSpec) -> anyhow::Result<()> {
    let name = &spec.name;
    if name.is_empty()
        || name.len() > NAME_LENGTH_MAX
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        anyhow::bail!(
            "invalid transform name {name:?}: use 1 to {NAME_LENGTH_MAX} ASCII letters, digits, '.', '_' or '-'"
        );
    }
    if spec.input_topic.is_empty() {
        anyhow::bail!("the transform needs an input topic");
    }
    if spec.output_topics.is_empty() {
        anyhow::bail!("the transform needs at least one output topic");
    }
    if spec.output_topics.contains(&spec.input_topic) {
        anyhow::bail!(
            "topic {:?} is both input and output: the transform would feed itself",
            spec.input_topic
        );
    }
    let policy = v1::ErrorPolicy::try_from(spec.error_policy)
        .map_err(|_| anyhow::anyhow!("unknown error policy"))?;
    if policy == v1::ErrorPolicy::DeadLetter && spec.dead_letter_topic.is_empty() {
        anyhow::bail!("the dead-letter policy needs a dead-letter topic (--dead-letter-topic)");
    }
    parse_start(&spec.start)?;
    let mut stores = std::collections::BTreeSet::new();
    for store in spec.stores.iter().chain(spec.tables.keys()) {
        if store.is_empty()
            || store.len() > NAME_LENGTH_MAX
            || store.starts_with("__")
            || !store
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            anyhow::bail!(
                "invalid store name {store:?}: use 1 to {NAME_LENGTH_MAX} ASCII letters, digits, '.', '_' or '-', not starting with \"__\""
            );
        }
        if !stores.insert(store) {
            anyhow::bail!("store {store:?} is declared twice");
        }
    }
    for (store, topic) in &spec.tables {
        if topic.is_empty() {
            anyhow::bail!("table {store:?} names no topic");
        }
        if *topic == spec.input_topic || spec.output_topics.contains(topic) {
            anyhow::bail!(
                "table {store:?} is kept from topic {topic:?}, which is also the input or an output"
            );
        }
    }
    if spec.allowed_lateness_ms < 0 {
        anyhow::bail!("allowed lateness must not be negative");
    }
    if spec.standby_replicas > 0 && spec.stores.is_empty() && spec.tables.is_empty() {
        anyhow::bail!(
            "standby replicas keep warm copies of state stores, and this transform declares none: add --store (or --table) or leave out --standby-replicas"
        );
    }
    if spec.standby_replicas > STANDBY_REPLICAS_MAX {
        anyhow::bail!(
            "at most {STANDBY_REPLICAS_MAX} standby replicas, not {} (each is a full copy of the state on another broker)",
            spec.standby_replicas
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            "name: big\ninput: orders\noutputs: [big]\nwasm: filter.wasm\nconfig:\n  min: \"5\"\nerrors:\n  policy: dead-letter\n  dead-letter-topic: dlq\nstart: offset:7\n",
        )
        .expect("write");
        let (spec, wasm) = TransformFile::load(&path).expect("valid");
        assert_eq!(spec.output_topics, ["big"]);
        assert_eq!(wasm, dir.path().join("filter.wasm"));
        assert_eq!(parse_start(&spec.start).expect("start"), Start::Offset(7));
        std::fs::write(
            &path,
            "name: big\ninput: orders\noutputs: [big]\nwasm: f.wasm\nretries: 3\n",
        )
        .expect("write");
        let err = format!(
            "{:#}",
            TransformFile::load(&path).expect_err("unknown field")
        );
        assert!(err.contains("t.yaml") && err.contains("retries"), "{err}");
        std::fs::write(&path, "name: big\ninput: orders\noutputs: [big]\nwasm: f.wasm\nerrors:\n  policy: dead-letter\n").expect("write");
        let err = format!("{:#}", TransformFile::load(&path).expect_err("no dlq"));
        assert!(err.contains("dead-letter topic"), "{err}");
        assert!(parse_start("yesterday").is_err());
        std::fs::write(&path, "name: wc\ninput: words\noutputs: [counts]\nwasm: wc.wasm\nstores: [counts, seen]\nallowed-lateness-ms: 500\n").expect("write");
        let (spec, _) = TransformFile::load(&path).expect("stateful");
        assert_eq!(spec.stores, ["counts", "seen"]);
        assert_eq!(spec.allowed_lateness_ms, 500);
        std::fs::write(
            &path,
            "name: wc\ninput: words\noutputs: [counts]\nwasm: wc.wasm\nstores: [counts, counts]\n",
        )
        .expect("write");
        let err = format!("{:#}", TransformFile::load(&path).expect_err("twice"));
        assert!(err.contains("declared twice"), "{err}");
        std::fs::write(
            &path,
            "name: wc\ninput: words\noutputs: [counts]\nwasm: wc.wasm\nstores: [__runnel]\n",
        )
        .expect("write");
        let err = format!("{:#}", TransformFile::load(&path).expect_err("reserved"));
        assert!(err.contains("invalid store name"), "{err}");
        std::fs::write(&path, "name: wc\ninput: words\noutputs: [counts]\nwasm: wc.wasm\nstores: [counts]\nstandby-replicas: 1\n").expect("write");
        let (spec, _) = TransformFile::load(&path).expect("with a standby");
        assert_eq!(spec.standby_replicas, 1);
        std::fs::write(
            &path,
            "name: up\ninput: words\noutputs: [upper]\nwasm: up.wasm\nstandby-replicas: 1\n",
        )
        .expect("write");
        let err = format!("{:#}", TransformFile::load(&path).expect_err("no stores"));
        assert!(err.contains("declares none"), "{err}");
    }
}
