//! A partition hosted by this broker: its log, high watermark and durability.
//!
//! Appends are applied in call order under the log's write lock and take microseconds; the
//! fsync that makes them durable runs outside the lock. With the default flush policy
//! (`FlushPolicy::EveryAppend`) every waiting producer's batches are covered by one fsync
//! (group commit), and the high watermark only advances over flushed data, so a consumer
//! never sees a record that a power loss could take back. With an interval policy the high
//! watermark is the log end offset, as in Kafka.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use runnel_batch::ControlType;
use runnel_broker_storage::{
    AbortedTxn, FlushPolicy, Log, LogConfig, LogSnapshot, OpenTxn, StorageError,
};
use runnel_controller::state::PartitionRecord;
use tokio::sync::watch;

use crate::error::BrokerError;
use crate::now_ms;

/// What an append did.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub base_offset: i64,
    pub log_append_time_ms: Option<i64>,
    pub log_start_offset: i64,
    /// Offset the high watermark must reach before the append counts as durable.
    pub end_offset: i64,
    /// An interval flush policy wants the log synced: call [`Partition::flush_if_due`]
    /// off the async runtime.
    pub flush_due: bool,
}

/// Buffers that log reads land in, reused from read to read: each read takes the next
/// free stretch of a buffer and hands it out as `Bytes`, and a buffer whose reads have
/// all been dropped is used again from its start. Memory the process already has is
/// cheaper than fresh pages, which must be faulted in and zeroed (on some machines at a
/// fraction of memcpy speed). Reads move on to the next buffer when one is full, so that
/// the reads still held (by fetch streams running ahead, by a transform's batch) are in
/// the latest buffers and the earlier ones are free again by the time reads come back.
#[derive(Debug)]
pub struct ReadBuffers {
    buffers: Vec<Mutex<BytesMut>>,
}

/// Size of each read buffer.
const READ_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Room a buffer must have left to take a read without growing.
const READ_ROOM_BYTES: usize = 4 * 1024 * 1024;
/// Read buffers a broker keeps: room for the reads its fetch streams hold at once.
pub const READ_BUFFERS: usize = 8;

impl ReadBuffers {
    /// `count` buffers, so that that many reads run at once without new memory.
    pub fn new(count: usize) -> Self {
        ReadBuffers {
            buffers: (0..count.max(1))
                .map(|_| Mutex::new(BytesMut::new()))
                .collect(),
        }
    }

    /// Runs `read` on a free buffer and returns what it appended. A buffer with room, or
    /// one whose earlier reads are all gone, is taken before one that would need new
    /// memory; when every buffer is busy the read gets one of its own. Room means room
    /// for a read near the log end, which is small: a larger read (a consumer catching up)
    /// grows the buffer as it goes.
    fn read<E>(
        &self,
        max_bytes: usize,
        read: impl FnOnce(&mut BytesMut) -> Result<usize, E>,
    ) -> Result<Bytes, E> {
        let room = max_bytes.min(READ_ROOM_BYTES);
        let fill = |buffer: &mut BytesMut| {
            if buffer.capacity() - buffer.len() < room {
                buffer.reserve(READ_BUFFER_BYTES);
            }
            let result = read(buffer);
            let bytes = buffer.split().freeze();
            result.map(|_| bytes)
        };
        // Where new memory goes when no buffer can take the read: a buffer never used,
        // else the first free one (whose memory stays with the reads still holding it).
        let mut fallback: Option<MutexGuard<'_, BytesMut>> = None;
        for buffer in &self.buffers {
            let Ok(mut buffer) = buffer.try_lock() else {
                continue;
            };
            if buffer.capacity() - buffer.len() >= room || buffer.try_reclaim(READ_BUFFER_BYTES) {
                return fill(&mut buffer);
            }
            let unused = buffer.capacity() == 0;
            if fallback.as_ref().is_none_or(|f| unused && f.capacity() > 0) {
                fallback = Some(buffer);
            }
        }
        match fallback {
            Some(mut buffer) => fill(&mut buffer),
            // Every buffer is busy: memory for this read alone.
            None => fill(&mut BytesMut::with_capacity(room)),
        }
    }
}

/// A read of a partition.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub records: Bytes,
    pub high_watermark: i64,
    /// Below it no transaction is open.
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
    pub next_offset: i64,
    /// A `read_committed` read: the aborted transactions with records in `records`.
    pub aborted: Vec<AbortedTxn>,
}

/// What a follower's fetch got from the leader's log.
#[derive(Debug, Clone)]
pub enum ReplicaRead {
    Records {
        records: Bytes,
        high_watermark: i64,
        log_start_offset: i64,
        /// The follower's high watermark is behind the one this answer carries.
        high_watermark_moved: bool,
    },
    /// The follower's log diverges: it truncates to `end_offset` (or where its own copy
    /// of `epoch` ends, if earlier).
    Diverging { epoch: i32, end_offset: i64 },
}

/// Where a follower stands, as its leader knows it.
#[derive(Debug, Clone, Copy)]
struct FollowerState {
    /// Its log end offset at its last fetch; `None` until it fetches under this epoch,
    /// and again once the controller takes it out of the ISR, until it fetches again.
    log_end: Option<i64>,
    /// The last time it held everything the leader had (Kafka's lastCaughtUpTime).
    last_caught_up_ms: i64,
    last_fetch_ms: i64,
    leader_end_at_last_fetch: i64,
}

impl FollowerState {
    /// A follower not heard from yet under this epoch, counted as caught up now.
    fn new(now: i64) -> Self {
        FollowerState {
            log_end: None,
            last_caught_up_ms: now,
            last_fetch_ms: now,
            leader_end_at_last_fetch: -1,
        }
    }
}

/// The partition's replication as this broker sees it, under one lock (taken after the
/// log's lock when both are needed).
#[derive(Debug, Default)]
struct ReplicaState {
    me: u32,
    leading: bool,
    epoch: i32,
    partition_epoch: i32,
    replicas: Vec<u32>,
    isr: Vec<u32>,
    /// Replicas catching up for a reassignment: their fetches are throttled.
    catching_up: Vec<u32>,
    /// Leader: an ISR change proposed to the controller and not yet applied. Until it
    /// is, the high watermark waits for both the old and the proposed members (Kafka's
    /// maximal ISR), so a joining replica never misses an acknowledged record.
    pending_isr: Option<Vec<u32>>,
    /// Leader: where each follower stands.
    followers: HashMap<u32, FollowerState>,
    /// Leader: the log end offset when its epoch began.
    epoch_start_offset: i64,
    /// Follower: the leader's high watermark at the last fetch.
    leader_high_watermark: i64,
}

/// An ISR change a leader wants the controller to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrChange {
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    pub isr: Vec<u32>,
}

