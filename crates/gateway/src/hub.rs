//! This node's sessions, indexed by connection, user and channel, and local fan-out.
//!
//! Fan-out never waits: a frame is offered to each recipient's bounded queue, and a recipient
//! whose queue is full is closed as a slow consumer. The frame is one shared, reference-counted
//! buffer, so a delivery to 10,000 sessions copies no message bytes.
//!
//! A message of a history channel is queued with a [`Tag`] (its channel, epoch and offset),
//! shared by every recipient, which the session uses to deliver in offset order without
//! duplicates and to fill gaps from history. The hub also remembers, per local history channel,
//! the last position it delivered, so that the node can catch up after its Redis subscription
//! was interrupted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use pushgate_protocol::close;
use pushgate_websocket::{Compression, SharedFrame};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::Drops;

/// An encoded text frame, shared by every recipient, with the timestamp of the message it
/// carries: the delivery lag is measured from it when the frame is written to a socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub text: Utf8Bytes,
    /// The same text as a WebSocket message, compressed at most once for all recipients.
    pub shared: SharedFrame,
    /// The message's `ts` (Unix milliseconds); 0 for a frame that is not a message.
    pub ts: u64,
}

impl Frame {
    pub fn message(mut text: String, ts: u64) -> Self {
        // A frame is JSON, where a line break (LF, CR) can only be whitespace (a string cannot
        // hold one unescaped), so as a space it means the same. Without line feeds, a batch
        // (`pushgate.batch`) can put one frame per line; without CRs, an SSE event carries the
        // frame as one data line for every client. Data published by backends may be
        // pretty-printed: this is the one place that holds it to that, once per message.
        if text.contains(['\n', '\r']) {
            text = text.replace(['\n', '\r'], " ");
        }
        Self {
            ts,
            ..Self::verbatim(text.into())
        }
    }

    /// `text` as it is, for every connection it goes to (what `/echo` sends back).
    pub fn verbatim(text: Utf8Bytes) -> Self {
        Self {
            shared: SharedFrame::new(Bytes::from(text.clone()), Compression::default()),
            text,
            ts: 0,
        }
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self::message(text, 0)
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Self {
        Self::message(text.to_owned(), 0)
    }
}

/// A queue that holds more than this many frames' worth of capacity gives it back once drained.
const KEEP_CAPACITY: usize = 32;

/// Where a queued message sits in its history channel. One per message, shared by every
/// recipient.
#[derive(Debug, PartialEq, Eq)]
pub struct Tag {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    pub offset: u64,
}

impl Tag {
    /// The offset of a notice that messages of `epoch` were lost for good.
    pub const LOST: u64 = u64::MAX;

    /// Whether this is a notice, not a message: messages of the epoch were lost and cannot be
    /// recovered, so subscribers still on that epoch must recover themselves.
    pub fn is_lost(&self) -> bool {
        self.offset == Self::LOST
    }
}

/// One queued delivery: the shared frame and, on history channels, its tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub frame: Frame,
    pub tag: Option<Arc<Tag>>,
}

/// The hub's side of one connection: its outbound queue and a way to close it.
///
/// The queue is a plain `VecDeque` behind a mutex rather than a channel: it allocates nothing
/// while a connection is idle, which is what most connections are most of the time.
///
/// `repr(C)` keeps what queueing touches (the close code, the lock, the queue's header) at the
/// front, so that a fan-out to thousands of sessions takes one cache miss per session for them
/// rather than two.
#[repr(C)]
pub struct SessionHandle {
    /// The close code asked for; 0 while none is.
    close_code: AtomicU16,
    queue: Mutex<VecDeque<Queued>>,
    capacity: usize,
    /// Wakes the session's task: frames were queued, or a close was asked for.
    wake: Notify,
    pub id: Uuid,
    pub user: Arc<str>,
}

