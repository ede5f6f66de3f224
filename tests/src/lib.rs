//! pushgate's test kit: a real `redis-server` on a free port, `pushgate` node processes, and a
//! WebSocket client that speaks the protocol. Every wait is bounded; nothing sleeps blindly.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use pushgate_protocol::server::{Delivery, Position, PresenceEntry, ServerFrame};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod raw_ws;

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub const SECRET: &str = "pushgate-test-secret";
pub const API_KEY: &str = "pushgate-test-api-key";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs `claims` with the test secret (HS256).
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing")
}

/// A token for `sub` valid for an hour, allowed to subscribe to `channels` and publish to `publish`.
pub fn token(sub: &str, channels: &[&str], publish: &[&str]) -> String {
    sign(&json!({"sub": sub, "exp": unix_now() + 3600, "channels": channels, "publish": publish}))
}

/// Polls `check` until it returns true or `WAIT` passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A `redis-server` of our own, on a free port, with nothing on disk.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Arguments before the port: a configuration file (a sentinel's) or nothing.
    config: Vec<String>,
    /// Arguments after the defaults (e.g. `--replicaof`, `--sentinel`).
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// A server started as `redis-server <config> --port P <defaults> <extra>`.
    pub fn start_with(config: &[&str], extra: &[&str]) -> Self {
        // A port found free can be taken before the server binds it (tests run in parallel);
        // then the server exits and another port is tried.
        for _ in 0..10 {
            let mut server = Self {
                port: free_port(),
                child: None,
                config: config.iter().map(|s| s.to_string()).collect(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            if server.try_launch() {
                return server;
            }
        }
        panic!("redis-server found no free port in 10 tries");
    }

    fn launch(&mut self) {
        assert!(
            self.try_launch(),
            "redis-server could not listen on port {} again",
            self.port
        );
    }

    /// Starts the server on `self.port`; false if it exited (the port was taken).
    fn try_launch(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.config)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // A replica loads its first sync straight from the socket: no dump.rdb in the tree.
            .args(["--repl-diskless-load", "on-empty-db"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the test command installs it)");
        let pid = child.id();
        let deadline = Instant::now() + WAIT;
        let client = redis::Client::open(self.url()).unwrap();
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            // Whoever answers on the port must be this server, not another test's, and done
            // loading its data (until then it answers INFO, but PING and the rest with LOADING).
            if let Ok(mut c) = client.get_connection()
                && let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut c)
                && info
                    .lines()
                    .any(|l| l.trim() == format!("process_id:{pid}"))
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends a signal with `kill(1)`: `STOP` pauses the server with its connections open,
    /// `CONT` resumes it.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map(Child::id).expect("running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to the test redis")
    }

    /// `PUBLISH channel payload`, as a backend would. Returns the receiver count.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let mut c = self.connection().await;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut c)
            .await
            .expect("PUBLISH")
    }

    /// How many connections subscribe to `channel` (`PUBSUB NUMSUB`): with pushgate, how many
    /// nodes, since a node holds one subscriber connection whatever its client count.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut c = self.connection().await;
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .expect("PUBSUB NUMSUB");
        n
    }

    /// Runs one command, e.g. `["CLIENT", "KILL", "TYPE", "pubsub"]`.
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        (self.command_as(args).await).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `args` as one command, its reply read as `T`; an error when the server cannot be
    /// reached or refuses.
    pub async fn command_as<T: redis::FromRedisValue>(
        &self,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let mut c = redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await
    }

    /// `FCALL pushgate_publish`, as a backend publishes into a history channel of the default
    /// prefix: appends and publishes `envelope` (a JSON object). Returns the offset and epoch.
    pub async fn publish_history(
        &self,
        channel: &str,
        envelope: &str,
        size: u64,
        ttl_ms: u64,
    ) -> (u64, String) {
        let mut c = self.connection().await;
        redis::cmd("FCALL")
            .arg("pushgate_publish")
            .arg(2)
            .arg(format!("pushgate:history:{channel}"))
            .arg(format!("pushgate:meta:{channel}"))
            .arg(format!("pushgate:ch:{channel}"))
            .arg(envelope)
            .arg(size)
            .arg(ttl_ms)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("FCALL pushgate_publish {channel}: {e}"))
    }

    /// The `CLIENT LIST` ID of `node`'s Pub/Sub connection: the one whose address is a local
    /// address of one of the node process's sockets.
    pub async fn pubsub_client_of(&self, node: &NodeProcess) -> String {
        let ports = node.tcp_ports();
        let mut c = self.connection().await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .expect("CLIENT LIST");
        list.lines()
            .find_map(|line| {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                };
                let port: u16 = field("addr")?.rsplit_once(':')?.1.parse().ok()?;
                ports
                    .contains(&port)
                    .then(|| field("id").map(str::to_owned))?
            })
            .unwrap_or_else(|| panic!("no pubsub connection of {} in {list}", node.id))
    }

    /// Channels that currently have subscribers (`PUBSUB CHANNELS pattern`).
    pub async fn channels(&self, pattern: &str) -> Vec<String> {
        let mut c = self.connection().await;
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("PUBSUB CHANNELS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where `cargo` put the `pushgate` binary (`PUSHGATE_BIN` overrides).
pub fn pushgate_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PUSHGATE_BIN") {
        return path.into();
    }
    // This test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("pushgate");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p pushgate` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// Reads a node's JSON log: sends the address of its "pushgate listening" line, and copies
/// every other line to stderr (captured with the test's output).
fn forward_log(
    id: &str,
    stdout: std::process::ChildStdout,
) -> std::sync::mpsc::Receiver<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let id = id.to_owned();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let listening = serde_json::from_str::<Value>(&line)
                .ok()
                .filter(|v| v["fields"]["message"] == "pushgate listening")
                .and_then(|v| v["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok());
            match (listening, tx.take()) {
                (Some(addr), Some(tx)) => drop(tx.send(addr)),
                (_, tx_back) => {
                    tx = tx_back;
                    eprintln!("[{id}] {line}");
                }
            }
        }
    });
    rx
}

