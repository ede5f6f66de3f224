//! What the gateway serves to browsers: the demo chat at `/`, the JavaScript SDK at
//! `/pushgate.js`, the admin console at `/admin` (only with an API key), and `/dev/token`, which
//! exists only in `--dev` mode.

mod common;

use common::{TestNode, raw_connect};
use pushgate_tests::SECRET;
use serde_json::Value;

async fn get(url: &str) -> (u16, String, String) {
    let response = reqwest::get(url).await.expect("GET");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn the_sdk_and_the_chat_page_are_served() {
    let node = TestNode::start(&[]).await;
    let (status, content_type, body) = get(&format!("{}/pushgate.js", node.base())).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/javascript"),
        "{content_type}"
    );
    assert!(body.contains("export class Pushgate"));
    assert_eq!(body, include_str!("../../../clients/js/pushgate.js"));

    let (status, content_type, body) = get(&format!("{}/", node.base())).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.contains(r#"from "/pushgate.js""#));
}

#[tokio::test]
async fn the_admin_console_is_served_only_with_an_api_key() {
    let node = TestNode::start(&[]).await;
    let response = reqwest::get(format!("{}/admin", node.base()))
        .await
        .expect("GET /admin");
    assert_eq!(response.status().as_u16(), 200);
    let header = |name: &str| {
        (response.headers().get(name))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(header("content-type").starts_with("text/html"));
    // Not framed by other sites, and talking to this origin only.
    let csp = header("content-security-policy");
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let body = response.text().await.unwrap();
    assert_eq!(body, include_str!("../assets/admin.html"));
    // The key is held in memory, never stored by the page.
    for storage in ["localStorage", "sessionStorage", "document.cookie"] {
        assert!(!body.contains(storage), "the page uses {storage}");
    }

    let bare = TestNode::start_bare(&["--jwt-secret", SECRET]).await;
    let (status, _, _) = get(&format!("{}/admin", bare.base())).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn dev_tokens_exist_only_in_dev_mode() {
    let node = TestNode::start(&[]).await;
    let (status, _, _) = get(&format!("{}/dev/token?sub=alice", node.base())).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_dev_token_opens_a_connection_for_its_user() {
    let node = TestNode::start_bare(&["--dev", "--jwt-secret", SECRET]).await;
    let (status, content_type, body) = get(&format!("{}/dev/token?sub=alice", node.base())).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["expires_in"], 3600);
    let token = body["token"].as_str().expect("a token");

    let grant = node
        .node
        .verifier
        .verify(token)
        .await
        .expect("a valid token");
    assert_eq!(grant.user, "alice");
    assert!(grant.subscribe.allows("any:channel") && grant.publish.allows("room:1"));
    let (_ws, welcome) = raw_connect(&node.ws_url(), token).await;
    assert_eq!(welcome["user"], "alice");

    for bad in ["", "sub=", "sub=a%20b"] {
        let (status, _, body) = get(&format!("{}/dev/token?{bad}", node.base())).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["field"], "sub", "{bad}");
    }
}
