"""Queue expiry (`x-expires`) with pika: a queue unused for that long is deleted with its
messages; a consumer keeps it, and so do queue.declare and basic.get, which renew the lease;
the clock starts when the last consumer goes. Also run against RabbitMQ by the differential
stage."""
import time

import pika
import pytest

from test_messaging_helpers import uniq

# The lease in these tests, and how long to stay away from a queue before looking: a look is
# a passive declare, which renews the lease, so only a quiet period longer than the lease
# (plus the broker's expiry check interval, 200 ms in Warren) can show that it went.
LEASE_MS = 400
QUIET = 1.2


def _declare(broker, arguments):
    """A connection, a channel, and a new queue declared with `arguments`."""
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    q = uniq("expires")
    ok = ch.queue_declare(q, arguments=arguments)
    assert ok.method.queue == q
    return conn, ch, q


def _exists(conn, q):
    """Passive declare on a fresh channel (a 404 closes that channel only)."""
    ch = conn.channel()
    try:
        ch.queue_declare(q, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
        return False
    ch.close()
    return True


def _gone_after_quiet(conn, q, tries=5):
    """True once a look after a quiet period finds the queue gone."""
    for _ in range(tries):
        conn.sleep(QUIET)
        if not _exists(conn, q):
            return True
    return False


def test_unused_queue_goes_with_its_messages(broker):
    conn, ch, q = _declare(broker, {"x-expires": LEASE_MS})
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q, b"m%d" % i)
    assert _gone_after_quiet(conn, q), "a queue unused for longer than x-expires is still there"
    # A publish to it now goes nowhere: unroutable with mandatory.
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("", q, b"late", mandatory=True)
    conn.close()


def test_a_consumer_keeps_the_queue_and_the_clock_starts_when_it_goes(broker):
    conn, ch, q = _declare(broker, {"x-expires": LEASE_MS})
    tag = ch.basic_consume(q, lambda c, m, p, b: None, auto_ack=True)
    conn.sleep(3 * LEASE_MS / 1000)
    assert _exists(conn, q), "a queue with a consumer expired"
    conn.sleep(3 * LEASE_MS / 1000)
    ch.basic_publish("", q, b"still here")
    assert _exists(conn, q), "a queue with a consumer expired"
    ch.basic_cancel(tag)
    assert _gone_after_quiet(conn, q), "the queue outlived x-expires after its consumer left"
    conn.close()


def test_closing_the_consumers_channel_starts_the_clock(broker):
    conn, ch, q = _declare(broker, {"x-expires": LEASE_MS})
    ch.basic_consume(q, lambda c, m, p, b: None, auto_ack=True)
    conn.sleep(3 * LEASE_MS / 1000)
    assert _exists(conn, q)
    ch.close()
    assert _gone_after_quiet(conn, q), "the queue outlived x-expires after its channel closed"
    conn.close()


@pytest.mark.parametrize("renew", ["declare", "passive-declare", "basic-get"])
def test_declare_and_get_renew_the_lease(broker, renew):
    args = {"x-expires": LEASE_MS}
    conn, ch, q = _declare(broker, args)
    # Touch it every 150 ms for three leases: it must survive all of them.
    deadline = time.monotonic() + 3 * LEASE_MS / 1000
    while time.monotonic() < deadline:
        if renew == "declare":
            ch.queue_declare(q, arguments=args)
        elif renew == "passive-declare":
            ch.queue_declare(q, passive=True)
        else:
            ch.basic_get(q, auto_ack=True)
        conn.sleep(0.15)
    assert _exists(conn, q), "the queue expired although it was used within every lease"
    assert _gone_after_quiet(conn, q)
    conn.close()


def test_an_expired_queue_can_be_declared_again(broker):
    conn, ch, q = _declare(broker, {"x-expires": LEASE_MS})
    ch.basic_publish("", q, b"old")
    assert _gone_after_quiet(conn, q)
    ok = ch.queue_declare(q, arguments={"x-expires": 60000})
    assert ok.method.message_count == 0, "messages of the expired queue came back"
    ch.queue_delete(q)
    conn.close()


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_bad_x_expires_is_refused_with_406(broker, value):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(uniq("expires"), arguments={"x-expires": value})
    assert e.value.reply_code == 406
    assert "x-expires" in e.value.reply_text
    conn.close()
