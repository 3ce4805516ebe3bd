//! One queue's pure state: its ready messages, its consumers and its unacked deliveries.
//!
//! A synchronous state machine with no I/O and no clock, generic over the message handle `M`
//! (the broker uses `Arc<Message>`). The async shell owns it behind a short `std::sync::Mutex`
//! and drives it:
//!
//! - after any call that can make a delivery possible (`publish`, `add_consumer`, `ack`,
//!   `requeue`, `reject`, `channel_closed`, and whenever a channel's global basic.qos credit
//!   grows) the shell runs the dispatch loop `while let Some(d) = core.next_delivery(..)` and
//!   sends each delivery to its consumer's connection. No call reports "credit returned"
//!   separately: running the loop is always correct and costs O(1) when nothing can move;
//! - acks, rejects and requeues name messages by [`MsgSeq`]; the channel maps its delivery
//!   tags to (queue, seq).
//!
//! Semantics follow RabbitMQ 3.10 classic queues (`rabbit_amqqueue_process`,
//! `rabbit_queue_consumers`): requeued messages return to their original position (by
//! publish order) with `redelivered` set; cancelling a consumer leaves its unacked messages
//! with the channel until they are acked, rejected or the channel closes; purge only touches
//! ready messages.

use super::chunked::ChunkedDeque;
use crate::collections::{HashMap, HashSet};

use super::consumers::{
    ChannelKey, ConsumeError, ConsumerId, ConsumerInfo, ConsumerKey, ConsumerSet, ConsumerSpec,
};

/// Position of a message in its queue's publish order, unique per queue and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgSeq(pub u64);

/// One message handed to a consumer by [`QueueCore::next_delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<M> {
    pub consumer: ConsumerKey,
    pub seq: MsgSeq,
    pub msg: M,
    pub redelivered: bool,
    /// How many times it came back to the queue unsettled (`x-delivery-count`).
    pub returns: u16,
    /// True: the message has left the queue for good. False: it is unacked, owned by the
    /// consumer's channel, until `ack` / `reject` / `requeue` / `channel_closed`.
    pub no_ack: bool,
}

/// The answer to basic.get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult<M> {
    pub seq: MsgSeq,
    pub msg: M,
    pub redelivered: bool,
    /// How many times it came back to the queue unsettled (`x-delivery-count`).
    pub returns: u16,
    /// Ready messages left after this one (basic.get-ok message-count), saturated to u32.
    pub remaining: u32,
}

/// What happened to a rejected (basic.reject / basic.nack) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected<M> {
    /// Back in the ready queue at its original position.
    Requeued,
    /// Removed from the queue; the caller dead-letters it (later) and tells the store.
    Dropped(M),
    /// Requeue asked, but the message has come back more than the delivery limit allows:
    /// removed; the caller dead-letters it (reason `delivery_limit`) and tells the store.
    OverDeliveryLimit(M),
}

/// What closing a channel did to this queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedOutcome {
    /// The channel's consumers on this queue, now gone, in registration order.
    pub cancelled: Vec<ConsumerKey>,
    /// Unacked messages of the channel put back in the ready queue.
    pub requeued: usize,
    /// The channel had consumers here and the queue has none left: an auto-delete queue
    /// must now be deleted.
    pub lost_last_consumer: bool,
}

#[derive(Debug)]
struct ReadyEntry<M> {
    seq: MsgSeq,
    msg: M,
    /// Set once the message has been delivered (it is only ever back here by a requeue).
    redelivered: bool,
    /// Its level in a priority queue (already capped at the queue's maximum); 0 elsewhere.
    priority: u8,
    /// How many times it came back unsettled (reject/nack with requeue, recover, channel
    /// closed); saturates.
    returns: u16,
}

/// The ready messages, in delivery order: one deque per priority level (a single one unless
/// the queue has `x-max-priority`), the highest level first, FIFO within a level.
///
/// Level 0 is `base`; levels 1..=max are `higher[0..max]`, so a queue without priorities
/// pays one comparison for them.
///
/// With `returns_to_back` (quorum queues), a message that comes back goes to the back of the
/// queue, behind everything ready, as in RabbitMQ 3.10's quorum queues; otherwise to its
/// original place.
///
/// Invariants: each level's entries have that level as their `priority` and, unless
/// `returns_to_back`, are strictly increasing by `seq`; `higher_len` is the number of entries
/// in `higher`, `len` the number in all levels, and `bytes` the sum of `sizer` over them (for
/// `x-max-length-bytes`).
#[derive(Debug)]
struct ReadyQueue<M> {
    base: ChunkedDeque<ReadyEntry<M>>,
    higher: Vec<ChunkedDeque<ReadyEntry<M>>>,
    returns_to_back: bool,
    higher_len: usize,
    len: usize,
    bytes: u64,
    sizer: fn(&M) -> u64,
}

impl<M> ReadyQueue<M> {
    fn new(sizer: fn(&M) -> u64) -> Self {
        ReadyQueue {
            base: ChunkedDeque::default(),
            higher: Vec::new(),
            returns_to_back: false,
            higher_len: 0,
            len: 0,
            bytes: 0,
            sizer,
        }
    }

    /// Makes room for priorities 0..=max (on an empty queue).
    fn set_max_priority(&mut self, max: u8) {
        debug_assert!(self.is_empty());
        self.higher = (0..max).map(|_| ChunkedDeque::default()).collect();
    }

    fn max_priority(&self) -> u8 {
        u8::try_from(self.higher.len()).unwrap_or(u8::MAX)
    }

    /// The priority of the highest non-empty level. O(1) without priorities or while only
    /// level 0 holds messages, O(levels) at worst.
    #[inline]
    fn top_priority(&self) -> Option<u8> {
        if self.higher_len > 0 {
            let i = self.higher.iter().rposition(|l| !l.is_empty())?;
            return u8::try_from(i + 1).ok();
        }
        (!self.base.is_empty()).then_some(0)
    }

    fn top(&self) -> Option<&ChunkedDeque<ReadyEntry<M>>> {
        if self.higher_len > 0 {
            return self.higher.iter().rev().find(|l| !l.is_empty());
        }
        (!self.base.is_empty()).then_some(&self.base)
    }

    /// The level of `priority` (capped at the maximum).
    #[inline]
    fn level_mut(&mut self, priority: u8) -> &mut ChunkedDeque<ReadyEntry<M>> {
        if priority == 0 {
            return &mut self.base;
        }
        let capped = usize::from(priority).min(self.higher.len());
        match capped.checked_sub(1).and_then(|i| self.higher.get_mut(i)) {
            Some(level) => level,
            None => &mut self.base,
        }
    }

    /// Exactly level `priority`, if the queue has it.
    fn level_exact(&self, priority: u8) -> Option<&ChunkedDeque<ReadyEntry<M>>> {
        match usize::from(priority).checked_sub(1) {
            None => Some(&self.base),
            Some(i) => self.higher.get(i),
        }
    }

    /// Takes the head of exactly level `priority`.
    #[inline]
    fn pop_level(&mut self, priority: u8) -> Option<ReadyEntry<M>> {
        let entry = match usize::from(priority).checked_sub(1) {
            None => self.base.pop_front()?,
            Some(i) => {
                let entry = self.higher.get_mut(i)?.pop_front()?;
                self.higher_len -= 1;
                entry
            }
        };
        self.len -= 1;
        self.sub(&entry);
        Some(entry)
    }

