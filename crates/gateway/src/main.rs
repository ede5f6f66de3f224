use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pushgate::Server;
use pushgate::auth::{TokenSpec, mint};
use pushgate::config::{Cli, Command, LogFormat, Secret, ServeArgs};
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
    let no_key = args.jwt.jwt_secret.is_none() && args.jwt.jwt_public_key.is_none();
    if no_key {
        args.jwt.jwt_secret = Some(Secret::new(random_secret()));
    }
    if args.api_key.is_none() {
        args.api_key = Some(Secret::new(random_secret()));
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
    }
    println!("  metrics:    http://{base}/metrics");
}

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    if args.dev {
        dev_setup(&mut args);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
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
