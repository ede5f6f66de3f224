//! History and recovery, recent history on join (`recent`, `history`), presence and SSE on a
//! real cluster: one `redis-server` and several `pushgate serve` processes.
//!
//! Every history message carries its offset, so "exactly these, in order, none twice" is checked
//! on offsets: a client's offsets must run up by one with no repeat. Waits are bounded and end
//! on an event (a sentinel message, a metric, a presence change); none sleeps a fixed time to
//! let something happen, except where the point is that time passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::{Delivery, Position, ServerFrame};
use pushgate_tests::{
    Client, Cluster, Nginx, NodeProcess, RedisServer, Scratch, SseClient, WAIT, api, api_get,
    eventually, metric, token, tool,
};
use serde_json::{Value, json};

const HISTORY: &[&str] = &["--history", "chat:*=1000/10m"];
const TTL_MS: u64 = 600_000;

fn chat_token(user: &str) -> String {
    token(user, &["chat:*", "room:*"], &["chat:*"])
}

async fn connect(node: &NodeProcess, user: &str) -> Client {
    let client = Client::connect(&node.ws_url(), &chat_token(user))
        .await
        .unwrap_or_else(|r| panic!("{user} refused by {}: {r:?}", node.id));
    assert_eq!(client.node, node.id);
    client
}

/// `/api/publish` on `node`; returns the offset the message got.
async fn api_publish(node: &NodeProcess, channel: &str, data: Value) -> u64 {
    let (status, reply) = api(
        &node.base(),
        "/api/publish",
        &json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "publish on {}: {reply}", node.id);
    reply["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {reply}"))
}

async fn publish_acked(client: &mut Client, channel: &str, data: Value) {
    let reply = client.publish(channel, data.clone()).await;
    assert!(
        matches!(reply, ServerFrame::Ack { .. }),
        "publish {data} from {}: {reply:?}",
        client.node
    );
}

/// A backend's publish into a history channel (`FCALL pushgate_publish`).
async fn backend_publish(cluster: &Cluster, channel: &str, data: Value) -> u64 {
    let envelope = json!({ "data": data }).to_string();
    cluster
        .redis
        .publish_history(channel, &envelope, 1000, TTL_MS)
        .await
        .0
}

/// Checks that `got` runs from offset `first` up by one, in `epoch`, and returns the data.
fn in_order(got: &[Delivery], first: u64, epoch: &str) -> Vec<Value> {
    for (i, d) in got.iter().enumerate() {
        assert_eq!(
            (d.offset, d.epoch.as_deref()),
            (Some(first + i as u64), Some(epoch)),
            "delivery {i} of {}: {:?}",
            got.len(),
            got.iter().map(|d| d.offset).collect::<Vec<_>>()
        );
    }
    got.iter().map(|d| d.data.clone()).collect()
}

fn texts(prefix: &str, range: std::ops::Range<usize>) -> Vec<Value> {
    range.map(|i| json!(format!("{prefix}{i}"))).collect()
}

#[tokio::test]
async fn a_client_that_reconnects_elsewhere_gets_exactly_what_it_missed() {
    let cluster = Cluster::start(3, HISTORY).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut reader = connect(n1, "alice").await;
    let sub = reader.subscribe_since("chat:1", None).await;
    assert_eq!(sub.position().offset, 0);
    let epoch = sub.position().epoch.clone();
    let mut writer = connect(n2, "bob").await;
    publish_acked(&mut writer, "chat:1", json!("before-1")).await;
    api_publish(n2, "chat:1", json!("before-2")).await;
    let got = reader.messages_until(&json!("before-2")).await;
    assert_eq!(in_order(&got, 1, &epoch), texts("before-", 1..3));
    let last = got.last().unwrap().position().unwrap();
    reader.close().await;

    // 50 messages while it is away: client publishes and API publishes on n2, and a backend's
    // FCALL, interleaved.
    let mut expected = Vec::new();
    for i in 0..50 {
        let data = json!(format!("missed-{i}"));
        match i % 3 {
            0 => publish_acked(&mut writer, "chat:1", data.clone()).await,
            1 => {
                api_publish(n2, "chat:1", data.clone()).await;
            }
            _ => {
                backend_publish(&cluster, "chat:1", data.clone()).await;
            }
        }
        expected.push(data);
    }

    let mut back = connect(n3, "alice").await;
    let sub = back.subscribe_since("chat:1", Some(&last)).await;
    assert_eq!(sub.recovered(), Some(true));
    assert_eq!(
        sub.position(),
        &Position {
            offset: 52,
            epoch: epoch.clone()
        }
    );
    let recovered = back.messages_until(&json!("missed-49")).await;
    assert_eq!(in_order(&recovered, 3, &epoch), expected);

    // Then live traffic, once: everything before the barrier is exactly these two.
    api_publish(n1, "chat:1", json!("live-1")).await;
    publish_acked(&mut writer, "chat:1", json!("live-2")).await;
    let got = back.messages_until(&json!("live-2")).await;
    assert_eq!(in_order(&got, 53, &epoch), texts("live-", 1..3));
    let more = cluster.barrier(&mut [&mut back]).await;
    assert!(more[0].is_empty(), "after live traffic: {:?}", more[0]);
}

