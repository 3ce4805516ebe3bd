//! Warren persistent store (definitions and message segments); synchronous by design: the
//! broker decides which thread blocks on disk.
//!
//! - [`QueueStore`]: one directory per durable queue; append-only segment files of message
//!   records plus per-segment ack files; recovery returns the unacked messages in order.
//! - [`SyncService`]: group commit, one fsync thread for every store.
//! - [`Definitions`]: vhosts, users, permissions, exchanges, queues and bindings in a
//!   compacted, fsynced log.
//! - [`Backend`]: the file-system seam; [`SimBackend`] simulates crashes for tests.
//!
//! The bytes on disk are described in `storage/FORMAT.md`.
//!
//! # How the broker uses it
//!
//! 1. At boot: `Definitions::open(FsBackend::shared(), &data.join("definitions"))`, declare
//!    what `state()` holds; start one [`SyncService`] for the process.
//! 2. For each durable queue: `QueueStore::recover(backend, &dir, config)`; keep the returned
//!    [`MsgLocation`]s as the ready list, with `redelivered = delivered` (or simply `true`
//!    for all). Delete queue directories no definition refers to.
//! 3. Publish of a persistent message to a durable queue: `append` (bytes go to the page
//!    cache), keep the 12-byte location instead of the body; when the queue has drained its
//!    mailbox, `prepare_sync()` once and `SyncService::request(handle, completion)`; the
//!    completion (run on the sync thread; send on a channel) is what lets the publisher
//!    confirm go out.
//! 4. Delivery: `read(loc)` returns the exchange, routing key, property bytes and body;
//!    optionally `mark_delivered(loc)`. Ack: `ack(loc)`. Purge: `purge(&ready_locations)`.
//!    Queue delete: `delete()`. Definition changes: `Definitions::apply` (fsynced on return).
//! 5. Disk alarm: compare [`free_bytes`] of the data directory with the configured limit.
//! 6. At startup, [`raise_open_files_limit`]: each segment and ack file keeps a descriptor.

pub mod ack;
pub mod backend;
pub mod definitions;
pub mod error;
pub mod message_store;
pub mod segment;
pub mod sync;

pub use backend::sim::{CrashMode, SimBackend};
pub use backend::{
    free_bytes, raise_open_files_limit, Backend, FileHandle, FsBackend, StorageFile,
};
pub use definitions::{
    BindingDef, DefChange, DefinitionSet, Definitions, ExchangeDef, PermissionDef, QueueDef,
    UserDef, VhostDef,
};
pub use error::{Result, StorageError};
pub use message_store::{
    MsgLocation, QueueStore, Recovered, RecoveredMessage, RecoveryReport, StoreConfig, StoreStats,
};
pub use segment::{Body, StoredMessage, StoredMessageOwned};
pub use sync::{SyncError, SyncHandle, SyncResult, SyncService, SyncStats};
