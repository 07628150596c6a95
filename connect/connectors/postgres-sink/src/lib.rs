//! PostgreSQL sink: upserts records into a table by key, one database transaction per
//! batch.
//!
//! Config:
//! - `host` (default `127.0.0.1`), `port` (default 5432), `user` (default `postgres`),
//!   `password` (give it as a secret: `password: ${secrets.PG_PASSWORD}`), `database`
//!   (default `postgres`); grant `HOST:PORT` under `capabilities.network`. Trust,
//!   cleartext, MD5 and SCRAM-SHA-256 authentication are supported; TLS is not.
//! - `table` (required), optionally `schema.table`.
//! - `key-column` (default `key`): the record key goes here; it must be the table's
//!   primary key or have a unique constraint.
//! - `value-column` (default `value`): the record value, as text.
//! - `columns`: instead of `value-column`, a comma-separated list of columns filled from
//!   the fields of each value, which must then be a JSON object (a missing field is NULL).
//!
//! Per batch: `BEGIN; INSERT ... ON CONFLICT (key) DO UPDATE ...; DELETE ...; COMMIT`.
//! Within a batch the last record of a key wins; a tombstone (no value) deletes the row.
//! A connection problem, deadlock or serialization failure is retried with backoff. Any
//! other error rolls the batch back; the records are then written one per transaction
//! to find those the database refuses, which go to the error policy.

mod wire;

use std::collections::HashMap;

use connector_common::{number, required};
use runnel_sdk::connect::{Failure, Sink, WriteError};
use runnel_sdk::{Config, Record};
use serde_json::Value;

struct PostgresSink {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
    table: String,
    key_column: String,
    /// The columns written besides the key: the value column, or with `json` the fields of
    /// the JSON value that go to the columns of the same name.
    columns: Vec<String>,
    json: bool,
    conn: Option<wire::Connection>,
}

/// `"name"`, or `"schema"."name"`.
fn ident(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A string literal; `None` if the text holds a NUL byte, which PostgreSQL text cannot.
fn literal(text: &str) -> Option<String> {
    if text.contains('\0') {
        return None;
    }
    Some(format!("'{}'", text.replace('\'', "''")))
}

fn json_literal(value: Option<&Value>) -> Option<String> {
    match value {
        None | Some(Value::Null) => Some("NULL".into()),
        Some(Value::String(s)) => literal(s),
        Some(Value::Bool(b)) => Some(if *b {
            "'true'".into()
        } else {
            "'false'".into()
        }),
        Some(other) => literal(&other.to_string()),
    }
}

/// One record's row: key literal and column literals (`None` for a tombstone).
type Row = (String, Option<Vec<String>>);

impl PostgresSink {
    fn failure(&mut self, err: wire::Error) -> WriteError {
        let transient = match &err {
            wire::Error::Io(_) | wire::Error::Protocol(_) => true,
            wire::Error::Server(e) => e.transient(),
        };
        if transient {
            // The connection may be broken: reconnect on the next try.
            self.conn = None;
            WriteError::Retry(format!("PostgreSQL at {}:{}: {err}", self.host, self.port))
        } else {
            WriteError::Fatal(format!("PostgreSQL: {err}"))
        }
    }

    /// Connects unless connected. A refusal by the server (a wrong password, an unknown
    /// database) is fatal; anything else is retried.
    fn connect(&mut self) -> Result<(), Failure> {
        if self.conn.is_some() {
            return Ok(());
        }
        let conn = wire::Connection::connect(
            &self.host,
            self.port,
            &self.user,
            self.password.as_deref(),
            &self.database,
        );
        match conn {
            Ok(conn) => {
                self.conn = Some(conn);
                Ok(())
            }
            Err(wire::Error::Server(err)) if !err.transient() => Err(Failure::Fatal(format!(
                "PostgreSQL at {}:{} refused the connection: {} (SQLSTATE {})",
                self.host, self.port, err.message, err.code
            ))),
            Err(err) => Err(Failure::Retry(format!(
                "PostgreSQL at {}:{}: {err}",
                self.host, self.port
            ))),
        }
    }

    fn row(&self, record: &Record<'_>) -> Result<Row, String> {
        let key = record
            .key_str()
            .ok_or("the record has no key (or it is not UTF-8): a row is upserted by key")?;
        let key = literal(key).ok_or("the key holds a NUL byte")?;
        let Some(value) = record.value() else {
            return Ok((key, None));
        };
        let values = if !self.json {
            let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8")?;
            vec![literal(text).ok_or("the value holds a NUL byte")?]
        } else {
            let object: Value = serde_json::from_slice(value)
                .map_err(|err| format!("the value is not JSON: {err}"))?;
            if !object.is_object() {
                return Err("the value is not a JSON object".into());
            }
            let mut values = Vec::new();
            for field in &self.columns {
                values.push(
                    json_literal(object.get(field))
                        .ok_or_else(|| format!("field {field:?} holds a NUL byte"))?,
                );
            }
            values
        };
        Ok((key, Some(values)))
    }

    /// The SQL of one transaction writing `rows` (last row of a key wins).
    fn sql(&self, rows: &[&Row]) -> String {
        let mut latest: HashMap<&str, &Row> = HashMap::new();
        let mut order = Vec::new();
        for row in rows {
            if latest.insert(row.0.as_str(), row).is_none() {
                order.push(row.0.as_str());
            }
        }
        let table = ident(&self.table);
        let key = ident(&self.key_column);
        let columns: Vec<String> = self.columns.iter().map(|c| ident(c)).collect();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for k in order {
            match &latest[k].1 {
                Some(values) => upserts.push(format!("({k}, {})", values.join(", "))),
                None => deletes.push(k.to_string()),
            }
        }
        let mut sql = String::from("BEGIN;");
        if !upserts.is_empty() {
            let updates: Vec<String> = columns
                .iter()
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            sql.push_str(&format!(
                "INSERT INTO {table} ({key}, {}) VALUES {} ON CONFLICT ({key}) DO UPDATE SET {};",
                columns.join(", "),
                upserts.join(", "),
                updates.join(", ")
            ));
        }
        if !deletes.is_empty() {
            sql.push_str(&format!(
                "DELETE FROM {table} WHERE {key} IN ({});",
                deletes.join(", ")
            ));
        }
        sql.push_str("COMMIT;");
        sql
    }

    fn run(&mut self, sql: &str) -> Result<(), wire::Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(wire::Error::Protocol("the connection was lost".into()));
        };
        let result = conn.execute(sql);
        if result.is_err() && conn.execute("ROLLBACK;").is_err() {
            // Leave no transaction open on the connection, or no connection.
            self.conn = None;
        }
        result
    }
}

