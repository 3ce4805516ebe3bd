//! The broker's side of durability: where stores live on disk, the definitions log, the group
//! commit service, and the recovery of durable objects at boot.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use warren_storage::{
    Backend, DefChange, DefinitionSet, Definitions, FsBackend, QueueStore, RecoveredMessage,
    StorageError, StoreConfig, SyncService,
};

/// Durable state shared by the whole broker.
///
/// Lock order: `definitions` is a leaf lock (nothing else is taken while holding it).
pub struct Persistence {
    backend: Arc<dyn Backend>,
    root: PathBuf,
    pub sync: SyncService,
    definitions: Mutex<Definitions>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("root", &self.root)
            .finish()
    }
}

impl Persistence {
    /// Opens (or creates) the data directory and returns the recorded definitions.
    pub fn open(root: &Path) -> Result<(Arc<Persistence>, DefinitionSet), StorageError> {
        let backend: Arc<dyn Backend> = Arc::new(FsBackend);
        // Spilled transient messages never survive a restart.
        let spill = root.join("spill");
        backend
            .remove_dir_all(&spill)
            .map_err(|e| StorageError::Io {
                path: spill.clone(),
                source: e,
            })?;
        let definitions = Definitions::open(backend.clone(), &root.join("definitions"))?;
        let state = definitions.state().clone();
        let sync = SyncService::start().map_err(|e| StorageError::Io {
            path: root.to_path_buf(),
            source: e,
        })?;
        Ok((
            Arc::new(Persistence {
                backend,
                root: root.to_path_buf(),
                sync,
                definitions: Mutex::new(definitions),
            }),
            state,
        ))
    }

    /// Records a definition change durably (fsynced before returning). A failure is logged:
    /// the change is live in memory, and the client already got its answer semantics.
    pub fn record(&self, change: DefChange) {
        let mut defs = self.definitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = defs.apply(change) {
            warn!(error = %e, "cannot record a definition change");
        }
    }

    /// Directory of a durable queue's message store. Names may hold any bytes and be 255
    /// bytes long, so the directory is named by a 128-bit hash of (vhost, name).
    pub fn queue_dir(&self, vhost: &str, name: &str) -> PathBuf {
        let mut key = Vec::with_capacity(vhost.len() + name.len() + 1);
        key.extend_from_slice(vhost.as_bytes());
        key.push(0);
        key.extend_from_slice(name.as_bytes());
        let a = fnv1a64(&key, 0xcbf2_9ce4_8422_2325);
        let b = fnv1a64(&key, 0x6c62_272e_07bb_0142);
        self.root.join("queues").join(format!("{a:016x}{b:016x}"))
    }

    /// A fresh, empty store for a newly declared durable queue.
    pub fn create_store(&self, vhost: &str, name: &str) -> Result<QueueStore, StorageError> {
        QueueStore::create(
            self.backend.clone(),
            &self.queue_dir(vhost, name),
            StoreConfig::default(),
        )
    }

    /// The store of a durable queue found in the definitions; its unacked messages go to
    /// `on_message` in publish order.
    pub fn recover_store(
        &self,
        vhost: &str,
        name: &str,
        on_message: &mut dyn FnMut(RecoveredMessage),
    ) -> Result<QueueStore, StorageError> {
        let dir = self.queue_dir(vhost, name);
        let mut messages = 0u64;
        let (store, report) = QueueStore::recover_each(
            self.backend.clone(),
            &dir,
            StoreConfig::default(),
            &mut |m| {
                messages += 1;
                on_message(m);
            },
        )?;
        if report.truncated_bytes > 0 {
            warn!(
                queue = name,
                vhost,
                bytes = report.truncated_bytes,
                "cut a torn or corrupt tail from the queue's segments"
            );
        }
        info!(
            queue = name,
            vhost,
            messages,
            segments = report.segments,
            "recovered durable queue"
        );
        Ok(store)
    }

    /// A spill file for transient messages a queue cannot keep in memory. Never synced, and
    /// wiped at boot.
    pub fn create_spill(&self, vhost: &str, name: &str) -> Result<QueueStore, StorageError> {
        let dir = self.queue_dir(vhost, name);
        let leaf = dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        QueueStore::create(
            self.backend.clone(),
            &self.root.join("spill").join(leaf),
            StoreConfig::default(),
        )
    }

    /// Removes store directories that belong to no durable queue (a queue deleted by a crash
    /// between its definition record and its files, or a store of a format we replaced).
    pub fn remove_orphan_stores(&self, live: &[(String, String)]) {
        let queues = self.root.join("queues");
        let keep: std::collections::HashSet<PathBuf> = live
            .iter()
            .map(|(vhost, name)| self.queue_dir(vhost, name))
            .collect();
        let Ok(names) = self.backend.list_dir(&queues) else {
            return;
        };
        for name in names {
            let dir = queues.join(&name);
            if !keep.contains(&dir) {
                warn!(dir = %dir.display(), "removing a message store no durable queue refers to");
                if let Err(e) = self.backend.remove_dir_all(&dir) {
                    warn!(error = %e, dir = %dir.display(), "cannot remove an orphan store");
                }
            }
        }
    }

    /// Removes the store directory of a deleted queue.
    pub fn remove_store_dir(&self, vhost: &str, name: &str) {
        let dir = self.queue_dir(vhost, name);
        if let Err(e) = self.backend.remove_dir_all(&dir) {
            warn!(error = %e, dir = %dir.display(), "cannot remove a deleted queue's store");
        }
    }
}

fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn queue_dirs_are_distinct_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (p, defs) = Persistence::open(dir.path()).unwrap();
        assert!(defs.vhosts.is_empty());
        let a = p.queue_dir("/", "q");
        assert_eq!(a, p.queue_dir("/", "q"));
        assert_ne!(a, p.queue_dir("/", "q2"));
        assert_ne!(p.queue_dir("/a", "b"), p.queue_dir("/", "ab"));
        assert!(a.starts_with(dir.path().join("queues")));
    }
}
