//! A seeded simulation of one replicated partition: three brokers' real logs (each in its
//! own directory), the controller's real state machine, and a random but reproducible
//! schedule of produces, follower fetches, ISR changes, crashes, pauses (a broker fenced
//! while its process lives on, as with SIGSTOP or a network cut), restarts and the
//! elections they cause. After every step it checks the replication invariants:
//!
//! - every write acknowledged with `acks=all` (the leader's high watermark passed it while
//!   the ISR held `min.insync.replicas`) is in the current leader's log at its offset;
//! - every replica holds the leader's records below the high watermark it knows of;
//! - a leader is always an ISR member (unclean election is off);
//! - once every broker is back, every replica converges on the leader's log and the ISR
//!   holds them all again (no replica stays stuck, as one did on an epoch without
//!   records).
//!
//! `SIMULATION_SEED=N cargo test -p runnel-broker simulation` replays one seed; the
//! failure message names the seed and the step.

use std::collections::BTreeMap;
use std::sync::Arc;

use runnel_broker_storage::LogConfig;
use runnel_controller::state::{ClusterMetadata, Command, NO_LEADER, PartitionRecord};

use crate::partition::{Partition, ReadBuffers, ReplicaRead};

const BROKERS: u32 = 3;
const MIN_INSYNC: usize = 2;
const STEPS: usize = 400;
const SEEDS: u64 = 60;

/// SplitMix64: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Sim {
    dir: tempfile::TempDir,
    metadata: ClusterMetadata,
    /// `None` while the broker is down.
    replicas: BTreeMap<u32, Option<Arc<Partition>>>,
    restarts: u32,
    /// Brokers whose process is paused: fenced, applying no metadata, serving nothing.
    paused: std::collections::BTreeSet<u32>,
    next_value: u64,
    /// Acknowledged writes: offset → value.
    acked: BTreeMap<i64, String>,
    /// Appended, waiting for replicas: (offset, value, leader epoch).
    pending: Vec<(i64, String, i32)>,
    buffers: ReadBuffers,
    runtime: tokio::runtime::Runtime,
    trace: Vec<String>,
}

fn batch(value: &str) -> Vec<u8> {
    let mut builder = runnel_batch::BatchBuilder::new(runnel_batch::BatchOptions::default());
    builder.push(&runnel_batch::Record {
        offset: 0,
        // A current time: a timestamp far in the past would roll a segment per batch.
        timestamp_ms: crate::now_ms(),
        key: None,
        value: Some(value.as_bytes().to_vec().into()),
        headers: Vec::new(),
    });
    builder.build().to_vec()
}

impl Sim {
    fn new() -> Sim {
        let mut metadata = ClusterMetadata::default();
        for id in 1..=BROKERS {
            metadata
                .apply(Command::RegisterBroker {
                    id,
                    address: format!("127.0.0.1:{id}"),
                    incarnation: "0".into(),
                })
                .expect("register");
        }
        metadata
            .apply(Command::CreateTopic {
                name: "t".into(),
                partitions: 1,
                replication_factor: BROKERS,
                configs: BTreeMap::new(),
                internal: false,
            })
            .expect("create");
        let mut sim = Sim {
            dir: tempfile::tempdir().expect("tempdir"),
            metadata,
            replicas: BTreeMap::new(),
            restarts: 0,
            paused: std::collections::BTreeSet::new(),
            next_value: 0,
            acked: BTreeMap::new(),
            pending: Vec::new(),
            buffers: ReadBuffers::new(1),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            trace: Vec::new(),
        };
        for id in 1..=BROKERS {
            let partition = sim.open(id);
            sim.replicas.insert(id, Some(partition));
        }
        sim.apply();
        sim
    }

    fn open(&self, id: u32) -> Arc<Partition> {
        let dir = self.dir.path().join(format!("broker-{id}"));
        Arc::new(Partition::open(&dir, "t", 0, LogConfig::default()).expect("open"))
    }

