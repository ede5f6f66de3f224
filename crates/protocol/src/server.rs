//! Frames a node sends to clients.
//!
//! Encoding (`encode_*`) works from borrowed parts so the hot path allocates exactly one string per
//! frame; a delivery is encoded once per node and the same bytes go to every recipient.
//! [`ServerFrame`] is the owned, decoded form, for clients and tests.

use serde::{Deserialize, Serialize};

use crate::RawJson;

/// The `code` of an error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Unavailable,
}

/// Who a message is for. A delivery frame names exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Channel(&'a str),
    User(&'a str),
    Session(&'a str),
    Broadcast,
}

/// A message to deliver, borrowed from wherever it came from.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    pub id: &'a str,
    pub ts: u64,
    pub from: Option<&'a str>,
    pub target: Target<'a>,
    pub data: &'a RawJson,
}

/// A message's place in a history channel: its offset, and the epoch of the history it belongs
/// to (a random ID that changes whenever the history is lost and offsets restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

#[derive(Serialize)]
struct PositionOut<'a> {
    offset: u64,
    epoch: &'a str,
}

/// `code` of an `unsubscribed` notice: the token no longer grants the channel.
pub const UNSUBSCRIBED_REVOKED: &str = "revoked";
/// `code` of an `unsubscribed` notice: messages were missed that history no longer holds.
/// Subscribe again with `since` (the last position seen) to learn `recovered: false`.
pub const UNSUBSCRIBED_HISTORY_LOST: &str = "history_lost";

/// One subscriber of a presence channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub user: String,
    pub session: String,
    pub node: String,
    /// Unix milliseconds.
    pub joined_at: u64,
}

/// Which way a user went on a presence-events channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceKind {
    /// The user's first connection subscribed (no other connection of theirs was subscribed).
    Join,
    /// The user's last subscribed connection left: unsubscribed, disconnected, or its node died.
    Leave,
}

impl PresenceKind {
    /// `join` or `leave`: the frame's `type`, and the `presence` field of the Redis payload.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "join" => Some(Self::Join),
            "leave" => Some(Self::Leave),
            _ => None,
        }
    }
}

/// A decoded `join` or `leave` frame: `user` came to or left `channel`; `session` is the
/// connection that made it so (the user's first to subscribe, or last to leave).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub channel: String,
    pub user: String,
    pub session: String,
}

#[derive(Serialize)]
struct DeliveryOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    broadcast: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    data: &'a RawJson,
}

fn to_string<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs into a String cannot fail: no maps with non-string keys,
    // no user Serialize impls that error.
    serde_json::to_string(value).expect("server frames always serialize")
}

/// `{"type":"message",...}`
pub fn encode_message(m: &MessageRef<'_>) -> String {
    encode_delivery(m, None)
}

/// `{"type":"message",...,"offset":N,"epoch":"E",...}`: a message of a history channel.
pub fn encode_message_at(m: &MessageRef<'_>, offset: u64, epoch: &str) -> String {
    encode_delivery(m, Some((offset, epoch)))
}

