//! `GET /sse`: Server-Sent Events, for networks where WebSockets are blocked.
//!
//! An SSE stream is a session like a WebSocket connection (same hub queue, same history
//! ordering and recovery, same close reasons), driven through [`session::run_sse`] with a sink
//! that turns frames into events:
//!
//! | frame | event |
//! |-------|-------|
//! | welcome | `event: welcome`, data: the welcome frame |
//! | subscribe ack | `event: subscribed`, data: `{"channel","position","recovered"}` (history channels: position, and recovered when resuming) |
//! | subscribe error | `event: refused`, data: the error frame plus `channel`; the stream then ends |
//! | message | unnamed (`message`) event, data: the message frame; on history channels `id:` lists the stream's positions |
//! | unsubscribed | `event: unsubscribed`, data: the notice; after `history_lost` the stream ends |
//! | ping | a `:ping` comment |
//! | close | `event: close`, data: `{"code","reason"}`, and the stream ends |
//!
//! The event ID of a history message is `epoch:offset`; with several history channels in one
//! stream, the positions of all of them, comma-separated (`e1:41,e2:7`), so that
//! `Last-Event-ID` resumes every channel: a position applies to the channel whose current epoch
//! it names (epochs are random per channel).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::ws::Message;
use axum::Json;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, StreamExt, stream};
use pushgate_protocol::RawJson;
use pushgate_protocol::envelope::valid_epoch;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::auth::Grant;
use crate::http::HttpError;
use crate::node::Node;
use crate::session::{self, SseStart};

/// Events buffered between the session and the HTTP body.
const BUFFER: usize = 64;
/// Longest `Last-Event-ID` read, in bytes.
const MAX_LAST_EVENT_ID: usize = 16 * 1024;

/// Parses `Last-Event-ID`: `epoch:offset` positions, comma-separated. Malformed parts are
/// ignored.
pub fn parse_last_event_id(value: &str) -> Vec<(u64, String)> {
    value
        .split(',')
        .filter_map(|part| {
            let (epoch, offset) = part.trim().rsplit_once(':')?;
            let offset = offset.parse().ok()?;
            valid_epoch(epoch).then(|| (offset, epoch.to_owned()))
        })
        .collect()
}

fn forbidden(channel: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error": "forbidden",
            "reason": format!("token does not grant this channel: {channel}"),
            "field": "channel",
        })),
    )
        .into_response()
}

fn bad_channel(reason: String) -> Response {
    HttpError::BadRequest {
        field: Some("channel".into()),
        reason,
    }
    .into_response()
}

