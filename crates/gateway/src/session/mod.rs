//! One client connection: a single task that reads requests, writes queued deliveries, pings,
//! and closes the connection when its token expires or the node asks it to.
//!
//! [`run`] is generic over the socket (any `Stream` + `Sink` of WebSocket messages), so it can
//! be driven without a network. [`run_sse`] serves an SSE stream with the same session, through
//! a sink that turns frames into events (see [`crate::sse`]).
//!
//! On history channels the session delivers in offset order, once: it keeps, per history
//! subscription, the epoch and the last offset it delivered. A queued message at or below it is
//! a duplicate (dropped); one just above it is sent; one further above is a gap, filled from
//! history before it is sent, or, when history no longer holds the gap, the subscription ends
//! with an `unsubscribed` notice (`history_lost`) so that the client recovers by subscribing
//! again with its position.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::ws::{CloseFrame, Message};
use std::pin::Pin;
use std::task::{Poll, ready};

use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use pushgate_protocol::server::{
    UNSUBSCRIBED_HISTORY_LOST, encode_ack, encode_error, encode_unsubscribed, encode_welcome,
};
use pushgate_protocol::{ErrorCode, close};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use crate::auth::{Grant, unix_now};
use crate::broker::BrokerError;
use crate::hub::{self, Frame, Queued, SessionHandle};
use crate::metrics;
use crate::node::{Admission, Node, Published, Submitted};

mod ordering;
mod requests;

use ordering::{Resume, Sub, Verdict, classify};

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
    /// End an SSE stream after what was sent (the client reconnects and recovers).
    End,
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
    channels: Vec<Sub>,
    bucket: Bucket,
    sink: W,
    /// Deliveries taken from the handle's queue and not yet written, oldest first.
    batch: VecDeque<Queued>,
    /// Replies to publishes, oldest first: publishes are acknowledged in the order they came
    /// in, while the session goes on reading requests (up to `--max-inflight` waiting).
    inflight: VecDeque<InFlight>,
    /// Serving an SSE stream: no client requests, no heartbeat replies to wait for.
    sse: bool,
}

/// The reply to one publish.
enum InFlight {
    /// Waiting on the broker.
    Publish { id: u64, submitted: Submitted },
    /// Decided at once (an error), and queued behind earlier publishes to keep their order.
    Reply(String),
}

/// Resolves to the reply to the oldest publish once it is decided; pending while there is none.
fn next_reply(inflight: &mut VecDeque<InFlight>) -> impl Future<Output = String> + '_ {
    std::future::poll_fn(move |cx| {
        let text = match inflight.front_mut() {
            None => return Poll::Pending,
            Some(InFlight::Reply(text)) => std::mem::take(text),
            Some(InFlight::Publish { id, submitted }) => {
                let history = submitted.through_history();
                publish_reply(*id, history, ready!(Pin::new(submitted).poll(cx)))
            }
        };
        inflight.pop_front();
        Poll::Ready(text)
    })
}

fn publish_reply(id: u64, history: bool, result: Result<Published, BrokerError>) -> String {
    match result {
        Ok(_) => encode_ack(id),
        Err(e @ BrokerError::NotReplicated { .. }) => {
            encode_error(Some(id), ErrorCode::Unavailable, &e.to_string())
        }
        Err(e) if history => {
            debug!(error = %e, "history publish failed");
            encode_error(
                Some(id),
                ErrorCode::Unavailable,
                "broker unavailable; not published",
            )
        }
        Err(e) => {
            debug!(error = %e, "publish reached this node only");
            encode_error(
                Some(id),
                ErrorCode::Unavailable,
                "broker unavailable: delivered on this node only",
            )
        }
    }
}

/// What an SSE stream subscribes to.
#[derive(Debug, Clone, Default)]
pub struct SseStart {
    pub channels: Vec<String>,
    /// Positions from `Last-Event-ID` (`epoch:offset`, comma-separated), when it was sent.
    pub resume: Option<Vec<(u64, String)>>,
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
    let session = Session::new(node, handle, grant, sink, false);
    session.serve(stream, None).instrument(span).await;
    drop(admission);
}

