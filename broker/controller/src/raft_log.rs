//! The controller's Raft log on disk.
//!
//! One append-only file, `raft.log`, of framed records: `[length u32 LE][crc32c u32 LE]
//! [JSON]`. A record is a log entry, a truncation (entries from an index on are gone) or a
//! purge (entries up to a log id are gone, covered by a snapshot). Opening replays the
//! file; a torn last frame (a crash mid-append) is cut off, any other damage fails the
//! open. After a purge the file is rewritten with only what is left, through a temporary
//! file and a rename. The vote lives in `vote.json` and the committed log id in
//! `committed.json`, each replaced atomically.
//!
//! **Invariant:** `append` calls back only after the entries are fsynced; the vote is
//! fsynced before `save_vote` returns.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::{Deserialize, Serialize};

use crate::{NodeId, TypeConfig};

/// Largest frame accepted when reading the file back.
const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The file is rewritten after a purge once it holds this much more than needed.
const REWRITE_BYTES_MIN: u64 = 1024 * 1024;

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Entry(Entry<TypeConfig>),
    Truncate { from: u64 },
    Purge { upto: LogId<NodeId> },
}

struct LogInner {
    dir: PathBuf,
    file: File,
    file_bytes: u64,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

/// The log store handed to openraft; clones share one log.
#[derive(Clone)]
pub struct RaftLog {
    inner: Arc<Mutex<LogInner>>,
}

fn io_err(err: &io::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(openraft::AnyError::new(err)).into()
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {err}", path.display()),
            )
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

fn frame(record: &LogRecord) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(record)?;
    let mut out = Vec::with_capacity(json.len() + 8);
    let length = u32::try_from(json.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record too large"))?;
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parses every frame of `bytes`. Returns the records and the length of the valid
/// prefix; only a damaged *last* frame is tolerated (a torn append).
fn parse_frames(bytes: &[u8], path: &Path) -> io::Result<(Vec<LogRecord>, usize)> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 8);
        let parsed = header.and_then(|h| {
            let length = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if length > FRAME_BYTES_MAX {
                return None;
            }
            let body = bytes.get(at + 8..at + 8 + length)?;
            (crc32c::crc32c(body) == crc).then_some((length, body))
        });
        match parsed {
            Some((length, body)) => {
                let record: LogRecord = serde_json::from_slice(body).map_err(|err| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} at byte {at}: {err}", path.display()),
                    )
                })?;
                records.push(record);
                at += 8 + length;
            }
            None => {
                // A torn tail has no valid frame after it. Damage followed by more data is
                // corruption, and the controller must not guess.
                let rest = &bytes[at..];
                if has_frame_after(rest) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is damaged at byte {at} and has data after the damage; restore this controller from a peer (remove its metadata directory and restart it)",
                            path.display()
                        ),
                    ));
                }
                return Ok((records, at));
            }
        }
    }
    Ok((records, at))
}

fn has_frame_after(rest: &[u8]) -> bool {
    (1..rest.len().saturating_sub(8)).any(|skip| {
        let h = &rest[skip..skip + 8];
        let length = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        length > 0
            && rest
                .get(skip + 8..skip + 8 + length)
                .is_some_and(|body| crc32c::crc32c(body) == crc)
    })
}

impl RaftLog {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// I/O errors, or a log damaged anywhere but its last frame.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("raft.log");
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let (records, valid) = parse_frames(&bytes, &path)?;
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        for record in records {
            match record {
                LogRecord::Entry(entry) => {
                    entries.insert(entry.log_id.index, entry);
                }
                LogRecord::Truncate { from } => {
                    entries.split_off(&from);
                }
                LogRecord::Purge { upto } => {
                    entries = entries.split_off(&(upto.index + 1));
                    last_purged = Some(upto);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if valid < bytes.len() {
            tracing::warn!(path = %path.display(), bytes_removed = bytes.len() - valid, "cut a torn record off the controller log");
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok(RaftLog {
            inner: Arc::new(Mutex::new(LogInner {
                vote: read_json(&dir.join("vote.json"))?,
                // Written without fsync: a lost or torn file only means re-applying
                // from the snapshot once the leader commits again.
                committed: read_json(&dir.join("committed.json")).unwrap_or(None),
                dir: dir.to_path_buf(),
                file,
                file_bytes: valid as u64,
                entries,
                last_purged,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The index of the last entry (0 when the log is empty).
    pub fn last_index(&self) -> u64 {
        let inner = self.lock();
        inner
            .entries
            .keys()
            .next_back()
            .copied()
            .or(inner.last_purged.map(|l| l.index))
            .unwrap_or(0)
    }
}

impl LogInner {
    fn write_records(&mut self, records: &[LogRecord]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for record in records {
            bytes.extend(frame(record)?);
        }
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.file_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Rewrites the file with only the live entries, when it has grown well past them.
    fn maybe_rewrite(&mut self) -> io::Result<()> {
        let mut records = Vec::new();
        if let Some(upto) = self.last_purged {
            records.push(LogRecord::Purge { upto });
        }
        records.extend(self.entries.values().cloned().map(LogRecord::Entry));
        let mut bytes = Vec::new();
        for record in &records {
            bytes.extend(frame(record)?);
        }
        if self.file_bytes < bytes.len() as u64 * 2 + REWRITE_BYTES_MIN {
            return Ok(());
        }
        let path = self.dir.join("raft.log");
        write_atomically(&path, &bytes, true)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.file_bytes = bytes.len() as u64;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(inner
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = RaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let bytes = serde_json::to_vec(vote).map_err(|e| io_err(&e.into()))?;
        write_atomically(&inner.dir.join("vote.json"), &bytes, true)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let bytes = serde_json::to_vec(&committed).map_err(|e| io_err(&e.into()))?;
        write_atomically(&inner.dir.join("committed.json"), &bytes, false)
            .map_err(|e| io_err(&e))?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let records: Vec<LogRecord> = entries.into_iter().map(LogRecord::Entry).collect();
        let written = inner.write_records(&records);
        if written.is_ok() {
            for record in records {
                if let LogRecord::Entry(entry) = record {
                    inner.entries.insert(entry.log_id.index, entry);
                }
            }
        }
        let result = written
            .as_ref()
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.log_io_completed(result);
        written.map_err(|e| io_err(&e))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner
            .write_records(&[LogRecord::Truncate { from: log_id.index }])
            .map_err(|e| io_err(&e))?;
        inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner
            .write_records(&[LogRecord::Purge { upto: log_id }])
            .map_err(|e| io_err(&e))?;
        inner.entries = inner.entries.split_off(&(log_id.index + 1));
        inner.last_purged = Some(log_id);
        inner.maybe_rewrite().map_err(|e| io_err(&e))
    }
}
