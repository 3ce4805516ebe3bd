//! Content header frames: raw property bytes kept verbatim, with the few fields the broker
//! routes on read out eagerly by walking the property list (no AMQPProperties built).

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;

use crate::error::ProtocolError;
use crate::wire::{sub, Reader, WireError, MAX_TABLE_DEPTH};

/// Class id, weight and body size precede the properties.
const FIXED_LEN: usize = 12;

// Property flag bits of class basic, most significant first. Bits 1 and 0 (the second unused
// bit and the continuation flag) are ignored, as amq-protocol and RabbitMQ both do.
const CONTENT_TYPE: u16 = 1 << 15;
const CONTENT_ENCODING: u16 = 1 << 14;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TIMESTAMP: u16 = 1 << 6;
const TYPE: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;
const APP_ID: u16 = 1 << 3;
const CLUSTER_ID: u16 = 1 << 2;

/// Content header: raw property bytes kept as-is (property flags + property list) plus the
/// fields the broker needs. A header that decodes is guaranteed to satisfy `properties()` and
/// `headers()` as well: the walk accepts exactly what amq-protocol accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    /// Flags + property list, exactly as received; re-sent verbatim to consumers.
    pub raw_properties: Bytes,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    /// Slices of `raw_properties`.
    pub expiration: Option<Bytes>,
    pub user_id: Option<Bytes>,
    /// Range of the headers table (with its length prefix) inside `raw_properties`.
    headers_range: Option<(usize, usize)>,
}

struct Walked {
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    expiration: Option<(usize, usize)>,
    user_id: Option<(usize, usize)>,
    headers: Option<(usize, usize)>,
}

fn walk_properties(raw: &[u8], max_depth: usize) -> Result<Walked, WireError> {
    let mut r = Reader::new(raw);
    let flags = r.u16()?;
    let mut w = Walked {
        delivery_mode: None,
        priority: None,
        expiration: None,
        user_id: None,
        headers: None,
    };
    let span = |range: std::ops::Range<usize>| (range.start, range.end);
    if flags & CONTENT_TYPE != 0 {
        r.short_str_utf8()?;
    }
    if flags & CONTENT_ENCODING != 0 {
        r.short_str_utf8()?;
    }
    if flags & HEADERS != 0 {
        let start = r.pos();
        r.skip_table(1, max_depth)?;
        w.headers = Some((start, r.pos()));
    }
    if flags & DELIVERY_MODE != 0 {
        w.delivery_mode = Some(r.u8()?);
    }
    if flags & PRIORITY != 0 {
        w.priority = Some(r.u8()?);
    }
    if flags & CORRELATION_ID != 0 {
        r.short_str_utf8()?;
    }
    if flags & REPLY_TO != 0 {
        r.short_str_utf8()?;
    }
    if flags & EXPIRATION != 0 {
        w.expiration = Some(span(r.short_str_utf8()?));
    }
    if flags & MESSAGE_ID != 0 {
        r.short_str_utf8()?;
    }
    if flags & TIMESTAMP != 0 {
        r.u64()?;
    }
    if flags & TYPE != 0 {
        r.short_str_utf8()?;
    }
    if flags & USER_ID != 0 {
        w.user_id = Some(span(r.short_str_utf8()?));
    }
    if flags & APP_ID != 0 {
        r.short_str_utf8()?;
    }
    if flags & CLUSTER_ID != 0 {
        r.short_str_utf8()?;
    }
    if !r.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(w)
}

impl ContentHeader {
    /// Decodes a content header frame payload. The weight field is not checked here (see
    /// `CommandAssembler`). Malformed -> Syntax (502).
    pub fn decode(payload: Bytes) -> Result<Self, ProtocolError> {
        let syntax = |e: WireError| ProtocolError::syntax(content_detail(e));
        let mut r = Reader::new(&payload);
        let class_id = r.u16().map_err(syntax)?;
        let _weight = r.u16().map_err(syntax)?;
        let body_size = r.u64().map_err(syntax)?;
        let raw_properties =
            sub(&payload, FIXED_LEN..payload.len()).ok_or(syntax(WireError::Truncated))?;
        let walked = walk_properties(&raw_properties, MAX_TABLE_DEPTH).map_err(syntax)?;
        Self::assemble(class_id, body_size, raw_properties, walked)
            .ok_or(syntax(WireError::Truncated))
    }

