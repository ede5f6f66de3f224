//! Publishers: paced senders of timestamped payloads, over a pushgate client connection, the
//! HTTP API, plain Redis `PUBLISH`, a bare text message to the baseline server, or a Socket.IO
//! `pub` event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::SinkExt;
use futures_util::stream::{SplitSink, StreamExt};
use pushgate_protocol::server::ServerFrame;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::{self, Ws};
use crate::payload;
use crate::socketio;
use crate::stats::{self, Counts};

/// Most messages sent back to back before the pacing loop looks at the clock again.
const MAX_BURST: u64 = 256;

pub enum Via {
    /// `{"type":"publish",...}` on a pushgate connection; the node acks each one.
    Ws {
        sink: SplitSink<Ws, Message>,
        acks: Arc<Acks>,
        reader: JoinHandle<()>,
        next_id: u64,
        channel_json: String,
    },
    /// `POST /api/publish`.
    Http {
        http: reqwest::Client,
        url: String,
        bearer: String,
        channel_json: String,
    },
    /// `PUBLISH <prefix>:ch:<channel> {"data":...}`.
    Redis {
        conn: redis::aio::MultiplexedConnection,
        key: String,
    },
    /// The baseline server: the payload itself as a text message.
    Bare {
        sink: SplitSink<Ws, Message>,
        reader: JoinHandle<()>,
    },
    /// `42<id>["pub",{"room":...,"data":...}]` on a Socket.IO connection; the server acks each
    /// one. The reader answers the server's pings on the same sink, hence the lock.
    SocketIo {
        sink: Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>,
        acks: Arc<Acks>,
        reader: JoinHandle<()>,
        next_id: u64,
        room_json: String,
    },
}

/// What the node answered to a publisher's requests so far.
#[derive(Default)]
pub struct Acks {
    acked: AtomicU64,
    errors: Mutex<Counts>,
    answered: AtomicU64,
}

pub struct Publisher {
    pub index: u32,
    pub via: Via,
}

/// One publisher's share of a step.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PubReport {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: Counts,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub send_secs: f64,
}

