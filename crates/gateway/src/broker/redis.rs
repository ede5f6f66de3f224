//! Redis Pub/Sub: a few ordered publishing lanes for every command (see [`super::publisher`]),
//! one dedicated connection for SUBSCRIBE; both find Redis through an [`Endpoint`] (one address,
//! or the primary Redis Sentinel names).
//!
//! Subscriptions are reconciled, not commanded: sessions take and drop holds on topics
//! (reference counts), and one task brings the Redis connection's subscriptions in line with
//! the topics that have holds. After a reconnect the same pass resubscribes everything, and
//! bursts of subscribe/unsubscribe churn collapse into a few batched commands.
//!
//! A subscription can die silently (a proxy that stops forwarding, a paused server). The node
//! sends itself a probe on its own topic every probe interval; a probe not seen back by the
//! next one tears the connection down and starts again.
//!
//! History and presence go through the `pushgate` Redis function library (`pushgate.lua`),
//! which the broker loads whenever its subscriber connects, and again whenever Redis says a
//! function is missing (a restarted or flushed Redis).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use std::pin::Pin;

use futures_util::StreamExt;
use futures_util::future::try_join_all;
use pushgate_protocol::NodeMessage;
use redis::Value;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::endpoint::Endpoint;
use super::publisher::{LaneSettings, Publisher, Reply};
use super::{BrokerError, Inbound, Topics};
use crate::lock;
use crate::metrics::Metrics;

/// Most channels named in one SUBSCRIBE or UNSUBSCRIBE.
const BATCH: usize = 500;
/// Redis connections that publish. Each keeps its publishers' order; several spread the work of
/// encoding and parsing replies over the runtime's workers.
const PUBLISH_LANES: usize = 4;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The `pushgate` function library.
pub const LIBRARY: &str = include_str!("pushgate.lua");

/// Messages read from a history Stream: the epoch, the last offset, and `(offset, payload)`
/// pairs after the offset asked for.
pub type HistoryEntries = (String, u64, Vec<(u64, Vec<u8>)>);

/// The Redis keys of one presence channel, and the topic its joins and leaves go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceKeys {
    /// Session -> entry JSON.
    pub hash: String,
    /// Session -> expiry.
    pub zset: String,
    /// User -> how many of their sessions have an entry.
    pub users: String,
    /// The channel's topic on a presence-events channel; empty: no events.
    pub topic: String,
}

/// A presence entry to add: session, user, entry JSON.
pub type PresenceItem = (String, String, String);

pub struct RedisSettings {
    pub endpoint: Endpoint,
    pub topics: Topics,
    pub node_id: String,
    /// Bound on every Redis command and subscription wait.
    pub timeout: Duration,
    pub probe_interval: Duration,
    /// Load the function library (history or presence is configured).
    pub functions: bool,
    /// Commands queued per publishing lane before publishers wait.
    pub publish_queue: usize,
    /// Replicas that must confirm a history publish (`WAIT`); 0: none.
    pub history_min_replicas: u32,
}

