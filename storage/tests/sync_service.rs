//! The group-commit service: completions arrive after the fsync, requests are batched across
//! threads and stores, same-file requests are synced once, failures reach the completion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::mpsc;
use std::sync::Arc;

use common::append_id;
use warren_storage::{CrashMode, QueueStore, SimBackend, StoreConfig, SyncService};

#[test]
fn completion_means_durable() {
    let disk = SimBackend::new();
    let svc = SyncService::start().unwrap();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    for id in 0..50 {
        let loc = append_id(&mut s, id, 1).unwrap();
        let tx = tx.clone();
        svc.request(s.prepare_sync().unwrap(), move |r| {
            tx.send((loc, r)).unwrap();
        });
    }
    let mut confirmed = Vec::new();
    for _ in 0..50 {
        let (loc, r) = rx.recv().unwrap();
        r.unwrap();
        confirmed.push(loc);
    }
    // Completions come in request order (batches are sequential, a batch completes in order).
    assert!(confirmed.windows(2).all(|w| w[0] < w[1]));
    let after = disk.crash(CrashMode::LoseUnsynced);
    let r = QueueStore::recover(after.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
    assert_eq!(
        r.messages.iter().map(|m| m.loc).collect::<Vec<_>>(),
        confirmed
    );
    let st = svc.stats();
    assert_eq!(st.requests, 50);
    assert!(st.fsyncs <= 50 + st.batches, "{st:?}");
}

#[test]
fn many_threads_many_stores_are_batched() {
    let disk = SimBackend::new();
    let svc = Arc::new(SyncService::start().unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let svc = Arc::clone(&svc);
            let disk = disk.clone();
            std::thread::spawn(move || {
                let dir = format!("/q{t}");
                let mut s = QueueStore::create(disk.shared(), dir.as_ref(), StoreConfig::default())
                    .unwrap();
                let (tx, rx) = mpsc::channel();
                let mut in_flight = 0;
                for id in 0..500 {
                    append_id(&mut s, id, 1).unwrap();
                    if id % 5 == 4 {
                        let tx = tx.clone();
                        svc.request(s.prepare_sync().unwrap(), move |r| tx.send(r).unwrap());
                        in_flight += 1;
                        // Keep a few requests in flight, as a busy queue would.
                        while in_flight > 3 {
                            rx.recv().unwrap().unwrap();
                            in_flight -= 1;
                        }
                    }
                }
                for _ in 0..in_flight {
                    rx.recv().unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = svc.stats();
    assert_eq!(st.requests, 4 * 100);
    assert!(st.batches <= st.requests);
    for t in 0..4 {
        let dir = format!("/q{t}");
        let r = QueueStore::recover(
            disk.crash(CrashMode::LoseUnsynced).shared(),
            dir.as_ref(),
            StoreConfig::default(),
        )
        .unwrap();
        assert_eq!(r.messages.len(), 500);
    }
}

#[test]
fn a_failed_fsync_reaches_the_completion() {
    let disk = SimBackend::new();
    let svc = SyncService::start().unwrap();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
    append_id(&mut s, 1, 1).unwrap();
    let h = s.prepare_sync().unwrap();
    disk.fail_after(0);
    let (tx, rx) = mpsc::channel();
    svc.request(h, move |r| tx.send(r).unwrap());
    assert!(rx.recv().unwrap().is_err());
}

#[test]
fn shutdown_completes_pending_requests() {
    let disk = SimBackend::new();
    let svc = SyncService::start().unwrap();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    for id in 0..10 {
        append_id(&mut s, id, 1).unwrap();
        let tx = tx.clone();
        svc.request(s.prepare_sync().unwrap(), move |r| tx.send(r).unwrap());
    }
    svc.shutdown();
    assert_eq!(rx.try_iter().filter(|r| r.is_ok()).count(), 10);
}

#[test]
fn a_panicking_completion_does_not_stop_the_service() {
    let disk = SimBackend::new();
    let svc = SyncService::start().unwrap();
    let mut s = QueueStore::create(disk.shared(), "/q".as_ref(), StoreConfig::default()).unwrap();
    append_id(&mut s, 1, 1).unwrap();
    svc.request(s.prepare_sync().unwrap(), |_| panic!("completion bug"));
    let (tx, rx) = mpsc::channel();
    append_id(&mut s, 2, 1).unwrap();
    svc.request(s.prepare_sync().unwrap(), move |r| tx.send(r).unwrap());
    assert!(rx.recv().unwrap().is_ok());
}
