//! Stateful transforms on a cluster: the word-count example with RocksDB stores and
//! exactly-once commits, checked against the counts computed from its input while the
//! brokers running its tasks are killed, while a broker's local state is deleted (its
//! tasks restore from the changelogs), and through interactive queries.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::replication::create_topic_with;
use crate::support::wait_until;

/// Words the writer sends, keyed by themselves.
const WORDS: [&str; 12] = [
    "apple", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "juniper",
    "kelp", "larch",
];

/// A small deterministic generator (xorshift), so a failing kill schedule can be rerun.
struct Dice(u64);

impl Dice {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// (key, value) of every record of `topic`, read_committed, in partition order.
fn read_keyed(cluster: &Cluster, on: u32, topic: &str) -> Vec<(String, String)> {
    cluster
        .ok(
            on,
            &[
                "consume",
                topic,
                "--from-beginning",
                "--isolation",
                "read_committed",
                "--print-key",
                "--key-separator",
                "|",
                "--timeout-ms",
                "1500",
            ],
            "",
        )
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Words per count of the input as it is in the log.
fn expected_counts(cluster: &Cluster, on: u32) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (word, _) in read_keyed(cluster, on, "words") {
        *counts.entry(word).or_insert(0) += 1;
    }
    counts
}

/// Checks the word-count output against the input: per word, the counts emitted go
/// 1, 2, 3, ... up to the number of input records of that word: a repeat is a double
/// count, a gap a lost update, and a short sequence a missing one.
fn check_counts(output: &[(String, String)], expected: &BTreeMap<String, u64>) {
    let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (word, count) in output {
        let count: u64 = count.parse().expect("a count");
        seen.entry(word).or_default().push(count);
    }
    for (word, total) in expected {
        let counts = seen.get(word.as_str()).cloned().unwrap_or_default();
        let wanted: Vec<u64> = (1..=*total).collect();
        if counts != wanted {
            let first_bad = counts
                .iter()
                .zip(&wanted)
                .position(|(a, b)| a != b)
                .unwrap_or(counts.len().min(wanted.len()));
            panic!(
                "word {word:?}: {} counts emitted for {total} input records; first difference at #{first_bad}: emitted {:?}, expected {:?}",
                counts.len(),
                counts.get(first_bad.saturating_sub(2)..(first_bad + 3).min(counts.len())),
                wanted.get(first_bad.saturating_sub(2)..(first_bad + 3).min(wanted.len())),
            );
        }
    }
    assert_eq!(
        seen.len(),
        expected.len(),
        "counts emitted for words never sent"
    );
}

/// Sends `total` words from a thread, in chunks with pauses, acknowledged; returns
/// the thread.
fn write_words(cluster: &Cluster, start: usize, total: usize) -> std::thread::JoinHandle<()> {
    use runnel_client::{Client, Producer, ProducerConfig, ProducerRecord};
    let brokers: Vec<String> = cluster.addresses().split(',').map(str::to_string).collect();
    std::thread::spawn(move || {
        crate::runtime().block_on(async move {
            let client = Client::connect(&brokers).await.expect("connect");
            let producer = Producer::new(
                client,
                ProducerConfig {
                    linger: Duration::from_millis(2),
                    request_timeout: Duration::from_secs(5),
                    ..ProducerConfig::default()
                },
            );
            let chunks = 40;
            for chunk in 0..chunks {
                let mut deliveries = Vec::new();
                for i in 0..total / chunks {
                    let n = start + chunk * (total / chunks) + i;
                    let word = WORDS[((n as u64 * 2_654_435_761) >> 9) as usize % WORDS.len()];
                    let record = ProducerRecord::new("words").key(word).value(word);
                    deliveries.push(producer.send(record).await.expect("send"));
                }
                for delivery in deliveries {
                    // A write that fails while a broker is down is simply not in the
                    // input: the expected counts are computed from the log itself.
                    let _ = delivery.await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    })
}

/// The count of `word` in the word-count store, asked of node `on` until the key's task
/// answers (while a rebalance moves it, the query says to try again).
fn queried_count(cluster: &Cluster, on: u32, word: &str) -> u64 {
    let mut answer = String::new();
    wait_until(
        "the query to answer from the key's task",
        Duration::from_secs(20),
        || {
            let output = crate::support::runnel_at(
                &cluster.node(on).addr,
                &[
                    "transform",
                    "state",
                    "wc",
                    "--store",
                    "counts",
                    "--key",
                    word,
                ],
                "",
            );
            answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
            output.status.success()
        },
    );
    answer.parse().expect("a count")
}

/// `transform deploy` of the word-count example as `wc`, from `words` to `counts`.
fn word_count_deploy(processing: &str) -> Vec<String> {
    let wasm = crate::transforms::components().join("word_count.wasm");
    [
        "transform",
        "deploy",
        "--name",
        "wc",
        "--input",
        "words",
        "--output",
        "counts",
        "--wasm",
        &wasm.display().to_string(),
        "--store",
        "counts",
        "--processing",
        processing,
    ]
    .map(String::from)
    .to_vec()
}

fn deploy_word_count(cluster: &Cluster, processing: &str, extra: &[&str]) {
    let deploy = word_count_deploy(processing);
    let mut args: Vec<&str> = deploy.iter().map(String::as_str).collect();
    args.extend(extra);
    let deployed = cluster.ok(1, &args, "");
    assert!(deployed.contains("on brokers 1,2,3"), "{deployed}");
}

/// The output converged: every word's last emitted count is its input count.
fn wait_for_counts(cluster: &Cluster, on: u32) -> Vec<(String, String)> {
    let mut output = Vec::new();
    wait_until(
        "the counts to reach the input's",
        Duration::from_secs(90),
        || {
            let expected = expected_counts(cluster, on);
            output = read_keyed(cluster, on, "counts");
            let mut last: BTreeMap<&str, u64> = BTreeMap::new();
            for (word, count) in &output {
                last.insert(word, count.parse().unwrap_or(0));
            }
            expected
                .iter()
                .all(|(w, n)| last.get(w.as_str()) == Some(n))
        },
    );
    output
}

#[test]
fn word_count_is_exact_across_ten_kills_a_lost_local_state_and_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic_with(&cluster, "words", 3, 3, Some(2));
    create_topic_with(&cluster, "counts", 3, 3, Some(2));
    deploy_word_count(&cluster, "exactly-once", &[]);
    // The changelogs were created at deploy: compacted, one partition per input partition.
    let changelog = cluster.ok(2, &["topic", "describe", "wc-counts-changelog"], "");
    assert!(changelog.contains("cleanup.policy=compact"), "{changelog}");
    assert!(changelog.contains("ReplicationFactor: 3"), "{changelog}");
    assert!(changelog.contains("min.insync.replicas=2"), "{changelog}");

    // Ten kills of brokers running tasks, at random points while input flows.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill schedule seed {seed}");
    let mut dice = Dice(seed);
    let writer = write_words(&cluster, 0, 6_000);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(400 + dice.next(1_200)));
        let victim = 1 + dice.next(3) as u32;
        cluster.kill9(victim);
        std::thread::sleep(Duration::from_millis(200 + dice.next(800)));
        cluster.restart(victim);
    }
    writer.join().expect("the writer");
    let survivor = 1 + dice.next(3) as u32;
    let output = wait_for_counts(&cluster, survivor);
    let expected = expected_counts(&cluster, survivor);
    assert!(
        expected.values().sum::<u64>() > 1_000,
        "too little input got through: {expected:?}"
    );
    check_counts(&output, &expected);

    // Interactive queries answer from the task that owns the key, on any broker.
    // (While a rebalance moves a task, its key is unavailable: the query says so.)
    for word in ["apple", "kelp", "larch"] {
        assert_eq!(
            queried_count(&cluster, 3, word),
            expected[word],
            "state of {word:?}"
        );
    }
    let all = cluster.ok(2, &["transform", "state", "wc", "--store", "counts"], "");
    let listed: BTreeMap<String, u64> = all
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.parse().expect("a count")))
        .collect();
    assert_eq!(listed, expected, "the whole store, over every task");
    let bad = crate::support::runnel_at(
        &cluster.node(1).addr,
        &["transform", "state", "wc", "--store", "nope", "--key", "x"],
        "",
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("no store \"nope\""),
        "{stderr}"
    );

