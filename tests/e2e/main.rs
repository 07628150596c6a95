//! End-to-end tests: real `runnel` processes on loopback, driven through the CLI and the
//! public Rust client.

mod batches;
mod clients;
mod cluster;
mod connect;
mod coordinator;
mod groups;
mod idempotence;
mod metrics;
mod replication;
mod runtimes;
mod security;
mod stateful;
mod support;
mod tls;
mod transactions;
mod transforms;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use runnel_client::{
    Client, ErrorCode, Producer, ProducerConfig, ProducerRecord, partition_for_key,
};
use support::Dev;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Parses `consume --print-offset --print-key --key-separator '|'` output lines into
/// (partition, offset, key, value).
fn parse_consumed(output: &str) -> Vec<(u32, i64, String, String)> {
    output
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            assert_eq!(fields.len(), 3, "line {line:?}");
            let (partition, offset) = fields[0]
                .strip_prefix("Partition:")
                .and_then(|rest| rest.split_once("\tOffset:"))
                .unwrap_or_else(|| panic!("line {line:?}"));
            (
                partition.parse().expect("partition"),
                offset.parse().expect("offset"),
                fields[1].to_string(),
                fields[2].to_string(),
            )
        })
        .collect()
}

#[test]
fn keyed_lines_round_trip_to_stable_partitions_and_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    let out = dev.ok(&["topic", "create", "orders", "--partitions", "3"], "");
    assert!(
        out.contains("Created topic orders with 3 partitions"),
        "{out}"
    );
    let mut input = String::new();
    for i in 0..60 {
        input.push_str(&format!("user-{}:order-{i}\n", i % 7));
    }
    dev.ok(&["produce", "orders", "--key-separator", ":"], &input);
    let consume = [
        "consume",
        "orders",
        "--from-beginning",
        "--print-key",
        "--print-offset",
        "--key-separator",
        "|",
        "--max-messages",
        "60",
        "--timeout-ms",
        "10000",
    ];
    let records = parse_consumed(&dev.ok(&consume, ""));
    assert_eq!(records.len(), 60);
    let mut partition_of_key: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (partition, _, key, _) in &records {
        partition_of_key
            .entry(key.clone())
            .or_default()
            .insert(*partition);
    }
    for (key, partitions) in &partition_of_key {
        assert_eq!(partitions.len(), 1, "key {key} spread over {partitions:?}");
        let expected = partition_for_key(key.as_bytes(), 3);
        assert!(
            partitions.contains(&expected),
            "key {key} not on Kafka's partition {expected}"
        );
    }
    // Per key, values come back in the order they were produced.
    for key in partition_of_key.keys() {
        let values: Vec<&str> = records
            .iter()
            .filter(|r| &r.2 == key)
            .map(|r| r.3.as_str())
            .collect();
        let mut sorted = values.clone();
        sorted.sort_by_key(|v| {
            v.trim_start_matches("order-")
                .parse::<u32>()
                .expect("number")
        });
        assert_eq!(values, sorted, "order of {key}");
    }
    dev.stop();
    let dev = Dev::start(dir.path());
    let again = parse_consumed(&dev.ok(&consume, ""));
    let sorted = |mut v: Vec<(u32, i64, String, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(again), sorted(records));
    let describe = dev.ok(&["topic", "describe", "orders"], "");
    assert!(describe.contains("PartitionCount: 3"), "{describe}");
    // The restart elected this broker again: the leader epoch moved to 1.
    assert!(
        describe
            .lines()
            .any(|l| l.starts_with("0 ") && l.split_whitespace().nth(2) == Some("1")),
        "{describe}"
    );
}

