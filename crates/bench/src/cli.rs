//! Command line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 500ms, 2m)"))
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("a rate in messages per second, > 0".into()),
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "pushgate-bench",
    version,
    about = "Benchmarks a pushgate node (idle memory, handshakes, fan-out) against a bare broadcast baseline",
    after_help = "Each run prints a table and exactly one JSON line (the only output line starting with '{')."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N authenticated connections subscribed to one channel; report the connect rate and
    /// the node's RSS per connection.
    Idle(IdleArgs),
    /// Authenticated handshakes per second: connect, read the welcome, close.
    Connect(ConnectArgs),
    /// S subscribers over K nodes, P publishers at R messages/s: deliveries/s, loss, latency.
    Fanout(FanoutArgs),
    /// The same measurements against a bare tokio + tungstenite broadcast server (no auth, no
    /// JSON, no Redis) that the bench starts as its own child process.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// The fan-out of a Socket.IO cluster (crates/bench/socketio/server.js processes sharing
    /// broadcasts through the Redis adapter), for comparison.
    #[command(subcommand)]
    Socketio(SocketIoCommand),
    /// Run the bare broadcast server (the bench starts it itself for `baseline`).
    #[command(hide = true)]
    BaselineServer(BaselineServerArgs),
    /// A client worker process (started by the bench for --procs).
    #[command(hide = true)]
    Worker,
    /// N connections over several nodes, each on its own user channel and one of R history
    /// rooms: open, hold, broadcast to all, room traffic, and room traffic through a command
    /// (a rolling restart) after which every connection must have every room message once.
    Scale(ScaleArgs),
    /// A scale worker process (started by `scale`).
    #[command(hide = true)]
    ScaleWorker,
}

#[derive(Subcommand, Debug)]
pub enum BaselineCommand {
    /// Idle connections to the baseline server; its RSS per connection.
    Idle(IdleLoad),
    /// Bare WebSocket upgrades per second (connect, close).
    Connect(ConnectLoad),
    /// Broadcast fan-out: every publisher's text message goes to every subscriber.
    Fanout(FanoutLoad),
}

#[derive(Subcommand, Debug)]
pub enum SocketIoCommand {
    /// S subscribers joined to one room over K Socket.IO processes, P publishers emitting acked
    /// `pub` events at R messages/s (the server broadcasts each as a `msg` event to the room).
    Fanout(SocketIoFanoutArgs),
}

#[derive(Args, Debug)]
pub struct SocketIoFanoutArgs {
    /// The Socket.IO processes' URLs, `ws://host:port` (repeat, or comma-separate); subscribers
    /// and publishers are spread over them in turn.
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:3000"
    )]
    pub urls: Vec<String>,
    /// The room every subscriber joins and every message is emitted to.
    #[arg(long, default_value = "bench")]
    pub room: String,
    #[command(flatten)]
    pub load: FanoutLoad,
}

/// How clients of a pushgate node are authenticated.
#[derive(Args, Debug, Clone)]
pub struct Auth {
    /// The node's HS256 secret; the bench mints its own tokens with it.
    #[arg(long, env = "PUSHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// `iss` claim, when the node requires one.
    #[arg(long, env = "PUSHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `aud` claim, when the node requires one.
    #[arg(long, env = "PUSHGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Lifetime of the minted tokens.
    #[arg(long, default_value = "2h", value_parser = duration)]
    pub token_ttl: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct Procs {
    /// Worker processes to spread the clients over (1: all in this process). Needed when one
    /// process cannot hold all the descriptors a run needs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub procs: u32,
}

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// The node's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    #[command(flatten)]
    pub auth: Auth,
    /// The channel every connection subscribes to.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// The node's process ID: its RSS is read from /proc/<pid>/status (VmRSS).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Where to read `process_resident_memory_bytes` when no --pid is given
    /// (default: /metrics on the --url's host and port).
    #[arg(long)]
    pub metrics_url: Option<String>,
    #[command(flatten)]
    pub load: IdleLoad,
}

