//! The consumer set of one queue: priority groups, round-robin order inside a group,
//! per-consumer prefetch credit (basic.qos global=false) and the exclusive-consumer lock.
//!
//! Semantics follow RabbitMQ's `rabbit_queue_consumers` + `rabbit_limiter`:
//! - consumers with a higher `x-priority` get every message until each of them is blocked;
//!   only then does a lower group get any;
//! - inside a group, delivery is round-robin: the consumer that just got a message goes to the
//!   back of the line;
//! - a consumer blocked on its own prefetch leaves the line and rejoins at the back when credit
//!   returns (ack, reject, requeue);
//! - per-consumer prefetch only limits consumers that must ack: RabbitMQ tracks no credit for
//!   no-ack consumers, whatever basic.qos said.
//!
//! - with `x-single-active-consumer`, only one consumer (the first registered) is in a line;
//!   the others wait on standby, and when the active one goes, the standby consumer with the
//!   highest priority (the earliest registered among equals) takes over (RabbitMQ 3.10).
//!
//! Unlike RabbitMQ, credit is keyed by an internal [`ConsumerId`] that is never reused, not by
//! the consumer tag: an ack for a message delivered to a cancelled consumer never feeds a new
//! consumer that reuses the same tag.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};

use crate::collections::HashMap;
use std::sync::Arc;

use crate::error::{self, AmqpError};

/// One AMQP channel, broker-wide: an opaque number the broker assigns per (connection, channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey(pub u64);

/// A consumer as clients name it: the channel it was created on and its consumer tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerKey {
    pub channel: ChannelKey,
    pub tag: Arc<str>,
}

impl ConsumerKey {
    pub fn new(channel: ChannelKey, tag: impl Into<Arc<str>>) -> Self {
        ConsumerKey {
            channel,
            tag: tag.into(),
        }
    }
}

/// What basic.consume asked for, as the queue needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub key: ConsumerKey,
    /// `x-priority` consumer argument; 0 when absent.
    pub priority: i32,
    /// The channel's per-consumer (global=false) basic.qos prefetch_count at consume time;
    /// 0 = unlimited. Ignored for no-ack consumers, as in RabbitMQ.
    pub prefetch: u16,
    pub no_ack: bool,
    pub exclusive: bool,
}

/// Internal, never-reused identity of one consumer registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(u64);

/// Why basic.consume was refused by the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumeError {
    /// Exclusive consume on a queue with consumers, or any consume while an exclusive one exists.
    #[error("queue in exclusive use")]
    ExclusiveInUse,
    /// The (channel, tag) pair is already consuming from this queue. The channel normally
    /// catches this first, since tags are unique per channel across queues.
    #[error("attempt to reuse consumer tag '{0}'")]
    TagInUse(Arc<str>),
    /// The queue was deleted between the lookup and the consume.
    #[error("queue deleted")]
    QueueGone,
}

impl ConsumeError {
    /// The AMQP error RabbitMQ sends for this refusal on queue `queue` of vhost `vhost`.
    pub fn to_amqp(&self, queue: &str, vhost: &str) -> AmqpError {
        match self {
            ConsumeError::ExclusiveInUse => exclusive_in_use(queue, vhost),
            ConsumeError::TagInUse(tag) => {
                AmqpError::not_allowed(format!("attempt to reuse consumer tag '{tag}'"))
            }
            ConsumeError::QueueGone => {
                AmqpError::not_found(format!("no {}", error::resource("queue", queue, vhost)))
            }
        }
    }
}

/// `403 ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use` (channel-level).
pub fn exclusive_in_use(queue: &str, vhost: &str) -> AmqpError {
    AmqpError::access_refused(format!(
        "{} in exclusive use",
        error::resource("queue", queue, vhost)
    ))
}

/// A consumer as listed by the management API / `rabbitmqctl list_consumers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub key: ConsumerKey,
    pub priority: i32,
    pub prefetch: u16,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Deliveries to this consumer not yet acked, rejected or requeued (0 for no-ack consumers).
    pub unacked: u32,
}

/// The consumer a delivery was just charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked {
    pub id: ConsumerId,
    pub key: ConsumerKey,
    pub no_ack: bool,
}

#[derive(Debug)]
struct Consumer {
    key: ConsumerKey,
    priority: i32,
    prefetch: u16,
    no_ack: bool,
    exclusive: bool,
    /// Manual-ack deliveries not yet settled; always 0 for no-ack consumers.
    in_flight: u32,
    /// True while the consumer is out of its group's line because its prefetch is used up.
    parked: bool,
}

