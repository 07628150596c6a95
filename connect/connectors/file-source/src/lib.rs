//! File source: tails a file (or every file in a directory) line by line into a topic.
//!
//! Config:
//! - `path` (required): a file, or a directory whose files are all tailed.
//! - `start`: `beginning` (default) or `end`, for files met on the very first start.
//! - `read-bytes`: bytes read per system call (default 1 MiB).
//!
//! Each line becomes a record whose value is the line without its `\n`; a last line
//! without `\n` waits until it is finished. Files are recognised by a fingerprint of
//! their first bytes, not their name, so a rotated file (`app.log` renamed `app.log.1`
//! and a new `app.log` created) is read to its end before the new one, and a truncated
//! file (copytruncate) is read again from the start. The position committed after each
//! batch is every tracked file's byte offset and fingerprint; a restarted connector
//! resumes exactly after the last committed line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use connector_common::{file_error, number, required};
use runnel_sdk::Config;
use runnel_sdk::connect::{Batch, Failure, Source};

/// Bytes of a file's head that identify it.
const FINGERPRINT_BYTES: u64 = 256;
/// How long to wait after an empty poll.
const IDLE_MS: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    /// Name within the directory when last seen.
    name: String,
    offset: u64,
    fp_len: u64,
    fp: u64,
}

enum Mode {
    /// One file: its name in `dir`; rotated copies share the name as a prefix.
    File(String),
    /// Every regular file in `dir`.
    Directory,
}

struct FileSource {
    dir: String,
    mode: Mode,
    tracked: Vec<Tracked>,
    read_bytes: usize,
    /// Files that existed at the first start and are skipped to their end (`start: end`).
    start_at_end: bool,
    buf: Vec<u8>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn encode(tracked: &[Tracked]) -> String {
    let mut out = String::from("file-source v1\n");
    for t in tracked {
        out.push_str(&format!(
            "{} {} {:016x} {}\n",
            t.offset, t.fp_len, t.fp, t.name
        ));
    }
    out
}

fn decode(position: &[u8]) -> Result<Vec<Tracked>, Failure> {
    let corrupt = || Failure::Fatal("the committed position is not a file-source position".into());
    let text = std::str::from_utf8(position).map_err(|_| corrupt())?;
    let mut lines = text.lines();
    if lines.next() != Some("file-source v1") {
        return Err(corrupt());
    }
    let mut tracked = Vec::new();
    for line in lines {
        let mut parts = line.splitn(4, ' ');
        let (Some(offset), Some(fp_len), Some(fp), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt());
        };
        tracked.push(Tracked {
            name: name.to_string(),
            offset: offset.parse().map_err(|_| corrupt())?,
            fp_len: fp_len.parse().map_err(|_| corrupt())?,
            fp: u64::from_str_radix(fp, 16).map_err(|_| corrupt())?,
        });
    }
    Ok(tracked)
}

/// A file found in the directory: its name, size and first bytes.
struct Candidate {
    name: String,
    size: u64,
    head: Vec<u8>,
}

impl FileSource {
    fn path_of(&self, name: &str) -> String {
        format!("{}/{}", self.dir.trim_end_matches('/'), name)
    }

