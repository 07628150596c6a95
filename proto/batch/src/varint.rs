//! Zig-zag varints as Kafka writes them in records, and a bounds-checked reader.

use bytes::{BufMut, BytesMut};

pub(crate) fn put_varint(out: &mut BytesMut, value: i32) {
    put_unsigned(out, ((value << 1) ^ (value >> 31)) as u32 as u64);
}

pub(crate) fn put_varlong(out: &mut BytesMut, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Bytes `put_varint(value)` writes.
pub(crate) fn varint_bytes(value: i32) -> usize {
    unsigned_bytes(((value << 1) ^ (value >> 31)) as u32 as u64)
}

/// Bytes `put_varlong(value)` writes.
pub(crate) fn varlong_bytes(value: i64) -> usize {
    unsigned_bytes(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_bytes(value: u64) -> usize {
    // 7 bits a byte; zero still takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes `put_nullable_bytes(bytes)` writes.
pub(crate) fn nullable_bytes_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => 1,
        Some(bytes) => varint_bytes(bytes.len() as i32) + bytes.len(),
    }
}

pub(crate) fn put_nullable_bytes(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, -1),
        Some(bytes) => {
            put_varint(out, bytes.len() as i32);
            out.extend_from_slice(bytes);
        }
    }
}

/// Reads from a borrowed buffer; every read is checked against what is left.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err(format!(
                "needs {n} more bytes but only {} remain",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    #[inline]
    fn read_unsigned(&mut self, max_bytes: usize) -> Result<u64, String> {
        // Most varints in a record (attributes, deltas, short lengths) take one byte.
        if let Some((&first, rest)) = self.buf.split_first()
            && first < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(first));
        }
        let mut value = 0u64;
        for (i, byte) in self.buf.iter().take(max_bytes).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.buf = self.buf.get(i + 1..).unwrap_or_default();
                return Ok(value);
            }
        }
        if self.buf.len() < max_bytes {
            Err("varint is truncated".to_string())
        } else {
            Err("varint is too long".to_string())
        }
    }

    #[inline]
    pub(crate) fn read_varint(&mut self) -> Result<i32, String> {
        let raw = self.read_unsigned(5)?;
        let raw = u32::try_from(raw).map_err(|_| "varint overflows 32 bits".to_string())?;
        Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    pub(crate) fn read_varlong(&mut self) -> Result<i64, String> {
        let raw = self.read_unsigned(10)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    #[inline]
    pub(crate) fn read_nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, String> {
        let len = self.read_varint()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| format!("invalid length {len}"))?;
        Ok(Some(self.take(len)?))
    }
}
