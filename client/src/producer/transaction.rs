//! The transactional producer (Kafka's `transactional.id`): `init_transactions` once,
//! then per transaction `begin_transaction`, `send`s, and `commit_transaction` or
//! `abort_transaction`. Records sent in a transaction become visible to `read_committed`
//! consumers all together when it commits, and never when it aborts.
//!
//! Batches carry the transactional bit and the producer id and epoch the coordinator
//! gave; a partition joins the transaction at its first batch (the partition leader
//! asks the coordinator). Committing first waits until every batch of the transaction
//! is acknowledged; the coordinator then writes the markers and answers with the epoch
//! of the next transaction, under which every partition's sequence starts again at 0.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use runnel_proto::v1;
use runnel_proto::v1::producer_client::ProducerClient;
use runnel_proto::v1::transactions_client::TransactionsClient;

use super::Producer;
use crate::error::ClientError;
use crate::group::GroupMetadata;

/// Where a transactional producer stands.
#[derive(Debug, Clone)]
enum Phase {
    /// `init_transactions` was not called (or failed).
    Uninitialised,
    /// No transaction open.
    Ready,
    InTransaction,
    /// A batch of the open transaction failed for good: it can only abort.
    Failed(ClientError),
    /// Another instance took over the transactional id: this one must stop.
    Fenced(ClientError),
}

/// A transactional producer's state, shared by the caller and the background sender.
#[derive(Debug)]
pub(super) struct Txn {
    pub(super) id: String,
    timeout: Duration,
    state: Mutex<(Option<(i64, i16)>, Phase)>,
    /// Whether the open transaction sent anything (records or offsets).
    wrote: std::sync::atomic::AtomicBool,
}

