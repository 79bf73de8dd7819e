//! Samples, laboratory results, the reports they produce, retest notices and negative
//! certificates. An upload checks every item against what is stored first, then applies
//! the accepted ones in one transaction: each result with all of its reports, its events
//! for the risk service and its retest notices, or nothing of it.

use crate::service::{NOTICE_TOPIC, RESULT_TOPIC, Testing, derived_id, from_ts, minute, ts};
use crate::store::entities::*;
use chrono::{DateTime, Utc};
use healthcode_db::{db_error, is_unique_violation};
use healthcode_errors::ServiceError;
use healthcode_events::outbox;
use healthcode_proto::common::v1::{
    ItemError, MaskedIdentity, NucleicAcidResult, PersonRef, SignedEnvelope,
};
use healthcode_proto::identity::v1::GetMaskedPersonRequest;
use healthcode_proto::risk::v1::{RiskEvent, TestResultEvent, risk_event};
use healthcode_proto::testing::v1 as pb;
use pb::{BookingState, CertificateCheck, RetestNoticeState, SampleKind};
use prost::Message;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use std::collections::{HashMap, HashSet};

pub const MAX_UPLOAD: usize = 5_000;
pub const CERTIFICATE_PREFIX: &str = "HCN1";

pub struct NewSample<'a> {
    pub request_id: &'a str,
    pub institution_id: &'a str,
    pub tube_id: &'a str,
    pub kind: SampleKind,
    pub persons: Vec<String>,
    pub sampled_at: DateTime<Utc>,
    /// False when the institution left the time out and `sampled_at` is the recording time.
    pub sampled_at_given: bool,
}

fn item_error(
    index: usize,
    item_id: &str,
    code: tonic::Code,
    reason: &str,
    message: &str,
) -> ItemError {
    ItemError {
        index: index as u32,
        item_id: item_id.to_owned(),
        code: code as i32,
        reason: reason.to_owned(),
        message: message.to_owned(),
    }
}

/// A result that passed its own checks, with its times to the minute.
struct Checked {
    index: usize,
    result: pb::LabResult,
    outcome: NucleicAcidResult,
    sampled_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    reported_at: DateTime<Utc>,
    digest: Vec<u8>,
}

/// The checks one result passes on its own, before anything is looked up.
fn check_item(index: usize, r: &pb::LabResult, now: DateTime<Utc>) -> Result<Checked, ItemError> {
    let bad = |reason: &str, message: &str| {
        item_error(
            index,
            &r.result_id,
            tonic::Code::InvalidArgument,
            reason,
            message,
        )
    };
    let printable =
        |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_graphic());
    if !printable(&r.result_id) {
        return Err(bad(
            "INVALID_RESULT_ID",
            "result_id: 1 to 64 printable ASCII characters",
        ));
    }
    if !printable(&r.tube_id) {
        return Err(bad(
            "INVALID_TUBE_ID",
            "tube_id: 1 to 64 printable ASCII characters",
        ));
    }
    let outcome = NucleicAcidResult::try_from(r.result).unwrap_or_default();
    if outcome == NucleicAcidResult::Unspecified || outcome == NucleicAcidResult::PoolPositive {
        return Err(bad(
            "INVALID_RESULT",
            "result: NEGATIVE, POSITIVE or INVALID (a pooled tube is reported POSITIVE)",
        ));
    }
    let (Some(sampled), Some(received), Some(reported)) = (
        from_ts(&r.sampled_at),
        from_ts(&r.received_at),
        from_ts(&r.reported_at),
    ) else {
        return Err(bad(
            "MISSING_TIME",
            "sampled_at, received_at and reported_at are required",
        ));
    };
    let (sampled_at, received_at, reported_at) =
        (minute(sampled), minute(received), minute(reported));
    if !(sampled_at <= received_at && received_at <= reported_at && reported_at <= now) {
        return Err(bad(
            "TIMESTAMPS_OUT_OF_ORDER",
            "sampled_at <= received_at <= reported_at <= now, to the minute",
        ));
    }
    let ct_ok = |ct: f32| ct.is_finite() && (0.0..=60.0).contains(&ct);
    if !(ct_ok(r.ct_orf1ab) && ct_ok(r.ct_n)) {
        return Err(bad("INVALID_CT", "ct values: 0 to 60"));
    }
    let mut canonical = r.clone();
    canonical.sampled_at = Some(ts(sampled_at));
    canonical.received_at = Some(ts(received_at));
    canonical.reported_at = Some(ts(reported_at));
    Ok(Checked {
        index,
        digest: healthcode_crypto::sm3_digest(&canonical.encode_to_vec()).to_vec(),
        result: canonical,
        outcome,
        sampled_at,
        received_at,
        reported_at,
    })
}

