//! Property tests: decoding round trips, and hand-written encoders checked byte for byte
//! against amq-protocol's gen_frame.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, exchange, queue, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use warren_protocol::*;

fn reference(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .unwrap()
        .into_inner()
        .0
}

fn short_string() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9 ._/#*-]{0,40}", "\\PC{0,12}", "[a-z]{250,255}"]
}

fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        (-1e6f32..1e6f32).prop_map(AMQPValue::Float),
        (-1e12f64..1e12f64).prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| AMQPValue::LongString(v.into())),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| AMQPValue::ByteArray(v.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::btree_map("[a-z-]{0,10}", inner, 0..4).prop_map(|m| {
                AMQPValue::FieldTable(FieldTable::from(
                    m.into_iter()
                        .map(|(k, v)| (ShortString::from(k), v))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                ))
            }),
        ]
    })
}

fn table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::btree_map("[a-zA-Z0-9_-]{0,12}", value(), 0..6).prop_map(|m| {
        let mut t = FieldTable::default();
        for (k, v) in m {
            t.insert(k.into(), v);
        }
        t
    })
}

fn properties() -> impl Strategy<Value = BasicProperties> {
    let strings = proptest::collection::vec(proptest::option::of(short_string()), 11);
    (
        strings,
        proptest::option::of(table()),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(s, headers, delivery_mode, priority, timestamp)| {
            let mut p = BasicProperties::default();
            let mut s = s.into_iter();
            let mut next = || s.next().flatten().map(ShortString::from);
            if let Some(v) = next() {
                p = p.with_content_type(v);
            }
            if let Some(v) = next() {
                p = p.with_content_encoding(v);
            }
            if let Some(v) = headers {
                p = p.with_headers(v);
            }
            if let Some(v) = delivery_mode {
                p = p.with_delivery_mode(v);
            }
            if let Some(v) = priority {
                p = p.with_priority(v);
            }
            if let Some(v) = next() {
                p = p.with_correlation_id(v);
            }
            if let Some(v) = next() {
                p = p.with_reply_to(v);
            }
            if let Some(v) = next() {
                p = p.with_expiration(v);
            }
            if let Some(v) = next() {
                p = p.with_message_id(v);
            }
            if let Some(v) = timestamp {
                p = p.with_timestamp(v);
            }
            if let Some(v) = next() {
                p = p.with_type(v);
            }
            if let Some(v) = next() {
                p = p.with_user_id(v);
            }
            if let Some(v) = next() {
                p = p.with_app_id(v);
            }
            if let Some(v) = next() {
                p = p.with_cluster_id(v);
            }
            p
        })
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    prop_oneof![
        (
            prop_oneof![
                Just(FrameKind::Method),
                Just(FrameKind::Header),
                Just(FrameKind::Body)
            ],
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(kind, channel, payload)| RawFrame {
                kind,
                channel,
                payload: Bytes::from(payload),
            }),
        any::<u16>().prop_map(|channel| RawFrame {
            kind: FrameKind::Heartbeat,
            channel,
            payload: Bytes::new(),
        }),
    ]
}

