//! The baseline: a bare broadcast server on the same stack as pushgate (tokio + tungstenite), with
//! no auth, no JSON and no Redis. Every text message a client sends goes to every connected
//! client. It is built to be a good ceiling, not a straw man: 4 KiB read buffers, a bounded
//! queue per connection, one shared copy of each message (`Utf8Bytes` clones are reference
//! counts), batched writes, Nagle off, a deep listen backlog.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::cli::BaselineServerArgs;

/// The same backlog pushgate listens with: bursts of handshakes must not hit a short queue.
const LISTEN_BACKLOG: u32 = 4096;

/// Most queued messages written in one go before flushing.
const WRITE_BATCH: usize = 64;

struct Hub {
    next: AtomicU64,
    clients: RwLock<HashMap<u64, mpsc::Sender<Message>>>,
}

impl Hub {
    /// Queues `message` for everyone; a client whose queue is full is dropped (closed with 4008
    /// once it has written what it has), as a slow consumer.
    fn broadcast(&self, message: &Message) {
        let mut slow = Vec::new();
        {
            let clients = self.clients.read().unwrap_or_else(|p| p.into_inner());
            for (id, tx) in clients.iter() {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(message.clone()) {
                    slow.push(*id);
                }
            }
        }
        if !slow.is_empty() {
            let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
            for id in slow {
                clients.remove(&id);
            }
        }
    }

    fn remove(&self, id: u64) {
        self.clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

/// `pushgate-bench baseline-server`: serves until killed. Prints `listening <addr>` once bound.
pub async fn serve(args: BaselineServerArgs) -> anyhow::Result<()> {
    crate::limits::raise_nofile();
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    println!("listening {}", listener.local_addr()?);
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .write_buffer_size(args.read_buffer)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let hub = Arc::new(Hub {
        next: AtomicU64::new(0),
        clients: RwLock::new(HashMap::new()),
    });
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                eprintln!("baseline-server: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(tcp, hub.clone(), config, args.queue));
    }
}

async fn connection(tcp: TcpStream, hub: Arc<Hub>, config: WebSocketConfig, queue: usize) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await else {
        return;
    };
    let id = hub.next.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(queue.max(1));
    hub.clients
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, tx);
    loop {
        tokio::select! {
            queued = rx.recv() => {
                let Some(message) = queued else {
                    // Dropped from the hub as a slow consumer.
                    let _ = ws
                        .close(Some(CloseFrame { code: CloseCode::Library(4008), reason: "slow consumer".into() }))
                        .await;
                    return;
                };
                let mut result = ws.feed(message).await;
                let mut batch = 1;
                while result.is_ok() && batch < WRITE_BATCH {
                    let Ok(message) = rx.try_recv() else { break };
                    result = ws.feed(message).await;
                    batch += 1;
                }
                if result.is_err() || ws.flush().await.is_err() {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(message @ Message::Text(_))) => hub.broadcast(&message),
                Some(Ok(Message::Close(_))) => {
                    let _ = ws.close(None).await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    hub.remove(id);
}

/// A baseline server running as a child process of the bench, so that its memory is its own.
pub struct Child {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl Child {
    pub async fn start() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["baseline-server", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the baseline server")?;
        let pid = child.id().context("baseline server pid")?;
        let stdout = child.stdout.take().context("baseline server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .context("the baseline server did not start in 10 s")??
            .context("the baseline server exited at start")?;
        let addr = line
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("baseline server said {line:?}"))?;
        Ok(Self { child, addr, pid })
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
