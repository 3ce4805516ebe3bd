//! The shared queue: a [`QueueCore`] behind a short mutex, plus the wiring that hands deliveries
//! to consumers' connections.
//!
//! Whoever changes a queue (a publisher's connection, an acking consumer, basic.consume) does so
//! synchronously under the queue's lock and then runs [`Queue::dispatch`], which sends every
//! deliverable message to its consumer's connection mailbox. Mailboxes are unbounded, but what
//! can sit in them is bounded by credit: prefetch for manual-ack consumers and
//! [`ChannelLimiter`]'s in-flight cap for everyone, so a queue never waits on a connection.

use crate::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use amq_protocol::types::FieldTable;
use tokio::sync::mpsc;

use tracing::{error, warn};
use warren_protocol::ContentHeader;
use warren_storage::{Body, MsgLocation, QueueStore, RecoveredMessage, StoredMessage, SyncHandle};

use super::consumers::{ChannelKey, ConsumeError, ConsumerKey, ConsumerSpec};
use super::core::{ClosedOutcome, MsgSeq, QueueCore, Rejected};
use super::dead_letter::{DeadLetter, DeadLetterRouter, DeadLetterTarget, DeathReason};
use crate::message::{Body as MessageBody, Message, MessageParts};
use crate::persist::Persistence;
use crate::resources::ResourceMonitor;

/// Stored messages published while fewer than this many messages and bytes are ready keep an
/// in-memory copy; deeper ones are read back from disk (the page cache) when their turn comes.
/// Deep enough that a consumer keeping up with a publisher (confirm window plus a read batch
/// or two) never reads from disk, small enough that a backlog of millions costs its index,
/// not its bodies. The memory alarm's paging threshold bounds the total across queues.
const CACHE_DEPTH: usize = 4 * 1024;
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Deliveries written to a connection's mailbox but not yet encoded, per channel. Bounds the
/// memory a fast queue can push at a slow connection (no-ack consumers have no prefetch).
pub const IN_FLIGHT_CAP: u32 = 2000;

/// Channel-wide credit shared by the channel and every queue it consumes from.
///
/// Invariant: `unacked` counts manual-ack deliveries made to consumers of this channel that
/// are not yet settled; `in_flight` counts deliveries sent to the mailbox and not yet encoded.
#[derive(Debug, Default)]
pub struct ChannelLimiter {
    /// basic.qos global=true prefetch_count; 0 = unlimited.
    pub global_prefetch: AtomicU32,
    unacked: AtomicU32,
    in_flight: AtomicU32,
}

