//! Pages on another origin: the client-facing routes (`/ws`, `/sse`, `/pushgate.js`, and
//! `/dev/token` when origins are listed) answer CORS requests, preflights included, for the
//! origins `--allowed-origins` allows, and refuse the others with 403 and no CORS headers.
//! The server API, health and metrics stay without CORS.

mod common;

use common::TestNode;
use pushgate_tests::{API_KEY, SECRET, token};
use reqwest::{Method, Response};
use serde_json::Value;

const APP: &str = "https://app.pushgate.example";
const OTHER: &str = "https://other.pushgate.example";

/// A request with `Origin: origin` (when given) and `headers`; the response, body unread (an
/// event stream stays open until it is dropped).
async fn send(
    method: Method,
    url: &str,
    origin: Option<&str>,
    headers: &[(&str, &str)],
) -> Response {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request")
}

/// A header's values, joined with ", " (empty when absent).
fn header(response: &Response, name: &str) -> String {
    let values: Vec<_> = (response.headers().get_all(name).iter())
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    values.join(", ")
}

fn varies_by_origin(response: &Response) -> bool {
    header(response, "vary")
        .split(',')
        .any(|v| v.trim().eq_ignore_ascii_case("origin"))
}

/// No `Access-Control-*` header at all.
fn no_cors(response: &Response) -> bool {
    !(response.headers().keys()).any(|name| name.as_str().starts_with("access-control-"))
}

