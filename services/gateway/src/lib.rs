//! The gateway: the edge the super-app, venues and batch checkers call. Shows a person's
//! code, verifies scans, answers batch checks, keeps places and check records, and issues
//! offline codes. Colors come from the color cache, or from the risk service behind a
//! single-flight load and a bounded fallback; an unknown color is an error, never green.
//! Venue scans and check-ins go to the risk service's itinerary through the outbox.

pub mod colors;
pub mod config;
pub mod display;
pub mod holders;
pub mod rpc;
pub mod service;
pub mod store;
pub mod upstream;

use crate::colors::ColorReader;
use crate::config::GatewayConfig;
use crate::holders::HolderReader;
use crate::rpc::GatewayRpc;
use crate::service::Gateway;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use healthcode_auth::TokenVerifier;
use healthcode_cache::{COLOR_TTL, SharedCache, color_key};
use healthcode_codes::CodeSigner;
use healthcode_events::{
    Backends, Consumer, ConsumerHandle, ConsumerSettings, Event, Handler, HandlerError, Relay,
    RelayHandle, RelaySettings,
};
use healthcode_proto::gateway::v1::gateway_service_server::{GatewayServiceServer, SERVICE_NAME};
use healthcode_proto::risk::v1::PersonColor;
use healthcode_server::RunningServer;
use prost::Message;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;

/// The stream risk publishes color changes on.
pub const COLOR_TOPIC: &str = "risk.color_changed";
pub const CACHE_GROUP: &str = "gateway-color-cache";
/// The stream this gateway publishes place visits on (venue scans and check-ins): each a
/// `healthcode.risk.v1.RiskEvent` with an `area_stay`, keyed by person id, whose
/// `event_id` is the check record's scan id.
pub const PLACE_VISIT_TOPIC: &str = "gateway.place_visit";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
}

/// Writes every committed color change into the cache, newest version wins: the risk
/// service writes through after commit, and this catches what a crash or a Redis blip
/// between commit and write-through would otherwise leave stale.
pub struct CacheFromStream {
    pub cache: SharedCache,
}

#[async_trait]
impl Handler for CacheFromStream {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        for event in events {
            let Ok(color) = PersonColor::decode(&event.payload[..]) else {
                tracing::warn!(event_id = %event.id, "unreadable color event skipped");
                continue;
            };
            let Some(person) = &color.person else {
                continue;
            };
            self.cache
                .set_if_newer(
                    &color_key(&person.person_id),
                    color.version,
                    &event.payload,
                    Some(COLOR_TTL),
                )
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
        }
        Ok(())
    }
}

pub struct Application {
    server: RunningServer,
    db: DatabaseConnection,
    gateway: Arc<Gateway>,
    consumer: ConsumerHandle,
    relay: RelayHandle,
}

impl Application {
    pub async fn build(config: GatewayConfig, backends: Backends) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<store::Migrator>(&config.db).await?;
        let upstreams = Upstreams::new(
            &config.risk_url,
            &config.identity_url,
            &config.service_token,
            config.upstream_timeout,
        )?;
        let cipher = Arc::new(config.code_cipher);
        let breaker = Arc::new(colors::Breaker::new(3, std::time::Duration::from_secs(2)));
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let mut keys = config.retired_keys;
        keys.insert(config.signing_key.verifying_key());
        let signer = CodeSigner::new(
            config.signing_key,
            cipher.clone(),
            config.province_code.clone(),
        );
        let gateway = Arc::new(Gateway::new(
            db.clone(),
            ColorReader::new(
                backends.cache.clone(),
                upstreams.clone(),
                breaker.clone(),
                config.fallback_concurrency,
            ),
            HolderReader::new(backends.cache.clone(), upstreams.clone(), breaker),
            upstreams,
            signer,
            keys,
            cipher,
            relay.clone(),
        ));
        let rpc = GatewayRpc::new(gateway.clone(), TokenVerifier::new(config.issuer_keys));
        let routes = tonic::service::Routes::new(
            GatewayServiceServer::new(rpc).max_decoding_message_size(16 * 1024 * 1024),
        );
        let server = healthcode_server::start(
            &config.server,
            routes,
            &[SERVICE_NAME],
            healthcode_proto::FILE_DESCRIPTOR_SET,
        )
        .await?;
        let consumer = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings::new(COLOR_TOPIC, CACHE_GROUP, &config.consumer_name),
            Arc::new(CacheFromStream {
                cache: backends.cache.clone(),
            }),
        )
        .spawn();
        Ok(Application {
            server,
            db,
            gateway,
            consumer,
            relay: relay.spawn(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Drains requests, stops consuming, relays what committed, closes the pool.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.consumer.shutdown().await;
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

healthcode_server::process!(Application);
