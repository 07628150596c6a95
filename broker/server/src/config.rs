//! Broker settings: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! node_id = 1
//! data_dir = "/var/lib/runnel"
//! listen = "0.0.0.0:7070"
//! advertised_address = "broker1.example:7070"
//! auto_create_topics = false
//! default_partitions = 1
//! default_replication_factor = 1
//! housekeeping_interval_ms = 300000
//! process_roles = ["broker", "controller"]   # KRaft's process.roles
//! controller_quorum = "1@10.0.0.1:7070,2@10.0.0.2:7070,3@10.0.0.3:7070"
//! broker_session_timeout_ms = 2500
//! broker_heartbeat_interval_ms = 500
//! replica_lag_time_max_ms = 30000            # a follower behind this long leaves the ISR
//! replica_fetch_wait_max_ms = 500
//! replica_fetch_max_bytes = 8388608
//! request_timeout_ms = 30000                 # longest an acks=all produce waits
//! transaction_max_timeout_ms = 900000        # longest transaction timeout a producer may ask
//! transactional_id_expiration_ms = 604800000 # an idle transactional id is forgotten after
//! unclean_leader_election_enable = false
//! auto_leader_rebalance_enable = true        # give leadership back to preferred replicas
//! leader_imbalance_check_interval_ms = 30000
//! metrics_listen = "0.0.0.0:9644"           # Prometheus /metrics; "off" to turn it off
//!
//! [auth]                    # unset: anyone may do anything
//! require_authentication = true             # SCRAM users or client certificates
//! authorization = true                      # check every call against the ACLs
//! super_users = ["User:admin"]
//! cluster_secret_file = "/etc/runnel/cluster.secret"  # the same on every broker
//! open_listen = "127.0.0.1:7071"            # plaintext, no authentication asked
//!
//! [topic_defaults]          # defaults for every topic's configs
//! "retention.ms" = "604800000"
//! "flush.ms" = "1000"       # switch from fsync-per-append to interval flushing
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use runnel_broker_storage::LogConfig;
use serde::Deserialize;

/// Where clients find a broker when they are told nothing else.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default = "default_node_id")]
    pub node_id: u32,
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The address clients should use; defaults to the bound listen address.
    #[serde(default)]
    pub advertised_address: Option<String>,
    #[serde(default)]
    pub auto_create_topics: bool,
    #[serde(default = "one")]
    pub default_partitions: u32,
    #[serde(default = "one")]
    pub default_replication_factor: u32,
    /// How often retention, compaction and interval flushing run.
    #[serde(default = "default_housekeeping_ms")]
    pub housekeeping_interval_ms: u64,
    #[serde(default)]
    pub topic_defaults: BTreeMap<String, String>,
    /// What this node runs: `broker` (hosts partitions), `controller` (a voter of the
    /// metadata quorum), or both (the default).
    #[serde(default = "default_roles")]
    pub process_roles: Vec<ProcessRole>,
    /// The controller quorum's voters, `ID@HOST:PORT` separated by commas. Unset: this
    /// node alone, at its own address (a cluster of one).
    #[serde(default)]
    pub controller_quorum: Option<String>,
    /// A broker whose heartbeats stop for this long is fenced by the active controller.
    #[serde(default = "default_session_ms")]
    pub broker_session_timeout_ms: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub broker_heartbeat_interval_ms: u64,
    /// A follower that has not caught up with its leader for this long leaves the ISR.
    #[serde(default = "default_replica_lag_ms")]
    pub replica_lag_time_max_ms: u64,
    /// Longest a leader holds a follower's fetch while it has nothing new.
    #[serde(default = "default_replica_fetch_wait_ms")]
    pub replica_fetch_wait_max_ms: u64,
    /// Most record bytes in one answer to a follower.
    #[serde(default = "default_replica_fetch_bytes")]
    pub replica_fetch_max_bytes: u32,
    /// Longest an `acks=all` produce waits for the ISR when the request names no timeout.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// The longest transaction timeout a transactional producer may ask for (Kafka's
    /// `transaction.max.timeout.ms`).
    #[serde(default = "default_transaction_max_timeout_ms")]
    pub transaction_max_timeout_ms: u32,
    /// A transactional id with no transaction open for this long is forgotten, with its
    /// producer id and epoch (Kafka's `transactional.id.expiration.ms`).
    #[serde(default = "default_transactional_id_expiration_ms")]
    pub transactional_id_expiration_ms: i64,
    /// Whether a partition whose whole ISR is down may be led by an out-of-sync replica
    /// (losing what it lacks), for topics that do not set `unclean.leader.election.enable`.
    #[serde(default)]
    pub unclean_leader_election_enable: bool,
    /// Whether the active controller gives partitions back to their preferred replica
    /// (the first of their replicas) once it is in sync again.
    #[serde(default = "default_true")]
    pub auto_leader_rebalance_enable: bool,
    /// How often it checks.
    #[serde(default = "default_leader_imbalance_check_ms")]
    pub leader_imbalance_check_interval_ms: u64,
    /// Where Prometheus scrapes `/metrics`: `HOST:PORT`, or `off`. Unset: the listen
    /// address's host on port [`METRICS_PORT`] (a free port when the listen port is 0).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// TLS on the listener and towards the other brokers and voters; unset: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Authentication and authorization; unset: anyone may do anything.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// The `[auth]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether callers of `listen` must authenticate (SCRAM, or a client certificate
    /// under mutual TLS).
    #[serde(default)]
    pub require_authentication: bool,
    /// Whether every call is checked against the ACLs (`runnel acl`).
    #[serde(default)]
    pub authorization: bool,
    /// Principals (`User:NAME`) every check allows.
    #[serde(default)]
    pub super_users: Vec<String>,
    /// The secret the brokers of a cluster authenticate each other with: a file whose
    /// content is the same on every broker. Unset: a secret of this process, which
    /// serves a broker alone.
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
    /// A second, plaintext listener that does not require authentication (its callers
    /// are `User:ANONYMOUS` unless they authenticate), for tools on the same host.
    #[serde(default)]
    pub open_listen: Option<SocketAddr>,
    /// How long a SCRAM session token stays valid.
    #[serde(default = "default_session_lifetime_ms")]
    pub session_lifetime_ms: u64,
}

