//! TLS: a broker that requires it refuses plaintext and clients that do not trust its
//! CA, with messages that say what to give; it takes a rotated certificate without a
//! restart; and a three-broker cluster with mutual TLS replicates, elects and serves
//! clients that present certificates, and refuses one that does not; the example clients
//! in Python and Node.js connect with mutual TLS too.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::cluster::{Cluster, partition_rows};
use crate::support::{Dev, runnel_at, wait_until};

/// A CA and certificates it signed, written as PEM files under one directory.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    pub(crate) fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write");
        Pki {
            dir: dir.to_path_buf(),
            ca: Issuer::new(params, key),
        }
    }

    /// Writes `NAME.pem` and `NAME.key`: a certificate for localhost and 127.0.0.1.
    pub(crate) fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        let (pem, pkey) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        // The key first: a broker reloading between the two writes sees a mismatch
        // and keeps its previous pair.
        std::fs::write(&pkey, key.serialize_pem()).expect("write");
        std::fs::write(&pem, cert.pem()).expect("write");
        (pem, pkey)
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `runnel --brokers addr [--tls-* ...] args`.
fn run(addr: &str, tls: &[&str], args: &[&str]) -> Output {
    let all: Vec<&str> = tls.iter().chain(args).copied().collect();
    runnel_at(addr, &all, "")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// A broker serving TLS with `cert` and `key`, trusting `ca` (and requiring client
/// certificates it signed with `client_auth`); killed when dropped.
fn tls_broker(dir: &Path, cert: &Path, key: &Path, ca: &Path, client_auth: bool) -> Dev {
    let config = dir.join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\nclient_auth = {client_auth}\n",
            path(&dir.join("data")),
            path(cert),
            path(key),
            path(ca)
        ),
    )
    .expect("write");
    Dev::spawn(&["broker", "start", "--config", &path(&config)])
}

#[test]
fn tls_refuses_plaintext_and_unknown_cas_and_rotates_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "first");
    let (cert, key) = pki.issue("broker");
    let ca = dir.path().join("first-ca.pem");
    let broker = tls_broker(dir.path(), &cert, &key, &ca, false);
    let addr = broker.addr.clone();
    let tls = ["--tls-ca", &path(&ca)];
    let tls: Vec<&str> = tls.to_vec();

    let created = run(&addr, &tls, &["topic", "create", "secure"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let produced = runnel_at(
        &addr,
        &[&tls[..], &["produce", "secure"]].concat(),
        "one\ntwo\n",
    );
    assert!(produced.status.success(), "{}", stderr(&produced));
    let consumed = run(
        &addr,
        &tls,
        &[
            "consume",
            "secure",
            "--from-beginning",
            "--max-messages",
            "2",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&consumed.stdout), "one\ntwo\n");

    // Plaintext is refused, and the message says what to give.
    let plain = run(&addr, &[], &["topic", "list"]);
    assert!(!plain.status.success());
    assert!(
        stderr(&plain).contains("give --tls-ca"),
        "{}",
        stderr(&plain)
    );
    // A CA that did not sign the broker's certificate is refused, and said so.
    let other = Pki::new(dir.path(), "other");
    drop(other);
    let wrong = run(
        &addr,
        &["--tls-ca", &path(&dir.path().join("other-ca.pem"))],
        &["topic", "list"],
    );
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("not signed by the --tls-ca"),
        "{}",
        stderr(&wrong)
    );
    // A file that is not PEM is refused before any connection.
    let bad = run(
        &addr,
        &["--tls-ca", &path(&dir.path().join("runnel.toml"))],
        &["topic", "list"],
    );
    assert!(
        stderr(&bad).contains("holds no PEM CERTIFICATE"),
        "{}",
        stderr(&bad)
    );

    // Rotation: the broker's files are replaced by a certificate of another CA; new
    // connections get it without a restart.
    let next = Pki::new(dir.path(), "second");
    let (next_cert, next_key) = next.issue("rotated");
    std::fs::copy(&next_key, &key).expect("copy");
    std::fs::copy(&next_cert, &cert).expect("copy");
    let second = [
        "--tls-ca".to_string(),
        path(&dir.path().join("second-ca.pem")),
    ];
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    wait_until(
        "the broker to present the rotated certificate",
        Duration::from_secs(20),
        || run(&addr, &second, &["topic", "list"]).status.success(),
    );
    let old = run(&addr, &tls, &["topic", "list"]);
    assert!(!old.status.success(), "the old CA still works");
}

