//! Per-channel assembly of method, content header and body frames into complete commands,
//! with the frame-order checks of RabbitMQ's `rabbit_command_assembler`.

use bytes::{Bytes, BytesMut};

use crate::content::ContentHeader;
use crate::error::{ProtocolError, Unexpected};
use crate::frame::{FrameKind, RawFrame, FRAME_END, FRAME_HEADER_SIZE, FRAME_OVERHEAD};
use crate::method::{decode_method, Method};

/// RabbitMQ's hard cap on a message body (`?MAX_MSG_SIZE`, 512 MiB), checked against the
/// declared body size as soon as the content header arrives.
pub const DEFAULT_MAX_BODY_SIZE: u64 = 512 * 1024 * 1024;

/// A complete command from one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub channel: u16,
    pub method: Method,
    pub content: Option<Content>,
}

/// Single body frame -> zero-copy slice of that frame; several -> concatenated once.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub header: ContentHeader,
    pub body: Bytes,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    AwaitHeader {
        channel: u16,
        method: Method,
    },
    AwaitBody {
        channel: u16,
        method: Method,
        header: ContentHeader,
        remaining: u64,
        parts: BodyParts,
    },
}

/// The body frames received so far: a single frame (the usual case) costs no allocation and
/// stays a zero-copy slice.
#[derive(Debug, Default)]
enum BodyParts {
    #[default]
    Empty,
    One(Bytes),
    // Never sized from body_size: that is the peer's claim, not bytes received.
    Many(Vec<Bytes>),
}

impl BodyParts {
    fn push(&mut self, part: Bytes) {
        if part.is_empty() {
            return;
        }
        match std::mem::take(self) {
            BodyParts::Empty => *self = BodyParts::One(part),
            BodyParts::One(first) => *self = BodyParts::Many(vec![first, part]),
            BodyParts::Many(mut parts) => {
                parts.push(part);
                *self = BodyParts::Many(parts);
            }
        }
    }

    fn concat(self) -> Bytes {
        match self {
            BodyParts::Empty => Bytes::new(),
            BodyParts::One(body) => body,
            BodyParts::Many(parts) => concat(parts),
        }
    }
}

/// Per-channel state machine: method -> [content header -> body frames until body_size].
/// After any error the assembler is back to idle; the connection is expected to close.
#[derive(Debug)]
pub struct CommandAssembler {
    state: State,
    max_body_size: u64,
}

impl Default for CommandAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandAssembler {
    /// Refuses bodies over DEFAULT_MAX_BODY_SIZE, as RabbitMQ does.
    pub fn new() -> Self {
        Self::with_max_body_size(DEFAULT_MAX_BODY_SIZE)
    }

    /// A declared body size above `max_body_size` fails with BodyTooLarge (501) at the
    /// content header, before any body byte is buffered.
    pub fn with_max_body_size(max_body_size: u64) -> Self {
        CommandAssembler {
            state: State::Idle,
            max_body_size,
        }
    }

