//! Users and SASL: decoding PLAIN / AMQPLAIN responses and checking credentials.

use crate::collections::HashMap;
use std::net::IpAddr;

use amq_protocol::types::AMQPValue;

/// SASL mechanisms offered in connection.start, in RabbitMQ's order.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown authentication mechanism '{0}'")]
    UnknownMechanism(String),
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error("user '{0}' - invalid credentials")]
    InvalidCredentials(String),
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

/// Extracts (username, password) from a SASL response.
pub fn decode_response(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthError> {
    match mechanism {
        // "\0user\0pass" (authzid is ignored, as RabbitMQ does).
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next();
            let user = parts.next().ok_or(AuthError::Malformed("PLAIN"))?;
            let pass = parts.next().ok_or(AuthError::Malformed("PLAIN"))?;
            if parts.next().is_some() {
                return Err(AuthError::Malformed("PLAIN"));
            }
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            ))
        }
        // A field table body without its length prefix, holding LOGIN and PASSWORD.
        "AMQPLAIN" => {
            let len =
                u32::try_from(response.len()).map_err(|_| AuthError::Malformed("AMQPLAIN"))?;
            let mut framed = Vec::with_capacity(response.len() + 4);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(response);
            let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..])
                .map_err(|_| AuthError::Malformed("AMQPLAIN"))?;
            let field = |name: &str| match table.inner().get(name) {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
                _ => None,
            };
            let user = field("LOGIN").ok_or(AuthError::Malformed("AMQPLAIN"))?;
            let pass = field("PASSWORD").ok_or(AuthError::Malformed("AMQPLAIN"))?;
            Ok((user, pass))
        }
        other => Err(AuthError::UnknownMechanism(other.to_string())),
    }
}

/// A broker user. Passwords are compared as given: the user database is the default user for
/// now (users/permissions management is a later issue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    password: String,
    /// Set for users that RabbitMQ's `loopback_users` restricts to loopback peers.
    loopback_only: bool,
}

/// The set of known users.
#[derive(Debug, Default)]
pub struct Users {
    users: HashMap<String, User>,
}

impl Users {
    pub fn add(&mut self, name: &str, password: &str, loopback_only: bool) {
        self.users.insert(
            name.to_string(),
            User {
                name: name.to_string(),
                password: password.to_string(),
                loopback_only,
            },
        );
    }

    /// Checks a login the way RabbitMQ does, including the loopback restriction.
    pub fn authenticate(
        &self,
        name: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<User, AuthError> {
        let user = self
            .users
            .get(name)
            .filter(|u| constant_time_eq(u.password.as_bytes(), password.as_bytes()))
            .ok_or_else(|| AuthError::InvalidCredentials(name.to_string()))?;
        if user.loopback_only && !is_loopback(peer) {
            return Err(AuthError::LoopbackOnly(name.to_string()));
        }
        Ok(user.clone())
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Avoids leaking the password length/prefix through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use amq_protocol::types::{FieldTable, LongString};

    #[test]
    fn plain() {
        assert_eq!(
            decode_response("PLAIN", b"\0guest\0secret").unwrap(),
            ("guest".into(), "secret".into())
        );
        assert!(decode_response("PLAIN", b"guest").is_err());
        assert!(matches!(
            decode_response("EXTERNAL", b""),
            Err(AuthError::UnknownMechanism(_))
        ));
    }

    #[test]
    fn amqplain() {
        let mut t = FieldTable::default();
        t.insert(
            "LOGIN".into(),
            AMQPValue::LongString(LongString::from("bob")),
        );
        t.insert(
            "PASSWORD".into(),
            AMQPValue::LongString(LongString::from("pw")),
        );
        let mut buf = Vec::new();
        cookie_factory_free_encode(&t, &mut buf);
        // Strip the 4-byte length: AMQPLAIN sends the table body only.
        assert_eq!(
            decode_response("AMQPLAIN", &buf[4..]).unwrap(),
            ("bob".into(), "pw".into())
        );
        assert!(decode_response("AMQPLAIN", b"\x05LOGIN").is_err());
    }

    fn cookie_factory_free_encode(t: &FieldTable, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        for (k, v) in t {
            body.push(k.as_str().len() as u8);
            body.extend_from_slice(k.as_str().as_bytes());
            if let AMQPValue::LongString(s) = v {
                body.push(b'S');
                body.extend_from_slice(&(s.len() as u32).to_be_bytes());
                body.extend_from_slice(s.as_bytes());
            }
        }
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
    }

    #[test]
    fn loopback_rule() {
        let mut users = Users::default();
        users.add("guest", "guest", true);
        users.add("admin", "pw", false);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(users.authenticate("guest", "guest", local).is_ok());
        assert!(users.authenticate("guest", "guest", mapped).is_ok());
        assert_eq!(
            users.authenticate("guest", "guest", remote),
            Err(AuthError::LoopbackOnly("guest".into()))
        );
        assert!(users.authenticate("admin", "pw", remote).is_ok());
        assert!(users.authenticate("admin", "bad", local).is_err());
        assert!(users.authenticate("nobody", "", local).is_err());
    }
}