#[derive(Default)]
struct Entry {
    holds: usize,
    /// Subscribed on the current connection.
    active: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

pub struct RedisBroker {
    endpoint: Arc<Endpoint>,
    publisher: Publisher,
    /// Spreads commands without an order of their own over the lanes.
    next_lane: AtomicU64,
    node_topic: String,
    timeout: Duration,
    probe_interval: Duration,
    wanted: Mutex<HashMap<String, Entry>>,
    changed: Notify,
    ready: AtomicBool,
    /// Has been ready at least once since the node started.
    started: AtomicBool,
    /// Where the liveness probe goes: the node's topic, or on a Redis Cluster one topic on each
    /// shard (see [`shard_probe_topics`]).
    probe_topics: Mutex<Vec<String>>,
    /// Per probe topic, the newest probe seen back.
    probe_seen: Mutex<HashMap<String, u64>>,
    functions: bool,
    metrics: Arc<Metrics>,
}

impl RedisBroker {
    /// Starts the subscriber task. It runs until `shutdown`, reconnecting as needed.
    pub fn start(
        settings: RedisSettings,
        inbound: Weak<dyn Inbound>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let endpoint = Arc::new(settings.endpoint);
        let lane = LaneSettings {
            endpoint: endpoint.clone(),
            timeout: settings.timeout,
            min_replicas: settings.history_min_replicas,
            library: settings.functions.then_some(LIBRARY),
            metrics: metrics.clone(),
        };
        let publisher = Publisher::start(
            lane,
            PUBLISH_LANES,
            settings.publish_queue,
            shutdown.clone(),
        );
        let broker = Arc::new(Self {
            endpoint,
            publisher,
            next_lane: AtomicU64::new(0),
            node_topic: settings.topics.node(&settings.node_id),
            timeout: settings.timeout,
            probe_interval: settings.probe_interval,
            wanted: Mutex::default(),
            changed: Notify::new(),
            ready: AtomicBool::new(false),
            started: AtomicBool::new(false),
            probe_topics: Mutex::default(),
            probe_seen: Mutex::default(),
            functions: settings.functions,
            metrics,
        });
        // The node's permanent topics.
        for topic in [
            settings.topics.broadcast(),
            settings.topics.control(),
            &broker.node_topic,
        ] {
            broker.take_hold(topic);
        }
        // The probe holds its topics on top: on a cluster they change with the shards, and the
        // node topic keeps its own hold.
        broker.probe_on(vec![broker.node_topic.clone()]);
        tokio::spawn(broker.clone().supervise(inbound, shutdown));
        Ok(broker)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn has_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    fn wanted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        lock(&self.wanted)
    }

