//! Nodes on replicated Redis. On Redis Sentinel they find the primary through the sentinels,
//! share channels as on one Redis, and follow a failover to the promoted replica by themselves;
//! with `--history-min-replicas` a history publish is acknowledged only once replicas have it.

use std::time::{Duration, Instant};

use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{
    Client, FailoverLog, NodeProcess, RedisServer, ScriptedRedis, SentinelSet, SseClient, Traffic,
    api, eventually, metric, token,
};
use serde_json::{Value, json};

/// A client of `node` that may subscribe and publish on `room:*` and `chat:*`.
async fn connect(node: &NodeProcess, user: &str) -> Client {
    node.client(user, &["room:*", "chat:*"]).await
}

/// Reads deliveries until `last`; returns them (with `last`) in order.
async fn data_until(client: &mut Client, last: &Value) -> Vec<Value> {
    let mut got = Vec::new();
    while got.last() != Some(last) {
        got.push(client.message().await.data);
    }
    got
}

/// Nodes `ids` on the sentinels of `set` (quick probe, 1 s Redis timeout) with `extra` flags,
/// ready and subscribed.
async fn nodes(set: &SentinelSet, ids: &[&str], extra: &[&str]) -> Vec<NodeProcess> {
    let urls = set.urls();
    let mut flags = vec![
        "--redis-sentinel",
        urls.as_str(),
        "--redis-sentinel-master",
        SentinelSet::MASTER,
        "--redis-probe-interval",
        "300ms",
        "--redis-timeout",
        "1s",
    ];
    flags.extend_from_slice(extra);
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(NodeProcess::spawn(id, None, &flags).await);
    }
    for node in &nodes {
        node.wait_ready(200).await;
        node.wait_broker(true).await;
    }
    nodes
}

