//! The `Quorum` gRPC service a voter serves: Raft messages from the other voters,
//! proposals and heartbeats from brokers, and the metadata watch.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use runnel_proto::v1::{
    BrokerHeartbeatRequest, BrokerHeartbeatResponse, MetadataImage as ImageMessage, ProposeRequest,
    ProposeResponse, RaftMessage, WatchMetadataRequest, quorum_server,
};
use tonic::{Request, Response, Status};

use crate::network::{KIND_APPEND, KIND_SNAPSHOT, KIND_VOTE};
use crate::quorum::ProposeError;
use crate::state::Command;
use crate::{NodeId, Quorum, TypeConfig};

/// Serves a voter's [`Quorum`].
#[derive(Clone)]
pub struct QuorumService {
    quorum: Arc<Quorum>,
}

impl Quorum {
    /// The gRPC service of this voter, to mount on the node's server.
    pub fn service(self: &Arc<Self>) -> quorum_server::QuorumServer<QuorumService> {
        quorum_server::QuorumServer::new(QuorumService {
            quorum: self.clone(),
        })
        .max_decoding_message_size(crate::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(crate::MESSAGE_BYTES_MAX)
    }
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|err| Status::invalid_argument(format!("unreadable {what}: {err}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<bytes::Bytes, Status> {
    serde_json::to_vec(value)
        .map(Into::into)
        .map_err(|err| Status::internal(err.to_string()))
}

#[tonic::async_trait]
impl quorum_server::Quorum for QuorumService {
    async fn raft(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        let raft = &self.quorum.raft;
        let payload = match message.kind.as_str() {
            KIND_APPEND => {
                let rpc: AppendEntriesRequest<TypeConfig> = parse(&message.payload, KIND_APPEND)?;
                encode(&raft.append_entries(rpc).await)?
            }
            KIND_VOTE => {
                let rpc: VoteRequest<NodeId> = parse(&message.payload, KIND_VOTE)?;
                encode(&raft.vote(rpc).await)?
            }
            KIND_SNAPSHOT => {
                let rpc: InstallSnapshotRequest<TypeConfig> =
                    parse(&message.payload, KIND_SNAPSHOT)?;
                encode(&raft.install_snapshot(rpc).await)?
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown Raft message kind {other:?}"
                )));
            }
        };
        Ok(Response::new(RaftMessage {
            kind: message.kind,
            payload,
        }))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let command: Command = parse(&request.into_inner().command, "command")?;
        match self.quorum.propose_local(command).await {
            Ok((index, result)) => Ok(Response::new(ProposeResponse {
                result: encode(&result)?,
                index,
                ..Default::default()
            })),
            Err(ProposeError::NotLeader { leader }) => {
                let (leader_id, leader_address) = leader.unwrap_or_default();
                Ok(Response::new(ProposeResponse {
                    leader_id,
                    leader_address,
                    ..Default::default()
                }))
            }
            Err(ProposeError::Fatal(err)) => Err(Status::unavailable(err)),
        }
    }

    async fn broker_heartbeat(
        &self,
        request: Request<BrokerHeartbeatRequest>,
    ) -> Result<Response<BrokerHeartbeatResponse>, Status> {
        let beat = request.into_inner();
        match self
            .quorum
            .heartbeat_local(beat.broker_id, &beat.address, &beat.incarnation)
            .await
        {
            Ok(()) => Ok(Response::new(BrokerHeartbeatResponse {
                accepted: true,
                ..Default::default()
            })),
            Err(ProposeError::NotLeader { leader }) => {
                let (leader_id, leader_address) = leader.unwrap_or_default();
                Ok(Response::new(BrokerHeartbeatResponse {
                    accepted: false,
                    leader_id,
                    leader_address,
                }))
            }
            Err(ProposeError::Fatal(err)) => Err(Status::unavailable(err)),
        }
    }

    type WatchMetadataStream = Pin<Box<dyn Stream<Item = Result<ImageMessage, Status>> + Send>>;

    async fn watch_metadata(
        &self,
        _request: Request<WatchMetadataRequest>,
    ) -> Result<Response<Self::WatchMetadataStream>, Status> {
        let mut images = self.quorum.images();
        let quorum = self.quorum.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Ends when the stream is dropped (the send fails) or the quorum stops.
        tokio::spawn(async move {
            loop {
                let image = images.borrow_and_update().clone();
                let message = encode(&image.metadata).map(|metadata| ImageMessage {
                    index: image.index,
                    controller_id: quorum.leader().unwrap_or(0),
                    metadata,
                });
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed || images.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
