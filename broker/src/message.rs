//! A published message as queues hold it: routing info, raw properties and body, shared by `Arc`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use warren_protocol::ContentHeader;

use crate::resources::MemoryCharge;

/// One published message. Immutable once routed: every queue it reaches shares the same `Arc`.
///
/// Exchange, routing key, properties and (usually) the body live back to back in one owned
/// allocation that is never shared piecewise: slicing a buffer into refcounted parts costs an
/// extra allocation per message and atomics on every clone and drop. Only bodies that arrive
/// as a buffer of their own (big ones, kept zero-copy, and bodies read back from a store) stay
/// a separate `Bytes`.
///
/// Invariant: `data` holds `exchange_len + routing_key_len + properties_len` bytes, plus the
/// body when `separate_body` is None.
#[derive(Debug)]
pub struct Message {
    data: Box<[u8]>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    separate_body: Option<Bytes>,
    persistent: bool,
    /// The `priority` property (0 when absent), for priority queues.
    priority: u8,
    /// Counts this message against the memory high watermark while it lives.
    pub charge: MemoryCharge,
    /// When it was published (monotonic; for messages read back from disk, derived from the
    /// stored wall-clock time). TTLs count from here.
    pub published: Instant,
    /// The per-message TTL from the `expiration` property, validated at publish.
    pub ttl: Option<Duration>,
}

/// A message's parts, as received or read back.
pub struct MessageParts<'a> {
    pub exchange: &'a [u8],
    pub routing_key: &'a [u8],
    pub header: &'a ContentHeader,
    pub body: Body<'a>,
}

/// Where a body comes from: copied into the message's own allocation, or kept as it is.
pub enum Body<'a> {
    Copy(&'a [u8]),
    Keep(Bytes),
}

impl Body<'_> {
    fn len(&self) -> usize {
        match self {
            Body::Copy(b) => b.len(),
            Body::Keep(b) => b.len(),
        }
    }
}

/// Exchange names and routing keys are short strings: at most 255 bytes on the wire.
fn short_len(part: &[u8]) -> u8 {
    u8::try_from(part.len()).unwrap_or(u8::MAX)
}

impl Message {
    /// Bytes a queued message costs beyond its payloads (Arc, queue entries, bookkeeping).
    pub const OVERHEAD: u64 = 128;

    /// Builds a message; `charge` is what [`Message::footprint`] of the same parts asked for.
    pub fn new(
        parts: MessageParts<'_>,
        charge: MemoryCharge,
        published: Instant,
        ttl: Option<Duration>,
    ) -> Message {
        // Short strings by construction; cut defensively so the lengths stay truthful.
        let exchange = &parts.exchange[..usize::from(short_len(parts.exchange))];
        let routing_key = &parts.routing_key[..usize::from(short_len(parts.routing_key))];
        let properties = &parts.header.raw_properties[..];
        let properties = &properties[..properties.len().min(u32::MAX as usize)];
        let copied = match &parts.body {
            Body::Copy(b) => b.len(),
            Body::Keep(_) => 0,
        };
        let mut data =
            Vec::with_capacity(exchange.len() + routing_key.len() + properties.len() + copied);
        data.extend_from_slice(exchange);
        data.extend_from_slice(routing_key);
        data.extend_from_slice(properties);
        let separate_body = match parts.body {
            Body::Copy(b) => {
                data.extend_from_slice(b);
                None
            }
            Body::Keep(b) => Some(b),
        };
        Message {
            data: data.into_boxed_slice(),
            exchange_len: short_len(exchange),
            routing_key_len: short_len(routing_key),
            properties_len: u32::try_from(properties.len()).unwrap_or(u32::MAX),
            separate_body,
            persistent: parts.header.is_persistent(),
            priority: parts.header.priority.unwrap_or(0),
            charge,
            published,
            ttl,
        }
    }

    /// Memory a message with these parts holds.
    pub fn footprint(parts: &MessageParts<'_>) -> u64 {
        (parts.exchange.len()
            + parts.routing_key.len()
            + parts.header.raw_properties.len()
            + parts.body.len()) as u64
            + Self::OVERHEAD
    }

    fn routing_key_end(&self) -> usize {
        usize::from(self.exchange_len) + usize::from(self.routing_key_len)
    }

    fn properties_end(&self) -> usize {
        self.routing_key_end() + self.properties_len as usize
    }

    /// Exchange name as published (delivered back in basic.deliver / get-ok / return).
    pub fn exchange(&self) -> &[u8] {
        self.data
            .get(..usize::from(self.exchange_len))
            .unwrap_or_default()
    }

    pub fn routing_key(&self) -> &[u8] {
        self.data
            .get(usize::from(self.exchange_len)..self.routing_key_end())
            .unwrap_or_default()
    }

