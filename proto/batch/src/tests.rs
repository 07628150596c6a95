use super::*;
use proptest::prelude::*;

fn record(key: Option<&str>, value: Option<&str>, ts: i64) -> Record {
    Record {
        offset: 0,
        timestamp_ms: ts,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        headers: vec![Header {
            key: "h".into(),
            value: Some(Bytes::from_static(b"v")),
        }],
    }
}

#[test]
fn round_trip_keeps_every_field() {
    let records = vec![
        record(Some("k1"), Some("v1"), 1000),
        record(None, Some("v2"), 990),
        record(Some("k3"), None, 1500),
    ];
    let mut batch = encode(&records, BatchOptions::default()).to_vec();
    set_base_offset(&mut batch, 42);
    set_leader_epoch(&mut batch, 7);
    let header = validate(&batch).expect("valid");
    assert_eq!(header.base_offset, 42);
    assert_eq!(header.leader_epoch, 7);
    assert_eq!(header.last_offset(), 44);
    assert_eq!(header.max_timestamp_ms, 1500);
    assert_eq!(header.record_count, 3);
    let decoded = decode_records(&batch).expect("decodes");
    assert_eq!(
        decode_records_shared(&Bytes::from(batch.clone())).expect("shared"),
        decoded
    );
    for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
        assert_eq!(got.offset, 42 + i as i64);
        assert_eq!(got.timestamp_ms, want.timestamp_ms);
        assert_eq!(got.key, want.key);
        assert_eq!(got.value, want.value);
        assert_eq!(got.headers, want.headers);
    }
}

#[test]
fn lz4_round_trip() {
    let records: Vec<Record> = (0..100)
        .map(|i| record(Some("key"), Some(&format!("value-{i}")), i))
        .collect();
    let options = BatchOptions {
        compression: Compression::Lz4,
        ..BatchOptions::default()
    };
    let batch = encode(&records, options);
    assert!(batch.len() < encode(&records, BatchOptions::default()).len());
    let header = validate(&batch).expect("valid");
    assert_eq!(header.compression(), Ok(Compression::Lz4));
    let decoded = decode_records(&batch).expect("decodes");
    assert_eq!(decoded.len(), 100);
    assert_eq!(decode_records_shared(&batch).expect("decodes"), decoded);
    assert_eq!(decoded[99].value.as_deref(), Some(&b"value-99"[..]));
}

#[test]
fn log_append_time_rewrites_timestamps_and_crc() {
    let mut batch = encode(&[record(None, Some("v"), 5)], BatchOptions::default()).to_vec();
    set_log_append_time(&mut batch, 777);
    let header = validate(&batch).expect("crc recomputed");
    assert_eq!(header.timestamp_type(), TimestampType::LogAppendTime);
    assert_eq!(
        decode_records(&batch).expect("decodes")[0].timestamp_ms,
        777
    );
}

#[test]
fn stamped_header_matches_stamping_in_place() {
    let batch = encode(
        &[record(Some("k"), Some("v"), 5), record(None, Some("w"), 6)],
        BatchOptions::default(),
    )
    .to_vec();
    for append_time in [None, Some(999)] {
        let mut in_place = batch.clone();
        set_base_offset(&mut in_place, 77);
        set_leader_epoch(&mut in_place, 3);
        if let Some(ts) = append_time {
            set_log_append_time(&mut in_place, ts);
        }
        let mut stamped = stamp_header(&batch, 77, 3, append_time).to_vec();
        stamped.extend_from_slice(&batch[BATCH_HEADER_BYTES..]);
        assert_eq!(stamped, in_place);
        assert!(validate(&stamped).is_ok());
    }
}

#[test]
fn flipped_byte_fails_crc() {
    let mut batch = encode(&[record(Some("k"), Some("v"), 5)], BatchOptions::default()).to_vec();
    let last = batch.len() - 1;
    batch[last] ^= 0xff;
    assert!(matches!(
        validate(&batch),
        Err(BatchError::CrcMismatch { .. })
    ));
}

#[test]
fn verified_batches_split_without_the_crc_and_still_reject_short_ones() {
    let one = encode(&[record(Some("k"), Some("v"), 5)], BatchOptions::default()).to_vec();
    let two = encode(&[record(None, Some("w"), 6)], BatchOptions::default()).to_vec();
    let mut both = one.clone();
    both.extend_from_slice(&two);
    let sizes =
        |it: Batches<'_>| -> Vec<usize> { it.map(|b| b.expect("whole batch").1.len()).collect() };
    assert_eq!(sizes(batches_verified(&both)), vec![one.len(), two.len()]);
    // A flipped byte is the checked split's to find, not the verified one's.
    let last = both.len() - 1;
    both[last] ^= 0xff;
    assert!(batches(&both).any(|b| matches!(b, Err(BatchError::CrcMismatch { .. }))));
    assert_eq!(sizes(batches_verified(&both)), vec![one.len(), two.len()]);
    let cut = &both[..both.len() - 1];
    assert!(matches!(
        batches_verified(cut).nth(1),
        Some(Err(BatchError::Truncated { .. }))
    ));
}

