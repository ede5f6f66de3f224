//! Client tokens: verification with a pinned algorithm, and the grants a token carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wildmatch::WildMatch;

use crate::config::{JwtAlgorithm, JwtArgs, Secret};

/// Why a token was refused. The text is the `reason` of the 401 body; it never includes the token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("invalid signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid issuer")]
    Issuer,
    #[error("invalid audience")]
    Audience,
    #[error("missing claim: {0}")]
    MissingClaim(String),
    #[error("invalid claims: {0}")]
    Claims(String),
}

impl AuthError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::Claims(_) => "claims",
        }
    }
}

/// Key configuration errors, found at start.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error(
        "no JWT key: set PUSHGATE_JWT_SECRET (HS256) or PUSHGATE_JWT_PUBLIC_KEY (a PEM file), or run with --dev"
    )]
    Missing,
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not an RSA, EC (P-256) or Ed25519 public key in PEM form")]
    Pem(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    // Optional here so that a missing claim is reported by the validation as such.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Glob patterns (`*` any run of characters, `?` one character) from a token.
#[derive(Debug, Default)]
pub struct Patterns(Box<[WildMatch]>);

impl Patterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self(
            patterns
                .iter()
                .map(|p| WildMatch::new(p.as_ref()))
                .collect(),
        )
    }

    pub fn allows(&self, channel: &str) -> bool {
        self.0.iter().any(|p| p.matches(channel))
    }
}

/// A verified token: who it is for, until when, and what it may do.
#[derive(Debug)]
pub struct Grant {
    pub user: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub subscribe: Patterns,
    pub publish: Patterns,
}

/// Verifies client tokens with one pinned algorithm and key.
pub struct Verifier {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn from_args(args: &JwtArgs) -> Result<Self, KeyError> {
        let (algorithm, key) = match (&args.jwt_secret, &args.jwt_public_key) {
            (Some(secret), _) => (
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose().as_bytes()),
            ),
            (None, Some(path)) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: shown.clone(),
                    source,
                })?;
                public_key(&pem, args.jwt_algorithm).ok_or(KeyError::Pem(shown))?
            }
            (None, None) => return Err(KeyError::Missing),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = args.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &args.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &args.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            algorithm,
            key,
            validation,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // Check the header's algorithm ourselves first: `alg: none` and unknown names are not
        // even parseable by the JWT library, and deserve the same answer as any other mismatch.
        match header_algorithm(token) {
            None => return Err(AuthError::Malformed),
            Some(alg) if alg != algorithm_name(self.algorithm) => return Err(AuthError::Algorithm),
            Some(_) => {}
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.into_kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c),
                ErrorKind::Json(e) => AuthError::Claims(e.to_string()),
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        let (Some(user), Some(expires_at)) = (claims.sub, claims.exp) else {
            return Err(AuthError::MissingClaim("sub".into()));
        };
        pushgate_protocol::validate_user(&user)
            .map_err(|e| AuthError::Claims(format!("sub {e}")))?;
        Ok(Grant {
            user,
            expires_at,
            subscribe: Patterns::new(&claims.channels),
            publish: Patterns::new(&claims.publish),
        })
    }
}

fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "unsupported",
    }
}

fn header_algorithm(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        alg: String,
    }
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .ok()?;
    serde_json::from_slice::<Head>(&bytes).ok().map(|h| h.alg)
}

fn public_key(pem: &[u8], wanted: Option<JwtAlgorithm>) -> Option<(Algorithm, DecodingKey)> {
    let rsa = || {
        DecodingKey::from_rsa_pem(pem)
            .ok()
            .map(|k| (Algorithm::RS256, k))
    };
    let ec = || {
        DecodingKey::from_ec_pem(pem)
            .ok()
            .map(|k| (Algorithm::ES256, k))
    };
    let ed = || {
        DecodingKey::from_ed_pem(pem)
            .ok()
            .map(|k| (Algorithm::EdDSA, k))
    };
    match wanted {
        Some(JwtAlgorithm::Rs256) => rsa(),
        Some(JwtAlgorithm::Es256) => ec(),
        Some(JwtAlgorithm::EdDsa) => ed(),
        Some(JwtAlgorithm::Hs256) => None,
        None => rsa().or_else(ec).or_else(ed),
    }
}

/// Claims of a token minted by [`mint`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenSpec {
    pub sub: String,
    pub channels: Vec<String>,
    pub publish: Vec<String>,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Signs an HS256 token (the `token` subcommand, `--dev`, and tests).
