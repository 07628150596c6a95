use super::*;
use proptest::prelude::*;

fn stores() -> Layout {
    Layout {
        declared: vec!["counts".to_string(), "totals".to_string()],
        tables: Vec::new(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(u32, u8, u8),
    Delete(u32, u8),
    EndCall(bool),
    Commit,
    Abort,
    Flush,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..2, 0u8..12, any::<u8>()).prop_map(|(s, k, v)| Op::Put(s, k, v)),
        2 => (0u32..2, 0u8..12).prop_map(|(s, k)| Op::Delete(s, k)),
        3 => any::<bool>().prop_map(Op::EndCall),
        2 => Just(Op::Commit),
        1 => Just(Op::Abort),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

/// Writes of the two stores: `None` deletes.
type Writes = [BTreeMap<Vec<u8>, Option<Vec<u8>>>; 2];

/// What the stores must hold: committed, pending (finished calls) and the running call;
/// and what a crash keeps (the committed state of the last flush, with its checkpoint).
#[derive(Default, Clone)]
struct Model {
    committed: [BTreeMap<Vec<u8>, Vec<u8>>; 2],
    checkpoint: i64,
    flushed: [BTreeMap<Vec<u8>, Vec<u8>>; 2],
    flushed_checkpoint: i64,
    pending: Vec<Writes>,
    call: Writes,
}

impl Model {
    fn view(&self, store: usize) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut view = self.committed[store].clone();
        for layer in self.pending.iter().chain(std::iter::once(&self.call)) {
            for (k, v) in &layer[store] {
                match v {
                    Some(v) => view.insert(k.clone(), v.clone()),
                    None => view.remove(k),
                };
            }
        }
        view
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Reads through the layers agree with a model through calls kept and dropped,
    /// commits, aborts, flushes, reopens (which lose everything not committed) and
    /// crashes (which lose everything not flushed, and keep the checkpoint of what they
    /// keep).
    #[test]
    fn stores_agree_with_a_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().expect("ok");
        let open = || {
            let mut task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
            // Only the test's flushes, reopens and closes flush.
            task.flush_every(std::time::Duration::MAX);
            task
        };
        let mut task = open();
        let mut model = Model::default();
        let mut unit = 0u64;
        for op in ops {
            match op {
                Op::Put(s, k, v) => {
                    task.put(s, vec![k], vec![v]).expect("ok");
                    model.call[s as usize].insert(vec![k], Some(vec![v]));
                }
                Op::Delete(s, k) => {
                    task.delete(s, vec![k]).expect("ok");
                    model.call[s as usize].insert(vec![k], None);
                }
                Op::EndCall(keep) => {
                    let writes = task.end_call(keep, unit);
                    let call = std::mem::take(&mut model.call);
                    if keep {
                        let expected: usize = call.iter().map(BTreeMap::len).sum();
                        prop_assert_eq!(writes.len(), expected);
                        model.pending.push(call);
                    } else {
                        prop_assert!(writes.is_empty());
                    }
                }
                Op::Commit => {
                    task.commit(unit, &BTreeMap::from([(0, unit as i64 + 1)])).expect("ok");
                    model.checkpoint = unit as i64 + 1;
                    for layer in std::mem::take(&mut model.pending) {
                        for (s, writes) in layer.into_iter().enumerate() {
                            for (k, v) in writes {
                                match v {
                                    Some(v) => model.committed[s].insert(k, v),
                                    None => model.committed[s].remove(&k),
                                };
                            }
                        }
                    }
                    unit += 1;
                }
                Op::Abort => {
                    task.abort();
                    model.pending.clear();
                    model.call = Default::default();
                    unit += 1;
                }
                Op::Flush => {
                    task.flush().expect("ok");
                    model.flushed = model.committed.clone();
                    model.flushed_checkpoint = model.checkpoint;
                }
                Op::Reopen => {
                    drop(task);
                    task = open();
                    model.pending.clear();
                    model.call = Default::default();
                    model.flushed = model.committed.clone();
                    model.flushed_checkpoint = model.checkpoint;
                }
                Op::Crash => {
                    task.crash();
                    task = open();
                    model.pending.clear();
                    model.call = Default::default();
                    model.committed = model.flushed.clone();
                    model.checkpoint = model.flushed_checkpoint;
                }
            }
            prop_assert_eq!(task.checkpoint(0).expect("ok"), model.checkpoint);
            let committed: Vec<(Vec<u8>, Vec<u8>)> = model.committed[1].clone().into_iter().collect();
            prop_assert_eq!(task.committed_range("totals", &[], None, 100).expect("ok"), committed);
            for store in 0..2u32 {
                let view = model.view(store as usize);
                for k in 0u8..12 {
                    prop_assert_eq!(task.get(store, &[k]).expect("ok"), view.get(&vec![k]).cloned());
                }
                let all: Vec<(Vec<u8>, Vec<u8>)> = view.clone().into_iter().collect();
                prop_assert_eq!(task.range(store, &[], None, 100).expect("ok"), all);
                let some: Vec<(Vec<u8>, Vec<u8>)> = view
                    .range(vec![3u8]..vec![9u8])
                    .take(3)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(task.range(store, &[3], Some(&[9]), 3).expect("ok"), some);
            }
        }
    }
}

#[test]
fn tables_are_read_only_to_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout {
        declared: vec!["counts".to_string()],
        tables: vec![("customers".to_string(), "customers-topic".to_string())],
    };
    assert_eq!(
        layout.topics("app"),
        [
            "app-counts-changelog",
            "customers-topic",
            "app-__runnel-changelog"
        ]
    );
    assert_eq!(
        layout.produced("app"),
        ["app-counts-changelog", "app-__runnel-changelog"]
    );
    let mut task = TaskState::open(dir.path(), 0, &layout).expect("opens");
    assert!(matches!(
        task.put(1, b"c1".to_vec(), b"{}".to_vec()),
        Err(StateError::ReadOnly { .. })
    ));
    let records: [(&[u8], Option<&[u8]>); 1] = [(b"c1", Some(b"ada"))];
    task.restore(1, records.into_iter(), 1).expect("restores");
    assert_eq!(task.get(1, b"c1").expect("reads"), Some(b"ada".to_vec()));
    task.put(0, b"k".to_vec(), b"1".to_vec()).expect("writes");
}

