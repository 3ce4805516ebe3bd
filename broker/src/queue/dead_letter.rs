//! Dead-lettering as RabbitMQ 3.10 does it: a queue's target (`x-dead-letter-exchange`,
//! `x-dead-letter-routing-key`), the message a dead letter becomes (the `x-death` history,
//! `x-first-death-*`, no `expiration`) and the cycle rule. Pure: the queue collects dead
//! letters under its lock, and a [`DeadLetterRouter`] (the vhost) republishes them after.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use warren_protocol::ContentHeader;

use crate::message::Message;

/// Why a message was dead-lettered: the `reason` of its `x-death` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    /// basic.reject or basic.nack with requeue=false.
    Rejected,
    /// Its per-message or per-queue TTL ran out.
    Expired,
    /// A length limit pushed it out (drop-head) or refused it (reject-publish-dlx).
    MaxLen,
    /// It came back more often than the quorum queue's `x-delivery-limit`.
    DeliveryLimit,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Where a queue's dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterTarget {
    /// `x-dead-letter-exchange` ("" is the default exchange). It need not exist: dead
    /// letters to a missing exchange are dropped, as in RabbitMQ.
    pub exchange: Arc<str>,
    /// `x-dead-letter-routing-key`; None keeps the message's own routing keys.
    pub routing_key: Option<Bytes>,
}

impl DeadLetterTarget {
    /// From a queue's (validated) arguments; None without `x-dead-letter-exchange`.
    pub fn from_arguments(args: &FieldTable) -> Option<DeadLetterTarget> {
        let text = |key: &str| match args.inner().get(key) {
            Some(AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
            _ => None,
        };
        let exchange = text("x-dead-letter-exchange")?;
        Some(DeadLetterTarget {
            exchange: Arc::from(String::from_utf8_lossy(&exchange).as_ref()),
            routing_key: text("x-dead-letter-routing-key").map(Bytes::from),
        })
    }
}

/// A message a queue gave up on, waiting to be republished to its dead-letter exchange.
#[derive(Debug)]
pub struct DeadLetter {
    pub msg: Arc<Message>,
    pub reason: DeathReason,
}

/// Republishes a queue's dead letters (implemented by the vhost, which owns the routing).
/// Called with no lock held.
pub trait DeadLetterRouter: Send + Sync + std::fmt::Debug {
    fn route_dead_letters(&self, queue: &str, target: &DeadLetterTarget, letters: Vec<DeadLetter>);
}

/// A dead letter as it is republished.
#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    /// Properties with the updated headers and without `expiration`.
    pub header: ContentHeader,
    /// The routing key of the republished message (what consumers see).
    pub routing_key: Bytes,
    /// Further routing keys: the `CC` header's, when the message keeps its own keys.
    pub extra_keys: Vec<Bytes>,
    /// The new headers, which a headers exchange routes on.
    pub headers: FieldTable,
}

/// Builds the message a dead letter of `queue` becomes, as `rabbit_dead_letter:make_msg`:
/// an `x-death` entry for (queue, reason) is added first, or the existing one has its count
/// bumped and moves first; the first death also sets `x-first-death-{reason,queue,exchange}`;
/// `expiration` goes (kept as the entry's `original-expiration`) so the message does not
/// expire again for the same reason; a routing key set by the queue replaces the message's
/// keys and drops its `CC` header. `now_secs` is the wall-clock time in seconds.
pub fn republish(
    msg: &Message,
    reason: DeathReason,
    queue: &str,
    target: &DeadLetterTarget,
    now_secs: u64,
) -> Result<Republish, warren_protocol::ProtocolError> {
    let header = ContentHeader::from_raw(
        60,
        msg.body_size(),
        Bytes::copy_from_slice(msg.raw_properties()),
    )?;
    let props = header.properties()?;
    let mut headers = props.headers().clone().unwrap_or_default();
    let cc = header_routes(&headers);
    let mut routing_keys = Vec::with_capacity(1 + cc.len());
    routing_keys.push(AMQPValue::LongString(LongString::from(
        msg.routing_key().to_vec(),
    )));
    routing_keys.extend(
        cc.iter()
            .map(|k| AMQPValue::LongString(LongString::from(k.to_vec()))),
    );
    let mut entry = FieldTable::default();
    entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
    entry.insert(
        ShortString::from("reason"),
        long_string(reason.as_str().as_bytes()),
    );
    entry.insert(ShortString::from("queue"), long_string(queue.as_bytes()));
    entry.insert(ShortString::from("time"), AMQPValue::Timestamp(now_secs));
    entry.insert(ShortString::from("exchange"), long_string(msg.exchange()));
    entry.insert(
        ShortString::from("routing-keys"),
        AMQPValue::FieldArray(FieldArray::from(routing_keys)),
    );
    if let Some(expiration) = &header.expiration {
        entry.insert(
            ShortString::from("original-expiration"),
            long_string(expiration),
        );
    }
    update_x_death(&mut headers, entry, queue, reason, msg.exchange());
    let (routing_key, extra_keys) = match &target.routing_key {
        Some(key) => {
            let mut inner = headers.inner().clone();
            inner.remove("CC");
            headers = FieldTable::from(inner);
            (key.clone(), Vec::new())
        }
        None => (Bytes::copy_from_slice(msg.routing_key()), cc),
    };
    let props = without_expiration(&props).with_headers(headers.clone());
    Ok(Republish {
        header: ContentHeader::from_properties(60, msg.body_size(), &props),
        routing_key,
        extra_keys,
        headers,
    })
}

