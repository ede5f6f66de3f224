//! History, recovery and presence on one node with the embedded broker.

mod common;

use common::TestNode;
use pushgate::hub::Frame;
use pushgate_protocol::server::{MessageRef, Position, ServerFrame, encode_message_at};
use pushgate_protocol::{ErrorCode, RawJson, Target};
use pushgate_tests::{Client, api, api_get, eventually, token};
use serde_json::{Value, json};

fn alice() -> String {
    token("alice", &["chat:*", "room:*"], &["chat:*"])
}

/// `/api/publish` to `channel`; returns the reply (`id`, and `offset`/`epoch` on history
/// channels).
async fn publish(node: &TestNode, channel: &str, data: Value) -> Value {
    let (status, reply) = api(
        &node.base(),
        "/api/publish",
        &json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    reply
}

fn position(offset: u64, epoch: &str) -> Position {
    Position {
        offset,
        epoch: epoch.to_owned(),
    }
}

/// The next `n` deliveries' offsets and data.
async fn take(c: &mut Client, n: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = c.message().await;
        got.push((m.offset.expect("a history message has an offset"), m.data));
    }
    got
}

#[tokio::test]
async fn a_client_recovers_what_it_missed_on_an_embedded_node() {
    let node = TestNode::start(&[
        "--history",
        "chat:*=100/10m",
        "--history-recovery-limit",
        "20",
    ])
    .await;
    let mut a = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = a.subscribe_since("chat:1", None).await;
    assert_eq!(sub.position().offset, 0);
    assert_eq!(sub.recovered(), None, "no since, no recovered");
    let epoch = sub.position().epoch.clone();

    for i in 1..=3 {
        let reply = publish(&node, "chat:1", json!(format!("m{i}"))).await;
        assert_eq!(
            (reply["offset"].clone(), reply["epoch"].clone()),
            (json!(i), json!(epoch))
        );
    }
    let m = a.message().await;
    assert_eq!(m.position(), Some(position(1, &epoch)));
    assert_eq!(take(&mut a, 2).await, [(2, json!("m2")), (3, json!("m3"))]);
    a.close().await;

    publish(&node, "chat:1", json!("m4")).await;
    let mut writer = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    assert!(matches!(
        writer.publish("chat:1", json!("m5")).await,
        ServerFrame::Ack { .. }
    ));
    publish(&node, "chat:1", json!("m6")).await;

    let mut b = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = b
        .subscribe_since("chat:1", Some(&position(3, &epoch)))
        .await;
    assert_eq!(
        (sub.position(), sub.recovered()),
        (&position(6, &epoch), Some(true))
    );
    assert_eq!(
        take(&mut b, 3).await,
        [(4, json!("m4")), (5, json!("m5")), (6, json!("m6"))]
    );
    publish(&node, "chat:1", json!("m7")).await;
    assert_eq!(take(&mut b, 1).await, [(7, json!("m7"))]);

    // Another epoch, or a position ahead of the channel: not recovered.
    let mut c = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = c
        .subscribe_since("chat:1", Some(&position(3, "0000")))
        .await;
    assert_eq!(
        (sub.position(), sub.recovered()),
        (&position(7, &epoch), Some(false))
    );
    let mut d = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = d
        .subscribe_since("chat:1", Some(&position(99, &epoch)))
        .await;
    assert_eq!(sub.recovered(), Some(false));
    // Up to date: recovered, nothing to send.
    let mut e = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = e
        .subscribe_since("chat:1", Some(&position(7, &epoch)))
        .await;
    assert_eq!(sub.recovered(), Some(true));

    // Further behind than the recovery limit (20): not recovered.
    for i in 8..=32 {
        publish(&node, "chat:1", json!(format!("m{i}"))).await;
    }
    let mut f = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let sub = f
        .subscribe_since("chat:1", Some(&position(7, &epoch)))
        .await;
    assert_eq!(
        (sub.position(), sub.recovered()),
        (&position(32, &epoch), Some(false))
    );
    let sub = f
        .subscribe_since("chat:1", Some(&position(7, &epoch)))
        .await;
    assert_eq!(sub.recovered(), Some(false), "already subscribed at 32");
    // What came live to the others, and nothing twice.
    publish(&node, "chat:1", json!("end")).await;
    for client in [&mut c, &mut d, &mut e, &mut f] {
        let got = client.messages_until(&json!("end")).await;
        let offsets: Vec<u64> = got.iter().filter_map(|m| m.offset).collect();
        let first = offsets[0];
        assert_eq!(offsets, (first..=33).collect::<Vec<_>>());
    }

    // The API reads the same history.
    let (status, doc) = api_get(&node.base(), "/api/history/chat:1?since=30").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(
        (doc["epoch"].clone(), doc["offset"].clone()),
        (json!(epoch), json!(33))
    );
    let messages = doc["messages"].as_array().unwrap();
    let offsets: Vec<&Value> = messages.iter().map(|m| &m["offset"]).collect();
    assert_eq!(offsets, [&json!(31), &json!(32), &json!(33)]);
    assert_eq!(messages[0]["type"], "message");
    assert_eq!(messages[0]["channel"], "chat:1");
    assert_eq!(messages[0]["data"], "m31");
    let (_, doc) = api_get(&node.base(), "/api/history/chat:1?since=0&limit=2").await;
    assert_eq!(doc["messages"].as_array().unwrap().len(), 2);
    let (status, _) = api_get(&node.base(), "/api/history/plain").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn gaps_are_filled_from_history_and_lost_history_ends_the_subscription() {
    let node = TestNode::start(&["--history", "chat:*=5/10m"]).await;
    let rule = node.node.policy.history("chat:1").unwrap().clone();
    let mut a = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let epoch = a
        .subscribe_since("chat:1", None)
        .await
        .position()
        .epoch
        .clone();
    publish(&node, "chat:1", json!("m1")).await;
    assert_eq!(take(&mut a, 1).await, [(1, json!("m1"))]);

    // Messages that reach history but not the connection, as when a node's subscription
    // drops them: the next one that arrives shows the gap.
    let hidden = |text: &'static str| {
        let data = RawJson::from_string(json!(text).to_string()).unwrap();
        node.node.memory.publish(
            "chat:1",
            &rule,
            |offset, epoch| {
                Frame::from(encode_message_at(
                    &MessageRef {
                        id: text,
                        ts: 1,
                        from: None,
                        target: Target::Channel("chat:1"),
                        data: &data,
                    },
                    offset,
                    epoch,
                ))
            },
            |_, _, _| (),
        )
    };
    hidden("m2");
    publish(&node, "chat:1", json!("m3")).await;
    assert_eq!(take(&mut a, 2).await, [(2, json!("m2")), (3, json!("m3"))]);

    // More than history keeps (5): the gap cannot be filled.
    for text in ["m4", "m5", "m6", "m7", "m8", "m9"] {
        hidden(text);
    }
    publish(&node, "chat:1", json!("m10")).await;
    match a.frame().await {
        ServerFrame::Unsubscribed { channel, code, .. } => {
            assert_eq!(
                (channel.as_str(), code.as_deref()),
                ("chat:1", Some("history_lost"))
            );
        }
        other => panic!("expected history_lost, got {other:?}"),
    }
    let sub = a
        .subscribe_since("chat:1", Some(&position(3, &epoch)))
        .await;
    assert_eq!(
        (sub.position(), sub.recovered()),
        (&position(10, &epoch), Some(false))
    );
    assert_eq!(node.node.metrics.history_gaps.get(), 1);
    assert_eq!(node.node.metrics.history_lost.get(), 1);

    // The history is lost (expired, deleted): a new epoch, offsets from 1, delivered.
    node.node.memory.forget("chat:1");
    let reply = publish(&node, "chat:1", json!("new")).await;
    assert_ne!(reply["epoch"], json!(epoch));
    let m = a.message().await;
    assert_eq!((m.offset, m.data), (Some(1), json!("new")));
    assert_eq!(m.epoch.as_deref(), reply["epoch"].as_str());
}

