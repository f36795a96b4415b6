//! The `callisto` command line: parses flags, layers configuration, and hands over to
//! [`callisto::services`].

use std::path::PathBuf;

use anyhow::Context;
use callisto_core::config::Settings;
use clap::{Args, Parser, Subcommand};

/// jemalloc, with Callisto's settings (`callisto_core::allocator`, applied first in `main`):
/// freed memory goes back to the OS from a background thread within about a second, which keeps
/// RSS flat under long backlogs without costing the threads that do the work.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "callisto", version, about = "Kafka-style streaming and CQRS backbone for person data")]
struct Cli {
    /// TOML configuration file; `CALLISTO__SECTION__KEY` environment variables override it.
    #[arg(long, global = true, env = "CALLISTO_CONFIG")]
    config: Option<PathBuf>,
    /// API key the batch commands present to a running `callisto dev`; its dev key by default.
    #[arg(long, global = true, env = "CALLISTO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole backbone in one process: writer, projectors and query API on one port,
    /// with embedded stand-ins for Kafka, MongoDB and Elasticsearch.
    Dev(DevArgs),
    /// Run the command API: validate person commands and append them to the event log.
    Writer(ServeArgs),
    /// Run the projectors: build the read models and search index from the event log.
    Projector(ServeArgs),
    /// Run the query API: persons, timelines and search from the read models.
    QueryApi(ServeArgs),
    /// Rebuild the read models into a new generation with no downtime, then switch readers to it
    /// (blue/green). Works on a stopped data dir, through a running `callisto dev` on it, or on
    /// MongoDB and Elasticsearch while their projectors and query APIs keep running.
    Replay(ReplayArgs),
    /// Inspect and re-drive the dead-letter topic. Works on a stopped data dir, or through a
    /// running `callisto dev` on it.
    Dlq(DlqArgs),
    /// Export a topic's events for batch jobs: JSON Lines or an Avro container file, in
    /// partition order, then offset order within each partition.
    Export(ExportArgs),
    /// Manage API keys: create (the key is shown once), list, revoke. Running services pick up
    /// changes within seconds.
    Keys(KeysArgs),
    /// Personal data: rotate the master key that wraps data keys, and compact the embedded
    /// stores so erased data leaves the disk now.
    Privacy(PrivacyArgs),
}

#[derive(Debug, Args)]
struct PrivacyArgs {
    /// Directory of the embedded data (overrides storage.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: PrivacyCommand,
}

#[derive(Debug, Subcommand)]
enum PrivacyCommand {
    /// Write a fresh master key (64 hex digits, mode 0600) to FILE, for a rotation: point
    /// privacy.master_key_file at it, list the old one in privacy.previous_master_key_files,
    /// restart, then run `rewrap`.
    NewMasterKey { file: PathBuf },
    /// Re-wrap every data key still wrapped by a previous master key with the current one.
    /// Events are not touched: the data keys themselves do not change.
    Rewrap,
    /// Compact the embedded read models and key store (through a running `callisto dev`), so
    /// what erasures deleted is gone from the files now.
    Compact,
}

#[derive(Debug, Args)]
struct KeysArgs {
    /// Directory of the embedded data, whose api-keys.json is managed (overrides
    /// storage.data_dir); auth.api_keys_file wins when set.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print it, the one time it is shown.
    Create {
        /// What the key is for, e.g. the enrolled source's name.
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: persons:write, persons:read, persons:erase, search, admin,
        /// metrics.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<callisto_core::auth::Scope>,
        /// When the key stops working, RFC 3339.
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// The key's own rate limit per budget, requests per second (replaces the defaults).
        #[arg(long)]
        rate_per_second: Option<u32>,
        /// The key's own burst per budget; twice the rate when absent.
        #[arg(long, requires = "rate_per_second")]
        burst: Option<u32>,
        /// Print JSON (with the key) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every key, without its secret.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; services refuse it within seconds.
    Revoke { id: String },
}

#[derive(Debug, Args)]
struct DevArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Use an in-process Kafka mock cluster of N brokers as the event log.
    #[arg(long, value_name = "N")]
    kafka_mock: Option<u32>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (overrides http.listen), e.g. 127.0.0.1:8080; port 0 picks one.
    #[arg(long)]
    listen: Option<String>,
    /// Directory for embedded state (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides kafka.brokers); the embedded log when absent.
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Serve without authentication: every route open to anyone who can reach the port. Only
    /// for experiments without real data; logged as a warning at every start.
    #[arg(long)]
    insecure_no_auth: bool,
    /// This site's role (overrides server.role): `primary` takes commands, `standby` refuses
    /// them naming server.primary_url and serves reads.
    #[arg(long, value_parser = ["primary", "standby"])]
    role: Option<String>,
}

