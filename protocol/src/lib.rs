//! Pure AMQP 0-9-1 codec: frame splitting, command assembly and encoding (no I/O).
//!
//! Bytes in: [`check_protocol_header`], then [`FrameSplitter`] cuts the stream into
//! [`RawFrame`]s and a per-channel [`CommandAssembler`] turns them into [`Command`]s.
//! Bytes out: the `encode_*` functions append frames to a `BytesMut`.
//! Every rejection is a [`ProtocolError`] that knows RabbitMQ's reply code and text.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod assembler;
mod content;
mod encode;
mod error;
mod frame;
mod method;
mod wire;

pub use assembler::{Command, CommandAssembler, Content, DEFAULT_MAX_BODY_SIZE};
pub use content::ContentHeader;
pub use encode::{
    encode_basic_ack, encode_basic_deliver, encode_basic_get_ok, encode_basic_nack,
    encode_basic_return, encode_content, encode_frame, encode_heartbeat, encode_method,
    encode_protocol_header,
};
pub use error::{reply_code, ProtocolError, Unexpected};
pub use frame::{
    check_protocol_header, FrameKind, FrameSplitter, ProtocolHeader, RawFrame, FRAME_BODY,
    FRAME_END, FRAME_HEADER, FRAME_HEADER_SIZE, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE,
    FRAME_OVERHEAD, PROTOCOL_HEADER,
};
pub use method::{decode_method, method_name, BasicPublish, BasicQos, Method};
pub use wire::MAX_TABLE_DEPTH;

/// amq-protocol, re-exported so callers name the same version of its types.
pub use amq_protocol;
