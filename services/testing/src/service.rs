//! Institutions, slots, bookings and payments. A booking takes its place with one
//! conditional update (`booked < capacity`) in the transaction that inserts it, so no
//! interleaving oversells a slot; a person's open bookings are unique per local day by an
//! index, so two racing bookings of one person cannot both commit.

use crate::payments::{Notification, PaymentGateway, ProviderError, Providers};
use crate::store::entities::*;
use chrono::{DateTime, Utc};
use healthcode_crypto::{SigningKey, TrustedKeys};
use healthcode_db::{db_error, is_unique_violation};
use healthcode_errors::ServiceError;
use healthcode_events::Relay;
use healthcode_proto::common::v1::{GeoPoint, PersonRef};
use healthcode_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use healthcode_proto::gateway::v1::{GetPlaceRequest, get_place_request};
use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::testing::v1 as pb;
use healthcode_server::outbound::{Outbound, OutboundError, lazy_channel, with_deadline};
use pb::{BookingState, PaymentOutcome, PaymentState, RetestNoticeState, SampleKind};
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use std::collections::HashMap;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The topic every report is published on, as a `healthcode.risk.v1.RiskEvent` whose
/// `event_id` is the report id.
pub const RESULT_TOPIC: &str = "testing.result";
/// The topic of retest notices (`RetestNotice`), consumed by the notifier.
pub const NOTICE_TOPIC: &str = "testing.retest_notice";
pub const NOTICE_GROUP: &str = "testing-notifier";
/// "HCB1:" followed by the booking id: what the institution scans at sampling.
pub const BOOKING_QR_PREFIX: &str = "HCB1:";
pub const DEFAULT_POOL_SIZE: u32 = 10;
pub const MAX_POOL_SIZE: u32 = 20;

pub type Identity = IdentityServiceClient<InterceptedService<Channel, Outbound>>;
pub type Gateway = GatewayServiceClient<InterceptedService<Channel, Outbound>>;

#[derive(Clone)]
pub struct Upstreams {
    pub identity: Identity,
    pub gateway: Gateway,
    pub timeout: Duration,
}

impl Upstreams {
    pub fn new(
        identity_url: &str,
        gateway_url: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, OutboundError> {
        let outbound = Outbound::new(token)?;
        Ok(Upstreams {
            identity: IdentityServiceClient::with_interceptor(
                lazy_channel(identity_url, timeout)?,
                outbound.clone(),
            ),
            gateway: GatewayServiceClient::with_interceptor(
                lazy_channel(gateway_url, timeout)?,
                outbound,
            ),
            timeout,
        })
    }
}

pub struct Settings {
    pub province: String,
    pub payment_window: Duration,
    pub retest_due: Duration,
}

pub struct Testing {
    pub(crate) db: DatabaseConnection,
    pub(crate) relay: Relay,
    pub(crate) providers: Providers,
    pub(crate) signing_key: SigningKey,
    pub(crate) keys: TrustedKeys,
    pub(crate) upstreams: Upstreams,
    pub(crate) province: String,
    payment_window: chrono::Duration,
    pub(crate) retest_due: chrono::Duration,
}

pub use healthcode_proto::time::{from_ts, minute, ts};

/// The local (Asia/Shanghai, UTC+8, no daylight saving) day of an instant.
pub fn local_day(t: DateTime<Utc>) -> String {
    (t + chrono::Duration::hours(8))
        .date_naive()
        .format("%Y-%m-%d")
        .to_string()
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::hours(24))
}

fn precondition(reason: &str, message: &str) -> ServiceError {
    ServiceError::precondition(reason, message)
}

pub use healthcode_proto::geo::distance_m;

pub fn slot_proto(s: &slot::Model) -> pb::Slot {
    pb::Slot {
        slot_id: s.slot_id.clone(),
        institution_id: s.institution_id.clone(),
        starts_at: Some(ts(s.starts_at)),
        ends_at: Some(ts(s.ends_at)),
        capacity: Ord::max(s.capacity, 0) as u32,
        booked: Ord::max(s.booked, 0) as u32,
        available: Ord::max(s.capacity - s.booked, 0) as u32,
    }
}

fn payment_proto(p: &payment::Model) -> pb::Payment {
    let outcome_known = p.state != PaymentState::Pending as i32;
    pb::Payment {
        payment_id: p.payment_id.clone(),
        booking_id: p.booking_id.clone(),
        provider: p.provider,
        amount_fen: p.amount_fen,
        state: p.state,
        idempotency_key: p.idempotency_key.clone(),
        provider_transaction_id: p.provider_transaction_id.clone(),
        client_parameters: if outcome_known {
            HashMap::new()
        } else {
            serde_json::from_str(&p.client_parameters).unwrap_or_default()
        },
        created_at: Some(ts(p.created_at)),
        updated_at: Some(ts(p.updated_at)),
        decline_reason: p.decline_reason.clone(),
    }
}

pub use healthcode_crypto::derived_id;

pub struct NewBooking<'a> {
    pub request_id: &'a str,
    pub person_id: &'a str,
    pub slot_id: &'a str,
    pub sample_kind: SampleKind,
    pub place_code: &'a str,
    pub retest_notice_id: Option<&'a str>,
}