    /// Counts an entry going into its level.
    #[inline]
    fn entered(&mut self, entry: &ReadyEntry<M>) {
        self.add(entry);
        self.len += 1;
        if entry.priority > 0 {
            self.higher_len += 1;
        }
    }

    /// The levels, lowest first, with their priorities.
    #[cfg(test)]
    fn levels(&self) -> impl Iterator<Item = (usize, &ChunkedDeque<ReadyEntry<M>>)> {
        std::iter::once(&self.base)
            .chain(self.higher.iter())
            .enumerate()
    }

    fn front(&self) -> Option<&ReadyEntry<M>> {
        self.top().and_then(|l| l.front())
    }

    fn add(&mut self, entry: &ReadyEntry<M>) {
        self.bytes += (self.sizer)(&entry.msg);
    }

    fn sub(&mut self, entry: &ReadyEntry<M>) {
        self.bytes = self.bytes.saturating_sub((self.sizer)(&entry.msg));
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a freshly published message at its level; its seq is above every seq the
    /// queue has seen.
    #[inline]
    fn push_back(&mut self, entry: ReadyEntry<M>) {
        self.entered(&entry);
        let level = self.level_mut(entry.priority);
        debug_assert!(level.back().is_none_or(|b| b.seq < entry.seq));
        level.push_back(entry);
    }

    #[inline]
    fn pop_front(&mut self) -> Option<ReadyEntry<M>> {
        if self.higher_len == 0 {
            // Every queue without priorities, and priority queues holding only level 0.
            let entry = self.base.pop_front()?;
            self.len -= 1;
            self.sub(&entry);
            return Some(entry);
        }
        let priority = self.top_priority()?;
        self.pop_level(priority)
    }

    /// Puts back an entry just taken by `pop_front` that could not be delivered.
    #[inline]
    fn unpop_front(&mut self, entry: ReadyEntry<M>) {
        self.entered(&entry);
        let any_order = self.returns_to_back;
        let level = self.level_mut(entry.priority);
        debug_assert!(any_order || level.front().is_none_or(|f| entry.seq < f.seq));
        level.push_front(entry);
    }

    /// Inserts requeued entries at their original positions.
    ///
    /// O(k) when all of them sort before the current head (the usual case: requeued messages
    /// are older than what is still waiting); otherwise a binary search plus a shift of
    /// min(i, n - i) entries per message.
    fn requeue(&mut self, mut batch: Vec<ReadyEntry<M>>, to_back: bool) {
        batch.sort_unstable_by_key(|e| e.seq);
        if to_back {
            // A batch (a channel close, a `multiple` nack) goes in publish order.
            for entry in batch {
                self.entered(&entry);
                self.level_mut(entry.priority).push_back(entry);
            }
            return;
        }
        while let Some(entry) = batch.pop() {
            self.entered(&entry);
            let level = self.level_mut(entry.priority);
            match level.front() {
                Some(front) if front.seq < entry.seq => {
                    let at = level.partition_point(|e| e.seq < entry.seq);
                    level.insert(at, entry);
                }
                _ => level.push_front(entry),
            }
        }
    }

    /// Every entry, in delivery order.
    fn drain(&mut self) -> Vec<M> {
        self.bytes = 0;
        self.len = 0;
        self.higher_len = 0;
        let mut out = Vec::new();
        for level in self.higher.iter_mut().rev() {
            out.extend(level.drain().map(|e| e.msg));
        }
        out.extend(self.base.drain().map(|e| e.msg));
        out
    }

    /// Every entry, in delivery order.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &ReadyEntry<M>> {
        self.higher
            .iter()
            .rev()
            .chain(std::iter::once(&self.base))
            .flat_map(|l| l.iter())
    }
}

/// Who must settle an unacked message.
#[derive(Debug, Clone, Copy)]
struct Owner {
    channel: ChannelKey,
    /// The consumer whose prefetch credit it holds; None for basic.get.
    consumer: Option<ConsumerId>,
}

#[derive(Debug)]
struct Unacked<M> {
    msg: M,
    owner: Owner,
    /// Its ready level, for a requeue.
    priority: u8,
    /// Its [`ReadyEntry::returns`].
    returns: u16,
}

/// One queue's messages, consumers and unacked set. See the module docs for how to drive it.
///
/// Invariants:
/// - every published seq is in at most one of `ready` and `unacked` (gone = acked, consumed
///   no-ack, dropped or purged), and every seq is below `next_seq`;
/// - `unacked_by_channel[c]` is exactly the set of seqs in `unacked` owned by channel `c`, and
///   holds no empty sets;
/// - each live consumer's in-flight count equals the number of `unacked` entries charged to
///   it, so per-consumer prefetch can never be exceeded.
#[derive(Debug)]
pub struct QueueCore<M> {
    next_seq: u64,
    ready: ReadyQueue<M>,
    unacked: HashMap<MsgSeq, Unacked<M>>,
    unacked_by_channel: HashMap<ChannelKey, HashSet<MsgSeq>>,
    consumers: ConsumerSet,
    /// Messages that come back more often than this are removed instead (quorum queues'
    /// `x-delivery-limit`).
    delivery_limit: Option<u64>,
    /// Messages removed for the delivery limit, waiting for [`QueueCore::take_over_limit`].
    over_limit: Vec<M>,
}

impl<M> Default for QueueCore<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> QueueCore<M> {
    pub fn new() -> Self {
        Self::with_sizer(|_| 0)
    }

    /// A queue that weighs ready messages with `sizer` (see [`QueueCore::ready_bytes`]).
    pub fn with_sizer(sizer: fn(&M) -> u64) -> Self {
        QueueCore {
            next_seq: 0,
            ready: ReadyQueue::new(sizer),
            unacked: HashMap::default(),
            unacked_by_channel: HashMap::default(),
            consumers: ConsumerSet::new(),
            delivery_limit: None,
            over_limit: Vec::new(),
        }
    }

    /// `x-single-active-consumer` (see [`ConsumerSet`]); set before any consumer is added.
    pub fn set_single_active_consumer(&mut self, on: bool) {
        self.consumers.set_single_active(on);
    }

    pub fn is_single_active_consumer(&self) -> bool {
        self.consumers.is_single_active()
    }

    /// `x-max-priority`: messages are delivered highest priority first (FIFO within a
    /// priority), priorities above `max` count as `max`. Set before any message is enqueued.
    pub fn set_max_priority(&mut self, max: u8) {
        self.ready.set_max_priority(max);
    }

    /// Messages a client returns (reject, nack, recover) go to the back of the queue, in the
    /// order they came back (quorum queues), instead of to their original place; those of a
    /// closed channel still go back to their original place. Set before any message is
    /// enqueued.
    pub fn set_returns_to_back(&mut self) {
        self.ready.returns_to_back = true;
    }

    /// Messages that come back (requeued unsettled) more than `limit` times leave the queue
    /// instead; see [`QueueCore::take_over_limit`].
    pub fn set_delivery_limit(&mut self, limit: u64) {
        self.delivery_limit = Some(limit);
    }

    /// The messages removed for the delivery limit since the last call, oldest first.
    pub fn take_over_limit(&mut self) -> Vec<M> {
        std::mem::take(&mut self.over_limit)
    }

    /// A settled message on its way back to the ready queue, or None when that return takes
    /// it over the delivery limit.
    fn returned(&self, seq: MsgSeq, u: Unacked<M>) -> Result<ReadyEntry<M>, M> {
        let returns = u.returns.saturating_add(1);
        if self
            .delivery_limit
            .is_some_and(|limit| u64::from(returns) > limit)
        {
            return Err(u.msg);
        }
        Ok(ReadyEntry {
            seq,
            msg: u.msg,
            redelivered: true,
            priority: u.priority,
            returns,
        })
    }

