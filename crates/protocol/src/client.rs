//! Frames a client sends over the WebSocket.
//!
//! Decoding is two-step so that every failure can still be answered: the text is first read into
//! a loose shape (every field optional), then checked per `type`. A frame that fails the second
//! step still yields its `id`, which the error reply echoes.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};

use crate::RawJson;

/// The last position a client saw on a history channel, sent with a subscribe to recover what
/// it missed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Since<'a> {
    pub offset: u64,
    #[serde(borrow)]
    pub epoch: Cow<'a, str>,
}

/// A request from a client. Every request carries a numeric `id` that the reply echoes.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        id: u64,
        channel: Cow<'a, str>,
        since: Option<Since<'a>>,
        /// On a history channel: send the channel's last `recent` messages after the ack, then
        /// the live ones. Never together with `since`.
        recent: Option<u64>,
    },
    /// The last `limit` messages of a history channel, and its position.
    History {
        id: u64,
        channel: Cow<'a, str>,
        /// Absent: as many as the node allows (`--history-request-limit`).
        limit: Option<u64>,
    },
    /// Who is subscribed to a presence channel.
    Presence {
        id: u64,
        channel: Cow<'a, str>,
    },
    Unsubscribe {
        id: u64,
        channel: Cow<'a, str>,
    },
    Publish {
        id: u64,
        channel: Cow<'a, str>,
        data: &'a RawJson,
    },
    Ping {
        id: u64,
    },
    Refresh {
        id: u64,
        token: Cow<'a, str>,
    },
}

impl PartialEq for ClientFrame<'_> {
    fn eq(&self, other: &Self) -> bool {
        use ClientFrame::*;
        match (self, other) {
            (
                Subscribe {
                    id: a,
                    channel: c,
                    since: x,
                    recent: r,
                },
                Subscribe {
                    id: b,
                    channel: d,
                    since: y,
                    recent: s,
                },
            ) => a == b && c == d && x == y && r == s,
            (
                History {
                    id: a,
                    channel: c,
                    limit: x,
                },
                History {
                    id: b,
                    channel: d,
                    limit: y,
                },
            ) => a == b && c == d && x == y,
            (Unsubscribe { id: a, channel: c }, Unsubscribe { id: b, channel: d })
            | (Presence { id: a, channel: c }, Presence { id: b, channel: d })
            | (Refresh { id: a, token: c }, Refresh { id: b, token: d }) => a == b && c == d,
            (
                Publish {
                    id: a,
                    channel: c,
                    data: x,
                },
                Publish {
                    id: b,
                    channel: d,
                    data: y,
                },
            ) => a == b && c == d && x.get() == y.get(),
            (Ping { id: a }, Ping { id: b }) => a == b,
            _ => false,
        }
    }
}

impl ClientFrame<'_> {
    pub fn id(&self) -> u64 {
        match self {
            Self::Subscribe { id, .. }
            | Self::History { id, .. }
            | Self::Presence { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id }
            | Self::Refresh { id, .. } => *id,
        }
    }
}

/// Why a client frame was rejected; answered with a `bad_request` error frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The frame's `id`, when it had a valid one.
    pub id: Option<u64>,
    pub message: String,
}

impl DecodeError {
    fn new(id: Option<u64>, message: impl Into<String>) -> Self {
        Self {
            id,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Loose<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawJson>,
    #[serde(borrow, default)]
    id: Option<&'a RawJson>,
    #[serde(borrow, default)]
    channel: Option<&'a RawJson>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawJson>,
    #[serde(borrow, default)]
    token: Option<&'a RawJson>,
    #[serde(borrow, default)]
    since: Option<&'a RawJson>,
    #[serde(borrow, default)]
    recent: Option<&'a RawJson>,
    #[serde(borrow, default)]
    limit: Option<&'a RawJson>,
}

/// Reads a string field. Fields stay raw until the frame's `id` is known, so that a field of the
/// wrong type is named in an error that still echoes the `id`.
fn string<'a>(raw: &'a RawJson, name: &str, id: Option<u64>) -> Result<Cow<'a, str>, DecodeError> {
    serde_json::from_str::<Cow<'a, str>>(raw.get())
        .map_err(|_| DecodeError::new(id, format!("\"{name}\" must be a string")))
}

/// Reads an optional count (`recent`, `limit`): a non-negative integer, or null for none.
fn count(raw: Option<&RawJson>, name: &str, id: u64) -> Result<Option<u64>, DecodeError> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<u64>(raw.get())
            .map(Some)
            .map_err(|_| {
                DecodeError::new(
                    Some(id),
                    format!("\"{name}\" must be a non-negative integer"),
                )
            }),
    }
}

