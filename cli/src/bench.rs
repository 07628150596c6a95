//! `runnel bench`: load generators in the spirit of Kafka's producer-perf-test.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::FutureExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use runnel_client::{
    Acks, Admin, Client, Consumer, ConsumerConfig, Delivery, ErrorCode, Producer, ProducerConfig,
    ProducerRecord, StartFrom,
};

use crate::produce::parse_acks;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Produce records as fast as allowed; report throughput and ack latency.
    Produce(ProduceBench),
    /// Read a topic from the beginning; report throughput.
    Consume(ConsumeBench),
    /// File source -> topic and topic -> file sink throughput, through a connect worker
    /// in this process.
    Connect(crate::bench_connect::ConnectBench),
}

#[derive(Args)]
pub struct ProduceBench {
    /// Topic to write (created with --partitions if it does not exist).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Records in all, shared among the producers.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Producer batch size in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    batch_size: usize,
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    #[arg(long, default_value = "1", value_parser = parse_acks)]
    acks: Acks,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Records per second in all; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Producers in this process, each with its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    producers: u32,
    /// Keyed records with this many distinct keys (`key-0` ...); 0 = no keys.
    #[arg(long, default_value_t = 0)]
    key_cardinality: u64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// With --acks all, produce without idempotence (no producer id and sequence numbers).
    #[arg(long)]
    no_idempotence: bool,
    /// Encode one batch of --batch-size (at most the topic's limit) up front and send it
    /// again and again to partition 0 on the raw-batch path, as peers' load generators do:
    /// measures the broker's intake without the producer's per-record work.
    #[arg(long, conflicts_with_all = ["producers", "key_cardinality", "rate"])]
    prebuilt_batches: bool,
    /// Produce in transactions: producer i uses the transactional id ID-i (implies
    /// --acks all) and commits every --transaction-records records; the commit latency
    /// is reported.
    #[arg(long, conflicts_with_all = ["prebuilt_batches", "no_idempotence"])]
    transactional_id: Option<String>,
    #[arg(long, default_value_t = 1000, requires = "transactional_id")]
    transaction_records: u64,
}

#[derive(Args)]
pub struct ConsumeBench {
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Stop after this many records in all (default: everything up to the end when
    /// started).
    #[arg(long)]
    records: Option<u64>,
    /// Consumers in this process, each with its own connection; partition P is read by
    /// consumer P mod N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    consumers: u32,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// read_uncommitted or read_committed.
    #[arg(long, default_value = "read_uncommitted", value_parser = crate::consume::parse_isolation)]
    isolation: runnel_client::v1::IsolationLevel,
}

pub async fn run(
    target: &crate::Target,
    client: Client,
    command: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Connect(args) => crate::bench_connect::run(target, client, args).await,
        BenchCommand::Produce(args) => produce(target, client, args).await,
        BenchCommand::Consume(args) => consume(target, client, args).await,
    }
}

fn progress(total: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram of microseconds, in milliseconds.
fn latency_json(latencies: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "p50": ms(0.5),
        "p99": ms(0.99),
        "p999": ms(0.999),
        "max": latencies.max() as f64 / 1000.0,
    })
}

/// Prints a run's result as one JSON object (`--json`) or as a line of text.
fn print_result(json: bool, object: &serde_json::Value, text: String) {
    if json {
        println!("{object}");
    } else {
        println!("{text}");
    }
}

fn latency_text(latencies: &Histogram<u64>) -> String {
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0
    )
}

/// Connections for `n` clients: the one given, then new ones.
async fn clients(target: &crate::Target, first: Client, n: u32) -> anyhow::Result<Vec<Client>> {
    let mut all = vec![first];
    for _ in 1..n {
        all.push(target.client().await?);
    }
    Ok(all)
}

/// What one producer of the benchmark saw.
struct ProducerRun {
    latencies: Histogram<u64>,
    /// Transactional runs: how long each commit took, in microseconds.
    commits: Histogram<u64>,
    failures: u64,
    first_error: Option<String>,
}

