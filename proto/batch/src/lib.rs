//! The record batch: the unit Runnel stores, replicates and sends over the wire.
//!
//! This crate is a contract shared by the producer (which encodes batches), the broker
//! (which validates them and stamps offsets without re-encoding records) and the consumer
//! (which decodes them). It depends on nothing async and nothing of the broker.
//!
//! # Byte format
//!
//! The layout is Kafka's RecordBatch v2 (magic 2). All fixed-width integers are
//! big-endian. A batch is:
//!
//! | pos | size | field | notes |
//! |----:|-----:|-------|-------|
//! | 0   | 8 | base offset (i64) | stamped by the broker on append |
//! | 8   | 4 | batch length (i32) | bytes after this field (whole batch − 12) |
//! | 12  | 4 | partition leader epoch (i32) | stamped by the broker on append |
//! | 16  | 1 | magic (i8) | always 2 |
//! | 17  | 4 | CRC-32C (u32) | over bytes 21..end (attributes to the last record) |
//! | 21  | 2 | attributes (i16) | bits 0-2 compression, 3 timestamp type, 4 transactional, 5 control |
//! | 23  | 4 | last offset delta (i32) | offset of the last record − base offset |
//! | 27  | 8 | base timestamp (i64) | ms since the Unix epoch, first record's timestamp |
//! | 35  | 8 | max timestamp (i64) | largest record timestamp (append time for LogAppendTime) |
//! | 43  | 8 | producer id (i64) | −1 when not idempotent |
//! | 51  | 2 | producer epoch (i16) | −1 when not idempotent |
//! | 53  | 4 | base sequence (i32) | −1 when not idempotent |
//! | 57  | 4 | record count (i32) | |
//! | 61  | … | records | compressed as a whole when the compression bits are set |
//!
//! Because the CRC starts at the attributes, the broker can stamp the base offset and the
//! leader epoch without recomputing it. Each record is:
//!
//! | field | encoding |
//! |-------|----------|
//! | length | zig-zag varint: bytes of the record after this field |
//! | attributes | i8, unused (0) |
//! | timestamp delta | zig-zag varlong, from the base timestamp |
//! | offset delta | zig-zag varint, from the base offset |
//! | key length, key | zig-zag varint (−1 = null key), bytes |
//! | value length, value | zig-zag varint (−1 = null value, a tombstone), bytes |
//! | header count | zig-zag varint |
//! | per header | key length (varint), key (UTF-8), value length (varint, −1 = null), value |
//!
//! Compression codes follow Kafka: 0 none, 3 lz4 (LZ4 frame). Gzip (1), snappy (2) and
//! zstd (4) are recognised and refused with [`BatchError::UnsupportedCompression`].
//!
//! # Transaction markers
//!
//! A transaction's end is written to each partition it touched as a *control batch*
//! (attributes bits 4 and 5 set, the producer's id and epoch, base sequence −1) holding
//! one record: key = version (i16, 0) and type (i16: 0 abort, 1 commit), value = version
//! (i16, 0) and the coordinator epoch (i32). Consumers never hand control records to
//! applications.
//!
//! Every length read from a buffer is checked against the buffer and against the limits
//! below; malformed input is a [`BatchError`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};

mod partitioner;
mod varint;

pub use partitioner::{murmur2, partition_for_key};

/// Size of the fixed batch header, up to and including the record count.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before and including the batch length field; `batch length` counts what follows.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
/// The only batch format version Runnel reads and writes.
pub const MAGIC: i8 = 2;
/// A batch larger than this is malformed whatever the topic's `max.message.bytes` says.
pub const BATCH_SIZE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most records a single batch may hold.
pub const BATCH_RECORDS_MAX: usize = 1_000_000;
/// Most headers a single record may carry.
pub const RECORD_HEADERS_MAX: usize = 4096;

const OFFSET_BASE_POS: usize = 0;
const LENGTH_POS: usize = 8;
const EPOCH_POS: usize = 12;
const MAGIC_POS: usize = 16;
const CRC_POS: usize = 17;
const ATTRIBUTES_POS: usize = 21;
const LAST_OFFSET_DELTA_POS: usize = 23;
const BASE_TIMESTAMP_POS: usize = 27;
const MAX_TIMESTAMP_POS: usize = 35;
const PRODUCER_ID_POS: usize = 43;
const PRODUCER_EPOCH_POS: usize = 51;
const BASE_SEQUENCE_POS: usize = 53;
const RECORD_COUNT_POS: usize = 57;

const COMPRESSION_MASK: i16 = 0b111;
const TIMESTAMP_TYPE_BIT: i16 = 1 << 3;
const TRANSACTIONAL_BIT: i16 = 1 << 4;
const CONTROL_BIT: i16 = 1 << 5;

