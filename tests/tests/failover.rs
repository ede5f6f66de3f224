//! What a real deployment does when parts of it fail.
//!
//! Every test runs the documented shape: a `redis-server`, three `pushgate` node processes and
//! nginx rendered from `deploy/nginx/pushgate.conf.template` with a test CA and certificate
//! (`deploy/tls/make-certs.sh`); clients are `pushgate-client`s on `wss://` through nginx that
//! trust the test CA. The nodes trust nginx's `X-Forwarded-For` (`--trusted-proxies`).
//!
//! Exactly-once checks use a barrier: a broadcast published straight on Redis after everything
//! else, which every node receives on its one subscriber connection after what was published
//! before it; once a client has it, it has everything it will ever get of what came first.
//!
//! The tests take turns (one environment at a time): the machines that run them have two
//! cores, and reconnect timings mean something only without a neighbour's storm. Numbers
//! (reconnect times, the storm's spread) are printed: run with `-- --nocapture` to see them.
//!
//! Tools that may be missing on a developer machine (nginx, openssl) skip the tests with a
//! note; under CI (`CI` set) they fail instead, since the test command installs them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pushgate_client::tls::rustls::ClientConfig;
use pushgate_client::{Client, Delivery, Event, Subscription};
use pushgate_tests::{Nginx, NodeProcess, RedisServer, TcpProxy, WAIT, api, metric, token, tool};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

/// One test environment at a time (see the module documentation).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Flags of every node: nginx is the trusted proxy (it connects from 127.0.0.1), a quick Redis
/// liveness probe, and a connection limit within the machine's open-file limit (20,000).
const NODE_FLAGS: &[&str] = &[
    "--max-connections",
    "10000",
    "--trusted-proxies",
    "127.0.0.1",
    "--redis-probe-interval",
    "500ms",
    "--redis-timeout",
    "1s",
];

/// Channels and publish rights of every test client.
const GRANTS: &[&str] = &["room:*", "local:*", "traffic"];

// ---------------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------------

/// Redis, three nodes `n1`..`n3` and nginx in front of them.
struct Edge {
    // Stopped in this order when dropped: nginx, the nodes, Redis.
    nginx: Nginx,
    nodes: Vec<NodeProcess>,
    redis: RedisServer,
    tls: ClientConfig,
    barriers: AtomicU64,
}

/// nginx and openssl, or `None` (skip) where they are missing outside CI.
fn tools() -> Option<PathBuf> {
    let nginx = tool("nginx", true)?;
    tool("openssl", true)?;
    Some(nginx)
}

