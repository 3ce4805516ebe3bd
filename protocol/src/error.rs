//! Codec errors and how each maps onto RabbitMQ's connection.close reply (code, text, method).

use crate::frame::FrameKind;
use crate::method::method_name;

/// AMQP reply codes raised by the codec; all of them close the connection.
pub mod reply_code {
    /// 501: malformed frame (size, end octet, type).
    pub const FRAME_ERROR: u16 = 501;
    /// 502: a field held an illegal value.
    pub const SYNTAX_ERROR: u16 = 502;
    /// 503: unknown class or method.
    pub const COMMAND_INVALID: u16 = 503;
    /// 505: a frame arrived that the channel's state does not allow.
    pub const UNEXPECTED_FRAME: u16 = 505;
}

/// Why a frame was out of place; the texts are RabbitMQ's (`rabbit_command_assembler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unexpected {
    /// A content header or body arrived while no content-bearing method was pending.
    ExpectedMethod { got: FrameKind },
    /// Anything but a content header arrived after a content-bearing method.
    ExpectedContentHeader { class_id: u16, got: FrameKind },
    /// The content header names another class than the method it follows.
    ContentHeaderClass { expected: u16, got: u16 },
    /// Anything but a body frame arrived while body bytes were outstanding.
    ExpectedContentBody { got: FrameKind },
    /// A heartbeat frame on a channel other than 0.
    HeartbeatOnChannel { channel: u16 },
    /// A content header or body frame on channel 0.
    ContentOnChannelZero,
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unexpected::ExpectedMethod { .. } => {
                f.write_str("expected method frame, got non method frame instead")
            }
            Unexpected::ExpectedContentHeader { class_id, .. } => write!(
                f,
                "expected content header for class {class_id}, got non content header frame instead"
            ),
            Unexpected::ContentHeaderClass { expected, got } => write!(
                f,
                "expected content header for class {expected}, got one for class {got} instead"
            ),
            Unexpected::ExpectedContentBody { .. } => {
                f.write_str("expected content body, got non content body frame instead")
            }
            Unexpected::HeartbeatOnChannel { channel } => {
                write!(f, "heartbeat frame on non-zero channel {channel}")
            }
            Unexpected::ContentOnChannelZero => {
                f.write_str("content header or body frame on channel 0")
            }
        }
    }
}

/// Everything the codec can reject. Each value knows its AMQP reply code, reply text and the
/// offending class/method, which is all a connection needs to send connection.close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// `size` is the whole frame (7-byte header + payload + frame-end), saturating at u32::MAX.
    #[error("FRAME_ERROR - frame size {size} exceeds frame_max {frame_max}")]
    FrameTooLarge { size: u32, frame_max: u32 },
    #[error("FRAME_ERROR - invalid frame end marker 0x{found:02x}, expected 0xce")]
    BadFrameEnd { found: u8 },
    #[error("FRAME_ERROR - unknown frame type {frame_type}")]
    UnknownFrameType { frame_type: u8 },
    /// RabbitMQ only recognises heartbeats with an empty payload.
    #[error("FRAME_ERROR - heartbeat frame with a {size} byte payload")]
    BadHeartbeat { size: u32 },
    /// RabbitMQ (rabbit_command_assembler) raises frame_error here, not unexpected_frame.
    #[error("FRAME_ERROR - content body frame exceeds remaining content size")]
    BodyOverflow {
        frame_size: u64,
        remaining: u64,
        class_id: u16,
        method_id: u16,
    },
    /// Declared body size above the assembler's limit (RabbitMQ's hard limit is 512 MiB).
    #[error("FRAME_ERROR - content body size {body_size} exceeds maximum allowed size {max}")]
    BodyTooLarge {
        body_size: u64,
        max: u64,
        class_id: u16,
        method_id: u16,
    },
    #[error("UNEXPECTED_FRAME - {reason}")]
    UnexpectedFrame {
        reason: Unexpected,
        class_id: u16,
        method_id: u16,
    },
    /// Truncated or malformed method arguments, content header or field table.
    #[error("SYNTAX_ERROR - {detail}{}", method_suffix(*.class_id, *.method_id))]
    Syntax {
        detail: &'static str,
        class_id: u16,
        method_id: u16,
    },
    /// Method arguments that cannot be decoded (truncated, trailing bytes, garbage field
    /// table). RabbitMQ 3.10 answers these with 501 "FRAME_ERROR - cannot decode", naming the
    /// method, not with 502 (measured; see tests/tests/raw_frames.rs).
    #[error("FRAME_ERROR - cannot decode arguments of {}: {detail}", method_label(*.class_id, *.method_id))]
    CannotDecode {
        detail: &'static str,
        class_id: u16,
        method_id: u16,
    },
    #[error("COMMAND_INVALID - unknown method {class_id}.{method_id}")]
    UnknownMethod { class_id: u16, method_id: u16 },
}

fn method_label(class_id: u16, method_id: u16) -> String {
    match method_name(class_id, method_id) {
        Some(name) => name.to_string(),
        None => format!("{class_id}.{method_id}"),
    }
}