/// What is wrong with a buffer that should hold record batches.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch is truncated: need {needed_bytes} bytes, have {available_bytes}")]
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    #[error("batch length field {length} is invalid (must be between {min} and {max})")]
    InvalidLength { length: i64, min: usize, max: usize },
    #[error("unsupported batch magic {magic}; only magic 2 (RecordBatch v2) is supported")]
    UnsupportedMagic { magic: i8 },
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("unsupported compression codec {codec}; Runnel supports none (0) and lz4 (3)")]
    UnsupportedCompression { codec: i16 },
    #[error("batch header is inconsistent: {reason}")]
    InvalidHeader { reason: &'static str },
    #[error("record {index} of the batch is malformed: {reason}")]
    InvalidRecord { index: usize, reason: String },
    #[error("lz4 decompression failed: {0}")]
    Decompression(String),
}

/// How the records section of a batch is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
}

impl Compression {
    fn code(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
        }
    }

    fn from_code(code: i16) -> Result<Self, BatchError> {
        match code {
            0 => Ok(Compression::None),
            3 => Ok(Compression::Lz4),
            codec => Err(BatchError::UnsupportedCompression { codec }),
        }
    }
}

/// Whose clock the record timestamps come from (`message.timestamp.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampType {
    /// The producer's timestamp (`CreateTime`).
    #[default]
    CreateTime,
    /// The broker's clock at append (`LogAppendTime`).
    LogAppendTime,
}

/// A record header: a string key and an optional bytes value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

impl Header {
    /// Each header's (key, value), borrowed, in order.
    pub fn pairs(
        headers: &[Header],
    ) -> impl ExactSizeIterator<Item = (&str, Option<&[u8]>)> + Clone {
        headers.iter().map(|h| (h.key.as_str(), h.value.as_deref()))
    }
}

/// A record as a producer hands it over and a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Absolute offset (set by the broker; ignored when encoding).
    pub offset: i64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    /// `None` is a tombstone.
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

impl Record {
    /// The record's fields as encoding reads them.
    pub fn parts(&self) -> RecordParts<'_, impl HeaderParts<'_>> {
        RecordParts {
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|h| (h.key.as_bytes(), h.value.as_deref())),
        }
    }
}

/// A record's headers as encoding reads them, borrowed: (key, value) of each, in order.
pub trait HeaderParts<'a>: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone {}
impl<'a, T: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone> HeaderParts<'a> for T {}

/// A record's fields as encoding reads them, borrowed: from a [`Record`], or from a
/// buffer that holds records in another form (a transform's output), with no `Record`
/// made of them.
#[derive(Debug, Clone)]
pub struct RecordParts<'a, H> {
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: H,
}

/// The fixed-size header of a batch, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after the length field.
    pub batch_length: u32,
    pub leader_epoch: i32,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: u32,
}

impl BatchHeader {
    /// Total size of the batch in bytes, header included.
    pub fn size_bytes(&self) -> usize {
        self.batch_length as usize + BATCH_LENGTH_PREFIX_BYTES
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// Offset just after this batch.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    /// # Errors
    /// The compression bits name a codec Runnel does not support.
    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_code(self.attributes & COMPRESSION_MASK)
    }

    pub fn timestamp_type(&self) -> TimestampType {
        if self.attributes & TIMESTAMP_TYPE_BIT != 0 {
            TimestampType::LogAppendTime
        } else {
            TimestampType::CreateTime
        }
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }
}

fn read_i64(buf: &[u8], pos: usize) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[pos..pos + 8]);
    i64::from_be_bytes(raw)
}

fn read_i32(buf: &[u8], pos: usize) -> i32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[pos..pos + 4]);
    i32::from_be_bytes(raw)
}

fn read_i16(buf: &[u8], pos: usize) -> i16 {
    i16::from_be_bytes([buf[pos], buf[pos + 1]])
}

/// Reads the base offset and total size of the batch at the start of `buf` from its
/// first 12 bytes, checking the size against [`BATCH_SIZE_BYTES_MAX`] but nothing else.
///
/// # Errors
/// Fewer than 12 bytes, or a length field out of bounds.
pub fn peek_offset_and_size(buf: &[u8]) -> Result<(i64, usize), BatchError> {
    let prefix = buf
        .get(..BATCH_LENGTH_PREFIX_BYTES)
        .ok_or(BatchError::Truncated {
            needed_bytes: BATCH_LENGTH_PREFIX_BYTES,
            available_bytes: buf.len(),
        })?;
    let length = read_i32(prefix, LENGTH_POS);
    let min = BATCH_HEADER_BYTES - BATCH_LENGTH_PREFIX_BYTES;
    let max = BATCH_SIZE_BYTES_MAX - BATCH_LENGTH_PREFIX_BYTES;
    if length < 0 || (length as usize) < min || length as usize > max {
        return Err(BatchError::InvalidLength {
            length: i64::from(length),
            min,
            max,
        });
    }
    Ok((
        read_i64(prefix, OFFSET_BASE_POS),
        length as usize + BATCH_LENGTH_PREFIX_BYTES,
    ))
}

