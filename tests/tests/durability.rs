//! What survives a restart of the broker on the same data directory, and what does not.
//!
//! Every scenario runs twice, as `<scenario>::after_sigterm` (graceful: SIGTERM, exit 0, start
//! again) and `<scenario>::after_kill_9` (SIGKILL, start again). Across a `kill -9`, only what
//! the broker acknowledged is required to survive: definitions (recorded before declare-ok),
//! persistent messages on durable queues once confirmed, and acks once a later synchronous
//! method on the same channel was answered (see tests/tests/crash.rs for that invariant).
//!
//! Expected behaviour is RabbitMQ 3.10's, measured on Debian's 3.10.8 with the same steps
//! (graceful `rabbitmqctl shutdown` and `kill -9` of beam.smp):
//! - durable exchanges (any type, internal, auto-delete, with `alternate-exchange`), durable
//!   queues with their x-arguments, and bindings whose both ends are durable survive, also
//!   bindings from the predeclared `amq.*` exchanges;
//! - non-durable exchanges and queues, and exclusive queues (even durable ones), are gone;
//! - a durable auto-delete queue that never had a consumer survives both kinds of restart
//!   with its persistent messages. One that has a consumer when the broker stops is deleted by
//!   a graceful stop (the broker closes every connection, the last consumer goes, the queue
//!   goes), but after `kill -9` it comes back with its messages, and is deleted as soon as a
//!   new consumer comes and goes;
//! - transient messages are gone, persistent ones on durable queues come back in order with
//!   every property, exchange and routing key; those delivered but not acked have
//!   `redelivered = true`;
//! - purges and deletions are permanent: nothing purged or deleted comes back, and a queue or
//!   exchange declared again under the same name starts empty and unbound.
//!
//! Warren-only (kill -9 and restarts of the process): skipped under `AMQP_ADDR`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
};
use warren_tests::{consume_into_channel, skip_unless_warren, Broker};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// SIGTERM, wait for exit 0, start again.
    Graceful,
    /// SIGKILL, start again.
    Kill,
}

/// Generates `mod $name { after_sigterm, after_kill_9 }` calling `$name(Restart)`.
macro_rules! both_restarts {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn after_sigterm() {
                if skip_unless_warren("restarts the broker process") {
                    return;
                }
                super::$name(Restart::Graceful).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn after_kill_9() {
                if skip_unless_warren("kills and restarts the broker process") {
                    return;
                }
                super::$name(Restart::Kill).await;
            }
        }
    )*};
}

both_restarts!(
    exchanges,
    bindings,
    queue_arguments,
    non_durable_and_exclusive_objects,
    auto_delete_queues,
    messages,
    acked_and_unacked_messages,
    purge,
    delete,
    expired_queues,
    single_active_consumer,
    dead_lettered_messages,
    priority_queue,
    quorum_queue,
);

// ---- helpers ------------------------------------------------------------------------------

/// Stops the broker as `how` says and starts it again on the same port and data dir. The
/// blocking waits run in `block_in_place`, so that lapin keeps answering (a graceful stop
/// sends connection.close and waits for close-ok).
fn restart(broker: &mut Broker, how: Restart) {
    tokio::task::block_in_place(|| {
        match how {
            Restart::Graceful => {
                let status = broker
                    .stop_gracefully(Duration::from_secs(15))
                    .unwrap_or_else(|e| panic!("{e:#}\n{}", broker.logs()));
                assert!(
                    status.success(),
                    "warren exited with {status} after SIGTERM"
                );
            }
            Restart::Kill => broker.kill(),
        }
        broker
            .restart()
            .unwrap_or_else(|e| panic!("warren did not come back after {how:?}: {e:#}"));
    });
}

fn start() -> Broker {
    Broker::start().expect("start warren")
}

async fn connect(broker: &Broker) -> Connection {
    Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("lapin connect to port {}: {e}", broker.port()))
}

/// A channel in confirm mode.
async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

fn ss(s: &str) -> ShortString {
    ShortString::from(s)
}

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ss(k), v.clone());
    }
    t
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn transient() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(1)
}

/// The broker's reply code and text from a lapin error.
fn amqp_error(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        ErrorKind::ProtocolError(err) => (err.get_id(), err.get_message().to_string()),
        other => panic!("an AMQP error expected, got {other:?}"),
    }
}

async fn declare_queue(ch: &Channel, name: &str, opts: QueueDeclareOptions, args: FieldTable) {
    ch.queue_declare(ss(name), opts, args)
        .await
        .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    opts: ExchangeDeclareOptions,
    args: FieldTable,
) {
    ch.exchange_declare(ss(name), kind, opts, args)
        .await
        .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    ch.queue_bind(
        ss(queue),
        ss(exchange),
        ss(key),
        QueueBindOptions::default(),
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

/// Messages and consumers of a queue (passive declare on a fresh channel); None on 404.
async fn queue_state(conn: &Connection, name: &str) -> Option<(u32, u32)> {
    let ch = conn.create_channel().await.unwrap();
    match ch
        .queue_declare(
            ss(name),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(ok) => {
            let _ = ch.close(200, ss("bye")).await;
            Some((ok.message_count(), ok.consumer_count()))
        }
        Err(e) => {
            let (code, text) = amqp_error(&e);
            assert_eq!(code, 404, "passive declare of queue {name}: {text}");
            None
        }
    }
}

/// Message count of a queue that must exist.
async fn message_count(conn: &Connection, name: &str) -> u32 {
    queue_state(conn, name)
        .await
        .unwrap_or_else(|| panic!("queue {name} should exist"))
        .0
}

async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    match ch
        .exchange_declare(
            ss(name),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = ch.close(200, ss("bye")).await;
            true
        }
        Err(e) => {
            let (code, text) = amqp_error(&e);
            assert_eq!(code, 404, "passive declare of exchange {name}: {text}");
            false
        }
    }
}

