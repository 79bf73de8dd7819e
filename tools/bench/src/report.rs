//! Results as a Markdown table, kept in a file under version control (`BENCHMARKS.md`).
//!
//! Each scenario writes its block between its own pair of markers and leaves the rest of the
//! file alone, so prose written around the numbers survives a re-run, and running one
//! scenario never erases another's numbers. A block says how it was produced (command, date,
//! CPUs, commit): a number without them cannot be compared with anything.

use std::io;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::Command;

use crate::load::Stats;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured, e.g. `Redis MGET x1000`.
    pub name: String,
    /// The load offered, e.g. `64 in flight` or `500/s offered`.
    pub load: String,
    /// What one unit of throughput is, e.g. `calls` or `keys`.
    pub unit: String,
    pub stats: Stats,
}

impl Row {
    /// A closed-loop row: `concurrency` calls kept in flight.
    pub fn closed(name: impl Into<String>, unit: &str, concurrency: usize, stats: Stats) -> Self {
        Self::new(name, format!("{concurrency} in flight"), unit, stats)
    }

    /// An open-loop row: calls arriving at `rate_per_second`.
    pub fn open(name: impl Into<String>, unit: &str, rate_per_second: f64, stats: Stats) -> Self {
        Self::new(name, format!("{rate_per_second}/s offered"), unit, stats)
    }

    /// A row of CPU-bound work on `threads` OS threads.
    pub fn threads(name: impl Into<String>, unit: &str, threads: usize, stats: Stats) -> Self {
        Self::new(name, format!("{threads} threads"), unit, stats)
    }

    fn new(name: impl Into<String>, load: String, unit: &str, stats: Stats) -> Self {
        Row {
            name: name.into(),
            load,
            unit: unit.to_owned(),
            stats,
        }
    }
}

/// How a block of results was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// The command line, program name shortened and passwords in URLs masked.
    pub command: String,
    /// When the run started, UTC.
    pub date: String,
    /// CPUs available to the process.
    pub cpus: usize,
    /// `git rev-parse --short HEAD`, when run inside a checkout.
    pub commit: Option<String>,
}

impl RunInfo {
    /// Describes the current process and checkout. Call it when the run starts.
    pub fn collect() -> Self {
        RunInfo {
            command: command_line(
                std::env::args_os().map(|arg| arg.to_string_lossy().into_owned()),
            ),
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            cpus: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            commit: git_commit(),
        }
    }
}

/// The command line as one string: the program by its file name (not a `target/` path),
/// arguments with spaces quoted, and credentials in URLs masked, since the result is
/// committed.
fn command_line(args: impl IntoIterator<Item = String>) -> String {
    let mut parts = Vec::new();
    for (position, arg) in args.into_iter().enumerate() {
        let arg = if position == 0 {
            Path::new(&arg)
                .file_name()
                .map_or_else(|| arg.clone(), |name| name.to_string_lossy().into_owned())
        } else {
            mask_credentials(&arg)
        };
        if arg.contains(char::is_whitespace) {
            parts.push(format!("'{arg}'"));
        } else {
            parts.push(arg);
        }
    }
    parts.join(" ")
}

/// `redis://user:secret@host` becomes `redis://***@host`.
fn mask_credentials(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &arg[..scheme_end + 3], &rest[at..]),
        None => arg.to_owned(),
    }
}

fn git_commit() -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let commit = String::from_utf8(output.stdout).ok()?;
    let commit = commit.trim();
    (!commit.is_empty()).then(|| commit.to_owned())
}

/// The pair of HTML comments that delimit one generated block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    pub begin: String,
    pub end: String,
}

impl Markers {
    /// `<!-- bench:begin -->` ... `<!-- bench:end -->`: the baselines.
    pub fn baselines() -> Self {
        Markers {
            begin: "<!-- bench:begin -->".to_owned(),
            end: "<!-- bench:end -->".to_owned(),
        }
    }

