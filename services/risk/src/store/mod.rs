//! The risk service's database: facts, colors, audit, and the replies of retry-safe calls.

pub mod entities;

use crate::domain::areas::overlaps;
use crate::domain::facts::{
    AreaStay, Contact, Directive, Dose, Facts, ForeignDecision, NationalCheck, Override,
    TestResult, color_of, latest_per_province,
};
use crate::domain::time::{Time, from_proto};
use entities::*;
use healthcode_proto::common::v1::NucleicAcidResult;
use healthcode_proto::risk::v1::risk_event::Event as EventKind;
use healthcode_proto::risk::v1::{
    ContactKind, DirectiveKind, DirectiveState, OverrideState, RiskArea, RiskEvent,
};
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMutexGuard};

pub const KIND_CONTACT: &str = "contact";
pub const KIND_STAY: &str = "area_stay";
pub const KIND_TEST: &str = "test_result";
pub const KIND_DOSE: &str = "dose";

/// Itinerary data (stays) and risk areas are kept this long.
pub const RETENTION_DAYS: i64 = 60;

#[derive(Clone)]
pub struct Store {
    pub db: DatabaseConnection,
    /// SQLite allows one writer: write transactions queue here instead of failing busy.
    write_gate: Option<Arc<Mutex<()>>>,
}

/// A write transaction (and, on SQLite, the right to write).
pub struct Write {
    pub txn: DatabaseTransaction,
    _gate: Option<OwnedMutexGuard<()>>,
}

impl Write {
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, DbErr> {
    M::decode(bytes).map_err(|e| DbErr::Custom(format!("stored message unreadable: {e}")))
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Self {
        let write_gate =
            (db.get_database_backend() == DbBackend::Sqlite).then(|| Arc::new(Mutex::new(())));
        Store { db, write_gate }
    }

    pub async fn write(&self) -> Result<Write, DbErr> {
        let gate = match &self.write_gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        };
        let txn = self.db.begin().await?;
        if gate.is_some() {
            // Take SQLite's write lock first (waiting out the busy timeout): a transaction
            // that reads before its first write cannot upgrade once another connection (the
            // outbox relay) has committed meanwhile, and would fail at once.
            txn.execute_unprepared("UPDATE replies SET key = key WHERE 1 = 0")
                .await?;
        }
        Ok(Write { txn, _gate: gate })
    }
}

/// Serialises writers of one key until the transaction ends (PostgreSQL; SQLite has one
/// writer anyway).
pub async fn lock_key(txn: &DatabaseTransaction, key: &str) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            [key.into()],
        ))
        .await?;
    }
    Ok(())
}

pub async fn reply_get<C: ConnectionTrait>(db: &C, key: &str) -> Result<Option<Vec<u8>>, DbErr> {
    Ok(reply::Entity::find_by_id(key.to_owned())
        .one(db)
        .await?
        .map(|r| r.payload))
}