#[test]
fn undeclared_stores_and_oversized_values_are_refused() {
    let dir = tempfile::tempdir().expect("ok");
    let mut task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
    // The internal store (index 2) is not the guest's.
    assert!(matches!(
        task.put(2, b"k".to_vec(), b"v".to_vec()),
        Err(StateError::UnknownStore { store: 2, .. })
    ));
    assert!(matches!(
        task.get(7, b"k"),
        Err(StateError::UnknownStore { store: 7, .. })
    ));
    assert!(matches!(
        task.put(0, b"k".to_vec(), vec![0; VALUE_BYTES_MAX + 1]),
        Err(StateError::ValueTooLarge { .. })
    ));
    assert!(matches!(
        task.put(0, vec![0; KEY_BYTES_MAX + 1], Vec::new()),
        Err(StateError::KeyTooLarge { .. })
    ));
}

#[test]
fn checkpoints_commit_with_the_writes_and_restore_wipes() {
    let dir = tempfile::tempdir().expect("ok");
    let mut task = TaskState::open(dir.path(), 3, &stores()).expect("ok");
    assert_eq!(task.checkpoint(0).expect("ok"), 0);
    task.put(0, b"a".to_vec(), b"1".to_vec()).expect("ok");
    task.end_call(true, 1);
    task.commit(1, &BTreeMap::from([(0, 17)])).expect("ok");
    drop(task);
    let mut task = TaskState::open(dir.path(), 3, &stores()).expect("ok");
    assert_eq!(task.checkpoint(0).expect("ok"), 17);
    assert_eq!(task.get(0, b"a").expect("ok"), Some(b"1".to_vec()));
    let records: [(&[u8], Option<&[u8]>); 2] = [(b"b", Some(b"2")), (b"a", None)];
    task.restore(0, records.into_iter(), 20).expect("ok");
    assert_eq!(task.checkpoint(0).expect("ok"), 20);
    assert_eq!(task.get(0, b"a").expect("ok"), None);
    task.wipe(0).expect("ok");
    assert_eq!(task.checkpoint(0).expect("ok"), 0);
    assert_eq!(task.get(0, b"b").expect("ok"), None);
}

#[test]
fn timers_come_due_in_time_order_and_the_watermark_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("ok");
    let mut task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
    assert_eq!(task.max_timestamp_ms(), i64::MIN);
    for (at, key) in [(60_000, "b"), (-5, "neg"), (60_000, "a"), (120_000, "c")] {
        task.schedule(&Timer {
            clock: 0,
            at_ms: at,
            key: key.into(),
        })
        .expect("ok");
    }
    task.schedule(&Timer {
        clock: 1,
        at_ms: 0,
        key: b"wall".to_vec(),
    })
    .expect("ok");
    task.observe_timestamp(90_000);
    let due: Vec<(i64, Vec<u8>)> = task
        .due_timers(0, 60_000, 10)
        .expect("ok")
        .into_iter()
        .map(|t| (t.at_ms, t.key))
        .collect();
    assert_eq!(
        due,
        vec![
            (-5, b"neg".to_vec()),
            (60_000, b"a".to_vec()),
            (60_000, b"b".to_vec())
        ]
    );
    assert_eq!(task.due_timers(0, i64::MAX, 10).expect("ok").len(), 4);
    task.end_call(true, 0);
    task.commit(0, &BTreeMap::new()).expect("ok");
    drop(task);
    let task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
    assert_eq!(task.max_timestamp_ms(), 90_000);
    assert_eq!(task.due_timers(1, 0, 10).expect("ok").len(), 1);
}

#[test]
fn a_cache_past_its_byte_bound_flushes_and_starts_again_empty() {
    let dir = tempfile::tempdir().expect("ok");
    let mut task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
    task.flush_every(std::time::Duration::MAX);
    let value = vec![7u8; VALUE_BYTES_MAX];
    let values = CACHE_BYTES_MAX / VALUE_BYTES_MAX + 2;
    for unit in 0..values {
        task.put(0, unit.to_be_bytes().to_vec(), value.clone())
            .expect("ok");
        task.end_call(true, unit as u64);
        task.commit(unit as u64, &BTreeMap::from([(0, unit as i64 + 1)]))
            .expect("ok");
        assert!(task.cache.bytes < CACHE_BYTES_MAX + 2 * VALUE_BYTES_MAX);
    }
    // The commit that filled it flushed: RocksDB holds what the cache let go.
    assert!(task.cache.entries() < values, "{}", task.cache.entries());
    assert!(task.checkpoint(0).expect("ok") == values as i64);
    task.crash();
    let mut task = TaskState::open(dir.path(), 0, &stores()).expect("ok");
    let flushed = task.checkpoint(0).expect("ok");
    assert!(flushed > 0, "nothing was flushed");
    for unit in 0..flushed as usize {
        assert_eq!(
            task.get(0, &unit.to_be_bytes())
                .expect("ok")
                .map(|v| v.len()),
            Some(VALUE_BYTES_MAX)
        );
    }
}
