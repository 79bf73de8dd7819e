//! The load engine: drives any call (a gRPC request, a Redis command, a batch of lookups, a
//! signature) at a fixed concurrency or a fixed arrival rate and reports throughput and
//! latency percentiles.
//!
//! It knows nothing of what it calls, so the baselines and the services' own scenarios are
//! measured the same way and their rows can sit in one table. A call returns `Ok(units)`:
//! how much work it did (1 for a single lookup, the batch size for a batch), so that
//! throughput is comparable between single and batched calls.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

/// Longest latency the histograms tell apart: an hour, in microseconds. A longer call is
/// recorded as an hour; it could only come from a run that hung anyway.
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// 0.1% resolution at every magnitude, about 200 KiB per histogram.
const SIGNIFICANT_FIGURES: u8 = 3;

/// How many distinct error messages a run keeps: enough to see what went wrong without one
/// failure mode repeated thousands of times flooding the report.
const MAX_SAMPLE_ERRORS: usize = 5;

/// A call that has not answered after this long counts as an error, so that one hung call
/// cannot hang the whole run.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The error an open-loop arrival records when `max_in_flight` calls are already running.
pub const SHED_ERROR: &str = "shed by generator";

/// What one call returns: the units of work done, or why it failed.
pub type CallResult = Result<u64, String>;

/// The outcome of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Calls made in the measured window, failed ones (and shed arrivals) included.
    pub requests: u64,
    /// Calls that failed, timed out or were shed.
    pub errors: u64,
    /// Units of work done by the successful calls (keys read, persons checked, ...).
    pub units: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// `units / elapsed`: the throughput that matters to a caller.
    pub per_second: f64,
    /// Latency percentiles of the successful calls.
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
    /// The first few distinct error messages, at most five.
    pub sample_errors: Vec<String>,
}

impl Stats {
    /// Calls that succeeded.
    pub fn successes(&self) -> u64 {
        self.requests.saturating_sub(self.errors)
    }
}

/// What one worker saw. Each worker owns its recorder, so recording takes no lock; the
/// recorders are merged once, at the end of the run.
#[derive(Debug, Clone)]
pub struct Recorder {
    latencies: Histogram<u64>,
    requests: u64,
    errors: u64,
    units: u64,
    sample_errors: Vec<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            latencies: new_histogram(),
            requests: 0,
            errors: 0,
            units: 0,
            sample_errors: Vec::new(),
        }
    }

    /// Records one call. Only successes enter the latency histogram: calls that fail at once
    /// (connection refused, shed) would otherwise make the percentiles look better than the
    /// service is.
    pub fn record(&mut self, latency: Duration, outcome: CallResult) {
        self.requests += 1;
        match outcome {
            Ok(units) => {
                self.units += units;
                self.latencies.saturating_record(micros(latency));
            }
            Err(message) => self.note_error(message),
        }
    }

    /// Records a call that failed without a latency worth keeping (e.g. shed).
    pub fn record_error(&mut self, message: impl Into<String>) {
        self.requests += 1;
        self.note_error(message.into());
    }

    /// Counts an error that is not a call of its own (a worker that died).
    fn note_error(&mut self, message: String) {
        self.errors += 1;
        self.keep_sample(message);
    }

    fn keep_sample(&mut self, message: String) {
        if self.sample_errors.len() < MAX_SAMPLE_ERRORS && !self.sample_errors.contains(&message) {
            self.sample_errors.push(message);
        }
    }

    /// Adds another worker's recorder to this one.
    pub fn merge(&mut self, other: Recorder) {
        let Recorder {
            latencies,
            requests,
            errors,
            units,
            sample_errors,
        } = other;
        self.requests += requests;
        self.errors += errors;
        self.units += units;
        for message in sample_errors {
            self.keep_sample(message);
        }
        // Same bounds on both sides, and values were clamped when recorded: cannot fail.
        if let Err(err) = self.latencies.add(latencies) {
            self.note_error(format!("merging latency histograms: {err:?}"));
        }
    }

    /// The run's statistics over a measured window of `elapsed`.
    pub fn into_stats(self, elapsed: Duration) -> Stats {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 {
            self.units as f64 / seconds
        } else {
            0.0
        };
        let (p50, p99, p999, max) = if self.latencies.is_empty() {
            Default::default()
        } else {
            (
                quantile(&self.latencies, 0.5),
                quantile(&self.latencies, 0.99),
                quantile(&self.latencies, 0.999),
                Duration::from_micros(self.latencies.max()),
            )
        };
        Stats {
            requests: self.requests,
            errors: self.errors,
            units: self.units,
            elapsed,
            per_second,
            p50,
            p99,
            p999,
            max,
            sample_errors: self.sample_errors,
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, HIGHEST_MICROS, SIGNIFICANT_FIGURES) {
        Ok(histogram) => histogram,
        // Only invalid arguments fail (low of 0, high below 2 * low, more than 5 figures);
        // these are constants that are none of those.
        Err(err) => unreachable!("constant histogram bounds rejected: {err:?}"),
    }
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)
}

