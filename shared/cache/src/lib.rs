//! The cache every service shares an interface for: Redis in production (one node or a
//! Cluster), an in-process map for the embedded default. Both pass the same contract tests.
//!
//! The cache is never the record. Callers treat [`CacheError`] as "ask the database", never
//! as an answer.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

mod memory;
mod redis_backend;

pub use memory::MemoryCache;
pub use redis_backend::{Connection as RedisConnection, RedisCache, RedisSettings};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The backend did not answer (down, timed out, refused). Callers fall back.
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something this code cannot read (a foreign value under our key).
    #[error("cache value unreadable: {0}")]
    Corrupt(String),
}

/// A value stamped with the version of the record it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub data: Vec<u8>,
}

#[async_trait]
pub trait Cache: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;

    /// Stores a value, replacing what was there; `ttl` of `None` keeps it until deleted.
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError>;

    async fn delete(&self, key: &str) -> Result<(), CacheError>;

    /// Adds one to a counter that lives `ttl` from its first increment (a fixed window);
    /// returns the count including this one.
    async fn incr_window(&self, key: &str, ttl: Duration) -> Result<u64, CacheError>;

    /// Stores `data` at `version` unless the key already holds the same or a newer version;
    /// atomic, so that of two racing writers the newer always wins. Returns whether it stored.
    async fn set_if_newer(
        &self,
        key: &str,
        version: u64,
        data: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, CacheError>;

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, CacheError>;

    /// Many versioned reads in as few round trips as the backend allows, in `keys` order.
    async fn get_versioned_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<Versioned>>, CacheError>;

    /// Adds members to a geo set, or moves them.
    async fn geo_add(&self, key: &str, members: &[GeoMember]) -> Result<(), CacheError>;

    /// Removes members from a geo set; unknown ones are ignored.
    async fn geo_remove(&self, key: &str, members: &[String]) -> Result<(), CacheError>;

    /// Members within `radius_m` of a point, nearest first, at most `count`, each with its
    /// distance in metres (haversine on [`healthcode_proto::geo::EARTH_RADIUS_M`], as Redis
    /// computes it).
    async fn geo_search(
        &self,
        key: &str,
        at: GeoPoint,
        radius_m: f64,
        count: usize,
    ) -> Result<Vec<(String, f64)>, CacheError>;
}

pub use healthcode_proto::common::v1::GeoPoint;

/// One member of a geo set and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoMember {
    pub member: String,
    pub at: GeoPoint,
}

pub type SharedCache = Arc<dyn Cache>;

/// The largest version [`Cache::set_if_newer`] accepts (2^53, exact in every backend).
pub const MAX_VERSION: u64 = 1 << 53;

/// Picks the backend from `REDIS_URL`: unset means in-process. A comma-separated list of
/// URLs, or `REDIS_CLUSTER=true`, means Redis Cluster. Keys are prefixed with `prefix`.
pub async fn from_settings(
    settings: Option<&RedisSettings>,
    prefix: &str,
) -> Result<SharedCache, CacheError> {
    match settings {
        Some(settings) => Ok(Arc::new(RedisCache::connect(settings, prefix).await?)),
        None => Ok(Arc::new(MemoryCache::new(prefix))),
    }
}

/// The key of a person's current color: written by the risk service (the record's owner),
/// read by the gateway. The hash tag keeps a person's keys on one Cluster slot.
pub fn color_key(person_id: &str) -> String {
    format!("color:{{{person_id}}}")
}

/// How long a color stays cached without being touched; the record is in the risk
/// service's database, and a miss loads it again.
pub const COLOR_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
