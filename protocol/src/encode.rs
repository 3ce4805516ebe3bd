//! Server -> client encoding: amq-protocol for general methods, hand-written hot frames that
//! are byte-identical to amq-protocol's output. Everything appends to a BytesMut.
//!
//! Short strings given as `&[u8]` longer than 255 bytes are truncated to their first 255
//! bytes (AMQP's shortstr limit) instead of panicking; a cut inside a UTF-8 sequence is kept
//! as is, so callers that care should not pass such strings.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::{gen_class, AMQPClass};
use bytes::{BufMut, BytesMut};

use crate::frame::{
    RawFrame, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE,
    FRAME_OVERHEAD, PROTOCOL_HEADER,
};

const BASIC: u16 = 60;
const SHORT_STR_MAX: usize = 255;

fn short(s: &[u8]) -> &[u8] {
    s.get(..SHORT_STR_MAX).unwrap_or(s)
}

fn put_short_str(buf: &mut BytesMut, s: &[u8]) {
    let s = short(s);
    buf.put_u8(s.len() as u8);
    buf.put_slice(s);
}

/// Writes the 7-byte frame header for a payload of `len` bytes; the caller writes exactly that
/// payload and then FRAME_END.
fn put_frame_header(buf: &mut BytesMut, frame_type: u8, channel: u16, len: usize) {
    buf.reserve(len + FRAME_OVERHEAD);
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    buf.put_u32(len as u32);
}

fn put_frame(buf: &mut BytesMut, frame_type: u8, channel: u16, payload: &[u8]) {
    put_frame_header(buf, frame_type, channel, payload.len());
    buf.put_slice(payload);
    buf.put_u8(FRAME_END);
}

/// amq-protocol's encoding of a method (class id, method id, arguments).
pub(crate) fn method_payload(method: &AMQPClass) -> Option<Vec<u8>> {
    gen_class(method)(WriteContext::from(Vec::with_capacity(64)))
        .ok()
        .map(|ctx| ctx.into_inner().0)
}

/// Any method, via amq-protocol's gen_class; byte-identical to its gen_frame. Never panics:
/// amq-protocol cannot fail when writing to memory, and if it ever did nothing is appended.
pub fn encode_method(buf: &mut BytesMut, channel: u16, method: &AMQPClass) {
    if let Some(payload) = method_payload(method) {
        put_frame(buf, FRAME_METHOD, channel, &payload);
    }
}

/// Any raw frame, e.g. to forward or replay one.
pub fn encode_frame(buf: &mut BytesMut, frame: &RawFrame) {
    put_frame(buf, frame.kind.as_u8(), frame.channel, &frame.payload);
}

pub fn encode_heartbeat(buf: &mut BytesMut) {
    put_frame(buf, FRAME_HEARTBEAT, 0, &[]);
}

pub fn encode_protocol_header(buf: &mut BytesMut) {
    buf.put_slice(&PROTOCOL_HEADER);
}

pub fn encode_basic_deliver(
    buf: &mut BytesMut,
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
) {
    let (consumer_tag, exchange, routing_key) =
        (short(consumer_tag), short(exchange), short(routing_key));
    let len = 4 + 1 + consumer_tag.len() + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len();
    put_frame_header(buf, FRAME_METHOD, channel, len);
    buf.put_u16(BASIC);
    buf.put_u16(60);
    put_short_str(buf, consumer_tag);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(redelivered));
    put_short_str(buf, exchange);
    put_short_str(buf, routing_key);
    buf.put_u8(FRAME_END);
}

pub fn encode_basic_get_ok(
    buf: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) {
    let (exchange, routing_key) = (short(exchange), short(routing_key));
    let len = 4 + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len() + 4;
    put_frame_header(buf, FRAME_METHOD, channel, len);
    buf.put_u16(BASIC);
    buf.put_u16(71);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(redelivered));
    put_short_str(buf, exchange);
    put_short_str(buf, routing_key);
    buf.put_u32(message_count);
    buf.put_u8(FRAME_END);
}

pub fn encode_basic_ack(buf: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    put_frame_header(buf, FRAME_METHOD, channel, 4 + 8 + 1);
    buf.put_u16(BASIC);
    buf.put_u16(80);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(multiple));
    buf.put_u8(FRAME_END);
}

pub fn encode_basic_nack(
    buf: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    multiple: bool,
    requeue: bool,
) {
    put_frame_header(buf, FRAME_METHOD, channel, 4 + 8 + 1);
    buf.put_u16(BASIC);
    buf.put_u16(120);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(multiple) | u8::from(requeue) << 1);
    buf.put_u8(FRAME_END);
}