    // A broker that lost its local stores restores them from the changelogs.
    cluster.kill9(2);
    let state_dir = cluster.data_dir(2).join("__state").join("wc");
    assert!(state_dir.exists(), "broker 2 kept no local state");
    std::fs::remove_dir_all(&state_dir).expect("delete the local state");
    cluster.restart(2);
    let writer = write_words(&cluster, 6_000, 1_200);
    writer.join().expect("the writer");
    let output = wait_for_counts(&cluster, 1);
    check_counts(&output, &expected_counts(&cluster, 1));
    let described = cluster.ok(1, &["transform", "describe", "wc"], "");
    assert!(described.contains("Stores:      counts"), "{described}");

    // Removing with --delete-state deletes the changelogs and every broker's stores.
    cluster.ok(1, &["transform", "remove", "wc", "--delete-state"], "");
    let topics = cluster.ok(3, &["topic", "list"], "");
    assert!(!topics.contains("wc-counts-changelog"), "{topics}");
    wait_until(
        "every broker to delete its stores",
        Duration::from_secs(40),
        || (1..=3).all(|id| !cluster.data_dir(id).join("__state").join("wc").exists()),
    );
}

/// (partition, broker, what) of each task line of `transform describe wc`.
fn task_lines(cluster: &Cluster, on: u32) -> Vec<(u32, u32, String)> {
    let described = cluster.ok(on, &["transform", "describe", "wc"], "");
    described
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("task ")?;
            let (partition, rest) = rest.split_once(": broker ")?;
            let (broker, what) = rest.split_once(", ")?;
            Some((
                partition.parse().ok()?,
                broker.parse().ok()?,
                what.to_string(),
            ))
        })
        .collect()
}

