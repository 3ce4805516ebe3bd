//! A consumer: one connection, one task. It reads big chunks, splits frames in place and looks
//! only at what it needs: the delivery tag of basic.deliver, the body size of the header and
//! the first 8 body bytes (the send timestamp). Acks for a whole chunk go out in one write.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use tokio::io::Interest;
use tokio::sync::watch;
use warren_protocol::{encode_basic_ack, encode_heartbeat, FrameKind, RawFrame};

use crate::amqp::{
    body_timestamp, close_reason, deliver_tag, epoch_ns, field_table, header_body_size, method_ids,
    Conn, ConnOpts, BASIC_CANCEL, BASIC_DELIVER, BASIC_RETURN, CHANNEL, CHANNEL_CLOSE,
    CONNECTION_CLOSE,
};
use crate::args::Plan;
use crate::histogram::Histogram;
use crate::stats::Counters;

const TICK: Duration = Duration::from_millis(50);

/// What one frame meant to the consumer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing complete yet (a deliver or header whose body is still due, a body fragment).
    Pending,
    /// A whole message: its delivery tag and send timestamp (None if the body is shorter).
    Delivery {
        tag: u64,
        timestamp: Option<u64>,
    },
    Heartbeat,
    /// Any other method, for the caller to judge.
    Method(RawFrame),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Idle,
    Header {
        tag: u64,
    },
    Body {
        tag: u64,
        remaining: u64,
        timestamp: Option<u64>,
        first: bool,
    },
    /// The content of a method we do not care about (basic.return, basic.get-ok).
    SkipHeader,
    SkipBody {
        remaining: u64,
    },
}

/// Turns the frames of channel 1 into deliveries without assembling or copying bodies.
#[derive(Debug, Default)]
pub struct DeliveryParser {
    state: State,
}

impl DeliveryParser {
    pub fn push(&mut self, frame: RawFrame) -> Result<Event> {
        let p = &frame.payload[..];
        let unexpected = |what: &str| anyhow!("unexpected {what} frame from the broker");
        Ok(match (self.state, frame.kind) {
            (_, FrameKind::Heartbeat) => Event::Heartbeat,
            (State::Idle, FrameKind::Method) => match method_ids(p) {
                Some(BASIC_DELIVER) => {
                    let tag = deliver_tag(p).ok_or_else(|| anyhow!("malformed basic.deliver"))?;
                    self.state = State::Header { tag };
                    Event::Pending
                }
                Some(BASIC_RETURN) | Some((60, 71)) => {
                    self.state = State::SkipHeader;
                    Event::Pending
                }
                _ => Event::Method(frame),
            },
            (State::Header { tag }, FrameKind::Header) => {
                let size = header_body_size(p).ok_or_else(|| anyhow!("malformed header"))?;
                if size == 0 {
                    self.state = State::Idle;
                    Event::Delivery {
                        tag,
                        timestamp: None,
                    }
                } else {
                    self.state = State::Body {
                        tag,
                        remaining: size,
                        timestamp: None,
                        first: true,
                    };
                    Event::Pending
                }
            }
            (
                State::Body {
                    tag,
                    remaining,
                    timestamp,
                    first,
                },
                FrameKind::Body,
            ) => {
                let timestamp = if first { body_timestamp(p) } else { timestamp };
                let remaining = remaining.saturating_sub(p.len() as u64);
                if remaining == 0 {
                    self.state = State::Idle;
                    Event::Delivery { tag, timestamp }
                } else {
                    self.state = State::Body {
                        tag,
                        remaining,
                        timestamp,
                        first: false,
                    };
                    Event::Pending
                }
            }
            (State::SkipHeader, FrameKind::Header) => {
                let size = header_body_size(p).ok_or_else(|| anyhow!("malformed header"))?;
                self.state = if size == 0 {
                    State::Idle
                } else {
                    State::SkipBody { remaining: size }
                };
                Event::Pending
            }
            (State::SkipBody { remaining }, FrameKind::Body) => {
                let remaining = remaining.saturating_sub(p.len() as u64);
                self.state = if remaining == 0 {
                    State::Idle
                } else {
                    State::SkipBody { remaining }
                };
                Event::Pending
            }
            (_, FrameKind::Method) => return Err(unexpected("method (content was due)")),
            (_, FrameKind::Header) => return Err(unexpected("content header")),
            (_, FrameKind::Body) => return Err(unexpected("body")),
        })
    }
}

#[derive(Debug)]
pub struct Consumer {
    conn: Conn,
}

#[derive(Debug)]
pub struct ConsumerResult {
    pub last_delivery: Option<Instant>,
    pub latency: Histogram,
}

