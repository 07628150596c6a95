//! Replication under faults, with real `runnel broker start` processes: leaders killed
//! with `kill -9` while a producer counts with `acks=all`, followers killed until
//! `min.insync.replicas` refuses writes, and an ISR that grows back. A checker then reads
//! the whole partition and holds every acknowledged write to account.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use runnel_client::{Acks, Client, Producer, ProducerConfig, ProducerRecord};

use crate::cluster::{Cluster, PartitionRow, free_port};
use crate::groups::Member;
use crate::support::{holds_for, runnel_at, wait_until};

/// What a counting producer saw.
struct Counted {
    acknowledged: BTreeSet<i64>,
    failed: BTreeSet<i64>,
}

/// A thread sending 0, 1, 2, ... to partition 0 of a topic with `acks=all`, twenty at
/// a time, noting which were acknowledged and which failed for good.
struct CountingProducer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Counted>,
}

impl CountingProducer {
    /// Starts producing and returns once the first values are acknowledged.
    fn start(cluster: &Cluster, topic: &'static str) -> CountingProducer {
        Self::start_with(cluster, topic, false)
    }

    /// Like [`CountingProducer::start`]; `idempotent` numbers its batches, so that no
    /// retry writes a value twice.
    fn start_with(cluster: &Cluster, topic: &'static str, idempotent: bool) -> CountingProducer {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let brokers: Vec<String> = cluster.addresses().split(',').map(str::to_string).collect();
        let (stopping, progress) = (stop.clone(), acknowledged.clone());
        let thread = std::thread::spawn(move || {
            crate::runtime().block_on(count(brokers, topic, idempotent, &stopping, &progress))
        });
        let producer = CountingProducer {
            stop,
            acknowledged,
            thread,
        };
        producer.await_progress(20);
        producer
    }

    /// Waits until `more` values beyond those acknowledged so far are acknowledged.
    fn await_progress(&self, more: usize) {
        let target = self.acknowledged.load(Ordering::Acquire) + more;
        wait_until(
            "the producer's writes are acknowledged",
            Duration::from_secs(30),
            || self.acknowledged.load(Ordering::Acquire) >= target,
        );
    }

    /// Stops producing and returns what the producer saw.
    fn finish(self) -> Counted {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the producer thread")
    }
}

async fn count(
    brokers: Vec<String>,
    topic: &str,
    idempotent: bool,
    stop: &AtomicBool,
    progress: &AtomicUsize,
) -> Counted {
    let client = Client::connect(&brokers).await.expect("connect");
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(1),
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_millis(500),
            // Past a failover (about 3 s here); a write failing for good is counted as
            // failed, never as lost.
            delivery_timeout: Duration::from_secs(15),
            // A leader cut off or paused answers nothing: retry elsewhere soon.
            request_timeout: Duration::from_secs(3),
            idempotent,
            ..ProducerConfig::default()
        },
    );
    let mut counted = Counted {
        acknowledged: BTreeSet::new(),
        failed: BTreeSet::new(),
    };
    let mut next = 0i64;
    while !stop.load(Ordering::Acquire) {
        let mut deliveries = Vec::new();
        for _ in 0..20 {
            let record = ProducerRecord::new(topic)
                .partition(0)
                .value(next.to_string());
            match producer.send(record).await {
                Ok(delivery) => deliveries.push((next, delivery)),
                Err(_) => {
                    counted.failed.insert(next);
                }
            }
            next += 1;
        }
        for (value, delivery) in deliveries {
            match delivery.await {
                Ok(_) => counted.acknowledged.insert(value),
                Err(_) => counted.failed.insert(value),
            };
        }
        progress.store(counted.acknowledged.len(), Ordering::Release);
    }
    counted
}

/// Creates `topic` with one partition, `rf` replicas and, when given, a
/// `min.insync.replicas`.
pub(crate) fn create_topic(cluster: &Cluster, topic: &str, rf: u32, min_insync: Option<u32>) {
    create_topic_with(cluster, topic, 1, rf, min_insync);
}

