//! What travels over Redis Pub/Sub.
//!
//! Channels, under a configurable prefix (`pushgate` by default):
//! - `{prefix}:ch:{channel}`, `{prefix}:user:{user}`, `{prefix}:broadcast`: an [`Envelope`].
//!   Backends publish here directly; they may leave out everything but `data`.
//! - `{prefix}:node:{instance}`: a [`NodeMessage`] for one node (session deliveries, liveness probes).
//! - `{prefix}:control`: a [`ControlMessage`] for every node (disconnects, heartbeats).
//!
//! On a history channel the envelope also carries its [`Stamp`] (`offset` and `epoch`), put in
//! by the `pushgate_publish` Redis function that appends it to the channel's history.
//!
//! A channel topic also carries the joins and leaves of a presence-events channel
//! ([`PresenceChange`]), which the presence Redis functions publish there: a channel topic's
//! payload is a [`ChannelPayload`].

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::RawJson;
use crate::server::PresenceKind;

/// Longest `id` accepted from a publisher, in bytes.
pub const MAX_ID_BYTES: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("missing field \"data\"")]
    MissingData,
    #[error("\"id\" must be 1 to {MAX_ID_BYTES} bytes")]
    BadId,
    #[error("missing field \"session\"")]
    MissingSession,
    #[error(
        "\"offset\" (a positive integer) and \"epoch\" (1 to 64 of A-Z a-z 0-9 - _) go together"
    )]
    BadStamp,
    #[error("a presence event needs \"presence\" (join or leave), \"user\" and \"session\"")]
    BadPresence,
}

/// Where a message sits in a history channel: its offset and the history's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub offset: u64,
    pub epoch: Cow<'a, str>,
}

/// Whether `epoch` can be an epoch: 1 to 64 characters of `A-Z a-z 0-9 - _`. Epochs appear in
/// SSE event IDs, so nothing that could break a line or a list may pass.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= 64
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A message for clients, as carried on a channel, user or broadcast topic.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    /// Filled in by the receiving node when a backend leaves it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// Unix milliseconds; filled in when missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// The publishing user, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Cow<'a, str>>,
    /// The publishing node's instance ID. Backends leave it out so that every node delivers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Cow<'a, str>>,
    pub data: &'a RawJson,
}

impl PartialEq for Envelope<'_> {
    fn eq(&self, other: &Self) -> bool {
        (&self.id, self.ts, &self.from, &self.origin, self.data.get())
            == (
                &other.id,
                other.ts,
                &other.from,
                &other.origin,
                other.data.get(),
            )
    }
}

#[derive(Deserialize)]
struct Loose<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    origin: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawJson>,
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    probe: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    offset: Option<&'a RawJson>,
    #[serde(borrow, default)]
    epoch: Option<&'a RawJson>,
    /// Read only from payloads without `data` (a presence change): an envelope may carry any
    /// other fields, these included.
    #[serde(borrow, default)]
    presence: Option<&'a RawJson>,
    #[serde(borrow, default)]
    user: Option<&'a RawJson>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawJson>, D::Error> {
    <&RawJson>::deserialize(d).map(Some)
}

impl<'a> Loose<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, EnvelopeError> {
        if !crate::is_object(payload) {
            return Err(EnvelopeError::Json("expected a JSON object".into()));
        }
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::Json(e.to_string()))
    }

    fn into_envelope(self) -> Result<Envelope<'a>, EnvelopeError> {
        if let Some(id) = &self.id
            && (id.is_empty() || id.len() > MAX_ID_BYTES)
        {
            return Err(EnvelopeError::BadId);
        }
        Ok(Envelope {
            id: self.id,
            ts: self.ts,
            from: self.from,
            origin: self.origin,
            data: self.data.ok_or(EnvelopeError::MissingData)?,
        })
    }
}

impl<'a> Envelope<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, EnvelopeError> {
        Loose::parse(payload)?.into_envelope()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes always serialize")
    }

    /// Decodes an envelope and its history [`Stamp`], when it has one (both `offset` and
    /// `epoch`, or neither).
    pub fn decode_stamped(payload: &'a [u8]) -> Result<(Self, Option<Stamp<'a>>), EnvelopeError> {
        let mut loose = Loose::parse(payload)?;
        let stamp = loose.take_stamp()?;
        Ok((loose.into_envelope()?, stamp))
    }
}

