//! A raw AMQP 0-9-1 client for frame-level tests: it sends exactly the bytes a test asks for
//! (well-formed frames are encoded with `amq-protocol`, broken ones are built by hand) and reads
//! the server's frames one by one with timeouts.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{channel, connection, parse_class, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

/// `AMQP\0\0\9\1`.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Frame type octets.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame type.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame type.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame type.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;

/// Default time to wait for a server's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One frame as read from the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type octet (1 method, 2 header, 3 body, 8 heartbeat).
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// Payload without the 7-byte header and the frame-end octet.
    pub payload: Vec<u8>,
}

impl Frame {
    /// `(class_id, method_id)` of a method frame.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// True for a method frame of the given class and method.
    pub fn is_method(&self, class_id: u16, method_id: u16) -> bool {
        self.method_id() == Some((class_id, method_id))
    }

    /// The decoded method, when `amq-protocol` can decode it.
    pub fn method(&self) -> Option<AMQPClass> {
        if self.kind != FRAME_METHOD {
            return None;
        }
        parse_class(&self.payload[..]).ok().map(|(_, m)| m)
    }

    /// True for a heartbeat frame.
    pub fn is_heartbeat(&self) -> bool {
        self.kind == FRAME_HEARTBEAT
    }

    /// The connection.close or channel.close this frame carries.
    pub fn as_close(&self) -> Option<Close> {
        let scope = match self.method_id()? {
            (10, 50) => CloseScope::Connection,
            (20, 40) => CloseScope::Channel,
            _ => return None,
        };
        let mut p = &self.payload[4..];
        if p.len() < 3 {
            return None;
        }
        let code = p.get_u16();
        let len = usize::from(p.get_u8());
        if p.len() < len + 4 {
            return None;
        }
        let text = String::from_utf8_lossy(&p[..len]).into_owned();
        p.advance(len);
        let class_id = p.get_u16();
        let method_id = p.get_u16();
        Some(Close {
            scope,
            channel: self.channel,
            code,
            text,
            class_id,
            method_id,
        })
    }

    /// The bytes of this frame on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        raw_frame(self.kind, self.channel, &self.payload)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(close) = self.as_close() {
            return write!(f, "{close:?}");
        }
        match self.kind {
            FRAME_METHOD => match (self.method(), self.method_id()) {
                (Some(m), _) => {
                    // connection.start is long: keep failure messages readable.
                    let mut text = format!("{m:?}");
                    if text.len() > 160 {
                        let mut cut = 160;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        text.truncate(cut);
                        text.push_str("...");
                    }
                    write!(f, "Method(ch {}, {text})", self.channel)
                }
                (None, Some((c, m))) => {
                    write!(f, "Method(ch {}, {c}.{m}, undecodable)", self.channel)
                }
                (None, None) => write!(f, "Method(ch {}, {:?})", self.channel, self.payload),
            },
            FRAME_HEADER => write!(
                f,
                "Header(ch {}, {} bytes)",
                self.channel,
                self.payload.len()
            ),
            FRAME_BODY => write!(f, "Body(ch {}, {} bytes)", self.channel, self.payload.len()),
            FRAME_HEARTBEAT => write!(f, "Heartbeat(ch {})", self.channel),
            k => write!(
                f,
                "Frame(type {k}, ch {}, {} bytes)",
                self.channel,
                self.payload.len()
            ),
        }
    }
}

/// Whether a close ends the connection or one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseScope {
    /// connection.close (10.50).
    Connection,
    /// channel.close (20.40).
    Channel,
}

/// A connection.close or channel.close received from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// Connection or channel.
    pub scope: CloseScope,
    /// Channel the close arrived on.
    pub channel: u16,
    /// reply-code.
    pub code: u16,
    /// reply-text.
    pub text: String,
    /// class-id of the failing method (0 if none).
    pub class_id: u16,
    /// method-id of the failing method (0 if none).
    pub method_id: u16,
}

/// What a read produced.
#[derive(Debug)]
pub enum Event {
    /// A complete frame.
    Frame(Frame),
    /// The server closed the socket (EOF or reset). Carries bytes that did not form a frame.
    Eof(Vec<u8>),
    /// Nothing complete arrived in time.
    Timeout,
}

