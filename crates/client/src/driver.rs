//! The connection task: one per client. It owns the WebSocket, the subscriptions and the
//! requests in flight, and decides when and how to reconnect.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pushgate_protocol::server::{Delivery, Position, ServerFrame, UNSUBSCRIBED_HISTORY_LOST};
use pushgate_protocol::{BATCH_PROTOCOL, ErrorCode, RawJson, close};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::debug;

use crate::backoff::{Backoff, jitter};
use crate::{
    CloseReason, Config, Error, Event, History, Session, Shared, State, TokenSource,
    UnsubscribeCode, UnsubscribeReason,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Done = oneshot::Sender<Result<(), Error>>;

/// Bound on writing one frame; a connection that cannot take a frame for this long is dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close handshake may take before the connection is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// A subscribe the node answered with `unavailable` or `rate_limited` is sent again after a
/// random delay up to this.
const SUBSCRIBE_RETRY: Duration = Duration::from_secs(2);
/// The smallest ping interval the watchdog assumes (the welcome states whole seconds, so a
/// sub-second interval arrives as 0).
const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest response body kept from a refused handshake.
const MAX_REFUSAL_BODY: usize = 512;

pub(crate) enum RequestKind {
    Publish { channel: String, data: Box<RawJson> },
    Ping,
    Refresh { token: String },
}

/// A subscription the application asks for.
pub(crate) struct SubscribeRequest {
    pub channel: String,
    pub key: u64,
    pub tx: mpsc::Sender<Delivery>,
    pub shared: Arc<Shared>,
    /// A position the application kept, to subscribe from.
    pub since: Option<Position>,
    /// Start with the channel's last messages (the first subscribe only).
    pub recent: Option<u64>,
    pub done: Done,
}

pub(crate) enum Command {
    Subscribe(SubscribeRequest),
    Unsubscribe {
        channel: String,
        key: u64,
        done: Option<Done>,
    },
    Request {
        kind: RequestKind,
        done: Done,
    },
    History {
        channel: String,
        limit: u64,
        done: oneshot::Sender<Result<History, Error>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A channel the client holds.
struct Sub {
    key: u64,
    tx: mpsc::Sender<Delivery>,
    shared: Arc<Shared>,
    /// Deliveries are being dropped (queue full); reset by the next one that fits.
    lagging: bool,
    /// Callers of `subscribe` waiting for the first ack.
    waiters: Vec<Done>,
    /// On a history channel: the position of the last delivery taken in, or the ack's position
    /// while nothing was delivered since. Sent as `since` when the subscription is renewed.
    /// Mirrored in `shared` for [`Subscription::position`](crate::Subscription::position).
    position: Option<Position>,
    /// A node has acknowledged this subscription: subscribing again is a resubscribe, which
    /// has something to recover.
    acked: bool,
    /// Start with the channel's last messages: sent as `recent` until the first ack (and
    /// while there is no position); later subscribes recover with `since`.
    recent: Option<u64>,
}

impl Sub {
    /// Takes in the position of a delivery. False if it is a duplicate: in the epoch last seen,
    /// at or below the last offset.
    fn advance(&mut self, offset: u64, epoch: &str) -> bool {
        match &mut self.position {
            Some(seen) if seen.epoch == epoch => {
                if offset <= seen.offset {
                    return false;
                }
                seen.offset = offset;
            }
            _ => {
                self.position = Some(Position {
                    offset,
                    epoch: epoch.to_owned(),
                });
            }
        }
        self.shared.history().position.clone_from(&self.position);
        true
    }

    /// What the next subscribe sends as `recent`: the first one only, before any position.
    fn recent(&self) -> Option<u64> {
        self.recent
            .filter(|_| !self.acked && self.position.is_none())
    }

    /// Takes in the ack of a subscribe sent with `since`, with `recent`, or with neither:
    /// returns what to report as `recovered` (`None` when nothing was to be recovered).
    fn acked(
        &mut self,
        since: Option<&Position>,
        recent: Option<u64>,
        resubscribe: bool,
        position: Option<Position>,
        recovered: Option<bool>,
    ) -> Option<bool> {
        // A resubscribe or a subscribe with `since` had something to recover; an ack without
        // `recovered` (a channel without history) recovered nothing.
        let report = (since.is_some() || resubscribe).then_some(recovered == Some(true));
        if let Some(mut p) = position {
            if let Some(n) = recent {
                // The last messages follow the ack, up to its position: delivery starts before
                // them (any position below the first of them will do).
                p.offset = p.offset.saturating_sub(n);
            }
            let adopt = match (since, report) {
                // What was missed follows: the position moves on with it.
                (Some(_), Some(true)) => false,
                // Not recovered: delivery goes on after the channel's position.
                (Some(_), _) | (None, Some(false)) => true,
                // A plain subscribe: delivery starts after the ack's position, unless
                // deliveries already went past it.
                (None, _) => !self
                    .position
                    .as_ref()
                    .is_some_and(|seen| seen.epoch == p.epoch && seen.offset > p.offset),
            };
            if adopt {
                self.position = Some(p);
            }
        }
        self.acked = true;
        let mut shared = self.shared.history();
        shared.position.clone_from(&self.position);
        if report.is_some() {
            shared.recovered = report;
        }
        report
    }
}

/// What a request in flight was.
enum Pending {
    Subscribe {
        channel: String,
        key: u64,
        /// The `since` sent with it.
        since: Option<Position>,
        /// The `recent` sent with it.
        recent: Option<u64>,
        /// Whether the channel had been acknowledged before.
        resubscribe: bool,
    },
    Unsubscribe {
        done: Option<Done>,
    },
    Request {
        done: Done,
        refresh: Option<String>,
    },
    History {
        done: oneshot::Sender<Result<History, Error>>,
    },
    AppPing,
}

/// Requests as sent on the wire.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request<'a> {
    Subscribe {
        id: u64,
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<&'a Position>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recent: Option<u64>,
    },
    History {
        id: u64,
        channel: &'a str,
        limit: u64,
    },
    Unsubscribe {
        id: u64,
        channel: &'a str,
    },
    Publish {
        id: u64,
        channel: &'a str,
        data: &'a RawJson,
    },
    Ping {
        id: u64,
    },
    Refresh {
        id: u64,
        token: &'a str,
    },
}

fn encode(request: &Request<'_>) -> String {
    // Plain structs of strings and numbers (and raw JSON that is already valid) always serialize.
    serde_json::to_string(request).unwrap_or_default()
}

/// The `subscribe` request for a channel: with `since` when the subscription has a position
/// (a history channel), so that the node sends what was missed; with `recent` the first time,
/// when asked for.
fn subscribe_frame(id: u64, channel: &str, sub: &Sub) -> String {
    encode(&Request::Subscribe {
        id,
        channel,
        since: sub.position.as_ref(),
        recent: sub.recent(),
    })
}

/// How a connection or an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handshake got an HTTP response instead of an upgrade.
    Refused { status: u16, reason: String },
    /// The node sent a close frame.
    Closed { code: u16, reason: String },
    /// Anything else: connect error, I/O error, end without a close frame, silence, timeout.
    Lost(String),
}

/// What to do after an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Reconnect after the next backoff delay.
    Backoff,
    /// Reconnect soon, after a small random delay.
    Soon,
    /// Reconnect only with a different token, after a backoff; otherwise stop with this reason.
    NewTokenOrStop(CloseReason),
    /// Stop.
    Stop(CloseReason),
}