/// Feeds `wire` to a splitter in chunks of the given sizes (cycled) and collects the frames.
fn split_in_chunks(wire: &[u8], chunks: &[usize], frame_max: u32) -> Vec<RawFrame> {
    let mut splitter = FrameSplitter::new(frame_max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().cycle();
    while pos < wire.len() {
        let n = (*sizes.next().unwrap()).min(wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        while let Some(frame) = splitter.decode(&mut buf).unwrap() {
            out.push(frame);
        }
    }
    assert!(buf.is_empty());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn splitter_round_trips_any_chunking(
        frames in proptest::collection::vec(raw_frame(), 0..20),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_frame(&mut wire, f);
        }
        prop_assert_eq!(split_in_chunks(&wire, &chunks, 4096), frames);
    }

    #[test]
    fn publish_from_amq_protocol_decodes_by_hand(
        exchange in short_string(),
        routing_key in short_string(),
        mandatory: bool,
        immediate: bool,
    ) {
        let class = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.clone().into(),
            routing_key: routing_key.clone().into(),
            mandatory,
            immediate,
        }));
        let mut buf = BytesMut::new();
        encode_method(&mut buf, 1, &class);
        prop_assert_eq!(&buf[..], &reference(&AMQPFrame::Method(1, class))[..]);
        let frame = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        let method = decode_method(frame.payload).unwrap();
        let Method::Publish(p) = method else { panic!("{method:?}") };
        prop_assert_eq!(&p.exchange[..], exchange.as_bytes());
        prop_assert_eq!(&p.routing_key[..], routing_key.as_bytes());
        prop_assert_eq!(p.mandatory, mandatory);
        prop_assert_eq!(p.immediate, immediate);
    }

    #[test]
    fn methods_with_tables_round_trip(
        name in short_string(),
        arguments in table(),
        flags in any::<[bool; 5]>(),
        which in 0u8..3,
    ) {
        let class = match which {
            0 => AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: name.into(),
                passive: flags[0],
                durable: flags[1],
                exclusive: flags[2],
                auto_delete: flags[3],
                nowait: flags[4],
                arguments,
            })),
            1 => AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: name.clone().into(),
                source: "src".into(),
                routing_key: name.into(),
                nowait: flags[0],
                arguments,
            })),
            _ => AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: name.clone().into(),
                consumer_tag: name.into(),
                no_local: flags[0],
                no_ack: flags[1],
                exclusive: flags[2],
                nowait: flags[3],
                arguments,
            })),
        };
        let mut buf = BytesMut::new();
        encode_method(&mut buf, 7, &class);
        prop_assert_eq!(&buf[..], &reference(&AMQPFrame::Method(7, class.clone()))[..]);
        let frame = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(decode_method(frame.payload).unwrap(), Method::Other(class));
    }

    #[test]
    fn content_header_round_trips(
        props in properties(),
        body_size: u64,
        channel: u16,
    ) {
        let built = ContentHeader::from_properties(60, body_size, &props);
        prop_assert_eq!(built.properties().unwrap(), props.clone());

        // Our header frame is amq-protocol's, byte for byte.
        let mut buf = BytesMut::new();
        encode_content(&mut buf, channel, 60, body_size, &built.raw_properties, &[], 0);
        let expected = reference(&AMQPFrame::Header(channel, AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: props.clone(),
        }));
        prop_assert_eq!(&buf[..], &expected[..]);

        let frame = FrameSplitter::new(0).decode(&mut buf).unwrap().unwrap();
        let decoded = ContentHeader::decode(frame.payload).unwrap();
        prop_assert_eq!(&decoded, &built);
        prop_assert_eq!(decoded.properties().unwrap(), props.clone());
        prop_assert_eq!(decoded.body_size, body_size);
        prop_assert_eq!(decoded.delivery_mode, *props.delivery_mode());
        prop_assert_eq!(decoded.priority, *props.priority());
        prop_assert_eq!(
            decoded.expiration.as_deref(),
            props.expiration().as_ref().map(|s| s.as_str().as_bytes())
        );
        prop_assert_eq!(
            decoded.user_id.as_deref(),
            props.user_id().as_ref().map(|s| s.as_str().as_bytes())
        );
        prop_assert_eq!(decoded.headers().unwrap(), props.headers().clone());
        prop_assert_eq!(decoded.is_persistent(), *props.delivery_mode() == Some(2));
    }

    #[test]
    fn content_header_decode_agrees_with_amq_protocol_on_any_bytes(
        flags in prop_oneof![any::<u16>(), Just(0x2000u16), Just(0x1800u16)],
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        payload.extend_from_slice(&flags.to_be_bytes());
        payload.extend_from_slice(&rest);
        let ours = ContentHeader::decode(Bytes::from(payload.clone()));
        let theirs = amq_protocol::protocol::basic::parse_properties(&payload[12..]);
        let theirs_ok = matches!(theirs, Ok((rest, _)) if rest.is_empty());
        prop_assert_eq!(ours.is_ok(), theirs_ok);
        if let Ok(h) = ours {
            prop_assert!(h.properties().is_ok());
            prop_assert!(h.headers().is_ok());
        }
    }

    #[test]
    fn deliver_matches_amq_protocol(
        channel: u16,
        consumer_tag in short_string(),
        delivery_tag: u64,
        redelivered: bool,
        exchange in short_string(),
        routing_key in short_string(),
    ) {
        let mut buf = BytesMut::new();
        encode_basic_deliver(&mut buf, channel, consumer_tag.as_bytes(), delivery_tag, redelivered,
            exchange.as_bytes(), routing_key.as_bytes());
        let frame = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: consumer_tag.into(),
            delivery_tag,
            redelivered,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        })));
        prop_assert_eq!(&buf[..], &reference(&frame)[..]);
    }

    #[test]
    fn get_ok_matches_amq_protocol(
        channel: u16,
        delivery_tag: u64,
        redelivered: bool,
        exchange in short_string(),
        routing_key in short_string(),
        message_count: u32,
    ) {
        let mut buf = BytesMut::new();
        encode_basic_get_ok(&mut buf, channel, delivery_tag, redelivered, exchange.as_bytes(),
            routing_key.as_bytes(), message_count);
        let frame = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag,
            redelivered,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_count,
        })));
        prop_assert_eq!(&buf[..], &reference(&frame)[..]);
    }

    #[test]
    fn ack_and_nack_match_amq_protocol(
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) {
        let mut buf = BytesMut::new();
        encode_basic_ack(&mut buf, channel, delivery_tag, multiple);
        let ack = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })));
        prop_assert_eq!(&buf[..], &reference(&ack)[..]);

        let mut buf = BytesMut::new();
        encode_basic_nack(&mut buf, channel, delivery_tag, multiple, requeue);
        let nack = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag,
            multiple,
            requeue,
        })));
        prop_assert_eq!(&buf[..], &reference(&nack)[..]);
    }

    #[test]
    fn return_matches_amq_protocol(
        channel: u16,
        reply_code: u16,
        reply_text in short_string(),
        exchange in short_string(),
        routing_key in short_string(),
    ) {
        let mut buf = BytesMut::new();
        encode_basic_return(&mut buf, channel, reply_code, reply_text.as_bytes(), exchange.as_bytes(),
            routing_key.as_bytes());
        let frame = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code,
            reply_text: reply_text.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        })));
        prop_assert_eq!(&buf[..], &reference(&frame)[..]);
    }

    #[test]
    fn content_frames_match_amq_protocol_and_reassemble(
        props in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..20_000),
        frame_max in prop_oneof![Just(0u32), 4096u32..12_000],
        channel in 1u16..,
    ) {
        let header = ContentHeader::from_properties(60, body.len() as u64, &props);
        let mut buf = BytesMut::new();
        encode_content(&mut buf, channel, 60, body.len() as u64, &header.raw_properties, &body, frame_max);

        // Same bytes as amq-protocol's header frame followed by its body frames.
        let mut expected = reference(&AMQPFrame::Header(channel, AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: props.clone(),
        }));
        let chunk = if frame_max == 0 { body.len().max(1) } else { frame_max as usize - 8 };
        for part in body.chunks(chunk) {
            expected.extend(reference(&AMQPFrame::Body(channel, part.to_vec())));
        }
        prop_assert_eq!(&buf[..], &expected[..]);

        // And it reassembles behind a publish, every frame within frame_max.
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, &RawFrame {
            kind: FrameKind::Method,
            channel,
            payload: Bytes::from_static(&[0, 60, 0, 40, 0, 0, 0, 0, 0]),
        });
        wire.extend_from_slice(&buf);
        let mut splitter = FrameSplitter::new(frame_max);
        let mut assembler = CommandAssembler::new();
        let mut done = None;
        while let Some(frame) = splitter.decode(&mut wire).unwrap() {
            if let Some(cmd) = assembler.push(frame).unwrap() {
                done = Some(cmd);
            }
        }
        let cmd = done.unwrap();
        prop_assert!(assembler.is_idle());
        let content = cmd.content.unwrap();
        prop_assert_eq!(&content.body[..], &body[..]);
        prop_assert_eq!(content.header, header);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_payloads(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        ids in (prop_oneof![Just(10u16), Just(20), Just(40), Just(50), Just(60), any::<u16>()], 0u16..130),
    ) {
        let mut method = ids.0.to_be_bytes().to_vec();
        method.extend_from_slice(&ids.1.to_be_bytes());
        method.extend_from_slice(&payload);
        if let Err(e) = decode_method(Bytes::from(method)) {
            prop_assert!(e.reply_text().len() <= 255);
            prop_assert!([501, 503].contains(&e.reply_code()));
        }
        let _ = ContentHeader::decode(Bytes::from(payload));
    }
}

