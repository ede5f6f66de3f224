//! The WebSocket layer of `/ws` and `/echo`: the handshake (permessage-deflate, the batch
//! subprotocol), and a socket over hyper's upgraded connection that frames, compresses and
//! batches with [`pushgate_websocket`].
//!
//! Sessions see a `Stream` + `Sink` of [`Message`]. A delivery is a [`Message::Shared`]: the
//! frame every recipient shares, so that on connections that negotiated deflate it is
//! compressed once per node, not once per connection. An idle connection holds no read or
//! write buffer and no compression state: reads go through a buffer on the stack, writes
//! through one dropped once written, and client messages are inflated with the worker
//! thread's inflater (we ask for `client_no_context_takeover`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use pushgate_websocket::{
    Config, Encoding, FrameReader, Incoming, SharedFrame, Violation, frame, write_batch,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hub::Frame;
use pushgate_protocol::BATCH_PROTOCOL;

pub use axum::extract::ws::{CloseFrame, Utf8Bytes};

/// The most payload bytes joined into one batch: a batch stays within what clients accept as one
/// message.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Past this many bytes waiting in a connection's write buffer, the socket takes no more until
/// some are written: the session's write timeout then deals with a client that reads too slowly.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Bytes read from the socket at a time, through a buffer on the stack.
const READ_CHUNK: usize = 4096;

/// A message to or from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    Close(Option<CloseFrame>),
    /// A delivery, shared by every connection it goes to: sockets send its frame, compressed
    /// once for all of them; the SSE stream its text.
    Shared(Frame),
}

/// Why a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client broke the protocol: close with this violation's code.
    #[error(transparent)]
    Violation(#[from] Violation),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What `/ws` and `/echo` offer at the handshake.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Negotiate permessage-deflate when the client offers it (`--compression`).
    pub compression: bool,
    /// Largest message a client may send; larger ones close the connection with 1009.
    pub max_message: usize,
    /// Counts the messages a socket compresses first.
    pub compressions: Counter,
}

/// A WebSocket handshake, checked: the request was a `GET` with the upgrade headers of RFC 6455.
pub struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: String,
    extensions: Option<String>,
    batch_offered: bool,
}

/// A request that is not a WebSocket handshake; answered in plain text.
#[derive(Debug, thiserror::Error)]
pub enum NotWebSocket {
    #[error("request method must be `GET`")]
    Method,
    #[error("Connection header did not include 'upgrade'")]
    Connection,
    #[error("`Upgrade` header did not include 'websocket'")]
    Upgrade,
    #[error("`Sec-WebSocket-Version` header did not include '13'")]
    Version,
    #[error("`Sec-WebSocket-Key` header missing")]
    Key,
    #[error("WebSocket request couldn't be upgraded since no upgrade state was present")]
    NotUpgradable,
}

impl IntoResponse for NotWebSocket {
    fn into_response(self) -> Response {
        let status = match self {
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
            Self::Connection | Self::Upgrade | Self::Version | Self::Key => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string()).into_response()
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive), on any of its lines.
fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    (headers.get_all(name).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotWebSocket;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, NotWebSocket> {
        if parts.method != Method::GET {
            return Err(NotWebSocket::Method);
        }
        let headers = &parts.headers;
        if !header_has(headers, header::CONNECTION, "upgrade") {
            return Err(NotWebSocket::Connection);
        }
        if !header_has(headers, header::UPGRADE, "websocket") {
            return Err(NotWebSocket::Upgrade);
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(NotWebSocket::Version);
        }
        let key = (headers.get(header::SEC_WEBSOCKET_KEY)).ok_or(NotWebSocket::Key)?;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        // Several extension header lines are one list (RFC 7230 §3.2.2).
        let offers: Vec<&str> = (headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter())
            .filter_map(|v| v.to_str().ok())
            .collect();
        let extensions = (!offers.is_empty()).then(|| offers.join(", "));
        let batch_offered = header_has(headers, header::SEC_WEBSOCKET_PROTOCOL, BATCH_PROTOCOL);
        let on_upgrade = (parts.extensions)
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotWebSocket::NotUpgradable)?;
        Ok(Self {
            on_upgrade,
            accept,
            extensions,
            batch_offered,
        })
    }
}