/// Who may act on a booking: the app for anyone it acts for, an institution its own.
#[derive(Clone, Copy)]
pub enum BookingScope<'a> {
    Any,
    Institution(&'a str),
}

impl Testing {
    pub fn new(
        db: DatabaseConnection,
        relay: Relay,
        providers: Providers,
        signing_key: SigningKey,
        keys: TrustedKeys,
        upstreams: Upstreams,
        settings: Settings,
    ) -> Self {
        Testing {
            db,
            relay,
            providers,
            signing_key,
            keys,
            upstreams,
            province: settings.province,
            payment_window: chrono_duration(settings.payment_window),
            retest_due: chrono_duration(settings.retest_due),
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A transaction that will write. On SQLite it takes the write lock first: a deferred
    /// transaction that reads and then writes fails with "busy" when another connection
    /// committed in between.
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

    // -----------------------------------------------------------------------------------
    // Institutions

    pub async fn register_institution(
        &self,
        request_id: &str,
        mut institution: pb::Institution,
    ) -> Result<pb::Institution, ServiceError> {
        let key = format!("institution:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        institution.institution_id = uuid::Uuid::now_v7().to_string();
        if institution.pool_size == 0 {
            institution.pool_size = DEFAULT_POOL_SIZE;
        }
        let txn = self.begin_write().await?;
        let inserted = institution_row(&institution).insert(&txn).await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await.map_err(db_error)?;
                if let Some(done) = self.replay(&key).await? {
                    return Ok(done);
                }
                return Err(ServiceError::conflict(
                    "LICENCE_REGISTERED",
                    "an institution with this licence number is registered",
                ));
            }
            other => {
                other.map_err(db_error)?;
            }
        }
        self.finish(txn, &key, institution).await
    }

    pub async fn institution(&self, id: &str) -> Result<pb::Institution, ServiceError> {
        let row = institution::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such institution".into()))?;
        pb::Institution::decode(&row.payload[..]).map_err(ServiceError::internal)
    }

    pub(crate) async fn institutions(
        &self,
        ids: impl IntoIterator<Item = String>,
    ) -> Result<HashMap<String, pb::Institution>, ServiceError> {
        let ids: Vec<String> = ids.into_iter().collect();
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let rows = institution::Entity::find()
                .filter(institution::Column::InstitutionId.is_in(chunk.iter().cloned()))
                .all(&self.db)
                .await
                .map_err(db_error)?;
            for row in rows {
                let i =
                    pb::Institution::decode(&row.payload[..]).map_err(ServiceError::internal)?;
                out.insert(row.institution_id, i);
            }
        }
        Ok(out)
    }