/// Publishes on a confirm channel and waits for the broker's ack. Returns true when the
/// message was routed (mandatory: an unroutable one comes back as basic.return, then acked).
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> bool {
    let confirm = ch
        .basic_publish(
            ss(exchange),
            ss(key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
        .unwrap_or_else(|e| panic!("publish to {exchange:?}/{key:?}: {e}"));
    match tokio::time::timeout(WAIT, confirm)
        .await
        .unwrap_or_else(|_| panic!("no confirm within {WAIT:?} for {exchange:?}/{key:?}"))
        .unwrap()
    {
        Confirmation::Ack(returned) => returned.is_none(),
        other => panic!("publish to {exchange:?}/{key:?}: {other:?}, expected an ack"),
    }
}

/// Publishes and asserts the message was routed and confirmed.
async fn publish_routed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    assert!(
        publish(ch, exchange, key, body, props).await,
        "{exchange:?} with key {key:?} routed nowhere"
    );
}

/// Starts a consumer (manual ack) tagged `tag` and returns its first delivery; the consumer
/// stays until cancelled by that tag.
async fn consume_first(ch: &Channel, queue: &str, tag: &str) -> lapin::message::Delivery {
    let mut rx = consume_into_channel(ch, queue, tag).await.unwrap();
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// Every message of a queue through basic.get, acked (consumed).
async fn get_all(ch: &Channel, queue: &str) -> Vec<BasicGetMessage> {
    let mut out = Vec::new();
    loop {
        let got = ch
            .basic_get(ss(queue), BasicGetOptions { no_ack: false })
            .await
            .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"));
        let Some(m) = got else { break };
        ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        out.push(m);
        assert!(out.len() < 10_000, "{queue} does not end");
    }
    // The acks are settled once a later synchronous method is answered on this channel.
    ch.basic_qos(0, BasicQosOptions::default()).await.unwrap();
    out
}

fn bodies(msgs: &[BasicGetMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
        .collect()
}

/// Bodies of a queue's messages (consumed).
async fn drain_bodies(ch: &Channel, queue: &str) -> Vec<String> {
    bodies(&get_all(ch, queue).await)
}

/// The error a redeclaration with these properties gets, if any.
async fn redeclare_queue(
    conn: &Connection,
    name: &str,
    opts: QueueDeclareOptions,
    args: FieldTable,
) -> Result<u32, (u16, String)> {
    let ch = conn.create_channel().await.unwrap();
    match ch.queue_declare(ss(name), opts, args).await {
        Ok(ok) => {
            let _ = ch.close(200, ss("bye")).await;
            Ok(ok.message_count())
        }
        Err(e) => Err(amqp_error(&e)),
    }
}

async fn redeclare_exchange(
    conn: &Connection,
    name: &str,
    kind: ExchangeKind,
    opts: ExchangeDeclareOptions,
    args: FieldTable,
) -> Result<(), (u16, String)> {
    let ch = conn.create_channel().await.unwrap();
    match ch.exchange_declare(ss(name), kind, opts, args).await {
        Ok(()) => {
            let _ = ch.close(200, ss("bye")).await;
            Ok(())
        }
        Err(e) => Err(amqp_error(&e)),
    }
}

fn assert_inequivalent(what: &str, r: Result<impl std::fmt::Debug, (u16, String)>, arg: &str) {
    match r {
        Err((406, text)) => assert!(
            text.contains(&format!("inequivalent arg '{arg}'")),
            "{what}: 406 should name '{arg}': {text}"
        ),
        other => panic!("{what}: expected 406 inequivalent arg '{arg}', got {other:?}"),
    }
}

// ---- the harness ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_port_and_data_dir_and_appends_to_the_log() {
    if skip_unless_warren("restarts the broker process") {
        return;
    }
    let mut broker = start();
    let (port, data) = (broker.port(), broker.data_dir().to_path_buf());
    let pid = broker.pid();
    restart(&mut broker, Restart::Kill);
    restart(&mut broker, Restart::Graceful);
    assert_eq!(broker.port(), port);
    assert_eq!(broker.data_dir(), data);
    assert_ne!(broker.pid(), pid);
    assert_eq!(broker.starts(), 3);
    let logs = broker.logs();
    assert!(
        logs.contains("---- restart 1 ----") && logs.contains("---- restart 2 ----"),
        "{logs}"
    );
    // Answering AMQP means recovery is over: a client gets connection.start at once.
    assert!(warren_tests::broker::answers_amqp(
        broker.addr(),
        Duration::from_secs(1)
    ));
    // start_in: a data dir the test owns outlives the broker.
    let dir = tempfile::tempdir().unwrap();
    let mut a = Broker::start_in(&dir.path().join("data"), &[]).unwrap();
    let conn = connect(&a).await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "owned", durable_queue(), FieldTable::default()).await;
    a.kill();
    drop(a);
    let b = Broker::start_in(&dir.path().join("data"), &[]).unwrap();
    let conn = connect(&b).await;
    assert_eq!(queue_state(&conn, "owned").await, Some((0, 0)));
}

// ---- exchanges ----------------------------------------------------------------------------

struct ExchangeSpec {
    name: &'static str,
    kind: ExchangeKind,
    opts: ExchangeDeclareOptions,
    args: FieldTable,
}

fn exchange_specs() -> Vec<ExchangeSpec> {
    let d = durable_exchange();
    vec![
        ExchangeSpec {
            name: "dx-direct",
            kind: ExchangeKind::Direct,
            opts: d,
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-fanout",
            kind: ExchangeKind::Fanout,
            opts: d,
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-topic",
            kind: ExchangeKind::Topic,
            opts: d,
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-headers",
            kind: ExchangeKind::Headers,
            opts: d,
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-internal",
            kind: ExchangeKind::Topic,
            opts: ExchangeDeclareOptions {
                internal: true,
                ..d
            },
            args: FieldTable::default(),
        },
        // Never bound: an auto-delete exchange is only deleted when its last binding goes.
        ExchangeSpec {
            name: "dx-autodelete",
            kind: ExchangeKind::Fanout,
            opts: ExchangeDeclareOptions {
                auto_delete: true,
                ..d
            },
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-ae",
            kind: ExchangeKind::Fanout,
            opts: d,
            args: FieldTable::default(),
        },
        ExchangeSpec {
            name: "dx-with-ae",
            kind: ExchangeKind::Direct,
            opts: d,
            args: table(&[("alternate-exchange", ls("dx-ae"))]),
        },
    ]
}

async fn exchanges(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    for x in exchange_specs() {
        declare_exchange(&ch, x.name, x.kind.clone(), x.opts, x.args.clone()).await;
    }
    declare_exchange(
        &ch,
        "tx-direct",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    declare_queue(&ch, "dx-ae-q", durable_queue(), FieldTable::default()).await;
    bind(&ch, "dx-ae-q", "dx-ae", "", FieldTable::default()).await;

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    for x in exchange_specs() {
        assert!(
            exchange_exists(&conn, x.name).await,
            "{} after {how:?}",
            x.name
        );
        // Same type, flags and alternate-exchange: equivalent.
        redeclare_exchange(&conn, x.name, x.kind.clone(), x.opts, x.args.clone())
            .await
            .unwrap_or_else(|e| panic!("redeclaring {} identically after {how:?}: {e:?}", x.name));
        // Another type: the recovered one is compared.
        let other = match x.kind {
            ExchangeKind::Direct => ExchangeKind::Fanout,
            _ => ExchangeKind::Direct,
        };
        assert_inequivalent(
            &format!("{} redeclared as {other:?}", x.name),
            redeclare_exchange(&conn, x.name, other, x.opts, x.args.clone()).await,
            "type",
        );
    }
    let d = durable_exchange();
    assert_inequivalent(
        "dx-internal redeclared not internal",
        redeclare_exchange(
            &conn,
            "dx-internal",
            ExchangeKind::Topic,
            d,
            FieldTable::default(),
        )
        .await,
        "internal",
    );
    assert_inequivalent(
        "dx-autodelete redeclared not auto-delete",
        redeclare_exchange(
            &conn,
            "dx-autodelete",
            ExchangeKind::Fanout,
            d,
            FieldTable::default(),
        )
        .await,
        "auto_delete",
    );
    assert_inequivalent(
        "dx-direct redeclared transient",
        redeclare_exchange(
            &conn,
            "dx-direct",
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        "durable",
    );
    assert_inequivalent(
        "dx-with-ae redeclared without its alternate exchange",
        redeclare_exchange(
            &conn,
            "dx-with-ae",
            ExchangeKind::Direct,
            d,
            FieldTable::default(),
        )
        .await,
        "alternate-exchange",
    );
    assert!(
        !exchange_exists(&conn, "tx-direct").await,
        "a non-durable exchange survived {how:?}"
    );
    // The alternate exchange still catches what dx-with-ae cannot route.
    let ch = confirm_channel(&conn).await;
    publish_routed(&ch, "dx-with-ae", "nobody", b"to-ae", persistent()).await;
    assert_eq!(drain_bodies(&ch, "dx-ae-q").await, ["to-ae"]);
}

// ---- bindings -----------------------------------------------------------------------------

async fn bindings(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let d = durable_exchange();
    let none = FieldTable::default;
    declare_exchange(&ch, "bx-direct", ExchangeKind::Direct, d, none()).await;
    declare_exchange(&ch, "bx-fanout", ExchangeKind::Fanout, d, none()).await;
    declare_exchange(&ch, "bx-topic", ExchangeKind::Topic, d, none()).await;
    declare_exchange(&ch, "bx-headers", ExchangeKind::Headers, d, none()).await;
    declare_exchange(&ch, "bx-src", ExchangeKind::Direct, d, none()).await;
    declare_exchange(&ch, "bx-dst", ExchangeKind::Fanout, d, none()).await;
    for q in [
        "bq-direct",
        "bq-fanout",
        "bq-topic",
        "bq-headers",
        "bq-e2e",
        "bq-amq",
    ] {
        declare_queue(&ch, q, durable_queue(), none()).await;
    }
    // A non-durable queue: its binding is not durable either.
    declare_queue(&ch, "bq-transient", QueueDeclareOptions::default(), none()).await;
    bind(&ch, "bq-direct", "bx-direct", "k", none()).await;
    bind(&ch, "bq-transient", "bx-direct", "t", none()).await;
    bind(&ch, "bq-fanout", "bx-fanout", "", none()).await;
    bind(&ch, "bq-topic", "bx-topic", "a.*.c", none()).await;
    bind(
        &ch,
        "bq-headers",
        "bx-headers",
        "",
        table(&[("x-match", ls("any")), ("h", ls("v"))]),
    )
    .await;
    ch.exchange_bind(
        ss("bx-dst"),
        ss("bx-src"),
        ss("e2e"),
        ExchangeBindOptions::default(),
        none(),
    )
    .await
    .unwrap();
    bind(&ch, "bq-e2e", "bx-dst", "", none()).await;
    bind(&ch, "bq-amq", "amq.direct", "amq-key", none()).await;
    // Bound, then unbound: must not come back.
    bind(&ch, "bq-direct", "bx-direct", "unbound", none()).await;
    ch.queue_unbind(ss("bq-direct"), ss("bx-direct"), ss("unbound"), none())
        .await
        .unwrap();

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    // The non-durable queue is gone; a new one under its name gets no old binding.
    assert_eq!(queue_state(&conn, "bq-transient").await, None);
    declare_queue(&ch, "bq-transient", QueueDeclareOptions::default(), none()).await;

    let routed = [
        ("bx-direct", "k", None, "bq-direct"),
        ("", "bq-direct", None, "bq-direct"),
        ("bx-fanout", "anything", None, "bq-fanout"),
        ("bx-topic", "a.b.c", None, "bq-topic"),
        ("bx-headers", "", Some(("h", "v")), "bq-headers"),
        ("bx-src", "e2e", None, "bq-e2e"),
        ("amq.direct", "amq-key", None, "bq-amq"),
    ];
    for (exchange, key, header, queue) in routed {
        let mut props = persistent();
        if let Some((h, v)) = header {
            props = props.with_headers(table(&[(h, ls(v))]));
        }
        let body = format!("{exchange}/{key}");
        publish_routed(&ch, exchange, key, body.as_bytes(), props).await;
        assert_eq!(
            drain_bodies(&ch, queue).await,
            [body],
            "{exchange:?} with key {key:?} after {how:?}"
        );
    }
    let unroutable = [
        ("bx-direct", "unbound", None),
        ("bx-direct", "t", None),
        ("bx-topic", "a.b.d", None),
        ("bx-headers", "", Some(("h", "w"))),
        ("bx-src", "other", None),
    ];
    for (exchange, key, header) in unroutable {
        let mut props = persistent();
        if let Some((h, v)) = header {
            props = props.with_headers(table(&[(h, ls(v))]));
        }
        assert!(
            !publish(&ch, exchange, key, b"x", props).await,
            "{exchange:?} with key {key:?} {header:?} should route nowhere after {how:?}"
        );
    }
    for q in [
        "bq-direct",
        "bq-fanout",
        "bq-topic",
        "bq-headers",
        "bq-e2e",
        "bq-amq",
        "bq-transient",
    ] {
        assert_eq!(message_count(&conn, q).await, 0, "{q}");
    }
}

// ---- queue arguments ----------------------------------------------------------------------

fn misc_args() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("x-message-ttl", AMQPValue::LongInt(3_600_000)),
        ("x-expires", AMQPValue::LongInt(86_400_000)),
        ("x-dead-letter-exchange", ls("dlx")),
        ("x-dead-letter-routing-key", ls("dead")),
        ("x-max-priority", AMQPValue::ShortShortUInt(5)),
        ("x-queue-mode", ls("lazy")),
        ("x-max-length-bytes", AMQPValue::LongLongInt(1 << 30)),
    ]
}

async fn queue_arguments(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let maxlen = table(&[("x-max-length", AMQPValue::LongInt(2))]);
    let reject = table(&[
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", ls("reject-publish")),
    ]);
    declare_queue(&ch, "qa-maxlen", durable_queue(), maxlen.clone()).await;
    declare_queue(&ch, "qa-reject", durable_queue(), reject.clone()).await;
    declare_queue(&ch, "qa-misc", durable_queue(), table(&misc_args())).await;
    publish_routed(&ch, "", "qa-maxlen", b"a", persistent()).await;
    publish_routed(&ch, "", "qa-maxlen", b"b", persistent()).await;

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    // Identical arguments: equivalent. Each one changed or missing: 406 naming it.
    assert_eq!(
        redeclare_queue(&conn, "qa-maxlen", durable_queue(), maxlen).await,
        Ok(2)
    );
    assert_inequivalent(
        "qa-maxlen with x-max-length 3",
        redeclare_queue(
            &conn,
            "qa-maxlen",
            durable_queue(),
            table(&[("x-max-length", AMQPValue::LongInt(3))]),
        )
        .await,
        "x-max-length",
    );
    assert_eq!(
        redeclare_queue(&conn, "qa-reject", durable_queue(), reject).await,
        Ok(0)
    );
    assert_inequivalent(
        "qa-reject without x-overflow",
        redeclare_queue(
            &conn,
            "qa-reject",
            durable_queue(),
            table(&[("x-max-length", AMQPValue::LongInt(1))]),
        )
        .await,
        "x-overflow",
    );
    assert_eq!(
        redeclare_queue(&conn, "qa-misc", durable_queue(), table(&misc_args())).await,
        Ok(0)
    );
    for (i, (key, _)) in misc_args().iter().enumerate() {
        let mut fewer = misc_args();
        fewer.remove(i);
        assert_inequivalent(
            &format!("qa-misc without {key}"),
            redeclare_queue(&conn, "qa-misc", durable_queue(), table(&fewer)).await,
            key,
        );
    }
    assert_inequivalent(
        "qa-misc redeclared transient",
        redeclare_queue(
            &conn,
            "qa-misc",
            QueueDeclareOptions::default(),
            table(&misc_args()),
        )
        .await,
        "durable",
    );

    // The limits still apply, counting the recovered messages.
    let ch = confirm_channel(&conn).await;
    publish_routed(&ch, "", "qa-maxlen", b"c", persistent()).await;
    assert_eq!(
        drain_bodies(&ch, "qa-maxlen").await,
        ["b", "c"],
        "drop-head"
    );
    publish_routed(&ch, "", "qa-reject", b"1", persistent()).await;
    let confirm = ch
        .basic_publish(
            ss(""),
            ss("qa-reject"),
            BasicPublishOptions::default(),
            b"2",
            persistent(),
        )
        .await
        .unwrap();
    let confirm = tokio::time::timeout(WAIT, confirm).await.unwrap().unwrap();
    assert!(
        confirm.is_nack(),
        "reject-publish after {how:?}: {confirm:?}"
    );
    assert_eq!(drain_bodies(&ch, "qa-reject").await, ["1"]);
}

// ---- non-durable and exclusive objects ------------------------------------------------------

async fn non_durable_and_exclusive_objects(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let none = FieldTable::default;
    declare_queue(&ch, "nd-queue", QueueDeclareOptions::default(), none()).await;
    declare_queue(
        &ch,
        "nd-exclusive",
        QueueDeclareOptions {
            durable: true,
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        none(),
    )
    .await;
    let server_named_exclusive = ch
        .queue_declare(
            ss(""),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            none(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    // A server-named durable queue that is not exclusive is an ordinary durable queue.
    let server_named_durable = ch
        .queue_declare(ss(""), durable_queue(), none())
        .await
        .unwrap()
        .name()
        .to_string();
    declare_exchange(
        &ch,
        "nd-exchange",
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        none(),
    )
    .await;
    for q in ["nd-queue", "nd-exclusive", &server_named_durable] {
        publish_routed(&ch, "", q, b"persistent", persistent()).await;
    }

    // The declaring connection stays open across the restart.
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    for q in ["nd-queue", "nd-exclusive", &server_named_exclusive] {
        assert_eq!(queue_state(&conn, q).await, None, "{q} survived {how:?}");
    }
    assert!(!exchange_exists(&conn, "nd-exchange").await);
    assert_eq!(
        queue_state(&conn, &server_named_durable).await,
        Some((1, 0))
    );
    // Declared again, they start empty (no message comes back from the old ones), and the
    // exclusive one is not locked by a dead connection.
    assert_eq!(
        redeclare_queue(&conn, "nd-queue", QueueDeclareOptions::default(), none()).await,
        Ok(0)
    );
    assert_eq!(
        redeclare_queue(&conn, "nd-exclusive", durable_queue(), none()).await,
        Ok(0)
    );
}

// ---- auto-delete queues -------------------------------------------------------------------

async fn auto_delete_queues(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let opts = QueueDeclareOptions {
        durable: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let none = FieldTable::default;
    for q in ["ad-never", "ad-consumed", "ad-cancelled"] {
        declare_queue(&ch, q, opts, none()).await;
        publish_routed(&ch, "", q, q.as_bytes(), persistent()).await;
    }
    // ad-cancelled: a consumer comes and goes, so the queue is deleted before the restart.
    let consumer_ch = conn.create_channel().await.unwrap();
    let c = consumer_ch
        .basic_consume(
            ss("ad-cancelled"),
            ss("gone"),
            BasicConsumeOptions::default(),
            none(),
        )
        .await
        .unwrap();
    consumer_ch
        .basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert_eq!(queue_state(&conn, "ad-cancelled").await, None);
    // ad-consumed: a consumer is attached (its message delivered, unacked) at the restart.
    let d = consume_first(&consumer_ch, "ad-consumed", "stays").await;
    assert_eq!(d.data, b"ad-consumed");
    // The delivery reached the client: the broker has marked it delivered.

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        queue_state(&conn, "ad-never").await,
        Some((1, 0)),
        "a never-consumed durable auto-delete queue survives {how:?} with its message"
    );
    assert_eq!(queue_state(&conn, "ad-cancelled").await, None);
    match how {
        Restart::Graceful => assert_eq!(
            queue_state(&conn, "ad-consumed").await,
            None,
            "a graceful stop closes the connections: the last consumer goes, so does the queue"
        ),
        Restart::Kill => {
            assert_eq!(queue_state(&conn, "ad-consumed").await, Some((1, 0)));
            // The next consumer gets the message, redelivered; when it goes, the queue goes.
            let ch = conn.create_channel().await.unwrap();
            let d = consume_first(&ch, "ad-consumed", "next").await;
            assert_eq!(d.data, b"ad-consumed");
            assert!(d.redelivered, "delivered before the crash: redelivered");
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .unwrap();
            ch.basic_cancel(ss("next"), BasicCancelOptions::default())
                .await
                .unwrap();
            assert_eq!(queue_state(&conn, "ad-consumed").await, None);
        }
    }
    // Still there after a second restart of the same kind.
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(queue_state(&conn, "ad-never").await, Some((1, 0)));
    assert_eq!(queue_state(&conn, "ad-consumed").await, None);
}

// ---- messages -----------------------------------------------------------------------------

fn full_properties(i: u8) -> BasicProperties {
    persistent()
        .with_content_type(ss("application/octet-stream"))
        .with_content_encoding(ss("identity"))
        .with_headers(table(&[
            ("i", AMQPValue::LongLongInt(i64::from(i))),
            ("s", ls("header value")),
            ("f", AMQPValue::Double(0.25)),
            (
                "nested",
                AMQPValue::FieldTable(table(&[("b", AMQPValue::Boolean(true))])),
            ),
        ]))
        .with_priority(3)
        .with_correlation_id(ss(&format!("corr-{i}")))
        .with_reply_to(ss("reply-queue"))
        .with_message_id(ss(&format!("msg-{i}")))
        .with_timestamp(1_700_000_000 + u64::from(i))
        .with_type(ss("kind"))
        .with_user_id(ss("guest"))
        .with_app_id(ss("durability-test"))
}

/// 1 MiB + a little: several body frames, and a record far bigger than most.
fn big_body() -> Vec<u8> {
    (0..(1 << 20) + 123).map(|i: u32| (i % 251) as u8).collect()
}

async fn messages(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let none = FieldTable::default;
    declare_exchange(&ch, "mx", ExchangeKind::Direct, durable_exchange(), none()).await;
    declare_queue(&ch, "mq", durable_queue(), none()).await;
    bind(&ch, "mq", "mx", "mk", none()).await;
    declare_queue(
        &ch,
        "mq-transient-queue",
        QueueDeclareOptions::default(),
        none(),
    )
    .await;
    // Persistent and transient interleaved, through the default exchange and through mx.
    publish_routed(&ch, "", "mq", b"p0", full_properties(0)).await;
    publish_routed(&ch, "", "mq", b"t0", transient()).await;
    publish_routed(&ch, "mx", "mk", b"p1", full_properties(1)).await;
    publish_routed(&ch, "mx", "mk", b"t1", BasicProperties::default()).await;
    publish_routed(&ch, "", "mq", &big_body(), persistent()).await;
    publish_routed(&ch, "", "mq", b"p3", full_properties(3)).await;
    publish_routed(&ch, "", "mq-transient-queue", b"lost", persistent()).await;

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(queue_state(&conn, "mq-transient-queue").await, None);
    assert_eq!(message_count(&conn, "mq").await, 4, "persistent ones only");
    // Recovered state survives another restart as it is.
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let got = get_all(&ch, "mq").await;
    assert_eq!(got.len(), 4);
    let expect: [(&[u8], &str, &str, Option<u8>); 4] = [
        (b"p0", "", "mq", Some(0)),
        (b"p1", "mx", "mk", Some(1)),
        (&big_body(), "", "mq", None),
        (b"p3", "", "mq", Some(3)),
    ];
    for (m, (body, exchange, key, props)) in got.iter().zip(expect) {
        let d = &m.delivery;
        assert!(
            d.data == body,
            "body of {:?} changed",
            String::from_utf8_lossy(&body[..2])
        );
        assert_eq!(d.exchange.as_str(), exchange);
        assert_eq!(d.routing_key.as_str(), key);
        assert!(!d.redelivered, "never delivered before the restart");
        match props {
            Some(i) => assert_eq!(d.properties, full_properties(i), "properties of p{i}"),
            None => assert_eq!(d.properties, persistent()),
        }
    }
}

async fn acked_and_unacked_messages(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "aq", durable_queue(), FieldTable::default()).await;
    for i in 0..6 {
        publish_routed(&ch, "", "aq", format!("m{i}").as_bytes(), persistent()).await;
    }
    let get = |ch: Channel| async move {
        ch.basic_get(ss("aq"), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message")
    };
    let consumer = conn.create_channel().await.unwrap();
    let m0 = get(consumer.clone()).await;
    let m1 = get(consumer.clone()).await;
    let m2 = get(consumer.clone()).await;
    assert_eq!(m0.delivery.data, b"m0");
    consumer
        .basic_ack(m0.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    consumer
        .basic_ack(m2.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    // m1 stays unacked. The qos-ok proves the broker handled both acks.
    consumer
        .basic_qos(0, BasicQosOptions::default())
        .await
        .unwrap();
    assert_eq!(m1.delivery.data, b"m1");

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let got = get_all(&ch, "aq").await;
    let seen: Vec<(String, bool)> = got
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(&m.delivery.data).into_owned(),
                m.delivery.redelivered,
            )
        })
        .collect();
    let expect: Vec<(String, bool)> = [("m1", true), ("m3", false), ("m4", false), ("m5", false)]
        .iter()
        .map(|(b, r)| (b.to_string(), *r))
        .collect();
    assert_eq!(seen, expect, "(body, redelivered) after {how:?}");
    // Acked after the restart: gone for good.
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(message_count(&conn, "aq").await, 0);
}

// ---- purge and delete ---------------------------------------------------------------------

async fn purge(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let none = FieldTable::default;
    for q in ["pq", "pq-held"] {
        declare_queue(&ch, q, durable_queue(), none()).await;
        for i in 0..10 {
            publish_routed(&ch, "", q, format!("{q}-{i}").as_bytes(), persistent()).await;
        }
    }
    // pq-held: one message is out (unacked) during the purge; only the 9 ready ones go.
    let holder = conn.create_channel().await.unwrap();
    let held = holder
        .basic_get(ss("pq-held"), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(held.delivery.data, b"pq-held-0");
    assert_eq!(
        ch.queue_purge(ss("pq"), QueuePurgeOptions::default())
            .await
            .unwrap(),
        10
    );
    assert_eq!(
        ch.queue_purge(ss("pq-held"), QueuePurgeOptions::default())
            .await
            .unwrap(),
        9
    );
    // Restart at once: purge-ok was received, so the purge must stick.
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    assert_eq!(
        message_count(&conn, "pq").await,
        0,
        "purged messages came back after {how:?}"
    );
    let got = get_all(&ch, "pq-held").await;
    assert_eq!(
        bodies(&got),
        ["pq-held-0"],
        "after a purge with one message unacked and {how:?}"
    );
    assert!(got[0].delivery.redelivered);
}

async fn delete(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let none = FieldTable::default;
    let d = durable_exchange();
    declare_exchange(&ch, "del-x", ExchangeKind::Direct, d, none()).await;
    declare_exchange(&ch, "del-src", ExchangeKind::Direct, d, none()).await;
    declare_queue(&ch, "del-q", durable_queue(), none()).await;
    declare_queue(&ch, "del-kept", durable_queue(), none()).await;
    bind(&ch, "del-q", "del-x", "k", none()).await;
    bind(&ch, "del-kept", "del-src", "k", none()).await;
    for i in 0..5 {
        publish_routed(
            &ch,
            "del-x",
            "k",
            format!("old-{i}").as_bytes(),
            persistent(),
        )
        .await;
    }
    // An auto-delete exchange goes with its last binding, here when its queue is deleted.
    declare_exchange(
        &ch,
        "del-autodelete-x",
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..d
        },
        none(),
    )
    .await;
    declare_queue(&ch, "del-autodelete-q", durable_queue(), none()).await;
    bind(&ch, "del-autodelete-q", "del-autodelete-x", "", none()).await;
    assert_eq!(
        ch.queue_delete(ss("del-q"), QueueDeleteOptions::default())
            .await
            .unwrap(),
        5
    );
    ch.exchange_delete(ss("del-src"), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    ch.queue_delete(ss("del-autodelete-q"), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(
        !exchange_exists(&conn, "del-autodelete-x").await,
        "an auto-delete exchange goes with its last binding"
    );

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        queue_state(&conn, "del-q").await,
        None,
        "deleted queue back after {how:?}"
    );
    assert!(
        !exchange_exists(&conn, "del-src").await,
        "deleted exchange back after {how:?}"
    );
    assert!(!exchange_exists(&conn, "del-autodelete-x").await);
    assert_eq!(queue_state(&conn, "del-autodelete-q").await, None);
    assert_eq!(message_count(&conn, "del-kept").await, 0);
    // Declared again: empty, and without the old bindings.
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "del-q", durable_queue(), none()).await;
    assert_eq!(
        message_count(&conn, "del-q").await,
        0,
        "old messages in a new queue"
    );
    assert!(
        !publish(&ch, "del-x", "k", b"new", persistent()).await,
        "the deleted queue's binding came back"
    );
    declare_exchange(&ch, "del-src", ExchangeKind::Direct, d, none()).await;
    assert!(
        !publish(&ch, "del-src", "k", b"new", persistent()).await,
        "the deleted exchange's binding came back"
    );
    // The new queue works and persists on its own.
    publish_routed(&ch, "", "del-q", b"new", persistent()).await;
    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    assert_eq!(drain_bodies(&ch, "del-q").await, ["new"]);
}

/// Publishes without confirms never waited for still reach the disk on a graceful stop (the
/// final sync), as soon as the broker has handled them: here proven by a passive declare on
/// the same channel that counts them, right before SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_persistent_messages_survive_sigterm() {
    if skip_unless_warren("restarts the broker process") {
        return;
    }
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "uq", durable_queue(), FieldTable::default()).await;
    for i in 0..1000 {
        ch.basic_publish(
            ss(""),
            ss("uq"),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    let ok = ch
        .queue_declare(
            ss("uq"),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 1000);
    restart(&mut broker, Restart::Graceful);
    let conn = connect(&broker).await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(drain_bodies(&ch, "uq").await, names(0..1000));
}

// ---- torn files after kill -9 -------------------------------------------------------------

/// The only queue store directory under the data dir (these tests declare one durable queue).
fn only_queue_dir(data: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(data.join("queues"))
        .expect("a queues directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one queue store expected: {dirs:?}");
    dirs.into_iter().next().unwrap()
}

/// The file of `dir` with the given prefix and the highest segment id.
fn last_file(dir: &Path, prefix: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    files.sort();
    files
        .pop()
        .unwrap_or_else(|| panic!("no {prefix}* file in {}", dir.display()))
}

fn truncate_by(path: &Path, bytes: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    assert!(len > bytes, "{} has only {len} bytes", path.display());
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len - bytes).unwrap();
    f.sync_all().unwrap();
}

fn append_zeros(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(&vec![0u8; bytes]).unwrap();
    f.sync_all().unwrap();
}

/// A durable queue `tq` with `n` confirmed persistent messages `m0..`, then kill -9.
async fn killed_with_messages(n: usize) -> Broker {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "tq", durable_queue(), FieldTable::default()).await;
    for i in 0..n {
        publish_routed(&ch, "", "tq", format!("m{i}").as_bytes(), persistent()).await;
    }
    broker.kill();
    broker
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

fn restart_after_edit(broker: &mut Broker, what: &str) {
    tokio::task::block_in_place(|| {
        broker
            .restart()
            .unwrap_or_else(|e| panic!("warren must boot despite {what}: {e:#}"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_segment_tail_is_cut_and_the_intact_messages_come_back() {
    if skip_unless_warren("kills the broker and edits its files") {
        return;
    }
    let mut broker = killed_with_messages(20).await;
    let segment = last_file(&only_queue_dir(broker.data_dir()), "msgs.");
    // The last record loses its last 7 bytes, as if the crash had cut the write.
    truncate_by(&segment, 7);
    restart_after_edit(&mut broker, "a torn segment tail");
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    assert_eq!(message_count(&conn, "tq").await, 19);
    // New messages after the cut go on, and survive another crash.
    publish_routed(&ch, "", "tq", b"after", persistent()).await;
    restart(&mut broker, Restart::Kill);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let mut expect = names(0..19);
    expect.push("after".into());
    assert_eq!(drain_bodies(&ch, "tq").await, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_filled_segment_tail_is_ignored() {
    if skip_unless_warren("kills the broker and edits its files") {
        return;
    }
    let mut broker = killed_with_messages(10).await;
    let segment = last_file(&only_queue_dir(broker.data_dir()), "msgs.");
    // A file extended but never written, as some file systems show after a power loss.
    append_zeros(&segment, 4096);
    restart_after_edit(&mut broker, "a zero-filled segment tail");
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    assert_eq!(drain_bodies(&ch, "tq").await, names(0..10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_ack_file_tail_loses_only_the_torn_ack() {
    if skip_unless_warren("kills the broker and edits its files") {
        return;
    }
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "tq", durable_queue(), FieldTable::default()).await;
    for i in 0..20 {
        publish_routed(&ch, "", "tq", format!("m{i}").as_bytes(), persistent()).await;
    }
    // m0..m4 delivered and acked, one at a time; the qos-ok settles the acks.
    let consumer = conn.create_channel().await.unwrap();
    for i in 0..5 {
        let m = consumer
            .basic_get(ss("tq"), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(m.delivery.data, format!("m{i}").as_bytes());
        consumer
            .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
    }
    consumer
        .basic_qos(0, BasicQosOptions::default())
        .await
        .unwrap();
    broker.kill();
    let acks = last_file(&only_queue_dir(broker.data_dir()), "acks.");
    // The last entry (m4's ack; its delivery mark comes before it) loses 3 of its 8 bytes.
    truncate_by(&acks, 3);
    restart_after_edit(&mut broker, "a torn ack file tail");
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let got = get_all(&ch, "tq").await;
    assert_eq!(bodies(&got), names(4..20), "only m4's torn ack is lost");
    assert!(got[0].delivery.redelivered, "m4 had been delivered");
    assert!(got[1..].iter().all(|m| !m.delivery.redelivered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_definitions_tail_loses_only_the_last_definition() {
    if skip_unless_warren("kills the broker and edits its files") {
        return;
    }
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "defs-first", durable_queue(), FieldTable::default()).await;
    publish_routed(&ch, "", "defs-first", b"kept", persistent()).await;
    declare_queue(&ch, "defs-last", durable_queue(), FieldTable::default()).await;
    broker.kill();
    truncate_by(
        &broker
            .data_dir()
            .join("definitions")
            .join("definitions.log"),
        3,
    );
    restart_after_edit(&mut broker, "a torn definitions log tail");
    let conn = connect(&broker).await;
    assert_eq!(queue_state(&conn, "defs-first").await, Some((1, 0)));
    assert_eq!(queue_state(&conn, "defs-last").await, None);
    // Declared again, it works and persists.
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "defs-last", durable_queue(), FieldTable::default()).await;
    publish_routed(&ch, "", "defs-last", b"again", persistent()).await;
    restart(&mut broker, Restart::Kill);
    let conn = connect(&broker).await;
    assert_eq!(queue_state(&conn, "defs-last").await, Some((1, 0)));
    assert_eq!(queue_state(&conn, "defs-first").await, Some((1, 0)));
}

/// A durable queue past its `x-expires` is deleted with its messages and its bindings, and
/// stays deleted after a restart; one whose lease has not run out comes back with its
/// messages, and its clock starts again at the restart.
async fn expired_queues(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let short = table(&[("x-expires", AMQPValue::LongInt(300))]);
    let long = table(&[("x-expires", AMQPValue::LongInt(600_000))]);
    declare_exchange(
        &ch,
        "exp-x",
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await;
    declare_queue(&ch, "exp-short", durable_queue(), short).await;
    declare_queue(&ch, "exp-long", durable_queue(), long).await;
    bind(&ch, "exp-short", "exp-x", "", FieldTable::default()).await;
    bind(&ch, "exp-long", "exp-x", "", FieldTable::default()).await;
    for i in 0..3 {
        publish_routed(&ch, "exp-x", "", format!("m{i}").as_bytes(), persistent()).await;
    }
    // Each look is a passive declare, which renews the lease: leave a quiet second before
    // each one (300 ms of lease plus the broker's 200 ms housekeeping tick).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if queue_state(&conn, "exp-short").await.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exp-short (x-expires 300 ms, unused) still exists after {WAIT:?}"
        );
    }
    assert_eq!(queue_state(&conn, "exp-short").await, None);
    assert_eq!(message_count(&conn, "exp-long").await, 3);

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        queue_state(&conn, "exp-short").await,
        None,
        "an expired queue came back after {how:?}"
    );
    assert_eq!(message_count(&conn, "exp-long").await, 3);
    // The fanout reaches only the queue that is left.
    let ch = confirm_channel(&conn).await;
    publish_routed(&ch, "exp-x", "", b"after", persistent()).await;
    assert_eq!(message_count(&conn, "exp-long").await, 4);
    assert_eq!(queue_state(&conn, "exp-short").await, None);
}

/// A recovered durable queue is still a single-active-consumer queue: of two consumers, only
/// the first registered gets the recovered messages, and the second takes over when it goes.
async fn single_active_consumer(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let sac = table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]);
    declare_queue(&ch, "sac-q", durable_queue(), sac.clone()).await;
    for i in 0..4 {
        publish_routed(&ch, "", "sac-q", format!("m{i}").as_bytes(), persistent()).await;
    }

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        redeclare_queue(&conn, "sac-q", durable_queue(), sac).await,
        Ok(4)
    );
    let first_ch = conn.create_channel().await.unwrap();
    let second_ch = conn.create_channel().await.unwrap();
    let mut first = consume_into_channel(&first_ch, "sac-q", "first")
        .await
        .unwrap();
    let mut second = consume_into_channel(&second_ch, "sac-q", "second")
        .await
        .unwrap();
    let expected: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(WAIT, first.recv())
            .await
            .expect("the active consumer got the recovered messages")
            .unwrap();
        got.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    assert_eq!(got, expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        second.try_recv().is_err(),
        "the standby consumer got a message"
    );
    // The first goes with its 4 unacked messages: they go back and to the second.
    first_ch.close(200, ss("bye")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(WAIT, second.recv())
            .await
            .expect("the next consumer took over")
            .unwrap();
        assert!(d.redelivered);
        got.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    assert_eq!(got, expected);
}

/// Persistent messages dead-lettered from a durable queue into a durable one are in the
/// second queue after a restart, with their `x-death` history, and no longer in the first.
/// Dead-lettering is at most once, as in RabbitMQ (nothing confirms it); the background sync
/// (every 200 ms) writes both queues' stores, so a kill -9 a second later loses nothing.
async fn dead_lettered_messages(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    declare_exchange(
        &ch,
        "dl-x",
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await;
    declare_queue(&ch, "dl-q", durable_queue(), FieldTable::default()).await;
    bind(&ch, "dl-q", "dl-x", "", FieldTable::default()).await;
    let source_args = table(&[("x-dead-letter-exchange", ls("dl-x"))]);
    declare_queue(&ch, "dl-src", durable_queue(), source_args).await;
    for i in 0..4 {
        publish_routed(&ch, "", "dl-src", format!("m{i}").as_bytes(), persistent()).await;
    }
    // Reject m0..m2 without requeue; m3 stays in the source.
    for _ in 0..3 {
        let m = ch
            .basic_get(ss("dl-src"), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        ch.basic_reject(
            m.delivery.delivery_tag,
            BasicRejectOptions { requeue: false },
        )
        .await
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while message_count(&conn, "dl-q").await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rejected messages did not reach dl-q"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    assert_eq!(drain_bodies(&ch, "dl-src").await, vec!["m3".to_string()]);
    let got = get_all(&ch, "dl-q").await;
    assert_eq!(bodies(&got), vec!["m0", "m1", "m2"], "after {how:?}");
    for m in &got {
        assert_eq!(m.delivery.exchange.as_str(), "dl-x");
        assert_eq!(m.delivery.routing_key.as_str(), "dl-src");
        let headers = m.properties.headers().clone().expect("headers");
        let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
            panic!("no x-death after {how:?}: {headers:?}");
        };
        let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
            panic!("x-death is empty: {deaths:?}");
        };
        assert_eq!(death.inner().get("reason"), Some(&ls("rejected")));
        assert_eq!(death.inner().get("queue"), Some(&ls("dl-src")));
        assert_eq!(m.properties.delivery_mode(), &Some(2));
    }
}

/// A durable priority queue comes back with its persistent messages in priority order (the
/// priority is kept in each stored record), and requeues still go back to their level.
async fn priority_queue(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let args = table(&[("x-max-priority", AMQPValue::ShortShortUInt(9))]);
    declare_queue(&ch, "prio-q", durable_queue(), args.clone()).await;
    for (body, priority) in [
        ("a1", 1),
        ("b9", 9),
        ("c0", 0),
        ("d5", 5),
        ("e9", 9),
        ("f200", 200),
    ] {
        let props = persistent().with_priority(priority);
        publish_routed(&ch, "", "prio-q", body.as_bytes(), props).await;
    }

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        redeclare_queue(&conn, "prio-q", durable_queue(), args).await,
        Ok(6)
    );
    let ch = confirm_channel(&conn).await;
    // The first two out, back again: they keep their place in front of f200 (priority 9 too).
    let mut tags = Vec::new();
    for expected in ["b9", "e9"] {
        let m = ch
            .basic_get(ss("prio-q"), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(m.delivery.data, expected.as_bytes(), "after {how:?}");
        tags.push(m.delivery.delivery_tag);
    }
    ch.basic_reject(tags[0], BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    ch.basic_reject(tags[1], BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    assert_eq!(
        drain_bodies(&ch, "prio-q").await,
        ["b9", "e9", "f200", "d5", "a1", "c0"],
        "after {how:?}"
    );
}

/// A quorum queue keeps every message, transient ones too, once confirmed; it comes back
/// with its type (a redeclare as classic is inequivalent) and its delivery limit.
async fn quorum_queue(how: Restart) {
    let mut broker = start();
    let conn = connect(&broker).await;
    let ch = confirm_channel(&conn).await;
    let args = table(&[
        ("x-queue-type", ls("quorum")),
        ("x-delivery-limit", AMQPValue::LongInt(0)),
    ]);
    declare_queue(&ch, "qq", durable_queue(), args.clone()).await;
    publish_routed(&ch, "", "qq", b"transient", transient()).await;
    publish_routed(&ch, "", "qq", b"persistent", persistent()).await;

    restart(&mut broker, how);
    let conn = connect(&broker).await;
    assert_eq!(
        redeclare_queue(&conn, "qq", durable_queue(), args).await,
        Ok(2),
        "after {how:?}"
    );
    let (code, text) = redeclare_queue(&conn, "qq", durable_queue(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("inequivalent arg 'x-queue-type'"), "{text}");
    // Delivery limit 0: the first return removes the message (no dead-letter exchange).
    let ch = confirm_channel(&conn).await;
    let m = ch
        .basic_get(ss("qq"), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(m.delivery.data, b"transient");
    assert_eq!(m.properties.delivery_mode(), &Some(1));
    ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    )
    .await
    .unwrap();
    assert_eq!(drain_bodies(&ch, "qq").await, ["persistent"]);
}
