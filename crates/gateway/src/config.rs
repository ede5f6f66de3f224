//! Command line and environment. Every flag of `serve` has a `PUSHGATE_*` variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "pushgate",
    version,
    about = "A horizontally scalable WebSocket push gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Print a token signed with the configured HS256 secret (for development and tests).
    Token(TokenArgs),
    /// Publish one message, through a node's HTTP API or straight into Redis.
    Publish(PublishArgs),
    /// Subscribe to channels and print every delivery as one JSON line.
    Subscribe(SubscribeArgs),
}

/// A secret from the command line or environment. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Self(s.to_owned()))
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 25s, 500ms, 1h)"))
}

fn instance_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'".into())
    }
}

/// Whether `/ws` and `/echo` negotiate permessage-deflate with clients that offer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    On,
    Off,
}

impl Compression {
    pub fn enabled(self) -> bool {
        self == Self::On
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The JWT algorithms a node can pin. HS256 goes with a secret, the rest with a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

#[derive(Args, Debug, Clone)]
pub struct JwtArgs {
    /// HS256 shared secret for client tokens.
    #[arg(long, env = "PUSHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// PEM file with the public key for RS256, ES256 or EdDSA tokens.
    #[arg(long, env = "PUSHGATE_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,
    /// Algorithm of the public key (default: RS256 for RSA keys, ES256 for EC keys, EdDSA for Ed25519).
    #[arg(long, env = "PUSHGATE_JWT_ALGORITHM", requires = "jwt_public_key")]
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Required `iss` claim.
    #[arg(long, env = "PUSHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "PUSHGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock-skew allowance for `exp` and `nbf`.
    #[arg(long, env = "PUSHGATE_JWT_LEEWAY", default_value = "5s", value_parser = duration)]
    pub jwt_leeway: Duration,
    /// URL of a JSON Web Key Set (an identity provider's `jwks_uri`): RS256, ES256 and EdDSA
    /// keys, chosen by the token's `kid`. Fetched at start, then refreshed. Cannot be combined
    /// with --jwt-secret or --jwt-public-key.
    #[arg(
        long,
        env = "PUSHGATE_JWT_JWKS_URL",
        value_parser = jwks_url,
        conflicts_with_all = ["jwt_secret", "jwt_public_key", "jwt_algorithm"]
    )]
    pub jwt_jwks_url: Option<reqwest::Url>,
    /// Interval of background JWKS refreshes.
    #[arg(long, env = "PUSHGATE_JWT_JWKS_REFRESH", default_value = "5m", value_parser = positive_duration)]
    pub jwt_jwks_refresh: Duration,
    /// Least time between two JWKS fetches: a token with an unknown `kid` fetches the set again
    /// only this long after the last fetch started (capped at --jwt-jwks-refresh), and so does
    /// a retry after a failed fetch.
    #[arg(long, env = "PUSHGATE_JWT_JWKS_MIN_INTERVAL", default_value = "30s", value_parser = positive_duration)]
    pub jwt_jwks_min_interval: Duration,
    /// Bound on one JWKS fetch (connect, TLS, response).
    #[arg(long, env = "PUSHGATE_JWT_JWKS_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub jwt_jwks_timeout: Duration,
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

fn jwks_url(s: &str) -> Result<reqwest::Url, String> {
    web_url(s, "https://auth.example.com/.well-known/jwks.json")
}

fn http_url(s: &str) -> Result<reqwest::Url, String> {
    web_url(s, "http://10.0.0.5:8080")
}

fn web_url(s: &str, example: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{e} (example: {example})"))?;
    match url.scheme() {
        "https" | "http" if url.has_host() => Ok(url),
        _ => Err("must be an https:// (or http://) URL".into()),
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PUSHGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// PEM file with the certificate chain to serve HTTPS and wss:// directly (with
    /// --tls-key). Unset: plain HTTP, for a proxy that terminates TLS.
    #[arg(long, env = "PUSHGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PUSHGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Redis URL (redis://host:port/db). Unset, and no --redis-sentinel: embedded broker, single
    /// node.
    #[arg(
        long,
        env = "PUSHGATE_REDIS_URL",
        hide_env_values = true,
        conflicts_with_all = ["redis_sentinel", "redis_cluster"]
    )]
    pub redis_url: Option<Secret>,
    /// Redis Cluster seed URLs, comma-separated (redis://10.0.0.1:7000,redis://10.0.0.2:7000):
    /// nodes use sharded Pub/Sub (`SPUBLISH`, `SSUBSCRIBE`), so a message crosses one shard.
    #[arg(
        long,
        env = "PUSHGATE_REDIS_CLUSTER",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "redis_sentinel"
    )]
    pub redis_cluster: Vec<Secret>,
    /// Redis Sentinel URLs, comma-separated (redis://10.0.0.1:26379,redis://10.0.0.2:26379):
    /// the node finds the primary of --redis-sentinel-master through them and follows its
    /// failovers. A database number or password in the first URL applies to the primary.
    #[arg(
        long,
        env = "PUSHGATE_REDIS_SENTINEL",
        hide_env_values = true,
        value_delimiter = ',',
        requires = "redis_sentinel_master"
    )]
    pub redis_sentinel: Vec<Secret>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    #[arg(
        long,
        env = "PUSHGATE_REDIS_SENTINEL_MASTER",
        requires = "redis_sentinel"
    )]
    pub redis_sentinel_master: Option<String>,
    /// Prefix of every Redis channel this cluster uses.
    #[arg(long, env = "PUSHGATE_REDIS_PREFIX", default_value = "pushgate")]
    pub redis_prefix: String,
    /// Base URL at which the other nodes reach this node's `/healthz` (e.g.
    /// `http://10.0.0.5:8080`), told to them in heartbeats. A node that loses Redis asks its
    /// peers there whether they still reach it (see docs/operations.md, readiness). Default: the
    /// listen address, when it is a specific IP.
    #[arg(long, env = "PUSHGATE_ADVERTISE_URL", value_parser = http_url)]
    pub advertise_url: Option<reqwest::Url>,
    /// This node's ID in the cluster (default: a new UUID at start).
    #[arg(long, env = "PUSHGATE_INSTANCE_ID", value_parser = instance_id)]
    pub instance_id: Option<String>,

    #[command(flatten)]
    pub jwt: JwtArgs,

    /// API key for /api/*. Unset: the API answers 404.
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Development mode: without a JWT key, generate a secret and print a ready token.
    #[arg(long, env = "PUSHGATE_DEV")]
    pub dev: bool,

    /// Runtime worker threads. Default: the CPUs this process may use (its affinity mask and
    /// cgroup CPU quota). With several nodes on one host, give each its share of the cores.
    #[arg(long, env = "PUSHGATE_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,

    /// Most WebSocket connections this node holds; more get 503.
    #[arg(long, env = "PUSHGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Most connections from one client IP (0: no limit). Behind a proxy every client has
    /// the proxy's address unless --trusted-proxies names the proxy.
    #[arg(long, env = "PUSHGATE_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Proxies whose `X-Forwarded-For` is believed, comma-separated IPs or CIDRs (e.g.
    /// `10.0.0.0/8,192.168.1.5`). When a connection comes from one of them, its client IP (for
    /// per-IP limits and logs) is the right-most address of the header that is not itself a
    /// trusted proxy; from anyone else the header is ignored. Default: none.
    #[arg(long, env = "PUSHGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// Largest inbound message; larger ones get a `too_large` error, and ones over four times
    /// this close the connection with 1009.
    #[arg(long, env = "PUSHGATE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Largest total size of a request's headers (each counted as `name: value` and its line
    /// end); larger requests get 431. Bounds what a handshake may make a node hold.
    #[arg(long, env = "PUSHGATE_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// permessage-deflate (RFC 7692) with clients that offer it: deliveries of 128 bytes and
    /// more go out compressed, each compressed once per node for all its recipients.
    #[arg(long, env = "PUSHGATE_COMPRESSION", value_enum, default_value = "on")]
    pub compression: Compression,
    /// Sustained client requests per second per connection (token bucket).
    #[arg(long, env = "PUSHGATE_CLIENT_RATE", default_value_t = 100.0)]
    pub client_rate: f64,
    /// Burst size of the per-connection token bucket.
    #[arg(long, env = "PUSHGATE_CLIENT_BURST", default_value_t = 200)]
    pub client_burst: u32,
    /// Publishes one connection may have waiting on the broker; past this the node reads no more
    /// of its requests until one is acknowledged.
    #[arg(long, env = "PUSHGATE_MAX_INFLIGHT", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight: u32,
    /// Messages queued per Redis publishing connection before publishers wait for room.
    #[arg(long, env = "PUSHGATE_PUBLISH_QUEUE", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub publish_queue: u32,
    /// Most channels one connection may subscribe to.
    #[arg(long, env = "PUSHGATE_MAX_CHANNELS", default_value_t = 128)]
    pub max_channels: usize,
    /// Frames queued for one connection before it counts as a slow consumer (closed with 4008).
    #[arg(long, env = "PUSHGATE_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Interval of server pings.
    #[arg(long, env = "PUSHGATE_PING_INTERVAL", default_value = "25s", value_parser = duration)]
    pub ping_interval: Duration,
    /// How long past a ping interval a silent client is kept.
    #[arg(long, env = "PUSHGATE_PONG_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub pong_timeout: Duration,
    /// How long one write to a client may take before it counts as a slow consumer.
    #[arg(long, env = "PUSHGATE_WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,
    /// Allowed `Origin` headers, comma-separated, matched exactly (default: any). Requests
    /// without `Origin` are allowed. Also the origins whose pages may use /sse, /pushgate.js
    /// and the /ws probe across origins (CORS; with a list, credentials too, and /dev/token).
    #[arg(long, env = "PUSHGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// How long a graceful shutdown spreads its closes over.
    #[arg(long, env = "PUSHGATE_DRAIN_PERIOD", default_value = "10s", value_parser = duration)]
    pub drain_period: Duration,
    /// Interval of the Redis liveness probe (a message a node sends itself).
    #[arg(long, env = "PUSHGATE_REDIS_PROBE_INTERVAL", default_value = "3s", value_parser = duration)]
    pub redis_probe_interval: Duration,
    /// How long a Redis command or subscription may take before it counts as failed.
    #[arg(long, env = "PUSHGATE_REDIS_TIMEOUT", default_value = "3s", value_parser = duration)]
    pub redis_timeout: Duration,
    /// Interval of cluster heartbeats (a node unheard of for three intervals is gone).
    #[arg(long, env = "PUSHGATE_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// Replicas that must confirm a history message (Redis `WAIT`) before its publish is
    /// acknowledged; fewer within half of --redis-timeout answer `unavailable`. 0: do not wait.
    #[arg(long, env = "PUSHGATE_HISTORY_MIN_REPLICAS", default_value_t = 0)]
    pub history_min_replicas: u32,
    /// Channels that keep history, as `PATTERN=SIZE/TTL` (e.g. `chat:*=200/10m`: the last 200
    /// messages, for 10 minutes after the last one). Repeat the flag, or comma-separate in the
    /// environment. The first matching pattern applies.
    #[arg(long = "history", env = "PUSHGATE_HISTORY", value_delimiter = ',')]
    pub history: Vec<crate::history::HistoryRule>,
    /// Most messages one recovery (a subscribe with `since`, or a gap) sends; further behind
    /// is `recovered: false`.
    #[arg(long, env = "PUSHGATE_HISTORY_RECOVERY_LIMIT", default_value_t = 1000)]
    pub history_recovery_limit: u64,
    /// Most messages a client's `history` request, or a subscribe with `recent`, gets back;
    /// larger asks are cut to it.
    #[arg(long, env = "PUSHGATE_HISTORY_REQUEST_LIMIT", default_value_t = 100)]
    pub history_request_limit: u64,
    /// Channels that track presence (who is subscribed), as glob patterns. Repeat the flag, or
    /// comma-separate in the environment.
    #[arg(long = "presence", env = "PUSHGATE_PRESENCE", value_delimiter = ',')]
    pub presence: Vec<String>,
    /// Channels whose subscribers receive `join` and `leave` events (a user's first connection
    /// subscribed, their last one left), as glob patterns. These channels track presence too,
    /// whether or not a --presence pattern matches them. Repeat the flag, or comma-separate in
    /// the environment.
    #[arg(
        long = "presence-events",
        env = "PUSHGATE_PRESENCE_EVENTS",
        value_delimiter = ','
    )]
    pub presence_events: Vec<String>,

    /// Log format.
    #[arg(long, env = "PUSHGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// Parses `serve` arguments alone (tests and embedding).
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = std::iter::once("pushgate".into()).chain(args.into_iter().map(Into::into));
        Only::try_parse_from(args).map(|o| o.serve)
    }
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The token's subject (user).
    #[arg(long)]
    pub sub: String,
    /// Channel patterns the token may subscribe to, comma-separated (`*` and `?` are wildcards).
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Channel patterns the token may publish to, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ttl: Duration,
    /// HS256 secret to sign with.
    #[arg(long, env = "PUSHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
    /// `iss` claim.
    #[arg(long, env = "PUSHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `aud` claim.
    #[arg(long, env = "PUSHGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// `pushgate publish`: one message to exactly one target.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true).args(["channel", "user", "session", "broadcast"])))]
