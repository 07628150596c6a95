//! The deployment store: the definitions of transforms and connectors, and the Wasm
//! components they run, kept in the compacted internal topic `__deployments` so that
//! every broker of a cluster knows them and they outlive any one broker (as Kafka
//! Connect keeps its configs in a topic).
//!
//! Keys: `transform/NAME` and `connector/NAME` hold a [`Definition`] as JSON (a
//! tombstone removes it); `component/SHA256` holds a component's bytes. Every record is a
//! whole state, never a delta, so compaction keeps the meaning of the log.
//!
//! Each broker reads the topic from its start and keeps what it read as a [`Snapshot`];
//! the runtimes reconcile what they run with it. Components are copied into
//! `<data>/__deployments/wasm/SHA256.wasm` as they are read (content-addressed, so the
//! copy is never stale).
//!
//! A component no definition has named for [`COMPONENT_GRACE`] is removed (a tombstone,
//! and the local copies), so redeploys do not pile up old components.
//!
//! **Invariant:** a command is answered only after the broker that took it has read its
//! own record back, so the next command on that broker sees it.
//! **Invariant:** a definition is written only after every component it names, and both
//! with acks=all.
//! **Invariant:** a component a definition names stays: the collector writes a component
//! back when, once its tombstone is read back, a definition names it; a definition's
//! writer writes back a component it names that is gone once the definition is read
//! back. The topic is one partition, so whichever of the two was written last sees the
//! other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use runnel_client::{
    Acks, Client, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Producer, ProducerConfig,
    ProducerRecord, StartFrom, v1,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// The internal topic the definitions live in.
pub const TOPIC: &str = "__deployments";

/// How long a write or a read-back may take before the command gives up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a component no definition names stays (a deploy writes its component and
/// then its definition within seconds). `RUNNEL_COMPONENT_GRACE_MS` overrides it, for
/// tests.
pub const COMPONENT_GRACE: Duration = Duration::from_secs(600);

/// What a definition defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Transform,
    Connector,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Transform => "transform/",
            Kind::Connector => "connector/",
        }
    }
}

/// A deployment as stored: the runtime's own spec (JSON), the components it runs, and
/// the state every broker must agree on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub spec: serde_json::Value,
    /// SHA-256 of each component, in the order the runtime names them.
    pub components: Vec<String>,
    pub paused: bool,
    /// Bumped by each deploy of the name.
    pub version: u32,
    /// Bumped by each restart: the broker running it starts it again.
    #[serde(default)]
    pub restarts: u32,
}

/// What a broker has read of the store.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The offset after the last record read.
    pub next_offset: i64,
    /// The reader has reached the end the topic had when it started.
    pub caught_up: bool,
    pub definitions: BTreeMap<(Kind, String), Definition>,
    /// Components read so far (their bytes are in the local copy).
    pub components: BTreeSet<String>,
}

impl Snapshot {
    pub fn get(&self, kind: Kind, name: &str) -> Option<&Definition> {
        self.definitions.get(&(kind, name.to_string()))
    }

    /// The components some definition names.
    pub fn named_components(&self) -> BTreeSet<String> {
        self.definitions
            .values()
            .flat_map(|d| d.components.iter().cloned())
            .collect()
    }

    /// The definitions of one kind, by name.
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = (&String, &Definition)> {
        self.definitions
            .iter()
            .filter(move |((k, _), _)| *k == kind)
            .map(|((_, name), d)| (name, d))
    }
}

