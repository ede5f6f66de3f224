use std::fmt;
use std::time::Duration;

use pushgate_protocol::ErrorCode;

/// Why the client stopped for good. After this it neither connects nor reconnects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// [`Client::close`](crate::Client::close) was called, or every `Client` handle was dropped.
    Closed,
    /// The node closed the connection with 4003 (`/api/disconnect`) and the token source had no
    /// new token.
    Disconnected { reason: String },
    /// The node closed the connection with 4001 (token expired) and the client has a fixed
    /// token, so there is no new one to connect with.
    TokenExpired,
    /// The handshake was refused with 401 or 403 and the token source had no new token.
    Unauthorized { status: u16, reason: String },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("closed by the application"),
            Self::Disconnected { reason } => {
                write!(f, "disconnected by the server (4003 {reason})")
            }
            Self::TokenExpired => f.write_str("token expired (4001) and no token source"),
            Self::Unauthorized { status, reason } => {
                write!(f, "handshake refused ({status} {reason})")
            }
        }
    }
}

/// Errors of [`Client`](crate::Client) operations.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("no token: call ClientBuilder::token or ClientBuilder::token_source")]
    NoToken,
    #[error("the token cannot be sent in an HTTP header (control characters?)")]
    InvalidToken,
    #[error("the client must be built inside a tokio runtime")]
    NoRuntime,
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    #[error("not connected")]
    NotConnected,
    #[error("the connection ended before the reply")]
    ConnectionLost,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The node answered the request with an error frame.
    #[error("{code:?}: {message}")]
    Rejected { code: ErrorCode, message: String },
    /// The client has stopped; see [`CloseReason`].
    #[error("client closed: {0}")]
    Closed(CloseReason),
    #[error("payload is not JSON: {0}")]
    Json(String),
    #[error("TLS: {0}")]
    Tls(String),
}
