//! Committed offsets: served from memory, made durable as records of the compacted
//! internal topic `__consumer_offsets`, partitioned by group, and replayed at startup.
//!
//! Record format (both big-endian):
//! - key: `u16` version (1), `u16` group length, group, `u16` topic length, topic,
//!   `u32` partition;
//! - value: `u16` version (1), `i64` offset, `i64` commit timestamp (ms), `u16` metadata
//!   length, metadata. A null value (tombstone) deletes the entry (group deletion).
//!
//! Compaction keeps the latest commit per (group, topic, partition).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
pub const OFFSETS_TOPIC_PARTITIONS: u32 = 8;
/// Where connect workers commit source positions (key: connector name). The one internal
/// topic clients write to.
pub const CONNECT_OFFSETS_TOPIC: &str = "__connect_offsets";
pub const CONNECT_OFFSETS_TOPIC_PARTITIONS: u32 = 1;
/// Longest metadata string stored with a commit (Kafka's `offset.metadata.max.bytes`).
pub const METADATA_BYTES_MAX: usize = 4096;
const VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: i64,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

/// The `__consumer_offsets` partition that holds a group's offsets.
pub fn partition_for_group(group: &str) -> u32 {
    runnel_batch::partition_for_key(group.as_bytes(), OFFSETS_TOPIC_PARTITIONS)
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

pub fn encode_key(group: &str, topic: &str, partition: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(10 + group.len() + topic.len());
    out.put_u16(VERSION);
    put_str(&mut out, group);
    put_str(&mut out, topic);
    out.put_u32(partition);
    out.freeze()
}

pub fn encode_value(committed: &Committed) -> Bytes {
    let mut out = BytesMut::with_capacity(20 + committed.metadata.len());
    out.put_u16(VERSION);
    out.put_i64(committed.offset);
    out.put_i64(committed.commit_timestamp_ms);
    put_str(&mut out, &committed.metadata);
    out.freeze()
}

/// Bounds-checked reading of the formats above.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Option<i64> {
        let b = self.take(8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Some(i64::from_be_bytes(raw))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

pub fn decode_key(bytes: &[u8]) -> Option<(String, String, u32)> {
    let mut r = Reader(bytes);
    if r.u16()? != VERSION {
        return None;
    }
    let group = r.string()?;
    let topic = r.string()?;
    let partition = r.u32()?;
    r.0.is_empty().then_some((group, topic, partition))
}

pub fn decode_value(bytes: &[u8]) -> Option<Committed> {
    let mut r = Reader(bytes);
    if r.u16()? != VERSION {
        return None;
    }
    let offset = r.i64()?;
    let commit_timestamp_ms = r.i64()?;
    let metadata = r.string()?;
    Some(Committed {
        offset,
        metadata,
        commit_timestamp_ms,
    })
}

/// Every group's committed offsets.
#[derive(Debug, Default)]
pub struct OffsetStore {
    groups: BTreeMap<String, BTreeMap<(String, u32), Committed>>,
}

impl OffsetStore {
    /// Applies one `__consumer_offsets` record; `None` deletes.
    pub fn apply(&mut self, group: &str, topic: &str, partition: u32, value: Option<Committed>) {
        match value {
            Some(committed) => {
                self.groups
                    .entry(group.to_string())
                    .or_default()
                    .insert((topic.to_string(), partition), committed);
            }
            None => {
                if let Some(offsets) = self.groups.get_mut(group) {
                    offsets.remove(&(topic.to_string(), partition));
                    if offsets.is_empty() {
                        self.groups.remove(group);
                    }
                }
            }
        }
    }

    /// Applies a raw record key and value as read back from the log; malformed records
    /// are reported and skipped.
    pub fn apply_record(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        let Some((group, topic, partition)) = key.and_then(decode_key) else {
            tracing::warn!("skipping a malformed key in {OFFSETS_TOPIC}");
            return;
        };
        match value {
            None => self.apply(&group, &topic, partition, None),
            Some(raw) => match decode_value(raw) {
                Some(committed) => self.apply(&group, &topic, partition, Some(committed)),
                None => tracing::warn!(
                    group,
                    topic,
                    partition,
                    "skipping a malformed value in {OFFSETS_TOPIC}"
                ),
            },
        }
    }

    pub fn group(&self, group: &str) -> Option<&BTreeMap<(String, u32), Committed>> {
        self.groups.get(group)
    }

    pub fn group_ids(&self) -> impl Iterator<Item = &String> {
        self.groups.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let key = encode_key("g", "orders", 7);
        assert_eq!(decode_key(&key), Some(("g".into(), "orders".into(), 7)));
        let committed = Committed {
            offset: 42,
            metadata: "m".into(),
            commit_timestamp_ms: 9,
        };
        assert_eq!(decode_value(&encode_value(&committed)), Some(committed));
        for cut in 0..key.len() {
            assert_eq!(decode_key(&key[..cut]), None);
        }
        assert_eq!(decode_key(&[0, 2, 0, 0]), None);
        let mut store = OffsetStore::default();
        store.apply_record(
            Some(&key),
            Some(&encode_value(&Committed {
                offset: 1,
                metadata: String::new(),
                commit_timestamp_ms: 0,
            })),
        );
        assert_eq!(store.group("g").map(|g| g.len()), Some(1));
        store.apply_record(Some(&key), None);
        assert!(store.group("g").is_none());
        store.apply_record(Some(b"junk"), None);
    }
}
