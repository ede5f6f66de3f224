//! This node's sessions, indexed by connection, user and channel, and local fan-out.
//!
//! Fan-out never waits: a frame is offered to each recipient's bounded queue, and a recipient
//! whose queue is full is closed as a slow consumer. The frame is one shared, reference-counted
//! buffer, so a delivery to 10,000 sessions copies no message bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use prometheus_client::metrics::counter::Counter;
use pushgate_protocol::close;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::Drops;

/// An encoded text frame, shared by every recipient.
pub type Frame = Utf8Bytes;

/// A queue that holds more than this many frames' worth of capacity gives it back once drained.
const KEEP_CAPACITY: usize = 32;

/// The hub's side of one connection: its outbound queue and a way to close it.
///
/// The queue is a plain `VecDeque` behind a mutex rather than a channel: it allocates nothing
/// while a connection is idle, which is what most connections are most of the time.
pub struct SessionHandle {
    pub id: Uuid,
    pub user: Arc<str>,
    queue: Mutex<VecDeque<Frame>>,
    capacity: usize,
    /// The close code asked for; 0 while none is.
    close_code: AtomicU16,
    /// Wakes the session's task: frames were queued, or a close was asked for.
    wake: Notify,
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

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting. Returns whether it was queued.
    fn deliver(&self, frame: &Frame, drops: &Drops) -> bool {
        if self.close_code().is_some() {
            drops.closed.inc();
            return false;
        }
        let mut queue = self.queue();
        if queue.len() >= self.capacity {
            drop(queue);
            if self.close(close::SLOW_CONSUMER) {
                drops.slow_consumer.inc();
            }
            return false;
        }
        let was_empty = queue.is_empty();
        queue.push_back(frame.clone());
        drop(queue);
        // A non-empty queue already has a wake-up pending, or a session about to look again.
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// The next queued frame, if any.
    pub fn next_frame(&self) -> Option<Frame> {
        let mut queue = self.queue();
        let frame = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_CAPACITY {
            *queue = VecDeque::new();
        }
        frame
    }

    /// Asks the session's task to look again (it stopped before the queue was empty).
    pub fn rewake_if_pending(&self) {
        if !self.queue().is_empty() {
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

type Members = HashMap<Uuid, Arc<SessionHandle>>;

/// Local sessions. Locks are held only for map updates and for queueing (never across an await).
pub struct Hub {
    sessions: RwLock<Members>,
    users: RwLock<HashMap<Arc<str>, Members>>,
    channels: RwLock<HashMap<Arc<str>, Members>>,
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
            deliveries,
            drops,
        }
    }

    /// Adds a session. Returns true when it is its user's first on this node.
    pub fn insert(&self, s: &Arc<SessionHandle>) -> bool {
        write(&self.sessions).insert(s.id, s.clone());
        let mut users = write(&self.users);
        let members = users.entry(s.user.clone()).or_default();
        members.insert(s.id, s.clone());
        members.len() == 1
    }

    /// Removes a session. Returns true when it was its user's last on this node.
    pub fn remove(&self, s: &SessionHandle) -> bool {
        write(&self.sessions).remove(&s.id);
        let mut users = write(&self.users);
        let Some(members) = users.get_mut(&s.user) else {
            return false;
        };
        members.remove(&s.id);
        let last = members.is_empty();
        if last {
            users.remove(&s.user);
        }
        last
    }

    /// Adds `s` to `channel`. Returns the shared channel name and whether `s` is its first
    /// local subscriber; `None` if `s` was already subscribed.
    pub fn join(&self, channel: &str, s: &Arc<SessionHandle>) -> Option<(Arc<str>, bool)> {
        let mut channels = write(&self.channels);
        if let Some((name, _)) = channels.get_key_value(channel) {
            let name = name.clone();
            let members = channels.get_mut(channel).expect("present: just looked up");
            return members
                .insert(s.id, s.clone())
                .is_none()
                .then_some((name, false));
        }
        let name: Arc<str> = channel.into();
        channels.insert(name.clone(), HashMap::from([(s.id, s.clone())]));
        Some((name, true))
    }

    /// Removes `id` from `channel`. Returns true when it was the last local subscriber.
    pub fn leave(&self, channel: &str, id: Uuid) -> bool {
        let mut channels = write(&self.channels);
        let Some(members) = channels.get_mut(channel) else {
            return false;
        };
        members.remove(&id);
        let last = members.is_empty();
        if last {
            channels.remove(channel);
        }
        last
    }

    fn offer(&self, members: &Members, frame: &Frame) -> usize {
        let sent = members
            .values()
            .filter(|s| s.deliver(frame, &self.drops))
            .count();
        self.deliveries.inc_by(sent as u64);
        sent
    }

    /// Queues `frame` to every local subscriber of `channel`; returns how many took it.
    pub fn to_channel(&self, channel: &str, frame: &Frame) -> usize {
        read(&self.channels)
            .get(channel)
            .map_or(0, |m| self.offer(m, frame))
    }

    pub fn to_user(&self, user: &str, frame: &Frame) -> usize {
        read(&self.users)
            .get(user)
            .map_or(0, |m| self.offer(m, frame))
    }

    pub fn to_all(&self, frame: &Frame) -> usize {
        self.offer(&read(&self.sessions), frame)
    }

    pub fn to_session(&self, id: Uuid, frame: &Frame) -> bool {
        let sessions = read(&self.sessions);
        let sent = sessions
            .get(&id)
            .is_some_and(|s| s.deliver(frame, &self.drops));
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
    fn channel_fan_out_reaches_members_only() {
        let (hub, m) = hub();
        let a = SessionHandle::new("alice".into(), 8);
        let b = SessionHandle::new("bob".into(), 8);
        assert!(hub.insert(&a) && hub.insert(&b));
        assert_eq!(hub.join("room", &a).map(|j| j.1), Some(true));
        assert_eq!(hub.join("room", &a), None, "joining twice is a no-op");
        let frame = Frame::from("x");
        assert_eq!(hub.to_channel("room", &frame), 1);
        assert_eq!(a.next_frame(), Some(frame.clone()));
        assert_eq!(b.next_frame(), None);
        assert_eq!(hub.to_channel("nobody", &frame), 0);
        assert_eq!(m.deliveries.get(), 1);
    }

    #[test]
    fn users_sessions_and_broadcast() {
        let (hub, _) = hub();
        let a1 = SessionHandle::new("alice".into(), 8);
        let a2 = SessionHandle::new("alice".into(), 8);
        assert!(hub.insert(&a1));
        assert!(!hub.insert(&a2), "second session of a user");
        let f = Frame::from("u");
        assert_eq!(hub.to_user("alice", &f), 2);
        assert!(hub.to_session(a2.id, &f));
        assert_eq!(hub.to_all(&f), 2);
        let queued = |s: &SessionHandle| std::iter::from_fn(|| s.next_frame()).count();
        assert_eq!((queued(&a1), queued(&a2)), (2, 3));
        assert!(!hub.remove(&a1));
        assert!(hub.remove(&a2), "last session of the user");
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
            hub.to_channel("c", &Frame::from("m"));
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
    fn leave_reports_the_last_member() {
        let (hub, _) = hub();
        let a = SessionHandle::new("a".into(), 1);
        let b = SessionHandle::new("b".into(), 1);
        hub.join("c", &a);
        assert_eq!(hub.join("c", &b).map(|j| j.1), Some(false));
        assert!(!hub.leave("c", a.id));
        assert!(hub.leave("c", b.id));
        assert!(!hub.leave("c", b.id));
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
}
