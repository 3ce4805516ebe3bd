//! Crash tests with the real binary: persistent messages published with confirms to a durable
//! queue while a consumer receives and acks them, `kill -9` of the broker at a random moment,
//! a restart on the same data directory, then the queue is drained and checked.
//!
//! Each trial has its own data directory and port; several trials run at once (each on its
//! own thread with its own runtime and its own warren process).
//!
//! # What a trial checks after the restart
//!
//! Every message body carries its id, its length, a payload derived from the id and an FNV-1a
//! checksum, and `message-id` carries the id again, so any corruption is detected.
//!
//! 1. *No corruption*: every recovered body and `message-id` is intact.
//! 2. *No phantom*: every recovered id was published.
//! 3. *No duplicate*: no id is recovered twice.
//! 4. *No loss*: every message the broker confirmed (basic.ack to the publisher) is recovered,
//!    unless the consumer had sent an ack for it (see below).
//! 5. *Acks are durable*: a message whose ack is **settled** (defined below) is not recovered.
//! 6. *Redelivered flag*: a recovered message the consumer had received before the crash has
//!    `redelivered = true`.
//! 7. *Order*: recovered messages come in publish order (storage/FORMAT.md, recovery rule 3;
//!    one publisher, one queue, so publish order is id order).
//! 8. No publish is nacked, and after draining and acking everything, a second `kill -9` and
//!    restart leave the queue empty (acks on recovered segments are durable too).
//!
//! # The invariant for consumer acks
//!
//! AMQP 0-9-1 never confirms a basic.ack, so having *sent* an ack proves nothing: the broker
//! may not have read it when it was killed (it may sit in a socket buffer that dies with the
//! process). The broker does process the methods of one channel in order, and answers a
//! synchronous method only after handling everything sent before it on that channel. So the
//! consumer, after every few acks (and whenever it is idle), sends `basic.qos` on the same
//! channel (a harmless synchronous method: the same prefetch again) and waits for `qos-ok`.
//!
//! - An ack is **settled** when a `qos-ok` was received on its channel for a `basic.qos`
//!   written after the ack (lapin's `basic_ack` resolves once the frame is written, and both
//!   methods go through the same ordered frame queue). The broker has then handled the ack,
//!   and Warren writes acks to the OS at once, so a `kill -9` (the OS survives) cannot undo
//!   it: the message must never reappear.
//! - An ack that was written but not followed by a `qos-ok` is **uncertain**: the message may
//!   reappear (exactly once, intact, with `redelivered = true` since it had been delivered)
//!   or not.
//!
//! Deliveries or confirms seen after an ack do *not* settle it: the broker sends them without
//! having necessarily read the ack.
//!
//! # Knobs (environment)
//!
//! - `WARREN_CRASH_TRIALS` (default 20): number of trials. `scripts/crash-soak.sh` raises it.
//! - `WARREN_CRASH_PARALLEL` (default 4): trials running at once.
//! - `WARREN_CRASH_SEED`: base seed (printed by every run) to replay the same random choices.
//!
//! Skipped under `AMQP_ADDR`: it kills and restarts the broker process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::message::{Delivery, DeliveryResult};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use tokio::sync::mpsc;
use warren_tests::{consume_into_channel, skip_unless_warren, Broker};

const QUEUE: &str = "crash-durable";
/// Unconfirmed publishes in flight at most.
const CONFIRM_WINDOW: usize = 256;
/// The consumer settles its acks (basic.qos round trip) after this many.
const BARRIER_EVERY: usize = 16;
/// Upper bound on ids per trial (memory bound if the broker were very fast).
const MAX_MESSAGES: u64 = 500_000;
/// Bound on one trial.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(20);