/// `props` less `expiration` (amq-protocol's builder can set a property but not clear one).
fn without_expiration(props: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

fn long_string(bytes: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(bytes.to_vec()))
}

/// The `CC` keys of a message's headers (arrays of long strings; the publish checked them).
fn header_routes(headers: &FieldTable) -> Vec<Bytes> {
    match headers.inner().get("CC") {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|item| match item {
                AMQPValue::LongString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn text_field<'a>(entry: &'a FieldTable, key: &str) -> Option<&'a [u8]> {
    match entry.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(s.as_bytes()),
        _ => None,
    }
}

fn update_x_death(
    headers: &mut FieldTable,
    entry: FieldTable,
    queue: &str,
    reason: DeathReason,
    exchange: &[u8],
) {
    let deaths = match headers.inner().get("x-death") {
        None => {
            // The first death also gets top-level headers (rabbitmq-server#1332).
            headers.insert(
                ShortString::from("x-first-death-reason"),
                long_string(reason.as_str().as_bytes()),
            );
            headers.insert(
                ShortString::from("x-first-death-queue"),
                long_string(queue.as_bytes()),
            );
            headers.insert(
                ShortString::from("x-first-death-exchange"),
                long_string(exchange),
            );
            vec![AMQPValue::FieldTable(entry)]
        }
        Some(AMQPValue::FieldArray(old)) => {
            let same = |t: &FieldTable| {
                text_field(t, "queue") == Some(queue.as_bytes())
                    && text_field(t, "reason") == Some(reason.as_str().as_bytes())
            };
            let mut deaths = Vec::with_capacity(old.as_slice().len() + 1);
            let mut others = Vec::with_capacity(old.as_slice().len());
            let mut found = None;
            for value in old.as_slice() {
                match value {
                    AMQPValue::FieldTable(t) if found.is_none() && same(t) => {
                        found = Some(t.clone())
                    }
                    // Later duplicates of (queue, reason) come from brokers older than
                    // rabbitmq-server#78; RabbitMQ folds them into the first.
                    AMQPValue::FieldTable(t) if same(t) => {}
                    other => others.push(other.clone()),
                }
            }
            // An existing entry keeps its fields (time, exchange, routing keys of that
            // first death); only its count moves on.
            let first = match found {
                Some(mut t) => {
                    let count = match t.inner().get("count") {
                        Some(v) => crate::channel::int_value(v).unwrap_or(0),
                        None => 0,
                    };
                    t.insert(
                        ShortString::from("count"),
                        AMQPValue::LongLongInt(count.saturating_add(1)),
                    );
                    t
                }
                None => entry,
            };
            deaths.push(AMQPValue::FieldTable(first));
            deaths.extend(others);
            deaths
        }
        // Something else (a client re-published it as a string, say): start again, as
        // RabbitMQ does (rabbitmq-server#767).
        Some(_) => vec![AMQPValue::FieldTable(entry)],
    };
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
}

