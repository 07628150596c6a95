//! Authentication and authorization on the broker's listeners, and the Security service
//! (SCRAM exchanges, session tokens, users and ACLs).
//!
//! Every request passes [`AuthLayer`], which finds its principal and puts an
//! [`Access`] into its extensions:
//! 1. the cluster secret (`x-runnel-cluster-secret`): another broker, or this broker's
//!    own streams and connect runtimes; a super user (`User:__cluster`);
//! 2. a session token (`authorization: Bearer …`) from a SCRAM exchange: `User:NAME`;
//! 3. a client certificate under mutual TLS: `User:` and the subject's common name;
//! 4. nothing: `User:ANONYMOUS`, or `AUTHENTICATION_REQUIRED` on a listener that
//!    requires authentication.
//!
//! The services then check each call against the ACLs ([`runnel_proto::auth::check`]).
//!
//! **Invariants:**
//! - On a listener that requires authentication, no call but the SCRAM exchange (and
//!   gRPC health and reflection) reaches a service without an authenticated principal.
//! - A token is an HMAC of its user, mechanism and expiry under that user's `ServerKey`:
//!   any broker can check it, and a password change or the user's deletion revokes it.
//! - An unknown user and a wrong password get the same answer.
//! - Broker-to-broker calls (Quorum, Replication) need CLUSTER_ACTION on the cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use runnel_controller::security::{
    AclFilter, AclIndex, AclRecord, CredentialRecord, Operation, ResourceKind, Verdict,
};
use runnel_controller::{Command, Outcome};
use runnel_proto::auth::{
    ANONYMOUS, Access, Authorizer, CLUSTER_PRINCIPAL, CLUSTER_RESOURCE,
    CLUSTER_SECRET_METADATA_KEY, Decision, RUN_AS_METADATA_KEY, TOKEN_METADATA_KEY,
};
use runnel_proto::scram::{self, Mechanism, ServerExchange};
use runnel_proto::v1::{self, AclOperation, ErrorCode, ResourceType, security_server};
use tonic::body::Body;
use tonic::{Code, Request, Response, Status};

use crate::broker::Broker;
use crate::error::BrokerError;

/// Longest between AuthenticateStart and AuthenticateFinish.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most exchanges waiting for their final message (older ones are dropped first).
const HANDSHAKES_MAX: usize = 10_000;

/// What the layer and the service share.
pub struct Security {
    broker: Arc<Broker>,
    /// The secret brokers authenticate each other with (configured, or this process's
    /// own when the broker is alone).
    cluster_secret: String,
    super_users: Vec<String>,
    authorization: bool,
    session_lifetime: Duration,
    /// Salts made up for unknown users are keyed by this (random per process).
    decoy_key: Vec<u8>,
    handshakes: Mutex<HashMap<String, (ServerExchange, Mechanism, Instant)>>,
    acls: RwLock<(u64, Arc<AclIndex>)>,
}

impl Security {
    pub fn new(broker: Arc<Broker>, cluster_secret: String) -> Arc<Self> {
        let auth = &broker.config.auth;
        Arc::new(Security {
            super_users: auth.super_users.clone(),
            authorization: auth.authorization,
            session_lifetime: Duration::from_millis(auth.session_lifetime_ms.max(1_000)),
            broker,
            cluster_secret,
            decoy_key: scram::random_bytes(32),
            handshakes: Mutex::new(HashMap::new()),
            acls: RwLock::new((u64::MAX, Arc::new(AclIndex::default()))),
        })
    }

    /// The ACLs of the current metadata, indexed once per metadata change.
    fn acl_index(&self) -> Arc<AclIndex> {
        let image = self.broker.image();
        {
            let cached = self
                .acls
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cached.0 == image.index {
                return cached.1.clone();
            }
        }
        let index = Arc::new(AclIndex::new(&image.metadata.acls));
        *self
            .acls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (image.index, index.clone());
        index
    }