impl SessionHandle {
    pub fn new(user: Arc<str>, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            id: Uuid::new_v4(),
            user,
            queue: Mutex::default(),
            capacity: capacity.max(1),
            close_code: AtomicU16::new(0),
            wake: Notify::new(),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting. Returns whether it was queued.
    fn deliver(&self, frame: &Frame, tag: Option<&Arc<Tag>>, drops: &Drops) -> bool {
        self.enqueue(frame, tag, drops, false)
    }

    /// Queues a frame unless the queue is full (a full queue closes the session as a slow
    /// consumer) or, when `spare`, at least half full (then the frame is skipped: a history
    /// message the session can read back from history when it notices the gap).
    fn enqueue(&self, frame: &Frame, tag: Option<&Arc<Tag>>, drops: &Drops, spare: bool) -> bool {
        if self.close_code().is_some() {
            drops.closed.inc();
            return false;
        }
        let mut queue = self.queue();
        if spare && queue.len() >= self.capacity / 2 {
            return false;
        }
        if queue.len() >= self.capacity {
            drop(queue);
            if self.close(close::SLOW_CONSUMER) {
                drops.slow_consumer.inc();
            }
            return false;
        }
        let was_empty = queue.is_empty();
        queue.push_back(Queued {
            frame: frame.clone(),
            tag: tag.cloned(),
        });
        drop(queue);
        // A non-empty queue already has a wake-up pending, or a session about to look again.
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// The next queued delivery, if any.
    #[cfg(test)]
    pub fn next_entry(&self) -> Option<Queued> {
        let mut queue = self.queue();
        let entry = queue.pop_front();
        release_spare(&mut queue);
        entry
    }

    /// Moves up to `max` queued deliveries, oldest first, into `out` (empty) under one lock: a
    /// session writing a backlog takes the lock once per batch, not once per frame. The two
    /// buffers trade places, so neither side allocates while a backlog drains.
    pub fn take_batch(&self, out: &mut VecDeque<Queued>, max: usize) {
        debug_assert!(out.is_empty());
        let mut queue = self.queue();
        if queue.len() <= max {
            std::mem::swap(&mut *queue, out);
        } else {
            out.extend(queue.drain(..max));
        }
    }

    /// The next queued frame, if any (without its tag).
    #[cfg(test)]
    pub fn next_frame(&self) -> Option<Frame> {
        self.next_entry().map(|q| q.frame)
    }

    /// Asks the session's task to look again when it stopped with frames left: in its own
    /// batch (`taken`), or still queued here.
    pub fn rewake_if_pending(&self, taken: bool) {
        if taken || !self.queue().is_empty() {
            self.wake.notify_one();
        }
    }

    /// Asks the session to close with `code`. The first request wins; returns whether this was it.
    pub fn close(&self, code: u16) -> bool {
        let first = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.wake.notify_one();
        }
        first
    }

    pub fn close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Resolves when frames were queued or a close was asked for.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// Gives back a drained queue's buffer once a backlog made it large: an idle connection keeps
/// at most a small one.
pub fn release_spare(queue: &mut VecDeque<Queued>) {
    if queue.is_empty() && queue.capacity() > KEEP_CAPACITY {
        *queue = VecDeque::new();
    }
}

type Members = HashMap<Uuid, Arc<SessionHandle>>;

/// Per channel: the epoch and the highest offset seen.
type Positions = HashMap<Arc<str>, (Arc<str>, u64)>;

/// Local sessions. Locks are held only for map updates and for queueing (never across an await).
pub struct Hub {
    sessions: RwLock<Members>,
    users: RwLock<HashMap<Arc<str>, Members>>,
    channels: RwLock<HashMap<Arc<str>, Members>>,
    /// Per local history channel: the epoch and the highest offset delivered or read. Locked
    /// after `channels` when both are.
    seen: Mutex<Positions>,
    deliveries: Counter,
    drops: Drops,
}

/// Node-local totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-updated in a way that
    // matters more than stopping delivery would, so poisoning is ignored.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    pub fn new(deliveries: Counter, drops: Drops) -> Self {
        Self {
            sessions: RwLock::default(),
            users: RwLock::default(),
            channels: RwLock::default(),
            seen: Mutex::default(),
            deliveries,
            drops,
        }
    }

