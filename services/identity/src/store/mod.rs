//! Persistence for identity. Personal fields are sealed with SM4-GCM before they reach a
//! query and opened after they leave one; nothing here ever sees a plaintext column.

pub mod entities;

use crate::domain::{Document, DocumentType, Image, Step, StepState, Steps};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use entities::{exchange_pseudonym, person, phone_challenge, review, sms_send, step};
use healthcode_crypto::{FieldCipher, PseudonymKey};
use healthcode_proto::identity::v1::ExchangePseudonym;
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] DbErr),
    /// A stored ciphertext does not open: a missing key or a tampered row.
    #[error("cannot open a sealed field: {0}")]
    Sealed(String),
}

/// Seals and opens personal fields. The associated data binds each ciphertext to its row
/// and column, so a ciphertext copied into another row does not open there.
#[derive(Clone)]
pub struct Sealer {
    cipher: Arc<FieldCipher>,
}

impl Sealer {
    pub fn new(cipher: Arc<FieldCipher>) -> Self {
        Sealer { cipher }
    }

    pub fn seal(&self, row: &str, field: &str, plaintext: &[u8]) -> Result<String, StoreError> {
        let sealed = self
            .cipher
            .encrypt(plaintext, aad(row, field).as_bytes())
            .map_err(|e| StoreError::Sealed(format!("{field}: {e}")))?;
        Ok(format!(
            "{}:{}",
            sealed.key_id,
            STANDARD.encode(sealed.ciphertext)
        ))
    }

    pub fn open(&self, row: &str, field: &str, stored: &str) -> Result<Vec<u8>, StoreError> {
        let (key_id, b64) = stored
            .split_once(':')
            .ok_or_else(|| StoreError::Sealed(format!("{field}: no key id")))?;
        let ciphertext = STANDARD
            .decode(b64)
            .map_err(|_| StoreError::Sealed(format!("{field}: not base64")))?;
        self.cipher
            .decrypt(key_id, &ciphertext, aad(row, field).as_bytes())
            .map_err(|e| StoreError::Sealed(format!("{field}: {e}")))
    }

    pub fn open_string(&self, row: &str, field: &str, stored: &str) -> Result<String, StoreError> {
        String::from_utf8(self.open(row, field, stored)?)
            .map_err(|_| StoreError::Sealed(format!("{field}: not UTF-8")))
    }
}

fn aad(row: &str, field: &str) -> String {
    format!("identity/{row}/{field}")
}

/// A person with their personal fields opened.
#[derive(Clone)]
pub struct PersonRecord {
    pub id: String,
    pub document: Document,
    pub name: String,
    pub english_name: Option<String>,
    pub phone: Option<String>,
    pub guardian_id: Option<String>,
    pub relationship: Option<i32>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct StepRow {
    pub step: Step,
    pub state: StepState,
    pub reason: String,
    pub updated_at: DateTime<Utc>,
}

/// A review and what its reviewer needs to see.
#[derive(Default)]
pub struct NewReview {
    pub reason: &'static str,
    pub passport_page: Option<Image>,
    pub visa_page: Option<Image>,
    pub live_image: Option<Image>,
}

pub struct NewPerson {
    pub id: String,
    pub document: Document,
    pub name: String,
    pub english_name: Option<String>,
    pub guardian: Option<(String, i32)>,
    pub request_id: Option<String>,
    pub identity_state: StepState,
    pub identity_reason: &'static str,
    pub review: Option<NewReview>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    Created,
    /// The same request was seen before: here is the person it created.
    Replayed(String),
    DuplicateDocument,
    /// The request id was used before for another document.
    RequestIdReused,
}

pub enum PhoneConfirmation {
    Confirmed,
    NoChallenge,
    Expired,
    AttemptsExhausted,
    WrongCode { attempts_left: u32 },
}

#[derive(Clone)]
pub struct ReviewRecord {
    pub id: i64,
    pub person_id: String,
    pub step: Step,
    pub reason: String,
    pub state: i32,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    pub note: Option<String>,
    pub passport_page: Option<Vec<u8>>,
    pub visa_page: Option<Vec<u8>>,
    pub live_image: Option<Vec<u8>>,
}

pub const REVIEW_PENDING: i32 = 1;
pub const REVIEW_APPROVED: i32 = 2;
pub const REVIEW_REJECTED: i32 = 3;

pub enum Decided {
    Done(Box<ReviewRecord>),
    NotFound,
    AlreadyDecided,
    /// The reviewed step is no longer waiting for review; nothing was decided.
    StepMoved,
}

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    sealer: Sealer,
    pseudonyms: Option<Arc<PseudonymKey>>,
    /// Set once every person registered before start has a pseudonym under the key.
    backfilled: Arc<std::sync::atomic::AtomicBool>,
    /// Publishes the outbox; woken after a registration commits.
    relay: Option<healthcode_events::Relay>,
}

