//! The `runnel.v1.Transforms` gRPC service, served by the broker process.

use runnel_proto::auth::{access, check, may};
use runnel_proto::error_status;
use runnel_proto::v1::{
    self, AclOperation as Op, ErrorCode, ResourceType as Res, transforms_server,
};
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
        let access = access(&request)?.clone();
        let request = request.into_inner();
        let mut spec = request
            .spec
            .ok_or_else(|| invalid("the deploy request has no spec"))?;
        access.check(Op::Create, Res::Transform, &spec.name)?;
        // The transform needs the rights it will use.
        let (principal, runs_as) = access.acting_for(Some(&spec.principal))?;
        spec.principal = principal.unwrap_or_default();
        runs_as.check(Op::Read, Res::Topic, &spec.input_topic)?;
        for output in spec
            .output_topics
            .iter()
            .chain(Some(&spec.dead_letter_topic).filter(|t| !t.is_empty()))
        {
            runs_as.check(Op::Write, Res::Topic, output)?;
        }
        for table in spec.tables.values() {
            runs_as.check(Op::Read, Res::Topic, table)?;
        }
        if !spec.principal.is_empty() {
            // What the tasks do besides: consume in their group, keep their stores'
            // changelogs, and commit in transactions with exactly-once.
            runs_as.check(
                Op::Read,
                Res::Group,
                &crate::runtime::group_name(&spec.name),
            )?;
            for store in &spec.stores {
                let changelog = crate::state::changelog_topic(&spec.name, store);
                runs_as.check(Op::Write, Res::Topic, &changelog)?;
                runs_as.check(Op::Read, Res::Topic, &changelog)?;
            }
            if spec.processing == v1::Processing::ExactlyOnce as i32 {
                runs_as.check(
                    Op::Write,
                    Res::TransactionalId,
                    &format!("{}-", crate::runtime::group_name(&spec.name)),
                )?;
            }
        }
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
        let mut transforms = if request.get_ref().local {
            self.runtime.local_list()
        } else {
            self.runtime.list().await
        };
        transforms.retain(|t| {
            let name = t.spec.as_ref().map_or("", |s| s.name.as_str());
            may(&request, Op::Describe, Res::Transform, name)
        });
        Ok(Response::new(v1::ListTransformsResponse { transforms }))
    }

    async fn describe_transform(
        &self,
        request: Request<v1::TransformName>,
    ) -> Result<Response<v1::TransformStatus>, Status> {
        check(
            &request,
            Op::Describe,
            Res::Transform,
            &request.get_ref().name,
        )?;
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
        check(&request, Op::Alter, Res::Transform, &request.get_ref().name)?;
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
        check(&request, Op::Alter, Res::Transform, &request.get_ref().name)?;
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
        check(
            &request,
            Op::Delete,
            Res::Transform,
            &request.get_ref().name,
        )?;
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
        check(&request, Op::Read, Res::Transform, &request.get_ref().name)?;
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
        check(
            &request,
            Op::Describe,
            Res::Transform,
            &request.get_ref().name,
        )?;
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
