//! Stateful transforms (`runnel:transform@0.2.0`): durable key-value stores per input
//! partition, event-time and wall-clock timers, and window helpers.
//!
//! ```no_run
//! use runnel_sdk::stateful::{Init, Store, StatefulTransform, Timer};
//! use runnel_sdk::{Output, Record};
//!
//! struct Count {
//!     counts: Store<String, u64>,
//! }
//!
//! impl StatefulTransform for Count {
//!     fn init(init: &Init) -> Result<Self, String> {
//!         Ok(Count { counts: init.store("counts")? })
//!     }
//!
//!     fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
//!         let word = record.key_str().ok_or("the key is not UTF-8")?.to_string();
//!         let count = self.counts.get(&word)?.unwrap_or(0) + 1;
//!         self.counts.put(&word, &count)?;
//!         out.emit(Some(word.as_bytes()), Some(count.to_string().as_bytes()));
//!         Ok(())
//!     }
//! }
//!
//! runnel_sdk::export_stateful_transform!(Count);
//! ```
//!
//! Deploy with the stores declared: `runnel transform deploy count.wasm --input words
//! --output counts --store counts --processing exactly-once`.
//!
//! The writes a record makes (store writes, timers) are held by the SDK until the
//! record's `process` returns `Ok`; a record refused with `Err` leaves no trace in the
//! state, like its emitted records. Reads see the record's own writes.
//!
//! Keys are encoded so that byte order is the key order ([`Key`]): ranges and prefixes
//! of strings, integers and (fixed-width, anything) pairs scan in order. Values are JSON
//! ([`serde_json`]), so `runnel transform state` prints them readably.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__bindings_v2::runnel::transform as wit;
use crate::{Config, Output, Record};

pub use wit::timers::Clock;

/// A key type of a [`Store`]: encoded so that byte order equals key order.
pub trait Key: Sized {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// A key of fixed width, which may come first in a pair.
pub trait FixedKey: Key {
    const WIDTH: usize;
}

impl Key for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Key for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

impl Key for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

impl FixedKey for u64 {
    const WIDTH: usize = 8;
}

impl Key for i64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.cast_unsigned() ^ (1 << 63)).to_be_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some((u64::from_be_bytes(bytes.try_into().ok()?) ^ (1 << 63)).cast_signed())
    }
}

impl FixedKey for i64 {
    const WIDTH: usize = 8;
}

impl<A: FixedKey, B: Key> Key for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (a, b) = bytes.split_at_checked(A::WIDTH)?;
        Some((A::decode(a)?, B::decode(b)?))
    }
}

/// A write held until its record succeeds.
enum Op {
    Put(u32, Vec<u8>, Vec<u8>),
    Delete(u32, Vec<u8>),
    Schedule(wit::timers::Timer),
    Cancel(wit::timers::Timer),
}

/// The running record's writes: in order, and by key for reads.
#[derive(Default)]
struct Held {
    ops: Vec<Op>,
    by_key: BTreeMap<(u32, Vec<u8>), Option<Vec<u8>>>,
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

fn hold(op: Op) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        match &op {
            Op::Put(store, key, value) => {
                held.by_key
                    .insert((*store, key.clone()), Some(value.clone()));
            }
            Op::Delete(store, key) => {
                held.by_key.insert((*store, key.clone()), None);
            }
            Op::Schedule(_) | Op::Cancel(_) => {}
        }
        held.ops.push(op);
    });
}

/// Hands the record's writes to the host (`keep`) or forgets them.
///
/// # Errors
/// The host refused a write (a value too large, for example): the record fails.
fn release(keep: bool) -> Result<(), String> {
    let held = HELD.with(|held| std::mem::take(&mut *held.borrow_mut()));
    if !keep {
        return Ok(());
    }
    for op in held.ops {
        match op {
            Op::Put(store, key, value) => wit::state::put(store, &key, &value)?,
            Op::Delete(store, key) => wit::state::delete(store, &key)?,
            Op::Schedule(timer) => wit::timers::schedule(&timer)?,
            Op::Cancel(timer) => wit::timers::cancel(&timer)?,
        }
    }
    Ok(())
}

