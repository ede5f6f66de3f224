//! Client requests: subscribe (with recovery or the last messages), unsubscribe, publish, history,
//! presence, ping, refresh.

use std::sync::Arc;

use crate::ws::Message;
use futures_util::Sink;
use pushgate_protocol::server::{
    UNSUBSCRIBED_REVOKED, encode_ack, encode_error, encode_history, encode_pong, encode_presence,
    encode_subscribed, encode_unsubscribed,
};
use pushgate_protocol::{ClientFrame, ErrorCode, Target};
use tokio::time::Instant;
use tracing::debug;

use super::ordering::{Resume, Sub, Track, recoverable};
use super::{InFlight, Session, Stop};
use crate::history::HistoryRead;
use crate::node::Outgoing;

impl<W> Session<W>
where
    W: Sink<Message> + Unpin,
{
    pub(super) async fn on_message(
        &mut self,
        msg: Message,
        expires: &mut Instant,
    ) -> Result<(), Stop> {
        match msg {
            Message::Text(text) => self.on_text(&text, expires).await,
            Message::Binary(_) => {
                self.error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                )
                .await
            }
            // Shared frames go to clients, never come from them.
            Message::Ping(_) | Message::Pong(_) | Message::Shared(_) => Ok(()),
            Message::Close(_) => Err(Stop::ClosedByClient),
        }
    }

    pub(super) async fn on_text(&mut self, text: &str, expires: &mut Instant) -> Result<(), Stop> {
        let limit = self.node.config.max_message_bytes;
        if text.len() > limit {
            self.node.metrics.drops.too_large.inc();
            let message = format!("frame is {} bytes; the limit is {limit}", text.len());
            return self.error(None, ErrorCode::TooLarge, &message).await;
        }
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => return self.error(e.id, ErrorCode::BadRequest, &e.message).await,
        };
        let (rate, burst) = (
            self.node.config.client_rate,
            f64::from(self.node.config.client_burst),
        );
        if !self.bucket.take(rate, burst) {
            self.node.metrics.drops.rate_limited.inc();
            let reply = encode_error(
                Some(frame.id()),
                ErrorCode::RateLimited,
                "too many requests; slow down",
            );
            return match frame {
                ClientFrame::Publish { .. } => self.publish_refused(reply).await,
                _ => self.reply(reply).await,
            };
        }
        match frame {
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                recent,
            } => {
                let resume = match (&since, recent) {
                    (Some(s), _) => Resume::Since(s.offset, &s.epoch),
                    (None, Some(n)) => Resume::Recent(n),
                    (None, None) => Resume::No,
                };
                self.subscribe(id, &channel, resume).await.map(drop)
            }
            ClientFrame::History { id, channel, limit } => self.history(id, &channel, limit).await,
            ClientFrame::Unsubscribe { id, channel } => self.unsubscribe(id, &channel).await,
            ClientFrame::Presence { id, channel } => self.presence(id, &channel).await,
            ClientFrame::Publish { id, channel, data } => {
                if let Err(e) = self.node.validate_channel(&channel) {
                    let reply =
                        encode_error(Some(id), ErrorCode::BadRequest, &format!("channel {e}"));
                    return self.publish_refused(reply).await;
                }
                if !self.grant.publish.allows(&channel) {
                    let reply = encode_error(
                        Some(id),
                        ErrorCode::Forbidden,
                        "token does not grant publish on this channel",
                    );
                    return self.publish_refused(reply).await;
                }
                self.node.metrics.messages_in.client.inc();
                let out = Outgoing {
                    target: Target::Channel(&channel),
                    from: Some(&self.grant.user),
                    data,
                };
                // The session's own lane keeps its publishes in order; the reply comes when
                // the broker has the message, while the session goes on reading.
                let lane = self.handle.id.as_u64_pair().0;
                let submitted = self.node.submit(out, lane).await;
                self.inflight.push_back(InFlight::Publish { id, submitted });
                Ok(())
            }
            ClientFrame::Ping { id } => self.reply(encode_pong(id)).await,
            ClientFrame::Refresh { id, token } => match self.node.verifier.verify(&token).await {
                Ok(grant) if grant.user == self.grant.user => {
                    self.grant = grant;
                    *expires = self.expiry();
                    // A new token can grant less: subscriptions it no longer allows end here.
                    let revoked: Vec<Arc<str>> = (self.channels.iter())
                        .filter(|c| !self.grant.subscribe.allows(&c.name))
                        .map(|c| c.name.clone())
                        .collect();
                    for channel in revoked {
                        self.leave(&channel);
                        let notice = encode_unsubscribed(
                            &channel,
                            UNSUBSCRIBED_REVOKED,
                            "token no longer grants this channel",
                        );
                        self.reply(notice).await?;
                    }
                    self.reply(encode_ack(id)).await
                }
                Ok(_) => {
                    self.error(Some(id), ErrorCode::Forbidden, "token is for another user")
                        .await
                }
                Err(e) => {
                    self.node.metrics.auth_failure(e.label());
                    self.error(Some(id), ErrorCode::Forbidden, &e.to_string())
                        .await
                }
            },
        }
    }

    /// Answers a publish refused at once: in turn after the replies to earlier publishes.
    async fn publish_refused(&mut self, reply: String) -> Result<(), Stop> {
        if self.inflight.is_empty() {
            self.reply(reply).await
        } else {
            self.inflight.push_back(InFlight::Reply(reply));
            Ok(())
        }
    }

    /// Why this connection may not read `channel` (subscribe, presence), if it may not.
    pub(super) fn may_read(&self, channel: &str) -> Option<(ErrorCode, String)> {
        if let Err(e) = self.node.validate_channel(channel) {
            return Some((ErrorCode::BadRequest, format!("channel {e}")));
        }
        if !self.grant.subscribe.allows(channel) {
            return Some((
                ErrorCode::Forbidden,
                "token does not grant this channel".into(),
            ));
        }
        None
    }

    /// Subscribes, answers, and on a history channel sends what `resume` asks to recover.
    /// Returns whether the connection is subscribed.
    pub(super) async fn subscribe(
        &mut self,
        id: u64,
        channel: &str,
        resume: Resume<'_>,
    ) -> Result<bool, Stop> {
        if let Some((code, message)) = self.may_read(channel) {
            self.error(Some(id), code, &message).await?;
            return Ok(false);
        }
        if let Some(sub) = self.channels.iter().find(|c| &*c.name == channel) {
            // Already subscribed: nothing to recover that was not delivered on this connection.
            let reply = match &sub.track {
                Some(t) => {
                    let recovered = resume
                        .asked()
                        .then(|| resume.offset_in(&t.epoch) == Some(t.upto));
                    encode_subscribed(id, t.upto, &t.epoch, recovered)
                }
                None => encode_ack(id),
            };
            self.reply(reply).await?;
            return Ok(true);
        }
        if self.channels.len() >= self.node.config.max_channels {
            let message = format!(
                "at most {} channels per connection",
                self.node.config.max_channels
            );
            self.error(Some(id), ErrorCode::BadRequest, &message)
                .await?;
            return Ok(false);
        }
        let node = self.node.clone();
        let Some(name) = node.hub.join(channel, &self.handle) else {
            self.reply(encode_ack(id)).await?;
            return Ok(true);
        };
        // Ack only once the node's Redis subscription is live: what is published after the
        // ack is delivered.
        if let Err(e) = node.broker.subscribe(&node.topics.channel(channel)).await {
            node.hub.leave(channel, self.handle.id);
            debug!(error = %e, channel, "subscribe failed");
            self.unavailable(id).await?;
            return Ok(false);
        }
        let (reply, recovered) = match node.policy.history(channel) {
            None => {
                self.channels.push(Sub {
                    name: name.clone(),
                    track: None,
                });
                (encode_ack(id), Vec::new())
            }
            Some(rule) => {
                // Live messages queue up from the join on; history is read after the Redis
                // subscription is live, so together they leave no gap, and the session's
                // position drops what both have.
                let limit = node.config.history_recovery_limit;
                // Without a single position to start from, the first read only learns the
                // epoch and the top.
                let mut read = match resume {
                    // The last messages, up to a top read after the join: the position is set
                    // to it, so live messages at or below it are dropped, and those after it,
                    // queued from the join on, follow (a gap is filled from history).
                    Resume::Recent(n) => {
                        let n = n.min(node.config.history_request_limit);
                        node.read_recent(channel, rule, n).await
                    }
                    _ => match resume.guess() {
                        Some(since) => node.read_history(channel, rule, since, limit).await,
                        None => node.read_history(channel, rule, 0, 0).await,
                    },
                };
                if let Ok(first) = &read
                    && resume.guess().is_none()
                    && let Some(since) = resume.offset_in(&first.epoch)
                    && since < first.top
                {
                    read = node.read_history(channel, rule, since, limit).await;
                }
                let read = match read {
                    Ok(read) => read,
                    Err(e) => {
                        node.hub.leave(channel, self.handle.id);
                        node.broker.release(&node.topics.channel(channel));
                        debug!(error = %e, channel, "history read failed");
                        self.unavailable(id).await?;
                        return Ok(false);
                    }
                };
                let missed = match resume {
                    Resume::Recent(_) => Some(read.entries.len()),
                    _ => recoverable(&read, resume.offset_in(&read.epoch), limit),
                };
                if resume.asked() {
                    let counter = match missed {
                        Some(_) => &node.metrics.history_recoveries.recovered,
                        None => &node.metrics.history_recoveries.not_recovered,
                    };
                    counter.inc();
                }
                let HistoryRead {
                    epoch,
                    top,
                    entries,
                } = read;
                node.hub.note_seen(channel, &epoch, top);
                let reply =
                    encode_subscribed(id, top, &epoch, resume.asked().then_some(missed.is_some()));
                self.channels.push(Sub {
                    name: name.clone(),
                    track: Some(Track { epoch, upto: top }),
                });
                let frames = match missed {
                    Some(n) => entries.into_iter().take(n).map(|(_, f)| f).collect(),
                    None => Vec::new(),
                };
                (reply, frames)
            }
        };
        if node.policy.presence(channel) {
            let session = node.session_id(self.handle.id);
            node.presence_join(&name, &session, &self.grant.user).await;
        }
        self.write_frames(Some(reply), recovered.into_iter())
            .await?;
        Ok(true)
    }

    /// Answers a history request: the channel's last `limit` messages (at most
    /// `--history-request-limit`) and its position.
    pub(super) async fn history(
        &mut self,
        id: u64,
        channel: &str,
        limit: Option<u64>,
    ) -> Result<(), Stop> {
        if let Some((code, message)) = self.may_read(channel) {
            return self.error(Some(id), code, &message).await;
        }
        let node = self.node.clone();
        let Some(rule) = node.policy.history(channel) else {
            return self
                .error(
                    Some(id),
                    ErrorCode::NotFound,
                    "channel keeps no history (no --history pattern matches it)",
                )
                .await;
        };
        let max = node.config.history_request_limit;
        let count = limit.unwrap_or(max).min(max);
        match node.read_recent(channel, rule, count).await {
            Ok(read) => {
                let messages = read.entries.iter().map(|(_, frame)| &*frame.text);
                let reply = encode_history(id, channel, read.top, &read.epoch, messages);
                self.reply(reply).await
            }
            Err(e) => {
                debug!(error = %e, channel, "history read failed");
                self.unavailable(id).await
            }
        }
    }

    pub(super) async fn presence(&mut self, id: u64, channel: &str) -> Result<(), Stop> {
        if let Some((code, message)) = self.may_read(channel) {
            return self.error(Some(id), code, &message).await;
        }
        if !self.node.policy.presence(channel) {
            return self
                .error(
                    Some(id),
                    ErrorCode::BadRequest,
                    "presence is not tracked on this channel",
                )
                .await;
        }
        let node = self.node.clone();
        match node.presence(channel).await {
            Ok(clients) => self.reply(encode_presence(id, channel, &clients)).await,
            Err(e) => {
                debug!(error = %e, channel, "presence read failed");
                self.unavailable(id).await
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, id: u64, channel: &str) -> Result<(), Stop> {
        if !self.leave(channel) {
            return self
                .error(
                    Some(id),
                    ErrorCode::NotFound,
                    "not subscribed to this channel",
                )
                .await;
        }
        self.reply(encode_ack(id)).await
    }

    /// Drops the subscription to `channel`; returns false if there was none.
    pub(super) fn leave(&mut self, channel: &str) -> bool {
        let Some(at) = self.channels.iter().position(|c| &*c.name == channel) else {
            return false;
        };
        let sub = self.channels.swap_remove(at);
        let node = &self.node;
        node.hub.leave(channel, self.handle.id);
        node.broker.release(&node.topics.channel(channel));
        if node.policy.presence(channel) {
            node.presence_leave(&node.session_id(self.handle.id), &[sub.name]);
        }
        true
    }
}
