//! The `/ws` handshake: every kind of bad token gets 401 with its reason and no upgrade, good
//! tokens (by header or query, HS256 or a public key) get a welcome, and Origin is enforced.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::TestNode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate_tests::{Client, Refused, SECRET, metric, sign, token, unix_now};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

const ISSUER: &str = "https://auth.pushgate.example";
const AUDIENCE: &str = "pushgate";

fn request(url: &str, bearer: Option<&str>, origin: Option<&str>) -> Request {
    let mut request = url.into_client_request().expect("ws url");
    if let Some(t) = bearer {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(o) = origin {
        request.headers_mut().insert("origin", o.parse().unwrap());
    }
    request
}

/// Connects and expects a refusal; returns it.
async fn refused(request: Request) -> Refused {
    match Client::connect_request(request).await {
        Ok(c) => panic!("expected a refusal, got a welcome as {}", c.user),
        Err(r) => r,
    }
}

fn assert_unauthorized(r: &Refused, reason: &str, case: &str) {
    assert_eq!(r.status, 401, "{case}: {r:?}");
    assert_eq!(
        r.body,
        json!({"error": "unauthorized", "reason": reason}),
        "{case}"
    );
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn later() -> u64 {
    unix_now() + 3600
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_reason() {
    let node = TestNode::start(&[]).await;
    let url = node.ws_url();
    let now = unix_now();
    let good = json!({"sub": "alice", "exp": later()});
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"not-the-node-secret"),
    )
    .unwrap();
    let hs384 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &good,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    // A valid signature over a header that claims another algorithm is still refused.
    let good_token = sign(&good);
    let payload_and_sig = good_token.split_once('.').unwrap().1;
    let relabelled = format!("{}.{payload_and_sig}", b64(&json!({"alg": "HS512"})));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing token"),
        ("garbage", Some("garbage".into()), "malformed token"),
        ("three dots", Some("a.b.c".into()), "malformed token"),
        (
            "expired",
            Some(sign(&json!({"sub": "alice", "exp": now - 60}))),
            "token expired",
        ),
        (
            "not yet valid",
            Some(sign(
                &json!({"sub": "alice", "exp": later(), "nbf": now + 600}),
            )),
            "token not yet valid",
        ),
        ("wrong key", Some(wrong_key), "invalid signature"),
        ("HS384", Some(hs384), "algorithm not allowed"),
        ("alg none", Some(alg_none), "algorithm not allowed"),
        ("relabelled", Some(relabelled), "algorithm not allowed"),
        (
            "no exp",
            Some(sign(&json!({"sub": "alice"}))),
            "missing claim: exp",
        ),
        (
            "no sub",
            Some(sign(&json!({"exp": later()}))),
            "missing claim: sub",
        ),
    ];
    for (case, token, reason) in &cases {
        let r = refused(request(&url, token.as_deref(), None)).await;
        assert_unauthorized(&r, reason, case);
    }
    assert_eq!(
        metric(
            &node.base(),
            r#"pushgate_auth_failures_total{reason="expired"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &node.base(),
            r#"pushgate_auth_failures_total{reason="algorithm"}"#
        )
        .await,
        3.0
    );
    assert_eq!(node.connections(), 0, "no refused handshake holds a slot");

    let c = Client::connect(&url, &good_token)
        .await
        .expect("good token");
    assert_eq!(c.user, "alice");
}

