//! Pure pacing and bookkeeping for producers: a rate limiter that tells how many messages may
//! go out now, and a tracker of outstanding publisher confirms.

use std::collections::VecDeque;
use std::time::Duration;

/// Paces a producer at `rate` messages per second from its start: message k (0-based) is due
/// at k / rate seconds. When the producer falls behind by more than `max_burst` messages (a
/// stall, a blocked connection), the backlog is dropped rather than sent in one burst, so a
/// fixed-rate run measures latency at that rate, not of a catch-up burst.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    max_burst: u64,
    /// Messages given up on while behind; they shift the schedule.
    skipped: u64,
}

impl Pacer {
    /// `rate` > 0. The burst allowance is a tenth of a second's worth, at least 1.
    pub fn new(rate: f64) -> Self {
        Pacer {
            rate,
            max_burst: ((rate / 10.0) as u64).max(1),
            skipped: 0,
        }
    }

    /// Messages due by `elapsed` since the start (the first is due at once).
    fn due(&self, elapsed: Duration) -> u64 {
        ((elapsed.as_secs_f64() * self.rate) as u64 + 1).saturating_sub(self.skipped)
    }

    /// How many more messages may be sent now, given `sent` so far.
    pub fn allowance(&mut self, elapsed: Duration, sent: u64) -> u64 {
        let due = self.due(elapsed);
        let behind = due.saturating_sub(sent);
        if behind > self.max_burst {
            self.skipped += behind - self.max_burst;
            return self.max_burst;
        }
        behind
    }

    /// Time since the start at which message number `sent` (0-based) becomes due.
    pub fn next_due(&self, sent: u64) -> Duration {
        // Rounded up to the next microsecond so that waking at that time always finds it due.
        let micros = ((sent + self.skipped) as f64 * 1e6 / self.rate).ceil();
        Duration::from_micros(micros as u64)
    }
}

/// Publisher confirms: publish sequence numbers start at 1 on a channel in confirm mode; the
/// broker acks or nacks them, singly or `multiple` (everything up to the tag).
#[derive(Debug, Default, Clone)]
pub struct ConfirmTracker {
    /// Sequence number of `pending[0]`.
    base: u64,
    /// true = settled, for sequence numbers base..base+len.
    pending: VecDeque<bool>,
    outstanding: u64,
}

impl ConfirmTracker {
    pub fn new() -> Self {
        ConfirmTracker {
            base: 1,
            pending: VecDeque::new(),
            outstanding: 0,
        }
    }

    pub fn published(&mut self, n: u64) {
        self.pending.extend((0..n).map(|_| false));
        self.outstanding += n;
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Settles `tag` (or everything up to it); returns how many were newly settled. Unknown or
    /// repeated tags settle nothing.
    pub fn settle(&mut self, tag: u64, multiple: bool) -> u64 {
        if tag < self.base {
            return 0;
        }
        let offset = tag - self.base;
        let Ok(offset) = usize::try_from(offset) else {
            return 0;
        };
        if offset >= self.pending.len() {
            return 0;
        }
        let mut newly = 0;
        let range = if multiple {
            0..=offset
        } else {
            offset..=offset
        };
        for i in range {
            if let Some(slot) = self.pending.get_mut(i) {
                if !*slot {
                    *slot = true;
                    newly += 1;
                }
            }
        }
        while self.pending.front() == Some(&true) {
            self.pending.pop_front();
            self.base += 1;
        }
        self.outstanding -= newly;
        newly
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn pacer_follows_the_schedule() {
        let mut p = Pacer::new(1000.0);
        assert_eq!(p.allowance(ms(0), 0), 1);
        assert_eq!(p.allowance(ms(0), 1), 0);
        assert_eq!(p.next_due(1), ms(1));
        assert_eq!(p.allowance(ms(1), 1), 1);
        assert_eq!(p.allowance(ms(10), 2), 9);
        // Over one second at 1000/s: 1000 messages plus the one due at t=0.
        let mut p = Pacer::new(1000.0);
        let mut sent = 0;
        for t in 0..1000 {
            sent += p.allowance(ms(t), sent);
        }
        assert_eq!(sent, 1000);
    }

    #[test]
    fn pacer_drops_a_large_backlog() {
        let mut p = Pacer::new(1000.0);
        assert_eq!(p.allowance(ms(0), 0), 1);
        // A 5 s stall: only a tenth of a second's worth goes out at once.
        assert_eq!(p.allowance(ms(5000), 1), 100);
        assert_eq!(p.allowance(ms(5000), 101), 0);
        // And the schedule resumes from there.
        assert_eq!(p.next_due(101), ms(5001));
        assert_eq!(p.allowance(ms(5001), 101), 1);
    }

    #[test]
    fn slow_rates() {
        let mut p = Pacer::new(0.5);
        assert_eq!(p.allowance(ms(0), 0), 1);
        assert_eq!(p.allowance(ms(1999), 1), 0);
        assert_eq!(p.next_due(1), ms(2000));
        assert_eq!(p.allowance(ms(2000), 1), 1);
    }

    #[test]
    fn confirms_single_multiple_and_out_of_order() {
        let mut t = ConfirmTracker::new();
        t.published(5);
        assert_eq!(t.outstanding(), 5);
        assert_eq!(t.settle(2, false), 1);
        assert_eq!(t.settle(2, false), 0);
        assert_eq!(t.outstanding(), 4);
        assert_eq!(t.settle(3, true), 2);
        assert_eq!(t.outstanding(), 2);
        assert_eq!(t.settle(9, true), 0);
        assert_eq!(t.settle(0, true), 0);
        t.published(2);
        assert_eq!(t.settle(7, true), 4);
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.settle(7, true), 0);
    }
}
