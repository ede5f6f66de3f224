//! Client workers: the side of a run that holds connections (idle connections, handshake loops,
//! fan-out subscribers). With `--procs 1` a worker is a task of the bench itself; with
//! `--procs K` each is a child process (`pushgate-bench worker`) that reads its spec and
//! commands as JSON lines on stdin and answers with JSON lines on stdout.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, OPEN_TIMEOUT, Ws};
use crate::payload::{self, Stamp};
use crate::socketio;
use crate::stats::{self, Counts, HistData};
use crate::token::TokenSpec;

/// What one worker does.
#[derive(Clone, Serialize, Deserialize)]
pub struct Spec {
    pub index: u32,
    pub protocol: Protocol,
    pub channel: String,
    pub job: Job,
}

/// What the server under test speaks.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Protocol {
    /// pushgate: a token per user (signed with `token`), the welcome, `subscribe`.
    Pushgate { token: TokenSpec },
    /// The baseline server: the bare upgrade (no auth, no welcome, no subscribe), text payloads.
    Bare,
    /// Socket.IO over WebSocket: the namespace connect, `join` the channel as a room, `msg`
    /// events. Fan-out only: idle connections would not answer its pings.
    SocketIo,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Open `connections` (users `bench-<first>`...), subscribe each, hold them.
    Idle {
        url: String,
        connections: u64,
        first: u64,
        concurrency: usize,
    },
    /// Handshake loops: connect, welcome, close.
    Connect {
        url: String,
        concurrency: usize,
        duration_ms: Option<u64>,
        count: Option<u64>,
    },
    /// Subscribers `first..first + subscribers`, subscriber `g` on `urls[g % urls.len()]`.
    Fanout {
        urls: Vec<String>,
        subscribers: u64,
        first: u64,
        concurrency: usize,
        publishers: u32,
        full_decode: bool,
    },
}

/// Coordinator to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    Go,
    /// Fan-out: reconnect lost subscribers, then count deliveries of `step` from zero.
    Start {
        step: u64,
    },
    /// Fan-out: wait until each subscriber has `expected` deliveries of `step`, or nothing new
    /// arrived for `timeout_ms`; then report.
    Drain {
        step: u64,
        expected: u64,
        timeout_ms: u64,
    },
    /// Idle: how many connections are still open.
    Check,
    Stop,
}

/// Worker to coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Hello,
    Opened(OpenReport),
    Started { alive: u64, reconnected: u64 },
    Step(StepReport),
    Alive { alive: u64 },
    Connected(ConnectReport),
    Failed { message: String },
}

/// Connections opened, and how long each took (handshake to subscribe ack).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OpenReport {
    pub opened: u64,
    pub failed: u64,
    pub errors: Counts,
    pub elapsed_ms: f64,
    pub hist: HistData,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Counts,
    pub elapsed_ms: f64,
    pub hist: HistData,
}

/// One fan-out step, seen by one worker's subscribers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub subscribers: u64,
    pub alive: u64,
    pub received: u64,
    /// Deliveries of an earlier step that arrived late.
    pub stale: u64,
    /// Deliveries that came after a later one from the same publisher (reordered or repeated).
    pub out_of_order: u64,
    /// Frames that were not a timestamped delivery.
    pub other: u64,
    pub first_recv_ns: u64,
    pub last_recv_ns: u64,
    /// Why subscribers went away since the last report.
    pub closes: Counts,
    pub hist: HistData,
}

/// Runs a worker until `Stop` (or its commands end).
pub async fn run(
    spec: Spec,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let _ = events.send(Event::Hello);
    match cmds.recv().await {
        Some(Cmd::Go) => {}
        Some(Cmd::Stop) | None => return Ok(()),
        Some(other) => bail!("worker expected go, got {other:?}"),
    }
    match spec.job.clone() {
        Job::Idle {
            url,
            connections,
            first,
            concurrency,
        } => idle(&spec, &url, connections, first, concurrency, cmds, events).await,
        Job::Connect {
            url,
            concurrency,
            duration_ms,
            count,
        } => {
            let report = connect_loop(
                &spec,
                &url,
                concurrency,
                duration_ms.map(Duration::from_millis),
                count,
            )
            .await?;
            let _ = events.send(Event::Connected(report));
            while let Some(cmd) = cmds.recv().await {
                if matches!(cmd, Cmd::Stop) {
                    break;
                }
            }
            Ok(())
        }
        Job::Fanout { .. } => Fanout::new(spec).run(cmds, events).await,
    }
}

