//! Decoding method frames: basic.publish by hand (the hot path), the rest through amq-protocol.

use amq_protocol::protocol::{basic, parse_class, AMQPClass};
use bytes::Bytes;

use crate::error::ProtocolError;
use crate::wire::{sub, Reader, WireError, MAX_TABLE_DEPTH};

/// A decoded method. basic.publish is decoded by hand (hot path), everything else by amq-protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Publish(BasicPublish),
    /// basic.qos, decoded by hand because amq-protocol drops prefetch-size, which RabbitMQ
    /// refuses (540) when non-zero.
    Qos(BasicQos),
    Other(AMQPClass),
}

impl Method {
    pub fn class_id(&self) -> u16 {
        match self {
            Method::Publish(_) => BasicPublish::CLASS_ID,
            Method::Qos(_) => BasicQos::CLASS_ID,
            Method::Other(class) => class.get_amqp_class_id(),
        }
    }

    pub fn method_id(&self) -> u16 {
        match self {
            Method::Publish(_) => BasicPublish::METHOD_ID,
            Method::Qos(_) => BasicQos::METHOD_ID,
            Method::Other(class) => class.get_amqp_method_id(),
        }
    }

    /// true for methods that carry content (basic.publish, and for completeness
    /// basic.return/deliver/get-ok).
    pub fn has_content(&self) -> bool {
        match self {
            Method::Publish(_) => true,
            Method::Other(AMQPClass::Basic(m)) => matches!(
                m,
                basic::AMQPMethod::Publish(_)
                    | basic::AMQPMethod::Return(_)
                    | basic::AMQPMethod::Deliver(_)
                    | basic::AMQPMethod::GetOk(_)
            ),
            Method::Other(_) | Method::Qos(_) => false,
        }
    }

    /// Dotted name such as "queue.declare", for logs and error texts.
    pub fn name(&self) -> &'static str {
        method_name(self.class_id(), self.method_id()).unwrap_or("unknown")
    }
}

/// basic.qos with every field, prefetch-size included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasicQos {
    pub prefetch_size: u32,
    pub prefetch_count: u16,
    pub global: bool,
}

impl BasicQos {
    pub const CLASS_ID: u16 = 60;
    pub const METHOD_ID: u16 = 10;
}

/// basic.publish with its short strings as zero-copy slices of the frame payload. They are
/// raw bytes: RabbitMQ does not require UTF-8 here, so neither does the codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicPublish {
    pub exchange: Bytes,
    pub routing_key: Bytes,
    pub mandatory: bool,
    pub immediate: bool,
}

impl BasicPublish {
    pub const CLASS_ID: u16 = 60;
    pub const METHOD_ID: u16 = 40;

    /// The exchange name as text, if it is UTF-8.
    pub fn exchange_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.exchange).ok()
    }

    /// The routing key as text, if it is UTF-8.
    pub fn routing_key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.routing_key).ok()
    }
}

/// Argument kinds, only as far as needed to find the field tables inside a method.
#[derive(Clone, Copy)]
enum Arg {
    Octet,
    Short,
    ShortStr,
    LongStr,
    Table,
}