impl Edge {
    /// Redis, nodes with [`NODE_FLAGS`] plus `extra`, nginx with the test settings changed by
    /// `nginx`; waits until every node is ready.
    async fn start(extra: &[&str], nginx: &[(&'static str, String)]) -> Option<Self> {
        let bin = tools()?;
        let redis = RedisServer::start();
        let url = redis.url();
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(NodeProcess::spawn(&format!("n{i}"), Some(&url), &flags(extra)).await);
        }
        Some(Self::around(bin, redis, nodes, nginx).await)
    }

    /// nginx in front of `nodes`, once they are ready.
    async fn around(
        bin: PathBuf,
        redis: RedisServer,
        nodes: Vec<NodeProcess>,
        overrides: &[(&'static str, String)],
    ) -> Self {
        for node in &nodes {
            node.wait_ready(200).await;
        }
        let upstreams: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let nginx = Nginx::start(&bin, &upstreams.join(","), overrides);
        let ca = std::fs::read(nginx.ca_file()).expect("the test CA");
        let tls = pushgate_client::tls::config_with_ca_pem(&ca).expect("a TLS config");
        Self {
            nginx,
            nodes,
            redis,
            tls,
            barriers: AtomicU64::new(0),
        }
    }

    fn node(&self, id: &str) -> &NodeProcess {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// A client of `user` through nginx, subscribed to `channels`, with `timing`.
    async fn client(&self, user: &str, channels: &[String], timing: Timing) -> Tracked {
        let client = Client::builder(self.nginx.wss_url())
            .token(token(user, GRANTS, GRANTS))
            .tls(self.tls.clone())
            .backoff(timing.backoff_base, timing.backoff_max)
            .going_away_jitter(timing.going_away_jitter)
            .connect_timeout(Duration::from_secs(5))
            .events_queue(1024)
            .build()
            .expect("a client");
        let log = EventLog::record(&client);
        let direct = client.direct_messages();
        let mut tracked = Tracked {
            client,
            log,
            direct,
            subs: BTreeMap::new(),
        };
        tokio::time::timeout(timing.connect_limit, tracked.client.connected())
            .await
            .unwrap_or_else(|_| panic!("{user} connected through nginx in time"))
            .expect("connected");
        for channel in channels {
            tracked.subscribe(channel).await;
        }
        tracked
    }

    /// `count` clients (user `user(i)`, channels `channels(i)`), connected a batch at a time.
    async fn clients(
        &self,
        count: usize,
        user: impl Fn(usize) -> String,
        channels: impl Fn(usize) -> Vec<String>,
        timing: Timing,
    ) -> Vec<Tracked> {
        let mut all = Vec::with_capacity(count);
        let indices: Vec<usize> = (0..count).collect();
        for batch in indices.chunks(timing.connect_batch) {
            let connecting = batch.iter().map(|&i| {
                let (user, channels) = (user(i), channels(i));
                async move { self.client(&user, &channels, timing).await }
            });
            all.extend(futures_util::future::join_all(connecting).await);
        }
        all
    }

    /// The barrier of the module documentation: returns, per client, what it received before
    /// it (sorted, as `target=data`). `live` nodes must be subscribed.
    async fn barrier(&self, clients: &mut [Tracked], live: usize) -> Vec<Vec<String>> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed) + 1;
        let sentinel = json!({ "barrier": n });
        let receivers = self
            .redis
            .publish(
                "pushgate:broadcast",
                &json!({ "data": sentinel }).to_string(),
            )
            .await;
        assert_eq!(
            receivers, live as i64,
            "every live node must be subscribed for a barrier"
        );
        let mut all = Vec::with_capacity(clients.len());
        for client in clients.iter_mut() {
            all.push(client.until(&sentinel).await);
        }
        all
    }

    /// Publishes `data` on `channel` through node `via`'s API, and checks that every client got
    /// exactly that message, once, before the next barrier.
    async fn everyone_gets(
        &self,
        clients: &mut [Tracked],
        live: usize,
        via: &str,
        channel: &str,
        data: &str,
    ) {
        publish(self.node(via), json!({"channel": channel, "data": data})).await;
        let expected = [format!("{channel}={data}")];
        for (i, got) in self.barrier(clients, live).await.iter().enumerate() {
            assert_eq!(got, &expected, "client {i}");
        }
    }
}

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = NODE_FLAGS.to_vec();
    all.extend_from_slice(extra);
    all
}

/// Publishes through a node's server API; the publish must be accepted.
async fn publish(node: &NodeProcess, body: Value) {
    let (status, reply) = api(&node.base(), "/api/publish", &body).await;
    assert_eq!(status, 200, "publish {body}: {reply}");
}

/// Client timing: reconnect backoff, how long a connect may take and how many connect at once.
#[derive(Clone, Copy)]
struct Timing {
    backoff_base: Duration,
    backoff_max: Duration,
    going_away_jitter: Duration,
    connect_limit: Duration,
    connect_batch: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(2),
            going_away_jitter: Duration::from_millis(500),
            connect_limit: WAIT,
            connect_batch: 60,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients and what happened to them
// ---------------------------------------------------------------------------------------------

/// Every event of a client, with when it arrived.
#[derive(Clone, Default)]
struct EventLog(Arc<Mutex<LogInner>>);

#[derive(Default)]
struct LogInner {
    events: Vec<(Instant, Event)>,
    lagged: u64,
}

impl EventLog {
    fn record(client: &Client) -> Self {
        let log = Self::default();
        let mut events = client.events();
        let sink = log.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => sink.0.lock().unwrap().events.push((Instant::now(), event)),
                    Err(RecvError::Lagged(n)) => sink.0.lock().unwrap().lagged += n,
                    Err(RecvError::Closed) => return,
                }
            }
        });
        log
    }

    /// The first event after `after` that `pick` accepts.
    fn find<T>(&self, after: Instant, pick: impl Fn(&Event) -> Option<T>) -> Option<(Instant, T)> {
        let inner = self.0.lock().unwrap();
        assert_eq!(inner.lagged, 0, "the event log missed events");
        inner
            .events
            .iter()
            .filter(|(at, _)| *at >= after)
            .find_map(|(at, e)| pick(e).map(|t| (*at, t)))
    }

    /// Waits up to `limit` for such an event.
    async fn wait<T>(
        &self,
        what: &str,
        after: Instant,
        limit: Duration,
        pick: impl Fn(&Event) -> Option<T>,
    ) -> (Instant, T) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.find(after, &pick) {
                return found;
            }
            assert!(Instant::now() < deadline, "no {what} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Connections that ended after `after`.
    fn disconnects(&self, after: Instant) -> Vec<(Instant, Option<u16>)> {
        let inner = self.0.lock().unwrap();
        assert_eq!(inner.lagged, 0, "the event log missed events");
        inner
            .events
            .iter()
            .filter(|(at, _)| *at >= after)
            .filter_map(|(at, e)| match e {
                Event::Disconnected { code, .. } => Some((*at, *code)),
                _ => None,
            })
            .collect()
    }
}