#[test]
fn kill_9_during_production_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "events", "--partitions", "2"], "");
    let rt = runtime();
    let addr = dev.addr.clone();
    let acknowledged: Vec<(u32, i64, String)> = rt.block_on(async move {
        let client = Client::connect(&[addr]).await.expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                retries: 0,
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(100_000);
        let sender = tokio::spawn(async move {
            for i in 0.. {
                let value = format!("event-{i}");
                let record = ProducerRecord::new("events")
                    .key(format!("k{}", i % 13))
                    .value(value.clone());
                match producer.send(record).await {
                    Ok(delivery) => {
                        if tx.send((value, delivery)).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                if i % 500 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut acked = Vec::new();
        let mut failures = 0;
        let mut killer = Some(dev);
        while let Some((value, delivery)) = rx.recv().await {
            match delivery.await {
                Ok(meta) => acked.push((meta.partition, meta.offset, value)),
                Err(_) => failures += 1,
            }
            if acked.len() == 3000
                && let Some(dev) = killer.take()
            {
                dev.kill9();
            }
            if failures >= 100 {
                break;
            }
        }
        sender.abort();
        assert!(failures > 0, "the broker was killed, some sends must fail");
        acked
    });
    assert!(acknowledged.len() >= 3000);
    let dev = Dev::start(dir.path());
    let output = dev.ok(
        &[
            "consume",
            "events",
            "--from-beginning",
            "--print-key",
            "--print-offset",
            "--key-separator",
            "|",
            "--timeout-ms",
            "3000",
        ],
        "",
    );
    let stored: BTreeSet<(u32, i64, String)> = parse_consumed(&output)
        .into_iter()
        .map(|(p, o, _, v)| (p, o, v))
        .collect();
    for record in &acknowledged {
        assert!(
            stored.contains(record),
            "acknowledged record {record:?} was lost"
        );
    }
}

#[test]
fn bad_input_gets_clear_errors_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    let name_rules = [
        ("", "may not be empty"),
        ("..", "may not be \".\" or \"..\""),
        ("has space", "not allowed"),
        ("__private", "reserved for internal topics"),
    ];
    for (name, rule) in name_rules {
        let err = dev.fails(&["topic", "create", name], "");
        assert!(err.contains(rule), "{name:?}: {err}");
    }
    let long = "x".repeat(250);
    assert!(
        dev.fails(&["topic", "create", &long], "")
            .contains("at most 249")
    );
    dev.ok(&["topic", "create", "my.topic"], "");
    assert!(
        dev.fails(&["topic", "create", "my_topic"], "")
            .contains("collides with existing topic \"my.topic\"")
    );
    assert!(
        dev.fails(&["topic", "create", "my.topic"], "")
            .contains("already exists")
    );
    let err = dev.fails(&["topic", "create", "rf", "--replication-factor", "3"], "");
    assert!(err.contains("number of live brokers (1)"), "{err}");
    // Zero is refused, not taken for "the default".
    let err = dev.fails(&["topic", "create", "none", "--partitions", "0"], "");
    assert!(err.contains("between 1 and"), "{err}");
    let err = dev.fails(
        &["topic", "create", "none", "--replication-factor", "0"],
        "",
    );
    assert!(err.contains("replication factor"), "{err}");
    let err = dev.fails(
        &["topic", "create", "cfg", "--config", "retention.mss=5"],
        "",
    );
    assert!(
        err.contains("unknown config key \"retention.mss\""),
        "{err}"
    );
    let err = dev.fails(
        &["topic", "create", "cfg", "--config", "retention.ms=soon"],
        "",
    );
    assert!(
        err.contains("invalid value \"soon\" for retention.ms"),
        "{err}"
    );
    let err = dev.fails(
        &[
            "topic",
            "create",
            "cfg",
            "--config",
            "message.timestamp.type=Now",
        ],
        "",
    );
    assert!(err.contains("CreateTime or LogAppendTime"), "{err}");
    let err = dev.fails(&["topic", "add-partitions", "my.topic", "--total", "1"], "");
    assert!(err.contains("never removed"), "{err}");
    let err = dev.fails(&["produce", "missing"], "x\n");
    assert!(err.contains("unknown topic \"missing\""), "{err}");
    let err = dev.fails(&["consume", "missing", "--max-messages", "1"], "");
    assert!(err.contains("unknown topic \"missing\""), "{err}");
    let err = dev.fails(&["topic", "describe", "missing"], "");
    assert!(err.contains("unknown topic"), "{err}");
    // Oversized records: the error names the size and the limit.
    dev.ok(
        &[
            "topic",
            "create",
            "small",
            "--config",
            "max.message.bytes=1000",
        ],
        "",
    );
    let big = format!("{}\n", "y".repeat(2000));
    let err = dev.fails(&["produce", "small"], &big);
    assert!(err.contains("exceeds max.message.bytes (1000)"), "{err}");
    let err = dev.fails(
        &["produce", "small", "--key-separator", ":"],
        "k:v\nno separator here\n",
    );
    assert!(err.contains("line 2 has no key separator"), "{err}");
    let err = dev.fails(&["produce", "small", "--partition", "7"], "v\n");
    assert!(err.contains("partition 7 does not exist"), "{err}");
    // A malformed batch sent straight over gRPC is refused; nothing is written.
    let rt = runtime();
    rt.block_on(async {
        let mut producer = runnel_client::v1::producer_client::ProducerClient::connect(format!(
            "http://{}",
            dev.addr
        ))
        .await
        .expect("connect");
        let response = producer
            .produce(runnel_client::v1::ProduceRequest {
                request_id: 7,
                topic: "small".into(),
                partitions: vec![runnel_client::v1::PartitionRecords {
                    partition: 0,
                    records: bytes::Bytes::from_static(b"definitely not a record batch"),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("a response")
            .into_inner();
        let error = response.partitions[0].error.clone().expect("an error");
        assert_eq!(error.code, ErrorCode::CorruptBatch as i32, "{error:?}");
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", dev.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "runnel.v1.Producer".into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        assert_eq!(
            status.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
    // A client that opens a produce stream, sends, and vanishes without reading.
    rt.block_on(async {
        let mut producer = runnel_client::v1::producer_client::ProducerClient::connect(format!(
            "http://{}",
            dev.addr
        ))
        .await
        .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let batch = runnel_batch::encode(
            &[runnel_batch::Record {
                value: Some(bytes::Bytes::from_static(b"orphan")),
                ..Default::default()
            }],
            runnel_batch::BatchOptions::default(),
        );
        tx.send(runnel_client::v1::ProduceRequest {
            request_id: 1,
            topic: "small".into(),
            partitions: vec![runnel_client::v1::PartitionRecords {
                partition: 0,
                records: batch,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("queued");
        let responses = producer
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream opens");
        drop(responses);
        drop(tx);
        drop(producer);
    });
    // Still serving; the malformed batch wrote nothing.
    dev.ok(&["produce", "small"], "fine\n");
    let out = dev.ok(
        &[
            "consume",
            "small",
            "--from-beginning",
            "--timeout-ms",
            "1500",
        ],
        "",
    );
    let mut lines: Vec<&str> = out.lines().collect();
    // The vanished client's batch may or may not have been appended before it left.
    lines.retain(|l| *l != "orphan");
    assert_eq!(lines, ["v", "fine"]);
}

#[test]
fn topic_administration_as_kafka_users_know_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(
        &[
            "topic",
            "create",
            "logs",
            "--partitions",
            "2",
            "--config",
            "retention.ms=86400000",
        ],
        "",
    );
    dev.ok(&["topic", "create", "other"], "");
    assert_eq!(
        dev.ok(&["topic", "list"], "").lines().collect::<Vec<_>>(),
        ["logs", "other"]
    );
    let describe = dev.ok(&["topic", "describe", "logs"], "");
    assert!(
        describe.contains("Configs (overrides): retention.ms=86400000"),
        "{describe}"
    );
    dev.ok(
        &[
            "topic",
            "alter-config",
            "logs",
            "--config",
            "cleanup.policy=compact",
            "--delete-config",
            "retention.ms",
        ],
        "",
    );
    let describe = dev.ok(&["topic", "describe", "logs"], "");
    assert!(
        describe.contains("Configs (overrides): cleanup.policy=compact"),
        "{describe}"
    );
    assert!(describe.contains("retention.ms=604800000"), "{describe}");
    dev.ok(&["topic", "add-partitions", "logs", "--total", "4"], "");
    assert!(
        dev.ok(&["topic", "describe", "logs"], "")
            .contains("PartitionCount: 4")
    );
    // Partition 3 is new and usable.
    dev.ok(&["produce", "logs", "--partition", "3"], "a\nb\nc\nd\n");
    let out = dev.ok(
        &["topic", "trim", "logs", "--partition", "3", "--offset", "2"],
        "",
    );
    assert!(out.contains("now starts at offset 2"), "{out}");
    let out = dev.ok(
        &[
            "consume",
            "logs",
            "--partition",
            "3",
            "--from-beginning",
            "--max-messages",
            "2",
            "--timeout-ms",
            "3000",
        ],
        "",
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["c", "d"]);
    let out = dev.ok(
        &[
            "consume",
            "logs",
            "--partition",
            "3",
            "--offset",
            "3",
            "--max-messages",
            "1",
            "--timeout-ms",
            "3000",
        ],
        "",
    );
    assert_eq!(out.trim(), "d");
    let err = dev.fails(
        &["topic", "trim", "logs", "--partition", "3", "--offset", "9"],
        "",
    );
    assert!(err.contains("high watermark 4"), "{err}");
    // Timestamps: everything produced after `since` is found by --from-timestamp.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        .to_string();
    std::thread::sleep(Duration::from_millis(20));
    dev.ok(&["produce", "logs", "--partition", "3"], "late\n");
    let out = dev.ok(
        &[
            "consume",
            "logs",
            "--partition",
            "3",
            "--from-timestamp",
            &since,
            "--max-messages",
            "1",
            "--timeout-ms",
            "3000",
        ],
        "",
    );
    assert_eq!(out.trim(), "late");
    let info = dev.ok(&["cluster", "info"], "");
    assert!(info.contains("Topics:      2"), "{info}");
    dev.ok(&["topic", "delete", "other"], "");
    assert_eq!(dev.ok(&["topic", "list"], "").trim(), "logs");
    assert!(
        dev.fails(&["topic", "delete", "other"], "")
            .contains("unknown topic")
    );
    // Headers and acks flags are accepted end to end.
    dev.ok(
        &[
            "produce",
            "logs",
            "--partition",
            "0",
            "--acks",
            "all",
            "--header",
            "source=test",
        ],
        "h\n",
    );
    let err = dev.fails(&["produce", "logs", "--acks", "2"], "");
    assert!(err.contains("acks must be 0, 1 or all"), "{err}");
}

#[test]
fn min_insync_replicas_above_the_isr_refuses_acks_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(
        &[
            "topic",
            "create",
            "safe",
            "--config",
            "min.insync.replicas=2",
        ],
        "",
    );
    // Retried (the ISR may grow back) until the delivery timeout, then refused.
    let err = dev.fails(
        &[
            "produce",
            "safe",
            "--acks",
            "all",
            "--delivery-timeout-ms",
            "1000",
        ],
        "x\n",
    );
    assert!(err.contains("not enough in-sync replicas"), "{err}");
    dev.ok(&["produce", "safe", "--acks", "1"], "y\n");
}

#[test]
fn consume_follows_the_log_like_tail_f() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "live"], "");
    let addr = dev.addr.clone();
    let follower = std::thread::spawn(move || {
        support::runnel_at(
            &addr,
            &[
                "consume",
                "live",
                "--max-messages",
                "3",
                "--timeout-ms",
                "15000",
            ],
            "",
        )
    });
    // The follower starts at the end; records produced after it subscribed reach it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !follower.is_finished() && std::time::Instant::now() < deadline {
        dev.ok(&["produce", "live"], "tick\n");
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = follower.join().expect("follower");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["tick"; 3]
    );
}

#[test]
fn broker_start_reads_its_config_file_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "data_dir = \"x\"\nlisten = \"127.0.0.1:0\"\nretention = 5\n",
    )
    .expect("write");
    let output = std::process::Command::new(support::RUNNEL)
        .args(["broker", "start", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("unknown field `retention`"),
        "{err}"
    );
    let bad_default = dir.path().join("bad-default.toml");
    std::fs::write(
        &bad_default,
        "data_dir = \"x\"\n[topic_defaults]\n\"retention.ms\" = \"forever\"\n",
    )
    .expect("write");
    let output = std::process::Command::new(support::RUNNEL)
        .args(["broker", "start", "--config"])
        .arg(&bad_default)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("invalid value \"forever\" for retention.ms"),
        "{err}"
    );

    // Auth settings that cannot work are refused at start, with the fix.
    for (text, wanted) in [
        (
            "[auth]\nauthorization = true\nsuper_users = [\"admin\"]\n",
            "auth.super_users: \"admin\" is not a principal; write User:NAME",
        ),
        (
            "controller_quorum = \"1@127.0.0.1:1,2@127.0.0.1:2\"\n[auth]\nrequire_authentication = true\n",
            "set auth.cluster_secret_file",
        ),
        (
            "[auth]\nrequire_authentication = true\ncluster_secret_file = \"/nonexistent/secret\"\n",
            "reading auth.cluster_secret_file /nonexistent/secret",
        ),
    ] {
        let bad_auth = dir.path().join("bad-auth.toml");
        std::fs::write(
            &bad_auth,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n{text}",
                dir.path().join("auth-data").display().to_string()
            ),
        )
        .expect("write");
        let output = std::process::Command::new(support::RUNNEL)
            .args(["broker", "start", "--config"])
            .arg(&bad_auth)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && err.contains(wanted), "{err}");
    }

    let config = dir.path().join("runnel.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "node_id = 7\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\nauto_create_topics = true\ndefault_partitions = 4\n[topic_defaults]\n\"retention.ms\" = \"3600000\"\n",
            data.display().to_string()
        ),
    )
    .expect("write");
    let config = config.to_string_lossy();
    let (mut child, addr) = support::spawn_listening(&["broker", "start", "--config", &config]);
    let addr = addr.as_str();
    // Auto-creation with the configured defaults, on the configured node id.
    let out = support::runnel_at(addr, &["produce", "auto"], "one\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let describe = support::runnel_at(addr, &["topic", "describe", "auto"], "");
    let describe = String::from_utf8_lossy(&describe.stdout);
    assert!(describe.contains("PartitionCount: 4"), "{describe}");
    assert!(describe.contains("retention.ms=3600000"), "{describe}");
    let info = String::from_utf8_lossy(&support::runnel_at(addr, &["cluster", "info"], "").stdout)
        .to_string();
    assert!(info.contains("Controller:  7"), "{info}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn streaming_fetch_pushes_records_as_they_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "stream"], "");
    dev.ok(&["produce", "stream"], "first\n");
    let rt = runtime();
    let addr = dev.addr.clone();
    let values = rt.block_on(async move {
        use tokio_stream::StreamExt;
        let mut consumer =
            runnel_client::v1::consumer_client::ConsumerClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
        let mut stream = consumer
            .fetch_stream(runnel_client::v1::FetchRequest {
                partitions: vec![runnel_client::v1::FetchPartition {
                    topic: "stream".into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 0,
                }],
                max_wait_ms: 200,
                min_bytes: 1,
                max_bytes: 0,
                ..Default::default()
            })
            .await
            .expect("stream opens")
            .into_inner();
        let mut values = Vec::new();
        let producer_addr = addr.clone();
        let later = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            support::runnel_at(&producer_addr, &["produce", "stream"], "second\n")
        });
        while values.len() < 2 {
            let response = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("a response in time")
                .expect("stream open")
                .expect("ok");
            for part in response.partitions {
                for (_, raw) in runnel_batch::batches(&part.records).map(|b| b.expect("valid")) {
                    for record in runnel_batch::decode_records(raw).expect("decode") {
                        values.push(
                            String::from_utf8_lossy(&record.value.expect("value")).to_string(),
                        );
                    }
                }
            }
        }
        later.await.expect("producer");
        values
    });
    assert_eq!(values, ["first", "second"]);
}

#[test]
fn reflection_lists_every_service_in_v1_and_v1alpha() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    let rt = runtime();
    let addr = format!("http://{}", dev.addr);
    rt.block_on(async move {
        use tokio_stream::StreamExt;
        use tonic_reflection::pb::{v1, v1alpha};
        let channel = tonic::transport::Channel::from_shared(addr)
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let expected = [
            "runnel.v1.Admin",
            "runnel.v1.Consumer",
            "runnel.v1.Producer",
            "grpc.health.v1.Health",
        ];

        let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("v1 reflection")
            .into_inner();
        let Some(Ok(response)) = responses.next().await else {
            panic!("no v1 reflection response");
        };
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("unexpected v1 response");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(
                names.iter().any(|n| n == service),
                "v1 lacks {service}: {names:?}"
            );
        }

        let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let Some(Ok(response)) = responses.next().await else {
            panic!("no v1alpha reflection response");
        };
        let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("unexpected v1alpha response");
        };
        assert!(list.service.iter().any(|s| s.name == "runnel.v1.Producer"));
    });
}

