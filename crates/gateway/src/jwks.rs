//! Signing keys from a JSON Web Key Set (`--jwt-jwks-url`): fetched at start, held by `kid`,
//! refreshed in the background and when a token names a key the node does not hold.
//!
//! Fetches run one at a time: a handshake that needs one while one runs waits for that one
//! (at most [`UNKNOWN_KID_WAIT`]). A fetch starts at least `--jwt-jwks-min-interval` after the
//! previous one started, so a flood of tokens with made-up `kid`s costs the identity provider at
//! most one request per interval; tokens arriving in between are refused at once. A failed fetch
//! keeps the keys held. Each key's algorithm comes from the key itself (`kty`, `crv` and, when
//! present, `alg`), never from a token: RSA keys verify RS256, EC P-256 keys ES256, Ed25519 keys
//! EdDSA; symmetric (`oct`) keys and every other kind are left out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::PublicKeyUse;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::lock;
use crate::metrics::JwksMetrics;

/// Largest key set accepted (real ones are a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Longest a handshake (or `refresh`) whose token names an unknown key waits for the fetch it
/// started or joined, before it is refused.
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);

/// One verification key and the one algorithm it verifies.
pub struct JwksKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// The usable keys of one fetched set.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<JwksKey>>,
    /// The key of a set that holds exactly one usable key: it also verifies tokens without `kid`.
    only: Option<Arc<JwksKey>>,
    len: usize,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`). Returns the usable keys and a note for each key
    /// left out; an error when the document is not a key set or holds no usable key.
    pub fn parse(body: &[u8]) -> Result<(Self, Vec<String>), String> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let doc: Document =
            serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut set = Self::default();
        let mut skipped = Vec::new();
        for (i, value) in doc.keys.into_iter().enumerate() {
            let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
            let name = kid
                .as_deref()
                .map_or_else(|| format!("#{i}"), |k| format!("{k:?}"));
            let usable = serde_json::from_value::<Jwk>(value)
                .map_err(|e| format!("unreadable: {e}"))
                .and_then(|jwk| usable_key(&jwk));
            let key = match usable {
                Ok(key) => Arc::new(key),
                Err(why) => {
                    skipped.push(format!("key {name} left out: {why}"));
                    continue;
                }
            };
            match kid {
                Some(kid) if set.by_kid.contains_key(&kid) => {
                    skipped.push(format!("key {name} left out: a second key with this kid"));
                    continue;
                }
                Some(kid) => {
                    set.by_kid.insert(kid, key.clone());
                }
                // Usable only as a set's only key.
                None => {}
            }
            set.len += 1;
            set.only = Some(key);
        }
        if set.len == 0 {
            return Err(format!(
                "no usable key (RSA for RS256, EC P-256 for ES256, Ed25519 for EdDSA) in the set{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", skipped.join("; "))
                }
            ));
        }
        if set.len != 1 {
            set.only = None;
        }
        Ok((set, skipped))
    }

    /// The key a token names with `kid`; without one, the set's only key.
    pub fn get(&self, kid: Option<&str>) -> Option<&Arc<JwksKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

/// The key of `jwk` and its algorithm, or why it is not used.
fn usable_key(jwk: &Jwk) -> Result<JwksKey, String> {
    if let Some(use_) = &jwk.common.public_key_use
        && *use_ != PublicKeyUse::Signature
    {
        return Err("not a signing key (`use`)".into());
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("`key_ops` without `verify`".into());
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric key (`kty: oct`): HS* tokens are never accepted".into());
        }
        _ => return Err("not an RSA, EC P-256 or Ed25519 key".into()),
    };
    let declared = jwk.common.key_algorithm;
    let fits = matches!(
        (algorithm, declared),
        (_, None)
            | (Algorithm::RS256, Some(KeyAlgorithm::RS256))
            | (Algorithm::ES256, Some(KeyAlgorithm::ES256))
            | (Algorithm::EdDSA, Some(KeyAlgorithm::EdDSA))
    );
    if !fits {
        return Err(format!(
            "`alg` {declared:?} (only RS256 for RSA, ES256 for EC P-256, EdDSA for Ed25519)"
        ));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("invalid key: {e}"))?;
    Ok(JwksKey { algorithm, key })
}

/// What started a fetch (the `trigger` label of `pushgate_jwks_fetches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    Interval,
    UnknownKid,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Interval => "interval",
            Self::UnknownKid => "unknown_kid",
        }
    }
}

/// Settings of a [`Jwks`].
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: reqwest::Url,
    /// Interval of background refreshes.
    pub refresh: Duration,
    /// Least time between the starts of two fetches (at most `refresh`).
    pub min_interval: Duration,
    /// Bound on one fetch.
    pub timeout: Duration,
}

#[derive(Default)]
struct FetchState {
    /// A fetch is running.
    running: bool,
    /// When the last fetch started.
    last_start: Option<Instant>,
    /// The last fetch that ended failed.
    last_failed: bool,
}

