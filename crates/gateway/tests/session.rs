//! One connection's life over real sockets: permissions, limits, bad frames, heartbeats,
//! refresh and expiry, and slow consumers.

mod common;

use std::time::Duration;

use common::{Ending, TestNode, ending, next_json, raw_connect, send_json};
use futures_util::{SinkExt, StreamExt};
use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{API_KEY, Client, WAIT, api, eventually, metric, sign, token, unix_now};
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

fn assert_error(frame: &ServerFrame, id: Option<u64>, code: ErrorCode) {
    match frame {
        ServerFrame::Error {
            id: got_id,
            code: got_code,
            ..
        } => {
            assert_eq!((*got_id, *got_code), (id, code), "{frame:?}");
        }
        other => panic!("expected a {code:?} error for {id:?}, got {other:?}"),
    }
}

fn assert_ack(frame: &ServerFrame) {
    assert!(matches!(frame, ServerFrame::Ack { .. }), "{frame:?}");
}

/// The connection still answers requests.
async fn still_up(c: &mut Client) {
    let reply = c.request(json!({"type": "ping"})).await;
    assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
}

#[tokio::test]
async fn subscribe_and_publish_follow_the_token_grants() {
    let node = TestNode::start(&[]).await;
    let t = token("alice", &["room:*", "news"], &["room:pub-*"]);
    let mut c = Client::connect(&node.ws_url(), &t).await.unwrap();

    let r = c
        .request(json!({"type": "subscribe", "channel": "secret"}))
        .await;
    assert_error(&r, Some(1), ErrorCode::Forbidden);
    let r = c
        .request(json!({"type": "subscribe", "channel": "newsroom"}))
        .await;
    assert_error(&r, Some(2), ErrorCode::Forbidden);
    c.subscribe("news").await;
    c.subscribe("room:1").await;
    c.subscribe("room:pub-1").await;

    // Subscribing does not grant publishing.
    let r = c
        .request(json!({"type": "publish", "channel": "room:1", "data": 1}))
        .await;
    assert_error(&r, Some(6), ErrorCode::Forbidden);
    let r = c
        .request(json!({"type": "publish", "channel": "news", "data": 1}))
        .await;
    assert_error(&r, Some(7), ErrorCode::Forbidden);
    assert_ack(&c.publish("room:pub-1", json!({"n": 1})).await);
    let m = c.message().await;
    assert_eq!(m.channel.as_deref(), Some("room:pub-1"));
    assert_eq!(m.data, json!({"n": 1}));

    // A token without grants may do neither.
    let mut none = Client::connect(
        &node.ws_url(),
        &sign(&json!({"sub": "bob", "exp": unix_now() + 60})),
    )
    .await
    .unwrap();
    let r = none
        .request(json!({"type": "subscribe", "channel": "news"}))
        .await;
    assert_error(&r, Some(1), ErrorCode::Forbidden);
    let r = none.publish("news", json!(1)).await;
    assert_error(&r, Some(2), ErrorCode::Forbidden);
}

#[tokio::test]
async fn forbidden_errors_echo_large_request_ids() {
    let node = TestNode::start(&[]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &[], &[]))
        .await
        .unwrap();
    let id = u64::MAX - 1;
    c.send_text(&json!({"type": "subscribe", "id": id, "channel": "x"}).to_string())
        .await;
    assert_error(&c.reply_to(Some(id)).await, Some(id), ErrorCode::Forbidden);
}

#[tokio::test]
async fn unsubscribe_is_checked_and_stops_delivery() {
    let node = TestNode::start(&[]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &["*"]))
        .await
        .unwrap();
    let r = c
        .request(json!({"type": "unsubscribe", "channel": "never"}))
        .await;
    assert_error(&r, Some(1), ErrorCode::NotFound);

    c.subscribe("a").await;
    c.subscribe("b").await;
    let r = c
        .request(json!({"type": "unsubscribe", "channel": "a"}))
        .await;
    assert_ack(&r);
    let r = c
        .request(json!({"type": "unsubscribe", "channel": "a"}))
        .await;
    assert_error(&r, Some(5), ErrorCode::NotFound);
    // Nothing more arrives from `a`; `b` still delivers.
    c.publish("a", json!("from a")).await;
    c.publish("b", json!("from b")).await;
    assert_eq!(c.message().await.data, json!("from b"));
}

