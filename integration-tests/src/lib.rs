//! What every integration test needs: a fresh PostgreSQL database or SQLite file, its own
//! Redis key space, fresh keys, and caller tokens. The services run for real, on port 0.

pub mod exchange;
pub mod mesh;
pub mod vaccination;

use healthcode_auth::{TokenIssuer, roles};
use healthcode_config::Env;
use healthcode_crypto::SigningKey;
use sea_orm::{ConnectionTrait, Database};

pub const ADMIN_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| ADMIN_DATABASE_URL.to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| REDIS_URL.to_owned())
}

/// Where a test's service keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL and Redis on this machine: what production runs.
    Real,
    /// SQLite and the in-process cache: the embedded default.
    Embedded,
}

/// Creates a database of its own on the PostgreSQL server and returns its URL.
pub async fn fresh_postgres_database() -> String {
    let admin = admin_url();
    let name = format!("hc_it_{}", uuid::Uuid::new_v4().simple());
    let db = Database::connect(admin.as_str())
        .await
        .expect("PostgreSQL must be running (see stack.md)");
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    db.close().await.ok();
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&admin);
    format!("{base}/{name}")
}

pub fn fresh_sqlite_url() -> String {
    let dir = std::env::temp_dir().join(format!("hc-it-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    format!("sqlite://{}?mode=rwc", dir.join("identity.db").display())
}

/// Fresh keys and an issuer whose tokens the service trusts.
pub struct TestKeys {
    pub issuer: TokenIssuer,
}

impl Default for TestKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl TestKeys {
    pub fn new() -> Self {
        TestKeys {
            issuer: TokenIssuer::new(SigningKey::generate("test-issuer").expect("issuer key")),
        }
    }

    pub fn token(&self, subject: &str, granted: &[&str]) -> String {
        self.issuer
            .mint(subject, granted, chrono::Utc::now().timestamp(), 3600)
            .expect("mint")
    }

    pub fn app(&self) -> String {
        self.token("super-app", &[roles::APP])
    }
}

/// The environment of an identity service for `backend`, listening on a free port.
pub async fn identity_env(backend: Backend, keys: &TestKeys) -> Env {
    let mut env = Env::from_pairs(identity::config::generate_dev_secrets().expect("secrets"))
        .with("LISTEN_ADDR", "127.0.0.1:0")
        .with("PROVIDERS", "local")
        .with("AUTH_ISSUER_KEYS", keys.issuer.trusted_spec())
        .with("SHUTDOWN_GRACE_SECONDS", "5")
        .with(
            "CACHE_PREFIX",
            format!("it:{}:", uuid::Uuid::new_v4().simple()),
        );
    env = match backend {
        Backend::Real => env
            .with("DATABASE_URL", fresh_postgres_database().await)
            .with("REDIS_URL", redis_url()),
        Backend::Embedded => env.with("DATABASE_URL", fresh_sqlite_url()),
    };
    env
}

/// `authorization` metadata for a request.
pub fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("ascii token");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Drops a database made by [`fresh_postgres_database`] once its service has stopped. A
/// SQLite URL removes its directory instead.
pub async fn drop_test_database(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let file = path.split('?').next().unwrap_or(path);
        if let Some(dir) = std::path::Path::new(file).parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        return;
    }
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    if !name.starts_with("hc_it_") {
        return;
    }
    if let Ok(db) = Database::connect(admin_url().as_str()).await {
        let _ = db
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
        db.close().await.ok();
    }
}

/// The fields named by an INVALID_ARGUMENT status, sorted.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .expect("field violations")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    fields
}

/// The machine-readable reason of a status (its ErrorInfo), or empty.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The one number a `SELECT COUNT(*) ...` returns.
pub async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .expect("count query")
    .expect("one row")
    .try_get_by_index::<i64>(0)
    .expect("a count")
}
