//! Stateful property test: random sequences of append / ack / deliver / purge / sync /
//! clean restart / power-loss restart against a plain model of what must be recovered.
//! With `CrashMode::LoseUnsynced` the expected state after a crash is exact: the state at the
//! last completed sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{append_id, check_message};
use proptest::prelude::*;
use warren_storage::{CrashMode, MsgLocation, QueueStore, SimBackend, StoreConfig};

#[derive(Debug, Clone)]
enum Op {
    Append,
    Ack(usize),
    Deliver(usize),
    PurgeAllButLast,
    Sync,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => Just(Op::Append),
        4 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Deliver),
        1 => Just(Op::PurgeAllButLast),
        3 => Just(Op::Sync),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

/// A live message in the model: id, location, delivery marked.
type Live = Vec<(u64, MsgLocation, bool)>;

fn scale(id: u64) -> usize {
    if id.is_multiple_of(7) {
        40
    } else {
        1
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..80), buf in prop_oneof![Just(16usize), Just(700), Just(1 << 16)]) {
        let cfg = StoreConfig { segment_size: 4096, write_buffer: buf };
        let mut disk = SimBackend::new();
        let mut store = QueueStore::create(disk.shared(), "/q".as_ref(), cfg).unwrap();
        let mut live: Live = Vec::new();
        let mut synced: Live = Vec::new();
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Append => {
                    let loc = append_id(&mut store, next_id, scale(next_id)).unwrap();
                    live.push((next_id, loc, false));
                    next_id += 1;
                }
                Op::Ack(i) if !live.is_empty() => {
                    let (_, loc, _) = live.remove(i % live.len());
                    store.ack(loc).unwrap();
                }
                Op::Deliver(i) if !live.is_empty() => {
                    let n = live.len();
                    let e = &mut live[i % n];
                    store.mark_delivered(e.1).unwrap();
                    e.2 = true;
                }
                Op::PurgeAllButLast if !live.is_empty() => {
                    let last = live.pop().unwrap();
                    let locs: Vec<MsgLocation> = live.iter().map(|e| e.1).collect();
                    store.purge(&locs).unwrap();
                    live = vec![last];
                }
                Op::Sync => {
                    store.sync_now().unwrap();
                    synced = live.clone();
                }
                Op::Restart | Op::Crash => {
                    let expect = if matches!(op, Op::Restart) {
                        store.sync_now().unwrap();
                        live.clone()
                    } else {
                        synced.clone()
                    };
                    drop(store);
                    disk = disk.crash(CrashMode::LoseUnsynced);
                    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), cfg).unwrap();
                    let got: Vec<(u64, bool)> = r
                        .messages
                        .iter()
                        .map(|m| (check_message(&r.store.read(m.loc).unwrap(), scale_of(&r.store, m.loc)), m.delivered))
                        .collect();
                    let want: Vec<(u64, bool)> = expect.iter().map(|e| (e.0, e.2)).collect();
                    prop_assert_eq!(got, want);
                    live = r.messages.iter().zip(expect.iter()).map(|(m, e)| (e.0, m.loc, e.2)).collect();
                    synced = live.clone();
                    store = r.store;
                }
                _ => {}
            }
            // Reads work for every live location at all times.
            for (id, loc, _) in &live {
                prop_assert_eq!(check_message(&store.read(*loc).unwrap(), scale(*id)), *id);
            }
            prop_assert_eq!(store.stats().live_messages, live.len() as u64);
        }
    }
}

fn scale_of(store: &QueueStore, loc: MsgLocation) -> usize {
    let m = store.read(loc).unwrap();
    let id = u64::from_le_bytes(m.body[..8].try_into().unwrap());
    scale(id)
}
