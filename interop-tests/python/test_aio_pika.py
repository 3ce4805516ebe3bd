"""aio-pika basics against Warren and (with RABBITMQ_ADDR) RabbitMQ: publish with confirms,
consume/ack, get, nack/requeue, qos, mandatory returns, immediate (540), exclusive (405),
transactions, exchange-to-exchange bindings."""

import asyncio

import aio_pika
import aiormq.exceptions
import pytest

from test_messaging_helpers import amqp, uniq  # noqa: F401 - fixtures


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=50))


async def connect(amqp, robust=False):
    fn = aio_pika.connect_robust if robust else aio_pika.connect
    return await fn(amqp.url(), timeout=10)


def test_publish_consume_ack_with_confirms(amqp):
    async def main():
        async with await connect(amqp, robust=True) as conn:
            ch = await conn.channel()  # publisher confirms on by default
            q = await ch.declare_queue(uniq("aq"), exclusive=True)
            for i in range(1000):
                confirm = await ch.default_exchange.publish(
                    aio_pika.Message(b"%d" % i, headers={"i": i}, content_type="text/plain"),
                    routing_key=q.name)
                assert confirm is not None
            got = []
            async with q.iterator() as it:
                async for message in it:
                    async with message.process():
                        got.append((message.body, message.headers["i"], message.content_type))
                    if len(got) == 1000:
                        break
            assert got == [(b"%d" % i, i, "text/plain") for i in range(1000)]
            assert (await q.declare()).message_count == 0
    run(main())


def test_get_empty_nack_requeue(amqp):
    async def main():
        async with await connect(amqp) as conn:
            ch = await conn.channel()
            q = await ch.declare_queue(uniq("aq"), exclusive=True)
            assert await q.get(fail=False) is None
            with pytest.raises(aio_pika.exceptions.QueueEmpty):
                await q.get()
            await ch.default_exchange.publish(aio_pika.Message(b"one"), routing_key=q.name)
            await ch.default_exchange.publish(aio_pika.Message(b"two"), routing_key=q.name)
            m = await q.get()
            assert (m.body, m.redelivered) == (b"one", False)
            await m.nack(requeue=True)
            m = await q.get()
            assert (m.body, m.redelivered) == (b"one", True)
            await m.reject(requeue=False)
            m = await q.get(no_ack=True)
            assert m.body == b"two"
            assert await q.get(fail=False) is None
    run(main())


def test_prefetch_limits_unacked(amqp):
    async def main():
        async with await connect(amqp) as conn:
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=3)
            q = await ch.declare_queue(uniq("aq"), exclusive=True)
            for i in range(10):
                await ch.default_exchange.publish(aio_pika.Message(b"%d" % i), q.name)
            held = []

            async def hold(m):
                held.append(m)

            await q.consume(hold)

            async def until(n):
                for _ in range(100):
                    if len(held) >= n:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # and nothing more arrives
                return len(held)

            assert await until(3) == 3
            assert [m.body for m in held] == [b"0", b"1", b"2"]
            await held[0].ack()
            assert await until(4) == 4
            for m in held[1:]:
                await m.ack()
            assert await until(7) == 7
    run(main())


def test_mandatory_unroutable_raises_delivery_error(amqp):
    async def main():
        async with await connect(amqp) as conn:
            ch = await conn.channel(on_return_raises=True)
            with pytest.raises(aio_pika.exceptions.DeliveryError) as info:
                await ch.default_exchange.publish(aio_pika.Message(b"x"),
                                                  routing_key=uniq("nobody"), mandatory=True)
            ret = info.value.message.delivery  # the Basic.Return frame
            assert (ret.reply_code, ret.reply_text) == (312, "NO_ROUTE")
            # not mandatory: acked and dropped
            ok = await ch.default_exchange.publish(aio_pika.Message(b"x"),
                                                   routing_key=uniq("nobody"), mandatory=False)
            assert ok is not None
    run(main())


def test_immediate_is_540(amqp):
    async def main():
        conn = await connect(amqp)
        ch = await conn.channel(publisher_confirms=False)
        q = await ch.declare_queue(uniq("aq"), exclusive=True)
        await ch.default_exchange.publish(aio_pika.Message(b"x"), routing_key=q.name,
                                          immediate=True)
        with pytest.raises(aiormq.exceptions.ConnectionNotImplemented) as info:
            await ch.declare_queue(uniq("aq"), exclusive=True)
        assert info.value.args[0].startswith("NOT_IMPLEMENTED - immediate=true"), info.value
        await conn.close()
    run(main())


