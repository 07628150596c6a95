//! The tasks of a stateful deployment on one broker: one per input partition this
//! broker's member owns, each with its stores (`state.rs`).
//!
//! A task opens when its partition is assigned: its stores are opened
//! and replayed from their changelogs, from each store's checkpoint to the changelog's
//! last stable offset, before any record of the partition is processed (a store whose
//! checkpoint lies outside its changelog is wiped and replayed from the start). A task
//! closes when its partition is no longer assigned and it holds nothing uncommitted.
//!
//! A standby ([`follow`]) keeps the stores of a task another broker runs warm in the same
//! directory: it replays the changelogs like an opening task, then goes on applying what
//! they receive, each write batch with its checkpoint. So when the task comes here, its
//! open replays only what the standby had not applied yet.
//!
//! **Invariant:** no record of a partition is processed before its task has replayed
//! every changelog to the end it had when the replay began; the group coordinator's
//! stable offsets (a pending transactional offset commit blocks the fetch) make that end
//! cover every transaction that committed the offsets the member starts from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use runnel_client::{Client, Consumer, ConsumerConfig, StartFrom, v1};

use crate::state::{self, Entry, Layout, TaskState};

/// Changelog records applied to RocksDB per write batch during a replay.
const RESTORE_BATCH_RECORDS: usize = 20_000;

/// Restore progress of a task: records replayed, of how many.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub restored: u64,
    pub total: u64,
}

/// The open tasks of one deployment on this broker.
pub struct Tasks {
    deployment: String,
    dir: PathBuf,
    layout: Layout,
    open: BTreeMap<u32, TaskState>,
    restoring: BTreeMap<u32, Progress>,
    /// Standbys following their changelogs, with their catch-up progress and whether
    /// they reached the changelogs' ends.
    standby: BTreeMap<u32, (Progress, bool)>,
}

pub type SharedTasks = Arc<Mutex<Tasks>>;

