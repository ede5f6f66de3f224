//! A gateway node: its sessions, its broker, and what it does with a message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pushgate_protocol::envelope::{ChannelPayload, EnvelopeError, NodeStats, Stamp};
use pushgate_protocol::server::{MessageRef, encode_message};
use pushgate_protocol::{
    ControlMessage, Envelope, NameError, NodeMessage, RawJson, Target, close, validate_channel,
    validate_sharded_channel,
};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::auth::Verifier;
use crate::broker::{
    Broker, BrokerError, Endpoint, Inbound, RedisBroker, RedisSettings, Reply, Sent, Topic, Topics,
    lane_key, parse_position,
};
use crate::config::{Secret, ServeArgs};
use crate::history::{MemoryHistory, Policy};
use crate::hub::{Frame, Hub};
use crate::lock;
use crate::metrics::Metrics;

mod channels;
mod history;
mod isolation;
mod presence;

pub use channels::{ChannelsDoc, ClusterChannel, TOP_CHANNELS};

pub struct Node {
    pub config: ServeArgs,
    pub instance: Arc<str>,
    pub verifier: Verifier,
    pub hub: Hub,
    pub broker: Broker,
    pub topics: Topics,
    pub metrics: Arc<Metrics>,
    /// Which channels keep history and track presence.
    pub policy: Policy,
    /// History with the embedded broker.
    pub memory: MemoryHistory,
    /// This node's presence entries, per channel.
    presence: Mutex<HashMap<Arc<str>, presence::Local>>,
    /// Removals of presence entries on their way to Redis (a drain waits for them).
    presence_tasks: TaskTracker,
    connections: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Cancelled when a drain starts.
    draining: CancellationToken,
    peers: Mutex<HashMap<String, (Instant, NodeStats)>>,
    /// Set while this node cannot reach the broker and other nodes can (see [`isolation`]).
    isolated: AtomicBool,
    started: Instant,
    /// Stops the node's background tasks.
    pub shutdown: CancellationToken,
    me: Weak<Node>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeFull,
    TooManyFromIp,
}

/// A connection's place in the node's limits; freed on drop.
pub struct Admission {
    node: Arc<Node>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.metrics.connections.dec();
        if self.node.config.max_connections_per_ip > 0 {
            let mut per_ip = lock(&self.node.per_ip);
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// A message to publish from this node.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub target: Target<'a>,
    pub from: Option<&'a str>,
    pub data: &'a RawJson,
}

impl<'a> Outgoing<'a> {
    /// The delivery of this message, under the ID and time the node gives it.
    fn message<'m>(&self, id: &'m str, ts: u64) -> MessageRef<'m>
    where
        'a: 'm,
    {
        MessageRef {
            id,
            ts,
            from: self.from,
            target: self.target,
            data: self.data,
        }
    }

    /// What goes to Redis for this message: the same ID and time, and the node it came from
    /// (so that node skips its echo).
    fn envelope<'m>(&self, id: &'m str, ts: u64, origin: &'m str) -> Envelope<'m>
    where
        'a: 'm,
    {
        Envelope {
            id: Some(id.into()),
            ts: Some(ts),
            from: self.from.map(Into::into),
            origin: Some(origin.into()),
            data: self.data,
        }
    }
}

/// A message submitted to the broker: resolves to the published message once the broker has it.
pub struct Submitted {
    id: String,
    wait: Wait,
}

enum Wait {
    Done(Result<Option<(u64, Arc<str>)>, BrokerError>),
    Plain(Sent),
    History(Reply),
}

impl Submitted {
    /// Whether the message goes through Redis history: if that fails, it was published nowhere
    /// (a plain message was still delivered on this node).
    pub fn through_history(&self) -> bool {
        matches!(self.wait, Wait::History(_))
    }

    fn done(id: String, position: Result<Option<(u64, Arc<str>)>, BrokerError>) -> Self {
        Self {
            id,
            wait: Wait::Done(position),
        }
    }
}