/// The store as one broker sees it; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once closed.
    producer: std::sync::Mutex<Option<Arc<Producer>>>,
    reader: tokio::task::JoinHandle<()>,
    wasm_dir: PathBuf,
    snapshot: watch::Receiver<Snapshot>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Store {
    /// Starts reading the store; the local copy of components goes under `dir`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(client: Client, dir: &Path) -> anyhow::Result<Store> {
        let wasm_dir = dir.join("wasm");
        std::fs::create_dir_all(&wasm_dir)
            .with_context(|| format!("creating {}", wasm_dir.display()))?;
        let (tx, rx) = watch::channel(Snapshot::default());
        let reader = tokio::spawn(read(client.clone(), wasm_dir.clone(), tx));
        let grace = std::env::var("RUNNEL_COMPONENT_GRACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(COMPONENT_GRACE, Duration::from_millis);
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::All,
                linger: Duration::ZERO,
                delivery_timeout: WRITE_TIMEOUT,
                ..ProducerConfig::default()
            },
        );
        let store = Store {
            inner: Arc::new(Inner {
                producer: std::sync::Mutex::new(Some(Arc::new(producer))),
                reader,
                wasm_dir,
                snapshot: rx,
            }),
        };
        let collector = store.clone();
        tokio::spawn(async move {
            let mut unnamed = BTreeMap::new();
            let every = (grace / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
            loop {
                tokio::time::sleep(every).await;
                if collector.is_closed() {
                    return;
                }
                if let Err(err) = collector.collect_components(&mut unnamed, grace).await {
                    tracing::warn!(error = %format!("{err:#}"), "collecting unused components failed; retrying");
                }
            }
        });
        Ok(store)
    }

    fn is_closed(&self) -> bool {
        self.inner
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// Removes the components no definition has named for `grace` (`unnamed` remembers
    /// since when, between calls): a tombstone in the topic (written back if a definition
    /// named it meanwhile), and the local copies nothing holds any more.
    ///
    /// # Errors
    /// A write was not acknowledged or read back.
    async fn collect_components(
        &self,
        unnamed: &mut BTreeMap<String, std::time::Instant>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let snapshot = self.snapshot();
        if !snapshot.caught_up {
            return Ok(());
        }
        let named = snapshot.named_components();
        unnamed.retain(|sha, _| snapshot.components.contains(sha) && !named.contains(sha));
        for sha in snapshot.components.difference(&named) {
            unnamed
                .entry(sha.clone())
                .or_insert_with(std::time::Instant::now);
        }
        let due: Vec<String> = unnamed
            .iter()
            .filter(|(_, since)| since.elapsed() >= grace)
            .map(|(sha, _)| sha.clone())
            .collect();
        for sha in due {
            unnamed.remove(&sha);
            let bytes = self.component(&sha)?;
            let after = self.write(format!("component/{sha}"), None).await?;
            if after.named_components().contains(&sha) {
                self.write(format!("component/{sha}"), Some(Bytes::from(bytes)))
                    .await?;
                continue;
            }
            tracing::info!(component = %sha, "removed a component no deployment uses");
        }
        // Local copies of components the topic no longer holds: old ones only, as a
        // file is written before the reader counts its component in.
        let snapshot = self.snapshot();
        let named = snapshot.named_components();
        let Ok(entries) = std::fs::read_dir(&self.inner.wasm_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(sha) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".wasm"))
            else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace);
            if old && !snapshot.components.contains(sha) && !named.contains(sha) {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Stops reading and writing (the broker is stopping: its streams must end).
    pub fn close(&self) {
        self.inner.reader.abort();
        self.inner
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every change of the snapshot.
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.inner.snapshot.clone()
    }

    /// Waits until the reader has read to the end the topic had when it started.
    ///
    /// # Errors
    /// The reader stopped.
    pub async fn caught_up(&self) -> anyhow::Result<Snapshot> {
        let mut rx = self.inner.snapshot.clone();
        let snapshot = rx
            .wait_for(|s| s.caught_up)
            .await
            .map_err(|_| anyhow::anyhow!("the deployment store's reader stopped"))?;
        Ok(snapshot.clone())
    }

    /// Stores a component unless the store already holds it; returns its SHA-256.
    ///
    /// # Errors
    /// The write was not acknowledged.
    pub async fn put_component(&self, wasm: &[u8]) -> anyhow::Result<String> {
        let sha = sha256_hex(wasm);
        if self.inner.snapshot.borrow().components.contains(&sha) {
            return Ok(sha);
        }
        self.write(
            format!("component/{sha}"),
            Some(Bytes::copy_from_slice(wasm)),
        )
        .await?;
        Ok(sha)
    }

    /// Writes (or with `None` removes) a definition and waits until this broker has
    /// read it back.
    ///
    /// # Errors
    /// The write was not acknowledged, or not read back in time.
    pub async fn put(
        &self,
        kind: Kind,
        name: &str,
        definition: Option<&Definition>,
    ) -> anyhow::Result<Snapshot> {
        let value = definition
            .map(serde_json::to_vec)
            .transpose()?
            .map(Bytes::from);
        let mut snapshot = self
            .write(format!("{}{name}", kind.prefix()), value)
            .await?;
        // A component collected while this definition was being written comes back.
        for sha in definition
            .map(|d| d.components.as_slice())
            .unwrap_or_default()
        {
            if !snapshot.components.contains(sha) {
                let bytes = self.component(sha)?;
                snapshot = self
                    .write(format!("component/{sha}"), Some(Bytes::from(bytes)))
                    .await?;
            }
        }
        Ok(snapshot)
    }

    async fn write(&self, key: String, value: Option<Bytes>) -> anyhow::Result<Snapshot> {
        let mut record = ProducerRecord::new(TOPIC).key(key.clone()).partition(0);
        record.value = value;
        let producer = self
            .inner
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .context("the deployment store is closed")?;
        let delivery = producer
            .send(record)
            .await
            .with_context(|| format!("writing {key} to {TOPIC}"))?;
        let written = delivery
            .await
            .with_context(|| format!("writing {key} to {TOPIC}"))?;
        let mut rx = self.inner.snapshot.clone();
        let read_back = rx.wait_for(|s| s.next_offset > written.offset);
        match tokio::time::timeout(WRITE_TIMEOUT, read_back).await {
            Ok(Ok(snapshot)) => Ok(snapshot.clone()),
            _ => anyhow::bail!(
                "{key} was written at offset {} of {TOPIC} but this broker has not read it back",
                written.offset
            ),
        }
    }

    /// A component's bytes, from the local copy.
    ///
    /// # Errors
    /// The store has not delivered it (yet), or the file cannot be read.
    pub fn component(&self, sha: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.inner.wasm_dir.join(format!("{sha}.wasm"));
        std::fs::read(&path).with_context(|| {
            format!(
                "component {sha} is not in {TOPIC} (read {}); deploy it again",
                path.display()
            )
        })
    }
}

