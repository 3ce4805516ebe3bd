//! The routing core: exchange kinds, their binding sets, and the per-vhost [`Topology`] of
//! exchanges and bindings that decides which queues a published message reaches.
//!
//! Everything here is synchronous and does no I/O. The broker keeps one [`Topology`] per vhost
//! behind a `std::sync::RwLock`: publishing routes under the read lock ([`Topology::route`]
//! takes `&self`), declare / delete / bind / unbind take the write lock. Semantics and reply
//! texts follow RabbitMQ 3.10 (`rabbit_exchange`, `rabbit_binding`, `rabbit_channel`,
//! `rabbit_exchange_type_*`).

mod bound;
pub mod direct;
pub mod fanout;
pub mod headers;
mod route_set;
pub mod term;
pub mod topic;
mod topology;

use std::borrow::Cow;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::error::AmqpError;

pub use direct::DirectBindings;
pub use fanout::FanoutBindings;
pub use headers::{HeadersBindings, XMatch};
pub use route_set::RouteSet;
pub use topic::TopicBindings;
pub use topology::{DeclareOutcome, Removed, Topology};

/// The argument naming an exchange's alternate exchange.
pub const ALTERNATE_EXCHANGE: &str = "alternate-exchange";

/// The four exchange types RabbitMQ ships (`x-` plugin types are not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

/// Type names that are existing atoms in a RabbitMQ node but not exchange types: for them
/// `rabbit_exchange:check_type/1` says "invalid" where any other unknown name gets "unknown"
/// (it converts the name with `binary_to_existing_atom`). The real set is the node's whole
/// atom table; these are the names measured as "invalid" against RabbitMQ 3.10.8, a sample of
/// words clients and test suites actually send. Sorted, for binary search.
#[rustfmt::skip]
const NON_TYPE_ATOMS: &[&str] = &[
    "", "a", "all", "amqp", "any", "b", "bad", "badtype", "bar", "basic", "broadcast", "c",
    "classic", "consistent", "consume", "d", "default", "delay", "dummy", "durable", "e",
    "error", "event", "events", "exchange", "exclusive", "f", "false", "federation", "foo", "g",
    "h", "header", "hello", "i", "internal", "invalid", "invalid_type", "j", "json", "k", "key",
    "l", "lazy", "local", "m", "match", "message", "messages", "n", "name", "nil", "none",
    "normal", "not_found", "null", "ok", "ordered", "other", "p", "priority", "publish", "q",
    "queue", "quorum", "r", "rabbit", "random", "reply", "rpc", "s", "simple", "stream",
    "string", "system", "t", "test", "trace", "transient", "true", "type", "u", "undefined",
    "unknown", "user", "v", "value", "w", "work", "world", "x", "y", "z",
];

impl ExchangeKind {
    /// Parses the `type` field of exchange.declare.
    ///
    /// RabbitMQ 3.10 rejects an unknown type with 503 COMMAND_INVALID, closing the connection
    /// (3.13+ made it a 406; clients written against 3.10 expect the 503).
    pub fn parse(type_name: &str) -> Result<Self, AmqpError> {
        match type_name {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other if NON_TYPE_ATOMS.binary_search(&other).is_ok() => Err(
                AmqpError::command_invalid(format!("invalid exchange type '{other}'")),
            ),
            other => Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{other}'"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl std::fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a binding delivers: a queue, or another exchange (exchange-to-exchange binding).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(name) | Destination::Exchange(name) => name,
        }
    }

    /// `queue` or `exchange`, as RabbitMQ names the kind in texts and listings.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Destination::Queue(_) => "queue",
            Destination::Exchange(_) => "exchange",
        }
    }
}

/// A binding as stored in one exchange's binding set (the source is the exchange).
#[derive(Debug, Clone, Copy)]
pub struct BindingRef<'a> {
    pub destination: &'a Destination,
    pub routing_key: &'a str,
    pub arguments: &'a FieldTable,
}

/// An owned binding with its source, for listings and for reporting removals.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingInfo {
    pub source: Arc<str>,
    pub destination: Destination,
    pub routing_key: Arc<str>,
    pub arguments: FieldTable,
}

/// One exchange's bindings, indexed the way its kind routes.
#[derive(Debug)]
pub enum Bindings {
    Direct(DirectBindings),
    Fanout(FanoutBindings),
    Topic(TopicBindings),
    Headers(HeadersBindings),
}

impl Bindings {
    pub fn new(kind: ExchangeKind) -> Self {
        match kind {
            ExchangeKind::Direct => Bindings::Direct(DirectBindings::default()),
            ExchangeKind::Fanout => Bindings::Fanout(FanoutBindings::default()),
            ExchangeKind::Topic => Bindings::Topic(TopicBindings::default()),
            ExchangeKind::Headers => Bindings::Headers(HeadersBindings::default()),
        }
    }

    /// Checks binding arguments the way the kind's `validate_binding` does (only headers
    /// exchanges look at them).
    pub fn validate(&self, arguments: &FieldTable) -> Result<(), AmqpError> {
        match self {
            Bindings::Headers(_) => XMatch::from_arguments(arguments).map(|_| ()),
            Bindings::Direct(_) | Bindings::Fanout(_) | Bindings::Topic(_) => Ok(()),
        }
    }

