//! The pushgate wire protocol: what clients send ([`client`]), what the node sends back
//! ([`server`]), what travels between nodes and backends over Redis ([`envelope`]), and the
//! close codes ([`close`]).
//!
//! This crate does no IO. Every frame is a JSON object; decoding borrows from the input where it
//! can, and message payloads (`data`) stay as raw JSON so a node never re-parses or
//! re-serializes what a publisher sent.
#![forbid(unsafe_code)]

pub mod client;
pub mod close;
pub mod envelope;
pub mod names;
pub mod server;

pub use client::{ClientFrame, DecodeError, Since};
pub use envelope::{ControlMessage, Envelope, NodeMessage};
pub use names::{NameError, validate_channel, validate_sharded_channel, validate_user};
pub use server::{ErrorCode, Position, PresenceEntry, PresenceEvent, PresenceKind, Target};

/// The WebSocket subprotocol under which one text message carries one or more server frames,
/// one per line (a frame never holds a line feed).
pub const BATCH_PROTOCOL: &str = "pushgate.batch";

/// Any JSON value, kept as its original text.
pub type RawJson = serde_json::value::RawValue;

/// Whether `json` is (at most) a JSON object. Every frame and envelope must be one: serde would
/// otherwise also read a struct from an array of its fields in order.
pub fn is_object(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}
