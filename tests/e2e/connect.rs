//! Connectors end to end: the connectors that ship in the binary, run by `runnel connect
//! run` (a real worker process) or created in `runnel dev` with `runnel connector create`,
//! against real files, a small HTTP server in the test, and a real PostgreSQL server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{Dev, RUNNEL, wait_until};
use crate::transforms::components;

fn consume_all(dev: &Dev, topic: &str) -> Vec<String> {
    dev.ok(
        &["consume", topic, "--from-beginning", "--timeout-ms", "700"],
        "",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

/// A `runnel connect run` worker process, killed when dropped.
struct ConnectWorker {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl ConnectWorker {
    fn start(dev: &Dev, files: &[&Path]) -> ConnectWorker {
        Self::start_with_env(dev, files, &[])
    }

    fn start_with_env(dev: &Dev, files: &[&Path], env: &[(&str, &str)]) -> ConnectWorker {
        let mut command = Command::new(RUNNEL);
        command
            .args(["--brokers", &dev.addr, "connect", "run"])
            .args(files)
            .env("RUNNEL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("runnel connect run starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut text = sink.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        ConnectWorker { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the worker to exit by itself; returns whether it succeeded.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConnectWorker {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[test]
fn file_to_topic_to_transform_to_topic_to_file_is_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    for topic in ["raw", "cooked"] {
        dev.ok(&["topic", "create", topic], "");
    }
    std::fs::create_dir_all(root.join("in")).expect("mkdir");
    std::fs::create_dir_all(root.join("out")).expect("mkdir");
    // Text a line-based pipeline must not alter: UTF-8, tabs, CR, empty lines, quotes.
    let mut input = String::new();
    for i in 0..3000 {
        input.push_str(&format!(
            "line {i}\tgrüße \"quoted\" 🦀 {}\n",
            "x".repeat(i % 50)
        ));
        if i % 500 == 0 {
            input.push('\n');
            input.push_str("crlf line\r\n");
        }
    }
    write(&root.join("in/app.log"), &input);
    let source = root.join("source.yaml");
    write(
        &source,
        &format!(
            "name: app-logs\nkind: source\nconnector: file-source\ntopic: raw\nconfig:\n  path: {in_dir}/app.log\ncapabilities:\n  dirs:\n    - {{ path: {in_dir}, mode: read }}\n",
            in_dir = root.join("in").display()
        ),
    );
    let sink = root.join("sink.yaml");
    write(
        &sink,
        &format!(
            "name: archive\nkind: sink\nconnector: file-sink\ntopic: cooked\nconfig:\n  path: {out}/copy.log\ncapabilities:\n  dirs:\n    - {{ path: {out}, mode: read-write }}\n",
            out = root.join("out").display()
        ),
    );
    dev.ok(
        &[
            "transform",
            "deploy",
            "--name",
            "pass",
            "--input",
            "raw",
            "--output",
            "cooked",
            "--wasm",
            &components().join("identity.wasm").display().to_string(),
        ],
        "",
    );
    dev.ok(&["connector", "create", &source.display().to_string()], "");
    dev.ok(&["connector", "create", &sink.display().to_string()], "");
    // Creating the same name twice is refused, not duplicated.
    let err = dev.fails(&["connector", "create", &sink.display().to_string()], "");
    assert!(err.contains("already exists"), "{err}");
    let copy = root.join("out/copy.log");
    wait_until("the copy", Duration::from_secs(60), || {
        std::fs::read(&copy).map(|b| b.len()).unwrap_or(0) >= input.len()
    });
    assert_eq!(std::fs::read_to_string(&copy).expect("copy"), input);
    // Lines appended later follow, in order.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("in/app.log"))
        .expect("open");
    file.write_all(b"appended 1\nappended 2\n").expect("append");
    let expected = format!("{input}appended 1\nappended 2\n");
    wait_until("the appended lines", Duration::from_secs(30), || {
        std::fs::read_to_string(&copy).unwrap_or_default() == expected
    });
    let list = dev.ok(&["connector", "list"], "");
    assert!(
        list.contains("app-logs") && list.contains("archive"),
        "{list}"
    );
    let status = dev.ok(&["connector", "status", "archive"], "");
    assert!(status.contains("State:      Running"), "{status}");
    // Offsets commit every 100 ms and as soon as the input is quiet.
    wait_until("the sink's lag to reach 0", Duration::from_secs(10), || {
        dev.ok(&["connector", "status", "archive"], "")
            .contains("Lag:        0")
    });
    let status = dev.ok(&["connector", "status", "app-logs"], "");
    assert!(status.contains("file-source v1"), "{status}");

    // Rotation: the file is renamed and a new one started; lines written to the old file
    // before the rename are not lost, and the new file is read from its start.
    file.write_all(b"before rotation\n").expect("append");
    drop(file);
    std::fs::rename(root.join("in/app.log"), root.join("in/app.log.1")).expect("rotate");
    write(&root.join("in/app.log"), "after rotation\n");
    let expected = format!("{expected}before rotation\nafter rotation\n");
    wait_until("the rotated lines", Duration::from_secs(30), || {
        std::fs::read_to_string(&copy).unwrap_or_default() == expected
    });

    // Truncated in place (copytruncate): read again from the start.
    std::fs::write(root.join("in/app.log"), "").expect("truncate");
    std::thread::sleep(Duration::from_millis(500));
    write(&root.join("in/app.log"), "after truncation\n");
    let expected = format!("{expected}after truncation\n");
    wait_until("the line after truncation", Duration::from_secs(30), || {
        std::fs::read_to_string(&copy).unwrap_or_default() == expected
    });

    // Created connectors survive a restart of the broker process, and resume at their
    // committed positions: nothing is read twice.
    dev.stop();
    let dev = Dev::start(&root.join("data"));
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("in/app.log"))
        .expect("open");
    file.write_all(b"after restart\n").expect("append");
    let expected = format!("{expected}after restart\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&copy).unwrap_or_default() != expected {
        assert!(
            Instant::now() < deadline,
            "the line after the restart did not arrive: {}\n{}\n{}\n{:?}",
            dev.ok(&["connector", "status", "app-logs"], ""),
            dev.ok(&["connector", "status", "archive"], ""),
            dev.ok(&["transform", "list"], ""),
            consume_all(&dev, "cooked")
                .iter()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(std::fs::read_to_string(&copy).expect("copy"), expected);

    dev.ok(&["connector", "pause", "app-logs"], "");
    file.write_all(b"while paused\n").expect("append");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(std::fs::read_to_string(&copy).expect("copy"), expected);
    dev.ok(&["connector", "resume", "app-logs"], "");
    let expected = format!("{expected}while paused\n");
    wait_until(
        "the line written while paused",
        Duration::from_secs(30),
        || std::fs::read_to_string(&copy).unwrap_or_default() == expected,
    );
    dev.ok(&["connector", "delete", "archive"], "");
    let err = dev.fails(&["connector", "status", "archive"], "");
    assert!(err.contains("unknown connector"), "{err}");
}

#[test]
fn killing_the_worker_mid_stream_loses_no_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "lines"], "");
    std::fs::create_dir_all(root.join("in")).expect("mkdir");
    let log = root.join("in/app.log");
    write(&log, "");
    let source = root.join("source.yaml");
    write(
        &source,
        &format!(
            "name: tail\nkind: source\nconnector: file-source\ntopic: lines\nbatch-records: 1000\nconfig:\n  path: {}\ncapabilities:\n  dirs:\n    - {{ path: {}, mode: read }}\n",
            log.display(),
            root.join("in").display()
        ),
    );
    let total = 60_000;
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("open");
            for chunk in 0..120 {
                let mut text = String::new();
                for i in chunk * 500..(chunk + 1) * 500 {
                    text.push_str(&format!("record {i}\n"));
                }
                file.write_all(text.as_bytes()).expect("append");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut worker = ConnectWorker::start(&dev, &[&source]);
    // Kill as soon as some lines are in (a consume that runs until the topic goes
    // quiet would wait for the whole file).
    let first = dev.ok(
        &[
            "consume",
            "lines",
            "--from-beginning",
            "--max-messages",
            "3000",
            "--timeout-ms",
            "30000",
        ],
        "",
    );
    assert_eq!(first.lines().count(), 3000);
    worker.kill9();
    assert!(
        !writer.is_finished(),
        "the file was complete before the kill"
    );
    let _worker = ConnectWorker::start(&dev, &[&source]);
    writer.join().expect("writer");
    let mut lines = Vec::new();
    wait_until("every line", Duration::from_secs(60), || {
        lines = consume_all(&dev, "lines");
        lines.len() >= total
    });
    let unique: std::collections::BTreeSet<&String> = lines.iter().collect();
    for i in 0..total {
        assert!(
            unique.contains(&format!("record {i}")),
            "record {i} was lost"
        );
    }
    // At most the batches whose position was not yet committed at the kill (the one in
    // flight and the one before it) are produced twice.
    assert!(
        lines.len() - unique.len() <= 2 * 1000,
        "{} duplicates",
        lines.len() - unique.len()
    );
}

#[test]
fn bad_connector_files_and_missing_capabilities_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "t"], "");
    std::fs::create_dir_all(root.join("private")).expect("mkdir");
    write(&root.join("private/data.log"), "secret line\n");
    let file = root.join("c.yaml");
    let run_fails = |yaml: &str, env: &[(&str, &str)]| -> String {
        write(&file, yaml);
        let mut worker = ConnectWorker::start_with_env(&dev, &[&file], env);
        assert!(
            !worker.wait_exit(Duration::from_secs(30)),
            "the worker should fail"
        );
        worker.stderr()
    };
    // A directory that is not granted.
    let err = run_fails(
        &format!(
            "name: nosy\nkind: source\nconnector: file-source\ntopic: t\nconfig:\n  path: {}\n",
            root.join("private/data.log").display()
        ),
        &[],
    );
    assert!(err.contains("capability denied"), "{err}");
    assert!(
        err.contains(&root.join("private").display().to_string()),
        "{err}"
    );
    assert!(consume_all(&dev, "t").is_empty());
    // A read-only grant for a sink that writes.
    let err = run_fails(
        &format!(
            "name: ro\nkind: sink\nconnector: file-sink\ntopic: t\nconfig:\n  path: {dir}/out.log\ncapabilities:\n  dirs: [{{ path: {dir}, mode: read }}]\n",
            dir = root.join("private").display()
        ),
        &[],
    );
    assert!(
        err.contains("capability denied") && err.contains("read-write"),
        "{err}"
    );
    // Broken YAML, an unknown connector, an undeclared secret: named with file and line.
    let err = run_fails("name: x\nkind: source\n  connector: [\n", &[]);
    assert!(err.contains("c.yaml"), "{err}");
    let err = run_fails(
        "name: x\nkind: source\nconnector: ftp-source\ntopic: t\n",
        &[],
    );
    assert!(
        err.contains("c.yaml:3: connector: unknown connector \"ftp-source\""),
        "{err}"
    );
    assert!(err.contains("file-source"), "{err}");
    let err = run_fails(
        "name: x\nkind: sink\nconnector: http-sink\ntopic: t\nconfig:\n  url: http://127.0.0.1:9/\n  header.Authorization: Bearer ${secrets.TOKEN}\n",
        &[],
    );
    assert!(
        err.contains("c.yaml:7: config.header.Authorization"),
        "{err}"
    );
    // A declared secret whose variable is not set.
    let err = run_fails(
        "name: x\nkind: sink\nconnector: http-sink\ntopic: t\nconfig:\n  url: http://127.0.0.1:9/\n  header.Authorization: Bearer ${secrets.TOKEN}\nsecrets:\n  TOKEN: { env: RUNNEL_TEST_TOKEN_UNSET }\n",
        &[],
    );
    assert!(
        err.contains("secret TOKEN") && err.contains("RUNNEL_TEST_TOKEN_UNSET"),
        "{err}"
    );
    // A config value the connector refuses.
    let err = run_fails(
        "name: x\nkind: sink\nconnector: http-sink\ntopic: t\nconfig:\n  url: ftp://example/\n",
        &[],
    );
    assert!(
        err.contains("config url") && err.contains("http://"),
        "{err}"
    );
    // An unknown topic.
    let err = run_fails(
        "name: x\nkind: sink\nconnector: file-sink\ntopic: nope\nconfig:\n  path: /tmp/x\n",
        &[],
    );
    assert!(err.contains("topic \"nope\""), "{err}");
    // The broker kept serving throughout.
    dev.ok(&["produce", "t"], "still here\n");
    assert_eq!(consume_all(&dev, "t"), ["still here"]);
}

/// What the test HTTP server received, and how it answers.
#[derive(Default)]
struct Received {
    bodies: Vec<String>,
    requests: usize,
}

/// A tiny HTTP/1.1 server on a free port: `answer(request number, path, body)` gives the
/// status and response body.
fn http_server(
    answer: impl Fn(usize, &str, &str) -> (u16, String) + Send + 'static,
) -> (u16, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (port, serve_http(listener, answer))
}

/// Answers requests on `listener` with `answer`; 2xx request bodies are recorded.
fn serve_http(
    listener: TcpListener,
    answer: impl Fn(usize, &str, &str) -> (u16, String) + Send + 'static,
) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received::default()));
    let seen = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    break;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).into_owned();
            let n = {
                let mut seen = seen.lock().expect("lock");
                seen.requests += 1;
                seen.requests
            };
            let (status, reply) = answer(n, &path, &body);
            if (200..300).contains(&status) && !body.is_empty() {
                seen.lock().expect("lock").bodies.push(body);
            }
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    received
}

