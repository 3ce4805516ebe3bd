"""Queues with pika: declare (server-named, passive counts, durable, exclusive, auto-delete,
equivalence), bind/unbind, purge, delete, and "" as the channel's last declared queue. Every
test runs against Warren and (with RABBITMQ_ADDR) RabbitMQ."""

import re

import pika
import pika.exceptions
import pytest

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, expect_channel_error, get_all, queue_exists, resource, s,
    session_factory, uniq, wait_until,
)

SERVER_NAMED = re.compile(r"^amq\.gen-[A-Za-z0-9_-]{22}$")
LOCKED = "RESOURCE_LOCKED - cannot obtain exclusive access to locked "


# ---- declare ---------------------------------------------------------------------------------

def test_server_named_queue(s):
    names = {s.ch.queue_declare("", exclusive=True).method.queue for _ in range(20)}
    assert len(names) == 20
    for n in names:
        assert SERVER_NAMED.match(n), n


def test_declare_ok_reports_counts(s, session_factory):
    q = declare_queue(s.ch)
    ok = s.ch.queue_declare(q)
    assert (ok.method.queue, ok.method.message_count, ok.method.consumer_count) == (q, 0, 0)
    for i in range(3):
        s.ch.basic_publish("", q, b"%d" % i)
    # counts are eventually consistent in RabbitMQ (publishes are asynchronous)
    wait_until(lambda: s.ch.queue_declare(q, passive=True).method.message_count == 3,
               what="message_count 3")
    ok = s.ch.queue_declare(q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (3, 0)
    # a consumer with prefetch 1 holds one unacked message: counts are ready messages only
    other = session_factory()
    other.ch.basic_qos(prefetch_count=1)
    got = []
    other.ch.basic_consume(q, lambda ch, m, p, b: got.append(b))
    collect(other.conn, got, 1)
    assert got == [b"0"]
    ok = s.ch.queue_declare(q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (2, 1)
    # a non-passive redeclare reports the same
    ok = s.ch.queue_declare(q)
    assert (ok.method.message_count, ok.method.consumer_count) == (2, 1)
    s.ch.queue_delete(q)


def test_passive_declare_missing_queue_is_404(s):
    q = uniq("q.missing")
    expect_channel_error(lambda: s.ch.queue_declare(q, passive=True), 404,
                         f"NOT_FOUND - no {resource('queue', q)}")
    assert s.conn.is_open


def test_passive_declare_ignores_other_properties(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_declare(q, passive=True, durable=True, auto_delete=True,
                       arguments={"x-max-length": 3})


def test_durable_queue_declare(s):
    q = declare_queue(s.ch, durable=True)
    s.ch.queue_declare(q, durable=True)
    s.ch.queue_delete(q)


EQUIVALENCE = [
    (dict(), dict(durable=True), "durable", "true", "false"),
    (dict(durable=True), dict(), "durable", "false", "true"),
    (dict(), dict(auto_delete=True), "auto_delete", "true", "false"),
    (dict(auto_delete=True), dict(), "auto_delete", "false", "true"),
    (dict(arguments={"x-message-ttl": 1000}), dict(arguments={"x-message-ttl": 2000}),
     "x-message-ttl", "2000", "1000"),
]


@pytest.mark.parametrize("first,second,arg,received,current", EQUIVALENCE,
                         ids=[f"{e[2]}-{e[3]}" for e in EQUIVALENCE])
def test_queue_equivalence(s, first, second, arg, received, current):
    q = uniq("q")
    s.ch.queue_declare(q, **first)
    try:
        expect_channel_error(lambda: s.ch.queue_declare(q, **second), 406,
                             f"PRECONDITION_FAILED - inequivalent arg '{arg}' for "
                             f"{resource('queue', q)}: received '{received}' but current is "
                             f"'{current}'")
    finally:
        s.conn.channel().queue_delete(q)


def test_queue_equivalence_missing_argument(s):
    q = uniq("q")
    s.ch.queue_declare(q, auto_delete=True, arguments={"x-max-length": 10})
    expect_channel_error(lambda: s.ch.queue_declare(q, auto_delete=True), 406,
                         f"PRECONDITION_FAILED - inequivalent arg 'x-max-length' for "
                         f"{resource('queue', q)}: received none but current is the value '10' "
                         f"of type 'signedint'")
    s.conn.channel().queue_delete(q)


def test_queue_equivalence_exclusive_same_connection(s):
    q = declare_queue(s.ch, exclusive=True)
    expect_channel_error(lambda: s.ch.queue_declare(q), 405, LOCKED)


def test_queue_unknown_arguments_are_not_compared(s):
    q = declare_queue(s.ch, exclusive=True, arguments={"foo": 1})
    s.ch.queue_declare(q, exclusive=True, arguments={"foo": 2, "bar": "x"})


def test_invalid_queue_argument_is_406(s):
    q = uniq("q")
    expect_channel_error(
        lambda: s.ch.queue_declare(q, arguments={"x-max-length": "ten"}), 406,
        f"PRECONDITION_FAILED - invalid arg 'x-max-length' for {resource('queue', q)}")


INVALID_ARGS = [
    ("x-max-length", -1, "invalid arg 'x-max-length' for {q}: {{value_negative,-1}}"),
    ("x-max-length", "ten", "invalid arg 'x-max-length' for {q}: \"expected integer, got "
                            "longstr\""),
    ("x-message-ttl", -5, "invalid arg 'x-message-ttl' for {q}: {{value_negative,-5}}"),
    ("x-expires", 0, "invalid arg 'x-expires' for {q}: {{value_zero,0}}"),
    ("x-overflow", "bogus", "invalid arg 'x-overflow' for {q}: invalid_overflow"),
    ("x-max-priority", 300, "invalid arg 'x-max-priority' for {q}: {{max_value_exceeded,300}}"),
    ("x-dead-letter-exchange", 5, "invalid type 'signedint' for arg 'x-dead-letter-exchange' "
                                  "in {q}"),
    ("x-single-active-consumer", "true",
     "invalid arg 'x-single-active-consumer' for {q}: {{unacceptable_type,longstr}}"),
    ("x-queue-mode", "bogus", "invalid arg 'x-queue-mode' for {q}: \"unsupported queue mode "
                              "'bogus'\""),
    ("x-queue-mode", 5, "invalid arg 'x-queue-mode' for {q}: {{unacceptable_type,signedint}}"),
    ("x-queue-version", 3, "invalid arg 'x-queue-version' for {q}: \"unsupported queue version "
                           "'3'\""),
    ("x-queue-version", "2", "invalid arg 'x-queue-version' for {q}: \"expected integer, got "
                             "longstr\""),
] + [
    # Quorum queue and stream arguments, refused on a classic queue whatever their value.
    (arg, value, "invalid arg '" + arg + "' for {q} of queue type rabbit_classic_queue")
    for arg, value in [
        ("x-delivery-limit", 2), ("x-delivery-limit", "abc"), ("x-dead-letter-strategy",
                                                              "at-least-once"),
        ("x-max-in-memory-length", 5), ("x-max-in-memory-bytes", 5),
        ("x-quorum-initial-group-size", 3), ("x-max-age", "1D"),
        ("x-stream-max-segment-size-bytes", 100), ("x-initial-cluster-size", 1),
        ("x-queue-leader-locator", "client-local"),
    ]
]


def test_classic_queue_arguments_rabbitmq_accepts(s):
    for args in ({"x-queue-version": 1}, {"x-queue-version": 2}, {"x-queue-mode": "lazy"},
                 {"x-queue-mode": "default"}, {"x-queue-master-locator": "client-local"},
                 {"x-max-priority": 0}, {"x-overflow": "reject-publish-dlx"},
                 {"x-queue-type": "classic"}, {"x-consumer-timeout": 1000}):
        s.ch.queue_declare(uniq("q"), arguments=args, auto_delete=True)


@pytest.mark.parametrize("arg,value,text", INVALID_ARGS,
                         ids=[f"{a}={v!r}" for a, v, _ in INVALID_ARGS])
def test_invalid_queue_argument_full_text(s, arg, value, text):
    q = uniq("q")
    expected = "PRECONDITION_FAILED - " + text.format(q=resource("queue", q))
    e = expect_channel_error(lambda: s.ch.queue_declare(q, arguments={arg: value}), 406,
                             expected[:60])
    assert e.reply_text == expected


def test_amq_prefixed_queue_name_is_403(s):
    q = uniq("amq.custom")
    expect_channel_error(lambda: s.ch.queue_declare(q), 403,
                         f"ACCESS_REFUSED - queue name '{q}' contains reserved prefix 'amq.*'")


# ---- exclusive -------------------------------------------------------------------------------

def _locked(q):
    return f"{LOCKED}{resource('queue', q)}"


@pytest.mark.parametrize("op", ["declare", "passive", "consume", "get", "purge", "delete",
                                "bind"])
def test_exclusive_queue_is_locked_to_other_connections(s, session_factory, op):
    q = declare_queue(s.ch, exclusive=True)
    other = session_factory().ch
    action = {
        "declare": lambda: other.queue_declare(q, exclusive=True),
        "passive": lambda: other.queue_declare(q, passive=True),
        "consume": lambda: other.basic_consume(q, lambda *a: None),
        "get": lambda: other.basic_get(q),
        "purge": lambda: other.queue_purge(q),
        "delete": lambda: other.queue_delete(q),
        "bind": lambda: other.queue_bind(q, "amq.fanout"),
    }[op]
    expect_channel_error(action, 405, _locked(q))
    # the owner still uses it
    s.ch.basic_publish("", q, b"mine")
    assert get_all(s.ch, q) == [b"mine"]


def test_exclusive_queue_unbind_from_other_connection(s, session_factory):
    # RabbitMQ looks the binding up first: removing a binding that does not exist succeeds
    # even on another connection's exclusive queue; removing one that exists is 405.
    q = declare_queue(s.ch, exclusive=True)
    x = uniq("x")
    s.ch.exchange_declare(x, "fanout")
    other = session_factory()
    other.ch.queue_unbind(q, x, routing_key="never-bound")
    s.ch.queue_bind(q, x, routing_key="k")
    expect_channel_error(lambda: other.ch.queue_unbind(q, x, routing_key="k"), 405, _locked(q))
    s.ch.basic_publish(x, "", b"still bound")
    s.ch.queue_declare(q, passive=True)
    assert get_all(s.ch, q) == [b"still bound"]
    s.ch.exchange_delete(x)


def test_exclusive_queue_usable_from_other_channels_of_its_connection(s):
    q = declare_queue(s.ch, exclusive=True)
    ch2 = s.conn.channel()
    ch2.queue_declare(q, passive=True)
    ch2.basic_publish("", q, b"x")
    assert get_all(ch2, q) == [b"x"]


def test_publish_to_exclusive_queue_from_other_connection_is_allowed(s, session_factory):
    q = declare_queue(s.ch, exclusive=True)
    other = session_factory().ch
    other.basic_publish("", q, b"from-other")
    other.queue_declare(uniq("sync"), exclusive=True)
    wait_until(lambda: s.ch.queue_declare(q, passive=True).method.message_count == 1)
    assert get_all(s.ch, q) == [b"from-other"]


def test_exclusive_queue_deleted_with_its_connection(amqp, session_factory):
    owner = session_factory()
    q = declare_queue(owner.ch, exclusive=True)
    owner.ch.basic_publish("", q, b"x")
    owner.conn.close()
    wait_until(lambda: not queue_exists(amqp, q), what=f"exclusive queue {q} to be deleted")
    # the name is free again, for anyone
    s2 = session_factory()
    s2.ch.queue_declare(q, exclusive=True)


def test_exclusive_queue_survives_its_channel(s, amqp):
    ch = s.conn.channel()
    q = declare_queue(ch, exclusive=True)
    ch.close()
    s.ch.queue_declare(q, passive=True)


# ---- auto-delete -----------------------------------------------------------------------------

def test_auto_delete_queue_goes_after_last_consumer(s, amqp):
    q = declare_queue(s.ch, auto_delete=True)
    assert queue_exists(amqp, q), "no consumer yet: not deleted"
    t1 = s.ch.basic_consume(q, lambda *a: None)
    t2 = s.ch.basic_consume(q, lambda *a: None)
    s.ch.basic_cancel(t1)
    assert queue_exists(amqp, q), "one consumer left"
    s.ch.basic_cancel(t2)
    wait_until(lambda: not queue_exists(amqp, q), what="auto-delete queue to go")


def test_auto_delete_queue_goes_when_consumer_channel_closes(s, amqp):
    q = declare_queue(s.ch, auto_delete=True)
    ch = s.conn.channel()
    ch.basic_consume(q, lambda *a: None)
    ch.close()
    wait_until(lambda: not queue_exists(amqp, q), what="auto-delete queue to go")


def test_auto_delete_queue_survives_basic_get(s, amqp):
    q = declare_queue(s.ch, auto_delete=True)
    s.ch.basic_publish("", q, b"x")
    assert get_all(s.ch, q) == [b"x"]
    assert queue_exists(amqp, q)
    s.ch.queue_delete(q)


# ---- bind / unbind ---------------------------------------------------------------------------

def test_bind_to_missing_exchange_is_404(s):
    q = declare_queue(s.ch, exclusive=True)
    x = uniq("x.missing")
    expect_channel_error(lambda: s.ch.queue_bind(q, x, routing_key="k"), 404,
                         f"NOT_FOUND - no {resource('exchange', x)}")


def test_bind_missing_queue_is_404(s):
    q = uniq("q.missing")
    expect_channel_error(lambda: s.ch.queue_bind(q, "amq.direct", routing_key="k"), 404,
                         f"NOT_FOUND - no {resource('queue', q)}")


def test_bind_twice_is_idempotent(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, "amq.direct", routing_key=q)
    s.ch.queue_bind(q, "amq.direct", routing_key=q)
    s.ch.basic_publish("amq.direct", q, b"once")
    s.ch.queue_declare(q, passive=True)
    assert get_all(s.ch, q) == [b"once"]
    s.ch.queue_unbind(q, "amq.direct", routing_key=q)
    s.ch.basic_publish("amq.direct", q, b"none")
    s.ch.queue_declare(q, passive=True)
    assert get_all(s.ch, q) == []


def test_bind_arguments_distinguish_bindings(s):
    q = declare_queue(s.ch, exclusive=True)
    x = uniq("x.headers")
    s.ch.exchange_declare(x, "headers", auto_delete=True)
    s.ch.queue_bind(q, x, arguments={"a": "1"})
    s.ch.queue_bind(q, x, arguments={"b": "2"})
    s.ch.queue_unbind(q, x, arguments={"a": "1"})
    s.ch.basic_publish(x, "", b"a", pika.BasicProperties(headers={"a": "1"}))
    s.ch.basic_publish(x, "", b"b", pika.BasicProperties(headers={"b": "2"}))
    s.ch.queue_declare(q, passive=True)
    assert get_all(s.ch, q) == [b"b"]


def test_unbind_missing_things_is_ok(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_unbind(q, "amq.direct", routing_key="never-bound")
    s.ch.queue_unbind(uniq("q.missing"), "amq.direct", routing_key="k")
    s.ch.queue_unbind(q, uniq("x.missing"), routing_key="k")
    assert s.ch.is_open


# ---- purge -----------------------------------------------------------------------------------

def test_purge_returns_count_and_leaves_unacked(s):
    q = declare_queue(s.ch, exclusive=True)
    for i in range(5):
        s.ch.basic_publish("", q, b"%d" % i)
    m, _p, _b = s.ch.basic_get(q)  # one unacked
    ok = s.ch.queue_purge(q)
    assert ok.method.message_count == 4
    assert s.ch.queue_purge(q).method.message_count == 0
    s.ch.basic_nack(m.delivery_tag, requeue=True)
    assert get_all(s.ch, q) == [b"0"]


def test_purge_missing_queue_is_404(s):
    q = uniq("q.missing")
    expect_channel_error(lambda: s.ch.queue_purge(q), 404,
                         f"NOT_FOUND - no {resource('queue', q)}")


# ---- delete ----------------------------------------------------------------------------------

def test_delete_returns_message_count(s, amqp):
    q = declare_queue(s.ch)
    for i in range(7):
        s.ch.basic_publish("", q, b"%d" % i)
    ok = s.ch.queue_delete(q)
    assert ok.method.message_count == 7
    assert not queue_exists(amqp, q)


def test_delete_missing_queue_is_ok(s):
    ok = s.ch.queue_delete(uniq("q.missing"))
    assert ok.method.message_count == 0
    ok = s.ch.queue_delete(uniq("q.missing"), if_unused=True, if_empty=True)
    assert ok.method.message_count == 0


def test_delete_if_unused(s, amqp):
    q = declare_queue(s.ch)
    tag = s.ch.basic_consume(q, lambda *a: None)
    ch2 = s.conn.channel()
    expect_channel_error(lambda: ch2.queue_delete(q, if_unused=True), 406,
                         f"PRECONDITION_FAILED - {resource('queue', q)} in use")
    s.ch.basic_cancel(tag)
    s.ch.queue_delete(q, if_unused=True)
    assert not queue_exists(amqp, q)


def test_delete_if_empty(s, amqp):
    q = declare_queue(s.ch)
    s.ch.basic_publish("", q, b"x")
    ch2 = s.conn.channel()
    expect_channel_error(lambda: ch2.queue_delete(q, if_empty=True), 406,
                         f"PRECONDITION_FAILED - {resource('queue', q)} not empty")
    s.ch.queue_purge(q)
    assert s.ch.queue_delete(q, if_empty=True).method.message_count == 0
    assert not queue_exists(amqp, q)


def test_delete_removes_bindings(s):
    x = uniq("x")
    s.ch.exchange_declare(x, "fanout")
    q = declare_queue(s.ch)
    s.ch.queue_bind(q, x)
    s.ch.queue_delete(q)
    s.ch.queue_declare(q, exclusive=True)
    s.ch.basic_publish(x, "", b"m")
    assert get_all(s.ch, q) == []
    s.ch.exchange_delete(x)


# ---- "" = the channel's last declared queue --------------------------------------------------

def test_empty_name_means_last_declared_queue(s, amqp):
    q = s.ch.queue_declare("", exclusive=True).method.queue
    s.ch.queue_bind("", "amq.direct", routing_key=q)
    s.ch.basic_publish("amq.direct", q, b"via-bind")
    s.ch.queue_declare(q, passive=True)
    m, _p, body = s.ch.basic_get("", auto_ack=True)
    assert body == b"via-bind"
    assert m.message_count == 0
    s.ch.basic_publish("", q, b"p")
    assert s.ch.queue_purge("").method.message_count == 1
    got = []
    tag = s.ch.basic_consume("", lambda ch, m, p, b: got.append(b), auto_ack=True)
    s.ch.basic_publish("", q, b"c")
    collect(s.conn, got, 1)
    assert got == [b"c"]
    s.ch.basic_cancel(tag)
    s.ch.queue_unbind("", "amq.direct", routing_key=q)
    s.ch.basic_publish("", q, b"d")
    assert s.ch.queue_delete("").method.message_count == 1
    assert not queue_exists(amqp, q)


def test_empty_name_is_per_channel(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_publish("", q, b"x")
    ch2 = s.conn.channel()
    expect_channel_error(lambda: ch2.basic_get(""), 404,
                         "NOT_FOUND - no previously declared queue")


@pytest.mark.parametrize("op", ["bind", "get", "purge", "consume", "delete"])
def test_empty_name_without_declared_queue_is_404(s, op):
    action = {
        "bind": lambda: s.ch.queue_bind("", "amq.direct", routing_key="k"),
        "get": lambda: s.ch.basic_get(""),
        "purge": lambda: s.ch.queue_purge(""),
        "consume": lambda: s.ch.basic_consume("", lambda *a: None),
        "delete": lambda: s.ch.queue_delete(""),
    }[op]
    expect_channel_error(action, 404, "NOT_FOUND - no previously declared queue")


def test_passive_declare_of_empty_name_is_not_the_shortcut(s):
    # queue.declare never expands "": a passive declare of "" looks for a queue named ""
    expect_channel_error(lambda: s.ch.queue_declare("", passive=True), 404,
                         "NOT_FOUND - no queue '' in vhost '/'")
    ch = s.conn.channel()
    declare_queue(ch, exclusive=True)
    expect_channel_error(lambda: ch.queue_declare("", passive=True), 404,
                         "NOT_FOUND - no queue '' in vhost '/'")


INVALID_X_MATCH = [
    ("bogus", 'Invalid x-match field value <<"bogus">>; expected all, any, all-with-x, or '
              'any-with-x'),
    ("ALL", 'Invalid x-match field value <<"ALL">>; expected all, any, all-with-x, or '
            'any-with-x'),
    (1, "Invalid x-match field type signedint (value 1); expected longstr"),
]


@pytest.mark.parametrize("value,text", INVALID_X_MATCH, ids=[repr(v) for v, _ in INVALID_X_MATCH])
def test_invalid_x_match_is_406(s, value, text):
    x = uniq("x.headers")
    s.ch.exchange_declare(x, "headers", auto_delete=True)
    q = declare_queue(s.ch, exclusive=True)
    e = expect_channel_error(lambda: s.ch.queue_bind(q, x, arguments={"x-match": value}), 406,
                             "PRECONDITION_FAILED - Invalid x-match field ")
    assert e.reply_text == "PRECONDITION_FAILED - " + text


def test_empty_name_follows_passive_declare(s, session_factory):
    q1 = declare_queue(s.ch, exclusive=True)
    q2 = declare_queue(s.ch, exclusive=True)
    s.ch.queue_declare(q1, passive=True)
    s.ch.basic_publish("", q1, b"one")
    m, _p, body = s.ch.basic_get("", auto_ack=True)
    assert body == b"one", "passive declare sets the last declared queue"
    s.ch.queue_delete(q2)
