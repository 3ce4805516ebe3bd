//! A lapin consumer whose deliveries arrive on a channel the test reads at its own pace.

use lapin::message::{Delivery, DeliveryResult};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;

/// Starts a manual-ack consumer tagged `tag` on `queue`; its deliveries come out of the
/// returned receiver in order. The consumer stays until cancelled by that tag.
pub async fn consume_into_channel(
    ch: &Channel,
    queue: &str,
    tag: &str,
) -> lapin::Result<mpsc::UnboundedReceiver<Delivery>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    consumer.set_delegate(move |d: DeliveryResult| {
        let tx = tx.clone();
        async move {
            if let Ok(Some(d)) = d {
                let _ = tx.send(d);
            }
        }
    });
    Ok(rx)
}
