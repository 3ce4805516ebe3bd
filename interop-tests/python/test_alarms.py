"""Resource alarms with pika: the memory high watermark and the disk free limit block
publishing connections (connection.blocked to clients that ask for it, TCP backpressure for
everyone) and never consumers; clearing the alarm unblocks them."""
import threading
import time

import pika
import pytest

from conftest import start_warren, stop_warren


def _blocked_events(conn):
    events = []
    conn.add_on_connection_blocked_callback(
        lambda _c, m: events.append(("blocked", m.method.reason)))
    conn.add_on_connection_unblocked_callback(lambda _c, _m: events.append(("unblocked", None)))
    return events


def test_memory_alarm_holds_publishers_until_consumers_drain(tmp_path):
    # 2 MB of messages in memory at most: 1 KiB bodies reach it after ~1,800 messages.
    # Paging to disk is turned off (ratio above 1), or it would keep memory below the alarm.
    info = start_warren(tmp_path, ["--memory-high-watermark", "2000000",
                                   "--memory-paging-ratio", "2"])
    try:
        pub = pika.BlockingConnection(info.pika_params())
        events = _blocked_events(pub)
        ch = pub.channel()
        ch.queue_declare("mq")
        # Well beyond what loopback socket buffers absorb (several MB) once reading stops.
        total = 30000
        published = []

        def publish():
            for i in range(total):
                ch.basic_publish("", "mq", b"x" * 1024)
                published.append(i)

        t = threading.Thread(target=publish)
        t.start()
        time.sleep(4)
        # The publisher is stuck well short of its goal: the broker stopped reading it.
        assert len(published) < total, "publisher was never held back"
        # A consumer on another connection is not blocked and drains the queue.
        con = pika.BlockingConnection(info.pika_params())
        cch = con.channel()
        received = 0
        for method, _props, _body in cch.consume("mq", auto_ack=True, inactivity_timeout=5):
            if method is None:
                break
            received += 1
            if received == total:
                break
        t.join(timeout=30)
        assert not t.is_alive()
        assert received == total
        pub.process_data_events(0.5)
        assert ("blocked", "low on memory") in events
        assert events[-1] == ("unblocked", None)
        con.close()
        pub.close()
    finally:
        stop_warren(info)


def test_paging_keeps_publishers_running_with_memory_bounded(tmp_path):
    # Same limit, paging on (the default ratio 0.5): messages go to disk past 1 MB and the
    # publisher is never blocked, yet every message comes back in order.
    info = start_warren(tmp_path, ["--memory-high-watermark", "2000000"])
    try:
        conn = pika.BlockingConnection(info.pika_params())
        events = _blocked_events(conn)
        ch = conn.channel()
        ch.queue_declare("pq")
        total = 6000
        for i in range(total):
            ch.basic_publish("", "pq", b"%06d" % i + b"x" * 1018)
        conn.process_data_events(0.5)
        assert events == []
        assert ch.queue_declare("pq", passive=True).method.message_count == total
        spill = list((tmp_path / "data-0" / "spill").rglob("msgs.*"))
        assert spill and sum(f.stat().st_size for f in spill) > 2_000_000
        got = []
        for method, _props, body in ch.consume("pq", auto_ack=True, inactivity_timeout=5):
            if method is None:
                break
            got.append(int(body[:6]))
            if len(got) == total:
                break
        assert got == list(range(total))
        conn.close()
    finally:
        stop_warren(info)


def test_disk_alarm_blocks_publishers_but_not_consumers(tmp_path):
    # A limit no disk satisfies: the alarm is raised within a second of boot.
    info = start_warren(tmp_path, ["--disk-free-limit", str(10**18)])
    try:
        time.sleep(1.5)
        conn = pika.BlockingConnection(info.pika_params())
        events = _blocked_events(conn)
        ch = conn.channel()
        ch.queue_declare("dq")
        ch.basic_publish("", "dq", b"first")
        conn.process_data_events(1.0)
        assert events == [("blocked", "low on disk")]
        # Another connection that only consumes works normally.
        other = pika.BlockingConnection(info.pika_params())
        method, _props, body = other.channel().basic_get("dq", auto_ack=True)
        assert body == b"first"
        other.close()
    finally:
        stop_warren(info)


@pytest.mark.parametrize("flag,value", [("--disk-free-limit", "lots"),
                                        ("--memory-high-watermark", "1.5x")])
def test_bad_alarm_settings_name_the_key(tmp_path, flag, value):
    with pytest.raises(pytest.fail.Exception) as err:
        start_warren(tmp_path, [flag, value])
    message = str(err.value)
    assert f"key '{flag.lstrip('-').replace('-', '_')}'" in message, message
    assert flag in message, message
