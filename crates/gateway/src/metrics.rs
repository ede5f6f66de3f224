//! Prometheus metrics. Each node owns its registry (no global recorder), and hot-path counters
//! are resolved once at start so that counting is one atomic add.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

/// Counters for messages entering the node, by where they came from.
#[derive(Clone)]
pub struct Inbound {
    pub client: Counter,
    pub api: Counter,
    pub redis: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

/// Subscribes with a position, by outcome.
#[derive(Clone)]
pub struct Recoveries {
    pub recovered: Counter,
    pub not_recovered: Counter,
}

/// Why a delivery or connection was dropped.
#[derive(Clone)]
pub struct Drops {
    pub slow_consumer: Counter,
    pub closed: Counter,
    pub heartbeat_timeout: Counter,
    pub rate_limited: Counter,
    pub too_large: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchTrigger {
    trigger: &'static str,
}

/// Figures of a JWKS key source (`--jwt-jwks-url`); registered by [`Metrics::register_jwks`]
/// only on nodes that have one.
#[derive(Clone, Debug)]
pub struct JwksMetrics {
    fetches: Family<FetchTrigger, Counter>,
    pub refresh_failures: Counter,
    /// Usable keys in the set held.
    pub keys: Gauge,
    /// Unix seconds of the last successful fetch (0: none yet).
    pub last_success: Gauge,
}

impl Default for JwksMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl JwksMetrics {
    pub fn new() -> Self {
        let fetches = Family::<FetchTrigger, Counter>::default();
        // Every trigger's series exists from the start.
        for trigger in ["start", "interval", "unknown_kid"] {
            let _ = fetches.get_or_create(&FetchTrigger { trigger });
        }
        Self {
            fetches,
            refresh_failures: Counter::default(),
            keys: Gauge::default(),
            last_success: Gauge::default(),
        }
    }

    /// Counts a fetch started by `trigger` (`start`, `interval`, `unknown_kid`).
    pub fn fetch(&self, trigger: &'static str) {
        self.fetches.get_or_create(&FetchTrigger { trigger }).inc();
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    /// The configured --max-connections (set when the node starts).
    pub connections_limit: Gauge,
    pub connections_total: Counter,
    pub messages_in: Inbound,
    /// Frames written into client queues (one per recipient).
    pub deliveries: Counter,
    /// Delivery frames serialized (one per message per node, whatever the recipient count).
    pub encodes: Counter,
    /// Messages compressed for permessage-deflate connections (one per message per node at
    /// most, whatever the number of connections that get it compressed).
    pub compressions: Counter,
    pub drops: Drops,
    auth_failures: Family<Reason, Counter>,
    pub redis_up: Gauge,
    pub broker_isolated: Gauge,
    pub redis_reconnects: Counter,
    pub redis_invalid: Counter,
    pub redis_probe_failures: Counter,
    pub redis_subscriptions: Gauge,
    pub redis_publish_seconds: Histogram,
    /// From a message's `ts` to its frame written to a client's socket, per delivery.
    pub delivery_lag_seconds: Histogram,
    /// From a message's `ts` on the publishing node to its receipt from Redis on another node.
    pub redis_hop_seconds: Histogram,
    pub history_recoveries: Recoveries,
    /// Gaps in a connection's history messages filled from history.
    pub history_gaps: Counter,
    /// History subscriptions ended because history no longer held what was missed.
    pub history_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        // Process metrics are unprefixed by convention; ours live under `pushgate_`.
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("pushgate");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let connections_limit = Gauge::default();
        registry.register(
            "connections_limit",
            "Most connections this node accepts (--max-connections)",
            connections_limit.clone(),
        );
        let connections_total = Counter::default();
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            connections_total.clone(),
        );

