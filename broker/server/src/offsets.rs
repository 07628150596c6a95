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
//!
//! The same topic holds each group's membership, so that a new coordinator (the next
//! leader of the partition) knows who may still read what:
//! - key: `u16` version (2), `u16` group length, group;
//! - value: `u16` version (1), `i32` group epoch, `u16` member count, then per member:
//!   id, client id, host (each `u16` length and bytes), `u32` session timeout (ms),
//!   `i32` member epoch, `u16` topic count and topics, `u32` count of held partitions and
//!   per partition topic and `u32` partition. A null value: the group has no members.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes, BytesMut};

use crate::group::{GroupRecord, MemberRecord};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
pub const OFFSETS_TOPIC_PARTITIONS: u32 = 8;
/// Where connect workers commit source positions (key: connector name).
pub const CONNECT_OFFSETS_TOPIC: &str = "__connect_offsets";
pub const CONNECT_OFFSETS_TOPIC_PARTITIONS: u32 = 1;
/// The definitions of transforms and connectors and their components, written by the
/// runtimes (`runnel_streams::store`); one partition keeps one order of changes.
pub const DEPLOYMENTS_TOPIC: &str = "__deployments";
pub const DEPLOYMENTS_TOPIC_PARTITIONS: u32 = 1;
/// A component (up to 32 MiB) travels as one record.
pub const DEPLOYMENTS_MAX_MESSAGE_BYTES: &str = "41943040";
/// Longest metadata string stored with a commit (Kafka's `offset.metadata.max.bytes`).
pub const METADATA_BYTES_MAX: usize = 4096;
const VERSION: u16 = 1;
const GROUP_KEY_VERSION: u16 = 2;

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

pub fn encode_group_key(group: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + group.len());
    out.put_u16(GROUP_KEY_VERSION);
    put_str(&mut out, group);
    out.freeze()
}

pub fn encode_group_value(record: &GroupRecord) -> Bytes {
    let mut out = BytesMut::with_capacity(64 * (1 + record.members.len()));
    out.put_u16(VERSION);
    out.put_i32(record.epoch);
    out.put_u16(record.members.len() as u16);
    for member in &record.members {
        put_str(&mut out, &member.member_id);
        put_str(&mut out, &member.client_id);
        put_str(&mut out, &member.host);
        out.put_u32(member.session_timeout_ms);
        out.put_i32(member.epoch);
        out.put_u16(member.topics.len() as u16);
        for topic in &member.topics {
            put_str(&mut out, topic);
        }
        out.put_u32(member.holds.len() as u32);
        for (topic, partition) in &member.holds {
            put_str(&mut out, topic);
            out.put_u32(*partition);
        }
    }
    out.freeze()
}

fn decode_group_value(bytes: &[u8]) -> Option<GroupRecord> {
    let mut r = Reader(bytes);
    if r.u16()? != VERSION {
        return None;
    }
    let epoch = r.i32()?;
    let count = r.u16()?;
    let mut members = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let member_id = r.string()?;
        let client_id = r.string()?;
        let host = r.string()?;
        let session_timeout_ms = r.u32()?;
        let member_epoch = r.i32()?;
        let mut topics = BTreeSet::new();
        for _ in 0..r.u16()? {
            topics.insert(r.string()?);
        }
        let mut holds = BTreeSet::new();
        for _ in 0..r.u32()? {
            holds.insert((r.string()?, r.u32()?));
        }
        members.push(MemberRecord {
            member_id,
            client_id,
            host,
            session_timeout_ms,
            epoch: member_epoch,
            topics,
            holds,
        });
    }
    r.0.is_empty().then_some(GroupRecord { epoch, members })
}

/// One record of `__consumer_offsets`, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// A commit, or its deletion (`None`).
    Offset {
        group: String,
        topic: String,
        partition: u32,
        value: Option<Committed>,
    },
    /// A group's membership, or `None` once it has no members.
    Group {
        group: String,
        value: Option<GroupRecord>,
    },
}

