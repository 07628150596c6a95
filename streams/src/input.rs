//! A batch of a transform's input as the guest reads it: the records in the flat input
//! format (`runnel-flat`), back to back in one buffer, and where each one sits.
//!
//! Fetched record batches are walked in place (`runnel_batch::for_each_record`) and written
//! straight into the buffer: no record is decoded into an object of its own on the way.

use std::collections::BTreeMap;
use std::ops::Range;

use runnel_batch::BatchError;
use runnel_client::FetchedBatch;

/// Bytes of a flat input record besides its key, value and headers: partition, offset,
/// timestamp, two lengths and the header count.
const FLAT_RECORD_OVERHEAD: usize = 4 + 8 + 8 + 4 + 4 + 4;

/// Where one input record came from and where it sits in the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputRecord {
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    /// Its bytes in the flat buffer.
    start: usize,
    end: usize,
}

/// Input records in the flat format, in the order they were read.
#[derive(Debug, Default)]
pub struct Inputs {
    flat: Vec<u8>,
    records: Vec<InputRecord>,
    /// Per input partition, the offset after the last batch read from it
    /// ([`Inputs::from_batches`]): what is committed once the records are handled.
    next_offsets: BTreeMap<u32, i64>,
    /// Reused to encode each record's headers.
    scratch: Vec<u8>,
}

impl Inputs {
    /// The records of `batches` from each batch's `from_offset` on.
    ///
    /// # Errors
    /// A batch whose records do not parse.
    pub fn from_batches(batches: &[FetchedBatch]) -> Result<Self, BatchError> {
        // Sized up front: a buffer grown by doubling is copied again and again. The flat
        // form spends a fixed-size field where a batch spends a varint, so it is larger.
        let mut bytes = 0;
        let mut count = 0;
        for batch in batches {
            bytes += batch.bytes.len();
            count += runnel_batch::parse_header(&batch.bytes)?.record_count as usize;
        }
        let mut inputs = Inputs {
            flat: Vec::with_capacity(bytes + count * FLAT_RECORD_OVERHEAD),
            records: Vec::with_capacity(count),
            ..Inputs::default()
        };
        for batch in batches {
            runnel_batch::for_each_record(&batch.bytes, |record| {
                if record.offset >= batch.from_offset {
                    inputs.push(
                        (batch.partition, record.offset, record.timestamp_ms),
                        record.key,
                        record.value,
                        record.headers.iter().copied(),
                    );
                }
            })?;
            let next = inputs
                .next_offsets
                .entry(batch.partition)
                .or_insert(batch.next_offset);
            *next = (*next).max(batch.next_offset);
        }
        Ok(inputs)
    }

