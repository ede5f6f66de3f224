//! pushgate: a horizontally scalable WebSocket push gateway node.
//!
//! Module map: [`config`] (flags and environment), [`auth`] (tokens), [`hub`] (local sessions
//! and fan-out), [`broker`] (embedded or Redis), [`node`] (what a node does with a message),
//! [`session`] (one connection), [`http`] (handshakes and the server API), [`server`]
//! (binding, serving, draining), [`metrics`].
#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod server;
pub mod session;

pub use config::ServeArgs;
pub use server::Server;
