//! Per-partition log settings and the topic config keys that set them.

use runnel_batch::TimestampType;

/// When appended bytes are forced to disk with fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Every call to [`crate::Log::maybe_flush`] that follows an append fsyncs. The broker
    /// appends every request waiting for a partition, then flushes once and acknowledges
    /// them all (group commit).
    EveryAppend,
    /// Fsync once `messages` records are unflushed or `ms` milliseconds have passed since
    /// the last fsync, whichever comes first.
    Interval { messages: u64, ms: i64 },
}

/// What happens to old data (`cleanup.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupPolicy {
    pub delete: bool,
    pub compact: bool,
}

/// Settings of one partition's log. Defaults follow Kafka's, except the flush policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `segment.bytes`: roll when the active segment would grow past this.
    pub segment_bytes: u64,
    /// `segment.ms`: roll when the active segment's first append is this old.
    pub segment_ms: i64,
    /// `index.interval.bytes`: log bytes between two sparse index entries.
    pub index_interval_bytes: u64,
    /// `retention.ms`: delete segments whose largest timestamp is older; -1 keeps forever.
    pub retention_ms: i64,
    /// `retention.bytes`: delete the oldest segments while the log is larger; -1 = no limit.
    pub retention_bytes: i64,
    /// `cleanup.policy`.
    pub cleanup_policy: CleanupPolicy,
    /// `delete.retention.ms`: how long compaction keeps tombstones.
    pub delete_retention_ms: i64,
    /// `max.message.bytes`: largest batch accepted, in bytes.
    pub max_message_bytes: usize,
    /// `message.timestamp.type`.
    pub timestamp_type: TimestampType,
    /// `flush.messages` / `flush.ms`; see [`FlushPolicy`].
    pub flush: FlushPolicy,
    /// `page.cache.bytes`: how much of the newest log data stays in the OS page cache once
    /// it is on disk. Older data is dropped from the cache as the log grows, so that its
    /// pages take the next writes instead of new memory; -1 leaves the cache to the OS
    /// (Kafka's behaviour). Not in Kafka.
    pub page_cache_bytes: i64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1024 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            cleanup_policy: CleanupPolicy {
                delete: true,
                compact: false,
            },
            delete_retention_ms: 24 * 3600 * 1000,
            max_message_bytes: 1024 * 1024 + 12,
            timestamp_type: TimestampType::CreateTime,
            flush: FlushPolicy::EveryAppend,
            page_cache_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A topic config entry that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown config key {key:?}; known keys: {}", KNOWN_KEYS.join(", "))]
    UnknownKey { key: String },
    #[error("invalid value {value:?} for {key}: {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// Every topic config key a user may set.
pub const KNOWN_KEYS: &[&str] = &[
    "cleanup.policy",
    "delete.retention.ms",
    "flush.messages",
    "flush.ms",
    "index.interval.bytes",
    "max.message.bytes",
    "message.timestamp.type",
    "page.cache.bytes",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
    "segment.ms",
];

