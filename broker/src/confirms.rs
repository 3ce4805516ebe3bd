//! Publisher-confirm bookkeeping for one channel in confirm mode: publish sequence numbers,
//! which queues still owe a confirm for each publish, and the basic.ack / basic.nack frames
//! to send, coalesced exactly as RabbitMQ's channel does.
//!
//! Semantics follow `rabbit_confirms` (the pending set) and `rabbit_channel`'s
//! `send_confirms_and_nacks` / `coalesce_and_send` (the frames): in each drained batch, acks
//! go out before nacks; a batch of one ack is sent with multiple=false; otherwise every tag
//! below both the smallest still-unconfirmed publish and the smallest tag of the opposite kind
//! in the batch is covered by one multiple=true frame, and the rest go out one by one.
//!
//! Ordering with basic.return (mandatory, unroutable) is the caller's: send the return, then
//! drain, as RabbitMQ does.

use crate::tags::TagMap;

/// A frame to send to the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmFrame {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
}

/// Confirm state of one channel, created at confirm.select. `Q` identifies a queue (a name or
/// an id); a publish is confirmed once every queue it was routed to confirmed it.
///
/// Invariants:
/// - tags are handed out 1, 2, 3, ... and `next_tag` is above every tag seen;
/// - a tag is in at most one of `unconfirmed`, `confirmed` and `rejected`, and once it has
///   left all three it never comes back (settled exactly once);
/// - every `unconfirmed` entry has at least one queue, without duplicates.
#[derive(Debug)]
pub struct ConfirmTracker<Q> {
    next_tag: u64,
    unconfirmed: TagMap<Pending<Q>>,
    /// Settled positively since the last `drain`.
    confirmed: Vec<u64>,
    /// Settled negatively since the last `drain`.
    rejected: Vec<u64>,
}

impl<Q: PartialEq> Default for ConfirmTracker<Q> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Q: PartialEq> ConfirmTracker<Q> {
    pub fn new() -> Self {
        ConfirmTracker {
            next_tag: 1,
            unconfirmed: TagMap::default(),
            confirmed: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// The tag the next publish will get.
    pub fn next_tag(&self) -> u64 {
        self.next_tag
    }

    /// Records a publish routed to `queues` and returns its tag. With no queue (unroutable,
    /// after any basic.return) it is confirmed at once. O(log n + k²) for k queues.
    pub fn publish(&mut self, queues: impl IntoIterator<Item = Q>) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut pending: Option<Pending<Q>> = None;
        for q in queues {
            match &mut pending {
                None => pending = Some(Pending::One(q)),
                Some(p) => p.add(q),
            }
        }
        match pending {
            None => self.confirmed.push(tag),
            Some(p) => {
                self.unconfirmed.insert(tag, p);
            }
        }
        tag
    }

    /// Queue `queue` has safely taken publish `tag`. Returns true if that completed the
    /// publish (an ack is now pending). Unknown tags and queues are ignored.
    pub fn confirm(&mut self, tag: u64, queue: &Q) -> bool {
        let Some(pending) = self.unconfirmed.get_mut(tag) else {
            return false;
        };
        if pending.remove(queue) {
            self.unconfirmed.take(tag);
            self.confirmed.push(tag);
            return true;
        }
        false
    }

    /// Publish `tag` failed (e.g. x-overflow reject-publish on one of its queues): a nack is
    /// now pending, whatever the other queues say. Returns false if `tag` was not unconfirmed.
    pub fn reject(&mut self, tag: u64) -> bool {
        if self.unconfirmed.take(tag).is_some() {
            self.rejected.push(tag);
            true
        } else {
            false
        }
    }

    /// Queue `queue` was deleted: nothing waits for it any more, so publishes that only
    /// waited for it are confirmed (as `rabbit_confirms:remove_queue`). O(n).
    pub fn remove_queue(&mut self, queue: &Q) {
        let tags: Vec<u64> = self
            .unconfirmed
            .iter()
            .filter(|(_, pending)| pending.contains(queue))
            .map(|(tag, _)| tag)
            .collect();
        for tag in tags {
            self.confirm(tag, queue);
        }
    }

    /// Queue `queue` lost messages it had not confirmed (it crashed): every publish waiting
    /// for it is nacked. O(n).
    pub fn reject_queue(&mut self, queue: &Q) {
        let tags: Vec<u64> = self
            .unconfirmed
            .iter()
            .filter(|(_, pending)| pending.contains(queue))
            .map(|(tag, _)| tag)
            .collect();
        for tag in tags {
            self.reject(tag);
        }
    }

    /// Publishes still waiting for a queue.
    pub fn unconfirmed_count(&self) -> usize {
        self.unconfirmed.len()
    }

    /// The oldest publish still waiting for a queue.
    pub fn smallest_unconfirmed(&self) -> Option<u64> {
        self.unconfirmed.first_tag()
    }

    /// True when `drain` would return frames.
    pub fn has_frames(&self) -> bool {
        !self.confirmed.is_empty() || !self.rejected.is_empty()
    }

    /// The frames to send now, in order: acks, then nacks. Call once per batch of work (after
    /// any basic.return of that batch). O(b log b) for b settled tags.
    pub fn drain(&mut self) -> Vec<ConfirmFrame> {
        let mut acks = std::mem::take(&mut self.confirmed);
        let mut nacks = std::mem::take(&mut self.rejected);
        acks.sort_unstable();
        acks.dedup();
        nacks.sort_unstable();
        nacks.dedup();
        let smallest = self.smallest_unconfirmed();
        let mut frames = Vec::new();
        if let [tag] = acks[..] {
            frames.push(ConfirmFrame::Ack {
                tag,
                multiple: false,
            });
        } else {
            coalesce(&acks, &nacks, smallest, &mut frames, |tag, multiple| {
                ConfirmFrame::Ack { tag, multiple }
            });
        }
        coalesce(&nacks, &acks, smallest, &mut frames, |tag, multiple| {
            ConfirmFrame::Nack { tag, multiple }
        });
        frames
    }
}

/// The queues one publish still waits for: a single queue (the common case) costs no
/// allocation. Never empty, never a duplicate.
#[derive(Debug)]
enum Pending<Q> {
    One(Q),
    Many(Vec<Q>),
}

impl<Q: PartialEq> Pending<Q> {
    fn contains(&self, queue: &Q) -> bool {
        match self {
            Pending::One(q) => q == queue,
            Pending::Many(qs) => qs.contains(queue),
        }
    }

