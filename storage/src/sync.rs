//! Group commit: one OS thread fsyncs the files of many queues in batches. While a batch runs,
//! new requests pile up and form the next batch, so under load each fsync covers many appends
//! without any timer.
//!
//! Completions run on the sync thread and must not block: send on a channel, complete a
//! oneshot, bump an atomic. For example, from async code without this crate knowing tokio:
//!
//! ```
//! use std::sync::mpsc;
//! use warren_storage::{SimBackend, QueueStore, StoreConfig, StoredMessage, Body, SyncService};
//!
//! let disk = SimBackend::new();
//! let mut store = QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default())?;
//! let service = SyncService::start()?;
//! let loc = store.append(&StoredMessage {
//!     flags: 0, timestamp_ms: 0, exchange: b"", routing_key: b"q", properties: b"", body: Body::Contiguous(b"hi"),
//! })?;
//! // In the broker this would be a tokio oneshot::Sender or an unbounded mpsc::Sender.
//! let (tx, rx) = mpsc::channel();
//! service.request(store.prepare_sync()?, move |result| {
//!     let _ = tx.send((loc, result));
//! });
//! let (confirmed, result) = rx.recv().expect("sync thread alive");
//! assert_eq!(confirmed, loc);
//! assert!(result.is_ok()); // only now may the publisher confirm be sent
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::backend::FileHandle;

/// The files to fsync so that everything written to a store before
/// [`crate::QueueStore::prepare_sync`] is durable. Cheap to clone; holds no lock of the store.
#[derive(Debug, Clone, Default)]
pub struct SyncHandle {
    files: Vec<FileHandle>,
}

impl SyncHandle {
    /// A handle over these files.
    pub fn new(files: Vec<FileHandle>) -> Self {
        SyncHandle { files }
    }

    /// Adds another handle's files (e.g. to sync several stores as one request).
    pub fn merge(&mut self, other: SyncHandle) {
        self.files.extend(other.files);
    }

    /// Number of files (possibly with duplicates).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there is nothing to sync.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// fsyncs every file now, on this thread.
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync()?;
        }
        Ok(())
    }
}

/// Why a sync request failed. After a failed fsync the kernel may have dropped the dirty
/// pages, so the data must be considered lost: nack the publishes, and recover the store.
#[derive(Debug, Clone, thiserror::Error)]
#[error("fsync failed: {message}")]
pub struct SyncError {
    /// The `io::ErrorKind` of the failure.
    pub kind: io::ErrorKind,
    /// Its message.
    pub message: String,
}

/// What a completion receives.
pub type SyncResult = Result<(), SyncError>;

type Completion = Box<dyn FnOnce(SyncResult) + Send>;

/// Counters of a [`SyncService`], e.g. for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Requests completed.
    pub requests: u64,
    /// Batches run.
    pub batches: u64,
    /// fsync calls made (distinct files per batch).
    pub fsyncs: u64,
    /// Largest number of requests in one batch.
    pub max_batch: u64,
}

#[derive(Default)]
struct Queue {
    pending: Vec<(SyncHandle, Completion)>,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    requests: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    max_batch: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Completions run outside the lock, so poisoning can only come from a bug in this
        // module; the queue itself stays consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The group-commit thread. Dropping it (or calling [`Self::shutdown`]) completes every
/// request already made, then joins the thread.
///
/// Invariant: a request's completion runs only after a batch that started after the request
/// was made has fsynced every file of the request, so requests complete in batch order and a
/// completed request implies every earlier-batched request was synced too.
pub struct SyncService {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SyncService {
    /// Starts the sync thread.
    pub fn start() -> io::Result<SyncService> {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("warren-fsync".into())
            .spawn(move || run(&s))?;
        Ok(SyncService {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for `handle` to be fsynced; `done` runs on the sync thread once it is (or failed).
    pub fn request(&self, handle: SyncHandle, done: impl FnOnce(SyncResult) + Send + 'static) {
        let mut q = self.shared.lock();
        q.pending.push((handle, Box::new(done)));
        drop(q);
        self.shared.wake.notify_one();
    }

    /// Counters so far.
    pub fn stats(&self) -> SyncStats {
        SyncStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            max_batch: self.shared.max_batch.load(Ordering::Relaxed),
        }
    }

    /// Completes every pending request, then stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // A panic on the sync thread would be a bug in a completion; nothing to recover.
            let _ = t.join();
        }
    }
}

impl Drop for SyncService {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ptr(f: &FileHandle) -> usize {
    Arc::as_ptr(f) as *const () as usize
}

/// Most fsyncs run at once within a batch. Concurrent fsyncs of different files share the file
/// system's journal commit and the device cache flush (ext4/xfs batch them), so a batch of many
/// queues costs about as much as one fsync instead of one per queue. They sleep in the kernel,
/// so this costs threads, not cores.
const MAX_PARALLEL_FSYNCS: usize = 32;

/// The files of the batch being synced, shared by the coordinator and its helpers.
#[derive(Default)]
struct Work {
    files: Vec<FileHandle>,
    /// Index of the next file to hand out.
    next: usize,
    /// Files whose fsync returned.
    finished: usize,
    failed: Vec<(usize, SyncError)>,
    shutdown: bool,
}

/// Helper threads for parallel fsyncs, spawned on demand (a broker with one busy queue never
/// starts one) and kept for the next batch, because spawning per batch costs more CPU than the
/// fsync calls themselves at thousands of batches per second.
///
/// Invariant: `finished <= next <= files.len()`; the batch is done when
/// `finished == files.len()`.
#[derive(Default)]
struct Helpers {
    work: Mutex<Work>,
    /// Signalled when a batch is published or on shutdown.
    more: Condvar,
    /// Signalled when the last file of a batch finished.
    done: Condvar,
}

impl Helpers {
    fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes files and syncs them until none is left to hand out.
    fn drain(&self) {
        let mut w = self.lock();
        while let Some(f) = w.files.get(w.next).cloned() {
            w.next += 1;
            drop(w);
            let result = f.sync();
            w = self.lock();
            w.finished += 1;
            if let Err(e) = result {
                tracing::error!(error = %e, file = ?f, "fsync failed");
                w.failed.push((
                    ptr(&f),
                    SyncError {
                        kind: e.kind(),
                        message: e.to_string(),
                    },
                ));
            }
            if w.finished == w.files.len() {
                self.done.notify_all();
            }
        }
    }

