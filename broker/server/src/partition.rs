//! A partition hosted by this broker: its log, high watermark and durability.
//!
//! Appends are applied in call order under the log's write lock and take microseconds; the
//! fsync that makes them durable runs outside the lock. With the default flush policy
//! (`FlushPolicy::EveryAppend`) every waiting producer's batches are covered by one fsync
//! (group commit), and the high watermark only advances over flushed data, so a consumer
//! never sees a record that a power loss could take back. With an interval policy the high
//! watermark is the log end offset, as in Kafka.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};
use runnel_broker_storage::{FlushPolicy, Log, LogConfig, LogSnapshot, StorageError};
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
/// free stretch of a large buffer and hands it out as `Bytes`, and a buffer whose reads
/// have all been dropped is used again from its start. Memory the process already has is
/// cheaper than fresh pages, which must be faulted in and zeroed (on some machines at a
/// fraction of memcpy speed).
#[derive(Debug)]
pub struct ReadBuffers {
    buffers: Vec<Mutex<BytesMut>>,
}

/// Size of each read buffer; a read larger than this gets a buffer of its own size.
const READ_BUFFER_BYTES: usize = 16 * 1024 * 1024;

impl ReadBuffers {
    /// `count` buffers, so that that many reads run at once without waiting.
    pub fn new(count: usize) -> Self {
        ReadBuffers {
            buffers: (0..count.max(1))
                .map(|_| Mutex::new(BytesMut::new()))
                .collect(),
        }
    }

    /// Runs `read` on a free buffer (or a new one when all are busy) and returns what it
    /// appended.
    fn read<E>(
        &self,
        max_bytes: usize,
        read: impl FnOnce(&mut BytesMut) -> Result<usize, E>,
    ) -> Result<Bytes, E> {
        let fill = |buffer: &mut BytesMut| {
            if buffer.capacity() - buffer.len() < max_bytes {
                // Reuses the allocation when every earlier read from it is gone.
                buffer.reserve(max_bytes.max(READ_BUFFER_BYTES));
            }
            let result = read(buffer);
            let bytes = buffer.split().freeze();
            result.map(|_| bytes)
        };
        for buffer in &self.buffers {
            if let Ok(mut buffer) = buffer.try_lock() {
                return fill(&mut buffer);
            }
        }
        fill(&mut BytesMut::new())
    }
}