async fn produce(
    target: &crate::Target,
    client: Client,
    args: ProduceBench,
) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client.clone());
    match admin
        .create_topic(&args.topic, Some(args.partitions), Some(1), HashMap::new())
        .await
    {
        Ok(_) => {}
        Err(err) if err.code() == Some(ErrorCode::TopicAlreadyExists) => {}
        Err(err) => return Err(err.into()),
    }
    if args.prebuilt_batches {
        return produce_prebuilt(client, args).await;
    }
    let value = Bytes::from(vec![b'x'; args.record_size]);
    let keys: Vec<Bytes> = (0..args.key_cardinality.min(10_000_000))
        .map(|k| Bytes::from(format!("key-{k}")))
        .collect();
    let keys = std::sync::Arc::new(keys);
    let bar = progress(args.records, args.json);
    let producers = u64::from(args.producers);
    let started = Instant::now();
    let mut runs = Vec::new();
    for (index, client) in clients(target, client, args.producers)
        .await?
        .into_iter()
        .enumerate()
    {
        let index = index as u64;
        // Producer i sends records i, i + N, i + 2N, ...
        let count = args.records / producers + u64::from(index < args.records % producers);
        let rate = args.rate as f64 / producers as f64;
        let config = ProducerConfig {
            acks: args.acks,
            batch_size_bytes: args.batch_size,
            linger: Duration::from_millis(args.linger_ms),
            idempotent: !args.no_idempotence,
            transactional_id: args
                .transactional_id
                .as_ref()
                .map(|id| format!("{id}-{index}")),
            ..ProducerConfig::default()
        };
        let (topic, value, keys, bar) =
            (args.topic.clone(), value.clone(), keys.clone(), bar.clone());
        let per_transaction = args
            .transactional_id
            .is_some()
            .then_some(args.transaction_records.max(1));
        runs.push(async move {
            let producer = Producer::new(client, config);
            produce_one(
                &producer,
                &topic,
                count,
                rate,
                started,
                value,
                &keys,
                (index, producers),
                per_transaction,
                &bar,
            )
            .await
        });
    }
    let mut latencies = histogram();
    let mut commits = histogram();
    let mut failures = 0;
    let mut first_error = None;
    // The send loops run here, on this thread, beside the runtime's workers (which run
    // the producers' senders): spawning them too would leave a core's worth of threads idle.
    for run in futures::future::join_all(runs).await {
        let run = run?;
        latencies.add(&run.latencies)?;
        commits.add(&run.commits)?;
        failures += run.failures;
        first_error = first_error.or(run.first_error);
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let sent = args.records - failures;
    let mb = (sent as f64 * args.record_size as f64) / (1024.0 * 1024.0);
    let mut object = serde_json::json!({
        "records": sent,
        "failed": failures,
        "seconds": elapsed,
        "records_per_second": sent as f64 / elapsed,
        "mib_per_second": mb / elapsed,
        "producers": args.producers,
        "record_size": args.record_size,
        "ack_latency_ms": latency_json(&latencies),
    });
    let mut text = format!(
        "{sent} records sent, {:.1} records/s ({:.2} MB/s), latency {}",
        sent as f64 / elapsed,
        mb / elapsed,
        latency_text(&latencies),
    );
    if args.transactional_id.is_some() {
        object["transactions"] = commits.len().into();
        object["commit_latency_ms"] = latency_json(&commits);
        text.push_str(&format!(
            "; {} transactions, commit latency {}",
            commits.len(),
            latency_text(&commits)
        ));
    }
    print_result(args.json, &object, text);
    if let Some(err) = first_error {
        eprintln!("error: {failures} records failed; first error: {err}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Requests a prebuilt-batch run keeps outstanding.
const PREBUILT_IN_FLIGHT: usize = 16;

async fn produce_prebuilt(client: Client, args: ProduceBench) -> anyhow::Result<ExitCode> {
    let limit = client.max_message_bytes(&args.topic).await?;
    let value = Bytes::from(vec![b'x'; args.record_size]);
    let mut builder = runnel_batch::BatchBuilder::new(runnel_batch::BatchOptions::default());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let record = runnel_batch::Record {
        offset: 0,
        timestamp_ms: now_ms,
        key: None,
        value: Some(value),
        headers: Vec::new(),
    };
    let target = args.batch_size.min(limit);
    while builder.push_within(&record, target) {}
    let per_batch = builder.len() as u64;
    let batch = builder.build();
    let requests = args.records.div_ceil(per_batch);
    let (tx, rx) = tokio::sync::mpsc::channel(PREBUILT_IN_FLIGHT);
    let mut responses = client
        .produce_stream(
            &args.topic,
            0,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )
        .await?;
    let bar = progress(requests * per_batch, args.json);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(PREBUILT_IN_FLIGHT));
    let started = Instant::now();
    let acks = args.acks.to_proto();
    let sender_permits = permits.clone();
    let topic = args.topic.clone();
    let sender = tokio::spawn(async move {
        let mut sent_at = Vec::with_capacity(requests as usize);
        for request_id in 0..requests {
            let permit = sender_permits.acquire().await?;
            permit.forget();
            sent_at.push(Instant::now());
            let request = runnel_client::v1::ProduceRequest {
                request_id,
                topic: topic.clone(),
                partitions: vec![runnel_client::v1::PartitionRecords {
                    partition: 0,
                    records: batch.clone(),
                    messages: Vec::new(),
                }],
                acks: acks as i32,
                timeout_ms: 0,
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                break;
            }
        }
        anyhow::Ok(sent_at)
    });
    let mut latencies = histogram();
    let mut acked = 0u64;
    let mut first_error = None;
    let mut received_at = Vec::with_capacity(requests as usize);
    while acked < requests {
        let Some(response) = responses.message().await? else {
            break;
        };
        received_at.push(Instant::now());
        let error = response
            .error
            .or_else(|| response.partitions.into_iter().find_map(|p| p.error));
        if let Some(error) = error {
            first_error.get_or_insert(error.message);
        }
        acked += 1;
        permits.add_permits(1);
        bar.inc(per_batch);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent_at = sender.await??;
    for (sent, received) in sent_at.iter().zip(&received_at) {
        let micros = received.saturating_duration_since(*sent).as_micros().max(1) as u64;
        let _ = latencies.record(micros);
    }
    bar.finish_and_clear();
    let records = acked * per_batch;
    let mb = records as f64 * args.record_size as f64 / (1024.0 * 1024.0);
    print_result(
        args.json,
        &serde_json::json!({
            "records": records,
            "failed": (requests - acked) * per_batch,
            "seconds": elapsed,
            "records_per_second": records as f64 / elapsed,
            "mib_per_second": mb / elapsed,
            "records_per_batch": per_batch,
            "record_size": args.record_size,
            "ack_latency_ms": latency_json(&latencies),
        }),
        format!(
            "{records} records sent in prebuilt batches of {per_batch}, {:.1} records/s ({:.2} MB/s), batch latency {}",
            records as f64 / elapsed,
            mb / elapsed,
            latency_text(&latencies),
        ),
    );
    if let Some(err) = first_error {
        eprintln!("error: the broker refused batches; first error: {err}");
        return Ok(ExitCode::FAILURE);
    }
    if acked < requests {
        eprintln!("error: the broker closed the stream after {acked} of {requests} batches");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Deliveries handed to the latency collector at a time, at full speed (they are
/// microseconds apart there; with `--rate`, each goes at once).
const DELIVERY_CHUNK: usize = 64;

#[allow(clippy::too_many_arguments)]
async fn produce_one(
    producer: &Producer,
    topic: &str,
    count: u64,
    rate: f64,
    started: Instant,
    value: Bytes,
    keys: &[Bytes],
    (index, producers): (u64, u64),
    per_transaction: Option<u64>,
    bar: &ProgressBar,
) -> anyhow::Result<ProducerRun> {
    let mut commits = histogram();
    if per_transaction.is_some() {
        producer.init_transactions().await?;
        producer.begin_transaction()?;
    }
    // Deliveries go to the collector in chunks: a channel send per record cost the
    // benchmark a quarter of its own CPU, which it then took from the broker.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(Instant, Delivery)>>(1 << 10);
    let collector_bar = bar.clone();
    let collector = tokio::spawn(async move {
        let mut run = ProducerRun {
            latencies: histogram(),
            commits: histogram(),
            failures: 0,
            first_error: None,
        };
        // Deliveries of one batch complete together: read the clock once per batch.
        let mut now = Instant::now();
        while let Some(chunk) = rx.recv().await {
            let count = chunk.len() as u64;
            for (sent, mut delivery) in chunk {
                if sent > now {
                    now = Instant::now();
                }
                let result = match (&mut delivery).now_or_never() {
                    Some(result) => result,
                    None => {
                        let result = delivery.await;
                        now = Instant::now();
                        result
                    }
                };
                match result {
                    Ok(_) => {
                        let micros = now.saturating_duration_since(sent).as_micros().max(1) as u64;
                        let _ = run.latencies.record(micros);
                    }
                    Err(err) => {
                        run.failures += 1;
                        run.first_error.get_or_insert(err.to_string());
                    }
                }
            }
            collector_bar.inc(count);
        }
        run
    });
    // Send times and record timestamps are read every few records: they are
    // microseconds apart, latencies are milliseconds, and a clock read per record is a
    // visible share of the client's CPU (the producer stamps a record without a
    // timestamp itself).
    let clocks = || {
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        (Instant::now(), timestamp_ms)
    };
    let (mut stamp, mut timestamp_ms) = clocks();
    let chunk_size = if rate > 0.0 { 1 } else { DELIVERY_CHUNK };
    let mut chunk = Vec::with_capacity(chunk_size);
    for i in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if due > stamp {
                tokio::time::sleep_until(due.into()).await;
                (stamp, timestamp_ms) = clocks();
            }
        }
        if i % 32 == 0 {
            (stamp, timestamp_ms) = clocks();
        }
        let mut record = ProducerRecord::new(topic)
            .value(value.clone())
            .timestamp_ms(timestamp_ms);
        if !keys.is_empty() {
            let n = (i * producers + index) % keys.len() as u64;
            record = record.key(keys[n as usize].clone());
        }
        if let Some(every) = per_transaction
            && i > 0
            && i % every == 0
        {
            let committing = Instant::now();
            producer.commit_transaction().await?;
            let _ = commits.record(committing.elapsed().as_micros().max(1) as u64);
            producer.begin_transaction()?;
        }
        let delivery = producer.send(record).await?;
        chunk.push((stamp, delivery));
        if chunk.len() == chunk_size {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_size));
            tx.send(full).await?;
        }
    }
    if !chunk.is_empty() {
        tx.send(chunk).await?;
    }
    if per_transaction.is_some() {
        let committing = Instant::now();
        producer.commit_transaction().await?;
        let _ = commits.record(committing.elapsed().as_micros().max(1) as u64);
    } else {
        producer.flush().await?;
    }
    drop(tx);
    let mut run = collector.await?;
    run.commits = commits;
    Ok(run)
}

/// What one consumer of the benchmark saw.
struct ConsumerRun {
    records: u64,
    bytes: u64,
    /// Record timestamp to delivery, in microseconds.
    latencies: Histogram<u64>,
}

async fn consume(
    target: &crate::Target,
    client: Client,
    args: ConsumeBench,
) -> anyhow::Result<ExitCode> {
    let partitions = client.partition_count(&args.topic).await?;
    let consumers = args.consumers.min(partitions.max(1));
    if consumers < args.consumers {
        eprintln!(
            "{} has {partitions} partitions: running {consumers} consumers, not {}",
            args.topic, args.consumers
        );
    }
    let mut assigned = Vec::new();
    let mut available = 0i64;
    for (index, client) in clients(target, client, consumers)
        .await?
        .into_iter()
        .enumerate()
    {
        let mine: Vec<u32> = (0..partitions)
            .filter(|p| p % consumers == index as u32)
            .collect();
        let mut consumer = Consumer::new(
            client,
            ConsumerConfig {
                isolation: args.isolation,
                ..ConsumerConfig::default()
            },
        );
        consumer
            .assign(&args.topic, Some(mine), StartFrom::Earliest)
            .await?;
        let ends = consumer.end_offsets().await?;
        for ((topic, partition), end) in &ends {
            available += end - consumer.position(topic, *partition).unwrap_or(*end);
        }
        assigned.push((consumer, ends));
    }
    let target = args.records.unwrap_or(available.max(0) as u64);
    let bar = progress(target, args.json);
    let remaining = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(target as i64));
    let started = Instant::now();
    let mut runs = Vec::new();
    let until_end = args.records.is_none();
    for (mut consumer, ends) in assigned {
        let (remaining, bar) = (remaining.clone(), bar.clone());
        // Without --records: until the end offsets of the start (offsets that are
        // transaction markers hold no record, so counting records would wait forever).
        let ends = until_end.then_some(ends);
        runs.push(async move { consume_one(&mut consumer, ends, &remaining, &bar).await });
    }
    let mut count = 0;
    let mut bytes = 0;
    let mut latencies = histogram();
    for run in futures::future::join_all(runs).await {
        let run = run?;
        count += run.records;
        bytes += run.bytes;
        latencies.add(&run.latencies)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mb = bytes as f64 / (1024.0 * 1024.0);
    print_result(
        args.json,
        &serde_json::json!({
            "records": count,
            "seconds": elapsed,
            "records_per_second": count as f64 / elapsed,
            "mib_per_second": mb / elapsed,
            "consumers": consumers,
            "end_to_end_latency_ms": latency_json(&latencies),
        }),
        format!(
            "{count} records consumed, {:.1} records/s ({:.2} MB/s), end-to-end latency (record timestamp to delivery) {}",
            count as f64 / elapsed,
            mb / elapsed,
            latency_text(&latencies),
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads until the benchmark's shared count of wanted records reaches zero.
async fn consume_one(
    consumer: &mut Consumer,
    ends: Option<std::collections::BTreeMap<(String, u32), i64>>,
    remaining: &std::sync::atomic::AtomicI64,
    bar: &ProgressBar,
) -> anyhow::Result<ConsumerRun> {
    use std::sync::atomic::Ordering;
    let mut run = ConsumerRun {
        records: 0,
        bytes: 0,
        latencies: histogram(),
    };
    let mut idle_since = Instant::now();
    let at_end = |consumer: &Consumer| {
        ends.as_ref().is_some_and(|ends| {
            ends.iter().all(|((topic, partition), end)| {
                consumer.position(topic, *partition).unwrap_or(*end) >= *end
            })
        })
    };
    while remaining.load(Ordering::Relaxed) > 0 && !at_end(consumer) {
        let records = consumer.poll().await?;
        if records.is_empty() {
            if idle_since.elapsed() > Duration::from_secs(10) {
                eprintln!("no records for 10 s; stopping early");
                break;
            }
            continue;
        }
        idle_since = Instant::now();
        // Record timestamps are milliseconds: one clock read per poll is precise enough.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for record in &records {
            run.bytes += record.value.as_ref().map_or(0, Bytes::len) as u64;
            let micros = (now_ms - record.timestamp_ms).max(0) as u64 * 1000;
            let _ = run.latencies.record(micros.max(1));
        }
        run.records += records.len() as u64;
        remaining.fetch_sub(records.len() as i64, Ordering::Relaxed);
        bar.inc(records.len() as u64);
    }
    Ok(run)
}