pub async fn reply_put<C: ConnectionTrait>(
    db: &C,
    key: &str,
    payload: Vec<u8>,
) -> Result<(), DbErr> {
    reply::Entity::insert(reply::ActiveModel {
        key: Set(key.to_owned()),
        payload: Set(payload),
        created_at: Set(chrono::Utc::now()),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Risk areas whose window reaches past `since` (the look-back horizon).
pub async fn load_areas<C: ConnectionTrait>(
    db: &C,
    since: Time,
) -> Result<Vec<(RiskArea, Time)>, DbErr> {
    let rows = risk_area::Entity::find()
        .filter(risk_area::Column::HeldBy.is_null())
        .filter(
            risk_area::Column::ValidUntil
                .is_null()
                .or(risk_area::Column::ValidUntil.gt(since)),
        )
        .filter(
            risk_area::Column::LiftedAt
                .is_null()
                .or(risk_area::Column::LiftedAt.gt(since)),
        )
        .all(db)
        .await?;
    rows.iter()
        .map(|r| Ok((decode::<RiskArea>(&r.payload)?, r.declared_at)))
        .collect()
}

pub async fn load_facts<C: ConnectionTrait>(
    db: &C,
    person_id: &str,
    areas: &[(RiskArea, Time)],
) -> Result<Facts, DbErr> {
    let mut facts = Facts::default();
    let events = event::Entity::find()
        .filter(event::Column::PersonId.eq(person_id))
        .filter(event::Column::HeldBy.is_null())
        .all(db)
        .await?;
    for row in events {
        let stored: RiskEvent = decode(&row.payload)?;
        match stored.event {
            Some(EventKind::Contact(c)) => {
                if let Some(at) = c.last_exposure_at.as_ref().and_then(from_proto) {
                    facts.contacts.push(Contact {
                        kind: ContactKind::try_from(c.kind).unwrap_or(ContactKind::Unspecified),
                        last_exposure_at: at,
                        recorded_at: row.recorded_at,
                    });
                }
            }
            Some(EventKind::AreaStay(s)) => {
                for (area, declared_at) in areas {
                    if overlaps(area, &s)
                        && let Some((from, until)) = crate::domain::areas::stay_window(&s)
                    {
                        facts.stays.push(AreaStay {
                            area_id: area.area_id.clone(),
                            area_name: area.name.clone(),
                            level: area.level(),
                            stay_from: from,
                            stay_until: until,
                            known_at: Ord::max(row.recorded_at, *declared_at),
                        });
                    }
                }
            }
            Some(EventKind::TestResult(t)) => {
                let sampled = t.sampled_at.as_ref().and_then(from_proto);
                let reported = t.reported_at.as_ref().and_then(from_proto);
                if let (Some(sampled_at), Some(reported_at)) = (sampled, reported) {
                    facts.tests.push(TestResult {
                        report_id: t.report_id.clone(),
                        result: NucleicAcidResult::try_from(t.result)
                            .unwrap_or(NucleicAcidResult::Unspecified),
                        sampled_at,
                        reported_at,
                        pooled: t.pooled,
                        recorded_at: row.recorded_at,
                    });
                }
            }
            Some(EventKind::VaccinationDose(d)) => {
                if let Some(at) = d.administered_at.as_ref().and_then(from_proto) {
                    facts.doses.push(Dose {
                        dose_number: d.dose_number,
                        completes_course: d.completes_course,
                        booster: d.booster,
                        administered_at: at,
                        booster_due_at: d.booster_due_at.as_ref().and_then(from_proto),
                    });
                }
            }
            Some(EventKind::OtherProvinceDecision(d)) => {
                if let Some(decided_at) = d.decided_at.as_ref().and_then(from_proto) {
                    facts.foreign.push(ForeignDecision {
                        province: d.issuing_province.clone(),
                        sequence: d.sequence,
                        color: color_of(d.color),
                        reason_codes: d.reason_codes.clone(),
                        decided_at,
                        valid_until: d.valid_until.as_ref().and_then(from_proto),
                        withdrawn: d.withdrawn,
                    });
                }
            }
            None => {}
        }
    }
    // Each province's latest record replaces its earlier ones.
    facts.foreign = latest_per_province(std::mem::take(&mut facts.foreign));
    if let Some(cleared) = stays_cleared_at(db, person_id).await? {
        facts.stays.retain(|s| s.known_at > cleared);
    }
    for d in directive::Entity::find()
        .filter(directive::Column::PersonId.eq(person_id))
        .filter(directive::Column::HeldBy.is_null())
        .all(db)
        .await?
    {
        facts.directives.push(Directive {
            directive_id: d.directive_id,
            kind: DirectiveKind::try_from(d.kind).unwrap_or(DirectiveKind::Unspecified),
            starts_at: d.starts_at,
            ends_at: d.ends_at,
            state: DirectiveState::try_from(d.state).unwrap_or(DirectiveState::Unspecified),
            issued_at: d.issued_at,
        });
    }
    for c in national_check::Entity::find()
        .filter(national_check::Column::PersonId.eq(person_id))
        .order_by_desc(national_check::Column::CheckedAt)
        .limit(20)
        .all(db)
        .await?
    {
        let request: healthcode_proto::risk::v1::RecordNationalCheckRequest = decode(&c.payload)?;
        facts.national_checks.push(NationalCheck {
            check_id: c.check_id,
            color: color_of(c.color),
            reasons: request.reasons,
            checked_at: c.checked_at,
        });
    }
    facts.override_ = applied_override(db, person_id).await?;
    Ok(facts)
}

/// The latest time up to which an appeal's pre-review cleared the person's known stays.
pub async fn stays_cleared_at<C: ConnectionTrait>(
    db: &C,
    person_id: &str,
) -> Result<Option<Time>, DbErr> {
    Ok(appeal::Entity::find()
        .filter(appeal::Column::PersonId.eq(person_id))
        .filter(appeal::Column::StaysClearedAt.is_not_null())
        .order_by_desc(appeal::Column::StaysClearedAt)
        .one(db)
        .await?
        .and_then(|a| a.stays_cleared_at))
}

/// The most recently applied override naming the person, if any.
async fn applied_override<C: ConnectionTrait>(
    db: &C,
    person_id: &str,
) -> Result<Option<Override>, DbErr> {
    let ids: Vec<String> = override_person::Entity::find()
        .filter(override_person::Column::PersonId.eq(person_id))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.override_id)
        .collect();
    if ids.is_empty() {
        return Ok(None);
    }
    let rows = override_::Entity::find()
        .filter(override_::Column::OverrideId.is_in(ids))
        .filter(override_::Column::State.eq(OverrideState::Applied as i32))
        .all(db)
        .await?;
    let mut best: Option<Override> = None;
    for row in rows {
        let o: healthcode_proto::risk::v1::Override = decode(&row.payload)?;
        let applied_at = o
            .approvals
            .last()
            .and_then(|a| a.approved_at.as_ref())
            .and_then(from_proto)
            .unwrap_or(row.proposed_at);
        if best.as_ref().is_none_or(|b| applied_at > b.applied_at) {
            best = Some(Override {
                override_id: o.override_id.clone(),
                color: color_of(o.color),
                holds_until: o.holds_until.as_ref().and_then(from_proto),
                applied_at,
            });
        }
    }
    Ok(best)
}

/// Deletes itinerary points and risk areas that ended more than 60 days before `now`, and
/// the stays compared by appeals submitted before then.
/// Colors, their history and the audit trail stay.
pub async fn purge_itinerary<C: ConnectionTrait>(db: &C, now: Time) -> Result<u64, DbErr> {
    let cutoff = now - chrono::Duration::days(RETENTION_DAYS);
    let stays = event::Entity::delete_many()
        .filter(event::Column::Kind.eq(KIND_STAY))
        .filter(event::Column::OccurredAt.lt(cutoff))
        .exec(db)
        .await?
        .rows_affected;
    let areas = risk_area::Entity::delete_many()
        .filter(
            Expr::col(risk_area::Column::ValidUntil)
                .lt(cutoff)
                .or(Expr::col(risk_area::Column::LiftedAt).lt(cutoff)),
        )
        .exec(db)
        .await?
        .rows_affected;
    // Appeals keep their decision, not the itinerary they compared.
    let mut appeals = 0;
    for row in appeal::Entity::find()
        .filter(appeal::Column::SubmittedAt.lt(cutoff))
        .all(db)
        .await?
    {
        let mut a: healthcode_proto::risk::v1::Appeal = decode(&row.payload)?;
        let Some(review) = a.pre_review.as_mut() else {
            continue;
        };
        if review.overlaps.is_empty() {
            continue;
        }
        review.overlaps.clear();
        appeal::Entity::update_many()
            .col_expr(appeal::Column::Payload, Expr::value(a.encode_to_vec()))
            .filter(appeal::Column::AppealId.eq(&row.appeal_id))
            .exec(db)
            .await?;
        appeals += 1;
    }
    Ok(stays + areas + appeals)
}
