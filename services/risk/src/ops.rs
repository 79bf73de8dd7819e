//! The operations behind the RPCs; requests arrive here already validated (see `rpc`).

use crate::domain::areas::overlaps;
use crate::domain::evaluate::directive_color;
use crate::domain::facts::{color_of, rank};
use crate::domain::policy::pending_timeout;
use crate::domain::time::{Time, from_proto, to_proto};
use crate::service::{Actor, Applied, CONFIRMATION_TOPIC, Cause, Outcome, Risk, db_error};
use crate::store::entities::*;
use crate::store::{self, KIND_STAY, lock_key};
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::PersonRef;
use healthcode_proto::risk::v1 as pb;
use pb::risk_event::Event as EventKind;
use pb::{AuditAction, ChangeCause, DirectiveState, OverrideState};
use prost::Message;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, Condition, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set,
};
use std::collections::BTreeSet;

/// A proposed override lapses when not approved within this time.
pub const OVERRIDE_APPROVAL_WINDOW: chrono::Duration = chrono::Duration::hours(72);

pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, ServiceError> {
    M::decode(bytes).map_err(ServiceError::internal)
}

pub(crate) fn person_ref(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn cause<'a>(
    actor: &'a Actor,
    cause: ChangeCause,
    request_id: &'a str,
    reason: &'a str,
    subject_id: &'a str,
) -> Cause<'a> {
    Cause {
        actor,
        cause,
        request_id,
        reason,
        subject_id,
    }
}

pub(crate) fn base_audit(
    actor: &Actor,
    action: AuditAction,
    request_id: &str,
    subject_id: &str,
    policy_version: u32,
) -> pb::AuditEntry {
    pb::AuditEntry {
        actor: actor.subject.clone(),
        actor_roles: actor.roles.clone(),
        action: action as i32,
        request_id: request_id.to_owned(),
        subject_id: subject_id.to_owned(),
        policy_version,
        ..Default::default()
    }
}

/// The state a directive shows: a pending one past the confirmation timeout is
/// unconfirmed, an active one past its end is ended.
fn shown_state(
    stored: DirectiveState,
    issued_at: Time,
    ends_at: Option<Time>,
    timeout: chrono::Duration,
    now: Time,
) -> DirectiveState {
    match stored {
        DirectiveState::PendingConfirmation if issued_at + timeout <= now => {
            DirectiveState::Unconfirmed
        }
        DirectiveState::Active if ends_at.is_some_and(|e| e <= now) => DirectiveState::Ended,
        other => other,
    }
}

/// The state an override shows: expired proposals and overrides past `holds_until`.
fn shown_override(mut o: pb::Override, now: Time) -> pb::Override {
    let state = OverrideState::try_from(o.state).unwrap_or(OverrideState::Unspecified);
    let expired = o
        .expires_at
        .as_ref()
        .and_then(from_proto)
        .is_some_and(|e| e <= now);
    let ended = o
        .holds_until
        .as_ref()
        .and_then(from_proto)
        .is_some_and(|e| e <= now);
    if state == OverrideState::Proposed && expired {
        o.state = OverrideState::Expired as i32;
    } else if state == OverrideState::Applied && ended {
        o.state = OverrideState::Ended as i32;
    }
    o
}

pub struct Page {
    pub offset: u64,
    pub limit: u64,
}

pub(crate) fn next_token(len: usize, page: &Page) -> String {
    if len as u64 == page.limit {
        (page.offset + page.limit).to_string()
    } else {
        String::new()
    }
}

