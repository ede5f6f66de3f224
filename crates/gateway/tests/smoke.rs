mod common;

use common::TestNode;
use pushgate_tests::{Client, token};
use serde_json::json;

#[tokio::test]
async fn welcome_subscribe_publish_on_one_node() {
    let node = TestNode::start(&[]).await;
    let t = token("alice", &["room:*"], &["room:*"]);
    let mut a = Client::connect(&node.ws_url(), &t).await.unwrap();
    assert_eq!(a.user, "alice");
    assert!(a.session.starts_with(&a.node));
    a.subscribe("room:1").await;
    a.publish("room:1", json!({"text": "hi"})).await;
    let m = a.message().await;
    assert_eq!(m.channel.as_deref(), Some("room:1"));
    assert_eq!(m.from.as_deref(), Some("alice"));
    assert_eq!(m.data, json!({"text": "hi"}));
}

#[tokio::test]
async fn two_nodes_share_a_channel_through_redis() {
    let redis = pushgate_tests::RedisServer::start();
    let url = redis.url();
    let n1 = TestNode::start(&["--redis-url", &url, "--instance-id", "n1"]).await;
    let n2 = TestNode::start(&["--redis-url", &url, "--instance-id", "n2"]).await;
    pushgate_tests::eventually("both ready", || async {
        n1.node.broker.is_ready() && n2.node.broker.is_ready()
    })
    .await;
    let t = token("bob", &["c"], &["c"]);
    let mut a = Client::connect(&n1.ws_url(), &t).await.unwrap();
    let mut b = Client::connect(&n2.ws_url(), &t).await.unwrap();
    a.subscribe("c").await;
    b.subscribe("c").await;
    a.publish("c", json!(1)).await;
    assert_eq!(a.message().await.data, json!(1));
    assert_eq!(b.message().await.data, json!(1));
    redis.publish("pushgate:ch:c", r#"{"data":2}"#).await;
    assert_eq!(a.message().await.data, json!(2));
    assert_eq!(b.message().await.data, json!(2));
}