#[test]
fn http_sink_retries_5xx_and_dead_letters_4xx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "events"], "");
    dev.ok(&["topic", "create", "events-dlq"], "");
    // The first three requests fail with 503; a body containing "bad" gets a 400.
    let (port, received) = http_server(|n, _, body| {
        if n <= 3 {
            (503, "busy".into())
        } else if body.contains("bad") {
            (400, "malformed event".into())
        } else {
            (200, "ok".into())
        }
    });
    let file = root.join("http.yaml");
    write(
        &file,
        &format!(
            "name: webhook\nkind: sink\nconnector: http-sink\ntopic: events\nconfig:\n  url: http://127.0.0.1:{port}/ingest\n  header.Authorization: Bearer ${{secrets.TOKEN}}\nsecrets:\n  TOKEN: {{ env: RUNNEL_TEST_TOKEN }}\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\nerrors:\n  policy: dead-letter\n  dead-letter-topic: events-dlq\n  retry: {{ initial-backoff-ms: 50, max-backoff-ms: 200 }}\n"
        ),
    );
    dev.ok(
        &["produce", "events"],
        "{\"n\":1}\n{\"n\":2,\"bad\":true}\n{\"n\":3}\n",
    );
    let _worker =
        ConnectWorker::start_with_env(&dev, &[&file], &[("RUNNEL_TEST_TOKEN", "t0ps3cret")]);
    wait_until("the good records", Duration::from_secs(30), || {
        received.lock().expect("lock").bodies.len() >= 2
    });
    let bodies = received.lock().expect("lock").bodies.clone();
    assert_eq!(bodies, ["{\"n\":1}", "{\"n\":3}"]);
    let dlq = dev.ok(
        &[
            "consume",
            "events-dlq",
            "--from-beginning",
            "--timeout-ms",
            "700",
            "--print-headers",
        ],
        "",
    );
    assert!(dlq.contains("{\"n\":2,\"bad\":true}"), "{dlq}");
    assert!(
        dlq.contains("HTTP 400") && dlq.contains("malformed event"),
        "{dlq}"
    );
    assert!(dlq.contains("webhook"), "{dlq}");
}