    /// Replaces the named fields of an institution.
    pub async fn update_institution(
        &self,
        changes: pb::Institution,
        paths: &[String],
        scope: BookingScope<'_>,
    ) -> Result<pb::Institution, ServiceError> {
        if let BookingScope::Institution(own) = scope
            && own != changes.institution_id
        {
            return Err(ServiceError::PermissionDenied(
                "an institution may change only its own details".into(),
            ));
        }
        let txn = self.begin_write().await?;
        let row = institution::Entity::find_by_id(changes.institution_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such institution".into()))?;
        let mut current =
            pb::Institution::decode(&row.payload[..]).map_err(ServiceError::internal)?;
        for path in paths {
            match path.as_str() {
                "name" => current.name = changes.name.clone(),
                "address" => current.address = changes.address.clone(),
                "opening_hours" => current.opening_hours = changes.opening_hours.clone(),
                "slot_length" => current.slot_length = changes.slot_length,
                "single_tube_price_fen" => {
                    current.single_tube_price_fen = changes.single_tube_price_fen
                }
                "pooled_price_fen" => current.pooled_price_fen = changes.pooled_price_fen,
                "pool_size" => current.pool_size = changes.pool_size,
                "public_phone" => current.public_phone = changes.public_phone.clone(),
                "active" => current.active = changes.active,
                "sample_kinds" => current.sample_kinds = changes.sample_kinds.clone(),
                _ => {}
            }
        }
        if current.pool_size == 0 {
            current.pool_size = DEFAULT_POOL_SIZE;
        }
        // Compare-and-set on the version read: of two concurrent updates one wins and the
        // other is told to retry, rather than silently undoing the first.
        let done = institution::Entity::update_many()
            .col_expr(
                institution::Column::Payload,
                Expr::value(current.encode_to_vec()),
            )
            .col_expr(institution::Column::Active, Expr::value(current.active))
            .col_expr(institution::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(institution::Column::InstitutionId.eq(row.institution_id.clone()))
            .filter(institution::Column::UpdatedAt.eq(row.updated_at))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if done.rows_affected == 0 {
            return Err(ServiceError::Unavailable(
                "the institution changed meanwhile; retry".into(),
            ));
        }
        txn.commit().await.map_err(db_error)?;
        Ok(current)
    }

    // -----------------------------------------------------------------------------------
    // Slots

    pub async fn set_slots(
        &self,
        request_id: &str,
        institution_id: &str,
        windows: Vec<(DateTime<Utc>, DateTime<Utc>, u32)>,
        scope: BookingScope<'_>,
    ) -> Result<pb::SetSlotsResponse, ServiceError> {
        if let BookingScope::Institution(own) = scope
            && own != institution_id
        {
            return Err(ServiceError::PermissionDenied(
                "an institution may set only its own slots".into(),
            ));
        }
        let key = format!("slots:{institution_id}:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        self.institution(institution_id).await?;
        let (Some(first), Some(last)) = (
            windows.iter().map(|w| w.0).min(),
            windows.iter().map(|w| w.1).max(),
        ) else {
            return Ok(pb::SetSlotsResponse::default());
        };
        let txn = self.begin_write().await?;
        let existing = slot::Entity::find()
            .filter(slot::Column::InstitutionId.eq(institution_id))
            .filter(slot::Column::StartsAt.lt(last))
            .filter(slot::Column::EndsAt.gt(first))
            .all(&txn)
            .await
            .map_err(db_error)?;
        let mut slots = Vec::with_capacity(windows.len());
        let mut kept = std::collections::HashSet::new();
        let mut inserts = Vec::new();
        for (starts_at, ends_at, capacity) in &windows {
            let same = existing
                .iter()
                .find(|s| s.starts_at == *starts_at && s.ends_at == *ends_at);
            match same {
                Some(s) => {
                    let changed = slot::Entity::update_many()
                        .col_expr(slot::Column::Capacity, Expr::value(*capacity as i32))
                        .filter(slot::Column::SlotId.eq(s.slot_id.clone()))
                        .filter(slot::Column::Booked.lte(*capacity as i32))
                        .exec(&txn)
                        .await
                        .map_err(db_error)?;
                    if changed.rows_affected == 0 {
                        return Err(precondition(
                            "CAPACITY_BELOW_BOOKINGS",
                            "a new capacity is below the bookings already taken",
                        ));
                    }
                    kept.insert(s.slot_id.clone());
                    slots.push(slot::Model {
                        capacity: *capacity as i32,
                        ..s.clone()
                    });
                }
                None => {
                    let row = slot::Model {
                        slot_id: uuid::Uuid::now_v7().to_string(),
                        institution_id: institution_id.to_owned(),
                        starts_at: *starts_at,
                        ends_at: *ends_at,
                        capacity: *capacity as i32,
                        booked: 0,
                    };
                    inserts.push(slot::ActiveModel::from(row.clone()));
                    slots.push(row);
                }
            }
        }
        // Overlapped slots that the new windows do not keep go, unless someone booked them.
        let replaced: Vec<&slot::Model> = existing
            .iter()
            .filter(|s| !kept.contains(&s.slot_id))
            .filter(|s| windows.iter().any(|w| s.starts_at < w.1 && s.ends_at > w.0))
            .collect();
        if replaced.iter().any(|s| s.booked > 0) {
            return Err(precondition(
                "CAPACITY_BELOW_BOOKINGS",
                "a replaced slot already has bookings",
            ));
        }
        if !replaced.is_empty() {
            let deleted = slot::Entity::delete_many()
                .filter(slot::Column::SlotId.is_in(replaced.iter().map(|s| s.slot_id.clone())))
                .filter(slot::Column::Booked.eq(0))
                .exec(&txn)
                .await
                .map_err(db_error)?;
            if deleted.rows_affected != replaced.len() as u64 {
                return Err(precondition(
                    "CAPACITY_BELOW_BOOKINGS",
                    "a replaced slot was booked meanwhile",
                ));
            }
        }
        for chunk in inserts.chunks(500) {
            let inserted = slot::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&txn)
                .await;
            match inserted {
                Err(err) if is_unique_violation(&err) => {
                    return Err(ServiceError::Unavailable(
                        "another change of these slots committed meanwhile; retry".into(),
                    ));
                }
                other => {
                    other.map_err(db_error)?;
                }
            }
        }
        slots.sort_by_key(|s| s.starts_at);
        let answer = pb::SetSlotsResponse {
            slots: slots.iter().map(slot_proto).collect(),
        };
        self.finish(txn, &key, answer).await
    }

    pub async fn list_slots(
        &self,
        institution_id: &str,
        window: (DateTime<Utc>, DateTime<Utc>),
        only_available: bool,
        (offset, limit): (u64, u64),
    ) -> Result<pb::ListSlotsResponse, ServiceError> {
        let mut query = slot::Entity::find()
            .filter(slot::Column::InstitutionId.eq(institution_id))
            .filter(slot::Column::StartsAt.gte(window.0))
            .filter(slot::Column::StartsAt.lt(window.1));
        if only_available {
            query =
                query.filter(Expr::col(slot::Column::Booked).lt(Expr::col(slot::Column::Capacity)));
        }
        let rows = query
            .order_by_asc(slot::Column::StartsAt)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        Ok(pb::ListSlotsResponse {
            slots: rows.iter().take(limit as usize).map(slot_proto).collect(),
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        })
    }

    /// The location of a venue's place code, from the gateway.
    pub async fn place_location(&self, place_code: &str) -> Result<GeoPoint, ServiceError> {
        let mut gateway = self.upstreams.gateway.clone();
        let place = gateway
            .get_place(with_deadline(
                GetPlaceRequest {
                    place: Some(get_place_request::Place::PlaceCode(place_code.to_owned())),
                },
                self.upstreams.timeout,
            ))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => ServiceError::NotFound("no such place code".into()),
                tonic::Code::InvalidArgument => {
                    ServiceError::invalid("place_code", "not a place code")
                }
                _ => ServiceError::Unavailable("the gateway is unavailable; retry later".into()),
            })?
            .into_inner();
        place
            .location
            .ok_or_else(|| ServiceError::NotFound("the place has no location".into()))
    }