/// What the connection's loop makes of `wire`: the commands and the first error, if any.
/// With `fast`, `take_publish` is tried before each frame, as the connection does; without,
/// every frame goes through the splitter and `push`.
fn assemble(wire: &[u8], frame_max: u32, fast: bool) -> (Vec<Command>, Option<ProtocolError>) {
    let mut buf = BytesMut::from(wire);
    let mut splitter = FrameSplitter::new(frame_max);
    let mut assembler = CommandAssembler::new();
    let mut commands = Vec::new();
    loop {
        if fast {
            let before = buf.len();
            match assembler.take_publish(&mut buf, frame_max) {
                Ok(Some(command)) => {
                    commands.push(command);
                    continue;
                }
                Ok(None) => assert_eq!(buf.len(), before, "declining leaves the buffer alone"),
                Err(e) => return (commands, Some(e)),
            }
        }
        match splitter.decode(&mut buf) {
            Ok(Some(frame)) => match assembler.push(frame) {
                Ok(Some(command)) => commands.push(command),
                Ok(None) => {}
                Err(e) => return (commands, Some(e)),
            },
            Ok(None) => return (commands, None),
            Err(e) => return (commands, Some(e)),
        }
    }
}

fn assemble_frame_by_frame(wire: &[u8], frame_max: u32) -> (Vec<Command>, Option<ProtocolError>) {
    assemble(wire, frame_max, false)
}

