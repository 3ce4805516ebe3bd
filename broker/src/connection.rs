//! One AMQP connection: protocol header, handshake, heartbeats, channel lifecycle and close.
//!
//! A single task owns the socket and every channel of the connection. It `select!`s over socket
//! reads, its mailbox, the heartbeat timer and the broker's shutdown signal. All AMQP errors
//! are turned into frames in [`Connection::fail`]: soft ones close a channel, hard ones the
//! connection.

use crate::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn, Instrument};
use warren_protocol::{
    check_protocol_header, decode_method, encode_heartbeat, encode_method, encode_protocol_header,
    CommandAssembler, FrameKind, FrameSplitter, Method, ProtocolError, ProtocolHeader, RawFrame,
    FRAME_MIN_SIZE,
};

use crate::auth::{self, AuthError};
use crate::broker::Broker;
use crate::channel::{Channel, ConnCtx};
use crate::error::{code, AmqpError};
use crate::queue::consumers::ChannelKey;
use crate::queue::handle::{ConnEvent, PendingDispatch, PendingStoreWrites};
use crate::vhost::VHost;

/// How long we wait for connection.close-ok after sending connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long we wait for the client to close its socket after our connection.close-ok.
const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Frame size used before tune-ok: the spec's minimum, which every client honours.
const PRE_TUNE_FRAME_MAX: u32 = FRAME_MIN_SIZE;

const CLASS_CONNECTION: u16 = 10;
const CLASS_CHANNEL: u16 = 20;

/// What the client said it can handle in connection.start-ok.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCapabilities {
    pub authentication_failure_close: bool,
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
}

/// Why the connection task ended; only used for logging.
#[derive(Debug)]
enum End {
    /// The peer closed the socket or a close handshake finished.
    Closed,
    Io(std::io::Error),
    HeartbeatTimeout,
    HandshakeTimeout,
    /// Handshake aborted without a close handshake (RabbitMQ's silent close).
    Silent(String),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e)
    }
}

/// The negotiated session after connection.open-ok.
#[derive(Debug)]
struct Session {
    user: String,
    vhost: Arc<VHost>,
    channel_max: u16,
    frame_max: u32,
    heartbeat: Duration,
    caps: ClientCapabilities,
}

enum ChannelSlot {
    Open(Box<Channel>),
    /// The server sent channel.close and waits for close-ok; other frames are ignored.
    Closing,
}

/// Serves one client until it disconnects, fails, or the broker shuts down.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let span = tracing::info_span!(
        "conn",
        peer = %peer,
        user = tracing::field::Empty,
        vhost = tracing::field::Empty
    );
    async move {
        debug!("accepted");
        let id = broker.next_id();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut conn = Connection {
            stream,
            peer,
            broker,
            shutdown,
            rbuf: BytesMut::with_capacity(MIN_READ_CHUNK),
            read_chunk: MIN_READ_CHUNK,
            wbuf: BytesMut::with_capacity(16 * 1024),
            splitter: FrameSplitter::new(PRE_TUNE_FRAME_MAX),
            last_recv: Instant::now(),
            last_sent: Instant::now(),
            channels: HashMap::default(),
            session: None,
            counted: false,
            id,
            events_tx,
            events_rx,
            exclusive_queues: Vec::new(),
            store_writes: PendingStoreWrites::default(),
            dispatch: PendingDispatch::default(),
            consumers_behind: false,
            publisher: false,
            blocked_sent: false,
            ack_epoch: 0,
        };
        let end = conn.run().await;
        conn.release_all();
        if conn.counted {
            conn.broker.close_connection();
        }
        let _ = conn.stream.shutdown().await;
        let opened = conn.session.is_some();
        match end {
            // Probes (health checks, port scans) connect and leave before the handshake.
            End::Closed | End::Io(_) if !opened => debug!("closed before the handshake"),
            End::Closed => info!("connection closed"),
            End::Io(e) => info!(error = %e, "connection closed by I/O error"),
            End::HeartbeatTimeout => warn!("missed heartbeats from client, closing connection"),
            End::HandshakeTimeout => warn!("handshake timeout, closing connection"),
            End::Silent(reason) => warn!(%reason, "closing connection during handshake"),
        }
    }
    .instrument(span)
    .await
}

struct Connection<S> {
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    rbuf: BytesMut,
    /// Spare room made in `rbuf` before each read: grows while reads fill it (a busy
    /// publisher then costs one read, one command batch and one sync request per 256 KiB
    /// instead of per 16 KiB), shrinks again when reads are small (idle connections).
    read_chunk: usize,
    wbuf: BytesMut,
    splitter: FrameSplitter,
    last_recv: Instant,
    last_sent: Instant,
    channels: HashMap<u16, ChannelSlot>,
    session: Option<Session>,
    /// True once this connection holds a slot of `max_connections`.
    counted: bool,
    /// Broker-wide id, used for exclusive-queue ownership.
    id: u64,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    events_rx: mpsc::UnboundedReceiver<ConnEvent>,
    exclusive_queues: Vec<Arc<str>>,
    store_writes: PendingStoreWrites,
    /// Queues this connection published to since its last dispatch run.
    dispatch: PendingDispatch,
    /// The last dispatch run left messages waiting for existing consumers.
    consumers_behind: bool,
    /// Set by the first basic.publish: only publishers are held back by the memory alarm.
    publisher: bool,
    /// connection.blocked was sent and connection.unblocked is owed.
    blocked_sent: bool,
    /// Counts consumer-timeout checks; deliveries record it (see [`AckClock`]).
    ack_epoch: u32,
}

