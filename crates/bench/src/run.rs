//! The scenarios: what a run does, and its table and JSON line.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::{ConnectLoad, FanoutLoad, IdleLoad, Via};
use crate::limits;
use crate::publish::{PubReport, Publisher};
use crate::rss::{self, RssSource};
use crate::stats::{self, Counts, Percentiles};
use crate::worker::{Cmd, Event, Job, Link, OpenReport, Protocol, Spec, StepReport};

/// `count` split into `parts` shares: (first index, size) each.
pub fn split(count: u64, parts: u32) -> Vec<(u64, u64)> {
    let parts = u64::from(parts.max(1));
    let (base, extra) = (count / parts, count % parts);
    let mut first = 0;
    (0..parts)
        .map(|i| {
            let size = base + u64::from(i < extra);
            let share = (first, size);
            first += size;
            share
        })
        .collect()
}

/// `http://host:port` of a `ws://host:port/...` URL.
pub fn http_base(ws_url: &str) -> anyhow::Result<String> {
    let (scheme, rest) = if let Some(rest) = ws_url.strip_prefix("ws://") {
        ("http", rest)
    } else if let Some(rest) = ws_url.strip_prefix("wss://") {
        ("https", rest)
    } else {
        bail!("{ws_url} is not a ws:// or wss:// URL");
    };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    Ok(format!("{scheme}://{authority}"))
}

/// The server under test.
pub struct Target {
    /// `pushgate`, `baseline` or `socketio`.
    pub name: &'static str,
    pub protocol: Protocol,
    /// The channel (Socket.IO: the room) every subscriber is in.
    pub channel: String,
}

/// The client workers of a run.
struct Workers {
    links: Vec<Link>,
}

impl Workers {
    /// Starts one worker per job, each signing in as `target` says.
    async fn spread(
        target: &Target,
        procs: u32,
        jobs: impl IntoIterator<Item = Job>,
    ) -> anyhow::Result<Self> {
        let specs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| Spec {
                index: i as u32,
                protocol: target.protocol.clone(),
                channel: target.channel.clone(),
                job,
            })
            .collect();
        Self::start(specs, procs).await
    }

    /// Starts one worker per spec: in this process for a single spec with `--procs 1`, else as
    /// child processes. Waits until each is ready for `go`.
    async fn start(specs: Vec<Spec>, procs: u32) -> anyhow::Result<Self> {
        let mut links = Vec::with_capacity(specs.len());
        for spec in specs {
            links.push(if procs <= 1 {
                Link::local(spec)
            } else {
                Link::child(&spec).await?
            });
        }
        let mut workers = Self { links };
        for event in workers.recv_all().await? {
            if !matches!(event, Event::Hello) {
                bail!("worker started with {event:?}");
            }
        }
        Ok(workers)
    }

    async fn send_all(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        for link in &mut self.links {
            link.send(cmd).await?;
        }
        Ok(())
    }

    async fn recv_all(&mut self) -> anyhow::Result<Vec<Event>> {
        let mut events = Vec::with_capacity(self.links.len());
        for link in &mut self.links {
            events.push(link.recv().await?);
        }
        Ok(events)
    }

    async fn opened(&mut self) -> anyhow::Result<(OpenReport, Percentiles)> {
        let mut total = OpenReport::default();
        let mut hist = stats::new_hist();
        for event in self.recv_all().await? {
            let Event::Opened(r) = event else {
                bail!("expected opened, got {event:?}")
            };
            total.opened += r.opened;
            total.failed += r.failed;
            total.elapsed_ms = total.elapsed_ms.max(r.elapsed_ms);
            stats::merge(&mut total.errors, &r.errors);
            stats::import(&mut hist, &r.hist);
        }
        Ok((total, Percentiles::of(&hist)))
    }

    async fn finish(self) {
        futures_util::future::join_all(self.links.into_iter().map(Link::finish)).await;
    }
}

