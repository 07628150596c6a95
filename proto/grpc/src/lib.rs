//! Rust code generated from Runnel's gRPC contract (`proto/runnel/v1/runnel.proto`).
//!
//! Generated code only: the contract is the .proto file. Depends on nothing of the broker.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod codec;

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