/// Like [`create_topic`], with `partitions` partitions.
pub(crate) fn create_topic_with(
    cluster: &Cluster,
    topic: &str,
    partitions: u32,
    rf: u32,
    min_insync: Option<u32>,
) {
    let (partitions, rf) = (partitions.to_string(), rf.to_string());
    let min_insync = min_insync.map(|m| format!("min.insync.replicas={m}"));
    let mut args = vec![
        "topic",
        "create",
        topic,
        "--partitions",
        &partitions,
        "--replication-factor",
        &rf,
    ];
    if let Some(config) = &min_insync {
        args.extend(["--config", config.as_str()]);
    }
    cluster.ok(1, &args, "");
    // Metadata reaches each node on its own time: every running node knows the topic
    // before the test talks to it.
    for id in cluster.running() {
        cluster.describe(id, topic);
    }
}

/// Reads partition 0 of `topic` from node `on` (its leader) up to its high watermark:
/// (offset, value) in log order.
fn read_all(cluster: &Cluster, on: u32, topic: &str) -> Vec<(i64, i64)> {
    let row = partition0(cluster, on, topic);
    let count = row.high_watermark.to_string();
    let out = cluster.ok(
        on,
        &[
            "consume",
            topic,
            "--from-beginning",
            "--print-offset",
            "--max-messages",
            &count,
        ],
        "",
    );
    out.lines()
        .map(|line| {
            // Partition:0<TAB>Offset:N<TAB>VALUE
            let mut fields = line.split('\t');
            let offset = fields
                .nth(1)
                .and_then(|f| f.strip_prefix("Offset:"))
                .and_then(|o| o.parse().ok())
                .unwrap_or_else(|| panic!("offset in {line:?}"));
            let value = fields
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("value in {line:?}"));
            (offset, value)
        })
        .collect()
}

fn partition0(cluster: &Cluster, on: u32, topic: &str) -> PartitionRow {
    cluster
        .describe(on, topic)
        .into_iter()
        .find(|r| r.partition == 0)
        .expect("partition 0")
}

/// Checks what the partition holds against what the producer was told: every
/// acknowledged value is there, no offset appears twice, and nothing is there that was
/// never sent. Values that failed may or may not be there; values may repeat (a retry
/// after a lost answer writes again until producers are idempotent). Returns how many
/// repeated.
fn check(read: &[(i64, i64)], counted: &Counted) -> usize {
    let offsets: Vec<i64> = read.iter().map(|(o, _)| *o).collect();
    let expected: Vec<i64> = (0..read.len() as i64).collect();
    assert_eq!(offsets, expected, "offsets are dense and each appears once");
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for (_, value) in read {
        *seen.entry(*value).or_default() += 1;
    }
    let lost: Vec<&i64> = counted
        .acknowledged
        .iter()
        .filter(|v| !seen.contains_key(v))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged values are missing: {:?}",
        lost.len(),
        lost.iter().take(20).collect::<Vec<_>>()
    );
    let sent_max = counted
        .acknowledged
        .iter()
        .chain(&counted.failed)
        .max()
        .copied()
        .unwrap_or(-1);
    assert!(
        seen.keys().all(|v| *v <= sent_max),
        "only sent values are stored"
    );
    seen.values().filter(|n| **n > 1).count()
}

#[test]
fn acks_all_keeps_every_acknowledged_write_across_five_leader_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "counts", 3, Some(2));
    // Idempotent: a batch retried across a failover is written once.
    let producer = CountingProducer::start_with(&cluster, "counts", true);
    let mut kills = Vec::new();
    for round in 0..5 {
        let survivor_of = |victim: u32| (1..=3).find(|n| *n != victim).expect("a survivor");
        let before = partition0(&cluster, 1 + round % 3, "counts");
        let victim = before.leader;
        assert_ne!(victim, 0, "the partition has a leader before round {round}");
        let survivor = survivor_of(victim);
        cluster.kill9(victim);
        let killed_at = std::time::Instant::now();
        wait_until(
            "another in-sync replica leads",
            Duration::from_secs(30),
            || {
                let row = partition0(&cluster, survivor, "counts");
                row.leader != 0 && row.leader != victim && row.epoch > before.epoch
            },
        );
        kills.push(killed_at.elapsed());
        cluster.restart(victim);
        wait_until(
            "the restarted broker is back in the ISR",
            Duration::from_secs(30),
            || partition0(&cluster, survivor, "counts").isr == vec![1, 2, 3],
        );
    }
    let counted = producer.finish();
    assert!(
        counted.acknowledged.len() > 100,
        "the producer kept going: {} acknowledged",
        counted.acknowledged.len()
    );
    let leader = partition0(&cluster, 1, "counts").leader;
    let read = read_all(&cluster, leader, "counts");
    let repeated = check(&read, &counted);
    eprintln!(
        "five leader kills: {} acknowledged, {} failed, {} stored, {} repeated by retries; new leader after {:?}",
        counted.acknowledged.len(),
        counted.failed.len(),
        read.len(),
        repeated,
        kills
    );
    assert_eq!(
        repeated, 0,
        "an idempotent producer's retries wrote values twice"
    );
    // Every replica holds the same records: read each one as the leader.
    for id in 1..=3 {
        let row = partition0(&cluster, id, "counts");
        assert_eq!(row.isr, vec![1, 2, 3]);
    }
}

