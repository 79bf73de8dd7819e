//! The identity use cases: what each call does, between the RPC edge and the store.

use crate::domain::{
    CardNumber, Document, DocumentType, EnglishName, Image, PersonName, PhoneCode, PhoneNumber,
    Step, StepError, StepState, Steps,
};
use crate::providers::{BankCardOutcome, ProviderError, Providers};
use crate::store::{
    Decided, Inserted, NewPerson, NewReview, PersonRecord, PhoneConfirmation, ReviewRecord,
    StepRow, Store, StoreError,
};
use chrono::{DateTime, Utc};
use healthcode_cache::SharedCache;
use healthcode_crypto::{BlindIndex, SigningKey};
use healthcode_errors::ServiceError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        match &err {
            // The database is away or saturated: the caller may retry; nothing was applied.
            StoreError::Db(sea_orm::DbErr::ConnectionAcquire(_) | sea_orm::DbErr::Conn(_)) => {
                tracing::warn!(error = %err, "database unavailable");
                ServiceError::Unavailable("the database is unavailable; retry later".into())
            }
            _ => ServiceError::internal(err),
        }
    }
}

impl From<StepError> for ServiceError {
    fn from(err: StepError) -> Self {
        ServiceError::precondition(err.reason(), err.to_string())
    }
}

fn provider_error(err: ProviderError) -> ServiceError {
    match err {
        ProviderError::Unavailable(_) => ServiceError::Unavailable(
            "the verification provider is unavailable; retry later".into(),
        ),
        ProviderError::Rejected(_) => ServiceError::precondition(
            "PROVIDER_REJECTED",
            "the provider refused this input; check it and try again",
        ),
    }
}

#[derive(Debug, Clone)]
pub struct PhonePolicy {
    pub code_ttl: Duration,
    pub attempts: u32,
    /// Codes one phone number may be sent per hour (SMS bombing, SMS cost). A person may be
    /// sent twice as many, across numbers, before their attempts run out for the hour.
    pub codes_per_hour: u64,
}

impl Default for PhonePolicy {
    fn default() -> Self {
        PhonePolicy {
            code_ttl: Duration::from_secs(300),
            attempts: 5,
            codes_per_hour: 5,
        }
    }
}

/// What a registration asks for, already parsed.
pub struct Registration {
    pub request_id: Option<String>,
    pub document: Document,
    pub name: PersonName,
    pub english_name: Option<EnglishName>,
    pub passport_data_page: Option<Image>,
    pub visa_page: Option<Image>,
}

pub struct StatusView {
    pub person_id: String,
    pub steps: Vec<StepRow>,
    pub verified: bool,
    pub level: u32,
    pub guardian_id: Option<String>,
    /// (attestation JSON, SM2 signature, key id) when verified.
    pub attestation: Option<(Vec<u8>, Vec<u8>, String)>,
}

pub struct Identity {
    store: Store,
    cache: SharedCache,
    providers: Providers,
    index: Arc<BlindIndex>,
    signer: Arc<SigningKey>,
    phone_policy: PhonePolicy,
    provider_timeout: Duration,
}

impl Identity {
    pub fn new(
        store: Store,
        cache: SharedCache,
        providers: Providers,
        index: Arc<BlindIndex>,
        signer: Arc<SigningKey>,
        phone_policy: PhonePolicy,
    ) -> Self {
        Identity {
            store,
            cache,
            providers,
            index,
            signer,
            phone_policy,
            provider_timeout: Duration::from_secs(3),
        }
    }

    pub fn signer(&self) -> &SigningKey {
        &self.signer
    }

    fn doc_index(&self, document: &Document) -> String {
        hex::encode(self.index.index(&document.index_input()))
    }

