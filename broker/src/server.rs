//! Listeners, the accept loop and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::connection;

/// How long connections get to finish their close handshake after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A running broker: bound listeners plus the handle that stops it.
pub struct Server {
    broker: Arc<Broker>,
    listeners: Vec<TcpListener>,
}

impl Server {
    /// Binds every configured listener. An IPv6 loopback listener that cannot be bound (no IPv6
    /// on the host) is skipped with a warning; any other bind failure is an error.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let mut listeners = Vec::new();
        for addr in &config.listen {
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(addr = %listener.local_addr().unwrap_or(*addr), "listening for AMQP 0-9-1");
                    listeners.push(listener);
                }
                // Containers and some hosts have no IPv6 loopback: not worth a warning.
                Err(e) if addr.is_ipv6() && config.listen.len() > 1 => {
                    if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                        info!(%addr, "no IPv6 loopback here; listening on IPv4 only");
                    } else {
                        warn!(%addr, error = %e, "skipping IPv6 listener");
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
            }
        }
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        // Every segment and ack file of every durable queue holds a descriptor.
        match warren_storage::raise_open_files_limit() {
            Ok(limit) => info!(limit = ?limit, "open files limit"),
            Err(e) => warn!(error = %e, "cannot raise the open files limit"),
        }
        let data_dir = config.data_dir.clone();
        let started = std::time::Instant::now();
        let broker = Broker::open(config)
            .with_context(|| format!("cannot open the data directory {}", data_dir.display()))?;
        info!(
            data_dir = %data_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "durable state recovered"
        );
        Ok(Server { broker, listeners })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `stop` resolves, then closes every connection with 320 and returns.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // Each connection task holds a clone; recv() returns None once all have finished.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        for listener in self.listeners {
            let broker = self.broker.clone();
            let shutdown = shutdown_rx.clone();
            let done = done_tx.clone();
            tokio::spawn(accept_loop(listener, broker, shutdown, done));
        }
        drop(done_tx);
        let syncer = tokio::spawn(housekeeping(self.broker.clone()));
        let disk_watcher = tokio::spawn(watch_disk(self.broker.clone()));
        stop.await;
        info!(
            connections = self.broker.open_connections(),
            "shutting down: closing client connections"
        );
        let _ = shutdown_tx.send(true);
        if tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
        syncer.abort();
        disk_watcher.abort();
        // Everything written so far becomes durable before the process exits.
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for vhost in broker.vhosts() {
                for queue in vhost.queues() {
                    queue.sync_now();
                }
            }
        })
        .await;
        info!("stopped");
    }
}

/// Persistent messages published without confirms still reach the disk within this period,
/// expired messages leave queue heads this often, and a queue past its `x-expires` goes
/// within this much of it.
const HOUSEKEEPING: Duration = Duration::from_millis(200);

/// Group-commits stores that have unsynced writes nobody is waiting for, drops expired
/// messages from queue heads and deletes queues whose `x-expires` has run out.
async fn housekeeping(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        for vhost in broker.vhosts() {
            for queue in vhost.queues() {
                // The first check takes no vhost lock; expire_queue checks again under it.
                // As RabbitMQ: the queue goes with its messages (not dead-lettered).
                if queue.expired(now) && vhost.expire_queue(&queue, now) {
                    info!(vhost = %vhost.name, queue = %queue.name, "queue expired (x-expires)");
                    continue;
                }
                queue.drop_expired();
                if let (Some(persistence), Some(handle)) = (
                    broker.persistence.as_ref(),
                    queue.prepare_sync(crate::queue::handle::SyncKind::Background),
                ) {
                    persistence.sync.request(handle, |_| {});
                }
            }
        }
    }
}

/// How often free disk space is checked against `disk_free_limit`.
const DISK_CHECK: Duration = Duration::from_secs(1);

/// Raises and clears the disk alarm from the free space of the data directory.
async fn watch_disk(broker: Arc<Broker>) {
    let limit = broker.config.disk_free_limit;
    if limit == 0 {
        return;
    }
    let dir = broker.config.data_dir.clone();
    let mut tick = tokio::time::interval(DISK_CHECK);
    loop {
        tick.tick().await;
        match warren_storage::free_bytes(&dir) {
            Ok(free) => {
                let low = free < limit;
                if low != broker.resources.disk_alarm() {
                    if low {
                        warn!(
                            free,
                            limit,
                            "disk alarm: free disk space below the limit, blocking publishers"
                        );
                    } else {
                        info!(free, limit, "disk alarm cleared");
                    }
                }
                broker.resources.set_disk_alarm(low);
            }
            Err(e) => warn!(error = %e, dir = %dir.display(), "cannot read free disk space"),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let broker = broker.clone();
                    let shutdown = shutdown.clone();
                    let done = done.clone();
                    tokio::spawn(async move {
                        connection::serve(stream, peer, broker, shutdown).await;
                        drop(done);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