    /// The highest priority level (0 without `x-max-priority`).
    pub fn max_priority(&self) -> u8 {
        self.ready.max_priority()
    }

    /// Enqueues a message at the tail of its priority level. O(1).
    pub fn publish(&mut self, msg: M, priority: u8) -> MsgSeq {
        self.enqueue(msg, priority, false)
    }

    /// Enqueues a message found by recovery at the tail of its priority level; `redelivered`
    /// when it had been delivered before the restart. O(1).
    pub fn enqueue(&mut self, msg: M, priority: u8, redelivered: bool) -> MsgSeq {
        let seq = MsgSeq(self.next_seq);
        self.next_seq += 1;
        self.ready.push_back(ReadyEntry {
            seq,
            msg,
            redelivered,
            priority: if priority == 0 {
                0
            } else {
                priority.min(self.ready.max_priority())
            },
            returns: 0,
        });
        seq
    }

    /// The oldest ready message of one priority level, if any. O(1).
    pub fn front_at(&self, priority: u8) -> Option<&M> {
        self.ready
            .level_exact(priority)
            .and_then(|l| l.front())
            .map(|e| &e.msg)
    }

    /// Removes the oldest ready message of one priority level (TTL expiry looks at the head
    /// of every level). O(1).
    pub fn drop_head_at(&mut self, priority: u8) -> Option<M> {
        self.ready.pop_level(priority).map(|e| e.msg)
    }

    /// The next ready message to go (the oldest of the highest priority), if any. O(1)
    /// without priorities.
    pub fn front(&self) -> Option<&M> {
        self.ready.front().map(|e| &e.msg)
    }

    /// Removes the next ready message to go (x-overflow drop-head; in a priority queue the
    /// oldest of the highest priority, as RabbitMQ's). O(1) without priorities.
    pub fn drop_head(&mut self) -> Option<M> {
        self.ready.pop_front().map(|e| e.msg)
    }

    /// Sum of the sizes of the ready messages, as weighed by the queue's sizer.
    pub fn ready_bytes(&self) -> u64 {
        self.ready.bytes
    }

    /// basic.consume. The caller maps the error with [`ConsumeError::to_amqp`].
    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<(), ConsumeError> {
        self.consumers.add(spec).map(|_| ())
    }

    /// basic.cancel. Returns false if no such consumer. Its unacked messages stay unacked
    /// (owned by the channel) as in RabbitMQ. Auto-delete: the queue lost its last consumer
    /// iff this returns true and `has_consumers()` is then false.
    pub fn cancel_consumer(&mut self, key: &ConsumerKey) -> bool {
        self.consumers.remove(key).is_some()
    }

    /// The next delivery to make, if any message is ready and some consumer may take it.
    ///
    /// Picks the highest-priority group with an eligible consumer, round-robin inside it;
    /// a consumer is eligible when it has per-consumer prefetch credit and
    /// `channel_has_credit(its channel)` is true (the shell's channel-wide basic.qos
    /// global=true limit, and any cap on no-ack consumers). The closure is asked at most once
    /// per channel per call, and a `true` answer always results in this call's delivery, so it
    /// may reserve credit; otherwise the shell accounts for the returned delivery itself.
    ///
    /// Manual-ack deliveries move to the unacked set; no-ack deliveries leave the queue.
    /// Call in a loop until None. Cost: O(1) amortised per delivery when the first consumer in
    /// line can take it (plus one hash insert for manual ack); O(G + S) otherwise, G = priority
    /// groups visited, S = consumers skipped for lack of channel credit. O(1) when no message
    /// is ready.
    pub fn next_delivery(
        &mut self,
        channel_has_credit: &mut impl FnMut(ChannelKey) -> bool,
    ) -> Option<Delivery<M>>
    where
        M: Clone,
    {
        let entry = self.ready.pop_front()?;
        let Some(picked) = self.consumers.pick(channel_has_credit) else {
            self.ready.unpop_front(entry);
            return None;
        };
        if !picked.no_ack {
            self.hold_unacked(
                entry.seq,
                entry.msg.clone(),
                (entry.priority, entry.returns),
                Owner {
                    channel: picked.key.channel,
                    consumer: Some(picked.id),
                },
            );
        }
        Some(Delivery {
            consumer: picked.key,
            seq: entry.seq,
            msg: entry.msg,
            redelivered: entry.redelivered,
            returns: entry.returns,
            no_ack: picked.no_ack,
        })
    }

    /// basic.get by `channel`. With manual ack the message becomes unacked, owned by the
    /// channel (no consumer credit involved), and is requeued if the channel closes.
    pub fn get(&mut self, channel: ChannelKey, no_ack: bool) -> Option<GetResult<M>>
    where
        M: Clone,
    {
        let entry = self.ready.pop_front()?;
        if !no_ack {
            self.hold_unacked(
                entry.seq,
                entry.msg.clone(),
                (entry.priority, entry.returns),
                Owner {
                    channel,
                    consumer: None,
                },
            );
        }
        Some(GetResult {
            seq: entry.seq,
            msg: entry.msg,
            redelivered: entry.redelivered,
            returns: entry.returns,
            remaining: u32::try_from(self.ready.len()).unwrap_or(u32::MAX),
        })
    }

    /// basic.ack of one message: it leaves the queue and its consumer's credit returns.
    /// Returns the message (to tell the store), None if `seq` is not unacked here.
    /// Run the dispatch loop afterwards: the credit may unblock a consumer.
    pub fn ack(&mut self, seq: MsgSeq) -> Option<M> {
        self.settle(seq).map(|u| u.msg)
    }

    /// basic.reject / basic.nack of one message. None if `seq` is not unacked here.
    pub fn reject(&mut self, seq: MsgSeq, requeue: bool) -> Option<Rejected<M>> {
        let unacked = self.settle(seq)?;
        if requeue {
            match self.returned(seq, unacked) {
                Ok(entry) => {
                    let to_back = self.ready.returns_to_back;
                    self.ready.requeue(vec![entry], to_back);
                    Some(Rejected::Requeued)
                }
                Err(msg) => Some(Rejected::OverDeliveryLimit(msg)),
            }
        } else {
            Some(Rejected::Dropped(unacked.msg))
        }
    }

    /// Requeues unacked messages (basic.nack multiple, basic.recover requeue=true) with
    /// `redelivered` set, to their original positions (to the back with
    /// [`Self::set_returns_to_back`]); unknown seqs are ignored. Returns how many were
    /// requeued; those over the delivery limit leave for [`Self::take_over_limit`].
    pub fn requeue(&mut self, seqs: impl IntoIterator<Item = MsgSeq>) -> usize {
        let to_back = self.ready.returns_to_back;
        self.put_back(seqs, to_back)
    }

    /// [`Self::requeue`], to the back or to the original positions.
    fn put_back(&mut self, seqs: impl IntoIterator<Item = MsgSeq>, to_back: bool) -> usize {
        let mut batch: Vec<ReadyEntry<M>> = Vec::new();
        for seq in seqs {
            if let Some(u) = self.settle(seq) {
                match self.returned(seq, u) {
                    Ok(entry) => batch.push(entry),
                    Err(msg) => self.over_limit.push(msg),
                }
            }
        }
        let n = batch.len();
        self.ready.requeue(batch, to_back);
        n
    }

