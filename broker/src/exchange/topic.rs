//! Topic exchange bindings: a trie over the dot-separated words of binding keys, where `*`
//! matches exactly one word and `#` zero or more (`rabbit_exchange_type_topic`), plus a
//! bounded cache of routing key -> destinations.
//!
//! Words follow RabbitMQ's `split_topic_key`: the empty key has no words, every other key has
//! one more word than it has dots, and words may be empty (`"a..b"` is `a`, ``, `b`). A `*`
//! matches an empty word too. Consecutive `#` words are stored as one (`#.#` and `#` match the
//! same keys), which keeps matching from exploding on keys like `#.#.#.#`.
//!
//! Matching walks the trie with an explicit stack, so key length (CC headers can be long) does
//! not grow the call stack, and remembers which `#` nodes it has already tried at which key
//! position, so work stays bounded by trie size times key words.

use crate::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, TryLockError};

use amq_protocol::types::FieldTable;

use super::bound::{Bound, KeyArgs, KeysByDestination};
use super::{BindingRef, Destination};

/// Most routing keys the cache holds; when full it is emptied and refilled, which adapts to a
/// changing working set at the cost of an occasional cold start.
const CACHE_CAPACITY: usize = 4096;
/// Longer keys (only possible through CC/BCC headers) are routed without caching.
const CACHE_MAX_KEY_LEN: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word<'a> {
    Literal(&'a [u8]),
    Star,
    Hash,
}

/// Splits a binding key into trie words, folding runs of `#` into one.
fn binding_words(key: &str) -> Vec<Word<'_>> {
    let mut words = Vec::new();
    if key.is_empty() {
        return words;
    }
    for part in key.as_bytes().split(|b| *b == b'.') {
        let word = match part {
            b"*" => Word::Star,
            b"#" => Word::Hash,
            literal => Word::Literal(literal),
        };
        if !(word == Word::Hash && words.last() == Some(&Word::Hash)) {
            words.push(word);
        }
    }
    words
}

/// The word of `key` starting at byte `at`, and where the next word starts (`None` after the
/// last word).
fn word_at(key: &[u8], at: usize) -> (&[u8], Option<usize>) {
    let rest = key.get(at..).unwrap_or_default();
    match rest.iter().position(|b| *b == b'.') {
        Some(dot) => (rest.get(..dot).unwrap_or_default(), Some(at + dot + 1)),
        None => (rest, None),
    }
}

/// Invariant: apart from the root, every node has a binding or an edge (empty nodes are
/// pruned on unbind).
#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<[u8]>, Node>,
    star: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    bound: Bound<KeyArgs>,
}

impl Node {
    fn edge_count(&self) -> usize {
        self.literal.len() + usize::from(self.star.is_some()) + usize::from(self.hash.is_some())
    }

    fn is_empty(&self) -> bool {
        self.bound.is_empty() && self.edge_count() == 0
    }

    fn child(&self, word: Word<'_>) -> Option<&Node> {
        match word {
            Word::Literal(w) => self.literal.get(w),
            Word::Star => self.star.as_deref(),
            Word::Hash => self.hash.as_deref(),
        }
    }

    fn child_mut(&mut self, word: Word<'_>) -> Option<&mut Node> {
        match word {
            Word::Literal(w) => self.literal.get_mut(w),
            Word::Star => self.star.as_deref_mut(),
            Word::Hash => self.hash.as_deref_mut(),
        }
    }

    fn child_or_insert(&mut self, word: Word<'_>) -> &mut Node {
        match word {
            Word::Literal(w) => self.literal.entry(w.into()).or_default(),
            Word::Star => self.star.get_or_insert_with(Box::default),
            Word::Hash => self.hash.get_or_insert_with(Box::default),
        }
    }

    fn remove_child(&mut self, word: Word<'_>) {
        match word {
            Word::Literal(w) => {
                self.literal.remove(w);
            }
            Word::Star => self.star = None,
            Word::Hash => self.hash = None,
        }
    }

