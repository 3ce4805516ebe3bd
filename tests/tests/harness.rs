//! The test harness itself: starting, observing and stopping the warren binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use warren_tests::{assert_healthy, skip_unless_warren, Broker};

#[test]
fn missing_binary_says_how_to_build_it() {
    let err = Broker::start_bin_with(Path::new("/nonexistent/warren"), &[]).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("/nonexistent/warren"), "{text}");
    assert!(text.contains("cargo build --bin warren"), "{text}");
}

#[test]
fn bad_flag_fails_start_with_the_output() {
    if skip_unless_warren("starts the warren binary with a bad flag") {
        return;
    }
    let err = Broker::start_with(&["--no-such-flag"]).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("exited during startup"), "{text}");
    assert!(
        text.contains("no-such-flag"),
        "warren's own message should be included: {text}"
    );
}

#[tokio::test]
async fn brokers_get_distinct_ports_and_data_dirs_and_stop_on_kill() {
    if skip_unless_warren("exercises the warren process harness") {
        return;
    }
    let mut a = Broker::start().unwrap();
    let b = Broker::start().unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    assert_eq!(
        a.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", a.port())
    );
    assert_healthy(a.addr()).await.unwrap();
    assert_healthy(b.addr()).await.unwrap();
    assert!(a.data_dir().starts_with(a.dir()));
    assert!(
        !a.logs().is_empty(),
        "warren should log something at startup"
    );
    assert!(
        a.wait_exit(Duration::from_millis(100)).is_none(),
        "still running"
    );
    a.kill();
    let status = a
        .wait_exit(Duration::from_secs(5))
        .expect("killed process is reaped");
    assert!(!status.success());
    assert!(TcpStream::connect_timeout(&a.addr(), Duration::from_millis(200)).is_err());
    assert_healthy(b.addr()).await.unwrap();
}

#[test]
fn drop_kills_the_process() {
    if skip_unless_warren("exercises the warren process harness") {
        return;
    }
    let broker = Broker::start().unwrap();
    let addr = broker.addr();
    let dir = broker.dir().to_path_buf();
    drop(broker);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
    assert!(!dir.exists(), "the temp dir is removed on drop");
}
