//! permessage-deflate across nodes: a delivery compressed once per node reaches every
//! subscriber that negotiated it with the same payload bytes as the subscribers that did not,
//! on three nodes over Redis.
//!
//! The deflate subscribers are spoken by hand with pushgate-websocket's client-side reader (no
//! WebSocket client library here inflates); the plain ones are tungstenite clients that offer
//! no extension.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use pushgate_tests::{NodeProcess, RedisServer, WAIT, api, metric, token};
use pushgate_websocket::{Config, FrameReader, Incoming};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A subscriber that negotiated permessage-deflate, speaking the protocol by hand.
struct DeflateClient {
    tcp: TcpStream,
    reader: FrameReader,
    buf: BytesMut,
    /// Messages that came compressed (RSV1), of those read.
    compressed: usize,
}

impl DeflateClient {
    async fn connect(node: &NodeProcess, user: &str, channel: &str) -> Self {
        let mut tcp = TcpStream::connect(node.addr).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
             Authorization: Bearer {}\r\n\r\n",
            node.addr,
            token(user, &[channel], &[channel]),
        );
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut buf = BytesMut::new();
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break String::from_utf8_lossy(&buf.split_to(end + 4)).into_owned();
            }
            read_more(&mut tcp, &mut buf).await;
        };
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
            .expect("deflate negotiated");
        assert_eq!(
            extensions,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let reader = FrameReader::client(Config {
            max_message: 1 << 20,
            deflate: true,
        });
        let mut client = Self {
            tcp,
            reader,
            buf,
            compressed: 0,
        };
        assert_eq!(client.next_json().await["type"], "welcome");
        client
            .send(&json!({"type": "subscribe", "id": 1, "channel": channel}))
            .await;
        assert_eq!(client.next_json().await["type"], "ack");
        client
    }

    /// The next text message's payload.
    async fn next_text(&mut self) -> Vec<u8> {
        loop {
            let rsv1 = self.buf.first().is_some_and(|b| b & 0x40 != 0);
            match self.reader.read(&mut self.buf).expect("valid frames") {
                Some(Incoming::Text(text)) => {
                    self.compressed += usize::from(rsv1);
                    return text.to_vec();
                }
                Some(_) => {}
                None => read_more(&mut self.tcp, &mut self.buf).await,
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        serde_json::from_slice(&self.next_text().await).expect("JSON")
    }

    /// Sends a masked text frame (requests are small: a 7-bit length).
    async fn send(&mut self, frame: &Value) {
        let payload = frame.to_string().into_bytes();
        assert!(payload.len() < 126);
        let key = [7, 1, 9, 3];
        let mut wire = vec![0x81, 0x80 | payload.len() as u8];
        wire.extend_from_slice(&key);
        wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.tcp.write_all(&wire).await.expect("write");
    }
}

async fn read_more(tcp: &mut TcpStream, buf: &mut BytesMut) {
    let mut chunk = [0u8; 8192];
    let n = timeout(WAIT, tcp.read(&mut chunk))
        .await
        .expect("timed out reading")
        .expect("read");
    assert!(n > 0, "the connection ended");
    buf.extend_from_slice(&chunk[..n]);
}

/// A dashboard update of about 2 KB.
fn dashboard(round: u64) -> Value {
    let rows: Vec<Value> = (0..24)
        .map(|i| json!({"host": format!("web-{i:02}"), "cpu": 0.25, "mem": 0.5, "status": "ok"}))
        .collect();
    json!({"round": round, "rows": rows})
}

#[tokio::test]
async fn a_compressed_fan_out_delivers_the_same_bytes_to_1000_subscribers_across_3_nodes() {
    const SUBSCRIBERS: usize = 1000;
    const CHANNEL: &str = "dash:1";
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ["c1", "c2", "c3"] {
        nodes.push(NodeProcess::spawn(id, Some(&redis.url()), &[]).await);
    }
    for node in &nodes {
        node.wait_peers(2).await;
    }
    let mut deflated = Vec::new();
    for i in 0..SUBSCRIBERS {
        let node = &nodes[i % nodes.len()];
        deflated.push(DeflateClient::connect(node, &format!("d{i}"), CHANNEL).await);
    }
    // Beside them, on every node, a client that offers no extension.
    let mut plain = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut request = node.ws_url().into_client_request().unwrap();
        let bearer = format!("Bearer {}", token(&format!("p{i}"), &[CHANNEL], &[]));
        request
            .headers_mut()
            .insert("authorization", bearer.parse().unwrap());
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert!(response.headers().get("sec-websocket-extensions").is_none());
        ws.next().await.unwrap().unwrap(); // the welcome
        let subscribe = json!({"type": "subscribe", "id": 1, "channel": CHANNEL});
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        ws.next().await.unwrap().unwrap(); // the ack
        plain.push(ws);
    }

    // Two updates through the API of one node, one through another's.
    const ROUNDS: u64 = 3;
    for round in 0..ROUNDS {
        let node = &nodes[(round as usize) % 2];
        let body = json!({"channel": CHANNEL, "data": dashboard(round)});
        let (status, reply) = api(&node.base(), "/api/publish", &body).await;
        assert_eq!(status, 200, "{reply}");
    }

    // The plain client's frames on each node are the reference, by round.
    let round_of = |text: &[u8]| {
        let frame: Value = serde_json::from_slice(text).expect("JSON");
        frame["data"]["round"].as_u64().expect("a round")
    };
    let mut reference = Vec::new();
    for ws in &mut plain {
        let mut texts = vec![Vec::new(); ROUNDS as usize];
        for _ in 0..ROUNDS {
            let text = loop {
                match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
                    Message::Text(text) => break text.as_bytes().to_vec(),
                    _ => continue,
                }
            };
            let round = round_of(&text) as usize;
            texts[round] = text;
        }
        reference.push(texts);
    }
    for (i, client) in deflated.iter_mut().enumerate() {
        for _ in 0..ROUNDS {
            let text = client.next_text().await;
            let round = round_of(&text);
            assert_eq!(
                text,
                reference[i % nodes.len()][round as usize],
                "subscriber {i}, round {round}: not the plain client's bytes"
            );
            let frame: Value = serde_json::from_slice(&text).unwrap();
            assert_eq!(frame["data"], dashboard(round));
        }
        assert_eq!(
            client.compressed, ROUNDS as usize,
            "subscriber {i}: all compressed"
        );
    }

    // Each node compressed each message once, whatever its number of subscribers.
    for node in &nodes {
        let base = node.base();
        let compressions = metric(&base, "pushgate_message_compressions_total").await;
        let deliveries = metric(&base, "pushgate_deliveries_total").await;
        assert_eq!(compressions, ROUNDS as f64, "{}", node.id);
        assert!(
            deliveries >= (ROUNDS * 300) as f64,
            "{}: {deliveries}",
            node.id
        );
    }
}
