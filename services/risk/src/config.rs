//! Everything the risk service reads from the environment, checked before binding.

use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{FieldCipher, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 50052;

pub struct RiskConfig {
    pub server: ServerSettings,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub issuer_keys: TrustedKeys,
    /// `PROVINCE_CODE`: the GB/T 2260 province whose colors this deployment decides.
    pub province_code: String,
    /// `SWEEP_INTERVAL_MS`: how often colors past their `valid_until` are re-evaluated.
    pub sweep_interval: Duration,
    /// `PURGE_INTERVAL_SECONDS`: how often itinerary data past 60 days is deleted.
    pub purge_interval: Duration,
    /// `DATA_KEYS`: SM4 keys (`kid:32hex,...`, the first one active) that seal the free
    /// text of appeals at rest.
    pub field_cipher: FieldCipher,
    /// `CONSUMER_NAME`: this replica's name in the consumer groups it reads (the venue
    /// visits of the gateway); defaults to `HOSTNAME`.
    pub consumer_name: String,
}

impl RiskConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let province_code: String = env.required("PROVINCE_CODE")?;
        if province_code.len() != 6
            || !province_code.ends_with("0000")
            || !province_code.chars().all(|c| c.is_ascii_digit())
        {
            return Err(ConfigError::invalid(
                "PROVINCE_CODE",
                "a GB/T 2260 province code: six digits ending in 0000",
            ));
        }
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let field_cipher = FieldCipher::parse(&env.required::<String>("DATA_KEYS")?)
            .map_err(|e| ConfigError::invalid("DATA_KEYS", e))?;
        Ok(RiskConfig {
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "risk")?,
            issuer_keys,
            province_code,
            sweep_interval: Duration::from_millis(env.or("SWEEP_INTERVAL_MS", 5_000u64)?.max(100)),
            purge_interval: Duration::from_secs(env.or("PURGE_INTERVAL_SECONDS", 3_600u64)?.max(1)),
            field_cipher,
            consumer_name: env.or("CONSUMER_NAME", env.or("HOSTNAME", "risk-0".to_owned())?)?,
        })
    }
}

/// Fresh development secrets for `healthcode up` and tests: never for production.
pub fn generate_dev_secrets() -> Result<Vec<(String, String)>, healthcode_crypto::CryptoError> {
    Ok(vec![(
        "DATA_KEYS".into(),
        FieldCipher::generate_spec("risk-dev-1")?,
    )])
}
