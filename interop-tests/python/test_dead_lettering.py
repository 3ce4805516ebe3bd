"""Dead-lettering with pika, as in RabbitMQ 3.10: messages rejected without requeue, expired
(queue or per-message TTL) or pushed out by a length limit are republished to the queue's
`x-dead-letter-exchange`, with the `x-death` history and `x-first-death-*` headers, under
`x-dead-letter-routing-key` or their own routing keys; automatic cycles are dropped. Also run
against RabbitMQ by the differential stage."""
import datetime
import time

import pika
import pytest

from test_messaging_helpers import uniq


def _open(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    return conn, conn.channel()


def _dlx_pair(ch, source_args=None, dlx_type="fanout", dlq_key=""):
    """A dead-letter exchange with a queue bound to it, and a source queue dead-lettering into
    it with `source_args` besides. Returns (source, dlx, dlq)."""
    dlx, dlq, src = uniq("dlx"), uniq("dlq"), uniq("src")
    ch.exchange_declare(dlx, dlx_type, auto_delete=True)
    ch.queue_declare(dlq, auto_delete=True)
    ch.queue_bind(dlq, dlx, dlq_key)
    args = {"x-dead-letter-exchange": dlx}
    args.update(source_args or {})
    ch.queue_declare(src, arguments=args, auto_delete=True)
    return src, dlx, dlq


def _get(ch, q, timeout=5.0, auto_ack=True):
    """basic.get until a message comes (dead-lettering is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(q, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        assert time.monotonic() < deadline, f"nothing reached {q} within {timeout} s"
        time.sleep(0.02)


def _count(ch, q):
    return ch.queue_declare(q, passive=True).method.message_count


def _stays_empty(ch, q, seconds=0.8):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _count(ch, q) != 0:
            return False
        time.sleep(0.05)
    return True


def _death(props, i=0):
    deaths = props.headers["x-death"]
    return deaths[i]


def test_rejected_message_goes_to_the_dlx_with_its_history(broker):
    conn, ch = _open(broker)
    src, dlx, dlq = _dlx_pair(ch)
    props = pika.BasicProperties(
        content_type="text/plain", correlation_id="c-1", delivery_mode=2,
        headers={"app": "kept"})
    ch.basic_publish("", src, b"payload", props)
    method, _p, body = ch.basic_get(src)
    assert body == b"payload"
    before = datetime.datetime.now(datetime.timezone.utc)
    ch.basic_reject(method.delivery_tag, requeue=False)
    m, p, body = _get(ch, dlq)
    assert body == b"payload"
    # Delivered from the dead-letter exchange, with the routing key it was published with.
    assert (m.exchange, m.routing_key, m.redelivered) == (dlx, src, False)
    assert (p.content_type, p.correlation_id, p.delivery_mode) == ("text/plain", "c-1", 2)
    assert p.headers["app"] == "kept"
    d = _death(p)
    assert len(p.headers["x-death"]) == 1
    assert (d["count"], d["reason"], d["queue"], d["exchange"], d["routing-keys"]) == (
        1, "rejected", src, "", [src])
    assert isinstance(d["time"], datetime.datetime)
    when = d["time"] if d["time"].tzinfo else d["time"].replace(tzinfo=datetime.timezone.utc)
    assert abs((when - before).total_seconds()) < 60
    assert "original-expiration" not in d
    assert (p.headers["x-first-death-reason"], p.headers["x-first-death-queue"],
            p.headers["x-first-death-exchange"]) == ("rejected", src, "")
    assert _count(ch, src) == 0
    conn.close()


def test_nack_multiple_without_requeue_dead_letters_each_in_order(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch)
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", src, b"m%d" % i)
    tags = []
    for _ in range(5):
        method, _p, _b = ch.basic_get(src)
        tags.append(method.delivery_tag)
    # Requeue=true messages stay: nack the first two back, then the rest to the DLX.
    ch.basic_nack(tags[1], multiple=True, requeue=True)
    ch.basic_nack(tags[4], multiple=True, requeue=False)
    bodies = [_get(ch, dlq)[2] for _ in range(3)]
    assert bodies == [b"m2", b"m3", b"m4"]
    assert _count(ch, src) == 2
    conn.close()


def test_dead_letter_routing_key_through_the_default_exchange(broker):
    conn, ch = _open(broker)
    dlq, src = uniq("dlq"), uniq("src")
    ch.queue_declare(dlq, auto_delete=True)
    ch.queue_declare(src, auto_delete=True, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ch.basic_publish("", src, b"x", pika.BasicProperties(headers={"CC": ["elsewhere"]}))
    method, _p, _b = ch.basic_get(src)
    ch.basic_nack(method.delivery_tag, requeue=False)
    m, p, body = _get(ch, dlq)
    assert (m.exchange, m.routing_key, body) == ("", dlq, b"x")
    # The queue's key replaces the message's keys and its CC header goes; the entry keeps
    # the keys it was published with.
    assert "CC" not in p.headers
    assert _death(p)["routing-keys"] == [src, "elsewhere"]
    conn.close()


def test_queue_ttl_expiry_dead_letters_without_any_consumer(broker):
    conn, ch = _open(broker)
    src, dlx, dlq = _dlx_pair(ch, {"x-message-ttl": 200})
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", src, b"e%d" % i)
    bodies = []
    for _ in range(3):
        m, p, body = _get(ch, dlq)
        bodies.append(body)
        assert m.exchange == dlx
        assert _death(p)["reason"] == "expired"
        assert p.headers["x-first-death-reason"] == "expired"
    assert bodies == [b"e0", b"e1", b"e2"]
    assert _count(ch, src) == 0
    conn.close()


def test_per_message_expiration_is_kept_as_original_expiration(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch)
    ch.basic_publish("", src, b"short", pika.BasicProperties(expiration="150"))
    _m, p, body = _get(ch, dlq)
    assert body == b"short"
    # The expiration property goes (it would expire again in the next queue).
    assert p.expiration is None
    d = _death(p)
    assert (d["reason"], d["original-expiration"]) == ("expired", "150")
    conn.close()


def test_max_length_drop_head_dead_letters_the_oldest(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch, {"x-max-length": 2})
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", src, b"n%d" % i)
    bodies = [_get(ch, dlq)[2] for _ in range(3)]
    assert bodies == [b"n0", b"n1", b"n2"]
    assert [ch.basic_get(src, auto_ack=True)[2] for _ in range(2)] == [b"n3", b"n4"]
    conn.close()


def test_max_length_reason_is_maxlen(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch, {"x-max-length": 1})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"old")
    ch.basic_publish("", src, b"new")
    _m, p, body = _get(ch, dlq)
    assert body == b"old"
    assert (_death(p)["reason"], p.headers["x-first-death-reason"]) == ("maxlen", "maxlen")
    conn.close()


def test_reject_publish_dlx_nacks_the_publisher_and_dead_letters_the_refused(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch, {"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", src, b"refused")
    _m, p, body = _get(ch, dlq)
    assert body == b"refused"
    assert _death(p)["reason"] == "maxlen"
    _m, _p, body = ch.basic_get(src, auto_ack=True)
    assert body == b"kept"
    conn.close()


def test_reject_publish_does_not_dead_letter(broker):
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch, {"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", src, b"refused")
    assert _stays_empty(ch, dlq)
    conn.close()


def test_an_internal_exchange_can_be_the_dead_letter_exchange(broker):
    """Clients cannot publish to an internal exchange; the broker's dead letters can."""
    conn, ch = _open(broker)
    dlx, dlq, src = uniq("dlx"), uniq("dlq"), uniq("src")
    ch.exchange_declare(dlx, "fanout", internal=True, auto_delete=True)
    ch.queue_declare(dlq, auto_delete=True)
    ch.queue_bind(dlq, dlx, "")
    ch.queue_declare(src, auto_delete=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", src, b"inside")
    method, _p, _b = ch.basic_get(src)
    ch.basic_reject(method.delivery_tag, requeue=False)
    assert _get(ch, dlq)[2] == b"inside"
    conn.close()


def test_missing_dead_letter_exchange_drops_the_message(broker):
    conn, ch = _open(broker)
    dlx, dlq, src = uniq("dlx"), uniq("dlq"), uniq("src")
    ch.queue_declare(src, auto_delete=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", src, b"lost")
    method, _p, _b = ch.basic_get(src)
    ch.basic_reject(method.delivery_tag, requeue=False)
    # The exchange is only looked up when a message dies: declared now, it catches the next.
    ch.exchange_declare(dlx, "fanout", auto_delete=True)
    ch.queue_declare(dlq, auto_delete=True)
    ch.queue_bind(dlq, dlx, "")
    assert _count(ch, src) == 0
    assert _stays_empty(ch, dlq, 0.3)
    ch.basic_publish("", src, b"caught")
    method, _p, _b = ch.basic_get(src)
    ch.basic_reject(method.delivery_tag, requeue=False)
    assert _get(ch, dlq)[2] == b"caught"
    conn.close()


def test_deaths_chain_and_repeat_deaths_count_up(broker):
    """q1 (TTL) -> q2, rejected there -> q1 again, expired again -> q2: the entry for each
    (queue, reason) counts up and the latest comes first; x-first-death-* stay."""
    conn, ch = _open(broker)
    q1, q2 = uniq("chain1"), uniq("chain2")
    ch.queue_declare(q1, auto_delete=True, arguments={
        "x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q2})
    ch.queue_declare(q2, auto_delete=True, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q1})
    ch.basic_publish("", q1, b"loop", pika.BasicProperties(headers={"n": 1}))
    for round_ in (1, 2):
        method, p, body = _get(ch, q2, auto_ack=False)
        deaths = p.headers["x-death"]
        assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == (
            [(q1, "expired", 1)] if round_ == 1
            else [(q1, "expired", 2), (q2, "rejected", 1)])
        assert (p.headers["x-first-death-queue"], p.headers["x-first-death-reason"]) == (
            q1, "expired")
        assert p.headers["n"] == 1
        ch.basic_reject(method.delivery_tag, requeue=False)
    # Third time round it is back in q1: an automatic cycle needs no rejection in it, and
    # this one has one, so the message keeps going round as long as q2 rejects it.
    method, p, _b = _get(ch, q2)
    assert [(d["queue"], d["reason"], d["count"]) for d in p.headers["x-death"]] == [
        (q1, "expired", 3), (q2, "rejected", 2)]
    conn.close()


def test_an_automatic_cycle_is_dropped(broker):
    """A queue whose expired messages dead-letter into itself would expire them for ever: the
    route back is dropped, as is any cycle with no rejection in it."""
    conn, ch = _open(broker)
    q = uniq("cycle")
    ch.queue_declare(q, auto_delete=True, arguments={
        "x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"round")
    deadline = time.monotonic() + 5
    while _count(ch, q) != 0:
        assert time.monotonic() < deadline, "the self-cycling message is still there"
        time.sleep(0.05)
    assert _stays_empty(ch, q)
    conn.close()


def test_a_rejection_cycle_is_allowed(broker):
    """A queue dead-lettering into itself: each rejection brings the message back, with the
    count of its (queue, rejected) entry one up."""
    conn, ch = _open(broker)
    q = uniq("recycle")
    ch.queue_declare(q, auto_delete=True, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q})
    ch.basic_publish("", q, b"again")
    for n in range(4):
        method, p, body = _get(ch, q, auto_ack=False)
        assert body == b"again"
        if n == 0:
            assert p.headers is None or "x-death" not in p.headers
        else:
            assert [(d["queue"], d["reason"], d["count"]) for d in p.headers["x-death"]] == [
                (q, "rejected", n)]
        ch.basic_reject(method.delivery_tag, requeue=False)
    conn.close()


def test_cc_keys_route_the_dead_letter_when_the_queue_sets_no_key(broker):
    conn, ch = _open(broker)
    dlx, qa, qb, src = uniq("dlx"), uniq("dla"), uniq("dlb"), uniq("src")
    ch.exchange_declare(dlx, "direct", auto_delete=True)
    for q, key in ((qa, "ka"), (qb, "kb")):
        ch.queue_declare(q, auto_delete=True)
        ch.queue_bind(q, dlx, key)
    ch.queue_declare(src, auto_delete=True, arguments={"x-dead-letter-exchange": dlx})
    ch.queue_bind(src, "amq.direct", "ka")
    ch.basic_publish("amq.direct", "ka", b"both", pika.BasicProperties(headers={"CC": ["kb"]}))
    method, _p, _b = ch.basic_get(src)
    ch.basic_reject(method.delivery_tag, requeue=False)
    ma, pa, ba = _get(ch, qa)
    mb, _pb, bb = _get(ch, qb)
    assert (ba, bb) == (b"both", b"both")
    assert (ma.exchange, ma.routing_key, mb.routing_key) == (dlx, "ka", "ka")
    assert _death(pa)["exchange"] == "amq.direct"
    assert _death(pa)["routing-keys"] == ["ka", "kb"]
    conn.close()


def test_routing_key_without_exchange_is_refused(broker):
    conn, ch = _open(broker)
    q = uniq("norkx")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(q, arguments={"x-dead-letter-routing-key": "k"})
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for queue '{q}' in "
        "vhost '/': routing_key_but_no_dlx_defined")
    conn.close()


def test_ttl_expiry_at_delivery_dead_letters_with_a_consumer_behind(broker):
    """A consumer with prefetch 1 holds the first message; the rest expire in the queue and
    go to the DLX rather than to the consumer."""
    conn, ch = _open(broker)
    src, _dlx, dlq = _dlx_pair(ch, {"x-message-ttl": 150})
    ch.confirm_delivery()
    cch = conn.channel()
    cch.basic_qos(prefetch_count=1)
    got = []
    cch.basic_consume(src, lambda c, m, p, b: got.append((m.delivery_tag, b)))
    for i in range(3):
        ch.basic_publish("", src, b"d%d" % i)
    conn.process_data_events(time_limit=0.5)
    assert [b for _t, b in got] == [b"d0"]
    bodies = sorted(_get(ch, dlq)[2] for _ in range(2))
    assert bodies == [b"d1", b"d2"]
    cch.basic_ack(got[0][0])
    conn.process_data_events(time_limit=0.3)
    assert [b for _t, b in got] == [b"d0"]
    conn.close()
