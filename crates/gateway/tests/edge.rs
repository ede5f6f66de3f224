//! The edge of a node: client addresses behind trusted proxies (`--trusted-proxies`) and
//! native TLS (`--tls-cert`, `--tls-key`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestNode;
use pushgate::{ServeArgs, Server};
use pushgate_tests::{Scratch, WAIT, make_certs, token, tool};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A WebSocket handshake to `node` from the local address `from` (any 127.x.y.z works on
/// Linux), with `X-Forwarded-For: xff` when given. Returns the open socket, or the HTTP status
/// of the refusal.
async fn handshake_from(
    node: &TestNode,
    from: &str,
    xff: Option<&str>,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, u16> {
    let mut request = node.ws_url().into_client_request().unwrap();
    let headers = request.headers_mut();
    let t = token("edge", &["room:*"], &[]);
    headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
    if let Some(xff) = xff {
        headers.insert("x-forwarded-for", xff.parse().unwrap());
    }
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let tcp = timeout(WAIT, socket.connect(node.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    match timeout(WAIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("handshake timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The status of `GET /sse` from 127.0.0.1 with `X-Forwarded-For: xff` (the stream is kept
/// open in the returned response).
async fn sse_from(node: &TestNode, xff: &str) -> (u16, reqwest::Response) {
    let response = timeout(
        WAIT,
        reqwest::Client::new()
            .get(format!("{}/sse?channel=room:1", node.base()))
            .bearer_auth(token("edge", &["room:*"], &[]))
            .header("x-forwarded-for", xff)
            .send(),
    )
    .await
    .expect("SSE response in time")
    .expect("SSE request");
    (response.status().as_u16(), response)
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // Trusted proxies elsewhere, none: 127.0.0.1 is not one of them.
    for trusted in [&["--trusted-proxies", "10.0.0.0/8,192.168.1.1"][..], &[]] {
        let mut flags = vec!["--max-connections-per-ip", "1"];
        flags.extend_from_slice(trusted);
        let node = TestNode::start(&flags).await;
        let _first = handshake_from(&node, "127.0.0.1", Some("203.0.113.1"))
            .await
            .expect("the first connection from 127.0.0.1");
        // Claiming another address does not make it one: still 127.0.0.1, over its limit.
        let refused = handshake_from(&node, "127.0.0.1", Some("203.0.113.2")).await;
        assert_eq!(refused.err(), Some(429), "trusted: {trusted:?}");
        let refused = handshake_from(&node, "127.0.0.1", Some("10.1.2.3, 198.51.100.4")).await;
        assert_eq!(refused.err(), Some(429), "trusted: {trusted:?}");
        // Another peer address is another client.
        let _other = handshake_from(&node, "127.0.0.2", Some("203.0.113.1"))
            .await
            .expect("a connection from 127.0.0.2");
        assert_eq!(node.connections(), 2);
    }
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_by_the_right_most_untrusted_address() {
    let node = TestNode::start(&[
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.1, 10.0.0.0/8",
    ])
    .await;
    let proxy = "127.0.0.1";
    let _a = handshake_from(&node, proxy, Some("203.0.113.1"))
        .await
        .expect("client 203.0.113.1 through the proxy");
    let _b = handshake_from(&node, proxy, Some("203.0.113.2"))
        .await
        .expect("client 203.0.113.2 through the same proxy");
    // The right-most untrusted entry is the client, whatever it prepended.
    let refused = handshake_from(&node, proxy, Some("198.51.100.7, 203.0.113.1")).await;
    assert_eq!(refused.err(), Some(429));
    // Trusted hops (another proxy in front of this one) are skipped.
    let refused = handshake_from(&node, proxy, Some("203.0.113.2, 10.9.9.9")).await;
    assert_eq!(refused.err(), Some(429));
    let _c = handshake_from(&node, proxy, Some("203.0.113.3, 10.9.9.9"))
        .await
        .expect("client 203.0.113.3 behind two proxies");
    // Without the header the connection is the proxy's own.
    let _own = handshake_from(&node, proxy, None)
        .await
        .expect("the proxy's own connection");
    assert_eq!(
        handshake_from(&node, proxy, None).await.err(),
        Some(429),
        "the proxy itself is one client"
    );
    // A peer that is not trusted counts as itself, header or not.
    let _d = handshake_from(&node, "127.0.0.3", Some("203.0.113.4"))
        .await
        .expect("an untrusted peer");
    assert_eq!(
        handshake_from(&node, "127.0.0.3", Some("203.0.113.5"))
            .await
            .err(),
        Some(429)
    );
    assert_eq!(node.connections(), 5);

    // SSE streams are counted by the same address.
    let (status, _stream) = sse_from(&node, "203.0.113.9").await;
    assert_eq!(status, 200);
    let (status, _) = sse_from(&node, "203.0.113.9").await;
    assert_eq!(status, 429);
    let (status, _) = sse_from(&node, "203.0.113.1").await;
    assert_eq!(status, 429, "203.0.113.1 already holds a WebSocket");
}

#[tokio::test]
async fn native_tls_serves_wss_and_refuses_plain_ws() {
    let Some(_) = tool("openssl", true) else {
        return;
    };
    let scratch = Scratch::new("native-tls");
    make_certs(&scratch.path("certs"));
    let (cert, key) = (
        scratch.path("certs/server.crt"),
        scratch.path("certs/server.key"),
    );
    let mut node = TestNode::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--instance-id",
        "tls-node",
        "--drain-period",
        "500ms",
    ])
    .await;

    let ca = std::fs::read(scratch.path("certs/ca.crt")).unwrap();
    let tls = pushgate_client::tls::config_with_ca_pem(&ca).unwrap();
    let url = format!("wss://localhost:{}/ws", node.addr.port());
    let client = timeout(
        WAIT,
        pushgate_client::Client::builder(&url)
            .token(token("alice", &["room:*"], &["room:*"]))
            .tls(tls)
            .connect(),
    )
    .await
    .expect("wss connection in time")
    .expect("wss connection");
    let session = client.connected().await.unwrap();
    assert_eq!(session.node, "tls-node");
    assert_eq!(session.user, "alice");
    let mut room = client.subscribe("room:1").await.unwrap();
    client.publish("room:1", &json!("over tls")).await.unwrap();
    let got = timeout(WAIT, room.recv()).await.unwrap().unwrap();
    assert_eq!(got.data, json!("over tls"));

    // Plain ws:// to the TLS port is no WebSocket at all.
    let plain = timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", node.addr.port())),
    )
    .await
    .expect("the plain attempt ends in time");
    assert!(plain.is_err(), "a plain ws:// handshake must fail");

    // Graceful drain over TLS: the client gets 1001 and the server returns.
    let mut events = client.events();
    let stopped = node.begin_shutdown();
    let code = timeout(WAIT, async {
        loop {
            if let Ok(pushgate_client::Event::Disconnected { code, .. }) = events.recv().await {
                return code;
            }
        }
    })
    .await
    .expect("disconnected by the drain");
    assert_eq!(code, Some(1001));
    timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the server returns after the drain")
        .unwrap()
        .unwrap();
    client.close().await;
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_start() {
    let args = ServeArgs::parse_from([
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "s",
        "--tls-cert",
        "/nonexistent/server.crt",
        "--tls-key",
        "/nonexistent/server.key",
    ])
    .unwrap();
    let error = Server::bind(args).await.err().expect("start must fail");
    assert!(
        format!("{error:#}").contains("/nonexistent/server.crt"),
        "{error:#}"
    );
}
