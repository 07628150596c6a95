//! The gRPC services: thin adapters from tonic to [`Broker`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::{FuturesOrdered, StreamExt};
use runnel_proto::auth::{Access, CLUSTER_RESOURCE, access, check, may};
use runnel_proto::local::{LocalBroker, Requests};
use runnel_proto::v1::{
    self, admin_server, consumer_server, groups_server, producer_server, replication_server,
    transactions_server,
};
use runnel_proto::v1::{AclOperation as Op, ResourceType as Res};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::Broker;
use crate::error::BrokerError;

/// Most produce requests one stream may have waiting for acknowledgement.
const PRODUCE_IN_FLIGHT_MAX: usize = 64;
/// Fetch responses buffered ahead of a slow streaming consumer.
const FETCH_STREAM_BUFFER: usize = 2;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
pub struct Service {
    broker: Arc<Broker>,
    /// Checks the in-process runtimes' calls made for a principal.
    security: Arc<crate::security::Security>,
    /// Fault injection for tests of retries: with `RUNNEL_FAULT_CUT_PRODUCE_STREAM_EVERY=N`
    /// in the environment, every Nth answer of a produce stream is replaced by the end of
    /// the stream, after its batch was appended (a connection cut at the worst moment).
    cut_produce_stream_every: u64,
    produce_answers: Arc<std::sync::atomic::AtomicU64>,
}

