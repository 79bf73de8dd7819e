//! Vaccines and their batches, sites and their workers' keys, doses, late entries and
//! booster schedules. A dose is taken from what the worker signed (`DoseClaims`), checked
//! against the course, and recorded with its outbox event in one transaction; a person's
//! dose numbers are unique by an index, so two racing recordings cannot both commit.

use crate::store::entities::*;
use chrono::{DateTime, Utc};
use healthcode_cache::{GeoMember, SharedCache};
use healthcode_crypto::{FieldCipher, SigningKey, TrustedKeys, VerifyingKey};
use healthcode_db::{db_error, is_unique_violation};
use healthcode_errors::ServiceError;
use healthcode_events::Relay;
use healthcode_proto::common::v1::{GeoPoint, PersonRef, PublicKey, SignedEnvelope};
use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::risk::v1::{RiskEvent, VaccinationDoseEvent, risk_event};
use healthcode_proto::vaccination::v1 as pb;
use healthcode_server::outbound::{Outbound, OutboundError, lazy_channel};
use pb::{DoseState, ExceptionProcedure, LateEntryState, VaccineType};
use prost::Message;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use healthcode_proto::geo::distance_m;
pub use healthcode_proto::time::{from_ts, minute, ts};

/// Every recorded dose is published here as a `healthcode.risk.v1.RiskEvent` whose
/// `event_id` is the dose id.
pub const DOSE_TOPIC: &str = "vaccination.dose";
/// The geo set of active sites (Redis GEO; rebuilt from the database at start).
pub const SITES_GEO_KEY: &str = "vaccination:sites";

pub type Identity = IdentityServiceClient<InterceptedService<Channel, Outbound>>;

/// The identity service's client, with this service's token and a deadline on each call.
pub fn identity_client(
    url: &str,
    token: &str,
    timeout: Duration,
) -> Result<Identity, OutboundError> {
    Ok(IdentityServiceClient::with_interceptor(
        lazy_channel(url, timeout)?,
        Outbound::new(token)?,
    ))
}

pub struct Settings {
    pub province: String,
    pub dcc_issuer: String,
    pub dcc_validity: Duration,
    pub late_entry_after: Duration,
    pub reminder_radius_m: u32,
}

/// The keys this service signs and seals with.
pub struct Keys {
    /// Domestic certificates and PDF digests (SM2).
    pub signing: SigningKey,
    /// Every SM2 key whose signatures are accepted (the signing key and retired ones).
    pub trusted: TrustedKeys,
    /// International certificates (ECDSA P-256).
    pub dcc: crate::dcc::Signer,
    /// Personal data at rest.
    pub data: FieldCipher,
}

pub struct Vaccination {
    pub(crate) db: DatabaseConnection,
    pub(crate) relay: Relay,
    pub(crate) cache: SharedCache,
    pub(crate) keys: Keys,
    pub(crate) identity: Identity,
    pub(crate) timeout: Duration,
    pub(crate) settings: Settings,
}

fn chrono_duration(d: &prost_types::Duration) -> chrono::Duration {
    chrono::Duration::seconds(d.seconds.clamp(0, 100 * 365 * 24 * 3600))
}

fn precondition(reason: &str, message: &str) -> ServiceError {
    ServiceError::precondition(reason, message)
}

pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, ServiceError> {
    M::decode(bytes).map_err(ServiceError::internal)
}

pub(crate) fn page_token(offset: u64, limit: u64, more: bool) -> String {
    if more {
        (offset + limit).to_string()
    } else {
        String::new()
    }
}

/// A new dose as the caller gave it: the worker's envelope and what it claims.
pub struct NewDose<'a> {
    pub request_id: &'a str,
    /// The caller's site (from its token).
    pub site_id: &'a str,
    pub envelope: SignedEnvelope,
    pub claims: pb::DoseClaims,
}

/// What a late-entry request names.
pub struct NewLateEntry<'a> {
    pub request_id: &'a str,
    pub requested_by: &'a str,
    pub entry: pb::LateEntry,
}

