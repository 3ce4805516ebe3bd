//! Behaviour of `QueueStore` on its own: append/read/ack, segment rolling and deletion,
//! purge, delete, recovery of torn and corrupt files, poisoning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::{append_id, body_of, check_message};
use warren_storage::{
    Backend, Body, CrashMode, FsBackend, MsgLocation, QueueStore, SimBackend, StorageError,
    StoreConfig, StoredMessage,
};

fn small() -> StoreConfig {
    StoreConfig {
        segment_size: 4096,
        write_buffer: 1024,
    }
}

fn files(disk: &SimBackend, dir: &str) -> Vec<String> {
    let mut v = disk.list_dir(Path::new(dir)).unwrap();
    v.sort();
    v
}

#[test]
fn append_read_from_buffer_and_file() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<MsgLocation> = (0..100).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
    // Some are still in the write buffer, some written, many segments rolled.
    for (i, loc) in locs.iter().enumerate() {
        assert_eq!(check_message(&s.read(*loc).unwrap(), 1), i as u64);
    }
    assert!(s.stats().segments > 3);
    assert_eq!(s.stats().live_messages, 100);
    assert!(
        locs.windows(2).all(|w| w[0] < w[1]),
        "locations sort in publish order"
    );
}

#[test]
fn chunked_and_big_bodies() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let chunks = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")];
    let big = vec![7u8; 50_000]; // bigger than the segment size and the write buffer
    let a = s
        .append(&StoredMessage {
            flags: 1,
            timestamp_ms: 0,
            exchange: b"",
            routing_key: b"q",
            properties: b"",
            body: Body::Chunks(&chunks),
        })
        .unwrap();
    let b = s
        .append(&StoredMessage {
            flags: 2,
            timestamp_ms: 0,
            exchange: b"x",
            routing_key: b"",
            properties: b"p",
            body: Body::Contiguous(&big),
        })
        .unwrap();
    let c = append_id(&mut s, 5, 1).unwrap();
    assert_eq!(&s.read(a).unwrap().body[..], b"hello world");
    assert_eq!(&s.read(b).unwrap().body[..], &big[..]);
    assert_eq!(check_message(&s.read(c).unwrap(), 1), 5);
    assert_ne!(
        a.segment, b.segment,
        "a record larger than a segment gets its own"
    );
    s.sync_now().unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<_> = r.messages.iter().map(|m| m.loc).collect();
    assert_eq!(locs, vec![a, b, c]);
    assert_eq!(&r.store.read(b).unwrap().body[..], &big[..]);
}

#[test]
fn fully_acked_segments_are_deleted_and_disk_follows_backlog() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let mut live = std::collections::VecDeque::new();
    for i in 0..2000 {
        live.push_back(append_id(&mut s, i, 1).unwrap());
        if live.len() > 30 {
            s.ack(live.pop_front().unwrap()).unwrap();
        }
    }
    s.sync_now().unwrap();
    // ~30 messages of ~120 bytes live: a handful of 4 KiB segments, not 2000 messages' worth.
    let st = s.stats();
    assert!(st.segments <= 4, "{st:?}");
    assert!(files(&disk, "/q").len() <= 8, "{:?}", files(&disk, "/q"));
    assert_eq!(st.live_messages, 30);
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    let got: Vec<_> = r.messages.iter().map(|m| m.loc).collect();
    assert_eq!(got, Vec::from(live));
}

#[test]
fn recover_each_hands_over_what_recover_collects() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<MsgLocation> = (0..300).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
    for loc in locs.iter().step_by(3) {
        s.ack(*loc).unwrap();
    }
    s.mark_delivered(locs[1]).unwrap();
    s.sync_now().unwrap();
    drop(s);
    let collected = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    drop(collected.store);
    let mut streamed = Vec::new();
    let (store, report) =
        QueueStore::recover_each(disk.shared(), "/q".as_ref(), small(), &mut |m| {
            streamed.push(m)
        })
        .unwrap();
    assert_eq!(streamed, collected.messages);
    assert_eq!(streamed.len(), 200);
    assert!(streamed[0].delivered && !streamed[1].delivered);
    assert_eq!(report.records, collected.report.records);
    assert_eq!(store.stats().live_messages, 200);
}

#[test]
fn double_ack_and_unknown_locations_are_refused() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let a = append_id(&mut s, 1, 1).unwrap();
    let b = append_id(&mut s, 2, 1).unwrap();
    s.ack(a).unwrap();
    assert!(matches!(s.ack(a), Err(StorageError::UnknownLocation(_))));
    assert!(matches!(
        s.mark_delivered(a),
        Err(StorageError::UnknownLocation(_))
    ));
    let bogus = MsgLocation {
        segment: 99,
        offset: 16,
        len: 10,
    };
    assert!(matches!(
        s.ack(bogus),
        Err(StorageError::UnknownLocation(_))
    ));
    assert!(matches!(
        s.read(bogus),
        Err(StorageError::UnknownLocation(_))
    ));
    // The store is not poisoned by caller mistakes.
    s.ack(b).unwrap();
    append_id(&mut s, 3, 1).unwrap();
}