impl Risk {
    /// The reply a retry-safe call stored under `key`, if it has run already.
    pub(crate) async fn stored_reply<M: Message + Default>(
        &self,
        key: &str,
    ) -> Result<Option<M>, ServiceError> {
        match store::reply_get(&self.store().db, key)
            .await
            .map_err(db_error)?
        {
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    // -----------------------------------------------------------------------------------
    // Colors

    /// The stored color when it is still valid under the policy in force; otherwise a
    /// fresh evaluation, committed like any other change.
    pub async fn get_color(&self, person_id: &str) -> Result<pb::PersonColor, ServiceError> {
        let mut colors = self.get_colors(&[person_id.to_owned()]).await?;
        colors
            .pop()
            .ok_or_else(|| ServiceError::internal("evaluation produced no color"))
    }

    /// Colors of many persons, in request order.
    pub async fn get_colors(
        &self,
        person_ids: &[String],
    ) -> Result<Vec<pb::PersonColor>, ServiceError> {
        let now = chrono::Utc::now();
        let policy = self.policies().in_force(now);
        let rows = color::Entity::find()
            .filter(color::Column::PersonId.is_in(person_ids.iter().cloned()))
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let mut found = std::collections::HashMap::new();
        let mut stale = BTreeSet::new();
        for row in rows {
            let fresh = row.valid_until.is_none_or(|u| u > now)
                && row.policy_version as u32 == policy.version;
            if fresh {
                found.insert(
                    row.person_id.clone(),
                    decode::<pb::PersonColor>(&row.payload)?,
                );
            } else {
                stale.insert(row.person_id.clone());
            }
        }
        for id in person_ids {
            if !found.contains_key(id) {
                stale.insert(id.clone());
            }
        }
        if !stale.is_empty() {
            let system = Actor::system();
            let c = cause(&system, ChangeCause::Expiry, "", "", "");
            let outcomes: Vec<pb::PersonColor> = self
                .change(
                    None,
                    stale,
                    c,
                    async |_, _| Ok(()),
                    |(), outcomes: &[Outcome]| pb::BatchGetColorsResponse {
                        colors: outcomes.iter().map(|o| o.color.clone()).collect(),
                        errors: Vec::new(),
                    },
                )
                .await?
                .colors;
            for color in outcomes {
                if let Some(p) = &color.person {
                    found.insert(p.person_id.clone(), color);
                }
            }
        }
        let mut out = Vec::with_capacity(person_ids.len());
        for id in person_ids {
            let color = found
                .get(id)
                .cloned()
                .ok_or_else(|| ServiceError::internal("evaluation produced no color"))?;
            self.cache_color(&color).await;
            out.push(color);
        }
        Ok(out)
    }

    pub async fn color_history(
        &self,
        person_id: &str,
        since: Option<Time>,
        until: Option<Time>,
        before_version: Option<i64>,
        limit: u64,
    ) -> Result<(Vec<pb::ColorChange>, String), ServiceError> {
        let mut q =
            color_history::Entity::find().filter(color_history::Column::PersonId.eq(person_id));
        if let Some(s) = since {
            q = q.filter(color_history::Column::ChangedAt.gte(s));
        }
        if let Some(u) = until {
            q = q.filter(color_history::Column::ChangedAt.lt(u));
        }
        if let Some(v) = before_version {
            q = q.filter(color_history::Column::Version.lt(v));
        }
        let rows = q
            .order_by_desc(color_history::Column::Version)
            .limit(limit)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let token = if rows.len() as u64 == limit {
            rows.last()
                .map(|r| r.version.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let changes = rows
            .iter()
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        Ok((changes, token))
    }

    // -----------------------------------------------------------------------------------
    // Events

    /// Records valid events (the caller has filtered out invalid ones) and re-evaluates
    /// the persons they concern.
    pub async fn record_events(
        &self,
        actor: &Actor,
        events: Vec<pb::RiskEvent>,
    ) -> Result<pb::RecordEventsResponse, ServiceError> {
        let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        let known: BTreeSet<String> = event::Entity::find()
            .filter(event::Column::EventId.is_in(ids))
            .all(&self.store().db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let mut seen = BTreeSet::new();
        let mut fresh = Vec::new();
        let mut duplicates = 0u32;
        for e in events {
            if known.contains(&e.event_id) || !seen.insert(e.event_id.clone()) {
                duplicates += 1;
            } else {
                fresh.push(e);
            }
        }
        if fresh.is_empty() {
            return Ok(pb::RecordEventsResponse {
                duplicates,
                ..Default::default()
            });
        }
        let persons: BTreeSet<String> = fresh
            .iter()
            .filter_map(|e| e.person.as_ref().map(|p| p.person_id.clone()))
            .collect();
        let fresh_len = fresh.len() as u32;
        // Other provinces' decisions passed their own province's bulk threshold; holding
        // them here would only make the provinces disagree.
        let hold = !fresh
            .iter()
            .all(|e| matches!(e.event, Some(EventKind::OtherProvinceDecision(_))));
        let batch_id = new_id();
        let c = cause(actor, ChangeCause::Event, &batch_id, "", &batch_id);
        self.change_holding(
            None,
            persons,
            c,
            hold,
            async |txn, _| insert_events(txn, fresh).await,
            async |txn, inserted: Vec<String>, applied| {
                let recorded = inserted.len() as u32;
                if let Some(held) = &applied.held {
                    hold_rows(txn, HeldRows::Events(inserted), &held.bulk_change_id).await?;
                }
                Ok(pb::RecordEventsResponse {
                    recorded,
                    duplicates: duplicates + fresh_len.saturating_sub(recorded),
                    errors: Vec::new(),
                    changed: applied
                        .outcomes
                        .iter()
                        .filter(|o| o.changed)
                        .map(|o| o.color.clone())
                        .collect(),
                    bulk_change_id: bulk_id(applied),
                })
            },
        )
        .await
    }
}

/// The id of the bulk change that holds a change back, or empty.
pub(crate) fn bulk_id(applied: &Applied) -> String {
    applied
        .held
        .as_ref()
        .map(|h| h.bulk_change_id.clone())
        .unwrap_or_default()
}

/// Facts a held bulk change holds back.
pub(crate) enum HeldRows {
    Events(Vec<String>),
    Area(String),
    Directives(Vec<String>),
}

/// Marks facts as held back by `bulk_change_id`.
pub(crate) async fn hold_rows(
    txn: &DatabaseTransaction,
    rows: HeldRows,
    bulk_change_id: &str,
) -> Result<(), ServiceError> {
    let held = Expr::value(bulk_change_id.to_owned());
    let result = match rows {
        HeldRows::Events(ids) => {
            event::Entity::update_many()
                .col_expr(event::Column::HeldBy, held)
                .filter(event::Column::EventId.is_in(ids))
                .exec(txn)
                .await
        }
        HeldRows::Area(id) => {
            risk_area::Entity::update_many()
                .col_expr(risk_area::Column::HeldBy, held)
                .filter(risk_area::Column::AreaId.eq(id))
                .exec(txn)
                .await
        }
        HeldRows::Directives(ids) => {
            directive::Entity::update_many()
                .col_expr(directive::Column::HeldBy, held)
                .filter(directive::Column::DirectiveId.is_in(ids))
                .exec(txn)
                .await
        }
    };
    result.map_err(db_error)?;
    Ok(())
}

fn event_kind(e: &pb::RiskEvent) -> (&'static str, Option<Time>) {
    match &e.event {
        Some(EventKind::Contact(c)) => {
            ("contact", c.last_exposure_at.as_ref().and_then(from_proto))
        }
        Some(EventKind::AreaStay(s)) => (
            KIND_STAY,
            s.left_at
                .as_ref()
                .or(s.arrived_at.as_ref())
                .and_then(from_proto),
        ),
        Some(EventKind::TestResult(t)) => {
            ("test_result", t.sampled_at.as_ref().and_then(from_proto))
        }
        Some(EventKind::VaccinationDose(d)) => {
            ("dose", d.administered_at.as_ref().and_then(from_proto))
        }
        Some(EventKind::OtherProvinceDecision(d)) => {
            ("other_province", d.decided_at.as_ref().and_then(from_proto))
        }
        None => ("none", None),
    }
}

/// Inserts events, skipping ids another writer recorded meanwhile; returns how many were new.
async fn insert_events(
    txn: &DatabaseTransaction,
    events: Vec<pb::RiskEvent>,
) -> Result<Vec<String>, ServiceError> {
    let now = chrono::Utc::now();
    let mut recorded = Vec::new();
    for e in events {
        let (kind, occurred) = event_kind(&e);
        let person_id = e
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let inserted = event::Entity::insert(event::ActiveModel {
            event_id: Set(e.event_id.clone()),
            person_id: Set(person_id),
            kind: Set(kind.to_owned()),
            occurred_at: Set(occurred.unwrap_or(now)),
            payload: Set(e.encode_to_vec()),
            recorded_at: Set(now),
            held_by: Set(None),
        })
        .on_conflict(
            OnConflict::column(event::Column::EventId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await
        .map_err(db_error)?;
        if inserted > 0 {
            recorded.push(e.event_id);
        }
    }
    Ok(recorded)
}

impl Risk {
    // -----------------------------------------------------------------------------------
    // Risk areas

    /// Persons with a recorded stay overlapping `area`.
    pub(crate) async fn persons_in(
        &self,
        area: &pb::RiskArea,
    ) -> Result<BTreeSet<String>, ServiceError> {
        let from = area.valid_from.as_ref().and_then(from_proto);
        let mut q = event::Entity::find()
            .filter(event::Column::Kind.eq(KIND_STAY))
            .filter(event::Column::HeldBy.is_null());
        if let Some(from) = from {
            q = q.filter(event::Column::OccurredAt.gte(from));
        }
        let mut persons = BTreeSet::new();
        for row in q.all(&self.store().db).await.map_err(db_error)? {
            let e: pb::RiskEvent = decode(&row.payload)?;
            if let Some(EventKind::AreaStay(stay)) = &e.event
                && overlaps(area, stay)
            {
                persons.insert(row.person_id);
            }
        }
        Ok(persons)
    }

    pub async fn declare_risk_area(
        &self,
        actor: &Actor,
        request_id: &str,
        mut area: pb::RiskArea,
    ) -> Result<pb::RiskArea, ServiceError> {
        let now = chrono::Utc::now();
        let area_id = new_id();
        area.area_id = area_id.clone();
        area.province_code = self.policies().province().to_owned();
        area.declared_by = actor.subject.clone();
        area.declared_at = Some(to_proto(now));
        area.lifted_at = None;
        area.lifted_by.clear();
        area.lift_reason.clear();
        let persons = self.persons_in(&area).await?;
        let policy_version = self.policies().in_force(now).version;
        let c = cause(actor, ChangeCause::RiskArea, request_id, "", &area_id);
        let stored = area.clone();
        self.change_holding(
            Some(format!("declare-area:{request_id}")),
            persons,
            c,
            true,
            async |txn, audits| {
                risk_area::Entity::insert(risk_area::ActiveModel {
                    area_id: Set(stored.area_id.clone()),
                    level: Set(stored.level),
                    valid_from: Set(stored
                        .valid_from
                        .as_ref()
                        .and_then(from_proto)
                        .unwrap_or(now)),
                    valid_until: Set(stored.valid_until.as_ref().and_then(from_proto)),
                    lifted_at: Set(None),
                    payload: Set(stored.encode_to_vec()),
                    declared_at: Set(now),
                    held_by: Set(None),
                })
                .exec_without_returning(txn)
                .await
                .map_err(db_error)?;
                audits.push(base_audit(
                    actor,
                    AuditAction::RiskAreaDeclared,
                    request_id,
                    &stored.area_id,
                    policy_version,
                ));
                Ok(stored)
            },
            async |txn, mut area: pb::RiskArea, applied| {
                if let Some(held) = &applied.held {
                    hold_rows(
                        txn,
                        HeldRows::Area(area.area_id.clone()),
                        &held.bulk_change_id,
                    )
                    .await?;
                    area.bulk_change_id = held.bulk_change_id.clone();
                }
                Ok(area)
            },
        )
        .await
    }

    pub async fn lift_risk_area(
        &self,
        actor: &Actor,
        request_id: &str,
        area_id: &str,
        reason: &str,
    ) -> Result<pb::RiskArea, ServiceError> {
        let key = format!("lift-area:{request_id}");
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let now = chrono::Utc::now();
        let row = risk_area::Entity::find_by_id(area_id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no risk area {area_id}")))?;
        let mut area: pb::RiskArea = decode(&row.payload)?;
        if row.held_by.is_some() {
            return Err(ServiceError::precondition(
                "HELD",
                "the risk area is held as a bulk change; approve or discard that instead",
            ));
        }
        let ended = row.lifted_at.is_some() || row.valid_until.is_some_and(|u| u <= now);
        if ended {
            return Err(ServiceError::precondition(
                "AREA_ENDED",
                "the risk area has already ended",
            ));
        }
        area.lifted_at = Some(to_proto(now));
        area.lifted_by = actor.subject.clone();
        area.lift_reason = reason.to_owned();
        let persons = self.persons_in(&area).await?;
        let policy_version = self.policies().in_force(now).version;
        let c = cause(actor, ChangeCause::RiskArea, request_id, reason, area_id);
        let stored = area.clone();
        self.change(
            Some(key),
            persons,
            c,
            async |txn, audits| {
                let updated = risk_area::Entity::update_many()
                    .col_expr(
                        risk_area::Column::LiftedAt,
                        sea_orm::sea_query::Expr::value(now),
                    )
                    .col_expr(
                        risk_area::Column::Payload,
                        sea_orm::sea_query::Expr::value(stored.encode_to_vec()),
                    )
                    .filter(risk_area::Column::AreaId.eq(&stored.area_id))
                    .filter(risk_area::Column::LiftedAt.is_null())
                    .exec(txn)
                    .await
                    .map_err(db_error)?;
                if updated.rows_affected == 0 {
                    return Err(ServiceError::precondition(
                        "AREA_ENDED",
                        "the risk area has already ended",
                    ));
                }
                let mut entry = base_audit(
                    actor,
                    AuditAction::RiskAreaLifted,
                    request_id,
                    &stored.area_id,
                    policy_version,
                );
                entry.reason = reason.to_owned();
                audits.push(entry);
                Ok(stored)
            },
            |area, _| area,
        )
        .await
    }

    pub async fn list_risk_areas(
        &self,
        at: Time,
        min_level: i32,
        page: &Page,
    ) -> Result<(Vec<pb::RiskArea>, String), ServiceError> {
        let rows = risk_area::Entity::find()
            .filter(risk_area::Column::HeldBy.is_null())
            .filter(risk_area::Column::ValidFrom.lte(at))
            .filter(risk_area::Column::Level.gte(min_level))
            .filter(
                Condition::any()
                    .add(risk_area::Column::ValidUntil.is_null())
                    .add(risk_area::Column::ValidUntil.gt(at)),
            )
            .filter(
                Condition::any()
                    .add(risk_area::Column::LiftedAt.is_null())
                    .add(risk_area::Column::LiftedAt.gt(at)),
            )
            .order_by_asc(risk_area::Column::DeclaredAt)
            .order_by_asc(risk_area::Column::AreaId)
            .offset(page.offset)
            .limit(page.limit)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let areas: Vec<pb::RiskArea> = rows
            .iter()
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        let token = next_token(areas.len(), page);
        Ok((areas, token))
    }

    // -----------------------------------------------------------------------------------
    // Directives and double confirmation

    pub async fn issue_directive(
        &self,
        actor: &Actor,
        req: pb::IssueDirectiveRequest,
        starts_at: Time,
        ends_at: Option<Time>,
    ) -> Result<pb::IssueDirectiveResponse, ServiceError> {
        let now = chrono::Utc::now();
        let policy = self.policies().in_force(now);
        let timeout = pending_timeout(&policy);
        let kind = pb::DirectiveKind::try_from(req.kind).unwrap_or(pb::DirectiveKind::Unspecified);
        let Some((directive_color, _)) = directive_color(&policy, kind) else {
            return Err(ServiceError::precondition(
                "NO_DIRECTIVE_RULE",
                "the policy in force has no rule for this directive kind",
            ));
        };
        let persons: BTreeSet<String> = req.persons.iter().map(|p| p.person_id.clone()).collect();
        let request_id = req.request_id.clone();
        let c = cause(actor, ChangeCause::Directive, &request_id, "", &request_id);
        self.change_holding(
            Some(format!("issue-directive:{request_id}")),
            persons,
            c,
            true,
            async |txn, audits| {
                let mut directives = Vec::new();
                for p in &req.persons {
                    // A national check already received confirms the directive at once.
                    let confirmed = national_check::Entity::find()
                        .filter(national_check::Column::PersonId.eq(&p.person_id))
                        .filter(national_check::Column::CheckedAt.gt(now - timeout))
                        .order_by_desc(national_check::Column::CheckedAt)
                        .one(txn)
                        .await
                        .map_err(db_error)?
                        .is_some_and(|c| rank(color_of(c.color)) >= rank(directive_color));
                    let state = if confirmed {
                        DirectiveState::Active
                    } else {
                        DirectiveState::PendingConfirmation
                    };
                    let d = pb::Directive {
                        directive_id: new_id(),
                        person: person_ref(&p.person_id),
                        kind: req.kind,
                        starts_at: Some(to_proto(starts_at)),
                        ends_at: ends_at.map(to_proto),
                        state: state as i32,
                        document_reference: req.document_reference.clone(),
                        issuing_unit: req.issuing_unit.clone(),
                        issued_by: actor.subject.clone(),
                        issued_at: Some(to_proto(now)),
                        ..Default::default()
                    };
                    save_directive(txn, &d, true).await?;
                    let mut entry = base_audit(
                        actor,
                        AuditAction::DirectiveIssued,
                        &request_id,
                        &d.directive_id,
                        policy.version,
                    );
                    entry.person = person_ref(&p.person_id);
                    audits.push(entry);
                    directives.push(d);
                }
                Ok(directives)
            },
            async |txn, directives: Vec<pb::Directive>, applied| {
                if let Some(held) = &applied.held {
                    let ids = directives.iter().map(|d| d.directive_id.clone()).collect();
                    hold_rows(txn, HeldRows::Directives(ids), &held.bulk_change_id).await?;
                } else {
                    // The other input of double confirmation is asked for at once (the
                    // exchange's national check), through the outbox: never lost.
                    let pending: Vec<(String, Vec<u8>)> = directives
                        .iter()
                        .filter(|d| d.state == DirectiveState::PendingConfirmation as i32)
                        .filter_map(|d| {
                            let person = d.person.as_ref()?.person_id.clone();
                            // What the check needs, not the directive's documents.
                            let pending = pb::Directive {
                                directive_id: d.directive_id.clone(),
                                person: d.person.clone(),
                                state: d.state,
                                issued_at: d.issued_at,
                                ..Default::default()
                            };
                            Some((person, pending.encode_to_vec()))
                        })
                        .collect();
                    if !pending.is_empty() {
                        healthcode_events::outbox::enqueue_many(txn, CONFIRMATION_TOPIC, pending)
                            .await
                            .map_err(db_error)?;
                    }
                }
                Ok(pb::IssueDirectiveResponse {
                    directives,
                    bulk_change_id: bulk_id(applied),
                })
            },
        )
        .await
    }

    pub async fn end_directive(
        &self,
        actor: &Actor,
        request_id: &str,
        directive_id: &str,
        reason: &str,
    ) -> Result<pb::Directive, ServiceError> {
        let key = format!("end-directive:{request_id}");
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let row = directive::Entity::find_by_id(directive_id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no directive {directive_id}")))?;
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let c = cause(
            actor,
            ChangeCause::Directive,
            request_id,
            reason,
            directive_id,
        );
        self.change(
            Some(key),
            BTreeSet::from([row.person_id.clone()]),
            c,
            async |txn, audits| {
                // Re-read under the person's lock.
                let row = directive::Entity::find_by_id(directive_id.to_owned())
                    .one(txn)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!("no directive {directive_id}"))
                    })?;
                let state =
                    DirectiveState::try_from(row.state).unwrap_or(DirectiveState::Unspecified);
                if row.held_by.is_some() {
                    return Err(ServiceError::precondition(
                        "HELD",
                        "the directive is held as a bulk change; approve or discard that instead",
                    ));
                }
                if state == DirectiveState::Ended || row.ends_at.is_some_and(|e| e <= now) {
                    return Err(ServiceError::precondition(
                        "DIRECTIVE_ENDED",
                        "the directive has already ended",
                    ));
                }
                let mut d: pb::Directive = decode(&row.payload)?;
                d.state = DirectiveState::Ended as i32;
                d.ends_at = Some(to_proto(now));
                d.ended_at = Some(to_proto(now));
                d.ended_by = actor.subject.clone();
                d.end_reason = reason.to_owned();
                save_directive(txn, &d, false).await?;
                let mut entry = base_audit(
                    actor,
                    AuditAction::DirectiveEnded,
                    request_id,
                    directive_id,
                    policy_version,
                );
                entry.person = person_ref(&row.person_id);
                entry.reason = reason.to_owned();
                audits.push(entry);
                Ok(d)
            },
            |d, _| d,
        )
        .await
    }

    /// A directive as stored, with the state it shows now.
    pub async fn directive(
        &self,
        directive_id: &str,
    ) -> Result<Option<pb::Directive>, ServiceError> {
        let Some(row) = directive::Entity::find_by_id(directive_id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let now = chrono::Utc::now();
        let timeout = pending_timeout(&self.policies().in_force(now));
        let mut d: pb::Directive = decode(&row.payload)?;
        let stored = DirectiveState::try_from(row.state).unwrap_or(DirectiveState::Unspecified);
        d.state = shown_state(stored, row.issued_at, row.ends_at, timeout, now) as i32;
        Ok(Some(d))
    }

    pub async fn record_national_check(
        &self,
        actor: &Actor,
        req: pb::RecordNationalCheckRequest,
        checked_at: Time,
    ) -> Result<pb::RecordNationalCheckResponse, ServiceError> {
        let now = chrono::Utc::now();
        let policy = self.policies().in_force(now);
        let timeout = pending_timeout(&policy);
        let person_id = req
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let request_id = req.request_id.clone();
        let check_id = new_id();
        let c = cause(actor, ChangeCause::Directive, &request_id, "", &check_id);
        self.change(
            Some(format!("national-check:{request_id}")),
            BTreeSet::from([person_id.clone()]),
            c,
            async |txn, audits| {
                national_check::Entity::insert(national_check::ActiveModel {
                    check_id: Set(check_id.clone()),
                    person_id: Set(person_id.clone()),
                    color: Set(req.color),
                    checked_at: Set(checked_at),
                    payload: Set(req.encode_to_vec()),
                })
                .exec_without_returning(txn)
                .await
                .map_err(db_error)?;
                // Confirm or reject the directives waiting for this input.
                let waiting = directive::Entity::find()
                    .filter(directive::Column::PersonId.eq(&person_id))
                    .filter(directive::Column::State.eq(DirectiveState::PendingConfirmation as i32))
                    .filter(directive::Column::HeldBy.is_null())
                    .filter(directive::Column::IssuedAt.gt(now - timeout))
                    .all(txn)
                    .await
                    .map_err(db_error)?;
                for row in waiting {
                    let mut d: pb::Directive = decode(&row.payload)?;
                    let kind = pb::DirectiveKind::try_from(d.kind)
                        .unwrap_or(pb::DirectiveKind::Unspecified);
                    let wanted = directive_color(&policy, kind).map(|(c, _)| c);
                    let confirms = wanted.is_some_and(|w| rank(color_of(req.color)) >= rank(w));
                    d.state = if confirms {
                        DirectiveState::Active
                    } else {
                        DirectiveState::Unconfirmed
                    } as i32;
                    save_directive(txn, &d, false).await?;
                    let action = if confirms {
                        AuditAction::NationalCheckRecorded
                    } else {
                        AuditAction::ChangeUnconfirmed
                    };
                    let mut entry =
                        base_audit(actor, action, &request_id, &d.directive_id, policy.version);
                    entry.person = person_ref(&person_id);
                    audits.push(entry);
                }
                let mut entry = base_audit(
                    actor,
                    AuditAction::NationalCheckRecorded,
                    &request_id,
                    &check_id,
                    policy.version,
                );
                entry.person = person_ref(&person_id);
                entry.reason = req.check_reference.clone();
                audits.push(entry);
                Ok(())
            },
            |(), outcomes: &[Outcome]| pb::RecordNationalCheckResponse {
                color: outcomes.first().map(|o| o.color.clone()),
            },
        )
        .await
    }
}

/// Inserts a proposed override and the persons it names.
pub(crate) async fn insert_override(
    txn: &DatabaseTransaction,
    o: &pb::Override,
    now: Time,
) -> Result<(), ServiceError> {
    override_::Entity::insert(override_::ActiveModel {
        override_id: Set(o.override_id.clone()),
        state: Set(o.state),
        proposed_at: Set(now),
        payload: Set(o.encode_to_vec()),
    })
    .exec_without_returning(txn)
    .await
    .map_err(db_error)?;
    let persons: BTreeSet<&str> = o.persons.iter().map(|p| p.person_id.as_str()).collect();
    for p in persons {
        override_person::Entity::insert(override_person::ActiveModel {
            override_id: Set(o.override_id.clone()),
            person_id: Set(p.to_owned()),
        })
        .exec_without_returning(txn)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Rewrites an override's state and message (the row exists).
pub(crate) async fn save_override(
    txn: &DatabaseTransaction,
    o: &pb::Override,
) -> Result<(), ServiceError> {
    override_::Entity::update_many()
        .col_expr(override_::Column::State, Expr::value(o.state))
        .col_expr(override_::Column::Payload, Expr::value(o.encode_to_vec()))
        .filter(override_::Column::OverrideId.eq(&o.override_id))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}

async fn save_directive(
    txn: &DatabaseTransaction,
    d: &pb::Directive,
    insert: bool,
) -> Result<(), ServiceError> {
    let model = directive::ActiveModel {
        directive_id: Set(d.directive_id.clone()),
        person_id: Set(d
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default()),
        kind: Set(d.kind),
        state: Set(d.state),
        starts_at: Set(d
            .starts_at
            .as_ref()
            .and_then(from_proto)
            .unwrap_or_else(chrono::Utc::now)),
        ends_at: Set(d.ends_at.as_ref().and_then(from_proto)),
        issued_at: Set(d
            .issued_at
            .as_ref()
            .and_then(from_proto)
            .unwrap_or_else(chrono::Utc::now)),
        payload: Set(d.encode_to_vec()),
        held_by: sea_orm::ActiveValue::NotSet,
    };
    if insert {
        directive::Entity::insert(model)
            .exec_without_returning(txn)
            .await
            .map_err(db_error)?;
    } else {
        directive::Entity::update(model)
            .exec(txn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

impl Risk {
    // -----------------------------------------------------------------------------------
    // Policies

    pub async fn publish_policy(
        &self,
        actor: &Actor,
        request_id: &str,
        mut policy: pb::Policy,
        effective_from: Time,
    ) -> Result<pb::Policy, ServiceError> {
        let province = self.policies().province().to_owned();
        let now = chrono::Utc::now();
        let c = cause(actor, ChangeCause::Policy, request_id, "", "");
        let published = self
            .change(
                Some(format!("publish-policy:{request_id}")),
                BTreeSet::new(),
                c,
                async |txn, audits| {
                    lock_key(txn, &format!("risk:policy:{province}"))
                        .await
                        .map_err(db_error)?;
                    let last = policy::Entity::find()
                        .filter(policy::Column::ProvinceCode.eq(&province))
                        .order_by_desc(policy::Column::Version)
                        .one(txn)
                        .await
                        .map_err(db_error)?;
                    policy.province_code = province.clone();
                    policy.version = last.map(|l| l.version as u32 + 1).unwrap_or(1);
                    policy.published_by = actor.subject.clone();
                    policy.published_at = Some(to_proto(now));
                    policy::Entity::insert(policy::ActiveModel {
                        province_code: Set(province.clone()),
                        version: Set(policy.version as i32),
                        effective_from: Set(effective_from),
                        payload: Set(policy.encode_to_vec()),
                        published_at: Set(now),
                    })
                    .exec_without_returning(txn)
                    .await
                    .map_err(db_error)?;
                    let mut entry = base_audit(
                        actor,
                        AuditAction::PolicyPublished,
                        request_id,
                        &format!("{province}/{}", policy.version),
                        policy.version,
                    );
                    entry.reason = policy.description.clone();
                    audits.push(entry);
                    Ok(policy)
                },
                |p, _| p,
            )
            .await?;
        self.policies()
            .reload(&self.store().db)
            .await
            .map_err(db_error)?;
        Ok(published)
    }

    // -----------------------------------------------------------------------------------
    // Manual overrides: two distinct approvers

    pub async fn propose_override(
        &self,
        actor: &Actor,
        req: pb::ProposeOverrideRequest,
    ) -> Result<pb::Override, ServiceError> {
        let now = chrono::Utc::now();
        let policy_version = self.policies().in_force(now).version;
        let request_id = req.request_id.clone();
        let o = pb::Override {
            override_id: new_id(),
            persons: req.persons.clone(),
            color: req.color,
            reason: req.reason.clone(),
            holds_until: req.holds_until,
            state: OverrideState::Proposed as i32,
            proposed_by: actor.subject.clone(),
            proposed_at: Some(to_proto(now)),
            expires_at: Some(to_proto(now + OVERRIDE_APPROVAL_WINDOW)),
            approvals: vec![pb::Approval {
                approver: actor.subject.clone(),
                approved_at: Some(to_proto(now)),
                note: req.reason.clone(),
            }],
            ..Default::default()
        };
        let override_id = o.override_id.clone();
        let c = cause(
            actor,
            ChangeCause::Override,
            &request_id,
            &req.reason,
            &override_id,
        );
        self.change(
            Some(format!("propose-override:{request_id}")),
            BTreeSet::new(),
            c,
            async |txn, audits| {
                insert_override(txn, &o, now).await?;
                let mut entry = base_audit(
                    actor,
                    AuditAction::OverrideProposed,
                    &request_id,
                    &o.override_id,
                    policy_version,
                );
                entry.reason = o.reason.clone();
                audits.push(entry);
                Ok(o)
            },
            |o, _| o,
        )
        .await
    }

    async fn load_override(&self, override_id: &str) -> Result<pb::Override, ServiceError> {
        let row = override_::Entity::find_by_id(override_id.to_owned())
            .one(&self.store().db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no override {override_id}")))?;
        decode(&row.payload)
    }

    /// Approves (or, with `reject`, rejects) a proposed override.
    pub async fn decide_override(
        &self,
        actor: &Actor,
        request_id: &str,
        override_id: &str,
        note: &str,
        reject: bool,
    ) -> Result<pb::Override, ServiceError> {
        let key = format!(
            "{}-override:{request_id}",
            if reject { "reject" } else { "approve" }
        );
        if let Some(reply) = self.stored_reply(&key).await? {
            return Ok(reply);
        }
        let now = chrono::Utc::now();
        let current = shown_override(self.load_override(override_id).await?, now);
        if current.state != OverrideState::Proposed as i32 {
            return Err(ServiceError::precondition(
                "OVERRIDE_NOT_PROPOSED",
                "the override is no longer waiting for approval",
            ));
        }
        if !reject
            && (current.proposed_by == actor.subject
                || current
                    .approvals
                    .iter()
                    .any(|a| a.approver == actor.subject))
        {
            return Err(ServiceError::PermissionDenied(
                "an override needs a second approver other than its proposer and earlier approvers"
                    .into(),
            ));
        }
        let persons: BTreeSet<String> = if reject {
            BTreeSet::new()
        } else {
            current
                .persons
                .iter()
                .map(|p| p.person_id.clone())
                .collect()
        };
        let policy_version = self.policies().in_force(now).version;
        let reason = current.reason.clone();
        let c = cause(
            actor,
            ChangeCause::Override,
            request_id,
            &reason,
            override_id,
        );
        self.change_holding(
            Some(key),
            persons,
            c,
            !reject,
            async |txn, audits| {
                lock_key(txn, &format!("risk:override:{override_id}"))
                    .await
                    .map_err(db_error)?;
                let row = override_::Entity::find_by_id(override_id.to_owned())
                    .one(txn)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| ServiceError::NotFound(format!("no override {override_id}")))?;
                let mut o = shown_override(decode(&row.payload)?, now);
                if o.state != OverrideState::Proposed as i32 {
                    return Err(ServiceError::precondition(
                        "OVERRIDE_NOT_PROPOSED",
                        "the override is no longer waiting for approval",
                    ));
                }
                let action = if reject {
                    o.state = OverrideState::Rejected as i32;
                    o.rejected_by = actor.subject.clone();
                    o.rejection_note = note.to_owned();
                    AuditAction::OverrideRejected
                } else {
                    o.approvals.push(pb::Approval {
                        approver: actor.subject.clone(),
                        approved_at: Some(to_proto(now)),
                        note: note.to_owned(),
                    });
                    let distinct: BTreeSet<&str> =
                        o.approvals.iter().map(|a| a.approver.as_str()).collect();
                    if distinct.len() >= 2 {
                        o.state = OverrideState::Applied as i32;
                    }
                    AuditAction::OverrideApproved
                };
                save_override(txn, &o).await?;
                let mut entry = base_audit(actor, action, request_id, override_id, policy_version);
                entry.reason = if note.is_empty() {
                    o.reason.clone()
                } else {
                    note.to_owned()
                };
                audits.push(entry);
                Ok(o)
            },
            async |txn, mut o: pb::Override, applied| {
                if let Some(held) = &applied.held {
                    o.state = OverrideState::Held as i32;
                    o.bulk_change_id = held.bulk_change_id.clone();
                    save_override(txn, &o).await?;
                } else if !o.appeal_id.is_empty() {
                    self.appeal_after_override(txn, &o, &applied.outcomes, now)
                        .await?;
                }
                Ok(o)
            },
        )
        .await
    }

    pub async fn list_overrides(
        &self,
        state: i32,
        person_id: Option<&str>,
        page: &Page,
    ) -> Result<(Vec<pb::Override>, String), ServiceError> {
        let now = chrono::Utc::now();
        let mut q = override_::Entity::find();
        if let Some(p) = person_id {
            let ids: Vec<String> = override_person::Entity::find()
                .filter(override_person::Column::PersonId.eq(p))
                .all(&self.store().db)
                .await
                .map_err(db_error)?
                .into_iter()
                .map(|r| r.override_id)
                .collect();
            q = q.filter(override_::Column::OverrideId.is_in(ids));
        }
        let rows = q
            .order_by_desc(override_::Column::ProposedAt)
            .order_by_desc(override_::Column::OverrideId)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let mut all = Vec::new();
        for row in rows {
            let o = shown_override(decode(&row.payload)?, now);
            if state == 0 || o.state == state {
                all.push(o);
            }
        }
        let page_items: Vec<pb::Override> = all
            .into_iter()
            .skip(page.offset as usize)
            .take(page.limit as usize)
            .collect();
        let token = next_token(page_items.len(), page);
        Ok((page_items, token))
    }

    // -----------------------------------------------------------------------------------
    // Audit trail

    pub async fn audit_entries(
        &self,
        filter: &pb::ListAuditEntriesRequest,
        after_sequence: i64,
        limit: u64,
    ) -> Result<(Vec<pb::AuditEntry>, String), ServiceError> {
        let mut q =
            audit_entry::Entity::find().filter(audit_entry::Column::Sequence.gt(after_sequence));
        if let Some(p) = &filter.person {
            q = q.filter(audit_entry::Column::PersonId.eq(&p.person_id));
        }
        if !filter.actor.is_empty() {
            q = q.filter(audit_entry::Column::Actor.eq(&filter.actor));
        }
        if filter.action != 0 {
            q = q.filter(audit_entry::Column::Action.eq(filter.action));
        }
        if let Some(s) = filter.since.as_ref().and_then(from_proto) {
            q = q.filter(audit_entry::Column::RecordedAt.gte(s));
        }
        if let Some(u) = filter.until.as_ref().and_then(from_proto) {
            q = q.filter(audit_entry::Column::RecordedAt.lt(u));
        }
        let rows = q
            .order_by_asc(audit_entry::Column::Sequence)
            .limit(limit)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let token = if rows.len() as u64 == limit {
            rows.last()
                .map(|r| r.sequence.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let entries = rows
            .iter()
            .map(|r| {
                let mut entry: pb::AuditEntry = decode(&r.payload)?;
                entry.digest = r.digest.clone();
                Ok(entry)
            })
            .collect::<Result<_, ServiceError>>()?;
        Ok((entries, token))
    }

    // -----------------------------------------------------------------------------------
    // Scheduled work

    /// Re-evaluates colors whose `valid_until` has come or that were decided under an
    /// older policy, so the cache follows without anyone asking. Returns how many.
    pub async fn sweep_once(&self, limit: u64) -> Result<usize, ServiceError> {
        let now = chrono::Utc::now();
        let version = self.policies().in_force(now).version as i32;
        let due: Vec<String> = color::Entity::find()
            .filter(
                Condition::any()
                    .add(color::Column::ValidUntil.lte(now))
                    .add(color::Column::PolicyVersion.ne(version)),
            )
            .limit(limit)
            .all(&self.store().db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|r| r.person_id)
            .collect();
        let n = due.len();
        // One transaction per person: a sweep never holds many locks at once.
        for person in due {
            let system = Actor::system();
            let c = cause(&system, ChangeCause::Expiry, "", "", "");
            self.change(
                None,
                BTreeSet::from([person]),
                c,
                async |_, _| Ok(()),
                |(), _: &[Outcome]| pb::RecordNationalCheckResponse::default(),
            )
            .await?;
        }
        Ok(n)
    }

    /// Deletes itinerary data older than 60 days.
    pub async fn purge_once(&self) -> Result<u64, ServiceError> {
        store::purge_itinerary(&self.store().db, chrono::Utc::now())
            .await
            .map_err(db_error)
    }

    /// Verifies the audit chain from the start: the sequence has no gaps and every digest
    /// matches. Returns the number of entries checked.
    pub async fn verify_audit_chain(&self) -> Result<u64, ServiceError> {
        let rows = audit_entry::Entity::find()
            .order_by_asc(audit_entry::Column::Sequence)
            .all(&self.store().db)
            .await
            .map_err(db_error)?;
        let mut previous = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let entry: pb::AuditEntry = decode(&row.payload)?;
            if row.sequence != i as i64 + 1 || entry.previous_digest != previous {
                return Err(ServiceError::internal(format!(
                    "audit chain broken at {}",
                    row.sequence
                )));
            }
            if crate::service::chain_digest(&previous, &row.payload) != row.digest {
                return Err(ServiceError::internal(format!(
                    "audit digest mismatch at {}",
                    row.sequence
                )));
            }
            previous = row.digest.clone();
        }
        Ok(rows.len() as u64)
    }
}