    /// Takes a hold; returns a receiver that fires once the topic is active, or `None` if it is.
    fn take_hold(&self, topic: &str) -> Option<oneshot::Receiver<()>> {
        let mut wanted = self.wanted();
        let entry = match wanted.get_mut(topic) {
            Some(e) => e,
            None => wanted.entry(topic.to_owned()).or_default(),
        };
        entry.holds += 1;
        if entry.active {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        entry.waiters.push(tx);
        drop(wanted);
        self.changed.notify_one();
        Some(rx)
    }

    pub async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        if !self.is_ready() {
            return Err(BrokerError::Unavailable);
        }
        let Some(active) = self.take_hold(topic) else {
            return Ok(());
        };
        match tokio::time::timeout(self.timeout, active).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.release(topic);
                Err(BrokerError::Timeout)
            }
        }
    }

    pub async fn hold(&self, topic: &str) {
        if let Some(active) = self.take_hold(topic)
            && self.is_ready()
        {
            let _ = tokio::time::timeout(self.timeout, active).await;
        }
    }

    /// Subscribes `topic` again if it is still held: the server ended its subscription.
    fn resubscribe(&self, topic: &str) {
        let mut wanted = self.wanted();
        if let Some(entry) = wanted.get_mut(topic)
            && entry.holds > 0
            && entry.active
        {
            entry.active = false;
            drop(wanted);
            debug!(
                topic,
                "redis ended a subscription that is still held; subscribing again"
            );
            self.changed.notify_one();
        }
    }

    pub fn release(&self, topic: &str) {
        let mut wanted = self.wanted();
        if let Some(entry) = wanted.get_mut(topic) {
            entry.holds = entry.holds.saturating_sub(1);
            if entry.holds == 0 {
                drop(wanted);
                self.changed.notify_one();
            }
        }
    }

    /// Queues a `PUBLISH` (on Redis Cluster, `SPUBLISH`) on the lane of `key`, in order after
    /// what was queued there before.
    pub async fn publish(&self, key: u64, topic: &str, payload: &[u8]) -> Reply {
        let sharded = self.endpoint.is_cluster();
        let mut cmd = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(topic).arg(payload);
        self.publisher.send(key, cmd).await
    }

    /// `FUNCTION LOAD REPLACE` of the `pushgate` library.
    pub async fn load_functions(&self) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(LIBRARY);
        self.fcall::<redis::Value>(cmd).await.map(drop)
    }

    /// Runs `cmd` on a lane within the timeout. A lane that finds Redis without the function
    /// library (restarted or flushed) loads it and runs the command again.
    async fn fcall<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, BrokerError> {
        let mut values = self.fcall_pipeline_values(vec![cmd]).await?;
        let value = values.pop().unwrap_or(redis::Value::Nil);
        redis::from_redis_value(value).map_err(|e| BrokerError::Redis(e.to_string()))
    }

    /// Like [`fcall`](Self::fcall), for commands whose replies do not matter.
    async fn fcall_pipeline(&self, cmds: Vec<redis::Cmd>) -> Result<(), BrokerError> {
        self.fcall_pipeline_values(cmds).await.map(drop)
    }

    /// Like [`fcall`](Self::fcall), for several commands: queued together on one lane, one
    /// reply each; the first error fails them all.
    async fn fcall_pipeline_values(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<redis::Value>, BrokerError> {
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let run = async {
            let mut replies = Vec::with_capacity(cmds.len());
            for cmd in cmds {
                replies.push(self.publisher.send(lane, cmd).await);
            }
            let mut values = Vec::with_capacity(replies.len());
            for reply in replies {
                values.push(reply.await?);
            }
            Ok(values)
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout),
        }
    }

    /// Queues a `pushgate_publish` on the lane of `key`: appends `envelope` to a history channel
    /// and publishes it on `topic`, atomically. The reply holds the message's offset and the
    /// history's epoch ([`parse_position`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_history(
        &self,
        key: u64,
        stream: &str,
        meta: &str,
        topic: &str,
        envelope: &[u8],
        size: u64,
        ttl_ms: u64,
    ) -> Reply {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pushgate_publish")
            .arg(2)
            .arg(stream)
            .arg(meta)
            .arg(topic)
            .arg(envelope)
            .arg(size)
            .arg(ttl_ms);
        self.publisher.send_replicated(key, cmd).await
    }

    /// `pushgate_history`: the epoch and last offset of a history channel (a new epoch if it
    /// has none), and up to `limit` messages after offset `after`.
    pub async fn read_history(
        &self,
        stream: &str,
        meta: &str,
        after: u64,
        limit: u64,
        ttl_ms: u64,
    ) -> Result<HistoryEntries, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pushgate_history")
            .arg(2)
            .arg(stream)
            .arg(meta)
            .arg(after)
            .arg(limit)
            .arg(ttl_ms);
        let value = self.fcall::<redis::Value>(cmd).await?;
        parse_history(value)
            .ok_or_else(|| BrokerError::Redis("unexpected pushgate_history reply".into()))
    }

    /// Queues `cmd` on the publishing lane of `key`, after what was queued there before.
    pub async fn queue(&self, key: u64, cmd: redis::Cmd) -> Reply {
        self.publisher.send(key, cmd).await
    }

    /// Queues `cmd` on the lane of `key` if there is room now; gives it back otherwise.
    pub fn try_queue(&self, key: u64, cmd: redis::Cmd) -> Result<Reply, redis::Cmd> {
        self.publisher.try_send(key, cmd)
    }

    /// `pushgate_presence_join`: adds entries; a user's first publishes a join on the topic.
    pub fn presence_join_cmd(
        keys: &PresenceKeys,
        ttl_ms: u64,
        items: &[PresenceItem],
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pushgate_presence_join")
            .arg(3)
            .arg(&keys.hash)
            .arg(&keys.zset)
            .arg(&keys.users)
            .arg(ttl_ms)
            .arg(&keys.topic);
        for (session, user, entry) in items {
            cmd.arg(session).arg(user).arg(entry);
        }
        cmd
    }

    /// `pushgate_presence_leave`: removes entries; a user's last publishes a leave.
    pub fn presence_leave_cmd(keys: &PresenceKeys, sessions: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pushgate_presence_leave")
            .arg(3)
            .arg(&keys.hash)
            .arg(&keys.zset)
            .arg(&keys.users)
            .arg(&keys.topic)
            .arg(sessions);
        cmd
    }

    /// `pushgate_presence_join` of several channels' entries, pipelined.
    pub async fn presence_join_groups(
        &self,
        groups: &[(PresenceKeys, Vec<PresenceItem>)],
        ttl_ms: u64,
    ) -> Result<(), BrokerError> {
        let cmds = (groups.iter())
            .map(|(keys, items)| Self::presence_join_cmd(keys, ttl_ms, items))
            .collect();
        self.fcall_pipeline(cmds).await
    }

    /// `pushgate_presence_refresh` of `(keys, sessions)` groups, pipelined: extends the entries;
    /// returns, per group, the sessions that had none.
    pub async fn presence_refresh(
        &self,
        groups: &[(PresenceKeys, Vec<String>)],
        ttl_ms: u64,
    ) -> Result<Vec<Vec<String>>, BrokerError> {
        let cmds = (groups.iter())
            .map(|(keys, sessions)| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("pushgate_presence_refresh")
                    .arg(3)
                    .arg(&keys.hash)
                    .arg(&keys.zset)
                    .arg(&keys.users)
                    .arg(ttl_ms)
                    .arg(sessions);
                cmd
            })
            .collect();
        let values = self.fcall_pipeline_values(cmds).await?;
        values
            .into_iter()
            .map(|v| {
                redis::from_redis_value::<Vec<String>>(v)
                    .map_err(|e| BrokerError::Redis(format!("unexpected refresh reply: {e}")))
            })
            .collect()
    }

    /// `pushgate_presence_expire` of these channels, pipelined: removes up to `limit` expired
    /// entries of each, with their leaves. Returns how many were removed in all.
    pub async fn presence_expire(
        &self,
        channels: &[PresenceKeys],
        limit: u64,
    ) -> Result<u64, BrokerError> {
        let cmds = (channels.iter())
            .map(|keys| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("pushgate_presence_expire")
                    .arg(3)
                    .arg(&keys.hash)
                    .arg(&keys.zset)
                    .arg(&keys.users)
                    .arg(&keys.topic)
                    .arg(limit);
                cmd
            })
            .collect();
        let values = self.fcall_pipeline_values(cmds).await?;
        Ok(values
            .iter()
            .map(|v| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0))
            .sum())
    }

    /// `pushgate_presence_members`: the unexpired entries of a presence channel, as JSON (the
    /// expired ones are removed first, with their leaves).
    pub async fn presence_members(&self, keys: &PresenceKeys) -> Result<Vec<Vec<u8>>, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pushgate_presence_members")
            .arg(3)
            .arg(&keys.hash)
            .arg(&keys.zset)
            .arg(&keys.users)
            .arg(&keys.topic);
        self.fcall::<Vec<Vec<u8>>>(cmd).await
    }

    /// Connects, serves one connection until it fails, and again, until shutdown.
    async fn supervise(self: Arc<Self>, inbound: Weak<dyn Inbound>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_before = false;
        loop {
            let connect = self.connect_subscriber(&inbound);
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(self.timeout, connect) => r,
            };
            match pubsub {
                Ok(Ok(pubsub)) => {
                    if connected_before {
                        info!("redis subscriber reconnected");
                        self.publisher.reconnect();
                    }
                    let reconnect = connected_before;
                    connected_before = true;
                    backoff = BACKOFF_MIN;
                    self.metrics.redis_reconnects.inc();
                    if self.functions
                        && let Err(e) = self.load_functions().await
                    {
                        warn!(error = %e, "redis functions not loaded; history and presence will fail");
                    }
                    self.serve(pubsub, &inbound, &shutdown, reconnect).await;
                    self.mark_down();
                    if shutdown.is_cancelled() {
                        return;
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "redis subscriber cannot connect"),
                Err(_) => warn!("redis subscriber connect timed out"),
            }
            // Full jitter, so that a cluster does not reconnect in lockstep.
            let pause = backoff.mul_f64(rand_fraction());
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn mark_down(&self) {
        if self.ready.swap(false, Ordering::AcqRel) {
            warn!("redis subscription lost; local delivery continues");
        }
        self.metrics.redis_up.set(0);
        let mut wanted = self.wanted();
        wanted.retain(|_, e| {
            e.active = false;
            e.holds > 0
        });
        self.metrics.redis_subscriptions.set(0);
    }

    /// Runs one connection: the read loop, the reconciler and the liveness probe.
    /// The subscriber connection: a Pub/Sub connection to one server, or on a Redis Cluster a
    /// connection to every shard whose shard-channel messages go straight to
    /// [`on_message`](Self::on_message) as they are read.
    async fn connect_subscriber(
        self: &Arc<Self>,
        inbound: &Weak<dyn Inbound>,
    ) -> Result<Subscriber, BrokerError> {
        if !self.endpoint.is_cluster() {
            let client = self.endpoint.client().await?;
            return (client.get_async_pubsub().await)
                .map(Subscriber::Single)
                .map_err(|e| BrokerError::Redis(e.to_string()));
        }
        let (broker, inbound) = (Arc::downgrade(self), inbound.clone());
        let pushes = move |push: redis::PushInfo| {
            let Some(broker) = broker.upgrade() else {
                return Ok(());
            };
            match (&push.kind, &push.data[..]) {
                (
                    redis::PushKind::SMessage,
                    [Value::BulkString(topic), Value::BulkString(payload)],
                ) => {
                    if let Ok(topic) = std::str::from_utf8(topic) {
                        broker.on_message(topic, payload, &inbound);
                    }
                }
                // A shard lost the topic's slot (a reshard moved it): subscribe again, on the
                // slot's new owner.
                (redis::PushKind::SUnsubscribe, [Value::BulkString(topic), ..]) => {
                    if let Ok(topic) = std::str::from_utf8(topic) {
                        broker.resubscribe(topic);
                    }
                }
                _ => {}
            }
            Ok::<(), std::convert::Infallible>(())
        };
        let conn = self
            .endpoint
            .cluster_connection(self.timeout, Some(pushes))
            .await?;
        Ok(Subscriber::Cluster(conn))
    }

    async fn serve(
        self: &Arc<Self>,
        subscriber: Subscriber,
        inbound: &Weak<dyn Inbound>,
        shutdown: &CancellationToken,
        reconnect: bool,
    ) {
        let (sink, reader): (_, Pin<Box<dyn Future<Output = ()> + Send + '_>>) = match subscriber {
            Subscriber::Single(pubsub) => {
                let (sink, mut stream) = pubsub.split();
                let reader = async move {
                    while let Some(msg) = stream.next().await {
                        self.on_message(msg.get_channel_name(), msg.get_payload_bytes(), inbound);
                    }
                    warn!("redis subscriber connection closed");
                };
                (SubscriptionSink::Single(sink), Box::pin(reader))
            }
            // Messages arrive through the push callback; the cluster connection reconnects
            // to shards by itself, and the probe notices one that stays silent.
            Subscriber::Cluster(mut conn) => {
                match shard_probe_topics(&mut conn, &self.node_topic).await {
                    Ok(topics) => self.probe_on(topics),
                    Err(e) => {
                        warn!(error = %e, "redis cluster shards unknown");
                        return;
                    }
                }
                (
                    SubscriptionSink::Cluster(conn),
                    Box::pin(std::future::pending()),
                )
            }
        };
        let reconciler = async {
            let mut sink = sink;
            let mut first = true;
            loop {
                // The first pass takes what is held when the connection comes up and then
                // counts as ready: holds taken meanwhile (a node's clients reconnecting to it
                // by the thousand) wait for the next passes, not the node's readiness.
                if let Err(e) = self.reconcile(&mut sink, !first).await {
                    warn!(error = %e, "redis subscribe failed");
                    return;
                }
                if first {
                    first = false;
                    self.ready.store(true, Ordering::Release);
                    self.started.store(true, Ordering::Release);
                    self.metrics.redis_up.set(1);
                    info!("redis subscription ready");
                    if let Some(inbound) = inbound.upgrade() {
                        inbound.on_ready(reconnect);
                    }
                }
                self.changed.notified().await;
            }
        };
        let prober = self.probe_loop();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = reader => {}
            _ = reconciler => {}
            _ = prober => {}
        }
    }

    /// Probes `topics` from now on, holding them, and no longer the ones probed before.
    fn probe_on(&self, topics: Vec<String>) {
        let old = std::mem::replace(&mut *lock(&self.probe_topics), topics.clone());
        for topic in &topics {
            if !old.contains(topic) {
                self.take_hold(topic);
            }
        }
        for topic in old.iter().filter(|t| !topics.contains(t)) {
            self.release(topic);
        }
    }

    fn on_message(&self, topic: &str, payload: &[u8], inbound: &Weak<dyn Inbound>) {
        if topic.starts_with(&self.node_topic)
            && let Ok(NodeMessage::Probe { nonce }) = NodeMessage::decode(payload)
        {
            if let Ok(n) = nonce.parse::<u64>() {
                let mut seen = lock(&self.probe_seen);
                let last = seen.entry(topic.to_owned()).or_default();
                *last = n.max(*last);
            }
            return;
        }
        if let Some(inbound) = inbound.upgrade() {
            inbound.on_message(topic, payload);
        }
    }

    /// Returns when a probe was not seen back in time.
    async fn probe_loop(&self) {
        let mut interval = tokio::time::interval(self.probe_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        let mut sent = None::<u64>;
        loop {
            interval.tick().await;
            let topics = lock(&self.probe_topics).clone();
            if let Some(n) = sent
                && topics
                    .iter()
                    .any(|t| lock(&self.probe_seen).get(t).is_none_or(|seen| *seen < n))
            {
                self.metrics.redis_probe_failures.inc();
                warn!(
                    "redis liveness probe not received within {:?}; reconnecting",
                    self.probe_interval
                );
                return;
            }
            let n = unix_nanos();
            let probe = NodeMessage::Probe {
                nonce: n.to_string().into(),
            };
            let mut replies = Vec::with_capacity(topics.len());
            for topic in &topics {
                replies.push(self.publish(n, topic, &probe.encode()).await);
            }
            match try_join_all(replies).await {
                Ok(_) => sent = Some(n),
                Err(e) => {
                    self.metrics.redis_probe_failures.inc();
                    warn!(error = %e, "redis liveness probe could not be sent; reconnecting");
                    return;
                }
            }
        }
    }

    /// Brings the connection's subscriptions in line with the holds, until nothing is left to do.
    /// With `until_idle`, passes again until one finds nothing to do; otherwise makes one pass.
    async fn reconcile(
        &self,
        sink: &mut SubscriptionSink,
        until_idle: bool,
    ) -> Result<(), BrokerError> {
        loop {
            let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
            {
                let mut wanted = self.wanted();
                wanted.retain(|topic, e| {
                    if e.holds == 0 && !e.active {
                        return false;
                    }
                    if e.holds > 0 && !e.active {
                        subscribe.push(topic.clone());
                    } else if e.holds == 0 && e.active {
                        // Inactive from now, so that a new hold waits for a fresh SUBSCRIBE.
                        e.active = false;
                        unsubscribe.push(topic.clone());
                    }
                    true
                });
            }
            if subscribe.is_empty() && unsubscribe.is_empty() {
                let count = self.wanted().values().filter(|e| e.active).count();
                self.metrics.redis_subscriptions.set(count as i64);
                return Ok(());
            }
            for batch in unsubscribe.chunks(BATCH) {
                debug!(count = batch.len(), "redis unsubscribe");
                self.command(sink.unsubscribe(batch)).await?;
            }
            for batch in subscribe.chunks(BATCH) {
                debug!(count = batch.len(), "redis subscribe");
                self.command(sink.subscribe(batch)).await?;
                let mut wanted = self.wanted();
                for topic in batch {
                    if let Some(e) = wanted.get_mut(topic) {
                        e.active = true;
                        for w in e.waiters.drain(..) {
                            let _ = w.send(());
                        }
                    }
                }
            }
            if !until_idle {
                // Whatever was held meanwhile gets the next pass.
                self.changed.notify_one();
                return Ok(());
            }
        }
    }

    async fn command(
        &self,
        f: impl Future<Output = redis::RedisResult<()>>,
    ) -> Result<(), BrokerError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| BrokerError::Redis(e.to_string())),
            Err(_) => Err(BrokerError::Timeout),
        }
    }
}

