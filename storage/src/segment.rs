//! The on-disk framing shared by every file (see `storage/FORMAT.md`): a 16-byte file header
//! (magic, version, id) followed by records of `len: u32 LE | crc32c: u32 LE | payload`,
//! where the CRC covers the length bytes and the payload. Also the message payload layout and
//! a sequential record scanner used by recovery.

use std::path::Path;

use bytes::Bytes;

use crate::backend::StorageFile;
use crate::error::{io_err, Result, StorageError};

/// Size of the header at the start of every file.
pub const FILE_HEADER_LEN: u64 = 16;
/// Size of a record's `len | crc` prefix.
pub const RECORD_HEADER_LEN: u64 = 8;
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Magic of message segment files.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WRNMSEG\0";
/// Magic of per-segment ack files.
pub const ACK_MAGIC: [u8; 8] = *b"WRNACKS\0";
/// Magic of the definitions log.
pub const DEFS_MAGIC: [u8; 8] = *b"WRNDEFS\0";

/// Smallest message payload: flags, timestamp, two empty short strings, an empty property
/// block.
pub const MIN_MESSAGE_PAYLOAD: u32 = 1 + 8 + 1 + 1 + 4;
/// Bytes at the start of a message payload that recovery reports without reading the rest:
/// flags and timestamp.
pub const MESSAGE_HEAD_LEN: usize = 9;
/// Smallest message record; distinct records start at least this far apart, which is what
/// lets the in-memory ack bitmap index records by `(offset - header) / MIN_MESSAGE_RECORD`.
pub const MIN_MESSAGE_RECORD: u64 = RECORD_HEADER_LEN + MIN_MESSAGE_PAYLOAD as u64;

/// Encodes a file header.
pub fn file_header(magic: [u8; 8], id: u32) -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    h[..8].copy_from_slice(&magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&id.to_le_bytes());
    h
}

/// What a file header turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderCheck {
    /// Our magic, our version, the expected id.
    Valid,
    /// Shorter than a header, or not our magic or id: a torn creation or a foreign file.
    Invalid(&'static str),
}

/// Reads and checks the header of `file`; a newer version is an error, not a torn file,
/// because silently discarding data written by a newer build would lose messages.
pub fn check_file_header(
    file: &dyn StorageFile,
    path: &Path,
    magic: [u8; 8],
    id: u32,
) -> Result<HeaderCheck> {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    let n = read_full(file, &mut h, 0).map_err(io_err(path))?;
    if n < h.len() {
        return Ok(HeaderCheck::Invalid("file shorter than its header"));
    }
    if h[..8] != magic {
        return Ok(HeaderCheck::Invalid("bad magic"));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != FORMAT_VERSION {
        return Err(StorageError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if u32::from_le_bytes([h[12], h[13], h[14], h[15]]) != id {
        return Ok(HeaderCheck::Invalid(
            "id in header does not match file name",
        ));
    }
    Ok(HeaderCheck::Valid)
}

/// Reads as much as possible of `buf` at `offset`; returns the count (short only at EOF).
pub fn read_full(file: &dyn StorageFile, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// CRC of a record: over the 4 length bytes, then the payload. Including the length means an
/// all-zero region (a file extended but never written) is never a valid empty record.
pub fn record_crc(len: u32, payload_parts: &[&[u8]]) -> u32 {
    let mut crc = crc32c::crc32c(&len.to_le_bytes());
    for p in payload_parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc
}

/// Appends a complete record (`len | crc | payload`) to `out`.
pub fn encode_record(out: &mut Vec<u8>, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| StorageError::MessageTooLarge {
        size: payload.len() as u64,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(len, &[payload]).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A message body given to `append`: one slice, or the frames it arrived in (written without
/// joining them first).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// A contiguous body.
    Contiguous(&'a [u8]),
    /// A body split in chunks, e.g. one `Bytes` per body frame.
    Chunks(&'a [Bytes]),
}

impl Body<'_> {
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Body::Contiguous(b) => b.len(),
            Body::Chunks(c) => c.iter().map(|b| b.len()).sum(),
        }
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on each chunk in order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&[u8])) {
        match self {
            Body::Contiguous(b) => f(b),
            Body::Chunks(c) => c.iter().for_each(|b| f(b)),
        }
    }
}

impl<'a> From<&'a [u8]> for Body<'a> {
    fn from(b: &'a [u8]) -> Self {
        Body::Contiguous(b)
    }
}

impl<'a> From<&'a Bytes> for Body<'a> {
    fn from(b: &'a Bytes) -> Self {
        Body::Contiguous(b)
    }
}

impl<'a> From<&'a [Bytes]> for Body<'a> {
    fn from(c: &'a [Bytes]) -> Self {
        Body::Chunks(c)
    }
}

/// A message to append: borrowed, so appending copies the bytes once, into the write buffer.
#[derive(Debug, Clone, Copy)]
pub struct StoredMessage<'a> {
    /// Opaque to the store, returned by `read` and by recovery (the broker's bits).
    pub flags: u8,
    /// Opaque to the store, returned by `read` and by recovery: the broker's clock value for
    /// this message, e.g. enqueue time in ms since the epoch, so TTLs survive a restart.
    pub timestamp_ms: u64,
    /// Exchange the message was published to (AMQP short string, <= 255 bytes).
    pub exchange: &'a [u8],
    /// Routing key (AMQP short string, <= 255 bytes).
    pub routing_key: &'a [u8],
    /// The raw content-header property bytes (property flags and property list) as received.
    pub properties: &'a [u8],
    /// The body.
    pub body: Body<'a>,
}

