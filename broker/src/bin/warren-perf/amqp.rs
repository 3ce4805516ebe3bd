//! A minimal AMQP 0-9-1 client on Warren's codec: the handshake by hand, request/reply
//! methods for setup, and the few hot-path encoders and decoders the load loops need.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::{
    decode_method, encode_content, encode_heartbeat, encode_method, encode_protocol_header,
    FrameKind, FrameSplitter, Method, RawFrame, FRAME_BODY, FRAME_END, FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
};

use crate::args::{ArgValue, Uri};

/// The channel every warren-perf connection works on.
pub const CHANNEL: u16 = 1;
/// Read buffer growth per read call.
pub const READ_CHUNK: usize = 256 * 1024;
/// Frame size asked for when the broker offers no limit.
const DEFAULT_FRAME_MAX: u32 = 131_072;

/// (class, method) ids of the methods the hot loops look for.
pub const BASIC_DELIVER: (u16, u16) = (60, 60);
pub const BASIC_ACK: (u16, u16) = (60, 80);
pub const BASIC_NACK: (u16, u16) = (60, 120);
pub const BASIC_RETURN: (u16, u16) = (60, 50);
pub const BASIC_CANCEL: (u16, u16) = (60, 30);
pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
pub const CONNECTION_BLOCKED: (u16, u16) = (10, 60);
pub const CONNECTION_UNBLOCKED: (u16, u16) = (10, 61);

#[derive(Debug, Clone, Copy)]
pub struct ConnOpts {
    /// 0: take the broker's offer.
    pub frame_max: u32,
    pub heartbeat: u16,
    pub connect_timeout: Duration,
}

/// The class and method ids of a method frame payload.
pub fn method_ids(payload: &[u8]) -> Option<(u16, u16)> {
    payload
        .first_chunk::<4>()
        .map(|&[c0, c1, m0, m1]| (u16::from_be_bytes([c0, c1]), u16::from_be_bytes([m0, m1])))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// The delivery tag of a basic.deliver payload, read in place (consumer tag skipped).
pub fn deliver_tag(payload: &[u8]) -> Option<u64> {
    let tag_len = usize::from(*payload.get(4)?);
    be_u64(payload, 5 + tag_len)
}

/// (delivery tag, multiple) of a basic.ack or basic.nack payload.
pub fn ack_fields(payload: &[u8]) -> Option<(u64, bool)> {
    Some((be_u64(payload, 4)?, payload.get(12)? & 1 != 0))
}

/// The body size of a content header payload.
pub fn header_body_size(payload: &[u8]) -> Option<u64> {
    be_u64(payload, 4)
}

/// "404 NOT_FOUND - no queue 'x'" from a channel.close or connection.close payload.
pub fn close_reason(payload: &[u8]) -> String {
    let text = |code: u16, text: &str| format!("{code} {text}");
    match decode_method(bytes::Bytes::copy_from_slice(payload)) {
        Ok(Method::Other(AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            text(c.reply_code, c.reply_text.as_str())
        }
        Ok(Method::Other(AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
            text(c.reply_code, c.reply_text.as_str())
        }
        _ => "(undecodable close)".to_owned(),
    }
}

/// Monotonic nanoseconds since the process's shared epoch; producers and consumers live in
/// one process, so their timestamps compare directly.
pub fn epoch_ns(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// The send timestamp in the first 8 bytes of a body (None if the body is shorter).
pub fn body_timestamp(body: &[u8]) -> Option<u64> {
    be_u64(body, 0)
}

/// Pre-encoded basic.publish + content header; `encode` appends one message with a fresh
/// timestamp: a copy of the prefix and the body frames, nothing else per message.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    prefix: Vec<u8>,
    body: Vec<u8>,
    max_payload: usize,
}

impl PublishTemplate {
    pub fn new(
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        persistent: bool,
        size: usize,
        frame_max: u32,
    ) -> Self {
        let mut prefix = BytesMut::new();
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            mandatory,
            immediate: false,
        }));
        encode_method(&mut prefix, CHANNEL, &publish);
        // Property flags: delivery-mode only (bit 12), value 2 = persistent.
        let props: &[u8] = if persistent {
            &[0x10, 0x00, 2]
        } else {
            &[0, 0]
        };
        encode_content(&mut prefix, CHANNEL, 60, size as u64, props, &[], frame_max);
        let max_payload = if frame_max == 0 {
            u32::MAX as usize
        } else {
            frame_max.max(FRAME_MIN_SIZE) as usize - FRAME_OVERHEAD
        };
        PublishTemplate {
            prefix: prefix.to_vec(),
            body: vec![0; size],
            max_payload,
        }
    }

    /// Bytes one message takes on the wire.
    pub fn wire_size(&self) -> usize {
        let frames = self.body.len().div_ceil(self.max_payload);
        self.prefix.len() + self.body.len() + frames * FRAME_OVERHEAD
    }

    pub fn encode(&self, out: &mut BytesMut, timestamp_ns: u64) {
        out.reserve(self.wire_size());
        out.put_slice(&self.prefix);
        let ts = timestamp_ns.to_be_bytes();
        for (i, chunk) in self.body.chunks(self.max_payload).enumerate() {
            out.put_u8(FRAME_BODY);
            out.put_u16(CHANNEL);
            out.put_u32(chunk.len() as u32);
            let start = out.len();
            out.put_slice(chunk);
            if i == 0 {
                let n = chunk.len().min(ts.len());
                if let (Some(dst), Some(src)) = (out.get_mut(start..start + n), ts.get(..n)) {
                    dst.copy_from_slice(src);
                }
            }
            out.put_u8(FRAME_END);
        }
    }
}

