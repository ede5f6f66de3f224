//! `session::run` driven through in-memory channels instead of a socket: the session logic alone,
//! on an embedded node, with the clock under the test's control where time matters.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use pushgate::ServeArgs;
use pushgate::auth::Verifier;
use pushgate::node::Node;
use pushgate::session;
use pushgate::ws::{CloseFrame, Message};
use pushgate_tests::{SECRET, WAIT, token};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// One end of an in-memory WebSocket: the session reads what the test sends and writes into a
/// channel the test reads.
struct MemorySocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, io::Error>>,
    outgoing: mpsc::UnboundedSender<Message>,
}

impl Stream for MemorySocket {
    type Item = Result<Message, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().incoming.poll_recv(cx)
    }
}

impl Sink<Message> for MemorySocket {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), io::Error> {
        self.outgoing
            .send(item)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }
}

/// The test's side of a session.
struct Peer {
    to_session: Option<mpsc::UnboundedSender<Result<Message, io::Error>>>,
    from_session: mpsc::UnboundedReceiver<Message>,
    task: JoinHandle<()>,
    /// How long any wait may take. Under a paused clock it must outlast the session's timers.
    wait: Duration,
}

impl Peer {
    fn send(&self, msg: Message) {
        self.to_session
            .as_ref()
            .expect("open")
            .send(Ok(msg))
            .expect("session reading");
    }

    fn send_json(&self, v: Value) {
        self.send(Message::Text(v.to_string().into()));
    }

    async fn next(&mut self) -> Message {
        timeout(self.wait, self.from_session.recv())
            .await
            .expect("a frame from the session in time")
            .expect("session still writing")
    }

    async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Shared(f) => return serde_json::from_str(&f.text).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Waits for the session task to return.
    async fn finished(self) {
        timeout(self.wait, self.task)
            .await
            .expect("session returned in time")
            .expect("session did not panic");
    }
}

fn node(flags: &[&str]) -> Arc<Node> {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(flags);
    let config = ServeArgs::parse_from(args).expect("valid flags");
    let verifier = Verifier::from_args(&config.jwt).expect("key");
    Node::start(config, verifier).expect("embedded node")
}

fn start(node: &Arc<Node>, token: &str, wait: Duration) -> Peer {
    let grant = node.verifier.verify_held(token).expect("valid token");
    let admission = node
        .admit(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .expect("admitted");
    let (to_session, incoming) = mpsc::unbounded_channel();
    let (outgoing, from_session) = mpsc::unbounded_channel();
    let socket = MemorySocket { incoming, outgoing };
    let task = tokio::spawn(session::run(node.clone(), socket, grant, admission));
    Peer {
        to_session: Some(to_session),
        from_session,
        task,
        wait,
    }
}

#[tokio::test]
async fn requests_are_answered_without_a_network() {
    let node = node(&[]);
    let mut peer = start(&node, &token("alice", &["c"], &["c"]), WAIT);
    let welcome = peer.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], &*node.instance);
    assert_eq!(node.hub.counts().connections, 1);

    peer.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(peer.next_json().await, json!({"type": "pong", "id": 1}));

    peer.send_json(json!({"type": "subscribe", "id": 2, "channel": "c"}));
    assert_eq!(peer.next_json().await, json!({"type": "ack", "id": 2}));
    peer.send_json(json!({"type": "publish", "id": 3, "channel": "c", "data": {"k": [1, 2]}}));
    // The ack and the delivery (of the sender's own message: it is subscribed), in either order.
    let (a, b) = (peer.next_json().await, peer.next_json().await);
    let (ack, message) = if a["type"] == "ack" { (a, b) } else { (b, a) };
    assert_eq!(ack, json!({"type": "ack", "id": 3}));
    assert_eq!(message["type"], "message");
    assert_eq!(message["channel"], "c");
    assert_eq!(message["from"], "alice");
    assert_eq!(message["data"], json!({"k": [1, 2]}));

    peer.send_json(json!({"type": "publish", "id": 4, "channel": "elsewhere", "data": 1}));
    let error = peer.next_json().await;
    assert_eq!(
        (error["id"].clone(), error["code"].clone()),
        (json!(4), json!("forbidden"))
    );

    // The client goes away: the session cleans up after itself.
    peer.to_session = None;
    peer.finished().await;
    assert_eq!(node.hub.counts().connections, 0);
    assert_eq!(node.hub.counts().channels, 0);
    assert_eq!(node.metrics.connections.get(), 0);
}

