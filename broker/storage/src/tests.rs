use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use runnel_batch::{BatchOptions, Record, TimestampType, batches, decode_records, encode};

use crate::*;

fn rec(key: Option<&str>, value: Option<&str>, ts: i64) -> Record {
    Record {
        offset: 0,
        timestamp_ms: ts,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        headers: vec![],
    }
}

fn batch_of(records: &[Record]) -> Vec<u8> {
    encode(records, BatchOptions::default()).to_vec()
}

fn append(log: &mut Log, records: &[Record], now_ms: i64) -> AppendInfo {
    log.append(&batch_of(records), 0, now_ms).expect("append")
}

/// Calls `f` with every batch from the log start to the end (header, bytes, and the
/// offset the read asked for), read batch by batch.
fn each_batch(log: &Log, mut f: impl FnMut(&runnel_batch::BatchHeader, &[u8], i64)) {
    let mut offset = log.log_start_offset();
    let end = log.log_end_offset();
    while offset < end {
        let bytes = log.read(offset, 1 << 20, end).expect("read");
        if bytes.is_empty() {
            break;
        }
        for batch in batches(&bytes) {
            let (header, raw) = batch.expect("valid batch");
            f(&header, raw, offset);
            offset = header.next_offset();
        }
    }
}

/// Every record from the log start to the end.
fn read_all(log: &Log) -> Vec<Record> {
    let mut out = Vec::new();
    each_batch(log, |_, raw, from| {
        let records = decode_records(raw).expect("decode");
        out.extend(records.into_iter().filter(|r| r.offset >= from));
    });
    out
}

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 400,
        index_interval_bytes: 100,
        retention_ms: -1,
        ..LogConfig::default()
    }
}

fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or(b"<null>")).into_owned())
        .collect()
}

/// The log's segment files, oldest first.
fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs
}

fn active_log_file(dir: &Path) -> std::path::PathBuf {
    segment_files(dir).pop().expect("a log file")
}

/// [`small_config`] with compaction and no deletion.
fn compacted() -> LogConfig {
    LogConfig {
        cleanup_policy: CleanupPolicy {
            delete: false,
            compact: true,
        },
        ..small_config()
    }
}

