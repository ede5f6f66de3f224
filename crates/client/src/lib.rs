//! An async Rust client for pushgate.
//!
//! One [`Client`] keeps one WebSocket connection to a pushgate node (or a load balancer in front
//! of several) and keeps it up: it reconnects by itself, resubscribes every channel afterwards,
//! and notices a connection that went silent. Frames are the typed ones of
//! [`pushgate_protocol`].
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use pushgate_client::Client;
//!
//! # async fn run() -> Result<(), pushgate_client::Error> {
//! let client = Client::builder("ws://127.0.0.1:8080/ws")
//!     .token_source(|| async { Ok::<_, std::io::Error>(std::env::var("TOKEN").unwrap_or_default()) })
//!     .connect()
//!     .await?;
//! let mut room = client.subscribe("room:1").await?;
//! client.publish("room:1", &serde_json::json!({"text": "hi"})).await?;
//! while let Some(message) = room.next().await {
//!     println!("{} {}", message.id, message.data);
//! }
//! # Ok(()) }
//! ```
//!
//! # Reconnecting
//!
//! What the client does when a connection ends or an attempt fails:
//!
//! | what happened | what the client does |
//! |---------------|----------------------|
//! | close 1001 (node draining) | reconnects at once, after a random delay of up to [`going_away_jitter`](ClientBuilder::going_away_jitter) (1 s); another 1001 before a connection was stable backs off instead |
//! | close 4001 (token expired) | gets a new token from the token source and reconnects like 1001; with a fixed token it stops ([`CloseReason::TokenExpired`]) |
//! | close 4003 (disconnected through the API) | asks the token source once: a different token → reconnect after a backoff; the same token, an error or a fixed token → stops ([`CloseReason::Disconnected`]) |
//! | handshake refused with 401 or 403 | as 4003; stops with [`CloseReason::Unauthorized`] |
//! | 1011, 4008, 4009, any other code, no close frame, a failed attempt, another HTTP status | reconnects after a backoff |
//! | nothing from the node for `ping_interval` (from the welcome) + [`heartbeat_grace`](ClientBuilder::heartbeat_grace) | treats the connection as dead, reconnects after a backoff |
//!
//! The backoff is exponential with full jitter: the n-th delay is uniform in
//! `[0, min(max, base × 2ⁿ)]`, 0.5 s to 20 s by default, and starts over once a connection has
//! stayed up for [`stable_after`](ClientBuilder::stable_after) (10 s). With several URLs
//! ([`add_url`](ClientBuilder::add_url)) each new attempt goes to the next one in turn.
//!
//! A token source is called before every connection attempt, so it should hand out a cached
//! token while that one is still good.
//!
//! After every reconnect the client subscribes again to every channel it holds; a
//! [`Subscription`] keeps streaming across reconnects. On channels without history delivery is
//! at most once: messages published while the client was away are not replayed. A subscription
//! whose queue is full drops new deliveries (counted in [`Subscription::dropped`], reported as
//! [`Event::Lagged`]); those are not replayed either.
//!
//! # History channels
//!
//! On a channel the nodes keep history for (`--history`), every delivery carries its position
//! (`offset`, `epoch`). The client remembers, per subscription, the last position it has seen
//! (or the position in the node's ack while nothing was delivered yet;
//! [`Subscription::position`]) and subscribes again after a reconnect with `since` set to it.
//! The node then sends what was missed, in order, before the live messages, and says in its
//! ack whether it could: the client reports that as [`Event::Recovered`] (and
//! [`Subscription::recovered`]). `recovered: false` means messages were missed that history no
//! longer holds (it expired, was deleted, or the client was away for more than the node
//! recovers): **reload the channel's state** (from your backend, [`Client::history`], or
//! `GET /api/history`); delivery goes on after the position in the event.
//!
//! To show a channel's recent past on a first join (a chat room's last messages),
//! [`subscribe_recent`](Client::subscribe_recent) starts the subscription with the channel's
//! last messages, then the live ones, with no gap and none twice; later resubscribes recover
//! with `since` as above. [`history`](Client::history) reads the last messages without
//! subscribing.
//!
//! | the node says | the client |
//! |---------------|------------|
//! | ack of a resubscribe (after a reconnect, or a `history_lost` notice), or of [`subscribe_since`](Client::subscribe_since) | [`Event::Recovered`] with the ack's `recovered` (`false` for a channel without history: nothing was replayed) |
//! | `unsubscribed`, code `history_lost` | subscribes again at once with `since`; the ack is reported as [`Event::Recovered`]; the [`Subscription`] goes on |
//! | `unsubscribed`, code `revoked` (a refreshed token no longer grants the channel) | ends the [`Subscription`], reports [`Event::Unsubscribed`] with [`UnsubscribeCode::Revoked`] |
//!
//! A delivery on a history channel in the epoch last seen and at or below the last offset seen
//! is dropped as a duplicate (nodes do not send those; this guards the boundary between recovered
//! and live messages across reconnects).
//!
//! ```no_run
//! use pushgate_client::{Client, Event, Position, UnsubscribeCode};
//!
//! # async fn reload(_: &str, _: Option<Position>) {}
//! # async fn run(client: Client) -> Result<(), pushgate_client::Error> {
//! let mut events = client.events();
//! let mut chat = client.subscribe("chat:1").await?;
//! loop {
//!     tokio::select! {
//!         Some(message) = chat.recv() => println!("{:?} {}", message.position(), message.data),
//!         Ok(event) = events.recv() => match event {
//!             Event::Recovered { channel, recovered: false, position } => {
//!                 reload(&channel, position).await; // messages were lost: reload the state
//!             }
//!             Event::Unsubscribed { channel, reason } if reason.code == UnsubscribeCode::Revoked => {
//!                 println!("{channel}: {reason}");
//!             }
//!             _ => {}
//!         },
//!         else => break,
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Requests
//!
//! [`publish`](Client::publish), [`history`](Client::history), [`ping`](Client::ping) and
//! [`refresh`](Client::refresh) need an open connection ([`Error::NotConnected`] otherwise)
//! and wait at most
//! [`request_timeout`](ClientBuilder::request_timeout) for the node's reply.
//! [`subscribe`](Client::subscribe) registers the channel at once and resolves when a node
//! acknowledges it, waiting through reconnects; a subscribe the node answers with
//! `unavailable` or `rate_limited` is retried.
//!
//! # TLS
//!
//! `wss://` URLs use rustls; see [`tls`] to trust a private CA.
#![forbid(unsafe_code)]

