#!/usr/bin/env python3
"""Example consumer: receives and acknowledges messages from a durable queue.

Connects by the compose service name (AMQP_HOST=warren), exactly as it would to RabbitMQ.
Runs until stopped (SIGTERM, as `docker stop` sends, closes the connection cleanly), or with
--count N until N messages were received (exit 1 if --timeout passes first).

    consumer.py [--count N] [--timeout SECONDS] [--queue NAME]

Environment: AMQP_URL (e.g. amqp://guest:guest@warren:5672/%2f) or AMQP_HOST (warren),
AMQP_PORT (5672), AMQP_USER (guest), AMQP_PASSWORD (guest), AMQP_VHOST (/); AMQP_QUEUE
(example.tasks).
"""
import argparse
import os
import signal
import sys
import time

import pika


def connection_parameters():
    url = os.environ.get("AMQP_URL")
    if url:
        return pika.URLParameters(url)
    return pika.ConnectionParameters(
        host=os.environ.get("AMQP_HOST", "warren"),
        port=int(os.environ.get("AMQP_PORT", "5672")),
        virtual_host=os.environ.get("AMQP_VHOST", "/"),
        credentials=pika.PlainCredentials(
            os.environ.get("AMQP_USER", "guest"), os.environ.get("AMQP_PASSWORD", "guest")
        ),
    )


def connect(params, wait=30.0):
    """Connects, retrying while the broker is still starting."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.AMQPConnectionError as e:
            if time.monotonic() > deadline:
                raise
            print(f"consumer: broker not reachable yet ({e!r}); retrying", flush=True)
            time.sleep(1)


class Stop(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=0, help="exit after N messages (0: run forever)")
    ap.add_argument("--timeout", type=float, default=0.0, help="give up after SECONDS (0: never)")
    ap.add_argument("--queue", default=os.environ.get("AMQP_QUEUE", "example.tasks"))
    args = ap.parse_args()

    # As process 1 of a container, Python would ignore SIGTERM: handle it.
    def on_signal(signum, _frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    connection = connect(connection_parameters())
    channel = connection.channel()
    channel.queue_declare(queue=args.queue, durable=True)
    channel.basic_qos(prefetch_count=10)
    received = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while not args.count or received < args.count:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait is not None and wait == 0.0:
                print(f"consumer: timed out with {received}/{args.count} messages", flush=True)
                return 1
            # consume() yields (None, None, None) after `inactivity_timeout` without a message.
            for method, properties, body in channel.consume(
                args.queue, inactivity_timeout=1.0 if wait is None else min(1.0, wait)
            ):
                if method is None:
                    break
                received += 1
                persistent = properties.delivery_mode == pika.DeliveryMode.Persistent.value
                print(
                    f"consumer: received #{received} from '{args.queue}': {body.decode()}"
                    f"{' (persistent)' if persistent else ''}",
                    flush=True,
                )
                channel.basic_ack(method.delivery_tag)
                if args.count and received >= args.count:
                    break
        channel.cancel()
        print(f"consumer: done, {received} messages", flush=True)
        return 0
    except Stop as why:
        print(f"consumer: {why}, closing after {received} messages", flush=True)
        return 0
    finally:
        try:
            if connection.is_open:
                connection.close()
        except pika.exceptions.AMQPError:
            pass


if __name__ == "__main__":
    sys.exit(main())
