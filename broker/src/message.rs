//! A published message as queues hold it: routing info, raw properties and body, shared by `Arc`.

use bytes::Bytes;
use warren_protocol::ContentHeader;

/// One published message. Immutable once routed: every queue it reaches shares the same `Arc`.
#[derive(Debug)]
pub struct Message {
    /// Exchange name as published (delivered back in basic.deliver / get-ok / return).
    pub exchange: Bytes,
    pub routing_key: Bytes,
    /// Content header with the properties exactly as the publisher sent them.
    pub header: ContentHeader,
    pub body: Bytes,
}

impl Message {
    pub fn body_size(&self) -> u64 {
        self.body.len() as u64
    }

    pub fn is_persistent(&self) -> bool {
        self.header.is_persistent()
    }
}