mod backoff;
mod driver;
mod error;
pub mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub use error::{CloseReason, Error};
pub use pushgate_protocol::server::{Delivery, Position, PresenceEvent};
pub use pushgate_protocol::{ErrorCode, close};

use driver::{Command, Driver, RequestKind, SubscribeRequest};

/// Errors a token source may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

#[derive(Clone)]
pub(crate) enum TokenSource {
    Fixed(String),
    Source(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

/// The connection as the node described it in its `welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// This connection's session ID (the target of `session` deliveries).
    pub session: String,
    /// The token's `sub`.
    pub user: String,
    /// The instance ID of the node serving the connection.
    pub node: String,
    /// The node's WebSocket ping interval.
    pub ping_interval: Duration,
    /// The URL this connection was opened to.
    pub url: String,
}

/// Where the client is now; see [`Client::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// A connection attempt is under way.
    Connecting,
    /// Connected, welcome received.
    Connected(Session),
    /// Waiting before the next attempt.
    Reconnecting,
    /// Stopped for good.
    Closed(CloseReason),
}

/// What happens to the client, in order; see [`Client::events`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An attempt to connect to `url` starts.
    Connecting { url: String },
    /// The node's welcome arrived: the connection is up. Resubscribes follow.
    Connected(Session),
    /// An attempt ended before the welcome: `status` is the HTTP status of a refused handshake.
    ConnectFailed { status: Option<u16>, reason: String },
    /// An open connection ended: `code` is the close code the node sent, `None` when the
    /// connection broke without one (network failure, the node died, the heartbeat watchdog).
    Disconnected { code: Option<u16>, reason: String },
    /// The next attempt starts after `delay`; `attempt` counts failures since the last stable
    /// connection.
    Reconnecting { delay: Duration, attempt: u32 },
    /// The node acknowledged a subscription (again after every reconnect, and after a
    /// `history_lost` notice).
    Subscribed { channel: String },
    /// The node refused a subscription; its [`Subscription`] has ended.
    SubscribeFailed {
        channel: String,
        code: ErrorCode,
        message: String,
    },
    /// The node ended a subscription: a refreshed token no longer grants it
    /// ([`UnsubscribeCode::Revoked`]). Its [`Subscription`] has ended. (A `history_lost`
    /// notice does not end a subscription: the client subscribes again and reports
    /// [`Event::Recovered`].)
    Unsubscribed {
        channel: String,
        /// The notice's `code` and text.
        reason: UnsubscribeReason,
    },
    /// The node acknowledged a subscription that had something to recover: a resubscribe after
    /// a reconnect or a `history_lost` notice, or a [`subscribe_since`](Client::subscribe_since).
    /// `recovered: true`: what was missed follows, in order, before the live messages.
    /// `recovered: false`: messages were missed and will not come (history no longer holds
    /// them, or the channel keeps no history): reload the channel's state. Follows
    /// [`Event::Subscribed`].
    Recovered {
        channel: String,
        recovered: bool,
        /// Where delivery goes on from (the next delivery is the one after it), on history
        /// channels: with `recovered: true` the position the client had, with `false` the
        /// channel's position in the ack.
        position: Option<Position>,
    },
    /// A delivery for `channel` found its subscription's queue full and was dropped; `dropped`
    /// is the subscription's total so far. Reported once per run of drops.
    Lagged { channel: String, dropped: u64 },
    /// On a channel the nodes send presence events for (`--presence-events`): `user`'s first
    /// connection subscribed to `channel` (per user: another connection of theirs makes none).
    Join(PresenceEvent),
    /// On a presence-events channel: `user`'s last connection left `channel` (unsubscribed,
    /// disconnected, or its node died and its entry expired).
    Leave(PresenceEvent),
    /// An error frame that answered no request of ours (e.g. `too_large` for an oversized frame).
    ServerError { code: ErrorCode, message: String },
    /// The client stopped for good.
    Closed(CloseReason),
}

