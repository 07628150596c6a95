//! `runnel topic ...`: what kafka-topics.sh, kafka-configs.sh and kafka-delete-records.sh do.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Subcommand;
use runnel_client::{Admin, Client};

use crate::parse_key_value;

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (default: the broker's default_partitions, 1).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        partitions: u32,
        /// Copies of each partition (at most the number of brokers).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        replication_factor: u32,
        /// Topic config, KEY=VALUE; repeatable (e.g. retention.ms=86400000).
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List {
        /// Include internal topics (names beginning with "__").
        #[arg(long)]
        internal: bool,
    },
    /// Partitions (leader, replicas, ISR, offsets) and configs of a topic.
    Describe { name: String },
    /// Set or reset topic configs.
    AlterConfig {
        name: String,
        /// KEY=VALUE to set; repeatable.
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        /// KEY to reset to the broker default; repeatable.
        #[arg(long = "delete-config")]
        delete: Vec<String>,
    },
    /// Grow a topic to a new total of partitions (partitions are never removed).
    AddPartitions {
        name: String,
        #[arg(long)]
        total: u32,
    },
    /// Delete a topic and all its data.
    Delete { name: String },
    /// Delete records below an offset (moves the partition's log start offset).
    Trim {
        name: String,
        #[arg(long)]
        partition: u32,
        /// Records below this offset are deleted; -1 deletes up to the high watermark.
        #[arg(long, allow_hyphen_values = true)]
        offset: i64,
    },
}

pub async fn run(client: Client, command: TopicCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let topic = admin
                .create_topic(
                    &name,
                    partitions,
                    replication_factor,
                    configs.into_iter().collect(),
                )
                .await?;
            println!(
                "Created topic {name} with {} partition{}.",
                topic.partitions.len(),
                if topic.partitions.len() == 1 { "" } else { "s" }
            );
        }
        TopicCommand::List { internal } => {
            for topic in admin.list_topics(internal).await? {
                println!("{}", topic.name);
            }
        }
        TopicCommand::Describe { name } => {
            let d = admin.describe_topic(&name).await?;
            let rf = d.partitions.first().map_or(0, |p| p.replicas.len());
            println!(
                "Topic: {}\tPartitionCount: {}\tReplicationFactor: {rf}{}",
                d.name,
                d.partitions.len(),
                if d.internal { "\tInternal: true" } else { "" }
            );
            let overrides: Vec<String> = d
                .configs
                .iter()
                .filter(|c| c.is_override)
                .map(|c| format!("{}={}", c.key, c.value))
                .collect();
            println!(
                "Configs (overrides): {}",
                if overrides.is_empty() {
                    "none".into()
                } else {
                    overrides.join(",")
                }
            );
            println!(
                "{:<10} {:>6} {:>6} {:<10} {:<10} {:>14} {:>14} {:>14} {:>12}",
                "PARTITION",
                "LEADER",
                "EPOCH",
                "REPLICAS",
                "ISR",
                "LOG-START",
                "LOG-END",
                "HIGH-WATERMARK",
                "SIZE-BYTES"
            );
            for p in &d.partitions {
                println!(
                    "{:<10} {:>6} {:>6} {:<10} {:<10} {:>14} {:>14} {:>14} {:>12}",
                    p.partition,
                    p.leader,
                    p.leader_epoch,
                    join(&p.replicas),
                    join(&p.isr),
                    p.log_start_offset,
                    p.log_end_offset,
                    p.high_watermark,
                    p.size_bytes
                );
                if let Some(error) = &p.error {
                    println!(
                        "  partition {} is unavailable: {}",
                        p.partition, error.message
                    );
                }
            }
            println!("Configs (effective):");
            for c in &d.configs {
                println!(
                    "  {}={}{}",
                    c.key,
                    c.value,
                    if c.is_override {
                        "  (topic override)"
                    } else {
                        ""
                    }
                );
            }
        }
        TopicCommand::AlterConfig {
            name,
            configs,
            delete,
        } => {
            if configs.is_empty() && delete.is_empty() {
                anyhow::bail!("nothing to change: give --config KEY=VALUE or --delete-config KEY");
            }
            let set: HashMap<String, String> = configs.into_iter().collect();
            let entries = admin.alter_topic_config(&name, set, delete).await?;
            println!("Updated configs of {name}:");
            for c in entries.iter().filter(|c| c.is_override) {
                println!("  {}={}", c.key, c.value);
            }
        }
        TopicCommand::AddPartitions { name, total } => {
            let topic = admin.add_partitions(&name, total).await?;
            println!(
                "Topic {name} now has {} partitions.",
                topic.partitions.len()
            );
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("Deleted topic {name}.");
        }
        TopicCommand::Trim {
            name,
            partition,
            offset,
        } => {
            let start = admin.delete_records(&name, partition, offset).await?;
            println!("Partition {name}-{partition} now starts at offset {start}.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}