#[derive(Debug, Args)]
struct DlqArgs {
    /// Directory of the embedded data (overrides storage.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter, with counts by projection and error.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: original bytes, headers, error and decoded payload.
    Show { id: String },
    /// Re-drive dead letters through their projections after a fix.
    Replay {
        /// Dead-letter ids (`partition:offset`), as `list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Directory of the embedded data (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Rebuild from this offset or RFC 3339 time instead of from offset 0.
    #[arg(long, conflicts_with_all = ["rollback", "drop_old"])]
    from: Option<callisto_core::replay::Position>,
    /// Switch readers back to the previous generation.
    #[arg(long, conflicts_with = "drop_old")]
    rollback: bool,
    /// Delete the previous generation, kept since the last switch.
    #[arg(long)]
    drop_old: bool,
    /// No progress bar; print only a JSON summary at the end.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Directory of the embedded log (overrides storage.data_dir). The data dir must not be in
    /// use by a running callisto.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topic to export (overrides log.topic).
    #[arg(long)]
    topic: Option<String>,
    /// Partitions to export, e.g. 0,3,7; all when absent.
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<u32>>,
    /// Start, inclusive: an offset (applied to every partition) or an RFC 3339 time.
    #[arg(long)]
    from: Option<callisto_core::replay::Position>,
    /// End, exclusive: an offset or an RFC 3339 time; the log head when absent.
    #[arg(long)]
    to: Option<callisto_core::replay::Position>,
    #[arg(long, value_enum, default_value_t = callisto::export::Format::Jsonl)]
    format: callisto::export::Format,
    /// Personal fields opened (`clear`), or left sealed as in the log (`sealed`), so that a later
    /// erasure makes them unreadable in this file too.
    #[arg(long, value_enum, default_value_t = callisto::export::PersonalData::Clear)]
    personal_data: callisto::export::PersonalData,
    /// Output file; standard output when absent or `-`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// No progress bar; print only a JSON summary (on stderr) at the end.
    #[arg(long)]
    quiet: bool,
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
        if let Some(brokers) = &self.kafka_brokers {
            out.push(("kafka.brokers", brokers.clone()));
        }
        if let Some(role) = &self.role {
            out.push(("server.role", role.clone()));
        }
        out
    }
}

