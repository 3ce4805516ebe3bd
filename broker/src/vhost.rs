//! A virtual host: owns its topology (exchanges and bindings) and its queues.
//!
//! Lock order: `topology` before `queues` before any queue's own lock. Neither is held across
//! `.await`, and `route` holds the topology read lock only while collecting queue names.
//! `direct_replies` is a leaf: nothing else is locked while it is held.

use crate::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use tokio::sync::mpsc;

use tracing::{debug, error, warn};
use warren_storage::{BindingDef, DefChange, ExchangeDef, QueueDef};

use crate::error::{resource, AmqpError};
use crate::exchange::{DeclareOutcome, Destination, Removed, RouteSet, Topology};
use crate::message::{Body, Message, MessageParts};
use crate::persist::Persistence;
use crate::queue::consumers::ChannelKey;
use crate::queue::dead_letter::{
    is_automatic_cycle, republish, DeadLetter, DeadLetterRouter, DeadLetterTarget,
};
use crate::queue::handle::{ConnEvent, Queue, QueueKind, QueueProps, RecoveredIndex};
use crate::resources::ResourceMonitor;

/// queue.declare arguments as the vhost needs them.
#[derive(Debug)]
pub struct QueueDeclare<'a> {
    pub name: Arc<str>,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a FieldTable,
    pub conn_id: u64,
    /// The client sent an empty name and the broker generated this one.
    pub server_named: bool,
}

/// One virtual host.
#[derive(Debug)]
pub struct VHost {
    pub name: Arc<str>,
    topology: RwLock<Topology>,
    queues: RwLock<HashMap<Arc<str>, Arc<Queue>>>,
    /// Bumped whenever `topology` or `queues` is locked for writing: a channel may reuse the
    /// queues it last routed to while this is unchanged (see [`Self::topology_version`]).
    topology_version: AtomicU64,
    memory: &'static ResourceMonitor,
    /// Where durable definitions and messages go; None for a broker without a data dir.
    persistence: Option<Arc<Persistence>>,
    /// This vhost, for its queues to hand their dead letters back to.
    me: Weak<VHost>,
    /// Direct reply-to consumers by their pseudo-queue name (`amq.rabbitmq.reply-to.…`).
    direct_replies: RwLock<HashMap<Arc<str>, DirectReplySink>>,
}

/// Where replies to a channel's direct reply-to consumer go.
#[derive(Debug, Clone)]
pub struct DirectReplySink {
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub channel: ChannelKey,
    pub channel_id: u16,
}

impl VHost {
    pub fn new(
        name: &str,
        memory: &'static ResourceMonitor,
        persistence: Option<Arc<Persistence>>,
    ) -> Arc<VHost> {
        Arc::new_cyclic(|me| VHost {
            name: Arc::from(name),
            topology: RwLock::new(Topology::new(name)),
            queues: RwLock::new(HashMap::default()),
            topology_version: AtomicU64::new(0),
            memory,
            persistence,
            me: me.clone(),
            direct_replies: RwLock::new(HashMap::default()),
        })
    }

    fn router(&self) -> Weak<dyn DeadLetterRouter> {
        self.me.clone()
    }

    // ------------------------------------------------------------------ direct reply-to

