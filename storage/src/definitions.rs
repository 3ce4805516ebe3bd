//! Durable definitions (vhosts, users, permissions, exchanges, queues, bindings) as an
//! append-only log of changes, `definitions.log`, in the common record framing with a JSON
//! payload per change. Every change is fsynced before `apply` returns. On open the log is
//! replayed (a torn tail is dropped) and rewritten as a snapshot: one `put` per live
//! definition, written to a temporary file, fsynced, renamed over the log, directory fsynced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use amq_protocol_types::FieldTable;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FileHandle};
use crate::error::{io_err, Result, StorageError};
use crate::segment::{
    check_file_header, encode_record, file_header, HeaderCheck, RecordScanner, Scanned, DEFS_MAGIC,
    FILE_HEADER_LEN,
};

/// File name of the log inside the definitions directory.
pub const LOG_NAME: &str = "definitions.log";
const TMP_NAME: &str = "definitions.log.tmp";

/// A virtual host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostDef {
    /// Its name, e.g. `/`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A user. The broker chooses the hashing; the store keeps the strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDef {
    /// Login name.
    pub name: String,
    /// Encoded password hash (empty: no password login).
    pub password_hash: String,
    /// Name of the hashing algorithm used for `password_hash`.
    pub hashing_algorithm: String,
    /// RabbitMQ-style tags (`administrator`, `monitoring`, ...).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A user's permissions in a vhost (regular expressions, as in RabbitMQ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionDef {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// Configure regex.
    pub configure: String,
    /// Write regex.
    pub write: String,
    /// Read regex.
    pub read: String,
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Vhost name.
    pub vhost: String,
    /// Exchange name.
    pub name: String,
    /// Type name: `direct`, `fanout`, `topic`, `headers`, ...
    pub kind: String,
    /// Always true for stored exchanges; kept for completeness.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Not publishable by clients.
    pub internal: bool,
    /// The declare arguments, stored losslessly.
    #[serde(with = "wire_table")]
    pub arguments: FieldTable,
}

/// A durable queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    /// Vhost name.
    pub vhost: String,
    /// Queue name.
    pub name: String,
    /// Always true for stored queues; kept for completeness.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The declare arguments (`x-max-length`, `x-message-ttl`, ...), stored losslessly.
    #[serde(with = "wire_table")]
    pub arguments: FieldTable,
}

/// A binding from an exchange to a queue or to another exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingDef {
    /// Vhost name.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// Whether `destination` is a queue (else an exchange).
    pub destination_is_queue: bool,
    /// Binding key.
    pub routing_key: String,
    /// Binding arguments (e.g. for headers exchanges), part of the binding's identity.
    #[serde(with = "wire_table")]
    pub arguments: FieldTable,
}

/// One change to the definitions, the payload of one log record.
///
/// Deletes cascade (so the broker logs one record per user action): deleting a vhost removes
/// everything in it and its permissions; deleting a user removes its permissions; deleting a
/// queue removes the bindings to it; deleting an exchange removes bindings from and to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DefChange {
    /// Create or replace a vhost.
    PutVhost(VhostDef),
    /// Delete a vhost and everything in it.
    DeleteVhost {
        /// Vhost name.
        name: String,
    },
    /// Create or replace a user.
    PutUser(UserDef),
    /// Delete a user and its permissions.
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Set a user's permissions in a vhost.
    PutPermission(PermissionDef),
    /// Clear a user's permissions in a vhost.
    DeletePermission {
        /// User name.
        user: String,
        /// Vhost name.
        vhost: String,
    },
    /// Create or replace an exchange.
    PutExchange(ExchangeDef),
    /// Delete an exchange and its bindings.
    DeleteExchange {
        /// Vhost name.
        vhost: String,
        /// Exchange name.
        name: String,
    },
    /// Create or replace a queue.
    PutQueue(QueueDef),
    /// Delete a queue and the bindings to it.
    DeleteQueue {
        /// Vhost name.
        vhost: String,
        /// Queue name.
        name: String,
    },
    /// Add a binding (idempotent).
    PutBinding(BindingDef),
    /// Remove a binding (matched on every field).
    DeleteBinding(BindingDef),
}

/// Identity of a binding: every field, arguments in their canonical wire encoding
/// (`FieldTable` is not `Ord`, and floats make it not even `Eq`).
type BindingKey = (String, String, bool, String, String, Vec<u8>);

