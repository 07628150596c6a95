//! The `runnel.v1.Transforms` gRPC service, served by the broker process.

use runnel_proto::error_status;
use runnel_proto::v1::{self, ErrorCode, transforms_server};
use tonic::{Code, Request, Response, Status};

use crate::runtime::{DeployError, Runtime};

pub struct Service {
    runtime: Runtime,
}

impl Service {
    pub fn new(runtime: Runtime) -> Self {
        Service { runtime }
    }

    /// The service ready to mount on a tonic server.
    pub fn server(runtime: Runtime) -> transforms_server::TransformsServer<Service> {
        transforms_server::TransformsServer::new(Service::new(runtime))
            .max_decoding_message_size(crate::WASM_BYTES_MAX + 1024 * 1024)
    }
}

fn invalid(message: impl Into<String>) -> Status {
    error_status(Code::InvalidArgument, ErrorCode::InvalidRequest, message)
}

fn status(err: DeployError) -> Status {
    match err {
        DeployError::Invalid(message) => {
            error_status(Code::InvalidArgument, ErrorCode::InvalidRequest, message)
        }
        DeployError::Unknown(name) => error_status(
            Code::NotFound,
            ErrorCode::UnknownTransform,
            format!("unknown transform {name:?}; `runnel transform list` shows the deployed ones"),
        ),
        DeployError::Internal(err) => error_status(
            Code::Unavailable,
            ErrorCode::RuntimeNotAvailable,
            format!("{err:#}"),
        ),
    }
}

#[tonic::async_trait]
impl transforms_server::Transforms for Service {
    async fn deploy(
        &self,
        request: Request<v1::DeployTransformRequest>,
    ) -> Result<Response<v1::DeployTransformResponse>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| invalid("the deploy request has no spec"))?;
        if request.wasm.len() > crate::WASM_BYTES_MAX {
            return Err(invalid(format!(
                "the component has {} bytes; at most {}",
                request.wasm.len(),
                crate::WASM_BYTES_MAX
            )));
        }
        let status = self
            .runtime
            .deploy(spec, &request.wasm)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DeployTransformResponse {
            status: Some(status),
        }))
    }

    async fn list_transforms(
        &self,
        request: Request<v1::ListTransformsRequest>,
    ) -> Result<Response<v1::ListTransformsResponse>, Status> {
        let transforms = if request.into_inner().local {
            self.runtime.local_list()
        } else {
            self.runtime.list().await
        };
        Ok(Response::new(v1::ListTransformsResponse { transforms }))
    }

    async fn describe_transform(
        &self,
        request: Request<v1::TransformName>,
    ) -> Result<Response<v1::TransformStatus>, Status> {
        Ok(Response::new(
            self.runtime
                .status(&request.into_inner().name)
                .await
                .map_err(status)?,
        ))
    }

    async fn pause(
        &self,
        request: Request<v1::TransformName>,
    ) -> Result<Response<v1::TransformStatus>, Status> {
        Ok(Response::new(
            self.runtime
                .set_paused(&request.into_inner().name, true)
                .await
                .map_err(status)?,
        ))
    }

    async fn resume(
        &self,
        request: Request<v1::TransformName>,
    ) -> Result<Response<v1::TransformStatus>, Status> {
        Ok(Response::new(
            self.runtime
                .set_paused(&request.into_inner().name, false)
                .await
                .map_err(status)?,
        ))
    }

    async fn remove(
        &self,
        request: Request<v1::RemoveTransformRequest>,
    ) -> Result<Response<v1::RemoveTransformResponse>, Status> {
        let request = request.into_inner();
        self.runtime
            .remove(&request.name, request.delete_state)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::RemoveTransformResponse {}))
    }

    async fn query_state(
        &self,
        request: Request<v1::StateQuery>,
    ) -> Result<Response<v1::StateEntries>, Status> {
        let entries = self
            .runtime
            .query_state(request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StateEntries { entries }))
    }

    async fn logs(
        &self,
        request: Request<v1::TransformLogsRequest>,
    ) -> Result<Response<v1::TransformLogs>, Status> {
        let request = request.into_inner();
        let lines = if request.local {
            self.runtime.local_logs(&request.name)
        } else {
            self.runtime.logs(&request.name).await
        }
        .map_err(status)?;
        Ok(Response::new(v1::TransformLogs { lines }))
    }
}
