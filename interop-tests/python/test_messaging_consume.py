"""Consuming with pika: basic.consume/cancel, consumer tags, exclusive consumers, priorities,
server-sent cancel, round-robin, basic.qos, basic.get, ack/nack/reject, recover, requeue on
close, and the error codes. Every test runs against Warren and (with RABBITMQ_ADDR) RabbitMQ."""

import re
import time

import pytest

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, expect_channel_error, expect_connection_error, get_all,
    resource, s, session_factory, settle, uniq, wait_until,
)

CTAG = re.compile(r"^amq\.ctag-[A-Za-z0-9_-]{22}$")


def publish_n(ch, q, n, start=0):
    for i in range(start, start + n):
        ch.basic_publish("", q, b"%d" % i)


def bodies(n, start=0):
    return [b"%d" % i for i in range(start, start + n)]


class Sink:
    """Consumer callback recording (tag, delivery_tag, redelivered, body)."""

    def __init__(self):
        self.items = []

    def __call__(self, _ch, m, _p, body):
        self.items.append((m.consumer_tag, m.delivery_tag, m.redelivered, body))

    def __len__(self):
        return len(self.items)

    @property
    def bodies(self):
        return [i[3] for i in self.items]

    @property
    def tags(self):
        return [i[1] for i in self.items]


def consume(session, q, n, timeout=5.0, **kw):
    sink = Sink()
    session.ch.basic_consume(q, sink, **kw)
    collect(session.conn, sink.items, n, timeout)
    return sink


# ---- basic.consume / cancel ------------------------------------------------------------------

def test_client_consumer_tag_is_used_in_deliveries(s):
    q = declare_queue(s.ch, exclusive=True)
    sink = Sink()
    tag = s.ch.basic_consume(q, sink, consumer_tag="my-tag", auto_ack=True)
    assert tag == "my-tag"
    publish_n(s.ch, q, 2)
    collect(s.conn, sink.items, 2)
    assert [(t, b) for t, _d, _r, b in sink.items] == [("my-tag", b"0"), ("my-tag", b"1")]


def test_same_consumer_tag_on_two_channels_is_fine(s):
    q = declare_queue(s.ch, exclusive=True)
    ch2 = s.conn.channel()
    s.ch.basic_consume(q, lambda *a: None, consumer_tag="same")
    ch2.basic_consume(q, lambda *a: None, consumer_tag="same")


def test_consume_missing_queue_is_404(s):
    q = uniq("q.missing")
    expect_channel_error(lambda: s.ch.basic_consume(q, lambda *a: None), 404,
                         f"NOT_FOUND - no {resource('queue', q)}")


def test_cancel_stops_deliveries_and_keeps_unacked(s, amqp):
    q = declare_queue(s.ch, exclusive=True)
    sink = Sink()
    s.ch.basic_qos(prefetch_count=2)
    tag = s.ch.basic_consume(q, sink)
    publish_n(s.ch, q, 5)
    collect(s.conn, sink.items, 2)
    s.ch.basic_cancel(tag)
    settle(s.conn)
    assert sink.bodies == bodies(2)
    assert s.ch.queue_declare(q, passive=True).method.consumer_count == 0
    # the cancelled consumer's deliveries are still ackable
    s.ch.basic_ack(sink.tags[1], multiple=True)
    assert get_all(s.ch, q) == bodies(3, 2)


def test_cancel_returns_pending_on_close(s, session_factory):
    q = declare_queue(s.ch)
    c = session_factory()
    c.ch.basic_qos(prefetch_count=3)
    sink = Sink()
    tag = c.ch.basic_consume(q, sink)
    publish_n(s.ch, q, 3)
    collect(c.conn, sink.items, 3)
    c.ch.basic_cancel(tag)
    c.ch.close()  # unacked of the cancelled consumer go back
    wait_until(lambda: message_count_of(s, q) == 3, what="3 requeued")
    s.ch.queue_delete(q)


def message_count_of(session, q):
    return session.ch.queue_declare(q, passive=True).method.message_count


# ---- exclusive consumers ---------------------------------------------------------------------

