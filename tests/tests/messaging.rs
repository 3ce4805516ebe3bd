//! Messaging behaviour seen at the frame level, where client libraries hide the detail: server
//! tags, reply codes with class/method ids, properties passed through byte for byte, frame
//! splitting, confirm acks, server-sent basic.cancel and the client's capability for it.
//!
//! Every test runs against a fresh Warren by default, or against `AMQP_ADDR` (a RabbitMQ from
//! `scripts/rabbitmq.sh`): the expectations are RabbitMQ 3.10's measured behaviour. Names are
//! unique per test so that tests may share one external broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use anyhow::{bail, Result};
use warren_tests::raw::{
    put_longstr, put_shortstr, raw_frame, raw_method_payload, FRAME_BODY, FRAME_HEADER,
    FRAME_METHOD,
};
use warren_tests::{CloseScope, Event, Frame, Handshake, RawClient, Target};

const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for a frame that must not come.
const QUIET: Duration = Duration::from_millis(500);

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

fn target() -> Target {
    Target::from_env().expect("broker under test")
}

async fn client(target: &Target) -> RawClient {
    let mut c = RawClient::open(target.addr()).await.expect("handshake");
    c.channel_open(1).await.expect("channel.open 1");
    c
}

fn ss(s: &str) -> ShortString {
    ShortString::from(s)
}

fn is_server_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 22
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

// ---- method helpers --------------------------------------------------------------------------

async fn declare_queue(c: &mut RawClient, ch: u16, name: &str, exclusive: bool) -> String {
    let m = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: ss(name),
        passive: false,
        durable: false,
        exclusive,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    c.send_method(ch, m).await.unwrap();
    let f = c.expect_method(ch, 50, 11).await.unwrap();
    match f.method() {
        Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.queue.to_string(),
        other => panic!("declare-ok expected, got {other:?}"),
    }
}

async fn delete_queue(c: &mut RawClient, ch: u16, name: &str) {
    let m = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
        queue: ss(name),
        if_unused: false,
        if_empty: false,
        nowait: false,
    }));
    c.send_method(ch, m).await.unwrap();
    c.expect_method(ch, 50, 41).await.unwrap();
}

fn consume_method(q: &str, tag: &str, no_ack: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: ss(q),
        consumer_tag: ss(tag),
        no_local: false,
        no_ack,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

async fn consume(c: &mut RawClient, ch: u16, q: &str, tag: &str, no_ack: bool) -> String {
    c.send_method(ch, consume_method(q, tag, no_ack))
        .await
        .unwrap();
    let f = c.expect_method(ch, 60, 21).await.unwrap();
    match f.method() {
        Some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok))) => ok.consumer_tag.to_string(),
        other => panic!("consume-ok expected, got {other:?}"),
    }
}

fn publish_method(exchange: &str, key: &str, mandatory: bool, immediate: bool) -> Vec<u8> {
    let mut args = vec![0, 0]; // ticket
    put_shortstr(&mut args, exchange);
    put_shortstr(&mut args, key);
    args.push(u8::from(mandatory) | (u8::from(immediate) << 1));
    raw_frame(FRAME_METHOD, 0, &raw_method_payload(60, 40, &args))
}

/// A content header payload: class 60, weight 0, body size, then `props` (flags + list).
fn header_payload(body_size: u64, props: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&60u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&body_size.to_be_bytes());
    out.extend_from_slice(props);
    out
}

/// No properties: property flags 0.
const NO_PROPS: &[u8] = &[0, 0];

fn with_channel(mut frame: Vec<u8>, ch: u16) -> Vec<u8> {
    frame[1..3].copy_from_slice(&ch.to_be_bytes());
    frame
}

/// basic.publish + header + body frames of at most `max_body` bytes, in one write.
#[allow(clippy::too_many_arguments)]
async fn publish_raw(
    c: &mut RawClient,
    ch: u16,
    exchange: &str,
    key: &str,
    mandatory: bool,
    immediate: bool,
    props: &[u8],
    body: &[u8],
    max_body: usize,
) {
    let mut bytes = with_channel(publish_method(exchange, key, mandatory, immediate), ch);
    bytes.extend(raw_frame(
        FRAME_HEADER,
        ch,
        &header_payload(body.len() as u64, props),
    ));
    for chunk in body.chunks(max_body.max(1)) {
        bytes.extend(raw_frame(FRAME_BODY, ch, chunk));
    }
    c.send_bytes(&bytes).await.unwrap();
}

