//! `hc-bench`: measures the health code backend and keeps the numbers in `BENCHMARKS.md`.
//!
//! One subcommand per scenario. Each takes the shared [`RunOptions`] and ends in
//! [`publish`], so that every scenario is measured and reported the same way. To add one
//! (the gateway's RPCs, say): add a variant to [`Scenario`], drive the calls with
//! `hc_bench::load`, make a `report::Row` per measurement, and publish the rows under
//! `report::Markers::named("gateway")` so that they get their own block in the file.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hc_bench::baselines::{self, ECHO_PAYLOAD_BYTES, REDIS_VALUE_BYTES, SM2_MESSAGE_BYTES};
use hc_bench::report::{self, Markers, Row, RunInfo};

#[derive(Debug, Parser)]
#[command(
    name = "hc-bench",
    version,
    about = "Load and benchmark tool for the health code backend"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// gRPC echo, Redis GET and MGET, SM2 verify and sign on this machine: the ceilings that
    /// every service's numbers are read against.
    Baselines(BaselineArgs),
    /// The gateway's show my code, verify a scan, batch check and p99 at half load, against
    /// the whole mesh on PostgreSQL and Redis, with the baselines measured in the same run.
    Gateway(GatewayArgs),
    /// The testing service: results ingested in batches beside a bare PostgreSQL insert,
    /// bookings on hot slots beside the echo, and "near me" over a seeded province.
    Testing(TestingArgs),
    /// The vaccination service: worker-signed doses recorded, domestic (SM2) and EU DCC
    /// (ES256) certificates issued and verified, beside the echo and bare SM2 and P-256.
    Vaccination(VaccinationArgs),
    /// The exchange between two provinces linked over mutual TLS: propagation latency of a
    /// color change (beside its visibility in the deciding province, and again beside a
    /// partner that reads nothing), and records per second from one partner (beside bare SM2
    /// verification).
    Exchange(ExchangeArgs),
}

#[derive(Debug, Args)]
struct ExchangeArgs {
    #[command(flatten)]
    run: RunOptions,
    /// Color changes whose propagation is timed, one after the other.
    #[arg(long, default_value_t = 60)]
    samples: u32,
    /// Records one partner publishes in the throughput run.
    #[arg(long, default_value_t = 5000)]
    records: usize,
    /// Records per PublishRecords call.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch: u64,
    /// Records A issues while a partner of A reads nothing, at least: the bench always
    /// issues enough to exceed the stalled streams' HTTP/2 window (2 MiB) and buffers.
    #[arg(long, default_value_t = 0)]
    stall_records: u64,
}

#[derive(Debug, Args)]
struct VaccinationArgs {
    #[command(flatten)]
    run: RunOptions,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Verified persons (two doses each) whose certificates are issued and verified.
    #[arg(long, default_value_t = 64)]
    persons: u32,
    /// Fresh persons given a first dose in the RecordDose run.
    #[arg(long, default_value_t = 5000)]
    doses: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

#[derive(Debug, Args)]
struct TestingArgs {
    #[command(flatten)]
    run: RunOptions,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Results per UploadResults call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// UploadResults calls (the ingest run is this many batches).
    #[arg(long, default_value_t = 40)]
    batches: usize,
    /// Institutions seeded for the search.
    #[arg(long, default_value_t = 3000)]
    institutions: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    #[command(flatten)]
    run: RunOptions,
    /// Redis for the mesh and the baselines.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Verified persons whose codes are shown and scanned.
    #[arg(long, default_value_t = 64)]
    persons: u32,
    /// Persons per batch check.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// HTTP/2 connections from the load generator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

/// Options every scenario takes.
#[derive(Debug, Args)]
struct RunOptions {
    /// Measured seconds per benchmark.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration_secs: u64,
    /// Seconds of load before each measurement, discarded while connections open and caches
    /// and CPU clocks settle.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Calls kept in flight by the closed-loop benchmarks.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Markdown file for the results: created if missing, otherwise only this scenario's
    /// block in it is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

impl RunOptions {
    fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup_secs)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs)
    }
}