impl LogConfig {
    /// Every known key with its value in this config, in [`KNOWN_KEYS`] order.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let (flush_messages, flush_ms) = match self.flush {
            FlushPolicy::EveryAppend => (1, 0),
            FlushPolicy::Interval { messages, ms } => (messages, ms.max(0) as u64),
        };
        let cleanup = match (self.cleanup_policy.compact, self.cleanup_policy.delete) {
            (true, true) => "compact,delete",
            (true, false) => "compact",
            (false, true) => "delete",
            (false, false) => "",
        };
        let timestamp_type = match self.timestamp_type {
            TimestampType::CreateTime => "CreateTime",
            TimestampType::LogAppendTime => "LogAppendTime",
        };
        let cap = |v: u64| {
            if v == u64::MAX {
                i64::MAX.to_string()
            } else {
                v.to_string()
            }
        };
        vec![
            ("cleanup.policy", cleanup.to_string()),
            ("delete.retention.ms", self.delete_retention_ms.to_string()),
            ("flush.messages", cap(flush_messages)),
            ("flush.ms", cap(flush_ms)),
            (
                "index.interval.bytes",
                self.index_interval_bytes.to_string(),
            ),
            ("max.message.bytes", self.max_message_bytes.to_string()),
            ("message.timestamp.type", timestamp_type.to_string()),
            ("page.cache.bytes", self.page_cache_bytes.to_string()),
            ("retention.bytes", self.retention_bytes.to_string()),
            ("retention.ms", self.retention_ms.to_string()),
            ("segment.bytes", self.segment_bytes.to_string()),
            ("segment.ms", self.segment_ms.to_string()),
        ]
    }

    /// Applies one `key=value` topic config entry.
    ///
    /// # Errors
    /// An unknown key, or a value of the wrong type or out of range.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let invalid = |expected: &'static str| ConfigError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            expected,
        };
        let int = |min: i64, expected: &'static str| -> Result<i64, ConfigError> {
            value
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= min)
                .ok_or_else(|| invalid(expected))
        };
        match key {
            "segment.bytes" => {
                self.segment_bytes = int(14, "an integer between 14 and 2147483647")?
                    .min(i64::from(i32::MAX)) as u64;
            }
            "segment.ms" => self.segment_ms = int(1, "a positive integer")?,
            "index.interval.bytes" => {
                self.index_interval_bytes = int(0, "a non-negative integer")? as u64
            }
            "retention.ms" => {
                self.retention_ms = int(-1, "-1 (forever) or a non-negative integer")?
            }
            "retention.bytes" => {
                self.retention_bytes = int(-1, "-1 (no limit) or a non-negative integer")?
            }
            "delete.retention.ms" => self.delete_retention_ms = int(0, "a non-negative integer")?,
            "page.cache.bytes" => {
                self.page_cache_bytes =
                    int(-1, "-1 (leave it to the OS) or a non-negative integer")?
            }
            "max.message.bytes" => {
                let max = runnel_batch::BATCH_SIZE_BYTES_MAX as i64;
                let v = int(0, "an integer between 0 and 67108864")?;
                if v > max {
                    return Err(invalid("an integer between 0 and 67108864"));
                }
                self.max_message_bytes = v as usize;
            }
            "message.timestamp.type" => {
                self.timestamp_type = match value.trim() {
                    "CreateTime" => TimestampType::CreateTime,
                    "LogAppendTime" => TimestampType::LogAppendTime,
                    _ => return Err(invalid("CreateTime or LogAppendTime")),
                }
            }
            "cleanup.policy" => {
                let mut policy = CleanupPolicy {
                    delete: false,
                    compact: false,
                };
                for part in value.split(',').map(str::trim) {
                    match part {
                        "delete" => policy.delete = true,
                        "compact" => policy.compact = true,
                        _ => return Err(invalid("delete, compact or compact,delete")),
                    }
                }
                self.cleanup_policy = policy;
            }
            "flush.messages" => {
                let messages = int(1, "a positive integer")? as u64;
                self.flush = match self.flush {
                    FlushPolicy::Interval { ms, .. } => FlushPolicy::Interval { messages, ms },
                    FlushPolicy::EveryAppend if messages == 1 => FlushPolicy::EveryAppend,
                    FlushPolicy::EveryAppend => FlushPolicy::Interval {
                        messages,
                        ms: i64::MAX,
                    },
                };
            }
            "flush.ms" => {
                let ms = int(0, "a non-negative integer")?;
                self.flush = match self.flush {
                    FlushPolicy::Interval { messages, .. } => {
                        FlushPolicy::Interval { messages, ms }
                    }
                    FlushPolicy::EveryAppend if ms == 0 => FlushPolicy::EveryAppend,
                    FlushPolicy::EveryAppend => FlushPolicy::Interval {
                        messages: u64::MAX,
                        ms,
                    },
                };
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_known_keys_and_refuses_bad_ones() {
        let mut config = LogConfig::default();
        config.apply("retention.ms", "-1").expect("forever");
        assert_eq!(config.retention_ms, -1);
        config
            .apply("cleanup.policy", "compact,delete")
            .expect("both");
        assert!(config.cleanup_policy.compact && config.cleanup_policy.delete);
        config.apply("flush.ms", "1000").expect("interval");
        assert_eq!(
            config.flush,
            FlushPolicy::Interval {
                messages: u64::MAX,
                ms: 1000
            }
        );
        assert!(matches!(
            config.apply("retention.ms", "soon"),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(matches!(
            config.apply("retention.mss", "1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(config.apply("message.timestamp.type", "Now").is_err());
    }
}