def test_exclusive_consumer_locks_out_others(s, session_factory):
    q = declare_queue(s.ch)
    s.ch.basic_consume(q, lambda *a: None, exclusive=True)
    other = session_factory()
    expect_channel_error(lambda: other.ch.basic_consume(q, lambda *a: None), 403,
                         f"ACCESS_REFUSED - {resource('queue', q)} in exclusive use")
    ch2 = s.conn.channel()  # same connection, other channel: also refused
    expect_channel_error(lambda: ch2.basic_consume(q, lambda *a: None), 403,
                         f"ACCESS_REFUSED - {resource('queue', q)} in exclusive use")
    s.ch.queue_delete(q)


def test_exclusive_consume_on_busy_queue_is_403(s, session_factory):
    q = declare_queue(s.ch)
    s.ch.basic_consume(q, lambda *a: None)
    other = session_factory()
    expect_channel_error(lambda: other.ch.basic_consume(q, lambda *a: None, exclusive=True),
                         403, f"ACCESS_REFUSED - {resource('queue', q)} in exclusive use")
    s.ch.queue_delete(q)


def test_exclusive_consumer_cancelled_frees_queue(s, session_factory):
    q = declare_queue(s.ch)
    tag = s.ch.basic_consume(q, lambda *a: None, exclusive=True)
    s.ch.basic_cancel(tag)
    other = session_factory()
    other.ch.basic_consume(q, lambda *a: None)
    s.ch.queue_delete(q)


# ---- no-ack ----------------------------------------------------------------------------------

def test_no_ack_consumer(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 5)
    sink = consume(s, q, 5, auto_ack=True)
    assert sink.bodies == bodies(5)
    s.ch.close()
    ch = s.conn.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_ack_of_no_ack_delivery_is_406(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 1)
    sink = consume(s, q, 1, auto_ack=True)

    def ack():
        s.ch.basic_ack(sink.tags[0])
        s.ch.queue_declare(q, passive=True)

    expect_channel_error(ack, 406, f"PRECONDITION_FAILED - unknown delivery tag {sink.tags[0]}")


def test_no_ack_consumer_ignores_prefetch(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=1)
    publish_n(s.ch, q, 20)
    sink = consume(s, q, 20, auto_ack=True)
    assert sink.bodies == bodies(20)


# ---- consumer priorities ---------------------------------------------------------------------

def test_consumer_priority_wins_while_it_has_capacity(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=2)
    low, high = Sink(), Sink()
    s.ch.basic_consume(q, low)
    s.ch.basic_consume(q, high, arguments={"x-priority": 10})
    publish_n(s.ch, q, 5)
    collect(s.conn, high.items, 2)
    collect(s.conn, low.items, 2)
    settle(s.conn)
    assert high.bodies == bodies(2) and low.bodies == bodies(2, 2)
    s.ch.basic_ack(high.tags[0])
    collect(s.conn, high.items, 3)
    settle(s.conn)
    assert high.bodies == [b"0", b"1", b"4"] and len(low) == 2


def test_consumer_priority_without_prefetch_takes_all(s):
    q = declare_queue(s.ch, exclusive=True)
    low, high, mid = Sink(), Sink(), Sink()
    s.ch.basic_consume(q, low, auto_ack=True, arguments={"x-priority": -5})
    s.ch.basic_consume(q, high, auto_ack=True, arguments={"x-priority": 3})
    s.ch.basic_consume(q, mid, auto_ack=True)
    publish_n(s.ch, q, 30)
    collect(s.conn, high.items, 30)
    settle(s.conn)
    assert (len(high), len(mid), len(low)) == (30, 0, 0)


def test_invalid_consumer_priority_is_406(s):
    q = declare_queue(s.ch, exclusive=True)
    expect_channel_error(
        lambda: s.ch.basic_consume(q, lambda *a: None, arguments={"x-priority": "high"}),
        406, f"PRECONDITION_FAILED - invalid arg 'x-priority' for {resource('queue', q)}: "
             f"\"expected integer, got longstr\"")


# ---- round robin -----------------------------------------------------------------------------

