//! A producer: one connection, one task. It encodes many publish + header + body frames into
//! one buffer and hands the socket as much as it takes in one write call; confirms, returns
//! and flow control are read from the same socket in the same loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::io::Interest;
use tokio::sync::watch;
use warren_protocol::{encode_heartbeat, FrameKind};

use crate::amqp::{
    ack_fields, close_reason, epoch_ns, method_ids, Conn, ConnOpts, PublishTemplate, BASIC_ACK,
    BASIC_NACK, BASIC_RETURN, CHANNEL_CLOSE, CONNECTION_BLOCKED, CONNECTION_CLOSE,
    CONNECTION_UNBLOCKED,
};
use crate::args::Plan;
use crate::rate::{ConfirmTracker, Pacer};
use crate::stats::Counters;

/// How often an idle loop looks at the stop signal and deadlines anyway.
const TICK: Duration = Duration::from_millis(50);
/// How soon a producer held back by --max-backlog looks again.
const BACKLOG_POLL: Duration = Duration::from_micros(500);

/// Counts this producer out of `producers_running` however its loop ends.
struct Running<'a>(&'a Counters);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .producers_running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Producer {
    conn: Conn,
    template: PublishTemplate,
}

#[derive(Debug, Clone, Copy)]
pub struct ProducerResult {
    /// Last publish written (or last confirm received, with confirms).
    pub end: Instant,
}

impl Producer {
    /// Connects, enables confirms if asked, and prepares the message template.
    pub async fn connect(plan: &Plan, idx: usize, opts: ConnOpts) -> Result<Producer> {
        let mut conn = Conn::open(&plan.uri, opts).await?;
        if plan.confirm.is_some() {
            conn.confirm_select().await?;
        }
        let template = PublishTemplate::new(
            &plan.exchange,
            &plan.routing_key(idx),
            plan.mandatory,
            plan.persistent,
            plan.size,
            conn.frame_max,
        );
        Ok(Producer { conn, template })
    }