    /// Every provider call has a deadline; a provider that hangs is an unavailable one.
    async fn call_provider<T>(
        &self,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ServiceError> {
        match tokio::time::timeout(self.provider_timeout, call).await {
            Ok(result) => result.map_err(provider_error),
            Err(_) => Err(provider_error(ProviderError::Unavailable(
                "deadline".into(),
            ))),
        }
    }

    pub async fn register(
        &self,
        registration: Registration,
        guardian: Option<(String, i32)>,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        let (identity_state, identity_reason, review) = match registration.document.kind() {
            // Filed offline with the epidemic office; a reviewer confirms the filing.
            DocumentType::MilitaryOfficerCard => (
                StepState::PendingReview,
                "MILITARY_OFFICER_CARD",
                Some(NewReview {
                    reason: "MILITARY_OFFICER_CARD",
                    ..NewReview::default()
                }),
            ),
            // The data page and visa are checked by a person.
            DocumentType::ForeignPassport => (
                StepState::PendingReview,
                "FOREIGN_PASSPORT",
                Some(NewReview {
                    reason: "FOREIGN_PASSPORT",
                    passport_page: registration.passport_data_page,
                    visa_page: registration.visa_page,
                    live_image: None,
                }),
            ),
            DocumentType::ResidentIdCard | DocumentType::HkMacauPermit => {
                (StepState::Passed, "", None)
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let doc_index = self.doc_index(&registration.document);
        let new = NewPerson {
            id: id.clone(),
            document: registration.document,
            name: registration.name.as_str().to_owned(),
            english_name: registration.english_name.map(|n| n.as_str().to_owned()),
            guardian,
            request_id: registration.request_id,
            identity_state,
            identity_reason,
            review,
        };
        let person_id = match self.store.insert_person(new, doc_index, now).await? {
            Inserted::Created => {
                tracing::info!(person_id = %id, "person registered");
                id
            }
            Inserted::Replayed(existing) => existing,
            Inserted::DuplicateDocument => {
                return Err(ServiceError::AlreadyExists(
                    "a person with this document is already registered".into(),
                ));
            }
            Inserted::RequestIdReused => {
                return Err(ServiceError::invalid(
                    "request_id",
                    "was already used for a different registration",
                ));
            }
        };
        self.status(&person_id, now).await
    }

    pub async fn register_dependent(
        &self,
        guardian_id: &str,
        relationship: i32,
        registration: Registration,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        let guardian = self.status(guardian_id, now).await?;
        if guardian.guardian_id.is_some() {
            return Err(ServiceError::precondition(
                "GUARDIAN_IS_DEPENDENT",
                "a dependent cannot register dependents",
            ));
        }
        if !guardian.verified {
            return Err(ServiceError::precondition(
                "GUARDIAN_NOT_VERIFIED",
                "the guardian must complete verification first",
            ));
        }
        if self.store.dependent_count(guardian_id).await? >= MAX_DEPENDENTS {
            return Err(ServiceError::precondition(
                "TOO_MANY_DEPENDENTS",
                format!("a guardian manages at most {MAX_DEPENDENTS} dependents"),
            ));
        }
        // A child must be one: an adult cannot be taken over as somebody's dependent.
        if relationship == RELATIONSHIP_CHILD
            && let Some(birth) = registration.document.birth_date()
            && now
                .date_naive()
                .years_since(birth)
                .is_some_and(|age| age >= 18)
        {
            return Err(ServiceError::invalid(
                "relationship",
                "a person of 18 or more cannot be registered as a child",
            ));
        }
        self.register(
            registration,
            Some((guardian_id.to_owned(), relationship)),
            now,
        )
        .await
    }

    pub async fn person(&self, id: &str) -> Result<PersonRecord, ServiceError> {
        self.store
            .person(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound("no such person".into()))
    }

    /// `(pseudonym, person_id)` for the persons registered under these pseudonyms.
    pub async fn resolve_pseudonyms(
        &self,
        key_id: &str,
        pseudonyms: &[String],
    ) -> Result<Vec<(String, String)>, ServiceError> {
        if !self.store.pseudonyms_ready() {
            return Err(ServiceError::Unavailable(
                "exchange pseudonyms are being written for persons registered earlier; \
                 try again shortly"
                    .into(),
            ));
        }
        Ok(self.store.resolve_pseudonyms(key_id, pseudonyms).await?)
    }

    pub async fn find_by_document(&self, document: &Document) -> Result<String, ServiceError> {
        self.store
            .find_by_doc_index(&self.doc_index(document))
            .await?
            .ok_or_else(|| ServiceError::NotFound("no person with this document".into()))
    }

    pub async fn dependents(&self, guardian_id: &str) -> Result<Vec<PersonRecord>, ServiceError> {
        self.person(guardian_id).await?;
        Ok(self.store.dependents(guardian_id).await?)
    }

    async fn steps_of(
        &self,
        person: &PersonRecord,
    ) -> Result<(Steps, Vec<StepRow>, Option<bool>), ServiceError> {
        let (steps, rows) = self.store.steps(&person.id).await?;
        let guardian_verified = match &person.guardian_id {
            Some(g) => {
                let (guardian_steps, _) = self.store.steps(g).await?;
                Some(guardian_steps.is_verified(None))
            }
            None => None,
        };
        Ok((steps, rows, guardian_verified))
    }

    /// Where the person stands, with a signed attestation when verified.
    pub async fn status(&self, id: &str, now: DateTime<Utc>) -> Result<StatusView, ServiceError> {
        self.status_of(&self.person(id).await?, true, now).await
    }

    /// The status of a person already loaded, with its attestation.
    pub async fn status_for(
        &self,
        person: &PersonRecord,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        self.status_of(person, true, now).await
    }

    /// Whether the person is verified, without the cost of an attestation (masked views).
    pub async fn is_verified(&self, person: &PersonRecord) -> Result<bool, ServiceError> {
        Ok(self.status_of(person, false, Utc::now()).await?.verified)
    }

    async fn status_of(
        &self,
        person: &PersonRecord,
        attest: bool,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        let (steps, rows, guardian_verified) = self.steps_of(person).await?;
        let verified = steps.is_verified(guardian_verified);
        let level = steps.level();
        let attestation = if verified && attest {
            let statement = serde_json::json!({
                "person_id": person.id,
                "level": level,
                "verified": verified,
                "issued_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
            let bytes = statement.to_string().into_bytes();
            let signature = self.signer.sign(&bytes).map_err(ServiceError::internal)?;
            Some((bytes, signature, self.signer.key_id().to_owned()))
        } else {
            None
        };
        Ok(StatusView {
            person_id: person.id.clone(),
            steps: rows,
            verified,
            level,
            guardian_id: person.guardian_id.clone(),
            attestation,
        })
    }

    async fn attemptable(&self, id: &str, step: Step) -> Result<PersonRecord, ServiceError> {
        let person = self.person(id).await?;
        let (steps, _, _) = self.steps_of(&person).await?;
        steps.can_attempt(step, person.guardian_id.is_some())?;
        Ok(person)
    }

    fn code_mac(&self, person_id: &str, code: &str) -> String {
        hex::encode(
            self.index
                .index(format!("phone-code:{person_id}:{code}").as_bytes()),
        )
    }

    pub async fn send_phone_code(
        &self,
        id: &str,
        phone: &PhoneNumber,
        now: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, u32), ServiceError> {
        self.attemptable(id, Step::Phone).await?;
        // Keyed by the number's blind index: neither Redis nor the database holds the number.
        let phone_index = hex::encode(
            self.index
                .index(format!("phone:{}", phone.as_str()).as_bytes()),
        );
        self.check_sms_limits(id, &phone_index, now).await?;
        let code = PhoneCode::generate();
        // Sent before it is saved: a send that fails leaves the step as it was.
        self.call_provider(self.providers.sms.send_code(phone, &code))
            .await?;
        self.store.record_sms_send(&phone_index, id, now).await?;
        let expires_at = now
            + chrono::Duration::from_std(self.phone_policy.code_ttl)
                .unwrap_or(chrono::Duration::minutes(5));
        let saved = self
            .store
            .save_phone_challenge(
                id,
                phone.as_str(),
                self.code_mac(id, code.as_str()),
                expires_at,
                self.phone_policy.attempts,
                now,
            )
            .await?;
        if !saved {
            return Err(ServiceError::precondition(
                "STEP_CHANGED",
                "the phone step changed meanwhile; read the status and retry",
            ));
        }
        Ok((expires_at, self.phone_policy.attempts))
    }

    /// Codes per number per hour from the cache's counter; when the cache is away, from the
    /// database's record of sends, so the limit holds either way. Codes per person always
    /// come from the database: a new code resets the attempts, so this bounds the guesses.
    async fn check_sms_limits(
        &self,
        person_id: &str,
        phone_index: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        let window = Duration::from_secs(3600);
        let since = now - chrono::Duration::hours(1);
        let (db_to_phone, db_to_person) = self
            .store
            .sms_sends_since(phone_index, person_id, since)
            .await?;
        let to_phone = match self
            .cache
            .incr_window(&format!("identity:sms:{phone_index}"), window)
            .await
        {
            Ok(count) => count.saturating_sub(1).max(db_to_phone),
            Err(err) => {
                tracing::warn!(error = %err, "SMS rate limit falls back to the database");
                db_to_phone
            }
        };
        if to_phone >= self.phone_policy.codes_per_hour
            || db_to_person >= 2 * self.phone_policy.codes_per_hour
        {
            return Err(ServiceError::ResourceExhausted {
                message: "too many codes sent; try again later".into(),
                retry_after: Some(window),
            });
        }
        Ok(())
    }

    pub async fn confirm_phone_code(
        &self,
        id: &str,
        code: &PhoneCode,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        self.person(id).await?;
        let expected = self.code_mac(id, code.as_str());
        let outcome = self
            .store
            .confirm_phone(
                id,
                |stored| constant_time_eq(stored.as_bytes(), expected.as_bytes()),
                now,
            )
            .await?;
        match outcome {
            PhoneConfirmation::Confirmed => self.status(id, now).await,
            PhoneConfirmation::NoChallenge => Err(ServiceError::precondition(
                "NO_PHONE_CODE",
                "no code is waiting for confirmation; send one first",
            )),
            PhoneConfirmation::Expired => Err(ServiceError::precondition(
                "PHONE_CODE_EXPIRED",
                "the code has expired; send a new one",
            )),
            PhoneConfirmation::AttemptsExhausted => Err(ServiceError::precondition(
                "PHONE_CODE_ATTEMPTS_EXHAUSTED",
                "too many wrong codes; send a new one",
            )),
            PhoneConfirmation::WrongCode { attempts_left } => Err(ServiceError::invalid(
                "code",
                format!("does not match; {attempts_left} attempts left"),
            )),
        }
    }

    pub async fn face_match(
        &self,
        id: &str,
        image: Image,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        let person = self.attemptable(id, Step::FaceMatch).await?;
        let score = self
            .call_provider(self.providers.face.compare(&person.document, &image))
            .await?;
        let (state, reason) = score.outcome();
        // A doubtful match is looked at by a person, who needs the image; it is sealed for
        // the review and deleted with the decision. Otherwise it is never written anywhere.
        let keep = (state == StepState::PendingReview).then_some(image);
        self.record(id, Step::FaceMatch, state, reason, keep, now)
            .await
    }

    pub async fn bank_card(
        &self,
        id: &str,
        card: CardNumber,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        let person = self.attemptable(id, Step::BankCard).await?;
        let name = PersonName::parse(&person.name).map_err(ServiceError::internal)?;
        let outcome = self
            .call_provider(
                self.providers
                    .bank_card
                    .verify(&name, &person.document, &card),
            )
            .await?;
        let (state, reason) = match outcome {
            BankCardOutcome::Match => (StepState::Passed, ""),
            BankCardOutcome::NameMismatch => (StepState::Failed, "BANK_CARD_NAME_MISMATCH"),
        };
        self.record(id, Step::BankCard, state, reason, None, now)
            .await
    }

    async fn record(
        &self,
        id: &str,
        step: Step,
        state: StepState,
        reason: &'static str,
        review_image: Option<Image>,
        now: DateTime<Utc>,
    ) -> Result<StatusView, ServiceError> {
        if !self
            .store
            .record_outcome(id, step, state, reason, review_image, now)
            .await?
        {
            return Err(ServiceError::precondition(
                "STEP_CHANGED",
                "the step changed meanwhile; read the status and retry",
            ));
        }
        self.status(id, now).await
    }

    pub async fn review(&self, id: i64) -> Result<ReviewRecord, ServiceError> {
        self.store
            .review(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound("no such review".into()))
    }

    pub async fn reviews(
        &self,
        state: i32,
        after_id: i64,
        limit: u64,
    ) -> Result<Vec<ReviewRecord>, ServiceError> {
        Ok(self.store.reviews(state, after_id, limit).await?)
    }

    pub async fn decide_review(
        &self,
        id: i64,
        approve: bool,
        reviewer: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> Result<ReviewRecord, ServiceError> {
        match self
            .store
            .decide_review(id, approve, reviewer, note, now)
            .await?
        {
            Decided::Done(review) => {
                tracing::info!(review_id = id, approve, reviewer, "review decided");
                Ok(*review)
            }
            Decided::NotFound => Err(ServiceError::NotFound("no such review".into())),
            Decided::AlreadyDecided => Err(ServiceError::precondition(
                "REVIEW_ALREADY_DECIDED",
                "this review was already decided",
            )),
            Decided::StepMoved => Err(ServiceError::precondition(
                "STEP_CHANGED",
                "the reviewed step is no longer waiting for review",
            )),
        }
    }
}

/// Dependents one guardian may register (a family, not an agency).
pub const MAX_DEPENDENTS: u64 = 10;
const RELATIONSHIP_CHILD: i32 = 1;

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