def test_round_robin_among_equal_consumers(s):
    q = declare_queue(s.ch, exclusive=True)
    sinks = [Sink() for _ in range(3)]
    for k in sinks:
        s.ch.basic_consume(q, k, auto_ack=True)
    publish_n(s.ch, q, 30)
    everything = []
    deadline = time.monotonic() + 5
    while sum(map(len, sinks)) < 30 and time.monotonic() < deadline:
        s.conn.process_data_events(time_limit=0.05)
    for k in sinks:
        everything += k.bodies
    assert sorted(everything) == sorted(bodies(30))
    assert [len(k) for k in sinks] == [10, 10, 10]
    # strict rotation: each consumer gets every third message
    firsts = [int(k.bodies[0]) for k in sinks]
    for k, first in zip(sinks, firsts):
        assert k.bodies == [b"%d" % i for i in range(first, 30, 3)], k.bodies


def test_round_robin_across_connections(session_factory, amqp):
    prod = session_factory()
    q = declare_queue(prod.ch)
    consumers = [session_factory() for _ in range(3)]
    sinks = []
    for c in consumers:
        c.ch.basic_qos(prefetch_count=1)
        sink = Sink()
        c.ch.basic_consume(q, sink)
        sinks.append(sink)
    publish_n(prod.ch, q, 3)
    for c, k in zip(consumers, sinks):
        collect(c.conn, k.items, 1)
    assert sorted(b for k in sinks for b in k.bodies) == bodies(3)
    assert [len(k) for k in sinks] == [1, 1, 1]
    prod.ch.queue_delete(q)


# ---- basic.qos -------------------------------------------------------------------------------

def in_flight_after(session, sinks, publish, expect_total, settle_for=0.4):
    publish()
    deadline = time.monotonic() + 5
    while sum(map(len, sinks)) < expect_total and time.monotonic() < deadline:
        session.conn.process_data_events(time_limit=0.05)
    settle(session.conn, settle_for)
    return [len(k) for k in sinks]


def test_qos_per_consumer(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=2)  # global=False: each consumer
    a, b = Sink(), Sink()
    s.ch.basic_consume(q, a)
    s.ch.basic_consume(q, b)
    assert in_flight_after(s, [a, b], lambda: publish_n(s.ch, q, 10), 4) == [2, 2]
    for tag in a.tags:
        s.ch.basic_ack(tag)
    assert in_flight_after(s, [a, b], lambda: None, 6) == [4, 2]


def test_qos_global_per_channel(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=3, global_qos=True)
    a, b = Sink(), Sink()
    s.ch.basic_consume(q, a)
    s.ch.basic_consume(q, b)
    counts = in_flight_after(s, [a, b], lambda: publish_n(s.ch, q, 10), 3)
    assert sum(counts) == 3, counts
    first = (a.items + b.items)[0]
    s.ch.basic_ack(first[1])
    counts = in_flight_after(s, [a, b], lambda: None, 4)
    assert sum(counts) == 4, counts


def test_qos_global_and_per_consumer_both_apply(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=2, global_qos=False)
    s.ch.basic_qos(prefetch_count=3, global_qos=True)
    a, b = Sink(), Sink()
    s.ch.basic_consume(q, a)
    s.ch.basic_consume(q, b)
    counts = in_flight_after(s, [a, b], lambda: publish_n(s.ch, q, 10), 3)
    assert sum(counts) == 3 and max(counts) <= 2, counts


def test_qos_per_consumer_after_global_lifts_the_channel_limit(s):
    # rabbit_channel: basic.qos global=false calls rabbit_limiter:unlimit_prefetch, so a
    # per-consumer qos issued after a global one removes the channel-wide limit.
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=3, global_qos=True)
    s.ch.basic_qos(prefetch_count=2, global_qos=False)
    a, b = Sink(), Sink()
    s.ch.basic_consume(q, a)
    s.ch.basic_consume(q, b)
    counts = in_flight_after(s, [a, b], lambda: publish_n(s.ch, q, 10), 4)
    assert counts == [2, 2], counts


def test_qos_applies_to_consumers_created_afterwards(s):
    q1 = declare_queue(s.ch, exclusive=True)
    q2 = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=1)
    a = Sink()
    s.ch.basic_consume(q1, a)
    s.ch.basic_qos(prefetch_count=5)
    b = Sink()
    s.ch.basic_consume(q2, b)
    publish = lambda: (publish_n(s.ch, q1, 10), publish_n(s.ch, q2, 10))  # noqa: E731
    assert in_flight_after(s, [a, b], publish, 6) == [1, 5]