def test_exclusive_queue_locked_405(amqp):
    async def main():
        async with await connect(amqp) as owner, await connect(amqp) as other:
            ch = await owner.channel()
            q = await ch.declare_queue(uniq("aq"), exclusive=True)
            och = await other.channel()
            with pytest.raises(aiormq.exceptions.ChannelLockedResource) as info:
                await och.declare_queue(q.name, passive=True)
            assert "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue" in \
                str(info.value)
    run(main())


def test_missing_queue_404(amqp):
    async def main():
        async with await connect(amqp) as conn:
            ch = await conn.channel()
            name = uniq("missing")
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as info:
                await ch.declare_queue(name, passive=True)
            assert f"NOT_FOUND - no queue '{name}' in vhost '/'" in str(info.value)
    run(main())


def test_transactions(amqp):
    async def main():
        async with await connect(amqp) as conn, await connect(amqp) as observer:
            ch = await conn.channel(publisher_confirms=False)
            obs = await observer.channel()
            q = await ch.declare_queue(uniq("aq"), auto_delete=False)
            tx = ch.transaction()
            await tx.select()
            await ch.default_exchange.publish(aio_pika.Message(b"a"), q.name)
            assert (await obs.declare_queue(q.name, passive=True)).declaration_result \
                .message_count == 0
            await tx.rollback()
            await ch.default_exchange.publish(aio_pika.Message(b"b"), q.name)
            await tx.commit()
            for _ in range(50):
                res = (await obs.declare_queue(q.name, passive=True)).declaration_result
                if res.message_count == 1:
                    break
                await asyncio.sleep(0.05)
            m = await (await obs.declare_queue(q.name, passive=True)).get(no_ack=True)
            assert m.body == b"b"
            await q.delete()
    run(main())


def test_exchange_to_exchange_and_headers(amqp):
    async def main():
        async with await connect(amqp) as conn:
            ch = await conn.channel()
            front = await ch.declare_exchange(uniq("front"), aio_pika.ExchangeType.TOPIC,
                                              auto_delete=True)
            hx = await ch.declare_exchange(uniq("hdr"), aio_pika.ExchangeType.HEADERS,
                                           auto_delete=True)
            await hx.bind(front, routing_key="orders.#")
            q = await ch.declare_queue(uniq("aq"), exclusive=True)
            await q.bind(hx, arguments={"x-match": "any", "kind": "big", "vip": "yes"})
            await front.publish(aio_pika.Message(b"1", headers={"kind": "big"}), "orders.eu")
            await front.publish(aio_pika.Message(b"2", headers={"kind": "small"}), "orders.eu")
            await front.publish(aio_pika.Message(b"3", headers={"vip": "yes"}), "other")
            await front.publish(aio_pika.Message(b"4", headers={"vip": "yes"}), "orders")
            bodies = []
            while (m := await q.get(no_ack=True, fail=False)) is not None:
                bodies.append(m.body)
            assert bodies == [b"1", b"4"]
    run(main())


def test_server_cancel_on_queue_delete(amqp):
    async def main():
        async with await connect(amqp) as conn, await connect(amqp) as admin:
            ch = await conn.channel()
            q = await ch.declare_queue(uniq("aq"), auto_delete=False)
            async def ignore(_m):
                pass

            tag = await q.consume(ignore)
            underlay = await ch.get_underlay_channel()  # the aiormq channel
            assert tag in underlay.consumers
            await (await admin.channel()).queue_delete(q.name)
            for _ in range(100):  # aiormq drops a consumer when the server cancels it
                if tag not in underlay.consumers:
                    break
                await asyncio.sleep(0.05)
            assert tag not in underlay.consumers, "no basic.cancel from the server"
            assert not ch.is_closed
            q2 = await ch.declare_queue(uniq("aq"), exclusive=True)
            await ch.default_exchange.publish(aio_pika.Message(b"x"), q2.name)
            assert (await q2.get(no_ack=True)).body == b"x"
    run(main())