    fn helper_loop(&self) {
        loop {
            {
                let mut w = self.lock();
                while w.next >= w.files.len() && !w.shutdown {
                    w = self.more.wait(w).unwrap_or_else(|p| p.into_inner());
                }
                if w.shutdown {
                    return;
                }
            }
            self.drain();
        }
    }
}

/// The coordinator's side of the pool.
struct Pool {
    helpers: Arc<Helpers>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new() -> Self {
        Pool {
            helpers: Arc::new(Helpers::default()),
            threads: Vec::new(),
        }
    }

    /// fsyncs `files` with up to [`MAX_PARALLEL_FSYNCS`] threads; returns the failures by file.
    fn sync_all(&mut self, files: Vec<FileHandle>) -> Vec<(usize, SyncError)> {
        let want = files.len().min(MAX_PARALLEL_FSYNCS).saturating_sub(1);
        while self.threads.len() < want {
            let h = Arc::clone(&self.helpers);
            match std::thread::Builder::new()
                .name("warren-fsync-helper".into())
                .stack_size(256 * 1024)
                .spawn(move || h.helper_loop())
            {
                Ok(t) => self.threads.push(t),
                // Fewer helpers only means less parallelism.
                Err(_) => break,
            }
        }
        let n = files.len();
        {
            let mut w = self.helpers.lock();
            w.files = files;
            w.next = 0;
            w.finished = 0;
            w.failed.clear();
        }
        if n > 1 {
            self.helpers.more.notify_all();
        }
        self.helpers.drain();
        let mut w = self.helpers.lock();
        while w.finished < n {
            w = self.helpers.done.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        w.files.clear();
        std::mem::take(&mut w.failed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.helpers.lock().shutdown = true;
        self.helpers.more.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared) {
    let mut pool = Pool::new();
    loop {
        let batch = {
            let mut q = shared.lock();
            while q.pending.is_empty() && !q.shutdown {
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.pending.is_empty() {
                return;
            }
            std::mem::take(&mut q.pending)
        };
        // The same file is often in many requests (one queue, many publishers): sync it once.
        let mut seen = HashSet::new();
        let mut files = Vec::new();
        for (handle, _) in &batch {
            for f in &handle.files {
                if seen.insert(ptr(f)) {
                    files.push(Arc::clone(f));
                }
            }
        }
        let fsyncs = files.len() as u64;
        let failed = pool.sync_all(files);
        let n = batch.len() as u64;
        // Counted before the completions run: whoever a completion wakes may read the
        // stats and must find its request in them.
        shared.requests.fetch_add(n, Ordering::Relaxed);
        shared.batches.fetch_add(1, Ordering::Relaxed);
        shared.fsyncs.fetch_add(fsyncs, Ordering::Relaxed);
        shared.max_batch.fetch_max(n, Ordering::Relaxed);
        for (handle, done) in batch {
            let err = handle
                .files
                .iter()
                .find_map(|f| failed.iter().find(|(p, _)| *p == ptr(f)))
                .map(|(_, e)| e.clone());
            // A panicking completion must not kill the thread every other queue relies on.
            let result = err.map_or(Ok(()), Err);
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result))).is_err() {
                tracing::error!("a sync completion panicked");
            }
        }
    }
}
