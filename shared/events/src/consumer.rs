//! Reads a topic through a consumer group and hands batches to an idempotent handler.
//! An entry is acknowledged only after its handler succeeded; a consumer that dies leaves
//! its entries pending, and it (restarted under the same name) or another consumer of the
//! group takes them up again.

use crate::bus::{BusError, Delivery, Event, SharedBus};
use crate::relay::backoff;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Try the batch again later (a dependency is down). Nothing is acknowledged.
    #[error("transient: {0}")]
    Transient(String),
}

/// Applies a batch. It must be idempotent by `Event::id`: a batch may arrive again after a
/// crash. A malformed event is the handler's to log and skip, not to fail the batch with.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError>;
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub topic: String,
    pub group: String,
    /// Unique per replica and stable across its restarts (the pod name).
    pub consumer: String,
    pub batch: usize,
    /// How long to wait when there is nothing new.
    pub poll: Duration,
    /// Entries pending this long with another consumer are taken over.
    pub claim_after: Duration,
}

impl ConsumerSettings {
    pub fn new(topic: &str, group: &str, consumer: &str) -> Self {
        ConsumerSettings {
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            batch: 200,
            poll: Duration::from_millis(50),
            claim_after: Duration::from_secs(30),
        }
    }
}

pub struct Consumer {
    bus: SharedBus,
    settings: ConsumerSettings,
    handler: Arc<dyn Handler>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Handler(#[from] HandlerError),
}

impl Consumer {
    pub fn new(bus: SharedBus, settings: ConsumerSettings, handler: Arc<dyn Handler>) -> Self {
        Consumer {
            bus,
            settings,
            handler,
        }
    }

    /// One round: own unacknowledged entries first, then stale ones of dead consumers, then
    /// new ones. Returns how many entries were handled.
    pub async fn poll_once(&self) -> Result<usize, ConsumeError> {
        let s = &self.settings;
        self.bus.ensure_group(&s.topic, &s.group).await?;
        let mut batch = self
            .bus
            .read_own_pending(&s.topic, &s.group, &s.consumer, s.batch)
            .await?;
        if batch.is_empty() {
            batch = self
                .bus
                .claim_stale(&s.topic, &s.group, &s.consumer, s.claim_after, s.batch)
                .await?;
        }
        if batch.is_empty() {
            batch = self
                .bus
                .read_new(&s.topic, &s.group, &s.consumer, s.batch)
                .await?;
        }
        self.apply(batch).await
    }

    async fn apply(&self, batch: Vec<Delivery>) -> Result<usize, ConsumeError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let events: Vec<Event> = batch.iter().map(|d| d.event.clone()).collect();
        self.handler.handle(&events).await?;
        let ids: Vec<String> = batch.into_iter().map(|d| d.entry_id).collect();
        self.bus
            .ack(&self.settings.topic, &self.settings.group, &ids)
            .await?;
        Ok(ids.len())
    }

    /// Runs until shut down.
    pub fn spawn(self) -> ConsumerHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let wait = match self.poll_once().await {
                    Ok(n) if n > 0 => {
                        failures = 0;
                        Duration::ZERO
                    }
                    Ok(_) => {
                        failures = 0;
                        self.settings.poll
                    }
                    Err(err) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(
                                error = %err,
                                topic = %self.settings.topic,
                                failures,
                                "consumer failed; retrying"
                            );
                        }
                        backoff(failures)
                    }
                };
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        ConsumerHandle { stop, task }
    }
}

pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsumerHandle {
    /// Stops after the batch in hand; what is unacknowledged stays pending.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "consumer task ended abnormally");
        }
    }

    /// Stops at once, mid-batch if need be, as a crash would.
    pub fn abort(self) {
        self.task.abort();
    }
}
