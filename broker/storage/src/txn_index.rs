//! The aborted-transaction index of a partition (Kafka's `.txnindex`): for every
//! transaction that ended with an abort marker, the producer id, the transaction's first
//! offset and the marker's offset. A `read_committed` fetch returns the entries that
//! overlap what it read, and the reader drops those producers' transactional batches
//! between the two offsets.
//!
//! One text file per partition, `aborted-transactions`, one entry per line. An entry is
//! appended and fsynced when its marker is appended, before the marker can be
//! acknowledged. At open, entries at or past the log end (a torn or truncated tail) are
//! dropped, and the producer-state rebuild adds back the entries of the markers it
//! replays. Retention drops the entries whose marker is below the log start: the records
//! they describe are gone with it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StorageError;
use crate::checkpoint;
use crate::producers::AbortedTxn;

const FILE: &str = "aborted-transactions";

#[derive(Debug)]
pub(crate) struct TxnIndex {
    path: PathBuf,
    /// Sorted by marker offset.
    entries: Vec<AbortedTxn>,
}

fn parse(line: &str) -> Option<AbortedTxn> {
    let mut fields = line.split(' ');
    let entry = AbortedTxn {
        producer_id: fields.next()?.parse().ok()?,
        first_offset: fields.next()?.parse().ok()?,
        last_offset: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(entry)
}

fn line(entry: &AbortedTxn) -> String {
    format!(
        "{} {} {}\n",
        entry.producer_id, entry.first_offset, entry.last_offset
    )
}

impl TxnIndex {
    /// Loads the index of the log in `dir` that ends at `end` (entries from `end` on are
    /// dropped; a line that does not parse is a torn append and ends the file).
    pub(crate) fn load(dir: &Path, end: i64) -> Result<Self, StorageError> {
        let path = dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(StorageError::io(&path, source)),
        };
        let all: Vec<AbortedTxn> = text.lines().map_while(parse).collect();
        let count = all.len();
        let index = TxnIndex {
            path,
            entries: all.into_iter().filter(|e| e.last_offset < end).collect(),
        };
        if index.entries.len() != count || text.lines().count() != count {
            index.rewrite()?;
        }
        Ok(index)
    }

    /// Adds the entry of an abort marker just appended (a repeat is ignored) and makes it
    /// durable.
    pub(crate) fn add(&mut self, entry: AbortedTxn) -> Result<(), StorageError> {
        if self
            .entries
            .iter()
            .rev()
            .any(|e| e.last_offset == entry.last_offset)
        {
            return Ok(());
        }
        let io = |source| StorageError::io(&self.path, source);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        file.write_all(line(&entry).as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        let at = self
            .entries
            .partition_point(|e| e.last_offset < entry.last_offset);
        self.entries.insert(at, entry);
        Ok(())
    }

    /// The aborted transactions with records in `[from, to)`.
    pub(crate) fn overlapping(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        let start = self.entries.partition_point(|e| e.last_offset < from);
        self.entries[start..]
            .iter()
            .filter(|e| e.first_offset < to)
            .copied()
            .collect()
    }

    /// Drops the entries whose marker is at or past `end` (a truncation).
    pub(crate) fn truncate(&mut self, end: i64) -> Result<(), StorageError> {
        let keep = self.entries.partition_point(|e| e.last_offset < end);
        if keep == self.entries.len() {
            return Ok(());
        }
        self.entries.truncate(keep);
        self.rewrite()
    }

    /// Drops the entries whose marker is below `start` (retention, delete-records).
    pub(crate) fn trim(&mut self, start: i64) -> Result<(), StorageError> {
        let drop = self.entries.partition_point(|e| e.last_offset < start);
        if drop == 0 {
            return Ok(());
        }
        self.entries.drain(..drop);
        self.rewrite()
    }

    /// Forgets everything (the log was reset).
    pub(crate) fn clear(&mut self) -> Result<(), StorageError> {
        self.entries.clear();
        self.rewrite()
    }

    fn rewrite(&self) -> Result<(), StorageError> {
        if self.entries.is_empty() {
            if self.path.exists() {
                fs::remove_file(&self.path).map_err(|s| StorageError::io(&self.path, s))?;
            }
            return Ok(());
        }
        let text: String = self.entries.iter().map(line).collect();
        checkpoint::write_atomic(&self.path, text.as_bytes())
            .map_err(|source| StorageError::io(&self.path, source))
    }
}