#[test]
fn appends_get_dense_offsets_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    let first = append(
        &mut log,
        &[rec(Some("a"), Some("1"), 10), rec(None, Some("2"), 11)],
        0,
    );
    let second = append(&mut log, &[rec(Some("b"), Some("3"), 12)], 0);
    assert_eq!((first.base_offset, first.last_offset), (0, 1));
    assert_eq!((second.base_offset, second.last_offset), (2, 2));
    assert_eq!(log.log_end_offset(), 3);
    let all = read_all(&log);
    assert_eq!(values(&all), ["1", "2", "3"]);
    assert_eq!(all.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2]);
    // A read from the middle of a batch returns that batch.
    let bytes = log.read(1, 1 << 20, 3).expect("read");
    assert_eq!(
        batches(&bytes)
            .next()
            .expect("batch")
            .expect("ok")
            .0
            .base_offset,
        0
    );
    // The upper bound (high watermark) hides later batches.
    let bytes = log.read(0, 1 << 20, 2).expect("read");
    assert_eq!(batches(&bytes).count(), 1);
    assert!(log.read(3, 1 << 20, 3).expect("at end").is_empty());
    assert!(matches!(
        log.read(4, 100, 3),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
    // Reading into a reused buffer appends exactly what a plain read returns.
    let mut reused = bytes::BytesMut::from(&b"earlier"[..]);
    let appended = log
        .read_into(0, 1 << 20, 3, &mut reused)
        .expect("read into");
    let plain = log.read(0, 1 << 20, 3).expect("read");
    assert_eq!(appended, plain.len());
    assert_eq!(&reused[..7], b"earlier");
    assert_eq!(&reused[7..], &plain[..]);
    assert_eq!(
        log.read_into(3, 1 << 20, 3, &mut reused).expect("at end"),
        0
    );
}

#[test]
fn bad_batches_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        max_message_bytes: 200,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    let big = "x".repeat(300);
    let err = log
        .append(&batch_of(&[rec(None, Some(&big), 1)]), 0, 0)
        .expect_err("too large");
    assert!(
        matches!(
            err,
            AppendError::RecordTooLarge {
                size_bytes_max: 200,
                ..
            }
        ),
        "{err}"
    );
    let mut corrupt = batch_of(&[rec(None, Some("v"), 1)]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert!(matches!(
        log.append(&corrupt, 0, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    let empty = batch_of(&[]);
    assert!(matches!(
        log.append(&empty, 0, 0),
        Err(AppendError::EmptyBatch)
    ));
    let mut two = batch_of(&[rec(None, Some("v"), 1)]);
    two.extend(batch_of(&[rec(None, Some("w"), 1)]));
    assert!(matches!(
        log.append(&two, 0, 0),
        Err(AppendError::InconsistentBatch { .. })
    ));
    assert_eq!(log.log_end_offset(), 0);
    assert_eq!(log.snapshot().size_bytes, 0);
}

#[test]
fn segments_roll_by_size_and_age_and_lookups_span_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_ms: 1000,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    for i in 0..40 {
        append(
            &mut log,
            &[rec(None, Some(&format!("value-{i:03}")), i * 10)],
            i * 10,
        );
    }
    let by_size = log.snapshot().segment_count;
    assert!(by_size > 3, "segments: {by_size}");
    for target in [0, 7, 19, 33, 39] {
        let bytes = log.read(target, 1, 40).expect("read");
        let (header, _) = batches(&bytes).next().expect("one").expect("ok");
        assert_eq!(header.base_offset, target);
    }
    // Age: the active segment's first batch has timestamp 390; at 5000 it is old.
    let before = log.snapshot().segment_count;
    append(&mut log, &[rec(None, Some("late"), 5000)], 5000);
    assert_eq!(log.snapshot().segment_count, before + 1);
}

#[test]
fn timestamp_lookup_finds_first_record_at_or_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    for i in 0..30 {
        append(
            &mut log,
            &[
                rec(None, Some("a"), 1000 + i * 100),
                rec(None, Some("b"), 1050 + i * 100),
            ],
            0,
        );
    }
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(1050).expect("lookup"), Some(1));
    assert_eq!(log.offset_for_timestamp(1051).expect("lookup"), Some(2));
    assert_eq!(log.offset_for_timestamp(2500).expect("lookup"), Some(30));
    assert_eq!(log.offset_for_timestamp(99_999).expect("lookup"), None);
}

#[test]
fn retention_by_time_and_size_deletes_whole_old_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        retention_ms: 1000,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config.clone(), 0).expect("open");
    for i in 0..30 {
        append(&mut log, &[rec(None, Some("0123456789"), i * 100)], i * 100);
    }
    let segments = log.snapshot().segment_count;
    let deleted = log.enforce_retention(2500).expect("retention");
    assert!(deleted > 0 && deleted < segments);
    let start = log.log_start_offset();
    assert!(start > 0);
    assert!(matches!(
        log.read(0, 100, 30),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
    // Everything that is left is younger than the cut or in the segment straddling it.
    assert_eq!(read_all(&log).first().map(|r| r.offset), Some(start));
    // Everything expired: the active segment stays.
    log.enforce_retention(1_000_000).expect("retention");
    assert_eq!(log.snapshot().segment_count, 1);
    assert_eq!(log.log_end_offset(), 30);

    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        retention_bytes: 800,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    for i in 0..30 {
        append(&mut log, &[rec(None, Some("0123456789"), i)], i);
    }
    log.enforce_retention(0).expect("retention");
    let size = log.snapshot().size_bytes;
    assert!(size <= 800 + 400, "size {size}");
    assert!(size >= 800 - 400, "size {size}");
}

#[test]
fn delete_records_moves_log_start_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    for i in 0..20 {
        append(&mut log, &[rec(None, Some(&format!("{i}")), i)], i);
    }
    assert_eq!(log.delete_records(12).expect("trim"), 12);
    assert!(matches!(
        log.read(11, 100, 20),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
    assert_eq!(read_all(&log).first().map(|r| r.offset), Some(12));
    assert!(matches!(
        log.delete_records(21),
        Err(ReadError::OffsetOutOfRange { .. })
    ));
    log.close().expect("close");
    let log = Log::open(dir.path(), small_config(), 0).expect("reopen");
    assert_eq!(log.log_start_offset(), 12);
    assert_eq!(read_all(&log).len(), 8);
}

#[test]
fn compaction_keeps_latest_per_key_and_expires_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        delete_retention_ms: 1000,
        ..compacted()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    for i in 0..30 {
        let key = format!("k{}", i % 3);
        append(&mut log, &[rec(Some(&key), Some(&format!("v{i}")), i)], i);
    }
    append(&mut log, &[rec(Some("k0"), None, 30)], 30);
    for i in 31..45 {
        append(
            &mut log,
            &[rec(Some("other"), Some(&format!("v{i}")), i)],
            i,
        );
    }
    let stats = log.compact(100).expect("compact");
    assert!(stats.records_removed > 0);
    let all = read_all(&log);
    let last_for = |key: &str| {
        all.iter()
            .rev()
            .find(|r| r.key.as_deref() == Some(key.as_bytes()))
            .cloned()
    };
    assert_eq!(
        last_for("k1").and_then(|r| r.value),
        Some(Bytes::from("v28"))
    );
    assert_eq!(
        last_for("k2").and_then(|r| r.value),
        Some(Bytes::from("v29"))
    );
    assert_eq!(
        last_for("k0").map(|r| r.value),
        Some(None),
        "tombstone kept while young"
    );
    assert_eq!(
        all.iter()
            .filter(|r| r.key.as_deref() == Some(b"k1"))
            .count(),
        1
    );
    // Offsets are preserved and strictly increasing.
    assert!(all.windows(2).all(|w| w[0].offset < w[1].offset));
    assert_eq!(
        all.iter()
            .find(|r| r.value.as_deref() == Some(b"v28"))
            .map(|r| r.offset),
        Some(28)
    );
    assert_eq!(log.log_end_offset(), 45);
    // Later, the tombstone and every k0 record are gone.
    for i in 45..60 {
        append(
            &mut log,
            &[rec(Some("other"), Some(&format!("v{i}")), 5000)],
            5000,
        );
    }
    log.compact(10_000).expect("compact");
    let all = read_all(&log);
    assert!(all.iter().all(|r| r.key.as_deref() != Some(b"k0")));
    log.close().expect("close");
    let reopened = Log::open(dir.path(), LogConfig::default(), 0).expect("reopen");
    assert_eq!(values(&read_all(&reopened)), values(&all));
}

#[test]
fn truncation_cuts_at_batch_boundaries_and_trims_epochs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    for i in 0..10 {
        let epoch = if i < 5 { 1 } else { 2 };
        let batch = batch_of(&[rec(None, Some("a"), i), rec(None, Some("b"), i)]);
        log.append(&batch, epoch, 0).expect("append");
    }
    assert_eq!(log.end_offset_for_epoch(1), Some((1, 10)));
    log.truncate_to(13).expect("truncate");
    assert_eq!(
        log.log_end_offset(),
        12,
        "offset 13 sits in the batch 12..=13"
    );
    log.truncate_to(8).expect("truncate");
    assert_eq!(log.log_end_offset(), 8);
    assert_eq!(log.leader_epochs().len(), 1);
    assert_eq!(log.end_offset_for_epoch(2), Some((1, 8)));
    let info = append(&mut log, &[rec(None, Some("c"), 0)], 0);
    assert_eq!(info.base_offset, 8);
    drop(log);
    let log = Log::open(dir.path(), small_config(), 0).expect("reopen");
    assert_eq!(log.log_end_offset(), 9);
    assert_eq!(read_all(&log).len(), 9);
}

