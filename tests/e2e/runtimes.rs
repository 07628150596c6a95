//! Transforms and connectors on a cluster: defined once, run by every broker (a
//! transform's members share its input through its group) or by one live broker (a
//! connector), answered for by any broker, and moved when a broker dies.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::replication::{create_topic, create_topic_with};
use crate::support::wait_until;

/// The BROKER column of `connector list` for `name`, asked of node `on` (0: none).
fn connector_broker(cluster: &Cluster, on: u32, name: &str) -> (String, u32) {
    let out = cluster.ok(on, &["connector", "list"], "");
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols.get(3).copied().unwrap_or_default().to_string(),
                cols.get(4).and_then(|c| c.parse().ok()).unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

/// The `Brokers:` line of `transform describe`, asked of node `on`.
fn transform_brokers(cluster: &Cluster, on: u32, name: &str) -> String {
    cluster
        .ok(on, &["transform", "describe", name], "")
        .lines()
        .find_map(|l| l.strip_prefix("Brokers:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Every value of `topic`, read through node `on`.
fn values(cluster: &Cluster, on: u32, topic: &str) -> Vec<String> {
    cluster
        .ok(
            on,
            &["consume", topic, "--from-beginning", "--timeout-ms", "700"],
            "",
        )
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_transform_and_a_connector_survive_the_death_of_the_broker_that_ran_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let mut cluster = Cluster::start(&root.join("data"), 3);
    for topic in ["lines", "copied"] {
        create_topic(&cluster, topic, 3, Some(2));
    }
    std::fs::create_dir_all(root.join("in")).expect("mkdir");
    let input = root.join("in/app.log");
    let mut file = std::fs::File::create(&input).expect("create");
    let source = root.join("source.yaml");
    std::fs::write(
        &source,
        format!(
            "name: app-logs\nkind: source\nconnector: file-source\ntopic: lines\nconfig:\n  path: {}\ncapabilities:\n  dirs:\n    - {{ path: {}, mode: read }}\n",
            input.display(),
            root.join("in").display()
        ),
    )
    .expect("write");
    // Created on one broker, deployed through another: both are cluster-wide.
    let created = cluster.ok(
        2,
        &["connector", "create", &source.display().to_string()],
        "",
    );
    assert!(created.contains("Running on broker"), "{created}");
    let wasm = crate::transforms::components().join("identity.wasm");
    let deployed = cluster.ok(
        3,
        &[
            "transform",
            "deploy",
            "--name",
            "copy",
            "--input",
            "lines",
            "--output",
            "copied",
            "--wasm",
            &wasm.display().to_string(),
        ],
        "",
    );
    assert!(deployed.contains("on brokers 1,2,3"), "{deployed}");
    // Every broker answers for both, and names where they run.
    let (state, owner) = connector_broker(&cluster, 1, "app-logs");
    assert_eq!(state, "Running");
    assert!((1..=3).contains(&owner), "connector list names no broker");
    for id in 1..=3 {
        assert_eq!(
            connector_broker(&cluster, id, "app-logs"),
            (state.clone(), owner)
        );
        assert_eq!(transform_brokers(&cluster, id, "copy"), "1,2,3");
    }
    let mut expected = BTreeSet::new();
    for i in 0..200 {
        writeln!(file, "before {i}").expect("append");
        expected.insert(format!("before {i}"));
    }
    let survivor = if owner == 1 { 2 } else { 1 };
    wait_until(
        "the lines before the kill to be copied",
        Duration::from_secs(30),
        || values(&cluster, survivor, "copied").len() >= 200,
    );

    // The broker running the connector (and one member of the transform) dies.
    cluster.kill9(owner);
    wait_until(
        "the connector to run on a live broker",
        Duration::from_secs(30),
        || {
            let (state, now) = connector_broker(&cluster, survivor, "app-logs");
            state == "Running" && now != owner && now != 0
        },
    );
    wait_until(
        "the transform to run on the live brokers only",
        Duration::from_secs(30),
        || {
            let brokers = transform_brokers(&cluster, survivor, "copy");
            !brokers.split(',').any(|b| b == owner.to_string())
        },
    );
    for i in 0..200 {
        writeln!(file, "after {i}").expect("append");
        expected.insert(format!("after {i}"));
    }
    // At-least-once: every line arrives; a line read again after the move may repeat.
    wait_until(
        "every line, before and after the kill, to be copied",
        Duration::from_secs(60),
        || {
            let copied: BTreeSet<String> =
                values(&cluster, survivor, "copied").into_iter().collect();
            copied == expected
        },
    );
    // The dead broker comes back: each definition still runs exactly where it should.
    cluster.restart(owner);
    wait_until(
        "the transform to run on every broker again",
        Duration::from_secs(30),
        || transform_brokers(&cluster, owner, "copy") == "1,2,3",
    );
    wait_until(
        "one broker to run the connector",
        Duration::from_secs(30),
        || {
            let seen: BTreeSet<(String, u32)> = (1..=3)
                .map(|id| connector_broker(&cluster, id, "app-logs"))
                .collect();
            seen.len() == 1 && seen.iter().all(|(s, b)| s == "Running" && *b != 0)
        },
    );
    // Deleting through any broker removes it everywhere.
    cluster.ok(owner, &["connector", "delete", "app-logs"], "");
    cluster.ok(survivor, &["transform", "remove", "copy"], "");
    for id in 1..=3 {
        let list = cluster.ok(id, &["connector", "list"], "");
        assert!(list.contains("No connectors"), "{list}");
        let list = cluster.ok(id, &["transform", "list"], "");
        assert!(!list.contains("copy"), "{list}");
    }
}

#[test]
fn an_exactly_once_transform_writes_each_record_once_across_broker_kills() {
    use runnel_client::{Client, Producer, ProducerConfig, ProducerRecord};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    for topic in ["events", "mirrored"] {
        create_topic_with(&cluster, topic, 3, 3, Some(2));
    }
    let wasm = crate::transforms::components().join("identity.wasm");
    let deployed = cluster.ok(
        2,
        &[
            "transform",
            "deploy",
            "--name",
            "mirror",
            "--input",
            "events",
            "--output",
            "mirrored",
            "--wasm",
            &wasm.display().to_string(),
            "--processing",
            "exactly-once",
        ],
        "",
    );
    assert!(deployed.contains("on brokers 1,2,3"), "{deployed}");
    let described = cluster.ok(1, &["transform", "describe", "mirror"], "");
    assert!(described.contains("exactly-once"), "{described}");
    let brokers: Vec<String> = cluster.addresses().split(',').map(str::to_string).collect();
    let total = 3_000;
    let writer = std::thread::spawn(move || {
        crate::runtime().block_on(async move {
            let client = Client::connect(&brokers).await.expect("connect");
            let producer = Producer::new(
                client,
                ProducerConfig {
                    linger: Duration::from_millis(2),
                    request_timeout: Duration::from_secs(3),
                    ..ProducerConfig::default()
                },
            );
            for chunk in 0..30 {
                let mut deliveries = Vec::new();
                for i in 0..total / 30 {
                    let value = format!("e-{}", chunk * (total / 30) + i);
                    let record = ProducerRecord::new("events")
                        .key(value.clone())
                        .value(value);
                    deliveries.push(producer.send(record).await.expect("send"));
                }
                for delivery in deliveries {
                    delivery.await.expect("every input record is acknowledged");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    });
    // Kill brokers running members of the transform while input flows.
    for victim in [3, 1] {
        std::thread::sleep(Duration::from_secs(3));
        cluster.kill9(victim);
        std::thread::sleep(Duration::from_secs(2));
        cluster.restart(victim);
    }
    writer.join().expect("the writer");
    let read = |on: u32| -> Vec<String> {
        cluster
            .ok(
                on,
                &[
                    "consume",
                    "mirrored",
                    "--from-beginning",
                    "--isolation",
                    "read_committed",
                    "--timeout-ms",
                    "1500",
                ],
                "",
            )
            .lines()
            .map(str::to_string)
            .collect()
    };
    wait_until(
        "every input record to be mirrored",
        Duration::from_secs(90),
        || read(2).len() >= total,
    );
    let mirrored = read(2);
    let distinct: BTreeSet<&String> = mirrored.iter().collect();
    let expected: BTreeSet<String> = (0..total).map(|i| format!("e-{i}")).collect();
    assert_eq!(
        distinct.len(),
        mirrored.len(),
        "a record was written twice: {} records, {} distinct",
        mirrored.len(),
        distinct.len()
    );
    assert_eq!(
        distinct.into_iter().cloned().collect::<BTreeSet<String>>(),
        expected
    );
}
