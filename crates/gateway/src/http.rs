//! HTTP: the WebSocket handshake (`/ws`, `/echo`), the server API (`/api/*`) and its admin
//! console (`/admin`), health and metrics.
//!
//! The client-facing routes (`/ws`, `/sse`, `/pushgate.js`, and `/dev/token` when origins are
//! listed) answer CORS requests from the origins `--allowed-origins` allows; see
//! `client_routes`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pushgate_protocol::{RawJson, Target, close, validate_user};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowCredentials, AllowOrigin, CorsLayer};
use tracing::{debug, warn};

use crate::auth::{AuthError, Grant};
use crate::broker::BrokerError;
use crate::hub::Frame;
use crate::node::{Admission, Node, Outgoing, Refusal, TOP_CHANNELS, parse_session_id};
use crate::session;
use crate::ws::{self, CloseFrame, Message};

/// How long `/echo` waits to deliver its close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of the HTTP layer, each with its status and a JSON body
/// `{"error": "...", "reason": "...", "field": "..."}`.
#[derive(Debug)]
pub enum HttpError {
    Unauthorized(AuthError),
    BadApiKey,
    Origin,
    Draining,
    /// The node cannot reach the broker while other nodes can.
    Isolated,
    /// A history message was published without the replicas `--history-min-replicas` asks.
    NotReplicated(String),
    Refused(Refusal),
    NotWebSocket(ws::NotWebSocket),
    BadRequest {
        field: Option<String>,
        reason: String,
    },
    Unavailable,
    /// The request's headers add up to more than `--max-header-bytes`.
    HeadersTooLarge {
        size: usize,
        limit: usize,
    },
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let by_origin = matches!(self, Self::Origin);
        let (status, error, reason, field) = match self {
            Self::Unauthorized(e) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                e.to_string(),
                None,
            ),
            Self::BadApiKey => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid API key".into(),
                None,
            ),
            Self::Origin => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "origin not allowed".into(),
                None,
            ),
            Self::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "node is draining; connect to another node".into(),
                None,
            ),
            Self::NotReplicated(reason) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason, None)
            }
            Self::Isolated => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "node cannot reach the other nodes; connect to another node".into(),
                None,
            ),
            Self::Refused(Refusal::NodeFull) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "node is at its connection limit".into(),
                None,
            ),
            Self::Refused(Refusal::TooManyFromIp) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connections from this address".into(),
                None,
            ),
            Self::NotWebSocket(r) => return r.into_response(),
            Self::BadRequest { field, reason } => {
                (StatusCode::BAD_REQUEST, "bad_request", reason, field)
            }
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "broker unavailable; retry later".into(),
                None,
            ),
            Self::HeadersTooLarge { size, limit } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too_large",
                format!("request headers are {size} bytes, over the limit of {limit}"),
                None,
            ),
        };
        let mut body = json!({ "error": error, "reason": reason });
        if let Some(field) = field {
            body["field"] = json!(field);
        }
        let mut response = (status, Json(body)).into_response();
        if by_origin {
            // The refusal depends on the request's Origin: caches must not serve it to others.
            (response.headers_mut()).append(header::VARY, HeaderValue::from_static("origin"));
        }
        response
    }
}

pub fn router(node: Arc<Node>) -> Router {
    let mut router = Router::new()
        .route("/echo", get(echo))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(chat_page))
        .merge(client_routes(&node));
    if node.config.dev && node.config.allowed_origins.is_empty() {
        // Same-origin only: see client_routes.
        router = router.route("/dev/token", get(dev_token));
    }
    if node.config.api_key.is_some() {
        router = router
            .route("/api/publish", post(api_publish))
            .route("/api/disconnect", post(api_disconnect))
            .route("/api/stats", get(api_stats))
            .route("/api/history/{*channel}", get(api_history))
            .route("/api/presence/{*channel}", get(api_presence))
            .route("/api/nodes", get(api_nodes))
            .route("/api/channels", get(api_channels))
            .route("/admin", get(admin_page));
    }
    let limit = node.config.max_header_bytes;
    router
        .with_state(node)
        .layer(axum::middleware::from_fn(move |request, next| {
            limit_headers(limit, request, next)
        }))
}

