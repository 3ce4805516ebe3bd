//! Real AMQP client libraries against the warren binary.
//!
//! The Rust clients (lapin, amqprs) are exercised by the integration tests in `tests/`; the
//! Python clients (pika, aio-pika, kombu) by the pytest suite in `python/`, which
//! `scripts/test` runs. Both start the binary with the same conventions as
//! [`warren_tests::Broker`]: a free loopback port, an own temp data dir, `WARREN_BIN`, and
//! `AMQP_ADDR` to target an external broker instead.

pub use warren_tests::{Broker, Target};