/// A message read back: every field is a slice of one buffer (one allocation per read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessageOwned {
    /// The flags given to `append`.
    pub flags: u8,
    /// The timestamp given to `append`.
    pub timestamp_ms: u64,
    /// Exchange name bytes.
    pub exchange: Bytes,
    /// Routing key bytes.
    pub routing_key: Bytes,
    /// Raw content-header property bytes.
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
}

/// The fixed prefix of a message payload (everything before the body), and the payload length.
pub(crate) fn message_prefix(msg: &StoredMessage<'_>) -> Result<(Vec<u8>, u32)> {
    if msg.exchange.len() > 255 {
        return Err(StorageError::FieldTooLong {
            field: "exchange",
            len: msg.exchange.len(),
        });
    }
    if msg.routing_key.len() > 255 {
        return Err(StorageError::FieldTooLong {
            field: "routing_key",
            len: msg.routing_key.len(),
        });
    }
    let props_len =
        u32::try_from(msg.properties.len()).map_err(|_| StorageError::MessageTooLarge {
            size: msg.properties.len() as u64,
        })?;
    let total = MIN_MESSAGE_PAYLOAD as u64
        + msg.exchange.len() as u64
        + msg.routing_key.len() as u64
        + msg.properties.len() as u64
        + msg.body.len() as u64;
    // Leave room for the record header so `offset + 8 + len` arithmetic cannot overflow a u32
    // reader's expectations.
    let len = u32::try_from(total)
        .ok()
        .filter(|l| *l <= u32::MAX - RECORD_HEADER_LEN as u32)
        .ok_or(StorageError::MessageTooLarge { size: total })?;
    let mut p = Vec::with_capacity(total as usize - msg.body.len());
    p.push(msg.flags);
    p.extend_from_slice(&msg.timestamp_ms.to_le_bytes());
    p.push(msg.exchange.len() as u8);
    p.extend_from_slice(msg.exchange);
    p.push(msg.routing_key.len() as u8);
    p.extend_from_slice(msg.routing_key);
    p.extend_from_slice(&props_len.to_le_bytes());
    p.extend_from_slice(msg.properties);
    Ok((p, len))
}