impl<'a> Loose<'a> {
    fn take_stamp(&mut self) -> Result<Option<Stamp<'a>>, EnvelopeError> {
        Ok(match (self.offset.take(), self.epoch.take()) {
            (None, None) => None,
            (Some(offset), Some(epoch)) => {
                let offset = serde_json::from_str::<u64>(offset.get())
                    .ok()
                    .filter(|&o| o > 0)
                    .ok_or(EnvelopeError::BadStamp)?;
                let epoch = serde_json::from_str::<Cow<'a, str>>(epoch.get())
                    .ok()
                    .filter(|e| valid_epoch(e))
                    .ok_or(EnvelopeError::BadStamp)?;
                Some(Stamp { offset, epoch })
            }
            _ => return Err(EnvelopeError::BadStamp),
        })
    }
}

/// A join or leave on a presence-events channel, as carried on the channel's topic:
/// `{"presence":"join","user":"bob","session":"n2.0301…"}`. The presence functions of the
/// `pushgate` Redis library publish these; every node delivers each to its subscribers of the
/// channel as a `join` or `leave` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange<'a> {
    pub kind: PresenceKind,
    pub user: Cow<'a, str>,
    pub session: Cow<'a, str>,
}

impl PresenceChange<'_> {
    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'b> {
            presence: &'b str,
            user: &'b str,
            session: &'b str,
        }
        serde_json::to_vec(&Out {
            presence: self.kind.as_str(),
            user: &self.user,
            session: &self.session,
        })
        .expect("presence changes always serialize")
    }
}

/// What a channel topic carries: a message (with its [`Stamp`] on history channels), or a
/// presence change.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelPayload<'a> {
    Message(Envelope<'a>, Option<Stamp<'a>>),
    Presence(PresenceChange<'a>),
}

impl<'a> ChannelPayload<'a> {
    /// A payload with a `presence` field and no `data` is a presence change; anything else an
    /// envelope, read as [`Envelope::decode_stamped`] does.
    pub fn decode(payload: &'a [u8]) -> Result<Self, EnvelopeError> {
        let mut loose = Loose::parse(payload)?;
        if loose.data.is_none()
            && let Some(kind) = loose.presence.take()
        {
            let text =
                |raw: Option<&'a RawJson>| serde_json::from_str::<Cow<'a, str>>(raw?.get()).ok();
            let kind = text(Some(kind)).and_then(|k| PresenceKind::parse(&k));
            let (Some(kind), Some(user), Some(session)) =
                (kind, text(loose.user.take()), loose.session.take())
            else {
                return Err(EnvelopeError::BadPresence);
            };
            return Ok(Self::Presence(PresenceChange {
                kind,
                user,
                session,
            }));
        }
        let stamp = loose.take_stamp()?;
        Ok(Self::Message(loose.into_envelope()?, stamp))
    }
}

/// A message on a node's own topic.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeMessage<'a> {
    /// Deliver to one local session.
    Deliver {
        session: Cow<'a, str>,
        envelope: Envelope<'a>,
    },
    /// A liveness probe the node sent itself; seeing it proves the subscription works.
    Probe { nonce: Cow<'a, str> },
}

impl<'a> NodeMessage<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, EnvelopeError> {
        let mut loose = Loose::parse(payload)?;
        if let Some(nonce) = loose.probe.take() {
            return Ok(Self::Probe { nonce });
        }
        let session = loose.session.take().ok_or(EnvelopeError::MissingSession)?;
        Ok(Self::Deliver {
            session,
            envelope: loose.into_envelope()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Deliver<'b> {
            session: &'b str,
            #[serde(flatten)]
            envelope: &'b Envelope<'b>,
        }
        #[derive(Serialize)]
        struct Probe<'b> {
            probe: &'b str,
        }
        let encoded = match self {
            Self::Deliver { session, envelope } => {
                serde_json::to_vec(&Deliver { session, envelope })
            }
            Self::Probe { nonce } => serde_json::to_vec(&Probe { probe: nonce }),
        };
        encoded.expect("node messages always serialize")
    }
}

/// What one node tells every other node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Close every connection of `user`, with close code 4003.
    Disconnect { user: String, origin: String },
    /// Sent by every node at a fixed interval; a node unheard of for three intervals is gone.
    Heartbeat(NodeStats),
}

/// A node's view of itself, as published in its heartbeat.
///
/// Fields after `draining` came later: each has a default, so that nodes of different versions
/// read each other's heartbeats (a field a node does not send reads as 0, empty or false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub node: String,
    pub connections: u64,
    pub users: u64,
    pub channels: u64,
    pub draining: bool,
    /// Seconds since the node started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// `redis` or `embedded`.
    #[serde(default)]
    pub broker: String,
    /// Whether the broker is connected and subscribed (always true when embedded).
    #[serde(default)]
    pub broker_ready: bool,
    /// The base URL other nodes reach this node's `/healthz` at, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Frames written into client queues since the node started: two samples make a rate.
    #[serde(default)]
    pub deliveries: u64,
    /// Unix milliseconds when these figures were taken, the time base for such rates.
    #[serde(default)]
    pub ts: u64,
    /// The node's busiest channels by local subscribers, most first, at most a fixed few: all of
    /// its channels when `channels` is no more than their count.
    #[serde(default)]
    pub top_channels: Vec<ChannelCount>,
}

