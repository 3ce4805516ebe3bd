//! The de-duplicated set of queue names one publish routes to, built to be cleared and
//! refilled on every publish without allocating once its buffers have grown.

use std::sync::Arc;

use super::Destination;

#[derive(Debug, Clone)]
enum Entry {
    /// A queue named by a binding: sharing the binding's name costs a reference count.
    Bound(Arc<str>),
    /// A queue named by a routing key on the default exchange: the name is a range of
    /// `RouteSet::names`, so routing by queue name allocates nothing.
    Keyed { start: usize, end: usize },
}

impl Entry {
    fn name<'a>(&'a self, names: &'a str) -> &'a str {
        match self {
            Entry::Bound(name) => name,
            Entry::Keyed { start, end } => names.get(*start..*end).unwrap_or_default(),
        }
    }
}

/// Queue names a message is routed to, each once, in name order.
///
/// Fill it with [`Topology::route`](super::Topology::route) (once, or once per call for
/// several calls into the same set; each call keeps the set de-duplicated), read it with
/// [`RouteSet::iter`], then [`RouteSet::clear`] it for the next publish.
///
/// Invariant: between calls into it, `entries` is sorted by name with no repeated name, and
/// every `Keyed` range lies on character boundaries inside `names`.
#[derive(Debug, Default)]
pub struct RouteSet {
    entries: Vec<Entry>,
    names: String,
    /// Per-exchange routing results while a route is in progress (kept for its capacity).
    pub(super) scratch: Vec<Destination>,
}

impl RouteSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the set, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.names.clear();
        self.scratch.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The queue names, in name order, each once.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.name(&self.names))
    }

    pub fn contains(&self, queue: &str) -> bool {
        self.entries
            .binary_search_by(|e| e.name(&self.names).cmp(queue))
            .is_ok()
    }

    /// Keeps only the queues for which `keep` is true, e.g. to drop names that the default
    /// exchange produced for queues that do not exist.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let names = &self.names;
        self.entries.retain(|e| keep(e.name(names)));
    }

    pub(super) fn push_bound(&mut self, queue: &Arc<str>) {
        self.entries.push(Entry::Bound(queue.clone()));
    }

    pub(super) fn push_keyed(&mut self, queue: &str) {
        let start = self.names.len();
        self.names.push_str(queue);
        self.entries.push(Entry::Keyed {
            start,
            end: self.names.len(),
        });
    }

    /// Restores the invariant after pushes.
    pub(super) fn finish(&mut self) {
        let names = &self.names;
        self.entries
            .sort_unstable_by(|a, b| a.name(names).cmp(b.name(names)));
        self.entries.dedup_by(|a, b| a.name(names) == b.name(names));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn dedups_and_sorts_across_both_kinds_of_entry() {
        let mut set = RouteSet::new();
        set.push_bound(&Arc::from("b"));
        set.push_keyed("a");
        set.push_keyed("b");
        set.push_bound(&Arc::from("a"));
        set.finish();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(set.contains("a"));
        assert!(!set.contains("c"));
        set.push_keyed("c");
        set.finish();
        assert_eq!(set.len(), 3);
        set.retain(|q| q != "b");
        assert_eq!(set.iter().collect::<Vec<_>>(), vec!["a", "c"]);
        set.clear();
        assert!(set.is_empty());
    }
}
