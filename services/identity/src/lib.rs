//! The identity service: real-name registration, the four verification steps, the review
//! queue, dependents, and masked views.

pub mod config;
pub mod domain;
pub mod migration;
pub mod providers;
pub mod rpc;
pub mod service;
pub mod store;

use crate::config::IdentityConfig;
use crate::providers::Providers;
use crate::rpc::IdentityRpc;
use crate::service::Identity;
use crate::store::{Sealer, Store};
use healthcode_auth::TokenVerifier;
use healthcode_events::{Backends, Relay, RelayHandle, RelaySettings};
use healthcode_proto::identity::v1::identity_service_server::{
    IdentityServiceServer, SERVICE_NAME,
};
use healthcode_server::RunningServer;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
}

/// A running identity service.
pub struct Application {
    server: RunningServer,
    db: DatabaseConnection,
    backfill: tokio::task::JoinHandle<()>,
    relay: RelayHandle,
}

/// Writes the exchange pseudonyms of persons registered before the key was configured or
/// rotated, 500 at a time, then lets ResolveExchangePseudonyms answer (until then it is
/// UNAVAILABLE, so that the exchange retries rather than miss a person). A pass that fails
/// (the database is unreachable) is retried after a pause from where it stopped.
async fn backfill_pseudonyms(store: Store) {
    let (mut after, mut unreadable) = (String::new(), 0usize);
    loop {
        match store.backfill_pseudonyms(&after, 500).await {
            Ok((None, n)) => {
                unreadable += n;
                break;
            }
            Ok((Some(last), n)) => {
                unreadable += n;
                after = last;
            }
            Err(err) => {
                tracing::warn!(error = %err, "exchange pseudonym backfill failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
    if unreadable > 0 {
        tracing::error!(
            persons = unreadable,
            "persons whose documents could not be read have no exchange pseudonym"
        );
    }
    store.set_pseudonyms_ready();
}

impl Application {
    /// Connects, migrates, binds (port 0 allowed) and serves in the background. The cache
    /// keeps SMS limits and phone challenges; the bus carries the registrations' pseudonyms
    /// ([`store::PSEUDONYM_TOPIC`]) to the exchange.
    pub async fn build(
        config: IdentityConfig,
        backends: Backends,
        providers: Providers,
    ) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<migration::Migrator>(&config.db).await?;
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let pseudonym_key = config.exchange_pseudonym.map(Arc::new);
        let store = Store::new(db.clone(), Sealer::new(Arc::new(config.field_cipher)))
            .with_pseudonym_key(pseudonym_key.clone())
            .with_relay(relay.clone());
        let backfill = tokio::spawn(backfill_pseudonyms(store.clone()));
        let identity = Identity::new(
            store,
            backends.cache,
            providers,
            Arc::new(config.blind_index),
            Arc::new(config.signing_key),
            config.phone,
        );
        let rpc = IdentityRpc::new(
            Arc::new(identity),
            TokenVerifier::new(config.issuer_keys),
            config.retired_keys,
            pseudonym_key,
        );
        let routes = tonic::service::Routes::new(
            IdentityServiceServer::new(rpc)
                // Passport pages and visa images travel in one request.
                .max_decoding_message_size(8 * 1024 * 1024),
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
            backfill,
            relay: relay.spawn(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The database, for tests that look at what was stored.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Drains in-flight requests, then closes the database pool.
    pub async fn shutdown(self) {
        self.backfill.abort();
        self.server.shutdown().await;
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

healthcode_server::process!(Application);
