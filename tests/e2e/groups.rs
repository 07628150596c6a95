//! Consumer groups end to end: real consumer processes sharing partitions, failover,
//! independent groups, offsets across restarts, lag, resets and fencing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Dev, wait_until};

/// A `runnel consume --group` process printing `Partition:P\tOffset:O|value` to a file.
pub(crate) struct Member {
    child: Child,
    out: std::path::PathBuf,
}

impl Member {
    fn start(addr: &str, topic: &str, group: &str, dir: &Path, name: &str) -> Member {
        Self::start_with_session(addr, topic, group, dir, name, 2000)
    }

    pub(crate) fn start_with_session(
        addr: &str,
        topic: &str,
        group: &str,
        dir: &Path,
        name: &str,
        session_timeout_ms: u32,
    ) -> Member {
        let out = dir.join(format!("{name}.out"));
        let file = std::fs::File::create(&out).expect("output file");
        let child = Command::new(support::RUNNEL)
            .args([
                "--brokers",
                addr,
                "consume",
                topic,
                "--group",
                group,
                "--from-beginning",
            ])
            .args([
                "--print-offset",
                "--key-separator",
                "|",
                "--session-timeout-ms",
                &session_timeout_ms.to_string(),
            ])
            .env("RUNNEL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("consumer starts");
        Member { child, out }
    }

    /// (partition, offset) of every record printed so far.
    pub(crate) fn seen(&self) -> Vec<(u32, i64)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (po, _) = line.split_once('|')?;
                let (p, o) = po.strip_prefix("Partition:")?.split_once("\tOffset:")?;
                Some((p.parse().ok()?, o.parse().ok()?))
            })
            .collect()
    }

    pub(crate) fn interrupt(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("consumer did not stop on SIGINT");
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per partition of a group: (consumer id or "-", committed offset, log end offset, lag),
/// -1 for "-".
pub(crate) type Rows = BTreeMap<(String, u32), (String, i64, i64, i64)>;

/// Parses `group describe`; a group that does not exist yet has no rows.
fn describe(dev: &Dev, group: &str) -> (String, Rows) {
    let output = dev.run(&["group", "describe", group], "");
    let out = String::from_utf8_lossy(&output.stdout).to_string();
    let rows = group_rows(&out, group);
    (out, rows)
}

/// The partition rows of `group describe` output.
pub(crate) fn group_rows(out: &str, group: &str) -> Rows {
    let mut rows = BTreeMap::new();
    for line in out.lines().skip_while(|l| !l.starts_with("GROUP ")).skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || f[0] != group {
            break;
        }
        let parse = |s: &str| s.parse::<i64>().unwrap_or(-1);
        rows.insert(
            (f[1].to_string(), f[2].parse().expect("partition")),
            (f[6].to_string(), parse(f[3]), parse(f[4]), parse(f[5])),
        );
    }
    rows
}

pub(crate) fn owners(rows: &Rows) -> BTreeMap<String, usize> {
    let mut owners = BTreeMap::new();
    for (owner, ..) in rows.values() {
        if owner != "-" {
            *owners.entry(owner.clone()).or_default() += 1;
        }
    }
    owners
}

fn produce_keyed(dev: &Dev, topic: &str, from: usize, count: usize) {
    let input: String = (from..from + count)
        .map(|i| format!("key-{i}:value-{i}\n"))
        .collect();
    dev.ok(&["produce", topic, "--key-separator", ":"], &input);
}

fn all_offsets(dev: &Dev, topic: &str) -> BTreeSet<(u32, i64)> {
    let out = dev.ok(&["topic", "describe", topic], "");
    let mut all = BTreeSet::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 9
            && let (Ok(p), Ok(start), Ok(end)) = (
                f[0].parse::<u32>(),
                f[5].parse::<i64>(),
                f[6].parse::<i64>(),
            )
        {
            for o in start..end {
                all.insert((p, o));
            }
        }
    }
    all
}