/// Decodes a record read back from the log; `None` for a malformed one.
pub fn decode_record(key: Option<&[u8]>, value: Option<&[u8]>) -> Option<Stored> {
    let key = key?;
    let mut r = Reader(key);
    match r.u16()? {
        VERSION => {
            let (group, topic, partition) = decode_key(key)?;
            let value = match value {
                Some(raw) => Some(decode_value(raw)?),
                None => None,
            };
            Some(Stored::Offset {
                group,
                topic,
                partition,
                value,
            })
        }
        GROUP_KEY_VERSION => {
            let group = r.string()?;
            if !r.0.is_empty() {
                return None;
            }
            let value = match value {
                Some(raw) => Some(decode_group_value(raw)?),
                None => None,
            };
            Some(Stored::Group { group, value })
        }
        _ => None,
    }
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

    fn i32(&mut self) -> Option<i32> {
        self.u32().map(|v| v as i32)
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
    /// Commits of open transactions, per producer id: (group, topic, partition, offset).
    /// They take effect at the transaction's commit marker on the group's partition.
    pending: BTreeMap<i64, Vec<(String, String, u32, Committed)>>,
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

    /// Holds a commit of producer `producer_id`'s open transaction.
    pub fn stage(
        &mut self,
        producer_id: i64,
        group: &str,
        topic: &str,
        partition: u32,
        committed: Committed,
    ) {
        self.pending.entry(producer_id).or_default().push((
            group.to_string(),
            topic.to_string(),
            partition,
            committed,
        ));
    }

    /// The producer's transaction ended with a marker on `__consumer_offsets` partition
    /// `index`: its commits for the groups of that partition take effect or are dropped.
    pub fn end_transaction(&mut self, producer_id: i64, commit: bool, index: u32) {
        let Some(staged) = self.pending.remove(&producer_id) else {
            return;
        };
        let (ended, other): (Vec<_>, Vec<_>) = staged
            .into_iter()
            .partition(|(group, ..)| partition_for_group(group) == index);
        if !other.is_empty() {
            self.pending.insert(producer_id, other);
        }
        if commit {
            for (group, topic, partition, committed) in ended {
                self.apply(&group, &topic, partition, Some(committed));
            }
        }
    }

    /// Whether an open transaction commits an offset for the group's partition.
    pub fn is_pending(&self, group: &str, topic: &str, partition: u32) -> bool {
        self.pending_partitions(group)
            .any(|(t, p)| t == topic && p == partition)
    }

    /// The group's partitions for which an open transaction commits an offset.
    pub fn pending_partitions<'a>(
        &'a self,
        group: &'a str,
    ) -> impl Iterator<Item = (String, u32)> + 'a {
        self.pending
            .values()
            .flatten()
            .filter(move |(g, ..)| g == group)
            .map(|(_, t, p, _)| (t.clone(), *p))
    }

    /// Forgets the groups `keep` refuses (their coordination moved elsewhere).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.groups.retain(|id, _| keep(id));
        for staged in self.pending.values_mut() {
            staged.retain(|(group, ..)| keep(group));
        }
        self.pending.retain(|_, staged| !staged.is_empty());
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
    #[test]
    fn transactional_commits_take_effect_at_their_commit_marker_only() {
        let mut store = OffsetStore::default();
        let at = |offset| Committed {
            offset,
            metadata: String::new(),
            commit_timestamp_ms: 0,
        };
        let index = partition_for_group("g");
        store.apply("g", "t", 0, Some(at(5)));
        store.stage(7, "g", "t", 0, at(9));
        store.stage(8, "g", "t", 1, at(3));
        assert!(store.is_pending("g", "t", 0));
        assert_eq!(
            store.group("g").map(|o| o[&("t".to_string(), 0)].offset),
            Some(5)
        );
        store.end_transaction(7, true, index);
        assert!(!store.is_pending("g", "t", 0));
        assert_eq!(
            store.group("g").map(|o| o[&("t".to_string(), 0)].offset),
            Some(9)
        );
        store.end_transaction(8, false, index);
        assert!(!store.is_pending("g", "t", 1));
        assert!(
            store
                .group("g")
                .is_some_and(|o| !o.contains_key(&("t".to_string(), 1)))
        );
    }

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
        assert_eq!(
            decode_record(Some(&key), None),
            Some(Stored::Offset {
                group: "g".into(),
                topic: "orders".into(),
                partition: 7,
                value: None
            })
        );
        assert_eq!(decode_record(Some(b"junk"), None), None);
        assert_eq!(decode_record(None, None), None);
    }

    #[test]
    fn group_records_round_trip_and_garbage_is_refused() {
        let record = GroupRecord {
            epoch: 3,
            members: vec![MemberRecord {
                member_id: "m-1".into(),
                client_id: "c".into(),
                host: "127.0.0.1".into(),
                session_timeout_ms: 10_000,
                epoch: 4,
                topics: ["orders".to_string()].into(),
                holds: [("orders".to_string(), 2), ("orders".to_string(), 5)].into(),
            }],
        };
        let key = encode_group_key("g");
        let value = encode_group_value(&record);
        assert_eq!(
            decode_record(Some(&key), Some(&value)),
            Some(Stored::Group {
                group: "g".into(),
                value: Some(record)
            })
        );
        for cut in 0..value.len() {
            assert_eq!(decode_record(Some(&key), Some(&value[..cut])), None);
        }
        assert_eq!(
            decode_record(Some(&key), None),
            Some(Stored::Group {
                group: "g".into(),
                value: None
            })
        );
    }
}