impl Service {
    pub fn new(broker: Arc<Broker>, security: Arc<crate::security::Security>) -> Self {
        let cut_produce_stream_every = std::env::var("RUNNEL_FAULT_CUT_PRODUCE_STREAM_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if cut_produce_stream_every > 0 {
            tracing::warn!(
                every = cut_produce_stream_every,
                "fault injection: produce streams are cut after appends"
            );
        }
        Service {
            broker,
            security,
            cut_produce_stream_every,
            produce_answers: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Whether this answer is one the fault injection drops.
    fn cut_here(every: u64, answers: &std::sync::atomic::AtomicU64) -> bool {
        every > 0
            && (answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
                .is_multiple_of(every)
    }
}

/// The checks of one produce request: WRITE on its topic (and transactional id).
fn check_produce(access: &Access, request: &v1::ProduceRequest) -> Result<(), Status> {
    access.check(Op::Write, Res::Topic, &request.topic)?;
    if !request.transactional_id.is_empty() {
        access.check(Op::Write, Res::TransactionalId, &request.transactional_id)?;
    }
    Ok(())
}

/// A refusal as the error of a produce answer.
fn refused(request_id: u64, status: &Status) -> v1::ProduceResponse {
    v1::ProduceResponse {
        request_id,
        error: Some(v1::Error {
            code: runnel_proto::status_error_code(status).unwrap_or(v1::ErrorCode::InvalidRequest)
                as i32,
            message: status.message().to_string(),
        }),
        ..Default::default()
    }
}

fn check_cluster<T>(request: &Request<T>, operation: Op) -> Result<(), Status> {
    check(request, operation, Res::Cluster, CLUSTER_RESOURCE)
}

/// A request that names a transactional id.
trait NamesTransactionalId {
    fn transactional_id(&self) -> &str;
}

macro_rules! names_transactional_id {
    ($($message:ty),*) => {$(
        impl NamesTransactionalId for $message {
            fn transactional_id(&self) -> &str {
                &self.transactional_id
            }
        }
    )*};
}

names_transactional_id!(
    v1::InitProducerIdRequest,
    v1::FindTransactionCoordinatorRequest,
    v1::EndTransactionRequest,
    v1::AddPartitionsToTransactionRequest,
    v1::DescribeTransactionRequest,
    v1::AbortTransactionRequest
);

/// `operation` on the transactional id the request names.
fn check_transactional_id<T: NamesTransactionalId>(
    request: &Request<T>,
    operation: Op,
) -> Result<(), Status> {
    check(
        request,
        operation,
        Res::TransactionalId,
        request.get_ref().transactional_id(),
    )
}

/// READ on every topic of a fetch.
fn check_fetch<T>(request: &Request<T>, partitions: &[v1::FetchPartition]) -> Result<(), Status> {
    let access = access(request)?;
    for partition in partitions {
        access.check(Op::Read, Res::Topic, &partition.topic)?;
    }
    Ok(())
}

fn require_topic(topic: &str) -> Result<(), Status> {
    if topic.is_empty() {
        return Err(BrokerError::InvalidRequest {
            reason: "the topic field is empty".into(),
        }
        .into());
    }
    Ok(())
}

#[tonic::async_trait]
impl producer_server::Producer for Service {
    async fn produce(
        &self,
        request: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let access = access(&request)?.clone();
        let request = request.into_inner();
        require_topic(&request.topic)?;
        check_produce(&access, &request)?;
        if access.may(Op::Create, Res::Topic, &request.topic) {
            self.broker.auto_create(&request.topic).await;
        }
        Ok(Response::new(
            self.broker.produce_joining(request).await.await,
        ))
    }

    async fn init_producer_id(
        &self,
        request: Request<v1::InitProducerIdRequest>,
    ) -> Result<Response<v1::InitProducerIdResponse>, Status> {
        if !request.get_ref().transactional_id.is_empty() {
            check_transactional_id(&request, Op::Write)?;
        }
        let request = request.into_inner();
        let answer = if request.transactional_id.is_empty() {
            self.broker.init_producer_id().await
        } else {
            self.broker
                .init_transactional_producer(
                    &request.transactional_id,
                    request.transaction_timeout_ms,
                )
                .await
        };
        Ok(Response::new(answer?))
    }

    type ProduceStreamStream = BoxStream<v1::ProduceResponse>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let access = access(&request)?.clone();
        Ok(Response::new(
            self.produce_responses(request.into_inner(), Some(access)),
        ))
    }
}

impl Service {
    /// Appends the requests of a produce stream in order and answers each, up to
    /// [`PRODUCE_IN_FLIGHT_MAX`] waiting for their acknowledgement at once.
    /// `access` is the caller's, whose rights each request is checked against; `None`
    /// for the runtimes in the broker's own process.
    fn produce_responses(
        &self,
        mut incoming: impl Stream<Item = Result<v1::ProduceRequest, Status>> + Send + Unpin + 'static,
        access: Option<Access>,
    ) -> BoxStream<v1::ProduceResponse> {
        let broker = self.broker.clone();
        let (every, answers) = (self.cut_produce_stream_every, self.produce_answers.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(PRODUCE_IN_FLIGHT_MAX);
        tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            let mut open = true;
            while open || !in_flight.is_empty() {
                tokio::select! {
                    next = incoming.next(), if open && in_flight.len() < PRODUCE_IN_FLIGHT_MAX => match next {
                        Some(Ok(request)) => {
                            if let Some(access) = &access
                                && let Err(status) = check_produce(access, &request)
                            {
                                let answer = refused(request.request_id, &status);
                                in_flight.push_back(Box::pin(async move { answer }) as std::pin::Pin<Box<dyn std::future::Future<Output = v1::ProduceResponse> + Send>>);
                                continue;
                            }
                            let received = std::time::Instant::now();
                            broker.metrics.produce_in_flight.fetch_add(1, Ordering::Relaxed);
                            if access.as_ref().is_none_or(|a| a.may(Op::Create, Res::Topic, &request.topic)) {
                                broker.auto_create(&request.topic).await;
                            }
                            let answer = broker.produce_joining(request).await;
                            let measured = broker.clone();
                            in_flight.push_back(Box::pin(async move {
                                let response = answer.await;
                                measured.metrics.produce_latency.observe(received.elapsed());
                                measured.metrics.produce_in_flight.fetch_sub(1, Ordering::Relaxed);
                                response
                            }));
                        }
                        Some(Err(status)) => {
                            tracing::debug!(%status, "produce stream ended by the client");
                            open = false;
                        }
                        None => open = false,
                    },
                    Some(response) = in_flight.next(), if !in_flight.is_empty() => {
                        if Service::cut_here(every, &answers) {
                            let _ = tx.send(Err(Status::unavailable("fault injection: the produce stream was cut after an append"))).await;
                            return;
                        }
                        if tx.send(Ok(response)).await.is_err() {
                            // The client is gone; appended batches stay appended.
                            return;
                        }
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Answers a fetch over and over, each time from where the last answer ended; only
    /// answers with records or errors are sent.
    fn fetch_responses(&self, mut request: v1::FetchRequest) -> BoxStream<v1::FetchResponse> {
        if request.max_wait_ms == 0 {
            request.max_wait_ms = 500;
        }
        let broker = self.broker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(FETCH_STREAM_BUFFER);
        tokio::spawn(async move {
            broker.metrics.fetch_streams.fetch_add(1, Ordering::Relaxed);
            let _open = OpenStream(broker.clone());
            loop {
                let response = tokio::select! {
                    response = broker.fetch(&request) => response,
                    () = tx.closed() => return,
                };
                for (wanted, got) in request.partitions.iter_mut().zip(&response.partitions) {
                    if got.error.is_none() {
                        wanted.offset = got.next_offset;
                    }
                }
                let has_data = response
                    .partitions
                    .iter()
                    .any(|p| !p.records.is_empty() || !p.messages.is_empty() || p.error.is_some());
                if has_data && tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Counts a fetch stream as open until its task ends, however it ends.
struct OpenStream(Arc<Broker>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.metrics.fetch_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The streams and connect runtimes inside the broker's process reach it through this:
/// the same produce and fetch streams as the gRPC services serve.
impl LocalBroker for Service {
    fn node_id(&self) -> u32 {
        self.broker.node_id()
    }

    fn produce_stream(
        &self,
        requests: Requests,
        principal: Option<&str>,
    ) -> BoxStream<v1::ProduceResponse> {
        let access = principal.map(|p| self.security.access(p.to_string(), "cluster"));
        self.produce_responses(requests.map(Ok), access)
    }

    fn fetch_stream(
        &self,
        request: v1::FetchRequest,
        principal: Option<&str>,
    ) -> BoxStream<v1::FetchResponse> {
        if let Some(principal) = principal {
            let access = self.security.access(principal.to_string(), "cluster");
            for partition in &request.partitions {
                if let Err(status) = access.check(Op::Read, Res::Topic, &partition.topic) {
                    return Box::pin(futures::stream::once(async move { Err(status) }));
                }
            }
        }
        self.fetch_responses(request)
    }
}

#[tonic::async_trait]
impl replication_server::Replication for Service {
    type FetchStream = BoxStream<v1::ReplicaFetchResponse>;

    async fn fetch(
        &self,
        request: Request<Streaming<v1::ReplicaFetchRequest>>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let mut incoming = request.into_inner();
        let broker = self.broker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(Ok(request)) = incoming.next().await {
                let response = broker.replica_fetch(&request).await;
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn write_txn_marker(
        &self,
        request: Request<v1::WriteTxnMarkerRequest>,
    ) -> Result<Response<v1::WriteTxnMarkerResponse>, Status> {
        Ok(Response::new(
            self.broker.write_txn_marker(request.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl transactions_server::Transactions for Service {
    async fn find_coordinator(
        &self,
        request: Request<v1::FindTransactionCoordinatorRequest>,
    ) -> Result<Response<v1::FindCoordinatorResponse>, Status> {
        check_transactional_id(&request, Op::Describe)?;
        Ok(Response::new(self.broker.find_txn_coordinator(
            &request.into_inner().transactional_id,
        )?))
    }

    async fn end_transaction(
        &self,
        request: Request<v1::EndTransactionRequest>,
    ) -> Result<Response<v1::EndTransactionResponse>, Status> {
        check_transactional_id(&request, Op::Write)?;
        Ok(Response::new(
            self.broker.end_transaction(request.into_inner()).await?,
        ))
    }

    async fn add_partitions(
        &self,
        request: Request<v1::AddPartitionsToTransactionRequest>,
    ) -> Result<Response<v1::AddPartitionsToTransactionResponse>, Status> {
        check_transactional_id(&request, Op::Write)?;
        for partitions in &request.get_ref().partitions {
            check(&request, Op::Write, Res::Topic, &partitions.topic)?;
        }
        self.broker
            .add_partitions_to_txn(request.into_inner())
            .await?;
        Ok(Response::new(v1::AddPartitionsToTransactionResponse {}))
    }

    async fn list_transactions(
        &self,
        request: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        let mut listed = self.broker.list_transactions();
        listed.transactions.retain(|t| {
            may(
                &request,
                Op::Describe,
                Res::TransactionalId,
                &t.transactional_id,
            )
        });
        Ok(Response::new(listed))
    }

    async fn describe_transaction(
        &self,
        request: Request<v1::DescribeTransactionRequest>,
    ) -> Result<Response<v1::TransactionDescription>, Status> {
        check_transactional_id(&request, Op::Describe)?;
        Ok(Response::new(self.broker.describe_transaction(
            &request.into_inner().transactional_id,
        )?))
    }

    async fn abort_transaction(
        &self,
        request: Request<v1::AbortTransactionRequest>,
    ) -> Result<Response<v1::TransactionDescription>, Status> {
        check_transactional_id(&request, Op::Write)?;
        Ok(Response::new(
            self.broker
                .abort_transaction(&request.into_inner().transactional_id)
                .await?,
        ))
    }

    async fn abort_partition_transaction(
        &self,
        request: Request<v1::AbortPartitionTransactionRequest>,
    ) -> Result<Response<v1::AbortPartitionTransactionResponse>, Status> {
        check(&request, Op::Write, Res::Topic, &request.get_ref().topic)?;
        Ok(Response::new(
            self.broker
                .abort_partition_transaction(request.into_inner())
                .await?,
        ))
    }
}

#[tonic::async_trait]
impl consumer_server::Consumer for Service {
    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        check_fetch(&request, &request.get_ref().partitions)?;
        let request = request.into_inner();
        Ok(Response::new(self.broker.fetch(&request).await))
    }

    type FetchStreamStream = BoxStream<v1::FetchResponse>;

    async fn fetch_stream(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<Self::FetchStreamStream>, Status> {
        check_fetch(&request, &request.get_ref().partitions)?;
        Ok(Response::new(self.fetch_responses(request.into_inner())))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        for query in &request.get_ref().queries {
            check(&request, Op::Describe, Res::Topic, &query.topic)?;
        }
        Ok(Response::new(
            self.broker.list_offsets(&request.into_inner()),
        ))
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Service {
    async fn metadata(
        &self,
        request: Request<v1::MetadataRequest>,
    ) -> Result<Response<v1::MetadataResponse>, Status> {
        let access = access(&request)?.clone();
        let named = !request.get_ref().topics.is_empty();
        let mut response = self.broker.metadata(&request.into_inner()).await;
        // Named topics the caller may not describe are refused one by one; a listing of
        // every topic leaves them out.
        response.topics.retain_mut(|topic| {
            match access.check(Op::Describe, Res::Topic, &topic.name) {
                Ok(()) => true,
                Err(status) if named => {
                    topic.partitions.clear();
                    topic.error = Some(v1::Error {
                        code: v1::ErrorCode::TopicAuthorizationFailed as i32,
                        message: status.message().to_string(),
                    });
                    true
                }
                Err(_) => false,
            }
        });
        Ok(Response::new(response))
    }

    async fn cluster_info(
        &self,
        _request: Request<v1::ClusterInfoRequest>,
    ) -> Result<Response<v1::ClusterInfoResponse>, Status> {
        Ok(Response::new(self.broker.cluster_info()))
    }

    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        if !may(&request, Op::Create, Res::Cluster, CLUSTER_RESOURCE) {
            check(&request, Op::Create, Res::Topic, &request.get_ref().name)?;
        }
        Ok(Response::new(
            self.broker.create_topic(request.into_inner()).await?,
        ))
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        check(&request, Op::Delete, Res::Topic, &request.get_ref().name)?;
        self.broker.delete_topic(&request.into_inner().name).await?;
        Ok(Response::new(v1::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let mut listed = self.broker.list_topics(request.get_ref().include_internal);
        listed
            .topics
            .retain(|t| may(&request, Op::Describe, Res::Topic, &t.name));
        Ok(Response::new(listed))
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        check(&request, Op::Describe, Res::Topic, &request.get_ref().name)?;
        Ok(Response::new(
            self.broker.describe_topic(&request.into_inner().name)?,
        ))
    }

    async fn alter_topic_config(
        &self,
        request: Request<v1::AlterTopicConfigRequest>,
    ) -> Result<Response<v1::AlterTopicConfigResponse>, Status> {
        check(
            &request,
            Op::AlterConfigs,
            Res::Topic,
            &request.get_ref().name,
        )?;
        Ok(Response::new(
            self.broker.alter_topic_config(request.into_inner()).await?,
        ))
    }

    async fn add_partitions(
        &self,
        request: Request<v1::AddPartitionsRequest>,
    ) -> Result<Response<v1::AddPartitionsResponse>, Status> {
        check(&request, Op::Alter, Res::Topic, &request.get_ref().name)?;
        let request = request.into_inner();
        Ok(Response::new(
            self.broker
                .add_partitions(&request.name, request.total)
                .await?,
        ))
    }

    async fn reassign_partitions(
        &self,
        request: Request<v1::ReassignPartitionsRequest>,
    ) -> Result<Response<v1::ReassignPartitionsResponse>, Status> {
        check_cluster(&request, Op::Alter)?;
        self.broker
            .reassign_partitions(request.into_inner())
            .await?;
        Ok(Response::new(v1::ReassignPartitionsResponse {}))
    }

    async fn elect_leaders(
        &self,
        request: Request<v1::ElectLeadersRequest>,
    ) -> Result<Response<v1::ElectLeadersResponse>, Status> {
        check_cluster(&request, Op::Alter)?;
        Ok(Response::new(
            self.broker
                .elect_preferred_leaders(request.into_inner().topics)
                .await?,
        ))
    }

    async fn delete_records(
        &self,
        request: Request<v1::DeleteRecordsRequest>,
    ) -> Result<Response<v1::DeleteRecordsResponse>, Status> {
        check(&request, Op::Delete, Res::Topic, &request.get_ref().topic)?;
        let request = request.into_inner();
        let log_start_offset =
            self.broker
                .delete_records(&request.topic, request.partition, request.offset)?;
        Ok(Response::new(v1::DeleteRecordsResponse {
            log_start_offset,
        }))
    }
}

#[tonic::async_trait]
impl groups_server::Groups for Service {
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        check(&request, Op::Read, Res::Group, &request.get_ref().group_id)?;
        let host = request
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        Ok(Response::new(
            self.broker
                .group_heartbeat(request.into_inner(), host)
                .await?,
        ))
    }

    async fn find_coordinator(
        &self,
        request: Request<v1::FindCoordinatorRequest>,
    ) -> Result<Response<v1::FindCoordinatorResponse>, Status> {
        check(
            &request,
            Op::Describe,
            Res::Group,
            &request.get_ref().group_id,
        )?;
        Ok(Response::new(
            self.broker
                .find_coordinator(&request.into_inner().group_id)?,
        ))
    }

    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        check(&request, Op::Read, Res::Group, &request.get_ref().group_id)?;
        for offset in &request.get_ref().offsets {
            check(&request, Op::Read, Res::Topic, &offset.topic)?;
        }
        self.broker.commit_offsets(request.into_inner()).await?;
        Ok(Response::new(v1::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        check(
            &request,
            Op::Describe,
            Res::Group,
            &request.get_ref().group_id,
        )?;
        for topic in &request.get_ref().topics {
            check(&request, Op::Describe, Res::Topic, topic)?;
        }
        Ok(Response::new(
            self.broker.fetch_offsets(&request.into_inner())?,
        ))
    }

    async fn list_groups(
        &self,
        request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        let mut listed = self.broker.list_groups();
        listed
            .groups
            .retain(|g| may(&request, Op::Describe, Res::Group, &g.group_id));
        Ok(Response::new(listed))
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        check(
            &request,
            Op::Describe,
            Res::Group,
            &request.get_ref().group_id,
        )?;
        Ok(Response::new(
            self.broker.describe_group(&request.into_inner().group_id)?,
        ))
    }

    async fn reset_offsets(
        &self,
        request: Request<v1::ResetOffsetsRequest>,
    ) -> Result<Response<v1::ResetOffsetsResponse>, Status> {
        check(&request, Op::Read, Res::Group, &request.get_ref().group_id)?;
        check(&request, Op::Read, Res::Topic, &request.get_ref().topic)?;
        Ok(Response::new(
            self.broker.reset_offsets(request.into_inner()).await?,
        ))
    }

    async fn delete_group(
        &self,
        request: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        check(
            &request,
            Op::Delete,
            Res::Group,
            &request.get_ref().group_id,
        )?;
        self.broker
            .delete_group(&request.into_inner().group_id)
            .await?;
        Ok(Response::new(v1::DeleteGroupResponse {}))
    }
}
