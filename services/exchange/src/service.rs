//! The exchange's state: the partner registry, the records this province issues (numbered
//! 1, 2, 3... without gaps, from the risk service's color changes), the records received
//! from partners (checked, then stored with the partner's position in one transaction), and
//! the merged color computed from both.

use crate::records::{self, PartnerKey, RecordError};
use crate::store::ISSUED_COUNTER;
use crate::store::entities::*;
use chrono::{DateTime, Utc};
use healthcode_crypto::{SigningKey, VerifyingKey};
use healthcode_db::db_error;
use healthcode_db::replies::{begin_write, commit_with, load};
use healthcode_errors::ServiceError;
use healthcode_events::Relay;
use healthcode_proto::common::v1::{
    CodeColor, ItemError, PersonRef, PublicKey, ReasonCode, SignedEnvelope,
};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::identity::v1::{ExchangePseudonym, GetExchangePseudonymsRequest};
use healthcode_proto::risk::v1::PersonColor;
use healthcode_proto::time::{from_ts, ts};
use healthcode_server::outbound::{Outbound, OutboundError, lazy_channel, with_deadline};
use prost::Message;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

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

/// The longest partner cursor stored.
pub const MAX_CURSOR: usize = 256;

/// Records per page of PullChanges and of a Subscribe catch-up.
pub const MAX_PAGE: u64 = 1_000;
pub const DEFAULT_PAGE: u64 = 500;

pub struct Settings {
    /// This province (GB/T 2260).
    pub province: String,
    /// How long a Subscribe stream may stay silent before a heartbeat.
    pub heartbeat: Duration,
    /// Open Subscribe streams per partner.
    pub max_streams_per_partner: usize,
    /// Unary calls in flight per partner; beyond, RESOURCE_EXHAUSTED (one partner's burst
    /// does not take the others' capacity).
    pub max_calls_per_partner: usize,
    /// Deadline of every outbound call.
    pub upstream_timeout: Duration,
}

pub struct Exchange {
    pub(crate) db: DatabaseConnection,
    pub(crate) key: SigningKey,
    pub(crate) identity: Identity,
    pub(crate) settings: Settings,
    /// The latest sequence this process issued, for live streams (other replicas' records
    /// are found by polling).
    issued: watch::Sender<u64>,
    /// Open Subscribe streams per partner.
    streams: Mutex<HashMap<String, usize>>,
    /// Unary call permits per partner.
    calls: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Set when the service drains: open streams end, so that shutdown does not wait out
    /// the grace period.
    closing: watch::Sender<bool>,
    /// Publishes the records received (`RECEIVED_TOPIC`) from the outbox.
    relay: Relay,
}

/// Pseudonyms whose held records changed: a record received and stored, or a key that
/// signed some of them distrusted (payload `identity.v1.ExchangePseudonym`, without a
/// person; keyed by pseudonym). The `exchange-apply` consumer gives the risk service each
/// province's latest record about them, so that the gateway shows the merged color.
pub const RECEIVED_TOPIC: &str = "exchange.record_received";

/// Partner keys newly distrusted (payload `PartnerKey`, keyed by key id): the
/// `exchange-apply` consumer pages through the pseudonyms with a record under the key and
/// applies their held records again, which withdraws the key's decisions from the colors
/// shown.
pub const DISTRUSTED_TOPIC: &str = "exchange.key_distrusted";

/// The payload of [`RECEIVED_TOPIC`] for one pseudonym.
pub fn received_notice(pseudonym: &str, pseudonym_key_id: &str) -> (String, Vec<u8>) {
    let notice = ExchangePseudonym {
        person: None,
        pseudonym: pseudonym.to_owned(),
        pseudonym_key_id: pseudonym_key_id.to_owned(),
    };
    (pseudonym.to_owned(), notice.encode_to_vec())
}

fn precondition(reason: &str, message: impl Into<String>) -> ServiceError {
    ServiceError::precondition(reason, message)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, ServiceError> {
    M::decode(bytes).map_err(ServiceError::internal)
}

/// The opaque position after `sequence` in this province's records.
pub fn cursor(province: &str, sequence: u64) -> String {
    format!("v1.{province}.{sequence}")
}

/// Reads a cursor this province made; empty = before the first record.
pub fn parse_cursor(province: &str, cursor: &str) -> Result<u64, &'static str> {
    if cursor.is_empty() {
        return Ok(0);
    }
    let rest = cursor
        .strip_prefix("v1.")
        .and_then(|r| r.strip_prefix(province))
        .and_then(|r| r.strip_prefix('.'))
        .ok_or("is not a cursor of this province")?;
    rest.parse::<u64>()
        .map_err(|_| "is not a cursor of this province")
}

pub(crate) fn item_error(
    index: usize,
    item_id: String,
    code: tonic::Code,
    reason: &str,
    message: String,
) -> ItemError {
    ItemError {
        index: index as u32,
        item_id,
        code: code as i32,
        reason: reason.to_owned(),
        message,
    }
}

/// What a batch of received records did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ingested {
    pub received: u32,
    pub duplicates: u32,
    pub errors: Vec<ItemError>,
    /// The partner's highest sequence held without gap.
    pub acknowledged: u64,
    /// How many leading items were received or already held: a stream's cursor may move
    /// past those, and no further.
    pub settled_prefix: usize,
}

/// A partner as the registry holds it, keys included.
pub(crate) fn partner_message(p: &partner::Model, keys: &[partner_key::Model]) -> pb::Partner {
    pb::Partner {
        partner_id: p.partner_id.clone(),
        kind: p.kind,
        name: p.name.clone(),
        sync_mode: p.sync_mode,
        keys: keys
            .iter()
            .map(|k| pb::PartnerKey {
                key: Some(public_key(&k.key_id, &k.public_key)),
                revoked_at: k.revoked_at.map(ts),
                revoke_reason: k.revoke_reason.clone(),
                distrust_earlier: k.distrust_earlier,
            })
            .collect(),
        tls_client_certificate_pem: p.certificate_pem.clone(),
        tls_certificate_sha256: p.certificate_sha256.clone(),
        endpoint: p.endpoint.clone(),
        state: p.state,
        registered_at: Some(ts(p.registered_at)),
        updated_at: Some(ts(p.updated_at)),
    }
}

fn public_key(key_id: &str, sec1: &[u8]) -> healthcode_proto::common::v1::PublicKey {
    let pem = VerifyingKey::from_sec1(key_id, sec1)
        .and_then(|k| k.to_pem())
        .unwrap_or_default();
    healthcode_proto::common::v1::PublicKey {
        key_id: key_id.to_owned(),
        algorithm: "SM2".into(),
        public_key_sec1: sec1.to_vec(),
        public_key_pem: pem,
        not_before: None,
        not_after: None,
    }
}

/// A new partner as checked by the RPC layer: the certificate's fingerprint computed, the
/// keys parsed.
pub struct NewPartner {
    pub partner: pb::Partner,
    pub certificate_sha256: String,
    pub keys: Vec<VerifyingKey>,
}