/// (class, method, name, args) for every method amq-protocol knows. `args` is filled in only
/// for methods that carry field tables: those are pre-walked to cap nesting depth before
/// amq-protocol's recursive parser sees them.
const METHODS: &[(u16, u16, &str, &[Arg])] = {
    use Arg::*;
    &[
        (
            10,
            10,
            "connection.start",
            &[Octet, Octet, Table, LongStr, LongStr],
        ),
        (
            10,
            11,
            "connection.start-ok",
            &[Table, ShortStr, LongStr, ShortStr],
        ),
        (10, 20, "connection.secure", &[]),
        (10, 21, "connection.secure-ok", &[]),
        (10, 30, "connection.tune", &[]),
        (10, 31, "connection.tune-ok", &[]),
        (10, 40, "connection.open", &[]),
        (10, 41, "connection.open-ok", &[]),
        (10, 50, "connection.close", &[]),
        (10, 51, "connection.close-ok", &[]),
        (10, 60, "connection.blocked", &[]),
        (10, 61, "connection.unblocked", &[]),
        (10, 70, "connection.update-secret", &[]),
        (10, 71, "connection.update-secret-ok", &[]),
        (20, 10, "channel.open", &[]),
        (20, 11, "channel.open-ok", &[]),
        (20, 20, "channel.flow", &[]),
        (20, 21, "channel.flow-ok", &[]),
        (20, 40, "channel.close", &[]),
        (20, 41, "channel.close-ok", &[]),
        (30, 10, "access.request", &[]),
        (30, 11, "access.request-ok", &[]),
        (
            40,
            10,
            "exchange.declare",
            &[Short, ShortStr, ShortStr, Octet, Table],
        ),
        (40, 11, "exchange.declare-ok", &[]),
        (40, 20, "exchange.delete", &[]),
        (40, 21, "exchange.delete-ok", &[]),
        (
            40,
            30,
            "exchange.bind",
            &[Short, ShortStr, ShortStr, ShortStr, Octet, Table],
        ),
        (40, 31, "exchange.bind-ok", &[]),
        (
            40,
            40,
            "exchange.unbind",
            &[Short, ShortStr, ShortStr, ShortStr, Octet, Table],
        ),
        (40, 51, "exchange.unbind-ok", &[]),
        (50, 10, "queue.declare", &[Short, ShortStr, Octet, Table]),
        (50, 11, "queue.declare-ok", &[]),
        (
            50,
            20,
            "queue.bind",
            &[Short, ShortStr, ShortStr, ShortStr, Octet, Table],
        ),
        (50, 21, "queue.bind-ok", &[]),
        (50, 30, "queue.purge", &[]),
        (50, 31, "queue.purge-ok", &[]),
        (50, 40, "queue.delete", &[]),
        (50, 41, "queue.delete-ok", &[]),
        (
            50,
            50,
            "queue.unbind",
            &[Short, ShortStr, ShortStr, ShortStr, Table],
        ),
        (50, 51, "queue.unbind-ok", &[]),
        (60, 10, "basic.qos", &[]),
        (60, 11, "basic.qos-ok", &[]),
        (
            60,
            20,
            "basic.consume",
            &[Short, ShortStr, ShortStr, Octet, Table],
        ),
        (60, 21, "basic.consume-ok", &[]),
        (60, 30, "basic.cancel", &[]),
        (60, 31, "basic.cancel-ok", &[]),
        (60, 40, "basic.publish", &[]),
        (60, 50, "basic.return", &[]),
        (60, 60, "basic.deliver", &[]),
        (60, 70, "basic.get", &[]),
        (60, 71, "basic.get-ok", &[]),
        (60, 72, "basic.get-empty", &[]),
        (60, 80, "basic.ack", &[]),
        (60, 90, "basic.reject", &[]),
        (60, 100, "basic.recover-async", &[]),
        (60, 110, "basic.recover", &[]),
        (60, 111, "basic.recover-ok", &[]),
        (60, 120, "basic.nack", &[]),
        (85, 10, "confirm.select", &[]),
        (85, 11, "confirm.select-ok", &[]),
        (90, 10, "tx.select", &[]),
        (90, 11, "tx.select-ok", &[]),
        (90, 20, "tx.commit", &[]),
        (90, 21, "tx.commit-ok", &[]),
        (90, 30, "tx.rollback", &[]),
        (90, 31, "tx.rollback-ok", &[]),
    ]
};

fn lookup(class_id: u16, method_id: u16) -> Option<(&'static str, &'static [Arg])> {
    METHODS
        .iter()
        .find(|(c, m, _, _)| *c == class_id && *m == method_id)
        .map(|(_, _, name, args)| (*name, *args))
}

/// Dotted AMQP name ("queue.declare") of a known class/method pair.
pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {
    lookup(class_id, method_id).map(|(name, _)| name)
}

/// Decodes a method frame payload. Unknown class/method -> ProtocolError::UnknownMethod
/// (503 COMMAND_INVALID in RabbitMQ); truncated/malformed arguments, trailing bytes, garbage
/// field tables (or tables nested deeper than MAX_TABLE_DEPTH) -> ProtocolError::CannotDecode
/// (501, as RabbitMQ 3.10 answers).
pub fn decode_method(payload: Bytes) -> Result<Method, ProtocolError> {
    let mut r = Reader::new(&payload);
    let (Ok(class_id), Ok(method_id)) = (r.u16(), r.u16()) else {
        return Err(ProtocolError::CannotDecode {
            detail: "method frame shorter than its class and method ids",
            class_id: 0,
            method_id: 0,
        });
    };
    let syntax = |detail: &'static str| ProtocolError::CannotDecode {
        detail,
        class_id,
        method_id,
    };
    if (class_id, method_id) == (BasicPublish::CLASS_ID, BasicPublish::METHOD_ID) {
        return decode_publish(&payload).map_err(|e| syntax(e.detail()));
    }
    if (class_id, method_id) == (BasicQos::CLASS_ID, BasicQos::METHOD_ID) {
        return decode_qos(r).map_err(|e| syntax(e.detail()));
    }
    let Some((_, args)) = lookup(class_id, method_id) else {
        return Err(ProtocolError::UnknownMethod {
            class_id,
            method_id,
        });
    };
    prewalk_tables(r, args).map_err(|e| syntax(e.detail()))?;
    match parse_class(&payload[..]) {
        Ok(([], class)) => Ok(Method::Other(class)),
        Ok(_) => Err(syntax(WireError::Trailing.detail())),
        Err(_) => Err(syntax("malformed method arguments")),
    }
}