    /// True when no command is partially assembled.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Feed one frame of this channel. Ok(Some(cmd)) when a command is complete.
    ///
    /// Errors: header/body without a pending content method, a method or body while a header
    /// is due, a method or header while body bytes are due, a header for another class (or
    /// with a non-zero weight), a heartbeat on a non-zero channel, content frames on channel 0
    /// -> UnexpectedFrame (505); a body frame beyond body_size -> BodyOverflow (501);
    /// body_size over the limit -> BodyTooLarge (501); undecodable method or header -> Syntax
    /// (502) / UnknownMethod (503). Heartbeats on channel 0 are ignored.
    pub fn push(&mut self, frame: RawFrame) -> Result<Option<Command>, ProtocolError> {
        let (class_id, method_id) = match &self.state {
            State::Idle => (0, 0),
            State::AwaitHeader { method, .. } | State::AwaitBody { method, .. } => {
                (method.class_id(), method.method_id())
            }
        };
        let unexpected = |reason| ProtocolError::UnexpectedFrame {
            reason,
            class_id,
            method_id,
        };
        match frame.kind {
            FrameKind::Heartbeat if frame.channel == 0 => return Ok(None),
            FrameKind::Heartbeat => {
                self.state = State::Idle;
                return Err(unexpected(Unexpected::HeartbeatOnChannel {
                    channel: frame.channel,
                }));
            }
            FrameKind::Header | FrameKind::Body if frame.channel == 0 => {
                self.state = State::Idle;
                return Err(unexpected(Unexpected::ContentOnChannelZero));
            }
            _ => {}
        }
        // Body frames are the common case: handled in place, so the (large) state only moves
        // once, when the command is complete.
        if let (
            State::AwaitBody {
                remaining, parts, ..
            },
            FrameKind::Body,
        ) = (&mut self.state, frame.kind)
        {
            let len = frame.payload.len() as u64;
            if len > *remaining {
                let remaining = *remaining;
                self.state = State::Idle;
                return Err(ProtocolError::BodyOverflow {
                    frame_size: len,
                    remaining,
                    class_id,
                    method_id,
                });
            }
            *remaining -= len;
            parts.push(frame.payload);
            if *remaining > 0 {
                return Ok(None);
            }
            let State::AwaitBody {
                channel,
                method,
                header,
                parts,
                ..
            } = std::mem::take(&mut self.state)
            else {
                return Ok(None);
            };
            return Ok(Some(Command {
                channel,
                method,
                content: Some(Content {
                    header,
                    body: parts.concat(),
                }),
            }));
        }
        match (std::mem::take(&mut self.state), frame.kind) {
            (State::Idle, FrameKind::Method) => {
                let method = decode_method(frame.payload)?;
                if method.has_content() {
                    self.state = State::AwaitHeader {
                        channel: frame.channel,
                        method,
                    };
                    Ok(None)
                } else {
                    Ok(Some(Command {
                        channel: frame.channel,
                        method,
                        content: None,
                    }))
                }
            }
            (State::Idle, got) => Err(unexpected(Unexpected::ExpectedMethod { got })),
            (State::AwaitHeader { channel, method }, FrameKind::Header) => {
                self.on_header(channel, method, frame.payload)
            }
            (State::AwaitHeader { method, .. }, got) => {
                Err(unexpected(Unexpected::ExpectedContentHeader {
                    class_id: method.class_id(),
                    got,
                }))
            }
            (State::AwaitBody { .. }, got) => {
                Err(unexpected(Unexpected::ExpectedContentBody { got }))
            }
        }
    }

    /// The channel of a basic.publish method frame at the start of `buf`, if one starts there
    /// (only its first 11 bytes are looked at): the cue to try [`Self::take_publish`].
    pub fn publish_channel(buf: &[u8]) -> Option<u16> {
        match buf.first_chunk::<{ FRAME_HEADER_SIZE + 4 }>() {
            Some(&[1, c0, c1, _, _, _, _, 0, 60, 0, 40]) => {
                Some(u16::from_be_bytes([c0, c1])).filter(|&channel| channel != 0)
            }
            _ => None,
        }
    }

