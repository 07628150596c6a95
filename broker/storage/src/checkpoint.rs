//! Small files that must be replaced atomically: write a temporary file, fsync it, rename
//! it over the old one, fsync the directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `contents` so that a crash leaves either the old or the new file.
///
/// # Errors
/// Any I/O error from writing, syncing or renaming.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a checkpoint holding one integer. A missing or unreadable file is `None`: every
/// caller has a safe fallback (scan more, trust less).
pub(crate) fn read_i64(path: &Path) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// # Errors
/// See [`write_atomic`].
pub(crate) fn write_i64(path: &Path, value: i64) -> io::Result<()> {
    write_atomic(path, format!("{value}\n").as_bytes())
}
