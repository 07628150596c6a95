//! Idempotent producing under lost answers: the broker cuts every third produce stream
//! after appending (fault injection), so the producer retries batches that were written.
//! Without idempotence the retries write records twice; with it, each record is in the
//! log exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use runnel_client::{Acks, Client, Producer, ProducerConfig, ProducerRecord};

use crate::support::Dev;

/// Sends `count` distinct values to `topic` (small batches: many requests), waits for
/// every acknowledgement, and returns how often each value is in the topic.
async fn send_and_count(
    addr: &str,
    topic: &str,
    count: usize,
    idempotent: bool,
) -> BTreeMap<String, usize> {
    let client = Client::connect(&[addr.to_string()]).await.expect("connect");
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: Acks::All,
            batch_size_bytes: 2_000,
            linger: Duration::ZERO,
            retry_backoff: Duration::from_millis(20),
            idempotent,
            ..ProducerConfig::default()
        },
    );
    let mut deliveries = Vec::new();
    for i in 0..count {
        let record = ProducerRecord::new(topic)
            .key(format!("k{}", i % 7))
            .value(format!("value-{i}"));
        deliveries.push(producer.send(record).await.expect("send"));
    }
    for delivery in deliveries {
        delivery.await.expect("every record is acknowledged");
    }
    producer.flush().await.expect("flush");
    let mut seen = BTreeMap::new();
    let mut consumer = runnel_client::Consumer::new(
        Client::connect(&[addr.to_string()]).await.expect("connect"),
        runnel_client::ConsumerConfig::default(),
    );
    consumer
        .assign(topic, None, runnel_client::StartFrom::Earliest)
        .await
        .expect("assign");
    let ends = consumer.end_offsets().await.expect("ends");
    loop {
        let done = ends.iter().all(|((t, p), end)| {
            consumer
                .position(t, *p)
                .is_none_or(|position| position >= *end)
        });
        if done {
            break;
        }
        for record in consumer.poll().await.expect("poll") {
            let value =
                String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).to_string();
            *seen.entry(value).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn retries_after_lost_answers_write_each_record_once_with_an_idempotent_producer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start_with_env(
        dir.path(),
        &[("RUNNEL_FAULT_CUT_PRODUCE_STREAM_EVERY", "3")],
    );
    dev.ok(&["topic", "create", "plain", "--partitions", "3"], "");
    dev.ok(&["topic", "create", "once", "--partitions", "3"], "");
    let count = 3_000;
    // Without idempotence (a few hundred records show it).
    let plain = crate::runtime().block_on(send_and_count(&dev.addr, "plain", 600, false));
    assert_eq!(plain.len(), 600, "every value arrives");
    let doubled = plain.values().filter(|n| **n > 1).count();
    assert!(doubled > 0, "the fault injection made no retry write twice");
    let once = crate::runtime().block_on(send_and_count(&dev.addr, "once", count, true));
    assert_eq!(once.len(), count, "every value arrives");
    let repeated: Vec<_> = once.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(repeated.is_empty(), "written more than once: {repeated:?}");
}

#[test]
fn an_idempotent_batch_refused_as_too_large_is_split_under_its_own_sequence_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(dir.path());
    dev.ok(&["topic", "create", "shrinking"], "");
    let count = 1_500;
    let values = crate::runtime().block_on(async {
        let client = Client::connect(std::slice::from_ref(&dev.addr))
            .await
            .expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::All,
                batch_size_bytes: 30_000,
                linger: Duration::from_millis(20),
                idempotent: true,
                ..ProducerConfig::default()
            },
        );
        // The producer learns the topic's 1 MiB limit with its first record...
        producer
            .send(ProducerRecord::new("shrinking").value("value-0"))
            .await
            .expect("send")
            .await
            .expect("first record");
        // ...and the limit drops below its batches: the broker refuses them, the
        // producer splits them.
        dev.ok(
            &[
                "topic",
                "alter-config",
                "shrinking",
                "--config",
                "max.message.bytes=2000",
            ],
            "",
        );
        let mut deliveries = Vec::new();
        for i in 1..count {
            let record = ProducerRecord::new("shrinking").value(format!("value-{i}"));
            deliveries.push(producer.send(record).await.expect("send"));
        }
        for delivery in deliveries {
            delivery.await.expect("every record is acknowledged");
        }
        dev.ok(
            &[
                "consume",
                "shrinking",
                "--from-beginning",
                "--timeout-ms",
                "1000",
            ],
            "",
        )
    });
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in values.lines() {
        *seen.entry(line).or_default() += 1;
    }
    assert_eq!(seen.len(), count, "every value arrives");
    assert!(seen.values().all(|n| *n == 1), "a value was written twice");
}