pub fn lock(tasks: &SharedTasks) -> std::sync::MutexGuard<'_, Tasks> {
    tasks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tasks {
    pub fn new(data_dir: &std::path::Path, deployment: &str, layout: &Layout) -> SharedTasks {
        Arc::new(Mutex::new(Tasks {
            deployment: deployment.to_string(),
            dir: state::deployment_dir(data_dir, deployment),
            layout: layout.clone(),
            open: BTreeMap::new(),
            restoring: BTreeMap::new(),
            standby: BTreeMap::new(),
        }))
    }

    pub fn is_open(&self, partition: u32) -> bool {
        self.open.contains_key(&partition)
    }

    pub fn take(&mut self, partition: u32) -> Option<TaskState> {
        self.open.remove(&partition)
    }

    pub fn put_back(&mut self, task: TaskState) {
        self.open.insert(task.partition(), task);
    }

    pub fn open_partitions(&self) -> Vec<u32> {
        self.open.keys().copied().collect()
    }

    /// Standbys that caught up with their changelogs once (and follow them since).
    pub fn warm(&self) -> Vec<u32> {
        self.standby
            .iter()
            .filter(|(_, (_, warm))| *warm)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Closes every task (a member starting over reopens them from what is committed).
    pub fn close_all(&mut self) {
        self.open.clear();
    }

    /// Drops every uncommitted write of every task.
    pub fn abort(&mut self) {
        for task in self.open.values_mut() {
            task.abort();
        }
    }

    /// Writes commit unit `unit` of every task to RocksDB, with the changelog offsets
    /// `checkpoints` (partition → store → next offset).
    ///
    /// # Errors
    /// RocksDB failed; the tasks are closed, so they reopen (and replay) next time.
    pub fn commit(
        &mut self,
        unit: u64,
        checkpoints: &BTreeMap<u32, BTreeMap<u32, i64>>,
    ) -> anyhow::Result<()> {
        let none = BTreeMap::new();
        let mut failed = None;
        for (partition, task) in &mut self.open {
            if let Err(err) = task.commit(unit, checkpoints.get(partition).unwrap_or(&none)) {
                failed = Some(err.context(format!("writing the state of partition {partition}")));
                break;
            }
        }
        match failed {
            Some(err) => {
                self.open.clear();
                Err(err)
            }
            None => Ok(()),
        }
    }

    /// Closes the tasks of partitions not in `assigned` that hold nothing uncommitted.
    pub fn close_unassigned(&mut self, assigned: &[u32]) {
        self.open
            .retain(|partition, task| assigned.contains(partition) || task.has_pending());
    }

    /// What this broker's tasks report for `transform describe`.
    pub fn statuses(&self, broker: u32) -> Vec<v1::TaskStatus> {
        let running = self.open.keys().map(|p| v1::TaskStatus {
            partition: *p,
            broker,
            state: "Running".into(),
            restored: 0,
            restore_total: 0,
        });
        let restoring = self.restoring.iter().map(|(p, progress)| v1::TaskStatus {
            partition: *p,
            broker,
            state: "Restoring".into(),
            restored: progress.restored,
            restore_total: progress.total,
        });
        let standby = self
            .standby
            .iter()
            .map(|(p, (progress, _))| v1::TaskStatus {
                partition: *p,
                broker,
                state: "Standby".into(),
                restored: progress.restored,
                restore_total: progress.total,
            });
        running.chain(restoring).chain(standby).collect()
    }

    /// Committed entries of `store` in `[from, to)` over the open tasks (only
    /// `partition`'s with `Some`), each with its partition.
    ///
    /// # Errors
    /// Unknown store.
    pub fn query(
        &self,
        store: &str,
        partition: Option<u32>,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> anyhow::Result<Vec<(u32, Entry)>> {
        let stores = self.layout.guest_names();
        if !stores.iter().any(|s| s == store) {
            anyhow::bail!(
                "transform {:?} has no store {store:?}; its stores: {stores:?}",
                self.deployment
            );
        }
        let mut out = Vec::new();
        for (p, task) in &self.open {
            if partition.is_some_and(|wanted| wanted != *p) {
                continue;
            }
            for entry in task.committed_range(store, from, to, limit)? {
                out.push((*p, entry));
            }
        }
        out.sort_by(|a, b| a.1.0.cmp(&b.1.0));
        out.truncate(limit);
        Ok(out)
    }
}

/// Opens task `partition` of `tasks` and replays its changelogs; progress shows in
/// [`Tasks::statuses`] meanwhile. Returns the changelog records replayed.
///
/// # Errors
/// A changelog cannot be read, or the local stores cannot be written.
pub async fn open(tasks: &SharedTasks, client: &Client, partition: u32) -> anyhow::Result<u64> {
    let (dir, deployment, layout) = {
        let tasks = lock(tasks);
        (
            tasks.dir.join(partition.to_string()),
            tasks.deployment.clone(),
            tasks.layout.clone(),
        )
    };
    lock(tasks).restoring.insert(partition, Progress::default());
    let result = replay(tasks, client, &dir, &deployment, &layout, partition).await;
    let mut locked = lock(tasks);
    locked.restoring.remove(&partition);
    let (task, restored) = result?;
    locked.open.insert(partition, task);
    Ok(restored)
}

async fn replay(
    tasks: &SharedTasks,
    client: &Client,
    dir: &std::path::Path,
    deployment: &str,
    layout: &Layout,
    partition: u32,
) -> anyhow::Result<(TaskState, u64)> {
    let mut task = TaskState::open(dir, partition, layout)?;
    let topics = layout.topics(deployment);
    let stores: Vec<u32> = (0..topics.len() as u32).collect();
    let restored = replay_stores(
        &mut task,
        client,
        deployment,
        &topics,
        &stores,
        &mut |done, total| {
            set_progress(tasks, partition, done, total);
        },
    )
    .await?;
    Ok((task, restored))
}

/// Keeps the stores of task `partition`, which another broker runs, warm here until
/// `stop` changes or closes: replays its changelogs (progress shows in
/// [`Tasks::statuses`] as a standby), then applies what they receive, read_committed.
/// The stores are closed when it returns.
///
/// # Errors
/// A changelog cannot be read, or the local stores cannot be opened or written.
pub async fn follow(
    tasks: &SharedTasks,
    client: &Client,
    partition: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (dir, deployment, layout) = {
        let mut tasks = lock(tasks);
        tasks
            .standby
            .insert(partition, (Progress::default(), false));
        (
            tasks.dir.join(partition.to_string()),
            tasks.deployment.clone(),
            tasks.layout.clone(),
        )
    };
    let followed = async {
        let mut task = TaskState::open(&dir, partition, &layout)?;
        let topics = layout.topics(&deployment);
        let stores: Vec<u32> = (0..topics.len() as u32).collect();
        let mut progress = |restored, total| {
            if let Some(status) = lock(tasks).standby.get_mut(&partition) {
                status.0 = Progress { restored, total };
            }
        };
        let caught_up = replay_stores(
            &mut task,
            client,
            &deployment,
            &topics,
            &stores,
            &mut progress,
        );
        tokio::select! {
            replayed = caught_up => replayed?,
            _ = stop.changed() => return Ok(()),
        };
        if let Some(status) = lock(tasks).standby.get_mut(&partition) {
            // (The total counts offsets, markers of transactions among them.)
            status.0.restored = status.0.total;
            status.1 = true;
        }
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                max_wait: Duration::from_millis(500),
                auto_offset_reset: None,
                isolation: v1::IsolationLevel::ReadCommitted,
                ..ConsumerConfig::default()
            },
        );
        let mut store_of: BTreeMap<String, u32> = BTreeMap::new();
        for &store in &stores {
            let topic = &topics[store as usize];
            consumer
                .assign(
                    topic,
                    Some(vec![partition]),
                    StartFrom::Offset(task.checkpoint(store)?),
                )
                .await
                .with_context(|| format!("changelog {topic} partition {partition}"))?;
            store_of.insert(topic.clone(), store);
        }
        loop {
            let records = tokio::select! {
                records = consumer.poll() => records?,
                _ = stop.changed() => return Ok(()),
            };
            let mut writes: BTreeMap<u32, Vec<(bytes::Bytes, Option<bytes::Bytes>)>> =
                BTreeMap::new();
            let applied = records.len() as u64;
            for record in records {
                if let (Some(store), Some(key)) = (store_of.get(&*record.topic), record.key) {
                    writes.entry(*store).or_default().push((key, record.value));
                }
            }
            for (topic, &store) in &store_of {
                let Some(position) = consumer.position(topic, partition) else {
                    continue;
                };
                let entries = writes.remove(&store).unwrap_or_default();
                // A position that moved over control records or aborted ones is kept too.
                if !entries.is_empty() || position != task.checkpoint(store)? {
                    task.restore(
                        store,
                        entries
                            .iter()
                            .map(|(k, v)| (k.as_ref(), v.as_ref().map(AsRef::as_ref))),
                        position,
                    )?;
                }
            }
            if let Some(status) = lock(tasks).standby.get_mut(&partition) {
                status.0.restored += applied;
                status.0.total += applied;
            }
        }
    };
    let result: anyhow::Result<()> = followed.await;
    lock(tasks).standby.remove(&partition);
    result
}

