//! Rust code generated from Runnel's gRPC contract (`proto/runnel/v1/runnel.proto`).
//!
//! Generated code only: the contract is the .proto file. Depends on nothing of the broker.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod auth;
pub mod codec;
pub mod scram;
pub mod tls;

/// Version 1 of the API.
pub mod v1 {
    tonic::include_proto!("runnel.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/runnel_descriptor.bin"));

/// Metadata key of the error code name in a failed call's status.
pub const ERROR_CODE_METADATA_KEY: &str = "runnel-error-code";

/// A failed call's status: `code` as its gRPC code, `error`'s name under
/// [`ERROR_CODE_METADATA_KEY`], and `message` saying what was wrong and what to do.
pub fn error_status(
    code: tonic::Code,
    error: v1::ErrorCode,
    message: impl Into<String>,
) -> tonic::Status {
    let mut status = tonic::Status::new(code, message);
    if let Ok(value) = error.as_str_name().parse() {
        status.metadata_mut().insert(ERROR_CODE_METADATA_KEY, value);
    }
    status
}

/// The error code a failed call's status carries under [`ERROR_CODE_METADATA_KEY`].
pub fn status_error_code(status: &tonic::Status) -> Option<v1::ErrorCode> {
    let name = status
        .metadata()
        .get(ERROR_CODE_METADATA_KEY)?
        .to_str()
        .ok()?;
    v1::ErrorCode::from_str_name(name)
}

/// The in-process transport: a broker's data path for a client in the same process.
pub mod local {
    use super::v1;
    use tonic::codegen::BoxStream;
    use tonic::codegen::tokio_stream::Stream;

    /// Produce requests, in the order they are sent.
    pub type Requests = std::pin::Pin<Box<dyn Stream<Item = v1::ProduceRequest> + Send>>;

    /// A broker running in the client's process (the streams and connect runtimes run
    /// inside the broker). A client that has one sends the produce and fetch streams of
    /// the partitions this broker leads to it directly: the same answers as over gRPC,
    /// without encoding, HTTP/2 and the loopback socket in between.
    pub trait LocalBroker: Send + Sync {
        /// The broker's node id, as metadata names partition leaders.
        fn node_id(&self) -> u32;
        /// Answers `requests` in order, as the `ProduceStream` RPC does; `principal`
        /// is the one a transform or connector acts as, whose rights are checked as
        /// over gRPC (`None`: the broker's own rights).
        fn produce_stream(
            &self,
            requests: Requests,
            principal: Option<&str>,
        ) -> BoxStream<v1::ProduceResponse>;
        /// Answers `request` over and over from where the last answer ended, as the
        /// `FetchStream` RPC does. Every batch in the answers has had its CRC verified
        /// by the log read, so the client does not compute it again.
        fn fetch_stream(
            &self,
            request: v1::FetchRequest,
            principal: Option<&str>,
        ) -> BoxStream<v1::FetchResponse>;
    }
}
