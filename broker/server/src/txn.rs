//! The transaction coordinator's state machine: what it knows of each transactional id
//! and how calls change it. Pure logic (clock passed in); `txn_ops.rs` stores the
//! results in `__transaction_state` and writes the markers.
//!
//! Every state change is a record of the compacted internal topic `__transaction_state`
//! (key: the transactional id as UTF-8; value: [`TxnMeta`] as JSON), partitioned by the
//! id. The coordinator of an id is the leader of its partition; a new leader replays the
//! partition and finishes what the previous one left in a `Prepare*` state.
//!
//! States: `Empty` (no transaction open) → `Ongoing` (the first partition joined) →
//! `PrepareCommit`/`PrepareAbort` (the decision is durable; markers are being written) →
//! `CompleteCommit`/`CompleteAbort` (every partition holds its marker) → `Ongoing` again
//! at the next transaction's first partition.
//!
//! Invariants:
//! - The producer epoch is bumped when a transaction ends (commit, abort, timeout) and
//!   when a new instance calls InitProducerId. Markers carry the bumped epoch, so on
//!   every partition a late batch or a late marker of an ended transaction is fenced
//!   (KIP-890's transactions V2).
//! - A call with an older epoch is fenced, except a repeat of the EndTransaction that
//!   did the last bump (answered with its outcome).
//! - No partition joins a transaction while the previous one's markers are being
//!   written (CONCURRENT_TRANSACTIONS): a marker never lands after a newer transaction's
//!   batch on the same partition.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub const TXN_TOPIC: &str = "__transaction_state";
pub const TXN_TOPIC_PARTITIONS: u32 = 8;
/// `transaction.timeout.ms` when the producer asks for none (Kafka's default).
pub const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// The default of `transaction_max_timeout_ms`: the longest timeout a producer may ask
/// for (Kafka's `transaction.max.timeout.ms`).
pub const MAX_TIMEOUT_MS: u32 = 900_000;

/// The default of `transactional_id_expiration_ms`: a transactional id with no
/// transaction open is forgotten after this long unused
/// (Kafka's `transactional.id.expiration.ms`, 7 days).
pub const ID_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;

/// The `__transaction_state` partition of a transactional id.
pub fn partition_for_txn(id: &str) -> u32 {
    runnel_batch::partition_for_key(id.as_bytes(), TXN_TOPIC_PARTITIONS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
        }
    }

    pub fn is_prepared(self) -> bool {
        matches!(self, TxnState::PrepareCommit | TxnState::PrepareAbort)
    }

    fn is_idle(self) -> bool {
        matches!(
            self,
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort
        )
    }
}

/// What the coordinator knows of one transactional id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnMeta {
    pub producer_id: i64,
    /// The epoch the producer writes with now; in `Prepare*` and `Complete*` the bumped
    /// epoch the markers carry.
    pub producer_epoch: i16,
    /// The epoch before the last bump by EndTransaction (-1 after any other change), so
    /// that a repeated EndTransaction is recognised.
    pub last_epoch: i16,
    pub timeout_ms: u32,
    pub state: TxnState,
    /// The partitions of the open (or ending) transaction.
    pub partitions: BTreeSet<(String, u32)>,
    /// When the open transaction started; -1 when none is.
    pub start_ms: i64,
    pub update_ms: i64,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    Fenced(String),
    Concurrent,
    InvalidState(String),
}

/// What an EndTransaction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndDecision {
    /// Store this `Prepare*` state, then write the markers.
    Prepare(TxnMeta),
    /// A repeat of the call that ended it: answer with this epoch once it is complete.
    Repeat { epoch: i16 },
    /// Nothing was written in the transaction: store this state, which bumps the epoch
    /// all the same (KIP-890 part 2: every end bumps it), so that a join of the ended
    /// transaction still on its way (a leader slow to append the producer's batch) is
    /// fenced instead of opening a transaction the next one would merge into.
    Empty(TxnMeta),
}

impl TxnMeta {
    /// A new transactional id's state.
    pub fn new(producer_id: i64, timeout_ms: u32, now: i64) -> Self {
        TxnMeta {
            producer_id,
            producer_epoch: 0,
            last_epoch: -1,
            timeout_ms,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            start_ms: -1,
            update_ms: now,
        }
    }

    fn check_producer(&self, producer_id: i64, epoch: i16) -> Result<(), TxnError> {
        if producer_id != self.producer_id || epoch != self.producer_epoch {
            return Err(TxnError::Fenced(format!(
                "producer id {producer_id} epoch {epoch} is not the current one (id {} epoch {}): another instance took over this transactional id, or the coordinator aborted the transaction after its timeout; this producer must stop",
                self.producer_id, self.producer_epoch
            )));
        }
        Ok(())
    }