/// The committed end of `topic`'s `partition`.
fn end_offset(cluster: &Cluster, topic: &str, partition: u32) -> i64 {
    use runnel_client::{Client, v1};
    let brokers: Vec<String> = cluster.addresses().split(',').map(str::to_string).collect();
    let topic = topic.to_string();
    crate::runtime().block_on(async move {
        let client = Client::connect(&brokers).await.expect("connect");
        client
            .end_offset(&topic, partition, v1::IsolationLevel::ReadCommitted)
            .await
            .expect("end offset")
    })
}

#[test]
fn a_standby_takes_over_a_killed_brokers_task_without_replaying_its_changelog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic_with(&cluster, "words", 3, 3, Some(2));
    create_topic_with(&cluster, "counts", 3, 3, Some(2));
    deploy_word_count(&cluster, "exactly-once", &["--standby-replicas", "1"]);
    let described = cluster.ok(2, &["transform", "describe", "wc"], "");
    assert!(described.contains("Standbys:    1 per task"), "{described}");
    write_words(&cluster, 0, 4_000).join().expect("the writer");
    wait_for_counts(&cluster, 1);

    // Every task runs on one broker and has a standby on another that follows its
    // changelogs.
    let mut owners: BTreeMap<u32, u32> = BTreeMap::new();
    wait_until(
        "each task to run with a current standby elsewhere",
        Duration::from_secs(30),
        || {
            let lines = task_lines(&cluster, 1);
            owners = lines
                .iter()
                .filter(|(_, _, what)| what == "running")
                .map(|(p, b, _)| (*p, *b))
                .collect();
            let standbys: BTreeMap<u32, u32> = lines
                .iter()
                .filter(|(_, _, what)| what == "standby (following the changelogs)")
                .map(|(p, b, _)| (*p, *b))
                .collect();
            owners.len() == 3
                && standbys.len() == 3
                && standbys.iter().all(|(p, b)| owners.get(p) != Some(b))
        },
    );

    // Kill the broker running the task with the longest changelog.
    let ends: BTreeMap<u32, i64> = (0..3)
        .map(|p| (p, end_offset(&cluster, "wc-counts-changelog", p)))
        .collect();
    let (&partition, &full) = ends.iter().max_by_key(|(_, end)| **end).expect("3");
    assert!(full >= 100, "changelog ends {ends:?}");
    let victim = owners[&partition];
    cluster.kill9(victim);
    let survivor = (1..=3).find(|b| *b != victim).expect("a survivor");

    // The task moves to its standby's broker, which replays (next to) nothing.
    let mut replayed = None;
    wait_until(
        "the task to open on the broker of its standby",
        Duration::from_secs(40),
        || {
            let output = crate::support::runnel_at(
                &cluster.node(survivor).addr,
                &["transform", "logs", "wc"],
                "",
            );
            let logs = String::from_utf8_lossy(&output.stdout);
            let opened =
                format!("opened the state of partition {partition} kept by its standby: replayed ");
            replayed = logs.lines().find_map(|line| {
                let (_, rest) = line.split_once(&opened)?;
                rest.split_whitespace().next()?.parse::<i64>().ok()
            });
            replayed.is_some()
        },
    );
    let replayed = replayed.expect("found");
    assert!(
        replayed * 10 < full,
        "the task replayed {replayed} of its changelog's {full} records"
    );

    // The state the standby kept is the task's: counting goes on exactly.
    write_words(&cluster, 4_000, 1_200)
        .join()
        .expect("the writer");
    let output = wait_for_counts(&cluster, survivor);
    check_counts(&output, &expected_counts(&cluster, survivor));
    cluster.restart(victim);
}

