//! pushgate: a horizontally scalable WebSocket push gateway node.
//!
//! Module map: [`config`] (flags and environment), [`auth`] (tokens), [`jwks`] (signing keys
//! from a JWKS URL), [`hub`] (local sessions and fan-out), [`history`] (history rules, in-memory
//! history), [`broker`] (embedded or Redis), [`node`] (what a node does with a message),
//! [`session`] (one connection, WebSocket or SSE), [`sse`] (the SSE transport), [`http`]
//! (handshakes and the server API), [`server`] (binding, serving, draining), [`tls`] (native
//! TLS), [`proxy`] (client addresses behind trusted proxies), [`metrics`].
#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod config;
pub mod history;
pub mod http;
pub mod hub;
pub mod jwks;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod server;
pub mod session;
pub mod sse;
pub mod tls;
pub mod ws;

pub use config::ServeArgs;
pub use server::Server;

/// Locks `m`, also after a panic elsewhere poisoned it: every value behind these mutexes stays
/// whole (no update spans a panic point).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
