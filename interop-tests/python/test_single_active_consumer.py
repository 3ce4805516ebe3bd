"""Single active consumer (`x-single-active-consumer`) with pika: the first consumer to
register gets every message whatever the priorities; the others wait, and when the active
one is cancelled or its channel closes, the waiting consumer with the highest priority takes
over (RabbitMQ 3.10), with the messages the old one left unacked. Also run against RabbitMQ
by the differential stage."""
import time

import pika

from test_messaging_helpers import uniq

SAC = {"x-single-active-consumer": True}


def _wait(conn, pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        conn.process_data_events(0.05)
    return pred()


def _open(broker):
    """A connection, a channel, and a new single-active-consumer queue."""
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    q = uniq("sac")
    ch.queue_declare(q, arguments=SAC, auto_delete=True)
    return conn, ch, q


def _consumers(conn, q, priorities, auto_ack=True):
    """One channel and consumer per priority; returns (channels, tags, got) where got
    collects (consumer index, body, redelivered)."""
    got = []
    chans, tags = [], []
    for i, prio in enumerate(priorities):
        ch = conn.channel()

        def on_msg(c, m, p, b, i=i):
            got.append((i, b, m.redelivered))

        tags.append(
            ch.basic_consume(q, on_msg, auto_ack=auto_ack, arguments={"x-priority": prio})
        )
        chans.append(ch)
    return chans, tags, got


def test_the_first_consumer_gets_everything_whatever_the_priorities(broker):
    conn, ch, q = _open(broker)
    _chans, _tags, got = _consumers(conn, q, [0, 10, 5])
    assert ch.queue_declare(q, passive=True).method.consumer_count == 3
    for i in range(20):
        ch.basic_publish("", q, b"%d" % i)
    assert _wait(conn, lambda: len(got) == 20)
    conn.process_data_events(0.2)
    assert [who for who, _b, _r in got] == [0] * 20
    assert [b for _w, b, _r in got] == [b"%d" % i for i in range(20)]
    conn.close()


def test_cancel_hands_over_to_the_highest_priority_then_the_earliest(broker):
    conn, ch, q = _open(broker)
    chans, tags, got = _consumers(conn, q, [0, 0, 10, 10])
    ch.basic_publish("", q, b"a")
    assert _wait(conn, lambda: len(got) == 1) and got[-1][0] == 0
    # (consumer cancelled, next message, consumer expected to get it)
    for gone, body, heir in [(0, b"b", 2), (2, b"c", 3), (3, b"d", 1)]:
        chans[gone].basic_cancel(tags[gone])
        n = len(got)
        ch.basic_publish("", q, body)
        assert _wait(conn, lambda: len(got) == n + 1)
        assert got[-1][:2] == (heir, body), got
    conn.close()


def test_the_next_active_consumer_gets_what_the_closed_one_left_unacked(broker):
    conn, ch, q = _open(broker)
    chans, _tags, got = _consumers(conn, q, [0, 0], auto_ack=False)
    ch.basic_publish("", q, b"x")
    assert _wait(conn, lambda: len(got) == 1) and got[0] == (0, b"x", False)
    chans[0].close()  # "x" is unacked: it goes back to the queue
    ch.basic_publish("", q, b"y")
    assert _wait(conn, lambda: len(got) == 3), got
    assert sorted(got[1:]) == [(1, b"x", True), (1, b"y", False)]
    conn.close()


def test_an_active_consumer_at_its_prefetch_limit_holds_the_rest(broker):
    conn, ch, q = _open(broker)
    got = []
    active = conn.channel()
    active.basic_qos(prefetch_count=1)
    active.basic_consume(q, lambda c, m, p, b: got.append(("active", m.delivery_tag, b)))
    standby = conn.channel()
    standby.basic_consume(q, lambda c, m, p, b: got.append(("standby", m.delivery_tag, b)))
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", q, b)
    assert _wait(conn, lambda: len(got) == 1)
    conn.process_data_events(0.3)
    assert got == [("active", 1, b"1")], "the standby consumer got messages"
    active.basic_ack(1)
    assert _wait(conn, lambda: len(got) == 2)
    assert got[1] == ("active", 2, b"2")
    assert ch.queue_declare(q, passive=True).method.message_count == 1
    conn.close()
