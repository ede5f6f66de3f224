//! Turns received bytes into messages, enforcing RFC 6455 and RFC 7692.

use bytes::{Buf, Bytes, BytesMut};

use crate::Violation;
use crate::frame::{self, BINARY, CLOSE, CONTINUATION, Header, PING, PONG, TEXT};
use crate::utf8::Utf8;

/// Per-connection settings fixed by the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest message accepted, after reassembly and inflation; larger → 1009.
    pub max_message: usize,
    /// permessage-deflate was negotiated, so RSV1 marks a compressed message.
    pub deflate: bool,
}

/// One complete message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Always valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// Status code and reason, or `None` for a close frame without a body.
    Close(Option<(u16, String)>),
}

/// Reads frames for one connection.
///
/// Holds no compression state and, between messages, no buffer: only the
/// settings and an empty `Option`, a few dozen bytes per idle connection.
#[derive(Debug)]
pub struct FrameReader {
    config: Config,
    /// Reading server frames (tests, clients): frames must not be masked.
    client: bool,
    message: Option<Partial>,
}

/// A fragmented data message in progress.
#[derive(Debug)]
struct Partial {
    text: bool,
    compressed: bool,
    data: BytesMut,
    /// Only used for uncompressed text; compressed text is checked after inflating.
    utf8: Utf8,
}

