//! Storage benchmark: append throughput, group commit across queues, and recovery of a large
//! backlog, on the real file system.
//!
//! `cargo run -p warren-storage --release --example bench [-- quick]`
//! The data directory is `$WARREN_BENCH_DIR` (default: a fresh directory under the system temp
//! dir, which must be a real disk for the fsync numbers to mean anything); it is removed after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren_storage::{Body, FsBackend, QueueStore, StoreConfig, StoredMessage, SyncService};

fn msg(body: &[u8]) -> StoredMessage<'_> {
    StoredMessage {
        flags: 0,
        timestamp_ms: 0,
        exchange: b"",
        routing_key: b"bench",
        // A typical small property block: flags for delivery-mode only, delivery-mode = 2.
        properties: &[0x10, 0x00, 0x02],
        body: Body::Contiguous(body),
    }
}

fn append_only(dir: &Path, n: usize, size: usize) {
    let body = vec![0x5Au8; size];
    let mut s = QueueStore::create(
        FsBackend::shared(),
        &dir.join("append"),
        StoreConfig::default(),
    )
    .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        s.append(&msg(&body)).unwrap();
    }
    s.flush().unwrap();
    let write = t.elapsed();
    s.sync_now().unwrap();
    let total = t.elapsed();
    println!(
        "append {n} x {size} B, no fsync per message: {:.0} msg/s ({:.0} MiB/s) page-cache; {:.0} msg/s including one final fsync",
        n as f64 / write.as_secs_f64(),
        (n * size) as f64 / write.as_secs_f64() / (1 << 20) as f64,
        n as f64 / total.as_secs_f64()
    );
    s.delete().unwrap();
}

/// `threads` producer threads each own `queues_per_thread` queues. A thread appends `batch`
/// messages to one of its queues, asks the sync service to fsync it, moves to its next queue,
/// and keeps at most `window` sync requests in flight per queue (like publishers waiting for
/// confirms). Every message is confirmed only after its fsync.
fn group_commit(
    dir: &Path,
    threads: usize,
    queues_per_thread: usize,
    batch: usize,
    window: usize,
    size: usize,
    run_for: Duration,
) {
    let svc = Arc::new(SyncService::start().unwrap());
    let confirmed = Arc::new(AtomicU64::new(0));
    let latency_us = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let svc = Arc::clone(&svc);
            let confirmed = Arc::clone(&confirmed);
            let latency_us = Arc::clone(&latency_us);
            let dir = dir.join(format!("gc-{t}"));
            std::thread::spawn(move || {
                let body = vec![0xA5u8; size];
                let mut stores: Vec<QueueStore> = (0..queues_per_thread)
                    .map(|q| {
                        QueueStore::create(
                            FsBackend::shared(),
                            &dir.join(format!("q{q}")),
                            StoreConfig::default(),
                        )
                        .unwrap()
                    })
                    .collect();
                let (tx, rx) = mpsc::channel::<usize>();
                let mut in_flight = vec![0usize; queues_per_thread];
                while start.elapsed() < run_for {
                    for (q, s) in stores.iter_mut().enumerate() {
                        while in_flight[q] >= window {
                            let done = rx.recv().unwrap();
                            in_flight[done] -= 1;
                        }
                        for _ in 0..batch {
                            s.append(&msg(&body)).unwrap();
                        }
                        let tx = tx.clone();
                        let confirmed = Arc::clone(&confirmed);
                        let latency_us = Arc::clone(&latency_us);
                        let asked = Instant::now();
                        svc.request(s.prepare_sync().unwrap(), move |r| {
                            r.unwrap();
                            confirmed.fetch_add(batch as u64, Ordering::Relaxed);
                            latency_us
                                .fetch_add(asked.elapsed().as_micros() as u64, Ordering::Relaxed);
                            let _ = tx.send(q);
                        });
                        in_flight[q] += 1;
                    }
                }
                for _ in 0..in_flight.iter().sum::<usize>() {
                    rx.recv().unwrap();
                }
                for s in stores {
                    s.delete().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let st = svc.stats();
    let n = confirmed.load(Ordering::Relaxed);
    println!(
        "group commit: {threads} threads x {queues_per_thread} queues, {batch} x {size} B per request, window {window}: \
         {:.0} confirmed msg/s, {:.0} fsyncs/s, {:.0} batches/s, {:.1} appends per fsync, {:.1} requests per batch (max {}), mean confirm latency {:.2} ms",
        n as f64 / secs,
        st.fsyncs as f64 / secs,
        st.batches as f64 / secs,
        n as f64 / st.fsyncs.max(1) as f64,
        st.requests as f64 / st.batches.max(1) as f64,
        st.max_batch,
        latency_us.load(Ordering::Relaxed) as f64 / st.requests.max(1) as f64 / 1000.0,
    );
}

fn recovery(dir: &Path, n: usize, size: usize) {
    let d = dir.join("recover");
    let body = vec![0x33u8; size];
    let mut s = QueueStore::create(FsBackend::shared(), &d, StoreConfig::default()).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        s.append(&msg(&body)).unwrap();
    }
    s.sync_now().unwrap();
    let write = t.elapsed();
    let disk = s.stats().disk_bytes;
    drop(s);
    // Cold-ish: drop the page cache is not possible unprivileged-portably; this measures
    // parsing and checksumming, with the files in the page cache as after a quick restart.
    let t = Instant::now();
    let r = QueueStore::recover(FsBackend::shared(), &d, StoreConfig::default()).unwrap();
    let took = t.elapsed();
    assert_eq!(r.messages.len(), n);
    println!(
        "recovery: {n} x {size} B messages ({:.1} MiB in {} segments, written in {:.2} s) recovered in {:.3} s ({:.1} M msg/s); index {} MiB",
        disk as f64 / (1 << 20) as f64,
        r.report.segments,
        write.as_secs_f64(),
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64() / 1e6,
        (r.messages.capacity() * std::mem::size_of_val(&r.messages[0])) >> 20,
    );
    r.store.delete().unwrap();
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let dir: PathBuf = std::env::var_os("WARREN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).unwrap();
    let secs = Duration::from_secs(if quick { 1 } else { 3 });
    append_only(&dir, if quick { 100_000 } else { 500_000 }, 1024);
    append_only(&dir, if quick { 200_000 } else { 1_000_000 }, 16);
    group_commit(&dir, 1, 1, 1, 1, 1024, secs);
    group_commit(&dir, 1, 1, 10, 4, 1024, secs);
    group_commit(&dir, 1, 1, 100, 16, 1024, secs);
    group_commit(&dir, 2, 8, 10, 2, 1024, secs);
    group_commit(&dir, 2, 8, 50, 4, 1024, secs);
    group_commit(&dir, 2, 50, 20, 2, 1024, secs);
    recovery(&dir, if quick { 100_000 } else { 1_000_000 }, 16);
    if !quick {
        recovery(&dir, 200_000, 1024);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