/// Parameters of the client side of the handshake.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// SASL mechanism sent in start-ok (`PLAIN` or `AMQPLAIN`).
    pub mechanism: String,
    /// Login.
    pub user: String,
    /// Password.
    pub pass: String,
    /// Virtual host for connection.open.
    pub vhost: String,
    /// channel-max for tune-ok; `None`: accept the server's.
    pub channel_max: Option<u16>,
    /// frame-max for tune-ok; `None`: accept the server's.
    pub frame_max: Option<u32>,
    /// heartbeat for tune-ok; `None`: accept the server's.
    pub heartbeat: Option<u16>,
    /// Advertise the `authentication_failure_close` capability.
    pub auth_failure_close: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Handshake {
            mechanism: "PLAIN".into(),
            user: "guest".into(),
            pass: "guest".into(),
            vhost: "/".into(),
            channel_max: None,
            frame_max: None,
            // Tests that are not about heartbeats must not be disturbed by them.
            heartbeat: Some(0),
            auth_failure_close: true,
        }
    }
}

/// The server's connection.tune.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tune {
    /// channel-max.
    pub channel_max: u16,
    /// frame-max.
    pub frame_max: u32,
    /// heartbeat (seconds).
    pub heartbeat: u16,
}

/// A raw AMQP connection.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Every frame read so far, for failure messages.
    pub seen: Vec<Frame>,
    /// connection.start, once read.
    pub start: Option<connection::Start>,
    /// connection.tune, once read.
    pub tune: Option<Tune>,
}

