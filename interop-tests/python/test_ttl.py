"""Message TTL with pika: per-message `expiration` and the queue's `x-message-ttl` drop
messages at the head (counts shrink without any consumer), the smaller TTL wins, a TTL of 0
still reaches a consumer that is waiting, and unexpired messages keep their order."""
import time

import pika

from test_messaging_helpers import uniq


def _count(ch, q):
    return ch.queue_declare(q, passive=True).method.message_count


def _wait_count(ch, q, expected, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(ch, q) == expected:
            return True
        time.sleep(0.05)
    return _count(ch, q) == expected


def test_queue_ttl_drops_messages_without_consumers(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    q = uniq("ttl")
    ch.queue_declare(q, arguments={"x-message-ttl": 300}, auto_delete=True)
    # Confirmed publishes are enqueued, so the count below cannot lag them.
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", q, b"%d" % i)
    assert _count(ch, q) == 5
    assert _wait_count(ch, q, 0), "messages past x-message-ttl stayed in the queue"
    conn.close()


def test_per_message_expiration_and_the_smaller_ttl_wins(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    q = uniq("ttl")
    ch.queue_declare(q, arguments={"x-message-ttl": 60000}, auto_delete=True)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="200"))
    ch.basic_publish("", q, b"long", pika.BasicProperties(expiration="600000"))
    assert _count(ch, q) == 2
    assert _wait_count(ch, q, 1)
    _m, props, body = ch.basic_get(q, auto_ack=True)
    assert (body, props.expiration) == (b"long", "600000")
    conn.close()


def test_ttl_zero_reaches_a_waiting_consumer(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    q = uniq("ttl")
    ch.queue_declare(q, auto_delete=True)
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    ch.basic_publish("", q, b"now", pika.BasicProperties(expiration="0"))
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        conn.process_data_events(0.05)
    assert got == [b"now"]
    conn.close()
