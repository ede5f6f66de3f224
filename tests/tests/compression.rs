//! permessage-deflate across nodes: a delivery compressed once per node reaches every
//! subscriber that negotiated it with the same payload bytes as the subscribers that did not,
//! on three nodes over Redis.
//!
//! The deflate subscribers are spoken by hand with pushgate-websocket's client-side reader (no
//! WebSocket client library here inflates); the plain ones are tungstenite clients that offer
//! no extension.

use futures_util::{SinkExt, StreamExt};
use pushgate_tests::raw_ws::RawWs;
use pushgate_tests::raw_ws::first::{FIN, TEXT};
use pushgate_tests::{NodeProcess, RedisServer, WAIT, api, metric, token};
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A subscriber to `channel` that negotiated permessage-deflate, spoken by hand.
async fn deflate_client(node: &NodeProcess, user: &str, channel: &str) -> RawWs {
    let headers = format!(
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         Authorization: Bearer {}\r\n",
        token(user, &[channel], &[channel]),
    );
    let (mut ws, head) = RawWs::open(node.addr, "/ws", &headers).await;
    let extensions = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
        .expect("deflate negotiated");
    assert_eq!(
        extensions,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let subscribe = json!({"type": "subscribe", "id": 1, "channel": channel});
    ws.send(FIN | TEXT, true, subscribe.to_string().as_bytes())
        .await;
    assert_eq!(next_json(&mut ws).await["type"], "ack");
    ws
}

async fn next_json(ws: &mut RawWs) -> Value {
    serde_json::from_slice(&ws.next_text().await).expect("JSON")
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
        deflated.push(deflate_client(node, &format!("d{i}"), CHANNEL).await);
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
