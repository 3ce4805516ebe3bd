use super::*;
use crate::error::code;
use amq_protocol::types::LongString;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn none() -> FieldTable {
    FieldTable::default()
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn q(name: &str) -> Destination {
    Destination::Queue(name.into())
}

fn x(name: &str) -> Destination {
    Destination::Exchange(name.into())
}

/// Declares a non-durable, non-auto-delete exchange.
fn declare(t: &mut Topology, name: &str, kind: &str) {
    declare_with(t, name, kind, false, &none());
}

fn declare_with(t: &mut Topology, name: &str, kind: &str, auto_delete: bool, args: &FieldTable) {
    t.declare_exchange(name, kind, false, false, auto_delete, false, args)
        .unwrap();
}

fn route(t: &Topology, exchange: &str, key: &str) -> Vec<String> {
    route_keys(t, exchange, &[key])
}

fn route_keys(t: &Topology, exchange: &str, keys: &[&str]) -> Vec<String> {
    let mut set = RouteSet::new();
    let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    t.route_keys(exchange, &keys, None, &mut set).unwrap();
    set.iter().map(str::to_owned).collect()
}

fn names(removed: &[Arc<str>]) -> Vec<&str> {
    removed.iter().map(|n| &**n).collect()
}

/// The reverse index agrees with the exchanges' binding sets.
fn assert_consistent(t: &Topology) {
    let mut counted: HashMap<Destination, HashMap<Arc<str>, usize>> = HashMap::default();
    for b in t.bindings() {
        *counted
            .entry(b.destination.clone())
            .or_default()
            .entry(b.source.clone())
            .or_default() += 1;
    }
    assert_eq!(counted, t.inbound);
    for (name, ex) in &t.exchanges {
        assert_eq!(name, &ex.name);
    }
}

// ------------------------------------------------------------------ declare

#[test]
fn predeclared_exchanges() {
    let mut t = Topology::new("/");
    for (name, kind) in [
        ("", "direct"),
        ("amq.direct", "direct"),
        ("amq.fanout", "fanout"),
        ("amq.topic", "topic"),
        ("amq.headers", "headers"),
        ("amq.match", "headers"),
        ("amq.rabbitmq.trace", "topic"),
    ] {
        let ex = t.exchange(name).unwrap();
        assert_eq!(ex.kind.as_str(), kind);
        assert!(ex.durable && !ex.auto_delete);
        if !name.is_empty() {
            assert_eq!(
                t.declare_exchange(name, "whatever", true, false, false, false, &none()),
                Ok(DeclareOutcome::Existed)
            );
        }
    }
    // Redeclaring with the same properties is fine, even for amq.*.
    assert_eq!(
        t.declare_exchange("amq.topic", "topic", false, true, false, false, &none()),
        Ok(DeclareOutcome::Existed)
    );
    assert_eq!(t.exchanges().count(), 7);
    assert!(t.exchange("amq.rabbitmq.trace").unwrap().internal);
}

#[test]
fn passive_declare() {
    let mut t = Topology::new("/");
    let e = t
        .declare_exchange("nope", "direct", true, false, false, false, &none())
        .unwrap_err();
    assert_eq!(e.code, code::NOT_FOUND);
    assert_eq!(e.text, "NOT_FOUND - no exchange 'nope' in vhost '/'");
    let e = t
        .declare_exchange("", "direct", true, false, false, false, &none())
        .unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    declare(&mut t, "x", "fanout");
    // Passive ignores type and flags.
    assert_eq!(
        t.declare_exchange("x", "bogus", true, true, true, true, &none()),
        Ok(DeclareOutcome::Existed)
    );
}

#[test]
fn declare_refusals() {
    let mut t = Topology::new("/");
    let e = t
        .declare_exchange("", "direct", false, true, false, false, &none())
        .unwrap_err();
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    // The type is checked first, even for the default exchange.
    let e = t
        .declare_exchange("", "bogus", false, true, false, false, &none())
        .unwrap_err();
    assert_eq!(e.code, code::COMMAND_INVALID);
    assert_eq!(e.text, "COMMAND_INVALID - unknown exchange type 'bogus'");
    let e = t
        .declare_exchange("amq.foo", "direct", false, true, false, false, &none())
        .unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - exchange name 'amq.foo' contains reserved prefix 'amq.*'"
    );
    let e = t
        .declare_exchange(
            "x",
            "direct",
            false,
            true,
            false,
            false,
            &table(&[(ALTERNATE_EXCHANGE, AMQPValue::LongInt(1))]),
        )
        .unwrap_err();
    assert_eq!(e.code, code::PRECONDITION_FAILED);
    assert_eq!(
        e.text,
        "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' \
         in exchange 'x' in vhost '/'"
    );
    assert!(t.exchange("x").is_none());
}