fn connected(e: &Event) -> Option<pushgate_client::Session> {
    match e {
        Event::Connected(s) => Some(s.clone()),
        _ => None,
    }
}

fn disconnected(e: &Event) -> Option<Option<u16>> {
    match e {
        Event::Disconnected { code, .. } => Some(*code),
        _ => None,
    }
}

fn subscribed_to(channel: &str) -> impl Fn(&Event) -> Option<()> + '_ {
    move |e| matches!(e, Event::Subscribed { channel: c } if c == channel).then_some(())
}

/// A client, its event log, its direct deliveries (user and broadcast) and its subscriptions.
struct Tracked {
    client: Client,
    log: EventLog,
    direct: tokio::sync::broadcast::Receiver<Delivery>,
    subs: BTreeMap<String, Subscription>,
}

impl Tracked {
    async fn subscribe(&mut self, channel: &str) {
        let sub = tokio::time::timeout(WAIT, self.client.subscribe(channel))
            .await
            .unwrap_or_else(|_| panic!("subscribe {channel} in time"))
            .unwrap_or_else(|e| panic!("subscribe {channel}: {e}"));
        self.subs.insert(channel.to_owned(), sub);
    }

    /// The node of the current connection.
    fn node(&self) -> String {
        match self.client.state() {
            pushgate_client::State::Connected(s) => s.node,
            other => panic!("not connected: {other:?}"),
        }
    }

    /// Waits until the client is connected again after `after` and has every subscription
    /// back; returns when it connected and to which node.
    async fn back(&self, after: Instant, limit: Duration) -> (Instant, String) {
        let (at, session) = self.log.wait("reconnect", after, limit, connected).await;
        for channel in self.subs.keys() {
            self.log
                .wait(
                    &format!("resubscribe to {channel}"),
                    at,
                    limit,
                    subscribed_to(channel),
                )
                .await;
        }
        (at, session.node)
    }

    /// Direct deliveries up to `sentinel`, then the channel deliveries already queued (they
    /// arrived before it on the same connection); sorted, as `target=data`.
    async fn until(&mut self, sentinel: &Value) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let d = match tokio::time::timeout(WAIT, self.direct.recv()).await {
                Err(_) => panic!("no barrier {sentinel} within {WAIT:?} (got {got:?})"),
                Ok(Err(e)) => panic!("direct deliveries: {e}"),
                Ok(Ok(d)) => d,
            };
            if &d.data == sentinel {
                break;
            }
            got.push(describe(&d));
        }
        for sub in self.subs.values_mut() {
            while let Some(d) = queued(sub) {
                got.push(describe(&d));
            }
        }
        got.sort();
        got
    }
}

/// The next delivery already queued for `sub`, without waiting. (Unconstrained: tokio's
/// cooperative budget would otherwise answer "not yet" to a task that has been busy.)
fn queued(sub: &mut Subscription) -> Option<Delivery> {
    tokio::task::unconstrained(sub.recv())
        .now_or_never()
        .flatten()
}