/// A channel and how many subscribers it has (on one node, or summed over several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCount {
    pub channel: String,
    pub subscribers: u64,
}

impl ControlMessage {
    pub fn decode(payload: &[u8]) -> Result<Self, EnvelopeError> {
        if !crate::is_object(payload) {
            return Err(EnvelopeError::Json("expected a JSON object".into()));
        }
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::Json(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("control messages always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_backend_may_send_data_alone() {
        let e = Envelope::decode(br#"{"data":{"score":"2-1"}}"#).unwrap();
        assert_eq!((e.id, e.ts, e.from, e.origin), (None, None, None, None));
        assert_eq!(e.data.get(), r#"{"score":"2-1"}"#);
    }

    #[test]
    fn envelope_round_trips() {
        let data = RawJson::from_string("[1,true,null]".into()).unwrap();
        let e = Envelope {
            id: Some("0190".into()),
            ts: Some(17),
            from: Some("alice".into()),
            origin: Some("node-a".into()),
            data: &data,
        };
        let bytes = e.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn bad_envelopes_are_rejected_with_a_reason() {
        assert_eq!(
            Envelope::decode(br#"{"id":"x"}"#),
            Err(EnvelopeError::MissingData)
        );
        assert_eq!(
            Envelope::decode(br#"{"id":"","data":1}"#),
            Err(EnvelopeError::BadId)
        );
        let long = format!(r#"{{"id":"{}","data":1}}"#, "x".repeat(MAX_ID_BYTES + 1));
        assert_eq!(Envelope::decode(long.as_bytes()), Err(EnvelopeError::BadId));
        for bad in [
            &b"not json"[..],
            b"",
            b"[1]",
            br#"{"data":1,"ts":-5}"#,
            br#"{"data":1,"id":5}"#,
            b"\xff\xfe",
        ] {
            assert!(
                matches!(Envelope::decode(bad), Err(EnvelopeError::Json(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stamps_are_read_when_present() {
        let (e, stamp) =
            Envelope::decode_stamped(br#"{"offset":7,"epoch":"a1b2","id":"x","data":[1]}"#)
                .unwrap();
        assert_eq!(
            stamp,
            Some(Stamp {
                offset: 7,
                epoch: "a1b2".into()
            })
        );
        assert_eq!((e.id.as_deref(), e.data.get()), (Some("x"), "[1]"));
        let (_, stamp) = Envelope::decode_stamped(br#"{"data":1}"#).unwrap();
        assert_eq!(stamp, None);
        for bad in [
            &br#"{"offset":7,"data":1}"#[..],
            br#"{"epoch":"e","data":1}"#,
            br#"{"offset":0,"epoch":"e","data":1}"#,
            br#"{"offset":"7","epoch":"e","data":1}"#,
            br#"{"offset":7,"epoch":"","data":1}"#,
            br#"{"offset":7,"epoch":"a,b","data":1}"#,
            br#"{"offset":7,"epoch":"a\u000ab","data":1}"#,
        ] {
            assert_eq!(
                Envelope::decode_stamped(bad).map(|(_, s)| s),
                Err(EnvelopeError::BadStamp),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Plain decoding ignores stamps.
        assert!(Envelope::decode(br#"{"offset":"x","data":1}"#).is_ok());
    }

    #[test]
    fn channel_topics_carry_messages_and_presence_changes() {
        let change = PresenceChange {
            kind: PresenceKind::Join,
            user: "bob \"b\"".into(),
            session: "n2.abc".into(),
        };
        let bytes = change.encode();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            r#"{"presence":"join","user":"bob \"b\"","session":"n2.abc"}"#
        );
        assert_eq!(
            ChannelPayload::decode(&bytes).unwrap(),
            ChannelPayload::Presence(change)
        );
        // As the Redis functions write it (cjson escapes '/').
        assert_eq!(
            ChannelPayload::decode(br#"{"presence":"leave","user":"a\/b","session":"n1.x"}"#)
                .unwrap(),
            ChannelPayload::Presence(PresenceChange {
                kind: PresenceKind::Leave,
                user: "a/b".into(),
                session: "n1.x".into(),
            })
        );
        // Messages read as before, stamps included; an envelope may carry fields named like
        // these.
        let ChannelPayload::Message(e, stamp) = ChannelPayload::decode(
            br#"{"offset":3,"epoch":"e1","data":{"x":1},"presence":"join","user":5}"#,
        )
        .unwrap() else {
            panic!("not a message")
        };
        assert_eq!(e.data.get(), r#"{"x":1}"#);
        assert_eq!(stamp.map(|s| s.offset), Some(3));
        assert!(matches!(
            ChannelPayload::decode(br#"{"data":1}"#),
            Ok(ChannelPayload::Message(_, None))
        ));
        for bad in [
            &br#"{"presence":"joined","user":"u","session":"s"}"#[..],
            br#"{"presence":"join","session":"s"}"#,
            br#"{"presence":"join","user":"u"}"#,
            br#"{"presence":1,"user":"u","session":"s"}"#,
            br#"{"presence":"leave","user":7,"session":"s"}"#,
        ] {
            assert_eq!(
                ChannelPayload::decode(bad),
                Err(EnvelopeError::BadPresence),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            ChannelPayload::decode(br#"{"id":"x"}"#),
            Err(EnvelopeError::MissingData)
        );
    }

    #[test]
    fn null_data_is_kept() {
        assert_eq!(
            Envelope::decode(br#"{"data":null}"#).unwrap().data.get(),
            "null"
        );
    }

    #[test]
    fn node_messages_round_trip() {
        let data = RawJson::from_string(r#""hi""#.into()).unwrap();
        let deliver = NodeMessage::Deliver {
            session: "n1.abc".into(),
            envelope: Envelope {
                id: Some("i".into()),
                ts: Some(1),
                from: None,
                origin: Some("n2".into()),
                data: &data,
            },
        };
        assert_eq!(NodeMessage::decode(&deliver.encode()).unwrap(), deliver);
        let probe = NodeMessage::Probe { nonce: "42".into() };
        assert_eq!(NodeMessage::decode(&probe.encode()).unwrap(), probe);
        assert_eq!(
            NodeMessage::decode(br#"{"data":1}"#),
            Err(EnvelopeError::MissingSession)
        );
        assert_eq!(
            NodeMessage::decode(br#"{"session":"s"}"#),
            Err(EnvelopeError::MissingData)
        );
    }

    #[test]
    fn control_messages_round_trip() {
        let msgs = [
            ControlMessage::Disconnect {
                user: "alice".into(),
                origin: "n1".into(),
            },
            ControlMessage::Heartbeat(NodeStats {
                node: "n1".into(),
                connections: 3,
                users: 2,
                channels: 1,
                draining: false,
                uptime_secs: 60,
                broker: "redis".into(),
                broker_ready: true,
                url: Some("http://10.0.0.5:8080".into()),
                deliveries: 1234,
                ts: 1_700_000_000_000,
                top_channels: vec![ChannelCount {
                    channel: "room:1".into(),
                    subscribers: 3,
                }],
            }),
        ];
        for m in msgs {
            assert_eq!(ControlMessage::decode(&m.encode()).unwrap(), m);
        }
        assert!(ControlMessage::decode(br#"{"op":"reboot"}"#).is_err());
        assert!(ControlMessage::decode(br#"{"op":"disconnect"}"#).is_err());
    }

    #[test]
    fn heartbeats_of_older_nodes_still_decode() {
        let old = br#"{"op":"heartbeat","node":"n0","connections":2,"users":1,"channels":1,"draining":false}"#;
        let ControlMessage::Heartbeat(stats) = ControlMessage::decode(old).unwrap() else {
            panic!("not a heartbeat");
        };
        assert_eq!((stats.node.as_str(), stats.connections), ("n0", 2));
        assert_eq!((stats.uptime_secs, stats.deliveries, stats.ts), (0, 0, 0));
        assert_eq!((stats.broker.as_str(), stats.broker_ready), ("", false));
        assert!(stats.top_channels.is_empty());
        // And what a newer node sends has every field an older one requires.
        let beat = ControlMessage::Heartbeat(stats).encode();
        let value: serde_json::Value = serde_json::from_slice(&beat).unwrap();
        for field in ["node", "connections", "users", "channels", "draining"] {
            assert!(value.get(field).is_some(), "{field} missing from {value}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&bytes);
            let _ = NodeMessage::decode(&bytes);
            let _ = ControlMessage::decode(&bytes);
            let _ = Envelope::decode_stamped(&bytes);
            let _ = ChannelPayload::decode(&bytes);
        }

        #[test]
        fn envelope_round_trips_any_fields(id in proptest::option::of("\\PC{1,30}"), ts in proptest::option::of(any::<u64>()),
                                           from in proptest::option::of("\\PC{0,20}"), s in "\\PC*") {
            let data = RawJson::from_string(serde_json::to_string(&s).unwrap()).unwrap();
            let e = Envelope { id: id.map(Cow::Owned), ts, from: from.map(Cow::Owned), origin: None, data: &data };
            let bytes = e.encode();
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        }
    }
}
