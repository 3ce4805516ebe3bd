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

pub mod ack;
pub mod backend;
pub mod definitions;
pub mod error;
pub mod message_store;
pub mod segment;
pub mod sync;

pub use backend::sim::{CrashMode, SimBackend};
pub use backend::{free_bytes, Backend, FileHandle, FsBackend, StorageFile};
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
