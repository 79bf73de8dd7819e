//! Moves committed outbox rows to the bus. Rows are marked published only after the bus
//! took them, so a crash in between publishes them again (consumers deduplicate by id).
//! Replicas share the work on PostgreSQL: each locks its batch with SKIP LOCKED.

use crate::bus::{Event, SharedBus};
use crate::outbox::entity;
use sea_orm::sea_query::{LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows per round trip.
    pub batch: u64,
    /// How often to look when nobody wakes the relay.
    pub poll: Duration,
    /// Published rows are deleted after this long.
    pub keep_published: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            batch: 500,
            poll: Duration::from_millis(200),
            keep_published: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    bus: SharedBus,
    settings: RelaySettings,
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(db: DatabaseConnection, bus: SharedBus, settings: RelaySettings) -> Self {
        Relay {
            db,
            bus,
            settings,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Call after committing an event to relay it now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes one batch; returns how many rows it moved.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let txn = self.db.begin().await?;
        let mut query = entity::Entity::find()
            .filter(entity::Column::PublishedAt.is_null())
            .order_by_asc(entity::Column::Seq)
            .limit(self.settings.batch);
        if self.db.get_database_backend() == DbBackend::Postgres {
            query = query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let rows = query.all(&txn).await?;
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(0);
        }
        let events: Vec<Event> = rows
            .iter()
            .map(|row| Event {
                id: row.id.clone(),
                topic: row.topic.clone(),
                key: row.key.clone(),
                payload: row.payload.clone(),
            })
            .collect();
        self.bus.publish(&events).await?;
        let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
        entity::Entity::update_many()
            .col_expr(
                entity::Column::PublishedAt,
                sea_orm::sea_query::Expr::value(chrono::Utc::now()),
            )
            .filter(entity::Column::Seq.is_in(seqs))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.len())
    }

    /// Deletes rows published longer ago than `keep_published`.
    pub async fn purge_published(&self) -> Result<u64, RelayError> {
        let keep = chrono::Duration::from_std(self.settings.keep_published)
            .unwrap_or(chrono::Duration::days(1));
        let cutoff = chrono::Utc::now() - keep;
        let result = entity::Entity::delete_many()
            .filter(entity::Column::PublishedAt.lt(cutoff))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected)
    }

    /// Runs until shut down, backing off while the bus or the database is down.
    pub fn spawn(self) -> RelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let relay = self.clone();
        let task = tokio::spawn(async move {
            let mut failures: u32 = 0;
            let mut rounds: u64 = 0;
            loop {
                rounds += 1;
                if rounds.is_multiple_of(3000)
                    && let Err(err) = relay.purge_published().await
                {
                    tracing::warn!(error = %err, "outbox purge failed");
                }
                let wait = match relay.relay_once().await {
                    Ok(n) if n as u64 >= relay.settings.batch => {
                        failures = 0;
                        continue;
                    }
                    Ok(_) => {
                        failures = 0;
                        relay.settings.poll
                    }
                    Err(err) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(error = %err, failures, "outbox relay failed; retrying");
                        }
                        backoff(failures)
                    }
                };
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = relay.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            // What committed before the stop still goes out if the bus is there.
            if let Err(err) = relay.relay_once().await {
                tracing::warn!(error = %err, "final outbox relay failed; rows stay for the next start");
            }
        });
        RelayHandle { stop, task }
    }
}

pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000))
}

pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "outbox relay task ended abnormally");
        }
    }
}
