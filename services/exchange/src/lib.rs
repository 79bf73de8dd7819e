//! The exchange service: cross-province mutual recognition of code colors.
//!
//! - [`records`]: keyed pseudonyms, signed exchange records, their checks on receipt, and
//!   the merge rule every province computes the same way.
//! - [`tls`]: mutual TLS between partners, and the development PKI.
//! - [`service`]: the partner registry, the records this province issues from the risk
//!   service's color changes, the records received from partners, merged colors.
//! - [`sync`]: this province as a partner's client (live subscriptions, manual pulls).
//! - [`received`]: records received from partners reach the risk service (through the
//!   outbox), which merges other provinces' decisions into the color the gateway shows.
//! - [`rpc`]: the gRPC face, on two listeners: internal (tokens) and partner (mutual TLS).

pub mod arrival;
pub mod config;
pub mod confirm;
pub mod received;
pub mod records;
pub mod rpc;
pub mod service;
pub mod store;
pub mod sync;
pub mod tls;

use crate::config::ExchangeConfig;
use crate::rpc::ExchangeRpc;
use crate::service::{Exchange, Settings};
use crate::sync::{PartnerSync, SyncHandle};
use healthcode_auth::TokenVerifier;
use healthcode_events::{
    Backends, Consumer, ConsumerHandle, ConsumerSettings, Event, Handler, HandlerError, Relay,
    RelayHandle, RelaySettings,
};
use healthcode_proto::exchange::v1::exchange_service_server::{
    ExchangeServiceServer, SERVICE_NAME,
};
use healthcode_proto::risk::v1::PersonColor;
use healthcode_server::RunningServer;
use prost::Message;
use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;

/// The risk service's color changes (`healthcode.risk.v1.PersonColor`).
pub const COLOR_TOPIC: &str = "risk.color_changed";
/// The consumer group that turns them into exchange records.
pub const RECORDS_GROUP: &str = "exchange-records";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Upstream(#[from] healthcode_server::outbound::OutboundError),
}

/// Issues the records of a batch of color changes; a malformed event is logged and
/// skipped, an unreachable identity or database retries the batch.
struct IssueFromStream {
    exchange: Arc<Exchange>,
}

#[async_trait::async_trait]
impl Handler for IssueFromStream {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        let colors: Vec<PersonColor> = events
            .iter()
            .filter_map(|e| match PersonColor::decode(&e.payload[..]) {
                Ok(c) => Some(c),
                Err(err) => {
                    tracing::warn!(event = %e.id, error = %err, "undecodable color change skipped");
                    None
                }
            })
            .collect();
        match self.exchange.issue(&colors).await {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(records = n, "exchange records issued");
                }
                Ok(())
            }
            Err(err) => Err(HandlerError::Transient(err.to_string())),
        }
    }
}

pub struct Application {
    server: RunningServer,
    partner_server: Option<RunningServer>,
    db: DatabaseConnection,
    service: Arc<Exchange>,
    consumer: ConsumerHandle,
    /// Applies received records (and held ones to persons who register later).
    apply: Option<[ConsumerHandle; 3]>,
    /// Asks the national check of directives risk holds pending.
    confirm: Option<ConsumerHandle>,
    relay: RelayHandle,
    sync: SyncHandle,
}

