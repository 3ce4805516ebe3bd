//! Per-queue message store: a directory of append-only segment files (`msgs.NNNNNNNNNN`) and
//! one ack file per segment (`acks.NNNNNNNNNN`). Bodies live only on disk (and briefly in a
//! small write buffer); RAM holds, per segment, counters and an ack bitmap, and the caller
//! holds one 12-byte [`MsgLocation`] per message.
//!
//! Durability is the caller's choice: `append`/`ack` only write into the OS page cache (through
//! a small user-space buffer); [`QueueStore::prepare_sync`] hands out a [`SyncHandle`] whose
//! fsync (inline or through the [`crate::SyncService`]) makes everything written before it
//! durable. A store that is never synced is a spill file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::ack::{self, AckBits, AckKind};
use crate::backend::{Backend, FileHandle};
use crate::error::{io_err, Result, StorageError};
use crate::segment::{
    self, check_file_header, file_header, HeaderCheck, RecordScanner, Scanned, StoredMessage,
    StoredMessageOwned, ACK_MAGIC, FILE_HEADER_LEN, MESSAGE_HEAD_LEN, MIN_MESSAGE_PAYLOAD,
    MIN_MESSAGE_RECORD, RECORD_HEADER_LEN, SEGMENT_MAGIC,
};
use crate::sync::SyncHandle;

/// Where a message lives: the whole in-RAM index entry of a stored message (12 bytes).
/// Ordering is publish order within one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgLocation {
    /// Segment id (the number in the file name).
    pub segment: u32,
    /// Byte offset of the record in the segment file.
    pub offset: u32,
    /// Payload length (the record is 8 bytes longer); a good measure of the message's size.
    pub len: u32,
}

/// A message found by recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Where it is.
    pub loc: MsgLocation,
    /// The `timestamp_ms` given to `append` (e.g. to restart TTLs).
    pub timestamp_ms: u64,
    /// The `flags` given to `append`.
    pub flags: u8,
    /// A delivery was recorded with [`QueueStore::mark_delivered`] before the restart: deliver
    /// it with `redelivered = true`.
    pub delivered: bool,
}

/// Tunables of a [`QueueStore`].
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// A new segment is started when a record would make the current one exceed this
    /// (a single larger record gets a segment of its own). Clamped to 4 KiB ..= 1 GiB so
    /// offsets fit a `u32`.
    pub segment_size: u32,
    /// Appends smaller than this are gathered in a user-space buffer of about this size before
    /// being written; larger bodies are written straight from the caller's slices.
    pub write_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_size: 8 * 1024 * 1024,
            write_buffer: 128 * 1024,
        }
    }
}

impl StoreConfig {
    fn segment_size(&self) -> u64 {
        u64::from(self.segment_size.clamp(4096, 1 << 30))
    }
}

/// What recovery found, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: u32,
    /// Valid records found (acked or not).
    pub records: u64,
    /// Records skipped because they were acked.
    pub acked: u64,
    /// Bytes cut from torn or corrupt segment tails.
    pub truncated_bytes: u64,
    /// Segment files deleted because they were empty, fully acked, or had a bad header.
    pub deleted_segments: u32,
}

/// The result of [`QueueStore::recover`].
#[derive(Debug)]
pub struct Recovered {
    /// The store, ready for appends (which go to a new segment).
    pub store: QueueStore,
    /// Every message not acked, in publish order.
    pub messages: Vec<RecoveredMessage>,
    /// Statistics.
    pub report: RecoveryReport,
}

/// Occupancy figures of a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Segment files present.
    pub segments: u32,
    /// Messages appended and not yet acked.
    pub live_messages: u64,
    /// Bytes of segment and ack files (including buffered bytes not yet written).
    pub disk_bytes: u64,
}

/// The ack file of one segment, created on the first ack or delivery mark.
#[derive(Debug)]
struct AckFile {
    file: FileHandle,
    /// Bytes written to the file (excluding `buf`).
    written: u64,
    /// Entries not yet written: acks are small and frequent, one `pwrite` each would dominate.
    buf: Vec<u8>,
    /// Listed in `QueueStore::dirty` since the last `prepare_sync`.
    dirty: bool,
}