#[test]
fn http_sink_batches_and_reports_an_endpoint_that_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "events"], "");
    // A port with nothing listening yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let file = root.join("http.yaml");
    write(
        &file,
        &format!(
            "name: batched\nkind: sink\nconnector: http-sink\ntopic: events\nconfig:\n  url: http://127.0.0.1:{port}/bulk\n  batch: true\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\nerrors:\n  retry: {{ initial-backoff-ms: 50, max-backoff-ms: 200 }}\n"
        ),
    );
    dev.ok(&["connector", "create", &file.display().to_string()], "");
    dev.ok(&["produce", "events"], "{\"n\":1}\nplain text\n");
    wait_until("the retrying state", Duration::from_secs(30), || {
        let status = dev.ok(&["connector", "status", "batched"], "");
        status.contains("State:      Retrying") && status.contains(&format!("127.0.0.1:{port}"))
    });
    let list = dev.ok(&["connector", "list"], "");
    assert!(list.contains("Retrying"), "{list}");
    // The endpoint comes up: the batch arrives as one JSON array.
    let received = http_server_on(port);
    wait_until("the batch", Duration::from_secs(30), || {
        !received.lock().expect("lock").bodies.is_empty()
    });
    assert_eq!(
        received.lock().expect("lock").bodies[0],
        "[{\"n\":1},\"plain text\"]"
    );
    wait_until("the running state", Duration::from_secs(10), || {
        dev.ok(&["connector", "status", "batched"], "")
            .contains("State:      Running")
    });
}

