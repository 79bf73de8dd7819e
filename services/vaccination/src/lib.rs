//! The vaccination service: vaccines, sites and their workers' keys, doses signed by the
//! worker who gave them, late entries, the domestic certificate (SM2), the international one
//! in the EU Digital COVID Certificate format, PDF export, and booster reminders near a
//! site. Every recorded dose reaches the risk service through the outbox
//! (`vaccination.dose`).

pub mod certs;
pub mod config;
pub mod dcc;
pub mod pdf;
pub mod recognition;
pub mod rpc;
pub mod service;
pub mod store;

use crate::config::VaccinationConfig;
use crate::rpc::VaccinationRpc;
use crate::service::{Keys, Settings, Vaccination};
use healthcode_auth::TokenVerifier;
use healthcode_events::{Backends, Relay, RelayHandle, RelaySettings};
use healthcode_proto::vaccination::v1::vaccination_service_server::{
    SERVICE_NAME, VaccinationServiceServer,
};
use healthcode_server::RunningServer;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;

pub use service::DOSE_TOPIC;

/// A stable id for `kind` of `id`: retries name one thing.
pub(crate) fn derived(kind: &str, id: &str) -> String {
    healthcode_crypto::derived_id(&format!("{kind}:{id}"))
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Upstream(#[from] healthcode_server::outbound::OutboundError),
}

pub struct Application {
    server: RunningServer,
    db: DatabaseConnection,
    service: Arc<Vaccination>,
    relay: RelayHandle,
}

impl Application {
    pub async fn build(config: VaccinationConfig, backends: Backends) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<store::Migrator>(&config.db).await?;
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let mut trusted = config.retired_keys;
        trusted.insert(config.signing_key.verifying_key());
        let service = Arc::new(Vaccination::new(
            db.clone(),
            relay.clone(),
            backends.cache.clone(),
            Keys {
                signing: config.signing_key,
                trusted,
                dcc: config.dcc_signer,
                data: config.data_keys,
            },
            service::identity_client(
                &config.identity_url,
                &config.service_token,
                config.upstream_timeout,
            )?,
            config.upstream_timeout,
            Settings {
                province: config.province_code,
                dcc_issuer: config.dcc_issuer,
                dcc_validity: config.dcc_validity,
                late_entry_after: config.late_entry_after,
                reminder_radius_m: config.reminder_radius_m,
            },
        ));
        match service.rebuild_site_index().await {
            Ok(n) => tracing::info!(sites = n, "site geo index rebuilt"),
            Err(err) => tracing::warn!(error = %err, "site geo index not rebuilt"),
        }
        let rpc = VaccinationRpc::new(service.clone(), TokenVerifier::new(config.issuer_keys));
        let routes = tonic::service::Routes::new(
            VaccinationServiceServer::new(rpc).max_decoding_message_size(8 * 1024 * 1024),
        );
        let server = healthcode_server::start(
            &config.server,
            routes,
            &[SERVICE_NAME],
            healthcode_proto::FILE_DESCRIPTOR_SET,
        )
        .await?;
        Ok(Application {
            server,
            db,
            service,
            relay: relay.spawn(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The service behind the RPCs, for tests and the bench.
    pub fn service(&self) -> &Arc<Vaccination> {
        &self.service
    }

    /// Drains requests, relays what committed, closes.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

healthcode_server::process!(Application);
