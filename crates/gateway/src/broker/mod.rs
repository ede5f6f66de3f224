//! How nodes reach each other: the embedded broker (one node, nothing to reach) or Redis Pub/Sub.
//!
//! Either way, a node delivers to its own clients itself, at once; the broker only carries
//! messages to the other nodes. So the embedded broker has nothing to carry, and is always ready.
//! (History channels are the exception with Redis: there every node, the publishing one
//! included, delivers what comes back from Redis, so that subscribers see offset order.)

mod endpoint;
mod publisher;
mod redis;

use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use thiserror::Error;

pub use self::endpoint::Endpoint;
pub use self::publisher::Reply;
pub use self::redis::{
    HistoryEntries, PresenceItem, PresenceKeys, RedisBroker, RedisSettings, parse_position,
};

/// Receives what other nodes and backends publish.
pub trait Inbound: Send + Sync + 'static {
    /// One message from Redis. Must not wait on anything: it runs on the Redis read loop.
    fn on_message(&self, topic: &str, payload: &[u8]);

    /// The subscriber connection is up and every held topic subscribed. `reconnect`: an
    /// earlier connection was lost, so messages may have been missed in between. Must not
    /// wait on anything.
    fn on_ready(&self, reconnect: bool) {
        let _ = reconnect;
    }
}

#[derive(Debug, Clone, Error)]
pub enum BrokerError {
    #[error("broker unavailable")]
    Unavailable,
    #[error("broker timed out")]
    Timeout,
    #[error("redis: {0}")]
    Redis(String),
    /// Stored and published, but `WAIT` saw fewer replicas take it than required.
    #[error("stored and published, but confirmed by {got} of {wanted} replicas")]
    NotReplicated { got: u32, wanted: u32 },
}

/// Names of the Redis channels and keys of one cluster, under its prefix.
///
/// On Redis Cluster (`sharded`) the keys of a channel carry its topic as a hash tag
/// (`{pushgate:ch:chat:1}:history`), so that they live in the slot of the topic itself and one
/// function call can store a message and `SPUBLISH` it on one shard.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    sharded: bool,
    channel: String,
    user: String,
    node: String,
    broadcast: String,
    control: String,
}

/// A Redis channel name, read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    Channel(&'a str),
    User(&'a str),
    Node(&'a str),
    Broadcast,
    Control,
}

impl Topics {
    pub fn new(prefix: &str, sharded: bool) -> Self {
        Self {
            prefix: prefix.to_owned(),
            sharded,
            channel: format!("{prefix}:ch:"),
            user: format!("{prefix}:user:"),
            node: format!("{prefix}:node:"),
            broadcast: format!("{prefix}:broadcast"),
            control: format!("{prefix}:control"),
        }
    }

    /// Whether the topics are Redis Cluster shard channels (`SPUBLISH`, `SSUBSCRIBE`).
    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// The key `what` of `channel`: `{prefix}:{what}:{channel}`, or on Redis Cluster
    /// `{{prefix}:ch:{channel}}:{what}`.
    fn key(&self, what: &str, channel: &str) -> String {
        if self.sharded {
            format!("{{{}{channel}}}:{what}", self.channel)
        } else {
            format!("{}:{what}:{channel}", self.prefix)
        }
    }

    /// The Stream key holding a history channel's messages.
    pub fn history(&self, channel: &str) -> String {
        self.key("history", channel)
    }

    /// The hash key holding a history channel's epoch and last offset.
    pub fn meta(&self, channel: &str) -> String {
        self.key("meta", channel)
    }

    /// The hash key of a presence channel's entries (session -> JSON).
    pub fn presence(&self, channel: &str) -> String {
        self.key("presence", channel)
    }

    /// The sorted-set key of a presence channel's expiries (session -> Unix ms).
    pub fn presence_exp(&self, channel: &str) -> String {
        self.key("presence-exp", channel)
    }

    /// The hash key of a presence channel's users (user -> how many of their sessions have an
    /// entry).
    pub fn presence_users(&self, channel: &str) -> String {
        self.key("presence-users", channel)
    }

    pub fn channel(&self, name: &str) -> String {
        format!("{}{name}", self.channel)
    }

    pub fn user(&self, name: &str) -> String {
        format!("{}{name}", self.user)
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}{id}", self.node)
    }

    pub fn broadcast(&self) -> &str {
        &self.broadcast
    }

    pub fn control(&self) -> &str {
        &self.control
    }

    pub fn parse<'a>(&self, topic: &'a str) -> Option<Topic<'a>> {
        if let Some(name) = topic.strip_prefix(&self.channel) {
            Some(Topic::Channel(name))
        } else if let Some(name) = topic.strip_prefix(&self.user) {
            Some(Topic::User(name))
        } else if let Some(id) = topic.strip_prefix(&self.node) {
            Some(Topic::Node(id))
        } else if topic == self.broadcast {
            Some(Topic::Broadcast)
        } else if topic == self.control {
            Some(Topic::Control)
        } else {
            None
        }
    }
}