    /// Adds a session. (Redis subscriptions are counted by the broker, not here.)
    pub fn insert(&self, s: &Arc<SessionHandle>) {
        write(&self.sessions).insert(s.id, s.clone());
        let mut users = write(&self.users);
        users
            .entry(s.user.clone())
            .or_default()
            .insert(s.id, s.clone());
    }

    /// Removes a session.
    pub fn remove(&self, s: &SessionHandle) {
        write(&self.sessions).remove(&s.id);
        let mut users = write(&self.users);
        if let Some(members) = users.get_mut(&s.user) {
            members.remove(&s.id);
            if members.is_empty() {
                users.remove(&s.user);
            }
        }
    }

    /// Adds `s` to `channel`. Returns the shared channel name, or `None` if `s` was already
    /// subscribed.
    pub fn join(&self, channel: &str, s: &Arc<SessionHandle>) -> Option<Arc<str>> {
        let mut channels = write(&self.channels);
        if let Some((name, _)) = channels.get_key_value(channel) {
            let name = name.clone();
            let members = channels.get_mut(channel).expect("present: just looked up");
            return members.insert(s.id, s.clone()).is_none().then_some(name);
        }
        let name: Arc<str> = channel.into();
        channels.insert(name.clone(), HashMap::from([(s.id, s.clone())]));
        Some(name)
    }