fn check_fds(per_process: u64, total: u64, procs: u32) -> anyhow::Result<()> {
    let (soft, hard) = limits::raise_nofile();
    limits::check(per_process, total, procs, soft, hard)
}

fn warn_server_fds(pid: Option<u32>, connections: u64) {
    if let Some(limit) = pid.and_then(limits::nofile_of)
        && connections + limits::RESERVED_FDS > limit
    {
        eprintln!(
            "pushgate-bench: warning: the server (pid {}) may open only {limit} files; \
             {connections} connections will not fit (raise its ulimit -n)",
            pid.unwrap_or(0)
        );
    }
}

fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

fn print_rows(title: &str, rows: &[(&str, String)]) {
    println!("{title}");
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn latency_row(p: &Percentiles) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
    )
}

fn counts_row(c: &Counts) -> String {
    if c.is_empty() {
        "none".into()
    } else {
        c.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.2} KiB", bytes / 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Serialize)]
struct IdleResult<'a> {
    bench: &'static str,
    target: &'static str,
    url: &'a str,
    connections: u64,
    opened: u64,
    failed: u64,
    errors: Counts,
    procs: u32,
    concurrency: usize,
    connect_secs: f64,
    connect_rate: f64,
    open_latency: Percentiles,
    alive_at_measure: u64,
    rss_source: String,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    rss_delta_bytes: i64,
    rss_per_connection_bytes: f64,
    rss_settled: bool,
    settle_secs: f64,
}

/// `idle`: open, settle, measure.
pub async fn idle(
    target: &Target,
    url: &str,
    rss_source: &RssSource,
    server_pid: Option<u32>,
    load: &IdleLoad,
) -> anyhow::Result<()> {
    let n = load.connections;
    let procs = load.procs.procs;
    check_fds(n.div_ceil(u64::from(procs)), n, procs)?;
    warn_server_fds(server_pid, n);
    let before = rss::probe(rss_source).await?;
    let concurrency = (load.concurrency / procs as usize).max(1);
    let jobs = split(n, procs)
        .into_iter()
        .map(|(first, connections)| Job::Idle {
            url: url.to_owned(),
            connections,
            first,
            concurrency,
        });
    let mut workers = Workers::spread(target, procs, jobs).await?;
    eprintln!("pushgate-bench: opening {n} connections to {url}");
    let start = Instant::now();
    workers.send_all(&Cmd::Go).await?;
    let (opened, open_latency) = workers.opened().await?;
    let connect_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "pushgate-bench: {} open in {connect_secs:.2}s, waiting for the server's RSS to settle",
        opened.opened
    );
    let settled = rss::settle(rss_source, load.settle_timeout).await;
    workers.send_all(&Cmd::Check).await?;
    let mut alive = 0;
    for event in workers.recv_all().await? {
        if let Event::Alive { alive: a } = event {
            alive += a;
        }
    }
    if !load.hold.is_zero() {
        eprintln!(
            "pushgate-bench: holding the connections for {:?}",
            load.hold
        );
        tokio::time::sleep(load.hold).await;
    }
    workers.finish().await;
    let settled = settled?;
    let delta = settled.bytes as i64 - before as i64;
    let per_conn = if opened.opened > 0 {
        delta as f64 / opened.opened as f64
    } else {
        0.0
    };
    let result = IdleResult {
        bench: "idle",
        target: target.name,
        url,
        connections: n,
        opened: opened.opened,
        failed: opened.failed,
        errors: opened.errors,
        procs,
        concurrency: load.concurrency,
        connect_secs,
        connect_rate: per_second(opened.opened, connect_secs),
        open_latency,
        alive_at_measure: alive,
        rss_source: rss_source.describe(),
        rss_before_bytes: before,
        rss_after_bytes: settled.bytes,
        rss_delta_bytes: delta,
        rss_per_connection_bytes: per_conn,
        rss_settled: settled.settled,
        settle_secs: settled.waited.as_secs_f64(),
    };
    print_rows(
        &format!("idle: {} at {url}", target.name),
        &[
            (
                "connections",
                format!(
                    "{} opened, {} failed ({} asked, {} still open when measured)",
                    result.opened, result.failed, n, alive
                ),
            ),
            ("errors", counts_row(&result.errors)),
            (
                "connect rate",
                format!(
                    "{:.0} conn/s ({:.2} s, concurrency {}, {} process(es))",
                    result.connect_rate, connect_secs, load.concurrency, procs
                ),
            ),
            ("open latency", latency_row(&result.open_latency)),
            ("rss source", result.rss_source.clone()),
            (
                "rss",
                format!(
                    "{} before, {} after ({}, {:.1} s)",
                    mib(before),
                    mib(settled.bytes),
                    if settled.settled {
                        "settled"
                    } else {
                        "NOT settled"
                    },
                    result.settle_secs
                ),
            ),
            (
                "rss per connection",
                format!("{} ({per_conn:.0} bytes)", kib(per_conn)),
            ),
        ],
    );
    print_json(&result)
}