/// The topic on which each registration publishes the new person's exchange pseudonym
/// (payload `ExchangePseudonym` without the person), so that records held before they
/// registered reach them.
pub const PSEUDONYM_TOPIC: &str = "identity.pseudonym_registered";

impl Store {
    pub fn new(db: DatabaseConnection, sealer: Sealer) -> Self {
        Store {
            db,
            sealer,
            pseudonyms: None,
            backfilled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            relay: None,
        }
    }

    /// Wakes `relay` after each registration that published something.
    pub fn with_relay(mut self, relay: healthcode_events::Relay) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Whether pseudonyms can be resolved completely (the start-up backfill is done).
    pub fn pseudonyms_ready(&self) -> bool {
        self.backfilled.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_pseudonyms_ready(&self) {
        self.backfilled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Keeps each person's exchange pseudonym under `key`, written with the person.
    pub fn with_pseudonym_key(mut self, key: Option<Arc<PseudonymKey>>) -> Self {
        self.pseudonyms = key;
        self
    }

    fn pseudonym_row(
        &self,
        person_id: &str,
        document: &Document,
    ) -> Option<exchange_pseudonym::Model> {
        self.pseudonyms
            .as_ref()
            .map(|key| exchange_pseudonym::Model {
                key_id: key.key_id().to_owned(),
                pseudonym: key.pseudonym(document.kind().code(), document.number()),
                person_id: person_id.to_owned(),
            })
    }

    /// Writes the pseudonyms of up to `limit` persons after `after` (by id) who have none
    /// under the current key (persons registered before the key was configured or
    /// rotated). Returns the last id looked at (`None` when there is none left) and how
    /// many persons could not be read (logged by count; their rows stay without one).
    pub async fn backfill_pseudonyms(
        &self,
        after: &str,
        limit: u64,
    ) -> Result<(Option<String>, usize), StoreError> {
        let Some(key) = &self.pseudonyms else {
            return Ok((None, 0));
        };
        let held = sea_orm::sea_query::Query::select()
            .column(exchange_pseudonym::Column::PersonId)
            .from(exchange_pseudonym::Entity)
            .and_where(exchange_pseudonym::Column::KeyId.eq(key.key_id()))
            .to_owned();
        let rows = person::Entity::find()
            .filter(person::Column::Id.gt(after))
            .filter(person::Column::Id.not_in_subquery(held))
            .order_by_asc(person::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let last = rows.last().map(|r| r.id.clone());
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = 0;
        for row in rows {
            match self.open_person(row) {
                Ok(person) => out.extend(
                    self.pseudonym_row(&person.id, &person.document)
                        .map(exchange_pseudonym::ActiveModel::from),
                ),
                Err(_) => unreadable += 1,
            }
        }
        if !out.is_empty() {
            exchange_pseudonym::Entity::insert_many(out)
                .on_conflict(
                    OnConflict::columns([
                        exchange_pseudonym::Column::KeyId,
                        exchange_pseudonym::Column::Pseudonym,
                        exchange_pseudonym::Column::PersonId,
                    ])
                    .do_nothing()
                    .to_owned(),
                )
                .exec_without_returning(&self.db)
                .await?;
        }
        Ok((last, unreadable))
    }

    /// The persons registered under these pseudonyms (made under `key_id`), as
    /// `(pseudonym, person_id)` pairs.
    pub async fn resolve_pseudonyms(
        &self,
        key_id: &str,
        pseudonyms: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(exchange_pseudonym::Entity::find()
            .filter(exchange_pseudonym::Column::KeyId.eq(key_id))
            .filter(exchange_pseudonym::Column::Pseudonym.is_in(pseudonyms.iter().cloned()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| (r.pseudonym, r.person_id))
            .collect())
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Inserts a person, their four steps and any review in one transaction. A duplicate
    /// document or request id leaves nothing behind.
    pub async fn insert_person(
        &self,
        new: NewPerson,
        doc_index: String,
        now: DateTime<Utc>,
    ) -> Result<Inserted, StoreError> {
        let id = new.id.clone();
        let txn = self.db.begin().await?;
        let person = person::ActiveModel {
            id: Set(id.clone()),
            doc_type: Set(new.document.kind().code()),
            doc_index: Set(doc_index.clone()),
            doc_number_ct: Set(self.sealer.seal(
                &id,
                "doc_number",
                new.document.number().as_bytes(),
            )?),
            issuing_country: Set(new.document.issuing_country().to_owned()),
            name_ct: Set(self.sealer.seal(&id, "name", new.name.as_bytes())?),
            english_name_ct: Set(new
                .english_name
                .as_ref()
                .map(|n| self.sealer.seal(&id, "english_name", n.as_bytes()))
                .transpose()?),
            phone_ct: Set(None),
            guardian_id: Set(new.guardian.as_ref().map(|g| g.0.clone())),
            relationship: Set(new.guardian.as_ref().map(|g| g.1)),
            request_id: Set(new.request_id.clone()),
            created_at: Set(now),
        };
        match person::Entity::insert(person).exec(&txn).await {
            Ok(_) => {}
            Err(err) if healthcode_db::is_unique_violation(&err) => {
                txn.rollback().await?;
                return self
                    .classify_duplicate(
                        &doc_index,
                        new.request_id.as_deref(),
                        new.guardian.as_ref(),
                    )
                    .await;
            }
            Err(err) => return Err(err.into()),
        }
        let steps = step::Entity::insert_many(Step::ALL.into_iter().map(|s| {
            let (state, reason) = if s == Step::IdentityDetails {
                (new.identity_state, new.identity_reason)
            } else {
                (StepState::NotStarted, "")
            };
            step::ActiveModel {
                person_id: Set(id.clone()),
                step: Set(s.code()),
                state: Set(state.code()),
                reason: Set(reason.to_owned()),
                updated_at: Set(now),
            }
        }));
        steps.exec(&txn).await?;
        let published = self.pseudonym_row(&id, &new.document);
        if let Some(row) = &published {
            exchange_pseudonym::Entity::insert(exchange_pseudonym::ActiveModel::from(row.clone()))
                .exec_without_returning(&txn)
                .await?;
            // The pseudonym alone: the mapping to a person stays with ResolveExchangePseudonyms
            // (role `exchange`), not on a bus every service reads.
            let event = ExchangePseudonym {
                person: None,
                pseudonym: row.pseudonym.clone(),
                pseudonym_key_id: row.key_id.clone(),
            };
            healthcode_events::outbox::enqueue(&txn, PSEUDONYM_TOPIC, &id, event.encode_to_vec())
                .await?;
        }
        if let Some(r) = new.review {
            self.insert_review(&txn, &id, Step::IdentityDetails, r, now)
                .await?;
        }
        txn.commit().await?;
        if published.is_some()
            && let Some(relay) = &self.relay
        {
            relay.wake();
        }
        Ok(Inserted::Created)
    }

    async fn classify_duplicate(
        &self,
        doc_index: &str,
        request_id: Option<&str>,
        guardian: Option<&(String, i32)>,
    ) -> Result<Inserted, StoreError> {
        if let Some(request_id) = request_id
            && let Some(existing) = person::Entity::find()
                .filter(person::Column::RequestId.eq(request_id))
                .one(&self.db)
                .await?
        {
            // A retry is the same request: same document, same guardian, same relationship.
            let same_guardian = existing.guardian_id.as_ref() == guardian.map(|g| &g.0)
                && existing.relationship == guardian.map(|g| g.1);
            return Ok(if existing.doc_index == doc_index && same_guardian {
                Inserted::Replayed(existing.id)
            } else {
                Inserted::RequestIdReused
            });
        }
        Ok(Inserted::DuplicateDocument)
    }

    async fn insert_review<C: ConnectionTrait>(
        &self,
        conn: &C,
        person_id: &str,
        step: Step,
        review: NewReview,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let row = review::ActiveModel {
            person_id: Set(person_id.to_owned()),
            step: Set(step.code()),
            reason: Set(review.reason.to_owned()),
            state: Set(REVIEW_PENDING),
            created_at: Set(now),
            decided_at: Set(None),
            decided_by: Set(None),
            note_ct: Set(None),
            passport_page_ct: Set(review
                .passport_page
                .map(|i| self.sealer.seal(person_id, "passport_page", i.bytes()))
                .transpose()?),
            visa_page_ct: Set(review
                .visa_page
                .map(|i| self.sealer.seal(person_id, "visa_page", i.bytes()))
                .transpose()?),
            live_image_ct: Set(review
                .live_image
                .map(|i| self.sealer.seal(person_id, "live_image", i.bytes()))
                .transpose()?),
            ..Default::default()
        };
        review::Entity::insert(row).exec(conn).await?;
        Ok(())
    }

    pub async fn find_by_doc_index(&self, doc_index: &str) -> Result<Option<String>, StoreError> {
        Ok(person::Entity::find()
            .filter(person::Column::DocIndex.eq(doc_index))
            .one(&self.db)
            .await?
            .map(|p| p.id))
    }

    fn open_person(&self, row: person::Model) -> Result<PersonRecord, StoreError> {
        let id = row.id.clone();
        let kind = DocumentType::from_code(row.doc_type)
            .ok_or_else(|| StoreError::Sealed("unknown document type".into()))?;
        let number = self
            .sealer
            .open_string(&id, "doc_number", &row.doc_number_ct)?;
        Ok(PersonRecord {
            document: Document::from_stored(kind, number, row.issuing_country),
            name: self.sealer.open_string(&id, "name", &row.name_ct)?,
            english_name: row
                .english_name_ct
                .map(|ct| self.sealer.open_string(&id, "english_name", &ct))
                .transpose()?,
            phone: row
                .phone_ct
                .map(|ct| self.sealer.open_string(&id, "phone", &ct))
                .transpose()?,
            guardian_id: row.guardian_id,
            relationship: row.relationship,
            created_at: row.created_at,
            id,
        })
    }

    pub async fn person(&self, id: &str) -> Result<Option<PersonRecord>, StoreError> {
        person::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .map(|row| self.open_person(row))
            .transpose()
    }

    pub async fn dependents(&self, guardian_id: &str) -> Result<Vec<PersonRecord>, StoreError> {
        person::Entity::find()
            .filter(person::Column::GuardianId.eq(guardian_id))
            .order_by_asc(person::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| self.open_person(row))
            .collect()
    }

    pub async fn steps(&self, person_id: &str) -> Result<(Steps, Vec<StepRow>), StoreError> {
        let rows = step::Entity::find()
            .filter(step::Column::PersonId.eq(person_id))
            .order_by_asc(step::Column::Step)
            .all(&self.db)
            .await?;
        let mut steps = Steps::default();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (Some(s), Some(state)) =
                (Step::from_code(row.step), StepState::from_code(row.state))
            else {
                return Err(StoreError::Sealed("unknown step or state code".into()));
            };
            steps = steps.with(s, state);
            out.push(StepRow {
                step: s,
                state,
                reason: row.reason,
                updated_at: row.updated_at,
            });
        }
        Ok((steps, out))
    }

    /// Moves a step to `to` only if it is still in one of `from`; false if another request
    /// moved it first.
    async fn move_step<C: ConnectionTrait>(
        conn: &C,
        person_id: &str,
        s: Step,
        from: &[StepState],
        to: StepState,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let result = step::Entity::update_many()
            .col_expr(step::Column::State, Expr::value(to.code()))
            .col_expr(step::Column::Reason, Expr::value(reason))
            .col_expr(step::Column::UpdatedAt, Expr::value(now))
            .filter(step::Column::PersonId.eq(person_id))
            .filter(step::Column::Step.eq(s.code()))
            .filter(step::Column::State.is_in(from.iter().map(|f| f.code())))
            .exec(conn)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// Records a provider outcome for a step that may be attempted, queueing a review when
    /// the outcome asks for one.
    pub async fn record_outcome(
        &self,
        person_id: &str,
        s: Step,
        to: StepState,
        reason: &'static str,
        review_image: Option<Image>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let from = [
            StepState::NotStarted,
            StepState::InProgress,
            StepState::Failed,
        ];
        if !Self::move_step(&txn, person_id, s, &from, to, reason, now).await? {
            txn.rollback().await?;
            return Ok(false);
        }
        if to == StepState::PendingReview {
            let review = NewReview {
                reason,
                live_image: review_image,
                ..NewReview::default()
            };
            self.insert_review(&txn, person_id, s, review, now).await?;
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Replaces any earlier phone challenge and marks the phone step in progress.
    pub async fn save_phone_challenge(
        &self,
        person_id: &str,
        phone: &str,
        code_mac: String,
        expires_at: DateTime<Utc>,
        attempts: u32,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let from = [
            StepState::NotStarted,
            StepState::InProgress,
            StepState::Failed,
        ];
        if !Self::move_step(
            &txn,
            person_id,
            Step::Phone,
            &from,
            StepState::InProgress,
            "",
            now,
        )
        .await?
        {
            txn.rollback().await?;
            return Ok(false);
        }
        phone_challenge::Entity::delete_by_id(person_id.to_owned())
            .exec(&txn)
            .await?;
        phone_challenge::ActiveModel {
            person_id: Set(person_id.to_owned()),
            phone_ct: Set(self
                .sealer
                .seal(person_id, "challenge_phone", phone.as_bytes())?),
            code_mac: Set(code_mac),
            expires_at: Set(expires_at),
            attempts_left: Set(attempts as i32),
            created_at: Set(now),
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Checks a code against the saved challenge. An attempt is spent first, atomically,
    /// so concurrent guesses cannot share one; a wrong code keeps it spent, and the right
    /// one sets the phone and passes the step in the same transaction.
    pub async fn confirm_phone(
        &self,
        person_id: &str,
        code_matches: impl FnOnce(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Result<PhoneConfirmation, StoreError> {
        let txn = self.db.begin().await?;
        let spent = phone_challenge::Entity::update_many()
            .col_expr(
                phone_challenge::Column::AttemptsLeft,
                Expr::col(phone_challenge::Column::AttemptsLeft).sub(1),
            )
            .filter(phone_challenge::Column::PersonId.eq(person_id))
            .filter(phone_challenge::Column::AttemptsLeft.gt(0))
            .filter(phone_challenge::Column::ExpiresAt.gt(now))
            .exec(&txn)
            .await?;
        let challenge = phone_challenge::Entity::find_by_id(person_id.to_owned())
            .one(&txn)
            .await?;
        let Some(challenge) = challenge else {
            txn.rollback().await?;
            return Ok(PhoneConfirmation::NoChallenge);
        };
        if spent.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(if challenge.expires_at <= now {
                PhoneConfirmation::Expired
            } else {
                PhoneConfirmation::AttemptsExhausted
            });
        }
        if !code_matches(&challenge.code_mac) {
            txn.commit().await?;
            return Ok(PhoneConfirmation::WrongCode {
                attempts_left: Ord::max(challenge.attempts_left, 0) as u32,
            });
        }
        let phone = self
            .sealer
            .open(person_id, "challenge_phone", &challenge.phone_ct)?;
        phone_challenge::Entity::delete_by_id(person_id.to_owned())
            .exec(&txn)
            .await?;
        person::Entity::update_many()
            .col_expr(
                person::Column::PhoneCt,
                Expr::value(self.sealer.seal(person_id, "phone", &phone)?),
            )
            .filter(person::Column::Id.eq(person_id))
            .exec(&txn)
            .await?;
        let moved = Self::move_step(
            &txn,
            person_id,
            Step::Phone,
            &[StepState::InProgress],
            StepState::Passed,
            "",
            now,
        )
        .await?;
        if !moved {
            txn.rollback().await?;
            return Ok(PhoneConfirmation::NoChallenge);
        }
        txn.commit().await?;
        Ok(PhoneConfirmation::Confirmed)
    }

    /// Records that a code was sent to the phone with this blind index.
    pub async fn record_sms_send(
        &self,
        phone_index: &str,
        person_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sms_send::ActiveModel {
            phone_index: Set(phone_index.to_owned()),
            person_id: Set(person_id.to_owned()),
            sent_at: Set(now),
            ..Default::default()
        }
        .insert(&self.db)
        .await?;
        Ok(())
    }

    /// Codes sent since `since` to this phone, and to this person.
    pub async fn sms_sends_since(
        &self,
        phone_index: &str,
        person_id: &str,
        since: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        let to_phone = sms_send::Entity::find()
            .filter(sms_send::Column::PhoneIndex.eq(phone_index))
            .filter(sms_send::Column::SentAt.gt(since))
            .count(&self.db)
            .await?;
        let to_person = sms_send::Entity::find()
            .filter(sms_send::Column::PersonId.eq(person_id))
            .filter(sms_send::Column::SentAt.gt(since))
            .count(&self.db)
            .await?;
        Ok((to_phone, to_person))
    }

    pub async fn dependent_count(&self, guardian_id: &str) -> Result<u64, StoreError> {
        Ok(person::Entity::find()
            .filter(person::Column::GuardianId.eq(guardian_id))
            .count(&self.db)
            .await?)
    }

    fn open_review(&self, row: review::Model) -> Result<ReviewRecord, StoreError> {
        let step = Step::from_code(row.step)
            .ok_or_else(|| StoreError::Sealed("unknown step code".into()))?;
        Ok(ReviewRecord {
            passport_page: row
                .passport_page_ct
                .map(|ct| self.sealer.open(&row.person_id, "passport_page", &ct))
                .transpose()?,
            visa_page: row
                .visa_page_ct
                .map(|ct| self.sealer.open(&row.person_id, "visa_page", &ct))
                .transpose()?,
            live_image: row
                .live_image_ct
                .map(|ct| self.sealer.open(&row.person_id, "live_image", &ct))
                .transpose()?,
            note: row
                .note_ct
                .map(|ct| {
                    self.sealer
                        .open_string(&row.person_id, &format!("review_note/{}", row.id), &ct)
                })
                .transpose()?,
            id: row.id,
            person_id: row.person_id,
            step,
            reason: row.reason,
            state: row.state,
            created_at: row.created_at,
            decided_at: row.decided_at,
            decided_by: row.decided_by,
        })
    }

    pub async fn review(&self, id: i64) -> Result<Option<ReviewRecord>, StoreError> {
        review::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(|row| self.open_review(row))
            .transpose()
    }

    pub async fn reviews(
        &self,
        state: i32,
        after_id: i64,
        limit: u64,
    ) -> Result<Vec<ReviewRecord>, StoreError> {
        review::Entity::find()
            .filter(review::Column::State.eq(state))
            .filter(review::Column::Id.gt(after_id))
            .order_by_asc(review::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| self.open_review(row))
            .collect()
    }

    /// Decides a pending review and moves its step, in one transaction. The attached
    /// images are deleted with the decision. Deciding again the same way, as the same
    /// reviewer, returns the decision (a retry); anything else on a decided review is refused.
    pub async fn decide_review(
        &self,
        id: i64,
        approve: bool,
        decided_by: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> Result<Decided, StoreError> {
        let state = if approve {
            REVIEW_APPROVED
        } else {
            REVIEW_REJECTED
        };
        let Some(person_id) = review::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(|r| r.person_id)
        else {
            return Ok(Decided::NotFound);
        };
        let note_ct =
            self.sealer
                .seal(&person_id, &format!("review_note/{id}"), note.as_bytes())?;
        let txn = self.db.begin().await?;
        // The conditional write comes first: it takes the row (or, on SQLite, the database)
        // before anything is read, so two reviewers cannot both decide.
        let updated = review::Entity::update_many()
            .col_expr(review::Column::State, Expr::value(state))
            .col_expr(review::Column::DecidedAt, Expr::value(Some(now)))
            .col_expr(
                review::Column::DecidedBy,
                Expr::value(Some(decided_by.to_owned())),
            )
            .col_expr(review::Column::NoteCt, Expr::value(Some(note_ct)))
            .col_expr(
                review::Column::PassportPageCt,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                review::Column::VisaPageCt,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                review::Column::LiveImageCt,
                Expr::value(Option::<String>::None),
            )
            .filter(review::Column::Id.eq(id))
            .filter(review::Column::State.eq(REVIEW_PENDING))
            .exec(&txn)
            .await?;
        let row = review::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::Db(DbErr::RecordNotFound("review".into())))?;
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            let retry = row.state == state && row.decided_by.as_deref() == Some(decided_by);
            return Ok(if retry {
                Decided::Done(Box::new(self.open_review(row)?))
            } else {
                Decided::AlreadyDecided
            });
        }
        let step = Step::from_code(row.step)
            .ok_or_else(|| StoreError::Sealed("unknown step code".into()))?;
        let to = if approve {
            StepState::Passed
        } else {
            StepState::Failed
        };
        let reason = if approve { "" } else { "REVIEW_REJECTED" };
        let moved = Self::move_step(
            &txn,
            &row.person_id,
            step,
            &[StepState::PendingReview],
            to,
            reason,
            now,
        )
        .await?;
        if !moved {
            txn.rollback().await?;
            return Ok(Decided::StepMoved);
        }
        txn.commit().await?;
        Ok(Decided::Done(Box::new(self.open_review(row)?)))
    }
}
