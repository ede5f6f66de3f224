//! The monitoring files (deploy/prometheus, deploy/grafana) against a real Prometheus scraping a
//! real cluster: every alert rule evaluates, and every dashboard query returns data.

use std::process::Command;

use pushgate_tests::{Client, Cluster, api, metric, repo_root, run, token, tool};
use serde_json::json;

#[tokio::test]
async fn alert_rules_and_dashboard_queries_hold_against_a_live_cluster() {
    if tool("prometheus", true).is_none() || tool("promtool", true).is_none() {
        return;
    }
    let cluster = Cluster::start(3, &["--history", "chat:*=100/10m"]).await;
    // A little of everything the dashboard shows: connections, client and API publishes,
    // deliveries through Redis, a history recovery.
    let mut clients = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let user = format!("u{i}");
        let mut c = Client::connect(&node.ws_url(), &token(&user, &["*"], &["*"]))
            .await
            .unwrap();
        c.subscribe("room:1").await;
        c.subscribe_since("chat:1", None).await;
        clients.push(c);
    }
    clients[0].publish("room:1", json!("from a client")).await;
    for node in &cluster.nodes {
        let (status, body) = api(
            &node.base(),
            "/api/publish",
            &json!({"channel": "chat:1", "data": "from the API"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let targets: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.base().trim_start_matches("http://").to_owned())
        .collect();
    // Fails with the script's output unless every check passed.
    tokio::task::spawn_blocking(move || {
        run(Command::new("bash")
            .arg(repo_root().join("scripts/check_prometheus.sh"))
            .args(&targets)
            .current_dir(repo_root()))
    })
    .await
    .expect("the check ran");
    drop(clients);
}

/// `pushgate_delivery_lag_seconds` counts every message frame written to a client, and
/// `pushgate_redis_hop_seconds` every message received from another node, both in seconds.
#[tokio::test]
async fn delivery_lag_and_redis_hop_are_measured_per_delivery_and_per_hop() {
    const LAG: &str = "pushgate_delivery_lag_seconds";
    const HOP: &str = "pushgate_redis_hop_seconds";
    let cluster = Cluster::start(2, &["--history", "chat:*=100/10m"]).await;
    let [n1, n2] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut clients = Vec::new();
    for (node, user) in [(n1, "a"), (n2, "b")] {
        let mut c = Client::connect(&node.ws_url(), &token(user, &["*"], &["*"]))
            .await
            .unwrap();
        c.subscribe("room:1").await;
        c.subscribe_since("chat:1", None).await;
        clients.push(c);
    }
    // From n1: three plain messages and two through history; each reaches both clients.
    for i in 0..3 {
        clients[0].publish("room:1", json!(i)).await;
    }
    for i in 0..2 {
        clients[0].publish("chat:1", json!(i)).await;
    }
    let [c1, c2] = &mut clients[..] else {
        unreachable!()
    };
    // The barrier is a backend's broadcast: one more delivery per client, and no hop (a
    // backend's message has no origin node).
    let got = cluster.barrier(&mut [c1, c2]).await;
    assert_eq!(got[0].len(), 5, "{:?}", got[0]);
    assert_eq!(got[1].len(), 5, "{:?}", got[1]);

    for node in [n1, n2] {
        let base = node.base();
        let count = metric(&base, &format!("{LAG}_count")).await;
        assert_eq!(count, 6.0, "{}: message frames written", node.id);
        let mean = metric(&base, &format!("{LAG}_sum")).await / count;
        assert!((0.0..5.0).contains(&mean), "{}: mean lag {mean} s", node.id);
    }
    // n1 published everything: it hears only its own echoes, which are no hop.
    assert_eq!(metric(&n1.base(), &format!("{HOP}_count")).await, 0.0);
    assert_eq!(metric(&n2.base(), &format!("{HOP}_count")).await, 5.0);
    let mean = metric(&n2.base(), &format!("{HOP}_sum")).await / 5.0;
    assert!((0.0..5.0).contains(&mean), "mean hop {mean} s");
}
