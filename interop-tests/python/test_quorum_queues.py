"""Quorum queues (`x-queue-type: quorum`) with pika, as RabbitMQ 3.10's on a single node:
durable only, their own set of arguments, a delivery count (`x-delivery-count`) with
`x-delivery-limit`, no global QoS and no conditional delete. Also run against RabbitMQ by the
differential stage."""
import time

import pika
import pytest

from test_messaging_helpers import resource, uniq

QUORUM = {"x-queue-type": "quorum"}


def _open(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    return conn, conn.channel()


def _quorum(ch, extra=None, name=None):
    q = name or uniq("qq")
    args = dict(QUORUM)
    args.update(extra or {})
    ok = ch.queue_declare(q, durable=True, arguments=args).method
    assert (ok.message_count, ok.consumer_count) == (0, 0)
    return q


def _expect(conn_or_ch_fn, code, text):
    with pytest.raises((pika.exceptions.ChannelClosedByBroker,
                        pika.exceptions.ConnectionClosedByBroker)) as e:
        conn_or_ch_fn()
    assert (e.value.reply_code, e.value.reply_text) == (code, text)


@pytest.mark.parametrize("props,refused", [
    ({"durable": False}, "non-durable"),
    ({"durable": True, "exclusive": True}, "exclusive-owner"),
    ({"durable": True, "auto_delete": True}, "auto-delete"),
])
def test_a_quorum_queue_is_durable_shared_and_kept(broker, props, refused):
    conn, ch = _open(broker)
    q = uniq("qq")
    _expect(lambda: ch.queue_declare(q, arguments=QUORUM, **props), 406,
            f"PRECONDITION_FAILED - invalid property '{refused}' for {resource('queue', q)}")
    conn.close()


@pytest.mark.parametrize("arg,value", [
    ("x-max-priority", 5), ("x-queue-mode", "lazy"), ("x-queue-version", 2),
    ("x-queue-master-locator", "client-local"), ("x-max-age", "1D"),
    ("x-stream-max-segment-size-bytes", 100), ("x-initial-cluster-size", 1),
])
def test_classic_and_stream_arguments_are_refused(broker, arg, value):
    conn, ch = _open(broker)
    q = uniq("qq")
    _expect(lambda: ch.queue_declare(q, durable=True, arguments={**QUORUM, arg: value}), 406,
            f"PRECONDITION_FAILED - invalid arg '{arg}' for {resource('queue', q)} of queue "
            "type rabbit_quorum_queue")
    conn.close()


def test_quorum_arguments_are_accepted(broker):
    conn, ch = _open(broker)
    for extra in ({"x-delivery-limit": 3}, {"x-dead-letter-strategy": "at-most-once"},
                  {"x-max-in-memory-length": 5}, {"x-quorum-initial-group-size": 3},
                  {"x-queue-leader-locator": "balanced"}, {"x-overflow": "reject-publish"},
                  {"x-max-length": 5}, {"x-message-ttl": 1000}, {"x-expires": 60000},
                  {"x-single-active-consumer": True}):
        q = _quorum(ch, extra)
        ch.queue_delete(q)
    q = uniq("qq")
    _expect(lambda: ch.queue_declare(q, durable=True, arguments={
        **QUORUM, "x-dead-letter-strategy": "bogus"}), 406,
        f"PRECONDITION_FAILED - invalid arg 'x-dead-letter-strategy' for "
        f"{resource('queue', q)}: invalid_dlx_strategy")
    conn.close()


def test_redeclaring_with_another_type_is_inequivalent(broker):
    conn, ch = _open(broker)
    q = _quorum(ch)
    _expect(lambda: ch.queue_declare(q, durable=True), 406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for {resource('queue', q)}: "
            "received none but current is the value 'quorum' of type 'longstr'")
    ch = conn.channel()
    ch.queue_delete(q)
    conn.close()


def test_delivery_count_and_delivery_limit(broker):
    """basic.get always shows x-delivery-count, from 0; the third return of a message with
    x-delivery-limit 2 dead-letters it (reason delivery_limit)."""
    conn, ch = _open(broker)
    dlq = uniq("qq-dlq")
    ch.queue_declare(dlq, auto_delete=True)
    q = _quorum(ch, {"x-delivery-limit": 2, "x-dead-letter-exchange": "",
                     "x-dead-letter-routing-key": dlq})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"a": 1}))
    seen = []
    for _ in range(3):
        method, props, body = ch.basic_get(q)
        seen.append((body, method.redelivered, props.headers))
        ch.basic_reject(method.delivery_tag, requeue=True)
    assert seen == [(b"poison", False, {"a": 1, "x-delivery-count": 0}),
                    (b"poison", True, {"a": 1, "x-delivery-count": 1}),
                    (b"poison", True, {"a": 1, "x-delivery-count": 2})]
    deadline = time.monotonic() + 5
    while ch.queue_declare(dlq, passive=True).method.message_count != 1:
        assert time.monotonic() < deadline, "the message over the limit was not dead-lettered"
        time.sleep(0.02)
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    _m, props, body = ch.basic_get(dlq, auto_ack=True)
    death = props.headers["x-death"][0]
    assert (body, death["reason"], death["queue"], death["count"]) == (
        b"poison", "delivery_limit", q, 1)
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    ch.queue_delete(q)
    conn.close()


