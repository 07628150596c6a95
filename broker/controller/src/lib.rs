//! Runnel's controller quorum: the cluster metadata in a replicated Raft log.
//!
//! Brokers, topics, configs, partition assignment, leaders, leader epochs and ISRs live
//! in [`state::ClusterMetadata`], changed only by committed [`state::Command`]s. The log
//! is replicated by openraft between the controller voters (`--controller-quorum`); the
//! active controller is the Raft leader. Brokers register and heartbeat to it, and the
//! active controller fences a broker whose session expired, moving its leaderships.
//!
//! Depends on openraft, tonic and the gRPC contract; nothing of the broker's storage or
//! partitions. The broker reads committed metadata as [`MetadataImage`]s, in log order.

pub mod client;
mod network;
mod quorum;
mod raft_log;
pub mod security;
mod service;
pub mod state;
mod state_machine;

use std::collections::BTreeMap;
use std::io::Cursor;

pub use client::{ControllerClient, ControllerError};
pub use quorum::{ProposeError, Quorum, QuorumConfig, QuorumStatus, new_id};
pub use service::QuorumService;
pub use state::{BrokerId, ClusterMetadata, Command, CommandResult, MetadataError, Outcome};
pub use state_machine::MetadataImage;

/// Largest message on the quorum service (a snapshot of the whole metadata).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The Raft node id (a broker id widened, as openraft wants).
pub type NodeId = u64;
/// A voter's address.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// Types of the controller's Raft log.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
);

/// Parses `--controller-quorum`: `ID@HOST:PORT` separated by commas.
///
/// # Errors
/// A malformed voter, a duplicate id, id 0, or an empty list; the message shows the form.
pub fn parse_voters(text: &str) -> Result<BTreeMap<BrokerId, String>, String> {
    let mut voters = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part.split_once('@').ok_or_else(|| {
            format!("controller quorum voter {part:?} is not of the form ID@HOST:PORT (for example 1@127.0.0.1:9093)")
        })?;
        let id: BrokerId = id.trim().parse().map_err(|_| {
            format!(
                "controller quorum voter {part:?}: {id:?} is not a node id (a positive integer)"
            )
        })?;
        if id == 0 {
            return Err(format!(
                "controller quorum voter {part:?}: node ids start at 1"
            ));
        }
        if !address.contains(':') {
            return Err(format!(
                "controller quorum voter {part:?}: {address:?} needs a port (HOST:PORT)"
            ));
        }
        if voters.insert(id, address.trim().to_string()).is_some() {
            return Err(format!("controller quorum names node {id} twice"));
        }
    }
    if voters.is_empty() {
        return Err(
            "the controller quorum is empty; give at least one voter as ID@HOST:PORT".into(),
        );
    }
    Ok(voters)
}

#[cfg(test)]
mod tests {
    #[test]
    fn voters_parse_and_bad_ones_say_why() {
        let voters = super::parse_voters("1@127.0.0.1:9001, 2@h:9002").expect("parses");
        assert_eq!(voters[&2], "h:9002");
        for (bad, why) in [
            ("1:9001", "ID@HOST:PORT"),
            ("x@h:1", "not a node id"),
            ("0@h:1", "start at 1"),
            ("1@h", "needs a port"),
            ("1@h:1,1@h:2", "twice"),
            ("", "empty"),
        ] {
            let err = super::parse_voters(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
