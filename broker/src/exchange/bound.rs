//! The set of bindings under one routing index entry, grouped by destination: each destination
//! with the distinct (routing key, arguments) variants it is bound with.
//!
//! A binding's identity in RabbitMQ is (source, destination, key, arguments), so one queue can
//! be bound twice under the same key with different arguments. Routing wants each destination
//! once; listing and unbinding want every variant. Grouping by destination gives both.

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::{term, BindingRef, Destination};

/// What distinguishes two bindings to the same destination.
pub(crate) trait Variant {
    fn routing_key(&self) -> &Arc<str>;
    fn arguments(&self) -> &FieldTable;

    fn same(&self, routing_key: &str, arguments: &FieldTable) -> bool {
        &**self.routing_key() == routing_key && term::same_table(self.arguments(), arguments)
    }
}

/// The variant the key-routed kinds store: the key as bound and its arguments.
#[derive(Debug, Clone)]
pub(crate) struct KeyArgs {
    pub routing_key: Arc<str>,
    pub arguments: FieldTable,
}

impl Variant for KeyArgs {
    fn routing_key(&self) -> &Arc<str> {
        &self.routing_key
    }
    fn arguments(&self) -> &FieldTable {
        &self.arguments
    }
}

/// Invariants: no destination maps to an empty list; no two variants in one list are the
/// same binding; `len` is the total number of variants.
#[derive(Debug)]
pub(crate) struct Bound<V> {
    map: BTreeMap<Destination, Vec<V>>,
    len: usize,
}

impl<V> Default for Bound<V> {
    fn default() -> Self {
        Bound {
            map: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<V: Variant> Bound<V> {
    /// Adds the binding unless an identical one exists; `make` builds the variant only when
    /// it is new. Returns whether it was added.
    pub fn insert(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
        make: impl FnOnce() -> V,
    ) -> bool {
        if let Some(variants) = self.map.get_mut(destination) {
            if variants.iter().any(|v| v.same(routing_key, arguments)) {
                return false;
            }
            variants.push(make());
        } else {
            self.map.insert(destination.clone(), vec![make()]);
        }
        self.len += 1;
        true
    }

    /// Removes the identical binding; returns whether there was one.
    pub fn remove(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let Some(variants) = self.map.get_mut(destination) else {
            return false;
        };
        let Some(at) = variants.iter().position(|v| v.same(routing_key, arguments)) else {
            return false;
        };
        variants.swap_remove(at);
        if variants.is_empty() {
            self.map.remove(destination);
        }
        self.len -= 1;
        true
    }

    /// Removes every binding to `destination`, appending their keys and arguments to `out`.
    pub fn remove_destination(
        &mut self,
        destination: &Destination,
        out: &mut Vec<(Arc<str>, FieldTable)>,
    ) {
        if let Some(variants) = self.map.remove(destination) {
            self.len -= variants.len();
            out.extend(
                variants
                    .into_iter()
                    .map(|v| (v.routing_key().clone(), v.arguments().clone())),
            );
        }
    }

    pub fn contains(&self, destination: &Destination) -> bool {
        self.map.contains_key(destination)
    }

    /// Whether `destination` has a binding whose key, as bound, is `routing_key`.
    pub fn contains_key(&self, destination: &Destination, routing_key: &str) -> bool {
        self.map
            .get(destination)
            .is_some_and(|vs| vs.iter().any(|v| &**v.routing_key() == routing_key))
    }

    pub fn destinations(&self) -> impl Iterator<Item = &Destination> {
        self.map.keys()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&Destination, &[V])> {
        self.map.iter().map(|(d, v)| (d, v.as_slice()))
    }

    pub fn append_refs<'a>(&'a self, out: &mut Vec<BindingRef<'a>>) {
        for (destination, variants) in &self.map {
            out.extend(variants.iter().map(|v| BindingRef {
                destination,
                routing_key: v.routing_key(),
                arguments: v.arguments(),
            }));
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which routing keys each destination is bound under, so removing a destination (a queue
/// being deleted) touches only its own entries instead of scanning the whole index.
///
/// Invariant: a destination is listed with a key exactly when the index holds at least one
/// binding of it under that key; keys in a list are distinct; no list is empty.
#[derive(Debug, Default)]
pub(crate) struct KeysByDestination {
    map: std::collections::HashMap<Destination, Vec<Arc<str>>>,
}

impl KeysByDestination {
    pub fn add(&mut self, destination: &Destination, routing_key: &Arc<str>) {
        match self.map.get_mut(destination) {
            Some(keys) => {
                if !keys.iter().any(|k| k == routing_key) {
                    keys.push(routing_key.clone());
                }
            }
            None => {
                self.map
                    .insert(destination.clone(), vec![routing_key.clone()]);
            }
        }
    }

    /// Call when the destination has no binding left under `routing_key`.
    pub fn remove(&mut self, destination: &Destination, routing_key: &str) {
        if let Some(keys) = self.map.get_mut(destination) {
            keys.retain(|k| &**k != routing_key);
            if keys.is_empty() {
                self.map.remove(destination);
            }
        }
    }

    pub fn take(&mut self, destination: &Destination) -> Vec<Arc<str>> {
        self.map.remove(destination).unwrap_or_default()
    }
}
