//! A three-node cluster of real `runnel broker start` processes (each a controller voter
//! and a broker): placement over brokers, fencing of a killed broker, its return under a
//! new leader epoch, and failover of the active controller.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout};
use std::time::Duration;

use crate::support::{await_listening, runnel_at, spawn_server_in, wait_until};

pub(crate) struct Node {
    pub(crate) id: u32,
    pub(crate) addr: String,
    data_dir: PathBuf,
    /// The network namespace the node runs in, when not the test's own.
    netns: Option<String>,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port for a server a test starts and restarts at a fixed address. Taken from below
/// the kernel's ephemeral range (which starts at 32768 by default), so that no outgoing
/// connection of a concurrent test holds it as its local port meanwhile, and handed out
/// in turn within this process, so that two tests never get the same one.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const COUNT: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % COUNT;
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn spawn(node: &Node, quorum: &str, extra: &[String]) -> (Child, ChildStdout) {
    let data_dir = node.data_dir.to_string_lossy().to_string();
    let id = node.id.to_string();
    let mut args: Vec<&str> = vec![
        "broker",
        "start",
        "--data-dir",
        &data_dir,
        "--listen",
        &node.addr,
        "--node-id",
        &id,
        "--controller-quorum",
        quorum,
        "--broker-session-timeout-ms",
        "3000",
        "--broker-heartbeat-interval-ms",
        "200",
        // No metrics listener: one more port bound beside those picked by `free_port`
        // makes a collision between concurrent tests likelier (tests/e2e/metrics.rs
        // scrapes a broker of its own).
        "--metrics-listen",
        "off",
    ];
    args.extend(extra.iter().map(String::as_str));
    spawn_server_in(node.netns.as_deref(), &args)
}

pub(crate) struct Cluster {
    nodes: Vec<Node>,
    quorum: String,
    /// Flags every node starts with, beyond the cluster's own.
    extra: Vec<String>,
}

/// One row of `topic describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionRow {
    pub(crate) partition: u32,
    pub(crate) leader: u32,
    pub(crate) epoch: i32,
    pub(crate) replicas: Vec<u32>,
    pub(crate) isr: Vec<u32>,
    pub(crate) log_end: i64,
    pub(crate) high_watermark: i64,
    pub(crate) last_stable_offset: i64,
    pub(crate) size_bytes: u64,
}

