"""kombu (the library Celery uses) against Warren and (with RABBITMQ_ADDR) RabbitMQ: a producer
and a consumer exchanging 10,000 messages with acks and prefetch, and the Celery-style basics."""

import socket
import threading
import time

import kombu
import pytest

from test_messaging_helpers import amqp, uniq  # noqa: F401 - fixtures

N = 10_000
PREFETCH = 50


def kombu_conn(amqp, **kw):
    kw.setdefault("connect_timeout", 5)
    return kombu.Connection(amqp.url(), **kw)


def celery_qos_global(conn):
    """What Celery's worker passes as basic.qos global: it keys off the server's product."""
    return not conn.qos_semantics_matches_spec


def produce(amqp, exchange, queue, n, errors):
    try:
        with kombu_conn(amqp) as conn:
            producer = conn.Producer(serializer="json")
            for i in range(n):
                producer.publish({"n": i, "pad": "x" * 64}, exchange=exchange,
                                 routing_key=queue.routing_key, declare=[queue] if i == 0 else [],
                                 retry=False, delivery_mode=2)
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_kombu_10000_messages_with_acks_and_prefetch(amqp):
    exchange = kombu.Exchange(uniq("celery.x"), type="direct", durable=True)
    queue = kombu.Queue(uniq("celery.q"), exchange, routing_key=uniq("rk"), durable=True)
    received = []
    pending = []
    max_outstanding = 0
    with kombu_conn(amqp) as conn:
        queue(conn.default_channel).declare()
        apply_global = celery_qos_global(conn)

        def on_message(body, message):
            nonlocal max_outstanding
            received.append(body["n"])
            pending.append(message)
            max_outstanding = max(max_outstanding, len(pending))
            # ack in batches as the prefetch window fills, like a busy worker
            if len(pending) >= PREFETCH or len(received) == N:
                for m in pending:
                    m.ack()
                pending.clear()

        errors = []
        producer = threading.Thread(target=produce, args=(amqp, exchange, queue, N, errors))
        consumer = conn.Consumer(queue, callbacks=[on_message], accept=["json"])
        # like Celery's worker: basic.qos first (global as Celery picks it), then consume
        consumer.qos(prefetch_count=PREFETCH, apply_global=apply_global)
        consumer.consume()
        producer.start()
        deadline = time.monotonic() + 120
        while len(received) < N and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except socket.timeout:
                if not producer.is_alive() and errors:
                    break
        consumer.cancel()
        producer.join(timeout=30)
        assert errors == []
        assert len(received) == N, f"received {len(received)} of {N}"
        assert received == list(range(N)), "one producer, one consumer: order is kept"
        assert max_outstanding == PREFETCH, \
            f"prefetch {PREFETCH}: at most that many unacked, got {max_outstanding}"
        # everything was acked: the queue is empty and nothing comes back on reconnect
        ch = conn.channel()
        _name, count, consumers = ch.queue_declare(queue=queue.name, passive=True)
        assert (count, consumers) == (0, 0)
        ch.queue_delete(queue.name)
        ch.exchange_delete(exchange.name)
        ch.close()


def test_kombu_unacked_come_back_after_reconnect(amqp):
    queue = kombu.Queue(uniq("kq"), kombu.Exchange(uniq("kx"), type="direct"),
                        routing_key="k", auto_delete=False)
    with kombu_conn(amqp) as conn:
        producer = conn.Producer(serializer="json")
        for i in range(10):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key="k",
                             declare=[queue])
    got = []
    with kombu_conn(amqp) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, m: got.append(body["n"])],
                           accept=["json"], prefetch_count=4):
            while len(got) < 4:
                conn.drain_events(timeout=5)
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=0.5)
    assert got == [0, 1, 2, 3]
    again = []
    with kombu_conn(amqp) as conn:
        def on_message(body, message):
            again.append((body["n"], message.delivery_info["redelivered"]))
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
            while len(again) < 10:
                conn.drain_events(timeout=5)
        conn.default_channel.queue_delete(queue.name)
        conn.default_channel.exchange_delete(queue.exchange.name)
    assert again == [(i, i < 4) for i in range(10)]


def test_kombu_simple_queue_and_reject(amqp):
    name = uniq("simple")
    with kombu_conn(amqp) as conn:
        q = conn.SimpleQueue(name, serializer="json")
        q.put({"hello": "world"})
        q.put({"second": True})
        m = q.get(block=True, timeout=5)
        assert m.payload == {"hello": "world"}
        m.requeue()
        # the consumer may already hold "second": take two and sort them out
        got = {}
        for _ in range(2):
            m = q.get(block=True, timeout=5)
            got[next(iter(m.payload))] = m
        assert set(got) == {"hello", "second"}
        assert got["hello"].delivery_info["redelivered"] is True
        assert got["second"].delivery_info["redelivered"] is False
        got["hello"].ack()
        got["second"].reject()
        with pytest.raises(q.Empty):
            q.get(block=True, timeout=0.5)
        assert q.qsize() == 0
        q.close()
        ch = conn.channel()
        assert ch.queue_delete(name) == 0
        ch.close()


def test_kombu_amqplain_login_and_product(amqp):
    with kombu_conn(amqp, login_method="AMQPLAIN") as conn:
        conn.connect()
        assert conn.connected
        props = conn.connection.server_properties
        assert props["capabilities"]["publisher_confirms"] is True
        assert props["capabilities"]["consumer_cancel_notify"] is True
        ch = conn.channel()
        _n, count, _c = ch.queue_declare(queue=uniq("kq"), exclusive=True)
        assert count == 0
        ch.close()


def test_kombu_publish_confirms_and_mandatory(amqp):
    with kombu_conn(amqp, transport_options={"confirm_publish": True}) as conn:
        q = kombu.Queue(uniq("kq"), kombu.Exchange("amq.direct", type="direct", passive=True),
                        routing_key=uniq("k"), exclusive=True)
        ch = conn.default_channel
        q(ch).declare()
        producer = conn.Producer(serializer="json")
        for i in range(100):
            producer.publish({"n": i}, exchange="amq.direct", routing_key=q.routing_key)
        _n, count, _c = ch.queue_declare(queue=q.name, passive=True)
        assert count == 100
        # with confirms, py-amqp turns the basic.return that precedes the ack into an error
        with pytest.raises(Exception) as info:
            producer.publish({"n": -1}, exchange="amq.direct", routing_key="nobody-here",
                             mandatory=True)
        assert "312" in str(info.value) and "NO_ROUTE" in str(info.value), info.value
