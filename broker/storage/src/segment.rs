//! One segment: a log file of whole batches and its two sparse indexes.
//!
//! Files, named by the segment's base offset padded to 20 digits:
//! - `<base>.log`: batches back to back, exactly as validated and stamped on append.
//! - `<base>.index`: 8-byte entries, big-endian `u32` offset relative to the base and `u32`
//!   byte position of the batch that starts there; one entry every `index.interval.bytes`.
//! - `<base>.timeindex`: 12-byte entries, big-endian `i64` largest timestamp seen up to and
//!   including the indexed batch, and its `u32` relative offset.
//!
//! The indexes of the active segment live in memory and reach disk on flush; a sealed
//! segment has both files complete and fsynced. An index is only ever an accelerator: when
//! it is missing, short or inconsistent it is rebuilt from the log file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::BytesMut;

use runnel_batch::{
    BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, BatchError, BatchHeader, parse_header,
    peek_offset_and_size, validate,
};

use crate::StorageError;

const OFFSET_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 12;
/// The page size that page-cache advice is rounded to.
const PAGE_BYTES: u64 = 4096;
/// Bytes read at once when scanning a segment from disk.
const SCAN_CHUNK_BYTES: usize = 8 * 1024 * 1024;

pub(crate) fn file_stem(base_offset: i64) -> String {
    format!("{base_offset:020}")
}

pub(crate) fn log_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{}.log", file_stem(base_offset)))
}

fn offset_index_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{}.index", file_stem(base_offset)))
}

fn time_index_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{}.timeindex", file_stem(base_offset)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OffsetEntry {
    relative_offset: u32,
    position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeEntry {
    timestamp_ms: i64,
    relative_offset: u32,
}

/// How much of a segment to trust when opening it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpenMode {
    /// Sealed or cleanly closed: trust the log file, check the indexes, fix them if needed.
    Trusted,
    /// Possibly cut short by a crash: verify every batch's CRC. An invalid batch may be
    /// truncated away only if it starts at or after `recovery_point` and no valid batch
    /// follows it; anything else is corruption and fails the open.
    Recover { recovery_point: i64 },
}

/// What recovery did to a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    pub path: PathBuf,
    pub position: u64,
    pub bytes_removed: u64,
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: i64,
    dir: PathBuf,
    file: File,
    size_bytes: u64,
    next_offset: i64,
    max_timestamp_ms: i64,
    first_timestamp_ms: Option<i64>,
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
    offsets_persisted: usize,
    times_persisted: usize,
    bytes_since_index: u64,
    index_interval_bytes: u64,
    /// The index files on disk do not match a prefix of the in-memory entries.
    index_files_stale: bool,
    /// Bytes of the log file known to be on disk (fsynced, or there when it was opened).
    flushed_bytes: u64,
    /// The page cache was told to drop the log file's pages below this position.
    dropped_bytes: u64,
}

impl Segment {
    pub(crate) fn create(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u64,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(log_path(dir, base_offset))?;
        for path in [
            offset_index_path(dir, base_offset),
            time_index_path(dir, base_offset),
        ] {
            File::create(path)?;
        }
        Ok(Self::empty(dir, base_offset, file, index_interval_bytes))
    }

    fn empty(dir: &Path, base_offset: i64, file: File, index_interval_bytes: u64) -> Self {
        Segment {
            base_offset,
            dir: dir.to_path_buf(),
            file,
            size_bytes: 0,
            next_offset: base_offset,
            max_timestamp_ms: -1,
            first_timestamp_ms: None,
            offsets: Vec::new(),
            times: Vec::new(),
            offsets_persisted: 0,
            times_persisted: 0,
            bytes_since_index: 0,
            index_interval_bytes,
            index_files_stale: false,
            flushed_bytes: 0,
            dropped_bytes: 0,
        }
    }

