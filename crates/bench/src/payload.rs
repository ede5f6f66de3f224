//! The timestamped payload publishers send and subscribers time.
//!
//! A payload is a JSON string, `"pg <step> <publisher> <seq> <send unix ns> xxxx…"`, padded with
//! `x` to the requested size (the size counts the quotes: it is the exact length of the `data`
//! JSON text, and of the baseline's text message). Plain ASCII, so it needs no escaping and a
//! subscriber reads it without allocating.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch. Publishers and subscribers may be different processes on
/// the same machine, so latency is measured on the shared wall clock.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The smallest payload that still has room for every field at its widest.
pub const MIN_SIZE: usize = 80;

/// Builds a payload of `size` bytes (at least what the fields take).
pub fn make(step: u64, publisher: u32, seq: u64, ts_ns: u64, size: usize) -> String {
    let mut s = String::with_capacity(size.max(MIN_SIZE));
    let _ = write!(s, "\"pg {step} {publisher} {seq} {ts_ns} ");
    while s.len() + 1 < size {
        s.push('x');
    }
    s.push('"');
    s
}

/// One received payload's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub step: u64,
    pub publisher: u32,
    pub seq: u64,
    pub ts_ns: u64,
}

/// Reads a payload as JSON text (with its quotes).
pub fn parse_json(text: &str) -> Option<Stamp> {
    parse(text.strip_prefix('"')?.strip_suffix('"')?)
}

/// Reads a payload's string content (without quotes).
pub fn parse(content: &str) -> Option<Stamp> {
    let mut fields = content.split(' ');
    if fields.next()? != "pg" {
        return None;
    }
    Some(Stamp {
        step: fields.next()?.parse().ok()?,
        publisher: fields.next()?.parse().ok()?,
        seq: fields.next()?.parse().ok()?,
        ts_ns: fields.next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_requested_size() {
        for size in [0, 10, 64, 100, 1000] {
            let p = make(3, 1, 42, 1_700_000_000_123_456_789, size);
            assert_eq!(p.len(), size.max(p.len()));
            if size >= MIN_SIZE {
                assert_eq!(p.len(), size);
            }
            let value: serde_json::Value = serde_json::from_str(&p).unwrap();
            let stamp = Stamp {
                step: 3,
                publisher: 1,
                seq: 42,
                ts_ns: 1_700_000_000_123_456_789,
            };
            assert_eq!(parse_json(&p), Some(stamp));
            assert_eq!(parse(value.as_str().unwrap()), Some(stamp));
        }
    }

    #[test]
    fn widest_fields_fit_the_minimum() {
        let p = make(u64::MAX, u32::MAX, u64::MAX, u64::MAX, 0);
        assert!(p.len() <= MIN_SIZE, "{}", p.len());
    }

    #[test]
    fn rejects_foreign_text() {
        assert_eq!(parse_json("\"hello\""), None);
        assert_eq!(parse_json("{\"barrier\":1}"), None);
        assert_eq!(parse("pg 1 2"), None);
    }
}
