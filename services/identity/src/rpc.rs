//! The gRPC edge: proto in, domain out, and back. No rules live here beyond parsing.

use crate::domain::fields::{mask_document_number, mask_name};
use crate::domain::{
    CardNumber, Document, DocumentType, EnglishName, Image, PersonName, PhoneCode, PhoneNumber,
    Step, StepState,
};
use crate::service::{Identity, Registration, StatusView};
use crate::store::{PersonRecord, REVIEW_APPROVED, REVIEW_PENDING, REVIEW_REJECTED, ReviewRecord};
use chrono::{DateTime, Utc};
use healthcode_auth::{Caller, TokenVerifier, require_any, roles};
use healthcode_crypto::{PseudonymKey, TrustedKeys, VerifyingKey};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1 as common;
use healthcode_proto::identity::v1 as pb;
use pb::identity_service_server::IdentityService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct IdentityRpc {
    identity: Arc<Identity>,
    verifier: TokenVerifier,
    retired_keys: TrustedKeys,
    pseudonym_key: Option<Arc<PseudonymKey>>,
}

/// Persons per GetExchangePseudonyms call.
pub const MAX_PSEUDONYM_BATCH: usize = 1_000;

impl IdentityRpc {
    pub fn new(
        identity: Arc<Identity>,
        verifier: TokenVerifier,
        retired_keys: TrustedKeys,
        pseudonym_key: Option<Arc<PseudonymKey>>,
    ) -> Self {
        IdentityRpc {
            identity,
            verifier,
            retired_keys,
            pseudonym_key,
        }
    }

    fn caller<T>(&self, request: &Request<T>, any_of: &[&str]) -> Result<Caller, Status> {
        let caller = self.verifier.authenticate(request)?;
        if !any_of.is_empty() {
            require_any(&caller, any_of)?;
        }
        Ok(caller)
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn person_id(
    v: &mut Violations,
    field: &str,
    person: Option<&common::PersonRef>,
) -> Option<String> {
    let raw = person.map(|p| p.person_id.as_str()).unwrap_or_default();
    let parsed = uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| "must be a person id (UUID)");
    v.check(&format!("{field}.person_id"), parsed)
}

fn person_ref(id: &str) -> Option<common::PersonRef> {
    Some(common::PersonRef {
        person_id: id.to_owned(),
    })
}

fn document_type(code: i32) -> Result<DocumentType, &'static str> {
    DocumentType::from_code(code).ok_or("must be one of the DocumentType values")
}