impl Consumer {
    fn is_limited(&self) -> bool {
        !self.no_ack && self.prefetch != 0
    }

    fn out_of_credit(&self) -> bool {
        self.is_limited() && self.in_flight >= u32::from(self.prefetch)
    }

    fn info(&self) -> ConsumerInfo {
        ConsumerInfo {
            key: self.key.clone(),
            priority: self.priority,
            prefetch: self.prefetch,
            no_ack: self.no_ack,
            exclusive: self.exclusive,
            unacked: self.in_flight,
        }
    }
}

/// Consumers of one priority.
#[derive(Debug, Default)]
struct Group {
    /// Consumers that may take a message, in round-robin order (front = next).
    line: VecDeque<ConsumerId>,
    /// Consumers of this priority, in the line or parked; the group is dropped at 0.
    members: usize,
}

/// All consumers of one queue.
///
/// Invariants:
/// - `by_key` and `consumers` describe the same registrations, one-to-one;
/// - every consumer is counted in `groups[Reverse(priority)].members`, and a group exists
///   iff `members > 0`;
/// - a consumer is in its group's `line` exactly once iff `!parked`, and `parked` iff it is
///   out of credit (`in_flight >= prefetch` for a limited consumer);
/// - `exclusive` is `Some(id)` iff consumer `id` was added exclusive; it is then the only one;
/// - consumers in `standby` are in no group (the group invariants above count the others
///   only); `standby` is empty unless `single_active`, and then at most one consumer is
///   outside it, and exactly one while there are any consumers.
#[derive(Debug, Default)]
pub struct ConsumerSet {
    consumers: HashMap<ConsumerId, Consumer>,
    by_key: HashMap<ConsumerKey, ConsumerId>,
    /// `Reverse` so that iteration starts at the highest priority.
    groups: BTreeMap<Reverse<i32>, Group>,
    exclusive: Option<ConsumerId>,
    next_id: u64,
    /// `x-single-active-consumer`.
    single_active: bool,
    /// Single active consumer: the registered consumers waiting for their turn, in
    /// registration order.
    standby: Vec<ConsumerId>,
}