impl Vaccination {
    pub fn new(
        db: DatabaseConnection,
        relay: Relay,
        cache: SharedCache,
        keys: Keys,
        identity: Identity,
        timeout: Duration,
        settings: Settings,
    ) -> Self {
        Vaccination {
            db,
            relay,
            cache,
            keys,
            identity,
            timeout,
            settings,
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction, ServiceError> {
        healthcode_db::replies::begin_write(&self.db)
            .await
            .map_err(db_error)
    }

    pub(crate) async fn replay<M: Message + Default>(
        &self,
        key: &str,
    ) -> Result<Option<M>, ServiceError> {
        healthcode_db::replies::load(&self.db, key)
            .await
            .map_err(db_error)
    }

    /// Stores the reply and commits; a concurrent retry that stored first wins.
    pub(crate) async fn finish<M: Message + Default>(
        &self,
        txn: DatabaseTransaction,
        key: &str,
        answer: M,
    ) -> Result<M, ServiceError> {
        let answer = healthcode_db::replies::commit_with(&self.db, txn, key, answer)
            .await
            .map_err(db_error)?;
        self.relay.wake();
        Ok(answer)
    }

    /// The outcome of an insert that may collide: on a unique violation the transaction is
    /// rolled back and a retry's stored reply is the answer, else `conflict`.
    async fn inserted<M: Message + Default, T>(
        &self,
        txn: DatabaseTransaction,
        result: Result<T, sea_orm::DbErr>,
        key: &str,
        conflict: impl FnOnce() -> ServiceError,
    ) -> Result<Result<DatabaseTransaction, M>, ServiceError> {
        match result {
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await.map_err(db_error)?;
                match self.replay(key).await? {
                    Some(done) => Ok(Err(done)),
                    None => Err(conflict()),
                }
            }
            Err(err) => Err(db_error(err)),
            Ok(_) => Ok(Ok(txn)),
        }
    }

    // -----------------------------------------------------------------------------------
    // Vaccines

    pub async fn register_vaccine(
        &self,
        request_id: &str,
        mut vaccine: pb::Vaccine,
    ) -> Result<pb::Vaccine, ServiceError> {
        let key = format!("vaccine:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        vaccine.vaccine_id = uuid::Uuid::now_v7().to_string();
        vaccine.recognised_countries.sort();
        vaccine.recognised_countries.dedup();
        if vaccine.recognised_countries.is_empty() {
            vaccine.recognised_countries = crate::recognition::default_countries(vaccine.r#type);
        }
        let batches = std::mem::take(&mut vaccine.batches);
        let now = Utc::now();
        let txn = self.begin_write().await?;
        let result = vaccine::ActiveModel {
            vaccine_id: Set(vaccine.vaccine_id.clone()),
            approval_number: Set(vaccine.approval_number.clone()),
            vaccine_type: Set(vaccine.r#type),
            active: Set(vaccine.active),
            payload: Set(vaccine.encode_to_vec()),
            created_at: Set(now),
        }
        .insert(&txn)
        .await;
        let txn = match self
            .inserted(txn, result, &key, || {
                ServiceError::conflict(
                    "APPROVAL_NUMBER_REGISTERED",
                    "a vaccine with this approval number is registered",
                )
            })
            .await?
        {
            Ok(txn) => txn,
            Err(done) => return Ok(done),
        };
        put_batches(&txn, &vaccine.vaccine_id, &batches).await?;
        vaccine.batches = batches;
        self.finish(txn, &key, vaccine).await
    }

    pub async fn add_batches(
        &self,
        request_id: &str,
        vaccine_id: &str,
        batches: Vec<pb::VaccineBatch>,
    ) -> Result<pb::Vaccine, ServiceError> {
        let key = format!("batches:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let txn = self.begin_write().await?;
        self.vaccine_row(&txn, vaccine_id).await?;
        put_batches(&txn, vaccine_id, &batches).await?;
        let answer = self.vaccine_in(&txn, vaccine_id).await?;
        self.finish(txn, &key, answer).await
    }

    async fn vaccine_row<C: ConnectionTrait>(
        &self,
        db: &C,
        id: &str,
    ) -> Result<vaccine::Model, ServiceError> {
        vaccine::Entity::find_by_id(id.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such vaccine".into()))
    }

    async fn vaccine_in<C: ConnectionTrait>(
        &self,
        db: &C,
        id: &str,
    ) -> Result<pb::Vaccine, ServiceError> {
        let row = self.vaccine_row(db, id).await?;
        let mut v: pb::Vaccine = decode(&row.payload)?;
        v.batches = batch::Entity::find()
            .filter(batch::Column::VaccineId.eq(id))
            .order_by_asc(batch::Column::BatchNumber)
            .all(db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|b| pb::VaccineBatch {
                batch_number: b.batch_number,
                expires_at: Some(ts(b.expires_at)),
            })
            .collect();
        Ok(v)
    }

    pub async fn vaccine(&self, id: &str) -> Result<pb::Vaccine, ServiceError> {
        self.vaccine_in(&self.db, id).await
    }

    pub async fn list_vaccines(
        &self,
        vaccine_type: VaccineType,
        offset: u64,
        limit: u64,
    ) -> Result<pb::ListVaccinesResponse, ServiceError> {
        let mut q = vaccine::Entity::find().order_by_asc(vaccine::Column::VaccineId);
        if vaccine_type != VaccineType::Unspecified {
            q = q.filter(vaccine::Column::VaccineType.eq(vaccine_type as i32));
        }
        let rows = q
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let vaccines = rows
            .iter()
            .take(limit as usize)
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        Ok(pb::ListVaccinesResponse {
            vaccines,
            next_page_token: page_token(offset, limit, more),
        })
    }

    // -----------------------------------------------------------------------------------
    // Sites and worker keys

    pub async fn register_site(
        &self,
        request_id: &str,
        mut site: pb::VaccinationSite,
    ) -> Result<pb::VaccinationSite, ServiceError> {
        let key = format!("site:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        site.site_id = uuid::Uuid::now_v7().to_string();
        site.worker_keys.clear();
        let at = site.location.unwrap_or_default();
        let txn = self.begin_write().await?;
        site::ActiveModel {
            site_id: Set(site.site_id.clone()),
            active: Set(site.active),
            lat: Set(at.latitude),
            lng: Set(at.longitude),
            division_code: Set(site.division_code.clone()),
            payload: Set(site.encode_to_vec()),
            created_at: Set(Utc::now()),
        }
        .insert(&txn)
        .await
        .map_err(db_error)?;
        let site = self.finish(txn, &key, site).await?;
        if site.active {
            self.index_sites(std::slice::from_ref(&site)).await;
        }
        Ok(site)
    }

    /// Puts sites into the geo set. The set is derived: when the cache is down, reminders
    /// fall back to the database, and the next start rebuilds it.
    async fn index_sites(&self, sites: &[pb::VaccinationSite]) {
        let members: Vec<GeoMember> = sites
            .iter()
            .map(|s| GeoMember {
                member: s.site_id.clone(),
                at: s.location.unwrap_or_default(),
            })
            .collect();
        if let Err(err) = self.cache.geo_add(SITES_GEO_KEY, &members).await {
            tracing::warn!(error = %err, "site geo index not updated");
        }
    }

    /// Rebuilds the geo set of active sites from the database; returns how many.
    pub async fn rebuild_site_index(&self) -> Result<usize, ServiceError> {
        let rows = site::Entity::find()
            .filter(site::Column::Active.eq(true))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let sites: Vec<pb::VaccinationSite> = rows
            .iter()
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        for chunk in sites.chunks(1_000) {
            self.index_sites(chunk).await;
        }
        Ok(sites.len())
    }

    pub(crate) async fn site_row<C: ConnectionTrait>(
        &self,
        db: &C,
        id: &str,
    ) -> Result<site::Model, ServiceError> {
        site::Entity::find_by_id(id.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such site".into()))
    }

    pub async fn site(&self, id: &str) -> Result<pb::VaccinationSite, ServiceError> {
        let row = self.site_row(&self.db, id).await?;
        let mut site: pb::VaccinationSite = decode(&row.payload)?;
        site.worker_keys = worker_key::Entity::find()
            .filter(worker_key::Column::SiteId.eq(id))
            .order_by_asc(worker_key::Column::CreatedAt)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .iter()
            .map(worker_key_proto)
            .collect();
        Ok(site)
    }

    pub async fn list_sites(
        &self,
        near: Option<(GeoPoint, u32)>,
        division_code: &str,
        offset: u64,
        limit: u64,
    ) -> Result<pb::ListSitesResponse, ServiceError> {
        let mut q = site::Entity::find().filter(site::Column::Active.eq(true));
        if !division_code.is_empty() {
            q = q.filter(site::Column::DivisionCode.eq(division_code));
        }
        if let Some((at, radius)) = near {
            let (dlat, dlng) = box_degrees(&at, f64::from(radius));
            q = q
                .filter(site::Column::Lat.between(at.latitude - dlat, at.latitude + dlat))
                .filter(site::Column::Lng.between(at.longitude - dlng, at.longitude + dlng));
        }
        let rows = q
            .order_by_asc(site::Column::SiteId)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut found: Vec<pb::SiteMatch> = Vec::new();
        for row in rows {
            let site: pb::VaccinationSite = decode(&row.payload)?;
            let distance = match near {
                Some((at, radius)) => {
                    let d = distance_m(&at, &site.location.unwrap_or_default());
                    if d > f64::from(radius) {
                        continue;
                    }
                    d.round() as u32
                }
                None => 0,
            };
            found.push(pb::SiteMatch {
                site: Some(site),
                distance_m: distance,
            });
        }
        found.sort_by_key(|m| m.distance_m);
        let more = found.len() as u64 > offset + limit;
        let sites = found
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .collect();
        Ok(pb::ListSitesResponse {
            sites,
            next_page_token: page_token(offset, limit, more),
        })
    }

    pub async fn add_worker_key(
        &self,
        request_id: &str,
        site_id: &str,
        worker_id: &str,
        key: &PublicKey,
        verifying: &VerifyingKey,
    ) -> Result<pb::WorkerKey, ServiceError> {
        let reply_key = format!("worker_key:{request_id}");
        if let Some(done) = self.replay(&reply_key).await? {
            return Ok(done);
        }
        let txn = self.begin_write().await?;
        self.site_row(&txn, site_id).await?;
        let row = worker_key::Model {
            key_id: key.key_id.clone(),
            site_id: site_id.to_owned(),
            worker_id: worker_id.to_owned(),
            public_key: verifying.sec1_bytes(),
            not_before: from_ts(&key.not_before),
            not_after: from_ts(&key.not_after),
            revoked_at: None,
            revoke_reason: String::new(),
            created_at: Utc::now(),
        };
        let result = worker_key::ActiveModel::from(row.clone())
            .insert(&txn)
            .await;
        let txn = match self
            .inserted(txn, result, &reply_key, || {
                ServiceError::conflict("KEY_ID_REGISTERED", "a worker key with this id exists")
            })
            .await?
        {
            Ok(txn) => txn,
            Err(done) => return Ok(done),
        };
        self.finish(txn, &reply_key, worker_key_proto(&row)).await
    }

    /// Revokes a key of `site_id`; `site_id` None lets a health administrator name any.
    pub async fn revoke_worker_key(
        &self,
        request_id: &str,
        site_id: &str,
        key_id: &str,
        reason: &str,
    ) -> Result<pb::WorkerKey, ServiceError> {
        let reply_key = format!("revoke_key:{request_id}");
        if let Some(done) = self.replay(&reply_key).await? {
            return Ok(done);
        }
        let txn = self.begin_write().await?;
        let row = worker_key::Entity::find_by_id(key_id.to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .filter(|k| k.site_id == site_id)
            .ok_or_else(|| ServiceError::NotFound("no such worker key at this site".into()))?;
        let row = if row.revoked_at.is_some() {
            row
        } else {
            let mut active: worker_key::ActiveModel = row.into();
            active.revoked_at = Set(Some(Utc::now()));
            active.revoke_reason = Set(reason.to_owned());
            active.update(&txn).await.map_err(db_error)?
        };
        self.finish(txn, &reply_key, worker_key_proto(&row)).await
    }

    /// The worker key that signed `envelope`, if it belongs to `worker_id` at `site_id`,
    /// was valid at `at` and is not revoked by `now`; None otherwise.
    pub(crate) async fn worker_key_for<C: ConnectionTrait>(
        &self,
        db: &C,
        envelope: &SignedEnvelope,
        site_id: &str,
        worker_id: &str,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<worker_key::Model>, ServiceError> {
        let Some(key) = worker_key::Entity::find_by_id(envelope.key_id.clone())
            .one(db)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let usable = key.site_id == site_id
            && key.worker_id == worker_id
            && key.not_before.is_none_or(|t| t <= at)
            && key.not_after.is_none_or(|t| at < t)
            && key.revoked_at.is_none_or(|t| now < t);
        if !usable {
            return Ok(None);
        }
        let verifying = VerifyingKey::from_sec1(key.key_id.clone(), &key.public_key)
            .map_err(ServiceError::internal)?;
        Ok(verifying
            .verify(&envelope.payload, &envelope.signature)
            .is_ok()
            .then_some(key))
    }

    // -----------------------------------------------------------------------------------
    // Doses

    pub async fn record_dose(&self, new: NewDose<'_>) -> Result<pb::Dose, ServiceError> {
        let key = format!("dose:{}", new.request_id);
        if let Some(done) = self.replay::<pb::Dose>(&key).await? {
            return Ok(done);
        }
        if new.claims.site_id != new.site_id {
            return Err(ServiceError::PermissionDenied(
                "the dose names another site than the caller's".into(),
            ));
        }
        let now = Utc::now();
        let late = now - from_ts(&new.claims.administered_at).unwrap_or(now)
            > chrono::Duration::from_std(self.settings.late_entry_after)
                .unwrap_or(chrono::Duration::hours(24));
        let txn = self.begin_write().await?;
        let dose = self
            .checked_dose(&txn, &new.envelope, &new.claims, now)
            .await?;
        let mut dose = dose;
        dose.dose_id = uuid::Uuid::now_v7().to_string();
        dose.recorded_at = Some(ts(now));
        if late {
            dose.state = DoseState::PendingReview as i32;
            dose.late_entry_id = uuid::Uuid::now_v7().to_string();
        } else {
            dose.state = DoseState::Recorded as i32;
        }
        let result = dose_row(&dose, &new.envelope.key_id)?.insert(&txn).await;
        let txn = match self
            .inserted(txn, result, &key, || {
                ServiceError::conflict(
                    "DOSE_RECORDED",
                    "the person already has a dose with this number",
                )
            })
            .await?
        {
            Ok(txn) => txn,
            Err(done) => return Ok(done),
        };
        if late {
            let vaccine = self.vaccine_row(&txn, &dose.vaccine_id).await?;
            let entry = pb::LateEntry {
                late_entry_id: dose.late_entry_id.clone(),
                person: dose.person.clone(),
                vaccine_id: dose.vaccine_id.clone(),
                batch_number: dose.batch_number.clone(),
                dose_number: dose.dose_number,
                administered_at: dose.administered_at,
                site_id: dose.site_id.clone(),
                procedure: procedure_of(vaccine.vaccine_type) as i32,
                state: LateEntryState::Pending as i32,
                statement: "recorded more than the late-entry window after the dose".into(),
                requested_by: new.site_id.to_owned(),
                requested_at: Some(ts(now)),
                dose_id: dose.dose_id.clone(),
                ..Default::default()
            };
            let result = late_entry_row(&entry, Vec::new(), String::new())?
                .insert(&txn)
                .await;
            let txn = match self
                .inserted(txn, result, &key, || {
                    ServiceError::conflict(
                        "LATE_ENTRY_PENDING",
                        "a late entry for this dose is already pending",
                    )
                })
                .await?
            {
                Ok(txn) => txn,
                Err(done) => return Ok(done),
            };
            return self.finish(txn, &key, dose).await;
        }
        self.publish_dose(&txn, &dose).await?;
        self.finish(txn, &key, dose).await
    }

    /// Checks a worker-signed dose against the keys, the vaccine, its batches and the
    /// person's course; returns the dose to record (without id, state or record time).
    pub(crate) async fn checked_dose(
        &self,
        txn: &DatabaseTransaction,
        envelope: &SignedEnvelope,
        claims: &pb::DoseClaims,
        now: DateTime<Utc>,
    ) -> Result<pb::Dose, ServiceError> {
        let at = from_ts(&claims.administered_at).ok_or_else(|| {
            ServiceError::invalid("worker_signature.payload.administered_at", "required")
        })?;
        let Some(key) = self
            .worker_key_for(txn, envelope, &claims.site_id, &claims.worker_id, at, now)
            .await?
        else {
            return Err(ServiceError::PermissionDenied(
                "BAD_WORKER_SIGNATURE: the signature does not verify with an unrevoked key of this worker at this site".into(),
            ));
        };
        let site = self.site_row(txn, &claims.site_id).await?;
        if !site.active {
            return Err(precondition("SITE_INACTIVE", "the site records no doses"));
        }
        let site_pb: pb::VaccinationSite = decode(&site.payload)?;
        let Some(vaccine_row) = vaccine::Entity::find_by_id(claims.vaccine_id.clone())
            .one(txn)
            .await
            .map_err(db_error)?
        else {
            return Err(ServiceError::invalid(
                "worker_signature.payload.vaccine_id",
                "no such vaccine",
            ));
        };
        let vaccine: pb::Vaccine = decode(&vaccine_row.payload)?;
        let batch =
            batch::Entity::find_by_id((claims.vaccine_id.clone(), claims.batch_number.clone()))
                .one(txn)
                .await
                .map_err(db_error)?
                .ok_or_else(|| {
                    precondition(
                        "UNKNOWN_BATCH",
                        "the batch is not released for this vaccine",
                    )
                })?;
        if batch.expires_at <= at {
            return Err(precondition(
                "BATCH_EXPIRED",
                "the batch had expired when the dose was given",
            ));
        }
        let person_id = claims
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let earlier: Vec<pb::Dose> = dose::Entity::find()
            .filter(dose::Column::PersonId.eq(person_id.clone()))
            .filter(dose::Column::LiveNumber.is_not_null())
            .order_by_asc(dose::Column::DoseNumber)
            .all(txn)
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| decode(&r.payload))
            .collect::<Result<_, _>>()?;
        let n = claims.dose_number;
        if earlier.iter().any(|d| d.dose_number == n) {
            return Err(ServiceError::conflict(
                "DOSE_RECORDED",
                "the person already has a dose with this number",
            ));
        }
        if earlier.iter().filter(|d| d.dose_number < n).count() as u32 != n - 1 {
            return Err(precondition(
                "DOSE_OUT_OF_ORDER",
                "earlier doses of the course are missing",
            ));
        }
        let in_course = n <= vaccine.doses_in_course.max(1);
        if let Some(previous) = earlier.iter().rfind(|d| d.dose_number == n - 1) {
            let prev_at = from_ts(&previous.administered_at).unwrap_or(at);
            if in_course {
                if previous.vaccine_id != claims.vaccine_id {
                    return Err(precondition(
                        "COURSE_VACCINE_MISMATCH",
                        "a primary course is given with one vaccine",
                    ));
                }
                let min = vaccine
                    .min_dose_interval
                    .as_ref()
                    .map(chrono_duration)
                    .unwrap_or_default();
                if at - prev_at < min {
                    return Err(precondition(
                        "INTERVAL_TOO_SHORT",
                        "the minimum interval since the previous dose is not met",
                    ));
                }
            } else {
                let previous_vaccine: pb::Vaccine =
                    decode(&self.vaccine_row(txn, &previous.vaccine_id).await?.payload)?;
                let wait = previous_vaccine
                    .booster_interval
                    .as_ref()
                    .or(vaccine.booster_interval.as_ref())
                    .map(chrono_duration)
                    .unwrap_or_default();
                if at - prev_at < wait {
                    return Err(precondition(
                        "BOOSTER_TOO_EARLY",
                        "the booster interval since the previous dose is not met",
                    ));
                }
            }
        }
        Ok(pb::Dose {
            dose_id: String::new(),
            person: claims.person.clone(),
            vaccine_id: claims.vaccine_id.clone(),
            vaccine_type: vaccine.r#type,
            batch_number: claims.batch_number.clone(),
            dose_number: n,
            administered_at: claims.administered_at,
            site_id: claims.site_id.clone(),
            site_name: site_pb.name,
            worker_id: claims.worker_id.clone(),
            worker_signature: Some(SignedEnvelope {
                key_id: key.key_id,
                ..envelope.clone()
            }),
            state: DoseState::Unspecified as i32,
            recorded_at: None,
            completes_course: n >= vaccine.doses_in_course.max(1),
            booster: !in_course,
            late_entry_id: String::new(),
        })
    }

    /// The dose's event for the risk service, and the person's booster schedule, in the
    /// caller's transaction.
    pub(crate) async fn publish_dose(
        &self,
        txn: &DatabaseTransaction,
        dose: &pb::Dose,
    ) -> Result<(), ServiceError> {
        let vaccine: pb::Vaccine = decode(&self.vaccine_row(txn, &dose.vaccine_id).await?.payload)?;
        let at = from_ts(&dose.administered_at).unwrap_or_else(Utc::now);
        let due = (dose.completes_course || dose.booster)
            .then(|| {
                vaccine
                    .booster_interval
                    .as_ref()
                    .map(|i| at + chrono_duration(i))
            })
            .flatten();
        let person_id = dose
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let event = RiskEvent {
            event_id: dose.dose_id.clone(),
            person: dose.person.clone(),
            observed_at: dose.recorded_at,
            event: Some(risk_event::Event::VaccinationDose(VaccinationDoseEvent {
                dose_id: dose.dose_id.clone(),
                dose_number: dose.dose_number,
                doses_in_course: vaccine.doses_in_course,
                administered_at: dose.administered_at,
                completes_course: dose.completes_course && !dose.booster,
                booster: dose.booster,
                booster_due_at: due.map(ts),
            })),
        };
        healthcode_events::outbox::enqueue(txn, DOSE_TOPIC, &person_id, event.encode_to_vec())
            .await
            .map_err(db_error)?;
        if let Some(due) = due {
            let site = self.site_row(txn, &dose.site_id).await?;
            let row = booster::ActiveModel {
                person_id: Set(person_id.clone()),
                vaccine_id: Set(dose.vaccine_id.clone()),
                last_dose_id: Set(dose.dose_id.clone()),
                last_dose_number: Set(dose.dose_number as i32),
                last_dose_at: Set(at),
                due_at: Set(due),
                division_code: Set(site.division_code),
                reminded_at: Set(None),
            };
            let existing = booster::Entity::find_by_id(person_id)
                .one(txn)
                .await
                .map_err(db_error)?;
            match existing {
                // A later dose moves the schedule; an earlier one arriving late does not.
                Some(b) if b.last_dose_number as u32 >= dose.dose_number => {}
                Some(_) => {
                    row.update(txn).await.map_err(db_error)?;
                }
                None => {
                    row.insert(txn).await.map_err(db_error)?;
                }
            }
        }
        Ok(())
    }

    pub async fn list_doses(
        &self,
        person_id: &str,
        include_unconfirmed: bool,
    ) -> Result<Vec<pb::Dose>, ServiceError> {
        let mut q = dose::Entity::find().filter(dose::Column::PersonId.eq(person_id));
        if !include_unconfirmed {
            q = q.filter(dose::Column::State.eq(DoseState::Recorded as i32));
        }
        q.order_by_asc(dose::Column::DoseNumber)
            .order_by_asc(dose::Column::RecordedAt)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| decode(&r.payload))
            .collect()
    }

    // -----------------------------------------------------------------------------------
    // Late entries

    pub async fn request_late_entry(
        &self,
        new: NewLateEntry<'_>,
        evidence: Vec<u8>,
    ) -> Result<pb::LateEntry, ServiceError> {
        let key = format!("late_entry:{}", new.request_id);
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let mut entry = new.entry;
        let txn = self.begin_write().await?;
        let vaccine = vaccine::Entity::find_by_id(entry.vaccine_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::invalid("vaccine_id", "no such vaccine"))?;
        if site::Entity::find_by_id(entry.site_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_none()
        {
            return Err(ServiceError::invalid("site_id", "no such site"));
        }
        let person_id = entry
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default();
        let recorded = dose::Entity::find()
            .filter(dose::Column::PersonId.eq(person_id))
            .filter(dose::Column::LiveNumber.eq(entry.dose_number as i32))
            .one(&txn)
            .await
            .map_err(db_error)?;
        if recorded.is_some() {
            return Err(ServiceError::conflict(
                "DOSE_RECORDED",
                "the person already has a dose with this number",
            ));
        }
        entry.late_entry_id = uuid::Uuid::now_v7().to_string();
        entry.procedure = procedure_of(vaccine.vaccine_type) as i32;
        entry.state = LateEntryState::Pending as i32;
        entry.requested_by = new.requested_by.to_owned();
        entry.requested_at = Some(ts(Utc::now()));
        // The statement and the evidence are free text and a photo of a paper record: both
        // sealed, and the reply (stored for retries) carries neither.
        let material = ReviewMaterial {
            evidence,
            statement: std::mem::take(&mut entry.statement),
        };
        let (sealed, key_id) = if material == ReviewMaterial::default() {
            (Vec::new(), String::new())
        } else {
            let s = self
                .keys
                .data
                .encrypt(&material.encode_to_vec(), entry.late_entry_id.as_bytes())
                .map_err(ServiceError::internal)?;
            (s.ciphertext, s.key_id)
        };
        let result = late_entry_row(&entry, sealed, key_id)?.insert(&txn).await;
        let txn = match self
            .inserted(txn, result, &key, || {
                ServiceError::conflict(
                    "LATE_ENTRY_PENDING",
                    "a late entry for this dose is already pending",
                )
            })
            .await?
        {
            Ok(txn) => txn,
            Err(done) => return Ok(done),
        };
        self.finish(txn, &key, entry).await
    }

    pub(crate) async fn late_entry_row<C: ConnectionTrait>(
        &self,
        db: &C,
        id: &str,
    ) -> Result<late_entry::Model, ServiceError> {
        late_entry::Entity::find_by_id(id.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such late entry".into()))
    }

    /// The entry, with its statement and evidence opened for its reviewers while pending.
    pub(crate) fn late_entry_proto(
        &self,
        row: &late_entry::Model,
        with_evidence: bool,
    ) -> Result<pb::LateEntry, ServiceError> {
        let mut entry: pb::LateEntry = decode(&row.payload)?;
        if with_evidence && !row.evidence.is_empty() {
            let opened = self
                .keys
                .data
                .decrypt(
                    &row.evidence_key_id,
                    &row.evidence,
                    row.late_entry_id.as_bytes(),
                )
                .map_err(ServiceError::internal)?;
            let material = ReviewMaterial::decode(&opened[..]).map_err(ServiceError::internal)?;
            entry.evidence_image = material.evidence;
            entry.statement = material.statement;
        }
        Ok(entry)
    }

    /// Decides a late entry. `reviewer` is the caller's subject; `dose` is the worker's
    /// signed dose when approving an entry that has none yet.
    pub async fn review_late_entry(
        &self,
        request_id: &str,
        row: late_entry::Model,
        reviewer: &str,
        approve: bool,
        note: &str,
        signed: Option<(SignedEnvelope, pb::DoseClaims)>,
    ) -> Result<pb::LateEntry, ServiceError> {
        let key = format!("review:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let now = Utc::now();
        let txn = self.begin_write().await?;
        // Decided under the transaction: of two racing reviews one finds it decided.
        let row = self.late_entry_row(&txn, &row.late_entry_id).await?;
        if row.state != LateEntryState::Pending as i32 {
            return Err(precondition(
                "LATE_ENTRY_DECIDED",
                "the late entry is already decided",
            ));
        }
        let mut entry = self.late_entry_proto(&row, false)?;
        let pending_dose = if entry.dose_id.is_empty() {
            None
        } else {
            dose::Entity::find_by_id(entry.dose_id.clone())
                .one(&txn)
                .await
                .map_err(db_error)?
        };
        if approve {
            match pending_dose {
                Some(d) => {
                    let mut dose: pb::Dose = decode(&d.payload)?;
                    dose.state = DoseState::Recorded as i32;
                    dose.recorded_at = Some(ts(now));
                    let mut active: dose::ActiveModel = d.into();
                    active.state = Set(dose.state);
                    active.payload = Set(dose.encode_to_vec());
                    active.recorded_at = Set(now);
                    active.update(&txn).await.map_err(db_error)?;
                    self.publish_dose(&txn, &dose).await?;
                }
                None => {
                    let Some((envelope, claims)) = signed else {
                        return Err(ServiceError::invalid(
                            "worker_signature",
                            "required to approve an entry without a dose",
                        ));
                    };
                    let same_person = claims.person.as_ref().map(|p| &p.person_id)
                        == entry.person.as_ref().map(|p| &p.person_id);
                    if !same_person
                        || claims.dose_number != entry.dose_number
                        || claims.site_id != entry.site_id
                    {
                        return Err(ServiceError::invalid(
                            "worker_signature.payload",
                            "must name the entry's person, dose number and site",
                        ));
                    }
                    let mut dose = self.checked_dose(&txn, &envelope, &claims, now).await?;
                    dose.dose_id = crate::derived("late-dose", &entry.late_entry_id);
                    dose.state = DoseState::Recorded as i32;
                    dose.recorded_at = Some(ts(now));
                    dose.late_entry_id = entry.late_entry_id.clone();
                    let result = dose_row(&dose, &envelope.key_id)?.insert(&txn).await;
                    if let Err(err) = result {
                        if is_unique_violation(&err) {
                            return Err(ServiceError::conflict(
                                "DOSE_RECORDED",
                                "the person already has a dose with this number",
                            ));
                        }
                        return Err(db_error(err));
                    }
                    self.publish_dose(&txn, &dose).await?;
                    entry.dose_id = dose.dose_id;
                }
            }
            entry.state = LateEntryState::Approved as i32;
        } else {
            if let Some(d) = pending_dose {
                let mut dose: pb::Dose = decode(&d.payload)?;
                dose.state = DoseState::Rejected as i32;
                let mut active: dose::ActiveModel = d.into();
                active.state = Set(dose.state);
                active.live_number = Set(None);
                active.payload = Set(dose.encode_to_vec());
                active.update(&txn).await.map_err(db_error)?;
            }
            entry.state = LateEntryState::Rejected as i32;
        }
        entry.reviewed_by = reviewer.to_owned();
        entry.reviewed_at = Some(ts(now));
        entry.review_note = note.to_owned();
        // The statement and the evidence are deleted once decided.
        let mut active: late_entry::ActiveModel = row.into();
        active.state = Set(entry.state);
        active.pending_number = Set(None);
        active.payload = Set(entry.encode_to_vec());
        active.evidence = Set(Vec::new());
        active.evidence_key_id = Set(String::new());
        active.update(&txn).await.map_err(db_error)?;
        self.finish(txn, &key, entry).await
    }

    pub async fn list_late_entries(
        &self,
        state: LateEntryState,
        site_id: &str,
        person_id: &str,
        with_evidence: bool,
        offset: u64,
        limit: u64,
    ) -> Result<pb::ListLateEntriesResponse, ServiceError> {
        let mut q = late_entry::Entity::find().filter(late_entry::Column::State.eq(state as i32));
        if !site_id.is_empty() {
            q = q.filter(late_entry::Column::SiteId.eq(site_id));
        }
        if !person_id.is_empty() {
            q = q.filter(late_entry::Column::PersonId.eq(person_id));
        }
        let rows = q
            .order_by_asc(late_entry::Column::RequestedAt)
            .order_by_asc(late_entry::Column::LateEntryId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let late_entries = rows
            .iter()
            .take(limit as usize)
            .map(|r| self.late_entry_proto(r, with_evidence))
            .collect::<Result<_, _>>()?;
        Ok(pb::ListLateEntriesResponse {
            late_entries,
            next_page_token: page_token(offset, limit, more),
        })
    }

    // -----------------------------------------------------------------------------------
    // Boosters

    pub async fn list_booster_due(
        &self,
        due_before: DateTime<Utc>,
        division_code: &str,
        person_id: &str,
        offset: u64,
        limit: u64,
    ) -> Result<pb::ListBoosterDueResponse, ServiceError> {
        let mut q = booster::Entity::find().filter(booster::Column::DueAt.lte(due_before));
        if !division_code.is_empty() {
            q = q.filter(booster::Column::DivisionCode.eq(division_code));
        }
        if !person_id.is_empty() {
            q = q.filter(booster::Column::PersonId.eq(person_id));
        }
        let rows = q
            .order_by_asc(booster::Column::DueAt)
            .order_by_asc(booster::Column::PersonId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        Ok(pb::ListBoosterDueResponse {
            due: rows
                .iter()
                .take(limit as usize)
                .map(booster_proto)
                .collect(),
            next_page_token: page_token(offset, limit, more),
        })
    }

    /// The nearest active site within the reminder radius: Redis GEO, or the database when
    /// the cache does not answer.
    async fn nearest_site(&self, at: GeoPoint) -> Result<Option<(String, f64)>, ServiceError> {
        let radius = f64::from(self.settings.reminder_radius_m);
        match self.cache.geo_search(SITES_GEO_KEY, at, radius, 1).await {
            Ok(found) => Ok(found.into_iter().next()),
            Err(err) => {
                tracing::warn!(error = %err, "site geo index unavailable; asking the database");
                let found = self
                    .list_sites(Some((at, self.settings.reminder_radius_m)), "", 0, 1)
                    .await?;
                Ok(found.sites.into_iter().next().and_then(|m| {
                    m.site
                        .map(|s| (s.site_id, distance_m(&at, &s.location.unwrap_or_default())))
                }))
            }
        }
    }

    /// A booking reminder when the person's booster is due and a site is near, once per
    /// booster: the reminder is claimed by a conditional update, so two reports racing
    /// produce one. The location is not stored.
    pub async fn report_location(
        &self,
        person_id: &str,
        at: GeoPoint,
        reported_at: DateTime<Utc>,
        chinese: bool,
    ) -> Result<Option<pb::BoosterReminder>, ServiceError> {
        let Some(due) = booster::Entity::find_by_id(person_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        if due.reminded_at.is_some() || due.due_at > reported_at {
            return Ok(None);
        }
        let Some((site_id, distance)) = self.nearest_site(at).await? else {
            return Ok(None);
        };
        let Ok(site) = self.site(&site_id).await else {
            return Ok(None);
        };
        if !site.active {
            return Ok(None);
        }
        let claimed = booster::Entity::update_many()
            .col_expr(booster::Column::RemindedAt, Expr::value(Some(Utc::now())))
            .filter(booster::Column::PersonId.eq(person_id))
            .filter(booster::Column::LastDoseId.eq(due.last_dose_id.clone()))
            .filter(booster::Column::RemindedAt.is_null())
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if claimed.rows_affected != 1 {
            return Ok(None);
        }
        let (title, body) = if chinese {
            (
                "加强针提醒".to_owned(),
                format!(
                    "您的加强针已到期。附近的接种点：{}（约{}米），电话 {}。点击预约。",
                    site.name,
                    distance.round(),
                    site.public_phone
                ),
            )
        } else {
            (
                "Your booster is due".to_owned(),
                format!(
                    "A vaccination site is about {} m away: {}, tel. {}. Tap to book.",
                    distance.round(),
                    site.name,
                    site.public_phone
                ),
            )
        };
        Ok(Some(pb::BoosterReminder {
            reminder_id: crate::derived("reminder", &due.last_dose_id),
            site: Some(pb::VaccinationSite {
                worker_keys: Vec::new(),
                ..site
            }),
            distance_m: distance.round() as u32,
            due_at: Some(ts(due.due_at)),
            title,
            body,
        }))
    }
}

async fn put_batches<C: ConnectionTrait>(
    db: &C,
    vaccine_id: &str,
    batches: &[pb::VaccineBatch],
) -> Result<(), ServiceError> {
    for b in batches {
        let expires = from_ts(&b.expires_at).unwrap_or_else(Utc::now);
        let existing = batch::Entity::find_by_id((vaccine_id.to_owned(), b.batch_number.clone()))
            .one(db)
            .await
            .map_err(db_error)?;
        let row = batch::ActiveModel {
            vaccine_id: Set(vaccine_id.to_owned()),
            batch_number: Set(b.batch_number.clone()),
            expires_at: Set(expires),
        };
        if existing.is_some() {
            row.update(db).await.map_err(db_error)?;
        } else {
            row.insert(db).await.map_err(db_error)?;
        }
    }
    Ok(())
}

fn dose_row(dose: &pb::Dose, key_id: &str) -> Result<dose::ActiveModel, ServiceError> {
    let live = dose.state != DoseState::Rejected as i32;
    Ok(dose::ActiveModel {
        dose_id: Set(dose.dose_id.clone()),
        person_id: Set(dose
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default()),
        vaccine_id: Set(dose.vaccine_id.clone()),
        dose_number: Set(dose.dose_number as i32),
        live_number: Set(live.then_some(dose.dose_number as i32)),
        state: Set(dose.state),
        administered_at: Set(from_ts(&dose.administered_at)
            .ok_or_else(|| ServiceError::internal("dose without a time"))?),
        site_id: Set(dose.site_id.clone()),
        worker_key_id: Set(key_id.to_owned()),
        payload: Set(dose.encode_to_vec()),
        recorded_at: Set(from_ts(&dose.recorded_at).unwrap_or_else(Utc::now)),
    })
}

/// What a late entry's reviewers see and nobody else: sealed in the row's `evidence`
/// column, deleted once the entry is decided.
#[derive(Clone, PartialEq, prost::Message)]
struct ReviewMaterial {
    #[prost(bytes = "vec", tag = "1")]
    evidence: Vec<u8>,
    #[prost(string, tag = "2")]
    statement: String,
}

fn late_entry_row(
    entry: &pb::LateEntry,
    evidence: Vec<u8>,
    evidence_key_id: String,
) -> Result<late_entry::ActiveModel, ServiceError> {
    let stored = pb::LateEntry {
        evidence_image: Vec::new(),
        statement: String::new(),
        ..entry.clone()
    };
    Ok(late_entry::ActiveModel {
        late_entry_id: Set(entry.late_entry_id.clone()),
        person_id: Set(entry
            .person
            .as_ref()
            .map(|p| p.person_id.clone())
            .unwrap_or_default()),
        site_id: Set(entry.site_id.clone()),
        state: Set(entry.state),
        pending_number: Set(Some(entry.dose_number as i32)),
        payload: Set(stored.encode_to_vec()),
        evidence: Set(evidence),
        evidence_key_id: Set(evidence_key_id),
        requested_at: Set(from_ts(&entry.requested_at).unwrap_or_else(Utc::now)),
    })
}

/// Who reviews a missing dose, by vaccine type (the requirements' table).
pub fn procedure_of(vaccine_type: i32) -> ExceptionProcedure {
    match VaccineType::try_from(vaccine_type) {
        Ok(VaccineType::RecombinantProtein) => ExceptionProcedure::UnitRecheck,
        Ok(VaccineType::AdenovirusVector) => ExceptionProcedure::CdcConfirmation,
        _ => ExceptionProcedure::LateEntry,
    }
}

pub fn worker_key_proto(k: &worker_key::Model) -> pb::WorkerKey {
    let pem = VerifyingKey::from_sec1(k.key_id.clone(), &k.public_key)
        .ok()
        .and_then(|v| v.to_pem().ok())
        .unwrap_or_default();
    pb::WorkerKey {
        worker_id: k.worker_id.clone(),
        site_id: k.site_id.clone(),
        key: Some(PublicKey {
            key_id: k.key_id.clone(),
            algorithm: "SM2".into(),
            public_key_sec1: k.public_key.clone(),
            public_key_pem: pem,
            not_before: k.not_before.map(ts),
            not_after: k.not_after.map(ts),
        }),
        revoked_at: k.revoked_at.map(ts),
        revoke_reason: k.revoke_reason.clone(),
    }
}

fn booster_proto(b: &booster::Model) -> pb::BoosterDue {
    pb::BoosterDue {
        person: Some(PersonRef {
            person_id: b.person_id.clone(),
        }),
        vaccine_id: b.vaccine_id.clone(),
        last_dose_number: Ord::max(b.last_dose_number, 0) as u32,
        last_dose_at: Some(ts(b.last_dose_at)),
        due_at: Some(ts(b.due_at)),
        reminded_at: b.reminded_at.map(ts),
    }
}

/// Half-sides of a box around `at` holding every point within `radius_m`.
fn box_degrees(at: &GeoPoint, radius_m: f64) -> (f64, f64) {
    let dlat = (radius_m / healthcode_proto::geo::EARTH_RADIUS_M).to_degrees() * 1.01;
    let cos = at.latitude.to_radians().cos().abs().max(0.01);
    (dlat, (dlat / cos).min(180.0))
}
