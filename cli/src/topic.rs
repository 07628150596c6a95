//! `runnel topic ...`: what kafka-topics.sh, kafka-configs.sh and kafka-delete-records.sh do.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Subcommand;
use runnel_client::{Admin, Client, v1};

use crate::parse_key_value;

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (default: the broker's default_partitions, 1).
        #[arg(long)]
        partitions: Option<u32>,
        /// Copies of each partition (at most the number of brokers; default: the
        /// broker's default_replication_factor).
        #[arg(long)]
        replication_factor: Option<u32>,
        /// Topic config, KEY=VALUE; repeatable (e.g. retention.ms=86400000).
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List {
        /// Include internal topics (names beginning with "__").
        #[arg(long)]
        internal: bool,
        #[command(flatten)]
        filter: PartitionFilter,
    },
    /// Partitions (leader, replicas, ISR, offsets) and configs of a topic; with a filter
    /// and no name, the matching partitions of every topic.
    Describe {
        name: Option<String>,
        #[command(flatten)]
        filter: PartitionFilter,
    },
    /// Move partitions to other brokers with a JSON plan, as kafka-reassign-partitions:
    /// --generate writes a plan that spreads --topics over --broker-ids, --execute
    /// starts it, --verify says how far it got.
    Reassign {
        /// The plan file: {"version":1,"partitions":[{"topic":"t","partition":0,"replicas":[2,3,4]}]}
        #[arg(long)]
        plan: std::path::PathBuf,
        #[arg(long, group = "step")]
        generate: bool,
        #[arg(long, group = "step")]
        execute: bool,
        #[arg(long, group = "step")]
        verify: bool,
        /// With --generate: the brokers to spread over (--brokers is the bootstrap list).
        #[arg(long, value_delimiter = ',')]
        broker_ids: Vec<u32>,
        /// With --generate: the topics to move.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// With --execute: bytes per second leaders send to catching-up replicas, all
        /// together (0: no limit). Lifted when the last move finishes.
        #[arg(long, default_value_t = 0)]
        throttle: u64,
    },
    /// Give partitions back to their preferred replica (the first of their replicas)
    /// where it is live and in sync; every topic when none is named.
    ElectLeaders { topics: Vec<String> },
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
        TopicCommand::List { internal, filter } => {
            for topic in admin.list_topics(internal || filter.any()).await? {
                if !filter.any() {
                    println!("{}", topic.name);
                    continue;
                }
                let d = admin.describe_topic(&topic.name).await?;
                let (under, unavailable) = filter.counts(&d);
                if under + unavailable > 0 {
                    println!(
                        "{} ({under} under-replicated, {unavailable} unavailable)",
                        topic.name
                    );
                }
            }
        }
        TopicCommand::Reassign {
            plan,
            generate,
            execute,
            verify,
            broker_ids,
            topics,
            throttle,
        } => {
            if generate {
                return generate_plan(&admin, &plan, &broker_ids, &topics).await;
            }
            if execute {
                let moves = read_plan(&plan)?;
                let count = moves.len();
                admin.reassign_partitions(moves, throttle).await?;
                println!(
                    "Started moving {count} partition{}{}; follow with `runnel topic reassign --plan {} --verify`.",
                    if count == 1 { "" } else { "s" },
                    if throttle > 0 {
                        format!(" (catching up at most {throttle} bytes/s)")
                    } else {
                        String::new()
                    },
                    plan.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if verify {
                return verify_plan(&admin, &plan).await;
            }
            anyhow::bail!("say what to do with the plan: --generate, --execute or --verify");
        }
        TopicCommand::ElectLeaders { topics } => {
            let results = admin.elect_leaders(topics).await?;
            let mut elected = 0;
            for r in &results {
                if r.elected {
                    elected += 1;
                    println!(
                        "{}-{}: now led by its preferred replica {}",
                        r.topic, r.partition, r.preferred
                    );
                } else if !r.reason.is_empty() {
                    println!(
                        "{}-{}: led by {}, not its preferred replica {}: {}",
                        r.topic, r.partition, r.leader, r.preferred, r.reason
                    );
                }
            }
            println!(
                "{elected} partition{} moved; {} of {} led by their preferred replica.",
                if elected == 1 { "" } else { "s" },
                results.iter().filter(|r| r.leader == r.preferred).count(),
                results.len()
            );
        }
        TopicCommand::Describe { name, filter } => {
            let names = match name {
                Some(name) => vec![name],
                None if filter.any() => admin
                    .list_topics(true)
                    .await?
                    .into_iter()
                    .map(|t| t.name)
                    .collect(),
                None => anyhow::bail!(
                    "name a topic to describe, or give --under-replicated or --unavailable to list such partitions of every topic"
                ),
            };
            let every = names.len() > 1;
            let mut shown = 0;
            for name in names {
                let d = admin.describe_topic(&name).await?;
                if every && !d.partitions.iter().any(|p| filter.keeps(p)) {
                    continue;
                }
                if shown > 0 {
                    println!();
                }
                shown += 1;
                describe(&d, filter);
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

/// Prints `topic describe` for one topic.
fn describe(d: &v1::DescribeTopicResponse, filter: PartitionFilter) {
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
        "{:<10} {:>6} {:>6} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>12}",
        "PARTITION",
        "LEADER",
        "EPOCH",
        "REPLICAS",
        "ISR",
        "LOG-START",
        "LOG-END",
        "HIGH-WATERMARK",
        "STABLE-OFFSET",
        "SIZE-BYTES"
    );
    for p in d.partitions.iter().filter(|p| filter.keeps(p)) {
        println!(
            "{:<10} {:>6} {:>6} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>12}",
            p.partition,
            p.leader,
            p.leader_epoch,
            join(&p.replicas),
            join(&p.isr),
            p.log_start_offset,
            p.log_end_offset,
            p.high_watermark,
            p.last_stable_offset,
            p.size_bytes
        );
        for open in &p.open_transactions {
            println!(
                "  partition {}: producer {} (epoch {}) has a transaction open since offset {}",
                p.partition, open.producer_id, open.producer_epoch, open.first_offset
            );
        }
        if !p.target.is_empty() {
            let catching = catching_up(p);
            println!(
                "  partition {} is moving to {} (catching up: {})",
                p.partition,
                join(&p.target),
                join(&catching)
            );
        }
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

/// A reassignment plan file (kafka-reassign-partitions' JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Plan {
    version: u32,
    partitions: Vec<PlannedPartition>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PlannedPartition {
    topic: String,
    partition: u32,
    replicas: Vec<u32>,
}

fn read_plan(path: &std::path::Path) -> anyhow::Result<Vec<v1::PartitionMove>> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| anyhow::anyhow!("cannot read the plan {}: {err}", path.display()))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "the plan {} is not a reassignment plan ({err}); expected {{\"version\":1,\"partitions\":[{{\"topic\":\"t\",\"partition\":0,\"replicas\":[1,2,3]}}]}}",
            path.display()
        )
    })?;
    if plan.version != 1 {
        anyhow::bail!(
            "plan version {} is unknown; this runnel writes version 1",
            plan.version
        );
    }
    Ok(plan
        .partitions
        .into_iter()
        .map(|p| v1::PartitionMove {
            topic: p.topic,
            partition: p.partition,
            replicas: p.replicas,
        })
        .collect())
}

/// Writes a plan that spreads every partition of `topics` over `brokers` round-robin,
/// keeping each topic's replication factor, and prints the current and new assignments.
async fn generate_plan(
    admin: &Admin,
    path: &std::path::Path,
    brokers: &[u32],
    topics: &[String],
) -> anyhow::Result<ExitCode> {
    if brokers.is_empty() || topics.is_empty() {
        anyhow::bail!("--generate needs --broker-ids 1,2,3 and --topics a,b");
    }
    let mut current = Vec::new();
    let mut proposed = Vec::new();
    for topic in topics {
        let d = admin.describe_topic(topic).await?;
        let rf = d.partitions.first().map_or(0, |p| p.replicas.len());
        if rf > brokers.len() {
            anyhow::bail!(
                "topic {topic:?} has {rf} replicas per partition but only {} brokers are given",
                brokers.len()
            );
        }
        for p in &d.partitions {
            current.push(PlannedPartition {
                topic: topic.clone(),
                partition: p.partition,
                replicas: p.replicas.clone(),
            });
            let start = p.partition as usize;
            proposed.push(PlannedPartition {
                topic: topic.clone(),
                partition: p.partition,
                replicas: (0..rf)
                    .map(|i| brokers[(start + i) % brokers.len()])
                    .collect(),
            });
        }
    }
    let current = Plan {
        version: 1,
        partitions: current,
    };
    let proposed = Plan {
        version: 1,
        partitions: proposed,
    };
    println!("Current assignment (keep it to roll back):");
    println!("{}", serde_json::to_string(&current)?);
    println!("Proposed assignment, written to {}:", path.display());
    let text = serde_json::to_string(&proposed)?;
    println!("{text}");
    std::fs::write(path, text + "\n")
        .map_err(|err| anyhow::anyhow!("cannot write the plan {}: {err}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Says, per planned partition, whether its move is done, running or not started.
async fn verify_plan(admin: &Admin, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let moves = read_plan(path)?;
    let mut described: HashMap<String, v1::DescribeTopicResponse> = HashMap::new();
    let mut done = 0;
    for m in &moves {
        if !described.contains_key(&m.topic) {
            described.insert(m.topic.clone(), admin.describe_topic(&m.topic).await?);
        }
        let Some(p) = described[&m.topic]
            .partitions
            .iter()
            .find(|p| p.partition == m.partition)
        else {
            println!("{}-{}: no such partition", m.topic, m.partition);
            continue;
        };
        if p.replicas == m.replicas && p.target.is_empty() {
            done += 1;
            println!(
                "{}-{}: complete (replicas {})",
                m.topic,
                m.partition,
                join(&p.replicas)
            );
        } else if p.target == m.replicas {
            let catching = catching_up(p);
            println!(
                "{}-{}: in progress, waiting for {} to catch up (ISR {})",
                m.topic,
                m.partition,
                join(&catching),
                join(&p.isr)
            );
        } else {
            println!(
                "{}-{}: not started (replicas {}); run --execute",
                m.topic,
                m.partition,
                join(&p.replicas)
            );
        }
    }
    println!("{done} of {} partitions moved.", moves.len());
    Ok(ExitCode::SUCCESS)
}

/// `--under-replicated` / `--unavailable`: which partitions to show.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PartitionFilter {
    /// Only partitions whose ISR is smaller than their replica set.
    #[arg(long)]
    under_replicated: bool,
    /// Only partitions without a leader, or fenced by a storage failure.
    #[arg(long)]
    unavailable: bool,
}

impl PartitionFilter {
    fn any(self) -> bool {
        self.under_replicated || self.unavailable
    }

    fn is_under_replicated(p: &v1::PartitionDescription) -> bool {
        p.isr.len() < p.replicas.len()
    }

    fn is_unavailable(p: &v1::PartitionDescription) -> bool {
        p.leader == 0 || p.error.is_some()
    }

    /// Whether a partition passes the filter (every one does without a filter).
    fn keeps(self, p: &v1::PartitionDescription) -> bool {
        !self.any()
            || (self.under_replicated && Self::is_under_replicated(p))
            || (self.unavailable && Self::is_unavailable(p))
    }

    /// How many of a topic's partitions are under-replicated and unavailable, counting
    /// only what the filter asks for.
    fn counts(self, d: &v1::DescribeTopicResponse) -> (usize, usize) {
        let under = d
            .partitions
            .iter()
            .filter(|p| self.under_replicated && Self::is_under_replicated(p))
            .count();
        let unavailable = d
            .partitions
            .iter()
            .filter(|p| self.unavailable && Self::is_unavailable(p))
            .count();
        (under, unavailable)
    }
}

/// The replicas a running reassignment still waits for: in its target, not in the ISR.
fn catching_up(p: &v1::PartitionDescription) -> Vec<u32> {
    p.target
        .iter()
        .copied()
        .filter(|r| !p.isr.contains(r))
        .collect()
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}