/// Parses the fixed header at the start of `buf` without checking the CRC.
///
/// # Errors
/// A short buffer, an invalid length, magic or header field.
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let (_, size) = peek_offset_and_size(buf)?;
    let head = buf.get(..BATCH_HEADER_BYTES).ok_or(BatchError::Truncated {
        needed_bytes: BATCH_HEADER_BYTES,
        available_bytes: buf.len(),
    })?;
    let magic = head[MAGIC_POS] as i8;
    if magic != MAGIC {
        return Err(BatchError::UnsupportedMagic { magic });
    }
    let last_offset_delta = read_i32(head, LAST_OFFSET_DELTA_POS);
    let record_count = read_i32(head, RECORD_COUNT_POS);
    if last_offset_delta < 0 {
        return Err(BatchError::InvalidHeader {
            reason: "last offset delta is negative",
        });
    }
    if record_count < 0 || record_count as usize > BATCH_RECORDS_MAX {
        return Err(BatchError::InvalidHeader {
            reason: "record count is negative or above the limit",
        });
    }
    Ok(BatchHeader {
        base_offset: read_i64(head, OFFSET_BASE_POS),
        batch_length: (size - BATCH_LENGTH_PREFIX_BYTES) as u32,
        leader_epoch: read_i32(head, EPOCH_POS),
        crc: read_i32(head, CRC_POS) as u32,
        attributes: read_i16(head, ATTRIBUTES_POS),
        last_offset_delta,
        base_timestamp_ms: read_i64(head, BASE_TIMESTAMP_POS),
        max_timestamp_ms: read_i64(head, MAX_TIMESTAMP_POS),
        producer_id: read_i64(head, PRODUCER_ID_POS),
        producer_epoch: read_i16(head, PRODUCER_EPOCH_POS),
        base_sequence: read_i32(head, BASE_SEQUENCE_POS),
        record_count: record_count as u32,
    })
}

/// Parses the header of the batch at the start of `buf` and verifies that the whole batch
/// is present and its CRC matches. Bytes after the batch are ignored.
///
/// # Errors
/// Anything [`parse_header`] rejects, a short buffer or a CRC mismatch.
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let (header, batch) = framed(buf)?;
    let computed = crc32c::crc32c(&batch[ATTRIBUTES_POS..]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// The header of the batch at the start of `buf` and its bytes, once `buf` holds all of
/// them; the CRC is not checked.
fn framed(buf: &[u8]) -> Result<(BatchHeader, &[u8]), BatchError> {
    let header = parse_header(buf)?;
    let size = header.size_bytes();
    let batch = buf.get(..size).ok_or(BatchError::Truncated {
        needed_bytes: size,
        available_bytes: buf.len(),
    })?;
    Ok((header, batch))
}

/// Iterates over the consecutive, CRC-checked batches in `buf`, which must hold whole
/// batches only.
pub fn batches(buf: &[u8]) -> Batches<'_> {
    Batches {
        buf,
        pos: 0,
        check_crc: true,
    }
}

/// Like [`batches`], for bytes whose CRCs were checked already in this process (a log
/// read hands over only batches it verified): the headers and lengths are still
/// checked, the CRCs are not computed again.
pub fn batches_verified(buf: &[u8]) -> Batches<'_> {
    Batches {
        buf,
        pos: 0,
        check_crc: false,
    }
}

/// Iterator returned by [`batches`] and [`batches_verified`].
pub struct Batches<'a> {
    buf: &'a [u8],
    pos: usize,
    check_crc: bool,
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.pos..).filter(|rest| !rest.is_empty())?;
        let checked = if self.check_crc {
            validate(rest).map(|header| (header, &rest[..header.size_bytes()]))
        } else {
            framed(rest)
        };
        match checked {
            Ok((header, batch)) => {
                self.pos += batch.len();
                Some(Ok((header, batch)))
            }
            Err(err) => {
                self.pos = self.buf.len();
                Some(Err(err))
            }
        }
    }
}