#[derive(Serialize)]
struct ConnectResult<'a> {
    bench: &'static str,
    target: &'static str,
    url: &'a str,
    concurrency: usize,
    procs: u32,
    handshakes: u64,
    failed: u64,
    errors: Counts,
    secs: f64,
    rate: f64,
    latency: Percentiles,
}

/// `connect`: handshake loops.
pub async fn connect(target: &Target, url: &str, load: &ConnectLoad) -> anyhow::Result<()> {
    let procs = load.procs.procs;
    let concurrency = load.concurrency.max(1);
    check_fds(
        (concurrency as u64).div_ceil(u64::from(procs)),
        concurrency as u64,
        procs,
    )?;
    let duration = match (load.duration, load.count) {
        (None, None) => Some(Duration::from_secs(5)),
        (d, _) => d,
    };
    let shares = split(concurrency as u64, procs);
    let counts = load.count.map(|c| split(c, procs));
    let jobs = shares.iter().enumerate().map(|(i, &(_, c))| Job::Connect {
        url: url.to_owned(),
        concurrency: c.max(1) as usize,
        duration_ms: duration.map(|d| d.as_millis() as u64),
        count: counts.as_ref().map(|c| c[i].1),
    });
    let mut workers = Workers::spread(target, procs, jobs).await?;
    eprintln!("pushgate-bench: handshakes against {url}, concurrency {concurrency}");
    workers.send_all(&Cmd::Go).await?;
    let mut hist = stats::new_hist();
    let (mut ok, mut errors, mut secs) = (0, Counts::new(), 0f64);
    for event in workers.recv_all().await? {
        let Event::Connected(r) = event else {
            bail!("expected a connect report, got {event:?}")
        };
        ok += r.ok;
        stats::merge(&mut errors, &r.errors);
        secs = secs.max(r.elapsed_ms / 1e3);
        stats::import(&mut hist, &r.hist);
    }
    workers.finish().await;
    let result = ConnectResult {
        bench: "connect",
        target: target.name,
        url,
        concurrency,
        procs,
        handshakes: ok,
        failed: stats::total(&errors),
        errors,
        secs,
        rate: per_second(ok, secs),
        latency: Percentiles::of(&hist),
    };
    print_rows(
        &format!("connect: {} at {url}", target.name),
        &[
            (
                "handshakes",
                format!(
                    "{} ok, {} failed in {:.2} s",
                    result.handshakes, result.failed, secs
                ),
            ),
            ("errors", counts_row(&result.errors)),
            (
                "rate",
                format!(
                    "{:.0} handshakes/s (concurrency {concurrency}, {procs} process(es))",
                    result.rate
                ),
            ),
            ("latency", latency_row(&result.latency)),
        ],
    );
    print_json(&result)
}

/// How a fan-out's publishers reach the server.
pub enum Publish {
    Bare,
    Ws,
    Http { api_key: String },
    Redis { url: String, prefix: String },
    SocketIo,
}

