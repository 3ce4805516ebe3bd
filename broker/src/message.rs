//! A published message as queues hold it: routing info, raw properties and body, shared by `Arc`.

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
}
