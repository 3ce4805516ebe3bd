//! Bounds-checked reading of AMQP wire primitives and allocation-free validation of field tables.
//!
//! The table walker accepts exactly what amq-protocol's parser accepts (same type tags, UTF-8
//! keys, no trailing bytes), so anything it lets through can later be decoded by amq-protocol
//! without error. It also caps nesting: amq-protocol parses tables recursively, and a frame of
//! nested empty tables (6 bytes per level) would otherwise overflow a task's stack.

use std::ops::Range;

/// Deepest table/array nesting accepted from a peer. Real headers (x-death is
/// table > array > table > array) stay far below; the cap exists only to bound recursion:
/// an unoptimised amq-protocol spends about 8 KiB of stack per level, and a tokio worker
/// has 2 MiB.
pub const MAX_TABLE_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    Truncated,
    UnknownFieldType,
    InvalidUtf8,
    TooDeep,
    Trailing,
}

impl WireError {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            WireError::Truncated => "truncated field",
            WireError::UnknownFieldType => "unknown field table value type",
            WireError::InvalidUtf8 => "field table key or short string is not valid UTF-8",
            WireError::TooDeep => "field tables nested too deeply",
            WireError::Trailing => "unexpected trailing bytes",
        }
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| WireError::Truncated)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Position range of a shortstr's bytes (after its length octet).
    pub(crate) fn short_str(&mut self) -> Result<Range<usize>, WireError> {
        let len = usize::from(self.u8()?);
        let start = self.pos;
        self.take(len)?;
        Ok(start..self.pos)
    }

    /// Like `short_str`, but also insists on UTF-8 as amq-protocol's ShortString does.
    pub(crate) fn short_str_utf8(&mut self) -> Result<Range<usize>, WireError> {
        let len = usize::from(self.u8()?);
        let start = self.pos;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8)?;
        Ok(start..self.pos)
    }

    pub(crate) fn long_str(&mut self) -> Result<&'a [u8], WireError> {
        let len = usize::try_from(self.u32()?).map_err(|_| WireError::Truncated)?;
        self.take(len)
    }

    /// Validates one field table (length-prefixed) at `depth` (1 = outermost).
    pub(crate) fn skip_table(&mut self, depth: usize, max_depth: usize) -> Result<(), WireError> {
        if depth > max_depth {
            return Err(WireError::TooDeep);
        }
        let mut inner = Reader::new(self.long_str()?);
        while !inner.is_empty() {
            inner.short_str_utf8()?;
            inner.skip_value(depth, max_depth)?;
        }
        Ok(())
    }

    fn skip_array(&mut self, depth: usize, max_depth: usize) -> Result<(), WireError> {
        if depth > max_depth {
            return Err(WireError::TooDeep);
        }
        let mut inner = Reader::new(self.long_str()?);
        while !inner.is_empty() {
            inner.skip_value(depth, max_depth)?;
        }
        Ok(())
    }

    /// Type tags as amq-protocol's `AMQPType::from_id` reads them (RabbitMQ's reading, plus 'U').
    fn skip_value(&mut self, depth: usize, max_depth: usize) -> Result<(), WireError> {
        match self.u8()? {
            b't' | b'b' | b'B' => self.take(1).map(drop),
            b's' | b'U' | b'u' => self.take(2).map(drop),
            b'I' | b'i' | b'f' => self.take(4).map(drop),
            b'D' => self.take(5).map(drop),
            b'L' | b'l' | b'd' | b'T' => self.take(8).map(drop),
            b'S' | b'x' => self.long_str().map(drop),
            b'A' => self.skip_array(depth.saturating_add(1), max_depth),
            b'F' => self.skip_table(depth.saturating_add(1), max_depth),
            b'V' => Ok(()),
            _ => Err(WireError::UnknownFieldType),
        }
    }
}