pub struct PublishArgs {
    /// Every subscriber of this channel.
    #[arg(long)]
    pub channel: Option<String>,
    /// Every connection of this user.
    #[arg(long)]
    pub user: Option<String>,
    /// One connection, by its session ID (from its welcome).
    #[arg(long)]
    pub session: Option<String>,
    /// Every connection.
    #[arg(long)]
    pub broadcast: bool,
    /// The payload: any JSON value, delivered verbatim (`-` reads it from standard input).
    #[arg(long)]
    pub data: String,
    /// Publish through the HTTP API of the node at this base URL, e.g. http://127.0.0.1:8080.
    /// Without it the message goes straight into Redis (--redis-url).
    #[arg(long)]
    pub url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Publish straight into this Redis (redis://host:port/db), as a backend would.
    #[arg(long, env = "PUSHGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,
    /// Prefix of the cluster's Redis channels.
    #[arg(long, env = "PUSHGATE_REDIS_PREFIX", default_value = "pushgate")]
    pub redis_prefix: String,
}

/// `pushgate subscribe`: a client that prints what it receives.
#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:8080/ws or wss://push.example.com/ws. Repeat it to try
    /// several nodes in turn.
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// The client token (JWT).
    #[arg(long, env = "PUSHGATE_TOKEN", hide_env_values = true)]
    pub token: Secret,
    /// A channel to subscribe to; repeat for more. User, session and broadcast deliveries are
    /// printed too.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Exit after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// PEM file of the CA certificates to trust for wss:// (instead of the system's).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sane() {
        let args = ServeArgs::parse_from(["--jwt-secret", "s"]).unwrap();
        assert_eq!(args.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(args.redis_prefix, "pushgate");
        assert_eq!(args.max_message_bytes, 65536);
        assert_eq!(args.max_header_bytes, 16384);
        assert_eq!(args.compression, Compression::On);
        assert_eq!(args.max_channels, 128);
        assert_eq!(args.ping_interval, Duration::from_secs(25));
        assert_eq!(args.drain_period, Duration::from_secs(10));
        assert!(args.allowed_origins.is_empty());
    }

