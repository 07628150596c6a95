//! A partition's log: the ordered set of segments and the operations on it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use runnel_batch::{
    BATCH_HEADER_BYTES, BatchHeader, ControlType, TimestampType, stamp_header, validate,
};

use crate::checkpoint;
use crate::epoch::{EpochEntry, LeaderEpochCache};
use crate::producers::{AbortedTxn, OpenTxn, ProducerStates, SequenceCheck};
use crate::segment::{OpenMode, Segment, TruncatedTail};
use crate::txn_index::TxnIndex;
use crate::{AppendError, FlushPolicy, LogConfig, ReadError, StorageError};

const LOG_START_FILE: &str = "log-start-offset";
const RECOVERY_POINT_FILE: &str = "recovery-point";
/// The idempotent producers' state as of an offset (`producers.rs`).
const PRODUCER_SNAPSHOT_FILE: &str = "producer-snapshot";

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The broker's timestamp, when the topic uses `LogAppendTime`.
    pub log_append_time_ms: Option<i64>,
    pub record_count: u32,
    /// An idempotent producer's retry of a batch this log holds: nothing was written, and
    /// the offsets are those the batch got the first time.
    pub duplicate: bool,
}

/// A flush prepared under the log's owner's lock, to be synced outside it (group commit:
/// appends go on while the fsync runs).
#[derive(Debug)]
pub struct FlushHandle {
    file: fs::File,
    path: PathBuf,
    end_offset: i64,
    records: u64,
    /// The segment synced, and its size when the flush was prepared.
    segment: i64,
    bytes: u64,
}

impl FlushHandle {
    /// Every offset below this is durable once [`FlushHandle::sync`] returns.
    pub fn end_offset(&self) -> i64 {
        self.end_offset
    }

    /// # Errors
    /// The fsync failed.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|source| StorageError::io(&self.path, source))
    }
}

/// Sizes and offsets of a log at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSnapshot {
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub size_bytes: u64,
    pub segment_count: usize,
}

/// One partition's log. Not thread-safe: the owner serialises access. Dropping a `Log`
/// without [`Log::close`] is exactly what a process crash looks like to the next open.
#[derive(Debug)]
pub struct Log {
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) segments: BTreeMap<i64, Segment>,
    log_start_offset: i64,
    recovery_point: i64,
    epochs: LeaderEpochCache,
    producers: ProducerStates,
    aborted: TxnIndex,
    unflushed_records: u64,
    last_flush_ms: i64,
    recovered_tails: Vec<TruncatedTail>,
    read_mark: ReadMark,
}

/// How long a read keeps the data from its offset to the log end in the page cache: at
/// least one of these, and until the drop after the next one.
const READ_MARK_PERIOD: Duration = Duration::from_millis(100);

/// The lowest offset readers asked for lately: in the current [`READ_MARK_PERIOD`] and
/// the one before. A reader that is catching up reads often, so its position shows here
/// and the data it is about to read is not dropped from the page cache under it.
#[derive(Debug)]
struct ReadMark {
    current: AtomicI64,
    previous: i64,
    started: Instant,
}

impl ReadMark {
    fn new() -> Self {
        ReadMark {
            current: AtomicI64::new(i64::MAX),
            previous: i64::MAX,
            started: Instant::now(),
        }
    }

    fn note(&self, offset: i64) {
        self.current.fetch_min(offset, Ordering::Relaxed);
    }