/// Reads the topic for as long as the process runs, publishing what it read.
async fn read(client: Client, wasm_dir: PathBuf, tx: watch::Sender<Snapshot>) {
    let mut consumer = Consumer::new(
        client,
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            auto_offset_reset: Some(StartFrom::Earliest),
            ..ConsumerConfig::default()
        },
    );
    // The topic is created when the cluster is ready; until then, wait.
    loop {
        match consumer
            .assign(TOPIC, Some(vec![0]), StartFrom::Earliest)
            .await
        {
            Ok(()) => break,
            Err(err) => {
                tracing::debug!(error = %err, "waiting for {TOPIC}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
    let mut start_end: Option<i64> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        if start_end.is_none() {
            match consumer.end_offsets().await {
                Ok(ends) => start_end = ends.get(&(TOPIC.to_string(), 0)).copied(),
                Err(err) => {
                    tracing::debug!(error = %err, "reading the end of {TOPIC}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let records = match consumer.poll().await {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(error = %err, "reading {TOPIC} failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let position = consumer.position(TOPIC, 0).unwrap_or(0);
        let caught_up = start_end.is_some_and(|end| position >= end);
        if records.is_empty() && (tx.borrow().caught_up || !caught_up) {
            continue;
        }
        tx.send_modify(|snapshot| {
            for record in &records {
                apply(snapshot, record, &wasm_dir);
            }
            snapshot.next_offset = snapshot.next_offset.max(position);
            snapshot.caught_up |= caught_up;
        });
    }
}

fn apply(snapshot: &mut Snapshot, record: &ConsumerRecord, wasm_dir: &Path) {
    snapshot.next_offset = record.offset + 1;
    let Some(key) = record
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
    else {
        tracing::warn!(
            offset = record.offset,
            "{TOPIC} record without a text key skipped"
        );
        return;
    };
    if let Some(sha) = key.strip_prefix("component/") {
        match record.value.as_deref() {
            Some(bytes) if sha256_hex(bytes) == sha => {
                let path = wasm_dir.join(format!("{sha}.wasm"));
                if !path.exists() {
                    let tmp = path.with_extension("tmp");
                    let written =
                        std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
                    if let Err(err) = written {
                        tracing::error!(path = %path.display(), error = %err, "cannot copy a component");
                        return;
                    }
                }
                snapshot.components.insert(sha.to_string());
            }
            Some(_) => {
                tracing::error!(
                    offset = record.offset,
                    key,
                    "component bytes do not match their SHA-256; skipped"
                );
            }
            None => {
                snapshot.components.remove(sha);
            }
        }
        return;
    }
    let (kind, name) = if let Some(name) = key.strip_prefix(Kind::Transform.prefix()) {
        (Kind::Transform, name)
    } else if let Some(name) = key.strip_prefix(Kind::Connector.prefix()) {
        (Kind::Connector, name)
    } else {
        tracing::warn!(offset = record.offset, key, "unknown {TOPIC} key skipped");
        return;
    };
    let name = name.to_string();
    match record.value.as_deref() {
        None => {
            snapshot.definitions.remove(&(kind, name));
        }
        Some(value) => match serde_json::from_slice::<Definition>(value) {
            Ok(definition) => {
                snapshot.definitions.insert((kind, name), definition);
            }
            Err(err) => {
                tracing::error!(offset = record.offset, key, error = %err, "unreadable definition skipped");
            }
        },
    }
}

/// The deployments an earlier version saved in `dir` (one JSON file each), to import
/// into the store; hand each path to [`mark_imported`] once it is. None when `dir` does
/// not exist.
///
/// # Errors
/// A file that cannot be read or parsed.
pub fn saved_files<T: serde::de::DeserializeOwned>(
    dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, T)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut saved = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let value: T = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        saved.push((path, value));
    }
    Ok(saved)
}

/// Renames an imported file to `.json.imported`, so it is imported once.
///
/// # Errors
/// The rename failed.
pub fn mark_imported(path: &Path) -> anyhow::Result<()> {
    std::fs::rename(path, path.with_extension("json.imported"))
        .with_context(|| format!("renaming {}", path.display()))
}

/// A runtime that runs what the store defines.
pub trait Reconciler: Clone + Send + Sync + 'static {
    /// Once, when the store is first caught up: takes in what an earlier version saved
    /// on this broker's disk.
    fn import_local(&self, store: &Store) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Makes what this broker runs match the store.
    fn reconcile(&self) -> impl Future<Output = ()> + Send;
    /// The runtime is shutting down: no more reconciling.
    fn stopping(&self) -> bool;
}

/// Runs `runtime` from the store: imports, then reconciles on every change of the
/// store and, with `every`, at that interval too (for what depends on the live brokers).
pub fn spawn_reconciler<R: Reconciler>(store: Store, runtime: R, every: Option<Duration>) {
    tokio::spawn(async move {
        // Fails only once the store is closed: the broker stopped first.
        if store.caught_up().await.is_err() {
            return;
        }
        if let Err(err) = runtime.import_local(&store).await {
            tracing::error!(error = %format!("{err:#}"), "cannot import the deployments saved on this broker");
        }
        let mut changes = store.watch();
        loop {
            runtime.reconcile().await;
            let tick = async {
                match every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tick => {}
            }
            if runtime.stopping() {
                return;
            }
        }
    });
}

/// The broker that runs connector `name` among the live brokers: the highest
/// rendezvous hash of (name, broker), so that a broker's death moves only its own
/// connectors and every broker computes the same owner from the same list.
pub fn owner(name: &str, live: &[u32]) -> Option<u32> {
    live.iter().copied().max_by_key(|id| {
        let digest = Sha256::digest(format!("{name}\0{id}").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(first), *id)
    })
}

/// The brokers that may run deployments: registered, not fenced, not shutting down.
///
/// # Errors
/// No broker answered.
pub async fn live_brokers(client: &Client) -> Result<Vec<v1::BrokerInfo>, ClientError> {
    let info = runnel_client::Admin::new(client.clone())
        .cluster_info()
        .await?;
    Ok(info
        .brokers
        .into_iter()
        .filter(|b| !b.fenced && !b.shutting_down)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_stable_and_only_a_dead_brokers_connectors_move() {
        let all = [1, 2, 3];
        let names: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
        let before: Vec<u32> = names
            .iter()
            .map(|n| owner(n, &all).expect("an owner"))
            .collect();
        for id in all {
            assert!(before.contains(&id), "broker {id} runs none of 60");
        }
        let after: Vec<u32> = names
            .iter()
            .map(|n| owner(n, &[1, 3]).expect("an owner"))
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "a connector of a live broker moved");
            } else {
                assert_ne!(*a, 2);
            }
        }
        assert_eq!(owner("x", &[]), None);
        // The order of the list does not matter.
        assert_eq!(owner("c7", &[3, 1, 2]), owner("c7", &[1, 2, 3]));
    }

    #[test]
    fn records_build_the_snapshot_and_tombstones_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut snapshot = Snapshot::default();
        let record = |offset: i64, key: &str, value: Option<Vec<u8>>| ConsumerRecord {
            topic: Arc::from(TOPIC),
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Some(Bytes::from(key.to_string())),
            value: value.map(Bytes::from),
            headers: Vec::new(),
        };
        let wasm = b"\0asm fake".to_vec();
        let sha = sha256_hex(&wasm);
        apply(
            &mut snapshot,
            &record(0, &format!("component/{sha}"), Some(wasm.clone())),
            dir.path(),
        );
        apply(
            &mut snapshot,
            &record(1, "component/00", Some(wasm.clone())),
            dir.path(),
        );
        assert!(snapshot.components.contains(&sha));
        assert!(
            !snapshot.components.contains("00"),
            "bytes that do not match their name"
        );
        assert_eq!(
            std::fs::read(dir.path().join(format!("{sha}.wasm"))).expect("the copy"),
            wasm
        );
        let definition = Definition {
            spec: serde_json::json!({"name": "t"}),
            components: vec![sha.clone()],
            paused: false,
            version: 1,
            restarts: 0,
        };
        apply(
            &mut snapshot,
            &record(
                2,
                "transform/t",
                Some(serde_json::to_vec(&definition).expect("json")),
            ),
            dir.path(),
        );
        apply(
            &mut snapshot,
            &record(3, "connector/t", Some(b"not json".to_vec())),
            dir.path(),
        );
        assert_eq!(snapshot.get(Kind::Transform, "t"), Some(&definition));
        assert_eq!(snapshot.get(Kind::Connector, "t"), None);
        apply(&mut snapshot, &record(4, "transform/t", None), dir.path());
        assert_eq!(snapshot.get(Kind::Transform, "t"), None);
        assert_eq!(snapshot.next_offset, 5);
    }
}