impl Publish {
    fn name(&self) -> &'static str {
        match self {
            Self::Bare => "text",
            Self::Ws => "ws",
            Self::Http { .. } => "http",
            Self::Redis { .. } => "redis",
            Self::SocketIo => "event",
        }
    }

    pub fn from_args(
        via: Via,
        api_key: Option<String>,
        redis_url: Option<String>,
        prefix: String,
    ) -> anyhow::Result<Self> {
        Ok(match via {
            Via::Ws => Self::Ws,
            Via::Http => Self::Http {
                api_key: api_key.context("--via http needs --api-key (or PUSHGATE_API_KEY)")?,
            },
            Via::Redis => Self::Redis {
                url: redis_url.context("--via redis needs --redis-url (or PUSHGATE_REDIS_URL)")?,
                prefix,
            },
        })
    }
}

/// One step of a fan-out run, over every process.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub step: u64,
    /// Target publish rate, messages/s over all publishers.
    pub rate: f64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: Counts,
    pub send_secs: f64,
    pub send_rate: f64,
    pub subscribers: u64,
    pub alive: u64,
    pub reconnected: u64,
    /// accepted × subscribers.
    pub expected: u64,
    pub received: u64,
    /// expected − received.
    pub loss: i64,
    pub stale: u64,
    pub out_of_order: u64,
    pub other_frames: u64,
    pub secs: f64,
    pub deliveries_per_sec: f64,
    pub latency: Percentiles,
    pub closes: Counts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<bool>,
}

#[derive(Serialize)]
struct FanoutResult<'a> {
    bench: &'static str,
    target: &'static str,
    urls: &'a [String],
    via: &'static str,
    subscribers: u64,
    connected: u64,
    connect_failed: u64,
    connect_errors: Counts,
    publishers: u32,
    payload_size: usize,
    procs: u32,
    decode: &'static str,
    find_max: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_bound_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ok_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ok_deliveries_per_sec: Option<f64>,
    result: StepResult,
    steps: Vec<StepResult>,
}

struct FanoutRun<'a> {
    load: &'a FanoutLoad,
    workers: Workers,
    publishers: Vec<Publisher>,
}

impl FanoutRun<'_> {
    async fn step(&mut self, step: u64, rate: f64) -> anyhow::Result<StepResult> {
        let load = self.load;
        self.workers.send_all(&Cmd::Start { step }).await?;
        let (mut alive, mut reconnected) = (0, 0);
        for event in self.workers.recv_all().await? {
            let Event::Started {
                alive: a,
                reconnected: r,
            } = event
            else {
                bail!("expected started, got {event:?}")
            };
            alive += a;
            reconnected += r;
        }
        let total = load.count.unwrap_or_else(|| {
            let secs = load
                .duration
                .unwrap_or(Duration::from_secs(5))
                .as_secs_f64();
            ((rate * secs).round() as u64).max(1)
        });
        let publishers = self.publishers.len() as u32;
        let per_rate = rate / f64::from(publishers);
        let shares = split(total, publishers);
        let tasks: Vec<_> = std::mem::take(&mut self.publishers)
            .into_iter()
            .zip(shares)
            .map(|(mut p, (_, count))| {
                let (size, quiet) = (load.payload_size, load.drain_timeout);
                tokio::spawn(async move {
                    let report = p.run(step, count, per_rate, size, quiet).await;
                    (p, report)
                })
            })
            .collect();
        let mut reports: Vec<PubReport> = Vec::new();
        for task in tasks {
            let (p, report) = task.await.context("publisher panicked")?;
            self.publishers.push(p);
            reports.push(report);
        }
        self.publishers.sort_by_key(|p| p.index);
        let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
        let mut rejected = Counts::new();
        for r in &reports {
            stats::merge(&mut rejected, &r.rejected);
        }
        let first_send = reports
            .iter()
            .map(|r| r.first_send_ns)
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(0);
        let send_secs = reports.iter().map(|r| r.send_secs).fold(0.0, f64::max);
        let sent: u64 = reports.iter().map(|r| r.sent).sum();
        self.workers
            .send_all(&Cmd::Drain {
                step,
                expected: accepted,
                timeout_ms: load.drain_timeout.as_millis() as u64,
            })
            .await?;
        let mut hist = stats::new_hist();
        let mut seen = StepReport::default();
        let mut last_recv = 0;
        for event in self.workers.recv_all().await? {
            let Event::Step(r) = event else {
                bail!("expected a step report, got {event:?}")
            };
            seen.subscribers += r.subscribers;
            seen.alive += r.alive;
            seen.received += r.received;
            seen.stale += r.stale;
            seen.out_of_order += r.out_of_order;
            seen.other += r.other;
            last_recv = last_recv.max(r.last_recv_ns);
            stats::merge(&mut seen.closes, &r.closes);
            stats::import(&mut hist, &r.hist);
        }
        let secs = if last_recv > first_send && first_send > 0 {
            (last_recv - first_send) as f64 / 1e9
        } else {
            0.0
        };
        let expected = accepted * seen.subscribers;
        Ok(StepResult {
            step,
            rate,
            sent,
            accepted,
            rejected,
            send_secs,
            send_rate: per_second(sent, send_secs),
            subscribers: seen.subscribers,
            alive: alive.min(seen.subscribers),
            reconnected,
            expected,
            received: seen.received,
            loss: expected as i64 - seen.received as i64,
            stale: seen.stale,
            out_of_order: seen.out_of_order,
            other_frames: seen.other,
            secs,
            deliveries_per_sec: per_second(seen.received, secs),
            latency: Percentiles::of(&hist),
            closes: seen.closes,
            pass: None,
        })
    }
}