    /// `<!-- bench:NAME:begin -->` ... `<!-- bench:NAME:end -->`: one more scenario's block.
    pub fn named(name: &str) -> Self {
        Markers {
            begin: format!("<!-- bench:{name}:begin -->"),
            end: format!("<!-- bench:{name}:end -->"),
        }
    }
}

/// What a new file starts with, before the first block.
const PREAMBLE: &str = "# Benchmarks

Measured with `hc-bench` (`tools/bench`). Each run rewrites only the block between its
markers; text outside the markers is kept as written.

## How to run

```sh
cargo run --release -p hc-bench -- baselines
```

Redis must be reachable at `--redis-url` (default `redis://127.0.0.1:6379`): the Redis rows
write 10,000 keys under a random `hcbench:` prefix and delete them afterwards. The load
generator runs on the same machine as what it measures and shares its CPUs, so run on an
otherwise idle machine and compare numbers only with numbers from the same machine.
";

/// The Markdown block for one run: title, how it was produced, the table, and the first
/// errors of every row that had any.
pub fn render_block(title: &str, run: &RunInfo, rows: &[Row]) -> String {
    let mut out = format!("## {title}\n\n");
    out.push_str(&format!("- command: `{}`\n", run.command));
    out.push_str(&format!("- date: {}\n", run.date));
    out.push_str(&format!("- CPUs: {}\n", run.cpus));
    match &run.commit {
        Some(commit) => out.push_str(&format!("- commit: `{commit}`\n")),
        None => out.push_str("- commit: unknown (not a git checkout)\n"),
    }
    out.push('\n');
    out.push_str(&render_table(rows));
    let failing: Vec<&Row> = rows
        .iter()
        .filter(|row| !row.stats.sample_errors.is_empty())
        .collect();
    if !failing.is_empty() {
        out.push_str("\nFirst errors:\n\n");
        for row in failing {
            for message in &row.stats.sample_errors {
                out.push_str(&format!("- {}: {}\n", row.name, single_line(message)));
            }
        }
    }
    out
}

/// The table alone.
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::from("| scenario | load | throughput | p50 | p99 | p99.9 | errors |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let stats = &row.stats;
        let measured = stats.successes() > 0;
        out.push_str(&format!(
            "| {} | {} | {} {}/s | {} | {} | {} | {} |\n",
            cell(&row.name),
            cell(&row.load),
            rate(stats.per_second),
            cell(&row.unit),
            latency(stats.p50, measured),
            latency(stats.p99, measured),
            latency(stats.p999, measured),
            errors(stats),
        ));
    }
    out
}

fn cell(text: &str) -> String {
    single_line(text).replace('|', "\\|")
}

fn single_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whole numbers with thousands separators; below 100, one decimal.
fn rate(per_second: f64) -> String {
    if per_second < 100.0 {
        format!("{per_second:.1}")
    } else {
        grouped(per_second.round() as u64)
    }
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Microseconds below a millisecond, then milliseconds, then seconds; `n/a` when no call
/// succeeded (a zero would read as "instant").
fn latency(value: std::time::Duration, measured: bool) -> String {
    if !measured {
        return "n/a".to_owned();
    }
    let micros = value.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.2} ms", value.as_secs_f64() * 1_000.0)
    } else {
        format!("{:.2} s", value.as_secs_f64())
    }
}

fn errors(stats: &Stats) -> String {
    if stats.errors == 0 || stats.requests == 0 {
        return grouped(stats.errors);
    }
    let share = stats.errors as f64 * 100.0 / stats.requests as f64;
    format!("{} ({share:.2}%)", grouped(stats.errors))
}