#[tokio::test]
async fn nodes_find_the_primary_through_the_sentinels_and_follow_a_failover() {
    let mut set = SentinelSet::start().await;
    let nodes = nodes(&set, &["n1", "n2", "n3"], &["--history", "chat:*=100/10m"]).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut s = connect(node, "sub").await;
        s.subscribe("room:s").await;
        subscribers.push(s);
    }
    let mut publisher = connect(&nodes[0], "pub").await;
    let mut reader = connect(&nodes[1], "reader").await;
    reader.subscribe("chat:1").await;

    // A client's publish, and a backend's PUBLISH on the primary, reach every node.
    let reply = publisher.publish("room:s", json!("from-a-client")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    let primary_port = set.primary_port().await;
    set.primary()
        .await
        .publish("pushgate:ch:room:s", r#"{"data":"from-a-backend"}"#)
        .await;
    for s in &mut subscribers {
        let got = data_until(s, &json!("from-a-backend")).await;
        assert_eq!(got, [json!("from-a-client"), json!("from-a-backend")]);
    }
    // History goes through the function library on the primary.
    let reply = publisher.publish("chat:1", json!("kept")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    let kept = reader.message().await;
    let before = kept.position().expect("a history position");

    // The primary dies; the sentinels promote the replica.
    set.primary().await.stop();
    let new_port = set.wait_failover(primary_port).await;
    let promoted = Instant::now();
    assert_ne!(new_port, primary_port);
    for node in &nodes {
        node.wait_broker(true).await;
    }
    // Publishing works again, through every node's lanes, within 5 s of the new primary.
    for (i, node) in nodes.iter().enumerate() {
        eventually(&format!("an API publish on {}", node.id), || async {
            let body = json!({"channel": "room:s", "data": format!("probe-{i}")});
            api(&node.base(), "/api/publish", &body).await.0 == 200
        })
        .await;
    }
    let resumed = promoted.elapsed();
    println!("sentinel failover: publishing resumed {resumed:?} after the promotion");
    assert!(resumed < Duration::from_secs(5), "{resumed:?}");

    let reply = publisher.publish("room:s", json!("after")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    // The promoted replica may lack the last offsets its primary handed out (replication is
    // asynchronous): the channel moves to a new epoch rather than give an offset again, and a
    // subscriber that may have missed messages is told so.
    match reader.frame().await {
        ServerFrame::Unsubscribed { channel, code, .. } => {
            assert_eq!(channel, "chat:1");
            assert_eq!(code.as_deref(), Some("history_lost"));
        }
        other => panic!("expected history_lost, got {other:?}"),
    }
    let subscribed = reader.subscribe_since("chat:1", Some(&before)).await;
    assert_eq!(subscribed.recovered, Some(false), "{subscribed:?}");
    let position = subscribed.position.expect("a history position");
    assert_ne!(
        position.epoch, before.epoch,
        "{position:?} after {before:?}"
    );
    let reply = publisher.publish("chat:1", json!("kept-after")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    let after = reader.message().await;
    assert_eq!(after.data, json!("kept-after"));
    let after = after.position().expect("a history position");
    assert_eq!(after.epoch, position.epoch);
    assert_eq!(after.offset, position.offset + 1);
    for s in &mut subscribers {
        let got = data_until(s, &json!("after")).await;
        let after = got.iter().filter(|d| **d == json!("after")).count();
        assert_eq!(after, 1, "{got:?}");
        assert!(
            got.iter().all(
                |d| *d == json!("after") || d.as_str().is_some_and(|p| p.starts_with("probe-"))
            ),
            "{got:?}"
        );
    }
    for node in &nodes {
        let reconnects = metric(&node.base(), "pushgate_redis_reconnects_total").await;
        assert!(
            reconnects >= 2.0,
            "{} reconnected {reconnects} times",
            node.id
        );
        assert_eq!(node.readyz().await, 200);
    }
}

#[tokio::test]
async fn history_publishes_wait_for_the_replicas_asked_for() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(
        &[],
        &["--replicaof", "127.0.0.1", &primary.port().to_string()],
    );
    eventually("the replica in sync", || async {
        let info: String = (replica.command_as(&["INFO", "replication"]).await).unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    let flags = [
        "--history",
        "chat:*=100/10m",
        "--history-min-replicas",
        "1",
        "--redis-timeout",
        "1s",
    ];
    let node = NodeProcess::spawn("n1", Some(&primary.url()), &flags).await;
    node.wait_ready(200).await;
    let mut publisher = connect(&node, "pub").await;
    let mut reader = connect(&node, "reader").await;
    reader.subscribe("chat:1").await;

    let reply = publisher.publish("chat:1", json!("replicated")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    assert_eq!(reader.message().await.data, json!("replicated"));

    // The replica stops taking anything: publishes are stored and delivered, but not
    // acknowledged, so a publisher that needs durability knows.
    replica.signal("STOP");
    let reply = publisher.publish("chat:1", json!("unconfirmed")).await;
    match &reply {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(*code, ErrorCode::Unavailable);
            assert_eq!(
                message,
                "stored and published, but confirmed by 0 of 1 replicas"
            );
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(reader.message().await.data, json!("unconfirmed"));
    let (status, body) = api(
        &node.base(),
        "/api/publish",
        &json!({"channel": "chat:1", "data": "unconfirmed-api"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["reason"],
        "stored and published, but confirmed by 0 of 1 replicas"
    );
    // Plain channels do not wait.
    let reply = publisher.publish("room:plain", json!("plain")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");

    replica.signal("CONT");
    let reply = publisher.publish("chat:1", json!("confirmed-again")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
}

#[tokio::test]
async fn the_local_sentinel_script_starts_a_setup_that_nodes_use() {
    let setup = ScriptedRedis::up("deploy/redis/sentinel.sh", 5);
    let flags = [
        "--redis-sentinel",
        setup.get("PUSHGATE_REDIS_SENTINEL"),
        "--redis-sentinel-master",
        setup.get("PUSHGATE_REDIS_SENTINEL_MASTER"),
    ];
    let node = NodeProcess::spawn("n1", None, &flags).await;
    node.wait_ready(200).await;
    node.wait_broker(true).await;
    let mut client = connect(&node, "alice").await;
    client.subscribe("room:script").await;
    let (status, body) = api(
        &node.base(),
        "/api/publish",
        &json!({"channel": "room:script", "data": "through the sentinels"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.message().await.data, json!("through the sentinels"));
}

#[tokio::test]
async fn a_primarys_death_under_traffic_is_followed_and_nothing_is_reused_or_skipped_silently() {
    let mut set = SentinelSet::start().await;
    let nodes = nodes(&set, &["n1", "n2", "n3"], &["--history", "chat:*=1000/10m"]).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut s = connect(node, "sub").await;
        s.subscribe("room:busy").await;
        s.subscribe("chat:busy").await;
        subscribers.push(s);
    }
    let traffic = Traffic::start(&nodes);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The primary dies while both channels take 100 messages/s; the sentinels promote the
    // replica.
    let old = set.primary_port().await;
    set.primary().await.stop();
    let killed = Instant::now();
    set.wait_failover(old).await;
    let promoted = Instant::now();
    Traffic::wait_accepted(&nodes).await;
    let resumed = promoted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, refused) = traffic.stop().await;
    println!(
        "sentinel failover under traffic: promoted {:?} after the kill, publishing resumed \
         {resumed:?} later; {sent} rounds, {refused} publishes refused",
        promoted - killed
    );
    assert!(resumed < Duration::from_secs(5), "{resumed:?}");
    for node in &nodes {
        // The outage showed in the broker's state, and cleared by itself.
        assert_eq!(node.health().await["broker"]["ready"], true);
        assert!(metric(&node.base(), "pushgate_redis_reconnects_total").await >= 2.0);
    }
    Traffic::publish_after(&nodes[2]).await;
    for (i, s) in subscribers.iter_mut().enumerate() {
        let log = FailoverLog::read(s).await;
        println!("sentinel failover under traffic: subscriber {i}: {log}");
        log.check(i);
    }
}

#[tokio::test]
async fn users_sessions_broadcasts_presence_and_sse_cross_nodes_on_sentinel() {
    let set = SentinelSet::start().await;
    let [n1, n2] =
        <[NodeProcess; 2]>::try_from(nodes(&set, &["n1", "n2"], &["--presence", "room:p"]).await)
            .unwrap_or_else(|_| unreachable!());
    let mut alice = connect(&n1, "alice").await;
    let mut bob = connect(&n2, "bob").await;
    let publish = |node: &NodeProcess, body: Value| {
        let base = node.base();
        async move {
            let (status, reply) = api(&base, "/api/publish", &body).await;
            assert_eq!(status, 200, "{body}: {reply}");
        }
    };

    // A user, a session and everyone, each published on the other node.
    publish(&n1, json!({"user": "bob", "data": "to-bob"})).await;
    assert_eq!(bob.message().await.data, json!("to-bob"));
    publish(
        &n2,
        json!({"session": alice.session.clone(), "data": "to-alice"}),
    )
    .await;
    assert_eq!(alice.message().await.data, json!("to-alice"));
    publish(&n1, json!({"broadcast": true, "data": "all"})).await;
    assert_eq!(alice.message().await.data, json!("all"));
    assert_eq!(bob.message().await.data, json!("all"));

    // Presence holds both nodes' entries.
    alice.subscribe("room:p").await;
    bob.subscribe("room:p").await;
    let mut present: Vec<String> = (alice.presence("room:p").await)
        .into_iter()
        .map(|entry| entry.node)
        .collect();
    present.sort();
    assert_eq!(present, ["n1", "n2"]);

    // An SSE stream on n1 gets what a client of n2 publishes.
    let t = token("carol", &["room:*"], &[]);
    let mut sse = SseClient::connect(&n1.base(), "channel=room:sse", &t, None).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.event().await.event.as_deref(), Some("welcome"));
    assert_eq!(sse.event().await.json(), json!({"channel": "room:sse"}));
    let reply = bob.publish("room:sse", json!("over-sse")).await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    assert_eq!(sse.event().await.json()["data"], json!("over-sse"));
}
