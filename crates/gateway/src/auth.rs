//! Client tokens: verification with a pinned algorithm, and the grants a token carries.
//!
//! Keys come from one source: an HS256 secret, one PEM public key, or a JWKS URL (see
//! [`crate::jwks`]). Either way the algorithm is pinned by the key, never taken from the token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wildmatch::WildMatch;

use crate::config::{JwtAlgorithm, JwtArgs, Secret};
use crate::jwks::{Jwks, JwksSettings};

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
    #[error("unknown signing key")]
    UnknownKey,
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
            Self::UnknownKey => "unknown_kid",
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
        "no JWT key: set PUSHGATE_JWT_SECRET (HS256), PUSHGATE_JWT_PUBLIC_KEY (a PEM file) or PUSHGATE_JWT_JWKS_URL (a JWKS URL), or run with --dev"
    )]
    Missing,
    #[error(
        "--jwt-jwks-url (PUSHGATE_JWT_JWKS_URL) cannot be combined with another key source (--jwt-secret, --jwt-public-key): set one"
    )]
    Conflict,
    #[error("{0}")]
    Jwks(String),
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

/// Verifies client tokens: one pinned algorithm and key, or the keys of a JWKS, each pinned to
/// its own algorithm.
pub struct Verifier {
    keys: Keys,
    /// Claim checks for each algorithm a key may pin.
    validations: Vec<(Algorithm, Validation)>,
}

enum Keys {
    Pinned {
        algorithm: Algorithm,
        key: DecodingKey,
    },
    Jwks(Arc<Jwks>),
}

impl Verifier {
    pub fn from_args(args: &JwtArgs) -> Result<Self, KeyError> {
        let keys = match (&args.jwt_jwks_url, &args.jwt_secret, &args.jwt_public_key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(KeyError::Conflict),
            (Some(url), None, None) => Keys::Jwks(Arc::new(
                Jwks::new(JwksSettings {
                    url: url.clone(),
                    refresh: args.jwt_jwks_refresh,
                    min_interval: args.jwt_jwks_min_interval,
                    timeout: args.jwt_jwks_timeout,
                })
                .map_err(KeyError::Jwks)?,
            )),
            (None, Some(secret), _) => Keys::Pinned {
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            },
            (None, None, Some(path)) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let (algorithm, key) =
                    public_key(&pem, args.jwt_algorithm).ok_or(KeyError::Pem(shown))?;
                Keys::Pinned { algorithm, key }
            }
            (None, None, None) => return Err(KeyError::Missing),
        };
        let algorithms = match &keys {
            Keys::Pinned { algorithm, .. } => vec![*algorithm],
            Keys::Jwks(_) => JWKS_ALGORITHMS.to_vec(),
        };
        let validations = algorithms
            .into_iter()
            .map(|a| (a, validation(args, a)))
            .collect();
        Ok(Self { keys, validations })
    }

    /// The JWKS key source, when the node has one.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Pinned { .. } => None,
        }
    }

    /// False only while a JWKS node has never loaded its key set.
    pub fn is_ready(&self) -> bool {
        self.jwks().is_none_or(|jwks| jwks.is_loaded())
    }

    /// Verifies `token` with the keys held now. With a JWKS, a token naming a key not held is
    /// [`AuthError::UnknownKey`] (no fetch; see [`verify`](Self::verify)).
    pub fn verify_held(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // Check the header's algorithm ourselves first: `alg: none` and unknown names are not
        // even parseable by the JWT library, and deserve the same answer as any other mismatch.
        let head = header(token).ok_or(AuthError::Malformed)?;
        match &self.keys {
            Keys::Pinned { algorithm, key } => {
                if head.alg != algorithm_name(*algorithm) {
                    return Err(AuthError::Algorithm);
                }
                self.decode(token, *algorithm, key)
            }
            Keys::Jwks(jwks) => {
                // HS*, `none` and the rest are refused before any key is looked up (or fetched).
                let Some(&wanted) = JWKS_ALGORITHMS
                    .iter()
                    .find(|a| algorithm_name(**a) == head.alg)
                else {
                    return Err(AuthError::Algorithm);
                };
                let keys = jwks.keys();
                let found = keys.get(head.kid.as_deref()).ok_or(AuthError::UnknownKey)?;
                // The key pins the algorithm: an RS256 token for an EC key's `kid` is refused.
                if found.algorithm != wanted {
                    return Err(AuthError::Algorithm);
                }
                self.decode(token, found.algorithm, &found.key)
            }
        }
    }

    /// Verifies `token` (handshakes, `refresh`): [`verify_held`](Self::verify_held), and with a
    /// JWKS, for a token naming a key not held, fetches the set again (or joins the fetch under
    /// way; rate-limited, bounded wait) and verifies once more.
    pub async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        match self.verify_held(token) {
            Err(AuthError::UnknownKey) => match &self.keys {
                Keys::Jwks(jwks) if jwks.refresh_for_unknown_kid().await => self.verify_held(token),
                _ => Err(AuthError::UnknownKey),
            },
            other => other,
        }
    }

    fn decode(
        &self,
        token: &str,
        algorithm: Algorithm,
        key: &DecodingKey,
    ) -> Result<Grant, AuthError> {
        let validation = self
            .validations
            .iter()
            .find_map(|(a, v)| (*a == algorithm).then_some(v))
            .ok_or(AuthError::Algorithm)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            match e.into_kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c),
                ErrorKind::Json(e) => AuthError::Claims(e.to_string()),
                _ => AuthError::Malformed,
            }
        })?;
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

