//! `runnel consume`: kafka-console-consumer.sh.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use runnel_client::{Client, Consumer, ConsumerConfig, StartFrom};

#[derive(Args)]
pub struct ConsumeArgs {
    topic: String,
    /// Start at the earliest offset instead of only new records.
    #[arg(long, conflicts_with_all = ["offset", "from_timestamp"])]
    from_beginning: bool,
    /// Start at this offset (needs --partition).
    #[arg(long, requires = "partition", conflicts_with = "from_timestamp")]
    offset: Option<i64>,
    /// Start at the first record with a timestamp >= T (ms since the Unix epoch).
    #[arg(long)]
    from_timestamp: Option<i64>,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Print each record's key before its value.
    #[arg(long)]
    print_key: bool,
    /// What goes between key and value (and after the offset).
    #[arg(long, default_value = "\t")]
    key_separator: String,
    /// Print partition and offset before each record.
    #[arg(long)]
    print_offset: bool,
    /// Exit after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Exit when no record arrives for this long.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

pub async fn run(client: Client, args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let start = match (args.from_beginning, args.offset, args.from_timestamp) {
        (true, _, _) => StartFrom::Earliest,
        (_, Some(offset), _) => StartFrom::Offset(offset),
        (_, _, Some(ts)) => StartFrom::Timestamp(ts),
        _ => StartFrom::Latest,
    };
    let mut config = ConsumerConfig {
        auto_offset_reset: None,
        ..ConsumerConfig::default()
    };
    if let Some(timeout) = args.timeout_ms {
        config.max_wait = Duration::from_millis(timeout.clamp(1, 500));
    }
    let mut consumer = Consumer::new(client, config);
    consumer
        .assign(&args.topic, args.partition.map(|p| vec![p]), start)
        .await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut last_record = Instant::now();
    let render = |bytes: &Option<bytes::Bytes>| match bytes {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "null".to_string(),
    };
    loop {
        if args.max_messages.is_some_and(|max| printed >= max) {
            break;
        }
        if args
            .timeout_ms
            .is_some_and(|t| last_record.elapsed() >= Duration::from_millis(t))
        {
            break;
        }
        let records = consumer.poll().await?;
        if !records.is_empty() {
            last_record = Instant::now();
        }
        for record in records {
            if args.max_messages.is_some_and(|max| printed >= max) {
                break;
            }
            if args.print_offset {
                write!(
                    out,
                    "Partition:{}\tOffset:{}{}",
                    record.partition, record.offset, args.key_separator
                )?;
            }
            if args.print_key {
                write!(out, "{}{}", render(&record.key), args.key_separator)?;
            }
            writeln!(out, "{}", render(&record.value))?;
            printed += 1;
        }
        out.flush()?;
    }
    eprintln!("Processed a total of {printed} messages");
    Ok(ExitCode::SUCCESS)
}
