//! The shared queue: a [`QueueCore`] behind a short mutex, plus the wiring that hands deliveries
//! to consumers' connections.
//!
//! Whoever changes a queue (a publisher's connection, an acking consumer, basic.consume) does so
//! synchronously under the queue's lock and then runs [`Queue::dispatch`], which sends every
//! deliverable message to its consumer's connection mailbox. Mailboxes are unbounded, but what
//! can sit in them is bounded by credit: prefetch for manual-ack consumers and
//! [`ChannelLimiter`]'s in-flight cap for everyone, so a queue never waits on a connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::types::FieldTable;
use tokio::sync::mpsc;

use super::consumers::{ChannelKey, ConsumeError, ConsumerKey, ConsumerSpec};
use super::core::{ClosedOutcome, GetResult, MsgSeq, QueueCore, Rejected};
use crate::message::Message;

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

    /// A delivery left the mailbox (encoded or dropped). True when this may unblock queues.
    pub fn written(&self) -> bool {
        self.in_flight.fetch_sub(1, Ordering::Relaxed) == IN_FLIGHT_CAP
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
    /// The queue was deleted: the consumer is gone (basic.cancel to capable clients).
    ConsumerCancelled {
        channel: ChannelKey,
        channel_id: u16,
        tag: Arc<str>,
    },
}

/// One message on its way to a consumer's connection.
#[derive(Debug)]
pub struct Delivery {
    pub channel: ChannelKey,
    pub channel_id: u16,
    pub tag: Arc<str>,
    pub queue: Arc<Queue>,
    pub seq: MsgSeq,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub no_ack: bool,
}

/// Where a consumer's deliveries go.
#[derive(Debug, Clone)]
pub struct ConsumerSink {
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub channel_id: u16,
    pub limiter: Arc<ChannelLimiter>,
}

/// Immutable queue properties fixed at declare time.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueProps {
    pub durable: bool,
    pub auto_delete: bool,
    /// Connection id owning an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    pub limits: Limits,
}

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    /// Like reject-publish; dead-lettering of the refused message comes with DLX support.
    RejectPublishDlx,
}

/// Length limits from `x-max-length` / `x-max-length-bytes` / `x-overflow`. They count ready
/// messages only, as RabbitMQ does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
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
            max_length: int("x-max-length"),
            max_length_bytes: int("x-max-length-bytes"),
            overflow,
        }
    }

    fn over(&self, count: u64, bytes: u64) -> bool {
        self.max_length.is_some_and(|max| count > max)
            || self.max_length_bytes.is_some_and(|max| bytes > max)
    }
}

#[derive(Debug)]
struct QueueState {
    core: QueueCore<Arc<Message>>,
    sinks: HashMap<ConsumerKey, ConsumerSink>,
    limiters: HashMap<ChannelKey, Arc<ChannelLimiter>>,
    deleted: bool,
}

/// One queue, shared by every connection that uses it.
#[derive(Debug)]
pub struct Queue {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub props: QueueProps,
    state: Mutex<QueueState>,
}

/// Result of publishing into a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Accepted,
    /// A full queue with x-overflow reject-publish refused it: the publisher gets a nack.
    Rejected,
    /// The queue was deleted concurrently; the message went nowhere.
    QueueGone,
}

impl Queue {
    pub fn new(name: Arc<str>, vhost: Arc<str>, props: QueueProps) -> Arc<Queue> {
        Arc::new(Queue {
            name,
            vhost,
            props,
            state: Mutex::new(QueueState {
                core: QueueCore::with_sizer(|m: &Arc<Message>| m.body_size()),
                sinks: HashMap::new(),
                limiters: HashMap::new(),
                deleted: false,
            }),
        })
    }