/// Brings task `partition`'s tables up to their topics' last stable offsets (before a
/// batch of that partition is processed). Returns the records applied.
///
/// # Errors
/// A table topic cannot be read, or the stores cannot be written.
pub async fn catch_up_tables(
    tasks: &SharedTasks,
    client: &Client,
    partition: u32,
) -> anyhow::Result<u64> {
    let (deployment, layout, task) = {
        let mut tasks = lock(tasks);
        let task = tasks.take(partition);
        (tasks.deployment.clone(), tasks.layout.clone(), task)
    };
    let Some(mut task) = task else {
        return Ok(0);
    };
    let topics = layout.topics(&deployment);
    let tables: Vec<u32> = layout.table_stores().collect();
    // Most batches find their tables unchanged: one offset lookup each says so.
    let mut current = true;
    for &store in &tables {
        let Some(topic) = topics.get(store as usize) else {
            current = false;
            break;
        };
        let end = client
            .end_offset(topic, partition, v1::IsolationLevel::ReadCommitted)
            .await;
        if !matches!((end, task.checkpoint(store)), (Ok(end), Ok(at)) if at == end) {
            current = false;
            break;
        }
    }
    if current {
        lock(tasks).put_back(task);
        return Ok(0);
    }
    let result = replay_stores(
        &mut task,
        client,
        &deployment,
        &topics,
        &tables,
        &mut |_, _| {},
    )
    .await;
    lock(tasks).put_back(task);
    result
}

