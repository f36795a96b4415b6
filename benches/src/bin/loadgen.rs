//! Load generator for Callisto.
//!
//! `loadgen http` starts `callisto dev` (or targets `--url`) and measures, in one run:
//! the no-op endpoint (`GET /healthz`, the same server stack) as the baseline; command
//! throughput at saturation and latency at half of it, against the no-op endpoint on the same
//! open-loop schedule; freshness (202 → visible) for person
//! reads and search at a fixed command rate; query throughput; and the server's peak RSS.
//!
//! `loadgen rebuild` fills an embedded log with N events and measures a rebuild of both read
//! models from offset 0 against raw log reads and raw bulk writes into the same stores.
//!
//! Open-loop phases time each request from its scheduled start, so a slow server cannot hide
//! latency by slowing the client down (no coordinated omission).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use callisto_benches::fixtures;
use callisto_benches::stats::{Row, histogram, ms, print_table, record};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(about = "Drives Callisto and reports figures against same-run baselines")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP load against `callisto dev`.
    Http(HttpArgs),
    /// Rebuild of the read models from an embedded log of N events.
    Rebuild(RebuildArgs),
    /// What the embedded log's group commits write and cost per append, against appending the
    /// same records to a plain file with one `fdatasync` per commit.
    LogCommits(LogCommitsArgs),
    /// The rebuild half of `rebuild`, run by it in a separate process.
    #[command(hide = true)]
    RebuildChild {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        total: u64,
        #[arg(long, value_enum)]
        projections: Projections,
        /// Where under `dir` the read models go, so several rebuilds can run over one log.
        #[arg(long, default_value = ".")]
        models: PathBuf,
    },
}

