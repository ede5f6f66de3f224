//! `--jwt-jwks-url`: node processes that verify client tokens with keys from a JWKS served by a
//! small HTTP server of the test's own (127.0.0.1), which counts its fetches. Keys are made with
//! `openssl` (scripts/test.sh installs it).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate_tests::{
    Client, JwksServer, NodeProcess, Refused, Scratch, SigningKey, WAIT, eventually, jwk_set,
    make_certs, metric, unix_now,
};
use serde_json::{Value, json};

/// A node that verifies tokens with the key set at `url`, plus `extra` flags.
async fn jwks_node(id: &str, url: &str, extra: &[&str]) -> NodeProcess {
    NodeProcess::spawn_with_keys(id, &["--jwt-jwks-url", url], &[], extra).await
}

/// The handshake with `token` must be refused with 401 and `reason`.
async fn refused(node: &NodeProcess, token: &str, reason: &str, what: &str) {
    match Client::connect(&node.ws_url(), token).await {
        Ok(_) => panic!("{what}: accepted"),
        Err(Refused { status, body }) => {
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["reason"], reason, "{what}: {body}");
        }
    }
}

async fn accepted(node: &NodeProcess, token: &str, user: &str, what: &str) -> Client {
    let client = Client::connect(&node.ws_url(), token)
        .await
        .unwrap_or_else(|r| panic!("{what}: refused: {r:?}"));
    assert_eq!(client.user, user, "{what}");
    client
}