    /// The rights of `principal`, authenticated by `method`.
    pub fn access(self: &Arc<Self>, principal: String, method: &'static str) -> Access {
        let super_user = self.is_super(&principal);
        let authorizer: Option<Arc<dyn Authorizer>> = if self.authorization {
            Some(self.clone())
        } else {
            None
        };
        Access::new(principal, method, super_user, authorizer)
    }

    /// A session token for `user`, valid for the session lifetime.
    fn token(&self, user: &str, mechanism: Mechanism, server_key: &[u8]) -> String {
        let expires = crate::now_ms() + self.session_lifetime.as_millis() as i64;
        let payload = format!("{user}\n{}\n{expires}", mechanism.name());
        let mac = mechanism.hmac_sign(server_key, payload.as_bytes());
        format!("{}.{}", B64.encode(payload), B64.encode(mac))
    }

    /// The user a token names, if it is genuine, current, and the user's credential has
    /// not changed since.
    fn verify_token(&self, token: &str) -> Option<String> {
        let (payload, mac) = token.split_once('.')?;
        let payload = String::from_utf8(B64.decode(payload).ok()?).ok()?;
        let mac = B64.decode(mac).ok()?;
        let mut parts = payload.split('\n');
        let (user, mechanism, expires) = (parts.next()?, parts.next()?, parts.next()?);
        if expires.parse::<i64>().ok()? < crate::now_ms() {
            return None;
        }
        let image = self.broker.image();
        let credential = image.metadata.users.get(user)?.credentials.get(mechanism)?;
        let expected =
            Mechanism::parse(mechanism)?.hmac_sign(&credential.server_key, payload.as_bytes());
        scram::same(&mac, &expected).then(|| user.to_string())
    }

    /// The principal of a request, from its headers and connection.
    fn authenticate(
        self: &Arc<Self>,
        request: &http::Request<Body>,
        required: bool,
    ) -> Result<Access, Status> {
        let headers = request.headers();
        if let Some(secret) = headers.get(CLUSTER_SECRET_METADATA_KEY) {
            if scram::same(secret.as_bytes(), self.cluster_secret.as_bytes()) {
                // A broker acting for a transform or connector with a principal.
                let principal = match headers.get(RUN_AS_METADATA_KEY) {
                    Some(value) => value
                        .to_str()
                        .ok()
                        .filter(|p| p.starts_with("User:"))
                        .ok_or_else(|| {
                            Status::invalid_argument("x-runnel-run-as must be User:NAME")
                        })?
                        .to_string(),
                    None => CLUSTER_PRINCIPAL.to_string(),
                };
                return Ok(self.access(principal, "cluster"));
            }
            return Err(runnel_proto::error_status(
                Code::Unauthenticated,
                ErrorCode::AuthenticationFailed,
                "the cluster secret does not match this broker's: every broker of a cluster needs the same auth.cluster_secret_file",
            ));
        }
        if let Some(value) = headers.get(TOKEN_METADATA_KEY) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            return match self.verify_token(token.trim()) {
                Some(user) => Ok(self.access(format!("User:{user}"), "scram")),
                None => Err(runnel_proto::error_status(
                    Code::Unauthenticated,
                    ErrorCode::AuthenticationRequired,
                    "the session token is invalid, expired, or revoked (the user was deleted or its password changed): authenticate again",
                )),
            };
        }
        if let Some(name) = certificate_name(request) {
            return Ok(self.access(format!("User:{name}"), "certificate"));
        }
        if required {
            return Err(runnel_proto::error_status(
                Code::Unauthenticated,
                ErrorCode::AuthenticationRequired,
                "this listener requires authentication: give a user and password (--user and --password, or RUNNEL_USER and RUNNEL_PASSWORD) or a client certificate",
            ));
        }
        Ok(self.access(ANONYMOUS.to_string(), "none"))
    }
}