fn default_session_lifetime_ms() -> u64 {
    3_600_000
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            require_authentication: false,
            authorization: false,
            super_users: Vec::new(),
            cluster_secret_file: None,
            open_listen: None,
            session_lifetime_ms: default_session_lifetime_ms(),
        }
    }
}

impl AuthConfig {
    /// Whether brokers must prove who they are to each other.
    pub fn enabled(&self) -> bool {
        self.require_authentication || self.authorization
    }
}

/// The `[tls]` table: PEM files.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This broker's certificate (chain), presented to clients and, with mutual TLS,
    /// to the brokers and voters it connects to.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed the brokers' certificates (and clients', with client_auth):
    /// this broker trusts it when it connects to other brokers and voters.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by `ca_file`.
    #[serde(default)]
    pub client_auth: bool,
}

/// The metrics port when none is configured (Redpanda's admin and metrics port).
pub const METRICS_PORT: u16 = 9644;

fn default_true() -> bool {
    true
}

fn default_leader_imbalance_check_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessRole {
    Broker,
    Controller,
}

impl std::str::FromStr for ProcessRole {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "broker" => Ok(ProcessRole::Broker),
            "controller" => Ok(ProcessRole::Controller),
            other => Err(format!(
                "unknown process role {other:?}; use broker, controller or broker,controller"
            )),
        }
    }
}

fn default_roles() -> Vec<ProcessRole> {
    vec![ProcessRole::Broker, ProcessRole::Controller]
}

fn default_session_ms() -> u64 {
    2_500
}

fn default_heartbeat_ms() -> u64 {
    500
}

fn default_replica_lag_ms() -> u64 {
    30_000
}

fn default_replica_fetch_wait_ms() -> u64 {
    500
}

fn default_replica_fetch_bytes() -> u32 {
    8 * 1024 * 1024
}

fn default_transaction_max_timeout_ms() -> u32 {
    crate::txn::MAX_TIMEOUT_MS
}