#[test]
fn declare_creates_then_checks_equivalence() {
    let mut t = Topology::new("/");
    assert_eq!(
        t.declare_exchange("x", "direct", false, false, false, false, &none()),
        Ok(DeclareOutcome::Created)
    );
    assert_eq!(
        t.declare_exchange("x", "direct", false, false, false, false, &none()),
        Ok(DeclareOutcome::Existed)
    );
    let fail = |t: &mut Topology, kind, durable, auto_delete, internal, args: &FieldTable| {
        let e = t
            .declare_exchange("x", kind, false, durable, auto_delete, internal, args)
            .unwrap_err();
        assert_eq!(e.code, code::PRECONDITION_FAILED);
        e.text
    };
    assert_eq!(
        fail(&mut t, "fanout", false, false, false, &none()),
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': \
         received 'fanout' but current is 'direct'"
    );
    assert_eq!(
        fail(&mut t, "direct", true, false, false, &none()),
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'x' in vhost '/': \
         received 'true' but current is 'false'"
    );
    assert_eq!(
        fail(&mut t, "direct", false, true, false, &none()),
        "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for exchange 'x' in vhost '/': \
         received 'true' but current is 'false'"
    );
    assert_eq!(
        fail(&mut t, "direct", false, false, true, &none()),
        "PRECONDITION_FAILED - inequivalent arg 'internal' for exchange 'x' in vhost '/': \
         received 'true' but current is 'false'"
    );
    assert_eq!(
        fail(
            &mut t,
            "direct",
            false,
            false,
            false,
            &table(&[(ALTERNATE_EXCHANGE, s("ae"))])
        ),
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in \
         vhost '/': received the value 'ae' of type 'longstr' but current is none"
    );
    // Other arguments are not compared.
    assert_eq!(
        t.declare_exchange(
            "x",
            "direct",
            false,
            false,
            false,
            false,
            &table(&[("x-whatever", s("1"))])
        ),
        Ok(DeclareOutcome::Existed)
    );
    // An unknown type is a 503 even when the exchange exists.
    let e = t
        .declare_exchange(
            "x",
            "x-delayed-message",
            false,
            false,
            false,
            false,
            &none(),
        )
        .unwrap_err();
    assert_eq!(e.code, code::COMMAND_INVALID);
}

#[test]
fn alternate_exchange_equivalence() {
    let mut t = Topology::new("/");
    declare_with(
        &mut t,
        "x",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("a"))]),
    );
    let redeclare = |t: &mut Topology, args: &FieldTable| {
        t.declare_exchange("x", "direct", false, false, false, false, args)
    };
    assert!(redeclare(&mut t, &table(&[(ALTERNATE_EXCHANGE, s("a"))])).is_ok());
    // A byte array with the same bytes is the same Erlang binary.
    assert!(redeclare(
        &mut t,
        &table(&[(
            ALTERNATE_EXCHANGE,
            AMQPValue::ByteArray(b"a".to_vec().into())
        )])
    )
    .is_ok());
    assert_eq!(
        redeclare(&mut t, &table(&[(ALTERNATE_EXCHANGE, s("b"))]))
            .unwrap_err()
            .text,
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in \
         vhost '/': received 'b' but current is 'a'"
    );
    assert_eq!(
        redeclare(&mut t, &none()).unwrap_err().text,
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in \
         vhost '/': received none but current is the value 'a' of type 'longstr'"
    );
}

