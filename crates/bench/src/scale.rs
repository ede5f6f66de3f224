//! `scale`: many connections over many nodes, each subscribed to its own user channel and one of
//! a set of history rooms. The run opens them all, holds them, broadcasts to all of them, sends
//! room traffic at a steady rate, and keeps that traffic going while a command (a rolling
//! restart of the nodes) runs; then every connection must hold every room message exactly once.
//!
//! Connections live in worker processes (`pushgate-bench scale-worker`, one per `--procs`), each
//! within its open-file limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ScaleArgs;
use crate::client::{self, Ws};
use crate::payload::unix_ns;
use crate::rss::{RssSource, metric};
use crate::run::http_base;
use crate::stats::{self, Counts, HistData, Percentiles};
use crate::token::TokenSpec;

/// What a worker process serves.
#[derive(Clone, Serialize, Deserialize)]
struct Spec {
    urls: Vec<String>,
    /// Global indexes of this worker's connections: `first..first + count`.
    first: u64,
    count: u64,
    rooms: u64,
    room_prefix: String,
    concurrency: usize,
    token: TokenSpec,
}

/// Coordinator to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Cmd {
    Open,
    /// Zero the counters and histograms of a phase.
    Reset,
    /// Counters so far; with `finals` (room, offset pairs), also how many connections are not
    /// yet at their room's final offset. (Pairs: JSON map keys are strings.)
    Report {
        finals: Option<Vec<(u64, u64)>>,
    },
    Stop,
}

/// Worker to coordinator.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    opened: u64,
    failed: u64,
    errors: Counts,
    alive: u64,
    reconnects: u64,
    closes: Counts,
    broadcast_received: u64,
    broadcast: HistData,
    room_received: u64,
    room: HistData,
    /// Room messages skipped over (offset jumped) and received twice.
    gaps: u64,
    duplicates: u64,
    /// Resubscribes that history could not serve (`recovered: false`).
    not_recovered: u64,
    /// Connections whose room is not at its final offset.
    behind: u64,
}

/// One connection's place in its room.
struct Conn {
    room: u64,
    /// The last room offset seen (0: none yet).
    last: AtomicU64,
    epoch: Mutex<Option<String>>,
}

#[derive(Default)]
struct Shared {
    alive: AtomicU64,
    reconnects: AtomicU64,
    broadcast_received: AtomicU64,
    room_received: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    not_recovered: AtomicU64,
    first_done: AtomicU64,
    opened: AtomicU64,
    stopping: AtomicBool,
    errors: Mutex<Counts>,
    closes: Mutex<Counts>,
    hists: Mutex<Option<(Histogram<u64>, Histogram<u64>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record(&self, broadcast: bool, sent_ns: u64) {
        let us = unix_ns().saturating_sub(sent_ns) / 1000;
        let mut hists = lock(&self.hists);
        let (b, r) = hists.get_or_insert_with(|| (stats::new_hist(), stats::new_hist()));
        stats::record_us(if broadcast { b } else { r }, us);
    }
}

/// The bits of a delivery the run checks, borrowed from the frame.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    broadcast: Option<bool>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    /// A reply's request ID (a number), or a message's ID (a string).
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    position: Option<Position>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    data: Option<Stamp>,
}

#[derive(Deserialize)]
struct Position {
    offset: u64,
    epoch: String,
}

/// The data the coordinator publishes: its send time.
#[derive(Serialize, Deserialize)]
struct Stamp {
    t: u64,
}

// ---- the worker ----------------------------------------------------------------------------

