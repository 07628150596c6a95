//! Client errors: the broker's error codes mapped back from the wire.

use runnel_proto::v1::{self, ErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to any broker in {brokers}: {reason}; is Runnel running (`runnel dev`) and is --brokers / RUNNEL_BROKERS right?"
    )]
    Connect { brokers: String, reason: String },
    /// The broker refused the request; `code` says why, `message` says what to do.
    #[error("{message}")]
    Broker { code: ErrorCode, message: String },
    #[error("gRPC error {code:?}: {message}")]
    Transport { code: tonic::Code, message: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("corrupt data from the broker: {0}")]
    Corrupt(String),
    #[error("the producer was closed before the record was acknowledged")]
    ProducerClosed,
}

impl ClientError {
    /// The broker's error code, when the broker gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Broker { code, .. } => matches!(
                code,
                ErrorCode::NotLeader
                    | ErrorCode::LeaderNotAvailable
                    | ErrorCode::RequestTimedOut
                    | ErrorCode::NotEnoughReplicas
                    | ErrorCode::NotEnoughReplicasAfterAppend
                    | ErrorCode::ControllerNotAvailable
                    | ErrorCode::NotCoordinator
                    | ErrorCode::CoordinatorNotAvailable
                    | ErrorCode::CoordinatorLoadInProgress
                    | ErrorCode::RuntimeNotAvailable
                    | ErrorCode::ConcurrentTransactions
                    | ErrorCode::UnstableOffsetCommit
                    // The replica's storage failed (a full disk): the controller moves
                    // the leadership to a healthy replica; a retry goes there.
                    | ErrorCode::StorageError
            ),
            ClientError::Transport { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                )
            }
            ClientError::Connect { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn from_proto(error: &v1::Error) -> Self {
        ClientError::Broker {
            code: ErrorCode::try_from(error.code).unwrap_or(ErrorCode::InvalidRequest),
            message: error.message.clone(),
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(runnel_proto::ERROR_CODE_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::from_str_name);
        match code {
            Some(code) => ClientError::Broker {
                code,
                message: status.message().to_string(),
            },
            None => ClientError::Transport {
                code: status.code(),
                message: status.message().to_string(),
            },
        }
    }
}

/// `Err` for a per-partition error, `Ok` when there is none.
pub(crate) fn check(error: Option<&v1::Error>) -> Result<(), ClientError> {
    match error {
        Some(error) if error.code != ErrorCode::None as i32 => Err(ClientError::from_proto(error)),
        _ => Ok(()),
    }
}
