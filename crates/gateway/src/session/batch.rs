//! Batches for a connection that asked for them (subprotocol `pushgate.batch`): text frames
//! fed to the sink between two flushes go out as one text message, one frame per line.
//!
//! The session writes a burst of queued deliveries as feeds followed by one flush, and a lone
//! frame as a feed and a flush at once; so batching at the sink joins exactly what was already
//! queued, never holds a message back, and leaves the session's code alone.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::Sink;

/// The most bytes joined into one batch message: past it, the batch goes out and another one
/// starts, so that a batch stays within what clients accept as one message.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Frames joined into one text message, one per line, for a `pushgate.batch` connection. A
/// lone frame goes out as it is, without a copy. Frames hold no line feed
/// ([`Frame::message`]), so the lines split back into exactly the frames.
#[derive(Default)]
pub(super) struct Lines {
    first: Option<Utf8Bytes>,
    joined: String,
}

impl Lines {
    /// Adds a frame; returns a message to send first when the batch is full.
    fn push(&mut self, text: Utf8Bytes) -> Option<Utf8Bytes> {
        let full = self.len() + 1 + text.len() > MAX_BATCH_BYTES;
        let out = if full { self.take() } else { None };
        match self.first.take() {
            None if self.joined.is_empty() => self.first = Some(text),
            first => {
                if let Some(first) = first {
                    self.joined.reserve(first.len() + 1 + text.len());
                    self.joined.push_str(&first);
                }
                self.joined.push('\n');
                self.joined.push_str(&text);
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(self.joined.len(), |f| f.len())
    }

    /// The batch so far, as one message.
    fn take(&mut self) -> Option<Utf8Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        (!self.joined.is_empty()).then(|| std::mem::take(&mut self.joined).into())
    }
}

/// A sink of WebSocket messages that batches text frames when asked to; otherwise it passes
/// everything through.
pub(super) struct Batching<W> {
    inner: W,
    /// Boxed: one pointer on connections that do not batch, and on idle ones.
    state: Option<Box<State>>,
}

#[derive(Default)]
struct State {
    lines: Lines,
    /// Messages ready for the inner sink, oldest first: a full batch, or a batch and the
    /// control frame that came after it. At most two.
    ready: VecDeque<Message>,
}

impl<W> Batching<W> {
    pub(super) fn new(inner: W, batch: bool) -> Self {
        Self {
            inner,
            state: batch.then(Box::default),
        }
    }
}

impl<W: Sink<Message> + Unpin> Batching<W> {
    /// Hands the ready messages to the inner sink.
    fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        let Some(state) = &mut self.state else {
            return Poll::Ready(Ok(()));
        };
        while let Some(message) = state.ready.pop_front() {
            if Pin::new(&mut self.inner).poll_ready(cx)?.is_pending() {
                state.ready.push_front(message);
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).start_send(message)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: Sink<Message> + Unpin> Sink<Message> for Batching<W> {
    type Error = W::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        let this = self.get_mut();
        ready!(this.poll_send_ready(cx))?;
        Pin::new(&mut this.inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), W::Error> {
        let this = self.get_mut();
        let Some(state) = &mut this.state else {
            return Pin::new(&mut this.inner).start_send(message);
        };
        match message {
            Message::Text(text) => state
                .ready
                .extend(state.lines.push(text).map(Message::Text)),
            other => {
                // Anything else keeps its place after the frames fed before it.
                state.ready.extend(state.lines.take().map(Message::Text));
                state.ready.push_back(other);
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        let this = self.get_mut();
        if let Some(state) = &mut this.state {
            state.ready.extend(state.lines.take().map(Message::Text));
        }
        ready!(this.poll_send_ready(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Utf8Bytes {
        "x".repeat(len).into()
    }

    #[test]
    fn a_batch_joins_frames_by_line_up_to_its_size() {
        let mut lines = Lines::default();
        assert_eq!(lines.take(), None);
        // One frame goes out as it came.
        assert_eq!(lines.push("a".into()), None);
        assert_eq!(lines.take().as_deref(), Some("a"));
        // Several are joined.
        for text in ["a", "b", "c"] {
            assert_eq!(lines.push(text.into()), None);
        }
        assert_eq!(lines.take().as_deref(), Some("a\nb\nc"));
        // A frame that would take the batch over its size sends the batch first.
        let half = MAX_BATCH_BYTES / 2;
        assert_eq!(lines.push(frame(half)), None);
        assert_eq!(lines.push(frame(half - 1)), None);
        let full = lines.push(frame(1)).expect("the full batch");
        assert_eq!(full.len(), MAX_BATCH_BYTES);
        assert_eq!(lines.take().as_deref(), Some("x"));
        // A frame larger than a batch goes alone.
        assert_eq!(lines.push("a".into()), None);
        assert_eq!(lines.push(frame(MAX_BATCH_BYTES + 1)).as_deref(), Some("a"));
        assert_eq!(lines.take().map(|t| t.len()), Some(MAX_BATCH_BYTES + 1));
    }

    #[tokio::test]
    async fn the_sink_joins_what_comes_between_flushes_and_keeps_other_frames_in_place() {
        use futures_util::SinkExt;

        let mut sink = Batching::new(Vec::<Message>::new(), true);
        for text in ["a", "b"] {
            sink.feed(Message::Text(text.into())).await.unwrap();
        }
        sink.feed(Message::Ping("p".into())).await.unwrap();
        sink.feed(Message::Text("c".into())).await.unwrap();
        sink.flush().await.unwrap();
        sink.send(Message::Text("d".into())).await.unwrap();
        let expected = [
            Message::Text("a\nb".into()),
            Message::Ping("p".into()),
            Message::Text("c".into()),
            Message::Text("d".into()),
        ];
        assert_eq!(sink.inner, expected);

        // Without batches, everything passes through as it came.
        let mut plain = Batching::new(Vec::<Message>::new(), false);
        for text in ["a", "b"] {
            plain.feed(Message::Text(text.into())).await.unwrap();
        }
        plain.flush().await.unwrap();
        assert_eq!(plain.inner.len(), 2);
    }
}
