//! permessage-deflate (RFC 7692) for a fan-out server: compress a message once
//! per node, share the bytes, and inflate client messages with a borrowed state.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use crate::Violation;
use crate::frame::{self, TEXT};

/// The empty stored block a sync flush ends with; stripped by the sender and
/// re-appended by the receiver (RFC 7692 §7.2.1, §7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];
/// Largest payload of one stored deflate block (RFC 1951 §3.2.4).
const MAX_STORED: usize = 0xFFFF;

/// How a connection takes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    /// permessage-deflate: messages up to `max_len` bytes may go compressed
    /// (the client's window bounds it; see [`crate::Deflate::encoding`]).
    Deflate {
        max_len: usize,
    },
}

impl Encoding {
    /// permessage-deflate with a full 32 KiB client window.
    pub const DEFLATE: Self = Self::Deflate {
        max_len: usize::MAX,
    };
}

impl From<bool> for Encoding {
    /// `true`: [`Encoding::DEFLATE`].
    fn from(deflate: bool) -> Self {
        if deflate { Self::DEFLATE } else { Self::Plain }
    }
}

/// When to compress outgoing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Payloads shorter than this many bytes are always sent plain;
    /// `usize::MAX` turns compression off.
    pub threshold: usize,
}

impl Compression {
    /// 128 bytes. Each message is compressed once per node from an empty
    /// window (`server_no_context_takeover`), so the cost is per message, not
    /// per recipient, while the saving is multiplied by the fan-out: a
    /// 200-byte chat message already shrinks by about a quarter. Below about
    /// 128 bytes deflate saves a few bytes at most, and every recipient would
    /// still pay an inflate call.
    pub const DEFAULT_THRESHOLD: usize = 128;
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            threshold: Self::DEFAULT_THRESHOLD,
        }
    }
}

thread_local! {
    /// A compressor is ~300 KiB of tables; one per thread, reset per message,
    /// avoids allocating it for every message.
    static DEFLATER: RefCell<Compress> =
        RefCell::new(Compress::new(flate2::Compression::default(), false));
}

/// Raw deflate of one message from a fresh state, ended by a sync flush whose
/// `00 00 ff ff` tail is removed (RFC 7692 §7.2.1). The result therefore ends
/// with the header bits of an open, non-final stored block. `None` if the
/// compressor fails or does not end that way.
fn deflate_message(data: &[u8]) -> Option<Vec<u8>> {
    DEFLATER.with_borrow_mut(|c| {
        c.reset();
        let start = c.total_in();
        let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 64);
        loop {
            let consumed = usize::try_from(c.total_in() - start).ok()?;
            c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = c.total_in() - start == data.len() as u64;
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity() / 2 + 64);
        }
        out.ends_with(&SYNC_TAIL).then(|| {
            out.truncate(out.len() - SYNC_TAIL.len());
            out
        })
    })
}

thread_local! {
    /// Inflates the messages of every connection this thread reads: each message is inflated
    /// from a fresh state (`client_no_context_takeover`), so no connection keeps ~45 KiB of its
    /// own.
    static INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
}

/// [`Inflater::inflate`] with this thread's inflater.
pub(crate) fn inflate(compressed: &[u8], max: usize) -> Result<Bytes, Violation> {
    INFLATER.with_borrow_mut(|inflater| inflater.inflate(compressed, max))
}

/// Inflates client messages; holds the only inflate state.
pub(crate) struct Inflater {
    inner: Decompress,
}

impl Inflater {
    fn new() -> Self {
        Self {
            inner: Decompress::new(false),
        }
    }

