//! A node's presence channels: its sessions' entries, kept alive by the heartbeat, and the
//! `join` and `leave` events of presence-events channels.
//!
//! Events are per user: a join when a user's first connection subscribes anywhere in the
//! cluster, a leave when their last one is gone. With Redis the count of each user's sessions
//! lives next to the entries and the `pushgate` functions that change them publish the events
//! on the channel's topic, in the same atomic step, so that every node delivers each event to its
//! own subscribers once ([`Node::on_presence_change`]). Entries of a node that died stop being
//! refreshed and expire; every node sweeps the expired entries of its event channels at each
//! heartbeat, and the one whose sweep removes an entry publishes its leave. With the embedded
//! broker the node counts and delivers itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pushgate_protocol::envelope::PresenceChange;
use pushgate_protocol::server::encode_presence_event;
use pushgate_protocol::{PresenceEntry, PresenceKind};
use tracing::{debug, warn};

use super::{Node, lock, unix_millis};
use crate::broker::{Broker, BrokerError, PresenceItem, PresenceKeys, RedisBroker, lane_key};
use crate::hub::Frame;

/// Most event channels one node sweeps per heartbeat; more are swept in turn.
const SWEEP_CHANNELS: usize = 1000;
/// Most expired entries one sweep removes from one channel; the next sweep takes the rest.
const SWEEP_LIMIT: u64 = 200;
/// Most items in one Redis call, and calls in one pipeline.
const CHUNK: usize = 500;

/// This node's sessions on one presence channel, and how many of them each user has.
#[derive(Debug, Default)]
pub(super) struct Local {
    entries: HashMap<String, PresenceEntry>,
    users: HashMap<String, usize>,
}

impl Local {
    /// Adds an entry; true when it is its user's first here.
    fn insert(&mut self, session: &str, entry: PresenceEntry) -> bool {
        let user = entry.user.clone();
        if self.entries.insert(session.to_owned(), entry).is_some() {
            return false;
        }
        let n = self.users.entry(user).or_default();
        *n += 1;
        *n == 1
    }

