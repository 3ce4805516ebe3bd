//! One vhost's exchanges and bindings: declare / delete / bind / unbind with RabbitMQ 3.10's
//! checks and reply texts, auto-delete cascades, and routing a publish to a set of queues.

use crate::collections::HashMap;
use std::borrow::Cow;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

use super::{
    strip_cr_lf, term, BindingInfo, Destination, Exchange, ExchangeKind, RouteSet,
    ALTERNATE_EXCHANGE,
};
use crate::error::{resource, AmqpError};

/// What exchange.declare did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclareOutcome {
    Created,
    /// The exchange existed (and, for a non-passive declare, was equivalent).
    Existed,
}

/// What a deletion, unbind or queue removal took away, for the caller to mirror in durable
/// storage and in events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Removed {
    /// Exchanges deleted: the one asked for first, then auto-delete cascades.
    pub exchanges: Vec<Arc<str>>,
    /// Every binding removed along the way.
    pub bindings: Vec<BindingInfo>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty() && self.bindings.is_empty()
    }
}

/// Exchanges predeclared in every vhost, as `rabbit_vhost` declares them: name, kind,
/// internal. All are durable and not auto-delete.
const PREDECLARED: &[(&str, ExchangeKind, bool)] = &[
    ("", ExchangeKind::Direct, false),
    ("amq.direct", ExchangeKind::Direct, false),
    ("amq.fanout", ExchangeKind::Fanout, false),
    ("amq.topic", ExchangeKind::Topic, false),
    ("amq.headers", ExchangeKind::Headers, false),
    ("amq.match", ExchangeKind::Headers, false),
    ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
];

const DEFAULT_EXCHANGE_REFUSED: &str = "operation not permitted on the default exchange";

/// The exchanges of one vhost and every binding whose source is one of them.
///
/// The default exchange `""` is a real (direct, durable) exchange here so that it is listed,
/// declared passively and refused for changes like RabbitMQ's; it holds no bindings.
/// Publishing to it routes to the queue named by each routing key *without* knowing whether
/// that queue exists: the caller drops names of missing queues from the [`RouteSet`] (with
/// [`RouteSet::retain`]), and a message left with no queue is unroutable. The caller also
/// handles `amq.rabbitmq.reply-to.*` keys (direct reply-to) before routing.
///
/// Queues are not owned here. Callers check that a queue exists (and may be used by the
/// connection) before binding it, and call [`Topology::remove_queue`] when one is deleted.
///
/// Invariant: `inbound[d][s]` is the number of bindings from exchange `s` to destination `d`,
/// present exactly when non-zero, and no `inbound[d]` is empty.
///
/// All methods are synchronous and short; keep the topology behind an `RwLock`, routing under
/// the read lock.
#[derive(Debug)]
pub struct Topology {
    vhost: Arc<str>,
    exchanges: HashMap<Arc<str>, Exchange>,
    inbound: HashMap<Destination, HashMap<Arc<str>, usize>>,
}

impl Topology {
    /// A vhost's topology with its predeclared exchanges.
    pub fn new(vhost: impl Into<Arc<str>>) -> Self {
        let mut exchanges = HashMap::default();
        for (name, kind, internal) in PREDECLARED {
            let name: Arc<str> = Arc::from(*name);
            exchanges.insert(
                name.clone(),
                Exchange::new(name, *kind, true, false, *internal, FieldTable::default()),
            );
        }
        Topology {
            vhost: vhost.into(),
            exchanges,
            inbound: HashMap::default(),
        }
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.get(name)
    }

    /// Every exchange, the default one included, in no particular order.
    pub fn exchanges(&self) -> impl Iterator<Item = &Exchange> {
        self.exchanges.values()
    }

