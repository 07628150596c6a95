//! State stores: the durable keyed state of a stateful transform's tasks.
//!
//! A task is one input partition of a deployment. Its stores live in one RocksDB
//! instance under `<data>/__state/<deployment>/<partition>`, a column family per store,
//! and every write also goes to the store's changelog, the compacted topic
//! `<deployment>-<store>-changelog` (partition = the task's partition). The changelog is
//! the truth; RocksDB is a local copy of a prefix of it.
//!
//! Writes pass through four stages. A call into the guest writes into its *call layer*;
//! when the call succeeds the layer joins the *pending* layer of its commit unit (a
//! transaction, or an at-least-once batch) and its writes are sent to the changelogs;
//! when the unit commits on the broker, its writes become *unflushed*: committed, held in
//! memory with the changelog offsets they reached; a *flush* writes every unflushed
//! write to RocksDB together with those offsets (the checkpoints), in one atomic write
//! batch. A flush comes every [`FLUSH_INTERVAL`], when the task's cache of committed
//! values is full, and when the task closes. Between flushes a key written by many units
//! reaches RocksDB once, so a hot key costs one RocksDB write per flush, not one per
//! commit. Reads see the newest of call layer, pending layers, unflushed writes and
//! RocksDB.
//!
//! **Invariant:** RocksDB holds only writes whose changelog records are committed, and a
//! store's checkpoint is never beyond the changelog offset of the last write it holds.
//! So a task that reopens (after a crash too, when its unflushed writes are lost)
//! replays its changelogs from the checkpoints to their ends and has exactly the
//! committed state; replaying a record twice is harmless because every changelog record
//! is a whole value, never a delta.
//! **Invariant:** a store whose checkpoint lies outside its changelog (before its start,
//! or beyond its end: the topic was recreated) is wiped and restored from the start.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The store every stateful task has besides the declared ones: its watermark and its
/// timers, changelogged like any store.
pub const INTERNAL_STORE: &str = "__runnel";
/// Largest key a guest may write.
pub const KEY_BYTES_MAX: usize = 64 * 1024;
/// Largest value a guest may write (a changelog record must fit a produce request).
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Largest page a range read returns.
pub const RANGE_LIMIT_MAX: u32 = 10_000;

/// A store entry: key and value.
pub type Entry = (Vec<u8>, Vec<u8>);
/// An entry as RocksDB's iterator yields it.
type RawEntry = (Box<[u8]>, Box<[u8]>);

/// Committed entries a task keeps in memory (values read or written recently), over all
/// its stores; past this, or past [`CACHE_BYTES_MAX`], the task flushes and the cache
/// starts again empty.
const CACHE_ENTRIES_MAX: usize = 200_000;
/// Bytes of keys and values (and a share for the map) the cache of a task may hold.
const CACHE_BYTES_MAX: usize = 32 * 1024 * 1024;
/// What an entry of the cache takes besides its key and value bytes, roughly.
const CACHE_ENTRY_OVERHEAD: usize = 64;
/// Longest a committed write waits for its flush: bounds what a crashed task replays.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Column family of the checkpoints.
const META_CF: &str = "default";

/// Key of the internal store holding the largest record timestamp seen.
const MAX_TIMESTAMP_KEY: &[u8] = b"w";
/// Prefix of the internal store's timer keys.
const TIMER_PREFIX: u8 = b't';

/// The changelog topic of a deployment's store.
pub fn changelog_topic(deployment: &str, store: &str) -> String {
    format!("{deployment}-{store}-changelog")
}

/// The stores of a deployment, in the order the guest and the tasks number them: the
/// declared ones, the tables (kept from compacted topics, read-only to the guest), and
/// the internal one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub declared: Vec<String>,
    /// (store, topic): the topic is the table's changelog; the runtime writes none.
    pub tables: Vec<(String, String)>,
}

impl Layout {
    /// The stores the guest sees (`init`'s list).
    pub fn guest_names(&self) -> Vec<String> {
        self.declared
            .iter()
            .cloned()
            .chain(self.tables.iter().map(|(store, _)| store.clone()))
            .collect()
    }

    /// Every store, the internal one last.
    pub fn names(&self) -> Vec<String> {
        let mut names = self.guest_names();
        names.push(INTERNAL_STORE.to_string());
        names
    }