/// What a JWKS key may verify (each key exactly one of these, by its type).
const JWKS_ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// The claim checks of `args`, for tokens of `algorithm`.
fn validation(args: &JwtArgs, algorithm: Algorithm) -> Validation {
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
    validation
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

/// The parts of a token's header looked at before its signature.
#[derive(Deserialize)]
struct Head {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn header(token: &str) -> Option<Head> {
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .ok()?;
    serde_json::from_slice::<Head>(&bytes).ok()
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
            jwt_jwks_url: None,
            jwt_jwks_refresh: Duration::from_secs(300),
            jwt_jwks_min_interval: Duration::from_secs(30),
            jwt_jwks_timeout: Duration::from_secs(5),
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
            .verify_held(&sign(json!({"sub":"alice","exp":later(),"channels":["room:*","news"],"publish":["room:?"]})))
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
            .verify_held(&mint(&Secret::new(SECRET), &spec))
            .unwrap();
        assert_eq!(g.user, "bob");
        assert!(g.subscribe.allows("a") && !g.publish.allows("a"));
    }

    #[test]
    fn absent_grants_allow_nothing() {
        let g = Verifier::from_args(&args())
            .unwrap()
            .verify_held(&sign(json!({"sub":"a","exp":later()})))
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
            assert_eq!(v.verify_held(&token).unwrap_err(), want, "{token}");
        }
        assert!(matches!(
            v.verify_held(&sign(json!({"sub":"a","exp":later(),"channels":"x"}))),
            Err(AuthError::Claims(_))
        ));
        assert!(matches!(
            v.verify_held(&sign(json!({"sub":"has space","exp":later()}))),
            Err(AuthError::Claims(_))
        ));
    }

    #[test]
    fn leeway_is_small() {
        let v = Verifier::from_args(&args()).unwrap();
        // Expired a second ago: inside the 2 s leeway.
        assert!(
            v.verify_held(&sign(json!({"sub":"a","exp":unix_now() - 1})))
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
        assert!(v.verify_held(&sign(good)).is_ok());
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
                v.verify_held(&sign(claims.clone())).unwrap_err(),
                want,
                "{claims}"
            );
        }
    }

    // --- JWKS -------------------------------------------------------------------------------

    // Test-only key pairs (P-256 twice, Ed25519), PKCS#8.
    const EC_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgarSUw7b6AViNBwgA
Myna3+hqsKu9TAN3JRNe+wmtcyChRANCAARNef4zdjmDRM3ZBk4ofiUgQKqI47g0
7VVbRdd3thAZYm7qn9nK5j+k9g7LYl62CZioG24XGV68+da+y9uqWX5I
-----END PRIVATE KEY-----
";
    const OTHER_EC_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8+Fwl6wRwXbQcOsY
