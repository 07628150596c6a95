//! Who calls, and what they may do: the pieces every side shares.
//!
//! - Brokers put an [`Access`] (the caller's principal and the authorizer) into each
//!   request's extensions after authenticating it; every service, the broker's and the
//!   streams and connect runtimes', checks its calls with [`check`] and filters its
//!   listings with [`may`].
//! - Clients reach brokers through a [`Conn`]: a channel that adds the caller's
//!   credentials to every call, authenticating with SCRAM first (and again before the
//!   session token expires).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::body::Body;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::scram::{ClientExchange, Mechanism};
use crate::v1::{self, AclOperation, ErrorCode, ResourceType};

/// The principal of a caller that did not authenticate, on a listener that allows it.
pub const ANONYMOUS: &str = "User:ANONYMOUS";
/// The principal of another broker of the cluster (authenticated by the cluster secret).
pub const CLUSTER_PRINCIPAL: &str = "User:__cluster";
/// The name of the cluster resource in ACLs.
pub const CLUSTER_RESOURCE: &str = "runnel-cluster";
/// The metadata key of a session token, `Bearer TOKEN`.
pub const TOKEN_METADATA_KEY: &str = "authorization";
/// The metadata key brokers authenticate each other with.
pub const CLUSTER_SECRET_METADATA_KEY: &str = "x-runnel-cluster-secret";
/// With the cluster secret: the principal a broker's transform or connector acts as.
pub const RUN_AS_METADATA_KEY: &str = "x-runnel-run-as";
/// A token this close to its expiry is renewed before the next call.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(60);

/// An authorizer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No ACL allows it.
    NoAcl,
    /// A DENY ACL matches (deny wins over any allow).
    Denied,
}

/// Decides whether a principal may perform an operation on a resource.
pub trait Authorizer: Send + Sync {
    /// Whether every check allows `principal`.
    fn is_super(&self, principal: &str) -> bool;

    fn decide(
        &self,
        principal: &str,
        operation: AclOperation,
        resource: ResourceType,
        name: &str,
    ) -> Decision;
}

/// The caller of one request, as the broker authenticated it.
#[derive(Clone)]
pub struct Access {
    pub principal: String,
    /// How it authenticated: `scram`, `certificate`, `cluster` or `none`.
    pub method: &'static str,
    /// Super users (and other brokers) pass every check.
    pub super_user: bool,
    /// `None` when authorization is off: every call is allowed.
    authorizer: Option<Arc<dyn Authorizer>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("principal", &self.principal)
            .field("method", &self.method)
            .field("super_user", &self.super_user)
            .finish_non_exhaustive()
    }
}

impl Access {
    pub fn new(
        principal: String,
        method: &'static str,
        super_user: bool,
        authorizer: Option<Arc<dyn Authorizer>>,
    ) -> Self {
        Access {
            principal,
            method,
            super_user,
            authorizer,
        }
    }

    /// The same rights check for another principal (what a transform or connector will
    /// act as).
    pub fn as_principal(&self, principal: &str) -> Access {
        Access {
            principal: principal.to_string(),
            method: self.method,
            super_user: self
                .authorizer
                .as_ref()
                .is_some_and(|a| a.is_super(principal)),
            authorizer: self.authorizer.clone(),
        }
    }

    /// Whom a transform or connector this caller deploys acts as, to record in the
    /// deployment, and the rights it will use: `named` when the deployment names a
    /// principal (acting as another than one's own needs ALTER on the cluster); else,
    /// while authorization is on, the caller itself, so that a deployment never holds
    /// more rights than whoever deployed it and keeps to the deployer's ACLs as they
    /// change. `None`, the cluster's rights (checked against the caller's here), only with
    /// authorization off or when another broker deploys.
    ///
    /// # Errors
    /// A principal that is not `User:NAME`, or no ALTER on the cluster.
    pub fn acting_for(&self, named: Option<&str>) -> Result<(Option<String>, Access), Status> {
        let own = (self.authorizer.is_some() && self.principal != CLUSTER_PRINCIPAL)
            .then_some(self.principal.as_str());
        let Some(principal) = named.map(str::trim).filter(|p| !p.is_empty()).or(own) else {
            return Ok((None, self.clone()));
        };
        if !principal.starts_with("User:") || principal.len() <= "User:".len() {
            return Err(crate::error_status(
                Code::InvalidArgument,
                ErrorCode::InvalidRequest,
                format!("principal {principal:?} is not of the form User:NAME"),
            ));
        }
        if principal != self.principal {
            self.check(AclOperation::Alter, ResourceType::Cluster, CLUSTER_RESOURCE)?;
        }
        Ok((Some(principal.to_string()), self.as_principal(principal)))
    }