/// The reconnect policy: what each close code and refusal means for a client.
pub(crate) fn next_step(outcome: &Outcome, fixed_token: bool) -> Next {
    match outcome {
        Outcome::Closed { code, .. } if *code == close::GOING_AWAY => Next::Soon,
        Outcome::Closed { code, .. } if *code == close::TOKEN_EXPIRED => {
            if fixed_token {
                Next::Stop(CloseReason::TokenExpired)
            } else {
                Next::Soon
            }
        }
        Outcome::Closed { code, reason } if *code == close::DISCONNECTED => {
            let reason = CloseReason::Disconnected {
                reason: reason.clone(),
            };
            if fixed_token {
                Next::Stop(reason)
            } else {
                Next::NewTokenOrStop(reason)
            }
        }
        Outcome::Refused { status, reason } if *status == 401 || *status == 403 => {
            let reason = CloseReason::Unauthorized {
                status: *status,
                reason: reason.clone(),
            };
            if fixed_token {
                Next::Stop(reason)
            } else {
                Next::NewTokenOrStop(reason)
            }
        }
        _ => Next::Backoff,
    }
}

/// The connection task's state.
pub(crate) struct Driver {
    config: Config,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<Event>,
    direct: broadcast::Sender<Delivery>,
    state: watch::Sender<State>,
    subs: HashMap<String, Sub>,
    backoff: Backoff,
    /// Index into `config.urls` of the next attempt.
    url: usize,
    /// The token of the last attempt.
    last_token: Option<String>,
    /// A token already fetched for the next attempt.
    next_token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    next_id: u64,
    /// The node of the current connection sends batches: several frames per text message, one
    /// per line (subprotocol `pushgate.batch`).
    batched: bool,
}

/// The client was asked to stop while the task waited for something else.
struct Stopped(CloseReason);