/// The reply to [`Client::history`]: a history channel's last messages, oldest first, and its
/// position.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub channel: String,
    /// The position the messages run up to: that of the channel as the node read it (the last
    /// message's, unless history no longer holds it). A [`subscribe_since`](Client::subscribe_since)
    /// from it gets what came after.
    pub position: Position,
    /// Oldest first, with their positions; as deliveries of the channel look.
    pub messages: Vec<Delivery>,
}

/// Why the node ended a subscription: an `unsubscribed` notice. Displays as its text and code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubscribeReason {
    pub code: UnsubscribeCode,
    /// The notice's `reason` text.
    pub message: String,
}

impl std::fmt::Display for UnsubscribeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code.as_str() {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The `code` of an `unsubscribed` notice that ended a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsubscribeCode {
    /// `revoked`: a refreshed token no longer grants the channel.
    Revoked,
    /// A code this client does not know, or none (`None`) from a node that sends none.
    Other(Option<String>),
}

impl UnsubscribeCode {
    pub(crate) fn from_wire(code: Option<String>) -> Self {
        match code.as_deref() {
            Some(pushgate_protocol::server::UNSUBSCRIBED_REVOKED) => Self::Revoked,
            _ => Self::Other(code),
        }
    }

    /// The code as sent on the wire.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Revoked => Some(pushgate_protocol::server::UNSUBSCRIBED_REVOKED),
            Self::Other(code) => code.as_deref(),
        }
    }
}