#[test]
fn names_lose_cr_and_lf() {
    let mut t = Topology::new("/");
    declare(&mut t, "a\r\nb", "fanout");
    assert!(t.exchange("ab").is_some());
    assert_eq!(
        t.declare_exchange("a\nb", "fanout", true, false, false, false, &none()),
        Ok(DeclareOutcome::Existed)
    );
    t.bind("a\nb", &q("q\r"), "", &none()).unwrap();
    assert_eq!(route(&t, "ab", ""), vec!["q"]);
    assert_eq!(t.delete_exchange("ab\n", false).unwrap().exchanges.len(), 1);
    assert!(t.exchange("ab").is_none());
}

#[test]
fn vhost_appears_in_texts() {
    let mut t = Topology::new("prod");
    let e = t
        .declare_exchange("nope", "direct", true, false, false, false, &none())
        .unwrap_err();
    assert_eq!(e.text, "NOT_FOUND - no exchange 'nope' in vhost 'prod'");
    assert_eq!(t.vhost(), "prod");
}

// ------------------------------------------------------------------ delete

#[test]
fn delete_rules() {
    let mut t = Topology::new("/");
    assert_eq!(t.delete_exchange("missing", false), Ok(Removed::default()));
    let e = t.delete_exchange("", false).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    let e = t.delete_exchange("amq.direct", false).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"
    );
    // Any amq. name, existing or not.
    let e = t.delete_exchange("amq.nothing", false).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);

    declare(&mut t, "x", "direct");
    t.bind("x", &q("q"), "k", &none()).unwrap();
    let e = t.delete_exchange("x", true).unwrap_err();
    assert_eq!(e.code, code::PRECONDITION_FAILED);
    assert_eq!(
        e.text,
        "PRECONDITION_FAILED - exchange 'x' in vhost '/' in use"
    );
    let removed = t.delete_exchange("x", false).unwrap();
    assert_eq!(names(&removed.exchanges), vec!["x"]);
    assert_eq!(removed.bindings.len(), 1);
    assert!(t.exchange("x").is_none());
    assert!(t.bindings_for_destination(&q("q")).is_empty());
    assert_consistent(&t);
}

#[test]
fn if_unused_ignores_bindings_as_destination() {
    let mut t = Topology::new("/");
    declare(&mut t, "src", "fanout");
    declare(&mut t, "dst", "fanout");
    t.bind("src", &x("dst"), "", &none()).unwrap();
    let removed = t.delete_exchange("dst", true).unwrap();
    assert_eq!(names(&removed.exchanges), vec!["dst"]);
    assert_eq!(
        removed.bindings,
        vec![BindingInfo {
            source: "src".into(),
            destination: x("dst"),
            routing_key: "".into(),
            arguments: none(),
        }]
    );
    assert!(t.bindings_for_source("src").is_empty());
    assert_consistent(&t);
}

// ------------------------------------------------------------------ bind / unbind

