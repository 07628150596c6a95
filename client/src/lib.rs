//! The Rust client for Runnel: [`Admin`], [`Producer`] and [`Consumer`].
//!
//! Depends only on the public contracts (`runnel-proto`, `runnel-batch`), never on the
//! broker. The `runnel` CLI talks to servers only through this crate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runnel_client::ClientError> {
//! use runnel_client::{Client, Producer, ProducerConfig, ProducerRecord};
//! let client = Client::connect(&["127.0.0.1:7070".to_string()]).await?;
//! let producer = Producer::new(client, ProducerConfig::default());
//! let delivery = producer.send(ProducerRecord::new("events").key("user-1").value("clicked")).await?;
//! let metadata = delivery.await?;
//! println!("written at {}-{}@{}", metadata.topic, metadata.partition, metadata.offset);
//! # Ok(()) }
//! ```

mod admin;
mod client;
mod consumer;
mod error;
mod group;
mod producer;

pub use admin::Admin;
pub use client::{Client, ConnectOptions, DEFAULT_BROKERS, LazyClient};
pub use consumer::{
    Consumer, ConsumerConfig, ConsumerRecord, FetchedBatch, StartFrom, next_offsets,
};
pub use error::ClientError;
pub use group::{GroupConfig, GroupConsumer, GroupMetadata};
pub use producer::{Acks, Delivery, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
pub use runnel_batch::{BatchBuilder, BatchOptions, Compression, Header, Record, RecordParts};
pub use runnel_batch::{murmur2, partition_for_key};
pub use runnel_proto::auth::{CLUSTER_RESOURCE, Conn, Credentials, Password};
pub use runnel_proto::local::LocalBroker;
pub use runnel_proto::scram::Mechanism;
pub use runnel_proto::tls::ClientTls;
pub use runnel_proto::v1;
pub use runnel_proto::v1::ErrorCode;