#[test]
fn three_members_share_six_partitions_and_survive_a_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&dir.path().join("data"));
    dev.ok(&["topic", "create", "work", "--partitions", "6"], "");
    produce_keyed(&dev, "work", 0, 300);
    let mut members: Vec<Member> = ["a", "b", "c"]
        .iter()
        .map(|n| Member::start(&dev.addr, "work", "crew", dir.path(), n))
        .collect();
    wait_until(
        "each of 3 members to own 2 partitions",
        Duration::from_secs(20),
        || {
            let (_, rows) = describe(&dev, "crew");
            let owners = owners(&rows);
            owners.len() == 3 && owners.values().all(|n| *n == 2)
        },
    );
    // Kill one member hard; the other two take over its partitions after its session.
    let mut victim = members.remove(0);
    victim.kill9();
    let killed_at = Instant::now();
    produce_keyed(&dev, "work", 300, 300);
    wait_until(
        "2 members to cover all 6 partitions",
        Duration::from_secs(20),
        || {
            let (_, rows) = describe(&dev, "crew");
            let owners = owners(&rows);
            owners.len() == 2 && owners.values().sum::<usize>() == 6
        },
    );
    eprintln!(
        "partitions reassigned {:?} after kill -9 (session timeout 2 s)",
        killed_at.elapsed()
    );
    let expected = all_offsets(&dev, "work");
    assert_eq!(expected.len(), 600);
    wait_until(
        "every record to be delivered",
        Duration::from_secs(20),
        || {
            let seen: BTreeSet<(u32, i64)> = members
                .iter()
                .chain([&victim])
                .flat_map(|m| m.seen())
                .collect();
            seen.is_superset(&expected)
        },
    );
    for member in &mut members {
        member.interrupt();
    }
    // Nothing after a committed offset was skipped: the union has no gap, and committed
    // offsets reached the end of every partition.
    let (out, rows) = describe(&dev, "crew");
    assert_eq!(rows.len(), 6, "{out}");
    assert!(rows.values().all(|(_, _, _, lag)| *lag == 0), "{out}");
}

#[test]
fn groups_are_independent_and_offsets_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let dev = Dev::start(&data);
    dev.ok(&["topic", "create", "feed", "--partitions", "3"], "");
    produce_keyed(&dev, "feed", 0, 90);
    let read = |dev: &Dev, group: &str, max: &str| {
        dev.ok(
            &[
                "consume",
                "feed",
                "--group",
                group,
                "--from-beginning",
                "--max-messages",
                max,
                "--timeout-ms",
                "5000",
            ],
            "",
        )
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    // Two groups each get everything.
    assert_eq!(read(&dev, "one", "90").len(), 90);
    assert_eq!(read(&dev, "two", "90").len(), 90);
    // A third group stops part way; describe shows the lag while more arrives.
    let first = read(&dev, "three", "30");
    assert_eq!(first.len(), 30);
    produce_keyed(&dev, "feed", 90, 30);
    let (out, rows) = describe(&dev, "three");
    let committed: i64 = rows.values().map(|(_, c, ..)| (*c).max(0)).sum();
    assert_eq!(committed, 30, "{out}");
    for (_, current, end, lag) in rows.values() {
        // LAG = LOG-END-OFFSET - CURRENT-OFFSET, and "-" where nothing is committed.
        assert_eq!(
            *lag,
            if *current >= 0 { end - current } else { -1 },
            "{out}"
        );
    }
    assert!(
        rows.values()
            .any(|(_, current, end, _)| *current >= 0 && end > current),
        "{out}"
    );
    dev.stop();
    // After a restart the group resumes exactly after what it printed.
    let dev = Dev::start(&data);
    let rest = read(&dev, "three", "90");
    assert_eq!(rest.len(), 90);
    let mut all: Vec<String> = first.into_iter().chain(rest).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 120, "no record twice, none missing");
    let listed = dev.ok(&["group", "list"], "");
    for group in ["one", "two", "three"] {
        assert!(listed.lines().any(|l| l.starts_with(group)), "{listed}");
    }
}

#[test]
fn resets_deletes_and_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&dir.path().join("data"));
    dev.ok(&["topic", "create", "log", "--partitions", "2"], "");
    produce_keyed(&dev, "log", 0, 40);
    dev.ok(
        &[
            "consume",
            "log",
            "--group",
            "g",
            "--from-beginning",
            "--max-messages",
            "40",
            "--timeout-ms",
            "5000",
        ],
        "",
    );
    let err = dev.fails(&["group", "describe", "nope"], "");
    assert!(err.contains("unknown group \"nope\""), "{err}");
    let err = dev.fails(
        &[
            "group",
            "reset-offsets",
            "nope",
            "--topic",
            "log",
            "--to-earliest",
        ],
        "",
    );
    assert!(err.contains("unknown group \"nope\""), "{err}");
    // Dry run changes nothing.
    let out = dev.ok(
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "log",
            "--to-earliest",
            "--dry-run",
        ],
        "",
    );
    assert!(out.contains("dry run"), "{out}");
    let (_, rows) = describe(&dev, "g");
    assert_eq!(rows.values().map(|(_, c, ..)| *c).sum::<i64>(), 40);
    dev.ok(
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "log",
            "--shift-by",
            "-5",
        ],
        "",
    );
    let (_, rows) = describe(&dev, "g");
    assert_eq!(rows.values().map(|(_, c, ..)| *c).sum::<i64>(), 30);
    let again = dev.ok(
        &[
            "consume",
            "log",
            "--group",
            "g",
            "--max-messages",
            "10",
            "--timeout-ms",
            "5000",
        ],
        "",
    );
    assert_eq!(again.lines().count(), 10);
    // A live member blocks resets and deletes, and the error names it.
    let mut live = Member::start(&dev.addr, "log", "g", dir.path(), "live");
    wait_until("the member to join", Duration::from_secs(10), || {
        owners(&describe(&dev, "g").1).len() == 1
    });
    let member = owners(&describe(&dev, "g").1)
        .into_keys()
        .next()
        .expect("member");
    let err = dev.fails(
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "log",
            "--to-latest",
        ],
        "",
    );
    assert!(
        err.contains("has live members") && err.contains(&member),
        "{err}"
    );
    let err = dev.fails(&["group", "delete", "g"], "");
    assert!(err.contains("has live members"), "{err}");
    live.interrupt();
    // A graceful leave frees the group at once.
    wait_until("the group to empty", Duration::from_secs(5), || {
        describe(&dev, "g").0.contains("is Empty")
    });
    dev.ok(&["group", "delete", "g"], "");
    assert!(
        dev.fails(&["group", "describe", "g"], "")
            .contains("unknown group")
    );
    let err = dev.fails(&["consume", "missing", "--group", "g"], "");
    assert!(err.contains("unknown topic \"missing\""), "{err}");
}

