//! Warren broker library: configuration, server, connections and the routing core.

pub mod error;