#[test]
fn followers_die_min_insync_refuses_and_the_isr_grows_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Five voters, so that the controller quorum outlives two dead brokers.
    let mut cluster = Cluster::start(dir.path(), 5);
    create_topic(&cluster, "guarded", 3, Some(2));
    let row = partition0(&cluster, 1, "guarded");
    let leader = row.leader;
    let followers: Vec<u32> = row
        .replicas
        .iter()
        .copied()
        .filter(|r| *r != leader)
        .collect();
    let produce = |cluster: &Cluster, value: &str| {
        runnel_at(
            &cluster.node(leader).addr,
            &[
                "produce",
                "guarded",
                "--acks",
                "all",
                "--partition",
                "0",
                "--delivery-timeout-ms",
                "3000",
            ],
            &format!("{value}\n"),
        )
    };
    assert!(produce(&cluster, "all-three").status.success());

    cluster.kill9(followers[0]);
    wait_until("the ISR shrinks to two", Duration::from_secs(30), || {
        partition0(&cluster, leader, "guarded").isr.len() == 2
    });
    let out = produce(&cluster, "two-of-three");
    assert!(
        out.status.success(),
        "acks=all goes on with two in sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    cluster.kill9(followers[1]);
    wait_until("the ISR shrinks to one", Duration::from_secs(30), || {
        partition0(&cluster, leader, "guarded").isr == vec![leader]
    });
    let out = produce(&cluster, "refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not enough in-sync replicas"),
        "below min.insync.replicas acks=all is refused: {stderr}"
    );

    cluster.restart(followers[0]);
    cluster.restart(followers[1]);
    wait_until(
        "the ISR grows back to three",
        Duration::from_secs(30),
        || partition0(&cluster, leader, "guarded").isr.len() == 3,
    );
    let out = cluster.ok(
        leader,
        &[
            "consume",
            "guarded",
            "--from-beginning",
            "--max-messages",
            "2",
        ],
        "",
    );
    assert_eq!(
        out, "all-three\ntwo-of-three\n",
        "the refused write was never stored"
    );
    // The returned followers hold the same records.
    for follower in &followers {
        let row = partition0(&cluster, *follower, "guarded");
        assert_eq!(row.high_watermark, 2, "{row:?}");
    }
}

#[test]
fn a_paused_leader_is_replaced_and_acknowledges_nothing_when_it_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "paused", 3, Some(2));
    let producer = CountingProducer::start(&cluster, "paused");
    let before = partition0(&cluster, 1, "paused");
    let paused = before.leader;
    let survivor = (1..=3).find(|n| *n != paused).expect("a survivor");
    // Longer than the broker session: the controller fences it and elects another.
    cluster.signal(paused, "-STOP");
    wait_until("another replica leads", Duration::from_secs(30), || {
        let row = partition0(&cluster, survivor, "paused");
        row.leader != 0 && row.leader != paused
    });
    cluster.signal(paused, "-CONT");
    wait_until(
        "the resumed broker follows and is back in the ISR",
        Duration::from_secs(30),
        || partition0(&cluster, survivor, "paused").isr == vec![1, 2, 3],
    );
    producer.await_progress(100);
    let counted = producer.finish();
    let leader = partition0(&cluster, survivor, "paused").leader;
    let read = read_all(&cluster, leader, "paused");
    check(&read, &counted);
    // The old leader's log is the new leader's: whatever it held beyond is gone.
    wait_until(
        "every replica has the same log",
        Duration::from_secs(10),
        || {
            let ends: Vec<i64> = (1..=3)
                .map(|id| partition0(&cluster, id, "paused").high_watermark)
                .collect();
            ends.iter().all(|e| *e == read.len() as i64)
        },
    );
}