impl Authorizer for Security {
    fn is_super(&self, principal: &str) -> bool {
        principal == CLUSTER_PRINCIPAL || self.super_users.iter().any(|s| s == principal)
    }

    fn decide(
        &self,
        principal: &str,
        operation: AclOperation,
        resource: ResourceType,
        name: &str,
    ) -> Decision {
        let (Some(operation), Some(resource)) = (
            Operation::from_proto(operation),
            ResourceKind::from_proto(resource),
        ) else {
            return Decision::NoAcl;
        };
        match self
            .acl_index()
            .decide(principal, operation, resource, name)
        {
            Verdict::Allow => Decision::Allowed,
            Verdict::NoAcl => Decision::NoAcl,
            Verdict::Deny => Decision::Denied,
        }
    }
}

/// The common name of the verified client certificate of the request's connection.
fn certificate_name(request: &http::Request<Body>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    Some(name)
}

/// Calls any caller may make without authenticating.
fn open_path(path: &str) -> bool {
    path == "/runnel.v1.Security/AuthenticateStart"
        || path == "/runnel.v1.Security/AuthenticateFinish"
        || path.starts_with("/grpc.health.")
        || path.starts_with("/grpc.reflection.")
}

/// Calls only brokers make.
fn cluster_path(path: &str) -> bool {
    path.starts_with("/runnel.v1.Quorum/") || path.starts_with("/runnel.v1.Replication/")
}