/// Opens an SSE stream for an authenticated request: checks the channels, takes a connection
/// slot, starts the session, and returns the streaming response.
pub fn open(
    node: Arc<Node>,
    peer: SocketAddr,
    headers: &HeaderMap,
    grant: Grant,
    requested: Vec<String>,
    last_event_id: Option<String>,
) -> Response {
    let mut seen = HashSet::new();
    let channels: Vec<String> = requested
        .into_iter()
        .filter(|c| seen.insert(c.clone()))
        .collect();
    if channels.is_empty() {
        return bad_channel("at least one channel is required: /sse?channel=a&channel=b".into());
    }
    if channels.len() > node.config.max_channels {
        return bad_channel(format!(
            "at most {} channels per connection",
            node.config.max_channels
        ));
    }
    for channel in &channels {
        if let Err(e) = node.validate_channel(channel) {
            return bad_channel(format!("channel {e}"));
        }
        if !grant.subscribe.allows(channel) {
            return forbidden(channel);
        }
    }
    let admission = match node.admit(peer.ip()) {
        Ok(a) => a,
        Err(refusal) => return HttpError::Refused(refusal).into_response(),
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(last_event_id)
        .filter(|v| !v.trim().is_empty() && v.len() <= MAX_LAST_EVENT_ID)
        .map(|v| parse_last_event_id(&v));

    let (tx, mut rx) = mpsc::channel::<Event>(BUFFER);
    // The session's input: nothing, ending when the client goes away (the body is dropped).
    let watch = tx.clone();
    let incoming = stream::once(async move { watch.closed().await })
        .filter_map(|()| async { None::<Result<Message, std::io::Error>> })
        .boxed();
    let sink = EventSink {
        tx: PollSender::new(tx),
        channels: channels.clone(),
        positions: vec![None; channels.len()],
    };
    let start = SseStart { channels, resume };
    tokio::spawn(session::run_sse(
        node, sink, incoming, grant, admission, start,
    ));
    let body = stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    (
        [(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        )],
        Sse::new(body),
    )
        .into_response()
}

/// The session's sink on an SSE stream: turns frames into events.
struct EventSink {
    tx: PollSender<Event>,
    /// The stream's channels, in subscribe order (request `id` = index + 1).
    channels: Vec<String>,
    /// The last position of each history channel, for event IDs.
    positions: Vec<Option<(String, u64)>>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    /// A request ID (number) on replies, a message ID (string) on messages.
    #[serde(default, borrow)]
    id: Option<&'a RawJson>,
    #[serde(default, borrow)]
    channel: Option<&'a str>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<&'a str>,
}

#[derive(Deserialize)]
struct Position {
    offset: u64,
    epoch: String,
}

impl EventSink {
    fn event_id(&self) -> String {
        let mut id = String::new();
        for (epoch, offset) in self.positions.iter().flatten() {
            if !id.is_empty() {
                id.push(',');
            }
            id.push_str(epoch);
            id.push(':');
            id.push_str(&offset.to_string());
        }
        id
    }

    fn channel_of(&self, id: Option<&RawJson>) -> Option<usize> {
        let id: u64 = serde_json::from_str(id?.get()).ok()?;
        let index = usize::try_from(id.checked_sub(1)?).ok()?;
        (index < self.channels.len()).then_some(index)
    }

    /// The event for a frame, if it makes one.
    fn event(&mut self, text: &str) -> Option<Event> {
        let head: Head<'_> = serde_json::from_str(text).ok()?;
        match head.kind {
            "message" => {
                // Holds no CR or LF: `Frame::message` made them spaces.
                let event = Event::default().data(text);
                let (Some(channel), Some(offset), Some(epoch)) =
                    (head.channel, head.offset, head.epoch)
                else {
                    return Some(event);
                };
                let at = self.channels.iter().position(|c| c == channel)?;
                if !valid_epoch(epoch) {
                    return Some(event);
                }
                self.positions[at] = Some((epoch.to_owned(), offset));
                Some(event.id(self.event_id()))
            }
            "ack" => {
                let at = self.channel_of(head.id)?;
                let mut frame: Value = serde_json::from_str(text).ok()?;
                let mut out = json!({ "channel": self.channels[at] });
                if let Some(position) = frame.get_mut("position").map(Value::take) {
                    if let Ok(p) = serde_json::from_value::<Position>(position.clone())
                        && valid_epoch(&p.epoch)
                    {
                        self.positions[at] = Some((p.epoch, p.offset));
                    }
                    out["position"] = position;
                }
                if let Some(recovered) = frame.get("recovered") {
                    out["recovered"] = recovered.clone();
                }
                Some(Event::default().event("subscribed").data(out.to_string()))
            }
            "error" => {
                let mut frame: Value = serde_json::from_str(text).ok()?;
                if let Some(at) = self.channel_of(head.id) {
                    frame["channel"] = json!(self.channels[at]);
                }
                Some(Event::default().event("refused").data(frame.to_string()))
            }
            "welcome" | "unsubscribed" | "join" | "leave" => {
                Some(Event::default().event(head.kind).data(text))
            }
            _ => None,
        }
    }
}

impl Sink<Message> for EventSink {
    type Error = std::io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx
            .poll_reserve(cx)
            .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        let event = match msg {
            Message::Text(text) => self.event(text.as_str()),
            Message::Shared(frame) => self.event(frame.text.as_str()),
            Message::Ping(_) => Some(Event::default().comment("ping")),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((1000, String::new()));
                Some(
                    Event::default()
                        .event("close")
                        .data(json!({ "code": code, "reason": reason }).to_string()),
                )
            }
            Message::Binary(_) | Message::Pong(_) => None,
        };
        match event {
            Some(event) => self
                .tx
                .send_item(event)
                .map_err(|_| std::io::ErrorKind::BrokenPipe.into()),
            // Nothing to send: give the reserved slot back.
            None => {
                self.tx.abort_send();
                Ok(())
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Frame;

    fn sink(channels: &[&str]) -> (EventSink, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(8);
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let sink = EventSink {
            tx: PollSender::new(tx),
            positions: vec![None; channels.len()],
            channels,
        };
        (sink, rx)
    }

    #[test]
    fn last_event_ids_parse_leniently() {
        assert_eq!(parse_last_event_id("e1:41"), vec![(41, "e1".into())]);
        assert_eq!(
            parse_last_event_id("e1:41, e2:7,bad,:3,x:y,a b:1"),
            vec![(41, "e1".into()), (7, "e2".into())]
        );
        assert!(parse_last_event_id("").is_empty());
    }

    /// One event as the body renders it.
    async fn render(event: Event) -> String {
        let stream = stream::iter([Ok::<_, Infallible>(event)]);
        let body = axum::body::to_bytes(Sse::new(stream).into_response().into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn data_of(text: &str) -> Value {
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no data in {text:?}"));
        serde_json::from_str(data).unwrap()
    }

    #[tokio::test]
    async fn message_ids_list_every_history_position() {
        let (mut s, _rx) = sink(&["a", "b", "plain"]);
        let ack = s
            .event(r#"{"type":"ack","id":1,"position":{"offset":4,"epoch":"ea"},"recovered":true}"#)
            .unwrap();
        let text = render(ack).await;
        assert!(text.starts_with("event: subscribed\n"), "{text:?}");
        assert_eq!(
            data_of(&text),
            json!({"channel":"a","position":{"offset":4,"epoch":"ea"},"recovered":true})
        );
        assert_eq!(s.event_id(), "ea:4");
        let m = s
            .event(r#"{"type":"message","id":"m","ts":1,"channel":"b","offset":9,"epoch":"eb","data":1}"#)
            .unwrap();
        let text = render(m).await;
        assert!(text.contains("id: ea:4,eb:9\n"), "{text:?}");
        assert!(!text.contains("event:"), "{text:?}");
        assert_eq!(data_of(&text)["offset"], 9);
        let plain = s
            .event(r#"{"type":"message","id":"m","ts":1,"channel":"plain","data":1}"#)
            .unwrap();
        assert!(!render(plain).await.contains("id:"));
        let refused = s
            .event(r#"{"type":"error","id":3,"code":"unavailable","message":"x"}"#)
            .unwrap();
        let text = render(refused).await;
        assert!(text.starts_with("event: refused\n"), "{text:?}");
        assert_eq!(data_of(&text)["channel"], "plain");
        assert!(s.event(r#"{"type":"pong","id":3}"#).is_none());
        assert!(s.event("not json").is_none());
    }

    #[tokio::test]
    async fn joins_and_leaves_are_named_events() {
        let (mut s, _rx) = sink(&["chat:1"]);
        for kind in ["join", "leave"] {
            let frame =
                format!(r#"{{"type":"{kind}","channel":"chat:1","user":"bob","session":"n2.x"}}"#);
            let text = render(s.event(&frame).unwrap()).await;
            assert!(text.starts_with(&format!("event: {kind}\n")), "{text:?}");
            assert!(!text.contains("id:"), "{text:?}");
            assert_eq!(data_of(&text)["user"], "bob");
        }
    }

    #[tokio::test]
    async fn a_payload_with_line_breaks_stays_one_event() {
        let (mut s, _rx) = sink(&["a"]);
        let frame = "{\"type\":\"message\",\"id\":\"m\",\"ts\":1,\"channel\":\"a\",\"data\":{\r\n\"k\":\n1}}";
        let frame = Frame::message(frame.into(), 1);
        let text = render(s.event(&frame.text).unwrap()).await;
        let joined: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let value: Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(value["data"], json!({"k": 1}));
    }
}
