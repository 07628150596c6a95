//! Runs a transform on sample records without a broker (`runnel transform test`).
//!
//! Input: JSON lines, each `{"value": "...", "key": "...", "headers": {"k": "v"},
//! "timestamp": 0, "partition": 0, "offset": 0}` (all fields optional); the output is one
//! JSON line per emitted record, and one per refused record.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::Deserialize;

use std::sync::Arc;

use runnel_proto::v1;

use crate::host::{LogBuffer, WasmHost};
use crate::input::Inputs;
use crate::runtime::{FROM_TIMER, Guest, GuestOutput, Processed, Saved, process};
use crate::state::TaskState;
use crate::tasks::{self, Tasks};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timestamp: i64,
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    offset: Option<i64>,
}

/// A row of a table given to the harness: `{"key": "...", "value": "...",
/// "partition": 0}`; a missing or null value deletes the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableLine {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    partition: u32,
}

/// A stateful component's deployment, for the harness.
#[derive(Debug, Clone, Default)]
pub struct StateOptions {
    pub stores: Vec<String>,
    pub allowed_lateness_ms: i64,
    /// (store, JSON lines): table stores and their rows, loaded before the first record
    /// as if read from the table's topic.
    pub tables: Vec<(String, String)>,
}

/// Runs `wasm` over the JSON lines in `input`, returns the output lines.
///
/// A stateless component gets every record in one batch. A stateful one gets one
/// record per batch, in stores of its partition that live as long as the run (in a
/// temporary directory), with its timers fired after each record as the runtime fires
/// them; records a timer emitted show `"input": "timer"`.
///
/// # Errors
/// A malformed input line (with its number), a component that does not load, or a trap.
pub fn run(
    wasm: &[u8],
    input: &str,
    config: &[(String, String)],
    outputs: &[String],
    state: &StateOptions,
) -> anyhow::Result<Vec<String>> {
    let mut records: Vec<InputLine> = Vec::new();
    for (number, line) in input
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut parsed: InputLine = serde_json::from_str(line)
            .with_context(|| format!("input line {} is not a record", number + 1))?;
        parsed.offset.get_or_insert(records.len() as i64);
        records.push(parsed);
    }
    let inputs_of = |lines: &[InputLine]| {
        let mut inputs = Inputs::default();
        for line in lines {
            inputs.push(
                (line.partition, line.offset.unwrap_or(0), line.timestamp),
                line.key.as_deref().map(str::as_bytes),
                line.value.as_deref().map(str::as_bytes),
                line.headers
                    .iter()
                    .map(|(key, value)| (key.as_str(), Some(value.as_bytes()))),
            );
        }
        inputs
    };
    let host = Arc::new(WasmHost::new()?);
    let pre = host
        .prepare("test", wasm)
        .map_err(|e| anyhow::anyhow!(e.0))?;
    if !pre.is_stateful() && (!state.stores.is_empty() || !state.tables.is_empty()) {
        anyhow::bail!(
            "stores or tables were given but the component is a stateless runnel:transform@0.1.0 one"
        );
    }
    let log = LogBuffer::default();
    let spec = v1::TransformSpec {
        name: "test".into(),
        input_topic: "input".into(),
        output_topics: outputs.to_vec(),
        config: config.iter().cloned().collect(),
        stores: state.stores.clone(),
        allowed_lateness_ms: state.allowed_lateness_ms,
        // A table's topic is named after its store: the harness reads no topic.
        tables: state
            .tables
            .iter()
            .map(|(store, _)| (store.clone(), store.clone()))
            .collect(),
        ..v1::TransformSpec::default()
    };
    crate::spec::validate(&spec)?;
    let guest = Guest {
        host,
        pre: pre.clone(),
        saved: Saved::from_spec(&spec),
        config: config.to_vec(),
        log: log.clone(),
    };
    let mut instance = None;
    let mut lines = Vec::new();
    if !pre.is_stateful() {
        let processed = process(&guest, &mut instance, &inputs_of(&records), None, 0)?;
        report(&processed, &guest.saved.output_topics, 0, &mut lines);
        return Ok(log.lines().into_iter().chain(lines).collect());
    }
    let dir = tempfile::tempdir().context("a temporary directory for the stores")?;
    let layout = Saved::from_spec(&spec).layout();
    let mut rows: Vec<(u32, u32, TableLine)> = Vec::new();
    for (store, text) in &state.tables {
        let index = layout
            .guest_names()
            .iter()
            .position(|name| name == store)
            .with_context(|| format!("table {store:?} is not a store of the deployment"))?
            as u32;
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let row: TableLine = serde_json::from_str(line).with_context(|| {
                format!(
                    "line {} of table {store:?} is not a row ({{\"key\": .., \"value\": .., \"partition\": ..}})",
                    number + 1
                )
            })?;
            rows.push((index, row.partition, row));
        }
    }
    let tasks = Tasks::new(dir.path(), "test", &layout);
    let mut partitions: Vec<u32> = records.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    for partition in partitions {
        let mut task =
            TaskState::open(&dir.path().join(partition.to_string()), partition, &layout)?;
        for store in layout.table_stores() {
            let mine: Vec<&TableLine> = rows
                .iter()
                .filter(|(s, p, _)| *s == store && *p == partition)
                .map(|(_, _, row)| row)
                .collect();
            task.restore(
                store,
                mine.iter()
                    .map(|row| (row.key.as_bytes(), row.value.as_deref().map(str::as_bytes))),
                mine.len() as i64,
            )?;
        }
        tasks::lock(&tasks).put_back(task);
    }
    for (unit, record) in records.iter().enumerate() {
        let unit = unit as u64;
        let processed = process(
            &guest,
            &mut instance,
            &inputs_of(std::slice::from_ref(record)),
            Some(&tasks),
            unit,
        )?;
        tasks::lock(&tasks).commit(unit, &BTreeMap::new())?;
        // Each record was processed alone: its input number is the unit's.
        report(
            &processed,
            &guest.saved.output_topics,
            unit as usize,
            &mut lines,
        );
    }
    Ok(log.lines().into_iter().chain(lines).collect())
}

/// One JSON line per emitted record, refused record and dropped timer; input numbers
/// start at `first`.
fn report(processed: &Processed, topics: &[String], first: usize, lines: &mut Vec<String>) {
    let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    for (index, record) in processed.outputs.iter().flat_map(GuestOutput::records) {
        let headers: BTreeMap<&str, Option<String>> = runnel_flat::headers(record.headers)
            .map(|(k, v)| (k, text(v)))
            .collect();
        let input = if index == FROM_TIMER {
            serde_json::json!("timer")
        } else {
            serde_json::json!(first + index as usize)
        };
        lines.push(
            serde_json::json!({
                "input": input,
                "topic": topics.get(record.output_index as usize),
                "key": text(record.key),
                "value": text(record.value),
                "headers": headers,
                "timestamp": record.timestamp_ms,
            })
            .to_string(),
        );
    }
    for (index, message) in &processed.failures {
        lines.push(serde_json::json!({ "input": first + index, "error": message }).to_string());
    }
    for message in &processed.timer_failures {
        lines.push(serde_json::json!({ "input": "timer", "error": message }).to_string());
    }
}