/// Serves one SSE stream until it ends: `sink` takes the frames (welcome, subscribe acks,
/// deliveries, notices, pings, the close), `stream` ends when the client goes away.
pub async fn run_sse<W, R, E>(
    node: Arc<Node>,
    sink: W,
    stream: R,
    grant: Grant,
    admission: Admission,
    start: SseStart,
) where
    W: Sink<Message> + Unpin + Send + 'static,
    R: Stream<Item = Result<Message, E>> + Unpin + Send + 'static,
    E: std::error::Error + 'static,
{
    let handle = SessionHandle::new(grant.user.as_str().into(), node.config.outbound_queue);
    let span = debug_span!("sse", session = %node.session_id(handle.id), user = %grant.user);
    let session = Session::new(node, handle, grant, sink, true);
    session.serve(stream, Some(start)).instrument(span).await;
    drop(admission);
}

/// The close code a failed read calls for, when the client broke the WebSocket protocol (rather
/// than the connection breaking): 1002 for a frame that breaks RFC 6455, 1007 for a text message
/// that is not UTF-8, 1009 for a message beyond the transport's limit.
pub(crate) fn violation<E: std::error::Error + 'static>(e: &E) -> Option<u16> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        match err.downcast_ref::<crate::ws::Error>() {
            Some(crate::ws::Error::Violation(v)) => return Some(v.code),
            Some(crate::ws::Error::Io(_)) => return None,
            None => source = err.source(),
        }
    }
    None
}