/// Refuses a request whose headers add up to more than `limit` bytes, before any handler (the
/// WebSocket handshake included) looks at them.
async fn limit_headers(
    limit: usize,
    request: axum::extract::Request,
    next: Next,
) -> Result<Response, HttpError> {
    let size: usize = (request.headers().iter())
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > limit {
        debug!(size, limit, "request headers too large");
        return Err(HttpError::HeadersTooLarge { size, limit });
    }
    Ok(next.run(request).await)
}

/// Whether `--allowed-origins` (`allowed`) admits a request with this `Origin` header: any
/// origin when the list is empty, otherwise an exact byte-for-byte match with one entry.
/// Requests without `Origin` (non-browser clients, a browser's same-origin GETs) always pass.
fn origin_allowed(allowed: &[String], origin: Option<&HeaderValue>) -> bool {
    match origin {
        Some(origin) if !allowed.is_empty() => {
            allowed.iter().any(|a| a.as_bytes() == origin.as_bytes())
        }
        _ => true,
    }
}

/// How long a browser may cache a preflight's answer (Chromium caps it at 2 hours).
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The routes a browser page calls, possibly from another origin: the WebSocket handshake
/// `/ws` (a WebSocket needs no CORS, but the SDK reads its 401 reason with a plain `GET`),
/// the event stream `/sse`, the SDK `/pushgate.js` (a module script is a CORS request), and
/// `/dev/token` in `--dev` mode when origins are listed by name. Outside them are the health
/// and metrics routes (for probes and scrapers), `/echo` (for load balancers), the demo chat
/// `/` (a navigation) and `/api/*` with `/admin` (server-to-server, with a key no page should
/// hold; the console talks to its own origin only).
///
/// A request whose `Origin` is not allowed (by the rules of [`origin_allowed`]) gets 403
/// `origin not allowed` on every method, preflights included, with `Vary: Origin` and no CORS
/// headers. Others go through the CORS layer:
/// - `--allowed-origins` empty (any origin): `Access-Control-Allow-Origin: *`, without
///   credentials; the answer does not depend on the Origin, so there is no `Vary: Origin`.
///   `/dev/token`, which mints a token for any name, is then left same-origin only.
/// - a list: the request's own origin, `Access-Control-Allow-Credentials: true` (an
///   `EventSource` with `withCredentials`, e.g. behind a proxy that authenticates or pins
///   with cookies; the node itself reads no cookies), and `Vary: Origin` on every answer.
///
/// Preflights (`OPTIONS`) allow `GET` with `Authorization` (a fetch-based SSE client sending
/// the token as a header), `Last-Event-ID` (an `EventSource` resuming, or such a client) and
/// `Cache-Control`, for [`PREFLIGHT_MAX_AGE`].
fn client_routes(node: &Arc<Node>) -> Router<Arc<Node>> {
    let allowed = &node.config.allowed_origins;
    let mut routes = Router::new()
        .route("/ws", get(ws))
        .route("/sse", get(sse))
        .route("/pushgate.js", get(sdk_script));
    if node.config.dev && !allowed.is_empty() {
        routes = routes.route("/dev/token", get(dev_token));
    }
    let cors = CorsLayer::new()
        .allow_methods([Method::GET])
        .allow_headers([
            header::AUTHORIZATION,
            HeaderName::from_static("last-event-id"),
            header::CACHE_CONTROL,
        ])
        .max_age(PREFLIGHT_MAX_AGE);
    let cors = if allowed.is_empty() {
        cors.allow_origin(AllowOrigin::any())
    } else {
        let list: Arc<[String]> = allowed.as_slice().into();
        let listed = move |origin: &HeaderValue, _: &axum::http::request::Parts| {
            origin_allowed(&list, Some(origin))
        };
        cors.allow_origin(AllowOrigin::predicate(listed.clone()))
            .allow_credentials(AllowCredentials::predicate(listed))
    };
    // The origin check runs first (the outer layer), so refused origins never get CORS headers.
    routes
        .layer(cors)
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            refuse_origin,
        ))
}