impl Upgrade {
    /// Answers 101 with what was negotiated, and runs `serve` on the socket once the connection
    /// is switched.
    pub fn accept<F, Fut>(self, settings: Settings, serve: F) -> Response
    where
        F: FnOnce(WebSocket<TokioIo<hyper::upgrade::Upgraded>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let deflate = (self.extensions.as_deref())
            .filter(|_| settings.compression)
            .and_then(pushgate_websocket::negotiate);
        let batch = self.batch_offered;
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        if let Some(deflate) = &deflate {
            response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, deflate.response());
        }
        if batch {
            response = response.header(header::SEC_WEBSOCKET_PROTOCOL, BATCH_PROTOCOL);
        }
        let on_upgrade = self.on_upgrade;
        let options = Options {
            encoding: deflate.map_or(Encoding::Plain, |d| d.encoding()),
            batch,
            max_message: settings.max_message,
            compressions: settings.compressions,
        };
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            serve(WebSocket::new(TokioIo::new(upgraded), options)).await;
        });
        response
            .body(axum::body::Body::empty())
            .expect("a valid 101 response")
    }
}

/// What the handshake settled for one connection.
pub struct Options {
    /// Plain, or permessage-deflate within the client's window.
    pub encoding: Encoding,
    pub batch: bool,
    pub max_message: usize,
    pub compressions: Counter,
}

/// A server-side WebSocket over `io`.
pub struct WebSocket<S> {
    io: S,
    reader: FrameReader,
    /// Bytes read and not yet made into a message; empty (and unallocated) between messages.
    read_buf: BytesMut,
    /// Encoded frames not yet written; dropped once written.
    write_buf: BytesMut,
    /// Deliveries fed since the last flush, joined into one message at the flush (batch mode).
    batch: Vec<SharedFrame>,
    batch_bytes: usize,
    encoding: Encoding,
    batching: bool,
    /// Counts compressions (only connections that negotiated deflate run any).
    compressions: Counter,
    close_sent: bool,
    /// A violation or the end of the stream: nothing more is read.
    read_done: bool,
}

impl<S> WebSocket<S> {
    pub fn new(io: S, options: Options) -> Self {
        let deflate = options.encoding != Encoding::Plain;
        Self {
            io,
            reader: FrameReader::new(Config {
                max_message: options.max_message,
                deflate,
            }),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            encoding: options.encoding,
            batching: options.batch,
            compressions: options.compressions,
            close_sent: false,
            read_done: false,
        }
    }

    fn count_compressions(&self, n: usize) {
        if n > 0 {
            self.compressions.inc_by(n as u64);
        }
    }