fn main() -> anyhow::Result<()> {
    if let Err(e) = callisto_core::allocator::apply_settings() {
        eprintln!("callisto: running with jemalloc's default settings, as restarting with Callisto's failed: {e}");
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        if let Command::Export(args) = &cli.command {
            return export(cli.config.as_deref(), args, cli.api_key.as_deref()).await;
        }
        if let Command::Replay(args) = &cli.command {
            return replay(cli.config.as_deref(), args, cli.api_key.as_deref()).await;
        }
        if let Command::Dlq(args) = &cli.command {
            return dlq(cli.config.as_deref(), args, cli.api_key.as_deref()).await;
        }
        if let Command::Keys(args) = &cli.command {
            return keys(cli.config.as_deref(), args);
        }
        if let Command::Privacy(args) = &cli.command {
            return privacy(cli.config.as_deref(), args, cli.api_key.as_deref()).await;
        }
        let (Command::Dev(DevArgs { serve: args, .. })
        | Command::Writer(args)
        | Command::Projector(args)
        | Command::QueryApi(args)) = &cli.command
        else {
            unreachable!("batch commands returned above")
        };
        let settings = Settings::load(cli.config.as_deref(), &args.overrides())?;
        let service = match &cli.command {
            Command::Dev(_) => "callisto-dev",
            Command::Writer(_) => "callisto-writer",
            Command::Projector(_) => "callisto-projector",
            _ => "callisto-query-api",
        };
        let _tracing = callisto_core::telemetry::init_tracing(&settings.telemetry, service)?;
        let security = callisto::services::Security { insecure_no_auth: args.insecure_no_auth };
        let shutdown = callisto::services::shutdown_signal();
        match cli.command {
            Command::Dev(DevArgs { kafka_mock, .. }) => {
                callisto::services::run_dev(settings, kafka_mock, security, shutdown).await
            }
            Command::Writer(_) => callisto::services::run_writer(settings, security, shutdown).await,
            Command::Projector(_) => callisto::services::run_projector(settings, security, shutdown).await,
            Command::QueryApi(_) => callisto::services::run_query_api(settings, security, shutdown).await,
            Command::Export(_) | Command::Replay(_) | Command::Dlq(_) | Command::Keys(_) | Command::Privacy(_) => {
                unreachable!("batch commands returned above")
            }
        }
    })
}

async fn export(config: Option<&std::path::Path>, args: &ExportArgs, api_key: Option<&str>) -> anyhow::Result<()> {
    let topic = args.topic.iter().map(|t| ("log.topic", t.clone()));
    let settings = batch_settings(config, &args.data_dir, topic)?;
    let selection = callisto::export::Selection {
        partitions: args.partitions.clone(),
        from: args.from,
        to: args.to,
        format: args.format,
        personal_data: args.personal_data,
    };
    let output = args.output.clone().filter(|p| p.as_os_str() != "-");
    let summary = callisto::admin::export(&settings, &selection, output, !args.quiet, api_key).await?;
    if args.quiet {
        eprintln!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "exported {} events of topic {:?} ({} undecodable, {} bytes)",
            summary.records, summary.topic, summary.undecodable, summary.bytes
        );
    }
    Ok(())
}

