//! Whether this node alone has lost the broker.
//!
//! Readiness must not hinge on a dependency every node shares: when Redis is down for all of
//! them, each node still serves its own clients, and a 503 from every `/readyz` would take every
//! pod out of service at once. But a node that alone cannot reach Redis (a partition, a dead
//! proxy) while its peers can should not attract new clients, whose messages would not cross.
//! Peers cannot tell the two apart over Redis, so a node that lost it asks the peers it heard
//! from last, over HTTP (`/healthz`), whether they still reach it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Deserialize;
use tracing::{info, warn};

use super::{Node, lock};

/// How often a node without Redis asks its peers, and how long one answer may take.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Checks in a row that must find a peer reaching Redis. When Redis comes back after an outage
/// shared by all, nodes reconnect up to a backoff apart: the last ones are not isolated.
const CHECKS_TO_ISOLATE: u32 = 3;

/// The part of a peer's `/healthz` read here.
#[derive(Deserialize)]
struct PeerHealth {
    broker: PeerBroker,
}

#[derive(Deserialize)]
struct PeerBroker {
    ready: bool,
}

impl Node {
    /// Whether this node cannot reach the broker while other nodes can.
    pub fn is_isolated(&self) -> bool {
        self.isolated.load(Ordering::Acquire)
    }

    /// The `/healthz` URLs of the peers heard from since `since`.
    fn peer_health_urls(&self, since: Instant) -> Vec<String> {
        lock(&self.peers)
            .values()
            .filter(|(seen, _)| *seen >= since)
            .filter_map(|(_, stats)| stats.url.as_deref())
            .map(|base| format!("{}/healthz", base.trim_end_matches('/')))
            .collect()
    }

    /// Runs until shutdown: while the broker is up, remembers the peers; while it is down, asks
    /// them whether they reach it.
    pub(super) async fn watch_isolation(self: Arc<Self>) {
        let http = match reqwest::Client::builder().timeout(CHECK_INTERVAL).build() {
            Ok(http) => http,
            Err(e) => {
                warn!(error = %e, "no HTTP client: a node that alone loses Redis stays ready");
                return;
            }
        };
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Heartbeats travel over Redis: the peers asked are those heard from in the last three
        // heartbeat intervals before the broker was last seen up.
        let horizon = self.peer_horizon();
        let mut last_up = Instant::now();
        let mut peers_reach_it = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.broker.is_ready() {
                last_up = Instant::now();
                peers_reach_it = 0;
            } else {
                let since = last_up.checked_sub(horizon).unwrap_or(last_up);
                let peers = self.peer_health_urls(since);
                let answers = join_all(peers.iter().map(|url| reaches_broker(&http, url))).await;
                if answers.into_iter().any(|reaches| reaches) {
                    peers_reach_it += 1;
                } else {
                    peers_reach_it = 0;
                }
            }
            let isolated = peers_reach_it >= CHECKS_TO_ISOLATE;
            if self.isolated.swap(isolated, Ordering::AcqRel) != isolated {
                if isolated {
                    warn!("other nodes reach Redis and this node does not: not ready");
                } else {
                    info!("no longer cut off from Redis alone");
                }
            }
            self.metrics.broker_isolated.set(i64::from(isolated));
        }
    }
}

/// Whether the node at `url` (its `/healthz`) answers that its broker is up.
async fn reaches_broker(http: &reqwest::Client, url: &str) -> bool {
    let Ok(response) = http.get(url).send().await else {
        return false;
    };
    response
        .json::<PeerHealth>()
        .await
        .is_ok_and(|health| health.broker.ready)
}