async fn readyz_body(node: &NodeProcess) -> (u16, Value) {
    let response = reqwest::get(node.url("/readyz"))
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn b64(value: &Value) -> String {
    base64_url_encode(value.to_string().as_bytes())
}

/// base64url without padding (the tests crate has no base64 dependency).
fn base64_url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn rotation_is_accepted_without_restart() {
    let old = SigningKey::generate(Algorithm::RS256, "2024-old");
    let new = SigningKey::generate(Algorithm::ES256, "2025-new");
    let server = JwksServer::start(&jwk_set(&[&old])).await;
    // Background refreshes are far apart: the new key can only come in on its unknown `kid`.
    let node = jwks_node(
        "rotation",
        &server.url,
        &[
            "--jwt-jwks-refresh",
            "1h",
            "--jwt-jwks-min-interval",
            "300ms",
        ],
    )
    .await;
    node.wait_ready(200).await;
    assert_eq!(server.fetches(), 1, "one fetch at start");
    let base = node.base();
    assert_eq!(metric(&base, "pushgate_jwks_keys").await, 1.0);

    let mut before = accepted(&node, &old.token("ann", &["room:*"]), "ann", "old key").await;
    before.subscribe("room:1").await;

    // The identity provider rotates: it publishes the new key and drops the old one.
    server.set_keys(&jwk_set(&[&new]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    accepted(&node, &new.token("bob", &[]), "bob", "new key").await;
    assert_eq!(server.fetches(), 2, "the unknown kid fetched the set once");
    assert_eq!(
        metric(
            &base,
            r#"pushgate_jwks_fetches_total{trigger="unknown_kid"}"#
        )
        .await,
        1.0
    );
    accepted(&node, &new.token("bob", &[]), "bob", "new key again").await;
    assert_eq!(server.fetches(), 2, "a held kid fetches nothing");

    // The old key is gone from the set the node holds now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    refused(
        &node,
        &old.token("ann", &[]),
        "unknown signing key",
        "old key after rotation",
    )
    .await;
    assert_eq!(
        metric(
            &base,
            r#"pushgate_auth_failures_total{reason="unknown_kid"}"#
        )
        .await,
        1.0
    );
    // A connection made with the old key is not cut by the rotation (tokens are checked at the
    // handshake and at `refresh`).
    let reply = before.request(json!({"type": "ping"})).await;
    assert!(
        matches!(reply, pushgate_protocol::server::ServerFrame::Pong { .. }),
        "{reply:?}"
    );
}

#[tokio::test]
async fn background_refresh_brings_in_new_keys() {
    let first = SigningKey::generate(Algorithm::EdDSA, "ed-1");
    let second = SigningKey::generate(Algorithm::RS256, "rsa-2");
    let server = JwksServer::start(&jwk_set(&[&first])).await;
    let node = jwks_node("refresh", &server.url, &["--jwt-jwks-refresh", "500ms"]).await;
    node.wait_ready(200).await;
    accepted(&node, &first.token("eve", &[]), "eve", "EdDSA key").await;

    server.set_keys(&jwk_set(&[&first, &second]));
    let base = node.base();
    eventually("a background refresh loads the second key", || async {
        metric(&base, "pushgate_jwks_keys").await == 2.0
    })
    .await;
    accepted(&node, &second.token("fay", &[]), "fay", "RS256 key").await;
    assert_eq!(
        metric(
            &base,
            r#"pushgate_jwks_fetches_total{trigger="unknown_kid"}"#
        )
        .await,
        0.0,
        "the key came with a background refresh"
    );
    assert!(metric(&base, r#"pushgate_jwks_fetches_total{trigger="interval"}"#).await >= 1.0);
}

#[tokio::test]
async fn unknown_kid_flood_fetches_at_most_once_per_interval() {
    let key = SigningKey::generate(Algorithm::RS256, "real");
    let server = JwksServer::start(&jwk_set(&[&key])).await;
    let interval = Duration::from_secs(3);
    let node = jwks_node(
        "flood",
        &server.url,
        &["--jwt-jwks-refresh", "1h", "--jwt-jwks-min-interval", "3s"],
    )
    .await;
    node.wait_ready(200).await;
    assert_eq!(server.fetches(), 1);
    let started = Instant::now();
    // Made-up kids under a well-formed RS256 header; the signature is never looked at (no key).
    let claims = b64(&json!({"sub": "mallory", "exp": unix_now() + 600}));
    let bogus = |i: usize| {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": format!("bogus-{i}")});
        format!("{}.{claims}.c2lnbmF0dXJl", b64(&header))
    };
    let flood = |from: usize, n: usize| {
        let url = node.ws_url();
        join_all((from..from + n).map(move |i| {
            let (url, token) = (url.clone(), bogus(i));
            async move {
                let t = Instant::now();
                let r = Client::connect(&url, &token).await;
                (r.err().map(|e| (e.status, e.body)), t.elapsed())
            }
        }))
    };
    let check = |results: Vec<(Option<(u16, Value)>, Duration)>, what: &str| {
        for (refusal, took) in results {
            let (status, body) =
                refusal.unwrap_or_else(|| panic!("{what}: a bogus kid was accepted"));
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["reason"], "unknown signing key", "{what}");
            // Nobody waits on a fetch for long (the bound is 2 s; this server answers at once
            // or after 300 ms).
            assert!(
                took < Duration::from_millis(1800),
                "{what}: a handshake took {took:?}"
            );
        }
    };

    // Within the minimum interval of the start's fetch: refused at once, nothing fetched.
    check(flood(0, 30).await, "right after start");
    assert_eq!(server.fetches(), 1, "rate-limited by the start's fetch");

    // Past it, a concurrent flood shares one (slow) fetch; the rest of the interval fetches
    // nothing more.
    tokio::time::sleep((started + interval).saturating_duration_since(Instant::now())).await;
    server.set_delay(Duration::from_millis(300));
    let flood_started = Instant::now();
    check(flood(100, 60).await, "concurrent flood");
    assert_eq!(
        server.fetches(),
        2,
        "one fetch for the whole concurrent flood"
    );
    for round in 0..5 {
        check(
            flood(200 + round * 20, 20).await,
            "flood within the interval",
        );
    }
    let took = flood_started.elapsed();
    eprintln!("160 handshakes with unknown kids in {took:?}");
    assert!(
        took < interval,
        "the rounds took too long to prove anything"
    );
    assert_eq!(server.fetches(), 2, "still one fetch within the interval");

    // The next interval allows exactly one more (the second fetch started just after
    // `flood_started`: a margin).
    let next = flood_started + interval + Duration::from_millis(300);
    tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    check(flood(400, 40).await, "flood in the next interval");
    assert_eq!(server.fetches(), 3);
    let base = node.base();
    assert_eq!(
        metric(
            &base,
            r#"pushgate_jwks_fetches_total{trigger="unknown_kid"}"#
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &base,
            r#"pushgate_auth_failures_total{reason="unknown_kid"}"#
        )
        .await,
        (30 + 60 + 100 + 40) as f64
    );
    // The real key still works.
    accepted(&node, &key.token("ok", &[]), "ok", "the real key").await;
    assert_eq!(server.fetches(), 3);
}

#[tokio::test]
async fn handshakes_do_not_wait_long_on_a_slow_key_server() {
    let key = SigningKey::generate(Algorithm::ES256, "k");
    let server = JwksServer::start(&jwk_set(&[&key])).await;
    let node = jwks_node(
        "slow",
        &server.url,
        &[
            "--jwt-jwks-min-interval",
            "100ms",
            "--jwt-jwks-timeout",
            "8s",
        ],
    )
    .await;
    node.wait_ready(200).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = SigningKey::generate(Algorithm::ES256, "late");
    server.set_keys(&jwk_set(&[&key, &late]));
    server.set_delay(Duration::from_secs(5));
    let t = Instant::now();
    refused(
        &node,
        &late.token("x", &[]),
        "unknown signing key",
        "key server too slow",
    )
    .await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(3),
        "the handshake waited {took:?}, not about 2 s"
    );
    // The fetch went on without the handshake: once it lands, the key works.
    let base = node.base();
    eventually("the slow fetch completes", || async {
        metric(&base, "pushgate_jwks_keys").await == 2.0
    })
    .await;
    accepted(&node, &late.token("x", &[]), "x", "the late key").await;
}

#[tokio::test]
async fn bad_tokens_are_all_refused() {
    const ISSUER: &str = "https://id.example.test";
    let rsa = SigningKey::generate(Algorithm::RS256, "rsa");
    let ec = SigningKey::generate(Algorithm::ES256, "ec");
    let server = JwksServer::start(&jwk_set(&[&rsa, &ec])).await;
    let node = jwks_node(
        "matrix",
        &server.url,
        &["--jwt-issuer", ISSUER, "--jwt-leeway", "0s"],
    )
    .await;
    node.wait_ready(200).await;
    let later = unix_now() + 600;
    let good = json!({"sub": "sam", "exp": later, "iss": ISSUER});
    accepted(&node, &rsa.sign(&good), "sam", "good RS256").await;
    accepted(&node, &ec.sign(&good), "sam", "good ES256").await;

    // Wrong key: a key pair that is not published, under a published kid.
    let mut impostor = SigningKey::generate(Algorithm::RS256, "rsa");
    refused(
        &node,
        &impostor.sign(&good),
        "invalid signature",
        "wrong key",
    )
    .await;
    impostor.kid = "ec".into();
    refused(
        &node,
        &impostor.sign(&good),
        "algorithm not allowed",
        "RS256 under an EC kid",
    )
    .await;

    // alg none, with a published kid.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa"})),
        b64(&good)
    );
    refused(&node, &none, "algorithm not allowed", "alg none").await;

    // HS256 with the public key as the secret (algorithm confusion), as PEM and as the JWK.
    for (secret, what) in [
        (rsa.public_pem(), "HS256 with the public key PEM as secret"),
        (
            rsa.jwk().to_string().into_bytes(),
            "HS256 with the JWK as secret",
        ),
    ] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa".into());
        let token =
            jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&secret)).unwrap();
        refused(&node, &token, "algorithm not allowed", what).await;
    }

    let expired = json!({"sub": "sam", "exp": unix_now() - 60, "iss": ISSUER});
    refused(&node, &rsa.sign(&expired), "token expired", "expired").await;
    let wrong_issuer = json!({"sub": "sam", "exp": later, "iss": "https://evil.example"});
    refused(
        &node,
        &ec.sign(&wrong_issuer),
        "invalid issuer",
        "wrong issuer",
    )
    .await;
    let no_issuer = json!({"sub": "sam", "exp": later});
    refused(
        &node,
        &rsa.sign(&no_issuer),
        "missing claim: iss",
        "no issuer",
    )
    .await;

    // A token without kid: the set has two keys, so it names none of them.
    let unnamed =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good, &rsa.encoding).unwrap();
    refused(&node, &unnamed, "unknown signing key", "no kid, two keys").await;

    let base = node.base();
    for (reason, n) in [
        ("signature", 1.0),
        ("algorithm", 4.0),
        ("expired", 1.0),
        ("issuer", 1.0),
        ("missing_claim", 1.0),
        ("unknown_kid", 1.0),
    ] {
        assert_eq!(
            metric(
                &base,
                &format!(r#"pushgate_auth_failures_total{{reason="{reason}"}}"#)
            )
            .await,
            n,
            "{reason}"
        );
    }
    // None of these fetched the set again except the kid-less token (at most one fetch).
    assert!(server.fetches() <= 2, "{} fetches", server.fetches());
}

