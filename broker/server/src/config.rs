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

    /// The log settings every topic starts from.
    ///
    /// # Errors
    /// An unknown key or invalid value in `topic_defaults`.
    pub fn log_defaults(&self) -> anyhow::Result<LogConfig> {
        let mut config = LogConfig::default();
        for (key, value) in &self.topic_defaults {
            if crate::metadata::BROKER_TOPIC_KEYS.contains(&key.as_str()) {
                continue;
            }
            config.apply(key, value)?;
        }
        Ok(config)
    }
}
