//! Per-channel state owned by the connection task: command assembly, consumers, unacked
//! deliveries, prefetch, publisher confirms and transactions, and the AMQP methods that use them.
//!
//! Everything here is synchronous: the connection task calls in with a [`ConnCtx`] that gives
//! access to the vhost and to the connection's output buffer.

use crate::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::protocol::{basic, confirm, exchange, queue, tx, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use warren_protocol::{
    encode_basic_ack, encode_basic_deliver, encode_basic_get_ok, encode_basic_nack,
    encode_basic_return, encode_content, encode_method, BasicPublish, Command, CommandAssembler,
    Content, ContentHeader, Method,
};

use crate::broker::Broker;
use crate::confirms::{ConfirmFrame, ConfirmTracker};
use crate::connection::{short_string, ClientCapabilities};
use crate::error::{code, resource, AmqpError};
use crate::exchange::{Destination, RouteSet};
use crate::message::{Body as MessageBody, Message, MessageParts};
use crate::queue::consumers::{ChannelKey, ConsumerKey, ConsumerSpec};
use crate::queue::core::MsgSeq;
use crate::queue::handle::{
    ChannelLimiter, ConnEvent, ConsumerSink, Delivery, Enqueued, PendingDispatch,
    PendingStoreWrites, Queue, QueueKind, SyncKind,
};
use crate::tags::TagMap;
use crate::vhost::{check_exclusive, DirectReplySink, QueueDeclare, VHost};

/// The pseudo-queue of direct reply-to: consumed (no-ack) by an RPC client, named as
/// `reply_to` in its requests.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// What a request's `reply_to` becomes: this, then the channel's own suffix.
const DIRECT_REPLY_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// The `reply-to` bit of a content header's property flags.
const REPLY_TO_FLAG: u16 = 1 << 9;

/// A channel's direct reply-to consumer.
#[derive(Debug, Clone)]
struct ReplyConsumer {
    tag: Arc<str>,
    /// `amq.rabbitmq.reply-to.<suffix>`: what requests' `reply_to` is rewritten to.
    name: Arc<str>,
}

/// What a channel needs from its connection while handling one command.
pub struct ConnCtx<'a> {
    pub vhost: &'a Arc<VHost>,
    pub conn_id: u64,
    pub user: &'a str,
    pub caps: ClientCapabilities,
    pub frame_max: u32,
    pub out: &'a mut BytesMut,
    pub events: &'a mpsc::UnboundedSender<ConnEvent>,
    /// Exclusive queues declared by this connection, deleted when it closes.
    pub exclusive_queues: &'a mut Vec<Arc<str>>,
    pub broker: &'a Broker,
    /// Store writes to hand to the OS before the connection's next socket write.
    pub store_writes: &'a mut PendingStoreWrites,
    /// Queues with published messages not yet offered to consumers.
    pub dispatch: &'a mut PendingDispatch,
    /// The connection's consumer-timeout clock (see [`Channel::oldest_unacked_epoch`]).
    pub ack_epoch: u32,
}

/// A delivery the client has not settled yet.
#[derive(Debug)]
struct Unacked {
    queue: Arc<Queue>,
    seq: MsgSeq,
    /// Delivered to a consumer (counted by the channel limiter), as opposed to basic.get.
    counted: bool,
    /// The connection's `ack_epoch` when it was delivered.
    epoch: u32,
}

