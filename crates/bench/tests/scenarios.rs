//! Tiny runs of every mode against real processes: a `pushgate` node (built by
//! `cargo build -p pushgate`; `cargo test --workspace` builds it), a two-node cluster with its own
//! `redis-server`, the bench's own baseline server, and (where Node.js and the npm packages of
//! `crates/bench/socketio` are installed) two Socket.IO processes. They check that each mode runs
//! and reports sane numbers (nothing lost, rates above zero, percentiles in order), never timing
//! bars.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pushgate_tests::{API_KEY, Cluster, NodeProcess, RedisServer, SECRET};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

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

    // The same rate three times on the same connections, each run counted on its own.
    let (v, _) = bench(&[&common[..], &["--via", "ws", "--steps", "3"]].concat()).await;
    assert_fanout(&v, 20, 50);
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3, "{v}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(u(s, "step"), i as u64 + 1, "{s}");
        assert_eq!(f(s, "rate"), 100.0, "{s}");
        assert_eq!((u(s, "received"), u(s, "loss")), (20 * 50, 0), "{s}");
    }
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

/// `crates/bench/socketio`, if Node.js and its npm packages are there to run it.
fn socketio_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("socketio");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        eprintln!("skipped: no `node` on PATH");
        return None;
    }
    if !dir.join("node_modules").is_dir() {
        eprintln!(
            "skipped: no node_modules in {} (run `npm ci` there)",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// One `server.js` process on a free port; killed when dropped.
struct SocketIoServer {
    _child: tokio::process::Child,
    port: u16,
}

impl SocketIoServer {
    async fn start(dir: &Path, redis_url: &str) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("server.js"))
            .args(["0", redis_url])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting server.js");
        let stdout = child.stdout.take().expect("server.js stdout");
        let line = tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .expect("server.js listens within 10 s")
        .expect("reading server.js")
        .expect("server.js exited at start");
        let port = line
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("server.js said {line:?}"));
        Self {
            _child: child,
            port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_two_socketio_processes_and_redis() {
    let Some(dir) = socketio_dir() else { return };
    let redis = RedisServer::start();
    let a = SocketIoServer::start(&dir, &redis.url()).await;
    let b = SocketIoServer::start(&dir, &redis.url()).await;
    let urls = format!("ws://127.0.0.1:{},ws://127.0.0.1:{}", a.port, b.port);
    let common = [
        "socketio", "fanout", "--url", &urls, "-s", "20", "--count", "50", "-r", "100",
    ];

    // Half the subscribers are on the second process: nothing lost means the adapter carried
    // every message through Redis.
    let (v, _) = bench(&common).await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["target"], "socketio");
    assert_eq!(v["via"], "event");

    // Publishers on both processes, subscribers in two worker processes.
    let (v, _) = bench(&[&common[..], &["-p", "2", "--procs", "2"]].concat()).await;
    assert_fanout(&v, 20, 50);
    assert_eq!(v["procs"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_run_across_two_nodes_with_history_rooms() {
    let cluster = Cluster::start(2, &["--history", "room:*=100/10m"]).await;
    let urls = format!(
        "{},{}",
        cluster.nodes[0].ws_url(),
        cluster.nodes[1].ws_url()
    );
    let (v, _) = bench(&[
        "scale",
        "--url",
        &urls,
        "--jwt-secret",
        SECRET,
        "--api-key",
        API_KEY,
        "-n",
        "200",
        "--rooms",
        "10",
        "--procs",
        "2",
        "--hold",
        "1s",
        "--broadcasts",
        "2",
        "--room-rate",
        "50",
        "--room-duration",
        "1s",
        // No restart here: the phase still checks every connection ends at its room's last
        // offset with nothing skipped or repeated.
        "--during",
        "true",
    ])
    .await;
    assert_eq!(u(&v, "opened"), 200, "{v}");
    assert_eq!(u(&v, "dropped_while_held"), 0, "{v}");
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{v}");
    for node in nodes {
        assert_eq!(f(node, "connections"), 100.0, "{v}");
    }
    for b in v["broadcasts"].as_array().expect("broadcasts") {
        assert_eq!(u(b, "received"), 200, "{v}");
        assert_ordered(&b["latency"]);
    }
    let rooms = &v["rooms"];
    assert!(u(rooms, "expected") > 0, "{v}");
    assert_eq!(u(rooms, "received"), u(rooms, "expected"), "{v}");
    assert_ordered(&rooms["latency"]);
    let restart = &v["restart"];
    assert_eq!(restart["command_ok"], Value::Bool(true), "{v}");
    assert!(u(restart, "published") > 0, "{v}");
    for key in ["behind", "gaps", "duplicates", "not_recovered"] {
        assert_eq!(u(restart, key), 0, "{key}: {v}");
    }
    assert_eq!(u(restart, "alive_after"), 200, "{v}");
}