#[test]
fn truncating_at_the_end_drops_an_epoch_without_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    let batch = batch_of(&[rec(None, Some("a"), 0)]);
    log.append(&batch, 1, 0).expect("append");
    // A leader of epoch 2 that wrote nothing before it lost the leadership.
    log.assign_epoch(2).expect("assign");
    assert_eq!(log.latest_epoch(), 2);
    // Its new leader has no epoch 2: epoch 1 ends at 1, the log end.
    log.truncate_to(1).expect("truncate");
    assert_eq!(log.log_end_offset(), 1);
    assert_eq!(log.latest_epoch(), 1);
    drop(log);
    let log = Log::open(dir.path(), small_config(), 0).expect("reopen");
    assert_eq!(log.latest_epoch(), 1, "the checkpoint forgot epoch 2 too");
}

#[test]
fn log_append_time_stamps_the_broker_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        timestamp_type: TimestampType::LogAppendTime,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    let info = log
        .append(&batch_of(&[rec(None, Some("v"), 5)]), 0, 12345)
        .expect("append");
    assert_eq!(info.log_append_time_ms, Some(12345));
    assert_eq!(read_all(&log)[0].timestamp_ms, 12345);
}

/// Writes 3 segments' worth of batches, then simulates a crash (drop without close).
fn crashed_log(dir: &Path) -> Vec<Record> {
    let mut log = Log::open(dir, small_config(), 0).expect("open");
    for i in 0..25 {
        append(
            &mut log,
            &[rec(Some("k"), Some(&format!("value-{i:02}")), i)],
            i,
        );
    }
    let all = read_all(&log);
    drop(log);
    all
}

fn lookups(log: &Log) -> Vec<(i64, Option<i64>)> {
    (0..log.log_end_offset())
        .map(|o| {
            let bytes = log.read(o, 1, log.log_end_offset()).expect("read");
            let base = batches(&bytes)
                .next()
                .map(|b| b.expect("valid").0.base_offset);
            (o, base)
        })
        .chain((0..30).map(|ts| (-ts, log.offset_for_timestamp(ts).expect("ts"))))
        .collect()
}

#[test]
fn crash_recovery_truncates_torn_tails_to_the_last_valid_batch() {
    type Damage = fn(&Path, u64);
    let cases: [(&str, Damage); 4] = [
        ("cut mid-batch", |file, len| {
            OpenOptions::new()
                .write(true)
                .open(file)
                .expect("open")
                .set_len(len - 5)
                .expect("cut");
        }),
        ("garbage appended", |file, _| {
            let mut f = OpenOptions::new().append(true).open(file).expect("open");
            f.write_all(&[0xAB; 37]).expect("garbage");
        }),
        ("byte flipped in last batch", |file, len| {
            let mut bytes = fs::read(file).expect("read");
            bytes[len as usize - 3] ^= 0x40;
            fs::write(file, bytes).expect("write");
        }),
        ("length field of last batch damaged", |file, len| {
            let mut bytes = fs::read(file).expect("read");
            let last_start = batches(&bytes)
                .map(|b| b.expect("ok").1.len())
                .sum::<usize>()
                - batches(&bytes).last().expect("one").expect("ok").1.len();
            assert!(last_start < len as usize);
            bytes[last_start + 9] = 0x7f;
            fs::write(file, bytes).expect("write");
        }),
    ];
    for (name, damage) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = crashed_log(dir.path());
        let file = active_log_file(dir.path());
        let len = fs::metadata(&file).expect("meta").len();
        let garbage_only = name == "garbage appended";
        damage(&file, len);
        let log =
            Log::open(dir.path(), small_config(), 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = if garbage_only {
            &written[..]
        } else {
            &written[..written.len() - 1]
        };
        assert_eq!(values(&read_all(&log)), values(expected), "{name}");
        assert_eq!(log.recovered_tails().len(), 1, "{name}");
        // A fresh log with the same records answers lookups the same way.
        let twin_dir = tempfile::tempdir().expect("tempdir");
        let mut twin = Log::open(twin_dir.path(), small_config(), 0).expect("open");
        for (i, r) in expected.iter().enumerate() {
            append(&mut twin, std::slice::from_ref(r), i as i64);
        }
        assert_eq!(lookups(&log), lookups(&twin), "{name}");
    }
}

#[test]
fn damaged_or_missing_indexes_are_rebuilt() {
    for damage in ["delete", "garbage", "shorten"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
        for i in 0..60 {
            append(&mut log, &[rec(None, Some(&format!("v{i}")), i)], i);
        }
        let before = lookups(&log);
        log.close().expect("close");
        for entry in fs::read_dir(dir.path()).expect("dir") {
            let path = entry.expect("entry").path();
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            if ext == "index" || ext == "timeindex" {
                match damage {
                    "delete" => fs::remove_file(&path).expect("rm"),
                    "garbage" => fs::write(&path, [0x5a; 24]).expect("write"),
                    _ => {
                        let len = fs::metadata(&path).expect("meta").len();
                        OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .expect("open")
                            .set_len(len / 2)
                            .expect("cut");
                    }
                }
            }
        }
        let log = Log::open(dir.path(), small_config(), 0).expect("reopen");
        assert_eq!(lookups(&log), before, "{damage}");
    }
}