/// `existing` with the block between `markers` replaced by `block`. Without the markers the
/// block is appended; without a file (or an empty one) the file starts with [`PREAMBLE`].
pub fn splice(existing: Option<&str>, markers: &Markers, block: &str) -> String {
    let generated = format!("{}\n{}\n{}", markers.begin, block.trim_end(), markers.end);
    let text = match existing {
        Some(text) if !text.trim().is_empty() => text,
        _ => return format!("{PREAMBLE}\n{generated}\n"),
    };
    if let Some(begin) = text.find(&markers.begin)
        && let Some(end_offset) = text[begin..].find(&markers.end)
    {
        let after = &text[begin + end_offset + markers.end.len()..];
        return format!("{}{generated}{after}", &text[..begin]);
    }
    format!("{}\n\n{generated}\n", text.trim_end())
}

/// Writes `block` into the file at `path` between `markers`, creating the file if needed.
pub fn write_block(path: &Path, markers: &Markers, block: &str) -> io::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    std::fs::write(path, splice(existing.as_deref(), markers, block))
}

/// A scenario's rows and how its figures compare with the baselines measured beside them:
/// (what is compared, the ratio, the two figures).
pub struct Compared {
    pub rows: Vec<Row>,
    pub comparisons: Vec<(String, f64, String)>,
}

/// One comparison: `measured` per second over `baseline` per second, with both figures.
pub fn comparison(
    name: &str,
    measured: &Stats,
    baseline: f64,
    unit: &str,
) -> (String, f64, String) {
    (
        name.to_owned(),
        measured.per_second / baseline.max(1.0),
        format!("{:.0} vs {:.0} {unit}", measured.per_second, baseline),
    )
}

