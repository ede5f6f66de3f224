//! One client connection: a single task that reads requests, writes queued deliveries, pings,
//! and closes the connection when its token expires or the node asks it to.
//!
//! [`run`] is generic over the socket (any `Stream` + `Sink` of WebSocket messages), so it can
//! be driven without a network.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use pushgate_protocol::server::{
    encode_ack, encode_error, encode_pong, encode_unsubscribed, encode_welcome,
};
use pushgate_protocol::{ClientFrame, ErrorCode, Target, close, validate_channel};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use crate::auth::{Grant, unix_now};
use crate::hub::SessionHandle;
use crate::node::{Admission, Node, Outgoing};

/// Most queued deliveries written before one flush.
const WRITE_BATCH: usize = 64;
/// How long a close handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the loop stopped.
enum Stop {
    /// Close with this code.
    Close(u16),
    /// The client sent a close frame: answer it, then stop.
    ClosedByClient,
    /// The connection broke: nothing more to send.
    Gone,
}

/// Per-connection token bucket for client requests. Two words; the rate and burst live in the
/// node's config.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Session<W> {
    node: Arc<Node>,
    handle: Arc<SessionHandle>,
    grant: Grant,
    channels: Vec<Arc<str>>,
    bucket: Bucket,
    sink: W,
}

/// Serves one authenticated connection until it closes.
pub async fn run<S, E>(node: Arc<Node>, socket: S, grant: Grant, admission: Admission)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let handle = SessionHandle::new(grant.user.as_str().into(), node.config.outbound_queue);
    // Debug level: at the default level no span data is kept per connection.
    let span = debug_span!("session", session = %node.session_id(handle.id), user = %grant.user);
    let (sink, stream) = socket.split();
    let session = Session {
        bucket: Bucket {
            tokens: f64::from(node.config.client_burst),
            at: Instant::now(),
        },
        node,
        handle,
        grant,
        channels: Vec::new(),
        sink,
    };
    session.serve(stream).instrument(span).await;
    drop(admission);
}

fn too_big<E: std::error::Error + 'static>(e: &E) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Runs a write under the node's write timeout; a client too slow to take it is a slow consumer.
async fn bounded<T, X>(
    node: &Node,
    handle: &SessionHandle,
    write: impl Future<Output = Result<T, X>>,
) -> Result<(), Stop> {
    match tokio::time::timeout(node.config.write_timeout, write).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(Stop::Gone),
        Err(_) => {
            // A stalled write often also overflows the queue, which closes the session as a
            // slow consumer too: count the connection once.
            if handle.close(close::SLOW_CONSUMER) {
                node.metrics.drops.slow_consumer.inc();
            }
            Err(Stop::Close(close::SLOW_CONSUMER))
        }
    }
}

