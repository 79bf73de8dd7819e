//! The embedded default: a map in this process. Good for one process, which is all the
//! embedded mesh is.

use crate::{Cache, CacheError, GeoMember, GeoPoint, Versioned};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
enum Value {
    Plain(Vec<u8>),
    Counter(u64),
    Versioned(Versioned),
    Geo(HashMap<String, GeoPoint>),
}

#[derive(Debug)]
struct Entry {
    value: Value,
    expires_at: Option<Instant>,
}

#[derive(Debug)]
pub struct MemoryCache {
    prefix: String,
    entries: Mutex<HashMap<String, Entry>>,
}

impl MemoryCache {
    pub fn new(prefix: &str) -> Self {
        MemoryCache {
            prefix: prefix.to_owned(),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn with_entries<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Entry>) -> T,
    ) -> Result<T, CacheError> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| CacheError::Unavailable("in-process cache poisoned".into()))?;
        let now = Instant::now();
        // Expired entries are dropped as they are met; the map only holds live keys for
        // long. A full sweep is cheap at embedded sizes.
        if entries.len() > 10_000 {
            entries.retain(|_, e| e.expires_at.is_none_or(|t| t > now));
        }
        Ok(f(&mut entries))
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

fn live(entry: Option<&Entry>) -> Option<&Entry> {
    entry.filter(|e| e.expires_at.is_none_or(|t| t > Instant::now()))
}

fn expiry(ttl: Option<Duration>) -> Option<Instant> {
    ttl.map(|ttl| Instant::now() + ttl)
}

fn versioned_of(entry: Option<&Entry>) -> Result<Option<Versioned>, CacheError> {
    match live(entry).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::Versioned(v)) => Ok(Some(v.clone())),
        Some(_) => Err(CacheError::Corrupt("not a versioned value".into())),
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| match live(entries.get(&key)).map(|e| &e.value) {
            None => Ok(None),
            Some(Value::Plain(data)) => Ok(Some(data.clone())),
            Some(Value::Counter(n)) => Ok(Some(n.to_string().into_bytes())),
            Some(Value::Versioned(_)) => Err(CacheError::Corrupt("versioned value".into())),
            Some(Value::Geo(_)) => Err(CacheError::Corrupt("geo set".into())),
        })?
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| {
            entries.insert(
                key,
                Entry {
                    value: Value::Plain(value.to_vec()),
                    expires_at: expiry(ttl),
                },
            );
        })
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| {
            entries.remove(&key);
        })
    }

    async fn incr_window(&self, key: &str, ttl: Duration) -> Result<u64, CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| {
            let count = match live(entries.get(&key)).map(|e| (&e.value, e.expires_at)) {
                Some((Value::Counter(n), expires_at)) => {
                    let n = n + 1;
                    entries.insert(
                        key,
                        Entry {
                            value: Value::Counter(n),
                            expires_at,
                        },
                    );
                    return Ok(n);
                }
                Some(_) => return Err(CacheError::Corrupt("not a counter".into())),
                None => 1,
            };
            entries.insert(
                key,
                Entry {
                    value: Value::Counter(count),
                    expires_at: expiry(Some(ttl)),
                },
            );
            Ok(count)
        })?
    }

    async fn set_if_newer(
        &self,
        key: &str,
        version: u64,
        data: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, CacheError> {
        if version > crate::MAX_VERSION {
            return Err(CacheError::Corrupt("version beyond 2^53".into()));
        }
        let key = self.key(key);
        self.with_entries(|entries| {
            if let Some(current) = versioned_of(entries.get(&key))?
                && current.version >= version
            {
                return Ok(false);
            }
            entries.insert(
                key,
                Entry {
                    value: Value::Versioned(Versioned {
                        version,
                        data: data.to_vec(),
                    }),
                    expires_at: expiry(ttl),
                },
            );
            Ok(true)
        })?
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| versioned_of(entries.get(&key)))?
    }

    async fn get_versioned_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<Versioned>>, CacheError> {
        self.with_entries(|entries| {
            keys.iter()
                .map(|k| versioned_of(entries.get(&self.key(k))))
                .collect()
        })?
    }

    async fn geo_add(&self, key: &str, members: &[GeoMember]) -> Result<(), CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| {
            let entry = entries.entry(key).or_insert_with(|| Entry {
                value: Value::Geo(HashMap::new()),
                expires_at: None,
            });
            let Value::Geo(set) = &mut entry.value else {
                return Err(CacheError::Corrupt("not a geo set".into()));
            };
            for m in members {
                set.insert(m.member.clone(), m.at);
            }
            Ok(())
        })?
    }

    async fn geo_remove(&self, key: &str, members: &[String]) -> Result<(), CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| {
            if let Some(Entry {
                value: Value::Geo(set),
                ..
            }) = entries.get_mut(&key)
            {
                for m in members {
                    set.remove(m);
                }
            }
        })
    }

    async fn geo_search(
        &self,
        key: &str,
        at: GeoPoint,
        radius_m: f64,
        count: usize,
    ) -> Result<Vec<(String, f64)>, CacheError> {
        let key = self.key(key);
        self.with_entries(|entries| match live(entries.get(&key)) {
            None => Ok(Vec::new()),
            Some(Entry {
                value: Value::Geo(set),
                ..
            }) => {
                let mut found: Vec<(String, f64)> = set
                    .iter()
                    .map(|(m, p)| (m.clone(), healthcode_proto::geo::distance_m(&at, p)))
                    .filter(|(_, d)| *d <= radius_m)
                    .collect();
                found.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
                found.truncate(count);
                Ok(found)
            }
            Some(_) => Err(CacheError::Corrupt("not a geo set".into())),
        })?
    }
}
