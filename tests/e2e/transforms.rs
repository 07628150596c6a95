//! Wasm transforms end to end: the example components built from `examples/transforms`,
//! deployed into a running Runnel with the CLI.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::Dev;

/// Builds the example transforms once per test run and returns their directory.
pub fn components() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| crate::support::build_components("examples/transforms"))
        .clone()
}

fn wasm(name: &str) -> String {
    components()
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

fn wait_for_lines(dev: &Dev, topic: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = dev.ok(
            &["consume", topic, "--from-beginning", "--timeout-ms", "700"],
            "",
        );
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
    }
}

/// `transform deploy --name N --input I --output O --wasm W [extra...]`.
fn deploy<'a>(
    name: &'a str,
    input: &'a str,
    output: &'a str,
    wasm: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "transform",
        "deploy",
        "--name",
        name,
        "--input",
        input,
        "--output",
        output,
        "--wasm",
        wasm,
    ];
    args.extend_from_slice(extra);
    args
}

fn describe_field(dev: &Dev, name: &str, field: &str) -> String {
    dev.ok(&["transform", "describe", name], "")
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn example_transforms_filter_enrich_split_and_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    for topic in [
        "orders",
        "big-orders",
        "enriched",
        "lines",
        "words",
        "logs",
        "errors",
        "rest",
    ] {
        dev.ok(&["topic", "create", topic], "");
    }
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "big",
            "--input",
            "orders",
            "--output",
            "big-orders",
            "--wasm",
            &wasm("filter"),
            "--config",
            "min=100",
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "enrich",
            "--input",
            "big-orders",
            "--output",
            "enriched",
            "--wasm",
            &wasm("enrich"),
            "--config",
            "set.region=eu",
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "words",
            "--input",
            "lines",
            "--output",
            "words",
            "--wasm",
            &wasm("split_words"),
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "route",
            "--input",
            "logs",
            "--output",
            "errors",
            "--output",
            "rest",
            "--wasm",
            &wasm("router"),
        ],
        "",
    );
    dev.ok(
        &["produce", "orders"],
        "{\"id\":1,\"amount\":50}\n{\"id\":2,\"amount\":150}\n{\"id\":3,\"amount\":100}\n",
    );
    dev.ok(&["produce", "lines"], "The quick brown\nfox  jumps\n");
    dev.ok(&["produce", "logs"], "{\"level\":\"error\",\"m\":1}\n{\"level\":\"info\",\"m\":2}\n{\"level\":\"error\",\"m\":3}\n");
    assert_eq!(
        wait_for_lines(&dev, "big-orders", 2),
        ["{\"id\":2,\"amount\":150}", "{\"id\":3,\"amount\":100}"]
    );
    assert_eq!(
        wait_for_lines(&dev, "enriched", 2),
        [
            "{\"amount\":150,\"id\":2,\"region\":\"eu\",\"source_offset\":0}",
            "{\"amount\":100,\"id\":3,\"region\":\"eu\",\"source_offset\":1}"
        ]
    );
    assert_eq!(
        wait_for_lines(&dev, "words", 5),
        ["the", "quick", "brown", "fox", "jumps"]
    );
    assert_eq!(
        wait_for_lines(&dev, "errors", 2),
        [
            "{\"level\":\"error\",\"m\":1}",
            "{\"level\":\"error\",\"m\":3}"
        ]
    );
    assert_eq!(
        wait_for_lines(&dev, "rest", 1),
        ["{\"level\":\"info\",\"m\":2}"]
    );
    let list = dev.ok(&["transform", "list"], "");
    for name in ["big", "enrich", "words", "route"] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(name) && l.contains("Running")),
            "{list}"
        );
    }
    assert_eq!(
        describe_field(&dev, "big", "Records:"),
        "3 in, 2 out, 0 errors"
    );
    // The transform's position is a consumer group like any other.
    let group = dev.ok(&["group", "describe", "transform-big"], "");
    assert!(group.contains("orders"), "{group}");
}