#[test]
fn bind_refusals() {
    let mut t = Topology::new("/");
    declare(&mut t, "x", "direct");
    let e = t.bind("", &q("q"), "q", &none()).unwrap_err();
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    let e = t.bind("x", &x(""), "k", &none()).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    let e = t.bind("nope", &q("q"), "k", &none()).unwrap_err();
    assert_eq!(e.code, code::NOT_FOUND);
    assert_eq!(e.text, "NOT_FOUND - no exchange 'nope' in vhost '/'");
    let e = t.bind("x", &x("gone"), "k", &none()).unwrap_err();
    assert_eq!(e.text, "NOT_FOUND - no exchange 'gone' in vhost '/'");
    // Both missing: the source is reported.
    let e = t.bind("nope", &x("gone"), "k", &none()).unwrap_err();
    assert_eq!(e.text, "NOT_FOUND - no exchange 'nope' in vhost '/'");
    assert_eq!(
        t.check_bind("nope", &q("q")).unwrap_err().text,
        "NOT_FOUND - no exchange 'nope' in vhost '/'"
    );
    assert!(t.check_bind("x", &q("anything")).is_ok());

    declare(&mut t, "h", "headers");
    let e = t
        .bind("h", &q("q"), "", &table(&[("x-match", s("some"))]))
        .unwrap_err();
    assert_eq!(e.code, code::PRECONDITION_FAILED);
    assert_eq!(
        e.text,
        "PRECONDITION_FAILED - Invalid x-match field value <<\"some\">>; \
         expected all, any, all-with-x, or any-with-x"
    );
    assert!(t.bindings().is_empty());
    assert_consistent(&t);
}

#[test]
fn bind_is_idempotent_and_unbind_forgiving() {
    let mut t = Topology::new("/");
    declare(&mut t, "x", "direct");
    assert_eq!(t.bind("x", &q("q"), "k", &none()), Ok(true));
    assert_eq!(t.bind("x", &q("q"), "k", &none()), Ok(false));
    assert_eq!(t.bindings().len(), 1);
    // Missing binding, missing source, missing destination: all fine.
    assert_eq!(
        t.unbind("x", &q("q"), "other", &none()),
        Ok(Removed::default())
    );
    assert_eq!(
        t.unbind("nope", &q("q"), "k", &none()),
        Ok(Removed::default())
    );
    assert_eq!(
        t.unbind("x", &x("gone"), "k", &none()),
        Ok(Removed::default())
    );
    let e = t.unbind("", &q("q"), "q", &none()).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    let e = t.unbind("x", &x(""), "k", &none()).unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    let removed = t.unbind("x", &q("q"), "k", &none()).unwrap();
    assert_eq!(removed.bindings.len(), 1);
    assert!(removed.exchanges.is_empty());
    assert!(t.bindings().is_empty());
    assert_consistent(&t);
}

#[test]
fn arguments_are_part_of_binding_identity() {
    let mut t = Topology::new("/");
    declare(&mut t, "x", "direct");
    let args = table(&[("a", s("1"))]);
    assert_eq!(t.bind("x", &q("q"), "k", &none()), Ok(true));
    assert_eq!(t.bind("x", &q("q"), "k", &args), Ok(true));
    assert_eq!(route(&t, "x", "k"), vec!["q"]);
    assert!(t.unbind("x", &q("q"), "k", &args).unwrap().bindings.len() == 1);
    assert_eq!(route(&t, "x", "k"), vec!["q"]);
    assert_consistent(&t);
}

// ------------------------------------------------------------------ auto-delete

#[test]
fn auto_delete_on_last_unbind() {
    let mut t = Topology::new("/");
    declare_with(&mut t, "ad", "fanout", true, &none());
    t.bind("ad", &q("q1"), "", &none()).unwrap();
    t.bind("ad", &q("q2"), "", &none()).unwrap();
    let removed = t.unbind("ad", &q("q1"), "", &none()).unwrap();
    assert!(removed.exchanges.is_empty());
    let removed = t.unbind("ad", &q("q2"), "", &none()).unwrap();
    assert_eq!(names(&removed.exchanges), vec!["ad"]);
    assert!(t.exchange("ad").is_none());
    assert_consistent(&t);
}

#[test]
fn auto_delete_exchange_without_bindings_stays() {
    let mut t = Topology::new("/");
    declare_with(&mut t, "ad", "fanout", true, &none());
    assert!(t.remove_queue("q").is_empty());
    assert_eq!(t.unbind("ad", &q("q"), "", &none()), Ok(Removed::default()));
    assert!(t.exchange("ad").is_some());
}

