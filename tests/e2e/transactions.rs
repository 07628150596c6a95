//! Transactions end to end: the CLI's transactional producer and read_committed
//! consumer, zombie fencing, timeouts and the administration commands on one node; and a
//! Jepsen-style run on three brokers where transactional producers commit and abort at
//! random while the coordinators' and leaders' brokers are killed with `kill -9`, after
//! which a read_committed checker holds every transaction to account.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use runnel_client::v1::IsolationLevel;
use runnel_client::{
    Client, Consumer, ConsumerConfig, ErrorCode, Producer, ProducerConfig, ProducerRecord,
    StartFrom,
};

use crate::cluster::{Cluster, partition_rows};
use crate::replication::create_topic_with;
use crate::support::{Dev, wait_until};

fn sorted(output: &str) -> Vec<String> {
    let mut lines: Vec<String> = output.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn transactional(brokers: &[String], id: &str, timeout: Duration) -> (Client, ProducerConfig) {
    let client = crate::runtime()
        .block_on(Client::connect(brokers))
        .expect("connect");
    let config = ProducerConfig {
        transactional_id: Some(id.to_string()),
        transaction_timeout: timeout,
        linger: Duration::from_millis(1),
        retry_backoff: Duration::from_millis(50),
        retry_backoff_max: Duration::from_millis(500),
        delivery_timeout: Duration::from_secs(20),
        request_timeout: Duration::from_secs(3),
        ..ProducerConfig::default()
    };
    (client, config)
}

#[test]
fn the_cli_commits_aborts_and_reads_committed_and_zombies_are_fenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "orders", "--partitions", "2"], "");
    // Ten lines, committed in transactions of four (and the rest at the end).
    let input: String = (1..=10).map(|i| format!("line-{i}\n")).collect();
    dev.ok(
        &[
            "produce",
            "orders",
            "--transactional-id",
            "cli",
            "--transaction-records",
            "4",
        ],
        &input,
    );
    let committed = |dev: &Dev| {
        sorted(&dev.ok(
            &[
                "consume",
                "orders",
                "--from-beginning",
                "--isolation",
                "read_committed",
                "--timeout-ms",
                "1500",
            ],
            "",
        ))
    };
    let mut expected: Vec<String> = (1..=10).map(|i| format!("line-{i}")).collect();
    expected.sort();
    assert_eq!(committed(&dev), expected);
    // A line without the key separator aborts the whole input's transaction.
    let failed = dev.fails(
        &[
            "produce",
            "orders",
            "--transactional-id",
            "cli",
            "--key-separator",
            ":",
        ],
        "k:aborted-1\nno separator\n",
    );
    assert!(failed.contains("aborted"), "{failed}");
    assert_eq!(committed(&dev), expected, "nothing of the aborted input");
    let everything = dev.ok(
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--timeout-ms",
            "1500",
        ],
        "",
    );
    assert!(
        everything.contains("aborted-1"),
        "read_uncommitted sees the aborted record: {everything}"
    );
    // Clients without a batch codec: the broker filters aborted records from messages.
    let as_messages = |isolation: IsolationLevel| -> Vec<String> {
        crate::runtime().block_on(async {
            let mut rpc = runnel_client::v1::consumer_client::ConsumerClient::connect(format!(
                "http://{}",
                dev.addr
            ))
            .await
            .expect("connect");
            let mut values = Vec::new();
            for partition in 0..2 {
                let response = rpc
                    .fetch(runnel_client::v1::FetchRequest {
                        partitions: vec![runnel_client::v1::FetchPartition {
                            topic: "orders".into(),
                            partition,
                            offset: 0,
                            max_bytes: 0,
                        }],
                        max_wait_ms: 100,
                        format: runnel_client::v1::RecordFormat::Messages as i32,
                        isolation: isolation as i32,
                        ..Default::default()
                    })
                    .await
                    .expect("fetch")
                    .into_inner();
                for fetched in response.partitions {
                    values.extend(fetched.messages.into_iter().map(|m| {
                        String::from_utf8_lossy(m.value.as_deref().unwrap_or_default()).to_string()
                    }));
                }
            }
            values.sort();
            values
        })
    };
    assert_eq!(as_messages(IsolationLevel::ReadCommitted), expected);
    assert!(
        as_messages(IsolationLevel::ReadUncommitted).contains(&"aborted-1".to_string()),
        "read_uncommitted messages include the aborted record"
    );
    let list = dev.ok(&["transaction", "list"], "");
    assert!(
        list.contains("cli") && list.contains("CompleteAbort"),
        "{list}"
    );
    let describe = dev.fails(&["transaction", "describe", "nobody"], "");
    assert!(describe.contains("unknown transactional id"), "{describe}");

    // A zombie: the first instance is fenced when a second one initialises, and its
    // open transaction is aborted; a transaction left open holds the stable offset until
    // its timeout aborts it.
    let brokers = [dev.addr.clone()];
    crate::runtime().block_on(async {
        let client = Client::connect(&brokers).await.expect("connect");
        let config = ProducerConfig {
            transactional_id: Some("twin".into()),
            linger: Duration::from_millis(1),
            ..ProducerConfig::default()
        };
        let first = Producer::new(client.clone(), config.clone());
        first.init_transactions().await.expect("init");
        first.begin_transaction().expect("begin");
        first
            .send(ProducerRecord::new("orders").partition(0).value("zombie-1"))
            .await
            .expect("send")
            .await
            .expect("written");
        let second = Producer::new(client.clone(), config.clone());
        second.init_transactions().await.expect("init the second");
        let late = first
            .send(ProducerRecord::new("orders").partition(0).value("zombie-2"))
            .await
            .expect("send")
            .await;
        assert_eq!(
            late.expect_err("the zombie's write is refused").code(),
            Some(ErrorCode::ProducerFenced)
        );
        let commit = first.commit_transaction().await;
        assert!(commit.is_err(), "the zombie cannot commit");
        second.begin_transaction().expect("begin");
        second
            .send(ProducerRecord::new("orders").partition(0).value("twin-1"))
            .await
            .expect("send");
        second.commit_transaction().await.expect("commit");

        let hanging = Producer::new(
            client.clone(),
            ProducerConfig {
                transactional_id: Some("slow".into()),
                transaction_timeout: Duration::from_secs(3),
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        );
        hanging.init_transactions().await.expect("init");
        hanging.begin_transaction().expect("begin");
        hanging
            .send(ProducerRecord::new("orders").partition(1).value("never"))
            .await
            .expect("send")
            .await
            .expect("written");
        // Left open (the producer went quiet).
    });
    let row = |dev: &Dev| {
        let out = dev.ok(&["topic", "describe", "orders"], "");
        let row = partition_rows(&out)
            .into_iter()
            .find(|r| r.partition == 1)
            .expect("partition 1");
        (row.high_watermark, row.last_stable_offset, out)
    };
    let (high_watermark, stable, out) = row(&dev);
    assert!(
        stable < high_watermark,
        "an open transaction holds the stable offset back: {out}"
    );
    assert!(out.contains("has a transaction open"), "{out}");
    let hanging = dev.ok(
        &[
            "transaction",
            "find-hanging",
            "orders",
            "--older-than-ms",
            "0",
        ],
        "",
    );
    assert!(hanging.lines().count() >= 2, "{hanging}");
    wait_until(
        "the coordinator aborts the transaction after its timeout",
        Duration::from_secs(20),
        || {
            let (high_watermark, stable, _) = row(&dev);
            stable == high_watermark
        },
    );
    let seen = committed(&dev);
    assert!(seen.contains(&"twin-1".to_string()), "{seen:?}");
    for absent in ["zombie-1", "zombie-2", "never", "aborted-1"] {
        assert!(!seen.contains(&absent.to_string()), "{absent}: {seen:?}");
    }
    let slow = dev.ok(&["transaction", "describe", "slow"], "");
    assert!(slow.contains("CompleteAbort"), "{slow}");
}