#[tokio::test]
async fn channels_per_connection_are_limited() {
    let node = TestNode::start(&["--max-channels", "2"]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &[]))
        .await
        .unwrap();
    c.subscribe("one").await;
    c.subscribe("two").await;
    // Subscribing again to a channel held is not a new one.
    c.subscribe("one").await;
    let r = c
        .request(json!({"type": "subscribe", "channel": "three"}))
        .await;
    assert_error(&r, Some(4), ErrorCode::BadRequest);
    // Leaving one makes room.
    assert_ack(
        &c.request(json!({"type": "unsubscribe", "channel": "one"}))
            .await,
    );
    c.subscribe("three").await;
}

#[tokio::test]
async fn invalid_channel_names_are_bad_requests() {
    let node = TestNode::start(&[]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &["*"]))
        .await
        .unwrap();
    let long = "x".repeat(256);
    let mut id = 0;
    for name in ["", "has space", "tab\there", "nul\0", long.as_str()] {
        id += 1;
        let r = c
            .request(json!({"type": "subscribe", "channel": name}))
            .await;
        assert_error(&r, Some(id), ErrorCode::BadRequest);
        id += 1;
        let r = c
            .request(json!({"type": "publish", "channel": name, "data": 1}))
            .await;
        assert_error(&r, Some(id), ErrorCode::BadRequest);
    }
    still_up(&mut c).await;
}

#[tokio::test]
async fn a_channel_that_is_not_a_string_is_a_bad_request() {
    let node = TestNode::start(&[]).await;
    let (mut ws, _) = raw_connect(&node.ws_url(), &token("alice", &["*"], &[])).await;
    for channel in [json!(5), json!(null), json!(["a"])] {
        send_json(
            &mut ws,
            &json!({"type": "subscribe", "id": 3, "channel": channel}),
        )
        .await;
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
    }
    send_json(&mut ws, &json!({"type": "ping", "id": 4})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 4}));
}

