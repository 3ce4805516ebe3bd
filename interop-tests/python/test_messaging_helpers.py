"""Shared fixtures and helpers for the messaging suites (test_messaging_*.py, test_kombu.py,
test_aio_pika.py). It holds no tests itself.

The `amqp` fixture is parametrised over two brokers, so every test runs differentially:

- `[warren]`: a Warren spawned for this test on a free port with its own data dir (or the
  broker named by AMQP_ADDR, exactly like conftest's `broker` fixture, so `scripts/test`'s
  differential stage can still point the whole suite at RabbitMQ);
- `[rabbitmq]`: the RabbitMQ named by RABBITMQ_ADDR (host:port or amqp:// URL), for instance
  one from `scripts/rabbitmq.sh`; this variant exists only when RABBITMQ_ADDR is set.

`scripts/differential.sh` starts a RabbitMQ, sets RABBITMQ_ADDR and runs the suites once, so
each expectation is checked against RabbitMQ 3.10 and Warren side by side.

Every name a test creates is unique (uuid suffix), so tests may share one external broker and
run in parallel under pytest-xdist.
"""

from __future__ import annotations

import os
import time
import urllib.parse
import uuid
from typing import Callable, Optional

import pika
import pika.exceptions
import pytest

import conftest

RABBITMQ_ADDR = "RABBITMQ_ADDR"
# [rabbitmq] exists only when RABBITMQ_ADDR is set, so plain runs do not list hundreds of skips.
BROKERS = ["warren"] + (["rabbitmq"] if os.environ.get(RABBITMQ_ADDR, "").strip() else [])


def _parse_addr(spec: str) -> conftest.BrokerInfo:
    spec = spec.strip()
    if spec.startswith("amqp://"):
        u = urllib.parse.urlsplit(spec)
        return conftest.BrokerInfo(host=u.hostname or "127.0.0.1", port=u.port or 5672,
                                   external=True)
    host, _, port = spec.rpartition(":")
    return conftest.BrokerInfo(host=host.strip("[]") or "127.0.0.1", port=int(port),
                               external=True)


def _target(info: conftest.BrokerInfo, kind: str):
    info.kind = kind  # type: ignore[attr-defined]
    return info


@pytest.fixture(params=BROKERS)
def amqp(request, tmp_path):
    """The broker under test; see the module docstring."""
    kind = request.param
    if kind == "rabbitmq":
        spec = os.environ.get(RABBITMQ_ADDR, "").strip()
        if not spec:
            pytest.skip("RABBITMQ_ADDR is not set (scripts/differential.sh sets it)")
        yield _target(_parse_addr(spec), "rabbitmq")
        return
    ext = conftest.external_broker()
    if ext is not None:
        yield _target(ext, "external")
        return
    info = conftest.start_warren(tmp_path, [])
    try:
        yield _target(info, "warren")
    finally:
        conftest.stop_warren(info)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"---- warren log (port {info.port}) ----\n{info.logs()}---- end ----")


def uniq(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def connect(amqp, **kw) -> pika.BlockingConnection:
    kw.setdefault("heartbeat", 0)
    return pika.BlockingConnection(amqp.pika_params(**kw))


class Session:
    """One pika BlockingConnection with a first channel; closes everything it opened."""

    def __init__(self, amqp, **kw):
        self.conn = connect(amqp, **kw)
        self.ch = self.conn.channel()

    def channel(self):
        return self.conn.channel()

    def close(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001 - best effort in teardown
            pass


@pytest.fixture
def session_factory(amqp):
    sessions: list[Session] = []

    def make(**kw) -> Session:
        s = Session(amqp, **kw)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


@pytest.fixture
def s(session_factory) -> Session:
    """A connection and channel to the broker under test."""
    return session_factory()


def expect_channel_error(fn: Callable[[], object], code: int, text_prefix: str):
    """fn() must make the broker close the channel with `code` and a reply-text starting with
    `text_prefix`. Returns the exception."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        fn()
    e = info.value
    assert (e.reply_code, e.reply_text[: len(text_prefix)]) == (code, text_prefix), \
        f"expected channel.close {code} {text_prefix!r}..., got {e.reply_code} {e.reply_text!r}"
    return e


def expect_connection_error(fn: Callable[[], object], code: int, text_prefix: str):
    """fn() must make the broker close the connection with `code` and the text prefix."""
    with pytest.raises((pika.exceptions.ConnectionClosedByBroker,
                        pika.exceptions.ChannelClosedByBroker)) as info:
        fn()
    e = info.value
    assert isinstance(e, pika.exceptions.ConnectionClosedByBroker), \
        f"expected connection.close {code}, got a channel close {e!r}"
    assert (e.reply_code, e.reply_text[: len(text_prefix)]) == (code, text_prefix), \
        f"expected connection.close {code} {text_prefix!r}..., got {e.reply_code} " \
        f"{e.reply_text!r}"
    return e


def declare_queue(ch, name: Optional[str] = None, **kw) -> str:
    """Declare a queue (auto-deleted unless told otherwise) and return its name."""
    name = uniq("q") if name is None else name
    kw.setdefault("auto_delete", False)
    ok = ch.queue_declare(name, **kw)
    return ok.method.queue


def collect(conn: pika.BlockingConnection, sink: list, n: int, timeout: float = 5.0) -> list:
    """Pump conn until `sink` (filled by consumer callbacks) holds n items or timeout."""
    deadline = time.monotonic() + timeout
    while len(sink) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return sink


def settle(conn: pika.BlockingConnection, seconds: float = 0.3) -> None:
    """Let in-flight frames arrive (used before asserting that nothing more came)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)


def get_all(ch, queue: str, limit: int = 10_000) -> list[bytes]:
    """basic.get (auto-ack) until get-empty; return the bodies."""
    out = []
    for _ in range(limit):
        m, _p, body = ch.basic_get(queue, auto_ack=True)
        if m is None:
            break
        out.append(body)
    return out


def message_count(amqp, queue: str) -> int:
    """Ready messages of `queue`, from a passive declare on a fresh connection."""
    c = connect(amqp)
    try:
        return c.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        c.close()


def queue_exists(amqp, queue: str) -> bool:
    """Whether `queue` exists, seen from a fresh connection (an exclusive queue of another
    connection answers 405: it exists)."""
    c = connect(amqp)
    try:
        try:
            c.channel().queue_declare(queue, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code in (404, 405), e
            return e.reply_code == 405
    finally:
        if c.is_open:
            c.close()


def exchange_exists(amqp, exchange: str) -> bool:
    c = connect(amqp)
    try:
        try:
            c.channel().exchange_declare(exchange, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404, e
            return False
    finally:
        if c.is_open:
            c.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    assert pred(), f"timed out after {timeout}s waiting for {what}"


def resource(kind: str, name: str) -> str:
    """RabbitMQ's resource phrase: `queue 'q' in vhost '/'`."""
    return f"{kind} '{name}' in vhost '/'"