/// A store of the deployment (declared with `--store NAME`), typed.
pub struct Store<K, V> {
    id: u32,
    name: String,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Serialize + DeserializeOwned> Store<K, V> {
    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn key_bytes(key: &K) -> Vec<u8> {
        let mut bytes = Vec::new();
        key.encode(&mut bytes);
        bytes
    }

    fn value(&self, bytes: &[u8]) -> Result<V, String> {
        serde_json::from_slice(bytes)
            .map_err(|err| format!("store {:?} holds a value of another type: {err}", self.name))
    }

    /// # Errors
    /// The host failed, or the stored value does not decode as `V`.
    pub fn get(&self, key: &K) -> Result<Option<V>, String> {
        let key = Self::key_bytes(key);
        let held = HELD.with(|held| held.borrow().by_key.get(&(self.id, key.clone())).cloned());
        let bytes = match held {
            Some(bytes) => bytes,
            None => wit::state::get(self.id, &key)?,
        };
        bytes.map(|b| self.value(&b)).transpose()
    }

    /// # Errors
    /// The value does not encode.
    pub fn put(&self, key: &K, value: &V) -> Result<(), String> {
        let value = serde_json::to_vec(value)
            .map_err(|err| format!("cannot encode a value for store {:?}: {err}", self.name))?;
        hold(Op::Put(self.id, Self::key_bytes(key), value));
        Ok(())
    }

    /// # Errors
    /// Never today; kept fallible like the other writes.
    pub fn delete(&self, key: &K) -> Result<(), String> {
        hold(Op::Delete(self.id, Self::key_bytes(key)));
        Ok(())
    }

    /// Up to `limit` entries with `from <= key < to`, in key order.
    ///
    /// # Errors
    /// The host failed, or a stored key or value does not decode.
    pub fn range(&self, from: &K, to: Option<&K>, limit: u32) -> Result<Vec<(K, V)>, String> {
        let from = Self::key_bytes(from);
        let to = to.map(Self::key_bytes);
        self.scan(from, to, limit)
    }

    /// Up to `limit` entries whose key starts with `prefix`'s encoding, in key order
    /// (for a pair key, every entry with that first half).
    ///
    /// # Errors
    /// The host failed, or a stored key or value does not decode.
    pub fn prefix<P: Key>(&self, prefix: &P, limit: u32) -> Result<Vec<(K, V)>, String> {
        let mut from = Vec::new();
        prefix.encode(&mut from);
        let to = prefix_end(&from);
        self.scan(from, to, limit)
    }

    fn scan(&self, from: Vec<u8>, to: Option<Vec<u8>>, limit: u32) -> Result<Vec<(K, V)>, String> {
        let limit = limit.max(1);
        let mut out = Vec::new();
        let mut cursor = from;
        loop {
            // A page of the host's state, then the record's own writes over the span
            // that page covers; deletes held here can empty a page, so go on until
            // the host has no more or the limit is reached.
            let page = wit::state::range(self.id, &cursor, to.as_deref(), limit)?;
            let more = page.len() as u32 == limit;
            let span_end = match page.last() {
                Some((last, _)) if more => {
                    let mut next = last.clone();
                    next.push(0);
                    Some(next)
                }
                _ => to.clone(),
            };
            let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
                page.into_iter().map(|(k, v)| (k, Some(v))).collect();
            HELD.with(|held| {
                for ((store, key), value) in &held.borrow().by_key {
                    if *store == self.id
                        && *key >= cursor
                        && span_end.as_ref().is_none_or(|end| key < end)
                    {
                        merged.insert(key.clone(), value.clone());
                    }
                }
            });
            for (key, value) in merged {
                let Some(value) = value else { continue };
                let key = K::decode(&key)
                    .ok_or_else(|| format!("store {:?} holds a key of another type", self.name))?;
                out.push((key, self.value(&value)?));
                if out.len() as u32 >= limit {
                    return Ok(out);
                }
            }
            match span_end {
                Some(end) if more => cursor = end,
                _ => return Ok(out),
            }
        }
    }
}

/// The smallest key above every key starting with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What `init` gets: the config and the declared stores.
pub struct Init {
    config: Config,
    stores: Vec<String>,
}

impl Init {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The declared stores, in order.
    pub fn stores(&self) -> &[String] {
        &self.stores
    }

    /// The store `name`, typed.
    ///
    /// # Errors
    /// The deployment does not declare it; the message says how to.
    pub fn store<K: Key, V: Serialize + DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Store<K, V>, String> {
        let id = self.stores.iter().position(|s| s == name).ok_or_else(|| {
            format!(
                "store {name:?} is not declared; deploy with `--store {name}` (declared: {:?})",
                self.stores
            )
        })?;
        Ok(Store {
            id: id as u32,
            name: name.to_string(),
            types: PhantomData,
        })
    }
}

/// A timer that came due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub clock: Clock,
    pub at_ms: i64,
    pub key: Vec<u8>,
}