#[test]
fn interior_damage_fails_closed_naming_file_and_position() {
    // After a crash: the open notices a valid batch after the damaged one.
    let dir = tempfile::tempdir().expect("tempdir");
    crashed_log(dir.path());
    let file = active_log_file(dir.path());
    let mut bytes = fs::read(&file).expect("read");
    let first_len = batches(&bytes).next().expect("one").expect("ok").1.len();
    bytes[first_len - 2] ^= 0x01;
    fs::write(&file, &bytes).expect("write");
    let err = Log::open(dir.path(), small_config(), 0).expect_err("must fail closed");
    let msg = err.to_string();
    assert!(
        matches!(err, StorageError::Corrupt { position: 0, .. }),
        "{msg}"
    );
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    // After a clean close: the open trusts the log, the read catches it.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    for i in 0..25 {
        append(&mut log, &[rec(None, Some(&format!("value-{i:02}")), i)], i);
    }
    log.close().expect("close");
    let first_segment = segment_files(dir.path()).remove(0);
    let mut bytes = fs::read(&first_segment).expect("read");
    let first_len = batches(&bytes).next().expect("one").expect("ok").1.len();
    bytes[first_len + 30] ^= 0x01;
    fs::write(&first_segment, &bytes).expect("write");
    let log = Log::open(dir.path(), small_config(), 0).expect("trusted open");
    let err = log.read(1, 1 << 20, 25).expect_err("must fail closed");
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains(&first_segment.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains(&format!("byte {first_len}")), "{msg}");
    // Undamaged batches are still served.
    assert!(log.read(0, 1, 25).is_ok());
}

#[test]
fn flush_policy_decides_when_to_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        flush: FlushPolicy::Interval {
            messages: 3,
            ms: 1000,
        },
        ..small_config()
    };
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    append(&mut log, &[rec(None, Some("a"), 0)], 0);
    assert!(!log.maybe_flush(10).expect("flush"));
    append(
        &mut log,
        &[rec(None, Some("b"), 0), rec(None, Some("c"), 0)],
        0,
    );
    assert!(log.maybe_flush(20).expect("flush"));
    append(&mut log, &[rec(None, Some("d"), 0)], 0);
    assert!(log.maybe_flush(2000).expect("flush by time"));
    let every_dir = tempfile::tempdir().expect("tmp");
    let mut every = Log::open(every_dir.path(), small_config(), 0).expect("open");
    append(&mut every, &[rec(None, Some("a"), 0)], 0);
    assert!(every.maybe_flush(0).expect("flush"));
    assert!(!every.maybe_flush(0).expect("nothing left"));
}

/// Bytes of `path` in the page cache, as `fincore` (util-linux) reports them.
fn cached_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore runs (util-linux-extra; scripts/setup installs it)");
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("fincore prints a byte count")
}

const MIB: u64 = 1024 * 1024;

/// A directory for a page-cache test, beside the sources rather than in /tmp (on tmpfs,
/// where /tmp often is, pages cannot be dropped), and a config with segments of
/// `segment_bytes` that keeps `window` bytes cached and flushes only when told to.
fn page_cache_log(segment_bytes: u64, window: u64) -> (tempfile::TempDir, LogConfig) {
    let dir = tempfile::Builder::new()
        .prefix(".page-cache-test-")
        .tempdir_in(env!("CARGO_MANIFEST_DIR"))
        .expect("tempdir");
    let config = LogConfig {
        segment_bytes,
        retention_ms: -1,
        flush: FlushPolicy::Interval {
            messages: u64::MAX,
            ms: i64::MAX,
        },
        page_cache_bytes: window as i64,
        ..LogConfig::default()
    };
    (dir, config)
}

/// Appends `mib` megabytes as batches of one 256 KiB record.
fn append_mib(log: &mut Log, mib: u64) {
    let value = "v".repeat(256 * 1024);
    for _ in 0..4 * mib {
        append(log, &[rec(None, Some(&value), 0)], 0);
    }
}

#[test]
fn flushed_data_behind_the_page_cache_window_leaves_the_cache() {
    let (dir, config) = page_cache_log(3 * MIB, 2 * MIB);
    let mut log = Log::open(dir.path(), config.clone(), 0).expect("open");
    // Written but not flushed: nothing may be dropped, whatever the window says.
    append_mib(&mut log, 2);
    let first = segment_files(dir.path())[0].clone();
    assert!(cached_bytes(&first) >= 2 * MIB - 4096);
    // Flushed and within the window: kept.
    log.flush().expect("flush");
    assert!(cached_bytes(&first) >= 2 * MIB - 4096);
    // Five megabytes in two segments (eleven batches fill one): about the newest two
    // stay cached, the rest is dropped from the cache.
    append_mib(&mut log, 3);
    log.flush().expect("flush");
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let cached: Vec<u64> = files.iter().map(|f| cached_bytes(f)).collect();
    assert_eq!(cached[0], 0, "{cached:?}");
    assert!(cached[1] >= 2 * MIB, "{cached:?}");
    // Seven: the newest segment (six batches) and half a megabyte of the one before it.
    append_mib(&mut log, 2);
    log.flush().expect("flush");
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 3, "{files:?}");
    let cached: Vec<u64> = files.iter().map(|f| cached_bytes(f)).collect();
    assert!(cached[1] <= MIB / 2 + 8192, "{cached:?}");
    assert!(cached[1] + cached[2] >= 2 * MIB - 8192, "{cached:?}");
    // What left the cache is still there on disk.
    assert_eq!(read_all(&log).len(), 28);
    // -1 leaves the cache alone.
    drop(log);
    let keep = LogConfig {
        page_cache_bytes: -1,
        ..config
    };
    let mut log = Log::open(dir.path(), keep, 0).expect("reopen");
    let before = read_all(&log).len();
    append_mib(&mut log, 3);
    log.flush().expect("flush");
    assert_eq!(read_all(&log).len(), before + 12);
    let cached: u64 = segment_files(dir.path())
        .iter()
        .map(|f| cached_bytes(f))
        .sum();
    assert!(cached >= 10 * MIB, "everything stays cached: {cached}");
}