/// Whether the publishers kept the step's rate: done within 5 % (and 50 ms) of the schedule.
fn on_pace(r: &StepResult) -> bool {
    let scheduled = r.sent.saturating_sub(1) as f64 / r.rate;
    r.send_secs <= scheduled * 1.05 + 0.05
}

/// Whether a `--find-max` step is good: nothing lost or refused, on pace, p99 within bound.
fn passes(r: &StepResult, p99_bound: Duration) -> bool {
    r.loss == 0
        && r.accepted == r.sent
        && stats::total(&r.rejected) == 0
        && r.alive == r.subscribers
        && on_pace(r)
        && r.latency.p99_ms <= p99_bound.as_secs_f64() * 1e3
}

/// `fanout`: subscribers in the workers, publishers here.
pub async fn fanout(
    target: &Target,
    urls: &[String],
    publish: Publish,
    full_decode: bool,
    load: &FanoutLoad,
) -> anyhow::Result<()> {
    if urls.is_empty() {
        bail!("no --url given");
    }
    if load.payload_size < crate::payload::MIN_SIZE {
        bail!(
            "--payload-size must be at least {} (room for the timestamp)",
            crate::payload::MIN_SIZE
        );
    }
    if load.publishers == 0 {
        bail!("--publishers must be at least 1");
    }
    if load.find_max && load.step_factor <= 1.0 {
        bail!("--step-factor must be above 1");
    }
    if load.find_max && load.steps > 1 {
        bail!("--steps repeats one rate: it does not go with --find-max");
    }
    let procs = load.procs.procs;
    let s = load.subscribers;
    let publishers = u64::from(load.publishers);
    let per_process = s.div_ceil(u64::from(procs)) + if procs == 1 { publishers } else { 0 };
    check_fds(per_process.max(publishers), s + publishers, procs)?;
    if matches!(publish, Publish::Ws) && load.rate / publishers as f64 > 100.0 {
        eprintln!(
            "pushgate-bench: note: {:.0} publishes/s per publisher connection is above a node's \
             default --client-rate (100/s); start the nodes with a higher --client-rate and \
             --client-burst, or add --publishers",
            load.rate / publishers as f64
        );
    }
    let concurrency = (load.concurrency / procs as usize).max(1);
    let jobs = split(s, procs)
        .into_iter()
        .map(|(first, subscribers)| Job::Fanout {
            urls: urls.to_vec(),
            subscribers,
            first,
            concurrency,
            publishers: load.publishers,
            full_decode,
        });
    let mut workers = Workers::spread(target, procs, jobs).await?;
    eprintln!(
        "pushgate-bench: connecting {s} subscribers over {} node(s)",
        urls.len()
    );
    workers.send_all(&Cmd::Go).await?;
    let (opened, _) = workers.opened().await?;
    if opened.opened == 0 && s > 0 {
        workers.finish().await;
        bail!(
            "no subscriber could connect: {}",
            counts_row(&opened.errors)
        );
    }
    if opened.failed > 0 {
        eprintln!(
            "pushgate-bench: warning: {} subscribers failed to connect ({}); they count as loss",
            opened.failed,
            counts_row(&opened.errors)
        );
    }
    let mut pubs = Vec::new();
    for p in 0..load.publishers {
        let url = &urls[p as usize % urls.len()];
        pubs.push(match &publish {
            Publish::Bare => Publisher::bare(p, url).await?,
            Publish::Ws => {
                let Protocol::Pushgate { token } = &target.protocol else {
                    bail!("pushgate publishers need a token");
                };
                let token = token.mint(&format!("bench-pub-{p}"), &[], &[&target.channel])?;
                Publisher::ws(p, url, &token, &target.channel).await?
            }
            Publish::Http { api_key } => {
                Publisher::http(p, &http_base(url)?, api_key, &target.channel)?
            }
            Publish::Redis { url, prefix } => {
                Publisher::redis(p, url, prefix, &target.channel).await?
            }
            Publish::SocketIo => Publisher::socketio(p, url, &target.channel).await?,
        });
    }
    let mut run = FanoutRun {
        load,
        workers,
        publishers: pubs,
    };
    let outcome = fanout_steps(&mut run, load).await;
    for p in std::mem::take(&mut run.publishers) {
        p.close().await;
    }
    run.workers.finish().await;
    let (steps, best) = outcome?;
    let result = match best {
        Some(i) => steps[i].clone(),
        None => steps[0].clone(),
    };
    let out = FanoutResult {
        bench: "fanout",
        target: target.name,
        urls,
        via: publish.name(),
        subscribers: s,
        connected: opened.opened,
        connect_failed: opened.failed,
        connect_errors: opened.errors,
        publishers: load.publishers,
        payload_size: load.payload_size,
        procs,
        decode: match (&target.protocol, full_decode) {
            (Protocol::Bare, _) => "raw",
            (Protocol::SocketIo, _) | (Protocol::Pushgate { .. }, false) => "lean",
            (Protocol::Pushgate { .. }, true) => "full",
        },
        find_max: load.find_max,
        p99_bound_ms: load.find_max.then_some(load.p99_bound.as_secs_f64() * 1e3),
        max_ok_rate: best.map(|i| steps[i].rate).filter(|_| load.find_max),
        max_ok_deliveries_per_sec: best
            .map(|i| steps[i].deliveries_per_sec)
            .filter(|_| load.find_max),
        result,
        steps,
    };
    print_fanout(&out);
    print_json(&out)
}

