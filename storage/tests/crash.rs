//! Crash consistency: a seeded workload runs on the simulated disk and is cut at every
//! mutating operation (write, truncate, sync, create, remove, rename); the disk is then
//! "rebooted" keeping none, all, or a random torn prefix of the unsynced data, recovered, and
//! checked:
//! - every message whose append was covered by a completed sync is present and intact,
//! - no message whose ack was covered by a completed sync comes back,
//! - nothing unknown, duplicated, out of order or corrupt is returned,
//! - a delivery mark covered by a sync is reported,
//! - the recovered store keeps working (and survives a second crash).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use common::{append_id, check_message};
use warren_storage::{
    BindingDef, CrashMode, DefChange, DefinitionSet, Definitions, ExchangeDef, MsgLocation,
    QueueDef, QueueStore, SimBackend, StoreConfig, UserDef, VhostDef,
};

/// splitmix64, so the workload is reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the workload managed to do before the disk died.
#[derive(Default, Debug)]
struct Tracker {
    /// Appends attempted (an append cut by the crash may still leave its bytes).
    attempted: BTreeSet<u64>,
    /// Appends that returned, not acked, with their location.
    live: BTreeMap<u64, MsgLocation>,
    /// Appended and then covered by a completed sync.
    durable: BTreeSet<u64>,
    /// Acks attempted.
    acked: BTreeSet<u64>,
    /// Acks covered by a completed sync.
    acked_durable: BTreeSet<u64>,
    /// Delivery marks attempted / covered by a sync.
    marked: BTreeSet<u64>,
    marked_durable: BTreeSet<u64>,
    // Operations since the last completed sync.
    pending_appends: Vec<u64>,
    pending_acks: Vec<u64>,
    pending_marks: Vec<u64>,
}

impl Tracker {
    fn synced(&mut self) {
        self.durable.extend(self.pending_appends.drain(..));
        self.acked_durable.extend(self.pending_acks.drain(..));
        self.marked_durable.extend(self.pending_marks.drain(..));
    }
}

fn config(write_buffer: usize) -> StoreConfig {
    StoreConfig {
        segment_size: 4096,
        write_buffer,
    }
}

/// The workload: appends, acks (FIFO-ish and random), delivery marks, purges and syncs.
fn workload(
    disk: &SimBackend,
    seed: u64,
    cfg: StoreConfig,
    t: &mut Tracker,
) -> warren_storage::Result<()> {
    let mut rng = Rng(seed);
    let mut store = QueueStore::create(disk.shared(), "/data/q".as_ref(), cfg)?;
    let mut next_id = 0u64;
    for _ in 0..120 {
        match rng.below(100) {
            0..=49 => {
                let id = next_id;
                next_id += 1;
                t.attempted.insert(id);
                let loc = append_id(&mut store, id, 1 + id.is_multiple_of(5) as usize * 30)?;
                t.live.insert(id, loc);
                t.pending_appends.push(id);
            }
            50..=69 if !t.live.is_empty() => {
                // Mostly the oldest (consumers keep up), sometimes any.
                let idx = if rng.below(3) == 0 {
                    rng.below(t.live.len() as u64) as usize
                } else {
                    0
                };
                let (&id, &loc) = t.live.iter().nth(idx).unwrap();
                t.acked.insert(id);
                store.ack(loc)?;
                t.live.remove(&id);
                t.pending_acks.push(id);
            }
            70..=76 if !t.live.is_empty() => {
                let idx = rng.below(t.live.len() as u64) as usize;
                let (&id, &loc) = t.live.iter().nth(idx).unwrap();
                t.marked.insert(id);
                store.mark_delivered(loc)?;
                t.pending_marks.push(id);
            }
            77 if !t.live.is_empty() => {
                // Purge all but one "unacked" message.
                let keep = *t.live.keys().next_back().unwrap();
                let ids: Vec<u64> = t.live.keys().copied().filter(|i| *i != keep).collect();
                let locs: Vec<MsgLocation> = ids.iter().map(|i| t.live[i]).collect();
                t.acked.extend(ids.iter().copied());
                store.purge(&locs)?;
                for i in ids {
                    t.live.remove(&i);
                    t.pending_acks.push(i);
                }
            }
            _ => {
                store.sync_now()?;
                t.synced();
            }
        }
    }
    store.sync_now()?;
    t.synced();
    Ok(())
}