#[tokio::test]
async fn a_close_asked_by_the_node_is_sent_and_awaited() {
    let node = node(&[]);
    let mut peer = start(&node, &token("alice", &[], &[]), WAIT);
    peer.next_json().await;
    assert_eq!(node.hub.close_user("alice", 4003), 1);
    match peer.next().await {
        Message::Close(Some(CloseFrame { code, .. })) => assert_eq!(code, 4003),
        other => panic!("expected a close, got {other:?}"),
    }
    peer.send(Message::Close(None));
    peer.finished().await;
    assert_eq!(node.hub.counts().connections, 0);
}

#[tokio::test]
async fn a_transport_error_ends_the_session_quietly() {
    let node = node(&[]);
    let mut peer = start(&node, &token("alice", &[], &[]), WAIT);
    peer.next_json().await;
    peer.to_session
        .as_ref()
        .unwrap()
        .send(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
        .unwrap();
    let Peer {
        mut from_session,
        task,
        ..
    } = peer;
    timeout(WAIT, task).await.expect("ended").expect("no panic");
    // Nothing is written to a broken connection.
    assert!(from_session.recv().await.is_none());
    assert_eq!(node.metrics.connections.get(), 0);
}

/// Long enough for any timer of the session under a paused clock, where time only advances
/// when everything is idle.
const VIRTUAL_WAIT: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn the_session_pings_on_schedule_and_a_silent_client_gets_4009() {
    let node = node(&["--ping-interval", "25s", "--pong-timeout", "10s"]);
    let mut peer = start(&node, &token("alice", &[], &[]), VIRTUAL_WAIT);
    peer.next_json().await;
    let start = Instant::now();

    assert!(matches!(peer.next().await, Message::Ping(_)));
    assert_eq!(start.elapsed().as_secs(), 25);
    // No pong, nothing else: past the interval plus the pong timeout, the session gives up.
    match peer.next().await {
        Message::Close(Some(CloseFrame { code, .. })) => assert_eq!(code, 4009),
        other => panic!("expected a close, got {other:?}"),
    }
    let silent_for = start.elapsed();
    assert!(
        silent_for > Duration::from_secs(35) && silent_for < Duration::from_secs(36),
        "{silent_for:?}"
    );
    assert_eq!(node.metrics.drops.heartbeat_timeout.get(), 1);
    peer.finished().await;
}

#[tokio::test(start_paused = true)]
async fn pongs_keep_the_session_alive() {
    let node = node(&["--ping-interval", "25s", "--pong-timeout", "10s"]);
    let mut peer = start(&node, &token("alice", &[], &[]), VIRTUAL_WAIT);
    peer.next_json().await;
    let start = Instant::now();
    for n in 1..=10u64 {
        match peer.next().await {
            Message::Ping(payload) => peer.send(Message::Pong(payload)),
            other => panic!("expected ping {n}, got {other:?}"),
        }
        assert_eq!(start.elapsed().as_secs(), 25 * n);
    }
    // Ten intervals on, the connection still answers.
    peer.send_json(json!({"type": "ping", "id": 1}));
    assert_eq!(peer.next_json().await, json!({"type": "pong", "id": 1}));
    assert_eq!(node.metrics.drops.heartbeat_timeout.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_token_expiry_closes_the_session_with_4001() {
    let node = node(&["--jwt-leeway", "0s"]);
    let exp = pushgate_tests::unix_now() + 3;
    let t = pushgate_tests::sign(&json!({"sub": "alice", "exp": exp}));
    let mut peer = start(&node, &t, VIRTUAL_WAIT);
    peer.next_json().await;
    let start = Instant::now();
    loop {
        match peer.next().await {
            Message::Ping(p) => peer.send(Message::Pong(p)),
            Message::Close(Some(CloseFrame { code, .. })) => {
                assert_eq!(code, 4001);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Whole seconds: the expiry is between 3 and 4 s away when the session starts.
    let after = start.elapsed();
    assert!(
        after >= Duration::from_secs(2) && after <= Duration::from_secs(4),
        "{after:?}"
    );
}

/// Every connection's task holds its session future for its whole life, so the future's size is
/// memory per idle connection. Request handling is boxed so that it does not inflate it.
#[tokio::test]
async fn an_idle_session_task_stays_small() {
    let node = node(&[]);
    let grant = node.verifier.verify_held(&token("a", &[], &[])).unwrap();
    let admission = node.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let (_to_session, incoming) = mpsc::unbounded_channel();
    let (outgoing, _from_session) = mpsc::unbounded_channel();
    let socket = MemorySocket { incoming, outgoing };
    let session = session::run(node.clone(), socket, grant, admission);
    let size = std::mem::size_of_val(&session);
    assert!(size <= 2048, "the session future is {size} bytes");
}
