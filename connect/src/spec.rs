//! Connector files: one YAML file per connector, checked with errors that name the file,
//! the line and the field.
//!
//! ```yaml
//! name: app-logs
//! kind: source                  # or sink
//! connector: file-source        # a connector that ships with Runnel, or a path to a .wasm
//! topic: app-logs               # source: where records go; sink: a topic or a list
//! config:
//!   path: /var/log/app.log
//!   token: ${secrets.API_TOKEN}
//! secrets:
//!   API_TOKEN: { env: API_TOKEN }        # or { file: /run/secrets/token }
//! capabilities:
//!   dirs:
//!     - { path: /var/log, mode: read }   # or read-write
//!   network: [ "api.example.com:443" ]
//! transforms:
//!   - { wasm: ./redact.wasm, config: { field: email } }
//! errors:
//!   policy: dead-letter                  # fail (default), skip, dead-letter
//!   dead-letter-topic: app-logs-dlq
//!   retry: { initial-backoff-ms: 100, max-backoff-ms: 10000, give-up-after-ms: 0 }
//! batch-records: 10000
//! call-timeout-ms: 60000
//! memory-limit-mb: 64
//! principal: User:etl                   # hosted connectors: act as this principal
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// Records handed to or taken from a connector per call unless the file says otherwise.
pub const BATCH_RECORDS_DEFAULT: u32 = 10_000;
pub const CALL_TIMEOUT_MS_DEFAULT: u32 = 60_000;
pub const MEMORY_LIMIT_MB_DEFAULT: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Source,
    Sink,
}

/// A YAML scalar given as a config value.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Spanned<String>),
    Many(Vec<Spanned<String>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    env: Option<String>,
    file: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirFile {
    path: Spanned<String>,
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesFile {
    #[serde(default)]
    dirs: Vec<DirFile>,
    #[serde(default)]
    network: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformFile {
    wasm: Spanned<String>,
    #[serde(default)]
    config: BTreeMap<String, Spanned<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RetryFile {
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    give_up_after_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ErrorsFile {
    policy: Option<Spanned<String>>,
    dead_letter_topic: Option<Spanned<String>>,
    #[serde(default)]
    retry: RetryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConnectorFile {
    name: Spanned<String>,
    kind: Kind,
    connector: Spanned<String>,
    topic: OneOrMany,
    #[serde(default)]
    config: BTreeMap<String, Spanned<Scalar>>,
    #[serde(default)]
    secrets: BTreeMap<String, Spanned<SecretFile>>,
    #[serde(default)]
    capabilities: CapabilitiesFile,
    #[serde(default)]
    transforms: Vec<TransformFile>,
    #[serde(default)]
    errors: ErrorsFile,
    batch_records: Option<u32>,
    call_timeout_ms: Option<u32>,
    memory_limit_mb: Option<u64>,
    principal: Option<Spanned<String>>,
}

/// Where a connector's or transform's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    /// A connector that ships with Runnel.
    Builtin(String),
    /// A `.wasm` file (absolute, resolved against the connector file's directory).
    File(PathBuf),
}

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    /// The whole file (a trailing newline removed).
    File(PathBuf),
    /// The `KEY=VALUE` line named KEY of a file holding several secrets.
    FileKey(PathBuf, String),
}

/// A directory the connector may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub path: PathBuf,
    pub write: bool,
}

/// A host and port the connector may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGrant {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Fail,
    Skip,
    DeadLetter,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fail => "fail",
            Policy::Skip => "skip",
            Policy::DeadLetter => "dead-letter",
        }
    }
}

/// How transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
    /// `None`: retry for as long as it takes.
    pub give_up_after: Option<Duration>,
}

/// One step of a transform chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformStep {
    pub wasm: PathBuf,
    /// Values may hold `${secrets.NAME}`.
    pub config: Vec<(String, String)>,
}

/// A checked connector file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorSpec {
    /// The file it came from, for messages.
    pub file: String,
    pub name: String,
    pub kind: Kind,
    pub component: Component,
    pub topics: Vec<String>,
    /// Values may hold `${secrets.NAME}`; [`resolve_secrets`] fills them in.
    pub config: Vec<(String, String)>,
    pub secrets: BTreeMap<String, SecretSource>,
    pub dirs: Vec<DirGrant>,
    pub network: Vec<HostGrant>,
    pub transforms: Vec<TransformStep>,
    pub policy: Policy,
    pub dead_letter_topic: Option<String>,
    pub retry: Retry,
    pub batch_records: u32,
    pub call_timeout_ms: u32,
    pub memory_limit_bytes: u64,
    /// A hosted connector's principal (`User:NAME`): its reads, writes and group calls
    /// are checked against that principal's ACLs.
    pub principal: Option<String>,
}