    /// Property flags and list exactly as the publisher sent them (class 60).
    pub fn raw_properties(&self) -> &[u8] {
        self.data
            .get(self.routing_key_end()..self.properties_end())
            .unwrap_or_default()
    }

    pub fn body(&self) -> &[u8] {
        match &self.separate_body {
            Some(body) => body,
            None => self.data.get(self.properties_end()..).unwrap_or_default(),
        }
    }

    pub fn body_size(&self) -> u64 {
        self.body().len() as u64
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// Whether the message has outlived the smaller of its own TTL and the queue's.
    pub fn is_expired(&self, queue_ttl: Option<Duration>, now: Instant) -> bool {
        let ttl = match (self.ttl, queue_ttl) {
            (Some(a), Some(b)) => a.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return false,
        };
        now.duration_since(self.published) > ttl
    }
}

/// Milliseconds since the Unix epoch (stored with messages so TTLs survive restarts).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The monotonic instant matching a stored wall-clock time (clamped to now).
pub fn instant_of_ms(ms: u64) -> Instant {
    let now = Instant::now();
    let age = now_ms().saturating_sub(ms);
    now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
}

/// Parses the `expiration` property as RabbitMQ does (Erlang `string:to_integer` on the text):
/// the error is the reason RabbitMQ prints, e.g. `no_integer` or `{value_negative,-1}`.
pub fn parse_expiration(raw: &[u8]) -> Result<Duration, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "no_integer".to_string())?;
    let digits_start = usize::from(text.starts_with(['+', '-']));
    let digits = text.get(digits_start..).map_or(0, |rest| {
        rest.bytes().take_while(u8::is_ascii_digit).count()
    });
    if digits == 0 {
        return Err("no_integer".into());
    }
    let end = digits_start + digits;
    let (number, rest) = text.split_at(end);
    if !rest.is_empty() {
        return Err(format!("{{leftover_string,\"{rest}\"}}"));
    }
    let value: i128 = number.parse().map_err(|_| "no_integer".to_string())?;
    if value < 0 {
        return Err(format!("{{value_negative,{value}}}"));
    }
    Ok(Duration::from_millis(
        u64::try_from(value).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parts_of(msg: &Message) -> (&[u8], &[u8], &[u8], &[u8]) {
        (
            msg.exchange(),
            msg.routing_key(),
            msg.raw_properties(),
            msg.body(),
        )
    }

    #[test]
    fn parts_come_back_as_given_whether_the_body_is_copied_or_kept() {
        let props = amq_protocol::protocol::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".into());
        let header = ContentHeader::from_properties(60, 5, &props);
        let monitor = crate::resources::ResourceMonitor::new(0);
        for keep in [false, true] {
            let body = Bytes::from_static(b"hello");
            let parts = MessageParts {
                exchange: b"amq.direct",
                routing_key: b"rk",
                header: &header,
                body: if keep {
                    Body::Keep(body.clone())
                } else {
                    Body::Copy(&body)
                },
            };
            assert_eq!(
                Message::footprint(&parts),
                10 + 2 + header.raw_properties.len() as u64 + 5 + Message::OVERHEAD
            );
            let charge = monitor.charge(Message::footprint(&parts));
            let msg = Message::new(parts, charge, Instant::now(), None);
            assert_eq!(
                parts_of(&msg),
                (
                    &b"amq.direct"[..],
                    &b"rk"[..],
                    &header.raw_properties[..],
                    &b"hello"[..]
                )
            );
            assert_eq!(msg.body_size(), 5);
            assert!(msg.is_persistent());
        }
    }

    #[test]
    fn empty_parts_are_fine() {
        let header = ContentHeader::from_properties(60, 0, &Default::default());
        let monitor = crate::resources::ResourceMonitor::new(0);
        let parts = MessageParts {
            exchange: b"",
            routing_key: b"",
            header: &header,
            body: Body::Copy(b""),
        };
        let msg = Message::new(parts, monitor.charge(0), Instant::now(), None);
        assert_eq!(
            parts_of(&msg),
            (&b""[..], &b""[..], &header.raw_properties[..], &b""[..])
        );
        assert!(!msg.is_persistent());
    }

    #[test]
    fn expiration_parsing_follows_rabbitmq() {
        assert_eq!(parse_expiration(b"0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_expiration(b"86400000"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(parse_expiration(b"+5"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_expiration(b"-1").unwrap_err(), "{value_negative,-1}");
        assert_eq!(parse_expiration(b"abc").unwrap_err(), "no_integer");
        assert_eq!(parse_expiration(b"").unwrap_err(), "no_integer");
        assert_eq!(
            parse_expiration(b"1.5").unwrap_err(),
            "{leftover_string,\".5\"}"
        );
        assert_eq!(parse_expiration(b" 5").unwrap_err(), "no_integer");
    }
}