#[test]
fn delivered_marks_survive_restart() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<_> = (0..10).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
    s.mark_delivered(locs[2]).unwrap();
    s.mark_delivered(locs[5]).unwrap();
    s.mark_delivered(locs[5]).unwrap();
    s.ack(locs[3]).unwrap();
    s.sync_now().unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    let got: Vec<(u32, bool)> = r
        .messages
        .iter()
        .map(|m| (m.loc.offset, m.delivered))
        .collect();
    let want: Vec<(u32, bool)> = locs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(i, l)| (l.offset, i == 2 || i == 5))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn purge_deletes_whole_segments_and_keeps_unacked() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<_> = (0..200).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
    // Message 100 is "unacked" (delivered to a consumer): purge removes the rest.
    let ready: Vec<_> = locs.iter().copied().filter(|l| *l != locs[100]).collect();
    s.purge(&ready).unwrap();
    assert_eq!(s.stats().live_messages, 1);
    assert_eq!(s.stats().segments, 1);
    assert_eq!(check_message(&s.read(locs[100]).unwrap(), 1), 100);
    let after = append_id(&mut s, 500, 1).unwrap();
    s.sync_now().unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    let got: Vec<_> = r.messages.iter().map(|m| m.loc).collect();
    assert_eq!(got, vec![locs[100], after]);
    // Purging everything, including the segment being written, leaves no segment behind.
    let mut s = r.store;
    s.purge(&got).unwrap();
    assert_eq!(s.stats().segments, 0);
    let again = append_id(&mut s, 501, 1).unwrap();
    assert!(
        again.segment > after.segment,
        "segment ids are never reused"
    );
    s.sync_now().unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    assert_eq!(r.messages.len(), 1);
}

#[test]
fn delete_removes_the_directory() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/data/q".as_ref(), small()).unwrap();
    append_id(&mut s, 1, 1).unwrap();
    s.sync_now().unwrap();
    s.delete().unwrap();
    assert!(!disk
        .list_dir(Path::new("/data"))
        .unwrap()
        .contains(&"q".to_string()));
}

#[test]
fn torn_tail_is_truncated_not_fatal() {
    for cut in 1..40u64 {
        let disk = SimBackend::new();
        let mut s =
            QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
        let locs: Vec<_> = (0..5).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
        s.sync_now().unwrap();
        drop(s);
        let path = Path::new("/q/msgs.0000000001");
        let full = disk.file_contents(path).unwrap();
        // Simulate a torn last record: recreate the file shorter.
        let f = disk.open_file(path).unwrap();
        f.set_len(full.len() as u64 - cut).unwrap();
        f.sync().unwrap();
        let r = QueueStore::recover(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
        let got: Vec<_> = r.messages.iter().map(|m| m.loc).collect();
        assert_eq!(got, locs[..4], "cut {cut}");
        assert!(r.report.truncated_bytes > 0);
        // The file was cut back to the last good record, and appends go to a new segment.
        assert_eq!(
            disk.file_contents(path).unwrap().len() as u64,
            u64::from(locs[4].offset)
        );
        let mut s = r.store;
        let n = append_id(&mut s, 9, 1).unwrap();
        assert_eq!(n.segment, 2);
    }
}

#[test]
fn corrupt_record_cuts_its_segment_but_later_segments_survive() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let locs: Vec<_> = (0..100).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
    s.sync_now().unwrap();
    drop(s);
    let victim = locs[5];
    assert_eq!(victim.segment, 1);
    disk.corrupt(
        &Path::new("/q").join(format!("msgs.{:010}", victim.segment)),
        u64::from(victim.offset) + 12,
        &[0xFF],
    )
    .unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    let got: Vec<_> = r.messages.iter().map(|m| m.loc).collect();
    let want: Vec<_> = locs
        .iter()
        .copied()
        .filter(|l| l.segment != 1 || l.offset < victim.offset)
        .collect();
    assert_eq!(got, want);
    for m in &r.messages {
        check_message(&r.store.read(m.loc).unwrap(), 1);
    }
}

#[test]
fn read_detects_corruption_of_live_data() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let a = append_id(&mut s, 1, 1).unwrap();
    s.flush().unwrap();
    disk.corrupt(
        Path::new("/q/msgs.0000000001"),
        u64::from(a.offset) + 20,
        &[0xAA],
    )
    .unwrap();
    assert!(matches!(s.read(a), Err(StorageError::Corrupt { .. })));
}

#[test]
fn io_failure_poisons_the_store() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    append_id(&mut s, 1, 1).unwrap();
    disk.fail_after(0);
    assert!(matches!(s.sync_now(), Err(StorageError::Io { .. })));
    assert!(matches!(
        append_id(&mut s, 2, 1),
        Err(StorageError::Poisoned)
    ));
    let disk = disk.crash(CrashMode::KeepAll);
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    assert_eq!(r.messages.len(), 1);
}

