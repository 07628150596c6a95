//! How a broker reaches the active controller: proposals and heartbeats go to the voter
//! that leads, found by asking any voter and following its hint, with retries until a
//! deadline. A colocated voter is called in process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runnel_proto::auth::{Conn, Credentials};
use runnel_proto::v1::{
    BrokerHeartbeatRequest, MetadataImage as ImageMessage, ProposeRequest, WatchMetadataRequest,
    quorum_client::QuorumClient,
};
use tokio::sync::watch;

use crate::quorum::ProposeError;
use crate::state::{BrokerId, ClusterMetadata, Command, CommandResult};
use crate::{MetadataImage, Quorum};

/// Pause between attempts while no active controller answers.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "no active controller answered within {waited_ms} ms (last: {last}); check that a majority of the controller quorum ({voters}) is running"
    )]
    Unavailable {
        waited_ms: u64,
        last: String,
        voters: String,
    },
    #[error("the controller quorum failed: {0}")]
    Fatal(String),
}

pub struct ControllerClient {
    voters: BTreeMap<BrokerId, String>,
    local: Option<Arc<Quorum>>,
    leader: Mutex<Option<BrokerId>>,
    channels: Mutex<HashMap<BrokerId, QuorumClient<Conn>>>,
    tls: Option<runnel_proto::tls::ClientTls>,
    credentials: Option<Arc<Credentials>>,
}

enum Attempt<T> {
    Done(T),
    Elsewhere(Option<BrokerId>, String),
}

impl ControllerClient {
    /// `local` is this node's own voter, when it is one; `tls` and `credentials` how to
    /// reach the others.
    pub fn new(
        voters: BTreeMap<BrokerId, String>,
        local: Option<Arc<Quorum>>,
        tls: Option<runnel_proto::tls::ClientTls>,
        credentials: Option<Arc<Credentials>>,
    ) -> Self {
        ControllerClient {
            voters,
            local,
            leader: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            tls,
            credentials,
        }
    }

    /// The active controller this client last reached.
    pub fn known_leader(&self) -> Option<BrokerId> {
        *self.leader()
    }

    pub fn voters(&self) -> &BTreeMap<BrokerId, String> {
        &self.voters
    }

    fn leader(&self) -> MutexGuard<'_, Option<BrokerId>> {
        self.leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn channel(&self, id: BrokerId) -> Option<QuorumClient<Conn>> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = channels.get(&id) {
            return Some(client.clone());
        }
        let address = self.voters.get(&id)?;
        let channel = crate::network::channel(
            address,
            Duration::from_secs(1),
            self.tls.as_ref(),
            self.credentials.as_ref(),
        )
        .ok()?;
        let client = QuorumClient::new(channel)
            .max_decoding_message_size(crate::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(crate::MESSAGE_BYTES_MAX);
        channels.insert(id, client.clone());
        Some(client)
    }

    /// The voters to try, the believed leader first.
    fn targets(&self) -> Vec<BrokerId> {
        let mut targets: Vec<BrokerId> = Vec::new();
        if let Some(leader) = *self.leader() {
            targets.push(leader);
        }
        if let Some(local) = &self.local
            && let Some(leader) = local.leader()
            && !targets.contains(&leader)
        {
            targets.push(leader);
        }
        let rest: Vec<BrokerId> = self
            .voters
            .keys()
            .copied()
            .filter(|id| !targets.contains(id))
            .collect();
        targets.extend(rest);
        targets
    }

