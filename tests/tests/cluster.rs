//! A real cluster: one `redis-server` and three `pushgate serve` processes, with clients on
//! different nodes.
//!
//! "Exactly once" and "to no one else" are checked with [`Cluster::barrier`]: a sentinel that
//! reaches every client after everything published before it, so counting what arrived before
//! the sentinel needs no fixed waits.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::{Delivery, ServerFrame};
use pushgate_tests::{
    Client, Cluster, NodeProcess, RedisServer, TcpProxy, api, api_get, eventually, metric,
    sorted_data, token,
};
use serde_json::{Value, json};

const INVALID: &str = "pushgate_redis_invalid_messages_total";
const RECONNECTS: &str = "pushgate_redis_reconnects_total";

/// A client of `user` on `node`, allowed to subscribe and publish to `room:*`.
async fn connect(node: &NodeProcess, user: &str) -> Client {
    let client = Client::connect(&node.ws_url(), &token(user, &["room:*"], &["room:*"]))
        .await
        .unwrap_or_else(|r| panic!("{user} refused by {}: {r:?}", node.id));
    assert_eq!(client.node, node.id);
    client
}

/// Publishes through `/api/publish` on `node`; returns the message ID.
async fn api_publish(node: &NodeProcess, body: Value) -> String {
    let (status, reply) = api(&node.base(), "/api/publish", &body).await;
    assert_eq!(status, 200, "publish {body} on {}: {reply}", node.id);
    reply["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {reply}"))
        .to_owned()
}

/// A client publish that must be acknowledged.
async fn publish_acked(client: &mut Client, channel: &str, data: Value) {
    let reply = client.publish(channel, data.clone()).await;
    assert!(
        matches!(reply, ServerFrame::Ack { .. }),
        "publish {data} on {channel} from {}: {reply:?}",
        client.node
    );
}

/// `reply` is an `unavailable` error.
fn assert_unavailable(reply: &ServerFrame) {
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                ..
            }
        ),
        "{reply:?}"
    );
}

/// The one delivery whose `data` is the string `data`.
fn find<'a>(deliveries: &'a [Delivery], data: &str) -> &'a Delivery {
    let mut matching = deliveries.iter().filter(|d| d.data == json!(data));
    let found = matching
        .next()
        .unwrap_or_else(|| panic!("no delivery of {data:?} in {deliveries:?}"));
    assert!(matching.next().is_none(), "{data:?} delivered twice");
    found
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message ID a node generated: a UUID v7 in its hyphenated form.
fn assert_generated_id(id: &str) {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "not a UUID: {id:?}");
    assert!(
        id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "not a UUID: {id:?}"
    );
    assert_eq!(id.as_bytes()[14], b'7', "not a UUID v7: {id:?}");
}

fn strs(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn channel_messages_reach_each_subscriber_on_every_node_exactly_once() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut s1 = connect(n1, "alice").await;
    let mut s2 = connect(n2, "bob").await;
    let mut s3 = connect(n3, "carol").await;
    let mut s3b = connect(n3, "dave").await;
    let mut idle1 = connect(n1, "erin").await;
    let mut other2 = connect(n2, "frank").await;
    for s in [&mut s1, &mut s2, &mut s3, &mut s3b] {
        s.subscribe("room:1").await;
    }
    other2.subscribe("room:2").await;
    // One subscription per node, however many local subscribers it has.
    assert_eq!(cluster.redis.numsub("pushgate:ch:room:1").await, 3);

    publish_acked(&mut s1, "room:1", json!("client-on-n1")).await;
    publish_acked(&mut s3, "room:1", json!("client-on-n3")).await;
    let api_n2 = api_publish(n2, json!({"channel": "room:1", "data": "api-on-n2"})).await;
    let api_n1 = api_publish(n1, json!({"channel": "room:1", "data": "api-on-n1"})).await;

    let got = cluster
        .barrier(&mut [&mut s1, &mut s2, &mut s3, &mut s3b, &mut idle1, &mut other2])
        .await;
    let expected = strs(&["api-on-n1", "api-on-n2", "client-on-n1", "client-on-n3"]);
    for (i, deliveries) in got[..4].iter().enumerate() {
        assert_eq!(sorted_data(deliveries), expected, "subscriber {i}");
    }
    assert!(got[4].is_empty(), "non-subscriber got {:?}", got[4]);
    assert!(got[5].is_empty(), "room:2 subscriber got {:?}", got[5]);

    // One ID per message, the same on every node; `from` names the publishing user.
    let first = find(&got[0], "client-on-n1");
    assert_generated_id(&first.id);
    for deliveries in &got[..4] {
        let d = find(deliveries, "client-on-n1");
        assert_eq!(d.id, first.id);
        assert_eq!(d.from.as_deref(), Some("alice"));
        assert_eq!(d.channel.as_deref(), Some("room:1"));
        assert_eq!(
            (d.user.as_ref(), d.session.as_ref(), d.broadcast),
            (None, None, None)
        );
        assert_eq!(
            find(deliveries, "client-on-n3").from.as_deref(),
            Some("carol")
        );
        let d = find(deliveries, "api-on-n2");
        assert_eq!(d.id, api_n2);
        assert_eq!(d.from, None);
        assert_eq!(find(deliveries, "api-on-n1").id, api_n1);
    }
}

