//! `runnel group ...`: what kafka-consumer-groups.sh does.

use std::process::ExitCode;

use clap::{ArgGroup, Subcommand};
use runnel_client::{Admin, Client, v1, v1::reset_offsets_request::To};

#[derive(Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List,
    /// Members, and per partition the committed offset, log end offset and lag.
    Describe { group: String },
    /// Move a group's committed offsets on every partition of a topic (the group must
    /// have no live members).
    #[command(group(ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_offset", "to_timestamp", "shift_by"])))]
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        to_earliest: bool,
        #[arg(long)]
        to_latest: bool,
        #[arg(long)]
        to_offset: Option<i64>,
        /// First offset with a timestamp >= T (ms since the Unix epoch).
        #[arg(long)]
        to_timestamp: Option<i64>,
        /// Move each committed offset by N (negative: back).
        #[arg(long, allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Print the new offsets without committing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a group's committed offsets (the group must have no live members).
    Delete { group: String },
}

pub async fn run(client: Client, command: GroupCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(client);
    match command {
        GroupCommand::List => {
            let groups = admin.list_groups().await?;
            println!("{:<30} {:<12} {:>7}", "GROUP", "STATE", "MEMBERS");
            for g in groups {
                println!("{:<30} {:<12} {:>7}", g.group_id, g.state, g.members);
            }
        }
        GroupCommand::Describe { group } => {
            let d = admin.describe_group(&group).await?;
            println!(
                "Group {} is {} with {} member{} (group epoch {}, coordinator broker {}).",
                d.group_id,
                d.state,
                d.members.len(),
                if d.members.len() == 1 { "" } else { "s" },
                d.group_epoch,
                d.coordinator
            );
            println!();
            let dash = |v: i64| {
                if v < 0 {
                    "-".to_string()
                } else {
                    v.to_string()
                }
            };
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            println!(
                "{:<20} {:<20} {:>9} {:>15} {:>15} {:>8} {:<40} {:<16} CLIENT-ID",
                "GROUP",
                "TOPIC",
                "PARTITION",
                "CURRENT-OFFSET",
                "LOG-END-OFFSET",
                "LAG",
                "CONSUMER-ID",
                "HOST",
            );
            for p in &d.partitions {
                println!(
                    "{:<20} {:<20} {:>9} {:>15} {:>15} {:>8} {:<40} {:<16} {}",
                    d.group_id,
                    p.topic,
                    p.partition,
                    dash(p.current_offset),
                    dash(p.log_end_offset),
                    dash(p.lag),
                    or_dash(&p.member_id),
                    or_dash(&p.host),
                    or_dash(&p.client_id)
                );
            }
            if !d.members.is_empty() {
                println!();
                println!(
                    "{:<40} {:<16} {:<28} {:>6}  ASSIGNMENT",
                    "CONSUMER-ID", "HOST", "CLIENT-ID", "EPOCH"
                );
                for m in &d.members {
                    let assignment = listed(&m.assignment);
                    let standby = listed(&m.standby);
                    println!(
                        "{:<40} {:<16} {:<28} {:>6}  {}{}",
                        m.member_id,
                        m.host,
                        m.client_id,
                        m.member_epoch,
                        if assignment.is_empty() {
                            "(none)"
                        } else {
                            assignment.as_str()
                        },
                        if standby.is_empty() {
                            String::new()
                        } else {
                            format!(" (standby: {standby})")
                        }
                    );
                }
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_timestamp,
            shift_by,
            dry_run,
        } => {
            let to = match (to_earliest, to_latest, to_offset, to_timestamp, shift_by) {
                (true, ..) => To::Earliest(true),
                (_, true, ..) => To::Latest(true),
                (_, _, Some(offset), ..) => To::Offset(offset),
                (_, _, _, Some(ts), _) => To::TimestampMs(ts),
                (.., Some(shift)) => To::ShiftBy(shift),
                _ => anyhow::bail!(
                    "say where to reset to: --to-earliest, --to-latest, --to-offset, --to-timestamp or --shift-by"
                ),
            };
            let offsets = admin.reset_offsets(&group, &topic, to, dry_run).await?;
            println!(
                "{:<20} {:<20} {:>9} {:>12}",
                "GROUP", "TOPIC", "PARTITION", "NEW-OFFSET"
            );
            for o in offsets {
                println!(
                    "{:<20} {:<20} {:>9} {:>12}",
                    group, o.topic, o.partition, o.offset
                );
            }
            if dry_run {
                println!("(dry run: nothing was changed)");
            }
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            println!("Deleted group {group}.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `topic-partition` pairs, comma separated.
fn listed(partitions: &[v1::TopicPartitions]) -> String {
    partitions
        .iter()
        .flat_map(|tp| {
            tp.partitions
                .iter()
                .map(move |p| format!("{}-{p}", tp.topic))
        })
        .collect::<Vec<_>>()
        .join(",")
}
