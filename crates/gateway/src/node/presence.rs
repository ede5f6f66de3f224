//! A node's presence channels: its sessions' entries, kept alive by the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use pushgate_protocol::PresenceEntry;
use tracing::warn;

use super::{Node, lock, unix_millis};
use crate::broker::{Broker, BrokerError};

impl Node {
    /// How long a presence entry lives without a refresh: three heartbeat intervals.
    pub fn presence_ttl(&self) -> Duration {
        self.config.heartbeat_interval * 3
    }

    fn presence_ttl_ms(&self) -> u64 {
        (self.presence_ttl().as_millis() as u64).max(1)
    }

    /// Adds a local session to the entries of a presence channel.
    pub async fn presence_join(&self, channel: &Arc<str>, session: &str, user: &str) {
        let entry = PresenceEntry {
            user: user.to_owned(),
            session: session.to_owned(),
            node: self.instance.to_string(),
            joined_at: unix_millis(),
        };
        let json = serde_json::to_string(&entry).unwrap_or_default();
        lock(&self.presence)
            .entry(channel.clone())
            .or_default()
            .insert(session.to_owned(), entry);
        if let Broker::Redis(redis) = &self.broker {
            let group = (
                self.topics.presence(channel),
                self.topics.presence_exp(channel),
                vec![(session.to_owned(), json)],
            );
            if let Err(e) = redis.presence_add(&[group], self.presence_ttl_ms()).await {
                warn!(%channel, error = %e, "presence entry not added");
            }
        }
    }

    /// Removes a local session from the entries of these channels (those that track presence).
    pub fn presence_leave(&self, session: &str, channels: &[Arc<str>]) {
        let mut removed = Vec::new();
        {
            let mut presence = lock(&self.presence);
            for channel in channels {
                if let Some(entries) = presence.get_mut(channel) {
                    if entries.remove(session).is_some() {
                        removed.push(channel.clone());
                    }
                    if entries.is_empty() {
                        presence.remove(channel);
                    }
                }
            }
        }
        if removed.is_empty() {
            return;
        }
        if let (Broker::Redis(redis), Some(node)) = (&self.broker, self.me()) {
            let redis = redis.clone();
            let groups: Vec<_> = removed
                .iter()
                .map(|c| {
                    (
                        node.topics.presence(c),
                        node.topics.presence_exp(c),
                        vec![session.to_owned()],
                    )
                })
                .collect();
            tokio::spawn(async move {
                if let Err(e) = redis.presence_remove(&groups).await {
                    warn!(error = %e, "presence entries not removed; they expire");
                }
            });
        }
    }

    /// Who is subscribed to a presence channel, across the cluster, by join time.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        let mut entries: Vec<PresenceEntry> = match &self.broker {
            Broker::Embedded => lock(&self.presence)
                .get(channel)
                .map(|e| e.values().cloned().collect())
                .unwrap_or_default(),
            Broker::Redis(redis) => redis
                .presence_list(
                    &self.topics.presence(channel),
                    &self.topics.presence_exp(channel),
                )
                .await?
                .iter()
                .filter_map(|json| serde_json::from_slice(json).ok())
                .collect(),
        };
        entries.sort_by(|a, b| (a.joined_at, &a.session).cmp(&(b.joined_at, &b.session)));
        Ok(entries)
    }

    /// This node's presence entries as `(hash, zset, items)` groups of at most 500 items.
    fn presence_groups<T: Clone>(
        &self,
        item: impl Fn(&String, &PresenceEntry) -> T,
    ) -> Vec<(String, String, Vec<T>)> {
        const CHUNK: usize = 500;
        let presence = lock(&self.presence);
        let mut groups = Vec::new();
        for (channel, entries) in presence.iter() {
            let items: Vec<T> = entries.iter().map(|(s, e)| item(s, e)).collect();
            for chunk in items.chunks(CHUNK) {
                groups.push((
                    self.topics.presence(channel),
                    self.topics.presence_exp(channel),
                    chunk.to_vec(),
                ));
            }
        }
        groups
    }

    /// Writes every local presence entry again (after Redis may have lost them).
    pub(super) async fn presence_readd(&self) -> Result<(), BrokerError> {
        let Broker::Redis(redis) = &self.broker else {
            return Ok(());
        };
        let groups = self.presence_groups(|session, entry| {
            (
                session.clone(),
                serde_json::to_string(entry).unwrap_or_default(),
            )
        });
        if groups.is_empty() {
            return Ok(());
        }
        redis.presence_add(&groups, self.presence_ttl_ms()).await
    }

    /// Extends this node's presence entries (every heartbeat).
    pub(super) async fn presence_touch(&self) -> Result<(), BrokerError> {
        let Broker::Redis(redis) = &self.broker else {
            return Ok(());
        };
        let groups = self.presence_groups(|session, _| session.clone());
        if groups.is_empty() {
            return Ok(());
        }
        redis.presence_touch(&groups, self.presence_ttl_ms()).await
    }
}