#[test]
fn orphan_ack_files_and_foreign_files_are_handled() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    let a = append_id(&mut s, 1, 1).unwrap();
    s.sync_now().unwrap();
    drop(s);
    let orphan = disk.create_file(Path::new("/q/acks.0000000007")).unwrap();
    orphan.write_all_at(b"whatever", 0).unwrap();
    let torn = disk.create_file(Path::new("/q/msgs.0000000003")).unwrap();
    torn.write_all_at(b"WRN", 0).unwrap();
    disk.create_file(Path::new("/q/README")).unwrap();
    let r = QueueStore::recover(disk.shared(), "/q".as_ref(), small()).unwrap();
    assert_eq!(
        r.messages.iter().map(|m| m.loc).collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(
        files(&disk, "/q"),
        vec!["README".to_string(), "msgs.0000000001".to_string()]
    );
    let mut s = r.store;
    assert_eq!(
        append_id(&mut s, 2, 1).unwrap().segment,
        8,
        "ids stay above any seen"
    );
}

#[test]
fn newer_format_version_is_an_error_not_data_loss() {
    let disk = SimBackend::new();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
    append_id(&mut s, 1, 1).unwrap();
    s.sync_now().unwrap();
    drop(s);
    disk.corrupt(Path::new("/q/msgs.0000000001"), 8, &2u32.to_le_bytes())
        .unwrap();
    assert!(matches!(
        QueueStore::recover(disk.shared(), "/q".as_ref(), small()),
        Err(StorageError::UnsupportedVersion { found: 2, .. })
    ));
}

#[test]
fn real_file_system_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vhost").join("queue");
    let fs: Arc<dyn Backend> = FsBackend::shared();
    let mut s = QueueStore::create(Arc::clone(&fs), &dir, small()).unwrap();
    let locs: Vec<_> = (0..300).map(|i| append_id(&mut s, i, 3).unwrap()).collect();
    for l in &locs[..250] {
        s.ack(*l).unwrap();
    }
    s.mark_delivered(locs[260]).unwrap();
    s.sync_now().unwrap();
    assert!(warren_storage::free_bytes(&dir).unwrap() > 0);
    assert!(warren_storage::raise_open_files_limit()
        .unwrap()
        .is_none_or(|n| n >= 1024));
    drop(s);
    let r = QueueStore::recover(Arc::clone(&fs), &dir, small()).unwrap();
    assert_eq!(
        r.messages.iter().map(|m| m.loc).collect::<Vec<_>>(),
        locs[250..].to_vec()
    );
    assert!(r
        .messages
        .iter()
        .all(|m| m.delivered == (m.loc == locs[260])));
    for m in &r.messages {
        let id = check_message(&r.store.read(m.loc).unwrap(), 3);
        // payload = 15 fixed bytes + exchange + routing key + properties + body
        let rk = 3 + id.to_string().len();
        assert_eq!(body_of(id, 3).len(), m.loc.len as usize - 15 - 9 - rk - 3);
    }
    r.store.delete().unwrap();
    assert!(!dir.exists());
}

/// The confirm path's sync covers appends but leaves acks and delivery marks to the next full
/// sync: after a power loss right after it, every message is back (acked ones redelivered is
/// allowed), and after the full sync the acks hold.
#[test]
fn sync_of_appends_makes_messages_durable_and_leaves_acks_to_the_full_sync() {
    // Writes 6 messages (synced), acks 0, marks 1 delivered, appends 3 more.
    let setup = || {
        let disk = SimBackend::new();
        let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), small()).unwrap();
        let locs: Vec<_> = (0..6).map(|i| append_id(&mut s, i, 1).unwrap()).collect();
        s.sync_now().unwrap();
        s.ack(locs[0]).unwrap();
        s.mark_delivered(locs[1]).unwrap();
        for i in 6..9 {
            append_id(&mut s, i, 1).unwrap();
        }
        s.prepare_sync_appends().unwrap().sync().unwrap();
        (disk, s)
    };
    let after_power_loss = |disk: &SimBackend| -> Vec<(u64, bool)> {
        let lost = disk.crash(CrashMode::LoseUnsynced);
        let r = QueueStore::recover(lost.shared(), "/q".as_ref(), small()).unwrap();
        r.messages
            .iter()
            .map(|m| (check_message(&r.store.read(m.loc).unwrap(), 1), m.delivered))
            .collect()
    };

    // Power loss right after the appends-only sync: the new appends are durable; the unsynced
    // ack and mark are not (message 0 is back, which AMQP allows).
    let (disk, _s) = setup();
    let want: Vec<(u64, bool)> = (0..9).map(|i| (i, false)).collect();
    assert_eq!(after_power_loss(&disk), want);

    // The full sync still covers the ack and the mark the appends-only sync skipped.
    let (disk, mut s) = setup();
    s.prepare_sync().unwrap().sync().unwrap();
    let want: Vec<(u64, bool)> = (1..9).map(|i| (i, i == 1)).collect();
    assert_eq!(after_power_loss(&disk), want);
}
