//! Client tokens, minted the way a backend would: HS256 over `sub`, `exp`, `channels`, `publish`
//! (and `iss`/`aud` when the node requires them).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// What a token is signed with. Travels to worker processes over their stdin, never in argv.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenSpec {
    pub secret: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub ttl_secs: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    channels: &'a [&'a str],
    publish: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl TokenSpec {
    pub fn new(
        secret: String,
        issuer: Option<String>,
        audience: Option<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            secret,
            issuer,
            audience,
            ttl_secs: ttl.as_secs().max(1),
        }
    }

    /// A token for `sub`, allowed to subscribe to `channels` and publish to `publish`.
    pub fn mint(&self, sub: &str, channels: &[&str], publish: &[&str]) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub,
            exp: now + self.ttl_secs,
            iat: now,
            channels,
            publish,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .context("signing a client token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn tokens_carry_the_claims() {
        let spec = TokenSpec::new(
            "s3cret".into(),
            Some("me".into()),
            None,
            Duration::from_secs(60),
        );
        let token = spec.mint("bench-1", &["bench"], &[]).unwrap();
        let mut validation = Validation::default();
        validation.set_issuer(&["me"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "bench-1");
        assert_eq!(data.claims["channels"], serde_json::json!(["bench"]));
        assert_eq!(data.claims["publish"], serde_json::json!([]));
        assert!(data.claims.get("aud").is_none());
    }
}
