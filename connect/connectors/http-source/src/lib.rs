//! HTTP source: polls an endpoint at an interval and produces the JSON items it returns.
//!
//! Config:
//! - `url` (required): `http://HOST:PORT/PATH`; grant `HOST:PORT` under
//!   `capabilities.network`.
//! - `interval-ms`: time between polls when there is nothing new (default 1000).
//! - `records-pointer`: JSON pointer to the array of items in the response (default: the
//!   response is the array).
//! - `cursor-pointer`: JSON pointer to the next cursor in the response; with
//!   `cursor-param`, the cursor is sent back as that query parameter, and it is the
//!   connector's committed position, so a restart resumes after the last items produced.
//!   Without a cursor every poll produces what the endpoint returns.
//! - `key-pointer`: JSON pointer, inside each item, to the record key.
//! - `header.NAME`: extra request headers.
//!
//! Each item becomes a record whose value is the item as compact JSON. A connection
//! failure, 5xx, 408 or 429 is retried with backoff; another 4xx stops the connector.

use std::time::{Duration, Instant};

use connector_common::http::{self, Url};
use connector_common::{number, required};
use runnel_sdk::Config;
use runnel_sdk::connect::{Batch, Failure, Source};
use serde_json::Value;

struct HttpSource {
    url: Url,
    interval: Duration,
    records_pointer: String,
    cursor_pointer: Option<String>,
    cursor_param: Option<String>,
    key_pointer: Option<String>,
    headers: Vec<(String, String)>,
    cursor: Option<String>,
    next_poll: Option<Instant>,
}

fn cursor_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl Source for HttpSource {
    fn open(config: &Config, position: Option<&[u8]>) -> Result<Self, Failure> {
        let url =
            Url::parse(required(config, "url")?).map_err(|m| connector_common::bad("url", m))?;
        http::check_granted(&url)?;
        let interval_ms: u64 = number(config, "interval-ms", 1000)?;
        let cursor_param = config.get("cursor-param").map(str::to_string);
        let cursor_pointer = config.get("cursor-pointer").map(str::to_string);
        if cursor_param.is_some() != cursor_pointer.is_some() {
            return Err(connector_common::bad(
                "cursor-param",
                "cursor-param and cursor-pointer go together; give both or neither",
            ));
        }
        Ok(HttpSource {
            url,
            interval: Duration::from_millis(interval_ms),
            records_pointer: config.get("records-pointer").unwrap_or("").to_string(),
            cursor_pointer,
            cursor_param,
            key_pointer: config.get("key-pointer").map(str::to_string),
            headers: http::config_headers(config),
            cursor: position.map(|p| String::from_utf8_lossy(p).into_owned()),
            next_poll: None,
        })
    }

    fn poll(&mut self, batch: &mut Batch) -> Result<(), Failure> {
        let now = Instant::now();
        if let Some(next) = self.next_poll
            && next > now
        {
            batch.idle((next - now).as_millis().clamp(1, u128::from(u32::MAX)) as u32);
            return Ok(());
        }
        let url = match (&self.cursor_param, &self.cursor) {
            (Some(param), Some(cursor)) => self.url.with_param(param, cursor),
            _ => self.url.clone(),
        };
        let response = http::request("GET", &url, &self.headers, &[])
            .map_err(|err| http::connect_failure(&url, &err))?;
        if http::transient(response.status) {
            return Err(Failure::Retry(format!(
                "the endpoint answered HTTP {}: {}",
                response.status,
                response.excerpt()
            )));
        }
        if !(200..300).contains(&response.status) {
            return Err(Failure::Fatal(format!(
                "the endpoint refused the request with HTTP {}: {}",
                response.status,
                response.excerpt()
            )));
        }
        let body: Value = serde_json::from_slice(&response.body).map_err(|err| {
            Failure::Retry(format!(
                "the endpoint did not return JSON ({err}): {}",
                response.excerpt()
            ))
        })?;
        let items = match body.pointer(&self.records_pointer) {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => {
                return Err(Failure::Fatal(format!(
                    "config records-pointer: {:?} does not point at an array in the response",
                    self.records_pointer
                )));
            }
        };
        let new_cursor = self
            .cursor_pointer
            .as_ref()
            .and_then(|p| body.pointer(p))
            .and_then(cursor_text);
        for item in &items {
            let key = self
                .key_pointer
                .as_ref()
                .and_then(|p| item.pointer(p))
                .map(|k| match k {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            let value = item.to_string();
            batch.emit(key.as_deref().map(str::as_bytes), Some(value.as_bytes()));
        }
        let advanced = new_cursor.is_some() && new_cursor != self.cursor;
        if let Some(cursor) = new_cursor {
            self.cursor = Some(cursor);
        }
        if let Some(cursor) = &self.cursor {
            batch.set_position(cursor.clone());
        }
        // More pages may be waiting while the cursor moves; otherwise wait an interval.
        self.next_poll = if advanced && !items.is_empty() {
            None
        } else {
            Some(now + self.interval)
        };
        if batch.is_empty() {
            batch.idle(self.interval.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        }
        Ok(())
    }
}

runnel_sdk::export_source!(HttpSource);
