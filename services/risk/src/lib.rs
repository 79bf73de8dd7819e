//! The risk service: decides every person's color from risk events, directives (with
//! double confirmation), manual overrides (two approvers) and the province's versioned
//! policy; keeps the color record, its history and an insert-only audit trail; writes the
//! color cache through and publishes every change through the outbox.

pub mod appeals;
pub mod bulk;
pub mod config;
pub mod domain;
pub mod migration;
pub mod ops;
pub mod policies;
pub mod rpc;
pub mod service;
pub mod store;

use crate::config::RiskConfig;
use crate::policies::PolicyBook;
use crate::rpc::RiskRpc;
use crate::service::Risk;
use crate::store::Store;
use chrono::TimeZone;
use healthcode_auth::TokenVerifier;
use healthcode_events::{
    Backends, Consumer, ConsumerHandle, ConsumerSettings, Event, Handler, HandlerError, Relay,
    RelayHandle, RelaySettings,
};
use healthcode_proto::risk::v1::RiskEvent;
use healthcode_proto::risk::v1::risk_service_server::{RiskServiceServer, SERVICE_NAME};
use healthcode_server::RunningServer;
use prost::Message;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The gateway's topic of venue scans and check-ins (`RiskEvent`s with an area stay).
pub const PLACE_VISIT_TOPIC: &str = "gateway.place_visit";
/// The consumer group that turns venue visits into itinerary stays.
pub const VISIT_GROUP: &str = "risk-itinerary";
/// The testing service's topic of reports (`RiskEvent`s with a test result, whose
/// `event_id` is the report id).
pub const TEST_RESULT_TOPIC: &str = "testing.result";
/// The consumer group that records test results.
pub const TEST_RESULT_GROUP: &str = "risk-test-results";
/// The vaccination service's topic of recorded doses (`RiskEvent`s with a vaccination dose,
/// whose `event_id` is the dose id).
pub const VACCINATION_DOSE_TOPIC: &str = "vaccination.dose";
/// The consumer group that records vaccination doses.
pub const VACCINATION_DOSE_GROUP: &str = "risk-vaccination-doses";

/// Events another service publishes (venue visits, test results) recorded like
/// RecordEvents: idempotent by event id, so a redelivered entry counts once.
pub struct EventsFromTopic {
    risk: Arc<Risk>,
    subject: &'static str,
}

impl EventsFromTopic {
    pub fn new(risk: Arc<Risk>, subject: &'static str) -> Self {
        EventsFromTopic { risk, subject }
    }
}

#[async_trait::async_trait]
impl Handler for EventsFromTopic {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        let mut stays = Vec::with_capacity(events.len());
        for event in events {
            match RiskEvent::decode(&event.payload[..]) {
                // Other provinces' decisions come only through RecordEvents, from the
                // exchange, never from this mesh's topics.
                Ok(e)
                    if matches!(
                        e.event,
                        Some(
                            healthcode_proto::risk::v1::risk_event::Event::OtherProvinceDecision(_)
                        )
                    ) =>
                {
                    tracing::warn!(event_id = %event.id, topic = self.subject, "another province's decision on a topic skipped")
                }
                Ok(e) if rpc::valid_event(&e) => stays.push(e),
                // Acknowledged and dropped: a redelivery would be just as unreadable.
                _ => {
                    tracing::warn!(event_id = %event.id, topic = self.subject, "unusable event skipped")
                }
            }
        }
        if stays.is_empty() {
            return Ok(());
        }
        let actor = service::Actor {
            subject: self.subject.into(),
            roles: vec![healthcode_auth::roles::INTERNAL.into()],
        };
        for chunk in stays.chunks(rpc::MAX_BATCH) {
            self.risk
                .record_events(&actor, chunk.to_vec())
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
}

pub struct Application {
    server: RunningServer,
    db: DatabaseConnection,
    risk: Arc<Risk>,
    relay: RelayHandle,
    visits: ConsumerHandle,
    results: ConsumerHandle,
    doses: ConsumerHandle,
    stop_jobs: watch::Sender<bool>,
    jobs: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Connects, migrates, seeds the default policy if the province has none, binds (port
    /// 0 allowed) and serves in the background with the relay and the scheduled jobs.
    pub async fn build(config: RiskConfig, backends: Backends) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<migration::Migrator>(&config.db).await?;
        let policies = Arc::new(PolicyBook::new(&config.province_code));
        let epoch = chrono::Utc
            .with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        policies.seed(&db, epoch).await?;
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let risk = Arc::new(Risk::new(
            Store::new(db.clone()),
            backends.cache.clone(),
            relay.clone(),
            policies.clone(),
            Arc::new(config.field_cipher),
        ));
        let rpc = RiskRpc::new(risk.clone(), TokenVerifier::new(config.issuer_keys));
        let routes = tonic::service::Routes::new(
            RiskServiceServer::new(rpc).max_decoding_message_size(8 * 1024 * 1024),
        );
        let server = healthcode_server::start(
            &config.server,
            routes,
            &[SERVICE_NAME],
            healthcode_proto::FILE_DESCRIPTOR_SET,
        )
        .await?;
        let (stop_jobs, stopped) = watch::channel(false);
        let jobs = vec![
            spawn_job("sweep", config.sweep_interval, stopped.clone(), {
                let risk = risk.clone();
                move || {
                    let risk = risk.clone();
                    async move {
                        let due = risk.sweep_once(500).await.map_err(|e| e.to_string())?;
                        risk.policies()
                            .reload(&risk.store().db)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(due as u64)
                    }
                }
            }),
            spawn_job("itinerary purge", config.purge_interval, stopped, {
                let risk = risk.clone();
                move || {
                    let risk = risk.clone();
                    async move { risk.purge_once().await.map_err(|e| e.to_string()) }
                }
            }),
        ];
        let visits = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings::new(PLACE_VISIT_TOPIC, VISIT_GROUP, &config.consumer_name),
            Arc::new(EventsFromTopic::new(risk.clone(), "gateway-visits")),
        )
        .spawn();
        let results = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings::new(TEST_RESULT_TOPIC, TEST_RESULT_GROUP, &config.consumer_name),
            Arc::new(EventsFromTopic::new(risk.clone(), "testing-results")),
        )
        .spawn();
        let doses = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings::new(
                VACCINATION_DOSE_TOPIC,
                VACCINATION_DOSE_GROUP,
                &config.consumer_name,
            ),
            Arc::new(EventsFromTopic::new(risk.clone(), "vaccination-doses")),
        )
        .spawn();
        Ok(Application {
            server,
            db,
            risk,
            relay: relay.spawn(),
            visits,
            results,
            doses,
            stop_jobs,
            jobs,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The service behind the RPCs, for tests that run a job now.
    pub fn risk(&self) -> &Arc<Risk> {
        &self.risk
    }

    /// Drains requests, stops the jobs, relays what committed, closes the pool.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.visits.shutdown().await;
        self.results.shutdown().await;
        self.doses.shutdown().await;
        let _ = self.stop_jobs.send(true);
        for job in self.jobs {
            let _ = job.await;
        }
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

/// Runs `work` every `interval` until stopped; failures are logged and retried next time.
fn spawn_job<F, Fut>(
    name: &'static str,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
    work: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            match work().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(job = name, items = n, "scheduled job done"),
                Err(err) => tracing::warn!(job = name, error = %err, "scheduled job failed"),
            }
        }
    })
}

healthcode_server::process!(Application);
