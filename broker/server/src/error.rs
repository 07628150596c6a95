//! Broker errors, and the one place where they become wire errors: an [`ErrorCode`] in a
//! per-partition result, or a gRPC status with the code name in `runnel-error-code`.

use runnel_broker_storage::producers::SequenceError;
use runnel_broker_storage::{AppendError, ConfigError, ReadError, StorageError};
use runnel_proto::v1::{self, ErrorCode};
use tonic::{Code, Status};

/// Everything a client request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "unknown topic {topic:?}: create it with `runnel topic create {topic}` (auto-creation is off)"
    )]
    UnknownTopic { topic: String },
    #[error("topic {topic:?} has {count} partitions (0..={last}); partition {partition} does not exist", last = count.saturating_sub(1))]
    UnknownPartition {
        topic: String,
        partition: u32,
        count: u32,
    },
    #[error("invalid topic name {name:?}: {rule}")]
    InvalidTopicName { name: String, rule: String },
    #[error("topic {name:?} already exists")]
    TopicAlreadyExists { name: String },
    #[error("invalid partition count: {reason}")]
    InvalidPartitions { reason: String },
    #[error("replication factor {requested} is invalid: {reason}")]
    InvalidReplicationFactor { requested: u32, reason: String },
    #[error("invalid config: {reason}")]
    InvalidConfig { reason: String },
    #[error(
        "record batch of {size_bytes} bytes for {topic}-{partition} exceeds max.message.bytes ({size_bytes_max}); send smaller batches or raise the topic's max.message.bytes"
    )]
    RecordTooLarge {
        topic: String,
        partition: u32,
        size_bytes: usize,
        size_bytes_max: usize,
    },
    #[error("corrupt or malformed record batch for {topic}-{partition}: {reason}")]
    CorruptBatch {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error("{topic}-{partition}: {reason}")]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error(
        "not enough in-sync replicas for {topic}-{partition}: {isr} in sync, min.insync.replicas is {min_insync}"
    )]
    NotEnoughReplicas {
        topic: String,
        partition: u32,
        isr: usize,
        min_insync: usize,
    },
    #[error("storage error on {topic}-{partition}: {reason}")]
    Storage {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("unknown user {name:?}; `runnel user list` shows the users")]
    UnknownUser { name: String },
    #[error("topic {topic:?} is being deleted")]
    TopicDeletionInProgress { topic: String },
    #[error(
        "member {member:?} is not in group {group:?}: its session timed out or it left, and its partitions may have moved; rejoin the group"
    )]
    UnknownMemberId { group: String, member: String },
    #[error(
        "member {member:?} of group {group:?} no longer owns {topic}-{partition}: it was reassigned, so this commit is fenced"
    )]
    FencedMember {
        group: String,
        member: String,
        topic: String,
        partition: u32,
    },
    #[error("group {group:?} has live members ({}); stop them first", members.join(", "))]
    GroupNotEmpty { group: String, members: Vec<String> },
    #[error("unknown group {group:?}: it has no members and no committed offsets")]
    UnknownGroup { group: String },
    #[error("invalid group id: {reason}")]
    InvalidGroupId { reason: String },
    #[error(
        "this broker does not coordinate group {group:?} ({coordinator}); ask FindCoordinator and retry there"
    )]
    NotCoordinator { group: String, coordinator: String },
    #[error("group {group:?} has no coordinator: {reason}; retry")]
    CoordinatorNotAvailable { group: String, reason: String },
    #[error("the coordinator of group {group:?} is loading its state from {topic}; retry", topic = crate::offsets::OFFSETS_TOPIC)]
    CoordinatorLoadInProgress { group: String },
    #[error(
        "this broker is not the leader of {topic}-{partition} (the leader is broker {leader}); refresh metadata and retry there"
    )]
    NotLeader {
        topic: String,
        partition: u32,
        leader: u32,
    },
    #[error("{topic}-{partition} has no leader: {reason}")]
    LeaderNotAvailable {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error("the controller quorum did not answer: {reason}")]
    ControllerUnavailable { reason: String },
    #[error("{topic}-{partition}: {reason}")]
    OutOfOrderSequence {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error("{topic}-{partition}: {reason}")]
    ProducerFenced {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error(
        "{topic}-{partition}: the batch was written at offset {base_offset}, but the in-sync replicas shrank to {isr} (min.insync.replicas is {min_insync}) before it was replicated; it may not survive a broker failure, and a retry may write it twice"
    )]
    NotEnoughReplicasAfterAppend {
        topic: String,
        partition: u32,
        base_offset: i64,
        isr: usize,
        min_insync: usize,
    },
    #[error(
        "{topic}-{partition}: not every in-sync replica confirmed the batch at offset {base_offset} within {timeout_ms} ms (a follower is slow or down; the ISR shrinks after replica.lag.time.max.ms); it may be written, and a retry may write it twice"
    )]
    ReplicationTimedOut {
        topic: String,
        partition: u32,
        base_offset: i64,
        timeout_ms: u64,
    },
    #[error(
        "this broker does not coordinate transactional id {id:?} ({coordinator}); ask Transactions.FindCoordinator and retry there"
    )]
    TxnNotCoordinator { id: String, coordinator: String },
    #[error("transactional id {id:?} has no coordinator: {reason}; retry")]
    TxnCoordinatorNotAvailable { id: String, reason: String },
    #[error("the coordinator of transactional id {id:?} is loading its state from {topic}; retry", topic = crate::txn::TXN_TOPIC)]
    TxnCoordinatorLoading { id: String },
    #[error("transactional id {id:?}: {reason}")]
    TxnFenced { id: String, reason: String },
    #[error(
        "transactional id {id:?}: the previous transaction is still being completed; retry shortly"
    )]
    ConcurrentTransactions { id: String },
    #[error("transactional id {id:?}: {reason}")]
    InvalidTxnState { id: String, reason: String },
    #[error(
        "unknown transactional id {id:?}: call InitProducerId with it first (an id unused for 7 days is forgotten)"
    )]
    UnknownTransactionalId { id: String },
    #[error(
        "group {group:?}: an open transaction commits offsets for {topic}-{partition}; its committed offset is known once it ends; retry"
    )]
    UnstableOffsetCommit {
        group: String,
        topic: String,
        partition: u32,
    },
    /// A call this broker made to another broker for the request failed there.
    #[error("broker {broker}: {message}")]
    Peer {
        broker: u32,
        code: ErrorCode,
        message: String,
    },
    #[error("{topic}-{partition}: leader epoch {requested} is older than the leader's {current}")]
    FencedLeaderEpoch {
        topic: String,
        partition: u32,
        requested: i32,
        current: i32,
    },
    #[error(
        "{topic}-{partition}: leader epoch {requested} is newer than this broker's {current}; its metadata is behind"
    )]
    UnknownLeaderEpoch {
        topic: String,
        partition: u32,
        requested: i32,
        current: i32,
    },
}