fn document(v: &mut Violations, doc: Option<&pb::IdentityDocument>) -> Option<Document> {
    let Some(doc) = doc else {
        v.add("document", "is required");
        return None;
    };
    let kind = v.check("document.type", document_type(doc.r#type))?;
    let parsed = Document::parse(kind, &doc.number, &doc.issuing_country, now().date_naive());
    match parsed {
        Ok(d) => Some(d),
        Err(crate::domain::DocumentError::IssuingCountry) => {
            v.add(
                "document.issuing_country",
                crate::domain::DocumentError::IssuingCountry.to_string(),
            );
            None
        }
        Err(e) => {
            v.add("document.number", e.to_string());
            None
        }
    }
}

fn optional_image(v: &mut Violations, field: &str, bytes: &[u8], required: bool) -> Option<Image> {
    if bytes.is_empty() {
        if required {
            v.add(field, "is required for a foreign passport");
        }
        return None;
    }
    v.check(field, Image::parse(bytes))
}

struct RegistrationFields<'a> {
    request_id: &'a str,
    document: Option<&'a pb::IdentityDocument>,
    name: &'a str,
    english_name: &'a str,
    passport_data_page: &'a [u8],
    visa_page: &'a [u8],
}

fn registration(v: &mut Violations, f: RegistrationFields<'_>) -> Option<Registration> {
    let request_id = if f.request_id.is_empty() {
        None
    } else {
        v.check(
            "request_id",
            uuid::Uuid::parse_str(f.request_id)
                .map(|u| u.to_string())
                .map_err(|_| "must be a UUID"),
        )
    };
    let document = document(v, f.document);
    let name = v.check("name", PersonName::parse(f.name));
    let is_passport = document
        .as_ref()
        .is_some_and(|d| d.kind() == DocumentType::ForeignPassport);
    let english_name = if f.english_name.trim().is_empty() {
        if is_passport {
            v.add("english_name", "is required for a foreign passport");
        }
        None
    } else {
        v.check("english_name", EnglishName::parse(f.english_name))
    };
    let (passport_data_page, visa_page) = if is_passport {
        (
            optional_image(v, "passport_data_page", f.passport_data_page, true),
            optional_image(v, "visa_page", f.visa_page, true),
        )
    } else {
        if !f.passport_data_page.is_empty() {
            v.add("passport_data_page", "only for a foreign passport");
        }
        if !f.visa_page.is_empty() {
            v.add("visa_page", "only for a foreign passport");
        }
        (None, None)
    };
    Some(Registration {
        request_id: if f.request_id.is_empty() {
            None
        } else {
            Some(request_id?)
        },
        document: document?,
        name: name?,
        english_name,
        passport_data_page,
        visa_page,
    })
}

fn step_code(step: Step) -> i32 {
    match step {
        Step::IdentityDetails => pb::VerificationStep::IdentityDetails as i32,
        Step::Phone => pb::VerificationStep::Phone as i32,
        Step::FaceMatch => pb::VerificationStep::FaceMatch as i32,
        Step::BankCard => pb::VerificationStep::BankCard as i32,
    }
}

fn state_code(state: StepState) -> i32 {
    match state {
        StepState::NotStarted => pb::StepState::NotStarted as i32,
        StepState::InProgress => pb::StepState::InProgress as i32,
        StepState::PendingReview => pb::StepState::PendingReview as i32,
        StepState::Passed => pb::StepState::Passed as i32,
        StepState::Failed => pb::StepState::Failed as i32,
    }
}

fn status_message(view: StatusView) -> pb::VerificationStatus {
    let (attestation, signature, key_id) = view.attestation.unwrap_or_default();
    pb::VerificationStatus {
        person: person_ref(&view.person_id),
        steps: view
            .steps
            .into_iter()
            .map(|row| pb::StepStatus {
                step: step_code(row.step),
                state: state_code(row.state),
                updated_at: Some(timestamp(row.updated_at)),
                reason: row.reason,
            })
            .collect(),
        verified: view.verified,
        level: view.level,
        guardian: view.guardian_id.as_deref().and_then(person_ref),
        attestation,
        signature,
        key_id,
    }
}

fn masked(person: &PersonRecord, verified: bool) -> pb::MaskedPerson {
    pb::MaskedPerson {
        person: person_ref(&person.id),
        masked_name: mask_name(&person.name),
        masked_document_number: mask_document_number(person.document.number()),
        document_type: person.document.kind().code(),
        verified,
    }
}

fn review_state(code: i32) -> i32 {
    match code {
        REVIEW_PENDING => pb::ReviewState::Pending as i32,
        REVIEW_APPROVED => pb::ReviewState::Approved as i32,
        REVIEW_REJECTED => pb::ReviewState::Rejected as i32,
        _ => pb::ReviewState::Unspecified as i32,
    }
}

impl IdentityRpc {
    /// A review as the reviewer sees it; attachments only when asked for one review.
    async fn review_message(
        &self,
        review: ReviewRecord,
        with_attachments: bool,
    ) -> Result<pb::Review, ServiceError> {
        let person = self.identity.person(&review.person_id).await?;
        let verified = self.identity.is_verified(&person).await?;
        let attachment = |a: Option<Vec<u8>>| {
            if with_attachments {
                a.unwrap_or_default()
            } else {
                Vec::new()
            }
        };
        Ok(pb::Review {
            review_id: review.id.to_string(),
            person: person_ref(&review.person_id),
            step: step_code(review.step),
            reason: review.reason,
            state: review_state(review.state),
            created_at: Some(timestamp(review.created_at)),
            decided_at: review.decided_at.map(timestamp),
            decided_by: review.decided_by.unwrap_or_default(),
            note: review.note.unwrap_or_default(),
            subject: Some(masked(&person, verified)),
            passport_data_page: attachment(review.passport_page),
            visa_page: attachment(review.visa_page),
            live_image: attachment(review.live_image),
        })
    }
}

fn review_id(v: &mut Violations, raw: &str) -> Option<i64> {
    v.check(
        "review_id",
        raw.parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .ok_or("must be a review id"),
    )
}

/// FAILED_PRECONDITION: exchange pseudonyms need the national key.
fn no_pseudonym_key() -> ServiceError {
    ServiceError::precondition(
        "PSEUDONYM_KEY_NOT_CONFIGURED",
        "this deployment holds no national pseudonym key (EXCHANGE_PSEUDONYM_KEY)",
    )
}

#[tonic::async_trait]
impl IdentityService for IdentityRpc {
    async fn register_person(
        &self,
        request: Request<pb::RegisterPersonRequest>,
    ) -> RpcResult<pb::RegisterPersonResponse> {
        let caller = self.caller(&request, &[roles::APP, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let reg = registration(
            &mut v,
            RegistrationFields {
                request_id: &req.request_id,
                document: req.document.as_ref(),
                name: &req.name,
                english_name: &req.english_name,
                passport_data_page: &req.passport_data_page,
                visa_page: &req.visa_page,
            },
        );
        v.finish()?;
        let Some(reg) = reg else {
            return Err(ServiceError::invalid("document", "is invalid").into());
        };
        if reg.document.kind() == DocumentType::MilitaryOfficerCard && !caller.has(roles::OFFICIAL)
        {
            return Err(Status::permission_denied(
                "military officer cards cannot self-register: an authorised official files them",
            ));
        }
        let status = self.identity.register(reg, None, now()).await?;
        Ok(Response::new(pb::RegisterPersonResponse {
            person: person_ref(&status.person_id),
            status: Some(status_message(status)),
        }))
    }

    async fn get_person(&self, request: Request<pb::GetPersonRequest>) -> RpcResult<pb::Person> {
        self.caller(&request, &[roles::FULL_VIEW])?;
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", request.get_ref().person.as_ref());
        v.finish()?;
        let id = id.unwrap_or_default();
        let person = self.identity.person(&id).await?;
        let status = self.identity.status_for(&person, now()).await?;
        Ok(Response::new(pb::Person {
            person: person_ref(&person.id),
            document: Some(pb::IdentityDocument {
                r#type: person.document.kind().code(),
                number: person.document.number().to_owned(),
                issuing_country: person.document.issuing_country().to_owned(),
            }),
            name: person.name,
            english_name: person.english_name.unwrap_or_default(),
            phone_number: person.phone.unwrap_or_default(),
            registered_at: Some(timestamp(person.created_at)),
            status: Some(status_message(status)),
        }))
    }

    async fn get_masked_person(
        &self,
        request: Request<pb::GetMaskedPersonRequest>,
    ) -> RpcResult<pb::MaskedPerson> {
        self.caller(&request, &[])?;
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", request.get_ref().person.as_ref());
        v.finish()?;
        let id = id.unwrap_or_default();
        let person = self.identity.person(&id).await?;
        let verified = self.identity.is_verified(&person).await?;
        Ok(Response::new(masked(&person, verified)))
    }

    async fn find_person_by_document(
        &self,
        request: Request<pb::FindPersonByDocumentRequest>,
    ) -> RpcResult<pb::FindPersonByDocumentResponse> {
        self.caller(&request, &[roles::APP, roles::FULL_VIEW])?;
        let mut v = Violations::new();
        let doc = document(&mut v, request.get_ref().document.as_ref());
        v.finish()?;
        let Some(doc) = doc else {
            return Err(ServiceError::invalid("document", "is invalid").into());
        };
        let id = self.identity.find_by_document(&doc).await?;
        Ok(Response::new(pb::FindPersonByDocumentResponse {
            person: person_ref(&id),
        }))
    }

    async fn send_phone_code(
        &self,
        request: Request<pb::SendPhoneCodeRequest>,
    ) -> RpcResult<pb::SendPhoneCodeResponse> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", req.person.as_ref());
        let phone = v.check("phone_number", PhoneNumber::parse(&req.phone_number));
        v.finish()?;
        let (Some(id), Some(phone)) = (id, phone) else {
            return Err(ServiceError::invalid("phone_number", "is invalid").into());
        };
        let (expires_at, attempts) = self.identity.send_phone_code(&id, &phone, now()).await?;
        Ok(Response::new(pb::SendPhoneCodeResponse {
            expires_at: Some(timestamp(expires_at)),
            attempts_allowed: attempts,
        }))
    }

    async fn confirm_phone_code(
        &self,
        request: Request<pb::ConfirmPhoneCodeRequest>,
    ) -> RpcResult<pb::VerificationStatus> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", req.person.as_ref());
        let code = v.check("code", PhoneCode::parse(&req.code));
        v.finish()?;
        let (Some(id), Some(code)) = (id, code) else {
            return Err(ServiceError::invalid("code", "is invalid").into());
        };
        let status = self.identity.confirm_phone_code(&id, &code, now()).await?;
        Ok(Response::new(status_message(status)))
    }

    async fn submit_face_match(
        &self,
        request: Request<pb::SubmitFaceMatchRequest>,
    ) -> RpcResult<pb::VerificationStatus> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", req.person.as_ref());
        let image = v.check("live_image", Image::parse(&req.live_image));
        v.finish()?;
        let (Some(id), Some(image)) = (id, image) else {
            return Err(ServiceError::invalid("live_image", "is invalid").into());
        };
        let status = self.identity.face_match(&id, image, now()).await?;
        Ok(Response::new(status_message(status)))
    }

    async fn submit_bank_card_check(
        &self,
        request: Request<pb::SubmitBankCardCheckRequest>,
    ) -> RpcResult<pb::VerificationStatus> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", req.person.as_ref());
        let card = v.check("card_number", CardNumber::parse(&req.card_number));
        v.finish()?;
        let (Some(id), Some(card)) = (id, card) else {
            return Err(ServiceError::invalid("card_number", "is invalid").into());
        };
        let status = self.identity.bank_card(&id, card, now()).await?;
        Ok(Response::new(status_message(status)))
    }

    async fn get_verification_status(
        &self,
        request: Request<pb::GetVerificationStatusRequest>,
    ) -> RpcResult<pb::VerificationStatus> {
        self.caller(&request, &[roles::APP, roles::FULL_VIEW])?;
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", request.get_ref().person.as_ref());
        v.finish()?;
        let status = self.identity.status(&id.unwrap_or_default(), now()).await?;
        Ok(Response::new(status_message(status)))
    }

    async fn list_reviews(
        &self,
        request: Request<pb::ListReviewsRequest>,
    ) -> RpcResult<pb::ListReviewsResponse> {
        self.caller(&request, &[roles::REVIEWER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let state = match pb::ReviewState::try_from(req.state) {
            Ok(pb::ReviewState::Unspecified | pb::ReviewState::Pending) => REVIEW_PENDING,
            Ok(pb::ReviewState::Approved) => REVIEW_APPROVED,
            Ok(pb::ReviewState::Rejected) => REVIEW_REJECTED,
            Err(_) => {
                v.add("state", "must be one of the ReviewState values");
                REVIEW_PENDING
            }
        };
        let page = req.page.unwrap_or_default();
        let limit = match page.page_size {
            0 => 50,
            n if n > 500 => {
                v.add("page.page_size", "must be at most 500");
                50
            }
            n => n as u64,
        };
        let after = if page.page_token.is_empty() {
            0
        } else {
            v.check(
                "page.page_token",
                page.page_token
                    .parse::<i64>()
                    .map_err(|_| "is not a token this service issued"),
            )
            .unwrap_or(0)
        };
        v.finish()?;
        let reviews = self.identity.reviews(state, after, limit).await?;
        let next_page_token = if reviews.len() as u64 == limit {
            reviews.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let mut out = Vec::with_capacity(reviews.len());
        for review in reviews {
            out.push(self.review_message(review, false).await?);
        }
        Ok(Response::new(pb::ListReviewsResponse {
            reviews: out,
            next_page_token,
        }))
    }

    async fn decide_review(
        &self,
        request: Request<pb::DecideReviewRequest>,
    ) -> RpcResult<pb::Review> {
        let caller = self.caller(&request, &[roles::REVIEWER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = v.check(
            "review_id",
            req.review_id
                .parse::<i64>()
                .map_err(|_| "must be a review id"),
        );
        let approve = match pb::ReviewDecision::try_from(req.decision) {
            Ok(pb::ReviewDecision::Approve) => Some(true),
            Ok(pb::ReviewDecision::Reject) => Some(false),
            _ => {
                v.add("decision", "must be APPROVE or REJECT");
                None
            }
        };
        let note = req.note.trim();
        if approve == Some(false) && note.is_empty() {
            v.add("note", "is required to reject");
        }
        if note.chars().count() > 1000 {
            v.add("note", "must be at most 1000 characters");
        }
        v.finish()?;
        let (Some(id), Some(approve)) = (id, approve) else {
            return Err(ServiceError::invalid("decision", "is invalid").into());
        };
        let review = self
            .identity
            .decide_review(id, approve, &caller.subject, note, now())
            .await?;
        Ok(Response::new(self.review_message(review, false).await?))
    }

    async fn get_review(&self, request: Request<pb::GetReviewRequest>) -> RpcResult<pb::Review> {
        self.caller(&request, &[roles::REVIEWER])?;
        let mut v = Violations::new();
        let id = review_id(&mut v, &request.get_ref().review_id);
        v.finish()?;
        let review = self.identity.review(id.unwrap_or_default()).await?;
        Ok(Response::new(self.review_message(review, true).await?))
    }

    async fn register_dependent(
        &self,
        request: Request<pb::RegisterDependentRequest>,
    ) -> RpcResult<pb::RegisterDependentResponse> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let guardian = person_id(&mut v, "guardian", req.guardian.as_ref());
        let relationship = match pb::Relationship::try_from(req.relationship) {
            Ok(pb::Relationship::Unspecified) | Err(_) => {
                v.add("relationship", "must be one of the Relationship values");
                None
            }
            Ok(r) => Some(r as i32),
        };
        let reg = registration(
            &mut v,
            RegistrationFields {
                request_id: &req.request_id,
                document: req.document.as_ref(),
                name: &req.name,
                english_name: &req.english_name,
                passport_data_page: &[],
                visa_page: &[],
            },
        );
        if let Some(reg) = &reg
            && matches!(
                reg.document.kind(),
                DocumentType::MilitaryOfficerCard | DocumentType::ForeignPassport
            )
        {
            v.add(
                "document.type",
                "a dependent registers with a resident card or a permit",
            );
        }
        v.finish()?;
        let (Some(guardian), Some(relationship), Some(reg)) = (guardian, relationship, reg) else {
            return Err(ServiceError::invalid("document", "is invalid").into());
        };
        let status = self
            .identity
            .register_dependent(&guardian, relationship, reg, now())
            .await?;
        Ok(Response::new(pb::RegisterDependentResponse {
            person: person_ref(&status.person_id),
            status: Some(status_message(status)),
        }))
    }

    async fn list_dependents(
        &self,
        request: Request<pb::ListDependentsRequest>,
    ) -> RpcResult<pb::ListDependentsResponse> {
        // The gateway checks guardianship before showing a dependent's code.
        self.caller(&request, &[roles::APP, roles::INTERNAL])?;
        let mut v = Violations::new();
        let guardian = person_id(&mut v, "guardian", request.get_ref().guardian.as_ref());
        v.finish()?;
        let guardian = guardian.unwrap_or_default();
        let guardian_verified = self.identity.status(&guardian, now()).await?.verified;
        let dependents = self.identity.dependents(&guardian).await?;
        Ok(Response::new(pb::ListDependentsResponse {
            dependents: dependents
                .into_iter()
                .map(|d| pb::Dependent {
                    since: Some(timestamp(d.created_at)),
                    relationship: d.relationship.unwrap_or_default(),
                    person: Some(masked(&d, guardian_verified)),
                })
                .collect(),
        }))
    }

    async fn get_exchange_pseudonyms(
        &self,
        request: Request<pb::GetExchangePseudonymsRequest>,
    ) -> RpcResult<pb::GetExchangePseudonymsResponse> {
        self.caller(&request, &[roles::EXCHANGE])?;
        let persons = &request.get_ref().persons;
        let mut v = Violations::new();
        if persons.is_empty() || persons.len() > MAX_PSEUDONYM_BATCH {
            v.add("persons", "1 to 1,000 persons");
        }
        let ids: Vec<Option<String>> = persons
            .iter()
            .enumerate()
            .map(|(i, p)| person_id(&mut v, &format!("persons[{i}]"), Some(p)))
            .collect();
        v.finish()?;
        let Some(key) = &self.pseudonym_key else {
            return Err(no_pseudonym_key().into());
        };
        let mut out = pb::GetExchangePseudonymsResponse::default();
        for (index, id) in ids.into_iter().enumerate() {
            let id = id.unwrap_or_default();
            match self.identity.person(&id).await {
                Ok(person) => out.pseudonyms.push(pb::ExchangePseudonym {
                    person: person_ref(&person.id),
                    pseudonym: key
                        .pseudonym(person.document.kind().code(), person.document.number()),
                    pseudonym_key_id: key.key_id().to_owned(),
                }),
                Err(ServiceError::NotFound(message)) => out.errors.push(common::ItemError {
                    index: index as u32,
                    item_id: id,
                    code: tonic::Code::NotFound as i32,
                    reason: "PERSON_NOT_FOUND".into(),
                    message,
                }),
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Response::new(out))
    }

    async fn resolve_exchange_pseudonyms(
        &self,
        request: Request<pb::ResolveExchangePseudonymsRequest>,
    ) -> RpcResult<pb::ResolveExchangePseudonymsResponse> {
        self.caller(&request, &[roles::EXCHANGE])?;
        let r = request.get_ref();
        let mut v = Violations::new();
        if r.pseudonyms.is_empty() || r.pseudonyms.len() > MAX_PSEUDONYM_BATCH {
            v.add("pseudonyms", "1 to 1,000 pseudonyms");
        }
        for (i, p) in r.pseudonyms.iter().enumerate() {
            healthcode_errors::fields::pseudonym(&mut v, &format!("pseudonyms[{i}]"), p);
        }
        if self.pseudonym_key.is_none() {
            v.finish()?;
            return Err(no_pseudonym_key().into());
        }
        if r.pseudonym_key_id.is_empty() || r.pseudonym_key_id.len() > 64 {
            v.add("pseudonym_key_id", "required, at most 64 characters");
        }
        v.finish()?;
        // Any key id held: records made under the previous key during a rotation still
        // find the persons backfilled under it.
        let found = self
            .identity
            .resolve_pseudonyms(&r.pseudonym_key_id, &r.pseudonyms)
            .await?;
        let order: std::collections::HashMap<&str, usize> = r
            .pseudonyms
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i))
            .rev()
            .collect();
        let mut persons: Vec<(usize, pb::ExchangePseudonym)> = found
            .into_iter()
            .map(|(pseudonym, person)| {
                (
                    order.get(pseudonym.as_str()).copied().unwrap_or(usize::MAX),
                    pb::ExchangePseudonym {
                        person: person_ref(&person),
                        pseudonym,
                        pseudonym_key_id: r.pseudonym_key_id.clone(),
                    },
                )
            })
            .collect();
        let id = |p: &pb::ExchangePseudonym| p.person.clone().unwrap_or_default().person_id;
        persons.sort_by_key(|a| (a.0, id(&a.1)));
        Ok(Response::new(pb::ResolveExchangePseudonymsResponse {
            persons: persons.into_iter().map(|(_, p)| p).collect(),
        }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<common::GetPublicKeysRequest>,
    ) -> RpcResult<common::GetPublicKeysResponse> {
        let active = self.identity.signer().verifying_key();
        let published = |key: &VerifyingKey| common::PublicKey {
            key_id: key.key_id().to_owned(),
            algorithm: "SM2".into(),
            public_key_sec1: key.sec1_bytes(),
            public_key_pem: key.to_pem().unwrap_or_default(),
            not_before: None,
            not_after: None,
        };
        Ok(Response::new(common::GetPublicKeysResponse {
            keys: std::iter::once(&active)
                .chain(self.retired_keys.iter())
                .map(published)
                .collect(),
        }))
    }
}
