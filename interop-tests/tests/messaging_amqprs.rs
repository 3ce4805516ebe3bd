//! Messaging with amqprs against Warren, or against `AMQP_ADDR` (a RabbitMQ from
//! `scripts/rabbitmq.sh`): publish/consume/ack, confirms (ack and nack), qos, get, nack/requeue,
//! exclusive queues (405), server-sent basic.cancel, and a smaller scale run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, Channel, ConfirmSelectArguments, ConsumerMessage,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use tokio::sync::mpsc;
use warren_tests::Target;

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
    let addr = target.addr();
    let args = OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest");
    Connection::open(&args)
        .await
        .unwrap_or_else(|e| panic!("amqprs connect to {}: {e}", target.describe()))
}

/// What the broker sent asynchronously on a channel.
#[derive(Debug, Default)]
struct Events {
    closes: Vec<(u16, String)>,
    cancels: Vec<String>,
    acks: Vec<(u64, bool)>,
    nacks: Vec<(u64, bool)>,
    returns: Vec<(u16, String)>,
}

/// A ChannelCallback recording into `Events` (written out by hand: amqprs uses async-trait,
/// which this crate does not depend on; this is its expansion).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Events>>);

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl ChannelCallback for Recorder {
    fn close<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        close: CloseChannel,
    ) -> BoxFut<'at, Result<(), amqprs::error::Error>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .closes
                .push((close.reply_code(), close.reply_text().clone()));
            Ok(())
        })
    }

    fn cancel<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        cancel: Cancel,
    ) -> BoxFut<'at, Result<(), amqprs::error::Error>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .cancels
                .push(cancel.consumer_tag().clone());
            Ok(())
        })
    }

    fn flow<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        active: bool,
    ) -> BoxFut<'at, Result<bool, amqprs::error::Error>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move { Ok(active) })
    }

    fn publish_ack<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        ack: Ack,
    ) -> BoxFut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .acks
                .push((ack.delivery_tag(), ack.mutiple()));
        })
    }

    fn publish_nack<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        nack: Nack,
    ) -> BoxFut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .nacks
                .push((nack.delivery_tag(), nack.multiple()));
        })
    }

    fn publish_return<'l0, 'l1, 'at>(
        &'l0 mut self,
        _channel: &'l1 Channel,
        ret: Return,
        _basic_properties: BasicProperties,
        _content: Vec<u8>,
    ) -> BoxFut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .returns
                .push((ret.reply_code(), ret.reply_text().clone()));
        })
    }
}

impl Recorder {
    async fn wait_for<T>(&self, what: &str, f: impl Fn(&Events) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f(&self.0.lock().unwrap()) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.0.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn channel(conn: &Connection) -> (Channel, Recorder) {
    let ch = conn.open_channel(None).await.unwrap();
    let rec = Recorder::default();
    ch.register_callback(rec.clone()).await.unwrap();
    (ch, rec)
}

async fn declare(ch: &Channel, name: &str, exclusive: bool) -> String {
    let mut args = QueueDeclareArguments::new(name);
    args.exclusive(exclusive);
    let (q, _, _) = ch.queue_declare(args).await.unwrap().expect("declare-ok");
    q
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], mandatory: bool) {
    let mut args = BasicPublishArguments::new(exchange, key);
    args.mandatory(mandatory);
    ch.basic_publish(BasicProperties::default(), body.to_vec(), args)
        .await
        .unwrap();
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>) -> ConsumerMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
}