    /// The changelog of every store, by store number.
    pub fn topics(&self, deployment: &str) -> Vec<String> {
        self.declared
            .iter()
            .map(|store| changelog_topic(deployment, store))
            .chain(self.tables.iter().map(|(_, topic)| topic.clone()))
            .chain([changelog_topic(deployment, INTERNAL_STORE)])
            .collect()
    }

    /// The changelogs the runtime writes (and creates, and deletes with the state).
    pub fn produced(&self, deployment: &str) -> Vec<String> {
        self.declared
            .iter()
            .map(String::as_str)
            .chain([INTERNAL_STORE])
            .map(|store| changelog_topic(deployment, store))
            .collect()
    }

    /// Numbers of the table stores.
    pub fn table_stores(&self) -> std::ops::Range<u32> {
        let first = self.declared.len() as u32;
        first..first + self.tables.len() as u32
    }
}

/// Where a deployment's task directories live.
pub fn deployment_dir(data_dir: &Path, deployment: &str) -> PathBuf {
    data_dir.join("__state").join(deployment)
}

/// Why a guest's state call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("store #{store} is not declared; the deployment declares {declared:?}")]
    UnknownStore { store: u32, declared: Vec<String> },
    #[error("store {store:?} is a table kept from topic {topic:?}: it is read-only")]
    ReadOnly { store: String, topic: String },
    #[error("key of {size_bytes} bytes is larger than the limit of {size_bytes_max} bytes")]
    KeyTooLarge {
        size_bytes: usize,
        size_bytes_max: usize,
    },
    #[error("value of {size_bytes} bytes is larger than the limit of {size_bytes_max} bytes")]
    ValueTooLarge {
        size_bytes: usize,
        size_bytes_max: usize,
    },
    #[error("the state store failed: {0}")]
    Storage(String),
}

/// Writes not in RocksDB yet, per store: `None` deletes.
#[derive(Debug, Default, Clone)]
struct Layer {
    stores: Vec<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Layer {
    fn new(stores: usize) -> Self {
        Layer {
            stores: vec![BTreeMap::new(); stores],
        }
    }

    fn is_empty(&self) -> bool {
        self.stores.iter().all(BTreeMap::is_empty)
    }

    /// Lays `newer` over this layer.
    fn absorb(&mut self, newer: Layer) {
        for (mine, theirs) in self.stores.iter_mut().zip(newer.stores) {
            mine.extend(theirs);
        }
    }
}

/// A write a finished call made, to send to its store's changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogWrite {
    pub store: u32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A timer as the internal store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    /// 0 event time, 1 wall clock.
    pub clock: u8,
    pub at_ms: i64,
    pub key: Vec<u8>,
}

impl Timer {
    /// Ordered by clock, then time, then key.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + self.key.len());
        out.push(TIMER_PREFIX);
        out.push(self.clock);
        out.extend_from_slice(&order_preserving(self.at_ms));
        out.extend_from_slice(&self.key);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Timer> {
        let (&[prefix, clock], rest) = bytes.split_first_chunk::<2>()?;
        if prefix != TIMER_PREFIX {
            return None;
        }
        let (at, key) = rest.split_first_chunk::<8>()?;
        Some(Timer {
            clock,
            at_ms: (u64::from_be_bytes(*at) ^ (1 << 63)).cast_signed(),
            key: key.to_vec(),
        })
    }
}

