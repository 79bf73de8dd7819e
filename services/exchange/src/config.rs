//! Everything the exchange reads from the environment, checked before binding.

use crate::records::is_province;
use crate::sync::OutboundTls;
use crate::tls::{Issued, pem_fingerprint};
use healthcode_cache::RedisSettings;
use healthcode_config::{ConfigError, Env};
use healthcode_crypto::{SigningKey, TrustedKeys};
use healthcode_db::DbConfig;
use healthcode_server::ServerSettings;
use healthcode_telemetry::TelemetryConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The internal listener (services of this mesh, operators).
pub const DEFAULT_PORT: u16 = 50055;
/// The partner listener (mutual TLS).
pub const DEFAULT_PARTNER_PORT: u16 = 50065;

/// This province's side of the partner listener: its server certificate and the CA whose
/// client certificates partners present.
#[derive(Clone)]
pub struct PartnerListener {
    pub addr: SocketAddr,
    pub server: Issued,
    pub client_ca_pem: String,
}

pub struct ExchangeConfig {
    pub server: ServerSettings,
    /// `PARTNER_TLS_DIR` (ca.pem, server.pem, server-key.pem, as `healthcode exchange-pki`
    /// writes them) and `PARTNER_LISTEN_ADDR`; unset = no partner listener (a province
    /// that only reads its own records).
    pub partner_listener: Option<PartnerListener>,
    /// `OUTBOUND_TLS_DIR/<partner id>/{ca.pem, client.pem, client-key.pem}`: what this
    /// province presents when it calls each partner.
    pub outbound_tls: BTreeMap<String, OutboundTls>,
    pub db: DbConfig,
    pub redis: Option<RedisSettings>,
    pub cache_prefix: String,
    pub telemetry: TelemetryConfig,
    pub issuer_keys: TrustedKeys,
    /// `PROVINCE_CODE`: this province (GB/T 2260).
    pub province_code: String,
    /// `SIGNING_KEY` / `SIGNING_KEY_ID`: signs the records this province issues (SM2).
    pub signing_key: SigningKey,
    /// `IDENTITY_URL`: pseudonyms of this province's persons.
    pub identity_url: String,
    /// `RISK_URL`: where national checks are recorded (`record_in_risk`); unset = not
    /// offered.
    pub risk_url: Option<String>,
    /// `SERVICE_TOKEN`: this service's caller token (role `internal`).
    pub service_token: String,
    /// `UPSTREAM_TIMEOUT_MS`: the deadline of every outbound call.
    pub upstream_timeout: Duration,
    /// `CONSUMER_NAME`: this replica in the color-change consumer group (the pod name).
    pub consumer_name: String,
    /// `HEARTBEAT_MS`: how long a Subscribe stream stays silent before a heartbeat.
    pub heartbeat: Duration,
    /// `PARTNER_MAX_STREAMS`: open Subscribe streams per partner.
    pub max_streams_per_partner: usize,
    /// `PARTNER_MAX_CALLS`: unary calls in flight per partner.
    pub max_calls_per_partner: usize,
    /// `NATIONAL_CHECK_PARTNERS`: comma-separated partner ids asked at once for each
    /// directive risk holds pending for the national check (e.g. `national`); unset or
    /// empty = not asked automatically (an operator calls `NationalCheck`). Needs
    /// `RISK_URL`.
    pub national_check_partners: Vec<String>,
}

fn read(dir: &Path, name: &str, var: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(dir.join(name))
        .map_err(|e| ConfigError::invalid(var, format!("cannot read {name}: {e}")))
}

fn issued(dir: &Path, cert: &str, key: &str, var: &str) -> Result<Issued, ConfigError> {
    let certificate_pem = read(dir, cert, var)?;
    let sha256 = pem_fingerprint(&certificate_pem)
        .map_err(|e| ConfigError::invalid(var, format!("{cert}: {e}")))?;
    Ok(Issued {
        certificate_pem,
        key_pem: read(dir, key, var)?,
        sha256,
    })
}

