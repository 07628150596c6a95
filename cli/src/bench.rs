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
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Producer batch size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    batch_size: usize,
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    #[arg(long, default_value = "1", value_parser = parse_acks)]
    acks: Acks,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Records per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

#[derive(Args)]
pub struct ConsumeBench {
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Stop after this many records (default: everything up to the end when started).
    #[arg(long)]
    records: Option<u64>,
}

pub async fn run(
    brokers: &[String],
    client: Client,
    command: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Connect(args) => crate::bench_connect::run(brokers, client, args).await,
        BenchCommand::Produce(args) => produce(client, args).await,
        BenchCommand::Consume(args) => consume(client, args).await,
    }
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

async fn produce(client: Client, args: ProduceBench) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client.clone());
    match admin
        .create_topic(&args.topic, args.partitions, 1, HashMap::new())
        .await
    {
        Ok(_) => {}
        Err(err) if err.code() == Some(ErrorCode::TopicAlreadyExists) => {}
        Err(err) => return Err(err.into()),
    }
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: args.acks,
            batch_size_bytes: args.batch_size,
            linger: Duration::from_millis(args.linger_ms),
            ..ProducerConfig::default()
        },
    );
    let value = Bytes::from(vec![b'x'; args.record_size]);
    let bar = progress(args.records);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Delivery)>(1 << 16);
    let collector_bar = bar.clone();
    let collector = tokio::spawn(async move {
        let mut latencies =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        let mut failures = 0u64;
        let mut first_error = None;
        // Deliveries of one batch complete together: read the clock once per batch.
        let mut now = Instant::now();
        while let Some((sent, mut delivery)) = rx.recv().await {
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
                    let micros = now
                        .saturating_duration_since(sent)
                        .as_micros()
                        .clamp(1, 60_000_000) as u64;
                    let _ = latencies.record(micros);
                }
                Err(err) => {
                    failures += 1;
                    first_error.get_or_insert(err.to_string());
                }
            }
            collector_bar.inc(1);
        }
        (latencies, failures, first_error)
    });
    let started = Instant::now();
    // Send times are read every few records: they are microseconds apart, latencies are
    // milliseconds, and a clock read per record is a visible share of the client's CPU.
    let mut stamp = started;
    for i in 0..args.records {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            if due > stamp {
                tokio::time::sleep_until(due.into()).await;
                stamp = Instant::now();
            }
        }
        if i % 32 == 0 {
            stamp = Instant::now();
        }
        let delivery = producer
            .send(ProducerRecord::new(&args.topic).value(value.clone()))
            .await?;
        tx.send((stamp, delivery)).await?;
    }
    producer.flush().await?;
    drop(tx);
    let (latencies, failures, first_error) = collector.await?;
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let sent = args.records - failures;
    let mb = (sent as f64 * args.record_size as f64) / (1024.0 * 1024.0);
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{sent} records sent, {:.1} records/s ({:.2} MB/s), latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        sent as f64 / elapsed,
        mb / elapsed,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0
    );
    if let Some(err) = first_error {
        eprintln!("error: {failures} records failed; first error: {err}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn consume(client: Client, args: ConsumeBench) -> anyhow::Result<ExitCode> {
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer
        .assign(&args.topic, None, StartFrom::Earliest)
        .await?;
    let ends = consumer.end_offsets().await?;
    let mut starts = HashMap::new();
    for (topic, partition) in consumer.assignment() {
        starts.insert(partition, consumer.position(&topic, partition).unwrap_or(0));
    }
    let available: i64 = ends
        .iter()
        .map(|((_, p), end)| end - starts.get(p).copied().unwrap_or(0))
        .sum();
    let target = args.records.unwrap_or(available.max(0) as u64);
    let bar = progress(target);
    let started = Instant::now();
    let mut count = 0u64;
    let mut bytes = 0u64;
    let mut idle_since = Instant::now();
    while count < target {
        let records = consumer.poll().await?;
        if records.is_empty() {
            if idle_since.elapsed() > Duration::from_secs(10) {
                eprintln!("no records for 10 s; stopping early");
                break;
            }
            continue;
        }
        idle_since = Instant::now();
        count += records.len() as u64;
        bytes += records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Bytes::len) as u64)
            .sum::<u64>();
        bar.set_position(count.min(target));
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    println!(
        "{count} records consumed, {:.1} records/s ({:.2} MB/s)",
        count as f64 / elapsed,
        bytes as f64 / (1024.0 * 1024.0) / elapsed
    );
    Ok(ExitCode::SUCCESS)
}
