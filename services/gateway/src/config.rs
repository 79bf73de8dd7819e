//! Everything the gateway reads from the environment, checked before binding.

use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{FieldCipher, SigningKey, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 50050;

pub struct GatewayConfig {
    pub server: ServerSettings,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub issuer_keys: TrustedKeys,
    pub province_code: String,
    /// `SIGNING_KEY` / `SIGNING_KEY_ID`: signs online codes, offline credentials, place codes.
    pub signing_key: SigningKey,
    /// `SIGNING_RETIRED_KEYS`: earlier public keys, still accepted and published.
    pub retired_keys: TrustedKeys,
    /// `CODE_KEYS`: SM4 keys that seal the person id inside code tokens.
    pub code_cipher: FieldCipher,
    /// `RISK_URL`, `IDENTITY_URL`: where the colors and the persons come from.
    pub risk_url: String,
    pub identity_url: String,
    /// `SERVICE_TOKEN`: this gateway's caller token (role `internal`) for outbound calls.
    pub service_token: String,
    /// `UPSTREAM_TIMEOUT_MS`: the deadline of every outbound call.
    pub upstream_timeout: Duration,
    /// `FALLBACK_CONCURRENCY`: color loads allowed at once against the risk service when
    /// Redis misses or is down; beyond it callers get UNAVAILABLE rather than a flood.
    pub fallback_concurrency: usize,
    /// `CONSUMER_NAME`: this replica's name in the color stream's consumer group.
    pub consumer_name: String,
}

impl GatewayConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let signing_key = SigningKey::from_hex(
            env.or("SIGNING_KEY_ID", "gateway-1".to_owned())?,
            &env.required::<String>("SIGNING_KEY")?,
        )
        .map_err(|e| ConfigError::invalid("SIGNING_KEY", e))?;
        let retired_keys = TrustedKeys::parse(&env.or("SIGNING_RETIRED_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("SIGNING_RETIRED_KEYS", e))?;
        let code_cipher = FieldCipher::parse(&env.required::<String>("CODE_KEYS")?)
            .map_err(|e| ConfigError::invalid("CODE_KEYS", e))?;
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let province_code: String = env.required("PROVINCE_CODE")?;
        let url = |name: &str| -> Result<String, ConfigError> {
            let value: String = env.required(name)?;
            if !(value.starts_with("http://") || value.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    name,
                    "expected an http:// or https:// URL",
                ));
            }
            Ok(value)
        };
        Ok(GatewayConfig {
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "gateway")?,
            issuer_keys,
            province_code,
            signing_key,
            retired_keys,
            code_cipher,
            risk_url: url("RISK_URL")?,
            identity_url: url("IDENTITY_URL")?,
            service_token: env.required("SERVICE_TOKEN")?,
            upstream_timeout: Duration::from_millis(env.or("UPSTREAM_TIMEOUT_MS", 800u64)?.max(1)),
            fallback_concurrency: env.or("FALLBACK_CONCURRENCY", 64usize)?.max(1),
            consumer_name: env.or("CONSUMER_NAME", env.or("HOSTNAME", "gateway-0".to_owned())?)?,
        })
    }
}

/// Fresh secrets for a development or test gateway, as `(variable, value)` pairs.
pub fn generate_dev_secrets() -> Result<Vec<(String, String)>, healthcode_crypto::CryptoError> {
    let key = SigningKey::generate("gateway-dev-1")?;
    Ok(vec![
        ("SIGNING_KEY".into(), key.secret_hex()),
        ("SIGNING_KEY_ID".into(), key.key_id().to_owned()),
        (
            "CODE_KEYS".into(),
            FieldCipher::generate_spec("code-dev-1")?,
        ),
    ])
}
