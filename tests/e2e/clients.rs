//! The example clients in `examples/clients/` (Python with grpcio, Node.js with
//! @grpc/grpc-js) against a real broker: each installs its packages, then creates a
//! topic, produces keyed records with headers, consumes from the beginning, reads as a
//! group member with commits, and follows new records; the Rust CLI checks what they
//! wrote and writes what they read.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::Dev;

fn example(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/clients")
        .join(dir)
}

/// Runs the example's `setup.sh` (a virtual environment or node_modules) once per run.
fn setup(dir: &str) {
    // Once per example and test process, and one at a time: a setup rewrites what a
    // running example client loads (node_modules, the generated stubs).
    static DONE: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let mut done = DONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if done.contains(dir) {
        return;
    }
    let output = Command::new("bash")
        .arg(example(dir).join("setup.sh"))
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "{dir}/setup.sh failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    done.insert(dir.to_string());
}

/// How to start one of the example clients.
pub(crate) struct Example {
    program: PathBuf,
    script: PathBuf,
}

impl Example {
    pub(crate) fn python() -> Example {
        setup("python");
        Example {
            program: example("python").join(".venv/bin/python"),
            script: example("python").join("runnel_example.py"),
        }
    }

    pub(crate) fn node() -> Example {
        setup("node");
        Example {
            program: PathBuf::from("node"),
            script: example("node").join("runnel_example.js"),
        }
    }

    fn command(&self, broker: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .arg(&self.script)
            .args(["--broker", broker])
            .args(args);
        command
    }

    pub(crate) fn run(&self, broker: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(broker, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example starts");
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write;
            input.write_all(stdin.as_bytes()).expect("stdin");
        }
        child.wait_with_output().expect("the example runs")
    }

    pub(crate) fn ok(&self, broker: &str, args: &[&str], stdin: &str) -> String {
        let output = self.run(broker, args, stdin);
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}",
            self.script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8")
    }
}

/// `offset<TAB>key<TAB>value<TAB>headers` lines of the examples, as (key, value, headers).
fn records(out: &str) -> BTreeSet<(String, String, String)> {
    out.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Some((
                cols.get(1)?.to_string(),
                cols.get(2)?.to_string(),
                cols.get(3).unwrap_or(&"").to_string(),
            ))
        })
        .collect()
}

fn drives_a_broker(client: &Example, topic: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    let broker = dev.addr.as_str();
    let created = client.ok(broker, &["create-topic", topic, "--partitions", "3"], "");
    assert!(created.contains("3 partitions"), "{created}");
    // A bad request gets the broker's error code and message.
    let refused = client.run(broker, &["create-topic", "zero", "--partitions", "0"], "");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("INVALID_PARTITIONS"), "{err}");

    // Keyed records with headers; the broker places them as the Rust client would.
    let input: String = (0..30).map(|i| format!("user-{i}\tvalue {i}\n")).collect();
    let placed = client.ok(
        broker,
        &["produce", topic, "--header", "origin=example"],
        &input,
    );
    let placed: Vec<(u32, i64)> = placed
        .lines()
        .map(|l| {
            let (p, o) = l.split_once('\t').expect("partition and offset");
            (p.parse().expect("partition"), o.parse().expect("offset"))
        })
        .collect();
    assert_eq!(placed.len(), 30);
    dev.ok(&["topic", "create", "rust-placed", "--partitions", "3"], "");
    dev.ok(&["produce", "rust-placed", "--key-separator", "\t"], &input);
    let mut rust_partition = BTreeMap::new();
    for partition in 0..3u32 {
        let out = dev.ok(
            &[
                "consume",
                topic,
                "--partition",
                &partition.to_string(),
                "--from-beginning",
                "--print-key",
                "--print-headers",
                "--timeout-ms",
                "700",
            ],
            "",
        );
        for line in out.lines() {
            assert!(line.contains("origin=example"), "{line}");
        }
        let theirs = dev.ok(
            &[
                "consume",
                "rust-placed",
                "--partition",
                &partition.to_string(),
                "--from-beginning",
                "--print-key",
                "--timeout-ms",
                "700",
            ],
            "",
        );
        for line in theirs.lines() {
            let key = line.split('\t').next().unwrap_or_default().to_string();
            rust_partition.insert(key, partition);
        }
    }
    for (i, (partition, _)) in placed.iter().enumerate() {
        assert_eq!(
            rust_partition.get(&format!("user-{i}")),
            Some(partition),
            "user-{i} went elsewhere than the Rust client puts it"
        );
    }

    // Consumed from the beginning: every record, with its key, value and header.
    let consumed = records(&client.ok(broker, &["consume", topic, "--max", "30"], ""));
    let expected: BTreeSet<(String, String, String)> = (0..30)
        .map(|i| {
            (
                format!("user-{i}"),
                format!("value {i}"),
                "origin=example".to_string(),
            )
        })
        .collect();
    assert_eq!(consumed, expected);

    // A group member reads everything once and commits; the next run finds nothing new.
    let first = records(&client.ok(broker, &["group", "readers", topic, "--max", "30"], ""));
    assert_eq!(first, expected);
    dev.ok(
        &["produce", topic, "--key-separator", "\t"],
        "late\tone more\n",
    );
    let second = records(&client.ok(broker, &["group", "readers", topic], ""));
    assert_eq!(
        second,
        BTreeSet::from([("late".into(), "one more".into(), String::new())]),
        "the committed offsets were not kept"
    );

    // tail: records produced after it started arrive through the streaming fetch.
    let mut tail = client
        .command(broker, &["tail", topic])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail starts");
    let stdout = tail.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        dev.ok(
            &["produce", topic, "--key-separator", "\t"],
            "tailed\tnew\n",
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(700)) {
            got.push(line);
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(
        got.iter().any(|l| l.contains("tailed\tnew")),
        "tail printed {got:?}"
    );
}

#[test]
fn the_python_client_produces_consumes_and_joins_a_group() {
    drives_a_broker(&Example::python(), "from-python");
}

#[test]
fn the_node_client_produces_consumes_and_joins_a_group() {
    drives_a_broker(&Example::node(), "from-node");
}
