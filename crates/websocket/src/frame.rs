//! Frame headers and encoders for server → client frames (never masked, RFC 6455 §5.1).

use bytes::{BufMut, BytesMut};

pub(crate) const CONTINUATION: u8 = 0x0;
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest unmasked header: 2 bytes plus a 64-bit length.
pub(crate) const MAX_SERVER_HEADER: usize = 10;

/// A parsed frame header; validation is the reader's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub fin: bool,
    pub rsv1: bool,
    pub rsv2: bool,
    pub rsv3: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes taken by the header itself, mask included.
    pub header_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses a header from the start of `buf`; `None` until the whole header is there.
pub(crate) fn parse_header(buf: &[u8]) -> Option<Header> {
    let &[b0, b1, ..] = buf else { return None };
    let (len, mut pos) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let mask: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(mask)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        rsv2: b0 & 0x20 != 0,
        rsv3: b0 & 0x10 != 0,
        opcode: b0 & 0x0F,
        mask,
        len,
        header_len: pos,
    })
}

/// XORs `data` with the client's masking key (RFC 6455 §5.3), in place.
pub(crate) fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= key;
    }
}

/// Unmasked header for a frame of `len` payload bytes; returns the buffer and its used length.
pub(crate) fn encode_header(
    fin: bool,
    rsv1: bool,
    opcode: u8,
    len: usize,
) -> ([u8; MAX_SERVER_HEADER], usize) {
    let mut out = [0u8; MAX_SERVER_HEADER];
    out[0] = opcode | if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 };
    let used = if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (out, used)
}

/// Appends one complete, final, unmasked frame to `out` (a connection's write buffer).
pub(crate) fn put(out: &mut BytesMut, opcode: u8, rsv1: bool, payload: &[u8]) {
    let (header, used) = encode_header(true, rsv1, opcode, payload.len());
    out.reserve(used + payload.len());
    out.put_slice(&header[..used]);
    out.put_slice(payload);
}

/// Appends an uncompressed text message to `out`; `payload` must be UTF-8.
pub fn put_text(out: &mut BytesMut, payload: &[u8]) {
    put(out, TEXT, false, payload);
}

/// Appends a binary message to `out`.
pub fn put_binary(out: &mut BytesMut, payload: &[u8]) {
    put(out, BINARY, false, payload);
}

/// Appends a ping to `out`; the payload is cut to the 125 bytes a control frame may carry.
pub fn put_ping(out: &mut BytesMut, payload: &[u8]) {
    put(
        out,
        PING,
        false,
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    );
}

/// Appends a pong to `out`, normally echoing a ping's payload; cut to 125 bytes like a ping.
pub fn put_pong(out: &mut BytesMut, payload: &[u8]) {
    put(
        out,
        PONG,
        false,
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    );
}

/// Appends a close frame to `out`: empty, or with a status code and a reason cut to 123 bytes
/// on a `char` boundary, so the frame stays a valid control frame with UTF-8 text.
pub fn put_close(out: &mut BytesMut, code: Option<(u16, &str)>) {
    let Some((code, reason)) = code else {
        return put(out, CLOSE, false, b"");
    };
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    put(out, CLOSE, false, &payload[..2 + end]);
}

/// Whether a close code may appear on the wire (RFC 6455 §7.4, IANA registry).
///
/// 1012-1014 are registered (service restart, try again later, bad gateway)
/// and sent by real servers, so they are accepted; 1004 is reserved, and
/// 1005, 1006 and 1015 are for local reporting only and must never be sent.
/// 3000-4999 belong to libraries and applications.
pub(crate) fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Test helpers playing the client: masked frames.
#[cfg(test)]
pub(crate) fn client_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let (header, used) = encode_header(fin, false, opcode, payload.len());
    let mut out = header[..used].to_vec();
    out[0] |= rsv << 4;
    let mut body = payload.to_vec();
    if let Some(mask) = mask {
        out[1] |= 0x80;
        out.extend_from_slice(&mask);
        apply_mask(&mut body, mask);
    }
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn written(write: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut out = BytesMut::new();
        write(&mut out);
        out.freeze()
    }

    fn close(code: u16, reason: &str) -> Bytes {
        written(|out| put_close(out, Some((code, reason))))
    }

    #[test]
    fn header_lengths_7_16_64_bit() {
        for (len, header_len) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let payload = vec![b'a'; len];
            let wire = written(|out| put_binary(out, &payload));
            assert_eq!(wire.len(), header_len + len);
            let h = parse_header(&wire).unwrap();
            assert_eq!(
                (h.len, h.header_len, h.opcode, h.fin),
                (len as u64, header_len, BINARY, true)
            );
            assert_eq!(h.mask, None);
            assert_eq!(parse_header(&wire[..header_len - 1]), None);
        }
    }

    #[test]
    fn masked_header_and_unmask() {
        let mask = [1, 2, 3, 4];
        let frame = client_frame(true, 0, TEXT, b"hello world", Some(mask));
        let h = parse_header(&frame).unwrap();
        assert_eq!((h.mask, h.header_len, h.len), (Some(mask), 6, 11));
        let mut body = frame[6..].to_vec();
        assert_ne!(body, b"hello world");
        apply_mask(&mut body, mask);
        assert_eq!(body, b"hello world");
        assert_eq!(parse_header(&frame[..5]), None);
    }

    #[test]
    fn control_encoders() {
        assert_eq!(&written(|o| put_ping(o, b"hi"))[..], &[0x89, 2, b'h', b'i']);
        assert_eq!(&written(|o| put_pong(o, b""))[..], &[0x8A, 0]);
        assert_eq!(written(|o| put_ping(o, &[0; 200])).len(), 2 + 125);
        assert_eq!(&written(|o| put_close(o, None))[..], &[0x88, 0]);
        assert_eq!(
            &close(1000, "bye")[..],
            &[0x88, 5, 0x03, 0xE8, b'b', b'y', b'e']
        );
    }

    #[test]
    fn close_reason_truncated_on_char_boundary() {
        let reason = "é".repeat(100);
        let wire = close(1001, &reason);
        let payload = &wire[2..];
        assert_eq!(wire[1] as usize, payload.len());
        assert_eq!(payload.len(), 2 + 122);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(close(1000, &"x".repeat(300)).len(), 2 + 125);
    }

    #[test]
    fn close_code_validity() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }
}
