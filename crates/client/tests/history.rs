//! History recovery in the client: against real `pushgate` node processes and `redis-server` (a
//! node killed while the client is subscribed, messages published elsewhere while it is away, a
//! history deleted meanwhile, a gap the node cannot fill, a revoked channel), and against a
//! scripted server that checks the exact `since` the client sends and feeds it duplicates.
//!
//! Every wait is on an event, a delivery or a frame, bounded by `WAIT`; nothing sleeps to let
//! something happen. Offsets decide "exactly these, in order": a delivery's offset must be the
//! one expected next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pushgate_client::{
    Client, ClientBuilder, Delivery, Error, ErrorCode, Event, Position, Subscription,
    UnsubscribeCode,
};
use pushgate_tests::{Cluster, NodeProcess, WAIT, api, sign, unix_now};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const HISTORY: &[&str] = &["--history", "chat:*=200/10m"];

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A token for `sub` that may subscribe to `channels` and publish on `chat:*`.
fn token_for(sub: &str, channels: &[&str]) -> String {
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    sign(&json!({
        "sub": sub,
        "exp": unix_now() + 3600,
        "channels": channels,
        "publish": ["chat:*"],
        "nonce": nonce,
    }))
}

fn chat_token(sub: &str) -> String {
    token_for(sub, &["chat:*", "room:*"])
}

/// Short delays, so that reconnects in tests take milliseconds.
fn builder(url: String) -> ClientBuilder {
    Client::builder(url)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .going_away_jitter(Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(3))
}

/// A client whose token source only hands out a token while the returned gate is open: with
/// the gate shut the client cannot connect, so the test decides when it comes back.
async fn gated_client(urls: &[String]) -> (watch::Sender<bool>, Client) {
    let (gate, open) = watch::channel(true);
    let token = chat_token("alice");
    let mut b = builder(urls[0].clone());
    for url in &urls[1..] {
        b = b.add_url(url.clone());
    }
    let client = b
        .token_source(move || {
            let (mut open, token) = (open.clone(), token.clone());
            async move {
                open.wait_for(|open| *open)
                    .await
                    .map_err(|_| std::io::Error::other("the test ended"))?;
                Ok::<_, std::io::Error>(token)
            }
        })
        .connect();
    let client = tokio::time::timeout(WAIT, client)
        .await
        .expect("connect in time")
        .expect("connect");
    (gate, client)
}

/// The first event that `pred` accepts, skipping others.
async fn wait_event(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => panic!("events ended while waiting for {what}"),
        }
    }
}

/// Waits for the [`Event::Recovered`] of `channel`; returns `recovered` and the position.
async fn recovered(
    events: &mut broadcast::Receiver<Event>,
    channel: &str,
) -> (bool, Option<Position>) {
    let event = wait_event(
        events,
        &format!("{channel} recovered"),
        |e| matches!(e, Event::Recovered { channel: c, .. } if c == channel),
    )
    .await;
    let Event::Recovered {
        recovered,
        position,
        ..
    } = event
    else {
        unreachable!()
    };
    (recovered, position)
}

async fn wait_disconnected(events: &mut broadcast::Receiver<Event>) {
    wait_event(events, "disconnected without a close frame", |e| {
        matches!(e, Event::Disconnected { code: None, .. })
    })
    .await;
}

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a delivery in time")
        .expect("subscription still open")
}

/// The next `n` deliveries, which must run up by one from offset `first` in `epoch`; returns
/// their data.
async fn in_order(sub: &mut Subscription, n: u64, first: u64, epoch: &str) -> Vec<Value> {
    let mut data = Vec::new();
    for i in 0..n {
        let d = next(sub).await;
        assert_eq!(
            (d.offset, d.epoch.as_deref()),
            (Some(first + i), Some(epoch)),
            "delivery {i} of {n} ({})",
            d.data
        );
        data.push(d.data);
    }
    data
}

fn texts(prefix: &str, range: std::ops::Range<u64>) -> Vec<Value> {
    range.map(|i| json!(format!("{prefix}{i}"))).collect()
}