impl Txn {
    pub(super) fn new(id: String, timeout: Duration) -> Self {
        Txn {
            id,
            timeout,
            state: Mutex::new((None, Phase::Uninitialised)),
            wrote: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Option<(i64, i16)>, Phase)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// No transaction has written yet.
    fn wrote_nothing(&self) {
        self.wrote
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The producer id and epoch batches are stamped with.
    pub(super) fn producer(&self) -> Option<(i64, i16)> {
        self.lock().0
    }

    /// A batch of the open transaction failed for good.
    pub(super) fn batch_failed(&self, err: &ClientError) {
        let mut state = self.lock();
        if matches!(state.1, Phase::Fenced(_)) {
            return;
        }
        state.1 = if err.code() == Some(v1::ErrorCode::ProducerFenced) {
            Phase::Fenced(err.clone())
        } else {
            Phase::Failed(err.clone())
        };
    }

    /// Whether records may be sent now (they then belong to the open transaction).
    pub(super) fn check_send(&self) -> Result<(), ClientError> {
        match &self.lock().1 {
            Phase::InTransaction => {
                self.wrote.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Phase::Uninitialised => Err(ClientError::InvalidArgument(
                "call init_transactions before sending with a transactional id".into(),
            )),
            Phase::Ready => Err(ClientError::InvalidArgument(
                "call begin_transaction before sending with a transactional id".into(),
            )),
            Phase::Failed(err) => Err(ClientError::InvalidArgument(format!(
                "the transaction failed ({err}); abort it"
            ))),
            Phase::Fenced(err) => Err(err.clone()),
        }
    }
}

impl Producer {
    fn txn(&self) -> Result<&Txn, ClientError> {
        self.shared.txn.as_ref().ok_or_else(|| {
            ClientError::InvalidArgument(
                "this producer has no transactional id (ProducerConfig::transactional_id)".into(),
            )
        })
    }

    /// Takes the transactional id's producer id with a new epoch from its coordinator.
    /// Any older producer with the same id is fenced from then on, and a transaction it
    /// left open is aborted first.
    ///
    /// # Errors
    /// Not a transactional producer, or the coordinator did not answer in time.
    pub async fn init_transactions(&self) -> Result<(), ClientError> {
        let txn = self.txn()?;
        let request = v1::InitProducerIdRequest {
            transactional_id: txn.id.clone(),
            transaction_timeout_ms: u32::try_from(txn.timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let answer = self
            .shared
            .client
            .txn_call(&txn.id, self.shared.config.delivery_timeout, |channel| {
                let request = request.clone();
                async move { ProducerClient::new(channel).init_producer_id(request).await }
            })
            .await?;
        let epoch = i16::try_from(answer.producer_epoch).map_err(|_| {
            ClientError::Corrupt(format!("producer epoch {}", answer.producer_epoch))
        })?;
        *txn.lock() = (Some((answer.producer_id, epoch)), Phase::Ready);
        txn.wrote_nothing();
        Ok(())
    }

    /// Opens a transaction: what is sent until the commit or abort belongs to it.
    ///
    /// # Errors
    /// Not initialised, a transaction already open, or the producer was fenced.
    pub fn begin_transaction(&self) -> Result<(), ClientError> {
        let txn = self.txn()?;
        let mut state = txn.lock();
        match &state.1 {
            Phase::Ready => {
                state.1 = Phase::InTransaction;
                txn.wrote_nothing();
                Ok(())
            }
            Phase::InTransaction | Phase::Failed(_) => Err(ClientError::InvalidArgument(
                "a transaction is open already; commit or abort it first".into(),
            )),
            Phase::Uninitialised => Err(ClientError::InvalidArgument(
                "call init_transactions first".into(),
            )),
            Phase::Fenced(err) => Err(err.clone()),
        }
    }

    /// Waits for every record of the open transaction, then commits it. Returns once
    /// every partition of it holds the commit marker.
    ///
    /// # Errors
    /// No transaction open; a record failed (the transaction must be aborted); the
    /// producer was fenced or the coordinator aborted the transaction on its timeout;
    /// the coordinator did not answer in time (the outcome is then unknown: commit
    /// again, which the coordinator recognises as a repeat).
    pub async fn commit_transaction(&self) -> Result<(), ClientError> {
        let txn = self.txn()?;
        match &txn.lock().1 {
            Phase::InTransaction => {}
            Phase::Failed(err) => {
                return Err(ClientError::InvalidArgument(format!(
                    "the transaction cannot commit: {err}; abort it"
                )));
            }
            Phase::Fenced(err) => return Err(err.clone()),
            _ => {
                return Err(ClientError::InvalidArgument(
                    "no transaction is open (begin_transaction)".into(),
                ));
            }
        }
        self.flush().await?;
        if let Phase::Failed(err) | Phase::Fenced(err) = &txn.lock().1 {
            return Err(ClientError::InvalidArgument(format!(
                "a record of the transaction failed ({err}); abort it"
            )));
        }
        self.end_transaction(txn, true).await
    }

    /// Aborts the open transaction (after its records in flight settle): none of its
    /// records will be read by `read_committed` consumers.
    ///
    /// # Errors
    /// No transaction open, the producer was fenced, or the coordinator did not answer.
    pub async fn abort_transaction(&self) -> Result<(), ClientError> {
        let txn = self.txn()?;
        match &txn.lock().1 {
            Phase::InTransaction | Phase::Failed(_) => {}
            Phase::Fenced(err) => return Err(err.clone()),
            _ => {
                return Err(ClientError::InvalidArgument(
                    "no transaction is open (begin_transaction)".into(),
                ));
            }
        }
        self.flush().await?;
        self.end_transaction(txn, false).await
    }

    /// Commits a consumer group's offsets as part of the open transaction (Kafka's
    /// `sendOffsetsToTransaction`): they take effect when it commits, and never if it
    /// aborts, so a consume-transform-produce loop moves its input position exactly
    /// when its output becomes visible. `offsets` are the next offsets to read.
    ///
    /// # Errors
    /// No transaction open; the member does not own a partition (it was fenced by a
    /// rebalance); the producer was fenced; the coordinator did not answer in time.
    pub async fn send_offsets_to_transaction(
        &self,
        offsets: &BTreeMap<(String, u32), i64>,
        group: &GroupMetadata,
    ) -> Result<(), ClientError> {
        let txn = self.txn()?;
        if offsets.is_empty() {
            return Ok(());
        }
        txn.check_send()?;
        let Some((producer_id, epoch)) = txn.producer() else {
            return Err(ClientError::InvalidArgument(
                "call init_transactions first".into(),
            ));
        };
        let request = v1::CommitOffsetsRequest {
            group_id: group.group_id.clone(),
            member_id: group.member_id.clone(),
            member_epoch: group.member_epoch,
            offsets: offsets
                .iter()
                .map(|((topic, partition), offset)| v1::OffsetCommit {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    metadata: String::new(),
                })
                .collect(),
            transactional_id: txn.id.clone(),
            producer_id,
            producer_epoch: i32::from(epoch),
        };
        let result = self
            .shared
            .client
            .group_call(
                &group.group_id,
                self.shared.config.delivery_timeout,
                |mut rpc| {
                    let request = request.clone();
                    async move { rpc.commit_offsets(request).await }
                },
            )
            .await;
        if let Err(err) = &result {
            txn.batch_failed(err);
        }
        result.map(|_| ())
    }

    async fn end_transaction(&self, txn: &Txn, commit: bool) -> Result<(), ClientError> {
        let Some((producer_id, epoch)) = txn.producer() else {
            return Err(ClientError::InvalidArgument(
                "call init_transactions first".into(),
            ));
        };
        let request = v1::EndTransactionRequest {
            transactional_id: txn.id.clone(),
            producer_id,
            producer_epoch: i32::from(epoch),
            commit,
        };
        let answer = self
            .shared
            .client
            .txn_call(&txn.id, self.shared.config.delivery_timeout, |channel| {
                let request = request.clone();
                async move {
                    TransactionsClient::new(channel)
                        .end_transaction(request)
                        .await
                }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                if matches!(
                    err.code(),
                    Some(v1::ErrorCode::ProducerFenced | v1::ErrorCode::InvalidTxnState)
                ) {
                    txn.lock().1 = Phase::Fenced(err.clone());
                }
                return Err(err);
            }
        };
        let next = i16::try_from(answer.producer_epoch).map_err(|_| {
            ClientError::Corrupt(format!("producer epoch {}", answer.producer_epoch))
        })?;
        let wrote = txn.wrote.swap(false, std::sync::atomic::Ordering::AcqRel);
        if commit && wrote && !answer.ended_open {
            // The coordinator knew no open transaction although this one wrote: never
            // report such a commit as done.
            let err = ClientError::Broker {
                code: v1::ErrorCode::InvalidTxnState,
                message: format!(
                    "the coordinator of {:?} knew no open transaction although this one wrote; its outcome is unknown: call init_transactions (which ends what is open) and start again",
                    txn.id
                ),
            };
            txn.lock().1 = Phase::Fenced(err.clone());
            return Err(err);
        }
        *txn.lock() = (Some((producer_id, next)), Phase::Ready);
        Ok(())
    }
}
