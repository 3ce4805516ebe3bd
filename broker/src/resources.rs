//! Accounting of the memory held by messages and the high-watermark alarm that makes
//! publishing connections stop reading (TCP backpressure), like RabbitMQ's memory alarm.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Broker-wide message memory. Invariant: `used` is the sum of the sizes of every live
/// [`MemoryCharge`]; the alarm is on exactly while `used >= high`.
#[derive(Debug)]
pub struct MemoryMonitor {
    used: AtomicU64,
    high: u64,
    unblocked: Notify,
}

impl MemoryMonitor {
    /// `high` in bytes; 0 disables the alarm.
    pub fn new(high: u64) -> Arc<MemoryMonitor> {
        Arc::new(MemoryMonitor {
            used: AtomicU64::new(0),
            high,
            unblocked: Notify::new(),
        })
    }

    /// Records `bytes` held until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> MemoryCharge {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        MemoryCharge {
            monitor: self.clone(),
            bytes,
        }
    }

    fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::Relaxed);
        if self.high != 0 && before >= self.high && before - bytes < self.high {
            self.unblocked.notify_waiters();
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn high_watermark(&self) -> u64 {
        self.high
    }

    /// Whether queues may keep in-memory copies of messages they also hold on disk: below half
    /// the watermark, so that paging starts well before publishers are blocked.
    pub fn may_cache(&self) -> bool {
        self.high == 0 || self.used() < self.high / 2
    }

    /// True while publishers must be held back.
    pub fn is_alarmed(&self) -> bool {
        self.high != 0 && self.used() >= self.high
    }

    /// Resolves once the alarm is off (immediately if it is off now).
    pub async fn wait_clear(&self) {
        loop {
            let notified = self.unblocked.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and the await wakes us.
            notified.as_mut().enable();
            if !self.is_alarmed() {
                return;
            }
            notified.await;
        }
    }
}

/// Memory held by one message; released when the message is dropped everywhere.
#[derive(Debug)]
pub struct MemoryCharge {
    monitor: Arc<MemoryMonitor>,
    bytes: u64,
}

impl MemoryCharge {
    pub fn monitor(&self) -> &Arc<MemoryMonitor> {
        &self.monitor
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        self.monitor.release(self.bytes);
    }
}

/// Total RAM of the machine from /proc/meminfo, if readable.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn charges_add_up_and_release_on_drop() {
        let m = MemoryMonitor::new(100);
        let a = m.charge(60);
        assert!(!m.is_alarmed());
        let b = m.charge(40);
        assert!(m.is_alarmed());
        drop(a);
        assert!(!m.is_alarmed());
        assert_eq!(m.used(), 40);
        drop(b);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn zero_disables_the_alarm() {
        let m = MemoryMonitor::new(0);
        let _c = m.charge(u64::MAX / 2);
        assert!(!m.is_alarmed());
    }

    #[tokio::test]
    async fn waiters_wake_when_the_alarm_clears() {
        let m = MemoryMonitor::new(10);
        let c = m.charge(10);
        let waiter = {
            let m = m.clone();
            tokio::spawn(async move { m.wait_clear().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(c);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[test]
    fn meminfo_is_readable_here() {
        assert!(total_memory().is_some_and(|b| b > 0));
    }
}
