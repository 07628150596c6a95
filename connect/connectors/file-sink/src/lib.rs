//! File sink: appends records to a file, one per line.
//!
//! Config:
//! - `path` (required): the file; created if missing, always appended to.
//! - `key-separator`: when set, each line is `key`, the separator, then the value.
//! - `fsync`: `true` (default) makes every batch durable before its offsets are
//!   committed; `false` leaves it to the operating system (faster, but a power loss can
//!   lose the last batches).
//!
//! A tombstone (no value) writes an empty value.

use std::fs::{File, OpenOptions};
use std::io::Write;

use connector_common::{file_error, flag, required};
use runnel_sdk::connect::{Failure, Sink, WriteError};
use runnel_sdk::{Config, Record};

struct FileSink {
    path: String,
    file: File,
    separator: Option<Vec<u8>>,
    fsync: bool,
    buf: Vec<u8>,
}

impl Sink for FileSink {
    fn open(config: &Config) -> Result<Self, Failure> {
        let path = required(config, "path")?.to_string();
        if !path.starts_with('/') {
            return Err(connector_common::bad(
                "path",
                format!("{path:?} must be absolute"),
            ));
        }
        connector_common::check_granted(&path, "read-write")?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|err| file_error("open", &path, &err, "read-write"))?;
        Ok(FileSink {
            path,
            file,
            separator: config.get("key-separator").map(|s| s.as_bytes().to_vec()),
            fsync: flag(config, "fsync", true)?,
            buf: Vec::new(),
        })
    }

    fn write(&mut self, _topic: &str, records: &[Record<'_>]) -> Result<(), WriteError> {
        self.buf.clear();
        for record in records {
            if let Some(separator) = &self.separator {
                self.buf.extend_from_slice(record.key().unwrap_or_default());
                self.buf.extend_from_slice(separator);
            }
            self.buf
                .extend_from_slice(record.value().unwrap_or_default());
            self.buf.push(b'\n');
        }
        self.file
            .write_all(&self.buf)
            .map_err(|err| WriteError::from(file_error("write", &self.path, &err, "read-write")))?;
        if self.fsync {
            self.file.sync_data().map_err(|err| {
                WriteError::from(file_error("sync", &self.path, &err, "read-write"))
            })?;
        }
        Ok(())
    }
}

runnel_sdk::export_sink!(FileSink);