/// Splits a message payload into its fields; `None` if the structure is inconsistent.
pub(crate) fn decode_message(payload: Bytes) -> Option<StoredMessageOwned> {
    let p = &payload[..];
    let flags = *p.first()?;
    let ts = p.get(1..9)?;
    let timestamp_ms = u64::from_le_bytes([ts[0], ts[1], ts[2], ts[3], ts[4], ts[5], ts[6], ts[7]]);
    let ex_len = *p.get(9)? as usize;
    let ex_start = 10;
    let ex_end = ex_start + ex_len;
    let rk_len = *p.get(ex_end)? as usize;
    let rk_start = ex_end + 1;
    let rk_end = rk_start + rk_len;
    let pl = p.get(rk_end..rk_end + 4)?;
    let props_len = u32::from_le_bytes([pl[0], pl[1], pl[2], pl[3]]) as usize;
    let props_start = rk_end + 4;
    let props_end = props_start.checked_add(props_len)?;
    if props_end > p.len() {
        return None;
    }
    Some(StoredMessageOwned {
        flags,
        timestamp_ms,
        exchange: payload.slice(ex_start..ex_end),
        routing_key: payload.slice(rk_start..rk_end),
        properties: payload.slice(props_start..props_end),
        body: payload.slice(props_end..),
    })
}

/// One step of a [`RecordScanner`].
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned {
    /// A valid record starting at `offset` with a payload of `len` bytes.
    Record {
        /// File offset of the record's length field.
        offset: u64,
        /// Payload length.
        len: u32,
    },
    /// Clean end of file exactly at a record boundary.
    End,
    /// The bytes at `offset` are not a valid record (torn or corrupt); nothing after is trusted.
    Invalid {
        /// Where the valid prefix ends.
        offset: u64,
        /// Why.
        reason: &'static str,
    },
}

/// Reads records front to back with large sequential reads, verifying every CRC, without ever
/// holding a whole large payload in memory unless the caller asks for it.
pub struct RecordScanner<'a> {
    file: &'a dyn StorageFile,
    file_len: u64,
    min_payload: u32,
    /// Read-ahead buffer; `buf[start..end]` holds file bytes from `pos` on.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of the next record (== file offset of `buf[start]`).
    pos: u64,
}

impl<'a> RecordScanner<'a> {
    /// Scans `file` (of length `file_len`) from `from` with a read-ahead of `chunk` bytes;
    /// records with payloads shorter than `min_payload` are invalid.
    pub fn new(
        file: &'a dyn StorageFile,
        file_len: u64,
        from: u64,
        chunk: usize,
        min_payload: u32,
    ) -> Self {
        RecordScanner {
            file,
            file_len,
            min_payload,
            buf: vec![0; chunk.max(64)],
            start: 0,
            end: 0,
            pos: from,
        }
    }