/// What one transactional producer did.
#[derive(Default)]
struct History {
    /// Transactions whose commit was acknowledged, with their values in send order per
    /// partition.
    committed: Vec<Vec<String>>,
    /// Transactions aborted (by the producer, or left open by a "crashed" instance).
    aborted: Vec<Vec<String>>,
    /// Transactions whose end is unknown (the commit call failed).
    indeterminate: Vec<Vec<String>>,
}

/// A producer writing transactions of 1 to 8 records across the topic's partitions,
/// committing two in three and aborting the rest. Every seventh transaction it
/// "crashes" instead: the instance is dropped with the transaction open and a new one
/// takes over the transactional id (which aborts what the old one left).
fn run_producer(
    brokers: Vec<String>,
    id: String,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> History {
    let (client, config) = transactional(&brokers, &id, Duration::from_secs(10));
    crate::runtime().block_on(async move {
        let mut history = History::default();
        let mut producer = Producer::new(client.clone(), config.clone());
        init(&producer).await;
        let mut seed = id
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut txn = 0u64;
        while !stop.load(Ordering::Acquire) {
            txn += 1;
            if producer.begin_transaction().is_err() {
                producer = Producer::new(client.clone(), config.clone());
                init(&producer).await;
                continue;
            }
            let count = 1 + random(8);
            let values: Vec<String> = (0..count).map(|i| format!("{id}-{txn}-{i}")).collect();
            let mut sent_ok = true;
            let mut deliveries = Vec::new();
            for value in &values {
                let record = ProducerRecord::new(topic)
                    .key(value.clone())
                    .value(value.clone());
                match producer.send(record).await {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(_) => sent_ok = false,
                }
            }
            for delivery in deliveries {
                sent_ok &= delivery.await.is_ok();
            }
            if txn.is_multiple_of(7) {
                // A crash mid-transaction: the next instance fences this one.
                drop(producer);
                history.aborted.push(values);
                producer = Producer::new(client.clone(), config.clone());
                init(&producer).await;
                continue;
            }
            let commit = sent_ok && random(3) != 0;
            if commit {
                match producer.commit_transaction().await {
                    Ok(()) => history.committed.push(values),
                    Err(_) => {
                        history.indeterminate.push(values);
                        producer = Producer::new(client.clone(), config.clone());
                        init(&producer).await;
                    }
                }
            } else {
                match producer.abort_transaction().await {
                    Ok(()) => history.aborted.push(values),
                    Err(_) => {
                        // Not ended by this call; the next instance's init aborts it.
                        history.aborted.push(values);
                        producer = Producer::new(client.clone(), config.clone());
                        init(&producer).await;
                    }
                }
            }
        }
        history
    })
}

/// Initialises a transactional producer, retrying while brokers fail over.
async fn init(producer: &Producer) {
    for _ in 0..40 {
        if producer.init_transactions().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the producer could not initialise for 20 s");
}

/// Everything a read_committed consumer reads of `topic` once no transaction is open:
/// per partition, the values in offset order.
fn read_committed(brokers: &[String], topic: &str) -> BTreeMap<u32, Vec<String>> {
    crate::runtime().block_on(async {
        let client = Client::connect(brokers).await.expect("connect");
        let mut consumer = Consumer::new(
            client,
            ConsumerConfig {
                isolation: IsolationLevel::ReadCommitted,
                ..ConsumerConfig::default()
            },
        );
        consumer
            .assign(topic, None, StartFrom::Earliest)
            .await
            .expect("assign");
        let ends = consumer.end_offsets().await.expect("ends");
        let mut read: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while ends
            .iter()
            .any(|((t, p), end)| consumer.position(t, *p).is_some_and(|at| at < *end))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reading to the stable offsets took a minute"
            );
            for record in consumer.poll().await.expect("poll") {
                let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                    .to_string();
                read.entry(record.partition).or_default().push(value);
            }
        }
        read
    })
}

