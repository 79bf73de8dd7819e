//! Held bulk changes: a change that would move more colors than the policy's threshold is
//! held (its facts marked `held_by`, an alert raised) until two distinct approvers, neither
//! of them the caller who caused it, apply it, or one discards it.

use crate::domain::time::Time;
use crate::ops::{Page, base_audit, decode, next_token, save_override};
use crate::service::{Actor, Cause, Risk, db_error};
use crate::store::entities::*;
use crate::store::lock_key;
use healthcode_errors::ServiceError;
use healthcode_proto::risk::v1 as pb;
use pb::{AuditAction, BulkChangeState, ChangeCause, OverrideState};
use prost::Message;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use std::collections::BTreeSet;

fn not_held() -> ServiceError {
    ServiceError::precondition(
        "BULK_CHANGE_NOT_HELD",
        "the bulk change is no longer held (applied or discarded)",
    )
}

/// Releases every fact `bulk_change_id` holds back, as learnt `now`: a fact becomes known
/// when it applies (an appeal corrected meanwhile must not have cleared it, and a directive's
/// confirmation window starts now).
async fn release_rows(
    txn: &DatabaseTransaction,
    bulk_change_id: &str,
    now: Time,
) -> Result<(), ServiceError> {
    let none = || Expr::value(sea_orm::Value::String(None));
    event::Entity::update_many()
        .col_expr(event::Column::HeldBy, none())
        .col_expr(event::Column::RecordedAt, Expr::value(now))
        .filter(event::Column::HeldBy.eq(bulk_change_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    risk_area::Entity::update_many()
        .col_expr(risk_area::Column::HeldBy, none())
        .col_expr(risk_area::Column::DeclaredAt, Expr::value(now))
        .filter(risk_area::Column::HeldBy.eq(bulk_change_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    directive::Entity::update_many()
        .col_expr(directive::Column::HeldBy, none())
        .col_expr(directive::Column::IssuedAt, Expr::value(now))
        .filter(directive::Column::HeldBy.eq(bulk_change_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// The bulk change, locked for the rest of the transaction; it must still be held.
async fn locked_held(txn: &DatabaseTransaction, id: &str) -> Result<pb::BulkChange, ServiceError> {
    lock_key(txn, &format!("risk:bulk:{id}"))
        .await
        .map_err(db_error)?;
    let row = bulk_change::Entity::find_by_id(id.to_owned())
        .one(txn)
        .await
        .map_err(db_error)?
        .ok_or_else(|| ServiceError::NotFound(format!("no bulk change {id}")))?;
    let b: pb::BulkChange = decode(&row.payload)?;
    if b.state != BulkChangeState::Held as i32 {
        return Err(not_held());
    }
    Ok(b)
}

async fn save_bulk(txn: &DatabaseTransaction, b: &pb::BulkChange) -> Result<(), ServiceError> {
    bulk_change::Entity::update_many()
        .col_expr(bulk_change::Column::State, Expr::value(b.state))
        .col_expr(bulk_change::Column::Payload, Expr::value(b.encode_to_vec()))
        .filter(bulk_change::Column::BulkChangeId.eq(&b.bulk_change_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// The override a bulk change holds, with its new state.
async fn settle_override(
    txn: &DatabaseTransaction,
    b: &pb::BulkChange,
    state: OverrideState,
    actor: &Actor,
    note: &str,
) -> Result<(), ServiceError> {
    if b.cause != ChangeCause::Override as i32 {
        return Ok(());
    }
    let Some(row) = override_::Entity::find_by_id(b.source_id.clone())
        .one(txn)
        .await
        .map_err(db_error)?
    else {
        return Ok(());
    };
    let mut o: pb::Override = decode(&row.payload)?;
    o.state = state as i32;
    if state == OverrideState::Rejected {
        o.rejected_by = actor.subject.clone();
        o.rejection_note = note.to_owned();
    }
    save_override(txn, &o).await
}

impl Risk {
    async fn load_bulk(
        &self,
        id: &str,
    ) -> Result<(bulk_change::Model, pb::BulkChange), ServiceError> {
        let row = bulk_change::Entity::find_by_id(id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no bulk change {id}")))?;
        let b = decode(&row.payload)?;
        Ok((row, b))
    }

    /// Held bulk changes by default; newest first.
    pub async fn list_bulk_changes(
        &self,
        state: i32,
        page: &Page,
    ) -> Result<(Vec<pb::BulkChange>, String), ServiceError> {
        let state = if state == 0 {
            BulkChangeState::Held as i32
        } else {
            state
        };
        let rows = bulk_change::Entity::find()
            .filter(bulk_change::Column::State.eq(state))
            .order_by_desc(bulk_change::Column::HeldAt)
            .order_by_desc(bulk_change::Column::BulkChangeId)
            .offset(page.offset)
            .limit(page.limit)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let items: Vec<pb::BulkChange> = rows
            .iter()
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        let token = next_token(items.len(), page);
        Ok((items, token))
    }

    /// Approves a held bulk change; the second distinct approver applies it: its facts are
    /// released and its persons re-evaluated, in one transaction.
    pub async fn approve_bulk_change(
        &self,
        actor: &Actor,
        request_id: &str,
        id: &str,
        note: &str,
    ) -> Result<pb::BulkChange, ServiceError> {
        let key = format!("approve-bulk:{request_id}");
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let (row, held) = self.load_bulk(id).await?;
        if held.state != BulkChangeState::Held as i32 {
            return Err(not_held());
        }
        // A held override was caused by all who proposed and approved it.
        let mut causers = vec![row.caused_by.clone()];
        if held.cause == ChangeCause::Override as i32
            && let Some(o) = override_::Entity::find_by_id(held.source_id.clone())
                .one(&self.store().db)
                .await
                .map_err(db_error)?
        {
            let o: pb::Override = decode(&o.payload)?;
            causers.push(o.proposed_by);
            causers.extend(o.approvals.into_iter().map(|a| a.approver));
        }
        if causers.contains(&actor.subject)
            || held.approvals.iter().any(|a| a.approver == actor.subject)
        {
            return Err(ServiceError::PermissionDenied(
                "a bulk change needs two approvers other than the caller who caused it".into(),
            ));
        }
        let earlier = held.approvals.len();
        let applies = earlier + 1 >= 2;
        let mut persons: BTreeSet<String> = BTreeSet::new();
        if applies {
            persons.extend(
                bulk_change_person::Entity::find()
                    .filter(bulk_change_person::Column::BulkChangeId.eq(id))
                    .all(&self.store().db)
                    .await
                    .map_err(db_error)?
                    .into_iter()
                    .map(|p| p.person_id),
            );
            // Stays recorded while a declared area was held count too.
            if held.cause == ChangeCause::RiskArea as i32
                && let Some(area) = risk_area::Entity::find_by_id(held.source_id.clone())
                    .one(&self.store().db)
                    .await
                    .map_err(db_error)?
            {
                let area: pb::RiskArea = decode(&area.payload)?;
                persons.extend(self.persons_in(&area).await?);
            }
        }
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let c = Cause {
            actor,
            cause: ChangeCause::BulkChange,
            request_id,
            reason: note,
            subject_id: id,
        };
        self.change(
            Some(key),
            persons,
            c,
            async |txn, audits| {
                let mut b = locked_held(txn, id).await?;
                if b.approvals.len() != earlier {
                    return Err(ServiceError::precondition(
                        "BULK_CHANGE_CONCURRENT_APPROVAL",
                        "another approval arrived meanwhile; look at the bulk change again",
                    ));
                }
                b.approvals.push(pb::Approval {
                    approver: actor.subject.clone(),
                    approved_at: Some(crate::domain::time::to_proto(now)),
                    note: note.to_owned(),
                });
                if applies {
                    b.state = BulkChangeState::Applied as i32;
                    b.decided_at = Some(crate::domain::time::to_proto(now));
                    release_rows(txn, id, now).await?;
                    settle_override(txn, &b, OverrideState::Applied, actor, note).await?;
                }
                save_bulk(txn, &b).await?;
                let mut entry = base_audit(
                    actor,
                    AuditAction::BulkChangeApproved,
                    request_id,
                    id,
                    policy_version,
                );
                entry.reason = note.to_owned();
                audits.push(entry);
                Ok(b)
            },
            |b, _| b,
        )
        .await
    }

    /// Discards a held bulk change: its facts stay held back for good, colors unchanged.
    pub async fn discard_bulk_change(
        &self,
        actor: &Actor,
        request_id: &str,
        id: &str,
        note: &str,
    ) -> Result<pb::BulkChange, ServiceError> {
        let key = format!("discard-bulk:{request_id}");
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let (_, held) = self.load_bulk(id).await?;
        if held.state != BulkChangeState::Held as i32 {
            return Err(not_held());
        }
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let c = Cause {
            actor,
            cause: ChangeCause::BulkChange,
            request_id,
            reason: note,
            subject_id: id,
        };
        self.change(
            Some(key),
            BTreeSet::new(),
            c,
            async |txn, audits| {
                let mut b = locked_held(txn, id).await?;
                b.state = BulkChangeState::Discarded as i32;
                b.decided_at = Some(crate::domain::time::to_proto(now));
                b.discarded_by = actor.subject.clone();
                b.discard_note = note.to_owned();
                save_bulk(txn, &b).await?;
                settle_override(txn, &b, OverrideState::Rejected, actor, note).await?;
                let mut entry = base_audit(
                    actor,
                    AuditAction::BulkChangeDiscarded,
                    request_id,
                    id,
                    policy_version,
                );
                entry.reason = note.to_owned();
                audits.push(entry);
                Ok(b)
            },
            |b, _| b,
        )
        .await
    }
}