fn decode_qos(mut r: Reader<'_>) -> Result<Method, WireError> {
    let prefetch_size = r.u32()?;
    let prefetch_count = r.u16()?;
    let bits = r.u8()?;
    if !r.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(Method::Qos(BasicQos {
        prefetch_size,
        prefetch_count,
        global: bits & 1 != 0,
    }))
}

fn decode_publish(payload: &Bytes) -> Result<Method, WireError> {
    let mut r = Reader::new(payload);
    r.take(4)?; // class and method ids
    r.u16()?; // reserved (ticket)
    let exchange = r.short_str()?;
    let routing_key = r.short_str()?;
    let bits = r.u8()?;
    if !r.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(Method::Publish(BasicPublish {
        exchange: sub(payload, exchange).ok_or(WireError::Truncated)?,
        routing_key: sub(payload, routing_key).ok_or(WireError::Truncated)?,
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    }))
}

fn prewalk_tables(mut r: Reader<'_>, args: &[Arg]) -> Result<(), WireError> {
    for arg in args {
        match arg {
            Arg::Octet => r.take(1).map(drop)?,
            Arg::Short => r.take(2).map(drop)?,
            Arg::ShortStr => r.short_str().map(drop)?,
            Arg::LongStr => r.long_str().map(drop)?,
            Arg::Table => r.skip_table(1, MAX_TABLE_DEPTH)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::method_payload;
    use amq_protocol::protocol::{channel, queue};
    use amq_protocol::types::{AMQPValue, FieldTable};

    fn publish_payload(exchange: &[u8], rk: &[u8], bits: u8) -> Vec<u8> {
        let mut v = vec![0, 60, 0, 40, 0, 0, exchange.len() as u8];
        v.extend_from_slice(exchange);
        v.push(rk.len() as u8);
        v.extend_from_slice(rk);
        v.push(bits);
        v
    }

    #[test]
    fn publish_is_decoded_by_hand_zero_copy() {
        let payload = Bytes::from(publish_payload(b"ex", b"rk", 0b11));
        let m = decode_method(payload.clone()).unwrap();
        let Method::Publish(p) = &m else {
            panic!("not a publish: {m:?}")
        };
        assert_eq!(&p.exchange[..], b"ex");
        assert_eq!(&p.routing_key[..], b"rk");
        assert!(p.mandatory && p.immediate);
        assert_eq!(p.exchange.as_ptr(), payload[7..].as_ptr());
        assert_eq!((m.class_id(), m.method_id()), (60, 40));
        assert!(m.has_content());
        assert_eq!(m.name(), "basic.publish");
        // Non-UTF-8 names pass through untouched.
        let m = decode_method(Bytes::from(publish_payload(&[0xff], b"", 0))).unwrap();
        let Method::Publish(p) = m else { panic!() };
        assert_eq!(p.exchange_str(), None);
        assert_eq!(p.routing_key_str(), Some(""));
    }

    #[test]
    fn truncated_publish_cannot_be_decoded() {
        let full = publish_payload(b"exchange", b"key", 1);
        for len in 0..full.len() {
            let err = decode_method(Bytes::copy_from_slice(&full[..len])).unwrap_err();
            assert_eq!(err.reply_code(), 501, "len {len}: {err:?}");
            if len >= 4 {
                assert_eq!(err.class_method(), (60, 40));
            }
        }
        let mut long = full.clone();
        long.push(0);
        let err = decode_method(Bytes::from(long)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
    }

    #[test]
    fn qos_keeps_prefetch_size() {
        let mut v = vec![0, 60, 0, 10];
        v.extend_from_slice(&7u32.to_be_bytes());
        v.extend_from_slice(&100u16.to_be_bytes());
        v.push(1);
        let m = decode_method(Bytes::from(v.clone())).unwrap();
        assert_eq!(
            m,
            Method::Qos(BasicQos {
                prefetch_size: 7,
                prefetch_count: 100,
                global: true
            })
        );
        assert_eq!((m.class_id(), m.method_id()), (60, 10));
        assert_eq!(m.name(), "basic.qos");
        v.pop();
        assert_eq!(decode_method(Bytes::from(v)).unwrap_err().reply_code(), 501);
    }

    #[test]
    fn unknown_methods_are_command_invalid() {
        for (c, m) in [(60, 41), (70, 10), (0, 0), (10, 52), (85, 12)] {
            let mut v = Vec::new();
            v.extend_from_slice(&u16::to_be_bytes(c));
            v.extend_from_slice(&u16::to_be_bytes(m));
            v.extend_from_slice(&[0, 0, 0, 0]);
            let err = decode_method(Bytes::from(v)).unwrap_err();
            assert_eq!(
                err,
                ProtocolError::UnknownMethod {
                    class_id: c,
                    method_id: m
                }
            );
            assert_eq!(err.reply_code(), 503);
            assert_eq!(err.class_method(), (c, m));
        }
    }

    fn queue_declare(arguments: FieldTable) -> Vec<u8> {
        method_payload(&AMQPClass::Queue(queue::AMQPMethod::Declare(
            queue::Declare {
                queue: "q".into(),
                durable: true,
                arguments,
                ..Default::default()
            },
        )))
        .unwrap()
    }

    #[test]
    fn other_methods_go_through_amq_protocol() {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(10));
        let payload = queue_declare(args.clone());
        let m = decode_method(Bytes::from(payload)).unwrap();
        let Method::Other(AMQPClass::Queue(queue::AMQPMethod::Declare(d))) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(d.queue.as_str(), "q");
        assert!(d.durable);
        assert_eq!(d.arguments, args);
        assert_eq!((m.class_id(), m.method_id()), (50, 10));
        assert!(!m.has_content());
        assert_eq!(m.name(), "queue.declare");
    }

    #[test]
    fn garbage_field_table_cannot_be_decoded() {
        let mut payload = queue_declare(FieldTable::default());
        // Replace the empty arguments table with one holding an unknown type tag.
        payload.truncate(payload.len() - 4);
        payload.extend_from_slice(&[0, 0, 0, 3, 1, b'k', b'Z']);
        let err = decode_method(Bytes::from(payload)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert_eq!(err.class_method(), (50, 10));
        assert!(
            err.reply_text()
                .starts_with("FRAME_ERROR - cannot decode arguments of queue.declare"),
            "{err}"
        );

        // A table length running past the frame.
        let mut payload = queue_declare(FieldTable::default());
        payload.truncate(payload.len() - 4);
        payload.extend_from_slice(&[0, 0, 1, 0, 1, b'k', b'V']);
        let err = decode_method(Bytes::from(payload)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
    }

    #[test]
    fn deeply_nested_tables_are_refused_before_amq_protocol_recurses() {
        // 100k levels of {"": F{...}} (6 bytes each) would overflow the stack inside
        // amq-protocol's recursive parser. Level i's content is 6 * (levels - i) bytes.
        let levels = 100_000u32;
        let mut encoded = Vec::with_capacity(levels as usize * 6 + 4);
        for i in 0..levels {
            encoded.extend_from_slice(&(6 * (levels - i)).to_be_bytes());
            encoded.extend_from_slice(&[0, b'F']);
        }
        encoded.extend_from_slice(&[0, 0, 0, 0]);
        let mut payload = queue_declare(FieldTable::default());
        payload.truncate(payload.len() - 4);
        payload.extend_from_slice(&encoded);
        let err = decode_method(Bytes::from(payload)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert!(err.reply_text().contains("nested too deeply"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_a_syntax_error() {
        let mut payload = method_payload(&AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )))
        .unwrap();
        assert!(decode_method(Bytes::from(payload.clone())).is_ok());
        payload.push(0);
        let err = decode_method(Bytes::from(payload)).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert_eq!(err.class_method(), (20, 10));
    }

    #[test]
    fn short_method_frames_cannot_be_decoded() {
        for p in [&[][..], &[0], &[0, 60, 0]] {
            let err = decode_method(Bytes::copy_from_slice(p)).unwrap_err();
            assert_eq!(err.reply_code(), 501);
            assert_eq!(err.class_method(), (0, 0));
        }
    }

    #[test]
    fn method_table_matches_amq_protocol() {
        // amq-protocol fails an unknown id with an error, a known one with arguments missing
        // with Incomplete (its parsers are streaming), and an argument-less one succeeds.
        for class_id in 0..=100u16 {
            for method_id in 0..=130u16 {
                let mut ids = class_id.to_be_bytes().to_vec();
                ids.extend_from_slice(&method_id.to_be_bytes());
                let known = match parse_class(&ids[..]) {
                    Ok(_) => true,
                    Err(e) => e.is_incomplete(),
                };
                assert_eq!(
                    known,
                    method_name(class_id, method_id).is_some(),
                    "{class_id}.{method_id}"
                );
            }
        }
    }
}