    fn candidates(&self) -> Result<Vec<Candidate>, Failure> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|err| file_error("read the directory", &self.dir, &err, "read"))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| file_error("read", &self.dir, &err, "read"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Mode::File(live) = &self.mode
                && name != *live
                && !name.starts_with(&format!("{live}."))
            {
                continue;
            }
            let path = self.path_of(&name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let mut head = Vec::new();
            if let Ok(file) = File::open(&path) {
                let _ = file.take(FINGERPRINT_BYTES).read_to_end(&mut head);
            }
            found.push(Candidate {
                name,
                size: meta.len(),
                head,
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    fn matches(tracked: &Tracked, candidate: &Candidate) -> bool {
        if tracked.fp_len == 0 {
            return tracked.name == candidate.name;
        }
        let len = tracked.fp_len as usize;
        candidate.head.len() >= len && fnv1a(&candidate.head[..len]) == tracked.fp
    }

    /// Pairs the files found with the tracked entries, in the order they are read:
    /// rotated files (which may still have unread lines) first, then the others by name.
    fn refresh(&mut self) -> Result<(), Failure> {
        let candidates = self.candidates()?;
        let mut next: Vec<Tracked> = Vec::new();
        let mut unmatched: Vec<&Candidate> = Vec::new();
        let mut old = std::mem::take(&mut self.tracked);
        for candidate in &candidates {
            match old.iter().position(|t| Self::matches(t, candidate)) {
                Some(i) => {
                    let mut t = old.remove(i);
                    if candidate.size < t.offset {
                        // Truncated in place: read it again from the start.
                        t.offset = 0;
                        t.fp_len = 0;
                        t.fp = 0;
                    }
                    t.name = candidate.name.clone();
                    next.push(t);
                }
                None => unmatched.push(candidate),
            }
        }
        for candidate in unmatched {
            let is_new_live_or_any = match &self.mode {
                Mode::File(live) => candidate.name == *live,
                Mode::Directory => true,
            };
            if !is_new_live_or_any {
                continue;
            }
            let offset = if self.start_at_end { candidate.size } else { 0 };
            let mut t = Tracked {
                name: candidate.name.clone(),
                offset,
                fp_len: 0,
                fp: 0,
            };
            fingerprint(&mut t, &candidate.head);
            next.push(t);
        }
        self.start_at_end = false;
        // A rotated file (not the live name) is finished first.
        if let Mode::File(live) = &self.mode {
            next.sort_by_key(|t| (t.name == *live, t.name.clone()));
        }
        self.tracked = next;
        Ok(())
    }

    /// Reads complete lines of tracked file `index` into the batch.
    fn read_lines(&mut self, index: usize, batch: &mut Batch) -> Result<(), Failure> {
        let path = self.path_of(&self.tracked[index].name);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(file_error("open", &path, &err, "read")),
        };
        let mut offset = self.tracked[index].offset;
        file.seek(SeekFrom::Start(offset))
            .map_err(|err| file_error("seek in", &path, &err, "read"))?;
        self.buf.clear();
        let mut start = 0usize;
        while !batch.is_full() {
            if let Some(newline) = self.buf[start..].iter().position(|b| *b == b'\n') {
                let line = &self.buf[start..start + newline];
                batch.emit(None, Some(line));
                start += newline + 1;
                offset += newline as u64 + 1;
                continue;
            }
            // Keep the unfinished tail, then read more.
            self.buf.drain(..start);
            start = 0;
            let have = self.buf.len();
            self.buf.resize(have + self.read_bytes, 0);
            let n = file
                .read(&mut self.buf[have..])
                .map_err(|err| file_error("read", &path, &err, "read"))?;
            self.buf.truncate(have + n);
            if n == 0 {
                break;
            }
        }
        let t = &mut self.tracked[index];
        t.offset = offset;
        if t.fp_len < FINGERPRINT_BYTES && t.offset > t.fp_len {
            let mut head = Vec::new();
            if let Ok(file) = File::open(&path) {
                let _ = file.take(FINGERPRINT_BYTES).read_to_end(&mut head);
            }
            fingerprint(t, &head);
        }
        Ok(())
    }
}

/// Fingerprints the bytes of `head` already read (up to the offset).
fn fingerprint(t: &mut Tracked, head: &[u8]) {
    let len = (t.offset.min(FINGERPRINT_BYTES) as usize).min(head.len());
    if len as u64 > t.fp_len {
        t.fp_len = len as u64;
        t.fp = fnv1a(&head[..len]);
    }
}

impl Source for FileSource {
    fn open(config: &Config, position: Option<&[u8]>) -> Result<Self, Failure> {
        let path = required(config, "path")?.trim_end_matches('/').to_string();
        if !path.starts_with('/') {
            return Err(connector_common::bad(
                "path",
                format!("{path:?} must be absolute"),
            ));
        }
        connector_common::check_granted(&path, "read")?;
        let split = || {
            let (dir, name) = path.rsplit_once('/').unwrap_or((".", &path));
            let dir = if dir.is_empty() { "/" } else { dir };
            (dir.to_string(), Mode::File(name.to_string()))
        };
        let (dir, mode) = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => (path.clone(), Mode::Directory),
            Ok(_) => split(),
            // A file that does not exist yet is waited for.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => split(),
            Err(err) => return Err(file_error("open", &path, &err, "read")),
        };
        let start_at_end = match config.get("start").unwrap_or("beginning") {
            "beginning" => false,
            "end" => true,
            other => {
                return Err(connector_common::bad(
                    "start",
                    format!("{other:?} is not beginning or end"),
                ));
            }
        };
        let read_bytes: usize = number(config, "read-bytes", 1 << 20)?;
        if read_bytes == 0 {
            return Err(connector_common::bad("read-bytes", "must be at least 1"));
        }
        let tracked = match position {
            Some(position) => decode(position)?,
            None => Vec::new(),
        };
        let mut source = FileSource {
            start_at_end: start_at_end && position.is_none(),
            dir,
            mode,
            tracked,
            read_bytes,
            buf: Vec::new(),
        };
        // Fail now, with the capability message, if the directory cannot be listed.
        source.candidates()?;
        source.buf.reserve(read_bytes);
        Ok(source)
    }

    fn poll(&mut self, batch: &mut Batch) -> Result<(), Failure> {
        self.refresh()?;
        for index in 0..self.tracked.len() {
            if batch.is_full() {
                break;
            }
            self.read_lines(index, batch)?;
        }
        batch.set_position(encode(&self.tracked));
        if batch.is_empty() {
            batch.idle(IDLE_MS);
        }
        Ok(())
    }
}

runnel_sdk::export_source!(FileSource);

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(name: &str, offset: u64, head: &[u8]) -> Tracked {
        let mut t = Tracked {
            name: name.into(),
            offset,
            fp_len: 0,
            fp: 0,
        };
        fingerprint(&mut t, head);
        t
    }

    #[test]
    fn positions_round_trip_and_refuse_garbage() {
        let files = vec![
            tracked("app.log.1", 300, &[b'a'; 300]),
            tracked("app log with spaces", 0, b""),
        ];
        let text = encode(&files);
        assert_eq!(decode(text.as_bytes()).expect("valid"), files);
        assert!(decode(b"something else").is_err());
        assert!(decode(b"file-source v1\nnot numbers here x\n").is_err());
    }

    #[test]
    fn files_are_known_by_their_first_bytes_not_their_name() {
        let head = b"first line\nsecond line\n";
        let t = tracked("app.log", 11, head);
        assert_eq!(t.fp_len, 11);
        // Renamed (rotated): still the same file.
        let renamed = Candidate {
            name: "app.log.1".into(),
            size: 23,
            head: head.to_vec(),
        };
        assert!(FileSource::matches(&t, &renamed));
        // A new file under the old name: different first bytes.
        let new = Candidate {
            name: "app.log".into(),
            size: 11,
            head: b"other line\n".to_vec(),
        };
        assert!(!FileSource::matches(&t, &new));
        // Nothing read yet: only the name identifies it.
        let empty = tracked("app.log", 0, b"");
        assert!(FileSource::matches(&empty, &new));
        assert!(!FileSource::matches(&empty, &renamed));
    }

    #[test]
    fn the_fingerprint_covers_at_most_what_was_read() {
        let head = vec![b'x'; 1000];
        assert_eq!(tracked("a", 100, &head).fp_len, 100);
        assert_eq!(tracked("a", 5000, &head).fp_len, FINGERPRINT_BYTES);
    }
}
