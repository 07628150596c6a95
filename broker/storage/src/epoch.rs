//! The leader-epoch cache: for each leader epoch, the first offset written in it.
//!
//! A replica that rejoins asks the leader where its last epoch ended and truncates there,
//! which is what keeps a divergent history from surviving a leader change. The cache is
//! written to `leader-epoch-checkpoint` in the partition directory on every change.
//!
//! File format (text): a line with the version `0`, a line with the entry count, then one
//! `EPOCH START_OFFSET` line per entry in increasing order.

use std::io;
use std::path::{Path, PathBuf};

use crate::checkpoint;

pub(crate) const FILE_NAME: &str = "leader-epoch-checkpoint";

/// One leader epoch and the first offset its leader wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: i32,
    pub start_offset: i64,
}

#[derive(Debug)]
pub(crate) struct LeaderEpochCache {
    path: PathBuf,
    entries: Vec<EpochEntry>,
}

impl LeaderEpochCache {
    /// Loads the cache; a missing file is an empty cache, a damaged one is an error.
    pub(crate) fn load(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|reason| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {reason}", path.display()),
                )
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err),
        };
        Ok(LeaderEpochCache { path, entries })
    }

    pub(crate) fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    pub(crate) fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Records that `epoch` starts at `start_offset`, if it is newer than the latest one.
    pub(crate) fn assign(&mut self, epoch: i32, start_offset: i64) -> io::Result<()> {
        if self.latest_epoch().is_some_and(|latest| epoch <= latest) {
            return Ok(());
        }
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        self.persist()
    }

    /// Drops the epochs that start at or after `end_offset` (the log was truncated there).
    pub(crate) fn truncate_from_end(&mut self, end_offset: i64) -> io::Result<()> {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < end_offset);
        if self.entries.len() != before {
            self.persist()?;
        }
        Ok(())
    }

    /// Forgets epochs that ended before `start_offset` (the log start moved forward),
    /// keeping the one that covers it.
    pub(crate) fn truncate_from_start(&mut self, start_offset: i64) -> io::Result<()> {
        let covering = self
            .entries
            .iter()
            .rposition(|e| e.start_offset <= start_offset);
        let Some(covering) = covering else {
            return Ok(());
        };
        if covering == 0 && self.entries[0].start_offset == start_offset {
            return Ok(());
        }
        self.entries.drain(..covering);
        self.entries[0].start_offset = start_offset;
        self.persist()
    }

    /// Where `epoch` ended, as Kafka's OffsetsForLeaderEpoch answers: the largest epoch
    /// `<= epoch` and the start offset of the epoch after it (or `log_end` when it is the
    /// latest). `None` when every known epoch is newer than `epoch`.
    pub(crate) fn end_offset_for(&self, epoch: i32, log_end: i64) -> Option<(i32, i64)> {
        let idx = self.entries.iter().rposition(|e| e.epoch <= epoch)?;
        let end = self
            .entries
            .get(idx + 1)
            .map_or(log_end, |next| next.start_offset);
        Some((self.entries[idx].epoch, end))
    }

    fn persist(&self) -> io::Result<()> {
        let mut text = format!("0\n{}\n", self.entries.len());
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
        }
        checkpoint::write_atomic(&self.path, text.as_bytes())
    }
}

fn parse(text: &str) -> Result<Vec<EpochEntry>, String> {
    let mut lines = text.lines();
    if lines.next() != Some("0") {
        return Err("unknown version line".into());
    }
    let count: usize = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or("missing entry count")?;
    let mut entries = Vec::with_capacity(count.min(4096));
    for line in lines.by_ref().take(count) {
        let mut parts = line.split_whitespace();
        let epoch = parts.next().and_then(|p| p.parse().ok());
        let start_offset = parts.next().and_then(|p| p.parse().ok());
        match (epoch, start_offset) {
            (Some(epoch), Some(start_offset)) => entries.push(EpochEntry {
                epoch,
                start_offset,
            }),
            _ => return Err(format!("malformed entry line {line:?}")),
        }
    }
    if entries.len() != count {
        return Err(format!("expected {count} entries, found {}", entries.len()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reload_and_answers_end_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = LeaderEpochCache::load(dir.path()).expect("load");
        cache.assign(0, 0).expect("assign");
        cache.assign(0, 5).expect("same epoch ignored");
        cache.assign(2, 10).expect("assign");
        cache.assign(5, 30).expect("assign");
        let cache = LeaderEpochCache::load(dir.path()).expect("reload");
        assert_eq!(cache.entries().len(), 3);
        assert_eq!(cache.end_offset_for(0, 50), Some((0, 10)));
        assert_eq!(cache.end_offset_for(1, 50), Some((0, 10)));
        assert_eq!(cache.end_offset_for(2, 50), Some((2, 30)));
        assert_eq!(cache.end_offset_for(9, 50), Some((5, 50)));
    }

    #[test]
    fn truncation_from_both_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = LeaderEpochCache::load(dir.path()).expect("load");
        for (epoch, start) in [(1, 0), (2, 10), (3, 20)] {
            cache.assign(epoch, start).expect("assign");
        }
        cache.truncate_from_end(15).expect("truncate");
        assert_eq!(cache.latest_epoch(), Some(2));
        cache.truncate_from_start(12).expect("truncate");
        assert_eq!(
            cache.entries(),
            &[EpochEntry {
                epoch: 2,
                start_offset: 12
            }]
        );
    }

    #[test]
    fn damaged_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), "0\n2\n1 0\n").expect("write");
        assert!(LeaderEpochCache::load(dir.path()).is_err());
    }
}