/// One segment file.
///
/// Invariants: `acked <= records`; `acked` == number of set bits in `acked_bits`; a segment
/// other than the current one has `acked < records` (it is deleted the moment it is fully
/// acked, or when the writer leaves it fully acked).
#[derive(Debug)]
struct Segment {
    file: FileHandle,
    /// Logical length: bytes written plus, for the current segment, the write buffer.
    len: u64,
    records: u32,
    acked: u32,
    acked_bits: AckBits,
    acks: Option<AckFile>,
    /// Listed in `QueueStore::dirty` since the last `prepare_sync`.
    dirty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dirty {
    Segment(u32),
    Acks(u32),
}

/// The message store of one queue. Not thread-safe by itself: the queue that owns it calls
/// it from one place (its actor or under its lock).
///
/// Invariants:
/// - `current`, if set, is a key of `segments`; the write buffer `wbuf` holds the bytes of the
///   current segment from file offset `wbuf_start` to its logical `len`.
/// - Segment ids only grow within a store's life (`next_id` > every id used), so a stale
///   location can never name a newer segment.
/// - After an I/O error `poisoned` is set and every mutation fails: the files may then
///   disagree with the counters, and only recovery can tell what is really on disk.
#[derive(Debug)]
pub struct QueueStore {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    dir_handle: FileHandle,
    config: StoreConfig,
    segments: BTreeMap<u32, Segment>,
    current: Option<u32>,
    next_id: u32,
    wbuf: Vec<u8>,
    wbuf_start: u64,
    /// Files written since the last `prepare_sync` (each listed once, see the `dirty` flags).
    dirty: Vec<Dirty>,
    /// A file was created in `dir` since the last `prepare_sync`: its directory entry must be
    /// fsynced too, or a synced segment could vanish in a crash.
    dir_dirty: bool,
    live: u64,
    poisoned: bool,
}

fn seg_name(id: u32) -> String {
    format!("msgs.{id:010}")
}

fn ack_name(id: u32) -> String {
    format!("acks.{id:010}")
}

fn parse_name(name: &str) -> Option<(bool, u32)> {
    let (is_seg, rest) = if let Some(r) = name.strip_prefix("msgs.") {
        (true, r)
    } else if let Some(r) = name.strip_prefix("acks.") {
        (false, r)
    } else {
        return None;
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok().map(|id| (is_seg, id))
}

/// Segments at least this large get a progress line in the log while recovering.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Read-ahead of the recovery scanner.
const SCAN_CHUNK: usize = 1 << 20;
/// Ack-file buffers are written out past this size even without a sync.
const ACK_BUF_FLUSH: usize = 4096;

impl QueueStore {
    /// Creates an empty store in `dir`, removing whatever was there (a queue declared anew).
    pub fn create(backend: Arc<dyn Backend>, dir: &Path, config: StoreConfig) -> Result<Self> {
        backend.remove_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self::recover(backend, dir, config)?.store)
    }

    /// Opens the store in `dir` (creating the directory if needed) and returns every message
    /// not acked, in publish order. Torn or corrupt segment tails are cut (and logged), never
    /// an error; an error means the disk itself failed or a file is of a newer format.
    pub fn recover(
        backend: Arc<dyn Backend>,
        dir: &Path,
        config: StoreConfig,
    ) -> Result<Recovered> {
        let mut messages = Vec::new();
        let (store, report) = Self::recover_each(backend, dir, config, &mut |m| messages.push(m))?;
        Ok(Recovered {
            store,
            messages,
            report,
        })
    }

    /// [`QueueStore::recover`] handing each message not acked to `on_message`, in publish
    /// order, instead of collecting them: a queue of millions can fill its own index without
    /// a second list of them that the allocator then keeps.
    pub fn recover_each(
        backend: Arc<dyn Backend>,
        dir: &Path,
        config: StoreConfig,
        on_message: &mut dyn FnMut(RecoveredMessage),
    ) -> Result<(QueueStore, RecoveryReport)> {
        backend.create_dir_all(dir).map_err(io_err(dir))?;
        let dir_handle = backend.open_dir(dir).map_err(io_err(dir))?;
        let mut seg_ids = Vec::new();
        let mut ack_ids = Vec::new();
        for name in backend.list_dir(dir).map_err(io_err(dir))? {
            match parse_name(&name) {
                Some((true, id)) => seg_ids.push(id),
                Some((false, id)) => ack_ids.push(id),
                None => {}
            }
        }
        seg_ids.sort_unstable();
        let max_id = seg_ids
            .iter()
            .chain(ack_ids.iter())
            .copied()
            .max()
            .unwrap_or(0);
        let mut store = QueueStore {
            backend,
            dir: dir.to_path_buf(),
            dir_handle,
            config,
            segments: BTreeMap::new(),
            current: None,
            next_id: max_id.saturating_add(1).max(1),
            wbuf: Vec::new(),
            wbuf_start: 0,
            dirty: Vec::new(),
            dir_dirty: false,
            live: 0,
            poisoned: false,
        };
        // An ack file whose segment is gone is left over from a deletion cut by a crash
        // (the segment is always removed first).
        for id in ack_ids {
            if seg_ids.binary_search(&id).is_err() {
                store.remove(&ack_name(id))?;
            }
        }
        let mut found = 0u64;
        let mut report = RecoveryReport::default();
        let started = Instant::now();
        let mut last_progress = started;
        let total = seg_ids.len();
        for (i, id) in seg_ids.into_iter().enumerate() {
            found += store.recover_segment(id, on_message, &mut report)?;
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                tracing::info!(
                    dir = %store.dir.display(),
                    segments_done = i + 1,
                    segments_total = total,
                    messages = found,
                    "recovering queue store"
                );
            }
        }
        store.live = found;
        if started.elapsed() >= PROGRESS_EVERY || report.truncated_bytes > 0 {
            tracing::info!(
                dir = %store.dir.display(),
                segments = report.segments,
                messages = found,
                truncated_bytes = report.truncated_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "queue store recovered"
            );
        }
        Ok((store, report))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes a file; one that is already gone is fine.
    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match self.backend.remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Recovers one segment, handing its messages not acked to `on_message`; returns how many.
    fn recover_segment(
        &mut self,
        id: u32,
        on_message: &mut dyn FnMut(RecoveredMessage),
        report: &mut RecoveryReport,
    ) -> Result<u64> {
        report.segments += 1;
        let path = self.path(&seg_name(id));
        let file = self.backend.open_file(&path).map_err(io_err(&path))?;
        let file_len = file.size().map_err(io_err(&path))?;
        if let HeaderCheck::Invalid(reason) = check_file_header(&*file, &path, SEGMENT_MAGIC, id)? {
            // Only a crash during creation leaves a short header behind (the header is the
            // first write); anything else is not a file of ours. Either way it holds nothing
            // we can trust.
            tracing::warn!(path = %path.display(), reason, "deleting segment with invalid header");
            report.deleted_segments += 1;
            report.truncated_bytes += file_len;
            self.remove(&seg_name(id))?;
            return self.remove(&ack_name(id)).map(|()| 0);
        }
        let (acks, entries) = self.recover_acks(id)?;
        let mut scanner = RecordScanner::new(
            &*file,
            file_len,
            FILE_HEADER_LEN,
            SCAN_CHUNK,
            MIN_MESSAGE_PAYLOAD,
        );
        let mut records = 0u32;
        let mut acked = 0u32;
        let mut emitted = 0u64;
        let mut acked_bits = AckBits::default();
        let (mut ai, mut di) = (0usize, 0usize);
        let mut head = [0u8; MESSAGE_HEAD_LEN];
        let end = loop {
            match scanner.next(None, &mut head).map_err(io_err(&path))? {
                Scanned::Record { offset, len } => {
                    let Ok(off32) = u32::try_from(offset) else {
                        break (offset, Some("record offset beyond 4 GiB"));
                    };
                    records += 1;
                    // Both lists are sorted, as are record offsets: a merge walk.
                    while entries.acked.get(ai).is_some_and(|a| *a < off32) {
                        ai += 1;
                    }
                    while entries.delivered.get(di).is_some_and(|d| *d < off32) {
                        di += 1;
                    }
                    if entries.acked.get(ai) == Some(&off32) {
                        acked += 1;
                        acked_bits.set((offset - FILE_HEADER_LEN) / MIN_MESSAGE_RECORD);
                    } else {
                        let [flags, t @ ..] = head;
                        emitted += 1;
                        on_message(RecoveredMessage {
                            loc: MsgLocation {
                                segment: id,
                                offset: off32,
                                len,
                            },
                            timestamp_ms: u64::from_le_bytes(t),
                            flags,
                            delivered: entries.delivered.get(di) == Some(&off32),
                        });
                    }
                }
                Scanned::End => break (file_len, None),
                Scanned::Invalid { offset, reason } => break (offset, Some(reason)),
            }
        };
        drop(scanner);
        report.records += u64::from(records);
        report.acked += u64::from(acked);
        if let (offset, Some(reason)) = end {
            tracing::warn!(
                path = %path.display(),
                offset,
                dropped_bytes = file_len - offset,
                reason,
                "truncating torn or corrupt segment tail"
            );
            report.truncated_bytes += file_len - offset;
            file.set_len(offset).map_err(io_err(&path))?;
            file.sync().map_err(io_err(&path))?;
        }
        if acked == records {
            report.deleted_segments += 1;
            self.remove(&seg_name(id))?;
            return self.remove(&ack_name(id)).map(|()| emitted);
        }
        self.segments.insert(
            id,
            Segment {
                file,
                len: end.0,
                records,
                acked,
                acked_bits,
                acks,
                dirty: false,
            },
        );
        Ok(emitted)
    }

    /// Reads the ack file of segment `id`, cutting a torn tail so that new entries follow
    /// the last valid one.
    fn recover_acks(&self, id: u32) -> Result<(Option<AckFile>, ack::AckEntries)> {
        let path = self.path(&ack_name(id));
        let file = match self.backend.open_file(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((None, ack::AckEntries::default()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if let HeaderCheck::Invalid(reason) = check_file_header(&*file, &path, ACK_MAGIC, id)? {
            tracing::warn!(path = %path.display(), reason, "deleting ack file with invalid header");
            self.remove(&ack_name(id))?;
            return Ok((None, ack::AckEntries::default()));
        }
        let len = file.size().map_err(io_err(&path))?;
        let body_len =
            usize::try_from(len - FILE_HEADER_LEN).map_err(|_| StorageError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: "ack file too large".into(),
            })?;
        let mut body = vec![0u8; body_len];
        file.read_exact_at(&mut body, FILE_HEADER_LEN)
            .map_err(io_err(&path))?;
        let entries = ack::decode_entries(&body);
        let valid = FILE_HEADER_LEN + entries.valid_len as u64;
        if valid != len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = len - valid,
                "truncating torn ack file tail"
            );
            file.set_len(valid).map_err(io_err(&path))?;
            file.sync().map_err(io_err(&path))?;
        }
        Ok((
            Some(AckFile {
                file,
                written: valid,
                buf: Vec::new(),
                dirty: false,
            }),
            entries,
        ))
    }

    /// The directory of this store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Occupancy figures.
    pub fn stats(&self) -> StoreStats {
        let mut disk = 0;
        for s in self.segments.values() {
            disk += s.len;
            if let Some(a) = &s.acks {
                disk += a.written + a.buf.len() as u64;
            }
        }
        StoreStats {
            segments: self.segments.len() as u32,
            live_messages: self.live,
            disk_bytes: disk,
        }
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            Err(StorageError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the store on I/O errors (see the type's invariants).
    fn track<T>(&mut self, r: Result<T>) -> Result<T> {
        if matches!(
            r,
            Err(StorageError::Io { .. } | StorageError::Corrupt { .. })
        ) {
            self.poisoned = true;
        }
        r
    }

    fn mark_dirty_segment(&mut self, id: u32) {
        if let Some(s) = self.segments.get_mut(&id) {
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(Dirty::Segment(id));
            }
        }
    }

    /// Appends a message and returns its location. The bytes are in the page cache (or the
    /// write buffer) when this returns; durable only after a sync of [`Self::prepare_sync`].
    pub fn append(&mut self, msg: &StoredMessage<'_>) -> Result<MsgLocation> {
        self.check_poisoned()?;
        let (prefix, len) = segment::message_prefix(msg)?;
        let r = self.append_inner(msg, &prefix, len);
        self.track(r)
    }

    fn append_inner(
        &mut self,
        msg: &StoredMessage<'_>,
        prefix: &[u8],
        len: u32,
    ) -> Result<MsgLocation> {
        let rec_len = RECORD_HEADER_LEN + u64::from(len);
        let id = match self
            .current
            .and_then(|id| self.segments.get(&id).map(|s| (id, s)))
        {
            Some((id, s))
                if s.len == FILE_HEADER_LEN || s.len + rec_len <= self.config.segment_size() =>
            {
                id
            }
            _ => self.roll()?,
        };
        let offset = self.segments.get(&id).map_or(FILE_HEADER_LEN, |s| s.len);
        let off32 =
            u32::try_from(offset).map_err(|_| StorageError::MessageTooLarge { size: rec_len })?;
        let mut crc = segment::record_crc(len, &[prefix]);
        msg.body.for_each(|c| crc = crc32c::crc32c_append(crc, c));
        if rec_len as usize > self.config.write_buffer {
            // A big body: write it straight from the caller's slices instead of copying it
            // into the buffer (and keep the buffer small).
            self.flush_wbuf()?;
            let file = self.segment_file(id)?;
            let mut head = Vec::with_capacity(8 + prefix.len());
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(&crc.to_le_bytes());
            head.extend_from_slice(prefix);
            file.write_all_at(&head, offset)
                .map_err(|e| self.seg_io_err(id, e))?;
            let mut pos = offset + head.len() as u64;
            let mut res = Ok(());
            msg.body.for_each(|c| {
                if res.is_ok() {
                    res = file.write_all_at(c, pos);
                    pos += c.len() as u64;
                }
            });
            res.map_err(|e| self.seg_io_err(id, e))?;
            self.wbuf_start = offset + rec_len;
        } else {
            self.wbuf.extend_from_slice(&len.to_le_bytes());
            self.wbuf.extend_from_slice(&crc.to_le_bytes());
            self.wbuf.extend_from_slice(prefix);
            let wbuf = &mut self.wbuf;
            msg.body.for_each(|c| wbuf.extend_from_slice(c));
        }
        if let Some(s) = self.segments.get_mut(&id) {
            s.len = offset + rec_len;
            s.records += 1;
        }
        self.live += 1;
        self.mark_dirty_segment(id);
        if self.wbuf.len() >= self.config.write_buffer {
            self.flush_wbuf()?;
        }
        Ok(MsgLocation {
            segment: id,
            offset: off32,
            len,
        })
    }

    fn seg_io_err(&self, id: u32, e: std::io::Error) -> StorageError {
        io_err(&self.path(&seg_name(id)))(e)
    }

    fn segment_file(&self, id: u32) -> Result<FileHandle> {
        self.segments
            .get(&id)
            .map(|s| Arc::clone(&s.file))
            .ok_or_else(|| StorageError::Corrupt {
                path: self.path(&seg_name(id)),
                offset: 0,
                reason: "segment missing from the in-memory table".into(),
            })
    }

    /// Starts a new segment, leaving (and deleting, if fully acked) the current one.
    fn roll(&mut self) -> Result<u32> {
        self.flush_wbuf()?;
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or_else(|| StorageError::Corrupt {
            path: self.dir.clone(),
            offset: 0,
            reason: "segment ids exhausted".into(),
        })?;
        let path = self.path(&seg_name(id));
        let file = self.backend.create_file(&path).map_err(io_err(&path))?;
        self.dir_dirty = true;
        self.wbuf.clear();
        self.wbuf.extend_from_slice(&file_header(SEGMENT_MAGIC, id));
        self.wbuf_start = 0;
        self.segments.insert(
            id,
            Segment {
                file,
                len: FILE_HEADER_LEN,
                records: 0,
                acked: 0,
                acked_bits: AckBits::default(),
                acks: None,
                dirty: false,
            },
        );
        let old = self.current.replace(id);
        if let Some(old) = old {
            if self
                .segments
                .get(&old)
                .is_some_and(|s| s.acked == s.records)
            {
                self.delete_segment(old)?;
            }
        }
        Ok(id)
    }

    /// Writes the buffered bytes of the current segment to its file.
    fn flush_wbuf(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let Some(id) = self.current else {
            self.wbuf.clear();
            return Ok(());
        };
        let file = self.segment_file(id)?;
        file.write_all_at(&self.wbuf, self.wbuf_start)
            .map_err(|e| self.seg_io_err(id, e))?;
        let used = self.wbuf.len();
        self.wbuf_start += used as u64;
        self.wbuf.clear();
        // A burst grew the buffer; an idle queue should not keep it (thousands of queues).
        if self.wbuf.capacity() > 4 * used.max(4096) {
            self.wbuf.shrink_to(used.max(4096));
        }
        Ok(())
    }

    /// Removes a segment and its ack file. The segment goes first: a crash in between leaves
    /// an orphan ack file (deleted by recovery), never a segment without its acks (which would
    /// resurrect acked messages).
    fn delete_segment(&mut self, id: u32) -> Result<()> {
        let Some(seg) = self.segments.remove(&id) else {
            return Ok(());
        };
        self.live -= u64::from(seg.records - seg.acked);
        if self.current == Some(id) {
            self.current = None;
            self.wbuf.clear();
        }
        self.remove(&seg_name(id))?;
        if seg.acks.is_some() {
            self.remove(&ack_name(id))?;
        }
        // The last ack of a deleted segment is not written anywhere: the removal itself must
        // be durable by the next sync, or a crash would bring that message back.
        self.dir_dirty = true;
        Ok(())
    }

    /// Reads a message back (from the write buffer if it has not been written yet).
    pub fn read(&self, loc: MsgLocation) -> Result<StoredMessageOwned> {
        let seg = self
            .segments
            .get(&loc.segment)
            .ok_or(StorageError::UnknownLocation(loc))?;
        let start = u64::from(loc.offset);
        let end = start + RECORD_HEADER_LEN + u64::from(loc.len);
        if start < FILE_HEADER_LEN || end > seg.len {
            return Err(StorageError::UnknownLocation(loc));
        }
        let mut rec = vec![0u8; (end - start) as usize];
        let path = || self.path(&seg_name(loc.segment));
        let buffered_from = if self.current == Some(loc.segment) {
            self.wbuf_start
        } else {
            u64::MAX
        };
        let file_end = end.min(buffered_from);
        if start < file_end {
            seg.file
                .read_exact_at(&mut rec[..(file_end - start) as usize], start)
                .map_err(|e| io_err(&path())(e))?;
        }
        if end > buffered_from {
            let from = start.max(buffered_from);
            let b0 = (from - self.wbuf_start) as usize;
            let b1 = (end - self.wbuf_start) as usize;
            let src = self
                .wbuf
                .get(b0..b1)
                .ok_or(StorageError::UnknownLocation(loc))?;
            rec[(from - start) as usize..].copy_from_slice(src);
        }
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path(),
            offset: start,
            reason: reason.into(),
        };
        let len = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let crc = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        if len != loc.len {
            return Err(corrupt("record length differs from the location"));
        }
        if segment::record_crc(len, &[&rec[8..]]) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let payload = Bytes::from(rec).slice(RECORD_HEADER_LEN as usize..);
        segment::decode_message(payload).ok_or_else(|| corrupt("inconsistent field lengths"))
    }

    /// Checks that `loc` names a live (appended, not acked) message; returns its bitmap slot.
    fn live_slot(&self, loc: MsgLocation) -> Result<u64> {
        let seg = self
            .segments
            .get(&loc.segment)
            .ok_or(StorageError::UnknownLocation(loc))?;
        let off = u64::from(loc.offset);
        if off < FILE_HEADER_LEN || off + RECORD_HEADER_LEN + u64::from(loc.len) > seg.len {
            return Err(StorageError::UnknownLocation(loc));
        }
        let slot = (off - FILE_HEADER_LEN) / MIN_MESSAGE_RECORD;
        if seg.acked_bits.get(slot) {
            return Err(StorageError::UnknownLocation(loc));
        }
        Ok(slot)
    }

    /// Acks a message: it will not be recovered once this is synced. Deletes the segment
    /// when this was its last live message (unless appends still go to it). Acking a location
    /// twice, or one that does not exist, is `UnknownLocation` and changes nothing.
    pub fn ack(&mut self, loc: MsgLocation) -> Result<()> {
        self.check_poisoned()?;
        let slot = self.live_slot(loc)?;
        let r = self.ack_slot(loc, slot, true);
        self.track(r)
    }

    fn ack_slot(&mut self, loc: MsgLocation, slot: u64, write_entry: bool) -> Result<()> {
        let is_current = self.current == Some(loc.segment);
        let Some(seg) = self.segments.get_mut(&loc.segment) else {
            return Err(StorageError::UnknownLocation(loc));
        };
        seg.acked_bits.set(slot);
        seg.acked += 1;
        self.live -= 1;
        if seg.acked == seg.records && !is_current {
            // The segment goes away: recording the ack itself would be wasted.
            return self.delete_segment(loc.segment);
        }
        if write_entry {
            self.write_ack_entry(loc, AckKind::Acked)?;
        }
        Ok(())
    }

    /// Records that a message was handed to a consumer, so recovery reports it `delivered`
    /// (redelivered = true). Costs 8 buffered bytes; optional (a broker may instead treat
    /// every recovered message as redelivered).
    pub fn mark_delivered(&mut self, loc: MsgLocation) -> Result<()> {
        self.check_poisoned()?;
        self.live_slot(loc)?;
        let r = self.write_ack_entry(loc, AckKind::Delivered);
        self.track(r)
    }

    fn write_ack_entry(&mut self, loc: MsgLocation, kind: AckKind) -> Result<()> {
        let id = loc.segment;
        // Formatting the path costs more than the write itself: only on the rare paths.
        let dir = &self.dir;
        let path = || dir.join(ack_name(id));
        let Some(seg) = self.segments.get_mut(&id) else {
            return Err(StorageError::UnknownLocation(loc));
        };
        if seg.acks.is_none() {
            let path = path();
            let file = self.backend.create_file(&path).map_err(io_err(&path))?;
            self.dir_dirty = true;
            seg.acks = Some(AckFile {
                file,
                written: 0,
                buf: file_header(ACK_MAGIC, id).to_vec(),
                dirty: false,
            });
        }
        let Some(acks) = seg.acks.as_mut() else {
            return Ok(());
        };
        acks.buf
            .extend_from_slice(&ack::encode_entry(loc.offset, kind));
        if !acks.dirty {
            acks.dirty = true;
            self.dirty.push(Dirty::Acks(id));
        }
        if acks.buf.len() >= ACK_BUF_FLUSH {
            acks.file
                .write_all_at(&acks.buf, acks.written)
                .map_err(|e| io_err(&path())(e))?;
            acks.written += acks.buf.len() as u64;
            acks.buf.clear();
        }
        Ok(())
    }

    /// Removes many messages at once (queue.purge: the broker passes its ready messages;
    /// unacked ones stay). Segments left without live messages are deleted without writing
    /// an ack entry per message, including the current one (the next append starts a new one).
    pub fn purge(&mut self, locs: &[MsgLocation]) -> Result<()> {
        self.check_poisoned()?;
        let mut slots = Vec::with_capacity(locs.len());
        for loc in locs {
            slots.push(self.live_slot(*loc)?);
        }
        let r = self.purge_inner(locs, &slots);
        self.track(r)
    }

    fn purge_inner(&mut self, locs: &[MsgLocation], slots: &[u64]) -> Result<()> {
        let mut touched: BTreeMap<u32, Vec<MsgLocation>> = BTreeMap::new();
        for (loc, slot) in locs.iter().zip(slots) {
            let Some(seg) = self.segments.get_mut(&loc.segment) else {
                continue;
            };
            // A location listed twice counts once.
            if seg.acked_bits.set(*slot) {
                seg.acked += 1;
                self.live -= 1;
                touched.entry(loc.segment).or_default().push(*loc);
            }
        }
        for (id, locs) in touched {
            let empty = self.segments.get(&id).is_some_and(|s| s.acked == s.records);
            if empty {
                self.delete_segment(id)?;
            } else {
                for loc in locs {
                    self.write_ack_entry(loc, AckKind::Acked)?;
                }
            }
        }
        Ok(())
    }

    /// Writes every buffered byte (segment and ack entries) to the OS; no fsync.
    pub fn flush(&mut self) -> Result<()> {
        self.check_poisoned()?;
        let r = self.flush_inner();
        self.track(r)
    }

    fn flush_inner(&mut self) -> Result<()> {
        self.flush_wbuf()?;
        self.flush_ack_bufs()
    }

    /// Writes the buffered ack entries and delivery marks to the OS, but not buffered appends:
    /// what a broker needs before telling a client about a delivery or answering after an ack.
    /// An entry whose record is still in the write buffer is harmless if a crash loses that
    /// record: recovery matches entries to records by offset, and appends after a recovery go
    /// to a new segment, so the offset is never reused.
    pub fn flush_acks(&mut self) -> Result<()> {
        self.check_poisoned()?;
        let r = self.flush_ack_bufs();
        self.track(r)
    }

    fn flush_ack_bufs(&mut self) -> Result<()> {
        for d in &self.dirty {
            if let Dirty::Acks(id) = *d {
                if let Some(acks) = self.segments.get_mut(&id).and_then(|s| s.acks.as_mut()) {
                    if !acks.buf.is_empty() {
                        let dir = &self.dir;
                        acks.file
                            .write_all_at(&acks.buf, acks.written)
                            .map_err(|e| io_err(&dir.join(ack_name(id)))(e))?;
                        acks.written += acks.buf.len() as u64;
                        acks.buf.clear();
                    }
                }
            }
        }
        Ok(())
    }

    /// Flushes, and returns the files whose fsync makes everything appended, acked and
    /// marked so far durable. Pass every handle to [`crate::SyncService::request`] (or call
    /// [`SyncHandle::sync`]) in the order obtained: a handle also covers earlier handles of
    /// this store only once those have been synced, which the service guarantees for requests
    /// made in order.
    pub fn prepare_sync(&mut self) -> Result<SyncHandle> {
        self.prepare(true)
    }

    /// Like [`Self::prepare_sync`], but covers only what publisher confirms need: appended
    /// messages (their segment files, and the directory when a file was created or removed).
    /// Ack files stay dirty for the next full [`Self::prepare_sync`]: an ack or delivery mark
    /// lost to a power failure brings a message back (redelivered), which AMQP allows, while
    /// a confirmed message lost would not be. This halves the fsyncs on the confirm path.
    pub fn prepare_sync_appends(&mut self) -> Result<SyncHandle> {
        self.prepare(false)
    }

    fn prepare(&mut self, with_acks: bool) -> Result<SyncHandle> {
        self.flush()?;
        let mut files: Vec<FileHandle> = Vec::with_capacity(self.dirty.len() + 2);
        let mut kept = Vec::new();
        for d in std::mem::take(&mut self.dirty) {
            match d {
                Dirty::Segment(id) => {
                    if let Some(s) = self.segments.get_mut(&id) {
                        s.dirty = false;
                        files.push(Arc::clone(&s.file));
                    }
                }
                Dirty::Acks(id) if with_acks => {
                    if let Some(a) = self.segments.get_mut(&id).and_then(|s| s.acks.as_mut()) {
                        a.dirty = false;
                        files.push(Arc::clone(&a.file));
                    }
                }
                Dirty::Acks(_) => kept.push(d),
            }
        }
        self.dirty = kept;
        // Always include the current segment: a caller that appended before an earlier handle
        // was synced still gets an fsync that runs after its data was written.
        if let Some(s) = self.current.and_then(|id| self.segments.get(&id)) {
            if !files.iter().any(|f| Arc::ptr_eq(f, &s.file)) {
                files.push(Arc::clone(&s.file));
            }
        }
        if std::mem::take(&mut self.dir_dirty) {
            files.push(Arc::clone(&self.dir_handle));
        }
        Ok(SyncHandle::new(files))
    }

    /// Flushes and fsyncs on the calling thread (tests, shutdown, rarely-synced spill files).
    pub fn sync_now(&mut self) -> Result<()> {
        let h = self.prepare_sync()?;
        let r = h.sync().map_err(io_err(&self.dir));
        self.track(r)
    }

    /// Deletes the whole store (queue.delete). Also fine to call on a poisoned store.
    pub fn delete(mut self) -> Result<()> {
        // Nothing buffered is worth writing any more (see `Drop`).
        self.poisoned = true;
        self.backend
            .remove_dir_all(&self.dir)
            .map_err(io_err(&self.dir))
    }
}

impl Drop for QueueStore {
    /// Hands buffered bytes to the OS (no fsync), so a clean shutdown that forgot to sync
    /// loses nothing unless the machine also goes down. Errors cannot be reported here; the
    /// next recovery copes with whatever reached the disk.
    fn drop(&mut self) {
        if !self.poisoned {
            let _ = self.flush_inner();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(parse_name("msgs.0000000007"), Some((true, 7)));
        assert_eq!(parse_name("acks.4294967295"), Some((false, u32::MAX)));
        assert_eq!(parse_name("msgs.7"), None);
        assert_eq!(parse_name("acks.00000000x7"), None);
        assert_eq!(parse_name("other"), None);
        assert_eq!(seg_name(7), "msgs.0000000007");
    }

    #[test]
    fn store_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<QueueStore>();
        assert_send_sync::<crate::Definitions>();
        assert_send_sync::<crate::SyncService>();
    }

    #[test]
    fn location_is_small() {
        assert_eq!(std::mem::size_of::<MsgLocation>(), 12);
        assert!(std::mem::size_of::<RecoveredMessage>() <= 24);
    }
}
