//! lapin streams (a consumer's deliveries, a connection's errors) turned into mpsc receivers the
//! test reads at its own pace.

use std::pin::Pin;

use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Event};
use tokio::sync::mpsc;

/// Starts a manual-ack consumer tagged `tag` on `queue`; its deliveries come out of the
/// returned receiver in delivery order. The consumer stays until cancelled by that tag.
pub async fn consume_into_channel(
    ch: &Channel,
    queue: &str,
    tag: &str,
) -> lapin::Result<mpsc::UnboundedReceiver<Delivery>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Read as a stream by one task: lapin's delegate API spawns a task per delivery, and
    // those may run out of order.
    tokio::spawn(async move {
        while let Some(next) =
            std::future::poll_fn(|cx| Pin::new(&mut consumer).poll_next(cx)).await
        {
            match next {
                Ok(d) => {
                    if tx.send(d).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    Ok(rx)
}

/// The errors `conn` reports from now on, in order. A connection the broker closes reports
/// the broker's reply (a `ProtocolError`) here even when the call that was in flight failed
/// only with lapin's own "channel closing" state error.
pub fn connection_errors(conn: &Connection) -> mpsc::UnboundedReceiver<lapin::Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut events = Box::pin(conn.events_listener());
    tokio::spawn(async move {
        while let Some(event) = std::future::poll_fn(|cx| events.as_mut().poll_next(cx)).await {
            if let Event::Error(e) = event {
                if tx.send(e).is_err() {
                    break;
                }
            }
        }
    });
    rx
}