    /// The channel closed (or its connection did): its consumers go and all its unacked
    /// messages here are requeued at their original positions, redelivered.
    /// O(consumers + the channel's unacked).
    pub fn channel_closed(&mut self, channel: ChannelKey) -> ClosedOutcome {
        let cancelled = self.consumers.remove_channel(channel);
        let seqs = self
            .unacked_by_channel
            .get(&channel)
            .map(|set| set.iter().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        // Always to their original positions: in RabbitMQ 3.10's quorum queues too, only a
        // client's own return (reject, nack, recover) sends a message to the back.
        let requeued = self.put_back(seqs, false);
        let lost_last_consumer = !cancelled.is_empty() && self.consumers.is_empty();
        ClosedOutcome {
            cancelled,
            requeued,
            lost_last_consumer,
        }
    }

    /// queue.purge: removes every ready message and returns them (purge-ok message-count is
    /// their number). Unacked messages are untouched, as in RabbitMQ.
    pub fn purge(&mut self) -> Vec<M> {
        self.ready.drain()
    }

    /// Ready messages (queue.declare-ok / purge-ok / delete-ok message-count).
    pub fn message_count(&self) -> usize {
        self.ready.len()
    }

    /// Delivered and not yet settled, over all channels.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Unacked messages of one channel in this queue.
    pub fn unacked_count_of(&self, channel: ChannelKey) -> usize {
        self.unacked_by_channel
            .get(&channel)
            .map_or(0, HashSet::len)
    }

    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// No ready messages (RabbitMQ's meaning, used by queue.delete if-empty; unacked
    /// messages do not count).
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    pub fn has_exclusive_consumer(&self) -> bool {
        self.consumers.has_exclusive()
    }

    pub fn consumer(&self, key: &ConsumerKey) -> Option<ConsumerInfo> {
        self.consumers.info(key)
    }

    /// All consumers, in registration order.
    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        self.consumers.infos()
    }

    fn hold_unacked(&mut self, seq: MsgSeq, msg: M, (priority, returns): (u8, u16), owner: Owner) {
        self.unacked_by_channel
            .entry(owner.channel)
            .or_default()
            .insert(seq);
        self.unacked.insert(
            seq,
            Unacked {
                msg,
                owner,
                priority,
                returns,
            },
        );
    }

    /// Takes `seq` out of the unacked set and returns its consumer's credit.
    fn settle(&mut self, seq: MsgSeq) -> Option<Unacked<M>> {
        let unacked = self.unacked.remove(&seq)?;
        let channel = unacked.owner.channel;
        if let Some(set) = self.unacked_by_channel.get_mut(&channel) {
            set.remove(&seq);
            if set.is_empty() {
                self.unacked_by_channel.remove(&channel);
            }
        }
        if let Some(id) = unacked.owner.consumer {
            self.consumers.settled(id);
        }
        Some(unacked)
    }

    #[cfg(test)]
    fn ready_snapshot(&self) -> Vec<(MsgSeq, M, bool)>
    where
        M: Clone,
    {
        self.ready
            .iter()
            .map(|e| (e.seq, e.msg.clone(), e.redelivered))
            .collect()
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        self.consumers.check_invariants();
        assert_eq!(
            self.ready.higher_len,
            self.ready
                .higher
                .iter()
                .map(ChunkedDeque::len)
                .sum::<usize>()
        );
        for (p, level) in self.ready.levels() {
            let seqs: Vec<MsgSeq> = level.iter().map(|e| e.seq).collect();
            assert!(
                self.ready.returns_to_back || seqs.windows(2).all(|w| w[0] < w[1]),
                "each level sorted by seq"
            );
            assert!(level.iter().all(|e| usize::from(e.priority) == p));
        }
        assert_eq!(self.ready.len, self.ready.iter().count());
        let ready: Vec<MsgSeq> = self.ready.iter().map(|e| e.seq).collect();
        for seq in &ready {
            assert!(seq.0 < self.next_seq);
            assert!(!self.unacked.contains_key(seq));
        }
        let mut by_channel: HashMap<ChannelKey, HashSet<MsgSeq>> = HashMap::default();
        for (seq, u) in &self.unacked {
            by_channel.entry(u.owner.channel).or_default().insert(*seq);
        }
        assert_eq!(by_channel, self.unacked_by_channel);
        for info in self.consumers.infos() {
            let Some(id) = self.consumers.id_of(&info.key) else {
                panic!("listed consumer without id");
            };
            let charged = self
                .unacked
                .values()
                .filter(|u| u.owner.consumer == Some(id))
                .count();
            assert_eq!(charged, info.unacked as usize);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ready_bytes_follow_every_move_and_drop_head_takes_the_oldest() {
        let mut q: QueueCore<u64> = QueueCore::with_sizer(|m| *m);
        for size in [10u64, 20, 30] {
            q.publish(size, 0);
        }
        assert_eq!(q.ready_bytes(), 60);
        let got = q.get(ChannelKey(1), false).unwrap();
        assert_eq!((got.msg, q.ready_bytes()), (10, 50));
        q.requeue([got.seq]);
        assert_eq!(q.ready_bytes(), 60);
        assert_eq!(q.drop_head(), Some(10));
        assert_eq!(q.ready_bytes(), 50);
        q.purge();
        assert_eq!((q.ready_bytes(), q.drop_head()), (0, None));
    }

    fn key(ch: u64, tag: &str) -> ConsumerKey {
        ConsumerKey::new(ChannelKey(ch), tag)
    }

    fn spec(ch: u64, tag: &str, prefetch: u16) -> ConsumerSpec {
        ConsumerSpec {
            key: key(ch, tag),
            priority: 0,
            prefetch,
            no_ack: false,
            exclusive: false,
        }
    }

    fn always(_: ChannelKey) -> bool {
        true
    }

    fn drain(q: &mut QueueCore<u32>) -> Vec<Delivery<u32>> {
        let mut out = Vec::new();
        while let Some(d) = q.next_delivery(&mut always) {
            out.push(d);
        }
        q.check_invariants();
        out
    }

    fn ready(q: &QueueCore<u32>) -> Vec<(u64, u32, bool)> {
        q.ready_snapshot()
            .into_iter()
            .map(|(s, m, r)| (s.0, m, r))
            .collect()
    }

    #[test]
    fn publish_then_consume_in_order() {
        let mut q = QueueCore::new();
        for m in 0..5 {
            assert_eq!(q.publish(m, 0), MsgSeq(u64::from(m)));
        }
        assert_eq!(q.message_count(), 5);
        q.add_consumer(spec(1, "c", 0)).unwrap();
        let got = drain(&mut q);
        assert_eq!(
            got.iter().map(|d| d.msg).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert!(got.iter().all(|d| !d.redelivered && !d.no_ack));
        assert_eq!(q.message_count(), 0);
        assert_eq!(q.unacked_count(), 5);
        assert_eq!(q.ack(MsgSeq(2)), Some(2));
        assert_eq!(q.ack(MsgSeq(2)), None, "double ack is unknown");
        assert_eq!(q.unacked_count(), 4);
    }

    #[test]
    fn no_consumer_no_delivery() {
        let mut q = QueueCore::new();
        q.publish(1, 0);
        assert!(q.next_delivery(&mut always).is_none());
        assert_eq!(q.message_count(), 1);
        q.check_invariants();
    }

    #[test]
    fn no_ack_deliveries_leave_the_queue() {
        let mut q = QueueCore::new();
        let mut s = spec(1, "c", 1);
        s.no_ack = true;
        q.add_consumer(s).unwrap();
        for m in 0..3 {
            q.publish(m, 0);
        }
        let got = drain(&mut q);
        assert_eq!(got.len(), 3, "prefetch does not limit no-ack consumers");
        assert!(got.iter().all(|d| d.no_ack));
        assert_eq!(q.unacked_count(), 0);
        assert_eq!(q.message_count(), 0);
    }

    #[test]
    fn prefetch_blocks_until_ack() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 2)).unwrap();
        for m in 0..5 {
            q.publish(m, 0);
        }
        let got = drain(&mut q);
        assert_eq!(got.len(), 2);
        assert_eq!(q.message_count(), 3);
        q.ack(got[0].seq).unwrap();
        let got = drain(&mut q);
        assert_eq!(got.iter().map(|d| d.msg).collect::<Vec<_>>(), [2]);
        assert_eq!(q.consumer(&key(1, "c")).unwrap().unacked, 2);
    }