#[test]
fn at_least_once_word_count_loses_no_count_across_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    create_topic_with(&cluster, "words", 3, 3, Some(2));
    create_topic_with(&cluster, "counts", 3, 3, Some(2));
    deploy_word_count(&cluster, "at-least-once", &[]);
    let writer = write_words(&cluster, 0, 3_000);
    for victim in [2, 3, 1] {
        std::thread::sleep(Duration::from_millis(1_500));
        cluster.kill9(victim);
        std::thread::sleep(Duration::from_millis(500));
        cluster.restart(victim);
    }
    writer.join().expect("the writer");
    // At-least-once promises that nothing is lost, not that nothing is counted twice:
    // every count from 1 to the word's input count was emitted, and the state holds at
    // least that count.
    let mut output = Vec::new();
    let mut expected = BTreeMap::new();
    wait_until("every count to be emitted", Duration::from_secs(90), || {
        expected = expected_counts(&cluster, 1);
        output = read_keyed(&cluster, 1, "counts");
        expected.iter().all(|(word, total)| {
            let seen: std::collections::BTreeSet<u64> = output
                .iter()
                .filter(|(w, _)| w == word)
                .filter_map(|(_, c)| c.parse().ok())
                .collect();
            (1..=*total).all(|n| seen.contains(&n))
        })
    });
    for (word, total) in &expected {
        let held = queried_count(&cluster, 2, word);
        assert!(held >= *total, "{word}: the state holds {held} of {total}");
    }
}

/// `runnel transform test` of a stateful component with these stores and lateness.
fn harness(component: &str, stores: &[&str], extra: &[&str], input: &str) -> Vec<String> {
    let output = run_harness(component, stores, extra, input);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `runnel transform test` of an example component over `input`, as it exited.
fn run_harness(
    component: &str,
    stores: &[&str],
    extra: &[&str],
    input: &str,
) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input.jsonl");
    std::fs::write(&path, input).expect("write");
    let wasm = crate::transforms::components().join(format!("{component}.wasm"));
    let wasm = wasm.display().to_string();
    let path = path.display().to_string();
    let mut args = vec!["transform", "test", "--wasm", &wasm, "--input", &path];
    for store in stores {
        args.extend(["--store", store]);
    }
    args.extend(extra);
    std::process::Command::new(crate::support::RUNNEL)
        .args(&args)
        .output()
        .expect("runs")
}

/// (input, key, value) of each emitted record, and (input, error) of each refused one.
fn emitted(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| match v.get("error") {
            Some(error) => format!("{} error: {}", v["input"], error.as_str().unwrap_or("")),
            None => format!(
                "{} {}={} @{}",
                v["input"],
                v["key"].as_str().unwrap_or("-"),
                v["value"].as_str().unwrap_or("-"),
                v["timestamp"]
            ),
        })
        .collect()
}

