//! Direct exchange bindings: a message goes to the destinations bound with a key equal to its
//! routing key (`rabbit_exchange_type_direct`).

use crate::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::bound::{Bound, KeyArgs, KeysByDestination};
use super::{BindingRef, Destination};

/// Invariants: no key maps to an empty [`Bound`]; `keys_by_destination` lists exactly the keys
/// under which each destination has a binding.
#[derive(Debug, Default)]
pub struct DirectBindings {
    by_key: HashMap<Arc<str>, Bound<KeyArgs>>,
    keys_by_destination: KeysByDestination,
    len: usize,
}

impl DirectBindings {
    /// Adds a binding; `false` when the identical binding already exists.
    pub fn bind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let key: Arc<str> = match self.by_key.get_key_value(routing_key) {
            Some((key, _)) => key.clone(),
            None => Arc::from(routing_key),
        };
        let bound = self.by_key.entry(key.clone()).or_default();
        let added = bound.insert(destination, routing_key, arguments, || KeyArgs {
            routing_key: key.clone(),
            arguments: arguments.clone(),
        });
        if added {
            self.keys_by_destination.add(destination, &key);
            self.len += 1;
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
        let Some(bound) = self.by_key.get_mut(routing_key) else {
            return false;
        };
        if !bound.remove(destination, routing_key, arguments) {
            return false;
        }
        if !bound.contains(destination) {
            self.keys_by_destination.remove(destination, routing_key);
        }
        if bound.is_empty() {
            self.by_key.remove(routing_key);
        }
        self.len -= 1;
        true
    }

    /// Appends every destination bound with exactly `routing_key`, each once.
    pub fn route(&self, routing_key: &[u8], out: &mut Vec<Destination>) {
        // Binding keys are strings, so a key that is not UTF-8 matches none of them.
        let Ok(key) = std::str::from_utf8(routing_key) else {
            return;
        };
        if let Some(bound) = self.by_key.get(key) {
            out.extend(bound.destinations().cloned());
        }
    }

    /// Removes every binding to `destination`, returning their keys and arguments.
    pub fn remove_destination(&mut self, destination: &Destination) -> Vec<(Arc<str>, FieldTable)> {
        let mut removed = Vec::new();
        for key in self.keys_by_destination.take(destination) {
            if let Some(bound) = self.by_key.get_mut(&key) {
                bound.remove_destination(destination, &mut removed);
                if bound.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        self.len -= removed.len();
        removed
    }

    pub fn bindings(&self) -> Vec<BindingRef<'_>> {
        let mut out = Vec::with_capacity(self.len);
        for bound in self.by_key.values() {
            bound.append_refs(&mut out);
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
    use amq_protocol::types::AMQPValue;

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn routed(b: &DirectBindings, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        b.route(key.as_bytes(), &mut out);
        out.sort();
        out
    }

    #[test]
    fn routes_by_exact_key() {
        let mut b = DirectBindings::default();
        let none = FieldTable::default();
        assert!(b.bind(&q("q1"), "a", &none));
        assert!(b.bind(&q("q2"), "a", &none));
        assert!(b.bind(&q("q1"), "b", &none));
        assert!(!b.bind(&q("q1"), "a", &none));
        assert_eq!(b.len(), 3);
        assert_eq!(routed(&b, "a"), vec![q("q1"), q("q2")]);
        assert_eq!(routed(&b, "b"), vec![q("q1")]);
        assert!(routed(&b, "c").is_empty());
        assert!(routed(&b, "").is_empty());
    }

    #[test]
    fn arguments_distinguish_bindings_but_route_once() {
        let mut b = DirectBindings::default();
        let none = FieldTable::default();
        let mut some = FieldTable::default();
        some.insert("x".into(), AMQPValue::LongInt(1));
        assert!(b.bind(&q("q1"), "a", &none));
        assert!(b.bind(&q("q1"), "a", &some));
        assert_eq!(b.len(), 2);
        assert_eq!(routed(&b, "a"), vec![q("q1")]);
        assert!(b.unbind(&q("q1"), "a", &none));
        assert_eq!(routed(&b, "a"), vec![q("q1")]);
        assert!(!b.unbind(&q("q1"), "a", &none));
        assert!(b.unbind(&q("q1"), "a", &some));
        assert!(b.is_empty());
        assert!(routed(&b, "a").is_empty());
    }

    #[test]
    fn remove_destination_drops_all_its_keys() {
        let mut b = DirectBindings::default();
        let none = FieldTable::default();
        b.bind(&q("q1"), "a", &none);
        b.bind(&q("q1"), "b", &none);
        b.bind(&q("q2"), "a", &none);
        let mut removed = b.remove_destination(&q("q1"));
        removed.sort_by(|x, y| x.0.cmp(&y.0));
        let keys: Vec<&str> = removed.iter().map(|(k, _)| &**k).collect();
        assert_eq!(keys, vec!["a", "b"]);
        assert_eq!(b.len(), 1);
        assert_eq!(routed(&b, "a"), vec![q("q2")]);
        assert!(routed(&b, "b").is_empty());
        assert_eq!(b.bindings().len(), 1);
        assert!(b.remove_destination(&q("q1")).is_empty());
    }
}
