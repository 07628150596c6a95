//! HTTP sink: POSTs records to an endpoint.
//!
//! Config:
//! - `url` (required): `http://HOST:PORT/PATH`; grant `HOST:PORT` under
//!   `capabilities.network`.
//! - `batch`: `false` (default) sends one request per record, its value as the body;
//!   `true` sends the records of a write as one JSON array (values that are JSON are
//!   embedded as they are, others as JSON strings).
//! - `batch-size`: records per request in batch mode (default 500).
//! - `method`: `POST` (default) or `PUT`.
//! - `content-type`: default `application/json`.
//! - `header.NAME`: extra request headers, e.g. `header.Authorization: Bearer ${secrets.TOKEN}`.
//!
//! A 2xx answer is success. A connection failure, 5xx, 408 or 429 is transient: the host
//! retries the batch with backoff. Any other 4xx refuses the records of that request,
//! which go to the error policy (dead-letter them to keep going). In single mode a
//! record's key, when present, is sent as header `Runnel-Key`.

use connector_common::http::{self, Url};
use connector_common::{flag, number, required};
use runnel_sdk::connect::{Failure, Sink, WriteError};
use runnel_sdk::{Config, Record};

struct HttpSink {
    url: Url,
    method: String,
    batch: bool,
    batch_size: usize,
    headers: Vec<(String, String)>,
}

/// Appends a record's value to a JSON array body.
fn push_json(body: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => body.extend_from_slice(b"null"),
        Some(v) if serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok() => {
            body.extend_from_slice(v);
        }
        Some(v) => {
            let text = String::from_utf8_lossy(v);
            let _ = serde_json::to_writer(&mut *body, &text);
        }
    }
}

impl HttpSink {
    /// Sends one request; `Ok(None)` on success, `Ok(Some(reason))` when refused for good.
    fn send(&self, body: &[u8], key: Option<&[u8]>) -> Result<Option<String>, WriteError> {
        let mut headers = self.headers.clone();
        if let Some(key) = key {
            headers.push((
                "Runnel-Key".into(),
                String::from_utf8_lossy(key).into_owned(),
            ));
        }
        let response = http::request(&self.method, &self.url, &headers, body)
            .map_err(|err| WriteError::from(http::connect_failure(&self.url, &err)))?;
        match response.status {
            200..=299 => Ok(None),
            status if http::transient(status) => Err(WriteError::Retry(format!(
                "the endpoint answered HTTP {status}: {}",
                response.excerpt()
            ))),
            status => Ok(Some(format!(
                "the endpoint refused the record with HTTP {status}: {}",
                response.excerpt()
            ))),
        }
    }
}

impl Sink for HttpSink {
    fn open(config: &Config) -> Result<Self, Failure> {
        let url =
            Url::parse(required(config, "url")?).map_err(|m| connector_common::bad("url", m))?;
        http::check_granted(&url)?;
        let method = config.get("method").unwrap_or("POST").to_ascii_uppercase();
        if method != "POST" && method != "PUT" {
            return Err(connector_common::bad(
                "method",
                format!("{method:?} is not POST or PUT"),
            ));
        }
        let batch_size: usize = number(config, "batch-size", 500)?;
        if batch_size == 0 {
            return Err(connector_common::bad("batch-size", "must be at least 1"));
        }
        let mut headers = http::config_headers(config);
        headers.push((
            "Content-Type".into(),
            config
                .get("content-type")
                .unwrap_or("application/json")
                .to_string(),
        ));
        Ok(HttpSink {
            url,
            method,
            batch: flag(config, "batch", false)?,
            batch_size,
            headers,
        })
    }

    fn write(&mut self, _topic: &str, records: &[Record<'_>]) -> Result<(), WriteError> {
        let mut rejected = Vec::new();
        if self.batch {
            for (chunk_index, chunk) in records.chunks(self.batch_size).enumerate() {
                let mut body = vec![b'['];
                for (i, record) in chunk.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    push_json(&mut body, record.value());
                }
                body.push(b']');
                if let Some(reason) = self.send(&body, None)? {
                    let base = chunk_index * self.batch_size;
                    rejected.extend((0..chunk.len()).map(|i| ((base + i) as u32, reason.clone())));
                }
            }
        } else {
            for (i, record) in records.iter().enumerate() {
                if let Some(reason) = self.send(record.value().unwrap_or_default(), record.key())? {
                    rejected.push((i as u32, reason));
                }
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(WriteError::Rejected(rejected))
        }
    }
}

runnel_sdk::export_sink!(HttpSink);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_embedded_and_text_is_quoted() {
        let mut body = Vec::new();
        push_json(&mut body, Some(b"{\"n\":1}"));
        body.push(b',');
        push_json(&mut body, Some(b"plain \"text\""));
        body.push(b',');
        push_json(&mut body, None);
        assert_eq!(
            String::from_utf8(body).expect("UTF-8"),
            "{\"n\":1},\"plain \\\"text\\\"\",null"
        );
    }
}