/// Runs a write under the node's write timeout; a client too slow to take it is a slow consumer.
async fn bounded<T, X>(
    node: &Node,
    handle: &SessionHandle,
    write: impl Future<Output = Result<T, X>>,
) -> Result<T, Stop> {
    match tokio::time::timeout(node.config.write_timeout, write).await {
        Ok(Ok(value)) => Ok(value),
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

impl<W> Session<W> {
    fn new(node: Arc<Node>, handle: Arc<SessionHandle>, grant: Grant, sink: W, sse: bool) -> Self {
        Self {
            bucket: Bucket {
                tokens: f64::from(node.config.client_burst),
                at: Instant::now(),
            },
            node,
            handle,
            grant,
            channels: Vec::new(),
            sink,
            batch: VecDeque::new(),
            inflight: VecDeque::new(),
            sse,
        }
    }
}

impl<W> Session<W>
where
    W: Sink<Message> + Unpin,
{
    async fn serve<R, E>(mut self, mut stream: R, sse: Option<SseStart>)
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
            // Whole seconds, rounded up: a client's watchdog must never expect pings sooner.
            node.config.ping_interval.as_millis().div_ceil(1000) as u64,
        );
        debug!("connected");

        let mut started = self.send(Message::Text(welcome.into())).await;
        if let (Ok(()), Some(start)) = (&started, sse) {
            started = Box::pin(self.subscribe_sse(start)).await;
        }
        let stop = match started {
            Ok(()) => self.run_loop(&mut stream).await,
            Err(stop) => stop,
        };
        match stop {
            Stop::Close(code) => Box::pin(self.close(code, &mut stream)).await,
            // Flushing sends the close reply the WebSocket layer queued when it read the
            // client's close frame.
            Stop::ClosedByClient | Stop::End => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.close()).await;
            }
            Stop::Gone => {}
        }

        let subs = std::mem::take(&mut self.channels);
        let presence: Vec<Arc<str>> = (subs.iter())
            .filter(|s| node.policy.presence(&s.name))
            .map(|s| s.name.clone())
            .collect();
        for sub in subs {
            node.hub.leave(&sub.name, self.handle.id);
            node.broker.release(&node.topics.channel(&sub.name));
        }
        if !presence.is_empty() {
            node.presence_leave(&node.session_id(self.handle.id), &presence);
        }
        node.hub.remove(&self.handle);
        node.broker.release(&user_topic);
        debug!("disconnected");
    }

    /// The SSE stream's subscriptions, with recovery from `Last-Event-ID`. A subscription that
    /// fails (the broker is down) ends the stream after its error event.
    async fn subscribe_sse(&mut self, start: SseStart) -> Result<(), Stop> {
        let resume = match &start.resume {
            Some(list) => Resume::AnyOf(list),
            None => Resume::No,
        };
        for (i, channel) in start.channels.iter().enumerate() {
            if !self.subscribe(i as u64 + 1, channel, resume).await? {
                return Err(Stop::End);
            }
        }
        Ok(())
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
        // An SSE client sends nothing: its going away ends the stream instead.
        let watch_silence = !self.sse;
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + ping_interval;
        let mut expires = self.expiry();
        // One timer per connection: it fires at the next ping or at expiry, whichever is first.
        let timer = tokio::time::sleep_until(next_ping.min(expires));
        tokio::pin!(timer);
        let handle = self.handle.clone();
        let max_inflight = self.node.config.max_inflight as usize;
        loop {
            // A connection with its most publishes in flight is not read until one is answered.
            let reading = self.inflight.len() < max_inflight;
            let result = tokio::select! {
                biased;
                () = handle.woken() => match handle.close_code() {
                    Some(code) => Err(Stop::Close(code)),
                    None => self.write_queued().await,
                },
                // Boxed, as request handling: idle sessions should not carry the write's state.
                reply = next_reply(&mut self.inflight) => Box::pin(self.write_replies(reply)).await,
                incoming = stream.next(), if reading => match incoming {
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        // Boxed: request handling (publish, subscribe) holds large futures
                        // only while it runs, instead of in every idle connection's task.
                        Box::pin(self.on_message(msg, &mut expires)).await
                    }
                    Some(Err(e)) => match violation(&e) {
                        Some(code) => {
                            debug!(error = %e, code, "protocol violation");
                            if code == close::TOO_BIG {
                                self.node.metrics.drops.too_large.inc();
                            }
                            Err(Stop::Close(code))
                        }
                        None => {
                            debug!(error = %e, "read failed");
                            Err(Stop::Gone)
                        }
                    },
                    None => Err(Stop::Gone),
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expires {
                        Err(Stop::Close(close::TOKEN_EXPIRED))
                    } else if watch_silence && now.duration_since(last_heard) > silence_limit {
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
            let mut next_check = next_ping.min(expires);
            if watch_silence {
                next_check = next_check.min(last_heard + silence_limit + Duration::from_millis(1));
            }
            // Re-arming a timer costs a trip through the timer wheel: skip it when nothing
            // moved the deadline, as after every delivery written.
            if next_check != timer.deadline() {
                timer.as_mut().reset(next_check.max(Instant::now()));
            }
        }
    }

    /// Writes what is queued (up to a batch), then flushes once. History messages go through
    /// the session's per-channel position: duplicates are dropped, gaps filled first.
    async fn write_queued(&mut self) -> Result<(), Stop> {
        let mut budget = WRITE_BATCH;
        // One clock reading per batch: the batch goes out in one flush.
        let now = metrics::unix_seconds();
        while budget > 0 {
            let (node, handle, sink, subs, batch) = (
                &self.node,
                &self.handle,
                &mut self.sink,
                &mut self.channels,
                &mut self.batch,
            );
            let write = async {
                let mut written = 0;
                let mut stopped_at = None;
                while written < budget {
                    if batch.is_empty() {
                        handle.take_batch(batch, budget - written);
                    }
                    let Some(entry) = batch.pop_front() else {
                        break;
                    };
                    let verdict = match &entry.tag {
                        None => Verdict::Send,
                        Some(tag) => classify(subs, tag),
                    };
                    match verdict {
                        Verdict::Send => {
                            if entry.frame.ts != 0 {
                                let lag = &node.metrics.delivery_lag_seconds;
                                lag.observe(metrics::lag_since(now, entry.frame.ts));
                            }
                            sink.feed(Message::Shared(entry.frame)).await?;
                            written += 1;
                        }
                        Verdict::Skip => {}
                        Verdict::Gap | Verdict::Lost => {
                            stopped_at = Some((entry, matches!(verdict, Verdict::Lost)));
                            break;
                        }
                    }
                }
                if written > 0 {
                    sink.flush().await?;
                }
                Ok::<_, W::Error>((written, stopped_at))
            };
            let (written, stopped_at) = bounded(node, handle, write).await?;
            budget = budget.saturating_sub(written);
            let Some((entry, lost)) = stopped_at else {
                break;
            };
            // Boxed: a gap needs a history read, which idle sessions should not carry.
            Box::pin(self.repair(entry, lost)).await?;
            budget = budget.saturating_sub(1);
        }
        // A full batch may have left frames behind: come back for them after other events.
        // (A batch cut short found the queue empty; a frame queued since then woke us anew.)
        if budget == 0 {
            self.handle.rewake_if_pending(!self.batch.is_empty());
        }
        hub::release_spare(&mut self.batch);
        Ok(())
    }

    fn sub_index(&self, channel: &Arc<str>) -> Option<usize> {
        self.channels
            .iter()
            .position(|s| Arc::ptr_eq(&s.name, channel) || s.name == *channel)
    }

    /// Fills the gap before a queued history message from history and sends both; or, when
    /// history cannot fill it (or `lost`), ends the subscription with `history_lost`.
    async fn repair(&mut self, entry: Queued, lost: bool) -> Result<(), Stop> {
        let Some(tag) = entry.tag else {
            return Ok(());
        };
        let Some(at) = self.sub_index(&tag.channel) else {
            return Ok(());
        };
        let Some(track) = &self.channels[at].track else {
            return Ok(());
        };
        let (epoch, upto) = (track.epoch.clone(), track.upto);
        let node = self.node.clone();
        let missing = tag.offset.saturating_sub(upto + 1);
        let filled = match node.policy.history(&tag.channel) {
            Some(rule) if !lost && missing <= node.config.history_recovery_limit => {
                match node.read_history(&tag.channel, rule, upto, missing).await {
                    Ok(read) if read.epoch == epoch && read.holds(upto, missing) => Some(read),
                    Ok(_) => None,
                    Err(e) => {
                        debug!(channel = %tag.channel, error = %e, "history read for a gap failed");
                        None
                    }
                }
            }
            _ => None,
        };
        let Some(read) = filled else {
            node.metrics.history_lost.inc();
            return self.lose(&tag.channel).await;
        };
        node.metrics.history_gaps.inc();
        debug!(channel = %tag.channel, from = upto + 1, to = tag.offset, "filled a gap from history");
        if let Some(track) = &mut self.channels[at].track {
            track.upto = tag.offset;
        }
        let frames = read.entries.into_iter().take(missing as usize);
        self.write_frames(None, frames.map(|(_, f)| f).chain([entry.frame]))
            .await
    }

    /// Ends a history subscription whose missed messages history no longer holds.
    async fn lose(&mut self, channel: &Arc<str>) -> Result<(), Stop> {
        debug!(%channel, "history lost: ending the subscription");
        self.leave(channel);
        let notice = encode_unsubscribed(
            channel,
            UNSUBSCRIBED_HISTORY_LOST,
            "messages were missed that history no longer holds; subscribe again with since",
        );
        self.reply(notice).await?;
        if self.sse {
            // An SSE client cannot subscribe again on this stream: it reconnects, with its
            // Last-Event-ID, and learns recovered: false.
            return Err(Stop::End);
        }
        Ok(())
    }

    /// Writes `first` and every other publish reply already decided, and flushes once.
    async fn write_replies(&mut self, first: String) -> Result<(), Stop> {
        let mut replies = vec![Frame::from(first)];
        while let Some(reply) = next_reply(&mut self.inflight).now_or_never() {
            replies.push(reply.into());
        }
        self.write_frames(None, replies.into_iter()).await
    }

    /// Writes `first` (a reply) and then `frames`, and flushes once.
    async fn write_frames(
        &mut self,
        first: Option<String>,
        frames: impl Iterator<Item = Frame>,
    ) -> Result<(), Stop> {
        let (node, handle, sink) = (&self.node, &self.handle, &mut self.sink);
        let write = async {
            if let Some(text) = first {
                sink.feed(Message::Text(text.into())).await?;
            }
            let now = metrics::unix_seconds();
            for frame in frames {
                if frame.ts != 0 {
                    let lag = &node.metrics.delivery_lag_seconds;
                    lag.observe(metrics::lag_since(now, frame.ts));
                }
                sink.feed(Message::Shared(frame)).await?;
            }
            sink.flush().await
        };
        bounded(node, handle, write).await
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
        if code != close::SLOW_CONSUMER && !self.inflight.is_empty() {
            // Publishes already handed to the broker get their replies before the close.
            let inflight = &mut self.inflight;
            let decided = async {
                let mut replies = Vec::with_capacity(inflight.len());
                while !inflight.is_empty() {
                    replies.push(Frame::from(next_reply(inflight).await));
                }
                replies
            };
            if let Ok(replies) = tokio::time::timeout(CLOSE_TIMEOUT, decided).await {
                let _ = self.write_frames(None, replies.into_iter()).await;
            }
        }
        let frame = CloseFrame {
            code,
            reason: close::reason(code).into(),
        };
        if self.sse {
            // The SSE sink turns the close into a last event; there is no handshake.
            let ending = async {
                let _ = self.sink.send(Message::Close(Some(frame))).await;
                let _ = self.sink.close().await;
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ending).await;
            return;
        }
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

    /// The reply to request `id` when the broker could not serve it.
    async fn unavailable(&mut self, id: u64) -> Result<(), Stop> {
        self.error(
            Some(id),
            ErrorCode::Unavailable,
            "broker unavailable; retry later",
        )
        .await
    }
}