    #[test]
    fn one_broker_mode_at_most() {
        let sentinel = [
            "--redis-sentinel",
            "redis://10.0.0.1:26379,redis://10.0.0.2:26379",
            "--redis-sentinel-master",
            "main",
        ];
        let args = ServeArgs::parse_from(sentinel).unwrap();
        assert_eq!(args.redis_sentinel.len(), 2);
        assert_eq!(args.redis_sentinel_master.as_deref(), Some("main"));
        let both = [&sentinel[..], &["--redis-url", "redis://10.0.0.3/"]].concat();
        let e = ServeArgs::parse_from(both).unwrap_err().to_string();
        assert!(e.contains("cannot be used with"), "{e}");
        let cluster = [
            "--redis-cluster",
            "redis://10.0.0.1:7000,redis://10.0.0.2:7000",
        ];
        assert_eq!(
            ServeArgs::parse_from(cluster).unwrap().redis_cluster.len(),
            2
        );
        for other in [&sentinel[..], &["--redis-url", "redis://10.0.0.3/"]] {
            let both = [&cluster[..], other].concat();
            let e = ServeArgs::parse_from(both).unwrap_err().to_string();
            assert!(e.contains("cannot be used with"), "{e}");
        }
        let e = ServeArgs::parse_from(&sentinel[..2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--redis-sentinel-master"), "{e}");
        let e = ServeArgs::parse_from(&sentinel[2..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--redis-sentinel"), "{e}");
    }

    #[test]
    fn lists_and_durations_parse() {
        let args = ServeArgs::parse_from([
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--ping-interval",
            "500ms",
        ])
        .unwrap();
        assert_eq!(args.allowed_origins.len(), 2);
        assert_eq!(args.ping_interval, Duration::from_millis(500));
        assert!(ServeArgs::parse_from(["--ping-interval", "soon"]).is_err());
    }

    #[test]
    fn instance_ids_are_restricted() {
        assert!(ServeArgs::parse_from(["--instance-id", "node-1_a"]).is_ok());
        assert!(ServeArgs::parse_from(["--instance-id", "has.dot"]).is_err());
        assert!(ServeArgs::parse_from(["--instance-id", ""]).is_err());
    }

    #[test]
    fn publish_needs_exactly_one_target() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                ["pushgate", "publish", "--data", "1"]
                    .iter()
                    .chain(args)
                    .copied(),
            )
        };
        assert!(parse(&["--channel", "a"]).is_ok());
        assert!(parse(&["--broadcast"]).is_ok());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--channel", "a", "--user", "u"]).is_err());
        assert!(parse(&["--broadcast", "--session", "s"]).is_err());
    }

    #[test]
    fn subscribe_takes_repeated_channels_and_urls() {
        let cli = Cli::try_parse_from([
            "pushgate",
            "subscribe",
            "--url",
            "ws://a/ws",
            "--url",
            "ws://b/ws",
            "--token",
            "t",
            "--channel",
            "x",
            "--channel",
            "y",
        ])
        .unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.url, ["ws://a/ws", "ws://b/ws"]);
        assert_eq!(args.channels, ["x", "y"]);
        assert!(!format!("{args:?}").contains("\"t\""));
    }