impl ConsumerSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// `x-single-active-consumer`: set once, before any consumer is added.
    pub fn set_single_active(&mut self, on: bool) {
        self.single_active = on;
    }

    pub fn is_single_active(&self) -> bool {
        self.single_active
    }

    /// Registers a consumer (basic.consume), at the back of its priority group's line.
    pub fn add(&mut self, spec: ConsumerSpec) -> Result<ConsumerId, ConsumeError> {
        if self.by_key.contains_key(&spec.key) {
            return Err(ConsumeError::TagInUse(spec.key.tag.clone()));
        }
        // RabbitMQ's check_exclusive_access: any exclusive holder refuses everyone; an
        // exclusive request needs a queue without consumers.
        if self.exclusive.is_some() || (spec.exclusive && !self.consumers.is_empty()) {
            return Err(ConsumeError::ExclusiveInUse);
        }
        let id = ConsumerId(self.next_id);
        self.next_id += 1;
        if self.single_active && !self.consumers.is_empty() {
            self.standby.push(id);
        } else {
            let group = self.groups.entry(Reverse(spec.priority)).or_default();
            group.members += 1;
            group.line.push_back(id);
        }
        if spec.exclusive {
            self.exclusive = Some(id);
        }
        self.by_key.insert(spec.key.clone(), id);
        self.consumers.insert(
            id,
            Consumer {
                key: spec.key,
                priority: spec.priority,
                prefetch: spec.prefetch,
                no_ack: spec.no_ack,
                exclusive: spec.exclusive,
                in_flight: 0,
                parked: false,
            },
        );
        Ok(id)
    }

    /// Removes one consumer (basic.cancel). O(size of its priority group).
    pub fn remove(&mut self, key: &ConsumerKey) -> Option<ConsumerId> {
        let id = self.by_key.remove(key)?;
        self.forget(id);
        Some(id)
    }

    /// Removes every consumer of `channel` (channel or connection closed), returning their
    /// keys in registration order. O(consumers).
    pub fn remove_channel(&mut self, channel: ChannelKey) -> Vec<ConsumerKey> {
        let mut gone: Vec<(ConsumerId, ConsumerKey)> = self
            .by_key
            .iter()
            .filter(|(key, _)| key.channel == channel)
            .map(|(key, id)| (*id, key.clone()))
            .collect();
        gone.sort_by_key(|(id, _)| *id);
        for (id, key) in &gone {
            self.by_key.remove(key);
            self.forget(*id);
        }
        gone.into_iter().map(|(_, key)| key).collect()
    }

    fn forget(&mut self, id: ConsumerId) {
        let Some(consumer) = self.consumers.remove(&id) else {
            return;
        };
        if self.exclusive == Some(id) {
            self.exclusive = None;
        }
        if let Some(at) = self.standby.iter().position(|other| *other == id) {
            self.standby.remove(at);
            return;
        }
        self.leave_group(id, &consumer);
        if self.single_active {
            self.promote_standby();
        }
    }

    fn leave_group(&mut self, id: ConsumerId, consumer: &Consumer) {
        let slot = Reverse(consumer.priority);
        if let Some(group) = self.groups.get_mut(&slot) {
            if !consumer.parked {
                group.line.retain(|other| *other != id);
            }
            group.members = group.members.saturating_sub(1);
            if group.members == 0 {
                self.groups.remove(&slot);
            }
        }
    }

    /// Single active consumer: the active one went; the standby consumer with the highest
    /// priority, the earliest registered among equals, takes over.
    fn promote_standby(&mut self) {
        let best = self
            .standby
            .iter()
            .enumerate()
            .filter_map(|(at, id)| self.consumers.get(id).map(|c| (at, *id, c.priority)))
            .max_by_key(|(at, _, priority)| (*priority, Reverse(*at)));
        let Some((at, id, priority)) = best else {
            return;
        };
        self.standby.remove(at);
        let group = self.groups.entry(Reverse(priority)).or_default();
        group.members += 1;
        group.line.push_back(id);
    }

    /// Chooses the consumer for the next message and charges the delivery to it.
    ///
    /// Walks groups from the highest priority; inside a group takes the front of the line,
    /// skipping (and moving to the back) consumers whose channel has no credit according to
    /// `channel_has_credit`. The chosen consumer goes to the back of its line, or is parked if
    /// that delivery used its last credit. At most one `true` answer of `channel_has_credit`
    /// is acted on per call, and it always leads to the returned pick.
    ///
    /// Cost: O(1) amortised when the front consumer can take the message; otherwise
    /// O(G + S) where G is the number of priority groups visited and S the number of consumers
    /// skipped for lack of channel credit. Consumers blocked on their own prefetch cost
    /// nothing: they are parked out of the line.
    ///
    /// The caller must have a message for the pick: the charge is not undone.
    #[inline]
    pub fn pick(
        &mut self,
        channel_has_credit: &mut impl FnMut(ChannelKey) -> bool,
    ) -> Option<Picked> {
        // Channels already refused during this call: asking again cannot change the answer.
        let mut refused: Vec<ChannelKey> = Vec::new();
        for group in self.groups.values_mut() {
            for _ in 0..group.line.len() {
                let Some(id) = group.line.pop_front() else {
                    break;
                };
                let Some(consumer) = self.consumers.get_mut(&id) else {
                    // Unreachable by the invariants; dropping the stale id repairs the line.
                    continue;
                };
                let channel = consumer.key.channel;
                if refused.contains(&channel) || !channel_has_credit(channel) {
                    if !refused.contains(&channel) {
                        refused.push(channel);
                    }
                    group.line.push_back(id);
                    continue;
                }
                if !consumer.no_ack {
                    consumer.in_flight += 1;
                }
                if consumer.out_of_credit() {
                    consumer.parked = true;
                } else {
                    group.line.push_back(id);
                }
                return Some(Picked {
                    id,
                    key: consumer.key.clone(),
                    no_ack: consumer.no_ack,
                });
            }
        }
        None
    }

    /// One manual-ack delivery of consumer `id` was settled (ack, reject or requeue): its
    /// credit comes back, and a parked consumer rejoins the back of its line. Returns true if
    /// the consumer was unblocked by this. No-op for consumers that are gone.
    pub fn settled(&mut self, id: ConsumerId) -> bool {
        let Some(consumer) = self.consumers.get_mut(&id) else {
            return false;
        };
        consumer.in_flight = consumer.in_flight.saturating_sub(1);
        if consumer.parked && !consumer.out_of_credit() {
            consumer.parked = false;
            if let Some(group) = self.groups.get_mut(&Reverse(consumer.priority)) {
                group.line.push_back(id);
            }
            return true;
        }
        false
    }

    pub fn len(&self) -> usize {
        self.consumers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.consumers.is_empty()
    }

    /// True while an exclusive consumer holds the queue.
    pub fn has_exclusive(&self) -> bool {
        self.exclusive.is_some()
    }

    pub fn contains(&self, key: &ConsumerKey) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn id_of(&self, key: &ConsumerKey) -> Option<ConsumerId> {
        self.by_key.get(key).copied()
    }

    pub fn info(&self, key: &ConsumerKey) -> Option<ConsumerInfo> {
        let id = self.by_key.get(key)?;
        self.consumers.get(id).map(Consumer::info)
    }

    /// Every consumer, in registration order. O(c log c).
    pub fn infos(&self) -> Vec<ConsumerInfo> {
        let mut all: Vec<(&ConsumerId, &Consumer)> = self.consumers.iter().collect();
        all.sort_by_key(|(id, _)| **id);
        all.into_iter().map(|(_, c)| c.info()).collect()
    }

    /// Checks the documented invariants; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        assert_eq!(self.by_key.len(), self.consumers.len());
        for (key, id) in &self.by_key {
            assert_eq!(&self.consumers[id].key, key);
        }
        let mut members = 0;
        for (Reverse(priority), group) in &self.groups {
            assert!(group.members > 0);
            members += group.members;
            let in_group = self
                .consumers
                .iter()
                .filter(|(id, c)| c.priority == *priority && !self.standby.contains(id))
                .count();
            assert_eq!(group.members, in_group);
            for id in &group.line {
                let c = &self.consumers[id];
                assert_eq!(c.priority, *priority);
                assert!(!c.parked);
                assert_eq!(group.line.iter().filter(|x| *x == id).count(), 1);
            }
        }
        assert_eq!(members + self.standby.len(), self.consumers.len());
        if self.single_active {
            assert!(members <= 1, "one active consumer at most");
            assert_eq!(members == 1, !self.consumers.is_empty());
        } else {
            assert!(self.standby.is_empty());
        }
        for id in &self.standby {
            let c = &self.consumers[id];
            assert!(
                !c.parked && c.in_flight == 0,
                "a standby consumer never got a message"
            );
        }
        for (id, c) in &self.consumers {
            if self.standby.contains(id) {
                continue;
            }
            assert_eq!(c.parked, c.out_of_credit(), "parked iff out of credit");
            let in_line = self
                .groups
                .get(&Reverse(c.priority))
                .is_some_and(|g| g.line.contains(id));
            assert_eq!(in_line, !c.parked);
            if c.is_limited() {
                assert!(c.in_flight <= u32::from(c.prefetch), "prefetch exceeded");
            }
        }
        if let Some(id) = self.exclusive {
            assert_eq!(self.consumers.len(), 1);
            assert!(self.consumers.contains_key(&id));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn spec(ch: u64, tag: &str, priority: i32, prefetch: u16) -> ConsumerSpec {
        ConsumerSpec {
            key: ConsumerKey::new(ChannelKey(ch), tag),
            priority,
            prefetch,
            no_ack: false,
            exclusive: false,
        }
    }

    fn always(_: ChannelKey) -> bool {
        true
    }

    fn pick_tag(set: &mut ConsumerSet) -> Option<String> {
        let p = set.pick(&mut always);
        set.check_invariants();
        p.map(|p| p.key.tag.to_string())
    }

    fn single_active() -> ConsumerSet {
        let mut set = ConsumerSet::new();
        set.set_single_active(true);
        set
    }

    #[test]
    fn single_active_the_first_registered_gets_everything_whatever_the_priorities() {
        let mut set = single_active();
        set.add(spec(1, "first", 0, 0)).unwrap();
        set.add(spec(2, "urgent", 10, 0)).unwrap();
        set.add(spec(3, "third", 0, 0)).unwrap();
        set.check_invariants();
        assert_eq!(set.len(), 3, "standby consumers count as consumers");
        for _ in 0..5 {
            assert_eq!(pick_tag(&mut set).unwrap(), "first");
        }
    }

    #[test]
    fn single_active_failover_goes_to_the_highest_priority_then_the_earliest() {
        let mut set = single_active();
        let first = ConsumerKey::new(ChannelKey(1), "first");
        set.add(spec(1, "first", 0, 0)).unwrap();
        set.add(spec(2, "early", 0, 0)).unwrap();
        set.add(spec(3, "urgent", 10, 0)).unwrap();
        set.add(spec(4, "also-urgent", 10, 0)).unwrap();
        set.remove(&first).unwrap();
        set.check_invariants();
        assert_eq!(pick_tag(&mut set).unwrap(), "urgent");
        assert_eq!(pick_tag(&mut set).unwrap(), "urgent");
        set.remove(&ConsumerKey::new(ChannelKey(3), "urgent"))
            .unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "also-urgent");
        set.remove(&ConsumerKey::new(ChannelKey(4), "also-urgent"))
            .unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "early");
        set.remove(&ConsumerKey::new(ChannelKey(2), "early"))
            .unwrap();
        assert_eq!(pick_tag(&mut set), None);
        assert_eq!(set.len(), 0);
        // The next consumer to come is active at once.
        set.add(spec(5, "late", 0, 0)).unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "late");
    }

    #[test]
    fn single_active_a_standby_consumer_leaving_changes_nothing() {
        let mut set = single_active();
        set.add(spec(1, "active", 0, 0)).unwrap();
        set.add(spec(2, "standby", 5, 0)).unwrap();
        set.remove(&ConsumerKey::new(ChannelKey(2), "standby"))
            .unwrap();
        set.check_invariants();
        assert_eq!(pick_tag(&mut set).unwrap(), "active");
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn single_active_an_active_consumer_out_of_credit_holds_the_messages() {
        let mut set = single_active();
        let active = set.add(spec(1, "active", 0, 1)).unwrap();
        set.add(spec(2, "standby", 0, 0)).unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "active");
        assert_eq!(
            pick_tag(&mut set),
            None,
            "no fallback to a standby consumer"
        );
        assert!(set.settled(active));
        assert_eq!(pick_tag(&mut set).unwrap(), "active");
    }

    #[test]
    fn single_active_closing_a_channel_hands_over_past_its_other_consumers() {
        let mut set = single_active();
        set.add(spec(1, "a", 0, 0)).unwrap();
        set.add(spec(1, "b", 9, 0)).unwrap();
        set.add(spec(2, "c", 0, 0)).unwrap();
        let gone = set.remove_channel(ChannelKey(1));
        assert_eq!(gone.len(), 2);
        set.check_invariants();
        assert_eq!(pick_tag(&mut set).unwrap(), "c");
    }

    #[test]
    fn round_robin_inside_a_group() {
        let mut set = ConsumerSet::new();
        for tag in ["a", "b", "c"] {
            set.add(spec(1, tag, 0, 0)).unwrap();
        }
        let got: Vec<_> = (0..6).map(|_| pick_tag(&mut set).unwrap()).collect();
        assert_eq!(got, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn higher_priority_first_lower_only_when_blocked() {
        let mut set = ConsumerSet::new();
        let lo = set.add(spec(1, "lo", -5, 0)).unwrap();
        let hi = set.add(spec(1, "hi", 10, 2)).unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "hi");
        assert_eq!(pick_tag(&mut set).unwrap(), "hi");
        // hi has used its prefetch of 2: only now does lo get messages.
        assert_eq!(pick_tag(&mut set).unwrap(), "lo");
        assert_eq!(pick_tag(&mut set).unwrap(), "lo");
        assert!(set.settled(hi), "credit return unparks hi");
        assert_eq!(pick_tag(&mut set).unwrap(), "hi");
        assert_eq!(pick_tag(&mut set).unwrap(), "lo");
        assert!(!set.settled(lo), "an unlimited consumer is never parked");
    }

    #[test]
    fn prefetch_limits_and_zero_is_unlimited() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "one", 0, 1)).unwrap();
        assert_eq!(pick_tag(&mut set).unwrap(), "one");
        assert_eq!(pick_tag(&mut set), None);

        let mut set = ConsumerSet::new();
        set.add(spec(1, "free", 0, 0)).unwrap();
        for _ in 0..1000 {
            assert_eq!(pick_tag(&mut set).unwrap(), "free");
        }
        assert_eq!(
            set.info(&ConsumerKey::new(ChannelKey(1), "free"))
                .unwrap()
                .unacked,
            1000
        );
    }

    #[test]
    fn no_ack_consumers_ignore_prefetch() {
        let mut set = ConsumerSet::new();
        let mut s = spec(1, "auto", 0, 1);
        s.no_ack = true;
        set.add(s).unwrap();
        for _ in 0..10 {
            let p = set.pick(&mut always).unwrap();
            assert!(p.no_ack);
        }
        set.check_invariants();
    }

    #[test]
    fn channel_without_credit_is_skipped_then_served() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "a", 0, 0)).unwrap();
        set.add(spec(2, "b", 0, 0)).unwrap();
        set.add(spec(1, "c", 0, 0)).unwrap();
        let mut asked = Vec::new();
        let mut only_2 = |ch: ChannelKey| {
            asked.push(ch);
            ch == ChannelKey(2)
        };
        let p = set.pick(&mut only_2).unwrap();
        assert_eq!(&*p.key.tag, "b");
        // Channel 1 was asked once even though two of its consumers were skipped.
        assert_eq!(asked, [ChannelKey(1), ChannelKey(2)]);
        let mut none = |_: ChannelKey| false;
        assert_eq!(set.pick(&mut none), None);
        set.check_invariants();
        // Everyone is still in line once credit is back.
        let mut seen: Vec<_> = (0..3).map(|_| pick_tag(&mut set).unwrap()).collect();
        seen.sort();
        assert_eq!(seen, ["a", "b", "c"]);
    }

    #[test]
    fn blocked_group_falls_through_to_lower_group() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "hi", 5, 0)).unwrap();
        set.add(spec(2, "lo", 0, 0)).unwrap();
        let mut not_1 = |ch: ChannelKey| ch != ChannelKey(1);
        assert_eq!(&*set.pick(&mut not_1).unwrap().key.tag, "lo");
        assert_eq!(pick_tag(&mut set).unwrap(), "hi");
    }

    #[test]
    fn exclusive_rules() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "a", 0, 0)).unwrap();
        let mut ex = spec(2, "x", 0, 0);
        ex.exclusive = true;
        assert_eq!(set.add(ex.clone()), Err(ConsumeError::ExclusiveInUse));
        set.remove(&ConsumerKey::new(ChannelKey(1), "a")).unwrap();
        set.add(ex).unwrap();
        assert!(set.has_exclusive());
        assert_eq!(
            set.add(spec(3, "b", 0, 0)),
            Err(ConsumeError::ExclusiveInUse)
        );
        assert_eq!(set.remove_channel(ChannelKey(2)).len(), 1);
        assert!(!set.has_exclusive());
        set.add(spec(3, "b", 0, 0)).unwrap();
        set.check_invariants();
    }

    #[test]
    fn duplicate_tag_on_same_channel_is_refused() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "a", 0, 0)).unwrap();
        assert_eq!(
            set.add(spec(1, "a", 3, 0)),
            Err(ConsumeError::TagInUse("a".into()))
        );
        set.add(spec(2, "a", 0, 0)).unwrap();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn error_texts_match_rabbitmq() {
        let e = ConsumeError::ExclusiveInUse.to_amqp("q", "/");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use"
        );
        let e = ConsumeError::TagInUse("t".into()).to_amqp("q", "/");
        assert_eq!(e.code, 530);
        assert_eq!(e.text, "NOT_ALLOWED - attempt to reuse consumer tag 't'");
    }

    #[test]
    fn remove_parked_and_settle_after_remove() {
        let mut set = ConsumerSet::new();
        let id = set.add(spec(1, "a", 0, 1)).unwrap();
        set.pick(&mut always).unwrap();
        set.remove(&ConsumerKey::new(ChannelKey(1), "a")).unwrap();
        set.check_invariants();
        assert!(!set.settled(id));
        // A new registration with the same tag does not inherit the old credit.
        let id2 = set.add(spec(1, "a", 0, 1)).unwrap();
        assert_ne!(id, id2);
        set.pick(&mut always).unwrap();
        assert!(!set.settled(id));
        assert_eq!(set.pick(&mut always), None);
        set.check_invariants();
    }

    #[test]
    fn infos_in_registration_order() {
        let mut set = ConsumerSet::new();
        set.add(spec(1, "z", 1, 0)).unwrap();
        set.add(spec(2, "a", 9, 3)).unwrap();
        let tags: Vec<_> = set.infos().into_iter().map(|i| i.key.tag).collect();
        assert_eq!(tags, vec![Arc::from("z"), Arc::from("a")]);
    }
}
