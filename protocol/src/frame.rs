//! The protocol header handshake and splitting a byte stream into raw frames.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::ProtocolError;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// AMQP frame-min-size: every peer must accept frames of this total size, even before tuning.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// Type octet, channel and payload size.
pub const FRAME_HEADER_SIZE: usize = 7;
/// Frame header plus the frame-end octet.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_SIZE + 1;

/// Result of looking at the first bytes a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// Fewer than 8 bytes so far, all matching our header.
    Incomplete,
    /// Exactly `AMQP\0\0\9\1`; the caller consumes `PROTOCOL_HEADER.len()` bytes.
    Accepted,
    /// Anything else (other AMQP versions, HTTP, TLS): reply with our header and close.
    Rejected,
}

/// Needs 8 bytes; returns Rejected as soon as the bytes seen so far cannot be our header
/// (e.g. "GET " or a TLS hello), Incomplete if fewer than 8 bytes and still a prefix of it.
/// `AMQP\x01\x01\x00\x09`, the pre-standard AMQP 0-9 header.
const LEGACY_0_9_HEADER: [u8; 8] = *b"AMQP\x01\x01\x00\x09";

pub fn check_protocol_header(buf: &[u8]) -> ProtocolHeader {
    let seen = buf.len().min(PROTOCOL_HEADER.len());
    // RabbitMQ also serves the legacy AMQP 0-9 header with 0-9-1 framing.
    if buf.get(..8) == Some(&LEGACY_0_9_HEADER[..]) {
        return ProtocolHeader::Accepted;
    }
    if buf.get(..seen) != PROTOCOL_HEADER.get(..seen)
        && buf.get(..seen) != LEGACY_0_9_HEADER.get(..seen)
    {
        ProtocolHeader::Rejected
    } else if seen < PROTOCOL_HEADER.len() {
        ProtocolHeader::Incomplete
    } else {
        ProtocolHeader::Accepted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Method,
    Header,
    Body,
    Heartbeat,
}

impl FrameKind {
    pub fn from_u8(frame_type: u8) -> Option<Self> {
        match frame_type {
            FRAME_METHOD => Some(FrameKind::Method),
            FRAME_HEADER => Some(FrameKind::Header),
            FRAME_BODY => Some(FrameKind::Body),
            FRAME_HEARTBEAT => Some(FrameKind::Heartbeat),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            FrameKind::Method => FRAME_METHOD,
            FrameKind::Header => FRAME_HEADER,
            FrameKind::Body => FRAME_BODY,
            FrameKind::Heartbeat => FRAME_HEARTBEAT,
        }
    }
}

/// One frame off the wire. `payload` is a zero-copy slice of the read buffer: it keeps that
/// buffer's allocation alive, so copy it before keeping it for long if that matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: FrameKind,
    pub channel: u16,
    pub payload: Bytes,
}

/// Splits a byte stream into frames. frame_max is the negotiated max TOTAL frame size
/// (7-byte header + payload + frame-end), 0 = no limit.
#[derive(Debug, Clone)]
pub struct FrameSplitter {
    frame_max: u32,
}