#[test]
fn the_stateful_examples_emit_exactly_their_expected_outputs() {
    // Word count: per key, per partition; a record without a key is refused and
    // changes nothing.
    let lines = harness(
        "word_count",
        &["counts"],
        &[],
        r#"{"key": "a", "value": "a"}
{"key": "b", "value": "b"}
{"key": "a", "value": "a"}
{"value": "no key"}
{"key": "a", "value": "a"}
{"key": "a", "value": "a", "partition": 1}
"#,
    );
    let out = emitted(&lines);
    assert_eq!(out[..3], ["0 a=1 @0", "1 b=1 @0", "2 a=2 @0"], "{lines:?}");
    assert!(
        out[3].starts_with("3 error: the record has no UTF-8 key"),
        "{lines:?}"
    );
    assert_eq!(out[4..], ["4 a=3 @0", "5 a=1 @0"], "{lines:?}");

    // Running total: a value that is not a number is refused and leaves the total.
    let lines = harness(
        "running_total",
        &["totals"],
        &[],
        r#"{"key": "x", "value": "5"}
{"key": "x", "value": "7"}
{"key": "x", "value": "seven"}
{"key": "y", "value": "1"}
{"key": "x", "value": "-2"}
"#,
    );
    let out = emitted(&lines);
    assert_eq!(out[..2], ["0 x=5 @0", "1 x=12 @0"], "{lines:?}");
    assert!(
        out[2].contains("\"seven\" is not a whole number"),
        "{lines:?}"
    );
    assert_eq!(out[3..], ["3 y=1 @0", "4 x=10 @0"], "{lines:?}");

    // De-duplication of ids (keys) within 1 s of event time: a repeat inside the window
    // is dropped, and the id is forgotten once its window passed.
    let lines = harness(
        "dedup",
        &["seen"],
        &["--config", "window-ms=1000"],
        r#"{"key": "a", "value": "1", "timestamp": 0}
{"key": "a", "value": "2", "timestamp": 500}
{"key": "b", "value": "3", "timestamp": 600}
{"key": "a", "value": "4", "timestamp": 999}
{"key": "a", "value": "5", "timestamp": 1000}
{"key": "a", "value": "6", "timestamp": 1500}
{"key": "c", "value": "7", "timestamp": 2700}
{"key": "b", "value": "8", "timestamp": 2800}
{"value": "no id", "timestamp": 2900}
"#,
    );
    let out = emitted(&lines);
    assert_eq!(
        out[..5],
        [
            "0 a=1 @0",
            "2 b=3 @600",
            "4 a=5 @1000",
            "6 c=7 @2700",
            "7 b=8 @2800"
        ],
        "{lines:?}"
    );
    assert!(
        out[5].starts_with("8 error: the record carries no id"),
        "{lines:?}"
    );

    // Tumbling counts of 1 s windows with 500 ms of allowed lateness: a window is
    // emitted once, when the watermark passes its end, with the late records that came
    // inside the grace period, and without those that came after it.
    let lines = harness(
        "tumbling_count",
        &["windows", "late"],
        &["--config", "window-ms=1000", "--allowed-lateness-ms", "500"],
        TUMBLING_INPUT,
    );
    assert_eq!(
        emitted(&lines),
        [
            "\"timer\" a=0-1000 3 @999",
            "\"timer\" a=1000-2000 1 @1999",
            "\"timer\" b=1000-2000 2 @1999",
        ],
        "{lines:?}"
    );

    // The same with `emit=updates`: each counted record emits its window's count so far,
    // the late one emits nothing, and closing a window emits nothing more.
    let lines = harness(
        "tumbling_count",
        &["windows", "late"],
        &[
            "--config",
            "window-ms=1000",
            "--config",
            "emit=updates",
            "--allowed-lateness-ms",
            "500",
        ],
        TUMBLING_INPUT,
    );
    assert_eq!(
        emitted(&lines),
        [
            "0 a=0-1000 1 @100",
            "1 a=0-1000 2 @900",
            "2 b=1000-2000 1 @1200",
            "3 a=1000-2000 1 @1400",
            "4 a=0-1000 3 @950",
            "5 b=1000-2000 2 @1600",
            "7 c=3000-4000 1 @3000",
        ],
        "{lines:?}"
    );
}

