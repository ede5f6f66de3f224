//! Where a node's Redis is: one fixed address, or the primary that Redis Sentinel names.
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
        }
    }
}

/// Whether Redis refused a write because the server is a replica: the primary moved.
pub fn is_readonly(e: &redis::ServerError) -> bool {
    e.code() == "READONLY"
}