    /// Active institutions within `radius_m` of `center` that offer `kind` and have a free
    /// slot starting in `window`, nearest first, with their earliest free slots.
    pub async fn search(
        &self,
        center: &GeoPoint,
        radius_m: f64,
        window: (DateTime<Utc>, DateTime<Utc>),
        kind: SampleKind,
        (offset, limit): (u64, u64),
    ) -> Result<pb::SearchInstitutionsResponse, ServiceError> {
        let dlat = radius_m / 111_320.0;
        let dlng = radius_m / (111_320.0 * center.latitude.to_radians().cos().max(0.01));
        let rows = institution::Entity::find()
            .filter(institution::Column::Active.eq(true))
            .filter(
                institution::Column::Lat.between(center.latitude - dlat, center.latitude + dlat),
            )
            .filter(
                institution::Column::Lng.between(center.longitude - dlng, center.longitude + dlng),
            )
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut near: Vec<(f64, pb::Institution)> = Vec::new();
        for row in rows {
            let point = GeoPoint {
                latitude: row.lat,
                longitude: row.lng,
            };
            let d = distance_m(center, &point);
            if d > radius_m {
                continue;
            }
            let i = pb::Institution::decode(&row.payload[..]).map_err(ServiceError::internal)?;
            if kind != SampleKind::Unspecified && !i.sample_kinds.contains(&(kind as i32)) {
                continue;
            }
            near.push((d, i));
        }
        near.sort_by(|a, b| a.0.total_cmp(&b.0));
        let now = Utc::now();
        let from = Ord::max(window.0, now);
        let mut free: HashMap<String, Vec<slot::Model>> = HashMap::new();
        let ids: Vec<String> = near.iter().map(|(_, i)| i.institution_id.clone()).collect();
        for chunk in ids.chunks(500) {
            let slots = slot::Entity::find()
                .filter(slot::Column::InstitutionId.is_in(chunk.iter().cloned()))
                .filter(slot::Column::StartsAt.gte(from))
                .filter(slot::Column::StartsAt.lt(window.1))
                .filter(Expr::col(slot::Column::Booked).lt(Expr::col(slot::Column::Capacity)))
                .order_by_asc(slot::Column::StartsAt)
                .all(&self.db)
                .await
                .map_err(db_error)?;
            for s in slots {
                let list = free.entry(s.institution_id.clone()).or_default();
                if list.len() < 3 {
                    list.push(s);
                }
            }
        }
        let matches: Vec<pb::InstitutionMatch> = near
            .into_iter()
            .filter_map(|(d, i)| {
                let slots = free.remove(&i.institution_id)?;
                Some(pb::InstitutionMatch {
                    institution: Some(i),
                    distance_m: d.round() as u32,
                    next_free_slots: slots.iter().map(slot_proto).collect(),
                })
            })
            .collect();
        let total = matches.len() as u64;
        Ok(pb::SearchInstitutionsResponse {
            matches: matches
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .collect(),
            next_page_token: if offset + limit < total {
                (offset + limit).to_string()
            } else {
                String::new()
            },
            center: Some(*center),
        })
    }

    // -----------------------------------------------------------------------------------
    // Bookings

