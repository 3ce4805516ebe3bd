//! Warren broker library: configuration, server, connections and the routing core.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod collections;
pub mod config;
pub mod confirms;
pub mod connection;
pub mod error;
pub mod exchange;
pub mod message;
pub mod persist;
pub mod queue;
pub mod resources;
pub mod server;
pub mod tags;
pub mod vhost;
