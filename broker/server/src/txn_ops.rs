//! Transactions in the broker: the transaction coordinator (the state machine of
//! [`crate::txn`], stored in `__transaction_state`), the partition leaders' part (the
//! implicit join of a partition at a transaction's first batch, markers), and the
//! administration of transactions.
//!
//! Invariants:
//! - A broker coordinates a transactional id only while it leads the id's
//!   `__transaction_state` partition and has replayed it for that leader epoch (as for
//!   groups). A state change is acknowledged only once every in-sync replica holds it.
//! - Calls for one id are serialised by the id's lock; a transaction's markers are
//!   written (acks=all) before its `Complete*` state, and EndTransaction answers after
//!   it. A coordinator that takes over finishes every `Prepare*` state it replays.
//! - A leader appends the first transactional batch of a producer's transaction only
//!   after the coordinator added the partition to it (KIP-890 part 1), so every
//!   partition holding a transaction's records gets its marker.
//! - Control batches come only from the coordinator (clients' are refused by the log).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use runnel_batch::ControlType;
use runnel_batch::Record;
use runnel_controller::state::NO_LEADER;
use runnel_proto::auth::Conn;
use runnel_proto::v1;
use runnel_proto::v1::replication_client::ReplicationClient;
use runnel_proto::v1::transactions_client::TransactionsClient;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::now_ms;
use crate::partition::Partition;
use crate::txn::{
    DEFAULT_TIMEOUT_MS, EndDecision, TXN_TOPIC, TxnError, TxnMeta, TxnState, partition_for_txn,
};

/// Longest transactional id accepted.
const TRANSACTIONAL_ID_BYTES_MAX: usize = 255;
/// Pause between attempts to write a marker to a partition that cannot take it yet.
const MARKER_RETRY: Duration = Duration::from_millis(100);

/// The coordinator's memory: the state of the ids of the `__transaction_state`
/// partitions this broker leads and has replayed.
#[derive(Debug, Default)]
pub(crate) struct TxnCoordinator {
    metas: HashMap<String, TxnMeta>,
    /// Replayed partitions, with the leader epoch they were replayed in.
    loaded: HashMap<u32, i32>,
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Ids whose transaction a background task is completing or aborting.
    busy: BTreeSet<String>,
}

fn validate_id(id: &str) -> Result<(), BrokerError> {
    if id.is_empty() || id.len() > TRANSACTIONAL_ID_BYTES_MAX {
        return Err(BrokerError::InvalidRequest {
            reason: format!(
                "a transactional id must have 1 to {TRANSACTIONAL_ID_BYTES_MAX} bytes; got {}",
                id.len()
            ),
        });
    }
    Ok(())
}

fn txn_error(id: &str, err: TxnError) -> BrokerError {
    let id = id.to_string();
    match err {
        TxnError::Fenced(reason) => BrokerError::TxnFenced { id, reason },
        TxnError::Concurrent => BrokerError::ConcurrentTransactions { id },
        TxnError::InvalidState(reason) => BrokerError::InvalidTxnState { id, reason },
    }
}

pub(crate) fn producer_epoch(epoch: i32) -> Result<i16, BrokerError> {
    i16::try_from(epoch).map_err(|_| BrokerError::InvalidRequest {
        reason: format!("producer epoch {epoch} is out of range (0..=32767)"),
    })
}

fn describe(id: &str, meta: &TxnMeta, coordinator: u32) -> v1::TransactionDescription {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
    for (topic, partition) in &meta.partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    v1::TransactionDescription {
        transactional_id: id.to_string(),
        producer_id: meta.producer_id,
        producer_epoch: i32::from(meta.producer_epoch),
        state: meta.state.name().to_string(),
        timeout_ms: meta.timeout_ms,
        start_ms: meta.start_ms,
        partitions: by_topic
            .into_iter()
            .map(|(topic, partitions)| v1::TopicPartitions {
                topic: topic.to_string(),
                partitions,
            })
            .collect(),
        coordinator,
    }
}