// ---- deterministic randomness -------------------------------------------------------------

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ---- message bodies -----------------------------------------------------------------------

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Payload length of message `id`: mostly small, some a few KiB, 1 % large enough to span
/// several body frames (frame_max 128 KiB) and to fill 8 MiB segments quickly.
fn payload_len(id: u64) -> usize {
    let mut r = Rng::new(id ^ 0x005e_ed0f_1e46);
    let len = match r.next() % 100 {
        0..=69 => r.range(0, 512),
        70..=98 => r.range(513, 8192),
        _ => r.range(64 * 1024, 300 * 1024),
    };
    len as usize
}

/// `id (u64 LE) | payload length (u32 LE) | payload | fnv1a of everything before (u64 LE)`.
/// The payload is a pseudo-random sequence seeded by the id.
fn body_for(id: u64) -> Vec<u8> {
    let len = payload_len(id);
    let mut body = Vec::with_capacity(len + 28);
    body.extend_from_slice(&id.to_le_bytes());
    body.extend_from_slice(&(len as u32).to_le_bytes());
    let mut state = splitmix(id) | 1;
    while body.len() < len + 12 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        body.extend_from_slice(&state.to_le_bytes());
    }
    body.truncate(len + 12);
    let sum = fnv1a(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

/// The id of an intact body, or what is wrong with it.
fn check_body(body: &[u8]) -> Result<u64, String> {
    if body.len() < 20 {
        return Err(format!("body of {} bytes, shorter than 20", body.len()));
    }
    let id = u64::from_le_bytes(body[0..8].try_into().unwrap());
    let len = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    if body.len() != len + 20 {
        return Err(format!(
            "body claiming id {id} has {} bytes, expected {}",
            body.len(),
            len + 20
        ));
    }
    let sum = u64::from_le_bytes(body[len + 12..].try_into().unwrap());
    if fnv1a(&body[..len + 12]) != sum {
        return Err(format!("body claiming id {id}: checksum mismatch"));
    }
    if len != payload_len(id) {
        return Err(format!("body claiming id {id}: not the length published"));
    }
    Ok(id)
}

/// The id of an intact delivery (body and message-id property agree).
fn check_delivery(d: &Delivery) -> Result<u64, String> {
    let id = check_body(&d.data)?;
    match d.properties.message_id() {
        Some(m) if m.as_str() == id.to_string() => {}
        other => return Err(format!("id {id}: message-id property {other:?}")),
    }
    if *d.properties.delivery_mode() != Some(2) {
        return Err(format!(
            "id {id}: delivery-mode {:?}, published 2",
            d.properties.delivery_mode()
        ));
    }
    Ok(id)
}

// ---- what the clients saw before the crash ------------------------------------------------

#[derive(Debug, Default)]
struct Observed {
    /// Publishes handed to lapin (possibly in the broker).
    sent: BTreeSet<u64>,
    /// Publishes the broker confirmed with basic.ack.
    confirmed: BTreeSet<u64>,
    nacked: BTreeSet<u64>,
    /// Ids the consumer received.
    delivered: BTreeSet<u64>,
    /// Acks written to the socket.
    ack_sent: BTreeSet<u64>,
    /// Acks followed by a qos-ok on the consumer's channel.
    ack_settled: BTreeSet<u64>,
    /// Anomalies seen before the crash (corrupt or duplicate deliveries).
    anomalies: Vec<String>,
}

type Shared = Arc<Mutex<Observed>>;

fn lock(obs: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    obs.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- one trial ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Plan {
    index: usize,
    seed: u64,
    /// Delay between the start of traffic and `kill -9`.
    kill_after: Duration,
    /// The consumer starts this long after the publisher (a backlog builds up).
    consumer_delay: Duration,
    prefetch: u16,
    /// Every `hold_every`-th delivery is kept unacked until `max_held` are held.
    hold_every: u64,
    max_held: usize,
}

impl Plan {
    fn new(index: usize, base_seed: u64) -> Plan {
        let seed = splitmix(base_seed.wrapping_add(index as u64));
        let mut r = Rng::new(seed);
        Plan {
            index,
            seed,
            kill_after: Duration::from_millis(r.range(50, 500)),
            consumer_delay: Duration::from_millis(r.range(0, 100)),
            prefetch: [10, 100, 1000][r.range(0, 2) as usize],
            hold_every: [3, 11, 50][r.range(0, 2) as usize],
            max_held: r.range(1, 8) as usize,
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    sent: usize,
    confirmed: usize,
    delivered: usize,
    settled_acks: usize,
    uncertain_acks: usize,
    uncertain_reappeared: usize,
    recovered: usize,
    recovered_redelivered: usize,
    recovered_unconfirmed: usize,
    failures: Vec<String>,
}

async fn connect(broker: &Broker) -> Connection {
    Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("lapin connect to port {}: {e}", broker.port()))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Records the outcome of one publisher confirm. False when the connection is gone.
fn record_confirm(obs: &Shared, id: u64, outcome: Result<Confirmation, lapin::Error>) -> bool {
    match outcome {
        Ok(Confirmation::Ack(_)) => {
            lock(obs).confirmed.insert(id);
            true
        }
        Ok(Confirmation::Nack(_)) => {
            lock(obs).nacked.insert(id);
            true
        }
        Ok(Confirmation::NotRequested) => {
            lock(obs)
                .anomalies
                .push(format!("publish {id}: confirm not requested"));
            true
        }
        Err(_) => false,
    }
}

async fn publisher(ch: Channel, obs: Shared) {
    let mut window: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    'publish: for id in 0..MAX_MESSAGES {
        let body = body_for(id);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(id.to_string()));
        lock(&obs).sent.insert(id);
        match ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
        {
            Ok(confirm) => window.push_back((id, confirm)),
            Err(_) => break,
        }
        while window.len() >= CONFIRM_WINDOW {
            let (id, confirm) = window.pop_front().unwrap();
            let outcome = match tokio::time::timeout(WAIT, confirm).await {
                Ok(outcome) => outcome,
                Err(_) => break 'publish,
            };
            if !record_confirm(&obs, id, outcome) {
                break 'publish;
            }
        }
    }
    // Confirms lapin received before the connection died still count; the others resolve
    // with an error at once.
    for (id, confirm) in window {
        if let Ok(outcome) = tokio::time::timeout(Duration::from_secs(2), confirm).await {
            record_confirm(&obs, id, outcome);
        }
    }
}

/// Acks sent but not settled yet: the id and the task writing the ack.
type Unsettled = Vec<(u64, tokio::task::JoinHandle<bool>)>;

/// Sends an ack without waiting for it to be written (acks are pipelined; [`barrier`] waits
/// for them), recording it as sent.
fn ack(ch: &Channel, obs: &Shared, unsettled: &mut Unsettled, id: u64, tag: u64) {
    lock(obs).ack_sent.insert(id);
    let ch = ch.clone();
    let write =
        tokio::spawn(async move { ch.basic_ack(tag, BasicAckOptions::default()).await.is_ok() });
    unsettled.push((id, write));
}

/// Waits until every unsettled ack is written, then does the basic.qos round trip that
/// settles them (see the module doc). False when the connection is gone.
async fn barrier(ch: &Channel, obs: &Shared, unsettled: &mut Unsettled, prefetch: u16) -> bool {
    let mut ids = Vec::with_capacity(unsettled.len());
    let mut written = true;
    for (id, write) in unsettled.drain(..) {
        written &= write.await.unwrap_or(false);
        ids.push(id);
    }
    if !written
        || ch
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .is_err()
    {
        return false;
    }
    lock(obs).ack_settled.extend(ids);
    true
}

/// Receives, records and acks. Every `hold_every`-th message is held unacked for a while, so
/// that some delivered messages are unacked at the crash whenever it comes.
async fn consumer(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    obs: Shared,
    plan: Plan,
    stop: Arc<AtomicBool>,
) -> mpsc::UnboundedReceiver<Delivery> {
    let mut held: VecDeque<(u64, u64)> = VecDeque::new();
    let mut unsettled: Unsettled = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let d = match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(_) => {
                if !unsettled.is_empty() && !barrier(&ch, &obs, &mut unsettled, plan.prefetch).await
                {
                    break;
                }
                continue;
            }
        };
        let id = match check_delivery(&d) {
            Ok(id) => id,
            Err(e) => {
                lock(&obs)
                    .anomalies
                    .push(format!("before the crash: corrupt delivery: {e}"));
                continue;
            }
        };
        {
            let mut o = lock(&obs);
            if !o.delivered.insert(id) {
                o.anomalies
                    .push(format!("before the crash: id {id} delivered twice"));
            }
        }
        if id.is_multiple_of(plan.hold_every) {
            held.push_back((id, d.delivery_tag));
            if held.len() > plan.max_held {
                let (hid, htag) = held.pop_front().unwrap();
                ack(&ch, &obs, &mut unsettled, hid, htag);
            }
        } else {
            ack(&ch, &obs, &mut unsettled, id, d.delivery_tag);
        }
        if unsettled.len() >= BARRIER_EVERY
            && !barrier(&ch, &obs, &mut unsettled, plan.prefetch).await
        {
            break;
        }
    }
    rx
}