#[derive(Debug, Args)]
struct BaselineArgs {
    #[command(flatten)]
    run: RunOptions,
    /// Redis for the GET and MGET baselines (its keys get a random prefix and are deleted).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Keys per MGET.
    #[arg(long, default_value_t = 1000)]
    mget_batch: usize,
    /// HTTP/2 connections for the second echo run; the first always uses one.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// OS threads for SM2 [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Baselines(args) => run_baselines(args).await,
        Scenario::Gateway(args) => run_gateway(args).await,
        Scenario::Testing(args) => run_testing(args).await,
        Scenario::Vaccination(args) => run_vaccination(args).await,
        Scenario::Exchange(args) => run_exchange(args).await,
    }
}

/// Runs every baseline one after another (never two at once: they would share the CPUs)
/// and publishes them as one block.
async fn run_baselines(args: BaselineArgs) -> anyhow::Result<()> {
    let info = RunInfo::collect();
    let run = &args.run;
    let (concurrency, warmup, duration) = (run.concurrency, run.warmup(), run.duration());
    let mut rows = Vec::new();

    for connections in echo_connection_counts(args.connections) {
        eprintln!("hc-bench: gRPC echo over {connections} connection(s)");
        let stats = baselines::echo(concurrency, warmup, duration, connections)
            .await
            .context("gRPC echo baseline")?;
        let name = format!("gRPC echo, {ECHO_PAYLOAD_BYTES} B, {connections} conn.");
        rows.push(Row::closed(name, "calls", concurrency, stats));
    }

    eprintln!("hc-bench: Redis GET");
    let stats = baselines::redis_get(&args.redis_url, concurrency, warmup, duration)
        .await
        .context("Redis GET baseline (is Redis running at --redis-url?)")?;
    let name = format!("Redis GET, {REDIS_VALUE_BYTES} B values");
    rows.push(Row::closed(name, "keys", concurrency, stats));

    eprintln!("hc-bench: Redis MGET of {} keys", args.mget_batch);
    let stats = baselines::redis_mget(
        &args.redis_url,
        args.mget_batch,
        concurrency,
        warmup,
        duration,
    )
    .await
    .context("Redis MGET baseline")?;
    let name = format!(
        "Redis MGET x{}, {REDIS_VALUE_BYTES} B values",
        args.mget_batch
    );
    rows.push(Row::closed(name, "keys", concurrency, stats));

    let threads = args.threads.unwrap_or(info.cpus).max(1);
    eprintln!("hc-bench: SM2 verify on {threads} thread(s)");
    let stats =
        tokio::task::spawn_blocking(move || baselines::sm2_verify_rate(threads, warmup, duration))
            .await
            .context("SM2 verify baseline")??;
    let name = format!("SM2 verify, {SM2_MESSAGE_BYTES} B");
    rows.push(Row::threads(name, "verifications", threads, stats));

    eprintln!("hc-bench: SM2 sign on {threads} thread(s)");
    let stats =
        tokio::task::spawn_blocking(move || baselines::sm2_sign_rate(threads, warmup, duration))
            .await
            .context("SM2 sign baseline")??;
    let name = format!("SM2 sign, {SM2_MESSAGE_BYTES} B");
    rows.push(Row::threads(name, "signatures", threads, stats));

    publish(&run.out, &Markers::baselines(), "Baselines", &info, &rows)
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let info = RunInfo::collect();
    let run = &args.run;
    let results = hc_bench::gateway::run(hc_bench::gateway::GatewayRun {
        concurrency: run.concurrency,
        warmup: run.warmup(),
        duration: run.duration(),
        persons: args.persons.max(1),
        batch: args.batch.clamp(1, 10_000),
        connections: args.connections.max(1),
        redis_url: args.redis_url.clone(),
        threads: info.cpus.max(1),
    })
    .await?;
    let mut block = report::render_block("Gateway", &info, &results.rows);
    block.push_str("\n| target | measured ratio | required | figures |\n|---|---|---|---|\n");
    for (name, ratio, required, figures) in &results.targets {
        let met = if name.contains("≤") {
            ratio <= required
        } else {
            ratio >= required
        };
        block.push_str(&format!(
            "| {name} | {ratio:.2} {} | {required} | {figures} |\n",
            if met { "(met)" } else { "(missed)" }
        ));
    }
    println!("{block}");
    report::write_block(&run.out, &Markers::named("gateway"), &block)
        .with_context(|| format!("writing {}", run.out.display()))?;
    Ok(())
}