    /// Removes an entry; returns its user, and whether it was their last here.
    fn remove(&mut self, session: &str) -> Option<(String, bool)> {
        let entry = self.entries.remove(session)?;
        let last = match self.users.get_mut(&entry.user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.users.remove(&entry.user);
                true
            }
        };
        Some((entry.user, last))
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Node {
    /// How long a presence entry lives without a refresh: three heartbeat intervals.
    pub fn presence_ttl(&self) -> Duration {
        self.config.heartbeat_interval * 3
    }

    fn presence_ttl_ms(&self) -> u64 {
        (self.presence_ttl().as_millis() as u64).max(1)
    }

    /// The Redis keys of a presence channel, and its topic when it sends events.
    fn presence_keys(&self, channel: &str) -> PresenceKeys {
        PresenceKeys {
            hash: self.topics.presence(channel),
            zset: self.topics.presence_exp(channel),
            users: self.topics.presence_users(channel),
            topic: if self.policy.presence_events(channel) {
                self.topics.channel(channel)
            } else {
                String::new()
            },
        }
    }

    /// With the embedded broker: delivers a join or leave to this node's subscribers.
    fn deliver_presence(&self, kind: PresenceKind, channel: &str, user: &str, session: &str) {
        self.hub.to_channel(channel, || {
            Frame::from(encode_presence_event(kind, channel, user, session))
        });
    }

    /// A join or leave from Redis, on the topic of `channel`: delivered to this node's
    /// subscribers (the publishing function sent it to every node once).
    pub(super) fn on_presence_change(&self, channel: &str, change: &PresenceChange<'_>) {
        self.deliver_presence(change.kind, channel, &change.user, &change.session);
    }

    /// Adds a local session to the entries of a presence channel; on a presence-events channel
    /// the user's first connection in the cluster makes a join.
    pub async fn presence_join(&self, channel: &Arc<str>, session: &str, user: &str) {
        let entry = PresenceEntry {
            user: user.to_owned(),
            session: session.to_owned(),
            node: self.instance.to_string(),
            joined_at: unix_millis(),
        };
        let json = serde_json::to_string(&entry).unwrap_or_default();
        let redis = match &self.broker {
            Broker::Redis(redis) => Some(redis),
            Broker::Embedded => None,
        };
        let lane = lane_key(session);
        let queued = {
            let mut presence = lock(&self.presence);
            let first = presence
                .entry(channel.clone())
                .or_default()
                .insert(session, entry);
            match redis {
                // Queued under the lock, on the session's lane: after any leave of the same
                // session queued before, so that a quick unsubscribe and subscribe again end
                // subscribed in Redis too.
                Some(redis) => {
                    let keys = self.presence_keys(channel);
                    let items = [(session.to_owned(), user.to_owned(), json)];
                    Some(redis.try_queue(
                        lane,
                        RedisBroker::presence_join_cmd(&keys, self.presence_ttl_ms(), &items),
                    ))
                }
                None => {
                    if first && self.policy.presence_events(channel) {
                        // Under the lock, so that subscribers see joins and leaves in order.
                        self.deliver_presence(PresenceKind::Join, channel, user, session);
                    }
                    None
                }
            }
        };
        let reply = match (queued, redis) {
            (Some(Ok(reply)), _) => reply,
            (Some(Err(cmd)), Some(redis)) => redis.queue(lane, cmd).await,
            _ => return,
        };
        if let Err(e) = reply.await {
            warn!(%channel, error = %e, "presence entry not added");
        }
    }

    /// Removes a local session from the entries of these channels (those that track presence);
    /// on presence-events channels a user's last connection in the cluster makes a leave.
    pub fn presence_leave(&self, session: &str, channels: &[Arc<str>]) {
        let redis = match &self.broker {
            Broker::Redis(redis) => Some(redis),
            Broker::Embedded => None,
        };
        let lane = lane_key(session);
        let mut replies = Vec::new();
        let mut waiting = Vec::new();
        {
            let mut presence = lock(&self.presence);
            for channel in channels {
                let Some(local) = presence.get_mut(channel) else {
                    continue;
                };
                let removed = local.remove(session);
                if local.is_empty() {
                    presence.remove(channel);
                }
                let Some((user, last)) = removed else {
                    continue;
                };
                match redis {
                    Some(redis) => {
                        let cmd = RedisBroker::presence_leave_cmd(
                            &self.presence_keys(channel),
                            &[session],
                        );
                        // On the session's lane, in order after its join (see presence_join).
                        match redis.try_queue(lane, cmd) {
                            Ok(reply) => replies.push(reply),
                            Err(cmd) => waiting.push(cmd),
                        }
                    }
                    None if last && self.policy.presence_events(channel) => {
                        self.deliver_presence(PresenceKind::Leave, channel, &user, session);
                    }
                    None => {}
                }
            }
        }
        if let Some(redis) = redis
            && !(replies.is_empty() && waiting.is_empty())
        {
            let redis = redis.clone();
            self.presence_tasks.spawn(async move {
                for cmd in waiting {
                    replies.push(redis.queue(lane, cmd).await);
                }
                for reply in replies {
                    if let Err(e) = reply.await {
                        warn!(error = %e, "presence entry not removed; it expires");
                    }
                }
            });
        }
    }

    /// At the end of a drain: removes every entry this node still has (connections still
    /// closing), and waits (up to the Redis timeout) until the removals have reached Redis, so
    /// that their leaves go out now rather than when the entries would expire.
    pub(super) async fn presence_settle(&self) {
        if let Broker::Redis(redis) = &self.broker {
            let left: Vec<(PresenceKeys, Vec<String>)> = {
                let mut presence = lock(&self.presence);
                (presence.drain())
                    .map(|(c, l)| (self.presence_keys(&c), l.entries.into_keys().collect()))
                    .collect()
            };
            if !left.is_empty() {
                let redis = redis.clone();
                self.presence_tasks.spawn(async move {
                    let mut replies = Vec::new();
                    for (keys, sessions) in &left {
                        for chunk in sessions.chunks(CHUNK) {
                            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
                            let cmd = RedisBroker::presence_leave_cmd(keys, &chunk);
                            replies.push(redis.queue(lane_key(&keys.hash), cmd).await);
                        }
                    }
                    for reply in replies {
                        if let Err(e) = reply.await {
                            warn!(error = %e, "presence entries not removed; they expire");
                        }
                    }
                });
            }
        }
        self.presence_tasks.close();
        let waited = self.config.redis_timeout;
        if tokio::time::timeout(waited, self.presence_tasks.wait())
            .await
            .is_err()
        {
            warn!(?waited, "presence entries not all removed; they expire");
        }
    }

    /// Who is subscribed to a presence channel, across the cluster, by join time.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        let mut entries: Vec<PresenceEntry> = match &self.broker {
            Broker::Embedded => lock(&self.presence)
                .get(channel)
                .map(|l| l.entries.values().cloned().collect())
                .unwrap_or_default(),
            Broker::Redis(redis) => redis
                .presence_members(&self.presence_keys(channel))
                .await?
                .iter()
                .filter_map(|json| serde_json::from_slice(json).ok())
                .collect(),
        };
        entries.sort_by(|a, b| (a.joined_at, &a.session).cmp(&(b.joined_at, &b.session)));
        Ok(entries)
    }

    /// This node's presence entries as `(keys, items)` groups of at most [`CHUNK`] items.
    fn presence_groups<T>(
        &self,
        item: impl Fn(&String, &PresenceEntry) -> T,
    ) -> Vec<(PresenceKeys, Vec<T>)> {
        let presence = lock(&self.presence);
        let mut groups = Vec::new();
        for (channel, local) in presence.iter() {
            let mut items: Vec<T> = local.entries.iter().map(|(s, e)| item(s, e)).collect();
            while !items.is_empty() {
                let rest = items.split_off(items.len().min(CHUNK));
                groups.push((self.presence_keys(channel), items));
                items = rest;
            }
        }
        groups
    }

    /// Writes every local presence entry again (after Redis may have lost them). An entry that
    /// was gone (and its user with it) makes a join again.
    pub(super) async fn presence_readd(&self) -> Result<(), BrokerError> {
        let Broker::Redis(redis) = &self.broker else {
            return Ok(());
        };
        let groups = self.presence_groups(|session, entry| {
            let json = serde_json::to_string(entry).unwrap_or_default();
            (session.clone(), entry.user.clone(), json)
        });
        for chunk in groups.chunks(CHUNK) {
            redis
                .presence_join_groups(chunk, self.presence_ttl_ms())
                .await?;
        }
        Ok(())
    }

    /// Extends this node's presence entries (every heartbeat). Entries Redis no longer has
    /// (expired while this node was slow to refresh them, and swept: their leaves went out) are
    /// added again, with their joins.
    pub(super) async fn presence_touch(&self) -> Result<(), BrokerError> {
        let Broker::Redis(redis) = &self.broker else {
            return Ok(());
        };
        let groups = self.presence_groups(|session, _| session.clone());
        let ttl = self.presence_ttl_ms();
        let mut readd = Vec::new();
        for chunk in groups.chunks(CHUNK) {
            let missing = redis.presence_refresh(chunk, ttl).await?;
            for ((keys, _), sessions) in chunk.iter().zip(missing) {
                if !sessions.is_empty() {
                    readd.push((keys.clone(), sessions));
                }
            }
        }
        if readd.is_empty() {
            return Ok(());
        }
        // Only those still here: one that left meanwhile stays removed.
        let again: Vec<(PresenceKeys, Vec<PresenceItem>)> = {
            let presence = lock(&self.presence);
            let by_hash: HashMap<String, &Local> = presence
                .iter()
                .map(|(c, l)| (self.topics.presence(c), l))
                .collect();
            readd
                .into_iter()
                .filter_map(|(keys, sessions)| {
                    let local = by_hash.get(&keys.hash)?;
                    let items: Vec<_> = (sessions.into_iter())
                        .filter_map(|s| {
                            let entry = local.entries.get(&s)?;
                            let json = serde_json::to_string(entry).unwrap_or_default();
                            Some((s, entry.user.clone(), json))
                        })
                        .collect();
                    (!items.is_empty()).then_some((keys, items))
                })
                .collect()
        };
        debug!(
            channels = again.len(),
            "presence entries gone from redis; adding them again"
        );
        for chunk in again.chunks(CHUNK) {
            redis.presence_join_groups(chunk, ttl).await?;
        }
        Ok(())
    }

    /// Removes the expired entries of presence-events channels this node has subscribers on,
    /// with their leaves: up to [`SWEEP_CHANNELS`] channels per call, going round them from
    /// `cursor`. Entries expire when their node stops refreshing them (it died, or lost Redis).
    pub(super) async fn presence_sweep(&self, cursor: &mut usize) -> Result<(), BrokerError> {
        let Broker::Redis(redis) = &self.broker else {
            return Ok(());
        };
        let channels: Vec<PresenceKeys> = {
            let presence = lock(&self.presence);
            let mut names: Vec<&Arc<str>> = presence
                .keys()
                .filter(|c| self.policy.presence_events(c))
                .collect();
            if names.is_empty() {
                return Ok(());
            }
            names.sort_unstable();
            let start = *cursor % names.len();
            let take = names.len().min(SWEEP_CHANNELS);
            *cursor = start + take;
            (names.iter().cycle().skip(start).take(take))
                .map(|c| self.presence_keys(c))
                .collect()
        };
        let mut removed = 0;
        for chunk in channels.chunks(CHUNK) {
            removed += redis.presence_expire(chunk, SWEEP_LIMIT).await?;
        }
        if removed > 0 {
            debug!(removed, "expired presence entries swept");
        }
        Ok(())
    }
}