async fn publish(c: &mut RawClient, ch: u16, exchange: &str, key: &str, body: &[u8]) {
    publish_raw(
        c,
        ch,
        exchange,
        key,
        false,
        false,
        NO_PROPS,
        body,
        131_072 - 8,
    )
    .await;
}

/// A message as received: its method frame, the header payload and the body frames.
#[derive(Debug)]
struct Received {
    method: Frame,
    header: Vec<u8>,
    bodies: Vec<Vec<u8>>,
}

impl Received {
    fn body(&self) -> Vec<u8> {
        self.bodies.concat()
    }

    fn decoded(&self) -> AMQPClass {
        self.method.method().expect("decodable method")
    }
}

/// Read frames until the next content-carrying method (deliver, get-ok, return) on `ch` and
/// its content; other frames on other channels are an error.
async fn read_message(c: &mut RawClient, ch: u16) -> Result<Received> {
    let method = loop {
        let f = c.read_frame(WAIT).await?;
        if f.is_heartbeat() {
            continue;
        }
        if f.channel == ch && matches!(f.method_id(), Some((60, 60 | 71 | 50))) {
            break f;
        }
        bail!("expected a message on channel {ch}, got {f:?}");
    };
    let header = c.read_frame(WAIT).await?;
    if header.kind != FRAME_HEADER || header.channel != ch {
        bail!("expected a content header, got {header:?}");
    }
    let size = u64::from_be_bytes(header.payload[4..12].try_into().unwrap());
    let mut bodies = Vec::new();
    let mut got = 0u64;
    while got < size {
        let b = c.read_frame(WAIT).await?;
        if b.kind != FRAME_BODY || b.channel != ch {
            bail!("expected a body frame, got {b:?}");
        }
        got += b.payload.len() as u64;
        bodies.push(b.payload);
    }
    if got != size {
        bail!("body frames carry {got} bytes for a declared size of {size}");
    }
    Ok(Received {
        method,
        header: header.payload,
        bodies,
    })
}

async fn basic_get(c: &mut RawClient, ch: u16, q: &str, no_ack: bool) -> Option<Received> {
    let m = AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
        queue: ss(q),
        no_ack,
    }));
    c.send_method(ch, m).await.unwrap();
    let f = loop {
        let f = c.read_frame(WAIT).await.unwrap();
        if !f.is_heartbeat() {
            break f;
        }
    };
    match f.method_id() {
        Some((60, 72)) => None,
        Some((60, 71)) => {
            // put the get-ok back in front of its content
            let header = c.read_frame(WAIT).await.unwrap();
            let size = u64::from_be_bytes(header.payload[4..12].try_into().unwrap());
            let mut bodies = Vec::new();
            let mut got = 0u64;
            while got < size {
                let b = c.read_frame(WAIT).await.unwrap();
                got += b.payload.len() as u64;
                bodies.push(b.payload);
            }
            Some(Received {
                method: f,
                header: header.payload,
                bodies,
            })
        }
        _ => panic!("get-ok or get-empty expected, got {f:?}"),
    }
}

/// Nothing but heartbeats arrives within `QUIET`.
async fn assert_quiet(c: &mut RawClient, what: &str) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.read_event(left).await.unwrap() {
            Event::Timeout => return,
            Event::Frame(f) if f.is_heartbeat() => continue,
            Event::Frame(f) => panic!("{what}: unexpected {f:?}"),
            Event::Eof(_) => panic!("{what}: the server closed the connection"),
        }
    }
}

// ---- server-generated names ------------------------------------------------------------------

#[tokio::test]
async fn server_named_queue_and_consumer_tag() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    assert!(is_server_name(&q, "amq.gen-"), "server-named queue {q:?}");
    let tag = consume(&mut c, 1, &q, "", false).await;
    assert!(
        is_server_name(&tag, "amq.ctag-"),
        "server consumer tag {tag:?}"
    );
    let tag2 = consume(&mut c, 1, &q, "", false).await;
    assert_ne!(tag, tag2);
    c.close().await.unwrap();
}

#[tokio::test]
async fn consumer_tag_reuse_is_530_on_the_connection() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    consume(&mut c, 1, &q, "dup-tag", false).await;
    c.send_method(1, consume_method(&q, "dup-tag", false))
        .await
        .unwrap();
    let close = c
        .expect_close_scope(CloseScope::Connection, 530)
        .await
        .unwrap();
    assert_eq!(
        close.text, "NOT_ALLOWED - attempt to reuse consumer tag 'dup-tag'",
        "{close:?}"
    );
    assert_eq!((close.class_id, close.method_id), (60, 20), "{close:?}");
}