/// A connector file error: the file, line and field, and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn at<T>(
    file: &str,
    spanned: &Spanned<T>,
    field: &str,
    message: impl std::fmt::Display,
) -> SpecError {
    SpecError(format!(
        "{file}:{}: {field}: {message}",
        spanned.referenced.line()
    ))
}

/// Names of the connectors that ship with Runnel.
pub fn builtin_names() -> Vec<&'static str> {
    crate::builtin::BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// Checks a connector name: what topic names allow, without a leading `__`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("must have 1 to 200 characters".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {bad:?} is not allowed; use ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if name.starts_with("__") {
        return Err("names beginning with \"__\" are reserved".into());
    }
    Ok(())
}

fn resolve_path(base: &Path, text: &str) -> PathBuf {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// Secret references (`${secrets.NAME}`) in a value.
fn references(value: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${secrets.") {
        let after = &rest[start + "${secrets.".len()..];
        match after.find('}') {
            Some(end) => {
                names.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => {
                names.push(after);
                break;
            }
        }
    }
    names
}

/// Parses and checks a connector file. `file` names it in messages; relative paths are
/// resolved against its directory.
///
/// # Errors
/// Broken YAML, unknown or missing fields, invalid values: the message names the file,
/// line and field.
pub fn parse(file: &str, text: &str) -> Result<ConnectorSpec, SpecError> {
    let parsed: ConnectorFile =
        serde_saphyr::from_str(text).map_err(|err| SpecError(format!("{file}: {err}")))?;
    let base = Path::new(file)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    check_name(&parsed.name.value).map_err(|m| at(file, &parsed.name, "name", m))?;
    let component = match parsed.connector.value.as_str() {
        text if text.ends_with(".wasm") || text.contains('/') => {
            Component::File(resolve_path(&base, text))
        }
        builtin => {
            if !builtin_names().contains(&builtin) {
                return Err(at(
                    file,
                    &parsed.connector,
                    "connector",
                    format!(
                        "unknown connector {builtin:?}; give a path to a .wasm component or one \
                         that ships with Runnel: {}",
                        builtin_names().join(", ")
                    ),
                ));
            }
            Component::Builtin(builtin.to_string())
        }
    };
    let topics: Vec<Spanned<String>> = match parsed.topic {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(ts) => ts,
    };
    if topics.is_empty() {
        return Err(SpecError(format!("{file}: topic: give at least one topic")));
    }
    if parsed.kind == Kind::Source && topics.len() > 1 {
        return Err(at(
            file,
            &topics[1],
            "topic",
            "a source writes to one topic; give a single name",
        ));
    }
    for topic in &topics {
        if topic.value.is_empty() || topic.value.starts_with("__") {
            return Err(at(
                file,
                topic,
                "topic",
                format!("{:?} is not a topic a connector may use", topic.value),
            ));
        }
    }
    let mut secrets = BTreeMap::new();
    for (name, secret) in &parsed.secrets {
        let source = match (&secret.value.env, &secret.value.file, &secret.value.key) {
            (Some(var), None, None) => SecretSource::Env(var.clone()),
            (None, Some(path), None) => SecretSource::File(resolve_path(&base, path)),
            (None, Some(path), Some(key)) => {
                SecretSource::FileKey(resolve_path(&base, path), key.clone())
            }
            _ => {
                return Err(at(
                    file,
                    secret,
                    &format!("secrets.{name}"),
                    "give `env: VARIABLE`, `file: PATH` (the whole file), or `file: PATH` with \
                     `key: KEY` (a line KEY=VALUE of the file)",
                ));
            }
        };
        secrets.insert(name.clone(), source);
    }
    let check_refs = |field: &str, value: &Spanned<Scalar>| -> Result<String, SpecError> {
        let text = value.value.text();
        for name in references(&text) {
            if !secrets.contains_key(name) {
                return Err(at(
                    file,
                    value,
                    field,
                    format!(
                        "refers to secret {name:?}, which is not declared; add it under \
                         `secrets:` (for example `{name}: {{ env: {name} }}`)"
                    ),
                ));
            }
        }
        Ok(text)
    };
    let mut config = Vec::new();
    for (key, value) in &parsed.config {
        config.push((key.clone(), check_refs(&format!("config.{key}"), value)?));
    }
    let mut dirs = Vec::new();
    for dir in &parsed.capabilities.dirs {
        let write = match dir.mode.as_ref().map(|m| m.value.as_str()) {
            None | Some("read") => false,
            Some("read-write") => true,
            Some(other) => {
                return Err(at(
                    file,
                    dir.mode.as_ref().unwrap_or(&dir.path),
                    "capabilities.dirs.mode",
                    format!("{other:?} is not read or read-write"),
                ));
            }
        };
        dirs.push(DirGrant {
            path: resolve_path(&base, &dir.path.value),
            write,
        });
    }
    let mut network = Vec::new();
    for entry in &parsed.capabilities.network {
        let parsed_grant = entry
            .value
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty());
        let Some((host, port)) = parsed_grant else {
            return Err(at(
                file,
                entry,
                "capabilities.network",
                format!("{:?} is not HOST:PORT", entry.value),
            ));
        };
        network.push(HostGrant {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
        });
    }
    let mut transforms = Vec::new();
    for (i, step) in parsed.transforms.iter().enumerate() {
        let mut config = Vec::new();
        for (key, value) in &step.config {
            config.push((
                key.clone(),
                check_refs(&format!("transforms[{i}].config.{key}"), value)?,
            ));
        }
        transforms.push(TransformStep {
            wasm: resolve_path(&base, &step.wasm.value),
            config,
        });
    }
    let policy = match parsed.errors.policy.as_ref().map(|p| p.value.as_str()) {
        None | Some("fail") => Policy::Fail,
        Some("skip") => Policy::Skip,
        Some("dead-letter") => Policy::DeadLetter,
        Some(other) => {
            return Err(at(
                file,
                parsed.errors.policy.as_ref().unwrap_or(&parsed.name),
                "errors.policy",
                format!("{other:?} is not fail, skip or dead-letter"),
            ));
        }
    };
    let dead_letter_topic = parsed
        .errors
        .dead_letter_topic
        .as_ref()
        .map(|t| t.value.clone());
    if policy == Policy::DeadLetter && dead_letter_topic.is_none() {
        return Err(at(
            file,
            parsed.errors.policy.as_ref().unwrap_or(&parsed.name),
            "errors.dead-letter-topic",
            "the dead-letter policy needs a dead-letter-topic",
        ));
    }
    let retry = &parsed.errors.retry;
    let initial = retry.initial_backoff_ms.unwrap_or(100).max(1);
    let max = retry.max_backoff_ms.unwrap_or(10_000).max(initial);
    let batch_records = parsed.batch_records.unwrap_or(BATCH_RECORDS_DEFAULT);
    if batch_records == 0 {
        return Err(SpecError(format!(
            "{file}: batch-records: must be at least 1"
        )));
    }
    let principal = match &parsed.principal {
        Some(p) if !p.value.starts_with("User:") || p.value.len() <= "User:".len() => {
            return Err(at(file, p, "principal", "must be User:NAME"));
        }
        Some(p) => Some(p.value.clone()),
        None => None,
    };
    Ok(ConnectorSpec {
        principal,
        file: file.to_string(),
        name: parsed.name.value.clone(),
        kind: parsed.kind,
        component,
        topics: topics.into_iter().map(|t| t.value).collect(),
        config,
        secrets,
        dirs,
        network,
        transforms,
        policy,
        dead_letter_topic,
        retry: Retry {
            initial: Duration::from_millis(initial),
            max: Duration::from_millis(max),
            give_up_after: retry
                .give_up_after_ms
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        },
        batch_records,
        call_timeout_ms: parsed
            .call_timeout_ms
            .unwrap_or(CALL_TIMEOUT_MS_DEFAULT)
            .max(1),
        memory_limit_bytes: parsed.memory_limit_mb.unwrap_or(MEMORY_LIMIT_MB_DEFAULT) * 1024 * 1024,
    })
}

/// Reads and parses a connector file from disk.
///
/// # Errors
/// See [`parse`]; also an unreadable file.
pub fn load(path: &Path) -> Result<ConnectorSpec, SpecError> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = std::fs::read_to_string(path)
        .map_err(|err| SpecError(format!("cannot read {}: {err}", path.display())))?;
    parse(&absolute.display().to_string(), &text)
}