    /// Inflates one message payload (without its stripped tail) from a fresh
    /// state, as `client_no_context_takeover` allows. Stops with 1009 as soon
    /// as the output passes `max` bytes, so a small bomb cannot allocate more
    /// than about `max`; corrupt data gives 1007.
    fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Bytes, Violation> {
        const TOO_BIG: Violation = Violation::too_big("message too big");
        self.inner.reset(false);
        let mut out: Vec<u8> = Vec::new();
        for input in [compressed, &SYNC_TAIL] {
            let mut pos = 0;
            loop {
                if out.len() == out.capacity() {
                    let room = max.saturating_add(1) - out.len();
                    let want = if out.capacity() == 0 {
                        compressed.len().saturating_mul(4).max(256)
                    } else {
                        out.capacity()
                    };
                    out.reserve_exact(want.min(room));
                }
                let (in_before, out_before) = (self.inner.total_in(), out.len());
                let status = self
                    .inner
                    .decompress_vec(&input[pos..], &mut out, FlushDecompress::None)
                    .map_err(|_| Violation::invalid("invalid compressed data"))?;
                let consumed = (self.inner.total_in() - in_before) as usize;
                pos += consumed;
                if out.len() > max {
                    return Err(TOO_BIG);
                }
                if status == Status::StreamEnd {
                    return Ok(out.into());
                }
                let has_room = out.len() < out.capacity();
                let stuck = consumed == 0 && out.len() == out_before;
                if has_room && (pos == input.len() || stuck) {
                    break;
                }
            }
        }
        Ok(out.into())
    }
}

/// A text message shared by every connection it goes to.
///
/// Holds the payload (without a copy) and, computed on first demand, its
/// compressed form. With `server_no_context_takeover` the compressed bytes are
/// the same for every connection that negotiated deflate, so one compression
/// serves the whole fan-out. Cloning is an `Arc` increment.
#[derive(Clone)]
pub struct SharedFrame(Arc<Inner>);

struct Inner {
    payload: Bytes,
    threshold: usize,
    /// `None` inside: compression was tried and did not shrink the message.
    deflated: OnceLock<Option<Bytes>>,
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let deflated = self.0.deflated.get().map(|d| d.as_ref().map(Bytes::len));
        f.debug_struct("SharedFrame")
            .field("len", &self.0.payload.len())
            .field("deflated", &deflated)
            .finish()
    }
}

/// Equal when the payloads are.
impl PartialEq for SharedFrame {
    fn eq(&self, other: &Self) -> bool {
        self.0.payload == other.0.payload
    }
}

impl SharedFrame {
    /// A text message. `payload` must be UTF-8; it is not checked here
    /// because the gateway's payloads come from its own JSON encoder.
    pub fn new(payload: Bytes, compression: Compression) -> Self {
        Self(Arc::new(Inner {
            payload,
            threshold: compression.threshold,
            deflated: OnceLock::new(),
        }))
    }

    /// The text payload.
    pub fn payload(&self) -> Bytes {
        self.0.payload.clone()
    }

    fn text(&self) -> &[u8] {
        &self.0.payload
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.0.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.0.payload.is_empty()
    }

    /// The complete frame for a connection that takes `encoding`: compressed
    /// if it takes deflate for a message this long and compression is worth
    /// it, else plain.
    pub fn wire(&self, encoding: Encoding) -> Bytes {
        let mut out = BytesMut::new();
        self.write_to(encoding, &mut out);
        out.freeze()
    }

    /// Appends the frame for a connection that takes `encoding` to `out` (its
    /// write buffer), as [`Self::wire`] chooses it; returns whether this very
    /// call ran the compressor. Exactly one call per frame returns `true` (the
    /// first that needs the compressed form of a payload at or above the
    /// threshold, even if the result was not smaller and the plain form is
    /// used), which is what a compression counter counts.
    pub fn write_to(&self, encoding: Encoding, out: &mut BytesMut) -> bool {
        let (deflated, ran) = self.deflated_for(encoding);
        match deflated {
            Some(body) => frame::put(out, TEXT, true, body),
            None => frame::put(out, TEXT, false, self.text()),
        }
        ran
    }

    /// The compressed payload, computing it on first use; and whether this call computed it.
    fn deflated(&self) -> (Option<&[u8]>, bool) {
        let text = self.text();
        if text.len() < self.0.threshold {
            return (None, false);
        }
        let mut ran = false;
        let deflated = self.0.deflated.get_or_init(|| {
            ran = true;
            let body = deflate_message(text).filter(|body| body.len() < text.len())?;
            // Exactly its length: the compressor's room (more than the input) would otherwise
            // live as long as the frame, in queues and history.
            Some(Bytes::copy_from_slice(&body))
        });
        (deflated.as_deref(), ran)
    }