// ---- reply codes with class and method ids ---------------------------------------------------

#[tokio::test]
async fn immediate_publish_is_540_on_the_connection() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    publish_raw(&mut c, 1, "", &q, false, true, NO_PROPS, b"x", 1000).await;
    let close = c
        .expect_close_scope(CloseScope::Connection, 540)
        .await
        .unwrap();
    assert_eq!(close.text, "NOT_IMPLEMENTED - immediate=true", "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 40), "{close:?}");
}

#[tokio::test]
async fn unknown_delivery_tag_names_the_method() {
    let t = target();
    for (name, class_method, payload) in [
        ("ack", (60u16, 80u16), {
            let mut a = 42u64.to_be_bytes().to_vec();
            a.push(0);
            a
        }),
        ("reject", (60, 90), {
            let mut a = 42u64.to_be_bytes().to_vec();
            a.push(1);
            a
        }),
        ("nack", (60, 120), {
            let mut a = 42u64.to_be_bytes().to_vec();
            a.push(0b10);
            a
        }),
    ] {
        let mut c = client(&t).await;
        c.send_bytes(&raw_frame(
            FRAME_METHOD,
            1,
            &raw_method_payload(class_method.0, class_method.1, &payload),
        ))
        .await
        .unwrap();
        let close = c
            .expect_close_scope(CloseScope::Channel, 406)
            .await
            .unwrap();
        assert_eq!(
            close.text, "PRECONDITION_FAILED - unknown delivery tag 42",
            "{name}: {close:?}"
        );
        assert_eq!(
            (close.class_id, close.method_id),
            class_method,
            "{name}: {close:?}"
        );
        c.ping(2).await.unwrap();
        c.close().await.unwrap();
    }
}

#[tokio::test]
async fn prefetch_size_is_540() {
    let t = target();
    let mut c = client(&t).await;
    let mut args = 5u32.to_be_bytes().to_vec();
    args.extend_from_slice(&1u16.to_be_bytes());
    args.push(0);
    c.send_bytes(&raw_frame(
        FRAME_METHOD,
        1,
        &raw_method_payload(60, 10, &args),
    ))
    .await
    .unwrap();
    let close = c
        .expect_close_scope(CloseScope::Connection, 540)
        .await
        .unwrap();
    assert_eq!(close.text, "NOT_IMPLEMENTED - prefetch_size!=0 (5)");
    assert_eq!((close.class_id, close.method_id), (60, 10));
}

#[tokio::test]
async fn recover_async_requeue_false_is_540_and_requeue_true_redelivers() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    let tag = consume(&mut c, 1, &q, "", false).await;
    publish(&mut c, 1, "", &q, b"once").await;
    let first = read_message(&mut c, 1).await.unwrap();
    assert_eq!(first.body(), b"once");
    // recover-async (60.100) requeue=true: no reply, the message comes again, redelivered
    c.send_bytes(&raw_frame(
        FRAME_METHOD,
        1,
        &raw_method_payload(60, 100, &[1]),
    ))
    .await
    .unwrap();
    let again = read_message(&mut c, 1).await.unwrap();
    match again.decoded() {
        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
            assert!(d.redelivered);
            assert_eq!(d.consumer_tag.as_str(), tag);
            assert_eq!(d.delivery_tag, 2);
        }
        other => panic!("deliver expected, got {other:?}"),
    }
    c.send_bytes(&raw_frame(
        FRAME_METHOD,
        1,
        &raw_method_payload(60, 100, &[0]),
    ))
    .await
    .unwrap();
    let close = c
        .expect_close_scope(CloseScope::Connection, 540)
        .await
        .unwrap();
    assert_eq!(close.text, "NOT_IMPLEMENTED - requeue=false");
    assert_eq!((close.class_id, close.method_id), (60, 100));
}

#[tokio::test]
async fn channel_flow() {
    let t = target();
    let mut c = client(&t).await;
    c.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
    )
    .await
    .unwrap();
    let f = c.expect_method(1, 20, 21).await.unwrap();
    assert_eq!(f.payload[4..], [1], "flow-ok active=true");
    c.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    )
    .await
    .unwrap();
    let close = c
        .expect_close_scope(CloseScope::Connection, 540)
        .await
        .unwrap();
    assert_eq!(close.text, "NOT_IMPLEMENTED - active=false");
    assert_eq!((close.class_id, close.method_id), (20, 20));
}

