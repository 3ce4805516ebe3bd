//! Fuzz target: arbitrary client bytes through the whole inbound codec, which must never panic
//! and whose outputs must keep the invariants the broker relies on.
#![no_main]

use std::collections::HashMap;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_protocol::{
    check_protocol_header, decode_method, encode_content, encode_frame, CommandAssembler,
    ContentHeader, FrameKind, FrameSplitter, ProtocolError, FRAME_MIN_SIZE,
};

fn check_error(e: &ProtocolError) {
    assert!(e.reply_text().len() <= 255);
    assert!([501, 502, 503, 505].contains(&e.reply_code()), "{e:?}");
}

fn check_header(header: &ContentHeader) {
    // A header that decodes must decode fully later: the broker does so lazily.
    let props = header.properties().unwrap();
    header.headers().unwrap();
    assert_eq!(*props.delivery_mode(), header.delivery_mode);
    assert_eq!(*props.priority(), header.priority);
    // Encoding what amq-protocol understood is stable (bytes compared: floats may be NaN).
    let again = ContentHeader::from_properties(header.class_id, header.body_size, &props);
    let props_again = again.properties().unwrap();
    let twice = ContentHeader::from_properties(header.class_id, header.body_size, &props_again);
    assert_eq!(twice.raw_properties, again.raw_properties);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let _ = check_protocol_header(rest);
    // Small limits so oversize paths are hit often; 0 exercises "no limit".
    let frame_max = match selector % 4 {
        0 => 0,
        1 => FRAME_MIN_SIZE,
        2 => FRAME_MIN_SIZE + u32::from(selector) * 16,
        _ => 131_072,
    };
    let mut splitter = FrameSplitter::new(frame_max);
    let mut buf = BytesMut::from(rest);
    let mut assemblers: HashMap<u16, CommandAssembler> = HashMap::new();
    loop {
        let before = buf.len();
        let frame = match splitter.decode(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                assert_eq!(buf.len(), before);
                break;
            }
            Err(e) => {
                check_error(&e);
                assert_eq!(buf.len(), before);
                break;
            }
        };
        let total = frame.payload.len() + 8;
        assert_eq!(before - buf.len(), total);
        assert!(frame_max == 0 || total <= frame_max as usize);

        // The frame re-encodes to the bytes it came from.
        let mut re = BytesMut::new();
        encode_frame(&mut re, &frame);
        assert_eq!(re.len(), total);

        match frame.kind {
            FrameKind::Method => match decode_method(frame.payload.clone()) {
                Ok(m) => {
                    let _ = (m.class_id(), m.method_id(), m.has_content(), m.name());
                }
                Err(e) => check_error(&e),
            },
            FrameKind::Header => match ContentHeader::decode(frame.payload.clone()) {
                Ok(h) => check_header(&h),
                Err(e) => check_error(&e),
            },
            FrameKind::Body | FrameKind::Heartbeat => {}
        }

        let channel = frame.channel;
        let assembler = assemblers.entry(channel).or_default();
        match assembler.push(frame) {
            Ok(Some(cmd)) => {
                assert!(assembler.is_idle());
                assert_eq!(cmd.channel, channel);
                if let Some(content) = cmd.content {
                    assert!(cmd.method.has_content());
                    assert_eq!(content.body.len() as u64, content.header.body_size);
                    check_header(&content.header);
                    let mut out = BytesMut::new();
                    encode_content(
                        &mut out,
                        channel,
                        content.header.class_id,
                        content.header.body_size,
                        &content.header.raw_properties,
                        &content.body,
                        frame_max,
                    );
                    let mut resplit = FrameSplitter::new(0);
                    let mut body = Vec::new();
                    while let Some(f) = resplit.decode(&mut out).unwrap() {
                        if f.kind == FrameKind::Body {
                            body.extend_from_slice(&f.payload);
                        }
                    }
                    assert_eq!(&body[..], &content.body[..]);
                }
            }
            Ok(None) => {}
            Err(e) => {
                check_error(&e);
                assert!(assembler.is_idle());
                assemblers.remove(&channel);
            }
        }
    }
});