#[test]
fn transform_test_loads_table_rows_for_a_stream_table_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = dir.path().join("customers.jsonl");
    std::fs::write(
        &table,
        "{\"key\": \"c1\", \"value\": \"{\\\"name\\\":\\\"Ada\\\"}\"}\n\
         {\"key\": \"c2\", \"value\": \"{\\\"name\\\":\\\"Grace\\\"}\"}\n\
         {\"key\": \"c2\", \"value\": null}\n",
    )
    .expect("write");
    let table_arg = format!("customers={}", table.display());
    // c1 is in the table, c2 was deleted (a tombstone), c3 never was: a left join.
    let lines = harness(
        "join_customers",
        &[],
        &["--table", &table_arg],
        r#"{"key": "c1", "value": "{\"item\":\"book\"}"}
{"key": "c2", "value": "{\"item\":\"pen\"}"}
{"key": "c3", "value": "{\"item\":\"ink\"}"}
"#,
    );
    assert_eq!(
        emitted(&lines),
        [
            r#"0 c1={"customer":{"name":"Ada"},"order":{"item":"book"}} @0"#,
            r#"1 c2={"customer":null,"order":{"item":"pen"}} @0"#,
            r#"2 c3={"customer":null,"order":{"item":"ink"}} @0"#,
        ],
        "{lines:?}"
    );

    // A row that is not one is refused with its line number.
    std::fs::write(&table, "{\"value\": \"no key\"}\n").expect("write");
    let output = run_harness(
        "join_customers",
        &[],
        &["--table", &table_arg],
        "{\"key\": \"c1\"}\n",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 1 of table \"customers\" is not a row"),
        "{stderr}"
    );
}

/// Records for the tumbling-count example: two windows of `a`, one of `b`, a late `a`
/// within the grace period (950) and one after it (200).
const TUMBLING_INPUT: &str = r#"{"key": "a", "timestamp": 100}
{"key": "a", "timestamp": 900}
{"key": "b", "timestamp": 1200}
{"key": "a", "timestamp": 1400}
{"key": "a", "timestamp": 950}
{"key": "b", "timestamp": 1600}
{"key": "a", "timestamp": 200}
{"key": "c", "timestamp": 3000}
"#;

#[test]
fn a_stream_table_join_reads_the_table_as_it_is_when_each_record_is_processed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = crate::support::Dev::start(dir.path());
    for topic in ["orders", "enriched"] {
        dev.ok(&["topic", "create", topic, "--partitions", "2"], "");
    }
    dev.ok(
        &[
            "topic",
            "create",
            "customers",
            "--partitions",
            "2",
            "--config",
            "cleanup.policy=compact",
        ],
        "",
    );
    let produce = |topic: &str, lines: &str| {
        dev.ok(&["produce", topic, "--key-separator", "|"], lines);
    };
    produce(
        "customers",
        "c1|{\"name\":\"Ada\"}\nc2|{\"name\":\"Grace\"}\n",
    );
    let wasm = crate::transforms::components().join("join_customers.wasm");
    let deployed = dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "join",
            "--input",
            "orders",
            "--output",
            "enriched",
            "--wasm",
            &wasm.display().to_string(),
            "--table",
            "customers=customers",
            "--processing",
            "exactly-once",
        ],
        "",
    );
    assert!(deployed.contains("Deployed transform join"), "{deployed}");
    let read = || -> BTreeMap<String, Vec<String>> {
        let out = dev.ok(
            &[
                "consume",
                "enriched",
                "--from-beginning",
                "--isolation",
                "read_committed",
                "--timeout-ms",
                "700",
            ],
            "",
        );
        let mut by_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in out.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
            by_order
                .entry(value["order"]["id"].to_string())
                .or_default()
                .push(value["customer"]["name"].to_string());
        }
        by_order
    };
    produce("orders", "c1|{\"id\":1}\nc2|{\"id\":2}\nc3|{\"id\":3}\n");
    wait_until("three joined orders", Duration::from_secs(30), || {
        read().len() == 3
    });
    // The table changes; orders processed afterwards see the change.
    produce(
        "customers",
        "c1|{\"name\":\"Ada L.\"}\nc3|{\"name\":\"Edsger\"}\n",
    );
    produce("orders", "c1|{\"id\":4}\nc3|{\"id\":5}\n");
    wait_until("five joined orders", Duration::from_secs(30), || {
        read().len() == 5
    });
    let joined = read();
    let names = |id: &str| joined[id].join(",");
    assert_eq!(names("1"), "\"Ada\"");
    assert_eq!(names("2"), "\"Grace\"");
    assert_eq!(
        names("3"),
        "null",
        "a left join: c3 was not in the table yet"
    );
    assert_eq!(names("4"), "\"Ada L.\"");
    assert_eq!(names("5"), "\"Edsger\"");
    // The table is a store like the others for queries, and read-only to the guest.
    let c1 = dev.ok(
        &[
            "transform",
            "state",
            "join",
            "--store",
            "customers",
            "--key",
            "c1",
        ],
        "",
    );
    assert_eq!(c1.trim(), "{\"name\":\"Ada L.\"}");
    let described = dev.ok(&["transform", "describe", "join"], "");
    assert!(
        described.contains("Tables:      customers <- customers"),
        "{described}"
    );
    // Removing with --delete-state deletes the changelogs it wrote, never the table.
    dev.ok(&["transform", "remove", "join", "--delete-state"], "");
    let topics = dev.ok(&["topic", "list"], "");
    assert!(topics.contains("customers"), "{topics}");
    assert!(!topics.contains("join-__runnel-changelog"), "{topics}");
}