#[tokio::test]
async fn cancel_of_unknown_tag_is_ok() {
    let t = target();
    let mut c = client(&t).await;
    c.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: ss("never-was"),
            nowait: false,
        })),
    )
    .await
    .unwrap();
    let f = c.expect_method(1, 60, 31).await.unwrap();
    match f.method() {
        Some(AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok))) => {
            assert_eq!(ok.consumer_tag.as_str(), "never-was")
        }
        other => panic!("cancel-ok expected, got {other:?}"),
    }
    c.close().await.unwrap();
}

#[tokio::test]
async fn long_reply_text_is_truncated_to_a_short_string() {
    let t = target();
    let mut c = client(&t).await;
    let name = "q".repeat(255);
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ss(&name),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    let close = c
        .expect_close_scope(CloseScope::Channel, 404)
        .await
        .unwrap();
    assert!(close.text.len() <= 255, "{}", close.text.len());
    assert!(
        close
            .text
            .starts_with(&format!("NOT_FOUND - no queue '{}", &name[..100])),
        "{close:?}"
    );
    c.ping(2).await.unwrap();
}

// ---- content passes through unchanged --------------------------------------------------------

/// Every basic property, with a headers table holding every field type RabbitMQ knows.
fn all_properties() -> Vec<u8> {
    let mut headers = Vec::new();
    let mut field = |name: &str, tag: u8, value: &[u8]| {
        put_shortstr(&mut headers, name);
        headers.push(tag);
        headers.extend_from_slice(value);
    };
    field("bool", b't', &[1]);
    field("i8", b'b', &[0xfe]);
    field("i16", b's', &(-300i16).to_be_bytes());
    field("i32", b'I', &(-70000i32).to_be_bytes());
    field("i64", b'l', &(-5_000_000_000i64).to_be_bytes());
    field("f32", b'f', &1.5f32.to_be_bytes());
    field("f64", b'd', &(-2.25f64).to_be_bytes());
    field("dec", b'D', &[2, 0, 0, 0x01, 0x3a]);
    field("time", b'T', &1_700_000_000u64.to_be_bytes());
    let mut long = Vec::new();
    put_longstr(&mut long, "text \u{e9}\u{2713}".as_bytes());
    field("str", b'S', &long);
    let mut bytes = Vec::new();
    put_longstr(&mut bytes, &[0, 1, 2, 0xff]);
    field("bytes", b'x', &bytes);
    field("void", b'V', &[]);
    let mut inner = Vec::new();
    put_shortstr(&mut inner, "k");
    inner.push(b'I');
    inner.extend_from_slice(&7i32.to_be_bytes());
    let mut table = (inner.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&inner);
    field("table", b'F', &table);
    let mut items = vec![b'I'];
    items.extend_from_slice(&1i32.to_be_bytes());
    items.push(b'S');
    put_longstr(&mut items, b"two");
    let mut array = (items.len() as u32).to_be_bytes().to_vec();
    array.extend_from_slice(&items);
    field("array", b'A', &array);

    let mut p = Vec::new();
    p.extend_from_slice(&0xfffcu16.to_be_bytes()); // all 14 properties
    put_shortstr(&mut p, "application/octet-stream"); // content-type
    put_shortstr(&mut p, "identity"); // content-encoding
    p.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    p.extend_from_slice(&headers);
    p.push(2); // delivery-mode
    p.push(9); // priority
    put_shortstr(&mut p, "corr"); // correlation-id
    put_shortstr(&mut p, "reply"); // reply-to
    put_shortstr(&mut p, "60000"); // expiration
    put_shortstr(&mut p, "mid"); // message-id
    p.extend_from_slice(&1_600_000_000u64.to_be_bytes()); // timestamp
    put_shortstr(&mut p, "type"); // type
    put_shortstr(&mut p, "guest"); // user-id
    put_shortstr(&mut p, "app"); // app-id
    put_shortstr(&mut p, "cluster"); // cluster-id (deprecated, still a property)
    p
}