/// The block for a [`Compared`] run: the rows, then one line per comparison.
pub fn render_compared(title: &str, run: &RunInfo, compared: &Compared) -> String {
    let mut block = render_block(title, run, &compared.rows);
    block.push_str("\n| comparison | ratio | figures |\n|---|---|---|\n");
    for (name, ratio, figures) in &compared.comparisons {
        block.push_str(&format!("| {name} | {ratio:.2} | {figures} |\n"));
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stats(per_second: f64, errors: u64) -> Stats {
        Stats {
            requests: 1_000,
            errors,
            units: 1_000 - errors,
            elapsed: Duration::from_secs(1),
            per_second,
            p50: Duration::from_micros(850),
            p99: Duration::from_micros(2_346),
            p999: Duration::from_millis(1_500),
            max: Duration::from_secs(2),
            sample_errors: if errors > 0 {
                vec!["connection\nrefused".to_owned()]
            } else {
                Vec::new()
            },
        }
    }

    fn run() -> RunInfo {
        RunInfo {
            command: "hc-bench baselines".to_owned(),
            date: "2026-11-21 07:40 UTC".to_owned(),
            cpus: 2,
            commit: Some("abc1234".to_owned()),
        }
    }

    #[test]
    fn table_rows_show_throughput_latency_and_errors() {
        let rows = [
            Row::closed("gRPC echo", "calls", 64, stats(41_234.4, 0)),
            Row::open("Redis | GET", "keys", 500.0, stats(12.34, 10)),
        ];
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[2],
            "| gRPC echo | 64 in flight | 41,234 calls/s | 850 µs | 2.35 ms | 1.50 s | 0 |"
        );
        assert_eq!(
            lines[3],
            "| Redis \\| GET | 500/s offered | 12.3 keys/s | 850 µs | 2.35 ms | 1.50 s | 10 (1.00%) |"
        );
    }

    #[test]
    fn latencies_are_not_shown_when_nothing_succeeded() {
        let mut all_failed = stats(0.0, 1_000);
        all_failed.units = 0;
        let table = render_table(&[Row::threads("SM2 sign", "signatures", 2, all_failed)]);
        assert!(
            table.contains("| n/a | n/a | n/a | 1,000 (100.00%) |"),
            "{table}"
        );
    }

    #[test]
    fn block_says_how_it_was_produced_and_lists_errors() {
        let rows = [Row::closed("Redis GET", "keys", 8, stats(5_000.0, 1))];
        let block = render_block("Baselines", &run(), &rows);
        assert!(block.starts_with("## Baselines\n"), "{block}");
        assert!(block.contains("- command: `hc-bench baselines`"), "{block}");
        assert!(block.contains("- date: 2026-11-21 07:40 UTC"), "{block}");
        assert!(block.contains("- CPUs: 2"), "{block}");
        assert!(block.contains("- commit: `abc1234`"), "{block}");
        assert!(
            block.contains("- Redis GET: connection refused\n"),
            "{block}"
        );
    }

    #[test]
    fn splice_creates_a_file_with_a_preamble() {
        let text = splice(None, &Markers::baselines(), "table\n");
        assert!(text.starts_with("# Benchmarks\n"), "{text}");
        assert!(text.contains("## How to run"), "{text}");
        assert!(
            text.ends_with("<!-- bench:begin -->\ntable\n<!-- bench:end -->\n"),
            "{text}"
        );
        assert_eq!(splice(Some("  \n"), &Markers::baselines(), "table"), text);
    }

    #[test]
    fn splice_replaces_only_its_own_block() {
        let markers = Markers::baselines();
        let gateway = Markers::named("gateway");
        let first = splice(None, &markers, "old numbers");
        let with_gateway = splice(Some(&first), &gateway, "gateway numbers");
        let edited = with_gateway.replace("## How to run", "Some notes.\n\n## How to run");
        let again = splice(Some(&edited), &markers, "new numbers");
        assert!(!again.contains("old numbers"), "{again}");
        assert!(again.contains("<!-- bench:begin -->\nnew numbers\n<!-- bench:end -->"));
        assert!(again.contains("Some notes."), "{again}");
        assert!(again.contains(
            "<!-- bench:gateway:begin -->\ngateway numbers\n<!-- bench:gateway:end -->\n"
        ));
        assert_eq!(splice(Some(&again), &markers, "new numbers"), again);
    }

    #[test]
    fn splice_appends_when_the_markers_are_missing() {
        let text = splice(
            Some("# Notes\n\nhand written\n"),
            &Markers::baselines(),
            "t",
        );
        assert_eq!(
            text,
            "# Notes\n\nhand written\n\n<!-- bench:begin -->\nt\n<!-- bench:end -->\n"
        );
    }

    #[test]
    fn write_block_round_trips_through_a_file() {
        let path = std::env::temp_dir().join(format!(
            "hc-bench-report-{}-{:x}.md",
            std::process::id(),
            rand::random::<u64>()
        ));
        write_block(&path, &Markers::baselines(), "first-run").expect("create");
        write_block(&path, &Markers::baselines(), "second-run").expect("update");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::remove_file(&path).expect("remove");
        assert!(
            text.contains("<!-- bench:begin -->\nsecond-run\n<!-- bench:end -->"),
            "{text}"
        );
        assert!(!text.contains("first-run"), "{text}");
    }

    #[test]
    fn command_line_is_short_quoted_and_free_of_secrets() {
        let args = [
            "/work/main/target/release/hc-bench",
            "baselines",
            "--redis-url",
            "redis://user:s3cret@10.0.0.5:6379/2",
            "--out",
            "my results.md",
        ]
        .map(String::from);
        assert_eq!(
            command_line(args),
            "hc-bench baselines --redis-url redis://***@10.0.0.5:6379/2 --out 'my results.md'"
        );
        assert_eq!(
            mask_credentials("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(mask_credentials("a@b"), "a@b");
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(rate(99.94), "99.9");
        assert_eq!(rate(100.4), "100");
    }

    #[test]
    fn run_info_describes_this_process() {
        let info = RunInfo::collect();
        assert!(info.cpus >= 1);
        assert!(!info.command.is_empty());
        assert!(info.date.ends_with(" UTC"), "{info:?}");
    }
}