impl Driver {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<Event>,
        direct: broadcast::Sender<Delivery>,
        state: watch::Sender<State>,
    ) -> Self {
        Self {
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            tls: config.tls.clone(),
            config,
            commands,
            events,
            direct,
            state,
            subs: HashMap::new(),
            url: 0,
            last_token: None,
            next_token: None,
            next_id: 1,
            batched: false,
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn set_state(&self, state: State) {
        self.state.send_replace(state);
    }

    fn fixed_token(&self) -> bool {
        matches!(self.config.token, TokenSource::Fixed(_))
    }

    pub(crate) async fn run(mut self) {
        let reason = loop {
            let next = match self.attempt().await {
                Ok(next) => next,
                Err(Stopped(reason)) => break reason,
            };
            if let Err(Stopped(reason)) = self.pause(next).await {
                break reason;
            }
        };
        for (_, sub) in self.subs.drain() {
            for waiter in sub.waiters {
                let _ = waiter.send(Err(Error::Closed(reason.clone())));
            }
        }
        debug!(%reason, "pushgate client stopped");
        self.set_state(State::Closed(reason.clone()));
        self.emit(Event::Closed(reason));
    }

    /// One connection attempt and, if it succeeds, the connection's life. Returns what to do
    /// next.
    async fn attempt(&mut self) -> Result<Next, Stopped> {
        let token = match self.next_token.take() {
            Some(token) => token,
            None => match self.fetch_token().await? {
                Ok(token) => token,
                Err(reason) => {
                    self.emit(Event::ConnectFailed {
                        status: None,
                        reason,
                    });
                    return Ok(Next::Backoff);
                }
            },
        };
        self.last_token = Some(token.clone());
        let url = self.config.urls[self.url % self.config.urls.len()].clone();
        self.url = (self.url + 1) % self.config.urls.len();
        self.set_state(State::Connecting);
        self.emit(Event::Connecting { url: url.clone() });
        let connector = match self.connector(&url) {
            Ok(c) => c,
            Err(e) => {
                self.emit(Event::ConnectFailed {
                    status: None,
                    reason: e.to_string(),
                });
                return Ok(Next::Backoff);
            }
        };
        let (limit, batch) = (self.config.connect_timeout, self.config.batch);
        let opening = open(url.clone(), token, connector, limit, batch);
        let (ws, session) = match self.offline(opening).await? {
            Ok((ws, session, batched)) => {
                self.batched = batched;
                (ws, session)
            }
            Err(outcome) => {
                let (status, reason) = match &outcome {
                    Outcome::Refused { status, reason } => (Some(*status), reason.clone()),
                    Outcome::Closed { code, reason } => (None, format!("closed {code} {reason}")),
                    Outcome::Lost(reason) => (None, reason.clone()),
                };
                debug!(%url, ?status, %reason, "pushgate connect failed");
                self.emit(Event::ConnectFailed { status, reason });
                return Ok(next_step(&outcome, self.fixed_token()));
            }
        };
        debug!(%url, node = %session.node, session = %session.session, "pushgate connected");
        let since = Instant::now();
        self.set_state(State::Connected(session.clone()));
        self.emit(Event::Connected(session.clone()));
        let outcome = self.connected(ws, &session).await?;
        if since.elapsed() >= self.config.stable_after {
            self.backoff.reset();
        }
        let (code, reason) = match &outcome {
            Outcome::Closed { code, reason } => (Some(*code), reason.clone()),
            Outcome::Refused { reason, .. } | Outcome::Lost(reason) => (None, reason.clone()),
        };
        debug!(?code, %reason, "pushgate disconnected");
        self.emit(Event::Disconnected { code, reason });
        Ok(next_step(&outcome, self.fixed_token()))
    }

    /// Waits before the next attempt as `next` says, or stops.
    async fn pause(&mut self, next: Next) -> Result<(), Stopped> {
        let delay = match next {
            Next::Stop(reason) => return Err(Stopped(reason)),
            // At once the first time; a node that keeps sending clients away before their
            // connection is stable gets them back off like any other failure.
            Next::Soon if self.backoff.attempt() == 0 => {
                self.backoff.next_delay();
                jitter(self.config.going_away_jitter)
            }
            Next::Soon | Next::Backoff => self.backoff.next_delay(),
            Next::NewTokenOrStop(reason) => {
                match self.fetch_token().await? {
                    Ok(token) if Some(&token) != self.last_token.as_ref() => {
                        self.next_token = Some(token);
                    }
                    Ok(_) => return Err(Stopped(reason)),
                    // The token service may be down for a moment: the next attempt asks again,
                    // and stops if the same token is refused once more.
                    Err(e) => {
                        debug!(error = %e, "pushgate token source failed");
                    }
                }
                self.backoff.next_delay()
            }
        };
        self.set_state(State::Reconnecting);
        self.emit(Event::Reconnecting {
            delay,
            attempt: self.backoff.attempt(),
        });
        self.offline(tokio::time::sleep(delay)).await
    }

    /// A token for the next attempt (`Err` inside: the source failed, with why).
    async fn fetch_token(&mut self) -> Result<Result<String, String>, Stopped> {
        let source = match &self.config.token {
            TokenSource::Fixed(token) => return Ok(Ok(token.clone())),
            TokenSource::Source(source) => source.clone(),
        };
        let limit = self.config.connect_timeout;
        let fetch = tokio::time::timeout(limit, source());
        Ok(match self.offline(fetch).await? {
            Ok(Ok(token)) => Ok(token),
            Ok(Err(e)) => Err(format!("token source: {e}")),
            Err(_) => Err(format!("token source: no token within {limit:?}")),
        })
    }

    fn connector(&mut self, url: &str) -> Result<Connector, Error> {
        if !url
            .get(..4)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("wss:"))
        {
            return Ok(Connector::Plain);
        }
        let config = match &self.tls {
            Some(config) => config.clone(),
            None => {
                let config = crate::tls::default_config()?;
                self.tls = Some(config.clone());
                config
            }
        };
        Ok(Connector::Rustls(config))
    }

    /// Runs `fut` while serving commands that need no connection.
    async fn offline<F: Future>(&mut self, fut: F) -> Result<F::Output, Stopped> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                command = self.commands.recv() => match command {
                    None => return Err(Stopped(CloseReason::Closed)),
                    Some(Command::Close { done }) => {
                        let _ = done.send(());
                        return Err(Stopped(CloseReason::Closed));
                    }
                    Some(Command::Request { done, .. }) => {
                        let _ = done.send(Err(Error::NotConnected));
                    }
                    Some(Command::History { done, .. }) => {
                        let _ = done.send(Err(Error::NotConnected));
                    }
                    Some(Command::Subscribe(request)) => {
                        self.add_sub(request);
                    }
                    Some(Command::Unsubscribe { channel, key, done }) => {
                        self.remove_sub(&channel, key);
                        if let Some(done) = done {
                            let _ = done.send(Ok(()));
                        }
                    }
                },
            }
        }
    }

    /// Registers a subscription; false if the channel is already held.
    fn add_sub(&mut self, request: SubscribeRequest) -> bool {
        let SubscribeRequest {
            channel,
            key,
            tx,
            shared,
            since,
            recent,
            done,
        } = request;
        if let Some(existing) = self.subs.get(&channel)
            && !existing.tx.is_closed()
        {
            let _ = done.send(Err(Error::AlreadySubscribed(channel)));
            return false;
        }
        self.subs.insert(
            channel,
            Sub {
                key,
                tx,
                shared,
                lagging: false,
                waiters: vec![done],
                position: since,
                acked: false,
                recent,
            },
        );
        true
    }

    /// Forgets a subscription if it is still the one `key` names; true if it was.
    fn remove_sub(&mut self, channel: &str, key: u64) -> bool {
        if self.subs.get(channel).is_some_and(|s| s.key == key) {
            self.subs.remove(channel);
            true
        } else {
            false
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Serves an open connection until it ends.
    async fn connected(&mut self, mut ws: Ws, session: &Session) -> Result<Outcome, Stopped> {
        let mut pending = HashMap::new();
        let result = self.serve(&mut ws, session, &mut pending).await;
        for (_, p) in pending {
            match p {
                Pending::Request { done, .. } => {
                    let _ = done.send(Err(Error::ConnectionLost));
                }
                Pending::History { done } => {
                    let _ = done.send(Err(Error::ConnectionLost));
                }
                Pending::Unsubscribe { done: Some(done) } => {
                    let _ = done.send(Ok(()));
                }
                _ => {}
            }
        }
        if let Err(Stopped(_)) = &result {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
            drain(&mut ws).await;
        }
        result
    }

    async fn serve(
        &mut self,
        ws: &mut Ws,
        session: &Session,
        pending: &mut HashMap<u64, Pending>,
    ) -> Result<Outcome, Stopped> {
        let silence_limit =
            session.ping_interval.max(MIN_PING_INTERVAL) + self.config.heartbeat_grace;
        let mut last_heard = Instant::now();
        let mut app_ping = self.config.app_ping_interval.map(|every| {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut retry: Vec<String> = Vec::new();
        let mut retry_at: Option<Instant> = None;

        // Everything held is subscribed again on the new connection.
        self.subs
            .retain(|_, s| !s.tx.is_closed() || !s.waiters.is_empty());
        let channels: Vec<String> = self.subs.keys().cloned().collect();
        for channel in channels {
            if let Err(outcome) = self.send_subscribe(ws, pending, &channel).await {
                return Ok(outcome);
            }
        }

        loop {
            let watchdog = tokio::time::sleep_until(last_heard + silence_limit);
            let retry_due = retry_at;
            let retry_timer = async move {
                match retry_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let ping_tick = async {
                match app_ping.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            let step: Result<(), Outcome> = tokio::select! {
                message = ws.next() => match message {
                    None => Err(Outcome::Lost("connection ended without a close frame".into())),
                    Some(Err(e)) => Err(Outcome::Lost(e.to_string())),
                    Some(Ok(message)) => {
                        last_heard = Instant::now();
                        match message {
                            Message::Text(text) if self.batched => {
                                let mut handled = Ok(());
                                for line in text.split('\n') {
                                    handled = self.on_frame(ws, pending, line, &mut retry, &mut retry_at).await;
                                    if handled.is_err() {
                                        break;
                                    }
                                }
                                handled
                            }
                            Message::Text(text) => self.on_frame(ws, pending, &text, &mut retry, &mut retry_at).await,
                            Message::Close(frame) => {
                                let (code, reason) = frame
                                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                                    .unwrap_or((close::NORMAL, String::new()));
                                drain(ws).await;
                                Err(Outcome::Closed { code, reason })
                            }
                            // Pings are answered by the WebSocket layer; binary frames are not
                            // part of the protocol.
                            _ => Ok(()),
                        }
                    }
                },
                command = self.commands.recv() => match command {
                    None => return Err(Stopped(CloseReason::Closed)),
                    Some(Command::Close { done }) => {
                        let _ = done.send(());
                        return Err(Stopped(CloseReason::Closed));
                    }
                    Some(command) => self.on_command(ws, pending, command).await,
                },
                () = watchdog => Err(Outcome::Lost(format!(
                    "heartbeat timeout: nothing from the node for {silence_limit:?}"
                ))),
                () = retry_timer => {
                    retry_at = None;
                    let mut result = Ok(());
                    for channel in std::mem::take(&mut retry) {
                        if self.subs.contains_key(&channel) {
                            result = self.send_subscribe(ws, pending, &channel).await;
                            if result.is_err() {
                                break;
                            }
                        }
                    }
                    result
                }
                _ = ping_tick => {
                    let id = self.take_id();
                    pending.insert(id, Pending::AppPing);
                    send(ws, encode(&Request::Ping { id })).await
                }
            };
            if let Err(outcome) = step {
                return Ok(outcome);
            }
        }
    }

    async fn send_subscribe(
        &mut self,
        ws: &mut Ws,
        pending: &mut HashMap<u64, Pending>,
        channel: &str,
    ) -> Result<(), Outcome> {
        let id = self.take_id();
        let Some(sub) = self.subs.get(channel) else {
            return Ok(());
        };
        let frame = subscribe_frame(id, channel, sub);
        pending.insert(
            id,
            Pending::Subscribe {
                channel: channel.to_owned(),
                key: sub.key,
                since: sub.position.clone(),
                recent: sub.recent(),
                resubscribe: sub.acked,
            },
        );
        send(ws, frame).await
    }

    async fn on_command(
        &mut self,
        ws: &mut Ws,
        pending: &mut HashMap<u64, Pending>,
        command: Command,
    ) -> Result<(), Outcome> {
        match command {
            Command::Subscribe(request) => {
                let channel = request.channel.clone();
                if self.add_sub(request) {
                    self.send_subscribe(ws, pending, &channel).await?;
                }
                Ok(())
            }
            Command::Unsubscribe { channel, key, done } => {
                if !self.remove_sub(&channel, key) {
                    if let Some(done) = done {
                        let _ = done.send(Ok(()));
                    }
                    return Ok(());
                }
                let id = self.take_id();
                pending.insert(id, Pending::Unsubscribe { done });
                send(
                    ws,
                    encode(&Request::Unsubscribe {
                        id,
                        channel: &channel,
                    }),
                )
                .await
            }
            Command::Request { kind, done } => {
                let id = self.take_id();
                let (frame, refresh) = match &kind {
                    RequestKind::Publish { channel, data } => {
                        (encode(&Request::Publish { id, channel, data }), None)
                    }
                    RequestKind::Ping => (encode(&Request::Ping { id }), None),
                    RequestKind::Refresh { token } => {
                        (encode(&Request::Refresh { id, token }), Some(token.clone()))
                    }
                };
                pending.insert(id, Pending::Request { done, refresh });
                send(ws, frame).await
            }
            Command::History {
                channel,
                limit,
                done,
            } => {
                let id = self.take_id();
                pending.insert(id, Pending::History { done });
                let frame = encode(&Request::History {
                    id,
                    channel: &channel,
                    limit,
                });
                send(ws, frame).await
            }
            Command::Close { done } => {
                // Handled by the caller; never reaches here.
                let _ = done.send(());
                Ok(())
            }
        }
    }

    async fn on_frame(
        &mut self,
        ws: &mut Ws,
        pending: &mut HashMap<u64, Pending>,
        text: &str,
        retry: &mut Vec<String>,
        retry_at: &mut Option<Instant>,
    ) -> Result<(), Outcome> {
        let frame = match ServerFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                // Newer nodes may send frames this client does not know: skip them.
                debug!(error = %e, "pushgate: skipping an unknown frame");
                return Ok(());
            }
        };
        match frame {
            ServerFrame::Message(delivery) => {
                self.deliver(ws, pending, delivery).await?;
            }
            ServerFrame::Ack {
                id,
                position,
                recovered,
            } => match pending.remove(&id) {
                Some(Pending::Subscribe {
                    channel,
                    key,
                    since,
                    recent,
                    resubscribe,
                }) => {
                    let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.key == key) else {
                        return Ok(());
                    };
                    // Before the waiters hear of it, so that a new Subscription already shows
                    // its position.
                    let recovered =
                        sub.acked(since.as_ref(), recent, resubscribe, position, recovered);
                    for waiter in sub.waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                    if sub.tx.is_closed() {
                        // The caller gave up before the ack.
                        self.subs.remove(&channel);
                        return self.send_unsubscribe(ws, pending, &channel).await;
                    }
                    let position = sub.position.clone();
                    if let Some(recovered) = recovered {
                        debug!(%channel, recovered, ?position, "pushgate resubscribed");
                    }
                    self.emit(Event::Subscribed {
                        channel: channel.clone(),
                    });
                    if let Some(recovered) = recovered {
                        self.emit(Event::Recovered {
                            channel,
                            recovered,
                            position,
                        });
                    }
                }
                other => self.on_reply(other),
            },
            ServerFrame::Pong { id } => {
                let reply = pending.remove(&id);
                self.on_reply(reply);
            }
            ServerFrame::History {
                id,
                channel,
                position,
                messages,
            } => {
                if let Some(Pending::History { done }) = pending.remove(&id) {
                    let _ = done.send(Ok(History {
                        channel,
                        position,
                        messages,
                    }));
                }
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } if pending.contains_key(&id) => match pending.remove(&id) {
                Some(Pending::Subscribe { channel, key, .. }) => {
                    if self.subs.get(&channel).is_none_or(|s| s.key != key) {
                        return Ok(());
                    }
                    if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
                        retry.push(channel);
                        retry_at.get_or_insert_with(|| Instant::now() + jitter(SUBSCRIBE_RETRY));
                        return Ok(());
                    }
                    if let Some(sub) = self.subs.remove(&channel) {
                        let error = Error::Rejected {
                            code,
                            message: message.clone(),
                        };
                        for waiter in sub.waiters {
                            let _ = waiter.send(Err(error.clone()));
                        }
                    }
                    self.emit(Event::SubscribeFailed {
                        channel,
                        code,
                        message,
                    });
                }
                Some(Pending::Unsubscribe { done: Some(done) }) => {
                    // `not_found`: it is not subscribed, which is what was asked.
                    let _ = done.send(Ok(()));
                }
                Some(Pending::Request { done, .. }) => {
                    let _ = done.send(Err(Error::Rejected { code, message }));
                }
                Some(Pending::History { done }) => {
                    let _ = done.send(Err(Error::Rejected { code, message }));
                }
                _ => {}
            },
            ServerFrame::Error { code, message, .. } => {
                self.emit(Event::ServerError { code, message });
            }
            ServerFrame::Unsubscribed {
                channel,
                code,
                reason,
            } => {
                if code.as_deref() == Some(UNSUBSCRIBED_HISTORY_LOST) {
                    // Messages were missed that history no longer holds: subscribe again from
                    // the last position; the ack says what could be recovered.
                    let Some(sub) = self.subs.get(&channel) else {
                        return Ok(());
                    };
                    if sub.tx.is_closed() {
                        self.subs.remove(&channel);
                        return Ok(());
                    }
                    debug!(%channel, position = ?sub.position, "pushgate: history lost, subscribing again");
                    return self.send_subscribe(ws, pending, &channel).await;
                }
                let Some(sub) = self.subs.remove(&channel) else {
                    return Ok(());
                };
                let reason = UnsubscribeReason {
                    code: UnsubscribeCode::from_wire(code),
                    message: reason,
                };
                // A subscribe still waiting for its first ack fails with the notice's text
                // (`revoked`: as it would have been refused under the new token).
                for waiter in sub.waiters {
                    let _ = waiter.send(Err(Error::Rejected {
                        code: ErrorCode::Forbidden,
                        message: reason.message.clone(),
                    }));
                }
                self.emit(Event::Unsubscribed { channel, reason });
            }
            // Joins and leaves of presence-events channels: reported while subscribed.
            ServerFrame::Join(event) => {
                if self.subs.contains_key(&event.channel) {
                    self.emit(Event::Join(event));
                }
            }
            ServerFrame::Leave(event) => {
                if self.subs.contains_key(&event.channel) {
                    self.emit(Event::Leave(event));
                }
            }
            ServerFrame::Welcome { .. } | ServerFrame::Presence { .. } => {}
        }
        Ok(())
    }

    /// A successful reply to a request that is not a subscribe.
    fn on_reply(&mut self, pending: Option<Pending>) {
        match pending {
            Some(Pending::Unsubscribe { done: Some(done) }) => {
                let _ = done.send(Ok(()));
            }
            Some(Pending::Request { done, refresh }) => {
                if let (Some(token), TokenSource::Fixed(fixed)) = (refresh, &mut self.config.token)
                {
                    *fixed = token;
                }
                let _ = done.send(Ok(()));
            }
            _ => {}
        }
    }

    async fn send_unsubscribe(
        &mut self,
        ws: &mut Ws,
        pending: &mut HashMap<u64, Pending>,
        channel: &str,
    ) -> Result<(), Outcome> {
        let id = self.take_id();
        pending.insert(id, Pending::Unsubscribe { done: None });
        send(ws, encode(&Request::Unsubscribe { id, channel })).await
    }

    async fn deliver(
        &mut self,
        ws: &mut Ws,
        pending: &mut HashMap<u64, Pending>,
        delivery: Delivery,
    ) -> Result<(), Outcome> {
        let Some(channel) = delivery.channel.clone() else {
            // No receiver is fine: nobody asked for direct messages. Slow receivers see
            // `RecvError::Lagged` themselves.
            let _ = self.direct.send(delivery);
            return Ok(());
        };
        let Some(sub) = self.subs.get_mut(&channel) else {
            // In flight when we unsubscribed.
            return Ok(());
        };
        if let (Some(offset), Some(epoch)) = (delivery.offset, delivery.epoch.as_deref())
            && !sub.advance(offset, epoch)
        {
            debug!(%channel, offset, epoch, "pushgate: dropping a delivery already seen");
            return Ok(());
        }
        match sub.tx.try_send(delivery) {
            Ok(()) => sub.lagging = false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = sub.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if !sub.lagging {
                    sub.lagging = true;
                    self.emit(Event::Lagged { channel, dropped });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The Subscription was dropped and its unsubscribe did not get through.
                self.subs.remove(&channel);
                return self.send_unsubscribe(ws, pending, &channel).await;
            }
        }
        Ok(())
    }
}

async fn send(ws: &mut Ws, text: String) -> Result<(), Outcome> {
    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Outcome::Lost(format!("write: {e}"))),
        Err(_) => Err(Outcome::Lost(format!(
            "write: blocked for {WRITE_TIMEOUT:?}"
        ))),
    }
}

