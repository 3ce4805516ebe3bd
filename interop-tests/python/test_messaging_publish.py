"""Publishing with pika: routing to each queue once, mandatory/basic.return, CC/BCC
sender-selected routing, properties and bodies passed through. Every test runs against Warren
and (with RABBITMQ_ADDR) RabbitMQ."""

import datetime
import decimal

import pika
import pika.exceptions
import pytest

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, expect_channel_error, get_all, s, session_factory, settle,
    uniq,
)


def sync(ch):
    """A round trip on ch: everything published before it was handled."""
    ch.queue_declare(uniq("sync"), exclusive=True)


def get_one(ch, q):
    m, props, body = ch.basic_get(q, auto_ack=True)
    assert m is not None, f"queue {q} is empty"
    return m, props, body


# ---- routing ---------------------------------------------------------------------------------

def test_each_matching_queue_gets_one_copy(s):
    x = uniq("x.topic")
    s.ch.exchange_declare(x, "topic", auto_delete=True)
    queues = [declare_queue(s.ch, exclusive=True) for _ in range(5)]
    for q in queues:
        for pattern in ("a.*", "*.b", "#", "a.b"):
            s.ch.queue_bind(q, x, routing_key=pattern)
    s.ch.basic_publish(x, "a.b", b"m")
    sync(s.ch)
    assert [get_all(s.ch, q) for q in queues] == [[b"m"]] * 5