impl ChannelLimiter {
    /// Reserves room for one delivery; the queue only asks when it will deliver on `true`.
    fn try_acquire(&self) -> bool {
        let limit = self.global_prefetch.load(Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) >= IN_FLIGHT_CAP {
            return false;
        }
        if limit != 0 && self.unacked.load(Ordering::Relaxed) >= limit {
            return false;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.unacked.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// `n` deliveries left the mailbox (encoded or dropped). True when this may unblock queues.
    pub fn written(&self, n: u32) -> bool {
        let before = self.in_flight.fetch_sub(n, Ordering::Relaxed);
        before >= IN_FLIGHT_CAP && before.saturating_sub(n) < IN_FLIGHT_CAP
    }

    /// `n` deliveries were settled (ack/nack/reject, or no-ack ones written).
    pub fn settled(&self, n: u32) {
        let _ = self
            .unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    pub fn is_blocked(&self) -> bool {
        let limit = self.global_prefetch.load(Ordering::Relaxed);
        self.in_flight.load(Ordering::Relaxed) >= IN_FLIGHT_CAP
            || (limit != 0 && self.unacked.load(Ordering::Relaxed) >= limit)
    }
}

/// What a connection's task receives from queues.
#[derive(Debug)]
pub enum ConnEvent {
    Deliver(Delivery),
    /// A group commit covering these publishes finished (`ok` false: the fsync failed, so
    /// they must be nacked). Each entry is (publish confirm tag, queue name).
    Synced {
        channel: ChannelKey,
        channel_id: u16,
        confirms: Vec<(u64, Arc<str>)>,
        ok: bool,
    },
    /// The queue was deleted: the consumer is gone (basic.cancel to capable clients).
    ConsumerCancelled {
        channel: ChannelKey,
        channel_id: u16,
        tag: Arc<str>,
    },
    /// A reply published to the channel's direct reply-to pseudo-queue `name`.
    DirectReply {
        channel: ChannelKey,
        channel_id: u16,
        name: Arc<str>,
        msg: Arc<Message>,
    },
}

/// Which writes a [`Queue::prepare_sync`] must make durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Appended messages: what publisher confirms wait for.
    Confirms,
    /// Everything written since the last background sync (appends, acks, delivery marks).
    Background,
}

/// Messages on their way to one consumer's connection: whatever one dispatch run gave that
/// consumer in a row, so that a burst costs one mailbox send and one set of reference counts.
///
/// Invariant: `items` is never empty and keeps the queue's delivery order.
#[derive(Debug)]
pub struct Delivery {
    pub channel: ChannelKey,
    pub channel_id: u16,
    pub tag: Arc<str>,
    pub queue: Arc<Queue>,
    pub no_ack: bool,
    pub items: Vec<DeliveryItem>,
}

impl Delivery {
    /// True when the queue's store recorded at least one of these deliveries in a buffer
    /// (a delivery mark, or the ack of a no-ack delivery): the receiving connection hands it
    /// to the OS before it writes the deliveries to its socket (see [`PendingStoreWrites`]).
    pub fn stored(&self) -> bool {
        self.items.iter().any(|item| item.stored)
    }
}

/// One message of a [`Delivery`].
#[derive(Debug)]
pub struct DeliveryItem {
    pub seq: MsgSeq,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub stored: bool,
    /// The `x-delivery-count` header to add (quorum queues).
    pub delivery_count: Option<u16>,
}

/// Queues holding buffered store writes made on behalf of one connection.
///
/// The rule that makes kill -9 safe without a `pwrite` per message: whatever a queue's store
/// recorded for a connection (delivery marks, acks) reaches the OS before that connection next
/// writes to its socket. A client can then never have seen a delivery whose mark a crash could
/// lose (it would come back with redelivered=false), nor get a reply to a command that followed
/// an ack whose entry a crash could lose. One flush per socket write covers a whole batch.
#[derive(Debug, Default)]
pub struct PendingStoreWrites(Vec<Arc<Queue>>);

impl PendingStoreWrites {
    pub fn note(&mut self, queue: &Arc<Queue>) {
        // Usually one queue; a short scan keeps the list free of duplicates.
        if !self.0.iter().rev().take(8).any(|q| Arc::ptr_eq(q, queue)) {
            self.0.push(queue.clone());
        }
    }

    /// Hands every noted queue's buffered store writes to the OS (no fsync).
    pub fn flush(&mut self) {
        for queue in self.0.drain(..) {
            queue.flush_store_writes();
        }
    }
}

/// Queues that took messages from one connection's publishes and have not offered them to
/// their consumers yet.
///
/// A publish only enqueues; the connection runs [`PendingDispatch::run`] once its read batch
/// is handled, and before any command other than basic.publish, so that a burst of publishes
/// reaches a consumer as one batch (one lock, one mailbox send) and no other command can see
/// a queue state that immediate dispatch would not have produced.
#[derive(Debug, Default)]
pub struct PendingDispatch(Vec<Arc<Queue>>);

impl PendingDispatch {
    fn note(&mut self, queue: &Arc<Queue>) {
        // Usually one queue; a short scan keeps the list free of duplicates.
        if !self.0.iter().rev().take(8).any(|q| Arc::ptr_eq(q, queue)) {
            self.0.push(queue.clone());
        }
    }

    /// Offers the noted queues' new messages to their consumers. True when one of the queues
    /// still has messages waiting although it has consumers: they are falling behind.
    pub fn run(&mut self) -> bool {
        let mut behind = false;
        for queue in self.0.drain(..) {
            behind |= queue.dispatch_behind();
        }
        behind
    }
}

/// A durable queue's ready messages as recovery finds them in its store, in publish order.
#[derive(Debug)]
pub struct RecoveredIndex(QueueCore<QMsg>);

impl RecoveredIndex {
    /// For a queue declared with `arguments` (its `x-max-priority` decides the levels).
    pub fn for_arguments(arguments: &FieldTable) -> RecoveredIndex {
        let mut core = QueueCore::with_sizer(QMsg::size);
        let limits = Limits::from_arguments(arguments);
        if let Some(max) = limits.max_priority {
            core.set_max_priority(max);
        }
        if let Some(limit) = limits.delivery_limit {
            core.set_delivery_limit(limit);
        }
        if QueueKind::from_arguments(arguments) == QueueKind::Quorum {
            core.set_returns_to_back();
        }
        RecoveredIndex(core)
    }

    /// A stored record's `flags` byte is the message's priority (see [`Queue::publish`]).
    pub fn push(&mut self, m: RecoveredMessage) {
        self.0.enqueue(QMsg::Stored(m.loc), m.flags, m.delivered);
    }
}

/// Hands a batch to the consumer's connection. An empty batch (every message in it was
/// unreadable or expired, and gave its credit back) is dropped.
fn send_delivery(sink: &ConsumerSink, delivery: Delivery) {
    if delivery.items.is_empty() {
        return;
    }
    // A closed mailbox means the connection is going away; its cleanup requeues the messages
    // through channel_closed, so nothing is lost here.
    let _ = sink.events.send(ConnEvent::Deliver(delivery));
}

/// Where a consumer's deliveries go.
#[derive(Debug, Clone)]
pub struct ConsumerSink {
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub channel_id: u16,
    pub limiter: Arc<ChannelLimiter>,
}

/// The queue type (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    #[default]
    Classic,
    /// RabbitMQ's quorum queue semantics on this one node: durable only, every message
    /// stored (whatever its delivery mode), a delivery count (`x-delivery-count`) with an
    /// optional `x-delivery-limit`. Replication comes with clustering.
    Quorum,
}

impl QueueKind {
    /// From a queue's (validated) arguments.
    pub fn from_arguments(args: &FieldTable) -> QueueKind {
        match args.inner().get("x-queue-type") {
            Some(amq_protocol::types::AMQPValue::LongString(s)) if s.as_bytes() == b"quorum" => {
                QueueKind::Quorum
            }
            _ => QueueKind::Classic,
        }
    }
}

/// Immutable queue properties fixed at declare time.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueProps {
    pub kind: QueueKind,
    pub durable: bool,
    pub auto_delete: bool,
    /// Connection id owning an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    pub limits: Limits,
    /// `x-dead-letter-exchange` / `x-dead-letter-routing-key`.
    pub dead_letter: Option<DeadLetterTarget>,
}

impl QueueProps {
    /// Properties of a queue declared with `arguments` (already validated).
    pub fn new(
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        arguments: FieldTable,
    ) -> QueueProps {
        QueueProps {
            kind: QueueKind::from_arguments(&arguments),
            durable,
            auto_delete,
            exclusive_owner,
            limits: Limits::from_arguments(&arguments),
            dead_letter: DeadLetterTarget::from_arguments(&arguments),
            arguments,
        }
    }
}

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    /// Like reject-publish, and the refused message is dead-lettered (reason `maxlen`).
    RejectPublishDlx,
}

