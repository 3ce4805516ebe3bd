"""Connection and channel lifecycle with pika (blocking), aio-pika and kombu."""

import asyncio

import pika
import pika.exceptions
import pytest


def test_pika_connect_100_channels_close_cleanly(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    assert conn.is_open
    props = conn._impl.server_properties
    assert props.get("capabilities", {}).get("authentication_failure_close") is True
    channels = [conn.channel() for _ in range(100)]
    assert len({ch.channel_number for ch in channels}) == 100
    assert all(ch.is_open for ch in channels)
    for ch in channels:
        ch.close()
    assert all(ch.is_closed for ch in channels)
    assert conn.is_open, "closing channels must not close the connection"
    conn.close()
    assert conn.is_closed


def test_pika_wrong_password_is_an_authentication_error(broker):
    # pika advertises authentication_failure_close, so the broker answers connection.close 403
    # and pika raises ProbableAuthenticationError (AuthenticationError on some paths).
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AuthenticationError)) as info:
        pika.BlockingConnection(broker.pika_params(password="wrong-password"))
    assert "ACCESS_REFUSED" in str(info.value)


def test_pika_unknown_vhost_is_530(broker):
    # connection.close 530 during connection.open: pika wraps the broker's close in
    # ProbableAccessDeniedError("ConnectionClosedByBroker: (530) 'NOT_ALLOWED - vhost ...'").
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as info:
        pika.BlockingConnection(broker.pika_params(vhost="no-such-vhost"))
    text = str(info.value)
    assert "(530)" in text, text
    assert "NOT_ALLOWED" in text, text
    assert "no-such-vhost" in text, text


def test_pika_channel_reuse_after_close(broker):
    conn = pika.BlockingConnection(broker.pika_params())
    for _ in range(3):
        ch = conn.channel(channel_number=1)
        assert ch.is_open
        ch.close()
    conn.close()


def test_aio_pika_connect_channels_close(broker):
    import aio_pika

    async def main():
        conn = await aio_pika.connect(broker.url(), timeout=10)
        assert not conn.is_closed
        channels = [await conn.channel() for _ in range(20)]
        for ch in channels:
            assert not ch.is_closed
            await ch.close()
            assert ch.is_closed
        await conn.close()
        assert conn.is_closed

    asyncio.run(main())


def test_kombu_connect_channel_close(broker):
    import kombu

    with kombu.Connection(broker.url(), connect_timeout=5) as conn:
        conn.connect()
        assert conn.connected
        ch = conn.channel()
        ch.close()
        assert conn.connected
    assert not conn.connected
