//! Appeals against a yellow or red color: self-service for yellow, the 12345 hotline for
//! red. An automatic pre-review compares the last 7 days' itinerary with the risk areas and,
//! when nothing overlaps, clears the stays behind the color; otherwise a person decides,
//! and a correction goes through a two-approver override.

use crate::domain::areas::{overlaps, stay_window};
use crate::domain::facts::color_of;
use crate::domain::time::{Time, to_proto};
use crate::ops::{
    OVERRIDE_APPROVAL_WINDOW, Page, base_audit, decode, insert_override, new_id, next_token,
    person_ref,
};
use crate::service::{Actor, Cause, Outcome, Risk, db_error, snapshot};
use crate::store::entities::*;
use crate::store::{self, KIND_STAY, lock_key};
use healthcode_auth::roles;
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::{CodeColor, ReasonCode};
use healthcode_proto::risk::v1 as pb;
use pb::risk_event::Event as EventKind;
use pb::{AppealChannel, AppealDecision, AppealState, AuditAction, ChangeCause, PreReviewOutcome};
use prost::Message;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, Set,
};
use std::collections::BTreeSet;

/// The itinerary window the pre-review compares when the policy sets none.
pub const PRE_REVIEW_WINDOW: chrono::Duration = chrono::Duration::days(7);

/// The policy's pre-review window, or 7 days.
fn pre_review_window(policy: &pb::Policy) -> chrono::Duration {
    crate::domain::time::opt_duration(&policy.appeal_pre_review_window)
        .filter(|d| *d > chrono::Duration::zero())
        .unwrap_or(PRE_REVIEW_WINDOW)
}

/// States in which an appeal is still open: a second one is refused.
const OPEN: [AppealState; 2] = [AppealState::InReview, AppealState::CorrectionPending];

fn statement_aad(appeal_id: &str) -> Vec<u8> {
    format!("appeal:{appeal_id}:statement").into_bytes()
}

fn not_in_review() -> ServiceError {
    ServiceError::precondition(
        "APPEAL_NOT_IN_REVIEW",
        "the appeal is not waiting for a manual decision",
    )
}

/// Whether every reason of the color is a stay in a risk area (what an itinerary explains).
fn explained_by_itinerary(color: &pb::PersonColor) -> bool {
    !color.reasons.is_empty()
        && color.reasons.iter().all(|r| {
            r.code == ReasonCode::HighRiskAreaStay as i32
                || r.code == ReasonCode::MediumRiskAreaStay as i32
        })
}

/// Compares the stays of the policy's window (7 days by default) with the risk areas.
async fn pre_review<C: ConnectionTrait>(
    db: &C,
    person_id: &str,
    color: &pb::PersonColor,
    window: chrono::Duration,
    now: Time,
) -> Result<pb::PreReview, ServiceError> {
    let window_start = now - window;
    let horizon = now - chrono::Duration::days(store::RETENTION_DAYS);
    let areas = store::load_areas(db, horizon).await.map_err(db_error)?;
    let rows = event::Entity::find()
        .filter(event::Column::PersonId.eq(person_id))
        .filter(event::Column::Kind.eq(KIND_STAY))
        .filter(event::Column::HeldBy.is_null())
        .filter(event::Column::OccurredAt.gte(window_start))
        .all(db)
        .await
        .map_err(db_error)?;
    let mut compared = 0u32;
    let mut found = Vec::new();
    for row in rows {
        let e: pb::RiskEvent = decode(&row.payload)?;
        let Some(EventKind::AreaStay(stay)) = &e.event else {
            continue;
        };
        let Some((from, until)) = stay_window(stay) else {
            continue;
        };
        compared += 1;
        for (area, _) in &areas {
            if overlaps(area, stay) {
                found.push(pb::ItineraryOverlap {
                    risk_area_id: area.area_id.clone(),
                    risk_area_name: area.name.clone(),
                    level: area.level,
                    stay_from: Some(to_proto(from)),
                    stay_until: Some(to_proto(until)),
                });
            }
        }
    }
    let outcome = if !explained_by_itinerary(color) || compared == 0 {
        PreReviewOutcome::NotApplicable
    } else if found.is_empty() {
        PreReviewOutcome::NoOverlap
    } else {
        PreReviewOutcome::Overlap
    };
    Ok(pb::PreReview {
        outcome: outcome as i32,
        window_start: Some(to_proto(window_start)),
        window_end: Some(to_proto(now)),
        stays_compared: compared,
        overlaps: found,
        completed_at: Some(to_proto(now)),
    })
}

