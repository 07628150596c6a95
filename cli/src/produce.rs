//! `runnel produce`: kafka-console-producer.sh.

use std::process::ExitCode;

use clap::Args;
use runnel_client::{Acks, Client, Delivery, Producer, ProducerConfig, ProducerRecord};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::parse_key_value;

#[derive(Args)]
pub struct ProduceArgs {
    topic: String,
    /// Split each line at the first SEP: the text before is the key, after is the value.
    #[arg(long)]
    key_separator: Option<String>,
    /// 0 (no wait), 1 (the leader has it, durable under its flush policy) or all (every
    /// in-sync replica has it; the default, and what makes the producer idempotent).
    #[arg(long, default_value = "all", value_parser = parse_acks)]
    acks: Acks,
    /// Send every record to this partition instead of choosing by key.
    #[arg(long)]
    partition: Option<u32>,
    /// Header KEY=VALUE added to every record; repeatable.
    #[arg(long = "header", value_parser = parse_key_value)]
    headers: Vec<(String, String)>,
    /// A record not acknowledged this long after it was first sent fails; retriable
    /// errors (a leader change, a broker down) are retried until then.
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
    /// A request without an answer for this long is retried on a new connection (a
    /// paused or cut-off broker).
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// With --acks all, batches are numbered under a producer id so that a retry after a
    /// lost answer writes nothing twice (Kafka's enable.idempotence); this turns that off.
    #[arg(long)]
    no_idempotence: bool,
    /// Write in transactions under this transactional id (implies --acks all): a
    /// read_committed consumer sees the lines of a transaction all at once, or never.
    /// Another producer with the same id is fenced.
    #[arg(long)]
    transactional_id: Option<String>,
    /// With --transactional-id: commit every N lines (and at the end of input); 0
    /// commits once, at the end. Ctrl-C aborts the open transaction.
    #[arg(long, default_value_t = 0, requires = "transactional_id")]
    transaction_records: usize,
    /// With --transactional-id: the coordinator aborts a transaction open longer.
    #[arg(long, default_value_t = 60_000, requires = "transactional_id")]
    transaction_timeout_ms: u64,
}

pub fn parse_acks(input: &str) -> Result<Acks, String> {
    match input {
        "0" => Ok(Acks::None),
        "1" => Ok(Acks::Leader),
        "all" | "-1" => Ok(Acks::All),
        other => Err(format!("acks must be 0, 1 or all, not {other:?}")),
    }
}

pub async fn run(client: Client, args: ProduceArgs) -> anyhow::Result<ExitCode> {
    // Fail fast on an unknown topic or partition, before reading any input.
    let partitions = client.partition_count(&args.topic).await?;
    if let Some(p) = args.partition.filter(|p| *p >= partitions) {
        anyhow::bail!(
            "topic {:?} has {partitions} partitions (0..={}); partition {p} does not exist",
            args.topic,
            partitions - 1
        );
    }
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: args.acks,
            delivery_timeout: std::time::Duration::from_millis(args.delivery_timeout_ms),
            request_timeout: std::time::Duration::from_millis(args.request_timeout_ms),
            idempotent: !args.no_idempotence,
            transactional_id: args.transactional_id.clone(),
            transaction_timeout: std::time::Duration::from_millis(args.transaction_timeout_ms),
            ..ProducerConfig::default()
        },
    );
    let transactional = args.transactional_id.is_some();
    if transactional {
        if args.no_idempotence {
            anyhow::bail!("--transactional-id needs idempotence; drop --no-idempotence");
        }
        producer.init_transactions().await?;
        producer.begin_transaction()?;
    }
    let (deliveries_tx, mut deliveries_rx) =
        tokio::sync::mpsc::channel::<(usize, Delivery)>(65_536);
    let reporter = tokio::spawn(async move {
        let mut failed = 0usize;
        while let Some((line, delivery)) = deliveries_rx.recv().await {
            if let Err(err) = delivery.await {
                eprintln!("error: line {line} was not written: {err}");
                failed += 1;
            }
        }
        failed
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut number = 0usize;
    let mut input_error = None;
    let mut in_transaction = 0usize;
    let mut committed = 0usize;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = &mut interrupted => {
                if transactional {
                    producer.abort_transaction().await?;
                    eprintln!("interrupted: the open transaction ({in_transaction} lines) was aborted; {committed} lines were committed before");
                }
                return Ok(ExitCode::FAILURE);
            }
        };
        let Some(line) = line else {
            break;
        };
        if transactional
            && args.transaction_records > 0
            && in_transaction == args.transaction_records
        {
            producer.commit_transaction().await?;
            committed += in_transaction;
            in_transaction = 0;
            producer.begin_transaction()?;
        }
        number += 1;
        in_transaction += 1;
        let mut record = ProducerRecord::new(&args.topic);
        match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((key, value)) => record = record.key(key.to_string()).value(value.to_string()),
                None => {
                    input_error = Some(format!(
                        "line {number} has no key separator {sep:?}; every line must be KEY{sep}VALUE"
                    ));
                    break;
                }
            },
            None => record = record.value(line),
        }
        if let Some(p) = args.partition {
            record = record.partition(p);
        }
        for (key, value) in &args.headers {
            record = record.header(key.clone(), value.clone());
        }
        let delivery = producer.send(record).await?;
        deliveries_tx.send((number, delivery)).await?;
    }
    if transactional {
        if input_error.is_some() {
            producer.abort_transaction().await?;
        } else if let Err(err) = producer.commit_transaction().await {
            let _ = producer.abort_transaction().await;
            return Err(err.into());
        }
    } else {
        producer.flush().await?;
    }
    drop(deliveries_tx);
    let failed = reporter.await?;
    if let Some(err) = input_error {
        if transactional {
            eprintln!("error: {err} (the open transaction was aborted)");
            return Ok(ExitCode::FAILURE);
        }
        eprintln!("error: {err} (the lines before it were sent)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