/// `pushgate-bench scale-worker`: reads its spec, then commands, on stdin.
pub async fn worker_main() -> anyhow::Result<()> {
    crate::limits::raise_nofile();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let spec: Spec = serde_json::from_str(
        &lines
            .next_line()
            .await?
            .context("a scale worker reads its spec on stdin")?,
    )?;
    let shared = Arc::new(Shared::default());
    let conns: Arc<Vec<Arc<Conn>>> = Arc::new(
        (spec.first..spec.first + spec.count)
            .map(|i| {
                Arc::new(Conn {
                    room: i % spec.rooms,
                    last: AtomicU64::new(0),
                    epoch: Mutex::new(None),
                })
            })
            .collect(),
    );
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let cmd: Cmd = serde_json::from_str(&line).with_context(|| format!("command {line}"))?;
        let report = match cmd {
            Cmd::Open => {
                open_all(&spec, &conns, &shared).await;
                snapshot(&shared, &conns, None)
            }
            Cmd::Reset => {
                for counter in [
                    &shared.broadcast_received,
                    &shared.room_received,
                    &shared.gaps,
                    &shared.duplicates,
                    &shared.not_recovered,
                    &shared.reconnects,
                ] {
                    counter.store(0, Ordering::Relaxed);
                }
                *lock(&shared.hists) = None;
                lock(&shared.closes).clear();
                snapshot(&shared, &conns, None)
            }
            Cmd::Report { finals } => {
                let finals = finals.map(|f| f.into_iter().collect());
                snapshot(&shared, &conns, finals.as_ref())
            }
            Cmd::Stop => break,
        };
        let mut text = serde_json::to_string(&report)?;
        text.push('\n');
        out.write_all(text.as_bytes()).await?;
        out.flush().await?;
    }
    shared.stopping.store(true, Ordering::Release);
    Ok(())
}

fn snapshot(shared: &Shared, conns: &[Arc<Conn>], finals: Option<&BTreeMap<u64, u64>>) -> Report {
    let hists = lock(&shared.hists);
    let (broadcast, room) = match &*hists {
        Some((b, r)) => (stats::export(b), stats::export(r)),
        None => Default::default(),
    };
    let behind = finals.map_or(0, |finals| {
        conns
            .iter()
            .filter(|c| finals.get(&c.room).copied().unwrap_or(0) != c.last.load(Ordering::Acquire))
            .count() as u64
    });
    Report {
        opened: shared.opened.load(Ordering::Acquire),
        failed: shared.first_done.load(Ordering::Acquire) - shared.opened.load(Ordering::Acquire),
        errors: lock(&shared.errors).clone(),
        alive: shared.alive.load(Ordering::Acquire),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        closes: lock(&shared.closes).clone(),
        broadcast_received: shared.broadcast_received.load(Ordering::Relaxed),
        broadcast,
        room_received: shared.room_received.load(Ordering::Relaxed),
        room,
        gaps: shared.gaps.load(Ordering::Relaxed),
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        not_recovered: shared.not_recovered.load(Ordering::Relaxed),
        behind,
    }
}

