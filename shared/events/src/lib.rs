//! Facts that another service must not miss: written to an outbox table in the same
//! transaction as the fact, relayed to a stream (Redis Streams in production, an in-process
//! log in the embedded default), and consumed through a consumer group.
//!
//! Delivery is at least once: the relay may publish a row twice (it crashed between the
//! publish and marking the row), and a consumer may see an entry twice (it crashed before
//! acknowledging). Every event carries the id it was given in the outbox, and handlers are
//! idempotent on that id.

mod bus;
mod consumer;
pub mod outbox;
mod relay;

pub use bus::{BusError, Delivery, Event, EventBus, MemoryBus, RedisBus, SharedBus};
pub use consumer::{
    ConsumeError, Consumer, ConsumerHandle, ConsumerSettings, Handler, HandlerError,
};
pub use relay::{Relay, RelayError, RelayHandle, RelaySettings};

/// The bus for a deployment: Redis when it has one, otherwise in-process.
pub async fn bus_from_settings(
    settings: Option<&healthcode_cache::RedisSettings>,
    prefix: &str,
) -> Result<SharedBus, BusError> {
    match settings {
        Some(settings) => Ok(std::sync::Arc::new(
            RedisBus::connect(settings, prefix).await?,
        )),
        None => Ok(std::sync::Arc::new(MemoryBus::new())),
    }
}

/// The cache and the bus a service shares with the rest of the mesh: in the embedded
/// default one in-process instance of each serves every service of the process.
#[derive(Clone)]
pub struct Backends {
    pub cache: healthcode_cache::SharedCache,
    pub bus: SharedBus,
}

impl Backends {
    pub async fn connect(
        settings: Option<&healthcode_cache::RedisSettings>,
        prefix: &str,
    ) -> Result<Self, String> {
        let cache = healthcode_cache::from_settings(settings, prefix)
            .await
            .map_err(|e| e.to_string())?;
        let bus = bus_from_settings(settings, prefix)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Backends { cache, bus })
    }
}
