//! The protobuf codec of every Runnel service (generated code names it through
//! `codec_path`): prost, with an encoder that sizes its buffer for the whole message first.
//!
//! tonic's default prost codec lets the encode buffer grow as prost writes into it, so a
//! 1 MiB produce request or a 16 MiB fetch response is copied again at every doubling of
//! the buffer. Reserving `encoded_len` up front makes the record bytes' trip into the
//! HTTP/2 body a single copy. Decoding is prost's: `bytes` fields are slices of the
//! received buffer, not copies.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Initial size of tonic's per-call encode and decode buffers.
const BUFFER_BYTES: usize = 64 * 1024;
/// Encoded messages are handed to HTTP/2 once this much is buffered.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Encodes `T` and decodes `U` with prost.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder { _type: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder { _type: PhantomData }
    }
}

#[derive(Debug)]
pub struct ProstEncoder<T> {
    _type: PhantomData<T>,
}

impl<T: Message> Encoder for ProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|err| Status::internal(format!("encoding a message failed: {err}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

#[derive(Debug)]
pub struct ProstDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        Message::decode(buf)
            .map(Some)
            .map_err(|err| Status::internal(format!("decoding a message failed: {err}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}