    /// Whether this caller may perform `operation` on the resource.
    pub fn may(&self, operation: AclOperation, resource: ResourceType, name: &str) -> bool {
        self.decide(operation, resource, name) == Decision::Allowed
    }

    fn decide(&self, operation: AclOperation, resource: ResourceType, name: &str) -> Decision {
        match &self.authorizer {
            _ if self.super_user => Decision::Allowed,
            None => Decision::Allowed,
            Some(authorizer) => authorizer.decide(&self.principal, operation, resource, name),
        }
    }

    /// Allows the call, or refuses it with the `*_AUTHORIZATION_FAILED` code of the
    /// resource type and a message naming the principal, operation and resource.
    ///
    /// # Errors
    /// The refusal.
    pub fn check(
        &self,
        operation: AclOperation,
        resource: ResourceType,
        name: &str,
    ) -> Result<(), Status> {
        let why = match self.decide(operation, resource, name) {
            Decision::Allowed => return Ok(()),
            Decision::NoAcl => "no ACL allows it",
            Decision::Denied => "an ACL denies it",
        };
        let (code, what) = match resource {
            ResourceType::Topic => (ErrorCode::TopicAuthorizationFailed, "topic"),
            ResourceType::Group => (ErrorCode::GroupAuthorizationFailed, "group"),
            ResourceType::TransactionalId => (
                ErrorCode::TransactionalIdAuthorizationFailed,
                "transactional-id",
            ),
            ResourceType::Transform => (ErrorCode::TransformAuthorizationFailed, "transform"),
            ResourceType::Connector => (ErrorCode::ConnectorAuthorizationFailed, "connector"),
            ResourceType::Cluster | ResourceType::ResourceAny => {
                (ErrorCode::ClusterAuthorizationFailed, "cluster")
            }
        };
        let op = operation_name(operation);
        let target = if what == "cluster" {
            "--cluster".to_string()
        } else {
            format!("--{what} {name}")
        };
        let resource_text = if what == "cluster" {
            "the cluster".to_string()
        } else {
            format!("{what} {name:?}")
        };
        Err(crate::error_status(
            Code::PermissionDenied,
            code,
            format!(
                "{} may not {op} {resource_text}: {why}; an administrator can allow it with `runnel acl add --allow {} --operation {} {target}`",
                self.principal,
                self.principal,
                op.to_ascii_lowercase().replace('_', "-"),
            ),
        ))
    }
}

/// Kafka's name of an operation (`READ`, `DESCRIBE_CONFIGS`).
pub fn operation_name(operation: AclOperation) -> &'static str {
    match operation {
        AclOperation::OperationAny => "ANY",
        other => other.as_str_name(),
    }
}

/// The caller of `request`, as the broker's authentication layer put it there.
///
/// # Errors
/// The request did not pass the layer (a server assembled without it).
pub fn access<T>(request: &Request<T>) -> Result<&Access, Status> {
    request.extensions().get::<Access>().ok_or_else(|| {
        Status::internal(
            "the request carries no principal: it did not pass the broker's authentication layer",
        )
    })
}

/// Checks `request`'s caller: see [`Access::check`].
///
/// # Errors
/// The refusal, or a request without a principal.
pub fn check<T>(
    request: &Request<T>,
    operation: AclOperation,
    resource: ResourceType,
    name: &str,
) -> Result<(), Status> {
    access(request)?.check(operation, resource, name)
}

