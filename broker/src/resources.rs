//! Resource alarms, as RabbitMQ has them: the memory held by messages against a high
//! watermark, and free disk space against a limit. While either alarm is on, publishing
//! connections stop reading (TCP backpressure) and capable clients get connection.blocked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// Broker-wide resource state. Invariants: `used` is the sum of the sizes of every live
/// [`MemoryCharge`]; the memory alarm is on exactly while `used >= high`; the disk alarm is
/// whatever the disk watcher last set.
#[derive(Debug)]
pub struct ResourceMonitor {
    used: AtomicU64,
    high: u64,
    /// Paging starts at this many bytes.
    paging: u64,
    disk_alarm: AtomicBool,
    unblocked: Notify,
}

impl ResourceMonitor {
    /// `high` in bytes (0 disables the alarm); paging starts at `high * paging_ratio`.
    pub fn new(high: u64) -> &'static ResourceMonitor {
        Self::with_paging(high, 0.5)
    }

    /// A broker has one monitor for as long as the process runs, and every message holds a
    /// reference to it: a `'static` one costs nothing, where cloning and dropping an `Arc`
    /// per message bounced its count between the publisher's and the consumer's cores.
    /// (Leaked on purpose: one small allocation per broker started.)
    pub fn with_paging(high: u64, paging_ratio: f64) -> &'static ResourceMonitor {
        Box::leak(Box::new(ResourceMonitor {
            used: AtomicU64::new(0),
            high,
            paging: (high as f64 * paging_ratio) as u64,
            disk_alarm: AtomicBool::new(false),
            unblocked: Notify::new(),
        }))
    }

    /// Records `bytes` held until the returned charge is dropped.
    pub fn charge(&'static self, bytes: u64) -> MemoryCharge {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        MemoryCharge {
            monitor: self,
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

    /// Whether queues may keep messages in memory: below the paging threshold (by default
    /// half the watermark), so that paging starts well before publishers are blocked.
    pub fn may_cache(&self) -> bool {
        self.high == 0 || self.used() < self.paging
    }

    /// True while publishers must be held back (memory or disk alarm).
    pub fn is_alarmed(&self) -> bool {
        self.memory_alarm() || self.disk_alarm.load(Ordering::Relaxed)
    }

    pub fn memory_alarm(&self) -> bool {
        self.high != 0 && self.used() >= self.high
    }

    pub fn disk_alarm(&self) -> bool {
        self.disk_alarm.load(Ordering::Relaxed)
    }

    /// Set by the disk watcher from the free space of the data directory's file system.
    pub fn set_disk_alarm(&self, on: bool) {
        let was = self.disk_alarm.swap(on, Ordering::Relaxed);
        if was && !on {
            self.unblocked.notify_waiters();
        }
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
    monitor: &'static ResourceMonitor,
    bytes: u64,
}

impl MemoryCharge {
    pub fn monitor(&self) -> &'static ResourceMonitor {
        self.monitor
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
        let m = ResourceMonitor::new(100);
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
    fn disk_alarm_blocks_until_cleared() {
        let m = ResourceMonitor::new(0);
        m.set_disk_alarm(true);
        assert!(m.is_alarmed() && m.disk_alarm() && !m.memory_alarm());
        m.set_disk_alarm(false);
        assert!(!m.is_alarmed());
    }

    #[test]
    fn zero_disables_the_alarm() {
        let m = ResourceMonitor::new(0);
        let _c = m.charge(u64::MAX / 2);
        assert!(!m.is_alarmed());
    }

    #[tokio::test]
    async fn waiters_wake_when_the_alarm_clears() {
        let m = ResourceMonitor::new(10);
        let c = m.charge(10);
        let waiter = tokio::spawn(async move { m.wait_clear().await });
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
