//! The client against real `pushgate` node processes: round trips, reconnects after a crash, a
//! drain and token expiry, the close codes that stop it, the heartbeat watchdog, and `wss://`
//! with a private CA. Every wait is on an event or a reply, bounded by `WAIT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pushgate_client::{
    Client, ClientBuilder, CloseReason, Delivery, Error, ErrorCode, Event, State,
};
use pushgate_tests::{Cluster, NodeProcess, WAIT, api, api_get, sign, unix_now};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A token for `sub` that expires in `ttl_secs`, different from every other one minted here.
fn token_for(sub: &str, ttl_secs: u64) -> String {
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    sign(&json!({
        "sub": sub,
        "exp": unix_now() + ttl_secs,
        "channels": ["room:*"],
        "publish": ["room:*"],
        "nonce": nonce,
    }))
}

/// Short delays, so that reconnects in tests take milliseconds.
fn builder(url: String) -> ClientBuilder {
    Client::builder(url)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .going_away_jitter(Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(3))
}

async fn connect(node: &NodeProcess) -> Client {
    tokio::time::timeout(
        WAIT,
        builder(node.ws_url())
            .token(token_for("alice", 3600))
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// The first event that `pred` accepts, skipping others.
async fn wait_event(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => panic!("events ended while waiting for {what}"),
        }
    }
}

/// Waits until every one of `channels` was subscribed (in any order).
async fn subscribed(events: &mut broadcast::Receiver<Event>, channels: &[&str]) {
    let mut left: Vec<&str> = channels.to_vec();
    while !left.is_empty() {
        let Event::Subscribed { channel } = wait_event(
            events,
            &format!("subscribed to {left:?}"),
            |e| matches!(e, Event::Subscribed { channel } if left.contains(&channel.as_str())),
        )
        .await
        else {
            unreachable!()
        };
        left.retain(|c| *c != channel);
    }
}

async fn next(sub: &mut pushgate_client::Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a delivery in time")
        .expect("subscription still open")
}

async fn api_publish(base: &str, body: Value) {
    let (status, reply) = api(base, "/api/publish", &body).await;
    assert_eq!(status, 200, "{reply}");
}

async fn closed(client: &Client) -> CloseReason {
    tokio::time::timeout(WAIT, client.closed())
        .await
        .expect("client stopped in time")
}