/// Keeps `"data": null` apart from a missing `data`: null is a valid payload.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawJson>, D::Error> {
    <&RawJson>::deserialize(d).map(Some)
}

impl<'a> ClientFrame<'a> {
    /// Decodes one text frame.
    pub fn decode(text: &'a str) -> Result<Self, DecodeError> {
        if !crate::is_object(text.as_bytes()) {
            return Err(DecodeError::new(
                None,
                "invalid frame: expected a JSON object",
            ));
        }
        let loose: Loose<'a> = serde_json::from_str(text)
            .map_err(|e| DecodeError::new(None, format!("invalid frame: {e}")))?;
        let id = match loose.id {
            None => None,
            Some(raw) => Some(
                serde_json::from_str::<u64>(raw.get())
                    .map_err(|_| DecodeError::new(None, "\"id\" must be a non-negative integer"))?,
            ),
        };
        let Some(kind) = loose.kind else {
            return Err(DecodeError::new(id, "missing field \"type\""));
        };
        let kind = string(kind, "type", id)?;
        let Some(id) = id else {
            return Err(DecodeError::new(None, "missing field \"id\""));
        };
        let need = |field: Option<&'a RawJson>, name: &str| match field {
            Some(raw) => string(raw, name, Some(id)),
            None => Err(DecodeError::new(
                Some(id),
                format!("{kind} needs \"{name}\""),
            )),
        };
        Ok(match kind.as_ref() {
            "subscribe" => {
                let channel = need(loose.channel, "channel")?;
                let since = match loose.since {
                    None => None,
                    Some(raw) if raw.get() == "null" => None,
                    Some(raw) => Some(
                        crate::is_object(raw.get().as_bytes())
                            .then(|| serde_json::from_str(raw.get()).ok())
                            .flatten()
                            .ok_or_else(|| {
                                DecodeError::new(
                                    Some(id),
                                    "\"since\" must be {\"offset\": <non-negative integer>, \"epoch\": <string>}",
                                )
                            })?,
                    ),
                };
                let recent = count(loose.recent, "recent", id)?;
                if since.is_some() && recent.is_some() {
                    return Err(DecodeError::new(
                        Some(id),
                        "\"since\" and \"recent\" exclude each other: since recovers from a position, recent starts with the last messages",
                    ));
                }
                Self::Subscribe {
                    id,
                    channel,
                    since,
                    recent,
                }
            }
            "history" => Self::History {
                id,
                channel: need(loose.channel, "channel")?,
                limit: count(loose.limit, "limit", id)?,
            },
            "presence" => Self::Presence {
                id,
                channel: need(loose.channel, "channel")?,
            },
            "unsubscribe" => Self::Unsubscribe {
                id,
                channel: need(loose.channel, "channel")?,
            },
            "publish" => Self::Publish {
                id,
                channel: need(loose.channel, "channel")?,
                data: loose
                    .data
                    .ok_or_else(|| DecodeError::new(Some(id), "publish needs \"data\""))?,
            },
            "ping" => Self::Ping { id },
            "refresh" => Self::Refresh {
                id,
                token: need(loose.token, "token")?,
            },
            other => {
                return Err(DecodeError::new(
                    Some(id),
                    format!("unknown type {other:?}"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(text: &str) -> ClientFrame<'_> {
        ClientFrame::decode(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) -> DecodeError {
        ClientFrame::decode(text).expect_err(text)
    }

    #[test]
    fn decodes_every_request() {
        assert_eq!(
            ok(r#"{"type":"subscribe","id":1,"channel":"room:1"}"#),
            ClientFrame::Subscribe {
                id: 1,
                channel: "room:1".into(),
                since: None,
                recent: None
            }
        );
        assert_eq!(
            ok(
                r#"{"type":"subscribe","id":1,"channel":"chat:1","since":{"offset":41,"epoch":"x"}}"#
            ),
            ClientFrame::Subscribe {
                id: 1,
                channel: "chat:1".into(),
                since: Some(Since {
                    offset: 41,
                    epoch: "x".into()
                }),
                recent: None
            }
        );
        assert_eq!(
            ok(r#"{"type":"presence","id":6,"channel":"room:1"}"#),
            ClientFrame::Presence {
                id: 6,
                channel: "room:1".into()
            }
        );
        assert_eq!(
            ok(r#"{"type":"unsubscribe","id":2,"channel":"room:1"}"#),
            ClientFrame::Unsubscribe {
                id: 2,
                channel: "room:1".into()
            }
        );
        match ok(r#"{"type":"publish","id":3,"channel":"c","data":{"a":[1,2]}}"#) {
            ClientFrame::Publish { id, channel, data } => {
                assert_eq!(
                    (id, channel.as_ref(), data.get()),
                    (3, "c", r#"{"a":[1,2]}"#)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ok(r#"{"type":"ping","id":4}"#), ClientFrame::Ping { id: 4 });
        assert_eq!(
            ok(r#"{"id":5,"token":"t.t.t","type":"refresh"}"#),
            ClientFrame::Refresh {
                id: 5,
                token: "t.t.t".into()
            }
        );
    }

    #[test]
    fn decodes_history_and_recent() {
        assert_eq!(
            ok(r#"{"type":"history","id":7,"channel":"chat:1","limit":50}"#),
            ClientFrame::History {
                id: 7,
                channel: "chat:1".into(),
                limit: Some(50)
            }
        );
        for text in [
            r#"{"type":"history","id":7,"channel":"chat:1"}"#,
            r#"{"type":"history","id":7,"channel":"chat:1","limit":null}"#,
        ] {
            assert_eq!(
                ok(text),
                ClientFrame::History {
                    id: 7,
                    channel: "chat:1".into(),
                    limit: None
                },
                "{text}"
            );
        }
        assert_eq!(
            ok(r#"{"type":"history","id":8,"channel":"c","limit":0}"#).id(),
            8
        );
        assert_eq!(
            ok(r#"{"type":"subscribe","id":2,"channel":"chat:1","recent":50}"#),
            ClientFrame::Subscribe {
                id: 2,
                channel: "chat:1".into(),
                since: None,
                recent: Some(50)
            }
        );
        // `null` is no option: a client may send either field as null beside the other.
        assert_eq!(
            ok(
                r#"{"type":"subscribe","id":2,"channel":"chat:1","recent":null,"since":{"offset":3,"epoch":"e"}}"#
            ),
            ClientFrame::Subscribe {
                id: 2,
                channel: "chat:1".into(),
                since: Some(Since {
                    offset: 3,
                    epoch: "e".into()
                }),
                recent: None
            }
        );
        assert_eq!(
            ok(r#"{"type":"subscribe","id":2,"channel":"chat:1","since":null,"recent":0}"#),
            ClientFrame::Subscribe {
                id: 2,
                channel: "chat:1".into(),
                since: None,
                recent: Some(0)
            }
        );
    }

    #[test]
    fn bad_counts_are_refused_with_the_id() {
        for (text, field) in [
            (
                r#"{"type":"history","id":4,"channel":"c","limit":-1}"#,
                "limit",
            ),
            (
                r#"{"type":"history","id":4,"channel":"c","limit":"50"}"#,
                "limit",
            ),
            (
                r#"{"type":"history","id":4,"channel":"c","limit":1.5}"#,
                "limit",
            ),
            (
                r#"{"type":"subscribe","id":4,"channel":"c","recent":-5}"#,
                "recent",
            ),
            (
                r#"{"type":"subscribe","id":4,"channel":"c","recent":true}"#,
                "recent",
            ),
            (
                r#"{"type":"subscribe","id":4,"channel":"c","recent":[50]}"#,
                "recent",
            ),
            (r#"{"type":"history","id":4,"limit":5}"#, "channel"),
            (r#"{"type":"history","id":4,"channel":9}"#, "channel"),
        ] {
            let e = err(text);
            assert_eq!(e.id, Some(4), "{text}");
            assert!(e.message.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn since_and_recent_exclude_each_other() {
        let e = err(
            r#"{"type":"subscribe","id":5,"channel":"c","recent":10,"since":{"offset":1,"epoch":"e"}}"#,
        );
        assert_eq!(e.id, Some(5));
        assert!(
            e.message.contains("since") && e.message.contains("recent"),
            "{e}"
        );
    }

    #[test]
    fn null_data_is_a_payload_and_unknown_fields_are_ignored() {
        match ok(r#"{"type":"publish","id":1,"channel":"c","data":null,"extra":true}"#) {
            ClientFrame::Publish { data, .. } => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        assert_eq!(
            ok(r#"{"type":"subscribe","id":1,"channel":"room\u003a1"}"#),
            ClientFrame::Subscribe {
                id: 1,
                channel: "room:1".into(),
                since: None,
                recent: None
            }
        );
    }

    #[test]
    fn a_bad_since_is_refused_with_the_id() {
        for since in [
            r#""41""#,
            r#"{"offset":-1,"epoch":"x"}"#,
            r#"{"offset":1}"#,
            r#"{"epoch":"x"}"#,
            r#"{"offset":1,"epoch":5}"#,
            "[1]",
            r#"[41,"x"]"#,
        ] {
            let text = format!(r#"{{"type":"subscribe","id":9,"channel":"c","since":{since}}}"#);
            let e = err(&text);
            assert_eq!(e.id, Some(9), "{text}");
            assert!(e.message.contains("since"), "{text}: {e}");
        }
    }

    #[test]
    fn invalid_json_has_no_id() {
        for text in [
            "",
            "{",
            "not json",
            "[1,2]",
            "42",
            r#"{"type":"ping","id":1"#,
        ] {
            let e = err(text);
            assert_eq!(e.id, None, "{text}");
            assert!(e.message.starts_with("invalid frame"), "{text}: {e}");
        }
    }

    #[test]
    fn missing_or_unknown_type_echoes_the_id() {
        let e = err(r#"{"id":7}"#);
        assert_eq!(e.id, Some(7));
        assert!(e.message.contains("type"));
        let e = err(r#"{"type":"shout","id":8}"#);
        assert_eq!(e.id, Some(8));
        assert!(e.message.contains("shout"));
        let e = err(r#"{"type":7,"id":9}"#);
        assert_eq!(e.id, Some(9));
        assert!(e.message.contains("type"), "{e}");
    }

    #[test]
    fn missing_fields_are_named() {
        let cases = [
            (r#"{"type":"subscribe","id":1}"#, "channel"),
            (r#"{"type":"unsubscribe","id":1}"#, "channel"),
            (r#"{"type":"publish","id":1,"data":1}"#, "channel"),
            (r#"{"type":"publish","id":1,"channel":"c"}"#, "data"),
            (r#"{"type":"refresh","id":1}"#, "token"),
            (r#"{"type":"presence","id":1}"#, "channel"),
            (r#"{"type":"ping"}"#, "id"),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert!(e.message.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn fields_of_the_wrong_type_are_named_and_the_id_echoed() {
        for (text, field) in [
            (r#"{"type":"subscribe","id":3,"channel":5}"#, "channel"),
            (r#"{"type":"refresh","id":3,"token":["t"]}"#, "token"),
        ] {
            let e = err(text);
            assert_eq!(e.id, Some(3), "{text}");
            assert!(e.message.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn id_must_be_a_non_negative_integer() {
        for text in [
            r#"{"type":"ping","id":"1"}"#,
            r#"{"type":"ping","id":-1}"#,
            r#"{"type":"ping","id":1.5}"#,
            r#"{"type":"ping","id":null}"#,
        ] {
            let e = err(text);
            assert_eq!(e.id, None, "{text}");
            assert!(e.message.contains("id"), "{text}: {e}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(text in ".*") {
            let _ = ClientFrame::decode(&text);
        }

        #[test]
        fn publish_round_trips(id in any::<u64>(), channel in "[a-z:0-9]{1,20}", n in any::<i64>(), s in ".*") {
            let data = serde_json::json!({"n": n, "s": s});
            let text = serde_json::json!({"type":"publish","id":id,"channel":channel,"data":data}).to_string();
            match ClientFrame::decode(&text) {
                Ok(ClientFrame::Publish { id: got_id, channel: got_channel, data: got_data }) => {
                    prop_assert_eq!(got_id, id);
                    prop_assert_eq!(got_channel.as_ref(), channel.as_str());
                    let parsed: serde_json::Value = serde_json::from_str(got_data.get()).unwrap();
                    prop_assert_eq!(parsed, data);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn history_round_trips(id in any::<u64>(), channel in "\\PC{1,40}", limit in proptest::option::of(any::<u64>())) {
            let text = serde_json::json!({"type":"history","id":id,"channel":channel,"limit":limit}).to_string();
            prop_assert_eq!(
                ClientFrame::decode(&text).unwrap(),
                ClientFrame::History { id, channel: channel.as_str().into(), limit }
            );
        }

        #[test]
        fn subscribe_round_trips(id in any::<u64>(), channel in "\\PC{1,40}") {
            let text = serde_json::json!({"type":"subscribe","id":id,"channel":channel}).to_string();
            prop_assert_eq!(
                ClientFrame::decode(&text).unwrap(),
                ClientFrame::Subscribe { id, channel: channel.as_str().into(), since: None, recent: None }
            );
        }
    }
}
