"""Flow control with pika: a slow consumer never stalls other queues or connections. Every
test runs against Warren and (with RABBITMQ_ADDR) RabbitMQ."""

import time

from test_messaging_helpers import (  # noqa: F401 - fixtures
    amqp, collect, declare_queue, message_count, s, session_factory, settle, wait_until,
)

N = 1000


def fast_round(session, producer, q, n, timeout):
    """Consume n messages from q on `session`, acking each; return seconds taken."""
    got = []

    def on_msg(ch, m, _p, body):
        got.append(body)
        ch.basic_ack(m.delivery_tag)

    session.ch.basic_qos(prefetch_count=50)
    tag = session.ch.basic_consume(q, on_msg)
    t0 = time.monotonic()
    for i in range(n):
        producer.ch.basic_publish("", q, b"%d" % i)
    collect(session.conn, got, n, timeout)
    session.ch.basic_cancel(tag)
    assert got == [b"%d" % i for i in range(n)], f"{len(got)} of {n} arrived"
    return time.monotonic() - t0


def test_never_acking_consumer_does_not_stall_other_queues(session_factory, amqp):
    producer = session_factory()
    slow = session_factory()
    qa = declare_queue(producer.ch)
    qb = declare_queue(producer.ch)
    qc = declare_queue(producer.ch)
    # queue A: one consumer with prefetch 1 that never acks
    stuck = []
    slow.ch.basic_qos(prefetch_count=1)
    slow.ch.basic_consume(qa, lambda _c, m, _p, b: stuck.append(b))
    for i in range(N):
        producer.ch.basic_publish("", qa, b"a%d" % i)
    collect(slow.conn, stuck, 1)
    # queue B: a fast consumer on another channel of the slow consumer's connection
    same_conn = _SessionOnChannel(slow.conn)
    fast_round(same_conn, producer, qb, N, timeout=20)
    # queue C: a fast consumer on another connection
    fast_round(session_factory(), producer, qc, N, timeout=20)
    settle(slow.conn, 0.2)
    assert stuck == [b"a0"], "prefetch 1 without acks: exactly one delivery"
    wait_until(lambda: message_count(amqp, qa) == N - 1, what="A's backlog")
    for q in (qa, qb, qc):
        producer.ch.queue_delete(q)


def test_unread_socket_does_not_stall_other_connections(session_factory):
    producer = session_factory()
    qa = declare_queue(producer.ch)
    qb = declare_queue(producer.ch)
    # A consumer without prefetch limit that never reads its socket: the broker's writes to
    # it back up in TCP buffers.
    blocked = session_factory()
    blocked.ch.basic_consume(qa, lambda *a: None, auto_ack=True)
    body = b"x" * 16384
    for _ in range(2000):  # ~32 MB towards a socket nobody reads
        producer.ch.basic_publish("", qa, body)
    producer.ch.queue_declare(qa, passive=True)
    # meanwhile, another connection exchanges messages through queue B at full speed
    elapsed = fast_round(session_factory(), session_factory(), qb, N, timeout=20)
    assert elapsed < 15, f"{N} messages took {elapsed:.1f}s while another socket was stuck"
    # and a fresh connection can still declare, publish and get
    other = session_factory()
    qd = declare_queue(other.ch, exclusive=True)
    other.ch.basic_publish("", qd, b"ok")
    assert other.ch.basic_get(qd, auto_ack=True)[2] == b"ok"
    blocked.close()
    for q in (qa, qb):
        producer.ch.queue_delete(q)


class _SessionOnChannel:
    """A second channel of an existing connection, shaped like helpers.Session."""

    def __init__(self, conn):
        self.conn = conn
        self.ch = conn.channel()
