//! Records as messages, for gRPC clients without a record-batch codec: produced records
//! are placed on partitions and encoded into one batch per partition before the normal
//! produce path sees them, and fetched batches are decoded into messages after the
//! normal fetch path read them. The raw-batch path never comes here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use runnel_batch::{BatchBuilder, BatchOptions, TimestampType};
use runnel_proto::v1;

use crate::error::BrokerError;

/// Where each record of `ProduceRequest.records` went: (partition, index in that
/// partition's batch).
pub(crate) type Placements = Vec<(u32, u32)>;

/// Whether the request carries records as messages.
pub(crate) fn has_messages(request: &v1::ProduceRequest) -> bool {
    !request.records.is_empty() || request.partitions.iter().any(|p| !p.messages.is_empty())
}

fn to_batch_record(record: v1::Record, now_ms: i64) -> runnel_batch::Record {
    runnel_batch::Record {
        offset: 0,
        timestamp_ms: record.timestamp_ms.unwrap_or(now_ms),
        key: record.key,
        value: record.value,
        headers: record
            .headers
            .into_iter()
            .map(|h| runnel_batch::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
    }
}

/// Rewrites a request with records as messages into one with a batch per partition:
/// keyed records of `records` go to murmur2(key) % `partitions`, keyless ones to the
/// partition `keyless` picks. Returns where each of `records` went.
///
/// # Errors
/// A partition given both batches and messages.
pub(crate) fn encode_request(
    request: &mut v1::ProduceRequest,
    partitions: u32,
    keyless: &AtomicU32,
    now_ms: i64,
) -> Result<Placements, BrokerError> {
    let mut by_partition: BTreeMap<u32, Vec<runnel_batch::Record>> = BTreeMap::new();
    for data in &mut request.partitions {
        if data.messages.is_empty() {
            continue;
        }
        if !data.records.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "partition {} was given both record batches and messages; send one or the other",
                    data.partition
                ),
            });
        }
        by_partition.insert(
            data.partition,
            std::mem::take(&mut data.messages)
                .into_iter()
                .map(|r| to_batch_record(r, now_ms))
                .collect(),
        );
    }
    request
        .partitions
        .retain(|p| !by_partition.contains_key(&p.partition));
    let sticky = keyless.fetch_add(1, Ordering::Relaxed) % partitions.max(1);
    let mut placements = Vec::with_capacity(request.records.len());
    for record in std::mem::take(&mut request.records) {
        let partition = match &record.key {
            Some(key) => runnel_batch::partition_for_key(key, partitions),
            None => sticky,
        };
        let batch = by_partition.entry(partition).or_default();
        placements.push((partition, batch.len() as u32));
        batch.push(to_batch_record(record, now_ms));
    }
    for (partition, records) in by_partition {
        let mut builder = BatchBuilder::new(BatchOptions::default());
        for record in &records {
            builder.push(record);
        }
        request.partitions.push(v1::PartitionRecords {
            partition,
            records: builder.build(),
            messages: Vec::new(),
        });
    }
    Ok(placements)
}

/// The answer for each placed record, from the per-partition results.
pub(crate) fn record_results(
    placements: &Placements,
    partitions: &[v1::PartitionProduceResult],
    whole: Option<&v1::Error>,
) -> Vec<v1::RecordResult> {
    let by_partition: BTreeMap<u32, &v1::PartitionProduceResult> =
        partitions.iter().map(|p| (p.partition, p)).collect();
    placements
        .iter()
        .map(|(partition, index)| {
            let result = by_partition.get(partition);
            let error = whole
                .cloned()
                .or_else(|| result.and_then(|r| r.error.clone()));
            let offset = match (result, &error) {
                (Some(r), None) if r.base_offset >= 0 => r.base_offset + i64::from(*index),
                _ => -1,
            };
            v1::RecordResult {
                partition: *partition,
                offset,
                error,
            }
        })
        .collect()
}

