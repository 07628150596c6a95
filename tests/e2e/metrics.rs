//! The Prometheus endpoint of a broker, scraped while a producer, a consumer group, a
//! transform and a connector have run, and parsed by prometheus_client's own parser
//! (`examples/monitoring/scrape.py`): the counters agree with what the test produced
//! and consumed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::{Dev, wait_until};

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/monitoring")
}

/// One sample of a scrape.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

fn scrape(url: &str) -> Vec<Sample> {
    let output = Command::new(monitoring().join(".venv/bin/python"))
        .arg(monitoring().join("scrape.py"))
        .arg(url)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "scraping {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a sample"))
        .collect()
}

/// The sum of the samples named `name` whose labels include `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn the_metrics_endpoint_counts_what_clients_transforms_and_connectors_did() {
    let setup = Command::new("bash")
        .arg(monitoring().join("setup.sh"))
        .output()
        .expect("bash runs");
    assert!(
        setup.status.success(),
        "setup.sh failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data").to_string_lossy().to_string();
    let metrics_addr = format!("127.0.0.1:{}", crate::cluster::free_port());
    let dev = Dev::spawn(&[
        "dev",
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics_addr,
    ]);
    let url = format!("http://{metrics_addr}/metrics");
    let run = |args: &[&str], stdin: &str| dev.ok(args, stdin);

    run(&["topic", "create", "orders", "--partitions", "2"], "");
    run(&["topic", "create", "copies", "--partitions", "2"], "");
    let input: String = (0..100).map(|i| format!("order-{i}\n")).collect();
    run(&["produce", "orders"], &input);
    // A group reads 60 of the 100 and commits: 40 are left.
    run(
        &[
            "consume",
            "orders",
            "--group",
            "readers",
            "--from-beginning",
            "--max-messages",
            "60",
        ],
        "",
    );
    run(
        &[
            "transform",
            "deploy",
            "--name",
            "copy",
            "--input",
            "orders",
            "--output",
            "copies",
            "--wasm",
            &crate::transforms::components()
                .join("identity.wasm")
                .display()
                .to_string(),
        ],
        "",
    );
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let sink = dir.path().join("sink.yaml");
    std::fs::write(
        &sink,
        format!(
            "name: archive\nkind: sink\nconnector: file-sink\ntopic: copies\nconfig:\n  path: {out}/copy.log\ncapabilities:\n  dirs:\n    - {{ path: {out}, mode: read-write }}\n",
            out = out_dir.display()
        ),
    )
    .expect("write");
    run(&["connector", "create", &sink.display().to_string()], "");

    let mut samples = Vec::new();
    wait_until(
        "the transform and the connector to have moved every record",
        Duration::from_secs(60),
        || {
            samples = scrape(&url);
            sum(
                &samples,
                "runnel_transform_records_out_total",
                &[("transform", "copy")],
            ) == 100.0
                && sum(
                    &samples,
                    "runnel_connector_records_total",
                    &[("connector", "archive")],
                ) == 100.0
        },
    );
    let orders = [("topic", "orders")];
    // Produce: 100 records appended, their bytes counted, each request timed.
    assert_eq!(
        sum(&samples, "runnel_partition_records_in_total", &orders),
        100.0
    );
    assert!(sum(&samples, "runnel_partition_bytes_in_total", &orders) > 100.0 * 7.0);
    assert!(sum(&samples, "runnel_produce_duration_seconds_count", &[]) >= 1.0);
    // The consumer and the transform read them.
    assert!(
        sum(&samples, "runnel_partition_bytes_out_total", &orders)
            >= sum(&samples, "runnel_partition_bytes_in_total", &orders)
    );
    assert_eq!(
        sum(
            &samples,
            "runnel_partition_records_in_total",
            &[("topic", "copies")]
        ),
        100.0
    );
    // The group's lag, as its coordinator reports it.
    assert_eq!(
        sum(
            &samples,
            "runnel_group_lag",
            &[("group", "readers"), ("topic", "orders")]
        ),
        40.0
    );
    // Calls by method and code: two topics created, and one refused below.
    assert!(
        sum(
            &samples,
            "runnel_grpc_requests_total",
            &[("method", "CreateTopic"), ("code", "Ok")]
        ) >= 2.0
    );
    assert!(
        sum(
            &samples,
            "runnel_grpc_request_duration_seconds_count",
            &[("method", "CreateTopic")]
        ) >= 2.0
    );
    let refused = dev.run(&["topic", "create", "orders"], "");
    assert!(!refused.status.success());
    let after = scrape(&url);
    assert!(
        sum(
            &after,
            "runnel_grpc_requests_total",
            &[("method", "CreateTopic"), ("code", "AlreadyExists")]
        ) >= 1.0,
        "{:?}",
        after
            .iter()
            .filter(|s| s.name == "runnel_grpc_requests_total")
            .collect::<Vec<_>>()
    );
    // The transform and the connector, by name and state.
    assert_eq!(
        sum(
            &samples,
            "runnel_transform_records_in_total",
            &[("transform", "copy")]
        ),
        100.0
    );
    assert_eq!(
        sum(
            &samples,
            "runnel_transform_state",
            &[("transform", "copy"), ("state", "Running")]
        ),
        1.0
    );
    assert!(
        sum(
            &samples,
            "runnel_transform_batch_duration_seconds_count",
            &[("transform", "copy")]
        ) >= 1.0
    );
    assert_eq!(
        sum(
            &samples,
            "runnel_connector_state",
            &[("connector", "archive"), ("state", "Running")]
        ),
        1.0
    );
    // The partitions, the cluster and the process.
    assert_eq!(sum(&samples, "runnel_partition_leader", &orders), 2.0);
    assert_eq!(
        sum(&samples, "runnel_under_replicated_partitions", &[]),
        0.0
    );
    assert_eq!(sum(&samples, "runnel_offline_partitions", &[]), 0.0);
    assert_eq!(sum(&samples, "runnel_controller_active", &[]), 1.0);
    assert_eq!(sum(&samples, "runnel_brokers", &[("state", "live")]), 1.0);
    assert!(sum(&samples, "runnel_partition_log_size_bytes", &orders) > 0.0);
    assert!(sum(&samples, "process_cpu_seconds_total", &[]) > 0.0);
    assert!(sum(&samples, "process_resident_memory_bytes", &[]) > 1e6);

    // The example alert rules and dashboard use only metrics the broker exposes.
    let names: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(monitoring().join(file)).expect("read");
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("runnel_") || word.starts_with("process_") {
                assert!(
                    names.contains(word),
                    "{file} uses {word}, which no broker exposes"
                );
            }
        }
    }

    // Anything but /metrics is not found.
    let missing = Command::new(monitoring().join(".venv/bin/python"))
        .arg(monitoring().join("scrape.py"))
        .arg(format!("http://{metrics_addr}/other"))
        .output()
        .expect("python runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
}