pub fn field_table(args: &[(String, ArgValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let v = match v {
            ArgValue::Long(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
            ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        };
        t.insert(ShortString::from(k.as_str()), v);
    }
    t
}

fn client_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
    ] {
        caps.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(
        ShortString::from("product"),
        AMQPValue::LongString(LongString::from("warren-perf")),
    );
    props.insert(
        ShortString::from("version"),
        AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))),
    );
    props.insert(
        ShortString::from("capabilities"),
        AMQPValue::FieldTable(caps),
    );
    props
}

/// frame_max for tune-ok: the broker's offer, lowered to ours if we asked for less.
pub fn negotiate_frame_max(server: u32, wanted: u32) -> u32 {
    match (server, wanted) {
        (0, 0) => DEFAULT_FRAME_MAX,
        (0, w) => w.max(FRAME_MIN_SIZE),
        (s, 0) => s,
        (s, w) => s.min(w.max(FRAME_MIN_SIZE)),
    }
}

/// One AMQP connection with channel 1 open.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub out: BytesMut,
    pub splitter: FrameSplitter,
    pub frame_max: u32,
}

impl Conn {
    /// TCP connect, handshake (PLAIN), channel.open.
    pub async fn open(uri: &Uri, opts: ConnOpts) -> Result<Conn> {
        let addr = (uri.host.as_str(), uri.port);
        let stream = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {}:{} timed out", uri.host, uri.port))?
            .with_context(|| format!("connecting to {}:{}", uri.host, uri.port))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(64 * 1024),
            splitter: FrameSplitter::new(FRAME_MIN_SIZE),
            frame_max: FRAME_MIN_SIZE,
        };
        let handshake = conn.handshake(uri, opts);
        tokio::time::timeout(Duration::from_secs(30), handshake)
            .await
            .map_err(|_| anyhow!("AMQP handshake with {}:{} timed out", uri.host, uri.port))??;
        Ok(conn)
    }

    async fn handshake(&mut self, uri: &Uri, opts: ConnOpts) -> Result<()> {
        encode_protocol_header(&mut self.out);
        self.flush().await?;
        // A broker that refuses our version answers with its own protocol header.
        self.fill().await?;
        if self.rbuf.starts_with(b"AMQP") {
            bail!(
                "the broker refused AMQP 0-9-1 (answered {:?})",
                &self.rbuf[..]
            );
        }
        let start = self.expect(0, (10, 10)).await?;
        let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = start else {
            bail!("expected connection.start");
        };
        let mechanisms = start.mechanisms.to_string();
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            bail!("the broker does not offer PLAIN (offers '{mechanisms}')");
        }
        let mut response = vec![0u8];
        response.extend_from_slice(uri.user.as_bytes());
        response.push(0);
        response.extend_from_slice(uri.pass.as_bytes());
        self.push(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: client_properties(),
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(response),
                locale: ShortString::from("en_US"),
            })),
        );
        let tune = self
            .rpc(0, None, (10, 30))
            .await
            .context("waiting for connection.tune (bad credentials?)")?;
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
            bail!("expected connection.tune");
        };
        let frame_max = negotiate_frame_max(tune.frame_max, opts.frame_max);
        let heartbeat = match (tune.heartbeat, opts.heartbeat) {
            (_, 0) => 0,
            (0, h) => h,
            (s, h) => s.min(h),
        };
        self.push(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat,
            })),
        );
        self.frame_max = frame_max;
        self.splitter.set_frame_max(frame_max);
        let open = AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: ShortString::from(uri.vhost.as_str()),
        }));
        self.rpc(0, Some(open), (10, 41)).await?;
        let open = AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}));
        self.rpc(CHANNEL, Some(open), (20, 11)).await?;
        Ok(())
    }

    pub fn push(&mut self, ch: u16, method: AMQPClass) {
        encode_method(&mut self.out, ch, &method);
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        self.rbuf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    pub async fn next_frame(&mut self) -> Result<RawFrame> {
        loop {
            if let Some(frame) = self.splitter.decode(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Reads frames until a method `want` arrives on `ch`; answers heartbeats, turns a close
    /// from the broker into an error naming its reply, skips anything else.
    async fn expect(&mut self, ch: u16, want: (u16, u16)) -> Result<AMQPClass> {
        loop {
            let frame = self.next_frame().await?;
            if frame.kind == FrameKind::Heartbeat {
                encode_heartbeat(&mut self.out);
                self.flush().await?;
                continue;
            }
            if frame.kind != FrameKind::Method {
                continue;
            }
            let ids = method_ids(&frame.payload);
            if ids == Some(CONNECTION_CLOSE) {
                let reason = close_reason(&frame.payload);
                self.push(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                let _ = self.flush().await;
                bail!("the broker closed the connection: {reason}");
            }
            if ids == Some(CHANNEL_CLOSE) && frame.channel == ch {
                let reason = close_reason(&frame.payload);
                self.push(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                let _ = self.flush().await;
                bail!("the broker closed the channel: {reason}");
            }
            if frame.channel == ch && ids == Some(want) {
                return match decode_method(frame.payload)? {
                    Method::Other(class) => Ok(class),
                    other => Err(anyhow!("unexpected {} from the broker", other.name())),
                };
            }
        }
    }

    /// Sends what is buffered (plus `method`) and waits for the reply `want` on `ch`.
    pub async fn rpc(
        &mut self,
        ch: u16,
        method: Option<AMQPClass>,
        want: (u16, u16),
    ) -> Result<AMQPClass> {
        if let Some(m) = method {
            self.push(ch, m);
        }
        self.flush().await?;
        self.expect(ch, want).await
    }

    pub async fn exchange_declare(&mut self, name: &str, kind: &str, durable: bool) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: ShortString::from(name),
            kind: ShortString::from(kind),
            durable,
            ..Default::default()
        }));
        self.rpc(CHANNEL, Some(m), (40, 11))
            .await
            .with_context(|| format!("exchange.declare '{name}' ({kind})"))?;
        Ok(())
    }

    /// queue.declare; returns the message count.
    pub async fn queue_declare(
        &mut self,
        name: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<u32> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ShortString::from(name),
            passive,
            durable,
            exclusive: false,
            auto_delete,
            nowait: false,
            arguments,
        }));
        match self.rpc(CHANNEL, Some(m), (50, 11)).await? {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.message_count),
            _ => bail!("expected queue.declare-ok"),
        }
    }

    pub async fn queue_bind(&mut self, queue: &str, exchange: &str, key: &str) -> Result<()> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: ShortString::from(queue),
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(key),
            nowait: false,
            arguments: FieldTable::default(),
        }));
        self.rpc(CHANNEL, Some(m), (50, 21))
            .await
            .with_context(|| format!("queue.bind '{queue}' to '{exchange}'"))?;
        Ok(())
    }

    pub async fn confirm_select(&mut self) -> Result<()> {
        let m = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        }));
        self.rpc(CHANNEL, Some(m), (85, 11))
            .await
            .context("confirm.select")?;
        Ok(())
    }

    pub async fn qos(&mut self, prefetch: u16) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        }));
        self.rpc(CHANNEL, Some(m), (60, 11))
            .await
            .context("basic.qos")?;
        Ok(())
    }

    pub async fn consume(&mut self, queue: &str, tag: &str, no_ack: bool) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: ShortString::from(queue),
            consumer_tag: ShortString::from(tag),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        }));
        self.rpc(CHANNEL, Some(m), (60, 21))
            .await
            .with_context(|| format!("basic.consume on '{queue}'"))?;
        Ok(())
    }

    /// Writes whatever is pending (bounded), then connection.close and waits briefly for
    /// close-ok. Best effort: a benchmark that is done does not fail on a slow goodbye.
    pub async fn close(mut self) {
        let goodbye = async {
            self.flush().await?;
            self.push(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: ShortString::from("warren-perf done"),
                    class_id: 0,
                    method_id: 0,
                })),
            );
            self.flush().await?;
            loop {
                let frame = self.next_frame().await?;
                if frame.kind == FrameKind::Method
                    && frame.channel == 0
                    && method_ids(&frame.payload) == Some((10, 51))
                {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), goodbye).await;
    }

    /// Non-blocking read of whatever the socket holds; Ok(false) when nothing was there.
    pub fn try_fill(&mut self) -> Result<bool> {
        self.rbuf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => bail!("the broker closed the connection"),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Non-blocking write of as much of `out` as the socket takes.
    pub fn try_flush(&mut self) -> Result<()> {
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(0) => bail!("the connection is closed for writing"),
                Ok(n) => bytes::Buf::advance(&mut self.out, n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        self.out.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use warren_protocol::{encode_basic_ack, encode_basic_deliver, ContentHeader};

    #[test]
    fn deliver_and_ack_fields_in_place() {
        let mut buf = BytesMut::new();
        encode_basic_deliver(&mut buf, 1, b"ctag-7", 123_456_789_012, true, b"ex", b"rk");
        let f = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        assert_eq!(method_ids(&f.payload), Some(BASIC_DELIVER));
        assert_eq!(deliver_tag(&f.payload), Some(123_456_789_012));
        assert_eq!(deliver_tag(&f.payload[..10]), None);

        let mut buf = BytesMut::new();
        encode_basic_ack(&mut buf, 1, 42, true);
        let f = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        assert_eq!(method_ids(&f.payload), Some(BASIC_ACK));
        assert_eq!(ack_fields(&f.payload), Some((42, true)));
    }

    fn decode_all(buf: &mut BytesMut, frame_max: u32) -> Vec<RawFrame> {
        let mut s = FrameSplitter::new(frame_max);
        let mut v = Vec::new();
        while let Some(f) = s.decode(buf).unwrap() {
            v.push(f);
        }
        assert!(buf.is_empty());
        v
    }

    #[test]
    fn publish_template_round_trips_through_the_codec() {
        for (size, frame_max, persistent) in
            [(16, 131_072, false), (70_000, 4096, true), (3, 0, false)]
        {
            let t = PublishTemplate::new("direct", "q-1", false, persistent, size, frame_max);
            let mut buf = BytesMut::new();
            t.encode(&mut buf, 0x0102_0304_0506_0708);
            t.encode(&mut buf, 99);
            assert_eq!(buf.len(), 2 * t.wire_size());
            let frames = decode_all(&mut buf, frame_max);
            let per_msg = frames.len() / 2;
            let first = frames.first().unwrap();
            let Method::Publish(p) = decode_method(first.payload.clone()).unwrap() else {
                panic!("not a publish")
            };
            assert_eq!(
                (&p.exchange[..], &p.routing_key[..]),
                (&b"direct"[..], &b"q-1"[..])
            );
            let header = ContentHeader::decode(frames[1].payload.clone()).unwrap();
            assert_eq!(header.body_size, size as u64);
            assert_eq!(header_body_size(&frames[1].payload), Some(size as u64));
            assert_eq!(header.delivery_mode, persistent.then_some(2));
            let body: Vec<u8> = frames[2..per_msg]
                .iter()
                .flat_map(|f| f.payload.to_vec())
                .collect();
            assert_eq!(body.len(), size);
            if size >= 8 {
                assert_eq!(body_timestamp(&body), Some(0x0102_0304_0506_0708));
            } else {
                assert_eq!(body, &[1, 2, 3][..]);
            }
            assert!(frames
                .iter()
                .all(|f| frame_max == 0 || f.payload.len() + FRAME_OVERHEAD <= frame_max as usize));
        }
    }

    #[test]
    fn frame_max_negotiation() {
        assert_eq!(negotiate_frame_max(131_072, 0), 131_072);
        assert_eq!(negotiate_frame_max(0, 0), 131_072);
        assert_eq!(negotiate_frame_max(131_072, 8192), 8192);
        assert_eq!(negotiate_frame_max(65_536, 1_000_000), 65_536);
        assert_eq!(negotiate_frame_max(0, 100), FRAME_MIN_SIZE);
    }

    #[test]
    fn queue_arguments_become_a_field_table() {
        let t = field_table(&[
            ("x-max-length".into(), ArgValue::Long(7)),
            ("x-queue-type".into(), ArgValue::Str("classic".into())),
            ("x-single-active-consumer".into(), ArgValue::Bool(false)),
        ]);
        assert_eq!(
            t.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(7))
        );
        assert_eq!(t.inner().len(), 3);
    }
}