/// Runs the single step, or the `--find-max` search. Returns the steps and the best one.
async fn fanout_steps(
    run: &mut FanoutRun<'_>,
    load: &FanoutLoad,
) -> anyhow::Result<(Vec<StepResult>, Option<usize>)> {
    let mut steps = Vec::new();
    if !load.find_max {
        for n in 1..=load.steps {
            steps.push(run.step(u64::from(n), load.rate).await?);
        }
        return Ok((steps, Some(0)));
    }
    let try_rate = |steps: &mut Vec<StepResult>, r: StepResult| {
        let ok = passes(&r, load.p99_bound);
        eprintln!(
            "pushgate-bench: step {} at {:.0} msg/s: {} (loss {}, p99 {:.3} ms, {:.0} deliveries/s)",
            r.step,
            r.rate,
            if ok { "ok" } else { "FAIL" },
            r.loss,
            r.latency.p99_ms,
            r.deliveries_per_sec
        );
        steps.push(StepResult {
            pass: Some(ok),
            ..r
        });
        ok
    };
    let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
    let mut best = None;
    let mut rate = load.rate.min(load.max_rate);
    let mut n = 0;
    loop {
        n += 1;
        let r = run.step(n, rate).await?;
        if try_rate(&mut steps, r) {
            good = Some(rate);
            best = Some(steps.len() - 1);
            if rate >= load.max_rate {
                break;
            }
            rate = (rate * load.step_factor).min(load.max_rate);
        } else {
            bad = Some(rate);
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        for _ in 0..load.refine {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mid = (lo + hi) / 2.0;
            n += 1;
            let r = run.step(n, mid).await?;
            if try_rate(&mut steps, r) {
                lo = mid;
                best = Some(steps.len() - 1);
            } else {
                hi = mid;
            }
        }
    }
    Ok((steps, best))
}

fn print_fanout(out: &FanoutResult<'_>) {
    println!(
        "fanout: {} at {} node(s), via {}, {} subscribers ({} connected), {} publisher(s), \
         payload {} B, decode {}, {} process(es)",
        out.target,
        out.urls.len(),
        out.via,
        out.subscribers,
        out.connected,
        out.publishers,
        out.payload_size,
        out.decode,
        out.procs
    );
    println!(
        "  {:>4} {:>9} {:>8} {:>8} {:>10} {:>10} {:>7} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>4}",
        "step",
        "rate/s",
        "sent",
        "accepted",
        "expected",
        "received",
        "loss",
        "deliv/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ok"
    );
    for r in &out.steps {
        println!(
            "  {:>4} {:>9.0} {:>8} {:>8} {:>10} {:>10} {:>7} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>4}",
            r.step,
            r.rate,
            r.sent,
            r.accepted,
            r.expected,
            r.received,
            r.loss,
            r.deliveries_per_sec,
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.latency.max_ms,
            match r.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
        let mut notes = Vec::new();
        if !r.rejected.is_empty() {
            notes.push(format!("rejected: {}", counts_row(&r.rejected)));
        }
        if !r.closes.is_empty() {
            notes.push(format!("subscribers closed: {}", counts_row(&r.closes)));
        }
        if r.stale + r.out_of_order + r.other_frames > 0 {
            notes.push(format!(
                "stale {}, out of order {}, other frames {}",
                r.stale, r.out_of_order, r.other_frames
            ));
        }
        if !on_pace(r) {
            notes.push(format!(
                "publishers fell behind: {:.0} msg/s sent",
                r.send_rate
            ));
        }
        if r.reconnected > 0 {
            notes.push(format!("{} subscribers reconnected", r.reconnected));
        }
        for note in notes {
            println!("       {note}");
        }
    }
    if out.find_max {
        match (out.max_ok_rate, out.max_ok_deliveries_per_sec) {
            (Some(rate), Some(dps)) => println!(
                "  highest rate with zero loss and p99 <= {:.1} ms: {rate:.0} msg/s ({dps:.0} deliveries/s)",
                out.p99_bound_ms.unwrap_or(0.0)
            ),
            _ => println!(
                "  no rate passed (zero loss, p99 <= {:.1} ms): try a lower --rate",
                out.p99_bound_ms.unwrap_or(0.0)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything() {
        assert_eq!(split(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(split(2, 4), vec![(0, 1), (1, 1), (2, 0), (2, 0)]);
        assert_eq!(split(5, 1), vec![(0, 5)]);
    }

    #[test]
    fn http_bases() {
        assert_eq!(
            http_base("ws://127.0.0.1:8080/ws").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            http_base("wss://example.com/ws?x=1").unwrap(),
            "https://example.com"
        );
        assert_eq!(http_base("ws://h:1").unwrap(), "http://h:1");
        assert!(http_base("http://h/").is_err());
    }
}