/// One probe topic per shard of the cluster `conn` reaches: names under `node_topic` whose
/// slots fall on each primary's slots, so that a probe through each notices a shard that went
/// silent or moved to another primary.
async fn shard_probe_topics(
    conn: &mut ClusterConnection,
    node_topic: &str,
) -> Result<Vec<String>, BrokerError> {
    let error = |e: redis::RedisError| BrokerError::Redis(e.to_string());
    let slots: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(error)?;
    // Each entry: [first slot, last slot, [host, port, id, ...] of the primary, replicas...].
    let mut shards: Vec<(Value, Vec<(i64, i64)>)> = Vec::new();
    for entry in slots {
        let Value::Array(fields) = entry else {
            continue;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(primary)) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        match shards.iter_mut().find(|(p, _)| p == primary) {
            Some((_, ranges)) => ranges.push((*first, *last)),
            None => shards.push((primary.clone(), vec![(*first, *last)])),
        }
    }
    let mut topics: Vec<Option<String>> = vec![None; shards.len()];
    let mut next = 0;
    // Each candidate lands on a shard with the share of the slots it serves: a few rounds
    // cover every shard of an evenly sharded cluster.
    while topics.iter().any(Option::is_none) && next < 16_384 {
        let candidates: Vec<String> = (next..next + 64)
            .map(|i| format!("{node_topic}:probe:{i}"))
            .collect();
        next += 64;
        let slots = try_join_all(candidates.iter().map(|topic| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(topic)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        }))
        .await
        .map_err(error)?;
        for (topic, slot) in candidates.into_iter().zip(slots) {
            let shard = shards.iter().position(|(_, ranges)| {
                ranges
                    .iter()
                    .any(|(first, last)| (*first..=*last).contains(&slot))
            });
            if let Some(i) = shard
                && topics[i].is_none()
            {
                topics[i] = Some(topic);
            }
        }
    }
    topics
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| BrokerError::Redis("no probe topic for a shard".into()))
}