/// A read of a partition.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub records: Bytes,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub next_offset: i64,
}

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: u32,
    /// `None` only for a partition whose log could not be opened: it stays fenced.
    log: RwLock<Option<Log>>,
    high_watermark: watch::Sender<i64>,
    flush_lock: tokio::sync::Mutex<()>,
    fenced: Mutex<Option<String>>,
    /// The leader epoch this broker appends under while it leads the partition.
    leader_epoch: AtomicI32,
    /// Whether the applied metadata makes this broker the partition's leader.
    leading: AtomicBool,
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
        Ok(Partition {
            topic: topic.to_string(),
            index,
            log: RwLock::new(Some(log)),
            high_watermark: watch::Sender::new(end),
            flush_lock: tokio::sync::Mutex::new(()),
            fenced: Mutex::new(None),
            leader_epoch: AtomicI32::new(-1),
            leading: AtomicBool::new(false),
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
            flush_lock: tokio::sync::Mutex::new(()),
            fenced: Mutex::new(Some(reason)),
            leader_epoch: AtomicI32::new(-1),
            leading: AtomicBool::new(false),
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

    /// Applies the metadata's view of this partition: whether this broker leads it, and
    /// under which epoch. Taken under the log's lock, so an append never mixes epochs.
    pub fn set_leadership(&self, leading: bool, epoch: i32) {
        let _log = self.log_write();
        self.leader_epoch.store(epoch, Ordering::Release);
        self.leading.store(leading, Ordering::Release);
    }

    /// Wakes whenever the high watermark moves.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }

    /// The error every request gets while the partition is fenced.
    pub(crate) fn check_fenced(&self) -> Result<(), BrokerError> {
        match self.fenced_reason() {
            Some(_) => Err(self.fenced_error()),
            None => Ok(()),
        }
    }

    /// Storage failures fence the partition: it is never served again until a restart
    /// has recovered (or refused) its log.
    fn fence(&self, err: &StorageError) -> BrokerError {
        tracing::error!(topic = %self.topic, partition = self.index, error = %err, "fencing partition");
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
            batches.push(batch);
            rest = tail;
        }
        if batches.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: format!("no record batch for {}-{}", self.topic, self.index),
            });
        }
        let now = now_ms();
        let mut guard = self.log_write();
        let Some(log) = guard.as_mut() else {
            return Err(self.fenced_error());
        };
        // Checked under the log's lock: leadership changes take the same lock.
        if !self.is_leader() {
            return Err(BrokerError::LeaderNotAvailable {
                topic: self.topic.clone(),
                partition: self.index,
                reason:
                    "leadership moved while the request was in flight; refresh metadata and retry"
                        .into(),
            });
        }
        let max = log.config().max_message_bytes;
        if let Some(big) = batches.iter().find(|b| b.len() > max) {
            return Err(BrokerError::RecordTooLarge {
                topic: self.topic.clone(),
                partition: self.index,
                size_bytes: big.len(),
                size_bytes_max: max,
            });
        }
        let mut first = None;
        for batch in &batches {
            let info = log
                .append(batch, self.leader_epoch.load(Ordering::Acquire), now)
                .map_err(|err| match err {
                    runnel_broker_storage::AppendError::Storage(err) => self.fence(&err),
                    other => BrokerError::from_append(&self.topic, self.index, other),
                })?;
            first.get_or_insert(info);
        }
        let end_offset = log.log_end_offset();
        let log_start_offset = log.log_start_offset();
        let mut flush_due = false;
        if let FlushPolicy::Interval { .. } = log.config().flush {
            // The fsync runs elsewhere, without the log: appends and reads go on meanwhile.
            flush_due = log.flush_due(now);
            self.high_watermark.send_replace(end_offset);
        }
        let first = first.expect("at least one batch was appended");
        Ok(Appended {
            base_offset: first.base_offset,
            log_append_time_ms: first.log_append_time_ms,
            log_start_offset,
            end_offset,
            flush_due,
        })
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

    /// Waits until every offset below `end_offset` is durable under the flush policy and
    /// visible to consumers. Concurrent callers share one fsync.
    ///
    /// # Errors
    /// A failed fsync, which fences the partition.
    pub async fn wait_durable(&self, end_offset: i64) -> Result<(), BrokerError> {
        loop {
            if self.high_watermark() >= end_offset {
                return Ok(());
            }
            let _flushing = self.flush_lock.lock().await;
            if self.high_watermark() >= end_offset {
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
            self.high_watermark.send_if_modified(|hw| {
                let moved = handle.end_offset() > *hw;
                *hw = (*hw).max(handle.end_offset());
                moved
            });
        }
    }

    /// Whole batches from `offset` up to the high watermark, at most `max_bytes` (but at
    /// least one batch), read into one of `buffers`.
    ///
    /// # Errors
    /// Offset out of range, or a storage failure (corruption fences the partition).
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
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
                log.read_into(offset, max_bytes, high_watermark, out)
            })
            .map_err(|err| match err {
                runnel_broker_storage::ReadError::Storage(err) => self.fence(&err),
                other => BrokerError::from_read(&self.topic, self.index, other),
            })?;
        let mut next_offset = offset;
        for (header, _) in runnel_batch::batches(&bytes).flatten() {
            next_offset = header.next_offset();
        }
        Ok(Fetched {
            records: bytes,
            high_watermark,
            log_start_offset: log.log_start_offset(),
            next_offset,
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
