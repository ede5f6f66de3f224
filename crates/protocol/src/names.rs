//! Rules for channel and user names, shared by every entry point (WebSocket, HTTP API, Redis).

use thiserror::Error;

/// Longest channel or user name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_NAME_BYTES} bytes")]
    TooLong,
    #[error("must not contain whitespace or control characters")]
    BadCharacter,
    #[error("must not contain {{ or }} on Redis Cluster")]
    HashTag,
}

fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// A channel name: 1 to 255 bytes of UTF-8 without whitespace or control characters.
/// `*` and `?` are allowed in names; they only act as wildcards in token grants.
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    validate(name)
}

/// A channel name on Redis Cluster: as [`validate_channel`], without `{` or `}`. A channel's
/// keys carry its topic as a hash tag, which braces in the name would break.
pub fn validate_sharded_channel(name: &str) -> Result<(), NameError> {
    validate(name)?;
    if name.contains(['{', '}']) {
        return Err(NameError::HashTag);
    }
    Ok(())
}

/// A user name (a token's `sub`): same rules as a channel name.
pub fn validate_user(name: &str) -> Result<(), NameError> {
    validate(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["room:1", "news", "chat.eu-west/42", "émoji-✓", "a"] {
            assert_eq!(validate_channel(name), Ok(()), "{name}");
        }
        assert_eq!(validate_channel(&"x".repeat(MAX_NAME_BYTES)), Ok(()));
    }

    #[test]
    fn sharded_channels_have_no_braces() {
        assert_eq!(validate_sharded_channel("room:1"), Ok(()));
        assert_eq!(validate_sharded_channel("a{b}"), Err(NameError::HashTag));
        assert_eq!(validate_sharded_channel("}"), Err(NameError::HashTag));
        assert_eq!(validate_sharded_channel(""), Err(NameError::Empty));
        assert_eq!(validate_channel("a{b}"), Ok(()));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(validate_channel(""), Err(NameError::Empty));
        assert_eq!(
            validate_channel(&"x".repeat(MAX_NAME_BYTES + 1)),
            Err(NameError::TooLong)
        );
        for name in ["a b", "tab\there", "nl\n", "nul\0"] {
            assert_eq!(
                validate_user(name),
                Err(NameError::BadCharacter),
                "{name:?}"
            );
        }
    }
}
