//! `StorageError`: the one error type of the storage crate, with the path and offset that failed.

use std::io;
use std::path::PathBuf;

use crate::MsgLocation;

/// Everything that can go wrong in the storage crate.
///
/// I/O errors carry the path they happened on, because "No such file or directory" alone is
/// useless in a broker with thousands of queue directories.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A record or header failed its checksum or structure check where a torn tail cannot explain
    /// it (e.g. a `read` of a live location, or a definitions record that does not decode).
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file holding the bad bytes.
        path: PathBuf,
        /// Byte offset of the record or header.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// A file carries our magic but a format version this build does not understand.
    #[error("unsupported format version {found} in {path} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found in its header.
        found: u32,
        /// Version this build reads and writes.
        supported: u32,
    },
    /// A message does not fit in one record (payload length is a `u32`).
    #[error("message too large for a segment record: {size} bytes")]
    MessageTooLarge {
        /// The encoded payload size that was refused.
        size: u64,
    },
    /// An exchange name or routing key longer than an AMQP short string (255 bytes).
    #[error("{field} is {len} bytes, longer than the 255 of a short string")]
    FieldTooLong {
        /// `"exchange"` or `"routing_key"`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The location names no live message: its segment was deleted (fully acked or purged), the
    /// message was already acked, or it lies beyond the end of the segment.
    #[error("no live message at {0:?}")]
    UnknownLocation(MsgLocation),
    /// An earlier write or sync failed, so the in-memory view of the files can no longer be
    /// trusted; every further mutation is refused. Reopen (recover) the store to continue.
    #[error("store is poisoned by an earlier I/O failure; recover it to continue")]
    Poisoned,
    /// A definition could not be encoded or decoded as JSON.
    #[error("definitions record at offset {offset} of {path}: {source}")]
    Definition {
        /// The definitions log.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the path it concerns; used as `.map_err(io_err(&path))`.
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}