#[test]
fn auto_delete_cascades_through_exchange_bindings() {
    let mut t = Topology::new("/");
    declare_with(&mut t, "outer", "fanout", true, &none());
    declare_with(&mut t, "inner", "fanout", true, &none());
    declare(&mut t, "keeper", "fanout");
    t.bind("outer", &x("inner"), "", &none()).unwrap();
    t.bind("keeper", &x("inner"), "", &none()).unwrap();
    t.bind("inner", &q("q"), "", &none()).unwrap();
    // The queue goes: inner loses its last binding and is deleted, which removes the
    // bindings to it, so outer is left empty and goes too; keeper is not auto-delete.
    let removed = t.remove_queue("q");
    assert_eq!(names(&removed.exchanges), vec!["inner", "outer"]);
    assert_eq!(removed.bindings.len(), 3);
    assert!(t.exchange("keeper").is_some());
    assert!(t.bindings().is_empty());
    assert_consistent(&t);
}

#[test]
fn deleting_an_exchange_cascades_to_its_sources() {
    let mut t = Topology::new("/");
    declare_with(&mut t, "ad", "direct", true, &none());
    declare(&mut t, "target", "fanout");
    t.bind("ad", &x("target"), "k", &none()).unwrap();
    let removed = t.delete_exchange("target", false).unwrap();
    assert_eq!(names(&removed.exchanges), vec!["target", "ad"]);
    assert!(t.exchange("ad").is_none());
    assert_consistent(&t);
}

#[test]
fn long_auto_delete_chain_does_not_recurse() {
    let mut t = Topology::new("/");
    let n = 5_000;
    for i in 0..n {
        declare_with(&mut t, &format!("e{i}"), "fanout", true, &none());
    }
    for i in 1..n {
        t.bind(&format!("e{i}"), &x(&format!("e{}", i - 1)), "", &none())
            .unwrap();
    }
    t.bind("e0", &q("q"), "", &none()).unwrap();
    let removed = t.remove_queue("q");
    assert_eq!(removed.exchanges.len(), n);
    assert_eq!(t.exchanges().count(), 7);
    assert_consistent(&t);
}

#[test]
fn self_binding_is_removed_cleanly() {
    let mut t = Topology::new("/");
    declare(&mut t, "loop", "fanout");
    t.bind("loop", &x("loop"), "", &none()).unwrap();
    t.bind("loop", &q("q"), "", &none()).unwrap();
    assert_eq!(route(&t, "loop", ""), vec!["q"]);
    let removed = t.delete_exchange("loop", false).unwrap();
    assert_eq!(removed.bindings.len(), 2);
    assert_consistent(&t);
}

#[test]
fn remove_queue_drops_its_bindings_everywhere() {
    let mut t = Topology::new("/");
    declare(&mut t, "d", "direct");
    declare(&mut t, "t", "topic");
    t.bind("d", &q("q"), "a", &none()).unwrap();
    t.bind("d", &q("q"), "b", &none()).unwrap();
    t.bind("t", &q("q"), "#", &none()).unwrap();
    t.bind("amq.fanout", &q("q"), "", &none()).unwrap();
    t.bind("d", &q("other"), "a", &none()).unwrap();
    assert_eq!(t.bindings_for_destination(&q("q")).len(), 4);
    let removed = t.remove_queue("q");
    assert_eq!(removed.bindings.len(), 4);
    assert!(removed.exchanges.is_empty());
    assert!(t.bindings_for_destination(&q("q")).is_empty());
    assert_eq!(route(&t, "d", "a"), vec!["other"]);
    assert!(route(&t, "t", "x").is_empty());
    assert_consistent(&t);
}

// ------------------------------------------------------------------ routing

#[test]
fn default_exchange_routes_by_queue_name() {
    let t = Topology::new("/");
    assert_eq!(route(&t, "", "orders"), vec!["orders"]);
    assert_eq!(route_keys(&t, "", &["b", "a", "b"]), vec!["a", "b"]);
    let mut set = RouteSet::new();
    t.route("", &[0xff], None, &mut set).unwrap();
    assert!(set.is_empty());
    // The caller filters out queues that do not exist.
    t.route("", b"missing", None, &mut set).unwrap();
    set.retain(|name| name != "missing");
    assert!(set.is_empty());
}

