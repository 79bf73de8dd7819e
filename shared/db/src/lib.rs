//! One way to reach a service's database: a URL picks PostgreSQL (production) or SQLite (the
//! embedded default), and the service's migrations run before it serves.

use healthcode_config::{ConfigError, Env};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use sea_orm_migration::MigratorTrait;
use std::time::Duration;

pub mod replies;
pub mod schema;

pub use sea_orm;
pub use sea_orm_migration;

#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `postgres://…` or `sqlite://path?mode=rwc`.
    pub url: String,
    /// PostgreSQL only: the schema that holds this service's tables (created if missing),
    /// so that services can share a database without sharing tables.
    pub schema: Option<String>,
    pub max_connections: u32,
}

impl DbConfig {
    /// Reads `DATABASE_URL`, `DATABASE_SCHEMA` and `DATABASE_MAX_CONNECTIONS`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let url: String = env.required("DATABASE_URL")?;
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err(ConfigError::invalid(
                "DATABASE_URL",
                "expected a postgres:// or sqlite: URL",
            ));
        }
        let schema: Option<String> = env.optional("DATABASE_SCHEMA")?;
        if let Some(schema) = &schema
            && !is_identifier(schema)
        {
            return Err(ConfigError::invalid(
                "DATABASE_SCHEMA",
                "expected lower-case letters, digits and underscores",
            ));
        }
        Ok(DbConfig {
            url,
            schema,
            max_connections: env.or("DATABASE_MAX_CONNECTIONS", 16u32)?,
        })
    }

    pub fn is_sqlite(&self) -> bool {
        self.url.starts_with("sqlite:")
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn options(config: &DbConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new(config.url.clone());
    options
        .max_connections(config.max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(3))
        // Well inside the request deadline, so that a saturated pool is UNAVAILABLE (retry
        // elsewhere) rather than a request that times out.
        .acquire_timeout(Duration::from_secs(1))
        // Statements would otherwise be logged with their parameters at INFO.
        .sqlx_logging(false);
    if let (Some(schema), false) = (&config.schema, config.is_sqlite()) {
        options.set_schema_search_path(schema.clone());
    }
    options
}

/// Connects, prepares the schema, and runs the service's migrations.
pub async fn connect_and_migrate<M: MigratorTrait>(
    config: &DbConfig,
) -> Result<DatabaseConnection, DbErr> {
    if let (Some(schema), false) = (&config.schema, config.is_sqlite()) {
        let mut bootstrap = ConnectOptions::new(config.url.clone());
        bootstrap.max_connections(1).sqlx_logging(false);
        let db = Database::connect(bootstrap).await?;
        db.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await?;
        db.close().await?;
    }
    let db = Database::connect(options(config)).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        // Readers do not block the writer, and the file survives a crash mid-write.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        M::up(&db, None).await?;
        return Ok(db);
    }
    // Replicas start together: one migrates while the others wait on the lock, then find
    // nothing left to do. The lock lives on a connection of its own, outside the pool.
    let mut lock_options = ConnectOptions::new(config.url.clone());
    lock_options.max_connections(1).sqlx_logging(false);
    let lock = Database::connect(lock_options).await?;
    let key = format!(
        "healthcode-migrate:{}",
        config.schema.as_deref().unwrap_or("public")
    );
    lock.execute_unprepared(&format!("SELECT pg_advisory_lock(hashtext('{key}'))"))
        .await?;
    let migrated = M::up(&db, None).await;
    let unlocked = lock
        .execute_unprepared(&format!("SELECT pg_advisory_unlock(hashtext('{key}'))"))
        .await;
    lock.close().await.ok();
    migrated?;
    unlocked?;
    Ok(db)
}

/// Whether an error is a unique-constraint violation (a duplicate), on either backend.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// The status a database failure becomes: UNAVAILABLE (retry) when the database is away or
/// the pool saturated, otherwise a bare INTERNAL whose detail is only logged.
pub fn db_error(err: DbErr) -> healthcode_errors::ServiceError {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
            tracing::warn!(error = %err, "database unavailable");
            healthcode_errors::ServiceError::Unavailable(
                "the database is unavailable; retry later".into(),
            )
        }
        other => healthcode_errors::ServiceError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_requires_a_known_url_and_a_safe_schema_name() {
        assert!(DbConfig::from_env(&Env::default()).is_err());
        let env = Env::from_pairs([("DATABASE_URL", "mysql://x")]);
        assert!(DbConfig::from_env(&env).is_err());
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://localhost/db"),
            ("DATABASE_SCHEMA", "x\"; drop"),
        ]);
        assert!(DbConfig::from_env(&env).is_err());
        let env = Env::from_pairs([
            ("DATABASE_URL", "sqlite://data/identity.db?mode=rwc"),
            ("DATABASE_SCHEMA", "identity"),
        ]);
        let config = DbConfig::from_env(&env).unwrap();
        assert!(config.is_sqlite());
        assert_eq!(config.schema.as_deref(), Some("identity"));
    }
}