fn quantile(latencies: &Histogram<u64>, q: f64) -> Duration {
    Duration::from_micros(latencies.value_at_quantile(q))
}

/// Awaits `call`, turning a call that never answers into an error after [`CALL_TIMEOUT`].
async fn bounded<Fut>(call: Fut) -> CallResult
where
    Fut: Future<Output = CallResult>,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Closed loop: `concurrency` workers, each making its next call as soon as the previous
/// one answers, for `warmup` (discarded: connections, caches and the CPU's clock settle)
/// then `duration` (measured).
///
/// This finds the most a system can do at a given concurrency. Because a slow answer
/// delays the next call, it under-reports latency under overload; use [`open_loop`] for
/// latency at a given load. `make_call` gets a call index, unique over the run, for
/// round-robin or key choice. A call counts if it started in the measured window; the
/// window runs until the last such call has answered.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    make_call: F,
) -> Stats
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = CallResult> + Send + 'static,
{
    let next_index = Arc::new(AtomicU64::new(0));
    let measure_from = Instant::now() + warmup;
    let deadline = measure_from + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        workers.spawn(closed_worker(
            make_call.clone(),
            next_index.clone(),
            measure_from,
            deadline,
        ));
    }
    let mut total = Recorder::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(recorder) => total.merge(recorder),
            Err(err) => total.note_error(format!("load worker failed: {err}")),
        }
    }
    total.into_stats(measure_from.elapsed())
}

async fn closed_worker<F, Fut>(
    make_call: F,
    next_index: Arc<AtomicU64>,
    measure_from: Instant,
    deadline: Instant,
) -> Recorder
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = CallResult>,
{
    let mut recorder = Recorder::new();
    loop {
        let started = Instant::now();
        if started >= deadline {
            break;
        }
        let index = next_index.fetch_add(1, Ordering::Relaxed);
        let outcome = bounded(make_call(index)).await;
        if started >= measure_from {
            recorder.record(started.elapsed(), outcome);
        }
    }
    recorder
}

/// Open loop: calls arrive at `rate_per_second` for `duration`, whether or not earlier
/// ones have answered, as real users do.
///
/// Each call's latency is measured from the moment it was *scheduled* to start, not from
/// when the generator got round to it, so a stall (of the system or of the generator)
/// shows in the latency instead of being skipped (no coordinated omission). At most `max_in_flight` calls run at once: an arrival beyond that
/// is not queued but recorded as the error [`SHED_ERROR`], so an overloaded system shows
/// as errors rather than as a generator that quietly slowed down. The timer's granularity
/// (about a millisecond) is part of the measured latency.
pub async fn open_loop<F, Fut>(
    rate_per_second: f64,
    duration: Duration,
    max_in_flight: usize,
    make_call: F,
) -> Stats
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = CallResult> + Send + 'static,
{
    let mut recorder = Recorder::new();
    if !(rate_per_second.is_finite() && rate_per_second > 0.0) {
        recorder.note_error(format!("invalid arrival rate: {rate_per_second}/s"));
        return recorder.into_stats(Duration::ZERO);
    }
    let arrivals = (rate_per_second * duration.as_secs_f64()).round() as u64;
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut in_flight: JoinSet<(Duration, CallResult)> = JoinSet::new();
    let start = Instant::now();
    for index in 0..arrivals {
        let intended = start + Duration::from_secs_f64(index as f64 / rate_per_second);
        tokio::time::sleep_until(intended).await;
        while let Some(joined) = in_flight.try_join_next() {
            absorb(&mut recorder, joined);
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            recorder.record_error(SHED_ERROR);
            continue;
        };
        let call = make_call(index);
        in_flight.spawn(async move {
            let outcome = bounded(call).await;
            drop(permit);
            (intended.elapsed(), outcome)
        });
    }
    while let Some(joined) = in_flight.join_next().await {
        absorb(&mut recorder, joined);
    }
    // The last arrival is scheduled just before `duration` ends: the offered rate is over
    // `duration`, stretched only by answers that came later than that.
    recorder.into_stats(start.elapsed().max(duration))
}