#[test]
fn a_data_directory_serves_one_process_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "mine"], "");
    let data_dir = dir.path().to_string_lossy().to_string();
    let output = support::runnel_exits(
        &["dev", "--data-dir", &data_dir, "--listen", "127.0.0.1:0"],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "data directory {data_dir} is in use by another Runnel process (pid "
        )) && stderr.contains("choose another --data-dir"),
        "{stderr}"
    );
    // The first one never noticed.
    assert!(dev.ok(&["topic", "list"], "").contains("mine"));
    // Once it is gone (even by kill -9), the directory is free again.
    dev.kill9();
    let again = Dev::start(dir.path());
    assert!(again.ok(&["topic", "list"], "").contains("mine"));
}

#[test]
fn a_partition_whose_log_fails_closed_is_fenced_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "healthy"], "");
    dev.ok(&["topic", "create", "broken"], "");
    dev.ok(&["produce", "healthy"], "still here\n");
    // Three requests, three batches: damage to the first is followed by valid batches, so
    // recovery cannot take it for a torn write at the end of the log.
    for line in ["one\n", "two\n", "three\n"] {
        dev.ok(&["produce", "broken"], line);
    }
    dev.kill9();
    let segment = dir.path().join("broken-0").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&segment).expect("segment");
    bytes[66] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("damage the first batch");

    let dev = Dev::start(dir.path());
    let out = dev.ok(
        &[
            "consume",
            "healthy",
            "--from-beginning",
            "--max-messages",
            "1",
        ],
        "",
    );
    assert_eq!(out, "still here\n");
    dev.ok(&["produce", "healthy"], "and writable\n");
    let err = dev.fails(&["produce", "broken"], "four\n");
    assert!(err.contains("fenced"), "{err}");
    let described = dev.ok(&["topic", "describe", "broken"], "");
    assert!(
        described.contains("partition 0 is unavailable")
            && described.contains(&segment.display().to_string()),
        "{described}"
    );
}