/// Overwrites the base offset of the batch at the start of `batch` (outside the CRC).
///
/// # Panics
/// If `batch` is shorter than a batch header: callers validate first.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[OFFSET_BASE_POS..OFFSET_BASE_POS + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Overwrites the leader epoch of the batch at the start of `batch` (outside the CRC).
///
/// # Panics
/// If `batch` is shorter than a batch header: callers validate first.
pub fn set_leader_epoch(batch: &mut [u8], leader_epoch: i32) {
    batch[EPOCH_POS..EPOCH_POS + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// Marks the batch as `LogAppendTime` with `append_time_ms` as its max timestamp, and
/// recomputes the CRC (both fields are inside it).
///
/// # Panics
/// If `batch` is shorter than its header says: callers validate first.
pub fn set_log_append_time(batch: &mut [u8], append_time_ms: i64) {
    let attributes = read_i16(batch, ATTRIBUTES_POS) | TIMESTAMP_TYPE_BIT;
    batch[ATTRIBUTES_POS..ATTRIBUTES_POS + 2].copy_from_slice(&attributes.to_be_bytes());
    batch[MAX_TIMESTAMP_POS..MAX_TIMESTAMP_POS + 8].copy_from_slice(&append_time_ms.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_POS..]);
    batch[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Stamps an idempotent producer's id, epoch and the batch's first sequence number into
/// `batch`, and recomputes its CRC (which covers those fields).
///
/// # Panics
/// If `batch` is shorter than its header says: callers validate first.
pub fn set_producer(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    batch[PRODUCER_ID_POS..PRODUCER_ID_POS + 8].copy_from_slice(&producer_id.to_be_bytes());
    batch[PRODUCER_EPOCH_POS..PRODUCER_EPOCH_POS + 2]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    batch[BASE_SEQUENCE_POS..BASE_SEQUENCE_POS + 4].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_POS..]);
    batch[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
}

impl BatchHeader {
    /// The sequence number of the batch's last record (sequences wrap at `i32::MAX`).
    pub fn last_sequence(&self) -> i32 {
        if self.base_sequence < 0 {
            return -1;
        }
        let last = i64::from(self.base_sequence) + i64::from(self.last_offset_delta);
        (last % (i64::from(i32::MAX) + 1)) as i32
    }
}

/// A copy of the batch's fixed header with the base offset and leader epoch stamped, and
/// for `LogAppendTime` the append time and a CRC recomputed over the new header fields
/// and the unchanged records. Writing this header followed by `batch[BATCH_HEADER_BYTES..]`
/// stores the stamped batch without copying its records.
///
/// # Panics
/// If `batch` is shorter than its header says: callers validate first.
pub fn stamp_header(
    batch: &[u8],
    base_offset: i64,
    leader_epoch: i32,
    log_append_time_ms: Option<i64>,
) -> [u8; BATCH_HEADER_BYTES] {
    let mut header = [0u8; BATCH_HEADER_BYTES];
    header.copy_from_slice(&batch[..BATCH_HEADER_BYTES]);
    header[OFFSET_BASE_POS..OFFSET_BASE_POS + 8].copy_from_slice(&base_offset.to_be_bytes());
    header[EPOCH_POS..EPOCH_POS + 4].copy_from_slice(&leader_epoch.to_be_bytes());
    if let Some(append_time_ms) = log_append_time_ms {
        let attributes = read_i16(&header, ATTRIBUTES_POS) | TIMESTAMP_TYPE_BIT;
        header[ATTRIBUTES_POS..ATTRIBUTES_POS + 2].copy_from_slice(&attributes.to_be_bytes());
        header[MAX_TIMESTAMP_POS..MAX_TIMESTAMP_POS + 8]
            .copy_from_slice(&append_time_ms.to_be_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&header[ATTRIBUTES_POS..]),
            &batch[BATCH_HEADER_BYTES..],
        );
        header[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
    }
    header
}

/// Decodes the records of one validated batch (`batch` holds exactly that batch).
/// Offsets and timestamps in the result are absolute; with `LogAppendTime` every record
/// carries the batch's max timestamp. Keys, values and headers are copied out.
///
/// # Errors
/// A malformed header or record, or an unsupported compression codec.
pub fn decode_records(batch: &[u8]) -> Result<Vec<Record>, BatchError> {
    decode_with(batch, None)
}

/// Like [`decode_records`], but keys, values and header values are slices of `batch`
/// (or of one decompressed buffer): no copy and no allocation per field.
///
/// # Errors
/// A malformed header or record, or an unsupported compression codec.
pub fn decode_records_shared(batch: &Bytes) -> Result<Vec<Record>, BatchError> {
    decode_with(batch, Some(batch))
}

/// One record of a batch, borrowed from the batch (or from its decompressed body).
/// Offsets and timestamps are absolute, as in [`decode_records`].
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a, 'h> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Header keys and values in order; header keys are checked to be UTF-8.
    pub headers: &'h [(&'a str, Option<&'a [u8]>)],
}

/// Calls `visit` with every record of one validated batch, in order, copying nothing but
/// the body of a compressed batch (decompressed once).
///
/// # Errors
/// A malformed header or record, or an unsupported compression codec.
pub fn for_each_record(
    batch: &[u8],
    mut visit: impl FnMut(&RecordView<'_, '_>),
) -> Result<(), BatchError> {
    let header = parse_header(batch)?;
    let body = batch_body(batch, &header)?;
    match header.compression()? {
        Compression::None => walk_records(body, &header, |view| visit(view)),
        Compression::Lz4 => {
            let decompressed = lz4_decompress(body)?;
            walk_records(&decompressed, &header, |view| visit(view))
        }
    }
}

/// The records section of a batch (after the header), whole.
fn batch_body<'a>(batch: &'a [u8], header: &BatchHeader) -> Result<&'a [u8], BatchError> {
    batch
        .get(BATCH_HEADER_BYTES..header.size_bytes())
        .ok_or(BatchError::Truncated {
            needed_bytes: header.size_bytes(),
            available_bytes: batch.len(),
        })
}