#[test]
fn short_and_bogus_buffers_are_errors() {
    let batch = encode(&[record(Some("k"), Some("v"), 5)], BatchOptions::default());
    for cut in 0..batch.len() {
        assert!(validate(&batch[..cut]).is_err(), "cut at {cut}");
    }
    let mut bad_len = batch.to_vec();
    bad_len[8..12].copy_from_slice(&(-5i32).to_be_bytes());
    assert!(matches!(
        validate(&bad_len),
        Err(BatchError::InvalidLength { .. })
    ));
    let mut bad_magic = batch.to_vec();
    bad_magic[16] = 1;
    assert_eq!(
        validate(&bad_magic),
        Err(BatchError::UnsupportedMagic { magic: 1 })
    );
}

#[test]
fn batches_iterates_consecutive_batches() {
    let mut buf = Vec::new();
    for base in [0i64, 1, 2] {
        let mut b = encode(&[record(None, Some("v"), 1)], BatchOptions::default()).to_vec();
        set_base_offset(&mut b, base);
        buf.extend_from_slice(&b);
    }
    let offsets: Vec<i64> = batches(&buf)
        .map(|b| b.expect("valid").0.base_offset)
        .collect();
    assert_eq!(offsets, vec![0, 1, 2]);
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = validate(&bytes);
        let _ = decode_records(&bytes);
    }

    #[test]
    fn decoding_a_mutated_batch_never_panics(pos in 0usize..200, byte in any::<u8>()) {
        let mut batch = encode(&[record(Some("key"), Some("value"), 9), record(None, None, 10)],
            BatchOptions::default()).to_vec();
        let pos = pos % batch.len();
        batch[pos] = byte;
        let _ = decode_records(&batch);
    }

    #[test]
    fn round_trip_any_records(values in proptest::collection::vec(
        (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
         proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
         any::<i32>(), 0usize..3), 1..20), lz4 in any::<bool>()) {
        let records: Vec<Record> = values.iter().map(|(k, v, ts, headers)| Record {
            offset: 0,
            timestamp_ms: i64::from(*ts),
            key: k.clone().map(Bytes::from),
            value: v.clone().map(Bytes::from),
            headers: (0..*headers).map(|i| Header {
                key: format!("h{i}"),
                value: (i > 0).then(|| Bytes::from(vec![b'v'; i * 70])),
            }).collect(),
        }).collect();
        let options = BatchOptions {
            compression: if lz4 { Compression::Lz4 } else { Compression::None },
            ..BatchOptions::default()
        };
        let batch = encode(&records, options);
        let decoded = decode_records(&batch).expect("decodes");
        prop_assert_eq!(decoded.len(), records.len());
        for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
            prop_assert_eq!(got.offset, i as i64);
            prop_assert_eq!(&got.key, &want.key);
            prop_assert_eq!(&got.value, &want.value);
            prop_assert_eq!(got.timestamp_ms, want.timestamp_ms);
            prop_assert_eq!(&got.headers, &want.headers);
        }
        // Walking the batch in place sees the same records.
        let mut walked = Vec::new();
        for_each_record(&batch, |r| walked.push(Record {
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(Bytes::copy_from_slice),
            value: r.value.map(Bytes::copy_from_slice),
            headers: r.headers.iter().map(|(k, v)| Header {
                key: (*k).to_string(),
                value: v.map(Bytes::copy_from_slice),
            }).collect(),
        })).expect("walks");
        prop_assert_eq!(walked, decoded);
    }
}

proptest! {
    /// The sizes the producer uses to keep a batch within a topic's limit are exact.
    #[test]
    fn record_size_bytes_is_what_push_adds(values in proptest::collection::vec(
        (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
         proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20_000)),
         any::<i64>(), 0usize..3), 1..20)) {
        let mut builder = BatchBuilder::new(BatchOptions::default());
        for (k, v, ts, headers) in &values {
            let record = Record {
                offset: 0,
                timestamp_ms: *ts,
                key: k.clone().map(Bytes::from),
                value: v.clone().map(Bytes::from),
                headers: (0..*headers).map(|i| Header {
                    key: format!("h{i}"),
                    value: Some(Bytes::from(vec![7u8; i * 100])),
                }).collect(),
            };
            let before = builder.size_bytes();
            let predicted = builder.record_size_bytes(&record);
            builder.push(&record);
            prop_assert_eq!(builder.size_bytes() - before, predicted);
        }
        let batch = builder.build();
        prop_assert!(validate(&batch).is_ok());
        prop_assert_eq!(decode_records(&batch).expect("decodes").len(), values.len());
    }

    /// A batch built from records' parts (a transform's output) is the batch built from
    /// the records, and decodes to them.
    #[test]
    fn records_pushed_as_parts_make_the_same_batch(values in proptest::collection::vec(
        (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
         proptest::option::of(proptest::collection::vec(any::<u8>(), 0..500)),
         0i64..1_000_000, 0usize..3), 1..20)) {
        let records: Vec<Record> = values.iter().enumerate().map(|(i, (k, v, ts, headers))| Record {
            offset: i as i64,
            timestamp_ms: 1_700_000_000_000 + ts,
            key: k.clone().map(Bytes::from),
            value: v.clone().map(Bytes::from),
            headers: (0..*headers).map(|h| Header {
                key: format!("h{h}"),
                value: (h != 1).then(|| Bytes::from(vec![7u8; h * 10])),
            }).collect(),
        }).collect();
        let mut whole = BatchBuilder::new(BatchOptions::default());
        let mut parts = BatchBuilder::new(BatchOptions::default());
        for record in &records {
            whole.push(record);
            let borrowed = RecordParts {
                timestamp_ms: record.timestamp_ms,
                key: record.key.as_deref(),
                value: record.value.as_deref(),
                headers: record.headers.iter().map(|h| (h.key.as_bytes(), h.value.as_deref())),
            };
            prop_assert!(parts.push_parts_within(&borrowed, usize::MAX));
        }
        let batch = parts.build();
        prop_assert_eq!(&batch, &whole.build());
        prop_assert_eq!(decode_records(&batch).expect("decodes"), records);
    }

    #[test]
    fn varint_sizes_match_the_encoder(value in any::<i64>()) {
        let mut out = BytesMut::new();
        varint::put_varlong(&mut out, value);
        prop_assert_eq!(out.len(), varint::varlong_bytes(value));
        let mut out = BytesMut::new();
        varint::put_varint(&mut out, value as i32);
        prop_assert_eq!(out.len(), varint::varint_bytes(value as i32));
    }
}