/// A node's subscriber connection.
enum Subscriber {
    Single(redis::aio::PubSub),
    Cluster(ClusterConnection),
}

/// Where subscriptions are changed: a Pub/Sub connection's sink, or a cluster connection (shard
/// channels, each subscribed on the shard of its slot).
enum SubscriptionSink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl SubscriptionSink {
    async fn subscribe(&mut self, topics: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.subscribe(topics).await,
            // SSUBSCRIBE names channels of one slot only: one command per topic, all at once.
            Self::Cluster(conn) => try_join_all(topics.iter().map(|topic| {
                let mut conn = conn.clone();
                async move { conn.ssubscribe(topic).await }
            }))
            .await
            .map(drop),
        }
    }

    async fn unsubscribe(&mut self, topics: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.unsubscribe(topics).await,
            Self::Cluster(conn) => try_join_all(topics.iter().map(|topic| {
                let mut conn = conn.clone();
                async move { conn.sunsubscribe(topic).await }
            }))
            .await
            .map(drop),
        }
    }
}

/// The `(offset, epoch)` of a `pushgate_publish` reply.
pub fn parse_position(value: redis::Value) -> Result<(u64, String), BrokerError> {
    redis::from_redis_value(value)
        .map_err(|e| BrokerError::Redis(format!("unexpected pushgate_publish reply: {e}")))
}

fn parse_history(value: redis::Value) -> Option<HistoryEntries> {
    let text = |v: Value| match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let Value::Array(parts) = value else {
        return None;
    };
    let [epoch, top, Value::Array(flat)] = <[Value; 3]>::try_from(parts).ok()? else {
        return None;
    };
    let top = int(&top)?;
    let mut entries = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(offset), Some(payload)) = (flat.next(), flat.next()) {
        let payload = match payload {
            Value::BulkString(b) => b,
            _ => return None,
        };
        entries.push((int(&offset)?, payload));
    }
    Some((text(epoch)?, top, entries))
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A number in [0, 1) that differs between nodes and calls; good enough for backoff jitter.
fn rand_fraction() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