/// What the leaders' logs hold around `lost` values: every batch of their producer, the
/// markers, and the aborted transactions a read_committed fetch reports.
fn raw_log(cluster: &Cluster, topic: &str, lost: &[&String]) -> String {
    let mut out = String::new();
    let rows = cluster.describe(cluster.running()[0], topic);
    crate::runtime().block_on(async {
        for row in rows {
            let addr = &cluster.node(row.leader).addr;
            let Ok(mut rpc) = runnel_client::v1::consumer_client::ConsumerClient::connect(format!(
                "http://{addr}"
            ))
            .await
            else {
                continue;
            };
            let mut offset = 0;
            let mut producers = BTreeSet::new();
            let mut batches = Vec::new();
            while offset < row.high_watermark {
                let Ok(response) = rpc
                    .fetch(runnel_client::v1::FetchRequest {
                        partitions: vec![runnel_client::v1::FetchPartition {
                            topic: topic.to_string(),
                            partition: row.partition,
                            offset,
                            max_bytes: 0,
                        }],
                        max_wait_ms: 100,
                        min_bytes: 1,
                        max_bytes: 0,
                        isolation: IsolationLevel::ReadCommitted as i32,
                        ..Default::default()
                    })
                    .await
                else {
                    break;
                };
                let Some(fetched) = response.into_inner().partitions.pop() else {
                    break;
                };
                out.push_str(&format!(
                    "partition {} from {offset}: aborted {:?}\n",
                    row.partition,
                    fetched
                        .aborted_transactions
                        .iter()
                        .map(|a| (a.producer_id, a.first_offset))
                        .collect::<Vec<_>>()
                ));
                if fetched.next_offset <= offset {
                    break;
                }
                offset = fetched.next_offset;
                for batch in runnel_batch::batches(&fetched.records).flatten() {
                    let (header, raw) = batch;
                    let values: Vec<String> = runnel_batch::decode_records(raw)
                        .unwrap_or_default()
                        .iter()
                        .map(|r| {
                            String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                                .to_string()
                        })
                        .collect();
                    if values.iter().any(|v| lost.contains(&v)) {
                        producers.insert(header.producer_id);
                    }
                    let kind = if header.is_control() {
                        format!("{:?}", runnel_batch::control_type(raw))
                    } else {
                        values.join(",")
                    };
                    batches.push((
                        header.producer_id,
                        format!(
                            "  {}..{} pid {} epoch {} seq {} txn {} {kind}\n",
                            header.base_offset,
                            header.last_offset(),
                            header.producer_id,
                            header.producer_epoch,
                            header.base_sequence,
                            header.is_transactional()
                        ),
                    ));
                }
            }
            for (producer, line) in batches {
                if producers.contains(&producer) {
                    out.push_str(&line);
                }
            }
        }
    });
    out
}

