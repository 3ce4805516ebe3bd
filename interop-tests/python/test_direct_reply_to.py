"""Direct reply-to (`amq.rabbitmq.reply-to`) with pika, as RabbitMQ 3.10: an RPC client
consumes the pseudo-queue without acks, its requests' `reply_to` is rewritten to its channel's
own `amq.rabbitmq.reply-to.<suffix>`, and a server anywhere replies through the default
exchange under that name. Also run against RabbitMQ by the differential stage."""
import time

import pika
import pytest

from test_messaging_helpers import uniq

PSEUDO = "amq.rabbitmq.reply-to"


def _open(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    return conn, conn.channel()


def _expect_406(ch, fn, text):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        fn()
        # A publish is asynchronous: a synchronous method afterwards meets the close.
        ch.basic_qos(prefetch_count=0)
    assert (e.value.reply_code, e.value.reply_text) == (406, "PRECONDITION_FAILED - " + text)


class _Rpc:
    """An RPC client on its own connection, consuming the pseudo-queue."""

    def __init__(self, broker):
        self.conn, self.ch = _open(broker)
        self.replies = []
        self.tag = self.ch.basic_consume(PSEUDO, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch, method, props, body):
        self.replies.append((method, props, body))

    def wait(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.replies) < n and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        return self.replies


def _server(broker):
    conn, ch = _open(broker)
    q = uniq("rpc")
    ch.queue_declare(q, auto_delete=True)
    return conn, ch, q


def test_request_and_reply_round_trip(broker):
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    client.ch.confirm_delivery()
    for i in range(3):
        client.ch.basic_publish("", q, b"req%d" % i, pika.BasicProperties(
            reply_to=PSEUDO, correlation_id="c%d" % i))
    names = set()
    for i in range(3):
        method, props, body = sch.basic_get(q, auto_ack=True)
        assert body == b"req%d" % i
        # The server sees the client channel's own pseudo-queue, not the shared name.
        assert props.reply_to.startswith(PSEUDO + ".") and len(props.reply_to) > len(PSEUDO) + 1
        names.add(props.reply_to)
        sch.basic_publish("", props.reply_to, b"resp%d" % i, pika.BasicProperties(
            correlation_id=props.correlation_id, content_type="text/plain"))
    assert len(names) == 1, "one name per channel"
    got = client.wait(3)
    assert [(b, p.correlation_id, p.content_type) for _m, p, b in got] == [
        (b"resp0", "c0", "text/plain"), (b"resp1", "c1", "text/plain"),
        (b"resp2", "c2", "text/plain")]
    name = names.pop()
    for method, _p, _b in got:
        assert (method.consumer_tag, method.exchange, method.routing_key, method.redelivered) == (
            client.tag, "", name, False)
    client.conn.close()
    sconn.close()


def test_the_pseudo_queue_must_be_consumed_without_acks(broker):
    conn, ch = _open(broker)
    _expect_406(ch, lambda: ch.basic_consume(PSEUDO, lambda *a: None, auto_ack=False),
                "reply consumer cannot acknowledge")
    conn.close()


def test_one_reply_consumer_per_channel(broker):
    conn, ch = _open(broker)
    ch.basic_consume(PSEUDO, lambda *a: None, auto_ack=True)
    _expect_406(ch, lambda: ch.basic_consume(PSEUDO, lambda *a: None, auto_ack=True),
                "reply consumer already set")
    # Another channel of the same connection may have its own.
    ch2 = conn.channel()
    assert ch2.basic_consume(PSEUDO, lambda *a: None, auto_ack=True, consumer_tag="mine") == "mine"
    conn.close()


def test_a_request_needs_a_reply_consumer_on_its_own_channel(broker):
    conn, ch = _open(broker)
    sconn, _sch, q = _server(broker)
    _expect_406(ch, lambda: ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO)),
                "fast reply consumer does not exist")
    # A consumer on another channel does not count.
    ch1 = conn.channel()
    ch1.basic_consume(PSEUDO, lambda *a: None, auto_ack=True)
    ch2 = conn.channel()
    _expect_406(ch2, lambda: ch2.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO)),
                "fast reply consumer does not exist")
    conn.close()
    sconn.close()


