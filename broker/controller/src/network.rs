//! Raft messages between voters, over the `Quorum` gRPC service.
//!
//! openraft's requests and responses travel as JSON in a `RaftMessage`; a transport
//! failure is `Unreachable` (openraft backs off and retries), an error the peer's Raft
//! returned is a `RemoteError`.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use runnel_proto::v1::{RaftMessage, quorum_client::QuorumClient};
use serde::{Serialize, de::DeserializeOwned};
use std::sync::Arc;

use runnel_proto::auth::{Conn, Credentials};
use runnel_proto::tls::ClientTls;

use crate::{Node, NodeId, TypeConfig};

pub(crate) const KIND_APPEND: &str = "append_entries";
pub(crate) const KIND_VOTE: &str = "vote";
pub(crate) const KIND_SNAPSHOT: &str = "install_snapshot";

/// Connects to `address` lazily: the channel dials on first use and redials after a
/// failure, so a voter that is down now is reached once it is back.
pub(crate) fn channel(
    address: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
    credentials: Option<&Arc<Credentials>>,
) -> Result<Conn, tonic::transport::Error> {
    let channel = runnel_proto::tls::endpoint(address, tls)?
        .connect_timeout(timeout)
        // A peer cut off without a reset (a network partition) is noticed within
        // seconds instead of at the TCP timeout: the channel then redials.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(Conn::new(channel, credentials.cloned()))
}

#[derive(Clone)]
pub(crate) struct Network {
    pub(crate) rpc_timeout: Duration,
    /// TLS towards the other voters, when the cluster uses it.
    pub(crate) tls: Option<ClientTls>,
    /// What this voter proves itself with to the others (the cluster secret).
    pub(crate) credentials: Option<Arc<Credentials>>,
}

pub(crate) struct Peer {
    target: NodeId,
    client: Option<QuorumClient<Conn>>,
    rpc_timeout: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        let client = channel(
            &node.addr,
            self.rpc_timeout,
            self.tls.as_ref(),
            self.credentials.as_ref(),
        )
        .ok()
        .map(QuorumClient::new);
        Peer {
            target,
            client,
            rpc_timeout: self.rpc_timeout,
        }
    }
}

impl Peer {
    async fn call<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &mut self,
        kind: &str,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        let unreachable =
            |msg: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg)));
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable(format!("no channel to voter {}", self.target)));
        };
        let payload =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut call = tonic::Request::new(RaftMessage {
            kind: kind.to_string(),
            payload: payload.into(),
        });
        call.set_timeout(ttl.min(self.rpc_timeout));
        let response = tokio::time::timeout(ttl.min(self.rpc_timeout), client.raft(call))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "voter {} did not answer {kind} in time",
                    self.target
                ))
            })?
            .map_err(|status| unreachable(format!("voter {}: {status}", self.target)))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&response.into_inner().payload)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|err| RPCError::RemoteError(RemoteError::new(self.target, err)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(KIND_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(KIND_SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(KIND_VOTE, &rpc, option.hard_ttl()).await
    }
}