/// An always-200 server on a given port.
fn http_server_on(port: u16) -> Arc<Mutex<Received>> {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    serve_http(listener, |_, _, _| (200, String::new()))
}

#[test]
fn http_source_follows_a_cursor_and_resumes_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "orders"], "");
    // Pages of two items; the cursor is the last id served.
    let (port, _) = http_server(|_, path, _| {
        let after: u32 = path
            .split("after=")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let items: Vec<String> = (after + 1..=(after + 2).min(5))
            .map(|id| format!("{{\"id\":{id},\"item\":\"order {id}\"}}"))
            .collect();
        let next = if items.is_empty() {
            after
        } else {
            (after + 2).min(5)
        };
        (
            200,
            format!(
                "{{\"data\":{{\"orders\":[{}]}},\"next\":{next}}}",
                items.join(",")
            ),
        )
    });
    let file = root.join("poll.yaml");
    write(
        &file,
        &format!(
            "name: orders-api\nkind: source\nconnector: http-source\ntopic: orders\nconfig:\n  url: http://127.0.0.1:{port}/orders\n  interval-ms: 100\n  records-pointer: /data/orders\n  cursor-pointer: /next\n  cursor-param: after\n  key-pointer: /id\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\n"
        ),
    );
    let mut worker = ConnectWorker::start(&dev, &[&file]);
    let mut lines = Vec::new();
    wait_until("five orders", Duration::from_secs(30), || {
        lines = consume_all(&dev, "orders");
        lines.len() >= 5
    });
    std::thread::sleep(Duration::from_millis(500));
    let keyed = dev.ok(
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--timeout-ms",
            "700",
            "--print-key",
        ],
        "",
    );
    assert_eq!(keyed.lines().count(), 5, "{keyed}");
    assert!(
        keyed.contains("3\t{\"id\":3,\"item\":\"order 3\"}"),
        "{keyed}"
    );
    // Restarted, it resumes at the committed cursor instead of producing again.
    worker.kill9();
    let _worker = ConnectWorker::start(&dev, &[&file]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(consume_all(&dev, "orders").len(), 5);
}

