//! Join and leave events (`--presence-events`) on a real cluster: one `redis-server` and three
//! `pushgate serve` processes, and on a single node with the embedded broker.
//!
//! "Exactly these events" is checked with a barrier: once every watcher has seen the events an
//! action must cause, a sentinel broadcast goes out through Redis; each node hands its clients
//! what Redis published before the sentinel ahead of it, so what a watcher reads up to the
//! sentinel is every event published until then. Waits end on an event; the only fixed sleeps
//! let time pass where the point is that nothing more arrives.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{Client, Cluster, NodeProcess, RedisServer, WAIT, api, token};
use serde_json::{Value, json};

const HEARTBEAT: Duration = Duration::from_secs(1);

/// `("join"|"leave", user, session)`
type Seen = (&'static str, String, String);

fn room_token(user: &str) -> String {
    token(user, &["room:*", "other:*"], &["room:*"])
}

async fn connect(node: &NodeProcess, user: &str) -> Client {
    let client = Client::connect(&node.ws_url(), &room_token(user))
        .await
        .unwrap_or_else(|r| panic!("{user} refused by {}: {r:?}", node.id));
    assert_eq!(client.node, node.id);
    client
}

async fn joined(node: &NodeProcess, user: &str, channel: &str) -> Client {
    let mut client = connect(node, user).await;
    client.subscribe(channel).await;
    client
}

fn join(c: &Client) -> Seen {
    ("join", c.user.clone(), c.session.clone())
}

fn leave(c: &Client) -> Seen {
    ("leave", c.user.clone(), c.session.clone())
}

/// The next join or leave `client` reads, past the sentinels of barriers it was not part of
/// (failing on anything else).
async fn next_event(client: &mut Client) -> Seen {
    loop {
        match client.frame().await {
            ServerFrame::Join(e) => return ("join", e.user, e.session),
            ServerFrame::Leave(e) => return ("leave", e.user, e.session),
            ServerFrame::Message(d) if d.broadcast == Some(true) => {}
            other => panic!("{}: expected a join or leave, got {other:?}", client.user),
        }
    }
}

/// Reads `n` events from `client`.
async fn events(client: &mut Client, n: usize) -> Vec<Seen> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(next_event(client).await);
    }
    got
}

/// Every join and leave `client` reads before the sentinel `barrier` (a broadcast).
async fn until(client: &mut Client, barrier: &Value) -> Vec<Seen> {
    let mut got = Vec::new();
    loop {
        match client.frame().await {
            ServerFrame::Join(e) => got.push(("join", e.user, e.session)),
            ServerFrame::Leave(e) => got.push(("leave", e.user, e.session)),
            ServerFrame::Message(d) if &d.data == barrier => return got,
            // Another barrier's sentinel.
            ServerFrame::Message(d) if d.broadcast == Some(true) => {}
            other => panic!("{}: unexpected {other:?}", client.user),
        }
    }
}

/// Publishes a sentinel broadcast straight into Redis (to `nodes` live nodes) and checks that
/// each watcher read exactly `expected` before it.
async fn barrier(redis: &RedisServer, nodes: i64, watchers: &mut [&mut Client], expected: &[Seen]) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sentinel = json!({"barrier": N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)});
    let payload = json!({ "data": sentinel }).to_string();
    assert_eq!(redis.publish("pushgate:broadcast", &payload).await, nodes);
    for w in watchers.iter_mut() {
        let got = until(w, &sentinel).await;
        assert_eq!(got, expected, "events seen by {} on {}", w.user, w.node);
    }
}