        let messages_in = Family::<Source, Counter>::default();
        registry.register(
            "messages_in",
            "Messages received for delivery, by source",
            messages_in.clone(),
        );
        let source = |s| messages_in.get_or_create_owned(&Source { source: s });
        let messages_in = Inbound {
            client: source("client"),
            api: source("api"),
            redis: source("redis"),
        };

        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Message frames queued to clients",
            deliveries.clone(),
        );
        let encodes = Counter::default();
        registry.register(
            "message_encodes",
            "Message frames serialized (once per message, shared by all recipients)",
            encodes.clone(),
        );
        let compressions = Counter::default();
        registry.register(
            "message_compressions",
            "Messages compressed for permessage-deflate (once per message, shared by all \
             recipients that negotiated it)",
            compressions.clone(),
        );

        let drops = Family::<Reason, Counter>::default();
        registry.register(
            "drops",
            "Dropped deliveries and connections, by reason",
            drops.clone(),
        );
        let reason = |r| drops.get_or_create_owned(&Reason { reason: r });
        let drops = Drops {
            slow_consumer: reason("slow_consumer"),
            closed: reason("closed"),
            heartbeat_timeout: reason("heartbeat_timeout"),
            rate_limited: reason("rate_limited"),
            too_large: reason("too_large"),
        };