    /// The lowest offset read in the last one to two periods, if any.
    fn floor(&mut self) -> Option<i64> {
        if self.started.elapsed() >= READ_MARK_PERIOD {
            self.previous = self.current.swap(i64::MAX, Ordering::Relaxed);
            self.started = Instant::now();
        }
        let low = self.current.load(Ordering::Relaxed).min(self.previous);
        (low != i64::MAX).then_some(low)
    }
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering from a crash if needed.
    ///
    /// # Errors
    /// I/O errors, and [`StorageError::Corrupt`] when damage cannot be repaired by
    /// truncating a torn tail.
    pub fn open(dir: &Path, config: LogConfig, now_ms: i64) -> Result<Self, StorageError> {
        fs::create_dir_all(dir).map_err(|source| StorageError::io(dir, source))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(dir).map_err(|source| StorageError::io(dir, source))? {
            let entry = entry.map_err(|source| StorageError::io(dir, source))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") || name.ends_with(".cleaned") {
                let path = entry.path();
                fs::remove_file(&path).map_err(|source| StorageError::io(&path, source))?;
            } else if let Some(stem) = name.strip_suffix(".log")
                && stem.len() == 20
                && let Ok(base) = stem.parse::<i64>()
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let recovery_point = checkpoint::read_i64(&dir.join(RECOVERY_POINT_FILE)).unwrap_or(0);
        let interval = config.index_interval_bytes;
        let mut segments = BTreeMap::new();
        let mut recovered_tails = Vec::new();
        if let Some((&last, rest)) = bases.split_last() {
            for &base in rest {
                let (segment, _) = Segment::open(dir, base, interval, OpenMode::Trusted)?;
                segments.insert(base, segment);
            }
            let clean = match Segment::open(dir, last, interval, OpenMode::Trusted) {
                Ok((segment, _)) if segment.next_offset() == recovery_point => Some(segment),
                _ => None,
            };
            let segment = match clean {
                Some(segment) => segment,
                None => {
                    let (segment, truncated) =
                        Segment::open(dir, last, interval, OpenMode::Recover { recovery_point })?;
                    recovered_tails.extend(truncated);
                    segment
                }
            };
            segments.insert(last, segment);
        }
        let saved_start = checkpoint::read_i64(&dir.join(LOG_START_FILE));
        if segments.is_empty() {
            let base = saved_start.unwrap_or(0).max(0);
            let segment = Segment::create(dir, base, interval)
                .map_err(|source| StorageError::io(dir, source))?;
            segments.insert(base, segment);
        }
        let epochs = LeaderEpochCache::load(dir).map_err(|source| StorageError::io(dir, source))?;
        let end = segments
            .values()
            .next_back()
            .map_or(0, Segment::next_offset);
        let aborted = TxnIndex::load(dir, end)?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            config,
            segments,
            log_start_offset: 0,
            recovery_point: recovery_point.max(0),
            epochs,
            producers: ProducerStates::default(),
            aborted,
            unflushed_records: 0,
            last_flush_ms: now_ms,
            recovered_tails,
            read_mark: ReadMark::new(),
        };
        let first_base = log.first_segment().base_offset;
        log.log_start_offset = saved_start
            .unwrap_or(first_base)
            .max(first_base)
            .min(log.log_end_offset());
        let end = log.log_end_offset();
        log.epochs
            .truncate_from_end(end)
            .map_err(|source| StorageError::io(dir, source))?;
        log.rebuild_producers()?;
        Ok(log)
    }

    /// Rebuilds the producers' state: the snapshot when it does not reach past the log
    /// end, else nothing, and then the batches after it (without a snapshot, those of the
    /// last two segments).
    fn rebuild_producers(&mut self) -> Result<(), StorageError> {
        self.producers.clear();
        let end = self.log_end_offset();
        let path = self.dir.join(PRODUCER_SNAPSHOT_FILE);
        let mut snapshot = fs::read_to_string(&path)
            .ok()
            .and_then(|text| ProducerStates::decode(&text));
        if snapshot.as_ref().is_some_and(|(offset, _)| *offset > end) {
            // Taken before a truncation: it holds batches the log no longer has, and
            // must not come back once the log grows past it again.
            fs::remove_file(&path).map_err(|source| StorageError::io(&path, source))?;
            snapshot = None;
        }
        let from = match snapshot {
            Some((offset, states)) => {
                self.producers = states;
                offset
            }
            None => self
                .segments
                .keys()
                .rev()
                .nth(1)
                .or_else(|| self.segments.keys().next())
                .copied()
                .unwrap_or(0),
        }
        .max(self.log_start_offset);
        let mut offset = from;
        let mut buf = BytesMut::new();
        while offset < end {
            buf.clear();
            match self.read_unmarked(offset, 4 * 1024 * 1024, end, &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(ReadError::Storage(err)) => return Err(err),
                Err(ReadError::OffsetOutOfRange { .. }) => break,
            }
            let before = offset;
            for batch in runnel_batch::batches(&buf) {
                let Ok((header, bytes)) = batch else {
                    break;
                };
                self.record_batch(&header, bytes, header.max_timestamp_ms)?;
                offset = offset.max(header.next_offset());
            }
            if offset == before {
                break;
            }
        }
        Ok(())
    }

    /// Records an appended batch in the producers' state, and an abort marker in the
    /// aborted-transaction index.
    fn record_batch(
        &mut self,
        header: &BatchHeader,
        batch: &[u8],
        now_ms: i64,
    ) -> Result<(), StorageError> {
        if !header.is_control() {
            self.producers.record(header, now_ms);
            return Ok(());
        }
        // A control batch that is not a marker of a known kind changes nothing.
        let Ok(kind) = runnel_batch::control_type(batch) else {
            return Ok(());
        };
        match self.producers.record_marker(header, kind, now_ms) {
            Some(aborted) => self.aborted.add(aborted),
            None => Ok(()),
        }
    }

    /// The first offset of the oldest open transaction: a `read_committed` reader reads
    /// below the smaller of it and the high watermark (the last stable offset).
    pub fn first_unstable_offset(&self) -> Option<i64> {
        self.producers.first_unstable_offset()
    }

    /// The sequence the producer's next batch at `epoch` must start with here.
    pub fn next_sequence(&self, producer_id: i64, epoch: i16) -> i32 {
        self.producers.next_sequence(producer_id, epoch)
    }

    /// The epoch of the producer's open transaction here, if one is open.
    pub fn open_transaction_epoch(&self, producer_id: i64) -> Option<i16> {
        self.producers.open_transaction_epoch(producer_id)
    }

    /// The transactions open in this partition, oldest first.
    pub fn open_transactions(&self) -> Vec<OpenTxn> {
        self.producers.open_transactions()
    }

    /// The aborted transactions with records in `[from, to)`.
    pub fn aborted_transactions(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted.overlapping(from, to)
    }

    /// Appends a transaction marker of `producer_id` at `producer_epoch` (the epoch the
    /// coordinator bumped to when the transaction ended). Returns `None`, writing
    /// nothing, when the producer's epoch here is that one or newer (a late or repeated
    /// marker).
    ///
    /// # Errors
    /// I/O errors.
    pub fn append_marker(
        &mut self,
        kind: ControlType,
        producer_id: i64,
        producer_epoch: i16,
        coordinator_epoch: i32,
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<Option<AppendInfo>, AppendError> {
        if !self.producers.marker_needed(producer_id, producer_epoch) {
            return Ok(None);
        }
        let batch = runnel_batch::control_batch(
            kind,
            producer_id,
            producer_epoch,
            coordinator_epoch,
            now_ms,
        );
        self.append_checked(&batch, leader_epoch, now_ms).map(Some)
    }

    /// Writes the producers' state as of the log end (at a roll and a clean close).
    fn snapshot_producers(&self) -> Result<(), StorageError> {
        let path = self.dir.join(PRODUCER_SNAPSHOT_FILE);
        let text = self.producers.encode(self.log_end_offset());
        checkpoint::write_atomic(&path, text.as_bytes())
            .map_err(|source| StorageError::io(&path, source))
    }

    /// The idempotent producers this log knows.
    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Replaces the settings; they apply to the next append, roll, retention or compaction.
    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }

    /// The offset the next appended record will get.
    pub fn log_end_offset(&self) -> i64 {
        self.active().next_offset()
    }

    pub fn snapshot(&self) -> LogSnapshot {
        LogSnapshot {
            log_start_offset: self.log_start_offset,
            log_end_offset: self.log_end_offset(),
            size_bytes: self.segments.values().map(Segment::size_bytes).sum(),
            segment_count: self.segments.len(),
        }
    }

    /// What crash recovery truncated when this log was opened.
    pub fn recovered_tails(&self) -> &[TruncatedTail] {
        &self.recovered_tails
    }

    pub fn leader_epochs(&self) -> &[EpochEntry] {
        self.epochs.entries()
    }

    /// The largest known epoch `<= epoch` and the offset where it ended.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, i64)> {
        self.epochs.end_offset_for(epoch, self.log_end_offset())
    }

    fn first_segment(&self) -> &Segment {
        self.segments
            .values()
            .next()
            .expect("a log always has a segment")
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has a segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has a segment")
    }

    /// Validates a producer's batch, stamps its base offset, leader epoch and (for
    /// `LogAppendTime` topics) timestamp, and appends it. The records are neither
    /// re-encoded nor copied: a stamped copy of the header is written before them.
    ///
    /// # Errors
    /// An invalid, empty or oversized batch (nothing is written), or an I/O error.
    pub fn append(
        &mut self,
        batch: &[u8],
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo, AppendError> {
        let header = validate(batch)?;
        self.append_validated(batch, &header, leader_epoch, now_ms)
    }

    /// [`Log::append`] of a batch whose checksum the caller verified with
    /// [`runnel_batch::validate`], which returned `header`.
    ///
    /// # Errors
    /// As [`Log::append`].
    pub fn append_validated(
        &mut self,
        batch: &[u8],
        header: &BatchHeader,
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo, AppendError> {
        if batch.len() > self.config.max_message_bytes {
            return Err(AppendError::RecordTooLarge {
                size_bytes: batch.len(),
                size_bytes_max: self.config.max_message_bytes,
            });
        }
        if header.size_bytes() != batch.len() {
            return Err(AppendError::InconsistentBatch {
                reason: format!(
                    "batch length field says {} bytes but {} were sent",
                    header.size_bytes(),
                    batch.len()
                ),
            });
        }
        if header.record_count == 0 {
            return Err(AppendError::EmptyBatch);
        }
        if i64::from(header.last_offset_delta) + 1 != i64::from(header.record_count) {
            return Err(AppendError::InconsistentBatch {
                reason: format!(
                    "{} records but last offset delta {}",
                    header.record_count, header.last_offset_delta
                ),
            });
        }
        if header.is_control() {
            return Err(AppendError::InconsistentBatch {
                reason: "control batches (transaction markers) are written by the transaction coordinator only".into(),
            });
        }
        if let SequenceCheck::Duplicate(kept) = self.producers.check(header)? {
            return Ok(AppendInfo {
                base_offset: kept.base_offset,
                last_offset: kept.last_offset,
                log_append_time_ms: None,
                record_count: header.record_count,
                duplicate: true,
            });
        }
        self.append_checked(batch, leader_epoch, now_ms)
    }

    /// Stamps and appends a batch that passed the checks of [`Log::append`].
    fn append_checked(
        &mut self,
        batch: &[u8],
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo, AppendError> {
        let base_offset = self.log_end_offset();
        let log_append_time_ms = match self.config.timestamp_type {
            TimestampType::LogAppendTime => Some(now_ms),
            TimestampType::CreateTime => None,
        };
        let stamped = stamp_header(batch, base_offset, leader_epoch, log_append_time_ms);
        let header = runnel_batch::parse_header(&stamped)?;
        let records = batch.get(BATCH_HEADER_BYTES..).unwrap_or_default();
        self.maybe_roll(batch.len() as u64, now_ms)?;
        if leader_epoch >= 0 {
            self.epochs
                .assign(leader_epoch, base_offset)
                .map_err(|source| StorageError::io(&self.dir, source))?;
        }
        self.active_mut().append(&stamped, records, &header)?;
        if header.is_control() {
            let mut whole = stamped.to_vec();
            whole.extend_from_slice(records);
            self.record_batch(&header, &whole, now_ms)?;
        } else {
            self.producers.record(&header, now_ms);
        }
        self.unflushed_records += u64::from(header.record_count);
        Ok(AppendInfo {
            base_offset,
            last_offset: header.last_offset(),
            log_append_time_ms,
            record_count: header.record_count,
            duplicate: false,
        })
    }

    /// Appends a batch copied from the partition's leader as it is: its base offset must
    /// be this log's end offset, and its leader epoch (stamped by the leader) enters the
    /// epoch cache. Nothing in it is re-stamped, so the replica's bytes are the leader's.
    ///
    /// # Errors
    /// An invalid batch, one that does not start at the log end, or an I/O error.
    pub fn append_replica(&mut self, batch: &[u8], now_ms: i64) -> Result<AppendInfo, AppendError> {
        let header = validate(batch)?;
        if header.size_bytes() != batch.len() || header.record_count == 0 {
            return Err(AppendError::InconsistentBatch {
                reason: format!(
                    "a replicated batch of {} bytes says it has {} bytes and {} records",
                    batch.len(),
                    header.size_bytes(),
                    header.record_count
                ),
            });
        }
        let end = self.log_end_offset();
        if header.base_offset != end {
            return Err(AppendError::InconsistentBatch {
                reason: format!(
                    "a replicated batch starts at offset {} but the log ends at {end}",
                    header.base_offset
                ),
            });
        }
        self.maybe_roll(batch.len() as u64, now_ms)?;
        if header.leader_epoch >= 0 {
            self.epochs
                .assign(header.leader_epoch, header.base_offset)
                .map_err(|source| StorageError::io(&self.dir, source))?;
        }
        let (header_bytes, records) = batch.split_at(BATCH_HEADER_BYTES.min(batch.len()));
        self.active_mut().append(header_bytes, records, &header)?;
        self.record_batch(&header, batch, now_ms)?;
        self.unflushed_records += u64::from(header.record_count);
        Ok(AppendInfo {
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            log_append_time_ms: None,
            record_count: header.record_count,
            duplicate: false,
        })
    }

    /// Records that `epoch` starts at the log end (a leader taking over), so that a
    /// follower of the previous epoch learns where it ended before anything is written.
    ///
    /// # Errors
    /// I/O errors writing the epoch checkpoint.
    pub fn assign_epoch(&mut self, epoch: i32) -> Result<(), StorageError> {
        let end = self.log_end_offset();
        self.epochs
            .assign(epoch, end)
            .map_err(|source| StorageError::io(&self.dir, source))
    }

    /// The epoch of the last batch (or of the latest leader) in this log; -1 if none.
    pub fn latest_epoch(&self) -> i32 {
        self.epochs.latest_epoch().unwrap_or(-1)
    }

    fn maybe_roll(&mut self, incoming_bytes: u64, now_ms: i64) -> Result<(), StorageError> {
        let active = self.active();
        if active.size_bytes() == 0 {
            return Ok(());
        }
        let full = active.size_bytes() + incoming_bytes > self.config.segment_bytes;
        let old = active
            .first_timestamp_ms()
            .is_some_and(|first| now_ms.saturating_sub(first) >= self.config.segment_ms);
        if full || old { self.roll() } else { Ok(()) }
    }

    /// Seals the active segment and starts a new one at the log end offset.
    ///
    /// # Errors
    /// I/O errors.
    pub fn roll(&mut self) -> Result<(), StorageError> {
        let next = self.log_end_offset();
        if self.active().base_offset == next {
            return Ok(());
        }
        self.active_mut().seal()?;
        self.set_recovery_point(next)?;
        if !self.producers.is_empty() {
            self.snapshot_producers()?;
        }
        let segment = Segment::create(&self.dir, next, self.config.index_interval_bytes)
            .map_err(|source| StorageError::io(&self.dir, source))?;
        checkpoint::sync_dir(&self.dir).map_err(|source| StorageError::io(&self.dir, source))?;
        self.segments.insert(next, segment);
        Ok(())
    }

    fn set_recovery_point(&mut self, offset: i64) -> Result<(), StorageError> {
        let path = self.dir.join(RECOVERY_POINT_FILE);
        checkpoint::write_i64(&path, offset).map_err(|source| StorageError::io(&path, source))?;
        self.recovery_point = offset;
        Ok(())
    }

    fn set_log_start_offset(&mut self, offset: i64) -> Result<(), StorageError> {
        let path = self.dir.join(LOG_START_FILE);
        checkpoint::write_i64(&path, offset).map_err(|source| StorageError::io(&path, source))?;
        self.log_start_offset = offset;
        self.epochs
            .truncate_from_start(offset)
            .map_err(|source| StorageError::io(&self.dir, source))
    }

    /// Records appended since the last fsync.
    pub fn unflushed_records(&self) -> u64 {
        self.unflushed_records
    }

    /// Fsyncs the active segment.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        self.active_mut().flush()?;
        self.unflushed_records = 0;
        self.drop_behind();
        Ok(())
    }

    /// Prepares a flush of everything appended so far; see [`FlushHandle`].
    ///
    /// # Errors
    /// I/O errors writing index entries or duplicating the file handle.
    pub fn begin_flush(&mut self) -> Result<FlushHandle, StorageError> {
        let end_offset = self.log_end_offset();
        let records = self.unflushed_records;
        let path = self.active().log_path();
        let segment = self.active().base_offset;
        let (file, bytes) = self.active_mut().prepare_flush()?;
        Ok(FlushHandle {
            file,
            path,
            end_offset,
            records,
            segment,
            bytes,
        })
    }

    /// Records that `handle` was synced.
    pub fn complete_flush(&mut self, handle: &FlushHandle, now_ms: i64) {
        self.unflushed_records = self.unflushed_records.saturating_sub(handle.records);
        self.last_flush_ms = now_ms;
        if let Some(segment) = self.segments.get_mut(&handle.segment) {
            segment.flushed_to(handle.bytes);
        }
        self.drop_behind();
    }

    /// Drops log data that is on disk and more than `page.cache.bytes` behind the log end
    /// from the OS page cache, a megabyte or more at a time, except what readers are still
    /// reading: data from the lowest offset read in the last [`READ_MARK_PERIOD`] or two
    /// on stays. Freed pages are the first the kernel hands to the next writes, so a log
    /// that streams through keeps reusing the same memory; fresh memory costs much more
    /// than reused pages on a virtual machine that returns free memory to its host.
    /// Readers of dropped data read it from disk.
    fn drop_behind(&mut self) {
        const STEP_BYTES: u64 = 1024 * 1024;
        let Ok(window) = u64::try_from(self.config.page_cache_bytes) else {
            return;
        };
        // Where the slowest recent reader stands: its segment and a position at or
        // before its batch.
        let read = self.read_mark.floor().and_then(|offset| {
            let (base, segment) = self.segments.range(..=offset).next_back()?;
            Some((*base, segment.indexed_position(offset)))
        });
        let mut newer = 0u64;
        for (base, segment) in self.segments.iter_mut().rev() {
            let size = segment.size_bytes();
            let keep = window.saturating_sub(newer);
            newer = newer.saturating_add(size);
            if keep >= size {
                continue;
            }
            if keep == 0 && size > 0 && segment.all_dropped() {
                break;
            }
            let to = match read {
                Some((read_base, _)) if *base > read_base => continue,
                Some((read_base, position)) if *base == read_base => (size - keep).min(position),
                _ => size - keep,
            };
            segment.drop_cached(to, STEP_BYTES);
        }
    }

    /// Whether the [`FlushPolicy`] says unflushed appends must be synced now.
    pub fn flush_due(&self, now_ms: i64) -> bool {
        if self.unflushed_records == 0 {
            return false;
        }
        match self.config.flush {
            FlushPolicy::EveryAppend => true,
            FlushPolicy::Interval { messages, ms } => {
                self.unflushed_records >= messages
                    || now_ms.saturating_sub(self.last_flush_ms) >= ms
            }
        }
    }

    /// Flushes if the [`FlushPolicy`] says it is time. Returns whether it flushed.
    ///
    /// # Errors
    /// I/O errors.
    pub fn maybe_flush(&mut self, now_ms: i64) -> Result<bool, StorageError> {
        let due = self.flush_due(now_ms);
        if due {
            self.flush()?;
            self.last_flush_ms = now_ms;
        }
        Ok(due)
    }

    fn check_range(&self, offset: i64) -> Result<(), ReadError> {
        let end = self.log_end_offset();
        if offset < self.log_start_offset || offset > end {
            return Err(ReadError::OffsetOutOfRange {
                offset,
                log_start_offset: self.log_start_offset,
                log_end_offset: end,
            });
        }
        Ok(())
    }

    /// Whole batches from the one holding `offset`, at most `max_bytes` (at least one
    /// batch), none starting at or above `upper_bound` (the high watermark). The first
    /// batch may hold records below `offset`; consumers skip them. Empty at the log end.
    ///
    /// # Errors
    /// `offset` outside `[log start, log end]`, I/O errors, corrupt data.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
    ) -> Result<Vec<u8>, ReadError> {
        let mut out = BytesMut::new();
        self.read_into(offset, max_bytes, upper_bound, &mut out)?;
        Ok(out.to_vec())
    }

    /// Like [`Log::read`], appending to `out`, so that a caller can read into a buffer it
    /// reuses. Returns the bytes appended.
    ///
    /// # Errors
    /// As [`Log::read`].
    pub fn read_into(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        out: &mut BytesMut,
    ) -> Result<usize, ReadError> {
        self.read_mark.note(offset);
        self.read_unmarked(offset, max_bytes, upper_bound, out)
    }

    /// [`Log::read_into`] for the log's own reads, which keep nothing in the page cache.
    fn read_unmarked(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        out: &mut BytesMut,
    ) -> Result<usize, ReadError> {
        self.check_range(offset)?;
        for segment in self.segments_from(offset) {
            let read = segment.read_into(offset, max_bytes, upper_bound, out)?;
            if read > 0 {
                return Ok(read);
            }
        }
        Ok(0)
    }

    /// The segment that may hold `offset` and every one after it.
    fn segments_from(&self, offset: i64) -> impl Iterator<Item = &Segment> {
        let floor = self
            .segments
            .range(..=offset)
            .next_back()
            .map_or(i64::MIN, |(base, _)| *base);
        self.segments.range(floor..).map(|(_, s)| s)
    }

    /// The first offset whose record timestamp is `>= timestamp_ms`, or `None` if no record
    /// is that recent (a consumer then starts at the log end).
    ///
    /// # Errors
    /// I/O errors, corrupt data.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<i64>, StorageError> {
        for segment in self.segments.values() {
            if let Some(offset) = segment.offset_for_timestamp(timestamp_ms)? {
                return Ok(Some(offset.max(self.log_start_offset)));
            }
        }
        Ok(None)
    }

    /// Moves the log start offset forward to `offset` (Kafka's delete-records) and deletes
    /// segments that now lie wholly below it. Returns the new log start offset.
    ///
    /// # Errors
    /// `offset` beyond the log end, I/O errors.
    pub fn delete_records(&mut self, offset: i64) -> Result<i64, ReadError> {
        let end = self.log_end_offset();
        if offset > end || offset < 0 {
            return Err(ReadError::OffsetOutOfRange {
                offset,
                log_start_offset: self.log_start_offset,
                log_end_offset: end,
            });
        }
        if offset > self.log_start_offset {
            self.set_log_start_offset(offset)?;
            self.delete_segments_below_start()?;
            self.aborted.trim(offset)?;
        }
        Ok(self.log_start_offset)
    }

    fn delete_segments_below_start(&mut self) -> Result<usize, StorageError> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let mut bases = self.segments.keys();
            let (Some(&first), Some(&second)) = (bases.next(), bases.next()) else {
                break;
            };
            if second > self.log_start_offset {
                break;
            }
            self.delete_segment(first)?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn delete_segment(&mut self, base: i64) -> Result<(), StorageError> {
        if let Some(segment) = self.segments.remove(&base) {
            let path = segment.log_path();
            segment
                .delete()
                .map_err(|source| StorageError::io(&path, source))?;
        }
        Ok(())
    }

    /// Deletes old segments by `retention.ms` and `retention.bytes` when the cleanup
    /// policy includes `delete`. The active segment is never deleted. Returns how many
    /// segments were deleted. Forgets the idempotent producers idle for
    /// [`crate::producers::PRODUCER_EXPIRATION_MS`] too.
    ///
    /// # Errors
    /// I/O errors.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<usize, StorageError> {
        self.producers
            .expire(now_ms, crate::producers::PRODUCER_EXPIRATION_MS);
        if !self.config.cleanup_policy.delete {
            return Ok(0);
        }
        let mut total: u64 = self.segments.values().map(Segment::size_bytes).sum();
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let Some(first) = self.segments.values().next() else {
                break;
            };
            let expired_by_time = self.config.retention_ms >= 0
                && now_ms.saturating_sub(first.max_timestamp_ms()) > self.config.retention_ms;
            let expired_by_size = self.config.retention_bytes >= 0
                && total - first.size_bytes() >= self.config.retention_bytes as u64;
            if !(expired_by_time || expired_by_size) {
                break;
            }
            total -= first.size_bytes();
            let base = first.base_offset;
            self.delete_segment(base)?;
            deleted += 1;
        }
        if deleted > 0 {
            let first_base = self.first_segment().base_offset;
            if first_base > self.log_start_offset {
                self.set_log_start_offset(first_base)?;
            }
        }
        let deleted = deleted + self.delete_segments_below_start()?;
        self.aborted.trim(self.log_start_offset)?;
        Ok(deleted)
    }

    /// Removes every record at or after `offset` (whole batches: the end offset becomes
    /// the base offset of the batch holding `offset`, or `offset` at a batch boundary).
    /// Replicas use this when they follow a new leader.
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncate_to(&mut self, offset: i64) -> Result<(), StorageError> {
        if offset >= self.log_end_offset() {
            // No record goes, but an epoch that starts here holds none either (a leader
            // that wrote nothing): it goes, or the replica would keep naming it as its
            // latest epoch and its leader would keep answering with the same divergence.
            return self
                .epochs
                .truncate_from_end(offset)
                .map_err(|source| StorageError::io(&self.dir, source));
        }
        if offset <= self.log_start_offset {
            self.reset_to(offset)?;
        } else {
            let doomed: Vec<i64> = self.segments.range(offset..).map(|(b, _)| *b).collect();
            for base in doomed {
                self.delete_segment(base)?;
            }
            if self.segments.is_empty() {
                // Every segment began at or after the cut: compaction had left the range
                // from the log start up to it without records. The log goes on, empty,
                // from the cut; its start stays where it was.
                let segment = Segment::create(&self.dir, offset, self.config.index_interval_bytes)
                    .map_err(|source| StorageError::io(&self.dir, source))?;
                self.segments.insert(offset, segment);
            }
            self.active_mut().truncate_to(offset)?;
            // The batch holding `offset` may have started below the log start.
            if self.log_end_offset() < self.log_start_offset {
                self.reset_to(self.log_start_offset)?;
            }
        }
        checkpoint::sync_dir(&self.dir).map_err(|source| StorageError::io(&self.dir, source))?;
        let end = self.log_end_offset();
        if self.recovery_point > end {
            self.set_recovery_point(end)?;
        }
        self.epochs
            .truncate_from_end(end)
            .map_err(|source| StorageError::io(&self.dir, source))?;
        self.aborted.truncate(end)?;
        self.rebuild_producers()
    }

    /// Deletes every segment and starts empty at `offset` (a replica whose leader's log
    /// starts beyond its end).
    ///
    /// # Errors
    /// I/O errors.
    pub fn reset_to(&mut self, offset: i64) -> Result<(), StorageError> {
        let bases: Vec<i64> = self.segments.keys().copied().collect();
        for base in bases {
            self.delete_segment(base)?;
        }
        let segment = Segment::create(&self.dir, offset, self.config.index_interval_bytes)
            .map_err(|source| StorageError::io(&self.dir, source))?;
        self.segments.insert(offset, segment);
        // Nothing of the old log stays, and neither does what was known of its producers.
        self.producers.clear();
        self.aborted.clear()?;
        let snapshot = self.dir.join(PRODUCER_SNAPSHOT_FILE);
        if snapshot.exists() {
            fs::remove_file(&snapshot).map_err(|source| StorageError::io(&snapshot, source))?;
        }
        self.set_log_start_offset(offset)
    }

    /// Flushes everything and records a clean shutdown, so the next open trusts the log.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(mut self) -> Result<(), StorageError> {
        self.active_mut().seal()?;
        let end = self.log_end_offset();
        if !self.producers.is_empty() {
            self.snapshot_producers()?;
        }
        self.set_recovery_point(end)
    }

    pub(crate) fn replace_segment(&mut self, segment: Segment) {
        self.segments.insert(segment.base_offset, segment);
    }

    pub(crate) fn remove_segment(&mut self, base: i64) -> Result<(), StorageError> {
        self.delete_segment(base)
    }
}