#[test]
fn every_broker_killed_at_once_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "blackout", 3, Some(2));
    let producer = CountingProducer::start(&cluster, "blackout");
    producer.await_progress(200);
    for id in 1..=3 {
        cluster.kill9(id);
    }
    let counted = producer.finish();
    assert!(!counted.acknowledged.is_empty());
    cluster.restart_all();
    wait_until(
        "the partition has a leader again",
        Duration::from_secs(30),
        || partition0(&cluster, 1, "blackout").leader != 0,
    );
    let leader = partition0(&cluster, 1, "blackout").leader;
    wait_until(
        "its high watermark covers the log",
        Duration::from_secs(30),
        || {
            let row = partition0(&cluster, leader, "blackout");
            row.high_watermark as usize >= counted.acknowledged.len()
        },
    );
    let read = read_all(&cluster, leader, "blackout");
    check(&read, &counted);
}

#[test]
fn unclean_election_is_off_by_default_and_loses_only_what_it_logs_when_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 5);
    create_topic(&cluster, "risky", 2, None);
    let row = partition0(&cluster, 1, "risky");
    let leader = row.leader;
    let follower = *row
        .replicas
        .iter()
        .find(|r| **r != leader)
        .expect("a follower");
    let observer = (1..=5)
        .find(|n| !row.replicas.contains(n))
        .expect("a broker that holds no replica");
    let produce = |cluster: &Cluster, value: &str| {
        let out = runnel_at(
            &cluster.node(leader).addr,
            &["produce", "risky", "--acks", "1", "--partition", "0"],
            &format!("{value}\n"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    produce(&cluster, "both-have-it");
    wait_until("the follower has it", Duration::from_secs(10), || {
        partition0(&cluster, follower, "risky").high_watermark == 1
    });
    // The follower dies; the leader, alone in the ISR, takes one more write; then it dies.
    cluster.kill9(follower);
    wait_until(
        "the ISR is the leader alone",
        Duration::from_secs(30),
        || partition0(&cluster, observer, "risky").isr == vec![leader],
    );
    produce(&cluster, "only-the-leader-has-it");
    cluster.kill9(leader);
    cluster.restart(follower);
    wait_until(
        "the leader is fenced and the out-of-sync follower alive",
        Duration::from_secs(30),
        || {
            cluster.broker_state(observer, leader) == "fenced"
                && cluster.broker_state(observer, follower) == "alive"
        },
    );
    // The active controller looks for elections every 100 ms: over ten times that, an
    // unclean one would have happened.
    holds_for(
        "the partition stays offline",
        Duration::from_secs(1),
        || partition0(&cluster, observer, "risky").leader == 0,
    );
    let describe = cluster.ok(observer, &["topic", "describe", "risky"], "");
    assert!(describe.contains("has no leader"), "{describe}");

    cluster.ok(
        observer,
        &[
            "topic",
            "alter-config",
            "risky",
            "--config",
            "unclean.leader.election.enable=true",
        ],
        "",
    );
    wait_until(
        "the out-of-sync replica leads",
        Duration::from_secs(30),
        || partition0(&cluster, observer, "risky").leader == follower,
    );
    let out = cluster.ok(
        follower,
        &[
            "consume",
            "risky",
            "--from-beginning",
            "--max-messages",
            "1",
        ],
        "",
    );
    assert_eq!(out, "both-have-it\n", "only what the ISR alone had is lost");
}

#[test]
fn sigterm_hands_leadership_over_before_the_broker_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "rolling", 3, None);
    let producer = CountingProducer::start(&cluster, "rolling");
    // A rolling restart: each broker in turn stops with SIGTERM and comes back.
    for _ in 0..3 {
        let leader = partition0(&cluster, 1, "rolling").leader;
        let survivor = (1..=3).find(|n| *n != leader).expect("a survivor");
        cluster.terminate(leader);
        // Handed over before it exited, not after a broker session.
        let row = partition0(&cluster, survivor, "rolling");
        assert!(
            row.leader != leader && row.leader != 0,
            "leadership moved before the broker stopped: {row:?}"
        );
        assert!(!row.isr.contains(&leader), "{row:?}");
        cluster.restart(leader);
        wait_until("the ISR is whole again", Duration::from_secs(30), || {
            partition0(&cluster, survivor, "rolling").isr == vec![1, 2, 3]
        });
    }
    let counted = producer.finish();
    assert!(
        counted.failed.is_empty(),
        "no write failed during the rolling restart: {} failed",
        counted.failed.len()
    );
    let leader = partition0(&cluster, 1, "rolling").leader;
    let read = read_all(&cluster, leader, "rolling");
    check(&read, &counted);
}