/// A `pushgate serve` process.
pub struct NodeProcess {
    pub id: String,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts a node with the test secret and API key, `extra` flags, and waits for `/healthz`.
    ///
    /// The node listens on a port the kernel picks and logs it; so parallel tests never race
    /// for a port. Its other log lines (warnings and up) go to the test's stderr.
    pub async fn spawn(id: &str, redis_url: Option<&str>, extra: &[&str]) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::spawn_on(id, any_port, redis_url, extra).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://host:port`, for [`api`] and [`metric`].
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The status `/readyz` answers now.
    pub async fn readyz(&self) -> u16 {
        reqwest::get(self.url("/readyz"))
            .await
            .expect("GET /readyz")
            .status()
            .as_u16()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Sends a signal with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not exit in {limit:?}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client of this node for `user`, who may subscribe and publish on `grants`.
    pub async fn client(&self, user: &str, grants: &[&str]) -> Client {
        let client = Client::connect(&self.ws_url(), &token(user, grants, grants))
            .await
            .unwrap_or_else(|r| panic!("{user} refused by {}: {r:?}", self.id));
        assert_eq!(client.node, self.id);
        client
    }

    /// What `/healthz` answers now.
    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(self.url("/healthz"))
            .await
            .expect("GET /healthz")
            .json()
            .await
            .expect("/healthz answers JSON")
    }

    /// Waits until `/healthz` says the broker is up (`true`) or down (`false`).
    pub async fn wait_broker(&self, ready: bool) {
        eventually(
            &format!("node {} broker ready == {ready}", self.id),
            || async { self.health().await["broker"]["ready"] == ready },
        )
        .await;
    }

    /// Waits until the node has heard the heartbeats of `peers` other nodes (`/api/nodes`).
    pub async fn wait_peers(&self, peers: usize) {
        eventually(&format!("node {} hears {peers} peers", self.id), || async {
            let (_, body) = api_get(&self.base(), "/api/nodes").await;
            body["nodes"].as_array().map_or(0, Vec::len) == peers + 1
        })
        .await;
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16) {
        let http = reqwest::Client::new();
        eventually(&format!("node {} /readyz == {status}", self.id), || {
            let (http, url) = (http.clone(), self.url("/readyz"));
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == status)
            }
        })
        .await;
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `redis-server` and nodes `n1`, `n2`, ... joined to it.
pub struct Cluster {
    pub nodes: Vec<NodeProcess>,
    pub redis: RedisServer,
    barriers: AtomicU64,
}

impl Cluster {
    /// Starts Redis and `size` nodes with `extra` flags, and waits until every node is ready.
    pub async fn start(size: usize, extra: &[&str]) -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let ids: Vec<String> = (1..=size).map(|i| format!("n{i}")).collect();
        let nodes = futures_util::future::join_all(
            ids.iter()
                .map(|id| NodeProcess::spawn(id, Some(&url), extra)),
        )
        .await;
        for node in &nodes {
            node.wait_ready(200).await;
        }
        Self {
            nodes,
            redis,
            barriers: AtomicU64::new(0),
        }
    }

    /// Publishes a sentinel broadcast straight on Redis and reads every client's deliveries up to
    /// it; returns them without the sentinel, in arrival order, one list per client.
    ///
    /// Every node receives the sentinel on its one subscriber connection, after anything
    /// published on Redis before it; what a node published itself it delivered locally before
    /// publishing. So once a client has the sentinel, it has every message published (and
    /// acknowledged) before the barrier: counting what came before it checks "exactly once"
    /// and "not at all" without waiting for a fixed time. Every node must be subscribed.
    pub async fn barrier(&self, clients: &mut [&mut Client]) -> Vec<Vec<Delivery>> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed) + 1;
        let sentinel = json!({ "barrier": n });
        let payload = json!({ "data": sentinel }).to_string();
        let receivers = self.redis.publish("pushgate:broadcast", &payload).await;
        assert_eq!(
            receivers,
            self.nodes.len() as i64,
            "every node must be subscribed to pushgate:broadcast for a barrier"
        );
        let mut all = Vec::with_capacity(clients.len());
        for client in clients.iter_mut() {
            let mut got = client.messages_until(&sentinel).await;
            got.pop();
            all.push(got);
        }
        all
    }
}