/// Refuses a request to a client-facing route whose `Origin` is not allowed.
async fn refuse_origin(
    State(node): State<Arc<Node>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    if origin_allowed(
        &node.config.allowed_origins,
        request.headers().get(header::ORIGIN),
    ) {
        next.run(request).await
    } else {
        debug!(path = request.uri().path(), "origin not allowed");
        HttpError::Origin.into_response()
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The credentials of an `Authorization: Bearer ...` header (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Checks everything a handshake needs before the upgrade: Origin, draining, token. (On `/ws`
/// and `/sse` the Origin was checked already, by [`refuse_origin`].)
async fn admit_handshake(
    node: &Node,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<Grant, HttpError> {
    if !origin_allowed(&node.config.allowed_origins, headers.get(header::ORIGIN)) {
        return Err(HttpError::Origin);
    }
    if node.is_draining() {
        return Err(HttpError::Draining);
    }
    if node.is_isolated() {
        return Err(HttpError::Isolated);
    }
    let token = bearer(headers)
        .or(query.token.as_deref())
        .unwrap_or_default();
    node.verifier.verify(token.trim()).await.map_err(|e| {
        node.metrics.auth_failure(e.label());
        debug!(reason = %e, "handshake refused");
        HttpError::Unauthorized(e)
    })
}

/// What the handshake offers, from the node's settings.
fn ws_settings(node: &Node) -> ws::Settings {
    ws::Settings {
        compression: node.config.compression.enabled(),
        // Messages over the node's limit get a `too_large` error; only far larger ones close
        // the connection with 1009.
        max_message: node.config.max_message_bytes.saturating_mul(4),
        compressions: node.metrics.compressions.clone(),
    }
}

/// The client's address: the TCP peer, or what a trusted proxy says (see [`crate::proxy`]).
fn client_ip(node: &Node, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    crate::proxy::client_ip(&node.config.trusted_proxies, peer.ip(), headers)
}

/// Takes a connection slot for `client`; a refusal is logged with the client's address.
fn admit_client(node: &Arc<Node>, client: IpAddr) -> Result<Admission, HttpError> {
    node.admit(client).map_err(|refusal| {
        debug!(%client, ?refusal, "connection refused");
        HttpError::Refused(refusal)
    })
}

async fn ws(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    upgrade: Result<ws::Upgrade, ws::NotWebSocket>,
) -> Result<Response, HttpError> {
    let client = client_ip(&node, peer, &headers);
    let grant = admit_handshake(&node, &headers, &query).await?;
    let upgrade = upgrade.map_err(HttpError::NotWebSocket)?;
    let admission = admit_client(&node, client)?;
    debug!(%client, user = %grant.user, "websocket accepted");
    Ok(upgrade.accept(ws_settings(&node), move |socket| {
        session::run(node, socket, grant, admission)
    }))
}

/// Echoes every text and binary message back: for load-balancer checks and conformance tests.
async fn echo(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    upgrade: Result<ws::Upgrade, ws::NotWebSocket>,
) -> Result<Response, HttpError> {
    let client = client_ip(&node, peer, &headers);
    admit_handshake(&node, &headers, &query).await?;
    let upgrade = upgrade.map_err(HttpError::NotWebSocket)?;
    let admission = admit_client(&node, client)?;
    Ok(
        upgrade.accept(ws_settings(&node), move |mut socket| async move {
            loop {
                let msg = tokio::select! {
                    msg = socket.next() => msg,
                    () = node.drain_started() => {
                        let going_away = CloseFrame {
                            code: close::GOING_AWAY,
                            reason: close::reason(close::GOING_AWAY).into(),
                        };
                        let _ = socket.send(Message::Close(Some(going_away))).await;
                        break;
                    }
                };
                let reply = match msg {
                    // As a delivery: compressed when deflate was negotiated and it is worth it.
                    Some(Ok(Message::Text(text))) => Message::Shared(Frame::verbatim(text)),
                    Some(Ok(m @ Message::Binary(_))) => m,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Err(e)) => {
                        if let Some(code) = session::violation(&e) {
                            let frame = CloseFrame {
                                code,
                                reason: close::reason(code).into(),
                            };
                            let _ = socket.send(Message::Close(Some(frame))).await;
                        }
                        break;
                    }
                    _ => break,
                };
                if socket.send(reply).await.is_err() {
                    break;
                }
            }
            // Sends the close reply queued when the client's close frame was read.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close()).await;
            drop(admission);
        }),
    )
}

/// Liveness: 200 while the process serves HTTP, with the broker's state (which other nodes
/// read to tell an outage of Redis from a node cut off from it alone).
async fn healthz(State(node): State<Arc<Node>>) -> Response {
    Json(json!({
        "status": "ok",
        "node": &*node.instance,
        "broker": {
            "kind": node.broker.kind(),
            "ready": node.broker.is_ready(),
            "isolated": node.is_isolated(),
        },
    }))
    .into_response()
}

/// Readiness: whether this node should get new clients (see [`Node::readiness`]).
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let readiness = node.readiness();
    let status = match readiness {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = json!({
        "ready": readiness.is_ok(),
        "reason": readiness.err().unwrap_or("ready"),
        "broker_ready": node.broker.is_ready(),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// Checks the API key in constant time.
fn check_api_key(node: &Node, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(expected) = &node.config.api_key else {
        return Err(HttpError::BadApiKey);
    };
    let given = bearer(headers).unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
        Ok(())
    } else {
        warn!("API request with an invalid key");
        Err(HttpError::BadApiKey)
    }
}

fn bad(field: &str, reason: impl Into<String>) -> HttpError {
    HttpError::BadRequest {
        field: Some(field.to_owned()),
        reason: reason.into(),
    }
}

/// Parses a JSON body, naming the offending field in the error.
fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HttpError> {
    let invalid = |reason: String| HttpError::BadRequest {
        field: None,
        reason,
    };
    // Serde would also fill a struct from a JSON array, field by position.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(invalid("the body must be a JSON object".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            invalid(format!("invalid JSON body: {inner}"))
        } else {
            HttpError::BadRequest {
                reason: format!("{path}: {inner}"),
                field: Some(path),
            }
        }
    })?;
    de.end()
        .map_err(|e| invalid(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawJson>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    broadcast: Option<bool>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawJson>, D::Error> {
    <&RawJson>::deserialize(d).map(Some)
}

const TARGETS: &str =
    "exactly one of \"channel\", \"user\", \"session\" or \"broadcast\": true is required";

impl<'a> PublishBody<'a> {
    fn target(&'a self, node: &Node) -> Result<Target<'a>, HttpError> {
        let mut targets = Vec::with_capacity(1);
        if let Some(c) = &self.channel {
            node.validate_channel(c)
                .map_err(|e| bad("channel", format!("channel {e}")))?;
            targets.push(Target::Channel(c));
        }
        if let Some(u) = &self.user {
            validate_user(u).map_err(|e| bad("user", format!("user {e}")))?;
            targets.push(Target::User(u));
        }
        if let Some(s) = &self.session {
            parse_session_id(s).ok_or_else(|| bad("session", "session is not a session ID"))?;
            targets.push(Target::Session(s));
        }
        match self.broadcast {
            Some(true) => targets.push(Target::Broadcast),
            Some(false) => return Err(bad("broadcast", "broadcast must be true when given")),
            None => {}
        }
        match targets.as_slice() {
            [one] => Ok(*one),
            _ => Err(bad("target", TARGETS)),
        }
    }
}

async fn api_publish(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    let body: PublishBody = parse_body(&body)?;
    let data = body
        .data
        .ok_or_else(|| bad("data", "data is required (any JSON value)"))?;
    let target = body.target(&node)?;
    if !node.broker.is_ready() {
        return Err(HttpError::Unavailable);
    }
    node.metrics.messages_in.api.inc();
    let published = node
        .publish_message(Outgoing {
            target,
            from: None,
            data,
        })
        .await
        .map_err(|e| match e {
            BrokerError::NotReplicated { .. } => HttpError::NotReplicated(e.to_string()),
            e => {
                warn!(error = %e, "API publish did not reach the broker");
                HttpError::Unavailable
            }
        })?;
    let mut reply = json!({ "id": published.id });
    if let Some((offset, epoch)) = published.position {
        reply["offset"] = json!(offset);
        reply["epoch"] = json!(&*epoch);
    }
    Ok(Json(reply).into_response())
}

#[derive(Deserialize)]
struct DisconnectBody {
    #[serde(default)]
    user: Option<String>,
}

async fn api_disconnect(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    let body: DisconnectBody = parse_body(&body)?;
    let user = body.user.ok_or_else(|| bad("user", "user is required"))?;
    validate_user(&user).map_err(|e| bad("user", format!("user {e}")))?;
    if !node.broker.is_ready() {
        return Err(HttpError::Unavailable);
    }
    let local = node.disconnect_user(&user).await.map_err(|e| {
        warn!(error = %e, "disconnect did not reach the broker");
        HttpError::Unavailable
    })?;
    Ok(Json(json!({ "user": user, "closed_on_this_node": local })).into_response())
}

async fn api_stats(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    Ok(Json(node.stats_doc()).into_response())
}

/// `GET /sse?channel=a&channel=b`: Server-Sent Events (see [`crate::sse`]). Same handshake
/// checks as `/ws`.
async fn sse(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, HttpError> {
    let param = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let query = TokenQuery {
        token: param("token"),
    };
    let grant = admit_handshake(&node, &headers, &query).await?;
    // The SSE transport counts the connection by this address (port kept).
    let peer = SocketAddr::new(client_ip(&node, peer, &headers), peer.port());
    let last_event_id = param("last_event_id");
    let channels = (pairs.into_iter())
        .filter(|(k, _)| k == "channel")
        .map(|(_, v)| v)
        .collect();
    Ok(crate::sse::open(
        node,
        peer,
        &headers,
        grant,
        channels,
        last_event_id,
    ))
}

fn not_found(reason: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "not_found", "reason": reason })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<u64>,
    limit: Option<u64>,
}

/// `GET /api/history/{channel}?since=N&limit=M`: the channel's epoch and last offset, and the
/// messages after `since` that history holds (at most `limit`, at most the recovery limit).
async fn api_history(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    axum::extract::Path(channel): axum::extract::Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    node.validate_channel(&channel)
        .map_err(|e| bad("channel", format!("channel {e}")))?;
    let Some(rule) = node.policy.history(&channel) else {
        return Ok(not_found(
            "channel keeps no history (no --history pattern matches it)",
        ));
    };
    let max = node.config.history_recovery_limit;
    let limit = query.limit.unwrap_or(max).min(max);
    let read = node
        .read_history(&channel, rule, query.since.unwrap_or(0), limit)
        .await
        .map_err(|e| {
            warn!(error = %e, "history read failed");
            HttpError::Unavailable
        })?;
    let messages: Vec<Box<RawJson>> = (read.entries.iter())
        .filter_map(|(_, frame)| RawJson::from_string(frame.text.to_string()).ok())
        .collect();
    Ok(Json(json!({
        "channel": channel,
        "epoch": &*read.epoch,
        "offset": read.top,
        "messages": messages,
    }))
    .into_response())
}

/// `GET /api/presence/{channel}`: who is subscribed, across the cluster.
async fn api_presence(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    axum::extract::Path(channel): axum::extract::Path<String>,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    node.validate_channel(&channel)
        .map_err(|e| bad("channel", format!("channel {e}")))?;
    if !node.policy.presence(&channel) {
        return Ok(not_found(
            "channel tracks no presence (no --presence or --presence-events pattern matches it)",
        ));
    }
    let clients = node.presence(&channel).await.map_err(|e| {
        warn!(error = %e, "presence read failed");
        HttpError::Unavailable
    })?;
    Ok(Json(json!({ "channel": channel, "clients": clients })).into_response())
}

/// `GET /api/nodes`: the live nodes of the cluster and their connection counts.
async fn api_nodes(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    Ok(Json(json!({ "nodes": node.cluster() })).into_response())
}

/// Most channels `/api/channels` lists.
const MAX_CHANNELS_LIMIT: usize = 100;

/// `GET /api/channels?limit=N`: the cluster's busiest channels by subscribers, summed from what
/// each node reports (its [`TOP_CHANNELS`] busiest), at most `N` (default `TOP_CHANNELS`, at
/// most [`MAX_CHANNELS_LIMIT`]).
async fn api_channels(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, HttpError> {
    check_api_key(&node, &headers)?;
    let limit = match pairs.iter().find(|(k, _)| k == "limit") {
        None => TOP_CHANNELS,
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_CHANNELS_LIMIT).contains(n))
            .ok_or_else(|| {
                bad(
                    "limit",
                    format!("limit must be an integer from 1 to {MAX_CHANNELS_LIMIT}"),
                )
            })?,
    };
    Ok(Json(node.cluster_channels(limit)).into_response())
}

/// The JavaScript SDK, served so that pages can `import { Pushgate } from "/pushgate.js"`.
const SDK_SCRIPT: &str = include_str!("../../../clients/js/pushgate.js");

/// The demo chat page served at `/`.
const CHAT_PAGE: &str = include_str!("../assets/chat.html");

/// The admin console served at `/admin` (routed only with an API key).
const ADMIN_PAGE: &str = include_str!("../assets/admin.html");

/// Lifetime of a `/dev/token` token.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

async fn sdk_script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SDK_SCRIPT,
    )
        .into_response()
}

async fn chat_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CHAT_PAGE,
    )
        .into_response()
}

/// The page holds no secret (it asks for the API key and keeps it in memory); the headers keep
/// it out of frames and caches and its requests on this origin.
async fn admin_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        ADMIN_PAGE,
    )
        .into_response()
}

