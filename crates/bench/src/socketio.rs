//! Just enough of Socket.IO v5 over Engine.IO v4, WebSocket transport only, to measure a
//! Socket.IO cluster (`crates/bench/socketio/server.js`) with the same fan-out as pushgate.
//!
//! Engine.IO packets are WebSocket text frames whose first character is the type: `0` open,
//! `2` ping, `3` pong, `4` message. A Socket.IO packet rides in a message: `40` connects to the
//! main namespace, `42<ack id>[event, args...]` is an event, `43<ack id>[args...]` its
//! acknowledgement. The server pings and the client must answer `3` within its ping timeout
//! (20 s by default) or be dropped.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::client::{self, Ws};

/// The server's heartbeat, and the answer it wants.
pub const PING: &str = "2";
pub const PONG: &str = "3";

/// The ack id of a subscriber's `join`, its only request.
const JOIN_ACK_ID: u64 = 0;
/// How a delivery starts: a `msg` event on the main namespace, with no ack id.
const MSG_PREFIX: &str = r#"42["msg","#;

/// The Engine.IO endpoint of a server given as `ws://host:port` (a URL already naming
/// `/socket.io/` is used as it is).
pub fn endpoint(url: &str) -> String {
    if url.contains("/socket.io/") {
        url.to_owned()
    } else {
        format!(
            "{}/socket.io/?EIO=4&transport=websocket",
            url.trim_end_matches('/')
        )
    }
}

/// Connects to the main namespace; given a `room`, joins it and waits for the server's ack.
pub async fn open(url: &str, room: Option<&str>) -> Result<Ws, String> {
    let request = endpoint(url)
        .into_client_request()
        .map_err(|e| client::describe(&e))?;
    let mut ws = client::connect(request)
        .await
        .map_err(|e| client::describe(&e))?;
    let open = next_text(&mut ws).await?;
    if !open.starts_with('0') {
        return Err(format!(
            "expected the Engine.IO open packet, got {open:.40}"
        ));
    }
    send(&mut ws, "40".into()).await?;
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with("40") {
            break;
        }
        if text.starts_with("44") {
            return Err(format!("namespace refused: {text:.80}"));
        }
    }
    if let Some(room) = room {
        let room = serde_json::to_string(room).map_err(|e| e.to_string())?;
        send(&mut ws, format!(r#"42{JOIN_ACK_ID}["join",{room}]"#)).await?;
        loop {
            if ack_id(&next_text(&mut ws).await?) == Some(JOIN_ACK_ID) {
                break;
            }
        }
    }
    Ok(ws)
}

async fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| client::describe(&e))
}

/// The next text frame other than a ping (which it answers).
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            None => return Err("closed".into()),
            Some(Err(e)) => return Err(client::describe(&e)),
            Some(Ok(Message::Text(text))) if text.as_str() == PING => {
                send(ws, PONG.into()).await?;
            }
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => return Err(client::close_reason(frame.as_ref())),
            Some(Ok(_)) => {}
        }
    }
}

/// `42<id>["pub",{"room":<room>,"data":<data>}]`: a publish the server acknowledges.
/// `room_json` and `data_json` are JSON texts.
pub fn publish_frame(id: u64, room_json: &str, data_json: &str) -> String {
    format!(r#"42{id}["pub",{{"room":{room_json},"data":{data_json}}}]"#)
}

/// The ack id of an acknowledgement packet `43<id>[...]`.
pub fn ack_id(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("43")?;
    let digits = rest.find('[')?;
    rest[..digits].parse().ok()
}

/// The JSON text of the data of a delivery, `42["msg",<data>]` (`None` for any other packet).
pub fn msg_data(text: &str) -> Option<&str> {
    text.strip_prefix(MSG_PREFIX)?.strip_suffix(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("ws://127.0.0.1:3000"),
            "ws://127.0.0.1:3000/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            endpoint("ws://h:1/"),
            "ws://h:1/socket.io/?EIO=4&transport=websocket"
        );
        let explicit = "ws://h:1/socket.io/?EIO=4&transport=websocket&x=1";
        assert_eq!(endpoint(explicit), explicit);
    }

    #[test]
    fn packets() {
        assert_eq!(
            publish_frame(7, r#""bench""#, r#""pg 1 0 0 5 x""#),
            r#"427["pub",{"room":"bench","data":"pg 1 0 0 5 x"}]"#
        );
        assert_eq!(ack_id("4312[]"), Some(12));
        assert_eq!(ack_id("430[]"), Some(0));
        assert_eq!(ack_id("43[]"), None);
        assert_eq!(ack_id(r#"42["msg","x"]"#), None);
        assert_eq!(
            msg_data(r#"42["msg","pg 1 0 0 5 x"]"#),
            Some(r#""pg 1 0 0 5 x""#)
        );
        assert_eq!(msg_data(r#"42["other","x"]"#), None);
        assert_eq!(msg_data("2"), None);
    }
}