/// Drains the recovered queue: (id or corruption, redelivered) in delivery order.
async fn drain(broker: &Broker) -> (Vec<(Result<u64, String>, bool)>, Vec<String>) {
    let mut failures = Vec::new();
    let conn = connect(broker).await;
    let ch = conn.create_channel().await.unwrap();
    let count = ch
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..durable()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("the durable queue after the restart: {e}"))
        .message_count() as usize;
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = ch
        .basic_consume(
            QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Errors the consumer saw (a channel or connection closed by the broker), for the report.
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let errs = errors.clone();
    c.set_delegate(move |d: DeliveryResult| {
        let tx = tx.clone();
        let errs = errs.clone();
        async move {
            match d {
                Ok(Some(d)) => {
                    let _ = tx.send(d);
                }
                Ok(None) => {}
                Err(e) => errs.lock().unwrap().push(e.to_string()),
            }
        }
    });
    // Acked as it goes (multiple, up to the highest tag seen), so that any backlog drains
    // through the prefetch window.
    let mut got: Vec<Delivery> = Vec::with_capacity(count);
    let (mut highest, mut acked) = (0, 0);
    let mut channel_ok = true;
    while got.len() < count {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(d)) => {
                highest = highest.max(d.delivery_tag);
                got.push(d);
                // (lapin hands deliveries over out of order: only ack past the last ack.)
                if got.len().is_multiple_of(256) && highest > acked {
                    if let Err(e) = ch
                        .basic_ack(highest, BasicAckOptions { multiple: true })
                        .await
                    {
                        failures.push(format!(
                            "drain: ack (multiple) of tag {highest} after {} deliveries: {e}",
                            got.len()
                        ));
                        channel_ok = false;
                        break;
                    }
                    acked = highest;
                }
            }
            _ => {
                failures.push(format!(
                    "drain: passive declare said {count} messages, got {} (then none within \
                     {WAIT:?})",
                    got.len()
                ));
                break;
            }
        }
    }
    // Nothing beyond the count.
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        failures.push(format!(
            "drain: more messages than the {count} passive declare reported (tag {})",
            d.delivery_tag
        ));
        highest = highest.max(d.delivery_tag);
        got.push(d);
    }
    got.sort_by_key(|d| d.delivery_tag);
    if channel_ok && highest > acked {
        if let Err(e) = ch
            .basic_ack(highest, BasicAckOptions { multiple: true })
            .await
        {
            failures.push(format!("drain: final ack of tag {highest}: {e}"));
            channel_ok = false;
        }
    }
    if channel_ok && highest > 0 {
        // Settles the acks (see the module doc).
        if let Err(e) = ch.basic_qos(1000, BasicQosOptions::default()).await {
            failures.push(format!("drain: basic.qos after the acks: {e}"));
        }
    }
    for e in errors.lock().unwrap().iter() {
        failures.push(format!("drain: the consumer got an error: {e}"));
    }
    if !failures.is_empty() {
        let tags: Vec<u64> = got.iter().map(|d| d.delivery_tag).collect();
        let gaps = tags.windows(2).filter(|w| w[1] != w[0] + 1).count();
        failures.push(format!(
            "drain: {} deliveries, tags {:?}..{:?}, {gaps} gaps, connection open: {}",
            got.len(),
            tags.first(),
            tags.last(),
            conn.status().connected()
        ));
    }
    let out = got
        .iter()
        .map(|d| (check_delivery(d), d.redelivered))
        .collect();
    let _ = conn.close(200, "drained".into()).await;
    (out, failures)
}

