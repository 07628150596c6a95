//! The PostgreSQL frontend/backend protocol (version 3), as much as the sink needs:
//! start-up with trust, cleartext, MD5 or SCRAM-SHA-256 authentication, and simple
//! queries.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// An error the server reported, with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// Errors worth retrying: connection trouble, serialization failures and deadlocks,
    /// resource exhaustion, a server shutting down.
    pub fn transient(&self) -> bool {
        ["08", "40", "53", "57"]
            .iter()
            .any(|c| self.code.starts_with(c))
    }
}

#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    Server(ServerError),
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(err) => write!(f, "{err}"),
            Error::Server(err) => write!(f, "{} (SQLSTATE {})", err.message, err.code),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Io(err)
    }
}

pub struct Connection {
    /// Reads are buffered; writes go to the stream inside (`try_clone` is not available
    /// in WASI).
    stream: BufReader<TcpStream>,
}

fn message(kind: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    if let Some(kind) = kind {
        out.push(kind);
    }
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

fn parse_error(body: &[u8]) -> ServerError {
    let mut code = String::new();
    let mut text = String::new();
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, value)) = field.split_first() {
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'C' => code = value,
                b'M' => text = value,
                _ => {}
            }
        }
    }
    ServerError {
        code,
        message: text,
    }
}

fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::new();
    for _ in 0..3 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        bytes.extend_from_slice(&h.finish().to_le_bytes());
    }
    B64.encode(bytes)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl Connection {
    /// Connects and authenticates.
    ///
    /// # Errors
    /// Connection, authentication or protocol failures.
    pub fn connect(
        host: &str,
        port: u16,
        user: &str,
        password: Option<&str>,
        database: &str,
    ) -> Result<Connection, Error> {
        let stream = TcpStream::connect((host, port))?;
        let mut conn = Connection {
            stream: BufReader::new(stream),
        };
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes());
        cstr(&mut body, "user");
        cstr(&mut body, user);
        cstr(&mut body, "database");
        cstr(&mut body, database);
        cstr(&mut body, "client_encoding");
        cstr(&mut body, "UTF8");
        body.push(0);
        conn.send(&message(None, &body))?;
        let need_password = || {
            password.ok_or_else(|| {
                Error::Protocol(
                    "the server asks for a password; set config password (use a secret)".into(),
                )
            })
        };
        let mut scram: Option<(String, String)> = None;
        loop {
            let (kind, body) = conn.read()?;
            match kind {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or_else(|| Error::Protocol("short authentication message".into()))?;
                    match code {
                        0 => {}
                        3 => {
                            let mut out = Vec::new();
                            cstr(&mut out, need_password()?);
                            conn.send(&message(Some(b'p'), &out))?;
                        }
                        5 => {
                            let salt = body.get(4..8).unwrap_or_default();
                            let inner = format!(
                                "{:x}",
                                md5::Md5::digest(format!("{}{user}", need_password()?))
                            );
                            let mut salted = inner.into_bytes();
                            salted.extend_from_slice(salt);
                            let mut out = Vec::new();
                            cstr(&mut out, &format!("md5{:x}", md5::Md5::digest(&salted)));
                            conn.send(&message(Some(b'p'), &out))?;
                        }
                        10 => {
                            need_password()?;
                            let client_nonce = nonce();
                            let first_bare = format!("n=,r={client_nonce}");
                            let first = format!("n,,{first_bare}");
                            let mut out = Vec::new();
                            cstr(&mut out, "SCRAM-SHA-256");
                            out.extend_from_slice(&(first.len() as u32).to_be_bytes());
                            out.extend_from_slice(first.as_bytes());
                            conn.send(&message(Some(b'p'), &out))?;
                            scram = Some((client_nonce, first_bare));
                        }
                        11 => {
                            let (client_nonce, first_bare) = scram
                                .clone()
                                .ok_or_else(|| Error::Protocol("SCRAM out of order".into()))?;
                            let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
                            let mut nonce = "";
                            let mut salt = "";
                            let mut iterations = 0u32;
                            for part in server_first.split(',') {
                                if let Some(v) = part.strip_prefix("r=") {
                                    nonce = v;
                                } else if let Some(v) = part.strip_prefix("s=") {
                                    salt = v;
                                } else if let Some(v) = part.strip_prefix("i=") {
                                    iterations = v.parse().unwrap_or(0);
                                }
                            }
                            if !nonce.starts_with(&client_nonce) || iterations == 0 {
                                return Err(Error::Protocol("a malformed SCRAM challenge".into()));
                            }
                            let salt = B64
                                .decode(salt)
                                .map_err(|_| Error::Protocol("a malformed SCRAM salt".into()))?;
                            let mut salted = [0u8; 32];
                            pbkdf2::pbkdf2_hmac::<Sha256>(
                                need_password()?.as_bytes(),
                                &salt,
                                iterations,
                                &mut salted,
                            );
                            let client_key = hmac(&salted, b"Client Key");
                            let stored_key = Sha256::digest(&client_key);
                            let without_proof = format!("c=biws,r={nonce}");
                            let auth = format!("{first_bare},{server_first},{without_proof}");
                            let signature = hmac(&stored_key, auth.as_bytes());
                            let proof: Vec<u8> = client_key
                                .iter()
                                .zip(&signature)
                                .map(|(a, b)| a ^ b)
                                .collect();
                            let last = format!("{without_proof},p={}", B64.encode(proof));
                            conn.send(&message(Some(b'p'), last.as_bytes()))?;
                        }
                        12 => {}
                        other => {
                            return Err(Error::Protocol(format!(
                                "unsupported authentication method {other}"
                            )));
                        }
                    }
                }
                b'E' => return Err(Error::Server(parse_error(&body))),
                b'Z' => return Ok(conn),
                _ => {}
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(bytes)
    }

    fn read(&mut self) -> Result<(u8, Vec<u8>), Error> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=(1 << 30)).contains(&len) {
            return Err(Error::Protocol(format!("a message of {len} bytes")));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Runs SQL (one or more statements) with the simple query protocol; the first
    /// error, if any, after the server is ready again.
    ///
    /// # Errors
    /// The server's error, or a connection failure.
    pub fn execute(&mut self, sql: &str) -> Result<(), Error> {
        let mut body = Vec::with_capacity(sql.len() + 1);
        cstr(&mut body, sql);
        self.send(&message(Some(b'Q'), &body))?;
        let mut failed = None;
        loop {
            let (kind, body) = self.read()?;
            match kind {
                b'E' => {
                    failed.get_or_insert(parse_error(&body));
                }
                b'Z' => {
                    return match failed {
                        Some(err) => Err(Error::Server(err)),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }
}
