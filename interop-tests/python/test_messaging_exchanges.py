"""Exchanges with pika: types and routing, predeclared exchanges, declare/delete/bind and their
reply codes and texts. Every test runs against Warren and (with RABBITMQ_ADDR) RabbitMQ."""

import pika
import pika.exceptions
import pytest

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, exchange_exists, expect_channel_error,
    expect_connection_error, get_all, resource, s, session_factory, settle, uniq,
)


def bind_queues(ch, exchange, keys_by_queue, arguments_by_queue=None):
    """Declare one queue per entry and bind it with each of its keys; return {label: queue}."""
    names = {}
    for label, keys in keys_by_queue.items():
        q = declare_queue(ch, exclusive=True)
        for k in keys:
            args = (arguments_by_queue or {}).get(label)
            ch.queue_bind(q, exchange, routing_key=k, arguments=args)
        names[label] = q
    return names


def routed(ch, queues, exchange, key, headers=None, body=b"m"):
    """Publish one message and return {label: number of copies it received}."""
    props = pika.BasicProperties(headers=headers) if headers is not None else None
    ch.basic_publish(exchange, key, body, properties=props)
    ch.queue_declare(uniq("sync"), exclusive=True)  # a round trip: the publish was handled
    return {label: len(get_all(ch, q)) for label, q in queues.items()}


# ---- direct / fanout -------------------------------------------------------------------------

def test_direct_routes_on_exact_key_once_per_queue(s):
    x = uniq("x.direct")
    s.ch.exchange_declare(x, "direct", auto_delete=True)
    qs = bind_queues(s.ch, x, {"a": ["a"], "b": ["b"], "ab": ["a", "b"], "none": ["A"]})
    assert routed(s.ch, qs, x, "a") == {"a": 1, "b": 0, "ab": 1, "none": 0}
    assert routed(s.ch, qs, x, "b") == {"a": 0, "b": 1, "ab": 1, "none": 0}
    assert routed(s.ch, qs, x, "c") == {"a": 0, "b": 0, "ab": 0, "none": 0}
    assert routed(s.ch, qs, x, "") == {"a": 0, "b": 0, "ab": 0, "none": 0}


def test_fanout_ignores_key_and_delivers_once(s):
    x = uniq("x.fanout")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    qs = bind_queues(s.ch, x, {"one": ["k"], "two": ["a", "b", ""]})
    assert routed(s.ch, qs, x, "whatever") == {"one": 1, "two": 1}
    assert routed(s.ch, qs, x, "") == {"one": 1, "two": 1}


