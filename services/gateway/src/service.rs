//! The gateway's operations: show a code, verify a scan, check in, batch checks, places,
//! offline codes. Colors come through [`ColorReader`], holders through [`HolderReader`].
//! A check record at a place and its place visit on the outbox commit together.

use crate::colors::{ColorError, ColorReader};
use crate::display::{Lang, render};
use crate::holders::{HolderError, HolderReader};
use crate::store::entities::*;
use crate::upstream::Upstreams;
use healthcode_codes::{CodeSigner, qr_svg, step_at, verify_online};
use healthcode_crypto::{FieldCipher, TrustedKeys};
pub use healthcode_db::db_error;
use healthcode_errors::ServiceError;
use healthcode_events::{Relay, outbox};
use healthcode_proto::common::v1::{CodeColor, MaskedIdentity, PersonRef};
use healthcode_proto::gateway::v1 as pb;
use healthcode_proto::identity::v1::{ListDependentsRequest, MaskedPerson};
use healthcode_proto::risk::v1::{AreaStayEvent, PersonColor, RiskEvent, StaySource, risk_event};
use prost::Message;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Check records are listed for 30 days and purged after 60 (itinerary retention).
pub const LIST_DAYS: i64 = 30;
pub const KEEP_DAYS: i64 = 60;

fn color_error(err: ColorError) -> ServiceError {
    match err {
        ColorError::Unavailable(m) => {
            ServiceError::Unavailable(format!("no color can be obtained now; retry shortly ({m})"))
        }
        ColorError::Rejected(m) => ServiceError::invalid("person", m),
    }
}

fn holder_error(err: HolderError) -> ServiceError {
    match err {
        HolderError::NotFound => ServiceError::NotFound("no such person".into()),
        HolderError::Unavailable(m) => {
            ServiceError::Unavailable(format!("identity unavailable; retry shortly ({m})"))
        }
    }
}

/// The place a row stores, with the row's own active flag.
fn place_of(row: &place::Model) -> Result<pb::Place, ServiceError> {
    let mut place = pb::Place::decode(&row.payload[..]).map_err(ServiceError::internal)?;
    place.active = row.active;
    Ok(place)
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn masked(p: &MaskedPerson) -> MaskedIdentity {
    MaskedIdentity {
        masked_name: p.masked_name.clone(),
        masked_document_number: p.masked_document_number.clone(),
        document_type: p.document_type,
    }
}

fn rank(c: i32) -> i32 {
    match CodeColor::try_from(c).unwrap_or(CodeColor::Unspecified) {
        CodeColor::Unspecified => 99,
        CodeColor::Green => 1,
        CodeColor::Yellow => 2,
        CodeColor::Red => 3,
    }
}

/// Whether a place admitting up to `admits` lets `color` in. Unknown is never admitted.
pub fn admitted(admits: i32, color: i32) -> bool {
    let limit = if admits == CodeColor::Unspecified as i32 {
        CodeColor::Green as i32
    } else {
        admits
    };
    color != CodeColor::Unspecified as i32 && rank(color) <= rank(limit)
}

/// A signed token per person, reused within its step while the color version holds: an app
/// refreshing its code every few seconds costs one SM2 signature per step, not per refresh.
#[derive(Default)]
struct TokenCache {
    entries: Mutex<HashMap<String, (u64, u64, String)>>,
}

impl TokenCache {
    const MAX: usize = 100_000;

    fn get(&self, person: &str, step: u64, version: u64) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(person)
            .filter(|(s, v, _)| *s == step && *v == version)
            .map(|(_, _, t)| t.clone())
    }

    fn put(&self, person: &str, step: u64, version: u64, token: String) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= Self::MAX {
            entries.retain(|_, (s, _, _)| *s >= step);
            if entries.len() >= Self::MAX {
                entries.clear();
            }
        }
        entries.insert(person.to_owned(), (step, version, token));
    }
}

/// Places read by scans and check-ins, kept briefly. Retiring a place bumps `generation`,
/// so that a read that began before the retirement cannot put the active place back.
#[derive(Default)]
struct PlaceCache {
    generation: u64,
    entries: HashMap<String, (std::time::Instant, pb::Place)>,
}

