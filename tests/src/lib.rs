//! Test harness shared by `warren-tests` and `warren-interop-tests`.
//!
//! - [`Broker`]: start the real warren binary on a free loopback port with its own data dir.
//! - [`Target`]: a spawned Warren, or an external broker named by `AMQP_ADDR` (for instance a
//!   RabbitMQ from `scripts/rabbitmq.sh`) so that the same test runs differentially.
//! - [`raw`]: a raw AMQP client for frame-level tests.
//! - [`consume_into_channel`], [`connection_errors`]: a lapin consumer's deliveries and a
//!   connection's errors, read through mpsc receivers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod broker;
pub mod consume;
pub mod raw;
pub mod target;

pub use broker::{free_port, warren_bin, workspace_root, Broker};
pub use consume::{connection_errors, consume_into_channel};
pub use raw::{assert_healthy, Close, CloseScope, Event, Frame, Handshake, RawClient, Tune};
pub use target::{is_external, skip_unless_warren, Target, AMQP_ADDR};
