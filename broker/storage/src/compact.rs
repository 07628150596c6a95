//! Compaction (`cleanup.policy=compact`): keep the last record of every key.
//!
//! A pass reads the whole log to learn the offset of the latest record of each key, then
//! rewrites every sealed segment (never the active one), keeping a record only if it is
//! the latest for its key. Offsets and order are preserved: a rewritten batch keeps its base
//! offset and its last offset delta, and the records keep their offsets, so the log simply
//! has gaps. A tombstone (null value) that is the latest for its key is kept until its
//! segment's largest timestamp is older than `delete.retention.ms`, so that consumers
//! reading behind get to see the delete. Records without a key are kept. A batch whose
//! records all survive is copied without decoding.
//!
//! Transactions: records of aborted transactions are removed and never count as the
//! latest of their key (an aborted write must not shadow a committed one); records from
//! the first unstable offset on (open transactions, and everything after them) are kept
//! and do not count either, since their transaction may still abort. A transaction
//! marker goes once no record of its transaction is left, under the tombstones' rule:
//! when its segment is older than `delete.retention.ms` (as Kafka's cleaner does), so a
//! consumer reading behind still sees the end of a transaction whose records it read.
//! Without that, the markers of a changelog written exactly-once (one per commit, every
//! 100 ms) would grow the compacted log, and each restore's reading of it, forever.
//!
//! **Invariant:** a marker outlives every record of its transaction: a transaction's
//! records are never left without their marker, so none of them looks open.
//!
//! A rewritten segment is written to `<base>.log.cleaned`, fsynced, then its index files
//! are removed and it is renamed over the live file; a crash at any point leaves either the
//! old segment or the new one, and missing indexes are rebuilt on open.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;

use bytes::Bytes;
use runnel_batch::{
    BatchBuilder, BatchHeader, BatchOptions, TimestampType, decode_records, parse_header,
    set_leader_epoch, set_log_append_time,
};

use crate::checkpoint;
use crate::segment::{OpenMode, Segment};
use crate::{AbortedTxn, Log, StorageError};

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStats {
    pub segments_rewritten: usize,
    pub records_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Log {
    /// Runs one compaction pass if the cleanup policy includes `compact`.
    ///
    /// # Errors
    /// I/O errors, or corrupt data found while reading (the pass stops, nothing replaced).
    pub fn compact(&mut self, now_ms: i64) -> Result<CompactionStats, StorageError> {
        let mut stats = CompactionStats::default();
        if !self.config.cleanup_policy.compact || self.segments.len() < 2 {
            return Ok(stats);
        }
        let txns = Txns {
            unstable_from: self.first_unstable_offset().unwrap_or(i64::MAX),
            aborted: self.aborted_transactions(0, i64::MAX),
        };
        let latest = self.latest_offset_per_key(&txns)?;
        let sealed: Vec<i64> = self.segments.keys().copied().collect();
        let sealed = &sealed[..sealed.len() - 1];
        // Producers whose current transaction (in log order) keeps a record.
        let mut kept_txns = HashSet::new();
        for &base in sealed {
            let Some(segment) = self.segments.get(&base) else {
                continue;
            };
            let drop_tombstones =
                now_ms.saturating_sub(segment.max_timestamp_ms()) > self.config.delete_retention_ms;
            let (cleaned, removed) =
                rewrite(segment, &latest, &txns, drop_tombstones, &mut kept_txns)?;
            stats.bytes_before += segment.size_bytes();
            if removed == 0 {
                stats.bytes_after += segment.size_bytes();
                continue;
            }
            stats.records_removed += removed;
            stats.segments_rewritten += 1;
            stats.bytes_after += cleaned.len() as u64;
            if cleaned.is_empty() {
                self.remove_segment(base)?;
            } else {
                self.swap_in(base, &cleaned)?;
            }
        }
        checkpoint::sync_dir(&self.dir).map_err(|source| StorageError::io(&self.dir, source))?;
        Ok(stats)
    }

    fn latest_offset_per_key(&self, txns: &Txns) -> Result<HashMap<Bytes, i64>, StorageError> {
        let mut latest = HashMap::new();
        for segment in self.segments.values() {
            segment.for_each_batch(|position, bytes| {
                let header = parse_header(bytes).map_err(|err| StorageError::Corrupt {
                    path: segment.log_path(),
                    position,
                    reason: err.to_string(),
                })?;
                if header.is_control()
                    || header.base_offset >= txns.unstable_from
                    || txns.is_aborted(&header)
                {
                    return Ok(());
                }
                let records = decode_records(bytes).map_err(|err| StorageError::Corrupt {
                    path: segment.log_path(),
                    position,
                    reason: err.to_string(),
                })?;
                for record in records {
                    if let Some(key) = record.key {
                        latest.insert(key, record.offset);
                    }
                }
                Ok(())
            })?;
        }
        Ok(latest)
    }

    fn swap_in(&mut self, base: i64, cleaned: &[u8]) -> Result<(), StorageError> {
        let [log_cleaned, ..] = Segment::paths_with_suffix(&self.dir, base, ".cleaned");
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| StorageError::io(&path, source)
        };
        let mut file = File::create(&log_cleaned).map_err(io(&log_cleaned))?;
        file.write_all(cleaned).map_err(io(&log_cleaned))?;
        file.sync_all().map_err(io(&log_cleaned))?;
        let [log, offset_index, time_index] = Segment::paths(&self.dir, base);
        for index in [&offset_index, &time_index] {
            match fs::remove_file(index) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StorageError::io(index, err));
                }
                _ => {}
            }
        }
        fs::rename(&log_cleaned, &log).map_err(io(&log))?;
        let (segment, _) = Segment::open(
            &self.dir,
            base,
            self.config.index_interval_bytes,
            OpenMode::Trusted,
        )?;
        self.replace_segment(segment);
        Ok(())
    }
}

