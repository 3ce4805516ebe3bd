//! Messaging with lapin against Warren, or against `AMQP_ADDR` (a RabbitMQ from
//! `scripts/rabbitmq.sh`): publish/consume/ack, confirms, qos, get, nack/requeue, exclusive
//! queues (405), immediate (540), and a scale test: 1,000 queues with 10 consumers each on 100
//! connections, every message accounted for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::message::{Delivery, DeliveryResult};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::mpsc;
use warren_tests::{connection_errors, Target};

const WAIT: Duration = Duration::from_secs(10);

fn uniq(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(target: &Target) -> Connection {
    Connection::connect(&target.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("lapin connect to {}: {e}", target.describe()))
}

async fn declare(ch: &Channel, name: &str, exclusive: bool) -> String {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            exclusive,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .name()
    .to_string()
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap();
}

/// Deliveries of a consumer, through lapin's delegate, into a channel.
async fn consumer(
    ch: &Channel,
    queue: &str,
    tag: &str,
    no_ack: bool,
) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let c = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let tag = c.tag().to_string();
    c.set_delegate(move |d: DeliveryResult| {
        let tx = tx.clone();
        async move {
            if let Ok(Some(d)) = d {
                let _ = tx.send(d);
            }
        }
    });
    (tag, rx)
}

/// The next `n` deliveries in delivery-tag order. (lapin runs a delegate per delivery on
/// its own task, so they may reach the mpsc channel out of order; the delivery tag is the
/// server's order on the channel.)
async fn take(rx: &mut mpsc::UnboundedReceiver<Delivery>, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} deliveries within {WAIT:?}", out.len()))
            .expect("consumer still open");
        out.push(d);
    }
    out.sort_by_key(|d| d.delivery_tag);
    out
}

async fn nothing_within(rx: &mut mpsc::UnboundedReceiver<Delivery>, wait: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("unexpected delivery {:?}", String::from_utf8_lossy(&d.data));
    }
}