impl Future for Submitted {
    type Output = Result<Published, BrokerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let position = match &mut this.wait {
            Wait::Done(r) => std::mem::replace(r, Err(BrokerError::Unavailable)),
            Wait::Plain(sent) => ready!(Pin::new(sent).poll(cx)).map(|()| None),
            Wait::History(reply) => ready!(Pin::new(reply).poll(cx))
                .and_then(parse_position)
                .map(|(offset, epoch)| Some((offset, epoch.into()))),
        };
        Poll::Ready(position.map(|position| Published {
            id: std::mem::take(&mut this.id),
            position,
        }))
    }
}

/// A published message: its ID and, on a history channel, its offset and epoch.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    pub position: Option<(u64, Arc<str>)>,
}

pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Builds a node and starts its broker.
    pub fn start(config: ServeArgs, verifier: Verifier) -> Result<Arc<Self>, BrokerError> {
        let instance: Arc<str> = config
            .instance_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().simple().to_string())
            .into();
        let mut metrics = Metrics::new();
        if let Some(jwks) = verifier.jwks() {
            metrics.register_jwks(jwks.metrics());
        }
        let metrics = Arc::new(metrics);
        let topics = Topics::new(&config.redis_prefix, !config.redis_cluster.is_empty());
        let shutdown = CancellationToken::new();
        let policy = Policy::new(&config.history, &config.presence)
            .with_presence_events(&config.presence_events);
        let mut broker_error = None;
        let node = Arc::new_cyclic(|me: &Weak<Node>| {
            let endpoint = match (&config.redis_url, &config.redis_sentinel[..]) {
                _ if !config.redis_cluster.is_empty() => {
                    let seeds: Vec<&str> =
                        config.redis_cluster.iter().map(Secret::expose).collect();
                    Some(Endpoint::cluster(&seeds))
                }
                (None, []) => None,
                (Some(url), _) => Some(Endpoint::single(url.expose())),
                (None, sentinels) => {
                    let urls: Vec<&str> = sentinels.iter().map(Secret::expose).collect();
                    let master = config.redis_sentinel_master.as_deref().unwrap_or_default();
                    Some(Endpoint::sentinel(&urls, master))
                }
            };
            let broker = match endpoint {
                None => Broker::Embedded,
                Some(endpoint) => {
                    let settings = endpoint.map(|endpoint| RedisSettings {
                        endpoint,
                        topics: topics.clone(),
                        node_id: instance.to_string(),
                        timeout: config.redis_timeout,
                        probe_interval: config.redis_probe_interval,
                        functions: policy.needs_functions(),
                        publish_queue: config.publish_queue as usize,
                        history_min_replicas: config.history_min_replicas,
                    });
                    let inbound: Weak<dyn Inbound> = me.clone();
                    let started = settings.and_then(|settings| {
                        RedisBroker::start(settings, inbound, metrics.clone(), shutdown.clone())
                    });
                    match started {
                        Ok(r) => Broker::Redis(r),
                        Err(e) => {
                            broker_error = Some(e);
                            Broker::Embedded
                        }
                    }
                }
            };
            if matches!(broker, Broker::Embedded) {
                metrics.redis_up.set(1);
            }
            Node {
                hub: Hub::new(metrics.deliveries.clone(), metrics.drops.clone()),
                policy,
                memory: MemoryHistory::default(),
                presence: Mutex::default(),
                presence_tasks: TaskTracker::new(),
                connections: Arc::new(Semaphore::new(config.max_connections)),
                per_ip: Mutex::default(),
                draining: CancellationToken::new(),
                peers: Mutex::default(),
                isolated: AtomicBool::new(false),
                started: Instant::now(),
                config,
                instance,
                verifier,
                broker,
                topics,
                metrics,
                shutdown,
                me: me.clone(),
            }
        });
        if let Some(e) = broker_error {
            node.shutdown.cancel();
            return Err(e);
        }
        if matches!(node.broker, Broker::Redis(_)) {
            tokio::spawn(node.clone().heartbeats());
            tokio::spawn(node.clone().watch_isolation());
        }
        Ok(node)
    }

    /// Resolves once a drain has started.
    pub async fn drain_started(&self) {
        self.draining.cancelled().await;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Checks a channel name by this node's rules: on Redis Cluster, without braces.
    pub fn validate_channel(&self, name: &str) -> Result<(), NameError> {
        if self.topics.sharded() {
            validate_sharded_channel(name)
        } else {
            validate_channel(name)
        }
    }

    /// Whether this node should get new clients; if not, why. Once the node has reached the
    /// broker, the broker's state counts only when other nodes reach it and this one does not:
    /// an outage shared by every node leaves each serving its own clients, and ready.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining")
        } else if !self.broker.has_started() {
            Err("not yet connected to the broker")
        } else if !self.verifier.is_ready() {
            Err("no JWKS keys loaded")
        } else if self.is_isolated() {
            Err("other nodes reach the broker and this node does not")
        } else if self.connections.available_permits() == 0 {
            Err("at the connection limit")
        } else {
            Ok(())
        }
    }

    /// Takes a connection slot, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::NodeFull)?;
        let limit = self.config.max_connections_per_ip;
        if limit > 0 {
            let mut per_ip = lock(&self.per_ip);
            let n = per_ip.entry(ip).or_default();
            if *n >= limit {
                return Err(Refusal::TooManyFromIp);
            }
            *n += 1;
        }
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
        Ok(Admission {
            node: self.clone(),
            ip,
            _permit: permit,
        })
    }

    /// The public ID of a local session: `{instance}.{uuid}`, so any node can route to it.
    pub fn session_id(&self, id: Uuid) -> String {
        format!("{}.{}", self.instance, id.simple())
    }

    /// Encodes a delivery once; every recipient shares the bytes.
    fn encode(&self, m: &MessageRef<'_>) -> Frame {
        self.metrics.encodes.inc();
        Frame::message(encode_message(m), m.ts)
    }

    fn deliver_locally(&self, m: &MessageRef<'_>) -> usize {
        match m.target {
            Target::Channel(c) => self.hub.to_channel(c, || self.encode(m)),
            Target::User(u) => self.hub.to_user(u, || self.encode(m)),
            Target::Broadcast => self.hub.to_all(&self.encode(m)),
            Target::Session(s) => match parse_session_id(s) {
                Some((node, id)) if node == &*self.instance => {
                    usize::from(self.hub.to_session(id, &self.encode(m)))
                }
                _ => 0,
            },
        }
    }

    /// Delivers to this node's clients at once, then hands the message to the other nodes.
    /// Returns the message ID. An error means the other nodes may not have it.
    pub async fn publish(&self, out: Outgoing<'_>) -> Result<String, BrokerError> {
        self.publish_message(out).await.map(|p| p.id)
    }

    /// Like [`publish`](Self::publish), with the message's position on a history channel.
    pub async fn publish_message(&self, out: Outgoing<'_>) -> Result<Published, BrokerError> {
        let lane = match out.target {
            Target::Channel(c) => lane_key(c),
            Target::User(u) => lane_key(u),
            Target::Session(s) => lane_key(s),
            Target::Broadcast => 0,
        };
        self.submit(out, lane).await.await
    }

    /// Publishes without waiting for the broker: delivers to this node's clients at once and
    /// queues the message for the other nodes on the broker lane `lane`, in order after what was
    /// submitted there before. The returned [`Submitted`] resolves when the broker has it; an
    /// error then means the other nodes may not have it.
    ///
    /// A history channel's message goes through history: with Redis, atomically appended and
    /// published by the `pushgate_publish` function, and delivered by every node (this one
    /// included) when Redis hands it back; an error means it was not published at all.
    pub async fn submit(&self, out: Outgoing<'_>, lane: u64) -> Submitted {
        if let Target::Channel(channel) = out.target
            && let Some(rule) = self.policy.history(channel)
        {
            return self.submit_history(channel, rule, out, lane).await;
        }
        let (id, ts) = (Uuid::now_v7().to_string(), unix_millis());
        let envelope = out.envelope(&id, ts, &self.instance);
        let (topic, payload) = match out.target {
            Target::Channel(c) => (self.topics.channel(c), envelope.encode()),
            Target::User(u) => (self.topics.user(u), envelope.encode()),
            Target::Broadcast => (self.topics.broadcast().to_owned(), envelope.encode()),
            Target::Session(s) => match parse_session_id(s) {
                Some((node, _)) if node != &*self.instance => (
                    self.topics.node(node),
                    NodeMessage::Deliver {
                        session: s.into(),
                        envelope,
                    }
                    .encode(),
                ),
                // Local, or not a session ID at all: nowhere else to send it.
                _ => {
                    self.deliver_locally(&out.message(&id, ts));
                    return Submitted::done(id, Ok(None));
                }
            },
        };
        // To the other nodes first, then to this node's clients: the fan-out wakes every local
        // recipient's task, and the publishing lane's task, woken before them, then runs before
        // them, so that the other nodes deliver while this one does.
        let sent = self.broker.send(lane, &topic, &payload).await;
        self.deliver_locally(&out.message(&id, ts));
        Submitted {
            id,
            wait: Wait::Plain(sent),
        }
    }

    /// Closes every connection of `user` on every node.
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, BrokerError> {
        let closed = self.hub.close_user(user, close::DISCONNECTED);
        let message = ControlMessage::Disconnect {
            user: user.to_owned(),
            origin: self.instance.to_string(),
        };
        self.broker
            .publish(self.topics.control(), &message.encode())
            .await?;
        Ok(closed)
    }

    /// A message on a channel topic: stamped (from history, delivered tagged, even our own:
    /// the publishing node delivers history messages only when Redis hands them back) or plain;
    /// or a presence change (a join or leave, from the presence functions).
    fn on_channel(&self, channel: &str, payload: &[u8]) -> Result<(), EnvelopeError> {
        let (e, stamp) = match ChannelPayload::decode(payload)? {
            ChannelPayload::Message(e, stamp) => (e, stamp),
            ChannelPayload::Presence(change) => {
                self.on_presence_change(channel, &change);
                return Ok(());
            }
        };
        let Some(stamp) = stamp else {
            return self.on_plain(Target::Channel(channel), e);
        };
        self.observe_hop(&e);
        let frame = received(&e, Target::Channel(channel), Some(&stamp), |m| {
            self.encode_at(m, stamp.offset, &stamp.epoch)
        });
        self.hub
            .to_channel_at(channel, &frame, &stamp.epoch, stamp.offset);
        Ok(())
    }

    /// The Redis hop of a message another node published (a backend's message has no origin,
    /// and its timestamp, if any, was not stamped at a node).
    fn observe_hop(&self, e: &Envelope<'_>) {
        if let (Some(origin), Some(ts)) = (&e.origin, e.ts)
            && **origin != *self.instance
        {
            let hop = crate::metrics::lag_since(crate::metrics::unix_seconds(), ts);
            self.metrics.redis_hop_seconds.observe(hop);
        }
    }

    fn on_envelope(&self, target: Target<'_>, payload: &[u8]) -> Result<(), EnvelopeError> {
        self.on_plain(target, Envelope::decode(payload)?)
    }

    fn on_plain(&self, target: Target<'_>, e: Envelope<'_>) -> Result<(), EnvelopeError> {
        if e.origin.as_deref() == Some(&*self.instance) {
            return Ok(()); // our own echo: delivered when published
        }
        self.observe_hop(&e);
        received(&e, target, None, |m| self.deliver_locally(m));
        Ok(())
    }

    fn on_node_message(&self, payload: &[u8]) -> Result<(), EnvelopeError> {
        match NodeMessage::decode(payload)? {
            NodeMessage::Deliver { session, envelope } => {
                let Some((_, id)) = parse_session_id(&session) else {
                    return Err(EnvelopeError::MissingSession);
                };
                self.observe_hop(&envelope);
                let frame = received(&envelope, Target::Session(&session), None, |m| {
                    self.encode(m)
                });
                self.hub.to_session(id, &frame);
            }
            NodeMessage::Probe { .. } => {} // answered by the broker itself
        }
        Ok(())
    }

    fn on_control(&self, payload: &[u8]) -> Result<(), EnvelopeError> {
        match ControlMessage::decode(payload)? {
            ControlMessage::Disconnect { user, origin } => {
                if origin != *self.instance {
                    let n = self.hub.close_user(&user, close::DISCONNECTED);
                    debug!(%user, sessions = n, "disconnect from another node");
                }
            }
            ControlMessage::Heartbeat(stats) => {
                if stats.node != *self.instance {
                    lock(&self.peers).insert(stats.node.clone(), (Instant::now(), stats));
                }
            }
        }
        Ok(())
    }

    fn me(&self) -> Option<Arc<Node>> {
        self.me.upgrade()
    }

    /// This node's figures.
    pub fn stats(&self) -> NodeStats {
        let c = self.hub.counts();
        NodeStats {
            node: self.instance.to_string(),
            connections: c.connections as u64,
            users: c.users as u64,
            channels: c.channels as u64,
            draining: self.is_draining(),
            uptime_secs: self.uptime().as_secs(),
            broker: self.broker.kind().into(),
            broker_ready: self.broker.is_ready(),
            url: self.config.advertise_url.as_ref().map(|u| u.to_string()),
            deliveries: self.metrics.deliveries.get(),
            ts: unix_millis(),
            top_channels: self.top_channels(),
        }
    }

    /// This node and every other node heard from within three heartbeat intervals.
    pub fn cluster(&self) -> Vec<NodeStats> {
        let horizon = self.peer_horizon();
        let mut nodes: Vec<NodeStats> = (lock(&self.peers).values())
            .filter(|(seen, _)| seen.elapsed() < horizon)
            .map(|(_, s)| s.clone())
            .collect();
        nodes.push(self.stats());
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }

    /// How long a node unheard of still counts as one: three heartbeat intervals.
    fn peer_horizon(&self) -> Duration {
        self.config.heartbeat_interval * 3
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        let mut sweep_cursor = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.broker.is_ready() {
                continue;
            }
            // Nodes gone for good; while the broker is down, the last ones heard are kept (see
            // `watch_isolation`).
            let horizon = self.peer_horizon();
            lock(&self.peers).retain(|_, (seen, _)| seen.elapsed() < horizon);
            let beat = ControlMessage::Heartbeat(self.stats()).encode();
            if let Err(e) = self.broker.publish(self.topics.control(), &beat).await {
                debug!(error = %e, "heartbeat not sent");
            }
            if let Err(e) = self.presence_touch().await {
                debug!(error = %e, "presence entries not refreshed");
            }
            if let Err(e) = self.presence_sweep(&mut sweep_cursor).await {
                debug!(error = %e, "expired presence entries not swept");
            }
        }
    }

    /// Graceful drain: refuse new connections and close open ones with 1001 in batches spread
    /// over the drain period, so that clients do not all reconnect elsewhere at the same instant.
    pub async fn drain(&self) {
        self.draining.cancel();
        let period = self.config.drain_period;
        let sessions = self.hub.sessions();
        info!(
            connections = sessions.len(),
            ?period,
            "draining: closing connections"
        );
        // Closes are spread over 80% of the period; the rest lets close handshakes finish.
        const STEP: Duration = Duration::from_millis(100);
        let steps = ((period.mul_f64(0.8)).as_millis() / STEP.as_millis()).max(1) as usize;
        let batch = sessions.len().div_ceil(steps).max(1);
        let deadline = tokio::time::Instant::now() + period;
        let mut tick = tokio::time::interval(STEP);
        for chunk in sessions.chunks(batch) {
            tick.tick().await;
            for s in chunk {
                s.close(close::GOING_AWAY);
            }
        }
        while self.hub.counts().connections > 0 && tokio::time::Instant::now() < deadline {
            // A handshake that passed the draining check just before it was set registers its
            // session after the snapshot above: close those too (closing twice is a no-op).
            for s in self.hub.sessions() {
                s.close(close::GOING_AWAY);
            }
            tick.tick().await;
        }
        let left = self.hub.counts().connections;
        if left > 0 {
            warn!(
                connections = left,
                "drain period over with connections still open"
            );
        }
        // The closed connections' presence entries leave Redis (and their leaves go out) now
        // rather than when they expire.
        self.presence_settle().await;
    }
}