    /// Opens an existing segment. Returns what recovery truncated, if anything.
    ///
    /// # Errors
    /// I/O errors, and [`StorageError::Corrupt`] for damage that may not be truncated.
    pub(crate) fn open(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u64,
        mode: OpenMode,
    ) -> Result<(Self, Option<TruncatedTail>), StorageError> {
        let path = log_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|source| StorageError::io(&path, source))?;
        let size_bytes = file
            .metadata()
            .map_err(|source| StorageError::io(&path, source))?
            .len();
        let mut segment = Self::empty(dir, base_offset, file, index_interval_bytes);
        segment.size_bytes = size_bytes;
        segment.flushed_bytes = size_bytes;
        match mode {
            OpenMode::Trusted => {
                segment.open_trusted()?;
                if segment.index_files_stale
                    || segment.offsets_persisted < segment.offsets.len()
                    || segment.times_persisted < segment.times.len()
                {
                    segment.persist_indexes(true)?;
                }
                Ok((segment, None))
            }
            OpenMode::Recover { recovery_point } => {
                let truncated = segment.recover(recovery_point)?;
                segment.persist_indexes(true)?;
                Ok((segment, truncated))
            }
        }
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub(crate) fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub(crate) fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms
    }

    /// Timestamp of the first batch; the age that `segment.ms` measures.
    pub(crate) fn first_timestamp_ms(&self) -> Option<i64> {
        self.first_timestamp_ms
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        log_path(&self.dir, self.base_offset)
    }

    fn corrupt(&self, position: u64, source: BatchError) -> StorageError {
        StorageError::Corrupt {
            path: self.log_path(),
            position,
            reason: source.to_string(),
        }
    }

    fn io_error(&self, source: io::Error) -> StorageError {
        StorageError::io(&self.log_path(), source)
    }

    /// Appends a validated batch given as its stamped header and its records, in one
    /// vectored write when the kernel takes it all (a short write is completed).
    pub(crate) fn append(
        &mut self,
        header_bytes: &[u8],
        records: &[u8],
        header: &BatchHeader,
    ) -> Result<(), StorageError> {
        let position = self.size_bytes;
        let total = header_bytes.len() + records.len();
        let written = (&self.file)
            .write_vectored(&[io::IoSlice::new(header_bytes), io::IoSlice::new(records)])
            .map_err(|source| self.io_error(source))?;
        if written < total {
            let rest_header = header_bytes.get(written..).unwrap_or_default();
            let rest_records = records
                .get(written.saturating_sub(header_bytes.len())..)
                .unwrap_or_default();
            (&self.file)
                .write_all(rest_header)
                .and_then(|()| (&self.file).write_all(rest_records))
                .map_err(|source| self.io_error(source))?;
        }
        self.size_bytes += total as u64;
        self.note_batch(position, header);
        Ok(())
    }

    /// Updates in-memory state and index entries for a batch at `position`.
    fn note_batch(&mut self, position: u64, header: &BatchHeader) {
        let relative_offset = (header.base_offset - self.base_offset) as u32;
        self.first_timestamp_ms
            .get_or_insert(header.max_timestamp_ms);
        self.max_timestamp_ms = self.max_timestamp_ms.max(header.max_timestamp_ms);
        if self.offsets.is_empty() || self.bytes_since_index >= self.index_interval_bytes {
            self.offsets.push(OffsetEntry {
                relative_offset,
                position: position as u32,
            });
            let last_ts = self.times.last().map_or(i64::MIN, |t| t.timestamp_ms);
            if self.max_timestamp_ms > last_ts {
                self.times.push(TimeEntry {
                    timestamp_ms: self.max_timestamp_ms,
                    relative_offset,
                });
            }
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += u64::from(header.batch_length) + BATCH_LENGTH_PREFIX_BYTES as u64;
        self.next_offset = header.next_offset();
    }

    /// Writes index entries not yet on disk and fsyncs the log file.
    pub(crate) fn flush(&mut self) -> Result<(), StorageError> {
        self.persist_indexes(false)?;
        self.file
            .sync_data()
            .map_err(|source| self.io_error(source))?;
        self.flushed_bytes = self.size_bytes;
        Ok(())
    }

    /// Writes pending index entries and returns a second handle on the log file, so that
    /// the caller can fsync without holding the log, and the size that fsync will cover.
    pub(crate) fn prepare_flush(&mut self) -> Result<(File, u64), StorageError> {
        self.persist_indexes(false)?;
        let file = self
            .file
            .try_clone()
            .map_err(|source| self.io_error(source))?;
        Ok((file, self.size_bytes))
    }

    /// Records that the first `bytes` of the log file were fsynced by a prepared flush.
    pub(crate) fn flushed_to(&mut self, bytes: u64) {
        self.flushed_bytes = self.flushed_bytes.max(bytes.min(self.size_bytes));
    }

    /// Flushes and also fsyncs the index files: after this the segment opens `Trusted`.
    pub(crate) fn seal(&mut self) -> Result<(), StorageError> {
        self.persist_indexes(true)?;
        self.file
            .sync_all()
            .map_err(|source| self.io_error(source))?;
        self.flushed_bytes = self.size_bytes;
        Ok(())
    }

    /// Whether the page cache was told to drop all of the log file.
    pub(crate) fn all_dropped(&self) -> bool {
        self.dropped_bytes == self.size_bytes
    }

    /// Asks the kernel to drop the log file's cached pages below `to`, as far as they are
    /// on disk, and only when at least `step` bytes (or the rest of the file) would go.
    /// Advice only: a kernel that ignores or refuses it leaves the pages cached, which
    /// costs memory, never data.
    pub(crate) fn drop_cached(&mut self, to: u64, step: u64) {
        let to = to.min(self.flushed_bytes);
        let whole = to == self.size_bytes;
        let to = if whole {
            to
        } else {
            to / PAGE_BYTES * PAGE_BYTES
        };
        if to <= self.dropped_bytes || (to - self.dropped_bytes < step && !whole) {
            return;
        }
        let from = self.dropped_bytes;
        let _refused = rustix::fs::fadvise(
            &self.file,
            from,
            std::num::NonZeroU64::new(to - from),
            rustix::fs::Advice::DontNeed,
        );
        self.dropped_bytes = to;
    }

    fn persist_indexes(&mut self, sync: bool) -> Result<(), StorageError> {
        let offset_path = offset_index_path(&self.dir, self.base_offset);
        let time_path = time_index_path(&self.dir, self.base_offset);
        let mut offset_bytes = Vec::new();
        for entry in &self.offsets[self.offsets_persisted..] {
            offset_bytes.extend_from_slice(&entry.relative_offset.to_be_bytes());
            offset_bytes.extend_from_slice(&entry.position.to_be_bytes());
        }
        let mut time_bytes = Vec::new();
        for entry in &self.times[self.times_persisted..] {
            time_bytes.extend_from_slice(&entry.timestamp_ms.to_be_bytes());
            time_bytes.extend_from_slice(&entry.relative_offset.to_be_bytes());
        }
        let rewrite = self.index_files_stale;
        for (path, bytes) in [(&offset_path, offset_bytes), (&time_path, time_bytes)] {
            if bytes.is_empty() && !rewrite && !sync {
                continue;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(!rewrite)
                .write(true)
                .truncate(rewrite)
                .open(path)
                .map_err(|source| StorageError::io(path, source))?;
            file.write_all(&bytes)
                .map_err(|source| StorageError::io(path, source))?;
            if sync {
                file.sync_all()
                    .map_err(|source| StorageError::io(path, source))?;
            }
        }
        self.offsets_persisted = self.offsets.len();
        self.times_persisted = self.times.len();
        self.index_files_stale = false;
        Ok(())
    }

    /// Opens trusting the log: loads the indexes, checks them against the log, rebuilds
    /// what does not match, then reads the batches after the last indexed ones.
    fn open_trusted(&mut self) -> Result<(), StorageError> {
        let offsets = self.load_offset_index();
        let times = self.load_time_index();
        match (offsets, times) {
            (Some(offsets), Some(times)) if !offsets.is_empty() => {
                let last_time_position = match times.last() {
                    Some(t) => match self.lookup(&offsets, t.relative_offset)? {
                        Some(position) => position,
                        None => return self.rebuild_by_scan(),
                    },
                    None => 0,
                };
                let from =
                    u64::from(offsets.last().map_or(0, |e| e.position)).min(last_time_position);
                self.offsets = offsets;
                self.times = times;
                self.offsets_persisted = self.offsets.len();
                self.times_persisted = self.times.len();
                self.first_timestamp_ms = self.read_header_at(0).ok().map(|h| h.max_timestamp_ms);
                self.max_timestamp_ms = self.times.last().map_or(-1, |t| t.timestamp_ms);
                // Re-scan from `from`: entries already present are kept, later ones added.
                let keep_offsets = self
                    .offsets
                    .iter()
                    .filter(|e| u64::from(e.position) < from)
                    .count();
                if keep_offsets < self.offsets.len() {
                    self.offsets.truncate(keep_offsets);
                    self.offsets_persisted = 0;
                    self.times_persisted = 0;
                    self.index_files_stale = true;
                }
                self.bytes_since_index = self.index_interval_bytes;
                self.scan_headers_from(from)
            }
            _ => self.rebuild_by_scan(),
        }
    }

    fn rebuild_by_scan(&mut self) -> Result<(), StorageError> {
        self.reset_indexes();
        self.scan_headers_from(0)
    }

    fn reset_indexes(&mut self) {
        self.offsets.clear();
        self.times.clear();
        self.offsets_persisted = 0;
        self.times_persisted = 0;
        self.index_files_stale = true;
        self.bytes_since_index = 0;
        self.next_offset = self.base_offset;
        self.max_timestamp_ms = -1;
        self.first_timestamp_ms = None;
    }

    /// Reads batch headers from `from` to the end, noting each batch. A bad header in a
    /// trusted segment is corruption.
    fn scan_headers_from(&mut self, from: u64) -> Result<(), StorageError> {
        let mut position = from;
        while position < self.size_bytes {
            let header = self.read_header_at(position)?;
            if header.base_offset < self.next_offset && position != from {
                return Err(self.corrupt(
                    position,
                    BatchError::InvalidHeader {
                        reason: "base offset goes backwards",
                    },
                ));
            }
            let size = header.size_bytes() as u64;
            if position + size > self.size_bytes {
                return Err(self.corrupt(
                    position,
                    BatchError::Truncated {
                        needed_bytes: size as usize,
                        available_bytes: (self.size_bytes - position) as usize,
                    },
                ));
            }
            self.note_batch(position, &header);
            position += size;
        }
        Ok(())
    }

    fn read_header_at(&self, position: u64) -> Result<BatchHeader, StorageError> {
        let available = self
            .size_bytes
            .saturating_sub(position)
            .min(BATCH_HEADER_BYTES as u64);
        let mut buf = vec![0u8; available as usize];
        self.file
            .read_exact_at(&mut buf, position)
            .map_err(|source| self.io_error(source))?;
        parse_header(&buf).map_err(|source| self.corrupt(position, source))
    }

    fn load_offset_index(&self) -> Option<Vec<OffsetEntry>> {
        let bytes = fs::read(offset_index_path(&self.dir, self.base_offset)).ok()?;
        if bytes.len() % OFFSET_ENTRY_BYTES != 0 {
            return None;
        }
        let mut entries: Vec<OffsetEntry> = Vec::with_capacity(bytes.len() / OFFSET_ENTRY_BYTES);
        for chunk in bytes.chunks_exact(OFFSET_ENTRY_BYTES) {
            let entry = OffsetEntry {
                relative_offset: u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
                position: u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
            };
            let increasing = entries.last().is_none_or(|prev| {
                prev.relative_offset < entry.relative_offset && prev.position < entry.position
            });
            if !increasing || u64::from(entry.position) >= self.size_bytes {
                return None;
            }
            entries.push(entry);
        }
        // Every entry must point at a batch starting at the offset it names; checking the
        // first and last catches a stale or shifted file without reading them all.
        for entry in [entries.first(), entries.last()].into_iter().flatten() {
            let header = self.read_header_at(u64::from(entry.position)).ok()?;
            if header.base_offset != self.base_offset + i64::from(entry.relative_offset) {
                return None;
            }
        }
        Some(entries)
    }

    fn load_time_index(&self) -> Option<Vec<TimeEntry>> {
        let bytes = fs::read(time_index_path(&self.dir, self.base_offset)).ok()?;
        if bytes.len() % TIME_ENTRY_BYTES != 0 {
            return None;
        }
        let mut entries: Vec<TimeEntry> = Vec::with_capacity(bytes.len() / TIME_ENTRY_BYTES);
        for chunk in bytes.chunks_exact(TIME_ENTRY_BYTES) {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&chunk[..8]);
            let entry = TimeEntry {
                timestamp_ms: i64::from_be_bytes(ts),
                relative_offset: u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]),
            };
            let increasing = entries.last().is_none_or(|prev| {
                prev.timestamp_ms < entry.timestamp_ms
                    && prev.relative_offset < entry.relative_offset
            });
            if !increasing {
                return None;
            }
            entries.push(entry);
        }
        Some(entries)
    }

    /// Position of the batch starting exactly at `relative_offset`, found through `index`.
    fn lookup(
        &self,
        index: &[OffsetEntry],
        relative_offset: u32,
    ) -> Result<Option<u64>, StorageError> {
        let floor = index.partition_point(|e| e.relative_offset <= relative_offset);
        let mut position = floor
            .checked_sub(1)
            .map_or(0, |i| u64::from(index[i].position));
        let target = self.base_offset + i64::from(relative_offset);
        while position < self.size_bytes {
            let header = self.read_header_at(position)?;
            if header.base_offset == target {
                return Ok(Some(position));
            }
            if header.base_offset > target {
                return Ok(None);
            }
            position += header.size_bytes() as u64;
        }
        Ok(None)
    }

    /// Verifies every batch from the start, rebuilding the indexes, and truncates an
    /// invalid tail when that is safe (see [`OpenMode::Recover`]).
    fn recover(&mut self, recovery_point: i64) -> Result<Option<TruncatedTail>, StorageError> {
        self.reset_indexes();
        let file = self
            .file
            .try_clone()
            .map_err(|source| self.io_error(source))?;
        let mut reader = ChunkReader::new(&file, self.size_bytes);
        let mut position = 0u64;
        let mut failure = None;
        while position < self.size_bytes {
            match reader
                .batch_at(position)
                .map_err(|source| self.io_error(source))?
            {
                Ok(bytes) => match validate(bytes) {
                    Ok(header) if header.base_offset >= self.next_offset => {
                        let size = header.size_bytes() as u64;
                        self.note_batch(position, &header);
                        position += size;
                    }
                    Ok(_) => {
                        failure = Some("base offset goes backwards".to_string());
                        break;
                    }
                    Err(err) => {
                        failure = Some(err.to_string());
                        break;
                    }
                },
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            }
        }
        let Some(reason) = failure else {
            return Ok(None);
        };
        if self.next_offset < recovery_point {
            return Err(StorageError::Corrupt {
                path: self.log_path(),
                position,
                reason: format!("{reason} (inside data flushed before the last clean checkpoint)"),
            });
        }
        if let Some(valid_at) = self.find_valid_batch_after(position)? {
            return Err(StorageError::Corrupt {
                path: self.log_path(),
                position,
                reason: format!(
                    "{reason}; a valid batch follows at position {valid_at}, so this is not a torn write"
                ),
            });
        }
        let bytes_removed = self.size_bytes - position;
        self.file
            .set_len(position)
            .and_then(|()| self.file.sync_all())
            .map_err(|source| self.io_error(source))?;
        self.size_bytes = position;
        self.flushed_bytes = position;
        Ok(Some(TruncatedTail {
            path: self.log_path(),
            position,
            bytes_removed,
            reason,
        }))
    }

    /// Looks for any well-formed batch with a plausible offset after a damaged one.
    fn find_valid_batch_after(&self, damaged_at: u64) -> Result<Option<u64>, StorageError> {
        let start = damaged_at + 1;
        if start >= self.size_bytes {
            return Ok(None);
        }
        let mut rest = vec![0u8; (self.size_bytes - start) as usize];
        self.file
            .read_exact_at(&mut rest, start)
            .map_err(|source| self.io_error(source))?;
        for at in 0..rest.len() {
            let candidate = &rest[at..];
            if candidate.get(16) != Some(&(runnel_batch::MAGIC as u8)) {
                continue;
            }
            if let Ok(header) = validate(candidate)
                && header.base_offset >= self.next_offset
            {
                return Ok(Some(start + at as u64));
            }
        }
        Ok(None)
    }

    /// Position of the first batch whose last offset is `>= offset`, if any.
    pub(crate) fn find(&self, offset: i64) -> Result<Option<(u64, BatchHeader)>, StorageError> {
        let mut position = self.indexed_position(offset);
        while position < self.size_bytes {
            let header = self.read_header_at(position)?;
            if header.last_offset() >= offset {
                return Ok(Some((position, header)));
            }
            position += header.size_bytes() as u64;
        }
        Ok(None)
    }

    /// The position of the last indexed batch at or below `offset`: at or before the
    /// batch holding it, found without reading the file.
    pub(crate) fn indexed_position(&self, offset: i64) -> u64 {
        let relative = (offset - self.base_offset).clamp(0, i64::from(u32::MAX)) as u32;
        let floor = self
            .offsets
            .partition_point(|e| e.relative_offset <= relative);
        floor
            .checked_sub(1)
            .map_or(0, |i| u64::from(self.offsets[i].position))
    }

    /// Whole batches starting with the one that holds `offset` (or the first after it),
    /// up to `max_bytes` (but always at least one batch) and only batches whose base offset
    /// is below `upper_bound`, appended to `out`. Returns the bytes appended. Every batch
    /// returned has had its CRC verified.
    pub(crate) fn read_into(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        out: &mut BytesMut,
    ) -> Result<usize, StorageError> {
        let Some((start, first)) = self.find(offset)? else {
            return Ok(0);
        };
        if first.base_offset >= upper_bound {
            return Ok(0);
        }
        let want = (self.size_bytes - start).min(max_bytes.max(first.size_bytes()) as u64) as usize;
        let at = out.len();
        out.resize(at + want, 0);
        let buf = &mut out[at..];
        self.file
            .read_exact_at(buf, start)
            .map_err(|source| self.io_error(source))?;
        let mut end = 0usize;
        while end < buf.len() {
            let Ok((base_offset, size)) = peek_offset_and_size(&buf[end..]) else {
                break;
            };
            if end + size > buf.len() || base_offset >= upper_bound {
                break;
            }
            validate(&buf[end..end + size])
                .map_err(|source| self.corrupt(start + end as u64, source))?;
            end += size;
        }
        out.truncate(at + end);
        Ok(end)
    }

    /// First offset in this segment whose record timestamp is `>= timestamp_ms`.
    pub(crate) fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, StorageError> {
        if self.max_timestamp_ms < timestamp_ms {
            return Ok(None);
        }
        let below = self
            .times
            .partition_point(|t| t.timestamp_ms < timestamp_ms);
        let from = below.checked_sub(1).map_or(self.base_offset, |i| {
            self.base_offset + i64::from(self.times[i].relative_offset)
        });
        let mut position = match self.find(from)? {
            Some((position, _)) => position,
            None => return Ok(None),
        };
        while position < self.size_bytes {
            let header = self.read_header_at(position)?;
            if header.max_timestamp_ms >= timestamp_ms {
                let mut buf = vec![0u8; header.size_bytes()];
                self.file
                    .read_exact_at(&mut buf, position)
                    .map_err(|source| self.io_error(source))?;
                let records = runnel_batch::decode_records(&buf)
                    .map_err(|source| self.corrupt(position, source))?;
                let found = records.iter().find(|r| r.timestamp_ms >= timestamp_ms);
                return Ok(Some(found.map_or(header.base_offset, |r| r.offset)));
            }
            position += header.size_bytes() as u64;
        }
        Ok(None)
    }

    /// Cuts the segment before the first batch whose last offset is `>= offset`.
    pub(crate) fn truncate_to(&mut self, offset: i64) -> Result<(), StorageError> {
        let Some((position, _)) = self.find(offset)? else {
            return Ok(());
        };
        self.file
            .set_len(position)
            .map_err(|source| self.io_error(source))?;
        self.size_bytes = position;
        self.flushed_bytes = self.flushed_bytes.min(position);
        self.dropped_bytes = self.dropped_bytes.min(position);
        self.rebuild_by_scan()?;
        self.persist_indexes(true)
    }

    /// Every batch of the segment in order, read in chunks. For compaction.
    pub(crate) fn for_each_batch(
        &self,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut reader = ChunkReader::new(&self.file, self.size_bytes);
        let mut position = 0u64;
        while position < self.size_bytes {
            let bytes = reader
                .batch_at(position)
                .map_err(|source| self.io_error(source))?
                .map_err(|source| self.corrupt(position, source))?;
            validate(bytes).map_err(|source| self.corrupt(position, source))?;
            let size = bytes.len() as u64;
            visit(position, bytes)?;
            position += size;
        }
        Ok(())
    }

    /// Deletes the segment's three files.
    pub(crate) fn delete(self) -> io::Result<()> {
        let (dir, base) = (self.dir.clone(), self.base_offset);
        drop(self);
        for path in [
            log_path(&dir, base),
            offset_index_path(&dir, base),
            time_index_path(&dir, base),
        ] {
            match fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    /// Names of the files a segment at `base_offset` writes to, with `suffix` appended;
    /// used to build a replacement segment next to the live one.
    pub(crate) fn paths_with_suffix(dir: &Path, base_offset: i64, suffix: &str) -> [PathBuf; 3] {
        let with = |p: PathBuf| {
            let mut s = p.into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        [
            with(log_path(dir, base_offset)),
            with(offset_index_path(dir, base_offset)),
            with(time_index_path(dir, base_offset)),
        ]
    }

    pub(crate) fn paths(dir: &Path, base_offset: i64) -> [PathBuf; 3] {
        [
            log_path(dir, base_offset),
            offset_index_path(dir, base_offset),
            time_index_path(dir, base_offset),
        ]
    }
}

/// Reads a file front to back in large chunks, handing out whole batches.
struct ChunkReader<'a> {
    file: &'a File,
    end: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'a> ChunkReader<'a> {
    fn new(file: &'a File, end: u64) -> Self {
        ChunkReader {
            file,
            end,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    /// Bytes `[position, position + len)`, or `None` when the file ends first.
    fn get(&mut self, position: u64, len: usize) -> io::Result<Option<&[u8]>> {
        if position + len as u64 > self.end {
            return Ok(None);
        }
        let in_buf = position >= self.buf_start
            && position + len as u64 <= self.buf_start + self.buf.len() as u64;
        if !in_buf {
            let want = (self.end - position).min(len.max(SCAN_CHUNK_BYTES) as u64) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, position)?;
            self.buf_start = position;
        }
        let from = (position - self.buf_start) as usize;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// The batch at `position` as far as its length field says, or why it cannot be read.
    fn batch_at(&mut self, position: u64) -> io::Result<Result<&[u8], BatchError>> {
        let available = (self.end - position) as usize;
        let prefix = match self.get(position, BATCH_LENGTH_PREFIX_BYTES.min(available))? {
            Some(prefix) => prefix,
            None => return Ok(Err(truncated(BATCH_LENGTH_PREFIX_BYTES, available))),
        };
        let size = match peek_offset_and_size(prefix) {
            Ok((_, size)) => size,
            Err(err) => return Ok(Err(err)),
        };
        match self.get(position, size)? {
            Some(bytes) => Ok(Ok(bytes)),
            None => Ok(Err(truncated(size, available))),
        }
    }
}

fn truncated(needed_bytes: usize, available_bytes: usize) -> BatchError {
    BatchError::Truncated {
        needed_bytes,
        available_bytes,
    }
}