impl Publisher {
    /// A pushgate client allowed to publish to `channel`.
    pub async fn ws(index: u32, url: &str, token: &str, channel: &str) -> anyhow::Result<Self> {
        let ws = client::open(url, Some(token), None)
            .await
            .map_err(|e| anyhow::anyhow!("publisher {index} could not connect to {url}: {e}"))?;
        let (sink, mut stream) = ws.split();
        let acks = Arc::new(Acks::default());
        let counted = acks.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                match ServerFrame::decode(&text) {
                    Ok(ServerFrame::Ack { .. }) => {
                        counted.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ServerFrame::Error { code, .. }) => {
                        stats::bump(
                            &mut counted.errors.lock().unwrap_or_else(|p| p.into_inner()),
                            client::code_name(code),
                        );
                    }
                    _ => continue,
                }
                counted.answered.fetch_add(1, Ordering::Release);
            }
        });
        Ok(Self {
            index,
            via: Via::Ws {
                sink,
                acks,
                reader,
                next_id: 1,
                channel_json: serde_json::to_string(channel)?,
            },
        })
    }

    pub fn http(index: u32, base: &str, api_key: &str, channel: &str) -> anyhow::Result<Self> {
        Ok(Self {
            index,
            via: Via::Http {
                http: reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .build()
                    .context("HTTP client")?,
                url: format!("{base}/api/publish"),
                bearer: format!("Bearer {api_key}"),
                channel_json: serde_json::to_string(channel)?,
            },
        })
    }

    pub async fn redis(index: u32, url: &str, prefix: &str, channel: &str) -> anyhow::Result<Self> {
        let conn = redis::Client::open(url)
            .with_context(|| format!("redis URL {url}"))?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Self {
            index,
            via: Via::Redis {
                conn,
                key: format!("{prefix}:ch:{channel}"),
            },
        })
    }

    /// A baseline client; what the server broadcasts back to it is read and dropped.
    pub async fn bare(index: u32, url: &str) -> anyhow::Result<Self> {
        let ws = client::open(url, None, None)
            .await
            .map_err(|e| anyhow::anyhow!("publisher {index} could not connect to {url}: {e}"))?;
        let (sink, mut stream) = ws.split();
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        Ok(Self {
            index,
            via: Via::Bare { sink, reader },
        })
    }

    /// A Socket.IO client that emits `pub` events for `room` (it does not join it).
    pub async fn socketio(index: u32, url: &str, room: &str) -> anyhow::Result<Self> {
        let ws = socketio::open(url, None)
            .await
            .map_err(|e| anyhow::anyhow!("publisher {index} could not connect to {url}: {e}"))?;
        let (sink, mut stream) = ws.split();
        let sink = Arc::new(tokio::sync::Mutex::new(sink));
        let acks = Arc::new(Acks::default());
        let (counted, pong) = (acks.clone(), sink.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                if text.as_str() == socketio::PING {
                    let mut sink = pong.lock().await;
                    if sink.send(Message::text(socketio::PONG)).await.is_err() {
                        return;
                    }
                } else if socketio::ack_id(&text).is_some() {
                    counted.acked.fetch_add(1, Ordering::Relaxed);
                    counted.answered.fetch_add(1, Ordering::Release);
                }
            }
        });
        Ok(Self {
            index,
            via: Via::SocketIo {
                sink,
                acks,
                reader,
                next_id: 1,
                room_json: serde_json::to_string(room)?,
            },
        })
    }

    /// What the server answered so far, for publishers whose every publish gets an answer.
    fn acks(&self) -> Option<&Acks> {
        match &self.via {
            Via::Ws { acks, .. } | Via::SocketIo { acks, .. } => Some(acks),
            Via::Http { .. } | Via::Redis { .. } | Via::Bare { .. } => None,
        }
    }

    /// Sends `count` messages of `step` at `rate` per second, then waits (up to `quiet` without
    /// progress) for the node's answers to them.
    pub async fn run(
        &mut self,
        step: u64,
        count: u64,
        rate: f64,
        size: usize,
        quiet: Duration,
    ) -> PubReport {
        let mut report = PubReport {
            first_send_ns: u64::MAX,
            ..PubReport::default()
        };
        let (acked0, answered0, errors0) = match self.acks() {
            Some(acks) => (
                acks.acked.load(Ordering::Relaxed),
                acks.answered.load(Ordering::Acquire),
                acks.errors.lock().map(|e| e.clone()).unwrap_or_default(),
            ),
            None => (0, 0, Counts::new()),
        };
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < count {
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1)
                .min(count)
                .min(sent + MAX_BURST);
            if due > sent {
                self.burst(step, sent..due, size, &mut report).await;
                sent = due;
            }
            if sent < count {
                let next = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next.into()).await;
            }
        }
        report.send_secs = start.elapsed().as_secs_f64();
        if let Some(acks) = self.acks() {
            // Every publish gets an ack or an error; wait for them before counting.
            let (mut last, mut since) = (u64::MAX, Instant::now());
            loop {
                let answered = acks.answered.load(Ordering::Acquire) - answered0;
                if answered >= report.sent {
                    break;
                }
                if answered != last {
                    (last, since) = (answered, Instant::now());
                } else if since.elapsed() >= quiet {
                    let missing = report.sent - answered;
                    *report.rejected.entry("no answer".into()).or_default() += missing;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            report.accepted = acks.acked.load(Ordering::Relaxed) - acked0;
            let errors = acks.errors.lock().map(|e| e.clone()).unwrap_or_default();
            for (reason, n) in errors {
                let before = errors0.get(&reason).copied().unwrap_or(0);
                if n > before {
                    *report.rejected.entry(reason).or_default() += n - before;
                }
            }
        }
        if report.first_send_ns == u64::MAX {
            report.first_send_ns = 0;
        }
        report
    }

    async fn burst(
        &mut self,
        step: u64,
        seqs: std::ops::Range<u64>,
        size: usize,
        report: &mut PubReport,
    ) {
        let index = self.index;
        let stamp = |seq: u64| payload::make(step, index, seq, payload::unix_ns(), size);
        let n = seqs.end - seqs.start;
        report.first_send_ns = report.first_send_ns.min(payload::unix_ns());
        match &mut self.via {
            Via::Ws {
                sink,
                next_id,
                channel_json,
                ..
            } => {
                let frames = seqs.map(|seq| {
                    let id = *next_id;
                    *next_id += 1;
                    format!(
                        r#"{{"type":"publish","id":{id},"channel":{channel_json},"data":{}}}"#,
                        stamp(seq)
                    )
                });
                let result = send_all(sink, frames).await;
                report.sent += n;
                if let Err(e) = result {
                    stats::bump(&mut report.rejected, client::describe(&e));
                }
            }
            Via::SocketIo {
                sink,
                next_id,
                room_json,
                ..
            } => {
                let frames = seqs.map(|seq| {
                    let id = *next_id;
                    *next_id += 1;
                    socketio::publish_frame(id, room_json, &stamp(seq))
                });
                let result = send_all(&mut *sink.lock().await, frames).await;
                report.sent += n;
                if let Err(e) = result {
                    stats::bump(&mut report.rejected, client::describe(&e));
                }
            }
            Via::Bare { sink, .. } => {
                let result = send_all(sink, seqs.map(stamp)).await;
                report.sent += n;
                match result {
                    Ok(()) => report.accepted += n,
                    Err(e) => {
                        *report.rejected.entry(client::describe(&e)).or_default() += n;
                    }
                }
            }
            Via::Http {
                http,
                url,
                bearer,
                channel_json,
            } => {
                for seq in seqs {
                    let body = format!(r#"{{"channel":{channel_json},"data":{}}}"#, stamp(seq));
                    report.sent += 1;
                    let response = http
                        .post(url.as_str())
                        .header(reqwest::header::AUTHORIZATION, bearer.as_str())
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body)
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            report.accepted += 1;
                        }
                        Ok(r) => stats::bump(
                            &mut report.rejected,
                            format!("http {}", r.status().as_u16()),
                        ),
                        Err(e) => stats::bump(&mut report.rejected, format!("http: {e}")),
                    }
                }
            }
            Via::Redis { conn, key } => {
                let mut pipe = redis::pipe();
                for seq in seqs {
                    pipe.cmd("PUBLISH")
                        .arg(key.as_str())
                        .arg(format!(r#"{{"data":{}}}"#, stamp(seq)));
                }
                report.sent += n;
                match pipe.query_async::<Vec<i64>>(conn).await {
                    Ok(_) => report.accepted += n,
                    Err(e) => {
                        *report
                            .rejected
                            .entry(format!("redis: {:?}", e.kind()))
                            .or_default() += n;
                    }
                }
            }
        }
        report.last_send_ns = payload::unix_ns();
    }

    pub async fn close(self) {
        match self.via {
            Via::Ws {
                mut sink, reader, ..
            }
            | Via::Bare {
                mut sink, reader, ..
            } => {
                let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
                reader.abort();
            }
            Via::SocketIo { sink, reader, .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    sink.lock().await.close().await
                })
                .await;
                reader.abort();
            }
            Via::Http { .. } | Via::Redis { .. } => {}
        }
    }
}

/// Writes `frames` back to back and flushes once, so that a burst goes out in as few sends as
/// the write buffer allows.
async fn send_all(
    sink: &mut SplitSink<Ws, Message>,
    frames: impl Iterator<Item = String>,
) -> Result<(), tungstenite::Error> {
    for frame in frames {
        sink.feed(Message::text(frame)).await?;
    }
    sink.flush().await
}
