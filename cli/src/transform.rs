//! `runnel transform ...`: deploy and manage Wasm transforms, or test one offline.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use runnel_client::{Admin, v1};
use runnel_streams::spec;

use crate::parse_key_value;

#[derive(Subcommand)]
pub enum TransformCommand {
    /// Deploy a transform from a YAML file or from flags; deploying an existing name
    /// replaces it, continuing from its committed position.
    Deploy(Box<DeployArgs>),
    /// Deployments with their state, lag, records in and out, and errors.
    List,
    /// One deployment in detail.
    Describe {
        name: String,
        /// While tasks restore their state, show a progress bar until every task runs.
        #[arg(long)]
        watch: bool,
    },
    /// Stop reading until resumed (the position is kept).
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Stop and remove a deployment. Its committed position and (stateful) its state
    /// stay, so a new deployment of the name continues; --delete-state deletes both. On
    /// a terminal, removing a stateful deployment without either flag asks.
    Remove {
        name: String,
        /// Also delete the state: changelog topics, every broker's local stores, and
        /// the committed input offsets.
        #[arg(long, conflicts_with = "keep_state")]
        delete_state: bool,
        /// Keep the state and the committed input offsets without asking.
        #[arg(long)]
        keep_state: bool,
    },
    /// Read a stateful deployment's store (committed state): one key, or a key range.
    State(StateArgs),
    /// The deployment's recent log: the guest's own lines and the runtime's.
    Logs {
        name: String,
    },
    /// Run a component on sample records, without a broker.
    Test(TestArgs),
}

#[derive(Args)]
pub struct DeployArgs {
    /// A deployment file (YAML); flags below are then not needed.
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    #[arg(long, required_unless_present = "file")]
    input: Option<String>,
    /// Output topic; repeatable. The first is the default output.
    #[arg(long = "output", required_unless_present = "file")]
    outputs: Vec<String>,
    /// The compiled component (`cargo build --target wasm32-wasip2`).
    #[arg(long, required_unless_present = "file")]
    wasm: Option<PathBuf>,
    /// Config value passed to the transform's init, KEY=VALUE; repeatable.
    #[arg(long = "config", value_parser = parse_key_value)]
    configs: Vec<(String, String)>,
    /// fail, skip or dead-letter.
    #[arg(long, default_value = "fail")]
    error_policy: String,
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// earliest, latest, offset:N or timestamp:MS (for a new deployment).
    #[arg(long, default_value = "earliest")]
    start: String,
    #[arg(long)]
    memory_limit_mb: Option<u64>,
    #[arg(long)]
    cpu_limit_ms: Option<u32>,
    /// at-least-once, or exactly-once: output and input offsets commit in one
    /// transaction every --commit-interval-ms (read the outputs with
    /// `--isolation read_committed`).
    #[arg(long, default_value = "at-least-once")]
    processing: String,
    /// How often the open transaction commits (exactly-once), or the input offsets of
    /// acknowledged output (at-least-once); default 100 ms.
    #[arg(long)]
    commit_interval_ms: Option<u32>,
    /// A state store of a stateful (runnel:transform@0.2.0) component; repeatable, in
    /// the order the component names them.
    #[arg(long = "store")]
    stores: Vec<String>,
    /// A read-only store kept from a compacted topic partitioned like the input,
    /// STORE=TOPIC; repeatable (a stream-table join).
    #[arg(long = "table", value_parser = parse_key_value)]
    tables: Vec<(String, String)>,
    /// The watermark is the largest timestamp seen minus this (event-time timers and
    /// windows wait for late records this long).
    #[arg(long, default_value_t = 0)]
    allowed_lateness_ms: i64,
    /// Brokers besides a task's own that keep a warm copy of its stores (following the
    /// changelogs), so that a task moved by a failure resumes without a full restore.
    #[arg(long, default_value_t = 0)]
    standby_replicas: u32,
    /// The principal the tasks act as (`User:NAME`): their reads, writes and commits are
    /// checked against its ACLs. Default: the cluster's rights, checked against yours
    /// at deploy time.
    #[arg(long)]
    principal: Option<String>,
}

