//! A connection's publishes are pipelined, not serialized on Redis: the session goes on reading
//! while earlier publishes wait on Redis, acknowledges them in the order they came in, and Redis
//! gets them in that order, so subscribers on every node see one publisher's messages in order.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pushgate_protocol::server::ServerFrame;
use pushgate_tests::{Client, Cluster, NodeProcess, RedisServer, TcpProxy, WAIT, token};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Lifts the per-connection request rate limit: these tests publish as fast as they can.
const UNLIMITED: &[&str] = &[
    "--client-rate",
    "1000000",
    "--client-burst",
    "1000000",
    "--history",
    "hist:*=20000/10m",
];

/// Sends publishes `1..=count` on `channels` (in turn) from `publisher` without waiting for
/// replies, while reading the replies; asserts every reply is an ack, in order. Returns how long
/// the last ack took.
async fn publish_pipelined(publisher: Client, channels: &[&str], count: u64) -> Duration {
    let started = Instant::now();
    let (mut sink, mut stream) = publisher.split();
    let send = async move {
        for i in 1..=count {
            let channel = channels[(i as usize) % channels.len()];
            let frame = json!({"type": "publish", "id": i, "channel": channel, "data": i});
            sink.feed(Message::Text(frame.to_string().into()))
                .await
                .expect("send");
            if i % 64 == 0 {
                sink.flush().await.expect("flush");
            }
        }
        sink.flush().await.expect("flush");
        sink
    };
    let acks = async move {
        let mut expected = 1;
        while expected <= count {
            let msg = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("timed out waiting for an ack")
                .expect("connection ended")
                .expect("read error");
            let Message::Text(text) = msg else { continue };
            match ServerFrame::decode(&text).expect("decodable frame") {
                ServerFrame::Ack { id, .. } => {
                    assert_eq!(id, expected, "publishes are acknowledged in order");
                    expected += 1;
                }
                other => panic!("expected the ack of publish {expected}, got {other:?}"),
            }
        }
    };
    let (_sink, ()) = tokio::join!(send, acks);
    started.elapsed()
}

/// Reads deliveries on `channel` and asserts their data is `data`, in order.
async fn expect_in_order(subscriber: &mut Client, channel: &str, data: impl Iterator<Item = u64>) {
    for want in data {
        let d = subscriber.message().await;
        assert_eq!(d.channel.as_deref(), Some(channel), "delivery {d:?}");
        assert_eq!(
            d.data,
            json!(want),
            "deliveries on {channel} in publish order"
        );
    }
}

#[tokio::test]
async fn ten_thousand_pipelined_publishes_arrive_in_order_on_every_node() {
    let cluster = Cluster::start(2, UNLIMITED).await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut remote = Client::connect(&n2.ws_url(), &token("remote", &["room"], &[]))
        .await
        .unwrap();
    remote.subscribe("room").await;
    let mut local = Client::connect(&n1.ws_url(), &token("local", &["room"], &[]))
        .await
        .unwrap();
    local.subscribe("room").await;
    let publisher = Client::connect(&n1.ws_url(), &token("pub", &[], &["room"]))
        .await
        .unwrap();

    const COUNT: u64 = 10_000;
    let publishing = publish_pipelined(publisher, &["room"], COUNT);
    tokio::join!(
        publishing,
        expect_in_order(&mut remote, "room", 1..=COUNT),
        expect_in_order(&mut local, "room", 1..=COUNT),
    );
    // Nothing more than the 10,000 on either node.
    let mut clients = [&mut remote, &mut local];
    for got in cluster.barrier(&mut clients).await {
        assert!(got.is_empty(), "unexpected extra deliveries: {got:?}");
    }
}

/// Redis behind a link with a 40 ms round trip: a connection that waited for each publish's
/// reply before reading its next request would take at least 40 ms per publish.
#[tokio::test]
async fn a_slow_redis_does_not_cap_a_connection_at_one_publish_per_round_trip() {
    const ONE_WAY: Duration = Duration::from_millis(20);
    const COUNT: u64 = 400;
    let redis = RedisServer::start();
    let proxy = TcpProxy::with_delay(
        format!("127.0.0.1:{}", redis.port()).parse().unwrap(),
        ONE_WAY,
    )
    .await;
    let far = format!("redis://{}/", proxy.addr);
    let near = redis.url();
    let (n1, n2) = tokio::join!(
        NodeProcess::spawn("far", Some(&far), UNLIMITED),
        NodeProcess::spawn("near", Some(&near), UNLIMITED),
    );
    n1.wait_ready(200).await;
    n2.wait_ready(200).await;

    let grant = ["room", "hist:room"];
    let mut remote = Client::connect(&n2.ws_url(), &token("remote", &grant, &[]))
        .await
        .unwrap();
    remote.subscribe("room").await;
    remote.subscribe_since("hist:room", None).await;
    let publisher = Client::connect(&n1.ws_url(), &token("pub", &[], &grant))
        .await
        .unwrap();

    // Odd numbers go to `hist:room` (FCALL pushgate_publish), even ones to `room` (PUBLISH).
    let publishing = publish_pipelined(publisher, &["room", "hist:room"], COUNT);
    let reading = async {
        let mut room = Vec::new();
        let mut hist = Vec::new();
        let mut offsets = Vec::new();
        while room.len() + hist.len() < COUNT as usize {
            let d = remote.message().await;
            let n = d.data.as_u64().expect("numeric data");
            match d.channel.as_deref() {
                Some("room") => room.push(n),
                Some("hist:room") => {
                    hist.push(n);
                    offsets.push(d.offset.expect("history deliveries carry an offset"));
                }
                other => panic!("delivery on {other:?}"),
            }
        }
        assert_eq!(room, (1..=COUNT).filter(|n| n % 2 == 0).collect::<Vec<_>>());
        assert_eq!(hist, (1..=COUNT).filter(|n| n % 2 == 1).collect::<Vec<_>>());
        assert_eq!(offsets, (1..=COUNT / 2).collect::<Vec<_>>());
    };
    let (elapsed, ()) = tokio::join!(publishing, reading);
    let serialized = 2 * ONE_WAY * COUNT as u32;
    assert!(
        elapsed < serialized / 2,
        "{COUNT} publishes took {elapsed:?}; one at a time they would take at least {serialized:?}"
    );
}