fn token_for(spec: &Spec, sub: &str) -> anyhow::Result<Option<String>> {
    match &spec.protocol {
        Protocol::Pushgate { token } => Ok(Some(token.mint(sub, &[spec.channel.as_str()], &[])?)),
        Protocol::Bare | Protocol::SocketIo => Ok(None),
    }
}

/// Opens one connection as `protocol` says, subscribed to (or joined to) `channel` if given.
async fn open_one(
    protocol: &Protocol,
    url: &str,
    token: Option<&str>,
    channel: Option<&str>,
) -> Result<Ws, String> {
    match protocol {
        Protocol::SocketIo => socketio::open(url, channel).await,
        Protocol::Pushgate { .. } | Protocol::Bare => client::open(url, token, channel).await,
    }
}

/// Opens a connection for each global index (user `bench-<index>`) to `url_of(index)`,
/// `concurrency` at a time, and hands each open one to `keep`.
async fn open_many(
    spec: &Spec,
    indices: impl Iterator<Item = u64>,
    concurrency: usize,
    url_of: impl Fn(u64) -> String,
    mut keep: impl FnMut(u64, Ws),
) -> anyhow::Result<OpenReport> {
    let start = Instant::now();
    let mut hist = stats::new_hist();
    let mut report = OpenReport::default();
    let mut jobs = Vec::new();
    for index in indices {
        let token = token_for(spec, &format!("bench-{index}"))?;
        jobs.push((index, url_of(index), token));
    }
    let (protocol, channel) = (&spec.protocol, spec.channel.as_str());
    let mut results = stream::iter(jobs)
        .map(|(index, url, token)| async move {
            let t = Instant::now();
            let opened = tokio::time::timeout(
                OPEN_TIMEOUT,
                open_one(protocol, &url, token.as_deref(), Some(channel)),
            )
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            (index, opened, t.elapsed())
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((index, opened, took)) = results.next().await {
        match opened {
            Ok(ws) => {
                stats::record(&mut hist, took);
                report.opened += 1;
                keep(index, ws);
            }
            Err(reason) => {
                report.failed += 1;
                stats::bump(&mut report.errors, reason);
            }
        }
    }
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    report.hist = stats::export(&hist);
    Ok(report)
}

async fn idle(
    spec: &Spec,
    url: &str,
    n: u64,
    first: u64,
    concurrency: usize,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    let report = open_many(
        spec,
        first..first + n,
        concurrency,
        |_| url.to_owned(),
        |_, ws| held.push(tokio::spawn(hold(ws, stop_rx.clone(), dropped.clone()))),
    )
    .await?;
    let opened = report.opened;
    let _ = events.send(Event::Opened(report));
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Cmd::Check => {
                let alive = opened - dropped.load(Ordering::Relaxed);
                let _ = events.send(Event::Alive { alive });
            }
            Cmd::Stop => break,
            _ => {}
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(held),
    )
    .await;
    Ok(())
}

/// Keeps an idle connection open (reading, so pings get their pongs) until told to stop.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicU64>) {
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
        }
    }
}