    /// Removes `id` from `channel`; the last member takes the channel with it.
    pub fn leave(&self, channel: &str, id: Uuid) {
        let mut channels = write(&self.channels);
        if let Some(members) = channels.get_mut(channel) {
            members.remove(&id);
            if members.is_empty() {
                channels.remove(channel);
                self.seen().remove(channel);
            }
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Positions> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offer(&self, members: &Members, frame: &Frame, tag: Option<&Arc<Tag>>) -> usize {
        // Queueing takes a lock, and a locked instruction lets no later load start early, so
        // one session at a time would wait out each session's cache miss in turn. Reading the
        // close codes of a few sessions first (plain loads, which overlap) brings their lines
        // in together.
        const AHEAD: usize = 16;
        let mut sessions = members.values();
        let mut open: [Option<&SessionHandle>; AHEAD] = [None; AHEAD];
        let mut sent = 0;
        loop {
            let mut seen = 0;
            for (slot, s) in open.iter_mut().zip(sessions.by_ref()) {
                *slot = s.close_code().is_none().then_some(&**s);
                seen += 1;
            }
            for s in open[..seen].iter().copied() {
                match s {
                    Some(s) => sent += usize::from(s.deliver(frame, tag, &self.drops)),
                    None => {
                        self.drops.closed.inc();
                    }
                }
            }
            if seen < AHEAD {
                break;
            }
        }
        self.deliveries.inc_by(sent as u64);
        sent
    }

    /// Records that `channel` (a local channel, named by the hub's own `name`) reached
    /// `offset` of `epoch`; returns the shared epoch string.
    fn advance(&self, name: &Arc<str>, epoch: &str, offset: u64) -> Arc<str> {
        let mut seen = self.seen();
        match seen.get_mut(&**name) {
            Some((e, o)) if &**e == epoch => {
                *o = (*o).max(offset);
                e.clone()
            }
            Some(entry) => {
                *entry = (epoch.into(), offset);
                entry.0.clone()
            }
            None => {
                let e: Arc<str> = epoch.into();
                seen.insert(name.clone(), (e.clone(), offset));
                e
            }
        }
    }

    /// Queues `frame`, the message at `offset` of `epoch` on the history channel `channel`, to
    /// its local subscribers, tagged; returns how many took it.
    pub fn to_channel_at(&self, channel: &str, frame: &Frame, epoch: &str, offset: u64) -> usize {
        self.to_channel_tagged(channel, frame, epoch, offset, false)
    }

    /// Like [`to_channel_at`](Self::to_channel_at) for a message being caught up on: skipped
    /// (not queued, and no slow-consumer close) by sessions whose queue is half full; they read
    /// it from history once a later message of the channel shows them the gap.
    pub fn to_channel_spare(
        &self,
        channel: &str,
        frame: &Frame,
        epoch: &str,
        offset: u64,
    ) -> usize {
        self.to_channel_tagged(channel, frame, epoch, offset, true)
    }

    fn to_channel_tagged(
        &self,
        channel: &str,
        frame: &Frame,
        epoch: &str,
        offset: u64,
        spare: bool,
    ) -> usize {
        let channels = read(&self.channels);
        let Some((name, members)) = channels.get_key_value(channel) else {
            return 0;
        };
        let tag = Arc::new(Tag {
            channel: name.clone(),
            epoch: self.advance(name, epoch, offset),
            offset,
        });
        let tag = Some(&tag);
        let sent = (members.values())
            .filter(|s| s.enqueue(frame, tag, &self.drops, spare))
            .count();
        self.deliveries.inc_by(sent as u64);
        sent
    }

    /// Tells the local subscribers of `channel` still on `epoch` that messages of it were lost
    /// for good.
    pub fn lost_at(&self, channel: &str, epoch: &str) {
        let channels = read(&self.channels);
        let Some((name, members)) = channels.get_key_value(channel) else {
            return;
        };
        let tag = Arc::new(Tag {
            channel: name.clone(),
            epoch: epoch.into(),
            offset: Tag::LOST,
        });
        for s in members.values() {
            s.deliver(&Frame::from(""), Some(&tag), &self.drops);
        }
    }

    /// Records a position read from history for a channel with local subscribers.
    pub fn note_seen(&self, channel: &str, epoch: &str, offset: u64) {
        let channels = read(&self.channels);
        if let Some((name, _)) = channels.get_key_value(channel) {
            self.advance(name, epoch, offset);
        }
    }

    /// The last position seen of `channel`, if it has local subscribers and keeps history.
    pub fn seen_position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        self.seen().get(channel).cloned()
    }

    /// The last position of every local history channel.
    pub fn seen_positions(&self) -> Vec<(Arc<str>, Arc<str>, u64)> {
        self.seen()
            .iter()
            .map(|(c, (e, o))| (c.clone(), e.clone(), *o))
            .collect()
    }

    /// Queues `frame` to every local subscriber of `channel`; returns how many took it.
    /// `frame` is made only if the channel has local subscribers.
    pub fn to_channel(&self, channel: &str, frame: impl FnOnce() -> Frame) -> usize {
        read(&self.channels)
            .get(channel)
            .map_or(0, |m| self.offer(m, &frame(), None))
    }

    /// `frame` is made only if the user has local sessions.
    pub fn to_user(&self, user: &str, frame: impl FnOnce() -> Frame) -> usize {
        read(&self.users)
            .get(user)
            .map_or(0, |m| self.offer(m, &frame(), None))
    }

    pub fn to_all(&self, frame: &Frame) -> usize {
        self.offer(&read(&self.sessions), frame, None)
    }

    pub fn to_session(&self, id: Uuid, frame: &Frame) -> bool {
        let sessions = read(&self.sessions);
        let sent = sessions
            .get(&id)
            .is_some_and(|s| s.deliver(frame, None, &self.drops));
        self.deliveries.inc_by(u64::from(sent));
        sent
    }

    /// Asks every local session of `user` to close; returns how many were asked.
    pub fn close_user(&self, user: &str, code: u16) -> usize {
        read(&self.users).get(user).map_or(0, |m| {
            m.values().for_each(|s| {
                s.close(code);
            });
            m.len()
        })
    }

    /// A snapshot of every local session (for draining).
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        read(&self.sessions).values().cloned().collect()
    }

