//! Everything the testing service reads from the environment, checked before binding.

use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{SigningKey, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 50053;

pub struct TestingConfig {
    pub server: ServerSettings,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub issuer_keys: TrustedKeys,
    /// `PROVINCE_CODE`: the GB/T 2260 province whose certificates this service issues.
    pub province_code: String,
    /// `SIGNING_KEY` / `SIGNING_KEY_ID`: signs negative-result certificates (SM2).
    pub signing_key: SigningKey,
    /// `SIGNING_RETIRED_KEYS`: earlier public keys, still accepted and published.
    pub retired_keys: TrustedKeys,
    /// `IDENTITY_URL`: masked holder identities for certificates.
    pub identity_url: String,
    /// `GATEWAY_URL`: the location of a venue's place code for searches.
    pub gateway_url: String,
    /// `SERVICE_TOKEN`: this service's caller token (role `internal`) for outbound calls.
    pub service_token: String,
    /// `UPSTREAM_TIMEOUT_MS`: the deadline of every outbound call, provider calls included.
    pub upstream_timeout: Duration,
    /// `PAYMENT_WINDOW_SECONDS`: how long a priced booking waits for payment.
    pub payment_window: Duration,
    /// `JOB_INTERVAL_MS`: how often unpaid bookings expire and refunds are sent.
    pub job_interval: Duration,
    /// `SANDBOX_PAYMENT_KEY` / `SANDBOX_PAYMENT_KEY_ID`: the sandbox payment provider's key
    /// (the embedded default and tests). Unset: no sandbox provider.
    pub sandbox_payment_key: Option<SigningKey>,
    /// `CONSUMER_NAME`: this replica's name in the consumer groups it reads.
    pub consumer_name: String,
    /// `RETEST_DUE_HOURS`: how long a member of a positive pool has for the retest.
    pub retest_due: Duration,
}

fn url(env: &Env, name: &str) -> Result<String, ConfigError> {
    let value: String = env.required(name)?;
    if !(value.starts_with("http://") || value.starts_with("https://")) {
        return Err(ConfigError::invalid(
            name,
            "expected an http:// or https:// URL",
        ));
    }
    Ok(value)
}

impl TestingConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let signing_key = SigningKey::from_hex(
            env.or("SIGNING_KEY_ID", "testing-1".to_owned())?,
            &env.required::<String>("SIGNING_KEY")?,
        )
        .map_err(|e| ConfigError::invalid("SIGNING_KEY", e))?;
        let retired_keys = TrustedKeys::parse(&env.or("SIGNING_RETIRED_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("SIGNING_RETIRED_KEYS", e))?;
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let sandbox_payment_key = match env.optional::<String>("SANDBOX_PAYMENT_KEY")? {
            Some(secret) => Some(
                SigningKey::from_hex(
                    env.or("SANDBOX_PAYMENT_KEY_ID", "sandbox-pay-1".to_owned())?,
                    &secret,
                )
                .map_err(|e| ConfigError::invalid("SANDBOX_PAYMENT_KEY", e))?,
            ),
            None => None,
        };
        let province_code: String = env.required("PROVINCE_CODE")?;
        if province_code.len() != 6 || !province_code.chars().all(|c| c.is_ascii_digit()) {
            return Err(ConfigError::invalid(
                "PROVINCE_CODE",
                "a GB/T 2260 province code: six digits",
            ));
        }
        Ok(TestingConfig {
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "testing")?,
            issuer_keys,
            province_code,
            signing_key,
            retired_keys,
            identity_url: url(env, "IDENTITY_URL")?,
            gateway_url: url(env, "GATEWAY_URL")?,
            service_token: env.required("SERVICE_TOKEN")?,
            upstream_timeout: Duration::from_millis(env.or("UPSTREAM_TIMEOUT_MS", 800u64)?.max(1)),
            payment_window: Duration::from_secs(env.or("PAYMENT_WINDOW_SECONDS", 900u64)?.max(1)),
            job_interval: Duration::from_millis(env.or("JOB_INTERVAL_MS", 5_000u64)?.max(50)),
            sandbox_payment_key,
            consumer_name: env.or("CONSUMER_NAME", env.or("HOSTNAME", "testing-0".to_owned())?)?,
            retest_due: Duration::from_secs(3600 * env.or("RETEST_DUE_HOURS", 24u64)?.max(1)),
        })
    }
}

/// Fresh secrets for a development or test deployment, as `(variable, value)` pairs: the
/// certificate key and the sandbox payment provider's key. Never for production.
pub fn generate_dev_secrets() -> Result<Vec<(String, String)>, healthcode_crypto::CryptoError> {
    let key = SigningKey::generate("testing-dev-1")?;
    let sandbox = SigningKey::generate("sandbox-pay-dev-1")?;
    Ok(vec![
        ("SIGNING_KEY".into(), key.secret_hex()),
        ("SIGNING_KEY_ID".into(), key.key_id().to_owned()),
        ("SANDBOX_PAYMENT_KEY".into(), sandbox.secret_hex()),
        ("SANDBOX_PAYMENT_KEY_ID".into(), sandbox.key_id().to_owned()),
    ])
}