/// Starts every connection's task and returns once each has made its first attempt.
async fn open_all(spec: &Spec, conns: &Arc<Vec<Arc<Conn>>>, shared: &Arc<Shared>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
    for (k, conn) in conns.iter().enumerate() {
        let i = spec.first + k as u64;
        let url = spec.urls[(i % spec.urls.len() as u64) as usize].clone();
        let user = format!("scale-{i}");
        let room = format!("{}{}", spec.room_prefix, conn.room);
        let token = match spec.token.mint(&user, &[&room], &[]) {
            Ok(t) => t,
            Err(e) => {
                stats::bump(&mut lock(&shared.errors), format!("token: {e}"));
                shared.first_done.fetch_add(1, Ordering::AcqRel);
                continue;
            }
        };
        let permit = gate.clone().acquire_owned().await.ok();
        tokio::spawn(connection(
            url,
            token,
            room,
            conn.clone(),
            shared.clone(),
            permit,
        ));
    }
    while shared.first_done.load(Ordering::Acquire) < spec.count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection for the whole run: opens, subscribes (with its room position once it has
/// one), reads; on a close or error, opens again after a jittered pause.
async fn connection(
    url: String,
    token: String,
    room: String,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    mut first: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut attempt = 0u32;
    loop {
        let opened = tokio::time::timeout(
            client::OPEN_TIMEOUT,
            open(&url, &token, &room, &conn, &shared),
        )
        .await
        .unwrap_or_else(|_| Err("open timed out".into()));
        let was_first = first.take().is_some();
        match opened {
            Ok(ws) => {
                if was_first {
                    shared.opened.fetch_add(1, Ordering::AcqRel);
                    shared.first_done.fetch_add(1, Ordering::AcqRel);
                } else {
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                attempt = 0;
                shared.alive.fetch_add(1, Ordering::AcqRel);
                let reason = read(ws, &conn, &shared).await;
                shared.alive.fetch_sub(1, Ordering::AcqRel);
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                stats::bump(&mut lock(&shared.closes), reason);
            }
            Err(e) => {
                stats::bump(&mut lock(&shared.errors), e);
                if was_first {
                    shared.first_done.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        attempt += 1;
        // Full jitter over 1 s, then 2, 4, and at most 5 s, as a client SDK backs off: the
        // clients of a restarted node neither return in lockstep nor hammer it while it is down.
        let cap = Duration::from_millis(500u64 << attempt.min(4)).min(Duration::from_secs(5));
        let pause = cap.mul_f64(fraction(&room, attempt));
        tokio::time::sleep(pause).await;
    }
}

/// Handshake, welcome, subscribe (with `since` once the connection has a position).
async fn open(
    url: &str,
    token: &str,
    room: &str,
    conn: &Conn,
    shared: &Shared,
) -> Result<Ws, String> {
    // Handshake and welcome, as every bench client opens.
    let mut ws = client::open(url, Some(token), None).await?;
    let last = conn.last.load(Ordering::Acquire);
    let epoch = lock(&conn.epoch).clone();
    let subscribe = match (&epoch, last) {
        (Some(epoch), 1..) => serde_json::json!({"type": "subscribe", "id": 1, "channel": room,
            "since": {"offset": last, "epoch": epoch}}),
        _ => serde_json::json!({"type": "subscribe", "id": 1, "channel": room}),
    };
    ws.send(Message::text(subscribe.to_string()))
        .await
        .map_err(|e| client::describe(&e))?;
    // Messages recovered for a `since` follow the ack; live ones may come before it.
    loop {
        let text = next_text(&mut ws).await?;
        let frame: Frame<'_> =
            serde_json::from_str(&text).map_err(|e| format!("undecodable frame: {e}"))?;
        match frame.kind {
            "ack" if frame.id == Some(serde_json::json!(1)) => {
                if frame.recovered == Some(false) {
                    shared.not_recovered.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(p) = frame.position
                    && (frame.recovered != Some(true) || epoch.as_deref() != Some(&p.epoch))
                {
                    // A first subscribe, or history could not fill the gap: start from here.
                    conn.last.store(p.offset, Ordering::Release);
                    *lock(&conn.epoch) = Some(p.epoch);
                }
                return Ok(ws);
            }
            "error" => return Err(format!("subscribe refused: {text}")),
            "message" => on_message(&frame, conn, shared),
            _ => {}
        }
    }
}

async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            None => return Err("closed".into()),
            Some(Err(e)) => return Err(client::describe(&e)),
            Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
            Some(Ok(Message::Close(frame))) => return Err(client::close_reason(frame.as_ref())),
            Some(Ok(_)) => {}
        }
    }
}

/// Reads deliveries until the connection ends; returns why it ended.
async fn read(mut ws: Ws, conn: &Conn, shared: &Shared) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text)
                    && frame.kind == "message"
                {
                    on_message(&frame, conn, shared);
                }
            }
            Some(Ok(Message::Close(frame))) => return client::close_reason(frame.as_ref()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return client::describe(&e),
            None => return "eof".into(),
        }
    }
}

fn on_message(frame: &Frame<'_>, conn: &Conn, shared: &Shared) {
    let sent = frame.data.as_ref().map(|d| d.t);
    if frame.broadcast == Some(true) {
        shared.broadcast_received.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = sent {
            shared.record(true, t);
        }
        return;
    }
    let Some(offset) = frame.offset else { return };
    if let Some(epoch) = &frame.epoch {
        let mut mine = lock(&conn.epoch);
        if mine.as_deref() != Some(epoch) {
            // A new epoch starts the count again (history was lost and said so).
            *mine = Some(epoch.clone());
            conn.last.store(offset.saturating_sub(1), Ordering::Release);
        }
    }
    let last = conn.last.load(Ordering::Acquire);
    if offset <= last {
        shared.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if offset > last + 1 {
        shared.gaps.fetch_add(offset - last - 1, Ordering::Relaxed);
    }
    conn.last.store(offset, Ordering::Release);
    shared.room_received.fetch_add(1, Ordering::Relaxed);
    if let Some(t) = sent {
        shared.record(false, t);
    }
}

/// A number in [0, 1) that differs between connections and attempts.
fn fraction(seed: &str, attempt: u32) -> f64 {
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(seed, attempt, unix_ns()), &mut h);
    (std::hash::Hasher::finish(&h) >> 11) as f64 / (1u64 << 53) as f64
}