#[test]
fn a_reused_buffer_builds_the_same_batch() {
    let records = [
        record(Some("k"), Some("value"), 5),
        record(None, Some("v2"), 6),
    ];
    let fresh = encode(&records, BatchOptions::default());
    let used = BytesMut::from(&b"left over from an earlier batch"[..]);
    let mut builder = BatchBuilder::with_buffer(BatchOptions::default(), used);
    for r in &records {
        builder.push(r);
    }
    assert_eq!(builder.build(), fresh);
}

#[test]
fn truncated_varints_are_errors() {
    let mut cursor = varint::Cursor::new(&[0x80, 0x80]);
    assert!(cursor.read_varint().is_err());
    let mut cursor = varint::Cursor::new(&[0xff; 11]);
    assert!(cursor.read_varlong().is_err());
    let mut cursor = varint::Cursor::new(&[0x02]);
    assert_eq!(cursor.read_varint(), Ok(1));
    assert!(cursor.is_empty());
}

#[test]
fn a_producer_stamped_later_keeps_the_batch_valid_and_the_records_unchanged() {
    let records = [record(Some("k"), Some("a"), 5), record(None, Some("b"), 6)];
    let mut batch = BytesMut::from(&encode(&records, BatchOptions::default())[..]);
    set_producer(&mut batch, 42, 3, i32::MAX);
    let header = validate(&batch).expect("still valid after the CRC is recomputed");
    assert_eq!(
        (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence
        ),
        (42, 3, i32::MAX)
    );
    // Sequences wrap: the second record's is 0.
    assert_eq!(header.last_sequence(), 0);
    let decoded = decode_records(&batch).expect("decode");
    assert_eq!(decoded[1].value.as_deref(), Some(&b"b"[..]));
}

#[test]
fn control_batches_round_trip_their_marker() {
    for kind in [ControlType::Abort, ControlType::Commit] {
        let batch = control_batch(kind, 42, 3, 7, 1_000);
        let header = validate(&batch).expect("a valid batch");
        assert!(header.is_control() && header.is_transactional());
        assert_eq!(
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            ),
            (42, 3, -1)
        );
        assert_eq!(control_type(&batch).expect("a marker"), kind);
    }
    let plain = encode(&[Record::default()], BatchOptions::default());
    assert!(control_type(&plain).is_err());
}

#[test]
fn the_aborted_filter_drops_an_aborted_producer_until_its_marker() {
    let txn = |producer_id: i64, base_offset: i64| {
        let mut batch = encode(
            &[Record::default()],
            BatchOptions {
                producer_id,
                producer_epoch: 0,
                base_sequence: 0,
                transactional: true,
                ..BatchOptions::default()
            },
        )
        .to_vec();
        set_base_offset(&mut batch, base_offset);
        batch
    };
    let marker = |kind, producer_id: i64, base_offset: i64| {
        let mut batch = control_batch(kind, producer_id, 1, 0, 0).to_vec();
        set_base_offset(&mut batch, base_offset);
        batch
    };
    // Producer 1 aborts (offsets 0 and 2, marker at 4), producer 2 commits (1, marker
    // 3), producer 1 writes again after its abort (5).
    let log = [
        txn(1, 0),
        txn(2, 1),
        txn(1, 2),
        marker(ControlType::Commit, 2, 3),
        marker(ControlType::Abort, 1, 4),
        txn(1, 5),
    ];
    let mut filter = AbortedFilter::new([(1, 0)]);
    let kept: Vec<i64> = log
        .iter()
        .filter_map(|batch| {
            let header = parse_header(batch).expect("header");
            filter.keep(&header, batch).then_some(header.base_offset)
        })
        .collect();
    assert_eq!(kept, vec![1, 5]);
}