/// A PostgreSQL server in a temporary directory, stopped when dropped.
struct Postgres {
    port: u16,
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    as_user: bool,
}

fn postgres_bin() -> std::path::PathBuf {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (apt-get install postgresql; .ci/run does it)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_user {
            // PostgreSQL refuses to run as root.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start(root: &Path, password: &str) -> Postgres {
        let as_user = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let data = root.join("pg");
        std::fs::create_dir_all(&data).expect("mkdir");
        let pwfile = root.join("pwfile");
        write(&pwfile, &format!("{password}\n"));
        if as_user {
            for path in [root, &data, &pwfile] {
                let status = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(path)
                    .status()
                    .expect("chown");
                assert!(status.success());
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let pg = Postgres {
            port,
            bin: postgres_bin(),
            data: data.clone(),
            as_user,
        };
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = pg
            .command("pg_ctl")
            .args(["-D"])
            .arg(&data)
            .args(["-w", "-l"])
            .arg(data.join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                data.display()
            ))
            .arg("start")
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn psql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h"])
            .arg(&self.data)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[test]
fn postgres_sink_upserts_rows_by_key_in_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let pg = Postgres::start(&root.join("postgres"), "pg-s3cret");
    pg.psql("CREATE TABLE users (id text PRIMARY KEY, name text, age int)");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "users"], "");
    dev.ok(&["topic", "create", "users-dlq"], "");
    let file = root.join("pg.yaml");
    write(
        &file,
        &format!(
            "name: users-db\nkind: sink\nconnector: postgres-sink\ntopic: users\nconfig:\n  host: 127.0.0.1\n  port: {port}\n  user: postgres\n  password: ${{secrets.PG_PASSWORD}}\n  table: users\n  key-column: id\n  columns: name, age\nsecrets:\n  PG_PASSWORD: {{ env: RUNNEL_TEST_PG_PASSWORD }}\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\nerrors:\n  policy: dead-letter\n  dead-letter-topic: users-dlq\n",
            port = pg.port
        ),
    );
    dev.ok(
        &["produce", "users", "--key-separator", "|"],
        "u1|{\"name\":\"Ada\",\"age\":36}\nu2|{\"name\":\"Bob\",\"age\":41}\nu1|{\"name\":\"Ada L.\",\"age\":37}\nu3|{\"name\":\"O'Brien\",\"age\":\"not a number\"}\n",
    );
    let _worker =
        ConnectWorker::start_with_env(&dev, &[&file], &[("RUNNEL_TEST_PG_PASSWORD", "pg-s3cret")]);
    wait_until("the rows", Duration::from_secs(30), || {
        pg.psql("SELECT count(*) FROM users").trim() == "2"
    });
    assert_eq!(
        pg.psql("SELECT id, name, age FROM users ORDER BY id"),
        "u1|Ada L.|37\nu2|Bob|41\n"
    );
    // The row the database refused went to the dead-letter topic with the reason.
    let dlq = dev.ok(
        &[
            "consume",
            "users-dlq",
            "--from-beginning",
            "--timeout-ms",
            "700",
            "--print-headers",
        ],
        "",
    );
    assert!(dlq.contains("O'Brien") && dlq.contains("22P02"), "{dlq}");
    // Upserts and deletes later on.
    dev.ok(
        &["produce", "users", "--key-separator", "|"],
        "u2|{\"name\":\"Bob\",\"age\":42}\nu4|{\"name\":\"Eve\"}\n",
    );
    wait_until("the update", Duration::from_secs(30), || {
        pg.psql("SELECT id, name, age FROM users ORDER BY id")
            == "u1|Ada L.|37\nu2|Bob|42\nu4|Eve|\n"
    });
}