    /// Makes at least `n` bytes available from `start` unless the file ends first.
    fn fill(&mut self, n: usize) -> std::io::Result<()> {
        if self.end - self.start >= n {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let file_off = self.pos + self.end as u64;
        if file_off < self.file_len {
            let want =
                ((self.file_len - file_off).min((self.buf.len() - self.end) as u64)) as usize;
            let got = read_full(
                self.file,
                &mut self.buf[self.end..self.end + want],
                file_off,
            )?;
            self.end += got;
        }
        Ok(())
    }

    /// The next record; if `payload` is given, the payload is copied into it (for small
    /// records such as definitions), otherwise it is only checksummed. The first bytes of the
    /// payload are copied into `head` either way (a shorter payload leaves the rest untouched).
    pub fn next(
        &mut self,
        mut payload: Option<&mut Vec<u8>>,
        head: &mut [u8],
    ) -> std::io::Result<Scanned> {
        let offset = self.pos;
        if offset >= self.file_len {
            return Ok(Scanned::End);
        }
        self.fill(RECORD_HEADER_LEN as usize)?;
        if self.end - self.start < RECORD_HEADER_LEN as usize {
            return Ok(Scanned::Invalid {
                offset,
                reason: "truncated record header",
            });
        }
        let h = &self.buf[self.start..self.start + 8];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len < self.min_payload {
            return Ok(Scanned::Invalid {
                offset,
                reason: "record length below minimum",
            });
        }
        if offset + RECORD_HEADER_LEN + len as u64 > self.file_len {
            return Ok(Scanned::Invalid {
                offset,
                reason: "record extends past end of file",
            });
        }
        self.start += RECORD_HEADER_LEN as usize;
        self.pos += RECORD_HEADER_LEN;
        if let Some(p) = payload.as_deref_mut() {
            p.clear();
        }
        let mut actual = crc32c::crc32c(&len.to_le_bytes());
        let mut remaining = len as usize;
        while remaining > 0 {
            self.fill(1)?;
            let avail = (self.end - self.start).min(remaining);
            if avail == 0 {
                // The file shrank under us; treat like a torn tail.
                return Ok(Scanned::Invalid {
                    offset,
                    reason: "file ended inside a record",
                });
            }
            let chunk = &self.buf[self.start..self.start + avail];
            let done = len as usize - remaining;
            if done < head.len() {
                let n = (head.len() - done).min(chunk.len());
                head[done..done + n].copy_from_slice(&chunk[..n]);
            }
            actual = crc32c::crc32c_append(actual, chunk);
            if let Some(p) = payload.as_deref_mut() {
                p.extend_from_slice(chunk);
            }
            self.start += avail;
            self.pos += avail as u64;
            remaining -= avail;
        }
        if actual != crc {
            return Ok(Scanned::Invalid {
                offset,
                reason: "checksum mismatch",
            });
        }
        Ok(Scanned::Record { offset, len })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn message_payload_round_trip() {
        let body = b"hello".to_vec();
        let msg = StoredMessage {
            flags: 3,
            timestamp_ms: 1_700_000_000_000,
            exchange: b"amq.direct",
            routing_key: b"rk",
            properties: &[0x80, 0, 1, 2],
            body: Body::Contiguous(&body),
        };
        let (mut prefix, len) = message_prefix(&msg).unwrap();
        prefix.extend_from_slice(&body);
        assert_eq!(prefix.len(), len as usize);
        let m = decode_message(Bytes::from(prefix)).unwrap();
        assert_eq!(m.flags, 3);
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        assert_eq!(&m.exchange[..], b"amq.direct");
        assert_eq!(&m.routing_key[..], b"rk");
        assert_eq!(&m.properties[..], &[0x80, 0, 1, 2]);
        assert_eq!(&m.body[..], b"hello");
    }

    #[test]
    fn long_short_strings_are_refused() {
        let long = vec![b'x'; 256];
        let msg = StoredMessage {
            flags: 0,
            timestamp_ms: 0,
            exchange: &long,
            routing_key: b"",
            properties: b"",
            body: Body::Contiguous(b""),
        };
        assert!(matches!(
            message_prefix(&msg),
            Err(StorageError::FieldTooLong { .. })
        ));
    }

    #[test]
    fn zeroed_record_is_never_valid() {
        // A region of zeros (file extended but never written) must not parse as a record.
        assert_ne!(record_crc(0, &[]), 0);
    }

    #[test]
    fn golden_bytes() {
        // Pin the format: a change here needs a FORMAT_VERSION bump and FORMAT.md update.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            file_header(SEGMENT_MAGIC, 7),
            *b"WRNMSEG\0\x01\0\0\0\x07\0\0\0"
        );
        let msg = StoredMessage {
            flags: 1,
            timestamp_ms: 0x0102,
            exchange: b"x",
            routing_key: b"k",
            properties: &[0x10, 0, 2],
            body: Body::Contiguous(b"hi"),
        };
        let (mut payload, len) = message_prefix(&msg).unwrap();
        payload.extend_from_slice(b"hi");
        let mut rec = Vec::new();
        encode_record(&mut rec, &payload).unwrap();
        assert_eq!(len, 22);
        let crc = record_crc(22, &[&payload]).to_le_bytes();
        let mut want = vec![22, 0, 0, 0];
        want.extend_from_slice(&crc);
        want.extend_from_slice(&[1, 2, 1, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[1, b'x', 1, b'k', 3, 0, 0, 0, 0x10, 0, 2, b'h', b'i']);
        assert_eq!(rec, want);
    }

    proptest::proptest! {
        /// Any sequence of records, cut anywhere: the scanner returns exactly the complete
        /// records before the cut, then `Invalid` (or `End` at a boundary), never garbage.
        #[test]
        fn scanner_returns_exactly_the_complete_prefix(
            sizes in proptest::collection::vec(0usize..3000, 0..20),
            cut_frac in 0.0f64..=1.0,
            chunk in 64usize..5000,
        ) {
            use crate::backend::Backend;
            let disk = crate::SimBackend::new();
            let f = disk.create_file(std::path::Path::new("/f")).unwrap();
            let mut data = file_header(SEGMENT_MAGIC, 1).to_vec();
            let mut ends = vec![];
            for (i, n) in sizes.iter().enumerate() {
                let body = vec![i as u8; *n];
                let msg = StoredMessage { flags: 0, timestamp_ms: i as u64, exchange: b"", routing_key: b"", properties: b"", body: Body::Contiguous(&body) };
                let (mut p, _) = message_prefix(&msg).unwrap();
                p.extend_from_slice(&body);
                encode_record(&mut data, &p).unwrap();
                ends.push(data.len() as u64);
            }
            let cut = FILE_HEADER_LEN + ((data.len() as u64 - FILE_HEADER_LEN) as f64 * cut_frac) as u64;
            f.write_all_at(&data[..cut as usize], 0).unwrap();
            let mut sc = RecordScanner::new(&*f, cut, FILE_HEADER_LEN, chunk, MIN_MESSAGE_PAYLOAD);
            let mut got = vec![];
            let last = loop {
                match sc.next(None, &mut []).unwrap() {
                    Scanned::Record { offset, len } => got.push(offset + 8 + u64::from(len)),
                    other => break other,
                }
            };
            let want: Vec<u64> = ends.iter().copied().filter(|e| *e <= cut).collect();
            let boundary = want.last().copied().unwrap_or(FILE_HEADER_LEN);
            proptest::prop_assert_eq!(&got, &want);
            if boundary == cut {
                proptest::prop_assert_eq!(last, Scanned::End);
            } else {
                let invalid_at = match last {
                    Scanned::Invalid { offset, .. } => Some(offset),
                    _ => None,
                };
                proptest::prop_assert_eq!(invalid_at, Some(boundary));
            }
        }

        #[test]
        fn message_payload_round_trips(
            flags in proptest::prelude::any::<u8>(),
            ex in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=255),
            rk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=255),
            props in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100), 0..5),
        ) {
            let chunks: Vec<Bytes> = chunks.into_iter().map(Bytes::from).collect();
            let msg = StoredMessage { flags, timestamp_ms: u64::from(flags) << 40, exchange: &ex, routing_key: &rk, properties: &props, body: Body::Chunks(&chunks) };
            let (mut p, len) = message_prefix(&msg).unwrap();
            msg.body.for_each(|c| p.extend_from_slice(c));
            proptest::prop_assert_eq!(p.len(), len as usize);
            let m = decode_message(Bytes::from(p)).unwrap();
            proptest::prop_assert_eq!(m.flags, flags);
            proptest::prop_assert_eq!(m.timestamp_ms, u64::from(flags) << 40);
            proptest::prop_assert_eq!(&m.exchange[..], &ex[..]);
            proptest::prop_assert_eq!(&m.routing_key[..], &rk[..]);
            proptest::prop_assert_eq!(&m.properties[..], &props[..]);
            proptest::prop_assert_eq!(m.body, chunks.concat());
        }
    }

    #[test]
    fn decode_rejects_inconsistent_lengths() {
        assert!(
            decode_message(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 5, b'a'])).is_none()
        );
        assert!(decode_message(Bytes::from_static(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0
        ]))
        .is_none());
        assert!(decode_message(Bytes::from_static(&[0, 1, 2])).is_none());
    }
}
