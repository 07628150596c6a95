//! The controller's state machine: the cluster metadata, applied from the Raft log.
//!
//! The metadata lives in memory and is published after every applied entry as an
//! immutable [`MetadataImage`]. Its durable form is the snapshot (`snapshot.json`, replaced
//! atomically) plus the log entries after it: a restarted controller loads the snapshot
//! and re-applies the committed entries.
//!
//! **Invariant:** images are published in log order (one per applied batch of entries),
//! each with the index of the last entry it contains; a broker acts only on an image it received, never ahead of it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{ClusterMetadata, CommandResult, Outcome};
use crate::{Node, NodeId, TypeConfig};

/// The committed metadata up to a log index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataImage {
    /// The index of the last log entry applied (0 before the first).
    pub index: u64,
    pub metadata: ClusterMetadata,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    metadata: ClusterMetadata,
}

struct MachineInner {
    dir: PathBuf,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    metadata: ClusterMetadata,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// The state machine handed to openraft; clones share one machine.
#[derive(Clone)]
pub struct MetadataMachine {
    inner: Arc<Mutex<MachineInner>>,
    images: watch::Sender<Arc<MetadataImage>>,
}

fn snapshot_error(err: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, err).into()
}

impl MetadataMachine {
    /// Loads the last snapshot in `dir`, if any.
    ///
    /// # Errors
    /// An unreadable or unparsable snapshot.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join("snapshot.json");
        let snapshot: Option<StoredSnapshot> = match std::fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {err}", path.display()),
                )
            })?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        let (last_applied, membership, metadata) = match &snapshot {
            Some(s) => (
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
                s.metadata.clone(),
            ),
            None => (
                None,
                StoredMembership::default(),
                ClusterMetadata::default(),
            ),
        };
        let image = MetadataImage {
            index: last_applied.map_or(0, |l| l.index),
            metadata: metadata.clone(),
        };
        Ok(MetadataMachine {
            inner: Arc::new(Mutex::new(MachineInner {
                dir: dir.to_path_buf(),
                last_applied,
                membership,
                metadata,
                snapshot,
                snapshots_built: 0,
            })),
            images: watch::Sender::new(Arc::new(image)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MachineInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The latest image.
    pub fn current(&self) -> Arc<MetadataImage> {
        self.images.borrow().clone()
    }

    /// The latest image and every newer one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.images.subscribe()
    }

    fn publish(&self, inner: &MachineInner) {
        let image = MetadataImage {
            index: inner.last_applied.map_or(0, |l| l.index),
            metadata: inner.metadata.clone(),
        };
        self.images.send_replace(Arc::new(image));
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MetadataMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        let snapshot_id = format!(
            "{}-{}",
            inner.last_applied.map_or(0, |l| l.index),
            inner.snapshots_built
        );
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
                snapshot_id,
            },
            metadata: inner.metadata.clone(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| snapshot_error(&e))?;
        crate::raft_log::write_atomically(&inner.dir.join("snapshot.json"), &bytes, true)
            .map_err(|e| snapshot_error(&e))?;
        let meta = stored.meta.clone();
        inner.snapshot = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MetadataMachine {
    type SnapshotBuilder = MetadataMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut results = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Done),
                EntryPayload::Normal(command) => inner.metadata.apply(command),
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(Outcome::Done)
                }
            };
            results.push(result);
        }
        // One image per applied batch: each holds a copy of the whole metadata.
        self.publish(&inner);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let stored: StoredSnapshot = serde_json::from_slice(&bytes).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let mut inner = self.lock();
        crate::raft_log::write_atomically(&inner.dir.join("snapshot.json"), &bytes, true)
            .map_err(|e| snapshot_error(&e))?;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.metadata = stored.metadata.clone();
        inner.snapshot = Some(StoredSnapshot {
            meta: meta.clone(),
            metadata: stored.metadata,
        });
        self.publish(&inner);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        let Some(stored) = &inner.snapshot else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(stored).map_err(|e| snapshot_error(&e))?;
        Ok(Some(Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}