/// Work held back by tx.select until tx.commit.
#[derive(Debug)]
enum TxOp {
    Publish(Box<(BasicPublish, Content)>),
    Ack {
        tag: u64,
        multiple: bool,
    },
    Reject {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

/// One open channel.
///
/// Invariants: a `Channel` exists only between channel.open-ok and channel.close/close-ok;
/// delivery tags in `unacked` are < `next_delivery_tag` and strictly increasing with delivery
/// order; every queue in `consumers` has a consumer registered under that tag and this key.
#[derive(Debug)]
pub struct Channel {
    pub id: u16,
    pub key: ChannelKey,
    pub assembler: CommandAssembler,
    limiter: Arc<ChannelLimiter>,
    /// basic.qos global=false: applies to consumers created afterwards.
    consumer_prefetch: u16,
    consumers: HashMap<Arc<str>, Arc<Queue>>,
    next_delivery_tag: u64,
    unacked: TagMap<Unacked>,
    /// Queues that may hold unacked messages or consumers of this channel.
    touched: HashMap<Arc<str>, Arc<Queue>>,
    /// Name of the last queue declared on this channel (for `""` in later methods).
    last_queue: Option<Arc<str>>,
    confirms: Option<ConfirmTracker<Arc<str>>>,
    tx: Option<Vec<TxOp>>,
    /// Reused between publishes to avoid allocating.
    route_set: RouteSet,
    route_cache: RouteCache,
    /// Confirms waiting for the next group commit: (publish tag, queue name).
    unsynced: Vec<(u64, Arc<str>)>,
    /// Queues written since the last sync request of this channel (usually one or a few: a
    /// short scan for duplicates is cheaper than hashing per publish).
    unsynced_queues: Vec<Arc<Queue>>,
    /// Reused between publishes: the queues that stored the message being published.
    persisted: Vec<Arc<Queue>>,
    /// At most one per channel, as in RabbitMQ.
    reply_consumer: Option<ReplyConsumer>,
}

impl Channel {
    pub fn new(id: u16, key: ChannelKey) -> Channel {
        Channel {
            id,
            key,
            assembler: CommandAssembler::new(),
            limiter: Arc::new(ChannelLimiter::default()),
            consumer_prefetch: 0,
            consumers: HashMap::default(),
            next_delivery_tag: 1,
            unacked: TagMap::default(),
            touched: HashMap::default(),
            last_queue: None,
            confirms: None,
            tx: None,
            route_set: RouteSet::default(),
            route_cache: RouteCache::default(),
            unsynced: Vec::new(),
            unsynced_queues: Vec::new(),
            persisted: Vec::new(),
            reply_consumer: None,
        }
    }

    /// Gives back everything the channel holds: consumers go, unacked messages are requeued.
    pub fn release(&mut self, vhost: &Arc<VHost>) {
        if let Some(reply) = self.reply_consumer.take() {
            vhost.unregister_direct_reply(&reply.name);
        }
        self.unacked.clear();
        self.consumers.clear();
        for (_, queue) in self.touched.drain() {
            let outcome = queue.channel_closed(self.key);
            if outcome.lost_last_consumer && queue.props.auto_delete {
                vhost.delete_queue_if_same(&queue);
            }
        }
    }

    /// Executes one complete command.
    pub fn handle(&mut self, ctx: &mut ConnCtx<'_>, command: Command) -> Result<(), AmqpError> {
        let Command {
            method, content, ..
        } = command;
        match method {
            Method::Publish(publish) => {
                let content =
                    content.ok_or_else(|| AmqpError::internal("publish without content"))?;
                if let Some(ops) = self.tx.as_mut() {
                    if publish.immediate {
                        return Err(AmqpError::not_implemented("immediate=true"));
                    }
                    ops.push(TxOp::Publish(Box::new((publish, content))));
                    return Ok(());
                }
                self.publish(ctx, publish, content)
            }
            Method::Qos(q) => {
                if q.prefetch_size != 0 {
                    return Err(AmqpError::not_implemented(format!(
                        "prefetch_size!=0 ({})",
                        q.prefetch_size
                    )));
                }
                if q.global {
                    self.limiter
                        .global_prefetch
                        .store(u32::from(q.prefetch_count), Ordering::Relaxed);
                    // A larger window may unblock queues waiting on this channel.
                    self.wake_queues();
                } else {
                    // As rabbit_limiter:unlimit_prefetch: a per-consumer qos lifts the
                    // channel-wide limit.
                    self.limiter.global_prefetch.store(0, Ordering::Relaxed);
                    self.consumer_prefetch = q.prefetch_count;
                    self.wake_queues();
                }
                self.send(
                    ctx,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            Method::Other(AMQPClass::Basic(m)) => self.handle_basic(ctx, m),
            Method::Other(AMQPClass::Queue(m)) => self.handle_queue(ctx, m),
            Method::Other(AMQPClass::Exchange(m)) => self.handle_exchange(ctx, m),
            Method::Other(AMQPClass::Confirm(confirm::AMQPMethod::Select(select))) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if self.confirms.is_none() {
                    self.confirms = Some(ConfirmTracker::new());
                }
                self.reply(
                    ctx,
                    select.nowait,
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                );
                Ok(())
            }
            Method::Other(AMQPClass::Tx(m)) => self.handle_tx(ctx, m),
            other => Err(AmqpError::command_invalid(format!(
                "unexpected method {}.{} on a channel",
                other.class_id(),
                other.method_id()
            ))),
        }
    }

    fn send(&self, ctx: &mut ConnCtx<'_>, method: AMQPClass) {
        encode_method(ctx.out, self.id, &method);
    }

    /// The `-ok` reply of a method, unless the client asked for nowait.
    fn reply(&self, ctx: &mut ConnCtx<'_>, nowait: bool, method: AMQPClass) {
        if !nowait {
            self.send(ctx, method);
        }
    }

    // ------------------------------------------------------------------ exchange class

    fn handle_exchange(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        m: exchange::AMQPMethod,
    ) -> Result<(), AmqpError> {
        let vhost = ctx.vhost;
        match m {
            exchange::AMQPMethod::Declare(d) => {
                vhost.declare_exchange(
                    d.exchange.as_str(),
                    d.kind.as_str(),
                    d.passive,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    &d.arguments,
                )?;
                self.reply(
                    ctx,
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                );
            }
            exchange::AMQPMethod::Delete(d) => {
                vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                self.reply(
                    ctx,
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                );
            }
            exchange::AMQPMethod::Bind(b) => {
                let destination = Destination::Exchange(Arc::from(b.destination.as_str()));
                vhost.bind(
                    b.source.as_str(),
                    destination,
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                let ok = exchange::AMQPMethod::BindOk(exchange::BindOk {});
                self.reply(ctx, b.nowait, AMQPClass::Exchange(ok));
            }
            exchange::AMQPMethod::Unbind(b) => {
                let destination = Destination::Exchange(Arc::from(b.destination.as_str()));
                vhost.unbind(
                    b.source.as_str(),
                    destination,
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                let ok = exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {});
                self.reply(ctx, b.nowait, AMQPClass::Exchange(ok));
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "unexpected exchange method from client",
                ))
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ queue class

    /// Resolves `""` to the last queue declared on this channel.
    fn queue_name(&self, name: &str) -> Result<Arc<str>, AmqpError> {
        if name.is_empty() {
            self.last_queue
                .clone()
                .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
        } else {
            Ok(Arc::from(name))
        }
    }

    /// Looks a queue up, enforcing exclusive ownership.
    fn find_queue(&self, ctx: &ConnCtx<'_>, name: &str) -> Result<Arc<Queue>, AmqpError> {
        let name = self.queue_name(name)?;
        let queue = ctx.vhost.queue(&name).ok_or_else(|| {
            AmqpError::not_found(format!("no {}", resource("queue", &name, &ctx.vhost.name)))
        })?;
        check_exclusive(&queue, ctx.conn_id)?;
        Ok(queue)
    }

    fn handle_queue(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        m: queue::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            queue::AMQPMethod::Declare(d) => {
                // The direct reply-to pseudo-queues exist for any declare, passive or not, as
                // in RabbitMQ: always empty, with their one consumer.
                let asked = d.queue.as_str();
                if asked == DIRECT_REPLY_TO
                    || (asked.starts_with(DIRECT_REPLY_PREFIX) && ctx.vhost.has_direct_reply(asked))
                {
                    self.last_queue = Some(Arc::from(asked));
                    self.reply(
                        ctx,
                        d.nowait,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: d.queue.clone(),
                            message_count: 0,
                            consumer_count: 1,
                        })),
                    );
                    return Ok(());
                }
                // An empty name is a request for a server-named queue; a passive declare takes
                // it literally (RabbitMQ: "no queue '' in vhost '/'"), not as the last queue.
                let name: Arc<str> = if d.queue.as_str().is_empty() && !d.passive {
                    Arc::from(format!("amq.gen-{}", random_suffix(ctx)))
                } else {
                    Arc::from(d.queue.as_str())
                };
                let (queue, message_count, consumer_count) =
                    ctx.vhost.declare_queue(QueueDeclare {
                        name: name.clone(),
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: &d.arguments,
                        conn_id: ctx.conn_id,
                        server_named: d.queue.as_str().is_empty(),
                    })?;
                if d.exclusive && !d.passive && !ctx.exclusive_queues.iter().any(|q| **q == *name) {
                    ctx.exclusive_queues.push(queue.name.clone());
                }
                self.last_queue = Some(queue.name.clone());
                self.reply(
                    ctx,
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: short_string(&queue.name),
                        message_count,
                        consumer_count,
                    })),
                );
            }
            queue::AMQPMethod::Bind(b) => {
                let queue = self.find_queue(ctx, b.queue.as_str())?;
                ctx.vhost.bind(
                    b.exchange.as_str(),
                    Destination::Queue(queue.name.clone()),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                self.reply(
                    ctx,
                    b.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                );
            }
            queue::AMQPMethod::Unbind(b) => {
                // Unbinding from a missing queue is not an error in RabbitMQ.
                let name = self.queue_name(b.queue.as_str())?;
                // RabbitMQ looks the binding up first: only an existing binding of another
                // connection's exclusive queue is locked.
                let destination = Destination::Queue(name.clone());
                if let Some(queue) = ctx.vhost.queue(&name) {
                    if ctx.vhost.has_binding(
                        b.exchange.as_str(),
                        &destination,
                        b.routing_key.as_str(),
                        &b.arguments,
                    ) {
                        check_exclusive(&queue, ctx.conn_id)?;
                    }
                }
                ctx.vhost.unbind(
                    b.exchange.as_str(),
                    Destination::Queue(name),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                self.send(
                    ctx,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
            }
            queue::AMQPMethod::Purge(p) => {
                let queue = self.find_queue(ctx, p.queue.as_str())?;
                let message_count = u32::try_from(queue.purge()).unwrap_or(u32::MAX);
                self.reply(
                    ctx,
                    p.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count })),
                );
            }
            queue::AMQPMethod::Delete(d) => {
                let name = self.queue_name(d.queue.as_str())?;
                let message_count = match ctx.vhost.queue(&name) {
                    // Deleting a missing queue succeeds (RabbitMQ deviates from the spec here).
                    None => 0,
                    Some(queue) => {
                        check_exclusive(&queue, ctx.conn_id)?;
                        let (ready, consumers) = queue.counts();
                        let res = resource("queue", &name, &ctx.vhost.name);
                        if queue.props.kind == QueueKind::Quorum {
                            // RabbitMQ 3.10: a connection error (540), if-unused first.
                            for (set, flag) in
                                [(d.if_unused, "if-unused"), (d.if_empty, "if-empty")]
                            {
                                if set {
                                    return Err(AmqpError::not_implemented(format!(
                                        "cannot delete {res}. queue.delete operations with {flag} \
                                         flag set are not supported by quorum queues"
                                    )));
                                }
                            }
                        }
                        if d.if_unused && consumers > 0 {
                            return Err(AmqpError::precondition_failed(format!("{res} in use")));
                        }
                        if d.if_empty && ready > 0 {
                            return Err(AmqpError::precondition_failed(format!("{res} not empty")));
                        }
                        ctx.vhost.delete_queue_if_same(&queue)
                    }
                };
                ctx.exclusive_queues.retain(|q| **q != *name);
                self.reply(
                    ctx,
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count,
                    })),
                );
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "unexpected queue method from client",
                ))
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ basic class

    fn handle_basic(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        m: basic::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            basic::AMQPMethod::Consume(c) => self.consume(ctx, c),
            basic::AMQPMethod::Cancel(c) => {
                let tag: Arc<str> = Arc::from(c.consumer_tag.as_str());
                if self.reply_consumer.as_ref().is_some_and(|r| r.tag == tag) {
                    if let Some(reply) = self.reply_consumer.take() {
                        ctx.vhost.unregister_direct_reply(&reply.name);
                    }
                } else if let Some(queue) = self.consumers.remove(&tag) {
                    let key = ConsumerKey::new(self.key, tag.clone());
                    if queue.cancel(&key) {
                        ctx.vhost.delete_queue_if_same(&queue);
                    }
                }
                self.reply(
                    ctx,
                    c.nowait,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })),
                );
                Ok(())
            }
            basic::AMQPMethod::Get(g) => {
                let queue = self.find_queue(ctx, g.queue.as_str())?;
                match queue.get(self.key, g.no_ack) {
                    None => {
                        self.send(
                            ctx,
                            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                        );
                    }
                    Some(got) => {
                        let tag = self.next_delivery_tag;
                        self.next_delivery_tag += 1;
                        if !g.no_ack {
                            self.touched.insert(queue.name.clone(), queue.clone());
                            self.unacked.insert(
                                tag,
                                Unacked {
                                    queue: queue.clone(),
                                    seq: got.seq,
                                    counted: false,
                                    epoch: ctx.ack_epoch,
                                },
                            );
                        }
                        let msg = &got.msg;
                        encode_basic_get_ok(
                            ctx.out,
                            self.id,
                            tag,
                            got.redelivered,
                            msg.exchange(),
                            msg.routing_key(),
                            got.remaining,
                        );
                        encode_counted_message(ctx, self.id, msg, got.delivery_count);
                    }
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(a) => {
                if let Some(ops) = self.tx.as_mut() {
                    ops.push(TxOp::Ack {
                        tag: a.delivery_tag,
                        multiple: a.multiple,
                    });
                    return Ok(());
                }
                self.settle(ctx.store_writes, a.delivery_tag, a.multiple, Settle::Ack)
            }
            basic::AMQPMethod::Reject(r) => {
                if let Some(ops) = self.tx.as_mut() {
                    ops.push(TxOp::Reject {
                        tag: r.delivery_tag,
                        multiple: false,
                        requeue: r.requeue,
                    });
                    return Ok(());
                }
                self.settle(
                    ctx.store_writes,
                    r.delivery_tag,
                    false,
                    Settle::Reject { requeue: r.requeue },
                )
            }
            basic::AMQPMethod::Nack(n) => {
                if let Some(ops) = self.tx.as_mut() {
                    ops.push(TxOp::Reject {
                        tag: n.delivery_tag,
                        multiple: n.multiple,
                        requeue: n.requeue,
                    });
                    return Ok(());
                }
                self.settle(
                    ctx.store_writes,
                    n.delivery_tag,
                    n.multiple,
                    Settle::Reject { requeue: n.requeue },
                )
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(r.requeue)?;
                self.send(
                    ctx,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(r.requeue),
            _ => Err(AmqpError::command_invalid(
                "unexpected basic method from client",
            )),
        }
    }

    fn consume(&mut self, ctx: &mut ConnCtx<'_>, c: basic::Consume) -> Result<(), AmqpError> {
        if c.queue.as_str() == DIRECT_REPLY_TO {
            return self.consume_direct_reply(ctx, c);
        }
        let queue = self.find_queue(ctx, c.queue.as_str())?;
        if queue.props.kind == QueueKind::Quorum
            && self.limiter.global_prefetch.load(Ordering::Relaxed) > 0
        {
            return Err(AmqpError::not_implemented(format!(
                "{} does not support global qos",
                resource("queue", &queue.name, &ctx.vhost.name)
            )));
        }
        let tag = self.new_consumer_tag(ctx, &c)?;
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => match (
                crate::vhost::int_check(v, i64::from(i32::MIN), None),
                int_value(v),
            ) {
                (None, Some(p)) => {
                    i32::try_from(p).unwrap_or(if p < 0 { i32::MIN } else { i32::MAX })
                }
                (why, _) => {
                    return Err(AmqpError::precondition_failed(format!(
                        "invalid arg 'x-priority' for {}: {}",
                        resource("queue", &queue.name, &ctx.vhost.name),
                        why.unwrap_or_default()
                    )))
                }
            },
        };
        let spec = ConsumerSpec {
            key: ConsumerKey::new(self.key, tag.clone()),
            priority,
            prefetch: self.consumer_prefetch,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
        };
        let sink = ConsumerSink {
            events: ctx.events.clone(),
            channel_id: self.id,
            limiter: self.limiter.clone(),
        };
        // consume-ok must precede the first delivery: deliveries travel through the mailbox,
        // which the connection drains only after this command's output is written.
        queue
            .consume(spec, sink)
            .map_err(|e| e.to_amqp(&queue.name, &ctx.vhost.name))?;
        self.consumers.insert(tag.clone(), queue.clone());
        self.touched.insert(queue.name.clone(), queue);
        self.reply(
            ctx,
            c.nowait,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: short_string(&tag),
            })),
        );
        Ok(())
    }

    /// The consumer tag of a basic.consume: the client's, or generated. A tag in use on the
    /// channel is a connection error (530), as in RabbitMQ.
    fn new_consumer_tag(
        &self,
        ctx: &ConnCtx<'_>,
        c: &basic::Consume,
    ) -> Result<Arc<str>, AmqpError> {
        let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
            Arc::from(format!("amq.ctag-{}", random_suffix(ctx)))
        } else {
            Arc::from(c.consumer_tag.as_str())
        };
        if self.consumers.contains_key(&tag)
            || self.reply_consumer.as_ref().is_some_and(|r| r.tag == tag)
        {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        Ok(tag)
    }

    /// basic.consume of `amq.rabbitmq.reply-to`: the channel's direct reply-to consumer,
    /// no-ack only and one per channel (RabbitMQ's checks, in its order).
    fn consume_direct_reply(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        c: basic::Consume,
    ) -> Result<(), AmqpError> {
        let tag = self.new_consumer_tag(ctx, &c)?;
        if !c.no_ack {
            return Err(AmqpError::precondition_failed(
                "reply consumer cannot acknowledge",
            ));
        }
        if self.reply_consumer.is_some() {
            return Err(AmqpError::precondition_failed("reply consumer already set"));
        }
        // Unguessable, so that only those the client sent it to can reply.
        let name: Arc<str> = Arc::from(format!(
            "{DIRECT_REPLY_PREFIX}{}.{}",
            random_suffix(ctx),
            random_suffix(ctx)
        ));
        ctx.vhost.register_direct_reply(
            name.clone(),
            DirectReplySink {
                events: ctx.events.clone(),
                channel: self.key,
                channel_id: self.id,
            },
        );
        self.reply_consumer = Some(ReplyConsumer {
            tag: tag.clone(),
            name,
        });
        self.reply(
            ctx,
            c.nowait,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: short_string(&tag),
            })),
        );
        Ok(())
    }

    /// The `ack_epoch` of the oldest unacknowledged delivery, for the consumer timeout.
    pub fn oldest_unacked_epoch(&self) -> Option<u32> {
        self.unacked.iter().next().map(|(_, u)| u.epoch)
    }

    /// A reply for this channel's direct reply-to consumer `name`: delivered unless that
    /// consumer has gone since. Replies take no delivery tag of their own (no-ack): they
    /// carry the channel's next tag without using it up, as RabbitMQ's do.
    pub fn deliver_direct_reply(&mut self, ctx: &mut ConnCtx<'_>, name: &str, msg: &Message) {
        let Some(reply) = self.reply_consumer.as_ref().filter(|r| &*r.name == name) else {
            return;
        };
        encode_basic_deliver(
            ctx.out,
            self.id,
            reply.tag.as_bytes(),
            self.next_delivery_tag,
            false,
            msg.exchange(),
            msg.routing_key(),
        );
        encode_message(ctx, self.id, msg);
    }

    fn publish(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        p: BasicPublish,
        content: Content,
    ) -> Result<(), AmqpError> {
        if p.immediate {
            return Err(AmqpError::not_implemented("immediate=true"));
        }
        let exchange = std::str::from_utf8(&p.exchange)
            .map_err(|_| AmqpError::precondition_failed("exchange name is not valid UTF-8"))?;
        if let Some(user_id) = &content.header.user_id {
            if user_id.as_ref() != ctx.user.as_bytes() {
                return Err(AmqpError::precondition_failed(format!(
                    "user_id property set to '{}' but authenticated user was '{}'",
                    String::from_utf8_lossy(user_id),
                    ctx.user
                )));
            }
        }
        let ttl = match &content.header.expiration {
            None => None,
            Some(raw) => Some(crate::message::parse_expiration(raw).map_err(|why| {
                AmqpError::precondition_failed(format!(
                    "invalid expiration '{}': {why}",
                    String::from_utf8_lossy(raw)
                ))
            })?),
        };
        let headers = content
            .header
            .headers()
            .map_err(|e| AmqpError::syntax_error(e.reply_text()))?;
        let mut header = content.header;
        if header.property_flags() & REPLY_TO_FLAG != 0 {
            header = self.rewrite_direct_reply_to(header)?;
        }
        let mut cc_bcc: Vec<Bytes> = Vec::new();
        if let Some(table) = &headers {
            // As rabbit_basic:header_routes: arrays of longstr; any other type is refused.
            for key in ["CC", "BCC"] {
                match table.inner().get(key) {
                    None => {}
                    Some(AMQPValue::FieldArray(items)) => {
                        for item in items.as_slice() {
                            if let AMQPValue::LongString(s) = item {
                                cc_bcc.push(Bytes::copy_from_slice(s.as_bytes()));
                            }
                        }
                    }
                    Some(other) => {
                        return Err(AmqpError::precondition_failed(format!(
                            "invalid message: {{unacceptable_type_in_header,\"{key}\",{}}}",
                            crate::exchange::term::type_name(other)
                        )));
                    }
                }
            }
            // BCC must not reach consumers.
            if table.contains_key("BCC") {
                let mut props = header
                    .properties()
                    .map_err(|e| AmqpError::syntax_error(e.reply_text()))?;
                let mut stripped = table.clone();
                let mut inner = stripped.inner().clone();
                inner.remove("BCC");
                stripped = FieldTable::from(inner);
                props = props.with_headers(stripped);
                header = ContentHeader::from_properties(header.class_id, header.body_size, &props);
            }
        }
        let routing_key = p.routing_key.clone();
        if p.exchange.is_empty() && routing_key.starts_with(DIRECT_REPLY_PREFIX.as_bytes()) {
            let msg = build_message(ctx, &p.exchange, &routing_key, &header, &content.body, ttl);
            self.publish_direct_reply(ctx, &p, &msg);
            return Ok(());
        }
        // Publishers mostly repeat the same exchange and key: reuse the last route while the
        // vhost's topology is unchanged. Headers and CC/BCC keys also decide routes, so only
        // messages without them use the cache.
        let cacheable = headers.is_none() && cc_bcc.is_empty();
        let version = ctx.vhost.topology_version();
        let cache = &mut self.route_cache;
        let hit = cacheable
            && cache.version == Some(version)
            && cache.exchange[..] == p.exchange[..]
            && cache.routing_key[..] == routing_key[..];
        let routed = if hit {
            Ok(())
        } else {
            cache.version = None;
            cache.queues.clear();
            let r = ctx.vhost.route_queues(
                exchange,
                &routing_key,
                &cc_bcc,
                headers.as_ref(),
                &mut self.route_set,
                &mut cache.queues,
            );
            if r.is_ok() && cacheable {
                cache.version = Some(version);
                cache.exchange.clear();
                cache.exchange.extend_from_slice(&p.exchange);
                cache.routing_key.clear();
                cache.routing_key.extend_from_slice(&routing_key);
            }
            r
        };
        let queues = std::mem::take(&mut self.route_cache.queues);
        let mut refused = false;
        let mut persisted = std::mem::take(&mut self.persisted);
        persisted.clear();
        let result = routed.map(|()| {
            let msg = build_message(ctx, &p.exchange, &routing_key, &header, &content.body, ttl);
            let mut delivered = 0usize;
            for queue in &queues {
                match queue.publish(msg.clone(), Some(&mut *ctx.dispatch)) {
                    Enqueued::Accepted => delivered += 1,
                    Enqueued::Persisted => {
                        delivered += 1;
                        persisted.push(queue.clone());
                    }
                    Enqueued::Rejected => {
                        delivered += 1;
                        refused = true;
                    }
                    Enqueued::QueueGone => {}
                }
            }
            if delivered == 0 && p.mandatory {
                encode_basic_return(
                    ctx.out,
                    self.id,
                    code::NO_ROUTE,
                    b"NO_ROUTE",
                    msg.exchange(),
                    msg.routing_key(),
                );
                encode_message(ctx, self.id, &msg);
            }
        });
        self.route_cache.queues = queues;
        result?;
        if let Some(tracker) = self.confirms.as_mut() {
            // Queues are in memory: a message is confirmed once enqueued (or found unroutable,
            // after its basic.return). Frames go out in `flush_confirms`, batched per read.
            if refused {
                // Any refusing queue makes the whole publish a nack (rabbit_confirms).
                let tag = tracker.publish([Arc::<str>::from("")]);
                tracker.reject(tag);
            } else {
                // Transient deliveries are confirmed at once; stored ones after the fsync
                // that covers them.
                let tag = tracker.publish(persisted.iter().map(|q| q.name.clone()));
                for queue in persisted.drain(..) {
                    self.unsynced.push((tag, queue.name.clone()));
                    // A duplicate further back only costs a second prepare_sync (the sync
                    // service fsyncs each file once per batch); a full scan would be quadratic
                    // for fanouts to many durable queues.
                    let mut recent = self.unsynced_queues.iter().rev().take(16);
                    if !recent.any(|q| Arc::ptr_eq(q, &queue)) {
                        self.unsynced_queues.push(queue);
                    }
                }
            }
        }
        self.persisted = persisted;
        Ok(())
    }

    /// A request whose `reply_to` is `amq.rabbitmq.reply-to` gets this channel's pseudo-queue
    /// name instead; without a reply consumer on the channel that is a 406.
    fn rewrite_direct_reply_to(&self, header: ContentHeader) -> Result<ContentHeader, AmqpError> {
        let props = header
            .properties()
            .map_err(|e| AmqpError::syntax_error(e.reply_text()))?;
        if props.reply_to().as_ref().map(|r| r.as_str()) != Some(DIRECT_REPLY_TO) {
            return Ok(header);
        }
        let Some(reply) = &self.reply_consumer else {
            return Err(AmqpError::precondition_failed(
                "fast reply consumer does not exist",
            ));
        };
        let props = props.with_reply_to(short_string(&reply.name));
        Ok(ContentHeader::from_properties(
            header.class_id,
            header.body_size,
            &props,
        ))
    }

    /// A publish to `amq.rabbitmq.reply-to.<suffix>` through the default exchange goes
    /// straight to that channel's reply consumer, if it still exists, and is dropped
    /// otherwise. As in RabbitMQ it never counts as routed: with `mandatory` it also comes
    /// back in a basic.return; a confirm is an ack.
    fn publish_direct_reply(
        &mut self,
        ctx: &mut ConnCtx<'_>,
        p: &BasicPublish,
        msg: &Arc<Message>,
    ) {
        let name = String::from_utf8_lossy(&p.routing_key);
        ctx.vhost.deliver_direct_reply(&name, msg.clone());
        if p.mandatory {
            encode_basic_return(
                ctx.out,
                self.id,
                code::NO_ROUTE,
                b"NO_ROUTE",
                msg.exchange(),
                msg.routing_key(),
            );
            encode_message(ctx, self.id, msg);
        }
        if let Some(tracker) = self.confirms.as_mut() {
            tracker.publish(std::iter::empty::<Arc<str>>());
        }
    }

    /// Starts one group-commit request for every stored publish of the last read batch; its
    /// completion comes back to the connection as [`ConnEvent::Synced`].
    pub fn request_sync(
        &mut self,
        sync: &warren_storage::SyncService,
        events: &mpsc::UnboundedSender<ConnEvent>,
    ) {
        if self.unsynced.is_empty() {
            return;
        }
        let mut handle = warren_storage::SyncHandle::default();
        for queue in self.unsynced_queues.drain(..) {
            if let Some(h) = queue.prepare_sync(SyncKind::Confirms) {
                handle.merge(h);
            }
        }
        let confirms = std::mem::take(&mut self.unsynced);
        let events = events.clone();
        let (channel, channel_id) = (self.key, self.id);
        sync.request(handle, move |result| {
            let _ = events.send(ConnEvent::Synced {
                channel,
                channel_id,
                confirms,
                ok: result.is_ok(),
            });
        });
    }

    /// A group commit finished: the publishes it covered are confirmed (or nacked).
    pub fn synced(&mut self, confirms: &[(u64, Arc<str>)], ok: bool) {
        let Some(tracker) = self.confirms.as_mut() else {
            return;
        };
        for (tag, queue) in confirms {
            if ok {
                tracker.confirm(*tag, queue);
            } else {
                tracker.reject(*tag);
            }
        }
    }

    /// Writes pending publisher confirms, coalesced with `multiple` where possible.
    pub fn flush_confirms(&mut self, out: &mut BytesMut) {
        let Some(tracker) = self.confirms.as_mut() else {
            return;
        };
        if !tracker.has_frames() {
            return;
        }
        for frame in tracker.drain() {
            match frame {
                ConfirmFrame::Ack { tag, multiple } => {
                    encode_basic_ack(out, self.id, tag, multiple)
                }
                ConfirmFrame::Nack { tag, multiple } => {
                    encode_basic_nack(out, self.id, tag, multiple, false)
                }
            }
        }
    }

    /// basic.ack / reject / nack on delivery tags of this channel.
    fn settle(
        &mut self,
        store_writes: &mut PendingStoreWrites,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), AmqpError> {
        // As rabbit_channel:collect_acks: tag 0 with multiple means everything; otherwise the
        // tag itself must be outstanding, and multiple adds every older one.
        let mut by_queue = ByQueue::default();
        if multiple && tag == 0 {
            by_queue.extend(self.unacked.take_all());
        } else if !self.unacked.contains(tag) {
            return Err(unknown_tag(tag));
        } else if multiple {
            by_queue.extend(self.unacked.take_through(tag));
        } else {
            by_queue.extend(self.unacked.take(tag));
        }
        let was_blocked = self.limiter.is_blocked();
        self.limiter.settled(by_queue.counted);
        for (queue, seqs) in by_queue.groups {
            let stored = match how {
                Settle::Ack => queue.ack(&seqs),
                Settle::Reject { requeue } => queue.reject(&seqs, requeue),
            };
            if stored {
                store_writes.note(&queue);
            }
        }
        if was_blocked && !self.limiter.is_blocked() {
            self.wake_queues();
        }
        Ok(())
    }

    fn recover(&mut self, requeue: bool) -> Result<(), AmqpError> {
        if !requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let mut by_queue = ByQueue::default();
        by_queue.extend(self.unacked.take_all());
        self.limiter.settled(by_queue.counted);
        for (queue, seqs) in by_queue.groups {
            queue.requeue(&seqs);
        }
        self.wake_queues();
        Ok(())
    }

    /// Asks every queue this channel consumes from to deliver again (credit came back).
    fn wake_queues(&self) {
        for queue in self.consumers.values() {
            queue.dispatch();
        }
    }

    // ------------------------------------------------------------------ tx class

    fn handle_tx(&mut self, ctx: &mut ConnCtx<'_>, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirms.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Vec::new());
                }
                self.send(
                    ctx,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
            }
            tx::AMQPMethod::Commit(_) => {
                let ops = self.tx.replace(Vec::new()).ok_or_else(|| {
                    AmqpError::precondition_failed("channel is not transactional")
                })?;
                for op in ops {
                    match op {
                        TxOp::Publish(publish) => {
                            let (p, content) = *publish;
                            self.publish(ctx, p, content)?
                        }
                        TxOp::Ack { tag, multiple } => {
                            self.settle(ctx.store_writes, tag, multiple, Settle::Ack)?
                        }
                        TxOp::Reject {
                            tag,
                            multiple,
                            requeue,
                        } => self.settle(
                            ctx.store_writes,
                            tag,
                            multiple,
                            Settle::Reject { requeue },
                        )?,
                    }
                }
                self.send(
                    ctx,
                    AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                );
            }
            tx::AMQPMethod::Rollback(_) => {
                if self.tx.replace(Vec::new()).is_none() {
                    self.tx = None;
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                }
                self.send(
                    ctx,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
            }
            _ => {
                return Err(AmqpError::command_invalid(
                    "unexpected tx method from client",
                ))
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ deliveries

    /// Writes deliveries from a queue. If the consumer was cancelled meanwhile, the messages go
    /// back to the queue instead.
    pub fn deliver(&mut self, ctx: &mut ConnCtx<'_>, d: Delivery) {
        let n = u32::try_from(d.items.len()).unwrap_or(u32::MAX);
        let unblocked = self.limiter.written(n);
        if !self.consumers.contains_key(&d.tag) {
            // Cancelled while the delivery was in the mailbox: give it back.
            self.limiter.settled(n);
            if !d.no_ack {
                let seqs: Vec<MsgSeq> = d.items.iter().map(|item| item.seq).collect();
                d.queue.requeue(&seqs);
            }
            return;
        }
        for item in &d.items {
            let tag = self.next_delivery_tag;
            self.next_delivery_tag += 1;
            encode_basic_deliver(
                ctx.out,
                self.id,
                d.tag.as_bytes(),
                tag,
                item.redelivered,
                item.msg.exchange(),
                item.msg.routing_key(),
            );
            encode_counted_message(ctx, self.id, &item.msg, item.delivery_count);
        }
        let was_blocked = self.limiter.is_blocked();
        if d.no_ack {
            self.limiter.settled(n);
        } else {
            let first_tag = self.next_delivery_tag - u64::from(n);
            for (tag, item) in (first_tag..).zip(&d.items) {
                self.unacked.insert(
                    tag,
                    Unacked {
                        queue: d.queue.clone(),
                        seq: item.seq,
                        counted: true,
                        epoch: ctx.ack_epoch,
                    },
                );
            }
        }
        if unblocked || (was_blocked && !self.limiter.is_blocked()) {
            self.wake_queues();
        }
    }

    /// The queue of one of our consumers was deleted.
    pub fn consumer_cancelled(&mut self, ctx: &mut ConnCtx<'_>, tag: &Arc<str>) {
        if self.consumers.remove(tag).is_some() && ctx.caps.consumer_cancel_notify {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: short_string(tag),
                    nowait: true,
                })),
            );
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Reject { requeue: bool },
}