#[derive(Deserialize)]
struct DevTokenQuery {
    sub: Option<String>,
}

/// `GET /dev/token?sub=NAME`, routed only with `--dev`: a token for `NAME` that may subscribe
/// and publish to every channel, valid for an hour, signed with the node's HS256 secret (404
/// on a node that verifies tokens with a public key). Production apps mint tokens in their
/// own backend instead (docs/clients.md).
async fn dev_token(
    State(node): State<Arc<Node>>,
    Query(query): Query<DevTokenQuery>,
) -> Result<Response, HttpError> {
    let Some(secret) = &node.config.jwt.jwt_secret else {
        return Ok(StatusCode::NOT_FOUND.into_response());
    };
    let sub = query.sub.unwrap_or_default();
    validate_user(&sub).map_err(|e| bad("sub", format!("sub {e}")))?;
    let spec = crate::auth::TokenSpec {
        sub: sub.clone(),
        channels: vec!["*".into()],
        publish: vec!["*".into()],
        ttl: DEV_TOKEN_TTL,
        issuer: node.config.jwt.jwt_issuer.clone(),
        audience: node.config.jwt.jwt_audience.clone(),
    };
    let token = crate::auth::mint(secret, &spec);
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "token": token, "user": sub, "expires_in": DEV_TOKEN_TTL.as_secs() })),
    )
        .into_response())
}