def test_qos_zero_means_unlimited(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=1)
    s.ch.basic_qos(prefetch_count=0)
    a = Sink()
    s.ch.basic_consume(q, a)
    assert in_flight_after(s, [a], lambda: publish_n(s.ch, q, 50), 50) == [50]


def test_qos_does_not_limit_basic_get(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=1, global_qos=True)
    publish_n(s.ch, q, 3)
    got = [s.ch.basic_get(q)[2] for _ in range(3)]
    assert got == bodies(3)


def test_qos_prefetch_size_is_540(s):
    expect_connection_error(lambda: s.ch.basic_qos(prefetch_size=1000, prefetch_count=1), 540,
                            "NOT_IMPLEMENTED - prefetch_size!=0 (1000)")


def test_qos_limit_raised_delivers_more(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.basic_qos(prefetch_count=1, global_qos=True)
    a = Sink()
    s.ch.basic_consume(q, a)
    assert in_flight_after(s, [a], lambda: publish_n(s.ch, q, 10), 1) == [1]
    s.ch.basic_qos(prefetch_count=4, global_qos=True)
    assert in_flight_after(s, [a], lambda: None, 4) == [4]


# ---- basic.get -------------------------------------------------------------------------------

def test_get_ok_counts_and_get_empty(s):
    q = declare_queue(s.ch, exclusive=True)
    assert s.ch.basic_get(q) == (None, None, None)
    publish_n(s.ch, q, 3)
    seen = []
    for _ in range(3):
        m, _p, body = s.ch.basic_get(q, auto_ack=True)
        seen.append((m.message_count, m.redelivered, m.exchange, m.routing_key, body))
    assert seen == [(2, False, "", q, b"0"), (1, False, "", q, b"1"), (0, False, "", q, b"2")]
    assert s.ch.basic_get(q) == (None, None, None)


def test_get_missing_queue_is_404(s):
    q = uniq("q.missing")
    expect_channel_error(lambda: s.ch.basic_get(q), 404, f"NOT_FOUND - no {resource('queue', q)}")


def test_delivery_tags_count_up_per_channel(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 4)
    t1 = s.ch.basic_get(q)[0].delivery_tag
    t2 = s.ch.basic_get(q, auto_ack=True)[0].delivery_tag
    sink = consume(s, q, 2)
    assert [t1, t2] + sink.tags == [1, 2, 3, 4]
    ch2 = s.conn.channel()
    q2 = declare_queue(ch2, exclusive=True)
    publish_n(ch2, q2, 1)
    assert ch2.basic_get(q2)[0].delivery_tag == 1


# ---- ack / nack / reject ---------------------------------------------------------------------

def get_unacked(ch, q, n):
    out = []
    for _ in range(n):
        m, _p, body = ch.basic_get(q)
        assert m is not None
        out.append((m.delivery_tag, body))
    return out


def requeued_after_close(s, q, ch):
    ch.close()
    return get_all(s.conn.channel(), q)


def test_ack_single_and_multiple(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 6)
    ch = s.conn.channel()
    got = get_unacked(ch, q, 6)
    ch.basic_ack(got[0][0])
    ch.basic_ack(got[3][0], multiple=True)  # tags 2..4
    assert requeued_after_close(s, q, ch) == [b"4", b"5"]


def test_ack_multiple_zero_acks_everything(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 4)
    ch = s.conn.channel()
    get_unacked(ch, q, 4)
    ch.basic_ack(0, multiple=True)
    assert requeued_after_close(s, q, ch) == []


def test_nack_requeue_puts_message_back_at_head_redelivered(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 3)
    (tag, body), = get_unacked(s.ch, q, 1)
    s.ch.basic_nack(tag, requeue=True)
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert (body, m.redelivered) == (b"0", True)
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert (body, m.redelivered) == (b"1", False)


def test_nack_multiple_requeue_keeps_original_order(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 6)
    got = get_unacked(s.ch, q, 4)
    s.ch.basic_nack(got[2][0], multiple=True, requeue=True)  # 0,1,2 back; 3 still out
    seen = []
    for _ in range(5):
        m, _p, body = s.ch.basic_get(q, auto_ack=True)
        seen.append((body, m.redelivered))
    assert seen == [(b"0", True), (b"1", True), (b"2", True), (b"4", False), (b"5", False)]


def test_nack_out_of_order_requeues_in_queue_order(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 4)
    got = get_unacked(s.ch, q, 3)
    s.ch.basic_nack(got[2][0], requeue=True)
    s.ch.basic_nack(got[0][0], requeue=True)
    s.ch.basic_nack(got[1][0], requeue=True)
    assert get_all(s.ch, q) == [b"0", b"1", b"2", b"3"]


def test_consumer_sees_requeued_message_redelivered(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 2)
    s.ch.basic_qos(prefetch_count=1)
    sink = consume(s, q, 1)
    s.ch.basic_nack(sink.tags[0], requeue=True)
    collect(s.conn, sink.items, 2)
    assert [(b, r) for _t, _d, r, b in sink.items] == [(b"0", False), (b"0", True)]
    s.ch.basic_ack(sink.tags[1])
    collect(s.conn, sink.items, 3)
    assert [(b, r) for _t, _d, r, b in sink.items][2] == (b"1", False)


def test_nack_and_reject_without_requeue_drop(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 4)
    got = get_unacked(s.ch, q, 3)
    s.ch.basic_reject(got[0][0], requeue=False)
    s.ch.basic_nack(got[2][0], multiple=True, requeue=False)
    assert get_all(s.ch, q) == [b"3"]


def test_reject_requeue(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 2)
    (tag, _b), = get_unacked(s.ch, q, 1)
    s.ch.basic_reject(tag, requeue=True)
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert (body, m.redelivered) == (b"0", True)


@pytest.mark.parametrize("method", ["ack", "nack", "reject"])
def test_unknown_delivery_tag_is_406(s, method):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 1)
    get_unacked(s.ch, q, 1)
    op = {"ack": lambda: s.ch.basic_ack(99),
          "nack": lambda: s.ch.basic_nack(99),
          "reject": lambda: s.ch.basic_reject(99)}[method]

    def run():
        op()
        s.ch.queue_declare(q, passive=True)

    expect_channel_error(run, 406, "PRECONDITION_FAILED - unknown delivery tag 99")