#[tokio::test]
async fn user_messages_reach_every_connection_of_the_user_exactly_once() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut a1 = connect(n1, "alice").await;
    let mut a2 = connect(n2, "alice").await;
    let mut a2b = connect(n2, "alice").await;
    let mut b2 = connect(n2, "bob").await;
    let mut b3 = connect(n3, "bob").await;
    let mut c3 = connect(n3, "carol").await;
    assert_eq!(cluster.redis.numsub("pushgate:user:alice").await, 2);
    assert_eq!(cluster.redis.numsub("pushgate:user:bob").await, 2);
    assert_eq!(cluster.redis.numsub("pushgate:user:carol").await, 1);

    // From a node without alice, and from nodes with a local alice (whose echo must be dropped).
    let remote = api_publish(n3, json!({"user": "alice", "data": "alice-via-n3"})).await;
    api_publish(n1, json!({"user": "alice", "data": "alice-via-n1"})).await;
    api_publish(n2, json!({"user": "alice", "data": "alice-via-n2"})).await;
    api_publish(n2, json!({"user": "bob", "data": "bob-via-n2"})).await;
    api_publish(n1, json!({"user": "nobody", "data": "nobody-via-n1"})).await;

    let got = cluster
        .barrier(&mut [&mut a1, &mut a2, &mut a2b, &mut b2, &mut b3, &mut c3])
        .await;
    let alice = strs(&["alice-via-n1", "alice-via-n2", "alice-via-n3"]);
    for (i, deliveries) in got[..3].iter().enumerate() {
        assert_eq!(sorted_data(deliveries), alice, "alice connection {i}");
        let d = find(deliveries, "alice-via-n3");
        assert_eq!(d.id, remote);
        assert_eq!(d.user.as_deref(), Some("alice"));
        assert_eq!(
            (
                d.channel.as_ref(),
                d.session.as_ref(),
                d.broadcast,
                d.from.as_ref()
            ),
            (None, None, None, None)
        );
    }
    for (i, deliveries) in got[3..5].iter().enumerate() {
        assert_eq!(sorted_data(deliveries), strs(&["bob-via-n2"]), "bob {i}");
    }
    assert!(got[5].is_empty(), "carol got {:?}", got[5]);
}

#[tokio::test]
async fn session_messages_reach_one_connection_on_any_node_exactly_once() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut a1 = connect(n1, "alice").await;
    let mut a2 = connect(n2, "alice").await;
    let mut b3 = connect(n3, "bob").await;
    let (s_a1, s_a2, s_b3) = (a1.session.clone(), a2.session.clone(), b3.session.clone());
    assert!(
        s_a2.starts_with("n2."),
        "session IDs name their node: {s_a2}"
    );

    let remote = api_publish(n1, json!({"session": s_a2, "data": "a2-via-n1"})).await;
    api_publish(n2, json!({"session": s_a2, "data": "a2-via-n2"})).await;
    api_publish(n1, json!({"session": s_a1, "data": "a1-via-n1"})).await;
    api_publish(n2, json!({"session": s_b3, "data": "b3-via-n2"})).await;
    // Sessions that do not exist, on a live node and on no node: delivered nowhere.
    let gone = "n3.00000000000000000000000000000000";
    api_publish(n1, json!({"session": gone, "data": "gone"})).await;
    let nowhere = "n9.00000000000000000000000000000000";
    api_publish(n1, json!({"session": nowhere, "data": "nowhere"})).await;

    let got = cluster.barrier(&mut [&mut a1, &mut a2, &mut b3]).await;
    assert_eq!(sorted_data(&got[0]), strs(&["a1-via-n1"]));
    assert_eq!(sorted_data(&got[1]), strs(&["a2-via-n1", "a2-via-n2"]));
    assert_eq!(sorted_data(&got[2]), strs(&["b3-via-n2"]));
    let d = find(&got[1], "a2-via-n1");
    assert_eq!(d.id, remote);
    assert_eq!(d.session.as_deref(), Some(s_a2.as_str()));
    assert_eq!(
        (d.channel.as_ref(), d.user.as_ref(), d.broadcast),
        (None, None, None)
    );
    assert_eq!(
        find(&got[0], "a1-via-n1").session.as_deref(),
        Some(s_a1.as_str())
    );
}