fn verify(disk: &SimBackend, cfg: StoreConfig, t: &Tracker, what: &str) -> Vec<(u64, MsgLocation)> {
    let r = QueueStore::recover(disk.shared(), "/data/q".as_ref(), cfg)
        .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    let mut seen = Vec::new();
    for m in &r.messages {
        let msg = r
            .store
            .read(m.loc)
            .unwrap_or_else(|e| panic!("{what}: read of {:?} failed: {e}", m.loc));
        let id = check_message(&msg, 1 + (u64::from(msg.body.len() > 300)) as usize * 30);
        assert!(t.attempted.contains(&id), "{what}: phantom message {id}");
        assert!(
            !t.acked_durable.contains(&id),
            "{what}: acked+synced message {id} came back"
        );
        if m.delivered {
            assert!(
                t.marked.contains(&id),
                "{what}: {id} delivered without a mark"
            );
        } else {
            assert!(
                !t.marked_durable.contains(&id),
                "{what}: synced delivery mark of {id} lost"
            );
        }
        assert_eq!(
            (m.flags, m.timestamp_ms),
            ((id % 4) as u8, id * 1000),
            "{what}: head of {id}"
        );
        seen.push((id, m.loc));
    }
    let ids: Vec<u64> = seen.iter().map(|s| s.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what}: order/duplicates {ids:?}"
    );
    for id in &t.durable {
        if !t.acked.contains(id) {
            assert!(
                ids.contains(id),
                "{what}: synced message {id} lost; got {ids:?}"
            );
        }
    }
    // The recovered store keeps working: append, ack the first, sync, lose everything
    // unsynced, and check again.
    let mut store = r.store;
    let fresh = append_id(&mut store, 1_000_000, 1).unwrap();
    if let Some((_, first)) = seen.first() {
        store.ack(*first).unwrap();
    }
    store.sync_now().unwrap();
    drop(store);
    let disk2 = disk.crash(CrashMode::LoseUnsynced);
    let r2 = QueueStore::recover(disk2.shared(), "/data/q".as_ref(), cfg).unwrap();
    let mut want: Vec<MsgLocation> = seen.iter().skip(1).map(|s| s.1).collect();
    want.push(fresh);
    let got: Vec<MsgLocation> = r2.messages.iter().map(|m| m.loc).collect();
    assert_eq!(got, want, "{what}: second recovery");
    seen
}

fn crash_every_boundary(seed: u64, write_buffer: usize) {
    let cfg = config(write_buffer);
    let probe = SimBackend::new();
    let mut t = Tracker::default();
    workload(&probe, seed, cfg, &mut t).unwrap();
    let total = probe.op_count();
    assert!(total > 50, "workload too small: {total} ops");
    verify(&probe, cfg, &t, "no crash");
    for k in 0..=total {
        let disk = SimBackend::new();
        disk.fail_after(k);
        let mut t = Tracker::default();
        let res = workload(&disk, seed, cfg, &mut t);
        assert_eq!(res.is_err(), k < total, "op {k} of {total}");
        let modes = [
            CrashMode::LoseUnsynced,
            CrashMode::KeepAll,
            CrashMode::Random(k),
            CrashMode::Random(k ^ 0xABCDEF),
            CrashMode::Random(k.wrapping_mul(31) + seed),
        ];
        for mode in modes {
            let rebooted = disk.crash(mode);
            verify(
                &rebooted,
                cfg,
                &t,
                &format!("seed {seed} buf {write_buffer} crash at op {k}/{total} {mode:?}"),
            );
        }
    }
}

#[test]
fn queue_store_survives_a_crash_at_every_boundary_unbuffered() {
    // A write buffer smaller than any record: one write per append.
    for seed in 1..=3 {
        crash_every_boundary(seed, 16);
    }
}

