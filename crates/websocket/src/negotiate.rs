//! permessage-deflate negotiation (RFC 7692 §5, §7.1) for the server side.

use crate::Encoding;

/// permessage-deflate was accepted; carries the response header value.
///
/// We always answer `server_no_context_takeover` (compressed messages do not
/// depend on the connection, so they can be shared) and
/// `client_no_context_takeover` (client messages inflate without
/// per-connection state); RFC 7692 §7.1.1 lets a server add both unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The client's `server_max_window_bits`, when it sent one.
    server_window_bits: Option<u8>,
}

const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

impl Deflate {
    /// Value for the `Sec-WebSocket-Extensions` response header.
    pub fn response(&self) -> String {
        match self.server_window_bits {
            None => RESPONSE.to_owned(),
            Some(bits) => format!("{RESPONSE}; server_max_window_bits={bits}"),
        }
    }

    /// How this connection takes messages: compressed, up to the length its window allows.
    ///
    /// Every message is compressed from an empty window, so its back-references
    /// reach no further back than its own length: a message no longer than the
    /// client's window (2^`server_max_window_bits`) is valid for it whatever
    /// window it was compressed with. Longer ones go out plain on such a
    /// connection, so one compressed form still serves every connection.
    pub fn encoding(&self) -> Encoding {
        let max_len = self.server_window_bits.map_or(usize::MAX, |bits| 1 << bits);
        Encoding::Deflate { max_len }
    }
}

/// Picks the first acceptable permessage-deflate offer in a
/// `Sec-WebSocket-Extensions` request header value (several header lines may
/// be joined with `, `). `None`: answer without the extension.
///
/// An offer is declined, and the next one tried, if it has an unknown or
/// repeated parameter or an invalid value (RFC 7692 §7). Window bits:
/// - `server_max_window_bits=N` is accepted and echoed, as §7.1.2.1 says an
///   accepted offer with this parameter is answered with it; below 15 it
///   limits which messages go compressed (see [`Deflate::encoding`]).
/// - `client_max_window_bits` (bare, as browsers send it, or `=N`) only
///   limits the client; we inflate with a 32 KiB window, which reads any
///   client window, so it is not echoed and the client keeps its own
///   choice (§7.1.2.2 makes the response parameter optional).
pub fn negotiate(header: &str) -> Option<Deflate> {
    split_unquoted(header, b',').into_iter().find_map(accept)
}

fn accept(offer: &str) -> Option<Deflate> {
    const SERVER_NO_CONTEXT: usize = 0;
    const CLIENT_NO_CONTEXT: usize = 1;
    const SERVER_BITS: usize = 2;
    const CLIENT_BITS: usize = 3;
    let mut parts = split_unquoted(offer, b';').into_iter();
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("permessage-deflate")
    {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_window_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (param.trim(), None),
        };
        let index = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|known| name.eq_ignore_ascii_case(known))?;
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
        match (index, value.as_deref()) {
            (SERVER_NO_CONTEXT | CLIENT_NO_CONTEXT, None) | (CLIENT_BITS, None) => {}
            (SERVER_BITS, Some(bits)) => server_window_bits = Some(window_bits(bits)?),
            (CLIENT_BITS, Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
    }
    Some(Deflate { server_window_bits })
}

/// A window size: a decimal 8-15 without leading zeros (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// Removes the quotes and backslash escapes of a quoted-string (RFC 7692 §7.1).
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return (!value.is_empty()).then(|| value.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    Some(out)
}

/// Splits on `sep` outside quoted strings.
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, &b) in s.as_bytes().iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE_SERVER_BITS: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";

    fn response(header: &str) -> Option<String> {
        negotiate(header).map(|d| d.response())
    }

    #[test]
    fn browser_offers() {
        // Chrome and Firefox both send this.
        assert_eq!(
            response("permessage-deflate; client_max_window_bits"),
            Some(RESPONSE.into())
        );
        assert_eq!(response("permessage-deflate"), Some(RESPONSE.into()));
    }

    #[test]
    fn a_small_server_window_is_echoed_and_bounds_what_goes_compressed() {
        let offer = "permessage-deflate; server_max_window_bits=10, permessage-deflate";
        let deflate = negotiate(offer).unwrap();
        assert_eq!(
            deflate.response(),
            format!("{RESPONSE}; server_max_window_bits=10")
        );
        assert_eq!(deflate.encoding(), Encoding::Deflate { max_len: 1024 });
        let any = negotiate("permessage-deflate").unwrap().encoding();
        assert_eq!(any, Encoding::DEFLATE);
    }

    #[test]
    fn server_window_15_accepted_and_echoed() {
        assert_eq!(
            response("permessage-deflate; server_max_window_bits=15"),
            Some(RESPONSE_SERVER_BITS.into())
        );
    }

    #[test]
    fn full_offer_accepted() {
        let offer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                     server_max_window_bits=15; client_max_window_bits=9";
        assert_eq!(response(offer), Some(RESPONSE_SERVER_BITS.into()));
    }

    #[test]
    fn unknown_param_declined() {
        assert_eq!(response("permessage-deflate; foo"), None);
        assert_eq!(
            response("permessage-deflate; foo=1, permessage-deflate"),
            Some(RESPONSE.into())
        );
    }

    #[test]
    fn duplicate_params_declined() {
        assert_eq!(
            response("permessage-deflate; client_max_window_bits; client_max_window_bits"),
            None
        );
        assert_eq!(
            response("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
    }

    #[test]
    fn invalid_values_declined() {
        for offer in [
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=a",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; client_max_window_bits=\"1\"0\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"\"",
        ] {
            assert_eq!(response(offer), None, "{offer}");
        }
    }

    #[test]
    fn quoted_values() {
        assert_eq!(
            response("permessage-deflate; client_max_window_bits=\"10\""),
            Some(RESPONSE.into())
        );
        assert_eq!(
            response("permessage-deflate; server_max_window_bits=\"15\""),
            Some(RESPONSE_SERVER_BITS.into())
        );
        assert_eq!(
            response("permessage-deflate; client_max_window_bits=\"1\\0\""),
            Some(RESPONSE.into())
        );
    }

    #[test]
    fn other_extensions_skipped() {
        assert_eq!(
            response("x-webkit-deflate-frame, permessage-deflate"),
            Some(RESPONSE.into())
        );
        assert_eq!(
            response("foo; bar=\"a,b\"; baz, permessage-deflate"),
            Some(RESPONSE.into())
        );
        assert_eq!(response("x-webkit-deflate-frame"), None);
    }

    #[test]
    fn no_offer() {
        assert_eq!(response(""), None);
        assert_eq!(response("  ,  "), None);
    }
}