/// Runs `runnel --brokers ADDR ARGS` on a terminal (through `script`, which gives it a
/// pseudo-terminal), answering `answer`; returns what the terminal showed.
fn on_a_terminal(addr: &str, args: &[&str], answer: &str) -> String {
    let command = std::iter::once(crate::support::RUNNEL)
        .chain(["--brokers", addr])
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script runs");
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), answer.as_bytes())
        .expect("answer");
    let output = child.wait_with_output().expect("script finishes");
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{shown}");
    shown
}

#[test]
fn removing_a_stateful_deployment_on_a_terminal_asks_whether_to_delete_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = crate::support::Dev::start(dir.path());
    dev.ok(&["topic", "create", "words"], "");
    dev.ok(&["topic", "create", "counts"], "");
    let args = word_count_deploy("at-least-once");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let deploy = || {
        dev.ok(&args, "");
    };
    let changelogs = || {
        let topics = dev.ok(&["topic", "list"], "");
        topics.contains("wc-counts-changelog") && topics.contains("wc-__runnel-changelog")
    };
    deploy();
    assert!(changelogs());

    // Answering no (or just Enter) keeps the state.
    let shown = on_a_terminal(&dev.addr, &["transform", "remove", "wc"], "\n");
    assert!(
        shown.contains("Transform wc keeps state: stores counts (changelogs wc-counts-changelog, wc-__runnel-changelog)"),
        "{shown}"
    );
    assert!(
        shown.contains("state and committed offsets are kept"),
        "{shown}"
    );
    assert!(changelogs());

    // Answering yes deletes it.
    deploy();
    let shown = on_a_terminal(&dev.addr, &["transform", "remove", "wc"], "y\n");
    assert!(shown.contains("[y/N]"), "{shown}");
    assert!(shown.contains("deleted its state"), "{shown}");
    wait_until(
        "the changelogs are deleted",
        Duration::from_secs(20),
        || !changelogs(),
    );

    // --keep-state, and a command without a terminal, do not ask.
    deploy();
    let shown = on_a_terminal(
        &dev.addr,
        &["transform", "remove", "wc", "--keep-state"],
        "",
    );
    assert!(!shown.contains("[y/N]"), "{shown}");
    deploy();
    let removed = dev.ok(&["transform", "remove", "wc"], "y\n");
    assert!(removed.contains("are kept"), "{removed}");
    assert!(changelogs());
    let refused = dev.fails(
        &[
            "transform",
            "remove",
            "wc",
            "--keep-state",
            "--delete-state",
        ],
        "",
    );
    assert!(refused.contains("cannot be used with"), "{refused}");
}