@pytest.mark.parametrize("method", ["ack", "nack", "reject"])
def test_double_settle_is_406(s, method):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 2)
    (tag, _b), _ = get_unacked(s.ch, q, 2)
    s.ch.basic_ack(tag)
    op = {"ack": lambda: s.ch.basic_ack(tag),
          "nack": lambda: s.ch.basic_nack(tag, requeue=True),
          "reject": lambda: s.ch.basic_reject(tag, requeue=True)}[method]

    def run():
        op()
        s.ch.queue_declare(q, passive=True)

    expect_channel_error(run, 406, f"PRECONDITION_FAILED - unknown delivery tag {tag}")


def test_ack_multiple_of_unknown_tag_is_406(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 2)
    get_unacked(s.ch, q, 2)

    def run():
        s.ch.basic_ack(7, multiple=True)
        s.ch.queue_declare(q, passive=True)

    expect_channel_error(run, 406, "PRECONDITION_FAILED - unknown delivery tag 7")


def test_unknown_tag_error_requeues_the_channels_unacked(s, session_factory):
    q = declare_queue(s.ch)
    ch = s.conn.channel()
    publish_n(ch, q, 2)
    get_unacked(ch, q, 2)

    def run():
        ch.basic_ack(50)
        ch.queue_declare(q, passive=True)

    expect_channel_error(run, 406, "PRECONDITION_FAILED - unknown delivery tag 50")
    wait_until(lambda: message_count_of(s, q) == 2, what="2 requeued")
    s.ch.queue_delete(q)


# ---- recover ---------------------------------------------------------------------------------