/// Parses `header.record_count` records from an uncompressed records section.
fn walk_records<'a>(
    body: &'a [u8],
    header: &BatchHeader,
    mut visit: impl FnMut(&RecordView<'a, '_>),
) -> Result<(), BatchError> {
    let mut cursor = varint::Cursor::new(body);
    let mut headers = Vec::new();
    for index in 0..header.record_count as usize {
        let view = parse_record(&mut cursor, header, &mut headers)
            .map_err(|reason| BatchError::InvalidRecord { index, reason })?;
        visit(&view);
    }
    if !cursor.is_empty() {
        return Err(BatchError::InvalidHeader {
            reason: "bytes left after the last record",
        });
    }
    Ok(())
}

fn decode_with(batch: &[u8], shared: Option<&Bytes>) -> Result<Vec<Record>, BatchError> {
    let header = parse_header(batch)?;
    let body = batch_body(batch, &header)?;
    let decompressed;
    let (body, owner) = match header.compression()? {
        Compression::None => (body, shared.cloned()),
        Compression::Lz4 => {
            decompressed = Bytes::from(lz4_decompress(body)?);
            (&decompressed[..], shared.map(|_| decompressed.clone()))
        }
    };
    let to_bytes = |slice: &[u8]| match &owner {
        Some(owner) => owner.slice_ref(slice),
        None => Bytes::copy_from_slice(slice),
    };
    let mut records = Vec::with_capacity(header.record_count as usize);
    walk_records(body, &header, |view| {
        records.push(Record {
            offset: view.offset,
            timestamp_ms: view.timestamp_ms,
            key: view.key.map(to_bytes),
            value: view.value.map(to_bytes),
            headers: view
                .headers
                .iter()
                .map(|(key, value)| Header {
                    key: (*key).to_string(),
                    value: value.map(to_bytes),
                })
                .collect(),
        });
    })?;
    Ok(records)
}

/// Parses one record at `cursor`; its headers go to `headers` (cleared first).
fn parse_record<'a, 'h>(
    cursor: &mut varint::Cursor<'a>,
    header: &BatchHeader,
    headers: &'h mut Vec<(&'a str, Option<&'a [u8]>)>,
) -> Result<RecordView<'a, 'h>, String> {
    let length = cursor.read_varint()?;
    let length = usize::try_from(length).map_err(|_| "negative record length".to_string())?;
    let mut rec = varint::Cursor::new(cursor.take(length)?);
    let _attributes = rec.take(1)?;
    let timestamp_delta = rec.read_varlong()?;
    let offset_delta = rec.read_varint()?;
    if offset_delta < 0 || offset_delta > header.last_offset_delta {
        return Err(format!(
            "offset delta {offset_delta} outside 0..={}",
            header.last_offset_delta
        ));
    }
    let key = rec.read_nullable_bytes()?;
    let value = rec.read_nullable_bytes()?;
    let header_count = rec.read_varint()?;
    let header_count = usize::try_from(header_count)
        .ok()
        .filter(|n| *n <= RECORD_HEADERS_MAX)
        .ok_or_else(|| format!("header count {header_count} is negative or too large"))?;
    headers.clear();
    for _ in 0..header_count {
        let key = rec
            .read_nullable_bytes()?
            .ok_or_else(|| "header key is null".to_string())?;
        let key = std::str::from_utf8(key).map_err(|_| "header key is not UTF-8")?;
        headers.push((key, rec.read_nullable_bytes()?));
    }
    if !rec.is_empty() {
        return Err("bytes left after the record's headers".to_string());
    }
    let timestamp_ms = match header.timestamp_type() {
        TimestampType::LogAppendTime => header.max_timestamp_ms,
        TimestampType::CreateTime => header.base_timestamp_ms.wrapping_add(timestamp_delta),
    };
    Ok(RecordView {
        offset: header.base_offset + i64::from(offset_delta),
        timestamp_ms,
        key,
        value,
        headers,
    })
}

