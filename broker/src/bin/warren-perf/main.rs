//! `warren-perf`: a PerfTest-class AMQP 0-9-1 load generator on Warren's own codec.
//!
//! Declares the topology on one connection, connects every consumer (subscribed before any
//! message is sent) and every producer, then releases them together. One tokio task per
//! connection; see `producer` and `consumer` for the hot loops. Progress goes to stderr once
//! per interval, the totals as one JSON line to stdout.
//!
//! `--wait-queue-messages N` turns it into a probe that polls a queue with passive declares
//! until it holds N messages (used to time broker restarts).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod amqp;
mod args;
mod consumer;
mod histogram;
mod producer;
mod rate;
mod stats;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;
use tokio::task::JoinSet;

use amqp::{epoch_ns, field_table, Conn, ConnOpts};
use args::{Args, Plan};
use consumer::{Consumer, ConsumerResult};
use histogram::Histogram;
use producer::{Producer, ProducerResult};
use stats::{json_num, json_str, progress_line, Counters, Report};

/// The final line: the only thing warren-perf prints on stdout.
#[allow(clippy::print_stdout)]
fn emit(line: &str) {
    println!("{line}");
}

fn main() -> ExitCode {
    let plan = match Plan::try_from(Args::parse()) {
        Ok(plan) => Arc::new(plan),
        Err(e) => {
            eprintln!("warren-perf: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if plan.threads > 0 {
        builder.worker_threads(plan.threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-perf: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = runtime.block_on(async {
        match plan.wait_queue_messages {
            Some(n) => wait_queue(&plan, n).await,
            None => run(plan.clone()).await,
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn conn_opts(plan: &Plan) -> ConnOpts {
    ConnOpts {
        frame_max: plan.frame_max,
        heartbeat: plan.heartbeat,
        connect_timeout: Duration::from_secs(10),
    }
}

/// Exchange, queues and bindings, on a connection of their own.
async fn declare(plan: &Plan) -> Result<()> {
    let mut conn = Conn::open(&plan.uri, conn_opts(plan))
        .await
        .context("setup connection")?;
    if plan.declares_exchange() {
        // Never durable, so every scenario declares it the same way.
        conn.exchange_declare(&plan.exchange, &plan.exchange_type, false)
            .await?;
    }
    let arguments = field_table(&plan.queue_args);
    for queue in &plan.queues {
        conn.queue_declare(
            queue,
            false,
            plan.persistent,
            plan.auto_delete,
            arguments.clone(),
        )
        .await
        .with_context(|| format!("queue.declare '{queue}'"))?;
        if !plan.exchange.is_empty() {
            let key = plan.routing_key.as_deref().unwrap_or(queue);
            conn.queue_bind(queue, &plan.exchange, key).await?;
        }
    }
    conn.close().await;
    Ok(())
}

/// Connects `n` clients concurrently; all of them or the first error.
async fn connect_all<T, F, Fut>(n: usize, connect: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(connect(i))).collect();
    let mut out = Vec::with_capacity(n);
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(t)) => out.push(t),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("connect task failed: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

enum Outcome {
    Producer(Result<ProducerResult>),
    Consumer(Result<ConsumerResult>),
}

async fn reporter(
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    t0: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut prev = counters.snapshot();
    let mut prev_at = t0;
    let mut ticks = tokio::time::interval_at((t0 + plan.interval).into(), plan.interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
        let now = Instant::now();
        let snap = counters.snapshot();
        let line = progress_line(
            now - t0,
            now - prev_at,
            prev,
            snap,
            counters.take_interval_latency(),
            plan.confirm.is_some(),
            plan.json,
        );
        eprintln!("{line}");
        prev = snap;
        prev_at = now;
    }
}

fn failed_report(plan: &Plan, error: anyhow::Error) -> bool {
    eprintln!("warren-perf: {error:#}");
    let report = Report {
        scenario: plan.id.clone(),
        producers: plan.producers,
        consumers: plan.consumers,
        size: plan.size,
        errors: vec![format!("{error:#}")],
        ..Report::default()
    };
    emit(&report.to_json());
    false
}

async fn run(plan: Arc<Plan>) -> bool {
    epoch_ns(Instant::now());
    if !plan.predeclared {
        if let Err(e) = declare(&plan).await {
            return failed_report(&plan, e);
        }
    }
    let opts = conn_opts(&plan);
    let p = plan.clone();
    let consumers = match connect_all(plan.consumers, move |j| {
        let p = p.clone();
        async move { Consumer::connect(&p, j, opts).await }
    })
    .await
    {
        Ok(c) => c,
        Err(e) => return failed_report(&plan, e.context("connecting consumers")),
    };
    let p = plan.clone();
    let producers = match connect_all(plan.producers, move |i| {
        let p = p.clone();
        async move { Producer::connect(&p, i, opts).await }
    })
    .await
    {
        Ok(p) => p,
        Err(e) => return failed_report(&plan, e.context("connecting producers")),
    };

    let counters = Arc::new(Counters::default());
    counters
        .producers_running
        .store(plan.producers, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let report_task = tokio::spawn(reporter(
        plan.clone(),
        counters.clone(),
        t0,
        stop_rx.clone(),
    ));
    let mut tasks = JoinSet::new();
    for c in consumers {
        let (plan, counters, stop) = (plan.clone(), counters.clone(), stop_rx.clone());
        tasks.spawn(async move { Outcome::Consumer(c.run(plan, counters, t0, stop).await) });
    }
    for p in producers {
        let (plan, counters, stop) = (plan.clone(), counters.clone(), stop_rx.clone());
        tasks.spawn(async move { Outcome::Producer(p.run(plan, counters, t0, stop).await) });
    }

    let mut errors = Vec::new();
    let mut send_end: Option<Instant> = None;
    let mut recv_end: Option<Instant> = None;
    let mut latency = Histogram::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    loop {
        let joined = tokio::select! {
            j = tasks.join_next() => j,
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                eprintln!("warren-perf: interrupted, stopping");
                let _ = stop_tx.send(true);
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let failure = match joined {
            Ok(Outcome::Producer(Ok(r))) => {
                send_end = send_end.max(Some(r.end));
                None
            }
            Ok(Outcome::Consumer(Ok(r))) => {
                recv_end = recv_end.max(r.last_delivery);
                latency.merge(&r.latency);
                None
            }
            Ok(Outcome::Producer(Err(e))) => Some(format!("producer: {e:#}")),
            Ok(Outcome::Consumer(Err(e))) => Some(format!("consumer: {e:#}")),
            Err(e) => Some(format!("task failed: {e}")),
        };
        if let Some(f) = failure {
            eprintln!("warren-perf: {f}");
            errors.push(f);
            // One failed connection makes the numbers meaningless: stop the others.
            let _ = stop_tx.send(true);
        }
    }
    let end = Instant::now();
    let _ = stop_tx.send(true);
    let _ = report_task.await;

    // A timed run lasts its time; tasks closing their connections afterwards do not count.
    let cap = |d: Duration| match plan.time {
        Some(t) => d.min(t),
        None => d,
    };
    let since = |at: Option<Instant>| at.map_or(Duration::ZERO, |at| at.duration_since(t0));
    let send_duration = cap(since(send_end));
    let receive_duration = if plan.time.is_some() && plan.cmessages.is_none() && plan.consumers > 0
    {
        cap(end.duration_since(t0))
    } else {
        cap(since(recv_end))
    };
    let report = Report {
        scenario: plan.id.clone(),
        producers: plan.producers,
        consumers: plan.consumers,
        size: plan.size,
        sent: Counters::get(&counters.published),
        confirmed: Counters::get(&counters.confirmed),
        nacked: Counters::get(&counters.nacked),
        returned: Counters::get(&counters.returned),
        received: Counters::get(&counters.received),
        duration: send_duration.max(receive_duration),
        send_duration,
        receive_duration,
        latency,
        errors,
    };
    eprintln!(
        "warren-perf: sent {} ({} confirmed) in {:.2} s, received {} in {:.2} s",
        report.sent,
        report.confirmed,
        send_duration.as_secs_f64(),
        report.received,
        receive_duration.as_secs_f64()
    );
    emit(&report.to_json());
    report.errors.is_empty()
}

/// Polls `-u` with passive declares until it holds `expected` messages.
async fn wait_queue(plan: &Plan, expected: u64) -> bool {
    let queue = plan.queues.first().map_or("", String::as_str);
    let start = Instant::now();
    let deadline = start + plan.wait_timeout;
    let opts = ConnOpts {
        connect_timeout: Duration::from_secs(1),
        ..conn_opts(plan)
    };
    let mut first_answer: Option<Duration> = None;
    let mut absent_since: Option<Instant> = None;
    let mut last_count: Option<u32> = None;
    let mut last_error: Option<String> = None;
    let mut recovered = false;
    'outer: while Instant::now() < deadline {
        let mut conn = match Conn::open(&plan.uri, opts).await {
            Ok(c) => c,
            Err(e) => {
                last_error = Some(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        first_answer.get_or_insert_with(|| start.elapsed());
        while Instant::now() < deadline {
            match conn
                .queue_declare(queue, true, false, false, field_table(&[]))
                .await
            {
                Ok(count) => {
                    last_count = Some(count);
                    last_error = None;
                    absent_since = None;
                    if u64::from(count) >= expected {
                        recovered = true;
                        conn.close().await;
                        break 'outer;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    last_error = Some(format!("{e:#}"));
                    let since = *absent_since.get_or_insert_with(Instant::now);
                    conn.close().await;
                    if since.elapsed() >= plan.absent_grace {
                        break 'outer;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'outer;
                }
            }
        }
        conn.close().await;
    }
    let elapsed = start.elapsed();
    let opt_s =
        |d: Option<Duration>| d.map_or_else(|| "null".to_owned(), |d| json_num(d.as_secs_f64(), 3));
    emit(&format!(
        "{{\"queue\":{},\"expected\":{expected},\"messages\":{},\"recovered\":{recovered},\
         \"elapsed_s\":{},\"first_answer_s\":{},\"error\":{}}}",
        json_str(queue),
        last_count.map_or_else(|| "null".to_owned(), |c| c.to_string()),
        json_num(elapsed.as_secs_f64(), 3),
        opt_s(first_answer),
        last_error
            .as_deref()
            .map_or_else(|| "null".to_owned(), json_str),
    ));
    recovered
}
