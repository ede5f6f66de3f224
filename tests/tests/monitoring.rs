//! The monitoring files (deploy/prometheus, deploy/grafana) against a real Prometheus scraping a
//! real cluster: every alert rule evaluates, and every dashboard query returns data.

use std::process::Command;

use pushgate_tests::{Client, Cluster, api, repo_root, run, token, tool};
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