fn lz4_decompress(body: &[u8]) -> Result<Vec<u8>, BatchError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len() * 2);
    let mut decoder = lz4_flex::frame::FrameDecoder::new(body);
    // The limit keeps a decompression bomb from exhausting memory.
    let limit = BATCH_SIZE_BYTES_MAX as u64;
    let read = (&mut decoder)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|err| BatchError::Decompression(err.to_string()))?;
    if read as u64 > limit {
        return Err(BatchError::Decompression(format!(
            "decompressed batch exceeds {limit} bytes"
        )));
    }
    Ok(out)
}

/// Settings of a batch that the producer chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    pub compression: Compression,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub control: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            compression: Compression::None,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
            control: false,
        }
    }
}

/// What a record takes in a batch, worked out once before it is written.
#[derive(Debug, Clone, Copy)]
struct RecordBody {
    timestamp_delta: i64,
    /// How many headers it has.
    headers: i32,
    /// Bytes after the length prefix.
    bytes: usize,
}

/// Builds one batch from records. Offsets are relative to `base_offset` (0 for a producer;
/// the broker stamps the real one), taken from each record's `offset` when
/// `keep_offsets` is set (compaction keeps gaps) and dense otherwise.
///
/// Records are encoded straight into the buffer that becomes the batch, behind room left
/// for the header: a record's bytes are copied once, and an uncompressed batch is built
/// in place.
#[derive(Debug)]
pub struct BatchBuilder {
    options: BatchOptions,
    base_offset: i64,
    base_timestamp_ms: Option<i64>,
    max_timestamp_ms: i64,
    last_offset_delta: i32,
    count: u32,
    /// The header's room (zeros until `build`) followed by the encoded records.
    buf: BytesMut,
}

impl BatchBuilder {
    pub fn new(options: BatchOptions) -> Self {
        Self::with_base_offset(options, 0)
    }

    pub fn with_base_offset(options: BatchOptions, base_offset: i64) -> Self {
        Self::with_base_offset_and_capacity(options, base_offset, 0)
    }

    /// A builder whose buffer starts with room for `capacity_bytes`.
    pub fn with_capacity(options: BatchOptions, capacity_bytes: usize) -> Self {
        Self::with_base_offset_and_capacity(options, 0, capacity_bytes)
    }

    /// A builder that encodes into `buf` (cleared first): a buffer of an earlier batch,
    /// reused so that its memory is not handed back and faulted in again.
    pub fn with_buffer(options: BatchOptions, buf: BytesMut) -> Self {
        Self::with_base_offset_and_buffer(options, 0, buf)
    }

    fn with_base_offset_and_capacity(
        options: BatchOptions,
        base_offset: i64,
        capacity_bytes: usize,
    ) -> Self {
        let buf = BytesMut::with_capacity(capacity_bytes.max(BATCH_HEADER_BYTES));
        Self::with_base_offset_and_buffer(options, base_offset, buf)
    }

    fn with_base_offset_and_buffer(
        options: BatchOptions,
        base_offset: i64,
        mut buf: BytesMut,
    ) -> Self {
        buf.clear();
        buf.put_bytes(0, BATCH_HEADER_BYTES);
        BatchBuilder {
            options,
            base_offset,
            base_timestamp_ms: None,
            max_timestamp_ms: -1,
            last_offset_delta: -1,
            count: 0,
            buf,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Bytes the batch takes uncompressed, header included.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The largest record timestamp so far (-1 while empty).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms
    }

    /// Bytes `record` would add to the batch (uncompressed), its length prefix included.
    pub fn record_size_bytes(&self, record: &Record) -> usize {
        let body = self.next_record_body(&record.parts(), self.last_offset_delta + 1);
        varint::varint_bytes(body.bytes as i32) + body.bytes
    }

    /// Appends a record at the next dense offset.
    pub fn push(&mut self, record: &Record) {
        let delta = self.last_offset_delta + 1;
        self.push_at(&record.parts(), delta);
    }

    /// Appends a record at the next dense offset unless the batch already holds records
    /// and would then take more than `size_bytes_max`; says whether it appended. A first
    /// record is always taken, so that a record larger than the limit still makes a batch
    /// (which the broker then refuses with a clear error).
    pub fn push_within(&mut self, record: &Record, size_bytes_max: usize) -> bool {
        self.push_parts_within(&record.parts(), size_bytes_max)
    }

    /// [`BatchBuilder::push_within`] for a record given by its parts.
    pub fn push_parts_within<'a>(
        &mut self,
        record: &RecordParts<'a, impl HeaderParts<'a>>,
        size_bytes_max: usize,
    ) -> bool {
        let delta = self.last_offset_delta + 1;
        let body = self.next_record_body(record, delta);
        let added = varint::varint_bytes(body.bytes as i32) + body.bytes;
        if !self.is_empty() && self.buf.len() + added > size_bytes_max {
            return false;
        }
        self.write_record(record, delta, &body);
        true
    }