#[derive(Args)]
struct HttpArgs {
    /// The callisto binary to start; ignored with --url.
    #[arg(long, default_value = "target/release/callisto")]
    callisto: PathBuf,
    /// A running server instead (then no RSS figure).
    #[arg(long)]
    url: Option<String>,
    /// API key for --url (needs persons:write, persons:read and search); the started server's
    /// dev key otherwise.
    #[arg(long, env = "CALLISTO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Concurrent connections in closed-loop phases.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Connections in a second command phase at saturation: how the command path scales with
    /// concurrency.
    #[arg(long, default_value_t = 256)]
    wide_connections: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Commands per second in the freshness phase.
    #[arg(long, default_value_t = 2000)]
    freshness_rate: u64,
    /// Commands per second in the half-saturation phase, instead of half the rate measured at
    /// saturation: to compare builds' latency at the same rate.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    half_rate: Option<u64>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LogCommitsArgs {
    /// Rounds of concurrent appends.
    #[arg(long, default_value_t = 3000)]
    rounds: u64,
    /// Appends sent at once in each round: about what one group commit holds under the HTTP
    /// load (`callisto_log_group_commit_size`).
    #[arg(long, default_value_t = 11)]
    appends: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    partitions: u32,
    /// Where the log and the file are written (a fresh directory under it, removed after).
    #[arg(long, default_value = "target")]
    dir: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Projections {
    Both,
    Documents,
    Search,
}

#[derive(Args)]
struct RebuildArgs {
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Which read models to rebuild: both (what `callisto dev` runs), or one alone to see
    /// where the time goes.
    #[arg(long, value_enum, default_value_t = Projections::Both)]
    projections: Projections,
    /// Events per person in the log: a registration, then notes. At 1 every event registers
    /// someone new, as the HTTP command phases do, which costs the read models several times
    /// what a note does.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    events_per_person: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The same allocator as the `callisto` binary, so in-process figures match the server's.
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// With the `dhat-heap` feature, every allocation is tracked so the rebuild child can write a
/// heap profile (what is live at the peak, and by which call stack).
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn main() -> anyhow::Result<()> {
    // The allocator settings `callisto` runs with, inherited by the rebuild child.
    #[cfg(not(feature = "dhat-heap"))]
    callisto_core::allocator::apply_settings()?;
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (rows, json) = match cli.mode {
        Mode::Http(args) => {
            let json = args.json.clone();
            (runtime.block_on(http(args))?, json)
        }
        Mode::Rebuild(args) => {
            let json = args.json.clone();
            (runtime.block_on(rebuild::run(args.events, args.events_per_person, args.projections))?, json)
        }
        Mode::LogCommits(args) => {
            let json = args.json.clone();
            (runtime.block_on(log_commits::run(&args))?, json)
        }
        Mode::RebuildChild { dir, total, projections, models } => {
            #[cfg(feature = "dhat-heap")]
            let _profiler = dhat::Profiler::new_heap();
            let rows = runtime.block_on(rebuild::child(&dir, &models, total, projections))?;
            println!("{}", serde_json::to_string(&rows)?);
            return Ok(());
        }
    };
    print_table(&rows);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A `callisto dev` child process on a fresh data dir, killed on drop.
struct Server {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(binary: &PathBuf) -> anyhow::Result<Server> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(binary)
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CALLISTO__TELEMETRY__LOG_LEVEL", "warn")
        // Authentication stays on; the budgets are raised so the figures measure the server,
        // not the rate limiter.
        .envs(["COMMANDS", "READS", "SEARCH"].iter().flat_map(|budget| {
            [
                (format!("CALLISTO__AUTH__LIMITS__{budget}__PER_SECOND"), "10000000"),
                (format!("CALLISTO__AUTH__LIMITS__{budget}__BURST"), "10000000"),
            ]
        }))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!("starting {} (build it with `cargo build --release -p callisto`)", binary.display())
        })?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let base = line.trim().rsplit(' ').next().unwrap_or_default().to_owned();
    if !base.starts_with("http://") {
        bail!("unexpected first line from callisto: {line:?}");
    }
    Ok(Server { child, base, dir })
}

/// Waits until every projection has applied the whole log, by the server's
/// `callisto_projection_lag` gauges (sampled each second); returns how long that took. `None`
/// when the metrics cannot be read (a key without the `metrics` scope) or after two minutes.
async fn wait_for_projections(client: &reqwest::Client, base: &str) -> Option<f64> {
    let started = Instant::now();
    // A gauge sampled before the last command was appended would read 0 too early.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    while started.elapsed() < Duration::from_secs(120) {
        let response = client.get(format!("{base}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            eprintln!("cannot read {base}/metrics ({}); not waiting for the projections", response.status());
            return None;
        }
        let text = response.text().await.ok()?;
        let lag: f64 = text
            .lines()
            .filter(|line| line.starts_with("callisto_projection_lag{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if lag == 0.0 {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("the projections did not catch up within two minutes");
    None
}

/// Resident set size of `pid` in MiB, from /proc.
fn rss_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What the server has used so far: CPU time in clock ticks and bytes it sent towards the disk,
/// for the whole process (threads that have exited included) and for its threads by the group
/// their name puts them in (see [`ServerUsage::THREAD_GROUPS`]).
struct ServerUsage {
    process: Usage,
    groups: Vec<Usage>,
}

/// One thread's, group's or process's share.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_ticks: u64,
    /// `write_bytes` of `/proc/…/io`: what its writes dirtied in the page cache or sent to the
    /// disk, whether `fsync` or the kernel's writeback later flushed it. Zero where the kernel
    /// does not account I/O per task.
    written: u64,
}

impl Usage {
    fn read(dir: &std::path::Path) -> Option<(String, Self)> {
        let (name, cpu_ticks) = cpu_ticks(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
        let written = std::fs::read_to_string(dir.join("io")).ok().as_deref().and_then(write_bytes).unwrap_or(0);
        Some((name, Self { cpu_ticks, written }))
    }

    fn add(&mut self, other: Self) {
        self.cpu_ticks += other.cpu_ticks;
        self.written += other.written;
    }

    /// What `self` holds beyond `less` (an earlier reading, or a part of it).
    fn saturating_sub(self, less: Self) -> Self {
        Self {
            cpu_ticks: self.cpu_ticks.saturating_sub(less.cpu_ticks),
            written: self.written.saturating_sub(less.written),
        }
    }
}

impl ServerUsage {
    /// Thread names (as the kernel keeps them, cut to 15 bytes) and what they do; the rest of
    /// the process's time goes to "other threads".
    const THREAD_GROUPS: [(&'static str, &'static str); 5] = [
        ("tokio-rt-worker", "async runtime (HTTP, handlers, projectors)"),
        ("callisto-log-wr", "log writer"),
        ("callisto-log-fl", "log flusher"),
        ("callisto-docume", "documents writer"),
        ("callisto-key-wr", "data-key writer"),
    ];

    fn read(pid: u32) -> Option<Self> {
        let process = Usage::read(std::path::Path::new(&format!("/proc/{pid}")))?.1;
        let mut groups = vec![Usage::default(); Self::THREAD_GROUPS.len()];
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            // A thread may exit between listing and reading: its share counts under the process.
            let Some((name, usage)) = Usage::read(&task.path()) else { continue };
            if let Some(group) = Self::THREAD_GROUPS.iter().position(|(prefix, _)| name == *prefix) {
                groups[group].add(usage);
            }
        }
        Some(Self { process, groups })
    }

    fn since(&self, before: &Self) -> Self {
        let groups = self.groups.iter().zip(&before.groups).map(|(now, then)| now.saturating_sub(*then)).collect();
        Self { process: self.process.saturating_sub(before.process), groups }
    }

    /// The server's CPU per command over a phase that ran `commands`, in µs, and the bytes it
    /// wrote per command, in KiB: in all, then by thread group. The writes show what each store
    /// writes for a command against the few hundred bytes of its event.
    fn per_command_rows(&self, commands: f64) -> Vec<Row> {
        let tick_us = 1e6 / rustix::param::clock_ticks_per_second() as f64;
        let commands = commands.max(1.0);
        let mut rows =
            self.rows("server CPU per command at saturation", "µs", |u| u.cpu_ticks as f64 * tick_us / commands);
        rows.extend(
            self.rows("server writes per command at saturation", "KiB", |u| u.written as f64 / 1024.0 / commands),
        );
        rows
    }

    /// `figure` for the process, each thread group and the threads in none.
    fn rows(&self, figure: &str, unit: &str, value: impl Fn(&Usage) -> f64) -> Vec<Row> {
        let mut rows = vec![Row::new(figure, value(&self.process), unit)];
        let mut grouped = Usage::default();
        for ((_, group), usage) in Self::THREAD_GROUPS.iter().zip(&self.groups) {
            rows.push(Row::new(format!("{figure}: {group}"), value(usage), unit));
            grouped.add(*usage);
        }
        let other = self.process.saturating_sub(grouped);
        rows.push(Row::new(format!("{figure}: other threads (search index, exited ones)"), value(&other), unit));
        rows
    }
}

/// What a command phase costs the machine besides the server: the load generator's own CPU,
/// which shares the cores, and the time the cores sat idle (idle and I/O wait in
/// `/proc/stat`), both in clock ticks. With the server's share they make up the cores' time.
#[derive(Clone, Copy)]
struct Beside {
    load_generator: u64,
    idle: u64,
}

impl Beside {
    fn read() -> Option<Self> {
        let load_generator = Usage::read(std::path::Path::new("/proc/self"))?.1.cpu_ticks;
        let idle = idle_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        Some(Self { load_generator, idle })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            load_generator: self.load_generator.saturating_sub(before.load_generator),
            idle: self.idle.saturating_sub(before.idle),
        }
    }

    /// Each share per command over a phase that ran `commands`, in µs of one core.
    fn per_command_rows(&self, commands: f64) -> Vec<Row> {
        let tick_us = 1e6 / rustix::param::clock_ticks_per_second() as f64;
        let per_command = |ticks: u64| ticks as f64 * tick_us / commands.max(1.0);
        vec![
            Row::new("load generator CPU per command at saturation", per_command(self.load_generator), "µs"),
            Row::new("idle CPU per command at saturation (all cores)", per_command(self.idle), "µs"),
        ]
    }
}

/// The idle and I/O-wait clock ticks of all cores together, from the `cpu` line of `/proc/stat`.
fn idle_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<u64> =
        stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().map(|f| f.parse().ok()).collect::<Option<_>>()?;
    Some(fields.get(3)? + fields.get(4)?)
}

/// The `write_bytes` field of a `/proc/…/io` file.
fn write_bytes(io: &str) -> Option<u64> {
    io.lines().find_map(|line| line.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// A thread's or process's name and its user + system CPU time in clock ticks, from its
/// `/proc/…/stat` line.
fn cpu_ticks(stat: &str) -> Option<(String, u64)> {
    // The name sits in parentheses and may hold spaces; the fields after it are counted from
    // the state, the first: utime is the 12th, stime the 13th.
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some((name, utime + stime))
}

/// Result of one phase: requests per second and latency histogram (µs).
struct Phase {
    throughput: f64,
    latency: Histogram<u64>,
    errors: u64,
}

/// `connections` workers send back-to-back requests for `seconds`.
async fn closed_loop<F, Fut>(connections: usize, seconds: u64, request: F) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let merged = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (request, counter, errors, merged) = (request.clone(), counter.clone(), errors.clone(), merged.clone());
            tokio::spawn(async move {
                let mut local = histogram();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if request(n).await {
                        record(&mut local, t.elapsed());
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                merged.lock().await.add(&local).expect("same bounds");
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let latency = Arc::try_unwrap(merged).expect("workers done").into_inner();
    Phase { throughput: latency.len() as f64 / elapsed, latency, errors: errors.load(Ordering::Relaxed) }
}

/// Requests started at a fixed `rate` for `seconds`, each timed from its scheduled start.
async fn open_loop<F, Fut>(rate: u64, seconds: u64, request: F) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let request = Arc::new(request);
    let merged = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let scheduled = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled).await;
        let (request, merged, errors) = (request.clone(), merged.clone(), errors.clone());
        tasks.spawn(async move {
            if request(n).await {
                let elapsed = tokio::time::Instant::now() - scheduled;
                record(&mut *merged.lock().await, elapsed);
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let latency = Arc::try_unwrap(merged).expect("tasks done").into_inner();
    Phase { throughput: latency.len() as f64 / elapsed, latency, errors: errors.load(Ordering::Relaxed) }
}

fn accepted(status: reqwest::StatusCode) -> bool {
    status.is_success()
}

async fn http(args: HttpArgs) -> anyhow::Result<Vec<Row>> {
    let server = match &args.url {
        Some(_) => None,
        None => Some(spawn_server(&args.callisto)?),
    };
    let base = args.url.clone().or_else(|| server.as_ref().map(|s| s.base.clone())).expect("a target");
    let pid = server.as_ref().map(|s| s.child.id());
    let key = match (&args.api_key, &server) {
        (Some(key), _) => key.clone(),
        (None, Some(server)) => std::fs::read_to_string(server.dir.path().join("dev-api-key"))
            .context("reading the started server's dev key")?
            .trim()
            .to_owned(),
        (None, None) => bail!("--url needs --api-key (or CALLISTO_API_KEY)"),
    };
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("ApiKey {key}"))?;
    auth.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).default_headers(headers).build()?;
    let peak_rss = Arc::new(Mutex::new(0f64));
    let sampler = pid.map(|pid| {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some(rss) = rss_mib(pid, "VmRSS:") {
                    let mut p = peak.lock().await;
                    *p = p.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let (c, s) = (args.connections, args.seconds);
    let mut rows = Vec::new();

    // Seed persons for commands on existing ids and for queries.
    let mut ids = Vec::new();
    for i in 0..200 {
        let body = json!({"given_name": format!("Seed{i}"), "family_name": "Load", "tags": [if i % 2 == 0 { "even" } else { "odd" }]});
        let answer: Value = client.post(format!("{base}/v1/persons")).json(&body).send().await?.json().await?;
        ids.push(answer["person_id"].as_str().context("person_id")?.to_owned());
    }
    let ids = Arc::new(ids);

    // The no-op endpoint: the same server stack with nothing behind it.
    let noop_requests = |client: reqwest::Client, url: String| {
        move |_: u64| {
            let request = client.get(&url).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        }
    };
    eprintln!("phase: no-op baseline");
    let noop = closed_loop(c, s, noop_requests(client.clone(), format!("{base}/healthz"))).await;
    // Registrations with fresh names and emails, back to back.
    let registrations = |client: reqwest::Client, base: String| {
        move |n: u64| {
            let body = json!({"given_name": format!("Load{n}"), "family_name": "Test", "email": format!("load{n}@example.org")});
            let request = client.post(format!("{base}/v1/persons")).json(&body).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        }
    };
    eprintln!("phase: commands at saturation");
    let usage_before = pid.and_then(ServerUsage::read);
    let beside_before = Beside::read();
    let commands = closed_loop(c, s, registrations(client.clone(), base.clone())).await;
    let used = usage_before.zip(pid.and_then(ServerUsage::read)).map(|(before, after)| after.since(&before));
    let beside = beside_before.zip(Beside::read()).map(|(before, after)| after.since(&before));
    let wide_c = args.wide_connections;
    eprintln!("phase: commands at saturation, {wide_c} connections");
    let wide = closed_loop(wide_c, s, registrations(client.clone(), base.clone())).await;
    rows.push(Row::new("no-op endpoint throughput (GET /healthz)", noop.throughput, "req/s"));
    rows.push(
        Row::new("command throughput at saturation (POST /v1/persons)", commands.throughput, "req/s")
            .against("no-op req/s", noop.throughput)
            .ratio_at_least(0.25),
    );
    rows.push(
        Row::new("command p99 at saturation", ms(&commands.latency, 0.99), "ms")
            .against("no-op p99 ms", ms(&noop.latency, 0.99)),
    );
    let commands_run = commands.throughput * s as f64;
    if let Some(used) = used {
        rows.extend(used.per_command_rows(commands_run));
    }
    if let Some(beside) = beside {
        rows.extend(beside.per_command_rows(commands_run));
    }
    rows.push(
        Row::new(format!("command throughput at saturation, {wide_c} connections"), wide.throughput, "req/s")
            .against(format!("{c} connections req/s"), commands.throughput),
    );
    rows.push(
        Row::new(format!("command p99 at saturation, {wide_c} connections"), ms(&wide.latency, 0.99), "ms")
            .against(format!("{c} connections p99 ms"), ms(&commands.latency, 0.99)),
    );

    // The saturation phases outran the projectors, which run below the API's priority; the
    // phases after this one measure latency and freshness from a caught-up backbone.
    let catch_up = wait_for_projections(&client, &base).await;
    if let Some(seconds) = catch_up {
        rows.push(Row::new("projections caught up after the saturation phases in", seconds, "s"));
    }

    let half_rate = args.half_rate.unwrap_or((commands.throughput / 2.0).max(1.0) as u64);
    // The baseline for the half-saturation latencies: the no-op endpoint on the same open-loop
    // schedule, so the rows set what the commands cost against what the schedule, the client
    // and the HTTP exchange alone cost at that rate.
    eprintln!("phase: no-op at half saturation (open loop)");
    let noop_half = open_loop(half_rate, s, noop_requests(client.clone(), format!("{base}/healthz"))).await;
    eprintln!("phase: commands at half saturation (open loop)");
    let half = {
        let (client, base) = (client.clone(), base.clone());
        open_loop(half_rate, s, move |n| {
            let body = json!({"given_name": format!("Half{n}"), "family_name": "Test"});
            let request = client.post(format!("{base}/v1/persons")).json(&body).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        })
        .await
    };
    for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")] {
        let mut row =
            Row::new(format!("command {name} at half saturation ({half_rate}/s)"), ms(&half.latency, q), "ms")
                .against(format!("no-op {name} ms, same schedule"), ms(&noop_half.latency, q));
        if name == "p99" {
            row = row.at_most(10.0);
        }
        rows.push(row);
    }

    wait_for_projections(&client, &base).await;
    eprintln!("phase: freshness at {}/s", args.freshness_rate);
    let person_fresh = Arc::new(Mutex::new(histogram()));
    let search_fresh = Arc::new(Mutex::new(histogram()));
    let stale = Arc::new(AtomicU64::new(0));
    let fresh = {
        let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
        let (person_fresh, search_fresh, stale) = (person_fresh.clone(), search_fresh.clone(), stale.clone());
        open_loop(args.freshness_rate, s, move |n| {
            let id = ids[(n % ids.len() as u64) as usize].clone();
            let word = format!("fresh{n}word");
            let callisto_avro::PersonEvent::NoteAdded(filler) = fixtures::note_for(uuid::Uuid::new_v4(), n) else {
                unreachable!("note_for builds notes")
            };
            let request = client
                .post(format!("{base}/v1/persons/{id}/notes"))
                .json(&json!({"text": format!("{word} {}", filler.text)}))
                .send();
            let (client, base) = (client.clone(), base.clone());
            let (person_fresh, search_fresh, stale) = (person_fresh.clone(), search_fresh.clone(), stale.clone());
            async move {
                let Ok(response) = request.await else { return false };
                if !accepted(response.status()) {
                    return false;
                }
                let acked = Instant::now();
                let Ok(body) = response.json::<Value>().await else { return false };
                let token = body["consistency_token"].as_str().unwrap_or_default().to_owned();
                let read =
                    client.get(format!("{base}/v1/persons/{id}")).header("callisto-consistency-token", &token).send();
                if let Ok(r) = read.await {
                    if r.headers().contains_key("callisto-stale") {
                        stale.fetch_add(1, Ordering::Relaxed);
                    }
                    record(&mut *person_fresh.lock().await, acked.elapsed());
                }
                // Search freshness on every tenth command, so the probe does not become the load.
                if n % 10 == 0 {
                    let searched = client.get(format!("{base}/v1/search?q={word}&after={token}")).send().await;
                    if let Ok(r) = searched {
                        if r.headers().contains_key("callisto-stale") {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                        let found = r.json::<Value>().await.ok().and_then(|v| v["total"].as_u64()).unwrap_or(0);
                        if found == 1 {
                            record(&mut *search_fresh.lock().await, acked.elapsed());
                        }
                    }
                }
                true
            }
        })
        .await
    };
    let (person_fresh, search_fresh) = (person_fresh.lock().await.clone(), search_fresh.lock().await.clone());
    rows.push(Row::new(
        format!("freshness phase command rate (target {}/s)", args.freshness_rate),
        fresh.throughput,
        "req/s",
    ));
    rows.push(Row::new("freshness person read p50 (202 -> visible)", ms(&person_fresh, 0.5), "ms"));
    rows.push(Row::new("freshness person read p99 (202 -> visible)", ms(&person_fresh, 0.99), "ms").at_most(25.0));
    rows.push(Row::new("freshness search p50 (202 -> searchable)", ms(&search_fresh, 0.5), "ms"));
    rows.push(Row::new("freshness search p99 (202 -> searchable)", ms(&search_fresh, 0.99), "ms").at_most(1000.0));
    rows.push(Row::new("freshness reads answered stale", stale.load(Ordering::Relaxed) as f64, "reads"));

    eprintln!("phase: queries");
    let get = {
        let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
        closed_loop(c, s, move |n| {
            let id = &ids[(n % ids.len() as u64) as usize];
            let request = client.get(format!("{base}/v1/persons/{id}")).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        })
        .await
    };
    let list = {
        let (client, base) = (client.clone(), base.clone());
        closed_loop(c, s, move |n| {
            let tag = if n % 2 == 0 { "even" } else { "odd" };
            let request = client.get(format!("{base}/v1/persons?tag={tag}&limit=20")).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        })
        .await
    };
    let search = {
        let (client, base) = (client.clone(), base.clone());
        closed_loop(c, s, move |n| {
            let q = ["renewal", "invoice%20AND%20budget", "%22contract%20review%22", "escal*"][(n % 4) as usize];
            let request = client.get(format!("{base}/v1/search?q={q}&limit=10")).send();
            async move { request.await.is_ok_and(|r| accepted(r.status())) }
        })
        .await
    };
    rows.push(
        Row::new("GET person throughput", get.throughput, "req/s")
            .against("no-op req/s", noop.throughput)
            .ratio_at_least(0.50),
    );
    rows.push(
        Row::new("GET person p99", ms(&get.latency, 0.99), "ms").against("no-op p99 ms", ms(&noop.latency, 0.99)),
    );
    rows.push(Row::new("list persons throughput", list.throughput, "req/s").against("no-op req/s", noop.throughput));
    rows.push(Row::new("list persons p99", ms(&list.latency, 0.99), "ms"));
    rows.push(
        Row::new("search throughput (index from this run)", search.throughput, "req/s")
            .against("no-op req/s", noop.throughput),
    );
    rows.push(Row::new("search p99 (index from this run)", ms(&search.latency, 0.99), "ms"));
    let errors = noop.errors
        + commands.errors
        + wide.errors
        + noop_half.errors
        + half.errors
        + fresh.errors
        + get.errors
        + list.errors
        + search.errors;
    rows.push(Row::new("failed requests, all phases", errors as f64, "requests"));

    if let (Some(sampler), Some(pid)) = (sampler, pid) {
        sampler.abort();
        let peak = rss_mib(pid, "VmHWM:").unwrap_or(*peak_rss.lock().await);
        rows.push(Row::new("server peak RSS during the run", peak, "MiB"));
    }
    Ok(rows)
}

/// `loadgen log-commits`: the embedded log's cost per append, in bytes written, CPU and wall
/// time, against the least any durable log must do for the same records: write them once to a
/// file and `fdatasync` it, once per commit of as many records as the log's commits held.
mod log_commits {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::Context as _;
    use callisto_avro::{Codec, EmbeddedRegistry};
    use callisto_benches::fixtures;
    use callisto_benches::stats::Row;
    use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};

    use super::{LogCommitsArgs, Usage};

    const TOPIC: &str = "persons";
    /// The W3C trace context every command's record carries.
    const TRACEPARENT: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// What one side spent over its rounds.
    struct Spent {
        usage: Usage,
        seconds: f64,
        commits: u64,
    }

    fn measure(run: impl FnOnce() -> anyhow::Result<u64>) -> anyhow::Result<Spent> {
        let own = || Usage::read(Path::new("/proc/self")).map(|(_, u)| u).context("reading /proc/self");
        let before = own()?;
        let started = Instant::now();
        let commits = run()?;
        let seconds = started.elapsed().as_secs_f64();
        let after = own()?;
        Ok(Spent { usage: after.saturating_sub(before), seconds, commits })
    }

    pub async fn run(args: &LogCommitsArgs) -> anyhow::Result<Vec<Row>> {
        std::fs::create_dir_all(&args.dir)?;
        let dir = tempfile::tempdir_in(&args.dir)?;
        let codec = Codec::new(Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb"))?), TOPIC)?;
        let requests: Vec<AppendRequest> = (0..args.rounds * args.appends)
            .map(|_| {
                let event = fixtures::registered();
                Ok(AppendRequest {
                    topic: TOPIC.into(),
                    key: event.meta().person_id.to_string().into_bytes(),
                    payload: codec.encode(&event)?,
                    headers: vec![("traceparent".into(), TRACEPARENT.to_vec())],
                    idempotency: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let record_len = |r: &AppendRequest| {
            r.key.len() + r.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + r.payload.len()
        };
        let record_bytes = requests.iter().map(record_len).sum::<usize>() as f64 / requests.len() as f64;

        let log = Arc::new(EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default())?);
        log.ensure_topic(TOPIC, args.partitions).await?;
        let handle = tokio::runtime::Handle::current();
        let appends = args.appends as usize;
        let callisto = tokio::task::block_in_place(|| {
            measure(|| {
                let commits_before = log.commit_count();
                for round in requests.chunks(appends) {
                    handle.block_on(async {
                        let sent = round.iter().map(|r| log.append(r.clone()));
                        for appended in futures::future::join_all(sent).await {
                            appended?;
                        }
                        anyhow::Ok(())
                    })?;
                }
                Ok(log.commit_count() - commits_before)
            })
        })?;
        let per_commit = (requests.len() as f64 / callisto.commits.max(1) as f64).round().max(1.0) as usize;

        // The same records, framed (length, key, header, payload), as many per commit as the
        // log's commits held.
        let file = std::fs::File::create(dir.path().join("append-only"))?;
        let baseline = measure(|| {
            let mut at = 0u64;
            let mut commits = 0;
            for group in requests.chunks(per_commit) {
                let mut frames = Vec::new();
                for r in group {
                    let (name, value) = &r.headers[0];
                    frames.write_all(&(record_len(r) as u32).to_le_bytes())?;
                    for part in [&r.key[..], name.as_bytes(), value, &r.payload] {
                        frames.write_all(part)?;
                    }
                }
                file.write_all_at(&frames, at)?;
                file.sync_data()?;
                at += frames.len() as u64;
                commits += 1;
            }
            Ok(commits)
        })?;

        let tick_us = 1e6 / rustix::param::clock_ticks_per_second() as f64;
        let n = requests.len() as f64;
        let figure = |what: &str| format!("embedded log, {} appends at once: {what}", args.appends);
        Ok(vec![
            Row::new(figure("record size (key, trace header, payload)"), record_bytes, "B"),
            Row::new(figure("appends per group commit"), n / callisto.commits.max(1) as f64, "appends"),
            Row::new(figure("bytes written per append"), callisto.usage.written as f64 / n, "B")
                .against("append-only file B", baseline.usage.written as f64 / n),
            Row::new(figure("CPU per append"), callisto.usage.cpu_ticks as f64 * tick_us / n, "µs")
                .against("append-only file µs", baseline.usage.cpu_ticks as f64 * tick_us / n),
            Row::new(figure("wall time per commit"), callisto.seconds * 1e6 / callisto.commits.max(1) as f64, "µs")
                .against("append-only file µs", baseline.seconds * 1e6 / baseline.commits.max(1) as f64),
        ])
    }
}

mod rebuild {
    //! Rebuild of both read models from offset 0, against raw log reads and raw bulk writes.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use callisto_avro::{Codec, EmbeddedRegistry};
    use callisto_benches::fixtures;
    use callisto_benches::stats::Row;
    use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
    use callisto_core::readmodel::Projection;
    use callisto_core::readmodel::embedded::EmbeddedReadStore;
    use callisto_core::readmodel::search::TantivySearchIndex;
    use tokio::sync::Mutex;

    const TOPIC: &str = "persons";
    /// Events the 1-core / all-core comparison rebuilds: enough to pass the start-up, few
    /// enough that the 1-core run stays short.
    const SCALING_EVENTS: u64 = 200_000;

    fn own_rss_mib() -> f64 {
        super::rss_mib(std::process::id(), "VmRSS:").unwrap_or(0.0)
    }

    /// Anonymous memory only: heap and stacks, without file pages mapped from the stores
    /// (which the kernel can drop at will).
    fn own_anon_mib() -> f64 {
        super::rss_mib(std::process::id(), "RssAnon:").unwrap_or(0.0)
    }

    /// Fills a fresh log in `dir` with `events` sealed events, `per_person` for each person (a
    /// registration, then notes), as writers seal them; returns the log, its codec and keyring,
    /// and the partitions' end offsets.
    async fn fill(dir: &std::path::Path, events: u64, per_person: u64) -> anyhow::Result<Filled> {
        let registry = Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb"))?);
        let codec = Arc::new(Codec::new(registry, TOPIC)?);
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default())?);
        log.ensure_topic(TOPIC, 12).await?;

        // Sealed as writers seal them: the rebuild opens every event with the person's key.
        let keyring = callisto_core::privacy::open_embedded(dir)?;
        eprintln!("filling the log with {events} sealed events");
        let persons = (events / per_person).max(1);
        let appenders = 64u64;
        let fill_started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for a in 0..appenders {
            let (log, codec, keyring) = (log.clone(), codec.clone(), keyring.clone());
            tasks.spawn(async move {
                let mine: Vec<u64> = (0..persons).filter(|p| p % appenders == a).collect();
                // Time-ordered, as the command service issues them (`Keyring::new_person`).
                let ids: Vec<uuid::Uuid> = mine.iter().map(|_| uuid::Uuid::now_v7()).collect();
                for round in 0..per_person {
                    for id in &ids {
                        let event =
                            if round == 0 { fixtures::registered_as(*id) } else { fixtures::note_for(*id, round) };
                        let (event, sealed) = keyring.seal(event).await.expect("seals");
                        let payload = codec.encode_sealed(&event, sealed.as_ref()).expect("encodes");
                        let request = AppendRequest {
                            topic: TOPIC.into(),
                            key: id.to_string().into_bytes(),
                            payload,
                            headers: vec![],
                            idempotency: None,
                        };
                        log.append(request).await.expect("append");
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done?;
        }
        let ends = log.end_offsets(TOPIC).await?;
        eprintln!("filled {} events in {:.1}s", ends.iter().sum::<u64>(), fill_started.elapsed().as_secs_f64());
        Ok(Filled { log, codec, keyring, ends })
    }

    struct Filled {
        log: Arc<dyn EventLog>,
        codec: Arc<Codec>,
        keyring: Arc<callisto_core::privacy::Keyring>,
        ends: Vec<u64>,
    }

    pub async fn run(events: u64, per_person: u64, which: super::Projections) -> anyhow::Result<Vec<Row>> {
        let dir = tempfile::tempdir()?;
        let Filled { log, codec, keyring, ends } = fill(dir.path(), events, per_person).await?;
        let total: u64 = ends.iter().sum();

        // Baseline 1: read every record back, raw.
        let started = Instant::now();
        let mut read = 0u64;
        for (partition, end) in ends.iter().enumerate() {
            let mut next = 0;
            while next < *end {
                let batch = log.read(TOPIC, partition as u32, next, 500, Duration::ZERO).await?;
                read += batch.len() as u64;
                next = batch.last().map_or(*end, |r| r.offset + 1);
            }
        }
        let raw_read_rate = read as f64 / started.elapsed().as_secs_f64();

        // What opening costs the rebuild: decoding every record, then decoding and opening it
        // with the person's key (from the keyring's cache, as a rebuild mostly finds it).
        let payloads = all_payloads(log.as_ref(), &ends).await?;
        let started = Instant::now();
        for payload in &payloads {
            std::hint::black_box(codec.decode_sealed(payload)?);
        }
        let decode_rate = payloads.len() as f64 / started.elapsed().as_secs_f64();
        let reader = callisto_core::privacy::EventReader::new(codec.clone(), keyring.clone());
        let started = Instant::now();
        for payload in &payloads {
            std::hint::black_box(reader.read(payload).await?);
        }
        let open_rate = payloads.len() as f64 / started.elapsed().as_secs_f64();
        drop((payloads, reader, keyring));

        // Baseline 2: raw bulk writes of the same volume into the same two stores, in the same
        // batch size, without Callisto's fold, guard or checkpoint.
        let raw_write_rate = raw_bulk_writes(dir.path(), total)?;

        // The rebuild itself runs in a process of its own, as `callisto` would, so its memory
        // figures do not include this process's fill and baselines.
        drop(log);
        drop(codec);
        eprintln!("rebuilding in a child process");
        let mut rows = rebuild_in_child(dir.path(), ".", total, which, None)?;
        rows.push(
            Row::new("rebuild's decode + open of sealed events (cached keys)", open_rate, "events/s")
                .against("decode alone/s", decode_rate),
        );
        let rebuild_rate = rows[0].value;
        rows.insert(
            1,
            Row::new("rebuild vs raw log reads", rebuild_rate, "events/s").against("raw log read/s", raw_read_rate),
        );
        rows.insert(
            2,
            Row::new("rebuild vs raw bulk writes into the same stores", rebuild_rate, "events/s")
                .against("raw bulk write/s", raw_write_rate)
                .ratio_at_least(0.50),
        );
        rows.extend(scaling(dir.path(), total, per_person, which).await?);
        Ok(rows)
    }

    /// The rebuild of a whole log of at most [`SCALING_EVENTS`] events into fresh read models,
    /// once pinned to one core and once on every core, with `taskset`. A larger log gets a
    /// smaller one of its own: counting a prefix of a large log would stop the clock when the
    /// slower projection reaches the count, while the faster one has gone on past it.
    async fn scaling(
        dir: &std::path::Path,
        total: u64,
        per_person: u64,
        which: super::Projections,
    ) -> anyhow::Result<Vec<Row>> {
        let events = total.min(SCALING_EVENTS);
        let smaller = if total > events {
            let smaller = tempfile::tempdir()?;
            eprintln!("filling a separate log of {events} events for the scaling figure");
            // Dropped at once: the rebuild child opens the log.
            fill(smaller.path(), events, per_person).await?;
            Some(smaller)
        } else {
            None
        };
        let dir = smaller.as_ref().map_or(dir, |d| d.path());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rate_on = |label: &str, cpus: usize| -> anyhow::Result<f64> {
            eprintln!("rebuilding {events} events on {cpus} core(s)");
            let rows = rebuild_in_child(dir, label, events, which, Some(cpus))?;
            Ok(rows.first().map_or(0.0, |row| row.value))
        };
        let one = rate_on("scaling-1", 1)?;
        let all = rate_on("scaling-all", cores)?;
        Ok(vec![
            Row::new(format!("rebuild of {events} events pinned to 1 core"), one, "events/s"),
            Row::new(format!("rebuild of {events} events on all {cores} cores vs 1 core"), all, "events/s")
                .against("1-core events/s", one)
                .ratio_at_least(1.7),
        ])
    }

    /// Runs the rebuild child over the log in `dir`, with its read models in `models` (under
    /// `dir`), pinned to the first `cores` CPUs when given, and returns its rows.
    fn rebuild_in_child(
        dir: &std::path::Path,
        models: &str,
        total: u64,
        which: super::Projections,
        cores: Option<usize>,
    ) -> anyhow::Result<Vec<Row>> {
        // The name clap parses the flag from.
        let which_arg = clap::ValueEnum::to_possible_value(&which).expect("no variant is skipped");
        let exe = std::env::current_exe()?;
        let mut command = match cores {
            Some(cores) => {
                let mut taskset = std::process::Command::new("taskset");
                taskset.args(["--cpu-list", &format!("0-{}", cores - 1)]).arg(exe);
                taskset
            }
            None => std::process::Command::new(exe),
        };
        let output = command
            .args([
                "rebuild-child",
                "--total",
                &total.to_string(),
                "--projections",
                which_arg.get_name(),
                "--models",
                models,
            ])
            .arg("--dir")
            .arg(dir)
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(output.status.success(), "the rebuild child failed: {}", output.status);
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Every record's payload, in memory, so decoding can be timed without the reads.
    async fn all_payloads(log: &dyn EventLog, ends: &[u64]) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut payloads = Vec::new();
        for (partition, end) in ends.iter().enumerate() {
            let mut next = 0;
            while next < *end {
                let batch = log.read(TOPIC, partition as u32, next, 500, Duration::ZERO).await?;
                next = batch.last().map_or(*end, |r| r.offset + 1);
                payloads.extend(batch.into_iter().map(|r| r.payload));
            }
        }
        Ok(payloads)
    }

    /// The child's side: rebuild the read models of the log in `dir` and report as rows.
    pub async fn child(
        dir: &std::path::Path,
        models: &std::path::Path,
        total: u64,
        which: super::Projections,
    ) -> anyhow::Result<Vec<Row>> {
        let registry = Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb"))?);
        let codec = Arc::new(Codec::new(registry, TOPIC)?);
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default())?);
        let models = dir.join(models);
        std::fs::create_dir_all(&models)?;
        let store = Arc::new(EmbeddedReadStore::open(&models.join("readmodel.redb"))?);
        let search = Arc::new(TantivySearchIndex::open(&models.join("search"))?);
        let rss_before = own_rss_mib();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let projections: Vec<Arc<dyn Projection>> = match which {
            super::Projections::Both => vec![store.clone(), search.clone()],
            super::Projections::Documents => vec![store.clone()],
            super::Projections::Search => vec![search.clone()],
        };
        let label = match which {
            super::Projections::Both => "documents + search",
            super::Projections::Documents => "documents only",
            super::Projections::Search => "search only",
        };
        let started = Instant::now();
        let keyring = callisto_core::privacy::open_embedded(dir)?;
        let reader = Arc::new(callisto_core::privacy::EventReader::new(codec.clone(), keyring));
        let handle = callisto_projectors::Projector::new(
            log.clone(),
            reader,
            projections.clone(),
            callisto_projectors::ProjectorSettings::new(TOPIC),
        )
        .start(shutdown.clone())
        .await?;
        let samples = Arc::new(Mutex::new(Vec::<(u64, f64)>::new()));
        let anon_samples = Arc::new(Mutex::new(Vec::<(u64, f64)>::new()));
        // When each projection reached the end: which one the rebuild waited for.
        let mut caught_up: Vec<Option<f64>> = vec![None; projections.len()];
        // Followed as it moves, so the end is timed when the last batch is applied, not at the
        // next sample: on a rebuild of two seconds a 100 ms sampling step is 5% of the figure.
        let mut progress: Vec<_> = projections.iter().map(|p| p.progress()).collect();
        loop {
            let applied: Vec<u64> =
                progress.iter_mut().map(|p| p.borrow_and_update().values().map(|o| o + 1).sum()).collect();
            for (count, at) in applied.iter().zip(caught_up.iter_mut()) {
                if at.is_none() && *count >= total {
                    *at = Some(started.elapsed().as_secs_f64());
                }
            }
            let done = applied.iter().copied().min().unwrap_or(0);
            samples.lock().await.push((done, own_rss_mib()));
            anon_samples.lock().await.push((done, own_anon_mib()));
            if done >= total {
                break;
            }
            // The memory samples at least every 100 ms, and at every batch applied.
            let moved = futures::future::select_all(progress.iter_mut().map(|p| Box::pin(p.changed())));
            if let Ok((Err(_), _, _)) = tokio::time::timeout(Duration::from_millis(100), moved).await {
                // A projection that stopped reports no more: sample at the step alone.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let rebuild_rate = total as f64 / started.elapsed().as_secs_f64();
        shutdown.cancel();
        handle.await?;
        let samples = samples.lock().await.clone();
        let at_tenth = samples.iter().find(|(done, _)| *done >= total / 10).map_or(0.0, |(_, rss)| *rss);
        let peak = samples.iter().map(|(_, rss)| *rss).fold(0.0, f64::max);
        let anon = anon_samples.lock().await.clone();
        let anon_at_tenth = anon.iter().find(|(done, _)| *done >= total / 10).map_or(0.0, |(_, rss)| *rss);
        let anon_peak = anon.iter().map(|(_, rss)| *rss).fold(0.0, f64::max);

        let mut rows = vec![
            Row::new(format!("rebuild of {total} events into {label}"), rebuild_rate, "events/s").at_least(50_000.0),
            Row::new("rebuild peak RSS (rebuild process)", peak, "MiB").at_most(300.0),
            Row::new("rebuild RSS at end vs at 10% of the backlog", samples.last().map_or(0.0, |s| s.1), "MiB")
                .against("RSS at 10% MiB", at_tenth),
            Row::new("rebuild process RSS after opening the stores", rss_before, "MiB"),
            Row::new("rebuild peak anonymous RSS (heap, no mapped files)", anon_peak, "MiB")
                .against("anon RSS at 10% MiB", anon_at_tenth),
        ];
        if projections.len() > 1 {
            for (projection, at) in projections.iter().zip(caught_up) {
                rows.push(Row::new(
                    format!("{} projection caught up after", projection.name()),
                    at.unwrap_or(0.0),
                    "s",
                ));
            }
        }
        Ok(rows)
    }

    /// Writes `total` documents in batches of 2,000 (the projector's default batch) straight into
    /// redb and tantivy: one redb transaction and one tantivy commit per batch. The batch size is
    /// kept so the baseline compares across runs, although the documents store now reads
    /// batches of up to 12,000 and shares transactions between partitions.
    fn raw_bulk_writes(dir: &std::path::Path, total: u64) -> anyhow::Result<f64> {
        use tantivy::schema::{STORED, STRING, Schema, TEXT};
        const DOCS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("docs");
        let db = redb::Database::create(dir.join("raw.redb"))?;
        let mut schema = Schema::builder();
        let id_field = schema.add_text_field("id", STRING | STORED);
        let text_field = schema.add_text_field("text", TEXT | STORED);
        let index_dir = dir.join("raw-search");
        std::fs::create_dir_all(&index_dir)?;
        let index = tantivy::Index::create_in_dir(&index_dir, schema.build())?;
        let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, 50_000_000)?;
        let sample = fixtures::document_bytes();
        let started = Instant::now();
        let mut written = 0;
        while written < total {
            let batch = 2000.min(total - written);
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(DOCS)?;
                for i in 0..batch {
                    let key = format!("{:016}", written + i);
                    table.insert(key.as_str(), sample.as_slice())?;
                    writer.add_document(
                        tantivy::doc!(id_field => key, text_field => "freshness probe for the load generator"),
                    )?;
                }
            }
            txn.commit()?;
            writer.commit()?;
            written += batch;
        }
        Ok(total as f64 / started.elapsed().as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idle_ticks_are_the_idle_and_io_wait_of_all_cores() {
        let stat = "cpu  100 5 40 7000 30 0 2 0 0 0\ncpu0 50 2 20 3500 15 0 1 0 0 0\n";
        assert_eq!(super::idle_ticks(stat), Some(7030));
        assert_eq!(super::idle_ticks("cpu0 50 2 20 3500 15 0 1 0 0 0\n"), None, "no all-cores line first");
    }

    #[test]
    fn cpu_ticks_are_user_plus_system_time_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194368 120 0 0 0 37 5 0 0 20 0 9 0 100 0 0";
        assert_eq!(super::cpu_ticks(stat), Some(("tokio (rt) 1".to_owned(), 42)));
    }

    #[test]
    fn write_bytes_is_read_from_its_own_line_of_an_io_file() {
        let io = "rchar: 900\nwchar: 800\nsyscr: 7\nsyscw: 6\nread_bytes: 4096\nwrite_bytes: 12288\ncancelled_write_bytes: 0\n";
        assert_eq!(super::write_bytes(io), Some(12288));
        assert_eq!(super::write_bytes("rchar: 1\n"), None);
    }
}
