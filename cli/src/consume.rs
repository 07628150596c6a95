//! `runnel consume`: kafka-console-consumer.sh.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use runnel_client::v1::IsolationLevel;
use runnel_client::{
    Client, Consumer, ConsumerConfig, ConsumerRecord, GroupConfig, GroupConsumer, StartFrom,
};

#[derive(Args)]
pub struct ConsumeArgs {
    topic: String,
    /// Start at the earliest offset instead of only new records (with --group: when the
    /// group has no committed offset).
    #[arg(long, conflicts_with_all = ["offset", "from_timestamp"])]
    from_beginning: bool,
    /// Start at this offset (needs --partition).
    #[arg(long, requires = "partition", conflicts_with_all = ["from_timestamp", "group"])]
    offset: Option<i64>,
    /// Start at the first record with a timestamp >= T (ms since the Unix epoch).
    #[arg(long, conflicts_with = "group")]
    from_timestamp: Option<i64>,
    /// Read only this partition (default: all).
    #[arg(long, conflicts_with = "group")]
    partition: Option<u32>,
    /// Consume as a member of this consumer group: share the partitions with the other
    /// members and commit offsets to the group.
    #[arg(long)]
    group: Option<String>,
    /// With --group: how long the broker waits for a silent member before reassigning its
    /// partitions.
    #[arg(long, default_value_t = 10_000, requires = "group")]
    session_timeout_ms: u64,
    /// Print each record's key before its value.
    #[arg(long)]
    print_key: bool,
    /// What goes between key and value (and after the offset).
    #[arg(long, default_value = "\t")]
    key_separator: String,
    /// Print partition and offset before each record.
    #[arg(long)]
    print_offset: bool,
    /// Print each record's headers (`name=value,...`) before its key and value.
    #[arg(long)]
    print_headers: bool,
    /// Exit after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Exit when no record arrives for this long.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// read_uncommitted (everything written) or read_committed (only what committed
    /// transactions and non-transactional producers wrote, up to the last stable offset).
    #[arg(long, default_value = "read_uncommitted", value_parser = parse_isolation)]
    isolation: IsolationLevel,
}

pub fn parse_isolation(input: &str) -> Result<IsolationLevel, String> {
    match input {
        "read_uncommitted" => Ok(IsolationLevel::ReadUncommitted),
        "read_committed" => Ok(IsolationLevel::ReadCommitted),
        other => Err(format!(
            "isolation must be read_uncommitted or read_committed, not {other:?}"
        )),
    }
}

/// Where records come from: assigned partitions, or a group membership.
enum Source {
    Assigned(Consumer),
    Group(Box<GroupConsumer>),
}

impl Source {
    async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, runnel_client::ClientError> {
        match self {
            Source::Assigned(consumer) => consumer.poll().await,
            Source::Group(member) => member.poll().await,
        }
    }
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
        isolation: args.isolation,
        ..ConsumerConfig::default()
    };
    if let Some(timeout) = args.timeout_ms {
        config.max_wait = Duration::from_millis(timeout.clamp(1, 500));
    }
    let mut source = match &args.group {
        Some(group) => {
            let group_config = GroupConfig {
                client_id: format!("runnel-consume-{}", std::process::id()),
                session_timeout: Duration::from_millis(args.session_timeout_ms),
                // The CLI commits exactly what it printed, below.
                auto_commit_interval: None,
                commit_on_revoke: true,
                auto_offset_reset: start,
                consumer: ConsumerConfig {
                    auto_offset_reset: Some(start),
                    ..config
                },
                standby_replicas: 0,
            };
            let member = GroupConsumer::join(
                client,
                group,
                std::slice::from_ref(&args.topic),
                group_config,
            )
            .await?;
            Source::Group(Box::new(member))
        }
        None => {
            let mut consumer = Consumer::new(client, config);
            consumer
                .assign(&args.topic, args.partition.map(|p| vec![p]), start)
                .await?;
            Source::Assigned(consumer)
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut last_record = Instant::now();
    let mut last_commit = Instant::now();
    let mut said_idle = false;
    // Next offset to commit per partition: just past the last record printed.
    let mut done: std::collections::BTreeMap<(String, u32), i64> = Default::default();
    let render = |bytes: &Option<bytes::Bytes>| match bytes {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "null".to_string(),
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
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
        let records = tokio::select! {
            records = source.poll() => records?,
            _ = &mut interrupted => break,
        };
        if !records.is_empty() {
            last_record = Instant::now();
        }
        let mut shown = 0;
        for record in &records {
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
            if args.print_headers {
                let headers: Vec<String> = record
                    .headers
                    .iter()
                    .map(|h| format!("{}={}", h.key, render(&h.value)))
                    .collect();
                write!(out, "{}{}", headers.join(","), args.key_separator)?;
            }
            if args.print_key {
                write!(out, "{}{}", render(&record.key), args.key_separator)?;
            }
            writeln!(out, "{}", render(&record.value))?;
            printed += 1;
            shown += 1;
        }
        done.extend(runnel_client::next_offsets(&records[..shown]));
        out.flush()?;
        if let Source::Group(member) = &mut source {
            if !said_idle && member.assignment().is_empty() && member.heartbeats() >= 3 {
                eprintln!(
                    "This member of group {:?} has no partitions: the group has at least as many members as {} has partitions. Waiting for one to free up.",
                    args.group.as_deref().unwrap_or_default(),
                    args.topic
                );
                said_idle = true;
            }
            if last_commit.elapsed() >= Duration::from_secs(1) && !done.is_empty() {
                commit_printed(member, &mut done).await?;
                last_commit = Instant::now();
            }
        }
    }
    if let Source::Group(mut member) = source {
        let committed = commit_printed(&mut member, &mut done).await;
        member.leave().await;
        committed?;
    }
    eprintln!("Processed a total of {printed} messages");
    Ok(ExitCode::SUCCESS)
}

/// Commits the offsets after the printed records of partitions this member still owns.
async fn commit_printed(
    member: &mut GroupConsumer,
    done: &mut std::collections::BTreeMap<(String, u32), i64>,
) -> Result<(), runnel_client::ClientError> {
    let owned: std::collections::BTreeSet<(String, u32)> =
        member.assignment().into_iter().collect();
    let offsets = std::mem::take(done)
        .into_iter()
        .filter(|(tp, _)| owned.contains(tp))
        .collect();
    member.commit_offsets(offsets).await
}