/// Replaces the batches of a fetched partition with its records as messages, from
/// `from` on (the first batch may begin before it). Control batches are skipped; a
/// batch that does not decode becomes the partition's error.
pub(crate) fn decode_fetched(fetched: &mut v1::FetchedPartition, from: i64) {
    let records = std::mem::take(&mut fetched.records);
    let base = records.as_ptr() as usize;
    let mut filter = runnel_batch::AbortedFilter::new(
        std::mem::take(&mut fetched.aborted_transactions)
            .into_iter()
            .map(|a| (a.producer_id, a.first_offset)),
    );
    for batch in runnel_batch::batches(&records) {
        let decoded = batch
            .map_err(|e| e.to_string())
            .and_then(|(header, bytes)| {
                if !filter.keep(&header, bytes) {
                    return Ok(Vec::new());
                }
                let start = bytes.as_ptr() as usize - base;
                let shared: Bytes = records.slice(start..start + bytes.len());
                let kind = match header.timestamp_type() {
                    TimestampType::LogAppendTime => v1::TimestampType::LogAppendTime,
                    TimestampType::CreateTime => v1::TimestampType::CreateTime,
                };
                runnel_batch::decode_records_shared(&shared)
                    .map(|records| {
                        records
                            .into_iter()
                            .filter(|r| r.offset >= from)
                            .map(|r| v1::FetchedRecord {
                                offset: r.offset,
                                timestamp_ms: r.timestamp_ms,
                                timestamp_type: kind as i32,
                                key: r.key,
                                value: r.value,
                                headers: r
                                    .headers
                                    .into_iter()
                                    .map(|h| v1::Header {
                                        key: h.key,
                                        value: h.value,
                                    })
                                    .collect(),
                            })
                            .collect()
                    })
                    .map_err(|e| e.to_string())
            });
        match decoded {
            Ok(messages) => fetched.messages.extend(messages),
            Err(reason) => {
                fetched.error = Some(
                    BrokerError::CorruptBatch {
                        topic: fetched.topic.clone(),
                        partition: fetched.partition,
                        reason,
                    }
                    .to_proto(),
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&str>, value: &str) -> v1::Record {
        v1::Record {
            key: key.map(|k| Bytes::from(k.to_string())),
            value: Some(Bytes::from(value.to_string())),
            headers: vec![v1::Header {
                key: "h".into(),
                value: Some(Bytes::from_static(b"1")),
            }],
            timestamp_ms: None,
        }
    }

    #[test]
    fn keyed_records_land_where_the_client_partitioner_puts_them_and_decode_back() {
        let mut request = v1::ProduceRequest {
            topic: "t".into(),
            records: vec![
                record(Some("alpha"), "a"),
                record(None, "n1"),
                record(Some("beta"), "b"),
                record(None, "n2"),
            ],
            ..Default::default()
        };
        let keyless = AtomicU32::new(0);
        let placements = encode_request(&mut request, 4, &keyless, 1_000).expect("encode");
        assert_eq!(
            placements[0].0,
            runnel_batch::partition_for_key(b"alpha", 4)
        );
        assert_eq!(placements[2].0, runnel_batch::partition_for_key(b"beta", 4));
        assert_eq!(
            placements[1].0, placements[3].0,
            "keyless records of a request stick"
        );
        // Every record went into its partition's one batch; decoding gives them back.
        let mut seen = 0;
        for data in &request.partitions {
            let mut fetched = v1::FetchedPartition {
                records: data.records.clone(),
                ..Default::default()
            };
            decode_fetched(&mut fetched, 0);
            assert!(fetched.error.is_none());
            for message in &fetched.messages {
                assert_eq!(message.timestamp_ms, 1_000);
                assert_eq!(message.headers[0].key, "h");
                seen += 1;
            }
        }
        assert_eq!(seen, 4);
        // Offsets in the answer: the partition's base offset plus the index in its batch.
        let results: Vec<v1::PartitionProduceResult> = request
            .partitions
            .iter()
            .map(|p| v1::PartitionProduceResult {
                partition: p.partition,
                base_offset: 10,
                ..Default::default()
            })
            .collect();
        let answers = record_results(&placements, &results, None);
        for (answer, (partition, index)) in answers.iter().zip(&placements) {
            assert_eq!(answer.partition, *partition);
            assert_eq!(answer.offset, 10 + i64::from(*index));
        }
        assert!(
            answers[3].offset > answers[1].offset,
            "records keep their order within a partition"
        );
    }

    #[test]
    fn a_fetch_from_inside_a_batch_returns_records_from_the_requested_offset() {
        let mut builder = BatchBuilder::with_base_offset(BatchOptions::default(), 100);
        for i in 0..5 {
            builder.push(&to_batch_record(record(None, &format!("v{i}")), 5));
        }
        let mut fetched = v1::FetchedPartition {
            records: builder.build(),
            ..Default::default()
        };
        decode_fetched(&mut fetched, 102);
        let offsets: Vec<i64> = fetched.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [102, 103, 104]);
        assert!(fetched.records.is_empty());
    }

    #[test]
    fn batches_and_messages_for_one_partition_are_refused() {
        let mut request = v1::ProduceRequest {
            partitions: vec![v1::PartitionRecords {
                partition: 0,
                records: Bytes::from_static(b"x"),
                messages: vec![record(None, "v")],
            }],
            ..Default::default()
        };
        let err = encode_request(&mut request, 1, &AtomicU32::new(0), 0).expect_err("refused");
        assert!(err.to_string().contains("both"), "{err}");
    }
}
