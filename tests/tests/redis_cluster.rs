//! Nodes on a Redis Cluster (`--redis-cluster`): sharded Pub/Sub (`SPUBLISH`, `SSUBSCRIBE`), so
//! each message crosses one shard; history and presence keys in the slot of their channel's
//! topic; failover of a shard's primary.
//!
//! Each test starts its own cluster of six `redis-server`s (three primaries, three replicas), and
//! the tests take turns: six servers and three nodes each, on two cores, are enough load.

use std::time::{Duration, Instant};

use pushgate_protocol::ErrorCode;
use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{
    Client, FailoverLog, NodeProcess, RedisCluster, ScriptedRedis, Traffic, api, eventually,
};
use serde_json::{Value, json};

/// One test at a time (see the module documentation).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client of `node` that may subscribe and publish on `room:*` and `chat:*`.
async fn connect(node: &NodeProcess, user: &str) -> Client {
    node.client(user, &["room:*", "chat:*"]).await
}

/// Three nodes on `cluster`, ready.
async fn nodes(cluster: &RedisCluster, extra: &[&str]) -> Vec<NodeProcess> {
    let urls = cluster.urls();
    let mut flags = vec!["--redis-cluster", urls.as_str(), "--redis-timeout", "1s"];
    flags.extend_from_slice(extra);
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(NodeProcess::spawn(id, None, &flags).await);
    }
    for node in &nodes {
        node.wait_ready(200).await;
        node.wait_broker(true).await;
    }
    nodes
}

async fn api_publish(node: &NodeProcess, body: Value) {
    let (status, reply) = api(&node.base(), "/api/publish", &body).await;
    assert_eq!(status, 200, "publish {body} on {}: {reply}", node.id);
}

fn acked(reply: &ServerFrame) -> bool {
    matches!(reply, ServerFrame::Ack { .. })
}

#[tokio::test]
async fn channels_users_broadcasts_history_and_presence_cross_nodes_over_sharded_pubsub() {
    let _turn = TURN.lock().await;
    let cluster = RedisCluster::start().await;
    let flags = ["--history", "chat:*=100/10m", "--presence", "room:c"];
    let nodes = nodes(&cluster, &flags).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut s = connect(node, "sub").await;
        s.subscribe("room:c").await;
        subscribers.push(s);
    }
    let mut publisher = connect(&nodes[0], "pub").await;
    let mut carol = connect(&nodes[2], "carol").await;

    // A client's publish, an API publish, a backend's SPUBLISH: every subscriber, every node.
    assert!(acked(&publisher.publish("room:c", json!("client")).await));
    api_publish(&nodes[1], json!({"channel": "room:c", "data": "api"})).await;
    cluster.spublish("pushgate:ch:room:c", r#"{"data":"backend"}"#);
    for s in &mut subscribers {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(s.message().await.data);
        }
        assert_eq!(got, [json!("client"), json!("api"), json!("backend")]);
    }
    // A user on n3, from n1; a broadcast from n2 to everyone.
    api_publish(&nodes[0], json!({"user": "carol", "data": "to-carol"})).await;
    assert_eq!(carol.message().await.data, json!("to-carol"));
    // A session, through its node's topic.
    let session = carol.session.clone();
    api_publish(&nodes[0], json!({"session": session, "data": "to-session"})).await;
    assert_eq!(carol.message().await.data, json!("to-session"));
    api_publish(&nodes[1], json!({"broadcast": true, "data": "all"})).await;
    assert_eq!(carol.message().await.data, json!("all"));
    for s in &mut subscribers {
        assert_eq!(s.message().await.data, json!("all"));
    }

    // Presence: the entries of every node, in the keys of the channel's slot.
    let mut present: Vec<String> = (publisher.presence("room:c").await)
        .into_iter()
        .map(|entry| entry.node)
        .collect();
    present.sort();
    assert_eq!(present, ["n1", "n2", "n3"]);

    // History: stored and published on the shard of the channel's topic, recovered elsewhere.
    let mut reader = connect(&nodes[1], "reader").await;
    reader.subscribe("chat:1").await;
    for i in 1..=3 {
        assert!(acked(&publisher.publish("chat:1", json!(i)).await));
    }
    let first = reader.message().await.position().expect("a position");
    assert_eq!(first.offset, 1);
    let mut late = connect(&nodes[2], "late").await;
    let subscribed = late.subscribe_since("chat:1", Some(&first)).await;
    assert_eq!(subscribed.recovered, Some(true), "{subscribed:?}");
    for i in 2..=3 {
        let m = late.message().await;
        assert_eq!((m.data, m.offset), (json!(i), Some(i)));
    }

    // A primary without the function library (as a shard added by a reshard starts) gets it
    // loaded by the first history publish that needs it there, which then succeeds.
    let shard = (cluster.primary_of("pushgate:ch:chat:2").await).expect("a primary");
    cluster.servers[shard]
        .command(&["FUNCTION", "DELETE", "pushgate"])
        .await;
    let reply = publisher.publish("chat:2", json!("reloaded")).await;
    assert!(acked(&reply), "{reply:?}");
    let libraries: redis::Value = cluster.servers[shard]
        .command(&["FUNCTION", "LIST", "LIBRARYNAME", "pushgate"])
        .await;
    assert!(
        matches!(&libraries, redis::Value::Array(l) if l.len() == 1),
        "{libraries:?}"
    );

    // Braces would break the hash tag that keeps a channel's keys in its topic's slot.
    match publisher
        .request(json!({"type": "subscribe", "channel": "room:{x}"}))
        .await
    {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert_eq!(message, "channel must not contain { or } on Redis Cluster");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
}