#[tokio::test]
async fn readiness_and_metrics_follow_the_key_set() {
    let key = SigningKey::generate(Algorithm::EdDSA, "ed");
    let server = JwksServer::start(&jwk_set(&[&key])).await;
    server.fail_with(503);
    let node = jwks_node(
        "ready",
        &server.url,
        &[
            "--jwt-jwks-refresh",
            "1s",
            "--jwt-jwks-min-interval",
            "300ms",
        ],
    )
    .await;
    let base = node.base();

    // Never loaded: up, not ready, and the failures show.
    let (status, body) = readyz_body(&node).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "no JWKS keys loaded");
    assert!(metric(&base, "pushgate_jwks_refresh_failures_total").await >= 1.0);
    assert_eq!(metric(&base, "pushgate_jwks_keys").await, 0.0);
    assert_eq!(
        metric(&base, "pushgate_jwks_last_success_timestamp_seconds").await,
        0.0
    );
    refused(
        &node,
        &key.token("a", &[]),
        "unknown signing key",
        "no keys yet",
    )
    .await;

    // The key server comes back: retried every minimum interval, the node turns ready.
    let failures = metric(&base, "pushgate_jwks_refresh_failures_total").await;
    server.set_keys(&jwk_set(&[&key]));
    node.wait_ready(200).await;
    assert_eq!(metric(&base, "pushgate_jwks_keys").await, 1.0);
    let last = metric(&base, "pushgate_jwks_last_success_timestamp_seconds").await;
    assert!(
        (last - unix_now() as f64).abs() < 30.0,
        "last success at {last}"
    );
    accepted(&node, &key.token("a", &[]), "a", "keys loaded").await;

    // It fails again (an error status, then a body that is not a key set): the last good keys
    // stay in use, the node stays ready, and each failure is counted.
    server.fail_with(500);
    eventually("a failed refresh", || async {
        metric(&base, "pushgate_jwks_refresh_failures_total").await > failures
    })
    .await;
    let failures = metric(&base, "pushgate_jwks_refresh_failures_total").await;
    server.set_keys(&json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}));
    eventually("a refresh refusing a set without usable keys", || async {
        metric(&base, "pushgate_jwks_refresh_failures_total").await > failures
    })
    .await;
    assert_eq!(node.readyz().await, 200);
    assert_eq!(metric(&base, "pushgate_jwks_keys").await, 1.0);
    accepted(&node, &key.token("a", &[]), "a", "last good keys").await;
    assert_eq!(
        metric(&base, "pushgate_jwks_last_success_timestamp_seconds").await,
        last,
        "no success since"
    );
}