    /// Registers a channel's direct reply-to consumer under its pseudo-queue name.
    pub fn register_direct_reply(&self, name: Arc<str>, sink: DirectReplySink) {
        self.direct_replies
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, sink);
    }

    pub fn unregister_direct_reply(&self, name: &str) {
        self.direct_replies
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    pub fn has_direct_reply(&self, name: &str) -> bool {
        self.direct_replies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// Hands a reply to the direct reply-to consumer named `name`. False if there is none
    /// (its channel closed or cancelled it): the reply is dropped, as in RabbitMQ.
    pub fn deliver_direct_reply(&self, name: &str, msg: Arc<Message>) -> bool {
        let sink = self
            .direct_replies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let Some(sink) = sink else {
            return false;
        };
        sink.events
            .send(ConnEvent::DirectReply {
                channel: sink.channel,
                channel_id: sink.channel_id,
                name: Arc::from(name),
                msg,
            })
            .is_ok()
    }

    fn record(&self, change: DefChange) {
        if let Some(p) = &self.persistence {
            p.record(change);
        }
    }

    /// Records the deletion of exchanges a topology change removed (auto-delete cascades).
    fn record_removed(&self, removed: &Removed) {
        for name in &removed.exchanges {
            self.record(DefChange::DeleteExchange {
                vhost: self.name.to_string(),
                name: name.to_string(),
            });
        }
    }

    /// Every queue of the vhost.
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues_read().values().cloned().collect()
    }

    // ------------------------------------------------------------------ recovery

    pub fn recover_exchange(&self, def: &ExchangeDef) {
        let res = self.topology_write().declare_exchange(
            &def.name,
            &def.kind,
            false,
            def.durable,
            def.auto_delete,
            def.internal,
            &def.arguments,
        );
        if let Err(e) = res {
            warn!(exchange = %def.name, error = %e, "cannot recover a durable exchange");
        }
    }

    pub fn recover_queue(&self, def: &QueueDef) {
        let Some(persistence) = &self.persistence else {
            return;
        };
        // Recovered messages go straight into the queue's index: no list of them in between.
        let mut index = RecoveredIndex::for_arguments(&def.arguments);
        let recovered = persistence.recover_store(&self.name, &def.name, &mut |m| index.push(m));
        let store = match recovered {
            Ok(store) => store,
            Err(e) => {
                error!(queue = %def.name, error = %e, "cannot recover a durable queue's messages");
                return;
            }
        };
        let name: Arc<str> = Arc::from(def.name.as_str());
        let props = QueueProps::new(true, def.auto_delete, None, def.arguments.clone());
        let queue = Queue::new(
            name.clone(),
            self.name.clone(),
            props,
            self.memory,
            self.persistence.clone(),
            Some(store),
            Some(self.router()),
        );
        queue.restore(index);
        self.queues_write().insert(name, queue);
    }

    pub fn recover_binding(&self, def: &BindingDef) {
        let destination = if def.destination_is_queue {
            Destination::Queue(Arc::from(def.destination.as_str()))
        } else {
            Destination::Exchange(Arc::from(def.destination.as_str()))
        };
        let res =
            self.topology_write()
                .bind(&def.source, &destination, &def.routing_key, &def.arguments);
        if let Err(e) = res {
            warn!(source = %def.source, destination = %def.destination, error = %e, "cannot recover a binding");
        }
    }

    // Poisoning only follows a panic in another task; the maps stay structurally valid because
    // every mutation is a single insert/remove, so keep serving rather than cascading panics.
    fn topology_read(&self) -> RwLockReadGuard<'_, Topology> {
        self.topology.read().unwrap_or_else(|e| e.into_inner())
    }
    fn topology_write(&self) -> RwLockWriteGuard<'_, Topology> {
        let guard = self.topology.write().unwrap_or_else(|e| e.into_inner());
        // After taking the lock: whoever sees the new version and routes again waits for
        // this change to finish.
        self.topology_version.fetch_add(1, Ordering::AcqRel);
        guard
    }
    fn queues_read(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Queue>>> {
        self.queues.read().unwrap_or_else(|e| e.into_inner())
    }
    fn queues_write(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<Queue>>> {
        let guard = self.queues.write().unwrap_or_else(|e| e.into_inner());
        self.topology_version.fetch_add(1, Ordering::AcqRel);
        guard
    }

    /// Changes whenever exchanges, bindings or queues may have changed. Read it before
    /// routing: a route computed after reading version v is valid while the version is v.
    pub fn topology_version(&self) -> u64 {
        self.topology_version.load(Ordering::Acquire)
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues_read().get(name).cloned()
    }

    // ------------------------------------------------------------------ exchanges

    #[allow(clippy::too_many_arguments)]
    pub fn declare_exchange(
        &self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<(), AmqpError> {
        let outcome = self.topology_write().declare_exchange(
            name,
            kind,
            passive,
            durable,
            auto_delete,
            internal,
            arguments,
        )?;
        if durable && !passive && outcome == DeclareOutcome::Created {
            self.record(DefChange::PutExchange(ExchangeDef {
                vhost: self.name.to_string(),
                name: name.to_string(),
                kind: kind.to_string(),
                durable,
                auto_delete,
                internal,
                arguments: arguments.clone(),
            }));
        }
        Ok(())
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        let removed = self.topology_write().delete_exchange(name, if_unused)?;
        self.record_removed(&removed);
        Ok(())
    }

    /// A binding is durable when both of its ends are (RabbitMQ's rule).
    fn binding_def(
        &self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Option<BindingDef> {
        self.persistence.as_ref()?;
        let topology = self.topology_read();
        let source_durable = topology.exchange(source).is_some_and(|x| x.durable);
        let destination_durable = match destination {
            Destination::Exchange(x) => topology.exchange(x).is_some_and(|x| x.durable),
            Destination::Queue(q) => self.queue(q).is_some_and(|q| q.is_durable_store()),
        };
        (source_durable && destination_durable).then(|| BindingDef {
            vhost: self.name.to_string(),
            source: source.to_string(),
            destination: destination.name().to_string(),
            destination_is_queue: matches!(destination, Destination::Queue(_)),
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        })
    }

    pub fn bind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), AmqpError> {
        // RabbitMQ's precedence: default-exchange and exchange checks, then the queue.
        self.topology_read().check_bind(source, &destination)?;
        if let Destination::Queue(q) = &destination {
            if self.queue(q).is_none() {
                return Err(AmqpError::not_found(format!(
                    "no {}",
                    resource("queue", q, &self.name)
                )));
            }
        }
        let added = self
            .topology_write()
            .bind(source, &destination, routing_key, arguments)?;
        if added {
            if let Some(def) = self.binding_def(source, &destination, routing_key, arguments) {
                self.record(DefChange::PutBinding(def));
            }
        }
        Ok(())
    }

    pub fn unbind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), AmqpError> {
        let def = self.binding_def(source, &destination, routing_key, arguments);
        let removed = self
            .topology_write()
            .unbind(source, &destination, routing_key, arguments)?;
        if let Some(def) = def {
            self.record(DefChange::DeleteBinding(def));
        }
        self.record_removed(&removed);
        Ok(())
    }

    /// Whether this exact binding exists.
    pub fn has_binding(
        &self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.topology_read()
            .bindings_for_destination(destination)
            .iter()
            .any(|b| {
                &*b.source == source
                    && &*b.routing_key == routing_key
                    && crate::exchange::term::same_table(&b.arguments, arguments)
            })
    }

    /// Fills `out` with the queues a publish reaches: the routing key, then every CC/BCC key.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &[u8],
        extra_keys: &[Bytes],
        headers: Option<&FieldTable>,
        out: &mut RouteSet,
    ) -> Result<(), AmqpError> {
        self.route_from(exchange, routing_key, extra_keys, headers, out, true)
    }

    /// [`Self::route`]; `from_client` false for the broker's own republishing (dead letters),
    /// which, as in RabbitMQ, may go through internal exchanges.
    fn route_from(
        &self,
        exchange: &str,
        routing_key: &[u8],
        extra_keys: &[Bytes],
        headers: Option<&FieldTable>,
        out: &mut RouteSet,
        from_client: bool,
    ) -> Result<(), AmqpError> {
        let topology = self.topology_read();
        if from_client {
            topology.check_publish(exchange)?;
        } else if topology.exchange(exchange).is_none() {
            return Err(AmqpError::not_found(format!(
                "no {}",
                resource("exchange", exchange, &self.name)
            )));
        }
        if extra_keys.is_empty() {
            return topology.route(exchange, routing_key, headers, out);
        }
        let mut keys: Vec<&[u8]> = Vec::with_capacity(extra_keys.len() + 1);
        keys.push(routing_key);
        keys.extend(extra_keys.iter().map(|k| &k[..]));
        topology.route_keys(exchange, &keys, headers, out)
    }

    /// Routes like [`Self::route`] and resolves the queue names (one lock for all of them).
    /// Names without a queue (deleted meanwhile) are left out.
    pub fn route_queues(
        &self,
        exchange: &str,
        routing_key: &[u8],
        extra_keys: &[Bytes],
        headers: Option<&FieldTable>,
        routes: &mut RouteSet,
        out: &mut Vec<Arc<Queue>>,
    ) -> Result<(), AmqpError> {
        self.route_queues_from(
            exchange,
            routing_key,
            extra_keys,
            headers,
            routes,
            out,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn route_queues_from(
        &self,
        exchange: &str,
        routing_key: &[u8],
        extra_keys: &[Bytes],
        headers: Option<&FieldTable>,
        routes: &mut RouteSet,
        out: &mut Vec<Arc<Queue>>,
        from_client: bool,
    ) -> Result<(), AmqpError> {
        routes.clear();
        self.route_from(
            exchange,
            routing_key,
            extra_keys,
            headers,
            routes,
            from_client,
        )?;
        let queues = self.queues_read();
        out.extend(routes.iter().filter_map(|name| queues.get(name).cloned()));
        Ok(())
    }

    // ------------------------------------------------------------------ queues

    /// queue.declare: create, or check equivalence with the existing queue.
    /// Returns the queue with its (ready messages, consumers) counts.
    pub fn declare_queue(&self, d: QueueDeclare<'_>) -> Result<(Arc<Queue>, u32, u32), AmqpError> {
        let res = resource("queue", &d.name, &self.name);
        // Checked and renewed under the map's lock, so that x-expires (which deletes under
        // the write lock, see `expire_queue`) cannot take a queue a declare has just renewed.
        let found = {
            let queues = self.queues_read();
            match queues.get(&d.name) {
                Some(existing) => {
                    check_declare_owner(existing, &d)?;
                    if !d.passive {
                        check_equivalent(existing, &d, &res)?;
                    }
                    existing.renew_lease();
                    Some(existing.clone())
                }
                None => None,
            }
        };
        if let Some(existing) = found {
            let (messages, consumers) = existing.counts();
            return Ok((existing, messages, consumers));
        }
        if d.passive {
            return Err(AmqpError::not_found(format!("no {res}")));
        }
        if d.name.starts_with("amq.") && !d.server_named {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        validate_queue_arguments(d.arguments, &res)?;
        if QueueKind::from_arguments(d.arguments) == QueueKind::Quorum {
            check_quorum_properties(&d, &res)?;
        }
        let props = QueueProps::new(
            d.durable,
            d.auto_delete,
            d.exclusive.then_some(d.conn_id),
            d.arguments.clone(),
        );
        let mut queues = self.queues_write();
        // Another connection may have won the race between our lookup and the write lock.
        if let Some(existing) = queues.get(&d.name).cloned() {
            check_declare_owner(&existing, &d)?;
            check_equivalent(&existing, &d, &res)?;
            existing.renew_lease();
            drop(queues);
            let (messages, consumers) = existing.counts();
            return Ok((existing, messages, consumers));
        }
        // Durable queues get a message store; exclusive ones die with their connection, so
        // they are not recovered (as in RabbitMQ) and need none.
        let store = match (&self.persistence, d.durable && !d.exclusive) {
            (Some(p), true) => match p.create_store(&self.name, &d.name) {
                Ok(store) => Some(store),
                Err(e) => {
                    error!(queue = %d.name, error = %e, "cannot create the queue's store");
                    return Err(AmqpError::internal(format!(
                        "cannot create the store of {res}"
                    )));
                }
            },
            _ => None,
        };
        let durable_store = store.is_some();
        let queue = Queue::new(
            d.name.clone(),
            self.name.clone(),
            props,
            self.memory,
            self.persistence.clone(),
            store,
            Some(self.router()),
        );
        queues.insert(d.name.clone(), queue.clone());
        drop(queues);
        if durable_store {
            self.record(DefChange::PutQueue(QueueDef {
                vhost: self.name.to_string(),
                name: d.name.to_string(),
                durable: true,
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
            }));
        }
        Ok((queue, 0, 0))
    }

    /// Deletes `queue` if it is still the one registered under its name; tells its consumers.
    /// Returns the number of ready messages it held.
    pub fn delete_queue_if_same(&self, queue: &Arc<Queue>) -> u32 {
        if !self.unregister_queue_if(queue, |_| true) {
            return 0;
        }
        self.finish_queue_delete(queue)
    }

    /// Deletes `queue` if its `x-expires` has run out at `now` (checked again under the
    /// queues' write lock, which a declare's renewal of the lease also needs). True if
    /// deleted.
    pub fn expire_queue(&self, queue: &Arc<Queue>, now: std::time::Instant) -> bool {
        if !self.unregister_queue_if(queue, |q| q.expired(now)) {
            return false;
        }
        self.finish_queue_delete(queue);
        true
    }

    /// Removes `queue` from the name map if it is still the one registered under its name
    /// and `condition` holds for it (evaluated under the write lock).
    fn unregister_queue_if(
        &self,
        queue: &Arc<Queue>,
        condition: impl FnOnce(&Queue) -> bool,
    ) -> bool {
        let mut queues = self.queues_write();
        match queues.get(&queue.name) {
            Some(current) if Arc::ptr_eq(current, queue) && condition(queue) => {
                queues.remove(&queue.name);
                true
            }
            _ => false,
        }
    }

    /// The rest of a deletion once the queue left the name map: bindings, the definitions
    /// log, consumers told. Returns the number of ready messages it held.
    fn finish_queue_delete(&self, queue: &Arc<Queue>) -> u32 {
        let removed = self.topology_write().remove_queue(&queue.name);
        if queue.is_durable_store() {
            self.record(DefChange::DeleteQueue {
                vhost: self.name.to_string(),
                name: queue.name.to_string(),
            });
        }
        self.record_removed(&removed);
        let (count, sinks) = queue.mark_deleted();
        for (key, sink) in sinks {
            let _ = sink.events.send(ConnEvent::ConsumerCancelled {
                channel: key.channel,
                channel_id: sink.channel_id,
                tag: key.tag,
            });
        }
        count
    }

    /// Deletes every exclusive queue owned by a closing connection.
    pub fn delete_exclusive_queues(&self, names: &[Arc<str>], conn_id: u64) {
        for name in names {
            if let Some(queue) = self.queue(name) {
                if queue.props.exclusive_owner == Some(conn_id) {
                    self.delete_queue_if_same(&queue);
                }
            }
        }
    }
}

/// queue.declare checks exclusivity strictly (the flag must match the queue's) and passive
/// declares laxly (only another connection's exclusive queue is locked), as
/// rabbit_amqqueue:check_exclusive_access.
fn check_declare_owner(queue: &Queue, d: &QueueDeclare<'_>) -> Result<(), AmqpError> {
    let owner = queue.props.exclusive_owner;
    let ok = if d.passive {
        owner.is_none_or(|o| o == d.conn_id)
    } else {
        owner == d.exclusive.then_some(d.conn_id)
    };
    if ok {
        Ok(())
    } else {
        Err(locked(queue))
    }
}

fn locked(queue: &Queue) -> AmqpError {
    AmqpError::resource_locked(format!(
        "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
        resource("queue", &queue.name, &queue.vhost)
    ))
}

/// Lax exclusivity check for every other queue operation: only another connection's
/// exclusive queue is locked.
pub fn check_exclusive(queue: &Queue, conn_id: u64) -> Result<(), AmqpError> {
    match queue.props.exclusive_owner {
        Some(owner) if owner != conn_id => Err(locked(queue)),
        _ => Ok(()),
    }
}

/// RabbitMQ compares durable, auto_delete and the known x-arguments (exclusivity is checked
/// first, by [`check_declare_owner`]), with `rabbit_misc:assert_args_equivalence`'s texts.
fn check_equivalent(queue: &Queue, d: &QueueDeclare<'_>, res: &str) -> Result<(), AmqpError> {
    use crate::exchange::term::{format_typed_val, format_val, loose_eq, type_class};
    let fail = |arg: &str, received: String, current: String| {
        AmqpError::precondition_failed(format!(
            "inequivalent arg '{arg}' for {res}: received {received} but current is {current}"
        ))
    };
    let p = &queue.props;
    if p.durable != d.durable {
        return Err(fail(
            "durable",
            format!("'{}'", d.durable),
            format!("'{}'", p.durable),
        ));
    }
    if p.auto_delete != d.auto_delete {
        return Err(fail(
            "auto_delete",
            format!("'{}'", d.auto_delete),
            format!("'{}'", p.auto_delete),
        ));
    }
    for key in KNOWN_QUEUE_ARGS {
        let old = p.arguments.inner().get(*key);
        let new = d.arguments.inner().get(*key);
        match (old, new) {
            (None, None) => {}
            (Some(o), Some(n)) => {
                if type_class(o) != type_class(n) || !loose_eq(o, n) {
                    return Err(fail(key, format_val(n), format_val(o)));
                }
            }
            (o, n) => {
                let show = |v: Option<&amq_protocol::types::AMQPValue>| {
                    v.map_or_else(|| "none".to_string(), format_typed_val)
                };
                return Err(fail(key, show(n), show(o)));
            }
        }
    }
    Ok(())
}

/// x-arguments RabbitMQ validates and compares on queue.declare.
const KNOWN_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
    "x-queue-leader-locator",
];

/// Arguments of quorum queues and streams that RabbitMQ 3.10 refuses on a classic queue
/// (`rabbit_classic_queue` capabilities).
const NOT_FOR_CLASSIC_QUEUES: &[&str] = &[
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
];

/// Arguments of classic queues and streams that RabbitMQ 3.10 refuses on a quorum queue.
const NOT_FOR_QUORUM_QUEUES: &[&str] = &[
    "x-max-priority",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
];

/// What a quorum queue cannot be (RabbitMQ 3.10's `invalid property` refusals).
fn check_quorum_properties(d: &QueueDeclare<'_>, res: &str) -> Result<(), AmqpError> {
    let refused = if !d.durable {
        "non-durable"
    } else if d.exclusive {
        "exclusive-owner"
    } else if d.auto_delete {
        "auto-delete"
    } else {
        return Ok(());
    };
    Err(AmqpError::precondition_failed(format!(
        "invalid property '{refused}' for {res}"
    )))
}

/// Type and range checks of known x-arguments, with RabbitMQ's 406 text.
fn validate_queue_arguments(args: &FieldTable, res: &str) -> Result<(), AmqpError> {
    use amq_protocol::types::AMQPValue;
    let (refused, queue_type) = match QueueKind::from_arguments(args) {
        QueueKind::Quorum => (NOT_FOR_QUORUM_QUEUES, "rabbit_quorum_queue"),
        QueueKind::Classic => (NOT_FOR_CLASSIC_QUEUES, "rabbit_classic_queue"),
    };
    if let Some((key, _)) = args
        .into_iter()
        .find(|(key, _)| refused.contains(&key.as_str()))
    {
        return Err(AmqpError::precondition_failed(format!(
            "invalid arg '{}' for {res} of queue type {queue_type}",
            key.as_str()
        )));
    }
    // RabbitMQ's `{unacceptable_type,T}`.
    let unacceptable = |value: &AMQPValue| {
        format!(
            "{{unacceptable_type,{}}}",
            crate::exchange::term::type_name(value)
        )
    };
    for (key, value) in args {
        let key = key.as_str();
        // Why an argument is refused, printed as RabbitMQ's check functions report it.
        let why: Option<String> = match key {
            "x-expires" => int_check(value, 1, None),
            "x-message-ttl" | "x-max-length" | "x-max-length-bytes" => int_check(value, 0, None),
            "x-max-priority" => int_check(value, 0, Some(255)),
            "x-queue-mode" => match value {
                AMQPValue::LongString(s) if matches!(s.as_bytes(), b"default" | b"lazy") => None,
                AMQPValue::LongString(s) => Some(format!(
                    "\"unsupported queue mode '{}'\"",
                    String::from_utf8_lossy(s.as_bytes())
                )),
                other => Some(unacceptable(other)),
            },
            "x-queue-version" => match crate::channel::int_value(value) {
                Some(1 | 2) => None,
                Some(v) => Some(format!("\"unsupported queue version '{v}'\"")),
                None => int_check(value, 1, None),
            },
            "x-queue-master-locator" => match value {
                AMQPValue::LongString(s)
                    if matches!(s.as_bytes(), b"client-local" | b"min-masters" | b"random") =>
                {
                    None
                }
                // RabbitMQ 3.10 fails here with 541 INTERNAL_ERROR; a 406 says more.
                AMQPValue::LongString(s) => Some(format!(
                    "\"unsupported queue master locator '{}'\"",
                    String::from_utf8_lossy(s.as_bytes())
                )),
                other => Some(unacceptable(other)),
            },
            "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
                if !matches!(value, AMQPValue::LongString(_)) {
                    return Err(AmqpError::precondition_failed(format!(
                        "invalid type '{}' for arg '{key}' in {res}",
                        crate::exchange::term::type_name(value)
                    )));
                }
                (key == "x-dead-letter-routing-key" && !args.contains_key("x-dead-letter-exchange"))
                    .then(|| "routing_key_but_no_dlx_defined".into())
            }
            "x-overflow" => match value {
                AMQPValue::LongString(s)
                    if matches!(
                        s.as_bytes(),
                        b"drop-head" | b"reject-publish" | b"reject-publish-dlx"
                    ) =>
                {
                    None
                }
                _ => Some("invalid_overflow".into()),
            },
            "x-dead-letter-strategy" => match value {
                AMQPValue::LongString(s)
                    if matches!(s.as_bytes(), b"at-most-once" | b"at-least-once") =>
                {
                    None
                }
                _ => Some("invalid_dlx_strategy".into()),
            },
            "x-queue-type" => match value {
                AMQPValue::LongString(s) if matches!(s.as_bytes(), b"classic" | b"quorum") => None,
                // Streams are not built yet: refuse rather than pretend.
                AMQPValue::LongString(s) => Some(format!(
                    "\"unsupported queue type '{}'\"",
                    String::from_utf8_lossy(s.as_bytes())
                )),
                other => Some(format!(
                    "\"unsupported queue type '{}'\"",
                    crate::exchange::term::format_p(other)
                )),
            },
            "x-single-active-consumer" => {
                (!matches!(value, AMQPValue::Boolean(_))).then(|| unacceptable(value))
            }
            _ => None,
        };
        if let Some(why) = why {
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg '{key}' for {res}: {why}"
            )));
        }
    }
    Ok(())
}

