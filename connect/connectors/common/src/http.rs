//! A small HTTP/1.1 client over `std::net::TcpStream`, enough for the HTTP connectors:
//! one request per connection, `Content-Length` or chunked responses. Plain `http://`
//! only: TLS is not available inside the sandbox yet, so reach HTTPS endpoints through a
//! local proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use runnel_sdk::connect::Failure;

/// Largest response body read.
pub const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    /// Parses `http://HOST[:PORT][/PATH][?QUERY]`.
    ///
    /// # Errors
    /// Another scheme, or no host.
    pub fn parse(text: &str) -> Result<Url, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("{text:?} is not an http:// URL (https is not supported inside the sandbox; use a local proxy)"))?;
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| format!("{text:?}: port {port:?} is not a number"))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        Ok(Url {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            target,
        })
    }

    /// The URL with a query parameter added.
    pub fn with_param(&self, name: &str, value: &str) -> Url {
        let sep = if self.target.contains('?') { '&' } else { '?' };
        Url {
            target: format!("{}{sep}{name}={}", self.target, percent_encode(value)),
            ..self.clone()
        }
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fails with a capability error unless HOST:PORT is granted.
pub fn check_granted(url: &Url) -> Result<(), Failure> {
    let wanted = format!("{}:{}", url.host, url.port);
    if runnel_sdk::connect::granted_hosts().contains(&wanted) {
        return Ok(());
    }
    Err(Failure::Fatal(format!(
        "capability denied: {wanted} is not granted; add it in the connector file: \
         capabilities: {{ network: [\"{wanted}\"] }}"
    )))
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body's start, as text, for messages.
    pub fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        text.trim().to_string()
    }
}

/// Sends one request and reads the whole response.
///
/// # Errors
/// The connection failed or the response is not HTTP.
pub fn request(
    method: &str,
    url: &Url,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    let stream = TcpStream::connect((url.host.as_str(), url.port))?;
    let mut writer = std::io::BufWriter::new(&stream);
    write!(
        writer,
        "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.target,
        url.host,
        url.port,
        body.len()
    )?;
    for (name, value) in headers {
        write!(writer, "{name}: {value}\r\n")?;
    }
    writer.write_all(b"\r\n")?;
    writer.write_all(body)?;
    writer.flush()?;
    drop(writer);
    let mut reader = BufReader::new(&stream);
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("the server did not answer with an HTTP status line"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(invalid("the connection closed inside the response headers"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid("a malformed chunk size"))?;
            if size == 0 {
                break;
            }
            if body.len() + size > BODY_BYTES_MAX {
                return Err(invalid("the response body is too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(length) = length {
        if length > BODY_BYTES_MAX {
            return Err(invalid("the response body is too large"));
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.take(BODY_BYTES_MAX as u64).read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

/// Request headers from config keys `header.NAME`.
pub fn config_headers(config: &runnel_sdk::Config) -> Vec<(String, String)> {
    config
        .entries()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix("header.")?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// What an HTTP failure means for a connector: connection problems, 5xx and 429 are
/// transient.
pub fn transient(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// A connection error as a retryable failure that names the endpoint.
pub fn connect_failure(url: &Url, err: &std::io::Error) -> Failure {
    Failure::Retry(format!(
        "cannot reach http://{}:{}{}: {err}",
        url.host, url.port, url.target
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let url = Url::parse("http://localhost:8080/a/b?x=1").expect("valid");
        assert_eq!(
            (url.host.as_str(), url.port, url.target.as_str()),
            ("localhost", 8080, "/a/b?x=1")
        );
        assert_eq!(Url::parse("http://h").expect("valid").target, "/");
        assert_eq!(Url::parse("http://h?q").expect("valid").target, "/?q");
        assert!(Url::parse("https://h").is_err());
        assert_eq!(url.with_param("c", "a b").target, "/a/b?x=1&c=a%20b");
    }
}