def test_default_exchange_routes_to_queue_by_name(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_publish("", q, b"hello")
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert body == b"hello"
    assert m.exchange == "" and m.routing_key == q
    # a key naming no queue goes nowhere, silently
    s.ch.basic_publish("", uniq("no-such-queue"), b"lost")
    assert s.ch.basic_get(q, auto_ack=True)[0] is None


# ---- topic -----------------------------------------------------------------------------------

# (binding pattern, routing keys that match, routing keys that do not); verified against
# RabbitMQ 3.10.
TOPIC_CASES = [
    ("a.b.c", ["a.b.c"], ["a.b", "a.b.c.d", "a.B.c", "", "a.b.c."]),
    ("*", ["a", "abc"], ["a.b", ".", ""]),
    ("*.b", ["a.b", ".b"], ["b", "a.b.c", "a.c"]),
    ("a.*", ["a.b", "a."], ["a", "a.b.c"]),
    ("a.*.c", ["a.b.c", "a..c"], ["a.c", "a.b.b.c"]),
    ("#", ["", "a", "a.b.c", ".", ".."], []),
    ("a.#", ["a", "a.b", "a.b.c", "a."], ["b", "b.a", "ab"]),
    ("#.c", ["c", "a.c", "a.b.c", ".c"], ["c.a", "ac"]),
    ("a.#.b", ["a.b", "a.x.b", "a.x.y.b", "a..b"], ["a", "b", "a.b.c", "x.a.b", "ab"]),
    ("#.#", ["", "a", "a.b"], []),
    ("*.#", ["a", "a.b", "a.b.c"], []),
    ("#.*", ["a", "a.b"], []),
    ("*.*", ["a.b", "."], ["a", "a.b.c"]),
    ("a.#.#.b", ["a.b", "a.x.b", "a.x.y.b"], ["a.x"]),
    ("a..b", ["a..b"], ["a.b", "a.x.b"]),
    ("", [""], ["a", "."]),
    ("a.*.#", ["a.b", "a.b.c"], ["a"]),
]


@pytest.mark.parametrize("pattern,hits,misses", TOPIC_CASES,
                         ids=[repr(c[0]) for c in TOPIC_CASES])
def test_topic_pattern(s, pattern, hits, misses):
    x = uniq("x.topic")
    s.ch.exchange_declare(x, "topic", auto_delete=True)
    qs = bind_queues(s.ch, x, {"q": [pattern]})
    wrong = []
    for key in hits:
        if routed(s.ch, qs, x, key)["q"] != 1:
            wrong.append(f"{key!r} should match")
    for key in misses:
        if routed(s.ch, qs, x, key)["q"] != 0:
            wrong.append(f"{key!r} should not match")
    assert not wrong, f"pattern {pattern!r}: {wrong}"


def test_topic_overlapping_bindings_deliver_once(s):
    x = uniq("x.topic")
    s.ch.exchange_declare(x, "topic", auto_delete=True)
    qs = bind_queues(s.ch, x, {"q": ["a.*", "#", "*.b", "a.b"], "r": ["a.b"]})
    assert routed(s.ch, qs, x, "a.b") == {"q": 1, "r": 1}
    assert routed(s.ch, qs, x, "z") == {"q": 1, "r": 0}


def test_topic_unbind_removes_only_that_pattern(s):
    x = uniq("x.topic")
    s.ch.exchange_declare(x, "topic", auto_delete=True)
    qs = bind_queues(s.ch, x, {"q": ["a.*", "*.b"]})
    s.ch.queue_unbind(qs["q"], x, routing_key="a.*")
    assert routed(s.ch, qs, x, "a.c") == {"q": 0}
    assert routed(s.ch, qs, x, "a.b") == {"q": 1}


# ---- headers ---------------------------------------------------------------------------------

HEADER_BINDINGS = {
    "all": {"x-match": "all", "a": "1", "b": "2"},
    "any": {"x-match": "any", "a": "1", "b": "2"},
    "default": {"a": "1", "b": "2"},  # x-match defaults to all
    "all-with-x": {"x-match": "all-with-x", "a": "1", "x-k": "v"},
    "any-with-x": {"x-match": "any-with-x", "x-k": "v", "b": "9"},
    "all-x-ignored": {"x-match": "all", "a": "1", "x-k": "v"},
    "any-x-ignored": {"x-match": "any", "x-k": "v"},
    "void": {"x-match": "all", "a": None},  # void matches any value of a present key
    "empty-all": {"x-match": "all"},
    "empty-any": {"x-match": "any"},
}

HEADER_CASES = [
    ({"a": "1", "b": "2"},
     {"all", "any", "default", "all-x-ignored", "void", "empty-all"}),
    ({"a": "1"}, {"any", "all-x-ignored", "void", "empty-all"}),
    ({"b": "2"}, {"any", "empty-all"}),
    ({"a": "1", "b": "3"}, {"any", "all-x-ignored", "void", "empty-all"}),
    ({"a": "2"}, {"void", "empty-all"}),
    ({"a": "1", "x-k": "v"}, {"any", "all-with-x", "any-with-x", "all-x-ignored", "void",
                              "empty-all"}),
    ({"x-k": "v"}, {"any-with-x", "empty-all"}),
    ({"x-k": "w", "b": "9"}, {"any-with-x", "empty-all"}),
    ({}, {"empty-all"}),
    ({"a": "1", "b": "2", "c": "3"},
     {"all", "any", "default", "all-x-ignored", "void", "empty-all"}),
]


@pytest.mark.parametrize("headers,expected", HEADER_CASES, ids=[repr(c[0]) for c in HEADER_CASES])
def test_headers_exchange_matching(s, headers, expected):
    x = uniq("x.headers")
    s.ch.exchange_declare(x, "headers", auto_delete=True)
    qs = bind_queues(s.ch, x, {k: [""] for k in HEADER_BINDINGS}, HEADER_BINDINGS)
    got = routed(s.ch, qs, x, "ignored-key", headers=headers)
    assert {k for k, n in got.items() if n} == expected, f"headers {headers!r}: {got}"
    assert all(n <= 1 for n in got.values()), got


def test_headers_no_headers_property_matches_only_empty_all(s):
    x = uniq("x.headers")
    s.ch.exchange_declare(x, "headers", auto_delete=True)
    qs = bind_queues(s.ch, x, {k: [""] for k in HEADER_BINDINGS}, HEADER_BINDINGS)
    got = routed(s.ch, qs, x, "k")
    assert {k for k, n in got.items() if n} == {"empty-all"}, got


def test_headers_value_types_must_match(s):
    x = uniq("x.headers")
    s.ch.exchange_declare(x, "headers", auto_delete=True)
    qs = bind_queues(s.ch, x, {"int": [""], "str": [""]},
                     {"int": {"n": 5}, "str": {"n": "5"}})
    assert routed(s.ch, qs, x, "", headers={"n": 5}) == {"int": 1, "str": 0}
    assert routed(s.ch, qs, x, "", headers={"n": "5"}) == {"int": 0, "str": 1}


# ---- predeclared -----------------------------------------------------------------------------

PREDECLARED = [("amq.direct", "direct"), ("amq.fanout", "fanout"), ("amq.topic", "topic"),
               ("amq.headers", "headers"), ("amq.match", "headers")]


@pytest.mark.parametrize("name,kind", PREDECLARED, ids=[p[0] for p in PREDECLARED])
def test_predeclared_exchange_exists_with_its_type(s, name, kind):
    s.ch.exchange_declare(name, passive=True)
    # Redeclaring with the same properties (durable) is fine ...
    s.ch.exchange_declare(name, kind, durable=True)
    # ... another type is not.
    other = "fanout" if kind != "fanout" else "direct"
    expect_channel_error(lambda: s.ch.exchange_declare(name, other, durable=True), 406,
                         f"PRECONDITION_FAILED - inequivalent arg 'type' for "
                         f"{resource('exchange', name)}: received '{other}' but current is "
                         f"'{kind}'")


def test_predeclared_exchanges_route(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, "amq.direct", routing_key=q)
    s.ch.queue_bind(q, "amq.topic", routing_key=f"{q}.#")
    s.ch.queue_bind(q, "amq.match", arguments={"x-match": "all", "to": q})
    s.ch.basic_publish("amq.direct", q, b"1")
    s.ch.basic_publish("amq.topic", f"{q}.x.y", b"2")
    s.ch.basic_publish("amq.match", "", b"3", pika.BasicProperties(headers={"to": q}))
    s.ch.basic_publish("amq.topic", "other", b"no")
    s.ch.queue_declare(q, passive=True)
    assert sorted(get_all(s.ch, q)) == [b"1", b"2", b"3"]


def test_amq_prefix_cannot_be_declared(s):
    name = uniq("amq.custom")
    expect_channel_error(lambda: s.ch.exchange_declare(name, "direct"), 403,
                         f"ACCESS_REFUSED - exchange name '{name}' contains reserved prefix "
                         f"'amq.*'")


def test_amq_prefix_passive_declare_of_missing_is_404(s):
    name = uniq("amq.custom")
    expect_channel_error(lambda: s.ch.exchange_declare(name, passive=True), 404,
                         f"NOT_FOUND - no {resource('exchange', name)}")


@pytest.mark.parametrize("name", [p[0] for p in PREDECLARED])
def test_amq_exchanges_cannot_be_deleted(s, name):
    expect_channel_error(lambda: s.ch.exchange_delete(name), 403, "ACCESS_REFUSED - ")
    ch = s.conn.channel()
    ch.exchange_declare(name, passive=True)  # still there


def test_default_exchange_cannot_be_bound_or_unbound(s):
    q = declare_queue(s.ch, exclusive=True)
    expect_channel_error(lambda: s.ch.queue_bind(q, "", routing_key="k"), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")
    ch = s.conn.channel()
    expect_channel_error(lambda: ch.queue_unbind(q, "", routing_key=q), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")


def test_default_exchange_cannot_be_deleted(s):
    expect_channel_error(lambda: s.ch.exchange_delete(""), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")


def test_default_exchange_passive_declare_is_403(s):
    expect_channel_error(lambda: s.ch.exchange_declare("", passive=True), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")


def test_default_exchange_cannot_be_declared(s):
    expect_channel_error(lambda: s.ch.exchange_declare("", "direct", durable=True), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")


# ---- exchange.declare ------------------------------------------------------------------------

def test_passive_declare_missing_exchange_is_404(s):
    x = uniq("x.missing")
    expect_channel_error(lambda: s.ch.exchange_declare(x, passive=True), 404,
                         f"NOT_FOUND - no {resource('exchange', x)}")
    assert s.conn.is_open, "404 is a channel error"


def test_passive_declare_ignores_other_properties(s):
    x = uniq("x")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.exchange_declare(x, "direct", passive=True, durable=True)


def test_redeclare_same_properties_is_ok(s):
    x = uniq("x")
    s.ch.exchange_declare(x, "topic", auto_delete=True, arguments={"foo": "bar"})
    s.ch.exchange_declare(x, "topic", auto_delete=True, arguments={"foo": "bar"})
    # other arguments than alternate-exchange are not compared
    s.ch.exchange_declare(x, "topic", auto_delete=True, arguments={"foo": "baz", "n": 1})


EQUIVALENCE = [
    # (first declare kwargs, second declare kwargs, arg, received, current)
    (dict(exchange_type="direct"), dict(exchange_type="fanout"), "type", "fanout", "direct"),
    (dict(exchange_type="direct"), dict(exchange_type="direct", durable=True), "durable",
     "true", "false"),
    (dict(exchange_type="direct", durable=True), dict(exchange_type="direct"), "durable",
     "false", "true"),
    (dict(exchange_type="direct"), dict(exchange_type="direct", auto_delete=True),
     "auto_delete", "true", "false"),
    (dict(exchange_type="direct"), dict(exchange_type="direct", internal=True), "internal",
     "true", "false"),
]


@pytest.mark.parametrize("first,second,arg,received,current", EQUIVALENCE,
                         ids=[e[2] + "-" + e[3] for e in EQUIVALENCE])
def test_exchange_equivalence(s, first, second, arg, received, current):
    x = uniq("x")
    s.ch.exchange_declare(x, **first)
    try:
        expect_channel_error(lambda: s.ch.exchange_declare(x, **second), 406,
                             f"PRECONDITION_FAILED - inequivalent arg '{arg}' for "
                             f"{resource('exchange', x)}: received '{received}' but current is "
                             f"'{current}'")
    finally:
        s.conn.channel().exchange_delete(x)


def test_exchange_equivalence_alternate_exchange(s):
    x = uniq("x")
    s.ch.exchange_declare(x, "direct", auto_delete=True,
                          arguments={"alternate-exchange": "ae1"})
    e = expect_channel_error(
        lambda: s.ch.exchange_declare(x, "direct", auto_delete=True,
                                      arguments={"alternate-exchange": "ae2"}),
        406, f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for "
             f"{resource('exchange', x)}")
    assert "ae2" in e.reply_text and "ae1" in e.reply_text, e.reply_text
    ch = s.conn.channel()
    expect_channel_error(
        lambda: ch.exchange_declare(x, "direct", auto_delete=True), 406,
        f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for "
        f"{resource('exchange', x)}")


def test_unknown_exchange_type_is_a_connection_error(s):
    # RabbitMQ 3.10: 503 COMMAND_INVALID, which closes the connection
    expect_connection_error(lambda: s.ch.exchange_declare(uniq("x"), "no-such-type"), 503,
                            "COMMAND_INVALID - unknown exchange type 'no-such-type'")


def test_durable_exchange_declare_and_delete(s):
    x = uniq("x.durable")
    s.ch.exchange_declare(x, "fanout", durable=True)
    s.ch.exchange_declare(x, passive=True)
    s.ch.exchange_delete(x)
    expect_channel_error(lambda: s.ch.exchange_declare(x, passive=True), 404,
                         f"NOT_FOUND - no {resource('exchange', x)}")


# ---- exchange.delete -------------------------------------------------------------------------

def test_delete_missing_exchange_is_ok(s):
    s.ch.exchange_delete(uniq("x.missing"))
    s.ch.exchange_delete(uniq("x.missing"), if_unused=True)
    assert s.ch.is_open


def test_delete_if_unused(s, amqp):
    x = uniq("x")
    s.ch.exchange_declare(x, "direct")
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, x, routing_key="k")
    expect_channel_error(lambda: s.ch.exchange_delete(x, if_unused=True), 406,
                         f"PRECONDITION_FAILED - {resource('exchange', x)} in use")
    ch = s.conn.channel()
    ch.queue_unbind(q, x, routing_key="k")
    ch.exchange_delete(x, if_unused=True)
    assert not exchange_exists(amqp, x)


def test_delete_if_unused_counts_only_bindings_from_the_exchange(s):
    src, dst = uniq("x.src"), uniq("x.dst")
    s.ch.exchange_declare(src, "fanout")
    s.ch.exchange_declare(dst, "fanout")
    s.ch.exchange_bind(dst, src)
    # dst is only a destination: not "in use"
    s.ch.exchange_delete(dst, if_unused=True)
    s.ch.exchange_delete(src, if_unused=True)


def test_delete_exchange_removes_its_bindings(s):
    x = uniq("x")
    s.ch.exchange_declare(x, "fanout")
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, x)
    s.ch.exchange_delete(x)
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.basic_publish(x, "", b"m")
    assert get_all(s.ch, q) == [], "a recreated exchange must not keep the old bindings"


def test_auto_delete_exchange_goes_with_its_last_binding(s, amqp):
    x = uniq("x.ad")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    assert exchange_exists(amqp, x), "auto-delete applies only after a binding went"
    q1 = declare_queue(s.ch, exclusive=True)
    q2 = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q1, x)
    s.ch.queue_bind(q2, x)
    s.ch.queue_unbind(q1, x)
    assert exchange_exists(amqp, x)
    s.ch.queue_delete(q2)
    assert not exchange_exists(amqp, x)


def test_auto_delete_exchange_goes_when_e2e_source_binding_goes(s, amqp):
    x, dst = uniq("x.ad"), uniq("x.dst")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.exchange_declare(dst, "fanout", auto_delete=False)
    s.ch.exchange_bind(dst, x)
    s.ch.exchange_unbind(dst, x)
    assert not exchange_exists(amqp, x)
    s.ch.exchange_delete(dst)


# ---- internal --------------------------------------------------------------------------------

def test_publish_to_internal_exchange_is_403(s):
    x = uniq("x.internal")
    s.ch.exchange_declare(x, "fanout", internal=True, auto_delete=True)
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, x)

    def publish():
        s.ch.basic_publish(x, "", b"m")
        s.ch.queue_declare(q, passive=True)

    expect_channel_error(publish, 403,
                         f"ACCESS_REFUSED - cannot publish to internal {resource('exchange', x)}")


def test_internal_exchange_reachable_through_e2e_binding(s):
    front, inner = uniq("x.front"), uniq("x.inner")
    s.ch.exchange_declare(front, "fanout", auto_delete=True)
    s.ch.exchange_declare(inner, "fanout", internal=True, auto_delete=True)
    s.ch.exchange_bind(inner, front)
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, inner)
    s.ch.basic_publish(front, "", b"through")
    s.ch.queue_declare(q, passive=True)
    assert get_all(s.ch, q) == [b"through"]


# ---- exchange-to-exchange bindings -----------------------------------------------------------

def test_e2e_binding_routes_with_destination_semantics(s):
    src, dst = uniq("x.src"), uniq("x.dst")
    s.ch.exchange_declare(src, "topic")
    s.ch.exchange_declare(dst, "direct", auto_delete=True)
    s.ch.exchange_bind(dst, src, routing_key="a.*")
    qs = bind_queues(s.ch, dst, {"ab": ["a.b"], "ac": ["a.c"]})
    assert routed(s.ch, qs, src, "a.b") == {"ab": 1, "ac": 0}
    assert routed(s.ch, qs, src, "a.c") == {"ab": 0, "ac": 1}
    assert routed(s.ch, qs, src, "b.b") == {"ab": 0, "ac": 0}
    s.ch.exchange_unbind(dst, src, routing_key="a.*")
    assert routed(s.ch, qs, src, "a.b") == {"ab": 0, "ac": 0}
    s.ch.exchange_delete(src)


def test_e2e_loop_delivers_each_queue_once(s):
    x1, x2 = uniq("x1"), uniq("x2")
    s.ch.exchange_declare(x1, "fanout", auto_delete=True)
    s.ch.exchange_declare(x2, "fanout", auto_delete=True)
    s.ch.exchange_bind(x2, x1)
    s.ch.exchange_bind(x1, x2)
    qs = {}
    qs.update(bind_queues(s.ch, x1, {"q1": [""]}))
    qs.update(bind_queues(s.ch, x2, {"q2": [""]}))
    s.ch.exchange_bind(x1, x1)  # a self loop too
    assert routed(s.ch, qs, x1, "") == {"q1": 1, "q2": 1}
    assert routed(s.ch, qs, x2, "") == {"q1": 1, "q2": 1}


def test_e2e_diamond_delivers_once(s):
    top, left, right = uniq("x.top"), uniq("x.l"), uniq("x.r")
    for x in (top, left, right):
        s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.exchange_bind(left, top)
    s.ch.exchange_bind(right, top)
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, left)
    s.ch.queue_bind(q, right)
    s.ch.queue_bind(q, top)
    assert routed(s.ch, {"q": q}, top, "") == {"q": 1}


