//! Consumer groups on a three-broker cluster: the group's coordinator is the leader of its
//! `__consumer_offsets` partition, which is replicated; killing it with `kill -9` while
//! three members read moves the group to another broker with its members, what each one
//! holds and its committed offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::groups::{Member, Rows, group_rows, owners};
use crate::support::{runnel_at, wait_until};

/// `group describe` as broker `on` answers it: the coordinator it names and the rows.
fn describe(cluster: &Cluster, on: u32, group: &str) -> Option<(u32, Rows)> {
    let output = runnel_at(&cluster.node(on).addr, &["group", "describe", group], "");
    let out = String::from_utf8_lossy(&output.stdout);
    let coordinator = out
        .split("coordinator broker ")
        .nth(1)?
        .split(')')
        .next()?
        .parse()
        .ok()?;
    Some((coordinator, group_rows(&out, group)))
}

fn produce(cluster: &Cluster, on: u32, from: usize, count: usize) {
    let input: String = (from..from + count)
        .map(|i| format!("key-{i}:value-{i}\n"))
        .collect();
    cluster.ok(
        on,
        &["produce", "work", "--key-separator", ":", "--acks", "all"],
        &input,
    );
}

#[test]
fn a_group_keeps_its_members_and_offsets_when_its_coordinator_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    let brokers = cluster.addresses();
    // The internal topic is replicated over the three brokers, two in sync at least.
    let internal = cluster.describe(1, "__consumer_offsets");
    assert_eq!(internal.len(), 8);
    assert!(
        internal.iter().all(|p| p.replicas == vec![1, 2, 3]),
        "{internal:?}"
    );
    cluster.ok(
        1,
        &[
            "topic",
            "create",
            "work",
            "--partitions",
            "6",
            "--replication-factor",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
        "",
    );
    produce(&cluster, 1, 0, 300);
    let mut members: Vec<Member> = ["a", "b", "c"]
        .iter()
        .map(|n| Member::start_with_session(&brokers, "work", "crew", dir.path(), n, 10_000))
        .collect();
    let mut before = None;
    wait_until(
        "3 members to own 2 partitions each and commit everything",
        Duration::from_secs(30),
        || {
            let Some((coordinator, rows)) = describe(&cluster, 1, "crew") else {
                return false;
            };
            let owners = owners(&rows);
            let settled = rows.len() == 6
                && owners.len() == 3
                && owners.values().all(|n| *n == 2)
                && rows.values().all(|(_, _, _, lag)| *lag == 0);
            if settled {
                before = Some((coordinator, rows));
            }
            settled
        },
    );
    let (coordinator, rows_before) = before.expect("settled");
    let owner_of = |rows: &Rows| -> BTreeMap<(String, u32), String> {
        rows.iter()
            .map(|(tp, (owner, ..))| (tp.clone(), owner.clone()))
            .collect()
    };
    let committed_before: BTreeMap<(String, u32), i64> = rows_before
        .iter()
        .map(|(tp, (_, committed, ..))| (tp.clone(), *committed))
        .collect();

    cluster.kill9(coordinator);
    let survivor = if coordinator == 1 { 2 } else { 1 };
    produce(&cluster, survivor, 300, 300);
    let mut after = None;
    wait_until(
        "another broker to coordinate the group, with every record committed",
        Duration::from_secs(40),
        || {
            let Some((now, rows)) = describe(&cluster, survivor, "crew") else {
                return false;
            };
            let done = now != coordinator
                && rows.len() == 6
                && rows
                    .values()
                    .all(|(_, committed, end, lag)| *end == *committed && *lag == 0)
                && rows.values().map(|(_, _, end, _)| end).sum::<i64>() == 600;
            if done {
                after = Some(rows);
            }
            done
        },
    );
    let rows_after = after.expect("coordinated again");
    // The members kept their partitions: the new coordinator restored who holds what.
    assert_eq!(owner_of(&rows_after), owner_of(&rows_before));
    for (tp, committed) in &committed_before {
        assert!(rows_after[tp].1 >= *committed, "{tp:?} went back");
    }
    // No partition was read by two members: every record was delivered exactly once.
    let mut seen: BTreeMap<(u32, i64), usize> = BTreeMap::new();
    for member in &members {
        for at in member.seen() {
            *seen.entry(at).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 600, "every record was delivered");
    let repeated: BTreeSet<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "delivered twice: {repeated:?}");

    // Committed offsets outlive the members and the old coordinator's return.
    for member in &mut members {
        member.interrupt();
    }
    cluster.restart(coordinator);
    wait_until(
        "the group to be empty with its offsets",
        Duration::from_secs(20),
        || {
            describe(&cluster, coordinator, "crew").is_some_and(|(_, rows)| {
                rows.len() == 6
                    && owners(&rows).is_empty()
                    && rows
                        .values()
                        .map(|(_, committed, ..)| committed)
                        .sum::<i64>()
                        == 600
            })
        },
    );
}
