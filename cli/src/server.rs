//! `runnel dev` and `runnel broker start`: run a broker in this process.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use runnel_broker::{BrokerConfig, config::DEFAULT_LISTEN};

#[derive(Args)]
pub struct DevArgs {
    /// Where the data lives.
    #[arg(long, default_value = "runnel-data")]
    data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
}

#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Start a broker from a config file and flags (flags win).
    Start(StartArgs),
}

#[derive(Args)]
pub struct StartArgs {
    /// TOML config file (see the README for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    node_id: Option<u32>,
    /// Address clients should use to reach this broker.
    #[arg(long)]
    advertised_address: Option<String>,
    /// Create unknown topics on first produce.
    #[arg(long)]
    auto_create_topics: bool,
    /// The controller quorum's voters, ID@HOST:PORT[,ID@HOST:PORT...] (KRaft's
    /// controller.quorum.voters). Unset: this node alone.
    #[arg(long)]
    controller_quorum: Option<String>,
    /// What this node runs: broker, controller, or broker,controller (the default).
    #[arg(long, value_delimiter = ',')]
    process_roles: Option<Vec<runnel_broker::config::ProcessRole>>,
    /// A broker silent this long is fenced and its partitions' leadership moves.
    #[arg(long)]
    broker_session_timeout_ms: Option<u64>,
    #[arg(long)]
    broker_heartbeat_interval_ms: Option<u64>,
}

pub async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let mut config = BrokerConfig::new(&args.data_dir);
    config.listen = args.listen;
    serve(config, "Runnel dev").await
}

pub async fn broker(command: BrokerCommand) -> anyhow::Result<ExitCode> {
    let BrokerCommand::Start(args) = command;
    let mut config = match (&args.config, &args.data_dir) {
        (Some(path), _) => BrokerConfig::from_file(path)?,
        (None, Some(dir)) => BrokerConfig::new(dir),
        (None, None) => {
            anyhow::bail!("give a config file (--config FILE) or at least --data-dir DIR")
        }
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if args.advertised_address.is_some() {
        config.advertised_address = args.advertised_address;
    }
    config.auto_create_topics |= args.auto_create_topics;
    if args.controller_quorum.is_some() {
        config.controller_quorum = args.controller_quorum;
    }
    if let Some(roles) = args.process_roles {
        config.process_roles = roles;
    }
    if let Some(ms) = args.broker_session_timeout_ms {
        config.broker_session_timeout_ms = ms;
    }
    if let Some(ms) = args.broker_heartbeat_interval_ms {
        config.broker_heartbeat_interval_ms = ms;
    }
    serve(config, "Runnel broker").await
}

async fn serve(config: BrokerConfig, what: &str) -> anyhow::Result<ExitCode> {
    let data_dir = config.data_dir.clone();
    // Before anything reads or writes the directory: one process at a time.
    let _data_dir_lock = runnel_broker::DataDirLock::acquire(&data_dir)?;
    // The streams runtime lives in the broker process and reaches the broker as a client.
    let runtime = runnel_streams::Runtime::new(&data_dir)?;
    // So is the connect runtime, for connectors created with `runnel connector create`.
    let worker = runnel_connect::Worker::new(Some(&data_dir))?;
    let service_runtime = runtime.clone();
    let service_worker = worker.clone();
    let mut running = runnel_broker::start_with(config, move |addr, routes| {
        service_runtime.connect_to(vec![addr.to_string()]);
        service_worker.connect_to(vec![addr.to_string()]);
        routes
            .add_service(runnel_streams::Service::server(service_runtime))
            .add_service(runnel_connect::service::Service::server(service_worker))
    })
    .await?;
    runtime.resume_saved().await?;
    worker.resume_saved().await?;
    let data_dir = std::fs::canonicalize(&data_dir).unwrap_or(data_dir);
    // A closed stdout (the launcher stopped reading) must not take the server down.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{what} listening on {} (data in {})\nTry: runnel --brokers {} topic create hello\nStop with Ctrl-C.",
        running.local_addr,
        data_dir.display(),
        running.local_addr
    );
    let _ = out.flush();
    let stop = shutdown_signal();
    tokio::select! {
        result = running.wait() => {
            result.context("the server stopped")?;
            return Ok(ExitCode::FAILURE);
        }
        signal = stop => signal?,
    }
    tracing::info!("shutting down");
    // Connectors and transforms commit what was acknowledged while the broker still serves.
    worker.shutdown().await;
    runtime.shutdown().await;
    running.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}