async fn queue_count(broker: &Broker) -> Result<u32, String> {
    let conn = connect(broker).await;
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..durable()
            },
            FieldTable::default(),
        )
        .await
        .map(|ok| ok.message_count())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "bye".into()).await;
    r
}

async fn run_trial(plan: Plan, data_dir: PathBuf) -> Report {
    let mut broker = Broker::start_in(&data_dir, &[]).expect("start warren");
    let pub_conn = connect(&broker).await;
    let pub_ch = pub_conn.create_channel().await.unwrap();
    pub_ch
        .queue_declare(QUEUE.into(), durable(), FieldTable::default())
        .await
        .unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let con_conn = connect(&broker).await;
    let con_ch = con_conn.create_channel().await.unwrap();
    con_ch
        .basic_qos(plan.prefetch, BasicQosOptions::default())
        .await
        .unwrap();

    let obs: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let publisher = tokio::spawn(publisher(pub_ch.clone(), obs.clone()));
    tokio::time::sleep(plan.consumer_delay).await;
    let rx = consume_into_channel(&con_ch, QUEUE, "crash-consumer")
        .await
        .unwrap();
    let consumer = tokio::spawn(consumer(
        con_ch.clone(),
        rx,
        obs.clone(),
        plan,
        stop.clone(),
    ));
    tokio::time::sleep(plan.kill_after.saturating_sub(t0.elapsed())).await;

    // ---- crash ----
    broker.kill();
    // Let lapin notice and hand over whatever it had already read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(WAIT, publisher)
        .await
        .expect("publisher task ends after the kill")
        .unwrap();
    let mut rx = tokio::time::timeout(WAIT, consumer)
        .await
        .expect("consumer task ends after the kill")
        .unwrap();
    // Deliveries lapin had read but the consumer had not taken yet were delivered too.
    while let Ok(d) = rx.try_recv() {
        if let Ok(id) = check_delivery(&d) {
            lock(&obs).delivered.insert(id);
        }
    }
    drop((pub_conn, con_conn));

    // ---- restart ----
    broker.restart().expect("warren restarts after kill -9");
    let (recovered, mut failures) = drain(&broker).await;

    let obs = std::mem::take(&mut *lock(&obs));
    failures.extend(obs.anomalies.iter().cloned());
    let mut report = Report {
        sent: obs.sent.len(),
        confirmed: obs.confirmed.len(),
        delivered: obs.delivered.len(),
        settled_acks: obs.ack_settled.len(),
        uncertain_acks: obs.ack_sent.len() - obs.ack_sent.intersection(&obs.ack_settled).count(),
        recovered: recovered.len(),
        ..Report::default()
    };
    if !obs.nacked.is_empty() {
        failures.push(format!(
            "{} publishes nacked, e.g. {:?}",
            obs.nacked.len(),
            first(&obs.nacked)
        ));
    }
    // Per recovered id: how often, and whether every copy was redelivered.
    let mut seen: BTreeMap<u64, (usize, bool)> = BTreeMap::new();
    let mut order: Vec<u64> = Vec::new();
    for (outcome, redelivered) in &recovered {
        match outcome {
            Ok(id) => {
                let e = seen.entry(*id).or_insert((0, true));
                e.0 += 1;
                e.1 &= *redelivered;
                order.push(*id);
                if *redelivered {
                    report.recovered_redelivered += 1;
                }
            }
            Err(e) => failures.push(format!("after the restart: corrupt message: {e}")),
        }
    }
    let dups: Vec<u64> = seen
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(id, _)| *id)
        .collect();
    if !dups.is_empty() {
        failures.push(format!(
            "{} ids recovered more than once, e.g. {:?}",
            dups.len(),
            &dups[..dups.len().min(10)]
        ));
    }
    let phantoms: Vec<u64> = seen
        .keys()
        .filter(|id| !obs.sent.contains(id))
        .copied()
        .collect();
    if !phantoms.is_empty() {
        failures.push(format!("ids recovered but never published: {phantoms:?}"));
    }
    let lost: Vec<u64> = obs
        .confirmed
        .iter()
        .filter(|id| !obs.ack_sent.contains(id) && !seen.contains_key(id))
        .copied()
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} confirmed and never acked messages lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    let resurrected: Vec<u64> = obs
        .ack_settled
        .iter()
        .filter(|id| seen.contains_key(id))
        .copied()
        .collect();
    if !resurrected.is_empty() {
        failures.push(format!(
            "{} messages whose ack was settled (qos-ok after it) came back, e.g. {:?}",
            resurrected.len(),
            &resurrected[..resurrected.len().min(10)]
        ));
    }
    let not_redelivered: Vec<u64> = seen
        .iter()
        .filter(|(id, (_, redelivered))| obs.delivered.contains(id) && !redelivered)
        .map(|(id, _)| *id)
        .collect();
    if !not_redelivered.is_empty() {
        failures.push(format!(
            "{} messages delivered before the crash came back with redelivered=false, e.g. {:?}",
            not_redelivered.len(),
            &not_redelivered[..not_redelivered.len().min(10)]
        ));
    }
    if let Some(w) = order.windows(2).find(|w| w[0] >= w[1]) {
        failures.push(format!(
            "recovered messages out of publish order: {} before {}",
            w[0], w[1]
        ));
    }
    report.uncertain_reappeared = obs
        .ack_sent
        .iter()
        .filter(|id| !obs.ack_settled.contains(id) && seen.contains_key(id))
        .count();
    report.recovered_unconfirmed = seen.keys().filter(|id| !obs.confirmed.contains(id)).count();

    // ---- everything acked: a second crash must leave the queue empty ----
    broker
        .restart()
        .expect("warren restarts after the second kill -9");
    match queue_count(&broker).await {
        Ok(0) => {}
        Ok(n) => failures.push(format!(
            "after draining, acking (settled) and a second kill -9: {n} messages came back"
        )),
        Err(e) => failures.push(format!("after the second restart: {e}")),
    }
    if !failures.is_empty() {
        let logs = broker.logs();
        let tail: Vec<&str> = logs.lines().rev().take(30).collect();
        failures.push(format!(
            "warren log (last 30 lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    report.failures = failures;
    report
}

/// A trial's plan, report, and its kept data dir if it failed.
type Outcome = (Plan, Report, Option<PathBuf>);

fn first(set: &BTreeSet<u64>) -> Vec<u64> {
    set.iter().take(10).copied().collect()
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

#[test]
fn kill_9_during_confirmed_publishing_and_acking_loses_nothing_confirmed() {
    if skip_unless_warren("kills and restarts the broker process") {
        return;
    }
    let trials = env_usize("WARREN_CRASH_TRIALS", 20);
    let parallel = env_usize("WARREN_CRASH_PARALLEL", 4).clamp(1, trials.max(1));
    let base_seed = match std::env::var("WARREN_CRASH_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("WARREN_CRASH_SEED={s:?} is not a number"))
        }
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!(
        "crash: {trials} trials, {parallel} at a time, WARREN_CRASH_SEED={base_seed:#x} to replay"
    );
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let next = next.clone();
            let results = results.clone();
            std::thread::spawn(move || loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= trials {
                    break;
                }
                let plan = Plan::new(index, base_seed);
                let dir = tempfile::Builder::new()
                    .prefix("warren-crash-")
                    .tempdir()
                    .unwrap();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let data_dir = dir.path().join("data");
                let report = rt.block_on(async {
                    let trial = tokio::spawn(run_trial(plan, data_dir));
                    let failed = |why: String| Report {
                        failures: vec![why],
                        ..Report::default()
                    };
                    match tokio::time::timeout(TRIAL_TIMEOUT, trial).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => failed(match e.try_into_panic() {
                            Ok(p) => format!(
                                "trial panicked: {}",
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default()
                            ),
                            Err(e) => format!("trial task failed: {e}"),
                        }),
                        Err(_) => failed(format!("trial did not finish in {TRIAL_TIMEOUT:?}")),
                    }
                });
                drop(rt);
                let r = &report;
                eprintln!(
                    "crash trial {index:>3} seed {:#018x} kill after {:>3} ms prefetch {:>4} hold 1/{:<2}: \
                     published {:>5}, confirmed {:>5}, delivered {:>5}, acks settled {:>5} \
                     uncertain {:>2} (back {:>2}); recovered {:>5} ({} redelivered, {} unconfirmed){}",
                    plan.seed,
                    plan.kill_after.as_millis(),
                    plan.prefetch,
                    plan.hold_every,
                    r.sent,
                    r.confirmed,
                    r.delivered,
                    r.settled_acks,
                    r.uncertain_acks,
                    r.uncertain_reappeared,
                    r.recovered,
                    r.recovered_redelivered,
                    r.recovered_unconfirmed,
                    if r.failures.is_empty() { "" } else { "  FAILED" }
                );
                // Keep the data of a failed trial for inspection.
                let kept = (!report.failures.is_empty()).then(|| dir.keep());
                results.lock().unwrap().push((plan, report, kept));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("trial worker panicked");
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), trials, "every trial reported");
    let total = |f: fn(&Report) -> usize| results.iter().map(|(_, r, _)| f(r)).sum::<usize>();
    eprintln!(
        "crash: {trials} trials in {:.1} s: {} confirmed, {} acks settled, {} recovered \
         ({} redelivered), {} uncertain acks of which {} came back",
        started.elapsed().as_secs_f64(),
        total(|r| r.confirmed),
        total(|r| r.settled_acks),
        total(|r| r.recovered),
        total(|r| r.recovered_redelivered),
        total(|r| r.uncertain_acks),
        total(|r| r.uncertain_reappeared),
    );
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r, _)| !r.failures.is_empty())
        .map(|(plan, r, kept)| {
            format!(
                "trial {} (seed {:#x}, kill after {} ms; data kept in {}):\n  {}",
                plan.index,
                plan.seed,
                plan.kill_after.as_millis(),
                kept.as_ref()
                    .map_or_else(|| "-".to_string(), |p| p.display().to_string()),
                r.failures.join("\n  ")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {trials} crash trials failed (WARREN_CRASH_SEED={base_seed:#x}):\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The trials must have exercised what they check.
    if trials >= 5 {
        assert!(total(|r| r.confirmed) > 0, "no publish was ever confirmed");
        assert!(total(|r| r.settled_acks) > 0, "no ack was ever settled");
        assert!(
            total(|r| r.recovered_redelivered) > 0,
            "no trial recovered a delivered-but-unacked message"
        );
    }
}