fn method_suffix(class_id: u16, method_id: u16) -> String {
    match method_name(class_id, method_id) {
        Some(name) => format!(" in {name}"),
        None => String::new(),
    }
}

/// AMQP caps reply-text (a shortstr) at 255 bytes.
const MAX_REPLY_TEXT: usize = 255;

impl ProtocolError {
    pub(crate) fn syntax(detail: &'static str) -> Self {
        ProtocolError::Syntax {
            detail,
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attributes the error to a method when the failing step did not know it (e.g. a content
    /// header that failed to decode belongs to the publish before it).
    pub(crate) fn on_method(mut self, class: u16, method: u16) -> Self {
        match &mut self {
            ProtocolError::Syntax {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::UnexpectedFrame {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::BodyOverflow {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::BodyTooLarge {
                class_id,
                method_id,
                ..
            } if *class_id == 0 && *method_id == 0 => {
                *class_id = class;
                *method_id = method;
            }
            _ => {}
        }
        self
    }

    /// The AMQP reply code RabbitMQ uses for this error; every one of them is a hard
    /// (connection) error.
    pub fn reply_code(&self) -> u16 {
        match self {
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::BadFrameEnd { .. }
            | ProtocolError::UnknownFrameType { .. }
            | ProtocolError::BadHeartbeat { .. }
            | ProtocolError::BodyOverflow { .. }
            | ProtocolError::BodyTooLarge { .. }
            | ProtocolError::CannotDecode { .. } => reply_code::FRAME_ERROR,
            ProtocolError::UnexpectedFrame { .. } => reply_code::UNEXPECTED_FRAME,
            ProtocolError::Syntax { .. } => reply_code::SYNTAX_ERROR,
            ProtocolError::UnknownMethod { .. } => reply_code::COMMAND_INVALID,
        }
    }

    /// RabbitMQ-style `"<NAME> - <explanation>"`, cut to at most 255 bytes on a char boundary.
    pub fn reply_text(&self) -> String {
        let mut text = self.to_string();
        if text.len() > MAX_REPLY_TEXT {
            let mut end = MAX_REPLY_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    /// Class and method ids of the offending method for connection.close, (0, 0) when the
    /// error is not tied to one. For an unknown method these are the ids the client sent.
    pub fn class_method(&self) -> (u16, u16) {
        match *self {
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::BadFrameEnd { .. }
            | ProtocolError::UnknownFrameType { .. }
            | ProtocolError::BadHeartbeat { .. } => (0, 0),
            ProtocolError::BodyOverflow {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::BodyTooLarge {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::UnexpectedFrame {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::Syntax {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::CannotDecode {
                class_id,
                method_id,
                ..
            }
            | ProtocolError::UnknownMethod {
                class_id,
                method_id,
            } => (class_id, method_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_texts_follow_rabbitmq() {
        let e = ProtocolError::UnexpectedFrame {
            reason: Unexpected::ExpectedContentHeader {
                class_id: 60,
                got: FrameKind::Method,
            },
            class_id: 60,
            method_id: 40,
        };
        assert_eq!(e.reply_code(), 505);
        assert_eq!(
            e.reply_text(),
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
        );
        assert_eq!(e.class_method(), (60, 40));

        let e = ProtocolError::Syntax {
            detail: "malformed method arguments",
            class_id: 50,
            method_id: 10,
        };
        assert_eq!(e.reply_code(), 502);
        assert_eq!(
            e.reply_text(),
            "SYNTAX_ERROR - malformed method arguments in queue.declare"
        );

        let e = ProtocolError::UnknownMethod {
            class_id: 70,
            method_id: 1,
        };
        assert_eq!(e.reply_code(), 503);
        assert!(e
            .reply_text()
            .starts_with("COMMAND_INVALID - unknown method"));
        assert_eq!(e.class_method(), (70, 1));

        for e in [
            ProtocolError::FrameTooLarge {
                size: 1,
                frame_max: 1,
            },
            ProtocolError::BadFrameEnd { found: 0 },
            ProtocolError::UnknownFrameType { frame_type: 9 },
            ProtocolError::BadHeartbeat { size: 1 },
        ] {
            assert_eq!(e.reply_code(), 501);
            assert!(e.reply_text().starts_with("FRAME_ERROR - "));
            assert_eq!(e.class_method(), (0, 0));
        }
    }

    #[test]
    fn on_method_only_fills_unknown_ids() {
        let e = ProtocolError::syntax("x").on_method(60, 40);
        assert_eq!(e.class_method(), (60, 40));
        let e = e.on_method(50, 10);
        assert_eq!(e.class_method(), (60, 40));
    }

    #[test]
    fn reply_text_is_capped_at_255_bytes() {
        let e = ProtocolError::UnexpectedFrame {
            reason: Unexpected::ExpectedMethod {
                got: FrameKind::Body,
            },
            class_id: 0,
            method_id: 0,
        };
        assert!(e.reply_text().len() <= 255);
        let long = ProtocolError::Syntax {
            detail: Box::leak("é".repeat(200).into_boxed_str()),
            class_id: 0,
            method_id: 0,
        };
        let text = long.reply_text();
        assert!(text.len() <= 255);
        assert!(text.starts_with("SYNTAX_ERROR - "));
    }
}
