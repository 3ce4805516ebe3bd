//! AMQP errors raised by the broker, and the one place that decides soft (channel) vs hard (connection).

use std::fmt;

/// Reply codes used by RabbitMQ (AMQP 0-9-1 constants plus RabbitMQ's usage).
pub mod code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;

    /// The symbolic name RabbitMQ puts at the start of reply texts.
    pub fn name(code: u16) -> &'static str {
        match code {
            REPLY_SUCCESS => "OK",
            CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
            NO_ROUTE => "NO_ROUTE",
            NO_CONSUMERS => "NO_CONSUMERS",
            CONNECTION_FORCED => "CONNECTION_FORCED",
            INVALID_PATH => "INVALID_PATH",
            ACCESS_REFUSED => "ACCESS_REFUSED",
            NOT_FOUND => "NOT_FOUND",
            RESOURCE_LOCKED => "RESOURCE_LOCKED",
            PRECONDITION_FAILED => "PRECONDITION_FAILED",
            FRAME_ERROR => "FRAME_ERROR",
            SYNTAX_ERROR => "SYNTAX_ERROR",
            COMMAND_INVALID => "COMMAND_INVALID",
            CHANNEL_ERROR => "CHANNEL_ERROR",
            UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
            RESOURCE_ERROR => "RESOURCE_ERROR",
            NOT_ALLOWED => "NOT_ALLOWED",
            NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
            _ => "INTERNAL_ERROR",
        }
    }

    /// RabbitMQ closes the whole connection for these codes even when raised on a channel.
    pub fn is_hard(code: u16) -> bool {
        matches!(
            code,
            CONNECTION_FORCED
                | INVALID_PATH
                | FRAME_ERROR
                | SYNTAX_ERROR
                | COMMAND_INVALID
                | CHANNEL_ERROR
                | UNEXPECTED_FRAME
                | RESOURCE_ERROR
                | NOT_ALLOWED
                | NOT_IMPLEMENTED
                | INTERNAL_ERROR
        )
    }
}

/// An AMQP-level error: a reply code, RabbitMQ-style text and the method that caused it.
///
/// Whether it closes the channel or the connection is decided by [`AmqpError::is_hard`],
/// from the code alone, so no call site has to choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    /// Full reply text, `"<NAME> - <explanation>"`, at most 255 bytes.
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    /// Builds an error whose text is `"<NAME> - <explanation>"`, truncated to 255 bytes.
    pub fn new(code: u16, explanation: impl fmt::Display) -> Self {
        let mut text = format!("{} - {}", code::name(code), explanation);
        truncate_utf8(&mut text, 255);
        AmqpError {
            code,
            text,
            class_id: 0,
            method_id: 0,
        }
    }

    /// Records the method that failed (class_id/method_id of connection.close / channel.close).
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    pub fn is_hard(&self) -> bool {
        code::is_hard(self.code)
    }

    pub fn not_found(explanation: impl fmt::Display) -> Self {
        Self::new(code::NOT_FOUND, explanation)
    }
    pub fn access_refused(explanation: impl fmt::Display) -> Self {
        Self::new(code::ACCESS_REFUSED, explanation)
    }
    pub fn resource_locked(explanation: impl fmt::Display) -> Self {
        Self::new(code::RESOURCE_LOCKED, explanation)
    }
    pub fn precondition_failed(explanation: impl fmt::Display) -> Self {
        Self::new(code::PRECONDITION_FAILED, explanation)
    }
    pub fn not_allowed(explanation: impl fmt::Display) -> Self {
        Self::new(code::NOT_ALLOWED, explanation)
    }
    pub fn not_implemented(explanation: impl fmt::Display) -> Self {
        Self::new(code::NOT_IMPLEMENTED, explanation)
    }
    pub fn channel_error(explanation: impl fmt::Display) -> Self {
        Self::new(code::CHANNEL_ERROR, explanation)
    }
    pub fn command_invalid(explanation: impl fmt::Display) -> Self {
        Self::new(code::COMMAND_INVALID, explanation)
    }
    pub fn frame_error(explanation: impl fmt::Display) -> Self {
        Self::new(code::FRAME_ERROR, explanation)
    }
    pub fn syntax_error(explanation: impl fmt::Display) -> Self {
        Self::new(code::SYNTAX_ERROR, explanation)
    }
    pub fn unexpected_frame(explanation: impl fmt::Display) -> Self {
        Self::new(code::UNEXPECTED_FRAME, explanation)
    }
    pub fn internal(explanation: impl fmt::Display) -> Self {
        Self::new(code::INTERNAL_ERROR, explanation)
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

impl std::error::Error for AmqpError {}

/// How RabbitMQ names a resource in reply texts: `queue 'q' in vhost '/'`.
pub fn resource(kind: &str, name: &str, vhost: &str) -> String {
    format!("{kind} '{name}' in vhost '{vhost}'")
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_and_hard_codes() {
        assert!(!AmqpError::not_found("x").is_hard());
        assert!(!AmqpError::precondition_failed("x").is_hard());
        assert!(AmqpError::channel_error("x").is_hard());
        assert!(AmqpError::not_allowed("x").is_hard());
        assert!(AmqpError::not_implemented("x").is_hard());
    }

    #[test]
    fn text_has_name_prefix_and_is_bounded() {
        let e = AmqpError::not_found(resource("queue", "q", "/"));
        assert_eq!(e.text, "NOT_FOUND - queue 'q' in vhost '/'");
        let long = AmqpError::precondition_failed("é".repeat(300));
        assert!(long.text.len() <= 255);
        assert!(long.text.starts_with("PRECONDITION_FAILED - "));
    }
}