    /// exchange.declare (the broker has already checked permissions).
    ///
    /// Passive: only checks existence (the type is not looked at). Otherwise, in RabbitMQ's
    /// order: the type must be known (503, before anything else), the default exchange cannot
    /// be declared (403); an existing exchange must be equivalent (406); a new one cannot have
    /// an `amq.` name (403) and its `alternate-exchange` must be a string (406).
    #[allow(clippy::too_many_arguments)]
    pub fn declare_exchange(
        &mut self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<DeclareOutcome, AmqpError> {
        if passive {
            let name = strip_cr_lf(name);
            if name.is_empty() {
                return Err(AmqpError::access_refused(DEFAULT_EXCHANGE_REFUSED));
            }
            return match self.exchanges.contains_key(&*name) {
                true => Ok(DeclareOutcome::Existed),
                false => Err(self.no_exchange(&name)),
            };
        }
        let kind = ExchangeKind::parse(kind)?;
        let name = strip_cr_lf(name);
        if name.is_empty() {
            return Err(AmqpError::access_refused(DEFAULT_EXCHANGE_REFUSED));
        }
        if let Some(existing) = self.exchanges.get(&*name) {
            self.assert_equivalence(existing, kind, durable, auto_delete, internal, arguments)?;
            return Ok(DeclareOutcome::Existed);
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        if let Some(ae) = arguments.inner().get(ALTERNATE_EXCHANGE) {
            if !matches!(ae, AMQPValue::LongString(_) | AMQPValue::ShortString(_)) {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid type '{}' for arg '{ALTERNATE_EXCHANGE}' in {}",
                    term::type_name(ae),
                    self.rs(&name)
                )));
            }
        }
        let name: Arc<str> = Arc::from(name.as_ref());
        let exchange = Exchange::new(
            name.clone(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments.clone(),
        );
        self.exchanges.insert(name, exchange);
        Ok(DeclareOutcome::Created)
    }