fn tag_of(m: &ConsumerMessage) -> u64 {
    m.deliver.as_ref().unwrap().delivery_tag()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let (ch, _rec) = channel(&conn).await;
    let q = declare(&ch, "", true).await;
    let mut headers = FieldTable::new();
    headers.insert(
        "k".try_into().unwrap(),
        FieldValue::S("v".try_into().unwrap()),
    );
    for i in 0..300 {
        let mut props = BasicProperties::default();
        props
            .with_content_type("text/plain")
            .with_headers(headers.clone())
            .with_message_id(&format!("id-{i}"));
        ch.basic_publish(
            props,
            format!("{i}").into_bytes(),
            BasicPublishArguments::new("", &q),
        )
        .await
        .unwrap();
    }
    let (tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, ""))
        .await
        .unwrap();
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    for i in 0..300u64 {
        let m = recv(&mut rx).await;
        let d = m.deliver.as_ref().unwrap();
        assert_eq!((d.delivery_tag(), d.redelivered()), (i + 1, false));
        assert_eq!(m.content.as_deref(), Some(format!("{i}").as_bytes()));
        let p = m.basic_properties.as_ref().unwrap();
        assert_eq!(p.content_type().map(String::as_str), Some("text/plain"));
        assert_eq!(
            p.message_id().map(String::as_str),
            Some(format!("id-{i}").as_str())
        );
        assert_eq!(p.headers(), Some(&headers));
        ch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
            .await
            .unwrap();
    }
    let mut args = QueueDeclareArguments::new(&q);
    args.passive(true);
    let (_, messages, consumers) = ch.queue_declare(args).await.unwrap().unwrap();
    assert_eq!((messages, consumers), (0, 1));
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_ack_nack_and_return() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let (ch, rec) = channel(&conn).await;
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let q = declare(&ch, "", true).await;
    for i in 0..100 {
        publish(&ch, "", &q, format!("{i}").as_bytes(), false).await;
    }
    // every tag 1..=100 acked exactly once (multiple acks cover all lower unconfirmed tags)
    let acked = rec
        .wait_for("100 acks", |e| {
            let mut set = BTreeSet::new();
            for &(tag, multiple) in &e.acks {
                if multiple {
                    set.extend(1..=tag);
                } else {
                    set.insert(tag);
                }
            }
            (set.len() == 100).then_some(set)
        })
        .await;
    assert_eq!(acked, (1..=100).collect::<BTreeSet<u64>>());
    // mandatory + unroutable: basic.return 312 NO_ROUTE, then the ack of tag 101
    publish(&ch, "amq.direct", &uniq("nobody"), b"r", true).await;
    let returns = rec
        .wait_for("a basic.return", |e| {
            (!e.returns.is_empty()).then(|| e.returns.clone())
        })
        .await;
    assert_eq!(returns, [(312, "NO_ROUTE".to_string())]);
    rec.wait_for("ack 101", |e| {
        e.acks.iter().any(|&(t, _)| t == 101).then_some(())
    })
    .await;
    // a queue that refuses (x-overflow reject-publish): basic.nack
    let mut qargs = FieldTable::new();
    qargs.insert("x-max-length".try_into().unwrap(), FieldValue::I(0));
    qargs.insert(
        "x-overflow".try_into().unwrap(),
        FieldValue::S("reject-publish".try_into().unwrap()),
    );
    let mut args = QueueDeclareArguments::new("");
    args.exclusive(true).arguments(qargs);
    let (full, _, _) = ch.queue_declare(args).await.unwrap().unwrap();
    publish(&ch, "", &full, b"refused", false).await;
    let nacks = rec
        .wait_for("a nack", |e| (!e.nacks.is_empty()).then(|| e.nacks.clone()))
        .await;
    // (RabbitMQ sets multiple: every earlier tag is already confirmed, so it names only 102)
    assert_eq!(nacks.len(), 1, "{nacks:?}");
    assert_eq!(nacks[0].0, 102, "{nacks:?}");
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_get_and_nack_requeue() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let (ch, _rec) = channel(&conn).await;
    let q = declare(&ch, "", true).await;
    assert!(ch
        .basic_get(BasicGetArguments::new(&q))
        .await
        .unwrap()
        .is_none());
    for i in 0..10 {
        publish(&ch, "", &q, format!("{i}").as_bytes(), false).await;
    }
    let (get_ok, _props, body) = ch
        .basic_get(BasicGetArguments::new(&q))
        .await
        .unwrap()
        .expect("get-ok");
    assert_eq!((body.as_slice(), get_ok.message_count()), (&b"0"[..], 9));
    ch.basic_nack(BasicNackArguments::new(get_ok.delivery_tag(), false, true))
        .await
        .unwrap();
    ch.basic_qos(BasicQosArguments::new(0, 3, false))
        .await
        .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, ""))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = recv(&mut rx).await;
        let d = m.deliver.as_ref().unwrap();
        got.push((m.content.clone().unwrap(), d.redelivered()));
    }
    assert_eq!(
        got,
        [
            (b"0".to_vec(), true),
            (b"1".to_vec(), false),
            (b"2".to_vec(), false)
        ]
    );
    // prefetch 3: nothing more until an ack
    assert!(
        tokio::time::timeout(Duration::from_millis(400), rx.recv())
            .await
            .is_err(),
        "a fourth delivery beyond prefetch 3"
    );
    ch.basic_ack(BasicAckArguments::new(3, true)).await.unwrap();
    let m = recv(&mut rx).await;
    assert_eq!(m.content.as_deref(), Some(&b"3"[..]));
    assert_eq!(tag_of(&m), 5);
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_is_405_for_other_connections() {
    let target = Target::from_env().unwrap();
    let owner = connect(&target).await;
    let (och, _) = channel(&owner).await;
    let q = declare(&och, &uniq("amqprs.excl"), true).await;
    let other = connect(&target).await;
    let (ch, rec) = channel(&other).await;
    let mut args = QueueDeclareArguments::new(&q);
    args.passive(true);
    let res = ch.queue_declare(args).await;
    assert!(res.is_err() || res.as_ref().unwrap().is_none(), "{res:?}");
    let closes = rec
        .wait_for("channel.close", |e| {
            (!e.closes.is_empty()).then(|| e.closes.clone())
        })
        .await;
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].0, 405);
    assert!(
        closes[0].1.starts_with(&format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'"
        )),
        "{closes:?}"
    );
    owner.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delete_cancels_consumers() {
    let target = Target::from_env().unwrap();
    let conn = connect(&target).await;
    let (ch, rec) = channel(&conn).await;
    let q = declare(&ch, &uniq("amqprs.cancel"), false).await;
    let (tag, _rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, ""))
        .await
        .unwrap();
    let (admin, _) = channel(&conn).await;
    admin
        .queue_delete(amqprs::channel::QueueDeleteArguments::new(&q))
        .await
        .unwrap();
    let cancels = rec
        .wait_for("basic.cancel", |e| {
            (!e.cancels.is_empty()).then(|| e.cancels.clone())
        })
        .await;
    assert_eq!(cancels, [tag]);
    assert!(ch.is_open());
    conn.close().await.unwrap();
}