    fn descend_mut(&mut self, words: &[Word<'_>]) -> Option<&mut Node> {
        let mut node = self;
        for word in words {
            node = node.child_mut(*word)?;
        }
        Some(node)
    }
}

/// Cached routing results, valid for one generation of the trie.
#[derive(Debug, Default)]
struct RouteCache {
    generation: u64,
    entries: HashMap<Box<[u8]>, Box<[Destination]>>,
}

/// Invariants: `len` counts the bindings in the trie; `keys_by_destination` lists, per
/// destination, the keys (as bound) it has bindings under; `generation` changes on every
/// change to the trie, and cache entries are used only while the cache's generation equals it.
///
/// `route` takes `&self` (publishers route under the vhost's read lock), so the cache sits
/// behind a mutex that is only ever `try_lock`ed: a publisher that finds it busy walks the
/// trie instead of waiting. Mutations only bump `generation` (they hold `&mut self`, so no
/// route runs meanwhile); the next route clears stale entries, keeping write-locked work O(1).
#[derive(Debug, Default)]
pub struct TopicBindings {
    root: Node,
    keys_by_destination: KeysByDestination,
    len: usize,
    generation: u64,
    cache: Mutex<RouteCache>,
}

impl TopicBindings {
    /// Adds a binding; `false` when the identical binding already exists.
    pub fn bind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let key: Arc<str> = Arc::from(routing_key);
        let mut node = &mut self.root;
        for word in binding_words(routing_key) {
            node = node.child_or_insert(word);
        }
        let added = node
            .bound
            .insert(destination, routing_key, arguments, || KeyArgs {
                routing_key: key.clone(),
                arguments: arguments.clone(),
            });
        if added {
            self.keys_by_destination.add(destination, &key);
            self.len += 1;
            self.generation = self.generation.wrapping_add(1);
        }
        added
    }

