//! Delivery order on history channels: what a session delivered last per subscription, and
//! what to do with each queued message given that (send, skip a duplicate, fill a gap, or give
//! up on a history that is gone).

use std::sync::Arc;

use crate::history::HistoryRead;
use crate::hub::Tag;

/// One subscription of the session.
pub(super) struct Sub {
    pub(super) name: Arc<str>,
    /// On history channels: what this session delivered last.
    pub(super) track: Option<Track>,
}

pub(super) struct Track {
    pub(super) epoch: Arc<str>,
    /// The last offset delivered (or skipped over at subscribe time) in `epoch`.
    pub(super) upto: u64,
}

/// What to do with a queued history message.
pub(super) enum Verdict {
    Send,
    Skip,
    /// Messages between the last delivered and this one are missing.
    Gap,
    /// Messages of the tracked epoch were lost for good.
    Lost,
}

/// Where a subscribe resumes from.
#[derive(Clone, Copy)]
pub(super) enum Resume<'a> {
    /// Nowhere: deliver from now on.
    No,
    /// A WebSocket subscribe's `since`.
    Since(u64, &'a str),
    /// An SSE `Last-Event-ID`: positions on several channels, told apart by their epochs.
    AnyOf(&'a [(u64, String)]),
    /// A first join that starts with the channel's last messages (a subscribe's `recent`):
    /// nothing to recover, the backlog and then live messages.
    Recent(u64),
}

impl Resume<'_> {
    /// Whether there is something to recover (the ack says `recovered`).
    pub(super) fn asked(&self) -> bool {
        !matches!(self, Self::No | Self::Recent(_))
    }

    /// The offset to resume from on a channel whose current epoch is `epoch`.
    pub(super) fn offset_in(&self, epoch: &str) -> Option<u64> {
        match self {
            Self::No | Self::Recent(_) => None,
            Self::Since(offset, e) => (*e == epoch).then_some(*offset),
            Self::AnyOf(list) => list.iter().find(|(_, e)| e == epoch).map(|(o, _)| *o),
        }
    }

    /// The offset to read history after, before the epoch is known.
    pub(super) fn guess(&self) -> Option<u64> {
        match self {
            Self::No | Self::Recent(_) => None,
            Self::Since(offset, _) => Some(*offset),
            Self::AnyOf([(offset, _)]) => Some(*offset),
            Self::AnyOf(_) => None,
        }
    }
}

/// How many messages after `since` to send on a subscribe: all of them, if the epoch matched
/// (`since` is `Some`), history holds every one, and they are within the recovery limit.
pub(super) fn recoverable(read: &HistoryRead, since: Option<u64>, limit: u64) -> Option<usize> {
    let since = since?;
    let missed = read.top.checked_sub(since)?;
    (missed <= limit && read.holds(since, missed)).then_some(missed as usize)
}

/// What to do with a queued message of a history channel, given the session's position there.
/// Advances the position when the message is to be sent.
pub(super) fn classify(subs: &mut [Sub], tag: &Tag) -> Verdict {
    let Some(sub) = subs
        .iter_mut()
        .find(|s| Arc::ptr_eq(&s.name, &tag.channel) || s.name == tag.channel)
    else {
        // Queued before an unsubscribe: the client no longer wants it.
        return Verdict::Skip;
    };
    let Some(track) = &mut sub.track else {
        // A stamped message on a channel this node keeps no history for: deliver as it is.
        return if tag.is_lost() {
            Verdict::Skip
        } else {
            Verdict::Send
        };
    };
    if tag.is_lost() {
        return if track.epoch == tag.epoch {
            Verdict::Lost
        } else {
            Verdict::Skip
        };
    }
    if track.epoch != tag.epoch {
        // A new history (the old one expired or was deleted): its offsets start at 1.
        track.epoch = tag.epoch.clone();
        track.upto = 0;
    }
    if tag.offset <= track.upto {
        Verdict::Skip
    } else if tag.offset == track.upto + 1 {
        track.upto = tag.offset;
        Verdict::Send
    } else {
        Verdict::Gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Frame;

    fn tag(channel: &Arc<str>, epoch: &str, offset: u64) -> Tag {
        Tag {
            channel: channel.clone(),
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn history_messages_are_sent_once_in_order_and_gaps_found() {
        let h: Arc<str> = "h".into();
        let plain: Arc<str> = "p".into();
        let mut subs = vec![
            Sub {
                name: h.clone(),
                track: Some(Track {
                    epoch: "e1".into(),
                    upto: 5,
                }),
            },
            Sub {
                name: plain.clone(),
                track: None,
            },
        ];
        let verdicts: Vec<&str> = [
            tag(&h, "e1", 4),
            tag(&h, "e1", 5),
            tag(&h, "e1", 6),
            tag(&h, "e1", 6),
            tag(&h, "e1", 9),
            tag(&h, "e2", 1),
            tag(&h, "e2", 3),
            tag(&"other".into(), "e1", 1),
            tag(&plain, "x", 7),
            tag(&h, "e1", Tag::LOST),
            tag(&h, "e2", Tag::LOST),
        ]
        .iter()
        .map(|t| match classify(&mut subs, t) {
            Verdict::Send => "send",
            Verdict::Skip => "skip",
            Verdict::Gap => "gap",
            Verdict::Lost => "lost",
        })
        .collect();
        assert_eq!(
            verdicts,
            [
                "skip", "skip", "send", "skip", "gap", "send", "gap", "skip", "send", "skip",
                "lost"
            ]
        );
        let track = subs[0].track.as_ref().unwrap();
        assert_eq!((&*track.epoch, track.upto), ("e2", 1));
    }

    #[test]
    fn recovery_needs_the_epoch_every_message_and_the_limit() {
        let read = HistoryRead {
            epoch: "e".into(),
            top: 5,
            entries: (3..=5).map(|o| (o, Frame::from("m"))).collect(),
        };
        assert_eq!(recoverable(&read, Some(2), 10), Some(3));
        assert_eq!(recoverable(&read, Some(5), 10), Some(0));
        assert_eq!(recoverable(&read, Some(1), 10), None, "offset 2 is gone");
        assert_eq!(recoverable(&read, Some(2), 2), None, "over the limit");
        assert_eq!(recoverable(&read, Some(6), 10), None, "ahead of the top");
        assert_eq!(recoverable(&read, None, 10), None, "another epoch");
    }
}
