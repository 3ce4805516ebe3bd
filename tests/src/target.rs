//! The broker a test talks to: a Warren spawned for that test, or an external broker named by
//! `AMQP_ADDR` (for instance a RabbitMQ started by `scripts/rabbitmq.sh`), so the same test can
//! run differentially.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{anyhow, Context, Result};

use crate::broker::Broker;

/// Environment variable naming an external broker: `127.0.0.1:5673` or an AMQP URL such as
/// `amqp://guest:guest@127.0.0.1:5673/%2f`.
pub const AMQP_ADDR: &str = "AMQP_ADDR";

/// The external broker's address from `AMQP_ADDR`, if set and not empty.
pub fn external_addr() -> Option<String> {
    std::env::var(AMQP_ADDR)
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// True when tests target an external broker.
pub fn is_external() -> bool {
    external_addr().is_some()
}

/// For tests that only make sense on Warren (signals, command-line flags): prints why the test
/// is skipped and returns true when `AMQP_ADDR` points elsewhere.
pub fn skip_unless_warren(reason: &str) -> bool {
    match external_addr() {
        Some(addr) => {
            eprintln!("skipped under AMQP_ADDR={addr}: {reason}");
            true
        }
        None => false,
    }
}

/// A broker under test.
#[derive(Debug)]
pub enum Target {
    /// A warren process owned by this test.
    Warren(Broker),
    /// A broker started elsewhere (`AMQP_ADDR`).
    External {
        /// Its resolved address.
        addr: SocketAddr,
        /// `amqp://...` URL for client libraries.
        url: String,
    },
}

impl Target {
    /// `AMQP_ADDR` if set, else a fresh Warren with default flags.
    pub fn from_env() -> Result<Target> {
        Target::from_env_with(&[])
    }

    /// `AMQP_ADDR` if set (then `warren_args` are ignored: configure the external broker to
    /// match), else a fresh Warren started with `warren_args`.
    pub fn from_env_with(warren_args: &[&str]) -> Result<Target> {
        match external_addr() {
            Some(spec) => {
                let (addr, url) = parse_amqp_addr(&spec)?;
                Ok(Target::External { addr, url })
            }
            None => Ok(Target::Warren(Broker::start_with(warren_args)?)),
        }
    }

    /// The socket address to connect to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Warren(b) => b.addr(),
            Target::External { addr, .. } => *addr,
        }
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// AMQP URL with guest credentials and the default vhost.
    pub fn amqp_url(&self) -> String {
        match self {
            Target::Warren(b) => b.amqp_url(),
            Target::External { url, .. } => url.clone(),
        }
    }

    /// True for an external broker.
    pub fn is_external(&self) -> bool {
        matches!(self, Target::External { .. })
    }

    /// The spawned Warren, if this target is one.
    pub fn warren(&self) -> Option<&Broker> {
        match self {
            Target::Warren(b) => Some(b),
            Target::External { .. } => None,
        }
    }

    /// The spawned Warren, mutably.
    pub fn warren_mut(&mut self) -> Option<&mut Broker> {
        match self {
            Target::Warren(b) => Some(b),
            Target::External { .. } => None,
        }
    }

    /// Warren's output, or a note for an external broker.
    pub fn logs(&self) -> String {
        match self {
            Target::Warren(b) => b.logs(),
            Target::External { addr, .. } => format!("<external broker at {addr}: no logs>"),
        }
    }

    /// A short name for messages: `warren` or `external 127.0.0.1:5673`.
    pub fn describe(&self) -> String {
        match self {
            Target::Warren(b) => format!("warren on {}", b.addr()),
            Target::External { addr, .. } => format!("external broker on {addr}"),
        }
    }
}

/// Parse `host:port` or `amqp://[user:pass@]host[:port][/vhost]` into an address and a URL.
pub fn parse_amqp_addr(spec: &str) -> Result<(SocketAddr, String)> {
    let spec = spec.trim();
    let (hostport, url) = if let Some(rest) = spec.strip_prefix("amqp://") {
        let after_auth = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        let hostport = after_auth.split('/').next().unwrap_or(after_auth);
        let hostport = if hostport.contains(':') && !hostport.ends_with(']') {
            hostport.to_string()
        } else {
            format!("{hostport}:5672")
        };
        (hostport, spec.to_string())
    } else {
        (spec.to_string(), format!("amqp://guest:guest@{spec}/%2f"))
    };
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {AMQP_ADDR}={spec}"))?
        .next()
        .ok_or_else(|| anyhow!("{AMQP_ADDR}={spec} resolves to no address"))?;
    Ok((addr, url))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_host_port_and_urls() {
        let (a, u) = parse_amqp_addr("127.0.0.1:5673").unwrap();
        assert_eq!(a.port(), 5673);
        assert_eq!(u, "amqp://guest:guest@127.0.0.1:5673/%2f");
        let (a, u) = parse_amqp_addr("amqp://guest:guest@127.0.0.1:5999/%2f").unwrap();
        assert_eq!(a.port(), 5999);
        assert_eq!(u, "amqp://guest:guest@127.0.0.1:5999/%2f");
        let (a, _) = parse_amqp_addr("amqp://127.0.0.1").unwrap();
        assert_eq!(a.port(), 5672);
    }
}