#[tokio::test]
async fn broadcasts_reach_every_connection_on_every_node_exactly_once() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut c1 = connect(n1, "alice").await;
    let mut c2 = connect(n2, "bob").await;
    let mut c2b = connect(n2, "bob").await;
    let mut c3 = connect(n3, "carol").await;
    c1.subscribe("room:1").await;
    c3.subscribe("room:1").await;

    let id = api_publish(n1, json!({"broadcast": true, "data": "all-via-n1"})).await;
    api_publish(n2, json!({"broadcast": true, "data": "all-via-n2"})).await;
    api_publish(n3, json!({"broadcast": true, "data": "all-via-n3"})).await;

    let got = cluster
        .barrier(&mut [&mut c1, &mut c2, &mut c2b, &mut c3])
        .await;
    for (i, deliveries) in got.iter().enumerate() {
        assert_eq!(
            sorted_data(deliveries),
            strs(&["all-via-n1", "all-via-n2", "all-via-n3"]),
            "connection {i}"
        );
        let d = find(deliveries, "all-via-n1");
        assert_eq!(d.id, id);
        assert_eq!(d.broadcast, Some(true));
        assert_eq!(
            (d.channel.as_ref(), d.user.as_ref(), d.session.as_ref()),
            (None, None, None)
        );
    }
}

#[tokio::test]
async fn messages_from_one_publisher_arrive_in_order_on_every_node() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut subscribers = Vec::new();
    for node in [n1, n2, n3] {
        let mut s = connect(node, "reader").await;
        s.subscribe("room:order").await;
        subscribers.push(s);
    }
    let mut publisher = connect(n1, "writer").await;
    // Sent back to back, without waiting for acks; the last one is the sentinel.
    const COUNT: u64 = 100;
    for seq in 0..COUNT {
        let frame = json!({"type": "publish", "id": seq + 1, "channel": "room:order", "data": seq});
        publisher.send_text(&frame.to_string()).await;
    }
    for s in &mut subscribers {
        let got: Vec<Value> = s
            .messages_until(&json!(COUNT - 1))
            .await
            .into_iter()
            .map(|d| d.data)
            .collect();
        let expected: Vec<Value> = (0..COUNT).map(|seq| json!(seq)).collect();
        assert_eq!(got, expected, "order on {}", s.node);
    }
}