fn report_proto(
    r: &report::Model,
    institutions: &HashMap<String, pb::Institution>,
) -> pb::TestReport {
    let name = |id: &str| {
        institutions
            .get(id)
            .map(|i| i.name.clone())
            .unwrap_or_default()
    };
    pb::TestReport {
        report_id: r.report_id.clone(),
        person: Some(PersonRef {
            person_id: r.person_id.clone(),
        }),
        result: r.result,
        sample_kind: r.sample_kind,
        tube_id: r.tube_id.clone(),
        sampled_at: Some(ts(r.sampled_at)),
        received_at: Some(ts(r.received_at)),
        reported_at: Some(ts(r.reported_at)),
        sampling_institution_id: r.sampling_institution_id.clone(),
        sampling_institution_name: name(&r.sampling_institution_id),
        laboratory_id: r.laboratory_id.clone(),
        laboratory_name: name(&r.laboratory_id),
        retest_notice_id: r.retest_notice_id.clone().unwrap_or_default(),
    }
}

fn notice_proto(n: &retest_notice::Model) -> pb::RetestNotice {
    pb::RetestNotice {
        notice_id: n.notice_id.clone(),
        person: Some(PersonRef {
            person_id: n.person_id.clone(),
        }),
        pool_tube_id: n.pool_tube_id.clone(),
        pool_report_id: n.pool_report_id.clone(),
        state: n.state,
        notified_at: Some(ts(n.notified_at)),
        retest_due_by: Some(ts(n.due_by)),
        booking_id: n.booking_id.clone().unwrap_or_default(),
        retest_report_id: n.retest_report_id.clone().unwrap_or_default(),
    }
}

fn risk_event(r: &report::Model) -> RiskEvent {
    RiskEvent {
        event_id: r.report_id.clone(),
        person: Some(PersonRef {
            person_id: r.person_id.clone(),
        }),
        observed_at: Some(ts(r.created_at)),
        event: Some(risk_event::Event::TestResult(TestResultEvent {
            report_id: r.report_id.clone(),
            result: r.result,
            sampled_at: Some(ts(r.sampled_at)),
            reported_at: Some(ts(r.reported_at)),
            pooled: r.sample_kind == SampleKind::Pooled as i32,
        })),
    }
}

fn page_token(offset: u64, limit: u64, more: bool) -> String {
    if more {
        (offset + limit).to_string()
    } else {
        String::new()
    }
}

/// What an upload did: counts, per-item rejections, and the reports it produced.
pub struct Uploaded {
    pub response: pb::UploadResultsResponse,
    pub reports: Vec<report::Model>,
}

