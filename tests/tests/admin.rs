//! What the admin console reads, on a real cluster: every node's figures in `/api/nodes`
//! (uptime, Redis state, deliveries, busiest channels, from heartbeats), and the cluster's
//! busiest channels in `/api/channels`, summed over the nodes, from whichever node is asked.

use pushgate_tests::{API_KEY, Client, Cluster, NodeProcess, api_get, eventually, token};
use serde_json::{Value, json};

async fn connect(node: &NodeProcess, user: &str, channels: &[&str]) -> Client {
    let mut client = Client::connect(&node.ws_url(), &token(user, &["room:*"], &[]))
        .await
        .unwrap_or_else(|r| panic!("{user} refused by {}: {r:?}", node.id));
    for channel in channels {
        client.subscribe(channel).await;
    }
    client
}

async fn channels(node: &NodeProcess, query: &str) -> Value {
    let (status, body) = api_get(&node.base(), &format!("/api/channels{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn busiest_channels_are_summed_across_the_cluster() {
    let cluster = Cluster::start(3, &["--heartbeat-interval", "200ms"]).await;
    let [n1, n2, n3] = &cluster.nodes[..] else {
        unreachable!()
    };
    // room:a: 2 on n1, 1 on n2, 1 on n3. room:b: 2 on n2. room:c: 1 on n3.
    let mut clients = vec![
        connect(n1, "a1", &["room:a"]).await,
        connect(n1, "a2", &["room:a"]).await,
        connect(n2, "a3", &["room:a", "room:b"]).await,
        connect(n2, "b1", &["room:b"]).await,
        connect(n3, "a4", &["room:a", "room:c"]).await,
    ];
    let expected = json!({"channels": [
        {"channel": "room:a", "subscribers": 4, "nodes": 3},
        {"channel": "room:b", "subscribers": 2, "nodes": 1},
        {"channel": "room:c", "subscribers": 1, "nodes": 1},
    ], "approximate": false});
    for node in [n1, n2, n3] {
        eventually(
            &format!("{} sums every node's channels", node.id),
            || async { channels(node, "").await == expected },
        )
        .await;
    }
    assert_eq!(
        channels(n2, "?limit=2").await["channels"]
            .as_array()
            .unwrap()[..],
        expected["channels"].as_array().unwrap()[..2]
    );

    // Every node's figures, as the console shows them.
    let (_, nodes) = api_get(&n1.base(), "/api/nodes").await;
    let nodes = nodes["nodes"].as_array().expect("nodes").clone();
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["node"].as_str()).collect();
    assert_eq!(ids, ["n1", "n2", "n3"]);
    for n in &nodes {
        assert_eq!(
            (&n["broker"], &n["broker_ready"]),
            (&json!("redis"), &json!(true)),
            "{n}"
        );
        for sample in ["uptime_secs", "deliveries", "ts"] {
            assert!(n[sample].is_u64(), "{sample} in {n}");
        }
    }
    assert_eq!(
        nodes[1]["top_channels"],
        json!([{"channel": "room:b", "subscribers": 2}, {"channel": "room:a", "subscribers": 1}])
    );

    // Leaving shows on every node.
    drop(clients.remove(4));
    eventually("n3's subscriber is gone from n1's sums", || async {
        channels(n1, "").await["channels"]
            == json!([
                {"channel": "room:a", "subscribers": 3, "nodes": 2},
                {"channel": "room:b", "subscribers": 2, "nodes": 1},
            ])
    })
    .await;

    // A bad limit names the field; the key is required.
    let (status, body) = api_get(&n1.base(), "/api/channels?limit=1000").await;
    assert_eq!((status, &body["field"]), (400, &json!("limit")), "{body}");
    let status = reqwest::Client::new()
        .get(n1.url("/api/channels"))
        .bearer_auth(format!("{API_KEY}-not"))
        .send()
        .await
        .expect("GET /api/channels")
        .status();
    assert_eq!(status.as_u16(), 401);
}
