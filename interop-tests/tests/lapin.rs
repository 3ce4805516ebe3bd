//! lapin (the most used Rust AMQP client) against Warren, or against `AMQP_ADDR`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lapin::{Connection, ConnectionProperties};
use warren_tests::Target;

/// `amqp://user:pass@127.0.0.1:PORT/vhost` for the target.
fn url(target: &Target, user: &str, pass: &str, vhost: &str) -> String {
    format!(
        "amqp://{user}:{pass}@{}/{}",
        target.addr(),
        vhost.replace('/', "%2f")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_open_100_channels_close_cleanly() {
    let target = Target::from_env().unwrap();
    let conn = Connection::connect(&target.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("lapin connect to {}: {e}", target.describe()));
    assert!(conn.status().connected());
    let mut channels = Vec::new();
    for i in 0..100 {
        let ch = conn
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("create_channel #{i}: {e}"));
        assert!(ch.status().connected(), "channel {} not open", ch.id());
        channels.push(ch);
    }
    let mut ids: Vec<u16> = channels.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "channel ids must be distinct");
    for ch in &channels {
        ch.close(200, "bye".into())
            .await
            .unwrap_or_else(|e| panic!("closing channel {}: {e}", ch.id()));
        assert!(!ch.status().connected(), "channel {} still open", ch.id());
    }
    conn.close(200, "bye".into())
        .await
        .expect("connection.close should complete with close-ok");
    // lapin 4 resolves close() on close-ok and moves its status to Closed through its
    // internal RPC task a moment later (on_connection_close_ok_received ->
    // set_connection_closed): seen as Closing in one CI run. Give it that moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !conn.status().closed() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        conn.status().closed(),
        "lapin connection status after close: {:?}",
        conn.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_error() {
    let target = Target::from_env().unwrap();
    let res = Connection::connect(
        &url(&target, "guest", "wrong-password", "/"),
        ConnectionProperties::default(),
    )
    .await;
    let Err(err) = res else {
        panic!("connecting with a wrong password must fail")
    };
    eprintln!("lapin error: {err}");
    let text = err.to_string();
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED"),
        "expected an ACCESS_REFUSED error, got: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_an_error() {
    let target = Target::from_env().unwrap();
    let res = Connection::connect(
        &url(&target, "guest", "guest", "no-such-vhost"),
        ConnectionProperties::default(),
    )
    .await;
    let Err(err) = res else {
        panic!("connecting to a missing vhost must fail")
    };
    eprintln!("lapin error: {err}");
    let text = err.to_string();
    assert!(
        text.contains("530") || text.contains("NOT_ALLOWED"),
        "expected a NOT_ALLOWED error, got: {text}"
    );
}
