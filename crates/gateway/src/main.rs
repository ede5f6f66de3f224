use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pushgate::Server;
use pushgate::auth::{TokenSpec, mint};
use pushgate::config::{Cli, Command, LogFormat, PublishArgs, Secret, ServeArgs, SubscribeArgs};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Token(args) => {
            let spec = TokenSpec {
                sub: args.sub,
                channels: args.channels,
                publish: args.publish,
                ttl: args.ttl,
                issuer: args.jwt_issuer,
                audience: args.jwt_audience,
            };
            println!("{}", mint(&args.jwt_secret, &spec));
            Ok(())
        }
        Command::Serve(args) => serve(*args),
        Command::Publish(args) => publish(args),
        Command::Subscribe(args) => subscribe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PUSHGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `--dev`: fill in what a first run lacks, and say how to use it.
fn dev_setup(args: &mut ServeArgs) {
    let no_key = args.jwt.jwt_secret.is_none()
        && args.jwt.jwt_public_key.is_none()
        && args.jwt.jwt_jwks_url.is_none();
    if no_key {
        args.jwt.jwt_secret = Some(Secret::new(random_secret()));
    }
    if args.api_key.is_none() {
        args.api_key = Some(Secret::new(random_secret()));
    }
    // The demo chat at `/` (channels `chat:ROOM`) recovers history, lists who is online, and
    // says who joins and leaves.
    if args.history.is_empty() {
        args.history = vec!["chat:*=200/10m".parse().expect("a valid history rule")];
    }
    if args.presence.is_empty() {
        args.presence = vec!["chat:*".into()];
    }
    if args.presence_events.is_empty() {
        args.presence_events = vec!["chat:*".into()];
    }
    let port = args.listen.port();
    let base = format!("127.0.0.1:{port}");
    println!("pushgate development mode (do not use in production)");
    if let Some(secret) = args.jwt.jwt_secret.as_ref().filter(|_| no_key) {
        let token = mint(
            secret,
            &TokenSpec {
                sub: "demo".into(),
                channels: vec!["*".into()],
                publish: vec!["*".into()],
                ttl: std::time::Duration::from_secs(24 * 3600),
                ..TokenSpec::default()
            },
        );
        println!("  JWT secret (HS256): {}", secret.expose());
        println!("  token for user demo: {token}");
        println!("  WebSocket:  ws://{base}/ws?token={token}");
    }
    if let Some(key) = &args.api_key {
        println!("  API key:    {}", key.expose());
        println!(
            "  publish:    curl -H 'Authorization: Bearer {}' -d '{{\"channel\":\"news\",\"data\":\"hi\"}}' http://{base}/api/publish",
            key.expose()
        );
        println!("  admin:      http://{base}/admin (sign in with the API key)");
    }
    let history: Vec<String> = args
        .history
        .iter()
        .map(|r| {
            format!(
                "{}={}/{}",
                r.pattern,
                r.size,
                humantime::format_duration(r.ttl)
            )
        })
        .collect();
    println!("  history:    {}", history.join(", "));
    println!("  presence:   {}", args.presence.join(", "));
    println!("  presence events: {}", args.presence_events.join(", "));
    println!("  demo chat:  http://{base}/");
    println!("  metrics:    http://{base}/metrics");
}

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    if args.dev {
        dev_setup(&mut args);
    }
    pushgate::server::raise_open_file_limit(args.max_connections);
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        |n| n as usize,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    tracing::info!(workers, "runtime started");
    runtime.block_on(async {
        let server = Server::bind(args).await?;
        server.run(shutdown_signal()).await
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}

/// A small runtime for the client subcommands.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// How long `publish` waits for the API or Redis.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `pushgate publish`.
fn publish(args: PublishArgs) -> anyhow::Result<()> {
    use pushgate_protocol::Target;

    let text = if args.data == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading --data from standard input")?
    } else {
        args.data.clone()
    };
    let data: Box<pushgate_protocol::RawJson> =
        serde_json::from_str(text.trim()).context("--data is not JSON")?;
    let target = match (&args.channel, &args.user, &args.session) {
        (Some(c), _, _) => Target::Channel(c),
        (_, Some(u), _) => Target::User(u),
        (_, _, Some(s)) => Target::Session(s),
        _ => Target::Broadcast,
    };
    let runtime = client_runtime()?;
    let out = runtime.block_on(async {
        match (&args.url, &args.redis_url) {
            (Some(url), _) => {
                let key = args
                    .api_key
                    .as_ref()
                    .context("--url needs --api-key (or PUSHGATE_API_KEY)")?;
                publish_http(url, key, target, &data).await
            }
            (None, Some(redis_url)) => {
                publish_redis(redis_url, &args.redis_prefix, target, &data).await
            }
            (None, None) => anyhow::bail!(
                "say where to publish: --url http://node:8080 (HTTP API) or --redis-url redis://host:6379/"
            ),
        }
    })?;
    println!("{out}");
    Ok(())
}

