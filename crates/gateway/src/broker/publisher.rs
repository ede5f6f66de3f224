//! Ordered, pipelined commands to Redis: what a node publishes.
//!
//! A few lanes, each one Redis connection fed by a bounded queue. A lane takes whatever has
//! queued since its last round trip and sends it as one pipeline, so under load one round trip
//! carries many messages, and a caller never waits on Redis to hand over its next message.
//! Order is kept per lane: Redis runs one connection's commands in the order they arrive, and a
//! lane has one batch in flight at a time. Callers that need their messages in order (one
//! client connection) always use the same lane key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::Value;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::BrokerError;
use super::endpoint::Endpoint;
use crate::metrics::Metrics;

/// Most commands in one pipeline.
const MAX_BATCH: usize = 512;

struct Job {
    cmd: redis::Cmd,
    /// Must be confirmed by the lane's minimum of replicas.
    replicated: bool,
    queued: Instant,
    reply: oneshot::Sender<Result<Value, BrokerError>>,
}

/// The reply to one command sent through a lane.
pub struct Reply(oneshot::Receiver<Result<Value, BrokerError>>);

impl Future for Reply {
    type Output = Result<Value, BrokerError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A lane that ended (shutdown) drops its queue: nothing was or will be sent.
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(BrokerError::Unavailable)))
    }
}

pub struct Publisher {
    lanes: Box<[mpsc::Sender<Job>]>,
    /// Bumped when Redis was found gone and back: lanes drop connections made before.
    generation: Arc<AtomicU64>,
}

/// What every lane needs.
pub struct LaneSettings {
    pub endpoint: Arc<Endpoint>,
    /// Bound on one batch's round trip (connecting included).
    pub timeout: Duration,
    /// Replicas that must confirm a replicated job (`WAIT`); 0: none.
    pub min_replicas: u32,
    /// The `pushgate` function library, loaded again when Redis has lost it.
    pub library: Option<&'static str>,
    pub metrics: Arc<Metrics>,
}

struct Lane {
    settings: LaneSettings,
    generation: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts `lanes` lane tasks with queues of `depth` commands each; they end at `shutdown`.
    pub fn start(
        settings: LaneSettings,
        lanes: usize,
        depth: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let generation = Arc::new(AtomicU64::new(0));
        let lane = Arc::new(Lane {
            settings,
            generation: generation.clone(),
        });
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(depth.max(1));
                tokio::spawn(lane.clone().run(rx, shutdown.clone()));
                tx
            })
            .collect();
        Self { lanes, generation }
    }

    /// Redis restarted or the network between was cut: connections made before now are dead
    /// even if no command has found out yet, so each lane connects again for its next batch.
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Queues `cmd` on the lane of `key`, after everything queued there before it. Waits only
    /// while that lane's queue is full (back-pressure), never for Redis's reply: that is what
    /// the returned [`Reply`] resolves to.
    pub async fn send(&self, key: u64, cmd: redis::Cmd) -> Reply {
        self.queue(key, cmd, false).await
    }

    /// Like [`send`](Self::send), for a write that the configured minimum of replicas must
    /// confirm before it counts as done.
    pub async fn send_replicated(&self, key: u64, cmd: redis::Cmd) -> Reply {
        self.queue(key, cmd, true).await
    }

    async fn queue(&self, key: u64, cmd: redis::Cmd, replicated: bool) -> Reply {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            cmd,
            replicated,
            queued: Instant::now(),
            reply,
        };
        let lane = &self.lanes[(key % self.lanes.len() as u64) as usize];
        if let Err(mpsc::error::SendError(job)) = lane.send(job).await {
            let _ = job.reply.send(Err(BrokerError::Unavailable));
        }
        Reply(rx)
    }

    /// Like [`send`](Self::send) without waiting: gives `cmd` back when the lane's queue is full.
    pub fn try_send(&self, key: u64, cmd: redis::Cmd) -> Result<Reply, redis::Cmd> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            cmd,
            replicated: false,
            queued: Instant::now(),
            reply,
        };
        let lane = &self.lanes[(key % self.lanes.len() as u64) as usize];
        match lane.try_send(job) {
            Ok(()) => Ok(Reply(rx)),
            Err(mpsc::error::TrySendError::Full(job)) => Err(job.cmd),
            Err(mpsc::error::TrySendError::Closed(job)) => {
                let _ = job.reply.send(Err(BrokerError::Unavailable));
                Ok(Reply(rx))
            }
        }
    }
}