impl FrameSplitter {
    pub fn new(frame_max: u32) -> Self {
        FrameSplitter { frame_max }
    }

    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Returns Ok(None) when more bytes are needed (buf untouched, so cancel-safe). The frame
    /// type and the size against frame_max are checked from the 7-byte header alone, so an
    /// oversized frame is refused before its payload is buffered. On error buf is untouched too.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, ProtocolError> {
        let Some(&[frame_type, c0, c1, s0, s1, s2, s3]) = buf.first_chunk::<FRAME_HEADER_SIZE>()
        else {
            return Ok(None);
        };
        let kind =
            FrameKind::from_u8(frame_type).ok_or(ProtocolError::UnknownFrameType { frame_type })?;
        let channel = u16::from_be_bytes([c0, c1]);
        let size = u32::from_be_bytes([s0, s1, s2, s3]);
        let total = u64::from(size) + FRAME_OVERHEAD as u64;
        if self.frame_max != 0 && total > u64::from(self.frame_max) {
            return Err(ProtocolError::FrameTooLarge {
                size: u32::try_from(total).unwrap_or(u32::MAX),
                frame_max: self.frame_max,
            });
        }
        if kind == FrameKind::Heartbeat && size != 0 {
            return Err(ProtocolError::BadHeartbeat { size });
        }
        // Only fails on 16-bit targets; such a frame could never be buffered anyway.
        let (Ok(total), Ok(size)) = (usize::try_from(total), usize::try_from(size)) else {
            return Err(ProtocolError::FrameTooLarge {
                size: u32::MAX,
                frame_max: self.frame_max,
            });
        };
        let Some(&end) = buf.get(total - 1) else {
            return Ok(None);
        };
        if end != FRAME_END {
            return Err(ProtocolError::BadFrameEnd { found: end });
        }
        let mut frame = buf.split_to(total);
        frame.advance(FRAME_HEADER_SIZE);
        frame.truncate(size);
        Ok(Some(RawFrame {
            kind,
            channel,
            payload: frame.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(end);
        v
    }

    #[test]
    fn protocol_header_checks() {
        assert_eq!(check_protocol_header(b""), ProtocolHeader::Incomplete);
        assert_eq!(check_protocol_header(b"AMQ"), ProtocolHeader::Incomplete);
        assert_eq!(
            check_protocol_header(b"AMQP\x00\x00\x09"),
            ProtocolHeader::Incomplete
        );
        assert_eq!(
            check_protocol_header(b"AMQP\x00\x00\x09\x01"),
            ProtocolHeader::Accepted
        );
        // Bytes after the header belong to the first frame.
        assert_eq!(
            check_protocol_header(b"AMQP\x00\x00\x09\x01\x01\x00"),
            ProtocolHeader::Accepted
        );
        assert_eq!(
            check_protocol_header(b"AMQP\x00\x00\x09\x00"),
            ProtocolHeader::Rejected
        );
        // RabbitMQ serves the legacy 0-9 header as 0-9-1.
        assert_eq!(
            check_protocol_header(b"AMQP\x01\x01\x00\x09"),
            ProtocolHeader::Accepted
        );
        assert_eq!(
            check_protocol_header(b"AMQP\x01\x01\x00"),
            ProtocolHeader::Incomplete
        );
        assert_eq!(
            check_protocol_header(b"AMQP\x01"),
            ProtocolHeader::Incomplete
        );
        assert_eq!(check_protocol_header(b"AMQP\x02"), ProtocolHeader::Rejected);
        assert_eq!(
            check_protocol_header(b"GET / HTTP/1.1\r\n"),
            ProtocolHeader::Rejected
        );
        assert_eq!(check_protocol_header(b"G"), ProtocolHeader::Rejected);
        assert_eq!(
            check_protocol_header(&[0x16, 0x03]),
            ProtocolHeader::Rejected
        );
        assert_eq!(
            check_protocol_header(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]),
            ProtocolHeader::Rejected
        );
    }

    #[test]
    fn splits_frames_and_waits_for_more() {
        let mut wire = frame_bytes(FRAME_METHOD, 1, b"abcd", FRAME_END);
        wire.extend(frame_bytes(FRAME_HEARTBEAT, 0, b"", FRAME_END));
        let mut s = FrameSplitter::new(FRAME_MIN_SIZE);
        let mut buf = BytesMut::new();
        for (i, byte) in wire.iter().enumerate().take(12) {
            let before = buf.clone();
            assert_eq!(s.decode(&mut buf).unwrap(), None, "after {i} bytes");
            assert_eq!(buf, before, "incomplete decode must not touch the buffer");
            buf.extend_from_slice(&[*byte]);
        }
        let f = s.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Method);
        assert_eq!(f.channel, 1);
        assert_eq!(&f.payload[..], b"abcd");
        assert!(buf.is_empty());
        buf.extend_from_slice(&wire[12..]);
        let f = s.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Heartbeat);
        assert!(f.payload.is_empty());
        assert_eq!(s.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn bad_frame_end() {
        let mut buf = BytesMut::from(&frame_bytes(FRAME_METHOD, 1, b"abcd", 0)[..]);
        let err = FrameSplitter::new(0).decode(&mut buf).unwrap_err();
        assert_eq!(err, ProtocolError::BadFrameEnd { found: 0 });
        assert_eq!(err.reply_code(), 501);
    }

    #[test]
    fn unknown_frame_type_from_first_byte() {
        for t in [0u8, 4, 7, 9, b'A', 0xff] {
            let mut buf = BytesMut::from(&[t, 0, 0, 0, 0, 0, 0][..]);
            let err = FrameSplitter::new(0).decode(&mut buf).unwrap_err();
            assert_eq!(err, ProtocolError::UnknownFrameType { frame_type: t });
            assert_eq!(err.reply_code(), 501);
        }
    }

    #[test]
    fn oversize_is_detected_from_the_header_alone() {
        // 7 bytes announcing a 131065-byte payload: 131073 total > 131072.
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0x00, 0x01, 0xff, 0xf9][..]);
        let err = FrameSplitter::new(131_072).decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                size: 131_073,
                frame_max: 131_072
            }
        );
        assert_eq!(err.reply_code(), 501);
        assert_eq!(buf.len(), 7);
        // One byte less is fine (and merely incomplete).
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0x00, 0x01, 0xff, 0xf8][..]);
        assert_eq!(FrameSplitter::new(131_072).decode(&mut buf).unwrap(), None);
        // The largest announced size does not overflow the arithmetic.
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        let err = FrameSplitter::new(4096).decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                size: u32::MAX,
                frame_max: 4096
            }
        );
    }

    #[test]
    fn frame_max_zero_means_unlimited_and_is_adjustable() {
        let payload = vec![9u8; 10_000];
        let wire = frame_bytes(FRAME_BODY, 3, &payload, FRAME_END);
        let mut s = FrameSplitter::new(0);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(s.decode(&mut buf).unwrap().unwrap().payload.len(), 10_000);
        s.set_frame_max(FRAME_MIN_SIZE);
        assert_eq!(s.frame_max(), FRAME_MIN_SIZE);
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            s.decode(&mut buf),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        // Exactly frame_max total bytes is allowed.
        let wire = frame_bytes(FRAME_BODY, 3, &payload[..4088], FRAME_END);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(s.decode(&mut buf).unwrap().unwrap().payload.len(), 4088);
    }

    #[test]
    fn heartbeat_with_payload_is_a_frame_error() {
        let mut buf = BytesMut::from(&frame_bytes(FRAME_HEARTBEAT, 0, b"x", FRAME_END)[..]);
        let err = FrameSplitter::new(0).decode(&mut buf).unwrap_err();
        assert_eq!(err, ProtocolError::BadHeartbeat { size: 1 });
        assert_eq!(err.reply_code(), 501);
    }

    #[test]
    fn payload_is_a_slice_of_the_read_buffer() {
        let mut buf = BytesMut::from(&frame_bytes(FRAME_BODY, 1, b"hello", FRAME_END)[..]);
        let base = buf.as_ptr() as usize;
        let f = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.payload.as_ptr() as usize, base + FRAME_HEADER_SIZE);
    }
}