/// Moves partition 0 of `topic` to `replicas` with `topic reassign` through node 1 and
/// waits until the move is complete; returns the plan file's path.
fn reassign_partition0(
    cluster: &Cluster,
    dir: &std::path::Path,
    topic: &str,
    replicas: &[u32],
) -> String {
    let replicas: Vec<String> = replicas.iter().map(u32::to_string).collect();
    let plan = dir.join("plan.json");
    std::fs::write(
        &plan,
        format!(
            r#"{{"version":1,"partitions":[{{"topic":"{topic}","partition":0,"replicas":[{}]}}]}}"#,
            replicas.join(",")
        ),
    )
    .expect("plan written");
    let plan = plan.to_string_lossy().to_string();
    cluster.ok(1, &["topic", "reassign", "--plan", &plan, "--execute"], "");
    await_reassignment(cluster, 1, &plan);
    plan
}

/// Moves partition 0 of `topic` to `replicas` and makes the first of them its leader.
fn lead_partition0_with(cluster: &Cluster, dir: &std::path::Path, topic: &str, replicas: &[u32]) {
    reassign_partition0(cluster, dir, topic, replicas);
    cluster.ok(1, &["topic", "elect-leaders", topic], "");
}

/// Runs `topic reassign --plan PLAN --verify` on node `on` until every move is complete.
fn await_reassignment(cluster: &Cluster, on: u32, plan: &str) {
    wait_until(
        "the reassignment to finish",
        Duration::from_secs(60),
        || {
            let out = cluster.ok(on, &["topic", "reassign", "--plan", plan, "--verify"], "");
            out.contains("1 of 1 partitions moved")
        },
    );
}

#[test]
fn a_reassignment_under_load_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(dir.path(), 4);
    create_topic(&cluster, "moving", 3, Some(2));
    // First onto brokers 1, 2 and 3, whatever the placement was.
    let plan_path = reassign_partition0(&cluster, dir.path(), "moving", &[1, 2, 3]);
    assert_eq!(partition0(&cluster, 1, "moving").replicas, vec![1, 2, 3]);

    // Then to 2, 3 and 4 while a producer and a group consumer run, throttled.
    let producer = CountingProducer::start(&cluster, "moving");
    let mut consumer = Member::start_with_session(
        &cluster.addresses(),
        "moving",
        "watchers",
        dir.path(),
        "consumer",
        10_000,
    );
    producer.await_progress(300);
    let generated = cluster.ok(
        2,
        &[
            "topic",
            "reassign",
            "--plan",
            &plan_path,
            "--generate",
            "--broker-ids",
            "2,3,4",
            "--topics",
            "moving",
        ],
        "",
    );
    assert!(generated.contains(r#""replicas":[2,3,4]"#), "{generated}");
    let started = cluster.ok(
        2,
        &[
            "topic",
            "reassign",
            "--plan",
            &plan_path,
            "--execute",
            "--throttle",
            "200000",
        ],
        "",
    );
    assert!(started.contains("Started moving 1 partition"), "{started}");
    await_reassignment(&cluster, 2, &plan_path);
    producer.await_progress(300);
    let counted = producer.finish();
    let row = partition0(&cluster, 2, "moving");
    assert_eq!(row.replicas, vec![2, 3, 4]);
    assert!(row.isr.iter().all(|r| [2, 3, 4].contains(r)), "{row:?}");
    // Broker 1 no longer holds a copy.
    assert!(!dir.path().join("node-1/moving-0").exists());
    let read = read_all(&cluster, row.leader, "moving");
    check(&read, &counted);
    // The consumer followed the move: every record once, none twice.
    wait_until(
        "the consumer to read everything",
        Duration::from_secs(30),
        || consumer.seen().len() >= read.len(),
    );
    consumer.interrupt();
    let seen = consumer.seen();
    let distinct: BTreeSet<(u32, i64)> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "a record was delivered twice");
    assert_eq!(distinct.len(), read.len(), "every record was delivered");
}

