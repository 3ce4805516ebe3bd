//! Values keyed by increasing tags, in tag order: a channel's unacked deliveries (delivery
//! tags) and unconfirmed publishes (publish sequence numbers).
//!
//! Tags are issued in increasing order and are usually settled oldest first (acks with
//! `multiple`, confirms after a group commit), so a sorted `VecDeque` beats a `BTreeMap`:
//! appending and taking from the front cost no allocation and no rebalancing, and a lookup is
//! a binary search. Settling a tag out of order shifts the shorter side, at most the window.

use std::collections::VecDeque;

/// Invariant: tags strictly increase from front to back.
#[derive(Debug)]
pub struct TagMap<T> {
    entries: VecDeque<(u64, T)>,
}

impl<T> Default for TagMap<T> {
    fn default() -> Self {
        TagMap {
            entries: VecDeque::new(),
        }
    }
}

impl<T> TagMap<T> {
    /// Records a delivery. `tag` must be above every tag recorded so far (delivery tags only
    /// grow); a smaller one is inserted in place, to stay correct.
    pub fn insert(&mut self, tag: u64, value: T) {
        match self.entries.back() {
            Some((last, _)) if *last >= tag => {
                let at = self.entries.partition_point(|(t, _)| *t < tag);
                if self.entries.get(at).is_some_and(|(t, _)| *t == tag) {
                    if let Some(slot) = self.entries.get_mut(at) {
                        slot.1 = value;
                    }
                } else {
                    self.entries.insert(at, (tag, value));
                }
            }
            _ => self.entries.push_back((tag, value)),
        }
    }

    pub fn get_mut(&mut self, tag: u64) -> Option<&mut T> {
        let at = self.index_of(tag)?;
        self.entries.get_mut(at).map(|(_, v)| v)
    }

    /// The oldest tag.
    pub fn first_tag(&self) -> Option<u64> {
        self.entries.front().map(|(t, _)| *t)
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.entries.iter().map(|(t, v)| (*t, v))
    }

    pub fn contains(&self, tag: u64) -> bool {
        self.index_of(tag).is_some()
    }

    fn index_of(&self, tag: u64) -> Option<usize> {
        let at = self.entries.partition_point(|(t, _)| *t < tag);
        self.entries.get(at).filter(|(t, _)| *t == tag).map(|_| at)
    }

    /// Removes `tag`.
    pub fn take(&mut self, tag: u64) -> Option<T> {
        let at = self.index_of(tag)?;
        self.entries.remove(at).map(|(_, v)| v)
    }

    /// Removes every tag up to and including `tag`, oldest first.
    pub fn take_through(&mut self, tag: u64) -> impl Iterator<Item = T> + '_ {
        let end = self.entries.partition_point(|(t, _)| *t <= tag);
        self.entries.drain(..end).map(|(_, v)| v)
    }

    /// Removes everything, oldest first.
    pub fn take_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.entries.drain(..).map(|(_, v)| v)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn in_order_and_out_of_order_settles() {
        let mut u = TagMap::default();
        for t in 1..=10u64 {
            u.insert(t, t * 10);
        }
        assert_eq!(u.take(5), Some(50));
        assert_eq!(u.take(5), None);
        assert!(!u.contains(5));
        assert_eq!(
            u.take_through(7).collect::<Vec<_>>(),
            vec![10, 20, 30, 40, 60, 70]
        );
        assert_eq!(u.take_through(3).count(), 0);
        assert_eq!(u.take_all().collect::<Vec<_>>(), vec![80, 90, 100]);
        assert!(u.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Take(u64),
        TakeThrough(u64),
        TakeAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1..4u64).prop_map(Op::Insert),
            2 => (0..60u64).prop_map(Op::Take),
            1 => (0..60u64).prop_map(Op::TakeThrough),
            1 => Just(Op::TakeAll),
        ]
    }

    proptest! {
        /// Behaves as the BTreeMap it replaced, for increasing tags (Insert(d): next tag is
        /// the last one plus d).
        #[test]
        fn matches_a_btreemap(ops in proptest::collection::vec(op(), 1..200)) {
            let mut u = TagMap::default();
            let mut m = BTreeMap::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Insert(d) => {
                        next += d;
                        u.insert(next, next);
                        m.insert(next, next);
                    }
                    Op::Take(t) => prop_assert_eq!(u.take(t), m.remove(&t)),
                    Op::TakeThrough(t) => {
                        let got: Vec<u64> = u.take_through(t).collect();
                        let keys: Vec<u64> = m.range(..=t).map(|(k, _)| *k).collect();
                        let want: Vec<u64> = keys.iter().filter_map(|k| m.remove(k)).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::TakeAll => {
                        let got: Vec<u64> = u.take_all().collect();
                        let want: Vec<u64> = std::mem::take(&mut m).into_values().collect();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(u.len(), m.len());
                for k in m.keys() {
                    prop_assert!(u.contains(*k));
                }
            }
        }
    }
}