/// The wait before a replica whose storage failed first tries to open its log again.
pub const REOPEN_DELAY_MS: i64 = 2_000;
/// The longest wait between attempts to reopen a failed log.
pub const REOPEN_DELAY_MAX_MS: i64 = 30_000;
/// A reopened log that fails again sooner than this after opening doubles the next wait.
const REOPEN_STREAK_MS: i64 = 60_000;

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: u32,
    /// `None` only for a partition whose log could not be opened: it stays fenced.
    log: RwLock<Option<Log>>,
    /// What consumers may read: on a leader, the smallest end offset over the ISR (each
    /// member's durable end); on a follower, the leader's, capped by its own log.
    high_watermark: watch::Sender<i64>,
    /// The log end offset; wakes followers' fetches held for new data.
    log_end: watch::Sender<i64>,
    /// Every offset below this is durable on this broker under the flush policy.
    durable_end: AtomicI64,
    flush_lock: tokio::sync::Mutex<()>,
    fenced: Mutex<Option<String>>,
    /// The leader epoch this broker appends under while it leads the partition.
    leader_epoch: AtomicI32,
    /// Whether the applied metadata makes this broker the partition's leader.
    leading: AtomicBool,
    /// This broker no longer holds the partition (moved away or deleted); its files go.
    retired: AtomicBool,
    /// A storage failure while serving was reported to the controller.
    failure_reported: AtomicBool,
    /// When the log was last reopened after a storage failure (ms).
    reopened_at_ms: AtomicI64,
    /// When this log was opened (ms).
    opened_at_ms: i64,
    /// When the partition was fenced (ms), `i64::MIN` while it is not.
    fenced_at_ms: AtomicI64,
    /// How many logs of this replica in a row failed again within
    /// [`REOPEN_STREAK_MS`] of being reopened: each doubles the wait before the next.
    reopen_streak: AtomicU32,
    replication: Mutex<ReplicaState>,
    /// What went in and out since this broker opened the partition (metrics).
    pub traffic: Traffic,
}

/// Records and bytes through a partition, for the metrics.
#[derive(Debug, Default)]
pub struct Traffic {
    pub records_in: runnel_metrics::Counter,
    pub bytes_in: runnel_metrics::Counter,
    pub bytes_out: runnel_metrics::Counter,
}

impl Partition {
    /// Opens (recovering if needed) the partition's log.
    ///
    /// # Errors
    /// The storage error that kept the log from opening.
    pub fn open(
        dir: &Path,
        topic: &str,
        index: u32,
        config: LogConfig,
    ) -> Result<Self, StorageError> {
        let log = Log::open(dir, config, now_ms())?;
        for tail in log.recovered_tails() {
            tracing::warn!(
                topic, partition = index, path = %tail.path.display(), position = tail.position,
                bytes_removed = tail.bytes_removed, reason = %tail.reason,
                "recovery truncated a torn write at the end of the log"
            );
        }
        let end = log.log_end_offset();
        // Until the ISR's ends are known, nothing beyond the log start is known to be
        // replicated; a leader that is its own ISR moves it to its end at once.
        let start = log.log_start_offset();
        Ok(Partition {
            topic: topic.to_string(),
            index,
            log: RwLock::new(Some(log)),
            high_watermark: watch::Sender::new(start),
            log_end: watch::Sender::new(end),
            durable_end: AtomicI64::new(end),
            flush_lock: tokio::sync::Mutex::new(()),
            fenced: Mutex::new(None),
            leader_epoch: AtomicI32::new(-1),
            leading: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            failure_reported: AtomicBool::new(false),
            reopened_at_ms: AtomicI64::new(0),
            opened_at_ms: now_ms(),
            fenced_at_ms: AtomicI64::new(i64::MIN),
            reopen_streak: AtomicU32::new(0),
            replication: Mutex::new(ReplicaState::default()),
            traffic: Traffic::default(),
        })
    }

    /// A partition whose log failed closed when the broker opened it (corruption inside
    /// the log): it answers every request with the reason, so that the broker can start
    /// and serve every other partition.
    pub fn unavailable(topic: &str, index: u32, reason: String) -> Self {
        Partition {
            topic: topic.to_string(),
            index,
            log: RwLock::new(None),
            high_watermark: watch::Sender::new(-1),
            log_end: watch::Sender::new(-1),
            durable_end: AtomicI64::new(-1),
            flush_lock: tokio::sync::Mutex::new(()),
            fenced: Mutex::new(Some(reason)),
            leader_epoch: AtomicI32::new(-1),
            leading: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            failure_reported: AtomicBool::new(false),
            reopened_at_ms: AtomicI64::new(0),
            opened_at_ms: now_ms(),
            fenced_at_ms: AtomicI64::new(now_ms()),
            reopen_streak: AtomicU32::new(0),
            replication: Mutex::new(ReplicaState::default()),
            traffic: Traffic::default(),
        }
    }

    fn log_read(&self) -> RwLockReadGuard<'_, Option<Log>> {
        self.log
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log_write(&self) -> RwLockWriteGuard<'_, Option<Log>> {
        self.log
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the log, or answers as a fenced partition when there is none.
    fn with_log<T>(&self, f: impl FnOnce(&Log) -> T) -> Result<T, BrokerError> {
        match self.log_read().as_ref() {
            Some(log) => Ok(f(log)),
            None => Err(self.fenced_error()),
        }
    }

    fn with_log_mut<T>(&self, f: impl FnOnce(&mut Log) -> T) -> Result<T, BrokerError> {
        match self.log_write().as_mut() {
            Some(log) => Ok(f(log)),
            None => Err(self.fenced_error()),
        }
    }

    /// Why the partition is fenced, if it is.
    fn fenced_reason(&self) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn fenced_error(&self) -> BrokerError {
        if self.retired.load(Ordering::Acquire) {
            return self.moved_away();
        }
        BrokerError::Storage {
            topic: self.topic.clone(),
            partition: self.index,
            reason: format!(
                "partition is fenced after a storage failure: {}",
                self.fenced_reason()
                    .unwrap_or_else(|| "its log is not open".into())
            ),
        }
    }

