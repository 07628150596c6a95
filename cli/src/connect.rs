//! `runnel connect run` (a standalone connect worker in the foreground) and
//! `runnel connector ...` (connectors hosted by a broker process).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use runnel_client::{Admin, Client, v1};
use runnel_connect::spec::{self, Component};
use runnel_connect::worker::Components;

#[derive(Subcommand)]
pub enum ConnectCommand {
    /// Run connectors from their YAML files in this process until Ctrl-C.
    Run {
        /// Connector files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ConnectorCommand {
    /// Start a connector from its YAML file in the broker process (a name that exists is
    /// refused). It is kept across broker restarts.
    Create {
        file: PathBuf,
    },
    /// Connectors with state, records moved, errors and (sinks) lag.
    List,
    /// One connector in detail, with its recent log.
    Status {
        name: String,
    },
    /// Stop moving records until resumed.
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Stop and start again from the committed position (also after a failure).
    Restart {
        name: String,
    },
    /// Stop and forget a connector; its committed position stays.
    Delete {
        name: String,
    },
    /// The connectors that ship with Runnel.
    Builtins,
}

pub async fn run(target: &crate::Target, command: ConnectCommand) -> anyhow::Result<ExitCode> {
    let brokers = &target.brokers;
    let ConnectCommand::Run { files } = command;
    let mut loaded = Vec::new();
    for file in &files {
        let spec = spec::load(file)?;
        let yaml = std::fs::read_to_string(file)?;
        let components = Components::load(&spec)?;
        loaded.push((spec, yaml, components));
    }
    let worker = runnel_connect::Worker::new(None)?;
    worker.connect_to(brokers.to_vec(), target.options());
    let mut names = Vec::new();
    for (spec, yaml, components) in loaded {
        let name = spec.name.clone();
        worker
            .create(spec, yaml, components)
            .await
            .with_context(|| format!("starting connector {name:?}"))?;
        names.push(name);
    }
    println!(
        "connect worker running {} (brokers {}). Stop with Ctrl-C.",
        names.join(", "),
        brokers.join(",")
    );
    let mut reported: BTreeMap<String, (String, String)> = BTreeMap::new();
    let stop = crate::server::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            signal = &mut stop => {
                signal?;
                worker.shutdown().await;
                return Ok(ExitCode::SUCCESS);
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let states = worker.states();
        for (name, state, error) in &states {
            let now = (state.clone(), error.clone());
            if reported.get(name) != Some(&now) {
                if error.is_empty() {
                    eprintln!("connector {name}: {state}");
                } else {
                    eprintln!("connector {name}: {state}: {error}");
                }
                reported.insert(name.clone(), now);
            }
        }
        if states.iter().all(|(_, state, _)| state == "Failed") {
            eprintln!("error: every connector failed; fix the connector files and run again");
            return Ok(ExitCode::FAILURE);
        }
    }
}

/// " on broker N", or nothing while no broker runs it.
fn on_broker(broker: u32) -> String {
    if broker == 0 {
        String::new()
    } else {
        format!(" on broker {broker}")
    }
}

fn print_status(status: &v1::ConnectorStatus) {
    println!("Name:       {}", status.name);
    println!("Kind:       {}", status.kind);
    println!("Connector:  {}", status.connector);
    println!("File:       {}", status.file);
    println!("Topics:     {}", status.topics.join(", "));
    println!("State:      {}{}", status.state, on_broker(status.broker));
    if !status.error.is_empty() {
        println!("Error:      {}", status.error);
    }
    println!("Records:    {}", status.records);
    println!("Errors:     {}", status.record_errors);
    if status.kind == "sink" {
        println!("Lag:        {}", lag_text(status.lag));
    } else {
        println!(
            "Position:   {}",
            status.position.trim_end().replace('\n', "\n            ")
        );
    }
    if !status.config.is_empty() {
        println!("Config:");
        for (key, value) in &status.config {
            println!("  {key}: {value}");
        }
    }
    if !status.log.is_empty() {
        println!("Log:");
        for line in &status.log {
            println!("  {line}");
        }
    }
}

fn lag_text(lag: i64) -> String {
    if lag < 0 { "-".into() } else { lag.to_string() }
}

pub async fn connector(client: Client, command: ConnectorCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        ConnectorCommand::Create { file } => {
            let spec = spec::load(&file)?;
            let yaml = std::fs::read_to_string(&file)?;
            let mut components = BTreeMap::new();
            let mut paths: Vec<PathBuf> = spec.transforms.iter().map(|t| t.wasm.clone()).collect();
            if let Component::File(path) = &spec.component {
                paths.push(path.clone());
            }
            for path in paths {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("{}: reading {}", spec.file, path.display()))?;
                components.insert(path.display().to_string(), bytes);
            }
            let status = admin
                .create_connector(&spec.file, &yaml, components)
                .await?;
            println!(
                "Created connector {} ({}{})",
                status.name,
                status.state,
                on_broker(status.broker)
            );
        }
        ConnectorCommand::List => {
            let list = admin.list_connectors().await?;
            if list.is_empty() {
                println!("No connectors. Create one with `runnel connector create FILE.yaml`.");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<6} {:<14} {:<10} {:>6} {:>12} {:>8} {:>8}  ERROR",
                "NAME", "KIND", "CONNECTOR", "STATE", "BROKER", "RECORDS", "ERRORS", "LAG"
            );
            for s in list {
                println!(
                    "{:<24} {:<6} {:<14} {:<10} {:>6} {:>12} {:>8} {:>8}  {}",
                    s.name,
                    s.kind,
                    s.connector.rsplit('/').next().unwrap_or_default(),
                    s.state,
                    if s.broker == 0 {
                        "-".to_string()
                    } else {
                        s.broker.to_string()
                    },
                    s.records,
                    s.record_errors,
                    lag_text(s.lag),
                    s.error
                );
            }
        }
        ConnectorCommand::Status { name } => print_status(&admin.connector_status(&name).await?),
        ConnectorCommand::Pause { name } => {
            print_status(&admin.pause_connector(&name, true).await?);
        }
        ConnectorCommand::Resume { name } => {
            print_status(&admin.pause_connector(&name, false).await?);
        }
        ConnectorCommand::Restart { name } => {
            print_status(&admin.restart_connector(&name).await?);
        }
        ConnectorCommand::Delete { name } => {
            admin.delete_connector(&name).await?;
            println!("Deleted connector {name}");
        }
        ConnectorCommand::Builtins => return connector_builtins(),
    }
    Ok(ExitCode::SUCCESS)
}

/// `runnel connector builtins`: needs no broker.
pub fn connector_builtins() -> anyhow::Result<ExitCode> {
    for name in spec::builtin_names() {
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}