#[tokio::test]
async fn properties_and_body_pass_through_byte_for_byte() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    let props = all_properties();
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    publish_raw(&mut c, 1, "", &q, false, false, &props, &body, 10_000).await;
    let got = basic_get(&mut c, 1, &q, true).await.expect("get-ok");
    assert_eq!(got.header, header_payload(body.len() as u64, &props));
    assert!(got.body() == body, "body differs");
    // through basic.deliver too
    publish_raw(&mut c, 1, "", &q, false, false, &props, b"", 10_000).await;
    consume(&mut c, 1, &q, "c", true).await;
    let got = read_message(&mut c, 1).await.unwrap();
    assert_eq!(got.header, header_payload(0, &props));
    assert!(got.bodies.is_empty(), "an empty body has no body frame");
    c.close().await.unwrap();
}

#[tokio::test]
async fn returned_message_keeps_properties() {
    let t = target();
    let mut c = client(&t).await;
    let props = all_properties();
    let key = uniq("nobody");
    publish_raw(
        &mut c,
        1,
        "amq.direct",
        &key,
        true,
        false,
        &props,
        b"back",
        100,
    )
    .await;
    let got = read_message(&mut c, 1).await.unwrap();
    match got.decoded() {
        AMQPClass::Basic(basic::AMQPMethod::Return(r)) => {
            assert_eq!(r.reply_code, 312);
            assert_eq!(r.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(r.exchange.as_str(), "amq.direct");
            assert_eq!(r.routing_key.as_str(), key);
        }
        other => panic!("basic.return expected, got {other:?}"),
    }
    assert_eq!(got.header, header_payload(4, &props));
    assert_eq!(got.body(), b"back");
    c.close().await.unwrap();
}

#[tokio::test]
async fn small_frame_max_splits_bodies() {
    let t = target();
    let hs = Handshake {
        frame_max: Some(4096),
        ..Handshake::default()
    };
    let mut c = RawClient::open_with(t.addr(), &hs).await.unwrap();
    c.channel_open(1).await.unwrap();
    let q = declare_queue(&mut c, 1, "", true).await;
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    publish_raw(&mut c, 1, "", &q, false, false, NO_PROPS, &body, 4088).await;
    consume(&mut c, 1, &q, "", true).await;
    let got = read_message(&mut c, 1).await.unwrap();
    assert!(got.body() == body);
    assert!(
        got.bodies.iter().all(|b| b.len() <= 4088),
        "body frames above frame_max: {:?}",
        got.bodies.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(got.bodies.len(), 5, "20000 bytes in 4088-byte frames");
    c.close().await.unwrap();
}

// ---- confirms --------------------------------------------------------------------------------

#[tokio::test]
async fn confirm_acks_cover_every_publish_once() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    c.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await
    .unwrap();
    c.expect_method(1, 85, 11).await.unwrap();
    const N: u64 = 300;
    let mut burst = Vec::new();
    for i in 0..N {
        let body = i.to_string();
        let mut one = with_channel(publish_method("", &q, false, false), 1);
        one.extend(raw_frame(
            FRAME_HEADER,
            1,
            &header_payload(body.len() as u64, NO_PROPS),
        ));
        one.extend(raw_frame(FRAME_BODY, 1, body.as_bytes()));
        burst.extend(one);
    }
    c.send_bytes(&burst).await.unwrap();
    let mut confirmed: BTreeMap<u64, bool> = BTreeMap::new();
    let mut last = 0;
    while (confirmed.len() as u64) < N {
        let f = c.read_frame(WAIT).await.unwrap();
        let (tag, multiple) = match f.method() {
            Some(AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => (a.delivery_tag, a.multiple),
            other => panic!("basic.ack expected, got {other:?}"),
        };
        assert!(
            tag > last,
            "acks for one queue come in publish order: {tag} after {last}"
        );
        let tags: Vec<u64> = if multiple {
            (last + 1..=tag).collect()
        } else {
            vec![tag]
        };
        for t in tags {
            assert!(confirmed.insert(t, true).is_none(), "tag {t} acked twice");
        }
        last = tag;
    }
    assert_eq!(
        confirmed.keys().copied().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );
    assert_quiet(&mut c, "after the last ack").await;
    c.close().await.unwrap();
}

#[tokio::test]
async fn mandatory_return_precedes_confirm_ack() {
    let t = target();
    let mut c = client(&t).await;
    c.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await
    .unwrap();
    c.expect_method(1, 85, 11).await.unwrap();
    publish_raw(
        &mut c,
        1,
        "amq.direct",
        &uniq("nobody"),
        true,
        false,
        NO_PROPS,
        b"r",
        100,
    )
    .await;
    let ret = read_message(&mut c, 1).await.unwrap();
    assert!(ret.method.is_method(60, 50), "basic.return first: {ret:?}");
    let ack = c.expect_method(1, 60, 80).await.unwrap();
    match ack.method() {
        Some(AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
            assert_eq!((a.delivery_tag, a.multiple), (1, false))
        }
        other => panic!("{other:?}"),
    }
    c.close().await.unwrap();
}

// ---- server-sent basic.cancel and the client's capability ------------------------------------

/// Handshake with client capabilities of our choosing.
async fn client_with_caps(target: &Target, caps: &[&str]) -> RawClient {
    let mut c = RawClient::connect(target.addr()).await.unwrap();
    c.start().await.unwrap();
    let mut table = FieldTable::default();
    for cap in caps {
        table.insert(ss(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(
        ss("product"),
        AMQPValue::LongString(LongString::from("warren-tests messaging")),
    );
    props.insert(ss("capabilities"), AMQPValue::FieldTable(table));
    let mut response = vec![0u8];
    response.extend_from_slice(b"guest\0guest");
    c.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: ss("PLAIN"),
            response: LongString::from(response),
            locale: ss("en_US"),
        })),
    )
    .await
    .unwrap();
    let tune = c.expect_tune().await.unwrap();
    c.tune_ok(tune.channel_max, tune.frame_max, 0)
        .await
        .unwrap();
    c.send_open("/").await.unwrap();
    c.expect_method(0, 10, 41).await.unwrap();
    c.channel_open(1).await.unwrap();
    c.channel_open(2).await.unwrap();
    c
}

#[tokio::test]
async fn queue_deletion_sends_basic_cancel_when_advertised() {
    let t = target();
    let mut c = client_with_caps(&t, &["consumer_cancel_notify", "basic.nack"]).await;
    let q = declare_queue(&mut c, 1, &uniq("q.cancel"), false).await;
    let tag = consume(&mut c, 1, &q, "", false).await;
    let m = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
        queue: ss(&q),
        if_unused: false,
        if_empty: false,
        nowait: false,
    }));
    c.send_method(2, m).await.unwrap();
    // basic.cancel on channel 1 and delete-ok on channel 2, in either order
    let mut seen_cancel = false;
    let mut seen_delete_ok = false;
    while !(seen_cancel && seen_delete_ok) {
        let f = c.read_frame(WAIT).await.unwrap();
        match (f.channel, f.method()) {
            (1, Some(AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)))) => {
                assert_eq!(cancel.consumer_tag.as_str(), tag);
                seen_cancel = true;
            }
            (2, Some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)))) => seen_delete_ok = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    // (clients must not answer: RabbitMQ closes the connection with 503 "unimplemented
    // method" on a client cancel-ok.) The channel stays usable.
    let q2 = declare_queue(&mut c, 1, "", true).await;
    assert!(q2.starts_with("amq.gen-"));
    c.close().await.unwrap();
}