#[tokio::test]
async fn subscribe_publish_round_trip() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let client = connect(&node).await;
    let State::Connected(session) = client.state() else {
        panic!("{:?}", client.state())
    };
    assert_eq!(
        (session.user.as_str(), session.node.as_str()),
        ("alice", "n1")
    );

    let mut room = client.subscribe("room:1").await.unwrap();
    client
        .publish("room:1", &json!({"text": "hi"}))
        .await
        .unwrap();
    let d = next(&mut room).await;
    assert_eq!(d.channel.as_deref(), Some("room:1"));
    assert_eq!(d.from.as_deref(), Some("alice"));
    assert_eq!(d.data, json!({"text": "hi"}));

    // Backends reach the subscription too, and user deliveries come as direct messages.
    let mut direct = client.direct_messages();
    api_publish(&node.base(), json!({"channel": "room:1", "data": 2})).await;
    assert_eq!(next(&mut room).await.data, json!(2));
    api_publish(&node.base(), json!({"user": "alice", "data": "for you"})).await;
    let d = tokio::time::timeout(WAIT, direct.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.user.as_deref(), d.data),
        (Some("alice"), json!("for you"))
    );

    // Refusals are typed errors; the connection stays up.
    match client.subscribe("secret").await {
        Err(Error::Rejected { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    match client.publish("news", &1).await {
        Err(Error::Rejected { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.subscribe("room:1").await,
        Err(Error::AlreadySubscribed(_))
    ));
    assert!(matches!(
        client.subscribe("has space").await,
        Err(Error::InvalidChannel(_))
    ));
    client.ping().await.unwrap();

    room.unsubscribe().await.unwrap();
    let mut again = client.subscribe("room:1").await.unwrap();
    client.publish("room:1", &3).await.unwrap();
    assert_eq!(next(&mut again).await.data, json!(3));

    client.close().await;
    assert_eq!(closed(&client).await, CloseReason::Closed);
    assert!(
        again.recv().await.is_none(),
        "subscriptions end with the client"
    );
    assert!(matches!(
        client.publish("room:1", &4).await,
        Err(Error::Closed(CloseReason::Closed))
    ));
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_the_node_is_killed_and_restarted() {
    let mut node = NodeProcess::spawn("n1", None, &[]).await;
    let client = connect(&node).await;
    let mut events = client.events();
    let mut room = client.subscribe("room:1").await.unwrap();
    let mut lobby = client.subscribe("room:lobby").await.unwrap();
    let first = client.connected().await.unwrap().session;

    node.kill();
    wait_event(&mut events, "disconnected without a close frame", |e| {
        matches!(e, Event::Disconnected { code: None, .. })
    })
    .await;
    assert!(matches!(
        client.publish("room:1", &0).await,
        Err(Error::NotConnected | Error::ConnectionLost)
    ));

    node.restart(None, &[]).await;
    let Event::Connected(session) = wait_event(&mut events, "connected again", |e| {
        matches!(e, Event::Connected(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_ne!(session.session, first, "a reconnect is a new session");
    subscribed(&mut events, &["room:1", "room:lobby"]).await;

    // The same Subscription objects receive what is published after the reconnect.
    api_publish(&node.base(), json!({"channel": "room:1", "data": "after"})).await;
    api_publish(
        &node.base(),
        json!({"channel": "room:lobby", "data": "too"}),
    )
    .await;
    assert_eq!(next(&mut room).await.data, json!("after"));
    assert_eq!(next(&mut lobby).await.data, json!("too"));
}

#[tokio::test]
async fn disconnect_through_the_api_stops_the_client() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let client = connect(&node).await;
    let mut room = client.subscribe("room:1").await.unwrap();

    let (status, _) = api(&node.base(), "/api/disconnect", &json!({"user": "alice"})).await;
    assert_eq!(status, 200);
    assert!(matches!(
        closed(&client).await,
        CloseReason::Disconnected { .. }
    ));
    assert!(room.recv().await.is_none());
    assert!(matches!(
        client.connected().await,
        Err(Error::Closed(CloseReason::Disconnected { .. }))
    ));
    let (_, stats) = api_get(&node.base(), "/api/stats").await;
    assert_eq!(stats["node"]["connections"], 0, "{stats}");
}

#[tokio::test]
async fn disconnect_with_a_source_that_repeats_the_token_stops_too() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let token = token_for("alice", 3600);
    let client = builder(node.ws_url())
        .token_source(move || {
            let token = token.clone();
            async move { Ok::<_, std::io::Error>(token) }
        })
        .connect()
        .await
        .unwrap();
    api(&node.base(), "/api/disconnect", &json!({"user": "alice"})).await;
    assert!(matches!(
        closed(&client).await,
        CloseReason::Disconnected { .. }
    ));
}

#[tokio::test]
async fn disconnect_with_a_new_token_from_the_source_reconnects() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let client = builder(node.ws_url())
        .token_source(|| async { Ok::<_, std::io::Error>(token_for("alice", 3600)) })
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    let mut room = client.subscribe("room:1").await.unwrap();

    api(&node.base(), "/api/disconnect", &json!({"user": "alice"})).await;
    wait_event(&mut events, "closed with 4003", |e| {
        matches!(
            e,
            Event::Disconnected {
                code: Some(4003),
                ..
            }
        )
    })
    .await;
    subscribed(&mut events, &["room:1"]).await;
    api_publish(&node.base(), json!({"channel": "room:1", "data": "back"})).await;
    assert_eq!(next(&mut room).await.data, json!("back"));
}

#[tokio::test]
async fn a_refused_token_stops_the_client() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let bad = sign(&json!({"sub": "alice", "exp": unix_now() - 60}));
    match builder(node.ws_url()).token(bad.clone()).connect().await {
        Err(Error::Closed(CloseReason::Unauthorized { status, reason })) => {
            assert_eq!((status, reason.as_str()), (401, "token expired"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        builder(node.ws_url()).token("two\nlines").build(),
        Err(Error::InvalidToken)
    ));
    assert!(matches!(
        builder("not a url".into()).token("t").build(),
        Err(Error::InvalidUrl { .. })
    ));
    // A source that has nothing better is asked once more, then the client gives up.
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let result = builder(node.ws_url())
        .token_source(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            let bad = bad.clone();
            async move { Ok::<_, std::io::Error>(bad) }
        })
        .connect()
        .await;
    assert!(
        matches!(result, Err(Error::Closed(CloseReason::Unauthorized { .. }))),
        "{result:?}"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn an_expired_token_is_replaced_from_the_source() {
    let node = NodeProcess::spawn("n1", None, &["--jwt-leeway", "0s"]).await;
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    // The first token lives 2 s; the ones after it an hour.
    let client = builder(node.ws_url())
        .token_source(move || {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            let ttl = if n == 0 { 2 } else { 3600 };
            async move { Ok::<_, std::io::Error>(token_for("alice", ttl)) }
        })
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    let mut room = client.subscribe("room:1").await.unwrap();

    wait_event(&mut events, "closed with 4001", |e| {
        matches!(
            e,
            Event::Disconnected {
                code: Some(4001),
                ..
            }
        )
    })
    .await;
    subscribed(&mut events, &["room:1"]).await;
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    api_publish(&node.base(), json!({"channel": "room:1", "data": "fresh"})).await;
    assert_eq!(next(&mut room).await.data, json!("fresh"));

    // A fixed token that expires stops the client instead.
    let fixed = builder(node.ws_url())
        .token(token_for("bob", 2))
        .connect()
        .await
        .unwrap();
    assert_eq!(closed(&fixed).await, CloseReason::TokenExpired);
}

#[tokio::test]
async fn a_draining_node_sends_clients_to_the_next_url() {
    let mut cluster = Cluster::start(2, &["--drain-period", "2s"]).await;
    let client = builder(cluster.nodes[0].ws_url())
        .add_url(cluster.nodes[1].ws_url())
        .token(token_for("alice", 3600))
        .connect()
        .await
        .unwrap();
    assert_eq!(client.connected().await.unwrap().node, "n1");
    let mut events = client.events();
    let mut room = client.subscribe("room:1").await.unwrap();

    cluster.nodes[0].signal("TERM");
    wait_event(&mut events, "closed with 1001", |e| {
        matches!(
            e,
            Event::Disconnected {
                code: Some(1001),
                ..
            }
        )
    })
    .await;
    let Event::Connected(session) = wait_event(&mut events, "connected again", |e| {
        matches!(e, Event::Connected(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(session.node, "n2");
    subscribed(&mut events, &["room:1"]).await;
    api_publish(
        &cluster.nodes[1].base(),
        json!({"channel": "room:1", "data": "on n2"}),
    )
    .await;
    assert_eq!(next(&mut room).await.data, json!("on n2"));
    assert!(cluster.nodes[0].wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn a_silent_connection_is_dropped_by_the_watchdog() {
    let node = NodeProcess::spawn("n1", None, &["--ping-interval", "1s"]).await;
    let client = builder(node.ws_url())
        .token(token_for("alice", 3600))
        .heartbeat_grace(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    let mut room = client.subscribe("room:1").await.unwrap();

    // A stopped process keeps its sockets open but sends nothing: a half-open connection.
    node.signal("STOP");
    let event = wait_event(&mut events, "the watchdog", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    node.signal("CONT");
    let Event::Disconnected { code, reason } = event else {
        unreachable!()
    };
    assert_eq!(code, None);
    assert!(reason.contains("heartbeat"), "{reason}");
    subscribed(&mut events, &["room:1"]).await;
    api_publish(&node.base(), json!({"channel": "room:1", "data": "alive"})).await;
    assert_eq!(next(&mut room).await.data, json!("alive"));
}

/// A TLS-terminating proxy in front of `upstream`, with a certificate for `localhost` issued by
/// a CA made here. Returns its address and the CA certificate (PEM).
async fn tls_proxy(upstream: SocketAddr) -> (SocketAddr, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut node) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut node).await;
                }
            });
        }
    });
    (addr, ca_cert.pem())
}

#[tokio::test]
async fn wss_with_a_private_ca() {
    let node = NodeProcess::spawn("n1", None, &[]).await;
    let (proxy, ca_pem) = tls_proxy(node.addr).await;
    let url = format!("wss://localhost:{}/ws", proxy.port());

    let client = builder(url.clone())
        .token(token_for("alice", 3600))
        .tls(pushgate_client::tls::config_with_ca_pem(ca_pem.as_bytes()).unwrap())
        .connect()
        .await
        .unwrap();
    let mut room = client.subscribe("room:1").await.unwrap();
    client.publish("room:1", &"over tls").await.unwrap();
    assert_eq!(next(&mut room).await.data, json!("over tls"));

    // Without the CA the certificate is not trusted, and the client keeps failing.
    let untrusted = builder(url)
        .token(token_for("alice", 3600))
        .build()
        .unwrap();
    let mut events = untrusted.events();
    let Event::ConnectFailed { status, reason } =
        wait_event(&mut events, "a failed attempt", |e| {
            matches!(e, Event::ConnectFailed { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(status, None);
    assert!(
        reason.contains("certificate") || reason.contains("root"),
        "{reason}"
    );
    assert!(!matches!(untrusted.state(), State::Connected(_)));
}

#[tokio::test]
async fn a_burst_batched_by_the_node_arrives_whole_and_in_order() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let redis = pushgate_tests::RedisServer::start();
    let node = NodeProcess::spawn("n1", Some(&redis.url()), &[]).await;
    let client = connect(&node).await;
    let unbatched = tokio::time::timeout(
        WAIT,
        builder(node.ws_url())
            .token(token_for("bob", 3600))
            .batch(false)
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut rooms = [
        client.subscribe("room:burst").await.unwrap(),
        unbatched.subscribe("room:burst").await.unwrap(),
    ];
    // A plain connection that asks for batches, to see them on the wire.
    let mut request = node.ws_url().into_client_request().unwrap();
    let headers = request.headers_mut();
    let bearer = format!("Bearer {}", token_for("carol", 3600));
    headers.insert("authorization", bearer.parse().unwrap());
    headers.insert("sec-websocket-protocol", "pushgate.batch".parse().unwrap());
    let (mut raw, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "pushgate.batch"
    );
    raw.next().await.unwrap().unwrap(); // the welcome
    let subscribe = json!({"type": "subscribe", "id": 1, "channel": "room:burst"});
    futures_util::SinkExt::send(&mut raw, Message::Text(subscribe.to_string().into()))
        .await
        .unwrap();
    raw.next().await.unwrap().unwrap(); // the ack

    // One script publishes the burst: the node reads it from Redis at once, and its sessions
    // find many deliveries queued together.
    const BURST: u64 = 300;
    let script = "for i = 1, tonumber(ARGV[1]) do \
                  redis.call('PUBLISH', KEYS[1], '{\"data\":' .. i .. '}') end";
    let count = BURST.to_string();
    redis
        .command(&["EVAL", script, "1", "pushgate:ch:room:burst", &count])
        .await;

    for room in &mut rooms {
        for i in 1..=BURST {
            assert_eq!(next(room).await.data, json!(i));
        }
    }
    let (mut frames, mut messages) = (0, 0);
    while frames < BURST {
        let Message::Text(text) = raw.next().await.unwrap().unwrap() else {
            continue;
        };
        messages += 1;
        for line in text.split('\n') {
            frames += 1;
            let frame: Value = serde_json::from_str(line).unwrap();
            assert_eq!(frame["data"], json!(frames));
        }
    }
    assert!(
        messages < BURST,
        "{BURST} frames came in {messages} messages"
    );
}