async fn run_testing(args: TestingArgs) -> anyhow::Result<()> {
    let info = RunInfo::collect();
    let run = &args.run;
    let results = hc_bench::testing::run(hc_bench::testing::TestingRun {
        concurrency: run.concurrency,
        warmup: run.warmup(),
        duration: run.duration(),
        connections: args.connections.max(1),
        redis_url: args.redis_url.clone(),
        batch: args.batch.clamp(1, 5_000),
        batches: args.batches.max(1),
        institutions: args.institutions.max(1),
    })
    .await?;
    publish_compared(&run.out, "testing", "Testing", &info, &results)
}

async fn run_vaccination(args: VaccinationArgs) -> anyhow::Result<()> {
    let info = RunInfo::collect();
    let run = &args.run;
    let results = hc_bench::vaccination::run(hc_bench::vaccination::VaccinationRun {
        concurrency: run.concurrency,
        warmup: run.warmup(),
        duration: run.duration(),
        connections: args.connections.max(1),
        redis_url: args.redis_url.clone(),
        persons: args.persons.max(1),
        doses: args.doses.max(1),
        threads: info.cpus.max(1),
    })
    .await?;
    publish_compared(&run.out, "vaccination", "Vaccination", &info, &results)
}

async fn run_exchange(args: ExchangeArgs) -> anyhow::Result<()> {
    let info = RunInfo::collect();
    let run = &args.run;
    let results = hc_bench::exchange::run(hc_bench::exchange::ExchangeRun {
        samples: args.samples.max(1),
        records: args.records.max(1),
        batch: args.batch as usize,
        stall_records: args.stall_records,
        threads: info.cpus.max(1),
        warmup: run.warmup(),
        duration: run.duration(),
    })
    .await?;
    publish_compared(&run.out, "exchange", "Exchange", &info, &results)
}

/// One connection first (what a single client gets), then `connections` if more than one
/// (what spreading over connections buys).
fn echo_connection_counts(connections: usize) -> Vec<usize> {
    if connections > 1 {
        vec![1, connections]
    } else {
        vec![1]
    }
}

/// Prints the block and writes it into `out` between `markers`.
fn publish(
    out: &Path,
    markers: &Markers,
    title: &str,
    info: &RunInfo,
    rows: &[Row],
) -> anyhow::Result<()> {
    let block = report::render_block(title, info, rows);
    println!("{block}");
    report::write_block(out, markers, &block)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("hc-bench: results written to {}", out.display());
    Ok(())
}

/// Prints a compared run's block and writes it into `out` under its own markers.
fn publish_compared(
    out: &Path,
    name: &str,
    title: &str,
    info: &RunInfo,
    results: &report::Compared,
) -> anyhow::Result<()> {
    let block = report::render_compared(title, info, results);
    println!("{block}");
    report::write_block(out, &Markers::named(name), &block)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("hc-bench: results written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn baselines_defaults_match_the_documented_command() {
        let cli = Cli::try_parse_from(["hc-bench", "baselines"]).expect("parse");
        let Scenario::Baselines(args) = cli.scenario else {
            panic!("baselines parsed as another scenario");
        };
        assert_eq!(args.run.duration(), Duration::from_secs(10));
        assert_eq!(args.run.concurrency, 64);
        assert_eq!(args.run.out, PathBuf::from("BENCHMARKS.md"));
        assert_eq!(args.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(args.mget_batch, 1000);
        assert!(Cli::try_parse_from(["hc-bench", "baselines", "--duration-secs", "0"]).is_err());
    }

    #[test]
    fn echo_runs_once_more_only_with_several_connections() {
        assert_eq!(echo_connection_counts(0), vec![1]);
        assert_eq!(echo_connection_counts(1), vec![1]);
        assert_eq!(echo_connection_counts(4), vec![1, 4]);
    }
}