    /// The compressed payload if `encoding` takes it (computing it on first use).
    fn deflated_for(&self, encoding: Encoding) -> (Option<&[u8]>, bool) {
        match encoding {
            Encoding::Deflate { max_len } if self.text().len() <= max_len => self.deflated(),
            _ => (None, false),
        }
    }

    #[cfg(test)]
    fn deflated_payload(&self) -> Option<&[u8]> {
        self.deflated().0
    }
}

/// One text message joining the payloads of `frames` with `\n`, for
/// connections that negotiated the `pushgate.batch` subprotocol.
///
/// On a deflate connection the compressed pieces are reused, not recompressed:
/// each is a raw deflate stream from a fresh state that ends, once its stripped
/// `00 00 ff ff` is put back, on a byte boundary after non-final blocks and
/// never refers back before its own start, so such streams concatenate. Each
/// piece ends with the header bits of an open stored block; the separator is
/// written as that block's contents (`01 00 fe ff 0a`) instead of the empty
/// tail. Payloads with no compressed form (below the threshold, or not
/// shrinking) go in as stored blocks, so the batch stays one RSV1 message.
/// The last piece is left open, so the receiver's appended `00 00 ff ff`
/// closes it. If no piece has a compressed form, or the result is not smaller
/// than the plain join, the plain batch is sent. A batch of one is that
/// frame's own frame (as [`SharedFrame::write_to`] writes it); an empty batch
/// is an empty text message. A piece longer than the connection's window goes
/// in as stored blocks.
///
/// Appends the message to `out` (a connection's write buffer), and returns
/// how many compressions this call ran (frames whose compressed form it
/// computed first), for the compression counter.
pub fn write_batch(frames: &[SharedFrame], encoding: Encoding, out: &mut BytesMut) -> usize {
    if let [only] = frames {
        return usize::from(only.write_to(encoding, out));
    }
    let (mut ran, mut any_deflated) = (0, false);
    for f in frames {
        let (deflated, did_run) = f.deflated_for(encoding);
        any_deflated |= deflated.is_some();
        ran += usize::from(did_run);
    }
    let plain_len =
        frames.iter().map(SharedFrame::len).sum::<usize>() + frames.len().saturating_sub(1);

    if any_deflated {
        let mut w = StoredWriter::default();
        for (i, f) in frames.iter().enumerate() {
            match f.deflated_for(encoding).0 {
                Some(piece) => {
                    if i > 0 {
                        w.literal(true, b"");
                    }
                    w.deflated(piece);
                }
                None => w.literal(i > 0, f.text()),
            }
        }
        let body = w.finish();
        if body.len() < plain_len {
            put_header(out, true, body.len());
            out.put_slice(&body);
            return ran;
        }
    }

    put_header(out, false, plain_len);
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.put_u8(b'\n');
        }
        out.put_slice(f.text());
    }
    ran
}

/// Appends the header of a text message of `len` payload bytes, with room for
/// the payload.
fn put_header(out: &mut BytesMut, rsv1: bool, len: usize) {
    let (header, used) = frame::encode_header(true, rsv1, TEXT, len);
    out.reserve(used + len);
    out.put_slice(&header[..used]);
}

/// Builds a raw deflate stream out of precompressed pieces and literal bytes.
#[derive(Default)]
struct StoredWriter {
    out: BytesMut,
    /// The stream ends with the header bits of a stored block whose
    /// length and contents are still to be written.
    open: bool,
}

impl StoredWriter {
    /// Appends `data`, preceded by `\n` if `sep`, as stored blocks.
    fn literal(&mut self, mut sep: bool, mut data: &[u8]) {
        while sep || !data.is_empty() {
            let take = data.len().min(MAX_STORED - usize::from(sep));
            if !self.open {
                // BFINAL=0, BTYPE=00, then padding to the byte boundary.
                self.out.put_u8(0);
            }
            let len = (take + usize::from(sep)) as u16;
            self.out.put_u16_le(len);
            self.out.put_u16_le(!len);
            if sep {
                self.out.put_u8(b'\n');
            }
            self.out.put_slice(&data[..take]);
            data = &data[take..];
            sep = false;
            self.open = false;
        }
    }