fn absorb(recorder: &mut Recorder, joined: Result<(Duration, CallResult), JoinError>) {
    match joined {
        Ok((latency, outcome)) => recorder.record(latency, outcome),
        Err(err) => recorder.record_error(format!("call task failed: {err}")),
    }
}

/// [`closed_loop`] for blocking, CPU-bound work (cryptography): `threads` OS threads, each
/// calling `op` back to back, `warmup` discarded, then `duration` measured.
pub fn threaded_loop<F>(threads: usize, warmup: Duration, duration: Duration, op: F) -> Stats
where
    F: Fn(u64) -> CallResult + Sync,
{
    let next_index = AtomicU64::new(0);
    let measure_from = std::time::Instant::now() + warmup;
    let deadline = measure_from + duration;
    let mut total = Recorder::new();
    std::thread::scope(|scope| {
        let op = &op;
        let next_index = &next_index;
        let mut handles = Vec::with_capacity(threads.max(1));
        for _ in 0..threads.max(1) {
            handles
                .push(scope.spawn(move || threaded_worker(op, next_index, measure_from, deadline)));
        }
        for handle in handles {
            match handle.join() {
                Ok(recorder) => total.merge(recorder),
                Err(_) => total.note_error("benchmark thread panicked".to_owned()),
            }
        }
    });
    total.into_stats(measure_from.elapsed())
}

fn threaded_worker<F>(
    op: &F,
    next_index: &AtomicU64,
    measure_from: std::time::Instant,
    deadline: std::time::Instant,
) -> Recorder
where
    F: Fn(u64) -> CallResult,
{
    let mut recorder = Recorder::new();
    loop {
        let started = std::time::Instant::now();
        if started >= deadline {
            break;
        }
        let outcome = op(next_index.fetch_add(1, Ordering::Relaxed));
        if started >= measure_from {
            recorder.record(started.elapsed(), outcome);
        }
    }
    recorder
}

/// `n` HTTP/2 connections to a service at `addr`, with Nagle off: wrap each in the
/// service's client.
pub async fn channels(
    addr: std::net::SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<tonic::transport::Channel>> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        out.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

/// Runs `jobs` calls of `call` (given the job index), `parallel` at a time, and measures
/// them as one window: for work that comes in a fixed amount (a batch upload, one dose per
/// person) rather than for a duration.
pub async fn fixed<F, Fut>(jobs: usize, parallel: usize, call: F) -> Stats
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = CallResult> + Send + 'static,
{
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (call, next) = (call.clone(), next.clone());
        workers.spawn(async move {
            let mut recorder = Recorder::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return recorder;
                }
                let t = Instant::now();
                let outcome = call(i).await;
                recorder.record(t.elapsed(), outcome);
            }
        });
    }
    let mut total = Recorder::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(r) => total.merge(r),
            Err(e) => total.note_error(format!("worker task failed: {e}")),
        }
    }
    total.into_stats(started.elapsed())
}