/// The queues of the channel's last publish, valid while the vhost's topology version is
/// `version` and the message has the same exchange and routing key (and no headers/CC/BCC).
#[derive(Debug, Default)]
struct RouteCache {
    version: Option<u64>,
    exchange: Vec<u8>,
    routing_key: Vec<u8>,
    queues: Vec<Arc<Queue>>,
}

/// Settled deliveries grouped by queue, in the order first seen (one group per queue: a
/// channel usually consumes from one or a few queues, so a scan beats hashing the name).
#[derive(Default)]
struct ByQueue {
    groups: Vec<(Arc<Queue>, Vec<MsgSeq>)>,
    /// Deliveries that held channel credit.
    counted: u32,
}

impl ByQueue {
    fn extend(&mut self, settled: impl IntoIterator<Item = Unacked>) {
        for u in settled {
            if u.counted {
                self.counted += 1;
            }
            match self
                .groups
                .iter_mut()
                .find(|(q, _)| Arc::ptr_eq(q, &u.queue))
            {
                Some((_, seqs)) => seqs.push(u.seq),
                None => self.groups.push((u.queue, vec![u.seq])),
            }
        }
    }
}

/// Bodies at least this big are kept as received (no copy); see [`Channel::publish`]. The
/// read buffer they share holds at most a few frames (reads are up to 128 KiB), so a kept
/// body pins at most a few times its size, and only while the message lives; the memory
/// alarm counts the body alone.
const ZERO_COPY_BODY: usize = 64 * 1024;