impl FrameReader {
    /// A reader for a server: client frames must be masked.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            client: false,
            message: None,
        }
    }

    /// A reader for a client: server frames must not be masked.
    pub fn client(config: Config) -> Self {
        Self {
            config,
            client: true,
            message: None,
        }
    }

    /// Consumes complete frames from the front of `buf` until a message or a
    /// control frame is complete. `Ok(None)`: more bytes are needed (what was
    /// consumed is kept; call again after reading more). `Err`: close the
    /// connection with the violation's code; the reader is then unusable.
    ///
    /// Limits are checked on the announced length, before the payload
    /// arrives. `buf` is not grown here: reserving the announced length up
    /// front would let a 14-byte header allocate `max_message`.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, Violation> {
        loop {
            let Some(header) = frame::parse_header(buf) else {
                return Ok(None);
            };
            let len = self.check(&header)?;
            let total = header.header_len.saturating_add(len);
            if buf.len() < total {
                return Ok(None);
            }
            let mut payload = buf.split_to(total);
            payload.advance(header.header_len);
            if let Some(mask) = header.mask {
                frame::apply_mask(&mut payload, mask);
            }
            if header.is_control() {
                return control(header.opcode, payload.freeze()).map(Some);
            }
            if let Some(message) = self.data(&header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Validates a header before its payload is read; returns the payload length.
    fn check(&self, h: &Header) -> Result<usize, Violation> {
        if h.rsv2 || h.rsv3 {
            return Err(Violation::protocol("reserved bits set"));
        }
        if !matches!(h.opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
            return Err(Violation::protocol("reserved opcode"));
        }
        if h.mask.is_some() == self.client {
            return Err(Violation::protocol(if self.client {
                "masked server frame"
            } else {
                "unmasked client frame"
            }));
        }
        if h.len >> 63 != 0 {
            return Err(Violation::protocol("invalid frame length"));
        }
        if h.is_control() {
            if !h.fin {
                return Err(Violation::protocol("fragmented control frame"));
            }
            if h.rsv1 {
                return Err(Violation::protocol("RSV1 on a control frame"));
            }
            if h.len > frame::MAX_CONTROL_PAYLOAD as u64 {
                return Err(Violation::protocol("control frame too long"));
            }
            return Ok(h.len as usize);
        }
        let (buffered, compressed) = match (&self.message, h.opcode) {
            (None, CONTINUATION) => {
                return Err(Violation::protocol("continuation without a message"));
            }
            (Some(_), TEXT | BINARY) => {
                return Err(Violation::protocol("new message before the last ended"));
            }
            (Some(_), _) if h.rsv1 => {
                return Err(Violation::protocol("RSV1 on a continuation frame"));
            }
            (Some(m), _) => (m.data.len(), m.compressed),
            (None, _) if h.rsv1 && !self.config.deflate => {
                return Err(Violation::protocol("RSV1 without permessage-deflate"));
            }
            (None, _) => (0, h.rsv1),
        };
        // Compressed bytes may slightly exceed the inflated size (stored blocks).
        let limit = if compressed {
            let max = self.config.max_message;
            max.saturating_add(max / 64).saturating_add(64)
        } else {
            self.config.max_message
        };
        let too_big = Violation::too_big("message too big");
        let len = usize::try_from(h.len).map_err(|_| too_big)?;
        if buffered.checked_add(len).is_none_or(|total| total > limit) {
            return Err(too_big);
        }
        Ok(len)
    }

    /// Adds a data frame to the message; returns the message when it is complete.
    fn data(&mut self, h: &Header, payload: BytesMut) -> Result<Option<Incoming>, Violation> {
        let mut message = match self.message.take() {
            Some(mut m) => {
                m.data.extend_from_slice(&payload);
                if m.text && !m.compressed {
                    m.utf8.feed(&payload).map_err(|()| invalid_utf8())?;
                }
                m
            }
            None => {
                let mut m = Partial {
                    text: h.opcode == TEXT,
                    compressed: h.rsv1,
                    data: payload,
                    utf8: Utf8::default(),
                };
                if m.text && !m.compressed && !h.fin {
                    m.utf8.feed(&m.data).map_err(|()| invalid_utf8())?;
                }
                m
            }
        };
        if !h.fin {
            self.message = Some(message);
            return Ok(None);
        }
        let data = if message.compressed {
            crate::deflate::inflate(&message.data, self.config.max_message)?
        } else {
            std::mem::take(&mut message.data).freeze()
        };
        if !message.text {
            return Ok(Some(Incoming::Binary(data)));
        }
        let valid = if message.compressed || h.opcode == TEXT {
            std::str::from_utf8(&data).is_ok()
        } else {
            message.utf8.finish().is_ok()
        };
        if valid {
            Ok(Some(Incoming::Text(data)))
        } else {
            Err(invalid_utf8())
        }
    }
}

fn invalid_utf8() -> Violation {
    Violation::invalid("invalid UTF-8 in text message")
}

fn control(opcode: u8, payload: Bytes) -> Result<Incoming, Violation> {
    match opcode {
        PING => Ok(Incoming::Ping(payload)),
        PONG => Ok(Incoming::Pong(payload)),
        _ => match *payload {
            [] => Ok(Incoming::Close(None)),
            [_] => Err(Violation::protocol("one-byte close payload")),
            [hi, lo, ref reason @ ..] => {
                let code = u16::from_be_bytes([hi, lo]);
                if !frame::is_valid_close_code(code) {
                    return Err(Violation::protocol("invalid close code"));
                }
                let reason = std::str::from_utf8(reason)
                    .map_err(|_| Violation::invalid("invalid UTF-8 in close reason"))?;
                Ok(Incoming::Close(Some((code, reason.to_owned()))))
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::client_frame;
    use flate2::{Compress, FlushCompress};
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];
    const MAX: usize = 1 << 20;
    const RSV1: u8 = 0b100;

    /// A masked client frame; `rsv` is RSV1..RSV3 as three bits.
    fn cf(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(fin, rsv, opcode, payload, Some(MASK))
    }

    /// Compresses like a browser: raw deflate, sync flush, tail stripped.
    pub(crate) fn browser_deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(flate2::Compression::fast(), false);
        let mut out = Vec::with_capacity(data.len() * 2 + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
        assert_eq!(c.total_in() as usize, data.len());
        assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
        out.truncate(out.len() - 4);
        out
    }

    fn reader(deflate: bool) -> FrameReader {
        FrameReader::new(Config {
            max_message: MAX,
            deflate,
        })
    }

    /// Everything `input` yields at once, stopping at the first violation.
    fn read_all(r: &mut FrameReader, input: &[u8]) -> Vec<Result<Incoming, Violation>> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match r.read(&mut buf) {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => return out,
                Err(v) => {
                    out.push(Err(v));
                    return out;
                }
            }
        }
    }

    fn code(deflate: bool, input: &[u8]) -> u16 {
        match read_all(&mut reader(deflate), input).pop() {
            Some(Err(v)) => v.code,
            other => panic!("no violation: {other:?}"),
        }
    }

    fn text(s: &str) -> Result<Incoming, Violation> {
        Ok(Incoming::Text(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn unmasked_client_frame_1002() {
        assert_eq!(code(false, &client_frame(true, 0, TEXT, b"hi", None)), 1002);
    }

    #[test]
    fn masked_server_frame_1002_for_client_reader() {
        let mut r = FrameReader::client(Config {
            max_message: MAX,
            deflate: false,
        });
        assert_eq!(
            read_all(&mut r, &cf(true, 0, TEXT, b"hi"))[0]
                .as_ref()
                .unwrap_err()
                .code,
            1002
        );
        let mut r = FrameReader::client(Config {
            max_message: MAX,
            deflate: false,
        });
        assert_eq!(
            read_all(&mut r, &client_frame(true, 0, TEXT, b"hi", None)),
            [text("hi")]
        );
    }

    #[test]
    fn rsv2_rsv3_1002() {
        assert_eq!(code(true, &cf(true, 0b010, TEXT, b"hi")), 1002);
        assert_eq!(code(true, &cf(true, 0b001, TEXT, b"hi")), 1002);
    }

    #[test]
    fn rsv1_without_deflate_1002() {
        assert_eq!(
            code(false, &cf(true, RSV1, TEXT, &browser_deflate(b"hi"))),
            1002
        );
    }

    #[test]
    fn rsv1_on_continuation_1002() {
        let mut input = cf(false, RSV1, TEXT, &browser_deflate(b"hello"));
        input.extend(cf(true, RSV1, CONTINUATION, b""));
        assert_eq!(code(true, &input), 1002);
    }

    #[test]
    fn rsv1_on_control_1002() {
        assert_eq!(code(true, &cf(true, RSV1, PING, b"")), 1002);
    }

    #[test]
    fn reserved_opcodes_1002() {
        for opcode in (3..=7).chain(0xB..=0xF) {
            assert_eq!(
                code(false, &cf(true, 0, opcode, b"")),
                1002,
                "opcode {opcode}"
            );
        }
    }

    #[test]
    fn fragmented_control_1002() {
        assert_eq!(code(false, &cf(false, 0, PING, b"")), 1002);
    }

    #[test]
    fn control_payload_over_125_1002() {
        assert_eq!(code(false, &cf(true, 0, PONG, &[0; 126])), 1002);
        assert_eq!(
            read_all(&mut reader(false), &cf(true, 0, PING, &[7; 125])).len(),
            1
        );
    }

    #[test]
    fn continuation_without_message_1002() {
        assert_eq!(code(false, &cf(true, 0, CONTINUATION, b"x")), 1002);
    }

    #[test]
    fn data_frame_during_fragmented_message_1002() {
        let mut input = cf(false, 0, TEXT, b"a");
        input.extend(cf(true, 0, BINARY, b"b"));
        assert_eq!(code(false, &input), 1002);
    }

    #[test]
    fn one_byte_close_1002() {
        assert_eq!(code(false, &cf(true, 0, CLOSE, &[3])), 1002);
    }

    #[test]
    fn invalid_close_codes_1002() {
        for c in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(
                code(false, &cf(true, 0, CLOSE, &c.to_be_bytes())),
                1002,
                "code {c}"
            );
        }
    }

    #[test]
    fn valid_close_frames() {
        for c in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let mut payload = c.to_be_bytes().to_vec();
            payload.extend_from_slice("bye ✓".as_bytes());
            let got = read_all(&mut reader(false), &cf(true, 0, CLOSE, &payload));
            assert_eq!(got, [Ok(Incoming::Close(Some((c, "bye ✓".to_owned()))))]);
        }
        assert_eq!(
            read_all(&mut reader(false), &cf(true, 0, CLOSE, b"")),
            [Ok(Incoming::Close(None))]
        );
    }

    #[test]
    fn close_reason_not_utf8_1007() {
        assert_eq!(code(false, &cf(true, 0, CLOSE, b"\x03\xE8\xFF")), 1007);
    }

    #[test]
    fn invalid_utf8_text_1007() {
        assert_eq!(code(false, &cf(true, 0, TEXT, b"ab\xC0\xAF")), 1007);
        // Truncated character at the end of a fragmented message.
        let mut input = cf(false, 0, TEXT, b"ok");
        input.extend(cf(true, 0, CONTINUATION, b"\xE2\x82"));
        assert_eq!(code(false, &input), 1007);
    }

    #[test]
    fn invalid_utf8_fails_on_first_bad_fragment() {
        // The message never ends, so only fail-fast validation can report it.
        let mut input = cf(false, 0, TEXT, "κόσμε".as_bytes());
        input.extend(cf(
            false,
            0,
            CONTINUATION,
            b"\xCE\xBA\xE1\xBD\xB9\xCF\x83\xCE\xBC\xCE\xB5\xF4\x90\x80\x80",
        ));
        assert_eq!(code(false, &input), 1007);
    }

    #[test]
    fn multibyte_char_split_across_fragments() {
        let euro = "€".as_bytes();
        let mut input = cf(false, 0, TEXT, &[b'a', euro[0]]);
        input.extend(cf(false, 0, CONTINUATION, &euro[1..2]));
        input.extend(cf(true, 0, CONTINUATION, &[euro[2], b'z']));
        assert_eq!(read_all(&mut reader(false), &input), [text("a€z")]);
        // The same split with an invalid continuation byte fails.
        let mut input = cf(false, 0, TEXT, &[b'a', euro[0]]);
        input.extend(cf(true, 0, CONTINUATION, &[euro[1], b'z']));
        assert_eq!(code(false, &input), 1007);
    }

    #[test]
    fn invalid_64bit_length_1002() {
        let mut input = vec![0x81, 0x80 | 127];
        input.extend_from_slice(&(1u64 << 63).to_be_bytes());
        input.extend_from_slice(&MASK);
        assert_eq!(code(false, &input), 1002);
    }

    #[test]
    fn frame_over_limit_1009_before_payload() {
        let frame = cf(true, 0, BINARY, &[0; 200]);
        let mut r = FrameReader::new(Config {
            max_message: 100,
            deflate: false,
        });
        // Only the header (2 + 2 length + 4 mask) has arrived.
        assert_eq!(
            read_all(&mut r, &frame[..8])[0].as_ref().unwrap_err().code,
            1009
        );
        let mut r = FrameReader::new(Config {
            max_message: 200,
            deflate: false,
        });
        assert_eq!(read_all(&mut r, &frame).len(), 1);
    }

    #[test]
    fn fragmented_message_over_limit_1009() {
        let mut r = FrameReader::new(Config {
            max_message: 100,
            deflate: false,
        });
        let mut input = cf(false, 0, BINARY, &[0; 60]);
        input.extend(cf(true, 0, CONTINUATION, &[0; 41]));
        assert_eq!(read_all(&mut r, &input)[0].as_ref().unwrap_err().code, 1009);
    }

    #[test]
    fn zip_bomb_1009() {
        let bomb = browser_deflate(&vec![b'a'; 10 << 20]);
        assert!(bomb.len() < 64 << 10);
        let mut r = FrameReader::new(Config {
            max_message: 1 << 20,
            deflate: true,
        });
        assert_eq!(
            read_all(&mut r, &cf(true, RSV1, TEXT, &bomb))[0]
                .as_ref()
                .unwrap_err()
                .code,
            1009
        );
    }

    #[test]
    fn compressed_message_at_limit_accepted() {
        let data = vec![b'q'; 1000];
        let mut r = FrameReader::new(Config {
            max_message: 1000,
            deflate: true,
        });
        let got = read_all(&mut r, &cf(true, RSV1, BINARY, &browser_deflate(&data)));
        assert_eq!(got, [Ok(Incoming::Binary(data.into()))]);
        let mut r = FrameReader::new(Config {
            max_message: 999,
            deflate: true,
        });
        let got = read_all(
            &mut r,
            &cf(true, RSV1, BINARY, &browser_deflate(&[b'q'; 1000])),
        );
        assert_eq!(got[0].as_ref().unwrap_err().code, 1009);
    }

    #[test]
    fn corrupt_compressed_data_1007() {
        assert_eq!(code(true, &cf(true, RSV1, TEXT, &[0xFF, 0xFF, 0xFF])), 1007);
    }

    #[test]
    fn compressed_invalid_utf8_1007() {
        assert_eq!(
            code(true, &cf(true, RSV1, TEXT, &browser_deflate(b"ab\xFFcd"))),
            1007
        );
    }

    #[test]
    fn fragmented_text_with_interleaved_ping() {
        let mut input = cf(false, 0, TEXT, b"Hello, ");
        input.extend(cf(true, 0, PING, b"p"));
        input.extend(cf(false, 0, CONTINUATION, "wörld".as_bytes()));
        input.extend(cf(true, 0, PONG, b""));
        input.extend(cf(true, 0, CONTINUATION, b"!"));
        let got = read_all(&mut reader(false), &input);
        assert_eq!(
            got,
            [
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Pong(Bytes::new())),
                text("Hello, wörld!"),
            ]
        );
    }

    #[test]
    fn unmasking_and_16_64_bit_lengths() {
        for len in [0, 125, 126, 65535, 65536, 70000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let got = read_all(&mut reader(false), &cf(true, 0, BINARY, &data));
            assert_eq!(got, [Ok(Incoming::Binary(data.into()))], "len {len}");
        }
    }

    #[test]
    fn compressed_message_inflates() {
        let msg = "{\"type\":\"hello\",\"payload\":\"".to_owned() + &"abc".repeat(500) + "\"}";
        let got = read_all(
            &mut reader(true),
            &cf(true, RSV1, TEXT, &browser_deflate(msg.as_bytes())),
        );
        assert_eq!(got, [text(&msg)]);
        // An empty compressed message.
        let got = read_all(
            &mut reader(true),
            &cf(true, RSV1, TEXT, &browser_deflate(b"")),
        );
        assert_eq!(got, [text("")]);
        // Uncompressed messages are still allowed on a deflate connection.
        assert_eq!(
            read_all(&mut reader(true), &cf(true, 0, TEXT, b"plain")),
            [text("plain")]
        );
    }

    #[test]
    fn fragmented_compressed_message_inflates() {
        let msg = "fragmented ünïcode ".repeat(200);
        let compressed = browser_deflate(msg.as_bytes());
        let (a, rest) = compressed.split_at(compressed.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut input = cf(false, RSV1, TEXT, a);
        input.extend(cf(false, 0, CONTINUATION, b));
        input.extend(cf(true, 0, PING, b""));
        input.extend(cf(true, 0, CONTINUATION, c));
        let got = read_all(&mut reader(true), &input);
        assert_eq!(got, [Ok(Incoming::Ping(Bytes::new())), text(&msg)]);
    }

    #[test]
    fn readers_share_the_threads_inflater() {
        let (mut r1, mut r2) = (reader(true), reader(true));
        for i in 0..3 {
            let m1 = format!("first connection {i} ").repeat(20);
            let m2 = format!("second connection {i} ").repeat(30);
            let mut b1 = BytesMut::from(&cf(true, RSV1, TEXT, &browser_deflate(m1.as_bytes()))[..]);
            let mut b2 = BytesMut::from(&cf(true, RSV1, TEXT, &browser_deflate(m2.as_bytes()))[..]);
            assert_eq!(r1.read(&mut b1).map(Option::unwrap), text(&m1));
            assert_eq!(r2.read(&mut b2).map(Option::unwrap), text(&m2));
        }
    }

    #[test]
    fn idle_reader_is_small_and_holds_no_buffer() {
        assert!(
            std::mem::size_of::<FrameReader>() <= 64,
            "{}",
            std::mem::size_of::<FrameReader>()
        );
        let mut r = reader(false);
        let mut input = cf(false, 0, TEXT, b"a");
        input.extend(cf(true, 0, CONTINUATION, b"b"));
        assert_eq!(read_all(&mut r, &input), [text("ab")]);
        assert!(r.message.is_none());
    }

    /// A stream using every feature, and what it yields.
    fn mixed_stream() -> (Vec<u8>, Vec<Result<Incoming, Violation>>) {
        let big = "x".repeat(300);
        let mut input = cf(false, 0, TEXT, "né".as_bytes());
        input.extend(cf(true, 0, PING, b"1"));
        input.extend(cf(true, 0, CONTINUATION, big.as_bytes()));
        input.extend(cf(
            true,
            RSV1,
            TEXT,
            &browser_deflate(b"squeezed squeezed squeezed"),
        ));
        input.extend(cf(true, 0, BINARY, &[1; 70000]));
        input.extend(cf(true, 0, CLOSE, b"\x03\xE8ok"));
        let expected = vec![
            Ok(Incoming::Ping(Bytes::from_static(b"1"))),
            text(&format!("né{big}")),
            text("squeezed squeezed squeezed"),
            Ok(Incoming::Binary(vec![1; 70000].into())),
            Ok(Incoming::Close(Some((1000, "ok".to_owned())))),
        ];
        (input, expected)
    }

    /// Feeds `input` in the given chunks, reading after each.
    fn read_chunked(input: &[u8], cuts: &[usize]) -> Vec<Result<Incoming, Violation>> {
        let (mut r, mut buf) = (reader(true), BytesMut::new());
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&input.len()]) {
            let end = end.clamp(start, input.len());
            buf.extend_from_slice(&input[start..end]);
            start = end;
            while let Some(m) = r.read(&mut buf).transpose() {
                out.push(m);
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn split_at_every_position_gives_the_same_messages() {
        let (input, expected) = mixed_stream();
        assert_eq!(read_chunked(&input, &[]), expected);
        // Every position around the small frames, and a sample inside the 70 kB one.
        let small = 0..700.min(input.len());
        let tail = input.len() - 100..input.len();
        for cut in small.chain((700..input.len()).step_by(997)).chain(tail) {
            assert_eq!(read_chunked(&input, &[cut]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_messages() {
        let (input, expected) = mixed_stream();
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(read_chunked(&input, &cuts), expected);
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_messages(mut cuts in proptest::collection::vec(0usize..71_000, 0..20)) {
            let (input, expected) = mixed_stream();
            cuts.sort_unstable();
            prop_assert_eq!(read_chunked(&input, &cuts), expected);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..300), deflate: bool) {
            let mut r = FrameReader::new(Config { max_message: 200, deflate });
            read_all(&mut r, &input);
        }

        #[test]
        fn never_panics_on_masked_frames(
            frames in proptest::collection::vec((any::<bool>(), 0u8..8, 0u8..16, proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
        ) {
            let mut input = Vec::new();
            for (fin, rsv, opcode, payload) in frames {
                input.extend(cf(fin, rsv, opcode, &payload));
            }
            read_all(&mut reader(true), &input);
        }
    }
}