#[tokio::test]
async fn presence_lists_the_subscribers_of_a_channel() {
    let node = TestNode::start(&["--presence", "room:*"]).await;
    let mut a = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let mut b = Client::connect(&node.ws_url(), &token("bob", &["room:*"], &[]))
        .await
        .unwrap();
    a.subscribe("room:1").await;
    b.subscribe("room:1").await;
    let clients = a.presence("room:1").await;
    let mut expected = vec![(a.session.clone(), "alice"), (b.session.clone(), "bob")];
    expected.sort();
    let got: Vec<(String, &str)> = clients
        .iter()
        .map(|c| (c.session.clone(), c.user.as_str()))
        .collect();
    assert_eq!(got, expected);
    assert!(
        clients
            .iter()
            .all(|c| c.node == *node.node.instance && c.joined_at > 0)
    );

    let r = b
        .request(json!({"type": "presence", "channel": "chat:1"}))
        .await;
    assert!(
        matches!(
            r,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{r:?}"
    );
    let r = a
        .request(json!({"type": "presence", "channel": "chat:1"}))
        .await;
    assert!(
        matches!(
            r,
            ServerFrame::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );

    assert!(matches!(
        b.request(json!({"type": "unsubscribe", "channel": "room:1"}))
            .await,
        ServerFrame::Ack { .. }
    ));
    assert_eq!(a.presence("room:1").await.len(), 1);
    let (status, doc) = api_get(&node.base(), "/api/presence/room:1").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["clients"][0]["user"], "alice");
    assert_eq!(doc["clients"].as_array().unwrap().len(), 1);
    let (status, _) = api_get(&node.base(), "/api/presence/chat:1").await;
    assert_eq!(status, 404);
    let (_, doc) = api_get(&node.base(), "/api/nodes").await;
    assert_eq!(doc["nodes"][0]["connections"], 2);

    // A connection that goes away leaves.
    a.close().await;
    let n = node.node.clone();
    eventually("alice leaves room:1", || {
        let n = n.clone();
        async move { n.presence("room:1").await.is_ok_and(|c| c.is_empty()) }
    })
    .await;
}

#[tokio::test]
async fn recent_and_history_requests_on_an_embedded_node() {
    let node = TestNode::start(&[
        "--history",
        "chat:*=100/10m",
        "--history-request-limit",
        "60",
    ])
    .await;
    for i in 1..=120 {
        publish(&node, "chat:1", json!(i)).await;
    }
    let mut a = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let r = a
        .request(json!({"type": "history", "channel": "chat:1", "limit": 50}))
        .await;
    let ServerFrame::History {
        position, messages, ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(position.offset, 120);
    let got: Vec<_> = messages
        .iter()
        .map(|m| (m.offset, m.data.clone()))
        .collect();
    let want: Vec<_> = (71..=120).map(|i| (Some(i), json!(i))).collect();
    assert_eq!(got, want);
    // History holds the last 100 and the node gives at most 60.
    let r = a
        .request(json!({"type": "history", "channel": "chat:1", "limit": 1000}))
        .await;
    let ServerFrame::History { messages, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(messages.first().and_then(|m| m.offset), Some(61));
    assert_eq!(messages.len(), 60);

    let r = a
        .request(json!({"type": "subscribe", "channel": "chat:1", "recent": 50}))
        .await;
    assert!(
        matches!(&r, ServerFrame::Ack { position: Some(p), recovered: None, .. } if *p == position),
        "{r:?}"
    );
    let want: Vec<_> = (71..=120).map(|i| (i, json!(i))).collect();
    assert_eq!(take(&mut a, 50).await, want);
    publish(&node, "chat:1", json!(121)).await;
    assert_eq!(take(&mut a, 1).await, [(121, json!(121))]);

    // Trimmed shorter than asked: what history holds.
    let node = TestNode::start(&["--history", "chat:*=10/10m"]).await;
    for i in 1..=30 {
        publish(&node, "chat:2", json!(i)).await;
    }
    let mut b = Client::connect(&node.ws_url(), &alice()).await.unwrap();
    let r = b
        .request(json!({"type": "subscribe", "channel": "chat:2", "recent": 50}))
        .await;
    assert!(matches!(r, ServerFrame::Ack { .. }), "{r:?}");
    let want: Vec<_> = (21..=30).map(|i| (i, json!(i))).collect();
    assert_eq!(take(&mut b, 10).await, want);
    publish(&node, "chat:2", json!(31)).await;
    assert_eq!(take(&mut b, 1).await, [(31, json!(31))]);
}