#[test]
fn error_policies_and_runaway_guests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    for topic in [
        "in-skip", "out-skip", "in-dlq", "out-dlq", "dlq", "in-fail", "out-fail", "calm-in",
        "calm-out",
    ] {
        dev.ok(&["topic", "create", topic], "");
    }
    let faulty = wasm("faulty");
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "skipper",
            "--input",
            "in-skip",
            "--output",
            "out-skip",
            "--wasm",
            &faulty,
            "--error-policy",
            "skip",
            "--cpu-limit-ms",
            "200",
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "dead",
            "--input",
            "in-dlq",
            "--output",
            "out-dlq",
            "--wasm",
            &faulty,
            "--error-policy",
            "dead-letter",
            "--dead-letter-topic",
            "dlq",
            "--cpu-limit-ms",
            "200",
            "--memory-limit-mb",
            "32",
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "strict",
            "--input",
            "in-fail",
            "--output",
            "out-fail",
            "--wasm",
            &faulty,
        ],
        "",
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "calm",
            "--input",
            "calm-in",
            "--output",
            "calm-out",
            "--wasm",
            &wasm("identity"),
        ],
        "",
    );
    // An infinite loop in one transform does not stop another.
    dev.ok(&["produce", "in-skip"], "a\nloop\nb\ntrap\nbad\nc\n");
    dev.ok(&["produce", "calm-in"], "1\n2\n3\n");
    assert_eq!(wait_for_lines(&dev, "calm-out", 3), ["1", "2", "3"]);
    assert_eq!(wait_for_lines(&dev, "out-skip", 3), ["a", "b", "c"]);
    let logs = dev.ok(&["transform", "logs", "skipper"], "");
    assert!(
        logs.contains("skipped input in-skip-0@1") && logs.contains("CPU limit of 200 ms"),
        "{logs}"
    );
    assert!(logs.contains("asked to trap at offset 3"), "{logs}");
    assert!(logs.contains("record at offset 4 is bad"), "{logs}");
    assert!(
        logs.contains("[guest info] faulty transform ready"),
        "{logs}"
    );
    // Dead-letter: the bad inputs, unchanged, with the error in headers.
    dev.ok(&["produce", "in-dlq"], "x\ngrow\nundeclared\ny\n");
    assert_eq!(wait_for_lines(&dev, "out-dlq", 2), ["x", "y"]);
    assert_eq!(wait_for_lines(&dev, "dlq", 2), ["grow", "undeclared"]);
    let logs = dev.ok(&["transform", "logs", "dead"], "");
    assert!(
        logs.contains("memory limit") && logs.contains("undeclared topic \"nowhere\""),
        "{logs}"
    );
    // Fail: the deployment stops, naming the transform, the input offset and the message.
    dev.ok(&["produce", "in-fail"], "ok\nbad\nlater\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while describe_field(&dev, "strict", "State:").starts_with("Running")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = describe_field(&dev, "strict", "State:");
    assert!(
        state.starts_with("Failed")
            && state.contains("\"strict\"")
            && state.contains("in-fail-0@1"),
        "{state}"
    );
    assert!(state.contains("record at offset 1 is bad"), "{state}");
    // Nothing after the failing record was emitted.
    let out = dev.ok(
        &[
            "consume",
            "out-fail",
            "--from-beginning",
            "--timeout-ms",
            "700",
        ],
        "",
    );
    assert!(!out.contains("later"), "{out}");
    // The broker kept serving throughout.
    dev.ok(&["produce", "calm-in"], "4\n");
    assert_eq!(wait_for_lines(&dev, "calm-out", 4).len(), 4);
}

#[test]
fn redeploys_and_restarts_continue_from_the_committed_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let dev = Dev::start(&data);
    dev.ok(&["topic", "create", "src"], "");
    dev.ok(&["topic", "create", "dst"], "");
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "pass",
            "--input",
            "src",
            "--output",
            "dst",
            "--wasm",
            &wasm("identity"),
        ],
        "",
    );
    let first: String = (0..10).map(|i| format!("v1-{i}\n")).collect();
    dev.ok(&["produce", "src"], &first);
    assert_eq!(wait_for_lines(&dev, "dst", 10).len(), 10);
    // A new version (the words splitter) continues where the old one stopped.
    let out = dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "pass",
            "--input",
            "src",
            "--output",
            "dst",
            "--wasm",
            &wasm("split_words"),
            // Offsets commit a minute apart while input flows, and whenever it is quiet
            // or the task stops: nothing below is read twice.
            "--commit-interval-ms",
            "60000",
        ],
        "",
    );
    assert!(out.contains("version 2"), "{out}");
    let described = dev.ok(&["transform", "describe", "pass"], "");
    assert!(
        described.contains("Processing:  at-least-once (commit every 60000 ms)"),
        "{described}"
    );
    dev.ok(&["produce", "src"], "Second Version\n");
    let lines = wait_for_lines(&dev, "dst", 12);
    assert_eq!(lines.len(), 12, "no committed record re-emitted: {lines:?}");
    assert_eq!(&lines[10..], ["second", "version"]);
    // Paused: nothing flows; resumed: it does.
    dev.ok(&["transform", "pause", "pass"], "");
    dev.ok(&["produce", "src"], "while paused\n");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        dev.ok(
            &["consume", "dst", "--from-beginning", "--timeout-ms", "500"],
            ""
        )
        .lines()
        .count(),
        12
    );
    dev.ok(&["transform", "resume", "pass"], "");
    assert_eq!(wait_for_lines(&dev, "dst", 14).len(), 14);
    // A broker restart brings the deployment back, still version 2, at its position.
    dev.stop();
    let dev = Dev::start(&data);
    dev.ok(&["produce", "src"], "after restart\n");
    let lines = wait_for_lines(&dev, "dst", 16);
    assert_eq!(lines.len(), 16, "{lines:?}");
    assert!(
        dev.ok(&["transform", "describe", "pass"], "")
            .contains("version 2")
    );
    dev.ok(&["transform", "remove", "pass"], "");
    assert!(
        dev.fails(&["transform", "describe", "pass"], "")
            .contains("unknown transform \"pass\"")
    );
}