#[test]
fn data_a_reader_is_still_reading_stays_in_the_page_cache() {
    let (dir, config) = page_cache_log(64 * MIB, MIB);
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    let file = || segment_files(dir.path())[0].clone();
    // Nobody reads: only the window stays.
    append_mib(&mut log, 8);
    log.flush().expect("flush");
    assert!(
        cached_bytes(&file()) <= 2 * MIB,
        "{}",
        cached_bytes(&file())
    );
    // A reader at offset 32 (8 MiB in) keeps everything from there cached while the log
    // grows 8 MiB past it.
    assert!(log.read(32, 1, i64::MAX).expect("read").is_empty());
    append_mib(&mut log, 8);
    log.flush().expect("flush");
    assert!(
        cached_bytes(&file()) >= 8 * MIB - 4096,
        "{}",
        cached_bytes(&file())
    );
    // The reader moves on to offset 48 (12 MiB in): what it has read leaves the cache,
    // what it has not stays.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(!log.read(48, 1, i64::MAX).expect("read").is_empty());
        log.flush().expect("flush");
        let cached = cached_bytes(&file());
        assert!(cached >= 4 * MIB - 4096, "{cached}");
        if cached <= 5 * MIB {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still cached: {cached}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Once it stops reading, the window alone decides again.
    loop {
        log.flush().expect("flush");
        let cached = cached_bytes(&file());
        if cached <= 2 * MIB {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still cached: {cached}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(read_all(&log).len(), 64);
}

// ---------------------------------------------------------------------------------------
// Model-based property test.

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(Option<u8>, Option<u8>)>),
    Read(u16),
    Roll,
    Truncate(u16),
    Retention,
    DeleteRecords(u16),
    Compact,
    Reopen { clean: bool },
    Flush,
    Tick(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((proptest::option::of(0u8..6), proptest::option::weighted(0.9, any::<u8>())), 1..6).prop_map(Op::Append),
        2 => any::<u16>().prop_map(Op::Read),
        1 => Just(Op::Roll),
        1 => any::<u16>().prop_map(Op::Truncate),
        1 => Just(Op::Retention),
        1 => any::<u16>().prop_map(Op::DeleteRecords),
        1 => Just(Op::Compact),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => Just(Op::Flush),
        2 => any::<u16>().prop_map(Op::Tick),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct ModelRecord {
    offset: i64,
    batch_last: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    timestamp_ms: i64,
}

fn pick(frac: u16, lo: i64, hi: i64) -> i64 {
    if hi <= lo {
        lo
    } else {
        lo + i64::from(frac) % (hi - lo + 1)
    }
}

fn check_same(log: &Log, model: &[ModelRecord]) -> Result<(), TestCaseError> {
    let got: Vec<(i64, Option<Bytes>, Option<Bytes>, i64)> = read_all(log)
        .into_iter()
        .map(|r| (r.offset, r.key, r.value, r.timestamp_ms))
        .collect();
    let want: Vec<(i64, Option<Bytes>, Option<Bytes>, i64)> = model
        .iter()
        .filter(|r| r.offset >= log.log_start_offset())
        .map(|r| (r.offset, r.key.clone(), r.value.clone(), r.timestamp_ms))
        .collect();
    prop_assert_eq!(got, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..60), compact in any::<bool>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_bytes: 300,
            index_interval_bytes: 64,
            retention_ms: 2000,
            cleanup_policy: CleanupPolicy { delete: true, compact },
            delete_retention_ms: 500,
            ..LogConfig::default()
        };
        let mut log = Some(Log::open(dir.path(), config.clone(), 0).expect("open"));
        let mut model: Vec<ModelRecord> = Vec::new();
        let mut now = 0i64;
        for op in ops {
            let l = log.as_mut().expect("open log");
            match op {
                Op::Append(items) => {
                    let records: Vec<Record> = items.iter().map(|(k, v)| Record {
                        offset: 0,
                        timestamp_ms: now,
                        key: k.map(|k| Bytes::from(vec![b'k', k])),
                        value: v.map(|v| Bytes::from(vec![v; 3])),
                        headers: vec![],
                    }).collect();
                    let info = append(l, &records, now);
                    for (i, r) in records.into_iter().enumerate() {
                        model.push(ModelRecord { offset: info.base_offset + i as i64, batch_last: info.last_offset,
                            key: r.key, value: r.value, timestamp_ms: now });
                    }
                }
                Op::Read(frac) => {
                    let (start, end) = (l.log_start_offset(), l.log_end_offset());
                    let offset = pick(frac, start, end);
                    let bytes = l.read(offset, 200, end).expect("read in range");
                    if let Some(first) = batches(&bytes).next() {
                        let (header, _) = first.expect("valid");
                        prop_assert!(header.last_offset() >= offset);
                        // The batch may hold only records below the log start (compaction
                        // keeps a batch's span), but it may not skip a batch the model has.
                        if let Some(expected) = model.iter().find(|r| r.batch_last >= offset) {
                            prop_assert!(header.last_offset() <= expected.batch_last);
                        }
                    } else {
                        prop_assert!(model.iter().all(|r| r.batch_last < offset));
                    }
                    prop_assert!(l.read(end + 1, 10, end + 1).is_err());
                }
                Op::Roll => l.roll().expect("roll"),
                Op::Truncate(frac) => {
                    let target = pick(frac, l.log_start_offset() + 1, l.log_end_offset());
                    l.truncate_to(target).expect("truncate");
                    prop_assert!(l.log_end_offset() <= target);
                    model.retain(|r| r.batch_last < target);
                    // Compaction can leave a gap before the cut, so the end may lie past the
                    // last surviving batch, but never before it.
                    if let Some(last) = model.last() {
                        prop_assert!(l.log_end_offset() > last.batch_last);
                    }
                }
                Op::Retention => {
                    let start_before = l.log_start_offset();
                    l.enforce_retention(now).expect("retention");
                    prop_assert!(l.log_start_offset() >= start_before);
                }
                Op::DeleteRecords(frac) => {
                    let target = pick(frac, l.log_start_offset(), l.log_end_offset());
                    prop_assert_eq!(l.delete_records(target).expect("trim"), target.max(l.log_start_offset()));
                }
                Op::Compact => {
                    l.compact(now).expect("compact");
                    let after = read_all(l);
                    let start = l.log_start_offset();
                    // Nothing invented, every key's latest live record kept.
                    for r in &after {
                        let m = model.iter().find(|m| m.offset == r.offset).expect("record in model");
                        prop_assert_eq!(&m.key, &r.key);
                        prop_assert_eq!(&m.value, &r.value);
                    }
                    for m in model.iter().filter(|m| m.offset >= start) {
                        let latest = m.key.is_none() || model.iter().rev().find(|x| x.key == m.key).map(|x| x.offset) == Some(m.offset);
                        if latest && m.value.is_some() {
                            prop_assert!(after.iter().any(|r| r.offset == m.offset), "latest record {} dropped", m.offset);
                        }
                    }
                    model.retain(|m| m.offset < start || after.iter().any(|r| r.offset == m.offset));
                }
                Op::Reopen { clean } => {
                    let l = log.take().expect("log");
                    if clean { l.close().expect("close") } else { drop(l) }
                    let reopened = Log::open(dir.path(), config.clone(), now).expect("reopen");
                    prop_assert!(reopened.recovered_tails().is_empty());
                    log = Some(reopened);
                }
                Op::Flush => { l.flush().expect("flush"); }
                Op::Tick(ms) => now += i64::from(ms % 1500),
            }
            let l = log.as_ref().expect("log");
            model.retain(|r| r.offset >= l.log_start_offset());
            check_same(l, &model)?;
        }
    }
}

fn producer_batch(id: i64, epoch: i16, sequence: i32, values: &[&str]) -> Vec<u8> {
    let records: Vec<Record> = values.iter().map(|v| rec(None, Some(v), 1)).collect();
    let options = BatchOptions {
        producer_id: id,
        producer_epoch: epoch,
        base_sequence: sequence,
        ..BatchOptions::default()
    };
    encode(&records, options).to_vec()
}

#[test]
fn a_retried_producer_batch_is_written_once_also_after_a_reopen_and_a_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default(), 0).expect("open");
    let first = producer_batch(9, 0, 0, &["a", "b"]);
    let second = producer_batch(9, 0, 2, &["c"]);
    assert_eq!(log.append(&first, 0, 1).expect("append").base_offset, 0);
    log.append(&second, 0, 1).expect("append");
    // The retry of the first batch is answered with its offsets and not written.
    let again = log.append(&first, 0, 1).expect("duplicate");
    assert!(again.duplicate);
    assert_eq!((again.base_offset, again.last_offset), (0, 1));
    assert_eq!(log.log_end_offset(), 3);
    // A gap is refused.
    let gap = log.append(&producer_batch(9, 0, 7, &["x"]), 0, 1);
    assert!(matches!(gap, Err(AppendError::Sequence(_))), "{gap:?}");
    // The state is rebuilt from the log on open.
    log.close().expect("close");
    let mut log = Log::open(dir.path(), LogConfig::default(), 0).expect("reopen");
    assert_eq!(log.producer_count(), 1);
    assert!(log.append(&second, 0, 1).expect("duplicate").duplicate);
    // After a truncation the second batch is gone: its retry is written again.
    log.truncate_to(2).expect("truncate");
    let rewritten = log.append(&second, 0, 1).expect("append");
    assert!(!rewritten.duplicate);
    assert_eq!(rewritten.base_offset, 2);
}