    fn add(&mut self, queue: Q) {
        if self.contains(&queue) {
            return;
        }
        match self {
            Pending::One(_) => {
                let Pending::One(first) = std::mem::replace(self, Pending::Many(Vec::new())) else {
                    return;
                };
                *self = Pending::Many(vec![first, queue]);
            }
            Pending::Many(qs) => qs.push(queue),
        }
    }

    /// Removes `queue`; true when nothing is left to wait for.
    fn remove(&mut self, queue: &Q) -> bool {
        match self {
            Pending::One(q) => q == queue,
            Pending::Many(qs) => {
                qs.retain(|q| q != queue);
                qs.is_empty()
            }
        }
    }
}

/// One multiple=true frame for the tags of `settled` that lie below every tag still pending
/// or settled the other way in this batch; the rest one by one. Both slices are sorted.
fn coalesce(
    settled: &[u64],
    opposite: &[u64],
    smallest_unconfirmed: Option<u64>,
    frames: &mut Vec<ConfirmFrame>,
    frame: impl Fn(u64, bool) -> ConfirmFrame,
) {
    let Some(&last) = settled.last() else {
        return;
    };
    let mut cutoff = smallest_unconfirmed.unwrap_or(last.saturating_add(1));
    if let Some(&first_opposite) = opposite.first() {
        cutoff = cutoff.min(first_opposite);
    }
    let below = settled.partition_point(|&t| t < cutoff);
    if let Some(&top) = settled[..below].last() {
        frames.push(frame(top, true));
    }
    frames.extend(settled[below..].iter().map(|&t| frame(t, false)));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    use ConfirmFrame::{Ack, Nack};

    #[test]
    fn tags_start_at_one_and_unroutable_is_confirmed_at_once() {
        let mut t: ConfirmTracker<&str> = ConfirmTracker::new();
        assert_eq!(t.next_tag(), 1);
        assert_eq!(t.publish([]), 1);
        assert_eq!(
            t.drain(),
            [Ack {
                tag: 1,
                multiple: false
            }]
        );
        assert!(t.drain().is_empty());
        assert_eq!(t.publish(["q"]), 2);
        assert!(t.drain().is_empty());
    }

    #[test]
    fn waits_for_every_queue() {
        let mut t = ConfirmTracker::new();
        let tag = t.publish(["a", "b", "a"]);
        assert!(!t.confirm(tag, &"a"));
        assert!(!t.confirm(tag, &"a"), "duplicate confirm is harmless");
        assert!(!t.has_frames());
        assert!(t.confirm(tag, &"b"));
        assert!(!t.confirm(tag, &"b"), "already settled");
        assert_eq!(
            t.drain(),
            [Ack {
                tag: 1,
                multiple: false
            }]
        );
        assert_eq!(t.unconfirmed_count(), 0);
    }

    #[test]
    fn batches_with_multiple_up_to_the_first_gap() {
        let mut t = ConfirmTracker::new();
        for _ in 0..6 {
            t.publish(["q"]);
        }
        // 1, 2, 3 and 5 confirmed; 4 and 6 pending.
        for tag in [3, 1, 5, 2] {
            t.confirm(tag, &"q");
        }
        assert_eq!(
            t.drain(),
            [
                Ack {
                    tag: 3,
                    multiple: true
                },
                Ack {
                    tag: 5,
                    multiple: false
                }
            ]
        );
        t.confirm(4, &"q");
        t.confirm(6, &"q");
        assert_eq!(
            t.drain(),
            [Ack {
                tag: 6,
                multiple: true
            }]
        );
    }

    #[test]
    fn nacks_cut_ack_batches() {
        let mut t = ConfirmTracker::new();
        for _ in 0..5 {
            t.publish(["q"]);
        }
        t.confirm(1, &"q");
        t.confirm(2, &"q");
        assert!(t.reject(3));
        assert!(!t.reject(3));
        t.confirm(4, &"q");
        // 5 still pending.
        assert_eq!(
            t.drain(),
            [
                Ack {
                    tag: 2,
                    multiple: true
                },
                Ack {
                    tag: 4,
                    multiple: false
                },
                Nack {
                    tag: 3,
                    multiple: false
                }
            ]
        );
        assert!(t.reject(5));
        // Everything below 5 is settled, nothing pending: RabbitMQ sends multiple=true.
        assert_eq!(
            t.drain(),
            [Nack {
                tag: 5,
                multiple: true
            }]
        );
    }

    #[test]
    fn remove_and_reject_queue() {
        let mut t = ConfirmTracker::new();
        t.publish(["a", "b"]);
        t.publish(["b"]);
        t.publish(["c"]);
        t.remove_queue(&"a");
        assert!(!t.has_frames());
        t.reject_queue(&"b");
        assert_eq!(
            t.drain(),
            [Nack {
                tag: 2,
                multiple: true
            }]
        );
        t.remove_queue(&"c");
        assert_eq!(
            t.drain(),
            [Ack {
                tag: 3,
                multiple: false
            }]
        );
        assert_eq!(t.smallest_unconfirmed(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish(u8),
        Confirm(usize, u8),
        Reject(usize),
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4).prop_map(Op::Publish),
            4 => (any::<usize>(), 0u8..3).prop_map(|(i, q)| Op::Confirm(i, q)),
            1 => any::<usize>().prop_map(Op::Reject),
            2 => Just(Op::Drain),
        ]
    }

    /// Applies frames the way a client does and checks that each settles only tags that are
    /// settled on our side with the same outcome, each exactly once.
    fn apply(
        frames: &[ConfirmFrame],
        client_pending: &mut BTreeSet<u64>,
        outcome: &BTreeMap<u64, bool>,
    ) {
        for f in frames {
            let (tag, multiple, ack) = match *f {
                Ack { tag, multiple } => (tag, multiple, true),
                Nack { tag, multiple } => (tag, multiple, false),
            };
            let covered: Vec<u64> = if multiple {
                client_pending.range(..=tag).copied().collect()
            } else {
                vec![tag]
            };
            assert!(covered.contains(&tag), "frame for a tag not outstanding");
            for t in covered {
                assert!(client_pending.remove(&t), "settled twice");
                assert_eq!(outcome.get(&t), Some(&ack), "wrong or premature outcome");
            }
        }
    }

    proptest! {
        #[test]
        fn frames_settle_each_publish_once_with_its_outcome(ops in prop::collection::vec(op(), 1..80)) {
            let queues = ["a", "b", "c"];
            let mut t = ConfirmTracker::new();
            let mut routes: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
            let mut outcome: BTreeMap<u64, bool> = BTreeMap::new();
            let mut client_pending = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Publish(n) => {
                        let qs: Vec<&str> = queues[..usize::from(n).min(3)].to_vec();
                        let tag = t.publish(qs.clone());
                        client_pending.insert(tag);
                        if qs.is_empty() { outcome.insert(tag, true); } else { routes.insert(tag, qs); }
                    }
                    Op::Confirm(i, q) => {
                        if routes.is_empty() { continue; }
                        let tag = *routes.keys().nth(i % routes.len()).unwrap();
                        let q = queues[usize::from(q)];
                        let done = t.confirm(tag, &q);
                        let pending = routes.get_mut(&tag).unwrap();
                        pending.retain(|x| *x != q);
                        prop_assert_eq!(done, pending.is_empty());
                        if pending.is_empty() { routes.remove(&tag); outcome.insert(tag, true); }
                    }
                    Op::Reject(i) => {
                        if routes.is_empty() { continue; }
                        let tag = *routes.keys().nth(i % routes.len()).unwrap();
                        prop_assert!(t.reject(tag));
                        routes.remove(&tag);
                        outcome.insert(tag, false);
                    }
                    Op::Drain => apply(&t.drain(), &mut client_pending, &outcome),
                }
                prop_assert_eq!(t.unconfirmed_count(), routes.len());
            }
            apply(&t.drain(), &mut client_pending, &outcome);
            // Whatever is still outstanding on the client is exactly what is still unconfirmed.
            let still: BTreeSet<u64> = routes.keys().copied().collect();
            prop_assert_eq!(client_pending, still);
        }
    }
}