/// A preflight as Chromium sends it for a fetch-based SSE client with a bearer token resuming
/// from an event ID.
async fn preflight(url: &str, origin: &str) -> Response {
    send(
        Method::OPTIONS,
        url,
        Some(origin),
        &[
            ("access-control-request-method", "GET"),
            (
                "access-control-request-headers",
                "authorization,last-event-id",
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn a_listed_origin_gets_cors_on_the_event_stream() {
    let node = TestNode::start(&["--allowed-origins", &format!("{APP},{OTHER}")]).await;
    let t = token("alice", &["room:*"], &[]);
    let sse = format!("{}/sse?channel=room:1&token={t}", node.base());

    for origin in [APP, OTHER] {
        let stream = send(Method::GET, &sse, Some(origin), &[]).await;
        assert_eq!(stream.status(), 200, "{origin}");
        assert_eq!(header(&stream, "access-control-allow-origin"), origin);
        assert_eq!(header(&stream, "access-control-allow-credentials"), "true");
        assert!(varies_by_origin(&stream), "{:?}", stream.headers());
        assert!(header(&stream, "content-type").starts_with("text/event-stream"));
    }

    // The token as a header, as a fetch-based client sends it, after its preflight.
    let bare = format!("{}/sse?channel=room:1", node.base());
    let answer = preflight(&bare, APP).await;
    assert!(answer.status().is_success(), "{}", answer.status());
    assert_eq!(header(&answer, "access-control-allow-origin"), APP);
    assert_eq!(header(&answer, "access-control-allow-credentials"), "true");
    assert!(header(&answer, "access-control-allow-methods").contains("GET"));
    let allowed = header(&answer, "access-control-allow-headers").to_ascii_lowercase();
    for needed in ["authorization", "last-event-id"] {
        assert!(allowed.contains(needed), "{allowed}");
    }
    assert_eq!(header(&answer, "access-control-max-age"), "600");
    assert!(varies_by_origin(&answer));
    let stream = send(
        Method::GET,
        &bare,
        Some(APP),
        &[
            ("authorization", &format!("Bearer {t}")),
            ("last-event-id", "x:1"),
        ],
    )
    .await;
    assert_eq!(stream.status(), 200);
    assert_eq!(header(&stream, "access-control-allow-origin"), APP);
}

#[tokio::test]
async fn an_unlisted_origin_is_refused_without_cors_headers() {
    let node = TestNode::start(&["--allowed-origins", APP]).await;
    let t = token("bob", &["room:*"], &[]);
    let base = node.base();
    let sse = format!("{base}/sse?channel=room:1&token={t}");

    for origin in [
        "https://evil.example",
        "https://app.pushgate.example.evil",
        "http://app.pushgate.example",
        "null",
    ] {
        let refused = send(Method::GET, &sse, Some(origin), &[]).await;
        assert_eq!(refused.status(), 403, "{origin}");
        assert!(no_cors(&refused), "{origin}: {:?}", refused.headers());
        assert!(varies_by_origin(&refused), "{origin}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "forbidden");
        assert_eq!(body["reason"], "origin not allowed");

        let answer = preflight(&sse, origin).await;
        assert_eq!(answer.status(), 403, "{origin}");
        assert!(no_cors(&answer), "{origin}: {:?}", answer.headers());

        for path in ["/pushgate.js", "/ws"] {
            let refused = send(Method::GET, &format!("{base}{path}"), Some(origin), &[]).await;
            assert_eq!(refused.status(), 403, "{path} {origin}");
            assert!(no_cors(&refused), "{path} {origin}");
        }
    }
    assert_eq!(node.connections(), 0);

    // Without an Origin (curl, servers, SDKs outside browsers) nothing changes, and there are
    // no CORS headers to send; the answer still varies by Origin for caches.
    let stream = send(Method::GET, &sse, None, &[]).await;
    assert_eq!(stream.status(), 200);
    assert!(no_cors(&stream), "{:?}", stream.headers());
    assert!(varies_by_origin(&stream));
}

#[tokio::test]
async fn the_sdk_and_the_handshake_probe_are_readable_from_a_listed_origin() {
    let node = TestNode::start(&["--allowed-origins", APP]).await;
    let base = node.base();

    let sdk = send(Method::GET, &format!("{base}/pushgate.js"), Some(APP), &[]).await;
    assert_eq!(sdk.status(), 200);
    assert_eq!(header(&sdk, "access-control-allow-origin"), APP);
    assert!(varies_by_origin(&sdk));
    let sdk = send(Method::GET, &format!("{base}/pushgate.js"), None, &[]).await;
    assert!(no_cors(&sdk) && varies_by_origin(&sdk));

    // The SDK asks /ws over plain HTTP why a handshake failed: the 401 reason is readable.
    let probe = send(
        Method::GET,
        &format!("{base}/ws?token=nope"),
        Some(APP),
        &[],
    )
    .await;
    assert_eq!(probe.status(), 401);
    assert_eq!(header(&probe, "access-control-allow-origin"), APP);
    let body: Value = probe.json().await.unwrap();
    assert_eq!(body["reason"], "malformed token");
}

#[tokio::test]
async fn any_origin_gets_a_wildcard_without_credentials_by_default() {
    let node = TestNode::start(&[]).await;
    let t = token("carol", &["room:*"], &[]);
    let sse = format!("{}/sse?channel=room:1&token={t}", node.base());

    let stream = send(Method::GET, &sse, Some("https://anything.example"), &[]).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(header(&stream, "access-control-allow-origin"), "*");
    assert_eq!(header(&stream, "access-control-allow-credentials"), "");
    // The answer is the same for every origin.
    assert!(!varies_by_origin(&stream), "{:?}", stream.headers());

    let answer = preflight(&sse, "https://anything.example").await;
    assert!(answer.status().is_success());
    assert_eq!(header(&answer, "access-control-allow-origin"), "*");
    assert!(header(&answer, "access-control-allow-headers").contains("last-event-id"));
}

#[tokio::test]
async fn dev_tokens_cross_origins_only_when_listed() {
    let listed =
        TestNode::start_bare(&["--dev", "--jwt-secret", SECRET, "--allowed-origins", APP]).await;
    let url = format!("{}/dev/token?sub=dana", listed.base());
    let reply = send(Method::GET, &url, Some(APP), &[]).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(header(&reply, "access-control-allow-origin"), APP);
    let reply = send(Method::GET, &url, Some(OTHER), &[]).await;
    assert_eq!(reply.status(), 403);
    assert!(no_cors(&reply));

    // Under the default (any origin), a page elsewhere must not mint tokens: same origin only.
    let open = TestNode::start_bare(&["--dev", "--jwt-secret", SECRET]).await;
    let url = format!("{}/dev/token?sub=dana", open.base());
    let reply = send(Method::GET, &url, Some(OTHER), &[]).await;
    assert_eq!(reply.status(), 200);
    assert!(no_cors(&reply), "{:?}", reply.headers());
    let sdk = send(
        Method::GET,
        &format!("{}/pushgate.js", open.base()),
        Some(OTHER),
        &[],
    )
    .await;
    assert_eq!(header(&sdk, "access-control-allow-origin"), "*");
}

#[tokio::test]
async fn the_server_api_health_and_metrics_have_no_cors() {
    let node = TestNode::start(&["--allowed-origins", APP]).await;
    let base = node.base();
    let key = format!("Bearer {API_KEY}");
    for path in [
        "/api/stats",
        "/api/nodes",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
    ] {
        let reply = send(
            Method::GET,
            &format!("{base}{path}"),
            Some(APP),
            &[("authorization", &key)],
        )
        .await;
        assert_eq!(reply.status(), 200, "{path}");
        assert!(no_cors(&reply), "{path}: {:?}", reply.headers());
    }
    let answer = preflight(&format!("{base}/api/publish"), APP).await;
    assert!(!answer.status().is_success(), "{}", answer.status());
    assert!(no_cors(&answer), "{:?}", answer.headers());
}
