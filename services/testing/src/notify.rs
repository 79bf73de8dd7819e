//! Telling a person they must take a retest. The notifier is an interface (SMS, the
//! super-app's push); the local one records what it sent. A notice reaches the notifier
//! through the outbox and a consumer group, so a crash neither loses it nor sends it
//! twice once recorded: `sent_notifications` keeps one row per notice.

use crate::store::entities::sent_notification;
use async_trait::async_trait;
use healthcode_events::{Event, Handler, HandlerError};
use healthcode_proto::testing::v1::RetestNotice;
use prost::Message;
use sea_orm::sea_query::OnConflict;
use sea_orm::{DatabaseConnection, EntityTrait, Set};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
#[error("notifier unavailable: {0}")]
pub struct NotifyError(pub String);

#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    fn channel(&self) -> &'static str;
    /// Sends the retest notice to the person; returns the notifier's message id. The
    /// notice id is the message's de-duplication key at the notifier.
    async fn send(&self, person_id: &str, notice: &RetestNotice) -> Result<String, NotifyError>;
}

/// Records the notices it is given, in order; fails the next `n` sends when told to.
#[derive(Default)]
pub struct LocalNotifier {
    sent: Mutex<Vec<(String, String)>>,
    failures: Mutex<u32>,
}

impl LocalNotifier {
    /// `(person id, notice id)` of every notice sent.
    pub fn sent(&self) -> Vec<(String, String)> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn fail_next(&self, n: u32) {
        if let Ok(mut f) = self.failures.lock() {
            *f = n;
        }
    }
}

#[async_trait]
impl Notifier for LocalNotifier {
    fn channel(&self) -> &'static str {
        "local"
    }

    async fn send(&self, person_id: &str, notice: &RetestNotice) -> Result<String, NotifyError> {
        if let Ok(mut f) = self.failures.lock()
            && *f > 0
        {
            *f -= 1;
            return Err(NotifyError("local notifier told to fail".into()));
        }
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| NotifyError("poisoned".into()))?;
        if !sent.iter().any(|(_, n)| n == &notice.notice_id) {
            sent.push((person_id.to_owned(), notice.notice_id.clone()));
        }
        Ok(format!("local-{}", notice.notice_id))
    }
}

/// The consumer of `testing.retest_notice`: sends each notice once and records it.
pub struct NoticesToPersons {
    pub db: DatabaseConnection,
    pub notifier: Arc<dyn Notifier>,
}

#[async_trait]
impl Handler for NoticesToPersons {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        for event in events {
            let Ok(notice) = RetestNotice::decode(&event.payload[..]) else {
                tracing::warn!(event_id = %event.id, "unreadable retest notice skipped");
                continue;
            };
            let person_id = notice
                .person
                .as_ref()
                .map(|p| p.person_id.clone())
                .unwrap_or_default();
            let known = sent_notification::Entity::find_by_id(notice.notice_id.clone())
                .one(&self.db)
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            if known.is_some() {
                continue;
            }
            let message_id = self
                .notifier
                .send(&person_id, &notice)
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            sent_notification::Entity::insert(sent_notification::ActiveModel {
                notice_id: Set(notice.notice_id.clone()),
                person_id: Set(person_id),
                channel: Set(self.notifier.channel().to_owned()),
                message_id: Set(message_id),
                sent_at: Set(chrono::Utc::now()),
            })
            .on_conflict(
                OnConflict::column(sent_notification::Column::NoticeId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(|e| HandlerError::Transient(e.to_string()))?;
        }
        Ok(())
    }
}