#[tokio::test]
async fn joins_and_leaves_reach_every_subscriber_of_the_cluster_once_per_user() {
    let interval = format!("{}ms", HEARTBEAT.as_millis());
    let mut cluster = Cluster::start(
        3,
        &[
            "--presence-events",
            "room:*",
            "--heartbeat-interval",
            &interval,
        ],
    )
    .await;
    let [n1, n2, n3] = [0, 1, 2].map(|i| &cluster.nodes[i]);

    // Three watchers, one per node. Each sees its own join and those after it, the
    // subscribing connection included.
    let mut w1 = joined(n1, "w1", "room:1").await;
    assert_eq!(events(&mut w1, 1).await, [join(&w1)]);
    let mut w2 = joined(n2, "w2", "room:1").await;
    let mut w3 = joined(n3, "w3", "room:1").await;
    let (j2, j3) = (join(&w2), join(&w3));
    barrier(&cluster.redis, 3, &mut [&mut w1], &[j2.clone(), j3.clone()]).await;
    barrier(&cluster.redis, 3, &mut [&mut w2], &[j2, j3.clone()]).await;
    barrier(&cluster.redis, 3, &mut [&mut w3], &[j3]).await;

    // Subscribe: bob's first connection joins, anywhere in the cluster.
    let mut bob1 = joined(n2, "bob", "room:1").await;
    for w in [&mut w1, &mut w2, &mut w3] {
        assert_eq!(events(w, 1).await, [join(&bob1)], "{}", w.user);
    }
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;
    assert_eq!(until_own(&mut bob1, &cluster.redis).await, [join(&bob1)]);

    // A second connection of bob's, on another node: per user, nothing.
    let mut bob2 = joined(n3, "bob", "room:1").await;
    // Its unsubscribe and subscribe again: still nothing; nor does another channel leak in.
    let reply = bob2
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    bob2.subscribe("room:1").await;
    let mut other = joined(n1, "olga", "other:1").await;
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;

    // Unsubscribe: bob1 goes, bob2 is still there: nothing. Then bob2 unsubscribes: bob left.
    let reply = bob1
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;
    let reply = bob2
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    for w in [&mut w1, &mut w2, &mut w3] {
        assert_eq!(events(w, 1).await, [leave(&bob2)], "{}", w.user);
    }
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;

    // Close: carol's only connection closes (a close frame) and one disconnects without one.
    let carol = joined(n1, "carol", "room:1").await;
    let dan = joined(n2, "dan", "room:1").await;
    for w in [&mut w1, &mut w2, &mut w3] {
        assert_eq!(events(w, 2).await, [join(&carol), join(&dan)], "{}", w.user);
    }
    let (left_carol, left_dan) = (leave(&carol), leave(&dan));
    carol.close().await;
    drop(dan.split());
    for w in [&mut w1, &mut w2, &mut w3] {
        let mut got = events(w, 2).await;
        got.sort();
        let mut want = vec![left_carol.clone(), left_dan.clone()];
        want.sort();
        assert_eq!(got, want, "{}", w.user);
    }
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;

    // SIGKILL of n3: the leaves of its connections come from the other nodes once their
    // entries expire (3 heartbeats), one each, except for a user still connected elsewhere.
    let erin_n3 = joined(n3, "erin", "room:1").await;
    let erin_n1 = joined(n1, "erin", "room:1").await;
    let frank = joined(n3, "frank", "room:1").await;
    let mut twice = Vec::new();
    for _ in 0..2 {
        twice.push(joined(n3, "gus", "room:1").await);
    }
    let joins = vec![join(&erin_n3), join(&frank), join(&twice[0])];
    for w in [&mut w1, &mut w2, &mut w3] {
        assert_eq!(events(w, 3).await, joins, "{}", w.user);
    }
    barrier(&cluster.redis, 3, &mut [&mut w1, &mut w2, &mut w3], &[]).await;
    let gus_left = BTreeSet::from([twice[0].session.clone(), twice[1].session.clone()]);
    cluster.nodes[2].kill();
    let killed = Instant::now();
    let want: BTreeSet<(String, String)> = [
        ("w3".to_owned(), w3.session.clone()),
        ("frank".to_owned(), frank.session.clone()),
    ]
    .into_iter()
    .collect();
    for w in [&mut w1, &mut w2] {
        let mut got = events(w, 3).await;
        // gus had two connections on n3: one leave, from whichever expired last.
        let gus = got
            .iter()
            .position(|(_, u, _)| u == "gus")
            .expect("gus left");
        let (kind, _, session) = got.remove(gus);
        assert_eq!(kind, "leave");
        assert!(gus_left.contains(&session), "{session}");
        assert!(got.iter().all(|(kind, _, _)| *kind == "leave"), "{got:?}");
        let rest: BTreeSet<(String, String)> = got
            .into_iter()
            .map(|(_, user, session)| (user, session))
            .collect();
        assert_eq!(rest, want, "{}", w.user);
    }
    let after = killed.elapsed();
    eprintln!("leaves of the killed node's connections after {after:?}");
    assert!(
        after < HEARTBEAT * 5 + Duration::from_secs(1),
        "leaves took {after:?}"
    );
    // Nothing more: no second leave from another node's sweep, none for erin.
    tokio::time::sleep(HEARTBEAT * 4).await;
    barrier(&cluster.redis, 2, &mut [&mut w1, &mut w2], &[]).await;
    assert_eq!(until_own(&mut other, &cluster.redis).await, []);

    // erin is still listed; the killed node's connections are not.
    let listed: BTreeSet<String> = (w1.presence("room:1").await.into_iter())
        .map(|e| e.user)
        .collect();
    assert_eq!(
        listed,
        ["erin", "w1", "w2"].map(String::from).into_iter().collect()
    );
    drop(erin_n1);
}