pub fn encode_basic_return(
    buf: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &[u8],
    exchange: &[u8],
    routing_key: &[u8],
) {
    let (reply_text, exchange, routing_key) =
        (short(reply_text), short(exchange), short(routing_key));
    let len = 4 + 2 + 1 + reply_text.len() + 1 + exchange.len() + 1 + routing_key.len();
    put_frame_header(buf, FRAME_METHOD, channel, len);
    buf.put_u16(BASIC);
    buf.put_u16(50);
    buf.put_u16(reply_code);
    put_short_str(buf, reply_text);
    put_short_str(buf, exchange);
    put_short_str(buf, routing_key);
    buf.put_u8(FRAME_END);
}

/// Content header frame (raw properties verbatim, weight 0, `body_size` as given) followed by
/// body frames, each frame <= frame_max total bytes. frame_max 0 = no split (except at the
/// 4 GiB a frame can hold); values below FRAME_MIN_SIZE count as FRAME_MIN_SIZE, which every
/// peer must accept. The header frame is never split: AMQP has no way to, so properties
/// larger than frame_max yield a larger header frame. An empty body sends no body frame.
pub fn encode_content(
    buf: &mut BytesMut,
    channel: u16,
    class_id: u16,
    body_size: u64,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    put_frame_header(buf, FRAME_HEADER, channel, 12 + raw_properties.len());
    buf.put_u16(class_id);
    buf.put_u16(0);
    buf.put_u64(body_size);
    buf.put_slice(raw_properties);
    buf.put_u8(FRAME_END);

    let max_payload = if frame_max == 0 {
        u32::MAX as usize
    } else {
        frame_max.max(FRAME_MIN_SIZE) as usize - FRAME_OVERHEAD
    };
    let frames = body.len().div_ceil(max_payload);
    buf.reserve(body.len() + frames * FRAME_OVERHEAD);
    for chunk in body.chunks(max_payload) {
        put_frame(buf, FRAME_BODY, channel, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPFrame};
    use amq_protocol::protocol::basic;

    fn reference(frame: &AMQPFrame) -> Vec<u8> {
        gen_frame(frame)(WriteContext::from(Vec::new()))
            .unwrap()
            .into_inner()
            .0
    }

    #[test]
    fn heartbeat_and_protocol_header() {
        let mut buf = BytesMut::new();
        encode_heartbeat(&mut buf);
        assert_eq!(&buf[..], &reference(&AMQPFrame::Heartbeat)[..]);
        assert_eq!(&buf[..], &[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        let mut buf = BytesMut::new();
        encode_protocol_header(&mut buf);
        assert_eq!(
            &buf[..],
            &reference(&AMQPFrame::ProtocolHeader(
                amq_protocol::frame::ProtocolVersion::amqp_0_9_1()
            ))[..]
        );
    }

    #[test]
    fn long_short_strings_are_truncated() {
        let long = vec![b'a'; 300];
        let mut buf = BytesMut::new();
        encode_basic_return(&mut buf, 1, 312, &long, b"", b"");
        let expected = basic::Return {
            reply_code: 312,
            reply_text: String::from_utf8(vec![b'a'; 255]).unwrap().into(),
            exchange: "".into(),
            routing_key: "".into(),
        };
        let frame = AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(expected)));
        assert_eq!(&buf[..], &reference(&frame)[..]);
    }

    #[test]
    fn content_is_split_at_frame_max() {
        let body = vec![7u8; 10_000];
        let mut buf = BytesMut::new();
        encode_content(&mut buf, 1, 60, 10_000, &[0, 0], &body, 4096);
        let mut splitter = crate::FrameSplitter::new(4096);
        let mut sizes = Vec::new();
        while let Some(f) = splitter.decode(&mut buf).unwrap() {
            sizes.push((f.kind, f.payload.len()));
        }
        use crate::FrameKind::*;
        assert_eq!(
            sizes,
            vec![(Header, 14), (Body, 4088), (Body, 4088), (Body, 1824)]
        );
        // Below the minimum behaves like the minimum; empty bodies send no body frame.
        let mut a = BytesMut::new();
        encode_content(&mut a, 1, 60, 10_000, &[0, 0], &body, 100);
        let mut b = BytesMut::new();
        encode_content(&mut b, 1, 60, 10_000, &[0, 0], &body, 4096);
        assert_eq!(a, b);
        let mut buf = BytesMut::new();
        encode_content(&mut buf, 1, 60, 0, &[0, 0], &[], 0);
        assert_eq!(buf.len(), 12 + 2 + 8);
    }
}