#[derive(Args, Debug, Clone)]
pub struct IdleLoad {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Handshakes in flight at once (over all processes).
    #[arg(short = 'c', long, default_value_t = 64)]
    pub concurrency: usize,
    /// Longest wait for the server's RSS to settle once every connection is open.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub settle_timeout: Duration,
    /// Keep the connections open this long after measuring.
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub hold: Duration,
    #[command(flatten)]
    pub procs: Procs,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The node's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    #[command(flatten)]
    pub auth: Auth,
    #[command(flatten)]
    pub load: ConnectLoad,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectLoad {
    /// Handshake loops running at once (over all processes).
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long to run (default 5s, or until --count).
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Stop after this many handshakes.
    #[arg(long)]
    pub count: Option<u64>,
    #[command(flatten)]
    pub procs: Procs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `{"type":"publish"}` frames on publisher connections (the node's --client-rate applies).
    Ws,
    /// `POST /api/publish` with the API key.
    Http,
    /// Plain `PUBLISH <prefix>:ch:<channel> {"data":...}` to Redis, as a backend would.
    Redis,
}

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// The nodes' WebSocket URLs (repeat, or comma-separate); subscribers and publishers are
    /// spread over them in turn.
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub auth: Auth,
    /// The channel every subscriber subscribes to and every message is published on.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// How publishers publish.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    pub via: Via,
    /// API key for --via http.
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Redis URL for --via redis.
    #[arg(long, env = "PUSHGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The cluster's Redis channel prefix.
    #[arg(long, env = "PUSHGATE_REDIS_PREFIX", default_value = "pushgate")]
    pub redis_prefix: String,
    /// Decode every delivery into the protocol's `ServerFrame` and check its channel (default:
    /// borrow only `data` out of each frame, as cheap on the client as the baseline's reads).
    #[arg(long)]
    pub full_decode: bool,
    #[command(flatten)]
    pub load: FanoutLoad,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutLoad {
    /// Subscriber connections.
    #[arg(short = 's', long, default_value_t = 100)]
    pub subscribers: u64,
    /// Publishers; the rate is split evenly between them.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: u32,
    /// Messages per second over all publishers (the first rate tried with --find-max).
    #[arg(short = 'r', long, default_value_t = 100.0, value_parser = positive_rate)]
    pub rate: f64,
    /// Bytes of each message's payload: the JSON text of `data` (for the baseline, the text
    /// message), with the send timestamp inside. At least 80.
    #[arg(long, default_value_t = 100)]
    pub payload_size: usize,
    /// How long each run (each step, with --find-max) publishes (default 5s, or --count).
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Messages to publish in all (per step, with --find-max) instead of --duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// After publishing, how long to wait with no new delivery before counting the rest lost.
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Without --find-max: runs of --duration (or --count) at --rate, back to back on the same
    /// connections, each reported on its own (how much one measurement moves); the JSON line's
    /// `result` is the first, `steps` holds them all.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Step the rate up from --rate (times --step-factor) until a step loses a message, has a
    /// publish rejected, falls behind its rate, or has p99 over --p99-bound; then bisect between
    /// the last good and first bad rate; report the highest good rate.
    #[arg(long)]
    pub find_max: bool,
    /// Highest p99 latency a --find-max step may have.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub p99_bound: Duration,
    /// Factor between --find-max steps.
    #[arg(long, default_value_t = 2.0)]
    pub step_factor: f64,
    /// Bisection steps after the first failing rate.
    #[arg(long, default_value_t = 3)]
    pub refine: u32,
    /// --find-max never tries a rate above this.
    #[arg(long, default_value_t = 1_000_000.0, value_parser = positive_rate)]
    pub max_rate: f64,
    /// Subscriber handshakes in flight at once while connecting (over all processes).
    #[arg(short = 'c', long, default_value_t = 64)]
    pub concurrency: usize,
    #[command(flatten)]
    pub procs: Procs,
}

#[derive(Args, Debug, Clone)]
pub struct BaselineServerArgs {
    /// Address to listen on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Read (and write) buffer size per connection.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Messages queued per connection before it is dropped as a slow consumer (pushgate's
    /// default outbound queue).
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
}

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// The nodes' WebSocket URLs (host:port addresses); connection i goes to URL i mod count.
    #[arg(long = "url", value_delimiter = ',', required = true)]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub auth: Auth,
    /// API key, to publish the broadcasts and the room traffic.
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Connections in all.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub connections: u64,
    /// Rooms; connection i subscribes to room i mod rooms. The nodes must keep history on them
    /// (`--history 'room:*=...'`).
    #[arg(long, default_value_t = 1000)]
    pub rooms: u64,
    /// Room channel names: this prefix and the room number.
    #[arg(long, default_value = "room:")]
    pub room_prefix: String,
    /// Handshakes in flight at once (over all processes).
    #[arg(short = 'c', long, default_value_t = 128)]
    pub concurrency: usize,
    /// How long to hold every connection open before the broadcasts.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub hold: Duration,
    /// Broadcasts to every connection, one after the other.
    #[arg(long, default_value_t = 3)]
    pub broadcasts: u32,
    /// Room messages per second over all rooms (API publishes spread over the nodes).
    #[arg(long, default_value_t = 100.0, value_parser = positive_rate)]
    pub room_rate: f64,
    /// How long the steady room traffic runs.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub room_duration: Duration,
    /// A shell command to run while room traffic goes on (e.g. a rolling restart of the nodes);
    /// afterwards every connection must be back and hold every room message exactly once.
    #[arg(long)]
    pub during: Option<String>,
    #[command(flatten)]
    pub procs: Procs,
}