/// What a [`Subscription`] shares with the connection task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Deliveries dropped because the subscription's queue was full.
    pub(crate) dropped: AtomicU64,
    pub(crate) history: Mutex<HistoryState>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct HistoryState {
    /// The position the client would subscribe again from.
    pub(crate) position: Option<Position>,
    /// The `recovered` of the last subscribe that had something to recover.
    pub(crate) recovered: Option<bool>,
}

impl Shared {
    pub(crate) fn history(&self) -> std::sync::MutexGuard<'_, HistoryState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent data.
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Settings shared by the handles and the connection task.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) urls: Vec<String>,
    pub(crate) token: TokenSource,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) stable_after: Duration,
    pub(crate) going_away_jitter: Duration,
    pub(crate) heartbeat_grace: Duration,
    pub(crate) app_ping_interval: Option<Duration>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) subscription_queue: usize,
    pub(crate) batch: bool,
}

/// Builds a [`Client`]; from [`Client::builder`].
pub struct ClientBuilder {
    config: Config,
    direct_queue: usize,
    events_queue: usize,
}

impl ClientBuilder {
    /// Another URL to try: attempts go through the URLs in turn (useful without a load
    /// balancer, e.g. every node of a small cluster).
    pub fn add_url(mut self, url: impl Into<String>) -> Self {
        self.config.urls.push(url.into());
        self
    }

