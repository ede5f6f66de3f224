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
    data: &'a RawJson,
}

fn to_string<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs into a String cannot fail: no maps with non-string keys,
    // no user Serialize impls that error.
    serde_json::to_string(value).expect("server frames always serialize")
}

/// `{"type":"message",...}`
pub fn encode_message(m: &MessageRef<'_>) -> String {
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
        reason: &'a str,
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
    to_string(&Reply::Ack { id })
}

pub fn encode_pong(id: u64) -> String {
    to_string(&Reply::Pong { id })
}

/// `{"type":"unsubscribed",...}`: the node ended a subscription (e.g. a refreshed token no
/// longer grants the channel).
pub fn encode_unsubscribed(channel: &str, reason: &str) -> String {
    to_string(&Reply::Unsubscribed { channel, reason })
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
        reason: String,
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
    pub data: serde_json::Value,
}

impl Delivery {
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
            ServerFrame::Ack { id: 3 }
        );
        assert_eq!(
            ServerFrame::decode(&encode_pong(4)).unwrap(),
            ServerFrame::Pong { id: 4 }
        );
        assert_eq!(
            ServerFrame::decode(&encode_unsubscribed("room:1", "revoked")).unwrap(),
            ServerFrame::Unsubscribed {
                channel: "room:1".into(),
                reason: "revoked".into()
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