impl Application {
    pub async fn build(config: ExchangeConfig, backends: Backends) -> Result<Self, StartError> {
        let db = healthcode_db::connect_and_migrate::<store::Migrator>(&config.db).await?;
        let relay = Relay::new(db.clone(), backends.bus.clone(), RelaySettings::default());
        let identity = service::identity_client(
            &config.identity_url,
            &config.service_token,
            config.upstream_timeout,
        )?;
        let service = Arc::new(Exchange::new(
            db.clone(),
            config.signing_key,
            identity.clone(),
            Settings {
                province: config.province_code,
                heartbeat: config.heartbeat,
                max_streams_per_partner: config.max_streams_per_partner,
                max_calls_per_partner: config.max_calls_per_partner,
                upstream_timeout: config.upstream_timeout,
            },
            relay.clone(),
        ));
        let risk = config
            .risk_url
            .as_deref()
            .map(|url| sync::risk_client(url, &config.service_token, config.upstream_timeout))
            .transpose()?;
        let apply = match &risk {
            Some(risk) => {
                let handler = Arc::new(received::ApplyReceived {
                    exchange: service.clone(),
                    identity,
                    risk: risk.clone(),
                });
                let consume = |topic: &str, group: &str| {
                    Consumer::new(
                        backends.bus.clone(),
                        ConsumerSettings::new(topic, group, &config.consumer_name),
                        handler.clone(),
                    )
                    .spawn()
                };
                Some([
                    consume(service::RECEIVED_TOPIC, received::APPLY_GROUP),
                    consume(received::PSEUDONYM_TOPIC, received::REGISTERED_GROUP),
                    consume(service::DISTRUSTED_TOPIC, received::WITHDRAW_GROUP),
                ])
            }
            None => {
                tracing::warn!(
                    "RISK_URL is unset: other provinces' decisions are held here but do not \
                     reach this province's colors"
                );
                None
            }
        };
        let sync = Arc::new(PartnerSync::new(
            service.clone(),
            &config.consumer_name,
            risk,
            config.outbound_tls,
            config.upstream_timeout,
            config.heartbeat,
        ));
        let confirm = (!config.national_check_partners.is_empty()).then(|| {
            Consumer::new(
                backends.bus.clone(),
                ConsumerSettings::new(
                    confirm::CONFIRMATION_TOPIC,
                    confirm::CONFIRM_GROUP,
                    &config.consumer_name,
                ),
                Arc::new(confirm::AskNationalCheck {
                    sync: sync.clone(),
                    partners: config.national_check_partners.clone(),
                }),
            )
            .spawn()
        });
        let rpc = Arc::new(ExchangeRpc::new(
            service.clone(),
            sync.clone(),
            TokenVerifier::new(config.issuer_keys),
        ));
        let routes = || {
            tonic::service::Routes::new(
                ExchangeServiceServer::from_arc(rpc.clone())
                    .max_decoding_message_size(8 * 1024 * 1024),
            )
        };
        let server = healthcode_server::start(
            &config.server,
            routes(),
            &[SERVICE_NAME],
            healthcode_proto::FILE_DESCRIPTOR_SET,
        )
        .await?;
        let partner_server = match &config.partner_listener {
            None => {
                tracing::warn!("PARTNER_TLS_DIR is unset: no partner listener");
                None
            }
            Some(listener) => {
                let mut settings = config.server.clone();
                settings.listen_addr = listener.addr;
                let server = healthcode_server::start_tls(
                    &settings,
                    routes(),
                    &[SERVICE_NAME],
                    healthcode_proto::FILE_DESCRIPTOR_SET,
                    Some(tls::server_tls(&listener.server, &listener.client_ca_pem)),
                )
                .await?;
                tracing::info!(addr = %server.local_addr(), "partner listener (mutual TLS) ready");
                Some(server)
            }
        };
        let consumer = Consumer::new(
            backends.bus.clone(),
            ConsumerSettings {
                // Partners wait on this: an idle poll every 10 ms (three cheap Redis
                // commands) rather than the default 50 ms.
                poll: std::time::Duration::from_millis(10),
                ..ConsumerSettings::new(COLOR_TOPIC, RECORDS_GROUP, &config.consumer_name)
            },
            Arc::new(IssueFromStream {
                exchange: service.clone(),
            }),
        )
        .spawn();
        Ok(Application {
            server,
            partner_server,
            db,
            service,
            consumer,
            apply,
            confirm,
            relay: relay.spawn(),
            sync: sync.spawn(),
        })
    }

    /// The internal listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The partner listener (mutual TLS), when configured.
    pub fn partner_addr(&self) -> Option<SocketAddr> {
        self.partner_server.as_ref().map(|s| s.local_addr())
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn service(&self) -> &Arc<Exchange> {
        &self.service
    }

    /// Drains both listeners, stops following partners and consuming, closes the pool.
    pub async fn shutdown(self) {
        self.service.close_streams();
        if let Some(partner) = self.partner_server {
            partner.shutdown().await;
        }
        self.server.shutdown().await;
        self.sync.shutdown().await;
        self.consumer.shutdown().await;
        for consumer in self.apply.into_iter().flatten().chain(self.confirm) {
            consumer.shutdown().await;
        }
        self.relay.shutdown().await;
        if let Err(err) = self.db.close().await {
            tracing::warn!(error = %err, "closing the database pool");
        }
    }
}

healthcode_server::process!(Application);