impl ExchangeConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let issuer_keys = TrustedKeys::parse(&env.or("AUTH_ISSUER_KEYS", String::new())?)
            .map_err(|e| ConfigError::invalid("AUTH_ISSUER_KEYS", e))?;
        let province_code: String = env.required("PROVINCE_CODE")?;
        if !is_province(&province_code) {
            return Err(ConfigError::invalid(
                "PROVINCE_CODE",
                "a GB/T 2260 province-level code, e.g. 330000",
            ));
        }
        // Partners hold every province's keys in one registry, keyed by id: the default
        // id names the province.
        let signing_key = SigningKey::from_hex(
            env.or("SIGNING_KEY_ID", format!("exchange-{province_code}-1"))?,
            &env.required::<String>("SIGNING_KEY")?,
        )
        .map_err(|e| ConfigError::invalid("SIGNING_KEY", e))?;
        let identity_url: String = env.required("IDENTITY_URL")?;
        if !(identity_url.starts_with("http://") || identity_url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "IDENTITY_URL",
                "expected an http:// or https:// URL",
            ));
        }
        let risk_url = env.optional::<String>("RISK_URL")?;
        if let Some(url) = &risk_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "RISK_URL",
                "expected an http:// or https:// URL",
            ));
        }
        let partner_listener = match env.optional::<String>("PARTNER_TLS_DIR")? {
            None => None,
            Some(dir) => {
                let dir = Path::new(&dir);
                Some(PartnerListener {
                    addr: env.or(
                        "PARTNER_LISTEN_ADDR",
                        SocketAddr::from(([0, 0, 0, 0], DEFAULT_PARTNER_PORT)),
                    )?,
                    server: issued(dir, "server.pem", "server-key.pem", "PARTNER_TLS_DIR")?,
                    client_ca_pem: read(dir, "ca.pem", "PARTNER_TLS_DIR")?,
                })
            }
        };
        let mut outbound_tls = BTreeMap::new();
        if let Some(dir) = env.optional::<String>("OUTBOUND_TLS_DIR")? {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| ConfigError::invalid("OUTBOUND_TLS_DIR", e.to_string()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let id = entry.file_name().to_string_lossy().into_owned();
                // A Kubernetes Secret volume holds `..data` and `..<time stamp>` links
                // beside what it projects.
                if !path.is_dir() || id.starts_with('.') {
                    continue;
                }
                outbound_tls.insert(
                    id,
                    OutboundTls {
                        ca_pem: read(&path, "ca.pem", "OUTBOUND_TLS_DIR")?,
                        client: issued(&path, "client.pem", "client-key.pem", "OUTBOUND_TLS_DIR")?,
                    },
                );
            }
        }
        let mut national_check_partners: Vec<String> = Vec::new();
        for id in env
            .or("NATIONAL_CHECK_PARTNERS", String::new())?
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            // Each once, in order: the check's reference names the partners asked.
            if !national_check_partners.iter().any(|p| p == id) {
                national_check_partners.push(id.to_owned());
            }
        }
        if national_check_partners.len() > crate::sync::MAX_CHECKED_PARTNERS
            || national_check_partners
                .iter()
                .any(|p| p != "national" && !is_province(p))
        {
            return Err(ConfigError::invalid(
                "NATIONAL_CHECK_PARTNERS",
                "at most 16 partner ids, each `national` or a province code, comma-separated",
            ));
        }
        if !national_check_partners.is_empty() && risk_url.is_none() {
            return Err(ConfigError::invalid(
                "NATIONAL_CHECK_PARTNERS",
                "needs RISK_URL: the answers are recorded in risk",
            ));
        }
        let positive = |name: &str, value: u64| {
            if value == 0 {
                Err(ConfigError::invalid(name, "must be at least 1"))
            } else {
                Ok(value)
            }
        };
        Ok(ExchangeConfig {
            server: ServerSettings::from_env(env, ([0, 0, 0, 0], DEFAULT_PORT).into())?,
            partner_listener,
            outbound_tls,
            db: DbConfig::from_env(env)?,
            redis: RedisSettings::from_env(env)?,
            cache_prefix: env.or("CACHE_PREFIX", "hc:".to_owned())?,
            telemetry: TelemetryConfig::from_env(env, "exchange")?,
            issuer_keys,
            province_code,
            signing_key,
            identity_url,
            risk_url,
            service_token: env.required("SERVICE_TOKEN")?,
            upstream_timeout: Duration::from_millis(positive(
                "UPSTREAM_TIMEOUT_MS",
                env.or("UPSTREAM_TIMEOUT_MS", 2_000u64)?,
            )?),
            // Names this replica in the consumer group and the follow leases: distinct per
            // replica (Kubernetes sets HOSTNAME to the pod name).
            consumer_name: env.or(
                "CONSUMER_NAME",
                env.raw("HOSTNAME").unwrap_or("exchange-0").to_owned(),
            )?,
            heartbeat: Duration::from_millis(positive(
                "HEARTBEAT_MS",
                env.or("HEARTBEAT_MS", 10_000u64)?,
            )?),
            max_streams_per_partner: positive(
                "PARTNER_MAX_STREAMS",
                env.or("PARTNER_MAX_STREAMS", 2u64)?,
            )? as usize,
            max_calls_per_partner: positive(
                "PARTNER_MAX_CALLS",
                env.or("PARTNER_MAX_CALLS", 16u64)?,
            )? as usize,
            national_check_partners,
        })
    }
}

/// Fresh secrets for a development or test deployment: the record signing key (its id
/// defaults to one naming the province).
pub fn generate_dev_secrets() -> Result<Vec<(String, String)>, healthcode_crypto::CryptoError> {
    let key = SigningKey::generate("exchange-dev")?;
    Ok(vec![("SIGNING_KEY".into(), key.secret_hex())])
}
