//! The `runnel.v1.Connectors` gRPC service, served by the broker process.

use std::collections::BTreeMap;

use runnel_proto::auth::{access, check, may};
use runnel_proto::error_status;
use runnel_proto::v1::{
    self, AclOperation as Op, ErrorCode, ResourceType as Res, connectors_server,
};
use tonic::{Code, Request, Response, Status};

use crate::spec;
use crate::worker::{Components, ConnectError, Worker};

/// Largest request accepted (the YAML file and its components).
pub const REQUEST_BYTES_MAX: usize = 64 * 1024 * 1024;

pub struct Service {
    worker: Worker,
}

impl Service {
    /// The service ready to mount on a tonic server.
    pub fn server(worker: Worker) -> connectors_server::ConnectorsServer<Service> {
        connectors_server::ConnectorsServer::new(Service { worker })
            .max_decoding_message_size(REQUEST_BYTES_MAX)
    }
}

fn status(err: ConnectError) -> Status {
    match err {
        ConnectError::Invalid(message) => {
            error_status(Code::InvalidArgument, ErrorCode::InvalidRequest, message)
        }
        err @ ConnectError::Exists(_) => error_status(
            Code::AlreadyExists,
            ErrorCode::ConnectorAlreadyExists,
            err.to_string(),
        ),
        err @ ConnectError::Unknown(_) => {
            error_status(Code::NotFound, ErrorCode::UnknownConnector, err.to_string())
        }
        ConnectError::Internal(err) => error_status(
            Code::Unavailable,
            ErrorCode::RuntimeNotAvailable,
            format!("{err:#}"),
        ),
    }
}

#[tonic::async_trait]
impl connectors_server::Connectors for Service {
    async fn create(
        &self,
        request: Request<v1::CreateConnectorRequest>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        let access = access(&request)?.clone();
        let request = request.into_inner();
        let mut spec = spec::parse(&request.file_name, &request.yaml)
            .map_err(|e| error_status(Code::InvalidArgument, ErrorCode::InvalidRequest, e.0))?;
        access.check(Op::Create, Res::Connector, &spec.name)?;
        // The connector needs the rights it will use.
        let (principal, runs_as) = access.acting_for(spec.principal.as_deref())?;
        spec.principal = principal;
        if spec.principal.is_some() && spec.kind == spec::Kind::Sink {
            runs_as.check(Op::Read, Res::Group, &crate::worker::group_name(&spec.name))?;
        }
        let operation = match spec.kind {
            spec::Kind::Source => Op::Write,
            spec::Kind::Sink => Op::Read,
        };
        for topic in &spec.topics {
            runs_as.check(operation, Res::Topic, topic)?;
        }
        if let Some(topic) = &spec.dead_letter_topic {
            runs_as.check(Op::Write, Res::Topic, topic)?;
        }
        let uploaded: BTreeMap<String, Vec<u8>> = request
            .components
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        let components = Components::from_files(&spec, &uploaded).map_err(status)?;
        let created = self
            .worker
            .create(spec, request.yaml, components)
            .await
            .map_err(status)?;
        Ok(Response::new(created))
    }

    async fn list_connectors(
        &self,
        request: Request<v1::ListConnectorsRequest>,
    ) -> Result<Response<v1::ListConnectorsResponse>, Status> {
        let mut connectors = if request.get_ref().local {
            self.worker.local_list().await
        } else {
            self.worker.list().await
        };
        connectors.retain(|c| may(&request, Op::Describe, Res::Connector, &c.name));
        Ok(Response::new(v1::ListConnectorsResponse { connectors }))
    }

    async fn status(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        check(
            &request,
            Op::Describe,
            Res::Connector,
            &request.get_ref().name,
        )?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.status(&name).await.map_err(status)?,
        ))
    }

    async fn pause(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        check(&request, Op::Alter, Res::Connector, &request.get_ref().name)?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.set_paused(&name, true).await.map_err(status)?,
        ))
    }

    async fn resume(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        check(&request, Op::Alter, Res::Connector, &request.get_ref().name)?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.set_paused(&name, false).await.map_err(status)?,
        ))
    }

    async fn restart(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        check(&request, Op::Alter, Res::Connector, &request.get_ref().name)?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.restart(&name).await.map_err(status)?,
        ))
    }

    async fn delete(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::DeleteConnectorResponse>, Status> {
        check(
            &request,
            Op::Delete,
            Res::Connector,
            &request.get_ref().name,
        )?;
        let name = request.into_inner().name;
        self.worker.delete(&name).await.map_err(status)?;
        Ok(Response::new(v1::DeleteConnectorResponse {}))
    }
}
