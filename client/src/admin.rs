//! Topic and cluster administration.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use runnel_proto::v1;
use runnel_proto::v1::admin_client::AdminClient;
use runnel_proto::v1::groups_client::GroupsClient;
use runnel_proto::v1::transactions_client::TransactionsClient;

use crate::client::Client;
use crate::error::ClientError;

/// How long group administration retries while the group's coordinator moves.
const ADMIN_GROUP_TIMEOUT: Duration = Duration::from_secs(15);

/// The admin API: topics, configs, offsets and cluster information.
#[derive(Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub fn new(client: Client) -> Self {
        Admin { client }
    }

    /// A channel to the broker at `address`, as this client connects (TLS or not).
    async fn connect_to_broker(
        &self,
        address: &str,
    ) -> Result<runnel_proto::auth::Conn, ClientError> {
        self.client
            .connect_to(address)
            .await
            .ok_or_else(|| ClientError::Connect {
                brokers: address.to_string(),
                reason: "unreachable".into(),
            })
    }

    /// Creates a topic; `None` takes the broker's default partitions or replication
    /// factor.
    ///
    /// # Errors
    /// The broker's refusal (invalid name, count or config, existing topic, ...).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: Option<u32>,
        replication_factor: Option<u32>,
        configs: HashMap<String, String>,
    ) -> Result<v1::TopicMetadata, ClientError> {
        let response = self
            .client
            .admin_rpc()
            .create_topic(v1::CreateTopicRequest {
                name: name.to_string(),
                partitions,
                replication_factor,
                configs,
                validate_only: false,
            })
            .await?
            .into_inner();
        response
            .topic
            .ok_or_else(|| ClientError::Corrupt("create topic response without a topic".into()))
    }

    /// The caller's principal, as the broker sees it.
    ///
    /// # Errors
    /// The broker cannot be reached, or refused the credentials.
    pub async fn who_am_i(&self) -> Result<v1::WhoAmIResponse, ClientError> {
        Ok(self
            .client
            .security_rpc()
            .who_am_i(v1::WhoAmIRequest {})
            .await?
            .into_inner())
    }

    /// Creates a user (`create_only`) or sets its password for `mechanism`. The
    /// credential is derived here: the password is not sent.
    ///
    /// # Errors
    /// An invalid name, an existing user with `create_only`, or no ALTER on the cluster.
    pub async fn upsert_user(
        &self,
        name: &str,
        password: &str,
        mechanism: crate::Mechanism,
        iterations: u32,
        create_only: bool,
    ) -> Result<(), ClientError> {
        runnel_proto::scram::validate_user_name(name)
            .map_err(|err| ClientError::InvalidArgument(err.to_string()))?;
        if password.is_empty() {
            return Err(ClientError::InvalidArgument("the password is empty".into()));
        }
        let credential = runnel_proto::scram::Credential::derive(mechanism, password, iterations);
        self.client
            .security_rpc()
            .upsert_user(v1::UpsertUserRequest {
                name: name.to_string(),
                credential: Some(v1::ScramCredential {
                    mechanism: runnel_proto::auth::mechanism_proto(mechanism) as i32,
                    iterations: credential.iterations,
                    salt: credential.salt.into(),
                    stored_key: credential.stored_key.into(),
                    server_key: credential.server_key.into(),
                }),
                create_only,
            })
            .await?;
        Ok(())
    }

    /// # Errors
    /// Unknown user, or no ALTER on the cluster.
    pub async fn delete_user(&self, name: &str) -> Result<(), ClientError> {
        self.client
            .security_rpc()
            .delete_user(v1::DeleteUserRequest {
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// # Errors
    /// No DESCRIBE on the cluster.
    pub async fn list_users(&self) -> Result<Vec<v1::UserDescription>, ClientError> {
        Ok(self
            .client
            .security_rpc()
            .list_users(v1::ListUsersRequest {})
            .await?
            .into_inner()
            .users)
    }

    /// # Errors
    /// An invalid ACL, or no ALTER on the cluster.
    pub async fn create_acls(&self, acls: Vec<v1::Acl>) -> Result<(), ClientError> {
        self.client
            .security_rpc()
            .create_acls(v1::CreateAclsRequest { acls })
            .await?;
        Ok(())
    }

    /// Removes the ACLs `filter` matches; returns them.
    ///
    /// # Errors
    /// No ALTER on the cluster.
    pub async fn delete_acls(&self, filter: v1::AclFilter) -> Result<Vec<v1::Acl>, ClientError> {
        Ok(self
            .client
            .security_rpc()
            .delete_acls(filter)
            .await?
            .into_inner()
            .acls)
    }

    /// # Errors
    /// No DESCRIBE on the cluster.
    pub async fn list_acls(&self, filter: v1::AclFilter) -> Result<Vec<v1::Acl>, ClientError> {
        Ok(self
            .client
            .security_rpc()
            .list_acls(filter)
            .await?
            .into_inner()
            .acls)
    }

    /// # Errors
    /// Unknown topic.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.client
            .admin_rpc()
            .delete_topic(v1::DeleteTopicRequest {
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// # Errors
    /// The broker cannot be reached.
    pub async fn list_topics(
        &self,
        include_internal: bool,
    ) -> Result<Vec<v1::TopicSummary>, ClientError> {
        Ok(self
            .client
            .admin_rpc()
            .list_topics(v1::ListTopicsRequest { include_internal })
            .await?
            .into_inner()
            .topics)
    }

    /// The topic's partitions and configs. A broker knows the log offsets and sizes only
    /// of the replicas it holds; those of the others come from their leaders (a leader
    /// that does not answer leaves its rows at -1).
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn describe_topic(
        &self,
        name: &str,
    ) -> Result<v1::DescribeTopicResponse, ClientError> {
        let request = v1::DescribeTopicRequest {
            name: name.to_string(),
        };
        let mut described = self
            .client
            .admin_rpc()
            .describe_topic(request.clone())
            .await?
            .into_inner();
        let mut leaders: Vec<u32> = described
            .partitions
            .iter()
            .filter(|p| p.log_end_offset < 0 && p.leader != 0)
            .map(|p| p.leader)
            .collect();
        leaders.sort_unstable();
        leaders.dedup();
        if !leaders.is_empty() {
            // Learns the brokers' addresses.
            let _ = self.client.refresh_topic(name).await;
        }
        for leader in leaders {
            let Ok(channel) = self.client.channel_to(leader) else {
                continue;
            };
            let Ok(answer) = AdminClient::new(channel)
                .describe_topic(request.clone())
                .await
            else {
                continue;
            };
            let answer = answer.into_inner();
            for row in described
                .partitions
                .iter_mut()
                .filter(|p| p.log_end_offset < 0 && p.leader == leader)
            {
                if let Some(theirs) = answer
                    .partitions
                    .iter()
                    .find(|t| t.partition == row.partition && t.log_end_offset >= 0)
                {
                    row.log_start_offset = theirs.log_start_offset;
                    row.log_end_offset = theirs.log_end_offset;
                    row.high_watermark = theirs.high_watermark;
                    row.last_stable_offset = theirs.last_stable_offset;
                    row.open_transactions.clone_from(&theirs.open_transactions);
                    row.size_bytes = theirs.size_bytes;
                    row.segment_count = theirs.segment_count;
                }
            }
        }
        Ok(described)
    }

    /// Sets config overrides and resets `delete` keys to the broker default.
    ///
    /// # Errors
    /// Unknown topic, key or invalid value (nothing changes then).
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: HashMap<String, String>,
        delete: Vec<String>,
    ) -> Result<Vec<v1::ConfigEntry>, ClientError> {
        Ok(self
            .client
            .admin_rpc()
            .alter_topic_config(v1::AlterTopicConfigRequest {
                name: name.to_string(),
                set,
                delete,
            })
            .await?
            .into_inner()
            .configs)
    }

    /// Grows the topic to `total` partitions.
    ///
    /// # Errors
    /// Unknown topic, or a total not larger than today's.
    pub async fn add_partitions(
        &self,
        name: &str,
        total: u32,
    ) -> Result<v1::TopicMetadata, ClientError> {
        let response = self
            .client
            .admin_rpc()
            .add_partitions(v1::AddPartitionsRequest {
                name: name.to_string(),
                total,
            })
            .await?
            .into_inner();
        self.client.refresh_topic(name).await?;
        response
            .topic
            .ok_or_else(|| ClientError::Corrupt("add partitions response without a topic".into()))
    }

    /// Deletes records below `offset` (-1: up to the high watermark); returns the new log
    /// start offset.
    ///
    /// # Errors
    /// Unknown topic or partition, or an offset beyond the high watermark.
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<i64, ClientError> {
        Ok(self
            .client
            .admin_rpc()
            .delete_records(v1::DeleteRecordsRequest {
                topic: topic.to_string(),
                partition,
                offset,
            })
            .await?
            .into_inner()
            .log_start_offset)
    }

    /// Starts moving partitions to new replica lists, catching up at most
    /// `throttle_bytes` per second (0: no limit).
    ///
    /// # Errors
    /// An unknown topic, partition or broker, or a partition being moved already.
    pub async fn reassign_partitions(
        &self,
        moves: Vec<v1::PartitionMove>,
        throttle_bytes: u64,
    ) -> Result<(), ClientError> {
        self.client
            .admin_rpc()
            .reassign_partitions(v1::ReassignPartitionsRequest {
                moves,
                throttle_bytes,
            })
            .await?;
        Ok(())
    }

    /// Preferred leader election for `topics` (every topic when empty): each partition
    /// as it stands afterwards.
    ///
    /// # Errors
    /// An unknown topic, or no answer from the controller.
    pub async fn elect_leaders(
        &self,
        topics: Vec<String>,
    ) -> Result<Vec<v1::ElectionResult>, ClientError> {
        Ok(self
            .client
            .admin_rpc()
            .elect_leaders(v1::ElectLeadersRequest { topics })
            .await?
            .into_inner()
            .results)
    }

    /// # Errors
    /// The broker cannot be reached.
    pub async fn cluster_info(&self) -> Result<v1::ClusterInfoResponse, ClientError> {
        Ok(self
            .client
            .admin_rpc()
            .cluster_info(v1::ClusterInfoRequest {})
            .await?
            .into_inner())
    }

    /// Every group of the cluster: each broker lists those it coordinates.
    ///
    /// # Errors
    /// No broker can be reached.
    pub async fn list_groups(&self) -> Result<Vec<v1::GroupSummary>, ClientError> {
        let answers = self
            .ask_every_broker(|channel| async move {
                GroupsClient::new(channel)
                    .list_groups(v1::ListGroupsRequest {})
                    .await
            })
            .await?;
        let groups: BTreeMap<String, v1::GroupSummary> = answers
            .into_iter()
            .flat_map(|answer| answer.groups)
            .map(|group| (group.group_id.clone(), group))
            .collect();
        Ok(groups.into_values().collect())
    }

    /// The answers of every broker that answered `call`; an error only when none did.
    async fn ask_every_broker<T, F, Fut>(&self, call: F) -> Result<Vec<T>, ClientError>
    where
        F: Fn(runnel_proto::auth::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut answers = Vec::new();
        let mut last_error = None;
        for (_, address) in self.client.brokers().await? {
            let Some(channel) = self.client.connect_to(&address).await else {
                continue;
            };
            match call(channel).await {
                Ok(response) => answers.push(response.into_inner()),
                Err(status) => last_error = Some(ClientError::from(status)),
            }
        }
        match (answers.is_empty(), last_error) {
            (true, Some(err)) => Err(err),
            _ => Ok(answers),
        }
    }

    /// # Errors
    /// An unknown group.
    pub async fn describe_group(
        &self,
        group: &str,
    ) -> Result<v1::DescribeGroupResponse, ClientError> {
        let request = v1::DescribeGroupRequest {
            group_id: group.to_string(),
        };
        let mut described = self
            .client
            .group_call(group, ADMIN_GROUP_TIMEOUT, |mut rpc| {
                let request = request.clone();
                async move { rpc.describe_group(request).await }
            })
            .await?;
        // The coordinator knows the log end of the partitions it leads; the leaders of
        // the others say theirs. A leader that does not answer leaves the row's "-".
        for row in described
            .partitions
            .iter_mut()
            .filter(|row| row.log_end_offset < 0)
        {
            let latest = v1::offset_query::Spec::Latest(true);
            if let Ok(end) = self
                .client
                .offset_of(
                    &row.topic,
                    row.partition,
                    latest,
                    v1::IsolationLevel::ReadUncommitted,
                )
                .await
            {
                row.log_end_offset = end;
                if row.current_offset >= 0 {
                    row.lag = (end - row.current_offset).max(0);
                }
            }
        }
        Ok(described)
    }

    /// Resets a group's offsets on every partition of `topic`; with `dry_run` only says
    /// what they would be.
    ///
    /// # Errors
    /// Live members, an unknown group or topic.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: v1::reset_offsets_request::To,
        dry_run: bool,
    ) -> Result<Vec<v1::CommittedOffset>, ClientError> {
        let request = v1::ResetOffsetsRequest {
            group_id: group.to_string(),
            topic: topic.to_string(),
            to: Some(to),
            dry_run,
        };
        Ok(self
            .client
            .group_call(group, ADMIN_GROUP_TIMEOUT, |mut rpc| {
                let request = request.clone();
                async move { rpc.reset_offsets(request).await }
            })
            .await?
            .offsets)
    }

    /// # Errors
    /// Live members or an unknown group.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let request = v1::DeleteGroupRequest {
            group_id: group.to_string(),
        };
        self.client
            .group_call(group, ADMIN_GROUP_TIMEOUT, |mut rpc| {
                let request = request.clone();
                async move { rpc.delete_group(request).await }
            })
            .await?;
        Ok(())
    }

    /// Deploys (or redeploys) a transform with its compiled component.
    ///
    /// # Errors
    /// An invalid spec, unknown topics, or a component that does not load.
    pub async fn deploy_transform(
        &self,
        spec: v1::TransformSpec,
        wasm: Vec<u8>,
    ) -> Result<v1::TransformStatus, ClientError> {
        let response = self
            .client
            .transforms_rpc()
            .deploy(v1::DeployTransformRequest {
                spec: Some(spec),
                wasm: wasm.into(),
            })
            .await?
            .into_inner();
        response
            .status
            .ok_or_else(|| ClientError::Corrupt("deploy response without a status".into()))
    }

    /// # Errors
    /// The broker cannot be reached.
    pub async fn list_transforms(&self) -> Result<Vec<v1::TransformStatus>, ClientError> {
        Ok(self
            .client
            .transforms_rpc()
            .list_transforms(v1::ListTransformsRequest { local: false })
            .await?
            .into_inner()
            .transforms)
    }

    /// The deployments broker `address` runs itself, as it runs them (and with
    /// `name`, only that one's log lines); runtimes use it to answer for the cluster.
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn local_transforms(
        &self,
        address: &str,
        logs_of: Option<&str>,
    ) -> Result<(Vec<v1::TransformStatus>, Vec<String>), ClientError> {
        let channel = self.connect_to_broker(address).await?;
        let mut rpc = runnel_proto::v1::transforms_client::TransformsClient::new(channel);
        let transforms = rpc
            .list_transforms(v1::ListTransformsRequest { local: true })
            .await?
            .into_inner()
            .transforms;
        let lines = match logs_of {
            Some(name) => match rpc
                .logs(v1::TransformLogsRequest {
                    name: name.into(),
                    local: true,
                })
                .await
            {
                Ok(response) => response.into_inner().lines,
                Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
                Err(status) => return Err(status.into()),
            },
            None => Vec::new(),
        };
        Ok((transforms, lines))
    }

    /// The connectors broker `address` runs itself.
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn local_connectors(
        &self,
        address: &str,
    ) -> Result<Vec<v1::ConnectorStatus>, ClientError> {
        let channel = self.connect_to_broker(address).await?;
        Ok(
            runnel_proto::v1::connectors_client::ConnectorsClient::new(channel)
                .list_connectors(v1::ListConnectorsRequest { local: true })
                .await?
                .into_inner()
                .connectors,
        )
    }

    /// # Errors
    /// Unknown transform.
    pub async fn describe_transform(&self, name: &str) -> Result<v1::TransformStatus, ClientError> {
        Ok(self
            .client
            .transforms_rpc()
            .describe_transform(v1::TransformName { name: name.into() })
            .await?
            .into_inner())
    }

    /// Pauses (`true`) or resumes a transform.
    ///
    /// # Errors
    /// Unknown transform.
    pub async fn pause_transform(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<v1::TransformStatus, ClientError> {
        let mut rpc = self.client.transforms_rpc();
        let request = v1::TransformName { name: name.into() };
        let response = if paused {
            rpc.pause(request).await?
        } else {
            rpc.resume(request).await?
        };
        Ok(response.into_inner())
    }

    /// Removes a transform; with `delete_state`, also its changelogs, local stores and
    /// committed input offsets.
    ///
    /// # Errors
    /// Unknown transform.
    pub async fn remove_transform(
        &self,
        name: &str,
        delete_state: bool,
    ) -> Result<(), ClientError> {
        self.client
            .transforms_rpc()
            .remove(v1::RemoveTransformRequest {
                name: name.into(),
                delete_state,
            })
            .await?;
        Ok(())
    }

    /// Reads a transform's state store (committed state): `query.local` asks only the
    /// broker this client reaches first.
    ///
    /// # Errors
    /// Unknown transform or store, or a stateless transform.
    pub async fn query_state(
        &self,
        query: v1::StateQuery,
    ) -> Result<Vec<v1::StateEntry>, ClientError> {
        Ok(self
            .client
            .transforms_rpc()
            .query_state(query)
            .await?
            .into_inner()
            .entries)
    }

    /// Reads the state of the tasks broker `address` runs itself.
    ///
    /// # Errors
    /// The broker cannot be reached, or refused the query.
    pub async fn local_state(
        &self,
        address: &str,
        mut query: v1::StateQuery,
    ) -> Result<Vec<v1::StateEntry>, ClientError> {
        let channel = self.connect_to_broker(address).await?;
        query.local = true;
        Ok(
            runnel_proto::v1::transforms_client::TransformsClient::new(channel)
                .query_state(query)
                .await?
                .into_inner()
                .entries,
        )
    }

    /// # Errors
    /// Unknown transform.
    pub async fn transform_logs(&self, name: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .client
            .transforms_rpc()
            .logs(v1::TransformLogsRequest {
                name: name.into(),
                local: false,
            })
            .await?
            .into_inner()
            .lines)
    }

    /// Creates a connector from its YAML file's text, with the components it names.
    ///
    /// # Errors
    /// An invalid file, an existing name, unknown topics, a component that does not load.
    pub async fn create_connector(
        &self,
        file_name: &str,
        yaml: &str,
        components: std::collections::BTreeMap<String, Vec<u8>>,
    ) -> Result<v1::ConnectorStatus, ClientError> {
        Ok(self
            .client
            .connectors_rpc()
            .create(v1::CreateConnectorRequest {
                file_name: file_name.into(),
                yaml: yaml.into(),
                components: components.into_iter().map(|(k, v)| (k, v.into())).collect(),
            })
            .await?
            .into_inner())
    }

    /// # Errors
    /// The broker cannot be reached.
    pub async fn list_connectors(&self) -> Result<Vec<v1::ConnectorStatus>, ClientError> {
        Ok(self
            .client
            .connectors_rpc()
            .list_connectors(v1::ListConnectorsRequest { local: false })
            .await?
            .into_inner()
            .connectors)
    }

    /// # Errors
    /// Unknown connector.
    pub async fn connector_status(&self, name: &str) -> Result<v1::ConnectorStatus, ClientError> {
        Ok(self
            .client
            .connectors_rpc()
            .status(v1::ConnectorName { name: name.into() })
            .await?
            .into_inner())
    }

    /// Pauses (`true`) or resumes a connector.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn pause_connector(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<v1::ConnectorStatus, ClientError> {
        let mut rpc = self.client.connectors_rpc();
        let request = v1::ConnectorName { name: name.into() };
        let response = if paused {
            rpc.pause(request).await?
        } else {
            rpc.resume(request).await?
        };
        Ok(response.into_inner())
    }

    /// Stops a connector and starts it again from its committed position.
    ///
    /// # Errors
    /// Unknown connector.
    pub async fn restart_connector(&self, name: &str) -> Result<v1::ConnectorStatus, ClientError> {
        Ok(self
            .client
            .connectors_rpc()
            .restart(v1::ConnectorName { name: name.into() })
            .await?
            .into_inner())
    }

    /// # Errors
    /// Unknown connector.
    pub async fn delete_connector(&self, name: &str) -> Result<(), ClientError> {
        self.client
            .connectors_rpc()
            .delete(v1::ConnectorName { name: name.into() })
            .await?;
        Ok(())
    }

    /// Every transactional id the cluster's coordinators know, with its state.
    ///
    /// # Errors
    /// No broker answered.
    pub async fn list_transactions(&self) -> Result<Vec<v1::TransactionDescription>, ClientError> {
        let answers = self
            .ask_every_broker(|channel| async move {
                TransactionsClient::new(channel)
                    .list_transactions(v1::ListTransactionsRequest {})
                    .await
            })
            .await?;
        let transactions: BTreeMap<String, v1::TransactionDescription> = answers
            .into_iter()
            .flat_map(|answer| answer.transactions)
            .map(|txn| (txn.transactional_id.clone(), txn))
            .collect();
        Ok(transactions.into_values().collect())
    }

    /// # Errors
    /// An unknown transactional id, or its coordinator did not answer in time.
    pub async fn describe_transaction(
        &self,
        transactional_id: &str,
    ) -> Result<v1::TransactionDescription, ClientError> {
        let request = v1::DescribeTransactionRequest {
            transactional_id: transactional_id.to_string(),
        };
        self.client
            .txn_call(transactional_id, ADMIN_GROUP_TIMEOUT, |channel| {
                let request = request.clone();
                async move {
                    TransactionsClient::new(channel)
                        .describe_transaction(request)
                        .await
                }
            })
            .await
    }

    /// Aborts the transactional id's open transaction (its producer is fenced).
    ///
    /// # Errors
    /// An unknown transactional id, or its coordinator did not answer in time.
    pub async fn abort_transaction(
        &self,
        transactional_id: &str,
    ) -> Result<v1::TransactionDescription, ClientError> {
        let request = v1::AbortTransactionRequest {
            transactional_id: transactional_id.to_string(),
        };
        self.client
            .txn_call(transactional_id, ADMIN_GROUP_TIMEOUT, |channel| {
                let request = request.clone();
                async move {
                    TransactionsClient::new(channel)
                        .abort_transaction(request)
                        .await
                }
            })
            .await
    }

    /// Writes an abort marker for a producer's open (hanging) transaction on one
    /// partition; returns the marker's offset.
    ///
    /// # Errors
    /// No such open transaction, or the partition's leader did not answer.
    pub async fn abort_partition_transaction(
        &self,
        topic: &str,
        partition: u32,
        producer_id: i64,
    ) -> Result<i64, ClientError> {
        let channel = self.client.leader_channel(topic, partition).await?;
        Ok(TransactionsClient::new(channel)
            .abort_partition_transaction(v1::AbortPartitionTransactionRequest {
                topic: topic.to_string(),
                partition,
                producer_id,
            })
            .await?
            .into_inner()
            .offset)
    }
}
