//! Warren persistent store (definitions and message segments); synchronous by design.
