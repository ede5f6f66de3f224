//! A node's history channels: publishing through history, reading it back, and catching up
//! after the Redis subscription was interrupted.

use std::sync::Arc;

use pushgate_protocol::envelope::EnvelopeError;
use pushgate_protocol::server::{MessageRef, encode_message_at};
use pushgate_protocol::{Envelope, Target};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{Node, Outgoing, Submitted, Wait, received, unix_millis};
use crate::broker::{Broker, BrokerError};
use crate::history::{HistoryRead, HistoryRule};
use crate::hub::Frame;

impl Node {
    pub(super) async fn submit_history(
        &self,
        channel: &str,
        rule: &HistoryRule,
        out: Outgoing<'_>,
        lane: u64,
    ) -> Submitted {
        let (id, ts) = (Uuid::now_v7().to_string(), unix_millis());
        let m = out.message(&id, ts);
        match &self.broker {
            Broker::Embedded => {
                let (offset, epoch, _) = self.memory.publish(
                    channel,
                    rule,
                    |offset, epoch| self.encode_at(&m, offset, epoch),
                    |frame, offset, epoch| self.hub.to_channel_at(channel, frame, epoch, offset),
                );
                Submitted::done(id, Ok(Some((offset, epoch))))
            }
            Broker::Redis(redis) => {
                let envelope = out.envelope(&id, ts, &self.instance);
                let reply = redis
                    .publish_history(
                        lane,
                        &self.topics.history(channel),
                        &self.topics.meta(channel),
                        &self.topics.channel(channel),
                        &envelope.encode(),
                        rule.size,
                        rule.ttl_ms(),
                    )
                    .await;
                Submitted {
                    id,
                    wait: Wait::History(reply),
                }
            }
        }
    }

    pub(super) fn encode_at(&self, m: &MessageRef<'_>, offset: u64, epoch: &str) -> Frame {
        self.metrics.encodes.inc();
        Frame::message(encode_message_at(m, offset, epoch), m.ts)
    }

    /// The message frame of a history entry as the publish function stored it. A backend's
    /// message without an `id` gets `{epoch}:{offset}`, the same on every node and every read.
    fn history_frame(&self, channel: &str, payload: &[u8]) -> Result<(u64, Frame), EnvelopeError> {
        let (e, stamp) = Envelope::decode_stamped(payload)?;
        let stamp = stamp.ok_or(EnvelopeError::BadStamp)?;
        let frame = received(&e, Target::Channel(channel), Some(&stamp), |m| {
            self.encode_at(m, stamp.offset, &stamp.epoch)
        });
        Ok((stamp.offset, frame))
    }

    /// Reads a history channel: its epoch and last offset, and up to `limit` messages after
    /// offset `after`, as message frames. A channel without history gets an epoch here.
    pub async fn read_history(
        &self,
        channel: &str,
        rule: &HistoryRule,
        after: u64,
        limit: u64,
    ) -> Result<HistoryRead, BrokerError> {
        match &self.broker {
            Broker::Embedded => Ok(self.memory.read(channel, after, limit, rule.ttl)),
            Broker::Redis(redis) => {
                let (epoch, top, raw) = redis
                    .read_history(
                        &self.topics.history(channel),
                        &self.topics.meta(channel),
                        after,
                        limit,
                        rule.ttl_ms(),
                    )
                    .await?;
                let mut entries = Vec::with_capacity(raw.len());
                for (offset, payload) in raw {
                    match self.history_frame(channel, &payload) {
                        Ok((_, frame)) => entries.push((offset, frame)),
                        Err(e) => {
                            // Left out: the gap shows, and whoever needed it recovers.
                            warn!(channel, offset, error = %e, "invalid message in history");
                        }
                    }
                }
                Ok(HistoryRead {
                    epoch: epoch.into(),
                    top,
                    entries,
                })
            }
        }
    }

    /// The last `count` messages of a history channel, oldest first, and the channel's epoch
    /// and the offset they run up to (`top`): the channel's last offset as of the read, or,
    /// when messages keep coming faster than it reads, the last one it got. A channel without
    /// history gets an epoch here, as with [`read_history`](Self::read_history).
    ///
    /// Each read is one consistent view (an atomic function call in Redis); a read is used
    /// when it holds everything from `top - count` to its top. It starts from the position this
    /// node last saw on the channel when it follows it (one read), otherwise it learns the top
    /// first (two reads).
    pub async fn read_recent(
        &self,
        channel: &str,
        rule: &HistoryRule,
        count: u64,
    ) -> Result<HistoryRead, BrokerError> {
        /// Room for messages published between learning the top and reading up to it.
        const SLACK: u64 = 32;
        /// Reads before settling for what the last one got (a channel busier than that).
        const ATTEMPTS: usize = 3;
        let (mut after, mut limit) = match self.hub.seen_position(channel) {
            Some((_, seen)) if count > 0 => (seen.saturating_sub(count), count + SLACK),
            _ => (0, 0),
        };
        let mut attempt = 1;
        loop {
            let read = self.read_history(channel, rule, after, limit).await?;
            // Nothing asked for: any read has the top.
            let complete = count == 0
                || (after <= read.top.saturating_sub(count) && read.top - after <= limit);
            if complete || attempt == ATTEMPTS {
                return Ok(recent_of(read, count, complete));
            }
            attempt += 1;
            after = read.top.saturating_sub(count);
            limit = count + SLACK;
        }
    }