    /// The lock is never held across `.await` and never taken while holding another queue's.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section leaves QueueState consistent before anything can panic, so
        // a poisoned lock still guards valid state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> Enqueued {
        let mut st = self.lock();
        if st.deleted {
            return Enqueued::QueueGone;
        }
        let limits = self.props.limits;
        if limits.overflow != Overflow::DropHead {
            let count = st.core.message_count() as u64 + 1;
            if limits.over(count, st.core.ready_bytes() + msg.body_size()) {
                return Enqueued::Rejected;
            }
        }
        st.core.publish(msg);
        self.dispatch_locked(&mut st);
        // drop-head: whatever no consumer took and does not fit goes, oldest first.
        while limits.over(st.core.message_count() as u64, st.core.ready_bytes()) {
            if st.core.drop_head().is_none() {
                break;
            }
        }
        Enqueued::Accepted
    }

    pub fn consume(
        self: &Arc<Self>,
        spec: ConsumerSpec,
        sink: ConsumerSink,
    ) -> Result<(), ConsumeError> {
        let mut st = self.lock();
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
        existed && self.props.auto_delete && !st.core.has_consumers()
    }

    pub fn get(&self, channel: ChannelKey, no_ack: bool) -> Option<GetResult<Arc<Message>>> {
        self.lock().core.get(channel, no_ack)
    }

    pub fn ack(self: &Arc<Self>, seqs: &[MsgSeq]) {
        let mut st = self.lock();
        for seq in seqs {
            st.core.ack(*seq);
        }
        self.dispatch_locked(&mut st);
    }

    /// basic.reject / basic.nack. Dropped messages are discarded (dead-lettering comes later).
    pub fn reject(self: &Arc<Self>, seqs: &[MsgSeq], requeue: bool) {
        let mut st = self.lock();
        for seq in seqs {
            if let Some(Rejected::Dropped(_msg)) = st.core.reject(*seq, requeue) {
                // Nowhere to dead-letter yet: the message is gone, as with no DLX in RabbitMQ.
            }
        }
        self.dispatch_locked(&mut st);
    }

    /// Puts messages back (basic.recover, cancelled consumer's in-flight deliveries).
    pub fn requeue(self: &Arc<Self>, seqs: &[MsgSeq]) {
        let mut st = self.lock();
        st.core.requeue(seqs.iter().copied());
        self.dispatch_locked(&mut st);
    }

    /// The channel closed: its consumers go and its unacked messages come back.
    pub fn channel_closed(self: &Arc<Self>, channel: ChannelKey) -> ClosedOutcome {
        let mut st = self.lock();
        let outcome = st.core.channel_closed(channel);
        for key in &outcome.cancelled {
            st.sinks.remove(key);
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

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        if st.deleted {
            return;
        }
        let QueueState {
            core,
            sinks,
            limiters,
            ..
        } = st;
        let mut has_credit = |ch: ChannelKey| {
            limiters
                .get(&ch)
                .is_none_or(|limiter| limiter.try_acquire())
        };
        while let Some(d) = core.next_delivery(&mut has_credit) {
            let Some(sink) = sinks.get(&d.consumer) else {
                // Cannot happen (sinks mirror the consumer set); keep the message if it does.
                core.requeue([d.seq]);
                break;
            };
            let event = ConnEvent::Deliver(Delivery {
                channel: d.consumer.channel,
                channel_id: sink.channel_id,
                tag: d.consumer.tag.clone(),
                queue: self.clone(),
                seq: d.seq,
                msg: d.msg,
                redelivered: d.redelivered,
                no_ack: d.no_ack,
            });
            // A closed mailbox means the connection is going away; its cleanup requeues the
            // message through channel_closed, so nothing is lost here.
            let _ = sink.events.send(event);
        }
    }

    pub fn purge(&self) -> usize {
        self.lock().core.purge().len()
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

    /// Marks the queue deleted and returns its consumers' sinks so they can be told.
    /// Returns the number of ready messages it held.
    pub fn mark_deleted(&self) -> (u32, Vec<(ConsumerKey, ConsumerSink)>) {
        let mut st = self.lock();
        st.deleted = true;
        let count = u32::try_from(st.core.message_count()).unwrap_or(u32::MAX);
        let sinks = st.sinks.drain().collect();
        st.core.purge();
        (count, sinks)
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }
}
