"""Priority queues (`x-max-priority`) with pika, as RabbitMQ 3.10's classic priority queues:
the highest priority goes first and the order within a priority is kept, priorities above the
maximum count as the maximum and no priority as 0, a requeued message goes back to its own
priority, and queues without `x-max-priority` ignore the property. Also run against RabbitMQ
by the differential stage."""
import time

import pika
import pytest

from test_messaging_helpers import uniq


def _open(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    return conn, conn.channel()


def _queue(ch, arguments):
    q = uniq("prio")
    ch.queue_declare(q, auto_delete=True, arguments=arguments)
    ch.confirm_delivery()
    return q


def _publish(ch, q, items):
    """Publishes (body, priority or None) pairs, confirmed."""
    for body, priority in items:
        ch.basic_publish("", q, body.encode(), pika.BasicProperties(priority=priority))


def _get_all(ch, q):
    out = []
    while True:
        method, _p, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            return out
        out.append(body.decode())


def test_highest_priority_first_and_fifo_within_a_priority(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 10})
    _publish(ch, q, [("a0", None), ("b5", 5), ("c1", 1), ("d5", 5), ("e10", 10), ("f0", 0),
                     ("g1", 1)])
    assert _get_all(ch, q) == ["e10", "b5", "d5", "c1", "g1", "a0", "f0"]
    conn.close()


def test_a_consumer_gets_the_backlog_in_priority_order(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 3})
    _publish(ch, q, [("low%d" % i, 0) for i in range(3)] + [("high%d" % i, 3) for i in range(3)]
             + [("mid", 2)])
    got = []
    ch.basic_qos(prefetch_count=1)

    def on_message(c, m, _p, body):
        got.append(body.decode())
        c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_message)
    deadline = time.monotonic() + 5
    while len(got) < 7 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == ["high0", "high1", "high2", "mid", "low0", "low1", "low2"]
    conn.close()


def test_priorities_above_the_maximum_count_as_the_maximum(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 2})
    _publish(ch, q, [("p9", 9), ("p1", 1), ("p2", 2), ("p255", 255), ("none", None)])
    assert _get_all(ch, q) == ["p9", "p2", "p255", "p1", "none"]
    conn.close()


def test_a_requeued_message_goes_back_to_its_priority(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 5})
    _publish(ch, q, [("h1", 5), ("h2", 5), ("l1", 1)])
    m1, _p, b1 = ch.basic_get(q)
    m2, _p, b2 = ch.basic_get(q)
    assert (b1, b2) == (b"h1", b"h2")
    _publish(ch, q, [("h3", 5)])
    ch.basic_nack(m2.delivery_tag, multiple=True, requeue=True)
    # Back in front of h3, in their old order, flagged redelivered.
    got = []
    for _ in range(4):
        m, _p, body = ch.basic_get(q, auto_ack=True)
        got.append((body.decode(), m.redelivered))
    assert got == [("h1", True), ("h2", True), ("h3", False), ("l1", False)]
    conn.close()


def test_without_x_max_priority_the_property_is_ignored(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {})
    _publish(ch, q, [("a", 1), ("b", 9), ("c", None), ("d", 5)])
    assert _get_all(ch, q) == ["a", "b", "c", "d"]
    conn.close()


def test_max_length_drops_the_next_to_go(broker):
    """drop-head in a priority queue drops the message that would be delivered next: the
    oldest of the highest priority."""
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 5, "x-max-length": 2})
    _publish(ch, q, [("a", 1), ("b", 5), ("c", 1)])
    assert _get_all(ch, q) == ["a", "c"]
    conn.close()


def test_message_count_and_purge_cover_every_priority(broker):
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 4})
    _publish(ch, q, [("m%d" % i, i % 5) for i in range(10)])
    assert ch.queue_declare(q, passive=True).method.message_count == 10
    assert ch.queue_purge(q).method.message_count == 10
    assert _get_all(ch, q) == []
    conn.close()


def test_ttl_expires_messages_at_every_priority(warren_only):
    """Low-priority messages expire even while higher ones sit in front of them.

    Warren only, on purpose: RabbitMQ 3.10 drops expired messages at the head of the highest
    non-empty priority only (rabbit_priority_queue:dropwhile), so there an expired
    low-priority message stays counted (and is not dead-lettered) until everything above it
    has gone. Warren looks at the head of every priority."""
    broker = warren_only
    conn, ch = _open(broker)
    q = _queue(ch, {"x-max-priority": 5})
    _publish(ch, q, [("keep", 5)])
    ch.basic_publish("", q, b"short", pika.BasicProperties(priority=1, expiration="100"))
    ch.basic_publish("", q, b"low", pika.BasicProperties(priority=1))
    deadline = time.monotonic() + 5
    while ch.queue_declare(q, passive=True).method.message_count != 2:
        assert time.monotonic() < deadline, "the expired low-priority message is still counted"
        time.sleep(0.05)
    assert _get_all(ch, q) == ["keep", "low"]
    conn.close()


def test_dead_letters_keep_their_priority(broker):
    conn, ch = _open(broker)
    dlq = uniq("prio-dlq")
    ch.queue_declare(dlq, auto_delete=True, arguments={"x-max-priority": 5})
    src = _queue(ch, {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    _publish(ch, src, [("low", 1), ("high", 4)])
    for _ in range(2):
        m, _p, _b = ch.basic_get(src)
        ch.basic_reject(m.delivery_tag, requeue=False)
    deadline = time.monotonic() + 5
    while ch.queue_declare(dlq, passive=True).method.message_count != 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _get_all(ch, dlq) == ["high", "low"]
    conn.close()


@pytest.mark.parametrize("value,why", [
    (256, "{max_value_exceeded,256}"),
    (-1, "{value_negative,-1}"),
    ("ten", '"expected integer, got longstr"'),
])
def test_bad_x_max_priority_is_refused(broker, value, why):
    conn, ch = _open(broker)
    q = uniq("prio-bad")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(q, arguments={"x-max-priority": value})
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{q}' in vhost '/': {why}")
    conn.close()