/// Settings for a batch command: its data dir, and only warnings logged (they would interleave
/// with the progress bar).
fn batch_settings(
    config: Option<&std::path::Path>,
    data_dir: &Option<PathBuf>,
    more: impl IntoIterator<Item = (&'static str, String)>,
) -> anyhow::Result<Settings> {
    let mut overrides: Vec<(&str, String)> = more.into_iter().collect();
    if let Some(dir) = data_dir {
        overrides.push(("storage.data_dir", dir.display().to_string()));
    }
    let mut settings = Settings::load(config, &overrides)?;
    settings.telemetry.log_level = "warn,audit=info".into();
    // A batch job's spans would be one per batch of a whole topic; traces are for services.
    settings.telemetry.otlp_endpoint = None;
    callisto_core::telemetry::init_tracing(&settings.telemetry, "callisto-batch")?;
    Ok(settings)
}

async fn replay(config: Option<&std::path::Path>, args: &ReplayArgs, api_key: Option<&str>) -> anyhow::Result<()> {
    use callisto::replay::Action;
    let settings = batch_settings(config, &args.data_dir, [])?;
    let action = if args.rollback {
        Action::Rollback
    } else if args.drop_old {
        Action::DropOld
    } else {
        Action::Rebuild { from: args.from }
    };
    let summary = callisto::admin::replay(&settings, action, !args.quiet, api_key).await?;
    if args.quiet {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!("{}: live generation {}, previous {:?}", summary.action, summary.live, summary.previous);
        if let (Some(events), Some(rate)) = (summary.events, summary.events_per_second) {
            eprintln!("rebuilt {events} events at {rate:.0} events/s");
        }
    }
    Ok(())
}

async fn dlq(config: Option<&std::path::Path>, args: &DlqArgs, api_key: Option<&str>) -> anyhow::Result<()> {
    use callisto::admin::DlqCommand as Request;
    let settings = batch_settings(config, &args.data_dir, [])?;
    let request = match &args.command {
        DlqCommand::List { .. } => Request::List,
        DlqCommand::Show { id } => Request::Show(id.clone()),
        DlqCommand::Replay { ids, all } => Request::Replay((!*all).then(|| ids.clone())),
        DlqCommand::Purge { yes } => {
            if !*yes {
                let listing = callisto::admin::dlq(&settings, Request::List, api_key).await?;
                let count = listing["entries"].as_array().map_or(0, Vec::len);
                eprint!("delete all {count} dead letters? type `purge` to confirm: ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                anyhow::ensure!(answer.trim() == "purge", "not confirmed; nothing deleted");
            }
            Request::Purge
        }
    };
    let answer = callisto::admin::dlq(&settings, request, api_key).await?;
    match &args.command {
        DlqCommand::List { json: false } => {
            println!("{:<8} {:<10} {:<6} {:<24} error", "id", "projection", "count", "source");
            for count in answer["counts"].as_array().into_iter().flatten() {
                println!(
                    "{:<8} {:<10} {:<6} {:<24} {}",
                    "*",
                    count["projection"].as_str().unwrap_or(""),
                    count["count"],
                    "",
                    count["error"].as_str().unwrap_or("")
                );
            }
            for entry in answer["entries"].as_array().into_iter().flatten() {
                let error = entry["error"].as_str().unwrap_or("").lines().next().unwrap_or("");
                println!(
                    "{:<8} {:<10} {:<6} {:<24} {error}",
                    entry["id"].as_str().unwrap_or(""),
                    entry["projection"].as_str().unwrap_or(""),
                    "",
                    entry["source"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&answer)?),
    }
    Ok(())
}

async fn privacy(config: Option<&std::path::Path>, args: &PrivacyArgs, api_key: Option<&str>) -> anyhow::Result<()> {
    let settings = batch_settings(config, &args.data_dir, [])?;
    match &args.command {
        PrivacyCommand::NewMasterKey { file } => {
            callisto_core::privacy::write_new_master_key(file)
                .with_context(|| format!("writing a new master key to {}", file.display()))?;
            eprintln!("wrote a new master key to {}; keep it as safe as the old one", file.display());
        }
        PrivacyCommand::Rewrap => {
            let keyring = callisto::backends::open_keyring(&settings).await?;
            let rewrapped = keyring.rewrap_all().await?;
            eprintln!("re-wrapped {rewrapped} data keys with master key {}", keyring.master_key_id());
        }
        PrivacyCommand::Compact => {
            let compacted = callisto::admin::compact(&settings, api_key).await?;
            println!("{}", serde_json::to_string(&compacted)?);
        }
    }
    Ok(())
}

fn keys(config: Option<&std::path::Path>, args: &KeysArgs) -> anyhow::Result<()> {
    let settings = batch_settings(config, &args.data_dir, [])?;
    match &args.command {
        KeysCommand::Create { name, scopes, expires_at, rate_per_second, burst, json } => {
            let rate_limit = rate_per_second.map(|per_second| callisto_core::config::Limit {
                per_second,
                burst: burst.unwrap_or(per_second.saturating_mul(2)),
            });
            let created = callisto::keys::create(
                &settings,
                name.clone(),
                scopes.iter().copied().collect(),
                *expires_at,
                rate_limit,
            )?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"key": created.key, "id": created.stored.id, "scopes": created.stored.scopes})
                );
            } else {
                eprintln!("created API key {} ({name}); it is shown this once:", created.stored.id);
                println!("{}", created.key);
            }
        }
        KeysCommand::List { json } => {
            let keys = callisto::keys::list(&settings)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!("{:<18} {:<24} {:<8} scopes", "id", "name", "usable");
                for key in &keys {
                    let scopes: Vec<&str> =
                        key["scopes"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
                    println!(
                        "{:<18} {:<24} {:<8} {}",
                        key["id"].as_str().unwrap_or(""),
                        key["name"].as_str().unwrap_or(""),
                        key["usable"],
                        scopes.join(",")
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let revoked = callisto::keys::revoke(&settings, id)?;
            eprintln!("revoked API key {} ({})", revoked.id, revoked.name);
        }
    }
    Ok(())
}