/// Asks for [`StatefulTransform::on_timer`] once `clock` passes `at_ms` (event time:
/// the partition's watermark). Held with the record's other writes.
pub fn schedule(clock: Clock, at_ms: i64, key: &[u8]) {
    hold(Op::Schedule(wit::timers::Timer {
        clock,
        at_ms,
        key: key.to_vec(),
    }));
}

/// Cancels a timer set with [`schedule`].
pub fn cancel(clock: Clock, at_ms: i64, key: &[u8]) {
    hold(Op::Cancel(wit::timers::Timer {
        clock,
        at_ms,
        key: key.to_vec(),
    }));
}

/// The partition's watermark: the largest timestamp seen minus the deployment's allowed
/// lateness (`i64::MIN` before the first record).
pub fn watermark() -> i64 {
    wit::timers::watermark()
}

/// Time windows: which windows a timestamp falls in, and whether a window is closed.
///
/// A window `[start, end)` closes when the partition's watermark reaches `end`: the
/// deployment's allowed lateness is the grace period in which records of an earlier
/// window are still counted. Schedule an event-time timer at `end` to emit a window's
/// result when it closes; a record whose window is already closed is late.
pub mod windows {
    /// Fixed-size windows that do not overlap (`size_ms`, aligned to the epoch).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Tumbling {
        pub size_ms: i64,
    }

    impl Tumbling {
        /// `[start, end)` of the window holding `timestamp_ms`.
        pub fn window_of(&self, timestamp_ms: i64) -> (i64, i64) {
            let start = timestamp_ms - timestamp_ms.rem_euclid(self.size_ms);
            (start, start.saturating_add(self.size_ms))
        }
    }

    /// Windows of `size_ms` starting every `advance_ms` (overlapping when the advance is
    /// smaller than the size).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Hopping {
        pub size_ms: i64,
        pub advance_ms: i64,
    }

    impl Hopping {
        /// `[start, end)` of every window holding `timestamp_ms`, earliest first.
        pub fn windows_of(&self, timestamp_ms: i64) -> Vec<(i64, i64)> {
            let last = timestamp_ms - timestamp_ms.rem_euclid(self.advance_ms);
            let mut out = Vec::new();
            let mut start = last;
            while start > timestamp_ms - self.size_ms {
                out.push((start, start.saturating_add(self.size_ms)));
                start -= self.advance_ms;
            }
            out.reverse();
            out
        }
    }

    /// Sessions: activity of a key separated by gaps of at least `gap_ms`. A session is
    /// `[first, last]` record timestamp; it closes when the watermark reaches
    /// `last + gap_ms`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Session {
        pub gap_ms: i64,
    }

    impl Session {
        /// The session a record at `timestamp_ms` belongs to, given the key's open
        /// sessions: returns it, and the existing sessions it absorbs (a late record can
        /// bridge two sessions into one). Keep sessions in a store keyed by
        /// (key, start); delete the absorbed ones and put the returned one.
        pub fn assign(
            &self,
            open: &[(i64, i64)],
            timestamp_ms: i64,
        ) -> ((i64, i64), Vec<(i64, i64)>) {
            let mut merged = (timestamp_ms, timestamp_ms);
            let mut absorbed = Vec::new();
            let mut sorted = open.to_vec();
            sorted.sort_unstable();
            // Merging can extend the session to reach further ones: repeat until stable.
            loop {
                let before = absorbed.len();
                for &(start, end) in &sorted {
                    if absorbed.contains(&(start, end)) {
                        continue;
                    }
                    if start.saturating_sub(self.gap_ms) < merged.1
                        && merged.0 < end.saturating_add(self.gap_ms)
                    {
                        merged = (merged.0.min(start), merged.1.max(end));
                        absorbed.push((start, end));
                    }
                }
                if absorbed.len() == before {
                    return (merged, absorbed);
                }
            }
        }

        /// When session `(start, end)` closes: `end + gap_ms`.
        pub fn closes_at(&self, session: (i64, i64)) -> i64 {
            session.1.saturating_add(self.gap_ms)
        }
    }

    /// Whether a window ending at `end_ms` is closed (its grace period is over).
    pub fn closed(end_ms: i64) -> bool {
        end_ms <= super::watermark()
    }

    /// When a windowed result is emitted.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum EmitWhen {
        /// Once, when the window closes, with its final value (Kafka Streams'
        /// `suppress(untilWindowCloses)`): downstream sees no intermediate results.
        #[default]
        Closed,
        /// At every update, with the value so far: results come at once, and a window
        /// is emitted as often as it changes. Nothing more is emitted when it closes.
        Updated,
    }

    impl EmitWhen {
        /// Reads `closed` or `updates` (a deployment's config value, say), saying what
        /// is accepted otherwise.
        ///
        /// # Errors
        /// Any other text.
        pub fn parse(text: &str) -> Result<Self, String> {
            match text {
                "closed" | "final" => Ok(EmitWhen::Closed),
                "updates" | "updated" => Ok(EmitWhen::Updated),
                other => Err(format!(
                    "emit must be `closed` (once per window, when it closes) or `updates` (at every change), not {other:?}"
                )),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn emit_modes_parse_and_refuse_the_unknown() {
            assert_eq!(EmitWhen::parse("closed"), Ok(EmitWhen::Closed));
            assert_eq!(EmitWhen::parse("updates"), Ok(EmitWhen::Updated));
            assert_eq!(EmitWhen::default(), EmitWhen::Closed);
            match EmitWhen::parse("sometimes") {
                Err(refused) => assert!(refused.contains("\"sometimes\""), "{refused}"),
                Ok(mode) => panic!("`sometimes` was read as {mode:?}"),
            }
        }

        #[test]
        fn timestamps_fall_in_their_windows() {
            let minute = Tumbling { size_ms: 60_000 };
            assert_eq!(minute.window_of(0), (0, 60_000));
            assert_eq!(minute.window_of(59_999), (0, 60_000));
            assert_eq!(minute.window_of(60_000), (60_000, 120_000));
            assert_eq!(minute.window_of(-1), (-60_000, 0));
            let hop = Hopping {
                size_ms: 10,
                advance_ms: 5,
            };
            assert_eq!(hop.windows_of(12), vec![(5, 15), (10, 20)]);
            assert_eq!(hop.windows_of(10), vec![(5, 15), (10, 20)]);
            let tumble = Hopping {
                size_ms: 10,
                advance_ms: 10,
            };
            assert_eq!(tumble.windows_of(12), vec![(10, 20)]);
        }

        #[test]
        fn sessions_grow_and_merge_within_the_gap() {
            let sessions = Session { gap_ms: 10 };
            assert_eq!(sessions.assign(&[], 100), ((100, 100), vec![]));
            assert_eq!(
                sessions.assign(&[(100, 100)], 105),
                ((100, 105), vec![(100, 100)])
            );
            // A gap of exactly gap_ms starts a new session.
            assert_eq!(sessions.assign(&[(100, 105)], 115), ((115, 115), vec![]));
            // A late record bridges two sessions.
            let (merged, mut absorbed) = sessions.assign(&[(100, 105), (120, 130)], 112);
            absorbed.sort_unstable();
            assert_eq!(
                (merged, absorbed),
                ((100, 130), vec![(100, 105), (120, 130)])
            );
            assert_eq!(sessions.closes_at((100, 130)), 140);
        }
    }
}

/// A transform with state. One value of the type lives in each Wasm instance; it is
/// called for the records of one partition at a time, and its stores are that
/// partition's.
pub trait StatefulTransform: 'static {
    /// # Errors
    /// A message saying what is wrong with the config or the stores.
    fn init(init: &Init) -> Result<Self, String>
    where
        Self: Sized;

    /// Handles one input record.
    ///
    /// # Errors
    /// Why this record is bad: its emitted records and state writes are discarded and
    /// the error policy decides the rest.
    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String>;

    /// A timer came due. Emitted records default to the timer's time as timestamp.
    ///
    /// # Errors
    /// Why the timer cannot be handled: its writes are discarded and the timer dropped.
    fn on_timer(&mut self, _timer: &Timer, _out: &mut Output) -> Result<(), String> {
        Ok(())
    }
}