def test_consumers_see_the_count_once_a_message_came_back(broker):
    conn, ch = _open(broker)
    q = _quorum(ch)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"z")
    got = []
    cch = conn.channel()
    cch.basic_consume(q, lambda c, m, p, b: got.append((m.redelivered, p.headers)))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == [(False, None)]
    cch.close()
    method, props, _b = ch.basic_get(q, auto_ack=True)
    assert (method.redelivered, props.headers) == (True, {"x-delivery-count": 1})
    ch.queue_delete(q)
    conn.close()


def test_without_a_limit_messages_come_back_forever(broker):
    conn, ch = _open(broker)
    q = _quorum(ch)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"again")
    for n in range(5):
        method, props, _b = ch.basic_get(q)
        assert props.headers["x-delivery-count"] == n
        ch.basic_nack(method.delivery_tag, requeue=True)
    ch.queue_delete(q)
    conn.close()


def test_returned_messages_go_to_the_back_in_the_order_they_came_back(broker):
    conn, ch = _open(broker)
    q = _quorum(ch)
    ch.confirm_delivery()
    for body in (b"a", b"b", b"c", b"d"):
        ch.basic_publish("", q, body)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    ch.basic_reject(tags[2], requeue=True)
    ch.basic_reject(tags[0], requeue=True)
    ch.basic_publish("", q, b"e")
    assert [ch.basic_get(q, auto_ack=True)[2] for _ in range(4)] == [b"d", b"c", b"a", b"e"]
    ch.queue_delete(q)
    conn.close()


def test_a_closed_channel_s_messages_go_back_to_their_place(broker):
    """Unlike a client's own return: after rejecting b (to the back), closing the channel
    puts a and c back where they were."""
    conn, ch = _open(broker)
    q = _quorum(ch)
    ch.confirm_delivery()
    for body in (b"a", b"b", b"c", b"d", b"e"):
        ch.basic_publish("", q, body)
    gch = conn.channel()
    tags = [gch.basic_get(q)[0].delivery_tag for _ in range(3)]
    gch.basic_reject(tags[1], requeue=True)
    gch.close()
    got = [ch.basic_get(q, auto_ack=True) for _ in range(5)]
    assert [(b, m.redelivered) for m, _p, b in got] == [
        (b"a", True), (b"c", True), (b"d", False), (b"e", False), (b"b", True)]
    ch.queue_delete(q)
    conn.close()


def test_global_qos_is_refused(broker):
    conn, ch = _open(broker)
    q = _quorum(ch)
    cch = conn.channel()
    cch.basic_qos(prefetch_count=5, global_qos=True)
    _expect(lambda: cch.basic_consume(q, lambda *a: None), 540,
            f"NOT_IMPLEMENTED - {resource('queue', q)} does not support global qos")
    conn, ch = _open(broker)
    # Global prefetch 0 (none) and per-consumer prefetch are fine.
    ch.basic_qos(prefetch_count=0, global_qos=True)
    ch.basic_qos(prefetch_count=3)
    ch.basic_consume(q, lambda *a: None)
    conn.close()
    conn, ch = _open(broker)
    ch.queue_delete(q)
    conn.close()


@pytest.mark.parametrize("flag", ["if_unused", "if_empty"])
def test_conditional_delete_is_refused(broker, flag):
    conn, ch = _open(broker)
    q = _quorum(ch)
    text = flag.replace("_", "-")
    _expect(lambda: ch.queue_delete(q, **{flag: True}), 540,
            f"NOT_IMPLEMENTED - cannot delete {resource('queue', q)}. queue.delete operations "
            f"with {text} flag set are not supported by quorum queues")
    conn, ch = _open(broker)
    ch.queue_delete(q)
    conn.close()


def test_transient_messages_keep_their_delivery_mode_and_ttl_applies(broker):
    conn, ch = _open(broker)
    q = _quorum(ch, {"x-message-ttl": 150})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"t", pika.BasicProperties(delivery_mode=1))
    _m, props, _b = ch.basic_get(q, auto_ack=True)
    assert (props.delivery_mode, props.headers) == (1, {"x-delivery-count": 0})
    ch.basic_publish("", q, b"expires")
    deadline = time.monotonic() + 5
    while ch.queue_declare(q, passive=True).method.message_count != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ch.queue_delete(q)
    conn.close()