#[test]
fn producer_state_comes_back_from_its_snapshot_and_a_truncation_below_it_drops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: 300,
        ..LogConfig::default()
    };
    let mut log = Log::open(dir.path(), config.clone(), 0).expect("open");
    // Producer 1 writes once, then producer 2 writes many batches: producer 1's batch
    // is older than the last two segments, so only the snapshot remembers it.
    let early = producer_batch(1, 0, 0, &["early"]);
    log.append(&early, 0, 1).expect("append");
    for i in 0..20 {
        log.append(&producer_batch(2, 0, i, &["x"]), 0, 1)
            .expect("append");
    }
    assert!(log.snapshot().segment_count > 3, "the log rolled");
    drop(log); // a crash: no snapshot at close, the one of the last roll is used
    let mut log = Log::open(dir.path(), config.clone(), 0).expect("reopen");
    assert_eq!(log.producer_count(), 2);
    assert!(log.append(&early, 0, 1).expect("duplicate").duplicate);
    // Truncated below the snapshot: the snapshot goes, and the state is what the log
    // still holds.
    log.truncate_to(1).expect("truncate");
    assert!(!dir.path().join("producer-snapshot").exists());
    let rewritten = log
        .append(&producer_batch(2, 0, 0, &["x"]), 0, 1)
        .expect("append");
    assert!(
        !rewritten.duplicate,
        "the truncated batch is not remembered"
    );
}