def test_recover_requeue_redelivers_unacked_to_consumer(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 3)
    sink = consume(s, q, 3)
    s.ch.basic_ack(sink.tags[1])
    s.ch.basic_recover(requeue=True)
    collect(s.conn, sink.items, 5)
    settle(s.conn)
    again = [(b, r) for _t, _d, r, b in sink.items[3:]]
    assert again == [(b"0", True), (b"2", True)]
    assert len(set(sink.tags)) == 5, "redeliveries get new delivery tags"


def test_recover_requeues_basic_get_messages(s):
    q = declare_queue(s.ch, exclusive=True)
    publish_n(s.ch, q, 2)
    get_unacked(s.ch, q, 2)
    s.ch.basic_recover(requeue=True)
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert (body, m.redelivered) == (b"0", True)


def test_recover_without_requeue_is_540(s):
    expect_connection_error(lambda: s.ch.basic_recover(requeue=False), 540,
                            "NOT_IMPLEMENTED - requeue=false")


# ---- requeue on close ------------------------------------------------------------------------

def test_unacked_requeued_in_order_when_channel_closes(s, session_factory):
    q = declare_queue(s.ch)
    publish_n(s.ch, q, 5)
    c = session_factory()
    sink = consume(c, q, 5)
    c.ch.basic_ack(sink.tags[2])  # "2" is done
    c.ch.close()
    wait_until(lambda: message_count_of(s, q) == 4, what="4 requeued")
    seen = []
    for _ in range(4):
        m, _p, body = s.ch.basic_get(q, auto_ack=True)
        seen.append((body, m.redelivered))
    assert seen == [(b"0", True), (b"1", True), (b"3", True), (b"4", True)]
    s.ch.queue_delete(q)


def test_unacked_requeued_when_connection_closes(s, session_factory):
    q = declare_queue(s.ch)
    publish_n(s.ch, q, 3)
    c = session_factory()
    ch2 = c.conn.channel()
    c.ch.basic_qos(prefetch_count=2)
    consume(c, q, 2)
    get_unacked(ch2, q, 1)
    c.conn.close()
    wait_until(lambda: message_count_of(s, q) == 3, what="3 requeued")
    assert get_all(s.ch, q) == bodies(3)
    s.ch.queue_delete(q)


def test_unacked_go_to_another_consumer_when_channel_closes(s, session_factory):
    q = declare_queue(s.ch)
    waiting = Sink()
    s.ch.basic_qos(prefetch_count=10)
    c = session_factory()
    c.ch.basic_qos(prefetch_count=10)
    first = consume(c, q, 0)
    s.ch.basic_consume(q, waiting, arguments={"x-priority": -1})
    publish_n(c.ch, q, 3)
    collect(c.conn, first.items, 3)
    assert first.bodies == bodies(3) and len(waiting) == 0
    c.ch.close()
    collect(s.conn, waiting.items, 3)
    assert [(b, r) for _t, _d, r, b in waiting.items] == [(b"0", True), (b"1", True),
                                                          (b"2", True)]
    s.ch.queue_delete(q)


# ---- server-sent basic.cancel ----------------------------------------------------------------

def test_queue_delete_sends_basic_cancel(s, session_factory):
    q = declare_queue(s.ch)
    cancelled = []
    s.ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = s.ch.basic_consume(q, lambda *a: None)
    session_factory().ch.queue_delete(q)
    collect(s.conn, cancelled, 1)
    assert cancelled == [tag]
    assert s.ch.is_open
    # the channel carries on
    q2 = declare_queue(s.ch, exclusive=True)
    s.ch.basic_publish("", q2, b"x")
    assert get_all(s.ch, q2) == [b"x"]


def test_no_basic_cancel_without_consumer_cancel_notify(s, session_factory):
    caps = {"authentication_failure_close": True, "basic.nack": True,
            "publisher_confirms": True, "exchange_exchange_bindings": True}
    c = session_factory(client_properties={"capabilities": caps})
    q = declare_queue(c.ch)
    cancelled = []
    c.ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    c.ch.basic_consume(q, lambda *a: None)
    s.ch.queue_delete(q)
    settle(c.conn, 0.5)
    assert cancelled == []
    assert c.ch.is_open and c.conn.is_open
    q2 = declare_queue(c.ch, exclusive=True)
    c.ch.basic_publish("", q2, b"x")
    assert get_all(c.ch, q2) == [b"x"]
