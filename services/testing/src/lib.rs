//! The testing service: nucleic-acid test institutions and their slots, bookings with
//! payment, samples (single and pooled), laboratory results, retest notices and
//! negative-result certificates. Every report reaches the risk service through the outbox
//! (`testing.result`); retest notices reach persons through the outbox and the notifier.

pub mod config;
pub mod notify;
pub mod payments;
pub mod results;
pub mod rpc;
pub mod seed;
pub mod service;
pub mod store;

use crate::config::TestingConfig;
use crate::notify::{NoticesToPersons, Notifier};
use crate::payments::Providers;
use crate::rpc::TestingRpc;
use crate::service::{NOTICE_GROUP, NOTICE_TOPIC, Settings, Testing, Upstreams};
use healthcode_auth::TokenVerifier;
use healthcode_events::{
    Backends, Consumer, ConsumerHandle, ConsumerSettings, Relay, RelayHandle, RelaySettings,
};
use healthcode_proto::testing::v1::testing_service_server::{SERVICE_NAME, TestingServiceServer};
use healthcode_server::RunningServer;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub use service::RESULT_TOPIC;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Upstream(#[from] healthcode_server::outbound::OutboundError),
}

/// What the service talks to outside the mesh: payment providers and the notifier.
pub struct Externals {
    pub providers: Providers,
    pub notifier: Arc<dyn Notifier>,
}

pub struct Application {
    server: RunningServer,
    db: DatabaseConnection,
    testing: Arc<Testing>,
    relay: RelayHandle,
    notices: ConsumerHandle,
    stop_jobs: watch::Sender<bool>,
    jobs: tokio::task::JoinHandle<()>,
}

impl Application {
    pub async fn build(
        config: TestingConfig,
        backends: Backends,
        externals: Externals,
    ) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<store::Migrator>(&config.db).await?;
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let upstreams = Upstreams::new(
            &config.identity_url,
            &config.gateway_url,
            &config.service_token,
            config.upstream_timeout,
        )?;
        let mut keys = config.retired_keys;
        keys.insert(config.signing_key.verifying_key());
        let testing = Arc::new(Testing::new(
            db.clone(),
            relay.clone(),
            externals.providers,
            config.signing_key,
            keys,
            upstreams,
            Settings {
                province: config.province_code,
                payment_window: config.payment_window,
                retest_due: config.retest_due,
            },
        ));
        let rpc = TestingRpc::new(testing.clone(), TokenVerifier::new(config.issuer_keys));
        let routes = tonic::service::Routes::new(
            TestingServiceServer::new(rpc).max_decoding_message_size(16 * 1024 * 1024),
        );
        let server = healthcode_server::start(
            &config.server,
            routes,
            &[SERVICE_NAME],
            healthcode_proto::FILE_DESCRIPTOR_SET,
        )
        .await?;
        let notices = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings::new(NOTICE_TOPIC, NOTICE_GROUP, &config.consumer_name),
            Arc::new(NoticesToPersons {
                db: db.clone(),
                notifier: externals.notifier,
            }),
        )
        .spawn();
        let (stop_jobs, mut stopped) = watch::channel(false);
        let jobs = {
            let testing = testing.clone();
            let interval = config.job_interval;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stopped.changed() => break,
                        _ = tokio::time::sleep(interval) => {}
                    }
                    match testing.expire_once(500).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(expired = n, "unpaid bookings expired"),
                        Err(err) => tracing::warn!(error = %err, "expiring bookings failed"),
                    }
                    match testing.refund_once(100).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(refunded = n, "refunds sent"),
                        Err(err) => tracing::warn!(error = %err, "sending refunds failed"),
                    }
                }
            })
        };
        Ok(Application {
            server,
            db,
            testing,
            relay: relay.spawn(),
            notices,
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
    pub fn testing(&self) -> &Arc<Testing> {
        &self.testing
    }

    /// Drains requests, stops the jobs and the consumer, relays what committed, closes.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.notices.shutdown().await;
        let _ = self.stop_jobs.send(true);
        let _ = self.jobs.await;
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

healthcode_server::process!(Application);