JFQoHLMkHD1pE9FD9iVdFMKnYcahRANCAAQgflWB8Ei66ktf9dt7UlMj1ivxEPDr
K5q7txMsWGhgY+6aqA0HUh2xDRnlNUBP0cgUstI7CaLnwpcmT8uAG2fG
-----END PRIVATE KEY-----
";
    const ED_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIHoXj1QkW2zBvaKU3GYqjlfGSQhbOvZxC7L2U63zoQMu
-----END PRIVATE KEY-----
";

    struct TestKey {
        kid: &'static str,
        algorithm: Algorithm,
        key: EncodingKey,
    }

    impl TestKey {
        fn ec(kid: &'static str, pem: &str) -> Self {
            let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
            Self {
                kid,
                algorithm: Algorithm::ES256,
                key,
            }
        }

        fn ed(kid: &'static str) -> Self {
            let key = EncodingKey::from_ed_pem(ED_PEM.as_bytes()).unwrap();
            Self {
                kid,
                algorithm: Algorithm::EdDSA,
                key,
            }
        }

        fn jwk(&self) -> serde_json::Value {
            let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, self.algorithm).unwrap();
            let mut jwk = serde_json::to_value(jwk).unwrap();
            jwk["kid"] = json!(self.kid);
            jwk
        }

        fn sign(&self, claims: serde_json::Value) -> String {
            let mut header = Header::new(self.algorithm);
            header.kid = Some(self.kid.into());
            jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
        }

        fn token(&self) -> String {
            self.sign(json!({"sub": "a", "exp": later()}))
        }
    }

    fn set(keys: &[&TestKey]) -> serde_json::Value {
        json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    /// A JWKS verifier of `url`, started (its first fetch done).
    async fn jwks_verifier(url: &str, min_interval: Duration) -> Verifier {
        let mut a = args();
        a.jwt_secret = None;
        a.jwt_jwks_url = Some(url.parse().unwrap());
        a.jwt_jwks_refresh = Duration::from_secs(3600);
        a.jwt_jwks_min_interval = min_interval;
        let v = Verifier::from_args(&a).unwrap();
        v.jwks()
            .unwrap()
            .start(tokio_util::sync::CancellationToken::new())
            .await;
        v
    }

    /// A token with a well-formed header and claims, and a signature that is never checked.
    fn unsigned(header: serde_json::Value) -> String {
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            b64(header),
            b64(json!({"sub":"a","exp":later()}))
        )
    }

    #[tokio::test]
    async fn jwks_tokens_verify_with_the_key_their_kid_names() {
        let ec = TestKey::ec("ec-1", EC_PEM);
        let ed = TestKey::ed("ed-1");
        let server = pushgate_tests::JwksServer::start(&set(&[&ec, &ed])).await;
        let v = jwks_verifier(&server.url, Duration::from_secs(30)).await;
        assert!(v.is_ready());
        assert_eq!(v.verify_held(&ec.token()).unwrap().user, "a");
        assert_eq!(v.verify_held(&ed.token()).unwrap().user, "a");

        let impostor = TestKey::ec("ec-1", OTHER_EC_PEM);
        let secret = EncodingKey::from_secret(ec.jwk().to_string().as_bytes());
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some("ec-1".into());
        let cases = [
            (impostor.token(), AuthError::Signature),
            // The key pins the algorithm: EdDSA or RS256 under the EC key's kid are refused.
            (TestKey::ed("ec-1").token(), AuthError::Algorithm),
            (
                unsigned(json!({"alg":"RS256","kid":"ec-1"})),
                AuthError::Algorithm,
            ),
            (
                jsonwebtoken::encode(&hs, &json!({"sub":"a","exp":later()}), &secret).unwrap(),
                AuthError::Algorithm,
            ),
            (
                unsigned(json!({"alg":"none","kid":"ec-1"})),
                AuthError::Algorithm,
            ),
            (
                unsigned(json!({"alg":"HS256","kid":"nope"})),
                AuthError::Algorithm,
            ),
            (
                unsigned(json!({"alg":"ES256","kid":"nope"})),
                AuthError::UnknownKey,
            ),
            // Two keys in the set: a token must name one.
            (unsigned(json!({"alg":"ES256"})), AuthError::UnknownKey),
            (
                ec.sign(json!({"sub":"a","exp":unix_now() - 60})),
                AuthError::Expired,
            ),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify(&token).await.unwrap_err(), want, "{token}");
        }
        // Only the unknown kid could fetch, and the start's fetch was under a minute ago.
        assert_eq!(server.fetches(), 1);
    }

    #[tokio::test]
    async fn unknown_kids_share_one_fetch_and_are_rate_limited() {
        let ec = TestKey::ec("ec-1", EC_PEM);
        let server = pushgate_tests::JwksServer::start(&set(&[&ec])).await;
        let v = jwks_verifier(&server.url, Duration::from_secs(1)).await;
        assert_eq!(server.fetches(), 1);
        tokio::time::sleep(Duration::from_millis(1050)).await;

        // The new key is published; twenty handshakes name it at once while the fetch is slow.
        let ed = TestKey::ed("ed-new");
        server.set_keys(&set(&[&ec, &ed]));
        server.set_delay(Duration::from_millis(300));
        let token = ed.token();
        let results = futures_util::future::join_all((0..20).map(|_| v.verify(&token))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(server.fetches(), 2, "one fetch shared by all");

        // Bogus kids right after: refused without a fetch (none runs, and one started less than
        // the minimum interval ago).
        for i in 0..50 {
            let bogus = unsigned(json!({"alg":"ES256","kid":format!("bogus-{i}")}));
            assert_eq!(v.verify(&bogus).await.unwrap_err(), AuthError::UnknownKey);
        }
        assert_eq!(server.fetches(), 2);
        let metrics = v.jwks().unwrap().metrics().clone();
        let mut m = crate::metrics::Metrics::new();
        m.register_jwks(&metrics);
        let text = m.render();
        assert!(
            text.contains(r#"pushgate_jwks_fetches_total{trigger="unknown_kid"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pushgate_jwks_fetches_total{trigger="start"} 1"#),
            "{text}"
        );
        assert!(text.contains("pushgate_jwks_keys 2"), "{text}");
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_keys_held() {
        let ec = TestKey::ec("ec-1", EC_PEM);
        let server = pushgate_tests::JwksServer::start(&set(&[&ec])).await;
        let v = jwks_verifier(&server.url, Duration::from_millis(1)).await;
        server.fail_with(500);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let unknown = unsigned(json!({"alg":"ES256","kid":"new"}));
        assert_eq!(v.verify(&unknown).await.unwrap_err(), AuthError::UnknownKey);
        assert_eq!(server.fetches(), 2);
        let jwks = v.jwks().unwrap();
        assert_eq!(jwks.metrics().refresh_failures.get(), 1);
        assert_eq!(jwks.metrics().keys.get(), 1);
        assert!(v.is_ready());
        assert!(v.verify_held(&ec.token()).is_ok());
    }

    #[tokio::test]
    async fn a_set_never_loaded_is_not_ready() {
        let server = pushgate_tests::JwksServer::start(&json!({})).await;
        server.fail_with(404);
        let v = jwks_verifier(&server.url, Duration::from_secs(30)).await;
        assert!(!v.is_ready());
        assert_eq!(v.jwks().unwrap().metrics().refresh_failures.get(), 1);
        let token = TestKey::ec("ec-1", EC_PEM).token();
        assert_eq!(v.verify(&token).await.unwrap_err(), AuthError::UnknownKey);
    }

    #[test]
    fn jwks_with_another_key_source_is_a_clear_error() {
        let mut a = args();
        a.jwt_jwks_url = Some("https://id.example/jwks.json".parse().unwrap());
        let err = Verifier::from_args(&a).err().unwrap().to_string();
        assert!(err.contains("cannot be combined"), "{err}");
        a.jwt_secret = None;
        a.jwt_public_key = Some("/nonexistent.pem".into());
        assert!(matches!(Verifier::from_args(&a), Err(KeyError::Conflict)));
        a.jwt_public_key = None;
        assert!(Verifier::from_args(&a).is_ok());
    }

    #[test]
    fn no_key_is_a_clear_error() {
        let mut a = args();
        a.jwt_secret = None;
        let err = Verifier::from_args(&a).err().unwrap().to_string();
        assert!(err.contains("PUSHGATE_JWT_SECRET"), "{err}");
    }
}