    /// `rabbit_exchange:assert_equivalence`: type, durable, auto_delete, internal, then the
    /// `alternate-exchange` argument; other arguments are not compared.
    fn assert_equivalence(
        &self,
        x: &Exchange,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<(), AmqpError> {
        let fail = |key: &str, received: String, current: String| {
            AmqpError::precondition_failed(format!(
                "inequivalent arg '{key}' for {}: received {received} but current is {current}",
                self.rs(&x.name)
            ))
        };
        if x.kind != kind {
            return Err(fail("type", format!("'{kind}'"), format!("'{}'", x.kind)));
        }
        for (key, current, requested) in [
            ("durable", x.durable, durable),
            ("auto_delete", x.auto_delete, auto_delete),
            ("internal", x.internal, internal),
        ] {
            if current != requested {
                return Err(fail(key, format!("'{requested}'"), format!("'{current}'")));
            }
        }
        let current = x.arguments.inner().get(ALTERNATE_EXCHANGE);
        let requested = arguments.inner().get(ALTERNATE_EXCHANGE);
        match (current, requested) {
            (None, None) => Ok(()),
            (Some(c), Some(r)) => {
                let same_class = term::type_class(c) == term::type_class(r);
                if (same_class && term::loose_eq(c, r)) || term::exact_eq(c, r) {
                    Ok(())
                } else {
                    Err(fail(
                        ALTERNATE_EXCHANGE,
                        term::format_val(r),
                        term::format_val(c),
                    ))
                }
            }
            (c, r) => {
                let val =
                    |v: Option<&AMQPValue>| v.map_or("none".to_owned(), term::format_typed_val);
                Err(fail(ALTERNATE_EXCHANGE, val(r), val(c)))
            }
        }
    }

    /// exchange.delete. Deleting a missing exchange succeeds; `amq.*` and the default
    /// exchange cannot be deleted (403); `if_unused` refuses an exchange that is the source of
    /// bindings (406). Removes the bindings it is source or destination of, and auto-delete
    /// exchanges left without bindings by that.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<Removed, AmqpError> {
        let name = strip_cr_lf(name);
        if name.is_empty() {
            return Err(AmqpError::access_refused(DEFAULT_EXCHANGE_REFUSED));
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system {} not allowed",
                self.rs(&name)
            )));
        }
        let Some(exchange) = self.exchanges.get(&*name) else {
            return Ok(Removed::default());
        };
        if if_unused && !exchange.bindings().is_empty() {
            return Err(AmqpError::precondition_failed(format!(
                "{} in use",
                self.rs(&name)
            )));
        }
        let mut removed = Removed::default();
        let doomed = vec![exchange.name.clone()];
        self.delete_cascading(doomed, &mut removed);
        Ok(removed)
    }

    /// The checks exchange.bind / queue.bind make before looking at the destination queue:
    /// neither end may be the default exchange (403), the source and a destination exchange
    /// must exist (404, source first). Calling this before checking the queue, then
    /// [`Topology::bind`], reproduces RabbitMQ's error precedence.
    pub fn check_bind(&self, source: &str, destination: &Destination) -> Result<(), AmqpError> {
        let source = strip_cr_lf(source);
        let destination = clean_destination(destination);
        if source.is_empty()
            || matches!(&*destination, Destination::Exchange(name) if name.is_empty())
        {
            return Err(AmqpError::access_refused(DEFAULT_EXCHANGE_REFUSED));
        }
        if !self.exchanges.contains_key(&*source) {
            return Err(self.no_exchange(&source));
        }
        if let Destination::Exchange(name) = &*destination {
            if !self.exchanges.contains_key(name) {
                return Err(self.no_exchange(name));
            }
        }
        Ok(())
    }

    /// exchange.bind / queue.bind: [`Topology::check_bind`], then the source kind's argument
    /// validation (headers `x-match`, 406), then adds the binding. `Ok(false)` when the
    /// identical binding existed. A queue destination must already have been checked by the
    /// caller.
    pub fn bind(
        &mut self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        self.check_bind(source, destination)?;
        let source = strip_cr_lf(source);
        let destination = clean_destination(destination);
        let Some(exchange) = self.exchanges.get_mut(&*source) else {
            return Err(self.no_exchange(&source));
        };
        let added = exchange
            .bindings
            .bind(&destination, routing_key, arguments)?;
        if added {
            let source = exchange.name.clone();
            *self
                .inbound
                .entry(destination.into_owned())
                .or_default()
                .entry(source)
                .or_insert(0) += 1;
        }
        Ok(added)
    }

    /// exchange.unbind / queue.unbind. The default exchange is refused (403); a missing
    /// source, destination or binding is not an error. Removing the last binding of an
    /// auto-delete exchange deletes it (and cascades).
    pub fn unbind(
        &mut self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<Removed, AmqpError> {
        let source = strip_cr_lf(source);
        let destination = clean_destination(destination);
        if source.is_empty()
            || matches!(&*destination, Destination::Exchange(name) if name.is_empty())
        {
            return Err(AmqpError::access_refused(DEFAULT_EXCHANGE_REFUSED));
        }
        let mut removed = Removed::default();
        let Some(exchange) = self.exchanges.get_mut(&*source) else {
            return Ok(removed);
        };
        if !exchange
            .bindings
            .unbind(&destination, routing_key, arguments)
        {
            return Ok(removed);
        }
        let source = exchange.name.clone();
        let now_unused = exchange.auto_delete && exchange.bindings.is_empty();
        self.forget_inbound(&destination, &source, 1);
        removed.bindings.push(BindingInfo {
            source: source.clone(),
            destination: destination.into_owned(),
            routing_key: Arc::from(routing_key),
            arguments: arguments.clone(),
        });
        if now_unused {
            self.delete_cascading(vec![source], &mut removed);
        }
        Ok(removed)
    }

    /// A queue was deleted: drops every binding to it, and auto-delete exchanges left
    /// without bindings.
    pub fn remove_queue(&mut self, queue: &str) -> Removed {
        let mut removed = Removed::default();
        let mut doomed = Vec::new();
        self.detach(
            &Destination::Queue(Arc::from(queue)),
            &mut removed,
            &mut doomed,
        );
        self.delete_cascading(doomed, &mut removed);
        removed
    }

    /// Deletes the `doomed` exchanges and, transitively, auto-delete exchanges whose last
    /// binding goes with them. A work list rather than recursion: chains can be long.
    fn delete_cascading(&mut self, mut doomed: Vec<Arc<str>>, removed: &mut Removed) {
        while let Some(name) = doomed.pop() {
            let Some(exchange) = self.exchanges.remove(&name) else {
                continue;
            };
            for b in exchange.bindings.bindings() {
                self.forget_inbound(b.destination, &exchange.name, 1);
                removed.bindings.push(BindingInfo {
                    source: exchange.name.clone(),
                    destination: b.destination.clone(),
                    routing_key: Arc::from(b.routing_key),
                    arguments: b.arguments.clone(),
                });
            }
            removed.exchanges.push(exchange.name.clone());
            self.detach(
                &Destination::Exchange(exchange.name.clone()),
                removed,
                &mut doomed,
            );
        }
    }

    /// Removes every binding to `destination`, noting auto-delete sources left empty.
    fn detach(
        &mut self,
        destination: &Destination,
        removed: &mut Removed,
        doomed: &mut Vec<Arc<str>>,
    ) {
        let Some(sources) = self.inbound.remove(destination) else {
            return;
        };
        for source in sources.into_keys() {
            let Some(exchange) = self.exchanges.get_mut(&source) else {
                continue;
            };
            for (routing_key, arguments) in exchange.bindings.remove_destination(destination) {
                removed.bindings.push(BindingInfo {
                    source: exchange.name.clone(),
                    destination: destination.clone(),
                    routing_key,
                    arguments,
                });
            }
            if exchange.auto_delete && exchange.bindings.is_empty() {
                doomed.push(exchange.name.clone());
            }
        }
    }

    fn forget_inbound(&mut self, destination: &Destination, source: &str, count: usize) {
        let Some(sources) = self.inbound.get_mut(destination) else {
            return;
        };
        if let Some(n) = sources.get_mut(source) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                sources.remove(source);
            }
        }
        if sources.is_empty() {
            self.inbound.remove(destination);
        }
    }

    /// basic.publish's checks on the exchange: it must exist (404) and not be internal (403).
    pub fn check_publish(&self, exchange: &str) -> Result<&Exchange, AmqpError> {
        let x = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if x.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal {}",
                self.rs(exchange)
            )));
        }
        Ok(x)
    }

    /// Routes a message published to `exchange` with one routing key into `out` (which is
    /// not cleared first). Same as [`Topology::route_keys`] with a single key.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &[u8],
        headers: Option<&FieldTable>,
        out: &mut RouteSet,
    ) -> Result<(), AmqpError> {
        self.route_keys(exchange, &[routing_key], headers, out)
    }

    /// Routes a message published to `exchange` with these routing keys (the publish key, then
    /// the CC and BCC keys) into `out`, which is not cleared first and stays de-duplicated.
    ///
    /// A missing exchange is 404; internal exchanges are the caller's check
    /// ([`Topology::check_publish`]) since bindings do route through them.
    /// Exchange-to-exchange bindings are followed, each exchange visited at most once, so
    /// cycles end. An exchange whose own bindings matched nothing (queues and exchanges alike)
    /// hands the message to its `alternate-exchange`, which may have its own; exchanges
    /// already visited are not revisited, so alternate-exchange cycles end too.
    ///
    /// Pass all of a message's keys in one call: alternate exchanges apply when *no* key
    /// matched, as in RabbitMQ. Routing each key in its own call would also work for the
    /// queue set, except that an alternate exchange would then catch any CC key that matched
    /// nothing even though the message was routed.
    pub fn route_keys(
        &self,
        exchange: &str,
        routing_keys: &[&[u8]],
        headers: Option<&FieldTable>,
        out: &mut RouteSet,
    ) -> Result<(), AmqpError> {
        let origin = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if origin.is_default() {
            for key in routing_keys {
                // Queue names are strings; a key that is not UTF-8 names no queue.
                if let Ok(queue) = std::str::from_utf8(key) {
                    out.push_keyed(queue);
                }
            }
            out.finish();
            return Ok(());
        }
        let mut found = std::mem::take(&mut out.scratch);
        // Exchanges reached so far besides the origin. Exchange graphs are small, so a
        // vector beats a hash set here.
        let mut seen: Vec<&str> = Vec::new();
        let mut pending: Vec<&Exchange> = Vec::new();
        let mut current = Some(origin);
        while let Some(x) = current {
            found.clear();
            x.bindings.route(routing_keys, headers, &mut found);
            if found.is_empty() {
                if let Some(alternate) = x.alternate_exchange() {
                    self.reach(alternate, origin, &mut seen, &mut pending);
                }
            }
            for destination in &found {
                match destination {
                    Destination::Queue(queue) => out.push_bound(queue),
                    Destination::Exchange(name) => {
                        self.reach(name, origin, &mut seen, &mut pending)
                    }
                }
            }
            current = pending.pop();
        }
        found.clear();
        out.scratch = found;
        out.finish();
        Ok(())
    }

    /// Queues `name` for routing unless it was already reached; a missing exchange (a
    /// dangling alternate-exchange name) routes nowhere.
    fn reach<'a>(
        &'a self,
        name: &str,
        origin: &Exchange,
        seen: &mut Vec<&'a str>,
        pending: &mut Vec<&'a Exchange>,
    ) {
        if name == &*origin.name || seen.contains(&name) {
            return;
        }
        if let Some(x) = self.exchanges.get(name) {
            seen.push(&x.name);
            pending.push(x);
        }
    }

    /// Every explicit binding in the vhost. The default exchange's implicit binding to each
    /// queue (key = queue name) is not stored; listings that show it add it from the queues.
    pub fn bindings(&self) -> Vec<BindingInfo> {
        let mut out = Vec::new();
        for x in self.exchanges.values() {
            append_infos(x, |_| true, &mut out);
        }
        out
    }

    /// The bindings whose source is `source` (empty when it does not exist).
    pub fn bindings_for_source(&self, source: &str) -> Vec<BindingInfo> {
        let mut out = Vec::new();
        if let Some(x) = self.exchanges.get(source) {
            append_infos(x, |_| true, &mut out);
        }
        out
    }

    /// The bindings to `destination`, from any exchange.
    pub fn bindings_for_destination(&self, destination: &Destination) -> Vec<BindingInfo> {
        let mut out = Vec::new();
        if let Some(sources) = self.inbound.get(destination) {
            for source in sources.keys() {
                if let Some(x) = self.exchanges.get(source) {
                    append_infos(x, |d| d == destination, &mut out);
                }
            }
        }
        out
    }

    /// `exchange 'x' in vhost '/'`
    fn rs(&self, name: &str) -> String {
        resource("exchange", name, &self.vhost)
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no {}", self.rs(name)))
    }
}

fn append_infos(x: &Exchange, keep: impl Fn(&Destination) -> bool, out: &mut Vec<BindingInfo>) {
    out.extend(
        x.bindings
            .bindings()
            .into_iter()
            .filter(|b| keep(b.destination))
            .map(|b| BindingInfo {
                source: x.name.clone(),
                destination: b.destination.clone(),
                routing_key: Arc::from(b.routing_key),
                arguments: b.arguments.clone(),
            }),
    );
}

fn clean_destination(destination: &Destination) -> Cow<'_, Destination> {
    match strip_cr_lf(destination.name()) {
        Cow::Borrowed(_) => Cow::Borrowed(destination),
        Cow::Owned(name) => Cow::Owned(match destination {
            Destination::Queue(_) => Destination::Queue(name.into()),
            Destination::Exchange(_) => Destination::Exchange(name.into()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