/// The `data` of each delivery, as text (strings unquoted), sorted: for comparing what arrived
/// regardless of interleaving between publishers.
pub fn sorted_data(deliveries: &[Delivery]) -> Vec<String> {
    let mut data: Vec<String> = deliveries
        .iter()
        .map(|d| match &d.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    data.sort();
    data
}

/// Calls the server API of the node at `base` (`http://host:port`).
pub async fn api(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .expect("API request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET` on the server API of the node at `base`.
pub async fn api_get(base: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("API request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Reads a Prometheus counter or gauge (without labels, or with its full label set in `name`).
pub async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A handshake the server refused.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

/// What the ack of a subscribe said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// The channel's position (history channels).
    pub position: Option<Position>,
    /// Whether the missed messages follow (subscribes with `since`).
    pub recovered: Option<bool>,
}

impl Subscribed {
    /// The position, which a history channel's ack must carry.
    pub fn position(&self) -> &Position {
        self.position
            .as_ref()
            .expect("a history channel's ack has a position")
    }

    pub fn recovered(&self) -> Option<bool> {
        self.recovered
    }
}

/// A protocol client for tests.
pub struct Client {
    ws: Socket,
    pending: VecDeque<ServerFrame>,
    next_id: u64,
    pub session: String,
    pub node: String,
    pub user: String,
}

impl Client {
    /// Connects with `Authorization: Bearer` and reads the welcome.
    pub async fn connect(ws_url: &str, token: &str) -> Result<Self, Refused> {
        let mut request = ws_url.into_client_request().expect("ws url");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        Self::connect_request(request).await
    }

    pub async fn connect_request(
        request: tungstenite::handshake::client::Request,
    ) -> Result<Self, Refused> {
        let ws = match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await {
            Err(_) => panic!("handshake timed out"),
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                return Err(Refused { status, body });
            }
            Ok(Err(e)) => panic!("handshake failed: {e}"),
        };
        let mut client = Self {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            session: String::new(),
            node: String::new(),
            user: String::new(),
        };
        match client.next_frame().await {
            ServerFrame::Welcome {
                session,
                node,
                user,
                ..
            } => {
                client.session = session;
                client.node = node;
                client.user = user;
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        Ok(client)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// The socket's halves, for a test that writes and reads at the same time. Frames already
    /// read and kept for later are dropped.
    pub fn split(
        self,
    ) -> (
        futures_util::stream::SplitSink<Socket, Message>,
        futures_util::stream::SplitStream<Socket>,
    ) {
        self.ws.split()
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// The next server frame, whatever it is (pings are answered by the library).
    async fn next_frame(&mut self) -> ServerFrame {
        if let Some(f) = self.pending.pop_front() {
            return f;
        }
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection ended")
                .expect("read error");
            match msg {
                Message::Text(t) => {
                    return ServerFrame::decode(&t)
                        .unwrap_or_else(|e| panic!("undecodable frame {t}: {e}"));
                }
                Message::Close(c) => panic!("closed by server: {c:?}"),
                _ => {}
            }
        }
    }

    /// Sends a request (an `id` is added) and returns its reply; deliveries that arrive first
    /// are kept for [`message`](Self::message).
    pub async fn request(&mut self, mut body: Value) -> ServerFrame {
        let id = self.next_id;
        self.next_id += 1;
        body["id"] = json!(id);
        self.send_text(&body.to_string()).await;
        self.reply_to(Some(id)).await
    }

    /// Waits for the reply (ack, pong, presence, history or error) with `id`, keeping
    /// deliveries for later.
    pub async fn reply_to(&mut self, id: Option<u64>) -> ServerFrame {
        let mut kept = VecDeque::new();
        let reply = loop {
            let frame = match self.pending.pop_front() {
                Some(f) => f,
                None => self.read_one().await,
            };
            let matches = match &frame {
                ServerFrame::Ack { id: i, .. }
                | ServerFrame::Pong { id: i }
                | ServerFrame::Presence { id: i, .. }
                | ServerFrame::History { id: i, .. } => Some(*i) == id,
                ServerFrame::Error { id: i, .. } => *i == id,
                _ => false,
            };
            if matches {
                break frame;
            }
            kept.push_back(frame);
        };
        kept.extend(self.pending.drain(..));
        self.pending = kept;
        reply
    }

    async fn read_one(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a reply")
                .expect("connection ended")
                .expect("read error");
            match msg {
                Message::Text(t) => return ServerFrame::decode(&t).expect("decodable frame"),
                Message::Close(c) => panic!("closed by server: {c:?}"),
                _ => {}
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert!(
            matches!(reply, ServerFrame::Ack { .. }),
            "subscribe {channel}: {reply:?}"
        );
    }

    /// Subscribes with `since` (the last position seen) when given; returns the ack's
    /// position and `recovered`.
    pub async fn subscribe_since(&mut self, channel: &str, since: Option<&Position>) -> Subscribed {
        let mut request = json!({"type": "subscribe", "channel": channel});
        if let Some(p) = since {
            request["since"] = json!({"offset": p.offset, "epoch": p.epoch});
        }
        match self.request(request).await {
            ServerFrame::Ack {
                position,
                recovered,
                ..
            } => Subscribed {
                position,
                recovered,
            },
            other => panic!("subscribe {channel} (since {since:?}): {other:?}"),
        }
    }

    /// Who is subscribed to `channel`, sorted by session ID.
    pub async fn presence(&mut self, channel: &str) -> Vec<PresenceEntry> {
        match self
            .request(json!({"type": "presence", "channel": channel}))
            .await
        {
            ServerFrame::Presence { mut clients, .. } => {
                clients.sort_by(|a, b| a.session.cmp(&b.session));
                clients
            }
            other => panic!("presence {channel}: {other:?}"),
        }
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> ServerFrame {
        self.request(json!({"type": "publish", "channel": channel, "data": data}))
            .await
    }

    /// The next frame that is not a reply (a delivery or a notice).
    pub async fn frame(&mut self) -> ServerFrame {
        self.next_frame().await
    }

    /// The next delivery.
    pub async fn message(&mut self) -> Delivery {
        match self.next_frame().await {
            ServerFrame::Message(d) => d,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Deliveries up to and including the first whose `data` equals `sentinel`.
    pub async fn messages_until(&mut self, sentinel: &Value) -> Vec<Delivery> {
        let mut got = Vec::new();
        loop {
            let d = self.message().await;
            let done = &d.data == sentinel;
            got.push(d);
            if done {
                return got;
            }
        }
    }

    /// Waits for the server to close the connection; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("connection not closed in {WAIT:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return frame.map(|f| u16::from(f.code));
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

impl NodeProcess {
    /// Starts a node like [`spawn`](Self::spawn), but listening on `addr` (port 0: any): to
    /// bring a stopped node back on the address its clients know.
    pub async fn spawn_on(
        id: &str,
        addr: SocketAddr,
        redis_url: Option<&str>,
        extra: &[&str],
    ) -> Self {
        Self::launch(id, addr, redis_url, &["--jwt-secret", SECRET], &[], extra).await
    }

    /// Starts a node like [`spawn`](Self::spawn), but whose token keys are exactly `keys` (e.g.
    /// `["--jwt-jwks-url", url]`: no test secret), with `env` added to its environment.
    pub async fn spawn_with_keys(
        id: &str,
        keys: &[&str],
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::launch(id, any_port, None, keys, env, extra).await
    }

    async fn launch(
        id: &str,
        addr: SocketAddr,
        redis_url: Option<&str>,
        keys: &[&str],
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(pushgate_bin());
        cmd.arg("serve")
            .args(["--listen", &addr.to_string(), "--instance-id", id])
            .args(keys)
            .args(["--api-key", API_KEY])
            .args(extra)
            .envs(env.iter().copied())
            .env("PUSHGATE_LOG", "warn,pushgate::server=info")
            .env("PUSHGATE_LOG_FORMAT", "json")
            .stdout(Stdio::piped());
        if let Some(url) = redis_url {
            cmd.args(["--redis-url", url]);
        }
        let mut child = cmd.spawn().expect("spawning pushgate");
        let listening = forward_log(id, child.stdout.take().expect("piped stdout"));
        let deadline = Instant::now() + WAIT;
        let bound = loop {
            if let Ok(bound) = listening.try_recv() {
                break bound;
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("node {id} exited at start on {addr}: {status}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {id} did not log its address in {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let node = Self {
            id: id.to_owned(),
            addr: bound,
            child: Some(child),
        };
        let http = reqwest::Client::new();
        eventually(&format!("node {id} healthy"), || {
            let url = node.url("/healthz");
            let http = http.clone();
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        node
    }

    /// The local ports of the process's TCP sockets (Linux: `/proc`).
    pub fn tcp_ports(&self) -> std::collections::HashSet<u16> {
        let pid = self.pid();
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("reading /proc/PID/fd")
                .filter_map(|e| {
                    let target = std::fs::read_link(e.ok()?.path()).ok()?;
                    let target = target.to_str()?;
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_owned(),
                    )
                })
                .collect();
        let mut ports = std::collections::HashSet::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() > 9
                    && inodes.contains(cols[9])
                    && let Some((_, port)) = cols[1].rsplit_once(':')
                    && let Ok(port) = u16::from_str_radix(port, 16)
                {
                    ports.insert(port);
                }
            }
        }
        ports
    }

    /// Kills the process (SIGKILL) and waits until it is gone. Its clients see the
    /// connection break without a close frame.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the node and starts it again on the same address, with the same ID.
    pub async fn restart(&mut self, redis_url: Option<&str>, extra: &[&str]) {
        self.kill();
        let restarted = Self::spawn_on(&self.id, self.addr, redis_url, extra).await;
        *self = restarted;
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (None for plain messages).
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    /// Comment lines (`:ping`).
    pub comments: Vec<String>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data {:?}: {e}", self.data))
    }
}

/// A client of `/sse`, reading the stream as it comes.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    response: Option<reqwest::Response>,
    buffer: String,
}

impl SseClient {
    /// `GET {base}/sse?{query}` with `Authorization: Bearer token` and, when given,
    /// `Last-Event-ID`.
    pub async fn connect(
        base: &str,
        query: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let mut request = reqwest::Client::new()
            .get(format!("{base}/sse?{query}"))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("SSE response in time")
            .expect("SSE request");
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            response: Some(response),
            buffer: String::new(),
        }
    }

    /// The body of a refused request, as JSON.
    pub async fn refusal(mut self) -> Value {
        let response = self.response.take().expect("response");
        response.json().await.unwrap_or(Value::Null)
    }

    /// The next event or comment block; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            // Events end with a blank line.
            let normalized = self.buffer.replace("\r\n", "\n");
            if let Some(end) = normalized.find("\n\n") {
                let block = normalized[..end].to_owned();
                self.buffer = normalized[end + 2..].to_owned();
                let mut event = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        event.comments.push(comment.trim().to_owned());
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = Some(value.to_owned()),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        _ => {}
                    }
                }
                event.data = data.join("\n");
                return Some(event);
            }
            let response = self.response.as_mut()?;
            let chunk = tokio::time::timeout(WAIT, response.chunk())
                .await
                .expect("timed out waiting for an SSE event");
            match chunk {
                Ok(Some(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => {
                    self.response = None;
                    return None;
                }
            }
        }
    }

    /// The next event that is not a comment.
    pub async fn event(&mut self) -> SseEvent {
        loop {
            let e = self.next().await.expect("the SSE stream ended");
            if e.event.is_some() || !e.data.is_empty() {
                return e;
            }
        }
    }
}

impl NodeProcess {
    /// Whether the process is still running (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

// ---------------------------------------------------------------------------------------------
// Deploy tooling: the repository's files, external tools, scratch directories, certificates
// and nginx rendered from deploy/nginx/pushgate.conf.template.
// ---------------------------------------------------------------------------------------------

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of `name` on PATH or in /usr/sbin, or `None` (with a note) when it is missing. Under
/// CI (`CI` set) a missing `required_in_ci` tool fails the test instead, since the test command
/// installs it.
pub fn tool(name: &str, required_in_ci: bool) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !(required_in_ci && std::env::var_os("CI").is_some()),
            "{name} is missing (scripts/test.sh installs it)"
        );
        eprintln!("{name} not found: skipping this check");
    }
    found
}

/// A Redis Sentinel setup: a primary, one replica, and three sentinels that monitor the primary
/// as [`SentinelSet::MASTER`] (quorum 2, down after 1 s).
pub struct SentinelSet {
    /// Started first as the primary; after a failover, a replica again (or dead).
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
    _configs: Scratch,
}

impl SentinelSet {
    pub const MASTER: &str = "pushgate-main";

    /// Starts the servers and sentinels; returns once the replica is in sync and every sentinel
    /// knows it.
    pub async fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_with(
            &[],
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        );
        let configs = Scratch::new("sentinel");
        let sentinels = (0..3)
            .map(|i| {
                // A sentinel rewrites its configuration file: each gets its own.
                let file = configs.path(&format!("sentinel-{i}.conf"));
                let config = format!(
                    "sentinel monitor {master} 127.0.0.1 {port} 2\n\
                     sentinel down-after-milliseconds {master} 1000\n\
                     sentinel failover-timeout {master} 5000\n\
                     sentinel parallel-syncs {master} 1\n",
                    master = Self::MASTER,
                    port = primary.port,
                );
                std::fs::write(&file, config).expect("writing a sentinel configuration");
                RedisServer::start_with(&[&file], &["--sentinel"])
            })
            .collect();
        let set = Self {
            servers: vec![primary, replica],
            sentinels,
            _configs: configs,
        };
        eventually(
            "the replica in sync and known to every sentinel",
            || async {
                let info: String = set.servers[1]
                    .command_as(&["INFO", "replication"])
                    .await
                    .unwrap_or_default();
                if !info.contains("master_link_status:up") {
                    return false;
                }
                for sentinel in &set.sentinels {
                    let replicas: Vec<redis::Value> = sentinel
                        .command_as(&["SENTINEL", "REPLICAS", Self::MASTER])
                        .await
                        .unwrap_or_default();
                    if replicas.is_empty() {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        set
    }

    /// The sentinels' URLs, comma-separated, for `--redis-sentinel`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.sentinels.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    /// The port of the primary, as the first sentinel names it now.
    pub async fn primary_port(&self) -> u16 {
        let (_, port): (String, String) = self.sentinels[0]
            .command_as(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER])
            .await
            .expect("SENTINEL GET-MASTER-ADDR-BY-NAME");
        port.parse().expect("a port")
    }

    /// The server that is the primary now.
    pub async fn primary(&mut self) -> &mut RedisServer {
        let port = self.primary_port().await;
        (self.servers.iter_mut())
            .find(|s| s.port == port)
            .expect("the primary is one of the set's servers")
    }

    /// Waits until every sentinel names a primary other than the one on `old_port`, and that
    /// server says it is a primary; returns its port.
    pub async fn wait_failover(&self, old_port: u16) -> u16 {
        eventually("the sentinels promote a new primary", || async {
            for sentinel in &self.sentinels {
                let addr: Option<(String, String)> = sentinel
                    .command_as(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER])
                    .await
                    .ok();
                if addr.is_none_or(|(_, port)| port == old_port.to_string()) {
                    return false;
                }
            }
            true
        })
        .await;
        let port = self.primary_port().await;
        let server = (self.servers.iter())
            .find(|s| s.port == port)
            .expect("the new primary is one of the set's servers");
        eventually("the new primary takes writes", || async {
            let role: Vec<redis::Value> = server.command_as(&["ROLE"]).await.unwrap_or_default();
            matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
        })
        .await;
        port
    }
}

/// A local Redis Cluster: three primaries and three replicas (`redis-cli --cluster create
/// --cluster-replicas 1`), `cluster-node-timeout` 2 s, nothing persisted.
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
    _configs: Scratch,
}

impl RedisCluster {
    /// Starts and joins the servers; returns once the cluster is up and every replica in sync.
    pub async fn start() -> Self {
        let configs = Scratch::new("cluster");
        let servers: Vec<RedisServer> = (0..6)
            .map(|i| {
                let nodes = configs.path(&format!("nodes-{i}.conf"));
                RedisServer::start_with(
                    &[],
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &nodes,
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = (servers.iter())
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        run(Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"]));
        let cluster = Self {
            servers,
            _configs: configs,
        };
        cluster.wait_healthy().await;
        cluster
    }

    /// Waits until every live server says the cluster is ok and every replica is in sync.
    pub async fn wait_healthy(&self) {
        eventually("the Redis Cluster up, replicas in sync", || async {
            for server in self.servers.iter().filter(|s| s.child.is_some()) {
                let info: String =
                    (server.command_as(&["CLUSTER", "INFO"]).await).unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    return false;
                }
                let replication: String =
                    (server.command_as(&["INFO", "replication"]).await).unwrap_or_default();
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// Every server's URL, comma-separated, for `--redis-cluster`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.servers.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    /// A server that is up.
    fn any(&self) -> &RedisServer {
        (self.servers.iter())
            .find(|s| s.child.is_some())
            .expect("a live server")
    }

    /// `redis-cli -c SPUBLISH topic payload`, as a backend publishes on a cluster.
    pub fn spublish(&self, topic: &str, payload: &str) {
        run(Command::new("redis-cli")
            .args(["-c", "-p", &self.any().port.to_string()])
            .args(["SPUBLISH", topic, payload]));
    }

    /// The index in [`servers`](Self::servers) of the primary that serves `key`'s slot now
    /// (none while a failover is under way).
    pub async fn primary_of(&self, key: &str) -> Option<usize> {
        let any = self.any();
        let slot: i64 = (any.command_as(&["CLUSTER", "KEYSLOT", key]).await).expect("KEYSLOT");
        let nodes: String = (any.command_as(&["CLUSTER", "NODES"]).await).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                matches!((from.parse::<i64>(), to.parse::<i64>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if serves {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a port in CLUSTER NODES");
                return self.servers.iter().position(|s| s.port == port);
            }
        }
        None
    }

    /// Moves the slot of `key`, with its keys, from its primary to the primary `to`, as a live
    /// reshard does (`IMPORTING`/`MIGRATING`, `MIGRATE`, `SETSLOT NODE`).
    pub async fn move_slot(&self, key: &str, to: usize) {
        let from = (self.primary_of(key).await).expect("a primary for the key");
        assert_ne!(from, to, "the slot is on that primary already");
        let (src, dst) = (&self.servers[from], &self.servers[to]);
        let slot: i64 = (src.command_as(&["CLUSTER", "KEYSLOT", key]).await).expect("KEYSLOT");
        let slot = slot.to_string();
        let myid = ["CLUSTER", "MYID"];
        let src_id: String = (src.command_as(&myid).await).expect("CLUSTER MYID");
        let dst_id: String = (dst.command_as(&myid).await).expect("CLUSTER MYID");
        dst.command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id])
            .await;
        src.command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id])
            .await;
        loop {
            let keys: Vec<String> = (src
                .command_as(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .await)
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let port = dst.port.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.iter().map(String::as_str));
            src.command(&migrate).await;
        }
        // The new owner first, then the old one, then the rest (the primaries): the order of a
        // reshard.
        let mut order = vec![to, from];
        order.extend(
            (self.primaries().await)
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for i in order {
            self.servers[i]
                .command(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id])
                .await;
        }
    }

    /// The indexes of the servers that are primaries now.
    pub async fn primaries(&self) -> Vec<usize> {
        let mut primaries = Vec::new();
        for (i, server) in self.servers.iter().enumerate() {
            if server.child.is_none() {
                continue;
            }
            let info: String =
                (server.command_as(&["INFO", "replication"]).await).unwrap_or_default();
            if info.contains("role:master") {
                primaries.push(i);
            }
        }
        primaries
    }
}

/// A local Redis setup started by a script of `deploy/redis/` (`up DIR BASE_PORT`), stopped
/// (`down DIR`) when dropped.
pub struct ScriptedRedis {
    script: PathBuf,
    dir: Scratch,
    /// The `KEY=value` lines the script printed.
    settings: Vec<(String, String)>,
}

impl ScriptedRedis {
    /// Runs `script` (a path in the repository) on `ports` consecutive free ports.
    pub fn up(script: &str, ports: u16) -> Self {
        let script = repo_root().join(script);
        let dir = Scratch::new("scripted-redis");
        let out = run(Command::new("bash").arg(&script).args([
            "up",
            &dir.path(""),
            &free_ports(ports).to_string(),
        ]));
        let settings = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            script,
            dir,
            settings,
        }
    }

    /// A setting the script printed.
    pub fn get(&self, key: &str) -> &str {
        (self.settings.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the script printed no {key}: {:?}", self.settings))
    }
}

impl Drop for ScriptedRedis {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .args(["down", &self.dir.path("")])
            .status();
    }
}

/// The first of `n` consecutive ports that nobody listens on right now, with their Redis Cluster
/// bus ports (10,000 above) free too.
pub fn free_ports(n: u16) -> u16 {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let first = free_port();
        if first.checked_add(n + 10_000).is_some()
            && (first..first + n).all(|p| free(p) && free(p + 10_000))
        {
            return first;
        }
    }
}

/// A directory of our own under the system's temporary directory, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pushgate-test-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self(dir)
    }

    /// `rel` inside the directory, as a string (the directory itself for `""`).
    pub fn path(&self, rel: &str) -> String {
        self.0.join(rel).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` and fails the test unless it succeeds.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A test CA and a server certificate for localhost/127.0.0.1 from deploy/tls/make-certs.sh, in
/// `dir` (`ca.crt`, `server.crt`, `server.key`). Returns the script's output.
pub fn make_certs(dir: &str) -> String {
    let out = run(Command::new("sh")
        .arg(repo_root().join("deploy/tls/make-certs.sh"))
        .arg(dir));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// deploy/nginx/render.sh with exactly `vars` (and PATH) in its environment: the rendered
/// configuration.
pub fn render_nginx(vars: &[(&str, String)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("deploy/nginx/render.sh"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running bash");
    assert!(
        out.status.success(),
        "render.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The variables that render the nginx configuration for a non-root instance in `scratch`:
/// upstreams `upstreams` (host:port, comma- or space-separated), HTTPS on 127.0.0.1:`https`,
/// HTTP on 127.0.0.1:`http`, certificates in `scratch/certs`, one worker.
pub fn test_nginx_vars(
    scratch: &Scratch,
    upstreams: &str,
    https: u16,
    http: u16,
) -> Vec<(&'static str, String)> {
    vec![
        ("NGINX_UPSTREAMS", upstreams.to_owned()),
        ("NGINX_HTTPS_LISTEN", format!("127.0.0.1:{https}")),
        ("NGINX_HTTP_LISTEN", format!("127.0.0.1:{http}")),
        ("NGINX_TLS_CERT", scratch.path("certs/server.crt")),
        ("NGINX_TLS_KEY", scratch.path("certs/server.key")),
        ("NGINX_PID", scratch.path("nginx.pid")),
        ("NGINX_TEMP_DIR", scratch.path("")),
        ("NGINX_ERROR_LOG", scratch.path("error.log")),
        ("NGINX_ACCESS_LOG", scratch.path("access.log")),
        ("NGINX_WORKER_PROCESSES", "1".into()),
        ("NGINX_WORKER_CONNECTIONS", "512".into()),
        ("NGINX_WORKER_RLIMIT_NOFILE", "1024".into()),
        ("NGINX_WORKER_SHUTDOWN_TIMEOUT", "5s".into()),
    ]
}

/// An nginx run by a test (`daemon off`, a child of the test), from the repository's template,
/// in its own scratch directory, on free ports of 127.0.0.1, with a test CA and certificate.
/// Stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    bin: PathBuf,
    pub scratch: Scratch,
    pub https: u16,
    pub http: u16,
}

impl Nginx {
    /// Makes certificates, renders the template for `upstreams` with the test settings of
    /// [`test_nginx_vars`] changed by `overrides` (e.g. `("NGINX_WORKER_SHUTDOWN_TIMEOUT",
    /// "2s")`), and starts nginx, on new free ports until it listens (5 tries).
    pub fn start(
        bin: &std::path::Path,
        upstreams: &str,
        overrides: &[(&'static str, String)],
    ) -> Self {
        let scratch = Scratch::new("nginx");
        make_certs(&scratch.path("certs"));
        let mut nginx = Self {
            child: None,
            bin: bin.to_owned(),
            scratch,
            https: 0,
            http: 0,
        };
        for _ in 0..5 {
            (nginx.https, nginx.http) = (free_port(), free_port());
            let mut vars = test_nginx_vars(&nginx.scratch, upstreams, nginx.https, nginx.http);
            for (name, value) in overrides {
                match vars.iter_mut().find(|(n, _)| n == name) {
                    Some(var) => var.1 = value.clone(),
                    None => vars.push((name, value.clone())),
                }
            }
            std::fs::write(nginx.conf(), render_nginx(&vars)).expect("writing nginx.conf");
            if nginx.launch() {
                return nginx;
            }
        }
        panic!("nginx found no free ports in 5 tries");
    }

    /// Starts nginx with the rendered configuration; false if it exited (a port was taken).
    fn launch(&mut self) -> bool {
        let child = Command::new(&self.bin)
            .args(self.prefix_args())
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning nginx");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if !self.is_running() {
                self.child = None;
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.https)).is_ok()
                && std::fs::metadata(self.scratch.path("nginx.pid")).is_ok_and(|m| m.len() > 0)
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen in {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `-c`, `-p` and `-e` of this instance.
    fn prefix_args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            self.conf(),
            "-p".into(),
            self.scratch.path(""),
            "-e".into(),
            self.scratch.path("error.log"),
        ]
    }

    /// The rendered configuration file.
    pub fn conf(&self) -> String {
        self.scratch.path("nginx.conf")
    }

    /// The test CA's certificate (PEM), which clients trust.
    pub fn ca_file(&self) -> String {
        self.scratch.path("certs/ca.crt")
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https)
    }

    /// `wss://localhost:PORT/ws`.
    pub fn wss_url(&self) -> String {
        format!("wss://localhost:{}/ws", self.https)
    }

    /// The master process's ID.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("nginx is running")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `nginx -s reload` for this instance: new workers with the configuration file as it is
    /// now; the old ones finish gracefully (until `worker_shutdown_timeout`).
    pub fn reload(&self) {
        run(Command::new(&self.bin)
            .args(self.prefix_args())
            .args(["-s", "reload"]));
    }

    /// The PIDs of the worker processes (children of the master), old and new.
    pub fn workers(&self) -> Vec<u32> {
        let master = self.pid();
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Stops nginx: SIGTERM to the master, nginx's fast shutdown, which closes every connection
    /// at once; waits until it is gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped nginx again with the same configuration and ports.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nginx is running");
        let deadline = Instant::now() + WAIT;
        // The ports were ours a moment ago; another test may have taken one meanwhile.
        while !self.launch() {
            assert!(
                Instant::now() < deadline,
                "nginx could not listen on its ports again"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can go silent
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of `upstream` (e.g. between a node and Redis) that can stop
/// forwarding what the upstream sends without closing anything: the failure of a stateful
/// firewall, NAT or network path that drops a connection's packets while both ends think it is
/// open.
pub struct TcpProxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<ProxyState>,
    accept: tokio::task::AbortHandle,
}

#[derive(Default)]
struct ProxyState {
    /// Per open connection: whether upstream bytes are dropped.
    silent: std::sync::Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicBool>>>,
    /// One per connection, forwarding it.
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    opened: AtomicU64,
    /// Set while the proxy refuses connections (see [`TcpProxy::cut`]).
    cut: std::sync::atomic::AtomicBool,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::with_delay(upstream, Duration::ZERO).await
    }

    /// Like [`start`](Self::start), holding every chunk `delay` before forwarding it, in each
    /// direction: a link with a round trip of twice `delay`, whatever its throughput.
    pub async fn with_delay(upstream: SocketAddr, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = std::sync::Arc::new(ProxyState::default());
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if state.cut.load(Ordering::Acquire) {
                        continue; // dropped: closed at once
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    state.opened.fetch_add(1, Ordering::Relaxed);
                    let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    state
                        .silent
                        .lock()
                        .unwrap()
                        .push(std::sync::Arc::downgrade(&silent));
                    let task = tokio::spawn(Self::forward(client, server, silent, delay));
                    state.tasks.lock().unwrap().push(task.abort_handle());
                }
            })
        };
        Self {
            addr,
            state,
            accept: accept.abort_handle(),
        }
    }

    async fn forward(
        client: TcpStream,
        server: TcpStream,
        silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
        delay: Duration,
    ) {
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let never = std::sync::atomic::AtomicBool::new(false);
        // Either side closing ends the connection (both halves drop).
        tokio::select! {
            _ = Self::pump(client_read, server_write, delay, &never) => {}
            _ = Self::pump(server_read, client_write, delay, &silent) => {}
        }
    }

    /// Copies `from` to `to`, each chunk `delay` after it was read; drops what is read while
    /// `silent` is set.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
        silent: &std::sync::atomic::AtomicBool,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let read = async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if silent.load(Ordering::Acquire) {
                    continue;
                }
                let due = tokio::time::Instant::now() + delay;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        };
        let write = async {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        };
        // The reader ending (EOF) still lets what it read go out.
        tokio::join!(read, write);
    }

    /// Cuts the link: closes every open connection and refuses new ones until
    /// [`restore`](Self::restore). A network partition between the proxy's two sides.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Lets connections through again after [`cut`](Self::cut).
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::Release);
    }

    /// Connections that were silenced and are still open (neither end has closed them).
    pub fn silent_connections(&self) -> usize {
        let silent = self.state.silent.lock().unwrap();
        silent
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|s| s.load(Ordering::Acquire))
            .count()
    }

    /// Connections opened through the proxy so far.
    pub fn opened(&self) -> u64 {
        self.state.opened.load(Ordering::Relaxed)
    }

    /// From now on every connection open now drops what the upstream sends: nothing is closed,
    /// writes towards the upstream still go through, the client just hears nothing more. New
    /// connections are forwarded normally. Returns how many connections went silent.
    pub fn silence_open_connections(&self) -> usize {
        let mut silent = self.state.silent.lock().unwrap();
        silent.retain(|s| s.strong_count() > 0);
        for s in silent.iter().filter_map(std::sync::Weak::upgrade) {
            s.store(true, Ordering::Release);
        }
        silent.len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

// ---- JWKS key server (tests of --jwt-jwks-url) ----

/// A signing key made by `openssl genpkey`, named by a `kid`.
pub struct SigningKey {
    pub kid: String,
    pub algorithm: jsonwebtoken::Algorithm,
    /// The private key, PEM.
    pub pem: Vec<u8>,
    pub encoding: EncodingKey,
}

impl SigningKey {
    /// A new key for `algorithm`: RS256 (RSA 2048), ES256 (EC P-256) or EdDSA (Ed25519).
    pub fn generate(algorithm: jsonwebtoken::Algorithm, kid: &str) -> Self {
        use jsonwebtoken::Algorithm;
        let args: &[&str] = match algorithm {
            Algorithm::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Algorithm::EdDSA => &["-algorithm", "ed25519"],
            other => panic!("no test keys for {other:?}"),
        };
        let out = run(Command::new("openssl").arg("genpkey").args(args));
        let pem = out.stdout;
        let encoding = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("a PEM key from openssl");
        Self {
            kid: kid.to_owned(),
            algorithm,
            pem,
            encoding,
        }
    }

    /// The public key as a JWK with this key's `kid`, `"use": "sig"` and `alg`.
    pub fn jwk(&self) -> Value {
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.encoding, self.algorithm)
            .expect("a JWK from the key");
        let mut jwk = serde_json::to_value(jwk).expect("JWK as JSON");
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// The public key, PEM (`openssl pkey -pubout`).
    pub fn public_pem(&self) -> Vec<u8> {
        let mut child = Command::new("openssl")
            .args(["pkey", "-pubout"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl must be installed (scripts/test.sh installs it)");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &self.pem)
            .expect("writing to openssl");
        let out = child.wait_with_output().expect("openssl pkey");
        assert!(out.status.success(), "openssl pkey -pubout failed");
        out.stdout
    }

    /// `claims` signed with this key, the header naming its algorithm and `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing")
    }

    /// A token for `sub` valid for an hour that may subscribe to `channels`.
    pub fn token(&self, sub: &str, channels: &[&str]) -> String {
        self.sign(&json!({"sub": sub, "exp": unix_now() + 3600, "channels": channels}))
    }
}

/// `{"keys": [...]}` of the public halves of `keys`.
pub fn jwk_set(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

struct JwksShared {
    fetches: AtomicU64,
    /// Status and body of every answer.
    response: std::sync::Mutex<(u16, String)>,
    /// How long each answer waits.
    delay: std::sync::Mutex<Duration>,
}

/// A small HTTP/1.1 server on 127.0.0.1 (plain, or HTTPS with a given acceptor) that answers
/// every request with one JSON body, a key set, and counts the requests. Its answer and a delay
/// can be changed while it runs. Stops when dropped.
pub struct JwksServer {
    pub url: String,
    shared: std::sync::Arc<JwksShared>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Serves `keys` at `http://127.0.0.1:PORT/jwks.json`.
    pub async fn start(keys: &Value) -> Self {
        Self::start_with(keys, None).await
    }

    /// Serves `keys` at `https://127.0.0.1:PORT/jwks.json` with `tls`.
    pub async fn start_tls(keys: &Value, tls: tokio_rustls::TlsAcceptor) -> Self {
        Self::start_with(keys, Some(tls)).await
    }

    async fn start_with(keys: &Value, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = std::sync::Arc::new(JwksShared {
            fetches: AtomicU64::new(0),
            response: std::sync::Mutex::new((200, keys.to_string())),
            delay: std::sync::Mutex::new(Duration::ZERO),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (shared, tls) = (shared.clone(), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            None => Self::answer(tcp, &shared).await,
                            Some(tls) => {
                                if let Ok(Ok(stream)) =
                                    tokio::time::timeout(WAIT, tls.accept(tcp)).await
                                {
                                    Self::answer(stream, &shared).await;
                                }
                            }
                        }
                    });
                }
            }
        });
        Self {
            url: format!("{scheme}://127.0.0.1:{port}/jwks.json"),
            shared,
            task,
        }
    }

    async fn answer<S>(mut stream: S, shared: &JwksShared)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 && head.len() < 16 * 1024 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        shared.fetches.fetch_add(1, Ordering::SeqCst);
        let delay = *shared.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let (status, body) = shared.response.lock().unwrap().clone();
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    /// Requests answered or being answered so far.
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::SeqCst)
    }

    /// Serves `keys` from now on (status 200).
    pub fn set_keys(&self, keys: &Value) {
        *self.shared.response.lock().unwrap() = (200, keys.to_string());
    }

    /// Answers `status` with an error body from now on.
    pub fn fail_with(&self, status: u16) {
        *self.shared.response.lock().unwrap() = (status, r#"{"error":"down"}"#.into());
    }

    /// Holds each answer for `delay` from now on.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Failover drills: traffic, and what each subscriber saw
// ---------------------------------------------------------------------------------------------

/// 100 rounds a second, each one message on `chat:busy` and one on `room:busy` (its number as
/// data), through the API of every node in turn, until stopped.
pub struct Traffic {
    publishing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Traffic {
    pub fn start(nodes: &[NodeProcess]) -> Self {
        let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let bases: Vec<String> = nodes.iter().map(NodeProcess::base).collect();
        let task = tokio::spawn({
            let publishing = publishing.clone();
            async move {
                let (mut sent, mut refused) = (0u64, 0u64);
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while publishing.load(Ordering::Acquire) {
                    tick.tick().await;
                    let base = &bases[(sent as usize) % bases.len()];
                    for channel in ["chat:busy", "room:busy"] {
                        let body = serde_json::json!({"channel": channel, "data": sent});
                        if api(base, "/api/publish", &body).await.0 != 200 {
                            refused += 1;
                        }
                    }
                    sent += 1;
                }
                (sent, refused)
            }
        });
        Self { publishing, task }
    }

    /// Waits until a publish through each of `nodes` succeeds (after a failover).
    pub async fn wait_accepted(nodes: &[NodeProcess]) {
        for node in nodes {
            eventually(&format!("a publish through {}", node.id), || async {
                let body = serde_json::json!({"channel": "chat:busy", "data": "probe"});
                api(&node.base(), "/api/publish", &body).await.0 == 200
            })
            .await;
        }
    }

    /// Publishes `"after"` on both channels through `node`: where [`FailoverLog::read`] stops.
    pub async fn publish_after(node: &NodeProcess) {
        for channel in ["room:busy", "chat:busy"] {
            let body = serde_json::json!({"channel": channel, "data": "after"});
            let (status, reply) = api(&node.base(), "/api/publish", &body).await;
            assert_eq!(status, 200, "{body}: {reply}");
        }
    }

    /// Stops publishing; returns the rounds sent and the publishes refused.
    pub async fn stop(self) -> (u64, u64) {
        self.publishing.store(false, Ordering::Release);
        self.task.await.expect("the traffic task")
    }
}

/// What one subscriber of `room:busy` and `chat:busy` (a history channel) saw through a
/// failover, up to the message `"after"` published on each once it was over.
#[derive(Debug)]
pub struct FailoverLog {
    /// `room:busy` deliveries.
    pub plain: Vec<Value>,
    /// `chat:busy` deliveries: epoch, offset, data.
    pub history: Vec<(String, u64, Value)>,
    /// `chat:busy` ended with a `history_lost` notice.
    pub told: bool,
}

impl FailoverLog {
    /// Reads `client`'s frames until `"after"` on the plain channel, and `"after"` or the end of
    /// the subscription on the history channel.
    pub async fn read(client: &mut Client) -> Self {
        let after = serde_json::json!("after");
        let mut log = Self {
            plain: Vec::new(),
            history: Vec::new(),
            told: false,
        };
        let history_done =
            |log: &Self| log.told || log.history.last().is_some_and(|(_, _, d)| *d == after);
        while log.plain.last() != Some(&after) || !history_done(&log) {
            match client.frame().await {
                ServerFrame::Message(m) if m.channel.as_deref() == Some("room:busy") => {
                    log.plain.push(m.data)
                }
                ServerFrame::Message(m) => {
                    let p = m.position().expect("a history position");
                    log.history.push((p.epoch, p.offset, m.data));
                }
                ServerFrame::Unsubscribed { channel, code, .. } => {
                    assert_eq!(channel, "chat:busy");
                    assert_eq!(code.as_deref(), Some("history_lost"));
                    log.told = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        log
    }

    /// The history deliveries' offsets, in runs of one epoch each.
    pub fn epochs(&self) -> Vec<Vec<u64>> {
        let mut epochs: Vec<(&str, Vec<u64>)> = Vec::new();
        for (epoch, offset, _) in &self.history {
            match epochs.last_mut() {
                Some((e, run)) if *e == epoch.as_str() => run.push(*offset),
                _ => epochs.push((epoch.as_str(), vec![*offset])),
            }
        }
        epochs.into_iter().map(|(_, run)| run).collect()
    }

    /// The promise through a failover: the plain channel resumes with nothing twice; the history
    /// channel either moves to a new epoch (offsets from 1) or ends with a notice, and within an
    /// epoch no offset comes twice or out of order and none is skipped.
    pub fn check(&self, subscriber: usize) {
        let numbers: Vec<u64> = self.plain.iter().filter_map(Value::as_u64).collect();
        let mut unique = numbers.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            numbers.len(),
            "subscriber {subscriber}: a plain message twice"
        );
        let epochs = self.epochs();
        for (n, run) in epochs.iter().enumerate() {
            let first = if n == 0 { run[0] } else { 1 };
            let expected: Vec<u64> = (first..first + run.len() as u64).collect();
            assert_eq!(run, &expected, "subscriber {subscriber}, epoch {n}");
        }
        assert!(
            self.told || epochs.len() == 2,
            "subscriber {subscriber}: no sign of the failover"
        );
    }
}

impl std::fmt::Display for FailoverLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<usize> = self.epochs().iter().map(Vec::len).collect();
        write!(
            f,
            "{} plain, history per epoch {counts:?}, told {}",
            self.plain.len(),
            self.told
        )
    }
}