def test_e2e_bind_missing_exchanges_is_404(s):
    x, missing = uniq("x"), uniq("x.missing")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    expect_channel_error(lambda: s.ch.exchange_bind(x, missing), 404,
                         f"NOT_FOUND - no {resource('exchange', missing)}")
    ch = s.conn.channel()
    expect_channel_error(lambda: ch.exchange_bind(missing, x), 404,
                         f"NOT_FOUND - no {resource('exchange', missing)}")


def test_e2e_unbind_missing_is_ok(s):
    x, y = uniq("x"), uniq("y")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.exchange_declare(y, "fanout", auto_delete=True)
    s.ch.exchange_unbind(y, x, routing_key="never-bound")


# ---- alternate exchange ----------------------------------------------------------------------

def test_alternate_exchange_gets_unroutable_messages(s):
    ae, x = uniq("x.ae"), uniq("x.main")
    s.ch.exchange_declare(ae, "fanout", auto_delete=True)
    s.ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    qs = bind_queues(s.ch, x, {"main": ["k"]})
    qs.update(bind_queues(s.ch, ae, {"ae": [""]}))
    assert routed(s.ch, qs, x, "k") == {"main": 1, "ae": 0}
    assert routed(s.ch, qs, x, "other") == {"main": 0, "ae": 1}


