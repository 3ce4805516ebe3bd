"""Publisher confirms and transactions with pika. Every test runs against Warren and (with
RABBITMQ_ADDR) RabbitMQ."""

import pika
import pika.exceptions
import pytest

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, expect_channel_error, get_all, message_count, resource, s,
    session_factory, settle, uniq, wait_until,
)


def publish_n(ch, q, n, start=0, **kw):
    for i in range(start, start + n):
        ch.basic_publish("", q, b"%d" % i, **kw)


# ---- confirms --------------------------------------------------------------------------------

class Confirms:
    """Publisher confirms seen through pika's low-level channel (BlockingChannel._impl), so that
    each basic.ack / basic.nack frame (tag, multiple) is observed as sent by the broker."""

    def __init__(self, session):
        self.session = session
        self.impl = session.ch._impl
        self.frames = []
        self.published = 0
        selected = []
        self.impl.confirm_delivery(ack_nack_callback=self._on, callback=selected.append)
        collect(session.conn, selected, 1)
        assert selected, "no confirm.select-ok"

    def _on(self, frame):
        m = frame.method
        self.frames.append((m.NAME, m.delivery_tag, m.multiple))

    def publish(self, exchange, key, body=b"m", **kw):
        self.impl.basic_publish(exchange, key, body, **kw)
        self.published += 1

    def settled(self):
        """{tag: 'Basic.Ack'|'Basic.Nack'}, multiple expanded to every unconfirmed tag up to
        it, and a list of protocol problems (a tag confirmed twice or never published).
        RabbitMQ may confirm out of order (an unroutable message is acked at once, before an
        earlier routed one), so order is not a problem by itself."""
        out, problems = {}, []
        for name, tag, multiple in self.frames:
            if tag > self.published or (tag == 0 and not multiple):
                problems.append(f"{name} {tag}: never published")
            if multiple:
                tags = [t for t in range(1, tag + 1) if t not in out]
                if not tags:
                    problems.append(f"{name} {tag} multiple confirms nothing new")
            else:
                tags = [tag]
                if tag in out:
                    problems.append(f"tag {tag} confirmed twice")
            for t in tags:
                out[t] = name
        return out, problems

    def wait(self, n, timeout=10.0):
        import time
        deadline = time.monotonic() + timeout
        while len(self.settled()[0]) < n and time.monotonic() < deadline:
            self.session.conn.process_data_events(time_limit=0.05)
        settle(self.session.conn, 0.2)
        return self.settled()


def test_confirms_ack_every_publish_in_order(s):
    q = declare_queue(s.ch, exclusive=True)
    c = Confirms(s)
    for i in range(500):
        c.publish("", q, b"%d" % i)
    settled, problems = c.wait(500)
    assert problems == []
    assert settled == {t: "Basic.Ack" for t in range(1, 501)}
    assert get_all(s.ch, q) == [b"%d" % i for i in range(500)]


def test_confirms_for_unroutable_and_multi_queue_publishes(s):
    q1 = declare_queue(s.ch, exclusive=True)
    q2 = declare_queue(s.ch, exclusive=True)
    x = uniq("x.fanout")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.queue_bind(q1, x)
    s.ch.queue_bind(q2, x)
    c = Confirms(s)
    c.publish(x, "", b"both")
    c.publish("amq.direct", uniq("nobody"), b"lost")
    c.publish("", q1, b"one")
    settled, problems = c.wait(3)
    assert problems == []
    assert settled == {1: "Basic.Ack", 2: "Basic.Ack", 3: "Basic.Ack"}