/// `POST {url}/api/publish`; returns the response body (`{"id":…}`).
async fn publish_http(
    url: &str,
    key: &Secret,
    target: pushgate_protocol::Target<'_>,
    data: &pushgate_protocol::RawJson,
) -> anyhow::Result<String> {
    use pushgate_protocol::Target;

    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        broadcast: bool,
        data: &'a pushgate_protocol::RawJson,
    }
    let mut body = Body {
        channel: None,
        user: None,
        session: None,
        broadcast: false,
        data,
    };
    match target {
        Target::Channel(c) => body.channel = Some(c),
        Target::User(u) => body.user = Some(u),
        Target::Session(s) => body.session = Some(s),
        Target::Broadcast => body.broadcast = true,
    }
    let endpoint = format!("{}/api/publish", url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&endpoint)
        .bearer_auth(key.expose())
        .header("content-type", "application/json")
        .body(serde_json::to_string(&body)?)
        .timeout(PUBLISH_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("POST {endpoint}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("POST {endpoint}: {status}: {}", text.trim());
    }
    Ok(text.trim().to_owned())
}

/// `PUBLISH` of the documented envelope on the target's Redis channel; returns
/// `{"nodes":N}`, the number of nodes that received it.
async fn publish_redis(
    redis_url: &Secret,
    prefix: &str,
    target: pushgate_protocol::Target<'_>,
    data: &pushgate_protocol::RawJson,
) -> anyhow::Result<String> {
    use pushgate_protocol::{Envelope, NodeMessage, Target, validate_channel, validate_user};

    let envelope = Envelope {
        id: None,
        ts: None,
        from: None,
        origin: None,
        data,
    };
    let (topic, payload) = match target {
        Target::Channel(c) => {
            validate_channel(c).map_err(|e| anyhow::anyhow!("--channel {e}"))?;
            (format!("{prefix}:ch:{c}"), envelope.encode())
        }
        Target::User(u) => {
            validate_user(u).map_err(|e| anyhow::anyhow!("--user {e}"))?;
            (format!("{prefix}:user:{u}"), envelope.encode())
        }
        Target::Broadcast => (format!("{prefix}:broadcast"), envelope.encode()),
        Target::Session(s) => {
            // A session ID names its node: `{instance}.{32 hex digits}`.
            let instance = s
                .rsplit_once('.')
                .filter(|(node, id)| {
                    !node.is_empty()
                        && id.len() == 32
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
                .map(|(node, _)| node)
                .context("--session is not a session ID ({instance}.{32 hex digits})")?;
            let message = NodeMessage::Deliver {
                session: s.into(),
                envelope,
            };
            (format!("{prefix}:node:{instance}"), message.encode())
        }
    };
    let client = redis::Client::open(redis_url.expose()).context("--redis-url")?;
    let nodes: i64 = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PUBLISH")
            .arg(&topic)
            .arg(payload)
            .query_async(&mut connection)
            .await
    })
    .await
    .map_err(|_| anyhow::anyhow!("Redis did not answer within {PUBLISH_TIMEOUT:?}"))?
    .with_context(|| format!("PUBLISH {topic}"))?;
    if nodes == 0 {
        eprintln!("pushgate: no node is subscribed to {topic}: nobody received the message");
    }
    Ok(serde_json::json!({ "nodes": nodes }).to_string())
}