#[tokio::test]
async fn nodes_subscribe_to_a_channel_only_while_they_have_a_local_subscriber() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, _] = &cluster.nodes[..] else {
        unreachable!()
    };
    let redis = &cluster.redis;
    let topic = "pushgate:ch:room:sub";
    let mut a1 = connect(n1, "alice").await;
    let mut a1b = connect(n1, "alice").await;
    let mut b2 = connect(n2, "bob").await;
    assert!(redis.channels("pushgate:ch:*").await.is_empty());

    a1.subscribe("room:sub").await;
    assert_eq!(redis.channels("pushgate:ch:*").await, [topic]);
    assert_eq!(redis.numsub(topic).await, 1);
    a1b.subscribe("room:sub").await;
    b2.subscribe("room:sub").await;
    assert_eq!(redis.numsub(topic).await, 2, "one subscription per node");
    assert_eq!(redis.numsub("pushgate:user:alice").await, 1);
    assert_eq!(
        redis.command(&["PUBSUB", "NUMPAT"]).await,
        redis::Value::Int(0),
        "no pattern subscriptions"
    );

    // n1 keeps the channel while a1b still has it, and delivers to a1b.
    let reply = a1
        .request(json!({"type": "unsubscribe", "channel": "room:sub"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    // Unsubscribing and subscribing again at once ends subscribed.
    for _ in 0..5 {
        let reply = b2
            .request(json!({"type": "unsubscribe", "channel": "room:sub"}))
            .await;
        assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
        b2.subscribe("room:sub").await;
    }
    api_publish(n2, json!({"channel": "room:sub", "data": "still-on"})).await;
    let got = cluster.barrier(&mut [&mut a1, &mut a1b, &mut b2]).await;
    assert!(got[0].is_empty(), "unsubscribed a1 got {:?}", got[0]);
    assert_eq!(sorted_data(&got[1]), strs(&["still-on"]));
    assert_eq!(sorted_data(&got[2]), strs(&["still-on"]));
    let redis = &cluster.redis;
    assert_eq!(redis.numsub(topic).await, 2);

    // The last local subscriber leaves by disconnecting: n1 unsubscribes, n2 stays.
    a1b.close().await;
    eventually("n1 unsubscribes from room:sub", || async {
        redis.numsub(topic).await == 1
    })
    .await;
    assert_eq!(redis.channels("pushgate:ch:*").await, [topic]);
    let reply = b2
        .request(json!({"type": "unsubscribe", "channel": "room:sub"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    eventually("no node subscribes to any channel", || async {
        redis.channels("pushgate:ch:*").await.is_empty()
    })
    .await;

    // User topics follow local connections the same way.
    a1.close().await;
    eventually("n1 drops alice's user topic", || async {
        redis.numsub("pushgate:user:alice").await == 0
    })
    .await;
    assert_eq!(redis.numsub("pushgate:user:bob").await, 1);
    // The permanent topics stay.
    assert_eq!(redis.numsub("pushgate:broadcast").await, 3);
    assert_eq!(redis.numsub("pushgate:control").await, 3);
    assert_eq!(redis.numsub("pushgate:node:n1").await, 1);
}

#[tokio::test]
async fn a_plain_redis_publish_reaches_every_node() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut subscribers = Vec::new();
    for (node, user) in [(n1, "alice"), (n2, "bob"), (n3, "alice")] {
        let mut s = connect(node, user).await;
        s.subscribe("room:backend").await;
        subscribers.push(s);
    }
    let mut bystander = connect(n2, "carol").await;
    let redis = &cluster.redis;
    let before = unix_millis();

    let receivers = redis
        .publish("pushgate:ch:room:backend", r#"{"data":{"k":"plain"}}"#)
        .await;
    assert_eq!(receivers, 3, "each node subscribes once");
    let full = r#"{"id":"backend-1","ts":1700000000000,"from":"billing","data":"full"}"#;
    redis.publish("pushgate:ch:room:backend", full).await;
    assert_eq!(
        redis
            .publish("pushgate:user:alice", r#"{"data":"to-alice"}"#)
            .await,
        2
    );
    assert_eq!(
        redis
            .publish("pushgate:broadcast", r#"{"data":"to-all"}"#)
            .await,
        3
    );
    let after = unix_millis();

    let [s1, s2, s3] = &mut subscribers[..] else {
        unreachable!()
    };
    let got = cluster.barrier(&mut [s1, s2, s3, &mut bystander]).await;
    for (i, deliveries) in got[..3].iter().enumerate() {
        let plain: Vec<&Delivery> = deliveries
            .iter()
            .filter(|d| d.data == json!({"k": "plain"}))
            .collect();
        assert_eq!(plain.len(), 1, "subscriber {i}: {deliveries:?}");
        let d = plain[0];
        assert_eq!(d.channel.as_deref(), Some("room:backend"));
        assert_eq!(d.from, None);
        assert_generated_id(&d.id);
        assert!(
            (before..=after + 1000).contains(&d.ts),
            "ts {} filled in with the time of receipt",
            d.ts
        );
        let d = find(deliveries, "full");
        assert_eq!(
            (d.id.as_str(), d.ts, d.from.as_deref()),
            ("backend-1", 1_700_000_000_000, Some("billing"))
        );
        assert_eq!(find(deliveries, "to-all").broadcast, Some(true));
    }
    let alice = [&got[0], &got[2]];
    for deliveries in alice {
        assert_eq!(find(deliveries, "to-alice").user.as_deref(), Some("alice"));
        assert_eq!(deliveries.len(), 4, "{deliveries:?}");
    }
    assert_eq!(got[1].len(), 3, "bob: {:?}", got[1]);
    assert_eq!(sorted_data(&got[3]), strs(&["to-all"]), "bystander");
}

#[tokio::test]
async fn invalid_payloads_on_redis_are_counted_and_dropped() {
    let cluster = Cluster::start(3, &[]).await;
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        assert_eq!(metric(&node.base(), INVALID).await, 0.0);
        let mut s = connect(node, "alice").await;
        s.subscribe("room:inv").await;
        subscribers.push(s);
    }
    let redis = &cluster.redis;
    let invalid = [
        "not json",
        r#"{"data":1"#,
        r#"{"nodata":1}"#,
        r#"{"id":"","data":1}"#,
        r#"{"ts":"yesterday","data":1}"#,
        "[1,2,3]",
        r#""a string""#,
        "",
    ];
    for payload in invalid {
        assert_eq!(redis.publish("pushgate:ch:room:inv", payload).await, 3);
    }
    redis.publish("pushgate:user:alice", "{}").await;
    redis.publish("pushgate:broadcast", "nope").await;
    redis.publish("pushgate:control", "nope").await;
    redis.publish("pushgate:node:n2", "nope").await;
    redis
        .publish("pushgate:ch:room:inv", r#"{"data":"valid"}"#)
        .await;

    let [s1, s2, s3] = &mut subscribers[..] else {
        unreachable!()
    };
    let got = cluster.barrier(&mut [s1, s2, s3]).await;
    for (i, deliveries) in got.iter().enumerate() {
        assert_eq!(sorted_data(deliveries), strs(&["valid"]), "subscriber {i}");
    }
    // Everything before the barrier has been read, so the counts are final.
    let on_every_node = (invalid.len() + 3) as f64;
    for node in &cluster.nodes {
        let expected = on_every_node + if node.id == "n2" { 1.0 } else { 0.0 };
        assert_eq!(
            metric(&node.base(), INVALID).await,
            expected,
            "invalid messages counted on {}",
            node.id
        );
        assert_eq!(node.readyz().await, 200);
    }
    // And the nodes keep serving clients.
    api_publish(
        &cluster.nodes[2],
        json!({"channel": "room:inv", "data": "later"}),
    )
    .await;
    for s in &mut subscribers {
        assert_eq!(s.message().await.data, json!("later"));
    }
}

#[tokio::test]
async fn redis_outage_keeps_local_delivery_and_recovers_without_restarting_nodes() {
    let mut cluster = Cluster::start(3, &["--heartbeat-interval", "300ms"]).await;
    // Each node knows the others, so each asks them during the outage (and hears they lost
    // Redis too).
    for node in &cluster.nodes {
        node.wait_peers(2).await;
    }
    let mut publisher = connect(&cluster.nodes[0], "alice").await;
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        let mut s = connect(node, "bob").await;
        s.subscribe("room:r").await;
        subscribers.push(s);
    }
    let mut leaving = connect(&cluster.nodes[1], "dave").await;
    leaving.subscribe("room:gone").await;
    let quitting = connect(&cluster.nodes[1], "erin").await;
    publish_acked(&mut publisher, "room:r", json!("before")).await;
    {
        let [s1, s2, s3] = &mut subscribers[..] else {
            unreachable!()
        };
        for got in cluster.barrier(&mut [s1, s2, s3]).await {
            assert_eq!(sorted_data(&got), strs(&["before"]));
        }
    }

    cluster.redis.stop();
    for node in &cluster.nodes {
        node.wait_broker(false).await;
        // Redis is down for every node: each still serves its clients, and stays ready.
        let health = node.health().await;
        assert_eq!(health["broker"]["isolated"], false, "{health}");
        assert_eq!(node.readyz().await, 200, "{} during the outage", node.id);
        let (status, body) = api(
            &node.base(),
            "/api/publish",
            &json!({"channel": "room:r", "data": "api-during"}),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("unavailable")),
            "API publish on {} during the outage: {body}",
            node.id
        );
        let (status, _) = api(&node.base(), "/api/disconnect", &json!({"user": "bob"})).await;
        assert_eq!(
            status, 503,
            "API disconnect on {} during the outage",
            node.id
        );
    }
    // A client publish is delivered on its own node, and says the rest of the cluster missed it.
    let reply = publisher.publish("room:r", json!("during")).await;
    assert_unavailable(&reply);
    let local = subscribers[0].message().await;
    assert_eq!(local.data, json!("during"));
    assert_eq!(local.from.as_deref(), Some("alice"));
    // A new channel cannot be subscribed without Redis, but connections are still accepted.
    let reply = subscribers[0]
        .request(json!({"type": "subscribe", "channel": "room:new"}))
        .await;
    assert_unavailable(&reply);
    let mut late = connect(&cluster.nodes[2], "carol").await;
    // What is given up during the outage is not subscribed again.
    let reply = leaving
        .request(json!({"type": "unsubscribe", "channel": "room:gone"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    quitting.close().await;
    eventually("erin's connection is gone from n2", || async {
        metric(&cluster.nodes[1].base(), "pushgate_connections").await == 2.0
    })
    .await;

    cluster.redis.restart();
    for node in &cluster.nodes {
        node.wait_broker(true).await;
        assert!(metric(&node.base(), RECONNECTS).await >= 2.0);
    }
    // Everything needed was subscribed again, including what was taken during the outage.
    let redis = &cluster.redis;
    assert_eq!(redis.numsub("pushgate:ch:room:r").await, 3);
    assert_eq!(redis.numsub("pushgate:user:carol").await, 1);
    assert_eq!(redis.numsub("pushgate:user:bob").await, 3);
    assert_eq!(
        redis.channels("pushgate:ch:*").await,
        ["pushgate:ch:room:r"]
    );
    assert_eq!(redis.numsub("pushgate:user:erin").await, 0);
    assert_eq!(redis.numsub("pushgate:user:dave").await, 1);

    publish_acked(&mut publisher, "room:r", json!("after")).await;
    api_publish(
        &cluster.nodes[2],
        json!({"channel": "room:r", "data": "after-api"}),
    )
    .await;
    api_publish(
        &cluster.nodes[0],
        json!({"user": "carol", "data": "to-carol"}),
    )
    .await;
    let [s1, s2, s3] = &mut subscribers[..] else {
        unreachable!()
    };
    let got = cluster.barrier(&mut [s1, s2, s3, &mut late]).await;
    for (i, deliveries) in got[..3].iter().enumerate() {
        assert_eq!(
            sorted_data(deliveries),
            strs(&["after", "after-api"]),
            "subscriber {i} (\"during\" stays on n1)"
        );
    }
    assert_eq!(sorted_data(&got[3]), strs(&["to-carol"]));
}

#[tokio::test]
async fn api_disconnect_closes_the_users_connections_on_every_node() {
    let cluster = Cluster::start(3, &[]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut alice = vec![
        connect(n1, "alice").await,
        connect(n2, "alice").await,
        connect(n2, "alice").await,
        connect(n3, "alice").await,
    ];
    let mut b1 = connect(n1, "bob").await;
    let mut b3 = connect(n3, "bob").await;

    let (status, body) = api(&n2.base(), "/api/disconnect", &json!({"user": "alice"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed_on_this_node"], json!(2), "{body}");
    for a in &mut alice {
        assert_eq!(a.closed().await, Some(4003), "alice on {}", a.node);
    }
    eventually("no node holds alice's user topic", || async {
        cluster.redis.numsub("pushgate:user:alice").await == 0
    })
    .await;

    for b in [&mut b1, &mut b3] {
        let reply = b.request(json!({"type": "ping"})).await;
        assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
    }
    api_publish(n2, json!({"broadcast": true, "data": "still-here"})).await;
    for got in cluster.barrier(&mut [&mut b1, &mut b3]).await {
        assert_eq!(sorted_data(&got), strs(&["still-here"]));
    }
}

#[tokio::test]
async fn sigterm_drains_the_node_and_exits_cleanly() {
    const DRAIN: Duration = Duration::from_secs(2);
    let mut cluster = Cluster::start(3, &["--drain-period", "2s"]).await;
    let mut clients = Vec::new();
    for i in 0..16 {
        clients.push(connect(&cluster.nodes[0], &format!("user{i}")).await);
    }
    let mut watcher = connect(&cluster.nodes[1], "watcher").await;

    let started = Instant::now();
    cluster.nodes[0].signal("TERM");
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let code = c.closed().await;
                (code, Instant::now())
            })
        })
        .collect();
    let n1 = &cluster.nodes[0];
    n1.wait_ready(503).await;
    let refused = Client::connect(&n1.ws_url(), &token("late", &[], &[]))
        .await
        .err()
        .expect("a draining node refuses new connections");
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(cluster.nodes[1].readyz().await, 200);

    let mut times = Vec::new();
    for close in closes {
        let (code, at) = close.await.expect("close task");
        assert_eq!(code, Some(1001));
        times.push(at);
    }
    let spread = times
        .iter()
        .max()
        .unwrap()
        .duration_since(*times.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(500),
        "closes are spread over the drain period, not all at once ({spread:?})"
    );
    let limit = (DRAIN + Duration::from_secs(1)).saturating_sub(started.elapsed());
    let status = cluster.nodes[0].wait_exit(limit).await;
    assert_eq!(status.code(), Some(0), "{status:?}");

    // The rest of the cluster carries on.
    cluster.nodes.remove(0);
    api_publish(
        &cluster.nodes[1],
        json!({"broadcast": true, "data": "after-drain"}),
    )
    .await;
    let got = cluster.barrier(&mut [&mut watcher]).await;
    assert_eq!(sorted_data(&got[0]), strs(&["after-drain"]));
}

#[tokio::test]
async fn killed_subscriber_connections_are_reestablished() {
    let cluster = Cluster::start(3, &["--redis-probe-interval", "500ms"]).await;
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        assert_eq!(metric(&node.base(), RECONNECTS).await, 1.0);
        let mut s = connect(node, "alice").await;
        s.subscribe("room:k").await;
        subscribers.push(s);
    }

    let killed = cluster
        .redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .await;
    assert_eq!(
        killed,
        redis::Value::Int(3),
        "one subscriber connection per node"
    );
    for node in &cluster.nodes {
        let base = node.base();
        eventually(&format!("{} resubscribed", node.id), || {
            let base = base.clone();
            async move {
                metric(&base, RECONNECTS).await >= 2.0
                    && metric(&base, "pushgate_redis_up").await == 1.0
            }
        })
        .await;
    }
    let redis = &cluster.redis;
    assert_eq!(redis.numsub("pushgate:ch:room:k").await, 3);
    assert_eq!(redis.numsub("pushgate:user:alice").await, 3);

    publish_acked(&mut subscribers[0], "room:k", json!("after-kill")).await;
    api_publish(
        &cluster.nodes[1],
        json!({"user": "alice", "data": "user-after-kill"}),
    )
    .await;
    let [s1, s2, s3] = &mut subscribers[..] else {
        unreachable!()
    };
    for got in cluster.barrier(&mut [s1, s2, s3]).await {
        assert_eq!(sorted_data(&got), strs(&["after-kill", "user-after-kill"]));
    }
}

#[tokio::test]
async fn a_paused_redis_is_detected_by_the_liveness_probe() {
    let flags = ["--redis-probe-interval", "300ms", "--redis-timeout", "1s"];
    let cluster = Cluster::start(3, &flags).await;
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        let mut s = connect(node, "alice").await;
        s.subscribe("room:p").await;
        subscribers.push(s);
    }
    let mut local = connect(&cluster.nodes[0], "bob").await;
    local.subscribe("room:local").await;

    // The connections stay open, but nothing comes back: only the probe can tell.
    cluster.redis.signal("STOP");
    for node in &cluster.nodes {
        node.wait_broker(false).await;
        assert!(metric(&node.base(), "pushgate_redis_probe_failures_total").await >= 1.0);
    }
    let started = Instant::now();
    let reply = local.publish("room:local", json!("paused")).await;
    assert_unavailable(&reply);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a publish waits at most the Redis timeout ({:?})",
        started.elapsed()
    );
    assert_eq!(local.message().await.data, json!("paused"));

    cluster.redis.signal("CONT");
    for node in &cluster.nodes {
        node.wait_broker(true).await;
    }
    publish_acked(&mut subscribers[2], "room:p", json!("resumed")).await;
    let [s1, s2, s3] = &mut subscribers[..] else {
        unreachable!()
    };
    for got in cluster.barrier(&mut [s1, s2, s3]).await {
        assert_eq!(sorted_data(&got), strs(&["resumed"]));
    }
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let mut cluster = Cluster::start(1, &["--drain-period", "1s"]).await;
    let mut client = connect(&cluster.nodes[0], "alice").await;
    cluster.nodes[0].signal("INT");
    assert_eq!(client.closed().await, Some(1001));
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(2)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Every field of `expected` (an object) has its value in `got`.
fn assert_fields(got: &Value, expected: &Value) {
    for (k, v) in expected.as_object().expect("an object") {
        assert_eq!(&got[k], v, "{k} in {got}");
    }
}

/// The nodes `node` has heard from (itself included) and their total connections.
async fn cluster_view(node: &NodeProcess) -> (Vec<String>, u64) {
    let (status, stats) = api_get(&node.base(), "/api/stats").await;
    assert_eq!(status, 200, "{stats}");
    let nodes = stats["cluster"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no cluster.nodes in {stats}"))
        .iter()
        .map(|n| n["node"].as_str().unwrap_or_default().to_owned())
        .collect();
    (nodes, stats["cluster"]["connections"].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn stats_show_every_node_of_the_cluster() {
    let mut cluster = Cluster::start(3, &["--heartbeat-interval", "200ms"]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut a1 = connect(n1, "alice").await;
    a1.subscribe("room:1").await;
    a1.subscribe("room:2").await;
    let _b2 = connect(n2, "bob").await;
    let _b2b = connect(n2, "bob").await;
    let _c3 = connect(n3, "carol").await;
    for node in [n1, n2, n3] {
        eventually(&format!("{} sees the whole cluster", node.id), || async {
            cluster_view(node).await == (strs(&["n1", "n2", "n3"]), 4)
        })
        .await;
    }
    let (_, stats) = api_get(&n1.base(), "/api/stats").await;
    assert_fields(
        &stats["node"],
        &json!({"node": "n1", "connections": 1, "users": 1, "channels": 2, "draining": false,
                "broker": "redis", "broker_ready": true}),
    );
    assert_eq!(
        (&stats["broker"], &stats["broker_ready"]),
        (&json!("redis"), &json!(true))
    );
    let (_, stats) = api_get(&n2.base(), "/api/stats").await;
    assert_fields(
        &stats["node"],
        &json!({"node": "n2", "connections": 2, "users": 1, "channels": 0, "draining": false}),
    );

    // A node that stops sending heartbeats leaves the others' view.
    drop(cluster.nodes.remove(0));
    for node in &cluster.nodes {
        eventually(&format!("{} forgets n1", node.id), || async {
            cluster_view(node).await == (strs(&["n2", "n3"]), 3)
        })
        .await;
    }
}

#[tokio::test]
async fn a_node_cut_off_from_redis_alone_is_unready_and_refuses_new_clients_until_it_is_back() {
    const FLAGS: &[&str] = &[
        "--heartbeat-interval",
        "300ms",
        "--redis-probe-interval",
        "300ms",
        "--redis-timeout",
        "1s",
    ];
    // n1 reaches Redis through a proxy that can cut the link; n2 directly.
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(([127, 0, 0, 1], redis.port()).into()).await;
    let n1 = NodeProcess::spawn("n1", Some(&format!("redis://{}/", proxy.addr)), FLAGS).await;
    let n2 = NodeProcess::spawn("n2", Some(&redis.url()), FLAGS).await;
    for node in [&n1, &n2] {
        node.wait_ready(200).await;
        node.wait_peers(1).await;
    }
    let mut kept = connect(&n1, "alice").await;
    kept.subscribe("room:kept").await;

    proxy.cut();
    n1.wait_broker(false).await;
    n1.wait_ready(503).await;
    let readyz: Value = reqwest::get(n1.url("/readyz"))
        .await
        .expect("GET /readyz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        readyz["reason"], "other nodes reach the broker and this node does not",
        "{readyz}"
    );
    assert_eq!(n1.health().await["broker"]["isolated"], true);
    assert_eq!(metric(&n1.base(), "pushgate_broker_isolated").await, 1.0);
    // n2 still reaches Redis and stays ready.
    assert_eq!(n2.readyz().await, 200);
    assert_eq!(n2.health().await["broker"]["ready"], true);

    // New clients go elsewhere; the ones n1 has stay and are served on n1.
    let refused = Client::connect(&n1.ws_url(), &token("late", &["room:*"], &["room:*"]))
        .await
        .err()
        .expect("a node cut off from Redis refuses new connections");
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    let reply = kept.publish("room:kept", json!("local")).await;
    assert_unavailable(&reply);
    assert_eq!(kept.message().await.data, json!("local"));

    proxy.restore();
    n1.wait_broker(true).await;
    n1.wait_ready(200).await;
    assert_eq!(metric(&n1.base(), "pushgate_broker_isolated").await, 0.0);
    let mut late = connect(&n1, "late").await;
    late.subscribe("room:kept").await;
    api_publish(&n2, json!({"channel": "room:kept", "data": "across"})).await;
    assert_eq!(kept.message().await.data, json!("across"));
    assert_eq!(late.message().await.data, json!("across"));
}