/// The broker's reply code and text from a lapin error.
fn amqp_error(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        ErrorKind::ProtocolError(err) => (err.get_id(), err.get_message().to_string()),
        other => panic!("an AMQP error expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_with_properties() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    let q = declare(&ch, "", true).await;
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongLongInt(-5));
    headers.insert("s".into(), AMQPValue::LongString(LongString::from("v")));
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("text/plain"))
        .with_message_id(ShortString::from("m-1"))
        .with_delivery_mode(2)
        .with_priority(3)
        .with_headers(headers.clone());
    for i in 0..500 {
        publish(&ch, "", &q, format!("{i}").as_bytes(), props.clone()).await;
    }
    let (tag, mut rx) = consumer(&ch, &q, "", false).await;
    assert!(tag.starts_with("amq.ctag-"), "server-generated tag {tag}");
    for (i, d) in (0..500u64).zip(take(&mut rx, 500).await) {
        assert_eq!(d.data, format!("{i}").into_bytes());
        assert_eq!(d.delivery_tag, i + 1);
        assert!(!d.redelivered);
        assert_eq!(d.routing_key.as_str(), q);
        assert_eq!(
            d.properties.content_type().as_ref().unwrap().as_str(),
            "text/plain"
        );
        assert_eq!(d.properties.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(*d.properties.delivery_mode(), Some(2));
        assert_eq!(*d.properties.priority(), Some(3));
        assert_eq!(d.properties.headers().as_ref(), Some(&headers));
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let ok = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((ok.message_count(), ok.consumer_count()), (0, 1));
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_acks_and_returns() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = declare(&ch, "", true).await;
    let mut confirms = Vec::new();
    for i in 0..200 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        let c = tokio::time::timeout(WAIT, c).await.unwrap().unwrap();
        assert!(c.is_ack());
    }
    // mandatory and unroutable: returned with 312 NO_ROUTE, then acked
    let key = uniq("nobody");
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let confirm = tokio::time::timeout(WAIT, confirm).await.unwrap().unwrap();
    assert!(confirm.is_ack());
    let returned = confirm.take_message().expect("the returned message");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.routing_key.as_str(), key);
    assert_eq!(returned.delivery.data, b"lost");
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_nack_when_the_queue_refuses() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap()
        .name()
        .to_string();
    let mut results = Vec::new();
    for body in [b"kept", b"gone"] {
        let c = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        results.push(
            tokio::time::timeout(WAIT, c)
                .await
                .unwrap()
                .unwrap()
                .is_ack(),
        );
    }
    assert_eq!(
        results,
        [true, false],
        "the second publish is refused: basic.nack"
    );
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_limits_unacked_deliveries() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    let q = declare(&ch, "", true).await;
    for i in 0..20 {
        publish(
            &ch,
            "",
            &q,
            format!("{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let (_tag, mut rx) = consumer(&ch, &q, "", false).await;
    let held = take(&mut rx, 5).await;
    nothing_within(&mut rx, Duration::from_millis(400)).await;
    // ack two (the second with multiple): two more come
    held[0].acker.ack(BasicAckOptions::default()).await.unwrap();
    held[1]
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let more = take(&mut rx, 2).await;
    assert_eq!(
        (&more[0].data[..], &more[1].data[..]),
        (&b"5"[..], &b"6"[..])
    );
    nothing_within(&mut rx, Duration::from_millis(300)).await;
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_nack_requeue() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    let q = declare(&ch, "", true).await;
    let empty = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(empty.is_none(), "get-empty");
    for b in ["a", "b", "c"] {
        publish(&ch, "", &q, b.as_bytes(), BasicProperties::default()).await;
    }
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("get-ok");
    assert_eq!(
        (m.data.as_slice(), m.message_count, m.redelivered),
        (&b"a"[..], 2, false)
    );
    m.acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .unwrap();
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("get-ok");
    assert_eq!(
        (m.data.as_slice(), m.message_count, m.redelivered),
        (&b"a"[..], 2, true)
    );
    let (_t, mut rx) = consumer(&ch, &q, "", false).await;
    let first = take(&mut rx, 2).await;
    assert_eq!(
        [
            (&first[0].data[..], first[0].redelivered),
            (&first[1].data[..], first[1].redelivered)
        ],
        [(&b"b"[..], false), (&b"c"[..], false)]
    );
    first[0]
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .unwrap();
    let again = take(&mut rx, 1).await;
    assert_eq!(
        (&again[0].data[..], again[0].redelivered),
        (&b"b"[..], true)
    );
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_is_405_for_other_connections() {
    let target = Target::from_env().unwrap();
    let owner = connect(&target).await;
    let och = owner.create_channel().await.unwrap();
    let q = declare(&och, &uniq("lapin.excl"), true).await;
    let other = connect(&target).await;
    let ch = other.create_channel().await.unwrap();
    let err = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming another connection's exclusive queue must fail");
    let (code, text) = amqp_error(&err);
    assert_eq!(code, 405, "{text}");
    assert!(
        text.starts_with(&format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'"
        )),
        "{text}"
    );
    // the owner's close deletes the queue
    owner.close(200, "bye".into()).await.unwrap();
    gone(&other, &q).await;
    other.close(200, "bye".into()).await.unwrap();
}

/// Poll with fresh channels until the passive declare answers 404.
async fn gone(conn: &Connection, q: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let ch = conn.create_channel().await.unwrap();
        let res = ch
            .queue_declare(
                q.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Err(e) if amqp_error(&e).0 == 404 => return,
            Err(e) if amqp_error(&e).0 == 405 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("the exclusive queue must go with its connection: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_is_540() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let ch = conn.create_channel().await.unwrap();
    let q = declare(&ch, "", true).await;
    let mut errors = connection_errors(&conn);
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions {
            immediate: true,
            ..BasicPublishOptions::default()
        },
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect_err("the connection is closed with 540");
    // That call fails with the broker's reply, or with lapin's "channel closing" if the
    // connection.close arrived before it went out: the reply itself comes as an event.
    let err = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("a connection error within WAIT")
        .expect("the error stream is open");
    let (code, text) = amqp_error(&err);
    assert_eq!(
        (code, text.as_str()),
        (540, "NOT_IMPLEMENTED - immediate=true")
    );
}

/// A consumer that never acks (prefetch 1) on queue A stalls neither a fast consumer on queue B
/// on another channel of its connection nor one on queue C on another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_does_not_stall_others() {
    const N: usize = 1000;
    let target = Target::from_env().unwrap();
    let producer = connect(&target).await;
    let pch = producer.create_channel().await.unwrap();
    let (qa, qb, qc) = (
        declare(&pch, &uniq("slow.a"), false).await,
        declare(&pch, &uniq("slow.b"), false).await,
        declare(&pch, &uniq("slow.c"), false).await,
    );
    for i in 0..N {
        publish(
            &pch,
            "",
            &qa,
            format!("a{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let slow_conn = connect(&target).await;
    let slow = slow_conn.create_channel().await.unwrap();
    slow.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let (_t, mut stuck) = consumer(&slow, &qa, "", false).await;
    let first = take(&mut stuck, 1).await;
    assert_eq!(first[0].data, b"a0");

    let same = slow_conn.create_channel().await.unwrap();
    let other_conn = connect(&target).await;
    let other = other_conn.create_channel().await.unwrap();
    let t0 = Instant::now();
    for (ch, q) in [(&same, &qb), (&other, &qc)] {
        ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
        let c = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.set_delegate(move |d: DeliveryResult| {
            let tx = tx.clone();
            async move {
                if let Ok(Some(d)) = d {
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    let _ = tx.send(d.data);
                }
            }
        });
        for i in 0..N {
            publish(
                &pch,
                "",
                q,
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
        }
        let mut got = 0;
        while got < N {
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("queue {q} stalled after {got} of {N}"))
                .unwrap();
            got += 1;
        }
    }
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    nothing_within(&mut stuck, Duration::from_millis(200)).await;
    for q in [&qa, &qb, &qc] {
        pch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    for c in [producer, slow_conn, other_conn] {
        c.close(200, "bye".into()).await.unwrap();
    }
}

/// Concurrent publishers (with confirms) and consumers on one queue, with nack-requeues and a
/// consumer channel closed mid-stream: every message is acked exactly once, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requeue_no_loss_no_duplicate() {
    const PUBLISHERS: usize = 2;
    const PER_PUBLISHER: usize = 3000;
    const TOTAL: usize = PUBLISHERS * PER_PUBLISHER;
    let target = Arc::new(Target::from_env().unwrap());
    let admin = connect(&target).await;
    let ach = admin.create_channel().await.unwrap();
    let q = declare(&ach, &uniq("stress"), false).await;

    // (body, redelivered) of every ack, from every consumer
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<(Vec<u8>, bool)>();
    let mut consumer_conns = Vec::new();
    for c in 0..3 {
        let conn = connect(&target).await;
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
        let cons = ch
            .basic_consume(
                q.as_str().into(),
                format!("stress-{c}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let tx = acked_tx.clone();
        cons.set_delegate(move |d: DeliveryResult| {
            let tx = tx.clone();
            async move {
                let Ok(Some(d)) = d else { return };
                let n: usize = String::from_utf8_lossy(&d.data)
                    .split(':')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if !d.redelivered && n % 10 == 3 {
                    let _ = d
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await;
                } else if d.acker.ack(BasicAckOptions::default()).await.is_ok() {
                    let _ = tx.send((d.data, d.redelivered));
                }
            }
        });
        consumer_conns.push((conn, ch));
    }
    // a fourth consumer that takes messages and never acks; its channel closes mid-stream
    let quitter = connect(&target).await;
    let qch = quitter.create_channel().await.unwrap();
    qch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let (_t, mut quitter_rx) = consumer(&qch, &q, "quitter", false).await;

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let target = Arc::clone(&target);
        let q = q.clone();
        publishers.push(tokio::spawn(async move {
            let conn = connect(&target).await;
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for i in 0..PER_PUBLISHER {
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{p}:{i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
            }
            assert!(ch.wait_for_confirms().await.unwrap().is_empty());
            conn.close(200, "bye".into()).await.unwrap();
        }));
    }
    let held = take(&mut quitter_rx, 50).await;
    qch.close(200, "bye".into()).await.unwrap();
    drop(held);
    for p in publishers {
        p.await.unwrap();
    }
    drop(acked_tx);
    let mut counts: HashMap<Vec<u8>, u32> = HashMap::with_capacity(TOTAL);
    let deadline = Instant::now() + Duration::from_secs(40);
    while counts.len() < TOTAL {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, acked_rx.recv()).await {
            Ok(Some((body, _redelivered))) => *counts.entry(body).or_default() += 1,
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok((body, _)) = acked_rx.try_recv() {
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(counts.len(), TOTAL, "distinct messages acked");
    let dup: Vec<_> = counts
        .iter()
        .filter(|(_, n)| **n != 1)
        .take(5)
        .map(|(b, n)| (String::from_utf8_lossy(b).into_owned(), *n))
        .collect();
    assert!(dup.is_empty(), "acked more than once: {dup:?}");
    let ok = ach
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 0);
    for (conn, _ch) in consumer_conns {
        conn.close(200, "bye".into()).await.unwrap();
    }
    quitter.close(200, "bye".into()).await.unwrap();
    ach.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    admin.close(200, "bye".into()).await.unwrap();
}

// ---- scale -----------------------------------------------------------------------------------

const QUEUES: usize = 1000;
const CONSUMERS_PER_QUEUE: usize = 10;
const CONNECTIONS: usize = 100;
const CHANNELS_PER_CONNECTION: usize = 10;
const MESSAGES_PER_QUEUE: usize = 20;

/// 1,000 queues with 10 consumers each (10,000 consumers) spread over 100 connections of 10
/// channels; 20 messages per queue; every message must arrive exactly once and be acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_1000_queues_10_consumers_each_on_100_connections() {
    let t0 = Instant::now();
    let target = Arc::new(Target::from_env().unwrap());
    let prefix = uniq("scale");
    let names: Arc<Vec<String>> = Arc::new((0..QUEUES).map(|i| format!("{prefix}.{i}")).collect());

    // declare the queues on one connection
    let admin = connect(&target).await;
    let ach = admin.create_channel().await.unwrap();
    for q in names.iter() {
        ach.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let declared = t0.elapsed();

    // 100 connections; consumer k of queue i lives on connection (i + k * 10) % 100, so each
    // queue's consumers are spread over 10 connections and each connection holds 100
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Vec<u8>)>();
    let mut setups = Vec::new();
    for conn_idx in 0..CONNECTIONS {
        let target = Arc::clone(&target);
        let names = Arc::clone(&names);
        let tx = tx.clone();
        setups.push(tokio::spawn(async move {
            let conn = connect(&target).await;
            let mut channels = Vec::new();
            for _ in 0..CHANNELS_PER_CONNECTION {
                let ch = conn.create_channel().await.unwrap();
                ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
                channels.push(ch);
            }
            let mut n = 0;
            for i in 0..QUEUES {
                for k in 0..CONSUMERS_PER_QUEUE {
                    if (i + k * 10) % CONNECTIONS != conn_idx {
                        continue;
                    }
                    let ch = &channels[n % CHANNELS_PER_CONNECTION];
                    n += 1;
                    let c = ch
                        .basic_consume(
                            names[i].as_str().into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("consume on queue {i}: {e}"));
                    let tx = tx.clone();
                    c.set_delegate(move |d: DeliveryResult| {
                        let tx = tx.clone();
                        async move {
                            if let Ok(Some(d)) = d {
                                d.acker.ack(BasicAckOptions::default()).await.unwrap();
                                let _ = tx.send((i, d.data));
                            }
                        }
                    });
                }
            }
            assert_eq!(n, QUEUES * CONSUMERS_PER_QUEUE / CONNECTIONS);
            (conn, channels)
        }));
    }
    drop(tx);
    let mut conns = Vec::new();
    for s in setups {
        conns.push(s.await.expect("consumer setup"));
    }
    let consuming = t0.elapsed();

    // every queue reports its 10 consumers
    for (i, q) in names.iter().enumerate().step_by(97) {
        let ok = ach
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            ok.consumer_count() as usize,
            CONSUMERS_PER_QUEUE,
            "queue {i}"
        );
    }

    // publish with confirms from 4 connections
    let mut publishers = Vec::new();
    for p in 0..4 {
        let target = Arc::clone(&target);
        let names = Arc::clone(&names);
        publishers.push(tokio::spawn(async move {
            let conn = connect(&target).await;
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for i in (p..QUEUES).step_by(4) {
                for m in 0..MESSAGES_PER_QUEUE {
                    ch.basic_publish(
                        "".into(),
                        names[i].as_str().into(),
                        BasicPublishOptions::default(),
                        format!("{i}:{m}").as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .unwrap();
                }
            }
            let returned = ch.wait_for_confirms().await.unwrap();
            assert!(returned.is_empty());
            conn.close(200, "bye".into()).await.unwrap();
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    let published = t0.elapsed();

    let total = QUEUES * MESSAGES_PER_QUEUE;
    let mut seen: HashMap<(usize, Vec<u8>), u32> = HashMap::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(item)) => *seen.entry(item).or_default() += 1,
            _ => break,
        }
    }
    let received = t0.elapsed();
    assert_eq!(seen.len(), total, "distinct messages received");
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    for (i, body) in seen.keys() {
        let text = String::from_utf8_lossy(body);
        assert!(
            text.starts_with(&format!("{i}:")),
            "{text} arrived on queue {i}"
        );
    }
    // nothing left behind: every queue empty, acks done
    tokio::time::sleep(Duration::from_millis(200)).await;
    for q in names.iter().step_by(50) {
        let ok = ach
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(ok.message_count(), 0, "{q}");
    }
    for (conn, _channels) in conns {
        conn.close(200, "bye".into()).await.unwrap();
    }
    for q in names.iter() {
        ach.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    admin.close(200, "bye".into()).await.unwrap();
    eprintln!(
        "scale on {}: declared {declared:?}, consuming {consuming:?}, published {published:?}, \
         received {received:?}, done {:?}",
        target.describe(),
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}