    /// Appends one record: `at` is (partition, offset, timestamp).
    pub fn push<'a>(
        &mut self,
        at: (u32, i64, i64),
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) {
        let (partition, offset, timestamp_ms) = at;
        self.scratch.clear();
        runnel_flat::write_headers(&mut self.scratch, headers);
        let start = self.flat.len();
        runnel_flat::write_input(
            &mut self.flat,
            &runnel_flat::FlatRecord {
                partition,
                offset,
                timestamp_ms,
                key,
                value,
                headers: &self.scratch,
            },
        );
        self.records.push(InputRecord {
            partition,
            offset,
            timestamp_ms,
            start,
            end: self.flat.len(),
        });
    }

    /// The flat buffer of all the records.
    pub fn into_flat(self) -> Vec<u8> {
        self.flat
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn records(&self) -> &[InputRecord] {
        &self.records
    }

    /// The flat buffer of the records in `range`.
    pub fn flat(&self, range: Range<usize>) -> &[u8] {
        match (self.records.get(range.start), range.end.checked_sub(1)) {
            (Some(first), Some(last)) if range.start < range.end => self
                .records
                .get(last)
                .and_then(|last| self.flat.get(first.start..last.end))
                .unwrap_or_default(),
            _ => &[],
        }
    }

    /// One record, read back from the flat buffer.
    pub fn record(&self, index: usize) -> Option<runnel_flat::FlatRecord<'_>> {
        runnel_flat::read_inputs(self.flat(index..index + 1))
            .next()
            .and_then(Result::ok)
    }

    /// Runs of consecutive records of one partition: (partition, index range).
    pub fn partition_runs(&self) -> Vec<(u32, Range<usize>)> {
        let mut runs: Vec<(u32, Range<usize>)> = Vec::new();
        for (index, record) in self.records.iter().enumerate() {
            match runs.last_mut() {
                Some((partition, range)) if *partition == record.partition => {
                    range.end = index + 1;
                }
                _ => runs.push((record.partition, index..index + 1)),
            }
        }
        runs
    }

    /// What to commit for `topic` once these records are handled: the offset after each
    /// partition's last batch.
    pub fn next_offsets(&self, topic: &str) -> BTreeMap<(String, u32), i64> {
        self.next_offsets
            .iter()
            .map(|(partition, next)| ((topic.to_string(), *partition), *next))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use runnel_batch::{BatchOptions, Header, Record, encode};
    use std::sync::Arc;

    fn record(offset: i64, key: &str, value: Option<&str>, headers: &[(&str, &str)]) -> Record {
        Record {
            offset,
            timestamp_ms: 1_000 + offset,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: headers
                .iter()
                .map(|(k, v)| Header {
                    key: (*k).to_string(),
                    value: Some(Bytes::copy_from_slice(v.as_bytes())),
                })
                .collect(),
        }
    }

    fn fetched(partition: u32, base: i64, records: &[Record], from: i64) -> FetchedBatch {
        let mut bytes = encode(records, BatchOptions::default()).to_vec();
        runnel_batch::set_base_offset(&mut bytes, base);
        FetchedBatch {
            topic: Arc::from("in"),
            partition,
            bytes: Bytes::from(bytes),
            from_offset: from,
            next_offset: base + records.len() as i64,
        }
    }

    #[test]
    fn batches_become_the_flat_records_of_their_unread_part() {
        let first = [
            record(0, "a", Some("1"), &[]),
            record(1, "b", None, &[("h", "x")]),
            record(2, "c", Some("3"), &[]),
        ];
        let second = [record(0, "d", Some("4"), &[("k1", "v1"), ("k2", "v2")])];
        let batches = [fetched(0, 10, &first, 11), fetched(3, 7, &second, 0)];
        let inputs = Inputs::from_batches(&batches).expect("parses");

        // The same records pushed one by one give the same buffer.
        let mut expected = Inputs::default();
        for (partition, r) in [(0, &first[1]), (0, &first[2]), (3, &second[0])] {
            let offset = if partition == 0 { 10 + r.offset } else { 7 };
            expected.push(
                (partition, offset, r.timestamp_ms),
                r.key.as_deref(),
                r.value.as_deref(),
                Header::pairs(&r.headers),
            );
        }
        assert_eq!(inputs.flat(0..3), expected.flat(0..3));
        assert_eq!(inputs.len(), 3);
        let at: Vec<(u32, i64)> = inputs
            .records()
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect();
        assert_eq!(at, vec![(0, 11), (0, 12), (3, 7)]);
        assert_eq!(inputs.partition_runs(), vec![(0, 0..2), (3, 2..3)]);
        assert_eq!(
            inputs.next_offsets("in"),
            BTreeMap::from([(("in".to_string(), 0), 13), (("in".to_string(), 3), 8)])
        );

        // One record's slice reads back alone, as the guest would get it when isolated.
        let one = inputs.record(1).expect("record 1");
        assert_eq!(
            (one.offset, one.key, one.value),
            (12, Some(&b"c"[..]), Some(&b"3"[..]))
        );
        let read: Vec<_> = runnel_flat::read_inputs(inputs.flat(1..2)).collect();
        assert_eq!(read.len(), 1);
        let with_headers = inputs.record(0).expect("record 0");
        assert_eq!(
            runnel_flat::headers(with_headers.headers).collect::<Vec<_>>(),
            vec![("h", Some(&b"x"[..]))]
        );
        assert_eq!(with_headers.value, None);
        assert!(inputs.record(3).is_none());
        assert!(inputs.flat(2..2).is_empty());
    }

    #[test]
    fn a_batch_read_before_still_moves_the_commit_point() {
        let records = [record(0, "a", Some("1"), &[])];
        // Everything in it lies below the position: no record, but the offset after it.
        let inputs = Inputs::from_batches(&[fetched(1, 5, &records, 6)]).expect("parses");
        assert!(inputs.is_empty());
        assert_eq!(
            inputs.next_offsets("in"),
            BTreeMap::from([(("in".to_string(), 1), 6)])
        );
    }
}
