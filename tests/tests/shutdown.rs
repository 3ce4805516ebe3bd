//! Graceful shutdown of the warren process (docs/cli.md): on SIGTERM or SIGINT every client
//! gets connection.close 320 CONNECTION_FORCED, then the process exits 0.
//!
//! These tests signal the broker process, so they only run against a Warren they spawned: under
//! `AMQP_ADDR` they print why and return.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use warren_tests::{skip_unless_warren, Broker, CloseScope, RawClient};

async fn three_clients(broker: &Broker) -> Vec<RawClient> {
    let mut clients = Vec::new();
    for i in 0..3u16 {
        let mut c = RawClient::open(broker.addr()).await.unwrap();
        // Some channels too, so the broker has state to tear down.
        for ch in 1..=i + 1 {
            c.channel_open(ch).await.unwrap();
        }
        clients.push(c);
    }
    clients
}

async fn clients_get_320_and_process_exits_0(signal: &str) {
    let mut broker = Broker::start().unwrap();
    let mut clients = three_clients(&broker).await;
    let t0 = Instant::now();
    broker.signal(signal).unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let close = c
            .expect_close_scope(CloseScope::Connection, 320)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e:#}"));
        assert!(
            close.text.starts_with("CONNECTION_FORCED"),
            "client {i}: reply text {:?}",
            close.text
        );
        // expect_close answered with close-ok; now the server closes the socket.
        c.read_until_eof(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("client {i}: socket not closed after close-ok: {e:#}"));
    }
    let status = broker
        .wait_exit(Duration::from_secs(5).saturating_sub(t0.elapsed()))
        .unwrap_or_else(|| panic!("warren still running 5 s after SIG{signal}"));
    assert!(
        status.success(),
        "warren exited with {status} after SIG{signal}"
    );
    assert!(
        TcpStream::connect_timeout(&broker.addr(), Duration::from_millis(200)).is_err(),
        "the port still accepts connections after exit"
    );
}

#[tokio::test]
async fn sigterm_closes_every_connection_with_320_and_exits_0() {
    if skip_unless_warren("sends SIGTERM to the broker process") {
        return;
    }
    clients_get_320_and_process_exits_0("TERM").await;
}

#[tokio::test]
async fn sigint_closes_every_connection_with_320_and_exits_0() {
    if skip_unless_warren("sends SIGINT to the broker process") {
        return;
    }
    clients_get_320_and_process_exits_0("INT").await;
}

#[tokio::test]
async fn sigterm_exits_even_if_clients_never_answer_close() {
    // A client that ignores connection.close must not hold the broker up forever.
    if skip_unless_warren("sends SIGTERM to the broker process") {
        return;
    }
    let mut broker = Broker::start().unwrap();
    let _silent = RawClient::open(broker.addr()).await.unwrap();
    broker.signal_term().unwrap();
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("warren still running 10 s after SIGTERM with an unresponsive client");
    assert!(status.success(), "warren exited with {status}");
}

#[tokio::test]
async fn sigterm_on_an_idle_broker_exits_0_quickly() {
    if skip_unless_warren("sends SIGTERM to the broker process") {
        return;
    }
    let mut broker = Broker::start().unwrap();
    broker.signal_term().unwrap();
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .expect("idle warren still running 5 s after SIGTERM");
    assert!(status.success(), "warren exited with {status}");
}

#[tokio::test]
async fn handshake_in_progress_during_sigterm_is_closed() {
    if skip_unless_warren("sends SIGTERM to the broker process") {
        return;
    }
    let mut broker = Broker::start().unwrap();
    let mut half = RawClient::connect(broker.addr()).await.unwrap();
    half.start().await.unwrap();
    broker.signal_term().unwrap();
    // Not yet open: the broker may just drop it, or send a close first.
    half.read_until_eof(Duration::from_secs(5))
        .await
        .expect("a half-open connection must be closed on shutdown");
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .expect("warren exits");
    assert!(status.success(), "warren exited with {status}");
}