    fn record(&self) -> PartitionRecord {
        self.metadata.topics["t"].partitions[0].clone()
    }

    /// Every live broker applies the current metadata.
    fn apply(&self) {
        let record = self.record();
        for (id, partition) in &self.replicas {
            if let Some(partition) = partition
                && !self.paused.contains(id)
            {
                partition.set_replication(*id, &record);
            }
        }
    }

    /// The replica of a broker whose process runs and is not paused.
    fn live(&self, id: u32) -> Option<&Arc<Partition>> {
        if self.paused.contains(&id) {
            return None;
        }
        self.replicas.get(&id).and_then(Option::as_ref)
    }

    fn step(&mut self, rng: &mut Rng) {
        match rng.below(100) {
            0..=34 => self.produce(),
            35..=74 => {
                let follower = 1 + rng.below(u64::from(BROKERS)) as u32;
                self.fetch(follower);
            }
            75..=89 => self.maintain_isr(),
            90..=92 => {
                let victim = 1 + rng.below(u64::from(BROKERS)) as u32;
                self.crash(victim);
            }
            93..=94 => {
                // The leader is cut off, and the one elected after it before it writes.
                self.pause(self.record().leader);
                self.pause(self.record().leader);
            }
            95 => {
                let id = 1 + rng.below(u64::from(BROKERS)) as u32;
                self.resume(id);
            }
            _ => {
                let id = 1 + rng.below(u64::from(BROKERS)) as u32;
                self.restart(id);
            }
        }
    }

    /// A produce with acks=all: appended when the ISR is large enough, acknowledged once
    /// the high watermark covers it (checked after each later step, like a waiting
    /// producer).
    fn produce(&mut self) {
        let record = self.record();
        let Some(leader) = self.live(record.leader).cloned() else {
            return;
        };
        if leader.isr_len() < MIN_INSYNC {
            return;
        }
        let value = format!("v{}", self.next_value);
        self.next_value += 1;
        let Ok(appended) = leader.append(&batch(&value)) else {
            return;
        };
        let end = appended.end_offset;
        if self.runtime.block_on(leader.wait_durable(end)).is_err() {
            return;
        }
        self.trace.push(format!(
            "produce {value} at {} on {}",
            appended.base_offset, record.leader
        ));
        // Acknowledged only if replicated before leadership moves: try now and after
        // every fetch.
        self.pending
            .push((appended.base_offset, value, record.leader_epoch));
        self.settle();
    }

    /// Acknowledges the pending writes the high watermark now covers under the epoch
    /// they were written in, with the ISR at least `MIN_INSYNC`.
    fn settle(&mut self) {
        let record = self.record();
        let Some(leader) = self.live(record.leader).cloned() else {
            return;
        };
        let hw = leader.high_watermark();
        let isr = leader.isr_len();
        let mut still = Vec::new();
        for (offset, value, epoch) in std::mem::take(&mut self.pending) {
            if epoch != record.leader_epoch {
                continue; // a new term ended the wait: the producer got an error
            }
            if offset < hw && isr >= MIN_INSYNC {
                self.trace.push(format!("ack {value} at {offset}"));
                self.acked.insert(offset, value);
            } else {
                still.push((offset, value, epoch));
            }
        }
        self.pending = still;
    }

    /// One fetch of `follower` from the leader, applied as the replica fetcher does.
    fn fetch(&mut self, follower: u32) {
        let record = self.record();
        if follower == record.leader || !record.replicas.contains(&follower) {
            return;
        }
        let (Some(leader), Some(replica)) = (
            self.live(record.leader).cloned(),
            self.live(follower).cloned(),
        ) else {
            return;
        };
        let Ok((offset, epoch, hw)) = replica.fetch_position() else {
            return;
        };
        let answer = leader.replica_read(follower, offset, epoch, hw, 1 << 16, &self.buffers);
        match answer {
            Ok(ReplicaRead::Diverging { epoch, end_offset }) => {
                let end = replica
                    .truncate_to_divergence(epoch, end_offset)
                    .expect("truncate");
                self.trace.push(format!(
                    "{follower} truncates to {end} (epoch {epoch} ends at {end_offset})"
                ));
            }
            Ok(ReplicaRead::Records {
                records,
                high_watermark,
                ..
            }) => {
                replica
                    .append_replicated(&records, high_watermark)
                    .expect("append replicated");
                self.trace.push(format!(
                    "{follower} copies {} bytes from {offset}",
                    records.len()
                ));
            }
            Err(err) => {
                replica.truncate_replica(0, true).expect("reset");
                self.trace.push(format!("{follower} resets: {err}"));
            }
        }
        self.settle();
    }

