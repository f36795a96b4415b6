//! The `callisto` command line: parses flags, layers configuration, and hands over to
//! [`callisto::services`].

use std::path::PathBuf;

use anyhow::Context;
use callisto_core::config::Settings;
use clap::{Args, Parser, Subcommand};

/// mimalloc returns freed memory to the OS and does not grow per-thread arenas the way glibc's
/// allocator does under tokio's blocking pool, which keeps RSS flat under long backlogs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the whole backbone in one process: writer, projectors and query API on one port,
    /// with embedded stand-ins for Kafka, MongoDB and Elasticsearch.
    Dev(ServeArgs),
    /// Run the command API: validate person commands and append them to the event log.
    Writer(ServeArgs),
    /// Run the projectors: build the read models and search index from the event log.
    Projector(ServeArgs),
    /// Run the query API: persons, timelines and search from the read models.
    QueryApi(ServeArgs),
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
        let (Command::Dev(args) | Command::Writer(args) | Command::Projector(args) | Command::QueryApi(args)) =
            &cli.command;
        let settings = Settings::load(cli.config.as_deref(), &args.overrides())?;
        callisto_core::telemetry::init_tracing(&settings.telemetry);
        let shutdown = callisto::services::shutdown_signal();
        match cli.command {
            Command::Dev(_) => callisto::services::run_dev(settings, shutdown).await,
            Command::Writer(_) => callisto::services::run_writer(settings, shutdown).await,
            Command::Projector(_) => callisto::services::run_projector(settings, shutdown).await,
            Command::QueryApi(_) => callisto::services::run_query_api(settings, shutdown).await,
        }
    })
}