    /// Takes a whole basic.publish off the front of `buf` in one step when it is all there and
    /// in the common shape: method, content header and at most one body frame, all on one
    /// channel. A publisher's stream is mostly that, and this skips the per-frame state
    /// machine of [`Self::push`].
    ///
    /// Ok(None), with `buf` untouched, whenever anything differs from that shape or is not
    /// complete yet (a frame over `frame_max`, a bad frame end, another frame type or channel,
    /// a header of another class or with a weight, a body over the limit or in several
    /// frames): feeding the frames to [`Self::push`] then gives the right answer, error
    /// included. Errors from the method and header payloads are those `push` would return
    /// for the same frames. Must be called only while no command is partially assembled.
    pub fn take_publish(
        &mut self,
        buf: &mut BytesMut,
        frame_max: u32,
    ) -> Result<Option<Command>, ProtocolError> {
        if !self.is_idle() {
            return Ok(None);
        }
        let Some(channel) = Self::publish_channel(buf) else {
            return Ok(None);
        };
        // (payload start, payload length) of a complete, well-formed frame at `at`.
        let frame_at = |at: usize, kind: u8| -> Option<(usize, usize)> {
            let header = buf.get(at..at + FRAME_HEADER_SIZE)?;
            let &[k, c0, c1, s0, s1, s2, s3] = header else {
                return None;
            };
            let size = usize::try_from(u32::from_be_bytes([s0, s1, s2, s3])).ok()?;
            let total = size.checked_add(FRAME_OVERHEAD)?;
            if k != kind
                || u16::from_be_bytes([c0, c1]) != channel
                || (frame_max != 0 && total > usize::try_from(frame_max).ok()?)
                || *buf.get(at + total - 1)? != FRAME_END
            {
                return None;
            }
            Some((at + FRAME_HEADER_SIZE, size))
        };
        let Some((method_at, method_len)) = frame_at(0, 1) else {
            return Ok(None);
        };
        let header_frame = method_at + method_len + 1;
        let Some((header_at, header_len)) = frame_at(header_frame, 2) else {
            return Ok(None);
        };
        // Class 60, weight 0 and the body size: the checks `on_header` makes before decoding.
        let Some(&[0, 60, 0, 0, b0, b1, b2, b3, b4, b5, b6, b7]) = buf
            .get(header_at..header_at + header_len)
            .and_then(|h| h.first_chunk::<12>())
        else {
            return Ok(None);
        };
        let body_size = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        if body_size > self.max_body_size {
            return Ok(None);
        }
        let mut end = header_at + header_len + 1;
        let mut body = None;
        if body_size > 0 {
            let Some((body_at, body_len)) = frame_at(end, 3) else {
                return Ok(None);
            };
            if body_len as u64 != body_size {
                return Ok(None);
            }
            body = Some(body_at..body_at + body_len);
            end = body_at + body_len + 1;
        }
        let all = buf.split_to(end).freeze();
        let method = decode_method(all.slice(method_at..method_at + method_len))?;
        let (class_id, method_id) = (method.class_id(), method.method_id());
        let header = ContentHeader::decode(all.slice(header_at..header_at + header_len))
            .map_err(|e| e.on_method(class_id, method_id))?;
        Ok(Some(Command {
            channel,
            method,
            content: Some(Content {
                header,
                body: body.map_or_else(Bytes::new, |range| all.slice(range)),
            }),
        }))
    }