#[test]
fn bad_deploys_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "a"], "");
    dev.ok(&["topic", "create", "b"], "");
    let (identity, filter, router) = (wasm("identity"), wasm("filter"), wasm("router"));
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").expect("write");
    let junk = junk.display().to_string();
    let cases = [
        (
            deploy("x", "nope", "b", &identity, &[]),
            "unknown topic \"nope\"",
        ),
        (
            deploy("x", "a", "b", &filter, &[]),
            "missing config value \"min\"",
        ),
        (
            deploy("x", "a", "b", &junk, &[]),
            "not a valid Wasm component",
        ),
        (
            deploy("bad name", "a", "b", &identity, &[]),
            "invalid transform name",
        ),
        (
            deploy("x", "a", "a", &identity, &[]),
            "both input and output",
        ),
        (
            deploy("x", "a", "b", &router, &[]),
            "exactly two output topics",
        ),
        (
            deploy("x", "a", "b", &identity, &["--error-policy", "dead-letter"]),
            "needs a dead-letter topic",
        ),
    ];
    for (args, expected) in cases {
        let err = dev.fails(&args, "");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let file = dir.path().join("t.yaml");
    std::fs::write(
        &file,
        format!(
            "name: from-file\ninput: a\noutputs: [b]\nwasm: {}\ncolour: blue\n",
            wasm("identity")
        ),
    )
    .expect("write");
    let err = dev.fails(&["transform", "deploy", &file.display().to_string()], "");
    assert!(err.contains("t.yaml") && err.contains("colour"), "{err}");
    std::fs::write(
        &file,
        format!(
            "name: from-file\ninput: a\noutputs: [b]\nwasm: {}\n",
            wasm("identity")
        ),
    )
    .expect("write");
    dev.ok(&["transform", "deploy", &file.display().to_string()], "");
    dev.ok(&["produce", "a"], "via file\n");
    assert_eq!(wait_for_lines(&dev, "b", 1), ["via file"]);
}

#[test]
fn transform_test_runs_a_component_without_a_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("records.jsonl");
    std::fs::write(
        &input,
        "{\"value\": \"Hello wasm World\"}\n{\"key\": \"k\", \"value\": \"again\"}\n",
    )
    .expect("write");
    let output = Command::new(crate::support::RUNNEL)
        .args([
            "transform",
            "test",
            "--wasm",
            &wasm("split_words"),
            "--input",
        ])
        .arg(&input)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let values: Vec<String> = stdout
        .lines()
        .filter_map(|l| {
            l.split("\"value\":\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(values, ["hello", "wasm", "world", "again"], "{stdout}");
    std::fs::write(&input, "{\"value\": \"bad\"}\n{\"value\": 5}\n").expect("write");
    let output = Command::new(crate::support::RUNNEL)
        .args(["transform", "test", "--wasm", &wasm("faulty"), "--input"])
        .arg(&input)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("input line 2 is not a record"),
        "{err}"
    );
}

#[test]
fn deployments_saved_on_a_brokers_disk_by_an_earlier_version_are_imported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let data = root.join("data");
    // A data directory as an earlier version left it: each deployment as a file of the
    // broker that ran it.
    let dev = Dev::start(&data);
    dev.ok(&["topic", "create", "src"], "");
    dev.ok(&["topic", "create", "dst"], "");
    dev.stop();
    std::fs::create_dir_all(data.join("__transforms/wasm")).expect("mkdir");
    std::fs::copy(wasm("identity"), data.join("__transforms/wasm/old.wasm")).expect("copy");
    std::fs::write(
        data.join("__transforms/pass.json"),
        r#"{"name":"pass","input_topic":"src","output_topics":["dst"],"config":{},
            "error_policy":0,"dead_letter_topic":"","start":"earliest",
            "memory_limit_bytes":0,"cpu_limit_ms":0,"sha256":"old","version":3,"paused":false}"#,
    )
    .expect("write");
    std::fs::create_dir_all(root.join("in")).expect("mkdir");
    std::fs::write(root.join("in/app.log"), "one\ntwo\n").expect("write");
    let yaml = format!(
        "name: app-logs\nkind: source\nconnector: file-source\ntopic: src\nconfig:\n  path: {in_dir}/app.log\ncapabilities:\n  dirs:\n    - {{ path: {in_dir}, mode: read }}\n",
        in_dir = root.join("in").display()
    );
    std::fs::create_dir_all(data.join("__connect/wasm")).expect("mkdir");
    std::fs::write(
        data.join("__connect/app-logs.json"),
        serde_json::json!({
            "file": root.join("source.yaml").display().to_string(),
            "yaml": yaml,
            "connector_sha256": "",
            "transform_sha256": [],
            "paused": false,
        })
        .to_string(),
    )
    .expect("write");
    let dev = Dev::start(&data);
    // Both run again, from the cluster's store, and the files are marked imported.
    assert_eq!(wait_for_lines(&dev, "dst", 2), ["one", "two"]);
    let describe = dev.ok(&["transform", "describe", "pass"], "");
    assert!(describe.contains("version 3"), "{describe}");
    assert!(describe.contains("Brokers:     1"), "{describe}");
    let status = dev.ok(&["connector", "status", "app-logs"], "");
    assert!(status.contains("Running on broker 1"), "{status}");
    assert!(data.join("__transforms/pass.json.imported").exists());
    assert!(data.join("__connect/app-logs.json.imported").exists());
    // Imported once: a restart runs them from the store.
    dev.stop();
    let dev = Dev::start(&data);
    std::fs::write(root.join("in/app.log"), "one\ntwo\nthree\n").expect("write");
    assert_eq!(wait_for_lines(&dev, "dst", 3), ["one", "two", "three"]);
}