/// Whether `request`'s caller may: see [`Access::may`]. False without a principal.
pub fn may<T>(
    request: &Request<T>,
    operation: AclOperation,
    resource: ResourceType,
    name: &str,
) -> bool {
    access(request).is_ok_and(|a| a.may(operation, resource, name))
}

/// A user's password for SCRAM.
#[derive(Clone)]
pub struct Password {
    pub user: String,
    pub password: String,
    pub mechanism: Mechanism,
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Password")
            .field("user", &self.user)
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

/// What a [`Conn`] adds to every call.
pub enum Credentials {
    /// A user: SCRAM first, then the session token.
    Scram(Session),
    /// Another broker of the cluster (the shared cluster secret), acting as itself or,
    /// for a transform or connector it runs, as the principal named.
    Cluster {
        secret: http::HeaderValue,
        run_as: Option<(String, http::HeaderValue)>,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Scram(session) => write!(f, "Scram({:?})", session.password),
            Credentials::Cluster { run_as, .. } => {
                write!(f, "Cluster(as {:?})", run_as.as_ref().map(|(p, _)| p))
            }
        }
    }
}

impl Credentials {
    pub fn scram(password: Password) -> Arc<Self> {
        Arc::new(Credentials::Scram(Session {
            password,
            token: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The cluster secret brokers authenticate each other with.
    ///
    /// # Errors
    /// A secret that is not printable ASCII.
    pub fn cluster(secret: &str) -> Result<Arc<Self>, String> {
        let value = http::HeaderValue::try_from(secret.trim())
            .map_err(|_| "the cluster secret must be printable ASCII".to_string())?;
        Ok(Arc::new(Credentials::Cluster {
            secret: value,
            run_as: None,
        }))
    }

    /// The cluster's credentials acting as `principal` (`User:NAME`); `None` for a
    /// user's credentials, which cannot act as anyone else.
    pub fn run_as(&self, principal: &str) -> Option<Arc<Self>> {
        match self {
            Credentials::Cluster { secret, .. } => {
                let value = http::HeaderValue::try_from(principal).ok()?;
                Some(Arc::new(Credentials::Cluster {
                    secret: secret.clone(),
                    run_as: Some((principal.to_string(), value)),
                }))
            }
            Credentials::Scram(_) => None,
        }
    }

    /// The principal these credentials act as, when they name one.
    pub fn acting_as(&self) -> Option<&str> {
        match self {
            Credentials::Cluster {
                run_as: Some((principal, _)),
                ..
            } => Some(principal),
            _ => None,
        }
    }

    /// Adds the headers of the next call, authenticating first when needed.
    async fn apply(&self, channel: &Channel, headers: &mut http::HeaderMap) -> Result<(), Status> {
        match self {
            Credentials::Cluster { secret, run_as } => {
                headers.insert(
                    http::HeaderName::from_static(CLUSTER_SECRET_METADATA_KEY),
                    secret.clone(),
                );
                if let Some((_, principal)) = run_as {
                    headers.insert(
                        http::HeaderName::from_static(RUN_AS_METADATA_KEY),
                        principal.clone(),
                    );
                }
            }
            Credentials::Scram(session) => {
                headers.insert(
                    http::HeaderName::from_static(TOKEN_METADATA_KEY),
                    session.token(channel).await?,
                );
            }
        }
        Ok(())
    }
}

/// A SCRAM login and its current session token.
pub struct Session {
    password: Password,
    token: Mutex<Option<(http::HeaderValue, Instant)>>,
    /// One authentication at a time: calls that find no valid token wait for it.
    renewing: tokio::sync::Mutex<()>,
}

impl Session {
    fn current(&self) -> Option<http::HeaderValue> {
        let token = self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        token
            .as_ref()
            .filter(|(_, expires)| Instant::now() + TOKEN_RENEW_MARGIN < *expires)
            .map(|(value, _)| value.clone())
    }

    fn forget(&self) {
        *self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    async fn token(&self, channel: &Channel) -> Result<http::HeaderValue, Status> {
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let _one = self.renewing.lock().await;
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let (token, lifetime) = authenticate(channel.clone(), &self.password).await?;
        let value = http::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::internal("the broker's session token is not ASCII"))?;
        *self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((value.clone(), Instant::now() + lifetime));
        Ok(value)
    }
}

/// Runs a SCRAM exchange on `channel`; returns the session token and its lifetime.
///
/// # Errors
/// The broker refused (wrong user or password: `AUTHENTICATION_FAILED`), could not be
/// reached, or did not prove it knows the credential.
pub async fn authenticate(
    channel: Channel,
    login: &Password,
) -> Result<(String, Duration), Status> {
    let mut rpc = v1::security_client::SecurityClient::new(channel);
    let mut exchange = ClientExchange::new(login.mechanism, &login.user, &login.password);
    let started = rpc
        .authenticate_start(v1::AuthenticateStartRequest {
            mechanism: mechanism_proto(login.mechanism) as i32,
            client_first: exchange.first(),
        })
        .await?
        .into_inner();
    let client_final = exchange.finish(&started.server_first).map_err(|err| {
        Status::unauthenticated(format!("the broker's SCRAM answer is malformed: {err}"))
    })?;
    let finished = rpc
        .authenticate_finish(v1::AuthenticateFinishRequest {
            handshake_id: started.handshake_id,
            client_final,
        })
        .await?
        .into_inner();
    exchange.verify(&finished.server_final).map_err(|err| {
        crate::error_status(
            Code::Unauthenticated,
            ErrorCode::AuthenticationFailed,
            format!("the broker failed to authenticate itself: {err}"),
        )
    })?;
    Ok((
        finished.token,
        Duration::from_millis(finished.expires_in_ms),
    ))
}

pub fn mechanism_proto(mechanism: Mechanism) -> v1::ScramMechanism {
    match mechanism {
        Mechanism::Sha256 => v1::ScramMechanism::ScramSha256,
        Mechanism::Sha512 => v1::ScramMechanism::ScramSha512,
    }
}

pub fn mechanism_of(proto: v1::ScramMechanism) -> Mechanism {
    match proto {
        v1::ScramMechanism::ScramSha256 => Mechanism::Sha256,
        v1::ScramMechanism::ScramSha512 => Mechanism::Sha512,
    }
}

/// A channel to a broker that carries the caller's credentials on every call.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    credentials: Option<Arc<Credentials>>,
}

impl Conn {
    pub fn new(channel: Channel, credentials: Option<Arc<Credentials>>) -> Self {
        Conn {
            channel,
            credentials,
        }
    }

    /// The same connection, carrying other credentials.
    pub fn with_credentials(&self, credentials: Option<Arc<Credentials>>) -> Self {
        Conn::new(self.channel.clone(), credentials)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Request<Body>> for Conn {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The channel made ready by `poll_ready` serves this call; the clone left here
        // is made ready for the next one.
        let fresh = self.channel.clone();
        let mut ready = std::mem::replace(&mut self.channel, fresh);
        match self.credentials.clone() {
            None => Box::pin(async move { ready.call(request).await.map_err(Into::into) }),
            Some(credentials) => {
                let spare = self.channel.clone();
                Box::pin(async move {
                    credentials.apply(&spare, request.headers_mut()).await?;
                    let response = ready.call(request).await?;
                    // A token the broker no longer takes (it expired early, or the
                    // password changed) is dropped: the next call authenticates again.
                    if let Credentials::Scram(session) = &*credentials
                        && response
                            .headers()
                            .get(crate::ERROR_CODE_METADATA_KEY)
                            .is_some_and(|code| {
                                code.as_bytes()
                                    == ErrorCode::AuthenticationRequired.as_str_name().as_bytes()
                            })
                    {
                        session.forget();
                    }
                    Ok(response)
                })
            }
        }
    }
}