async fn connect_loop(
    spec: &Spec,
    url: &str,
    concurrency: usize,
    duration: Option<Duration>,
    count: Option<u64>,
) -> anyhow::Result<ConnectReport> {
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let left = Arc::new(AtomicI64::new(
        count.map_or(i64::MAX, |c| i64::try_from(c).unwrap_or(i64::MAX)),
    ));
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        // One token per loop, minted up front: signing is not what is being measured.
        let token = token_for(spec, &format!("bench-c{}-{t}", spec.index))?;
        let (url, left, protocol) = (url.to_owned(), left.clone(), spec.protocol.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = stats::new_hist();
            let (mut ok, mut errors) = (0u64, Counts::new());
            while deadline.is_none_or(|d| Instant::now() < d)
                && left.fetch_sub(1, Ordering::Relaxed) > 0
            {
                let t = Instant::now();
                let opened = tokio::time::timeout(
                    OPEN_TIMEOUT,
                    open_one(&protocol, &url, token.as_deref(), None),
                )
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
                match opened {
                    Ok(ws) => {
                        stats::record(&mut hist, t.elapsed());
                        ok += 1;
                        client::close(ws).await;
                    }
                    Err(reason) => {
                        stats::bump(&mut errors, reason);
                        // A refused connection returns at once; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    let mut hist = stats::new_hist();
    let mut report = ConnectReport::default();
    for task in tasks {
        let (h, ok, errors) = task.await.context("handshake loop panicked")?;
        hist.add(&h).context("merging histograms")?;
        report.ok += ok;
        stats::merge(&mut report.errors, &errors);
    }
    report.failed = stats::total(&report.errors);
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    report.hist = stats::export(&hist);
    Ok(report)
}

/// Shards of the fan-out counters: subscriber `i` records into shard `i % SHARDS`, so tasks on
/// different threads rarely meet on a lock.
const SHARDS: usize = 16;

struct Shard {
    hist: Histogram<u64>,
    received: u64,
    stale: u64,
    out_of_order: u64,
    other: u64,
    first_ns: u64,
    last_ns: u64,
}

impl Shard {
    fn new() -> Self {
        Self {
            hist: stats::new_hist(),
            received: 0,
            stale: 0,
            out_of_order: 0,
            other: 0,
            first_ns: u64::MAX,
            last_ns: 0,
        }
    }
}

struct Shared {
    step: AtomicU64,
    shards: Vec<Mutex<Shard>>,
    closes: Mutex<Counts>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone, Copy)]
enum Decode {
    /// The baseline: the text message is the payload.
    Raw,
    /// pushgate, borrowing `data` out of the frame.
    Lean,
    /// pushgate, decoding every frame into the protocol's `ServerFrame` and checking the channel.
    Full,
    /// Socket.IO: `data` borrowed out of a `msg` event; pings answered.
    SocketIo,
}

struct Fanout {
    spec: Spec,
    urls: Vec<String>,
    subscribers: u64,
    first: u64,
    concurrency: usize,
    publishers: u32,
    decode: Decode,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<Option<JoinHandle<()>>>,
}

impl Fanout {
    fn new(spec: Spec) -> Self {
        let Job::Fanout {
            urls,
            subscribers,
            first,
            concurrency,
            publishers,
            full_decode,
        } = spec.job.clone()
        else {
            unreachable!("a fan-out worker runs a fan-out job")
        };
        let decode = match (&spec.protocol, full_decode) {
            (Protocol::Bare, _) => Decode::Raw,
            (Protocol::SocketIo, _) => Decode::SocketIo,
            (Protocol::Pushgate { .. }, false) => Decode::Lean,
            (Protocol::Pushgate { .. }, true) => Decode::Full,
        };
        Self {
            spec,
            urls,
            subscribers,
            first,
            concurrency,
            publishers,
            decode,
            shared: Arc::new(Shared {
                step: AtomicU64::new(0),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
                closes: Mutex::new(Counts::new()),
            }),
            stop: watch::channel(false).0,
            tasks: (0..subscribers).map(|_| None).collect(),
        }
    }

    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        events: mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<()> {
        let report = self.open(None).await?;
        let _ = events.send(Event::Opened(report));
        while let Some(cmd) = cmds.recv().await {
            match cmd {
                Cmd::Start { step } => {
                    let lost: Vec<u64> = (0..self.subscribers)
                        .filter(|&i| self.task(i).is_none_or(JoinHandle::is_finished))
                        .collect();
                    let reconnected = if lost.is_empty() {
                        0
                    } else {
                        self.open(Some(lost)).await?.opened
                    };
                    self.shared.step.store(step, Ordering::SeqCst);
                    for shard in &self.shared.shards {
                        *lock(shard) = Shard::new();
                    }
                    let alive = self.alive();
                    let _ = events.send(Event::Started { alive, reconnected });
                }
                Cmd::Drain {
                    step,
                    expected,
                    timeout_ms,
                } => {
                    let report = self
                        .drain(step, expected, Duration::from_millis(timeout_ms))
                        .await;
                    let _ = events.send(Event::Step(report));
                }
                Cmd::Stop => break,
                Cmd::Go | Cmd::Check => {}
            }
        }
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self.tasks.iter_mut().filter_map(Option::take).collect();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(tasks),
        )
        .await;
        Ok(())
    }

    fn task(&self, i: u64) -> Option<&JoinHandle<()>> {
        self.tasks.get(usize::try_from(i).ok()?)?.as_ref()
    }

    fn alive(&self) -> u64 {
        self.tasks
            .iter()
            .filter(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .count() as u64
    }

    /// Opens every subscriber (or just those in `only`) and starts its reader.
    async fn open(&mut self, only: Option<Vec<u64>>) -> anyhow::Result<OpenReport> {
        let urls = self.urls.clone();
        let (first, spec) = (self.first, self.spec.clone());
        let (shared, stop, decode, publishers) = (
            self.shared.clone(),
            self.stop.subscribe(),
            self.decode,
            self.publishers,
        );
        let channel = spec.channel.clone();
        let url_of = move |g: u64| urls[usize::try_from(g).unwrap_or(0) % urls.len()].clone();
        let tasks = &mut self.tasks;
        let keep = |g: u64, ws: Ws| {
            let local = g - first;
            let reader = subscriber(
                ws,
                local,
                shared.clone(),
                stop.clone(),
                decode,
                publishers,
                channel.clone(),
            );
            if let Some(slot) = usize::try_from(local).ok().and_then(|i| tasks.get_mut(i)) {
                *slot = Some(tokio::spawn(reader));
            }
        };
        let indices: Vec<u64> = match only {
            None => (first..first + self.subscribers).collect(),
            Some(lost) => lost.into_iter().map(|local| first + local).collect(),
        };
        open_many(&spec, indices.into_iter(), self.concurrency, url_of, keep).await
    }

    fn totals(&self) -> (u64, StepReport) {
        let mut hist = stats::new_hist();
        let mut r = StepReport {
            first_recv_ns: u64::MAX,
            ..StepReport::default()
        };
        for shard in &self.shared.shards {
            let s = lock(shard);
            r.received += s.received;
            r.stale += s.stale;
            r.out_of_order += s.out_of_order;
            r.other += s.other;
            r.first_recv_ns = r.first_recv_ns.min(s.first_ns);
            r.last_recv_ns = r.last_recv_ns.max(s.last_ns);
            let _ = hist.add(&s.hist);
        }
        r.hist = stats::export(&hist);
        (r.received, r)
    }

    async fn drain(&mut self, step: u64, expected: u64, quiet: Duration) -> StepReport {
        let want = expected * self.subscribers;
        let (mut last, mut since) = (u64::MAX, Instant::now());
        loop {
            let received: u64 = self.shared.shards.iter().map(|s| lock(s).received).sum();
            if received >= want {
                break;
            }
            if received != last {
                (last, since) = (received, Instant::now());
            } else if since.elapsed() >= quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_, mut report) = self.totals();
        report.step = step;
        report.subscribers = self.subscribers;
        report.alive = self.alive();
        report.closes = std::mem::take(&mut *lock(&self.shared.closes));
        if report.first_recv_ns == u64::MAX {
            report.first_recv_ns = 0;
        }
        report
    }
}

/// Reads one subscriber's deliveries into the shared counters until it closes or is stopped.
async fn subscriber(
    mut ws: Ws,
    local: u64,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    decode: Decode,
    publishers: u32,
    channel: String,
) {
    let shard = &shared.shards[usize::try_from(local).unwrap_or(0) % SHARDS];
    // Highest sequence number + 1 seen from each publisher in the current step.
    let mut seen_step = u64::MAX;
    let mut last = vec![0u64; publishers.max(1) as usize];
    let reason = loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if matches!(decode, Decode::SocketIo) && text.as_str() == socketio::PING {
                        match ws.send(Message::text(socketio::PONG)).await {
                            Ok(()) => continue,
                            Err(e) => break client::describe(&e),
                        }
                    }
                    let stamp = match decode {
                        Decode::Raw => payload::parse_json(&text),
                        Decode::Lean => client::lean_data(&text).and_then(payload::parse_json),
                        Decode::Full => full_decode(&text, &channel),
                        Decode::SocketIo => socketio::msg_data(&text).and_then(payload::parse_json),
                    };
                    let now = payload::unix_ns();
                    let step = shared.step.load(Ordering::Relaxed);
                    let mut s = lock(shard);
                    match stamp {
                        None => s.other += 1,
                        Some(stamp) if stamp.step != step => s.stale += 1,
                        Some(Stamp { publisher, seq, ts_ns, .. }) => {
                            if seen_step != step {
                                seen_step = step;
                                last.iter_mut().for_each(|l| *l = 0);
                            }
                            if let Some(l) = last.get_mut(publisher as usize) {
                                if seq < *l {
                                    s.out_of_order += 1;
                                }
                                *l = (*l).max(seq + 1);
                            }
                            s.received += 1;
                            s.first_ns = s.first_ns.min(now);
                            s.last_ns = s.last_ns.max(now);
                            stats::record_us(&mut s.hist, now.saturating_sub(ts_ns) / 1000);
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => break client::close_reason(frame.as_ref()),
                Some(Ok(_)) => {}
                Some(Err(e)) => break client::describe(&e),
                None => break "eof".to_owned(),
            },
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
        }
    };
    stats::bump(&mut lock(&shared.closes), reason);
}

fn full_decode(text: &str, channel: &str) -> Option<Stamp> {
    use pushgate_protocol::server::ServerFrame;
    match ServerFrame::decode(text).ok()? {
        ServerFrame::Message(d) if d.channel.as_deref() == Some(channel) => {
            payload::parse(d.data.as_str()?)
        }
        _ => None,
    }
}

/// A worker as seen by the coordinator: a task of this process, or a child process.
pub enum Link {
    Local {
        tx: mpsc::UnboundedSender<Cmd>,
        rx: mpsc::UnboundedReceiver<Event>,
        task: JoinHandle<anyhow::Result<()>>,
    },
    Child(Box<ChildProcess>),
}

pub struct ChildProcess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Link {
    pub fn local(spec: Spec) -> Self {
        let (tx, cmd_rx) = mpsc::unbounded_channel();
        let (event_tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(spec, cmd_rx, event_tx));
        Self::Local { tx, rx, task }
    }

    /// Re-executes this binary as `pushgate-bench worker` and hands it `spec`.
    pub async fn child(spec: &Spec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut line = serde_json::to_string(spec)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        Ok(Self::Child(Box::new(ChildProcess {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })))
    }

    pub async fn send(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        match self {
            Self::Local { tx, .. } => {
                // A finished worker reports why on its next recv.
                let _ = tx.send(cmd.clone());
            }
            Self::Child(process) => {
                let stdin = &mut process.stdin;
                let mut line = serde_json::to_string(cmd)?;
                line.push('\n');
                stdin
                    .write_all(line.as_bytes())
                    .await
                    .context("writing to a worker")?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    pub async fn recv(&mut self) -> anyhow::Result<Event> {
        let event = match self {
            Self::Local { rx, task, .. } => match rx.recv().await {
                Some(event) => event,
                None => {
                    let outcome = task.await.context("worker task panicked")?;
                    outcome?;
                    bail!("worker ended early")
                }
            },
            Self::Child(process) => {
                let line = process
                    .lines
                    .next_line()
                    .await
                    .context("reading from a worker")?
                    .context("worker process ended early (see its message above)")?;
                serde_json::from_str(&line)
                    .with_context(|| format!("worker said something unexpected: {line}"))?
            }
        };
        if let Event::Failed { message } = event {
            bail!("worker failed: {message}");
        }
        Ok(event)
    }

    /// Tells the worker to stop and waits for it (bounded).
    pub async fn finish(mut self) {
        let _ = self.send(&Cmd::Stop).await;
        match self {
            Self::Local { task, tx, .. } => {
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
            }
            Self::Child(process) => {
                let ChildProcess {
                    mut child, stdin, ..
                } = *process;
                drop(stdin);
                if tokio::time::timeout(Duration::from_secs(15), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// `pushgate-bench worker`: the child side of [`Link::child`].
pub async fn child_main() -> anyhow::Result<()> {
    crate::limits::raise_nofile();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .context("a worker reads its spec on stdin")?;
    let spec: Spec = serde_json::from_str(&first).context("worker spec")?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Cmd>(&line) {
                Ok(cmd) => {
                    if cmd_tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("pushgate-bench worker: bad command {line:?}: {e}"),
            }
        }
        let _ = cmd_tx.send(Cmd::Stop);
    });
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(event) = event_rx.recv().await {
            let Ok(mut line) = serde_json::to_string(&event) else {
                continue;
            };
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    });
    let failed = event_tx.clone();
    let outcome = run(spec, cmd_rx, event_tx).await;
    if let Err(e) = &outcome {
        let _ = failed.send(Event::Failed {
            message: format!("{e:#}"),
        });
    }
    drop(failed);
    let _ = writer.await;
    outcome
}