/// Logging to the deployment's log (`runnel transform logs NAME`) from a stateful
/// transform.
pub mod log {
    use crate::__bindings_v2::runnel::transform::host::Level;

    #[cfg(target_arch = "wasm32")]
    fn write(level: Level, message: &str) {
        crate::__bindings_v2::runnel::transform::host::log(level, message);
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn write(level: Level, message: &str) {
        eprintln!("[{level:?}] {message}");
    }

    log_functions!();
}

struct Instance {
    transform: Box<dyn StatefulTransform>,
    output: Output,
}

thread_local! {
    static INSTANCE: RefCell<Option<Instance>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub mod __runtime {
    use super::*;
    use crate::__bindings_v2::runnel::transform::types::{Output as BatchOutput, RecordError};

    pub fn init<T: StatefulTransform>(
        config: Vec<(String, String)>,
        outputs: Vec<String>,
        stores: Vec<String>,
    ) -> Result<(), String> {
        let init = Init {
            config: Config::new(config, outputs),
            stores,
        };
        let transform = T::init(&init)?;
        INSTANCE.with(|slot| {
            *slot.borrow_mut() = Some(Instance {
                transform: Box::new(transform),
                output: Output::new(init.config.outputs().to_vec()),
            });
        });
        Ok(())
    }

    fn not_initialised() -> BatchOutput {
        BatchOutput {
            records: Vec::new(),
            errors: vec![RecordError {
                index: u32::MAX,
                message: "called before init".into(),
            }],
        }
    }

    /// Runs `each` per item, keeping an item's output and writes only if it succeeds.
    fn run<I>(
        items: impl Iterator<Item = Result<(I, i64), String>>,
        mut each: impl FnMut(&mut dyn StatefulTransform, I, &mut Output) -> Result<(), String>,
    ) -> BatchOutput {
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(instance) = slot.as_mut() else {
                return not_initialised();
            };
            let out = &mut instance.output;
            out.buf.clear();
            let mut errors = Vec::new();
            for (index, item) in items.enumerate() {
                let (item, timestamp_ms) = match item {
                    Ok(item) => item,
                    Err(message) => {
                        errors.push(RecordError {
                            index: u32::MAX,
                            message,
                        });
                        break;
                    }
                };
                out.input_index = index as u32;
                out.input_timestamp_ms = timestamp_ms;
                let mark = out.buf.len();
                let result = each(instance.transform.as_mut(), item, out);
                let result = result.and_then(|()| release(true));
                if let Err(message) = result {
                    let _ = release(false);
                    out.buf.truncate(mark);
                    errors.push(RecordError {
                        index: index as u32,
                        message,
                    });
                }
            }
            BatchOutput {
                records: std::mem::take(&mut out.buf),
                errors,
            }
        })
    }

