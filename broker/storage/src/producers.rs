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

use std::collections::{HashMap, VecDeque};

use runnel_batch::BatchHeader;

/// How long a producer that writes nothing is remembered (Kafka's default
/// `producer.id.expiration.ms`, one day).
pub const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;

/// The first line of a snapshot file.
const SNAPSHOT_MAGIC: &str = "runnel producer state 1";

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

    /// Records a batch written to the log at `now_ms` (`header` carries its offsets).
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
    }

    /// Forgets the producers that wrote nothing for `expiration_ms` (Kafka's
    /// `producer.id.expiration.ms`): a producer that comes back after that is unknown.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) {
        self.producers
            .retain(|_, p| now_ms.saturating_sub(p.last_ms) <= expiration_ms);
    }

    /// The state as a snapshot taken at log offset `offset` (it covers the batches
    /// below it): a text file, one producer per line.
    pub fn encode(&self, offset: i64) -> String {
        let mut out = format!("{SNAPSHOT_MAGIC}\noffset {offset}\n");
        let mut ids: Vec<&i64> = self.producers.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let producer = &self.producers[id];
            out.push_str(&format!("p {id} {} {}", producer.epoch, producer.last_ms));
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
        if lines.next()? != SNAPSHOT_MAGIC {
            return None;
        }
        let offset = lines.next()?.strip_prefix("offset ")?.parse().ok()?;
        let mut states = ProducerStates::default();
        for line in lines {
            let mut fields = line.strip_prefix("p ")?.split(' ');
            let id: i64 = fields.next()?.parse().ok()?;
            let epoch: i16 = fields.next()?.parse().ok()?;
            let last_ms: i64 = fields.next()?.parse().ok()?;
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
            states.producers.insert(
                id,
                Producer {
                    epoch,
                    batches,
                    last_ms,
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
        for garbage in ["", "runnel producer state 1\noffset x\n", "something else"] {
            assert!(ProducerStates::decode(garbage).is_none(), "{garbage:?}");
        }
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
