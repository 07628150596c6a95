//! Idempotent producers' state in one partition (Kafka's producer state): for each
//! producer id, its epoch and the sequence numbers and offsets of its last
//! [`BATCHES_KEPT`] batches. A batch from a producer must continue its sequence: a retry
//! of one of the kept batches is a duplicate (answered with the offset it got, not
//! written again); a gap is refused; an older epoch is fenced.
//!
//! The state follows the log: the leader checks and records each batch it appends, a
//! follower records what it copies (so that a new leader knows every producer). A
//! snapshot is written when a segment rolls and at a clean close; at open and after a
//! truncation the state is the snapshot (when it does not reach past the log end) plus
//! the batches after it, or without a usable snapshot the batches of the last two
//! segments. A producer known to neither is unknown, and its next batch is taken at
//! whatever sequence it has (no duplicate of a batch that old can still be in flight).
//!
//! Transactions: a producer's first transactional batch opens its transaction at that
//! offset; a marker (control batch) closes it. The first unstable offset is the first
//! offset of the oldest open transaction: a `read_committed` reader stops there (the last
//! stable offset). A marker carries the epoch the coordinator bumped to when the
//! transaction ended, and becomes the producer's epoch here, so a late batch of the
//! ended transaction is fenced. A marker closes an open transaction only when its epoch
//! is above the epoch of that transaction's batches, so a late copy of an earlier marker
//! (same epoch as the next transaction's batches) never ends the next transaction.

use std::collections::{BTreeMap, HashMap, VecDeque};

use runnel_batch::{BatchHeader, ControlType};

/// How long a producer that writes nothing is remembered (Kafka's default
/// `producer.id.expiration.ms`, one day).
pub const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;

/// The first line of a snapshot file.
const SNAPSHOT_MAGIC: &str = "runnel producer state 2";

/// The first line of a snapshot written before transactions existed (no open
/// transactions in it).
const SNAPSHOT_MAGIC_V1: &str = "runnel producer state 1";

/// Batches remembered per producer: a producer keeps at most this many in flight per
/// partition, so a retry is always of one of them.
pub const BATCHES_KEPT: usize = 5;

/// Where a batch of a producer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptBatch {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: i64,
    pub last_offset: i64,
}

#[derive(Debug, Clone, Default)]
struct Producer {
    epoch: i16,
    batches: VecDeque<KeptBatch>,
    /// When its last batch was written (ms since the Unix epoch).
    last_ms: i64,
    /// The first offset of its open transaction.
    txn_first: Option<i64>,
}

/// A transaction that ended with an abort marker: a `read_committed` reader skips the
/// producer's transactional batches from `first_offset` up to the marker at
/// `last_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// A transaction open in this partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTxn {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub first_offset: i64,
    /// When the producer last wrote here (ms since the Unix epoch).
    pub last_ms: i64,
}

/// What to do with a producer's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Write it.
    Append,
    /// It was written already, here.
    Duplicate(KeptBatch),
}

/// Why a producer's batch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error(
        "producer {producer_id} epoch {epoch} is fenced: epoch {current} of the same producer id has written since; this producer must stop"
    )]
    Fenced {
        producer_id: i64,
        epoch: i16,
        current: i16,
    },
    #[error(
        "producer {producer_id}: a batch with sequence {first_sequence} came after sequence {last_sequence}; the batches between were not written (the producer must start a new sequence)"
    )]
    OutOfOrder {
        producer_id: i64,
        first_sequence: i32,
        last_sequence: i32,
    },
}

/// The producers of one partition.
#[derive(Debug, Clone, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, Producer>,
    /// Open transactions: first offset → producer id.
    open: BTreeMap<i64, i64>,
}

/// The sequence that follows `sequence` (sequences wrap at `i32::MAX`).
fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