impl From<runnel_controller::MetadataError> for BrokerError {
    fn from(err: runnel_controller::MetadataError) -> Self {
        use runnel_controller::MetadataError as M;
        match err {
            M::UnknownTopic { topic } => BrokerError::UnknownTopic { topic },
            M::InvalidTopicName { name, rule } => BrokerError::InvalidTopicName { name, rule },
            M::TopicAlreadyExists { name } => BrokerError::TopicAlreadyExists { name },
            M::InvalidPartitions { reason } => BrokerError::InvalidPartitions { reason },
            M::InvalidReplicationFactor { requested, reason } => {
                BrokerError::InvalidReplicationFactor { requested, reason }
            }
            M::InvalidRequest { reason } | M::StaleEpoch { reason } => {
                BrokerError::InvalidRequest { reason }
            }
            M::UnknownUser { name } => BrokerError::UnknownUser { name },
            err @ M::UserAlreadyExists { .. } => BrokerError::InvalidRequest {
                reason: err.to_string(),
            },
        }
    }
}

impl From<runnel_controller::ControllerError> for BrokerError {
    fn from(err: runnel_controller::ControllerError) -> Self {
        BrokerError::ControllerUnavailable {
            reason: err.to_string(),
        }
    }
}

impl BrokerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::UnknownTopic { .. } => ErrorCode::UnknownTopic,
            BrokerError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            BrokerError::InvalidTopicName { .. } => ErrorCode::InvalidTopicName,
            BrokerError::TopicAlreadyExists { .. } => ErrorCode::TopicAlreadyExists,
            BrokerError::InvalidPartitions { .. } => ErrorCode::InvalidPartitions,
            BrokerError::InvalidReplicationFactor { .. } => ErrorCode::InvalidReplicationFactor,
            BrokerError::InvalidConfig { .. } => ErrorCode::InvalidConfig,
            BrokerError::RecordTooLarge { .. } => ErrorCode::RecordTooLarge,
            BrokerError::CorruptBatch { .. } => ErrorCode::CorruptBatch,
            BrokerError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            BrokerError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
            BrokerError::Storage { .. } => ErrorCode::StorageError,
            BrokerError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            BrokerError::TopicDeletionInProgress { .. } => ErrorCode::TopicDeletionInProgress,
            BrokerError::UnknownMemberId { .. } => ErrorCode::UnknownMemberId,
            BrokerError::FencedMember { .. } => ErrorCode::FencedMember,
            BrokerError::GroupNotEmpty { .. } => ErrorCode::GroupNotEmpty,
            BrokerError::UnknownGroup { .. } => ErrorCode::UnknownGroup,
            BrokerError::InvalidGroupId { .. } => ErrorCode::InvalidGroupId,
            BrokerError::NotCoordinator { .. } => ErrorCode::NotCoordinator,
            BrokerError::CoordinatorNotAvailable { .. } => ErrorCode::CoordinatorNotAvailable,
            BrokerError::CoordinatorLoadInProgress { .. } => ErrorCode::CoordinatorLoadInProgress,
            BrokerError::NotLeader { .. } => ErrorCode::NotLeader,
            BrokerError::LeaderNotAvailable { .. } => ErrorCode::LeaderNotAvailable,
            BrokerError::ControllerUnavailable { .. } => ErrorCode::ControllerNotAvailable,
            BrokerError::NotEnoughReplicasAfterAppend { .. } => {
                ErrorCode::NotEnoughReplicasAfterAppend
            }
            BrokerError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
            BrokerError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
            BrokerError::ReplicationTimedOut { .. } => ErrorCode::RequestTimedOut,
            BrokerError::FencedLeaderEpoch { .. } => ErrorCode::FencedLeaderEpoch,
            BrokerError::Peer { code, .. } => *code,
            BrokerError::TxnNotCoordinator { .. } => ErrorCode::NotCoordinator,
            BrokerError::TxnCoordinatorNotAvailable { .. } => ErrorCode::CoordinatorNotAvailable,
            BrokerError::TxnCoordinatorLoading { .. } => ErrorCode::CoordinatorLoadInProgress,
            BrokerError::TxnFenced { .. } => ErrorCode::ProducerFenced,
            BrokerError::ConcurrentTransactions { .. } => ErrorCode::ConcurrentTransactions,
            BrokerError::InvalidTxnState { .. } => ErrorCode::InvalidTxnState,
            BrokerError::UnknownTransactionalId { .. } => ErrorCode::UnknownTransactionalId,
            BrokerError::UnstableOffsetCommit { .. } => ErrorCode::UnstableOffsetCommit,
            BrokerError::UnknownLeaderEpoch { .. } => ErrorCode::UnknownLeaderEpoch,
            BrokerError::UnknownUser { .. } => ErrorCode::UnknownUser,
        }
    }

    /// The per-partition form.
    pub fn to_proto(&self) -> v1::Error {
        v1::Error {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }

    /// The whole-call form.
    pub fn to_status(&self) -> Status {
        let code = match self.code() {
            ErrorCode::UnknownTopic
            | ErrorCode::UnknownPartition
            | ErrorCode::UnknownGroup
            | ErrorCode::UnknownTransactionalId
            | ErrorCode::UnknownUser => Code::NotFound,
            ErrorCode::UnknownMemberId | ErrorCode::FencedMember | ErrorCode::GroupNotEmpty => {
                Code::FailedPrecondition
            }
            ErrorCode::TopicAlreadyExists => Code::AlreadyExists,
            ErrorCode::OffsetOutOfRange => Code::OutOfRange,
            ErrorCode::NotEnoughReplicas
            | ErrorCode::NotEnoughReplicasAfterAppend
            | ErrorCode::FencedLeaderEpoch
            | ErrorCode::UnknownLeaderEpoch
            | ErrorCode::NotLeader
            | ErrorCode::LeaderNotAvailable
            | ErrorCode::ControllerNotAvailable
            | ErrorCode::NotCoordinator
            | ErrorCode::CoordinatorNotAvailable
            | ErrorCode::CoordinatorLoadInProgress
            | ErrorCode::ConcurrentTransactions
            | ErrorCode::UnstableOffsetCommit => Code::Unavailable,
            ErrorCode::ProducerFenced | ErrorCode::InvalidTxnState => Code::FailedPrecondition,
            ErrorCode::StorageError => Code::Internal,
            ErrorCode::RequestTimedOut => Code::DeadlineExceeded,
            ErrorCode::TopicDeletionInProgress => Code::FailedPrecondition,
            _ => Code::InvalidArgument,
        };
        runnel_proto::error_status(code, self.code(), self.to_string())
    }

    pub(crate) fn from_append(topic: &str, partition: u32, err: AppendError) -> Self {
        let (topic, partition_id) = (topic.to_string(), partition);
        match err {
            AppendError::RecordTooLarge {
                size_bytes,
                size_bytes_max,
            } => BrokerError::RecordTooLarge {
                topic,
                partition: partition_id,
                size_bytes,
                size_bytes_max,
            },
            AppendError::InvalidBatch(err) => BrokerError::CorruptBatch {
                topic,
                partition: partition_id,
                reason: err.to_string(),
            },
            AppendError::EmptyBatch | AppendError::InconsistentBatch { .. } => {
                BrokerError::CorruptBatch {
                    topic,
                    partition: partition_id,
                    reason: err.to_string(),
                }
            }
            AppendError::Storage(err) => Self::from_storage(&topic, partition_id, &err),
            AppendError::Sequence(err @ SequenceError::OutOfOrder { .. }) => {
                BrokerError::OutOfOrderSequence {
                    topic,
                    partition: partition_id,
                    reason: err.to_string(),
                }
            }
            AppendError::Sequence(err @ SequenceError::Fenced { .. }) => {
                BrokerError::ProducerFenced {
                    topic,
                    partition: partition_id,
                    reason: err.to_string(),
                }
            }
        }
    }

    pub(crate) fn from_read(topic: &str, partition: u32, err: ReadError) -> Self {
        match err {
            ReadError::OffsetOutOfRange { .. } => BrokerError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                reason: err.to_string(),
            },
            ReadError::Storage(err) => Self::from_storage(topic, partition, &err),
        }
    }

    pub(crate) fn from_storage(topic: &str, partition: u32, err: &StorageError) -> Self {
        BrokerError::Storage {
            topic: topic.to_string(),
            partition,
            reason: err.to_string(),
        }
    }
}

impl BrokerError {
    /// The error of a failed call to broker `broker`.
    pub(crate) fn from_peer(broker: u32, status: &Status) -> Self {
        BrokerError::Peer {
            broker,
            code: runnel_proto::status_error_code(status).unwrap_or(ErrorCode::LeaderNotAvailable),
            message: status.message().to_string(),
        }
    }

    /// Whether a retry may succeed (the error is about where things are or a moment's
    /// unavailability, not about the request).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.code(),
            ErrorCode::NotLeader
                | ErrorCode::LeaderNotAvailable
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::NotEnoughReplicasAfterAppend
                | ErrorCode::RequestTimedOut
                | ErrorCode::ControllerNotAvailable
                | ErrorCode::NotCoordinator
                | ErrorCode::CoordinatorNotAvailable
                | ErrorCode::CoordinatorLoadInProgress
                | ErrorCode::ConcurrentTransactions
                | ErrorCode::UnstableOffsetCommit
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::UnknownLeaderEpoch
                | ErrorCode::StorageError
        )
    }
}

impl From<ConfigError> for BrokerError {
    fn from(err: ConfigError) -> Self {
        BrokerError::InvalidConfig {
            reason: err.to_string(),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        err.to_status()
    }
}