/// Secret values by name, read from the environment or files.
#[derive(Debug, Clone, Default)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    /// Replaces every secret value in `text` with `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for value in self.0.values().filter(|v| !v.is_empty()) {
            text = text.replace(value.as_str(), "***");
        }
        text
    }
}

/// Reads the connector's secrets.
///
/// # Errors
/// A variable that is not set or a file that cannot be read; the message names the
/// connector and the secret.
pub fn read_secrets(spec: &ConnectorSpec) -> Result<Secrets, SpecError> {
    let mut values = BTreeMap::new();
    for (name, source) in &spec.secrets {
        let value = match source {
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                SpecError(format!(
                    "connector {:?}: secret {name}: environment variable {var} is not set; \
                     set it in the environment of the process that runs the connector",
                    spec.name
                ))
            })?,
            SecretSource::File(path) => read_secret_file(spec, name, path)?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            SecretSource::FileKey(path, key) => read_secret_file(spec, name, path)?
                .lines()
                .find_map(|line| {
                    let (k, v) = line.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().to_string())
                })
                .ok_or_else(|| {
                    SpecError(format!(
                        "connector {:?}: secret {name}: {} has no line {key}=...",
                        spec.name,
                        path.display()
                    ))
                })?,
        };
        values.insert(name.clone(), value);
    }
    Ok(Secrets(values))
}