/// Reads until the end (bounded), so that the close handshake completes.
async fn drain(ws: &mut Ws) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Opens a connection and reads the welcome; also says whether the node sends batches.
async fn open(
    url: String,
    token: String,
    connector: Connector,
    limit: Duration,
    batch: bool,
) -> Result<(Ws, Session, bool), Outcome> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Outcome::Lost(format!("invalid URL: {e}")))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| Outcome::Refused {
            // Treated like a refusal: this token can never work, only another one can.
            status: 401,
            reason: "the token is not a valid HTTP header value (not sent)".into(),
        })?;
    request.headers_mut().insert("authorization", bearer);
    if batch {
        (request.headers_mut()).insert(
            "sec-websocket-protocol",
            tungstenite::http::HeaderValue::from_static(BATCH_PROTOCOL),
        );
    }
    let opening = async {
        let (mut ws, response) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(response) => Outcome::Refused {
                        status: response.status().as_u16(),
                        reason: refusal_reason(response.body().as_deref()),
                    },
                    other => Outcome::Lost(other.to_string()),
                })?;
        let batched = (response.headers().get("sec-websocket-protocol"))
            .is_some_and(|p| p.as_bytes() == BATCH_PROTOCOL.as_bytes());
        loop {
            match ws.next().await {
                None => return Err(Outcome::Lost("connection ended before the welcome".into())),
                Some(Err(e)) => return Err(Outcome::Lost(e.to_string())),
                Some(Ok(Message::Text(text))) => match ServerFrame::decode(&text) {
                    Ok(ServerFrame::Welcome {
                        session,
                        user,
                        node,
                        ping_interval,
                    }) => {
                        let session = Session {
                            session,
                            user,
                            node,
                            ping_interval: Duration::from_secs(ping_interval),
                            url: url.clone(),
                        };
                        return Ok((ws, session, batched));
                    }
                    _ => {
                        return Err(Outcome::Lost(format!(
                            "expected a welcome, got {}",
                            truncate(&text, 200)
                        )));
                    }
                },
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((close::NORMAL, String::new()));
                    drain(&mut ws).await;
                    return Err(Outcome::Closed { code, reason });
                }
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(limit, opening)
        .await
        .unwrap_or_else(|_| Err(Outcome::Lost(format!("no welcome within {limit:?}"))))
}