#[test]
fn missing_and_internal_exchanges() {
    let mut t = Topology::new("/");
    let mut set = RouteSet::new();
    let e = t.route("nope", b"k", None, &mut set).unwrap_err();
    assert_eq!(e.text, "NOT_FOUND - no exchange 'nope' in vhost '/'");
    assert_eq!(
        t.check_publish("nope").unwrap_err().text,
        "NOT_FOUND - no exchange 'nope' in vhost '/'"
    );
    t.declare_exchange("int", "fanout", false, false, false, true, &none())
        .unwrap();
    let e = t.check_publish("int").unwrap_err();
    assert_eq!(e.code, code::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "ACCESS_REFUSED - cannot publish to internal exchange 'int' in vhost '/'"
    );
    assert!(t.check_publish("amq.direct").is_ok());
    assert!(t.check_publish("").is_ok());
    // Internal exchanges still route when reached through a binding.
    declare(&mut t, "front", "fanout");
    t.bind("front", &x("int"), "", &none()).unwrap();
    t.bind("int", &q("q"), "", &none()).unwrap();
    assert_eq!(route(&t, "front", ""), vec!["q"]);
}

#[test]
fn exchange_to_exchange_reaches_each_queue_once() {
    let mut t = Topology::new("/");
    declare(&mut t, "x1", "direct");
    declare(&mut t, "x2", "fanout");
    declare(&mut t, "x3", "topic");
    t.bind("x1", &x("x2"), "k", &none()).unwrap();
    t.bind("x1", &x("x3"), "k", &none()).unwrap();
    t.bind("x1", &q("q1"), "k", &none()).unwrap();
    t.bind("x2", &q("q1"), "", &none()).unwrap();
    t.bind("x2", &q("q2"), "", &none()).unwrap();
    t.bind("x3", &q("q2"), "#", &none()).unwrap();
    t.bind("x3", &x("x2"), "k", &none()).unwrap();
    assert_eq!(route(&t, "x1", "k"), vec!["q1", "q2"]);
    assert!(route(&t, "x1", "other").is_empty());
}

#[test]
fn exchange_cycles_terminate() {
    let mut t = Topology::new("/");
    declare(&mut t, "a", "fanout");
    declare(&mut t, "b", "fanout");
    declare(&mut t, "c", "fanout");
    t.bind("a", &x("b"), "", &none()).unwrap();
    t.bind("b", &x("c"), "", &none()).unwrap();
    t.bind("c", &x("a"), "", &none()).unwrap();
    t.bind("c", &q("q"), "", &none()).unwrap();
    t.bind("a", &q("q"), "", &none()).unwrap();
    assert_eq!(route(&t, "a", ""), vec!["q"]);
    assert_eq!(route(&t, "b", ""), vec!["q"]);
}

#[test]
fn alternate_exchange_catches_unrouted() {
    let mut t = Topology::new("/");
    declare(&mut t, "ae", "fanout");
    declare_with(
        &mut t,
        "x",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("ae"))]),
    );
    t.bind("ae", &q("unrouted"), "", &none()).unwrap();
    t.bind("x", &q("q"), "k", &none()).unwrap();
    assert_eq!(route(&t, "x", "k"), vec!["q"]);
    assert_eq!(route(&t, "x", "other"), vec!["unrouted"]);
    // CC keys: the alternate exchange only applies when no key matched at all.
    assert_eq!(route_keys(&t, "x", &["k", "other"]), vec!["q"]);
    assert_eq!(route_keys(&t, "x", &["nope", "other"]), vec!["unrouted"]);
    // A dangling alternate-exchange name routes nowhere.
    declare_with(
        &mut t,
        "y",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("gone"))]),
    );
    assert!(route(&t, "y", "k").is_empty());
}