impl<W> Session<W>
where
    W: Sink<Message> + Unpin,
{
    async fn serve<R, E>(mut self, mut stream: R)
    where
        R: Stream<Item = Result<Message, E>> + Unpin,
        E: std::error::Error + 'static,
    {
        let node = self.node.clone();
        let user_topic = node.topics.user(&self.grant.user);
        node.hub.insert(&self.handle);
        // The user topic is live before the welcome, so a user message sent after it arrives.
        Box::pin(node.broker.hold(&user_topic)).await;
        let welcome = encode_welcome(
            &node.session_id(self.handle.id),
            &self.grant.user,
            &node.instance,
            node.config.ping_interval.as_secs(),
        );
        debug!("connected");

        let stop = match self.send(Message::Text(welcome.into())).await {
            Ok(()) => self.run_loop(&mut stream).await,
            Err(stop) => stop,
        };
        match stop {
            Stop::Close(code) => Box::pin(self.close(code, &mut stream)).await,
            // Flushing sends the close reply the WebSocket layer queued when it read the
            // client's close frame.
            Stop::ClosedByClient => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.close()).await;
            }
            Stop::Gone => {}
        }

        for channel in std::mem::take(&mut self.channels) {
            node.hub.leave(&channel, self.handle.id);
            node.broker.release(&node.topics.channel(&channel));
        }
        node.hub.remove(&self.handle);
        node.broker.release(&user_topic);
        debug!("disconnected");
    }

    fn expiry(&self) -> Instant {
        let left = self.grant.expires_at.saturating_sub(unix_now());
        Instant::now() + Duration::from_secs(left) + self.node.config.jwt.jwt_leeway
    }

    async fn run_loop<R, E>(&mut self, stream: &mut R) -> Stop
    where
        R: Stream<Item = Result<Message, E>> + Unpin,
        E: std::error::Error + 'static,
    {
        let ping_interval = self.node.config.ping_interval;
        let silence_limit = ping_interval + self.node.config.pong_timeout;
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + ping_interval;
        let mut expires = self.expiry();
        // One timer per connection: it fires at the next ping or at expiry, whichever is first.
        let timer = tokio::time::sleep_until(next_ping.min(expires));
        tokio::pin!(timer);
        let handle = self.handle.clone();
        loop {
            let result = tokio::select! {
                biased;
                () = handle.woken() => match handle.close_code() {
                    Some(code) => Err(Stop::Close(code)),
                    None => self.write_queued().await,
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        // Boxed: request handling (publish, subscribe) holds large futures
                        // only while it runs, instead of in every idle connection's task.
                        Box::pin(self.on_message(msg, &mut expires)).await
                    }
                    Some(Err(e)) if too_big(&e) => {
                        self.node.metrics.drops.too_large.inc();
                        Err(Stop::Close(close::TOO_BIG))
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "read failed");
                        Err(Stop::Gone)
                    }
                    None => Err(Stop::Gone),
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expires {
                        Err(Stop::Close(close::TOKEN_EXPIRED))
                    } else if now.duration_since(last_heard) > silence_limit {
                        self.node.metrics.drops.heartbeat_timeout.inc();
                        Err(Stop::Close(close::HEARTBEAT_TIMEOUT))
                    } else if now >= next_ping {
                        next_ping = now + ping_interval;
                        self.send(Message::Ping(Default::default())).await
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(stop) = result {
                return stop;
            }
            // A refresh may have moved the expiry; silence is checked at the next ping.
            let next_check = next_ping
                .min(expires)
                .min(last_heard + silence_limit + Duration::from_millis(1));
            timer.as_mut().reset(next_check.max(Instant::now()));
        }
    }

    /// Writes what is queued (up to a batch), then flushes once.
    async fn write_queued(&mut self) -> Result<(), Stop> {
        let (node, handle, sink) = (&self.node, &self.handle, &mut self.sink);
        let write = async {
            let mut written = 0;
            while written < WRITE_BATCH {
                let Some(frame) = handle.next_frame() else {
                    break;
                };
                sink.feed(Message::Text(frame)).await?;
                written += 1;
            }
            if written > 0 {
                sink.flush().await?;
            }
            Ok::<(), W::Error>(())
        };
        bounded(node, handle, write).await?;
        // A full batch may have left frames behind: come back for them after other events.
        handle.rewake_if_pending();
        Ok(())
    }

    async fn send(&mut self, msg: Message) -> Result<(), Stop> {
        let (node, handle, sink) = (&self.node, &self.handle, &mut self.sink);
        bounded(node, handle, sink.send(msg)).await
    }

    async fn close<R, E>(&mut self, code: u16, stream: &mut R)
    where
        R: Stream<Item = Result<Message, E>> + Unpin,
    {
        debug!(code, "closing");
        let frame = CloseFrame {
            code,
            reason: close::reason(code).into(),
        };
        let handshake = async {
            if self.sink.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            // Read until the client's close reply (or the end) so the close is clean.
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
    }

    async fn reply(&mut self, text: String) -> Result<(), Stop> {
        self.send(Message::Text(text.into())).await
    }

    async fn error(&mut self, id: Option<u64>, code: ErrorCode, message: &str) -> Result<(), Stop> {
        self.reply(encode_error(id, code, message)).await
    }

    async fn on_message(&mut self, msg: Message, expires: &mut Instant) -> Result<(), Stop> {
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
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Stop::ClosedByClient),
        }
    }

    async fn on_text(&mut self, text: &str, expires: &mut Instant) -> Result<(), Stop> {
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
            return self
                .error(
                    Some(frame.id()),
                    ErrorCode::RateLimited,
                    "too many requests; slow down",
                )
                .await;
        }
        match frame {
            ClientFrame::Subscribe { id, channel } => self.subscribe(id, &channel).await,
            ClientFrame::Unsubscribe { id, channel } => self.unsubscribe(id, &channel).await,
            ClientFrame::Publish { id, channel, data } => {
                if let Err(e) = validate_channel(&channel) {
                    return self
                        .error(Some(id), ErrorCode::BadRequest, &format!("channel {e}"))
                        .await;
                }
                if !self.grant.publish.allows(&channel) {
                    return self
                        .error(
                            Some(id),
                            ErrorCode::Forbidden,
                            "token does not grant publish on this channel",
                        )
                        .await;
                }
                self.node.metrics.messages_in.client.inc();
                let out = Outgoing {
                    target: Target::Channel(&channel),
                    from: Some(&self.grant.user),
                    data,
                };
                match self.node.publish(out).await {
                    Ok(_) => self.reply(encode_ack(id)).await,
                    Err(e) => {
                        debug!(error = %e, "publish reached this node only");
                        self.error(
                            Some(id),
                            ErrorCode::Unavailable,
                            "broker unavailable: delivered on this node only",
                        )
                        .await
                    }
                }
            }
            ClientFrame::Ping { id } => self.reply(encode_pong(id)).await,
            ClientFrame::Refresh { id, token } => match self.node.verifier.verify(&token) {
                Ok(grant) if grant.user == self.grant.user => {
                    self.grant = grant;
                    *expires = self.expiry();
                    // A new token can grant less: subscriptions it no longer allows end here.
                    let revoked: Vec<Arc<str>> = (self.channels.iter())
                        .filter(|c| !self.grant.subscribe.allows(c))
                        .cloned()
                        .collect();
                    for channel in revoked {
                        self.leave(&channel);
                        let notice =
                            encode_unsubscribed(&channel, "token no longer grants this channel");
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

    async fn subscribe(&mut self, id: u64, channel: &str) -> Result<(), Stop> {
        if let Err(e) = validate_channel(channel) {
            return self
                .error(Some(id), ErrorCode::BadRequest, &format!("channel {e}"))
                .await;
        }
        if !self.grant.subscribe.allows(channel) {
            return self
                .error(
                    Some(id),
                    ErrorCode::Forbidden,
                    "token does not grant this channel",
                )
                .await;
        }
        if self.channels.iter().any(|c| &**c == channel) {
            return self.reply(encode_ack(id)).await;
        }
        if self.channels.len() >= self.node.config.max_channels {
            let message = format!(
                "at most {} channels per connection",
                self.node.config.max_channels
            );
            return self.error(Some(id), ErrorCode::BadRequest, &message).await;
        }
        let node = self.node.clone();
        let Some((name, _)) = node.hub.join(channel, &self.handle) else {
            return self.reply(encode_ack(id)).await;
        };
        // Ack only once the node's Redis subscription is live: what is published after the
        // ack is delivered.
        if let Err(e) = node.broker.subscribe(&node.topics.channel(channel)).await {
            node.hub.leave(channel, self.handle.id);
            debug!(error = %e, channel, "subscribe failed");
            return self
                .error(
                    Some(id),
                    ErrorCode::Unavailable,
                    "broker unavailable; retry later",
                )
                .await;
        }
        self.channels.push(name);
        self.reply(encode_ack(id)).await
    }

    async fn unsubscribe(&mut self, id: u64, channel: &str) -> Result<(), Stop> {
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
    fn leave(&mut self, channel: &str) -> bool {
        let Some(at) = self.channels.iter().position(|c| &**c == channel) else {
            return false;
        };
        self.channels.swap_remove(at);
        self.node.hub.leave(channel, self.handle.id);
        self.node.broker.release(&self.node.topics.channel(channel));
        true
    }
}