impl Inbound for Node {
    fn on_message(&self, topic: &str, payload: &[u8]) {
        let result = match self.topics.parse(topic) {
            Some(Topic::Channel(c)) => {
                self.metrics.messages_in.redis.inc();
                self.on_channel(c, payload)
            }
            Some(Topic::User(u)) => {
                self.metrics.messages_in.redis.inc();
                self.on_envelope(Target::User(u), payload)
            }
            Some(Topic::Broadcast) => {
                self.metrics.messages_in.redis.inc();
                self.on_envelope(Target::Broadcast, payload)
            }
            Some(Topic::Node(_)) => self.on_node_message(payload),
            Some(Topic::Control) => self.on_control(payload),
            None => Ok(()),
        };
        if let Err(e) = result {
            self.metrics.redis_invalid.inc();
            warn!(topic, error = %e, "dropping invalid message from redis");
        }
    }

    fn on_ready(&self, reconnect: bool) {
        if !reconnect {
            return;
        }
        let Some(node) = self.me() else {
            return;
        };
        tokio::spawn(node.clone().catch_up());
        tokio::spawn(async move {
            if let Err(e) = node.presence_readd().await {
                warn!(error = %e, "presence entries not restored after reconnecting");
            }
        });
    }
}

/// Builds the delivery of an envelope received from Redis and hands it to `f`. A message without
/// an `id` gets one: `{epoch}:{offset}` on a history channel (the same on every node and every
/// read), a new UUID v7 otherwise; a missing `ts` is now.
fn received<R>(
    e: &Envelope<'_>,
    target: Target<'_>,
    stamp: Option<&Stamp<'_>>,
    f: impl FnOnce(&MessageRef<'_>) -> R,
) -> R {
    let generated;
    let id = match (&e.id, stamp) {
        (Some(id), _) => id.as_ref(),
        (None, Some(s)) => {
            generated = format!("{}:{}", s.epoch, s.offset);
            &generated
        }
        (None, None) => {
            generated = Uuid::now_v7().to_string();
            &generated
        }
    };
    f(&MessageRef {
        id,
        ts: e.ts.unwrap_or_else(unix_millis),
        from: e.from.as_deref(),
        target,
        data: e.data,
    })
}

/// Splits a public session ID into its node and local ID.
pub fn parse_session_id(s: &str) -> Option<(&str, Uuid)> {
    let (node, id) = s.rsplit_once('.')?;
    Some((node, Uuid::try_parse(id).ok()?))
}

/// The node's `/api/stats` document.
#[derive(Serialize)]
pub struct StatsDoc {
    pub node: NodeStats,
    pub broker: &'static str,
    pub broker_ready: bool,
    pub uptime_secs: u64,
    pub cluster: ClusterDoc,
}

#[derive(Serialize)]
pub struct ClusterDoc {
    pub nodes: Vec<NodeStats>,
    pub connections: u64,
}

impl Node {
    pub fn stats_doc(&self) -> StatsDoc {
        let nodes = self.cluster();
        StatsDoc {
            node: self.stats(),
            broker: self.broker.kind(),
            broker_ready: self.broker.is_ready(),
            uptime_secs: self.uptime().as_secs(),
            cluster: ClusterDoc {
                connections: nodes.iter().map(|n| n.connections).sum(),
                nodes,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_route_to_their_node() {
        let id = Uuid::new_v4();
        let s = format!("node-1.{}", id.simple());
        assert_eq!(parse_session_id(&s), Some(("node-1", id)));
        assert_eq!(parse_session_id("node-1"), None);
        assert_eq!(parse_session_id("node-1.not-a-uuid"), None);
    }
}
