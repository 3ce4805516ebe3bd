"""The consumer (acknowledgement) timeout with pika, as RabbitMQ 3.10's `consumer_timeout`: a
channel holding a delivery unacknowledged for longer is closed with 406 and RabbitMQ's text,
its deliveries go back to the queue, and the connection and its other channels stay.

Warren only: the timeout is a broker setting (RabbitMQ's default is 30 minutes), and these
tests start Warren with `--consumer-timeout 1000`."""
import time

import pika
import pytest

from test_messaging_helpers import uniq

TIMEOUT_MS = 1000


@pytest.fixture
def broker_args():
    return ["--consumer-timeout", str(TIMEOUT_MS)]


def _open(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    return conn, conn.channel()


def _wait_closed(conn, ch, seconds):
    deadline = time.monotonic() + seconds
    while ch.is_open and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return not ch.is_open


def test_an_unacked_delivery_closes_its_channel_and_comes_back(warren_only):
    conn, ch = _open(warren_only)
    q = uniq("ackto")
    ch.queue_declare(q, auto_delete=False)
    ch.basic_publish("", q, b"slow")
    other = conn.channel()
    reasons = []
    cch = conn.channel()
    # (BlockingChannel has no close callback of its own; its underlying channel has.)
    cch._impl.add_on_close_callback(lambda _c, reason: reasons.append(reason))
    got = []
    cch.basic_consume(q, lambda c, m, p, b: got.append(b))
    started = time.monotonic()
    assert _wait_closed(conn, cch, 5), "the channel outlived the consumer timeout"
    elapsed = time.monotonic() - started
    assert got == [b"slow"]
    assert 0.9 <= elapsed <= 3.0, elapsed
    reason = reasons[0]
    assert (reason.reply_code, reason.reply_text) == (
        406, f"PRECONDITION_FAILED - delivery acknowledgement on channel {cch.channel_number} "
        f"timed out. Timeout value used: {TIMEOUT_MS} ms. This timeout value can be "
        "configured, see consumers doc guide to learn more")
    # The connection and its other channels are fine; the delivery is back, redelivered.
    method, _p, body = other.basic_get(q, auto_ack=True)
    assert (body, method.redelivered) == (b"slow", True)
    ch.queue_delete(q)
    conn.close()


def test_acks_in_time_keep_the_channel(warren_only):
    conn, ch = _open(warren_only)
    q = uniq("ackto")
    ch.queue_declare(q, auto_delete=True)
    cch = conn.channel()
    cch.basic_qos(prefetch_count=1)

    def on_message(c, m, _p, _b):
        # Each delivery is acked after half the timeout: the channel lives on even though
        # the whole run takes three timeouts.
        conn.call_later(TIMEOUT_MS / 2000, lambda: c.basic_ack(m.delivery_tag))
        got.append(m.delivery_tag)

    got = []
    cch.basic_consume(q, on_message)
    for i in range(6):
        ch.basic_publish("", q, b"m%d" % i)
    deadline = time.monotonic() + 3 * TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert cch.is_open
    assert got == [1, 2, 3, 4, 5, 6]
    conn.close()


def test_a_basic_get_without_ack_times_out_too(warren_only):
    conn, ch = _open(warren_only)
    q = uniq("ackto")
    ch.queue_declare(q, auto_delete=False)
    ch.basic_publish("", q, b"held")
    gch = conn.channel()
    method, _p, _b = gch.basic_get(q)
    assert method is not None
    assert _wait_closed(conn, gch, 5)
    assert ch.basic_get(q, auto_ack=True)[2] == b"held"
    ch.queue_delete(q)
    conn.close()


def test_no_ack_consumers_have_nothing_to_time_out(warren_only):
    conn, ch = _open(warren_only)
    q = uniq("ackto")
    ch.queue_declare(q, auto_delete=True)
    got = []
    cch = conn.channel()
    cch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    ch.basic_publish("", q, b"free")
    deadline = time.monotonic() + 2.5 * TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == [b"free"] and cch.is_open
    conn.close()
