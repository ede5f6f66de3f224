//! What a message costs in Redis and in encoding: one PUBLISH per message whatever the number of
//! recipients, a node receives only the channels it serves, and each message is serialized once
//! per node, not once per recipient.

use pushgate_tests::{API_KEY, Client, Cluster, metric, token};
use serde_json::json;

/// `calls` of `cmdstat_publish` in `INFO commandstats`.
async fn publish_calls(cluster: &Cluster) -> u64 {
    let info: String =
        redis::from_redis_value(cluster.redis.command(&["INFO", "commandstats"]).await)
            .expect("INFO is text");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

async fn counters(base: &str) -> (f64, f64, f64) {
    (
        metric(base, r#"pushgate_messages_in_total{source="redis"}"#).await,
        metric(base, "pushgate_message_encodes_total").await,
        metric(base, "pushgate_deliveries_total").await,
    )
}

async fn api_publish(base: &str, channel: &str, n: u64) {
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{base}/api/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": channel, "data": n}))
        .send()
        .await
        .expect("API publish");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn one_publish_per_message_and_one_encode_per_node() {
    // Probes and heartbeats would add PUBLISH calls of their own: push them out of the test.
    let cluster = Cluster::start(
        3,
        &["--redis-probe-interval", "1h", "--heartbeat-interval", "1h"],
    )
    .await;
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let t = token("reader", &["uneven:*"], &[]);

    // Channel "a" has three subscribers, all on n1; channel "b" one on n1 and one on n2; n3
    // serves neither.
    let mut a_clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&n1.ws_url(), &t).await.unwrap();
        c.subscribe("uneven:a").await;
        a_clients.push(c);
    }
    let mut b1 = Client::connect(&n1.ws_url(), &t).await.unwrap();
    b1.subscribe("uneven:b").await;
    let mut b2 = Client::connect(&n2.ws_url(), &t).await.unwrap();
    b2.subscribe("uneven:b").await;
    assert_eq!(cluster.redis.numsub("pushgate:ch:uneven:a").await, 1);
    assert_eq!(cluster.redis.numsub("pushgate:ch:uneven:b").await, 2);

    let calls_before = publish_calls(&cluster).await;
    let before = [
        counters(&n1.base()).await,
        counters(&n2.base()).await,
        counters(&n3.base()).await,
    ];

    const A: u64 = 20;
    const B: u64 = 10;
    for i in 0..A {
        api_publish(&n3.base(), "uneven:a", i).await;
    }
    for i in 0..B {
        api_publish(&n3.base(), "uneven:b", i).await;
    }
    for c in &mut a_clients {
        for i in 0..A {
            assert_eq!(c.message().await.data, json!(i));
        }
    }
    for c in [&mut b1, &mut b2] {
        for i in 0..B {
            assert_eq!(c.message().await.data, json!(i));
        }
    }

    // One PUBLISH per message, whatever the number of recipients and nodes.
    assert_eq!(publish_calls(&cluster).await - calls_before, A + B);

    let after = [
        counters(&n1.base()).await,
        counters(&n2.base()).await,
        counters(&n3.base()).await,
    ];
    let delta = |i: usize| {
        let (b, a) = (before[i], after[i]);
        (a.0 - b.0, a.1 - b.1, a.2 - b.2)
    };
    // n1 serves both channels: it receives every message, encodes each once, and queues one
    // copy per local subscriber.
    assert_eq!(
        delta(0),
        ((A + B) as f64, (A + B) as f64, (3 * A + B) as f64)
    );
    // n2 serves only "b".
    assert_eq!(delta(1), (B as f64, B as f64, B as f64));
    // n3 published everything but serves neither channel: it receives nothing from Redis and
    // encodes nothing.
    assert_eq!(delta(2), (0.0, 0.0, 0.0));
}
