//! Counters shared by the load tasks, the per-interval progress line and the final JSON line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::histogram::Histogram;

/// Updated by the tasks once per batch (not per message); read by the reporter.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub returned: AtomicU64,
    pub received: AtomicU64,
    /// Producers still publishing (consumers without -D stop once this is 0 and idle).
    pub producers_running: AtomicUsize,
    /// Latencies (ns) since the last progress line.
    pub interval_latency: Mutex<Histogram>,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            published: Self::get(&self.published),
            confirmed: Self::get(&self.confirmed),
            received: Self::get(&self.received),
        }
    }

    /// (p50, p99) in ns of the interval just ended, and a fresh interval.
    pub fn take_interval_latency(&self) -> (Option<u64>, Option<u64>) {
        match self.interval_latency.lock() {
            Ok(mut h) => {
                let r = (h.percentile(50.0), h.percentile(99.0));
                h.reset();
                r
            }
            Err(_) => (None, None),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub published: u64,
    pub confirmed: u64,
    pub received: u64,
}

fn per_sec(delta: u64, dt: Duration) -> f64 {
    let s = dt.as_secs_f64();
    if s > 0.0 {
        delta as f64 / s
    } else {
        0.0
    }
}

fn us(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".to_owned(), |v| format!("{:.0}", v as f64 / 1000.0))
}

/// One progress line: rates over the interval `dt` ending `elapsed` after the start.
pub fn progress_line(
    elapsed: Duration,
    dt: Duration,
    prev: Snapshot,
    now: Snapshot,
    latency: (Option<u64>, Option<u64>),
    confirms: bool,
    json: bool,
) -> String {
    let sent = per_sec(now.published.saturating_sub(prev.published), dt);
    let confirmed = per_sec(now.confirmed.saturating_sub(prev.confirmed), dt);
    let received = per_sec(now.received.saturating_sub(prev.received), dt);
    let t = elapsed.as_secs_f64();
    if json {
        let opt = |v: Option<u64>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
        return format!(
            "{{\"time_s\":{t:.3},\"sent_rate\":{sent:.0},\"confirmed_rate\":{confirmed:.0},\
             \"received_rate\":{received:.0},\"p50_ns\":{},\"p99_ns\":{}}}",
            opt(latency.0),
            opt(latency.1)
        );
    }
    let mut line = format!("time {t:6.1} s, sent {sent:9.0} msg/s");
    if confirms {
        let _ = write!(line, ", confirmed {confirmed:9.0} msg/s");
    }
    let _ = write!(
        line,
        ", received {received:9.0} msg/s, latency p50 {} us p99 {} us",
        us(latency.0),
        us(latency.1)
    );
    line
}

/// JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// JSON number: finite with `decimals`, else null.
pub fn json_num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "null".to_owned()
    }
}

/// The totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub received: u64,
    pub duration: Duration,
    /// From the start to the last publish (or confirm, with -c).
    pub send_duration: Duration,
    /// From the start to the last delivery.
    pub receive_duration: Duration,
    pub latency: Histogram,
    pub errors: Vec<String>,
}

impl Report {
    pub fn to_json(&self) -> String {
        let rate = |n: u64, d: Duration| {
            let s = d.as_secs_f64();
            if s > 0.0 {
                n as f64 / s
            } else {
                0.0
            }
        };
        let lat = |p: f64| {
            self.latency
                .percentile(p)
                .map_or_else(|| "null".to_owned(), |ns| json_num(ns as f64 / 1000.0, 1))
        };
        let min = self
            .latency
            .min()
            .map_or_else(|| "null".to_owned(), |ns| json_num(ns as f64 / 1000.0, 1));
        let max = if self.latency.count() > 0 {
            json_num(self.latency.max() as f64 / 1000.0, 1)
        } else {
            "null".to_owned()
        };
        let errors: Vec<String> = self.errors.iter().map(|e| json_str(e)).collect();
        format!(
            "{{\"scenario\":{},\"producers\":{},\"consumers\":{},\"size\":{},\"sent\":{},\
             \"confirmed\":{},\"nacked\":{},\"returned\":{},\"received\":{},\"duration_s\":{},\
             \"send_duration_s\":{},\"receive_duration_s\":{},\"send_rate\":{},\
             \"receive_rate\":{},\"latency_us\":{{\"p50\":{},\"p95\":{},\"p99\":{},\"max\":{},\
             \"min\":{},\"samples\":{}}},\"errors\":[{}]}}",
            json_str(&self.scenario),
            self.producers,
            self.consumers,
            self.size,
            self.sent,
            self.confirmed,
            self.nacked,
            self.returned,
            self.received,
            json_num(self.duration.as_secs_f64(), 3),
            json_num(self.send_duration.as_secs_f64(), 3),
            json_num(self.receive_duration.as_secs_f64(), 3),
            json_num(rate(self.sent, self.send_duration), 1),
            json_num(rate(self.received, self.receive_duration), 1),
            lat(50.0),
            lat(95.0),
            lat(99.0),
            max,
            min,
            self.latency.count(),
            errors.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn json_escaping() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(json_num(f64::NAN, 1), "null");
        assert_eq!(json_num(1.26, 1), "1.3");
    }

    #[test]
    fn report_json_has_the_documented_fields() {
        let mut latency = Histogram::new();
        for ns in [100, 200, 300] {
            latency.record(ns);
        }
        let r = Report {
            scenario: "a".into(),
            sent: 1000,
            received: 500,
            duration: Duration::from_secs(2),
            send_duration: Duration::from_secs(1),
            receive_duration: Duration::from_secs(2),
            latency,
            errors: vec!["boom".into()],
            ..Report::default()
        };
        let j = r.to_json();
        assert!(j.starts_with("{\"scenario\":\"a\","), "{j}");
        assert!(j.contains("\"sent\":1000,"), "{j}");
        assert!(j.contains("\"send_rate\":1000.0,"), "{j}");
        assert!(j.contains("\"receive_rate\":250.0,"), "{j}");
        assert!(j.contains("\"duration_s\":2.000,"), "{j}");
        assert!(
            j.contains(
                "\"latency_us\":{\"p50\":0.2,\"p95\":0.3,\"p99\":0.3,\"max\":0.3,\"min\":0.1,"
            ),
            "{j}"
        );
        assert!(j.ends_with("\"errors\":[\"boom\"]}"), "{j}");
        // No samples: null latencies, zero rates without a duration.
        let j = Report::default().to_json();
        assert!(j.contains("\"p50\":null"), "{j}");
        assert!(j.contains("\"send_rate\":0.0"), "{j}");
    }

    #[test]
    fn progress_lines() {
        let prev = Snapshot::default();
        let now = Snapshot {
            published: 2000,
            confirmed: 1000,
            received: 500,
        };
        let line = progress_line(
            Duration::from_secs(2),
            Duration::from_millis(500),
            prev,
            now,
            (Some(150_000), None),
            true,
            false,
        );
        assert!(line.contains("sent      4000 msg/s"), "{line}");
        assert!(line.contains("confirmed      2000 msg/s"), "{line}");
        assert!(line.contains("p50 150 us p99 - us"), "{line}");
        let json = progress_line(
            Duration::from_secs(2),
            Duration::from_secs(1),
            prev,
            now,
            (None, Some(7)),
            false,
            true,
        );
        assert!(json.contains("\"sent_rate\":2000"), "{json}");
        assert!(json.contains("\"p50_ns\":null,\"p99_ns\":7"), "{json}");
    }
}