impl Broker {
    fn txns(&self) -> std::sync::MutexGuard<'_, TxnCoordinator> {
        self.txn_coordinator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn txn_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.txns().locks.entry(id.to_string()).or_default().clone()
    }

    /// A client for broker `node` (one lazily connected channel per broker).
    pub(crate) fn peer(&self, node: u32) -> Result<Conn, BrokerError> {
        let image = self.image();
        let address = image
            .metadata
            .broker(node)
            .map(|b| b.address.clone())
            .ok_or_else(|| BrokerError::LeaderNotAvailable {
                topic: String::new(),
                partition: 0,
                reason: format!("broker {node} is not registered"),
            })?;
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((known, channel)) = peers.get(&node)
            && *known == address
        {
            return Ok(channel.clone());
        }
        let channel = runnel_proto::tls::endpoint(&address, self.client_tls.as_ref())
            .map_err(|err| BrokerError::InvalidRequest {
                reason: format!("broker {node} has an invalid address {address:?}: {err}"),
            })?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_millis(
                self.config.request_timeout_ms + 5_000,
            ))
            .connect_lazy();
        let channel = Conn::new(channel, self.internal_credentials.clone());
        peers.insert(node, (address, channel.clone()));
        Ok(channel)
    }

    /// The id's `__transaction_state` partition, when this broker coordinates the id.
    ///
    /// # Errors
    /// An invalid id, or NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE or
    /// COORDINATOR_LOAD_IN_PROGRESS.
    fn check_txn_coordinator(&self, id: &str) -> Result<Arc<Partition>, BrokerError> {
        validate_id(id)?;
        let index = partition_for_txn(id);
        let partition = match self.hosted_partition(TXN_TOPIC, index) {
            Some(partition) if partition.is_leader() => partition,
            _ => return Err(self.not_txn_coordinator(id, index)),
        };
        if self.txns().loaded.get(&index) != Some(&partition.leader_epoch()) {
            return Err(BrokerError::TxnCoordinatorLoading { id: id.to_string() });
        }
        Ok(partition)
    }

    /// The broker that coordinates `id` per the applied metadata.
    fn txn_coordinator_of(&self, id: &str) -> Result<u32, BrokerError> {
        let index = partition_for_txn(id);
        let image = self.image();
        image
            .metadata
            .topics
            .get(TXN_TOPIC)
            .and_then(|t| t.partitions.get(index as usize))
            .map(|p| p.leader)
            .filter(|leader| *leader != NO_LEADER)
            .ok_or_else(|| self.not_txn_coordinator(id, index))
    }

    fn not_txn_coordinator(&self, id: &str, index: u32) -> BrokerError {
        let id = id.to_string();
        let image = self.image();
        let record = image
            .metadata
            .topics
            .get(TXN_TOPIC)
            .and_then(|t| t.partitions.get(index as usize));
        match record {
            None => BrokerError::TxnCoordinatorNotAvailable {
                id,
                reason: format!("the internal topic {TXN_TOPIC} is not created yet"),
            },
            Some(p) if p.leader == NO_LEADER => BrokerError::TxnCoordinatorNotAvailable {
                id,
                reason: format!("partition {index} of {TXN_TOPIC} has no leader"),
            },
            Some(p) if p.leader == self.config.node_id => BrokerError::TxnCoordinatorLoading { id },
            Some(p) => BrokerError::TxnNotCoordinator {
                id,
                coordinator: format!("broker {} coordinates it", p.leader),
            },
        }
    }

    /// Which broker coordinates a transactional id.
    ///
    /// # Errors
    /// An invalid id, or the id's partition has no leader (or does not exist yet).
    pub fn find_txn_coordinator(
        &self,
        id: &str,
    ) -> Result<v1::FindCoordinatorResponse, BrokerError> {
        validate_id(id)?;
        let leader = self.txn_coordinator_of(id)?;
        let image = self.image();
        let broker = image
            .metadata
            .broker(leader)
            .ok_or_else(|| self.not_txn_coordinator(id, partition_for_txn(id)))?;
        Ok(v1::FindCoordinatorResponse {
            node_id: broker.id,
            address: broker.address.clone(),
        })
    }

    /// Stores an id's new state (acks=all), then makes it the state in memory.
    async fn store_txn(
        &self,
        partition: &Partition,
        id: &str,
        meta: TxnMeta,
    ) -> Result<TxnMeta, BrokerError> {
        let end = self.append_txn(partition, id, &meta)?;
        self.await_internal(partition, end).await?;
        self.txns().metas.insert(id.to_string(), meta.clone());
        Ok(meta)
    }

    /// Appends an id's state record; returns the log end after it.
    fn append_txn(
        &self,
        partition: &Partition,
        id: &str,
        meta: &TxnMeta,
    ) -> Result<i64, BrokerError> {
        let record = Record {
            offset: 0,
            timestamp_ms: now_ms(),
            key: Some(bytes::Bytes::copy_from_slice(id.as_bytes())),
            value: Some(crate::txn::encode(meta).into()),
            headers: Vec::new(),
        };
        Ok(self.append_internal(partition, &[record])?.end_offset)
    }

    fn txn_meta(&self, id: &str) -> Option<TxnMeta> {
        self.txns().metas.get(id).cloned()
    }

    /// The id's state, which must exist.
    fn known_txn(&self, id: &str) -> Result<TxnMeta, BrokerError> {
        self.txn_meta(id)
            .ok_or_else(|| BrokerError::UnknownTransactionalId { id: id.to_string() })
    }

    /// Takes the id's lock, checking before (not to queue for an id coordinated
    /// elsewhere) and after (the leadership may have moved meanwhile) that this broker
    /// coordinates it; returns the lock's guard and the id's `__transaction_state`
    /// partition.
    async fn lock_txn(
        &self,
        id: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, Arc<Partition>), BrokerError> {
        self.check_txn_coordinator(id)?;
        let held = self.txn_lock(id).lock_owned().await;
        Ok((held, self.check_txn_coordinator(id)?))
    }

    /// InitProducerId with a transactional id: the id's producer id with a new epoch
    /// (fencing older instances), after finishing or aborting what they left open.
    ///
    /// # Errors
    /// Not the coordinator, an invalid timeout, or the state could not be stored.
    pub async fn init_transactional_producer(
        &self,
        id: &str,
        timeout_ms: u32,
    ) -> Result<v1::InitProducerIdResponse, BrokerError> {
        let timeout_ms = match timeout_ms {
            0 => DEFAULT_TIMEOUT_MS,
            ms if ms > self.config.transaction_max_timeout_ms => {
                return Err(BrokerError::InvalidRequest {
                    reason: format!(
                        "transaction timeout {ms} ms is longer than the broker's maximum {} ms (transaction_max_timeout_ms)",
                        self.config.transaction_max_timeout_ms
                    ),
                });
            }
            ms => ms,
        };
        let (_held, partition) = self.lock_txn(id).await?;
        let now = now_ms();
        let meta = match self.txn_meta(id) {
            None => {
                let producer_id = self.init_producer_id().await?.producer_id;
                TxnMeta::new(producer_id, timeout_ms, now)
            }
            Some(meta) => {
                let meta = self
                    .settle_txn(
                        &partition,
                        id,
                        meta,
                        "a new instance initialised: aborting the transaction the previous one left open",
                    )
                    .await?;
                let new_id = if meta.epoch_exhausted() {
                    Some(self.init_producer_id().await?.producer_id)
                } else {
                    None
                };
                meta.reinitialise(new_id, timeout_ms, now)
            }
        };
        let meta = self.store_txn(&partition, id, meta).await?;
        Ok(v1::InitProducerIdResponse {
            producer_id: meta.producer_id,
            producer_epoch: i32::from(meta.producer_epoch),
        })
    }

    /// Adds partitions to the producer's transaction (a partition leader asks, at the
    /// transaction's first batch there).
    ///
    /// # Errors
    /// Not the coordinator, an unknown id, a fenced producer, or the previous
    /// transaction is still completing.
    pub async fn add_partitions_to_txn(
        &self,
        request: v1::AddPartitionsToTransactionRequest,
    ) -> Result<(), BrokerError> {
        let id = request.transactional_id.as_str();
        let epoch = producer_epoch(request.producer_epoch)?;
        let partitions: Vec<(String, u32)> = request
            .partitions
            .iter()
            .flat_map(|tp| tp.partitions.iter().map(|p| (tp.topic.clone(), *p)))
            .collect();
        let (_held, partition) = self.lock_txn(id).await?;
        let meta = self.known_txn(id)?;
        let changed = meta
            .add_partitions(request.producer_id, epoch, &partitions, now_ms())
            .map_err(|err| txn_error(id, err))?;
        if let Some(next) = changed {
            self.store_txn(&partition, id, next).await?;
        }
        Ok(())
    }

    /// Commits or aborts the producer's transaction; answers once every partition of it
    /// holds the marker, with the producer's next epoch.
    ///
    /// # Errors
    /// Not the coordinator, an unknown id, a fenced producer, a commit of an aborted
    /// transaction, or a failure to store the state.
    pub async fn end_transaction(
        &self,
        request: v1::EndTransactionRequest,
    ) -> Result<v1::EndTransactionResponse, BrokerError> {
        let id = request.transactional_id.as_str();
        let epoch = producer_epoch(request.producer_epoch)?;
        let (_held, partition) = self.lock_txn(id).await?;
        let meta = self.known_txn(id)?;
        let decision = meta
            .end(request.producer_id, epoch, request.commit, now_ms())
            .map_err(|err| txn_error(id, err))?;
        let done = match decision {
            EndDecision::Empty(next) => {
                let stored = self.store_txn(&partition, id, next).await?;
                return Ok(v1::EndTransactionResponse {
                    producer_epoch: i32::from(stored.producer_epoch),
                    ended_open: false,
                });
            }
            EndDecision::Repeat { .. } if !meta.state.is_prepared() => meta,
            EndDecision::Repeat { .. } => self.complete_txn(&partition, id, meta).await?,
            EndDecision::Prepare(prepared) => {
                let prepared = self.store_txn(&partition, id, prepared).await?;
                self.complete_txn(&partition, id, prepared).await?
            }
        };
        Ok(v1::EndTransactionResponse {
            producer_epoch: i32::from(done.producer_epoch),
            ended_open: true,
        })
    }

    /// Leaves no transaction of the id open or half-ended: aborts an open one (saying
    /// `why`, bumping the epoch) and completes a prepared one. Called with the id's lock
    /// held.
    async fn settle_txn(
        &self,
        partition: &Partition,
        id: &str,
        mut meta: TxnMeta,
        why: &str,
    ) -> Result<TxnMeta, BrokerError> {
        if let Some(aborting) = meta.abort(now_ms()) {
            tracing::info!(transactional_id = id, "{why}");
            meta = self.store_txn(partition, id, aborting).await?;
        }
        if meta.state.is_prepared() {
            meta = self.complete_txn(partition, id, meta).await?;
        }
        Ok(meta)
    }

    /// Writes the markers of a `Prepare*` transaction to all its partitions, then stores
    /// its `Complete*` state. Called with the id's lock held.
    async fn complete_txn(
        &self,
        partition: &Partition,
        id: &str,
        meta: TxnMeta,
    ) -> Result<TxnMeta, BrokerError> {
        let commit = meta.state == TxnState::PrepareCommit;
        let coordinator_epoch = partition.leader_epoch();
        let writes = meta.partitions.iter().map(|(topic, index)| {
            self.write_marker(
                partition,
                coordinator_epoch,
                topic,
                *index,
                meta.producer_id,
                meta.producer_epoch,
                commit,
            )
        });
        for result in futures::future::join_all(writes).await {
            result?;
        }
        // The outcome is durable already (the Prepare record and every marker): the
        // Complete record is appended but not waited for. The next state change of any
        // id in this partition waits for it; should it be lost, the next coordinator
        // replays the Prepare record and finds every marker written.
        let complete = meta.complete(now_ms());
        match self.append_txn(partition, id, &complete) {
            Ok(_) => {
                self.txns().metas.insert(id.to_string(), complete.clone());
            }
            // The state stays Prepare*: the background check completes it again.
            Err(err) => {
                tracing::warn!(transactional_id = id, error = %err, "could not append the Complete record; retrying later")
            }
        }
        Ok(complete)
    }

    /// Writes one marker, retrying while the partition cannot take it (no leader, too
    /// few in-sync replicas, a leader behind on metadata), as long as this broker still
    /// coordinates in the same epoch. A topic deleted in this broker's metadata needs no
    /// marker.
    #[allow(clippy::too_many_arguments)]
    async fn write_marker(
        &self,
        coordinator: &Partition,
        coordinator_epoch: i32,
        topic: &str,
        index: u32,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
    ) -> Result<(), BrokerError> {
        let request = v1::WriteTxnMarkerRequest {
            topic: topic.to_string(),
            partition: index,
            producer_id,
            producer_epoch: i32::from(producer_epoch),
            commit,
            coordinator_epoch,
        };
        loop {
            if !coordinator.is_leader() || coordinator.leader_epoch() != coordinator_epoch {
                return Err(BrokerError::TxnCoordinatorNotAvailable {
                    id: String::new(),
                    reason: "this broker stopped coordinating while writing markers; the next coordinator finishes the transaction".into(),
                });
            }
            let image = self.image();
            let Some(record) = image
                .metadata
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(index as usize))
            else {
                return Ok(());
            };
            let leader = record.leader;
            let result = if leader == NO_LEADER {
                Err(BrokerError::LeaderNotAvailable {
                    topic: topic.to_string(),
                    partition: index,
                    reason: "no leader".into(),
                })
            } else if leader == self.config.node_id {
                self.write_txn_marker(request.clone()).await.map(|_| ())
            } else {
                match self.peer(leader) {
                    Ok(channel) => ReplicationClient::new(channel)
                        .write_txn_marker(request.clone())
                        .await
                        .map(|_| ())
                        .map_err(|status| BrokerError::from_peer(leader, &status)),
                    Err(err) => Err(err),
                }
            };
            // A leader that answers "unknown topic" is behind on metadata (a broker that
            // just restarted replays it): retry. Only this broker's own metadata decides
            // that the topic is gone (above); skipping a marker on a peer's word would
            // leave the transaction open there, for the next one's marker to end.
            match result {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::debug!(topic, partition = index, error = %err, "marker not written yet; retrying");
                    tokio::time::sleep(MARKER_RETRY).await;
                }
            }
        }
    }

    /// A partition leader appends a marker and waits until every in-sync replica holds
    /// it.
    ///
    /// # Errors
    /// Not the leader, too few in-sync replicas, or a storage failure.
    pub async fn write_txn_marker(
        &self,
        request: v1::WriteTxnMarkerRequest,
    ) -> Result<v1::WriteTxnMarkerResponse, BrokerError> {
        let partition = self.partition(&request.topic, request.partition)?;
        let min_insync = self.min_insync_replicas(&request.topic)?;
        let isr = partition.isr_len();
        if isr < min_insync {
            return Err(BrokerError::NotEnoughReplicas {
                topic: request.topic,
                partition: request.partition,
                isr,
                min_insync,
            });
        }
        let kind = if request.commit {
            ControlType::Commit
        } else {
            ControlType::Abort
        };
        let appended = partition.append_marker(
            kind,
            request.producer_id,
            producer_epoch(request.producer_epoch)?,
            request.coordinator_epoch,
        )?;
        // A marker not needed (a repeat) may still be on its way to the followers.
        let end = match &appended {
            Some(appended) => appended.end_offset,
            None => partition.log_end_offset(),
        };
        let base = appended.as_ref().map_or(end, |a| a.base_offset);
        partition.wait_durable(end).await?;
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        partition
            .wait_replicated(base, end, min_insync, timeout)
            .await?;
        if request.topic == crate::offsets::OFFSETS_TOPIC {
            self.end_txn_offsets(request.producer_id, request.commit, request.partition);
        }
        Ok(v1::WriteTxnMarkerResponse {
            written: appended.is_some(),
        })
    }

    /// Before a produce request is appended: the partitions where its transactional
    /// batches start a transaction join it at the coordinator.
    ///
    /// # Errors
    /// A transactional batch without a transactional id, or the coordinator refused.
    pub(crate) async fn join_transactions(
        &self,
        request: &v1::ProduceRequest,
    ) -> Result<(), BrokerError> {
        let mut producer = None;
        let mut joining = Vec::new();
        for data in &request.partitions {
            let Ok(header) = runnel_batch::parse_header(&data.records) else {
                continue;
            };
            if !header.is_transactional() || header.is_control() {
                continue;
            }
            if request.transactional_id.is_empty() {
                return Err(BrokerError::InvalidRequest {
                    reason: "a transactional batch needs ProduceRequest.transactional_id".into(),
                });
            }
            match producer {
                None => producer = Some((header.producer_id, header.producer_epoch)),
                Some(p) if p != (header.producer_id, header.producer_epoch) => {
                    return Err(BrokerError::InvalidRequest {
                        reason: "the transactional batches of one request must come from one producer id and epoch".into(),
                    });
                }
                Some(_) => {}
            }
            let open = self
                .hosted_partition(&request.topic, data.partition)
                .and_then(|p| p.open_transaction_epoch(header.producer_id));
            if open != Some(header.producer_epoch) {
                joining.push(data.partition);
            }
        }
        let (Some((producer_id, epoch)), false) = (producer, joining.is_empty()) else {
            return Ok(());
        };
        self.add_to_transaction(
            &request.transactional_id,
            producer_id,
            epoch,
            &request.topic,
            joining,
        )
        .await
    }

    /// Adds partitions to a producer's transaction at its coordinator (here or on
    /// another broker).
    ///
    /// # Errors
    /// The coordinator refused or could not be reached.
    pub(crate) async fn add_to_transaction(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partitions: Vec<u32>,
    ) -> Result<(), BrokerError> {
        let add = v1::AddPartitionsToTransactionRequest {
            transactional_id: transactional_id.to_string(),
            producer_id,
            producer_epoch: i32::from(epoch),
            partitions: vec![v1::TopicPartitions {
                topic: topic.to_string(),
                partitions,
            }],
        };
        let coordinator = self.txn_coordinator_of(transactional_id)?;
        if coordinator == self.config.node_id {
            return self.add_partitions_to_txn(add).await;
        }
        TransactionsClient::new(self.peer(coordinator)?)
            .add_partitions(add)
            .await
            .map(|_| ())
            .map_err(|status| BrokerError::from_peer(coordinator, &status))
    }

    /// Aborts the transactions open past their timeout, and finishes those a previous
    /// coordinator left prepared. Runs in the background, each id on its own task.
    pub(crate) fn expire_transactions(self: &Arc<Self>) {
        let now = now_ms();
        let due: Vec<String> = {
            let mut txns = self.txns();
            let due: Vec<String> = txns
                .metas
                .iter()
                .filter(|(id, meta)| {
                    (meta.timed_out(now)
                        || meta.state.is_prepared()
                        || meta.expired(now, self.config.transactional_id_expiration_ms))
                        && !txns.busy.contains(*id)
                })
                .map(|(id, _)| id.clone())
                .collect();
            txns.busy.extend(due.iter().cloned());
            due
        };
        for id in due {
            let broker = self.clone();
            tokio::spawn(async move {
                if let Err(err) = broker.resolve_txn(&id).await {
                    tracing::info!(transactional_id = id, error = %err, "could not end the transaction yet; retrying");
                }
                broker.txns().busy.remove(&id);
            });
        }
    }

    /// Aborts an id's open transaction if its timeout passed, and completes it if it is
    /// prepared.
    async fn resolve_txn(&self, id: &str) -> Result<(), BrokerError> {
        let (_held, partition) = self.lock_txn(id).await?;
        let Some(meta) = self.txn_meta(id) else {
            return Ok(());
        };
        if meta.expired(now_ms(), self.config.transactional_id_expiration_ms) {
            tracing::info!(
                transactional_id = id,
                "forgetting a transactional id unused for transactional.id.expiration.ms"
            );
            let tombstone = Record {
                offset: 0,
                timestamp_ms: now_ms(),
                key: Some(bytes::Bytes::copy_from_slice(id.as_bytes())),
                value: None,
                headers: Vec::new(),
            };
            let appended = self.append_internal(&partition, &[tombstone])?;
            self.await_internal(&partition, appended.end_offset).await?;
            self.txns().metas.remove(id);
            return Ok(());
        }
        if meta.timed_out(now_ms()) {
            self.settle_txn(
                &partition,
                id,
                meta,
                "the transaction outlived its timeout: aborting it and fencing its producer",
            )
            .await?;
        } else if meta.state.is_prepared() {
            self.complete_txn(&partition, id, meta).await?;
        }
        Ok(())
    }

    /// Aborts an id's open transaction at an administrator's request (its producer is
    /// fenced).
    ///
    /// # Errors
    /// Not the coordinator, an unknown id, or a failure to store the state.
    pub async fn abort_transaction(
        &self,
        id: &str,
    ) -> Result<v1::TransactionDescription, BrokerError> {
        let (_held, partition) = self.lock_txn(id).await?;
        let meta = self.known_txn(id)?;
        let meta = self
            .settle_txn(
                &partition,
                id,
                meta,
                "aborting the transaction at an administrator's request",
            )
            .await?;
        Ok(describe(id, &meta, self.config.node_id))
    }

    /// # Errors
    /// Not the coordinator, or an unknown id.
    pub fn describe_transaction(
        &self,
        id: &str,
    ) -> Result<v1::TransactionDescription, BrokerError> {
        self.check_txn_coordinator(id)?;
        let meta = self.known_txn(id)?;
        Ok(describe(id, &meta, self.config.node_id))
    }

    /// The transactional ids this broker coordinates.
    pub fn list_transactions(&self) -> v1::ListTransactionsResponse {
        let txns = self.txns();
        let mut transactions: Vec<v1::TransactionDescription> = txns
            .metas
            .iter()
            .filter(|(id, _)| txns.loaded.contains_key(&partition_for_txn(id)))
            .map(|(id, meta)| describe(id, meta, self.config.node_id))
            .collect();
        transactions.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
        v1::ListTransactionsResponse { transactions }
    }

    /// Writes an abort marker for a producer's open transaction on one partition this
    /// broker leads: the way out of a hanging transaction no coordinator will end. The
    /// marker's epoch fences the producer's epoch on this partition.
    ///
    /// # Errors
    /// Not the leader, no such open transaction, or a storage failure.
    pub async fn abort_partition_transaction(
        &self,
        request: v1::AbortPartitionTransactionRequest,
    ) -> Result<v1::AbortPartitionTransactionResponse, BrokerError> {
        let partition = self.partition(&request.topic, request.partition)?;
        let Some(epoch) = partition.open_transaction_epoch(request.producer_id) else {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "producer {} has no open transaction on {}-{} (`runnel topic describe {}` lists the open ones)",
                    request.producer_id, request.topic, request.partition, request.topic
                ),
            });
        };
        tracing::warn!(
            topic = request.topic,
            partition = request.partition,
            producer_id = request.producer_id,
            "aborting a hanging transaction at an administrator's request"
        );
        let marker = v1::WriteTxnMarkerRequest {
            topic: request.topic.clone(),
            partition: request.partition,
            producer_id: request.producer_id,
            producer_epoch: i32::from(epoch.saturating_add(1)),
            commit: false,
            coordinator_epoch: -1,
        };
        self.write_txn_marker(marker).await?;
        Ok(v1::AbortPartitionTransactionResponse {
            offset: partition.log_end_offset() - 1,
        })
    }

    /// Follows the leadership of the `__transaction_state` partitions after a metadata
    /// image was applied (as `sync_coordination` does for groups). Blocks: call it from
    /// a blocking thread.
    pub(crate) fn sync_txn_coordination(&self) {
        let led: HashMap<u32, Arc<Partition>> = self
            .hosted(TXN_TOPIC)
            .into_iter()
            .filter(|p| p.is_leader())
            .map(|p| (p.index, p))
            .collect();
        let lost: Vec<u32> = self
            .txns()
            .loaded
            .iter()
            .filter(|(index, epoch)| led.get(index).is_none_or(|p| p.leader_epoch() != **epoch))
            .map(|(index, _)| *index)
            .collect();
        for index in lost {
            let mut txns = self.txns();
            txns.loaded.remove(&index);
            txns.metas.retain(|id, _| partition_for_txn(id) != index);
            tracing::info!(
                partition = index,
                "no longer coordinating the transactions of {TXN_TOPIC} partition"
            );
        }
        for (index, partition) in led {
            if self.txns().loaded.contains_key(&index) {
                continue;
            }
            let epoch = partition.leader_epoch();
            match self.replay_txns(&partition) {
                Ok(metas) => {
                    let count = metas.len();
                    let mut txns = self.txns();
                    txns.metas.retain(|id, _| partition_for_txn(id) != index);
                    txns.metas.extend(metas);
                    txns.loaded.insert(index, epoch);
                    tracing::info!(
                        partition = index,
                        leader_epoch = epoch,
                        transactional_ids = count,
                        "coordinating the transactions of {TXN_TOPIC} partition"
                    );
                }
                Err(err) => {
                    tracing::error!(partition = index, error = %err, "cannot replay the transactions of {TXN_TOPIC} partition");
                }
            }
        }
    }

    /// The states a `__transaction_state` partition's log holds, up to its end.
    fn replay_txns(&self, partition: &Partition) -> Result<HashMap<String, TxnMeta>, BrokerError> {
        let end = partition.log_end_offset();
        let mut offset = partition.log_start_offset();
        let mut metas = HashMap::new();
        while offset < end {
            let fetched = partition.read_below(offset, 4 * 1024 * 1024, end, &self.read_buffers)?;
            if fetched.records.is_empty() {
                break;
            }
            for batch in runnel_batch::batches(&fetched.records) {
                let records = batch
                    .and_then(|(_, raw)| runnel_batch::decode_records(raw))
                    .map_err(|err| BrokerError::Storage {
                        topic: TXN_TOPIC.to_string(),
                        partition: partition.index,
                        reason: err.to_string(),
                    })?;
                for record in records.into_iter().filter(|r| r.offset >= offset) {
                    let Some(id) = record
                        .key
                        .as_deref()
                        .and_then(|k| std::str::from_utf8(k).ok())
                    else {
                        continue;
                    };
                    match record.value.as_deref().map(crate::txn::decode) {
                        Some(Some(meta)) => {
                            metas.insert(id.to_string(), meta);
                        }
                        Some(None) => tracing::warn!(
                            partition = partition.index,
                            offset = record.offset,
                            "skipping a malformed record in {TXN_TOPIC}"
                        ),
                        None => {
                            metas.remove(id);
                        }
                    }
                }
            }
            offset = fetched.next_offset;
        }
        Ok(metas)
    }
}