    /// A fixed token, sent as `Authorization: Bearer` at every handshake. With a fixed token the
    /// client stops when the token expires (4001), is refused (401/403) or the user is
    /// disconnected (4003). [`refresh`](Client::refresh) replaces it.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = TokenSource::Fixed(token.into());
        self
    }

    /// A function that returns a token; called before every connection attempt, and to decide
    /// whether to reconnect after a 401/403 or 4003 (only a different token does).
    pub fn token_source<F, Fut, E>(mut self, source: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let source = Arc::new(source);
        self.config.token = TokenSource::Source(Arc::new(move || {
            let fut = source();
            Box::pin(async move { fut.await.map_err(Into::into) })
        }));
        self
    }

    /// The rustls config for `wss://` URLs (default: the system's root certificates). See
    /// [`tls`] for one that trusts a private CA.
    pub fn tls(mut self, config: rustls::ClientConfig) -> Self {
        self.config.tls = Some(Arc::new(config));
        self
    }

    /// Backoff window: the first delay is at most `base`, each failure doubles that up to `max`
    /// (default 500 ms and 20 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max;
        self
    }

    /// How long a connection must stay up for the backoff to start over (default 10 s).
    pub fn stable_after(mut self, after: Duration) -> Self {
        self.config.stable_after = after;
        self
    }

    /// Largest random delay before reconnecting after 1001 or 4001 (default 1 s).
    pub fn going_away_jitter(mut self, max: Duration) -> Self {
        self.config.going_away_jitter = max;
        self
    }

    /// How long past the node's ping interval a silent connection is kept before it counts as
    /// dead (default 10 s).
    pub fn heartbeat_grace(mut self, grace: Duration) -> Self {
        self.config.heartbeat_grace = grace;
        self
    }

    /// Also send a `ping` request every `interval` (default: never; the node's own WebSocket
    /// pings keep the watchdog fed). Each ping costs one request from the node's rate budget.
    pub fn app_ping(mut self, interval: Duration) -> Self {
        self.config.app_ping_interval = Some(interval);
        self
    }

    /// Bound on one connection attempt: TCP, TLS, the handshake and the welcome (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// How long `publish`, `ping` and `refresh` wait for the reply (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Whether to ask nodes for batches (subprotocol `pushgate.batch`, default on): deliveries
    /// queued together on the node arrive in one WebSocket message, which saves per-message
    /// overhead on both ends. Turn off only for nodes that predate it (the handshake would
    /// fail).
    pub fn batch(mut self, on: bool) -> Self {
        self.config.batch = on;
        self
    }

    /// Deliveries queued per subscription before new ones are dropped (default 1024).
    pub fn subscription_queue(mut self, capacity: usize) -> Self {
        self.config.subscription_queue = capacity.max(1);
        self
    }

    /// Deliveries queued for each [`direct_messages`](Client::direct_messages) receiver
    /// (default 1024).
    pub fn direct_queue(mut self, capacity: usize) -> Self {
        self.direct_queue = capacity.max(1);
        self
    }

    /// Events queued for each [`events`](Client::events) receiver (default 256).
    pub fn events_queue(mut self, capacity: usize) -> Self {
        self.events_queue = capacity.max(1);
        self
    }

    /// Starts the client and returns at once; it connects in the background. Must be called
    /// inside a tokio runtime.
    pub fn build(self) -> Result<Client, Error> {
        for url in &self.config.urls {
            url.as_str()
                .into_client_request()
                .map_err(|e| Error::InvalidUrl {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let TokenSource::Fixed(t) = &self.config.token {
            if t.is_empty() {
                return Err(Error::NoToken);
            }
            if tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&format!("Bearer {t}"))
                .is_err()
            {
                return Err(Error::InvalidToken);
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(self.events_queue);
        let (direct, _) = broadcast::channel(self.direct_queue);
        let (state_tx, state) = watch::channel(State::Connecting);
        let driver = Driver::new(
            self.config.clone(),
            command_rx,
            events.clone(),
            direct.clone(),
            state_tx,
        );
        runtime.spawn(driver.run());
        Ok(Client {
            inner: Arc::new(Inner {
                commands,
                events,
                direct,
                state,
                config: self.config,
            }),
        })
    }

    /// Starts the client and waits for its first connection (through any number of retries;
    /// wrap it in a timeout to bound that). Fails if the client stops first.
    pub async fn connect(self) -> Result<Client, Error> {
        let client = self.build()?;
        client.connected().await?;
        Ok(client)
    }
}

/// Requests from handles to the connection task waiting to be taken.
const COMMAND_QUEUE: usize = 256;

struct Inner {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    direct: broadcast::Sender<Delivery>,
    state: watch::Receiver<State>,
    config: Config,
}

/// A handle to a pushgate connection that keeps itself up. Cheap to clone; the connection
/// closes when the last clone is dropped (or on [`close`](Self::close)).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

static NEXT_SUBSCRIPTION: AtomicU64 = AtomicU64::new(1);

impl Client {
    /// A builder for a client of the node (or load balancer) at `url`, e.g.
    /// `ws://127.0.0.1:8080/ws` or `wss://push.example.com/ws`.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            config: Config {
                urls: vec![url.into()],
                token: TokenSource::Fixed(String::new()),
                tls: None,
                backoff_base: Duration::from_millis(500),
                backoff_max: Duration::from_secs(20),
                stable_after: Duration::from_secs(10),
                going_away_jitter: Duration::from_secs(1),
                heartbeat_grace: Duration::from_secs(10),
                app_ping_interval: None,
                connect_timeout: Duration::from_secs(10),
                request_timeout: Duration::from_secs(10),
                subscription_queue: 1024,
                batch: true,
            },
            direct_queue: 1024,
            events_queue: 256,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.inner.state.borrow().clone()
    }

    /// Waits until the client is connected and returns the connection's welcome; fails if the
    /// client stops first.
    pub async fn connected(&self) -> Result<Session, Error> {
        let mut state = self.inner.state.clone();
        let seen = state
            .wait_for(|s| matches!(s, State::Connected(_) | State::Closed(_)))
            .await
            .map_err(|_| Error::Closed(CloseReason::Closed))?;
        match &*seen {
            State::Connected(session) => Ok(session.clone()),
            State::Closed(reason) => Err(Error::Closed(reason.clone())),
            _ => Err(Error::NotConnected),
        }
    }

    /// Waits until the client has stopped for good and returns why.
    pub async fn closed(&self) -> CloseReason {
        let mut state = self.inner.state.clone();
        let seen = state
            .wait_for(|s| matches!(s, State::Closed(_)))
            .await
            .map(|s| s.clone());
        match seen {
            Ok(State::Closed(reason)) => reason,
            _ => CloseReason::Closed,
        }
    }

    /// A receiver of every [`Event`] from now on. A receiver that falls more than the events
    /// queue behind loses the oldest (`RecvError::Lagged`).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// A receiver of deliveries that are not for a channel: `user`, `session` and `broadcast`
    /// targets. Only deliveries that arrive after the call are received.
    pub fn direct_messages(&self) -> broadcast::Receiver<Delivery> {
        self.inner.direct.subscribe()
    }

    async fn send(&self, command: Command) -> Result<(), Error> {
        if self.inner.commands.send(command).await.is_err() {
            return Err(Error::Closed(self.close_reason()));
        }
        Ok(())
    }

    fn close_reason(&self) -> CloseReason {
        match &*self.inner.state.borrow() {
            State::Closed(reason) => reason.clone(),
            _ => CloseReason::Closed,
        }
    }

    /// Subscribes to `channel`. The channel is held at once (and subscribed again after every
    /// reconnect, from the last position seen on a history channel); this resolves when a node
    /// acknowledges it, waiting through reconnects, or fails if the node refuses it
    /// (`forbidden`, `bad_request`) or the client stops.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(channel, None, None).await
    }

    /// Subscribes to the history channel `channel` from a position the application kept (e.g.
    /// the [`position`](Delivery::position) of the last delivery it stored): the node sends
    /// what came after it, if history still holds it. Whether it did is in
    /// [`Subscription::recovered`] when this returns, and in an [`Event::Recovered`]. Otherwise
    /// as [`subscribe`](Self::subscribe).
    pub async fn subscribe_since(
        &self,
        channel: &str,
        since: Position,
    ) -> Result<Subscription, Error> {
        self.subscribe_inner(channel, Some(since), None).await
    }

    /// Subscribes to the history channel `channel` starting with its last `count` messages
    /// (at most the node's `--history-request-limit`, 100 by default): they arrive first, in
    /// order, then every live message, with no gap and none twice. After a reconnect the
    /// client recovers from the last position seen, as for any subscription, rather than
    /// asking for the last messages again. On a channel without history it is a plain
    /// subscribe. Otherwise as [`subscribe`](Self::subscribe).
    pub async fn subscribe_recent(&self, channel: &str, count: u64) -> Result<Subscription, Error> {
        self.subscribe_inner(channel, None, Some(count)).await
    }

    async fn subscribe_inner(
        &self,
        channel: &str,
        since: Option<Position>,
        recent: Option<u64>,
    ) -> Result<Subscription, Error> {
        pushgate_protocol::validate_channel(channel)
            .map_err(|e| Error::InvalidChannel(e.to_string()))?;
        let (tx, rx) = mpsc::channel(self.inner.config.subscription_queue);
        let (done, reply) = oneshot::channel();
        let key = NEXT_SUBSCRIPTION.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared::default());
        self.send(Command::Subscribe(SubscribeRequest {
            channel: channel.to_owned(),
            key,
            tx,
            shared: shared.clone(),
            since,
            recent,
            done,
        }))
        .await?;
        let mut subscription = Subscription {
            channel: channel.to_owned(),
            key,
            rx,
            commands: self.inner.commands.downgrade(),
            shared,
            active: true,
        };
        match reply.await {
            Ok(Ok(())) => Ok(subscription),
            Ok(Err(e)) => {
                subscription.active = false;
                Err(e)
            }
            Err(_) => {
                subscription.active = false;
                Err(Error::Closed(self.close_reason()))
            }
        }
    }

    async fn request(&self, kind: RequestKind) -> Result<(), Error> {
        let (done, reply) = oneshot::channel();
        self.send(Command::Request { kind, done }).await?;
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, reply).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Ok(Ok(result)) => result,
        }
    }

    /// Publishes `data` (any JSON value) to `channel` and waits for the node's `ack`.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
    ) -> Result<(), Error> {
        pushgate_protocol::validate_channel(channel)
            .map_err(|e| Error::InvalidChannel(e.to_string()))?;
        let data = serde_json::value::to_raw_value(data).map_err(|e| Error::Json(e.to_string()))?;
        self.request(RequestKind::Publish {
            channel: channel.to_owned(),
            data,
        })
        .await
    }

    /// The last `limit` messages of the history channel `channel` (at most the node's
    /// `--history-request-limit`, 100 by default), oldest first, and the channel's position
    /// (`history` request). Needs no subscription, only a token that grants subscribing to the
    /// channel; fails with [`ErrorCode::NotFound`] on a channel without history.
    pub async fn history(&self, channel: &str, limit: u64) -> Result<History, Error> {
        pushgate_protocol::validate_channel(channel)
            .map_err(|e| Error::InvalidChannel(e.to_string()))?;
        let (done, reply) = oneshot::channel();
        self.send(Command::History {
            channel: channel.to_owned(),
            limit,
            done,
        })
        .await?;
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, reply).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Ok(Ok(result)) => result,
        }
    }

    /// Sends a `ping` request and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.request(RequestKind::Ping).await?;
        Ok(start.elapsed())
    }

    /// Replaces the connection's token (`refresh` request). With a fixed token, the new one is
    /// also used for later reconnects.
    pub async fn refresh(&self, token: impl Into<String>) -> Result<(), Error> {
        self.request(RequestKind::Refresh {
            token: token.into(),
        })
        .await
    }

    /// Closes the connection (code 1000) and stops the client; every subscription ends.
    pub async fn close(&self) {
        let (done, reply) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Close { done })
            .await
            .is_ok()
        {
            let _ = reply.await;
        }
        // The close handshake is bounded, so this does not wait long.
        self.closed().await;
    }
}