impl RawClient {
    /// Open a TCP connection; nothing is sent.
    pub async fn connect(addr: SocketAddr) -> Result<RawClient> {
        let stream = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            seen: Vec::new(),
            start: None,
            tune: None,
        })
    }

    /// Connect and complete the default handshake (guest/guest, vhost `/`, heartbeat 0).
    pub async fn open(addr: SocketAddr) -> Result<RawClient> {
        RawClient::open_with(addr, &Handshake::default()).await
    }

    /// Connect and complete a handshake with the given parameters.
    pub async fn open_with(addr: SocketAddr, hs: &Handshake) -> Result<RawClient> {
        let mut c = RawClient::connect(addr).await?;
        c.handshake(hs).await?;
        Ok(c)
    }

    // ---- writing ----

    /// Write raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("writing to the broker")?;
        self.stream
            .flush()
            .await
            .context("flushing to the broker")?;
        Ok(())
    }

    /// Write one frame encoded by `amq-protocol`.
    pub async fn send_frame(&mut self, frame: &AMQPFrame) -> Result<()> {
        let bytes = encode_frame(frame)?;
        self.send_bytes(&bytes).await
    }

    /// Write one method frame.
    pub async fn send_method(&mut self, channel: u16, method: AMQPClass) -> Result<()> {
        self.send_frame(&AMQPFrame::Method(channel, method)).await
    }

    /// Write `AMQP\0\0\9\1`.
    pub async fn send_protocol_header(&mut self) -> Result<()> {
        self.send_bytes(&PROTOCOL_HEADER).await
    }

    /// Write a heartbeat frame on channel 0.
    pub async fn send_heartbeat(&mut self) -> Result<()> {
        self.send_bytes(&raw_frame(FRAME_HEARTBEAT, 0, &[])).await
    }

    /// Shut down the write half (the server sees EOF).
    pub async fn shutdown_write(&mut self) -> Result<()> {
        self.stream
            .shutdown()
            .await
            .context("shutting down the socket")
    }

    // ---- reading ----

    /// Read the next frame, EOF or timeout.
    pub async fn read_event(&mut self, timeout: Duration) -> Result<Event> {
        self.read_event_until(Instant::now() + timeout).await
    }

    async fn read_event_until(&mut self, deadline: Instant) -> Result<Event> {
        loop {
            if let Some(frame) = self.parse_buffered()? {
                self.seen.push(frame.clone());
                return Ok(Event::Frame(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Ok(Event::Timeout),
                Ok(Ok(0)) => return Ok(Event::Eof(self.rbuf.split().to_vec())),
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if is_reset(&e) => return Ok(Event::Eof(self.rbuf.split().to_vec())),
                Ok(Err(e)) => return Err(e).context("reading from the broker"),
            }
        }
    }

    fn parse_buffered(&mut self) -> Result<Option<Frame>> {
        if self.rbuf.len() < 7 {
            return Ok(None);
        }
        if self.rbuf.starts_with(b"AMQP") {
            bail!(
                "server sent a protocol header {:?} in the middle of the connection",
                &self.rbuf[..self.rbuf.len().min(8)]
            );
        }
        let size = u32::from_be_bytes([self.rbuf[3], self.rbuf[4], self.rbuf[5], self.rbuf[6]]);
        let total = 7 + size as usize + 1;
        if self.rbuf.len() < total {
            return Ok(None);
        }
        let raw = self.rbuf.split_to(total);
        if raw[total - 1] != FRAME_END {
            bail!(
                "server sent a frame without frame-end (type {}, size {size}, last octet {:#x})",
                raw[0],
                raw[total - 1]
            );
        }
        Ok(Some(Frame {
            kind: raw[0],
            channel: u16::from_be_bytes([raw[1], raw[2]]),
            payload: raw[7..total - 1].to_vec(),
        }))
    }

    /// Read the next frame; an error on EOF or timeout.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<Frame> {
        match self.read_event(timeout).await? {
            Event::Frame(f) => Ok(f),
            Event::Eof(rest) => bail!(
                "server closed the connection (trailing bytes {rest:?}); frames seen: {:?}",
                self.seen
            ),
            Event::Timeout => bail!("no frame within {timeout:?}; frames seen: {:?}", self.seen),
        }
    }

    /// Read frames (skipping heartbeats) until a method frame arrives; fail if it is not
    /// `class_id.method_id` on `channel`.
    pub async fn expect_method(
        &mut self,
        channel: u16,
        class_id: u16,
        method_id: u16,
    ) -> Result<Frame> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let frame = match self.read_event_until(deadline).await? {
                Event::Frame(f) => f,
                Event::Eof(_) => bail!(
                    "expected method {class_id}.{method_id} on channel {channel}, but the server \
                     closed the connection; frames seen: {:?}",
                    self.seen
                ),
                Event::Timeout => bail!(
                    "expected method {class_id}.{method_id} on channel {channel}, got nothing in \
                     {REPLY_TIMEOUT:?}; frames seen: {:?}",
                    self.seen
                ),
            };
            if frame.is_heartbeat() {
                continue;
            }
            if frame.channel == channel && frame.is_method(class_id, method_id) {
                return Ok(frame);
            }
            bail!("expected method {class_id}.{method_id} on channel {channel}, got {frame:?}");
        }
    }

    /// Read until a connection.close or channel.close arrives (skipping other frames), answer
    /// it with the matching close-ok (write errors ignored), and check its reply code.
    pub async fn expect_close(&mut self, code: u16) -> Result<Close> {
        let close = self.read_close(REPLY_TIMEOUT).await?;
        if close.code != code {
            bail!("expected a close with code {code}, got {close:?}");
        }
        Ok(close)
    }

    /// Like [`RawClient::expect_close`] but also checks the scope (connection or channel).
    pub async fn expect_close_scope(&mut self, scope: CloseScope, code: u16) -> Result<Close> {
        let close = self.expect_close(code).await?;
        if close.scope != scope {
            bail!("expected a {scope:?} close with code {code}, got {close:?}");
        }
        Ok(close)
    }

    /// Read until a close arrives (any code) within `timeout`, and answer it.
    pub async fn read_close(&mut self, timeout: Duration) -> Result<Close> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_event_until(deadline).await? {
                Event::Frame(f) => {
                    if let Some(close) = f.as_close() {
                        let ok = match close.scope {
                            CloseScope::Connection => AMQPClass::Connection(
                                connection::AMQPMethod::CloseOk(connection::CloseOk {}),
                            ),
                            CloseScope::Channel => AMQPClass::Channel(
                                channel::AMQPMethod::CloseOk(channel::CloseOk {}),
                            ),
                        };
                        let _ = self.send_method(close.channel, ok).await;
                        return Ok(close);
                    }
                }
                Event::Eof(rest) => bail!(
                    "expected a close frame, but the server closed the socket silently \
                     (trailing bytes {rest:?}); frames seen: {:?}",
                    self.seen
                ),
                Event::Timeout => bail!(
                    "expected a close frame, got none within {timeout:?}; frames seen: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Expect the server to drop the socket without a close frame (RabbitMQ's "silent close"):
    /// only heartbeats may arrive before EOF.
    pub async fn expect_eof(&mut self, timeout: Duration) -> Result<()> {
        let frames = self.read_until_eof(timeout).await?;
        if let Some(f) = frames.iter().find(|f| !f.is_heartbeat()) {
            bail!("expected a silent close, but the server sent {f:?} (all: {frames:?})");
        }
        Ok(())
    }

    /// Read every frame until the server closes the socket; fail if it is still open after
    /// `timeout`. Returns the frames read.
    pub async fn read_until_eof(&mut self, timeout: Duration) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.read_event_until(deadline).await? {
                Event::Frame(f) => {
                    if f.as_close()
                        .is_some_and(|c| c.scope == CloseScope::Connection)
                    {
                        let ok = AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        ));
                        let _ = self.send_method(0, ok).await;
                    }
                    frames.push(f)
                }
                Event::Eof(_) => return Ok(frames),
                Event::Timeout => bail!(
                    "the server kept the connection open for {timeout:?}; frames read: {frames:?}"
                ),
            }
        }
    }

    /// Read raw bytes until the server closes the socket (for protocol-header tests).
    pub async fn read_bytes_until_eof(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = self.rbuf.split().to_vec();
        loop {
            let mut chunk = [0u8; 4096];
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => bail!(
                    "the server kept the connection open for {timeout:?}; bytes read: {out:?}"
                ),
                Ok(Ok(0)) => return Ok(out),
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if is_reset(&e) => return Ok(out),
                Ok(Err(e)) => return Err(e).context("reading from the broker"),
            }
        }
    }

    /// Whether the server still holds the connection: false once EOF or reset is seen within
    /// `wait`; frames that arrive meanwhile are kept in `seen`.
    pub async fn is_open_after(&mut self, wait: Duration) -> Result<bool> {
        let deadline = Instant::now() + wait;
        loop {
            match self.read_event_until(deadline).await? {
                Event::Frame(_) => continue,
                Event::Eof(_) => return Ok(false),
                Event::Timeout => return Ok(true),
            }
        }
    }

    // ---- handshake steps ----

    /// Send the protocol header and read connection.start.
    pub async fn start(&mut self) -> Result<connection::Start> {
        self.send_protocol_header().await?;
        let frame = self.expect_method(0, 10, 10).await?;
        match frame.method() {
            Some(AMQPClass::Connection(connection::AMQPMethod::Start(start))) => {
                self.start = Some(start.clone());
                Ok(start)
            }
            _ => bail!("cannot decode connection.start: {:?}", frame.payload),
        }
    }

    /// Send connection.start-ok.
    pub async fn start_ok(&mut self, hs: &Handshake) -> Result<()> {
        let response = match hs.mechanism.as_str() {
            "AMQPLAIN" => amqplain_response(&hs.user, &hs.pass),
            _ => plain_response(&hs.user, &hs.pass),
        };
        let method = AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: client_properties(hs.auth_failure_close),
            mechanism: ShortString::from(hs.mechanism.as_str()),
            response: LongString::from(response),
            locale: ShortString::from("en_US"),
        }));
        self.send_method(0, method).await
    }

    /// Read connection.tune.
    pub async fn expect_tune(&mut self) -> Result<Tune> {
        let frame = self.expect_method(0, 10, 30).await?;
        match frame.method() {
            Some(AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => {
                let tune = Tune {
                    channel_max: t.channel_max,
                    frame_max: t.frame_max,
                    heartbeat: t.heartbeat,
                };
                self.tune = Some(tune);
                Ok(tune)
            }
            _ => bail!("cannot decode connection.tune: {:?}", frame.payload),
        }
    }

    /// Send connection.tune-ok.
    pub async fn tune_ok(
        &mut self,
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    ) -> Result<()> {
        let method = AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max,
            frame_max,
            heartbeat,
        }));
        self.send_method(0, method).await
    }

    /// Send connection.open for `vhost`.
    pub async fn send_open(&mut self, vhost: &str) -> Result<()> {
        let method = AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: ShortString::from(vhost),
        }));
        self.send_method(0, method).await
    }

    /// The full handshake: header, start/start-ok, tune/tune-ok, open/open-ok.
    pub async fn handshake(&mut self, hs: &Handshake) -> Result<Tune> {
        self.start().await?;
        self.start_ok(hs).await?;
        let tune = self.expect_tune().await?;
        self.tune_ok(
            hs.channel_max.unwrap_or(tune.channel_max),
            hs.frame_max.unwrap_or(tune.frame_max),
            hs.heartbeat.unwrap_or(tune.heartbeat),
        )
        .await?;
        self.send_open(&hs.vhost).await?;
        self.expect_method(0, 10, 41).await?;
        Ok(tune)
    }

    // ---- common methods ----

    /// channel.open and wait for open-ok.
    pub async fn channel_open(&mut self, ch: u16) -> Result<()> {
        self.send_channel_open(ch).await?;
        self.expect_method(ch, 20, 11).await?;
        Ok(())
    }

    /// Send channel.open without waiting.
    pub async fn send_channel_open(&mut self, ch: u16) -> Result<()> {
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await
    }

    /// channel.close (200) and wait for close-ok.
    pub async fn channel_close(&mut self, ch: u16) -> Result<()> {
        let method = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: ShortString::from("bye"),
            class_id: 0,
            method_id: 0,
        }));
        self.send_method(ch, method).await?;
        self.expect_method(ch, 20, 41).await?;
        Ok(())
    }

    /// connection.close (200) and wait for close-ok.
    pub async fn close(&mut self) -> Result<()> {
        let method = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: ShortString::from("goodbye"),
            class_id: 0,
            method_id: 0,
        }));
        self.send_method(0, method).await?;
        self.expect_method(0, 10, 51).await?;
        Ok(())
    }

    /// Prove the connection still works: open channel `ch`, close it.
    pub async fn ping(&mut self, ch: u16) -> Result<()> {
        self.channel_open(ch)
            .await
            .context("ping: channel.open on a connection that should be healthy")?;
        self.channel_close(ch)
            .await
            .context("ping: channel.close on a connection that should be healthy")
    }
}