#[test]
fn queue_store_survives_a_crash_at_every_boundary_buffered() {
    // Several records per write: torn writes cut records in the middle.
    for seed in 11..=13 {
        crash_every_boundary(seed, 1024);
    }
}

// ---- definitions ----

fn args(i: u64) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(ShortString::from("x-n"), AMQPValue::LongLongInt(i as i64));
    t
}

fn random_change(rng: &mut Rng) -> DefChange {
    let v = format!("v{}", rng.below(2));
    let n = format!("n{}", rng.below(4));
    match rng.below(10) {
        0 => DefChange::PutVhost(VhostDef {
            name: v,
            description: String::new(),
            tags: vec![],
        }),
        1 => DefChange::DeleteVhost { name: v },
        2 => DefChange::PutUser(UserDef {
            name: n,
            password_hash: "h".into(),
            hashing_algorithm: "sha256".into(),
            tags: vec![],
        }),
        3 | 4 => DefChange::PutQueue(QueueDef {
            vhost: v,
            name: n,
            durable: true,
            auto_delete: false,
            arguments: args(rng.below(3)),
        }),
        5 => DefChange::DeleteQueue { vhost: v, name: n },
        6 => DefChange::PutExchange(ExchangeDef {
            vhost: v,
            name: n,
            kind: "topic".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }),
        7 => DefChange::DeleteExchange { vhost: v, name: n },
        _ => {
            let b = BindingDef {
                vhost: v,
                source: format!("n{}", rng.below(4)),
                destination: n,
                destination_is_queue: rng.below(2) == 0,
                routing_key: format!("k{}", rng.below(2)),
                arguments: args(rng.below(2)),
            };
            if rng.below(3) == 0 {
                DefChange::DeleteBinding(b)
            } else {
                DefChange::PutBinding(b)
            }
        }
    }
}

/// Applies changes across three opens (each open compacts); returns the committed state and
/// the change in flight when the disk died, if any.
fn defs_workload(disk: &SimBackend, seed: u64, committed: &mut DefinitionSet) -> Option<DefChange> {
    let mut rng = Rng(seed);
    for _round in 0..3 {
        let Ok(mut defs) = Definitions::open(disk.shared(), Path::new("/data/defs")) else {
            return None;
        };
        assert_eq!(defs.state(), committed);
        for _ in 0..15 {
            let c = random_change(&mut rng);
            if defs.apply(c.clone()).is_err() {
                return Some(c);
            }
            committed.apply(&c);
        }
    }
    None
}

#[test]
fn definitions_survive_a_crash_at_every_boundary() {
    for seed in 1..=4 {
        let probe = SimBackend::new();
        let mut full = DefinitionSet::default();
        assert!(defs_workload(&probe, seed, &mut full).is_none());
        assert!(!probe.is_crashed());
        let total = probe.op_count();
        for k in 0..=total {
            let disk = SimBackend::new();
            disk.fail_after(k);
            let mut committed = DefinitionSet::default();
            let in_flight = defs_workload(&disk, seed, &mut committed);
            let mut with = committed.clone();
            if let Some(c) = &in_flight {
                with.apply(c);
            }
            for mode in [
                CrashMode::LoseUnsynced,
                CrashMode::KeepAll,
                CrashMode::Random(k),
                CrashMode::Random(k + 1000),
            ] {
                let rebooted = disk.crash(mode);
                let defs = Definitions::open(rebooted.shared(), Path::new("/data/defs"))
                    .unwrap_or_else(|e| panic!("seed {seed} op {k} {mode:?}: {e}"));
                assert!(
                    defs.state() == &committed || defs.state() == &with,
                    "seed {seed} op {k}/{total} {mode:?}: state differs"
                );
                // And it reopens to the same state (the compaction it did is sound).
                let state = defs.state().clone();
                drop(defs);
                let again = Definitions::open(rebooted.shared(), Path::new("/data/defs")).unwrap();
                assert_eq!(again.state(), &state);
            }
        }
    }
}