/// The deliveries of one channel, across reconnects; a [`Stream`]. Ends when the subscription
/// ends: [`unsubscribe`](Self::unsubscribe), the node ending or refusing it, or the client
/// stopping. Dropping it unsubscribes.
pub struct Subscription {
    channel: String,
    key: u64,
    rx: mpsc::Receiver<Delivery>,
    commands: mpsc::WeakSender<Command>,
    shared: Arc<Shared>,
    active: bool,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next delivery, or `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Deliveries dropped because this subscription's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// On a history channel, the position the client would subscribe again from: that of the
    /// last delivery it took in for this subscription (which may still be in the queue, not yet
    /// received), or the channel's position in the node's ack when nothing was delivered since
    /// (after [`subscribe_recent`](Client::subscribe_recent), `count` below it, until the last
    /// messages that follow the ack are taken in). `None` on channels without history (and
    /// before the first ack).
    pub fn position(&self) -> Option<Position> {
        self.shared.history().position.clone()
    }

    /// Whether the last resubscribe (after a reconnect or a `history_lost` notice), or the
    /// [`subscribe_since`](Client::subscribe_since) that made this subscription, got back what
    /// was missed: `Some(false)` means messages were lost (reload the channel's state). `None`
    /// until there was something to recover. [`Event::Recovered`] reports each one.
    pub fn recovered(&self) -> Option<bool> {
        self.shared.history().recovered
    }

    /// Unsubscribes and waits for the node's reply (if connected).
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.active = false;
        let Some(commands) = self.commands.upgrade() else {
            return Ok(());
        };
        let (done, reply) = oneshot::channel();
        let command = Command::Unsubscribe {
            channel: self.channel.clone(),
            key: self.key,
            done: Some(done),
        };
        if commands.send(command).await.is_err() {
            return Ok(());
        }
        reply.await.unwrap_or(Ok(()))
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        // Best effort: if the command queue is full, the connection task notices the closed
        // queue at the next delivery for this channel and unsubscribes then.
        if let Some(commands) = self.commands.upgrade() {
            let _ = commands.try_send(Command::Unsubscribe {
                channel: std::mem::take(&mut self.channel),
                key: self.key,
                done: None,
            });
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("dropped", &self.dropped())
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.inner.config.urls)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}