impl Testing {
    pub async fn record_sample(&self, s: NewSample<'_>) -> Result<pb::Sample, ServiceError> {
        let key = format!("sample:{}:{}", s.institution_id, s.request_id);
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let institution = self.institution(s.institution_id).await?;
        let pool_size = institution
            .pool_size
            .clamp(2, crate::service::MAX_POOL_SIZE) as usize;
        match s.kind {
            SampleKind::SingleTube if s.persons.len() != 1 => {
                return Err(ServiceError::invalid(
                    "persons",
                    "a single tube holds one person",
                ));
            }
            SampleKind::Pooled if s.persons.len() < 2 || s.persons.len() > pool_size => {
                return Err(ServiceError::invalid(
                    "persons",
                    format!("a pooled tube holds 2 to {pool_size} persons at this institution"),
                ));
            }
            _ => {}
        }
        let now = Utc::now();
        let txn = self.begin_write().await?;
        let inserted = sample::Entity::insert(sample::ActiveModel {
            tube_id: Set(s.tube_id.to_owned()),
            institution_id: Set(s.institution_id.to_owned()),
            kind: Set(s.kind as i32),
            sampled_at: Set(s.sampled_at),
            sampled_at_given: Set(s.sampled_at_given),
            recorded_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await.map_err(db_error)?;
                if let Some(done) = self.replay(&key).await? {
                    return Ok(done);
                }
                return Err(ServiceError::conflict(
                    "TUBE_KNOWN",
                    "the tube barcode is known",
                ));
            }
            other => {
                other.map_err(db_error)?;
            }
        }
        // Each person's confirmed booking at this institution for the day of the sample
        // (at most one: open bookings are unique per person and day).
        let open = booking::Entity::find()
            .filter(booking::Column::PersonId.is_in(s.persons.iter().cloned()))
            .filter(booking::Column::InstitutionId.eq(s.institution_id))
            .filter(booking::Column::State.eq(BookingState::Confirmed as i32))
            .filter(booking::Column::OpenDay.eq(crate::service::local_day(s.sampled_at)))
            .order_by_asc(booking::Column::CreatedAt)
            .all(&txn)
            .await
            .map_err(db_error)?;
        let mut booked: HashMap<&str, &booking::Model> = HashMap::new();
        for b in &open {
            booked.entry(b.person_id.as_str()).or_insert(b);
        }
        let booking_ids: Vec<String> = booked.values().map(|b| b.booking_id.clone()).collect();
        if !booking_ids.is_empty() {
            booking::Entity::update_many()
                .col_expr(
                    booking::Column::State,
                    Expr::value(BookingState::Sampled as i32),
                )
                .col_expr(
                    booking::Column::OpenDay,
                    Expr::value(sea_orm::Value::String(None)),
                )
                .col_expr(booking::Column::UpdatedAt, Expr::value(now))
                .filter(booking::Column::BookingId.is_in(booking_ids.clone()))
                .filter(booking::Column::State.eq(BookingState::Confirmed as i32))
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        let members = s
            .persons
            .iter()
            .enumerate()
            .map(|(i, p)| sample_member::ActiveModel {
                tube_id: Set(s.tube_id.to_owned()),
                person_id: Set(p.clone()),
                position: Set(i as i32),
                booking_id: Set(booked.get(p.as_str()).map(|b| b.booking_id.clone())),
            });
        sample_member::Entity::insert_many(members)
            .exec_without_returning(&txn)
            .await
            .map_err(db_error)?;
        let answer = pb::Sample {
            tube_id: s.tube_id.to_owned(),
            institution_id: s.institution_id.to_owned(),
            kind: s.kind as i32,
            persons: s
                .persons
                .iter()
                .map(|p| PersonRef {
                    person_id: p.clone(),
                })
                .collect(),
            sampled_at: Some(ts(s.sampled_at)),
            booking_ids,
        };
        self.finish(txn, &key, answer).await
    }

    /// Checks and applies up to [`MAX_UPLOAD`] results of laboratory `lab_id`.
    pub async fn upload(
        &self,
        lab_id: &str,
        results: &[pb::LabResult],
    ) -> Result<Uploaded, ServiceError> {
        let now = Utc::now();
        let mut errors = Vec::new();
        let mut duplicates = 0u32;
        let mut checked = Vec::new();
        for (i, r) in results.iter().enumerate() {
            match check_item(i, r, now) {
                Ok(c) => checked.push(c),
                Err(e) => errors.push(e),
            }
        }
        // Against what is stored: the same result id, the same tube, the recorded sample.
        let keys: Vec<String> = checked
            .iter()
            .map(|c| format!("{lab_id}:{}", c.result.result_id))
            .collect();
        let tubes: Vec<String> = checked.iter().map(|c| c.result.tube_id.clone()).collect();
        let mut by_key = HashMap::new();
        let mut by_tube = HashMap::new();
        let mut samples = HashMap::new();
        let mut members: HashMap<String, Vec<sample_member::Model>> = HashMap::new();
        for (keys, tubes) in keys.chunks(1000).zip(tubes.chunks(1000)) {
            let stored = lab_result::Entity::find()
                .filter(
                    sea_orm::Condition::any()
                        .add(lab_result::Column::ResultKey.is_in(keys.iter().cloned()))
                        .add(lab_result::Column::TubeId.is_in(tubes.iter().cloned())),
                )
                .all(&self.db)
                .await
                .map_err(db_error)?;
            for r in stored {
                by_tube.insert(r.tube_id.clone(), r.result_key.clone());
                by_key.insert(r.result_key.clone(), r);
            }
            for s in sample::Entity::find()
                .filter(sample::Column::TubeId.is_in(tubes.iter().cloned()))
                .all(&self.db)
                .await
                .map_err(db_error)?
            {
                samples.insert(s.tube_id.clone(), s);
            }
            for m in sample_member::Entity::find()
                .filter(sample_member::Column::TubeId.is_in(tubes.iter().cloned()))
                .order_by_asc(sample_member::Column::Position)
                .all(&self.db)
                .await
                .map_err(db_error)?
            {
                members.entry(m.tube_id.clone()).or_default().push(m);
            }
        }
        let mut accepted = Vec::new();
        let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
        let mut seen_tubes = HashSet::new();
        for (c, key) in checked.into_iter().zip(keys) {
            let reject = |code, reason: &str, message: &str| {
                item_error(c.index, &c.result.result_id, code, reason, message)
            };
            if let Some(stored) = by_key.get(&key).map(|r| &r.digest).or(seen.get(&key)) {
                if *stored == c.digest {
                    duplicates += 1;
                } else {
                    errors.push(reject(
                        tonic::Code::AlreadyExists,
                        "ALREADY_REPORTED_DIFFERENTLY",
                        "this result id was uploaded with a different content",
                    ));
                }
                continue;
            }
            if by_tube.contains_key(&c.result.tube_id) || seen_tubes.contains(&c.result.tube_id) {
                errors.push(reject(
                    tonic::Code::AlreadyExists,
                    "TUBE_ALREADY_REPORTED",
                    "the tube has a result under another result id",
                ));
                continue;
            }
            let Some(sample) = samples.get(&c.result.tube_id) else {
                errors.push(reject(
                    tonic::Code::NotFound,
                    "UNKNOWN_TUBE",
                    "no sample has this tube barcode",
                ));
                continue;
            };
            if sample.sampled_at_given && minute(sample.sampled_at) != c.sampled_at {
                errors.push(reject(
                    tonic::Code::FailedPrecondition,
                    "SAMPLED_AT_MISMATCH",
                    "sampled_at differs from the recorded sample",
                ));
                continue;
            }
            seen.insert(key.clone(), c.digest.clone());
            seen_tubes.insert(c.result.tube_id.clone());
            accepted.push((c, key));
        }
        errors.sort_by_key(|e| e.index);
        let mut response = pb::UploadResultsResponse {
            accepted: accepted.len() as u32,
            duplicates,
            errors,
        };
        if accepted.is_empty() {
            return Ok(Uploaded {
                response,
                reports: Vec::new(),
            });
        }
        // What the accepted results produce.
        let mut result_rows = Vec::with_capacity(accepted.len());
        let mut reports = Vec::new();
        let mut notices = Vec::new();
        let mut finished_bookings = Vec::new();
        for (c, key) in &accepted {
            let sample = &samples[&c.result.tube_id];
            let pooled = sample.kind == SampleKind::Pooled as i32;
            result_rows.push(lab_result::ActiveModel {
                result_key: Set(key.clone()),
                tube_id: Set(c.result.tube_id.clone()),
                laboratory_id: Set(lab_id.to_owned()),
                result: Set(c.outcome as i32),
                digest: Set(c.digest.clone()),
                uploaded_at: Set(now),
            });
            for m in members.get(&c.result.tube_id).into_iter().flatten() {
                let report_id = derived_id(&format!("report:{key}:{}", m.person_id));
                let result = if pooled && c.outcome == NucleicAcidResult::Positive {
                    NucleicAcidResult::PoolPositive
                } else {
                    c.outcome
                };
                let notice_id = (result == NucleicAcidResult::PoolPositive)
                    .then(|| derived_id(&format!("notice:{report_id}")));
                if let Some(notice_id) = &notice_id {
                    notices.push(retest_notice::Model {
                        notice_id: notice_id.clone(),
                        person_id: m.person_id.clone(),
                        pool_tube_id: c.result.tube_id.clone(),
                        pool_report_id: report_id.clone(),
                        state: RetestNoticeState::Open as i32,
                        notified_at: now,
                        due_by: now + self.retest_due,
                        booking_id: None,
                        retest_report_id: None,
                    });
                }
                if let Some(b) = &m.booking_id {
                    finished_bookings.push(b.clone());
                }
                reports.push(report::Model {
                    report_id,
                    person_id: m.person_id.clone(),
                    tube_id: c.result.tube_id.clone(),
                    result: result as i32,
                    sample_kind: sample.kind,
                    sampled_at: c.sampled_at,
                    received_at: c.received_at,
                    reported_at: c.reported_at,
                    sampling_institution_id: sample.institution_id.clone(),
                    laboratory_id: lab_id.to_owned(),
                    retest_notice_id: notice_id,
                    created_at: now,
                });
            }
        }
        // Single-tube results of persons waiting for a retest answer their notices.
        let single: Vec<String> = reports
            .iter()
            .filter(|r| r.sample_kind == SampleKind::SingleTube as i32)
            .filter(|r| r.result != NucleicAcidResult::Invalid as i32)
            .map(|r| r.person_id.clone())
            .collect();
        let txn = self.begin_write().await?;
        let mut answered: Vec<retest_notice::Model> = Vec::new();
        for chunk in single.chunks(1000) {
            let waiting = retest_notice::Entity::find()
                .filter(retest_notice::Column::PersonId.is_in(chunk.iter().cloned()))
                .filter(retest_notice::Column::State.is_in([
                    RetestNoticeState::Open as i32,
                    RetestNoticeState::Booked as i32,
                    RetestNoticeState::Overdue as i32,
                ]))
                .all(&txn)
                .await
                .map_err(db_error)?;
            answered.extend(waiting);
        }
        // When each waiting person's positive pool was sampled: a retest comes after it.
        let mut pooled_at: HashMap<String, DateTime<Utc>> = HashMap::new();
        let pool_reports: Vec<String> = answered.iter().map(|n| n.pool_report_id.clone()).collect();
        for chunk in pool_reports.chunks(1000) {
            for r in report::Entity::find()
                .filter(report::Column::ReportId.is_in(chunk.iter().cloned()))
                .all(&txn)
                .await
                .map_err(db_error)?
            {
                pooled_at.insert(r.report_id, r.sampled_at);
            }
        }
        let write = async {
            for chunk in result_rows.chunks(1000) {
                lab_result::Entity::insert_many(chunk.to_vec())
                    .exec_without_returning(&txn)
                    .await?;
            }
            for chunk in reports.chunks(1000) {
                report::Entity::insert_many(chunk.iter().cloned().map(report::ActiveModel::from))
                    .exec_without_returning(&txn)
                    .await?;
            }
            for chunk in notices.chunks(1000) {
                retest_notice::Entity::insert_many(
                    chunk.iter().cloned().map(retest_notice::ActiveModel::from),
                )
                .exec_without_returning(&txn)
                .await?;
            }
            for n in &answered {
                let Some(pooled) = pooled_at.get(&n.pool_report_id) else {
                    continue;
                };
                let Some(retest) = reports.iter().find(|r| {
                    r.person_id == n.person_id
                        && r.sample_kind == SampleKind::SingleTube as i32
                        && r.result != NucleicAcidResult::Invalid as i32
                        && r.sampled_at > *pooled
                }) else {
                    continue;
                };
                retest_notice::Entity::update_many()
                    .col_expr(
                        retest_notice::Column::State,
                        Expr::value(RetestNoticeState::Retested as i32),
                    )
                    .col_expr(
                        retest_notice::Column::RetestReportId,
                        Expr::value(retest.report_id.clone()),
                    )
                    .filter(retest_notice::Column::NoticeId.eq(n.notice_id.clone()))
                    .filter(retest_notice::Column::State.eq(n.state))
                    .exec(&txn)
                    .await?;
            }
            for chunk in finished_bookings.chunks(1000) {
                booking::Entity::update_many()
                    .col_expr(
                        booking::Column::State,
                        Expr::value(BookingState::Completed as i32),
                    )
                    .col_expr(booking::Column::UpdatedAt, Expr::value(now))
                    .filter(booking::Column::BookingId.is_in(chunk.iter().cloned()))
                    .filter(booking::Column::State.eq(BookingState::Sampled as i32))
                    .exec(&txn)
                    .await?;
            }
            outbox::enqueue_many(
                &txn,
                RESULT_TOPIC,
                reports
                    .iter()
                    .map(|r| (r.person_id.clone(), risk_event(r).encode_to_vec()))
                    .collect(),
            )
            .await?;
            outbox::enqueue_many(
                &txn,
                NOTICE_TOPIC,
                notices
                    .iter()
                    .map(|n| (n.person_id.clone(), notice_proto(n).encode_to_vec()))
                    .collect(),
            )
            .await?;
            Ok::<(), sea_orm::DbErr>(())
        };
        match write.await {
            Err(err) if is_unique_violation(&err) => {
                return Err(ServiceError::Unavailable(
                    "a concurrent upload carried the same results; retry".into(),
                ));
            }
            other => other.map_err(db_error)?,
        }
        txn.commit().await.map_err(db_error)?;
        self.relay.wake();
        response.accepted = accepted.len() as u32;
        Ok(Uploaded { response, reports })
    }

    /// The reports of one tube (a re-upload answers with them).
    pub async fn tube_reports(&self, tube_id: &str) -> Result<Vec<pb::TestReport>, ServiceError> {
        let rows = report::Entity::find()
            .filter(report::Column::TubeId.eq(tube_id))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        self.reports_proto(&rows).await
    }

    pub async fn reports_proto(
        &self,
        rows: &[report::Model],
    ) -> Result<Vec<pb::TestReport>, ServiceError> {
        let ids: HashSet<String> = rows
            .iter()
            .flat_map(|r| [r.sampling_institution_id.clone(), r.laboratory_id.clone()])
            .collect();
        let institutions = self.institutions(ids).await?;
        Ok(rows
            .iter()
            .map(|r| report_proto(r, &institutions))
            .collect())
    }

    pub async fn list_reports(
        &self,
        person_id: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        (offset, limit): (u64, u64),
    ) -> Result<pb::ListMyReportsResponse, ServiceError> {
        let mut query = report::Entity::find().filter(report::Column::PersonId.eq(person_id));
        if let Some(since) = since {
            query = query.filter(report::Column::SampledAt.gte(since));
        }
        if let Some(until) = until {
            query = query.filter(report::Column::SampledAt.lt(until));
        }
        let rows = query
            .order_by_desc(report::Column::SampledAt)
            .order_by_desc(report::Column::ReportId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let rows: Vec<report::Model> = rows.into_iter().take(limit as usize).collect();
        Ok(pb::ListMyReportsResponse {
            reports: self.reports_proto(&rows).await?,
            next_page_token: page_token(offset, limit, more),
        })
    }

    pub async fn report(&self, report_id: &str) -> Result<pb::TestReport, ServiceError> {
        let row = report::Entity::find_by_id(report_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such report".into()))?;
        Ok(self.reports_proto(&[row]).await?.remove(0))
    }

    pub async fn list_notices(
        &self,
        person_id: Option<&str>,
        state: RetestNoticeState,
        (offset, limit): (u64, u64),
    ) -> Result<pb::ListRetestNoticesResponse, ServiceError> {
        let mut query = retest_notice::Entity::find();
        if let Some(p) = person_id {
            query = query.filter(retest_notice::Column::PersonId.eq(p));
        }
        if state != RetestNoticeState::Unspecified {
            query = query.filter(retest_notice::Column::State.eq(state as i32));
        }
        let rows = query
            .order_by_desc(retest_notice::Column::NotifiedAt)
            .order_by_desc(retest_notice::Column::NoticeId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        Ok(pb::ListRetestNoticesResponse {
            notices: rows.iter().take(limit as usize).map(notice_proto).collect(),
            next_page_token: page_token(offset, limit, more),
        })
    }

    /// Whether the person waits for a retest after a pool sampled after `sampled_at`.
    async fn retest_pending(
        &self,
        person_id: &str,
        sampled_at: DateTime<Utc>,
    ) -> Result<bool, ServiceError> {
        let waiting = retest_notice::Entity::find()
            .filter(retest_notice::Column::PersonId.eq(person_id))
            .filter(retest_notice::Column::State.is_in([
                RetestNoticeState::Open as i32,
                RetestNoticeState::Booked as i32,
                RetestNoticeState::Overdue as i32,
            ]))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        if waiting.is_empty() {
            return Ok(false);
        }
        let later = report::Entity::find()
            .filter(report::Column::ReportId.is_in(waiting.into_iter().map(|n| n.pool_report_id)))
            .filter(report::Column::SampledAt.gte(sampled_at))
            .count(&self.db)
            .await
            .map_err(db_error)?;
        Ok(later > 0)
    }

    pub async fn issue_certificate(
        &self,
        person_id: &str,
        report_id: Option<&str>,
        include_svg: bool,
    ) -> Result<pb::NegativeCertificate, ServiceError> {
        let mut query = report::Entity::find().filter(report::Column::PersonId.eq(person_id));
        if let Some(id) = report_id {
            query = query.filter(report::Column::ReportId.eq(id));
        }
        let report = query
            .order_by_desc(report::Column::SampledAt)
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("the person has no such report".into()))?;
        if report.result != NucleicAcidResult::Negative as i32 {
            return Err(ServiceError::precondition(
                "NOT_NEGATIVE",
                "the report is not negative",
            ));
        }
        if self.retest_pending(person_id, report.sampled_at).await? {
            return Err(ServiceError::precondition(
                "RETEST_PENDING",
                "a later pooled-positive result waits for its retest",
            ));
        }
        let holder = self.masked_holder(person_id).await?;
        let names = self
            .institutions([
                report.sampling_institution_id.clone(),
                report.laboratory_id.clone(),
            ])
            .await?;
        let name = |id: &str| names.get(id).map(|i| i.name.clone()).unwrap_or_default();
        let now = Utc::now();
        let claims = pb::NegativeCertificateClaims {
            certificate_id: uuid::Uuid::now_v7().to_string(),
            holder: Some(holder),
            report_id: report.report_id.clone(),
            result: NucleicAcidResult::Negative as i32,
            sample_kind: report.sample_kind,
            sampled_at: Some(ts(report.sampled_at)),
            reported_at: Some(ts(report.reported_at)),
            sampling_institution_name: name(&report.sampling_institution_id),
            laboratory_name: name(&report.laboratory_id),
            issued_at: Some(ts(now)),
            issuing_province: self.province.clone(),
        };
        let payload = claims.encode_to_vec();
        let signed = SignedEnvelope {
            signature: self
                .signing_key
                .sign(&payload)
                .map_err(ServiceError::internal)?,
            payload,
            key_id: self.signing_key.key_id().to_owned(),
        };
        let qr_payload = healthcode_codes::encode_qr(CERTIFICATE_PREFIX, &signed.encode_to_vec());
        let qr_svg = if include_svg {
            healthcode_codes::qr_svg(&qr_payload, false).map_err(ServiceError::internal)?
        } else {
            String::new()
        };
        certificate::Entity::insert(certificate::ActiveModel {
            certificate_id: Set(claims.certificate_id.clone()),
            person_id: Set(person_id.to_owned()),
            report_id: Set(report.report_id.clone()),
            issued_at: Set(now),
            revoked: Set(false),
        })
        .exec_without_returning(&self.db)
        .await
        .map_err(db_error)?;
        Ok(pb::NegativeCertificate {
            claims: Some(claims),
            signed: Some(signed),
            qr_payload,
            qr_svg,
        })
    }

    async fn masked_holder(&self, person_id: &str) -> Result<MaskedIdentity, ServiceError> {
        let mut identity = self.upstreams.identity.clone();
        let masked = identity
            .get_masked_person(healthcode_server::outbound::with_deadline(
                GetMaskedPersonRequest {
                    person: Some(PersonRef {
                        person_id: person_id.to_owned(),
                    }),
                },
                self.upstreams.timeout,
            ))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => ServiceError::NotFound("no such person".into()),
                _ => ServiceError::Unavailable("identity is unavailable; retry later".into()),
            })?
            .into_inner();
        Ok(MaskedIdentity {
            masked_name: masked.masked_name,
            masked_document_number: masked.masked_document_number,
            document_type: masked.document_type,
        })
    }

    pub async fn verify_certificate(
        &self,
        text: &str,
    ) -> Result<pb::VerifyNegativeCertificateResponse, ServiceError> {
        let unparsable = || ServiceError::invalid("qr_payload", "not a negative certificate");
        let bytes =
            healthcode_codes::decode_qr(CERTIFICATE_PREFIX, text).map_err(|_| unparsable())?;
        let signed = SignedEnvelope::decode(&bytes[..]).map_err(|_| unparsable())?;
        let claims =
            pb::NegativeCertificateClaims::decode(&signed.payload[..]).map_err(|_| unparsable())?;
        let answer = |check: CertificateCheck| pb::VerifyNegativeCertificateResponse {
            check: check as i32,
            claims: Some(claims.clone()),
        };
        let Some(key) = self.keys.get(&signed.key_id) else {
            return Ok(answer(CertificateCheck::UnknownKey));
        };
        if key.verify(&signed.payload, &signed.signature).is_err() {
            return Ok(answer(CertificateCheck::BadSignature));
        }
        let row = certificate::Entity::find_by_id(claims.certificate_id.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?;
        let Some(row) = row else {
            return Ok(answer(CertificateCheck::Revoked));
        };
        if row.revoked {
            return Ok(answer(CertificateCheck::Revoked));
        }
        let sampled_at = from_ts(&claims.sampled_at).unwrap_or_default();
        let later = report::Entity::find()
            .filter(report::Column::PersonId.eq(row.person_id.clone()))
            .filter(report::Column::SampledAt.gt(sampled_at))
            .filter(report::Column::Result.ne(NucleicAcidResult::Negative as i32))
            .count(&self.db)
            .await
            .map_err(db_error)?;
        Ok(answer(if later > 0 {
            CertificateCheck::Superseded
        } else {
            CertificateCheck::Valid
        }))
    }
}