#[test]
fn transactions_stay_whole_across_coordinator_and_leader_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic_with(&cluster, "ledger", 3, 3, Some(2));
    let brokers: Vec<String> = cluster.addresses().split(',').map(str::to_string).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3)
        .map(|w| {
            let (brokers, stop) = (brokers.clone(), stop.clone());
            std::thread::spawn(move || run_producer(brokers, format!("writer{w}"), "ledger", stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    // Kill the coordinator of writer0, then a leader of the topic, then the coordinator
    // of writer1, each with kill -9, restarting each before the next.
    for round in 0..3 {
        let victim = if round == 1 {
            let rows = cluster.describe(cluster.running()[0], "ledger");
            rows.first()
                .map(|r| r.leader)
                .filter(|l| *l != 0)
                .unwrap_or(1)
        } else {
            let id = format!("writer{}", round / 2);
            let on = cluster.running()[0];
            let out = cluster.ok(on, &["transaction", "describe", &id], "");
            out.lines()
                .find_map(|l| l.strip_prefix("Coordinator:      broker "))
                .and_then(|b| b.trim().parse().ok())
                .unwrap_or(1)
        };
        cluster.kill9(victim);
        std::thread::sleep(Duration::from_secs(3));
        cluster.restart(victim);
        let survivor = (1..=3).find(|n| *n != victim).expect("a survivor");
        wait_until(
            "every partition is fully in sync again",
            Duration::from_secs(40),
            || {
                cluster
                    .describe(survivor, "ledger")
                    .iter()
                    .all(|r| r.isr.len() == 3)
            },
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Release);
    let histories: Vec<History> = producers
        .into_iter()
        .map(|t| t.join().expect("a producer thread"))
        .collect();
    wait_until(
        "no transaction is open any more",
        Duration::from_secs(30),
        || {
            let out = cluster.ok(1, &["topic", "describe", "ledger"], "");
            !out.contains("has a transaction open")
        },
    );
    let read = read_committed(&brokers, "ledger");

    // Where each value was read (partition, position in it), once.
    let mut seen: BTreeMap<&str, (u32, usize)> = BTreeMap::new();
    for (partition, values) in &read {
        for (at, value) in values.iter().enumerate() {
            let before = seen.insert(value.as_str(), (*partition, at));
            assert!(before.is_none(), "{value} was read twice");
        }
    }
    let (mut committed, mut aborted, mut indeterminate) = (0, 0, 0);
    let mut resolved_committed = 0;
    for history in &histories {
        for txn in &history.committed {
            committed += 1;
            let missing: Vec<&String> = txn
                .iter()
                .filter(|v| !seen.contains_key(v.as_str()))
                .collect();
            if !missing.is_empty() {
                let log = raw_log(&cluster, "ledger", &missing);
                panic!(
                    "a committed transaction lost {missing:?} of {txn:?}; the topic: {}\n{log}",
                    cluster.ok(1, &["topic", "describe", "ledger"], "")
                );
            }
        }
        for txn in &history.aborted {
            aborted += 1;
            let read: Vec<&String> = txn
                .iter()
                .filter(|v| seen.contains_key(v.as_str()))
                .collect();
            if !read.is_empty() {
                let log = raw_log(&cluster, "ledger", &read);
                panic!(
                    "aborted values were read: {read:?} of {txn:?}; the topic: {}\n{log}",
                    cluster.ok(1, &["topic", "describe", "ledger"], "")
                );
            }
        }
        for txn in &history.indeterminate {
            indeterminate += 1;
            let present = txn.iter().filter(|v| seen.contains_key(v.as_str())).count();
            assert!(
                present == 0 || present == txn.len(),
                "a transaction is torn: {present} of {txn:?} were read"
            );
            resolved_committed += usize::from(present == txn.len());
        }
    }
    // Within a partition, one producer's values keep their send order.
    for values in read.values() {
        let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for value in values {
            let mut parts = value.rsplitn(3, '-');
            let index: u64 = parts.next().and_then(|p| p.parse().ok()).expect("index");
            let txn: u64 = parts.next().and_then(|p| p.parse().ok()).expect("txn");
            let writer = parts.next().expect("writer");
            if let Some(previous) = last.insert(writer, (txn, index)) {
                assert!(previous < (txn, index), "{value} came after {previous:?}");
            }
        }
    }
    // Nothing was read that no producer sent.
    let sent: BTreeSet<&str> = histories
        .iter()
        .flat_map(|h| h.committed.iter().chain(&h.aborted).chain(&h.indeterminate))
        .flatten()
        .map(String::as_str)
        .collect();
    assert!(seen.keys().all(|v| sent.contains(v)), "a value nobody sent");
    eprintln!(
        "transactions under kills: {committed} committed, {aborted} aborted, {indeterminate} indeterminate ({resolved_committed} of them committed), {} values read",
        seen.len()
    );
    assert!(
        committed > 20,
        "the producers made progress: {committed} commits"
    );
    assert!(aborted > 5, "the producers aborted: {aborted}");
}

/// One pass of a consume-transform-produce loop: reads `in` as a member of group
/// `copy`, writes each value upper-cased to `out` and commits its input position in the
/// same transaction. Stops after `batches` transactions or `records` records; with
/// `crash`, leaves the last transaction open (the process "dies" before committing it).
async fn copy_loop(brokers: &[String], batches: usize, records: usize, crash: bool) -> usize {
    use runnel_client::{GroupConfig, GroupConsumer};
    let client = Client::connect(brokers).await.expect("connect");
    let mut member = GroupConsumer::join(
        client.clone(),
        "copy",
        &["in".to_string()],
        GroupConfig {
            auto_commit_interval: None,
            commit_on_revoke: false,
            auto_offset_reset: StartFrom::Earliest,
            // A crashed member's partitions move after this long.
            session_timeout: Duration::from_secs(3),
            consumer: ConsumerConfig {
                isolation: IsolationLevel::ReadCommitted,
                max_bytes: 1_000,
                partition_max_bytes: 500,
                ..ConsumerConfig::default()
            },
            ..GroupConfig::default()
        },
    )
    .await
    .expect("join");
    let producer = Producer::new(
        client,
        ProducerConfig {
            transactional_id: Some("copier".into()),
            linger: Duration::from_millis(1),
            ..ProducerConfig::default()
        },
    );
    producer.init_transactions().await.expect("init");
    let mut copied = 0;
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done < batches && copied < records && tokio::time::Instant::now() < deadline {
        let polled = member.poll().await.expect("poll");
        if polled.is_empty() {
            continue;
        }
        producer.begin_transaction().expect("begin");
        for record in &polled {
            let value =
                String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).to_uppercase();
            producer
                .send(ProducerRecord::new("out").value(value))
                .await
                .expect("send");
        }
        producer
            .send_offsets_to_transaction(&member.owned_positions(), &member.group_metadata())
            .await
            .expect("offsets");
        done += 1;
        if crash && done == batches {
            producer.flush().await.expect("flush");
            return copied;
        }
        producer.commit_transaction().await.expect("commit");
        copied += polled.len();
    }
    member.close().await.expect("leave");
    copied
}

#[test]
fn a_consume_transform_produce_loop_copies_each_record_once_across_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "in", "--partitions", "2"], "");
    dev.ok(&["topic", "create", "out"], "");
    let brokers = [dev.addr.clone()];
    // Small batches: a poll returns a few records, so a pass makes many transactions.
    crate::runtime().block_on(async {
        let client = Client::connect(&brokers).await.expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                batch_size_bytes: 300,
                linger: Duration::ZERO,
                ..ProducerConfig::default()
            },
        );
        for i in 0..300 {
            producer
                .send(ProducerRecord::new("in").value(format!("v{i:03}")))
                .await
                .expect("send");
        }
        producer.flush().await.expect("flush");
    });
    let first = crate::runtime().block_on(copy_loop(&brokers, 3, 300, true));
    // The crashed loop's last transaction (records and offsets) is aborted when the
    // next instance initialises; the next one starts at the committed position.
    let second = crate::runtime().block_on(copy_loop(&brokers, usize::MAX, 300 - first, false));
    let out = dev.ok(
        &[
            "consume",
            "out",
            "--from-beginning",
            "--isolation",
            "read_committed",
            "--timeout-ms",
            "1500",
        ],
        "",
    );
    let mut values: Vec<&str> = out.lines().collect();
    values.sort_unstable();
    let expected: Vec<String> = (0..300).map(|i| format!("V{i:03}")).collect();
    assert_eq!(values, expected, "each input record is copied exactly once");
    assert_eq!(first + second, 300, "{first} + {second}");
    let everything = dev.ok(
        &["consume", "out", "--from-beginning", "--timeout-ms", "1500"],
        "",
    );
    assert!(
        everything.lines().count() > 300,
        "the crashed transaction's copies are in the log, aborted: {} lines, first {first}, second {second}",
        everything.lines().count()
    );
}