fn read_secret_file(spec: &ConnectorSpec, name: &str, path: &Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|err| {
        SpecError(format!(
            "connector {:?}: secret {name}: cannot read {}: {err}",
            spec.name,
            path.display()
        ))
    })
}

/// Fills `${secrets.NAME}` in config values.
pub fn resolve(config: &[(String, String)], secrets: &Secrets) -> Vec<(String, String)> {
    config
        .iter()
        .map(|(key, value)| {
            let mut value = value.clone();
            for (name, secret) in &secrets.0 {
                value = value.replace(&format!("${{secrets.{name}}}"), secret);
            }
            (key.clone(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("/etc/c.yaml", text).expect_err("should be refused").0
    }

    #[test]
    fn a_full_file_parses() {
        let spec = parse(
            "/etc/runnel/c.yaml",
            "name: logs\nkind: source\nconnector: file-source\ntopic: logs\nconfig:\n  path: /var/log/a.log\n  port: 5432\n  token: x${secrets.T}y\nsecrets:\n  T: { env: TOKEN }\ncapabilities:\n  dirs:\n    - { path: /var/log, mode: read }\n    - { path: out, mode: read-write }\n  network: [\"localhost:8080\"]\ntransforms:\n  - { wasm: t.wasm, config: { a: 1 } }\nerrors:\n  policy: dead-letter\n  dead-letter-topic: dlq\n",
        )
        .expect("valid");
        assert_eq!(spec.kind, Kind::Source);
        assert_eq!(spec.component, Component::Builtin("file-source".into()));
        assert!(spec.config.contains(&("port".into(), "5432".into())));
        assert_eq!(spec.dirs[1].path, PathBuf::from("/etc/runnel/out"));
        assert!(spec.dirs[1].write && !spec.dirs[0].write);
        assert_eq!(
            spec.network[0],
            HostGrant {
                host: "localhost".into(),
                port: 8080
            }
        );
        assert_eq!(spec.transforms[0].wasm, PathBuf::from("/etc/runnel/t.wasm"));
        assert_eq!(spec.policy, Policy::DeadLetter);
        let secrets = Secrets([("T".to_string(), "s3cret".to_string())].into());
        let resolved = resolve(&spec.config, &secrets);
        assert!(resolved.contains(&("token".into(), "xs3crety".into())));
        assert_eq!(secrets.redact("token xs3crety"), "token x***y");
    }

    #[test]
    fn every_shipped_connector_has_a_ready_file_that_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors");
        for name in builtin_names() {
            let file = root.join(name).join(format!("{name}.yaml"));
            let spec = load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(spec.component, Component::Builtin(name.to_string()));
        }
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let base = "name: a\nkind: sink\nconnector: file-sink\ntopic: t\n";
        assert!(
            err(&format!("{base}config:\n  p: ${{secrets.NOPE}}\n"))
                .contains("/etc/c.yaml:6: config.p")
        );
        assert!(
            err("name: a\nkind: sink\nconnector: nope\ntopic: t\n")
                .contains("/etc/c.yaml:3: connector: unknown connector \"nope\"")
        );
        assert!(
            err("name: a b\nkind: sink\nconnector: file-sink\ntopic: t\n")
                .contains("/etc/c.yaml:1: name")
        );
        assert!(
            err(&format!("{base}errors:\n  policy: dead-letter\n")).contains("dead-letter-topic")
        );
        assert!(
            err(&format!("{base}capabilities:\n  network: [nohost]\n"))
                .contains(":6: capabilities.network")
        );
        assert!(
            err("name: a\nkind: sideways\nconnector: file-sink\ntopic: t\n")
                .contains("/etc/c.yaml")
        );
        assert!(err(&format!("{base}colour: red\n")).contains("colour"));
    }
}