/// Authenticates every request of a listener (see the module's notes).
#[derive(Clone)]
pub struct AuthLayer {
    pub security: Arc<Security>,
    /// Whether this listener requires authentication.
    pub required: bool,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> tower_service::Service<http::Request<Body>> for AuthService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let security = &self.layer.security;
        let path = request.uri().path();
        let access = if open_path(path) {
            Ok(security.access(ANONYMOUS.to_string(), "none"))
        } else {
            security
                .authenticate(&request, self.layer.required)
                .and_then(|access| {
                    if cluster_path(request.uri().path()) {
                        access.check(
                            AclOperation::ClusterAction,
                            ResourceType::Cluster,
                            CLUSTER_RESOURCE,
                        )?;
                    }
                    Ok(access)
                })
        };
        match access {
            Ok(access) => {
                request.extensions_mut().insert(access);
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(status) => {
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The Security gRPC service.
#[derive(Clone)]
pub struct SecurityService(pub Arc<Security>);

impl std::ops::Deref for SecurityService {
    type Target = Security;

    fn deref(&self) -> &Security {
        &self.0
    }
}

#[tonic::async_trait]
impl security_server::Security for SecurityService {
    async fn authenticate_start(
        &self,
        request: Request<v1::AuthenticateStartRequest>,
    ) -> Result<Response<v1::AuthenticateStartResponse>, Status> {
        let request = request.into_inner();
        let mechanism = runnel_proto::auth::mechanism_of(request.mechanism());
        let mut exchange = ServerExchange::start(&request.client_first).map_err(|err| {
            Status::invalid_argument(format!("malformed SCRAM client-first message: {err}"))
        })?;
        let image = self.broker.image();
        let (salt, iterations) = match image
            .metadata
            .users
            .get(&exchange.user)
            .and_then(|u| u.credentials.get(mechanism.name()))
        {
            Some(credential) => (credential.salt.clone(), credential.iterations),
            // The same shape of answer for a user that does not exist.
            None => (
                Mechanism::Sha256.hmac_sign(&self.decoy_key, exchange.user.as_bytes())[..16]
                    .to_vec(),
                scram::ITERATIONS_MIN,
            ),
        };
        let server_first = exchange.server_first(&salt, iterations);
        let id = B64.encode(scram::random_bytes(16));
        let mut handshakes = self
            .handshakes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        handshakes.retain(|_, (_, _, started)| started.elapsed() < HANDSHAKE_TIMEOUT);
        if handshakes.len() >= HANDSHAKES_MAX {
            return Err(Status::resource_exhausted(
                "too many SCRAM exchanges are waiting for their final message; retry shortly",
            ));
        }
        handshakes.insert(id.clone(), (exchange, mechanism, Instant::now()));
        Ok(Response::new(v1::AuthenticateStartResponse {
            handshake_id: id,
            server_first,
        }))
    }

    async fn authenticate_finish(
        &self,
        request: Request<v1::AuthenticateFinishRequest>,
    ) -> Result<Response<v1::AuthenticateFinishResponse>, Status> {
        let request = request.into_inner();
        let failed = || {
            runnel_proto::error_status(
                Code::Unauthenticated,
                ErrorCode::AuthenticationFailed,
                "authentication failed: unknown user or wrong password",
            )
        };
        let (exchange, mechanism, _) = self
            .handshakes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&request.handshake_id)
            .filter(|(_, _, started)| started.elapsed() < HANDSHAKE_TIMEOUT)
            .ok_or_else(|| {
                Status::failed_precondition(
                    "unknown or expired SCRAM exchange: start again with AuthenticateStart on the same broker",
                )
            })?;
        let image = self.broker.image();
        let Some(stored) = image
            .metadata
            .users
            .get(&exchange.user)
            .and_then(|u| u.credentials.get(mechanism.name()))
        else {
            tracing::info!(user = %exchange.user, "authentication failed: unknown user");
            return Err(failed());
        };
        let credential = scram::Credential {
            mechanism,
            iterations: stored.iterations,
            salt: stored.salt.clone(),
            stored_key: stored.stored_key.clone(),
            server_key: stored.server_key.clone(),
        };
        let server_final = exchange
            .finish(&request.client_final, &credential)
            .map_err(|err| {
                tracing::info!(user = %exchange.user, reason = %err, "authentication failed");
                failed()
            })?;
        Ok(Response::new(v1::AuthenticateFinishResponse {
            server_final,
            token: self.token(&exchange.user, mechanism, &stored.server_key),
            expires_in_ms: self.session_lifetime.as_millis() as u64,
            principal: format!("User:{}", exchange.user),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let access = runnel_proto::auth::access(&request)?;
        Ok(Response::new(v1::WhoAmIResponse {
            principal: access.principal.clone(),
            method: access.method.to_string(),
            super_user: access.super_user,
        }))
    }

    async fn upsert_user(
        &self,
        request: Request<v1::UpsertUserRequest>,
    ) -> Result<Response<v1::UpsertUserResponse>, Status> {
        check_cluster(&request, AclOperation::Alter)?;
        let request = request.into_inner();
        let credential = request
            .credential
            .ok_or_else(|| Status::invalid_argument("a user needs a SCRAM credential"))?;
        if !(scram::ITERATIONS_MIN..=scram::ITERATIONS_MAX).contains(&credential.iterations) {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "{} iterations: SCRAM needs between {} and {}",
                    credential.iterations,
                    scram::ITERATIONS_MIN,
                    scram::ITERATIONS_MAX
                ),
            }
            .into());
        }
        let mechanism = runnel_proto::auth::mechanism_of(credential.mechanism());
        let expected = match mechanism {
            Mechanism::Sha256 => 32,
            Mechanism::Sha512 => 64,
        };
        if credential.stored_key.len() != expected
            || credential.server_key.len() != expected
            || credential.salt.is_empty()
        {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "a {} credential needs a salt and {expected}-byte keys",
                    mechanism.name()
                ),
            }
            .into());
        }
        self.broker
            .propose(Command::UpsertUser {
                name: request.name.clone(),
                mechanism: mechanism.name().to_string(),
                credential: CredentialRecord {
                    iterations: credential.iterations,
                    salt: credential.salt.to_vec(),
                    stored_key: credential.stored_key.to_vec(),
                    server_key: credential.server_key.to_vec(),
                },
                create_only: request.create_only,
            })
            .await?;
        tracing::info!(user = %request.name, mechanism = mechanism.name(), "user credential set");
        Ok(Response::new(v1::UpsertUserResponse {}))
    }

