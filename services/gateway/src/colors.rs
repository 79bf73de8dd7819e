//! Reading colors: Redis first; on a miss exactly one load per cold key reaches the risk
//! service however many callers ask at once; when Redis is down a breaker skips it and a
//! bounded number of loads go to the risk service, the rest are refused (UNAVAILABLE), so
//! an outage of the cache never floods the database. An unknown color is never green.

use crate::upstream::Upstreams;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use healthcode_cache::{SharedCache, color_key};
use healthcode_proto::common::v1::{CodeColor, PersonRef};
use healthcode_proto::risk::v1::{BatchGetColorsRequest, GetColorRequest, PersonColor};
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ColorError {
    /// Neither the cache nor the risk service could answer in time.
    #[error("no color can be obtained now: {0}")]
    Unavailable(String),
    /// The risk service refused the person (malformed id).
    #[error("{0}")]
    Rejected(String),
}

/// Skips Redis for a while after consecutive failures, then lets one probe through.
pub struct Breaker {
    failures: AtomicU32,
    opened: AtomicU64,
    open_until_ms: AtomicU64,
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            opened: AtomicU64::new(0),
            open_until_ms: AtomicU64::new(0),
            threshold,
            cooldown,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether to try Redis now.
    pub fn allows(&self) -> bool {
        self.now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            let until = self.now_ms() + self.cooldown.as_millis() as u64;
            self.open_until_ms.store(until, Ordering::Relaxed);
            if n == self.threshold {
                self.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("color cache failing; reading from the risk service for a while");
            }
        }
    }

    pub fn is_open(&self) -> bool {
        !self.allows()
    }

    /// How many times it opened since start.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

/// Many keys in order, in MGET round trips of 1,000 keys run concurrently, each value
/// decoded by `decode`. A miss, an undecodable value, a failed round trip or an open breaker
/// leaves `None`: the caller loads those from the service that owns them.
pub async fn cached_many<T>(
    cache: &SharedCache,
    breaker: &Breaker,
    keys: Vec<String>,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(keys.len()).collect();
    if !breaker.allows() {
        return out;
    }
    let reads = keys
        .chunks(1000)
        .map(|chunk| cache.get_versioned_many(chunk));
    let results = futures::future::join_all(reads).await;
    for (slots, result) in out.chunks_mut(1000).zip(results) {
        match result {
            Ok(values) => {
                breaker.success();
                for (slot, value) in slots.iter_mut().zip(values) {
                    *slot = value.and_then(|v| decode(&v.data));
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "cache batch read failed");
                breaker.failure();
            }
        }
    }
    out
}

/// How long a finished load keeps answering later misses of the same key.
const SETTLED_FOR: Duration = Duration::from_millis(500);

type Load = Shared<BoxFuture<'static, Result<PersonColor, ColorError>>>;

pub struct ColorReader {
    cache: SharedCache,
    upstreams: Upstreams,
    breaker: Arc<Breaker>,
    fallback: Arc<Semaphore>,
    inflight: Arc<Mutex<HashMap<String, Load>>>,
    loads: AtomicU64,
}

/// A cached color that has passed its `valid_until` is due for re-evaluation: a miss.
fn current(color: PersonColor, now: i64) -> Option<PersonColor> {
    let expired = color.valid_until.as_ref().is_some_and(|t| t.seconds <= now);
    let known = color.color != CodeColor::Unspecified as i32;
    (known && !expired).then_some(color)
}

fn decode(bytes: &[u8]) -> Option<PersonColor> {
    PersonColor::decode(bytes).ok()
}

fn status_error(status: tonic::Status) -> ColorError {
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated => ColorError::Rejected(status.message().to_owned()),
        _ => ColorError::Unavailable(status.message().to_owned()),
    }
}

impl ColorReader {
    pub fn new(
        cache: SharedCache,
        upstreams: Upstreams,
        breaker: Arc<Breaker>,
        fallback_concurrency: usize,
    ) -> Self {
        ColorReader {
            cache,
            upstreams,
            breaker,
            fallback: Arc::new(Semaphore::new(fallback_concurrency)),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            loads: AtomicU64::new(0),
        }
    }