#[derive(Args)]
pub struct StateArgs {
    name: String,
    #[arg(long)]
    store: String,
    /// One key (text).
    #[arg(long, conflicts_with_all = ["from", "to"])]
    key: Option<String>,
    /// With --to, or alone: keys from this one on (text; default: the first).
    #[arg(long)]
    from: Option<String>,
    /// Keys below this one (text; default: no bound).
    #[arg(long)]
    to: Option<String>,
    /// At most this many entries.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

#[derive(Args)]
pub struct TestArgs {
    /// The compiled component.
    #[arg(long)]
    wasm: PathBuf,
    /// JSON lines: {"key": .., "value": .., "headers": {..}, "timestamp": ..}.
    #[arg(long)]
    input: PathBuf,
    /// Config value, KEY=VALUE; repeatable.
    #[arg(long = "config", value_parser = parse_key_value)]
    configs: Vec<(String, String)>,
    /// Output topic names the transform may emit to; repeatable.
    #[arg(long = "output", default_value = "output")]
    outputs: Vec<String>,
    /// A state store of a stateful component; repeatable. Each record is then its own
    /// batch, and timers fire after each record as they would on a broker.
    #[arg(long = "store")]
    stores: Vec<String>,
    /// The watermark is the largest timestamp seen minus this.
    #[arg(long, default_value_t = 0)]
    allowed_lateness_ms: i64,
    /// A table store and its rows, STORE=FILE; repeatable. FILE holds JSON lines
    /// {"key": .., "value": .., "partition": 0}, loaded before the first record as if
    /// read from the table's topic (a null value deletes the key).
    #[arg(long = "table", value_parser = parse_key_value)]
    tables: Vec<(String, String)>,
}

fn read_wasm(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "reading the component {}; build it with `cargo build --release --target wasm32-wasip2`",
            path.display()
        )
    })
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let wasm = read_wasm(&args.wasm)?;
    let input = std::fs::read_to_string(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    let mut tables = Vec::with_capacity(args.tables.len());
    for (store, file) in args.tables {
        let rows = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the rows of table {store:?} from {file}"))?;
        tables.push((store, rows));
    }
    let state = runnel_streams::harness::StateOptions {
        stores: args.stores,
        allowed_lateness_ms: args.allowed_lateness_ms,
        tables,
    };
    for line in runnel_streams::harness::run(&wasm, &input, &args.configs, &args.outputs, &state)? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The brokers running a transform, "1,2,3", or "-".
fn broker_list(brokers: &[u32]) -> String {
    if brokers.is_empty() {
        return "-".into();
    }
    brokers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn print_status(s: &v1::TransformStatus) {
    let spec = s.spec.clone().unwrap_or_default();
    println!("Transform:   {} (version {})", spec.name, s.version);
    println!(
        "State:       {}{}",
        s.state,
        if s.error.is_empty() {
            String::new()
        } else {
            format!(": {}", s.error)
        }
    );
    println!("Brokers:     {}", broker_list(&s.brokers));
    println!("Input:       {}", spec.input_topic);
    println!("Outputs:     {}", spec.output_topics.join(", "));
    let policy = v1::ErrorPolicy::try_from(spec.error_policy).unwrap_or(v1::ErrorPolicy::Fail);
    let dlq = if spec.dead_letter_topic.is_empty() {
        String::new()
    } else {
        format!(" -> {}", spec.dead_letter_topic)
    };
    println!("Errors:      {}{dlq}", spec::policy_name(policy));
    let processing =
        v1::Processing::try_from(spec.processing).unwrap_or(v1::Processing::AtLeastOnce);
    let interval = match spec.commit_interval_ms {
        0 => runnel_streams::runtime::COMMIT_INTERVAL_MS_DEFAULT,
        ms => u64::from(ms),
    };
    match processing {
        v1::Processing::ExactlyOnce => {
            println!("Processing:  exactly-once (commit every {interval} ms)")
        }
        v1::Processing::AtLeastOnce => {
            println!("Processing:  at-least-once (commit every {interval} ms)")
        }
    }
    println!("Start:       {}", spec.start);
    let mut config: Vec<String> = spec
        .config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    config.sort();
    println!(
        "Config:      {}",
        if config.is_empty() {
            "none".into()
        } else {
            config.join(",")
        }
    );
    println!(
        "Records:     {} in, {} out, {} errors",
        s.records_in, s.records_out, s.record_errors
    );
    println!(
        "Lag:         {}",
        if s.lag < 0 {
            "-".into()
        } else {
            s.lag.to_string()
        }
    );
    println!("Component:   sha256 {}", s.wasm_sha256);
    if !spec.principal.is_empty() {
        println!("Principal:   {}", spec.principal);
    }
    if !spec.stores.is_empty() || !spec.tables.is_empty() || !s.tasks.is_empty() {
        println!(
            "Stores:      {} (allowed lateness {} ms)",
            if spec.stores.is_empty() {
                "none".to_string()
            } else {
                spec.stores.join(", ")
            },
            spec.allowed_lateness_ms
        );
        let mut tables: Vec<String> = spec
            .tables
            .iter()
            .map(|(store, topic)| format!("{store} <- {topic}"))
            .collect();
        tables.sort();
        if !tables.is_empty() {
            println!("Tables:      {}", tables.join(", "));
        }
        if spec.standby_replicas > 0 {
            println!(
                "Standbys:    {} per task (warm copies on other brokers)",
                spec.standby_replicas
            );
        }
        let mut tasks = s.tasks.clone();
        tasks.sort_by_key(|t| t.partition);
        for t in tasks {
            if t.state == "Restoring" {
                println!(
                    "  task {}: broker {}, restoring {}/{} changelog records",
                    t.partition, t.broker, t.restored, t.restore_total
                );
            } else if t.state == "Standby" && t.restored < t.restore_total {
                println!(
                    "  task {}: broker {}, standby catching up {}/{} changelog records",
                    t.partition, t.broker, t.restored, t.restore_total
                );
            } else if t.state == "Standby" {
                println!(
                    "  task {}: broker {}, standby (following the changelogs)",
                    t.partition, t.broker
                );
            } else {
                println!(
                    "  task {}: broker {}, {}",
                    t.partition,
                    t.broker,
                    t.state.to_lowercase()
                );
            }
        }
    }
}

/// Shows the tasks' restore progress (changelog records replayed of those to replay)
/// until no task restores.
async fn watch_restores(admin: &Admin, name: &str) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "restoring {msg} {bar:40} {pos}/{len} records {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let status = admin.describe_transform(name).await?;
        let restoring: Vec<&v1::TaskStatus> = status
            .tasks
            .iter()
            .filter(|t| t.state == "Restoring")
            .collect();
        if restoring.is_empty() {
            bar.finish_and_clear();
            println!("Every task of {name} runs ({} tasks).", status.tasks.len());
            return Ok(());
        }
        bar.set_length(restoring.iter().map(|t| t.restore_total).sum());
        bar.set_position(restoring.iter().map(|t| t.restored).sum());
        bar.set_message(format!("{} tasks", restoring.len()));
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Runs a transform command; only `test` works without a broker.
pub async fn run(target: &crate::Target, command: TransformCommand) -> anyhow::Result<ExitCode> {
    if let TransformCommand::Test(args) = command {
        return test(args);
    }
    let admin = Admin::new(target.client().await?);
    match command {
        TransformCommand::Deploy(args) => {
            let (spec, wasm_path) = match &args.file {
                Some(file) => spec::TransformFile::load(file)?,
                None => {
                    let policy = spec::parse_policy(&args.error_policy)?;
                    let processing = spec::parse_processing(&args.processing)?;
                    let spec = v1::TransformSpec {
                        name: args.name.unwrap_or_default(),
                        input_topic: args.input.unwrap_or_default(),
                        output_topics: args.outputs,
                        config: args.configs.into_iter().collect(),
                        error_policy: policy as i32,
                        dead_letter_topic: args.dead_letter_topic.unwrap_or_default(),
                        start: args.start,
                        memory_limit_bytes: args.memory_limit_mb.unwrap_or(0) * 1024 * 1024,
                        cpu_limit_ms: args.cpu_limit_ms.unwrap_or(0),
                        processing: processing as i32,
                        commit_interval_ms: args.commit_interval_ms.unwrap_or(0),
                        stores: args.stores,
                        tables: args.tables.into_iter().collect(),
                        allowed_lateness_ms: args.allowed_lateness_ms,
                        standby_replicas: args.standby_replicas,
                        principal: args.principal.unwrap_or_default(),
                    };
                    spec::validate(&spec)?;
                    (spec, args.wasm.unwrap_or_default())
                }
            };
            let wasm = read_wasm(&wasm_path)?;
            let status = admin.deploy_transform(spec, wasm).await?;
            println!(
                "Deployed transform {} (version {}, {} on brokers {}).",
                status.spec.as_ref().map_or("", |s| s.name.as_str()),
                status.version,
                status.state,
                broker_list(&status.brokers)
            );
        }
        TransformCommand::List => {
            println!(
                "{:<20} {:<8} {:>7} {:<10} {:<16} {:<24} {:>8} {:>10} {:>10} {:>7}",
                "NAME",
                "STATE",
                "VERSION",
                "BROKERS",
                "INPUT",
                "OUTPUTS",
                "LAG",
                "IN",
                "OUT",
                "ERRORS"
            );
            for s in admin.list_transforms().await? {
                let spec = s.spec.clone().unwrap_or_default();
                println!(
                    "{:<20} {:<8} {:>7} {:<10} {:<16} {:<24} {:>8} {:>10} {:>10} {:>7}",
                    spec.name,
                    s.state,
                    s.version,
                    broker_list(&s.brokers),
                    spec.input_topic,
                    spec.output_topics.join(","),
                    if s.lag < 0 {
                        "-".into()
                    } else {
                        s.lag.to_string()
                    },
                    s.records_in,
                    s.records_out,
                    s.record_errors
                );
            }
        }
        TransformCommand::Describe { name, watch } => {
            let status = admin.describe_transform(&name).await?;
            print_status(&status);
            if watch {
                watch_restores(&admin, &name).await?;
            }
        }
        TransformCommand::Pause { name } => {
            admin.pause_transform(&name, true).await?;
            println!("Paused transform {name}.");
        }
        TransformCommand::Resume { name } => {
            admin.pause_transform(&name, false).await?;
            println!("Resumed transform {name}.");
        }
        TransformCommand::Remove {
            name,
            delete_state,
            keep_state,
        } => {
            let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
            let delete_state = if delete_state || keep_state || !interactive {
                delete_state
            } else {
                let spec = admin
                    .describe_transform(&name)
                    .await?
                    .spec
                    .unwrap_or_default();
                !spec.stores.is_empty()
                    && confirm(
                        &state_question(&spec),
                        std::io::stdin().lock(),
                        std::io::stderr(),
                    )?
            };
            admin.remove_transform(&name, delete_state).await?;
            if delete_state {
                println!("Removed transform {name} and deleted its state and committed offsets.");
            } else {
                println!(
                    "Removed transform {name} (its state and committed offsets are kept; --delete-state deletes them)."
                );
            }
        }
        TransformCommand::State(args) => {
            let query = v1::StateQuery {
                name: args.name,
                store: args.store,
                key: args.key.map(|k| k.into_bytes().into()),
                from: args.from.map(|f| f.into_bytes().into()).unwrap_or_default(),
                to: args.to.map(|t| t.into_bytes().into()),
                limit: args.limit,
                local: false,
            };
            let single = query.key.is_some();
            let entries = admin.query_state(query).await?;
            if single && entries.is_empty() {
                println!("(no value)");
            }
            for entry in entries {
                if single {
                    println!("{}", String::from_utf8_lossy(&entry.value));
                } else {
                    println!(
                        "{}\t{}",
                        String::from_utf8_lossy(&entry.key),
                        String::from_utf8_lossy(&entry.value)
                    );
                }
            }
        }
        TransformCommand::Logs { name } => {
            for line in admin.transform_logs(&name).await? {
                println!("{line}");
            }
        }
        TransformCommand::Test(args) => return test(args),
    }
    Ok(ExitCode::SUCCESS)
}

/// What removing a stateful deployment asks on a terminal.
fn state_question(spec: &v1::TransformSpec) -> String {
    let changelogs: Vec<String> = spec
        .stores
        .iter()
        .map(String::as_str)
        .chain([runnel_streams::state::INTERNAL_STORE])
        .map(|store| runnel_streams::state::changelog_topic(&spec.name, store))
        .collect();
    format!(
        "Transform {} keeps state: stores {} (changelogs {}), its local stores on every broker and its committed input offsets.\nDelete them too? A new deployment of the name then starts from nothing. [y/N] ",
        spec.name,
        spec.stores.join(", "),
        changelogs.join(", ")
    )
}

/// Asks `question` on `output` and reads the answer from `input`: yes only for `y` or
/// `yes` (any case); no for anything else, an empty line and the end of the input.
fn confirm(
    question: &str,
    mut input: impl std::io::BufRead,
    mut output: impl std::io::Write,
) -> std::io::Result<bool> {
    output.write_all(question.as_bytes())?;
    output.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_yes_confirms() {
        for (answer, yes) in [
            ("y\n", true),
            ("YES\n", true),
            (" yes \n", true),
            ("\n", false),
            ("n\n", false),
            ("sure\n", false),
            ("", false),
        ] {
            let mut asked = Vec::new();
            let confirmed = confirm("Delete? ", answer.as_bytes(), &mut asked).expect("io");
            assert_eq!(confirmed, yes, "{answer:?}");
            assert_eq!(asked, b"Delete? ");
        }
    }
}