/// Big-endian with the sign bit flipped: byte order equals numeric order.
fn order_preserving(value: i64) -> [u8; 8] {
    (value.cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

/// The stores of one task.
pub struct TaskState {
    partition: u32,
    /// Declared stores, tables, then [`INTERNAL_STORE`].
    stores: Vec<String>,
    /// Table stores: (store, topic), numbered after the declared ones.
    tables: Vec<(String, String)>,
    db: rocksdb::DB,
    /// Finished calls' writes not committed yet, by commit unit, oldest first.
    pending: VecDeque<(u64, Layer)>,
    /// The running call's writes.
    call: Layer,
    /// Committed values (`None`: absent) per store: every unflushed write, and values
    /// read from RocksDB. A read that misses the layers is answered from here when it
    /// can, since a RocksDB lookup searches a memtable holding every version written
    /// since its last flush.
    cache: Cache,
    /// Keys per store whose committed value (in `cache`) is not in RocksDB yet.
    unflushed: Vec<std::collections::BTreeSet<Vec<u8>>>,
    /// Checkpoints of the unflushed writes: store → next changelog offset.
    unflushed_checkpoints: BTreeMap<u32, i64>,
    /// When the oldest unflushed write was committed.
    unflushed_since: Option<std::time::Instant>,
    flush_interval: std::time::Duration,
    /// Largest record timestamp seen, as committed or pending.
    max_timestamp_ms: i64,
}

fn storage(err: rocksdb::Error) -> StateError {
    StateError::Storage(err.to_string())
}

fn checkpoint_key(store: &str) -> Vec<u8> {
    format!("checkpoint/{store}").into_bytes()
}

impl TaskState {
    /// Opens (or creates) the stores of task `partition` under `dir`. Local state that
    /// cannot be opened is deleted and the stores start empty (they are then restored).
    ///
    /// # Errors
    /// The directory cannot be created or RocksDB cannot open a fresh instance.
    pub fn open(dir: &Path, partition: u32, layout: &Layout) -> anyhow::Result<Self> {
        let stores = layout.names();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = match open_db(dir, &stores) {
            Ok(db) => db,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "local state cannot be opened; deleting it to restore from the changelogs");
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
                std::fs::create_dir_all(dir)?;
                open_db(dir, &stores)
                    .with_context(|| format!("opening state at {}", dir.display()))?
            }
        };
        let mut task = TaskState {
            partition,
            call: Layer::new(stores.len()),
            cache: Cache::new(stores.len()),
            unflushed: vec![std::collections::BTreeSet::new(); stores.len()],
            unflushed_checkpoints: BTreeMap::new(),
            unflushed_since: None,
            flush_interval: FLUSH_INTERVAL,
            stores,
            tables: layout.tables.clone(),
            db,
            pending: VecDeque::new(),
            max_timestamp_ms: i64::MIN,
        };
        task.max_timestamp_ms = task.read_max_timestamp()?;
        Ok(task)
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn internal_store(&self) -> u32 {
        (self.stores.len() - 1) as u32
    }

    fn cf(&self, store: u32) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.stores
            .get(store as usize)
            .and_then(|name| self.db.cf_handle(&cf_name(name)))
            .ok_or_else(|| StateError::UnknownStore {
                store,
                declared: self.declared().to_vec(),
            })
    }

    fn declared(&self) -> &[String] {
        &self.stores[..self.stores.len() - 1]
    }

    /// A guest's store id, checked: the internal store is not the guest's.
    fn guest_store(&self, store: u32) -> Result<u32, StateError> {
        if (store as usize) < self.stores.len() - 1 {
            Ok(store)
        } else {
            Err(StateError::UnknownStore {
                store,
                declared: self.declared().to_vec(),
            })
        }
    }

    /// A store the guest may write: not a table.
    fn writable_store(&self, store: u32) -> Result<u32, StateError> {
        let store = self.guest_store(store)?;
        let first_table = self.stores.len() - 1 - self.tables.len();
        match (store as usize).checked_sub(first_table) {
            Some(table) => {
                let (store, topic) = self.tables[table].clone();
                Err(StateError::ReadOnly { store, topic })
            }
            None => Ok(store),
        }
    }

    /// The next changelog offset store `store` has applied (0 when never written),
    /// flushed or not.
    ///
    /// # Errors
    /// RocksDB failed.
    pub fn checkpoint(&self, store: u32) -> Result<i64, StateError> {
        if let Some(next) = self.unflushed_checkpoints.get(&store) {
            return Ok(*next);
        }
        let name = self
            .stores
            .get(store as usize)
            .ok_or_else(|| StateError::UnknownStore {
                store,
                declared: self.declared().to_vec(),
            })?;
        let raw = self.db.get(checkpoint_key(name)).map_err(storage)?;
        Ok(raw
            .and_then(|raw| <[u8; 8]>::try_from(raw.as_slice()).ok())
            .map_or(0, i64::from_be_bytes))
    }

    // ----- what a guest call sees

    /// # Errors
    /// Undeclared store, or RocksDB failed.
    pub fn get(&mut self, store: u32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let store = self.guest_store(store)?;
        self.read(store, key)
    }

    fn read(&mut self, store: u32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let layers = std::iter::once(&self.call).chain(self.pending.iter().rev().map(|(_, l)| l));
        for layer in layers {
            if let Some(value) = layer.stores[store as usize].get(key) {
                return Ok(value.clone());
            }
        }
        if let Some(value) = self.cache.get(store as usize, key) {
            return Ok(value.clone());
        }
        let value = self.db.get_cf(self.cf(store)?, key).map_err(storage)?;
        self.remember(store as usize, key.to_vec(), value.clone());
        Ok(value)
    }

    /// Caches a value read from RocksDB (see [`TaskState::read`]).
    fn remember(&mut self, store: usize, key: Vec<u8>, value: Option<Vec<u8>>) {
        if self.cache.is_full() {
            // Unflushed values live in the cache: they go to RocksDB first. A flush that
            // fails keeps them, and the next commit tries again.
            if self.flush().is_err() {
                return;
            }
            self.cache.clear();
        }
        self.cache.insert(store, key, value);
    }

    /// # Errors
    /// Undeclared store, or a key or value beyond the limits.
    pub fn put(&mut self, store: u32, key: Vec<u8>, value: Vec<u8>) -> Result<(), StateError> {
        let store = self.writable_store(store)?;
        check_key(&key)?;
        if value.len() > VALUE_BYTES_MAX {
            return Err(StateError::ValueTooLarge {
                size_bytes: value.len(),
                size_bytes_max: VALUE_BYTES_MAX,
            });
        }
        self.call.stores[store as usize].insert(key, Some(value));
        Ok(())
    }

    /// # Errors
    /// Undeclared store, or a key beyond the limit.
    pub fn delete(&mut self, store: u32, key: Vec<u8>) -> Result<(), StateError> {
        let store = self.writable_store(store)?;
        check_key(&key)?;
        self.call.stores[store as usize].insert(key, None);
        Ok(())
    }

    /// Up to `limit` entries with `from <= key < to`, in key order.
    ///
    /// # Errors
    /// Undeclared store, or RocksDB failed.
    pub fn range(
        &self,
        store: u32,
        from: &[u8],
        to: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<Entry>, StateError> {
        let store = self.guest_store(store)?;
        self.scan(store, from, to, limit.min(RANGE_LIMIT_MAX) as usize, true)
    }

    /// Entries of `store` in `[from, to)` from RocksDB under the unflushed writes, and
    /// under the pending layers and the running call's `with_uncommitted`.
    fn scan(
        &self,
        store: u32,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
        with_uncommitted: bool,
    ) -> Result<Vec<Entry>, StateError> {
        let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
        // The writes not in RocksDB, newest winning, merged into one ordered view.
        let mut overlay: BTreeMap<&[u8], Option<&Vec<u8>>> = BTreeMap::new();
        for key in self.unflushed[store as usize].range::<[u8], _>((Bound::Included(from), upper)) {
            if let Some(value) = self.cache.get(store as usize, key) {
                overlay.insert(key.as_slice(), value.as_ref());
            }
        }
        let layers = self
            .pending
            .iter()
            .map(|(_, l)| l)
            .chain(std::iter::once(&self.call))
            .filter(|_| with_uncommitted);
        for layer in layers {
            for (key, value) in
                layer.stores[store as usize].range::<[u8], _>((Bound::Included(from), upper))
            {
                overlay.insert(key.as_slice(), value.as_ref());
            }
        }
        let mut out = Vec::new();
        let mut overlay = overlay.into_iter().peekable();
        let mut disk = self.db.iterator_cf(
            self.cf(store)?,
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        let mut next_disk = || -> Result<Option<RawEntry>, StateError> {
            match disk.next() {
                None => Ok(None),
                Some(Err(err)) => Err(storage(err)),
                Some(Ok((k, v))) => Ok(to.is_none_or(|to| &*k < to).then_some((k, v))),
            }
        };
        let mut on_disk = next_disk()?;
        while out.len() < limit {
            let take_overlay = match (&on_disk, overlay.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((dk, _)), Some((ok, _))) => **ok <= **dk,
            };
            if take_overlay {
                let Some((key, value)) = overlay.next() else {
                    break;
                };
                if on_disk.as_ref().is_some_and(|(dk, _)| **dk == *key) {
                    on_disk = next_disk()?;
                }
                if let Some(value) = value {
                    out.push((key.to_vec(), value.clone()));
                }
            } else if let Some((key, value)) = on_disk.take() {
                out.push((key.into_vec(), value.into_vec()));
                on_disk = next_disk()?;
            }
        }
        Ok(out)
    }

    // ----- event time and timers

    /// Largest record timestamp seen (`i64::MIN` before the first record).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms
    }

    fn read_max_timestamp(&mut self) -> Result<i64, StateError> {
        Ok(self
            .read(self.internal_store(), MAX_TIMESTAMP_KEY)?
            .and_then(|raw| <[u8; 8]>::try_from(raw.as_slice()).ok())
            .map_or(i64::MIN, i64::from_be_bytes))
    }

    /// Records that the stream reached `timestamp_ms` (a write of the running call).
    pub fn observe_timestamp(&mut self, timestamp_ms: i64) {
        if timestamp_ms > self.max_timestamp_ms {
            self.max_timestamp_ms = timestamp_ms;
            let internal = self.internal_store() as usize;
            self.call.stores[internal].insert(
                MAX_TIMESTAMP_KEY.to_vec(),
                Some(timestamp_ms.to_be_bytes().to_vec()),
            );
        }
    }

    /// # Errors
    /// A key beyond the limit.
    pub fn schedule(&mut self, timer: &Timer) -> Result<(), StateError> {
        check_key(&timer.key)?;
        let internal = self.internal_store() as usize;
        self.call.stores[internal].insert(timer.encode(), Some(Vec::new()));
        Ok(())
    }

    /// # Errors
    /// A key beyond the limit.
    pub fn cancel(&mut self, timer: &Timer) -> Result<(), StateError> {
        check_key(&timer.key)?;
        let internal = self.internal_store() as usize;
        self.call.stores[internal].insert(timer.encode(), None);
        Ok(())
    }

    /// Up to `limit` timers of `clock` due at `now_ms` (`at_ms <= now_ms`), earliest first.
    ///
    /// # Errors
    /// RocksDB failed.
    pub fn due_timers(
        &self,
        clock: u8,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Timer>, StateError> {
        let from = [TIMER_PREFIX, clock];
        let mut to = vec![TIMER_PREFIX, clock];
        match now_ms.checked_add(1) {
            Some(next) => to.extend_from_slice(&order_preserving(next)),
            None => to = vec![TIMER_PREFIX, clock + 1],
        }
        Ok(self
            .scan(self.internal_store(), &from, Some(&to), limit, true)?
            .into_iter()
            .filter_map(|(key, _)| Timer::decode(&key))
            .collect())
    }

    // ----- calls, units, commits

    /// Ends the running call: with `keep`, its writes join commit unit `unit` and are
    /// returned for the changelogs; without, they vanish.
    pub fn end_call(&mut self, keep: bool, unit: u64) -> Vec<ChangelogWrite> {
        let call = std::mem::replace(&mut self.call, Layer::new(self.stores.len()));
        if !keep {
            self.max_timestamp_ms = self.read_max_timestamp().unwrap_or(self.max_timestamp_ms);
            return Vec::new();
        }
        if call.is_empty() {
            return Vec::new();
        }
        let writes = call
            .stores
            .iter()
            .enumerate()
            .flat_map(|(store, writes)| {
                writes.iter().map(move |(key, value)| ChangelogWrite {
                    store: store as u32,
                    key: key.clone(),
                    value: value.clone(),
                })
            })
            .collect();
        match self.pending.back_mut() {
            Some((last, layer)) if *last == unit => layer.absorb(call),
            _ => self.pending.push_back((unit, call)),
        }
        writes
    }

    /// Whether writes of units not committed yet are held.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Makes the layers of units up to `unit` committed, with `checkpoints` (store → next
    /// changelog offset those writes reached); flushes when one is due.
    ///
    /// # Errors
    /// A flush failed in RocksDB; the task must then be reopened (and so restored).
    pub fn commit(&mut self, unit: u64, checkpoints: &BTreeMap<u32, i64>) -> anyhow::Result<()> {
        while self.pending.front().is_some_and(|(u, _)| *u <= unit) {
            let Some((_, layer)) = self.pending.pop_front() else {
                break;
            };
            for (store, writes) in layer.stores.into_iter().enumerate() {
                // In key order: merged into the unflushed keys in one pass.
                let mut keys: std::collections::BTreeSet<Vec<u8>> =
                    writes.keys().cloned().collect();
                self.unflushed[store].append(&mut keys);
                for (key, value) in writes {
                    self.cache.insert(store, key, value);
                }
            }
        }
        for (store, next) in checkpoints {
            if (*store as usize) < self.stores.len() {
                self.unflushed_checkpoints.insert(*store, *next);
            }
        }
        if !self.has_unflushed() {
            return Ok(());
        }
        let since = *self
            .unflushed_since
            .get_or_insert_with(std::time::Instant::now);
        if self.cache.is_full() {
            self.flush()?;
            self.cache.clear();
        } else if since.elapsed() >= self.flush_interval {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether committed writes or checkpoints wait for a flush.
    fn has_unflushed(&self) -> bool {
        !self.unflushed_checkpoints.is_empty() || self.unflushed.iter().any(|k| !k.is_empty())
    }

    /// Writes every unflushed write to RocksDB with the checkpoints they reached, in one
    /// atomic write batch.
    ///
    /// # Errors
    /// RocksDB failed; the writes stay unflushed.
    pub fn flush(&mut self) -> Result<(), StateError> {
        if !self.has_unflushed() {
            return Ok(());
        }
        let mut batch = rocksdb::WriteBatch::default();
        for (store, keys) in self.unflushed.iter().enumerate() {
            let cf = self.cf(store as u32)?;
            for key in keys {
                // The cache keeps every unflushed value until it is flushed.
                match self.cache.get(store, key) {
                    Some(Some(value)) => batch.put_cf(cf, key, value),
                    Some(None) => batch.delete_cf(cf, key),
                    None => {
                        return Err(StateError::Storage(format!(
                            "the committed value of a key of store {:?} is missing from memory",
                            self.stores[store]
                        )));
                    }
                }
            }
        }
        for (store, next) in &self.unflushed_checkpoints {
            batch.put(
                checkpoint_key(&self.stores[*store as usize]),
                next.to_be_bytes(),
            );
        }
        self.db.write(batch).map_err(storage)?;
        for keys in &mut self.unflushed {
            keys.clear();
        }
        self.unflushed_checkpoints.clear();
        self.unflushed_since = None;
        Ok(())
    }

    /// Sets how long committed writes wait for their flush (for tests of what a crash
    /// keeps).
    #[cfg(test)]
    fn flush_every(&mut self, interval: std::time::Duration) {
        self.flush_interval = interval;
    }

    /// Closes the task as a crash would: its unflushed writes are lost.
    #[cfg(test)]
    fn crash(mut self) {
        for keys in &mut self.unflushed {
            keys.clear();
        }
        self.unflushed_checkpoints.clear();
    }

    /// Drops every write not committed (the transaction was aborted).
    pub fn abort(&mut self) {
        self.pending.clear();
        self.call = Layer::new(self.stores.len());
        self.max_timestamp_ms = self.read_max_timestamp().unwrap_or(i64::MIN);
    }

    // ----- restore

    /// Applies changelog records of `store` read from its changelog, and the offset
    /// after them.
    ///
    /// # Errors
    /// RocksDB failed.
    pub fn restore<'a>(
        &mut self,
        store: u32,
        records: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> anyhow::Result<()> {
        // The restored records are newer than anything unflushed of the store.
        if !self.unflushed[store as usize].is_empty()
            || self.unflushed_checkpoints.contains_key(&store)
        {
            self.flush()?;
        }
        let cf = self.cf(store)?;
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in records {
            match value {
                Some(value) => batch.put_cf(cf, key, value),
                None => batch.delete_cf(cf, key),
            }
        }
        batch.put(
            checkpoint_key(&self.stores[store as usize]),
            next_offset.to_be_bytes(),
        );
        self.cache.clear_store(store as usize);
        self.db.write(batch).map_err(storage)?;
        if store == self.internal_store() {
            self.max_timestamp_ms = self.read_max_timestamp()?;
        }
        Ok(())
    }

    /// Empties `store` and its checkpoint (before a restore from the changelog's start).
    ///
    /// # Errors
    /// RocksDB failed.
    pub fn wipe(&mut self, store: u32) -> anyhow::Result<()> {
        let name = cf_name(self.stores.get(store as usize).context("no such store")?);
        // Its unflushed writes are in the changelog it is restored from.
        self.unflushed[store as usize].clear();
        self.unflushed_checkpoints.remove(&store);
        self.cache.clear_store(store as usize);
        self.db.drop_cf(&name).map_err(storage)?;
        self.db
            .create_cf(&name, &rocksdb::Options::default())
            .map_err(storage)?;
        self.db
            .delete(checkpoint_key(&self.stores[store as usize]))
            .map_err(storage)?;
        if store == self.internal_store() {
            self.max_timestamp_ms = i64::MIN;
        }
        Ok(())
    }

    /// Every committed entry of a declared store in `[from, to)`, up to `limit` (for
    /// interactive queries: no pending write is visible).
    ///
    /// # Errors
    /// Unknown store, or RocksDB failed.
    pub fn committed_range(
        &self,
        store: &str,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StateError> {
        let index = self
            .declared()
            .iter()
            .position(|s| s == store)
            .ok_or_else(|| StateError::UnknownStore {
                store: u32::MAX,
                declared: self.declared().to_vec(),
            })?;
        self.scan(index as u32, from, to, limit, false)
    }
}

impl Drop for TaskState {
    /// A task that closes flushes, so that reopening it replays nothing.
    fn drop(&mut self) {
        if let Err(err) = self.flush() {
            tracing::warn!(partition = self.partition, error = %err, "flushing the state of a closing task failed; it replays its changelogs when it reopens");
        }
    }
}

/// Committed values of a task's stores held in memory: every unflushed one, and values
/// read from RocksDB; bounded by [`CACHE_ENTRIES_MAX`] and [`CACHE_BYTES_MAX`].
struct Cache {
    stores: Vec<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// What the entries take, keys and values (and [`CACHE_ENTRY_OVERHEAD`] each).
    bytes: usize,
}

impl Cache {
    fn new(stores: usize) -> Self {
        Cache {
            stores: vec![std::collections::HashMap::new(); stores],
            bytes: 0,
        }
    }

    fn get(&self, store: usize, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.stores.get(store).and_then(|values| values.get(key))
    }

    fn insert(&mut self, store: usize, key: Vec<u8>, value: Option<Vec<u8>>) {
        let Some(values) = self.stores.get_mut(store) else {
            return;
        };
        let key_bytes = key.len() + CACHE_ENTRY_OVERHEAD;
        self.bytes += key_bytes + value.as_ref().map_or(0, Vec::len);
        if let Some(old) = values.insert(key, value) {
            self.bytes -= key_bytes + old.map_or(0, |v| v.len());
        }
    }

    /// Whether the next flush should also empty it.
    fn is_full(&self) -> bool {
        self.entries() >= CACHE_ENTRIES_MAX || self.bytes >= CACHE_BYTES_MAX
    }

    fn entries(&self) -> usize {
        self.stores.iter().map(|values| values.len()).sum()
    }

    /// Empties it; only once nothing is unflushed (it holds those values).
    fn clear(&mut self) {
        for values in &mut self.stores {
            values.clear();
        }
        self.bytes = 0;
    }

    /// Forgets one store's values (RocksDB's were replaced, or its unflushed writes
    /// dropped).
    fn clear_store(&mut self, store: usize) {
        if let Some(values) = self.stores.get_mut(store) {
            for (key, value) in values.drain() {
                self.bytes -= key.len() + CACHE_ENTRY_OVERHEAD + value.map_or(0, |v| v.len());
            }
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), StateError> {
    if key.len() > KEY_BYTES_MAX {
        return Err(StateError::KeyTooLarge {
            size_bytes: key.len(),
            size_bytes_max: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

fn cf_name(store: &str) -> String {
    format!("store:{store}")
}

fn open_db(dir: &Path, stores: &[String]) -> Result<rocksdb::DB, rocksdb::Error> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Small per task: many tasks share a broker.
    options.set_write_buffer_size(8 * 1024 * 1024);
    options.set_max_open_files(64);
    options.set_keep_log_file_num(2);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut families: Vec<String> = stores.iter().map(|s| cf_name(s)).collect();
    // Stores a deployment no longer declares stay until `--delete-state`.
    if let Ok(existing) = rocksdb::DB::list_cf(&options, dir) {
        for cf in existing {
            if cf != META_CF && !families.contains(&cf) {
                families.push(cf);
            }
        }
    }
    rocksdb::DB::open_cf(&options, dir, families)
}

#[cfg(test)]
mod tests;
