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
    },
    /// Caller tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Prints fresh secrets for a service's Kubernetes Secret, as KEY=VALUE lines.
    Keys {
        /// The service (only `identity` so far).
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
        /// Comma-separated roles: app, official, reviewer, full_view, venue.
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

/// The development secrets, created on first use and kept: SQLite data sealed with them
/// stays readable across restarts.
fn dev_secrets(data_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = data_dir.join(SECRETS_FILE);
    if path.exists() {
        return read_env_file(&path);
    }
    std::fs::create_dir_all(data_dir)?;
    let mut entries: BTreeMap<String, String> = identity::config::generate_dev_secrets()?
        .into_iter()
        .collect();
    let issuer = SigningKey::generate("dev-issuer")?;
    entries.insert("ISSUER_SIGNING_KEY".into(), issuer.secret_hex());
    entries.insert("ISSUER_KEY_ID".into(), issuer.key_id().to_owned());
    write_secret_file(&path, &entries)?;
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

async fn up(data_dir: PathBuf, host: String, identity_port: u16) -> anyhow::Result<()> {
    let secrets = dev_secrets(&data_dir)?;
    let issuer = issuer_from(&secrets)?;
    let process = Env::from_process();
    let mut env = process.clone();
    for (k, v) in &secrets {
        if process.raw(k).is_none() {
            env = env.with(k.clone(), v.clone());
        }
    }
    env = env
        .with("PROVIDERS", "local")
        .with("LISTEN_ADDR", format!("{host}:{identity_port}"))
        .with(
            "AUTH_ISSUER_KEYS",
            match process.raw("AUTH_ISSUER_KEYS") {
                Some(extra) => format!("{},{extra}", issuer.trusted_spec()),
                None => issuer.trusted_spec(),
            },
        );
    if process.raw("DATABASE_URL").is_none() {
        let file = data_dir.join("identity.db");
        env = env.with(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", file.display()),
        );
    } else if process.raw("DATABASE_SCHEMA").is_none() {
        env = env.with("DATABASE_SCHEMA", "identity");
    }
    let config = identity::config::IdentityConfig::from_env(&env)
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

    let (providers, _sms) = identity::providers::Providers::local();
    let identity = identity::Application::build(config, providers)
        .await
        .context("starting identity")?;
    let token = issuer.mint("healthcode-up", roles::ALL, now(), 24 * 3600)?;

    println!(
        "health code mesh is up ({storage}, {cache} cache; data in {})",
        data_dir.display()
    );
    println!("  identity  {}", identity.local_addr());
    println!();
    println!("development caller token (all roles, 24 h):");
    println!("  {token}");
    println!();
    println!("try:");
    println!("  grpcurl -plaintext {} list", identity.local_addr());
    println!("press Ctrl-C to stop");

    healthcode_server::shutdown_signal().await;
    identity.shutdown().await;
    println!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            data_dir,
            host,
            identity_port,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(up(data_dir, host, identity_port))
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
        Command::Keys { service } => {
            if service != "identity" {
                bail!("unknown service `{service}`; known: identity");
            }
            for (k, v) in identity::config::generate_dev_secrets()? {
                println!("{k}={v}");
            }
            Ok(())
        }
    }
}
