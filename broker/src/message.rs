//! A published message as queues hold it: routing info, raw properties and body, shared by `Arc`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use warren_protocol::ContentHeader;

use crate::resources::MemoryCharge;

/// One published message. Immutable once routed: every queue it reaches shares the same `Arc`.
#[derive(Debug)]
pub struct Message {
    /// Exchange name as published (delivered back in basic.deliver / get-ok / return).
    pub exchange: Bytes,
    pub routing_key: Bytes,
    /// Content header with the properties exactly as the publisher sent them.
    pub header: ContentHeader,
    pub body: Bytes,
    /// Counts this message against the memory high watermark while it lives.
    pub charge: MemoryCharge,
    /// When it was published (monotonic; for messages read back from disk, derived from the
    /// stored wall-clock time). TTLs count from here.
    pub published: Instant,
    /// The per-message TTL from the `expiration` property, validated at publish.
    pub ttl: Option<Duration>,
}

impl Message {
    /// Bytes a queued message costs beyond its payloads (Arc, queue entries, bookkeeping).
    pub const OVERHEAD: u64 = 128;

    /// Memory a message with these parts holds.
    pub fn footprint(
        exchange: &[u8],
        routing_key: &[u8],
        header: &ContentHeader,
        body: &[u8],
    ) -> u64 {
        (exchange.len() + routing_key.len() + header.raw_properties.len() + body.len()) as u64
            + Self::OVERHEAD
    }

    pub fn body_size(&self) -> u64 {
        self.body.len() as u64
    }

    pub fn is_persistent(&self) -> bool {
        self.header.is_persistent()
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
