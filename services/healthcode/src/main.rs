//! `healthcode`: runs the whole mesh in one process on the embedded default, and the small
//! tools an operator needs (caller tokens, fresh keys).

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use healthcode_auth::{TokenIssuer, roles};
use healthcode_config::Env;
use healthcode_crypto::SigningKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "healthcode", version, about = "The health code mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every service in this process. Without DATABASE_URL / REDIS_URL it keeps its data
    /// in SQLite files under the data directory and caches in memory.
    Up {
        /// Where SQLite files and the development secrets live.
        #[arg(long, env = "HEALTHCODE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "HEALTHCODE_HOST", default_value = "127.0.0.1")]
        host: String,
        /// Port of the identity service (0 picks a free one).
        #[arg(long, env = "IDENTITY_PORT", default_value_t = 50051)]
        identity_port: u16,
        /// Port of the risk service (0 picks a free one).
        #[arg(long, env = "RISK_PORT", default_value_t = 50052)]
        risk_port: u16,
        /// Port of the gateway (0 picks a free one).
        #[arg(long, env = "GATEWAY_PORT", default_value_t = 50050)]
        gateway_port: u16,
        #[arg(long, env = "TESTING_PORT", default_value_t = 50053)]
        testing_port: u16,
        #[arg(long, env = "VACCINATION_PORT", default_value_t = 50054)]
        vaccination_port: u16,
        /// Port of the exchange's internal listener (its partner listener needs
        /// PARTNER_TLS_DIR, see `exchange-pki`).
        #[arg(long, env = "EXCHANGE_PORT", default_value_t = 50055)]
        exchange_port: u16,
    },
    /// Loads a realistic set of testing institutions with slots into the testing service's
    /// database (`DATABASE_URL`, or the embedded default's file in the data directory).
    SeedInstitutions {
        #[arg(long, env = "HEALTHCODE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 3000)]
        count: usize,
        /// Days of half-hour slots from today.
        #[arg(long, default_value_t = 2)]
        days: u32,
        #[arg(long, default_value_t = 50)]
        capacity: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Caller tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Writes a development PKI for the exchange service into a new directory: a CA, this
    /// province's server certificate and one client certificate per partner (PEM, keys
    /// readable by their owner only), and the fingerprints to register the partners with.
    /// For development and tests; production certificates come from the provinces' CAs.
    ExchangePki {
        #[arg(long)]
        out: PathBuf,
        /// This province's GB/T 2260 code.
        #[arg(long, default_value = "330000")]
        province: String,
        /// Partner ids to issue client certificates for, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "310000,320000")]
        partners: Vec<String>,
        /// DNS names and IP addresses of this province's exchange endpoint.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "localhost,127.0.0.1,exchange"
        )]
        server_names: Vec<String>,
    },
    /// Prints fresh secrets for a service's Kubernetes Secret, as KEY=VALUE lines.
    Keys {
        /// The service: `identity`, `risk` or `gateway`.
        service: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mints a caller token with the issuer key in ISSUER_SIGNING_KEY (or, without it, the
    /// development issuer of `healthcode up` in the data directory).
    Mint {
        #[arg(long)]
        subject: String,
        /// Comma-separated roles: app, official, reviewer, full_view, venue, internal,
        /// policy_admin, approver, auditor, hotline, batch_checker, health_admin,
        /// institution, lab, payment_provider, vaccination_site, exchange_admin, exchange.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long, default_value_t = 24)]
        ttl_hours: i64,
        #[arg(long, env = "HEALTHCODE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// Generates an issuer key: keep ISSUER_SIGNING_KEY secret, give AUTH_ISSUER_KEYS to services.
    IssuerKey {
        #[arg(long, default_value = "issuer-1")]
        key_id: String,
    },
}

const SECRETS_FILE: &str = "dev-secrets.env";

fn read_env_file(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

fn write_secret_file(path: &Path, entries: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut text =
        String::from("# Development secrets of `healthcode up`. Never use them in production.\n");
    for (k, v) in entries {
        text.push_str(&format!("{k}={v}\n"));
    }
    write_private(path, &text)
}

/// Creates `path` (never overwriting) readable by its owner only, and writes `text`.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    // Readable by its owner only, from the moment it exists.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(())
}

fn exchange_pki(
    out: &Path,
    province: &str,
    partners: &[String],
    server_names: &[String],
) -> anyhow::Result<()> {
    if !exchange::records::is_province(province) {
        bail!("`{province}` is not a GB/T 2260 province-level code");
    }
    // Checked before anything is written: a partner id names files.
    let mut seen = std::collections::BTreeSet::new();
    for id in partners {
        let well_formed = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
        if !well_formed {
            bail!("partner id `{id}` must be 1 to 64 of 0-9, a-z and `-`");
        }
        if !seen.insert(id) {
            bail!("partner id `{id}` is given twice");
        }
    }
    let pki = exchange::tls::generate_dev_pki(province, server_names, partners)?;
    std::fs::create_dir(out)
        .with_context(|| format!("creating {} (must not exist)", out.display()))?;
    let mut files = vec![
        ("ca.pem".to_owned(), pki.ca.certificate_pem.clone()),
        ("server.pem".to_owned(), pki.server.certificate_pem.clone()),
        ("server-key.pem".to_owned(), pki.server.key_pem.clone()),
    ];
    let mut fingerprints = String::from("# partner id, SHA-256 of its client certificate\n");
    for (id, issued) in &pki.partners {
        files.push((format!("partner-{id}.pem"), issued.certificate_pem.clone()));
        files.push((format!("partner-{id}-key.pem"), issued.key_pem.clone()));
        fingerprints.push_str(&format!("{id} {}\n", issued.sha256));
    }
    files.push(("fingerprints.txt".to_owned(), fingerprints));
    for (name, text) in &files {
        write_private(&out.join(name), text)?;
    }
    println!(
        "wrote {} files to {}; the CA's key was not kept: adding a partner means a new CA \
         and handing out every certificate again",
        files.len(),
        out.display()
    );
    Ok(())
}

/// The development secrets, created on first use and kept: SQLite data sealed with them
/// stays readable across restarts.
fn dev_secrets(data_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = data_dir.join(SECRETS_FILE);
    let mut entries = if path.exists() {
        read_env_file(&path)?
    } else {
        std::fs::create_dir_all(data_dir)?;
        let mut entries: BTreeMap<String, String> = identity::config::generate_dev_secrets()?
            .into_iter()
            .collect();
        let issuer = SigningKey::generate("dev-issuer")?;
        entries.insert("ISSUER_SIGNING_KEY".into(), issuer.secret_hex());
        entries.insert("ISSUER_KEY_ID".into(), issuer.key_id().to_owned());
        entries
    };
    // A data directory from before the gateway existed gains its secrets once.
    let mut added = false;
    if !entries.contains_key("GATEWAY_SIGNING_KEY") {
        for (k, v) in gateway::config::generate_dev_secrets()? {
            entries.insert(format!("GATEWAY_{k}"), v);
        }
        added = true;
    }
    if !entries.contains_key("TESTING_SIGNING_KEY") {
        for (k, v) in testing::config::generate_dev_secrets()? {
            entries.insert(format!("TESTING_{k}"), v);
        }
        added = true;
    }
    if !entries.contains_key("VACCINATION_SIGNING_KEY") {
        for (k, v) in vaccination::config::generate_dev_secrets(chrono::Utc::now())
            .map_err(|e| anyhow::anyhow!("vaccination secrets: {e}"))?
        {
            entries.insert(format!("VACCINATION_{k}"), v);
        }
        added = true;
    }
    if !entries.contains_key("EXCHANGE_SIGNING_KEY") {
        for (k, v) in exchange::config::generate_dev_secrets()? {
            entries.insert(format!("EXCHANGE_{k}"), v);
        }
        added = true;
    }
    if !entries.contains_key("EXCHANGE_PSEUDONYM_KEY") {
        entries.insert(
            "EXCHANGE_PSEUDONYM_KEY".into(),
            healthcode_crypto::PseudonymKey::generate_hex()?,
        );
        added = true;
    }
    if added {
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        write_secret_file(&path, &entries)?;
    } else if !path.exists() {
        write_secret_file(&path, &entries)?;
    }
    Ok(entries)
}

fn issuer_from(entries: &BTreeMap<String, String>) -> anyhow::Result<TokenIssuer> {
    let (Some(secret), Some(kid)) = (
        entries.get("ISSUER_SIGNING_KEY"),
        entries.get("ISSUER_KEY_ID"),
    ) else {
        bail!("no ISSUER_SIGNING_KEY / ISSUER_KEY_ID");
    };
    Ok(TokenIssuer::new(SigningKey::from_hex(kid.clone(), secret)?))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The environment every service of `up` shares: the process's own, the development
/// secrets where the process sets none, the development issuer, the province.
fn shared_env(secrets: &BTreeMap<String, String>, issuer: &TokenIssuer) -> Env {
    let process = Env::from_process();
    let mut env = process.clone();
    for (k, v) in secrets {
        if process.raw(k).is_none()
            && !["GATEWAY_", "TESTING_", "VACCINATION_", "EXCHANGE_SIGNING_"]
                .iter()
                .any(|p| k.starts_with(p))
        {
            env = env.with(k.clone(), v.clone());
        }
    }
    if process.raw("PROVINCE_CODE").is_none() {
        env = env.with("PROVINCE_CODE", "330000");
    }
    env.with(
        "AUTH_ISSUER_KEYS",
        match process.raw("AUTH_ISSUER_KEYS") {
            Some(extra) => format!("{},{extra}", issuer.trusted_spec()),
            None => issuer.trusted_spec(),
        },
    )
}

/// One service's environment: its address, and its own SQLite file (or schema).
fn service_env(base: &Env, data_dir: &Path, name: &str, addr: String) -> Env {
    let mut env = base.clone().with("LISTEN_ADDR", addr);
    if Env::from_process().raw("DATABASE_URL").is_none() {
        let file = data_dir.join(format!("{name}.db"));
        env = env.with(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", file.display()),
        );
    } else if Env::from_process().raw("DATABASE_SCHEMA").is_none() {
        env = env.with("DATABASE_SCHEMA", name);
    }
    env
}

struct Ports {
    identity: u16,
    risk: u16,
    gateway: u16,
    testing: u16,
    vaccination: u16,
    exchange: u16,
}

/// The `PREFIX_`-named development secrets, without their prefix.
fn prefixed(env: Env, secrets: &BTreeMap<String, String>, prefix: &str) -> Env {
    secrets
        .iter()
        .fold(env, |env, (k, v)| match k.strip_prefix(prefix) {
            Some(name) => env.with(name.to_owned(), v.clone()),
            None => env,
        })
}

async fn up(data_dir: PathBuf, host: String, ports: Ports) -> anyhow::Result<()> {
    let secrets = dev_secrets(&data_dir)?;
    let issuer = issuer_from(&secrets)?;
    let base = shared_env(&secrets, &issuer);
    let identity_env = service_env(
        &base,
        &data_dir,
        "identity",
        format!("{host}:{}", ports.identity),
    )
    .with("PROVIDERS", "local");
    let config = identity::config::IdentityConfig::from_env(&identity_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let _telemetry = healthcode_telemetry::init(&config.telemetry)?;
    let storage = if config.db.is_sqlite() {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    let cache = if config.redis.is_some() {
        "Redis"
    } else {
        "in-process"
    };

    // The services share one cache and one event bus: Redis when REDIS_URL is set,
    // otherwise one in-process instance of each.
    let backends =
        healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
            .await
            .map_err(anyhow::Error::msg)
            .context("connecting the cache and the event bus")?;
    let (providers, _sms) = identity::providers::Providers::local();
    let identity = identity::Application::build(config, backends.clone(), providers)
        .await
        .context("starting identity")?;

    let risk_env = service_env(&base, &data_dir, "risk", format!("{host}:{}", ports.risk));
    let risk_config = risk::config::RiskConfig::from_env(&risk_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let risk = risk::Application::build(risk_config, backends.clone())
        .await
        .context("starting risk")?;

    let mut gateway_env = service_env(
        &base,
        &data_dir,
        "gateway",
        format!("{host}:{}", ports.gateway),
    )
    .with("RISK_URL", format!("http://{}", risk.local_addr()))
    .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
    .with(
        "SERVICE_TOKEN",
        issuer.mint("gateway", &[roles::INTERNAL], now(), 30 * 24 * 3600)?,
    );
    gateway_env = prefixed(gateway_env, &secrets, "GATEWAY_");
    let gateway_config = gateway::config::GatewayConfig::from_env(&gateway_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let gateway = gateway::Application::build(gateway_config, backends.clone())
        .await
        .context("starting the gateway")?;

    let testing_env = service_env(
        &base,
        &data_dir,
        "testing",
        format!("{host}:{}", ports.testing),
    )
    .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
    .with("GATEWAY_URL", format!("http://{}", gateway.local_addr()))
    .with(
        "SERVICE_TOKEN",
        issuer.mint("testing", &[roles::INTERNAL], now(), 30 * 24 * 3600)?,
    );
    let testing_env = prefixed(testing_env, &secrets, "TESTING_");
    let mut testing_config = testing::config::TestingConfig::from_env(&testing_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let mut providers = testing::payments::Providers::default();
    if let Some(key) = testing_config.sandbox_payment_key.take() {
        providers = providers.with(std::sync::Arc::new(
            testing::payments::SandboxProvider::new(key),
        ));
    }
    let testing = testing::Application::build(
        testing_config,
        backends.clone(),
        testing::Externals {
            providers,
            notifier: std::sync::Arc::new(testing::notify::LocalNotifier::default()),
        },
    )
    .await
    .context("starting testing")?;

    let vaccination_env = service_env(
        &base,
        &data_dir,
        "vaccination",
        format!("{host}:{}", ports.vaccination),
    )
    .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
    .with(
        "SERVICE_TOKEN",
        issuer.mint(
            "vaccination",
            &[roles::INTERNAL, roles::FULL_VIEW],
            now(),
            30 * 24 * 3600,
        )?,
    );
    let vaccination_env = prefixed(vaccination_env, &secrets, "VACCINATION_");
    let vaccination_config = vaccination::config::VaccinationConfig::from_env(&vaccination_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let vaccination = vaccination::Application::build(vaccination_config, backends.clone())
        .await
        .context("starting vaccination")?;

    let exchange_env = service_env(
        &base,
        &data_dir,
        "exchange",
        format!("{host}:{}", ports.exchange),
    )
    .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
    .with("RISK_URL", format!("http://{}", risk.local_addr()))
    .with(
        "SERVICE_TOKEN",
        issuer.mint(
            "exchange",
            &[roles::INTERNAL, roles::EXCHANGE],
            now(),
            30 * 24 * 3600,
        )?,
    );
    let exchange_env = prefixed(exchange_env, &secrets, "EXCHANGE_");
    let exchange_config = exchange::config::ExchangeConfig::from_env(&exchange_env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let exchange = exchange::Application::build(exchange_config, backends)
        .await
        .context("starting the exchange")?;
    let token = issuer.mint("healthcode-up", roles::ALL, now(), 24 * 3600)?;

    println!(
        "health code mesh is up ({storage}, {cache} cache; data in {})",
        data_dir.display()
    );
    println!("  gateway   {}", gateway.local_addr());
    println!("  identity  {}", identity.local_addr());
    println!("  risk      {}", risk.local_addr());
    println!("  testing   {}", testing.local_addr());
    println!("  vaccination {}", vaccination.local_addr());
    match exchange.partner_addr() {
        Some(partners) => println!(
            "  exchange  {} (partners, mutual TLS: {partners})",
            exchange.local_addr()
        ),
        None => println!("  exchange  {}", exchange.local_addr()),
    }
    println!();
    println!("development caller token (all roles, 24 h):");
    println!("  {token}");
    println!();
    println!("try:");
    println!("  grpcurl -plaintext {} list", gateway.local_addr());
    println!("press Ctrl-C to stop");

    healthcode_server::shutdown_signal().await;
    exchange.shutdown().await;
    vaccination.shutdown().await;
    testing.shutdown().await;
    gateway.shutdown().await;
    risk.shutdown().await;
    identity.shutdown().await;
    println!("stopped");
    Ok(())
}

async fn seed_institutions(
    data_dir: PathBuf,
    count: usize,
    days: u32,
    capacity: u32,
    seed: u64,
) -> anyhow::Result<()> {
    let env = service_env(&Env::from_process(), &data_dir, "testing", String::new());
    if Env::from_process().raw("DATABASE_URL").is_none() {
        std::fs::create_dir_all(&data_dir)?;
    }
    let db_config = healthcode_db::DbConfig::from_env(&env)
        .unwrap_or_else(|e| healthcode_config::exit_on_config_error(&e));
    let db = healthcode_db::connect_and_migrate::<testing::store::Migrator>(&db_config).await?;
    let started = std::time::Instant::now();
    let plan = testing::seed::SeedPlan {
        count,
        days,
        capacity,
        seed,
        from: chrono::Utc::now(),
    };
    let created = testing::seed::seed(&db, &plan).await?;
    println!(
        "{created} new institutions ({count} in the plan) with {days} days of half-hour slots, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    db.close().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            data_dir,
            host,
            identity_port,
            risk_port,
            gateway_port,
            testing_port,
            vaccination_port,
            exchange_port,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let ports = Ports {
                identity: identity_port,
                risk: risk_port,
                gateway: gateway_port,
                testing: testing_port,
                vaccination: vaccination_port,
                exchange: exchange_port,
            };
            runtime.block_on(up(data_dir, host, ports))
        }
        Command::SeedInstitutions {
            data_dir,
            count,
            days,
            capacity,
            seed,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(seed_institutions(data_dir, count, days, capacity, seed))
        }
        Command::Token { command } => match command {
            TokenCommand::Mint {
                subject,
                roles: granted,
                ttl_hours,
                data_dir,
            } => {
                let process = Env::from_process();
                let entries: BTreeMap<String, String> = match (
                    process.raw("ISSUER_SIGNING_KEY"),
                    process.raw("ISSUER_KEY_ID"),
                ) {
                    (Some(secret), kid) => [
                        ("ISSUER_SIGNING_KEY".to_owned(), secret.to_owned()),
                        ("ISSUER_KEY_ID".to_owned(), kid.unwrap_or("issuer-1").to_owned()),
                    ]
                    .into(),
                    (None, _) => read_env_file(&data_dir.join(SECRETS_FILE))
                        .context("no ISSUER_SIGNING_KEY and no development secrets; run `healthcode up` first")?,
                };
                for role in &granted {
                    if !roles::ALL.contains(&role.as_str()) {
                        bail!("unknown role `{role}`; known: {}", roles::ALL.join(", "));
                    }
                }
                let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
                let issuer = issuer_from(&entries)?;
                println!(
                    "{}",
                    issuer.mint(&subject, &granted, now(), ttl_hours.max(1) * 3600)?
                );
                Ok(())
            }
            TokenCommand::IssuerKey { key_id } => {
                let issuer = TokenIssuer::new(SigningKey::generate(key_id.clone())?);
                println!("ISSUER_SIGNING_KEY={}", issuer.key().secret_hex());
                println!("ISSUER_KEY_ID={key_id}");
                println!("AUTH_ISSUER_KEYS={}", issuer.trusted_spec());
                Ok(())
            }
        },
        Command::ExchangePki {
            out,
            province,
            partners,
            server_names,
        } => exchange_pki(&out, &province, &partners, &server_names),
        Command::Keys { service } => {
            let secrets = match service.as_str() {
                "identity" => identity::config::generate_dev_secrets()?,
                "risk" => risk::config::generate_dev_secrets()?,
                "gateway" => gateway::config::generate_dev_secrets()?,
                "testing" => testing::config::generate_dev_secrets()?,
                "vaccination" => vaccination::config::generate_dev_secrets(chrono::Utc::now())
                    .map_err(|e| anyhow::anyhow!("vaccination secrets: {e}"))?,
                "exchange" => exchange::config::generate_dev_secrets()?,
                _ => bail!(
                    "unknown service `{service}`; known: identity, risk, gateway, testing, vaccination, exchange"
                ),
            };
            for (k, v) in secrets {
                println!("{k}={v}");
            }
            Ok(())
        }
    }
}