def test_deliver_carries_exchange_and_routing_key(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.queue_bind(q, "amq.topic", routing_key="k.#")
    s.ch.basic_publish("amq.topic", "k.x.y", b"m")
    sync(s.ch)
    m, _p, _b = get_one(s.ch, q)
    assert (m.exchange, m.routing_key, m.redelivered) == ("amq.topic", "k.x.y", False)


# ---- mandatory -------------------------------------------------------------------------------

def returns_of(ch):
    out = []
    ch.add_on_return_callback(lambda _c, m, p, body: out.append((m, p, body)))
    return out


def test_mandatory_unroutable_is_returned_312_no_route(s):
    x = uniq("x.direct")
    s.ch.exchange_declare(x, "direct", auto_delete=True)
    declare_queue(s.ch, exclusive=True)
    returned = returns_of(s.ch)
    props = pika.BasicProperties(content_type="text/plain", message_id="id-1",
                                 headers={"h": "v"})
    s.ch.basic_publish(x, "no-binding", b"body", properties=props, mandatory=True)
    collect(s.conn, returned, 1)
    assert len(returned) == 1
    m, p, body = returned[0]
    assert (m.reply_code, m.reply_text, m.exchange, m.routing_key) == \
        (312, "NO_ROUTE", x, "no-binding")
    assert (p.content_type, p.message_id, p.headers, body) == \
        ("text/plain", "id-1", {"h": "v"}, b"body")


def test_mandatory_default_exchange_missing_queue_is_returned(s):
    returned = returns_of(s.ch)
    key = uniq("no-such-queue")
    s.ch.basic_publish("", key, b"x", mandatory=True)
    collect(s.conn, returned, 1)
    assert [(m.reply_code, m.reply_text, m.exchange, m.routing_key)
            for m, _p, _b in returned] == [(312, "NO_ROUTE", "", key)]


def test_mandatory_fanout_without_bindings_is_returned(s):
    x = uniq("x.fanout")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    returned = returns_of(s.ch)
    s.ch.basic_publish(x, "", b"x", mandatory=True)
    collect(s.conn, returned, 1)
    assert [m.reply_code for m, _p, _b in returned] == [312]


def test_mandatory_routed_is_not_returned(s):
    q = declare_queue(s.ch, exclusive=True)
    returned = returns_of(s.ch)
    s.ch.basic_publish("", q, b"x", mandatory=True)
    sync(s.ch)
    settle(s.conn)
    assert returned == []
    assert get_all(s.ch, q) == [b"x"]


def test_not_mandatory_unroutable_is_dropped_silently(s):
    returned = returns_of(s.ch)
    s.ch.basic_publish("amq.direct", uniq("nobody"), b"x")
    sync(s.ch)
    settle(s.conn)
    assert returned == []
    assert s.ch.is_open


# ---- CC / BCC --------------------------------------------------------------------------------

def _three_queues(ch):
    keys = [uniq("k1"), uniq("k2"), uniq("k3")]
    queues = []
    for k in keys:
        q = declare_queue(ch, exclusive=True)
        ch.queue_bind(q, "amq.direct", routing_key=k)
        queues.append(q)
    return keys, queues


def test_cc_and_bcc_route_to_extra_keys_and_bcc_is_stripped(s):
    (k1, k2, k3), (q1, q2, q3) = _three_queues(s.ch)
    headers = {"CC": [k2], "BCC": [k3], "other": "kept"}
    s.ch.basic_publish("amq.direct", k1, b"m", pika.BasicProperties(headers=headers))
    sync(s.ch)
    for q in (q1, q2, q3):
        m, p, body = get_one(s.ch, q)
        assert body == b"m"
        assert m.routing_key == k1, "deliver carries the publish routing key"
        assert p.headers == {"CC": [k2], "other": "kept"}, p.headers
        assert get_all(s.ch, q) == []


def test_cc_matching_the_routing_key_delivers_once(s):
    (k1, k2, _k3), (q1, q2, q3) = _three_queues(s.ch)
    s.ch.basic_publish("amq.direct", k1, b"m",
                       pika.BasicProperties(headers={"CC": [k1, k2, k2], "BCC": [k1]}))
    sync(s.ch)
    assert [len(get_all(s.ch, q)) for q in (q1, q2, q3)] == [1, 1, 0]


def test_cc_applies_with_the_exchange_semantics(s):
    q = declare_queue(s.ch, exclusive=True)
    tag = uniq("t")
    s.ch.queue_bind(q, "amq.topic", routing_key=f"{tag}.*")
    s.ch.basic_publish("amq.topic", "unbound", b"m",
                       pika.BasicProperties(headers={"CC": [f"{tag}.x"]}))
    sync(s.ch)
    assert get_all(s.ch, q) == [b"m"]


def test_bcc_only_route_makes_mandatory_succeed(s):
    (_k1, _k2, k3), (_q1, _q2, q3) = _three_queues(s.ch)
    returned = returns_of(s.ch)
    s.ch.basic_publish("amq.direct", uniq("nobody"), b"m",
                       pika.BasicProperties(headers={"BCC": [k3]}), mandatory=True)
    sync(s.ch)
    settle(s.conn)
    assert returned == []
    m, p, _b = get_one(s.ch, q3)
    assert p.headers == {} or p.headers is None, p.headers


def test_cc_not_an_array_is_406(s):
    (k1, k2, _k3), (q1, q2, _q3) = _three_queues(s.ch)

    def publish():
        s.ch.basic_publish("amq.direct", k1, b"m", pika.BasicProperties(headers={"CC": k2}))
        sync(s.ch)

    # RabbitMQ 3.10 (rabbit_basic:header_routes) rejects a CC/BCC that is not an array
    expect_channel_error(publish, 406, 'PRECONDITION_FAILED - invalid message: '
                                       '{unacceptable_type_in_header,"CC",longstr}')
    ch = s.conn.channel()
    assert [len(get_all(ch, q)) for q in (q1, q2)] == [0, 0]


# ---- properties and bodies -------------------------------------------------------------------

ALL_HEADERS = {
    "str": "text é ✓",
    "empty": "",
    "int": 42,
    "neg": -7,
    "big": 2 ** 40,
    "true": True,
    "false": False,
    "none": None,
    "bytes": b"\x00\x01\xff",
    "list": [1, "two", [3], {"four": 4}],
    "table": {"nested": {"deep": "yes"}, "n": 1},
    "decimal": decimal.Decimal("3.14"),
    "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
}


def full_properties():
    return pika.BasicProperties(
        content_type="application/x-test",
        content_encoding="gzip",
        headers=ALL_HEADERS,
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply-queue",
        expiration="60000",
        message_id="msg-1",
        timestamp=1700000000,
        type="kind",
        user_id="guest",
        app_id="app",
    )


PROPERTY_NAMES = ["content_type", "content_encoding", "headers", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                  "type", "user_id", "app_id", "cluster_id"]


def _props_dict(p):
    return {n: getattr(p, n) for n in PROPERTY_NAMES}


def test_all_properties_pass_through_get(s):
    q = declare_queue(s.ch, exclusive=True)
    sent = full_properties()
    body = bytes(range(256)) * 3
    s.ch.basic_publish("", q, body, sent)
    _m, got, got_body = get_one(s.ch, q)
    assert got_body == body
    assert _props_dict(got) == _props_dict(sent)


def test_all_properties_pass_through_consume(s):
    q = declare_queue(s.ch, exclusive=True)
    sent = full_properties()
    got = []
    s.ch.basic_consume(q, lambda ch, m, p, b: got.append((p, b)), auto_ack=True)
    s.ch.basic_publish("", q, b"\x00body\xce", sent)
    collect(s.conn, got, 1)
    assert len(got) == 1
    p, b = got[0]
    assert b == b"\x00body\xce"
    assert _props_dict(p) == _props_dict(sent)


def test_no_properties_and_empty_body(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_publish("", q, b"")
    _m, p, body = get_one(s.ch, q)
    assert body == b""
    assert all(v is None for v in _props_dict(p).values()), _props_dict(p)


@pytest.mark.parametrize("size", [131072 - 8, 131072 - 7, 131072, 1_000_003, 5 * 1024 * 1024])
def test_large_bodies_across_frames(s, size):
    q = declare_queue(s.ch, exclusive=True)
    body = bytes((i * 7 + size) % 251 for i in range(size))
    s.ch.basic_publish("", q, body)
    got = []
    s.ch.basic_consume(q, lambda ch, m, p, b: got.append(b), auto_ack=True)
    collect(s.conn, got, 1, timeout=20)
    assert len(got) == 1 and len(got[0]) == size and got[0] == body


def test_user_id_must_match_login(s):
    q = declare_queue(s.ch, exclusive=True)

    def publish():
        s.ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="mallory"))
        sync(s.ch)

    expect_channel_error(publish, 406, "PRECONDITION_FAILED - user_id property set to "
                                       "'mallory' but authenticated user was 'guest'")