fn assemble_with_fast_path(wire: &[u8], frame_max: u32) -> (Vec<Command>, Option<ProtocolError>) {
    assemble(wire, frame_max, true)
}

fn publish_wire(
    channel: u16,
    exchange: &str,
    routing_key: &str,
    props: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> BytesMut {
    let class = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    }));
    let mut wire = BytesMut::new();
    encode_method(&mut wire, channel, &class);
    let header = ContentHeader::from_properties(60, body.len() as u64, props);
    encode_content(
        &mut wire,
        channel,
        60,
        body.len() as u64,
        &header.raw_properties,
        body,
        frame_max,
    );
    wire
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Publishes (one body frame, several, or none), cut anywhere and followed by anything:
    /// the fast path gives the commands and the error the frame-by-frame path gives.
    #[test]
    fn take_publish_agrees_with_the_frame_by_frame_path(
        publishes in proptest::collection::vec(
            (1u16..4, short_string(), short_string(), properties(),
             proptest::collection::vec(any::<u8>(), 0..3000)),
            1..4,
        ),
        frame_max in prop_oneof![Just(0u32), Just(131_072u32), 1024u32..4096],
        tail in proptest::collection::vec(any::<u8>(), 0..40),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut wire = BytesMut::new();
        for (channel, exchange, routing_key, props, body) in &publishes {
            wire.extend_from_slice(&publish_wire(*channel, exchange, routing_key, props, body, frame_max));
        }
        let whole = assemble_with_fast_path(&wire, frame_max);
        if frame_max == 0 || frame_max >= 131_072 {
            // Nothing is over frame_max: every publish comes out.
            prop_assert!(whole.1.is_none(), "{:?}", whole.1);
            prop_assert_eq!(whole.0.len(), publishes.len());
        }
        prop_assert_eq!(&whole, &assemble_frame_by_frame(&wire, frame_max));
        let at = cut.index(wire.len() + 1);
        prop_assert_eq!(
            assemble_with_fast_path(&wire[..at], frame_max),
            assemble_frame_by_frame(&wire[..at], frame_max)
        );
        wire.extend_from_slice(&tail);
        prop_assert_eq!(
            assemble_with_fast_path(&wire, frame_max),
            assemble_frame_by_frame(&wire, frame_max)
        );
    }

    /// One corrupted byte anywhere in a publish: same outcome on both paths.
    #[test]
    fn take_publish_agrees_on_corrupted_publishes(
        routing_key in short_string(),
        props in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..600),
        frame_max in prop_oneof![Just(0u32), 512u32..1024],
        at in any::<prop::sample::Index>(),
        byte: u8,
    ) {
        let mut wire = publish_wire(1, "x", &routing_key, &props, &body, frame_max);
        let i = at.index(wire.len());
        wire[i] = byte;
        prop_assert_eq!(
            assemble_with_fast_path(&wire, frame_max),
            assemble_frame_by_frame(&wire, frame_max)
        );
    }
}

#[test]
fn take_publish_takes_whole_publishes_and_leaves_the_rest() {
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut wire = publish_wire(3, "ex", "rk", &props, b"hello", 0);
    wire.extend_from_slice(&publish_wire(3, "", "q", &props, b"", 0));
    wire.extend_from_slice(&publish_wire(3, "", "q", &props, &[7; 3000], 1024));
    let mut assembler = CommandAssembler::new();
    let first = assembler.take_publish(&mut wire, 0).unwrap().unwrap();
    assert_eq!(first.channel, 3);
    let Method::Publish(p) = &first.method else {
        panic!("{:?}", first.method)
    };
    assert_eq!(
        (&p.exchange[..], &p.routing_key[..]),
        (&b"ex"[..], &b"rk"[..])
    );
    let content = first.content.unwrap();
    assert_eq!(&content.body[..], b"hello");
    assert_eq!(content.header.delivery_mode, Some(2));
    let empty = assembler.take_publish(&mut wire, 0).unwrap().unwrap();
    assert!(empty.content.unwrap().body.is_empty());
    // A body in three frames is left to the frame-by-frame path.
    let left = wire.len();
    assert!(assembler.take_publish(&mut wire, 1024).unwrap().is_none());
    assert_eq!(wire.len(), left);
}