/// `pushgate subscribe`.
fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    client_runtime()?.block_on(subscribe_async(args))
}

async fn subscribe_async(args: SubscribeArgs) -> anyhow::Result<()> {
    use pushgate_client::{Client, Event};
    use std::io::Write;

    let mut urls = args.url.iter();
    let first = urls.next().context("--url is required")?;
    let mut builder = Client::builder(first.as_str()).token(args.token.expose());
    for url in urls {
        builder = builder.add_url(url.as_str());
    }
    if let Some(path) = &args.ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        builder = builder.tls(pushgate_client::tls::config_with_ca_pem(&pem)?);
    }
    let client = builder.build()?;
    let mut events = client.events();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let line = match events.recv().await {
                Ok(Event::Connected(s)) => {
                    format!(
                        "connected to node {} (session {}, {})",
                        s.node, s.session, s.url
                    )
                }
                Ok(Event::Subscribed { channel }) => format!("subscribed to {channel}"),
                Ok(Event::Disconnected { code, reason }) => match code {
                    Some(code) => format!("disconnected: {code} {reason}"),
                    None => format!("disconnected: {reason}"),
                },
                Ok(Event::ConnectFailed { status, reason }) => match status {
                    Some(status) => format!("connect failed: {status} {reason}"),
                    None => format!("connect failed: {reason}"),
                },
                Ok(Event::Reconnecting { delay, .. }) => format!("reconnecting in {delay:?}"),
                Ok(Event::Unsubscribed { channel, reason }) => {
                    format!("unsubscribed from {channel}: {reason}")
                }
                Ok(Event::SubscribeFailed {
                    channel, message, ..
                }) => format!("subscribe to {channel} refused: {message}"),
                Ok(Event::Lagged { channel, dropped }) => {
                    format!("{channel}: dropped {dropped} deliveries (output too slow)")
                }
                Ok(Event::ServerError { code, message }) => format!("error {code:?}: {message}"),
                Ok(Event::Join(e)) => {
                    format!("{} joined {} (session {})", e.user, e.channel, e.session)
                }
                Ok(Event::Leave(e)) => {
                    format!("{} left {} (session {})", e.user, e.channel, e.session)
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => format!("({n} status events skipped)"),
                Err(RecvError::Closed) => break,
            };
            eprintln!("pushgate: {line}");
        }
    });

    let (tx, mut deliveries) = tokio::sync::mpsc::channel(1024);
    let mut direct = client.direct_messages();
    for channel in &args.channels {
        let mut subscription = tokio::select! {
            s = client.subscribe(channel) => s.with_context(|| format!("subscribing to {channel}"))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(d) = subscription.recv().await {
                if tx.send(d).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            client.close().await;
            return Ok(());
        }
        let delivery = tokio::select! {
            Some(d) = deliveries.recv() => d,
            d = direct.recv() => match d {
                Ok(d) => d,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("pushgate: dropped {n} direct deliveries (output too slow)");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => continue,
            },
            reason = client.closed() => anyhow::bail!("{reason}"),
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
                return Ok(());
            }
        };
        let Some(line) = delivery_line(&delivery) else {
            continue;
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head -1`): done.
            client.close().await;
            return Ok(());
        }
        printed += 1;
    }
}

/// A delivery as the node sent it: `{"type":"message",…}`.
fn delivery_line(d: &pushgate_client::Delivery) -> Option<String> {
    use pushgate_protocol::server::{MessageRef, encode_message, encode_message_at};
    let data = serde_json::value::to_raw_value(&d.data).ok()?;
    let m = MessageRef {
        id: &d.id,
        ts: d.ts,
        from: d.from.as_deref(),
        target: d.target()?,
        data: &data,
    };
    // History channels' positions stay in the line, as in the node's frame.
    Some(match (d.offset, &d.epoch) {
        (Some(offset), Some(epoch)) => encode_message_at(&m, offset, epoch),
        _ => encode_message(&m),
    })
}