        let auth_failures = Family::<Reason, Counter>::default();
        registry.register(
            "auth_failures",
            "Rejected tokens, by reason",
            auth_failures.clone(),
        );

        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "1 when the Redis subscription is live (or the broker is embedded)",
            redis_up.clone(),
        );
        let broker_isolated = Gauge::default();
        registry.register(
            "broker_isolated",
            "1 while this node cannot reach Redis and other nodes can (it is then not ready)",
            broker_isolated.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Redis subscriber connections (re)established",
            redis_reconnects.clone(),
        );
        let redis_invalid = Counter::default();
        registry.register(
            "redis_invalid_messages",
            "Unparseable messages received from Redis and dropped",
            redis_invalid.clone(),
        );
        let redis_probe_failures = Counter::default();
        registry.register(
            "redis_probe_failures",
            "Liveness probes not received back in time (the subscription was restarted)",
            redis_probe_failures.clone(),
        );
        let redis_subscriptions = Gauge::default();
        registry.register(
            "redis_subscriptions",
            "Redis channels this node is subscribed to",
            redis_subscriptions.clone(),
        );
        let redis_publish_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "redis_publish_seconds",
            "Latency of PUBLISH to Redis",
            redis_publish_seconds.clone(),
        );

        // `ts` has millisecond resolution, so nothing finer than a millisecond is told apart.
        let lag_buckets = [
            0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let delivery_lag_seconds = Histogram::new(lag_buckets);
        registry.register(
            "delivery_lag_seconds",
            "From a message's timestamp (where it was published) to its frame written to a client's socket",
            delivery_lag_seconds.clone(),
        );
        let redis_hop_seconds = Histogram::new(lag_buckets);
        registry.register(
            "redis_hop_seconds",
            "From a message's timestamp on the publishing node to its receipt from Redis on this node",
            redis_hop_seconds.clone(),
        );

        let recoveries = Family::<Outcome, Counter>::default();
        registry.register(
            "history_recoveries",
            "Subscribes with a position, by result (recovered, not_recovered)",
            recoveries.clone(),
        );
        let outcome = |r| recoveries.get_or_create_owned(&Outcome { result: r });
        let history_recoveries = Recoveries {
            recovered: outcome("recovered"),
            not_recovered: outcome("not_recovered"),
        };
        let history_gaps = Counter::default();
        registry.register(
            "history_gaps",
            "Gaps in a connection's history messages, filled from history",
            history_gaps.clone(),
        );
        let history_lost = Counter::default();
        registry.register(
            "history_lost",
            "History subscriptions ended (history_lost) because history no longer held what was missed",
            history_lost.clone(),
        );

        Self {
            registry: root,
            connections,
            connections_limit,
            connections_total,
            messages_in,
            deliveries,
            encodes,
            compressions,
            drops,
            auth_failures,
            redis_up,
            broker_isolated,
            redis_reconnects,
            redis_invalid,
            redis_probe_failures,
            redis_subscriptions,
            redis_publish_seconds,
            delivery_lag_seconds,
            redis_hop_seconds,
            history_recoveries,
            history_gaps,
            history_lost,
        }
    }

    /// Adds the JWKS key source's metrics (nodes with `--jwt-jwks-url`).
    pub fn register_jwks(&mut self, jwks: &JwksMetrics) {
        let registry = self.registry.sub_registry_with_prefix("pushgate");
        registry.register(
            "jwks_fetches",
            "JWKS fetches started, by trigger (start, interval, unknown_kid)",
            jwks.fetches.clone(),
        );
        registry.register(
            "jwks_refresh_failures",
            "JWKS fetches that failed (the keys held stay in use)",
            jwks.refresh_failures.clone(),
        );
        registry.register(
            "jwks_keys",
            "Usable keys in the JWKS held",
            jwks.keys.clone(),
        );
        registry.register(
            "jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS fetch (0: none yet)",
            jwks.last_success.clone(),
        );
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&Reason { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `process_resident_memory_bytes`, `process_open_fds` and `process_max_fds`, read from
/// `/proc` on each scrape.
/// The wall clock in Unix seconds, to compare with messages' timestamps.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds from `ts` (Unix milliseconds, truncated: the figure overstates by up to 1 ms) to
/// `now`. Hosts' clocks may disagree: a timestamp ahead of `now` counts as no lag.
pub fn lag_since(now: f64, ts: u64) -> f64 {
    (now - ts as f64 / 1000.0).max(0.0)
}

#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    fn rss_bytes() -> Option<i64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // Linux pages are 4 KiB on the platforms pushgate ships for.
        Some(pages * 4096)
    }

    fn open_fds() -> Option<i64> {
        Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
    }

    /// The soft limit on open files (what accepts run into).
    fn max_fds() -> Option<i64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        Self::soft_limit(&limits, "Max open files")
    }

    /// The soft limit of `name` in the text of `/proc/PID/limits` (`None` when unlimited).
    fn soft_limit(limits: &str, name: &str) -> Option<i64> {
        let line = limits.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Self::rss_bytes(),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                Self::open_fds(),
            ),
            (
                "process_max_fds",
                "Limit on open file descriptors (the soft limit)",
                Self::max_fds(),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let gauge = ConstGauge::new(v);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_process_metrics() {
        let m = Metrics::new();
        m.deliveries.inc_by(3);
        m.auth_failure("expired");
        let text = m.render();
        assert!(text.contains("pushgate_deliveries_total 3"), "{text}");
        assert!(
            text.contains(r#"pushgate_auth_failures_total{reason="expired"} 1"#),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("pushgate_connections_limit 0"), "{text}");
        m.connections_limit.set(50_000);
        let text = m.render();
        assert!(text.contains("pushgate_connections_limit 50000"), "{text}");
        let max_fds = text
            .lines()
            .find_map(|l| l.strip_prefix("process_max_fds "))
            .and_then(|v| v.parse::<i64>().ok());
        assert!(max_fds.is_some_and(|n| n > 0), "{text}");
    }

    #[test]
    fn jwks_metrics_appear_only_when_registered() {
        let mut m = Metrics::new();
        assert!(!m.render().contains("jwks"));
        let jwks = JwksMetrics::new();
        m.register_jwks(&jwks);
        jwks.fetch("unknown_kid");
        jwks.refresh_failures.inc();
        jwks.keys.set(2);
        jwks.last_success.set(1_700_000_000);
        let text = m.render();
        for line in [
            r#"pushgate_jwks_fetches_total{trigger="start"} 0"#,
            r#"pushgate_jwks_fetches_total{trigger="unknown_kid"} 1"#,
            "pushgate_jwks_refresh_failures_total 1",
            "pushgate_jwks_keys 2",
            "pushgate_jwks_last_success_timestamp_seconds 1700000000",
            "pushgate_connections 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn reads_the_soft_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                40000                files     \n";
        assert_eq!(
            ProcessCollector::soft_limit(limits, "Max open files"),
            Some(20000)
        );
        assert_eq!(ProcessCollector::soft_limit(limits, "Max cpu time"), None);
        assert_eq!(
            ProcessCollector::soft_limit(limits, "Max locked memory"),
            None
        );
    }
}