    /// Adds partitions to the producer's transaction, opening it when none is; `None`
    /// when they are in it already.
    ///
    /// # Errors
    /// An old producer, or the previous transaction is still ending.
    pub fn add_partitions(
        &self,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, u32)],
        now: i64,
    ) -> Result<Option<TxnMeta>, TxnError> {
        self.check_producer(producer_id, epoch)?;
        if self.state.is_prepared() {
            return Err(TxnError::Concurrent);
        }
        let mut next = self.clone();
        if self.state.is_idle() {
            next.state = TxnState::Ongoing;
            next.partitions.clear();
            next.start_ms = now;
            next.last_epoch = -1;
        }
        let before = next.partitions.len();
        next.partitions.extend(partitions.iter().cloned());
        if self.state == TxnState::Ongoing && next.partitions.len() == before {
            return Ok(None);
        }
        next.update_ms = now;
        Ok(Some(next))
    }

    /// The producer ends its transaction.
    ///
    /// # Errors
    /// An old producer, or a commit of a transaction that was aborted.
    pub fn end(
        &self,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        now: i64,
    ) -> Result<EndDecision, TxnError> {
        let wanted = if commit {
            [TxnState::PrepareCommit, TxnState::CompleteCommit]
        } else {
            [TxnState::PrepareAbort, TxnState::CompleteAbort]
        };
        if producer_id == self.producer_id
            && self.last_epoch >= 0
            && epoch == self.last_epoch
            && wanted.contains(&self.state)
        {
            return Ok(EndDecision::Repeat {
                epoch: self.producer_epoch,
            });
        }
        if producer_id == self.producer_id
            && self.last_epoch >= 0
            && epoch == self.last_epoch
            && commit
            && matches!(self.state, TxnState::PrepareAbort | TxnState::CompleteAbort)
        {
            return Err(TxnError::InvalidState(
                "the transaction was aborted (its timeout passed, or an administrator aborted it) and cannot commit; start again with InitProducerId".into(),
            ));
        }
        self.check_producer(producer_id, epoch)?;
        match self.state {
            TxnState::Ongoing => {
                let mut next = self.clone();
                next.state = if commit {
                    TxnState::PrepareCommit
                } else {
                    TxnState::PrepareAbort
                };
                next.last_epoch = self.producer_epoch;
                next.producer_epoch = self.producer_epoch.saturating_add(1);
                next.update_ms = now;
                Ok(EndDecision::Prepare(next))
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                let mut next = self.clone();
                next.state = if commit {
                    TxnState::CompleteCommit
                } else {
                    TxnState::CompleteAbort
                };
                next.partitions.clear();
                next.start_ms = -1;
                next.last_epoch = self.producer_epoch;
                next.producer_epoch = self.producer_epoch.saturating_add(1);
                next.update_ms = now;
                Ok(EndDecision::Empty(next))
            }
            TxnState::PrepareCommit | TxnState::PrepareAbort => Err(TxnError::Concurrent),
        }
    }

    /// The coordinator aborts the open transaction (its timeout passed, an administrator
    /// asked, or a new instance initialised), bumping the epoch; `None` when none is open.
    pub fn abort(&self, now: i64) -> Option<TxnMeta> {
        if self.state != TxnState::Ongoing {
            return None;
        }
        let mut next = self.clone();
        next.state = TxnState::PrepareAbort;
        next.last_epoch = self.producer_epoch;
        next.producer_epoch = self.producer_epoch.saturating_add(1);
        next.update_ms = now;
        Some(next)
    }

    /// Every marker is written: the transaction is complete.
    pub fn complete(&self, now: i64) -> TxnMeta {
        let mut next = self.clone();
        next.state = match self.state {
            TxnState::PrepareCommit => TxnState::CompleteCommit,
            TxnState::PrepareAbort => TxnState::CompleteAbort,
            other => other,
        };
        next.partitions.clear();
        next.start_ms = -1;
        next.update_ms = now;
        next
    }

    /// A new instance initialises (no transaction open any more): the epoch is bumped,
    /// or when it would overflow, the caller gives a new producer id.
    pub fn reinitialise(&self, new_producer_id: Option<i64>, timeout_ms: u32, now: i64) -> TxnMeta {
        let mut next = self.clone();
        match new_producer_id {
            Some(id) => {
                next.producer_id = id;
                next.producer_epoch = 0;
            }
            None => next.producer_epoch = self.producer_epoch + 1,
        }
        next.last_epoch = -1;
        next.state = TxnState::Empty;
        next.partitions.clear();
        next.start_ms = -1;
        next.timeout_ms = timeout_ms;
        next.update_ms = now;
        next
    }

    /// Whether the epoch must move to a new producer id at the next initialisation
    /// (an epoch bump per transaction end leaves room for three more).
    pub fn epoch_exhausted(&self) -> bool {
        self.producer_epoch >= i16::MAX - 3
    }

    /// Whether the id has been unused for `expiration_ms` with no transaction open.
    pub fn expired(&self, now: i64, expiration_ms: i64) -> bool {
        self.state.is_idle() && now.saturating_sub(self.update_ms) > expiration_ms
    }

    /// Whether the open transaction outlived its timeout at `now`.
    pub fn timed_out(&self, now: i64) -> bool {
        self.state == TxnState::Ongoing
            && self.start_ms >= 0
            && now.saturating_sub(self.start_ms) > i64::from(self.timeout_ms)
    }
}

