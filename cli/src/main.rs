//! `runnel`: every command a Runnel user types.
//!
//! Server commands (`dev`, `broker start`) run the broker in this process; every other
//! command talks to a running cluster through `runnel-client` only.

mod bench;
mod bench_connect;
mod connect;
mod consume;
mod group;
mod produce;
mod security;
mod server;
mod topic;
mod transaction;
mod transform;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runnel_client::{Admin, Client, ClientTls, ConnectOptions, DEFAULT_BROKERS};

/// mimalloc keeps freed memory for reuse: with the system allocator every large fetch or
/// produce buffer was fresh pages, and page faults cost the consumer a third of its time.
/// It is built without transparent huge pages (`no_thp`): with them, each 2 MiB region it
/// touched afresh was zeroed whole, 7–14 % of all CPU in a transform pipeline, under 0.5 %
/// without.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "runnel",
    version,
    about = "Runnel: a WebAssembly-extensible stream processing platform"
)]
struct Cli {
    /// Brokers to connect to, HOST:PORT[,HOST:PORT...]. With `dev`: how many brokers
    /// to start (`runnel dev --brokers 3` runs a local three-node cluster).
    #[arg(long, global = true, env = "RUNNEL_BROKERS", default_value = DEFAULT_BROKERS, value_delimiter = ',')]
    brokers: Vec<String>,
    /// Connect over TLS, trusting this CA (PEM) for the brokers' certificates.
    #[arg(long, global = true, env = "RUNNEL_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// With --tls-ca, for brokers that require mutual TLS: this client's certificate (PEM).
    #[arg(long, global = true, env = "RUNNEL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, global = true, env = "RUNNEL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Authenticate as this SCRAM user (brokers with `require_authentication`).
    #[arg(long, global = true, env = "RUNNEL_USER", requires = "password")]
    user: Option<String>,
    /// The user's password.
    #[arg(long, global = true, env = "RUNNEL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// SCRAM-SHA-256 (the default) or SCRAM-SHA-512.
    #[arg(long, global = true, env = "RUNNEL_SCRAM_MECHANISM", value_parser = security::parse_mechanism)]
    scram_mechanism: Option<runnel_client::Mechanism>,
    /// Act as the cluster itself (a super user) with the brokers' shared secret file
    /// (`auth.cluster_secret_file`): how an operator on a broker's host creates the
    /// first users and ACLs.
    #[arg(
        long,
        global = true,
        env = "RUNNEL_CLUSTER_SECRET_FILE",
        conflicts_with = "user"
    )]
    cluster_secret_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The brokers a command talks to, and how it connects to them.
#[derive(Clone)]
pub struct Target {
    pub brokers: Vec<String>,
    pub tls: Option<ClientTls>,
    pub login: Option<runnel_client::Password>,
    pub cluster_secret: Option<std::sync::Arc<runnel_client::Credentials>>,
}