/// `wasm` with a custom section of `bytes` zeros appended: still a valid component.
fn padded(wasm: &[u8], bytes: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"padding";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.resize(body.len() + bytes, 0);
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

#[test]
fn a_component_of_megabytes_is_stored_in_the_cluster_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let dev = Dev::start(&data);
    dev.ok(&["topic", "create", "src"], "");
    dev.ok(&["topic", "create", "dst"], "");
    // Larger than the producer's 1 MiB batches and the consumer's 4 MiB per partition.
    let big = dir.path().join("big.wasm");
    let identity = std::fs::read(wasm("identity")).expect("identity.wasm");
    std::fs::write(&big, padded(&identity, 6 << 20)).expect("write");
    let out = dev.ok(
        &deploy("big", "src", "dst", &big.display().to_string(), &[]),
        "",
    );
    assert!(out.contains("Running"), "{out}");
    dev.ok(&["produce", "src"], "one\n");
    assert_eq!(wait_for_lines(&dev, "dst", 1), ["one"]);
    // The broker's own copy goes: it reads the component back from __deployments.
    dev.stop();
    std::fs::remove_dir_all(data.join("__deployments/wasm")).expect("remove the copy");
    let dev = Dev::start(&data);
    dev.ok(&["produce", "src"], "two\n");
    assert_eq!(wait_for_lines(&dev, "dst", 2), ["one", "two"]);
}

/// The `.wasm` copies of components under a broker's data directory.
fn component_copies(dir: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path, found: &mut usize) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "wasm")
                && path
                    .parent()
                    .is_some_and(|p| p.ends_with("__deployments/wasm"))
            {
                *found += 1;
            }
        }
    }
    let mut found = 0;
    walk(dir, &mut found);
    found
}

#[test]
fn components_no_deployment_uses_are_removed_and_come_back_when_deployed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start_with_env(dir.path(), &[("RUNNEL_COMPONENT_GRACE_MS", "1000")]);
    for topic in ["in", "out"] {
        dev.ok(&["topic", "create", topic], "");
    }
    let (identity, filter) = (wasm("identity"), wasm("filter"));
    dev.ok(&deploy("a", "in", "out", &identity, &[]), "");
    assert_eq!(component_copies(dir.path()), 1);
    // Redeployed with another component: the first one is used by nothing.
    dev.ok(
        &deploy("a", "in", "out", &filter, &["--config", "min=1"]),
        "",
    );
    assert_eq!(component_copies(dir.path()), 2);
    crate::support::wait_until(
        "the unused component to go",
        Duration::from_secs(30),
        || component_copies(dir.path()) == 1,
    );
    // Deployed again, it is stored again and runs.
    dev.ok(&deploy("b", "in", "out", &identity, &[]), "");
    assert_eq!(describe_field(&dev, "b", "State:"), "Running");
    dev.ok(&["produce", "in"], "{\"amount\": 5}\n");
    let lines = wait_for_lines(&dev, "out", 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    // A deployment's component is never collected while it is in use.
    crate::support::holds_for(
        "both components in use stay",
        Duration::from_secs(3),
        || component_copies(dir.path()) == 2,
    );
    assert_eq!(describe_field(&dev, "a", "State:"), "Running");
}