fn encode_delivery(m: &MessageRef<'_>, at: Option<(u64, &str)>) -> String {
    let (mut channel, mut user, mut session, mut broadcast) = (None, None, None, None);
    match m.target {
        Target::Channel(c) => channel = Some(c),
        Target::User(u) => user = Some(u),
        Target::Session(s) => session = Some(s),
        Target::Broadcast => broadcast = Some(true),
    }
    to_string(&DeliveryOut {
        kind: "message",
        id: m.id,
        ts: m.ts,
        from: m.from,
        channel,
        user,
        session,
        broadcast,
        offset: at.map(|(o, _)| o),
        epoch: at.map(|(_, e)| e),
        data: m.data,
    })
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply<'a> {
    Welcome {
        session: &'a str,
        user: &'a str,
        node: &'a str,
        ping_interval: u64,
    },
    Ack {
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<PositionOut<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
    Pong {
        id: u64,
    },
    Unsubscribed {
        channel: &'a str,
        code: &'a str,
        reason: &'a str,
    },
    Presence {
        id: u64,
        channel: &'a str,
        clients: &'a [PresenceEntry],
    },
    Join {
        channel: &'a str,
        user: &'a str,
        session: &'a str,
    },
    Leave {
        channel: &'a str,
        user: &'a str,
        session: &'a str,
    },
}

/// `{"type":"welcome",...}`, the first frame on a `/ws` connection.
pub fn encode_welcome(session: &str, user: &str, node: &str, ping_interval_secs: u64) -> String {
    to_string(&Reply::Welcome {
        session,
        user,
        node,
        ping_interval: ping_interval_secs,
    })
}

pub fn encode_ack(id: u64) -> String {
    to_string(&Reply::Ack {
        id,
        position: None,
        recovered: None,
    })
}

/// The ack of a subscribe to a history channel: the channel's current position, and with a
/// `since` in the request, whether the missed messages follow (`recovered`).
pub fn encode_subscribed(id: u64, offset: u64, epoch: &str, recovered: Option<bool>) -> String {
    to_string(&Reply::Ack {
        id,
        position: Some(PositionOut { offset, epoch }),
        recovered,
    })
}

#[derive(Serialize)]
struct HistoryHead<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: u64,
    channel: &'a str,
    position: PositionOut<'a>,
}

/// `{"type":"history","id":N,"channel":"C","position":{"offset":O,"epoch":"E"},"messages":[...]}`:
/// the reply to a history request. `messages` are encoded message frames (JSON objects, as
/// [`encode_message_at`] makes them), oldest first; they are copied in as they are.
pub fn encode_history<'m>(
    id: u64,
    channel: &str,
    offset: u64,
    epoch: &str,
    messages: impl IntoIterator<Item = &'m str>,
) -> String {
    let mut text = to_string(&HistoryHead {
        kind: "history",
        id,
        channel,
        position: PositionOut { offset, epoch },
    });
    // The head is an object: reopen it for the messages.
    text.pop();
    text.push_str(",\"messages\":[");
    for (i, message) in messages.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(message);
    }
    text.push_str("]}");
    text
}

/// `{"type":"presence",...}`: the reply to a presence request.
pub fn encode_presence(id: u64, channel: &str, clients: &[PresenceEntry]) -> String {
    to_string(&Reply::Presence {
        id,
        channel,
        clients,
    })
}

/// `{"type":"join",...}` or `{"type":"leave",...}`: a user came to or left a presence-events
/// channel.
pub fn encode_presence_event(
    kind: PresenceKind,
    channel: &str,
    user: &str,
    session: &str,
) -> String {
    to_string(&match kind {
        PresenceKind::Join => Reply::Join {
            channel,
            user,
            session,
        },
        PresenceKind::Leave => Reply::Leave {
            channel,
            user,
            session,
        },
    })
}

pub fn encode_pong(id: u64) -> String {
    to_string(&Reply::Pong { id })
}

/// `{"type":"unsubscribed",...}`: the node ended a subscription. `code` says why:
/// [`UNSUBSCRIBED_REVOKED`] (a refreshed token no longer grants the channel) or
/// [`UNSUBSCRIBED_HISTORY_LOST`] (messages were missed that history no longer holds).
pub fn encode_unsubscribed(channel: &str, code: &str, reason: &str) -> String {
    to_string(&Reply::Unsubscribed {
        channel,
        code,
        reason,
    })
}

/// `id` is `None` when the request's id could not be read.
pub fn encode_error(id: Option<u64>, code: ErrorCode, message: &str) -> String {
    to_string(&Reply::Error { id, code, message })
}