#[tokio::test]
async fn refusals_are_plain_http_without_an_upgrade() {
    let node = TestNode::start(&[]).await;
    let response = reqwest::Client::new()
        .get(format!("{}/ws", node.base()))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert!(response.headers().get("upgrade").is_none());
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "unauthorized", "reason": "malformed token"})
    );
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let node = TestNode::start(&["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]).await;
    let url = node.ws_url();
    let exp = later();
    let cases = [
        (
            "wrong issuer",
            json!({"sub": "a", "exp": exp, "iss": "https://evil.example", "aud": AUDIENCE}),
            "invalid issuer",
        ),
        (
            "wrong audience",
            json!({"sub": "a", "exp": exp, "iss": ISSUER, "aud": "someone-else"}),
            "invalid audience",
        ),
        (
            "no issuer",
            json!({"sub": "a", "exp": exp, "aud": AUDIENCE}),
            "missing claim: iss",
        ),
        (
            "no audience",
            json!({"sub": "a", "exp": exp, "iss": ISSUER}),
            "missing claim: aud",
        ),
    ];
    for (case, claims, reason) in cases {
        let r = refused(request(&url, Some(&sign(&claims)), None)).await;
        assert_unauthorized(&r, reason, case);
    }
    let good = sign(&json!({"sub": "a", "exp": exp, "iss": ISSUER, "aud": [AUDIENCE, "other"]}));
    let c = Client::connect(&url, &good).await.expect("good claims");
    assert_eq!(c.user, "a");
}

#[tokio::test]
async fn a_token_in_the_query_string_works() {
    let node = TestNode::start(&[]).await;
    let t = token("carol", &["room:*"], &[]);
    let mut c =
        Client::connect_request(request(&format!("{}?token={t}", node.ws_url()), None, None))
            .await
            .expect("query token");
    assert_eq!(c.user, "carol");
    c.subscribe("room:1").await;

    let r = refused(request(
        &format!("{}?token=nope", node.ws_url()),
        None,
        None,
    ))
    .await;
    assert_unauthorized(&r, "malformed token", "bad query token");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let node = TestNode::start(&[]).await;
    let t = token("ivan", &[], &[]);
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let mut r = node.ws_url().into_client_request().unwrap();
        r.headers_mut()
            .insert("authorization", format!("{scheme} {t}").parse().unwrap());
        let c = Client::connect_request(r)
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e:?}"));
        assert_eq!(c.user, "ivan");
    }
    // Another scheme is no token at all.
    let mut r = node.ws_url().into_client_request().unwrap();
    r.headers_mut()
        .insert("authorization", format!("Basic {t}").parse().unwrap());
    assert_unauthorized(&refused(r).await, "missing token", "Basic");
}

#[tokio::test]
async fn connection_limits_are_enforced_at_the_handshake() {
    let node = TestNode::start(&["--max-connections", "2"]).await;
    let t = token("judy", &[], &[]);
    let first = Client::connect(&node.ws_url(), &t).await.unwrap();
    let _second = Client::connect(&node.ws_url(), &t).await.unwrap();
    let r = refused(request(&node.ws_url(), Some(&t), None)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.body["error"], "unavailable");
    // A bad token is refused for what it is, full node or not.
    let r = refused(request(&node.ws_url(), Some("x"), None)).await;
    assert_eq!(r.status, 401);
    // A closed connection frees its slot.
    first.close().await;
    pushgate_tests::eventually("a slot is free", || async { node.connections() == 1 }).await;
    Client::connect(&node.ws_url(), &t)
        .await
        .expect("a free slot");

    let node = TestNode::start(&["--max-connections-per-ip", "1"]).await;
    let _one = Client::connect(&node.ws_url(), &t).await.unwrap();
    let r = refused(request(&node.ws_url(), Some(&t), None)).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.body["error"], "rate_limited");
}

#[tokio::test]
async fn the_origin_must_be_allowed_when_a_list_is_configured() {
    let node = TestNode::start(&[
        "--allowed-origins",
        "https://app.pushgate.example,https://admin.pushgate.example",
    ])
    .await;
    let url = node.ws_url();
    let t = token("dave", &[], &[]);

    let r = refused(request(&url, Some(&t), Some("https://evil.example"))).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body["error"], "forbidden");
    // Near misses are not allowed either.
    let r = refused(request(
        &url,
        Some(&t),
        Some("https://app.pushgate.example.evil"),
    ))
    .await;
    assert_eq!(r.status, 403, "{r:?}");

    for origin in [
        "https://app.pushgate.example",
        "https://admin.pushgate.example",
    ] {
        let c = Client::connect_request(request(&url, Some(&t), Some(origin)))
            .await
            .unwrap_or_else(|r| panic!("{origin}: {r:?}"));
        assert_eq!(c.user, "dave");
    }
    // Non-browser clients send no Origin at all.
    Client::connect_request(request(&url, Some(&t), None))
        .await
        .expect("no origin");
}