fn binding_key(b: &BindingDef) -> BindingKey {
    (
        b.vhost.clone(),
        b.source.clone(),
        b.destination_is_queue,
        b.destination.clone(),
        b.routing_key.clone(),
        wire_table::encode(&b.arguments).unwrap_or_default(),
    )
}

/// The current definitions. Maps are keyed by name, or `(vhost, name)`, or `(user, vhost)`
/// for permissions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DefinitionSet {
    /// Vhosts by name.
    pub vhosts: BTreeMap<String, VhostDef>,
    /// Users by name.
    pub users: BTreeMap<String, UserDef>,
    /// Permissions by (user, vhost).
    pub permissions: BTreeMap<(String, String), PermissionDef>,
    /// Exchanges by (vhost, name).
    pub exchanges: BTreeMap<(String, String), ExchangeDef>,
    /// Queues by (vhost, name).
    pub queues: BTreeMap<(String, String), QueueDef>,
    bindings: BTreeMap<BindingKey, BindingDef>,
}

impl DefinitionSet {
    /// Every binding, ordered by vhost, source, destination, key.
    pub fn bindings(&self) -> impl Iterator<Item = &BindingDef> {
        self.bindings.values()
    }

    /// Applies a change (see [`DefChange`] for the cascades).
    pub fn apply(&mut self, change: &DefChange) {
        match change {
            DefChange::PutVhost(v) => {
                self.vhosts.insert(v.name.clone(), v.clone());
            }
            DefChange::DeleteVhost { name } => {
                self.vhosts.remove(name);
                self.permissions.retain(|(_, vh), _| vh != name);
                self.exchanges.retain(|(vh, _), _| vh != name);
                self.queues.retain(|(vh, _), _| vh != name);
                self.bindings.retain(|k, _| &k.0 != name);
            }
            DefChange::PutUser(u) => {
                self.users.insert(u.name.clone(), u.clone());
            }
            DefChange::DeleteUser { name } => {
                self.users.remove(name);
                self.permissions.retain(|(u, _), _| u != name);
            }
            DefChange::PutPermission(p) => {
                self.permissions
                    .insert((p.user.clone(), p.vhost.clone()), p.clone());
            }
            DefChange::DeletePermission { user, vhost } => {
                self.permissions.remove(&(user.clone(), vhost.clone()));
            }
            DefChange::PutExchange(e) => {
                self.exchanges
                    .insert((e.vhost.clone(), e.name.clone()), e.clone());
            }
            DefChange::DeleteExchange { vhost, name } => {
                self.exchanges.remove(&(vhost.clone(), name.clone()));
                self.bindings
                    .retain(|k, _| !(&k.0 == vhost && (&k.1 == name || (!k.2 && &k.3 == name))));
            }
            DefChange::PutQueue(q) => {
                self.queues
                    .insert((q.vhost.clone(), q.name.clone()), q.clone());
            }
            DefChange::DeleteQueue { vhost, name } => {
                self.queues.remove(&(vhost.clone(), name.clone()));
                self.bindings
                    .retain(|k, _| !(&k.0 == vhost && k.2 && &k.3 == name));
            }
            DefChange::PutBinding(b) => {
                self.bindings.insert(binding_key(b), b.clone());
            }
            DefChange::DeleteBinding(b) => {
                self.bindings.remove(&binding_key(b));
            }
        }
    }

    /// The changes that rebuild this set from nothing (the snapshot written by compaction).
    pub fn to_changes(&self) -> Vec<DefChange> {
        let mut out = Vec::new();
        out.extend(self.vhosts.values().cloned().map(DefChange::PutVhost));
        out.extend(self.users.values().cloned().map(DefChange::PutUser));
        out.extend(
            self.permissions
                .values()
                .cloned()
                .map(DefChange::PutPermission),
        );
        out.extend(self.exchanges.values().cloned().map(DefChange::PutExchange));
        out.extend(self.queues.values().cloned().map(DefChange::PutQueue));
        out.extend(self.bindings.values().cloned().map(DefChange::PutBinding));
        out
    }
}

/// The definitions store.
///
/// Invariants: `state` == the replay of the log's records; `len` is the log's length, every
/// byte of which is fsynced; after a failed write or sync `poisoned` is set (what reached the
/// disk is unknown) and every further change is refused until reopened.
#[derive(Debug)]
pub struct Definitions {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    path: PathBuf,
    file: FileHandle,
    len: u64,
    /// Length of the log right after the last compaction; growth past a multiple of it
    /// triggers the next one.
    compacted_len: u64,
    state: DefinitionSet,
    poisoned: bool,
}

