//! Standby tasks: warm copies of a stateful deployment's tasks that other brokers run.
//!
//! With `standby-replicas: N`, the group coordinator names up to N members besides a
//! task's owner to keep its stores warm (`GroupConsumer::standby`). Each such partition
//! gets a standby here ([`crate::tasks::follow`]): it opens the task's stores in the
//! directory the task itself would use and follows the changelogs. The partitions whose
//! standbys caught up are reported warm in heartbeats, and when a task must move (its
//! broker died or left), the coordinator gives it to a member that keeps it warm: its
//! open then replays only the records the standby had not applied yet.
//!
//! **Invariant:** a standby never shares stores with a running task: it starts only for a
//! partition that is neither assigned here nor open, and it is stopped, its stores
//! closed, before the task of its partition opens ([`Standbys::stop`] waits for it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use runnel_client::Client;
use tokio::sync::watch;

use crate::tasks::{self, SharedTasks};

/// How long a standby that failed waits before it starts again.
const RESTART_DELAY: Duration = Duration::from_secs(2);

struct Running {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// The standbys of one deployment on this broker.
pub struct Standbys {
    tasks: SharedTasks,
    deployment: String,
    running: BTreeMap<u32, Running>,
    /// Partitions whose standby failed, and when it may start again.
    failed: BTreeMap<u32, Instant>,
}

impl Standbys {
    pub fn new(tasks: SharedTasks, deployment: &str) -> Self {
        Standbys {
            tasks,
            deployment: deployment.to_string(),
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Runs a standby for each partition of `wanted` that `here` refuses (not assigned
    /// or open on this broker) and stops the others, but for those `here` accepts: the
    /// task that opens there stops its standby itself ([`Standbys::stop`]).
    pub async fn reconcile(
        &mut self,
        client: &Client,
        wanted: &BTreeSet<u32>,
        here: impl Fn(u32) -> bool,
    ) {
        let unwanted: Vec<u32> = self
            .running
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p) && !here(*p))
            .collect();
        for partition in unwanted {
            self.stop(partition).await;
        }
        let ended: Vec<u32> = self
            .running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for partition in ended {
            self.stop(partition).await;
            self.failed
                .insert(partition, Instant::now() + RESTART_DELAY);
        }
        let now = Instant::now();
        self.failed.retain(|_, at| *at > now);
        for &partition in wanted {
            if here(partition)
                || self.running.contains_key(&partition)
                || self.failed.contains_key(&partition)
            {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let (tasks, client, deployment) =
                (self.tasks.clone(), client.clone(), self.deployment.clone());
            let handle = tokio::spawn(async move {
                tracing::debug!(transform = %deployment, partition, "standby started");
                if let Err(err) = tasks::follow(&tasks, &client, partition, stopped).await {
                    tracing::warn!(transform = %deployment, partition, error = %format!("{err:#}"), "standby stopped; starting it again shortly");
                }
            });
            self.running.insert(partition, Running { stop, handle });
        }
    }

    /// Stops the standby of `partition`, if any, and waits until its stores are closed.
    /// Returns whether there was one.
    pub async fn stop(&mut self, partition: u32) -> bool {
        let Some(running) = self.running.remove(&partition) else {
            return false;
        };
        running.stop.send_replace(true);
        let _ = running.handle.await;
        true
    }

    /// Stops every standby and waits for them.
    pub async fn stop_all(&mut self) {
        let partitions: Vec<u32> = self.running.keys().copied().collect();
        for partition in partitions {
            self.stop(partition).await;
        }
    }

    /// Partitions whose standby caught up with the changelogs.
    pub fn warm(&self) -> BTreeSet<u32> {
        tasks::lock(&self.tasks)
            .warm()
            .into_iter()
            .filter(|p| self.running.contains_key(p))
            .collect()
    }
}

impl Drop for Standbys {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.stop.send_replace(true);
        }
    }
}