#[tokio::test]
async fn any_origin_is_allowed_by_default() {
    let node = TestNode::start(&[]).await;
    let t = token("erin", &[], &[]);
    Client::connect_request(request(
        &node.ws_url(),
        Some(&t),
        Some("https://anything.example"),
    ))
    .await
    .expect("any origin");
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("pushgate-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A key pair made by `openssl`: (private key PEM, public key file).
fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run(&args);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

fn signed(alg: Algorithm, key: &EncodingKey, sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": later(), "channels": ["room:*"]});
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

#[tokio::test]
async fn eddsa_tokens_verify_with_the_configured_public_key() {
    let dir = TempDir::new();
    let ed = ["-algorithm", "ed25519"];
    let (private, public) = key_pair(&dir.0, "ed", &ed);
    let (other_private, _) = key_pair(&dir.0, "other", &ed);
    let node = TestNode::start_bare(&["--jwt-public-key", public.to_str().unwrap()]).await;
    let url = node.ws_url();

    let key = EncodingKey::from_ed_pem(&private).unwrap();
    let mut c = Client::connect(&url, &signed(Algorithm::EdDSA, &key, "frank"))
        .await
        .expect("EdDSA token");
    assert_eq!(c.user, "frank");
    c.subscribe("room:1").await;

    let other = EncodingKey::from_ed_pem(&other_private).unwrap();
    let r = refused(request(
        &url,
        Some(&signed(Algorithm::EdDSA, &other, "frank")),
        None,
    ))
    .await;
    assert_unauthorized(&r, "invalid signature", "another key pair");

    // The public key used as an HMAC secret (algorithm confusion) is refused.
    let confused = EncodingKey::from_secret(&std::fs::read(&public).unwrap());
    let r = refused(request(
        &url,
        Some(&signed(Algorithm::HS256, &confused, "frank")),
        None,
    ))
    .await;
    assert_unauthorized(&r, "algorithm not allowed", "HS256 with the public key");
    // So is a token signed with the test secret.
    let r = refused(request(&url, Some(&token("frank", &[], &[])), None)).await;
    assert_unauthorized(&r, "algorithm not allowed", "HS256 with the test secret");
}

#[tokio::test]
async fn rs256_tokens_verify_with_the_configured_public_key() {
    let dir = TempDir::new();
    let rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
    let (private, public) = key_pair(&dir.0, "rsa", &rsa);
    let (other_private, _) = key_pair(&dir.0, "other", &rsa);
    let (ed_private, _) = key_pair(&dir.0, "ed", &["-algorithm", "ed25519"]);
    let node = TestNode::start_bare(&["--jwt-public-key", public.to_str().unwrap()]).await;
    let url = node.ws_url();

    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let c = Client::connect(&url, &signed(Algorithm::RS256, &key, "grace"))
        .await
        .expect("RS256 token");
    assert_eq!(c.user, "grace");

    let other = EncodingKey::from_rsa_pem(&other_private).unwrap();
    let r = refused(request(
        &url,
        Some(&signed(Algorithm::RS256, &other, "grace")),
        None,
    ))
    .await;
    assert_unauthorized(&r, "invalid signature", "another key pair");

    // The same key with another RSA algorithm is not the pinned one.
    let r = refused(request(
        &url,
        Some(&signed(Algorithm::RS512, &key, "grace")),
        None,
    ))
    .await;
    assert_unauthorized(&r, "algorithm not allowed", "RS512");
    let ed = EncodingKey::from_ed_pem(&ed_private).unwrap();
    let r = refused(request(
        &url,
        Some(&signed(Algorithm::EdDSA, &ed, "grace")),
        None,
    ))
    .await;
    assert_unauthorized(&r, "algorithm not allowed", "EdDSA on an RSA node");
}

#[tokio::test]
async fn echo_needs_the_same_token_and_echoes_frames() {
    let node = TestNode::start(&[]).await;
    let url = format!("ws://{}/echo", node.addr);
    let r = match tokio_tungstenite::connect_async(request(&url, None, None)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(r, 401);

    let t = token("heidi", &[], &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(request(&url, Some(&t), None))
        .await
        .expect("echo handshake");
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    ws.send(Message::Text("hello".into())).await.unwrap();
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(pushgate_tests::WAIT, ws.next())
            .await
            .expect("echo reply")
            .expect("open")
            .expect("read");
        if msg.is_text() || msg.is_binary() {
            got.push(msg);
        }
    }
    assert_eq!(got[0], Message::Text("hello".into()));
    assert_eq!(got[1], Message::Binary(vec![1u8, 2, 3].into()));

    // A close from the client is answered with a close.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.send(Message::Close(Some(bye))).await.unwrap();
    let reply = tokio::time::timeout(pushgate_tests::WAIT, ws.next())
        .await
        .expect("close reply in time");
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected a close reply, got {other:?}"),
    }
}