#[test]
fn a_replica_whose_log_is_damaged_is_rebuilt_from_its_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic(&cluster, "fragile", 3, None);
    let leader = partition0(&cluster, 1, "fragile").leader;
    for batch in 0..5 {
        let input: String = (0..20).map(|i| format!("b{batch}-{i}\n")).collect();
        cluster.ok(
            leader,
            &["produce", "fragile", "--acks", "all", "--partition", "0"],
            &input,
        );
    }
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    wait_until(
        "the follower has everything",
        Duration::from_secs(10),
        || partition0(&cluster, follower, "fragile").log_end == 100,
    );
    cluster.kill9(follower);
    // A flipped byte inside the first of five batches: the log fails closed on open.
    let replica_dir = dir.path().join(format!("node-{follower}/fragile-0"));
    let segment = replica_dir.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).expect("segment");
    bytes[100] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("damaged");
    cluster.restart(follower);
    let leader_row = partition0(&cluster, leader, "fragile");
    wait_until(
        "the rebuilt replica to hold the leader's log and rejoin the ISR",
        Duration::from_secs(30),
        || {
            let row = partition0(&cluster, follower, "fragile");
            row.log_end == leader_row.log_end
                && row.size_bytes == leader_row.size_bytes
                && row.isr == vec![1, 2, 3]
        },
    );
    // The damaged log is kept aside for inspection, not deleted.
    let kept: Vec<String> = std::fs::read_dir(dir.path().join(format!("node-{follower}")))
        .expect("data dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("fragile-0.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
}

#[test]
fn killing_the_active_controller_that_leads_a_partition_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    let controller = cluster.controller(1).expect("an active controller");
    let others: Vec<u32> = (1..=3).filter(|b| *b != controller).collect();
    create_topic(&cluster, "steered", 3, Some(2));
    // Make the active controller the partition's leader: first replica, then elected.
    lead_partition0_with(
        &cluster,
        dir.path(),
        "steered",
        &[controller, others[0], others[1]],
    );
    let before = partition0(&cluster, others[0], "steered");
    assert_eq!(before.leader, controller, "{before:?}");

    let producer = CountingProducer::start(&cluster, "steered");
    producer.await_progress(100);
    cluster.kill9(controller);
    let survivor = others[0];
    wait_until(
        "another controller to be active",
        Duration::from_secs(20),
        || {
            cluster
                .controller(survivor)
                .is_some_and(|c| c != controller)
        },
    );
    // The new controller fences the old one: an election and an ISR change follow.
    wait_until(
        "a new leader without the dead broker in the ISR",
        Duration::from_secs(20),
        || {
            let row = partition0(&cluster, survivor, "steered");
            row.leader != controller
                && row.leader != 0
                && row.epoch > before.epoch
                && !row.isr.contains(&controller)
        },
    );
    producer.await_progress(100);
    cluster.ok(survivor, &["topic", "create", "after-failover"], "");
    cluster.restart(controller);
    wait_until("the ISR to grow back", Duration::from_secs(30), || {
        partition0(&cluster, survivor, "steered").isr.len() == 3
    });
    producer.await_progress(100);
    let counted = producer.finish();
    let leader = partition0(&cluster, survivor, "steered").leader;
    let read = read_all(&cluster, leader, "steered");
    check(&read, &counted);
}

/// A small tmpfs mounted on a directory for the length of a test (needs root, as the
/// test machine has).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk(dir.to_path_buf())
    }

    fn grow(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount runs");
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_moves_leadership_away_and_the_replica_recovers_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Broker 3's copy of the partition lives on a 1 MiB disk.
    let disk = SmallDisk::mount(&dir.path().join("node-3/full-0"), "1m");
    // While the disk stays full, broker 3's replica reopens, catches up on what fits and
    // rejoins the ISR before failing again; the preferred-leader check must not hand
    // it the leadership in such a window (a slow run reaches its 30 s interval).
    let cluster = Cluster::start_with(
        dir.path(),
        3,
        &["--leader-imbalance-check-interval-ms", "0"],
    );
    create_topic(&cluster, "full", 3, Some(2));
    // 2.2 MB with acks=all: every line is acknowledged although one replica fills up.
    let input: String = (0..20_000)
        .map(|i| format!("{i:08}{}\n", "x".repeat(100)))
        .collect();
    let out = runnel_at(
        &cluster.addresses(),
        &["produce", "full", "--acks", "all"],
        &input,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "broker 3 to leave the ISR and lead nothing",
        Duration::from_secs(20),
        || {
            let row = partition0(&cluster, 1, "full");
            !row.isr.contains(&3) && row.leader != 3 && row.leader != 0
        },
    );
    let row = partition0(&cluster, 1, "full");
    assert!(row.high_watermark >= 20_000, "{row:?}");
    // Space comes back: the replica opens its log again (at its next try, which backs
    // off up to 30 s while the disk stays full), catches up and rejoins.
    disk.grow("64m");
    let leader = row.leader;
    wait_until(
        "broker 3 to catch up and rejoin the ISR",
        Duration::from_secs(60),
        || {
            let lead = partition0(&cluster, leader, "full");
            let own = partition0(&cluster, 3, "full");
            own.isr.contains(&3) && own.log_end == lead.log_end
        },
    );
    drop(cluster);
}