impl Sink for PostgresSink {
    fn open(config: &Config) -> Result<Self, Failure> {
        let host = config.get("host").unwrap_or("127.0.0.1").to_string();
        let port: u16 = number(config, "port", 5432)?;
        let granted = format!("{host}:{port}");
        if !runnel_sdk::connect::granted_hosts().contains(&granted) {
            return Err(Failure::Fatal(format!(
                "capability denied: {granted} is not granted; add it in the connector file: \
                 capabilities: {{ network: [\"{granted}\"] }}"
            )));
        }
        let (columns, json) = match config.get("columns") {
            Some(list) => (
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                true,
            ),
            None => (
                vec![config.get("value-column").unwrap_or("value").to_string()],
                false,
            ),
        };
        if columns.is_empty() {
            return Err(connector_common::bad("columns", "list at least one column"));
        }
        let mut sink = PostgresSink {
            host,
            port,
            user: config.get("user").unwrap_or("postgres").to_string(),
            password: config.get("password").map(str::to_string),
            database: config.get("database").unwrap_or("postgres").to_string(),
            table: required(config, "table")?.to_string(),
            key_column: config.get("key-column").unwrap_or("key").to_string(),
            columns,
            json,
            conn: None,
        };
        sink.connect()?;
        Ok(sink)
    }

    fn write(&mut self, _topic: &str, records: &[Record<'_>]) -> Result<(), WriteError> {
        let mut rows: Vec<(usize, Row)> = Vec::with_capacity(records.len());
        let mut rejected: Vec<(u32, String)> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            match self.row(record) {
                Ok(row) => rows.push((i, row)),
                Err(reason) => rejected.push((i as u32, reason)),
            }
        }
        if !rows.is_empty() {
            self.connect()?;
            let all: Vec<&Row> = rows.iter().map(|(_, r)| r).collect();
            let sql = self.sql(&all);
            if let Err(err) = self.run(&sql) {
                match self.failure(err) {
                    WriteError::Fatal(_) => {
                        // Find the rows the database refuses, one transaction each.
                        for (i, row) in &rows {
                            let sql = self.sql(&[row]);
                            if let Err(err) = self.run(&sql) {
                                match self.failure(err) {
                                    WriteError::Fatal(m) => rejected.push((*i as u32, m)),
                                    other => return Err(other),
                                }
                            }
                        }
                    }
                    other => return Err(other),
                }
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            rejected.sort_by_key(|(i, _)| *i);
            Err(WriteError::Rejected(rejected))
        }
    }
}

runnel_sdk::export_sink!(PostgresSink);

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(columns: Vec<String>, json: bool) -> PostgresSink {
        PostgresSink {
            host: "h".into(),
            port: 5432,
            user: "u".into(),
            password: None,
            database: "d".into(),
            table: "app.users".into(),
            key_column: "id".into(),
            columns,
            json,
            conn: None,
        }
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("app.users"), "\"app\".\"users\"");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("O'Brien").as_deref(), Some("'O''Brien'"));
        assert_eq!(literal("nul\0byte"), None);
        assert_eq!(json_literal(None).as_deref(), Some("NULL"));
        assert_eq!(
            json_literal(Some(&serde_json::json!({"a": 1}))).as_deref(),
            Some("'{\"a\":1}'")
        );
    }

    #[test]
    fn a_batch_is_one_transaction_where_the_last_record_of_a_key_wins() {
        let sink = sink(vec!["value".into()], false);
        let rows: Vec<Row> = vec![
            ("'a'".into(), Some(vec!["'1'".into()])),
            ("'b'".into(), Some(vec!["'2'".into()])),
            ("'a'".into(), Some(vec!["'3'".into()])),
            ("'b'".into(), None),
        ];
        let refs: Vec<&Row> = rows.iter().collect();
        assert_eq!(
            sink.sql(&refs),
            "BEGIN;INSERT INTO \"app\".\"users\" (\"id\", \"value\") VALUES ('a', '3') \
             ON CONFLICT (\"id\") DO UPDATE SET \"value\" = EXCLUDED.\"value\";\
             DELETE FROM \"app\".\"users\" WHERE \"id\" IN ('b');COMMIT;"
        );
    }
}
