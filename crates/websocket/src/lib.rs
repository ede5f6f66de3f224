//! WebSocket framing (RFC 6455) and permessage-deflate (RFC 7692) without IO.
//!
//! The caller owns sockets, buffers and timers; this crate turns bytes into
//! messages and messages into bytes. It is built for a push gateway that fans
//! one message out to many connections:
//!
//! - [`SharedFrame`] formats a message once per node and compresses it at most
//!   once (we always negotiate `server_no_context_takeover`, so the compressed
//!   bytes do not depend on the connection). [`write_batch`] joins several of
//!   them into one message without recompressing.
//! - [`FrameReader`] keeps no compression state: a client message is inflated
//!   by its thread's one inflater (we always negotiate
//!   `client_no_context_takeover`), so an idle connection costs a few dozen
//!   bytes.
//! - [`negotiate`] answers the `Sec-WebSocket-Extensions` offer.
#![forbid(unsafe_code)]

mod deflate;
pub mod frame;
mod negotiate;
mod reader;
mod utf8;

use std::fmt;

pub use deflate::{Compression, Encoding, SharedFrame, write_batch};
pub use negotiate::{Deflate, negotiate};
pub use reader::{Config, FrameReader, Incoming};

/// Why the connection must be failed, and the close code to send (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Close code for the close frame sent before dropping the connection.
    pub code: u16,
    /// Short reason, fit for the close frame and for logs.
    pub reason: &'static str,
}

impl Violation {
    /// 1002: the peer broke the framing rules.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: the payload is not what its type promises (bad UTF-8, bad deflate data).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1009: the message is larger than the caller accepts.
    pub const TOO_BIG: u16 = 1009;

    pub(crate) const fn protocol(reason: &'static str) -> Self {
        Self {
            code: Self::PROTOCOL_ERROR,
            reason,
        }
    }

    pub(crate) const fn invalid(reason: &'static str) -> Self {
        Self {
            code: Self::INVALID_PAYLOAD,
            reason,
        }
    }

    pub(crate) const fn too_big(reason: &'static str) -> Self {
        Self {
            code: Self::TOO_BIG,
            reason,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "websocket violation {}: {}", self.code, self.reason)
    }
}

impl std::error::Error for Violation {}
