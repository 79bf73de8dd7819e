//! Redis, one node or a Cluster. A versioned value is one string, `<version>:<data>`, so a
//! batch of them is one MGET (split by node in a Cluster, where a pipeline could not cross
//! slots); compare-and-set is a script, atomic on the node that owns the key.

use crate::{Cache, CacheError, GeoMember, GeoPoint, Versioned};
use async_trait::async_trait;
use healthcode_config::{ConfigError, Env};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Longest wait for one reply; past it the caller falls back to the database.
    pub response_timeout: Duration,
}

impl RedisSettings {
    /// `REDIS_URL` (unset = no Redis), `REDIS_CLUSTER`, `REDIS_TIMEOUT_MS`.
    pub fn from_env(env: &Env) -> Result<Option<Self>, ConfigError> {
        let Some(raw) = env.optional::<String>("REDIS_URL")? else {
            return Ok(None);
        };
        let urls: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
        if urls
            .iter()
            .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
        {
            return Err(ConfigError::invalid(
                "REDIS_URL",
                "expected redis:// or rediss:// URLs, comma-separated for a cluster",
            ));
        }
        let cluster = env.or("REDIS_CLUSTER", false)? || urls.len() > 1;
        let timeout_ms = env.or("REDIS_TIMEOUT_MS", 500u64)?;
        Ok(Some(RedisSettings {
            urls,
            cluster,
            response_timeout: Duration::from_millis(timeout_ms.max(1)),
        }))
    }
}

/// A connection to Redis, one node or a Cluster, cheap to clone (multiplexed). Other crates
/// (the event bus) share the way this crate connects rather than repeating it.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// A single node connects lazily and reconnects by itself, so a service starts (and
    /// serves from its database) while Redis is down.
    pub async fn open(settings: &RedisSettings) -> Result<Self, CacheError> {
        if settings.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(settings.response_timeout)
                .build()
                .map_err(unavailable)?;
            Ok(Connection::Cluster(
                client.get_async_connection().await.map_err(unavailable)?,
            ))
        } else {
            let url = settings
                .urls
                .first()
                .ok_or_else(|| CacheError::Unavailable("no Redis URL".into()))?;
            let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(settings.response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Ok(Connection::Single(
                ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?,
            ))
        }
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisCache {
    prefix: String,
    connection: Connection,
    set_if_newer: redis::Script,
    incr_window: redis::Script,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

const SET_IF_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ':', 1, true)
  if not sep then
    return redis.error_reply('not a versioned value')
  end
  if tonumber(string.sub(current, 1, sep - 1)) >= tonumber(ARGV[1]) then
    return 0
  end
end
local value = ARGV[1] .. ':' .. ARGV[2]
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], value)
end
return 1
";

const INCR_WINDOW: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
";

fn unavailable(err: redis::RedisError) -> CacheError {
    if err.kind() == redis::ErrorKind::UnexpectedReturnType {
        CacheError::Corrupt(err.to_string())
    } else {
        CacheError::Unavailable(err.to_string())
    }
}

fn millis(ttl: Option<Duration>) -> u64 {
    ttl.map(|t| t.as_millis().clamp(1, u64::MAX as u128) as u64)
        .unwrap_or(0)
}

impl RedisCache {
    /// A single node connects lazily and reconnects by itself, so a service starts (and
    /// serves from its database) while Redis is down.
    pub async fn connect(settings: &RedisSettings, prefix: &str) -> Result<Self, CacheError> {
        let connection = Connection::open(settings).await?;
        Ok(RedisCache {
            prefix: prefix.to_owned(),
            connection,
            set_if_newer: redis::Script::new(SET_IF_NEWER),
            incr_window: redis::Script::new(INCR_WINDOW),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn connection(&self) -> Connection {
        self.connection.clone()
    }
}

fn versioned(raw: Option<Vec<u8>>) -> Result<Option<Versioned>, CacheError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let corrupt = || CacheError::Corrupt("not a versioned value".into());
    let sep = raw.iter().position(|b| *b == b':').ok_or_else(corrupt)?;
    let version = std::str::from_utf8(&raw[..sep])
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(corrupt)?;
    Ok(Some(Versioned {
        version,
        data: raw[sep + 1..].to_vec(),
    }))
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(Some(ttl)));
        }
        cmd.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        redis::cmd("DEL")
            .arg(self.key(key))
            .query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn incr_window(&self, key: &str, ttl: Duration) -> Result<u64, CacheError> {
        self.incr_window
            .key(self.key(key))
            .arg(millis(Some(ttl)))
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn set_if_newer(
        &self,
        key: &str,
        version: u64,
        data: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, CacheError> {
        // Lua compares numbers as doubles: beyond 2^53 two versions could compare equal.
        if version > crate::MAX_VERSION {
            return Err(CacheError::Corrupt("version beyond 2^53".into()));
        }
        let stored: i64 = self
            .set_if_newer
            .key(self.key(key))
            .arg(version)
            .arg(data)
            .arg(millis(ttl))
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        Ok(stored == 1)
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        versioned(raw)
    }

    async fn get_versioned_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<Versioned>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.key(key));
        }
        let rows: Vec<Option<Vec<u8>>> = cmd
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        rows.into_iter().map(versioned).collect()
    }

    async fn geo_add(&self, key: &str, members: &[GeoMember]) -> Result<(), CacheError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("GEOADD");
        cmd.arg(self.key(key));
        for m in members {
            cmd.arg(m.at.longitude).arg(m.at.latitude).arg(&m.member);
        }
        cmd.query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn geo_remove(&self, key: &str, members: &[String]) -> Result<(), CacheError> {
        if members.is_empty() {
            return Ok(());
        }
        redis::cmd("ZREM")
            .arg(self.key(key))
            .arg(members)
            .query_async::<()>(&mut self.connection())
            .await
            .map_err(unavailable)
    }

    async fn geo_search(
        &self,
        key: &str,
        at: GeoPoint,
        radius_m: f64,
        count: usize,
    ) -> Result<Vec<(String, f64)>, CacheError> {
        let found: Vec<(String, String)> = redis::cmd("GEOSEARCH")
            .arg(self.key(key))
            .arg("FROMLONLAT")
            .arg(at.longitude)
            .arg(at.latitude)
            .arg("BYRADIUS")
            .arg(radius_m)
            .arg("m")
            .arg("ASC")
            .arg("COUNT")
            .arg(count.max(1))
            .arg("WITHDIST")
            .query_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        found
            .into_iter()
            .map(|(member, d)| {
                d.parse::<f64>()
                    .map(|d| (member, d))
                    .map_err(|_| CacheError::Corrupt("GEOSEARCH distance".into()))
            })
            .collect()
    }
}