    pub async fn run(
        mut self,
        plan: Arc<Plan>,
        counters: Arc<Counters>,
        t0: Instant,
        mut stop: watch::Receiver<bool>,
    ) -> Result<ProducerResult> {
        let deadline = plan.time.map(|t| t0 + t);
        let mut pacer = plan.rate.map(Pacer::new);
        let mut tracker = ConfirmTracker::new();
        let mut published = 0u64;
        let mut blocked = false;
        let mut done_publishing = plan.pmessages == Some(0);
        let mut confirm_deadline: Option<Instant> = None;
        let mut end = t0;
        let wire = self.template.wire_size().max(1);
        let batch = plan.batch_bytes;
        let _running = Running(&counters);
        let result = loop {
            if *stop.borrow() {
                break Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Ok(());
            }
            // Refill the output buffer once it runs low.
            let mut pacer_wake = None;
            if !done_publishing && !blocked && self.conn.out.len() < batch / 2 {
                let mut n = ((batch - self.conn.out.len()) / wire).max(1) as u64;
                if let Some(limit) = plan.pmessages {
                    n = n.min(limit - published);
                }
                if let Some(window) = plan.confirm {
                    n = n.min(window.saturating_sub(tracker.outstanding()));
                }
                if let (Some(max), true) = (plan.max_backlog, plan.consumers > 0) {
                    let received = Counters::get(&counters.received) / plan.copies_per_message();
                    let backlog = Counters::get(&counters.published).saturating_sub(received);
                    if backlog >= max {
                        pacer_wake = Some(now + BACKLOG_POLL);
                    }
                    n = n.min(max.saturating_sub(backlog));
                }
                if let Some(p) = pacer.as_mut() {
                    let allowed = p.allowance(now - t0, published);
                    if allowed < n {
                        let due = t0 + p.next_due(published + allowed);
                        pacer_wake = Some(pacer_wake.map_or(due, |w: Instant| w.min(due)));
                    }
                    n = n.min(allowed);
                }
                if n > 0 {
                    let ts = epoch_ns(now);
                    for _ in 0..n {
                        self.template.encode(&mut self.conn.out, ts);
                    }
                    published += n;
                    if plan.confirm.is_some() {
                        tracker.published(n);
                    }
                    Counters::add(&counters.published, n);
                    end = now;
                    if plan.pmessages == Some(published) {
                        done_publishing = true;
                    }
                    // Hand the kernel what we have right away; wait only if it is full.
                    self.conn.try_flush()?;
                    if self.conn.out.is_empty() && !done_publishing {
                        // The socket took it all: encode the next batch now rather than wait
                        // for a readiness event that will not come (but let others run).
                        tokio::task::yield_now().await;
                        // Confirms already waiting are read without blocking.
                        if self.conn.try_fill()?
                            && self.on_frames(&mut tracker, &counters, &mut blocked)? > 0
                        {
                            end = Instant::now();
                        }
                        continue;
                    }
                }
            }
            if done_publishing && self.conn.out.is_empty() {
                if tracker.outstanding() == 0 {
                    break Ok(());
                }
                let cd = *confirm_deadline.get_or_insert(now + plan.confirm_timeout);
                if now >= cd {
                    break Err(anyhow::anyhow!(
                        "{} confirms still missing after {:?}",
                        tracker.outstanding(),
                        plan.confirm_timeout
                    ));
                }
            }
            let interest = if self.conn.out.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let mut wake = now + TICK;
            for w in [pacer_wake, deadline, confirm_deadline]
                .into_iter()
                .flatten()
            {
                wake = wake.min(w);
            }
            tokio::select! {
                ready = self.conn.stream.ready(interest) => {
                    let ready = ready?;
                    if ready.is_readable()
                        && self.conn.try_fill()?
                        && self.on_frames(&mut tracker, &counters, &mut blocked)? > 0
                    {
                        end = Instant::now();
                    }
                    if ready.is_writable() {
                        self.conn.try_flush()?;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = stop.changed() => {}
            }
        };
        drop(_running);
        if plan.pmessages.is_none() {
            end = Instant::now();
        }
        result?;
        self.conn.close().await;
        Ok(ProducerResult { end })
    }

    /// Handles every complete frame in the read buffer; returns how many confirms arrived.
    fn on_frames(
        &mut self,
        tracker: &mut ConfirmTracker,
        counters: &Counters,
        blocked: &mut bool,
    ) -> Result<u64> {
        let (mut acked, mut nacked, mut returned) = (0, 0, 0);
        while let Some(frame) = self.conn.splitter.decode(&mut self.conn.rbuf)? {
            match frame.kind {
                FrameKind::Heartbeat => encode_heartbeat(&mut self.conn.out),
                // The content of a basic.return: nothing to look at.
                FrameKind::Header | FrameKind::Body => {}
                FrameKind::Method => match method_ids(&frame.payload) {
                    Some(BASIC_ACK) | Some(BASIC_NACK) => {
                        let Some((tag, multiple)) = ack_fields(&frame.payload) else {
                            bail!("malformed basic.ack from the broker");
                        };
                        let n = tracker.settle(tag, multiple);
                        if method_ids(&frame.payload) == Some(BASIC_ACK) {
                            acked += n;
                        } else {
                            nacked += n;
                        }
                    }
                    Some(BASIC_RETURN) => returned += 1,
                    Some(CONNECTION_BLOCKED) => *blocked = true,
                    Some(CONNECTION_UNBLOCKED) => *blocked = false,
                    Some(CHANNEL_CLOSE) | Some(CONNECTION_CLOSE) => {
                        bail!("the broker closed: {}", close_reason(&frame.payload));
                    }
                    _ => {}
                },
            }
        }
        Counters::add(&counters.confirmed, acked);
        Counters::add(&counters.nacked, nacked);
        Counters::add(&counters.returned, returned);
        Ok(acked + nacked)
    }
}