/// The consumer timeout as a count of periodic checks, so that a delivery records a counter
/// rather than reading the clock: a delivery made while the epoch was `e` is between
/// `(now - e - 1)` and `(now - e)` intervals old at epoch `now`, and it has timed out for
/// certain once `now - e` reaches `epochs`. Timeouts are so enforced between 1 and 1.5 times
/// the configured value after the delivery (two 50 ms checks at most for timeouts below
/// 100 ms); RabbitMQ checks once a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckClock {
    interval: Duration,
    epochs: u32,
}

impl AckClock {
    fn new(timeout: Duration) -> AckClock {
        // Half the timeout, within [50 ms, 30 s]: the default 30 minutes costs each
        // connection one timer wakeup every 30 s.
        let interval = (timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let whole = timeout.as_nanos().div_ceil(interval.as_nanos().max(1));
        AckClock {
            interval,
            epochs: u32::try_from(whole).unwrap_or(u32::MAX).saturating_add(1),
        }
    }

    fn timed_out(self, now: u32, delivered: u32) -> bool {
        now.wrapping_sub(delivered) >= self.epochs
    }
}

/// Outcome of a handshake step that did not succeed.
enum HandshakeFail {
    End(End),
    /// Send connection.close with this error, wait for close-ok, then drop.
    Close(AmqpError),
}

impl From<std::io::Error> for HandshakeFail {
    fn from(e: std::io::Error) -> Self {
        HandshakeFail::End(End::Io(e))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn run(&mut self) -> End {
        let deadline = Instant::now() + self.broker.config.handshake_timeout;
        let mut shutdown = self.shutdown.clone();
        let handshake = tokio::select! {
            result = tokio::time::timeout_at(deadline, self.handshake()) => result,
            // A connection still shaking hands has nothing to close gracefully.
            _ = shutdown.wait_for(|stop| *stop) => return End::Silent("broker shutting down".into()),
        };
        match handshake {
            Err(_) => return End::HandshakeTimeout,
            Ok(Err(HandshakeFail::End(end))) => return end,
            Ok(Err(HandshakeFail::Close(err))) => {
                info!(code = err.code, text = %err.text, "refusing connection");
                return self.close_with(err).await;
            }
            Ok(Ok(session)) => {
                tracing::Span::current().record("user", session.user.as_str());
                tracing::Span::current().record("vhost", &*session.vhost.name);
                info!("connection opened");
                self.session = Some(session);
            }
        }
        self.main_loop().await
    }

    // ---------------------------------------------------------------- handshake

    async fn handshake(&mut self) -> Result<Session, HandshakeFail> {
        loop {
            match check_protocol_header(&self.rbuf) {
                ProtocolHeader::Accepted => {
                    self.rbuf.advance(8);
                    break;
                }
                ProtocolHeader::Rejected => {
                    // RabbitMQ answers any other header with the one it speaks, then closes.
                    encode_protocol_header(&mut self.wbuf);
                    self.flush().await?;
                    return Err(HandshakeFail::End(End::Silent(
                        "bad protocol header".into(),
                    )));
                }
                ProtocolHeader::Incomplete => {
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        return Err(HandshakeFail::End(End::Closed));
                    }
                }
            }
        }

        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start_method())),
        );
        self.flush().await?;

        let start_ok = match self.expect_connection_method().await? {
            connection::AMQPMethod::StartOk(m) => m,
            other => {
                return Err(silent(format!(
                    "expected connection.start-ok, got {other:?}"
                )))
            }
        };
        let caps = client_capabilities(&start_ok.client_properties);
        let mechanism = start_ok.mechanism.as_str().to_string();
        let login = auth::decode_response(&mechanism, start_ok.response.as_bytes())
            .and_then(|(user, pass)| self.broker.users.authenticate(&user, &pass, self.peer.ip()));
        let user = match login {
            Ok(user) => user,
            Err(e) => {
                warn!(mechanism = %mechanism, error = %e, "login refused");
                // Only a refused login gets the close frame; malformed responses and unknown
                // mechanisms are dropped silently even with the capability (RabbitMQ 3.10).
                let refused = matches!(
                    e,
                    AuthError::InvalidCredentials(_) | AuthError::LoopbackOnly(_)
                );
                if !refused || !caps.authentication_failure_close {
                    return Err(silent(e.to_string()));
                }
                let text = format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                );
                return Err(HandshakeFail::Close(
                    AmqpError::access_refused(text).on(CLASS_CONNECTION, 11),
                ));
            }
        };

        let config = &self.broker.config;
        let server_channel_max = config.channel_max;
        let server_frame_max = config.frame_max;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: server_channel_max,
                frame_max: server_frame_max,
                heartbeat: config.heartbeat,
            })),
        );
        self.flush().await?;

        let tune_ok = match self.expect_connection_method().await? {
            connection::AMQPMethod::TuneOk(m) => m,
            other => {
                return Err(silent(format!(
                    "expected connection.tune-ok, got {other:?}"
                )))
            }
        };
        let (channel_max, frame_max) = negotiate(&tune_ok, server_channel_max, server_frame_max)
            .map_err(HandshakeFail::Close)?;
        self.splitter.set_frame_max(frame_max);
        let heartbeat = Duration::from_secs(u64::from(tune_ok.heartbeat));

        let open = match self.expect_connection_method().await? {
            connection::AMQPMethod::Open(m) => m,
            other => return Err(silent(format!("expected connection.open, got {other:?}"))),
        };
        let vhost_name = open.virtual_host.as_str();
        let Some(vhost) = self.broker.vhost(vhost_name) else {
            return Err(HandshakeFail::Close(
                AmqpError::not_allowed(format!("vhost {vhost_name} not found"))
                    .on(CLASS_CONNECTION, 40),
            ));
        };
        if !self.broker.try_open_connection() {
            return Err(HandshakeFail::Close(
                AmqpError::not_allowed(format!(
                    "connection refused: node connection limit ({}) is reached",
                    self.broker.config.max_connections
                ))
                .on(CLASS_CONNECTION, 40),
            ));
        }
        self.counted = true;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        self.flush().await?;
        Ok(Session {
            user: user.name,
            vhost,
            channel_max,
            frame_max,
            heartbeat,
            caps,
        })
    }

    /// Reads the next connection-class method on channel 0 during the handshake.
    ///
    /// Before connection.open-ok RabbitMQ drops the socket on anything unexpected rather than
    /// running a close handshake, so every problem here is a silent close.
    async fn expect_connection_method(&mut self) -> Result<connection::AMQPMethod, HandshakeFail> {
        loop {
            let frame = match self.read_frame().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(HandshakeFail::End(End::Closed)),
                Err(ReadError::Io(e)) => return Err(e.into()),
                Err(ReadError::Protocol(e)) => return Err(silent(e.reply_text())),
            };
            match (frame.kind, frame.channel) {
                (FrameKind::Heartbeat, 0) => continue,
                (FrameKind::Method, 0) => {}
                (kind, ch) => {
                    return Err(silent(format!("unexpected {kind:?} frame on channel {ch}")))
                }
            }
            match decode_method(frame.payload) {
                Ok(Method::Other(AMQPClass::Connection(m))) => return Ok(m),
                Ok(other) => {
                    return Err(silent(format!(
                        "unexpected method {}.{} during handshake",
                        other.class_id(),
                        other.method_id()
                    )))
                }
                Err(e) => return Err(silent(e.reply_text())),
            }
        }
    }

    // ---------------------------------------------------------------- running

    async fn main_loop(&mut self) -> End {
        let heartbeat = self
            .session
            .as_ref()
            .map_or(Duration::ZERO, |s| s.heartbeat);
        // Checking every half interval both sends our heartbeats on time and notices two missed
        // client intervals within 2.5 intervals.
        let tick = heartbeat / 2;
        // One timer for the connection's life, reset on each tick: a fresh `sleep_until` per
        // loop turn would register and cancel a timer-wheel entry on every wakeup.
        let heartbeat_timer = sleep_until(Instant::now() + tick);
        tokio::pin!(heartbeat_timer);
        let ack_clock = self.broker.config.consumer_timeout.map(AckClock::new);
        let ack_interval = ack_clock.map_or(Duration::from_secs(3600), |c| c.interval);
        let ack_timer = sleep_until(Instant::now() + ack_interval);
        tokio::pin!(ack_timer);
        self.last_recv = Instant::now();
        let memory = self.broker.resources;
        loop {
            // The memory alarm holds back publishing connections by not reading from them.
            let paused = self.publisher && memory.is_alarmed();
            self.notify_blocked(paused);
            if let Err(e) = self.flush().await {
                return End::Io(e);
            }
            self.rbuf.reserve(self.read_chunk);
            tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        let err = AmqpError::new(
                            code::CONNECTION_FORCED,
                            "broker forced connection closure with reason 'shutdown'",
                        );
                        return self.close_with(err).await;
                    }
                }
                _ = memory.wait_clear(), if paused => {}
                read = self.stream.read_buf(&mut self.rbuf), if !paused => {
                    match read {
                        Ok(0) => return End::Closed,
                        Ok(n) => {
                            self.read_chunk = next_read_chunk(self.read_chunk, n);
                            self.last_recv = Instant::now();
                            if let Some(end) = self.process_input().await {
                                return end;
                            }
                            if n >= BUSY_READ {
                                spread_woken_tasks();
                            }
                            if std::mem::take(&mut self.consumers_behind) {
                                // Let the consumers' connections catch up before reading more:
                                // a backlog costs memory and, once out of the CPU caches, time.
                                tokio::task::yield_now().await;
                            }
                        }
                        Err(e) => return End::Io(e),
                    }
                }
                Some(event) = self.events_rx.recv() => {
                    self.handle_event(event);
                    // Drain what else is queued so one flush covers many deliveries (fewer,
                    // bigger writes measured faster even for 64 KiB messages), up to a bound
                    // for very big ones.
                    for _ in 0..256 {
                        if self.wbuf.len() >= WRITE_BATCH_BYTES {
                            break;
                        }
                        match self.events_rx.try_recv() {
                            Ok(event) => self.handle_event(event),
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut heartbeat_timer, if !heartbeat.is_zero() => {
                    let now = Instant::now();
                    heartbeat_timer.as_mut().reset(now + tick);
                    if paused {
                        // Unread heartbeats are not missed heartbeats (RabbitMQ pauses its
                        // monitor while a connection is blocked).
                        self.last_recv = now;
                    }
                    if now.duration_since(self.last_recv) >= heartbeat * 2 {
                        return End::HeartbeatTimeout;
                    }
                    if now.duration_since(self.last_sent) >= tick {
                        encode_heartbeat(&mut self.wbuf);
                    }
                }
                _ = &mut ack_timer, if ack_clock.is_some() => {
                    ack_timer.as_mut().reset(Instant::now() + ack_interval);
                    if let Some(clock) = ack_clock {
                        self.check_consumer_timeout(clock);
                    }
                }
            }
            if let Err(e) = self.flush().await {
                return End::Io(e);
            }
        }
    }

    /// Handles every complete frame in the read buffer. Returns Some when the connection ends.
    async fn process_input(&mut self) -> Option<End> {
        loop {
            let flow = match self.take_publish() {
                Some(flow) => flow,
                None => {
                    let frame = match self.splitter.decode(&mut self.rbuf) {
                        Ok(Some(frame)) => frame,
                        Ok(None) => {
                            self.consumers_behind = self.dispatch.run();
                            self.flush_confirms();
                            return None;
                        }
                        Err(e) => {
                            self.dispatch.run();
                            // The stream cannot be re-synchronised after a framing error.
                            self.rbuf.clear();
                            return Some(self.close_with(protocol_error(&e)).await);
                        }
                    };
                    self.handle_frame(frame)
                }
            };
            if !matches!(flow, Ok(Flow::Continue)) {
                self.dispatch.run();
            }
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::ClientClosed) => {
                    let _ = self.flush().await;
                    self.wait_for_client_to_close().await;
                    return Some(End::Closed);
                }
                Err(err) => {
                    if err.is_hard() {
                        return Some(self.close_with(err).await);
                    }
                    // Soft errors are turned into channel.close inside handle_frame.
                    warn!(code = err.code, text = %err.text, "unexpected soft error at connection level");
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: RawFrame) -> Result<Flow, AmqpError> {
        let channel_id = frame.channel;
        if channel_id == 0 {
            return match frame.kind {
                FrameKind::Heartbeat => Ok(Flow::Continue),
                FrameKind::Method => self.handle_connection_method(frame),
                FrameKind::Header | FrameKind::Body => Err(AmqpError::unexpected_frame(format!(
                    "expected method frame, got non method frame on channel 0 ({:?})",
                    frame.kind
                ))),
            };
        }
        if frame.kind == FrameKind::Heartbeat {
            return Err(AmqpError::unexpected_frame(format!(
                "heartbeat frame on non-zero channel {channel_id}"
            )));
        }
        // Like RabbitMQ, channel_max bounds how many channels are open, not their numbers.
        let channel_max = self.session.as_ref().map_or(0, |s| s.channel_max);
        if !self.channels.contains_key(&channel_id)
            && self.channels.len() >= usize::from(channel_max)
        {
            return Err(AmqpError::not_allowed(format!(
                "number of channels opened ({}) has reached the negotiated channel_max ({channel_max})",
                self.channels.len()
            )));
        }
        match self.channels.get_mut(&channel_id) {
            None => self.handle_closed_channel_frame(frame),
            Some(ChannelSlot::Closing) => {
                // Only close-ok (or the client's own close) matters on a closing channel.
                if frame.kind == FrameKind::Method {
                    if let Ok(Method::Other(AMQPClass::Channel(m))) = decode_method(frame.payload) {
                        match m {
                            channel::AMQPMethod::CloseOk(_) => {
                                self.channels.remove(&channel_id);
                            }
                            channel::AMQPMethod::Close(_) => {
                                self.send_channel_close_ok(channel_id);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Flow::Continue)
            }
            Some(ChannelSlot::Open(ch)) => match ch.assembler.push(frame) {
                Ok(Some(command)) => self.execute(channel_id, command),
                Ok(None) => Ok(Flow::Continue),
                Err(e) => Err(protocol_error(&e)),
            },
        }
    }

    /// A whole basic.publish at the front of the read buffer for an open channel, taken in one
    /// step (see [`CommandAssembler::take_publish`]); None when the frame-by-frame path must
    /// handle what is there. Errors are hard ones, as from [`Self::handle_frame`].
    fn take_publish(&mut self) -> Option<Result<Flow, AmqpError>> {
        let channel_id = CommandAssembler::publish_channel(&self.rbuf)?;
        let frame_max = self.splitter.frame_max();
        let Some(ChannelSlot::Open(ch)) = self.channels.get_mut(&channel_id) else {
            return None;
        };
        match ch.assembler.take_publish(&mut self.rbuf, frame_max) {
            Ok(Some(command)) => Some(self.execute(channel_id, command)),
            Ok(None) => None,
            Err(e) => Some(Err(protocol_error(&e))),
        }
    }

    /// Runs a complete command: soft errors close its channel, hard ones are returned.
    fn execute(
        &mut self,
        channel_id: u16,
        command: warren_protocol::Command,
    ) -> Result<Flow, AmqpError> {
        let method_ids = (command.method.class_id(), command.method.method_id());
        match self.handle_command(channel_id, command) {
            Ok(()) => Ok(Flow::Continue),
            Err(err) => {
                let err = if err.class_id == 0 && err.method_id == 0 {
                    err.on(method_ids.0, method_ids.1)
                } else {
                    err
                };
                if err.is_hard() {
                    return Err(err);
                }
                self.fail_channel(channel_id, err);
                Ok(Flow::Continue)
            }
        }
    }

    /// A frame for a channel number that is not open: only channel.open is acceptable.
    fn handle_closed_channel_frame(&mut self, frame: RawFrame) -> Result<Flow, AmqpError> {
        let channel_id = frame.channel;
        if frame.kind != FrameKind::Method {
            return Err(AmqpError::channel_error("expected 'channel.open'"));
        }
        let method = decode_method(frame.payload).map_err(|e| protocol_error(&e))?;
        match method {
            Method::Other(AMQPClass::Channel(channel::AMQPMethod::Open(_))) => {
                self.channels.insert(
                    channel_id,
                    ChannelSlot::Open(Box::new(Channel::new(
                        channel_id,
                        ChannelKey(self.broker.next_id()),
                    ))),
                );
                self.send_method(
                    channel_id,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                Ok(Flow::Continue)
            }
            other => Err(AmqpError::channel_error("expected 'channel.open'")
                .on(other.class_id(), other.method_id())),
        }
    }

    fn handle_connection_method(&mut self, frame: RawFrame) -> Result<Flow, AmqpError> {
        let method = decode_method(frame.payload).map_err(|e| protocol_error(&e))?;
        match method {
            Method::Other(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                debug!(code = close.reply_code, text = %close.reply_text, "client closed connection");
                self.send_method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Ok(Flow::ClientClosed)
            }
            // A late close-ok (e.g. to a close we never sent) is harmless.
            Method::Other(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                Ok(Flow::ClientClosed)
            }
            // Secrets are not used for authorisation yet; acknowledge like RabbitMQ does.
            Method::Other(AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_))) => {
                self.send_method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(Flow::Continue)
            }
            other => Err(
                AmqpError::channel_error("unexpected method in connection state running")
                    .on(other.class_id(), other.method_id()),
            ),
        }
    }

    /// Executes one complete command of an open channel.
    fn handle_command(
        &mut self,
        channel_id: u16,
        command: warren_protocol::Command,
    ) -> Result<(), AmqpError> {
        if let Method::Publish(_) = &command.method {
            self.publisher = true;
        } else {
            // Whatever this command does, it sees the queues as immediate dispatch leaves them.
            self.dispatch.run();
        }
        if let Method::Other(AMQPClass::Channel(m)) = &command.method {
            return match m {
                channel::AMQPMethod::Open(_) => {
                    Err(AmqpError::channel_error("second 'channel.open' seen")
                        .on(CLASS_CHANNEL, 10))
                }
                channel::AMQPMethod::Close(_) => {
                    self.close_channel(channel_id);
                    self.send_channel_close_ok(channel_id);
                    Ok(())
                }
                channel::AMQPMethod::CloseOk(_) | channel::AMQPMethod::FlowOk(_) => Ok(()),
                channel::AMQPMethod::OpenOk(_) => {
                    Err(AmqpError::command_invalid("channel.open-ok from a client"))
                }
                channel::AMQPMethod::Flow(flow) => {
                    if !flow.active {
                        return Err(
                            AmqpError::not_implemented("active=false").on(CLASS_CHANNEL, 20)
                        );
                    }
                    self.send_method(
                        channel_id,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                            active: true,
                        })),
                    );
                    Ok(())
                }
            };
        }
        if let Method::Other(AMQPClass::Connection(_)) = &command.method {
            return Err(AmqpError::command_invalid(
                "connection class method on a non-zero channel",
            ));
        }
        let Some(session) = self.session.as_ref() else {
            return Err(AmqpError::internal(
                "channel command before connection.open",
            ));
        };
        let Some(ChannelSlot::Open(ch)) = self.channels.get_mut(&channel_id) else {
            return Err(AmqpError::channel_error("expected 'channel.open'"));
        };
        let mut ctx = ConnCtx {
            vhost: &session.vhost,
            conn_id: self.id,
            user: &session.user,
            caps: session.caps,
            frame_max: session.frame_max,
            out: &mut self.wbuf,
            events: &self.events_tx,
            exclusive_queues: &mut self.exclusive_queues,
            broker: &self.broker,
            store_writes: &mut self.store_writes,
            dispatch: &mut self.dispatch,
            ack_epoch: self.ack_epoch,
        };
        ch.handle(&mut ctx, command)
    }

    /// Tells clients that asked for it (capability `connection.blocked`) when the memory alarm
    /// starts and stops holding them back.
    fn notify_blocked(&mut self, paused: bool) {
        let capable = self
            .session
            .as_ref()
            .is_some_and(|s| s.caps.connection_blocked);
        if !capable || paused == self.blocked_sent {
            return;
        }
        self.blocked_sent = paused;
        let method = if paused {
            let reason = if self.broker.resources.disk_alarm() {
                "low on disk"
            } else {
                "low on memory"
            };
            warn!(reason, "resource alarm: blocking publishing connection");
            connection::AMQPMethod::Blocked(connection::Blocked {
                reason: short_string(reason),
            })
        } else {
            connection::AMQPMethod::Unblocked(connection::Unblocked {})
        };
        self.send_method(0, AMQPClass::Connection(method));
    }

    /// Publisher confirms are written once per read batch so `multiple` can cover many.
    /// Stored publishes of the batch go to the group commit in one request per channel.
    fn flush_confirms(&mut self) {
        let persistence = self.broker.persistence.as_ref();
        for slot in self.channels.values_mut() {
            if let ChannelSlot::Open(ch) = slot {
                if let Some(p) = persistence {
                    ch.request_sync(&p.sync, &self.events_tx);
                }
                ch.flush_confirms(&mut self.wbuf);
            }
        }
    }

    /// A queue sent us a delivery or cancelled a consumer.
    fn handle_event(&mut self, event: ConnEvent) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        let (channel_id, key) = match &event {
            ConnEvent::Deliver(d) => (d.channel_id, d.channel),
            ConnEvent::Synced {
                channel_id,
                channel,
                ..
            } => (*channel_id, *channel),
            ConnEvent::ConsumerCancelled {
                channel_id,
                channel,
                ..
            }
            | ConnEvent::DirectReply {
                channel_id,
                channel,
                ..
            } => (*channel_id, *channel),
        };
        let Some(ChannelSlot::Open(ch)) = self.channels.get_mut(&channel_id) else {
            // The channel closed meanwhile; its cleanup already requeued what it held.
            return;
        };
        if ch.key != key {
            return;
        }
        let mut ctx = ConnCtx {
            vhost: &session.vhost,
            conn_id: self.id,
            user: &session.user,
            caps: session.caps,
            frame_max: session.frame_max,
            out: &mut self.wbuf,
            events: &self.events_tx,
            exclusive_queues: &mut self.exclusive_queues,
            broker: &self.broker,
            store_writes: &mut self.store_writes,
            dispatch: &mut self.dispatch,
            ack_epoch: self.ack_epoch,
        };
        match event {
            ConnEvent::Deliver(d) => {
                if d.stored() {
                    ctx.store_writes.note(&d.queue);
                }
                ch.deliver(&mut ctx, d)
            }
            ConnEvent::ConsumerCancelled { tag, .. } => ch.consumer_cancelled(&mut ctx, &tag),
            ConnEvent::DirectReply { name, msg, .. } => {
                ch.deliver_direct_reply(&mut ctx, &name, &msg)
            }
            ConnEvent::Synced { confirms, ok, .. } => {
                ch.synced(&confirms, ok);
                ch.flush_confirms(ctx.out);
            }
        }
    }

    /// Closes (406) every channel whose oldest unacknowledged delivery has timed out; its
    /// deliveries are requeued as for any channel close.
    fn check_consumer_timeout(&mut self, clock: AckClock) {
        self.ack_epoch = self.ack_epoch.wrapping_add(1);
        let now = self.ack_epoch;
        let late: Vec<u16> = self
            .channels
            .iter()
            .filter_map(|(id, slot)| match slot {
                ChannelSlot::Open(ch) => ch
                    .oldest_unacked_epoch()
                    .is_some_and(|e| clock.timed_out(now, e))
                    .then_some(*id),
                _ => None,
            })
            .collect();
        let Some(timeout) = self.broker.config.consumer_timeout else {
            return;
        };
        for id in late {
            warn!(channel = id, "consumer ack timed out, closing the channel");
            self.fail_channel(
                id,
                AmqpError::precondition_failed(format!(
                    "delivery acknowledgement on channel {id} timed out. Timeout value used: \
                     {} ms. This timeout value can be configured, see consumers doc guide to \
                     learn more",
                    timeout.as_millis()
                )),
            );
        }
    }

    /// Connection end: channels give back what they hold, exclusive queues go.
    fn release_all(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.close_channel(id);
        }
        if let Some(session) = &self.session {
            session
                .vhost
                .delete_exclusive_queues(&self.exclusive_queues, self.id);
        }
        self.exclusive_queues.clear();
    }

    /// Soft error: channel.close to the client; the channel waits for close-ok.
    fn fail_channel(&mut self, channel_id: u16, err: AmqpError) {
        debug!(channel = channel_id, code = err.code, text = %err.text, "closing channel");
        self.close_channel(channel_id);
        self.channels.insert(channel_id, ChannelSlot::Closing);
        self.send_method(
            channel_id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: err.code,
                reply_text: short_string(&err.text),
                class_id: err.class_id,
                method_id: err.method_id,
            })),
        );
    }

    /// Releases a channel's resources (consumers, unacked messages) and forgets it.
    fn close_channel(&mut self, channel_id: u16) {
        if let Some(ChannelSlot::Open(mut ch)) = self.channels.remove(&channel_id) {
            if let Some(session) = &self.session {
                ch.release(&session.vhost);
            }
        }
    }

    fn send_channel_close_ok(&mut self, channel_id: u16) {
        self.send_method(
            channel_id,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        );
    }

    /// Hard error (or shutdown): connection.close, then wait briefly for close-ok.
    async fn close_with(&mut self, err: AmqpError) -> End {
        if err.code != code::CONNECTION_FORCED {
            warn!(code = err.code, text = %err.text, "closing connection");
        }
        let channel_ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in channel_ids {
            self.close_channel(id);
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: err.code,
                reply_text: short_string(&err.text),
                class_id: err.class_id,
                method_id: err.method_id,
            })),
        );
        if let Err(e) = self.flush().await {
            return End::Io(e);
        }
        let wait = async {
            loop {
                match self.read_frame().await {
                    Ok(Some(frame)) if frame.kind == FrameKind::Method && frame.channel == 0 => {
                        match decode_method(frame.payload) {
                            Ok(Method::Other(AMQPClass::Connection(
                                connection::AMQPMethod::CloseOk(_),
                            ))) => return,
                            Ok(Method::Other(AMQPClass::Connection(
                                connection::AMQPMethod::Close(_),
                            ))) => {
                                self.send_method(
                                    0,
                                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                        connection::CloseOk {},
                                    )),
                                );
                                let _ = self.flush().await;
                                return;
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, wait).await;
        End::Closed
    }

    /// After close-ok the client closes the socket, as RabbitMQ expects: closing it first
    /// makes some clients (lapin) report an error instead of a clean close.
    async fn wait_for_client_to_close(&mut self) {
        let mut sink = [0u8; 1024];
        let wait = async {
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout(CLIENT_CLOSE_WAIT, wait) => {}
            _ = shutdown.changed() => {}
        }
    }

    // ---------------------------------------------------------------- I/O helpers

    fn send_method(&mut self, channel: u16, method: AMQPClass) {
        encode_method(&mut self.wbuf, channel, &method);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        // Before anything reaches the client, so a kill -9 cannot contradict what it saw.
        self.store_writes.flush();
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
            self.wbuf.clear();
            // One huge message must not leave a huge buffer with the connection.
            if self.wbuf.capacity() > 4 * WRITE_BATCH_BYTES {
                self.wbuf = BytesMut::with_capacity(16 * 1024);
            }
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Cancel-safe: partial frames stay in `rbuf`.
    async fn read_frame(&mut self) -> Result<Option<RawFrame>, ReadError> {
        loop {
            if let Some(frame) = self
                .splitter
                .decode(&mut self.rbuf)
                .map_err(ReadError::Protocol)?
            {
                self.last_recv = Instant::now();
                return Ok(Some(frame));
            }
            if self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(ReadError::Io)?
                == 0
            {
                return Ok(None);
            }
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    Protocol(ProtocolError),
}

/// What the connection does after a frame.
enum Flow {
    Continue,
    ClientClosed,
}

/// Deliveries encoded into the write buffer before it is written to the socket, at most.
const WRITE_BATCH_BYTES: usize = 16 * 1024 * 1024;
const MIN_READ_CHUNK: usize = 16 * 1024;
const MAX_READ_CHUNK: usize = 128 * 1024;

/// A read this big means the client sends faster than the connection turns around.
const BUSY_READ: usize = 16 * 1024;

/// Lets an idle worker take the tasks this one has just woken.
///
/// tokio runs the task woken last next on the waking worker, from a slot other workers cannot
/// steal (its LIFO slot). That suits an idle broker: a publisher's dispatch wakes the
/// consumer's connection and the same worker writes the delivery at once, without waking a
/// second thread (on a small VM each extra wakeup adds tens of µs; at 1,000 msg/s this cut p99
/// latency from about 250 to 160 µs). Under load the same rule would keep a publisher and its
/// consumer on one core while the other idles (1 KiB messages: 700k instead of 1M msg/s).
/// An empty task takes the slot, which moves the woken connection to the run queue and wakes
/// an idle worker to steal it. Under another scheduler this is just a no-op task.
fn spread_woken_tasks() {
    drop(tokio::spawn(async {}));
}

/// The read size after a read of `got` bytes into `chunk` bytes of room.
fn next_read_chunk(chunk: usize, got: usize) -> usize {
    if got >= chunk {
        (chunk * 2).min(MAX_READ_CHUNK)
    } else if got < chunk / 4 {
        (chunk / 2).max(MIN_READ_CHUNK)
    } else {
        chunk
    }
}

fn silent(reason: impl Into<String>) -> HandshakeFail {
    HandshakeFail::End(End::Silent(reason.into()))
}

/// Maps a codec error to the AMQP error RabbitMQ would raise for it.
pub fn protocol_error(e: &ProtocolError) -> AmqpError {
    let (class_id, method_id) = e.class_method();
    let mut text = e.reply_text();
    if text.len() > 255 {
        let mut end = 255;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    AmqpError {
        code: e.reply_code(),
        text,
        class_id,
        method_id,
    }
}

/// Validates connection.tune-ok against our offer, with RabbitMQ's 530 texts.
fn negotiate(
    tune_ok: &connection::TuneOk,
    server_channel_max: u16,
    server_frame_max: u32,
) -> Result<(u16, u32), AmqpError> {
    let fail = |field: &str, client: u64, bound: &str, server: u64| {
        let (cmp, which) = if bound == "min" {
            ("lower", "minimum")
        } else {
            ("higher", "maximum")
        };
        AmqpError::not_allowed(format!(
            "negotiated {field} = {client} is {cmp} than the {which} allowed value ({server})"
        ))
        .on(CLASS_CONNECTION, 31)
    };
    let frame_max = tune_ok.frame_max;
    if frame_max != 0 && frame_max < FRAME_MIN_SIZE {
        return Err(fail(
            "frame_max",
            frame_max.into(),
            "min",
            FRAME_MIN_SIZE.into(),
        ));
    }
    if server_frame_max != 0 && (frame_max == 0 || frame_max > server_frame_max) {
        return Err(fail(
            "frame_max",
            frame_max.into(),
            "max",
            server_frame_max.into(),
        ));
    }
    let channel_max = tune_ok.channel_max;
    if server_channel_max != 0 && (channel_max == 0 || channel_max > server_channel_max) {
        return Err(fail(
            "channel_max",
            channel_max.into(),
            "max",
            server_channel_max.into(),
        ));
    }
    let channel_max = if channel_max == 0 {
        u16::MAX
    } else {
        channel_max
    };
    Ok((channel_max, frame_max))
}

fn client_capabilities(props: &FieldTable) -> ClientCapabilities {
    let mut caps = ClientCapabilities::default();
    if let Some(AMQPValue::FieldTable(table)) = props.inner().get("capabilities") {
        let flag = |name: &str| matches!(table.inner().get(name), Some(AMQPValue::Boolean(true)));
        caps.authentication_failure_close = flag("authentication_failure_close");
        caps.consumer_cancel_notify = flag("consumer_cancel_notify");
        caps.connection_blocked = flag("connection.blocked");
    }
    caps
}

/// Capabilities we advertise: only those that work end to end.
pub const SERVER_CAPABILITIES: &[&str] = &[
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "connection.blocked",
    "direct_reply_to",
];

fn start_method() -> connection::Start {
    let mut caps = FieldTable::default();
    for cap in SERVER_CAPABILITIES {
        caps.insert(short_string(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let mut text = |k: &str, v: &str| {
        props.insert(short_string(k), AMQPValue::LongString(LongString::from(v)));
    };
    text("product", "Warren");
    text("version", env!("CARGO_PKG_VERSION"));
    text("platform", "Rust");
    text("copyright", "Copyright (c) the Warren authors");
    text(
        "information",
        "Warren, an AMQP 0-9-1 broker; licensed under Apache-2.0",
    );
    text("cluster_name", "warren");
    props.insert(short_string("capabilities"), AMQPValue::FieldTable(caps));
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: LongString::from(auth::MECHANISMS),
        locales: LongString::from("en_US"),
    }
}

/// A short string that cannot panic: longer input is cut at a char boundary below 256 bytes.
pub fn short_string(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(s.get(..end).unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tune_ok(channel_max: u16, frame_max: u32) -> connection::TuneOk {
        connection::TuneOk {
            channel_max,
            frame_max,
            heartbeat: 0,
        }
    }

    #[test]
    fn negotiation_follows_rabbitmq() {
        assert_eq!(
            negotiate(&tune_ok(2047, 131_072), 2047, 131_072).unwrap(),
            (2047, 131_072)
        );
        assert_eq!(
            negotiate(&tune_ok(10, 4096), 2047, 131_072).unwrap(),
            (10, 4096)
        );
        let e = negotiate(&tune_ok(2048, 131_072), 2047, 131_072).unwrap_err();
        assert_eq!(e.code, 530);
        assert_eq!(
            e.text,
            "NOT_ALLOWED - negotiated channel_max = 2048 is higher than the maximum allowed value (2047)"
        );
        let e = negotiate(&tune_ok(1, 200_000), 2047, 131_072).unwrap_err();
        assert!(
            e.text.contains("frame_max = 200000 is higher"),
            "{}",
            e.text
        );
        let e = negotiate(&tune_ok(1, 100), 2047, 131_072).unwrap_err();
        assert!(
            e.text
                .contains("lower than the minimum allowed value (4096)"),
            "{}",
            e.text
        );
    }

    /// A client over an in-memory pipe, for tests with paused time.
    struct PipeClient {
        io: tokio::io::DuplexStream,
        buf: BytesMut,
        splitter: FrameSplitter,
    }

    impl PipeClient {
        async fn send(&mut self, method: AMQPClass) {
            let mut out = BytesMut::new();
            encode_method(&mut out, 0, &method);
            self.io.write_all(&out).await.unwrap();
        }

        async fn frame(&mut self) -> Option<RawFrame> {
            loop {
                if let Some(f) = self.splitter.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        }

        async fn method(&mut self) -> connection::AMQPMethod {
            loop {
                let f = self.frame().await.expect("frame");
                if f.kind != FrameKind::Method {
                    continue;
                }
                if let Ok(Method::Other(AMQPClass::Connection(m))) = decode_method(f.payload) {
                    return m;
                }
            }
        }

        /// Handshake with the given heartbeat; returns once open-ok arrived.
        async fn open(
            broker: Arc<Broker>,
            heartbeat: u16,
        ) -> (PipeClient, tokio::task::JoinHandle<()>, watch::Sender<bool>) {
            let (client, server) = tokio::io::duplex(1 << 20);
            let (stop_tx, stop_rx) = watch::channel(false);
            let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
            let task = tokio::spawn(serve(server, peer, broker, stop_rx));
            let mut c = PipeClient {
                io: client,
                buf: BytesMut::new(),
                splitter: FrameSplitter::new(0),
            };
            c.io.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
            assert!(matches!(c.method().await, connection::AMQPMethod::Start(_)));
            c.send(AMQPClass::Connection(connection::AMQPMethod::StartOk(
                connection::StartOk {
                    client_properties: FieldTable::default(),
                    mechanism: "PLAIN".into(),
                    response: LongString::from(&b"\0guest\0guest"[..]),
                    locale: "en_US".into(),
                },
            )))
            .await;
            assert!(matches!(c.method().await, connection::AMQPMethod::Tune(_)));
            c.send(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
                connection::TuneOk {
                    channel_max: 10,
                    frame_max: 131_072,
                    heartbeat,
                },
            )))
            .await;
            c.send(AMQPClass::Connection(connection::AMQPMethod::Open(
                connection::Open {
                    virtual_host: "/".into(),
                },
            )))
            .await;
            assert!(matches!(
                c.method().await,
                connection::AMQPMethod::OpenOk(_)
            ));
            (c, task, stop_tx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_dropped_after_two_heartbeat_intervals() {
        let broker = Broker::new(crate::config::Config::default());
        let (mut c, task, _stop) = PipeClient::open(broker, 10).await;
        let opened = Instant::now();
        // The server keeps sending heartbeats; the client never answers.
        let mut heartbeats = 0;
        while let Some(f) = c.frame().await {
            if f.kind == FrameKind::Heartbeat {
                heartbeats += 1;
            }
        }
        let lived = opened.elapsed();
        assert!(
            lived >= Duration::from_secs(20),
            "closed too early: {lived:?}"
        );
        assert!(
            lived <= Duration::from_secs(26),
            "closed too late: {lived:?}"
        );
        assert!(heartbeats >= 3, "server sent {heartbeats} heartbeats");
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn consumer_timeout_fires_after_the_timeout_and_soon_enough() {
        for timeout_ms in [100u64, 1000, 1_800_000, 7] {
            let timeout = Duration::from_millis(timeout_ms);
            let clock = AckClock::new(timeout);
            let i = clock.interval;
            // A delivery just before or just after a check, against the check that fires.
            for delivered_epoch in [3u32, u32::MAX - 1] {
                let fires = (1..)
                    .map(|k| delivered_epoch.wrapping_add(k))
                    .find(|now| clock.timed_out(*now, delivered_epoch))
                    .map(|now| now.wrapping_sub(delivered_epoch))
                    .unwrap();
                // Age at that check: between (fires - 1) and fires intervals.
                let youngest = i * (fires - 1);
                let oldest = i * fires;
                assert!(youngest >= timeout, "{timeout_ms} ms: fired too early");
                // Within half the timeout again, or two checks for timeouts below the
                // shortest check interval (50 ms).
                assert!(
                    oldest <= timeout + (timeout / 2).max(2 * i),
                    "{timeout_ms} ms: fired too late ({oldest:?})"
                );
            }
        }
        assert_eq!(
            AckClock::new(Duration::from_millis(1_800_000)).interval,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeating_client_stays_connected() {
        let broker = Broker::new(crate::config::Config::default());
        let (mut c, task, _stop) = PipeClient::open(broker, 10).await;
        let mut beat = BytesMut::new();
        encode_heartbeat(&mut beat);
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.io.write_all(&beat).await.unwrap();
        }
        // A minute later it is still served.
        assert!(!task.is_finished());
        c.send(AMQPClass::Connection(connection::AMQPMethod::Close(
            connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            },
        )))
        .await;
        assert!(matches!(
            c.method().await,
            connection::AMQPMethod::CloseOk(_)
        ));
        drop(c);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn short_string_never_panics() {
        assert_eq!(short_string("abc").as_str(), "abc");
        assert_eq!(short_string(&"é".repeat(200)).as_str().len(), 254);
    }

    #[test]
    fn capabilities_from_client_properties() {
        let mut caps = FieldTable::default();
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(false));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let c = client_capabilities(&props);
        assert!(c.authentication_failure_close);
        assert!(!c.connection_blocked);
        assert!(!c.consumer_cancel_notify);
    }
}
