//! Binding, serving and stopping a node.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::info;

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
    pub async fn bind(config: ServeArgs) -> anyhow::Result<Self> {
        let verifier = Verifier::from_args(&config.jwt)?;
        let listener = listen(config.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let node = Node::start(config, verifier)?;
        Ok(Self { listener, node })
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
        info!(addr = %self.local_addr(), node = %node.instance, "pushgate listening");
        // The trace layer logs method and path only: a query string can carry a token.
        // 503s from /readyz polls during an outage or a drain are expected: not errors.
        let app = http::router(node.clone()).layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
                })
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        );
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
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
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(drained.cancelled_owned())
        .await?;
        info!("pushgate stopped");
        Ok(())
    }
}