/// What `client` read before a fresh barrier (every node up).
async fn until_own(client: &mut Client, redis: &RedisServer) -> Vec<Seen> {
    let sentinel = json!({"own": client.session});
    let payload = json!({ "data": sentinel }).to_string();
    assert!(redis.publish("pushgate:broadcast", &payload).await > 0);
    until(client, &sentinel).await
}

#[tokio::test]
async fn a_single_node_on_the_embedded_broker_sends_joins_and_leaves_too() {
    let node = NodeProcess::spawn(
        "solo",
        None,
        &["--presence-events", "room:*", "--presence", "other:lobby"],
    )
    .await;
    let barrier = async |c: &mut Client| api_barrier(&node, c).await;

    let mut watcher = joined(&node, "w", "room:1").await;
    assert_eq!(barrier(&mut watcher).await, [join(&watcher)]);
    let a = joined(&node, "ann", "room:1").await;
    let mut a2 = joined(&node, "ann", "room:1").await;
    // Presence on an events channel works without a --presence pattern for it.
    let listed: BTreeSet<String> = (watcher.presence("room:1").await.into_iter())
        .map(|e| e.session)
        .collect();
    assert_eq!(
        listed,
        [&watcher.session, &a.session, &a2.session]
            .map(Clone::clone)
            .into_iter()
            .collect()
    );
    assert_eq!(barrier(&mut watcher).await, [join(&a)]);
    a.close().await;
    assert_eq!(barrier(&mut watcher).await, []);
    let reply = a2
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert!(matches!(reply, ServerFrame::Ack { .. }), "{reply:?}");
    assert_eq!(barrier(&mut watcher).await, [leave(&a2)]);
    // A presence channel without events sends none.
    let mut l1 = joined(&node, "lou", "other:lobby").await;
    let _l2 = joined(&node, "lea", "other:lobby").await;
    assert_eq!(barrier(&mut l1).await, []);
    assert_eq!(l1.presence("other:lobby").await.len(), 2);
}

/// A sentinel broadcast through the API of a single node, which delivers in order what it
/// queued before it; what `client` read before it.
async fn api_barrier(node: &NodeProcess, client: &mut Client) -> Vec<Seen> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sentinel = json!({"sentinel": N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)});
    let (status, reply) = api(
        &node.base(),
        "/api/publish",
        &json!({"broadcast": true, "data": sentinel}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    until(client, &sentinel).await
}

#[tokio::test]
async fn the_rust_client_reports_joins_and_leaves() {
    use pushgate_client::Event;

    let node = NodeProcess::spawn("rc", None, &["--presence-events", "room:*"]).await;
    let client = pushgate_client::Client::builder(node.ws_url())
        .token(room_token("rita"))
        .connect()
        .await
        .expect("connect");
    let mut events = client.events();
    let _room = client.subscribe("room:1").await.expect("subscribe");
    let next = async |events: &mut tokio::sync::broadcast::Receiver<Event>| loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(e @ (Event::Join(_) | Event::Leave(_)))) => return e,
            Ok(Ok(_)) => {}
            other => panic!("no join or leave: {other:?}"),
        }
    };
    // Its own join first, then sam's.
    let Event::Join(own) = next(&mut events).await else {
        panic!("not a join")
    };
    assert_eq!(
        (own.channel.as_str(), own.user.as_str()),
        ("room:1", "rita")
    );
    let sam = joined(&node, "sam", "room:1").await;
    let session = sam.session.clone();
    assert_eq!(
        next(&mut events).await,
        Event::Join(pushgate_protocol::PresenceEvent {
            channel: "room:1".into(),
            user: "sam".into(),
            session: session.clone(),
        })
    );
    sam.close().await;
    assert_eq!(
        next(&mut events).await,
        Event::Leave(pushgate_protocol::PresenceEvent {
            channel: "room:1".into(),
            user: "sam".into(),
            session,
        })
    );
}

#[tokio::test]
async fn a_draining_node_sends_its_leaves_before_it_exits() {
    // Entries would take 3 × 5 s to expire: a leave well before that comes from the drain.
    let mut cluster =
        Cluster::start(2, &["--presence-events", "room:*", "--drain-period", "1s"]).await;
    let mut watcher = joined(&cluster.nodes[0], "w", "room:1").await;
    let bob = joined(&cluster.nodes[1], "bob", "room:1").await;
    assert_eq!(events(&mut watcher, 2).await, [join(&watcher), join(&bob)]);
    let started = Instant::now();
    cluster.nodes[1].signal("TERM");
    assert_eq!(events(&mut watcher, 1).await, [leave(&bob)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let status = cluster.nodes[1].wait_exit(WAIT).await;
    assert!(status.success(), "{status}");
    barrier(&cluster.redis, 1, &mut [&mut watcher], &[]).await;
}