#[tokio::test]
async fn jwks_over_https_trusts_the_configured_roots() {
    let dir = Scratch::new("jwks-tls");
    make_certs(&dir.path(""));
    let certs = std::fs::read(dir.path("server.crt")).unwrap();
    let private = std::fs::read(dir.path("server.key")).unwrap();
    let tls = {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certs)
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&private).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    };
    let key = SigningKey::generate(Algorithm::RS256, "tls");
    let server = JwksServer::start_tls(&jwk_set(&[&key]), tls).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // Trusting the test CA (SSL_CERT_FILE replaces the system's roots): keys load over https.
    let ca = dir.path("ca.crt");
    let node = NodeProcess::spawn_with_keys(
        "tls",
        &["--jwt-jwks-url", &server.url],
        &[("SSL_CERT_FILE", &ca)],
        &[],
    )
    .await;
    node.wait_ready(200).await;
    accepted(
        &node,
        &key.token("tia", &[]),
        "tia",
        "key fetched over https",
    )
    .await;

    // Without the test CA among its roots the server's certificate is refused: no keys, not
    // ready.
    let untrusting = NodeProcess::spawn_with_keys(
        "tls-untrusted",
        &["--jwt-jwks-url", &server.url],
        &[("SSL_CERT_FILE", "/nonexistent/ca.pem")],
        &[],
    )
    .await;
    assert_eq!(untrusting.readyz().await, 503);
    assert!(metric(&untrusting.base(), "pushgate_jwks_refresh_failures_total").await >= 1.0);
    assert_eq!(metric(&untrusting.base(), "pushgate_jwks_keys").await, 0.0);
}

#[tokio::test]
async fn another_key_source_beside_jwks_stops_the_start() {
    let bin = pushgate_tests::pushgate_bin();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        (&["--jwt-secret", "s"], &[]),
        (&["--jwt-public-key", "/tmp/key.pem"], &[]),
        (&[], &[("PUSHGATE_JWT_SECRET", "s")]),
    ];
    for (args, env) in cases {
        let out = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new(&bin)
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(["--jwt-jwks-url", "https://id.example.test/jwks.json"])
                .args(args)
                .envs(env.iter().copied())
                .output(),
        )
        .await
        .expect("the node exits at once")
        .expect("running pushgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}: started");
        assert!(
            stderr.contains("--jwt-jwks-url") && stderr.contains("cannot be used with"),
            "{args:?} {env:?}: {stderr}"
        );
    }
    // A URL that is not http(s) is refused too.
    let out = std::process::Command::new(&bin)
        .args(["serve", "--jwt-jwks-url", "file:///etc/jwks.json"])
        .output()
        .expect("running pushgate");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