    fn maintain_isr(&mut self) {
        let record = self.record();
        let Some(leader) = self.live(record.leader).cloned() else {
            return;
        };
        let Some(change) = leader.wanted_isr_change(crate::now_ms(), i64::MAX / 4) else {
            return;
        };
        let outcome = self.metadata.apply(Command::AlterIsr {
            topic: "t".into(),
            partition: 0,
            leader: record.leader,
            leader_epoch: change.leader_epoch,
            partition_epoch: change.partition_epoch,
            isr: change.isr.clone(),
        });
        match outcome {
            Ok(_) => {
                self.trace.push(format!("isr -> {:?}", change.isr));
                self.apply();
            }
            Err(err) => {
                leader.isr_change_failed(&change);
                self.trace.push(format!("isr change refused: {err}"));
            }
        }
        self.settle();
    }

    /// `kill -9`: the process is gone (what it wrote stays on disk), and the controller
    /// fences it, moving leadership to another ISR member.
    fn crash(&mut self, id: u32) {
        self.paused.remove(&id);
        let Some(slot) = self.replicas.get_mut(&id) else {
            return;
        };
        if slot.take().is_none() {
            return;
        }
        self.fence(id, "crash");
    }

    /// The controller fences `id` (its heartbeats stopped): the others apply what that
    /// moved, and waiting writes are settled.
    fn fence(&mut self, id: u32, why: &str) {
        self.metadata
            .apply(Command::FenceBroker { id })
            .expect("fence");
        self.trace
            .push(format!("{why} {id}; leader now {}", self.record().leader));
        self.apply();
        self.settle();
    }

    /// The broker's process stops answering (SIGSTOP, a network cut): the controller
    /// fences it, but it keeps its state and learns of nothing until it resumes.
    fn pause(&mut self, id: u32) {
        if self.live(id).is_none() {
            return;
        }
        self.paused.insert(id);
        self.fence(id, "pause");
    }

    /// A paused broker heartbeats again under the same incarnation and applies the
    /// metadata it missed.
    fn resume(&mut self, id: u32) {
        if !self.paused.remove(&id) {
            return;
        }
        self.metadata
            .apply(Command::UnfenceBroker { id })
            .expect("unfence");
        self.trace
            .push(format!("resume {id}; leader now {}", self.record().leader));
        self.apply();
    }

    /// A crashed broker starts again under a new incarnation and catches up.
    fn restart(&mut self, id: u32) {
        if self.paused.contains(&id) {
            return self.resume(id);
        }
        if self.live(id).is_some() {
            return;
        }
        self.restarts += 1;
        let partition = self.open(id);
        self.replicas.insert(id, Some(partition));
        self.metadata
            .apply(Command::RegisterBroker {
                id,
                address: format!("127.0.0.1:{id}"),
                incarnation: self.restarts.to_string(),
            })
            .expect("register");
        self.trace
            .push(format!("restart {id}; leader now {}", self.record().leader));
        self.apply();
    }

