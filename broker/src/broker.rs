//! Broker-wide shared state: configuration, users, virtual hosts and id allocation.

use crate::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::auth::Users;
use crate::config::Config;
use crate::persist::Persistence;
use crate::resources::{total_memory, ResourceMonitor};
use crate::vhost::VHost;
use warren_storage::{DefChange, DefinitionSet, StorageError, VhostDef};

/// State shared by every connection task.
///
/// Lock order: `vhosts` before any per-vhost lock. No lock here is held across `.await`.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub users: Users,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    /// Source of globally unique ids (channel keys, consumer tags, queue names).
    next_id: AtomicU64,
    /// Memory held by messages; its alarm blocks publishers.
    pub resources: &'static ResourceMonitor,
    /// Connections that completed connection.open-ok and are still open.
    open_connections: AtomicUsize,
    /// Durable state; None for a broker that keeps nothing on disk (unit tests).
    pub persistence: Option<Arc<Persistence>>,
}

impl Broker {
    /// A broker that keeps nothing on disk.
    pub fn new(config: Config) -> Arc<Broker> {
        Self::build(config, None)
    }

    /// Opens the data directory, recovering durable vhosts, exchanges, queues (with their
    /// persistent messages) and bindings.
    pub fn open(config: Config) -> Result<Arc<Broker>, StorageError> {
        let (persistence, defs) = Persistence::open(&config.data_dir)?;
        let broker = Self::build(config, Some(persistence.clone()));
        broker.recover(&persistence, &defs);
        Ok(broker)
    }

    fn build(config: Config, persistence: Option<Arc<Persistence>>) -> Arc<Broker> {
        let mut users = Users::default();
        let loopback_only = config.loopback_users.contains(&config.default_user);
        users.add(&config.default_user, &config.default_pass, loopback_only);
        // Without /proc/meminfo, assume a small machine rather than disabling the alarm.
        let total = total_memory().unwrap_or(1 << 30);
        let memory = ResourceMonitor::with_paging(
            config.memory_high_watermark.bytes(total),
            config.memory_paging_ratio,
        );
        let mut vhosts = HashMap::default();
        vhosts.insert(
            config.default_vhost.clone(),
            VHost::new(&config.default_vhost, memory, persistence.clone()),
        );
        Arc::new(Broker {
            resources: memory,
            config,
            users,
            vhosts: RwLock::new(vhosts),
            next_id: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
            persistence,
        })
    }

    fn recover(&self, persistence: &Arc<Persistence>, defs: &DefinitionSet) {
        {
            let mut vhosts = self.vhosts.write().unwrap_or_else(|e| e.into_inner());
            for name in defs.vhosts.keys() {
                vhosts
                    .entry(name.clone())
                    .or_insert_with(|| VHost::new(name, self.resources, Some(persistence.clone())));
            }
        }
        if !defs.vhosts.contains_key(&self.config.default_vhost) {
            persistence.record(DefChange::PutVhost(VhostDef {
                name: self.config.default_vhost.clone(),
                description: "Default virtual host".into(),
                tags: Vec::new(),
            }));
        }
        for def in defs.exchanges.values() {
            if let Some(vhost) = self.vhost(&def.vhost) {
                vhost.recover_exchange(def);
            }
        }
        let live: Vec<(String, String)> = defs.queues.keys().cloned().collect();
        persistence.remove_orphan_stores(&live);
        for def in defs.queues.values() {
            if let Some(vhost) = self.vhost(&def.vhost) {
                vhost.recover_queue(def);
            }
        }
        for def in defs.bindings() {
            if let Some(vhost) = self.vhost(&def.vhost) {
                vhost.recover_binding(def);
            }
        }
    }

    /// Every vhost (for periodic work such as syncing stores).
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let map = self.vhosts.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        // A poisoned lock only means another task panicked mid-update of the map; the map
        // itself is still consistent (inserts are single operations), so keep serving.
        let map = self.vhosts.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned()
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a slot for an opening connection; false when `max_connections` is reached.
    pub fn try_open_connection(&self) -> bool {
        let max = self.config.max_connections;
        let mut current = self.open_connections.load(Ordering::Relaxed);
        loop {
            if max != 0 && current >= max {
                return false;
            }
            match self.open_connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    pub fn close_connection(&self) {
        self.open_connections.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }
}