/// Bytes of `src` in `range`, or None if the range does not lie inside it.
pub(crate) fn sub(src: &bytes::Bytes, range: Range<usize>) -> Option<bytes::Bytes> {
    if range.start <= range.end && range.end <= src.len() {
        Some(src.slice(range))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[u8]) -> Vec<u8> {
        let mut v = (entries.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(entries);
        v
    }

    fn nested(depth: usize) -> Vec<u8> {
        // depth 1 = an empty table; each level wraps it as {"": F<inner>}.
        let mut t = table(&[]);
        for _ in 1..depth {
            let mut entry = vec![0u8, b'F'];
            entry.extend_from_slice(&t);
            t = table(&entry);
        }
        t
    }

    #[test]
    fn accepts_every_amq_protocol_type() {
        let mut e = Vec::new();
        for (tag, len) in [
            (b't', 1),
            (b'b', 1),
            (b'B', 1),
            (b's', 2),
            (b'U', 2),
            (b'u', 2),
            (b'I', 4),
            (b'i', 4),
            (b'f', 4),
            (b'D', 5),
            (b'L', 8),
            (b'l', 8),
            (b'd', 8),
            (b'T', 8),
        ] {
            e.extend_from_slice(&[1, b'k', tag]);
            e.extend(std::iter::repeat_n(7u8, len));
        }
        e.extend_from_slice(&[1, b'S', b'S', 0, 0, 0, 2, b'h', b'i']);
        e.extend_from_slice(&[1, b'x', b'x', 0, 0, 0, 1, 0xff]);
        e.extend_from_slice(&[1, b'v', b'V']);
        e.extend_from_slice(&[1, b'a', b'A', 0, 0, 0, 3, b'V', b't', 1]);
        let t = table(&e);
        let mut r = Reader::new(&t);
        assert_eq!(r.skip_table(1, MAX_TABLE_DEPTH), Ok(()));
        assert!(r.is_empty());
        let parsed = amq_protocol::types::parsing::parse_field_table(&t[..]);
        assert!(parsed.is_ok());
    }

    #[test]
    fn rejects_what_amq_protocol_rejects() {
        for bad in [
            table(&[1, b'k', b'Z']),                   // unknown type
            table(&[1, b'k', b'I', 0]),                // truncated value
            table(&[5, b'k']),                         // truncated key
            table(&[1, 0xff, b'V']),                   // key not UTF-8
            vec![0, 0, 0, 9, 1, b'k', b'V'],           // length beyond input
            table(&[1, b'k', b'A', 0, 0, 0, 1, b'?']), // bad array element
        ] {
            let mut r = Reader::new(&bad);
            assert!(r.skip_table(1, MAX_TABLE_DEPTH).is_err(), "{bad:?}");
            let parsed = amq_protocol::types::parsing::parse_field_table(&bad[..]);
            assert!(
                !matches!(parsed, Ok((rest, _)) if rest.is_empty()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn depth_is_capped() {
        let ok = nested(MAX_TABLE_DEPTH);
        assert_eq!(Reader::new(&ok).skip_table(1, MAX_TABLE_DEPTH), Ok(()));
        let deep = nested(MAX_TABLE_DEPTH + 1);
        assert_eq!(
            Reader::new(&deep).skip_table(1, MAX_TABLE_DEPTH),
            Err(WireError::TooDeep)
        );
    }

    #[test]
    fn amq_protocol_parses_max_depth_on_a_small_stack() {
        // The cap is only useful if amq-protocol survives it where the broker runs (tokio
        // workers get 2 MiB); check with half of that.
        let t = nested(MAX_TABLE_DEPTH);
        let handle = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || amq_protocol::types::parsing::parse_field_table(&t[..]).is_ok())
            .unwrap();
        assert!(handle.join().unwrap());
    }

    #[test]
    fn sub_checks_bounds() {
        let b = bytes::Bytes::from_static(b"abc");
        assert_eq!(sub(&b, 1..3).as_deref(), Some(&b"bc"[..]));
        assert_eq!(sub(&b, 2..4), None);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 3..2;
        assert_eq!(sub(&b, backwards), None);
    }
}