    /// Adds a binding; `Ok(false)` when an identical one (same destination, key and
    /// arguments) already exists.
    pub fn bind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        match self {
            Bindings::Direct(b) => Ok(b.bind(destination, routing_key, arguments)),
            Bindings::Fanout(b) => Ok(b.bind(destination, routing_key, arguments)),
            Bindings::Topic(b) => Ok(b.bind(destination, routing_key, arguments)),
            Bindings::Headers(b) => b.bind(destination, routing_key, arguments),
        }
    }

    /// Removes the identical binding; `false` when there was none.
    pub fn unbind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        match self {
            Bindings::Direct(b) => b.unbind(destination, routing_key, arguments),
            Bindings::Fanout(b) => b.unbind(destination, routing_key, arguments),
            Bindings::Topic(b) => b.unbind(destination, routing_key, arguments),
            Bindings::Headers(b) => b.unbind(destination, routing_key, arguments),
        }
    }

    /// Appends the destinations matching a message published with these routing keys (the
    /// publish key plus any CC / BCC keys) and headers. May append a destination twice.
    pub fn route(
        &self,
        routing_keys: &[&[u8]],
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        match self {
            Bindings::Direct(b) => routing_keys.iter().for_each(|key| b.route(key, out)),
            Bindings::Topic(b) => routing_keys.iter().for_each(|key| b.route(key, out)),
            // Neither looks at routing keys, so one pass covers them all.
            Bindings::Fanout(b) => b.route(out),
            Bindings::Headers(b) => b.route(headers, out),
        }
    }

    /// Removes every binding to `destination`, returning their keys and arguments.
    pub fn remove_destination(&mut self, destination: &Destination) -> Vec<(Arc<str>, FieldTable)> {
        match self {
            Bindings::Direct(b) => b.remove_destination(destination),
            Bindings::Fanout(b) => b.remove_destination(destination),
            Bindings::Topic(b) => b.remove_destination(destination),
            Bindings::Headers(b) => b.remove_destination(destination),
        }
    }

    pub fn bindings(&self) -> Vec<BindingRef<'_>> {
        match self {
            Bindings::Direct(b) => b.bindings(),
            Bindings::Fanout(b) => b.bindings(),
            Bindings::Topic(b) => b.bindings(),
            Bindings::Headers(b) => b.bindings(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Bindings::Direct(b) => b.len(),
            Bindings::Fanout(b) => b.len(),
            Bindings::Topic(b) => b.len(),
            Bindings::Headers(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An exchange and the bindings it is the source of.
///
/// Only [`Topology`] hands out exchanges, and only by shared reference: the binding set and
/// the topology's reverse index of it change together there.
#[derive(Debug)]
pub struct Exchange {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    bindings: Bindings,
}

impl Exchange {
    pub fn new(
        name: Arc<str>,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        Exchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: Bindings::new(kind),
        }
    }

    pub fn bindings(&self) -> &Bindings {
        &self.bindings
    }

    /// The `alternate-exchange` argument, when it is a string. Declare refuses other types
    /// for new exchanges, so a non-string here is ignored as RabbitMQ would fail to use it.
    pub fn alternate_exchange(&self) -> Option<&str> {
        match self.arguments.inner().get(ALTERNATE_EXCHANGE)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// Whether this is the nameless default exchange, which routes by queue name.
    pub fn is_default(&self) -> bool {
        self.name.is_empty()
    }
}

/// RabbitMQ removes CR and LF from exchange and queue names in declare, delete, bind and
/// unbind (not in publish). [`Topology`] applies this itself; callers checking a queue name
/// before binding should apply it too so both sides agree on the name.
pub fn strip_cr_lf(name: &str) -> Cow<'_, str> {
    if name.contains(['\r', '\n']) {
        Cow::Owned(name.chars().filter(|c| *c != '\r' && *c != '\n').collect())
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::error::code;

    #[test]
    fn kind_round_trip() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            assert_eq!(ExchangeKind::parse(kind.as_str()).unwrap(), kind);
        }
    }

    #[test]
    fn unknown_kind_is_command_invalid() {
        let e = ExchangeKind::parse("x-delayed-message").unwrap_err();
        assert_eq!(e.code, code::COMMAND_INVALID);
        assert!(e.is_hard());
        assert_eq!(
            e.text,
            "COMMAND_INVALID - unknown exchange type 'x-delayed-message'"
        );
        let e = ExchangeKind::parse("foo").unwrap_err();
        assert_eq!(e.text, "COMMAND_INVALID - invalid exchange type 'foo'");
        let e = ExchangeKind::parse("").unwrap_err();
        assert_eq!(e.text, "COMMAND_INVALID - invalid exchange type ''");
        // Type names are case-sensitive, as atoms are.
        assert_eq!(
            ExchangeKind::parse("Direct").unwrap_err().text,
            "COMMAND_INVALID - unknown exchange type 'Direct'"
        );
        assert!(NON_TYPE_ATOMS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn strips_cr_lf() {
        assert_eq!(strip_cr_lf("a\r\nb\n"), "ab");
        assert!(matches!(strip_cr_lf("plain"), Cow::Borrowed("plain")));
    }
}