/// The `reason` of a pushgate refusal body (`{"error":…,"reason":…}`), or the body as text.
fn refusal_reason(body: Option<&[u8]>) -> String {
    let Some(body) = body else {
        return String::new();
    };
    #[derive(serde::Deserialize)]
    struct Refusal {
        reason: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(r) => r.reason,
        Err(_) => truncate(&String::from_utf8_lossy(body), MAX_REFUSAL_BODY).to_owned(),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: u16) -> Outcome {
        Outcome::Closed {
            code,
            reason: close::reason(code).into(),
        }
    }

    #[test]
    fn close_codes_map_to_the_documented_behaviour() {
        for fixed in [true, false] {
            assert_eq!(next_step(&closed(1001), fixed), Next::Soon);
            for code in [1000, 1008, 1009, 1011, 4008, 4009, 4999, 3000] {
                assert_eq!(next_step(&closed(code), fixed), Next::Backoff, "{code}");
            }
            assert_eq!(next_step(&Outcome::Lost("x".into()), fixed), Next::Backoff);
            for status in [400, 404, 429, 500, 502, 503] {
                let refused = Outcome::Refused {
                    status,
                    reason: String::new(),
                };
                assert_eq!(next_step(&refused, fixed), Next::Backoff, "{status}");
            }
        }
        let disconnected = CloseReason::Disconnected {
            reason: "disconnected by server".into(),
        };
        assert_eq!(
            next_step(&closed(4003), true),
            Next::Stop(disconnected.clone())
        );
        assert_eq!(
            next_step(&closed(4003), false),
            Next::NewTokenOrStop(disconnected)
        );
        assert_eq!(
            next_step(&closed(4001), true),
            Next::Stop(CloseReason::TokenExpired)
        );
        assert_eq!(next_step(&closed(4001), false), Next::Soon);
        let refused = Outcome::Refused {
            status: 401,
            reason: "token expired".into(),
        };
        let unauthorized = CloseReason::Unauthorized {
            status: 401,
            reason: "token expired".into(),
        };
        assert_eq!(next_step(&refused, true), Next::Stop(unauthorized.clone()));
        assert_eq!(
            next_step(&refused, false),
            Next::NewTokenOrStop(unauthorized)
        );
    }

    fn sub(since: Option<Position>) -> Sub {
        let (tx, _) = mpsc::channel(1);
        Sub {
            key: 1,
            tx,
            shared: Arc::new(Shared::default()),
            lagging: false,
            waiters: Vec::new(),
            position: since,
            acked: false,
            recent: None,
        }
    }

    fn at(offset: u64, epoch: &str) -> Position {
        Position {
            offset,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn deliveries_at_or_below_the_last_offset_of_the_epoch_are_duplicates() {
        let mut s = sub(None);
        assert!(s.advance(3, "e1"));
        assert!(!s.advance(3, "e1"), "the same offset again");
        assert!(!s.advance(2, "e1"), "an older one");
        assert!(
            s.advance(5, "e1"),
            "a gap is the node's business, not a duplicate"
        );
        assert_eq!(s.position, Some(at(5, "e1")));
        // A new epoch restarts the offsets.
        assert!(s.advance(1, "e2"));
        assert!(!s.advance(1, "e2"));
        assert_eq!(s.position, Some(at(1, "e2")));
        assert_eq!(s.shared.history().position, Some(at(1, "e2")));
    }

    #[test]
    fn acks_set_the_position_and_what_to_report() {
        // First subscribe: the ack's position, nothing to report.
        let mut s = sub(None);
        assert_eq!(s.acked(None, None, false, Some(at(41, "e1")), None), None);
        assert_eq!(s.position, Some(at(41, "e1")));
        // Deliveries that went past the ack's position keep theirs.
        let mut s = sub(None);
        assert!(s.advance(43, "e1"));
        assert_eq!(s.acked(None, None, false, Some(at(41, "e1")), None), None);
        assert_eq!(s.position, Some(at(43, "e1")));

        // Recovered: the missed messages follow, the position moves on with them.
        let mut s = sub(Some(at(38, "e1")));
        assert_eq!(
            s.acked(
                Some(&at(38, "e1")),
                None,
                true,
                Some(at(41, "e1")),
                Some(true)
            ),
            Some(true)
        );
        assert_eq!(s.position, Some(at(38, "e1")));
        assert_eq!(s.shared.history().recovered, Some(true));
        assert!(s.advance(39, "e1"));

        // Not recovered: delivery goes on after the channel's position.
        let mut s = sub(Some(at(38, "e1")));
        assert_eq!(
            s.acked(
                Some(&at(38, "e1")),
                None,
                true,
                Some(at(2, "e2")),
                Some(false)
            ),
            Some(false)
        );
        assert_eq!(s.position, Some(at(2, "e2")));
        assert_eq!(s.shared.history().position, Some(at(2, "e2")));
        assert_eq!(s.shared.history().recovered, Some(false));
        assert!(s.acked, "later subscribes are resubscribes");

        // A channel without history recovers nothing on a resubscribe.
        let mut s = sub(None);
        assert_eq!(s.acked(None, None, true, None, None), Some(false));
        assert_eq!(s.position, None);
    }

    #[test]
    fn recent_is_sent_once_and_its_backlog_is_not_a_duplicate() {
        let mut s = sub(None);
        s.recent = Some(50);
        assert_eq!(s.recent(), Some(50));
        assert_eq!(
            subscribe_frame(1, "chat:1", &s),
            r#"{"type":"subscribe","id":1,"channel":"chat:1","recent":50}"#
        );
        // The ack's position is the last of the messages that follow it: each passes.
        assert_eq!(
            s.acked(None, Some(50), false, Some(at(120, "e1")), None),
            None
        );
        assert_eq!(s.position, Some(at(70, "e1")));
        assert!((71..=120).all(|o| s.advance(o, "e1")));
        assert!(!s.advance(120, "e1"));
        // Later subscribes recover from the last position instead.
        assert_eq!(s.recent(), None);
        assert_eq!(
            subscribe_frame(2, "chat:1", &s),
            r#"{"type":"subscribe","id":2,"channel":"chat:1","since":{"offset":120,"epoch":"e1"}}"#
        );
        // Fewer messages than asked for.
        let mut s = sub(None);
        s.recent = Some(50);
        s.acked(None, Some(50), false, Some(at(3, "e1")), None);
        assert_eq!(s.position, Some(at(0, "e1")));
        assert!(s.advance(1, "e1"));
        // A position the application gave wins over recent.
        let mut s = sub(Some(at(5, "e1")));
        s.recent = Some(50);
        assert_eq!(s.recent(), None);
    }

    #[test]
    fn refusal_bodies_are_read_leniently() {
        assert_eq!(
            refusal_reason(Some(
                br#"{"error":"unauthorized","reason":"invalid signature"}"#
            )),
            "invalid signature"
        );
        assert_eq!(refusal_reason(Some(b"Bad Gateway")), "Bad Gateway");
        assert_eq!(refusal_reason(None), "");
        let long = "é".repeat(600);
        assert!(refusal_reason(Some(long.as_bytes())).len() <= MAX_REFUSAL_BODY);
    }

    #[test]
    fn requests_encode_as_the_protocol_says() {
        let data = RawJson::from_string(r#"{"a":[1, 2]}"#.into()).unwrap();
        assert_eq!(
            encode(&Request::Publish {
                id: 3,
                channel: "c",
                data: &data
            }),
            r#"{"type":"publish","id":3,"channel":"c","data":{"a":[1, 2]}}"#
        );
        assert_eq!(
            encode(&Request::Subscribe {
                id: 1,
                channel: "room:1",
                since: None,
                recent: None
            }),
            r#"{"type":"subscribe","id":1,"channel":"room:1"}"#
        );
        let since = Position {
            offset: 41,
            epoch: "9f86d081884c7d65".into(),
        };
        let text = encode(&Request::Subscribe {
            id: 2,
            channel: "chat:1",
            since: Some(&since),
            recent: None,
        });
        assert_eq!(
            text,
            r#"{"type":"subscribe","id":2,"channel":"chat:1","since":{"offset":41,"epoch":"9f86d081884c7d65"}}"#
        );
        match pushgate_protocol::ClientFrame::decode(&text).unwrap() {
            pushgate_protocol::ClientFrame::Subscribe { since: Some(s), .. } => {
                assert_eq!((s.offset, s.epoch.as_ref()), (41, "9f86d081884c7d65"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            encode(&Request::Ping { id: 4 }),
            r#"{"type":"ping","id":4}"#
        );
        for text in [
            encode(&Request::Unsubscribe {
                id: 2,
                channel: "x",
            }),
            encode(&Request::Refresh { id: 5, token: "t" }),
            encode(&Request::History {
                id: 6,
                channel: "chat:1",
                limit: 50,
            }),
        ] {
            pushgate_protocol::ClientFrame::decode(&text).unwrap();
        }
    }
}