#[test]
fn a_member_that_lost_its_partitions_cannot_commit_over_the_new_owner() {
    use runnel_client::v1::{self, groups_client::GroupsClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&dir.path().join("data"));
    dev.ok(&["topic", "create", "t", "--partitions", "2"], "");
    let rt = crate::runtime();
    let addr = format!("http://{}", dev.addr);
    rt.block_on(async move {
        let mut groups = GroupsClient::connect(addr).await.expect("connect");
        let join =
            |member_id: String, epoch: i32, owned: Vec<v1::TopicPartitions>| v1::HeartbeatRequest {
                group_id: "fence".into(),
                member_id,
                member_epoch: epoch,
                client_id: "test".into(),
                topics: vec!["t".into()],
                session_timeout_ms: 1000,
                owned,
                ..Default::default()
            };
        let old = groups
            .heartbeat(join(String::new(), 0, vec![]))
            .await
            .expect("join")
            .into_inner();
        assert_eq!(old.assignment[0].partitions.len(), 2);
        // The old member goes silent; a new member takes everything once it expires.
        let new = groups
            .heartbeat(join(String::new(), 0, vec![]))
            .await
            .expect("join")
            .into_inner();
        let mut new_epoch = new.member_epoch;
        let mut owned = vec![];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let response = groups
                .heartbeat(join(new.member_id.clone(), new_epoch, owned.clone()))
                .await
                .expect("heartbeat")
                .into_inner();
            new_epoch = response.member_epoch;
            owned = response.assignment.clone();
            if owned.first().is_some_and(|tp| tp.partitions.len() == 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new member never got the partitions"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let commit = |member_id: String, epoch: i32| v1::CommitOffsetsRequest {
            group_id: "fence".into(),
            member_id,
            member_epoch: epoch,
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                metadata: String::new(),
            }],
            ..Default::default()
        };
        let err = groups
            .commit_offsets(commit(old.member_id.clone(), old.member_epoch))
            .await
            .expect_err("fenced");
        assert!(
            err.message().contains("is not in group \"fence\""),
            "{}",
            err.message()
        );
        let code = err
            .metadata()
            .get("runnel-error-code")
            .and_then(|v| v.to_str().ok());
        assert_eq!(code, Some("UNKNOWN_MEMBER_ID"));
        // Its stale heartbeat is refused too, so it must rejoin as a new member.
        let stale = groups
            .heartbeat(join(
                old.member_id.clone(),
                old.member_epoch,
                old.assignment.clone(),
            ))
            .await
            .expect_err("stale member");
        assert!(stale.message().contains("rejoin"), "{}", stale.message());
        groups
            .commit_offsets(commit(new.member_id.clone(), new_epoch))
            .await
            .expect("owner commits");
    });
}

#[test]
fn added_partitions_join_the_assignment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&dir.path().join("data"));
    dev.ok(&["topic", "create", "grow", "--partitions", "2"], "");
    let _member = Member::start(&dev.addr, "grow", "growers", dir.path(), "m");
    wait_until("2 partitions owned", Duration::from_secs(10), || {
        owners(&describe(&dev, "growers").1).values().sum::<usize>() == 2
    });
    dev.ok(&["topic", "add-partitions", "grow", "--total", "4"], "");
    wait_until("4 partitions owned", Duration::from_secs(10), || {
        owners(&describe(&dev, "growers").1).values().sum::<usize>() == 4
    });
}
