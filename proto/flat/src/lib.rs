//! The flat record format of `proto/wit/transform.wit`: how a batch of records crosses
//! the host/guest boundary as one byte buffer.
//!
//! The host writes inputs and reads outputs; the guest SDK reads inputs and writes
//! outputs. Everything is little-endian. Readers never panic: a short or malformed buffer
//! is an error value. No dependencies, so it builds for the host and for `wasm32-wasip2`.

/// A record read from (or written to) a flat buffer, borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatRecord<'a> {
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Encoded headers (count, then entries); walk them with [`headers`].
    pub headers: &'a [u8],
}

/// An emitted record read from an output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatOutput<'a> {
    pub input_index: u32,
    pub output_index: u32,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [u8],
}

/// What is wrong with a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatError(pub &'static str);

impl std::fmt::Display for FlatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed flat record buffer: {}", self.0)
    }
}

impl std::error::Error for FlatError {}

#[derive(Clone)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FlatError> {
        if n > self.buf.len() {
            return Err(FlatError("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, FlatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, FlatError> {
        Ok(self.u32()? as i32)
    }

    fn i64(&mut self) -> Result<i64, FlatError> {
        let b = self.take(8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Ok(i64::from_le_bytes(raw))
    }

    fn nullable(&mut self) -> Result<Option<&'a [u8]>, FlatError> {
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(FlatError("negative length")),
            n => self.take(n as usize).map(Some),
        }
    }

    /// The headers block (count and entries) as a slice, checked.
    fn headers(&mut self) -> Result<&'a [u8], FlatError> {
        let start = self.buf;
        let count = self.u32()?;
        for _ in 0..count {
            let key_len = self.u32()? as usize;
            let key = self.take(key_len)?;
            std::str::from_utf8(key).map_err(|_| FlatError("header key is not UTF-8"))?;
            self.nullable()?;
        }
        let used = start.len() - self.buf.len();
        Ok(&start[..used])
    }
}

/// Parses `buf` as consecutive items; stops after the first error.
fn read_all<'a, T>(
    buf: &'a [u8],
    parse: impl Fn(&mut Reader<'a>) -> Result<T, FlatError>,
) -> impl Iterator<Item = Result<T, FlatError>> {
    let mut reader = Reader { buf };
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || reader.buf.is_empty() {
            return None;
        }
        let item = parse(&mut reader);
        failed = item.is_err();
        Some(item)
    })
}

/// Iterates over the records of an input buffer.
pub fn read_inputs(buf: &[u8]) -> impl Iterator<Item = Result<FlatRecord<'_>, FlatError>> {
    read_all(buf, |r| {
        Ok(FlatRecord {
            partition: r.u32()?,
            offset: r.i64()?,
            timestamp_ms: r.i64()?,
            key: r.nullable()?,
            value: r.nullable()?,
            headers: r.headers()?,
        })
    })
}

/// Iterates over the records of an output buffer.
pub fn read_outputs(buf: &[u8]) -> impl Iterator<Item = Result<FlatOutput<'_>, FlatError>> {
    read_all(buf, |r| {
        Ok(FlatOutput {
            input_index: r.u32()?,
            output_index: r.u32()?,
            timestamp_ms: r.i64()?,
            key: r.nullable()?,
            value: r.nullable()?,
            headers: r.headers()?,
        })
    })
}

/// Iterates over an encoded headers block: (key, value).
pub fn headers(block: &[u8]) -> impl Iterator<Item = (&str, Option<&[u8]>)> + Clone {
    let mut reader = Reader { buf: block };
    let mut remaining = reader.u32().unwrap_or(0);
    std::iter::from_fn(move || {
        if remaining == 0 {
            return None;
        }
        remaining -= 1;
        let key_len = reader.u32().ok()? as usize;
        let key = std::str::from_utf8(reader.take(key_len).ok()?).ok()?;
        let value = reader.nullable().ok()?;
        Some((key, value))
    })
}

fn put_nullable(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

/// Appends an encoded headers block built from `(key, value)` pairs.
pub fn write_headers<'a>(
    out: &mut Vec<u8>,
    headers: impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)>,
) {
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (key, value) in headers {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        put_nullable(out, value);
    }
}

/// Appends one input record; `headers` is an encoded headers block.
pub fn write_input(out: &mut Vec<u8>, record: &FlatRecord<'_>) {
    out.extend_from_slice(&record.partition.to_le_bytes());
    out.extend_from_slice(&record.offset.to_le_bytes());
    out.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    put_nullable(out, record.key);
    put_nullable(out, record.value);
    out.extend_from_slice(record.headers);
}

/// Appends one output record; `headers` is an encoded headers block.
pub fn write_output(out: &mut Vec<u8>, record: &FlatOutput<'_>) {
    out.extend_from_slice(&record.input_index.to_le_bytes());
    out.extend_from_slice(&record.output_index.to_le_bytes());
    out.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    put_nullable(out, record.key);
    put_nullable(out, record.value);
    out.extend_from_slice(record.headers);
}

/// An empty headers block.
pub const NO_HEADERS: &[u8] = &[0, 0, 0, 0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_and_outputs_round_trip() {
        let mut headers = Vec::new();
        write_headers(
            &mut headers,
            [("h", Some(&b"v"[..])), ("n", None)].into_iter(),
        );
        let record = FlatRecord {
            partition: 3,
            offset: 42,
            timestamp_ms: -7,
            key: None,
            value: Some(b"hello"),
            headers: &headers,
        };
        let mut buf = Vec::new();
        write_input(&mut buf, &record);
        write_input(
            &mut buf,
            &FlatRecord {
                key: Some(b""),
                headers: NO_HEADERS,
                ..record
            },
        );
        let read: Vec<_> = read_inputs(&buf).collect::<Result<_, _>>().expect("valid");
        assert_eq!(read[0], record);
        assert_eq!(read[1].key, Some(&b""[..]));
        assert_eq!(
            headers_of(&read[0]),
            vec![("h", Some(&b"v"[..])), ("n", None)]
        );
        let output = FlatOutput {
            input_index: 1,
            output_index: 0,
            timestamp_ms: 5,
            key: Some(b"k"),
            value: None,
            headers: NO_HEADERS,
        };
        let mut out = Vec::new();
        write_output(&mut out, &output);
        assert_eq!(read_outputs(&out).next(), Some(Ok(output)));
    }

    fn headers_of<'a>(record: &FlatRecord<'a>) -> Vec<(&'a str, Option<&'a [u8]>)> {
        headers(record.headers).collect()
    }

    #[test]
    fn truncated_or_garbage_buffers_are_errors() {
        let mut buf = Vec::new();
        write_output(
            &mut buf,
            &FlatOutput {
                input_index: 0,
                output_index: 0,
                timestamp_ms: 0,
                key: Some(b"key"),
                value: Some(b"value"),
                headers: NO_HEADERS,
            },
        );
        for cut in 1..buf.len() {
            assert!(read_outputs(&buf[..cut]).any(|r| r.is_err()), "cut {cut}");
        }
        let garbage = [0xffu8; 40];
        assert!(read_inputs(&garbage).any(|r| r.is_err()));
    }
}