/// What compaction must know of the log's transactions.
struct Txns {
    /// The first offset of the oldest open transaction (`i64::MAX` when none is open).
    unstable_from: i64,
    aborted: Vec<AbortedTxn>,
}

impl Txns {
    /// Whether the batch belongs to an aborted transaction.
    fn is_aborted(&self, header: &BatchHeader) -> bool {
        header.is_transactional()
            && !header.is_control()
            && self.aborted.iter().any(|a| {
                a.producer_id == header.producer_id
                    && a.first_offset <= header.base_offset
                    && header.base_offset < a.last_offset
            })
    }
}

/// The segment's bytes with superseded and aborted records removed, and markers whose
/// transactions kept no record (with `drop_tombstones`), and how many records were
/// removed. `kept_txns` carries, from segment to segment, the producers whose current
/// transaction keeps a record.
fn rewrite(
    segment: &Segment,
    latest: &HashMap<Bytes, i64>,
    txns: &Txns,
    drop_tombstones: bool,
    kept_txns: &mut HashSet<i64>,
) -> Result<(Vec<u8>, u64), StorageError> {
    let mut out = Vec::with_capacity(segment.size_bytes() as usize);
    let mut removed = 0u64;
    segment.for_each_batch(|position, bytes| {
        let corrupt = |reason: String| StorageError::Corrupt {
            path: segment.log_path(),
            position,
            reason,
        };
        let header = parse_header(bytes).map_err(|e| corrupt(e.to_string()))?;
        if header.base_offset >= txns.unstable_from {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        if header.is_control() {
            // The marker ends the producer's transaction: kept while a record of it is.
            if kept_txns.remove(&header.producer_id) || !drop_tombstones {
                out.extend_from_slice(bytes);
            } else {
                removed += u64::from(header.record_count);
            }
            return Ok(());
        }
        if txns.is_aborted(&header) {
            removed += u64::from(header.record_count);
            return Ok(());
        }
        let records = decode_records(bytes).map_err(|e| corrupt(e.to_string()))?;
        let total = records.len();
        let kept: Vec<_> = records
            .into_iter()
            .filter(|record| match &record.key {
                None => true,
                Some(key) => {
                    latest.get(key) == Some(&record.offset)
                        && !(drop_tombstones && record.value.is_none())
                }
            })
            .collect();
        removed += (total - kept.len()) as u64;
        if header.is_transactional() && !kept.is_empty() {
            kept_txns.insert(header.producer_id);
        }
        if kept.len() == total {
            out.extend_from_slice(bytes);
        } else if !kept.is_empty() {
            let options = BatchOptions {
                compression: header.compression().map_err(|e| corrupt(e.to_string()))?,
                producer_id: header.producer_id,
                producer_epoch: header.producer_epoch,
                base_sequence: header.base_sequence,
                transactional: header.is_transactional(),
                control: false,
            };
            let mut builder = BatchBuilder::with_base_offset(options, header.base_offset);
            for record in &kept {
                builder.push_keeping_offset(record);
            }
            builder.set_last_offset_delta(header.last_offset_delta);
            let mut batch = builder.build().to_vec();
            set_leader_epoch(&mut batch, header.leader_epoch);
            if header.timestamp_type() == TimestampType::LogAppendTime {
                set_log_append_time(&mut batch, header.max_timestamp_ms);
            }
            out.extend_from_slice(&batch);
        }
        Ok(())
    })?;
    Ok((out, removed))
}
