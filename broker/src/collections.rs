//! Hash maps and sets for the broker's internal tables, with a fast hasher.
//!
//! std's SipHash was about a fifth of the instructions per message (callgrind): channel, queue,
//! consumer and unacked tables are looked up several times per message. foldhash is several
//! times cheaper and still seeded per process, so client-chosen names (queue names, consumer
//! tags) cannot be used to build collisions in advance.

pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
