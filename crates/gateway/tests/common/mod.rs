//! In-process nodes for the gateway's tests.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use pushgate::node::Node;
use pushgate::{ServeArgs, Server};
use pushgate_tests::{API_KEY, SECRET, WAIT};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    /// A node on 127.0.0.1:0 with the test secret and API key, plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--jwt-secret", SECRET, "--api-key", API_KEY];
        args.extend_from_slice(extra);
        Self::start_bare(&args).await
    }

    /// A node on 127.0.0.1:0 with exactly `flags`: no secret and no API key unless given.
    pub async fn start_bare(flags: &[&str]) -> Self {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let config = ServeArgs::parse_from(args).expect("valid test flags");
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let node = server.node().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            node,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Open connections, as the node counts them (`pushgate_connections`).
    pub fn connections(&self) -> i64 {
        self.node.metrics.connections.get()
    }

    /// Triggers a graceful drain and waits for the server to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("running")
            .await
            .expect("server task")
    }

    /// Triggers a graceful drain without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        self.node.shutdown.cancel();
    }
}

/// A plain WebSocket to a node, for tests that need control over reading (a client that stops
/// reading, or one that counts the server's pings).
pub type RawSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects with `Authorization: Bearer token` and reads the welcome.
pub async fn raw_connect(ws_url: &str, token: &str) -> (RawSocket, Value) {
    let mut request = ws_url.into_client_request().expect("ws url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake timed out")
        .expect("handshake failed");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// The next text frame, parsed (pings and pongs skipped; a close fails the test).
pub async fn next_json(ws: &mut RawSocket) -> Value {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("connection ended")
            .expect("read error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Close(c) => panic!("closed by server: {c:?}"),
            _ => {}
        }
    }
}

/// Sends `frame` as a text frame.
pub async fn send_json(ws: &mut RawSocket, frame: &Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
}

/// How a raw connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code.
    Close(u16),
    /// The stream ended (or broke) without a close frame.
    Abrupt,
}

/// Reads (and drops) everything until the connection ends, within `WAIT`.
pub async fn ending(ws: &mut RawSocket) -> Ending {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("connection still open after {WAIT:?}"),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Ending::Close(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => return Ending::Abrupt,
        }
    }
}