#[test]
fn alternate_exchange_applies_per_exchange() {
    let mut t = Topology::new("/");
    declare(&mut t, "ae1", "fanout");
    declare(&mut t, "ae2", "fanout");
    declare_with(
        &mut t,
        "x1",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("ae1"))]),
    );
    declare_with(
        &mut t,
        "x2",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("ae2"))]),
    );
    t.bind("ae1", &q("from-ae1"), "", &none()).unwrap();
    t.bind("ae2", &q("from-ae2"), "", &none()).unwrap();
    t.bind("x1", &x("x2"), "k", &none()).unwrap();
    // x1 routed (to x2), so its alternate is not used; x2 routed nothing, so its is.
    assert_eq!(route(&t, "x1", "k"), vec!["from-ae2"]);
    assert_eq!(route(&t, "x1", "z"), vec!["from-ae1"]);
    // Alternates chain: an alternate that routes nothing uses its own alternate.
    declare_with(
        &mut t,
        "x3",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("x2"))]),
    );
    assert_eq!(route(&t, "x3", "k"), vec!["from-ae2"]);
}

#[test]
fn alternate_exchange_cycles_terminate() {
    let mut t = Topology::new("/");
    declare_with(
        &mut t,
        "a",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("b"))]),
    );
    declare_with(
        &mut t,
        "b",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("a"))]),
    );
    declare_with(
        &mut t,
        "self",
        "direct",
        false,
        &table(&[(ALTERNATE_EXCHANGE, s("self"))]),
    );
    assert!(route(&t, "a", "k").is_empty());
    assert!(route(&t, "self", "k").is_empty());
    t.bind("b", &q("q"), "k2", &none()).unwrap();
    assert!(route(&t, "a", "k").is_empty());
    assert_eq!(route(&t, "a", "k2"), vec!["q"]);
}

#[test]
fn several_route_calls_share_one_set() {
    let mut t = Topology::new("/");
    declare(&mut t, "d", "direct");
    t.bind("d", &q("q1"), "a", &none()).unwrap();
    t.bind("d", &q("q2"), "b", &none()).unwrap();
    t.bind("d", &q("q1"), "b", &none()).unwrap();
    let mut set = RouteSet::new();
    for key in ["a", "b", "a"] {
        t.route("d", key.as_bytes(), None, &mut set).unwrap();
    }
    assert_eq!(set.iter().collect::<Vec<_>>(), vec!["q1", "q2"]);
    set.clear();
    t.route("d", b"b", None, &mut set).unwrap();
    t.route("", b"q2", None, &mut set).unwrap();
    t.route("", b"q3", None, &mut set).unwrap();
    assert_eq!(set.iter().collect::<Vec<_>>(), vec!["q1", "q2", "q3"]);
}

#[test]
fn headers_exchange_through_topology() {
    let mut t = Topology::new("/");
    let args = table(&[
        ("x-match", s("any")),
        ("a", s("1")),
        ("b", AMQPValue::LongInt(2)),
    ]);
    t.bind("amq.headers", &q("q"), "", &args).unwrap();
    let mut set = RouteSet::new();
    let headers = table(&[("b", AMQPValue::LongLongInt(2))]);
    t.route("amq.headers", b"ignored", Some(&headers), &mut set)
        .unwrap();
    assert_eq!(set.iter().collect::<Vec<_>>(), vec!["q"]);
    set.clear();
    t.route("amq.headers", b"", None, &mut set).unwrap();
    assert!(set.is_empty());
}