/// Length limits from `x-max-length` / `x-max-length-bytes` / `x-overflow`. They count ready
/// messages only, as RabbitMQ does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// `x-message-ttl`: messages older than this are dropped when they reach the head.
    pub message_ttl: Option<std::time::Duration>,
    /// `x-expires`: the queue is deleted once unused for this long (see [`Queue::expired`]).
    pub expires: Option<std::time::Duration>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-max-priority`: a priority queue with levels 0..=this.
    pub max_priority: Option<u8>,
    /// `x-delivery-limit` (quorum queues). RabbitMQ 3.10 accepts any value there; only a
    /// non-negative integer sets a limit.
    pub delivery_limit: Option<u64>,
}

impl Limits {
    /// Reads the (already validated) queue arguments.
    pub fn from_arguments(args: &FieldTable) -> Limits {
        let int = |key: &str| {
            args.inner()
                .get(key)
                .and_then(crate::channel::int_value)
                .and_then(|v| u64::try_from(v).ok())
        };
        let overflow = match args.inner().get("x-overflow") {
            Some(amq_protocol::types::AMQPValue::LongString(s)) => match s.as_bytes() {
                b"reject-publish" => Overflow::RejectPublish,
                b"reject-publish-dlx" => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            },
            _ => Overflow::DropHead,
        };
        Limits {
            message_ttl: int("x-message-ttl").map(std::time::Duration::from_millis),
            expires: int("x-expires").map(std::time::Duration::from_millis),
            max_length: int("x-max-length"),
            max_length_bytes: int("x-max-length-bytes"),
            overflow,
            max_priority: int("x-max-priority").and_then(|v| u8::try_from(v).ok()),
            delivery_limit: int("x-delivery-limit"),
        }
    }

    fn over(&self, count: u64, bytes: u64) -> bool {
        self.max_length.is_some_and(|max| count > max)
            || self.max_length_bytes.is_some_and(|max| bytes > max)
    }
}

/// Result of publishing into a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Accepted,
    /// Accepted and written to the queue's store: a publisher confirm must wait for the sync
    /// of [`Queue::prepare_sync`].
    Persisted,
    /// A full queue with x-overflow reject-publish refused it: the publisher gets a nack.
    Rejected,
    /// The queue was deleted concurrently; the message went nowhere.
    QueueGone,
}

/// A message as a queue holds it.
///
/// Persistent messages of durable queues live in the queue's store; the queue keeps the
/// 12-byte location and, near the head and while memory allows, a cached copy.
#[derive(Debug, Clone)]
///
/// Kept to 16 bytes (a ready entry is 32 with its sequence number and flag): the location of
/// a stored message with a cached copy is boxed, since only messages near the head have one.
pub enum QMsg {
    Mem(Arc<Message>),
    /// Persistent, in the queue's store only.
    Stored(MsgLocation),
    /// Persistent, in the store and, near the head, cached in memory.
    Cached(Box<(MsgLocation, Arc<Message>)>),
    /// A transient message paged out to the queue's spill file because memory ran short.
    Spilled(MsgLocation),
}

impl QMsg {
    fn size(&self) -> u64 {
        match self {
            QMsg::Mem(m) => m.body_size(),
            QMsg::Stored(loc) | QMsg::Spilled(loc) => u64::from(loc.len),
            QMsg::Cached(c) => u64::from(c.0.len),
        }
    }

    /// Location in the durable store.
    fn location(&self) -> Option<MsgLocation> {
        match self {
            QMsg::Stored(loc) => Some(*loc),
            QMsg::Cached(c) => Some(c.0),
            QMsg::Mem(_) | QMsg::Spilled(_) => None,
        }
    }
}

/// The answer to basic.get, with the message loaded.
#[derive(Debug)]
pub struct Got {
    pub seq: MsgSeq,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub remaining: u32,
    /// The `x-delivery-count` header to add (quorum queues).
    pub delivery_count: Option<u16>,
}

#[derive(Debug)]
struct QueueState {
    core: QueueCore<QMsg>,
    sinks: HashMap<ConsumerKey, ConsumerSink>,
    limiters: HashMap<ChannelKey, Arc<ChannelLimiter>>,
    /// The message store of a durable queue.
    store: Option<QueueStore>,
    /// Something was written to `store` since the last sync was prepared: an idle queue then
    /// costs the background sync nothing.
    written_since_sync: bool,
    /// Where transient messages go when memory runs short; created on first use.
    spill: Option<QueueStore>,
    deleted: bool,
    /// Since when the queue has been unused in RabbitMQ's sense for `x-expires`: no
    /// consumers, and no queue.declare or basic.get since. Only meaningful while it has no
    /// consumers; set when the last one goes.
    unused_since: std::time::Instant,
    /// Dead letters collected under the lock; empty whenever the lock is free (see
    /// [`Locked`]).
    dead: Vec<DeadLetter>,
}

/// The queue's lock. Dead letters collected under it go to the dead-letter exchange once it
/// is released: their routing takes the vhost's locks and other queues' locks, and a queue's
/// lock is never held while another's is taken.
struct Locked<'a> {
    /// Declared first, so dropped first: the lock is released...
    state: MutexGuard<'a, QueueState>,
    /// ...before the dead letters moved here go out.
    outbox: Outbox<'a>,
}

struct Outbox<'a> {
    queue: &'a Queue,
    letters: Vec<DeadLetter>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if !self.state.dead.is_empty() {
            self.outbox.letters = std::mem::take(&mut self.state.dead);
        }
    }
}

impl Drop for Outbox<'_> {
    fn drop(&mut self) {
        if !self.letters.is_empty() {
            self.queue
                .route_dead_letters(std::mem::take(&mut self.letters));
        }
    }
}

impl Deref for Locked<'_> {
    type Target = QueueState;
    fn deref(&self) -> &QueueState {
        &self.state
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut QueueState {
        &mut self.state
    }
}

impl QueueState {
    /// Loads a message for delivery. None if its stored copy cannot be read (logged; the
    /// message is then dropped from the store so it does not come back forever).
    fn load(
        &mut self,
        msg: &QMsg,
        memory: &'static ResourceMonitor,
        queue: &str,
    ) -> Option<Arc<Message>> {
        match msg {
            QMsg::Mem(m) => Some(m.clone()),
            QMsg::Cached(c) => Some(c.1.clone()),
            QMsg::Stored(loc) | QMsg::Spilled(loc) => {
                let store = match msg {
                    QMsg::Spilled(_) => self.spill.as_mut()?,
                    _ => self.store.as_mut()?,
                };
                let read = store
                    .read(*loc)
                    .map_err(|e| e.to_string())
                    .and_then(|stored| {
                        let body_size = stored.body.len() as u64;
                        let header = ContentHeader::from_raw(60, body_size, stored.properties)
                            .map_err(|e| e.reply_text())?;
                        let parts = MessageParts {
                            exchange: &stored.exchange,
                            routing_key: &stored.routing_key,
                            header: &header,
                            body: MessageBody::Keep(stored.body),
                        };
                        let charge = memory.charge(Message::footprint(&parts));
                        let ttl = header
                            .expiration
                            .as_ref()
                            .and_then(|raw| crate::message::parse_expiration(raw).ok());
                        Ok(Arc::new(Message::new(
                            parts,
                            charge,
                            crate::message::instant_of_ms(stored.timestamp_ms),
                            ttl,
                        )))
                    });
                match read {
                    Ok(m) => Some(m),
                    Err(e) => {
                        error!(queue, error = %e, "cannot read a stored message; dropping it");
                        let _ = store.ack(*loc);
                        None
                    }
                }
            }
        }
    }

    /// Hands buffered store writes (acks, delivery marks) to the OS, so that they survive a
    /// crash of the process (kill -9) even before the next fsync.
    fn flush_store(&mut self, queue: &str) {
        if let Some(store) = self.store.as_mut() {
            if let Err(e) = store.flush() {
                warn!(queue, error = %e, "cannot write out the queue's store");
            }
        }
    }

    /// The message left the queue for good (acked, consumed without ack, dropped, purged).
    fn forget(&mut self, msg: &QMsg, queue: &str) {
        let (loc, store) = match msg {
            QMsg::Stored(loc) => {
                self.written_since_sync = true;
                (*loc, self.store.as_mut())
            }
            QMsg::Cached(c) => {
                self.written_since_sync = true;
                (c.0, self.store.as_mut())
            }
            QMsg::Spilled(loc) => (*loc, self.spill.as_mut()),
            QMsg::Mem(_) => return,
        };
        if let Some(store) = store {
            if let Err(e) = store.ack(loc) {
                warn!(queue, error = %e, "cannot record an ack in the queue's store");
            }
        }
    }

    /// Pages a transient message out to the spill file (created on first use). Falls back to
    /// keeping it in memory if the spill file cannot be written.
    fn spill(
        &mut self,
        msg: Arc<Message>,
        persistence: Option<&Arc<Persistence>>,
        vhost: &str,
        queue: &str,
    ) -> QMsg {
        if self.spill.is_none() {
            if let Some(p) = persistence {
                match p.create_spill(vhost, queue) {
                    Ok(store) => self.spill = Some(store),
                    Err(e) => warn!(queue, error = %e, "cannot create a spill file"),
                }
            }
        }
        let Some(spill) = self.spill.as_mut() else {
            return QMsg::Mem(msg);
        };
        let stored = StoredMessage {
            flags: 0,
            timestamp_ms: crate::message::now_ms(),
            exchange: msg.exchange(),
            routing_key: msg.routing_key(),
            properties: msg.raw_properties(),
            body: Body::Contiguous(msg.body()),
        };
        match spill.append(&stored) {
            Ok(loc) => QMsg::Spilled(loc),
            Err(e) => {
                warn!(queue, error = %e, "cannot spill a message; keeping it in memory");
                QMsg::Mem(msg)
            }
        }
    }
}

/// `x-single-active-consumer: true` among a queue's (validated) arguments.
fn single_active_consumer(args: &FieldTable) -> bool {
    matches!(
        args.inner().get("x-single-active-consumer"),
        Some(amq_protocol::types::AMQPValue::Boolean(true))
    )
}

/// One queue, shared by every connection that uses it.
#[derive(Debug)]
pub struct Queue {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub props: QueueProps,
    memory: &'static ResourceMonitor,
    /// For the spill file; None when the broker has no data directory.
    persistence: Option<Arc<Persistence>>,
    /// Republishes dead letters (the vhost); None in unit tests.
    router: Option<Weak<dyn DeadLetterRouter>>,
    state: Mutex<QueueState>,
}

impl Queue {
    pub fn new(
        name: Arc<str>,
        vhost: Arc<str>,
        props: QueueProps,
        memory: &'static ResourceMonitor,
        persistence: Option<Arc<Persistence>>,
        store: Option<QueueStore>,
        router: Option<Weak<dyn DeadLetterRouter>>,
    ) -> Arc<Queue> {
        let mut core = QueueCore::with_sizer(QMsg::size);
        core.set_single_active_consumer(single_active_consumer(&props.arguments));
        if let Some(max) = props.limits.max_priority {
            core.set_max_priority(max);
        }
        if let Some(limit) = props.limits.delivery_limit {
            core.set_delivery_limit(limit);
        }
        if props.kind == QueueKind::Quorum {
            core.set_returns_to_back();
        }
        Arc::new(Queue {
            name,
            vhost,
            props,
            memory,
            persistence,
            router,
            state: Mutex::new(QueueState {
                core,
                sinks: HashMap::default(),
                limiters: HashMap::default(),
                store,
                written_since_sync: false,
                spill: None,
                deleted: false,
                unused_since: std::time::Instant::now(),
                dead: Vec::new(),
            }),
        })
    }

    /// Takes the index recovery built from the store (before any client saw the queue).
    pub fn restore(&self, index: RecoveredIndex) {
        let mut core = index.0;
        core.set_single_active_consumer(single_active_consumer(&self.props.arguments));
        self.lock().core = core;
    }

    /// The lock is never held across `.await` and never taken while holding another queue's.
    fn lock(&self) -> Locked<'_> {
        // Every critical section leaves QueueState consistent before anything can panic, so
        // a poisoned lock still guards valid state.
        Locked {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            outbox: Outbox {
                queue: self,
                letters: Vec::new(),
            },
        }
    }

    /// Queues a message that leaves for `reason` to be dead-lettered when the lock is
    /// released, if the queue has a dead-letter exchange. `loaded` is the message when the
    /// caller already has it; otherwise a paged-out one is read back.
    fn dead_letter(
        &self,
        st: &mut QueueState,
        msg: &QMsg,
        loaded: Option<Arc<Message>>,
        reason: DeathReason,
    ) {
        if self.props.dead_letter.is_none() {
            return;
        }
        let Some(msg) = loaded.or_else(|| st.load(msg, self.memory, &self.name)) else {
            return;
        };
        st.dead.push(DeadLetter { msg, reason });
    }

    /// Hands dead letters to the vhost (no lock held).
    fn route_dead_letters(&self, letters: Vec<DeadLetter>) {
        let (Some(target), Some(router)) = (
            self.props.dead_letter.as_ref(),
            self.router.as_ref().and_then(Weak::upgrade),
        ) else {
            return;
        };
        router.route_dead_letters(&self.name, target, letters);
    }

    pub fn is_durable_store(&self) -> bool {
        self.lock().store.is_some()
    }

    /// Enqueues a message. With `defer`, a queue whose messages cannot expire and whose
    /// length is not limited leaves the dispatch to the caller's [`PendingDispatch`] (where a
    /// TTL or a limit applies, what happens to the message depends on whether a consumer takes
    /// it right now, so those queues dispatch at once).
    pub fn publish(
        self: &Arc<Self>,
        msg: Arc<Message>,
        defer: Option<&mut PendingDispatch>,
    ) -> Enqueued {
        let mut st = self.lock();
        if st.deleted {
            return Enqueued::QueueGone;
        }
        let limits = self.props.limits;
        let defer = defer.filter(|_| {
            limits.message_ttl.is_none()
                && limits.max_length.is_none()
                && limits.max_length_bytes.is_none()
                && msg.ttl.is_none()
        });
        if limits.overflow != Overflow::DropHead {
            let count = st.core.message_count() as u64 + 1;
            if limits.over(count, st.core.ready_bytes() + msg.body_size()) {
                if limits.overflow == Overflow::RejectPublishDlx && self.props.dead_letter.is_some()
                {
                    st.dead.push(DeadLetter {
                        msg,
                        reason: DeathReason::MaxLen,
                    });
                }
                return Enqueued::Rejected;
            }
        }
        let mut outcome = Enqueued::Accepted;
        // Only a priority queue looks at the property (others have the one level 0).
        let priority = match limits.max_priority {
            Some(max) => msg.priority().min(max),
            None => 0,
        };
        // A quorum queue keeps every message on disk, as RabbitMQ's Raft log does.
        let stored = msg.is_persistent() || self.props.kind == QueueKind::Quorum;
        let entry = match st.store.as_mut() {
            Some(store) if stored => {
                // The record's flags byte keeps the priority for recovery.
                let stored = StoredMessage {
                    flags: priority,
                    timestamp_ms: crate::message::now_ms(),
                    exchange: msg.exchange(),
                    routing_key: msg.routing_key(),
                    properties: msg.raw_properties(),
                    body: Body::Contiguous(msg.body()),
                };
                match store.append(&stored) {
                    Ok(loc) => {
                        outcome = Enqueued::Persisted;
                        st.written_since_sync = true;
                        // Keep a copy in RAM only near the head (it will be delivered soon)
                        // and while memory is plentiful: a backlog costs its index, not its
                        // bodies.
                        let near_head = st.core.message_count() < CACHE_DEPTH
                            && st.core.ready_bytes() < CACHE_BYTES;
                        if near_head && self.memory.may_cache() {
                            QMsg::Cached(Box::new((loc, msg)))
                        } else {
                            QMsg::Stored(loc)
                        }
                    }
                    Err(e) => {
                        error!(queue = %self.name, error = %e, "cannot store a persistent message");
                        return Enqueued::Rejected;
                    }
                }
            }
            // Memory is short: transient messages go to disk too, so the queue can hold far
            // more than RAM; the spill file is never synced and is wiped at boot.
            _ if !self.memory.may_cache() && self.persistence.is_some() => {
                st.spill(msg, self.persistence.as_ref(), &self.vhost, &self.name)
            }
            _ => QMsg::Mem(msg),
        };
        let seq = st.core.publish(entry, priority);
        if let Some(pending) = defer {
            drop(st);
            pending.note(self);
            return outcome;
        }
        self.dispatch_fresh(&mut st, Some(seq));
        // drop-head: whatever no consumer took and does not fit goes, oldest first.
        while limits.over(st.core.message_count() as u64, st.core.ready_bytes()) {
            match st.core.drop_head() {
                Some(dropped) => {
                    self.dead_letter(&mut st, &dropped, None, DeathReason::MaxLen);
                    st.forget(&dropped, &self.name);
                }
                None => break,
            }
        }
        outcome
    }

    /// Drops expired messages at the head (per-message `expiration` or `x-message-ttl`), so that
    /// counts stay right even when nobody consumes. Returns how many went.
    pub fn drop_expired(&self) -> usize {
        let mut st = self.lock();
        let ttl = self.props.limits.message_ttl;
        let now = std::time::Instant::now();
        let mut dropped = 0;
        // Every priority level has its own head (a single level without x-max-priority).
        for level in (0..=st.core.max_priority()).rev() {
            while let Some(front) = st.core.front_at(level).cloned() {
                let head = match &front {
                    QMsg::Mem(m) => m.clone(),
                    QMsg::Cached(c) => c.1.clone(),
                    // Reading a paged-out head back costs a disk read: only worth it when the
                    // queue itself has a TTL; a per-message TTL alone is applied at delivery.
                    _ if ttl.is_none() => break,
                    _ => match st.load(&front, self.memory, &self.name) {
                        Some(m) => m,
                        None => {
                            st.core.drop_head_at(level);
                            continue;
                        }
                    },
                };
                if !head.is_expired(ttl, now) {
                    break;
                }
                st.core.drop_head_at(level);
                self.dead_letter(&mut st, &front, Some(head), DeathReason::Expired);
                st.forget(&front, &self.name);
                dropped += 1;
            }
        }
        dropped
    }

    /// The files to fsync for `kind` (None if nothing).
    pub fn prepare_sync(&self, kind: SyncKind) -> Option<SyncHandle> {
        let mut st = self.lock();
        let prepared = match kind {
            // Even when nothing was written since the last sync: a confirm must wait for a
            // sync that covers its message, whoever prepared the earlier one. Acks and marks
            // stay dirty for the background sync, so `written_since_sync` is left as it is.
            SyncKind::Confirms => st.store.as_mut()?.prepare_sync_appends(),
            // Idle queues cost no fsync.
            SyncKind::Background if !st.written_since_sync => return None,
            SyncKind::Background => {
                st.written_since_sync = false;
                st.store.as_mut()?.prepare_sync()
            }
        };
        match prepared {
            Ok(handle) if !handle.is_empty() => Some(handle),
            Ok(_) => None,
            Err(e) => {
                error!(queue = %self.name, error = %e, "cannot prepare a sync of the queue's store");
                None
            }
        }
    }

    pub fn consume(
        self: &Arc<Self>,
        spec: ConsumerSpec,
        sink: ConsumerSink,
    ) -> Result<(), ConsumeError> {
        let mut st = self.lock();
        if st.deleted {
            // Deleted after the channel found it: a consumer added now would never be told.
            return Err(ConsumeError::QueueGone);
        }
        let key = spec.key.clone();
        st.core.add_consumer(spec)?;
        st.limiters.insert(key.channel, sink.limiter.clone());
        st.sinks.insert(key, sink);
        self.dispatch_locked(&mut st);
        Ok(())
    }

    /// basic.cancel. Returns true when an auto-delete queue just lost its last consumer.
    pub fn cancel(self: &Arc<Self>, key: &ConsumerKey) -> bool {
        let mut st = self.lock();
        let existed = st.core.cancel_consumer(key);
        st.sinks.remove(key);
        if existed && st.core.is_single_active_consumer() {
            // A standby consumer may have taken over: give it what is ready.
            self.dispatch_locked(&mut st);
        }
        if existed && !st.core.has_consumers() {
            st.unused_since = std::time::Instant::now();
        }
        existed && self.props.auto_delete && !st.core.has_consumers()
    }

    /// queue.declare of the existing queue (passive or not) renews its `x-expires` lease, as
    /// in RabbitMQ.
    pub fn renew_lease(&self) {
        if self.props.limits.expires.is_some() {
            self.lock().unused_since = std::time::Instant::now();
        }
    }

    /// Whether `x-expires` has run out at `now`: the queue has had no consumers, and no
    /// queue.declare or basic.get, for that long. The caller deletes it.
    pub fn expired(&self, now: std::time::Instant) -> bool {
        let Some(expires) = self.props.limits.expires else {
            return false;
        };
        let st = self.lock();
        !st.deleted
            && !st.core.has_consumers()
            && now.saturating_duration_since(st.unused_since) >= expires
    }

    pub fn get(&self, channel: ChannelKey, no_ack: bool) -> Option<Got> {
        let mut st = self.lock();
        if self.props.limits.expires.is_some() {
            // basic.get renews the lease, whether or not it finds a message.
            st.unused_since = std::time::Instant::now();
        }
        loop {
            let got = st.core.get(channel, no_ack)?;
            let Some(msg) = st.load(&got.msg, self.memory, &self.name) else {
                // Unreadable: already dropped from the store; forget it here too.
                if !no_ack {
                    st.core.ack(got.seq);
                }
                continue;
            };
            if msg.is_expired(self.props.limits.message_ttl, std::time::Instant::now()) {
                if !no_ack {
                    st.core.ack(got.seq);
                }
                self.dead_letter(&mut st, &got.msg, Some(msg), DeathReason::Expired);
                st.forget(&got.msg, &self.name);
                continue;
            }
            if no_ack {
                st.forget(&got.msg, &self.name);
            } else {
                mark_delivered(&mut st, &got.msg);
            }
            if got.msg.location().is_some() {
                st.flush_store(&self.name);
            }
            return Some(Got {
                seq: got.seq,
                msg,
                redelivered: got.redelivered,
                remaining: got.remaining,
                // basic.get always carries it, even the first time (RabbitMQ 3.10).
                delivery_count: (self.props.kind == QueueKind::Quorum).then_some(got.returns),
            });
        }
    }

    /// Settles acked deliveries. True when the store buffered ack entries: the caller notes
    /// the queue in its [`PendingStoreWrites`].
    #[must_use]
    pub fn ack(self: &Arc<Self>, seqs: &[MsgSeq]) -> bool {
        let mut st = self.lock();
        let mut stored = false;
        for seq in seqs {
            if let Some(msg) = st.core.ack(*seq) {
                stored |= msg.location().is_some();
                st.forget(&msg, &self.name);
            }
        }
        self.dispatch_locked(&mut st);
        stored
    }

    /// Writes the store's buffered acks and delivery marks to the OS (appends wait for the
    /// write buffer to fill or for a sync: nobody was told about them yet).
    pub fn flush_store_writes(&self) {
        let mut st = self.lock();
        if let Some(store) = st.store.as_mut() {
            if let Err(e) = store.flush_acks() {
                warn!(queue = %self.name, error = %e, "cannot write out the queue's acks");
            }
        }
    }

    /// basic.reject / basic.nack. Messages not requeued are dead-lettered if the queue has a
    /// dead-letter exchange, else discarded. True as for [`Self::ack`].
    #[must_use]
    pub fn reject(self: &Arc<Self>, seqs: &[MsgSeq], requeue: bool) -> bool {
        let mut st = self.lock();
        let mut stored = false;
        for seq in seqs {
            let (msg, reason) = match st.core.reject(*seq, requeue) {
                Some(Rejected::Dropped(msg)) => (msg, DeathReason::Rejected),
                Some(Rejected::OverDeliveryLimit(msg)) => (msg, DeathReason::DeliveryLimit),
                Some(Rejected::Requeued) | None => continue,
            };
            stored |= msg.location().is_some();
            self.dead_letter(&mut st, &msg, None, reason);
            st.forget(&msg, &self.name);
        }
        self.dispatch_locked(&mut st);
        stored
    }

    /// Puts messages back (basic.recover, cancelled consumer's in-flight deliveries).
    pub fn requeue(self: &Arc<Self>, seqs: &[MsgSeq]) {
        let mut st = self.lock();
        st.core.requeue(seqs.iter().copied());
        self.drop_over_limit(&mut st);
        self.dispatch_locked(&mut st);
    }

    /// Messages a requeue took over the delivery limit: dead-lettered (reason
    /// `delivery_limit`) or dropped.
    fn drop_over_limit(&self, st: &mut QueueState) {
        for msg in st.core.take_over_limit() {
            self.dead_letter(st, &msg, None, DeathReason::DeliveryLimit);
            st.forget(&msg, &self.name);
        }
    }

    /// The channel closed: its consumers go and its unacked messages come back.
    pub fn channel_closed(self: &Arc<Self>, channel: ChannelKey) -> ClosedOutcome {
        let mut st = self.lock();
        let outcome = st.core.channel_closed(channel);
        self.drop_over_limit(&mut st);
        for key in &outcome.cancelled {
            st.sinks.remove(key);
        }
        if !outcome.cancelled.is_empty() && !st.core.has_consumers() {
            st.unused_since = std::time::Instant::now();
        }
        st.limiters.remove(&channel);
        self.dispatch_locked(&mut st);
        outcome
    }

    /// Delivers whatever can be delivered now (after credit returned elsewhere).
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.lock();
        self.dispatch_locked(&mut st);
    }

    /// [`Queue::dispatch`], then whether messages are left waiting for consumers that exist.
    pub fn dispatch_behind(self: &Arc<Self>) -> bool {
        let mut st = self.lock();
        self.dispatch_locked(&mut st);
        st.core.has_consumers() && st.core.message_count() > 0
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        self.dispatch_fresh(st, None);
    }

    /// Delivers what can be delivered. `fresh` is a message being published right now: it may
    /// go to a waiting consumer whatever its TTL (RabbitMQ's rule that TTL 0 still reaches a
    /// consumer that is ready).
    fn dispatch_fresh(self: &Arc<Self>, st: &mut QueueState, fresh: Option<MsgSeq>) {
        if st.deleted {
            return;
        }
        let ttl = self.props.limits.message_ttl;
        let now = std::time::Instant::now();
        // Deliveries to the same consumer in a row travel as one batch.
        let mut batch: Option<(ConsumerSink, Delivery)> = None;
        loop {
            let delivery = {
                let QueueState { core, limiters, .. } = &mut *st;
                let mut has_credit = |ch: ChannelKey| {
                    limiters
                        .get(&ch)
                        .is_none_or(|limiter| limiter.try_acquire())
                };
                core.next_delivery(&mut has_credit)
            };
            let Some(d) = delivery else {
                break;
            };
            let same_consumer = batch.as_ref().is_some_and(|(_, b)| {
                b.channel == d.consumer.channel && Arc::ptr_eq(&b.tag, &d.consumer.tag)
            });
            if !same_consumer {
                let Some(sink) = st.sinks.get(&d.consumer).cloned() else {
                    // Cannot happen (sinks mirror the consumer set); keep the message if it does.
                    st.core.requeue([d.seq]);
                    break;
                };
                if let Some((sink, delivery)) = batch.take() {
                    send_delivery(&sink, delivery);
                }
                let delivery = Delivery {
                    channel: d.consumer.channel,
                    channel_id: sink.channel_id,
                    tag: d.consumer.tag.clone(),
                    queue: self.clone(),
                    no_ack: d.no_ack,
                    items: Vec::new(),
                };
                batch = Some((sink, delivery));
            }
            let Some((sink, delivery)) = batch.as_mut() else {
                break;
            };
            let Some(msg) = st.load(&d.msg, self.memory, &self.name) else {
                // Unreadable and dropped from the store: give the credit back and go on.
                if !d.no_ack {
                    st.core.ack(d.seq);
                }
                sink.limiter.settled(1);
                sink.limiter.written(1);
                continue;
            };
            if Some(d.seq) != fresh && msg.is_expired(ttl, now) {
                if !d.no_ack {
                    st.core.ack(d.seq);
                }
                self.dead_letter(st, &d.msg, Some(msg), DeathReason::Expired);
                st.forget(&d.msg, &self.name);
                sink.limiter.settled(1);
                sink.limiter.written(1);
                continue;
            }
            if d.no_ack {
                st.forget(&d.msg, &self.name);
            } else {
                mark_delivered(st, &d.msg);
            }
            delivery.items.push(DeliveryItem {
                seq: d.seq,
                msg,
                redelivered: d.redelivered,
                stored: d.msg.location().is_some(),
                // Consumers see it once the message has come back (RabbitMQ 3.10).
                delivery_count: (self.props.kind == QueueKind::Quorum && d.returns > 0)
                    .then_some(d.returns),
            });
        }
        if let Some((sink, delivery)) = batch {
            send_delivery(&sink, delivery);
        }
    }

    pub fn purge(&self) -> usize {
        let mut st = self.lock();
        let purged = st.core.purge();
        let spilled: Vec<MsgLocation> = purged
            .iter()
            .filter_map(|m| match m {
                QMsg::Spilled(loc) => Some(*loc),
                _ => None,
            })
            .collect();
        if let (false, Some(spill)) = (spilled.is_empty(), st.spill.as_mut()) {
            let _ = spill.purge(&spilled);
        }
        let locs: Vec<MsgLocation> = purged.iter().filter_map(QMsg::location).collect();
        if !locs.is_empty() && st.store.is_some() {
            st.written_since_sync = true;
        }
        if let (false, Some(store)) = (locs.is_empty(), st.store.as_mut()) {
            if let Err(e) = store.purge(&locs) {
                warn!(queue = %self.name, error = %e, "cannot record a purge in the queue's store");
            }
            // purge-ok is an answer: the purge must survive a crash of the process.
            st.flush_store(&self.name);
        }
        purged.len()
    }

    pub fn message_count(&self) -> u32 {
        u32::try_from(self.lock().core.message_count()).unwrap_or(u32::MAX)
    }

    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.lock().core.consumer_count()).unwrap_or(u32::MAX)
    }

    /// (ready messages, consumers) read under one lock.
    pub fn counts(&self) -> (u32, u32) {
        let st = self.lock();
        (
            u32::try_from(st.core.message_count()).unwrap_or(u32::MAX),
            u32::try_from(st.core.consumer_count()).unwrap_or(u32::MAX),
        )
    }

    pub fn is_unused(&self) -> bool {
        !self.lock().core.has_consumers()
    }

    /// Marks the queue deleted, deletes its store, and returns its consumers' sinks so they
    /// can be told. Returns the number of ready messages it held.
    pub fn mark_deleted(&self) -> (u32, Vec<(ConsumerKey, ConsumerSink)>) {
        let mut st = self.lock();
        st.deleted = true;
        let count = u32::try_from(st.core.message_count()).unwrap_or(u32::MAX);
        let sinks = st.sinks.drain().collect();
        st.core.purge();
        for store in [st.store.take(), st.spill.take()].into_iter().flatten() {
            if let Err(e) = store.delete() {
                warn!(queue = %self.name, error = %e, "cannot delete the queue's store");
            }
        }
        (count, sinks)
    }

    /// Writes out and fsyncs the store now (shutdown).
    pub fn sync_now(&self) {
        let mut st = self.lock();
        if let Some(store) = st.store.as_mut() {
            if let Err(e) = store.sync_now() {
                error!(queue = %self.name, error = %e, "cannot sync the queue's store");
            }
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }
}

/// Records that a stored message went out, so that after a restart it is redelivered=true.
fn mark_delivered(st: &mut QueueState, msg: &QMsg) {
    if let (Some(loc), Some(store)) = (msg.location(), st.store.as_mut()) {
        let _ = store.mark_delivered(loc);
        st.written_since_sync = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM per queued message is this plus the queue's 16 bytes of sequence number and flags.
    #[test]
    fn a_queued_message_index_entry_is_16_bytes() {
        assert_eq!(std::mem::size_of::<QMsg>(), 16);
    }

    /// A batch written at once unblocks the queues exactly when it takes the mailbox from
    /// full to not full, like the same deliveries written one by one would.
    #[test]
    fn writing_a_batch_reports_the_crossing_below_the_in_flight_cap() {
        let limiter = ChannelLimiter::default();
        for _ in 0..IN_FLIGHT_CAP {
            assert!(limiter.try_acquire());
        }
        assert!(!limiter.try_acquire(), "the mailbox is full");
        assert!(limiter.is_blocked());
        assert!(limiter.written(10), "full to not full");
        assert!(!limiter.is_blocked());
        assert!(!limiter.written(10), "not full before either");
        for _ in 0..20 {
            assert!(limiter.try_acquire());
        }
        assert!(!limiter.try_acquire());
        assert!(limiter.written(1), "one delivery is enough to cross");
        assert!(!limiter.written(IN_FLIGHT_CAP - 1));
    }

    fn queue_with_arguments(args: &[(&str, amq_protocol::types::AMQPValue)]) -> Arc<Queue> {
        let mut table = FieldTable::default();
        for (k, v) in args {
            table.insert((*k).into(), v.clone());
        }
        let props = QueueProps::new(false, false, None, table);
        let memory = crate::resources::ResourceMonitor::new(0);
        Queue::new("q".into(), "/".into(), props, memory, None, None, None)
    }

    #[test]
    fn a_consumer_cannot_attach_to_a_deleted_queue() {
        let q = queue_with_arguments(&[]);
        q.mark_deleted();
        let (events, _rx) = mpsc::unbounded_channel();
        let spec = ConsumerSpec {
            key: ConsumerKey::new(ChannelKey(1), "c"),
            priority: 0,
            prefetch: 0,
            no_ack: true,
            exclusive: false,
        };
        let sink = ConsumerSink {
            events,
            channel_id: 1,
            limiter: Arc::new(ChannelLimiter::default()),
        };
        assert_eq!(q.consume(spec, sink), Err(ConsumeError::QueueGone));
        assert_eq!(q.consumer_count(), 0);
    }

    #[test]
    fn x_expires_runs_from_the_last_declare_or_get() {
        use amq_protocol::types::AMQPValue;
        use std::time::{Duration, Instant};
        let lease = Duration::from_millis(500);
        let q = queue_with_arguments(&[("x-expires", AMQPValue::LongInt(500))]);
        assert_eq!(q.props.limits.expires, Some(lease));
        let t0 = Instant::now();
        assert!(!q.expired(t0));
        assert!(q.expired(t0 + lease + Duration::from_millis(5)));
        // A clock before the lease started (the caller's `now` taken earlier) is not expired.
        if let Some(earlier) = t0.checked_sub(Duration::from_secs(1)) {
            assert!(!q.expired(earlier));
        }

        std::thread::sleep(Duration::from_millis(2));
        let before_get = Instant::now();
        assert!(q.get(ChannelKey(1), true).is_none(), "empty queue");
        assert!(!q.expired(before_get + lease - Duration::from_millis(1)));
        assert!(q.expired(Instant::now() + lease));

        let before_declare = Instant::now();
        q.renew_lease();
        assert!(!q.expired(before_declare + lease - Duration::from_millis(1)));

        q.mark_deleted();
        assert!(
            !q.expired(Instant::now() + 10 * lease),
            "a deleted queue expires no more"
        );
    }

    #[test]
    fn a_queue_without_x_expires_never_expires() {
        let q = queue_with_arguments(&[]);
        assert_eq!(q.props.limits.expires, None);
        assert!(!q.expired(std::time::Instant::now() + std::time::Duration::from_secs(86_400)));
    }
}
