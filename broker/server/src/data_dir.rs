//! The data directory belongs to one process at a time.
//!
//! **Invariant:** while a broker process runs, it holds an exclusive lock on
//! `<data dir>/.lock` (like Kafka's `.lock`); a second process pointed at the same
//! directory refuses to start instead of opening the same logs. The lock is the kernel's
//! (`flock`), so it is released when the process dies, `kill -9` included; the file keeps
//! the holder's pid only to name it in the error.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirLockError {
    #[error(
        "data directory {} is in use by another Runnel process{}; stop that process or choose another --data-dir",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as the process uses the directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Creates the directory if needed and takes its lock.
    ///
    /// # Errors
    /// Another process holds the lock, or the lock file cannot be created.
    pub fn acquire(dir: &Path) -> Result<Self, DataDirLockError> {
        let io = |source| DataDirLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(DataDirLockError::InUse {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first lock");
        let err = DataDirLock::acquire(dir.path()).expect_err("second lock refused");
        let message = err.to_string();
        assert!(
            message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}
