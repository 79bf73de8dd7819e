//! The outbox relay and the consumer group against real PostgreSQL and Redis, and the
//! in-process bus of the embedded default: nothing lost, nothing applied twice.

use async_trait::async_trait;
use healthcode_cache::RedisSettings;
use healthcode_events::outbox::{self, migration::CreateOutbox};
use healthcode_events::{
    Consumer, ConsumerSettings, Event, Handler, HandlerError, MemoryBus, RedisBus, Relay,
    RelaySettings, SharedBus,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use sea_orm_migration::prelude::*;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Migrator;

#[async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateOutbox)]
    }
}

async fn postgres() -> (DatabaseConnection, String) {
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("hc_ev_{}", uuid::Uuid::new_v4().simple());
    let db = Database::connect(admin.as_str())
        .await
        .expect("PostgreSQL is running");
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let conn = Database::connect(url.as_str()).await.unwrap();
    Migrator::up(&conn, None).await.unwrap();
    (conn, name)
}

async fn sqlite() -> DatabaseConnection {
    let conn = Database::connect("sqlite::memory:").await.unwrap();
    Migrator::up(&conn, None).await.unwrap();
    conn
}

async fn redis_bus() -> SharedBus {
    let settings = RedisSettings {
        urls: vec![
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
        ],
        cluster: false,
        response_timeout: Duration::from_secs(1),
    };
    Arc::new(
        RedisBus::connect(&settings, &format!("ev:{}:", uuid::Uuid::new_v4().simple()))
            .await
            .unwrap(),
    )
}

/// Applies events once by id, like a real idempotent handler; can be told to fail.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<String>>,
    applied: Mutex<BTreeSet<String>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        for e in events {
            self.seen.lock().unwrap().push(e.id.clone());
            self.applied.lock().unwrap().insert(e.id.clone());
        }
        Ok(())
    }
}

async fn commit_events(db: &DatabaseConnection, n: usize) -> Vec<String> {
    let txn = db.begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            outbox::enqueue(&txn, "test.topic", &format!("k{i}"), vec![i as u8])
                .await
                .unwrap(),
        );
    }
    txn.commit().await.unwrap();
    ids
}

async fn drain(consumer: &Consumer) {
    for _ in 0..50 {
        if consumer.poll_once().await.unwrap() == 0 {
            return;
        }
    }
}

async fn delivery_survives_crashes(db: DatabaseConnection, bus: SharedBus) {
    // Rolled back: never published.
    let txn = db.begin().await.unwrap();
    outbox::enqueue(&txn, "test.topic", "k", vec![9])
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    let ids = commit_events(&db, 25).await;
    let relay = Relay::new(
        db.clone(),
        bus.clone(),
        RelaySettings {
            batch: 10,
            ..Default::default()
        },
    );
    let mut moved = 0;
    while let n @ 1.. = relay.relay_once().await.unwrap() {
        moved += n;
    }
    assert_eq!(moved, 25);
    // A relay that crashed after publishing publishes again; consumers deduplicate.
    bus.publish(&[Event {
        id: ids[0].clone(),
        topic: "test.topic".into(),
        key: "k0".into(),
        payload: vec![0],
    }])
    .await
    .unwrap();

    // The first consumer reads a batch and dies before acknowledging it.
    let settings = ConsumerSettings {
        batch: 7,
        claim_after: Duration::from_millis(200),
        ..ConsumerSettings::new("test.topic", "g", "c1")
    };
    bus.ensure_group("test.topic", "g").await.unwrap();
    let lost = bus.read_new("test.topic", "g", "c1", 7).await.unwrap();
    assert_eq!(lost.len(), 7);
    // Another replica takes over the dead one's entries once they are stale.
    let recorder = Arc::new(Recorder::default());
    let c2 = Consumer::new(
        bus.clone(),
        ConsumerSettings {
            consumer: "c2".into(),
            ..settings.clone()
        },
        recorder.clone(),
    );
    drain(&c2).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    drain(&c2).await;
    let applied = recorder.applied.lock().unwrap().clone();
    assert_eq!(
        applied,
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "every committed event, nothing else"
    );
    assert!(recorder.seen.lock().unwrap().len() >= 25);
    // Nothing is left pending.
    let c1 = Consumer::new(bus.clone(), settings, recorder.clone());
    assert_eq!(c1.poll_once().await.unwrap(), 0);
}

#[tokio::test]
async fn delivery_survives_crashes_on_postgres_and_redis() {
    let (db, name) = postgres().await;
    delivery_survives_crashes(db.clone(), redis_bus().await).await;
    db.close().await.ok();
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = Database::connect(admin.as_str()).await.unwrap();
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .ok();
}

#[tokio::test]
async fn delivery_survives_crashes_on_the_embedded_default() {
    delivery_survives_crashes(sqlite().await, Arc::new(MemoryBus::new())).await;
}

#[tokio::test]
async fn a_consumer_restarted_under_its_name_finishes_its_own_batch() {
    let bus = redis_bus().await;
    let events: Vec<Event> = (0..5)
        .map(|i| Event {
            id: format!("e{i}"),
            topic: "t2".into(),
            key: "k".into(),
            payload: vec![],
        })
        .collect();
    bus.ensure_group("t2", "g").await.unwrap();
    bus.publish(&events).await.unwrap();
    let taken = bus.read_new("t2", "g", "pod-a", 3).await.unwrap();
    assert_eq!(taken.len(), 3);
    // pod-a restarts: it first finishes what it held, then reads on.
    let recorder = Arc::new(Recorder::default());
    let again = Consumer::new(
        bus.clone(),
        ConsumerSettings::new("t2", "g", "pod-a"),
        recorder.clone(),
    );
    assert_eq!(again.poll_once().await.unwrap(), 3);
    assert_eq!(again.poll_once().await.unwrap(), 2);
    assert_eq!(again.poll_once().await.unwrap(), 0);
    assert_eq!(recorder.seen.lock().unwrap().len(), 5);
}
