//! Channel history: which channels keep it ([`HistoryRule`], [`Policy`]), and the in-memory
//! store the embedded broker keeps it in ([`MemoryHistory`]). With Redis, history lives in Redis
//! (see `broker/pushgate.lua`).
//!
//! A history channel numbers its messages with offsets 1, 2, 3, ... within an epoch: a random ID
//! that changes whenever the history is lost (expired, evicted, deleted), when offsets restart.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wildmatch::WildMatch;

use crate::auth::Patterns;
use crate::hub::Frame;
use crate::lock;

/// Largest history a channel may keep.
pub const MAX_SIZE: u64 = 1_000_000;

/// `PATTERN=SIZE/TTL`: channels matching `pattern` keep their last `size` messages, until `ttl`
/// after the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRule {
    pub pattern: String,
    pub size: u64,
    pub ttl: Duration,
}

impl HistoryRule {
    /// The TTL in whole milliseconds (at least 1), as Redis takes it.
    pub fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }
}

impl FromStr for HistoryRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str = "expected PATTERN=SIZE/TTL, e.g. chat:*=200/10m";
        let (pattern, rest) = s.trim().rsplit_once('=').ok_or(SHAPE)?;
        let (size, ttl) = rest.split_once('/').ok_or(SHAPE)?;
        if pattern.is_empty() {
            return Err(format!("empty pattern: {SHAPE}"));
        }
        let size: u64 = size
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=MAX_SIZE).contains(n))
            .ok_or_else(|| format!("SIZE must be an integer from 1 to {MAX_SIZE}"))?;
        let ttl = humantime::parse_duration(ttl.trim())
            .map_err(|e| format!("TTL: {e} (examples: 10m, 1h, 30s)"))?;
        if ttl < Duration::from_millis(1) {
            return Err("TTL must be at least 1ms".into());
        }
        Ok(Self {
            pattern: pattern.to_owned(),
            size,
            ttl,
        })
    }
}

/// Which channels keep history, which track presence, and which send presence events.
#[derive(Debug, Default)]
pub struct Policy {
    history: Vec<(WildMatch, HistoryRule)>,
    presence: Patterns,
    has_presence: bool,
    presence_events: Patterns,
    has_presence_events: bool,
}

impl Policy {
    pub fn new(history: &[HistoryRule], presence: &[String]) -> Self {
        Self {
            history: history
                .iter()
                .map(|r| (WildMatch::new(&r.pattern), r.clone()))
                .collect(),
            presence: Patterns::new(presence),
            has_presence: !presence.is_empty(),
            presence_events: Patterns::new(&[] as &[String]),
            has_presence_events: false,
        }
    }

    /// Channels matching `patterns` send `join` and `leave` events, and so track presence.
    pub fn with_presence_events(self, patterns: &[String]) -> Self {
        Self {
            presence_events: Patterns::new(patterns),
            has_presence_events: !patterns.is_empty(),
            ..self
        }
    }

    /// Whether subscribers of `channel` get `join` and `leave` events.
    pub fn presence_events(&self, channel: &str) -> bool {
        self.has_presence_events && self.presence_events.allows(channel)
    }

    /// The history rule of `channel`: the first pattern it matches.
    pub fn history(&self, channel: &str) -> Option<&HistoryRule> {
        self.history
            .iter()
            .find(|(p, _)| p.matches(channel))
            .map(|(_, r)| r)
    }

    /// Whether `channel` tracks presence: a `--presence` or a `--presence-events` pattern
    /// matches it.
    pub fn presence(&self, channel: &str) -> bool {
        (self.has_presence && self.presence.allows(channel)) || self.presence_events(channel)
    }

    /// Whether any channel keeps history or tracks presence (the Redis functions are needed).
    pub fn needs_functions(&self) -> bool {
        !self.history.is_empty() || self.has_presence || self.has_presence_events
    }
}

/// What a history read found: the channel's epoch and last offset (`top`), and messages after
/// the offset asked for, oldest first, as message frames.
#[derive(Debug, Clone)]
pub struct HistoryRead {
    pub epoch: Arc<str>,
    pub top: u64,
    pub entries: Vec<(u64, Frame)>,
}