/// 100 queues x 10 consumers on 10 connections, 20 messages a queue, each arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_100_queues_10_consumers_on_10_connections() {
    const QUEUES: usize = 100;
    const PER_QUEUE: usize = 20;
    let target = Arc::new(Target::from_env().unwrap());
    let prefix = uniq("amqprs.scale");
    let admin = connect(&target).await;
    let (ach, _) = channel(&admin).await;
    let names: Vec<String> = (0..QUEUES).map(|i| format!("{prefix}.{i}")).collect();
    for q in &names {
        declare(&ach, q, false).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Vec<u8>)>();
    let mut conns = Vec::new();
    for c in 0..10 {
        let conn = connect(&target).await;
        let (ch, _) = channel(&conn).await;
        ch.basic_qos(BasicQosArguments::new(0, 5, false))
            .await
            .unwrap();
        for (i, q) in names.iter().enumerate() {
            let (_tag, mut crx) = ch
                .basic_consume_rx(BasicConsumeArguments::new(q, ""))
                .await
                .unwrap();
            let tx = tx.clone();
            let ch2 = ch.clone();
            tokio::spawn(async move {
                while let Some(m) = crx.recv().await {
                    let tag = tag_of(&m);
                    let _ = ch2.basic_ack(BasicAckArguments::new(tag, false)).await;
                    let _ = tx.send((i, m.content.unwrap_or_default()));
                }
            });
        }
        let _ = c;
        conns.push((conn, ch));
    }
    drop(tx);
    for (i, q) in names.iter().enumerate() {
        for m in 0..PER_QUEUE {
            publish(&ach, "", q, format!("{i}:{m}").as_bytes(), false).await;
        }
    }
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < QUEUES * PER_QUEUE {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((i, body))) => {
                let text = String::from_utf8(body).unwrap();
                assert!(text.starts_with(&format!("{i}:")), "{text} on queue {i}");
                assert!(seen.insert(text.clone()), "{text} delivered twice");
            }
            _ => break,
        }
    }
    assert_eq!(seen.len(), QUEUES * PER_QUEUE);
    for (conn, _ch) in conns {
        conn.close().await.unwrap();
    }
    for q in &names {
        ach.queue_delete(amqprs::channel::QueueDeleteArguments::new(q))
            .await
            .unwrap();
    }
    admin.close().await.unwrap();
}