/// The partition rows of `topic describe`.
pub(crate) fn partition_rows(describe: &str) -> Vec<PartitionRow> {
    let ids = |text: &str| -> Vec<u32> {
        let mut ids: Vec<u32> = text.split(',').filter_map(|i| i.parse().ok()).collect();
        ids.sort_unstable();
        ids
    };
    describe
        .lines()
        .skip_while(|l| !l.starts_with("PARTITION"))
        .skip(1)
        .take_while(|l| !l.starts_with("Configs"))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(PartitionRow {
                partition: cols.first()?.parse().ok()?,
                leader: cols.get(1)?.parse().ok()?,
                epoch: cols.get(2)?.parse().ok()?,
                replicas: ids(cols.get(3)?),
                isr: ids(cols.get(4)?),
                log_end: cols.get(6)?.parse().ok()?,
                high_watermark: cols.get(7)?.parse().ok()?,
                last_stable_offset: cols.get(8)?.parse().ok()?,
                size_bytes: cols.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

impl Cluster {
    /// Starts every node first and only then waits for them: none serves before a
    /// majority of the quorum runs.
    pub(crate) fn start(root: &Path, count: u32) -> Cluster {
        Self::start_with(root, count, &[])
    }

    /// Like [`Cluster::start`], every node with the `extra` flags too.
    pub(crate) fn start_with(root: &Path, count: u32, extra: &[&str]) -> Cluster {
        let places = (1..=count)
            .map(|_| (format!("127.0.0.1:{}", free_port()), None))
            .collect();
        Self::start_placed(root, places, extra)
    }

    /// Starts one node per `(address, network namespace)`, node ids from 1.
    pub(crate) fn start_placed(
        root: &Path,
        places: Vec<(String, Option<String>)>,
        extra: &[&str],
    ) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_string()).collect();
        let mut nodes: Vec<Node> = places
            .into_iter()
            .zip(1..)
            .map(|((addr, netns), id)| Node {
                id,
                addr,
                data_dir: root.join(format!("node-{id}")),
                netns,
                child: None,
            })
            .collect();
        let quorum = nodes
            .iter()
            .map(|n| format!("{}@{}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut outputs = Vec::new();
        for node in &mut nodes {
            let (child, stdout) = spawn(node, &quorum, &extra);
            node.child = Some(child);
            outputs.push(stdout);
        }
        for stdout in outputs {
            await_listening(stdout);
        }
        Cluster {
            nodes,
            quorum,
            extra,
        }
    }

    pub(crate) fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// The ids of the nodes whose process runs.
    pub(crate) fn running(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Every node's address, comma-separated: a client's bootstrap list.
    pub(crate) fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Pauses (`SIGSTOP`) or resumes (`SIGCONT`) node `id`.
    pub(crate) fn signal(&self, id: u32, signal: &str) {
        if let Some(child) = &self.nodes[id as usize - 1].child {
            let status = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    /// Stops node `id` with `SIGTERM` and waits for it to exit.
    pub(crate) fn terminate(&mut self, id: u32) {
        self.signal(id, "-TERM");
        if let Some(mut child) = self.nodes[id as usize - 1].child.take() {
            let status = child.wait().expect("the node exits");
            assert!(
                status.success(),
                "a node stopped by SIGTERM exits cleanly: {status}"
            );
        }
    }

    pub(crate) fn kill9(&mut self, id: u32) {
        if let Some(mut child) = self.nodes[id as usize - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts every stopped node again, all before waiting for any (a quorum must form).
    pub(crate) fn restart_all(&mut self) {
        let mut outputs = Vec::new();
        for index in 0..self.nodes.len() {
            if self.nodes[index].child.is_none() {
                let (child, stdout) = spawn(&self.nodes[index], &self.quorum, &self.extra);
                self.nodes[index].child = Some(child);
                outputs.push(stdout);
            }
        }
        for stdout in outputs {
            await_listening(stdout);
        }
    }

    /// Node `id`'s data directory.
    pub(crate) fn data_dir(&self, id: u32) -> &Path {
        &self.node(id).data_dir
    }

    pub(crate) fn restart(&mut self, id: u32) {
        let (child, stdout) = spawn(self.node(id), &self.quorum, &self.extra);
        self.nodes[id as usize - 1].child = Some(child);
        await_listening(stdout);
    }

    /// Runs a CLI command against node `id`; it must succeed.
    pub(crate) fn ok(&self, id: u32, args: &[&str], stdin: &str) -> String {
        let output = runnel_at(&self.node(id).addr, args, stdin);
        assert!(
            output.status.success(),
            "runnel {args:?} on node {id} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// The active controller, as `cluster info` on node `id` shows it.
    pub(crate) fn controller(&self, id: u32) -> Option<u32> {
        let info = self.ok(id, &["cluster", "info"], "");
        let line = info.lines().find(|l| l.starts_with("Controller:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The rows of `topic describe TOPIC` as node `on` answers it, once that node has
    /// applied the topic's creation (metadata reaches each node on its own time).
    pub(crate) fn describe(&self, on: u32, topic: &str) -> Vec<PartitionRow> {
        let args = ["topic", "describe", topic];
        let mut described = None;
        wait_until(
            "the node to know the topic",
            Duration::from_secs(10),
            || {
                let output = runnel_at(&self.node(on).addr, &args, "");
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    output.status.success() || stderr.contains("unknown topic"),
                    "runnel {args:?} on node {on} failed: {stderr}"
                );
                described = output
                    .status
                    .success()
                    .then(|| partition_rows(&String::from_utf8_lossy(&output.stdout)));
                described.is_some()
            },
        );
        described.unwrap_or_default()
    }

    pub(crate) fn broker_state(&self, on: u32, broker: u32) -> String {
        let info = self.ok(on, &["cluster", "info"], "");
        let brokers = info.split("Brokers:").nth(1).unwrap_or_default();
        brokers
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&broker.to_string()))
            .and_then(|l| l.split('(').nth(1))
            .map(|s| s.trim_end_matches(')').to_string())
            .unwrap_or_default()
    }
}

/// (partition, leader, epoch) rows of `topic describe`.
fn leaders(describe: &str) -> Vec<(u32, u32, i32)> {
    partition_rows(describe)
        .into_iter()
        .map(|r| (r.partition, r.leader, r.epoch))
        .collect()
}

#[test]
fn three_nodes_place_fence_return_and_survive_the_controller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    wait_until("every broker is alive", Duration::from_secs(20), || {
        (1..=3).all(|b| cluster.broker_state(2, b) == "alive")
    });
    let info = cluster.ok(3, &["cluster", "info"], "");
    assert_eq!(info.matches("(leader").count(), 1, "{info}");
    assert_eq!(info.matches("(voter").count(), 2, "{info}");

    cluster.ok(3, &["topic", "create", "spread", "--partitions", "6"], "");
    let placed = leaders(&cluster.ok(1, &["topic", "describe", "spread"], ""));
    assert_eq!(placed.len(), 6);
    let mut led: Vec<u32> = placed.iter().map(|p| p.1).collect();
    led.sort_unstable();
    led.dedup();
    assert_eq!(
        led,
        vec![1, 2, 3],
        "leaders spread over every broker: {placed:?}"
    );
    let err = runnel_at(
        &cluster.node(1).addr,
        &["topic", "create", "rf4", "--replication-factor", "4"],
        "",
    );
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains('4') && stderr.contains('3'),
        "a replication factor above the live brokers names both: {stderr}"
    );

    let input: String = (0..60).map(|i| format!("k{i}:v{i}\n")).collect();
    cluster.ok(1, &["produce", "spread", "--key-separator", ":"], &input);
    let consume = [
        "consume",
        "spread",
        "--from-beginning",
        "--max-messages",
        "60",
    ];
    let values = |out: String| {
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    let mut expected: Vec<String> = (0..60).map(|i| format!("v{i}")).collect();
    expected.sort();
    assert_eq!(values(cluster.ok(2, &consume, "")), expected);

    // A broker that is not the active controller dies: it is fenced, and the partitions
    // it led (with one replica) go offline rather than elsewhere.
    let controller = cluster.controller(1).expect("an active controller");
    let victim = (1..=3)
        .find(|b| *b != controller)
        .expect("a non-controller");
    let other = (1..=3).find(|b| *b != victim).expect("a survivor");
    let before: Vec<(u32, u32, i32)> = placed.iter().copied().filter(|p| p.1 == victim).collect();
    cluster.kill9(victim);
    wait_until(
        "the killed broker is fenced",
        Duration::from_secs(20),
        || cluster.broker_state(other, victim) == "fenced",
    );
    let during = cluster.ok(other, &["topic", "describe", "spread"], "");
    for (partition, _, epoch) in &before {
        let row = leaders(&during)
            .into_iter()
            .find(|p| p.0 == *partition)
            .expect("partition row");
        assert_eq!(row.1, 0, "partition {partition} has no leader: {during}");
        assert!(row.2 > *epoch, "the epoch moved on: {during}");
    }
    assert!(during.contains("has no leader"), "{during}");

    // It returns: it leads its partitions again under a newer epoch, and nothing it held
    // is lost.
    cluster.restart(victim);
    wait_until("the broker is back", Duration::from_secs(20), || {
        cluster.broker_state(other, victim) == "alive"
    });
    wait_until(
        "its partitions are led again",
        Duration::from_secs(20),
        || {
            let now = leaders(&cluster.ok(other, &["topic", "describe", "spread"], ""));
            before.iter().all(|(p, _, epoch)| {
                now.iter()
                    .any(|n| n.0 == *p && n.1 == victim && n.2 > *epoch)
            })
        },
    );
    assert_eq!(values(cluster.ok(other, &consume, "")), expected);

    // The active controller dies: another voter takes over and metadata changes go on.
    let controller = cluster.controller(other).expect("an active controller");
    let survivor = (1..=3).find(|b| *b != controller).expect("a survivor");
    cluster.kill9(controller);
    wait_until(
        "another controller is active",
        Duration::from_secs(20),
        || {
            cluster
                .controller(survivor)
                .is_some_and(|c| c != controller)
        },
    );
    cluster.ok(
        survivor,
        &["topic", "create", "after", "--partitions", "2"],
        "",
    );
    let listed = cluster.ok(survivor, &["topic", "list"], "");
    assert!(
        listed.contains("after") && listed.contains("spread"),
        "{listed}"
    );
}

/// A data directory from before the controller quorum has its metadata in
/// `__cluster_metadata/metadata.json` and no topic ids in partition directories. Such a
/// directory is made here from a current one, with the records and committed offsets
/// it holds, and must come back with all of them.
#[test]
fn a_single_node_data_directory_is_taken_into_the_controller_log() {
    use crate::support::Dev;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let dev = Dev::start(&data);
    dev.ok(
        &[
            "topic",
            "create",
            "old",
            "--partitions",
            "2",
            "--config",
            "retention.ms=86400000",
        ],
        "",
    );
    let input: String = (0..20).map(|i| format!("k{i}:v{i}\n")).collect();
    dev.ok(&["produce", "old", "--key-separator", ":"], &input);
    dev.ok(
        &[
            "consume",
            "old",
            "--group",
            "g",
            "--from-beginning",
            "--max-messages",
            "20",
        ],
        "",
    );
    let committed = dev.ok(&["group", "describe", "g"], "");
    dev.stop();

    // Back to the single-node layout.
    let meta_dir = data.join("__cluster_metadata");
    for file in ["raft.log", "vote.json", "committed.json", "snapshot.json"] {
        let _ = std::fs::remove_file(meta_dir.join(file));
    }
    let partitions = |count: u32| -> String {
        (0..count)
            .map(|_| r#"{"leader":1,"leader_epoch":3,"replicas":[1],"isr":[1]}"#)
            .collect::<Vec<_>>()
            .join(",")
    };
    let internal = r#""configs":{"cleanup.policy":"compact","retention.ms":"-1","segment.bytes":"104857600"},"internal":true"#;
    let legacy = format!(
        r#"{{"cluster_id":"runnel-legacy","controller_id":1,
        "brokers":[{{"id":1,"address":"127.0.0.1:1"}}],
        "topics":{{
          "old":{{"replication_factor":1,"partitions":[{}],"configs":{{"retention.ms":"86400000"}},"internal":false}},
          "__consumer_offsets":{{"replication_factor":1,"partitions":[{}],{internal}}},
          "__connect_offsets":{{"replication_factor":1,"partitions":[{}],{internal}}}
        }}}}"#,
        partitions(2),
        partitions(8),
        partitions(1)
    );
    std::fs::write(meta_dir.join("metadata.json"), legacy).expect("write legacy metadata");
    for entry in std::fs::read_dir(&data).expect("data dir") {
        let _ = std::fs::remove_file(entry.expect("entry").path().join("topic.id"));
    }

    let dev = Dev::start(&data);
    let info = dev.ok(&["cluster", "info"], "");
    assert!(
        info.contains("runnel-legacy"),
        "the cluster keeps its id: {info}"
    );
    let describe = dev.ok(&["topic", "describe", "old"], "");
    assert!(describe.contains("retention.ms=86400000"), "{describe}");
    for (_, leader, epoch) in leaders(&describe) {
        assert_eq!(leader, 1);
        assert!(epoch > 3, "a restart is a new leadership: {describe}");
    }
    let out = dev.ok(
        &["consume", "old", "--from-beginning", "--max-messages", "20"],
        "",
    );
    assert_eq!(out.lines().count(), 20, "{out}");
    assert_eq!(dev.ok(&["group", "describe", "g"], ""), committed);
    assert!(meta_dir.join("metadata.json.imported").exists());
    assert!(!meta_dir.join("metadata.json").exists());
    dev.stop();
    // And a second start does not import again.
    let dev = Dev::start(&data);
    assert!(dev.ok(&["cluster", "info"], "").contains("runnel-legacy"));
}

#[test]
fn dev_starts_a_local_cluster_with_brokers_n() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dev").to_string_lossy().to_string();
    let (mut child, addrs) = crate::support::spawn_listening(&[
        "--brokers",
        "3",
        "dev",
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(addrs.split(',').count(), 3, "{addrs}");
    let info = runnel_at(&addrs, &["cluster", "info"], "");
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert_eq!(
        info.matches("(voter").count() + info.matches("(leader").count(),
        3,
        "{info}"
    );
    for id in 1..=3 {
        assert!(dir.path().join("dev").join(format!("node-{id}")).is_dir());
    }
    let created = runnel_at(&addrs, &["topic", "create", "t", "--partitions", "3"], "");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Partitions of `rows` not led by their preferred replica (the first one).
fn not_preferred(rows: &[PartitionRow], placed: &[PartitionRow]) -> Vec<u32> {
    rows.iter()
        .zip(placed)
        .filter(|(row, first)| row.leader != first.leader)
        .map(|(row, _)| row.partition)
        .collect()
}

/// Three brokers that check leadership balance every `interval_ms` (0: never), and a
/// topic `shared` (3 partitions, 3 replicas); returns the partitions as placed, each led
/// by its preferred replica.
fn cluster_with_shared_topic(root: &Path, interval_ms: &str) -> (Cluster, Vec<PartitionRow>) {
    let cluster = Cluster::start_with(
        root,
        3,
        &["--leader-imbalance-check-interval-ms", interval_ms],
    );
    cluster.ok(
        1,
        &[
            "topic",
            "create",
            "shared",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        "",
    );
    let placed = cluster.describe(1, "shared");
    (cluster, placed)
}

/// Kills the leader of partition 0 of `shared` and waits until every partition has a
/// live leader and an ISR without it; returns the victim and a survivor.
fn kill_first_leader(cluster: &mut Cluster, placed: &[PartitionRow]) -> (u32, u32) {
    let victim = placed[0].leader;
    let survivor = if victim == 1 { 2 } else { 1 };
    cluster.kill9(victim);
    wait_until(
        "the victim's partitions to move",
        Duration::from_secs(20),
        || {
            cluster
                .describe(survivor, "shared")
                .iter()
                .all(|row| row.leader != victim && row.leader != 0 && !row.isr.contains(&victim))
        },
    );
    (victim, survivor)
}

#[test]
fn a_returning_broker_gets_its_leaderships_back_by_election_and_the_filters_show_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Automatic rebalancing off: the election is the user's.
    let (mut cluster, placed) = cluster_with_shared_topic(dir.path(), "0");
    cluster.ok(1, &["topic", "create", "lonely", "--partitions", "3"], "");
    let (victim, survivor) = kill_first_leader(&mut cluster, &placed);
    let listed = cluster.ok(
        survivor,
        &["topic", "list", "--under-replicated", "--unavailable"],
        "",
    );
    assert!(
        listed.contains("shared (3 under-replicated, 0 unavailable)"),
        "{listed}"
    );
    assert!(
        listed.contains("lonely (0 under-replicated, 1 unavailable)"),
        "{listed}"
    );
    let unavailable = cluster.ok(survivor, &["topic", "describe", "--unavailable"], "");
    let rows = partition_rows(&unavailable);
    assert_eq!(rows.len(), 1, "{unavailable}");
    assert_eq!(
        (rows[0].leader, rows[0].replicas.clone()),
        (0, vec![victim])
    );
    assert!(unavailable.contains("Topic: lonely"), "{unavailable}");
    let missing = runnel_at(&cluster.node(survivor).addr, &["topic", "describe"], "");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("name a topic to describe"),
        "{missing:?}"
    );

    cluster.restart(victim);
    wait_until(
        "the victim to rejoin every ISR",
        Duration::from_secs(30),
        || {
            cluster
                .describe(survivor, "shared")
                .iter()
                .all(|row| row.isr.len() == 3)
        },
    );
    assert!(!not_preferred(&cluster.describe(survivor, "shared"), &placed).is_empty());
    let elected = cluster.ok(survivor, &["topic", "elect-leaders", "shared"], "");
    assert!(
        elected.contains("3 of 3 led by their preferred replica"),
        "{elected}"
    );
    let now = cluster.describe(survivor, "shared");
    assert!(not_preferred(&now, &placed).is_empty(), "{elected}");
    assert!(now.iter().zip(&placed).all(|(n, p)| n.epoch >= p.epoch));
    let unknown = runnel_at(
        &cluster.node(1).addr,
        &["topic", "elect-leaders", "nope"],
        "",
    );
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown topic \"nope\""));
}

#[test]
fn leadership_goes_back_to_preferred_replicas_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, placed) = cluster_with_shared_topic(dir.path(), "500");
    let (victim, survivor) = kill_first_leader(&mut cluster, &placed);
    cluster.restart(victim);
    wait_until(
        "every partition to be led by its preferred replica again",
        Duration::from_secs(30),
        || not_preferred(&cluster.describe(survivor, "shared"), &placed).is_empty(),
    );
}