    fn assemble(class_id: u16, body_size: u64, raw: Bytes, w: Walked) -> Option<Self> {
        let slice = |span: Option<(usize, usize)>| match span {
            Some((start, end)) => sub(&raw, start..end).map(Some),
            None => Some(None),
        };
        Some(ContentHeader {
            class_id,
            body_size,
            delivery_mode: w.delivery_mode,
            priority: w.priority,
            expiration: slice(w.expiration)?,
            user_id: slice(w.user_id)?,
            headers_range: w.headers,
            raw_properties: raw,
        })
    }

    /// Re-encodes properties (used when the broker rewrites headers, e.g. BCC stripping,
    /// x-death). Short strings longer than 255 bytes cannot occur: ShortString refuses them.
    pub fn from_properties(class_id: u16, body_size: u64, props: &BasicProperties) -> Self {
        let raw = match gen_properties(props)(WriteContext::from(Vec::new())) {
            Ok(ctx) => ctx.into_inner().0,
            // Writing to a Vec cannot fail; an empty flag word keeps the header well-formed.
            Err(_) => vec![0, 0],
        };
        let raw = Bytes::from(raw);
        // The broker's own properties may nest deeper than a peer is allowed to.
        if let Some(header) = walk_properties(&raw, usize::MAX)
            .ok()
            .and_then(|w| Self::assemble(class_id, body_size, raw.clone(), w))
        {
            return header;
        }
        // Unreachable for amq-protocol's own encoding; keep the fields consistent anyway.
        let copy = |s: &Option<amq_protocol::types::ShortString>| {
            s.as_ref()
                .map(|s| Bytes::copy_from_slice(s.as_str().as_bytes()))
        };
        ContentHeader {
            class_id,
            body_size,
            raw_properties: raw,
            delivery_mode: *props.delivery_mode(),
            priority: *props.priority(),
            expiration: copy(props.expiration()),
            user_id: copy(props.user_id()),
            headers_range: None,
        }
    }

    /// A header from raw property bytes kept elsewhere (e.g. read back from the message
    /// store), validated like a received one.
    pub fn from_raw(class_id: u16, body_size: u64, raw: Bytes) -> Result<Self, ProtocolError> {
        let syntax = |e: WireError| ProtocolError::syntax(content_detail(e));
        let walked = walk_properties(&raw, usize::MAX).map_err(syntax)?;
        Self::assemble(class_id, body_size, raw, walked).ok_or(syntax(WireError::Truncated))
    }

    /// Full decode of the properties, only when needed.
    pub fn properties(&self) -> Result<BasicProperties, ProtocolError> {
        match parse_properties(&self.raw_properties[..]) {
            Ok(([], props)) => Ok(props),
            Ok(_) => Err(ProtocolError::syntax(content_detail(WireError::Trailing))),
            Err(_) => Err(ProtocolError::syntax("malformed content header properties")),
        }
    }

    /// Decodes only the headers table.
    pub fn headers(&self) -> Result<Option<FieldTable>, ProtocolError> {
        let Some(raw) = self.raw_headers() else {
            return Ok(None);
        };
        match parse_field_table(&raw[..]) {
            Ok(([], table)) => Ok(Some(table)),
            _ => Err(ProtocolError::syntax("malformed headers table")),
        }
    }

    /// The encoded headers table (length prefix included), zero-copy.
    pub fn raw_headers(&self) -> Option<Bytes> {
        let (start, end) = self.headers_range?;
        sub(&self.raw_properties, start..end)
    }

    /// The property flags word.
    pub fn property_flags(&self) -> u16 {
        Reader::new(&self.raw_properties).u16().unwrap_or(0)
    }

    /// delivery_mode == Some(2)
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }
}