    async fn delete_user(
        &self,
        request: Request<v1::DeleteUserRequest>,
    ) -> Result<Response<v1::DeleteUserResponse>, Status> {
        check_cluster(&request, AclOperation::Alter)?;
        let name = request.into_inner().name;
        self.broker
            .propose(Command::DeleteUser { name: name.clone() })
            .await?;
        tracing::info!(user = %name, "user deleted");
        Ok(Response::new(v1::DeleteUserResponse {}))
    }

    async fn list_users(
        &self,
        request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        check_cluster(&request, AclOperation::Describe)?;
        let image = self.broker.image();
        let users = image
            .metadata
            .users
            .iter()
            .map(|(name, user)| {
                let mechanisms: Vec<Mechanism> = user
                    .credentials
                    .keys()
                    .filter_map(|m| Mechanism::parse(m))
                    .collect();
                v1::UserDescription {
                    name: name.clone(),
                    mechanisms: mechanisms
                        .iter()
                        .map(|m| runnel_proto::auth::mechanism_proto(*m) as i32)
                        .collect(),
                    iterations: user.credentials.values().map(|c| c.iterations).collect(),
                }
            })
            .collect();
        Ok(Response::new(v1::ListUsersResponse { users }))
    }

    async fn create_acls(
        &self,
        request: Request<v1::CreateAclsRequest>,
    ) -> Result<Response<v1::CreateAclsResponse>, Status> {
        check_cluster(&request, AclOperation::Alter)?;
        let acls = request
            .into_inner()
            .acls
            .iter()
            .map(AclRecord::from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| Status::from(BrokerError::InvalidRequest { reason }))?;
        if acls.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: "no ACL given".into(),
            }
            .into());
        }
        self.broker
            .propose(Command::CreateAcls { acls: acls.clone() })
            .await?;
        tracing::info!(count = acls.len(), "ACLs created");
        Ok(Response::new(v1::CreateAclsResponse {}))
    }

    async fn delete_acls(
        &self,
        request: Request<v1::AclFilter>,
    ) -> Result<Response<v1::AclList>, Status> {
        check_cluster(&request, AclOperation::Alter)?;
        let filter = AclFilter::from_proto(request.get_ref());
        let removed = match self.broker.propose(Command::DeleteAcls { filter }).await? {
            Outcome::Acls(acls) => acls,
            _ => Vec::new(),
        };
        tracing::info!(count = removed.len(), "ACLs deleted");
        Ok(Response::new(v1::AclList {
            acls: removed.iter().map(AclRecord::to_proto).collect(),
        }))
    }

    async fn list_acls(
        &self,
        request: Request<v1::AclFilter>,
    ) -> Result<Response<v1::AclList>, Status> {
        check_cluster(&request, AclOperation::Describe)?;
        let filter = AclFilter::from_proto(request.get_ref());
        let image = self.broker.image();
        Ok(Response::new(v1::AclList {
            acls: image
                .metadata
                .acls
                .iter()
                .filter(|acl| filter.matches(acl))
                .map(AclRecord::to_proto)
                .collect(),
        }))
    }
}

fn check_cluster<T>(request: &Request<T>, operation: AclOperation) -> Result<(), Status> {
    runnel_proto::auth::check(request, operation, ResourceType::Cluster, CLUSTER_RESOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exchange_and_probes_are_open() {
        assert!(open_path("/runnel.v1.Security/AuthenticateStart"));
        assert!(open_path("/grpc.health.v1.Health/Check"));
        assert!(!open_path("/runnel.v1.Security/UpsertUser"));
        assert!(!open_path("/runnel.v1.Producer/Produce"));
        assert!(cluster_path("/runnel.v1.Replication/Fetch"));
        assert!(!cluster_path("/runnel.v1.Admin/Metadata"));
    }
}