#[tokio::test]
async fn no_basic_cancel_without_the_capability() {
    let t = target();
    let mut c = client_with_caps(&t, &["basic.nack", "publisher_confirms"]).await;
    let q = declare_queue(&mut c, 1, &uniq("q.cancel"), false).await;
    consume(&mut c, 1, &q, "", false).await;
    delete_queue(&mut c, 2, &q).await;
    assert_quiet(
        &mut c,
        "no basic.cancel for a client without consumer_cancel_notify",
    )
    .await;
    let q2 = declare_queue(&mut c, 1, "", true).await;
    publish(&mut c, 1, "", &q2, b"still works").await;
    let got = basic_get(&mut c, 1, &q2, true).await.expect("get-ok");
    assert_eq!(got.body(), b"still works");
    c.close().await.unwrap();
}

// ---- delivery details ------------------------------------------------------------------------

#[tokio::test]
async fn deliver_and_get_ok_fields() {
    let t = target();
    let mut c = client(&t).await;
    let x = uniq("x.topic");
    c.send_method(
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: ss(&x),
            kind: ss("topic"),
            passive: false,
            durable: false,
            auto_delete: true,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    c.expect_method(1, 40, 11).await.unwrap();
    let q = declare_queue(&mut c, 1, "", true).await;
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: ss(&q),
            exchange: ss(&x),
            routing_key: ss("a.#"),
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    c.expect_method(1, 50, 21).await.unwrap();
    publish(&mut c, 1, &x, "a.b.c", b"1").await;
    publish(&mut c, 1, &x, "a", b"2").await;
    let got = basic_get(&mut c, 1, &q, false).await.expect("get-ok");
    match got.decoded() {
        AMQPClass::Basic(basic::AMQPMethod::GetOk(g)) => {
            assert_eq!(
                (
                    g.delivery_tag,
                    g.redelivered,
                    g.exchange.as_str(),
                    g.routing_key.as_str(),
                    g.message_count
                ),
                (1, false, x.as_str(), "a.b.c", 1)
            );
        }
        other => panic!("{other:?}"),
    }
    let tag = consume(&mut c, 1, &q, "my-consumer", false).await;
    let got = read_message(&mut c, 1).await.unwrap();
    match got.decoded() {
        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
            assert_eq!(
                (
                    d.consumer_tag.as_str(),
                    d.delivery_tag,
                    d.redelivered,
                    d.exchange.as_str(),
                    d.routing_key.as_str()
                ),
                (tag.as_str(), 2, false, x.as_str(), "a")
            );
        }
        other => panic!("{other:?}"),
    }
    c.close().await.unwrap();
}