#[tokio::test]
async fn recovery_under_continuous_publishing_has_no_gap_and_no_duplicate() {
    let cluster = Arc::new(Cluster::start(3, HISTORY).await);
    let (n1, n3) = (&cluster.nodes[0], &cluster.nodes[2]);
    let mut reader = connect(n1, "alice").await;
    let epoch = reader
        .subscribe_since("chat:2", None)
        .await
        .position()
        .epoch
        .clone();
    api_publish(n1, "chat:2", json!("first")).await;
    let last = reader.message().await.position().unwrap();
    reader.close().await;

    // Two publishers run through the reconnect: the API of n2 and a backend.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for kind in ["api", "backend"] {
        let (cluster, stop, published) = (cluster.clone(), stop.clone(), published.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let data = json!(format!("{kind}-{i}"));
                match kind {
                    "api" => api_publish(&cluster.nodes[1], "chat:2", data).await,
                    _ => backend_publish(&cluster, "chat:2", data).await,
                };
                published.fetch_add(1, Ordering::AcqRel);
                i += 1;
            }
            i
        }));
    }
    // Subscribe while messages keep coming, some before the history read, some after.
    let started = published.load(Ordering::Acquire);
    let mut back = connect(n3, "alice").await;
    let sub = back.subscribe_since("chat:2", Some(&last)).await;
    assert_eq!(sub.recovered(), Some(true));
    let read_at = sub.position().offset;
    eventually("more messages after the subscribe", || {
        let published = published.clone();
        async move { published.load(Ordering::Acquire) >= started + 100 }
    })
    .await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }
    let end = api_publish(n1, "chat:2", json!("end")).await;
    assert!(
        end > read_at + 50,
        "publishing continued past the subscribe: {read_at} {end}"
    );

    let got = back.messages_until(&json!("end")).await;
    let data = in_order(&got, 2, &epoch);
    assert_eq!(got.len() as u64, end - 1);
    let mut unique = data.clone();
    unique.sort_by_key(|v| v.to_string());
    unique.dedup();
    assert_eq!(unique.len(), data.len(), "a message arrived twice");
    let more = cluster.barrier(&mut [&mut back]).await;
    assert!(more[0].is_empty(), "{:?}", more[0]);
}

#[tokio::test]
async fn a_position_older_than_history_is_not_recovered() {
    let cluster = Cluster::start(2, &["--history", "chat:*=5/10m"]).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut c = connect(n1, "alice").await;
    let epoch = c
        .subscribe_since("chat:3", None)
        .await
        .position()
        .epoch
        .clone();
    api_publish(n1, "chat:3", json!("seen")).await;
    let last = c.message().await.position().unwrap();
    c.close().await;
    for i in 0..10 {
        api_publish(n2, "chat:3", json!(format!("trimmed-{i}"))).await;
    }
    let mut back = connect(n2, "alice").await;
    let sub = back.subscribe_since("chat:3", Some(&last)).await;
    assert_eq!(sub.recovered(), Some(false));
    assert_eq!(
        sub.position(),
        &Position {
            offset: 11,
            epoch: epoch.clone()
        }
    );
    // Nothing of the history follows, and live messages continue from the position.
    api_publish(n1, "chat:3", json!("live")).await;
    let got = back.messages_until(&json!("live")).await;
    assert_eq!(in_order(&got, 12, &epoch), [json!("live")]);
    let (_, doc) = api_get(&n1.base(), "/api/history/chat:3?since=0").await;
    let offsets: Vec<u64> = (doc["messages"].as_array().unwrap().iter())
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [8, 9, 10, 11, 12]);
}