fn txn_batch(id: i64, epoch: i16, sequence: i32, records: &[Record]) -> Vec<u8> {
    let options = BatchOptions {
        producer_id: id,
        producer_epoch: epoch,
        base_sequence: sequence,
        transactional: true,
        ..BatchOptions::default()
    };
    encode(records, options).to_vec()
}

#[test]
fn transactions_hold_the_stable_offset_and_aborts_are_indexed_across_a_crash() {
    use runnel_batch::ControlType;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config(), 0).expect("open");
    append(&mut log, &[rec(None, Some("plain"), 1)], 1);
    log.append(&txn_batch(1, 0, 0, &[rec(None, Some("a1"), 1)]), 0, 1)
        .expect("append");
    log.append(&txn_batch(2, 0, 0, &[rec(None, Some("b1"), 1)]), 0, 1)
        .expect("append");
    assert_eq!(log.first_unstable_offset(), Some(1));
    assert_eq!(log.open_transactions().len(), 2);
    // A client may not write markers.
    let forged = runnel_batch::control_batch(ControlType::Commit, 1, 1, 0, 1);
    assert!(log.append(&forged, 0, 1).is_err());
    // A marker with the transaction's own epoch is late: nothing is written.
    let late = log
        .append_marker(ControlType::Abort, 1, 0, 0, 0, 1)
        .expect("marker");
    assert!(late.is_none());
    let abort = log
        .append_marker(ControlType::Abort, 1, 1, 0, 0, 1)
        .expect("marker")
        .expect("written");
    assert_eq!(abort.base_offset, 3);
    assert_eq!(log.first_unstable_offset(), Some(2));
    // A repeated marker writes nothing.
    assert!(
        log.append_marker(ControlType::Abort, 1, 1, 0, 0, 1)
            .expect("marker")
            .is_none()
    );
    log.append_marker(ControlType::Commit, 2, 1, 0, 0, 1)
        .expect("marker")
        .expect("written");
    assert_eq!(log.first_unstable_offset(), None);
    // The aborted transaction's late batch is fenced by the marker's epoch.
    let zombie = log.append(&txn_batch(1, 0, 1, &[rec(None, Some("a2"), 1)]), 0, 1);
    assert!(
        matches!(zombie, Err(AppendError::Sequence(_))),
        "{zombie:?}"
    );
    // Producer 1's next transaction stays open through a crash.
    log.append(&txn_batch(1, 1, 0, &[rec(None, Some("a3"), 1)]), 0, 1)
        .expect("append");
    let aborted = log.aborted_transactions(0, log.log_end_offset());
    assert_eq!(
        aborted,
        vec![AbortedTxn {
            producer_id: 1,
            first_offset: 1,
            last_offset: 3
        }]
    );
    drop(log);
    let mut log = Log::open(dir.path(), small_config(), 0).expect("reopen");
    assert_eq!(log.aborted_transactions(0, 100), aborted);
    assert_eq!(log.aborted_transactions(4, 100), vec![]);
    assert_eq!(log.first_unstable_offset(), Some(5));
    // A truncation below the abort marker takes its index entry away.
    log.truncate_to(3).expect("truncate");
    assert_eq!(log.aborted_transactions(0, 100), vec![]);
    assert_eq!(log.first_unstable_offset(), Some(1));
}

#[test]
fn compaction_drops_aborted_records_and_keeps_open_transactions() {
    use runnel_batch::ControlType;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = compacted();
    let mut log = Log::open(dir.path(), config, 0).expect("open");
    append(&mut log, &[rec(Some("k"), Some("committed"), 1)], 1);
    log.append(
        &txn_batch(1, 0, 0, &[rec(Some("k"), Some("aborted"), 1)]),
        0,
        1,
    )
    .expect("append");
    log.append_marker(ControlType::Abort, 1, 1, 0, 0, 1)
        .expect("marker")
        .expect("written");
    log.append(
        &txn_batch(2, 0, 0, &[rec(Some("j"), Some("open"), 1)]),
        0,
        1,
    )
    .expect("append");
    append(&mut log, &[rec(Some("j"), Some("after"), 1)], 1);
    for i in 0..10 {
        append(
            &mut log,
            &[rec(Some("filler"), Some(&format!("{i}")), 1)],
            1,
        );
    }
    log.roll().expect("roll");
    log.compact(2).expect("compact");
    let kept = values(&read_all(&log));
    assert!(kept.contains(&"committed".to_string()), "{kept:?}");
    assert!(!kept.contains(&"aborted".to_string()), "{kept:?}");
    // From the open transaction on nothing is compacted: it may still abort.
    assert!(kept.contains(&"open".to_string()), "{kept:?}");
    assert!(kept.contains(&"after".to_string()), "{kept:?}");
}

/// The producer ids of the log's transaction markers, in order.
fn markers(log: &Log) -> Vec<i64> {
    let mut out = Vec::new();
    each_batch(log, |header, _, from| {
        if header.is_control() && header.base_offset >= from {
            out.push(header.producer_id);
        }
    });
    out
}

