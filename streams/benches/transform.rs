//! Transform throughput inside the runtime: flat batches of 100-byte JSON records through
//! the identity and filter example components, the cost of one host-to-guest call, and
//! the word-count example's state get and put per record (RocksDB stores in a temporary
//! directory, committed after each batch as the runtime commits them), and the guest's
//! flat input built from fetched record batches.
//!
//! Run with `cargo bench -p runnel-streams`; it builds the example components first.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use runnel_flat::{FlatRecord, NO_HEADERS};
use runnel_streams::host::{Limits, LogBuffer, Setup, WasmHost};
use runnel_streams::state::{Layout, TaskState};

const BATCH_RECORDS: usize = 10_000;

fn components() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-examples");
    let manifest =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/transforms/Cargo.toml");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        // The examples' .cargo/config.toml (wasm SIMD) applies from their directory.
        .current_dir(manifest.parent().expect("examples directory"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the example transforms failed");
    target.join("wasm32-wasip2/release")
}

fn batch() -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..BATCH_RECORDS {
        // Half of the records pass the filter (amount >= 100).
        let mut value = format!(
            "{{\"id\":{i},\"amount\":{},\"note\":\"",
            if i % 2 == 0 { 150 } else { 50 }
        );
        while value.len() < 98 {
            value.push('x');
        }
        value.push_str("\"}");
        runnel_flat::write_input(
            &mut buf,
            &FlatRecord {
                partition: 0,
                offset: i as i64,
                timestamp_ms: 1_700_000_000_000,
                key: None,
                value: Some(value.as_bytes()),
                headers: NO_HEADERS,
            },
        );
    }
    buf
}

fn transforms(c: &mut Criterion) {
    let dir = components();
    let host = WasmHost::new().expect("host");
    let limits = Limits {
        memory_bytes: 256 * 1024 * 1024,
        cpu_ms: 10_000,
    };
    let input = batch();
    let mut group = c.benchmark_group("transform");
    group.sample_size(20);
    for (name, config) in [
        ("identity", vec![]),
        ("filter", vec![("min".to_string(), "100".to_string())]),
    ] {
        let wasm = std::fs::read(dir.join(format!("{name}.wasm"))).expect("component");
        let pre = host.prepare(name, &wasm).expect("compiles");
        let outputs = ["out".to_string()];
        let mut instance = host
            .instantiate(
                &pre,
                Setup {
                    name,
                    config: &config,
                    outputs: &outputs,
                    stores: &[],
                    allowed_lateness_ms: 0,
                    limits,
                    log: LogBuffer::default(),
                },
            )
            .expect("instantiates");
        group.throughput(Throughput::Elements(BATCH_RECORDS as u64));
        group.bench_function(format!("{name}/100B x {BATCH_RECORDS}"), |b| {
            b.iter(|| instance.process(&input).expect("runs"));
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{name}/empty batch (call cost)"), |b| {
            b.iter(|| instance.process(&[]).expect("runs"));
        });
    }
    group.finish();
}

/// Keyed records: batch `round` of a stream cycling through `keys` distinct words (each
/// batch takes the next `BATCH_RECORDS` of the cycle, so `keys` above the batch size
/// spread over several batches and no batch repeats a word).
fn keyed_batch(keys: usize, round: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..BATCH_RECORDS {
        let n = round * BATCH_RECORDS + i;
        let key = format!("word-{}", (n % keys) * 7919 % keys);
        runnel_flat::write_input(
            &mut buf,
            &FlatRecord {
                partition: 0,
                offset: n as i64,
                timestamp_ms: 1_700_000_000_000,
                key: Some(key.as_bytes()),
                value: Some(key.as_bytes()),
                headers: NO_HEADERS,
            },
        );
    }
    buf
}