fn unknown_tag(tag: u64) -> AmqpError {
    AmqpError::precondition_failed(format!("unknown delivery tag {tag}"))
}

/// A published message as queues hold it. Queued messages get their own allocations: frame
/// slices would pin whole read buffers for as long as the message waits. A big body stays
/// the slice of the read buffer it arrived in: it is most of that buffer anyway, and copying
/// 64 KiB bodies was a large share of their cost.
fn build_message(
    ctx: &ConnCtx<'_>,
    exchange: &[u8],
    routing_key: &[u8],
    header: &ContentHeader,
    body: &Bytes,
    ttl: Option<std::time::Duration>,
) -> Arc<Message> {
    let parts = MessageParts {
        exchange,
        routing_key,
        header,
        body: if body.len() >= ZERO_COPY_BODY {
            MessageBody::Keep(body.clone())
        } else {
            MessageBody::Copy(body)
        },
    };
    let charge = ctx.broker.resources.charge(Message::footprint(&parts));
    Arc::new(Message::new(parts, charge, std::time::Instant::now(), ttl))
}

/// [`encode_message`], with an `x-delivery-count` header added when `delivery_count` is
/// set (quorum queues). Only then are the properties decoded and encoded again.
fn encode_counted_message(
    ctx: &mut ConnCtx<'_>,
    channel: u16,
    msg: &Message,
    delivery_count: Option<u16>,
) {
    let Some(count) = delivery_count else {
        return encode_message(ctx, channel, msg);
    };
    let counted = ContentHeader::from_raw(
        60,
        msg.body_size(),
        Bytes::copy_from_slice(msg.raw_properties()),
    )
    .and_then(|header| header.properties())
    .map(|props| {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "x-delivery-count".into(),
            AMQPValue::LongLongInt(i64::from(count)),
        );
        ContentHeader::from_properties(60, msg.body_size(), &props.with_headers(headers))
    });
    match counted {
        Ok(header) => encode_content(
            ctx.out,
            channel,
            60,
            msg.body_size(),
            &header.raw_properties,
            msg.body(),
            ctx.frame_max,
        ),
        // The properties were checked when the message was published; should they not
        // decode now, the message goes as it is rather than not at all.
        Err(_) => encode_message(ctx, channel, msg),
    }
}

/// Content header (properties verbatim) and body frames of a message.
fn encode_message(ctx: &mut ConnCtx<'_>, channel: u16, msg: &Message) {
    encode_content(
        ctx.out,
        channel,
        60,
        msg.body_size(),
        msg.raw_properties(),
        msg.body(),
        ctx.frame_max,
    );
}

/// Integer value of a field-table entry, whatever its integer width.
pub fn int_value(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Some(*i),
        _ => None,
    }
}

/// 22 url-safe base64 characters of randomness, as in RabbitMQ's `amq.gen-` / `amq.ctag-`.
fn random_suffix(ctx: &ConnCtx<'_>) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u128 = rand::random::<u128>() ^ u128::from(ctx.broker.next_id());
    let mut out = String::with_capacity(22);
    for _ in 0..22 {
        out.push(char::from(ALPHABET[(bits & 63) as usize]));
        bits >>= 6;
    }
    out
}
