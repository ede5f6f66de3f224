//! The WebSocket layer fails by RFC 6455: a frame that breaks the protocol gets a close frame
//! with 1002, a text message that is not UTF-8 gets 1007, then the connection closes; and a
//! request's headers are bounded (`--max-header-bytes`, 431 beyond).
//!
//! The frames are written byte by byte over a plain TCP connection, since no WebSocket client
//! library sends broken frames on purpose.

mod common;

use common::TestNode;
use pushgate_tests::raw_ws::RawWs;
use pushgate_tests::raw_ws::first::{CLOSE, CONTINUATION, FIN, PING, RSV1, RSV2, RSV3, TEXT};
use pushgate_tests::{WAIT, eventually, token};
use pushgate_websocket::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Opens `path` (`/ws` or `/echo`) with a valid token and, on `/ws`, reads the welcome.
async fn open(node: &TestNode, path: &str) -> RawWs {
    let bearer = format!(
        "Authorization: Bearer {}\r\n",
        token("alice", &["*"], &["*"])
    );
    let (mut ws, _) = RawWs::open(node.addr, path, &bearer).await;
    if path == "/ws" {
        let welcome = ws.next_text().await;
        assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
    }
    ws
}

/// On `/ws` and on `/echo`: `violate` breaks the protocol, and the server answers with a
/// close frame carrying `code`, then ends the connection and releases its slot.
async fn closes_with<F>(code: u16, violate: F)
where
    F: AsyncFn(&mut RawWs),
{
    let node = TestNode::start(&[]).await;
    for path in ["/ws", "/echo"] {
        let mut ws = open(&node, path).await;
        // A valid exchange first: the connection works until the violation.
        ws.send(FIN | PING, true, b"hi").await;
        assert_eq!(
            ws.next().await,
            Some(Incoming::Pong("hi".into())),
            "{path}: pong"
        );
        violate(&mut ws).await;
        assert_eq!(ws.close_code().await, Some(code), "{path}");
        ws.until_ended().await;
    }
    eventually("the connections are released", || async {
        node.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn an_unmasked_client_frame_gets_1002() {
    closes_with(1002, async |ws| ws.send(FIN | TEXT, false, b"{}").await).await;
}

#[tokio::test]
async fn reserved_bits_without_an_extension_get_1002() {
    for rsv in [RSV1, RSV2, RSV3] {
        closes_with(1002, async |ws| {
            ws.send(FIN | rsv | TEXT, true, b"{}").await
        })
        .await;
    }
}

#[tokio::test]
async fn a_reserved_data_opcode_gets_1002() {
    closes_with(1002, async |ws| ws.send(FIN | 0x3, true, b"x").await).await;
}

#[tokio::test]
async fn a_reserved_control_opcode_gets_1002() {
    closes_with(1002, async |ws| ws.send(FIN | 0xB, true, b"x").await).await;
}

#[tokio::test]
async fn a_fragmented_control_frame_gets_1002() {
    closes_with(1002, async |ws| ws.send(PING, true, b"part").await).await;
}

#[tokio::test]
async fn a_control_frame_over_125_bytes_gets_1002() {
    closes_with(1002, async |ws| {
        ws.send(FIN | PING, true, &[b'p'; 126]).await
    })
    .await;
}

#[tokio::test]
async fn a_continuation_with_nothing_to_continue_gets_1002() {
    closes_with(1002, async |ws| {
        ws.send(FIN | CONTINUATION, true, b"{}").await
    })
    .await;
}

#[tokio::test]
async fn a_new_message_inside_a_fragmented_one_gets_1002() {
    closes_with(1002, async |ws| {
        ws.send(TEXT, true, b"{\"type\":").await;
        ws.send(FIN | TEXT, true, b"{}").await;
    })
    .await;
}

#[tokio::test]
async fn a_close_frame_with_an_invalid_code_gets_1002() {
    // 1005 and 1006 are never sent on the wire; 999 is outside the defined ranges.
    for invalid in [999u16, 1005, 1006] {
        closes_with(1002, async |ws| {
            ws.send(FIN | CLOSE, true, &invalid.to_be_bytes()).await
        })
        .await;
    }
}

#[tokio::test]
async fn invalid_utf8_in_a_text_message_gets_1007() {
    closes_with(1007, async |ws| {
        ws.send(FIN | TEXT, true, b"{\"x\":\"\xff\xfe\"}").await
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_across_fragments_gets_1007() {
    // The two halves of "é" are valid only together; the second fragment ends the message
    // with a lone continuation byte instead.
    closes_with(1007, async |ws| {
        ws.send(TEXT, true, b"{\"x\":\"\xc3").await;
        ws.send(FIN | CONTINUATION, true, b"\xc3\"}").await;
    })
    .await;
}

#[tokio::test]
async fn a_valid_fragmented_message_still_works() {
    let node = TestNode::start(&[]).await;
    let mut ws = open(&node, "/echo").await;
    ws.send(TEXT, true, "h\u{e9}".as_bytes()).await;
    ws.send(FIN | PING, true, b"").await; // control frames may come between fragments
    ws.send(FIN | CONTINUATION, true, "llo".as_bytes()).await;
    assert_eq!(ws.next_text().await, "h\u{e9}llo".as_bytes());
}

/// The status line of the answer to a `GET path` with `headers`.
async fn status_of(node: &TestNode, path: &str, headers: &str) -> String {
    let mut tcp = TcpStream::connect(node.addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
    // The server may answer before it has read everything: a failed write is not the point.
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let mut chunk = [0; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("timed out waiting for an answer")
            .expect("the connection was reset instead of answered");
        assert!(n > 0, "the connection ended without an answer");
        answer.extend_from_slice(&chunk[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn request_headers_are_bounded_with_431() {
    let node = TestNode::start(&[]).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let bearer = format!("Authorization: Bearer {}\r\n", token("alice", &["*"], &[]));
    // Within the 16 KiB default: the handshake goes through.
    let padding = format!("X-Padding: {}\r\n", "p".repeat(8 * 1024));
    assert!(
        status_of(&node, "/ws", &format!("{upgrade}{bearer}{padding}"))
            .await
            .starts_with("HTTP/1.1 101")
    );
    // One 64 KiB header line, and a 1 MB Authorization header: 431, not a reset.
    let long_line = format!("X-Padding: {}\r\n", "p".repeat(64 * 1024));
    let huge_auth = format!("Authorization: Bearer {}\r\n", "a".repeat(1024 * 1024));
    for headers in [
        format!("{upgrade}{bearer}{long_line}"),
        format!("{upgrade}{huge_auth}"),
    ] {
        let status = status_of(&node, "/ws", &headers).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    }
    // Any path, and the limit follows --max-header-bytes.
    let small = TestNode::start(&["--max-header-bytes", "2048"]).await;
    let status = status_of(&small, "/healthz", &padding).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    let status = status_of(&small, "/healthz", "X-Small: 1\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}