#[test]
fn compaction_drops_a_marker_once_its_transaction_kept_no_record_and_retention_passed() {
    use runnel_batch::ControlType;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        delete_retention_ms: 1000,
        ..compacted()
    };
    let mut log = Log::open(dir.path(), config.clone(), 0).expect("open");
    // Producer 1 commits a record a later write supersedes; producer 2 aborts; producer 3
    // commits a record that stays the latest of its key.
    for (id, key, end) in [
        (1, "a", ControlType::Commit),
        (2, "b", ControlType::Abort),
        (3, "c", ControlType::Commit),
    ] {
        log.append(
            &txn_batch(id, 0, 0, &[rec(Some(key), Some("txn"), 1)]),
            0,
            1,
        )
        .expect("append");
        log.append_marker(end, id, 1, 0, 0, 1)
            .expect("marker")
            .expect("written");
    }
    append(&mut log, &[rec(Some("a"), Some("newer"), 1)], 1);
    for i in 0..10 {
        append(
            &mut log,
            &[rec(Some("filler"), Some(&format!("{i}")), 1)],
            1,
        );
    }
    log.roll().expect("roll");
    assert_eq!(markers(&log), vec![1, 2, 3]);

    // Within delete.retention.ms the markers stay, though two transactions lost their
    // records: a consumer reading behind still sees them end.
    log.compact(2).expect("compact");
    assert_eq!(markers(&log), vec![1, 2, 3]);
    assert_eq!(
        values(&read_all(&log))
            .iter()
            .filter(|v| *v == "txn")
            .count(),
        1
    );

    // After it, only the marker of the transaction that kept a record stays.
    let stats = log.compact(10_000).expect("compact");
    assert!(stats.records_removed >= 2, "{stats:?}");
    assert_eq!(markers(&log), vec![3]);
    let kept = read_all(&log);
    assert!(kept.iter().any(|r| r.key.as_deref() == Some(&b"c"[..])));
    assert_eq!(log.first_unstable_offset(), None);
    drop(log);
    let log = Log::open(dir.path(), config, 0).expect("reopen");
    assert_eq!(log.first_unstable_offset(), None);
    assert_eq!(markers(&log), vec![3]);
}

#[derive(Debug, Clone)]
enum TxnOp {
    /// A transactional batch of producer N (0..3).
    Write(u8),
    /// A non-transactional batch.
    Plain,
    /// The coordinator ends producer N's transaction (commit or abort), with the bumped
    /// epoch; also when it wrote nothing here.
    End(u8, bool),
    /// A marker repeated late, with the producer's current epoch: must write nothing.
    LateMarker(u8),
    Roll,
    Reopen {
        clean: bool,
    },
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        5 => (0u8..3).prop_map(TxnOp::Write),
        2 => Just(TxnOp::Plain),
        3 => (0u8..3, any::<bool>()).prop_map(|(p, c)| TxnOp::End(p, c)),
        1 => (0u8..3).prop_map(TxnOp::LateMarker),
        1 => Just(TxnOp::Roll),
        1 => any::<bool>().prop_map(|clean| TxnOp::Reopen { clean }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Open transactions, the first unstable offset and the aborted-transaction index
    /// agree with a model through markers, late markers, rolls and crashes.
    #[test]
    fn transaction_state_agrees_with_a_model(ops in proptest::collection::vec(txn_op(), 1..50)) {
        use runnel_batch::ControlType;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig { segment_bytes: 300, ..LogConfig::default() };
        let mut log = Some(Log::open(dir.path(), config.clone(), 0).expect("open"));
        let mut epochs = [0i16; 3];
        let mut sequences = [0i32; 3];
        let mut open: BTreeMap<i64, i64> = BTreeMap::new(); // producer -> first offset
        let mut aborted: Vec<AbortedTxn> = Vec::new();
        for op in ops {
            let l = log.as_mut().expect("log");
            match op {
                TxnOp::Write(p) => {
                    let id = i64::from(p) + 1;
                    let at = l.log_end_offset();
                    let batch = txn_batch(id, epochs[p as usize], sequences[p as usize], &[rec(None, Some("v"), 1)]);
                    l.append(&batch, 0, 1).expect("append");
                    sequences[p as usize] += 1;
                    open.entry(id).or_insert(at);
                }
                TxnOp::Plain => {
                    append(l, &[rec(None, Some("p"), 1)], 1);
                }
                TxnOp::End(p, commit) => {
                    let id = i64::from(p) + 1;
                    let kind = if commit { ControlType::Commit } else { ControlType::Abort };
                    epochs[p as usize] += 1;
                    sequences[p as usize] = 0;
                    let written = l
                        .append_marker(kind, id, epochs[p as usize], 0, 0, 1)
                        .expect("marker")
                        .expect("a newer epoch is written");
                    if let Some(first) = open.remove(&id)
                        && !commit
                    {
                        aborted.push(AbortedTxn { producer_id: id, first_offset: first, last_offset: written.base_offset });
                    }
                }
                TxnOp::LateMarker(p) => {
                    let id = i64::from(p) + 1;
                    let late = l
                        .append_marker(ControlType::Abort, id, epochs[p as usize], 0, 0, 1)
                        .expect("marker");
                    // A producer never ended here is unknown at epoch 0: its "late"
                    // marker is a first one. Otherwise nothing is written.
                    if epochs[p as usize] > 0 || open.contains_key(&id) {
                        prop_assert!(late.is_none());
                    } else if let Some(written) = late {
                        // Unknown producer, epoch 0: written, closing nothing.
                        prop_assert!(written.base_offset >= 0);
                    }
                }
                TxnOp::Roll => l.roll().expect("roll"),
                TxnOp::Reopen { clean } => {
                    let old = log.take().expect("log");
                    if clean { old.close().expect("close") } else { drop(old) }
                    log = Some(Log::open(dir.path(), config.clone(), 1).expect("reopen"));
                }
            }
            let l = log.as_ref().expect("log");
            prop_assert_eq!(l.first_unstable_offset(), open.values().min().copied());
            let got: BTreeMap<i64, i64> = l.open_transactions().iter().map(|t| (t.producer_id, t.first_offset)).collect();
            prop_assert_eq!(&got, &open);
            prop_assert_eq!(l.aborted_transactions(0, i64::MAX), aborted.clone());
        }
    }
}