/// `/api/publish` on `node`; returns the position the message got.
async fn api_publish(node: &NodeProcess, channel: &str, data: Value) -> Position {
    let (status, reply) = api(
        &node.base(),
        "/api/publish",
        &json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "publish on {}: {reply}", node.id);
    Position {
        offset: reply["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset in {reply}")),
        epoch: reply["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("no epoch in {reply}"))
            .to_owned(),
    }
}

#[tokio::test]
async fn a_client_that_fails_over_gets_exactly_what_it_missed_then_live_messages() {
    let mut cluster = Cluster::start(2, HISTORY).await;
    let urls = [cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url()];
    let (gate, client) = gated_client(&urls).await;
    assert_eq!(client.connected().await.unwrap().node, "n1");
    let mut events = client.events();
    let mut chat = client.subscribe("chat:1").await.unwrap();
    let start = chat
        .position()
        .expect("a history channel's ack has a position");
    assert_eq!(start.offset, 0);
    let epoch = start.epoch.clone();
    assert_eq!(chat.recovered(), None, "nothing to recover yet");

    client.publish("chat:1", &"before-1").await.unwrap();
    api_publish(&cluster.nodes[1], "chat:1", json!("before-2")).await;
    assert_eq!(
        in_order(&mut chat, 2, 1, &epoch).await,
        [json!("before-1"), json!("before-2")]
    );
    let last = chat.position().unwrap();
    assert_eq!(last.offset, 2);

    // n1 dies; the client cannot come back (the gate is shut) while n2 takes 30 messages.
    gate.send_replace(false);
    cluster.nodes[0].kill();
    wait_disconnected(&mut events).await;
    for i in 0..30 {
        let at = api_publish(&cluster.nodes[1], "chat:1", json!(format!("missed-{i}"))).await;
        assert_eq!(
            at,
            Position {
                offset: 3 + i,
                epoch: epoch.clone()
            }
        );
    }
    gate.send_replace(true);

    let Event::Connected(session) = wait_event(&mut events, "connected again", |e| {
        matches!(e, Event::Connected(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(session.node, "n2", "the next URL");
    assert_eq!(
        recovered(&mut events, "chat:1").await,
        (true, Some(last)),
        "resubscribed from the last position seen, and recovered"
    );
    assert_eq!(chat.recovered(), Some(true));
    assert_eq!(
        in_order(&mut chat, 30, 3, &epoch).await,
        texts("missed-", 0..30)
    );

    // Then live messages, from the client and the API, right after them.
    client.publish("chat:1", &"live-0").await.unwrap();
    api_publish(&cluster.nodes[1], "chat:1", json!("live-1")).await;
    assert_eq!(
        in_order(&mut chat, 2, 33, &epoch).await,
        texts("live-", 0..2)
    );
    assert_eq!(chat.position(), Some(Position { offset: 34, epoch }));
}

#[tokio::test]
async fn a_client_with_nothing_delivered_recovers_from_the_acks_position_when_its_node_restarts() {
    let mut cluster = Cluster::start(2, HISTORY).await;
    let redis = cluster.redis.url();
    // Some history before the client comes: its position starts at the ack's.
    for i in 0..5 {
        api_publish(&cluster.nodes[1], "chat:2", json!(format!("old-{i}"))).await;
    }
    let client = tokio::time::timeout(
        WAIT,
        builder(cluster.nodes[0].ws_url())
            .token(chat_token("alice"))
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut events = client.events();
    let mut chat = client.subscribe("chat:2").await.unwrap();
    let start = chat.position().unwrap();
    assert_eq!(start.offset, 5);
    let epoch = start.epoch.clone();

    cluster.nodes[0].kill();
    wait_disconnected(&mut events).await;
    // The client's only node is down: all 30 are published while it is away.
    for i in 0..30 {
        api_publish(&cluster.nodes[1], "chat:2", json!(format!("missed-{i}"))).await;
    }
    cluster.nodes[0].restart(Some(&redis), HISTORY).await;

    assert_eq!(recovered(&mut events, "chat:2").await, (true, Some(start)));
    assert_eq!(
        in_order(&mut chat, 30, 6, &epoch).await,
        texts("missed-", 0..30)
    );
    api_publish(&cluster.nodes[0], "chat:2", json!("live")).await;
    assert_eq!(in_order(&mut chat, 1, 36, &epoch).await, [json!("live")]);
}

#[tokio::test]
async fn a_history_deleted_while_the_client_was_away_is_reported_as_not_recovered() {
    let mut cluster = Cluster::start(2, HISTORY).await;
    let redis = cluster.redis.url();
    let client = tokio::time::timeout(
        WAIT,
        builder(cluster.nodes[0].ws_url())
            .token(chat_token("alice"))
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut events = client.events();
    let mut chat = client.subscribe("chat:x").await.unwrap();
    let old = chat.position().unwrap().epoch;
    for i in 0..3 {
        api_publish(&cluster.nodes[1], "chat:x", json!(i)).await;
    }
    in_order(&mut chat, 3, 1, &old).await;

    cluster.nodes[0].kill();
    wait_disconnected(&mut events).await;
    api_publish(&cluster.nodes[1], "chat:x", json!("lost-1")).await;
    cluster
        .redis
        .command(&["DEL", "pushgate:history:chat:x", "pushgate:meta:chat:x"])
        .await;
    // A new epoch; offsets restart.
    let newer = api_publish(&cluster.nodes[1], "chat:x", json!("lost-2")).await;
    assert_ne!(newer.epoch, old);
    assert_eq!(newer.offset, 1);
    cluster.nodes[0].restart(Some(&redis), HISTORY).await;

    let (ok, position) = recovered(&mut events, "chat:x").await;
    assert!(!ok, "the history the client's position was in is gone");
    assert_eq!(
        position.as_ref(),
        Some(&newer),
        "delivery goes on after the new top"
    );
    assert_eq!(chat.recovered(), Some(false));
    assert_eq!(chat.position(), Some(newer.clone()));

    // Nothing of what was lost is replayed: the next delivery is the next live message.
    api_publish(&cluster.nodes[0], "chat:x", json!("live")).await;
    assert_eq!(
        in_order(&mut chat, 1, 2, &newer.epoch).await,
        [json!("live")]
    );
}

/// Appends to `channel`'s history without publishing it where nodes listen: a message every
/// node misses live, as when its Redis subscription drops it.
async fn hidden_publish(cluster: &Cluster, channel: &str, data: Value, size: u64) {
    let envelope = json!({ "data": data }).to_string();
    let (stream, meta) = (
        format!("pushgate:history:{channel}"),
        format!("pushgate:meta:{channel}"),
    );
    cluster
        .redis
        .command(&[
            "FCALL",
            "pushgate_publish",
            "2",
            &stream,
            &meta,
            "pushgate:ch:nowhere",
            &envelope,
            &size.to_string(),
            "600000",
        ])
        .await;
}

#[tokio::test]
async fn history_lost_makes_the_client_subscribe_again_and_report_not_recovered() {
    let cluster = Cluster::start(2, &["--history", "chat:*=3/10m"]).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let client = tokio::time::timeout(
        WAIT,
        builder(n1.ws_url()).token(chat_token("alice")).connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut events = client.events();
    let mut chat = client.subscribe("chat:7").await.unwrap();
    let epoch = chat.position().unwrap().epoch;
    api_publish(n2, "chat:7", json!("m1")).await;
    in_order(&mut chat, 1, 1, &epoch).await;

    // n1 misses 2..4 live; history (3 messages) keeps only 3..5 once m5 comes: n1 cannot fill
    // the gap and ends the subscription with history_lost.
    for data in ["m2", "m3", "m4"] {
        hidden_publish(&cluster, "chat:7", json!(data), 3).await;
    }
    api_publish(n2, "chat:7", json!("m5")).await;
    let mut seen = Vec::new();
    let event = wait_event(&mut events, "chat:7 recovered", |e| {
        seen.push(e.clone());
        matches!(e, Event::Recovered { .. })
    })
    .await;
    assert_eq!(
        event,
        Event::Recovered {
            channel: "chat:7".into(),
            recovered: false,
            position: Some(Position {
                offset: 5,
                epoch: epoch.clone()
            }),
        }
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Unsubscribed { .. } | Event::Disconnected { .. })),
        "the subscription goes on, on the same connection: {seen:?}"
    );
    assert_eq!(chat.recovered(), Some(false));

    api_publish(n2, "chat:7", json!("m6")).await;
    assert_eq!(in_order(&mut chat, 1, 6, &epoch).await, [json!("m6")]);
}

#[tokio::test]
async fn a_revoked_channel_ends_its_subscription_with_the_code() {
    let node = NodeProcess::spawn("n1", None, HISTORY).await;
    let client = tokio::time::timeout(
        WAIT,
        builder(node.ws_url()).token(chat_token("alice")).connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut events = client.events();
    let mut chat = client.subscribe("chat:1").await.unwrap();
    let mut room = client.subscribe("room:1").await.unwrap();

    client
        .refresh(token_for("alice", &["room:*"]))
        .await
        .unwrap();
    let Event::Unsubscribed { channel, reason } = wait_event(&mut events, "unsubscribed", |e| {
        matches!(e, Event::Unsubscribed { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(channel, "chat:1");
    assert_eq!(reason.code, UnsubscribeCode::Revoked);
    assert_eq!(reason.code.as_str(), Some("revoked"));
    assert_eq!(reason.message, "token no longer grants this channel");
    assert_eq!(
        reason.to_string(),
        "token no longer grants this channel (revoked)"
    );
    let end = tokio::time::timeout(WAIT, chat.recv())
        .await
        .expect("ended in time");
    assert!(end.is_none(), "the subscription ended: {end:?}");

    // The channel the token still grants goes on; the revoked one is refused now.
    api(
        &node.base(),
        "/api/publish",
        &json!({"channel": "room:1", "data": "still here"}),
    )
    .await;
    assert_eq!(next(&mut room).await.data, json!("still here"));
    match client.subscribe("chat:1").await {
        Err(Error::Rejected { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
}

/// A WebSocket server that plays a node from a script: the test reads the client's frames and
/// writes the node's.
struct Script {
    listener: TcpListener,
}

struct Conn {
    ws: WebSocketStream<TcpStream>,
}

impl Script {
    async fn start() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.listener.local_addr().unwrap())
    }

    /// The client's next connection, welcomed.
    async fn accept(&self, n: u32) -> Conn {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the client connects in time")
            .unwrap();
        // Like a node, it takes the batch subprotocol when offered (and sends one frame per
        // message, which a batch may be).
        #[allow(clippy::result_large_err)] // the callback's type is tungstenite's
        let batch = |request: &Request, mut response: Response| {
            if let Some(offered) = request.headers().get("sec-websocket-protocol") {
                assert_eq!(offered, "pushgate.batch");
                (response.headers_mut()).insert("sec-websocket-protocol", offered.clone());
            }
            Ok(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, batch)
            .await
            .unwrap();
        let mut conn = Conn { ws };
        conn.send(
            json!({"type": "welcome", "session": format!("script.{n}"), "user": "alice",
                         "node": "script", "ping_interval": 25}),
        )
        .await;
        conn
    }
}

impl Conn {
    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    /// The client's next request.
    async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame from the client in time")
                .expect("the client is connected")
                .unwrap();
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// The client's next `n` subscribe requests, by channel.
    async fn subscribes(&mut self, n: usize) -> HashMap<String, Value> {
        let mut got = HashMap::new();
        while got.len() < n {
            let frame = self.recv().await;
            assert_eq!(frame["type"], "subscribe", "{frame}");
            got.insert(frame["channel"].as_str().unwrap().to_owned(), frame);
        }
        got
    }

    async fn message(&mut self, offset: u64, epoch: &str) {
        self.send(
            json!({"type": "message", "id": format!("{epoch}:{offset}"), "ts": 1,
                         "channel": "chat:1", "offset": offset, "epoch": epoch,
                         "data": format!("{epoch}:{offset}")}),
        )
        .await;
    }
}

fn at(offset: u64, epoch: &str) -> Option<Position> {
    Some(Position {
        offset,
        epoch: epoch.into(),
    })
}

/// The frames themselves: `since` is the ack's position while nothing was delivered, then the
/// last delivery's; duplicates are dropped; `history_lost` brings a subscribe with `since` on
/// the same connection; a channel without history reports `recovered: false`.
#[tokio::test]
async fn resubscribes_carry_the_last_position_and_duplicates_are_dropped() {
    let script = Script::start().await;
    let accepting = script.accept(1);
    let connecting = builder(script.url()).token("t").connect();
    let (mut conn, client) = tokio::join!(accepting, connecting);
    let client = client.unwrap();
    let mut events = client.events();

    let node = async {
        let mut first = conn.subscribes(2).await;
        assert_eq!(first["chat:1"].get("since"), None, "{first:?}");
        let chat = first.remove("chat:1").unwrap();
        conn.send(
            json!({"type": "ack", "id": chat["id"], "position": {"offset": 5, "epoch": "e1"}}),
        )
        .await;
        let room = first.remove("room:1").unwrap();
        conn.send(json!({"type": "ack", "id": room["id"]})).await;
    };
    let (mut chat, mut room, ()) = tokio::join!(
        async { client.subscribe("chat:1").await.unwrap() },
        async { client.subscribe("room:1").await.unwrap() },
        node
    );
    assert_eq!(chat.position(), at(5, "e1"));
    assert_eq!(room.position(), None);

    // The connection breaks before anything was delivered: the ack's position is `since`.
    drop(conn);
    let mut conn = script.accept(2).await;
    let mut again = conn.subscribes(2).await;
    let chat_req = &again["chat:1"];
    assert_eq!(chat_req["since"], json!({"offset": 5, "epoch": "e1"}));
    assert_eq!(again["room:1"].get("since"), None);
    conn.send(
        json!({"type": "ack", "id": chat_req["id"], "position": {"offset": 7, "epoch": "e1"},
                     "recovered": true}),
    )
    .await;
    for (offset, epoch) in [(6, "e1"), (6, "e1"), (5, "e1"), (7, "e1")] {
        conn.message(offset, epoch).await;
    }
    conn.send(json!({"type": "ack", "id": again.remove("room:1").unwrap()["id"]}))
        .await;
    assert_eq!(recovered(&mut events, "chat:1").await, (true, at(5, "e1")));
    let got: Vec<_> = [next(&mut chat).await, next(&mut chat).await]
        .iter()
        .map(|d| d.offset)
        .collect();
    assert_eq!(
        got,
        [Some(6), Some(7)],
        "the repeated 6 and the old 5 are dropped"
    );
    assert_eq!(chat.position(), at(7, "e1"));
    assert_eq!(
        recovered(&mut events, "room:1").await,
        (false, None),
        "a channel without history recovers nothing"
    );
    assert_eq!(room.recovered(), Some(false));

    // history_lost: subscribe again at once, from the last delivery.
    conn.send(
        json!({"type": "unsubscribed", "channel": "chat:1", "code": "history_lost",
                     "reason": "messages were missed that history no longer holds"}),
    )
    .await;
    let lost = conn.recv().await;
    assert_eq!(
        (&lost["type"], &lost["channel"], &lost["since"]),
        (
            &json!("subscribe"),
            &json!("chat:1"),
            &json!({"offset": 7, "epoch": "e1"})
        )
    );
    conn.send(
        json!({"type": "ack", "id": lost["id"], "position": {"offset": 3, "epoch": "e2"},
                     "recovered": false}),
    )
    .await;
    for (offset, epoch) in [(4, "e2"), (4, "e2"), (2, "e2"), (5, "e2")] {
        conn.message(offset, epoch).await;
    }
    assert_eq!(recovered(&mut events, "chat:1").await, (false, at(3, "e2")));
    assert_eq!(chat.recovered(), Some(false));
    let got: Vec<_> = [next(&mut chat).await, next(&mut chat).await]
        .iter()
        .map(|d| (d.offset, d.epoch.clone()))
        .collect();
    assert_eq!(
        got,
        [(Some(4), Some("e2".into())), (Some(5), Some("e2".into()))]
    );

    // The next connection resubscribes from there; a revoked channel then ends.
    drop(conn);
    let mut conn = script.accept(3).await;
    let third = conn.subscribes(2).await;
    assert_eq!(
        third["chat:1"]["since"],
        json!({"offset": 5, "epoch": "e2"})
    );
    conn.send(json!({"type": "ack", "id": third["chat:1"]["id"],
                     "position": {"offset": 5, "epoch": "e2"}, "recovered": true}))
        .await;
    assert_eq!(recovered(&mut events, "chat:1").await, (true, at(5, "e2")));
    conn.send(
        json!({"type": "unsubscribed", "channel": "chat:1", "code": "revoked",
                     "reason": "token no longer grants this channel"}),
    )
    .await;
    let Event::Unsubscribed { channel, reason } = wait_event(&mut events, "unsubscribed", |e| {
        matches!(e, Event::Unsubscribed { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (channel.as_str(), &reason.code),
        ("chat:1", &UnsubscribeCode::Revoked)
    );
    assert!(chat.recv().await.is_none());
    // A code this client does not know ends the subscription too, and is passed on.
    conn.send(json!({"type": "ack", "id": third["room:1"]["id"]}))
        .await;
    conn.send(
        json!({"type": "unsubscribed", "channel": "room:1", "code": "moved",
                     "reason": "elsewhere"}),
    )
    .await;
    let Event::Unsubscribed { channel, reason } = wait_event(&mut events, "unsubscribed", |e| {
        matches!(e, Event::Unsubscribed { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (channel.as_str(), &reason.code),
        ("room:1", &UnsubscribeCode::Other(Some("moved".into())))
    );
    assert!(room.recv().await.is_none());
}

#[tokio::test]
async fn subscribe_recent_starts_with_the_last_messages_and_recovers_after_a_failover() {
    let mut cluster = Cluster::start(2, HISTORY).await;
    for i in 1..=120 {
        api_publish(&cluster.nodes[1], "chat:9", json!(format!("m{i}"))).await;
    }
    let urls = [cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url()];
    let (gate, client) = gated_client(&urls).await;
    assert_eq!(client.connected().await.unwrap().node, "n1");
    let mut events = client.events();

    // The history request, without a subscription.
    let history = client.history("chat:9", 50).await.unwrap();
    assert_eq!(history.channel, "chat:9");
    assert_eq!(history.position.offset, 120);
    let epoch = history.position.epoch.clone();
    let offsets: Vec<_> = history.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (71..=120).map(Some).collect::<Vec<_>>());
    let data: Vec<_> = history.messages.iter().map(|m| m.data.clone()).collect();
    assert_eq!(data, texts("m", 71..121));
    match client.history("room:1", 5).await {
        Err(Error::Rejected {
            code: ErrorCode::NotFound,
            ..
        }) => {}
        other => panic!("history of a channel without history: {other:?}"),
    }

    // The last 50 first, then live messages.
    let mut chat = client.subscribe_recent("chat:9", 50).await.unwrap();
    assert_eq!(
        in_order(&mut chat, 50, 71, &epoch).await,
        texts("m", 71..121)
    );
    api_publish(&cluster.nodes[1], "chat:9", json!("live-121")).await;
    assert_eq!(
        in_order(&mut chat, 1, 121, &epoch).await,
        [json!("live-121")]
    );
    let last = chat.position().unwrap();
    assert_eq!(last.offset, 121);

    // Its node dies; the client comes back on the other one and recovers from its position:
    // what it missed, not the last 50 again.
    gate.send_replace(false);
    cluster.nodes[0].kill();
    wait_disconnected(&mut events).await;
    for i in 122..=126 {
        api_publish(&cluster.nodes[1], "chat:9", json!(format!("missed-{i}"))).await;
    }
    gate.send_replace(true);
    assert_eq!(recovered(&mut events, "chat:9").await, (true, Some(last)));
    assert_eq!(
        in_order(&mut chat, 5, 122, &epoch).await,
        texts("missed-", 122..127)
    );
    client.publish("chat:9", &"live-127").await.unwrap();
    assert_eq!(
        in_order(&mut chat, 1, 127, &epoch).await,
        [json!("live-127")]
    );
}