    /// Appends a stripped compressed message (see [`deflate_message`]).
    fn deflated(&mut self, piece: &[u8]) {
        if self.open {
            self.out.put_slice(&SYNC_TAIL);
        }
        self.out.put_slice(piece);
        self.open = true;
    }

    /// Leaves the stream open, so the receiver's appended tail completes it.
    fn finish(mut self) -> BytesMut {
        if !self.open {
            self.out.put_u8(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::tests::browser_deflate;
    use crate::{Config, FrameReader, Incoming};
    use proptest::prelude::*;

    fn wire_counted(f: &SharedFrame, deflate: bool) -> (Bytes, bool) {
        let mut out = BytesMut::new();
        let ran = f.write_to(deflate.into(), &mut out);
        (out.freeze(), ran)
    }

    fn batch_wire(frames: &[SharedFrame], encoding: Encoding) -> (Bytes, usize) {
        let mut out = BytesMut::new();
        let ran = write_batch(frames, encoding, &mut out);
        (out.freeze(), ran)
    }

    fn batch(frames: &[SharedFrame], deflate: bool) -> Bytes {
        batch_wire(frames, deflate.into()).0
    }

    /// Inflates like a browser would, independently of [`Inflater`]. A
    /// stored block with `!` follows the tail to prove the stream ended on a
    /// clean, non-final block boundary.
    fn inflate_raw(payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        input.extend_from_slice(&[0x00, 0x01, 0x00, 0xFE, 0xFF, b'!']);
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(input.len() * 8 + 1024);
        loop {
            let pos = d.total_in() as usize;
            d.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                .unwrap();
            if d.total_in() as usize == input.len() && out.len() < out.capacity() {
                assert_eq!(
                    out.pop(),
                    Some(b'!'),
                    "stream did not end on a block boundary"
                );
                return out;
            }
            out.reserve(out.capacity());
        }
    }

    /// Splits a server frame into (RSV1, payload), checking it is one final unmasked text frame.
    fn split_frame(wire: &[u8]) -> (bool, &[u8]) {
        let h = frame::parse_header(wire).unwrap();
        assert!(h.fin && !h.rsv2 && !h.rsv3 && h.mask.is_none());
        assert_eq!(h.opcode, TEXT);
        assert_eq!(h.header_len + h.len as usize, wire.len());
        (h.rsv1, &wire[h.header_len..])
    }

    /// What a client sees: decodes the frame with the reader in client role.
    fn client_reads(wire: &Bytes) -> String {
        let mut r = FrameReader::client(Config {
            max_message: 1 << 24,
            deflate: true,
        });
        let mut buf = BytesMut::from(&wire[..]);
        let Ok(Some(Incoming::Text(text))) = r.read(&mut buf) else {
            panic!("not a text message");
        };
        assert!(buf.is_empty());
        String::from_utf8(text.to_vec()).unwrap()
    }

    /// Checks the frame both ways and returns whether it was compressed.
    fn decodes_to(wire: &Bytes, expected: &str) -> bool {
        let (rsv1, payload) = split_frame(wire);
        let independent = if rsv1 {
            inflate_raw(payload)
        } else {
            payload.to_vec()
        };
        assert_eq!(String::from_utf8(independent).unwrap(), expected);
        assert_eq!(client_reads(wire), expected);
        rsv1
    }

    fn json(i: usize, len: usize) -> String {
        let body = format!("{{\"seq\":{i},\"text\":\"update for channel {i}\"}}");
        body.repeat(len / body.len() + 1)[..len].to_owned()
    }

    fn shared(text: &str, threshold: usize) -> SharedFrame {
        SharedFrame::new(
            Bytes::copy_from_slice(text.as_bytes()),
            Compression { threshold },
        )
    }

    #[test]
    fn deflate_message_ends_with_an_open_stored_block() {
        for len in [0, 1, 100, 5000, 100_000] {
            let data = json(len, len);
            let piece = deflate_message(data.as_bytes()).unwrap();
            assert_eq!(inflate_raw(&piece), data.as_bytes());
        }
    }

    #[test]
    fn inflater_reads_browser_output_and_resets_between_messages() {
        let mut inflater = Inflater::new();
        for i in 0..4 {
            let data = json(i, 3000 * i);
            let got = inflater
                .inflate(&browser_deflate(data.as_bytes()), 1 << 20)
                .unwrap();
            assert_eq!(got, data.as_bytes());
        }
    }

    #[test]
    fn inflater_stops_at_the_cap() {
        let bomb = browser_deflate(&vec![0; 50 << 20]);
        let mut inflater = Inflater::new();
        assert_eq!(inflater.inflate(&bomb, 1 << 16).unwrap_err().code, 1009);
        assert_eq!(
            inflater
                .inflate(&browser_deflate(&[0; 100]), 100)
                .unwrap()
                .len(),
            100
        );
        assert_eq!(
            inflater
                .inflate(&browser_deflate(&[0; 101]), 100)
                .unwrap_err()
                .code,
            1009
        );
    }

    #[test]
    fn plain_wire_below_threshold() {
        let text = json(1, Compression::DEFAULT_THRESHOLD - 1);
        let f = shared(&text, Compression::DEFAULT_THRESHOLD);
        assert_eq!(wire_counted(&f, true), (f.wire(false.into()), false));
        assert!(!decodes_to(&f.wire(true.into()), &text));
        assert_eq!(f.payload(), text.as_bytes());
    }

    #[test]
    fn deflated_wire_at_threshold() {
        let text = json(1, Compression::DEFAULT_THRESHOLD);
        let f = SharedFrame::new(Bytes::from(text.clone()), Compression::default());
        assert!(!decodes_to(&f.wire(false.into()), &text));
        let wire = f.wire(true.into());
        assert_eq!(wire[0], 0xC1, "FIN, RSV1, text");
        assert!(wire.len() < f.wire(false.into()).len());
        assert!(decodes_to(&wire, &text));
    }

    #[test]
    fn incompressible_payload_stays_plain_but_counts() {
        let f = shared("a", 0);
        let (wire, ran) = wire_counted(&f, true);
        assert!(ran);
        assert_eq!(wire, f.wire(false.into()));
        assert_eq!(wire_counted(&f, true), (wire, false));
    }

    #[test]
    fn compresses_once_across_calls_and_threads() {
        let f = shared(&json(7, 10_000), 256);
        assert_eq!(f.payload().as_ptr(), f.payload().as_ptr(), "no copy");
        let compressions: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let f = f.clone();
                    s.spawn(move || (0..200).filter(|_| wire_counted(&f, true).1).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(compressions, 1);
        assert_eq!(
            f.deflated_payload().map(<[u8]>::as_ptr),
            f.deflated_payload().map(<[u8]>::as_ptr),
            "the same compressed bytes for every connection"
        );
        assert!(!wire_counted(&f, true).1);
    }

    #[test]
    fn batch_plain() {
        let texts = [json(1, 10), json(2, 400), json(3, 0)];
        let frames: Vec<_> = texts.iter().map(|t| shared(t, 256)).collect();
        let wire = batch(&frames, false);
        assert!(!decodes_to(&wire, &texts.join("\n")));
    }

    #[test]
    fn batch_deflated_pieces_are_reused_verbatim() {
        let texts = [json(1, 500), json(2, 700)];
        let frames: Vec<_> = texts.iter().map(|t| shared(t, 256)).collect();
        let (wire, compressions) = batch_wire(&frames, Encoding::DEFLATE);
        assert_eq!(compressions, 2);
        assert!(decodes_to(&wire, &texts.join("\n")));
        let (_, payload) = split_frame(&wire);
        let [a, b] = [0, 1].map(|i| frames[i].deflated_payload().unwrap().to_vec());
        assert_eq!(
            payload,
            [&a[..], &[0x01, 0x00, 0xFE, 0xFF, b'\n'], &b[..]].concat()
        );
        assert_eq!(batch_wire(&frames, Encoding::DEFLATE), (wire, 0));
    }

    #[test]
    fn batch_mixing_small_and_large_frames() {
        let texts = [
            json(1, 20),
            json(2, 600),
            json(3, 5),
            json(4, 0),
            json(5, 900),
            json(6, 100),
        ];
        let frames: Vec<_> = texts.iter().map(|t| shared(t, 256)).collect();
        let wire = batch(&frames, true);
        assert!(decodes_to(&wire, &texts.join("\n")));
        // Starting and ending with large ones.
        let wire = batch(
            &[frames[1].clone(), frames[0].clone(), frames[4].clone()],
            true,
        );
        assert!(decodes_to(
            &wire,
            &[&texts[1], &texts[0], &texts[4]]
                .map(|s| s.as_str())
                .join("\n")
        ));
    }

    #[test]
    fn batch_with_a_literal_over_one_stored_block() {
        let big = json(9, 70_000);
        let frames = [
            shared(&json(1, 300), 0),
            shared(&big, usize::MAX),
            shared(&json(2, 300), 0),
        ];
        let wire = batch(&frames, true);
        assert!(decodes_to(
            &wire,
            &[json(1, 300), big, json(2, 300)].join("\n")
        ));
    }

    #[test]
    fn batch_without_compressible_pieces_is_plain() {
        let frames = [shared("one", 256), shared("two", 256)];
        let wire = batch(&frames, true);
        assert!(!decodes_to(&wire, "one\ntwo"));
        assert_eq!(wire, batch(&frames, false));
    }

    #[test]
    fn batch_of_one_and_empty_batch() {
        let f = shared(&json(1, 1000), 256);
        assert_eq!(batch(std::slice::from_ref(&f), true), f.wire(true.into()));
        assert_eq!(batch(std::slice::from_ref(&f), false), f.wire(false.into()));
        assert_eq!(&batch(&[] as &[SharedFrame], true)[..], &[0x81, 0x00]);
    }

    #[test]
    fn batch_of_one_counts_its_compression() {
        let f = shared(&json(1, 1000), 256);
        assert_eq!(
            batch_wire(std::slice::from_ref(&f), Encoding::DEFLATE),
            (f.wire(true.into()), 1)
        );
        assert_eq!(batch_wire(std::slice::from_ref(&f), Encoding::DEFLATE).1, 0);
    }

    proptest! {
        #[test]
        fn batch_round_trips(
            pieces in proptest::collection::vec((0usize..2000, 0usize..1000), 0..8),
            deflate: bool,
        ) {
            let texts: Vec<String> = pieces.iter().enumerate().map(|(i, &(len, _))| json(i, len)).collect();
            let frames: Vec<SharedFrame> =
                texts.iter().zip(&pieces).map(|(t, &(_, threshold))| shared(t, threshold)).collect();
            let wire = batch(&frames, deflate);
            let compressed = decodes_to(&wire, &texts.join("\n"));
            prop_assert!(deflate || !compressed);
        }
    }

    #[test]
    fn a_small_client_window_takes_compressed_only_messages_that_fit_it() {
        let encoding = Encoding::Deflate { max_len: 1024 };
        let (small, large) = (shared(&json(1, 600), 0), shared(&json(2, 3000), 0));
        assert!(small.text().len() <= 1024 && large.text().len() > 1024);
        let mut out = BytesMut::new();
        small.write_to(encoding, &mut out);
        assert_eq!(out[0] & 0x40, 0x40, "fits the window: compressed");
        out.clear();
        large.write_to(encoding, &mut out);
        assert_eq!(out[0] & 0x40, 0, "longer than the window: plain");
        // In a batch the long one goes in as stored blocks, and the batch still reads back.
        let (wire, _) = batch_wire(&[small.clone(), large.clone()], encoding);
        let (rsv1, payload) = split_frame(&wire);
        assert!(rsv1);
        let joined = [small.text(), large.text()].join(&b'\n');
        assert_eq!(inflate_raw(payload), joined);
        // The long piece is stored verbatim: its text appears as is.
        assert!(
            payload
                .windows(large.text().len())
                .any(|w| w == large.text())
        );
    }
}