async fn save_appeal(txn: &DatabaseTransaction, a: &pb::Appeal) -> Result<(), ServiceError> {
    let mut stored = a.clone();
    stored.statement.clear();
    appeal::Entity::update_many()
        .col_expr(appeal::Column::State, Expr::value(a.state))
        .col_expr(
            appeal::Column::OverrideId,
            Expr::value(sea_orm::Value::String(
                (!a.override_id.is_empty()).then(|| a.override_id.clone()),
            )),
        )
        .col_expr(appeal::Column::Payload, Expr::value(stored.encode_to_vec()))
        .filter(appeal::Column::AppealId.eq(&a.appeal_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}

impl Risk {
    /// Submits an appeal and runs the pre-review, in one transaction with any correction.
    /// The reply leaves the statement out (it is stored sealed; GetAppeal opens it).
    pub async fn submit_appeal(
        &self,
        actor: &Actor,
        req: pb::SubmitAppealRequest,
        channel: AppealChannel,
    ) -> Result<pb::Appeal, ServiceError> {
        let person_id = req
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let appeal_id = new_id();
        let sealed = if req.statement.is_empty() {
            None
        } else {
            Some(
                self.cipher()
                    .encrypt(req.statement.as_bytes(), &statement_aad(&appeal_id))
                    .map_err(ServiceError::internal)?,
            )
        };
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let request_id = req.request_id.clone();
        let c = Cause {
            actor,
            cause: ChangeCause::Appeal,
            request_id: &request_id,
            reason: "appeal pre-review: no stay in the last 7 days overlaps a risk area",
            subject_id: &appeal_id,
        };
        self.change_holding(
            Some(format!("submit-appeal:{request_id}")),
            BTreeSet::from([person_id.clone()]),
            c,
            false,
            async |txn, audits| {
                let current = color::Entity::find_by_id(person_id.clone())
                    .one(txn)
                    .await
                    .map_err(db_error)?;
                let color: pb::PersonColor = match &current {
                    Some(row) => decode(&row.payload)?,
                    None => pb::PersonColor::default(),
                };
                let shown = color_of(color.color);
                if shown != CodeColor::Yellow && shown != CodeColor::Red {
                    return Err(ServiceError::precondition(
                        "COLOR_NOT_APPEALABLE",
                        "only a yellow or red color can be appealed",
                    ));
                }
                if color.version != req.color_version {
                    return Err(ServiceError::precondition(
                        "COLOR_CHANGED",
                        "the color has changed since it was shown; look at it again",
                    ));
                }
                if shown == CodeColor::Red && channel == AppealChannel::SelfService {
                    return Err(ServiceError::precondition(
                        "RED_APPEAL_BY_HOTLINE",
                        "a red color is appealed through the 12345 hotline",
                    ));
                }
                // An appeal in review against a color that has moved since is moot, not open.
                let open = appeal::Entity::find()
                    .filter(appeal::Column::PersonId.eq(&person_id))
                    .filter(appeal::Column::State.is_in(OPEN.map(|s| s as i32)))
                    .all(txn)
                    .await
                    .map_err(db_error)?
                    .into_iter()
                    .map(|row| decode::<pb::Appeal>(&row.payload))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .find(|a| {
                        a.state != AppealState::InReview as i32 || a.appealed_color == color.color
                    });
                if let Some(open) = open {
                    return Err(ServiceError::AlreadyExists(format!(
                        "the person already has an open appeal {}",
                        open.appeal_id
                    )));
                }
                let window = pre_review_window(&self.policies().in_force(now));
                let review = pre_review(txn, &person_id, &color, window, now).await?;
                let corrected = review.outcome == PreReviewOutcome::NoOverlap as i32;
                let mut a = pb::Appeal {
                    appeal_id: appeal_id.clone(),
                    person: person_ref(&person_id),
                    appealed_color: color.color,
                    appealed_version: color.version,
                    channel: channel as i32,
                    hotline_ticket: req.hotline_ticket.clone(),
                    state: AppealState::InReview as i32,
                    pre_review: Some(review),
                    submitted_at: Some(to_proto(now)),
                    ..Default::default()
                };
                if corrected {
                    a.state = AppealState::Corrected as i32;
                    a.decided_at = Some(to_proto(now));
                    a.decided_by = "system".into();
                    a.decision_note =
                        "pre-review: no stay in the last 7 days overlaps a risk area".into();
                }
                appeal::Entity::insert(appeal::ActiveModel {
                    appeal_id: Set(a.appeal_id.clone()),
                    person_id: Set(person_id.clone()),
                    state: Set(a.state),
                    channel: Set(a.channel),
                    submitted_at: Set(now),
                    stays_cleared_at: Set(corrected.then_some(now)),
                    override_id: Set(None),
                    statement_key: Set(sealed.as_ref().map(|s| s.key_id.clone())),
                    statement_sealed: Set(sealed.map(|s| s.ciphertext)),
                    payload: Set(a.encode_to_vec()),
                })
                .exec_without_returning(txn)
                .await
                .map_err(db_error)?;
                let mut submitted = base_audit(
                    actor,
                    AuditAction::AppealSubmitted,
                    &request_id,
                    &appeal_id,
                    policy_version,
                );
                submitted.person = person_ref(&person_id);
                let mut reviewed = base_audit(
                    &Actor::system(),
                    AuditAction::AppealPreReviewed,
                    &request_id,
                    &appeal_id,
                    policy_version,
                );
                reviewed.person = person_ref(&person_id);
                reviewed.reason = a.decision_note.clone();
                audits.push(submitted);
                audits.push(reviewed);
                Ok(a)
            },
            async |txn, mut a: pb::Appeal, applied| {
                if a.state == AppealState::Corrected as i32
                    && let Some(o) = applied.outcomes.first()
                {
                    a.corrected_to = Some(snapshot(&o.color));
                    save_appeal(txn, &a).await?;
                }
                Ok(a)
            },
        )
        .await
    }

    /// An appeal as stored, with its statement opened, and MOOT when the color it appealed
    /// against has changed on its own while it waited for review.
    pub async fn appeal(&self, appeal_id: &str) -> Result<pb::Appeal, ServiceError> {
        let row = appeal::Entity::find_by_id(appeal_id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no appeal {appeal_id}")))?;
        self.shown_appeal(row).await
    }

    async fn shown_appeal(&self, row: appeal::Model) -> Result<pb::Appeal, ServiceError> {
        let mut a: pb::Appeal = decode(&row.payload)?;
        if let (Some(key_id), Some(sealed)) = (&row.statement_key, &row.statement_sealed) {
            let plain = self
                .cipher()
                .decrypt(key_id, sealed, &statement_aad(&row.appeal_id))
                .map_err(ServiceError::internal)?;
            a.statement = String::from_utf8_lossy(&plain).into_owned();
        }
        if a.state == AppealState::InReview as i32 {
            let current = color::Entity::find_by_id(row.person_id.clone())
                .one(&self.store().db)
                .await
                .map_err(db_error)?;
            if current.is_some_and(|c| c.color != a.appealed_color) {
                a.state = AppealState::Moot as i32;
            }
        }
        Ok(a)
    }

    /// Appeals, oldest first; `state` unspecified means in review.
    pub async fn list_appeals(
        &self,
        state: i32,
        channel: i32,
        person_id: Option<&str>,
        page: &Page,
    ) -> Result<(Vec<pb::Appeal>, String), ServiceError> {
        let state = if state == 0 {
            AppealState::InReview as i32
        } else {
            state
        };
        // MOOT is shown, not stored: it is an in-review appeal whose color moved.
        let stored = if state == AppealState::Moot as i32 {
            AppealState::InReview as i32
        } else {
            state
        };
        let mut q = appeal::Entity::find().filter(appeal::Column::State.eq(stored));
        if channel != 0 {
            q = q.filter(appeal::Column::Channel.eq(channel));
        }
        if let Some(p) = person_id {
            q = q.filter(appeal::Column::PersonId.eq(p));
        }
        let rows = q
            .order_by_asc(appeal::Column::SubmittedAt)
            .order_by_asc(appeal::Column::AppealId)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let mut shown = Vec::new();
        for row in rows {
            let a = self.shown_appeal(row).await?;
            if a.state == state {
                shown.push(a);
            }
        }
        let items: Vec<pb::Appeal> = shown
            .into_iter()
            .skip(page.offset as usize)
            .take(page.limit as usize)
            .collect();
        let token = next_token(items.len(), page);
        Ok((items, token))
    }

    /// Decides an appeal in review: uphold closes it; correct proposes an override with the
    /// decider as first approver (the appeal is corrected when a second one approves).
    pub async fn decide_appeal(
        &self,
        actor: &Actor,
        req: pb::DecideAppealRequest,
        holds_until: Option<Time>,
    ) -> Result<pb::Appeal, ServiceError> {
        let key = format!("decide-appeal:{}", req.request_id);
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let current = self.appeal(&req.appeal_id).await?;
        if current.state != AppealState::InReview as i32 {
            return Err(not_in_review());
        }
        let needed = if current.appealed_color == CodeColor::Red as i32 {
            roles::HOTLINE
        } else {
            roles::OFFICIAL
        };
        let correct = req.decision == AppealDecision::Correct as i32;
        if !actor.roles.iter().any(|r| r == needed)
            || (correct && !actor.roles.iter().any(|r| r == roles::APPROVER))
        {
            return Err(ServiceError::PermissionDenied(format!(
                "deciding this appeal needs the `{needed}` role{}",
                if correct { " and `approver`" } else { "" }
            )));
        }
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let appeal_id = req.appeal_id.clone();
        let person_id = current
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let c = Cause {
            actor,
            cause: ChangeCause::Appeal,
            request_id: &req.request_id,
            reason: &req.note,
            subject_id: &appeal_id,
        };
        self.change(
            Some(key),
            BTreeSet::new(),
            c,
            async |txn, audits| {
                lock_key(txn, &format!("risk:appeal:{appeal_id}"))
                    .await
                    .map_err(db_error)?;
                let row = appeal::Entity::find_by_id(appeal_id.clone())
                    .one(txn)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| ServiceError::NotFound(format!("no appeal {appeal_id}")))?;
                let mut a: pb::Appeal = decode(&row.payload)?;
                if a.state != AppealState::InReview as i32 {
                    return Err(not_in_review());
                }
                a.decided_at = Some(to_proto(now));
                a.decided_by = actor.subject.clone();
                a.decision_note = req.note.clone();
                if correct {
                    let o = pb::Override {
                        override_id: new_id(),
                        persons: vec![person_ref(&person_id).unwrap_or_default()],
                        color: req.corrected_color,
                        reason: req.note.clone(),
                        holds_until: holds_until.map(to_proto),
                        state: pb::OverrideState::Proposed as i32,
                        proposed_by: actor.subject.clone(),
                        proposed_at: Some(to_proto(now)),
                        expires_at: Some(to_proto(now + OVERRIDE_APPROVAL_WINDOW)),
                        approvals: vec![pb::Approval {
                            approver: actor.subject.clone(),
                            approved_at: Some(to_proto(now)),
                            note: req.note.clone(),
                        }],
                        appeal_id: appeal_id.clone(),
                        ..Default::default()
                    };
                    insert_override(txn, &o, now).await?;
                    a.state = AppealState::CorrectionPending as i32;
                    a.override_id = o.override_id.clone();
                    let mut proposed = base_audit(
                        actor,
                        AuditAction::OverrideProposed,
                        &req.request_id,
                        &o.override_id,
                        policy_version,
                    );
                    proposed.reason = req.note.clone();
                    audits.push(proposed);
                } else {
                    a.state = AppealState::Upheld as i32;
                }
                save_appeal(txn, &a).await?;
                let mut decided = base_audit(
                    actor,
                    AuditAction::AppealDecided,
                    &req.request_id,
                    &appeal_id,
                    policy_version,
                );
                decided.person = person_ref(&person_id);
                decided.reason = req.note.clone();
                audits.push(decided);
                Ok(a)
            },
            |a, _| a,
        )
        .await
    }

    /// The override of a manual correction was decided: applied, the appeal is corrected;
    /// rejected, it goes back to review.
    pub(crate) async fn appeal_after_override(
        &self,
        txn: &DatabaseTransaction,
        o: &pb::Override,
        outcomes: &[Outcome],
        now: Time,
    ) -> Result<(), ServiceError> {
        let state = pb::OverrideState::try_from(o.state).unwrap_or_default();
        let Some(row) = appeal::Entity::find_by_id(o.appeal_id.clone())
            .one(txn)
            .await
            .map_err(db_error)?
        else {
            return Ok(());
        };
        let mut a: pb::Appeal = decode(&row.payload)?;
        if a.state != AppealState::CorrectionPending as i32 {
            return Ok(());
        }
        match state {
            pb::OverrideState::Applied => {
                a.state = AppealState::Corrected as i32;
                a.corrected_to = outcomes
                    .iter()
                    .find(|out| {
                        out.color
                            .person
                            .as_ref()
                            .is_some_and(|p| p.person_id == row.person_id)
                    })
                    .map(|out| snapshot(&out.color));
            }
            pb::OverrideState::Rejected => {
                a.state = AppealState::InReview as i32;
                a.override_id.clear();
                a.decided_at = None;
                a.decided_by.clear();
                a.decision_note = format!("correction rejected at {}; back in review", now);
            }
            _ => return Ok(()),
        }
        save_appeal(txn, &a).await
    }
}