/// Acks owed for deliveries: every one, or every `every`-th with multiple=true.
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    pub every: u64,
    last_acked: u64,
}

impl AckPolicy {
    pub fn new(every: u64) -> Self {
        AckPolicy {
            every: every.max(1),
            last_acked: 0,
        }
    }

    /// The ack (tag, multiple) to send after delivery `tag`, if any.
    pub fn on_delivery(&mut self, tag: u64) -> Option<(u64, bool)> {
        if self.every == 1 {
            return Some((tag, false));
        }
        if tag.saturating_sub(self.last_acked) >= self.every {
            self.last_acked = tag;
            return Some((tag, true));
        }
        None
    }
}

impl Consumer {
    /// Connects, sets the prefetch and subscribes (basic.consume-ok received on return).
    pub async fn connect(plan: &Plan, idx: usize, opts: ConnOpts) -> Result<Consumer> {
        let mut conn = Conn::open(&plan.uri, opts).await?;
        if plan.qos > 0 {
            conn.qos(plan.qos).await?;
        }
        let queue = plan.consumer_queue(idx);
        if plan.predeclared {
            // Make sure it is there before counting on it (passive: no argument checks).
            conn.queue_declare(queue, true, false, false, field_table(&[]))
                .await?;
        }
        conn.consume(queue, &format!("warren-perf-{idx}"), plan.autoack)
            .await?;
        Ok(Consumer { conn })
    }

