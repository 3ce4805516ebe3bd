"""Configurable limits seen by a real client: the connection limit (530 at connection.open,
the other connections unaffected) and a configured channel_max offered in connection.tune."""
import pika
import pytest

from conftest import start_warren, stop_warren


def test_connection_limit_refuses_the_extra_connection(tmp_path):
    info = start_warren(tmp_path, ["--max-connections", "2"])
    try:
        first = pika.BlockingConnection(info.pika_params())
        second = pika.BlockingConnection(info.pika_params())
        with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
            pika.BlockingConnection(info.pika_params(connection_attempts=1))
        assert "NOT_ALLOWED - connection refused: node connection limit (2) is reached" in repr(err.value), repr(err.value)
        # The open ones keep working, and closing one frees a slot.
        first.channel().queue_declare("", exclusive=True)
        first.close()
        third = pika.BlockingConnection(info.pika_params())
        third.channel().queue_declare("", exclusive=True)
        third.close()
        second.close()
    finally:
        stop_warren(info)


def test_configured_channel_max_is_negotiated(tmp_path):
    info = start_warren(tmp_path, ["--channel-max", "8"])
    try:
        conn = pika.BlockingConnection(info.pika_params())
        assert conn._impl.params.channel_max == 8
        channels = [conn.channel() for _ in range(8)]
        assert len(channels) == 8
        with pytest.raises(pika.exceptions.NoFreeChannels):
            conn.channel()
        conn.close()
    finally:
        stop_warren(info)