    /// Appends a record at `record.offset` (absolute); offsets must increase.
    ///
    /// # Panics
    /// If the offset does not increase or does not fit the batch: a programmer error.
    pub fn push_keeping_offset(&mut self, record: &Record) {
        let delta = i32::try_from(record.offset - self.base_offset).expect("offset fits batch");
        assert!(delta > self.last_offset_delta, "offsets must increase");
        self.push_at(&record.parts(), delta);
    }

    /// Makes the batch's last offset `base_offset + last_offset_delta` even when trailing
    /// records were removed (compaction keeps the batch's offset span).
    pub fn set_last_offset_delta(&mut self, last_offset_delta: i32) {
        assert!(last_offset_delta >= self.last_offset_delta);
        self.last_offset_delta = last_offset_delta;
    }

    fn push_at<'a>(&mut self, record: &RecordParts<'a, impl HeaderParts<'a>>, offset_delta: i32) {
        let body = self.next_record_body(record, offset_delta);
        self.write_record(record, offset_delta, &body);
    }

    /// What `record` takes in this batch (its body, after the length prefix).
    fn next_record_body<'a>(
        &self,
        record: &RecordParts<'a, impl HeaderParts<'a>>,
        offset_delta: i32,
    ) -> RecordBody {
        let base_ts = self.base_timestamp_ms.unwrap_or(record.timestamp_ms);
        let timestamp_delta = record.timestamp_ms.wrapping_sub(base_ts);
        let (headers, headers_bytes) =
            record
                .headers
                .clone()
                .fold((0, 0), |(count, bytes), (key, value)| {
                    (
                        count + 1,
                        bytes
                            + varint::nullable_bytes_len(Some(key))
                            + varint::nullable_bytes_len(value),
                    )
                });
        let bytes = 1
            + varint::varlong_bytes(timestamp_delta)
            + varint::varint_bytes(offset_delta)
            + varint::nullable_bytes_len(record.key)
            + varint::nullable_bytes_len(record.value)
            + varint::varint_bytes(headers)
            + headers_bytes;
        RecordBody {
            timestamp_delta,
            headers,
            bytes,
        }
    }

    fn write_record<'a>(
        &mut self,
        record: &RecordParts<'a, impl HeaderParts<'a>>,
        offset_delta: i32,
        body: &RecordBody,
    ) {
        let RecordBody {
            timestamp_delta,
            headers,
            bytes: body,
        } = *body;
        self.base_timestamp_ms.get_or_insert(record.timestamp_ms);
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        let out = &mut self.buf;
        out.reserve(varint::varint_bytes(body as i32) + body);
        varint::put_varint(out, body as i32);
        out.put_u8(0);
        varint::put_varlong(out, timestamp_delta);
        varint::put_varint(out, offset_delta);
        varint::put_nullable_bytes(out, record.key);
        varint::put_nullable_bytes(out, record.value);
        varint::put_varint(out, headers);
        for (key, value) in record.headers.clone() {
            varint::put_nullable_bytes(out, Some(key));
            varint::put_nullable_bytes(out, value);
        }
        self.last_offset_delta = offset_delta;
        self.count += 1;
    }

    /// Encodes the batch. An empty builder gives a batch with no records.
    pub fn build(self) -> Bytes {
        let mut out = match self.options.compression {
            Compression::None => self.buf,
            Compression::Lz4 => {
                let records = self.buf.get(BATCH_HEADER_BYTES..).unwrap_or_default();
                let compressed = lz4_compress(records);
                let mut out = BytesMut::with_capacity(BATCH_HEADER_BYTES + compressed.len());
                out.put_bytes(0, BATCH_HEADER_BYTES);
                out.extend_from_slice(&compressed);
                out
            }
        };
        let batch_length = out.len() - BATCH_LENGTH_PREFIX_BYTES;
        let mut attributes = self.options.compression.code();
        if self.options.transactional {
            attributes |= TRANSACTIONAL_BIT;
        }
        if self.options.control {
            attributes |= CONTROL_BIT;
        }
        let mut header = &mut out[..BATCH_HEADER_BYTES];
        header.put_i64(self.base_offset);
        header.put_i32(batch_length as i32);
        header.put_i32(-1);
        header.put_i8(MAGIC);
        header.put_u32(0);
        header.put_i16(attributes);
        header.put_i32(self.last_offset_delta.max(0));
        header.put_i64(self.base_timestamp_ms.unwrap_or(-1));
        header.put_i64(self.max_timestamp_ms);
        header.put_i64(self.options.producer_id);
        header.put_i16(self.options.producer_epoch);
        header.put_i32(self.options.base_sequence);
        header.put_i32(self.count as i32);
        let crc = crc32c::crc32c(&out[ATTRIBUTES_POS..]);
        out[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
        out.freeze()
    }
}