impl ProducerStates {
    /// Checks a batch before it is appended; batches without a producer id pass.
    ///
    /// # Errors
    /// An older epoch, or a sequence that does not continue the producer's last batch.
    pub fn check(&self, header: &BatchHeader) -> Result<SequenceCheck, SequenceError> {
        if header.producer_id < 0 {
            return Ok(SequenceCheck::Append);
        }
        let Some(producer) = self.producers.get(&header.producer_id) else {
            return Ok(SequenceCheck::Append);
        };
        let (id, epoch, first) = (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence,
        );
        if epoch < producer.epoch {
            return Err(SequenceError::Fenced {
                producer_id: id,
                epoch,
                current: producer.epoch,
            });
        }
        let last = producer.batches.back().map_or(-1, |b| b.last_sequence);
        if epoch > producer.epoch {
            // A new epoch starts its sequences again.
            return if first == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(SequenceError::OutOfOrder {
                    producer_id: id,
                    first_sequence: first,
                    last_sequence: -1,
                })
            };
        }
        if let Some(kept) = producer
            .batches
            .iter()
            .find(|b| b.first_sequence == first && b.last_sequence == header.last_sequence())
        {
            return Ok(SequenceCheck::Duplicate(*kept));
        }
        if producer.batches.is_empty() || first == next_sequence(last) {
            return Ok(SequenceCheck::Append);
        }
        Err(SequenceError::OutOfOrder {
            producer_id: id,
            first_sequence: first,
            last_sequence: last,
        })
    }

    /// Whether a marker of `producer_id` at `epoch` is to be written: its epoch is newer
    /// than the producer's here. It then closes the open transaction, if any, and fences
    /// the older epoch (also where the transaction wrote nothing yet, so a late batch of
    /// it cannot open a transaction no marker will close). A marker at the producer's
    /// epoch or older is a late or repeated one.
    pub fn marker_needed(&self, producer_id: i64, epoch: i16) -> bool {
        self.producers
            .get(&producer_id)
            .is_none_or(|p| p.epoch < epoch)
    }

    /// Records a marker written to the log (`header` carries its offset); returns the
    /// aborted transaction it closed, for the aborted-transaction index.
    pub fn record_marker(
        &mut self,
        header: &BatchHeader,
        kind: ControlType,
        now_ms: i64,
    ) -> Option<AbortedTxn> {
        if !self.marker_needed(header.producer_id, header.producer_epoch) {
            return None;
        }
        let producer = self.producers.entry(header.producer_id).or_default();
        producer.last_ms = producer.last_ms.max(now_ms);
        producer.epoch = header.producer_epoch;
        producer.batches.clear();
        let first = producer.txn_first.take()?;
        self.open.remove(&first);
        (kind == ControlType::Abort).then_some(AbortedTxn {
            producer_id: header.producer_id,
            first_offset: first,
            last_offset: header.base_offset,
        })
    }

    /// Records a batch written to the log at `now_ms` (`header` carries its offsets).
    /// Markers go to [`ProducerStates::record_marker`].
    pub fn record(&mut self, header: &BatchHeader, now_ms: i64) {
        if header.producer_id < 0 || header.is_control() {
            return;
        }
        let producer = self.producers.entry(header.producer_id).or_default();
        producer.last_ms = producer.last_ms.max(now_ms);
        if header.producer_epoch != producer.epoch {
            producer.epoch = header.producer_epoch;
            producer.batches.clear();
        }
        if header.is_transactional() && producer.txn_first.is_none() {
            producer.txn_first = Some(header.base_offset);
            self.open.insert(header.base_offset, header.producer_id);
        }
        producer.batches.push_back(KeptBatch {
            first_sequence: header.base_sequence,
            last_sequence: header.last_sequence(),
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
        });
        while producer.batches.len() > BATCHES_KEPT {
            producer.batches.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.producers.clear();
        self.open.clear();
    }

    /// The first offset of the oldest open transaction.
    pub fn first_unstable_offset(&self) -> Option<i64> {
        self.open.keys().next().copied()
    }

    /// The sequence a batch of the producer at `epoch` written here next must start with
    /// (a broker writing for a producer: transactional offset commits).
    pub fn next_sequence(&self, producer_id: i64, epoch: i16) -> i32 {
        self.producers
            .get(&producer_id)
            .filter(|p| p.epoch == epoch)
            .and_then(|p| p.batches.back())
            .map_or(0, |b| next_sequence(b.last_sequence))
    }

    /// The epoch of the producer's open transaction, if one is open.
    pub fn open_transaction_epoch(&self, producer_id: i64) -> Option<i16> {
        self.producers
            .get(&producer_id)
            .filter(|p| p.txn_first.is_some())
            .map(|p| p.epoch)
    }

    /// The open transactions, oldest first.
    pub fn open_transactions(&self) -> Vec<OpenTxn> {
        self.open
            .iter()
            .filter_map(|(&first_offset, id)| {
                let p = self.producers.get(id)?;
                Some(OpenTxn {
                    producer_id: *id,
                    producer_epoch: p.epoch,
                    first_offset,
                    last_ms: p.last_ms,
                })
            })
            .collect()
    }

    /// Forgets the producers that wrote nothing for `expiration_ms` (Kafka's
    /// `producer.id.expiration.ms`): a producer that comes back after that is unknown.
    /// A producer with an open transaction is kept until a marker closes it.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) {
        self.producers.retain(|_, p| {
            p.txn_first.is_some() || now_ms.saturating_sub(p.last_ms) <= expiration_ms
        });
    }

    /// The state as a snapshot taken at log offset `offset` (it covers the batches
    /// below it): a text file, one producer per line.
    pub fn encode(&self, offset: i64) -> String {
        let mut out = format!("{SNAPSHOT_MAGIC}\noffset {offset}\n");
        let mut ids: Vec<&i64> = self.producers.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let producer = &self.producers[id];
            out.push_str(&format!(
                "p {id} {} {} {}",
                producer.epoch,
                producer.last_ms,
                producer.txn_first.unwrap_or(-1)
            ));
            for b in &producer.batches {
                out.push_str(&format!(
                    " {} {} {} {}",
                    b.first_sequence, b.last_sequence, b.base_offset, b.last_offset
                ));
            }
            out.push('\n');
        }
        out
    }

    /// A snapshot written by [`ProducerStates::encode`], with its offset; `None` when it
    /// is not one (damaged or from another version).
    pub fn decode(text: &str) -> Option<(i64, ProducerStates)> {
        let mut lines = text.lines();
        let with_transactions = match lines.next()? {
            SNAPSHOT_MAGIC => true,
            SNAPSHOT_MAGIC_V1 => false,
            _ => return None,
        };
        let offset = lines.next()?.strip_prefix("offset ")?.parse().ok()?;
        let mut states = ProducerStates::default();
        for line in lines {
            let mut fields = line.strip_prefix("p ")?.split(' ');
            let id: i64 = fields.next()?.parse().ok()?;
            let epoch: i16 = fields.next()?.parse().ok()?;
            let last_ms: i64 = fields.next()?.parse().ok()?;
            let txn_first = if with_transactions {
                let first: i64 = fields.next()?.parse().ok()?;
                (first >= 0).then_some(first)
            } else {
                None
            };
            let numbers: Vec<i64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
            if !numbers.len().is_multiple_of(4) || numbers.len() / 4 > BATCHES_KEPT {
                return None;
            }
            let batches = numbers
                .chunks(4)
                .map(|c| {
                    Some(KeptBatch {
                        first_sequence: i32::try_from(c[0]).ok()?,
                        last_sequence: i32::try_from(c[1]).ok()?,
                        base_offset: c[2],
                        last_offset: c[3],
                    })
                })
                .collect::<Option<VecDeque<_>>>()?;
            if let Some(first) = txn_first {
                states.open.insert(first, id);
            }
            states.producers.insert(
                id,
                Producer {
                    epoch,
                    batches,
                    last_ms,
                    txn_first,
                },
            );
        }
        Some((offset, states))
    }

    /// How many producers are known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(
        producer_id: i64,
        epoch: i16,
        first: i32,
        records: i32,
        base_offset: i64,
    ) -> BatchHeader {
        BatchHeader {
            base_offset,
            batch_length: 0,
            leader_epoch: 0,
            crc: 0,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id,
            producer_epoch: epoch,
            base_sequence: first,
            record_count: records as u32,
        }
    }

    #[test]
    fn sequences_continue_retries_are_duplicates_and_gaps_are_refused() {
        let mut states = ProducerStates::default();
        let first = batch(7, 0, 0, 10, 100);
        assert_eq!(states.check(&first), Ok(SequenceCheck::Append));
        states.record(&first, 0);
        let second = batch(7, 0, 10, 5, 110);
        assert_eq!(states.check(&second), Ok(SequenceCheck::Append));
        states.record(&second, 0);
        // The retry of the first batch is recognised, with the offsets it got.
        match states.check(&batch(7, 0, 0, 10, -1)) {
            Ok(SequenceCheck::Duplicate(kept)) => assert_eq!(kept.base_offset, 100),
            other => panic!("{other:?}"),
        }
        // Sequence 20 after 14: the batch 15..19 is missing.
        assert!(matches!(
            states.check(&batch(7, 0, 20, 1, -1)),
            Err(SequenceError::OutOfOrder {
                last_sequence: 14,
                ..
            })
        ));
        // An older epoch is fenced; a newer one starts at 0.
        states.record(&batch(7, 1, 0, 1, 120), 0);
        assert!(matches!(
            states.check(&batch(7, 0, 15, 1, -1)),
            Err(SequenceError::Fenced { current: 1, .. })
        ));
        assert!(matches!(
            states.check(&batch(7, 2, 3, 1, -1)),
            Err(SequenceError::OutOfOrder { .. })
        ));
        assert_eq!(
            states.check(&batch(7, 2, 0, 1, -1)),
            Ok(SequenceCheck::Append)
        );
        // Batches without a producer id are not checked.
        assert_eq!(
            states.check(&batch(-1, -1, -1, 3, -1)),
            Ok(SequenceCheck::Append)
        );
    }

    #[test]
    fn only_the_last_five_batches_are_kept_and_sequences_wrap() {
        let mut states = ProducerStates::default();
        let mut sequence = i32::MAX - 3;
        let mut offset = 0;
        for _ in 0..8 {
            let next = batch(1, 0, sequence, 2, offset);
            assert_eq!(states.check(&next), Ok(SequenceCheck::Append), "{sequence}");
            states.record(&next, 0);
            sequence = next_sequence(next.last_sequence());
            offset += 2;
        }
        // The oldest three fell out: a retry of one of them is out of order, not a
        // duplicate (a producer never has that many in flight).
        assert!(states.check(&batch(1, 0, i32::MAX - 3, 2, -1)).is_err());
        assert!(matches!(
            states.check(&batch(1, 0, 10, 2, -1)),
            Ok(SequenceCheck::Duplicate(KeptBatch {
                base_offset: 14,
                ..
            }))
        ));
    }

    #[test]
    fn a_snapshot_round_trips_and_garbage_is_not_one() {
        let mut states = ProducerStates::default();
        for (i, id) in [3, 1, 2].into_iter().enumerate() {
            states.record(&batch(id, 1, 0, 4, i as i64 * 10), 0);
            states.record(&batch(id, 1, 4, 2, i as i64 * 10 + 4), 0);
        }
        let (offset, back) = ProducerStates::decode(&states.encode(77)).expect("decodes");
        assert_eq!(offset, 77);
        assert_eq!(back.encode(77), states.encode(77));
        assert!(matches!(
            back.check(&batch(2, 1, 4, 2, -1)),
            Ok(SequenceCheck::Duplicate(KeptBatch {
                base_offset: 24,
                ..
            }))
        ));
        for garbage in ["", "runnel producer state 2\noffset x\n", "something else"] {
            assert!(ProducerStates::decode(garbage).is_none(), "{garbage:?}");
        }
    }

    fn transactional(mut header: BatchHeader) -> BatchHeader {
        header.attributes |= 1 << 4;
        header
    }

    fn marker(producer_id: i64, epoch: i16, offset: i64) -> BatchHeader {
        let mut header = batch(producer_id, epoch, -1, 1, offset);
        header.attributes |= 3 << 4;
        header
    }

    #[test]
    fn transactions_open_at_their_first_batch_and_markers_close_them() {
        let mut states = ProducerStates::default();
        states.record(&batch(1, 0, 0, 5, 0), 0);
        assert_eq!(states.first_unstable_offset(), None, "not transactional");
        states.record(&transactional(batch(2, 0, 0, 5, 5)), 0);
        states.record(&transactional(batch(3, 4, 0, 5, 10)), 0);
        states.record(&transactional(batch(2, 0, 5, 5, 15)), 0);
        assert_eq!(states.first_unstable_offset(), Some(5));
        assert_eq!(states.open_transactions().len(), 2);
        // A marker with the transaction's own epoch is a late one of an earlier
        // transaction: it ends nothing.
        assert!(!states.marker_needed(2, 0));
        assert!(states.marker_needed(2, 1));
        assert!(
            states.marker_needed(1, 1),
            "fences the epoch without a transaction"
        );
        let aborted = states.record_marker(&marker(2, 1, 20), ControlType::Abort, 0);
        assert_eq!(
            aborted,
            Some(AbortedTxn {
                producer_id: 2,
                first_offset: 5,
                last_offset: 20
            })
        );
        assert_eq!(states.first_unstable_offset(), Some(10));
        // The marker's epoch fences a late batch of the aborted transaction; the next
        // transaction writes with that epoch from sequence 0.
        assert!(matches!(
            states.check(&transactional(batch(2, 0, 10, 1, -1))),
            Err(SequenceError::Fenced { current: 1, .. })
        ));
        assert_eq!(
            states.check(&transactional(batch(2, 1, 0, 1, -1))),
            Ok(SequenceCheck::Append)
        );
        assert_eq!(
            states.record_marker(&marker(3, 5, 21), ControlType::Commit, 0),
            None
        );
        assert_eq!(states.first_unstable_offset(), None);
        // Open transactions survive a snapshot and keep their producer from expiring.
        states.record(&transactional(batch(2, 1, 0, 1, 22)), 0);
        let (_, mut back) = ProducerStates::decode(&states.encode(23)).expect("decodes");
        assert_eq!(back.first_unstable_offset(), Some(22));
        back.expire(10 * PRODUCER_EXPIRATION_MS, PRODUCER_EXPIRATION_MS);
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn an_idle_producer_is_forgotten_after_the_expiration() {
        let mut states = ProducerStates::default();
        states.record(&batch(5, 0, 0, 3, 0), 1_000);
        states.expire(1_000 + PRODUCER_EXPIRATION_MS, PRODUCER_EXPIRATION_MS);
        assert_eq!(states.len(), 1, "not idle long enough yet");
        assert!(states.check(&batch(5, 0, 9, 1, -1)).is_err());
        states.expire(1_001 + PRODUCER_EXPIRATION_MS, PRODUCER_EXPIRATION_MS);
        assert!(states.is_empty());
        // Unknown again: its next batch is taken at whatever sequence it has.
        assert_eq!(
            states.check(&batch(5, 0, 9, 1, -1)),
            Ok(SequenceCheck::Append)
        );
    }
}
