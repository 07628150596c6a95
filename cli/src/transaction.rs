//! `runnel transaction ...`: what kafka-transactions.sh does.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use runnel_client::{Admin, Client, v1};

#[derive(Subcommand)]
pub enum TransactionCommand {
    /// Every transactional id with its producer, state and coordinator.
    List,
    /// One transactional id: its producer, state, timeout and the partitions of its
    /// open transaction.
    Describe { transactional_id: String },
    /// Abort a transactional id's open transaction (fencing its producer), or with
    /// --topic, --partition and --producer-id a hanging transaction on one partition
    /// (one `topic describe` lists as open while no coordinator knows of it).
    Abort {
        /// The transactional id whose open transaction to abort.
        #[arg(required_unless_present = "topic", conflicts_with = "topic")]
        transactional_id: Option<String>,
        #[arg(long, requires_all = ["partition", "producer_id"])]
        topic: Option<String>,
        #[arg(long)]
        partition: Option<u32>,
        #[arg(long)]
        producer_id: Option<i64>,
    },
    /// The transactions open on a topic's partitions for longer than --older-than-ms
    /// (a hanging transaction stays open: abort it with `transaction abort --topic`).
    FindHanging {
        topic: String,
        #[arg(long, default_value_t = 60_000)]
        older_than_ms: i64,
    },
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn partitions(d: &v1::TransactionDescription) -> String {
    let parts: Vec<String> = d
        .partitions
        .iter()
        .flat_map(|tp| {
            tp.partitions
                .iter()
                .map(move |p| format!("{}-{p}", tp.topic))
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn print_description(d: &v1::TransactionDescription) {
    println!("Transactional id: {}", d.transactional_id);
    println!(
        "Producer:         id {} epoch {}",
        d.producer_id, d.producer_epoch
    );
    println!("State:            {}", d.state);
    println!("Timeout:          {} ms", d.timeout_ms);
    if d.start_ms >= 0 {
        println!(
            "Open for:         {} ms",
            now_ms().saturating_sub(d.start_ms)
        );
    }
    println!("Partitions:       {}", partitions(d));
    println!("Coordinator:      broker {}", d.coordinator);
}

pub async fn run(client: Client, command: TransactionCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        TransactionCommand::List => {
            let transactions = admin.list_transactions().await?;
            println!(
                "{:<30} {:>12} {:>6} {:<15} {:>11}  PARTITIONS",
                "TRANSACTIONAL-ID", "PRODUCER-ID", "EPOCH", "STATE", "COORDINATOR"
            );
            for d in transactions {
                println!(
                    "{:<30} {:>12} {:>6} {:<15} {:>11}  {}",
                    d.transactional_id,
                    d.producer_id,
                    d.producer_epoch,
                    d.state,
                    d.coordinator,
                    partitions(&d)
                );
            }
        }
        TransactionCommand::Describe { transactional_id } => {
            print_description(&admin.describe_transaction(&transactional_id).await?);
        }
        TransactionCommand::Abort {
            transactional_id: Some(id),
            ..
        } => {
            let d = admin.abort_transaction(&id).await?;
            println!(
                "Transactional id {id} is {} (producer id {} epoch {}); its previous producer is fenced.",
                d.state, d.producer_id, d.producer_epoch
            );
        }
        TransactionCommand::Abort {
            topic: Some(topic),
            partition: Some(partition),
            producer_id: Some(producer_id),
            ..
        } => {
            let offset = admin
                .abort_partition_transaction(&topic, partition, producer_id)
                .await?;
            println!(
                "Aborted producer {producer_id}'s open transaction on {topic}-{partition} (marker at offset {offset})."
            );
        }
        TransactionCommand::Abort { .. } => {
            anyhow::bail!(
                "give a transactional id, or --topic, --partition and --producer-id of a hanging transaction"
            );
        }
        TransactionCommand::FindHanging {
            topic,
            older_than_ms,
        } => {
            let description = admin.describe_topic(&topic).await?;
            let now = now_ms();
            println!(
                "{:<10} {:>12} {:>6} {:>14} {:>12}",
                "PARTITION", "PRODUCER-ID", "EPOCH", "FIRST-OFFSET", "IDLE-MS"
            );
            let mut found = 0;
            for p in &description.partitions {
                for open in &p.open_transactions {
                    let idle = now.saturating_sub(open.last_write_ms);
                    if idle < older_than_ms {
                        continue;
                    }
                    found += 1;
                    println!(
                        "{:<10} {:>12} {:>6} {:>14} {:>12}",
                        p.partition, open.producer_id, open.producer_epoch, open.first_offset, idle
                    );
                }
            }
            if found > 0 {
                println!(
                    "Abort one with: runnel transaction abort --topic {topic} --partition P --producer-id ID"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