    async fn with_leader<T, F, Fut>(
        &self,
        timeout: Duration,
        mut call: F,
    ) -> Result<T, ControllerError>
    where
        F: FnMut(BrokerId) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ControllerError>>,
    {
        let started = Instant::now();
        let mut last = String::from("no attempt");
        loop {
            for target in self.targets() {
                // Every attempt ends by the deadline: a voter that does not answer (paused,
                // or a write that cannot commit) must not hold the caller past it.
                let remaining = timeout.saturating_sub(started.elapsed()).max(RETRY_BACKOFF);
                let attempt = match tokio::time::timeout(remaining, call(target)).await {
                    Ok(attempt) => attempt?,
                    Err(_) => Attempt::Elsewhere(
                        None,
                        format!(
                            "voter {target} did not answer within {} ms",
                            remaining.as_millis()
                        ),
                    ),
                };
                match attempt {
                    Attempt::Done(value) => {
                        *self.leader() = Some(target);
                        return Ok(value);
                    }
                    Attempt::Elsewhere(hint, why) => {
                        last = why;
                        *self.leader() = hint;
                        if hint.is_some() && hint != Some(target) {
                            break;
                        }
                    }
                }
            }
            if started.elapsed() >= timeout {
                return Err(ControllerError::Unavailable {
                    waited_ms: started.elapsed().as_millis() as u64,
                    last,
                    voters: self
                        .voters
                        .iter()
                        .map(|(id, a)| format!("{id}@{a}"))
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }

    /// Proposes `command` to the active controller and waits until it is applied there.
    /// Returns the log index it was committed at and its result.
    ///
    /// # Errors
    /// No active controller within `timeout`.
    pub async fn propose(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<(u64, CommandResult), ControllerError> {
        let bytes: bytes::Bytes = serde_json::to_vec(&command)
            .map_err(|e| ControllerError::Fatal(e.to_string()))?
            .into();
        self.with_leader(timeout, |target| {
            let command = command.clone();
            let bytes = bytes.clone();
            async move {
                if let Some(local) = self.local.as_ref().filter(|l| l.node_id() == target) {
                    return Ok(match local.propose_local(command).await {
                        Ok(done) => Attempt::Done(done),
                        Err(ProposeError::NotLeader { leader }) => Attempt::Elsewhere(
                            leader.map(|l| l.0),
                            "not the active controller".into(),
                        ),
                        Err(ProposeError::Fatal(err)) => return Err(ControllerError::Fatal(err)),
                    });
                }
                let Some(mut client) = self.channel(target) else {
                    return Ok(Attempt::Elsewhere(
                        None,
                        format!("no address for voter {target}"),
                    ));
                };
                let mut request = tonic::Request::new(ProposeRequest { command: bytes });
                request.set_timeout(Duration::from_secs(10));
                match client.propose(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        if response.result.is_empty() {
                            let hint = (response.leader_id != 0).then_some(response.leader_id);
                            return Ok(Attempt::Elsewhere(
                                hint,
                                format!("voter {target} is not the active controller"),
                            ));
                        }
                        let result: CommandResult = serde_json::from_slice(&response.result)
                            .map_err(|e| {
                                ControllerError::Fatal(format!(
                                    "voter {target} sent an unreadable result: {e}"
                                ))
                            })?;
                        Ok(Attempt::Done((response.index, result)))
                    }
                    Err(status) => Ok(Attempt::Elsewhere(
                        None,
                        format!("voter {target}: {}", status.message()),
                    )),
                }
            }
        })
        .await
    }

    /// One heartbeat of broker `id` to the active controller, answered once the
    /// controller has registered or unfenced the broker where needed.
    ///
    /// # Errors
    /// No active controller within `timeout`.
    pub async fn heartbeat(
        &self,
        id: BrokerId,
        address: &str,
        incarnation: &str,
        timeout: Duration,
    ) -> Result<(), ControllerError> {
        self.with_leader(timeout, |target| async move {
            if let Some(local) = self.local.as_ref().filter(|l| l.node_id() == target) {
                return Ok(
                    match local.heartbeat_local(id, address, incarnation).await {
                        Ok(()) => Attempt::Done(()),
                        Err(ProposeError::NotLeader { leader }) => Attempt::Elsewhere(
                            leader.map(|l| l.0),
                            "not the active controller".into(),
                        ),
                        Err(ProposeError::Fatal(err)) => Attempt::Elsewhere(None, err),
                    },
                );
            }
            let Some(mut client) = self.channel(target) else {
                return Ok(Attempt::Elsewhere(
                    None,
                    format!("no address for voter {target}"),
                ));
            };
            let mut request = tonic::Request::new(BrokerHeartbeatRequest {
                broker_id: id,
                address: address.to_string(),
                incarnation: incarnation.to_string(),
            });
            request.set_timeout(Duration::from_secs(5));
            match client.broker_heartbeat(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if response.accepted {
                        Ok(Attempt::Done(()))
                    } else {
                        let hint = (response.leader_id != 0).then_some(response.leader_id);
                        Ok(Attempt::Elsewhere(
                            hint,
                            format!("voter {target} is not the active controller"),
                        ))
                    }
                }
                Err(status) => Ok(Attempt::Elsewhere(
                    None,
                    format!("voter {target}: {}", status.message()),
                )),
            }
        })
        .await
    }

    /// Follows the committed metadata from the voters, for a broker that is not a voter
    /// itself: images arrive in log order; an older one than already seen (from a voter
    /// that lags) is skipped. Runs until the receiver side is gone.
    pub async fn follow_metadata(self: Arc<Self>, images: watch::Sender<Arc<MetadataImage>>) {
        let voters: Vec<BrokerId> = self.voters.keys().copied().collect();
        if voters.is_empty() {
            return;
        }
        let mut next = 0usize;
        while !images.is_closed() {
            let target = *self
                .leader()
                .as_ref()
                .unwrap_or(&voters[next % voters.len()]);
            next += 1;
            let Some(mut client) = self.channel(target) else {
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            };
            let mut stream = match client.watch_metadata(WatchMetadataRequest {}).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    tracing::debug!(voter = target, error = %status, "metadata watch failed");
                    *self.leader() = None;
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
            };
            while let Ok(Some(message)) = stream.message().await {
                if message.controller_id != 0 {
                    *self.leader() = Some(message.controller_id);
                }
                if let Some(image) = decode_image(&message)
                    && image.index > images.borrow().index
                {
                    images.send_replace(Arc::new(image));
                }
            }
            *self.leader() = None;
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }
}

fn decode_image(message: &ImageMessage) -> Option<MetadataImage> {
    let metadata: ClusterMetadata = match serde_json::from_slice(&message.metadata) {
        Ok(metadata) => metadata,
        Err(err) => {
            tracing::error!(error = %err, "unreadable metadata image from a controller");
            return None;
        }
    };
    Some(MetadataImage {
        index: message.index,
        metadata,
    })
}