#[test]
fn postgres_sink_with_a_wrong_password_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let pg = Postgres::start(&root.join("postgres"), "right");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "t"], "");
    let file = root.join("pg.yaml");
    write(
        &file,
        &format!(
            "name: db\nkind: sink\nconnector: postgres-sink\ntopic: t\nconfig:\n  port: {port}\n  password: ${{secrets.PW}}\n  table: t\nsecrets:\n  PW: {{ env: RUNNEL_TEST_PW }}\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\n",
            port = pg.port
        ),
    );
    let mut worker =
        ConnectWorker::start_with_env(&dev, &[&file], &[("RUNNEL_TEST_PW", "wrong-pw")]);
    assert!(!worker.wait_exit(Duration::from_secs(30)));
    let err = worker.stderr();
    assert!(err.contains("password authentication failed"), "{err}");
    // The secret's value never shows.
    assert!(!err.contains("wrong-pw"), "{err}");
}

#[test]
fn a_directory_source_with_a_transform_chain_and_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "words"], "");
    dev.ok(&["topic", "create", "words-dlq"], "");
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).expect("mkdir");
    write(
        &logs.join("a.log"),
        "hello big world\ntrap\nbad\nsecond line\n",
    );
    write(&logs.join("b.log"), "from b\n");
    // The directory comes from a secrets file, to show `file:` with `key:`.
    write(
        &root.join("secrets.env"),
        &format!("OTHER=x\nLOGDIR={}\n", logs.display()),
    );
    let file = root.join("words.yaml");
    write(
        &file,
        &format!(
            "name: words\nkind: source\nconnector: file-source\ntopic: words\nconfig:\n  path: ${{secrets.LOGDIR}}\nsecrets:\n  LOGDIR: {{ file: secrets.env, key: LOGDIR }}\ncapabilities:\n  dirs: [{{ path: {logs}, mode: read }}]\ntransforms:\n  - wasm: {faulty}\n  - wasm: {split}\nerrors:\n  policy: dead-letter\n  dead-letter-topic: words-dlq\n",
            logs = logs.display(),
            faulty = components().join("faulty.wasm").display(),
            split = components().join("split_words.wasm").display(),
        ),
    );
    let _worker = ConnectWorker::start(&dev, &[&file]);
    let mut words = Vec::new();
    wait_until("the words", Duration::from_secs(30), || {
        words = consume_all(&dev, "words");
        words.len() >= 7
    });
    assert_eq!(
        words,
        ["hello", "big", "world", "second", "line", "from", "b"]
    );
    let dlq = dev.ok(
        &[
            "consume",
            "words-dlq",
            "--from-beginning",
            "--timeout-ms",
            "700",
            "--print-headers",
        ],
        "",
    );
    let dlq: Vec<&str> = dlq.lines().collect();
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(
        dlq[0].contains("transforms[0]") && dlq[0].ends_with("\ttrap"),
        "{dlq:?}"
    );
    assert!(
        dlq[1].contains("is bad") && dlq[1].ends_with("\tbad"),
        "{dlq:?}"
    );
    // A new file in the directory is picked up.
    write(&logs.join("c.log"), "new file\n");
    wait_until("the new file", Duration::from_secs(30), || {
        consume_all(&dev, "words").len() >= 9
    });
}