    fn on_header(
        &mut self,
        channel: u16,
        method: Method,
        payload: Bytes,
    ) -> Result<Option<Command>, ProtocolError> {
        let (class_id, method_id) = (method.class_id(), method.method_id());
        // RabbitMQ reads class and weight before the properties: a wrong class or a non-zero
        // weight is an unexpected frame even if the properties are garbage.
        if let Some(&[c0, c1, w0, w1]) = payload.first_chunk::<4>() {
            let header_class = u16::from_be_bytes([c0, c1]);
            let weight = u16::from_be_bytes([w0, w1]);
            let reason = if header_class != class_id {
                Some(Unexpected::ContentHeaderClass {
                    expected: class_id,
                    got: header_class,
                })
            } else if weight != 0 {
                Some(Unexpected::ExpectedContentHeader {
                    class_id,
                    got: FrameKind::Header,
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(ProtocolError::UnexpectedFrame {
                    reason,
                    class_id,
                    method_id,
                });
            }
        }
        let header =
            ContentHeader::decode(payload).map_err(|e| e.on_method(class_id, method_id))?;
        if header.body_size > self.max_body_size {
            return Err(ProtocolError::BodyTooLarge {
                body_size: header.body_size,
                max: self.max_body_size,
                class_id,
                method_id,
            });
        }
        if header.body_size == 0 {
            return Ok(Some(Command {
                channel,
                method,
                content: Some(Content {
                    header,
                    body: Bytes::new(),
                }),
            }));
        }
        self.state = State::AwaitBody {
            channel,
            remaining: header.body_size,
            method,
            header,
            parts: BodyParts::Empty,
        };
        Ok(None)
    }
}

fn concat(mut fragments: Vec<Bytes>) -> Bytes {
    if fragments.len() == 1 {
        return fragments.pop().unwrap_or_default();
    }
    let total = fragments.iter().map(Bytes::len).sum();
    let mut body = BytesMut::with_capacity(total);
    for fragment in &fragments {
        body.extend_from_slice(fragment);
    }
    body.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::method_payload;
    use amq_protocol::protocol::{basic, channel, AMQPClass, BasicProperties};

    fn publish(channel: u16) -> RawFrame {
        RawFrame {
            kind: FrameKind::Method,
            channel,
            payload: Bytes::from_static(&[0, 60, 0, 40, 0, 0, 0, 1, b'q', 0]),
        }
    }

    fn header(channel: u16, class_id: u16, body_size: u64) -> RawFrame {
        let mut v = class_id.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&body_size.to_be_bytes());
        v.extend_from_slice(&[0x10, 0x00, 2]); // delivery-mode 2
        RawFrame {
            kind: FrameKind::Header,
            channel,
            payload: Bytes::from(v),
        }
    }

    fn body(channel: u16, data: &'static [u8]) -> RawFrame {
        RawFrame {
            kind: FrameKind::Body,
            channel,
            payload: Bytes::from_static(data),
        }
    }

    fn method(channel: u16, class: AMQPClass) -> RawFrame {
        RawFrame {
            kind: FrameKind::Method,
            channel,
            payload: Bytes::from(method_payload(&class).unwrap()),
        }
    }

    fn heartbeat(channel: u16) -> RawFrame {
        RawFrame {
            kind: FrameKind::Heartbeat,
            channel,
            payload: Bytes::new(),
        }
    }

    fn code(r: Result<Option<Command>, ProtocolError>) -> u16 {
        r.unwrap_err().reply_code()
    }

    #[test]
    fn method_without_content_completes_at_once() {
        let mut a = CommandAssembler::new();
        let cmd = a
            .push(method(
                3,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(cmd.channel, 3);
        assert_eq!(cmd.content, None);
        assert!(a.is_idle());
    }

    #[test]
    fn publish_with_split_body() {
        let mut a = CommandAssembler::default();
        assert_eq!(a.push(publish(1)).unwrap(), None);
        assert!(!a.is_idle());
        assert_eq!(a.push(header(1, 60, 5)).unwrap(), None);
        assert_eq!(a.push(body(1, b"he")).unwrap(), None);
        assert_eq!(a.push(body(1, b"")).unwrap(), None);
        let cmd = a.push(body(1, b"llo")).unwrap().unwrap();
        let content = cmd.content.unwrap();
        assert_eq!(&content.body[..], b"hello");
        assert!(content.header.is_persistent());
        assert!(matches!(cmd.method, Method::Publish(_)));
        assert!(a.is_idle());
    }

    #[test]
    fn single_body_frame_is_zero_copy() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        a.push(header(1, 60, 5)).unwrap();
        let frame = body(1, b"hello");
        let ptr = frame.payload.as_ptr();
        let cmd = a.push(frame).unwrap().unwrap();
        assert_eq!(cmd.content.unwrap().body.as_ptr(), ptr);
    }

    #[test]
    fn empty_body_completes_at_the_header() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        let cmd = a.push(header(1, 60, 0)).unwrap().unwrap();
        assert!(cmd.content.unwrap().body.is_empty());
        assert!(a.is_idle());
        // A body frame now has no method to belong to.
        assert_eq!(code(a.push(body(1, b"x"))), 505);
    }

    #[test]
    fn header_without_method() {
        let err = CommandAssembler::new().push(header(1, 60, 1)).unwrap_err();
        assert_eq!(err.reply_code(), 505);
        assert_eq!(
            err.reply_text(),
            "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
        );
        assert_eq!(err.class_method(), (0, 0));
    }

    #[test]
    fn body_without_method() {
        assert_eq!(code(CommandAssembler::new().push(body(1, b"x"))), 505);
    }

    #[test]
    fn method_while_header_pending() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        let err = a.push(publish(1)).unwrap_err();
        assert_eq!(err.reply_code(), 505);
        assert_eq!(
            err.reply_text(),
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
        );
        assert_eq!(err.class_method(), (60, 40));
        assert!(a.is_idle());
    }