/// A network namespace joined to the test's own by a veth pair: 10.231.7.1 on this
/// side, 10.231.7.2 inside. `cut` takes the link down; everything goes on drop.
struct Netns {
    name: String,
    host_side: String,
}

const NETNS_HOST: &str = "10.231.7.1";
const NETNS_INSIDE: &str = "10.231.7.2";

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    fn create() -> Netns {
        let tag = std::process::id() % 100_000;
        let netns = Netns {
            name: format!("runnel-{tag}"),
            host_side: format!("rnh{tag}"),
        };
        let inside = format!("rnn{tag}");
        // Left over from a run that was killed: gone first.
        ip(&["link", "del", &netns.host_side]);
        ip(&["netns", "del", &netns.name]);
        let name = netns.name.as_str();
        let host = netns.host_side.as_str();
        for step in [
            vec!["netns", "add", name],
            vec!["link", "add", host, "type", "veth", "peer", "name", &inside],
            vec!["link", "set", &inside, "netns", name],
            vec!["addr", "add", "10.231.7.1/24", "dev", host],
            vec!["link", "set", host, "up"],
            vec!["-n", name, "addr", "add", "10.231.7.2/24", "dev", &inside],
            vec!["-n", name, "link", "set", &inside, "up"],
            vec!["-n", name, "link", "set", "lo", "up"],
        ] {
            assert!(
                ip(&step),
                "ip {step:?} failed (network namespaces need root)"
            );
        }
        netns
    }

    fn cut(&self) {
        assert!(ip(&["link", "set", &self.host_side, "down"]));
    }

    fn heal(&self) {
        assert!(ip(&["link", "set", &self.host_side, "up"]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_side]);
        ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_leader_cut_off_in_a_network_namespace_is_replaced_and_rejoins_when_healed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let netns = Netns::create();
    let places = vec![
        (format!("{NETNS_HOST}:{}", free_port()), None),
        (format!("{NETNS_HOST}:{}", free_port()), None),
        (
            format!("{NETNS_INSIDE}:{}", free_port()),
            Some(netns.name.clone()),
        ),
    ];
    let cluster = Cluster::start_placed(dir.path(), places, &[]);
    create_topic(&cluster, "island", 3, Some(2));
    // Broker 3, the one in the namespace, leads the partition.
    lead_partition0_with(&cluster, dir.path(), "island", &[3, 1, 2]);
    let before = partition0(&cluster, 1, "island");
    assert_eq!(before.leader, 3, "{before:?}");

    let producer = CountingProducer::start(&cluster, "island");
    producer.await_progress(100);
    netns.cut();
    wait_until(
        "brokers 1 and 2 to elect a new leader",
        Duration::from_secs(30),
        || {
            let row = partition0(&cluster, 1, "island");
            row.leader != 3 && row.leader != 0 && row.epoch > before.epoch
        },
    );
    // Writes go on without the cut-off leader, which acknowledges nothing.
    producer.await_progress(200);
    netns.heal();
    let leader = partition0(&cluster, 1, "island").leader;
    wait_until(
        "broker 3 to follow, truncate and rejoin the ISR",
        Duration::from_secs(40),
        || {
            let lead = partition0(&cluster, leader, "island");
            let own = partition0(&cluster, 3, "island");
            own.leader == leader && lead.isr.len() == 3 && own.log_end >= lead.high_watermark
        },
    );
    let counted = producer.finish();
    let read = read_all(&cluster, leader, "island");
    check(&read, &counted);
    drop(cluster);
}