/// A decoded server frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        session: String,
        user: String,
        node: String,
        ping_interval: u64,
    },
    Ack {
        id: u64,
        /// The channel's current position: on the ack of a subscribe to a history channel.
        #[serde(default)]
        position: Option<Position>,
        /// Whether the messages missed since the subscribe's `since` follow.
        #[serde(default)]
        recovered: Option<bool>,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    Pong {
        id: u64,
    },
    Unsubscribed {
        channel: String,
        /// `revoked` or `history_lost`; absent from older nodes.
        #[serde(default)]
        code: Option<String>,
        reason: String,
    },
    Presence {
        id: u64,
        channel: String,
        clients: Vec<PresenceEntry>,
    },
    /// A user's first connection subscribed to a presence-events channel.
    Join(PresenceEvent),
    /// A user's last connection left a presence-events channel.
    Leave(PresenceEvent),
    /// The reply to a history request: the channel's last messages, oldest first, and its
    /// position (that of the last message, or where the channel is when it holds none).
    History {
        id: u64,
        channel: String,
        position: Position,
        messages: Vec<Delivery>,
    },
    Message(Delivery),
}

/// A decoded `message` frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub ts: u64,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub broadcast: Option<bool>,
    /// The message's offset, on history channels.
    #[serde(default)]
    pub offset: Option<u64>,
    /// The epoch of the channel's history, on history channels.
    #[serde(default)]
    pub epoch: Option<String>,
    pub data: serde_json::Value,
}

impl Delivery {
    /// The message's position, on history channels.
    pub fn position(&self) -> Option<Position> {
        Some(Position {
            offset: self.offset?,
            epoch: self.epoch.clone()?,
        })
    }

    /// The delivery's target, or `None` unless exactly one was named.
    pub fn target(&self) -> Option<Target<'_>> {
        match (
            &self.channel,
            &self.user,
            &self.session,
            self.broadcast == Some(true),
        ) {
            (Some(c), None, None, false) => Some(Target::Channel(c)),
            (None, Some(u), None, false) => Some(Target::User(u)),
            (None, None, Some(s), false) => Some(Target::Session(s)),
            (None, None, None, true) => Some(Target::Broadcast),
            _ => None,
        }
    }
}

