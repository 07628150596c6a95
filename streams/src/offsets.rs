//! The input offsets of an at-least-once task (a transform, a sink connector) whose
//! output was acknowledged, committed to its group every commit interval rather than after
//! every batch, as Kafka Streams commits every `commit.interval.ms`.
//!
//! Invariant: an offset is added only once every record before it was handled and its
//! output acknowledged, so a commit never skips unhandled input; what is not committed
//! yet when a task dies is read again by the next owner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use runnel_client::{ClientError, GroupConsumer};

/// Acknowledged input offsets not committed yet.
#[derive(Debug)]
pub struct AckedOffsets {
    interval: Duration,
    offsets: BTreeMap<(String, u32), i64>,
    committed_at: Instant,
}

impl AckedOffsets {
    pub fn new(interval: Duration) -> Self {
        AckedOffsets {
            interval,
            offsets: BTreeMap::new(),
            committed_at: Instant::now(),
        }
    }

    /// How often offsets are committed.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds the offsets after records whose output was acknowledged, and commits
    /// everything added once the interval has passed since the last commit.
    ///
    /// # Errors
    /// The commit failed.
    pub async fn add(
        &mut self,
        offsets: impl IntoIterator<Item = ((String, u32), i64)>,
        member: &mut GroupConsumer,
    ) -> Result<(), ClientError> {
        for (partition, next) in offsets {
            let offset = self.offsets.entry(partition).or_insert(next);
            *offset = (*offset).max(next);
        }
        if self.committed_at.elapsed() >= self.interval {
            self.commit(member).await?;
        }
        Ok(())
    }

    /// Commits everything added (the input is quiet, the task pauses or stops). Offsets of
    /// partitions the member no longer owns are dropped: their new owner reads them again.
    ///
    /// # Errors
    /// The commit failed.
    pub async fn commit(&mut self, member: &mut GroupConsumer) -> Result<(), ClientError> {
        self.committed_at = Instant::now();
        let owned: BTreeSet<(String, u32)> = member.assignment().into_iter().collect();
        let offsets: BTreeMap<(String, u32), i64> = std::mem::take(&mut self.offsets)
            .into_iter()
            .filter(|(tp, _)| owned.contains(tp))
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        member.commit_offsets(offsets).await
    }
}