def test_confirm_select_is_idempotent(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.confirm_delivery()
    s.ch._impl.confirm_delivery(ack_nack_callback=lambda f: None)  # a second select-ok
    settle(s.conn)
    assert s.ch.is_open
    s.ch.basic_publish("", q, b"x")


def test_blocking_confirm_publish(s):
    q = declare_queue(s.ch, exclusive=True)
    s.ch.confirm_delivery()
    for i in range(50):
        s.ch.basic_publish("", q, b"%d" % i)  # raises on nack
    assert len(get_all(s.ch, q)) == 50


def test_mandatory_unroutable_in_confirm_mode_is_returned_then_acked(s):
    s.ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        s.ch.basic_publish("amq.direct", uniq("nobody"), b"x", mandatory=True)
    (returned,) = info.value.messages
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")


def test_return_precedes_ack(s):
    c = Confirms(s)
    returned = []
    s.ch._impl.add_on_return_callback(
        lambda _ch, m, _p, _b: c.frames.append(("Basic.Return", m.reply_code, None)))
    c.publish("amq.direct", uniq("nobody"), b"x", mandatory=True)
    c.wait(1)
    assert [f[0] for f in c.frames] == ["Basic.Return", "Basic.Ack"], c.frames
    assert returned == []


def test_nack_when_queue_refuses(s):
    q = declare_queue(s.ch, exclusive=True,
                      arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    c = Confirms(s)
    for i in range(4):
        c.publish("", q, b"%d" % i)
    settled, problems = c.wait(4)
    assert problems == []
    assert settled == {1: "Basic.Ack", 2: "Basic.Ack", 3: "Basic.Nack", 4: "Basic.Nack"}
    assert get_all(s.ch, q) == [b"0", b"1"]


def test_nack_raises_in_blocking_pika(s):
    q = declare_queue(s.ch, exclusive=True,
                      arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    s.ch.confirm_delivery()
    s.ch.basic_publish("", q, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        s.ch.basic_publish("", q, b"refused")


def test_one_refusing_queue_nacks_a_multi_queue_publish(s):
    full = declare_queue(s.ch, exclusive=True,
                         arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    ok = declare_queue(s.ch, exclusive=True)
    x = uniq("x.fanout")
    s.ch.exchange_declare(x, "fanout", auto_delete=True)
    s.ch.queue_bind(full, x)
    s.ch.queue_bind(ok, x)
    c = Confirms(s)
    c.publish(x, "", b"m")
    settled, problems = c.wait(1)
    assert problems == [] and settled == {1: "Basic.Nack"}
    assert get_all(s.ch, ok) == [b"m"]


def test_publish_to_missing_exchange_in_confirm_mode_closes_channel(s):
    s.ch.confirm_delivery()
    x = uniq("x.missing")
    expect_channel_error(lambda: s.ch.basic_publish(x, "k", b"x"), 404,
                         f"NOT_FOUND - no {resource('exchange', x)}")


def test_tx_select_after_confirm_select_is_406(s):
    s.ch.confirm_delivery()
    expect_channel_error(s.ch.tx_select, 406,
                         "PRECONDITION_FAILED - cannot switch from confirm to tx mode")


def test_confirm_select_after_tx_select_is_406(s):
    s.ch.tx_select()
    expect_channel_error(s.ch.confirm_delivery, 406,
                         "PRECONDITION_FAILED - cannot switch from tx to confirm mode")


# ---- transactions ----------------------------------------------------------------------------

def test_tx_publishes_held_until_commit(s, amqp):
    q = declare_queue(s.ch)
    tx = s.conn.channel()
    tx.tx_select()
    publish_n(tx, q, 3)
    tx.queue_declare(q, passive=True)
    settle(s.conn, 0.3)
    assert message_count(amqp, q) == 0, "uncommitted publishes must not be visible"
    tx.tx_commit()
    wait_until(lambda: message_count(amqp, q) == 3, what="3 committed messages")
    assert get_all(s.ch, q) == [b"0", b"1", b"2"]
    s.ch.queue_delete(q)


def test_tx_rollback_discards_publishes(s, amqp):
    q = declare_queue(s.ch)
    tx = s.conn.channel()
    tx.tx_select()
    publish_n(tx, q, 3)
    tx.tx_rollback()
    publish_n(tx, q, 1, start=9)
    tx.tx_commit()
    wait_until(lambda: message_count(amqp, q) == 1, what="1 committed message")
    assert get_all(s.ch, q) == [b"9"]
    s.ch.queue_delete(q)


def test_tx_acks_held_until_commit(s, amqp):
    q = declare_queue(s.ch)
    publish_n(s.ch, q, 4)
    tx = s.conn.channel()
    tx.tx_select()
    tags = [tx.basic_get(q)[0].delivery_tag for _ in range(2)]
    tx.basic_ack(tags[0])
    tx.basic_ack(tags[1])
    tx.tx_rollback()  # the acks are forgotten: both still unacked
    tx.basic_ack(tags[0])
    tx.tx_commit()  # only the first is acked
    tx.close()
    wait_until(lambda: message_count(amqp, q) == 3, what="1 requeued + 2 never delivered")
    assert get_all(s.ch, q) == [b"1", b"2", b"3"]
    s.ch.queue_delete(q)


def test_tx_nack_and_reject_held_until_commit(s, amqp):
    q = declare_queue(s.ch)
    publish_n(s.ch, q, 2)
    tx = s.conn.channel()
    tx.tx_select()
    t0 = tx.basic_get(q)[0].delivery_tag
    t1 = tx.basic_get(q)[0].delivery_tag
    tx.basic_reject(t0, requeue=False)
    tx.basic_nack(t1, requeue=True)
    tx.queue_declare(q, passive=True)
    assert message_count(amqp, q) == 0, "nack(requeue) is held until commit"
    tx.tx_commit()
    wait_until(lambda: message_count(amqp, q) == 1, what="the nacked message back")
    m, _p, body = s.ch.basic_get(q, auto_ack=True)
    assert (body, m.redelivered) == (b"1", True)
    s.ch.queue_delete(q)


def test_tx_commit_empty_and_repeated(s):
    s.ch.tx_select()
    s.ch.tx_select()
    s.ch.tx_commit()
    s.ch.tx_commit()
    s.ch.tx_rollback()
    assert s.ch.is_open


def test_tx_unacked_stays_unacked_after_rollback(s, amqp):
    q = declare_queue(s.ch)
    publish_n(s.ch, q, 1)
    tx = s.conn.channel()
    tx.tx_select()
    tag = tx.basic_get(q)[0].delivery_tag
    tx.basic_ack(tag)
    tx.tx_rollback()
    assert message_count(amqp, q) == 0, "rollback does not requeue"
    tx.basic_ack(tag)
    tx.tx_commit()
    tx.close()
    settle(s.conn, 0.2)
    assert message_count(amqp, q) == 0
    s.ch.queue_delete(q)


def test_tx_commit_without_select_is_406(s):
    expect_channel_error(s.ch.tx_commit, 406, "PRECONDITION_FAILED - channel is not transactional")


def test_tx_rollback_without_select_is_406(s):
    expect_channel_error(s.ch.tx_rollback, 406,
                         "PRECONDITION_FAILED - channel is not transactional")


def test_tx_mandatory_unroutable_returned(s):
    tx = s.ch
    returned = []
    tx.add_on_return_callback(lambda _c, m, _p, body: returned.append((m.reply_code, body)))
    tx.tx_select()
    tx.basic_publish("amq.direct", uniq("nobody"), b"x", mandatory=True)
    tx.tx_commit()
    collect(s.conn, returned, 1)
    assert returned == [(312, b"x")]


def test_tx_publish_to_missing_exchange_fails_at_publish(s):
    s.ch.tx_select()
    x = uniq("x.missing")

    def run():
        s.ch.basic_publish(x, "k", b"x")
        s.ch.tx_commit()

    expect_channel_error(run, 404, f"NOT_FOUND - no {resource('exchange', x)}")


def test_tx_closing_channel_discards_uncommitted(s, amqp):
    q = declare_queue(s.ch)
    tx = s.conn.channel()
    tx.tx_select()
    publish_n(tx, q, 2)
    tx.close()
    settle(s.conn, 0.3)
    assert message_count(amqp, q) == 0
    s.ch.queue_delete(q)