pub fn mint(secret: &Secret, spec: &TokenSpec) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        sub: &'a str,
        iat: u64,
        exp: u64,
        channels: &'a [String],
        publish: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
    }
    let now = unix_now();
    let out = Out {
        sub: &spec.sub,
        iat: now,
        exp: now + spec.ttl.as_secs(),
        channels: &spec.channels,
        publish: &spec.publish,
        iss: spec.issuer.as_deref(),
        aud: spec.audience.as_deref(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &out,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 signing with a byte secret cannot fail")
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "test-secret";

    fn args() -> JwtArgs {
        JwtArgs {
            jwt_secret: Some(Secret::new(SECRET)),
            jwt_public_key: None,
            jwt_algorithm: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(2),
        }
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn later() -> u64 {
        unix_now() + 3600
    }

    #[test]
    fn a_good_token_grants_what_it_says() {
        let v = Verifier::from_args(&args()).unwrap();
        let g = v
            .verify(&sign(json!({"sub":"alice","exp":later(),"channels":["room:*","news"],"publish":["room:?"]})))
            .unwrap();
        assert_eq!(g.user, "alice");
        assert!(g.subscribe.allows("room:1") && g.subscribe.allows("news"));
        assert!(!g.subscribe.allows("newsroom"));
        assert!(g.publish.allows("room:1") && !g.publish.allows("room:12"));
    }

    #[test]
    fn minted_tokens_verify() {
        let spec = TokenSpec {
            sub: "bob".into(),
            channels: vec!["a".into()],
            ttl: Duration::from_secs(60),
            ..TokenSpec::default()
        };
        let g = Verifier::from_args(&args())
            .unwrap()
            .verify(&mint(&Secret::new(SECRET), &spec))
            .unwrap();
        assert_eq!(g.user, "bob");
        assert!(g.subscribe.allows("a") && !g.publish.allows("a"));
    }

    #[test]
    fn absent_grants_allow_nothing() {
        let g = Verifier::from_args(&args())
            .unwrap()
            .verify(&sign(json!({"sub":"a","exp":later()})))
            .unwrap();
        assert!(!g.subscribe.allows("x") && !g.publish.allows("x"));
    }

    #[test]
    fn bad_tokens_get_their_reason() {
        let v = Verifier::from_args(&args()).unwrap();
        let now = unix_now();
        let other_key = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"a","exp":later()}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub":"a","exp":later()}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let alg_none = format!(
            "{}.{}.",
            b64(json!({"alg":"none","typ":"JWT"})),
            b64(json!({"sub":"a","exp":later()}))
        );
        let cases = [
            (String::new(), AuthError::Missing),
            ("garbage".to_owned(), AuthError::Malformed),
            ("a.b.c".to_owned(), AuthError::Malformed),
            (sign(json!({"sub":"a","exp":now - 60})), AuthError::Expired),
            (
                sign(json!({"sub":"a","exp":later(),"nbf":now + 600})),
                AuthError::NotYetValid,
            ),
            (other_key, AuthError::Signature),
            (hs384, AuthError::Algorithm),
            (alg_none, AuthError::Algorithm),
            (
                sign(json!({"sub":"a"})),
                AuthError::MissingClaim("exp".into()),
            ),
            (
                sign(json!({"exp":later()})),
                AuthError::MissingClaim("sub".into()),
            ),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify(&token).unwrap_err(), want, "{token}");
        }
        assert!(matches!(
            v.verify(&sign(json!({"sub":"a","exp":later(),"channels":"x"}))),
            Err(AuthError::Claims(_))
        ));
        assert!(matches!(
            v.verify(&sign(json!({"sub":"has space","exp":later()}))),
            Err(AuthError::Claims(_))
        ));
    }

    #[test]
    fn leeway_is_small() {
        let v = Verifier::from_args(&args()).unwrap();
        // Expired a second ago: inside the 2 s leeway.
        assert!(
            v.verify(&sign(json!({"sub":"a","exp":unix_now() - 1})))
                .is_ok()
        );
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let mut a = args();
        a.jwt_issuer = Some("https://auth.example".into());
        a.jwt_audience = Some("pushgate".into());
        let v = Verifier::from_args(&a).unwrap();
        let exp = later();
        let good = json!({"sub":"a","exp":exp,"iss":"https://auth.example","aud":"pushgate"});
        assert!(v.verify(&sign(good)).is_ok());
        let cases = [
            (
                json!({"sub":"a","exp":exp,"aud":"pushgate"}),
                AuthError::MissingClaim("iss".into()),
            ),
            (
                json!({"sub":"a","exp":exp,"iss":"https://auth.example"}),
                AuthError::MissingClaim("aud".into()),
            ),
            (
                json!({"sub":"a","exp":exp,"iss":"https://evil","aud":"pushgate"}),
                AuthError::Issuer,
            ),
            (
                json!({"sub":"a","exp":exp,"iss":"https://auth.example","aud":"other"}),
                AuthError::Audience,
            ),
        ];
        for (claims, want) in cases {
            assert_eq!(
                v.verify(&sign(claims.clone())).unwrap_err(),
                want,
                "{claims}"
            );
        }
    }

    #[test]
    fn no_key_is_a_clear_error() {
        let mut a = args();
        a.jwt_secret = None;
        let err = Verifier::from_args(&a).err().unwrap().to_string();
        assert!(err.contains("PUSHGATE_JWT_SECRET"), "{err}");
    }
}