fn content_detail(e: WireError) -> &'static str {
    match e {
        WireError::Truncated => "truncated content header",
        WireError::Trailing => "trailing bytes after content header properties",
        other => other.detail(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_raw_reads_back_from_properties() {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_expiration("60000".into())
            .with_user_id("guest".into());
        let header = ContentHeader::from_properties(60, 5, &props);
        assert_eq!(header.expiration.as_deref(), Some(&b"60000"[..]));
        let again = ContentHeader::from_raw(60, 5, header.raw_properties.clone()).unwrap();
        assert_eq!(again, header);
        assert!(ContentHeader::from_raw(60, 5, Bytes::from_static(&[0x80])).is_err());
    }

    use amq_protocol::types::AMQPValue;

    fn header_payload(class_id: u16, body_size: u64, raw: &[u8]) -> Bytes {
        let mut v = class_id.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&body_size.to_be_bytes());
        v.extend_from_slice(raw);
        Bytes::from(v)
    }

    fn full_props() -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("a".into(), AMQPValue::LongString("b".into()));
        BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("6000".into())
            .with_message_id("m".into())
            .with_timestamp(42)
            .with_type("t".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("cl".into())
    }

    #[test]
    fn decode_reads_routing_fields() {
        let built = ContentHeader::from_properties(60, 11, &full_props());
        let decoded = ContentHeader::decode(header_payload(60, 11, &built.raw_properties)).unwrap();
        assert_eq!(decoded, built);
        assert_eq!(decoded.class_id, 60);
        assert_eq!(decoded.body_size, 11);
        assert_eq!(decoded.delivery_mode, Some(2));
        assert!(decoded.is_persistent());
        assert_eq!(decoded.priority, Some(5));
        assert_eq!(decoded.expiration.as_deref(), Some(&b"6000"[..]));
        assert_eq!(decoded.user_id.as_deref(), Some(&b"guest"[..]));
        assert_eq!(decoded.properties().unwrap(), full_props());
        assert_eq!(
            decoded.headers().unwrap().as_ref(),
            full_props().headers().as_ref()
        );
        assert_eq!(decoded.property_flags(), full_props().bitmask());
    }

    #[test]
    fn empty_properties() {
        let h = ContentHeader::decode(header_payload(60, 0, &[0, 0])).unwrap();
        assert_eq!(h.delivery_mode, None);
        assert!(!h.is_persistent());
        assert_eq!(h.headers().unwrap(), None);
        assert_eq!(h.raw_headers(), None);
        assert_eq!(h.properties().unwrap(), BasicProperties::default());
    }

    #[test]
    fn malformed_headers_are_syntax_errors() {
        let cases: &[&[u8]] = &[
            &[],                                      // no flags
            &[0],                                     // half a flag word
            &[0x10, 0x00],                            // delivery mode missing
            &[0x80, 0x00, 5, b'a'],                   // truncated content type
            &[0x80, 0x00, 1, 0xff],                   // content type not UTF-8
            &[0x20, 0x00, 0, 0, 0, 3, 1, b'k', b'Z'], // garbage headers table
            &[0x00, 0x00, 0],                         // trailing byte
            &[0x00, 0x40, 0, 0, 0],                   // truncated timestamp
        ];
        for raw in cases {
            let err = ContentHeader::decode(header_payload(60, 1, raw)).unwrap_err();
            assert_eq!(err.reply_code(), 502, "{raw:?}");
            assert!(err.reply_text().starts_with("SYNTAX_ERROR - "));
        }
        for short in [&[][..], &[0, 60], &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0]] {
            let err = ContentHeader::decode(Bytes::copy_from_slice(short)).unwrap_err();
            assert_eq!(err.reply_code(), 502);
        }
    }

    #[test]
    fn ignores_the_low_flag_bits_like_amq_protocol() {
        let h = ContentHeader::decode(header_payload(60, 1, &[0x10, 0x03, 2])).unwrap();
        assert_eq!(h.delivery_mode, Some(2));
        assert_eq!(h.properties().unwrap().delivery_mode(), &Some(2));
    }

    #[test]
    fn headers_are_zero_copy_slices() {
        let built = ContentHeader::from_properties(60, 0, &full_props());
        let payload = header_payload(60, 0, &built.raw_properties);
        let h = ContentHeader::decode(payload.clone()).unwrap();
        assert_eq!(h.raw_properties.as_ptr(), payload[FIXED_LEN..].as_ptr());
        let raw = h.raw_headers().unwrap();
        assert!(raw.as_ptr() >= h.raw_properties.as_ptr());
    }
}