    pub fn process(input: Vec<u8>) -> BatchOutput {
        let records = runnel_flat::read_inputs(&input)
            .map(|r| r.map(|r| (r, r.timestamp_ms)).map_err(|e| e.to_string()));
        run(records, |transform, record, out| {
            transform.process(&Record { inner: record }, out)
        })
    }

    pub fn fire(timers: Vec<wit::timers::Timer>) -> BatchOutput {
        let timers = timers.into_iter().map(|t| {
            let at = t.at_ms;
            Ok((
                Timer {
                    clock: t.clock,
                    at_ms: t.at_ms,
                    key: t.key,
                },
                at,
            ))
        });
        run(timers, |transform, timer, out| {
            transform.on_timer(&timer, out)
        })
    }
}

/// Exports a [`StatefulTransform`] implementation as the component's entry points
/// (world `runnel:transform/stateful-transformer@0.2.0`).
#[macro_export]
macro_rules! export_stateful_transform {
    ($ty:ty) => {
        struct __RunnelStatefulExport;

        impl $crate::__bindings_v2::Guest for __RunnelStatefulExport {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                outputs: ::std::vec::Vec<::std::string::String>,
                stores: ::std::vec::Vec<::std::string::String>,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::stateful::__runtime::init::<$ty>(config, outputs, stores)
            }

            fn process(input: ::std::vec::Vec<u8>) -> $crate::__bindings_v2::Output {
                $crate::stateful::__runtime::process(input)
            }

            fn fire(
                timers: ::std::vec::Vec<$crate::__bindings_v2::Timer>,
            ) -> $crate::__bindings_v2::Output {
                $crate::stateful::__runtime::fire(timers)
            }
        }

        $crate::__bindings_v2::__export_stateful_transformer!(__RunnelStatefulExport with_types_in $crate::__bindings_v2);
    };
}