/// A gRPC failure as a sample error: the code and the message.
pub fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sleep_then(millis: u64, outcome: CallResult) -> CallResult {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        outcome
    }

    fn assert_ordered(stats: &Stats) {
        assert!(
            stats.p50 <= stats.p99 && stats.p99 <= stats.p999 && stats.p999 <= stats.max,
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn closed_loop_over_a_one_millisecond_sleep_gives_sane_stats() {
        let stats = closed_loop(
            4,
            Duration::from_millis(50),
            Duration::from_millis(500),
            |_: u64| sleep_then(1, Ok(2)),
        )
        .await;
        assert_eq!(stats.errors, 0, "{stats:?}");
        assert!(stats.sample_errors.is_empty());
        // About 4 workers x 500 calls at best; a busy machine does fewer.
        assert!(stats.requests >= 40, "{stats:?}");
        assert_eq!(stats.units, 2 * stats.requests);
        assert!(stats.elapsed >= Duration::from_millis(500), "{stats:?}");
        assert!(stats.p50 >= Duration::from_millis(1), "{stats:?}");
        assert!(stats.p50 < Duration::from_millis(100), "{stats:?}");
        assert_ordered(&stats);
        // Each call takes at least 1 ms: at most 4 calls, 8 units, per millisecond.
        assert!(stats.per_second > 0.0, "{stats:?}");
        assert!(stats.per_second <= 8_000.0, "{stats:?}");
    }

    #[tokio::test]
    async fn closed_loop_discards_the_warmup() {
        // One worker, 10 ms calls: at most 20 calls fit in the 200 ms measured window; had
        // the 200 ms warmup been counted there would be about 40.
        let stats = closed_loop(
            1,
            Duration::from_millis(200),
            Duration::from_millis(200),
            |_: u64| sleep_then(10, Ok(1)),
        )
        .await;
        assert!((1..=21).contains(&stats.requests), "{stats:?}");
        assert_eq!(stats.errors, 0);
    }

    #[tokio::test]
    async fn closed_loop_counts_errors_and_keeps_a_few_messages() {
        let stats = closed_loop(
            2,
            Duration::ZERO,
            Duration::from_millis(200),
            |index: u64| {
                let outcome = if index.is_multiple_of(2) {
                    Ok(1)
                } else {
                    Err(format!("odd call {index}"))
                };
                sleep_then(1, outcome)
            },
        )
        .await;
        assert!(stats.errors > 0, "{stats:?}");
        assert_eq!(stats.units, stats.successes(), "{stats:?}");
        assert!(stats.successes() > 0, "{stats:?}");
        assert_eq!(stats.sample_errors.len(), MAX_SAMPLE_ERRORS, "{stats:?}");
        assert!(
            stats
                .sample_errors
                .iter()
                .all(|m| m.starts_with("odd call"))
        );
    }

    #[tokio::test]
    async fn open_loop_at_200_per_second_for_a_second_makes_200_calls() {
        let stats = open_loop(200.0, Duration::from_secs(1), 64, |_: u64| {
            sleep_then(1, Ok(1))
        })
        .await;
        assert_eq!(stats.requests, 200, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
        assert!(stats.p50 >= Duration::from_millis(1), "{stats:?}");
        assert_ordered(&stats);
    }

    #[tokio::test]
    async fn open_loop_sheds_beyond_max_in_flight() {
        // 30 arrivals 10 ms apart, each call holding the only slot for 100 ms.
        let stats = open_loop(100.0, Duration::from_millis(300), 1, |_: u64| {
            sleep_then(100, Ok(1))
        })
        .await;
        assert_eq!(stats.requests, 30, "{stats:?}");
        assert!(stats.errors >= 20, "{stats:?}");
        assert!(stats.successes() >= 1, "{stats:?}");
        assert_eq!(stats.sample_errors, vec![SHED_ERROR.to_owned()]);
        // Latency counts from the scheduled start: at least the call's own 100 ms.
        assert!(stats.p50 >= Duration::from_millis(100), "{stats:?}");
    }

    #[tokio::test]
    async fn open_loop_rejects_a_rate_of_zero() {
        let stats = open_loop(0.0, Duration::from_secs(1), 1, |_: u64| {
            sleep_then(0, Ok(1))
        })
        .await;
        assert_eq!(stats.requests, 0);
        assert_eq!(stats.errors, 1);
    }

    #[test]
    fn threaded_loop_measures_blocking_work() {
        let stats = threaded_loop(
            2,
            Duration::from_millis(20),
            Duration::from_millis(200),
            |_| {
                std::thread::sleep(Duration::from_millis(1));
                Ok(1)
            },
        );
        assert_eq!(stats.errors, 0, "{stats:?}");
        assert!(stats.requests >= 20, "{stats:?}");
        assert!(stats.p50 >= Duration::from_millis(1), "{stats:?}");
        assert_ordered(&stats);
    }

    #[test]
    fn merged_recorders_add_up_and_keep_distinct_samples() {
        let mut a = Recorder::new();
        a.record(Duration::from_millis(1), Ok(3));
        a.record(Duration::from_millis(2), Err("boom".to_owned()));
        let mut b = Recorder::new();
        b.record(Duration::from_millis(9), Ok(1));
        b.record_error("boom");
        b.record_error(SHED_ERROR);
        a.merge(b);
        let stats = a.into_stats(Duration::from_secs(2));
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.errors, 3);
        assert_eq!(stats.units, 4);
        assert!((stats.per_second - 2.0).abs() < 1e-9, "{stats:?}");
        assert_eq!(stats.sample_errors, vec!["boom", SHED_ERROR]);
        assert!(stats.max >= Duration::from_millis(9), "{stats:?}");
        assert!(stats.max < Duration::from_millis(10), "{stats:?}");
    }

    #[test]
    fn no_successes_means_zero_latencies_not_garbage() {
        let mut recorder = Recorder::new();
        recorder.record_error("down");
        let stats = recorder.into_stats(Duration::ZERO);
        assert_eq!(stats.p50, Duration::ZERO);
        assert_eq!(stats.max, Duration::ZERO);
        assert_eq!(stats.per_second, 0.0);
    }
}
