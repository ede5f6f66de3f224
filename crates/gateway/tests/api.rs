//! The server API (`/api/*`), health, metrics, and a graceful drain.

mod common;

use std::time::Duration;

use common::{Ending, TestNode, ending};
use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{API_KEY, Client, RedisServer, WAIT, api, eventually, metric, token};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

/// POSTs `body` (raw bytes) to `path` with `key` as the bearer; returns status and JSON body.
async fn post(base: &str, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("API request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str, key: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn without_an_api_key_the_api_does_not_exist() {
    let node = TestNode::start_bare(&["--jwt-secret", pushgate_tests::SECRET]).await;
    let base = node.base();
    for path in ["/api/publish", "/api/disconnect"] {
        let (status, _) = post(&base, path, Some(API_KEY), r#"{"data":1,"broadcast":true}"#).await;
        assert_eq!(status, 404, "{path}");
    }
    for path in ["/api/stats", "/api/channels", "/admin"] {
        assert_eq!(
            get(&format!("{base}{path}"), Some(API_KEY)).await.0,
            404,
            "{path}"
        );
    }
    // The rest of the node works.
    assert_eq!(get(&format!("{base}/readyz"), None).await.0, 200);
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401() {
    let node = TestNode::start(&[]).await;
    let base = node.base();
    let body = r#"{"data":1,"broadcast":true}"#;
    for key in [
        None,
        Some("wrong"),
        Some(""),
        Some(&API_KEY[..API_KEY.len() - 1]),
    ] {
        let (status, reply) = post(&base, "/api/publish", key, body).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(reply["error"], "unauthorized", "{key:?}");
    }
    // The key is checked before the body.
    assert_eq!(
        post(&base, "/api/publish", Some("wrong"), "nope").await.0,
        401
    );
    let (status, _) = post(&base, "/api/disconnect", Some("wrong"), r#"{"user":"a"}"#).await;
    assert_eq!(status, 401);
    assert_eq!(
        get(&format!("{base}/api/stats"), Some("wrong")).await.0,
        401
    );
    assert_eq!(get(&format!("{base}/api/stats"), None).await.0, 401);
    // The scheme is case-insensitive.
    let response = reqwest::Client::new()
        .post(format!("{base}/api/publish"))
        .header("authorization", format!("bearer {API_KEY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // A different scheme is not the key either.
    let response = reqwest::Client::new()
        .post(format!("{base}/api/publish"))
        .header("authorization", format!("Basic {API_KEY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn bad_publish_bodies_are_400_naming_the_field() {
    let node = TestNode::start(&[]).await;
    let base = node.base();
    let key = Some(API_KEY);

    let not_objects = [
        "",
        "not json",
        "{\"data\":",
        "42",
        "null",
        // An array is not read as the fields in order.
        "[1, 2]",
        "[\"x\", \"room:1\"]",
        // Nor is anything after the object ignored.
        "{\"data\": 1, \"broadcast\": true} trailing",
        "{\"data\": 1, \"broadcast\": true}{}",
    ];
    for body in not_objects {
        let (status, reply) = post(&base, "/api/publish", key, body).await;
        assert_eq!(status, 400, "{body:?}: {reply}");
        assert_eq!(reply["error"], "bad_request", "{body:?}");
        assert!(reply.get("field").is_none(), "{body:?}: {reply}");
    }

    let cases = [
        (json!({"channel": "c"}), "data"),
        (json!({}), "data"),
        (json!({"data": 1}), "target"),
        (json!({"data": 1, "channel": "c", "user": "u"}), "target"),
        (
            json!({"data": 1, "channel": "c", "broadcast": true}),
            "target",
        ),
        (json!({"data": 1, "channel": "has space"}), "channel"),
        (json!({"data": 1, "channel": ""}), "channel"),
        (json!({"data": 1, "channel": 5}), "channel"),
        (json!({"data": 1, "user": ["alice"]}), "user"),
        (json!({"data": 1, "user": "a\tb"}), "user"),
        (json!({"data": 1, "session": "not-a-session"}), "session"),
        (json!({"data": 1, "session": 7}), "session"),
        (json!({"data": 1, "broadcast": "yes"}), "broadcast"),
        (json!({"data": 1, "broadcast": false}), "broadcast"),
    ];
    for (body, field) in cases {
        let (status, reply) = api(&base, "/api/publish", &body).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"], "bad_request", "{body}");
        assert_eq!(reply["field"], field, "{body}: {reply}");
        assert!(reply["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }

    let (status, reply) = api(&base, "/api/disconnect", &json!({})).await;
    assert_eq!((status, reply["field"].clone()), (400, json!("user")));
    let (status, reply) = api(&base, "/api/disconnect", &json!({"user": 1})).await;
    assert_eq!((status, reply["field"].clone()), (400, json!("user")));
}

#[tokio::test]
async fn publish_reaches_each_kind_of_target() {
    let node = TestNode::start(&[]).await;
    let base = node.base();
    let mut alice = Client::connect(&node.ws_url(), &token("alice", &["room:*"], &[]))
        .await
        .unwrap();
    let mut bob = Client::connect(&node.ws_url(), &token("bob", &[], &[]))
        .await
        .unwrap();
    alice.subscribe("room:1").await;

    let (status, reply) = api(
        &base,
        "/api/publish",
        &json!({"channel": "room:1", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let id = reply["id"].as_str().expect("an id").to_owned();
    let m = alice.message().await;
    assert_eq!(m.id, id);
    assert_eq!(m.channel.as_deref(), Some("room:1"));
    assert_eq!(m.data, json!({"n": 1}));
    assert_eq!(m.from, None, "the API is nobody");

    // `null` is data like any other.
    let (status, reply) = api(&base, "/api/publish", &json!({"user": "bob", "data": null})).await;
    assert_eq!(status, 200, "{reply}");
    let m = bob.message().await;
    assert_eq!(
        (m.user.as_deref(), m.data.clone()),
        (Some("bob"), Value::Null)
    );
    assert_eq!(m.id, reply["id"].as_str().unwrap());

    let session = bob.session.clone();
    let (status, _) = api(
        &base,
        "/api/publish",
        &json!({"session": session, "data": "s"}),
    )
    .await;
    assert_eq!(status, 200);
    let m = bob.message().await;
    assert_eq!(
        (m.session.as_deref(), m.data.clone()),
        (Some(&*session), json!("s"))
    );

    let (status, _) = api(
        &base,
        "/api/publish",
        &json!({"broadcast": true, "data": "all"}),
    )
    .await;
    assert_eq!(status, 200);
    for c in [&mut alice, &mut bob] {
        let m = c.message().await;
        assert_eq!((m.broadcast, m.data), (Some(true), json!("all")));
    }
    assert_eq!(
        metric(&base, r#"pushgate_messages_in_total{source="api"}"#).await,
        4.0
    );
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user() {
    let node = TestNode::start(&[]).await;
    let t = token("alice", &[], &[]);
    let mut a1 = Client::connect(&node.ws_url(), &t).await.unwrap();
    let mut a2 = Client::connect(&node.ws_url(), &t).await.unwrap();
    let mut bob = Client::connect(&node.ws_url(), &token("bob", &[], &[]))
        .await
        .unwrap();
    let (status, reply) = api(&node.base(), "/api/disconnect", &json!({"user": "alice"})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["closed_on_this_node"], 2);
    assert_eq!(a1.closed().await, Some(4003));
    assert_eq!(a2.closed().await, Some(4003));
    let r = bob.request(json!({"type": "ping"})).await;
    assert!(matches!(
        r,
        pushgate_protocol::server::ServerFrame::Pong { .. }
    ));
}

#[tokio::test]
async fn stats_describe_the_node_and_cluster() {
    let node = TestNode::start(&["--instance-id", "stats-node"]).await;
    let mut a = Client::connect(&node.ws_url(), &token("alice", &["*"], &[]))
        .await
        .unwrap();
    let _a2 = Client::connect(&node.ws_url(), &token("alice", &[], &[]))
        .await
        .unwrap();
    a.subscribe("x").await;
    a.subscribe("y").await;

    let (status, text) = get(&format!("{}/api/stats", node.base()), Some(API_KEY)).await;
    assert_eq!(status, 200, "{text}");
    let stats: Value = serde_json::from_str(&text).unwrap();
    let me = json!({
        "node": "stats-node",
        "connections": 2,
        "users": 1,
        "channels": 2,
        "draining": false,
        "broker": "embedded",
        "broker_ready": true,
        "top_channels": [{"channel": "x", "subscribers": 1}, {"channel": "y", "subscribers": 1}],
    });
    assert_fields(&stats["node"], &me);
    for sample in ["uptime_secs", "deliveries", "ts"] {
        assert!(stats["node"][sample].is_u64(), "{sample}: {stats}");
    }
    assert_eq!(stats["broker"], "embedded");
    assert_eq!(stats["broker_ready"], true);
    assert!(stats["uptime_secs"].is_u64(), "{stats}");
    let nodes = stats["cluster"]["nodes"].as_array().expect("cluster.nodes");
    assert_eq!(nodes.len(), 1, "{stats}");
    assert_fields(&nodes[0], &me);
    assert_eq!(stats["cluster"]["connections"], 2);
}

/// Every field of `expected` (an object) has its value in `got`.
fn assert_fields(got: &Value, expected: &Value) {
    for (k, v) in expected.as_object().expect("an object") {
        assert_eq!(&got[k], v, "{k} in {got}");
    }
}

#[tokio::test]
async fn channels_lists_the_busiest_by_subscribers() {
    let node = TestNode::start(&[]).await;
    let base = node.base();
    let mut clients = Vec::new();
    // busy: 3 subscribers, calm: 2, quiet: 1.
    for (user, channels) in [
        ("alice", &["busy", "calm", "quiet"][..]),
        ("bob", &["busy", "calm"]),
        ("carol", &["busy"]),
    ] {
        let mut c = Client::connect(&node.ws_url(), &token(user, &["*"], &[]))
            .await
            .unwrap();
        for channel in channels {
            c.subscribe(channel).await;
        }
        clients.push(c);
    }
    let channels = |limit: &str| {
        let url = format!("{base}/api/channels{limit}");
        async move {
            let (status, text) = get(&url, Some(API_KEY)).await;
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            )
        }
    };
    let (status, all) = channels("").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        all,
        json!({"channels": [
            {"channel": "busy", "subscribers": 3, "nodes": 1},
            {"channel": "calm", "subscribers": 2, "nodes": 1},
            {"channel": "quiet", "subscribers": 1, "nodes": 1},
        ], "approximate": false})
    );
    let (_, top) = channels("?limit=1").await;
    assert_eq!(
        top["channels"],
        json!([{"channel": "busy", "subscribers": 3, "nodes": 1}])
    );

    for bad in ["0", "101", "-1", "ten", ""] {
        let (status, body) = channels(&format!("?limit={bad}")).await;
        assert_eq!(status, 400, "limit={bad}: {body}");
        assert_eq!(body["field"], "limit", "{body}");
        assert_eq!(body["error"], "bad_request", "{body}");
    }
    for key in [None, Some("wrong")] {
        let (status, _) = get(&format!("{base}/api/channels"), key).await;
        assert_eq!(status, 401, "{key:?}");
    }

    // The last subscriber to leave takes the channel out of the list.
    drop(clients.remove(0));
    eventually("alice's subscriptions are gone", || async {
        channels("").await.1["channels"]
            == json!([
                {"channel": "busy", "subscribers": 2, "nodes": 1},
                {"channel": "calm", "subscribers": 1, "nodes": 1},
            ])
    })
    .await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let node = TestNode::start(&[]).await;
    let base = node.base();
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200);
    let (status, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);

    let _c = Client::connect(&node.ws_url(), &token("alice", &[], &[]))
        .await
        .unwrap();
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.contains("text"), "{content_type}");
    let text = response.text().await.unwrap();
    for name in [
        "pushgate_connections 1",
        "pushgate_connections_opened_total 1",
        "pushgate_messages_in_total{source=\"client\"}",
        "pushgate_drops_total{reason=\"slow_consumer\"}",
        "pushgate_redis_up 1",
        "pushgate_redis_publish_seconds_bucket",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(metric(&base, "process_resident_memory_bytes").await > 0.0);
}

#[tokio::test]
async fn a_drain_refuses_new_clients_and_closes_open_ones_with_1001() {
    // Enough clients that closing them in batches takes a while.
    let mut node = TestNode::start(&["--drain-period", "4s"]).await;
    let (url, base) = (node.ws_url(), node.base());
    let t = token("alice", &[], &[]);
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(Client::connect(&url, &t).await.unwrap());
    }
    // An /echo connection (no welcome, not a session) is told to go away too.
    let echo_url = format!("ws://{}/echo?token={t}", node.addr);
    let (mut echo, _) = timeout(WAIT, tokio_tungstenite::connect_async(echo_url))
        .await
        .expect("echo handshake in time")
        .expect("echo handshake");
    let started = Instant::now();
    let server = node.begin_shutdown();
    assert!(matches!(ending(&mut echo).await, Ending::Close(1001)));
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { (c.closed().await, Instant::now()) }))
        .collect();

    eventually("/readyz says 503", || async {
        get(&format!("{base}/readyz"), None).await.0 == 503
    })
    .await;
    let (_, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["reason"],
        "draining"
    );
    let refused = Client::connect(&url, &t)
        .await
        .err()
        .expect("refused while draining");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["error"], "unavailable");

    let mut closes = Vec::new();
    for w in watchers {
        let (code, at) = w.await.unwrap();
        assert_eq!(code, Some(1001));
        closes.push(at);
    }
    let first = closes.iter().min().unwrap();
    let last = closes.iter().max().unwrap();
    assert!(
        *last - *first >= Duration::from_millis(500),
        "closes spread over the drain period, not all at once: {:?}",
        *last - *first
    );
    let result = timeout(WAIT, server)
        .await
        .expect("the server returns after the drain")
        .expect("server task");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the drain ends once every client is gone, within its period"
    );
    eventually("no connection left", || async { node.connections() == 0 }).await;
}

#[tokio::test]
async fn publishes_that_need_redis_are_refused_while_it_is_down() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let node = TestNode::start(&[
        "--redis-url",
        &url,
        "--redis-timeout",
        "500ms",
        "--redis-probe-interval",
        "200ms",
    ])
    .await;
    let base = node.base();
    let readyz = || async { get(&format!("{base}/readyz"), None).await.0 };
    let broker_ready = || async {
        let (_, body) = get(&format!("{base}/healthz"), None).await;
        serde_json::from_str::<Value>(&body).expect("JSON")["broker"]["ready"] == true
    };
    eventually("ready with redis", || async { readyz().await == 200 }).await;
    let mut c = Client::connect(&node.ws_url(), &token("alice", &["*"], &["*"]))
        .await
        .unwrap();
    c.subscribe("kept").await;

    redis.stop();
    eventually("the broker is down", || async { !broker_ready().await }).await;
    // The only node lost Redis, and no other node reaches it: still ready for its clients.
    assert_eq!(readyz().await, 200);
    let (status, reply) = api(
        &base,
        "/api/publish",
        &json!({"channel": "kept", "data": 1}),
    )
    .await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "unavailable");
    let (status, _) = api(&base, "/api/disconnect", &json!({"user": "bob"})).await;
    assert_eq!(status, 503);
    // A new channel cannot be subscribed to; the connection itself keeps working.
    match c
        .request(json!({"type": "subscribe", "channel": "new"}))
        .await
    {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unavailable),
        other => panic!("expected unavailable, got {other:?}"),
    }
    let pong = c.request(json!({"type": "ping"})).await;
    assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");

    redis.restart();
    eventually("the broker is back", broker_ready).await;
    let (status, reply) = api(
        &base,
        "/api/publish",
        &json!({"channel": "kept", "data": 2}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(c.message().await.data, json!(2));
    // And a backend's PUBLISH reaches the channel held across the outage.
    eventually("resubscribed", || async {
        redis.channels("pushgate:ch:kept").await.len() == 1
    })
    .await;
    redis.publish("pushgate:ch:kept", r#"{"data": 3}"#).await;
    assert_eq!(c.message().await.data, json!(3));
}