    #[test]
    fn body_while_header_pending() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        assert_eq!(code(a.push(body(1, b"x"))), 505);
    }

    #[test]
    fn method_or_header_while_body_pending() {
        for intruder in [publish(1), header(1, 60, 1)] {
            let mut a = CommandAssembler::new();
            a.push(publish(1)).unwrap();
            a.push(header(1, 60, 2)).unwrap();
            a.push(body(1, b"x")).unwrap();
            let err = a.push(intruder).unwrap_err();
            assert_eq!(err.reply_code(), 505);
            assert_eq!(
                err.reply_text(),
                "UNEXPECTED_FRAME - expected content body, got non content body frame instead"
            );
            assert_eq!(err.class_method(), (60, 40));
        }
    }

    #[test]
    fn header_for_another_class() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        let err = a.push(header(1, 50, 1)).unwrap_err();
        assert_eq!(err.reply_code(), 505);
        assert_eq!(
            err.reply_text(),
            "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead"
        );
    }

    #[test]
    fn header_with_weight() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        let mut h = header(1, 60, 1);
        let mut v = h.payload.to_vec();
        v[3] = 1;
        h.payload = Bytes::from(v);
        assert_eq!(code(a.push(h)), 505);
    }

    #[test]
    fn body_overflow() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        a.push(header(1, 60, 3)).unwrap();
        a.push(body(1, b"ab")).unwrap();
        let err = a.push(body(1, b"cd")).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::BodyOverflow {
                frame_size: 2,
                remaining: 1,
                class_id: 60,
                method_id: 40
            }
        );
        assert_eq!(err.reply_code(), 501);
        assert_eq!(
            err.reply_text(),
            "FRAME_ERROR - content body frame exceeds remaining content size"
        );
    }

    #[test]
    fn body_size_limit_is_checked_at_the_header() {
        let mut a = CommandAssembler::with_max_body_size(4);
        a.push(publish(1)).unwrap();
        assert!(a.push(header(1, 60, 4)).unwrap().is_none());
        let mut a = CommandAssembler::with_max_body_size(4);
        a.push(publish(1)).unwrap();
        let err = a.push(header(1, 60, 5)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert_eq!(err.class_method(), (60, 40));
        // The default follows RabbitMQ's 512 MiB cap, whatever the peer claims.
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        assert_eq!(code(a.push(header(1, 60, u64::MAX))), 501);
    }

    #[test]
    fn malformed_header_is_a_syntax_error_on_the_publish() {
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        let mut h = header(1, 60, 1);
        let mut v = h.payload.to_vec();
        v.push(0); // trailing byte after the property list
        h.payload = Bytes::from(v);
        let err = a.push(h).unwrap_err();
        assert_eq!(err.reply_code(), 502);
        assert_eq!(err.class_method(), (60, 40));
    }

    #[test]
    fn heartbeats() {
        let mut a = CommandAssembler::new();
        assert_eq!(a.push(heartbeat(0)).unwrap(), None);
        let err = a.push(heartbeat(2)).unwrap_err();
        assert_eq!(err.reply_code(), 505);
        assert!(err.reply_text().contains("heartbeat"));
        // A channel-0 heartbeat in the middle of content does not disturb it.
        let mut a = CommandAssembler::new();
        a.push(publish(1)).unwrap();
        a.push(heartbeat(0)).unwrap();
        a.push(header(1, 60, 1)).unwrap();
        assert!(a.push(body(1, b"x")).unwrap().is_some());
    }

    #[test]
    fn content_on_channel_zero() {
        assert_eq!(code(CommandAssembler::new().push(header(0, 60, 1))), 505);
        assert_eq!(code(CommandAssembler::new().push(body(0, b"x"))), 505);
    }

    #[test]
    fn decode_errors_propagate() {
        let mut a = CommandAssembler::new();
        let err = a
            .push(RawFrame {
                kind: FrameKind::Method,
                channel: 1,
                payload: Bytes::from_static(&[0, 99, 0, 1]),
            })
            .unwrap_err();
        assert_eq!(err.reply_code(), 503);
        assert!(a.is_idle());
    }

    #[test]
    fn server_side_content_methods_also_collect_content() {
        let deliver = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
        }));
        let mut a = CommandAssembler::new();
        assert_eq!(a.push(method(1, deliver)).unwrap(), None);
        let h = ContentHeader::from_properties(60, 1, &BasicProperties::default());
        let mut v = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        v.extend_from_slice(&h.raw_properties);
        a.push(RawFrame {
            kind: FrameKind::Header,
            channel: 1,
            payload: Bytes::from(v),
        })
        .unwrap();
        let cmd = a.push(body(1, b"z")).unwrap().unwrap();
        assert_eq!(cmd.content.unwrap().header, h);
    }
}