/// RabbitMQ's integer argument checks: the type, then `{value_zero,V}` / `{value_negative,V}`
/// below `min`, `{max_value_exceeded,V}` above `max`.
pub fn int_check(
    value: &amq_protocol::types::AMQPValue,
    min: i64,
    max: Option<i64>,
) -> Option<String> {
    let Some(v) = crate::channel::int_value(value) else {
        return Some(format!(
            "\"expected integer, got {}\"",
            crate::exchange::term::type_name(value)
        ));
    };
    if v < min {
        return Some(if v == 0 {
            "{value_zero,0}".to_string()
        } else {
            format!("{{value_negative,{v}}}")
        });
    }
    match max {
        Some(max) if v > max => Some(format!("{{max_value_exceeded,{v}}}")),
        _ => None,
    }
}

impl DeadLetterRouter for VHost {
    /// Republishes dead letters through their exchange as RabbitMQ 3.10's classic queues do:
    /// at most once (no confirms between the queues), dropped if the exchange is missing or
    /// routes nowhere, and never into a queue that would close an automatic cycle.
    fn route_dead_letters(&self, queue: &str, target: &DeadLetterTarget, letters: Vec<DeadLetter>) {
        let now_secs = crate::message::now_ms() / 1000;
        let mut routes = RouteSet::default();
        let mut queues = Vec::new();
        for letter in letters {
            let r = match republish(&letter.msg, letter.reason, queue, target, now_secs) {
                Ok(r) => r,
                Err(e) => {
                    warn!(queue, error = %e.reply_text(), "cannot dead-letter a message");
                    continue;
                }
            };
            queues.clear();
            if let Err(e) = self.route_queues_from(
                &target.exchange,
                &r.routing_key,
                &r.extra_keys,
                Some(&r.headers),
                &mut routes,
                &mut queues,
                false,
            ) {
                debug!(queue, error = %e, "dead letter dropped");
                continue;
            }
            queues.retain(|q| {
                let cycle = is_automatic_cycle(letter.reason, &r.headers, &q.name);
                if cycle {
                    debug!(queue, to = %q.name, "dead letter dropped: dead-letter queues cycle");
                }
                !cycle
            });
            if queues.is_empty() {
                continue;
            }
            let parts = MessageParts {
                exchange: target.exchange.as_bytes(),
                routing_key: &r.routing_key,
                header: &r.header,
                body: Body::Copy(letter.msg.body()),
            };
            let charge = self.memory.charge(Message::footprint(&parts));
            // A new message for TTLs: its time in the next queue starts now.
            let msg = Arc::new(Message::new(parts, charge, std::time::Instant::now(), None));
            for q in &queues {
                let _ = q.publish(msg.clone(), None);
            }
        }
    }
}