pub struct Gateway {
    pub db: DatabaseConnection,
    pub colors: ColorReader,
    pub holders: HolderReader,
    pub upstreams: Upstreams,
    pub signer: CodeSigner,
    /// The gateway's own public keys (active and retired): codes are checked against them.
    pub keys: TrustedKeys,
    pub cipher: Arc<FieldCipher>,
    /// Woken after a place visit commits, so it reaches the stream without waiting a poll.
    relay: Relay,
    tokens: TokenCache,
    /// A venue's place is read on every scan and check-in.
    places: Mutex<PlaceCache>,
}

/// How long a place read from the database serves scans before it is read again (a place
/// code retired through another replica stops scanning here within this time).
const PLACE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The scan record's id, derived from the checking unit and the request id, so that a
/// retried scan lands on the same record.
pub fn scan_id(unit: &str, request_id: &str) -> String {
    let digest = healthcode_crypto::sm3_digest(format!("scan\0{unit}\0{request_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The check-in's id, derived from the person and the request id, so that a retried
/// check-in lands on the same record.
pub fn check_in_id(person_id: &str, request_id: &str) -> String {
    let digest =
        healthcode_crypto::sm3_digest(format!("checkin\0{person_id}\0{request_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The itinerary point a check record at a place gives the risk service.
fn place_visit(
    scan_id: &str,
    person_id: &str,
    place: &pb::Place,
    at: chrono::DateTime<chrono::Utc>,
) -> RiskEvent {
    RiskEvent {
        event_id: scan_id.to_owned(),
        person: Some(PersonRef {
            person_id: person_id.to_owned(),
        }),
        observed_at: Some(ts(at)),
        event: Some(risk_event::Event::AreaStay(AreaStayEvent {
            division_code: place.division_code.clone(),
            location: place.location,
            place_code: place.place_code.clone(),
            arrived_at: Some(ts(at)),
            left_at: None,
            source: StaySource::VenueScan as i32,
        })),
    }
}

/// Stores `answer` as the reply of a retry-safe call inside `txn`. False when a concurrent
/// retry stored its reply first: the caller then answers with [`Gateway::replayed`].
async fn store_reply<M: Message>(
    txn: &DatabaseTransaction,
    key: &str,
    answer: &M,
) -> Result<bool, ServiceError> {
    healthcode_db::replies::store(txn, key, answer)
        .await
        .map_err(db_error)
}

pub struct CheckIn<'a> {
    pub request_id: &'a str,
    pub person_id: &'a str,
    pub guardian_id: Option<&'a str>,
    pub place_code: &'a str,
    pub lang: Lang,
    pub care_mode: bool,
}

/// Which places a caller may act on: an official any, a venue its checking unit's.
#[derive(Debug, Clone, Copy)]
pub enum PlaceScope<'a> {
    Any,
    Unit(&'a str),
}

impl PlaceScope<'_> {
    fn covers(&self, place_unit: &str) -> bool {
        match self {
            PlaceScope::Any => true,
            PlaceScope::Unit(unit) => *unit == place_unit,
        }
    }
}

pub struct CodeRequest<'a> {
    pub person_id: &'a str,
    pub guardian_id: Option<&'a str>,
    pub lang: Lang,
    pub care_mode: bool,
    pub include_svg: bool,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: DatabaseConnection,
        colors: ColorReader,
        holders: HolderReader,
        upstreams: Upstreams,
        signer: CodeSigner,
        keys: TrustedKeys,
        cipher: Arc<FieldCipher>,
        relay: Relay,
    ) -> Self {
        Gateway {
            db,
            colors,
            holders,
            upstreams,
            signer,
            keys,
            cipher,
            relay,
            tokens: TokenCache::default(),
            places: Mutex::new(PlaceCache::default()),
        }
    }

    /// PERMISSION_DENIED unless `guardian_id` manages `person_id` (identity decides).
    pub async fn check_guardian(
        &self,
        guardian_id: &str,
        person_id: &str,
    ) -> Result<(), ServiceError> {
        let mut identity = self.upstreams.identity.clone();
        let reply = identity
            .list_dependents(self.upstreams.request(ListDependentsRequest {
                guardian: Some(PersonRef {
                    person_id: guardian_id.to_owned(),
                }),
            }))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => ServiceError::PermissionDenied(
                    "the guardian does not manage this person".into(),
                ),
                _ => ServiceError::Unavailable("identity unavailable; retry shortly".into()),
            })?
            .into_inner();
        let manages = reply.dependents.iter().any(|d| {
            d.person
                .as_ref()
                .and_then(|p| p.person.as_ref())
                .is_some_and(|p| p.person_id == person_id)
        });
        if manages {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(
                "the guardian does not manage this person".into(),
            ))
        }
    }

    /// The holder (verified) and the current color.
    async fn holder_and_color(
        &self,
        person_id: &str,
    ) -> Result<(MaskedPerson, PersonColor), ServiceError> {
        let (holder, color) = tokio::join!(self.holders.get(person_id), self.colors.get(person_id));
        let holder = holder.map_err(holder_error)?;
        if !holder.verified {
            return Err(ServiceError::precondition(
                "NOT_VERIFIED",
                "real-name verification is not complete",
            ));
        }
        Ok((holder, color.map_err(color_error)?))
    }

    pub async fn show_code(
        &self,
        req: CodeRequest<'_>,
    ) -> Result<pb::ShowMyCodeResponse, ServiceError> {
        if let Some(guardian) = req.guardian_id {
            self.check_guardian(guardian, req.person_id).await?;
        }
        let (holder, color) = self.holder_and_color(req.person_id).await?;
        let now = chrono::Utc::now().timestamp();
        let step = step_at(now);
        let token = match self.tokens.get(req.person_id, step, color.version) {
            Some(t) => t,
            None => {
                let code = CodeColor::try_from(color.color).unwrap_or(CodeColor::Unspecified);
                let t = self
                    .signer
                    .issue(req.person_id, code, color.version, now)
                    .map_err(|e| ServiceError::internal(e.to_string()))?;
                self.tokens
                    .put(req.person_id, step, color.version, t.clone());
                t
            }
        };
        let code = CodeColor::try_from(color.color).unwrap_or(CodeColor::Unspecified);
        let display = render(
            code,
            &color.reasons,
            color.pending.is_some(),
            req.lang,
            req.care_mode,
        );
        let qr_svg = if req.include_svg {
            qr_svg(&token, req.care_mode).map_err(|e| ServiceError::internal(e.to_string()))?
        } else {
            String::new()
        };
        let next_step = (step + 1) * healthcode_codes::STEP_SECONDS;
        Ok(pb::ShowMyCodeResponse {
            color: color.color,
            color_version: color.version,
            color_valid_until: color.valid_until,
            display: Some(display),
            qr_payload: token,
            refresh_at: Some(prost_types::Timestamp {
                seconds: next_step as i64,
                nanos: 0,
            }),
            qr_svg,
            holder: Some(masked(&holder)),
            change_pending: color.pending.is_some(),
        })
    }

    pub async fn place(&self, code: &str) -> Result<pb::Place, ServiceError> {
        let generation = {
            let places = self.places.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, place)) = places.entries.get(code)
                && at.elapsed() < PLACE_TTL
            {
                return Ok(place.clone());
            }
            places.generation
        };
        let row = place::Entity::find_by_id(code.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no place {code}")))?;
        let place = place_of(&row)?;
        let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
        if places.generation == generation {
            if places.entries.len() >= 100_000 {
                places.entries.clear();
            }
            places
                .entries
                .insert(code.to_owned(), (std::time::Instant::now(), place.clone()));
        }
        Ok(place)
    }

    /// Drops a place from this replica's cache, and keeps reads already under way from
    /// putting back what they read before.
    fn forget_place(&self, code: &str) {
        let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
        places.generation = places.generation.wrapping_add(1);
        places.entries.remove(code);
    }

    pub async fn reply<M: Message + Default>(&self, key: &str) -> Result<Option<M>, ServiceError> {
        healthcode_db::replies::load(&self.db, key)
            .await
            .map_err(db_error)
    }

    /// Abandons `txn` and answers with the reply a concurrent retry stored first.
    async fn replayed<M: Message + Default>(
        &self,
        txn: DatabaseTransaction,
        key: &str,
    ) -> Result<M, ServiceError> {
        txn.rollback().await.map_err(db_error)?;
        self.reply(key)
            .await?
            .ok_or_else(|| ServiceError::internal("reply vanished"))
    }

    /// Records check records and the reply of the call in one transaction. A concurrent
    /// retry that lost the race gets the winner's reply.
    pub async fn record<M: Message + Default>(
        &self,
        key: &str,
        records: Vec<(String, pb::CheckRecord)>,
        answer: M,
    ) -> Result<M, ServiceError> {
        let now = chrono::Utc::now();
        let txn = self.db.begin().await.map_err(db_error)?;
        if !store_reply(&txn, key, &answer).await? {
            return self.replayed(txn, key).await;
        }
        for chunk in records.chunks(1000) {
            let rows = chunk
                .iter()
                .map(|(person_id, r)| check_record::ActiveModel {
                    scan_id: Set(r.scan_id.clone()),
                    person_id: Set(person_id.clone()),
                    checked_at: Set(now),
                    payload: Set(r.encode_to_vec()),
                });
            check_record::Entity::insert_many(rows)
                .exec_without_returning(&txn)
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(answer)
    }

    /// Records a check at a place and, when the record is new, the place visit for the
    /// risk service's itinerary, in one transaction. Returns the record as first stored: a
    /// retry (same id) gets the first record and enqueues nothing.
    async fn record_visit(
        &self,
        person_id: &str,
        place: &pb::Place,
        record: pb::CheckRecord,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<pb::CheckRecord, ServiceError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let inserted = check_record::Entity::insert(check_record::ActiveModel {
            scan_id: Set(record.scan_id.clone()),
            person_id: Set(person_id.to_owned()),
            checked_at: Set(at),
            payload: Set(record.encode_to_vec()),
        })
        .on_conflict(
            OnConflict::column(check_record::Column::ScanId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        if inserted == 0 {
            txn.rollback().await.map_err(db_error)?;
            return Ok(check_record::Entity::find_by_id(record.scan_id.clone())
                .one(&self.db)
                .await
                .map_err(db_error)?
                .and_then(|row| pb::CheckRecord::decode(&row.payload[..]).ok())
                .unwrap_or(record));
        }
        let visit = place_visit(&record.scan_id, person_id, place, at);
        outbox::enqueue(
            &txn,
            crate::PLACE_VISIT_TOPIC,
            person_id,
            visit.encode_to_vec(),
        )
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.relay.wake();
        Ok(record)
    }

    pub async fn verify_scan(
        &self,
        unit: &str,
        req: &pb::VerifyScanRequest,
    ) -> Result<pb::VerifyScanResponse, ServiceError> {
        let place = self.place(&req.place_code).await?;
        if place.checking_unit_code != unit {
            return Err(ServiceError::PermissionDenied(
                "the place belongs to another checking unit".into(),
            ));
        }
        if !place.active {
            return Err(ServiceError::precondition(
                "PLACE_INACTIVE",
                "the place code has been retired",
            ));
        }
        let now = chrono::Utc::now();
        let verified =
            match verify_online(&req.qr_payload, &self.keys, &self.cipher, now.timestamp()) {
                Ok(v) => v,
                Err(result) => {
                    return Ok(pb::VerifyScanResponse {
                        result: result as i32,
                        ..Default::default()
                    });
                }
            };
        let (holder, color) = self.holder_and_color(&verified.person_id).await?;
        let entry_allowed = admitted(place.admits_up_to, color.color);
        let record = pb::CheckRecord {
            scan_id: scan_id(unit, &req.request_id),
            kind: pb::CheckKind::VenueScan as i32,
            checked_at: Some(ts(now)),
            place_code: place.place_code.clone(),
            place_name: place.name.clone(),
            place_address: place.address.clone(),
            checking_unit: place.checking_unit.clone(),
            color: color.color,
            entry_allowed,
        };
        // The scan id comes from the request id, so a retry finds the first record instead
        // of writing a second.
        let first = self
            .record_visit(&verified.person_id, &place, record, now)
            .await?;
        Ok(pb::VerifyScanResponse {
            result: pb::ScanResult::Valid as i32,
            color: first.color,
            holder: Some(masked(&holder)),
            entry_allowed: first.entry_allowed,
            scan_id: first.scan_id,
            scanned_at: first.checked_at,
        })
    }

    /// The person scanned a place code: the place must be active; the check-in is recorded
    /// like a venue scan and answered with the person's code.
    pub async fn check_in(&self, req: CheckIn<'_>) -> Result<pb::CheckInResponse, ServiceError> {
        let place = self.place(req.place_code).await?;
        if !place.active {
            return Err(ServiceError::precondition(
                "PLACE_INACTIVE",
                "the place code has been retired",
            ));
        }
        let code = self
            .show_code(CodeRequest {
                person_id: req.person_id,
                guardian_id: req.guardian_id,
                lang: req.lang,
                care_mode: req.care_mode,
                include_svg: false,
            })
            .await?;
        let now = chrono::Utc::now();
        let record = pb::CheckRecord {
            scan_id: check_in_id(req.person_id, req.request_id),
            kind: pb::CheckKind::PlaceCheckIn as i32,
            checked_at: Some(ts(now)),
            place_code: place.place_code.clone(),
            place_name: place.name.clone(),
            place_address: place.address.clone(),
            checking_unit: place.checking_unit.clone(),
            color: code.color,
            entry_allowed: admitted(place.admits_up_to, code.color),
        };
        let first = self
            .record_visit(req.person_id, &place, record, now)
            .await?;
        Ok(pb::CheckInResponse {
            place: Some(place),
            code: Some(code),
            entry_allowed: first.entry_allowed,
            scan_id: first.scan_id,
            checked_in_at: first.checked_at,
        })
    }

    /// Stores a new place and the reply of its registration together.
    pub async fn register_place(
        &self,
        key: &str,
        place: pb::Place,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<pb::Place, ServiceError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        if !store_reply(&txn, key, &place).await? {
            return self.replayed(txn, key).await;
        }
        place::Entity::insert(place::ActiveModel {
            place_code: Set(place.place_code.clone()),
            checking_unit_code: Set(place.checking_unit_code.clone()),
            division_code: Set(place.division_code.clone()),
            active: Set(true),
            payload: Set(place.encode_to_vec()),
            registered_at: Set(at),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        Ok(place)
    }

    /// Places of a checking unit and in a division (each when given), by place code, which
    /// is unique, so pages never overlap or skip. One more than `limit` is read to tell
    /// whether a next page exists.
    pub async fn list_places(
        &self,
        unit: Option<&str>,
        division: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<pb::Place>, bool), ServiceError> {
        let mut query = place::Entity::find();
        if let Some(unit) = unit {
            query = query.filter(place::Column::CheckingUnitCode.eq(unit));
        }
        if let Some(division) = division {
            query = query.filter(place::Column::DivisionCode.eq(division));
        }
        let rows = query
            .order_by_asc(place::Column::PlaceCode)
            .offset(offset)
            .limit(limit.saturating_add(1))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let places = rows
            .iter()
            .take(limit as usize)
            .map(place_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((places, more))
    }

    /// Retires a place code, with who and why, and the reply, in one transaction; this
    /// replica stops serving the place as active at once.
    pub async fn deactivate_place(
        &self,
        key: &str,
        code: &str,
        scope: PlaceScope<'_>,
        retired_by: &str,
        reason: &str,
    ) -> Result<pb::Place, ServiceError> {
        if let Some(done) = self.reply(key).await? {
            return Ok(done);
        }
        let row = place::Entity::find_by_id(code.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no place {code}")))?;
        if !scope.covers(&row.checking_unit_code) {
            return Err(ServiceError::PermissionDenied(
                "the place belongs to another checking unit".into(),
            ));
        }
        if !row.active {
            return self.already_retired(key).await;
        }
        let mut place = place_of(&row)?;
        place.active = false;
        let now = chrono::Utc::now();
        let txn = self.db.begin().await.map_err(db_error)?;
        if !store_reply(&txn, key, &place).await? {
            return self.replayed(txn, key).await;
        }
        let retired = place::Entity::update_many()
            .col_expr(place::Column::Active, Expr::value(false))
            .col_expr(place::Column::Payload, Expr::value(place.encode_to_vec()))
            .filter(place::Column::PlaceCode.eq(code))
            .filter(place::Column::Active.eq(true))
            .exec(&txn)
            .await
            .map_err(db_error)?
            .rows_affected;
        if retired == 0 {
            txn.rollback().await.map_err(db_error)?;
            return self.already_retired(key).await;
        }
        place_retirement::Entity::insert(place_retirement::ActiveModel {
            place_code: Set(code.to_owned()),
            retired_by: Set(retired_by.to_owned()),
            reason: Set(reason.to_owned()),
            retired_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.forget_place(code);
        Ok(place)
    }

    /// FAILED_PRECONDITION for a place already retired, unless this very request retired it
    /// (its first attempt committed meanwhile): then that answer.
    async fn already_retired(&self, key: &str) -> Result<pb::Place, ServiceError> {
        self.reply(key).await?.ok_or_else(|| {
            ServiceError::precondition("PLACE_INACTIVE", "the place code is already retired")
        })
    }

    /// An issued offline credential, as the online verifier checks it for revocation.
    pub async fn offline_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<credential::Model>, ServiceError> {
        credential::Entity::find_by_id(credential_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// Stores an issued offline credential and the reply of its issue together.
    pub async fn store_offline_code(
        &self,
        key: &str,
        person_id: &str,
        code: pb::OfflineCode,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<pb::OfflineCode, ServiceError> {
        let claims = code.claims.clone().unwrap_or_default();
        let txn = self.db.begin().await.map_err(db_error)?;
        if !store_reply(&txn, key, &code).await? {
            return self.replayed(txn, key).await;
        }
        credential::Entity::insert(credential::ActiveModel {
            credential_id: Set(claims.credential_id),
            person_id: Set(person_id.to_owned()),
            color_version: Set(claims.color_version as i64),
            expires_at: Set(expires_at),
            revoked: Set(false),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        Ok(code)
    }

    /// Revokes the person's offline credentials (one, or all when `credential_id` is
    /// `None`) and stores the reply, in one transaction. NOT_FOUND for a credential the
    /// person does not hold.
    pub async fn revoke_offline_codes(
        &self,
        key: &str,
        person_id: &str,
        credential_id: Option<&str>,
    ) -> Result<pb::RevokeOfflineCodeResponse, ServiceError> {
        if let Some(done) = self.reply(key).await? {
            return Ok(done);
        }
        let txn = self.db.begin().await.map_err(db_error)?;
        let mut revoke = credential::Entity::update_many()
            .col_expr(credential::Column::Revoked, Expr::value(true))
            .filter(credential::Column::PersonId.eq(person_id))
            .filter(credential::Column::Revoked.eq(false));
        if let Some(id) = credential_id {
            revoke = revoke.filter(credential::Column::CredentialId.eq(id));
        }
        let revoked = revoke.exec(&txn).await.map_err(db_error)?.rows_affected;
        if let Some(id) = credential_id
            && revoked == 0
        {
            let held = credential::Entity::find_by_id(id.to_owned())
                .filter(credential::Column::PersonId.eq(person_id))
                .one(&txn)
                .await
                .map_err(db_error)?
                .is_some();
            if !held {
                txn.rollback().await.map_err(db_error)?;
                return Err(ServiceError::NotFound(
                    "the person holds no such offline credential".into(),
                ));
            }
        }
        let answer = pb::RevokeOfflineCodeResponse {
            revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        };
        if !store_reply(&txn, key, &answer).await? {
            return self.replayed(txn, key).await;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(answer)
    }

    pub async fn batch_check(
        &self,
        unit: &str,
        req: &pb::BatchCheckRequest,
        person_ids: Vec<(usize, String)>,
        mut errors: Vec<healthcode_proto::common::v1::ItemError>,
    ) -> Result<pb::BatchCheckResponse, ServiceError> {
        let key = format!("batch:{unit}:{}", req.request_id);
        if let Some(done) = self.reply(&key).await? {
            return Ok(done);
        }
        let ids: Vec<String> = person_ids.iter().map(|(_, id)| id.clone()).collect();
        let (colors, holders) =
            tokio::join!(self.colors.get_many(&ids), self.holders.get_many(&ids));
        let now = chrono::Utc::now();
        let mut results = Vec::with_capacity(ids.len());
        let mut records = Vec::with_capacity(ids.len());
        for (((index, id), color), holder) in person_ids.into_iter().zip(colors).zip(holders) {
            let item_id = req.items[index].item_id.clone();
            let failure = match (&holder, &color) {
                (Err(HolderError::NotFound), _) => Some((
                    tonic::Code::NotFound,
                    "UNKNOWN_PERSON",
                    "no such person".to_owned(),
                )),
                (Err(HolderError::Unavailable(m)), _) => {
                    Some((tonic::Code::Unavailable, "IDENTITY_UNAVAILABLE", m.clone()))
                }
                (Ok(_), Err(ColorError::Unavailable(m))) => {
                    Some((tonic::Code::Unavailable, "COLOR_UNAVAILABLE", m.clone()))
                }
                (Ok(_), Err(ColorError::Rejected(m))) => {
                    Some((tonic::Code::InvalidArgument, "INVALID_PERSON", m.clone()))
                }
                (Ok(h), Ok(_)) if !h.verified => Some((
                    tonic::Code::FailedPrecondition,
                    "NOT_VERIFIED",
                    "real-name verification is not complete".to_owned(),
                )),
                _ => None,
            };
            if let Some((code, reason, message)) = failure {
                errors.push(healthcode_proto::common::v1::ItemError {
                    index: index as u32,
                    item_id,
                    code: code as i32,
                    reason: reason.into(),
                    message,
                });
                continue;
            }
            let Ok(color) = color else { continue };
            records.push((
                id,
                pb::CheckRecord {
                    scan_id: uuid::Uuid::now_v7().to_string(),
                    kind: pb::CheckKind::BatchCheck as i32,
                    checked_at: Some(ts(now)),
                    checking_unit: unit.to_owned(),
                    color: color.color,
                    entry_allowed: admitted(CodeColor::Green as i32, color.color),
                    ..Default::default()
                },
            ));
            results.push(pb::BatchCheckResult {
                index: index as u32,
                item_id,
                color: color.color,
                valid_until: color.valid_until,
                change_pending: color.pending.is_some(),
            });
        }
        errors.sort_by_key(|e| e.index);
        let answer = pb::BatchCheckResponse {
            results,
            errors,
            checked_at: Some(ts(now)),
        };
        self.record(&key, records, answer).await
    }

    pub async fn check_records(
        &self,
        person_id: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<pb::CheckRecord>, ServiceError> {
        let since = chrono::Utc::now() - chrono::Duration::days(LIST_DAYS);
        let rows = check_record::Entity::find()
            .filter(check_record::Column::PersonId.eq(person_id))
            .filter(check_record::Column::CheckedAt.gte(since))
            .order_by_desc(check_record::Column::CheckedAt)
            .order_by_desc(check_record::Column::ScanId)
            .offset(offset)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| pb::CheckRecord::decode(&r.payload[..]).map_err(ServiceError::internal))
            .collect()
    }

    /// Deletes check records older than 60 days.
    pub async fn purge_records(&self) -> Result<u64, ServiceError> {
        let cutoff = chrono::Utc::now() - chrono::Duration::days(KEEP_DAYS);
        Ok(check_record::Entity::delete_many()
            .filter(check_record::Column::CheckedAt.lt(cutoff))
            .exec(&self.db)
            .await
            .map_err(db_error)?
            .rows_affected)
    }
}