impl HistoryRead {
    /// Whether the entries are exactly the `count` messages after `after`.
    pub fn holds(&self, after: u64, count: u64) -> bool {
        self.entries.len() as u64 >= count
            && self
                .entries
                .iter()
                .take(count as usize)
                .enumerate()
                .all(|(i, (offset, _))| *offset == after + 1 + i as u64)
    }
}

/// A new random epoch: 16 hex digits.
pub fn new_epoch() -> Arc<str> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].into()
}

struct Ring {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<(u64, Frame)>,
    expires: Instant,
}

impl Ring {
    fn new(ttl: Duration) -> Self {
        Self {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            expires: Instant::now() + ttl,
        }
    }

    /// Starts a new epoch if this one expired.
    fn refresh(&mut self, now: Instant, ttl: Duration) {
        if now >= self.expires {
            *self = Self::new(ttl);
        }
    }
}

/// The embedded broker's history: a ring buffer per channel, with the same semantics as the
/// Redis functions (epoch, offsets, size, TTL).
pub struct MemoryHistory {
    channels: Mutex<HashMap<Arc<str>, Arc<Mutex<Ring>>>>,
    next_sweep: Mutex<Instant>,
}

/// How often expired channels are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Default for MemoryHistory {
    fn default() -> Self {
        Self {
            channels: Mutex::default(),
            next_sweep: Mutex::new(Instant::now() + SWEEP_EVERY),
        }
    }
}

impl MemoryHistory {
    fn ring(&self, channel: &str, ttl: Duration) -> Arc<Mutex<Ring>> {
        let now = Instant::now();
        let mut channels = lock(&self.channels);
        {
            let mut next = lock(&self.next_sweep);
            if now >= *next {
                *next = now + SWEEP_EVERY;
                // A ring in use elsewhere is kept: its user refreshes it under its own lock.
                channels.retain(|_, r| Arc::strong_count(r) > 1 || lock(r).expires > now);
            }
        }
        match channels.get(channel) {
            Some(r) => r.clone(),
            None => {
                let ring = Arc::new(Mutex::new(Ring::new(ttl)));
                channels.insert(channel.into(), ring.clone());
                ring
            }
        }
    }

    /// Appends a message to `channel`. `build` makes its frame from its offset and epoch;
    /// `deliver` runs while the channel is locked, so messages are delivered in offset order.
    pub fn publish<R>(
        &self,
        channel: &str,
        rule: &HistoryRule,
        build: impl FnOnce(u64, &Arc<str>) -> Frame,
        deliver: impl FnOnce(&Frame, u64, &Arc<str>) -> R,
    ) -> (u64, Arc<str>, R) {
        let ring = self.ring(channel, rule.ttl);
        let mut ring = lock(&ring);
        let now = Instant::now();
        ring.refresh(now, rule.ttl);
        ring.top += 1;
        let offset = ring.top;
        let epoch = ring.epoch.clone();
        let frame = build(offset, &epoch);
        ring.entries.push_back((offset, frame.clone()));
        while ring.entries.len() as u64 > rule.size {
            ring.entries.pop_front();
        }
        ring.expires = now + rule.ttl;
        let delivered = deliver(&frame, offset, &epoch);
        (offset, epoch, delivered)
    }

    /// The channel's epoch and top, and up to `limit` messages after `after`. Like the Redis
    /// function, a channel without history gets an epoch here.
    pub fn read(&self, channel: &str, after: u64, limit: u64, ttl: Duration) -> HistoryRead {
        let ring = self.ring(channel, ttl);
        let mut ring = lock(&ring);
        ring.refresh(Instant::now(), ttl);
        let entries = ring
            .entries
            .iter()
            .filter(|(o, _)| *o > after)
            .take(limit.min(usize::MAX as u64) as usize)
            .cloned()
            .collect();
        HistoryRead {
            epoch: ring.epoch.clone(),
            top: ring.top,
            entries,
        }
    }