    #[test]
    fn round_robin_is_fair() {
        let mut q = QueueCore::new();
        for tag in ["a", "b", "c"] {
            q.add_consumer(spec(1, tag, 0)).unwrap();
        }
        for m in 0..300 {
            q.publish(m, 0);
        }
        let got = drain(&mut q);
        let mut counts: HashMap<String, usize> = HashMap::default();
        for (i, d) in got.iter().enumerate() {
            *counts.entry(d.consumer.tag.to_string()).or_default() += 1;
            assert_eq!(&*d.consumer.tag, ["a", "b", "c"][i % 3]);
        }
        assert!(counts.values().all(|&n| n == 100));
    }

    #[test]
    fn consumer_priorities() {
        let mut q = QueueCore::new();
        q.add_consumer(ConsumerSpec {
            priority: 10,
            ..spec(1, "hi", 3)
        })
        .unwrap();
        q.add_consumer(spec(2, "lo", 0)).unwrap();
        for m in 0..5 {
            q.publish(m, 0);
        }
        let got: Vec<_> = drain(&mut q)
            .into_iter()
            .map(|d| (d.consumer.tag.to_string(), d.msg))
            .collect();
        let expect: Vec<(String, u32)> = vec![
            ("hi".into(), 0),
            ("hi".into(), 1),
            ("hi".into(), 2),
            ("lo".into(), 3),
            ("lo".into(), 4),
        ];
        assert_eq!(got, expect);
    }

