//! Helpers shared by the storage integration tests: deterministic messages that carry their
//! own id, so a recovered message can be checked byte for byte.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use warren_storage::{Body, QueueStore, StoredMessage, StoredMessageOwned};

/// Body of message `id`: the id, then a pattern; the length varies with the id (and can be
/// scaled up to exercise big records).
pub fn body_of(id: u64, scale: usize) -> Vec<u8> {
    let len = 8 + (id as usize * 37 % 200) * scale;
    let mut b = id.to_le_bytes().to_vec();
    b.extend((0..len - 8).map(|i| (i as u64 ^ id) as u8));
    b
}

pub fn props_of(id: u64) -> Vec<u8> {
    vec![0x90, 0x00, (id % 3) as u8 + 1]
}

pub fn append_id(
    store: &mut QueueStore,
    id: u64,
    scale: usize,
) -> warren_storage::Result<warren_storage::MsgLocation> {
    let body = body_of(id, scale);
    let props = props_of(id);
    let rk = format!("rk.{id}");
    store.append(&StoredMessage {
        flags: (id % 4) as u8,
        timestamp_ms: id * 1000,
        exchange: b"amq.topic",
        routing_key: rk.as_bytes(),
        properties: &props,
        body: Body::Contiguous(&body),
    })
}

/// Checks that `m` is exactly message `id` as appended by [`append_id`]; returns the id.
pub fn check_message(m: &StoredMessageOwned, scale: usize) -> u64 {
    assert!(m.body.len() >= 8, "body too short");
    let id = u64::from_le_bytes(m.body[..8].try_into().unwrap());
    assert_eq!(&m.body[..], &body_of(id, scale)[..], "body of {id}");
    assert_eq!(&m.properties[..], &props_of(id)[..], "properties of {id}");
    assert_eq!(&m.exchange[..], b"amq.topic");
    assert_eq!(m.routing_key, format!("rk.{id}").into_bytes());
    assert_eq!(m.flags, (id % 4) as u8);
    assert_eq!(m.timestamp_ms, id * 1000);
    id
}