#[test]
fn listings() {
    let mut t = Topology::new("/");
    declare(&mut t, "x", "topic");
    t.bind("x", &q("q"), "a.*", &table(&[("k", s("v"))]))
        .unwrap();
    t.bind("x", &x("amq.fanout"), "#", &none()).unwrap();
    t.bind("amq.direct", &q("q"), "q", &none()).unwrap();
    assert_eq!(t.bindings().len(), 3);
    let from_x = t.bindings_for_source("x");
    assert_eq!(from_x.len(), 2);
    assert!(from_x.contains(&BindingInfo {
        source: "x".into(),
        destination: q("q"),
        routing_key: "a.*".into(),
        arguments: table(&[("k", s("v"))]),
    }));
    assert_eq!(t.bindings_for_destination(&q("q")).len(), 2);
    assert_eq!(t.bindings_for_destination(&x("amq.fanout")).len(), 1);
    assert!(t.bindings_for_source("nope").is_empty());
}

// ------------------------------------------------------------------ random operations

#[derive(Debug, Clone)]
enum Op {
    Declare(usize, bool),
    Delete(usize, bool),
    Bind(usize, usize, bool, usize),
    Unbind(usize, usize, bool, usize),
    RemoveQueue(usize),
}

const KINDS: [&str; 4] = ["direct", "fanout", "topic", "headers"];
const KEYS: [&str; 3] = ["a", "b", "#"];

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6usize, any::<bool>()).prop_map(|(e, ad)| Op::Declare(e, ad)),
        (0..6usize, any::<bool>()).prop_map(|(e, u)| Op::Delete(e, u)),
        (0..6usize, 0..6usize, any::<bool>(), 0..3usize)
            .prop_map(|(s, d, to_q, k)| Op::Bind(s, d, to_q, k)),
        (0..6usize, 0..6usize, any::<bool>(), 0..3usize)
            .prop_map(|(s, d, to_q, k)| Op::Unbind(s, d, to_q, k)),
        (0..6usize).prop_map(Op::RemoveQueue),
    ]
}

fn dest(n: usize, to_queue: bool) -> Destination {
    if to_queue {
        q(&format!("q{n}"))
    } else {
        x(&format!("e{n}"))
    }
}

proptest! {
    #[test]
    fn reverse_index_stays_consistent(ops in prop::collection::vec(op_strategy(), 1..60)) {
        let mut t = Topology::new("/");
        for op in ops {
            match op {
                Op::Declare(e, auto_delete) => {
                    let _ = t.declare_exchange(
                        &format!("e{e}"), KINDS[e % 4], false, false, auto_delete, false, &none());
                }
                Op::Delete(e, if_unused) => {
                    let _ = t.delete_exchange(&format!("e{e}"), if_unused);
                }
                Op::Bind(s, d, to_q, k) => {
                    let _ = t.bind(&format!("e{s}"), &dest(d, to_q), KEYS[k], &none());
                }
                Op::Unbind(s, d, to_q, k) => {
                    let _ = t.unbind(&format!("e{s}"), &dest(d, to_q), KEYS[k], &none());
                }
                Op::RemoveQueue(n) => {
                    let removed = t.remove_queue(&format!("q{n}"));
                    let gone = q(&format!("q{n}"));
                    for b in &removed.bindings {
                        let explained = b.destination == gone
                            || removed.exchanges.iter().any(|e| {
                                *e == b.source || b.destination == Destination::Exchange(e.clone())
                            });
                        prop_assert!(explained, "unexplained removal {:?}", b);
                    }
                }
            }
            assert_consistent(&t);
            // Auto-delete exchanges never linger without bindings once they had some; at
            // least every binding's source and exchange destination exist.
            for b in t.bindings() {
                prop_assert!(t.exchange(&b.source).is_some());
                if let Destination::Exchange(d) = &b.destination {
                    prop_assert!(t.exchange(d).is_some());
                }
            }
            // Routing from every exchange terminates and yields unique queues.
            let all: Vec<Arc<str>> = t.exchanges().map(|e| e.name.clone()).collect();
            for name in all {
                let mut set = RouteSet::new();
                t.route(&name, b"a", None, &mut set).unwrap();
                let unique: BTreeSet<&str> = set.iter().collect();
                prop_assert_eq!(unique.len(), set.len());
            }
        }
    }
}