// ---- the coordinator -----------------------------------------------------------------------

struct WorkerProcess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl WorkerProcess {
    async fn start(spec: &Spec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("scale-worker")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a scale worker")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut line = serde_json::to_string(spec)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    async fn ask(&mut self, cmd: &Cmd) -> anyhow::Result<Report> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let answer = self
            .lines
            .next_line()
            .await?
            .context("a scale worker ended early (see its message above)")?;
        Ok(serde_json::from_str(&answer)?)
    }
}

/// Every worker's answer to `cmd`, merged.
async fn ask_all(workers: &mut [WorkerProcess], cmd: &Cmd) -> anyhow::Result<Merged> {
    let answers =
        futures_util::future::try_join_all(workers.iter_mut().map(|w| w.ask(cmd))).await?;
    let mut m = Merged::default();
    for r in answers {
        m.add(r);
    }
    Ok(m)
}

#[derive(Default)]
struct Merged {
    sum: Report,
    broadcast: Option<Histogram<u64>>,
    room: Option<Histogram<u64>>,
}

impl Merged {
    fn add(&mut self, r: Report) {
        let s = &mut self.sum;
        s.opened += r.opened;
        s.failed += r.failed;
        stats::merge(&mut s.errors, &r.errors);
        s.alive += r.alive;
        s.reconnects += r.reconnects;
        stats::merge(&mut s.closes, &r.closes);
        s.broadcast_received += r.broadcast_received;
        s.room_received += r.room_received;
        s.gaps += r.gaps;
        s.duplicates += r.duplicates;
        s.not_recovered += r.not_recovered;
        s.behind += r.behind;
        stats::import(
            self.broadcast.get_or_insert_with(stats::new_hist),
            &r.broadcast,
        );
        stats::import(self.room.get_or_insert_with(stats::new_hist), &r.room);
    }

    fn broadcast(&self) -> Percentiles {
        self.broadcast
            .as_ref()
            .map(Percentiles::of)
            .unwrap_or_default()
    }

    fn room(&self) -> Percentiles {
        self.room.as_ref().map(Percentiles::of).unwrap_or_default()
    }
}

