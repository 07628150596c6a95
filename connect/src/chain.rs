//! Transform chains: the transforms of a connector file, applied to each batch in order;
//! a trap is isolated to the record that caused it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use runnel_streams::host::{GuestFailure, Instance, Limits, LogBuffer, Setup, WasmHost};
use runnel_streams::input::Inputs;

use crate::task::{Chained, Rec, Stop};

/// One step of the transform chain.
pub(crate) struct Step {
    pub(crate) pre: Arc<runnel_streams::host::Prepared>,
    pub(crate) config: Vec<(String, String)>,
    pub(crate) instance: Option<Instance>,
}

/// Runs records through every step; traps are isolated to their record.
pub(crate) fn chain_blocking(
    host: &WasmHost,
    name: &str,
    log: &LogBuffer,
    steps: &mut [Step],
    mut records: Vec<Rec>,
) -> Result<Chained, Stop> {
    let mut refused: Vec<(usize, String)> = Vec::new();
    for (i, step) in steps.iter_mut().enumerate() {
        let mut run = |input: &[Rec]| -> Result<Result<runnel_streams::host::BatchResult, GuestFailure>, Stop> {
            if step.instance.is_none() {
                let fresh = host
                    .instantiate(
                        &step.pre,
                        Setup {
                            name,
                            config: &step.config,
                            outputs: &[String::from("out")],
                            stores: &[],
                            allowed_lateness_ms: 0,
                            limits: Limits {
                                memory_bytes: runnel_streams::host::MEMORY_LIMIT_BYTES_DEFAULT,
                                cpu_ms: runnel_streams::host::CPU_LIMIT_MS_DEFAULT,
                            },
                            log: log.clone(),
                        },
                    )
                    .map_err(|e| Stop::Failed(format!("transforms[{i}]: {}", e.0)))?;
                step.instance = Some(fresh);
            }
            let Some(live) = step.instance.as_mut() else {
                return Err(Stop::Failed("no transform instance".into()));
            };
            let result = live.process(&chain_input(input));
            if result.is_err() {
                step.instance = None;
            }
            Ok(result)
        };
        let mut next: Vec<Rec> = Vec::with_capacity(records.len());
        match run(&records)? {
            Ok(result) => collect_step(i, &records, result, &mut next, &mut refused),
            Err(failure) => {
                log.push(format!(
                    "[runtime] transforms[{i}] {}; isolating the record",
                    failure.0
                ));
                for (j, record) in records.iter().enumerate() {
                    match run(std::slice::from_ref(record))? {
                        Ok(result) => {
                            collect_step(i, &records[j..=j], result, &mut next, &mut refused);
                        }
                        Err(failure) => {
                            refused.push((record.origin, format!("transforms[{i}] {}", failure.0)))
                        }
                    }
                }
            }
        }
        records = next;
    }
    Ok((records, refused))
}

pub(crate) fn chain_input(records: &[Rec]) -> Vec<u8> {
    let mut inputs = Inputs::default();
    for (i, r) in records.iter().enumerate() {
        // The offset is the record's place in the batch: what a transform's errors name.
        inputs.push(
            (0, i as i64, r.timestamp_ms),
            r.key.as_deref(),
            r.value.as_deref(),
            runnel_client::Header::pairs(&r.headers),
        );
    }
    inputs.into_flat()
}

pub(crate) fn collect_step(
    step: usize,
    inputs: &[Rec],
    result: runnel_streams::host::BatchResult,
    next: &mut Vec<Rec>,
    refused: &mut Vec<(usize, String)>,
) {
    let mut bad: BTreeMap<usize, String> = BTreeMap::new();
    for (index, message) in result.errors {
        let index = (index as usize).min(inputs.len().saturating_sub(1));
        bad.insert(index, format!("transforms[{step}]: {message}"));
    }
    let bytes = Bytes::from(result.records);
    let mut emitted = Vec::new();
    for output in runnel_flat::read_outputs(&bytes) {
        let Ok(output) = output else {
            bad.entry(0)
                .or_insert_with(|| format!("transforms[{step}] wrote a malformed batch"));
            break;
        };
        let Some(input) = inputs.get(output.input_index as usize) else {
            continue;
        };
        emitted.push((
            output.input_index as usize,
            Rec::from_output(&bytes, &output, input.origin),
        ));
    }
    next.extend(
        emitted
            .into_iter()
            .filter(|(i, _)| !bad.contains_key(i))
            .map(|(_, r)| r),
    );
    for (index, message) in bad {
        if let Some(input) = inputs.get(index) {
            refused.push((input.origin, message));
        }
    }
}