/// `room:1=hello`, `user:alice=hi`, `broadcast=all`.
fn describe(d: &Delivery) -> String {
    let data = match &d.data {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match (&d.channel, &d.user, d.broadcast) {
        (Some(c), _, _) => format!("{c}={data}"),
        (_, Some(u), _) => format!("user:{u}={data}"),
        (_, _, Some(true)) => format!("broadcast={data}"),
        _ => format!("other={data}"),
    }
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// Clients per node.
fn spread(clients: &[Tracked]) -> BTreeMap<String, usize> {
    let mut per_node = BTreeMap::new();
    for c in clients {
        *per_node.entry(c.node()).or_default() += 1;
    }
    per_node
}

/// `min`, `p50`, `p90` and `max` of `times`, for the test output.
fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let at = |q: f64| {
        let i = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
        times[i]
    };
    format!(
        "n={} min={:?} p50={:?} p90={:?} max={:?}",
        times.len(),
        times[0],
        at(0.5),
        at(0.9),
        times[times.len() - 1]
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Fan-out through the balancer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_through_nginx_reaches_every_intended_client_exactly_once() {
    let _turn = TURN.lock().await;
    let Some(edge) = Edge::start(&[], &[]).await else {
        return;
    };
    // 20 users with 3 connections each; every client on room:fan, the odd ones on room:odd.
    let mut clients = edge
        .clients(
            60,
            |i| format!("u{}", i % 20),
            |i| {
                let mut channels = vec!["room:fan".to_owned()];
                if i % 2 == 1 {
                    channels.push("room:odd".to_owned());
                }
                channels
            },
            Timing::default(),
        )
        .await;

    let per_node = spread(&clients);
    println!("fan-out: clients per node (welcome.node): {per_node:?}");
    assert_eq!(per_node.len(), 3, "nginx used every node: {per_node:?}");
    for node in &edge.nodes {
        assert!(per_node[&node.id] > 0, "{per_node:?}");
        assert_eq!(
            metric(&node.base(), "pushgate_connections").await,
            per_node[&node.id] as f64,
            "{} counts the clients that say they are on it",
            node.id
        );
    }

    // Each target published through a different node.
    publish(
        edge.node("n1"),
        json!({"channel": "room:fan", "data": "c-all"}),
    )
    .await;
    publish(
        edge.node("n2"),
        json!({"channel": "room:odd", "data": "c-odd"}),
    )
    .await;
    publish(edge.node("n3"), json!({"user": "u7", "data": "u-7"})).await;
    publish(edge.node("n1"), json!({"broadcast": true, "data": "b-all"})).await;

    let got = edge.barrier(&mut clients, 3).await;
    for (i, got) in got.iter().enumerate() {
        let mut expected = vec!["room:fan=c-all", "broadcast=b-all"];
        if i % 2 == 1 {
            expected.push("room:odd=c-odd");
        }
        if i % 20 == 7 {
            expected.push("user:u7=u-7");
        }
        assert_eq!(got, &sorted(&expected), "client {i} (user u{})", i % 20);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A node killed under traffic
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_reconnect_through_nginx_within_five_seconds() {
    let _turn = TURN.lock().await;
    let Some(mut edge) = Edge::start(&[], &[]).await else {
        return;
    };
    let mut clients = edge
        .clients(
            45,
            |i| format!("k{i}"),
            |_| vec!["traffic".to_owned(), "room:after".to_owned()],
            Timing::default(),
        )
        .await;
    // The traffic subscriptions are read here, the others by the barriers.
    let mut traffic: Vec<Subscription> = clients
        .iter_mut()
        .map(|c| c.subs.remove("traffic").expect("subscribed"))
        .collect();
    let on_victim: Vec<bool> = clients.iter().map(|c| c.node() == "n1").collect();
    let victims = on_victim.iter().filter(|v| **v).count();
    println!(
        "sigkill: clients per node {:?}; n1 holds {victims}",
        spread(&clients)
    );
    assert!(victims > 0, "nginx gave n1 no clients");

    // Traffic: a numbered message on `traffic` every 20 ms, through n2.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let n2 = edge.node("n2").base();
    let sender = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = &mut stop_rx => return seq,
                _ = tick.tick() => {}
            }
            seq += 1;
            let (status, reply) = api(
                &n2,
                "/api/publish",
                &json!({"channel": "traffic", "data": seq}),
            )
            .await;
            assert_eq!(status, 200, "traffic publish {seq}: {reply}");
        }
    });
    // Traffic flows to everyone before the kill.
    for sub in &mut traffic {
        tokio::time::timeout(WAIT, sub.recv())
            .await
            .expect("traffic before the kill")
            .expect("subscribed");
    }

    let killed_at = Instant::now();
    edge.nodes[0].kill();
    let mut times = Vec::new();
    for (client, _) in clients.iter().zip(&on_victim).filter(|(_, v)| **v) {
        let (at, node) = client.back(killed_at, WAIT).await;
        assert_ne!(node, "n1", "reconnected to the killed node");
        times.push(at - killed_at);
    }
    let max = *times.iter().max().unwrap();
    println!(
        "sigkill: reconnect after SIGKILL through nginx: {}",
        summary(&mut times)
    );
    assert!(
        max < Duration::from_secs(5),
        "every client of the killed node is back within 5 s (slowest {max:?})"
    );

    // Messages published after they are back reach them, and everyone else, once.
    publish(
        edge.node("n3"),
        json!({"channel": "room:after", "data": "after-kill"}),
    )
    .await;
    let seq = {
        let _ = stop_tx.send(());
        sender.await.expect("traffic task")
    };
    let got = edge.barrier(&mut clients, 2).await;
    for (i, got) in got.iter().enumerate() {
        assert_eq!(got, &sorted(&["room:after=after-kill"]), "client {i}");
    }

    // The other nodes' clients noticed nothing: no disconnect, and every traffic message in
    // order from the first they saw to the last one sent.
    for ((client, sub), victim) in clients.iter().zip(&mut traffic).zip(&on_victim) {
        if *victim {
            continue;
        }
        assert_eq!(
            client
                .log
                .disconnects(killed_at - Duration::from_secs(3600)),
            [],
            "a client of {} saw a disconnect",
            client.node()
        );
        let mut last = None::<u64>;
        while let Some(d) = queued(sub) {
            let n = d.data.as_u64().expect("a sequence number");
            if let Some(prev) = last {
                assert_eq!(n, prev + 1, "traffic on {} skipped", client.node());
            }
            last = Some(n);
        }
        assert_eq!(last, Some(seq), "the last traffic message arrived");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Graceful drain
// ---------------------------------------------------------------------------------------------

/// `/readyz` requests: when each was sent, and the status (`None`: no answer).
type Polls = Arc<Mutex<Vec<(Instant, Option<u16>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_sends_its_clients_elsewhere_in_batches() {
    const DRAIN: Duration = Duration::from_secs(3);
    let _turn = TURN.lock().await;
    let Some(mut edge) = Edge::start(&["--drain-period", "3s"], &[]).await else {
        return;
    };
    let mut clients = edge
        .clients(
            60,
            |i| format!("d{i}"),
            |_| vec!["room:drain".to_owned()],
            Timing::default(),
        )
        .await;
    let on_victim: Vec<bool> = clients.iter().map(|c| c.node() == "n1").collect();
    let victims = on_victim.iter().filter(|v| **v).count();
    println!(
        "drain: clients per node {:?}; n1 holds {victims}",
        spread(&clients)
    );
    assert!(victims >= 5, "nginx gave n1 too few clients ({victims})");

    // /readyz of n1, asked every few milliseconds: when each request was sent, and the answer.
    let polls: Polls = Arc::default();
    let poller = {
        let (polls, url) = (polls.clone(), edge.node("n1").url("/readyz"));
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                let status = http
                    .get(&url)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16());
                polls.lock().unwrap().push((sent, status));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // The poller sees the node ready first.
    pushgate_tests::eventually("a 200 from /readyz", || async {
        polls.lock().unwrap().iter().any(|(_, s)| *s == Some(200))
    })
    .await;

    let term_at = Instant::now();
    edge.nodes[0].signal("TERM");
    let status = edge.nodes[0].wait_exit(DRAIN + WAIT).await;
    let exited_after = term_at.elapsed();
    poller.abort();
    assert_eq!(status.code(), Some(0), "{status:?}");

    let mut closes = Vec::new();
    let mut back = Vec::new();
    for (client, victim) in clients.iter().zip(&on_victim) {
        if !*victim {
            assert_eq!(client.log.disconnects(term_at), [], "{}", client.node());
            continue;
        }
        let (at, code) = client.log.wait("close", term_at, WAIT, disconnected).await;
        assert_eq!(code, Some(1001), "closed with going away");
        closes.push(at);
        let (reconnected, node) = client.back(at, WAIT).await;
        assert_ne!(node, "n1", "reconnected to the draining node");
        back.push(reconnected - at);
    }
    closes.sort();
    let first_close = closes[0];
    let spread = closes[closes.len() - 1] - first_close;
    // Closes within 50 ms of each other count as one batch.
    let mut batches = vec![1usize];
    for pair in closes.windows(2) {
        if pair[1] - pair[0] > Duration::from_millis(50) {
            batches.push(0);
        }
        *batches.last_mut().unwrap() += 1;
    }
    println!(
        "drain: {victims} closes with 1001 over {spread:?} in {} batches (largest {}), node \
         exited 0 after {exited_after:?}; back on another node after the close: {}",
        batches.len(),
        batches.iter().max().unwrap(),
        summary(&mut back)
    );
    assert!(
        spread >= DRAIN.mul_f64(0.25),
        "closes spread over the drain period, not all at once ({spread:?})"
    );
    assert!(
        batches.len() >= 3 && *batches.iter().max().unwrap() < victims,
        "closes come in batches: {batches:?}"
    );
    assert!(
        exited_after <= DRAIN + Duration::from_millis(500),
        "the node exits within the drain period (after {exited_after:?})"
    );

    // Readiness went 503 no later than the first close: every /readyz asked after the first
    // client saw its close answered 503 (or nothing, once the node was gone).
    let polls = polls.lock().unwrap().clone();
    assert!(
        polls
            .iter()
            .any(|(sent, s)| *sent < term_at && *s == Some(200))
    );
    let after: Vec<Option<u16>> = polls
        .iter()
        .filter(|(sent, _)| *sent >= first_close)
        .map(|(_, s)| *s)
        .collect();
    assert!(
        after.contains(&Some(503)),
        "/readyz was asked during the drain"
    );
    assert!(
        after.iter().all(|s| *s != Some(200)),
        "/readyz answered 200 after a client was closed: {after:?}"
    );
    let first_503 = polls
        .iter()
        .find(|(_, s)| *s == Some(503))
        .map(|(sent, _)| *sent)
        .expect("a 503");
    println!(
        "drain: first /readyz 503 asked {:?} after SIGTERM; first close {:?} after SIGTERM",
        first_503 - term_at,
        first_close - term_at
    );

    // Everyone is served by the other two nodes.
    edge.nodes.remove(0);
    edge.everyone_gets(&mut clients, 2, "n2", "room:drain", "after-drain")
        .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Redis down for 5 s
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_keeps_local_delivery_and_every_node_recovers_by_itself() {
    const OUTAGE: Duration = Duration::from_secs(5);
    let _turn = TURN.lock().await;
    let Some(mut edge) = Edge::start(&[], &[]).await else {
        return;
    };
    let mut clients = edge
        .clients(
            30,
            |i| format!("r{i}"),
            |_| vec!["room:cross".to_owned()],
            Timing::default(),
        )
        .await;
    // Each client also listens on its node's local channel.
    for c in &mut clients {
        let local = format!("local:{}", c.node());
        c.subscribe(&local).await;
    }
    let per_node = spread(&clients);
    println!("redis outage: clients per node {per_node:?}");
    for node in &edge.nodes {
        assert!(
            per_node.get(&node.id).copied().unwrap_or(0) >= 2,
            "{per_node:?}"
        );
    }
    let pids: Vec<u32> = edge.nodes.iter().map(NodeProcess::pid).collect();

    let down_at = Instant::now();
    edge.redis.stop();
    for node in &edge.nodes {
        node.wait_broker(false).await;
    }
    for node in &edge.nodes {
        // API publishes are refused: the node cannot reach the other nodes.
        let (status, reply) = api(
            &node.base(),
            "/api/publish",
            &json!({"channel": "room:cross", "data": "refused"}),
        )
        .await;
        assert_eq!(status, 503, "{}: {reply}", node.id);

        // Local delivery keeps working: a client's publish reaches the clients of its node,
        // itself included (and it is told the broker is unavailable).
        let local = format!("local:{}", node.id);
        let mut on_node: Vec<&mut Tracked> =
            clients.iter_mut().filter(|c| c.node() == node.id).collect();
        let reply = on_node[0]
            .client
            .publish(&local, &json!("during-outage"))
            .await;
        println!("redis outage: a client's publish on {}: {reply:?}", node.id);
        for c in &mut on_node {
            let sub = c.subs.get_mut(&local).expect("local subscription");
            let d = tokio::time::timeout(WAIT, sub.recv())
                .await
                .expect("local delivery during the outage")
                .expect("subscribed");
            assert_eq!(d.data, json!("during-outage"));
        }
    }
    // Ready for the whole outage: every node lost Redis, none alone, and each serves its own
    // clients (taking every node out of service would leave them nowhere to go).
    while down_at.elapsed() < OUTAGE {
        for node in &edge.nodes {
            assert_eq!(node.readyz().await, 200, "{} during the outage", node.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in &edge.nodes {
        let health = node.health().await;
        assert_eq!(health["broker"]["ready"], false, "{}: {health}", node.id);
        assert_eq!(health["broker"]["isolated"], false, "{}: {health}", node.id);
        let isolated = metric(&node.base(), "pushgate_broker_isolated").await;
        assert_eq!(isolated, 0.0, "{}", node.id);
    }

    edge.redis.restart();
    let up_at = Instant::now();
    let mut times = Vec::new();
    for node in &edge.nodes {
        node.wait_broker(true).await;
        times.push((node.id.clone(), up_at.elapsed()));
    }
    println!("redis outage: ready again after the restart: {times:?}");
    for (id, t) in &times {
        assert!(
            *t <= Duration::from_secs(2),
            "{id} resubscribed {t:?} after Redis came back"
        );
    }

    // Cross-node delivery works again; nothing was restarted or disconnected.
    edge.everyone_gets(&mut clients, 3, "n2", "room:cross", "after-outage")
        .await;
    for (node, pid) in edge.nodes.iter_mut().zip(pids) {
        assert!(node.is_running(), "{} exited", node.id);
        assert_eq!(node.pid(), pid);
    }
    for c in &clients {
        assert_eq!(c.log.disconnects(down_at), [], "{}", c.node());
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Silently dead subscriptions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_are_reestablished_behind_nginx() {
    let _turn = TURN.lock().await;
    let Some(edge) = Edge::start(&[], &[]).await else {
        return;
    };
    let mut clients = edge
        .clients(
            30,
            |i| format!("p{i}"),
            |_| vec!["room:k".to_owned()],
            Timing::default(),
        )
        .await;
    let reconnects = "pushgate_redis_reconnects_total";
    for node in &edge.nodes {
        assert_eq!(metric(&node.base(), reconnects).await, 1.0);
    }

    let killed_at = Instant::now();
    let killed = edge
        .redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .await;
    assert_eq!(killed, redis::Value::Int(3), "one subscriber per node");
    let mut times = Vec::new();
    for node in &edge.nodes {
        let base = node.base();
        pushgate_tests::eventually(&format!("{} resubscribed", node.id), || async {
            metric(&base, reconnects).await >= 2.0 && node.health().await["broker"]["ready"] == true
        })
        .await;
        times.push((node.id.clone(), killed_at.elapsed()));
    }
    println!("pubsub kill: resubscribed after: {times:?}");
    for (id, t) in &times {
        assert!(*t < Duration::from_secs(3), "{id} took {t:?}");
    }

    edge.everyone_gets(&mut clients, 3, "n3", "room:k", "after-kill")
        .await;
    for c in &clients {
        assert_eq!(c.log.disconnects(killed_at), [], "{}", c.node());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_goes_silent_is_caught_by_the_probe_and_restarted() {
    let _turn = TURN.lock().await;
    let Some(bin) = tools() else {
        return;
    };
    // n1 reaches Redis through a proxy that can go silent; n2 and n3 directly.
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(([127, 0, 0, 1], redis.port()).into()).await;
    let proxied = format!("redis://{}/", proxy.addr);
    let direct = redis.url();
    let mut nodes = vec![NodeProcess::spawn("n1", Some(&proxied), NODE_FLAGS).await];
    for id in ["n2", "n3"] {
        nodes.push(NodeProcess::spawn(id, Some(&direct), NODE_FLAGS).await);
    }
    let edge = Edge::around(bin, redis, nodes, &[]).await;
    let mut clients = edge
        .clients(
            30,
            |i| format!("s{i}"),
            |_| vec!["room:s".to_owned()],
            Timing::default(),
        )
        .await;
    let on_n1: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].node() == "n1")
        .collect();
    assert!(!on_n1.is_empty(), "nginx gave n1 no clients");
    let n1 = edge.node("n1");
    let failures = "pushgate_redis_probe_failures_total";
    assert_eq!(metric(&n1.base(), failures).await, 0.0);

    // Redis keeps sending; n1 stops hearing it. Nothing is closed.
    let silenced_at = Instant::now();
    let silenced = proxy.silence_open_connections();
    assert!(silenced >= 1, "n1's Redis connections go through the proxy");
    n1.wait_broker(false).await;
    let noticed = silenced_at.elapsed();
    n1.wait_broker(true).await;
    let recovered = silenced_at.elapsed();
    println!(
        "silent subscription: n1 lost Redis after {noticed:?}, back after {recovered:?}; \
         {} connections silenced, {} opened through the proxy",
        silenced,
        proxy.opened()
    );
    // A probe every 500 ms, missed by the next one; publishes time out after 1 s.
    assert!(
        noticed < Duration::from_secs(3),
        "noticed within two probe intervals and a Redis timeout ({noticed:?})"
    );
    // Every silenced connection is dropped by the node in the end: the subscriber at once,
    // pooled connections when they next fail a command (each such failure may cost another
    // quick resubscribe). Then n1 is steady and ready.
    pushgate_tests::eventually("n1 dropped every silenced connection", || async {
        proxy.silent_connections() == 0
    })
    .await;
    n1.wait_broker(true).await;
    n1.wait_ready(200).await;
    let failed = metric(&n1.base(), failures).await;
    println!("silent subscription: {failed} probe failures until steady");
    assert!(failed >= 1.0);

    // Delivery resumes both ways: into n1 from another node, and out of n1.
    publish(
        edge.node("n2"),
        json!({"channel": "room:s", "data": "into-n1"}),
    )
    .await;
    let from_n1 = &clients[on_n1[0]];
    from_n1
        .client
        .publish("room:s", &json!("out-of-n1"))
        .await
        .expect("a publish from a client of n1");
    for (i, got) in edge.barrier(&mut clients, 3).await.iter().enumerate() {
        assert_eq!(
            got,
            &sorted(&["room:s=into-n1", "room:s=out-of-n1"]),
            "client {i}"
        );
    }
    for c in &clients {
        assert_eq!(c.log.disconnects(silenced_at), [], "{}", c.node());
    }
}

// ---------------------------------------------------------------------------------------------
// 6. nginx reload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_reload_keeps_connections_until_the_shutdown_timeout_then_clients_return() {
    const SHUTDOWN: Duration = Duration::from_secs(3);
    let _turn = TURN.lock().await;
    let Some(mut edge) =
        Edge::start(&[], &[("NGINX_WORKER_SHUTDOWN_TIMEOUT", "3s".to_owned())]).await
    else {
        return;
    };
    let mut clients = edge
        .clients(
            30,
            |i| format!("g{i}"),
            |_| vec!["room:reload".to_owned()],
            Timing::default(),
        )
        .await;
    let old_workers = edge.nginx.workers();
    assert!(!old_workers.is_empty());

    let reloaded_at = Instant::now();
    edge.nginx.reload();
    pushgate_tests::eventually("new nginx workers", || async {
        edge.nginx
            .workers()
            .iter()
            .any(|w| !old_workers.contains(w))
    })
    .await;

    // The old workers still carry every connection: a message gets through, nobody noticed.
    edge.everyone_gets(&mut clients, 3, "n1", "room:reload", "during-reload")
        .await;
    let checked = reloaded_at.elapsed();

    // At worker_shutdown_timeout the old workers close what they still hold; every client
    // comes back through the new workers by itself.
    let mut closed = Vec::new();
    let mut codes = BTreeMap::<String, usize>::new();
    let mut back = Vec::new();
    for c in &clients {
        let (at, code) = c
            .log
            .wait("disconnect", reloaded_at, SHUTDOWN + WAIT, disconnected)
            .await;
        closed.push(at - reloaded_at);
        *codes.entry(format!("{code:?}")).or_default() += 1;
        let (reconnected, _) = c.back(at, WAIT).await;
        back.push(reconnected - at);
    }
    let earliest = *closed.iter().min().unwrap();
    println!(
        "nginx reload: connections kept {checked:?} and more; closed after the reload: {}; \
         close codes {codes:?}; back after the close: {}",
        summary(&mut closed),
        summary(&mut back)
    );
    assert!(
        earliest >= SHUTDOWN.mul_f64(0.8),
        "old workers keep connections until worker_shutdown_timeout (first close {earliest:?})"
    );
    for c in &clients {
        assert_eq!(
            c.log.disconnects(reloaded_at).len(),
            1,
            "one disconnect per client"
        );
    }
    pushgate_tests::eventually("the old workers exited", || async {
        edge.nginx
            .workers()
            .iter()
            .all(|w| !old_workers.contains(w))
    })
    .await;

    edge.everyone_gets(&mut clients, 3, "n2", "room:reload", "after-reload")
        .await;
    assert!(edge.nginx.is_running());
}

// ---------------------------------------------------------------------------------------------
// 7. Reconnect storm
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_dropped_at_once_all_come_back() {
    const CLIENTS: usize = 2000;
    let _turn = TURN.lock().await;
    // Two workers (one per core); 2 descriptors per proxied connection.
    let Some(mut edge) = Edge::start(
        &[],
        &[
            ("NGINX_WORKER_PROCESSES", "2".to_owned()),
            ("NGINX_WORKER_CONNECTIONS", "8192".to_owned()),
            ("NGINX_WORKER_RLIMIT_NOFILE", "16384".to_owned()),
        ],
    )
    .await
    else {
        return;
    };
    let timing = Timing {
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
        connect_limit: Duration::from_secs(30),
        connect_batch: 200,
        ..Timing::default()
    };
    let started = Instant::now();
    let mut clients = edge
        .clients(
            CLIENTS,
            |i| format!("storm{i}"),
            |_| vec!["room:storm".to_owned()],
            timing,
        )
        .await;
    println!(
        "storm: {CLIENTS} clients connected in {:?}: {:?}",
        started.elapsed(),
        spread(&clients)
    );

    // nginx stops (its fast shutdown closes every connection at once) and starts again.
    let dropped_at = Instant::now();
    edge.nginx.stop();
    edge.nginx.start_again();
    let restarted = dropped_at.elapsed();

    let mut times = Vec::with_capacity(CLIENTS);
    for c in &clients {
        let (at, _) = c.back(dropped_at, Duration::from_secs(60)).await;
        times.push(at - dropped_at);
    }
    let failed_attempts: usize = clients
        .iter()
        .map(|c| {
            let inner = c.log.0.lock().unwrap();
            inner
                .events
                .iter()
                .filter(|(at, e)| *at >= dropped_at && matches!(e, Event::ConnectFailed { .. }))
                .count()
        })
        .sum();
    let per_node = spread(&clients);
    println!(
        "storm: nginx restarted in {restarted:?}; {CLIENTS} clients reconnected after the drop: \
         {}; failed attempts {failed_attempts}; clients per node {per_node:?}",
        summary(&mut times)
    );

    // The nodes stayed up and hold every client.
    let mut held = 0.0;
    for node in &mut edge.nodes {
        assert!(node.is_running(), "{} went down", node.id);
    }
    for node in &edge.nodes {
        let base = node.base();
        let expected = per_node.get(&node.id).copied().unwrap_or(0) as f64;
        pushgate_tests::eventually(&format!("{} counts its clients", node.id), || async {
            metric(&base, "pushgate_connections").await == expected
        })
        .await;
        held += expected;
    }
    assert_eq!(held, CLIENTS as f64);

    edge.everyone_gets(&mut clients, 3, "n1", "room:storm", "after-storm")
        .await;
}
