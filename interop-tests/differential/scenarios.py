"""Differential scenarios: client scripts (pika) run unchanged against RabbitMQ 3.10 and against
Warren. Each scenario records what the client observes (reply codes and full reply texts,
counts, bodies, flags, routing results) through `obs`; run.py writes the transcripts and
compare.py reports every difference. Nothing here asserts: RabbitMQ's transcript is the
expectation.

Rules that keep transcripts comparable:
- every name embeds the run id (normalised to <id> in the transcript) so runs never collide;
- server-generated names are normalised (amq.gen-<22>, amq.ctag-<22>);
- only deterministic observations: counts are read after the broker answered a synchronous
  method on the channel that published, deliveries are waited for by count;
- an operation that fails closes only its own channel (or connection), so later steps of a
  scenario are unaffected.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import pika
import pika.exceptions

SCENARIOS: dict[str, Callable] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


class Observer:
    def __init__(self, run_id: str):
        self.run_id = run_id
        self.items: list[list] = []

    def __call__(self, key: str, value) -> None:
        self.items.append([normalise(key, self.run_id), normalise(value, self.run_id)])


GEN = re.compile(r"amq\.gen-[A-Za-z0-9_-]{22}")
CTAG = re.compile(r"amq\.ctag-[A-Za-z0-9_-]{22}")


def normalise(v, run_id):
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    if isinstance(v, str):
        v = v.replace(run_id, "<id>")
        v = GEN.sub("amq.gen-<22>", v)
        return CTAG.sub("amq.ctag-<22>", v)
    if isinstance(v, dict):
        return {normalise(k, run_id): normalise(x, run_id) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [normalise(x, run_id) for x in v]
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    return normalise(repr(v), run_id)


class Ctx:
    """A connection for a scenario; `attempt` runs one step on a fresh channel."""

    def __init__(self, params: pika.ConnectionParameters, run_id: str, obs: Observer):
        self.params = params
        self.run_id = run_id
        self.obs = obs
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()

    def name(self, base: str) -> str:
        return f"{base}.{self.run_id}"

    def reconnect(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self.conn = pika.BlockingConnection(self.params)
        self.ch = self.conn.channel()

    def attempt(self, key: str, fn: Callable) -> None:
        """Run fn(channel) on a fresh channel; record 'ok' + its result, or the close."""
        if not self.conn.is_open:
            self.reconnect()
        ch = self.conn.channel()
        try:
            res = fn(ch)
            self.obs(key, ["ok", summarise(res)])
            if ch.is_open:
                ch.close()
        except pika.exceptions.ChannelClosedByBroker as e:
            self.obs(key, ["channel.close", e.reply_code, e.reply_text])
        except pika.exceptions.ConnectionClosedByBroker as e:
            self.obs(key, ["connection.close", e.reply_code, e.reply_text])
            self.reconnect()

    def close(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def summarise(res):
    """A comparable view of a method frame or a plain result."""
    if res is None:
        return None
    method = getattr(res, "method", None)
    if method is not None:
        return {k: v for k, v in vars(method).items() if not k.startswith("_")}
    return res


def sync(ch):
    ch.basic_qos(prefetch_count=0)  # any synchronous round trip


def ready(ch, q):
    """The queue's ready count once it is stable. RabbitMQ answers queue.declare through a
    delegate process, so a count read right after an ack/nack/publish may lag: read until two
    reads 100 ms apart agree."""
    last = ch.queue_declare(q, passive=True).method.message_count
    for _ in range(30):
        time.sleep(0.1)
        now = ch.queue_declare(q, passive=True).method.message_count
        if now == last:
            return now
        last = now
    return last


def get_all(ch, q):
    out = []
    while True:
        m, p, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            return out
        out.append([body, m.redelivered, m.message_count, m.exchange, m.routing_key])


def pump(conn, sink, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(sink) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return sink


# ---- exchanges -------------------------------------------------------------------------------

@scenario
def exchange_declare_and_delete(c: Ctx):
    x = c.name("x")
    c.attempt("declare direct", lambda ch: ch.exchange_declare(x, "direct"))
    for kw in [dict(exchange_type="fanout"), dict(exchange_type="direct", durable=True),
               dict(exchange_type="direct", auto_delete=True),
               dict(exchange_type="direct", internal=True),
               dict(exchange_type="direct", arguments={"alternate-exchange": "ae"}),
               dict(exchange_type="direct", arguments={"other": 1}),
               dict(exchange_type="direct", passive=True, durable=True)]:
        c.attempt(f"redeclare {sorted(kw.items())}", lambda ch, kw=kw: ch.exchange_declare(x, **kw))
    c.attempt("declare bad type", lambda ch: ch.exchange_declare(c.name("y"), "bogus"))
    c.attempt("declare amq.x", lambda ch: ch.exchange_declare("amq." + c.name("x"), "direct"))
    c.attempt("passive missing", lambda ch: ch.exchange_declare(c.name("missing"), passive=True))
    for name in ["", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"]:
        c.attempt(f"passive {name!r}", lambda ch, n=name: ch.exchange_declare(n, passive=True))
        c.attempt(f"delete {name!r}", lambda ch, n=name: ch.exchange_delete(n))
    c.attempt("declare default", lambda ch: ch.exchange_declare("", "direct"))
    c.attempt("declare amq.direct as topic",
              lambda ch: ch.exchange_declare("amq.direct", "topic", durable=True))
    c.attempt("declare amq.direct non-durable",
              lambda ch: ch.exchange_declare("amq.direct", "direct"))
    q = c.name("q")
    c.attempt("queue", lambda ch: ch.queue_declare(q, exclusive=True))
    c.attempt("bind", lambda ch: ch.queue_bind(q, x, routing_key="k"))
    c.attempt("delete if-unused", lambda ch: ch.exchange_delete(x, if_unused=True))
    c.attempt("delete", lambda ch: ch.exchange_delete(x))
    c.attempt("delete again", lambda ch: ch.exchange_delete(x))
    c.attempt("bind default", lambda ch: ch.queue_bind(q, "", routing_key="k"))
    c.attempt("unbind default", lambda ch: ch.queue_unbind(q, "", routing_key=q))
    c.attempt("bind missing exchange", lambda ch: ch.queue_bind(q, c.name("nx")))
    c.attempt("bind missing queue", lambda ch: ch.queue_bind(c.name("nq"), "amq.direct"))
    c.attempt("e2e bind missing src", lambda ch: ch.exchange_bind("amq.direct", c.name("nx")))
    c.attempt("e2e bind missing dst", lambda ch: ch.exchange_bind(c.name("nx"), "amq.direct"))
    c.attempt("e2e bind to default", lambda ch: ch.exchange_bind("", "amq.direct"))
    c.attempt("e2e bind from default", lambda ch: ch.exchange_bind("amq.direct", ""))
    c.attempt("unbind missing", lambda ch: ch.queue_unbind(q, "amq.direct", routing_key="zz"))
    c.attempt("e2e unbind missing",
              lambda ch: ch.exchange_unbind("amq.fanout", "amq.direct", routing_key="zz"))
    ix = c.name("internal")
    c.attempt("internal", lambda ch: ch.exchange_declare(ix, "fanout", internal=True,
                                                         auto_delete=True))

    def publish_internal(ch):
        ch.basic_publish(ix, "", b"x")
        sync(ch)

    c.attempt("publish internal", publish_internal)

    def publish_missing(ch):
        ch.basic_publish(c.name("nx"), "", b"x")
        sync(ch)

    c.attempt("publish missing exchange", publish_missing)
    c.attempt("cleanup", lambda ch: ch.exchange_delete(ix))


@scenario
def topic_matrix(c: Ctx):
    x = c.name("topic")
    c.ch.exchange_declare(x, "topic", auto_delete=True)
    patterns = ["#", "*", "a", "a.*", "*.a", "a.#", "#.a", "a.#.b", "a.*.b", "#.#", "*.#",
                "#.*", "*.*", "*.#.*", "a.#.*", "#.a.#", "a..b", "", ".", "a.", ".a",
                "#.b.#.c", "a.*.#.b", "**", "a*", "#a", "a.b.c.d.e.f"]
    keys = ["", "a", "b", "a.b", "a.a", "b.a", "a.b.c", "a..b", "a.x.b", "a.x.y.b", ".", "..",
            "a.", ".a", "a.b.b", "x.a.y", "b.c", "x.b.y.c", "a.b.c.d.e.f", "**", "a*", "#a"]
    queues = {}
    for i, p in enumerate(patterns):
        q = c.ch.queue_declare(c.name(f"tq{i}"), exclusive=True).method.queue
        c.ch.queue_bind(q, x, routing_key=p)
        queues[p] = q
    for k in keys:
        c.ch.basic_publish(x, k, k.encode() or b"<empty>")
    sync(c.ch)
    for p, q in queues.items():
        c.obs(f"pattern {p!r}", sorted(b.decode() for b, *_ in get_all(c.ch, q)))


@scenario
def headers_matrix(c: Ctx):
    x = c.name("headers")
    c.ch.exchange_declare(x, "headers", auto_delete=True)
    bindings = {
        "all": {"x-match": "all", "a": "1", "b": 2},
        "any": {"x-match": "any", "a": "1", "b": 2},
        "none": {},
        "only-xmatch-any": {"x-match": "any"},
        "all-with-x": {"x-match": "all-with-x", "x-a": "1"},
        "any-with-x": {"x-match": "any-with-x", "x-a": "1", "c": True},
        "x-ignored": {"x-match": "all", "x-a": "1", "a": "1"},
        "void": {"a": None},
        "bool": {"c": True},
        "int": {"b": 2},
        "long": {"l": 2 ** 40},
        "bytes": {"y": b"\x00\x01"},
    }
    queues = {}
    for label, args in bindings.items():
        q = c.ch.queue_declare(c.name(f"hq.{label}"), exclusive=True).method.queue
        c.ch.queue_bind(q, x, arguments=args)
        queues[label] = q
    messages = [None, {}, {"a": "1"}, {"a": "1", "b": 2}, {"b": 2}, {"b": "2"}, {"a": 1},
                {"x-a": "1"}, {"x-a": "1", "a": "1"}, {"c": True}, {"c": False}, {"c": 1},
                {"a": None}, {"l": 2 ** 40}, {"l": 2}, {"y": b"\x00\x01"}, {"y": "\x00\x01"},
                {"a": "1", "b": 2, "extra": "e"}]
    for i, h in enumerate(messages):
        c.ch.basic_publish(x, "", b"%d" % i, pika.BasicProperties(headers=h))
    sync(c.ch)
    for label, q in queues.items():
        c.obs(f"binding {label}", [int(b) for b, *_ in get_all(c.ch, q)])


@scenario
def e2e_and_alternate(c: Ctx):
    a, b, d, ae = (c.name(n) for n in ("ea", "eb", "ed", "ae"))
    c.ch.exchange_declare(ae, "fanout", auto_delete=True)
    c.ch.exchange_declare(a, "topic", auto_delete=True, arguments={"alternate-exchange": ae})
    c.ch.exchange_declare(b, "direct", auto_delete=True)
    c.ch.exchange_declare(d, "fanout", auto_delete=True)
    c.ch.exchange_bind(b, a, routing_key="k.*")
    c.ch.exchange_bind(d, a, routing_key="#")
    c.ch.exchange_bind(a, d)  # loop a -> d -> a
    qs = {}
    for label, (x, key) in {"b-k.1": (b, "k.1"), "b-k.2": (b, "k.2"), "d": (d, ""),
                            "ae": (ae, ""), "a-k.1": (a, "k.1")}.items():
        q = c.ch.queue_declare(c.name(f"eq.{label}"), exclusive=True).method.queue
        c.ch.queue_bind(q, x, routing_key=key)
        qs[label] = q
    returned = []
    c.ch.add_on_return_callback(lambda _c, m, _p, body: returned.append(
        [m.reply_code, m.reply_text, m.routing_key, body]))
    for key in ["k.1", "k.2", "k.3", "z"]:
        c.ch.basic_publish(a, key, key.encode(), mandatory=True)
    c.ch.basic_publish(b, "nowhere", b"b-nowhere", mandatory=True)
    sync(c.ch)
    pump(c.conn, returned, 1, 1.0)
    c.obs("returned", returned)
    for label, q in qs.items():
        c.obs(f"queue {label}", sorted(x[0].decode() for x in get_all(c.ch, q)))


# ---- queues ----------------------------------------------------------------------------------

@scenario
def queue_declare_and_delete(c: Ctx):
    q = c.name("q")
    c.attempt("declare", lambda ch: ch.queue_declare(q))
    for kw in [dict(durable=True), dict(auto_delete=True), dict(exclusive=True),
               dict(arguments={"x-message-ttl": 5}), dict(arguments={"x-expires": 100000}),
               dict(arguments={"x-max-length": 3}), dict(arguments={"x-unknown": 1}),
               dict(passive=True, durable=True)]:
        c.attempt(f"redeclare {sorted(kw.items())}", lambda ch, kw=kw: ch.queue_declare(q, **kw))
    t = c.name("ttl")
    c.attempt("declare ttl", lambda ch: ch.queue_declare(t, arguments={"x-message-ttl": 1000}))
    for v in [2000, 1000, "1000", -1]:
        c.attempt(f"redeclare ttl {v!r}",
                  lambda ch, v=v: ch.queue_declare(t, arguments={"x-message-ttl": v}))
    c.attempt("redeclare ttl none", lambda ch: ch.queue_declare(t))
    for arg, val in [("x-max-length", -1), ("x-max-length", "x"), ("x-message-ttl", "x"),
                     ("x-expires", 0), ("x-overflow", "bogus"), ("x-max-priority", 300),
                     ("x-queue-type", "bogus"), ("x-dead-letter-exchange", 5)]:
        c.attempt(f"invalid {arg}={val!r}",
                  lambda ch, a=arg, v=val: ch.queue_declare(c.name("inv"), arguments={a: v}))
    c.attempt("declare amq.q", lambda ch: ch.queue_declare("amq." + c.name("q")))
    c.attempt("passive missing", lambda ch: ch.queue_declare(c.name("missing"), passive=True))
    for i in range(3):
        c.ch.basic_publish("", q, b"%d" % i)
    c.obs("ready", ready(c.ch, q))
    c.attempt("passive counts", lambda ch: ch.queue_declare(q, passive=True))
    c.attempt("purge", lambda ch: ch.queue_purge(q))
    c.attempt("purge missing", lambda ch: ch.queue_purge(c.name("missing")))
    c.ch.basic_publish("", q, b"x")
    c.attempt("delete if-empty", lambda ch: ch.queue_delete(q, if_empty=True))
    c.ch.basic_consume(q, lambda *a: None)
    c.attempt("delete if-unused", lambda ch: ch.queue_delete(q, if_unused=True))
    c.attempt("delete", lambda ch: ch.queue_delete(q))
    c.attempt("delete missing", lambda ch: ch.queue_delete(q))
    c.attempt("delete ttl", lambda ch: ch.queue_delete(t))
    for op, fn in [("bind", lambda ch: ch.queue_bind("", "amq.direct")),
                   ("get", lambda ch: ch.basic_get("")),
                   ("purge", lambda ch: ch.queue_purge("")),
                   ("delete", lambda ch: ch.queue_delete("")),
                   ("consume", lambda ch: ch.basic_consume("", lambda *a: None))]:
        c.attempt(f"{op} '' without declare", fn)


@scenario
def exclusive_queue_from_another_connection(c: Ctx):
    q = c.name("excl")
    c.ch.queue_declare(q, exclusive=True)
    other = Ctx(c.params, c.run_id, c.obs)
    try:
        for op, fn in [("declare", lambda ch: ch.queue_declare(q)),
                       ("declare exclusive", lambda ch: ch.queue_declare(q, exclusive=True)),
                       ("passive", lambda ch: ch.queue_declare(q, passive=True)),
                       ("consume", lambda ch: ch.basic_consume(q, lambda *a: None)),
                       ("get", lambda ch: ch.basic_get(q)),
                       ("purge", lambda ch: ch.queue_purge(q)),
                       ("bind", lambda ch: ch.queue_bind(q, "amq.fanout")),
                       ("unbind", lambda ch: ch.queue_unbind(q, "amq.fanout")),
                       ("delete", lambda ch: ch.queue_delete(q))]:
            other.attempt(f"other {op}", fn)

        def publish(ch):
            ch.basic_publish("", q, b"from other")
            sync(ch)

        other.attempt("other publish", publish)
        c.attempt("owner non-exclusive redeclare", lambda ch: ch.queue_declare(q))
        c.obs("owner sees", [x[0] for x in get_all(c.ch, q)])
    finally:
        other.close()


# ---- consuming and acknowledgements ----------------------------------------------------------

@scenario
def ack_nack_reject_recover(c: Ctx):
    q = c.name("acks")
    c.ch.queue_declare(q, exclusive=True)
    for i in range(8):
        c.ch.basic_publish("", q, b"%d" % i)
    ch = c.conn.channel()
    tags = []
    for _ in range(6):
        m, _p, body = ch.basic_get(q)
        tags.append(m.delivery_tag)
    c.obs("tags", tags)
    ch.basic_ack(tags[0])
    ch.basic_nack(tags[2], multiple=True, requeue=True)  # tag 2 and 3
    ch.basic_reject(tags[3], requeue=False)
    ch.basic_nack(tags[4], requeue=False)
    c.obs("after settle", ready(ch, q))
    ch.basic_recover(requeue=True)  # tag 6 back
    c.obs("queue", get_all(ch, q))
    for key, fn in [("ack unknown", lambda x: x.basic_ack(99)),
                    ("ack twice", lambda x: (x.basic_ack(1), x.basic_ack(1))),
                    ("nack unknown multiple", lambda x: x.basic_nack(99, multiple=True)),
                    ("reject unknown", lambda x: x.basic_reject(99)),
                    ("recover requeue=false", lambda x: x.basic_recover(requeue=False)),
                    ("qos prefetch_size", lambda x: x.basic_qos(prefetch_size=10))]:
        def run(x, fn=fn):
            x.basic_publish("", q, b"p")
            x.basic_get(q)
            fn(x)
            sync(x)
        c.attempt(key, run)


@scenario
def requeue_on_close_keeps_order(c: Ctx):
    q = c.name("rq")
    c.ch.queue_declare(q)
    for i in range(6):
        c.ch.basic_publish("", q, b"%d" % i)
    other = pika.BlockingConnection(c.params)
    och = other.channel()
    och.basic_qos(prefetch_count=4)
    got = []
    och.basic_consume(q, lambda ch, m, p, b: got.append([b, m.redelivered, m.delivery_tag]))
    pump(other, got, 4)
    och.basic_ack(got[1][2])
    c.obs("first consumer", got)
    other.close()
    deadline = time.monotonic() + 5
    while c.ch.queue_declare(q, passive=True).method.message_count < 5 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    c.obs("after close", get_all(c.ch, q))
    c.ch.queue_delete(q)


@scenario
def prefetch_and_priorities(c: Ctx):
    q = c.name("pp")
    c.ch.queue_declare(q, exclusive=True)
    c.ch.basic_qos(prefetch_count=2)
    seen = []

    def sink(label):
        return lambda ch, m, p, b: seen.append([label, b])

    c.ch.basic_consume(q, sink("low"), consumer_tag="low")
    c.ch.basic_consume(q, sink("high"), consumer_tag="high", arguments={"x-priority": 5})
    for i in range(6):
        c.ch.basic_publish("", q, b"%d" % i)
    pump(c.conn, seen, 4)
    time.sleep(0.3)
    c.conn.process_data_events(time_limit=0.1)
    c.obs("deliveries", sorted(seen))
    c.obs("ready", ready(c.ch, q))
    c.attempt("exclusive on busy", lambda ch: ch.basic_consume(q, lambda *a: None,
                                                               exclusive=True))
    c.attempt("bad priority", lambda ch: ch.basic_consume(q, lambda *a: None,
                                                          arguments={"x-priority": "x"}))


@scenario
def get_counts_and_redelivery(c: Ctx):
    q = c.name("get")
    c.ch.queue_declare(q, exclusive=True)
    c.obs("empty", c.ch.basic_get(q)[0] is None)
    for i in range(4):
        c.ch.basic_publish("", q, b"%d" % i)
    ch = c.conn.channel()
    m, _p, _b = ch.basic_get(q)
    c.obs("first", [m.delivery_tag, m.redelivered, m.message_count])
    ch.close()
    c.obs("after channel close", get_all(c.ch, q))


# ---- confirms and transactions ---------------------------------------------------------------

@scenario
def confirms(c: Ctx):
    q = c.name("cq")
    full = c.name("full")
    c.ch.queue_declare(q, exclusive=True)
    c.ch.queue_declare(full, exclusive=True,
                       arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    impl = c.ch._impl
    frames, ok = [], []
    impl.confirm_delivery(ack_nack_callback=lambda f: frames.append(
        [f.method.NAME, f.method.delivery_tag, f.method.multiple]), callback=ok.append)
    pump(c.conn, ok, 1)
    plan = [("", q), ("", full), ("", full), ("amq.direct", c.name("nobody")), ("", q)]
    for ex, key in plan:
        impl.basic_publish(ex, key, b"m")
    settled = {}
    deadline = time.monotonic() + 5
    while len(settled) < len(plan) and time.monotonic() < deadline:
        c.conn.process_data_events(time_limit=0.05)
        settled = {}
        for name, tag, multiple in frames:
            for t in (range(1, tag + 1) if multiple else [tag]):
                settled.setdefault(t, name)
    c.obs("settled", sorted(settled.items()))
    c.attempt("tx after confirm", lambda ch: (ch.confirm_delivery(), ch.tx_select()))
    c.attempt("confirm after tx", lambda ch: (ch.tx_select(), ch.confirm_delivery()))
    c.attempt("commit without select", lambda ch: ch.tx_commit())
    c.attempt("rollback without select", lambda ch: ch.tx_rollback())


@scenario
def transactions(c: Ctx):
    q = c.name("tx")
    c.ch.queue_declare(q)
    tx = c.conn.channel()
    tx.tx_select()
    tx.basic_publish("", q, b"rolled back")
    tx.tx_rollback()
    tx.basic_publish("", q, b"a")
    tx.basic_publish("", q, b"b")
    c.obs("before commit", ready(c.ch, q))
    tx.tx_commit()
    deadline = time.monotonic() + 5
    while c.ch.queue_declare(q, passive=True).method.message_count < 2 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    m1 = tx.basic_get(q)[0]
    m2 = tx.basic_get(q)[0]
    tx.basic_ack(m1.delivery_tag)
    tx.basic_reject(m2.delivery_tag, requeue=True)
    c.obs("uncommitted settle", ready(c.ch, q))
    tx.tx_commit()
    deadline = time.monotonic() + 5
    while c.ch.queue_declare(q, passive=True).method.message_count < 1 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    c.obs("after commit", get_all(c.ch, q))
    c.ch.queue_delete(q)


# ---- publishing ------------------------------------------------------------------------------

@scenario
def properties_and_cc(c: Ctx):
    q1, q2, q3 = (c.ch.queue_declare(c.name(f"cc{i}"), exclusive=True).method.queue
                  for i in range(3))
    for q in (q1, q2, q3):
        c.ch.queue_bind(q, "amq.direct", routing_key=q)
    props = pika.BasicProperties(
        content_type="a/b", content_encoding="enc", delivery_mode=1, priority=4,
        correlation_id="c", reply_to="r", expiration="100000", message_id="m",
        timestamp=12345, type="t", user_id="guest", app_id="app", cluster_id="cl",
        headers={"CC": [q2], "BCC": [q3], "n": 1, "s": "x", "nested": {"a": [1, "b"]}})
    c.ch.basic_publish("amq.direct", q1, b"body", props)
    sync(c.ch)
    for q in (q1, q2, q3):
        m, p, body = c.ch.basic_get(q, auto_ack=True)
        c.obs(f"get {q}", [m.routing_key, body,
                           {k: v for k, v in vars(p).items() if not k.startswith("_")}])
    for key, headers in [("CC string", {"CC": q2}), ("BCC int", {"BCC": 5}),
                         ("CC ints", {"CC": [1, 2]}), ("CC empty", {"CC": []})]:
        def pub(ch, headers=headers):
            ch.basic_publish("amq.direct", q1, b"x", pika.BasicProperties(headers=headers))
            sync(ch)
            return [len(get_all(ch, q)) for q in (q1, q2, q3)]
        c.attempt(key, pub)

    def bad_user(ch):
        ch.basic_publish("", q1, b"x", pika.BasicProperties(user_id="other"))
        sync(ch)

    c.attempt("user_id mismatch", bad_user)
    for exp in ["-1", "abc", "1.5", ""]:
        def bad_exp(ch, exp=exp):
            ch.basic_publish("", q1, b"x", pika.BasicProperties(expiration=exp))
            sync(ch)
        c.attempt(f"expiration {exp!r}", bad_exp)


@scenario
def server_cancel(c: Ctx):
    q = c.name("sc")
    c.ch.queue_declare(q)
    cancelled = []
    c.ch.add_on_cancel_callback(lambda f: cancelled.append(f.method.consumer_tag))
    c.ch.basic_consume(q, lambda *a: None, consumer_tag="ct")
    c.conn.channel().queue_delete(q)
    pump(c.conn, cancelled, 1)
    c.obs("cancelled", cancelled)
    c.obs("channel open", c.ch.is_open)


@scenario
def odds_and_ends(c: Ctx):
    q = c.name("odds")
    c.ch.queue_declare(q)
    # passive declare of "" right after a declare on the same channel
    c.attempt("passive '' on a fresh channel", lambda ch: ch.queue_declare("", passive=True))

    def passive_last(ch):
        ch.queue_declare(q, passive=True)
        return ch.queue_declare("", passive=True)

    c.attempt("passive '' after a declare", passive_last)

    def empty_key(ch):
        ch.queue_declare(q, passive=True)
        ch.basic_publish("", "", b"to-empty-key")
        sync(ch)
        return ready(ch, q)

    c.attempt("default exchange, routing key ''", empty_key)
    for i in range(5):
        c.ch.basic_publish("", q, b"%d" % i)
    ch = c.conn.channel()
    for _ in range(2):
        ch.basic_get(q)
    c.obs("ready with 2 unacked", ready(c.ch, q))
    c.attempt("purge with 2 unacked", lambda x: x.queue_purge(q))
    for i in range(3):
        c.ch.basic_publish("", q, b"%d" % i)
    c.obs("ready", ready(c.ch, q))
    c.attempt("delete with 2 unacked", lambda x: x.queue_delete(q))
    c.obs("unacked channel still open", ch.is_open)
    c.attempt("ack after delete", lambda x: (ch.basic_ack(1), sync(ch)))
    x = c.name("hx")
    c.ch.exchange_declare(x, "headers", auto_delete=True)
    r = c.ch.queue_declare("", exclusive=True).method.queue
    for v in ["bogus", "ALL", 1, ""]:
        c.attempt(f"x-match {v!r}",
                  lambda ch, v=v: ch.queue_bind(r, x, arguments={"x-match": v, "a": "b"}))
    q2 = c.name("multi0")
    c.ch.queue_declare(q2, exclusive=True)
    for i in range(4):
        c.ch.basic_publish("", q2, b"%d" % i)
    ch2 = c.conn.channel()
    for _ in range(3):
        ch2.basic_get(q2)
    ch2.basic_nack(0, multiple=True, requeue=True)
    c.obs("nack(0, multiple) requeues all", [b[:2] for b in get_all(ch2, q2)])
    c.attempt("consume exclusive queue twice exclusive", lambda ch: (
        ch.basic_consume(q2, lambda *a: None, exclusive=True),
        ch.basic_consume(q2, lambda *a: None, exclusive=True)))