#[test]
fn the_broker_config_bounds_transaction_timeouts_and_forgets_idle_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ntransaction_max_timeout_ms = 5000\ntransactional_id_expiration_ms = 1500\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("write");
    let dev = Dev::spawn(&["broker", "start", "--config", &config.display().to_string()]);
    dev.ok(&["topic", "create", "ledger"], "");
    let err = dev.fails(
        &[
            "produce",
            "ledger",
            "--transactional-id",
            "long",
            "--transaction-timeout-ms",
            "10000",
        ],
        "x\n",
    );
    assert!(
        err.contains("longer than the broker's maximum 5000 ms (transaction_max_timeout_ms)"),
        "{err}"
    );
    dev.ok(
        &[
            "produce",
            "ledger",
            "--transactional-id",
            "brief",
            "--transaction-timeout-ms",
            "4000",
        ],
        "x\n",
    );
    assert!(dev.ok(&["transaction", "list"], "").contains("brief"));
    // Idle past transactional_id_expiration_ms, the id is forgotten.
    wait_until("the idle id to expire", Duration::from_secs(20), || {
        !dev.ok(&["transaction", "list"], "").contains("brief")
    });
    let describe = dev.fails(&["transaction", "describe", "brief"], "");
    assert!(describe.contains("unknown transactional id"), "{describe}");
}