/// A remote key set, its cached keys and its fetches.
pub struct Jwks {
    settings: JwksSettings,
    /// The URL as logged: without a password.
    shown: String,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    state: Mutex<FetchState>,
    /// Counts finished fetches: waiters watch it change.
    finished: watch::Sender<u64>,
    metrics: JwksMetrics,
}

impl Jwks {
    pub fn new(mut settings: JwksSettings) -> Result<Self, String> {
        settings.min_interval = settings.min_interval.min(settings.refresh);
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("pushgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("JWKS HTTP client: {}", error_chain(&e)))?;
        let mut shown = settings.url.clone();
        let _ = shown.set_password(None);
        Ok(Self {
            shown: shown.to_string(),
            settings,
            client,
            keys: RwLock::default(),
            state: Mutex::default(),
            finished: watch::Sender::new(0),
            metrics: JwksMetrics::new(),
        })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.settings.url
    }

    pub fn metrics(&self) -> &JwksMetrics {
        &self.metrics
    }

    /// The keys held now.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True once a fetch has loaded a key set (failed fetches since keep it).
    pub fn is_loaded(&self) -> bool {
        !self.keys().is_empty()
    }

    /// The first fetch (waited for, within the fetch timeout), then background refreshes until
    /// `shutdown`. A failed first fetch does not stop the node: it is not ready until a retry,
    /// every minimum interval, loads the keys.
    pub async fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.settings.url.scheme() == "http"
            && !self.settings.url.host_str().is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        {
            warn!(url = %self.shown, "the JWKS URL is plain http: anyone on the path can substitute keys; use https");
        }
        if let Some(mut finished) = self.begin_fetch(Trigger::Start, true) {
            let _ = tokio::time::timeout(
                self.settings.timeout + Duration::from_secs(1),
                finished.changed(),
            )
            .await;
        }
        tokio::spawn(self.clone().refresh_loop(shutdown));
    }

