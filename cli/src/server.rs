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
    /// Where Prometheus scrapes /metrics (HOST:PORT, or off). Default: the listen host
    /// on port 9644 (9644 + i for broker i+1 of --brokers N; a free port when the listen
    /// port is 0).
    #[arg(long)]
    metrics_listen: Option<String>,
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
    /// A follower that has not caught up for this long leaves the ISR.
    #[arg(long)]
    replica_lag_time_max_ms: Option<u64>,
    /// Replication factor of topics created without one.
    #[arg(long)]
    default_replication_factor: Option<u32>,
    /// Let an out-of-sync replica lead a partition whose whole ISR is down, losing
    /// what it lacks (topics may override it with unclean.leader.election.enable).
    #[arg(long)]
    unclean_leader_election_enable: bool,
    /// How often the active controller gives partitions back to their preferred
    /// replicas once those are in sync again; 0 turns that off.
    #[arg(long)]
    leader_imbalance_check_interval_ms: Option<u64>,
    /// Where Prometheus scrapes /metrics: HOST:PORT, or off. Default: the listen host
    /// on port 9644 (a free port when the listen port is 0).
    #[arg(long)]
    metrics_listen: Option<String>,
}

/// Most nodes `runnel dev --brokers N` starts.
const DEV_BROKERS_MAX: u32 = 9;