    /// Loads that reached the risk service since start (the stampede test counts them).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    async fn cached(&self, person_id: &str) -> Option<PersonColor> {
        if !self.breaker.allows() {
            return None;
        }
        match self.cache.get_versioned(&color_key(person_id)).await {
            Ok(found) => {
                self.breaker.success();
                found.and_then(|v| decode(&v.data))
            }
            Err(err) => {
                tracing::debug!(error = %err, "color cache read failed");
                self.breaker.failure();
                None
            }
        }
    }

    pub async fn get(&self, person_id: &str) -> Result<PersonColor, ColorError> {
        let now = chrono::Utc::now().timestamp();
        if let Some(color) = self.cached(person_id).await.and_then(|c| current(c, now)) {
            return Ok(color);
        }
        self.load(person_id).await
    }

    /// One load per key at a time: later callers share the first one's answer.
    fn load(&self, person_id: &str) -> Load {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(load) = inflight.get(person_id) {
            return load.clone();
        }
        let upstreams = self.upstreams.clone();
        let fallback = self.fallback.clone();
        let registry = self.inflight.clone();
        let id = person_id.to_owned();
        self.loads.fetch_add(1, Ordering::Relaxed);
        let load = async move {
            let result = async {
                let _permit = fallback.try_acquire_owned().map_err(|_| {
                    ColorError::Unavailable("color service saturated; retry shortly".into())
                })?;
                let mut risk = upstreams.risk.clone();
                let request = upstreams.request(GetColorRequest {
                    person: Some(PersonRef {
                        person_id: id.clone(),
                    }),
                });
                risk.get_color(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(status_error)
            }
            .await;
            // Readers whose cache miss raced with this load share its answer for a
            // moment longer; after that the next miss loads afresh.
            tokio::spawn(async move {
                tokio::time::sleep(SETTLED_FOR).await;
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
            result
        }
        .boxed()
        .shared();
        inflight.insert(person_id.to_owned(), load.clone());
        load
    }

    /// Colors of many persons, in order: cache in MGET round trips of 1,000 keys (run
    /// concurrently), the misses from the risk service in batches of 1,000.
    pub async fn get_many(&self, person_ids: &[String]) -> Vec<Result<PersonColor, ColorError>> {
        let now = chrono::Utc::now().timestamp();
        let keys = person_ids.iter().map(|id| color_key(id)).collect();
        let mut out: Vec<Option<Result<PersonColor, ColorError>>> =
            cached_many(&self.cache, &self.breaker, keys, |data| {
                decode(data).and_then(|c| current(c, now))
            })
            .await
            .into_iter()
            .map(|hit| hit.map(Ok))
            .collect();
        let missing: Vec<usize> = (0..person_ids.len())
            .filter(|i| out[*i].is_none())
            .collect();
        for chunk in missing.chunks(1000) {
            let loaded = self
                .load_batch(chunk.iter().map(|i| person_ids[*i].clone()).collect())
                .await;
            for (slot, result) in chunk.iter().zip(loaded) {
                out[*slot] = Some(result);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ColorError::Unavailable("not loaded".into()))))
            .collect()
    }

    async fn load_batch(&self, ids: Vec<String>) -> Vec<Result<PersonColor, ColorError>> {
        self.loads.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let Ok(_permit) = self.fallback.clone().try_acquire_owned() else {
            return ids
                .iter()
                .map(|_| {
                    Err(ColorError::Unavailable(
                        "color service saturated; retry shortly".into(),
                    ))
                })
                .collect();
        };
        let mut risk = self.upstreams.risk.clone();
        let request = self.upstreams.request(BatchGetColorsRequest {
            persons: ids
                .iter()
                .map(|id| PersonRef {
                    person_id: id.clone(),
                })
                .collect(),
        });
        match risk.batch_get_colors(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                let mut by_id: HashMap<String, PersonColor> = reply
                    .colors
                    .into_iter()
                    .filter_map(|c| c.person.clone().map(|p| (p.person_id, c)))
                    .collect();
                let rejected: HashMap<u32, String> = reply
                    .errors
                    .into_iter()
                    .map(|e| (e.index, e.message))
                    .collect();
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| match by_id.remove(id) {
                        Some(c) => Ok(c),
                        None => Err(rejected
                            .get(&(i as u32))
                            .map(|m| ColorError::Rejected(m.clone()))
                            .unwrap_or_else(|| {
                                ColorError::Unavailable("no color returned".into())
                            })),
                    })
                    .collect()
            }
            Err(status) => {
                let err = status_error(status);
                ids.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }
}