/// `INFO commandstats` calls of `command` on the server at `index`.
async fn calls(cluster: &RedisCluster, index: usize, command: &str) -> u64 {
    let stats: String = cluster.servers[index]
        .command_as(&["INFO", "commandstats"])
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test]
async fn sharding_is_real_publishes_spread_over_every_primary() {
    let _turn = TURN.lock().await;
    let cluster = RedisCluster::start().await;
    let nodes = nodes(&cluster, &[]).await;
    let primaries = cluster.primaries().await;
    assert_eq!(primaries.len(), 3);
    let before: Vec<u64> =
        futures_util::future::join_all(primaries.iter().map(|&p| calls(&cluster, p, "spublish")))
            .await;

    // 300 channels, published through all three nodes.
    let mut watcher = connect(&nodes[2], "watcher").await;
    watcher.subscribe("room:299").await;
    for i in 0..300 {
        let node = &nodes[i % 3];
        api_publish(node, json!({"channel": format!("room:{i}"), "data": i})).await;
    }
    assert_eq!(watcher.message().await.data, json!(299));

    let mut spread = Vec::new();
    for (&p, before) in primaries.iter().zip(before) {
        spread.push(calls(&cluster, p, "spublish").await - before);
        assert_eq!(
            calls(&cluster, p, "publish").await,
            0,
            "a plain PUBLISH on {p}"
        );
        assert_eq!(calls(&cluster, p, "psubscribe").await, 0);
        assert_eq!(calls(&cluster, p, "subscribe").await, 0);
    }
    let total: u64 = spread.iter().sum();
    println!("sharded pubsub: SPUBLISH per primary {spread:?} of {total}");
    assert!(total >= 300, "{spread:?}");
    for n in &spread {
        assert!(*n > 0 && *n * 2 <= total, "{spread:?}");
    }

    // One subscriber connection per node on each primary, at most.
    for &p in &primaries {
        let list: String = cluster.servers[p]
            .command_as(&["CLIENT", "LIST"])
            .await
            .expect("CLIENT LIST");
        let subscribers = list.lines().filter(|l| !l.contains(" ssub=0 ")).count();
        assert!(subscribers <= nodes.len(), "{p}: {list}");
    }
}

#[tokio::test]
async fn a_primarys_death_under_traffic_is_followed_and_nothing_is_reused_or_skipped_silently() {
    let _turn = TURN.lock().await;
    let mut cluster = RedisCluster::start().await;
    let flags = [
        "--redis-probe-interval",
        "500ms",
        "--history",
        "chat:*=1000/10m",
    ];
    let nodes = nodes(&cluster, &flags).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut s = connect(node, "sub").await;
        s.subscribe("room:busy").await;
        s.subscribe("chat:busy").await;
        subscribers.push(s);
    }
    let traffic = Traffic::start(&nodes);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The primary of the history channel's slot dies (and, as it happens, maybe the plain
    // channel's too) while both take 100 messages/s.
    let victim = (cluster.primary_of("pushgate:ch:chat:busy").await).expect("a primary");
    cluster.servers[victim].stop();
    let killed = Instant::now();
    // The shard's replica takes over after cluster-node-timeout (2 s).
    eventually("a replica promoted for chat:busy", || async {
        cluster
            .primary_of("pushgate:ch:chat:busy")
            .await
            .is_some_and(|p| p != victim)
    })
    .await;
    cluster.wait_healthy().await;
    let promoted = Instant::now();

    // Publishing through every node works again.
    Traffic::wait_accepted(&nodes).await;
    let resumed = promoted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, refused) = traffic.stop().await;
    println!(
        "cluster failover: promoted {:?} after the kill, publishing resumed {resumed:?} later; \
         {sent} rounds, {refused} publishes refused",
        promoted - killed
    );
    assert!(resumed < Duration::from_secs(5), "{resumed:?}");
    Traffic::publish_after(&nodes[2]).await;

    for (i, s) in subscribers.iter_mut().enumerate() {
        let log = FailoverLog::read(s).await;
        println!("cluster failover: subscriber {i}: {log}");
        log.check(i);
    }
}