#[tokio::test]
async fn a_deleted_history_starts_a_new_epoch_and_is_not_recovered() {
    let cluster = Cluster::start(2, HISTORY).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut c = connect(n1, "alice").await;
    let old = c
        .subscribe_since("chat:4", None)
        .await
        .position()
        .epoch
        .clone();
    for i in 0..3 {
        api_publish(n2, "chat:4", json!(i)).await;
    }
    let last = c
        .messages_until(&json!(2))
        .await
        .last()
        .unwrap()
        .position()
        .unwrap();
    c.close().await;
    cluster
        .redis
        .command(&["DEL", "pushgate:history:chat:4", "pushgate:meta:chat:4"])
        .await;

    let mut back = connect(n2, "alice").await;
    let sub = back.subscribe_since("chat:4", Some(&last)).await;
    assert_eq!(sub.recovered(), Some(false));
    assert_ne!(sub.position().epoch, old, "a new epoch");
    assert_eq!(sub.position().offset, 0);
    let new = sub.position().epoch.clone();
    // Offsets restart in the new epoch.
    assert_eq!(api_publish(n1, "chat:4", json!("again")).await, 1);
    let got = back.messages_until(&json!("again")).await;
    assert_eq!(in_order(&got, 1, &new), [json!("again")]);

    // Deleted under a subscriber, then published to: the subscriber follows the new epoch.
    cluster
        .redis
        .command(&["DEL", "pushgate:history:chat:4", "pushgate:meta:chat:4"])
        .await;
    backend_publish(&cluster, "chat:4", json!("newer")).await;
    let m = back.message().await;
    assert_eq!((m.offset, m.data), (Some(1), json!("newer")));
    assert_ne!(m.epoch.as_deref(), Some(new.as_str()));
}