def test_alternate_exchange_suppresses_basic_return(s):
    ae, x = uniq("x.ae"), uniq("x.main")
    s.ch.exchange_declare(ae, "fanout", auto_delete=True)
    s.ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, ae)
    returned = []
    s.ch.add_on_return_callback(lambda *a: returned.append(a))
    s.ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    s.ch.queue_declare(q, passive=True)
    settle(s.conn)
    assert returned == []
    assert get_all(s.ch, q) == [b"m"]


def test_missing_alternate_exchange_means_unroutable(s):
    x = uniq("x.main")
    s.ch.exchange_declare(x, "direct", auto_delete=True,
                          arguments={"alternate-exchange": uniq("x.absent")})
    returned = []
    s.ch.add_on_return_callback(lambda _ch, m, _p, body: returned.append((m.reply_code, body)))
    s.ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    collect(s.conn, returned, 1)
    assert returned == [(312, b"m")]


def test_alternate_exchange_chain_and_loop(s):
    a, b = uniq("x.a"), uniq("x.b")
    s.ch.exchange_declare(a, "direct", auto_delete=True, arguments={"alternate-exchange": b})
    s.ch.exchange_declare(b, "direct", auto_delete=True, arguments={"alternate-exchange": a})
    qs = bind_queues(s.ch, b, {"b": ["kb"]})
    qs.update(bind_queues(s.ch, a, {"a": ["ka"]}))
    assert routed(s.ch, qs, a, "kb") == {"a": 0, "b": 1}
    assert routed(s.ch, qs, b, "ka") == {"a": 1, "b": 0}
    returned = []
    s.ch.add_on_return_callback(lambda _ch, m, _p, body: returned.append(m.reply_code))
    s.ch.basic_publish(a, "none", b"m", mandatory=True)  # a -> b -> a: no route, no hang
    collect(s.conn, returned, 1)
    assert returned == [312]


# ---- publish to a missing exchange ---------------------------------------------------------

def test_publish_to_missing_exchange_is_404(s):
    x = uniq("x.missing")

    def publish():
        s.ch.basic_publish(x, "k", b"m")
        s.ch.queue_declare(uniq("q"), exclusive=True)

    expect_channel_error(publish, 404, f"NOT_FOUND - no {resource('exchange', x)}")
    assert s.conn.is_open
