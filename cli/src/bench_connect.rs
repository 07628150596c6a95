//! `runnel bench connect`: throughput of the shipped file source (file -> topic) and
//! file sink (topic -> file), run by an in-process connect worker against the brokers.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use runnel_client::{Admin, Client, Consumer, ConsumerConfig, StartFrom};
use runnel_connect::spec;
use runnel_connect::worker::{Components, Worker};

#[derive(Args)]
pub struct ConnectBench {
    /// Lines in the file.
    #[arg(long, default_value_t = 2_000_000)]
    lines: u64,
    /// Bytes per line, newline included.
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    /// Records per connector call.
    #[arg(long, default_value_t = 10_000)]
    batch_records: u32,
    /// Let the sink sync each batch to disk before committing (the default for users).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
}

async fn end_offset(client: &Client, topic: &str) -> anyhow::Result<i64> {
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign(topic, None, StartFrom::Latest).await?;
    Ok(consumer.end_offsets().await?.values().sum())
}

fn report(what: &str, lines: u64, bytes: u64, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "{what}: {lines} lines in {:.2} s = {:.0} lines/s ({:.1} MiB/s)",
        secs,
        lines as f64 / secs,
        bytes as f64 / secs / (1024.0 * 1024.0)
    );
}

pub async fn run(
    target: &crate::Target,
    client: Client,
    args: ConnectBench,
) -> anyhow::Result<ExitCode> {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("runnel-bench-connect-{id}"));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let input = dir.join("in.log");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&input)?);
        let pad = "x".repeat(args.line_bytes.saturating_sub(12).max(1));
        for i in 0..args.lines {
            writeln!(file, "{i:>10} {pad}")?;
        }
        file.flush()?;
    }
    let bytes = std::fs::metadata(&input)?.len();
    let topic = format!("bench-connect-{id}");
    let admin = Admin::new(client.clone());
    admin
        .create_topic(&topic, Some(1), Some(1), HashMap::new())
        .await?;
    let worker = Worker::new(None)?;
    worker.connect_to(target.brokers.clone(), target.options());
    let start = |yaml: String, file: &str| -> anyhow::Result<_> {
        let spec = spec::parse(&dir.join(file).display().to_string(), &yaml)?;
        let components = Components::load(&spec)?;
        Ok((spec, yaml, components))
    };

    println!(
        "file source: {} lines of {} bytes into {topic} (batches of {})",
        args.lines, args.line_bytes, args.batch_records
    );
    let (spec, yaml, components) = start(
        format!(
            "name: bench-source-{id}\nkind: source\nconnector: file-source\ntopic: {topic}\nbatch-records: {}\nconfig:\n  path: {}\ncapabilities:\n  dirs: [{{ path: {}, mode: read }}]\n",
            args.batch_records,
            input.display(),
            dir.display()
        ),
        "source.yaml",
    )?;
    let began = Instant::now();
    worker.create(spec, yaml, components).await?;
    let target = i64::try_from(args.lines)?;
    loop {
        if end_offset(&client, &topic).await? >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report("file source -> topic", args.lines, bytes, began.elapsed());
    worker.delete(&format!("bench-source-{id}")).await?;

    let output = dir.join("out.log");
    let (spec, yaml, components) = start(
        format!(
            "name: bench-sink-{id}\nkind: sink\nconnector: file-sink\ntopic: {topic}\nbatch-records: {}\nconfig:\n  path: {}\n  fsync: {}\ncapabilities:\n  dirs: [{{ path: {}, mode: read-write }}]\n",
            args.batch_records,
            output.display(),
            args.fsync,
            dir.display()
        ),
        "sink.yaml",
    )?;
    let began = Instant::now();
    worker.create(spec, yaml, components).await?;
    loop {
        if std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0) >= bytes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(
        &format!("topic -> file sink (fsync {})", args.fsync),
        args.lines,
        bytes,
        began.elapsed(),
    );
    let same = std::fs::read(&input)? == std::fs::read(&output)?;
    worker.shutdown().await;
    admin.delete_topic(&topic).await?;
    std::fs::remove_dir_all(&dir)?;
    if !same {
        anyhow::bail!("the sink's file differs from the source's");
    }
    println!("the sink's file is byte-identical to the source's");
    Ok(ExitCode::SUCCESS)
}