impl Lane {
    async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let mut conn = None;
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = queue.recv_many(&mut jobs, MAX_BATCH) => n,
            };
            if n == 0 {
                return;
            }
            // A lane without a connection connects for its next batch: while Redis is down,
            // each batch fails on its own connect (at once when refused, within the timeout
            // when unreachable).
            let batch = self.batch(&mut conn, &mut jobs);
            let replies = match tokio::time::timeout(self.settings.timeout, batch).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::Timeout),
            };
            if let Err(e) = &replies {
                debug!(error = %e, commands = jobs.len(), "redis pipeline failed");
                // The connection's state is unknown (a reply may be half read): start over.
                conn = None;
            }
            let mut replies = replies.map(|(values, replicas)| (values.into_iter(), replicas));
            for job in jobs.drain(..) {
                let reply = match &mut replies {
                    Ok((values, replicas)) => {
                        let value = values.next();
                        match replicas {
                            Some(got) if job.replicated && *got < self.settings.min_replicas => {
                                Err(BrokerError::NotReplicated {
                                    got: *got,
                                    wanted: self.settings.min_replicas,
                                })
                            }
                            _ => value.unwrap_or(Err(BrokerError::Unavailable)),
                        }
                    }
                    Err(e) => Err(e.clone()),
                };
                self.settings
                    .metrics
                    .redis_publish_seconds
                    .observe(job.queued.elapsed().as_secs_f64());
                let _ = job.reply.send(reply);
            }
        }
    }

    /// Sends `jobs` in order and returns one reply each, and, when a job needs replicas, how
    /// many confirmed the batch (`WAIT`). Commands that failed because Redis lost the function
    /// library (a restarted or flushed Redis, a primary new to a cluster) run again after it is
    /// loaded.
    async fn batch(
        &self,
        conn: &mut Option<(u64, LaneConnection)>,
        jobs: &mut [Job],
    ) -> Result<(Vec<Result<Value, BrokerError>>, Option<u32>), BrokerError> {
        let generation = self.generation.load(Ordering::Acquire);
        if conn.as_ref().is_some_and(|(g, _)| *g != generation) {
            *conn = None;
        }
        let (_, conn) = match conn {
            Some(c) => c,
            None => conn.insert((generation, self.connect().await?)),
        };
        // The commands move into the pipeline: a message's bytes are not copied again here.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in jobs.iter_mut() {
            pipe.add_command(std::mem::take(&mut job.cmd));
        }
        let mut replies = conn.send(&pipe).await?;
        if replies.len() != jobs.len() {
            return Err(BrokerError::Redis("pipeline reply count mismatch".into()));
        }
        if replies
            .iter()
            .any(|r| matches!(r, Err(e) if is_readonly(e)))
        {
            // A replica now (a failover demoted this server): the batch fails, and the next
            // one connects to the primary the endpoint names then.
            return Err(BrokerError::Redis(
                "READONLY: connected to a replica".into(),
            ));
        }
        let missing: Vec<usize> = (replies.iter().enumerate())
            .filter(|(_, r)| matches!(r, Err(e) if is_missing_function(e)))
            .map(|(i, _)| i)
            .collect();
        if let (Some(library), false) = (self.settings.library, missing.is_empty()) {
            warn!("redis lost the pushgate function library; loading it again");
            load_library(conn, library).await?;
            let mut again = redis::pipe();
            again.ignore_errors();
            let sent: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
            for &i in &missing {
                again.add_command(sent[i].clone());
            }
            let retried = conn.send(&again).await?;
            for (i, reply) in missing.into_iter().zip(retried) {
                replies[i] = reply;
            }
        }
        let replicas = if self.settings.min_replicas > 0 && jobs.iter().any(|j| j.replicated) {
            // One WAIT covers every write this connection sent before it (on a cluster, every
            // primary answers and the least count counts). Half the timeout, so that the batch
            // still answers within it.
            let wait_ms = (self.settings.timeout / 2).as_millis().max(1) as u64;
            let got: u32 = redis::cmd("WAIT")
                .arg(self.settings.min_replicas)
                .arg(wait_ms)
                .query_async(conn)
                .await
                .map_err(redis_error)?;
            Some(got)
        } else {
            None
        };
        Ok((replies, replicas))
    }

    async fn connect(&self) -> Result<LaneConnection, BrokerError> {
        let endpoint = &self.settings.endpoint;
        if endpoint.is_cluster() {
            let no_pushes = None::<fn(redis::PushInfo) -> Result<(), ()>>;
            let conn = endpoint
                .cluster_connection(self.settings.timeout, no_pushes)
                .await?;
            return Ok(LaneConnection::Cluster(conn));
        }
        let conn = (endpoint.client().await?)
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.settings.timeout))
                    .set_response_timeout(Some(self.settings.timeout)),
            )
            .await
            .map_err(redis_error)?;
        Ok(LaneConnection::Single(conn))
    }
}

/// A lane's connection: to one server, or to a Redis Cluster, routing each command by its key.
enum LaneConnection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl LaneConnection {
    /// Sends `pipe`'s commands in order and returns one reply each. To one server they go as one
    /// pipeline. A cluster takes a pipeline only within one slot, so there each goes on its
    /// own, queued in order and so kept in order on each shard's connection.
    async fn send(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<Result<Value, BrokerError>>, BrokerError> {
        match self {
            Self::Single(conn) => {
                let values: Vec<Value> = pipe.query_async(conn).await.map_err(redis_error)?;
                Ok(values.into_iter().map(into_result).collect())
            }
            Self::Cluster(conn) => {
                let sends = pipe.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move {
                        (conn.req_packed_command(cmd).await)
                            .map_err(redis_error)
                            .and_then(into_result)
                    }
                });
                Ok(join_all(sends).await)
            }
        }
    }
}

impl redis::aio::ConnectionLike for LaneConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// `FUNCTION LOAD REPLACE` of `library` on `conn`.
pub async fn load_library(
    conn: &mut impl redis::aio::ConnectionLike,
    library: &str,
) -> Result<(), BrokerError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library)
        .query_async::<Value>(conn)
        .await
        .map(drop)
        .map_err(redis_error)
}

fn into_result(value: Value) -> Result<Value, BrokerError> {
    match value {
        Value::ServerError(e) => Err(BrokerError::Redis(e.to_string())),
        v => Ok(v),
    }
}

fn is_missing_function(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Redis(message) if message.contains("Function not found"))
}

/// Whether Redis refused a write because the server is a replica: the primary moved.
fn is_readonly(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Redis(message) if message.starts_with("READONLY"))
}

pub fn redis_error(e: redis::RedisError) -> BrokerError {
    BrokerError::Redis(e.to_string())
}