#[tokio::test]
async fn a_redis_restarted_from_its_append_only_file_starts_a_new_epoch() {
    // With `appendfsync everysec` a restart can lose the last second of writes, offsets
    // included: offsets handed out before must not be handed out again in the same epoch. So
    // an epoch belongs to the Redis process that made it, even when nothing was lost (as here,
    // with `always`).
    let dir = Scratch::new("aof");
    let mut redis = RedisServer::start_with(
        &[],
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            &dir.path(""),
        ],
    );
    let library = include_str!("../../crates/gateway/src/broker/pushgate.lua");
    redis.command(&["FUNCTION", "LOAD", library]).await;
    let first = redis
        .publish_history("chat:aof", r#"{"data":1}"#, 100, TTL_MS)
        .await;
    let second = redis
        .publish_history("chat:aof", r#"{"data":2}"#, 100, TTL_MS)
        .await;
    assert_eq!((first.0, second.0), (1, 2));
    assert_eq!(first.1, second.1);

    redis.restart();
    // The file brought the history back...
    let kept: Option<String> = redis
        .command_as(&["HGET", "pushgate:meta:chat:aof", "offset"])
        .await
        .expect("HGET");
    assert_eq!(kept.as_deref(), Some("2"));
    // ...and the next message starts a new epoch.
    let third = redis
        .publish_history("chat:aof", r#"{"data":3}"#, 100, TTL_MS)
        .await;
    assert_ne!(third.1, first.1);
    assert_eq!(third.0, 1);
}

#[tokio::test]
async fn a_node_whose_subscription_drops_still_delivers_every_message_once() {
    subscription_drop(&[]).await;
}

/// With small queues the node's catch-up skips connections whose queue is half full (they fill
/// the gap from history themselves): it closes no one as a slow consumer.
#[tokio::test]
async fn a_subscription_drop_with_small_queues_closes_no_one_and_loses_nothing() {
    subscription_drop(&["--outbound-queue", "16"]).await;
}

/// Kills n1's Redis subscription while two publishers run; every client of n1 must still get
/// every message once, in order. Returns n1's `pushgate_history_gaps_total`.
async fn subscription_drop(extra: &[&str]) -> f64 {
    let flags: Vec<&str> = HISTORY.iter().chain(extra).copied().collect();
    let cluster = Arc::new(Cluster::start(3, &flags).await);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut a1 = connect(n1, "alice").await;
    let mut a2 = connect(n1, "bob").await;
    let mut b = connect(n2, "carol").await;
    let mut epoch = String::new();
    for c in [&mut a1, &mut a2, &mut b] {
        let sub = c.subscribe_since("chat:5", None).await;
        assert_eq!(sub.position().offset, 0);
        epoch = sub.position().epoch.clone();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (cluster, stop, published) = (cluster.clone(), stop.clone(), published.clone());
        tokio::spawn(async move {
            let mut writer = connect(&cluster.nodes[1], "dave").await;
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let data = json!(i);
                if i % 2 == 0 {
                    backend_publish(&cluster, "chat:5", data).await;
                } else {
                    publish_acked(&mut writer, "chat:5", data).await;
                }
                published.fetch_add(1, Ordering::AcqRel);
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let wait_for = |n: u64| {
        let published = published.clone();
        eventually("messages published", move || {
            let published = published.clone();
            async move { published.load(Ordering::Acquire) >= n }
        })
    };
    wait_for(50).await;
    // Only n1's Pub/Sub connection goes.
    let id = cluster.redis.pubsub_client_of(n1).await;
    cluster.redis.command(&["CLIENT", "KILL", "ID", &id]).await;
    eventually("n1 resubscribed", || async {
        metric(&n1.base(), "pushgate_redis_reconnects_total").await >= 2.0
    })
    .await;
    let killed_at = published.load(Ordering::Acquire);
    wait_for(killed_at + 50).await;
    stop.store(true, Ordering::Release);
    publisher.await.unwrap();
    let total = published.load(Ordering::Acquire);
    assert_eq!(
        metric(&n2.base(), "pushgate_redis_reconnects_total").await,
        1.0,
        "n2 kept its subscription"
    );

    let end = backend_publish(&cluster, "chat:5", json!("end")).await;
    assert_eq!(end, total + 1);
    for (name, c) in [("a1", &mut a1), ("a2", &mut a2), ("b", &mut b)] {
        let got = c.messages_until(&json!("end")).await;
        in_order(&got, 1, &epoch);
        assert_eq!(got.len() as u64, end, "{name}");
    }
    let more = cluster.barrier(&mut [&mut a1, &mut a2, &mut b]).await;
    assert!(more.iter().all(Vec::is_empty), "{more:?}");
    let seen_live = metric(&n1.base(), r#"pushgate_messages_in_total{source="redis"}"#).await;
    let gaps = metric(&n1.base(), "pushgate_history_gaps_total").await;
    eprintln!("n1 received {seen_live} messages live of {end}; gaps filled: {gaps}");
    gaps
}

/// Appends to `channel`'s history but publishes elsewhere: a message every node misses live,
/// as when its subscription drops it.
async fn hidden_publish(cluster: &Cluster, channel: &str, data: Value, size: u64) -> u64 {
    let mut c = cluster.redis.connection().await;
    let (offset, _): (u64, String) = redis::cmd("FCALL")
        .arg("pushgate_publish")
        .arg(2)
        .arg(format!("pushgate:history:{channel}"))
        .arg(format!("pushgate:meta:{channel}"))
        .arg("pushgate:ch:nowhere")
        .arg(json!({ "data": data }).to_string())
        .arg(size)
        .arg(TTL_MS)
        .query_async(&mut c)
        .await
        .expect("FCALL");
    offset
}

#[tokio::test]
async fn a_gap_in_live_messages_is_filled_from_history_or_ends_the_subscription() {
    let cluster = Cluster::start(2, &["--history", "chat:*=3/10m"]).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    // Redis forgets the functions (a restart, a flush): the nodes load them again.
    cluster.redis.command(&["FUNCTION", "FLUSH"]).await;
    let mut c = connect(n1, "alice").await;
    let epoch = c
        .subscribe_since("chat:7", None)
        .await
        .position()
        .epoch
        .clone();
    api_publish(n2, "chat:7", json!("m1")).await;
    assert_eq!(hidden_publish(&cluster, "chat:7", json!("m2"), 3).await, 2);
    api_publish(n2, "chat:7", json!("m3")).await;
    let got = c.messages_until(&json!("m3")).await;
    assert_eq!(
        in_order(&got, 1, &epoch),
        [json!("m1"), json!("m2"), json!("m3")]
    );
    // A backend message without an id gets one from its position, the same everywhere.
    assert_eq!(got[1].id, format!("{epoch}:2"));
    assert_eq!(metric(&n1.base(), "pushgate_history_gaps_total").await, 1.0);

    // Missed more than history keeps (3): the subscription ends, the client recovers.
    for data in ["m4", "m5", "m6"] {
        hidden_publish(&cluster, "chat:7", json!(data), 3).await;
    }
    api_publish(n2, "chat:7", json!("m7")).await;
    match c.frame().await {
        ServerFrame::Unsubscribed { channel, code, .. } => {
            assert_eq!(
                (channel.as_str(), code.as_deref()),
                ("chat:7", Some("history_lost"))
            );
        }
        other => panic!("expected history_lost, got {other:?}"),
    }
    let last = got.last().unwrap().position().unwrap();
    let sub = c.subscribe_since("chat:7", Some(&last)).await;
    assert_eq!(sub.recovered(), Some(false));
    assert_eq!(sub.position().offset, 7);
    assert_eq!(metric(&n1.base(), "pushgate_history_lost_total").await, 1.0);
}

#[tokio::test]
async fn presence_spans_the_cluster_and_a_killed_nodes_entries_expire() {
    let heartbeat = Duration::from_millis(300);
    let mut cluster = Cluster::start(
        3,
        &["--presence", "room:*", "--heartbeat-interval", "300ms"],
    )
    .await;
    let mut alice = connect(&cluster.nodes[0], "alice").await;
    let mut bob = connect(&cluster.nodes[1], "bob").await;
    let mut carol = connect(&cluster.nodes[2], "carol").await;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.subscribe("room:1").await;
    }
    let users = |clients: &[pushgate_protocol::PresenceEntry]| {
        let mut u: Vec<(String, String, String)> = clients
            .iter()
            .map(|c| (c.user.clone(), c.node.clone(), c.session.clone()))
            .collect();
        u.sort();
        u
    };
    let everyone = vec![
        ("alice".into(), "n1".into(), alice.session.clone()),
        ("bob".into(), "n2".into(), bob.session.clone()),
        ("carol".into(), "n3".into(), carol.session.clone()),
    ];
    assert_eq!(users(&alice.presence("room:1").await), everyone);
    let (status, doc) = api_get(&cluster.nodes[1].base(), "/api/presence/room:1").await;
    assert_eq!(status, 200);
    let clients: Vec<pushgate_protocol::PresenceEntry> =
        serde_json::from_value(doc["clients"].clone()).unwrap();
    assert_eq!(users(&clients), everyone);
    eventually("every node in /api/nodes", || async {
        let (_, doc) = api_get(&cluster.nodes[0].base(), "/api/nodes").await;
        let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 3 && nodes.iter().all(|n| n["connections"] == 1)
    })
    .await;

    // An unsubscribe leaves at once.
    assert!(matches!(
        bob.request(json!({"type": "unsubscribe", "channel": "room:1"}))
            .await,
        ServerFrame::Ack { .. }
    ));
    let deadline = Instant::now() + WAIT;
    while alice.presence("room:1").await.len() != 2 {
        assert!(Instant::now() < deadline, "bob still present");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A node killed without cleaning up: its entries expire within 3 heartbeat intervals.
    cluster.nodes[2].kill();
    let killed = Instant::now();
    let deadline = killed + heartbeat * 3 + Duration::from_millis(500);
    loop {
        let left = alice.presence("room:1").await;
        if left.len() == 1 {
            assert_eq!(left[0].user, "alice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol still present {:?} after the kill: {left:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "n3's presence entry expired {:?} after the kill",
        killed.elapsed()
    );
    // The live nodes keep theirs refreshed: alice is still there well past the TTL.
    tokio::time::sleep(heartbeat * 5).await;
    assert_eq!(users(&alice.presence("room:1").await), everyone[..1]);
    let (_, doc) = api_get(&cluster.nodes[0].base(), "/api/nodes").await;
    let ids: Vec<&str> = (doc["nodes"].as_array().unwrap().iter())
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n1", "n2"]);
}

#[tokio::test]
async fn sse_delivers_across_nodes_and_resumes_with_last_event_id() {
    let cluster = Cluster::start(
        2,
        &["--history", "chat:*=1000/10m", "--ping-interval", "1s"],
    )
    .await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let t = chat_token("alice");
    let mut sse = SseClient::connect(&n1.base(), "channel=chat:6&channel=room:1", &t, None).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    assert_eq!(welcome.json()["node"], "n1");
    let subscribed = sse.event().await;
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    assert_eq!(subscribed.json()["channel"], "chat:6");
    let epoch = subscribed.json()["position"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(subscribed.json()["position"]["offset"], 0);
    assert!(subscribed.json().get("recovered").is_none());
    let plain = sse.event().await;
    assert_eq!(plain.json(), json!({"channel": "room:1"}));

    // Published on the other node, by API and by a client.
    api_publish(n2, "chat:6", json!("one")).await;
    let mut writer = connect(n2, "bob").await;
    publish_acked(&mut writer, "chat:6", json!("two")).await;
    api(
        &n2.base(),
        "/api/publish",
        &json!({"channel": "room:1", "data": "plain"}),
    )
    .await;
    let mut last_id = None;
    for (offset, data) in [(1, "one"), (2, "two")] {
        let e = sse.event().await;
        assert_eq!(e.event, None, "{e:?}");
        assert_eq!(e.id.as_deref(), Some(format!("{epoch}:{offset}").as_str()));
        assert_eq!(
            (e.json()["data"].clone(), e.json()["offset"].clone()),
            (json!(data), json!(offset))
        );
        last_id = e.id;
    }
    let e = sse.event().await;
    assert_eq!(
        (e.id.clone(), e.json()["data"].clone()),
        (None, json!("plain"))
    );
    // Heartbeat comments every ping interval.
    loop {
        let e = sse.next().await.expect("stream open");
        if e.comments.iter().any(|c| c == "ping") {
            break;
        }
    }
    drop(sse);

    // Away: two more. Back on the other node with Last-Event-ID.
    api_publish(n1, "chat:6", json!("three")).await;
    backend_publish(&cluster, "chat:6", json!("four")).await;
    let mut back = SseClient::connect(&n2.base(), "channel=chat:6", &t, last_id.as_deref()).await;
    assert_eq!(back.event().await.event.as_deref(), Some("welcome"));
    let subscribed = back.event().await;
    assert_eq!(
        subscribed.json(),
        json!({"channel": "chat:6", "position": {"offset": 4, "epoch": epoch}, "recovered": true})
    );
    for (offset, data) in [(3, "three"), (4, "four")] {
        let e = back.event().await;
        assert_eq!(e.id.as_deref(), Some(format!("{epoch}:{offset}").as_str()));
        assert_eq!(e.json()["data"], data);
    }
    api_publish(n1, "chat:6", json!("five")).await;
    let e = back.event().await;
    assert_eq!(
        (e.json()["offset"].clone(), e.json()["data"].clone()),
        (json!(5), json!("five"))
    );

    // The same token rules as /ws.
    let refused = SseClient::connect(&n1.base(), "channel=secret", &t, None).await;
    assert_eq!(refused.status, 403);
    let refused = SseClient::connect(&n1.base(), "channel=chat:6", "bad", None).await;
    assert_eq!(refused.status, 401);
    let refused = SseClient::connect(&n1.base(), "", &t, None).await;
    assert_eq!(refused.status, 400);
    let by_query =
        SseClient::connect(&n1.base(), &format!("channel=chat:6&token={t}"), "", None).await;
    assert_eq!(by_query.status, 200);
}

// ---------------------------------------------------------------------------------------------
// SSE through the nginx configuration in deploy/
// ---------------------------------------------------------------------------------------------

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An SSE stream read by `curl -N`: its lines as they arrive.
struct CurlStream {
    _child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CurlStream {
    fn open(url: &str, ca: &str, token: &str, last_event_id: Option<&str>) -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new("curl");
        cmd.args(["-sN", "--cacert", ca])
            .args(["-H", &format!("Authorization: Bearer {token}")]);
        if let Some(id) = last_event_id {
            cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        let mut child = cmd
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning curl");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            _child: Child(child),
            lines,
        }
    }

    /// The next event with data: `(event, id, data)`.
    async fn event(&mut self) -> (Option<String>, Option<String>, Value) {
        let (mut event, mut id, mut data) = (None, None, None);
        loop {
            let line = tokio::task::block_in_place(|| self.lines.recv_timeout(WAIT))
                .expect("an SSE line through nginx in time");
            if line.is_empty() {
                if let Some(data) = data.take() {
                    return (event, id, data);
                }
                (event, id) = (None, None);
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(v).expect("JSON event data"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_works_through_the_nginx_configuration() {
    let (Some(nginx), Some(_), Some(_)) = (
        tool("nginx", true),
        tool("openssl", true),
        tool("curl", true),
    ) else {
        return;
    };
    let cluster = Cluster::start(2, HISTORY).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let nginx = Nginx::start(&nginx, &n1.addr.to_string(), &[]);
    let https = nginx.https;
    let ca = nginx.scratch.path("certs/ca.crt");
    let url = format!("https://localhost:{https}/sse?channel=chat:9");
    let t = chat_token("alice");

    let mut sse = CurlStream::open(&url, &ca, &t, None);
    assert_eq!(sse.event().await.0.as_deref(), Some("welcome"));
    let (event, _, data) = sse.event().await;
    assert_eq!(event.as_deref(), Some("subscribed"));
    let epoch = data["position"]["epoch"].as_str().unwrap().to_owned();
    // Published on the node nginx does not send to; each event arrives while the stream is open.
    for (offset, text) in [(1, "one"), (2, "two")] {
        api_publish(n2, "chat:9", json!(text)).await;
        let (event, id, data) = sse.event().await;
        assert_eq!(event, None);
        assert_eq!(id, Some(format!("{epoch}:{offset}")));
        assert_eq!(data["data"], text);
    }
    drop(sse);

    api_publish(n2, "chat:9", json!("three")).await;
    let mut back = CurlStream::open(&url, &ca, &t, Some(&format!("{epoch}:2")));
    assert_eq!(back.event().await.0.as_deref(), Some("welcome"));
    let (_, _, data) = back.event().await;
    assert_eq!(data["recovered"], true, "{data}");
    let (_, id, data) = back.event().await;
    assert_eq!(
        (id, data["data"].clone()),
        (Some(format!("{epoch}:3")), json!("three"))
    );
}

/// Subscribes with `recent`; returns the ack's position (the last of the messages that follow).
async fn subscribe_recent(client: &mut Client, channel: &str, recent: u64) -> Position {
    let request = json!({"type": "subscribe", "channel": channel, "recent": recent});
    match client.request(request).await {
        ServerFrame::Ack {
            position: Some(position),
            recovered: None,
            ..
        } => position,
        other => panic!("subscribe {channel} with recent {recent}: {other:?}"),
    }
}

/// A `history` request; returns the reply's position and messages.
async fn history(client: &mut Client, channel: &str, limit: Value) -> (Position, Vec<Delivery>) {
    let request = json!({"type": "history", "channel": channel, "limit": limit});
    match client.request(request).await {
        ServerFrame::History {
            channel: c,
            position,
            messages,
            ..
        } if c == channel => (position, messages),
        other => panic!("history {channel} (limit {limit}): {other:?}"),
    }
}

/// The error code a request is refused with.
async fn refused(client: &mut Client, request: Value) -> ErrorCode {
    match client.request(request.clone()).await {
        ServerFrame::Error { code, .. } => code,
        other => panic!("{request} was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn a_join_with_recent_gets_exactly_the_last_50_then_every_live_message_once() {
    let cluster = Cluster::start(3, &[HISTORY, &["--history-request-limit", "80"]].concat()).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    // 120 messages through the publisher's node n2 (a client, its API) and from a backend.
    let mut writer = connect(n2, "bob").await;
    for i in 1..=120 {
        let data = json!(format!("m{i}"));
        match i % 3 {
            0 => publish_acked(&mut writer, "chat:recent", data).await,
            1 => assert_eq!(api_publish(n2, "chat:recent", data).await, i),
            _ => assert_eq!(backend_publish(&cluster, "chat:recent", data).await, i),
        }
    }

    // A join on another node: the last 50, in order, then live messages from every door and
    // every node, each once.
    let mut reader = connect(n1, "alice").await;
    let at = subscribe_recent(&mut reader, "chat:recent", 50).await;
    assert_eq!(at.offset, 120);
    let epoch = at.epoch.clone();
    let got = reader.messages_until(&json!("m120")).await;
    assert_eq!(in_order(&got, 71, &epoch), texts("m", 71..121));
    publish_acked(&mut writer, "chat:recent", json!("live-1")).await;
    api_publish(n1, "chat:recent", json!("live-2")).await;
    api_publish(n3, "chat:recent", json!("live-3")).await;
    backend_publish(&cluster, "chat:recent", json!("live-4")).await;
    let got = reader.messages_until(&json!("live-4")).await;
    assert_eq!(in_order(&got, 121, &epoch), texts("live-", 1..5));
    let more = cluster.barrier(&mut [&mut reader]).await;
    assert!(more[0].is_empty(), "after live traffic: {:?}", more[0]);

    // Subscribing again on the same connection sends nothing more.
    let again = subscribe_recent(&mut reader, "chat:recent", 50).await;
    assert_eq!(again.offset, 124);
    let more = cluster.barrier(&mut [&mut reader]).await;
    assert!(
        more[0].is_empty(),
        "after a second subscribe: {:?}",
        more[0]
    );

    // More than the node allows (--history-request-limit 80) gets 80.
    let mut greedy = connect(n3, "carol").await;
    assert_eq!(
        subscribe_recent(&mut greedy, "chat:recent", 500)
            .await
            .offset,
        124
    );
    let got = greedy.messages_until(&json!("live-4")).await;
    in_order(&got, 45, &epoch);
    assert_eq!(got.len(), 80);

    // A channel without history: a plain subscribe, nothing sent.
    let mut plain = connect(n1, "dave").await;
    match plain
        .request(json!({"type": "subscribe", "channel": "room:1", "recent": 50}))
        .await
    {
        ServerFrame::Ack {
            position: None,
            recovered: None,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    // Both since and recent: refused.
    let both = json!({"type": "subscribe", "channel": "chat:recent", "recent": 5,
                      "since": {"offset": 1, "epoch": epoch}});
    assert_eq!(refused(&mut plain, both).await, ErrorCode::BadRequest);
}

#[tokio::test]
async fn history_requests_answer_the_last_messages_and_the_position() {
    let cluster = Cluster::start(2, &[HISTORY, &["--history-request-limit", "80"]].concat()).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    for i in 1..=120 {
        api_publish(n1, "chat:h", json!(format!("m{i}"))).await;
    }
    // Asked on the other node, by a client subscribed to nothing.
    let mut c = connect(n2, "alice").await;
    let (at, messages) = history(&mut c, "chat:h", json!(50)).await;
    assert_eq!(at.offset, 120);
    assert_eq!(in_order(&messages, 71, &at.epoch), texts("m", 71..121));
    assert!(
        messages
            .iter()
            .all(|m| m.channel.as_deref() == Some("chat:h"))
    );

    // Bounded by the node's limit; no limit is the node's limit; 0 is the position alone.
    let (_, messages) = history(&mut c, "chat:h", json!(500)).await;
    in_order(&messages, 41, &at.epoch);
    assert_eq!(messages.len(), 80);
    let (_, messages) = history(&mut c, "chat:h", Value::Null).await;
    assert_eq!(messages.len(), 80);
    assert_eq!(
        history(&mut c, "chat:h", json!(0)).await,
        (at.clone(), vec![])
    );
    // A channel nothing was published on yet: its (new) epoch at offset 0.
    let (empty, messages) = history(&mut c, "chat:none", json!(50)).await;
    assert_eq!((empty.offset, messages.len()), (0, 0));
    assert!(!empty.epoch.is_empty());

    // From the position, a subscribe with since continues with what came after.
    api_publish(n1, "chat:h", json!("after")).await;
    let sub = c.subscribe_since("chat:h", Some(&at)).await;
    assert_eq!(sub.recovered(), Some(true));
    let got = c.messages_until(&json!("after")).await;
    assert_eq!(in_order(&got, 121, &at.epoch), [json!("after")]);

    // Refused: a channel without history, one the token does not grant, bad limits and names.
    let req = |channel: &str, limit: Value| json!({"type": "history", "channel": channel, "limit": limit});
    assert_eq!(
        refused(&mut c, req("room:1", json!(5))).await,
        ErrorCode::NotFound
    );
    assert_eq!(
        refused(&mut c, req("secret:1", json!(5))).await,
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(&mut c, req("chat:h", json!(-1))).await,
        ErrorCode::BadRequest
    );
    assert_eq!(
        refused(&mut c, req("chat:h", json!("50"))).await,
        ErrorCode::BadRequest
    );
    assert_eq!(
        refused(&mut c, req("", json!(5))).await,
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn joins_with_recent_while_messages_keep_arriving_have_no_gap_and_no_duplicate() {
    let cluster = Arc::new(Cluster::start(3, HISTORY).await);
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    // A watcher on n3 from the start sees every message: the reference for what each offset
    // holds. It also makes n3 follow the channel, so a join there starts from the position n3
    // last saw, while one on n1 (nobody there) learns the top first.
    let mut watcher = connect(n3, "watcher").await;
    let epoch = watcher
        .subscribe_since("chat:busy", None)
        .await
        .position()
        .epoch
        .clone();
    for i in 1..=120 {
        api_publish(n2, "chat:busy", json!(format!("pre-{i}"))).await;
    }

    // Two publishers run through the joins: the API of n2 and a backend.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for kind in ["api", "backend"] {
        let (cluster, stop, published) = (cluster.clone(), stop.clone(), published.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let data = json!(format!("{kind}-{i}"));
                match kind {
                    "api" => api_publish(&cluster.nodes[1], "chat:busy", data).await,
                    _ => backend_publish(&cluster, "chat:busy", data).await,
                };
                published.fetch_add(1, Ordering::AcqRel);
                i += 1;
            }
        }));
    }
    let mut joiners = Vec::new();
    for node in [n1, n3] {
        let started = published.load(Ordering::Acquire);
        eventually("messages before the join", || {
            let published = published.clone();
            async move { published.load(Ordering::Acquire) >= started + 20 }
        })
        .await;
        let mut c = connect(node, "alice").await;
        let at = subscribe_recent(&mut c, "chat:busy", 50).await;
        assert_eq!(at.epoch, epoch);
        joiners.push((c, at.offset));
    }
    let started = published.load(Ordering::Acquire);
    eventually("more messages after the joins", || {
        let published = published.clone();
        async move { published.load(Ordering::Acquire) >= started + 100 }
    })
    .await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }
    let end = api_publish(n1, "chat:busy", json!("end")).await;

    let reference = watcher.messages_until(&json!("end")).await;
    in_order(&reference, 1, &epoch);
    let data_at = |offset: u64| reference[offset as usize - 1].data.clone();
    for (c, top) in &mut joiners {
        let top = *top;
        assert!(
            top > 120 && end > top + 100,
            "joined while publishing: {top} {end}"
        );
        let got = c.messages_until(&json!("end")).await;
        let data = in_order(&got, top - 49, &epoch);
        assert_eq!(got.len() as u64, end - top + 50, "joined on {}", c.node);
        let expected: Vec<Value> = (top - 49..=end).map(data_at).collect();
        assert_eq!(data, expected, "joined on {}", c.node);
    }
    let mut clients: Vec<&mut Client> = joiners.iter_mut().map(|(c, _)| c).collect();
    for more in cluster.barrier(&mut clients).await {
        assert!(more.is_empty(), "{more:?}");
    }
}
