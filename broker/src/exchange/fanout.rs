//! Fanout exchange bindings: every bound destination gets every message; keys are kept only
//! because they are part of a binding's identity (`rabbit_exchange_type_fanout`).

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::bound::{Bound, KeyArgs};
use super::{BindingRef, Destination};

#[derive(Debug, Default)]
pub struct FanoutBindings {
    bound: Bound<KeyArgs>,
}

impl FanoutBindings {
    /// Adds a binding; `false` when the identical binding already exists.
    pub fn bind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.bound
            .insert(destination, routing_key, arguments, || KeyArgs {
                routing_key: Arc::from(routing_key),
                arguments: arguments.clone(),
            })
    }

    /// Removes the identical binding; `false` when there was none.
    pub fn unbind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.bound.remove(destination, routing_key, arguments)
    }

    /// Appends every bound destination, each once.
    pub fn route(&self, out: &mut Vec<Destination>) {
        out.extend(self.bound.destinations().cloned());
    }

    /// Removes every binding to `destination`, returning their keys and arguments.
    pub fn remove_destination(&mut self, destination: &Destination) -> Vec<(Arc<str>, FieldTable)> {
        let mut removed = Vec::new();
        self.bound.remove_destination(destination, &mut removed);
        removed
    }

    pub fn bindings(&self) -> Vec<BindingRef<'_>> {
        let mut out = Vec::with_capacity(self.bound.len());
        self.bound.append_refs(&mut out);
        out
    }

    pub fn len(&self) -> usize {
        self.bound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    #[test]
    fn routes_to_all_destinations_once() {
        let mut b = FanoutBindings::default();
        let none = FieldTable::default();
        assert!(b.bind(&q("q1"), "", &none));
        assert!(b.bind(&q("q1"), "other", &none));
        assert!(!b.bind(&q("q1"), "other", &none));
        assert!(b.bind(&Destination::Exchange("x".into()), "", &none));
        let mut out = Vec::new();
        b.route(&mut out);
        out.sort();
        assert_eq!(out, vec![q("q1"), Destination::Exchange("x".into())]);
        assert_eq!(b.len(), 3);
        assert_eq!(b.remove_destination(&q("q1")).len(), 2);
        assert!(b.unbind(&Destination::Exchange("x".into()), "", &none));
        assert!(b.is_empty());
        assert!(b.bindings().is_empty());
    }
}