/// The node's broker.
pub enum Broker {
    Embedded,
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// `embedded` or `redis`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Redis(_) => "redis",
        }
    }

    /// Whether messages published now reach the other nodes.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Embedded => true,
            Self::Redis(r) => r.is_ready(),
        }
    }

    /// Whether the broker has been ready at least once since the node started.
    pub fn has_started(&self) -> bool {
        match self {
            Self::Embedded => true,
            Self::Redis(r) => r.has_started(),
        }
    }

    /// Holds a subscription to `topic` and returns once it is active. Fails at once while the
    /// broker is down, and after the broker timeout; then nothing is held.
    pub async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        match self {
            Self::Embedded => Ok(()),
            Self::Redis(r) => r.subscribe(topic).await,
        }
    }

    /// Holds a subscription to `topic` whatever the broker's state; waits for it only while
    /// the broker is up. Used for a connection's user topic, which must not refuse connections
    /// during a Redis outage: it becomes active when Redis returns.
    pub async fn hold(&self, topic: &str) {
        if let Self::Redis(r) = self {
            r.hold(topic).await;
        }
    }

    /// Drops one hold on `topic`; the last one unsubscribes.
    pub fn release(&self, topic: &str) {
        if let Self::Redis(r) = self {
            r.release(topic);
        }
    }

    /// Hands `payload` to the other nodes: queued at once, in order after what was handed over
    /// before with the same `lane` key; the returned [`Sent`] resolves when the broker has it.
    pub async fn send(&self, lane: u64, topic: &str, payload: &[u8]) -> Sent {
        match self {
            Self::Embedded => Sent::Done,
            Self::Redis(r) => Sent::Redis(r.publish(lane, topic, payload).await),
        }
    }

    /// Sends `payload` to the other nodes and waits until the broker has it.
    pub async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), BrokerError> {
        self.send(lane_key(topic), topic, payload).await.await
    }
}

/// A lane key for callers without an order of their own to keep: spreads them by `what`.
pub fn lane_key(what: impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    what.hash(&mut hasher);
    hasher.finish()
}

/// A message handed to the broker; resolves when the broker has it.
pub enum Sent {
    Done,
    Redis(Reply),
}

impl Future for Sent {
    type Output = Result<(), BrokerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Done => Poll::Ready(Ok(())),
            Self::Redis(reply) => Pin::new(reply).poll(cx).map(|r| r.map(drop)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("pg", false);
        assert_eq!(t.channel("room:1"), "pg:ch:room:1");
        assert_eq!(t.parse("pg:ch:room:1"), Some(Topic::Channel("room:1")));
        assert_eq!(t.parse(&t.user("alice")), Some(Topic::User("alice")));
        assert_eq!(t.parse(&t.node("n1")), Some(Topic::Node("n1")));
        assert_eq!(t.parse("pg:broadcast"), Some(Topic::Broadcast));
        assert_eq!(t.parse("pg:control"), Some(Topic::Control));
        assert_eq!(t.parse("other:ch:x"), None);
        assert_eq!(t.parse("pg:broadcastx"), None);
        assert_eq!(t.history("chat:1"), "pg:history:chat:1");
        assert_eq!(t.meta("chat:1"), "pg:meta:chat:1");
        assert_eq!(t.presence("room:1"), "pg:presence:room:1");
        assert_eq!(t.presence_exp("room:1"), "pg:presence-exp:room:1");
        assert_eq!(t.presence_users("room:1"), "pg:presence-users:room:1");
    }

    #[test]
    fn sharded_keys_share_their_topics_slot() {
        let t = Topics::new("pg", true);
        assert_eq!(t.channel("chat:1"), "pg:ch:chat:1");
        assert_eq!(t.history("chat:1"), "{pg:ch:chat:1}:history");
        assert_eq!(t.meta("chat:1"), "{pg:ch:chat:1}:meta");
        assert_eq!(t.presence("chat:1"), "{pg:ch:chat:1}:presence");
        assert_eq!(t.presence_exp("chat:1"), "{pg:ch:chat:1}:presence-exp");
        assert_eq!(t.presence_users("chat:1"), "{pg:ch:chat:1}:presence-users");
    }
}
