#!/usr/bin/env python3
"""Example producer: publishes persistent messages to a durable queue, with publisher confirms.

Connects by the compose service name (AMQP_HOST=warren), exactly as it would to RabbitMQ.

    producer.py [--count N] [--interval SECONDS] [--queue NAME]

Environment: AMQP_URL (e.g. amqp://guest:guest@warren:5672/%2f) or AMQP_HOST (warren),
AMQP_PORT (5672), AMQP_USER (guest), AMQP_PASSWORD (guest), AMQP_VHOST (/); AMQP_QUEUE
(example.tasks); COUNT (10).
"""
import argparse
import json
import os
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
            print(f"producer: broker not reachable yet ({e!r}); retrying", flush=True)
            time.sleep(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=int(os.environ.get("COUNT", "10")))
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--queue", default=os.environ.get("AMQP_QUEUE", "example.tasks"))
    args = ap.parse_args()

    params = connection_parameters()
    connection = connect(params)
    channel = connection.channel()
    channel.queue_declare(queue=args.queue, durable=True)
    channel.confirm_delivery()  # basic_publish now waits for the broker's ack
    for seq in range(1, args.count + 1):
        body = json.dumps({"seq": seq, "of": args.count, "sent_at": time.time()})
        channel.basic_publish(
            exchange="",
            routing_key=args.queue,
            body=body.encode(),
            properties=pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
            ),
            mandatory=True,  # an unroutable message raises instead of vanishing
        )
        print(f"producer: published and confirmed {seq}/{args.count} to '{args.queue}'", flush=True)
        if args.interval:
            time.sleep(args.interval)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