    #[test]
    fn history_and_presence_patterns_parse() {
        let args = ServeArgs::parse_from([
            "--history",
            "chat:*=200/10m",
            "--history",
            "a=b:*=1/500ms",
            "--presence",
            "room:*",
            "--presence",
            "lobby",
        ])
        .unwrap();
        let rules: Vec<_> = args
            .history
            .iter()
            .map(|r| (r.pattern.as_str(), r.size, r.ttl))
            .collect();
        assert_eq!(
            rules,
            [
                ("chat:*", 200, Duration::from_secs(600)),
                ("a=b:*", 1, Duration::from_millis(500))
            ]
        );
        assert_eq!(args.presence, ["room:*", "lobby"]);
        assert!(args.presence_events.is_empty());
        let args = ServeArgs::parse_from([
            "--presence-events",
            "chat:*,game:*",
            "--presence-events",
            "x",
        ])
        .unwrap();
        assert_eq!(args.presence_events, ["chat:*", "game:*", "x"]);
        assert_eq!(args.history_recovery_limit, 1000);
        assert_eq!(args.history_request_limit, 100);
        for bad in [
            "chat:*",
            "chat:*=200",
            "chat:*=0/1m",
            "chat:*=x/1m",
            "chat:*=10/soon",
            "chat:*=10/0s",
            "=10/1m",
        ] {
            assert!(ServeArgs::parse_from(["--history", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_flags_parse_and_exclude_other_key_sources() {
        let url = "https://id.example/.well-known/jwks.json";
        let args = ServeArgs::parse_from(["--jwt-jwks-url", url]).unwrap();
        let shown = args.jwt.jwt_jwks_url.as_ref().map(|u| u.as_str());
        assert_eq!(shown, Some(url));
        assert_eq!(args.jwt.jwt_jwks_refresh, Duration::from_secs(300));
        assert_eq!(args.jwt.jwt_jwks_min_interval, Duration::from_secs(30));
        assert_eq!(args.jwt.jwt_jwks_timeout, Duration::from_secs(5));
        let args = ServeArgs::parse_from([
            "--jwt-jwks-url",
            "http://127.0.0.1:8081/keys",
            "--jwt-jwks-refresh",
            "1m",
            "--jwt-jwks-min-interval",
            "10s",
            "--jwt-jwks-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(args.jwt.jwt_jwks_refresh, Duration::from_secs(60));
        assert_eq!(args.jwt.jwt_jwks_min_interval, Duration::from_secs(10));
        assert_eq!(args.jwt.jwt_jwks_timeout, Duration::from_secs(2));
        for bad in [
            ["--jwt-jwks-url", "ftp://id.example/jwks"],
            ["--jwt-jwks-url", "jwks.json"],
            ["--jwt-jwks-refresh", "0s"],
            ["--jwt-jwks-min-interval", "0s"],
        ] {
            assert!(ServeArgs::parse_from(bad).is_err(), "{bad:?}");
        }
        for other in [
            ["--jwt-secret", "s"],
            ["--jwt-public-key", "key.pem"],
            ["--jwt-algorithm", "RS256"],
        ] {
            let err = ServeArgs::parse_from(["--jwt-jwks-url", url].into_iter().chain(other))
                .err()
                .unwrap_or_else(|| panic!("{other:?} with --jwt-jwks-url"));
            let conflict = clap::error::ErrorKind::ArgumentConflict;
            assert_eq!(err.kind(), conflict, "{other:?}");
        }
    }

    #[test]
    fn trusted_proxies_and_tls_parse() {
        let args = ServeArgs::parse_from(["--trusted-proxies", "10.0.0.0/8, 192.168.1.5"]).unwrap();
        assert_eq!(args.trusted_proxies.len(), 2);
        assert!(args.trusted_proxies[1].contains("192.168.1.5".parse().unwrap()));
        assert!(
            ServeArgs::parse_from::<[&str; 0], _>([])
                .unwrap()
                .trusted_proxies
                .is_empty()
        );
        assert!(ServeArgs::parse_from(["--trusted-proxies", "10.0.0.0/40"]).is_err());
        assert!(ServeArgs::parse_from(["--trusted-proxies", "nginx"]).is_err());

        let tls = ServeArgs::parse_from(["--tls-cert", "a.crt", "--tls-key", "a.key"]).unwrap();
        assert_eq!(tls.tls_cert, Some(PathBuf::from("a.crt")));
        assert!(ServeArgs::parse_from(["--tls-cert", "a.crt"]).is_err());
        assert!(ServeArgs::parse_from(["--tls-key", "a.key"]).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let args = ServeArgs::parse_from(["--jwt-secret", "hunter2", "--api-key", "k3y"]).unwrap();
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y"),
            "{shown}"
        );
    }
}
