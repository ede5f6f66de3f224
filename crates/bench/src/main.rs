//! `pushgate-bench`: measures a pushgate node (idle memory per connection, handshakes per second,
//! fan-out throughput, loss and latency) and the same figures for a bare tokio + tungstenite
//! broadcast server, the ceiling of the stack on the machine at hand; and the fan-out of a
//! Socket.IO cluster, for comparison.
#![forbid(unsafe_code)]

mod baseline;
mod cli;
mod client;
mod inflate;
mod limits;
mod payload;
mod publish;
mod rss;
mod run;
mod scale;
mod socketio;
mod stats;
mod token;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Auth, BaselineCommand, Cli, Command, SocketIoCommand};
use crate::rss::RssSource;
use crate::run::{Publish, Target};
use crate::token::TokenSpec;
use crate::worker::Protocol;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pushgate-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pushgate(auth: &Auth, channel: &str) -> Target {
    Target {
        name: "pushgate",
        protocol: Protocol::Pushgate {
            token: TokenSpec::new(
                auth.jwt_secret.clone(),
                auth.jwt_issuer.clone(),
                auth.jwt_audience.clone(),
                auth.token_ttl,
            ),
        },
        channel: channel.to_owned(),
    }
}

fn baseline_target() -> Target {
    Target {
        name: "baseline",
        protocol: Protocol::Bare,
        channel: "bench".into(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Idle(args) => {
            let rss = match (args.pid, args.metrics_url) {
                (Some(pid), _) => RssSource::Pid(pid),
                (None, Some(url)) => RssSource::metrics(url),
                (None, None) => {
                    RssSource::metrics(format!("{}/metrics", run::http_base(&args.url)?))
                }
            };
            let target = pushgate(&args.auth, &args.channel);
            run::idle(&target, &args.url, &rss, args.pid, &args.load).await
        }
        Command::Connect(args) => {
            run::connect(&pushgate(&args.auth, "bench"), &args.url, &args.load).await
        }
        Command::Fanout(args) => {
            let publish =
                Publish::from_args(args.via, args.api_key, args.redis_url, args.redis_prefix)?;
            let target = pushgate(&args.auth, &args.channel);
            run::fanout(&target, &args.urls, publish, args.full_decode, &args.load).await
        }
        Command::Baseline(which) => {
            let server = baseline::Child::start().await?;
            let (url, target) = (server.url(), baseline_target());
            eprintln!(
                "pushgate-bench: baseline server pid {} at {url}",
                server.pid
            );
            let outcome = match which {
                BaselineCommand::Idle(load) => {
                    let rss = RssSource::Pid(server.pid);
                    run::idle(&target, &url, &rss, Some(server.pid), &load).await
                }
                BaselineCommand::Connect(load) => run::connect(&target, &url, &load).await,
                BaselineCommand::Fanout(load) => {
                    run::fanout(
                        &target,
                        std::slice::from_ref(&url),
                        Publish::Bare,
                        false,
                        &load,
                    )
                    .await
                }
            };
            server.stop().await;
            outcome
        }
        Command::Socketio(SocketIoCommand::Fanout(args)) => {
            let target = Target {
                name: "socketio",
                protocol: Protocol::SocketIo,
                channel: args.room,
            };
            run::fanout(&target, &args.urls, Publish::SocketIo, false, &args.load).await
        }
        Command::BaselineServer(args) => baseline::serve(args).await,
        Command::Worker => worker::child_main().await,
        Command::Scale(args) => scale::run(args).await,
        Command::ScaleWorker => scale::worker_main().await,
    }
}