    /// After the Redis subscription was interrupted: for every local history channel, delivers
    /// (tagged) what history holds after the last message this node saw, so that subscribers
    /// get it even if no later message arrives. Sessions drop what they already have.
    pub(super) async fn catch_up(self: Arc<Self>) {
        let limit = self.config.history_recovery_limit;
        for (channel, epoch, seen) in self.hub.seen_positions() {
            let Some(rule) = self.policy.history(&channel) else {
                continue;
            };
            match self.read_history(&channel, rule, seen, limit).await {
                Ok(read) if read.epoch == epoch && read.top.saturating_sub(seen) > limit => {
                    // More than one recovery may send: subscribers recover themselves.
                    info!(%channel, missed = read.top - seen, "missed more than the recovery limit");
                    self.hub.lost_at(&channel, &epoch);
                }
                Ok(read) if read.epoch == epoch => {
                    debug!(%channel, from = seen, count = read.entries.len(), "catching up");
                    // Into every connection's bounded queue, but never enough to overflow it:
                    // a connection whose queue is half full skips them, and the newest (queued
                    // as usual) shows it the gap, which it fills from history itself.
                    if let Some(((last, newest), rest)) = read.entries.split_last() {
                        for (offset, frame) in rest {
                            self.hub.to_channel_spare(&channel, frame, &epoch, *offset);
                        }
                        self.hub.to_channel_at(&channel, newest, &epoch, *last);
                    }
                }
                Ok(_) => {
                    // The history this node was following is gone: what it missed of it
                    // cannot be told apart from what it had. Its subscribers recover.
                    info!(%channel, "history epoch changed while the subscription was down");
                    self.hub.lost_at(&channel, &epoch);
                }
                Err(e) => {
                    // What was missed is unknown, and the epoch may have changed (a shard whose
                    // primary died can be up again with another epoch): its subscribers recover
                    // by themselves, resubscribing with their positions.
                    warn!(%channel, error = %e, "history catch-up failed; subscribers recover");
                    self.hub.lost_at(&channel, &epoch);
                }
            }
        }
    }
}

/// The last `count` messages of `read`. A read that was cut short by its limit (`complete`
/// false) runs up to its last message rather than to the channel's top.
fn recent_of(mut read: HistoryRead, count: u64, complete: bool) -> HistoryRead {
    if !complete && let Some((last, _)) = read.entries.last() {
        read.top = *last;
    }
    let top = read.top;
    read.entries.retain(|(offset, _)| *offset <= top);
    let keep = read
        .entries
        .len()
        .min(count.min(usize::MAX as u64) as usize);
    read.entries.drain(..read.entries.len() - keep);
    // Offsets below top - count (a channel whose first held messages came before the top was
    // learned) are not among the last `count`.
    let floor = top.saturating_sub(count);
    read.entries.retain(|(offset, _)| *offset > floor);
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(top: u64, offsets: impl IntoIterator<Item = u64>) -> HistoryRead {
        HistoryRead {
            epoch: "e".into(),
            top,
            entries: offsets
                .into_iter()
                .map(|o| (o, Frame::from(o.to_string())))
                .collect(),
        }
    }

    fn offsets(read: &HistoryRead) -> Vec<u64> {
        read.entries.iter().map(|(o, _)| *o).collect()
    }

    #[test]
    fn recent_keeps_the_last_messages_up_to_the_top() {
        let r = recent_of(read(120, 71..=120), 50, true);
        assert_eq!((r.top, offsets(&r)), (120, (71..=120).collect()));
        // Read from an older guess: more than asked, and messages past the top are not read.
        let r = recent_of(read(120, 60..=120), 50, true);
        assert_eq!(offsets(&r), (71..=120).collect::<Vec<_>>());
        // A history trimmed shorter than asked: what it holds.
        let r = recent_of(read(120, 101..=120), 50, true);
        assert_eq!(offsets(&r), (101..=120).collect::<Vec<_>>());
        // Fewer messages than asked, none, or nothing asked for.
        assert_eq!(offsets(&recent_of(read(3, 1..=3), 50, true)), [1, 2, 3]);
        assert_eq!(recent_of(read(0, []), 50, true).top, 0);
        let r = recent_of(read(120, []), 0, true);
        assert_eq!((r.top, offsets(&r)), (120, vec![]));
        // Cut short: it runs up to the last message read.
        let r = recent_of(read(500, 71..=150), 50, false);
        assert_eq!((r.top, offsets(&r)), (150, (101..=150).collect()));
    }
}