/// `runnel dev`: one node, or with `--brokers N` a local cluster of N nodes (each a
/// controller voter and a broker) with data under `DIR/node-ID` and consecutive ports.
pub async fn dev(args: DevArgs, brokers: &[String]) -> anyhow::Result<ExitCode> {
    let count = match brokers {
        [one] => one.trim().parse::<u32>().ok(),
        _ => None,
    };
    let Some(count) = count.filter(|n| *n > 1) else {
        let mut config = BrokerConfig::new(&args.data_dir);
        config.listen = args.listen;
        config.metrics_listen = args.metrics_listen;
        return serve(vec![config], "Runnel dev").await;
    };
    if count > DEV_BROKERS_MAX {
        anyhow::bail!("runnel dev starts at most {DEV_BROKERS_MAX} brokers ({count} asked)");
    }
    let mut listens = Vec::new();
    for i in 0..count {
        let mut listen = args.listen;
        if listen.port() == 0 {
            // Voters must know each other's addresses before they start.
            listen = std::net::TcpListener::bind(listen)?.local_addr()?;
        } else {
            let port = listen
                .port()
                .checked_add(i as u16)
                .with_context(|| format!("port {} + {i} is beyond 65535", args.listen.port()))?;
            listen.set_port(port);
        }
        listens.push(listen);
    }
    let quorum = listens
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{}@{l}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let configs = listens
        .iter()
        .enumerate()
        .map(|(i, listen)| {
            let mut config = BrokerConfig::new(args.data_dir.join(format!("node-{}", i + 1)));
            config.node_id = i as u32 + 1;
            config.listen = *listen;
            config.controller_quorum = Some(quorum.clone());
            // A local cluster is for trying failover: topics are replicated by default.
            config.default_replication_factor = count.min(3);
            config.metrics_listen = match &args.metrics_listen {
                Some(text) if text.trim() == "off" => Some("off".into()),
                Some(text) => Some(next_port(text, i as u32)?),
                None if listen.port() == 0 => None,
                None => Some(format!(
                    "{}:{}",
                    listen.ip(),
                    runnel_broker::config::METRICS_PORT + i as u16
                )),
            };
            Ok(config)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    serve(configs, "Runnel dev").await
}

/// `HOST:PORT` with its port moved up by `i` (port 0 stays 0).
fn next_port(address: &str, i: u32) -> anyhow::Result<String> {
    let mut parsed: SocketAddr = address.trim().parse().map_err(|_| {
        anyhow::anyhow!("--metrics-listen must be HOST:PORT or off, not {address:?}")
    })?;
    if parsed.port() != 0 {
        let port = parsed
            .port()
            .checked_add(i as u16)
            .with_context(|| format!("port {} + {i} is beyond 65535", parsed.port()))?;
        parsed.set_port(port);
    }
    Ok(parsed.to_string())
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
    if let Some(ms) = args.replica_lag_time_max_ms {
        config.replica_lag_time_max_ms = ms;
    }
    if let Some(rf) = args.default_replication_factor {
        config.default_replication_factor = rf;
    }
    config.unclean_leader_election_enable |= args.unclean_leader_election_enable;
    match args.leader_imbalance_check_interval_ms {
        Some(0) => config.auto_leader_rebalance_enable = false,
        Some(ms) => config.leader_imbalance_check_interval_ms = ms,
        None => {}
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    serve(vec![config], "Runnel broker").await
}

/// A node running in this process: the broker (and controller), and the streams and
/// connect runtimes that live beside it.
struct Node {
    running: runnel_broker::RunningBroker,
    runtime: runnel_streams::Runtime,
    worker: runnel_connect::Worker,
    store: Option<runnel_streams::store::Store>,
    data_dir: PathBuf,
    /// Where Prometheus scrapes this node, when it may.
    metrics: Option<SocketAddr>,
    _lock: runnel_broker::DataDirLock,
}

async fn start_node(config: BrokerConfig) -> anyhow::Result<Node> {
    let data_dir = config.data_dir.clone();
    let node_id = config.node_id;
    let is_broker = config.is_broker();
    // Before anything reads or writes the directory: one process at a time.
    let lock = runnel_broker::DataDirLock::acquire(&data_dir)?;
    // The streams runtime lives in the broker process and reaches the broker as a client
    // (through the broker itself for the partitions it leads).
    let runtime = runnel_streams::Runtime::new(&data_dir)?;
    // So is the connect runtime, for connectors created with `runnel connector create`.
    let worker = runnel_connect::Worker::new(Some(&data_dir))?;
    let service_runtime = runtime.clone();
    let service_worker = worker.clone();
    // The runtimes reach their broker as clients: over TLS when it serves TLS, at the
    // address its certificate names (the advertised one).
    let tls = config.client_tls()?;
    let advertised = config.advertised_address.clone();
    let own_address = std::sync::Arc::new(std::sync::OnceLock::new());
    let address_of_broker = own_address.clone();
    let runtimes_tls = tls.clone();
    let own_credentials = std::sync::Arc::new(std::sync::OnceLock::new());
    let credentials_of_broker = own_credentials.clone();
    let mut running = runnel_broker::start_with(config, move |addr, local, credentials, routes| {
        let address = match (&runtimes_tls, advertised) {
            (Some(_), Some(advertised)) => advertised,
            _ => addr.to_string(),
        };
        let _ = address_of_broker.set(address.clone());
        let _ = credentials_of_broker.set(credentials.clone());
        let options = |local| runnel_client::ConnectOptions {
            tls: runtimes_tls.clone(),
            local: Some(local),
            credentials: credentials.clone(),
        };
        service_runtime.connect_to(vec![address.clone()], options(local.clone()));
        service_worker.connect_to(vec![address], options(local));
        routes
            .add_service(runnel_streams::Service::server(service_runtime))
            .add_service(runnel_connect::service::Service::server(service_worker))
    })
    .await?;
    let store = if is_broker {
        // Both runtimes run from the cluster's deployment store, read by this broker.
        let address = own_address
            .get()
            .cloned()
            .unwrap_or_else(|| running.local_addr.to_string());
        let client = runnel_client::Client::connect_with(
            &[address],
            runnel_client::ConnectOptions {
                tls,
                local: None,
                credentials: own_credentials.get().cloned().flatten(),
            },
        )
        .await?;
        let store = runnel_streams::store::Store::open(
            client,
            &data_dir.join(runnel_streams::store::TOPIC),
        )?;
        runtime.run_from(store.clone(), node_id)?;
        worker.run_from(store.clone(), node_id)?;
        Some(store)
    } else {
        None
    };
    let (metrics_runtime, metrics_worker) = (runtime.clone(), worker.clone());
    let metrics = running
        .serve_metrics(vec![
            std::sync::Arc::new(move |out: &mut runnel_metrics::Exposition| {
                metrics_runtime.collect_metrics(out);
            }),
            std::sync::Arc::new(move |out: &mut runnel_metrics::Exposition| {
                metrics_worker.collect_metrics(out);
            }),
        ])
        .await?;
    let data_dir = std::fs::canonicalize(&data_dir).unwrap_or(data_dir);
    Ok(Node {
        running,
        runtime,
        worker,
        store,
        data_dir,
        metrics,
        _lock: lock,
    })
}

/// Starts every node concurrently (the voters of a quorum wait for each other), prints
/// where they listen, and serves until Ctrl-C or SIGTERM.
async fn serve(configs: Vec<BrokerConfig>, what: &str) -> anyhow::Result<ExitCode> {
    let mut nodes = futures::future::try_join_all(configs.into_iter().map(start_node)).await?;
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| n.running.local_addr.to_string())
        .collect();
    // A closed stdout (the launcher stopped reading) must not take the server down.
    let mut out = std::io::stdout();
    let text = match nodes.as_slice() {
        [node] => format!(
            "{what} listening on {} (data in {}){}\nTry: runnel --brokers {} topic create hello\nStop with Ctrl-C.",
            addresses[0],
            node.data_dir.display(),
            node.metrics
                .map(|m| format!("\nPrometheus metrics on http://{m}/metrics"))
                .unwrap_or_default(),
            addresses[0]
        ),
        _ => {
            let list: Vec<String> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!(
                        "  broker {} on {} (data in {}{})",
                        i + 1,
                        addresses[i],
                        n.data_dir.display(),
                        n.metrics
                            .map(|m| format!(", metrics on http://{m}/metrics"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            format!(
                "{what} listening on {} ({} brokers, each a controller voter)\n{}\nTry: runnel --brokers {} topic create hello --partitions 6\nStop with Ctrl-C.",
                addresses.join(","),
                nodes.len(),
                list.join("\n"),
                addresses.join(",")
            )
        }
    };
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    let stop = shutdown_signal();
    let stopped = futures::future::select_all(nodes.iter_mut().map(|n| Box::pin(n.running.wait())));
    tokio::select! {
        (result, _, _) = stopped => {
            result.context("the server stopped")?;
            return Ok(ExitCode::FAILURE);
        }
        signal = stop => signal?,
    }
    tracing::info!("shutting down");
    for node in nodes {
        // Connectors and transforms commit what was acknowledged while the broker still
        // serves.
        node.worker.shutdown().await;
        node.runtime.shutdown().await;
        if let Some(store) = &node.store {
            store.close();
        }
        node.running.shutdown().await?;
    }
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