    /// Removes the identical binding; `false` when there was none.
    pub fn unbind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let words = binding_words(routing_key);
        let Some(node) = self.root.descend_mut(&words) else {
            return false;
        };
        if !node.bound.remove(destination, routing_key, arguments) {
            return false;
        }
        if !node.bound.contains_key(destination, routing_key) {
            self.keys_by_destination.remove(destination, routing_key);
        }
        self.prune(&words);
        self.len -= 1;
        self.generation = self.generation.wrapping_add(1);
        true
    }

    /// Removes every binding to `destination`, returning their keys and arguments.
    pub fn remove_destination(&mut self, destination: &Destination) -> Vec<(Arc<str>, FieldTable)> {
        let mut removed = Vec::new();
        for key in self.keys_by_destination.take(destination) {
            let words = binding_words(&key);
            if let Some(node) = self.root.descend_mut(&words) {
                node.bound.remove_destination(destination, &mut removed);
                self.prune(&words);
            }
        }
        if !removed.is_empty() {
            self.len -= removed.len();
            self.generation = self.generation.wrapping_add(1);
        }
        removed
    }

    /// Drops the nodes along `words` that no longer hold a binding or lead to one.
    fn prune(&mut self, words: &[Word<'_>]) {
        // The cut goes below the deepest node on the path that must stay: the root, or one
        // with bindings, or one with another edge. Nodes under it on the path have a single
        // edge and no bindings, so they go with the cut edge if the last one is empty.
        let mut node = &self.root;
        let mut keep_depth = 0;
        for (depth, word) in words.iter().enumerate() {
            if !node.bound.is_empty() || node.edge_count() > 1 {
                keep_depth = depth;
            }
            match node.child(*word) {
                Some(child) => node = child,
                None => return,
            }
        }
        if !node.is_empty() {
            return;
        }
        let (Some(cut), Some(kept)) = (words.get(keep_depth), words.get(..keep_depth)) else {
            return;
        };
        if let Some(parent) = self.root.descend_mut(kept) {
            parent.remove_child(*cut);
        }
    }

    /// Appends the destinations whose binding keys match `routing_key`, each once.
    pub fn route(&self, routing_key: &[u8], out: &mut Vec<Destination>) {
        if self.len == 0 {
            return;
        }
        if let Some(mut cache) = self.lock_cache() {
            if cache.generation != self.generation {
                cache.entries.clear();
                cache.generation = self.generation;
            }
            if let Some(hit) = cache.entries.get(routing_key) {
                out.extend(hit.iter().cloned());
                return;
            }
        }
        let mut found = Vec::new();
        self.walk(routing_key, &mut found);
        found.sort_unstable();
        found.dedup();
        out.extend(found.iter().cloned());
        if routing_key.len() <= CACHE_MAX_KEY_LEN {
            if let Some(mut cache) = self.lock_cache() {
                if cache.entries.len() >= CACHE_CAPACITY {
                    cache.entries.clear();
                }
                cache
                    .entries
                    .insert(routing_key.into(), found.into_boxed_slice());
            }
        }
    }

    /// The cache if nobody else holds it. A panic while holding it cannot leave the map
    /// inconsistent, so a poisoned lock is used as is.
    fn lock_cache(&self) -> Option<std::sync::MutexGuard<'_, RouteCache>> {
        match self.cache.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Appends matching destinations, possibly repeated.
    fn walk(&self, key: &[u8], out: &mut Vec<Destination>) {
        /// A node and where the unmatched words of the key start (`None`: no words left).
        enum Step<'n> {
            /// Match the remaining words against the node's bindings and edges.
            Match(&'n Node, Option<usize>),
            /// The node is behind a `#`: match from here after skipping any number of words.
            Skip(&'n Node, Option<usize>),
        }
        let start = if key.is_empty() { None } else { Some(0) };
        let mut stack = vec![Step::Match(&self.root, start)];
        let mut skipped: HashSet<(*const Node, Option<usize>)> = HashSet::default();
        while let Some(step) = stack.pop() {
            match step {
                Step::Match(node, None) => {
                    out.extend(node.bound.destinations().cloned());
                    if let Some(hash) = node.hash.as_deref() {
                        stack.push(Step::Skip(hash, None));
                    }
                }
                Step::Match(node, Some(at)) => {
                    let (word, next) = word_at(key, at);
                    if let Some(child) = node.literal.get(word) {
                        stack.push(Step::Match(child, next));
                    }
                    if let Some(star) = node.star.as_deref() {
                        stack.push(Step::Match(star, next));
                    }
                    if let Some(hash) = node.hash.as_deref() {
                        stack.push(Step::Skip(hash, Some(at)));
                    }
                }
                Step::Skip(node, at) => {
                    if !skipped.insert((node as *const Node, at)) {
                        continue;
                    }
                    stack.push(Step::Match(node, at));
                    if let Some(at) = at {
                        stack.push(Step::Skip(node, word_at(key, at).1));
                    }
                }
            }
        }
    }

    pub fn bindings(&self) -> Vec<BindingRef<'_>> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            node.bound.append_refs(&mut out);
            stack.extend(node.literal.values());
            stack.extend(node.star.as_deref());
            stack.extend(node.hash.as_deref());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn routed(b: &TopicBindings, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        b.route(key.as_bytes(), &mut out);
        let names: Vec<String> = out.iter().map(|d| d.name().to_owned()).collect();
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(
            unique.len(),
            names.len(),
            "duplicates for {key:?}: {names:?}"
        );
        let mut names = names;
        names.sort();
        names
    }

    fn bind_all(patterns: &[&str]) -> TopicBindings {
        let mut b = TopicBindings::default();
        for p in patterns {
            b.bind(&q(p), p, &FieldTable::default());
        }
        b
    }

    /// RabbitMQ's split_topic_key.
    fn split(key: &str) -> Vec<&str> {
        if key.is_empty() {
            Vec::new()
        } else {
            key.split('.').collect()
        }
    }

    fn naive(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|i| naive(rest, &key[i..])),
            Some((word, rest)) => match key.split_first() {
                Some((k, krest)) => (*word == "*" || word == k) && naive(rest, krest),
                None => false,
            },
        }
    }

    fn expected(patterns: &[&str], key: &str) -> Vec<String> {
        let set: BTreeSet<String> = patterns
            .iter()
            .filter(|p| naive(&split(p), &split(key)))
            .map(|p| (*p).to_owned())
            .collect();
        set.into_iter().collect()
    }

    #[test]
    fn classic_cases() {
        let patterns = [
            "a.b.c", "a.*.c", "a.#", "#", "*", "a.#.c", "#.c", "*.*", "", "#.#", "a.#.#.c", "a..c",
            "a.", ".", "*.", "#.b.#",
        ];
        let b = bind_all(&patterns);
        for key in [
            "", "a", "a.b", "a.b.c", "a.c", "a..c", "a.x.y.c", "c", "b", "a.", ".", "..", "x.b.y",
            "a.b.c.d", "#", "*",
        ] {
            assert_eq!(routed(&b, key), expected(&patterns, key), "key {key:?}");
        }
    }

    #[test]
    fn empty_key_and_empty_words() {
        let b = bind_all(&["", "*", "#", "*.*"]);
        // The empty key has no words: only "" and "#" match it.
        assert_eq!(routed(&b, ""), vec!["", "#"]);
        // "." is two empty words.
        assert_eq!(routed(&b, "."), vec!["#", "*.*"]);
        assert_eq!(routed(&b, "x"), vec!["#", "*"]);
    }

    #[test]
    fn unbind_prunes_and_keeps_siblings() {
        let mut b = bind_all(&["a.b.c", "a.b", "a.#.c"]);
        let none = FieldTable::default();
        assert!(b.unbind(&q("a.b.c"), "a.b.c", &none));
        assert!(!b.unbind(&q("a.b.c"), "a.b.c", &none));
        assert_eq!(routed(&b, "a.b.c"), vec!["a.#.c"]);
        assert_eq!(routed(&b, "a.b"), vec!["a.b"]);
        assert!(b.unbind(&q("a.b"), "a.b", &none));
        assert!(b.unbind(&q("a.#.c"), "a.#.c", &none));
        assert!(b.is_empty());
        assert!(b.root.is_empty());
    }

    #[test]
    fn collapsed_hashes_keep_their_own_identity() {
        let mut b = TopicBindings::default();
        let none = FieldTable::default();
        assert!(b.bind(&q("q"), "a.#.#", &none));
        assert!(b.bind(&q("q"), "a.#", &none));
        assert_eq!(b.len(), 2);
        assert_eq!(routed(&b, "a"), vec!["q"]);
        let keys: BTreeSet<&str> = b.bindings().iter().map(|r| r.routing_key).collect();
        assert_eq!(keys, BTreeSet::from(["a.#", "a.#.#"]));
        assert!(b.unbind(&q("q"), "a.#", &none));
        assert_eq!(routed(&b, "a.x"), vec!["q"]);
        assert_eq!(b.remove_destination(&q("q")).len(), 1);
        assert!(b.root.is_empty());
    }

    #[test]
    fn cache_is_invalidated_by_bind_and_unbind() {
        let mut b = bind_all(&["a.*"]);
        let none = FieldTable::default();
        assert_eq!(routed(&b, "a.b"), vec!["a.*"]);
        // Cached now; a new binding must show up.
        assert_eq!(routed(&b, "a.b"), vec!["a.*"]);
        b.bind(&q("a.b"), "a.b", &none);
        assert_eq!(routed(&b, "a.b"), vec!["a.*", "a.b"]);
        b.unbind(&q("a.*"), "a.*", &none);
        assert_eq!(routed(&b, "a.b"), vec!["a.b"]);
        b.remove_destination(&q("a.b"));
        assert!(routed(&b, "a.b").is_empty());
    }

    #[test]
    fn busy_cache_is_skipped() {
        let b = bind_all(&["a.#"]);
        let guard = b.cache.lock().unwrap();
        assert_eq!(routed(&b, "a.b"), vec!["a.#"]);
        drop(guard);
        assert_eq!(routed(&b, "a.b"), vec!["a.#"]);
    }

    #[test]
    fn many_hashes_and_long_keys_stay_cheap() {
        // Without remembering tried `#` positions this would take C(2000, 20) steps.
        let pattern = format!("{}.b", vec!["#"; 20].join(".a."));
        let b = bind_all(&[pattern.as_str()]);
        let key = vec!["a"; 2000].join(".");
        assert!(routed(&b, &key).is_empty());
        assert_eq!(routed(&b, &format!("{key}.b")), vec![pattern.clone()]);
        // A very long key (as a CC header may carry) does not deepen the call stack.
        let b = bind_all(&["#.z", "*.#"]);
        let key = format!("{}.z", vec![""; 200_000].join("."));
        assert_eq!(routed(&b, &key), vec!["#.z", "*.#"]);
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "*", "#"]), 0..5)
            .prop_map(|words| words.join("."))
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "", "c", "*", "#"]),
            0..6,
        )
        .prop_map(|words| words.join("."))
    }

    proptest! {
        #[test]
        fn trie_matches_naive_model(
            patterns in prop::collection::vec(pattern_strategy(), 0..24),
            keys in prop::collection::vec(key_strategy(), 1..24),
            remove in prop::collection::vec(any::<bool>(), 24),
        ) {
            let unique: BTreeSet<&str> = patterns.iter().map(String::as_str).collect();
            let refs: Vec<&str> = unique.into_iter().collect();
            let mut b = bind_all(&refs);
            for key in &keys {
                prop_assert_eq!(routed(&b, key), expected(&refs, key));
                // Again, now from the cache.
                prop_assert_eq!(routed(&b, key), expected(&refs, key));
            }
            let mut kept = Vec::new();
            for (n, p) in refs.iter().enumerate() {
                if remove.get(n).copied().unwrap_or(false) {
                    b.unbind(&q(p), p, &FieldTable::default());
                } else {
                    kept.push(*p);
                }
            }
            for key in &keys {
                prop_assert_eq!(routed(&b, key), expected(&kept, key));
            }
            let listed: BTreeSet<String> =
                b.bindings().iter().map(|r| r.routing_key.to_owned()).collect();
            let kept_set: BTreeSet<String> = kept.iter().map(|p| (*p).to_owned()).collect();
            prop_assert_eq!(listed, kept_set);
            for p in &kept {
                b.remove_destination(&q(p));
            }
            prop_assert!(b.is_empty());
            prop_assert!(b.root.is_empty());
        }
    }
}