#[test]
fn output_piped_into_a_reader_that_goes_away_ends_quietly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "long"], "");
    // Far more than a pipe holds, so the writer is still writing when the reader goes.
    let input: String = (0..30_000).map(|i| format!("line-{i:08}\n")).collect();
    dev.ok(&["produce", "long"], &input);
    // As `runnel consume long --from-beginning | head -1`.
    let mut child = std::process::Command::new(support::RUNNEL)
        .args([
            "--brokers",
            &dev.addr,
            "consume",
            "long",
            "--from-beginning",
        ])
        .args(["--max-messages", "30000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runnel starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("a line");
    assert_eq!(first, "line-00000000\n");
    let output = child.wait_with_output().expect("exits");
    assert_eq!(output.status.code(), Some(141), "{output:?}");
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn logs_come_as_json_lines_with_the_events_fields_when_asked() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = std::process::Command::new(support::RUNNEL)
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUNNEL_LOG", "info,openraft=warn")
        .env("RUNNEL_LOG_FORMAT", "json")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runnel starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("the server prints its address");
    assert!(first.contains("listening on"), "{first}");
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an address");
    let created = support::runnel_at(addr, &["topic", "create", "logged"], "");
    assert!(created.status.success());
    child.kill().expect("kill");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read the logs");
    let _ = child.wait();
    let events: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert!(!events.is_empty(), "no log lines");
    assert!(
        events
            .iter()
            .all(|e| e["level"].is_string() && e["message"].is_string())
    );
    assert!(
        events
            .iter()
            .any(|e| e["topic"] == "logged" && e["partition"].is_number()),
        "the events' fields are fields of the JSON object: {logs}"
    );
}
