//! `pushgate publish` and `pushgate subscribe`, run as an operator would, against a real node
//! and Redis.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pushgate_tests::{API_KEY, NodeProcess, RedisServer, WAIT, pushgate_bin, token};
use serde_json::{Value, json};

/// Sends each line a child writes to `stream` to the returned receiver.
fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

/// Runs `pushgate publish ARGS`; returns (exit code, stdout, stderr).
fn publish(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(pushgate_bin())
        .arg("publish")
        .args(args)
        .env_remove("PUSHGATE_API_KEY")
        .env_remove("PUSHGATE_REDIS_URL")
        .output()
        .expect("running pushgate publish");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn publish_ok(args: &[&str]) -> Value {
    let (code, stdout, stderr) = publish(args);
    assert_eq!(code, 0, "publish {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{stdout}: {e}"))
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "subscriber did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn subscribe_prints_what_publish_sends() {
    let redis = RedisServer::start();
    let node = NodeProcess::spawn("n1", Some(&redis.url()), &[]).await;
    let (base, redis_url) = (node.base(), redis.url());
    let token = token("alice", &["room:*"], &[]);
    let mut subscriber = Command::new(pushgate_bin())
        .args(["subscribe", "--url", &node.ws_url(), "--token", &token])
        .args(["--channel", "room:1", "--channel", "room:2", "--count", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running pushgate subscribe");
    let stdout = lines(subscriber.stdout.take().unwrap());
    let stderr = lines(subscriber.stderr.take().unwrap());

    let mut session = None;
    let mut waiting = vec!["room:1", "room:2"];
    while !waiting.is_empty() {
        let line = next_line(&stderr, "subscriber status line");
        if let Some(rest) = line.strip_prefix("pushgate: connected to node n1 (session ") {
            session = rest.split([',', ' ']).next().map(str::to_owned);
        }
        if let Some(channel) = line.strip_prefix("pushgate: subscribed to ") {
            waiting.retain(|c| *c != channel);
        }
    }
    let session = session.expect("a connected line with the session ID");

    let http = ["--url", &base, "--api-key", API_KEY];
    let via_redis = ["--redis-url", &redis_url];
    let reply = publish_ok(&[&http[..], &["--channel", "room:1", "--data", r#"{"n":1}"#]].concat());
    assert!(reply["id"].is_string(), "{reply}");
    let reply = publish_ok(
        &[
            &via_redis[..],
            &["--channel", "room:2", "--data", "[1, 2.5]"],
        ]
        .concat(),
    );
    assert_eq!(reply, json!({"nodes": 1}));
    publish_ok(&[&http[..], &["--user", "alice", "--data", r#""for alice""#]].concat());
    publish_ok(&[&via_redis[..], &["--broadcast", "--data", "null"]].concat());
    publish_ok(&[&http[..], &["--session", &session, "--data", "5"]].concat());
    publish_ok(&[&via_redis[..], &["--session", &session, "--data", "6"]].concat());

    // Lines from different publishers may arrive in any order: match them by target.
    let mut got: Vec<Value> = (0..6)
        .map(|_| {
            let line = next_line(&stdout, "delivery line");
            let frame: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(frame["type"], "message", "{line}");
            assert!(frame["id"].is_string() && frame["ts"].is_u64(), "{line}");
            frame
        })
        .collect();
    let mut take = |key: &str, value: Value| -> Value {
        let at = got
            .iter()
            .position(|f| f[key] == value)
            .unwrap_or_else(|| panic!("no delivery with {key}={value} in {got:?}"));
        got.remove(at)["data"].take()
    };
    assert_eq!(take("channel", json!("room:1")), json!({"n": 1}));
    assert_eq!(take("channel", json!("room:2")), json!([1, 2.5]));
    assert_eq!(take("user", json!("alice")), json!("for alice"));
    assert_eq!(take("broadcast", json!(true)), Value::Null);
    let mut session_data = vec![
        take("session", json!(session)),
        take("session", json!(session)),
    ];
    session_data.sort_by_key(|v| v.as_i64());
    assert_eq!(session_data, [json!(5), json!(6)]);
    assert_eq!(
        wait_exit(&mut subscriber),
        0,
        "--count 6 ends the subscriber"
    );
}

#[tokio::test]
async fn publish_and_subscribe_report_errors() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let base = node.base();

    let (code, _, stderr) = publish(&[
        "--url",
        &base,
        "--api-key",
        "wrong",
        "--channel",
        "a",
        "--data",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("401") && stderr.contains("invalid API key"),
        "{stderr}"
    );

    let (code, _, stderr) = publish(&[
        "--url",
        &base,
        "--api-key",
        API_KEY,
        "--channel",
        "a",
        "--data",
        "{not json",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--data is not JSON"), "{stderr}");

    let (code, _, stderr) = publish(&["--url", &base, "--api-key", API_KEY, "--data", "1"]);
    assert_eq!(code, 2, "clap usage error: {stderr}");

    let (code, _, stderr) = publish(&["--channel", "a", "--data", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--redis-url"), "{stderr}");

    // A refused token ends the subscriber with an error instead of retrying forever.
    let mut refused = Command::new(pushgate_bin())
        .args(["subscribe", "--url", &node.ws_url(), "--token", "not-a-jwt"])
        .args(["--channel", "room:1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running pushgate subscribe");
    let stderr = lines(refused.stderr.take().unwrap());
    assert_eq!(wait_exit(&mut refused), 1);
    // The reader ends at the end of the pipe, after the last line.
    let text: Vec<String> = stderr.iter().collect();
    assert!(
        text.iter()
            .any(|l| l.contains("401") && l.contains("malformed token")),
        "{text:?}"
    );
}