    /// Forgets `channel`'s history (tests: the equivalent of deleting the Redis keys).
    pub fn forget(&self, channel: &str) {
        lock(&self.channels).remove(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(size: u64, ttl: Duration) -> HistoryRule {
        HistoryRule {
            pattern: "*".into(),
            size,
            ttl,
        }
    }

    fn publish(h: &MemoryHistory, channel: &str, r: &HistoryRule, text: &str) -> (u64, Arc<str>) {
        let (offset, epoch, ()) = h.publish(channel, r, |_, _| Frame::from(text), |_, _, _| ());
        (offset, epoch)
    }

    #[test]
    fn rules_parse() {
        let r: HistoryRule = "chat:*=200/10m".parse().unwrap();
        assert_eq!(
            (r.pattern.as_str(), r.size, r.ttl_ms()),
            ("chat:*", 200, 600_000)
        );
        let r: HistoryRule = "a=b=3/1s".parse().unwrap();
        assert_eq!((r.pattern.as_str(), r.size), ("a=b", 3));
        for bad in ["", "x", "x=1", "x=/1s", "x=0/1s", "x=1/", "x=1/0s", "=1/1s"] {
            assert!(bad.parse::<HistoryRule>().is_err(), "{bad:?}");
        }
        assert!(
            format!("x={}/1s", MAX_SIZE + 1)
                .parse::<HistoryRule>()
                .is_err()
        );
    }

    #[test]
    fn the_first_matching_pattern_wins() {
        let rules = [
            "chat:vip:*=5/1m".parse().unwrap(),
            "chat:*=200/10m".parse().unwrap(),
        ];
        let p = Policy::new(&rules, &["room:*".into()]);
        assert_eq!(p.history("chat:vip:1").map(|r| r.size), Some(5));
        assert_eq!(p.history("chat:1").map(|r| r.size), Some(200));
        assert_eq!(p.history("room:1"), None);
        assert!(p.presence("room:1") && !p.presence("chat:1"));
        assert!(!Policy::new(&[], &[]).presence("x"));
        // Presence events imply presence.
        let p = Policy::new(&[], &["room:*".into()]).with_presence_events(&["chat:*".into()]);
        assert!(p.presence("room:1") && p.presence("chat:1") && !p.presence("x"));
        assert!(p.presence_events("chat:1") && !p.presence_events("room:1"));
        let p = Policy::new(&[], &[]).with_presence_events(&["chat:*".into()]);
        assert!(p.presence("chat:1") && p.needs_functions());
        assert!(!Policy::new(&[], &[]).needs_functions());
    }

    #[test]
    fn offsets_count_up_within_an_epoch_and_history_is_trimmed() {
        let h = MemoryHistory::default();
        let r = rule(3, Duration::from_secs(60));
        let read = h.read("c", 0, 10, r.ttl);
        assert_eq!((read.top, read.entries.len()), (0, 0));
        let epoch = read.epoch.clone();
        for n in 1..=5 {
            assert_eq!(publish(&h, "c", &r, &format!("m{n}")), (n, epoch.clone()));
        }
        let read = h.read("c", 0, 10, r.ttl);
        assert_eq!((read.top, &read.epoch), (5, &epoch));
        let offsets: Vec<u64> = read.entries.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, [3, 4, 5]);
        assert!(read.holds(2, 3));
        assert!(!read.holds(1, 4), "offset 2 was trimmed");
        let read = h.read("c", 3, 1, r.ttl);
        assert_eq!(read.entries, vec![(4, Frame::from("m4"))]);
        // Another channel has its own epoch and offsets.
        let (offset, other) = publish(&h, "d", &r, "x");
        assert_eq!(offset, 1);
        assert_ne!(other, epoch);
    }

    #[test]
    fn an_expired_or_forgotten_history_starts_a_new_epoch() {
        let h = MemoryHistory::default();
        let r = rule(10, Duration::from_millis(30));
        let (_, first) = publish(&h, "c", &r, "a");
        publish(&h, "c", &r, "b");
        std::thread::sleep(Duration::from_millis(40));
        let (offset, second) = publish(&h, "c", &r, "c");
        assert_eq!(offset, 1);
        assert_ne!(first, second);
        h.forget("c");
        let read = h.read("c", 0, 10, r.ttl);
        assert_ne!(read.epoch, second);
        assert_eq!((read.top, read.entries.len()), (0, 0));
    }

    #[test]
    fn delivery_runs_under_the_channel_lock_in_offset_order() {
        let h = Arc::new(MemoryHistory::default());
        let r = rule(1000, Duration::from_secs(60));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (h, r, seen) = (h.clone(), r.clone(), seen.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        h.publish(
                            "c",
                            &r,
                            |_, _| Frame::from("m"),
                            |_, o, _| lock(&seen).push(o),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seen = lock(&seen);
        assert_eq!(*seen, (1..=800).collect::<Vec<u64>>());
    }
}
