//! Tiny runs of every mode against real processes: a `pushgate` node (built by
//! `cargo build -p pushgate`; `cargo test --workspace` builds it), a two-node cluster with its own
//! `redis-server`, and the bench's own baseline server. They check that each mode runs and reports
//! sane numbers (nothing lost, rates above zero, percentiles in order), never timing bars.

use pushgate_tests::{API_KEY, Cluster, NodeProcess, SECRET};
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_pushgate-bench");

/// Runs the bench; returns its one JSON line, and its table.
async fn bench(args: &[&str]) -> (Value, String) {
    let out = tokio::process::Command::new(BENCH)
        .args(args)
        .env_remove("PUSHGATE_JWT_SECRET")
        .output()
        .await
        .expect("running pushgate-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pushgate-bench {args:?} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let json: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(json.len(), 1, "exactly one JSON line:\n{stdout}");
    let value = serde_json::from_str(json[0]).expect("the JSON line parses");
    (value, stdout)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn assert_ordered(latency: &Value) {
    let p: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
        .iter()
        .map(|k| f(latency, k))
        .collect();
    assert!(p[0] > 0.0, "latency recorded: {latency}");
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "ordered: {latency}");
}

fn assert_idle(v: &Value, n: u64) {
    assert_eq!(u(v, "opened"), n, "{v}");
    assert_eq!(u(v, "failed"), 0, "{v}");
    assert_eq!(u(v, "alive_at_measure"), n, "{v}");
    assert!(f(v, "connect_rate") > 0.0, "{v}");
    assert!(
        u(v, "rss_before_bytes") > 0 && u(v, "rss_after_bytes") > 0,
        "{v}"
    );
    assert_ordered(&v["open_latency"]);
}

fn assert_connect(v: &Value, n: u64) {
    assert_eq!(u(v, "handshakes"), n, "{v}");
    assert_eq!(u(v, "failed"), 0, "{v}");
    assert!(f(v, "rate") > 0.0, "{v}");
    assert_ordered(&v["latency"]);
}

fn assert_fanout(v: &Value, subscribers: u64, messages: u64) {
    assert_eq!(u(v, "connected"), subscribers, "{v}");
    let r = &v["result"];
    assert_eq!(u(r, "sent"), messages, "{v}");
    assert_eq!(u(r, "accepted"), messages, "{v}");
    assert_eq!(u(r, "expected"), messages * subscribers, "{v}");
    assert_eq!(u(r, "received"), messages * subscribers, "{v}");
    assert_eq!(r["loss"].as_i64(), Some(0), "{v}");
    assert_eq!(u(r, "out_of_order"), 0, "{v}");
    assert_eq!(u(r, "stale"), 0, "{v}");
    assert!(f(r, "deliveries_per_sec") > 0.0, "{v}");
    assert_eq!(u(&r["latency"], "count"), messages * subscribers, "{v}");
    assert_ordered(&r["latency"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_against_one_node() {
    let node = NodeProcess::spawn("bench-1", None, &[]).await;
    let url = node.ws_url();
    let pid = node.pid().to_string();
    let auth = ["--jwt-secret", SECRET];

    let (v, table) = bench(
        &[
            &["idle", "--url", &url, "-n", "20", "--pid", &pid][..],
            &auth,
        ]
        .concat(),
    )
    .await;
    assert_idle(&v, 20);
    assert!(table.contains("rss per connection"), "{table}");
    assert_eq!(v["target"], "pushgate");

    // Without --pid the node's own metric is read.
    let (v, _) = bench(&[&["idle", "--url", &url, "-n", "20"][..], &auth].concat()).await;
    assert_idle(&v, 20);
    assert!(
        v["rss_source"]
            .as_str()
            .is_some_and(|s| s.contains("process_resident_memory_bytes")),
        "{v}"
    );

    let (v, _) = bench(
        &[
            &["connect", "--url", &url, "--count", "50", "-c", "4"][..],
            &auth,
        ]
        .concat(),
    )
    .await;
    assert_connect(&v, 50);

    let fanout = [
        "fanout", "--url", &url, "-s", "20", "--count", "50", "-r", "100",
    ];
    let (v, table) = bench(&[&fanout[..], &auth].concat()).await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["via"], "ws");
    assert!(table.contains("p99.9 ms"), "{table}");

    let http = [
        "--via",
        "http",
        "--api-key",
        API_KEY,
        "-p",
        "2",
        "--full-decode",
    ];
    let (v, _) = bench(&[&fanout[..], &auth, &http].concat()).await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["decode"], "full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_across_two_nodes_and_redis() {
    let cluster = Cluster::start(2, &[]).await;
    let urls = format!(
        "{},{}",
        cluster.nodes[0].ws_url(),
        cluster.nodes[1].ws_url()
    );
    let redis = cluster.redis.url();
    let common = [
        "fanout",
        "--url",
        &urls,
        "--jwt-secret",
        SECRET,
        "-s",
        "20",
        "--count",
        "50",
        "-r",
        "100",
    ];

    // A backend's plain PUBLISH, subscribers in two worker processes.
    let (v, _) = bench(
        &[
            &common[..],
            &["--via", "redis", "--redis-url", &redis, "--procs", "2"],
        ]
        .concat(),
    )
    .await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["procs"], 2);

    // Client publishes on both nodes.
    let (v, _) = bench(&[&common[..], &["--via", "ws", "-p", "2"]].concat()).await;
    assert_fanout(&v, 20, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_against_the_baseline() {
    let (v, _) = bench(&["baseline", "idle", "-n", "20"]).await;
    assert_idle(&v, 20);
    assert_eq!(v["target"], "baseline");

    let (v, _) = bench(&["baseline", "idle", "-n", "20", "--procs", "2"]).await;
    assert_idle(&v, 20);

    let (v, _) = bench(&["baseline", "connect", "--count", "50", "-c", "4"]).await;
    assert_connect(&v, 50);

    let (v, _) = bench(&[
        "baseline", "fanout", "-s", "20", "--count", "50", "-r", "100",
    ])
    .await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["decode"], "raw");

    let (v, table) = bench(&[
        "baseline",
        "fanout",
        "-s",
        "10",
        "-r",
        "50",
        "--duration",
        "300ms",
        "--find-max",
        "--max-rate",
        "200",
        "--p99-bound",
        "5s",
    ])
    .await;
    let steps = v["steps"].as_array().expect("steps");
    assert!(steps.len() >= 3, "50, 100, 200 msg/s: {v}");
    assert!(steps.iter().all(|s| s["pass"] == true), "{v}");
    assert_eq!(f(&v, "max_ok_rate"), 200.0, "{v}");
    assert!(f(&v, "max_ok_deliveries_per_sec") > 0.0, "{v}");
    assert!(table.contains("highest rate"), "{table}");
}

#[tokio::test]
async fn says_when_a_run_needs_more_open_files() {
    let out = tokio::process::Command::new(BENCH)
        .args(["baseline", "idle", "-n", "2000000000"])
        .output()
        .await
        .expect("running pushgate-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("open-file limit") && stderr.contains("--procs"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with('{')),
        "no result line for a refused run"
    );
}
