//! Incremental UTF-8 validation, so a text message split into fragments fails
//! on the first bad fragment instead of after the whole message is buffered.

/// Carries the up to 3 bytes of a character split across fragments.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Utf8 {
    pending: [u8; 3],
    len: u8,
}

impl Utf8 {
    /// Validates the next piece; `Err` as soon as the bytes can no longer be UTF-8.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ()> {
        if self.len > 0 {
            // Finish the pending character with at most enough bytes for one char.
            let held = usize::from(self.len);
            let take = data.len().min(4 - held);
            let mut joined = [0u8; 4];
            joined[..held].copy_from_slice(&self.pending[..held]);
            joined[held..held + take].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&joined[..held + take]) {
                Ok(_) => data = &data[take..],
                Err(e) if e.valid_up_to() >= held => data = &data[e.valid_up_to() - held..],
                Err(e) if e.error_len().is_some() => return Err(()),
                // Still a prefix of one character: `data` ran out.
                Err(_) => {
                    self.pending[..held + take].copy_from_slice(&joined[..held + take]);
                    self.len = (held + take) as u8;
                    return Ok(());
                }
            }
            self.len = 0;
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(()),
            Err(e) => {
                let rest = &data[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
        }
    }

    /// At the end of the message no character may be left unfinished.
    pub fn finish(&self) -> Result<(), ()> {
        if self.len == 0 { Ok(()) } else { Err(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_everywhere(bytes: &[u8]) -> bool {
        let whole = std::str::from_utf8(bytes).is_ok();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut v = Utf8::default();
                let ok = v.feed(&bytes[..i]).is_ok()
                    && v.feed(&bytes[i..j]).is_ok()
                    && v.feed(&bytes[j..]).is_ok()
                    && v.finish().is_ok();
                assert_eq!(ok, whole, "{bytes:?} split at {i},{j}");
            }
        }
        whole
    }

    #[test]
    fn agrees_with_std_at_every_split() {
        assert!(split_everywhere("aé€𝄞z".as_bytes()));
        assert!(split_everywhere("𝄞𝄞".as_bytes()));
        assert!(!split_everywhere(b"a\xF0\x9D\x84"));
        assert!(!split_everywhere(b"\xE2\x82\x28x"));
        assert!(!split_everywhere(b"ok\xED\xA0\x80ok"));
        assert!(!split_everywhere(b"\xC3\xA9\xFF"));
        assert!(!split_everywhere(b"\xF4\x90\x80\x80"));
    }

    #[test]
    fn fails_fast_before_the_end() {
        let mut v = Utf8::default();
        assert!(v.feed(b"\xCE\xBA\xE1").is_ok());
        assert!(v.feed(b"\xBD").is_ok());
        assert!(v.feed(b"\xC0").is_err());
    }
}