/// Changes to a partner, each `Some` when named in the update mask.
#[derive(Default)]
pub struct PartnerChanges {
    pub name: Option<String>,
    pub sync_mode: Option<i32>,
    pub endpoint: Option<String>,
    pub certificate: Option<(String, String)>,
    pub state: Option<i32>,
}

impl Exchange {
    pub fn new(
        db: DatabaseConnection,
        key: SigningKey,
        identity: Identity,
        settings: Settings,
        relay: Relay,
    ) -> Self {
        Exchange {
            db,
            key,
            identity,
            settings,
            relay,
            issued: watch::channel(0).0,
            streams: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
        }
    }

    /// Ends every open Subscribe stream (the partners resume elsewhere from their cursors).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Whether `partner_id` may still stream: active, real-time, and still the holder of
    /// the certificate it connected with.
    async fn may_stream(&self, partner_id: &str, certificate: &str) -> Result<bool, ServiceError> {
        Ok(partner::Entity::find_by_id(partner_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .is_some_and(|p| {
                p.state == pb::PartnerState::Active as i32
                    && p.sync_mode == pb::SyncMode::RealTime as i32
                    && p.certificate_sha256 == certificate
            }))
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn province(&self) -> &str {
        &self.settings.province
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    // -----------------------------------------------------------------------------------
    // Partner registry

    async fn keys_of<C: ConnectionTrait>(
        db: &C,
        partner_id: &str,
    ) -> Result<Vec<partner_key::Model>, ServiceError> {
        partner_key::Entity::find()
            .filter(partner_key::Column::PartnerId.eq(partner_id))
            .order_by_asc(partner_key::Column::AddedAt)
            .order_by_asc(partner_key::Column::KeyId)
            .all(db)
            .await
            .map_err(db_error)
    }

    async fn message_of<C: ConnectionTrait>(
        db: &C,
        partner_id: &str,
    ) -> Result<pb::Partner, ServiceError> {
        let p = partner::Entity::find_by_id(partner_id.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such partner".into()))?;
        Ok(partner_message(&p, &Self::keys_of(db, partner_id).await?))
    }

    pub async fn partner(&self, partner_id: &str) -> Result<pb::Partner, ServiceError> {
        Self::message_of(&self.db, partner_id).await
    }

    /// The registered partner that presented the certificate with this fingerprint.
    pub async fn partner_by_certificate(
        &self,
        sha256: &str,
    ) -> Result<Option<partner::Model>, ServiceError> {
        partner::Entity::find()
            .filter(partner::Column::CertificateSha256.eq(sha256))
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    async fn refuse_used_keys(
        txn: &DatabaseTransaction,
        keys: &[VerifyingKey],
    ) -> Result<(), ServiceError> {
        let ids: Vec<String> = keys.iter().map(|k| k.key_id().to_owned()).collect();
        let used = partner_key::Entity::find()
            .filter(partner_key::Column::KeyId.is_in(ids))
            .one(txn)
            .await
            .map_err(db_error)?;
        if let Some(used) = used {
            return Err(ServiceError::conflict(
                "KEY_ID_IN_USE",
                format!(
                    "key id {} is registered already (key ids are unique across partners)",
                    used.key_id
                ),
            ));
        }
        Ok(())
    }

    async fn insert_keys(
        txn: &DatabaseTransaction,
        partner_id: &str,
        keys: &[VerifyingKey],
        now: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        for k in keys {
            partner_key::Entity::insert(partner_key::ActiveModel {
                key_id: Set(k.key_id().to_owned()),
                partner_id: Set(partner_id.to_owned()),
                public_key: Set(k.sec1_bytes()),
                added_at: Set(now),
                revoked_at: Set(None),
                revoke_reason: Set(String::new()),
                distrust_earlier: Set(false),
            })
            .exec_without_returning(txn)
            .await
            .map_err(|e| {
                conflict_on_unique(e, "KEY_ID_IN_USE", "the key id is registered already")
            })?;
        }
        Ok(())
    }

    async fn refuse_used_certificate(
        txn: &DatabaseTransaction,
        sha256: &str,
        partner_id: &str,
    ) -> Result<(), ServiceError> {
        let holder = partner::Entity::find()
            .filter(partner::Column::CertificateSha256.eq(sha256))
            .filter(partner::Column::PartnerId.ne(partner_id))
            .one(txn)
            .await
            .map_err(db_error)?;
        if holder.is_some() {
            return Err(ServiceError::conflict(
                "CERTIFICATE_IN_USE",
                "another partner is registered with this certificate",
            ));
        }
        Ok(())
    }

    pub async fn register_partner(
        &self,
        request_id: &str,
        new: NewPartner,
    ) -> Result<pb::Partner, ServiceError> {
        let reply_key = format!("register-partner:{request_id}");
        if let Some(answer) = load(&self.db, &reply_key).await.map_err(db_error)? {
            return Ok(answer);
        }
        let txn = begin_write(&self.db).await.map_err(db_error)?;
        if let Some(answer) = load(&txn, &reply_key).await.map_err(db_error)? {
            return Ok(answer);
        }
        let p = &new.partner;
        if partner::Entity::find_by_id(p.partner_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_some()
        {
            return Err(ServiceError::conflict(
                "PARTNER_EXISTS",
                format!("partner {} is registered already", p.partner_id),
            ));
        }
        Self::refuse_used_certificate(&txn, &new.certificate_sha256, &p.partner_id).await?;
        Self::refuse_used_keys(&txn, &new.keys).await?;
        let now = Utc::now();
        partner::Entity::insert(partner::ActiveModel {
            partner_id: Set(p.partner_id.clone()),
            kind: Set(p.kind),
            name: Set(p.name.clone()),
            sync_mode: Set(p.sync_mode),
            certificate_pem: Set(p.tls_client_certificate_pem.clone()),
            certificate_sha256: Set(new.certificate_sha256.clone()),
            endpoint: Set(p.endpoint.clone()),
            state: Set(p.state),
            registered_at: Set(now),
            updated_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(|e| {
            conflict_on_unique(
                e,
                "PARTNER_EXISTS",
                "the partner or its certificate is registered already",
            )
        })?;
        Self::insert_keys(&txn, &p.partner_id, &new.keys, now).await?;
        sync_state::Entity::insert(sync_state::ActiveModel {
            partner_id: Set(p.partner_id.clone()),
            inbound_sequence: Set(0),
            inbound_cursor: Set(String::new()),
            last_received_at: Set(None),
            inbound_lag_ms: Set(0),
            outbound_sequence: Set(0),
            last_contact_at: Set(None),
        })
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(sync_state::Column::PartnerId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        let answer = Self::message_of(&txn, &p.partner_id).await?;
        tracing::info!(partner = %p.partner_id, "partner registered");
        commit_with(&self.db, txn, &reply_key, answer)
            .await
            .map_err(db_error)
    }

    pub async fn update_partner(
        &self,
        partner_id: &str,
        changes: PartnerChanges,
    ) -> Result<pb::Partner, ServiceError> {
        let txn = begin_write(&self.db).await.map_err(db_error)?;
        let current = partner::Entity::find_by_id(partner_id.to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such partner".into()))?;
        let mut row: partner::ActiveModel = current.into();
        if let Some(name) = changes.name {
            row.name = Set(name);
        }
        if let Some(mode) = changes.sync_mode {
            row.sync_mode = Set(mode);
        }
        if let Some(endpoint) = changes.endpoint {
            row.endpoint = Set(endpoint);
        }
        if let Some(state) = changes.state {
            row.state = Set(state);
        }
        if let Some((pem, sha256)) = changes.certificate {
            Self::refuse_used_certificate(&txn, &sha256, partner_id).await?;
            row.certificate_pem = Set(pem);
            row.certificate_sha256 = Set(sha256);
        }
        row.updated_at = Set(Utc::now());
        partner::Entity::update(row).exec(&txn).await.map_err(|e| {
            conflict_on_unique(
                e,
                "CERTIFICATE_IN_USE",
                "another partner is registered with this certificate",
            )
        })?;
        let answer = Self::message_of(&txn, partner_id).await?;
        txn.commit().await.map_err(db_error)?;
        tracing::info!(partner = %partner_id, "partner updated");
        Ok(answer)
    }

    pub async fn list_partners(
        &self,
        kind: i32,
        sync_mode: i32,
        offset: u64,
        limit: u64,
    ) -> Result<pb::ListPartnersResponse, ServiceError> {
        let mut q = partner::Entity::find();
        if kind != 0 {
            q = q.filter(partner::Column::Kind.eq(kind));
        }
        if sync_mode != 0 {
            q = q.filter(partner::Column::SyncMode.eq(sync_mode));
        }
        let rows = q
            .order_by_asc(partner::Column::PartnerId)
            .offset(offset)
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let more = rows.len() as u64 > limit;
        let mut partners = Vec::new();
        for p in rows.iter().take(limit as usize) {
            partners.push(partner_message(
                p,
                &Self::keys_of(&self.db, &p.partner_id).await?,
            ));
        }
        Ok(pb::ListPartnersResponse {
            partners,
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        })
    }

    pub async fn add_partner_key(
        &self,
        request_id: &str,
        partner_id: &str,
        key: VerifyingKey,
    ) -> Result<pb::Partner, ServiceError> {
        let reply_key = format!("add-partner-key:{request_id}");
        let txn = begin_write(&self.db).await.map_err(db_error)?;
        if let Some(answer) = load(&txn, &reply_key).await.map_err(db_error)? {
            return Ok(answer);
        }
        Self::message_of(&txn, partner_id).await?;
        Self::refuse_used_keys(&txn, std::slice::from_ref(&key)).await?;
        Self::insert_keys(&txn, partner_id, std::slice::from_ref(&key), Utc::now()).await?;
        let answer = Self::message_of(&txn, partner_id).await?;
        tracing::info!(partner = %partner_id, key_id = %key.key_id(), "partner key added");
        commit_with(&self.db, txn, &reply_key, answer)
            .await
            .map_err(db_error)
    }

    pub async fn revoke_partner_key(
        &self,
        request_id: &str,
        partner_id: &str,
        key_id: &str,
        reason: &str,
        distrust_earlier: bool,
    ) -> Result<pb::Partner, ServiceError> {
        let reply_key = format!("revoke-partner-key:{request_id}");
        let txn = begin_write(&self.db).await.map_err(db_error)?;
        if let Some(answer) = load(&txn, &reply_key).await.map_err(db_error)? {
            return Ok(answer);
        }
        let key = partner_key::Entity::find_by_id(key_id.to_owned())
            .filter(partner_key::Column::PartnerId.eq(partner_id))
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such key of this partner".into()))?;
        let mut row: partner_key::ActiveModel = key.clone().into();
        // A second revocation keeps the first time; distrust only ever widens.
        row.revoked_at = Set(Some(key.revoked_at.unwrap_or_else(Utc::now)));
        row.revoke_reason = Set(reason.to_owned());
        row.distrust_earlier = Set(key.distrust_earlier || distrust_earlier);
        partner_key::Entity::update(row)
            .exec(&txn)
            .await
            .map_err(db_error)?;
        // Newly distrusted: announced in this transaction, so that the decisions the key
        // signed are withdrawn from the colors shown here (the consumer pages through the
        // persons concerned) and a crash misses none.
        let newly_distrusted = distrust_earlier && !key.distrust_earlier;
        if newly_distrusted {
            let notice = pb::PartnerKey {
                key: Some(PublicKey {
                    key_id: key_id.to_owned(),
                    ..Default::default()
                }),
                distrust_earlier: true,
                ..Default::default()
            };
            healthcode_events::outbox::enqueue(
                &txn,
                DISTRUSTED_TOPIC,
                key_id,
                notice.encode_to_vec(),
            )
            .await
            .map_err(db_error)?;
        }
        let answer = Self::message_of(&txn, partner_id).await?;
        tracing::warn!(
            partner = %partner_id,
            key_id = %key_id,
            distrust_earlier,
            "partner key revoked"
        );
        let answer = commit_with(&self.db, txn, &reply_key, answer)
            .await
            .map_err(db_error)?;
        if newly_distrusted {
            self.relay.wake();
        }
        Ok(answer)
    }

    // -----------------------------------------------------------------------------------
    // Calls from partners: limits

    /// A permit for one unary call of `partner_id`, or RESOURCE_EXHAUSTED.
    pub fn call_permit(
        &self,
        partner_id: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let semaphore = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls
                .entry(partner_id.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_calls_per_partner)))
                .clone()
        };
        semaphore
            .try_acquire_owned()
            .map_err(|_| ServiceError::ResourceExhausted {
                message: "too many calls in flight for this partner".into(),
                retry_after: Some(Duration::from_millis(200)),
            })
    }

    /// Counts an open Subscribe stream of `partner_id`; None when it has its maximum.
    fn open_stream(self: &Arc<Self>, partner_id: &str) -> Option<StreamGuard> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let open = streams.entry(partner_id.to_owned()).or_insert(0);
        if *open >= self.settings.max_streams_per_partner {
            return None;
        }
        *open += 1;
        Some(StreamGuard {
            exchange: self.clone(),
            partner_id: partner_id.to_owned(),
        })
    }

    fn live_streams(&self, partner_id: &str) -> usize {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.get(partner_id).copied().unwrap_or(0)
    }

    // -----------------------------------------------------------------------------------
    // Records this province issues

    /// Issues the records for a batch of the risk service's color changes: for each person
    /// whose latest version is newer than the last one considered and whose color, reasons
    /// or validity changed, the next sequence number, signed. One transaction: a batch
    /// redelivered after a crash issues nothing twice.
    pub async fn issue(&self, colors: &[PersonColor]) -> Result<u64, IssueError> {
        // The newest version of each person in the batch.
        let mut latest: BTreeMap<String, &PersonColor> = BTreeMap::new();
        for c in colors {
            let Some(person) = &c.person else { continue };
            // One malformed event must not hold up the batch (identity would refuse it).
            if !uuid::Uuid::parse_str(&person.person_id)
                .is_ok_and(|u| u.to_string() == person.person_id)
            {
                tracing::warn!("a color change without a canonical person id; skipped");
                continue;
            }
            let entry = latest.entry(person.person_id.clone()).or_insert(c);
            if c.version > entry.version {
                *entry = c;
            }
        }
        if latest.is_empty() {
            return Ok(0);
        }
        let persons: Vec<PersonRef> = latest
            .keys()
            .map(|id| PersonRef {
                person_id: id.clone(),
            })
            .collect();
        let answer = self
            .identity
            .clone()
            .get_exchange_pseudonyms(with_deadline(
                GetExchangePseudonymsRequest { persons },
                self.settings.upstream_timeout,
            ))
            .await
            .map_err(|s| IssueError::Identity(s.code(), s.message().to_owned()))?
            .into_inner();
        for e in &answer.errors {
            tracing::warn!(reason = %e.reason, "a color change names a person identity does not know; no record issued");
        }
        let pseudonyms: HashMap<String, (String, String)> = answer
            .pseudonyms
            .into_iter()
            .filter_map(|p| Some((p.person?.person_id, (p.pseudonym, p.pseudonym_key_id))))
            .collect();

        let txn = begin_write(&self.db).await?;
        // Taking the counter's row lock first orders this batch after any other issuer's.
        counter::Entity::update_many()
            .col_expr(counter::Column::Value, Expr::col(counter::Column::Value))
            .filter(counter::Column::Name.eq(ISSUED_COUNTER))
            .exec(&txn)
            .await?;
        let last = counter::Entity::find_by_id(ISSUED_COUNTER.to_owned())
            .one(&txn)
            .await?
            .map(|c| c.value)
            .unwrap_or(0);
        let seen: HashMap<String, issued_person::Model> = issued_person::Entity::find()
            .filter(issued_person::Column::PersonId.is_in(latest.keys().cloned()))
            .all(&txn)
            .await?
            .into_iter()
            .map(|p| (p.person_id.clone(), p))
            .collect();
        let now = Utc::now();
        let mut next = last;
        for (person_id, color) in &latest {
            let Some((pseudonym, key_id)) = pseudonyms.get(person_id) else {
                continue;
            };
            let previous = seen.get(person_id);
            if previous.is_some_and(|p| p.version >= color.version as i64) {
                continue;
            }
            let record = self.record_of(color, pseudonym, key_id, now);
            // What partners would refuse is never issued: it would stall every follower at
            // its sequence.
            let bad = records::violations(
                &pb::ExchangeRecord {
                    sequence: 1,
                    ..record.clone()
                },
                now,
            );
            if !bad.is_empty() {
                tracing::error!(fields = ?bad.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), "a color change that makes no valid record; none issued");
                continue;
            }
            let material = material(&record);
            let changed = previous.is_none_or(|p| p.material != material);
            let own_decision =
                record.color == CodeColor::Green as i32 || !record.reason_codes.is_empty();
            let mut last_sequence = previous.map(|p| p.last_sequence).unwrap_or(0);
            if changed && own_decision {
                next += 1;
                let record = pb::ExchangeRecord {
                    sequence: next as u64,
                    ..record
                };
                let signed = records::seal(&self.key, &record)
                    .map_err(|e| IssueError::Sign(e.to_string()))?;
                issued::Entity::insert(issued::ActiveModel {
                    sequence: Set(next),
                    pseudonym: Set(pseudonym.clone()),
                    envelope: Set(signed.envelope.unwrap_or_default().encode_to_vec()),
                    decided_at: Set(from_ts(&record.decided_at).unwrap_or(now)),
                })
                .exec_without_returning(&txn)
                .await?;
                last_sequence = next;
            }
            let row = issued_person::ActiveModel {
                person_id: Set(person_id.clone()),
                version: Set(color.version as i64),
                material: Set(if changed && own_decision {
                    material
                } else {
                    previous.map(|p| p.material.clone()).unwrap_or_default()
                }),
                last_sequence: Set(last_sequence),
            };
            issued_person::Entity::insert(row)
                .on_conflict(
                    sea_orm::sea_query::OnConflict::column(issued_person::Column::PersonId)
                        .update_columns([
                            issued_person::Column::Version,
                            issued_person::Column::Material,
                            issued_person::Column::LastSequence,
                        ])
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
        }
        if next > last {
            counter::Entity::update_many()
                .col_expr(counter::Column::Value, Expr::value(next))
                .filter(counter::Column::Name.eq(ISSUED_COUNTER))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        if next > last {
            self.issued.send_if_modified(|v| {
                let newer = (next as u64) > *v;
                if newer {
                    *v = next as u64;
                }
                newer
            });
        }
        Ok((next - last) as u64)
    }

    /// The record for `color` (without its sequence): this province's own decision
    /// (`local`, when other provinces' decisions are merged into the color). Reasons
    /// received from other provinces are not this province's decision and are not passed on.
    fn record_of(
        &self,
        color: &PersonColor,
        pseudonym: &str,
        key_id: &str,
        now: DateTime<Utc>,
    ) -> pb::ExchangeRecord {
        let (own_color, reasons, valid_until) = match &color.local {
            Some(l) => (l.color, &l.reasons, l.valid_until),
            None => (color.color, &color.reasons, color.valid_until),
        };
        let mut reason_codes: Vec<i32> = reasons
            .iter()
            .map(|r| r.code)
            .filter(|c| {
                *c != ReasonCode::OtherProvinceDecision as i32
                    && *c != ReasonCode::Unspecified as i32
            })
            .collect();
        reason_codes.dedup();
        reason_codes.truncate(records::MAX_REASONS);
        let decided_at = from_ts(&color.evaluated_at)
            .or_else(|| from_ts(&color.changed_at))
            .filter(|t| *t <= now)
            .unwrap_or(now);
        pb::ExchangeRecord {
            issuing_province: self.settings.province.clone(),
            sequence: 0,
            pseudonym: pseudonym.to_owned(),
            pseudonym_key_id: key_id.to_owned(),
            color: own_color,
            reason_codes,
            rule_version: color.policy_version.max(1),
            valid_until: valid_until.filter(|v| from_ts(&Some(*v)).is_some_and(|v| v > decided_at)),
            decided_at: Some(ts(decided_at)),
        }
    }

    /// The latest sequence issued.
    pub async fn latest_sequence(&self) -> Result<u64, ServiceError> {
        Ok(counter::Entity::find_by_id(ISSUED_COUNTER.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(|c| c.value.max(0) as u64)
            .unwrap_or(0))
    }

    /// Issued records after `after`, at most `limit`, in sequence order.
    pub async fn issued_after(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<Vec<(u64, pb::SignedRecord)>, ServiceError> {
        let rows = issued::Entity::find()
            .filter(issued::Column::Sequence.gt(after as i64))
            .order_by_asc(issued::Column::Sequence)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .map(|r| Ok((r.sequence as u64, signed_record(&r.envelope)?)))
            .collect()
    }

    /// Checks a partner's cursor against what this province has issued.
    pub async fn position(&self, cursor: &str) -> Result<(u64, u64), ServiceError> {
        let after = parse_cursor(&self.settings.province, cursor)
            .map_err(|e| ServiceError::invalid("cursor", e))?;
        let latest = self.latest_sequence().await?;
        if after > latest {
            return Err(ServiceError::OutOfRange(format!(
                "the cursor is at {after}, beyond the latest record issued ({latest}): this province's data may have been restored from an older backup"
            )));
        }
        Ok((after, latest))
    }

    /// Notes what a partner holds of this province's records (its cursor).
    pub async fn note_outbound(&self, partner_id: &str, holds: u64) -> Result<(), ServiceError> {
        self.note_contact(partner_id, Some(holds)).await
    }

    /// Notes contact with a partner, and what it holds when its cursor tells.
    async fn note_contact(&self, partner_id: &str, holds: Option<u64>) -> Result<(), ServiceError> {
        let mut update = sync_state::Entity::update_many().col_expr(
            sync_state::Column::LastContactAt,
            Expr::value(Some(Utc::now())),
        );
        if let Some(holds) = holds {
            update = update.col_expr(
                sync_state::Column::OutboundSequence,
                Expr::value(holds as i64),
            );
        }
        update
            .filter(sync_state::Column::PartnerId.eq(partner_id))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub async fn pull(
        &self,
        partner_id: &str,
        cursor_in: &str,
        max: u64,
    ) -> Result<pb::PullChangesResponse, ServiceError> {
        let (after, latest) = self.position(cursor_in).await?;
        self.note_outbound(partner_id, after).await?;
        let page = self.issued_after(after, max).await?;
        let last = page.last().map(|(s, _)| *s).unwrap_or(after);
        Ok(pb::PullChangesResponse {
            has_more: last < latest,
            next_cursor: cursor(&self.settings.province, last),
            records: page.into_iter().map(|(_, r)| r).collect(),
            latest_sequence: latest,
        })
    }

    /// The latest record this province issued about each pseudonym, in request order.
    pub async fn refresh_persons(
        &self,
        pseudonyms: &[String],
    ) -> Result<pb::RefreshPersonsResponse, ServiceError> {
        let mut wanted: Vec<&String> = pseudonyms.iter().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut latest: HashMap<String, issued::Model> = HashMap::new();
        for row in issued::Entity::find()
            .filter(issued::Column::Pseudonym.is_in(wanted.into_iter().cloned()))
            .all(&self.db)
            .await
            .map_err(db_error)?
        {
            match latest.get(&row.pseudonym) {
                Some(held) if held.sequence >= row.sequence => {}
                _ => {
                    latest.insert(row.pseudonym.clone(), row);
                }
            }
        }
        let mut out = pb::RefreshPersonsResponse::default();
        for (index, p) in pseudonyms.iter().enumerate() {
            match latest.get(p) {
                Some(row) => out.records.push(signed_record(&row.envelope)?),
                None => out.errors.push(item_error(
                    index,
                    p.clone(),
                    tonic::Code::NotFound,
                    "PERSON_NOT_DECIDED",
                    "this province issued no record about this person".into(),
                )),
            }
        }
        Ok(out)
    }

    /// Streams this province's records after `after` to `partner_id`, then live, with
    /// heartbeats; ends when the partner goes away. Each stream has its own bounded
    /// buffer: a slow partner waits on its own, the others are not slowed.
    pub fn subscribe(
        self: &Arc<Self>,
        partner_id: &str,
        certificate: &str,
        after: u64,
    ) -> Result<
        tokio::sync::mpsc::Receiver<Result<pb::SubscribeResponse, tonic::Status>>,
        ServiceError,
    > {
        let guard =
            self.open_stream(partner_id)
                .ok_or_else(|| ServiceError::ResourceExhausted {
                    message: "this partner has its maximum of open streams".into(),
                    retry_after: Some(Duration::from_secs(5)),
                })?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = self.clone();
        let partner_id = partner_id.to_owned();
        let certificate = certificate.to_owned();
        tokio::spawn(async move {
            let _guard = guard;
            this.stream_to(&partner_id, &certificate, after, tx).await;
        });
        Ok(rx)
    }

    async fn stream_to(
        &self,
        partner_id: &str,
        certificate: &str,
        mut after: u64,
        tx: tokio::sync::mpsc::Sender<Result<pb::SubscribeResponse, tonic::Status>>,
    ) {
        let province = self.settings.province.clone();
        let mut wake = self.issued.subscribe();
        let mut closing = self.closing.subscribe();
        let mut last_sent = tokio::time::Instant::now();
        let mut last_check = tokio::time::Instant::now();
        loop {
            // Shutdown, and at most once a second whether the partner may still stream: during
            // a long catch-up as much as when idle.
            if *closing.borrow() {
                let _ = tx
                    .send(Err(tonic::Status::unavailable(
                        "the service is restarting; resume from your cursor",
                    )))
                    .await;
                return;
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = tokio::time::Instant::now();
                match self.may_stream(partner_id, certificate).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(partner = %partner_id, "stream ended: the partner may no longer stream");
                        let _ = tx
                            .send(Err(ServiceError::precondition(
                                "NOT_ENTITLED",
                                "this partner is suspended, in manual mode, or presents another certificate",
                            )
                            .into()))
                            .await;
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(partner = %partner_id, error = %err, "stream check failed; ending the stream");
                        let _ = tx.send(Err(tonic::Status::unavailable("try again"))).await;
                        return;
                    }
                }
            }
            let page = match self.issued_after(after, DEFAULT_PAGE).await {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(partner = %partner_id, error = %err, "stream read failed; ending the stream");
                    let _ = tx.send(Err(tonic::Status::unavailable("try again"))).await;
                    return;
                }
            };
            let full = page.len() as u64 == DEFAULT_PAGE;
            for (sequence, record) in page {
                let item = pb::SubscribeResponse {
                    item: Some(pb::subscribe_response::Item::Record(record)),
                    cursor: cursor(&province, sequence),
                };
                // A partner that stops reading holds only its own task, and not past
                // shutdown.
                tokio::select! {
                    sent = tx.send(Ok(item)) => if sent.is_err() { return },
                    _ = closing.changed() => break,
                }
                after = sequence;
                last_sent = tokio::time::Instant::now();
            }
            if full {
                continue;
            }
            let heartbeat_at = last_sent + self.settings.heartbeat;
            tokio::select! {
                _ = wake.changed() => {}
                // Records committed by other replicas are found by polling.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tx.closed() => return,
                _ = closing.changed() => {}
            }
            if !*closing.borrow() && tokio::time::Instant::now() >= heartbeat_at {
                let latest = self.latest_sequence().await.unwrap_or(after);
                let item = pb::SubscribeResponse {
                    item: Some(pb::subscribe_response::Item::Heartbeat(pb::Heartbeat {
                        sent_at: Some(ts(Utc::now())),
                        latest_sequence: latest,
                    })),
                    cursor: cursor(&province, after),
                };
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
                // What the partner holds is known from its cursors, not from what was sent.
                let _ = self.note_contact(partner_id, None).await;
                last_sent = tokio::time::Instant::now();
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Records received from partners

    /// Checks and stores records of `partner_id`'s province, in order, with the partner's
    /// cursor after the last one settled (`cursors[i]` is the position after item `i`,
    /// when the records came from the partner's stream or pages). A refused record applies
    /// nothing; everything, position included, commits in one transaction.
    pub async fn ingest(
        &self,
        partner_id: &str,
        envelopes: &[SignedEnvelope],
        cursors: Option<&[String]>,
        page_cursor: Option<&str>,
    ) -> Result<Ingested, ServiceError> {
        let too_long = |c: &String| c.len() > MAX_CURSOR;
        if cursors.is_some_and(|c| c.iter().any(too_long))
            || page_cursor.is_some_and(|c| c.len() > MAX_CURSOR)
        {
            return Err(precondition(
                "PARTNER_CURSOR_TOO_LONG",
                format!("the partner's cursor is longer than {MAX_CURSOR} bytes"),
            ));
        }
        let now = Utc::now();
        let keys = self.keys_named(envelopes).await?;
        // Signatures and fields are checked before the transaction, off the async workers:
        // the partner's lock is held only to place sequences.
        let opened = open_all(envelopes, partner_id, keys, now).await?;
        let txn = begin_write(&self.db).await.map_err(db_error)?;
        // The partner's row lock: one batch of one partner at a time, in order.
        sync_state::Entity::update_many()
            .col_expr(
                sync_state::Column::InboundSequence,
                Expr::col(sync_state::Column::InboundSequence),
            )
            .filter(sync_state::Column::PartnerId.eq(partner_id))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let state = sync_state::Entity::find_by_id(partner_id.to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such partner".into()))?;
        let held_before = state.inbound_sequence.max(0) as u64;
        let mut batch = Placing {
            out: Ingested {
                acknowledged: held_before,
                ..Ingested::default()
            },
            pending: Vec::new(),
            placed: HashMap::new(),
        };
        let mut settled = true;
        // The cursor after the last settled item, with that item's sequence.
        let mut cursor_after: Option<(String, u64)> = None;
        let mut last_settled = 0u64;
        let mut last_decided: Option<DateTime<Utc>> = None;
        // The records stored, for the risk service (through the outbox, in this
        // transaction: a stored record is never lost to the merge).
        let mut received = Vec::new();
        for (index, (envelope, opened)) in envelopes.iter().zip(opened).enumerate() {
            let outcome = match opened {
                Err(refused) => Err(refused),
                Ok(record) => self
                    .place(&txn, &mut batch, index, envelope, &record, now)
                    .await?
                    .inspect(|(_, decided)| {
                        if decided.is_some() {
                            received
                                .push(received_notice(&record.pseudonym, &record.pseudonym_key_id));
                        }
                    }),
            };
            match outcome {
                Ok((sequence, decided)) => {
                    if let Some(decided) = decided {
                        last_decided = Some(decided);
                    }
                    if settled {
                        batch.out.settled_prefix = index + 1;
                        last_settled = sequence;
                        if let Some(c) = cursors.and_then(|c| c.get(index)) {
                            cursor_after = Some((c.clone(), sequence));
                        }
                    }
                }
                Err(error) => {
                    settled = false;
                    batch.out.errors.push(error);
                }
            }
        }
        let Placing { out, pending, .. } = batch;
        if !pending.is_empty() {
            inbound::Entity::insert_many(pending)
                .exec_without_returning(&txn)
                .await
                .map_err(db_error)?;
        }
        let stored = !received.is_empty();
        if stored {
            healthcode_events::outbox::enqueue_many(&txn, RECEIVED_TOPIC, received)
                .await
                .map_err(db_error)?;
        }
        if settled && let Some(c) = page_cursor {
            cursor_after = Some((c.to_owned(), last_settled.max(held_before)));
        }
        let mut row: sync_state::ActiveModel = state.into();
        row.inbound_sequence = Set(out.acknowledged as i64);
        // The saved cursor only moves forward: a lagging second stream or a page of records
        // already held must not take it back.
        if let Some((c, sequence)) = cursor_after
            && sequence >= held_before
        {
            row.inbound_cursor = Set(c);
        }
        if let Some(decided) = last_decided {
            row.last_received_at = Set(Some(now));
            row.inbound_lag_ms = Set((now - decided).num_milliseconds().max(0));
        }
        row.last_contact_at = Set(Some(now));
        sync_state::Entity::update(row)
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        if stored {
            self.relay.wake();
        }
        if !out.errors.is_empty() {
            tracing::warn!(
                partner = %partner_id,
                refused = out.errors.len(),
                first_reason = %out.errors[0].reason,
                "records refused"
            );
        }
        Ok(out)
    }

    /// Places one checked record: the next in sequence is stored; one already held is a
    /// duplicate (the same envelope) or refused (a different one); beyond the next is a gap.
    /// `Ok(Ok(Some(decided_at)))` when stored.
    async fn place(
        &self,
        txn: &DatabaseTransaction,
        batch: &mut Placing,
        index: usize,
        envelope: &SignedEnvelope,
        record: &pb::ExchangeRecord,
        now: DateTime<Utc>,
    ) -> Result<Result<(u64, Option<DateTime<Utc>>), ItemError>, ServiceError> {
        let sequence = record.sequence;
        let out = &mut batch.out;
        if sequence <= out.acknowledged {
            // The same record, even signed again (SM2 signatures differ each time, and keys
            // rotate), is a duplicate; another record under that sequence is not.
            let same = match batch.placed.get(&sequence) {
                Some(payload) => *payload == envelope.payload,
                None => {
                    inbound::Entity::find_by_id((record.issuing_province.clone(), sequence as i64))
                        .one(txn)
                        .await
                        .map_err(db_error)?
                        .is_some_and(|h| {
                            SignedEnvelope::decode(&h.envelope[..])
                                .is_ok_and(|e| e.payload == envelope.payload)
                        })
                }
            };
            if same {
                out.duplicates += 1;
                return Ok(Ok((sequence, None)));
            }
            return Ok(Err(item_error(
                index,
                sequence.to_string(),
                tonic::Code::AlreadyExists,
                "STALE_SEQUENCE",
                format!("a different record with sequence {sequence} is held already"),
            )));
        }
        if sequence > out.acknowledged + 1 {
            return Ok(Err(item_error(
                index,
                sequence.to_string(),
                tonic::Code::FailedPrecondition,
                "SEQUENCE_GAP",
                format!(
                    "expected sequence {}; resend from there",
                    out.acknowledged + 1
                ),
            )));
        }
        let decided = from_ts(&record.decided_at).unwrap_or(now);
        // Stored with the rest of the batch, in one statement, before the commit.
        batch.pending.push(inbound::ActiveModel {
            province: Set(record.issuing_province.clone()),
            sequence: Set(sequence as i64),
            pseudonym: Set(record.pseudonym.clone()),
            key_id: Set(envelope.key_id.clone()),
            envelope: Set(envelope.encode_to_vec()),
            decided_at: Set(decided),
            received_at: Set(now),
        });
        batch.placed.insert(sequence, envelope.payload.clone());
        out.acknowledged = sequence;
        out.received += 1;
        Ok(Ok((sequence, Some(decided))))
    }

    /// The registered keys the envelopes name, as `records::open` takes them.
    pub async fn keys_named(
        &self,
        envelopes: &[SignedEnvelope],
    ) -> Result<HashMap<String, PartnerKey>, ServiceError> {
        let key_ids: Vec<String> = envelopes.iter().map(|e| e.key_id.clone()).collect();
        Ok(partner_key::Entity::find()
            .filter(partner_key::Column::KeyId.is_in(key_ids))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .filter_map(|k| {
                let key = VerifyingKey::from_sec1(k.key_id.clone(), &k.public_key).ok()?;
                Some((
                    k.key_id.clone(),
                    PartnerKey {
                        province: k.partner_id,
                        key,
                        revoked_at: k.revoked_at,
                    },
                ))
            })
            .collect())
    }

    /// What this province answers a partner's national check: its own latest record about
    /// the person, if it decided one.
    pub async fn own_answer(
        &self,
        pseudonym: &str,
    ) -> Result<pb::NationalCheckResponse, ServiceError> {
        let found = self.refresh_persons(&[pseudonym.to_owned()]).await?;
        let now = Utc::now();
        let deciding = found
            .records
            .first()
            .and_then(|r| r.record.as_ref())
            .filter(|r| records::still_valid(r, true, now));
        Ok(pb::NationalCheckResponse {
            pseudonym: pseudonym.to_owned(),
            color: deciding
                .map(|r| r.color)
                .unwrap_or(CodeColor::Unspecified as i32),
            reason_codes: deciding.map(|r| r.reason_codes.clone()).unwrap_or_default(),
            errors: found
                .errors
                .into_iter()
                .map(|mut e| {
                    e.item_id = self.settings.province.clone();
                    e
                })
                .collect(),
            records: found.records,
            check_reference: String::new(),
        })
    }

    // -----------------------------------------------------------------------------------
    // Merged color

    /// The pseudonym of a person of this province, through identity.
    pub async fn pseudonym_of(&self, person_id: &str) -> Result<String, ServiceError> {
        let answer = self
            .identity
            .clone()
            .get_exchange_pseudonyms(with_deadline(
                GetExchangePseudonymsRequest {
                    persons: vec![PersonRef {
                        person_id: person_id.to_owned(),
                    }],
                },
                self.settings.upstream_timeout,
            ))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => precondition(
                    "PSEUDONYM_KEY_NOT_CONFIGURED",
                    "identity holds no national pseudonym key",
                ),
                _ => ServiceError::Unavailable("identity is not answering".into()),
            })?
            .into_inner();
        answer
            .pseudonyms
            .into_iter()
            .next()
            .map(|p| p.pseudonym)
            .ok_or_else(|| ServiceError::NotFound("no such person".into()))
    }

    /// Every province's latest record about `pseudonym` and the one that decides.
    pub async fn merged_color(
        &self,
        pseudonym: &str,
        now: DateTime<Utc>,
    ) -> Result<pb::MergedColor, ServiceError> {
        // (record, envelope, trusted, received_at)
        let mut held: Vec<(pb::ExchangeRecord, pb::SignedRecord, bool, DateTime<Utc>)> = Vec::new();
        if let Some(own) = issued::Entity::find()
            .filter(issued::Column::Pseudonym.eq(pseudonym))
            .order_by_desc(issued::Column::Sequence)
            .one(&self.db)
            .await
            .map_err(db_error)?
        {
            let signed = signed_record(&own.envelope)?;
            let record = signed.record.clone().unwrap_or_default();
            held.push((record, signed, true, own.decided_at));
        }
        let received = inbound::Entity::find()
            .filter(inbound::Column::Pseudonym.eq(pseudonym))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let distrusted = self.distrusted(&received).await?;
        for r in received {
            let signed = signed_record(&r.envelope)?;
            let record = signed.record.clone().unwrap_or_default();
            held.push((
                record,
                signed,
                !distrusted.contains(&r.key_id),
                r.received_at,
            ));
        }
        let refs: Vec<(&pb::ExchangeRecord, bool)> =
            held.iter().map(|(r, _, t, _)| (r, *t)).collect();
        let latest = records::latest_per_province(refs.iter().copied());
        let deciding = records::deciding(refs.iter().copied(), now);
        let provinces = latest
            .iter()
            .filter_map(|(record, trusted)| {
                let (_, signed, _, received_at) = held
                    .iter()
                    .find(|(r, _, t, _)| std::ptr::eq(r, *record) && t == trusted)?;
                Some(pb::ProvinceColor {
                    record: Some(signed.clone()),
                    still_valid: records::still_valid(record, *trusted, now),
                    received_at: Some(ts(*received_at)),
                })
            })
            .collect();
        Ok(pb::MergedColor {
            pseudonym: pseudonym.to_owned(),
            color: deciding
                .map(|r| r.color)
                .unwrap_or(CodeColor::Unspecified as i32),
            reason_codes: deciding.map(|r| r.reason_codes.clone()).unwrap_or_default(),
            deciding_province: deciding
                .map(|r| r.issuing_province.clone())
                .unwrap_or_default(),
            valid_until: deciding.and_then(|r| r.valid_until),
            provinces,
            evaluated_at: Some(ts(now)),
        })
    }

    // -----------------------------------------------------------------------------------
    // Sync status

    pub async fn sync_status(
        &self,
        partner_ids: &[String],
    ) -> Result<pb::ListSyncStatusResponse, ServiceError> {
        let mut q = partner::Entity::find();
        if !partner_ids.is_empty() {
            q = q.filter(partner::Column::PartnerId.is_in(partner_ids.iter().cloned()));
        }
        let partners = q
            .order_by_asc(partner::Column::PartnerId)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let latest = self.latest_sequence().await?;
        let states: HashMap<String, sync_state::Model> = sync_state::Entity::find()
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|s| (s.partner_id.clone(), s))
            .collect();
        let statuses = partners
            .into_iter()
            .map(|p| {
                let s = states.get(&p.partner_id);
                pb::SyncStatus {
                    partner_id: p.partner_id.clone(),
                    sync_mode: p.sync_mode,
                    inbound_sequence: s.map(|s| s.inbound_sequence.max(0) as u64).unwrap_or(0),
                    last_received_at: s.and_then(|s| s.last_received_at).map(ts),
                    inbound_lag: s.map(|s| prost_types::Duration {
                        seconds: s.inbound_lag_ms / 1000,
                        nanos: ((s.inbound_lag_ms % 1000) * 1_000_000) as i32,
                    }),
                    outbound_acknowledged_sequence: s
                        .map(|s| s.outbound_sequence.max(0) as u64)
                        .unwrap_or(0),
                    outbound_latest_sequence: latest,
                    subscribed: self.live_streams(&p.partner_id) > 0,
                    last_contact_at: s.and_then(|s| s.last_contact_at).map(ts),
                }
            })
            .collect();
        Ok(pb::ListSyncStatusResponse { statuses })
    }

    /// The partner's saved cursor into its own records.
    pub async fn inbound_cursor(&self, partner_id: &str) -> Result<String, ServiceError> {
        Ok(sync_state::Entity::find_by_id(partner_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(|s| s.inbound_cursor)
            .unwrap_or_default())
    }
}

/// A batch being placed: what it did so far, the rows to store, and the payloads placed
/// by sequence (a later item of the same batch may repeat one).
struct Placing {
    out: Ingested,
    pending: Vec<inbound::ActiveModel>,
    placed: HashMap<u64, Vec<u8>>,
}

/// Opens every envelope (signature, then fields, issuing province against `caller`) on
/// the blocking pool, split across the machine's cores.
async fn open_all(
    envelopes: &[SignedEnvelope],
    caller: &str,
    keys: HashMap<String, PartnerKey>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<pb::ExchangeRecord, ItemError>>, ServiceError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_task = envelopes.len().div_ceil(cores).max(64);
    let keys = Arc::new(keys);
    let mut tasks = Vec::new();
    for (chunk_index, chunk) in envelopes.chunks(per_task).enumerate() {
        let (chunk, keys, caller) = (chunk.to_vec(), keys.clone(), caller.to_owned());
        let first = chunk_index * per_task;
        tasks.push(tokio::task::spawn_blocking(move || {
            chunk
                .iter()
                .enumerate()
                .map(|(i, envelope)| {
                    records::open(envelope, Some(&caller), |id| keys.get(id).cloned(), now).map_err(
                        |err| {
                            let claimed = pb::ExchangeRecord::decode(&envelope.payload[..])
                                .map(|r| r.sequence.to_string())
                                .unwrap_or_default();
                            refusal(first + i, claimed, &err)
                        },
                    )
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut opened = Vec::with_capacity(envelopes.len());
    for task in tasks {
        opened.extend(task.await.map_err(ServiceError::internal)?);
    }
    Ok(opened)
}

/// Keeps the count of a partner's open streams right, however the stream ends.
struct StreamGuard {
    exchange: Arc<Exchange>,
    partner_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self
            .exchange
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&self.partner_id) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A unique index refused the write (a concurrent registration won): ALREADY_EXISTS with
/// `reason`, not INTERNAL.
fn conflict_on_unique(err: sea_orm::DbErr, reason: &str, message: &str) -> ServiceError {
    if healthcode_db::is_unique_violation(&err) {
        ServiceError::conflict(reason, message)
    } else {
        db_error(err)
    }
}

fn refusal(index: usize, item_id: String, err: &RecordError) -> ItemError {
    item_error(index, item_id, err.code(), err.reason(), err.to_string())
}

/// A stored envelope with its decoded record (ours, or checked on receipt).
impl Exchange {
    /// The key ids among those of `received` that are distrusted (revoked with
    /// `distrust_earlier`): their records no longer count.
    async fn distrusted(
        &self,
        received: &[inbound::Model],
    ) -> Result<std::collections::HashSet<String>, ServiceError> {
        let key_ids: std::collections::BTreeSet<&str> =
            received.iter().map(|r| r.key_id.as_str()).collect();
        Ok(partner_key::Entity::find()
            .filter(partner_key::Column::KeyId.is_in(key_ids))
            .filter(partner_key::Column::DistrustEarlier.eq(true))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|k| k.key_id)
            .collect())
    }

    /// Up to `limit` pseudonyms with a record signed by `key_id`, in order, after `after`.
    pub async fn pseudonyms_under_key(
        &self,
        key_id: &str,
        after: &str,
        limit: u64,
    ) -> Result<Vec<String>, ServiceError> {
        inbound::Entity::find()
            .select_only()
            .column(inbound::Column::Pseudonym)
            .distinct()
            .filter(inbound::Column::KeyId.eq(key_id))
            .filter(inbound::Column::Pseudonym.gt(after))
            .order_by_asc(inbound::Column::Pseudonym)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// For each of `pseudonyms`, the latest record each province sent about it, with
    /// whether its key is still trusted (the merge rule's view of what is held).
    pub async fn latest_received(
        &self,
        pseudonyms: &[String],
    ) -> Result<Vec<(pb::ExchangeRecord, bool)>, ServiceError> {
        let received = inbound::Entity::find()
            .filter(inbound::Column::Pseudonym.is_in(pseudonyms.iter().cloned()))
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let distrusted = self.distrusted(&received).await?;
        let mut by_pseudonym: BTreeMap<String, Vec<(pb::ExchangeRecord, bool)>> = BTreeMap::new();
        for r in received {
            let record = signed_record(&r.envelope)?.record.unwrap_or_default();
            by_pseudonym
                .entry(r.pseudonym)
                .or_default()
                .push((record, !distrusted.contains(&r.key_id)));
        }
        Ok(by_pseudonym
            .values()
            .flat_map(|held| {
                records::latest_per_province(held.iter().map(|(r, t)| (r, *t)))
                    .into_iter()
                    .map(|(r, t)| (r.clone(), t))
            })
            .collect())
    }
}

fn signed_record(envelope: &[u8]) -> Result<pb::SignedRecord, ServiceError> {
    let envelope: SignedEnvelope = decode(envelope)?;
    let record: pb::ExchangeRecord = decode(&envelope.payload)?;
    Ok(pb::SignedRecord {
        envelope: Some(envelope),
        record: Some(record),
    })
}

/// What a record states, apart from who and when: a new record is issued only when it
/// changes.
fn material(record: &pb::ExchangeRecord) -> Vec<u8> {
    let essence = pb::ExchangeRecord {
        color: record.color,
        reason_codes: record.reason_codes.clone(),
        valid_until: record.valid_until,
        pseudonym: record.pseudonym.clone(),
        ..Default::default()
    };
    healthcode_crypto::sm3_digest(&essence.encode_to_vec()).to_vec()
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("identity answered {0:?}: {1}")]
    Identity(tonic::Code, String),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("signing: {0}")]
    Sign(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_this_provinces_own() {
        assert_eq!(parse_cursor("330000", ""), Ok(0));
        assert_eq!(parse_cursor("330000", &cursor("330000", 42)), Ok(42));
        for foreign in [
            cursor("310000", 42),
            "v1.330000".into(),
            "v1.330000.".into(),
            "v1.330000.-1".into(),
            "v1.330000.4x".into(),
            "v2.330000.4".into(),
            "42".into(),
        ] {
            assert!(parse_cursor("330000", &foreign).is_err(), "{foreign}");
        }
    }

    #[test]
    fn material_ignores_who_and_when_but_not_what() {
        let base = pb::ExchangeRecord {
            issuing_province: "330000".into(),
            sequence: 1,
            pseudonym: "a".repeat(64),
            pseudonym_key_id: "national-1".into(),
            color: CodeColor::Red as i32,
            reason_codes: vec![ReasonCode::CloseContact as i32],
            rule_version: 1,
            valid_until: None,
            decided_at: Some(ts(Utc::now())),
        };
        let later = pb::ExchangeRecord {
            sequence: 9,
            decided_at: Some(ts(Utc::now() + chrono::Duration::hours(1))),
            rule_version: 2,
            ..base.clone()
        };
        assert_eq!(material(&base), material(&later));
        let green = pb::ExchangeRecord {
            color: CodeColor::Green as i32,
            ..base.clone()
        };
        let other_reason = pb::ExchangeRecord {
            reason_codes: vec![ReasonCode::HighRiskAreaStay as i32],
            ..base.clone()
        };
        let bounded = pb::ExchangeRecord {
            valid_until: Some(ts(Utc::now() + chrono::Duration::days(1))),
            ..base.clone()
        };
        for changed in [green, other_reason, bounded] {
            assert_ne!(material(&base), material(&changed));
        }
    }
}