fn example_connectors() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| crate::support::build_components("examples/connectors"))
        .clone()
}

#[test]
fn a_connector_that_traps_or_loops_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let dev = Dev::start(&root.join("data"));
    for topic in ["numbers", "bad-input", "refused", "refused-dlq"] {
        dev.ok(&["topic", "create", topic], "");
    }
    let wasm = example_connectors();
    let counter = root.join("counter.yaml");
    write(
        &counter,
        &format!(
            "name: counter\nkind: source\nconnector: {}\ntopic: numbers\nconfig:\n  count: 1000\n",
            wasm.join("counter_source.wasm").display()
        ),
    );
    let faulty = root.join("faulty.yaml");
    write(
        &faulty,
        &format!(
            "name: faulty\nkind: sink\nconnector: {}\ntopic: bad-input\ncall-timeout-ms: 500\n",
            wasm.join("faulty_sink.wasm").display()
        ),
    );
    let refusing = root.join("refusing.yaml");
    write(
        &refusing,
        &format!(
            "name: refusing\nkind: sink\nconnector: {}\ntopic: refused\nerrors:\n  policy: dead-letter\n  dead-letter-topic: refused-dlq\n",
            wasm.join("faulty_sink.wasm").display()
        ),
    );
    for file in [&counter, &faulty, &refusing] {
        dev.ok(&["connector", "create", &file.display().to_string()], "");
    }
    // A connector that loops is stopped by its call timeout; the others keep going.
    dev.ok(&["produce", "bad-input"], "fine\nloop\n");
    wait_until("the faulty sink to fail", Duration::from_secs(30), || {
        dev.ok(&["connector", "status", "faulty"], "")
            .contains("State:      Failed")
    });
    let status = dev.ok(&["connector", "status", "faulty"], "");
    assert!(status.contains("call timeout of 500 ms"), "{status}");
    dev.ok(&["produce", "refused"], "a\nrefuse\nb\n");
    wait_until(
        "the refused record in the dead-letter topic",
        Duration::from_secs(30),
        || consume_all(&dev, "refused-dlq") == ["refuse"],
    );
    let status = dev.ok(&["connector", "status", "refusing"], "");
    assert!(
        status.contains("accepted \"a\"") && status.contains("accepted \"b\""),
        "{status}"
    );
    wait_until("a thousand numbers", Duration::from_secs(30), || {
        consume_all(&dev, "numbers").len() == 1000
    });
    // A trap: the message of the guest's panic, and a restart gives it another go.
    dev.ok(&["produce", "refused"], "trap\n");
    wait_until("the trap", Duration::from_secs(30), || {
        let status = dev.ok(&["connector", "status", "refusing"], "");
        status.contains("State:      Failed") && status.contains("asked to trap")
    });
    let list = dev.ok(&["connector", "list"], "");
    assert!(
        list.contains("counter") && list.contains("Running"),
        "{list}"
    );
    // A component of the wrong world is refused at create.
    let wrong = root.join("wrong.yaml");
    write(
        &wrong,
        &format!(
            "name: wrong\nkind: source\nconnector: {}\ntopic: numbers\n",
            wasm.join("faulty_sink.wasm").display()
        ),
    );
    let err = dev.fails(&["connector", "create", &wrong.display().to_string()], "");
    assert!(err.contains("source-connector"), "{err}");
}

