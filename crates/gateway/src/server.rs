//! Binding, serving and stopping a node.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::config::ServeArgs;
use crate::http;
use crate::node::Node;

/// Pending connections the kernel queues for us. Reconnect storms arrive in bursts far larger
/// than the common default of 128.
const LISTEN_BACKLOG: u32 = 4096;

pub struct Server {
    listener: TcpListener,
    node: Arc<Node>,
    /// Set with --tls-cert and --tls-key: the node serves HTTPS and wss:// itself.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Raises the soft limit on open files to the hard limit (every connection holds a
/// descriptor; the soft limit is often 1024) and logs the limit in force. Warns when it is
/// below `max_connections`: accepts would then fail before the connection limit is reached.
pub fn raise_open_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            info!(limit, "open-file limit");
            // Room for the listener, Redis connections, logs and the runtime.
            let needed = (max_connections as u64).saturating_add(64);
            if limit < needed {
                warn!(
                    limit,
                    max_connections,
                    "the open-file limit is below --max-connections: raise the hard limit \
                     (LimitNOFILE, ulimits, ulimit -Hn) or lower --max-connections"
                );
            }
        }
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// The URL other nodes can reach a listener on: known when it listens on a specific IP.
fn advertised(addr: SocketAddr, tls: bool) -> Option<reqwest::Url> {
    if addr.ip().is_unspecified() {
        return None;
    }
    let scheme = if tls { "https" } else { "http" };
    reqwest::Url::parse(&format!("{scheme}://{addr}")).ok()
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Server {
    /// Binds the listener and starts the node (and its broker).
    pub async fn bind(mut config: ServeArgs) -> anyhow::Result<Self> {
        let verifier = Verifier::from_args(&config.jwt)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
            _ => None,
        };
        let listener = listen(config.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        if config.advertise_url.is_none() {
            config.advertise_url = advertised(listener.local_addr()?, tls.is_some());
        }
        let node = Node::start(config, verifier)?;
        if let Some(jwks) = node.verifier.jwks() {
            // The first fetch, waited for within its timeout; then background refreshes.
            jwks.start(node.shutdown.clone()).await;
        }
        node.metrics
            .connections_limit
            .set(i64::try_from(node.config.max_connections).unwrap_or(i64::MAX));
        Ok(Self {
            listener,
            node,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until `stop` resolves, then drains: refuses new connections, closes open ones
    /// over the drain period, and returns.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let node = self.node.clone();
        let tls = self.tls.is_some();
        info!(addr = %self.local_addr(), node = %node.instance, tls, "pushgate listening");
        let trusted = node.config.trusted_proxies.clone();
        // The trace layer logs method and path only: a query string can carry a token.
        // 503s from /readyz polls during an outage or a drain are expected: not errors.
        let app = http::router(node.clone()).layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &axum::http::Request<_>| {
                    // The client's address (behind a trusted proxy, the one it reports);
                    // computed only when the span is recorded.
                    let client = || {
                        let ConnectInfo(peer) =
                            req.extensions().get::<ConnectInfo<SocketAddr>>()?;
                        Some(crate::proxy::client_ip(&trusted, peer.ip(), req.headers()))
                    };
                    tracing::debug_span!(
                        "http",
                        method = %req.method(),
                        path = %req.uri().path(),
                        client = ?client(),
                    )
                })
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        );
        let drained = tokio_util::sync::CancellationToken::new();
        let drain = {
            let node = node.clone();
            let drained = drained.clone();
            async move {
                stop.await;
                node.drain().await;
                node.shutdown.cancel();
                drained.cancel();
            }
        };
        tokio::spawn(drain);
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        match self.tls {
            None => {
                let listener = self.listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, service)
                    .with_graceful_shutdown(drained.cancelled_owned())
                    .await?;
            }
            Some(config) => {
                // tap_io also gives the listener axum's ConnectInfo<SocketAddr>.
                let listener = crate::tls::TlsListener::new(self.listener, config)?.tap_io(
                    |tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
                        let _ = tls.get_ref().0.set_nodelay(true);
                    },
                );
                axum::serve(listener, service)
                    .with_graceful_shutdown(drained.cancelled_owned())
                    .await?;
            }
        }
        info!("pushgate stopped");
        Ok(())
    }
}