    #[test]
    fn channel_credit_closure_is_respected() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "a", 0)).unwrap();
        q.add_consumer(spec(2, "b", 0)).unwrap();
        for m in 0..4 {
            q.publish(m, 0);
        }
        // Channel 1 has a global limit of 1 that the closure reserves from.
        let mut left_1 = 1;
        let mut credit = |ch: ChannelKey| {
            if ch == ChannelKey(1) {
                if left_1 == 0 {
                    return false;
                }
                left_1 -= 1;
            }
            true
        };
        let mut got = Vec::new();
        while let Some(d) = q.next_delivery(&mut credit) {
            got.push((d.consumer.channel.0, d.msg));
        }
        assert_eq!(got, [(1, 0), (2, 1), (2, 2), (2, 3)]);
        q.check_invariants();
    }

    #[test]
    fn requeue_returns_to_original_positions() {
        // ready [7, 8] and requeue [5, 3] -> 3, 5, 7, 8 with redelivered on 3 and 5.
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 0)).unwrap();
        for m in 0..7 {
            q.publish(m, 0);
        }
        let got = drain(&mut q);
        assert_eq!(got.len(), 7);
        q.cancel_consumer(&key(1, "c"));
        q.publish(7, 0);
        q.publish(8, 0);
        assert_eq!(q.requeue([MsgSeq(5), MsgSeq(3)]), 2);
        assert_eq!(
            ready(&q),
            [(3, 3, true), (5, 5, true), (7, 7, false), (8, 8, false)]
        );
        // Requeue into the middle keeps the order too.
        assert_eq!(q.requeue([MsgSeq(4), MsgSeq(99)]), 1, "unknown seq ignored");
        assert_eq!(
            ready(&q).iter().map(|e| e.0).collect::<Vec<_>>(),
            [3, 4, 5, 7, 8]
        );
        q.check_invariants();
        // The requeued messages are redelivered first, flagged.
        q.add_consumer(spec(1, "d", 0)).unwrap();
        let got = drain(&mut q);
        assert_eq!(
            got.iter()
                .map(|d| (d.msg, d.redelivered))
                .collect::<Vec<_>>(),
            [(3, true), (4, true), (5, true), (7, false), (8, false)]
        );
    }

    #[test]
    fn priority_levels_deliver_highest_first_fifo_within_and_cap_at_the_maximum() {
        let mut q = QueueCore::new();
        q.set_max_priority(5);
        assert_eq!(q.max_priority(), 5);
        // (message, priority): 9 is above the maximum and counts as 5.
        for (m, p) in [(1, 0), (2, 3), (3, 9), (4, 3), (5, 0), (6, 5)] {
            q.publish(m, p);
        }
        q.check_invariants();
        assert_eq!(q.front(), Some(&3));
        assert_eq!(
            ready(&q).iter().map(|e| e.1).collect::<Vec<_>>(),
            [3, 6, 2, 4, 1, 5]
        );
        // basic.get takes the next in that order; drop-head too.
        let got = q.get(ChannelKey(9), false).unwrap();
        assert_eq!((got.msg, got.remaining), (3, 5));
        assert_eq!(q.drop_head(), Some(6));
        // A requeued message goes back to its own level, before younger ones there.
        assert_eq!(q.reject(got.seq, true), Some(Rejected::Requeued));
        assert_eq!(q.front(), Some(&3));
        // Each level's head, for TTL expiry.
        assert_eq!(
            (q.front_at(3), q.front_at(0), q.front_at(4)),
            (Some(&2), Some(&1), None)
        );
        assert_eq!(q.drop_head_at(0), Some(1));
        assert_eq!(q.drop_head_at(99), None);
        q.check_invariants();
        q.add_consumer(spec(1, "c", 0)).unwrap();
        let got = drain(&mut q);
        assert_eq!(
            got.iter()
                .map(|d| (d.msg, d.redelivered))
                .collect::<Vec<_>>(),
            [(3, true), (2, false), (4, false), (5, false)]
        );
        // Unacked messages requeued by a channel close keep their levels as well.
        assert_eq!(q.channel_closed(ChannelKey(1)).requeued, 4);
        assert_eq!(
            ready(&q).iter().map(|e| e.1).collect::<Vec<_>>(),
            [3, 2, 4, 5]
        );
        assert_eq!(q.purge(), vec![3, 2, 4, 5]);
        assert_eq!((q.message_count(), q.ready_bytes()), (0, 0));
        q.check_invariants();
    }

    #[test]
    fn returns_are_counted_and_the_delivery_limit_removes_the_message() {
        let mut q = QueueCore::new();
        q.set_delivery_limit(1);
        q.publish(7, 0);
        let g = q.get(ChannelKey(1), false).unwrap();
        assert_eq!((g.msg, g.returns, g.redelivered), (7, 0, false));
        assert_eq!(q.reject(g.seq, true), Some(Rejected::Requeued));
        let g = q.get(ChannelKey(1), false).unwrap();
        assert_eq!((g.msg, g.returns, g.redelivered), (7, 1, true));
        // The second return is over the limit of 1.
        assert_eq!(q.reject(g.seq, true), Some(Rejected::OverDeliveryLimit(7)));
        assert_eq!(q.message_count(), 0);
        // Through a channel close and a requeue the same, collected for the caller.
        q.publish(8, 0);
        q.publish(9, 0);
        q.add_consumer(spec(2, "c", 0)).unwrap();
        let d = drain(&mut q);
        assert_eq!(d.iter().map(|d| d.returns).collect::<Vec<_>>(), [0, 0]);
        assert_eq!(q.requeue([d[0].seq]), 1);
        q.cancel_consumer(&key(2, "c"));
        let g = q.get(ChannelKey(2), false).unwrap();
        assert_eq!((g.msg, g.returns), (8, 1));
        assert_eq!(
            q.channel_closed(ChannelKey(2)).requeued,
            1,
            "9 back, 8 over the limit"
        );
        assert_eq!(q.take_over_limit(), vec![8]);
        assert!(q.take_over_limit().is_empty());
        assert_eq!(ready(&q), [(2, 9, true)]);
        q.check_invariants();
    }

    #[test]
    fn returns_to_back_queues_returned_messages_behind_everything_in_return_order() {
        let mut q = QueueCore::new();
        q.set_returns_to_back();
        for m in 0..5 {
            q.publish(m, 0);
        }
        let got: Vec<GetResult<u32>> = (0..3)
            .map(|_| q.get(ChannelKey(1), false).unwrap())
            .collect();
        // 2 comes back, then 0: behind 3 and 4, in that order; a later publish behind them.
        assert_eq!(q.reject(got[2].seq, true), Some(Rejected::Requeued));
        assert_eq!(q.reject(got[0].seq, true), Some(Rejected::Requeued));
        q.publish(5, 0);
        assert_eq!(
            ready(&q).iter().map(|e| e.1).collect::<Vec<_>>(),
            [3, 4, 2, 0, 5]
        );
        q.check_invariants();
        // Taken and put back (no consumer can take it): still first.
        q.add_consumer(spec(2, "c", 1)).unwrap();
        let d = drain(&mut q);
        assert_eq!(d.iter().map(|d| d.msg).collect::<Vec<_>>(), [3]);
        assert_eq!(q.front(), Some(&4));
        // A closed channel's messages go back to their original place (3 before 4); a
        // client's return to the back (1).
        assert_eq!(q.channel_closed(ChannelKey(2)).requeued, 1);
        assert_eq!(q.requeue([got[1].seq]), 1);
        assert_eq!(
            ready(&q).iter().map(|e| e.1).collect::<Vec<_>>(),
            [3, 4, 2, 0, 5, 1]
        );
        assert_eq!(q.purge(), vec![3, 4, 2, 0, 5, 1]);
        q.check_invariants();
    }

    #[test]
    fn without_priorities_the_property_is_ignored() {
        let mut q = QueueCore::new();
        for (m, p) in [(1, 0), (2, 9), (3, 4)] {
            q.publish(m, p);
        }
        assert_eq!(ready(&q).iter().map(|e| e.1).collect::<Vec<_>>(), [1, 2, 3]);
        q.check_invariants();
    }

    #[test]
    fn reject_requeue_and_drop() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 1)).unwrap();
        q.publish(10, 0);
        q.publish(11, 0);
        let d = drain(&mut q);
        assert_eq!(d.len(), 1);
        assert_eq!(q.reject(d[0].seq, true), Some(Rejected::Requeued));
        let d = drain(&mut q);
        assert_eq!((d[0].msg, d[0].redelivered), (10, true));
        assert_eq!(q.reject(d[0].seq, false), Some(Rejected::Dropped(10)));
        assert_eq!(q.reject(d[0].seq, false), None);
        let d = drain(&mut q);
        assert_eq!((d[0].msg, d[0].redelivered), (11, false));
    }

    #[test]
    fn cancel_keeps_unacked_until_channel_close() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 0)).unwrap();
        q.publish(1, 0);
        q.publish(2, 0);
        let d = drain(&mut q);
        assert_eq!(d.len(), 2);
        assert!(q.cancel_consumer(&key(1, "c")));
        assert!(!q.cancel_consumer(&key(1, "c")));
        assert!(!q.has_consumers());
        assert_eq!(q.unacked_count(), 2);
        // Acking after cancel still works.
        assert_eq!(q.ack(d[0].seq), Some(1));
        let out = q.channel_closed(ChannelKey(1));
        assert_eq!(out.requeued, 1);
        assert!(out.cancelled.is_empty());
        assert!(!out.lost_last_consumer);
        assert_eq!(ready(&q), [(1, 2, true)]);
        q.check_invariants();
    }

    #[test]
    fn channel_closed_requeues_and_reports_last_consumer() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "a", 0)).unwrap();
        q.add_consumer(spec(1, "b", 0)).unwrap();
        q.add_consumer(spec(2, "x", 0)).unwrap();
        for m in 0..6 {
            q.publish(m, 0);
        }
        let d = drain(&mut q);
        assert_eq!(d.len(), 6);
        q.publish(6, 0);
        let g = q.get(ChannelKey(1), false).unwrap();
        assert_eq!(g.msg, 6);
        let out = q.channel_closed(ChannelKey(1));
        assert_eq!(out.cancelled, vec![key(1, "a"), key(1, "b")]);
        // a got 0 and 3, b got 1 and 4, plus the basic.get of 6.
        assert_eq!(out.requeued, 5);
        assert!(!out.lost_last_consumer);
        assert_eq!(
            ready(&q),
            [
                (0, 0, true),
                (1, 1, true),
                (3, 3, true),
                (4, 4, true),
                (6, 6, true)
            ]
        );
        // x got 2 and 5.
        assert_eq!(q.unacked_count(), 2);
        assert_eq!(q.unacked_count_of(ChannelKey(2)), 2);
        q.check_invariants();
        let out = q.channel_closed(ChannelKey(2));
        assert!(out.lost_last_consumer);
        assert_eq!(out.requeued, 2);
        assert_eq!(q.message_count(), 7);
        let out = q.channel_closed(ChannelKey(2));
        assert_eq!(out.requeued, 0);
        assert!(!out.lost_last_consumer);
    }

    #[test]
    fn get_counts_and_ownership() {
        let mut q = QueueCore::new();
        assert!(q.get(ChannelKey(1), true).is_none());
        for m in 0..3 {
            q.publish(m, 0);
        }
        let g = q.get(ChannelKey(1), true).unwrap();
        assert_eq!((g.msg, g.remaining, g.redelivered), (0, 2, false));
        assert_eq!(q.unacked_count(), 0);
        let g = q.get(ChannelKey(1), false).unwrap();
        assert_eq!((g.msg, g.remaining), (1, 1));
        assert_eq!(q.unacked_count(), 1);
        assert_eq!(q.reject(g.seq, true), Some(Rejected::Requeued));
        let g = q.get(ChannelKey(1), false).unwrap();
        assert_eq!((g.msg, g.remaining, g.redelivered), (1, 1, true));
        assert_eq!(q.ack(g.seq), Some(1));
        q.check_invariants();
    }

    #[test]
    fn get_does_not_consume_consumer_credit() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 1)).unwrap();
        q.publish(0, 0);
        q.get(ChannelKey(1), false).unwrap();
        q.publish(1, 0);
        let d = drain(&mut q);
        assert_eq!(d.len(), 1);
        assert_eq!(q.consumer(&key(1, "c")).unwrap().unacked, 1);
    }

    #[test]
    fn purge_leaves_unacked_alone() {
        let mut q = QueueCore::new();
        q.add_consumer(spec(1, "c", 2)).unwrap();
        for m in 0..5 {
            q.publish(m, 0);
        }
        let d = drain(&mut q);
        assert_eq!(d.len(), 2);
        assert_eq!(q.purge(), vec![2, 3, 4]);
        assert!(q.is_empty());
        assert_eq!(q.unacked_count(), 2);
        assert_eq!(q.ack(d[1].seq), Some(1));
        assert_eq!(q.requeue([d[0].seq]), 1);
        assert_eq!(ready(&q), [(0, 0, true)]);
        q.check_invariants();
    }

    #[test]
    fn exclusive_consumer() {
        let mut q: QueueCore<u32> = QueueCore::new();
        q.add_consumer(ConsumerSpec {
            exclusive: true,
            ..spec(1, "x", 0)
        })
        .unwrap();
        assert!(q.has_exclusive_consumer());
        assert_eq!(
            q.add_consumer(spec(2, "y", 0)),
            Err(ConsumeError::ExclusiveInUse)
        );
        q.cancel_consumer(&key(1, "x"));
        q.add_consumer(spec(2, "y", 0)).unwrap();
        assert_eq!(
            q.add_consumer(ConsumerSpec {
                exclusive: true,
                ..spec(3, "z", 0)
            }),
            Err(ConsumeError::ExclusiveInUse)
        );
        assert_eq!(q.consumers().len(), 1);
    }

    #[test]
    fn large_backlog_and_credit_churn_stay_fast() {
        // A smoke test of the amortised cost: 100k deliveries through 10 consumers with small
        // prefetch, acking as we go.
        let mut q = QueueCore::new();
        for i in 0..10 {
            q.add_consumer(spec(i, "c", 5)).unwrap();
        }
        for m in 0..100_000 {
            q.publish(m, 0);
        }
        let mut delivered = 0;
        loop {
            // Not `drain`: its full invariant check per batch would dominate the run time.
            let mut batch = Vec::new();
            while let Some(d) = q.next_delivery(&mut always) {
                batch.push(d);
            }
            if batch.is_empty() {
                break;
            }
            delivered += batch.len();
            for d in batch {
                q.ack(d.seq).unwrap();
            }
        }
        assert_eq!(delivered, 100_000);
        q.check_invariants();
        assert_eq!(q.unacked_count(), 0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod model {
    //! Stateful property test: random operations against a naive Vec-based reference.

    use super::*;
    use proptest::prelude::*;

    const CHANNELS: u64 = 3;
    /// Channel 2 has a channel-wide (global) prefetch of this many manual-ack deliveries.
    const GLOBAL_LIMIT_CH2: usize = 2;

    #[derive(Debug, Clone)]
    enum Op {
        Publish,
        Consume {
            channel: u64,
            tag: u8,
            priority: i32,
            prefetch: u16,
            no_ack: bool,
            exclusive: bool,
        },
        Cancel {
            channel: u64,
            tag: u8,
        },
        Dispatch,
        Ack(usize),
        Reject(usize, bool),
        RequeueMany(Vec<usize>),
        Get {
            channel: u64,
            no_ack: bool,
        },
        CloseChannel(u64),
        Purge,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Publish),
            2 => (0..CHANNELS, 0u8..3, -1i32..=1, 0u16..3, any::<bool>(), prop::bool::weighted(0.1))
                .prop_map(|(channel, tag, priority, prefetch, no_ack, exclusive)| Op::Consume {
                    channel, tag, priority, prefetch, no_ack, exclusive
                }),
            1 => (0..CHANNELS, 0u8..3).prop_map(|(channel, tag)| Op::Cancel { channel, tag }),
            3 => Just(Op::Dispatch),
            3 => any::<usize>().prop_map(Op::Ack),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Op::Reject(i, r)),
            1 => prop::collection::vec(any::<usize>(), 0..4).prop_map(Op::RequeueMany),
            1 => (0..CHANNELS, any::<bool>()).prop_map(|(channel, no_ack)| Op::Get { channel, no_ack }),
            1 => (0..CHANNELS).prop_map(Op::CloseChannel),
            1 => Just(Op::Purge),
        ]
    }

    #[derive(Debug, Clone)]
    struct ModelConsumer {
        key: ConsumerKey,
        priority: i32,
        prefetch: u16,
        no_ack: bool,
        exclusive: bool,
        /// Generation, so a re-registered tag does not inherit old deliveries.
        generation: u64,
    }

    #[derive(Debug, Clone)]
    struct ModelUnacked {
        seq: u64,
        msg: u32,
        channel: ChannelKey,
        consumer: Option<(ConsumerKey, u64)>,
    }

    #[derive(Debug, Default)]
    struct Model {
        /// The queue's `x-max-priority`; message `m` has priority `m % 4`.
        max_priority: Option<u8>,
        next: u64,
        ready: Vec<(u64, u32, bool)>,
        unacked: Vec<ModelUnacked>,
        consumers: Vec<ModelConsumer>,
        generation: u64,
        published: usize,
        gone: usize,
    }

    impl Model {
        fn in_flight(&self, key: &ConsumerKey, generation: u64) -> usize {
            self.unacked
                .iter()
                .filter(|u| u.consumer.as_ref() == Some(&(key.clone(), generation)))
                .count()
        }

        fn channel_unacked(&self, channel: ChannelKey) -> usize {
            self.unacked.iter().filter(|u| u.channel == channel).count()
        }

        fn channel_has_credit(&self, channel: ChannelKey) -> bool {
            channel != ChannelKey(2) || self.channel_unacked(channel) < GLOBAL_LIMIT_CH2
        }

        fn eligible(&self, c: &ModelConsumer) -> bool {
            let own = c.no_ack
                || c.prefetch == 0
                || self.in_flight(&c.key, c.generation) < usize::from(c.prefetch);
            own && self.channel_has_credit(c.key.channel)
        }

        fn requeue(&mut self, idx: &[usize]) {
            let mut idx = idx.to_vec();
            idx.sort_unstable();
            idx.dedup();
            for i in idx.into_iter().rev() {
                let u = self.unacked.remove(i);
                self.ready.push((u.seq, u.msg, true));
            }
            self.sort_ready();
        }

        /// Delivery order: highest level first (priorities above the maximum count as the
        /// maximum; all are 0 without one), then publish order.
        fn sort_ready(&mut self) {
            let max = self.max_priority;
            let level = |msg: u32| max.map_or(0, |mx| priority_of(msg).min(mx));
            self.ready
                .sort_by_key(|e| (std::cmp::Reverse(level(e.1)), e.0));
        }
    }

    fn check(q: &QueueCore<u32>, m: &Model) {
        q.check_invariants();
        let ready: Vec<(u64, u32, bool)> = q
            .ready_snapshot()
            .into_iter()
            .map(|(s, msg, r)| (s.0, msg, r))
            .collect();
        assert_eq!(ready, m.ready, "ready order and redelivered flags");
        let mut unacked: Vec<u64> = q.unacked.keys().map(|s| s.0).collect();
        unacked.sort_unstable();
        let mut model_unacked: Vec<u64> = m.unacked.iter().map(|u| u.seq).collect();
        model_unacked.sort_unstable();
        assert_eq!(unacked, model_unacked);
        assert_eq!(
            m.published,
            m.ready.len() + m.unacked.len() + m.gone,
            "conservation"
        );
        assert_eq!(q.message_count(), m.ready.len());
        assert_eq!(q.unacked_count(), m.unacked.len());
        assert_eq!(q.consumer_count(), m.consumers.len());
        for c in &m.consumers {
            let info = q.consumer(&c.key).expect("consumer listed");
            let flight = m.in_flight(&c.key, c.generation);
            assert_eq!(info.unacked as usize, flight);
            if !c.no_ack && c.prefetch > 0 {
                assert!(flight <= usize::from(c.prefetch), "prefetch exceeded");
            }
        }
    }

    fn pick_index(len: usize, i: usize) -> Option<usize> {
        (len > 0).then(|| i % len)
    }

    fn priority_of(msg: u32) -> u8 {
        (msg % 4) as u8
    }

    fn run(ops: Vec<Op>, max_priority: Option<u8>) {
        let mut q: QueueCore<u32> = QueueCore::new();
        if let Some(max) = max_priority {
            q.set_max_priority(max);
        }
        let mut m = Model {
            max_priority,
            ..Model::default()
        };
        for op in ops {
            match op {
                Op::Publish => {
                    let msg = m.published as u32;
                    let seq = q.publish(msg, priority_of(msg));
                    assert_eq!(seq.0, m.next);
                    m.ready.push((m.next, msg, false));
                    m.sort_ready();
                    m.next += 1;
                    m.published += 1;
                }
                Op::Consume {
                    channel,
                    tag,
                    priority,
                    prefetch,
                    no_ack,
                    exclusive,
                } => {
                    let key = ConsumerKey::new(ChannelKey(channel), format!("t{tag}"));
                    let expected = if m.consumers.iter().any(|c| c.key == key) {
                        Err(ConsumeError::TagInUse(key.tag.clone()))
                    } else if m.consumers.iter().any(|c| c.exclusive)
                        || (exclusive && !m.consumers.is_empty())
                    {
                        Err(ConsumeError::ExclusiveInUse)
                    } else {
                        Ok(())
                    };
                    let got = q.add_consumer(ConsumerSpec {
                        key: key.clone(),
                        priority,
                        prefetch,
                        no_ack,
                        exclusive,
                    });
                    assert_eq!(got, expected);
                    if got.is_ok() {
                        m.generation += 1;
                        m.consumers.push(ModelConsumer {
                            key,
                            priority,
                            prefetch,
                            no_ack,
                            exclusive,
                            generation: m.generation,
                        });
                    }
                }
                Op::Cancel { channel, tag } => {
                    let key = ConsumerKey::new(ChannelKey(channel), format!("t{tag}"));
                    let before = m.consumers.len();
                    m.consumers.retain(|c| c.key != key);
                    assert_eq!(q.cancel_consumer(&key), before != m.consumers.len());
                }
                Op::Dispatch => loop {
                    let mut asked_false = Vec::new();
                    let d = {
                        let mut credit = |ch: ChannelKey| {
                            let ok = m.channel_has_credit(ch);
                            if !ok {
                                asked_false.push(ch);
                            }
                            ok
                        };
                        q.next_delivery(&mut credit)
                    };
                    let Some(d) = d else {
                        // Liveness: nothing deliverable means no message or no eligible consumer.
                        assert!(
                            m.ready.is_empty() || !m.consumers.iter().any(|c| m.eligible(c)),
                            "stalled with an eligible consumer"
                        );
                        break;
                    };
                    assert!(!asked_false.contains(&d.consumer.channel));
                    let head = m.ready.remove(0);
                    assert_eq!((d.seq.0, d.msg, d.redelivered), head);
                    let c = m
                        .consumers
                        .iter()
                        .find(|c| c.key == d.consumer)
                        .expect("delivered to a live consumer")
                        .clone();
                    assert!(m.eligible(&c), "delivered to a blocked consumer");
                    // Priority: no eligible consumer of a higher priority was passed over.
                    assert!(!m
                        .consumers
                        .iter()
                        .any(|o| o.priority > c.priority && m.eligible(o)));
                    assert_eq!(d.no_ack, c.no_ack);
                    if c.no_ack {
                        m.gone += 1;
                    } else {
                        m.unacked.push(ModelUnacked {
                            seq: head.0,
                            msg: head.1,
                            channel: c.key.channel,
                            consumer: Some((c.key.clone(), c.generation)),
                        });
                    }
                },
                Op::Ack(i) => {
                    if let Some(i) = pick_index(m.unacked.len(), i) {
                        let u = m.unacked.remove(i);
                        assert_eq!(q.ack(MsgSeq(u.seq)), Some(u.msg));
                        m.gone += 1;
                    } else {
                        assert_eq!(q.ack(MsgSeq(m.next + 7)), None);
                    }
                }
                Op::Reject(i, requeue) => {
                    if let Some(i) = pick_index(m.unacked.len(), i) {
                        let u = m.unacked[i].clone();
                        let got = q.reject(MsgSeq(u.seq), requeue);
                        if requeue {
                            assert_eq!(got, Some(Rejected::Requeued));
                            m.requeue(&[i]);
                        } else {
                            assert_eq!(got, Some(Rejected::Dropped(u.msg)));
                            m.unacked.remove(i);
                            m.gone += 1;
                        }
                    }
                }
                Op::RequeueMany(idx) => {
                    let idx: Vec<usize> = idx
                        .into_iter()
                        .filter_map(|i| pick_index(m.unacked.len(), i))
                        .collect();
                    let seqs: Vec<MsgSeq> = idx.iter().map(|&i| MsgSeq(m.unacked[i].seq)).collect();
                    let mut distinct = idx.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    assert_eq!(q.requeue(seqs), distinct.len());
                    m.requeue(&idx);
                }
                Op::Get { channel, no_ack } => {
                    let got = q.get(ChannelKey(channel), no_ack);
                    if m.ready.is_empty() {
                        assert!(got.is_none());
                    } else {
                        let head = m.ready.remove(0);
                        let g = got.expect("get returns the head");
                        assert_eq!((g.seq.0, g.msg, g.redelivered), head);
                        assert_eq!(g.remaining as usize, m.ready.len());
                        if no_ack {
                            m.gone += 1;
                        } else {
                            m.unacked.push(ModelUnacked {
                                seq: head.0,
                                msg: head.1,
                                channel: ChannelKey(channel),
                                consumer: None,
                            });
                        }
                    }
                }
                Op::CloseChannel(channel) => {
                    let channel = ChannelKey(channel);
                    let out = q.channel_closed(channel);
                    let had = m.consumers.len();
                    let cancelled: Vec<ConsumerKey> = m
                        .consumers
                        .iter()
                        .filter(|c| c.key.channel == channel)
                        .map(|c| c.key.clone())
                        .collect();
                    m.consumers.retain(|c| c.key.channel != channel);
                    assert_eq!(out.cancelled, cancelled);
                    assert_eq!(
                        out.lost_last_consumer,
                        had > 0 && !cancelled.is_empty() && m.consumers.is_empty()
                    );
                    let idx: Vec<usize> = m
                        .unacked
                        .iter()
                        .enumerate()
                        .filter(|(_, u)| u.channel == channel)
                        .map(|(i, _)| i)
                        .collect();
                    assert_eq!(out.requeued, idx.len());
                    m.requeue(&idx);
                }
                Op::Purge => {
                    let purged = q.purge();
                    let expect: Vec<u32> = m.ready.drain(..).map(|e| e.1).collect();
                    assert_eq!(purged, expect);
                    m.gone += expect.len();
                }
            }
            check(&q, &m);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn queue_core_matches_model(ops in prop::collection::vec(op(), 1..120)) {
            run(ops, None);
        }

        /// The same with `x-max-priority` 2 and message priorities 0 to 3.
        #[test]
        fn priority_queue_core_matches_model(ops in prop::collection::vec(op(), 1..120)) {
            run(ops, Some(2));
        }
    }
}
