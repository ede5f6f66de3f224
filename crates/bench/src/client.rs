//! The bench's lean WebSocket client: small buffers (thousands of idle sockets per process),
//! Nagle off, the handshake with `Authorization: Bearer`, the welcome, and subscribe.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use memchr::memmem;
use pushgate_protocol::RawJson;
use pushgate_protocol::server::ServerFrame;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::inflate::BenchTcp;

pub type Ws = WebSocketStream<BenchTcp>;

/// How long one connection may take to open (handshake, welcome, subscribe ack).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// 4 KiB read buffers: tungstenite's default of 128 KiB would make the bench itself the memory
/// hog of an idle run.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
}

/// `PUSHGATE_BENCH_DEFLATE=offer`: connections offer permessage-deflate, so that the node
/// negotiates it on every one (for runs that receive only small frames: idle, connect);
/// `=inflate`: they offer it and inflate what comes compressed (fan-out runs).
fn offer_deflate() -> bool {
    std::env::var("PUSHGATE_BENCH_DEFLATE").is_ok_and(|v| v == "offer" || v == "inflate")
}

fn inflate() -> bool {
    std::env::var("PUSHGATE_BENCH_DEFLATE").is_ok_and(|v| v == "inflate")
}

/// The WebSocket handshake of `request`, over a TCP connection made here (Nagle off).
pub async fn connect(
    request: tungstenite::handshake::client::Request,
) -> Result<Ws, tungstenite::Error> {
    let uri = request.uri();
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let stream = BenchTcp::new(tcp, inflate());
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
    Ok(ws)
}

/// A short, countable reason for a failure.
pub fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(response) => format!("http {}", response.status().as_u16()),
        tungstenite::Error::Io(io) => format!("io: {io}"),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed".into(),
        tungstenite::Error::Protocol(p) => format!("protocol: {p}"),
        other => other.to_string(),
    }
}

/// Connects to `url`; with a `token` (pushgate), also reads the welcome and, given a `channel`,
/// subscribes to it and waits for the ack. Without a token (the baseline server) it is the bare
/// upgrade.
pub async fn open(url: &str, token: Option<&str>, channel: Option<&str>) -> Result<Ws, String> {
    let mut request = url.into_client_request().map_err(|e| describe(&e))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "token is not a valid header value".to_owned())?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    if offer_deflate() {
        // Offered as browsers do.
        let offer = HeaderValue::from_static("permessage-deflate; client_max_window_bits");
        (request.headers_mut()).insert("sec-websocket-extensions", offer);
    }
    let mut ws = connect(request).await.map_err(|e| describe(&e))?;
    if token.is_some() {
        match next_frame(&mut ws).await? {
            ServerFrame::Welcome { .. } => {}
            other => return Err(format!("expected a welcome, got {}", kind(&other))),
        }
        if let Some(channel) = channel {
            subscribe(&mut ws, channel, 1).await?;
        }
    }
    Ok(ws)
}

/// Subscribes with request `id` and waits for its ack.
pub async fn subscribe(ws: &mut Ws, channel: &str, id: u64) -> Result<(), String> {
    let frame = serde_json::json!({"type": "subscribe", "id": id, "channel": channel});
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| describe(&e))?;
    loop {
        match next_frame(ws).await? {
            ServerFrame::Ack { id: got, .. } if got == id => return Ok(()),
            ServerFrame::Error { code, message, .. } => {
                return Err(format!("subscribe refused: {}: {message}", code_name(code)));
            }
            _ => {}
        }
    }
}

/// Closes politely: sends a close frame and waits (bounded) for the server's.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// The next text frame, decoded with the protocol's types.
async fn next_frame(ws: &mut Ws) -> Result<ServerFrame, String> {
    loop {
        match ws.next().await {
            None => return Err("closed".into()),
            Some(Err(e)) => return Err(describe(&e)),
            Some(Ok(Message::Text(text))) => {
                return ServerFrame::decode(&text).map_err(|e| format!("undecodable frame: {e}"));
            }
            Some(Ok(Message::Close(frame))) => return Err(close_reason(frame.as_ref())),
            Some(Ok(_)) => {}
        }
    }
}

pub fn close_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {}", u16::from(f.code)),
        None => "close (no code)".into(),
    }
}

/// A short description of an unexpected frame.
fn kind(frame: &ServerFrame) -> String {
    let mut text = format!("{frame:?}");
    if text.len() > 80 {
        let cut = (0..=80)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The wire name of an error code (`rate_limited`, ...).
pub fn code_name(code: pushgate_protocol::ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// The two fields a subscriber needs from a `message` frame, borrowed from the frame text: the
/// hot path of a fan-out run allocates nothing per delivery, as on the baseline side.
#[derive(Deserialize)]
pub struct LeanFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawJson>,
}

/// The `data` text of a `message` frame (`None` for any other frame).
///
/// pushgate writes `type` first and `data` last, and the other keys of a message frame are fixed
/// names with string or number values, so the first `"data":` of a frame that starts as a message
/// is the data key (a quote inside a JSON string is escaped). That is as cheap as the baseline
/// client's read of its bare payload; anything else takes the full parse.
pub fn lean_data(text: &str) -> Option<&str> {
    const MESSAGE: &str = r#"{"type":"message","#;
    const DATA: &str = r#""data":"#;
    // Built once: a searcher set up per frame costs more than the search.
    static FIND_DATA: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(DATA));
    if let Some(rest) = text.strip_prefix(MESSAGE)
        && let Some(at) = FIND_DATA.find(rest.as_bytes())
        && let Some(data) = rest
            .get(at + DATA.len()..)
            .and_then(|r| r.strip_suffix('}'))
    {
        return Some(data);
    }
    let frame: LeanFrame<'_> = serde_json::from_str(text).ok()?;
    (frame.kind == "message").then_some(())?;
    frame.data.map(RawJson::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lean_decoding_finds_the_data() {
        let text = r#"{"type":"message","id":"0190","ts":1,"from":"a","channel":"bench","data":"pg 1 0 0 5 x"}"#;
        assert_eq!(lean_data(text), Some(r#""pg 1 0 0 5 x""#));
        assert_eq!(lean_data(r#"{"type":"ack","id":1}"#), None);
        assert_eq!(lean_data("not json"), None);
        let reordered = r#"{"data":"pg 1 0 0 5 x","type":"message","id":"0190","ts":1}"#;
        assert_eq!(lean_data(reordered), Some(r#""pg 1 0 0 5 x""#));
        let nested = r#"{"type":"message","id":"a\"data\":","data":{"data":1}}"#;
        assert_eq!(lean_data(nested), Some(r#"{"data":1}"#));
    }

    #[test]
    fn error_codes_have_wire_names() {
        assert_eq!(
            code_name(pushgate_protocol::ErrorCode::RateLimited),
            "rate_limited"
        );
    }
}
