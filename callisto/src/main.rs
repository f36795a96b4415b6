//! # callisto — the one binary
//!
//! A thin CLI over the service crates: it layers configuration, opens the backends, and runs a
//! service until SIGINT or SIGTERM.
//!
//! ## Layout
//! - `main.rs`: the command line and the per-subcommand wiring.
//! - [`backends`]: opens the embedded stand-ins (log, schema registry) under the data dir.

mod backends;

use std::path::PathBuf;

use anyhow::Context;
use callisto_core::config::Settings;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "callisto", version, about = "Kafka-style streaming and CQRS backbone for person data")]
struct Cli {
    /// TOML configuration file; `CALLISTO__SECTION__KEY` environment variables override it.
    #[arg(long, global = true, env = "CALLISTO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the command API: validate person commands and append them to the event log.
    Writer(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (overrides http.listen), e.g. 127.0.0.1:8080; port 0 picks one.
    #[arg(long)]
    listen: Option<String>,
    /// Directory for embedded state (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl ServeArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(listen) = &self.listen {
            out.push(("http.listen", listen.clone()));
        }
        if let Some(dir) = &self.data_dir {
            out.push(("storage.data_dir", dir.display().to_string()));
        }
        out
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Writer(args) => {
                let settings = Settings::load(cli.config.as_deref(), &args.overrides())?;
                callisto_core::telemetry::init_tracing(&settings.telemetry);
                run_writer(settings).await
            }
        }
    })
}

async fn run_writer(settings: Settings) -> anyhow::Result<()> {
    let embedded = backends::Embedded::open(&settings)?;
    let state = callisto_writers::state(&settings, embedded.log.clone(), embedded.codec.clone()).await?;
    let app = callisto_writers::build(&settings, state);
    serve(&settings, app, "writer").await
}

async fn serve(settings: &Settings, app: callisto_core::http::Router, service: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&settings.http.listen)
        .await
        .with_context(|| format!("binding {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, service, data_dir = %settings.storage.data_dir.display(), "listening");
    // A fixed, parseable line for scripts and tests that start with port 0.
    println!("callisto {service} listening on http://{addr}");
    callisto_core::http::serve(listener, app, shutdown_signal()).await?;
    tracing::info!(service, "stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