#[tokio::test]
async fn a_live_reshard_of_a_busy_history_channel_loses_nothing_and_keeps_its_epoch() {
    let _turn = TURN.lock().await;
    let cluster = RedisCluster::start().await;
    let history = [
        "--history",
        "chat:*=1000/10m",
        "--redis-probe-interval",
        "500ms",
    ];
    let nodes = nodes(&cluster, &history).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut s = connect(node, "sub").await;
        s.subscribe("chat:busy").await;
        s.subscribe("room:busy").await;
        subscribers.push(s);
    }

    // 100 messages a second on each channel, through every node, for the whole drill.
    let traffic = Traffic::start(&nodes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for key in ["pushgate:ch:chat:busy", "pushgate:ch:room:busy"] {
        let from = (cluster.primary_of(key).await).expect("a primary");
        let to = (cluster.primaries().await)
            .into_iter()
            .find(|p| *p != from)
            .expect("another primary");
        cluster.move_slot(key, to).await;
        assert_eq!(cluster.primary_of(key).await, Some(to));
    }
    let moved = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (sent, refused) = traffic.stop().await;
    println!("cluster reshard: {sent} rounds published, {refused} publishes refused");

    // The last word on each channel, published after the move, reaches everyone.
    for channel in ["chat:busy", "room:busy"] {
        api_publish(&nodes[0], json!({"channel": channel, "data": "end"})).await;
    }
    for (i, s) in subscribers.iter_mut().enumerate() {
        let (mut offsets, mut plain, mut ended) = (Vec::new(), 0, 0);
        while ended < 2 {
            match s.frame().await {
                ServerFrame::Message(m) => {
                    if m.data == json!("end") {
                        ended += 1;
                    }
                    match m.position() {
                        Some(p) => offsets.push((p.epoch, p.offset)),
                        None => plain += 1,
                    }
                }
                other => panic!("subscriber {i}: {other:?}"),
            }
        }
        // History: one epoch (the keys moved whole), every offset once, in order, none skipped.
        let epoch = &offsets[0].0;
        assert!(
            offsets.iter().all(|(e, _)| e == epoch),
            "subscriber {i}: {offsets:?}"
        );
        let offsets: Vec<u64> = offsets.iter().map(|(_, o)| *o).collect();
        let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "subscriber {i}");
        // History: every accepted publish and the end (a refused publish may still have gone
        // out: it timed out). Plain channels are at most once: one published while the
        // subscription moves to the new owner can be missed, never delivered twice.
        let history = offsets.len() as u64;
        assert!(
            (sent + 1 - refused..=sent + 1).contains(&history),
            "subscriber {i}: {history} history messages of {sent} rounds, {refused} refused"
        );
        assert!(
            plain <= sent + 1,
            "subscriber {i}: {plain} plain of {sent} rounds"
        );
        println!(
            "cluster reshard: subscriber {i}: {history} history, {plain} plain of {sent} rounds"
        );
    }
    println!(
        "cluster reshard: the end reached everyone {:?} after the move",
        moved.elapsed()
    );
}

#[tokio::test]
async fn the_local_cluster_script_starts_a_cluster_that_nodes_use() {
    let _turn = TURN.lock().await;
    let setup = ScriptedRedis::up("deploy/redis/cluster.sh", 6);
    let seeds = ["--redis-cluster", setup.get("PUSHGATE_REDIS_CLUSTER")];
    let node = NodeProcess::spawn("n1", None, &seeds).await;
    node.wait_ready(200).await;
    node.wait_broker(true).await;
    let mut client = connect(&node, "alice").await;
    client.subscribe("room:script").await;
    api_publish(&node, json!({"channel": "room:script", "data": "sharded"})).await;
    assert_eq!(client.message().await.data, json!("sharded"));
}