    pub fn high_watermark(&self) -> i64 {
        *self.high_watermark.borrow()
    }

    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }

    /// Whether this broker leads the partition under the applied metadata.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    fn replica_state(&self) -> MutexGuard<'_, ReplicaState> {
        self.replication
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies the metadata's view of this partition: whether broker `me` leads it, under
    /// which epoch, and its replicas and ISR. Taken under the log's lock, so an append
    /// never mixes epochs. A new leader records where its epoch starts and waits for
    /// every follower's first fetch before it moves the high watermark.
    pub fn set_replication(&self, me: u32, record: &PartitionRecord) {
        let leading = record.leader == me;
        {
            // Most images change nothing of most partitions: leave appends alone then.
            let state = self.replica_state();
            if state.me == me
                && state.catching_up == record.catching_up()
                && state.leading == leading
                && state.epoch == record.leader_epoch
                && state.partition_epoch == record.partition_epoch
                && state.replicas == record.replicas
                && state.isr == record.isr
            {
                return;
            }
        }
        let mut log = self.log_write();
        let mut state = self.replica_state();
        let new_term = leading != state.leading || record.leader_epoch != state.epoch;
        if leading && new_term {
            let now = now_ms();
            let was_out_of_sync =
                !state.leading && !state.isr.is_empty() && !state.isr.contains(&me);
            if was_out_of_sync && let Some(log) = log.as_ref() {
                // Only an unclean election makes an out-of-sync replica the leader.
                let end = log.log_end_offset();
                let known = state.leader_high_watermark;
                tracing::warn!(
                    topic = %self.topic, partition = self.index, log_end = end,
                    previous_high_watermark = known, offsets_lost_at_least = (known - end).max(0),
                    "leading after an unclean election: what the old ISR held from this log end on is lost"
                );
            }
            if let Some(log) = log.as_mut() {
                // A leader whose epoch is not in its cache would answer followers'
                // divergence checks wrongly: a storage failure, as any other (the
                // controller then lets another in-sync replica lead).
                if let Err(err) = log.assign_epoch(record.leader_epoch) {
                    let _ = self.fence(&err);
                }
                state.epoch_start_offset = log.log_end_offset();
            }
            state.followers = record
                .replicas
                .iter()
                .filter(|r| **r != me)
                .map(|r| (*r, FollowerState::new(now)))
                .collect();
        }
        if !leading {
            state.followers.clear();
        } else if !new_term {
            // A reassignment added or removed replicas under the same leader.
            let now = now_ms();
            state.followers.retain(|r, _| record.replicas.contains(r));
            for replica in record.replicas.iter().filter(|r| **r != me) {
                state
                    .followers
                    .entry(*replica)
                    .or_insert(FollowerState::new(now));
            }
            // A follower the controller took out of the ISR (its storage failed, its
            // broker went away) rejoins only on a fetch made since: where it stood at
            // its last fetch says nothing of whether it still can follow, and adding it
            // back on that would hold every acks=all write until it lags out again.
            let removed: Vec<u32> = state
                .isr
                .iter()
                .copied()
                .filter(|r| !record.isr.contains(r))
                .collect();
            for replica in removed {
                if let Some(follower) = state.followers.get_mut(&replica) {
                    follower.log_end = None;
                }
            }
        }
        state.catching_up = record.catching_up();
        if new_term || record.partition_epoch != state.partition_epoch {
            state.pending_isr = None;
        }
        state.me = me;
        state.leading = leading;
        state.epoch = record.leader_epoch;
        state.partition_epoch = record.partition_epoch;
        state.replicas = record.replicas.clone();
        state.isr = record.isr.clone();
        self.leader_epoch
            .store(record.leader_epoch, Ordering::Release);
        self.leading.store(leading, Ordering::Release);
        drop(log);
        self.update_high_watermark(&state);
        drop(state);
        if new_term {
            // Wakes producers waiting for replicas: their wait ends with the term.
            self.high_watermark.send_modify(|_| {});
        }
    }

    /// Moves the high watermark to what the replication state allows: on a leader the
    /// smallest durable end over the ISR (and a proposed ISR), never backwards; on a
    /// follower the leader's, capped by its own durable end.
    fn update_high_watermark(&self, state: &ReplicaState) {
        let durable = self.durable_end.load(Ordering::Acquire);
        if !state.leading {
            let target = state.leader_high_watermark.min(durable);
            self.high_watermark.send_if_modified(|hw| {
                let moved = *hw != target;
                *hw = target;
                moved
            });
            return;
        }
        let mut target = durable;
        let members = state.isr.iter().chain(state.pending_isr.iter().flatten());
        for member in members.filter(|m| **m != state.me) {
            match state.followers.get(member).and_then(|f| f.log_end) {
                Some(end) => target = target.min(end),
                None => return,
            }
        }
        self.high_watermark.send_if_modified(|hw| {
            let moved = target > *hw;
            *hw = (*hw).max(target);
            moved
        });
    }

    /// Records that everything below `end` is durable on this broker.
    fn advance_durable_end(&self, end: i64) {
        self.durable_end.fetch_max(end, Ordering::AcqRel);
        let state = self.replica_state();
        self.update_high_watermark(&state);
    }

    /// Whether the log failed while serving (a full disk, an I/O error): fenced, with a
    /// log that opened once, and still held here.
    pub fn failed_while_serving(&self) -> bool {
        self.fenced_reason().is_some() && self.has_log() && !self.retired.load(Ordering::Acquire)
    }

    /// Marks the failure reported; true the first time.
    pub fn report_failure(&self) -> bool {
        !self.failure_reported.swap(true, Ordering::AcqRel)
    }

    /// Whether to try reopening the failed log now: [`Partition::reopen_delay_ms`] after
    /// the failure and after the last attempt.
    pub fn reopen_due(&self, now: i64) -> bool {
        let last = self.reopened_at_ms.load(Ordering::Acquire);
        let since = last.max(self.fenced_at_ms.load(Ordering::Acquire));
        now.saturating_sub(since) >= self.reopen_delay_ms()
            && self
                .reopened_at_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The wait between attempts to reopen this failed log: [`REOPEN_DELAY_MS`], doubled
    /// for every reopened log before it that failed again soon, up to
    /// [`REOPEN_DELAY_MAX_MS`]. A disk that stays full then costs the ISR a rejoin and a
    /// failure every half minute, not every two seconds.
    pub fn reopen_delay_ms(&self) -> i64 {
        let streak = self.reopen_streak.load(Ordering::Acquire).min(16);
        REOPEN_DELAY_MS
            .saturating_mul(1 << streak)
            .min(REOPEN_DELAY_MAX_MS)
    }

    /// Takes over the retry history of `failed`, the log this one reopens: the streak
    /// grows when `failed` failed within [`REOPEN_STREAK_MS`] of opening, and ends
    /// otherwise.
    pub fn follows_failed(&self, failed: &Partition) {
        let served = failed
            .fenced_at_ms
            .load(Ordering::Acquire)
            .saturating_sub(failed.opened_at_ms);
        let streak = if served < REOPEN_STREAK_MS {
            failed
                .reopen_streak
                .load(Ordering::Acquire)
                .saturating_add(1)
        } else {
            0
        };
        self.reopen_streak.store(streak, Ordering::Release);
    }

    /// Whether the log opened (a partition whose log failed to open has none).
    pub fn has_log(&self) -> bool {
        self.log_read().is_some()
    }

    /// This broker no longer holds the partition (it was moved away or deleted): it leads
    /// nothing, and producers waiting for replicas and held fetches stop waiting at once
    /// instead of at their timeout.
    pub fn retire(&self) {
        {
            // Under the log's lock, as every leadership change: no append passes its
            // leader check after this.
            let _log = self.log_write();
            let mut state = self.replica_state();
            state.leading = false;
            state.followers.clear();
            self.retired.store(true, Ordering::Release);
            self.leading.store(false, Ordering::Release);
        }
        self.high_watermark.send_modify(|_| {});
        self.log_end.send_modify(|_| {});
    }

    /// Whether `replica` is catching up for a reassignment (its fetches are throttled).
    pub fn is_catching_up(&self, replica: u32) -> bool {
        self.replica_state().catching_up.contains(&replica)
    }

    /// How many replicas the applied ISR holds.
    pub fn isr_len(&self) -> usize {
        self.replica_state().isr.len().max(1)
    }

    /// Waits until the high watermark covers `end_offset`: every ISR member holds the
    /// batch. Afterwards the ISR must still hold `min_insync` replicas.
    ///
    /// # Errors
    /// Leadership moved, the ISR shrank below `min_insync`, or `timeout` passed.
    pub async fn wait_replicated(
        &self,
        base_offset: i64,
        end_offset: i64,
        min_insync: usize,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let epoch = self.leader_epoch();
        let mut high_watermark = self.high_watermark.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_leader() || self.leader_epoch() != epoch {
                return Err(BrokerError::LeaderNotAvailable {
                    topic: self.topic.clone(),
                    partition: self.index,
                    reason: format!(
                        "leadership moved while the batch at offset {base_offset} waited for its replicas; it may or may not be kept: retry"
                    ),
                });
            }
            if *high_watermark.borrow_and_update() >= end_offset {
                let isr = self.isr_len();
                if isr < min_insync {
                    return Err(BrokerError::NotEnoughReplicasAfterAppend {
                        topic: self.topic.clone(),
                        partition: self.index,
                        base_offset,
                        isr,
                        min_insync,
                    });
                }
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, high_watermark.changed())
                .await
                .is_err()
            {
                return Err(BrokerError::ReplicationTimedOut {
                    topic: self.topic.clone(),
                    partition: self.index,
                    base_offset,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// The ISR change this leader wants now, if any and none is in flight: followers
    /// that have not caught up for `lag_max_ms` leave; followers that hold everything up
    /// to the high watermark (and the start of this epoch) join.
    pub fn wanted_isr_change(&self, now: i64, lag_max_ms: i64) -> Option<IsrChange> {
        let high_watermark = self.high_watermark();
        let mut state = self.replica_state();
        if !state.leading || state.pending_isr.is_some() {
            return None;
        }
        let me = state.me;
        let mut isr: Vec<u32> = state
            .isr
            .iter()
            .copied()
            .filter(|r| {
                *r == me
                    || state
                        .followers
                        .get(r)
                        .is_some_and(|f| now - f.last_caught_up_ms <= lag_max_ms)
            })
            .collect();
        for replica in &state.replicas {
            let caught_up = state
                .followers
                .get(replica)
                .and_then(|f| f.log_end)
                .is_some_and(|end| end >= high_watermark && end >= state.epoch_start_offset);
            if !isr.contains(replica) && caught_up {
                isr.push(*replica);
            }
        }
        isr.sort_unstable();
        let mut current = state.isr.clone();
        current.sort_unstable();
        if isr == current {
            return None;
        }
        state.pending_isr = Some(isr.clone());
        Some(IsrChange {
            leader_epoch: state.epoch,
            partition_epoch: state.partition_epoch,
            isr,
        })
    }

    /// The controller refused (or did not take) a proposed ISR change: the next check
    /// may propose again.
    pub fn isr_change_failed(&self, change: &IsrChange) {
        let mut state = self.replica_state();
        if state.pending_isr.as_ref() == Some(&change.isr) {
            state.pending_isr = None;
            self.update_high_watermark(&state);
        }
    }

    /// A follower's fetch at `fetch_offset`, whose last batch has `last_epoch`: records
    /// where it stands (which may move the high watermark) and reads what it lacks, or
    /// tells it where its log diverges from this one.
    ///
    /// # Errors
    /// A fetch offset below the log start (the follower resets its log there), or a
    /// storage failure.
    pub fn replica_read(
        &self,
        replica: u32,
        fetch_offset: i64,
        last_epoch: i32,
        follower_high_watermark: i64,
        max_bytes: usize,
        buffers: &ReadBuffers,
    ) -> Result<ReplicaRead, BrokerError> {
        self.check_fenced()?;
        let guard = self.log_read();
        let Some(log) = guard.as_ref() else {
            return Err(self.fenced_error());
        };
        let end = log.log_end_offset();
        let start = log.log_start_offset();
        if last_epoch >= 0 {
            match log.end_offset_for_epoch(last_epoch) {
                Some((epoch, epoch_end)) if epoch == last_epoch && epoch_end >= fetch_offset => {}
                Some((epoch, epoch_end)) => {
                    return Ok(ReplicaRead::Diverging {
                        epoch,
                        end_offset: epoch_end.min(fetch_offset),
                    });
                }
                None => {
                    return Ok(ReplicaRead::Diverging {
                        epoch: -1,
                        end_offset: start.min(fetch_offset),
                    });
                }
            }
        }
        if fetch_offset > end {
            return Ok(ReplicaRead::Diverging {
                epoch: log.latest_epoch(),
                end_offset: end,
            });
        }
        if fetch_offset < start {
            return Err(BrokerError::OffsetOutOfRange {
                topic: self.topic.clone(),
                partition: self.index,
                reason: format!("fetch offset {fetch_offset} is below the log start {start}"),
            });
        }
        {
            let now = now_ms();
            let mut state = self.replica_state();
            if let Some(follower) = state.followers.get_mut(&replica) {
                if fetch_offset >= end {
                    follower.last_caught_up_ms = now;
                } else if fetch_offset >= follower.leader_end_at_last_fetch {
                    follower.last_caught_up_ms = follower.last_fetch_ms;
                }
                follower.leader_end_at_last_fetch = end;
                follower.last_fetch_ms = now;
                follower.log_end = Some(fetch_offset);
            }
            self.update_high_watermark(&state);
        }
        let high_watermark = self.high_watermark();
        let high_watermark_moved = high_watermark.min(fetch_offset) != follower_high_watermark;
        let records = buffers
            .read(max_bytes, |out| {
                log.read_into(fetch_offset, max_bytes, i64::MAX, out)
            })
            .map_err(|err| match err {
                runnel_broker_storage::ReadError::Storage(err) => self.fence(&err),
                other => BrokerError::from_read(&self.topic, self.index, other),
            })?;
        Ok(ReplicaRead::Records {
            records,
            high_watermark,
            log_start_offset: start,
            high_watermark_moved,
        })
    }

    /// Follows a leader's answer that this log diverges from its own: truncates to where
    /// the leader's `epoch` ends, or earlier where this log's copy of that epoch ends
    /// (an epoch of -1: the leader knows none of this log's epochs). Returns the new end.
    ///
    /// # Errors
    /// A storage failure (which fences the partition).
    pub fn truncate_to_divergence(&self, epoch: i32, end_offset: i64) -> Result<i64, BrokerError> {
        let target = if epoch < 0 {
            end_offset
        } else {
            self.end_offset_for_epoch(epoch)
                .map_or(end_offset, |(_, own_end)| own_end.min(end_offset))
        };
        self.truncate_replica(target, false)
    }

    /// The largest epoch `<= epoch` in this log and where it ends.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, i64)> {
        self.with_log(|log| log.end_offset_for_epoch(epoch))
            .ok()
            .flatten()
    }

    /// The log end offset; -1 when the log could not be opened.
    pub fn log_end_offset(&self) -> i64 {
        self.with_log(Log::log_end_offset).unwrap_or(-1)
    }

    /// Where a follower fetches from: its log end offset, the epoch of its last batch,
    /// and its high watermark. A fenced replica (its storage failed) has none: it cannot
    /// write what it would fetch, and fetching would tell the leader it still follows.
    pub fn fetch_position(&self) -> Result<(i64, i32, i64), BrokerError> {
        self.check_fenced()?;
        let high_watermark = self.high_watermark();
        self.with_log(|log| (log.log_end_offset(), log.latest_epoch(), high_watermark))
    }

    /// Appends batches fetched from the leader (skipping any this log already holds),
    /// makes them durable under the flush policy, and takes the leader's high watermark.
    /// Blocks: call it from a blocking thread.
    ///
    /// # Errors
    /// A batch that does not continue this log, or a storage failure (which fences the
    /// partition).
    pub fn append_replicated(
        &self,
        records: &[u8],
        leader_high_watermark: i64,
    ) -> Result<(), BrokerError> {
        self.check_fenced()?;
        let now = now_ms();
        let end = {
            let mut guard = self.log_write();
            let Some(log) = guard.as_mut() else {
                return Err(self.fenced_error());
            };
            let mut appended = false;
            for batch in runnel_batch::batches(records) {
                let (header, bytes) = batch.map_err(|err| BrokerError::CorruptBatch {
                    topic: self.topic.clone(),
                    partition: self.index,
                    reason: err.to_string(),
                })?;
                if header.next_offset() <= log.log_end_offset() {
                    continue;
                }
                log.append_replica(bytes, now)
                    .map_err(|err| self.append_error(err))?;
                appended = true;
            }
            if appended {
                let synced = match log.config().flush {
                    FlushPolicy::EveryAppend => log.flush().map(|()| true),
                    FlushPolicy::Interval { .. } => log.maybe_flush(now).map(|_| true),
                };
                if let Err(err) = synced {
                    drop(guard);
                    return Err(self.fence(&err));
                }
            }
            log.log_end_offset()
        };
        self.log_end.send_replace(end);
        self.durable_end.store(end, Ordering::Release);
        let mut state = self.replica_state();
        state.leader_high_watermark = leader_high_watermark;
        self.update_high_watermark(&state);
        Ok(())
    }

    /// Cuts this replica's log back to `offset` (a divergence from the leader), or, when
    /// `reset` is set, empties it and starts it at `offset` (the leader's log starts
    /// beyond this one's end). Blocks.
    ///
    /// # Errors
    /// A storage failure, which fences the partition.
    pub fn truncate_replica(&self, offset: i64, reset: bool) -> Result<i64, BrokerError> {
        self.check_fenced()?;
        let end = {
            let mut guard = self.log_write();
            let Some(log) = guard.as_mut() else {
                return Err(self.fenced_error());
            };
            let before = log.log_end_offset();
            let done = if reset {
                log.reset_to(offset)
            } else {
                log.truncate_to(offset)
            };
            if let Err(err) = done {
                drop(guard);
                return Err(self.fence(&err));
            }
            let end = log.log_end_offset();
            if end != before {
                let (me, epoch) = {
                    let state = self.replica_state();
                    (state.me, state.epoch)
                };
                tracing::info!(topic = %self.topic, partition = self.index, replica = me, leader_epoch = epoch, from = before, to = end, "replica log truncated to follow its leader");
            }
            end
        };
        self.log_end.send_replace(end);
        self.durable_end.store(end, Ordering::Release);
        let state = self.replica_state();
        self.update_high_watermark(&state);
        Ok(end)
    }

    /// Wakes whenever the log end offset moves.
    pub fn subscribe_log_end(&self) -> watch::Receiver<i64> {
        self.log_end.subscribe()
    }

    /// Wakes whenever the high watermark moves.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }

    /// The error every request gets while the partition is fenced.
    pub(crate) fn check_fenced(&self) -> Result<(), BrokerError> {
        if self.retired.load(Ordering::Acquire) {
            return Err(self.moved_away());
        }
        match self.fenced_reason() {
            Some(_) => Err(self.fenced_error()),
            None => Ok(()),
        }
    }

    /// What requests to a retired partition get: retriable, since it lives elsewhere.
    fn moved_away(&self) -> BrokerError {
        BrokerError::LeaderNotAvailable {
            topic: self.topic.clone(),
            partition: self.index,
            reason: "this broker no longer holds the partition; refresh metadata and retry".into(),
        }
    }

    /// Storage failures fence the partition: it is never served again until a restart
    /// has recovered (or refused) its log.
    fn fence(&self, err: &StorageError) -> BrokerError {
        if self.retired.load(Ordering::Acquire) {
            // Its files are being removed: that is not a storage failure.
            return self.moved_away();
        }
        tracing::error!(topic = %self.topic, partition = self.index, error = %err, "fencing partition");
        let _first = self.fenced_at_ms.compare_exchange(
            i64::MIN,
            now_ms(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        *self
            .fenced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err.to_string());
        BrokerError::from_storage(&self.topic, self.index, err)
    }

    /// Validates every batch in `records`, then appends them all. Nothing is written when
    /// any batch is invalid.
    ///
    /// # Errors
    /// A malformed or oversized batch, or a storage failure (which fences the partition).
    pub fn append(&self, records: &[u8]) -> Result<Appended, BrokerError> {
        self.check_fenced()?;
        let mut batches = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let header = runnel_batch::validate(rest).map_err(|err| BrokerError::CorruptBatch {
                topic: self.topic.clone(),
                partition: self.index,
                reason: err.to_string(),
            })?;
            let (batch, tail) = rest.split_at(header.size_bytes());
            batches.push((batch, header));
            rest = tail;
        }
        if batches.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: format!("no record batch for {}-{}", self.topic, self.index),
            });
        }
        let now = now_ms();
        let mut guard = self.leader_log()?;
        let Some(log) = guard.as_mut() else {
            return Err(self.fenced_error());
        };
        let max = log.config().max_message_bytes;
        if let Some((big, _)) = batches.iter().find(|(b, _)| b.len() > max) {
            return Err(BrokerError::RecordTooLarge {
                topic: self.topic.clone(),
                partition: self.index,
                size_bytes: big.len(),
                size_bytes_max: max,
            });
        }
        let mut first = None;
        for (batch, header) in &batches {
            // Validated above: the checksum is not computed twice.
            let info = log
                .append_validated(
                    batch,
                    header,
                    self.leader_epoch.load(Ordering::Acquire),
                    now,
                )
                .map_err(|err| self.append_error(err))?;
            first.get_or_insert(info);
        }
        let (end_offset, log_start_offset, flush_due) = self.appended(guard, now);
        let first = first.expect("at least one batch was appended");
        self.traffic.records_in.add(
            batches
                .iter()
                .map(|(_, header)| u64::from(header.record_count))
                .sum(),
        );
        self.traffic.bytes_in.add(records.len() as u64);
        Ok(Appended {
            base_offset: first.base_offset,
            log_append_time_ms: first.log_append_time_ms,
            log_start_offset,
            end_offset,
            flush_due,
        })
    }

    /// The log's write lock, when this broker leads the partition (checked under the
    /// lock: leadership changes take the same lock).
    ///
    /// # Errors
    /// Leadership moved while the request was in flight.
    fn leader_log(&self) -> Result<RwLockWriteGuard<'_, Option<Log>>, BrokerError> {
        let guard = self.log_write();
        if !self.is_leader() {
            return Err(BrokerError::LeaderNotAvailable {
                topic: self.topic.clone(),
                partition: self.index,
                reason:
                    "leadership moved while the request was in flight; refresh metadata and retry"
                        .into(),
            });
        }
        Ok(guard)
    }

    /// A failed append as the client sees it; a storage failure fences the partition.
    fn append_error(&self, err: runnel_broker_storage::AppendError) -> BrokerError {
        match err {
            runnel_broker_storage::AppendError::Storage(err) => self.fence(&err),
            other => BrokerError::from_append(&self.topic, self.index, other),
        }
    }

    /// After an append under `guard`: releases the log, wakes followers and (under an
    /// interval flush policy) counts what was appended as durable. Returns the log end
    /// and start offsets and whether an interval flush is due.
    fn appended(&self, guard: RwLockWriteGuard<'_, Option<Log>>, now: i64) -> (i64, i64, bool) {
        let Some(log) = guard.as_ref() else {
            return (-1, -1, false);
        };
        let end_offset = log.log_end_offset();
        let log_start_offset = log.log_start_offset();
        let interval = matches!(log.config().flush, FlushPolicy::Interval { .. });
        // The fsync runs elsewhere, without the log: appends and reads go on meanwhile.
        let flush_due = interval && log.flush_due(now);
        drop(guard);
        self.log_end.send_replace(end_offset);
        if interval {
            self.advance_durable_end(end_offset);
        }
        (end_offset, log_start_offset, flush_due)
    }

    /// Syncs what was appended when the interval flush policy says it is time, with the
    /// fsync outside the log's lock (appends and reads go on while it runs). Blocks: call
    /// it from a blocking thread. A failed fsync fences the partition.
    pub fn flush_if_due(&self, now: i64) {
        if self.check_fenced().is_err() {
            return;
        }
        // One flush at a time; a flush already running covers what is due.
        let Ok(_flushing) = self.flush_lock.try_lock() else {
            return;
        };
        let handle = {
            let mut guard = self.log_write();
            let Some(log) = guard.as_mut() else {
                return;
            };
            if !log.flush_due(now) {
                return;
            }
            match log.begin_flush() {
                Ok(handle) => handle,
                Err(err) => {
                    drop(guard);
                    self.fence(&err);
                    return;
                }
            }
        };
        if let Err(err) = handle.sync() {
            self.fence(&err);
            return;
        }
        let _ = self.with_log_mut(|log| log.complete_flush(&handle, now));
    }

    /// Waits until every offset below `end_offset` is durable on this broker under the
    /// flush policy. Concurrent callers share one fsync.
    ///
    /// # Errors
    /// A failed fsync, which fences the partition.
    pub async fn wait_durable(&self, end_offset: i64) -> Result<(), BrokerError> {
        loop {
            if self.durable_end.load(Ordering::Acquire) >= end_offset {
                return Ok(());
            }
            let _flushing = self.flush_lock.lock().await;
            if self.durable_end.load(Ordering::Acquire) >= end_offset {
                return Ok(());
            }
            self.check_fenced()?;
            let handle = self
                .with_log_mut(Log::begin_flush)?
                .map_err(|err| self.fence(&err))?;
            let handle = tokio::task::spawn_blocking(move || handle.sync().map(|()| handle))
                .await
                .map_err(|err| BrokerError::Storage {
                    topic: self.topic.clone(),
                    partition: self.index,
                    reason: format!("flush task failed: {err}"),
                })?
                .map_err(|err| self.fence(&err))?;
            self.with_log_mut(|log| log.complete_flush(&handle, now_ms()))?;
            self.advance_durable_end(handle.end_offset());
        }
    }

    /// Whole batches from `offset` up to the high watermark (`read_committed`: up to the
    /// last stable offset, with the aborted transactions in what was read), at most
    /// `max_bytes` (but at least one batch), read into one of `buffers`.
    ///
    /// # Errors
    /// Offset out of range, or a storage failure (corruption fences the partition).
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        read_committed: bool,
        buffers: &ReadBuffers,
    ) -> Result<Fetched, BrokerError> {
        let high_watermark = self.high_watermark();
        let limit = if read_committed {
            self.last_stable_offset(high_watermark)
        } else {
            high_watermark
        };
        let mut fetched = self.read_below(offset, max_bytes, limit, buffers)?;
        self.traffic.bytes_out.add(fetched.records.len() as u64);
        if read_committed {
            fetched.aborted =
                self.with_log(|log| log.aborted_transactions(offset, fetched.next_offset))?;
        }
        Ok(fetched)
    }

    /// The last stable offset under `high_watermark`: the first offset of the oldest open
    /// transaction, or the high watermark when it is lower or none is open.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.with_log(Log::first_unstable_offset)
            .ok()
            .flatten()
            .map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// The epoch of the producer's open transaction here, if one is open.
    pub fn open_transaction_epoch(&self, producer_id: i64) -> Option<i16> {
        self.with_log(|log| log.open_transaction_epoch(producer_id))
            .ok()
            .flatten()
    }

    /// The sequence the producer's next batch at `epoch` must start with here.
    pub fn next_sequence(&self, producer_id: i64, epoch: i16) -> i32 {
        self.with_log(|log| log.next_sequence(producer_id, epoch))
            .unwrap_or(0)
    }

    /// The transactions open here, oldest first.
    pub fn open_transactions(&self) -> Vec<OpenTxn> {
        self.with_log(Log::open_transactions).unwrap_or_default()
    }

    /// Appends a transaction marker as the leader (see [`Log::append_marker`]); `None`
    /// when it was not needed. The caller waits for replication.
    ///
    /// # Errors
    /// Not the leader, or a storage failure (which fences the partition).
    pub fn append_marker(
        &self,
        kind: ControlType,
        producer_id: i64,
        producer_epoch: i16,
        coordinator_epoch: i32,
    ) -> Result<Option<Appended>, BrokerError> {
        self.check_fenced()?;
        let now = now_ms();
        let mut guard = self.leader_log()?;
        let Some(log) = guard.as_mut() else {
            return Err(self.fenced_error());
        };
        let info = log
            .append_marker(
                kind,
                producer_id,
                producer_epoch,
                coordinator_epoch,
                self.leader_epoch.load(Ordering::Acquire),
                now,
            )
            .map_err(|err| self.append_error(err))?;
        let Some(info) = info else {
            return Ok(None);
        };
        let (end_offset, log_start_offset, flush_due) = self.appended(guard, now);
        Ok(Some(Appended {
            base_offset: info.base_offset,
            log_append_time_ms: info.log_append_time_ms,
            log_start_offset,
            end_offset,
            flush_due,
        }))
    }

    /// Like [`Partition::read`], but up to `limit` instead of the high watermark: the
    /// group coordinator replays its whole log on taking over, as the leader's log is
    /// the one its followers will hold.
    ///
    /// # Errors
    /// Offset out of range, or a storage failure (corruption fences the partition).
    pub fn read_below(
        &self,
        offset: i64,
        max_bytes: usize,
        limit: i64,
        buffers: &ReadBuffers,
    ) -> Result<Fetched, BrokerError> {
        self.check_fenced()?;
        let high_watermark = self.high_watermark();
        let guard = self.log_read();
        let Some(log) = guard.as_ref() else {
            return Err(self.fenced_error());
        };
        let bytes = buffers
            .read(max_bytes, |out| {
                log.read_into(offset, max_bytes, limit, out)
            })
            .map_err(|err| match err {
                runnel_broker_storage::ReadError::Storage(err) => self.fence(&err),
                other => BrokerError::from_read(&self.topic, self.index, other),
            })?;
        let mut next_offset = offset;
        for (header, _) in runnel_batch::batches(&bytes).flatten() {
            next_offset = header.next_offset();
        }
        let last_stable_offset = log
            .first_unstable_offset()
            .map_or(high_watermark, |first| first.min(high_watermark));
        Ok(Fetched {
            records: bytes,
            high_watermark,
            last_stable_offset,
            log_start_offset: log.log_start_offset(),
            next_offset,
            aborted: Vec::new(),
        })
    }

    /// The log start offset; -1 when the log could not be opened.
    pub fn log_start_offset(&self) -> i64 {
        self.with_log(Log::log_start_offset).unwrap_or(-1)
    }

    /// First offset with a timestamp `>= timestamp_ms`, or the high watermark if none.
    ///
    /// # Errors
    /// A storage failure.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<i64, BrokerError> {
        self.check_fenced()?;
        let hw = self.high_watermark();
        let found = self
            .with_log(|log| log.offset_for_timestamp(timestamp_ms))?
            .map_err(|err| self.fence(&err))?;
        Ok(found.map_or(hw, |offset| offset.min(hw)))
    }

    /// Sizes and offsets of the log; `None` when it could not be opened.
    pub fn snapshot(&self) -> Option<LogSnapshot> {
        self.with_log(Log::snapshot).ok()
    }

    pub fn set_config(&self, config: LogConfig) {
        let _ = self.with_log_mut(|log| log.set_config(config));
    }

    /// Kafka's delete-records; `offset` -1 means the high watermark.
    ///
    /// # Errors
    /// An offset beyond the high watermark, or a storage failure.
    pub fn delete_records(&self, offset: i64) -> Result<i64, BrokerError> {
        self.check_fenced()?;
        let hw = self.high_watermark();
        let target = if offset == -1 { hw } else { offset };
        if target > hw || target < 0 {
            return Err(BrokerError::OffsetOutOfRange {
                topic: self.topic.clone(),
                partition: self.index,
                reason: format!(
                    "cannot delete records below offset {target}: it must be between 0 and the high watermark {hw}"
                ),
            });
        }
        self.with_log_mut(|log| log.delete_records(target))?
            .map_err(|err| BrokerError::from_read(&self.topic, self.index, err))
    }

    /// Time-based flushing, retention and compaction; called periodically from a blocking
    /// thread.
    pub fn housekeeping(&self, now: i64, clean: bool) {
        self.flush_if_due(now);
        if !clean || self.check_fenced().is_err() {
            return;
        }
        let mut guard = self.log_write();
        let Some(log) = guard.as_mut() else {
            return;
        };
        match log.enforce_retention(now) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(topic = %self.topic, partition = self.index, segments = n, "retention deleted segments")
            }
            Err(err) => {
                drop(guard);
                self.fence(&err);
                return;
            }
        }
        match log.compact(now) {
            Ok(stats) if stats.records_removed > 0 => tracing::info!(
                topic = %self.topic, partition = self.index, removed = stats.records_removed,
                bytes_before = stats.bytes_before, bytes_after = stats.bytes_after, "compacted"
            ),
            Ok(_) => {}
            Err(err) => {
                drop(guard);
                self.fence(&err);
            }
        }
    }

    /// Flushes and closes the log cleanly (a clean shutdown).
    ///
    /// # Errors
    /// A storage failure.
    pub fn close(self: Arc<Self>) -> Result<(), StorageError> {
        match Arc::try_unwrap(self) {
            Ok(partition) => match partition
                .log
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                Some(log) => log.close(),
                None => Ok(()),
            },
            // Still referenced by an in-flight request: flush what is there.
            Err(shared) => match shared.log_write().as_mut() {
                Some(log) => log.flush(),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(leader: u32, epoch: i32, isr: &[u32]) -> PartitionRecord {
        PartitionRecord {
            leader,
            leader_epoch: epoch,
            replicas: vec![1, 2],
            isr: isr.to_vec(),
            partition_epoch: epoch,
            target: Vec::new(),
        }
    }

    /// Fills `n` bytes of `byte` through `buffers`.
    fn read_of(buffers: &ReadBuffers, n: usize, byte: u8) -> Bytes {
        buffers
            .read::<()>(n, |out| {
                out.extend_from_slice(&vec![byte; n]);
                Ok(n)
            })
            .expect("read")
    }

    #[test]
    fn a_log_that_fails_again_soon_after_reopening_waits_longer_before_the_next_try() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |n: usize| {
            Partition::open(
                &dir.path().join(n.to_string()),
                "t",
                0,
                LogConfig::default(),
            )
            .expect("open")
        };
        let full = || StorageError::io(dir.path(), std::io::Error::other("no space left"));
        let first = open(0);
        let _ = first.fence(&full());
        let fenced = first.fenced_at_ms.load(Ordering::Acquire);
        assert!(!first.reopen_due(fenced + REOPEN_DELAY_MS - 1));
        assert!(first.reopen_due(fenced + REOPEN_DELAY_MS));
        // Tried just now: not again before another wait.
        assert!(!first.reopen_due(fenced + REOPEN_DELAY_MS + 1));
        assert!(first.reopen_due(fenced + 2 * REOPEN_DELAY_MS));
        // Each reopened log that fails at once doubles the wait, up to the cap.
        let mut failed = first;
        for streak in 1..=6 {
            let reopened = open(streak);
            reopened.follows_failed(&failed);
            let _ = reopened.fence(&full());
            let at = reopened.fenced_at_ms.load(Ordering::Acquire);
            let wait = (REOPEN_DELAY_MS << streak).min(REOPEN_DELAY_MAX_MS);
            assert_eq!(reopened.reopen_delay_ms(), wait, "streak {streak}");
            assert!(!reopened.reopen_due(at + wait - 1), "streak {streak}");
            assert!(reopened.reopen_due(at + wait), "streak {streak}");
            failed = reopened;
        }
        assert_eq!(failed.reopen_delay_ms(), REOPEN_DELAY_MAX_MS);
        // A reopened log that served for a while before failing ends the streak.
        failed
            .fenced_at_ms
            .store(failed.opened_at_ms + REOPEN_STREAK_MS, Ordering::Release);
        let lasting = open(7);
        lasting.follows_failed(&failed);
        assert_eq!(lasting.reopen_delay_ms(), REOPEN_DELAY_MS);
    }

    #[test]
    fn read_buffers_reuse_memory_whose_reads_are_gone_and_never_touch_held_reads() {
        let buffers = ReadBuffers::new(2);
        let first = read_of(&buffers, 1000, 1);
        let start = first.as_ptr();
        // Reads share a buffer while it has room.
        let second = read_of(&buffers, READ_BUFFER_BYTES - READ_ROOM_BYTES, 2);
        assert_eq!(second.as_ptr(), start.wrapping_add(1000));
        // Too little room is left for the next read: it goes to the other buffer, and
        // the held reads keep their bytes.
        let third = read_of(&buffers, READ_ROOM_BYTES, 3);
        let third_at = third.as_ptr() as usize;
        let first_buffer = start as usize..start as usize + READ_BUFFER_BYTES;
        assert!(!first_buffer.contains(&third_at));
        assert!(first.iter().all(|b| *b == 1) && second.iter().all(|b| *b == 2));
        // Once the first buffer's reads are gone, its memory is used again from its
        // start rather than new memory.
        drop((first, second));
        let after = read_of(&buffers, READ_ROOM_BYTES, 4);
        assert_eq!(after.as_ptr(), start);
        assert!(third.iter().all(|b| *b == 3));
        assert!(after.iter().all(|b| *b == 4));
    }

    fn batch(value: &str) -> Vec<u8> {
        let mut builder = runnel_batch::BatchBuilder::new(runnel_batch::BatchOptions::default());
        builder.push(&runnel_batch::Record {
            value: Some(bytes::Bytes::copy_from_slice(value.as_bytes())),
            ..Default::default()
        });
        builder.build().to_vec()
    }

    /// Appends one record as a leader and waits until it is durable here.
    async fn write(partition: &Partition, value: &str) {
        let appended = partition.append(&batch(value)).expect("append");
        partition
            .wait_durable(appended.end_offset)
            .await
            .expect("durable");
    }

    fn values(partition: &Partition) -> Vec<String> {
        let mut out = Vec::new();
        let mut offset = partition.log_start_offset();
        let end = partition.fetch_position().expect("open").0;
        while offset < end {
            let bytes = partition
                .with_log(|log| log.read(offset, 1 << 20, i64::MAX))
                .expect("open")
                .expect("read");
            for entry in runnel_batch::batches(&bytes) {
                let (header, raw) = entry.expect("batch");
                for r in runnel_batch::decode_records(raw).expect("records") {
                    out.push(String::from_utf8_lossy(&r.value.unwrap_or_default()).to_string());
                }
                offset = header.next_offset();
            }
        }
        out
    }

    /// Copies what `follower` lacks from `leader`, as the replica fetcher does, until it
    /// has caught up; truncates on a divergence.
    fn catch_up(leader: &Partition, follower: &Partition, follower_id: u32) {
        let buffers = ReadBuffers::new(1);
        for _ in 0..10 {
            let (offset, epoch, hw) = follower.fetch_position().expect("open");
            match leader
                .replica_read(follower_id, offset, epoch, hw, 1 << 20, &buffers)
                .expect("replica read")
            {
                ReplicaRead::Diverging { epoch, end_offset } => {
                    follower
                        .truncate_to_divergence(epoch, end_offset)
                        .expect("truncate");
                }
                ReplicaRead::Records {
                    records,
                    high_watermark,
                    ..
                } => {
                    if records.is_empty() && offset == leader.fetch_position().expect("open").0 {
                        follower
                            .append_replicated(&records, high_watermark)
                            .expect("hw");
                        return;
                    }
                    follower
                        .append_replicated(&records, high_watermark)
                        .expect("append");
                }
            }
        }
        panic!("the follower did not catch up");
    }

    #[tokio::test]
    async fn a_deposed_leader_truncates_its_divergent_tail_to_the_new_leaders_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig::default();
        let one = Partition::open(&dir.path().join("one"), "t", 0, config.clone()).expect("open");
        let two = Partition::open(&dir.path().join("two"), "t", 0, config).expect("open");
        one.set_replication(1, &record(1, 0, &[1, 2]));
        two.set_replication(2, &record(1, 0, &[1, 2]));
        for v in ["a", "b", "c"] {
            write(&one, v).await;
        }
        catch_up(&one, &two, 2);
        assert_eq!(values(&two), ["a", "b", "c"]);
        // The high watermark waits for the follower's next fetch to cover it.
        catch_up(&one, &two, 2);
        assert_eq!(one.high_watermark(), 3);

        // Broker 1 writes two more that nobody copies, then loses its leadership.
        write(&one, "lost-1").await;
        write(&one, "lost-2").await;
        two.set_replication(2, &record(2, 1, &[2]));
        one.set_replication(1, &record(2, 1, &[2]));
        assert!(
            one.append(&batch("refused")).is_err(),
            "a follower refuses produce"
        );
        write(&two, "d").await;

        catch_up(&two, &one, 1);
        assert_eq!(values(&one), ["a", "b", "c", "d"]);
        assert_eq!(
            one.end_offset_for_epoch(1).map(|(e, _)| e),
            Some(1),
            "the follower learned the new epoch from the batch it copied"
        );
    }

    #[tokio::test]
    async fn a_follower_taken_out_of_the_isr_rejoins_only_on_a_new_fetch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = Partition::open(dir.path(), "t", 0, LogConfig::default()).expect("open");
        let buffers = ReadBuffers::new(1);
        one.set_replication(1, &record(1, 0, &[1, 2]));
        write(&one, "a").await;
        one.replica_read(2, 1, 0, 0, 1 << 20, &buffers)
            .expect("read");
        assert_eq!(one.high_watermark(), 1, "the follower holds everything");
        // Its storage fails and the controller takes it out of the ISR, same leader.
        let mut out = record(1, 0, &[1]);
        out.partition_epoch = 1;
        one.set_replication(1, &out);
        assert_eq!(
            one.wanted_isr_change(now_ms(), 30_000).map(|c| c.isr),
            None,
            "where it stood before says nothing of whether it still follows"
        );
        write(&one, "b").await;
        assert_eq!(one.high_watermark(), 2, "acks=all no longer waits for it");
        // Once it fetches again and holds the high watermark, it rejoins.
        one.replica_read(2, 2, 0, 1, 1 << 20, &buffers)
            .expect("read");
        let change = one.wanted_isr_change(now_ms(), 30_000).expect("expand");
        assert_eq!(change.isr, vec![1, 2]);
    }

    #[tokio::test]
    async fn the_high_watermark_waits_for_every_isr_member_and_a_joining_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = Partition::open(dir.path(), "t", 0, LogConfig::default()).expect("open");
        let buffers = ReadBuffers::new(1);
        one.set_replication(1, &record(1, 0, &[1]));
        write(&one, "a").await;
        assert_eq!(
            one.high_watermark(),
            1,
            "a leader alone in its ISR moves it at once"
        );
        // Broker 2 is a replica out of the ISR: it does not hold the watermark back ...
        write(&one, "b").await;
        assert_eq!(one.high_watermark(), 2);
        one.replica_read(2, 0, -1, 0, 1 << 20, &buffers)
            .expect("read");
        assert_eq!(one.high_watermark(), 2);
        // ... until it is proposed to join: then the watermark waits for it too.
        one.replica_read(2, 2, 0, 0, 1 << 20, &buffers)
            .expect("read");
        let change = one.wanted_isr_change(now_ms(), 30_000).expect("expand");
        assert_eq!(change.isr, vec![1, 2]);
        write(&one, "c").await;
        assert_eq!(
            one.high_watermark(),
            2,
            "the joining replica lacks offset 2"
        );
        one.replica_read(2, 3, 0, 2, 1 << 20, &buffers)
            .expect("read");
        assert_eq!(one.high_watermark(), 3);
    }
}