/// The log is compacted again once it grew by this factor over its compacted size (plus a
/// floor so a tiny log is not rewritten on every change).
const COMPACT_FACTOR: u64 = 4;
const COMPACT_FLOOR: u64 = 1 << 20;

impl Definitions {
    /// Opens (or creates) the definitions in `dir`: replays the log, dropping a torn tail,
    /// and compacts it.
    pub fn open(backend: Arc<dyn Backend>, dir: &Path) -> Result<Definitions> {
        backend.create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOG_NAME);
        let tmp = dir.join(TMP_NAME);
        let names = backend.list_dir(dir).map_err(io_err(dir))?;
        if names.iter().any(|n| n == TMP_NAME) {
            // A compaction cut by a crash; the log it was replacing is intact.
            backend.remove_file(&tmp).map_err(io_err(&tmp))?;
        }
        let mut state = DefinitionSet::default();
        if names.iter().any(|n| n == LOG_NAME) {
            replay(&*backend, &path, &mut state)?;
        }
        let mut defs = Definitions {
            file: backend.open_dir(dir).map_err(io_err(dir))?,
            backend,
            dir: dir.to_path_buf(),
            path,
            len: 0,
            compacted_len: 0,
            state,
            poisoned: true,
        };
        defs.compact()?;
        Ok(defs)
    }

    /// The current definitions.
    pub fn state(&self) -> &DefinitionSet {
        &self.state
    }

    /// Records one change durably (fsynced before returning), then applies it.
    pub fn apply(&mut self, change: DefChange) -> Result<()> {
        self.apply_all(std::slice::from_ref(&change))
    }

    /// Records several changes with one write and one fsync, then applies them.
    pub fn apply_all(&mut self, changes: &[DefChange]) -> Result<()> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let mut buf = Vec::new();
        for c in changes {
            let json = serde_json::to_vec(c).map_err(|source| StorageError::Definition {
                path: self.path.clone(),
                offset: self.len,
                source,
            })?;
            encode_record(&mut buf, &json)?;
        }
        // Poisoned until the write and the fsync both succeed.
        self.poisoned = true;
        self.file
            .write_all_at(&buf, self.len)
            .map_err(io_err(&self.path))?;
        self.file.sync().map_err(io_err(&self.path))?;
        self.poisoned = false;
        self.len += buf.len() as u64;
        for c in changes {
            self.state.apply(c);
        }
        if self.len > self.compacted_len.saturating_mul(COMPACT_FACTOR) + COMPACT_FLOOR {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log as a snapshot of the current state (write a temporary file, fsync,
    /// rename over the log, fsync the directory).
    pub fn compact(&mut self) -> Result<()> {
        self.poisoned = true;
        let tmp = self.dir.join(TMP_NAME);
        let mut buf = file_header(DEFS_MAGIC, 0).to_vec();
        for c in self.state.to_changes() {
            let json = serde_json::to_vec(&c).map_err(|source| StorageError::Definition {
                path: tmp.clone(),
                offset: buf.len() as u64,
                source,
            })?;
            encode_record(&mut buf, &json)?;
        }
        let file = self.backend.create_file(&tmp).map_err(io_err(&tmp))?;
        file.write_all_at(&buf, 0).map_err(io_err(&tmp))?;
        file.sync().map_err(io_err(&tmp))?;
        self.backend
            .rename(&tmp, &self.path)
            .map_err(io_err(&self.path))?;
        self.backend
            .open_dir(&self.dir)
            .and_then(|d| d.sync())
            .map_err(io_err(&self.dir))?;
        self.file = file;
        self.len = buf.len() as u64;
        self.compacted_len = self.len;
        self.poisoned = false;
        Ok(())
    }
}

/// Replays the log at `path` into `state`, stopping at a torn or corrupt tail.
fn replay(backend: &dyn Backend, path: &Path, state: &mut DefinitionSet) -> Result<()> {
    let file = backend.open_file(path).map_err(io_err(path))?;
    if let HeaderCheck::Invalid(reason) = check_file_header(&*file, path, DEFS_MAGIC, 0)? {
        // The log is only ever created complete (compaction fsyncs before the rename), so a
        // bad header is not a torn write: refuse to guess.
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: reason.into(),
        });
    }
    let len = file.size().map_err(io_err(path))?;
    let mut scanner = RecordScanner::new(&*file, len, FILE_HEADER_LEN, 64 * 1024, 1);
    let mut payload = Vec::new();
    loop {
        match scanner
            .next(Some(&mut payload), &mut [])
            .map_err(io_err(path))?
        {
            Scanned::Record { offset, .. } => {
                let change: DefChange = serde_json::from_slice(&payload).map_err(|source| {
                    StorageError::Definition {
                        path: path.to_path_buf(),
                        offset,
                        source,
                    }
                })?;
                state.apply(&change);
            }
            Scanned::End => return Ok(()),
            Scanned::Invalid { offset, reason } => {
                // Compaction rewrites the file right after, which drops the tail for good.
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    dropped_bytes = len - offset,
                    reason,
                    "dropping torn tail of the definitions log"
                );
                return Ok(());
            }
        }
    }
}