/// Bytes of a record after its length prefix.
fn lz4_compress(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(raw.len() / 2));
    encoder
        .write_all(raw)
        .and_then(|()| encoder.flush())
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Encodes `records` into a single batch with dense offsets from 0.
pub fn encode(records: &[Record], options: BatchOptions) -> Bytes {
    let mut builder = BatchBuilder::new(options);
    for record in records {
        builder.push(record);
    }
    builder.build()
}

/// The kind of a transaction marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

impl ControlType {
    fn code(self) -> i16 {
        match self {
            ControlType::Abort => 0,
            ControlType::Commit => 1,
        }
    }
}

/// A transaction marker: a control batch of one record, with base offset 0 (the broker
/// stamps the real one) and base sequence −1.
pub fn control_batch(
    kind: ControlType,
    producer_id: i64,
    producer_epoch: i16,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Bytes {
    let mut key = BytesMut::with_capacity(4);
    key.put_i16(0);
    key.put_i16(kind.code());
    let mut value = BytesMut::with_capacity(6);
    value.put_i16(0);
    value.put_i32(coordinator_epoch);
    let record = Record {
        offset: 0,
        timestamp_ms,
        key: Some(key.freeze()),
        value: Some(value.freeze()),
        headers: Vec::new(),
    };
    encode(
        &[record],
        BatchOptions {
            producer_id,
            producer_epoch,
            transactional: true,
            control: true,
            ..BatchOptions::default()
        },
    )
}

/// The marker a control batch holds (`batch` holds exactly that batch).
///
/// # Errors
/// Not a control batch, or its record is not a marker.
pub fn control_type(batch: &[u8]) -> Result<ControlType, BatchError> {
    let header = parse_header(batch)?;
    if !header.is_control() {
        return Err(BatchError::InvalidHeader {
            reason: "not a control batch",
        });
    }
    let records = decode_records(batch)?;
    let key = records
        .first()
        .and_then(|r| r.key.as_deref())
        .filter(|k| k.len() >= 4)
        .ok_or(BatchError::InvalidHeader {
            reason: "a control batch without a marker key",
        })?;
    match read_i16(key, 2) {
        0 => Ok(ControlType::Abort),
        1 => Ok(ControlType::Commit),
        _ => Err(BatchError::InvalidHeader {
            reason: "a control record of an unknown type",
        }),
    }
}

/// How a `read_committed` reader drops the records of aborted transactions (Kafka's
/// algorithm): the fetch lists each aborted transaction in range as (producer id, first
/// offset); from that offset on, the producer's transactional batches are dropped until
/// its abort marker. Control batches are never records for the application.
#[derive(Debug, Default)]
pub struct AbortedFilter {
    /// Not reached yet, sorted by first offset (largest first, popped from the end).
    pending: Vec<(i64, i64)>,
    /// Producers whose batches are being dropped.
    active: Vec<i64>,
}

impl AbortedFilter {
    /// A filter for one fetched range, from its list of (producer id, first offset).
    pub fn new(aborted: impl IntoIterator<Item = (i64, i64)>) -> Self {
        let mut pending: Vec<(i64, i64)> = aborted.into_iter().collect();
        pending.sort_by_key(|&(_, first)| std::cmp::Reverse(first));
        AbortedFilter {
            pending,
            active: Vec::new(),
        }
    }

    /// Whether the batch's records go to the application (`batch` holds exactly it);
    /// batches are passed in offset order.
    pub fn keep(&mut self, header: &BatchHeader, batch: &[u8]) -> bool {
        while let Some(&(producer, first)) = self.pending.last() {
            if first > header.last_offset() {
                break;
            }
            self.pending.pop();
            if !self.active.contains(&producer) {
                self.active.push(producer);
            }
        }
        if header.is_control() {
            if control_type(batch) == Ok(ControlType::Abort) {
                self.active.retain(|&p| p != header.producer_id);
            }
            return false;
        }
        !(header.is_transactional() && self.active.contains(&header.producer_id))
    }
}

#[cfg(test)]
mod tests;