def test_other_reply_to_values_are_left_alone(broker):
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    client.ch.confirm_delivery()
    for value in (PSEUDO + ".foo", "plain-queue", PSEUDO + "x"):
        client.ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=value))
        _m, props, _b = sch.basic_get(q, auto_ack=True)
        assert props.reply_to == value
    client.conn.close()
    sconn.close()


def test_declare_of_the_pseudo_queues(broker):
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    client.ch.confirm_delivery()
    client.ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO))
    _m, props, _b = sch.basic_get(q, auto_ack=True)
    name = props.reply_to
    for queue, passive in ((PSEUDO, True), (PSEUDO, False), (name, True), (name, False)):
        ok = sch.queue_declare(queue, passive=passive).method
        assert (ok.queue, ok.message_count, ok.consumer_count) == (queue, 0, 1)
    # Once its consumer is cancelled, the name is gone.
    client.ch.basic_cancel(client.tag)
    ch = sconn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(name, passive=True)
    assert e.value.reply_code == 404
    client.conn.close()
    sconn.close()


def test_replies_never_count_as_routed(broker):
    """With mandatory, a reply comes back in a basic.return and is delivered as well, as in
    RabbitMQ; a reply to a name nobody consumes is dropped."""
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    client.ch.confirm_delivery()
    client.ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO))
    _m, props, _b = sch.basic_get(q, auto_ack=True)
    sch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as e:
        sch.basic_publish("", props.reply_to, b"mandatory", mandatory=True)
    assert [(m.method.reply_code, m.method.reply_text) for m in e.value.messages] == [
        (312, "NO_ROUTE")]
    sch.basic_publish("", props.reply_to, b"plain")
    assert [b for _m, _p, b in client.wait(2)] == [b"mandatory", b"plain"]
    # (Not a name of two dot-separated parts: RabbitMQ 3.10 tries to decode those and
    # closes the publisher's connection with 541 when that fails.)
    for name in (PSEUDO + ".nobody", PSEUDO):
        with pytest.raises(pika.exceptions.UnroutableError):
            sch.basic_publish("", name, b"lost", mandatory=True)
        sch.basic_publish("", name, b"lost")
    # After a cancel, replies to the old name are dropped too.
    client.ch.basic_cancel(client.tag)
    sch.basic_publish("", props.reply_to, b"late")
    client.conn.process_data_events(time_limit=0.3)
    assert len(client.replies) == 2
    client.conn.close()
    sconn.close()


def test_replies_to_a_closed_channel_are_dropped(broker):
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    client.ch.confirm_delivery()
    client.ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO))
    _m, props, _b = sch.basic_get(q, auto_ack=True)
    client.conn.close()
    sch.confirm_delivery()
    sch.basic_publish("", props.reply_to, b"nobody")
    # The server's channel and connection are unaffected.
    assert sch.queue_declare(q, passive=True).method.message_count == 0
    sconn.close()


def test_replies_and_queue_deliveries_share_the_channel(broker):
    """A channel with a reply consumer and an ordinary manual-ack consumer: the ordinary
    deliveries keep consecutive delivery tags and acks work."""
    client = _Rpc(broker)
    sconn, sch, q = _server(broker)
    work = uniq("work")
    client.ch.queue_declare(work, auto_delete=True)
    ordinary = []
    client.ch.basic_consume(work, lambda c, m, p, b: ordinary.append(m.delivery_tag))
    client.ch.confirm_delivery()
    client.ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=PSEUDO))
    _m, props, _b = sch.basic_get(q, auto_ack=True)
    for i in range(3):
        sch.basic_publish("", work, b"w%d" % i)
        sch.basic_publish("", props.reply_to, b"r%d" % i)
    deadline = time.monotonic() + 5
    while (len(ordinary) < 3 or len(client.replies) < 3) and time.monotonic() < deadline:
        client.conn.process_data_events(time_limit=0.05)
    assert ordinary == [1, 2, 3]
    assert [b for _m, _p, b in client.replies] == [b"r0", b"r1", b"r2"]
    client.ch.basic_ack(3, multiple=True)
    assert client.ch.queue_declare(work, passive=True).method.message_count == 0
    client.conn.close()
    sconn.close()