    /// Moves the batched deliveries into the write buffer, as one message.
    fn end_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let ran = write_batch(&self.batch, self.encoding, &mut self.write_buf);
        self.count_compressions(ran);
        self.batch_bytes = 0;
        // A connection that had a burst does not keep its room after it (the smallest room,
        // 32 bytes, is kept: one delivery per flush is the common case).
        if self.batch.capacity() > 4 {
            self.batch = Vec::new();
        } else {
            self.batch.clear();
        }
    }

    fn encode(&mut self, message: Message) {
        if let Message::Shared(Frame { shared: frame, .. }) = message {
            if self.batching {
                let len = frame.len();
                if self.batch_bytes + len > MAX_BATCH_BYTES {
                    self.end_batch();
                }
                self.batch_bytes += len + 1;
                self.batch.push(frame);
            } else {
                let ran = frame.write_to(self.encoding, &mut self.write_buf);
                self.count_compressions(usize::from(ran));
            }
            return;
        }
        // Anything else keeps its place after the deliveries fed before it.
        self.end_batch();
        let out = &mut self.write_buf;
        match message {
            Message::Text(text) => frame::put_text(out, text.as_bytes()),
            Message::Binary(data) => frame::put_binary(out, &data),
            Message::Ping(data) => frame::put_ping(out, &data),
            Message::Pong(data) => frame::put_pong(out, &data),
            Message::Close(close) => {
                // One close frame per connection (RFC 6455 §5.5.1).
                if !self.close_sent {
                    self.close_sent = true;
                    frame::put_close(out, close.as_ref().map(|c| (c.code, c.reason.as_str())));
                }
            }
            Message::Shared(_) => unreachable!("handled above"),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Writes the write buffer out; drops it once empty, so that idle connections hold none.
    fn poll_write_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_buf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write_buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write_buf.advance(n);
        }
        self.write_buf = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// The next message from what was read, reading more as needed.
    fn poll_read_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            // Nothing read yet (every wake-up of an idle session): straight to the socket.
            let read = if self.read_buf.is_empty() {
                Ok(None)
            } else {
                self.reader.read(&mut self.read_buf)
            };
            match read {
                Ok(Some(incoming)) => {
                    if self.read_buf.is_empty() {
                        self.read_buf = BytesMut::new();
                    }
                    return Poll::Ready(Some(Ok(self.on_incoming(incoming)?)));
                }
                Ok(None) => {}
                Err(violation) => {
                    self.read_done = true;
                    return Poll::Ready(Some(Err(violation.into())));
                }
            }
            // Not zeroed: this runs at every wake-up of an idle session, deliveries included.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                self.read_done = true;
                return Poll::Ready(None);
            }
            self.read_buf.extend_from_slice(buf.filled());
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) -> Result<Message, Error> {
        Ok(match incoming {
            // The reader checked the UTF-8 already; this conversion checks it once more.
            Incoming::Text(text) => {
                Message::Text(Utf8Bytes::try_from(text).map_err(|_| Violation {
                    code: Violation::INVALID_PAYLOAD,
                    reason: "invalid UTF-8",
                })?)
            }
            Incoming::Binary(data) => Message::Binary(data),
            Incoming::Ping(data) => {
                // Answered here, as RFC 6455 §5.5.2 asks; written with the next write or read.
                self.end_batch();
                frame::put_pong(&mut self.write_buf, &data);
                Message::Ping(data)
            }
            Incoming::Pong(data) => Message::Pong(data),
            Incoming::Close(close) => {
                self.read_done = true;
                let close = close.map(|(code, reason)| CloseFrame {
                    code,
                    reason: reason.into(),
                });
                // The reply echoes the client's code; the session's next flush sends it.
                self.encode(Message::Close(close.clone()));
                Message::Close(close)
            }
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<S> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Pongs and a close reply go out without waiting for the session's next write; a write
        // that cannot proceed now is retried on the next call.
        if !this.write_buf.is_empty()
            && let Poll::Ready(Err(e)) = this.poll_write_buf(cx)
        {
            this.read_done = true;
            return Poll::Ready(Some(Err(e.into())));
        }
        if this.read_done {
            return Poll::Ready(None);
        }
        let message = ready!(this.poll_read_message(cx));
        // A pong or close reply just queued goes out now if the socket takes it; a write error
        // shows on the next call.
        if !this.write_buf.is_empty() {
            let _ = this.poll_write_buf(cx);
        }
        Poll::Ready(message)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.write_buf.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_write_buf(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        self.get_mut().encode(message);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        this.end_batch();
        ready!(this.poll_write_buf(cx))?;
        Poll::Ready(Ok(ready!(Pin::new(&mut this.io).poll_flush(cx))?))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let this = self.get_mut();
        Poll::Ready(Ok(ready!(Pin::new(&mut this.io).poll_shutdown(cx))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A server socket and the client's end of the connection.
    fn pair(deflate: bool, batch: bool, compressions: &Counter) -> (WebSocket<DuplexStream>, Peer) {
        let (server, client) = tokio::io::duplex(1 << 20);
        let options = Options {
            encoding: deflate.into(),
            batch,
            max_message: 1 << 20,
            compressions: compressions.clone(),
        };
        let reader = FrameReader::client(Config {
            max_message: 1 << 20,
            deflate,
        });
        let peer = Peer {
            io: client,
            reader,
            buf: BytesMut::new(),
        };
        (WebSocket::new(server, options), peer)
    }

    /// The client's side, decoding what the server wrote with the same codec.
    struct Peer {
        io: DuplexStream,
        reader: FrameReader,
        buf: BytesMut,
    }

    impl Peer {
        async fn next(&mut self) -> Incoming {
            loop {
                if let Some(message) = self.reader.read(&mut self.buf).unwrap() {
                    return message;
                }
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the server closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// The raw bytes of the next frame, whatever it holds (the header's first byte first).
        async fn raw_first_byte(&mut self) -> u8 {
            while self.buf.is_empty() {
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap();
                self.buf.extend_from_slice(&chunk[..n]);
            }
            self.buf[0]
        }

        /// Sends a masked frame, as a client must.
        async fn send(&mut self, opcode: u8, payload: &[u8]) {
            let key = [1, 2, 3, 4];
            let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            self.io.write_all(&frame).await.unwrap();
        }
    }

    fn shared(text: &str) -> Message {
        Message::Shared(Frame::verbatim(text.into()))
    }

    fn json(size: usize) -> String {
        let item = r#"{"symbol":"ACME","price":101.25,"volume":1200},"#;
        let items = item.repeat(size / item.len() + 1);
        format!(
            r#"{{"type":"message","channel":"quotes","data":[{}]}}"#,
            items.trim_end_matches(',')
        )
    }

    #[tokio::test]
    async fn a_delivery_is_compressed_once_for_every_deflate_connection() {
        let compressions = Counter::default();
        let text = json(2000);
        let Message::Shared(frame) = shared(&text) else {
            unreachable!()
        };
        let mut peers = Vec::new();
        for deflate in [true, true, false] {
            let (mut server, mut peer) = pair(deflate, false, &compressions);
            server.send(Message::Shared(frame.clone())).await.unwrap();
            let rsv1 = peer.raw_first_byte().await & 0x40 != 0;
            assert_eq!(rsv1, deflate, "compressed exactly on deflate connections");
            let Incoming::Text(got) = peer.next().await else {
                panic!("a text message")
            };
            assert_eq!(got, text.as_bytes(), "the same bytes, compressed or not");
            peers.push((server, peer));
        }
        assert_eq!(compressions.get(), 1, "one compression for two connections");
        // Below the threshold a delivery goes out plain, and costs no compression.
        let (mut server, mut peer) = pair(true, false, &compressions);
        server
            .send(shared(r#"{"type":"message","data":1}"#))
            .await
            .unwrap();
        assert_eq!(peer.raw_first_byte().await & 0x40, 0);
        assert_eq!(compressions.get(), 1);
    }

    #[tokio::test]
    async fn deliveries_fed_together_go_out_as_one_batch_and_anything_else_keeps_its_place() {
        let compressions = Counter::default();
        for deflate in [false, true] {
            let (mut server, mut peer) = pair(deflate, true, &compressions);
            let big = json(1000);
            for text in ["a", big.as_str(), "c"] {
                server.feed(shared(text)).await.unwrap();
            }
            server.feed(Message::Text("reply".into())).await.unwrap();
            server.feed(shared("d")).await.unwrap();
            server.flush().await.unwrap();
            let Incoming::Text(batch) = peer.next().await else {
                panic!("a text message")
            };
            assert_eq!(
                batch,
                format!("a\n{big}\nc").as_bytes(),
                "deflate {deflate}"
            );
            for expected in ["reply", "d"] {
                let Incoming::Text(got) = peer.next().await else {
                    panic!("a text message")
                };
                assert_eq!(got, expected.as_bytes());
            }
        }
    }

    #[tokio::test]
    async fn pings_are_answered_and_a_close_is_echoed_without_the_session() {
        let compressions = Counter::default();
        let (mut server, mut peer) = pair(false, false, &compressions);
        peer.send(0x9, b"hi").await;
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Message::Ping("hi".into())
        );
        // The pong went out while the session only read.
        assert_eq!(peer.next().await, Incoming::Pong("hi".into()));
        peer.send(0x8, &[0x03, 0xe8]).await;
        let Message::Close(Some(close)) = server.next().await.unwrap().unwrap() else {
            panic!("a close")
        };
        assert_eq!(close.code, 1000);
        assert_eq!(
            peer.next().await,
            Incoming::Close(Some((1000, String::new())))
        );
        assert!(
            server.next().await.is_none(),
            "nothing is read after a close"
        );
        server.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_violation_ends_reading_with_its_code() {
        let compressions = Counter::default();
        let (mut server, mut peer) = pair(false, false, &compressions);
        // A text frame with RSV1 set, on a connection without deflate.
        peer.io
            .write_all(&[0x80 | 0x40 | 0x1, 0x80, 1, 2, 3, 4])
            .await
            .unwrap();
        let Err(Error::Violation(violation)) = server.next().await.unwrap() else {
            panic!("a violation")
        };
        assert_eq!(violation.code, 1002);
        assert!(server.next().await.is_none());
    }
}