    pub async fn run(
        mut self,
        plan: Arc<Plan>,
        counters: Arc<Counters>,
        t0: Instant,
        mut stop: watch::Receiver<bool>,
    ) -> Result<ConsumerResult> {
        let deadline = plan.time.map(|t| t0 + t);
        let mut parser = DeliveryParser::default();
        let mut acks = AckPolicy::new(plan.multi_ack_every);
        let mut latency = Histogram::new();
        let mut scratch: Vec<u64> = Vec::with_capacity(4096);
        let mut received = 0u64;
        let mut last_delivery: Option<Instant> = None;
        let limit = plan.cmessages;
        let stop_when_idle = limit.is_none() && plan.pmessages.is_some();
        // Deliveries can arrive in the same read as consume-ok: they are already buffered and
        // no readiness event will announce them (with the prefetch window full, nothing more
        // comes), so the first pass handles the buffer without waiting.
        let mut leftover = !self.conn.rbuf.is_empty();
        loop {
            if *stop.borrow() || limit.is_some_and(|l| received >= l) {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            let quiet = now.duration_since(last_delivery.unwrap_or(t0));
            if stop_when_idle
                && counters.producers_running.load(Ordering::Relaxed) == 0
                && quiet >= plan.idle_grace
            {
                break;
            }
            if plan.idle_stop.is_some_and(|s| quiet >= s) {
                break;
            }
            let interest = if self.conn.out.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let mut wake = now + TICK;
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                ready = async {
                    if leftover {
                        Ok(tokio::io::Ready::READABLE)
                    } else {
                        self.conn.stream.ready(interest).await
                    }
                } => {
                    let ready = ready?;
                    let buffered = std::mem::take(&mut leftover);
                    if ready.is_readable() && (buffered || self.conn.try_fill()?) {
                        let at = Instant::now();
                        let now_ns = epoch_ns(at);
                        let before = received;
                        while let Some(frame) = self.conn.splitter.decode(&mut self.conn.rbuf)? {
                            if frame.channel != CHANNEL {
                                match frame.kind {
                                    FrameKind::Heartbeat => encode_heartbeat(&mut self.conn.out),
                                    FrameKind::Method
                                        if method_ids(&frame.payload) == Some(CONNECTION_CLOSE) =>
                                    {
                                        bail!("the broker closed: {}", close_reason(&frame.payload));
                                    }
                                    FrameKind::Method => {}
                                    _ => bail!("content on channel {}", frame.channel),
                                }
                                continue;
                            }
                            match parser.push(frame)? {
                                Event::Pending => {}
                                Event::Heartbeat => encode_heartbeat(&mut self.conn.out),
                                Event::Delivery { tag, timestamp } => {
                                    if limit.is_some_and(|l| received >= l) {
                                        continue;
                                    }
                                    received += 1;
                                    if let Some(ts) = timestamp {
                                        scratch.push(now_ns.saturating_sub(ts));
                                    }
                                    if !plan.autoack {
                                        if let Some((tag, multiple)) = acks.on_delivery(tag) {
                                            encode_basic_ack(&mut self.conn.out, CHANNEL, tag, multiple);
                                        }
                                    }
                                }
                                Event::Method(frame) => match method_ids(&frame.payload) {
                                    Some(CHANNEL_CLOSE) => {
                                        bail!("the broker closed: {}", close_reason(&frame.payload));
                                    }
                                    Some(BASIC_CANCEL) => bail!("the broker cancelled the consumer"),
                                    _ => {}
                                },
                            }
                        }
                        if received > before {
                            last_delivery = Some(at);
                            Counters::add(&counters.received, received - before);
                        }
                        if !scratch.is_empty() {
                            for &ns in &scratch {
                                latency.record(ns);
                            }
                            if let Ok(mut h) = counters.interval_latency.lock() {
                                for &ns in &scratch {
                                    h.record(ns);
                                }
                            }
                            scratch.clear();
                        }
                        self.conn.try_flush()?;
                    }
                    if ready.is_writable() {
                        self.conn.try_flush()?;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = stop.changed() => {}
            }
        }
        self.conn.close().await;
        Ok(ConsumerResult {
            last_delivery,
            latency,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::amqp::PublishTemplate;
    use bytes::BytesMut;
    use warren_protocol::{encode_basic_deliver, encode_content, encode_heartbeat, FrameSplitter};

    fn frames(buf: &mut BytesMut) -> Vec<RawFrame> {
        let mut s = FrameSplitter::new(0);
        let mut v = Vec::new();
        while let Some(f) = s.decode(buf).unwrap() {
            v.push(f);
        }
        v
    }

    #[test]
    fn deliveries_with_split_bodies_and_heartbeats() {
        let mut buf = BytesMut::new();
        // A message whose body spans three frames (frame_max 4096), timestamp 77.
        let t = PublishTemplate::new("", "q", false, false, 10_000, 4096);
        let mut publish = BytesMut::new();
        t.encode(&mut publish, 77);
        let mut pf = frames(&mut publish);
        pf.remove(0); // the basic.publish; a deliver goes first instead
        encode_basic_deliver(&mut buf, 1, b"ct", 5, false, b"", b"q");
        let mut all = frames(&mut buf);
        all.extend(pf);
        encode_heartbeat(&mut buf);
        // A 4-byte message: no room for a timestamp.
        encode_basic_deliver(&mut buf, 1, b"ct", 6, false, b"", b"q");
        encode_content(&mut buf, 1, 60, 4, &[0, 0], b"abcd", 0);
        // An empty message.
        encode_basic_deliver(&mut buf, 1, b"ct", 7, false, b"", b"q");
        encode_content(&mut buf, 1, 60, 0, &[0, 0], b"", 0);
        all.extend(frames(&mut buf));

        let mut p = DeliveryParser::default();
        let events: Vec<Event> = all
            .into_iter()
            .map(|f| p.push(f).unwrap())
            .filter(|e| *e != Event::Pending)
            .collect();
        assert_eq!(
            events,
            vec![
                Event::Delivery {
                    tag: 5,
                    timestamp: Some(77)
                },
                Event::Heartbeat,
                Event::Delivery {
                    tag: 6,
                    timestamp: None
                },
                Event::Delivery {
                    tag: 7,
                    timestamp: None
                },
            ]
        );
    }

    #[test]
    fn returns_are_skipped_and_other_methods_surface() {
        let mut buf = BytesMut::new();
        warren_protocol::encode_basic_return(&mut buf, 1, 312, b"NO_ROUTE", b"x", b"k");
        encode_content(&mut buf, 1, 60, 3, &[0, 0], b"abc", 0);
        warren_protocol::encode_basic_ack(&mut buf, 1, 1, false);
        let mut p = DeliveryParser::default();
        let events: Vec<Event> = frames(&mut buf)
            .into_iter()
            .map(|f| p.push(f).unwrap())
            .filter(|e| *e != Event::Pending)
            .collect();
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0], Event::Method(f) if method_ids(&f.payload) == Some((60, 80))));
    }

    #[test]
    fn out_of_order_content_is_an_error() {
        let mut buf = BytesMut::new();
        encode_content(&mut buf, 1, 60, 3, &[0, 0], b"abc", 0);
        let mut p = DeliveryParser::default();
        let f = frames(&mut buf).remove(0);
        assert!(p.push(f).is_err());
    }

    #[test]
    fn ack_policy() {
        let mut single = AckPolicy::new(0);
        assert_eq!(single.on_delivery(1), Some((1, false)));
        assert_eq!(single.on_delivery(2), Some((2, false)));
        let mut multi = AckPolicy::new(3);
        let acks: Vec<_> = (1..=7).filter_map(|t| multi.on_delivery(t)).collect();
        assert_eq!(acks, vec![(3, true), (6, true)]);
    }
}
