//! Where a node's Redis is: one fixed address, the primary that Redis Sentinel names, or a Redis
//! Cluster.
//!
//! Every connection the broker makes (the subscriber, each publishing lane) asks for a client
//! when it connects, so after a failover the next connection goes to the new primary: a
//! connection to the old one fails (the process died) or is refused writes (`READONLY`, it was
//! demoted), and its owner connects again.

use redis::IntoConnectionInfo;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use tokio::sync::Mutex;

use super::BrokerError;

pub enum Endpoint {
    Single(redis::Client),
    Sentinel {
        sentinels: Mutex<SentinelClient>,
        master: String,
    },
    /// A Redis Cluster, from its seed addresses; its connections follow the slot map.
    Cluster(Vec<redis::ConnectionInfo>),
}

impl Endpoint {
    /// One Redis at `url`.
    pub fn single(url: &str) -> Result<Self, BrokerError> {
        redis::Client::open(url)
            .map(Self::Single)
            .map_err(|e| BrokerError::Redis(format!("invalid Redis URL: {e}")))
    }

    /// The primary that the sentinels at `urls` monitor as `master`. The database and
    /// credentials of the first URL apply to the primary too.
    pub fn sentinel(urls: &[&str], master: &str) -> Result<Self, BrokerError> {
        let invalid = |e: redis::RedisError| BrokerError::Redis(format!("invalid sentinel: {e}"));
        let first = urls
            .first()
            .ok_or_else(|| BrokerError::Redis("no sentinel URL".into()))?;
        let primary = SentinelNodeConnectionInfo::default().set_redis_connection_info(
            first
                .into_connection_info()
                .map_err(invalid)?
                .redis_settings()
                .clone(),
        );
        let sentinels = SentinelClient::build(
            urls.to_vec(),
            master.to_owned(),
            Some(primary),
            SentinelServerType::Master,
        )
        .map_err(invalid)?;
        Ok(Self::Sentinel {
            sentinels: Mutex::new(sentinels),
            master: master.to_owned(),
        })
    }

    /// A Redis Cluster reached through any of `seeds`.
    pub fn cluster(seeds: &[&str]) -> Result<Self, BrokerError> {
        let seeds = (seeds.iter())
            .map(|url| url.into_connection_info())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BrokerError::Redis(format!("invalid Redis Cluster URL: {e}")))?;
        if seeds.is_empty() {
            return Err(BrokerError::Redis("no Redis Cluster URL".into()));
        }
        Ok(Self::Cluster(seeds))
    }

    /// Whether this is a Redis Cluster (shard channels, routed commands).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A connection to the cluster that routes each command by its key, with RESP3 and, when
    /// given, shard-channel messages handed to `pushes` as they arrive.
    pub async fn cluster_connection(
        &self,
        timeout: std::time::Duration,
        pushes: Option<impl redis::aio::AsyncPushSender>,
    ) -> Result<redis::cluster_async::ClusterConnection, BrokerError> {
        let Self::Cluster(seeds) = self else {
            return Err(BrokerError::Redis("not a Redis Cluster".into()));
        };
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(pushes) = pushes {
            builder = builder.push_sender(pushes);
        }
        let client = builder
            .build()
            .map_err(|e| BrokerError::Redis(format!("invalid Redis Cluster: {e}")))?;
        client
            .get_async_connection()
            .await
            .map_err(|e| BrokerError::Redis(e.to_string()))
    }

    /// A client for the primary as it is now: in sentinel mode, asked of the sentinels (and
    /// checked with `ROLE` on the primary) each time.
    pub async fn client(&self) -> Result<redis::Client, BrokerError> {
        match self {
            Self::Single(client) => Ok(client.clone()),
            Self::Sentinel { sentinels, master } => sentinels
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| BrokerError::Redis(format!("no primary for {master}: {e}"))),
            Self::Cluster(_) => Err(BrokerError::Redis(
                "a Redis Cluster has no single server".into(),
            )),
        }
    }
}