/// Publishes room messages through the API at `rate` per second, round-robin over the rooms and
/// the nodes, until `stop`; a publish a node refuses (draining, restarting) goes to the next node.
/// Returns each room's last offset and the number of messages published.
async fn publish_rooms(
    bases: &[String],
    api_key: &str,
    args: &ScaleArgs,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(BTreeMap<u64, u64>, u64)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let start = Instant::now();
    let mut finals = BTreeMap::new();
    let (mut sent, mut node) = (0u64, 0usize);
    while !*stop.borrow() {
        let room = sent % args.rooms;
        let body = serde_json::json!({
            "channel": format!("{}{room}", args.room_prefix),
            "data": Stamp { t: unix_ns() },
        });
        let mut tries = 0;
        let offset = loop {
            node = (node + 1) % bases.len();
            let reply = http
                .post(format!("{}/api/publish", bases[node]))
                .bearer_auth(api_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            if let Ok(r) = reply
                && r.status().is_success()
                && let Ok(bytes) = r.bytes().await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
                && let Some(offset) = v["offset"].as_u64()
            {
                break offset;
            }
            tries += 1;
            if tries > 10 * bases.len() {
                bail!("no node took room publish {sent}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let last = finals.entry(room).or_insert(0);
        *last = (*last).max(offset);
        sent += 1;
        let next = start + Duration::from_secs_f64(sent as f64 / args.room_rate);
        tokio::time::sleep_until(next.into()).await;
    }
    Ok((finals, sent))
}

#[derive(Serialize)]
struct NodeFigures {
    url: String,
    connections: f64,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    rss_per_connection_bytes: f64,
}

#[derive(Serialize, Default)]
struct PhaseResult {
    expected: u64,
    received: u64,
    lost: i64,
    latency: Percentiles,
}

#[derive(Serialize)]
struct ScaleResult {
    bench: &'static str,
    connections: u64,
    opened: u64,
    failed: u64,
    errors: Counts,
    connect_secs: f64,
    nodes: Vec<NodeFigures>,
    held_secs: f64,
    min_alive_while_held: u64,
    dropped_while_held: u64,
    broadcasts: Vec<PhaseResult>,
    rooms: PhaseResult,
    restart: RestartResult,
}

#[derive(Serialize, Default)]
struct RestartResult {
    command_ok: bool,
    secs: f64,
    published: u64,
    reconnects: u64,
    alive_after: u64,
    behind: u64,
    gaps: u64,
    duplicates: u64,
    not_recovered: u64,
    closes: Counts,
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let api_key = args
        .api_key
        .clone()
        .context("--api-key (PUSHGATE_API_KEY) is needed to publish")?;
    let bases = args
        .urls
        .iter()
        .map(|u| http_base(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rss: Vec<RssSource> = bases
        .iter()
        .map(|b| RssSource::metrics(format!("{b}/metrics")))
        .collect();
    let mut before = Vec::new();
    for source in &rss {
        before.push(source.read().await?);
    }

    // Open.
    let procs = u64::from(args.procs.procs.max(1));
    let token = TokenSpec::new(
        args.auth.jwt_secret.clone(),
        args.auth.jwt_issuer.clone(),
        args.auth.jwt_audience.clone(),
        args.auth.token_ttl,
    );
    let mut workers = Vec::new();
    for w in 0..procs {
        let (first, end) = (
            args.connections * w / procs,
            args.connections * (w + 1) / procs,
        );
        let spec = Spec {
            urls: args.urls.clone(),
            first,
            count: end - first,
            rooms: args.rooms,
            room_prefix: args.room_prefix.clone(),
            concurrency: (args.concurrency / procs as usize).max(1),
            token: token.clone(),
        };
        workers.push(WorkerProcess::start(&spec).await?);
    }
    let started = Instant::now();
    let opened = ask_all(&mut workers, &Cmd::Open).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "scale: {} of {} connections open in {connect_secs:.1} s ({} failed)",
        opened.sum.opened, args.connections, opened.sum.failed
    );

    // Memory per connection, per node, once the nodes settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut nodes = Vec::new();
    for ((url, source), before) in args.urls.iter().zip(&rss).zip(&before) {
        let after = source.read().await?;
        let text = reqwest::get(format!("{}/metrics", http_base(url)?))
            .await?
            .text()
            .await?;
        let connections = metric(&text, "pushgate_connections").unwrap_or(0.0);
        nodes.push(NodeFigures {
            url: url.clone(),
            connections,
            rss_before_bytes: *before,
            rss_after_bytes: after,
            rss_per_connection_bytes: (after.saturating_sub(*before)) as f64 / connections.max(1.0),
        });
    }

    // Hold.
    let held = Instant::now();
    let mut min_alive = u64::MAX;
    let dropped = loop {
        let status = ask_all(&mut workers, &Cmd::Report { finals: None }).await?;
        min_alive = min_alive.min(status.sum.alive);
        let dropped = stats::total(&status.sum.closes);
        eprintln!(
            "scale: held {:>4.0} s: {} alive, {} dropped",
            held.elapsed().as_secs_f64(),
            status.sum.alive,
            dropped
        );
        if held.elapsed() >= args.hold {
            break dropped;
        }
        tokio::time::sleep(Duration::from_secs(10).min(args.hold)).await;
    };
    let held_secs = held.elapsed().as_secs_f64();

    // Broadcasts.
    let http = reqwest::Client::new();
    let mut broadcasts = Vec::new();
    for k in 0..args.broadcasts {
        ask_all(&mut workers, &Cmd::Reset).await?;
        let body = serde_json::json!({"broadcast": true, "data": Stamp { t: unix_ns() }});
        let base = &bases[k as usize % bases.len()];
        let reply = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(&api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await?;
        if !reply.status().is_success() {
            bail!("broadcast refused: {}", reply.status());
        }
        let m = wait_for(&mut workers, None, |m| {
            m.sum.broadcast_received >= opened.sum.opened
        })
        .await?;
        let result = PhaseResult {
            expected: opened.sum.opened,
            received: m.sum.broadcast_received,
            lost: opened.sum.opened as i64 - m.sum.broadcast_received as i64,
            latency: m.broadcast(),
        };
        eprintln!(
            "scale: broadcast {}: {} of {} received, last after {:.0} ms (p50 {:.0}, p99 {:.0})",
            k + 1,
            result.received,
            result.expected,
            result.latency.max_ms,
            result.latency.p50_ms,
            result.latency.p99_ms
        );
        broadcasts.push(result);
    }

    // Steady room traffic.
    ask_all(&mut workers, &Cmd::Reset).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = publish_rooms(&bases, &api_key, &args, stop_rx);
    let timer = async {
        tokio::time::sleep(args.room_duration).await;
        let _ = stop_tx.send(true);
    };
    let (published, ()) = tokio::join!(publisher, timer);
    let (finals, published) = published?;
    let per_room = opened.sum.opened as f64 / args.rooms as f64;
    let expected = (published as f64 * per_room).round() as u64;
    let m = wait_for(&mut workers, Some(&finals), |m| m.sum.behind == 0).await?;
    let rooms = PhaseResult {
        expected,
        received: m.sum.room_received,
        lost: expected as i64 - m.sum.room_received as i64,
        latency: m.room(),
    };
    eprintln!(
        "scale: rooms: {published} messages at {} msg/s, {} of {} deliveries, p50 {:.1} ms, p99 {:.1} ms",
        args.room_rate, rooms.received, rooms.expected, rooms.latency.p50_ms, rooms.latency.p99_ms
    );

    // Room traffic through the --during command (a rolling restart).
    let mut restart = RestartResult::default();
    if let Some(command) = &args.during {
        ask_all(&mut workers, &Cmd::Reset).await?;
        let started = Instant::now();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let publisher = publish_rooms(&bases, &api_key, &args, stop_rx);
        let during = async {
            let status = tokio::process::Command::new("bash")
                .args(["-c", command])
                .status()
                .await;
            // Keep publishing a little after it ends: the last node's clients are back by then.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = stop_tx.send(true);
            status.map(|s| s.success()).unwrap_or(false)
        };
        let (published, ok) = tokio::join!(publisher, during);
        let (mut finals_now, count) = published?;
        for (room, offset) in finals {
            finals_now.entry(room).or_insert(offset);
        }
        let m = wait_for(&mut workers, Some(&finals_now), |m| {
            m.sum.behind == 0 && m.sum.alive == opened.sum.opened
        })
        .await?;
        restart = RestartResult {
            command_ok: ok,
            secs: started.elapsed().as_secs_f64(),
            published: count,
            reconnects: m.sum.reconnects,
            alive_after: m.sum.alive,
            behind: m.sum.behind,
            gaps: m.sum.gaps,
            duplicates: m.sum.duplicates,
            not_recovered: m.sum.not_recovered,
            closes: m.sum.closes.clone(),
        };
        eprintln!(
            "scale: during `{command}`: {} published, {} reconnects, {} alive after, {} behind, {} gaps, {} duplicates, {} not recovered",
            restart.published,
            restart.reconnects,
            restart.alive_after,
            restart.behind,
            restart.gaps,
            restart.duplicates,
            restart.not_recovered
        );
    }

    for mut w in workers {
        let _ = w.stdin.write_all(b"{\"cmd\":\"stop\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
    }
    let result = ScaleResult {
        bench: "scale",
        connections: args.connections,
        opened: opened.sum.opened,
        failed: opened.sum.failed,
        errors: opened.sum.errors,
        connect_secs,
        nodes,
        held_secs,
        min_alive_while_held: min_alive,
        dropped_while_held: dropped,
        broadcasts,
        rooms,
        restart,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Asks for reports until `done` holds, or 60 s pass with nothing changing; returns the last.
async fn wait_for(
    workers: &mut [WorkerProcess],
    finals: Option<&BTreeMap<u64, u64>>,
    done: impl Fn(&Merged) -> bool,
) -> anyhow::Result<Merged> {
    let cmd = Cmd::Report {
        finals: finals.map(|f| f.iter().map(|(&room, &offset)| (room, offset)).collect()),
    };
    let mut since = Instant::now();
    let mut last = None;
    loop {
        let m = ask_all(workers, &cmd).await?;
        let progress = (
            m.sum.broadcast_received,
            m.sum.room_received,
            m.sum.alive,
            m.sum.behind,
        );
        if done(&m) {
            return Ok(m);
        }
        if last != Some(progress) {
            (last, since) = (Some(progress), Instant::now());
        } else if since.elapsed() > Duration::from_secs(60) {
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
