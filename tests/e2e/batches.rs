//! Producer batches and the topic's size limit: batches never outgrow `max.message.bytes`,
//! and a batch the broker refuses as too large is split and sent again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use runnel_client::{
    Admin, Client, Consumer, ConsumerConfig, ErrorCode, Producer, ProducerConfig, ProducerRecord,
    StartFrom,
};

use crate::runtime;
use crate::support::Dev;

#[test]
fn bench_with_batches_larger_than_the_topic_limit_sends_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(
        &[
            "topic",
            "create",
            "big",
            "--config",
            "max.message.bytes=20000",
        ],
        "",
    );
    let out = dev.ok(
        &[
            "bench",
            "produce",
            "--topic",
            "big",
            "--records",
            "3000",
            "--record-size",
            "1000",
            "--batch-size",
            "1048576",
            "--producers",
            "2",
            "--json",
        ],
        "",
    );
    let result: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(result["records"], 3000, "{out}");
    assert_eq!(result["failed"], 0, "{out}");
    let out = dev.ok(&["bench", "consume", "--topic", "big", "--json"], "");
    let result: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(result["records"], 3000, "{out}");
}

#[test]
fn a_batch_refused_as_too_large_is_split_and_every_record_lands_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "shrinking"], "");
    let addr = dev.addr.clone();
    runtime().block_on(async move {
        let client = Client::connect(&[addr]).await.expect("connect");
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                batch_size_bytes: 1024 * 1024,
                linger: Duration::from_millis(200),
                ..ProducerConfig::default()
            },
        );
        // The producer learns the topic's limit (1 MiB) with its first record...
        let first = producer
            .send(ProducerRecord::new("shrinking").value("first"))
            .await
            .expect("send")
            .await
            .expect("first record written");
        assert_eq!(first.offset, 0);
        // ...which then shrinks behind its back: its next batch of ~300 KB is refused.
        Admin::new(client.clone())
            .alter_topic_config(
                "shrinking",
                HashMap::from([("max.message.bytes".to_string(), "20000".to_string())]),
                Vec::new(),
            )
            .await
            .expect("lower max.message.bytes");
        let mut deliveries = Vec::new();
        for i in 0..300 {
            let value = format!("{i:04}{}", "v".repeat(996));
            let delivery = producer
                .send(ProducerRecord::new("shrinking").value(value.clone()))
                .await
                .expect("send");
            deliveries.push((value, delivery));
        }
        let mut written = BTreeMap::new();
        for (value, delivery) in deliveries {
            let meta = delivery
                .await
                .expect("every record is written after the split");
            assert!(
                written.insert(meta.offset, value).is_none(),
                "offset {} reported twice",
                meta.offset
            );
        }
        assert_eq!(
            written.keys().copied().collect::<Vec<_>>(),
            (1..=300).collect::<Vec<i64>>(),
            "the halves keep the records' order"
        );
        // A single record larger than the limit cannot be split: it fails, clearly.
        let err = producer
            .send(ProducerRecord::new("shrinking").value(vec![b'x'; 30_000]))
            .await
            .expect("send")
            .await
            .expect_err("a record above max.message.bytes is refused");
        assert_eq!(err.code(), Some(ErrorCode::RecordTooLarge), "{err}");

        let mut consumer = Consumer::new(client, ConsumerConfig::default());
        consumer
            .assign("shrinking", None, StartFrom::Earliest)
            .await
            .expect("assign");
        let mut stored = BTreeMap::new();
        while stored.len() < 301 {
            for record in consumer.poll().await.expect("poll") {
                let value =
                    String::from_utf8(record.value.expect("value").to_vec()).expect("UTF-8");
                assert!(stored.insert(record.offset, value).is_none());
            }
        }
        assert_eq!(stored.remove(&0).as_deref(), Some("first"));
        assert_eq!(stored, written, "each acknowledged offset holds its record");
    });
}
