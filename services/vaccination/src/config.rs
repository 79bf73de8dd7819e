//! Everything the vaccination service reads from the environment, checked before binding.

use crate::dcc;
use chrono::{DateTime, Utc};
use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{FieldCipher, SigningKey, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 50054;

pub struct VaccinationConfig {
    pub server: ServerSettings,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub issuer_keys: TrustedKeys,
    /// `PROVINCE_CODE`: the GB/T 2260 province whose certificates this service issues.
    pub province_code: String,
    /// `SIGNING_KEY` / `SIGNING_KEY_ID`: signs domestic certificates and PDF digests (SM2).
    pub signing_key: SigningKey,
    /// `SIGNING_RETIRED_KEYS`: earlier public keys, still accepted and published.
    pub retired_keys: TrustedKeys,
    /// `DCC_SIGNER_KEY` (PKCS#8 DER, hex) and `DCC_SIGNER_CERT` (X.509 DER, hex): the
    /// document signer of international certificates (ECDSA P-256).
    pub dcc_signer: dcc::Signer,
    /// `DCC_ISSUER`: the issuer named in international certificates (`is`).
    pub dcc_issuer: String,
    /// `DCC_VALIDITY_DAYS`: how long an international certificate is valid.
    pub dcc_validity: Duration,
    /// `DATA_KEYS`: SM4 keys sealing what holds personal data at rest (international
    /// certificates, late-entry evidence).
    pub data_keys: FieldCipher,
    /// `IDENTITY_URL`: masked holders, and the Latin name for international certificates.
    pub identity_url: String,
    /// `SERVICE_TOKEN`: this service's caller token (roles `internal` and `full_view`).
    pub service_token: String,
    /// `UPSTREAM_TIMEOUT_MS`: the deadline of every outbound call.
    pub upstream_timeout: Duration,
    /// `LATE_ENTRY_AFTER_HOURS`: a dose recorded this long after it was given is a late
    /// entry, kept for review.
    pub late_entry_after: Duration,
    /// `REMINDER_RADIUS_M`: how near a site a person with a booster due gets a reminder.
    pub reminder_radius_m: u32,
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

fn hex_bytes(env: &Env, name: &str) -> Result<Vec<u8>, ConfigError> {
    hex::decode(env.required::<String>(name)?.trim())
        .map_err(|_| ConfigError::invalid(name, "expected hex"))
}

impl VaccinationConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let signing_key = SigningKey::from_hex(
            env.or("SIGNING_KEY_ID", "vaccination-1".to_owned())?,
            &env.required::<String>("SIGNING_KEY")?,
        )
        .map_err(|e| ConfigError::invalid("SIGNING_KEY", e))?;
        let retired_keys = TrustedKeys::parse(&env.or("SIGNING_RETIRED_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("SIGNING_RETIRED_KEYS", e))?;
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let dcc_signer = dcc::Signer::from_der(
            &hex_bytes(env, "DCC_SIGNER_KEY")?,
            &hex_bytes(env, "DCC_SIGNER_CERT")?,
        )
        .map_err(|e| ConfigError::invalid("DCC_SIGNER_CERT", e))?;
        let data_keys = FieldCipher::parse(&env.required::<String>("DATA_KEYS")?)
            .map_err(|e| ConfigError::invalid("DATA_KEYS", e))?;
        let province_code: String = env.required("PROVINCE_CODE")?;
        if province_code.len() != 6 || !province_code.chars().all(|c| c.is_ascii_digit()) {
            return Err(ConfigError::invalid(
                "PROVINCE_CODE",
                "a GB/T 2260 province code: six digits",
            ));
        }
        let dcc_issuer = env.or(
            "DCC_ISSUER",
            format!("Health Commission of province {province_code}"),
        )?;
        Ok(VaccinationConfig {
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "vaccination")?,
            issuer_keys,
            province_code,
            signing_key,
            retired_keys,
            dcc_signer,
            dcc_issuer,
            dcc_validity: Duration::from_secs(
                24 * 3600 * env.or("DCC_VALIDITY_DAYS", 365u64)?.clamp(1, 3650),
            ),
            data_keys,
            identity_url: url(env, "IDENTITY_URL")?,
            service_token: env.required("SERVICE_TOKEN")?,
            upstream_timeout: Duration::from_millis(env.or("UPSTREAM_TIMEOUT_MS", 800u64)?.max(1)),
            late_entry_after: Duration::from_secs(
                3600 * env.or("LATE_ENTRY_AFTER_HOURS", 24u64)?.max(1),
            ),
            reminder_radius_m: env.or("REMINDER_RADIUS_M", 500u32)?.clamp(1, 50_000),
        })
    }
}

/// Fresh secrets for a development or test deployment, as `(variable, value)` pairs: the
/// certificate key, a self-signed document signer (valid two years from `now`) and the data
/// keys. Never for production, where the document signer is issued by the country's CSCA.
pub fn generate_dev_secrets(
    now: DateTime<Utc>,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
    let key = SigningKey::generate("vaccination-dev-1")?;
    let signer = dcc::Signer::generate(
        "CN",
        "Healthcode development",
        "DSC vaccination dev",
        now - chrono::Duration::days(1),
        now + chrono::Duration::days(730),
        None,
        now.timestamp().unsigned_abs(),
    )?;
    Ok(vec![
        ("SIGNING_KEY".into(), key.secret_hex()),
        ("SIGNING_KEY_ID".into(), key.key_id().to_owned()),
        ("DCC_SIGNER_KEY".into(), hex::encode(signer.pkcs8_der())),
        (
            "DCC_SIGNER_CERT".into(),
            hex::encode(signer.certificate_der()),
        ),
        (
            "DATA_KEYS".into(),
            FieldCipher::generate_spec("vaccination-dev-1")?,
        ),
    ])
}
