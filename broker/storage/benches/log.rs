//! Append and sequential read throughput of the partition log.
//!
//! Run with `cargo bench -p runnel-broker-storage`. Throughput is reported in records:
//! criterion's "elements/s". Appends do not fsync (the flush policy is the broker's
//! choice and is measured by `runnel bench`); reads are page-cache warm.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use runnel_batch::{BatchOptions, Record, batches, encode};
use runnel_broker_storage::{Log, LogConfig};

const RECORDS_PER_ITERATION: usize = 100_000;

fn batch(records_per_batch: usize, value_bytes: usize) -> Vec<u8> {
    let records: Vec<Record> = (0..records_per_batch)
        .map(|i| Record {
            offset: 0,
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: None,
            value: Some(Bytes::from(vec![b'x'; value_bytes])),
            headers: vec![],
        })
        .collect();
    encode(&records, BatchOptions::default()).to_vec()
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.sample_size(10);
    for value_bytes in [100usize, 1024] {
        for per_batch in [1usize, 100, 1000] {
            let template = batch(per_batch, value_bytes);
            let batches_per_iter = RECORDS_PER_ITERATION / per_batch;
            group.throughput(Throughput::Elements((batches_per_iter * per_batch) as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{value_bytes}B"), per_batch),
                &per_batch,
                |b, _| {
                    b.iter_batched(
                        || {
                            let dir = tempfile::tempdir().expect("tempdir");
                            let log = Log::open(dir.path(), LogConfig::default(), 0).expect("open");
                            (dir, log, template.clone())
                        },
                        |(dir, mut log, buf)| {
                            for _ in 0..batches_per_iter {
                                log.append(&buf, 0, 0).expect("append");
                            }
                            (dir, log)
                        },
                        criterion::BatchSize::PerIteration,
                    );
                },
            );
        }
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    group.sample_size(10);
    for value_bytes in [100usize, 1024] {
        for per_batch in [1usize, 100, 1000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut log = Log::open(dir.path(), LogConfig::default(), 0).expect("open");
            let template = batch(per_batch, value_bytes);
            let batches_per_iter = RECORDS_PER_ITERATION / per_batch;
            for _ in 0..batches_per_iter {
                log.append(&template, 0, 0).expect("append");
            }
            let end = log.log_end_offset();
            group.throughput(Throughput::Elements(end as u64));
            // Reads as the broker serves a consumer: 1 MiB fetches, CRC verified per batch.
            group.bench_with_input(
                BenchmarkId::new(format!("{value_bytes}B"), per_batch),
                &per_batch,
                |b, _| {
                    b.iter(|| {
                        let mut offset = 0;
                        let mut seen = 0usize;
                        while offset < end {
                            let bytes = log.read(offset, 1 << 20, end).expect("read");
                            for item in batches(&bytes) {
                                let (header, _) = item.expect("valid");
                                seen += header.record_count as usize;
                                offset = header.next_offset();
                            }
                        }
                        assert_eq!(seen as i64, end);
                    });
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, append, read);
criterion_main!(benches);