#[tokio::test]
async fn requests_over_the_rate_are_refused_but_the_connection_stays() {
    let node = TestNode::start(&["--client-rate", "1", "--client-burst", "3"]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &[], &[]))
        .await
        .unwrap();
    // Six requests at once: the burst of three passes, the rest are refused.
    for id in 1..=6u64 {
        c.send_text(&json!({"type": "ping", "id": id}).to_string())
            .await;
    }
    for id in 1..=3 {
        let r = c.reply_to(Some(id)).await;
        assert_eq!(r, ServerFrame::Pong { id }, "{r:?}");
    }
    for id in 4..=6 {
        assert_error(
            &c.reply_to(Some(id)).await,
            Some(id),
            ErrorCode::RateLimited,
        );
    }
    assert!(
        metric(
            &node.base(),
            r#"pushgate_drops_total{reason="rate_limited"}"#
        )
        .await
            >= 3.0
    );
    // The bucket refills at one request a second; the connection was never closed.
    let mut id = 100;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        id += 1;
        c.send_text(&json!({"type": "ping", "id": id}).to_string())
            .await;
        match c.reply_to(Some(id)).await {
            ServerFrame::Pong { .. } => break,
            r => assert_error(&r, Some(id), ErrorCode::RateLimited),
        }
        assert!(tokio::time::Instant::now() < deadline, "never refilled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn frames_over_the_limit_get_too_large_and_far_larger_ones_close() {
    let node = TestNode::start(&["--max-message-bytes", "1024"]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &["*"]))
        .await
        .unwrap();
    let big = json!({"type": "publish", "id": 9, "channel": "c", "data": "x".repeat(2048)});
    c.send_text(&big.to_string()).await;
    assert_error(&c.reply_to(None).await, None, ErrorCode::TooLarge);
    still_up(&mut c).await;
    // Just under the limit is fine.
    c.subscribe("c").await;
    let fits = "y".repeat(900);
    assert_ack(&c.publish("c", json!(fits)).await);
    assert_eq!(c.message().await.data, json!(fits));
    assert!(metric(&node.base(), r#"pushgate_drops_total{reason="too_large"}"#).await >= 1.0);

    let huge = json!({"type": "ping", "id": 1, "pad": "z".repeat(5000)});
    c.send_text(&huge.to_string()).await;
    assert_eq!(c.closed().await, Some(1009));
    eventually("the connection is released", || async {
        node.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn bad_frames_get_bad_request_and_the_connection_stays() {
    let node = TestNode::start(&[]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &[]))
        .await
        .unwrap();

    c.send_text("{not json").await;
    assert_error(&c.reply_to(None).await, None, ErrorCode::BadRequest);
    c.send_text("[1, 2, 3]").await;
    assert_error(&c.reply_to(None).await, None, ErrorCode::BadRequest);

    c.send_text(r#"{"type": "dance", "id": 7}"#).await;
    assert_error(&c.reply_to(Some(7)).await, Some(7), ErrorCode::BadRequest);
    c.send_text(r#"{"id": 8, "channel": "x"}"#).await;
    assert_error(&c.reply_to(Some(8)).await, Some(8), ErrorCode::BadRequest);
    c.send_text(r#"{"type": "subscribe", "id": 9}"#).await;
    assert_error(&c.reply_to(Some(9)).await, Some(9), ErrorCode::BadRequest);
    c.send_text(r#"{"type": "ping", "id": "ten"}"#).await;
    assert_error(&c.reply_to(None).await, None, ErrorCode::BadRequest);

    c.send_raw(Message::Binary(
        br#"{"type":"ping","id":11}"#.to_vec().into(),
    ))
    .await;
    assert_error(&c.reply_to(None).await, None, ErrorCode::BadRequest);

    still_up(&mut c).await;
    c.subscribe("still-works").await;
}

#[tokio::test]
async fn a_protocol_ping_gets_a_pong() {
    let node = TestNode::start(&[]).await;
    let (mut ws, _) = raw_connect(&node.ws_url(), &token("alice", &[], &[])).await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("pong in time")
            .expect("open")
            .expect("read");
        if let Message::Pong(payload) = msg {
            assert_eq!(&payload[..], b"are you there");
            break;
        }
    }
}

#[tokio::test]
async fn a_client_close_gets_a_close_reply() {
    let node = TestNode::start(&[]).await;
    let (mut ws, _) = raw_connect(&node.ws_url(), &token("alice", &[], &[])).await;
    ws.send(Message::Close(None)).await.unwrap();
    assert_eq!(ending(&mut ws).await, Ending::Close(1005));
    eventually("the connection is released", || async {
        node.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let node = TestNode::start(&["--ping-interval", "200ms", "--pong-timeout", "200ms"]).await;
    let (mut ws, _) = raw_connect(&node.ws_url(), &token("alice", &[], &[])).await;
    // Reading answers each ping (the client library sends the pong). Six pings span well past
    // the silence limit of 400 ms.
    let mut pings = 0;
    while pings < 6 {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("a ping in time")
            .expect("connection open")
            .expect("read");
        match msg {
            Message::Ping(_) => pings += 1,
            Message::Close(c) => panic!("closed after {pings} pings: {c:?}"),
            _ => {}
        }
    }
    send_json(&mut ws, &json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 1}));
    assert_eq!(
        metric(
            &node.base(),
            r#"pushgate_drops_total{reason="heartbeat_timeout"}"#
        )
        .await,
        0.0
    );
    assert_eq!(node.connections(), 1);
}

#[tokio::test]
async fn a_silent_client_is_closed_with_4009() {
    let node = TestNode::start(&["--ping-interval", "200ms", "--pong-timeout", "200ms"]).await;
    let (mut silent, _) = raw_connect(&node.ws_url(), &token("alice", &[], &[])).await;
    // Another client that keeps answering is not affected.
    let (mut lively, _) = raw_connect(&node.ws_url(), &token("bob", &[], &[])).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while let Ok(Some(Ok(msg))) = timeout(WAIT, lively.next()).await {
            match msg {
                Message::Ping(_) => pings += 1,
                Message::Close(_) => return Err(pings),
                _ => {}
            }
            if pings == 8 {
                return Ok(lively);
            }
        }
        Err(pings)
    });

    // The silent one neither reads (so sends no pongs) nor writes.
    eventually("a heartbeat timeout", || async {
        metric(
            &node.base(),
            r#"pushgate_drops_total{reason="heartbeat_timeout"}"#,
        )
        .await
            >= 1.0
    })
    .await;
    // What the server sent meanwhile is waiting in the socket: pings, then the close.
    assert_eq!(ending(&mut silent).await, Ending::Close(4009));

    let mut lively = reader.await.unwrap().expect("the answering client stays");
    send_json(&mut lively, &json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut lively).await["type"], "pong");
    assert_eq!(
        metric(
            &node.base(),
            r#"pushgate_drops_total{reason="heartbeat_timeout"}"#
        )
        .await,
        1.0
    );
    eventually("one connection left", || async { node.connections() == 1 }).await;
}

#[tokio::test]
async fn any_client_frame_counts_as_a_sign_of_life() {
    // A client that never reads (so never pongs) but keeps sending requests is not silent.
    let node = TestNode::start(&["--ping-interval", "200ms", "--pong-timeout", "200ms"]).await;
    let (mut ws, _) = raw_connect(&node.ws_url(), &token("alice", &[], &[])).await;
    for id in 0..12u64 {
        send_json(&mut ws, &json!({"type": "ping", "id": id})).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node.connections(), 1);
    let mut pongs = 0;
    while pongs < 12 {
        if next_json(&mut ws).await["type"] == "pong" {
            pongs += 1;
        }
    }
}

#[tokio::test]
async fn a_refreshed_token_outlives_the_first_one() {
    let node = TestNode::start(&["--jwt-leeway", "0s"]).await;
    let exp = unix_now() + 2;
    let first = sign(&json!({"sub": "alice", "exp": exp, "channels": ["c"]}));
    let mut c = Client::connect(&node.ws_url(), &first).await.unwrap();

    // A refresh for another user, or a bad token, is refused and changes nothing.
    let other = token("mallory", &["*"], &["*"]);
    let r = c.request(json!({"type": "refresh", "token": other})).await;
    assert_error(&r, Some(1), ErrorCode::Forbidden);
    let r = c
        .request(json!({"type": "refresh", "token": "garbage"}))
        .await;
    assert_error(&r, Some(2), ErrorCode::Forbidden);
    let expired = sign(&json!({"sub": "alice", "exp": unix_now() - 10}));
    let r = c
        .request(json!({"type": "refresh", "token": expired}))
        .await;
    assert_error(&r, Some(3), ErrorCode::Forbidden);

    let second = sign(&json!({"sub": "alice", "exp": unix_now() + 3600, "channels": ["c", "d"]}));
    assert_ack(&c.request(json!({"type": "refresh", "token": second})).await);
    // The new grants apply at once.
    c.subscribe("d").await;

    // Past the first token's expiry (this test is about time), the connection is still up.
    while unix_now() <= exp + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_up(&mut c).await;
    assert_eq!(node.connections(), 1);
}

#[tokio::test]
async fn a_refresh_that_grants_less_ends_those_subscriptions() {
    let node = TestNode::start(&[]).await;
    let broad = sign(&json!({"sub": "alice", "exp": unix_now() + 3600, "channels": ["a", "b"]}));
    let mut c = Client::connect(&node.ws_url(), &broad).await.unwrap();
    c.subscribe("a").await;
    c.subscribe("b").await;

    let narrow = sign(&json!({"sub": "alice", "exp": unix_now() + 3600, "channels": ["a"]}));
    assert_ack(&c.request(json!({"type": "refresh", "token": narrow})).await);
    match c.frame().await {
        ServerFrame::Unsubscribed { channel, .. } => assert_eq!(channel, "b"),
        other => panic!("expected an unsubscribed notice, got {other:?}"),
    }
    // "b" no longer delivers; "a" still does (the API message to "a" is the sentinel).
    api_publish(&node.base(), "b", &json!("lost")).await;
    api_publish(&node.base(), "a", &json!("kept")).await;
    let got = c.messages_until(&json!("kept")).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let r = c
        .request(json!({"type": "subscribe", "channel": "b"}))
        .await;
    assert_error(&r, Some(4), ErrorCode::Forbidden);
}

#[tokio::test]
async fn an_unrefreshed_token_closes_the_connection_at_exp() {
    let node = TestNode::start(&["--jwt-leeway", "0s"]).await;
    let exp = unix_now() + 2;
    let t = sign(&json!({"sub": "alice", "exp": exp}));
    let mut c = Client::connect(&node.ws_url(), &t).await.unwrap();
    // A refresh for someone else does not extend it.
    let r = c
        .request(json!({"type": "refresh", "token": token("bob", &[], &[])}))
        .await;
    assert_error(&r, Some(1), ErrorCode::Forbidden);

    assert_eq!(c.closed().await, Some(4001));
    assert!(unix_now() >= exp, "closed before exp");
    eventually("the connection is released", || async {
        node.connections() == 0
    })
    .await;
}

/// Publishes `data` to `channel` through the server API; returns the message ID.
async fn api_publish(base: &str, channel: &str, data: &Value) -> String {
    let (status, body) = api(
        base,
        "/api/publish",
        &json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn a_slow_consumer_is_closed_without_hurting_others() {
    let node = TestNode::start(&[
        "--outbound-queue",
        "16",
        "--write-timeout",
        "500ms",
        // No heartbeat closes: this client is to be closed for being slow, nothing else.
        "--ping-interval",
        "1h",
    ])
    .await;
    let base = node.base();
    let t = token("alice", &["feed"], &[]);

    // The slow one subscribes, then never reads again.
    let (mut slow, _) = raw_connect(&node.ws_url(), &t).await;
    send_json(
        &mut slow,
        &json!({"type": "subscribe", "id": 1, "channel": "feed"}),
    )
    .await;
    assert_eq!(next_json(&mut slow).await, json!({"type": "ack", "id": 1}));

    let mut fast = Client::connect(&node.ws_url(), &t).await.unwrap();
    fast.subscribe("feed").await;
    let sentinel = json!("the end");
    let reader = tokio::spawn(async move {
        let got = fast.messages_until(&sentinel).await;
        (fast, got)
    });

    // 64 KiB per message: the socket buffers fill, then the queue.
    let payload = json!("p".repeat(64 * 1024));
    let slow_drops = r#"pushgate_drops_total{reason="slow_consumer"}"#;
    let mut sent = Vec::new();
    let http = reqwest::Client::new();
    while metric(&base, slow_drops).await < 1.0 {
        assert!(sent.len() < 5_000, "never counted as a slow consumer");
        let response = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(API_KEY)
            .json(&json!({"channel": "feed", "data": payload}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.unwrap();
        sent.push(body["id"].as_str().unwrap().to_owned());
    }
    sent.push(api_publish(&base, "feed", &json!("the end")).await);

    // The other subscriber got every message, in order.
    let (mut fast, got) = timeout(WAIT * 3, reader)
        .await
        .expect("the fast reader finished")
        .unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, sent);

    // The slow one is gone while it still reads nothing, and the node counted it once (its
    // queue overflowed and its stalled write timed out: one connection, one drop).
    eventually("only the fast client left", || async {
        node.connections() == 1
    })
    .await;
    assert_eq!(metric(&base, slow_drops).await, 1.0);
    still_up(&mut fast).await;
    // Its socket ends; the close frame may not get past the data it never read.
    let end = ending(&mut slow).await;
    assert!(
        matches!(end, Ending::Abrupt | Ending::Close(4008)),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_full_queue_closes_with_4008_when_the_socket_is_free() {
    // A queue of one and a burst of deliveries in one go: the session cannot drain the queue
    // between two of them, so the queue overflows while the socket is writable.
    let node = TestNode::start(&["--outbound-queue", "1"]).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &[]))
        .await
        .unwrap();
    c.subscribe("burst").await;
    let mut overflowed = false;
    for _ in 0..100 {
        // Many publishes in flight at once.
        let base = node.base();
        let calls = (0..32).map(|i| {
            let base = base.clone();
            async move {
                api(
                    &base,
                    "/api/publish",
                    &json!({"channel": "burst", "data": i}),
                )
                .await
            }
        });
        for (status, body) in futures_util::future::join_all(calls).await {
            assert_eq!(status, 200, "{body}");
        }
        if metric(
            &node.base(),
            r#"pushgate_drops_total{reason="slow_consumer"}"#,
        )
        .await
            >= 1.0
        {
            overflowed = true;
            break;
        }
    }
    assert!(overflowed, "the queue never overflowed");
    // Deliveries queued before the close may come first; then the close code.
    assert_eq!(c.closed().await, Some(4008));
}
