//! amqprs against Warren, or against `AMQP_ADDR`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use amqprs::connection::{Connection, OpenConnectionArguments};
use warren_tests::Target;

fn args(target: &Target, user: &str, pass: &str, vhost: &str) -> OpenConnectionArguments {
    let addr = target.addr();
    let mut args = OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), user, pass);
    args.virtual_host(vhost);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_open_100_channels_close_cleanly() {
    let target = Target::from_env().unwrap();
    let conn = Connection::open(&args(&target, "guest", "guest", "/"))
        .await
        .unwrap_or_else(|e| panic!("amqprs connect to {}: {e}", target.describe()));
    assert!(conn.is_open());
    let mut channels = Vec::new();
    for i in 0..100 {
        let ch = conn
            .open_channel(None)
            .await
            .unwrap_or_else(|e| panic!("open_channel #{i}: {e}"));
        assert!(ch.is_open());
        channels.push(ch);
    }
    let mut ids: Vec<u16> = channels.iter().map(|c| c.channel_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "channel ids must be distinct");
    for ch in channels {
        let id = ch.channel_id();
        ch.close()
            .await
            .unwrap_or_else(|e| panic!("closing channel {id}: {e}"));
    }
    assert!(
        conn.is_open(),
        "closing channels must not close the connection"
    );
    conn.close()
        .await
        .expect("connection.close should complete with close-ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_error() {
    let target = Target::from_env().unwrap();
    let res = Connection::open(&args(&target, "guest", "wrong-password", "/")).await;
    let Err(err) = res else {
        panic!("connecting with a wrong password must fail")
    };
    eprintln!("amqprs error: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_an_error() {
    let target = Target::from_env().unwrap();
    let res = Connection::open(&args(&target, "guest", "guest", "no-such-vhost")).await;
    let Err(err) = res else {
        panic!("connecting to a missing vhost must fail")
    };
    eprintln!("amqprs error: {err}");
    let text = err.to_string();
    assert!(
        text.contains("530") || text.contains("NOT_ALLOWED"),
        "expected a NOT_ALLOWED error, got: {text}"
    );
}
