//! What the connectors that ship with Runnel share: config parsing with messages that
//! name the key, file errors that say which capability is missing, and a small HTTP/1.1
//! client over `std::net` (the host grants hosts and ports from `capabilities:`).

pub mod http;

use runnel_sdk::Config;
use runnel_sdk::connect::Failure;

/// A fatal config error naming the key.
pub fn bad(key: &str, message: impl std::fmt::Display) -> Failure {
    Failure::Fatal(format!("config {key}: {message}"))
}

/// A required config value.
pub fn required<'a>(config: &'a Config, key: &str) -> Result<&'a str, Failure> {
    config
        .get(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad(key, "is required"))
}

/// An optional number, with a default.
pub fn number<T: std::str::FromStr>(config: &Config, key: &str, default: T) -> Result<T, Failure>
where
    T::Err: std::fmt::Display,
{
    match config.get(key) {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|err| bad(key, format!("{text:?} is not a valid number: {err}"))),
    }
}

/// An optional boolean, with a default.
pub fn flag(config: &Config, key: &str, default: bool) -> Result<bool, Failure> {
    match config.get(key).map(str::trim) {
        None => Ok(default),
        Some("true" | "yes" | "on") => Ok(true),
        Some("false" | "no" | "off") => Ok(false),
        Some(other) => Err(bad(key, format!("{other:?} is not true or false"))),
    }
}

/// Fails with a capability error unless `path` lies in a directory granted with `mode`
/// (`read` or `read-write`).
pub fn check_granted(path: &str, mode: &str) -> Result<(), Failure> {
    if runnel_sdk::connect::is_granted(path, mode == "read-write") {
        return Ok(());
    }
    let dir = std::path::Path::new(path)
        .parent()
        .map_or_else(|| path.to_string(), |d| d.display().to_string());
    Err(Failure::Fatal(format!(
        "capability denied: {path} is not in a directory granted with mode {mode}; grant it \
         in the connector file: capabilities: {{ dirs: [{{ path: {dir}, mode: {mode} }}] }}"
    )))
}

/// A file-system error: a missing grant, a missing file, or a transient problem.
pub fn file_error(action: &str, path: &str, err: &std::io::Error, mode: &str) -> Failure {
    if let Err(denied) = check_granted(path, mode) {
        return denied;
    }
    if err.kind() == std::io::ErrorKind::NotFound {
        Failure::Fatal(format!("cannot {action} {path}: it does not exist"))
    } else if err.kind() == std::io::ErrorKind::PermissionDenied {
        Failure::Fatal(format!(
            "cannot {action} {path}: the operating system refused ({err}); check the file's \
             owner and permissions"
        ))
    } else {
        Failure::Retry(format!("cannot {action} {path}: {err}"))
    }
}