#[tokio::test]
async fn nowait_declare_bind_consume_send_no_replies() {
    let t = target();
    let mut c = client(&t).await;
    let q = uniq("q.nowait");
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ss(&q),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: false,
            nowait: true,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: ss(&q),
            exchange: ss("amq.fanout"),
            routing_key: ss(""),
            nowait: true,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    c.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: ss(&q),
            consumer_tag: ss("nw"),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: true,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    publish(&mut c, 1, "", &q, b"direct").await;
    let got = read_message(&mut c, 1).await.unwrap();
    assert!(
        got.method.is_method(60, 60),
        "the first frame is the delivery: {got:?}"
    );
    assert_eq!(got.body(), b"direct");
    c.close().await.unwrap();
}

#[tokio::test]
async fn no_local_is_ignored() {
    let t = target();
    let mut c = client(&t).await;
    let q = declare_queue(&mut c, 1, "", true).await;
    c.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: ss(&q),
            consumer_tag: ss("local"),
            no_local: true,
            no_ack: true,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await
    .unwrap();
    c.expect_method(1, 60, 21).await.unwrap();
    publish(&mut c, 1, "", &q, b"mine").await;
    let got = read_message(&mut c, 1).await.unwrap();
    assert_eq!(
        got.body(),
        b"mine",
        "no-local is not implemented by RabbitMQ"
    );
    c.close().await.unwrap();
}

// ---- routes follow topology changes between publishes ----------------------------------------

async fn bind(c: &mut RawClient, q: &str, x: &str, key: &str, bind: bool) {
    let m = if bind {
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: ss(q),
            exchange: ss(x),
            routing_key: ss(key),
            nowait: false,
            arguments: FieldTable::default(),
        }))
    } else {
        AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: ss(q),
            exchange: ss(x),
            routing_key: ss(key),
            arguments: FieldTable::default(),
        }))
    };
    c.send_method(1, m).await.unwrap();
    c.expect_method(1, 50, if bind { 21 } else { 51 })
        .await
        .unwrap();
}

/// A publish, then a round trip on the same channel so the broker has handled it before the
/// test changes anything from another connection (connections are not ordered between them).
async fn publish_sync(c: &mut RawClient, exchange: &str, key: &str, body: &[u8]) {
    publish(c, 1, exchange, key, body).await;
    let qos = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
        prefetch_count: 0,
        global: false,
    }));
    c.send_method(1, qos).await.unwrap();
    c.expect_method(1, 60, 11).await.unwrap();
}

async fn bodies_in(c: &mut RawClient, q: &str) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(m) = basic_get(c, 1, q, true).await {
        got.push(m.body());
    }
    got
}

