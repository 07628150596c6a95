//! Runs a transform on sample records without a broker (`runnel transform test`).
//!
//! Input: JSON lines, each `{"value": "...", "key": "...", "headers": {"k": "v"},
//! "timestamp": 0, "partition": 0, "offset": 0}` (all fields optional); the output is one
//! JSON line per emitted record, and one per refused record.

use std::collections::BTreeMap;

use anyhow::Context;
use bytes::Bytes;
use runnel_client::{ConsumerRecord, Header};
use serde::Deserialize;

use crate::host::{LogBuffer, WasmHost};

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

/// Runs `wasm` over the JSON lines in `input`, returns the output lines.
///
/// # Errors
/// A malformed input line (with its number), a component that does not load, or a trap.
pub fn run(
    wasm: &[u8],
    input: &str,
    config: &[(String, String)],
    outputs: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut records = Vec::new();
    for (number, line) in input
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: InputLine = serde_json::from_str(line)
            .with_context(|| format!("input line {} is not a record", number + 1))?;
        records.push(ConsumerRecord {
            topic: "input".into(),
            partition: parsed.partition,
            offset: parsed.offset.unwrap_or(records.len() as i64),
            timestamp_ms: parsed.timestamp,
            key: parsed.key.map(Bytes::from),
            value: parsed.value.map(Bytes::from),
            headers: parsed
                .headers
                .into_iter()
                .map(|(key, value)| Header {
                    key,
                    value: Some(Bytes::from(value)),
                })
                .collect(),
        });
    }
    let host = WasmHost::new()?;
    let pre = host
        .prepare("test", wasm)
        .map_err(|e| anyhow::anyhow!(e.0))?;
    let log = LogBuffer::default();
    let limits = crate::host::Limits {
        memory_bytes: crate::host::MEMORY_LIMIT_BYTES_DEFAULT,
        cpu_ms: crate::host::CPU_LIMIT_MS_DEFAULT,
    };
    let mut instance = host
        .instantiate(&pre, "test", config, outputs, limits, log.clone())
        .map_err(|e| anyhow::anyhow!(e.0))?;
    let result = instance
        .process(&crate::runtime::flat_input(records.iter()))
        .map_err(|e| anyhow::anyhow!("guest {}", e.0))?;
    let mut lines: Vec<String> = log.lines();
    let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    for output in runnel_flat::read_outputs(&result.records) {
        let output = output.map_err(|e| anyhow::anyhow!("guest wrote {e}"))?;
        let topic = outputs
            .get(output.output_index as usize)
            .cloned()
            .unwrap_or_else(|| format!("<undeclared #{}>", output.output_index));
        let headers: BTreeMap<&str, Option<String>> = runnel_flat::headers(output.headers)
            .map(|(k, v)| (k, text(v)))
            .collect();
        lines.push(
            serde_json::json!({
                "input": output.input_index,
                "topic": topic,
                "key": text(output.key),
                "value": text(output.value),
                "headers": headers,
                "timestamp": output.timestamp_ms,
            })
            .to_string(),
        );
    }
    for (index, message) in result.errors {
        lines.push(serde_json::json!({ "input": index, "error": message }).to_string());
    }
    Ok(lines)
}
