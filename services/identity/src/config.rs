//! Everything identity reads from the environment, read once and checked before binding.

use crate::service::PhonePolicy;
use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{BlindIndex, FieldCipher, PseudonymKey, SigningKey, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 50051;

/// Which providers (SMS, face match, bank card) the service talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// The deterministic local stand-ins: development and tests only.
    Local,
}

impl std::str::FromStr for ProviderChoice {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(ProviderChoice::Local),
            _ => Err(
                "only `local` (development stand-ins) exists so far; adapters for a province's SMS gateway, face-match and bank-card services are not built yet",
            ),
        }
    }
}

pub struct IdentityConfig {
    /// `PROVIDERS`, required, so that stand-ins never run in production by default.
    pub providers: ProviderChoice,
    pub server: ServerSettings,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    /// Prefix of every cache key this deployment writes (`CACHE_PREFIX`).
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub field_cipher: FieldCipher,
    pub blind_index: BlindIndex,
    pub signing_key: SigningKey,
    /// `SIGNING_RETIRED_KEYS`: public keys this service signed with before a rotation,
    /// still published so that earlier attestations keep verifying.
    pub retired_keys: TrustedKeys,
    pub issuer_keys: TrustedKeys,
    pub phone: PhonePolicy,
    /// `EXCHANGE_PSEUDONYM_KEY` (64 hex) and `EXCHANGE_PSEUDONYM_KEY_ID`: the national
    /// pseudonym key, the same in every province; unset = no cross-province exchange.
    pub exchange_pseudonym: Option<PseudonymKey>,
}

impl IdentityConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let field_cipher = FieldCipher::parse(&env.required::<String>("DATA_KEYS")?)
            .map_err(|e| ConfigError::invalid("DATA_KEYS", e))?;
        let blind_index = BlindIndex::from_hex(&env.required::<String>("BLIND_INDEX_KEY")?)
            .map_err(|e| ConfigError::invalid("BLIND_INDEX_KEY", e))?;
        let signing_key = SigningKey::from_hex(
            env.or("SIGNING_KEY_ID", "identity-1".to_owned())?,
            &env.required::<String>("SIGNING_KEY")?,
        )
        .map_err(|e| ConfigError::invalid("SIGNING_KEY", e))?;
        let retired_keys = TrustedKeys::parse(&env.or("SIGNING_RETIRED_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("SIGNING_RETIRED_KEYS", e))?;
        if retired_keys.get(signing_key.key_id()).is_some() {
            return Err(ConfigError::invalid(
                "SIGNING_RETIRED_KEYS",
                "lists the id of the active signing key",
            ));
        }
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let phone = PhonePolicy {
            code_ttl: Duration::from_secs(env.or("PHONE_CODE_TTL_SECONDS", 300u64)?.max(1)),
            attempts: env.or("PHONE_CODE_ATTEMPTS", 5u32)?.max(1),
            codes_per_hour: env.or("PHONE_CODES_PER_HOUR", 5u64)?.max(1),
        };
        let exchange_pseudonym = match env.optional::<String>("EXCHANGE_PSEUDONYM_KEY")? {
            None => None,
            Some(hex) => Some(
                PseudonymKey::from_hex(
                    env.or("EXCHANGE_PSEUDONYM_KEY_ID", "national-1".to_owned())?,
                    hex.trim(),
                )
                .map_err(|e| ConfigError::invalid("EXCHANGE_PSEUDONYM_KEY", e))?,
            ),
        };
        Ok(IdentityConfig {
            exchange_pseudonym,
            providers: env.required("PROVIDERS")?,
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "identity")?,
            field_cipher,
            blind_index,
            signing_key,
            retired_keys,
            issuer_keys,
            phone,
        })
    }
}

/// Fresh secrets for a development or test deployment, as `(variable, value)` pairs. Never
/// for production: there the secrets come from the operator's Secret.
pub fn generate_dev_secrets() -> Result<Vec<(String, String)>, healthcode_crypto::CryptoError> {
    let signing_key = SigningKey::generate("identity-dev-1")?;
    Ok(vec![
        ("DATA_KEYS".into(), FieldCipher::generate_spec("dev-1")?),
        ("BLIND_INDEX_KEY".into(), BlindIndex::generate_hex()?),
        ("SIGNING_KEY".into(), signing_key.secret_hex()),
        ("SIGNING_KEY_ID".into(), signing_key.key_id().to_owned()),
        (
            "EXCHANGE_PSEUDONYM_KEY".into(),
            PseudonymKey::generate_hex()?,
        ),
    ])
}