#[test]
fn a_cluster_replicates_and_fails_over_with_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster");
    let (cert, key) = pki.issue("broker");
    let (client_cert, client_key) = pki.issue("client");
    let ca = dir.path().join("cluster-ca.pem");
    let config = dir.path().join("tls.toml");
    // data_dir is given to each node by flag.
    std::fs::write(
        &config,
        format!(
            "data_dir = \"unused\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\nclient_auth = true\n",
            path(&cert),
            path(&key),
            path(&ca)
        ),
    )
    .expect("write");
    let mut cluster = Cluster::start_with(dir.path(), 3, &["--config", &path(&config)]);
    let tls = [
        "--tls-ca".to_string(),
        path(&ca),
        "--tls-cert".to_string(),
        path(&client_cert),
        "--tls-key".to_string(),
        path(&client_key),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let addrs: Vec<String> = (1..=3).map(|id| cluster.node(id).addr.clone()).collect();
    let addr = |id: u32| addrs[id as usize - 1].clone();
    let ok = |id: u32, args: &[&str], stdin: &str| {
        let output = runnel_at(&addr(id), &[&tls[..], args].concat(), stdin);
        assert!(
            output.status.success(),
            "runnel {args:?}: {}",
            stderr(&output)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let rows = |id: u32| partition_rows(&ok(id, &["topic", "describe", "ledger"], ""));
    wait_until("the brokers to register", Duration::from_secs(30), || {
        let output = runnel_at(&addr(1), &[&tls[..], &["cluster", "info"]].concat(), "");
        String::from_utf8_lossy(&output.stdout)
            .matches("(alive)")
            .count()
            == 3
    });
    ok(
        1,
        &[
            "topic",
            "create",
            "ledger",
            "--replication-factor",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
        "",
    );
    let first: String = (0..100).map(|i| format!("entry-{i}\n")).collect();
    ok(2, &["produce", "ledger", "--acks", "all"], &first);
    // Every follower caught up over mutual TLS.
    wait_until(
        "all three replicas in sync",
        Duration::from_secs(30),
        || {
            rows(3)
                .first()
                .is_some_and(|r| r.isr == [1, 2, 3] && r.high_watermark == 100)
        },
    );
    // A client without a certificate is refused, and told to give one.
    let anonymous = runnel_at(&addr(1), &["--tls-ca", &path(&ca), "topic", "list"], "");
    assert!(!anonymous.status.success());
    assert!(
        stderr(&anonymous).contains("--tls-cert"),
        "{}",
        stderr(&anonymous)
    );
    // The leader dies; another in-sync replica takes over and serves over TLS.
    let leader = rows(1).first().map(|r| r.leader).expect("a leader");
    cluster.kill9(leader);
    let survivor = (1..=3).find(|id| *id != leader).expect("a survivor");
    let second: String = (100..150).map(|i| format!("entry-{i}\n")).collect();
    wait_until(
        "a new leader to take writes",
        Duration::from_secs(30),
        || {
            runnel_at(
                &addr(survivor),
                &[&tls[..], &["produce", "ledger", "--acks", "all"]].concat(),
                &second,
            )
            .status
            .success()
        },
    );
    let all = ok(
        survivor,
        &[
            "consume",
            "ledger",
            "--from-beginning",
            "--timeout-ms",
            "2000",
        ],
        "",
    );
    for i in 0..150 {
        assert!(
            all.contains(&format!("entry-{i}\n")),
            "entry-{i} is missing"
        );
    }
    cluster.restart(leader);
}

#[test]
fn the_example_clients_connect_with_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "examples");
    let (cert, key) = pki.issue("broker");
    let (client_cert, client_key) = pki.issue("client");
    let ca = dir.path().join("examples-ca.pem");
    let broker = tls_broker(dir.path(), &cert, &key, &ca, true);
    let addr = broker.addr.clone();
    let tls = [
        "--tls-ca".to_string(),
        path(&ca),
        "--tls-cert".to_string(),
        path(&client_cert),
        "--tls-key".to_string(),
        path(&client_key),
    ];
    for (example, topic) in [
        (crate::clients::Example::python(), "from-python"),
        (crate::clients::Example::node(), "from-node"),
    ] {
        let with_tls = |args: &[&str]| -> Vec<String> {
            tls.iter()
                .cloned()
                .chain(args.iter().map(|a| (*a).to_string()))
                .collect()
        };
        let args = with_tls(&["create-topic", topic]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        example.ok(&addr, &args, "");
        let args = with_tls(&["produce", topic]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        example.ok(&addr, &args, "a\nb\n");
        let read = run(
            &addr,
            &tls.iter().map(String::as_str).collect::<Vec<_>>(),
            &["consume", topic, "--from-beginning", "--max-messages", "2"],
        );
        assert_eq!(String::from_utf8_lossy(&read.stdout), "a\nb\n", "{topic}");
        // Without the client certificate the broker refuses it.
        let refused = example.run(&addr, &["--tls-ca", &path(&ca), "create-topic", "nope"], "");
        assert!(
            !refused.status.success(),
            "{topic}: accepted without a certificate"
        );
    }
}