BAD_EXPIRATIONS = [
    ("-1", "{value_negative,-1}"),
    ("abc", "no_integer"),
    ("1.5", '{leftover_string,".5"}'),
    ("", "no_integer"),
]


@pytest.mark.parametrize("expiration,why", BAD_EXPIRATIONS,
                         ids=[repr(e) for e, _ in BAD_EXPIRATIONS])
def test_invalid_expiration_is_406(s, expiration, why):
    q = declare_queue(s.ch, exclusive=True)

    def publish():
        s.ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
        sync(s.ch)

    e = expect_channel_error(publish, 406, f"PRECONDITION_FAILED - invalid expiration "
                                           f"'{expiration}'")
    assert e.reply_text == f"PRECONDITION_FAILED - invalid expiration '{expiration}': {why}"


def test_valid_expiration_passes_through(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_publish("", q, b"x", pika.BasicProperties(expiration="0"))
    s.ch.basic_publish("", q, b"y", pika.BasicProperties(expiration="86400000"))
    sync(s.ch)
    _m, p, body = get_one(s.ch, q)
    assert (body, p.expiration) == (b"y", "86400000"), "expiration 0 expires at once"


def test_many_messages_keep_order(s):
    q = declare_queue(s.ch, exclusive=True)
    for i in range(2000):
        s.ch.basic_publish("", q, b"%d" % i)
    got = []
    s.ch.basic_consume(q, lambda ch, m, p, b: got.append(b), auto_ack=True)
    collect(s.conn, got, 2000, timeout=20)
    assert got == [b"%d" % i for i in range(2000)]