    /// The values of a replica's log from its start to its end.
    fn values(partition: &Partition) -> BTreeMap<i64, String> {
        let mut out = BTreeMap::new();
        let buffers = ReadBuffers::new(1);
        let end = partition.log_end_offset();
        let mut offset = partition.log_start_offset();
        while offset < end {
            let Ok(fetched) = partition.read_below(offset, 1 << 20, end, &buffers) else {
                break;
            };
            if fetched.records.is_empty() {
                break;
            }
            for entry in runnel_batch::batches(&fetched.records) {
                let (_, raw) = entry.expect("batch");
                for r in runnel_batch::decode_records(raw).expect("records") {
                    let value = String::from_utf8_lossy(&r.value.unwrap_or_default()).to_string();
                    out.insert(r.offset, value);
                }
            }
            offset = fetched.next_offset;
        }
        out
    }

    fn check(&self) -> Result<(), String> {
        let record = self.record();
        if record.leader != NO_LEADER && !record.isr.contains(&record.leader) {
            return Err(format!(
                "leader {} is not in the ISR {:?}",
                record.leader, record.isr
            ));
        }
        let Some(leader) = self.live(record.leader) else {
            return Ok(());
        };
        let leader_values = Self::values(leader);
        for (offset, value) in &self.acked {
            if leader_values.get(offset) != Some(value) {
                return Err(format!(
                    "acknowledged {value} at {offset} is {:?} on leader {}",
                    leader_values.get(offset),
                    record.leader
                ));
            }
        }
        let hw = leader.high_watermark();
        for (id, partition) in &self.replicas {
            let Some(partition) = partition else { continue };
            if *id == record.leader {
                continue;
            }
            let known = partition.high_watermark().min(hw);
            let values = Self::values(partition);
            for (offset, value) in values.range(..known) {
                if leader_values.get(offset) != Some(value) {
                    return Err(format!(
                        "replica {id} holds {value} at {offset} below the high watermark {known}; the leader {} holds {:?}",
                        record.leader,
                        leader_values.get(offset)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs one seed; returns how many writes were acknowledged.
fn run(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let mut sim = Sim::new();
    for step in 0..STEPS {
        sim.step(&mut rng);
        if let Err(problem) = sim.check() {
            let tail: Vec<&String> = sim.trace.iter().rev().take(25).rev().collect();
            panic!(
                "seed {seed}, step {step}: {problem}\nlast steps:\n{}\nreplay with SIMULATION_SEED={seed}",
                tail.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    // Liveness: with every broker back, the replicas converge on the leader's log and
    // the ISR grows back to all of them.
    for id in 1..=BROKERS {
        sim.restart(id);
    }
    for _ in 0..50 {
        for id in 1..=BROKERS {
            sim.fetch(id);
        }
        sim.maintain_isr();
    }
    let record = sim.record();
    let leader = sim.live(record.leader).unwrap_or_else(|| {
        panic!("seed {seed}: no leader after every broker returned: {record:?}")
    });
    let expected = Sim::values(leader);
    for id in 1..=BROKERS {
        let replica = sim.live(id).expect("live");
        let values = Sim::values(replica);
        if values != expected {
            let first = expected
                .iter()
                .find(|(offset, value)| values.get(offset) != Some(value))
                .map(|(offset, _)| *offset);
            let tail: Vec<&String> = sim.trace.iter().rev().take(12).rev().collect();
            panic!(
                "{tail:#?}\nseed {seed}: replica {id} did not converge on leader {}'s log ({} records, the leader {}; first difference at {first:?}); replay with SIMULATION_SEED={seed}",
                record.leader,
                values.len(),
                expected.len()
            );
        }
    }
    assert_eq!(
        record.isr.len(),
        BROKERS as usize,
        "seed {seed}: the ISR did not grow back: {record:?}; replay with SIMULATION_SEED={seed}"
    );
    if let Err(problem) = sim.check() {
        panic!("seed {seed}, after healing: {problem}; replay with SIMULATION_SEED={seed}");
    }
    sim.acked.len()
}

#[test]
fn replication_keeps_every_acknowledged_write_under_random_faults() {
    let acknowledged: usize = match std::env::var("SIMULATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => run(seed),
        None => (0..SEEDS).map(run).sum(),
    };
    assert!(acknowledged > 0, "the schedules acknowledged nothing");
}
