//! The `runnel.v1.Connectors` gRPC service, served by the broker process.

use std::collections::BTreeMap;

use runnel_proto::error_status;
use runnel_proto::v1::{self, ErrorCode, connectors_server};
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
        let request = request.into_inner();
        let spec = spec::parse(&request.file_name, &request.yaml)
            .map_err(|e| error_status(Code::InvalidArgument, ErrorCode::InvalidRequest, e.0))?;
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
        let connectors = if request.into_inner().local {
            self.worker.local_list().await
        } else {
            self.worker.list().await
        };
        Ok(Response::new(v1::ListConnectorsResponse { connectors }))
    }

    async fn status(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.status(&name).await.map_err(status)?,
        ))
    }

    async fn pause(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.set_paused(&name, true).await.map_err(status)?,
        ))
    }

    async fn resume(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.set_paused(&name, false).await.map_err(status)?,
        ))
    }

    async fn restart(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::ConnectorStatus>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.worker.restart(&name).await.map_err(status)?,
        ))
    }

    async fn delete(
        &self,
        request: Request<v1::ConnectorName>,
    ) -> Result<Response<v1::DeleteConnectorResponse>, Status> {
        let name = request.into_inner().name;
        self.worker.delete(&name).await.map_err(status)?;
        Ok(Response::new(v1::DeleteConnectorResponse {}))
    }
}