impl Target {
    fn from_cli(cli: &Cli) -> anyhow::Result<Self> {
        let tls = match (&cli.tls_ca, &cli.tls_cert) {
            (Some(ca), cert) => Some(ClientTls::from_files(
                ca,
                cert.as_deref(),
                cli.tls_key.as_deref(),
            )?),
            (None, Some(_)) => anyhow::bail!(
                "--tls-cert needs --tls-ca: the CA that signed the brokers' certificates"
            ),
            (None, None) => None,
        };
        let login = match (&cli.user, &cli.password) {
            (Some(user), Some(password)) => Some(runnel_client::Password {
                user: user.clone(),
                password: password.clone(),
                mechanism: cli
                    .scram_mechanism
                    .unwrap_or(runnel_client::Mechanism::Sha256),
            }),
            (None, Some(_)) => anyhow::bail!("--password needs --user (or RUNNEL_USER)"),
            _ => None,
        };
        let cluster_secret = match &cli.cluster_secret_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    anyhow::anyhow!("reading the cluster secret {}: {err}", path.display())
                })?;
                Some(runnel_client::Credentials::cluster(&text).map_err(anyhow::Error::msg)?)
            }
            None => None,
        };
        Ok(Target {
            brokers: cli.brokers.clone(),
            tls,
            login,
            cluster_secret,
        })
    }

    pub fn options(&self) -> ConnectOptions {
        let options = ConnectOptions {
            tls: self.tls.clone(),
            credentials: self.cluster_secret.clone(),
            ..ConnectOptions::default()
        };
        match &self.login {
            Some(login) => options.with_password(login.clone()),
            None => options,
        }
    }

    /// A client of the brokers; a failure says how to fix the usual causes.
    pub async fn client(&self) -> anyhow::Result<Client> {
        match Client::connect_with(&self.brokers, self.options()).await {
            Ok(client) => Ok(client),
            Err(err) => {
                let text = err.to_string();
                let hint = match &self.tls {
                    _ if err.code() == Some(runnel_client::ErrorCode::AuthenticationRequired) => "",
                    _ if err.code() == Some(runnel_client::ErrorCode::AuthenticationFailed) => {
                        " (check --user and --password, or RUNNEL_USER and RUNNEL_PASSWORD; `runnel user set-password` changes a password)"
                    }
                    None => {
                        " (if the brokers require TLS, give --tls-ca with the CA that signed their certificates)"
                    }
                    Some(_)
                        if text.contains("UnknownIssuer")
                            || text.contains("invalid peer certificate") =>
                    {
                        " (the broker's certificate is not signed by the --tls-ca given, or not for this address)"
                    }
                    Some(tls) if !tls.has_identity() => {
                        " (if the brokers require mutual TLS, give --tls-cert and --tls-key)"
                    }
                    Some(_) => "",
                };
                Err(anyhow::anyhow!("{text}{hint}"))
            }
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start a single-node Runnel (controller and broker in one process) for development.
    Dev(server::DevArgs),
    /// Run a broker for a real deployment.
    #[command(subcommand)]
    Broker(server::BrokerCommand),
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one record per line of standard input.
    Produce(produce::ProduceArgs),
    /// Print records of a topic, one per line.
    Consume(consume::ConsumeArgs),
    /// Consumer groups: list, describe with lag, reset offsets, delete.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Transactions: list, describe, abort (also a hanging one), find hanging ones.
    #[command(subcommand)]
    Transaction(transaction::TransactionCommand),
    /// Deploy and manage Wasm transforms; test one on sample records.
    #[command(subcommand)]
    Transform(transform::TransformCommand),
    /// Run connectors from YAML files in this process (a standalone connect worker).
    #[command(subcommand)]
    Connect(connect::ConnectCommand),
    /// Create and manage connectors hosted by the broker (`runnel dev` included).
    #[command(subcommand)]
    Connector(connect::ConnectorCommand),
    /// Cluster information.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// SCRAM users: create, set-password, delete, list, whoami.
    #[command(subcommand)]
    User(security::UserCommand),
    /// ACLs (Kafka's model): add, list, remove.
    #[command(subcommand)]
    Acl(security::AclCommand),
    /// Load generators: producer and consumer throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Brokers (alive, shutting down or fenced), the active controller, the quorum's voters, topic count.
    Info,
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNEL_LOG")
        // openraft reports every election and log re-apply at info; its warnings are enough.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{default_level},openraft=warn"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("RUNNEL_LOG_FORMAT").as_deref() {
        // One JSON object per line: time, level, target, message and the event's fields
        // (topic, partition, group, transform, connector, ...) at the top level.
        Ok("json") => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        other => {
            builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            if let Ok(value) = other
                && value != "text"
            {
                tracing::warn!(
                    value,
                    "RUNNEL_LOG_FORMAT must be text or json; logging as text"
                );
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = Target::from_cli(&cli)?;
    match cli.command {
        Command::Dev(args) => server::dev(args, &cli.brokers).await,
        Command::Broker(command) => server::broker(command).await,
        Command::Topic(command) => topic::run(target.client().await?, command).await,
        Command::Produce(args) => produce::run(target.client().await?, args).await,
        Command::Consume(args) => consume::run(target.client().await?, args).await,
        Command::Group(command) => group::run(target.client().await?, command).await,
        Command::Transaction(command) => transaction::run(target.client().await?, command).await,
        Command::Transform(command) => transform::run(&target, command).await,
        Command::Connect(command) => connect::run(&target, command).await,
        Command::Connector(connect::ConnectorCommand::Builtins) => connect::connector_builtins(),
        Command::Connector(command) => connect::connector(target.client().await?, command).await,
        Command::Cluster(ClusterCommand::Info) => {
            let info = Admin::new(target.client().await?).cluster_info().await?;
            println!("Cluster id:  {}", info.cluster_id);
            println!("Version:     {}", info.version);
            match info.controller_id {
                0 => println!(
                    "Controller:  none active (an election is running, or a majority of the quorum is down)"
                ),
                id => println!("Controller:  {id} (active, term {})", info.controller_term),
            }
            println!(
                "Metadata:    applied up to log index {}",
                info.metadata_index
            );
            println!("Quorum:");
            for voter in &info.voters {
                let role = if voter.id == info.controller_id {
                    "leader"
                } else {
                    "voter"
                };
                let matched = if voter.matched_index > 0 {
                    format!(", log index {}", voter.matched_index)
                } else {
                    String::new()
                };
                println!("  {}  {} ({role}{matched})", voter.id, voter.address);
            }
            println!("Brokers:");
            for broker in &info.brokers {
                let state = if broker.fenced {
                    "fenced"
                } else if broker.shutting_down {
                    "shutting down"
                } else {
                    "alive"
                };
                println!("  {}  {} ({state})", broker.id, broker.address);
            }
            println!("Topics:      {}", info.topic_count);
            println!("Partitions:  {}", info.partition_count);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(command) => bench::run(&target, target.client().await?, command).await,
        Command::User(command) => security::user(target.client().await?, command).await,
        Command::Acl(command) => security::acl(target.client().await?, command).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(
        cli.command,
        Command::Dev(_) | Command::Broker(_) | Command::Connect(_)
    );
    init_tracing(if server { "info" } else { "warn" });
    if !server {
        quiet_on_closed_stdout();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err)
            if err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // The reader of our output went away (`| head`): end as Unix tools do.
            ExitCode::from(141)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client command piped into `head` ends quietly when the reader goes, with the
/// status a shell reports for SIGPIPE, as Unix tools do, instead of a panic about the
/// failed print. Other panics keep the default report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Parses `key=value`.
fn parse_key_value(input: &str) -> Result<(String, String), String> {
    match input.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {input:?}")),
    }
}