/// The record value of a state.
pub fn encode(meta: &TxnMeta) -> Vec<u8> {
    serde_json::to_vec(meta).unwrap_or_default()
}

/// A record value read back; `None` for a malformed one.
pub fn decode(bytes: &[u8]) -> Option<TxnMeta> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(topic: &str, partition: u32) -> (String, u32) {
        (topic.to_string(), partition)
    }

    #[test]
    fn a_transaction_opens_at_its_first_partition_and_ends_with_an_epoch_bump() {
        let meta = TxnMeta::new(7, 1000, 0);
        let open = meta
            .add_partitions(7, 0, &[tp("a", 0)], 10)
            .expect("add")
            .expect("changed");
        assert_eq!((open.state, open.start_ms), (TxnState::Ongoing, 10));
        assert_eq!(open.add_partitions(7, 0, &[tp("a", 0)], 11), Ok(None));
        let open = open
            .add_partitions(7, 0, &[tp("b", 1)], 12)
            .expect("add")
            .expect("changed");
        assert_eq!(open.partitions.len(), 2);
        let EndDecision::Prepare(prepared) = open.end(7, 0, true, 20).expect("end") else {
            panic!("a commit to prepare");
        };
        assert_eq!(
            (prepared.state, prepared.producer_epoch),
            (TxnState::PrepareCommit, 1)
        );
        // While the markers are written, nothing joins, and a repeat waits for them.
        assert_eq!(
            prepared.add_partitions(7, 1, &[tp("a", 0)], 21),
            Err(TxnError::Concurrent)
        );
        assert_eq!(
            prepared.end(7, 0, true, 21),
            Ok(EndDecision::Repeat { epoch: 1 })
        );
        let done = prepared.complete(30);
        assert_eq!(done.state, TxnState::CompleteCommit);
        assert!(done.partitions.is_empty());
        // The old epoch is fenced; the new one opens the next transaction.
        assert!(matches!(
            done.add_partitions(7, 0, &[tp("a", 0)], 31),
            Err(TxnError::Fenced(_))
        ));
        assert!(done.add_partitions(7, 1, &[tp("a", 0)], 31).is_ok());
        // Ending a transaction that wrote nothing bumps the epoch all the same, so a
        // late join of it is fenced; a repeat of that end answers the same epoch.
        let Ok(EndDecision::Empty(empty)) = done.end(7, 1, false, 32) else {
            panic!("an empty end");
        };
        assert_eq!(empty.producer_epoch, 2);
        assert!(matches!(
            empty.add_partitions(7, 1, &[tp("a", 0)], 33),
            Err(TxnError::Fenced(_))
        ));
        assert_eq!(
            empty.end(7, 1, false, 34),
            Ok(EndDecision::Repeat { epoch: 2 })
        );
    }

    #[test]
    fn a_timed_out_transaction_is_aborted_and_its_commit_refused() {
        let open = TxnMeta::new(3, 100, 0)
            .add_partitions(3, 0, &[tp("a", 0)], 0)
            .expect("add")
            .expect("changed");
        assert!(!open.timed_out(100));
        assert!(open.timed_out(101));
        let aborted = open.abort(101).expect("open").complete(102);
        assert_eq!(
            (aborted.state, aborted.producer_epoch),
            (TxnState::CompleteAbort, 1)
        );
        assert!(matches!(
            aborted.end(3, 0, true, 103),
            Err(TxnError::InvalidState(_))
        ));
        assert_eq!(
            aborted.end(3, 0, false, 103),
            Ok(EndDecision::Repeat { epoch: 1 })
        );
        // A new instance gets the next epoch; one near the end gets a new id.
        let again = aborted.reinitialise(None, 100, 104);
        assert_eq!((again.producer_epoch, again.state), (2, TxnState::Empty));
        let mut old = again.clone();
        old.producer_epoch = i16::MAX - 3;
        assert!(old.epoch_exhausted());
        let fresh = old.reinitialise(Some(99), 100, 105);
        assert_eq!((fresh.producer_id, fresh.producer_epoch), (99, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u32),
        /// The current producer (or, with `stale`, the previous epoch) ends.
        End {
            commit: bool,
            stale: bool,
        },
        Abort,
        Complete,
        Reinitialise,
        Tick(u16),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u32..3).prop_map(Op::Add),
            3 => (any::<bool>(), proptest::bool::weighted(0.2)).prop_map(|(commit, stale)| Op::End { commit, stale }),
            1 => Just(Op::Abort),
            3 => Just(Op::Complete),
            1 => Just(Op::Reinitialise),
            1 => any::<u16>().prop_map(Op::Tick),
        ]
    }

    proptest::proptest! {
        /// Through any sequence of calls: the epoch never goes back, a transaction is
        /// prepared only from Ongoing and with a bumped epoch, nothing joins while one is
        /// prepared, idle states hold no partitions, and a stale producer changes
        /// nothing.
        #[test]
        fn the_state_machine_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..80)) {
            let mut meta = TxnMeta::new(1, 1_000, 0);
            let mut now = 0i64;
            for op in ops {
                let before = meta.clone();
                match op {
                    Op::Add(p) => match meta.add_partitions(1, meta.producer_epoch, &[tp("t", p)], now) {
                        Ok(Some(next)) => {
                            proptest::prop_assert!(!before.state.is_prepared());
                            proptest::prop_assert_eq!(next.state, TxnState::Ongoing);
                            meta = next;
                        }
                        Ok(None) => proptest::prop_assert_eq!(before.state, TxnState::Ongoing),
                        Err(TxnError::Concurrent) => proptest::prop_assert!(before.state.is_prepared()),
                        Err(other) => proptest::prop_assert!(false, "{other:?}"),
                    },
                    Op::End { commit, stale } => {
                        let epoch = if stale { meta.producer_epoch - 1 } else { meta.producer_epoch };
                        match meta.end(1, epoch, commit, now) {
                            Ok(EndDecision::Prepare(next)) => {
                                proptest::prop_assert!(!stale);
                                proptest::prop_assert_eq!(before.state, TxnState::Ongoing);
                                proptest::prop_assert_eq!(next.producer_epoch, before.producer_epoch + 1);
                                proptest::prop_assert!(next.state.is_prepared());
                                meta = next;
                            }
                            Ok(EndDecision::Repeat { epoch }) => {
                                proptest::prop_assert_eq!(epoch, meta.producer_epoch);
                            }
                            Ok(EndDecision::Empty(next)) => {
                                proptest::prop_assert!(!stale);
                                proptest::prop_assert!(!before.state.is_prepared() && before.state != TxnState::Ongoing);
                                proptest::prop_assert_eq!(next.producer_epoch, before.producer_epoch + 1);
                                proptest::prop_assert!(next.partitions.is_empty());
                                meta = next;
                            }
                            Err(_) => {}
                        }
                    }
                    Op::Abort => {
                        if let Some(next) = meta.abort(now) {
                            proptest::prop_assert_eq!(before.state, TxnState::Ongoing);
                            proptest::prop_assert_eq!(next.producer_epoch, before.producer_epoch + 1);
                            meta = next;
                        }
                    }
                    Op::Complete => {
                        if meta.state.is_prepared() {
                            meta = meta.complete(now);
                        }
                    }
                    Op::Reinitialise => {
                        if !meta.state.is_prepared() && meta.state != TxnState::Ongoing {
                            meta = meta.reinitialise(None, 1_000, now);
                            proptest::prop_assert_eq!(meta.producer_epoch, before.producer_epoch + 1);
                        }
                    }
                    Op::Tick(ms) => {
                        now += i64::from(ms);
                        if meta.timed_out(now) {
                            meta = meta.abort(now).expect("an open transaction");
                        }
                    }
                }
                proptest::prop_assert!(meta.producer_epoch >= before.producer_epoch);
                if meta.state.is_idle() {
                    proptest::prop_assert!(meta.partitions.is_empty());
                    proptest::prop_assert_eq!(meta.start_ms, -1);
                }
            }
        }
    }

    #[test]
    fn states_round_trip_and_garbage_is_refused() {
        let meta = TxnMeta::new(1, 5, 2)
            .add_partitions(1, 0, &[tp("x", 3)], 4)
            .expect("add")
            .expect("changed");
        assert_eq!(decode(&encode(&meta)), Some(meta));
        assert_eq!(decode(b"{not json"), None);
    }
}