impl ServerFrame {
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(json: &str) -> Box<RawJson> {
        RawJson::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn welcome_round_trips() {
        let text = encode_welcome("n1.abc", "alice", "n1", 25);
        assert_eq!(
            text,
            r#"{"type":"welcome","session":"n1.abc","user":"alice","node":"n1","ping_interval":25}"#
        );
        assert_eq!(
            ServerFrame::decode(&text).unwrap(),
            ServerFrame::Welcome {
                session: "n1.abc".into(),
                user: "alice".into(),
                node: "n1".into(),
                ping_interval: 25
            }
        );
    }

    #[test]
    fn replies_round_trip() {
        assert_eq!(encode_ack(3), r#"{"type":"ack","id":3}"#);
        assert_eq!(
            ServerFrame::decode(&encode_ack(3)).unwrap(),
            ServerFrame::Ack {
                id: 3,
                position: None,
                recovered: None
            }
        );
        assert_eq!(
            ServerFrame::decode(&encode_pong(4)).unwrap(),
            ServerFrame::Pong { id: 4 }
        );
        assert_eq!(
            encode_unsubscribed("room:1", UNSUBSCRIBED_REVOKED, "token no longer grants it"),
            r#"{"type":"unsubscribed","channel":"room:1","code":"revoked","reason":"token no longer grants it"}"#
        );
        assert_eq!(
            ServerFrame::decode(&encode_unsubscribed(
                "room:1",
                UNSUBSCRIBED_HISTORY_LOST,
                "gone"
            ))
            .unwrap(),
            ServerFrame::Unsubscribed {
                channel: "room:1".into(),
                code: Some("history_lost".into()),
                reason: "gone".into()
            }
        );
        assert_eq!(
            encode_error(None, ErrorCode::BadRequest, "invalid frame"),
            r#"{"type":"error","id":null,"code":"bad_request","message":"invalid frame"}"#
        );
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::RateLimited,
            ErrorCode::TooLarge,
            ErrorCode::Unavailable,
        ] {
            let text = encode_error(Some(9), code, "quote \" and \\ survive");
            assert_eq!(
                ServerFrame::decode(&text).unwrap(),
                ServerFrame::Error {
                    id: Some(9),
                    code,
                    message: "quote \" and \\ survive".into()
                }
            );
        }
    }

    #[test]
    fn message_names_exactly_one_target() {
        let data = raw(r#"{"text":"hi"}"#);
        for target in [
            Target::Channel("room:1"),
            Target::User("bob"),
            Target::Session("n1.s"),
            Target::Broadcast,
        ] {
            let text = encode_message(&MessageRef {
                id: "0190-x",
                ts: 1_700_000_000_000,
                from: Some("alice"),
                target,
                data: &data,
            });
            let ServerFrame::Message(d) = ServerFrame::decode(&text).unwrap() else {
                panic!("{text}")
            };
            assert_eq!(d.target(), Some(target));
            assert_eq!(d.id, "0190-x");
            assert_eq!(d.from.as_deref(), Some("alice"));
            assert_eq!(d.data, serde_json::json!({"text":"hi"}));
        }
    }

    #[test]
    fn message_without_sender_omits_from_and_keeps_data_verbatim() {
        let data = raw(r#"[1, 2.50, "x"]"#);
        let text = encode_message(&MessageRef {
            id: "i",
            ts: 1,
            from: None,
            target: Target::Broadcast,
            data: &data,
        });
        assert_eq!(
            text,
            r#"{"type":"message","id":"i","ts":1,"broadcast":true,"data":[1, 2.50, "x"]}"#
        );
    }

    #[test]
    fn history_frames_carry_positions() {
        assert_eq!(
            encode_subscribed(1, 41, "e1", None),
            r#"{"type":"ack","id":1,"position":{"offset":41,"epoch":"e1"}}"#
        );
        assert_eq!(
            ServerFrame::decode(&encode_subscribed(2, 0, "e2", Some(false))).unwrap(),
            ServerFrame::Ack {
                id: 2,
                position: Some(Position {
                    offset: 0,
                    epoch: "e2".into()
                }),
                recovered: Some(false)
            }
        );
        let data = raw("1");
        let m = MessageRef {
            id: "i",
            ts: 5,
            from: None,
            target: Target::Channel("chat:1"),
            data: &data,
        };
        let text = encode_message_at(&m, 42, "e1");
        assert_eq!(
            text,
            r#"{"type":"message","id":"i","ts":5,"channel":"chat:1","offset":42,"epoch":"e1","data":1}"#
        );
        let ServerFrame::Message(d) = ServerFrame::decode(&text).unwrap() else {
            panic!("{text}")
        };
        assert_eq!(
            d.position(),
            Some(Position {
                offset: 42,
                epoch: "e1".into()
            })
        );
        let ServerFrame::Message(d) = ServerFrame::decode(&encode_message(&m)).unwrap() else {
            panic!()
        };
        assert_eq!(d.position(), None);
    }

    #[test]
    fn presence_round_trips() {
        let clients = [PresenceEntry {
            user: "alice".into(),
            session: "n1.abc".into(),
            node: "n1".into(),
            joined_at: 17,
        }];
        let text = encode_presence(3, "room:1", &clients);
        assert_eq!(
            text,
            r#"{"type":"presence","id":3,"channel":"room:1","clients":[{"user":"alice","session":"n1.abc","node":"n1","joined_at":17}]}"#
        );
        assert_eq!(
            ServerFrame::decode(&text).unwrap(),
            ServerFrame::Presence {
                id: 3,
                channel: "room:1".into(),
                clients: clients.to_vec()
            }
        );
    }

    #[test]
    fn joins_and_leaves_round_trip() {
        let text = encode_presence_event(PresenceKind::Join, "chat:lobby", "bob", "n2.abc");
        assert_eq!(
            text,
            r#"{"type":"join","channel":"chat:lobby","user":"bob","session":"n2.abc"}"#
        );
        let event = PresenceEvent {
            channel: "chat:lobby".into(),
            user: "bob".into(),
            session: "n2.abc".into(),
        };
        assert_eq!(
            ServerFrame::decode(&text).unwrap(),
            ServerFrame::Join(event.clone())
        );
        let text = encode_presence_event(PresenceKind::Leave, "chat:lobby", "bob", "n2.abc");
        assert_eq!(
            text,
            r#"{"type":"leave","channel":"chat:lobby","user":"bob","session":"n2.abc"}"#
        );
        assert_eq!(
            ServerFrame::decode(&text).unwrap(),
            ServerFrame::Leave(event)
        );
        // Names that need escaping survive.
        let text = encode_presence_event(PresenceKind::Leave, "a\"b", "ünï/\\", "n.1");
        let ServerFrame::Leave(e) = ServerFrame::decode(&text).unwrap() else {
            panic!("{text}")
        };
        assert_eq!((e.channel.as_str(), e.user.as_str()), ("a\"b", "ünï/\\"));
        // A frame missing a field is not an event.
        assert!(ServerFrame::decode(r#"{"type":"join","channel":"c","user":"u"}"#).is_err());
        for kind in [PresenceKind::Join, PresenceKind::Leave] {
            assert_eq!(PresenceKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(PresenceKind::parse("left"), None);
    }

    #[test]
    fn history_replies_round_trip() {
        let data = raw(r#"{"text":"hi"}"#);
        let frames: Vec<String> = (41..=42)
            .map(|offset| {
                encode_message_at(
                    &MessageRef {
                        id: "i",
                        ts: 5,
                        from: Some("alice"),
                        target: Target::Channel("chat:1"),
                        data: &data,
                    },
                    offset,
                    "e1",
                )
            })
            .collect();
        let text = encode_history(7, "chat:1", 42, "e1", frames.iter().map(String::as_str));
        assert_eq!(
            text,
            format!(
                r#"{{"type":"history","id":7,"channel":"chat:1","position":{{"offset":42,"epoch":"e1"}},"messages":[{},{}]}}"#,
                frames[0], frames[1]
            )
        );
        let ServerFrame::History {
            id,
            channel,
            position,
            messages,
        } = ServerFrame::decode(&text).unwrap()
        else {
            panic!("{text}")
        };
        assert_eq!((id, channel.as_str()), (7, "chat:1"));
        assert_eq!(
            position,
            Position {
                offset: 42,
                epoch: "e1".into()
            }
        );
        let offsets: Vec<_> = messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [Some(41), Some(42)]);
        assert_eq!(messages[0].target(), Some(Target::Channel("chat:1")));
        assert_eq!(messages[1].data, serde_json::json!({"text":"hi"}));

        // No messages: the position alone. Names are escaped like everywhere else.
        let text = encode_history(8, "chat:\"q\"", 0, "e2", []);
        assert_eq!(
            text,
            r#"{"type":"history","id":8,"channel":"chat:\"q\"","position":{"offset":0,"epoch":"e2"},"messages":[]}"#
        );
        assert_eq!(
            ServerFrame::decode(&text).unwrap(),
            ServerFrame::History {
                id: 8,
                channel: "chat:\"q\"".into(),
                position: Position {
                    offset: 0,
                    epoch: "e2".into()
                },
                messages: Vec::new()
            }
        );
    }

    proptest! {
        #[test]
        fn message_round_trips(id in "[0-9a-f-]{1,36}", ts in any::<u64>(), from in proptest::option::of("\\PC{1,20}"),
                               channel in "\\PC{1,40}", n in any::<i64>(), s in "\\PC*") {
            let data = raw(&serde_json::json!({"n": n, "s": s}).to_string());
            let text = encode_message(&MessageRef { id: &id, ts, from: from.as_deref(), target: Target::Channel(&channel), data: &data });
            let ServerFrame::Message(d) = ServerFrame::decode(&text).unwrap() else { panic!() };
            prop_assert_eq!(d.id, id);
            prop_assert_eq!(d.ts, ts);
            prop_assert_eq!(d.from, from);
            prop_assert_eq!(d.channel, Some(channel));
            prop_assert_eq!(d.data, serde_json::json!({"n": n, "s": s}));
        }
    }
}