/// Whether republishing a dead letter into `target_queue` would close a cycle that no client
/// took part in (`rabbit_dead_letter:is_cycle`): the message already died in `target_queue`,
/// and no death since, that one included, was a rejection. Such routes are dropped.
/// Rejections never make cycles: a consumer decided each time.
pub fn is_automatic_cycle(reason: DeathReason, headers: &FieldTable, target_queue: &str) -> bool {
    if reason == DeathReason::Rejected {
        return false;
    }
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    for death in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = death else {
            // Not something the broker wrote: a client was involved.
            return false;
        };
        if text_field(t, "reason") == Some(b"rejected") {
            return false;
        }
        if text_field(t, "queue") == Some(target_queue.as_bytes()) {
            return true;
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use crate::message::{Body, MessageParts};
    use crate::resources::ResourceMonitor;

    fn message(exchange: &str, key: &str, props: &BasicProperties) -> Message {
        let header = ContentHeader::from_properties(60, 3, props);
        Message::new(
            MessageParts {
                exchange: exchange.as_bytes(),
                routing_key: key.as_bytes(),
                header: &header,
                body: Body::Copy(b"abc"),
            },
            ResourceMonitor::new(u64::MAX).charge(0),
            std::time::Instant::now(),
            None,
        )
    }

    fn target(exchange: &str, key: Option<&str>) -> DeadLetterTarget {
        DeadLetterTarget {
            exchange: Arc::from(exchange),
            routing_key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        }
    }

    fn deaths(headers: &FieldTable) -> Vec<FieldTable> {
        match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    other => panic!("x-death holds {other:?}"),
                })
                .collect(),
            other => panic!("x-death is {other:?}"),
        }
    }

    fn text(t: &FieldTable, key: &str) -> String {
        String::from_utf8_lossy(text_field(t, key).unwrap_or(b"<none>")).into_owned()
    }

    /// Republishes `msg` as a dead letter and reads back the message it became.
    fn again(r: &Republish, exchange: &str) -> Message {
        let props = r.header.properties().unwrap();
        let key = String::from_utf8_lossy(&r.routing_key).into_owned();
        message(exchange, &key, &props)
    }

    #[test]
    fn first_death_adds_an_entry_and_the_first_death_headers() {
        let mut cc = FieldTable::default();
        cc.insert(
            "CC".into(),
            AMQPValue::FieldArray(vec![long_string(b"k2")].into()),
        );
        let props = BasicProperties::default()
            .with_expiration("60000".into())
            .with_delivery_mode(2)
            .with_headers(cc);
        let msg = message("ex", "k1", &props);
        let r = republish(
            &msg,
            DeathReason::Rejected,
            "q",
            &target("dlx", None),
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(&r.routing_key[..], b"k1");
        assert_eq!(r.extra_keys, vec![Bytes::from_static(b"k2")]);
        assert_eq!(r.header.expiration, None, "expiration is removed");
        assert!(r.header.is_persistent(), "the other properties stay");
        let d = deaths(&r.headers);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(text(&d[0], "reason"), "rejected");
        assert_eq!(text(&d[0], "queue"), "q");
        assert_eq!(text(&d[0], "exchange"), "ex");
        assert_eq!(text(&d[0], "original-expiration"), "60000");
        assert_eq!(
            d[0].inner().get("time"),
            Some(&AMQPValue::Timestamp(1_700_000_000))
        );
        assert_eq!(
            d[0].inner().get("routing-keys"),
            Some(&AMQPValue::FieldArray(
                vec![long_string(b"k1"), long_string(b"k2")].into()
            ))
        );
        assert_eq!(text(&r.headers, "x-first-death-reason"), "rejected");
        assert_eq!(text(&r.headers, "x-first-death-queue"), "q");
        assert_eq!(text(&r.headers, "x-first-death-exchange"), "ex");
        assert!(
            r.headers.contains_key("CC"),
            "the message keeps its CC keys"
        );
    }

    #[test]
    fn a_queue_routing_key_replaces_the_keys_and_drops_cc() {
        let mut cc = FieldTable::default();
        cc.insert(
            "CC".into(),
            AMQPValue::FieldArray(vec![long_string(b"k2")].into()),
        );
        let msg = message("", "q", &BasicProperties::default().with_headers(cc));
        let r = republish(
            &msg,
            DeathReason::Expired,
            "q",
            &target("", Some("dead")),
            1,
        )
        .unwrap();
        assert_eq!(&r.routing_key[..], b"dead");
        assert!(r.extra_keys.is_empty());
        assert!(!r.headers.contains_key("CC"));
        let d = deaths(&r.headers);
        // The entry records the keys the message had, not the new one.
        assert_eq!(
            d[0].inner().get("routing-keys"),
            Some(&AMQPValue::FieldArray(
                vec![long_string(b"q"), long_string(b"k2")].into()
            ))
        );
        assert!(!d[0].contains_key("original-expiration"));
    }

    #[test]
    fn a_second_death_in_the_same_queue_for_the_same_reason_counts_up_and_moves_first() {
        let msg = message("ex", "a", &BasicProperties::default());
        let r1 = republish(&msg, DeathReason::Rejected, "qa", &target("dlx", None), 10).unwrap();
        let m1 = again(&r1, "dlx");
        let r2 = republish(&m1, DeathReason::Expired, "qb", &target("dlx", None), 20).unwrap();
        let m2 = again(&r2, "dlx");
        let d2 = deaths(&r2.headers);
        assert_eq!(
            (text(&d2[0], "queue"), text(&d2[1], "queue")),
            ("qb".into(), "qa".into())
        );
        assert_eq!(text(&d2[0], "exchange"), "dlx", "the exchange it died from");
        let r3 = republish(&m2, DeathReason::Rejected, "qa", &target("dlx", None), 30).unwrap();
        let d3 = deaths(&r3.headers);
        assert_eq!(d3.len(), 2);
        assert_eq!(text(&d3[0], "queue"), "qa");
        assert_eq!(d3[0].inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(
            d3[0].inner().get("time"),
            Some(&AMQPValue::Timestamp(10)),
            "kept from the first"
        );
        assert_eq!(text(&d3[1], "queue"), "qb");
        // x-first-death-* stay those of the first death.
        assert_eq!(text(&r3.headers, "x-first-death-queue"), "qa");
        assert_eq!(text(&r3.headers, "x-first-death-exchange"), "ex");
        // Same queue, other reason: a new entry.
        let m3 = again(&r3, "dlx");
        let r4 = republish(&m3, DeathReason::Expired, "qa", &target("dlx", None), 40).unwrap();
        assert_eq!(deaths(&r4.headers).len(), 3);
    }

    #[test]
    fn an_x_death_that_is_not_an_array_starts_again() {
        let mut h = FieldTable::default();
        h.insert("x-death".into(), long_string(b"garbage"));
        let msg = message("ex", "a", &BasicProperties::default().with_headers(h));
        let r = republish(&msg, DeathReason::MaxLen, "q", &target("dlx", None), 1).unwrap();
        let d = deaths(&r.headers);
        assert_eq!((d.len(), text(&d[0], "reason")), (1, "maxlen".into()));
        assert!(!r.headers.contains_key("x-first-death-reason"));
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let msg = message("ex", "a", &BasicProperties::default());
        // Expired in qa, then in qb: going back to qa or to qb is an automatic cycle.
        let r1 = republish(&msg, DeathReason::Expired, "qa", &target("dlx", None), 1).unwrap();
        assert!(is_automatic_cycle(DeathReason::Expired, &r1.headers, "qa"));
        assert!(!is_automatic_cycle(DeathReason::Expired, &r1.headers, "qb"));
        let m1 = again(&r1, "dlx");
        let r2 = republish(&m1, DeathReason::MaxLen, "qb", &target("dlx", None), 2).unwrap();
        assert!(is_automatic_cycle(DeathReason::MaxLen, &r2.headers, "qa"));
        assert!(is_automatic_cycle(DeathReason::MaxLen, &r2.headers, "qb"));
        // A rejection now never cycles; one on the way breaks the cycle.
        assert!(!is_automatic_cycle(
            DeathReason::Rejected,
            &r2.headers,
            "qa"
        ));
        let m2 = again(&r2, "dlx");
        let r3 = republish(&m2, DeathReason::Rejected, "qc", &target("dlx", None), 3).unwrap();
        let m3 = again(&r3, "dlx");
        let r4 = republish(&m3, DeathReason::Expired, "qd", &target("dlx", None), 4).unwrap();
        assert!(!is_automatic_cycle(DeathReason::Expired, &r4.headers, "qa"));
        assert!(is_automatic_cycle(DeathReason::Expired, &r4.headers, "qd"));
    }

    #[test]
    fn target_from_arguments() {
        let mut args = FieldTable::default();
        assert_eq!(DeadLetterTarget::from_arguments(&args), None);
        args.insert("x-dead-letter-exchange".into(), long_string(b""));
        assert_eq!(
            DeadLetterTarget::from_arguments(&args),
            Some(target("", None))
        );
        args.insert("x-dead-letter-routing-key".into(), long_string(b"rk"));
        assert_eq!(
            DeadLetterTarget::from_arguments(&args),
            Some(target("", Some("rk")))
        );
    }
}