/// Check that the broker still serves: a fresh connection completes the handshake, opens and
/// closes a channel, and closes cleanly.
pub async fn assert_healthy(addr: SocketAddr) -> Result<()> {
    let mut c = RawClient::open(addr)
        .await
        .context("a fresh healthy connection could not complete the handshake")?;
    c.ping(1).await?;
    c.close().await.context("closing the healthy connection")?;
    Ok(())
}

/// Encode one frame with `amq-protocol`.
pub fn encode_frame(frame: &AMQPFrame) -> Result<Vec<u8>> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new()))
        .map_err(|e| anyhow!("encoding {frame:?}: {e:?}"))?;
    Ok(ctx.into_inner().0)
}

/// Encode one method frame.
pub fn method_frame(channel: u16, method: AMQPClass) -> Result<Vec<u8>> {
    encode_frame(&AMQPFrame::Method(channel, method))
}

/// A content header frame for class basic with `body_size` and no properties.
pub fn content_header_frame(channel: u16, body_size: u64) -> Result<Vec<u8>> {
    encode_frame(&AMQPFrame::Header(
        channel,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: BasicProperties::default(),
        },
    ))
}

/// A frame built by hand: type, channel, 32-bit size, payload, frame-end.
pub fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

/// A method payload built by hand: class id, method id, then `args` verbatim.
pub fn raw_method_payload(class_id: u16, method_id: u16, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend_from_slice(&class_id.to_be_bytes());
    out.extend_from_slice(&method_id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

/// Append an AMQP short string.
pub fn put_shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Append an AMQP long string.
pub fn put_longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// SASL PLAIN response `\0user\0pass`.
pub fn plain_response(user: &str, pass: &str) -> Vec<u8> {
    let mut r = vec![0u8];
    r.extend_from_slice(user.as_bytes());
    r.push(0);
    r.extend_from_slice(pass.as_bytes());
    r
}

/// AMQPLAIN response: a field table without its length prefix, LOGIN and PASSWORD.
pub fn amqplain_response(user: &str, pass: &str) -> Vec<u8> {
    let mut r = Vec::new();
    put_shortstr(&mut r, "LOGIN");
    r.push(b'S');
    put_longstr(&mut r, user.as_bytes());
    put_shortstr(&mut r, "PASSWORD");
    r.push(b'S');
    put_longstr(&mut r, pass.as_bytes());
    r
}

/// Client properties as a typical client sends them.
pub fn client_properties(auth_failure_close: bool) -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
    ] {
        caps.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    if auth_failure_close {
        caps.insert(
            ShortString::from("authentication_failure_close"),
            AMQPValue::Boolean(true),
        );
    }
    let mut props = FieldTable::default();
    props.insert(
        ShortString::from("product"),
        AMQPValue::LongString(LongString::from("warren-tests raw client")),
    );
    props.insert(
        ShortString::from("platform"),
        AMQPValue::LongString(LongString::from("Rust")),
    );
    props.insert(
        ShortString::from("capabilities"),
        AMQPValue::FieldTable(caps),
    );
    props
}

/// Look up a key of a field table.
pub fn table_get<'a>(table: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    table
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v)
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}
