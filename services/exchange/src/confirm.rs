//! Double confirmation, asked for at once: each directive the risk service holds pending
//! for the national check ([`CONFIRMATION_TOPIC`], from risk's outbox) is checked with this
//! province's national-check partners (`NATIONAL_CHECK_PARTNERS`), and the answer recorded
//! in risk, which confirms or rejects the pending change. Retry-safe: the check's request id
//! is the directive's, so a redelivered directive gets the first answer.

use crate::sync::PartnerSync;
use healthcode_errors::ServiceError;
use healthcode_events::{Event, Handler, HandlerError};
use healthcode_proto::risk::v1::{Directive, DirectiveState};
use prost::Message;
use std::sync::Arc;

/// Risk's topic: directives waiting for the national check (`Directive`).
pub const CONFIRMATION_TOPIC: &str = "risk.directive_pending";

/// The consumer group that asks the national checks.
pub const CONFIRM_GROUP: &str = "exchange-national-check";

/// A directive issued longer ago is not checked any more: its pending change has lapsed
/// (risk's default timeout is a day), and a group created late does not replay old ones.
pub const STALE_AFTER: chrono::Duration = chrono::Duration::days(1);

pub struct AskNationalCheck {
    pub sync: Arc<PartnerSync>,
    /// The partners asked (the national platform, or the provinces that stand in for it).
    pub partners: Vec<String>,
}

#[async_trait::async_trait]
impl Handler for AskNationalCheck {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        for e in events.iter().filter(|e| e.topic == CONFIRMATION_TOPIC) {
            let directive = match Directive::decode(&e.payload[..]) {
                Ok(d) => d,
                Err(err) => {
                    tracing::warn!(event = %e.id, error = %err, "undecodable pending directive skipped");
                    continue;
                }
            };
            let Some(person) = directive.person.as_ref().map(|p| p.person_id.as_str()) else {
                continue;
            };
            if directive.state != DirectiveState::PendingConfirmation as i32 {
                continue;
            }
            let issued = healthcode_proto::time::from_ts(&directive.issued_at);
            if issued.is_none_or(|t| t < chrono::Utc::now() - STALE_AFTER) {
                tracing::info!(directive = %directive.directive_id, "pending directive too old to check; skipped");
                continue;
            }
            let request_id = format!("directive-{}", directive.directive_id);
            match self
                .sync
                .national_check(&request_id, person, &self.partners, true)
                .await
            {
                Ok(answer) => tracing::info!(
                    directive = %directive.directive_id,
                    records = answer.records.len(),
                    "national check of a pending directive recorded"
                ),
                // No partner answered, one of them did not, risk or this service's database
                // failed: asked again (with backoff) until the answer is recorded, or the
                // directive is too old. It stays pending meanwhile, as it would without the
                // check.
                Err(
                    err @ (ServiceError::Unavailable(_)
                    | ServiceError::DeadlineExceeded(_)
                    | ServiceError::Internal(_)),
                ) => {
                    return Err(HandlerError::Transient(format!(
                        "national check of directive {}: {err}",
                        directive.directive_id
                    )));
                }
                // What asking again cannot mend (a partner unknown, suspended or refusing, a
                // person identity does not know): logged; the directive waits for a manual
                // check.
                Err(err) => tracing::warn!(
                    directive = %directive.directive_id,
                    error = %err,
                    "national check of a pending directive refused; it stays pending"
                ),
            }
        }
        Ok(())
    }
}