fn default_transactional_id_expiration_ms() -> i64 {
    crate::txn::ID_EXPIRATION_MS
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

fn default_node_id() -> u32 {
    1
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("the default listen address parses")
}

fn one() -> u32 {
    1
}

fn default_housekeeping_ms() -> u64 {
    300_000
}

impl BrokerConfig {
    /// A config with every default and the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            node_id: default_node_id(),
            data_dir: data_dir.into(),
            listen: default_listen(),
            advertised_address: None,
            auto_create_topics: false,
            default_partitions: 1,
            default_replication_factor: 1,
            housekeeping_interval_ms: default_housekeeping_ms(),
            topic_defaults: BTreeMap::new(),
            process_roles: default_roles(),
            controller_quorum: None,
            broker_session_timeout_ms: default_session_ms(),
            broker_heartbeat_interval_ms: default_heartbeat_ms(),
            replica_lag_time_max_ms: default_replica_lag_ms(),
            replica_fetch_wait_max_ms: default_replica_fetch_wait_ms(),
            replica_fetch_max_bytes: default_replica_fetch_bytes(),
            request_timeout_ms: default_request_timeout_ms(),
            transaction_max_timeout_ms: default_transaction_max_timeout_ms(),
            transactional_id_expiration_ms: default_transactional_id_expiration_ms(),
            unclean_leader_election_enable: false,
            auto_leader_rebalance_enable: true,
            leader_imbalance_check_interval_ms: default_leader_imbalance_check_ms(),
            metrics_listen: None,
            tls: None,
            auth: AuthConfig::default(),
        }
    }

    /// How this broker connects to the other brokers and voters: over TLS, trusting
    /// `ca_file` and presenting its own certificate, when TLS is configured.
    ///
    /// # Errors
    /// TLS without a CA file, or files that cannot be read.
    pub fn client_tls(&self) -> anyhow::Result<Option<runnel_proto::tls::ClientTls>> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let ca = tls
            .ca_file
            .as_ref()
            .context("tls.ca_file is needed: brokers check each other's certificates against it")?;
        Ok(Some(runnel_proto::tls::ClientTls::from_files(
            ca,
            Some(&tls.cert_file),
            Some(&tls.key_file),
        )?))
    }

    /// The secret brokers authenticate each other with (read from
    /// `auth.cluster_secret_file`, or this process's own), and whether this broker sends
    /// it on its calls to brokers and voters (and its runtimes' calls to it): when auth is
    /// on, unless the brokers authenticate by their certificates instead.
    ///
    /// # Errors
    /// A super user that is not `User:NAME`; an unreadable or short file; a cluster of
    /// several nodes with authentication or authorization on and neither a shared secret
    /// nor mutual TLS.
    pub fn cluster_secret(&self) -> anyhow::Result<(String, bool)> {
        for user in &self.auth.super_users {
            if !user.starts_with("User:") || user.len() <= "User:".len() {
                anyhow::bail!(
                    "auth.super_users: {user:?} is not a principal; write User:NAME (User:admin, or User:CN for a certificate)"
                );
            }
        }
        if let Some(path) = &self.auth.cluster_secret_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading auth.cluster_secret_file {}", path.display()))?;
            let secret = text.trim();
            if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                anyhow::bail!(
                    "auth.cluster_secret_file {} must hold at least 16 printable ASCII characters (for example `openssl rand -hex 32`)",
                    path.display()
                );
            }
            return Ok((secret.to_string(), self.auth.enabled()));
        }
        let mutual_tls = self.tls.as_ref().is_some_and(|t| t.client_auth);
        let alone = self.controller_quorum.is_none();
        if self.auth.enabled() && !alone && !mutual_tls {
            anyhow::bail!(
                "with [auth] on, the brokers of a cluster must authenticate each other: set auth.cluster_secret_file (the same file on every broker), or use mutual TLS (tls.client_auth) with the brokers' certificate names in auth.super_users"
            );
        }
        let own = runnel_proto::scram::random_bytes(24)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((own, self.auth.enabled() && alone))
    }

    /// Where the metrics endpoint listens; `None` when it is off.
    ///
    /// # Errors
    /// A value that is neither `HOST:PORT` nor `off`.
    pub fn metrics_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.metrics_listen.as_deref().map(str::trim) {
            Some("off") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                anyhow::anyhow!(
                    "metrics_listen must be HOST:PORT (for example 0.0.0.0:{METRICS_PORT}) or off, not {text:?}"
                )
            }),
            None => {
                let mut address = self.listen;
                if address.port() != 0 {
                    address.set_port(METRICS_PORT);
                }
                Ok(Some(address))
            }
        }
    }

    /// # Errors
    /// An unreadable file, invalid TOML, an unknown key or a value of the wrong type; the
    /// message names the file and the problem.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading broker config {}", path.display()))?;
        let config: BrokerConfig = toml::from_str(&text)
            .with_context(|| format!("invalid broker config {}", path.display()))?;
        config
            .log_defaults()
            .with_context(|| format!("invalid [topic_defaults] in {}", path.display()))?;
        Ok(config)
    }

    pub fn is_broker(&self) -> bool {
        self.process_roles.contains(&ProcessRole::Broker)
    }

    pub fn is_controller(&self) -> bool {
        self.process_roles.contains(&ProcessRole::Controller)
    }

    /// The quorum's voters; `advertised` is this node's address, used when the config
    /// names no quorum (a cluster of one).
    ///
    /// # Errors
    /// A malformed `controller_quorum`, no role, or a controller missing from its quorum.
    pub fn voters(
        &self,
        advertised: &str,
    ) -> anyhow::Result<BTreeMap<runnel_controller::BrokerId, String>> {
        if self.process_roles.is_empty() {
            anyhow::bail!("process_roles is empty; use broker, controller or both");
        }
        if self.node_id == 0 {
            anyhow::bail!("node id 0 is reserved; node ids start at 1");
        }
        let voters = match &self.controller_quorum {
            Some(text) => runnel_controller::parse_voters(text).map_err(anyhow::Error::msg)?,
            None if self.is_controller() => {
                BTreeMap::from([(self.node_id, advertised.to_string())])
            }
            None => anyhow::bail!(
                "node {} runs only as a broker, so it needs --controller-quorum to find the controllers",
                self.node_id
            ),
        };
        if self.is_controller() && !voters.contains_key(&self.node_id) {
            anyhow::bail!(
                "node {} runs as a controller but the controller quorum ({}) does not name it; add {}@HOST:PORT",
                self.node_id,
                self.controller_quorum.as_deref().unwrap_or_default(),
                self.node_id
            );
        }
        Ok(voters)
    }

    /// The log settings every topic starts from.
    ///
    /// # Errors
    /// An unknown key or invalid value in `topic_defaults`.
    pub fn log_defaults(&self) -> anyhow::Result<LogConfig> {
        let mut config = LogConfig::default();
        for (key, value) in &self.topic_defaults {
            if crate::broker::BROKER_TOPIC_KEYS.contains(&key.as_str()) {
                continue;
            }
            config.apply(key, value)?;
        }
        Ok(config)
    }
}