/// Replays `stores` of `task` from their checkpoints to their changelogs' last stable
/// offsets (`topics[store]`), reporting (done, total) records as it goes.
async fn replay_stores(
    task: &mut TaskState,
    client: &Client,
    deployment: &str,
    topics: &[String],
    stores: &[u32],
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> anyhow::Result<u64> {
    let partition = task.partition();
    let mut plan = Vec::new();
    for &store in stores {
        let topic = topics
            .get(store as usize)
            .with_context(|| format!("store #{store} has no changelog"))?;
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                max_wait: Duration::from_millis(200),
                auto_offset_reset: None,
                isolation: v1::IsolationLevel::ReadCommitted,
                ..ConsumerConfig::default()
            },
        );
        consumer
            .assign(topic, Some(vec![partition]), StartFrom::Earliest)
            .await
            .with_context(|| format!("changelog {topic} partition {partition}"))?;
        let start = consumer.position(topic, partition).unwrap_or(0);
        let end = consumer
            .end_offsets()
            .await?
            .get(&(topic.clone(), partition))
            .copied()
            .unwrap_or(0);
        let checkpoint = task.checkpoint(store)?;
        let from = if checkpoint < start || checkpoint > end {
            if checkpoint != 0 {
                tracing::warn!(transform = %deployment, partition, store = %topic, checkpoint, start, end, "local state lies outside its changelog; restoring from the start");
            }
            task.wipe(store)?;
            start
        } else {
            checkpoint
        };
        if from < end {
            consumer
                .seek(topic, partition, StartFrom::Offset(from))
                .await?;
            plan.push((store, topic.clone(), consumer, end, (end - from) as u64));
        }
    }
    let total: u64 = plan.iter().map(|p| p.4).sum();
    if total > 0 {
        tracing::debug!(transform = %deployment, partition, records = total, "replaying changelogs");
    }
    progress(0, total);
    let mut restored = 0u64;
    for (store, topic, mut consumer, end, _) in plan {
        let mut pending: Vec<(bytes::Bytes, Option<bytes::Bytes>)> = Vec::new();
        loop {
            let position = consumer.position(&topic, partition).unwrap_or(end);
            if position >= end || pending.len() >= RESTORE_BATCH_RECORDS {
                restored += pending.len() as u64;
                task.restore(
                    store,
                    pending
                        .iter()
                        .map(|(k, v)| (k.as_ref(), v.as_ref().map(AsRef::as_ref))),
                    position,
                )?;
                pending.clear();
                progress(restored, total);
                if position >= end {
                    break;
                }
            }
            for record in consumer.poll().await? {
                // Keyless records cannot come from a store; skip them.
                if let Some(key) = record.key {
                    pending.push((key, record.value));
                }
            }
        }
    }
    Ok(restored)
}

fn set_progress(tasks: &SharedTasks, partition: u32, restored: u64, total: u64) {
    if let Some(progress) = lock(tasks).restoring.get_mut(&partition) {
        *progress = Progress { restored, total };
    }
}