    pub fn counts(&self) -> Counts {
        Counts {
            connections: read(&self.sessions).len(),
            users: read(&self.users).len(),
            channels: read(&self.channels).len(),
        }
    }

    /// The `k` channels with the most local subscribers, most first (ties by name). One pass
    /// under the read lock keeping a heap of `k`: no sort of, and no allocation per, channel,
    /// however many there are.
    pub fn busiest_channels(&self, k: usize) -> Vec<(Arc<str>, usize)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        if k == 0 {
            return Vec::new();
        }
        // The heap's top is the least busy channel kept: more subscribers, then the smaller
        // name, rank higher.
        let mut kept: BinaryHeap<Reverse<(usize, Reverse<Arc<str>>)>> =
            BinaryHeap::with_capacity(k + 1);
        for (name, members) in read(&self.channels).iter() {
            let n = members.len();
            if kept.len() == k {
                let Some(Reverse((least, Reverse(least_name)))) = kept.peek() else {
                    break;
                };
                if (n, Reverse(name)) <= (*least, Reverse(least_name)) {
                    continue;
                }
                kept.pop();
            }
            kept.push(Reverse((n, Reverse(name.clone()))));
        }
        // Ascending order of `Reverse(...)` is busiest first.
        kept.into_sorted_vec()
            .into_iter()
            .map(|Reverse((n, Reverse(name)))| (name, n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn hub() -> (Hub, Metrics) {
        let m = Metrics::new();
        (Hub::new(m.deliveries.clone(), m.drops.clone()), m)
    }

    #[test]
    fn a_message_frame_holds_no_line_breaks() {
        let frame = Frame::message("{\"a\":\r\n1,\n\"b\":\r2}".into(), 0);
        assert_eq!(frame.text.as_str(), "{\"a\":  1, \"b\": 2}");
        assert_eq!(&frame.shared.payload()[..], frame.text.as_bytes());
    }

    #[test]
    fn busiest_channels_are_the_top_k_by_subscribers() {
        let (hub, _) = hub();
        assert!(hub.busiest_channels(3).is_empty());
        let sessions: Vec<_> = (0..10)
            .map(|i| SessionHandle::new(format!("u{i}").into(), 8))
            .collect();
        // Channel c{n} has n subscribers; "tie" has 4, like c4, and comes after it by name.
        for n in 1..=9 {
            for s in &sessions[..n] {
                hub.join(&format!("c{n}"), s);
            }
        }
        for s in &sessions[..4] {
            hub.join("tie", s);
        }
        let top = |k| -> Vec<(String, usize)> {
            hub.busiest_channels(k)
                .into_iter()
                .map(|(c, n)| (c.to_string(), n))
                .collect()
        };
        assert_eq!(
            top(3),
            [("c9".into(), 9), ("c8".into(), 8), ("c7".into(), 7)]
        );
        let six = top(6);
        assert_eq!(six[4..], [("c5".into(), 5), ("c4".into(), 4)]);
        let seven = top(7);
        assert_eq!(seven[5..], [("c4".into(), 4), ("tie".into(), 4)]);
        assert_eq!(
            top(100).len(),
            10,
            "k beyond the channel count gives them all"
        );
        assert!(top(0).is_empty());
        // Leaving changes the ranking.
        for s in &sessions[..9] {
            hub.leave("c9", s.id);
        }
        assert_eq!(top(1), [("c8".into(), 8)]);
    }

    #[test]
    fn channel_fan_out_reaches_members_only() {
        let (hub, m) = hub();
        let a = SessionHandle::new("alice".into(), 8);
        let b = SessionHandle::new("bob".into(), 8);
        hub.insert(&a);
        hub.insert(&b);
        assert_eq!(hub.join("room", &a).as_deref(), Some("room"));
        assert_eq!(hub.join("room", &a), None, "joining twice is a no-op");
        let frame = Frame::from("x");
        assert_eq!(hub.to_channel("room", || frame.clone()), 1);
        assert_eq!(a.next_frame(), Some(frame.clone()));
        assert_eq!(b.next_frame(), None);
        assert_eq!(hub.to_channel("nobody", || frame.clone()), 0);
        assert_eq!(m.deliveries.get(), 1);
    }

    #[test]
    fn users_sessions_and_broadcast() {
        let (hub, _) = hub();
        let a1 = SessionHandle::new("alice".into(), 8);
        let a2 = SessionHandle::new("alice".into(), 8);
        hub.insert(&a1);
        hub.insert(&a2);
        assert_eq!(hub.counts().users, 1, "two sessions of one user");
        let f = Frame::from("u");
        assert_eq!(hub.to_user("alice", || f.clone()), 2);
        assert!(hub.to_session(a2.id, &f));
        assert_eq!(hub.to_all(&f), 2);
        let queued = |s: &SessionHandle| std::iter::from_fn(|| s.next_frame()).count();
        assert_eq!((queued(&a1), queued(&a2)), (2, 3));
        hub.remove(&a1);
        assert_eq!(hub.counts().users, 1, "the user still has a session");
        hub.remove(&a2);
        assert_eq!(
            hub.counts(),
            Counts {
                connections: 0,
                users: 0,
                channels: 0
            }
        );
    }

    #[test]
    fn a_full_queue_closes_only_that_session() {
        let (hub, m) = hub();
        let slow = SessionHandle::new("slow".into(), 2);
        let fast = SessionHandle::new("fast".into(), 8);
        hub.insert(&slow);
        hub.insert(&fast);
        hub.join("c", &slow);
        hub.join("c", &fast);
        for _ in 0..3 {
            hub.to_channel("c", || Frame::from("m"));
            fast.next_frame().unwrap();
        }
        assert_eq!(
            slow.close_code.load(Ordering::Acquire),
            close::SLOW_CONSUMER
        );
        assert_eq!(fast.close_code.load(Ordering::Acquire), 0);
        assert_eq!(m.drops.slow_consumer.get(), 1);
    }

    #[test]
    fn the_last_member_to_leave_takes_the_channel() {
        let (hub, _) = hub();
        let a = SessionHandle::new("a".into(), 1);
        let b = SessionHandle::new("b".into(), 1);
        hub.join("c", &a);
        assert!(hub.join("c", &b).is_some());
        hub.leave("c", a.id);
        assert_eq!(hub.counts().channels, 1);
        hub.leave("c", b.id);
        assert_eq!(hub.counts().channels, 0);
        hub.leave("c", b.id);
        assert_eq!(hub.to_channel("c", || Frame::from("x")), 0);
    }

    #[test]
    fn history_deliveries_are_tagged_and_positions_remembered() {
        let (hub, _) = hub();
        let a = SessionHandle::new("a".into(), 8);
        let b = SessionHandle::new("b".into(), 8);
        hub.join("h", &a);
        hub.join("h", &b);
        assert_eq!(hub.to_channel_at("h", &Frame::from("m1"), "e1", 1), 2);
        assert_eq!(hub.to_channel_at("h", &Frame::from("m3"), "e1", 3), 2);
        hub.note_seen("h", "e1", 2);
        assert_eq!(hub.to_channel_at("nobody", &Frame::from("x"), "e1", 1), 0);
        let first = a.next_entry().unwrap();
        let tag = first.tag.clone().unwrap();
        assert_eq!(
            (
                &*tag.channel,
                &*tag.epoch,
                tag.offset,
                first.frame.text.as_str()
            ),
            ("h", "e1", 1, "m1")
        );
        // One tag per message, shared by every recipient.
        assert!(Arc::ptr_eq(
            &tag,
            b.next_entry().unwrap().tag.as_ref().unwrap()
        ));
        assert_eq!(hub.seen_positions(), vec![("h".into(), "e1".into(), 3)]);
        // A new epoch replaces the old position.
        hub.to_channel_at("h", &Frame::from("n1"), "e2", 1);
        assert_eq!(hub.seen_positions(), vec![("h".into(), "e2".into(), 1)]);
        hub.lost_at("h", "e2");
        let lost = std::iter::from_fn(|| a.next_entry()).last().unwrap();
        assert!(lost.tag.unwrap().is_lost());
        // The last local subscriber takes the position with it.
        hub.leave("h", a.id);
        hub.leave("h", b.id);
        assert!(hub.seen_positions().is_empty());
        hub.to_session(a.id, &Frame::from("plain"));
    }

    #[test]
    fn caught_up_messages_are_skipped_by_busy_sessions_without_closing_them() {
        let (hub, m) = hub();
        let s = SessionHandle::new("a".into(), 4);
        hub.join("h", &s);
        assert_eq!(hub.to_channel_spare("h", &Frame::from("1"), "e", 1), 1);
        assert_eq!(hub.to_channel_spare("h", &Frame::from("2"), "e", 2), 1);
        assert_eq!(
            hub.to_channel_spare("h", &Frame::from("3"), "e", 3),
            0,
            "half full"
        );
        assert_eq!(hub.to_channel_at("h", &Frame::from("4"), "e", 4), 1);
        assert_eq!(s.close_code(), None);
        assert_eq!(m.drops.slow_consumer.get(), 0);
        let offsets: Vec<u64> = std::iter::from_fn(|| s.next_entry())
            .map(|e| e.tag.unwrap().offset)
            .collect();
        assert_eq!(offsets, [1, 2, 4]);
    }

    #[tokio::test]
    async fn the_first_close_code_wins_and_wakes_the_session() {
        let s = SessionHandle::new("a".into(), 1);
        assert!(s.close(close::GOING_AWAY));
        assert!(!s.close(close::DISCONNECTED));
        s.woken().await;
        assert_eq!(s.close_code(), Some(close::GOING_AWAY));
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (hub, _) = hub();
        let s = SessionHandle::new("a".into(), 1000);
        hub.insert(&s);
        for _ in 0..100 {
            hub.to_session(s.id, &Frame::from("x"));
        }
        while s.next_frame().is_some() {}
        assert_eq!(s.queue().capacity(), 0);
    }

    #[test]
    fn batches_are_taken_oldest_first_and_bounded() {
        let (hub, m) = hub();
        let s = SessionHandle::new("a".into(), 1000);
        hub.insert(&s);
        for i in 0..100 {
            hub.to_session(s.id, &Frame::from(i.to_string()));
        }
        let mut batch = VecDeque::new();
        let mut seen = Vec::new();
        while {
            s.take_batch(&mut batch, 64);
            !batch.is_empty()
        } {
            assert!(batch.len() <= 64);
            seen.extend(
                batch
                    .drain(..)
                    .map(|q| q.frame.text.as_str().parse::<u32>().unwrap()),
            );
            release_spare(&mut batch);
        }
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(m.deliveries.get(), 100);
        assert_eq!(batch.capacity(), 0, "a drained batch gives its memory back");
    }

    #[test]
    fn a_fan_out_skips_closed_sessions_and_counts_them() {
        let (hub, m) = hub();
        let sessions: Vec<_> = (0..40)
            .map(|i| SessionHandle::new(format!("u{i}").into(), 10))
            .collect();
        for (i, s) in sessions.iter().enumerate() {
            hub.insert(s);
            hub.join("c", s);
            if i % 3 == 0 {
                s.close(close::GOING_AWAY);
            }
        }
        assert_eq!(hub.to_channel("c", || Frame::from("m")), 26);
        assert_eq!(m.drops.closed.get(), 14);
        for (i, s) in sessions.iter().enumerate() {
            assert_eq!(s.next_frame().is_some(), i % 3 != 0);
        }
    }
}
