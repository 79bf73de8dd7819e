//! The gateway's operations: show a code, verify a scan, batch checks, places, offline
//! codes. Colors come through [`ColorReader`], holders through [`HolderReader`].

use crate::colors::{ColorError, ColorReader};
use crate::display::{Lang, render};
use crate::holders::{HolderError, HolderReader};
use crate::store::entities::*;
use crate::upstream::Upstreams;
use healthcode_codes::{CodeSigner, qr_svg, step_at, verify_online};
use healthcode_crypto::{FieldCipher, TrustedKeys};
pub use healthcode_db::db_error;
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::{CodeColor, MaskedIdentity, PersonRef};
use healthcode_proto::gateway::v1 as pb;
use healthcode_proto::identity::v1::{ListDependentsRequest, MaskedPerson};
use healthcode_proto::risk::v1::PersonColor;
use prost::Message;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionTrait,
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

pub struct Gateway {
    pub db: DatabaseConnection,
    pub colors: ColorReader,
    pub holders: HolderReader,
    pub upstreams: Upstreams,
    pub signer: CodeSigner,
    /// The gateway's own public keys (active and retired): codes are checked against them.
    pub keys: TrustedKeys,
    pub cipher: Arc<FieldCipher>,
    tokens: TokenCache,
    /// Places read by scans, kept briefly: a venue's place is read on every scan.
    places: Mutex<HashMap<String, (std::time::Instant, pb::Place)>>,
}

/// How long a place read from the database serves scans before it is read again (a retired
/// place code stops scanning within this time).
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

pub struct CodeRequest<'a> {
    pub person_id: &'a str,
    pub guardian_id: Option<&'a str>,
    pub lang: Lang,
    pub care_mode: bool,
    pub include_svg: bool,
}

impl Gateway {
    pub fn new(
        db: DatabaseConnection,
        colors: ColorReader,
        holders: HolderReader,
        upstreams: Upstreams,
        signer: CodeSigner,
        keys: TrustedKeys,
        cipher: Arc<FieldCipher>,
    ) -> Self {
        Gateway {
            db,
            colors,
            holders,
            upstreams,
            signer,
            keys,
            cipher,
            tokens: TokenCache::default(),
            places: Mutex::new(HashMap::new()),
        }
    }

    async fn check_guardian(&self, guardian_id: &str, person_id: &str) -> Result<(), ServiceError> {
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
        if let Some((at, place)) = self
            .places
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(code)
            && at.elapsed() < PLACE_TTL
        {
            return Ok(place.clone());
        }
        let row = place::Entity::find_by_id(code.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound(format!("no place {code}")))?;
        let place = pb::Place::decode(&row.payload[..]).map_err(ServiceError::internal)?;
        let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
        if places.len() >= 100_000 {
            places.clear();
        }
        places.insert(code.to_owned(), (std::time::Instant::now(), place.clone()));
        Ok(place)
    }

    pub async fn reply<M: Message + Default>(&self, key: &str) -> Result<Option<M>, ServiceError> {
        let found = reply::Entity::find_by_id(key.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?;
        found
            .map(|r| M::decode(&r.payload[..]).map_err(ServiceError::internal))
            .transpose()
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
        let inserted = reply::Entity::insert(reply::ActiveModel {
            key: Set(key.to_owned()),
            payload: Set(answer.encode_to_vec()),
            created_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(reply::Column::Key)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        if inserted == 0 {
            txn.rollback().await.map_err(db_error)?;
            return self
                .reply(key)
                .await?
                .ok_or_else(|| ServiceError::internal("reply vanished"));
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
        let scan_id = scan_id(unit, &req.request_id);
        let record = pb::CheckRecord {
            scan_id: scan_id.clone(),
            kind: pb::CheckKind::VenueScan as i32,
            checked_at: Some(ts(now)),
            place_code: place.place_code.clone(),
            place_name: place.name.clone(),
            place_address: place.address.clone(),
            checking_unit: place.checking_unit.clone(),
            color: color.color,
            entry_allowed,
        };
        // One statement, no transaction: the scan id comes from the request id, so a retry
        // finds the first record instead of writing a second.
        let inserted = check_record::Entity::insert(check_record::ActiveModel {
            scan_id: Set(scan_id.clone()),
            person_id: Set(verified.person_id.clone()),
            checked_at: Set(now),
            payload: Set(record.encode_to_vec()),
        })
        .on_conflict(
            OnConflict::column(check_record::Column::ScanId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await
        .map_err(db_error)?;
        let first = if inserted == 0 {
            check_record::Entity::find_by_id(scan_id.clone())
                .one(&self.db)
                .await
                .map_err(db_error)?
                .and_then(|row| pb::CheckRecord::decode(&row.payload[..]).ok())
                .unwrap_or(record)
        } else {
            record
        };
        Ok(pb::VerifyScanResponse {
            result: pb::ScanResult::Valid as i32,
            color: first.color,
            holder: Some(masked(&holder)),
            entry_allowed: first.entry_allowed,
            scan_id,
            scanned_at: first.checked_at,
        })
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