/// The word-count example over `keys` distinct words, in batches of `BATCH_RECORDS`, each
/// committed as the runtime commits a batch. Two figures: the guest's call (a get, a put
/// and an emit per record, with the writes kept for the changelog), and the commit of the
/// batch's writes into RocksDB.
fn state(c: &mut Criterion) {
    let dir = components();
    let host = WasmHost::new().expect("host");
    let wasm = std::fs::read(dir.join("word_count.wasm")).expect("component");
    let pre = host.prepare("word_count", &wasm).expect("compiles");
    let outputs = ["out".to_string()];
    let stores = ["counts".to_string()];
    let mut instance = host
        .instantiate(
            &pre,
            Setup {
                name: "word_count",
                config: &[],
                outputs: &outputs,
                stores: &stores,
                allowed_lateness_ms: 0,
                limits: Limits {
                    memory_bytes: 256 * 1024 * 1024,
                    cpu_ms: 10_000,
                },
                log: LogBuffer::default(),
            },
        )
        .expect("instantiates");
    let state_dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout {
        declared: stores.to_vec(),
        tables: Vec::new(),
    };
    let mut task = Some(TaskState::open(state_dir.path(), 0, &layout).expect("opens"));
    let mut unit = 0;
    let mut group = c.benchmark_group("state");
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH_RECORDS as u64));
    for keys in [1_000usize, 100_000] {
        let inputs: Vec<Vec<u8>> = (0..keys.div_ceil(BATCH_RECORDS))
            .map(|round| keyed_batch(keys, round))
            .collect();
        // Runs `iters` batches; returns the time spent in the guest call and in the commit.
        let mut run = |iters: u64| {
            let (mut call, mut commit) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..iters {
                let input = &inputs[unit as usize % inputs.len()];
                unit += 1;
                let started = Instant::now();
                instance.enter(task.take().expect("task"));
                instance.process(input).expect("runs");
                let mut state = instance.leave().expect("task back");
                state.end_call(true, unit);
                let called = Instant::now();
                state
                    .commit(unit, &std::collections::BTreeMap::new())
                    .expect("commits");
                commit += called.elapsed();
                call += called - started;
                task = Some(state);
            }
            (call, commit)
        };
        group.bench_function(
            format!("word-count get+put+emit in the guest/{keys} keys x {BATCH_RECORDS}"),
            |b| b.iter_custom(|iters| run(iters).0),
        );
        group.bench_function(
            format!("word-count commit into RocksDB/{keys} keys x {BATCH_RECORDS}"),
            |b| b.iter_custom(|iters| run(iters).1),
        );
    }
    group.finish();
}

/// The guest's input from ten 1,000-record batches of 100-byte values: walked in place
/// (what the runtime does), against decoding each batch into records first.
fn input(c: &mut Criterion) {
    use bytes::Bytes;
    use runnel_client::FetchedBatch;
    use runnel_streams::input::Inputs;
    let value = vec![b'x'; 100];
    let batches: Vec<FetchedBatch> = (0..10)
        .map(|b| {
            let records: Vec<runnel_batch::Record> = (0..1_000)
                .map(|i| runnel_batch::Record {
                    offset: i,
                    timestamp_ms: 1_700_000_000_000,
                    key: Some(Bytes::from(format!("key-{i}"))),
                    value: Some(Bytes::from(value.clone())),
                    headers: Vec::new(),
                })
                .collect();
            let mut bytes =
                runnel_batch::encode(&records, runnel_batch::BatchOptions::default()).to_vec();
            runnel_batch::set_base_offset(&mut bytes, b * 1_000);
            FetchedBatch {
                topic: "in".into(),
                partition: 0,
                bytes: Bytes::from(bytes),
                from_offset: 0,
                next_offset: (b + 1) * 1_000,
            }
        })
        .collect();
    let mut group = c.benchmark_group("input");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("walked in place", |b| {
        b.iter(|| Inputs::from_batches(&batches).expect("parses").len())
    });
    group.bench_function("decoded into records first", |b| {
        b.iter(|| {
            let mut inputs = Inputs::default();
            for batch in &batches {
                for r in runnel_batch::decode_records_shared(&batch.bytes).expect("decodes") {
                    inputs.push(
                        (batch.partition, r.offset, r.timestamp_ms),
                        r.key.as_deref(),
                        r.value.as_deref(),
                        runnel_batch::Header::pairs(&r.headers),
                    );
                }
            }
            inputs.len()
        })
    });
    group.finish();
}

criterion_group!(benches, transforms, state, input);
criterion_main!(benches);
