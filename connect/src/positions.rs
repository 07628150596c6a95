//! Source positions in `__connect_offsets`: one compacted record per connector, keyed by
//! its name, holding the position and the records produced up to it.

use std::time::Duration;

use runnel_client::{
    Client, Consumer, ConsumerConfig, Delivery, Producer, ProducerRecord, StartFrom,
};
use serde::{Deserialize, Serialize};

use crate::OFFSETS_TOPIC;
use crate::task::Interrupted;
use crate::worker::hex;

/// A source's committed progress, as stored in `__connect_offsets`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Committed {
    /// The position, as UTF-8 text when it is, else hex.
    pub(crate) position: String,
    #[serde(default)]
    pub(crate) hex: bool,
    /// Records produced by the connector up to this position.
    pub(crate) records: u64,
}

/// Sends a source's position to `__connect_offsets`; the delivery says when it is durable.
pub(crate) async fn send_position(
    producer: &Producer,
    name: &str,
    position: &[u8],
    records: u64,
) -> Result<Delivery, Interrupted> {
    let committed = match std::str::from_utf8(position) {
        Ok(text) => Committed {
            position: text.to_string(),
            hex: false,
            records,
        },
        Err(_) => Committed {
            position: hex(position),
            hex: true,
            records,
        },
    };
    let record = ProducerRecord::new(OFFSETS_TOPIC)
        .key(name.to_string())
        .value(serde_json::to_vec(&committed)?);
    Ok(producer.send(record).await?)
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The last position committed by connector `name`, with its record count.
pub(crate) async fn read_position(
    client: &Client,
    name: &str,
) -> Result<Option<(Vec<u8>, u64)>, Interrupted> {
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            max_wait: Duration::from_millis(50),
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign(OFFSETS_TOPIC, None, StartFrom::Earliest)
        .await?;
    let ends = consumer.end_offsets().await?;
    let mut last: Option<Option<Committed>> = None;
    loop {
        let done = ends.iter().all(|((topic, partition), end)| {
            consumer
                .position(topic, *partition)
                .is_none_or(|p| p >= *end)
        });
        if done {
            break;
        }
        for record in consumer.poll().await? {
            if record.key.as_deref() != Some(name.as_bytes()) {
                continue;
            }
            last = Some(
                record
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_slice::<Committed>(v).ok()),
            );
        }
    }
    Ok(last.flatten().and_then(|c| {
        let position = if c.hex {
            unhex(&c.position)?
        } else {
            c.position.into_bytes()
        };
        Some((position, c.records))
    }))
}