/// The broker may reuse a channel's last route for the same exchange and key: every change in
/// between (bind, unbind, queue delete and re-declare, exchange delete) must still show in the
/// very next publish of that channel.
#[tokio::test]
async fn repeated_publishes_follow_bindings_and_queues_as_they_change() {
    let t = target();
    let mut c = client(&t).await;
    let mut other = client(&t).await;
    let x = uniq("x.route");
    let declare_x = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: ss(&x),
        kind: ss("direct"),
        passive: false,
        durable: false,
        auto_delete: false,
        internal: false,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    c.send_method(1, declare_x.clone()).await.unwrap();
    c.expect_method(1, 40, 11).await.unwrap();
    let qa = declare_queue(&mut c, 1, &uniq("route-a"), false).await;
    let qb = declare_queue(&mut c, 1, &uniq("route-b"), false).await;
    bind(&mut c, &qa, &x, "k", true).await;

    publish_sync(&mut c, &x, "k", b"1").await;
    // Another connection binds a second queue: the next publish reaches both.
    bind(&mut other, &qb, &x, "k", true).await;
    publish_sync(&mut c, &x, "k", b"2").await;
    // ...and unbinds the first.
    bind(&mut other, &qa, &x, "k", false).await;
    publish_sync(&mut c, &x, "k", b"3").await;
    assert_eq!(
        bodies_in(&mut c, &qa).await,
        vec![b"1".to_vec(), b"2".to_vec()]
    );
    assert_eq!(
        bodies_in(&mut c, &qb).await,
        vec![b"2".to_vec(), b"3".to_vec()]
    );

    // The default exchange: the queue named by the key is deleted and declared anew.
    publish_sync(&mut c, "", &qa, b"4").await;
    delete_queue(&mut other, 1, &qa).await;
    publish_sync(&mut c, "", &qa, b"5").await;
    declare_queue(&mut other, 1, &qa, false).await;
    publish_sync(&mut c, "", &qa, b"6").await;
    assert_eq!(bodies_in(&mut c, &qa).await, vec![b"6".to_vec()]);

    // The exchange itself goes: the next publish is a 404 channel error, not a stale route.
    publish_sync(&mut c, &x, "k", b"7").await;
    other
        .send_method(
            1,
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: ss(&x),
                if_unused: false,
                nowait: false,
            })),
        )
        .await
        .unwrap();
    other.expect_method(1, 40, 21).await.unwrap();
    publish(&mut c, 1, &x, "k", b"8").await;
    let close = c.expect_method(1, 20, 40).await.unwrap();
    match close.method() {
        Some(AMQPClass::Channel(channel::AMQPMethod::Close(cl))) => {
            assert_eq!(cl.reply_code, 404, "{cl:?}");
        }
        other => panic!("channel.close expected, got {other:?}"),
    }
    assert_eq!(bodies_in(&mut other, &qb).await, vec![b"7".to_vec()]);
    delete_queue(&mut other, 1, &qa).await;
    delete_queue(&mut other, 1, &qb).await;
}

/// Publishes followed by queue.delete in one write: the consumer gets every message, in
/// order, before its queue goes, and delete-ok counts no message left (RabbitMQ's queue
/// process handles a channel's publishes and its delete in order, delivering on receipt).
/// Warren offers a burst of publishes to consumers once per read batch, so this checks that
/// any other command sees the queue as per-message dispatch would have left it.
#[tokio::test]
async fn publishes_then_delete_in_one_write_reach_the_consumer_first() {
    let t = target();
    let mut consumer = client_with_caps(&t, &["consumer_cancel_notify"]).await;
    let q = declare_queue(&mut consumer, 1, &uniq("q.burst-delete"), false).await;
    let tag = consume(&mut consumer, 1, &q, "", true).await;
    let mut publisher = client(&t).await;
    let mut bytes = Vec::new();
    for i in 0..50u32 {
        let body = format!("m{i}");
        bytes.extend(with_channel(publish_method("", &q, false, false), 1));
        bytes.extend(raw_frame(
            FRAME_HEADER,
            1,
            &header_payload(body.len() as u64, NO_PROPS),
        ));
        bytes.extend(raw_frame(FRAME_BODY, 1, body.as_bytes()));
    }
    let mut args = vec![0, 0]; // ticket
    put_shortstr(&mut args, &q);
    args.push(0); // if-unused, if-empty, nowait: all false
    bytes.extend(raw_frame(
        FRAME_METHOD,
        1,
        &raw_method_payload(50, 40, &args),
    ));
    publisher.send_bytes(&bytes).await.unwrap();
    let f = publisher.expect_method(1, 50, 41).await.unwrap();
    match f.method() {
        Some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok))) => {
            assert_eq!(ok.message_count, 0, "every message went to the consumer")
        }
        other => panic!("delete-ok expected, got {other:?}"),
    }
    for i in 0..50u32 {
        let m = read_message(&mut consumer, 1).await.unwrap();
        assert_eq!(m.body(), format!("m{i}").into_bytes(), "message {i}");
    }
    let f = consumer.read_frame(WAIT).await.unwrap();
    match f.method() {
        Some(AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel))) => {
            assert_eq!(cancel.consumer_tag.as_str(), tag)
        }
        other => panic!("basic.cancel expected after the messages, got {other:?}"),
    }
    publisher.close().await.unwrap();
    consumer.close().await.unwrap();
}