    async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let due = {
                let state = lock(&self.state);
                // After a failure (or before any key), retry sooner: every minimum interval.
                let period = if state.last_failed || !self.is_loaded() {
                    self.settings.min_interval
                } else {
                    self.settings.refresh
                };
                state.last_start.map_or_else(Instant::now, |t| t + period)
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due.into()) => {}
            }
            // `None`: another fetch started meanwhile, and `due` moves with it.
            if let Some(mut finished) = self.begin_fetch(Trigger::Interval, false) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = finished.changed() => {}
                }
            }
        }
    }

    /// For a token whose `kid` is not held: joins the running fetch or starts one, unless one
    /// started less than the minimum interval ago. True when a fetch finished within
    /// [`UNKNOWN_KID_WAIT`] (the caller looks the key up again).
    pub async fn refresh_for_unknown_kid(self: &Arc<Self>) -> bool {
        let Some(mut finished) = self.begin_fetch(Trigger::UnknownKid, false) else {
            return false;
        };
        let wait = UNKNOWN_KID_WAIT.min(self.settings.timeout);
        matches!(
            tokio::time::timeout(wait, finished.changed()).await,
            Ok(Ok(()))
        )
    }

    /// Starts a fetch, or joins the running one. Returns a receiver that changes when that fetch
    /// ends; `None` when no fetch runs and the last one started less than the minimum interval
    /// ago (unless `force`).
    fn begin_fetch(
        self: &Arc<Self>,
        trigger: Trigger,
        force: bool,
    ) -> Option<watch::Receiver<u64>> {
        let mut state = lock(&self.state);
        // Subscribed under the lock: the running fetch marks itself done under it too, so its
        // end cannot be missed.
        let finished = self.finished.subscribe();
        if state.running {
            return Some(finished);
        }
        let now = Instant::now();
        if !force
            && state
                .last_start
                .is_some_and(|t| now.duration_since(t) < self.settings.min_interval)
        {
            return None;
        }
        state.running = true;
        state.last_start = Some(now);
        drop(state);
        self.metrics.fetch(trigger.label());
        let me = self.clone();
        tokio::spawn(async move {
            // Ends the fetch however this task ends, a panic included: a fetch left "running"
            // would have every later one wait for it forever.
            let mut running = Running {
                jwks: &me,
                failed: true,
            };
            let result = me.fetch().await;
            running.failed = !me.store(result);
        });
        Some(finished)
    }

    async fn fetch(&self) -> Result<(KeySet, Vec<String>), String> {
        let mut response = self
            .client
            .get(self.settings.url.clone())
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| error_chain(&e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(format!("the key set is larger than {MAX_BODY} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| error_chain(&e.without_url()))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("the key set is larger than {MAX_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        KeySet::parse(&body)
    }

    /// Takes in a fetch's result; true when it loaded a set.
    fn store(&self, result: Result<(KeySet, Vec<String>), String>) -> bool {
        let url = &self.shown;
        let loaded = result.is_ok();
        match result {
            Ok((set, skipped)) => {
                let held = self.keys();
                let changed = held.kids() != set.kids() || held.len() != set.len();
                if changed {
                    info!(%url, keys = set.len(), kids = ?set.kids(), "JWKS loaded");
                    for note in &skipped {
                        info!(%url, "{note}");
                    }
                } else {
                    debug!(%url, keys = set.len(), "JWKS refreshed, unchanged");
                }
                self.metrics.keys.set(set.len() as i64);
                self.metrics
                    .last_success
                    .set(i64::try_from(crate::auth::unix_now()).unwrap_or(i64::MAX));
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
            }
            Err(error) => {
                self.metrics.refresh_failures.inc();
                let held = self.keys().len();
                warn!(%url, %error, keys_held = held, "JWKS fetch failed; the keys held stay in use");
            }
        }
        loaded
    }
}

/// A fetch under way; its end (on drop) lets the next one start and wakes its waiters.
struct Running<'a> {
    jwks: &'a Jwks,
    failed: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.jwks.state);
        state.running = false;
        state.last_failed = self.failed;
        // Under the lock: whoever subscribed while this fetch ran hears of its end, and nobody
        // who starts or joins a later one mistakes it for theirs.
        self.jwks.finished.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// An error and its sources, `: `-separated (reqwest's own text names only the outer layer).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::EncodingKey;
    use serde_json::json;

    // Fixed test keys (public halves only), in JWK form.
    const RSA_N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": RSA_N, "e": "AQAB"})
    }

    fn ed_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    }

    fn ec_jwk(kid: &str, crv: &str) -> serde_json::Value {
        json!({"kty": "EC", "crv": crv, "kid": kid,
               "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
               "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
    }

    fn parse(keys: serde_json::Value) -> Result<(KeySet, Vec<String>), String> {
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes())
    }

    #[test]
    fn keys_take_their_algorithm_from_the_key() {
        let (set, skipped) =
            parse(json!([rsa_jwk("r"), ed_jwk("e"), ec_jwk("c", "P-256")])).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(set.len(), 3);
        assert_eq!(set.get(Some("r")).unwrap().algorithm, Algorithm::RS256);
        assert_eq!(set.get(Some("e")).unwrap().algorithm, Algorithm::EdDSA);
        assert_eq!(set.get(Some("c")).unwrap().algorithm, Algorithm::ES256);
        assert!(set.get(Some("nope")).is_none());
        // Several keys: a token must name one.
        assert!(set.get(None).is_none());
    }

    #[test]
    fn a_single_key_serves_tokens_without_kid() {
        let mut key = ed_jwk("x");
        key.as_object_mut().unwrap().remove("kid");
        let (set, _) = parse(json!([key])).unwrap();
        assert_eq!(set.get(None).unwrap().algorithm, Algorithm::EdDSA);
        let (set, _) = parse(json!([ed_jwk("only")])).unwrap();
        assert!(set.get(None).is_some() && set.get(Some("only")).is_some());
    }

    #[test]
    fn unusable_keys_are_left_out_and_the_rest_kept() {
        let secret = EncodingKey::from_secret(b"a shared secret");
        let mut oct =
            serde_json::to_value(Jwk::from_encoding_key(&secret, Algorithm::HS256).unwrap())
                .unwrap();
        oct["kid"] = json!("hmac");
        let mut enc = rsa_jwk("enc");
        enc["use"] = json!("enc");
        let mut rs512 = rsa_jwk("rs512");
        rs512["alg"] = json!("RS512");
        let mut no_verify = ed_jwk("ops");
        no_verify["key_ops"] = json!(["encrypt"]);
        let (set, skipped) = parse(json!([
            oct,
            enc,
            rs512,
            no_verify,
            ec_jwk("p384", "P-384"),
            {"kty": "OKP", "crv": "X25519", "kid": "x", "x": "abc"},
            {"kty": "weird", "kid": "w"},
            "not even an object",
            rsa_jwk("good"),
            rsa_jwk("good"),
        ]))
        .unwrap();
        assert_eq!(set.kids(), ["good"], "{skipped:?}");
        assert_eq!(skipped.len(), 9, "{skipped:#?}");
        assert!(skipped[0].contains("symmetric"), "{skipped:?}");
        assert!(skipped.iter().any(|s| s.contains("RS512")), "{skipped:?}");
        assert!(
            skipped.last().unwrap().contains("second key"),
            "{skipped:?}"
        );
        // The duplicate's first copy is the only key.
        assert!(Arc::ptr_eq(
            set.get(None).unwrap(),
            set.get(Some("good")).unwrap()
        ));
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        for body in [
            r#"{"keys":[]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#,
            r#"{"nokeys":1}"#,
            "<html>",
        ] {
            assert!(KeySet::parse(body.as_bytes()).is_err(), "{body}");
        }
    }
}