/// Serde adapter storing a `FieldTable` as the lowercase hex of its AMQP wire encoding: exact
/// for every AMQP value (JSON cannot carry NaN floats, and would blur the integer widths).
pub(crate) mod wire_table {
    use amq_protocol_types::FieldTable;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn encode(t: &FieldTable) -> Result<Vec<u8>, String> {
        cookie_factory::gen_simple(
            amq_protocol_types::generation::gen_field_table(t),
            Vec::new(),
        )
        .map_err(|e| format!("{e:?}"))
    }

    pub fn serialize<S: Serializer>(t: &FieldTable, s: S) -> Result<S::Ok, S::Error> {
        let bytes = encode(t).map_err(serde::ser::Error::custom)?;
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FieldTable, D::Error> {
        let hex = String::deserialize(d)?;
        let digit = |c: u8| -> Result<u8, D::Error> {
            (c as char)
                .to_digit(16)
                .map(|v| v as u8)
                .ok_or_else(|| de::Error::custom("bad hex digit in field table"))
        };
        let h = hex.as_bytes();
        if h.len() % 2 != 0 {
            return Err(de::Error::custom("odd hex length in field table"));
        }
        let mut bytes = Vec::with_capacity(h.len() / 2);
        for pair in h.chunks_exact(2) {
            bytes.push(digit(pair[0])? << 4 | digit(pair[1])?);
        }
        let (rest, table) = amq_protocol_types::parsing::parse_field_table(&bytes[..])
            .map_err(|e| de::Error::custom(format!("bad field table: {e:?}")))?;
        if !rest.is_empty() {
            return Err(de::Error::custom("trailing bytes after field table"));
        }
        Ok(table)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use amq_protocol_types::{AMQPValue, LongString, ShortString};

    fn args() -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("x-max-length"),
            AMQPValue::LongLongInt(10),
        );
        t.insert(ShortString::from("x-f"), AMQPValue::Double(f64::INFINITY));
        t.insert(ShortString::from("x-b"), AMQPValue::ShortShortUInt(7));
        t.insert(
            ShortString::from("x-s"),
            AMQPValue::LongString(LongString::from("v")),
        );
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("k"), AMQPValue::Boolean(true));
        t.insert(ShortString::from("x-t"), AMQPValue::FieldTable(inner));
        t
    }

    #[test]
    fn field_tables_round_trip_through_json() {
        let q = QueueDef {
            vhost: "/".into(),
            name: "q".into(),
            durable: true,
            auto_delete: false,
            arguments: args(),
        };
        let json = serde_json::to_string(&DefChange::PutQueue(q.clone())).unwrap();
        assert!(json.contains("\"op\":\"put_queue\""), "{json}");
        let back: DefChange = serde_json::from_str(&json).unwrap();
        assert_eq!(back, DefChange::PutQueue(q));
    }

    #[test]
    fn deletes_cascade() {
        let mut s = DefinitionSet::default();
        let b = |dest: &str, is_q: bool| BindingDef {
            vhost: "v".into(),
            source: "x".into(),
            destination: dest.into(),
            destination_is_queue: is_q,
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        };
        s.apply(&DefChange::PutBinding(b("q", true)));
        s.apply(&DefChange::PutBinding(b("q", true)));
        s.apply(&DefChange::PutBinding(b("y", false)));
        assert_eq!(s.bindings().count(), 2);
        s.apply(&DefChange::DeleteQueue {
            vhost: "v".into(),
            name: "q".into(),
        });
        assert_eq!(s.bindings().count(), 1);
        s.apply(&DefChange::DeleteExchange {
            vhost: "v".into(),
            name: "y".into(),
        });
        assert_eq!(s.bindings().count(), 0);
    }
}
