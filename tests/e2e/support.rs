//! Starting real `runnel` processes and running CLI commands against them.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RUNNEL: &str = env!("CARGO_BIN_EXE_runnel");

/// A `runnel dev` process on a free loopback port, killed when dropped.
pub struct Dev {
    child: Child,
    pub addr: String,
}

impl Dev {
    pub fn start(data_dir: &Path) -> Dev {
        Self::start_on(data_dir, "127.0.0.1:0")
    }

    /// Runs `runnel ARGS` (a `dev` or `broker start` with flags of the test's own),
    /// waiting until it says where it listens.
    pub fn spawn(args: &[&str]) -> Dev {
        let (child, addr) = spawn_listening(args);
        Dev { child, addr }
    }

    /// Starts with `env` added to the server's environment (fault injection).
    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Dev {
        let data_dir = data_dir.to_string_lossy();
        let args = [
            "dev",
            "--data-dir",
            &data_dir,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ];
        let (child, stdout) = spawn_server_with(None, &args, env);
        Dev {
            child,
            addr: await_listening(stdout),
        }
    }

    /// Starts on `listen`, waiting until the process says where it listens.
    pub fn start_on(data_dir: &Path, listen: &str) -> Dev {
        let data_dir = data_dir.to_string_lossy();
        let (child, addr) = spawn_listening(&[
            "dev",
            "--data-dir",
            &data_dir,
            "--listen",
            listen,
            "--metrics-listen",
            "off",
        ]);
        Dev { child, addr }
    }

    /// Runs `runnel --brokers ADDR args...` with `stdin` as input.
    pub fn run(&self, args: &[&str], stdin: &str) -> Output {
        runnel_at(&self.addr, args, stdin)
    }

    /// Like [`Dev::run`], but fails the test unless the command succeeds; returns stdout.
    pub fn ok(&self, args: &[&str], stdin: &str) -> String {
        let output = self.run(args, stdin);
        assert!(
            output.status.success(),
            "runnel {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str], stdin: &str) -> String {
        let output = self.run(args, stdin);
        assert!(
            !output.status.success(),
            "runnel {args:?} should have failed but printed {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).expect("UTF-8 output")
    }

    /// Stops with SIGTERM (a clean shutdown) and waits.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_exit(&mut self.child, Duration::from_secs(20));
    }

    /// Kills with SIGKILL: a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("runnel did not stop within {timeout:?}");
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 100 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks `holds` every 100 ms for `duration`; fails the test the first time it does not
/// hold. For what must not happen, where there is no event to wait for.
pub fn holds_for(what: &str, duration: Duration, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        assert!(holds(), "{what}: it stopped holding");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a `runnel` server command and returns it with the address it prints.
pub fn spawn_listening(args: &[&str]) -> (Child, String) {
    let (child, stdout) = spawn_server(args);
    (child, await_listening(stdout))
}

/// Starts a `runnel` server command without waiting for it: voters of one quorum must
/// all be started before any of them serves. Servers log at `warn` unless
/// `TEST_BROKER_LOG` gives another filter (`TEST_BROKER_LOG=info,openraft=warn`).
pub fn spawn_server(args: &[&str]) -> (Child, ChildStdout) {
    spawn_server_in(None, args)
}

/// Like [`spawn_server`], inside network namespace `netns` when one is given.
pub fn spawn_server_in(netns: Option<&str>, args: &[&str]) -> (Child, ChildStdout) {
    spawn_server_with(netns, args, &[])
}

/// Like [`spawn_server_in`], with `env` added to the server's environment.
pub fn spawn_server_with(
    netns: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, ChildStdout) {
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns, RUNNEL]);
            command
        }
        None => Command::new(RUNNEL),
    };
    let mut child = command
        .args(args)
        .envs(env.iter().copied())
        .env(
            "RUNNEL_LOG",
            std::env::var("TEST_BROKER_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runnel starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    (child, stdout)
}

/// Waits for the line a server prints once it serves and returns the address in it;
/// then keeps draining its stdout so the process never blocks on a full pipe.
pub fn await_listening(stdout: ChildStdout) -> String {
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .expect("the server prints its address")
        .expect("readable stdout");
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// Runs `runnel args...` (no stdin) that must exit by itself within `timeout`; fails the
/// test if it is still running then.
pub fn runnel_exits(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(RUNNEL)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runnel runs");
    wait_exit(&mut child, timeout);
    child.wait_with_output().expect("runnel finishes")
}

pub fn runnel_at(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(RUNNEL)
        .args(["--brokers", addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runnel runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    let data = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let output = child.wait_with_output().expect("runnel finishes");
    let _ = writer.join();
    output
}

/// Builds a workspace of Wasm components (`examples/transforms`, say) for
/// `wasm32-wasip2` and returns the directory of the `.wasm` files.
pub fn build_components(workspace: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // <target>/debug/deps/e2e-HASH; every example workspace shares one target directory.
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target directory")
        .join("wasm-examples");
    let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(workspace)
        .join("Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        // A workspace's .cargo/config.toml (wasm SIMD) applies from its directory.
        .current_dir(manifest.parent().expect("workspace directory"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {workspace} failed");
    target.join("wasm32-wasip2/release")
}