    pub(crate) async fn booking_proto(
        &self,
        b: &booking::Model,
    ) -> Result<pb::Booking, ServiceError> {
        let slot = slot::Entity::find_by_id(b.slot_id.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?;
        Ok(booking_with_slot(b, slot.as_ref()))
    }

    pub async fn create_booking(&self, req: NewBooking<'_>) -> Result<pb::Booking, ServiceError> {
        let key = format!("booking:{}:{}", req.person_id, req.request_id);
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let now = Utc::now();
        let slot = slot::Entity::find_by_id(req.slot_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such slot".into()))?;
        if slot.starts_at <= now {
            return Err(precondition("SLOT_PAST", "the slot has started"));
        }
        let institution = self.institution(&slot.institution_id).await?;
        if !institution.active {
            return Err(precondition(
                "INSTITUTION_INACTIVE",
                "the institution takes no bookings",
            ));
        }
        if !institution.sample_kinds.contains(&(req.sample_kind as i32)) {
            return Err(precondition(
                "SAMPLE_KIND_NOT_OFFERED",
                "the institution does not offer this kind of test",
            ));
        }
        let txn = self.begin_write().await?;
        let price = match req.retest_notice_id {
            Some(notice_id) => {
                let taken = retest_notice::Entity::update_many()
                    .col_expr(
                        retest_notice::Column::State,
                        Expr::value(RetestNoticeState::Booked as i32),
                    )
                    .filter(retest_notice::Column::NoticeId.eq(notice_id))
                    .filter(retest_notice::Column::PersonId.eq(req.person_id))
                    .filter(retest_notice::Column::State.eq(RetestNoticeState::Open as i32))
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
                if taken.rows_affected == 0 {
                    return Err(precondition(
                        "RETEST_NOTICE_NOT_OPEN",
                        "the retest notice is not the person's, or is not open",
                    ));
                }
                if req.sample_kind != SampleKind::SingleTube {
                    return Err(ServiceError::invalid(
                        "sample_kind",
                        "a retest is a single-tube test",
                    ));
                }
                0
            }
            None if req.sample_kind == SampleKind::Pooled => institution.pooled_price_fen,
            None => institution.single_tube_price_fen,
        };
        let taken = slot::Entity::update_many()
            .col_expr(slot::Column::Booked, Expr::col(slot::Column::Booked).add(1))
            .filter(slot::Column::SlotId.eq(slot.slot_id.clone()))
            .filter(Expr::col(slot::Column::Booked).lt(Expr::col(slot::Column::Capacity)))
            .filter(slot::Column::StartsAt.gt(now))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if taken.rows_affected == 0 {
            return Err(precondition("SLOT_FULL", "no place is left in the slot"));
        }
        let booking_id = uuid::Uuid::now_v7().to_string();
        let row = booking::Model {
            booking_id: booking_id.clone(),
            person_id: req.person_id.to_owned(),
            institution_id: slot.institution_id.clone(),
            slot_id: slot.slot_id.clone(),
            sample_kind: req.sample_kind as i32,
            state: if price > 0 {
                BookingState::AwaitingPayment as i32
            } else {
                BookingState::Confirmed as i32
            },
            open_day: Some(local_day(slot.starts_at)),
            price_fen: price,
            payment_due_at: (price > 0).then(|| now + self.payment_window),
            payment_id: None,
            place_code: req.place_code.to_owned(),
            retest_notice_id: req.retest_notice_id.map(str::to_owned),
            created_at: now,
            updated_at: now,
        };
        let inserted = booking::Entity::insert(booking::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                txn.rollback().await.map_err(db_error)?;
                if let Some(done) = self.replay(&key).await? {
                    return Ok(done);
                }
                return Err(ServiceError::conflict(
                    "OPEN_BOOKING_THAT_DAY",
                    "the person already has an open booking that day",
                ));
            }
            other => {
                other.map_err(db_error)?;
            }
        }
        if let Some(notice_id) = req.retest_notice_id {
            retest_notice::Entity::update_many()
                .col_expr(
                    retest_notice::Column::BookingId,
                    Expr::value(booking_id.clone()),
                )
                .filter(retest_notice::Column::NoticeId.eq(notice_id))
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        let slot = slot::Model {
            booked: slot.booked + 1,
            ..slot
        };
        let answer = booking_with_slot(&row, Some(&slot));
        self.finish(txn, &key, answer).await
    }

    pub async fn booking(
        &self,
        booking_id: &str,
        scope: BookingScope<'_>,
    ) -> Result<booking::Model, ServiceError> {
        let found = booking::Entity::find_by_id(booking_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?;
        match (found, scope) {
            (Some(b), BookingScope::Institution(own)) if b.institution_id != own => Err(
                ServiceError::NotFound("no such booking at this institution".into()),
            ),
            (Some(b), _) => Ok(b),
            (None, _) => Err(ServiceError::NotFound("no such booking".into())),
        }
    }

    pub async fn cancel_booking(
        &self,
        request_id: &str,
        booking_id: &str,
        scope: BookingScope<'_>,
    ) -> Result<pb::Booking, ServiceError> {
        // The caller's right to the booking first: a stored reply is not a way around it.
        let b = self.booking(booking_id, scope).await?;
        let key = format!("cancel:{booking_id}:{request_id}");
        if let Some(done) = self.replay(&key).await? {
            return Ok(done);
        }
        let now = Utc::now();
        let ended = slot::Entity::find_by_id(b.slot_id.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .is_none_or(|s| s.ends_at <= now);
        if ended {
            return Err(precondition(
                "BOOKING_ENDED",
                "the booking's slot has ended",
            ));
        }
        let txn = self.begin_write().await?;
        let open = [
            BookingState::AwaitingPayment as i32,
            BookingState::Confirmed as i32,
        ];
        let cancelled = booking::Entity::update_many()
            .col_expr(
                booking::Column::State,
                Expr::value(BookingState::Cancelled as i32),
            )
            .col_expr(
                booking::Column::OpenDay,
                Expr::value(sea_orm::Value::String(None)),
            )
            .col_expr(booking::Column::UpdatedAt, Expr::value(now))
            .filter(booking::Column::BookingId.eq(booking_id))
            .filter(booking::Column::State.is_in(open))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if cancelled.rows_affected == 0 {
            return Err(precondition(
                "BOOKING_NOT_OPEN",
                "the sample was already taken or the booking has ended",
            ));
        }
        free_place(&txn, &b.slot_id).await?;
        // A paid booking is refunded (the payments job sends it to the provider).
        payment::Entity::update_many()
            .col_expr(
                payment::Column::State,
                Expr::value(PaymentState::RefundPending as i32),
            )
            .col_expr(payment::Column::UpdatedAt, Expr::value(now))
            .filter(payment::Column::BookingId.eq(booking_id))
            .filter(payment::Column::State.eq(PaymentState::Succeeded as i32))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if let Some(notice_id) = &b.retest_notice_id {
            reopen_notice(&txn, notice_id).await?;
        }
        let b = booking::Model {
            state: BookingState::Cancelled as i32,
            open_day: None,
            updated_at: now,
            ..b
        };
        let slot = slot::Entity::find_by_id(b.slot_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?;
        let answer = booking_with_slot(&b, slot.as_ref());
        self.finish(txn, &key, answer).await
    }

    pub async fn list_bookings(
        &self,
        person_id: &str,
        (offset, limit): (u64, u64),
    ) -> Result<pb::ListMyBookingsResponse, ServiceError> {
        let rows = booking::Entity::find()
            .filter(booking::Column::PersonId.eq(person_id))
            .order_by_desc(booking::Column::CreatedAt)
            .order_by_desc(booking::Column::BookingId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let slots: HashMap<String, slot::Model> = slot::Entity::find()
            .filter(slot::Column::SlotId.is_in(rows.iter().map(|b| b.slot_id.clone())))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|s| (s.slot_id.clone(), s))
            .collect();
        Ok(pb::ListMyBookingsResponse {
            bookings: rows
                .iter()
                .take(limit as usize)
                .map(|b| booking_with_slot(b, slots.get(&b.slot_id)))
                .collect(),
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        })
    }

    // -----------------------------------------------------------------------------------
    // Payments

    fn provider(&self, kind: i32) -> Result<&std::sync::Arc<dyn PaymentGateway>, ServiceError> {
        self.providers.get(kind).ok_or_else(|| {
            precondition(
                "PROVIDER_NOT_CONFIGURED",
                "this payment provider is not configured in this deployment",
            )
        })
    }

    /// Starts paying; the payment id derives from the idempotency key, and the key is the
    /// provider's merchant reference, so neither side can charge one key twice.
    pub async fn start_payment(
        &self,
        idempotency_key: &str,
        booking_id: &str,
        provider_kind: i32,
    ) -> Result<pb::Payment, ServiceError> {
        if let Some(p) = payment::Entity::find()
            .filter(payment::Column::IdempotencyKey.eq(idempotency_key))
            .one(&self.db)
            .await
            .map_err(db_error)?
        {
            if p.booking_id != booking_id {
                return Err(ServiceError::invalid(
                    "idempotency_key",
                    "already used for another booking",
                ));
            }
            return Ok(payment_proto(&p));
        }
        let provider = self.provider(provider_kind)?.clone();
        let b = self.booking(booking_id, BookingScope::Any).await?;
        let now = Utc::now();
        if b.state != BookingState::AwaitingPayment as i32
            || b.payment_due_at.is_some_and(|due| due <= now)
        {
            return Err(precondition(
                "BOOKING_NOT_AWAITING_PAYMENT",
                "the booking is not waiting for payment (paid, cancelled or expired)",
            ));
        }
        let payment_id = derived_id(&format!("payment:{idempotency_key}"));
        // Another key's payment waiting for its outcome; a concurrent retry of this key
        // goes on and meets its twin at the insert.
        let in_progress = payment::Entity::find()
            .filter(payment::Column::BookingId.eq(booking_id))
            .filter(payment::Column::PaymentId.ne(payment_id.clone()))
            .filter(payment::Column::State.eq(PaymentState::Pending as i32))
            .count(&self.db)
            .await
            .map_err(db_error)?;
        if in_progress > 0 {
            return Err(precondition(
                "PAYMENT_IN_PROGRESS",
                "another payment of this booking is waiting for its outcome",
            ));
        }
        let order = provider
            .create_order(idempotency_key, &payment_id, b.price_fen)
            .await
            .map_err(|e| match e {
                ProviderError::Timeout | ProviderError::Unavailable => ServiceError::Unavailable(
                    "the payment provider did not answer; retry with the same idempotency key"
                        .into(),
                ),
            })?;
        let row = payment::Model {
            payment_id: payment_id.clone(),
            booking_id: booking_id.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            provider: provider_kind,
            amount_fen: b.price_fen,
            state: PaymentState::Pending as i32,
            provider_transaction_id: order.transaction_id,
            decline_reason: String::new(),
            client_parameters: serde_json::to_string(&order.client_parameters).unwrap_or_default(),
            created_at: now,
            updated_at: now,
        };
        let txn = self.begin_write().await?;
        let inserted = payment::Entity::insert(payment::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                // A concurrent retry with the same key inserted it first.
                txn.rollback().await.map_err(db_error)?;
                let p = payment::Entity::find_by_id(payment_id)
                    .one(&self.db)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| ServiceError::internal("payment vanished"))?;
                return Ok(payment_proto(&p));
            }
            other => {
                other.map_err(db_error)?;
            }
        }
        booking::Entity::update_many()
            .col_expr(booking::Column::PaymentId, Expr::value(payment_id))
            .col_expr(booking::Column::UpdatedAt, Expr::value(now))
            .filter(booking::Column::BookingId.eq(booking_id))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        Ok(payment_proto(&row))
    }

    pub async fn payment(&self, payment_id: &str) -> Result<pb::Payment, ServiceError> {
        payment::Entity::find_by_id(payment_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(|p| payment_proto(&p))
            .ok_or_else(|| ServiceError::NotFound("no such payment".into()))
    }

    /// A provider's notification: checked against the provider's signature, de-duplicated
    /// on its id, and applied in one transaction.
    pub async fn payment_callback(
        &self,
        provider_kind: i32,
        raw: &[u8],
        signature: &[u8],
        expected: &Notification,
    ) -> Result<pb::HandlePaymentCallbackResponse, ServiceError> {
        let provider = self.provider(provider_kind)?;
        if !provider.verify(raw, signature) {
            return Err(ServiceError::Unauthenticated(
                "the provider's signature over the notification does not verify".into(),
            ));
        }
        let Some(notice) = Notification::parse(raw) else {
            return Err(ServiceError::invalid(
                "raw_notification",
                "not a notification of this provider",
            ));
        };
        if &notice != expected {
            return Err(ServiceError::invalid(
                "raw_notification",
                "the fields differ from the signed notification",
            ));
        }
        let now = Utc::now();
        let txn = self.begin_write().await?;
        let p = payment::Entity::find_by_id(notice.payment_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such payment".into()))?;
        if p.provider != provider_kind {
            return Err(ServiceError::NotFound(
                "no such payment of this provider".into(),
            ));
        }
        if notice.amount_fen != p.amount_fen {
            return Err(ServiceError::invalid(
                "amount_fen",
                "does not match the payment's amount",
            ));
        }
        let first = payment_notification::Entity::insert(payment_notification::ActiveModel {
            key: Set(format!("{provider_kind}:{}", notice.notification_id)),
            payment_id: Set(p.payment_id.clone()),
            outcome: Set(notice.outcome),
            received_at: Set(now),
        })
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(payment_notification::Column::Key)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?
            > 0;
        if !first {
            txn.rollback().await.map_err(db_error)?;
            return Ok(pb::HandlePaymentCallbackResponse {
                payment: Some(self.payment(&p.payment_id).await?),
                duplicate: true,
            });
        }
        let b = booking::Entity::find_by_id(p.booking_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::internal("payment without booking"))?;
        let outcome = PaymentOutcome::try_from(notice.outcome).unwrap_or_default();
        let state = PaymentState::try_from(p.state).unwrap_or_default();
        let next = match (outcome, state) {
            (
                PaymentOutcome::Succeeded,
                PaymentState::Pending | PaymentState::Declined | PaymentState::TimedOut,
            ) => {
                let confirmed = booking::Entity::update_many()
                    .col_expr(
                        booking::Column::State,
                        Expr::value(BookingState::Confirmed as i32),
                    )
                    .col_expr(
                        booking::Column::PaymentId,
                        Expr::value(p.payment_id.clone()),
                    )
                    .col_expr(booking::Column::UpdatedAt, Expr::value(now))
                    .filter(booking::Column::BookingId.eq(b.booking_id.clone()))
                    .filter(booking::Column::State.eq(BookingState::AwaitingPayment as i32))
                    .filter(booking::Column::PaymentDueAt.gt(now))
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
                if confirmed.rows_affected == 1 {
                    PaymentState::Succeeded
                } else {
                    // Paid for a booking that expired, was cancelled or is paid already.
                    PaymentState::RefundPending
                }
            }
            (PaymentOutcome::Declined, PaymentState::Pending) => PaymentState::Declined,
            (PaymentOutcome::TimedOut, PaymentState::Pending) => PaymentState::TimedOut,
            (PaymentOutcome::Refunded, PaymentState::RefundPending | PaymentState::Succeeded) => {
                PaymentState::Refunded
            }
            (_, current) => current,
        };
        if next as i32 != p.state {
            let mut update = payment::Entity::update_many()
                .col_expr(payment::Column::State, Expr::value(next as i32))
                .col_expr(payment::Column::UpdatedAt, Expr::value(now))
                .filter(payment::Column::PaymentId.eq(p.payment_id.clone()))
                // Only from the state this decision read: a concurrent notification that
                // moved it first makes this one roll back and be retried by the provider.
                .filter(payment::Column::State.eq(p.state));
            if !notice.provider_transaction_id.is_empty() {
                update = update.col_expr(
                    payment::Column::ProviderTransactionId,
                    Expr::value(notice.provider_transaction_id.clone()),
                );
            }
            if outcome == PaymentOutcome::Declined {
                update = update.col_expr(
                    payment::Column::DeclineReason,
                    Expr::value(notice.decline_reason.chars().take(128).collect::<String>()),
                );
            }
            if update.exec(&txn).await.map_err(db_error)?.rows_affected == 0 {
                txn.rollback().await.map_err(db_error)?;
                return Err(ServiceError::Unavailable(
                    "another notification of this payment is being handled; retry".into(),
                ));
            }
        }
        txn.commit().await.map_err(db_error)?;
        Ok(pb::HandlePaymentCallbackResponse {
            payment: Some(self.payment(&p.payment_id).await?),
            duplicate: false,
        })
    }

    /// Expires unpaid bookings past their deadline and frees their places; returns how
    /// many expired. Each booking in its own transaction, guarded on its state.
    pub async fn expire_once(&self, limit: u64) -> Result<u64, ServiceError> {
        let now = Utc::now();
        let due = booking::Entity::find()
            .filter(booking::Column::State.eq(BookingState::AwaitingPayment as i32))
            .filter(booking::Column::PaymentDueAt.lte(now))
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut expired = 0;
        for b in due {
            let txn = self.begin_write().await?;
            let done = booking::Entity::update_many()
                .col_expr(
                    booking::Column::State,
                    Expr::value(BookingState::Expired as i32),
                )
                .col_expr(
                    booking::Column::OpenDay,
                    Expr::value(sea_orm::Value::String(None)),
                )
                .col_expr(booking::Column::UpdatedAt, Expr::value(now))
                .filter(booking::Column::BookingId.eq(b.booking_id.clone()))
                .filter(booking::Column::State.eq(BookingState::AwaitingPayment as i32))
                .exec(&txn)
                .await
                .map_err(db_error)?;
            if done.rows_affected == 1 {
                free_place(&txn, &b.slot_id).await?;
                payment::Entity::update_many()
                    .col_expr(
                        payment::Column::State,
                        Expr::value(PaymentState::TimedOut as i32),
                    )
                    .col_expr(payment::Column::UpdatedAt, Expr::value(now))
                    .filter(payment::Column::BookingId.eq(b.booking_id.clone()))
                    .filter(payment::Column::State.eq(PaymentState::Pending as i32))
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
                if let Some(notice_id) = &b.retest_notice_id {
                    reopen_notice(&txn, notice_id).await?;
                }
                expired += 1;
            }
            txn.commit().await.map_err(db_error)?;
        }
        Ok(expired)
    }

    /// Sends pending refunds to their providers (idempotent on the payment id there) and
    /// marks them refunded; a provider that fails is tried again next time.
    pub async fn refund_once(&self, limit: u64) -> Result<u64, ServiceError> {
        let pending = payment::Entity::find()
            .filter(payment::Column::State.eq(PaymentState::RefundPending as i32))
            .order_by_asc(payment::Column::UpdatedAt)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut refunded = 0;
        for p in pending {
            let Some(provider) = self.providers.get(p.provider) else {
                continue;
            };
            if let Err(err) = provider
                .refund(&p.provider_transaction_id, &p.payment_id, p.amount_fen)
                .await
            {
                tracing::warn!(payment_id = %p.payment_id, error = %err, "refund not sent");
                continue;
            }
            let done = payment::Entity::update_many()
                .col_expr(
                    payment::Column::State,
                    Expr::value(PaymentState::Refunded as i32),
                )
                .col_expr(payment::Column::UpdatedAt, Expr::value(Utc::now()))
                .filter(payment::Column::PaymentId.eq(p.payment_id.clone()))
                .filter(payment::Column::State.eq(PaymentState::RefundPending as i32))
                .exec(&self.db)
                .await
                .map_err(db_error)?;
            refunded += done.rows_affected;
        }
        Ok(refunded)
    }
}

pub(crate) fn institution_row(i: &pb::Institution) -> institution::ActiveModel {
    let location = i.location.unwrap_or_default();
    institution::ActiveModel {
        institution_id: Set(i.institution_id.clone()),
        licence_number: Set(i.licence_number.clone()),
        active: Set(i.active),
        lat: Set(location.latitude),
        lng: Set(location.longitude),
        division_code: Set(i.division_code.clone()),
        payload: Set(i.encode_to_vec()),
        updated_at: Set(Utc::now()),
    }
}

fn booking_with_slot(b: &booking::Model, slot: Option<&slot::Model>) -> pb::Booking {
    pb::Booking {
        booking_id: b.booking_id.clone(),
        person: Some(PersonRef {
            person_id: b.person_id.clone(),
        }),
        institution_id: b.institution_id.clone(),
        slot: slot.map(slot_proto),
        sample_kind: b.sample_kind,
        state: b.state,
        price_fen: b.price_fen,
        payment_due_at: b.payment_due_at.map(ts),
        payment_id: b.payment_id.clone().unwrap_or_default(),
        place_code: b.place_code.clone(),
        retest_notice_id: b.retest_notice_id.clone().unwrap_or_default(),
        created_at: Some(ts(b.created_at)),
        updated_at: Some(ts(b.updated_at)),
        check_in_payload: format!("{BOOKING_QR_PREFIX}{}", b.booking_id),
    }
}

async fn free_place(txn: &DatabaseTransaction, slot_id: &str) -> Result<(), ServiceError> {
    slot::Entity::update_many()
        .col_expr(slot::Column::Booked, Expr::col(slot::Column::Booked).sub(1))
        .filter(slot::Column::SlotId.eq(slot_id))
        .filter(slot::Column::Booked.gt(0))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}

async fn reopen_notice(txn: &DatabaseTransaction, notice_id: &str) -> Result<(), ServiceError> {
    retest_notice::Entity::update_many()
        .col_expr(
            retest_notice::Column::State,
            Expr::value(RetestNoticeState::Open as i32),
        )
        .col_expr(
            retest_notice::Column::BookingId,
            Expr::value(sea_orm::Value::String(None)),
        )
        .filter(retest_notice::Column::NoticeId.eq(notice_id))
        .filter(retest_notice::Column::State.eq(RetestNoticeState::Booked as i32))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(())
}