#[test]
fn postgres_sink_waits_for_a_database_that_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let pg = Postgres::start(&root.join("postgres"), "pw");
    pg.psql("CREATE TABLE kv (key text PRIMARY KEY, value text)");
    let out = pg
        .command("pg_ctl")
        .args(["-D"])
        .arg(&pg.data)
        .args(["-w", "-m", "fast", "stop"])
        .output()
        .expect("pg_ctl runs");
    assert!(out.status.success());
    let dev = Dev::start(&root.join("data"));
    dev.ok(&["topic", "create", "kv"], "");
    let file = root.join("pg.yaml");
    write(
        &file,
        &format!(
            "name: kv-db\nkind: sink\nconnector: postgres-sink\ntopic: kv\nconfig:\n  port: {port}\n  password: ${{secrets.PW}}\n  table: kv\nsecrets:\n  PW: {{ env: RUNNEL_TEST_PW }}\ncapabilities:\n  network: [\"127.0.0.1:{port}\"]\nerrors:\n  retry: {{ initial-backoff-ms: 50, max-backoff-ms: 300 }}\n",
            port = pg.port
        ),
    );
    let mut worker = ConnectWorker::start_with_env(&dev, &[&file], &[("RUNNEL_TEST_PW", "pw")]);
    dev.ok(
        &["produce", "kv", "--key-separator", "="],
        "a=1\nb=2\na=3\n",
    );
    wait_until("the retrying state", Duration::from_secs(30), || {
        worker.stderr().contains("kv-db: Retrying")
    });
    let out = pg
        .command("pg_ctl")
        .args(["-D"])
        .arg(&pg.data)
        .args(["-w", "-l"])
        .arg(pg.data.join("log"))
        .arg("-o")
        .arg(format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            pg.port,
            pg.data.display()
        ))
        .arg("start")
        .output()
        .expect("pg_ctl runs");
    assert!(out.status.success());
    wait_until("the rows", Duration::from_secs(30), || {
        pg.psql("SELECT key, value FROM kv ORDER BY key") == "a|3\nb|2\n"
    });
    wait_until("the running state", Duration::from_secs(10), || {
        worker.stderr().ends_with("kv-db: Running\n")
    });
    worker.kill9();
}
