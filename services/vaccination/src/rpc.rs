//! The gRPC face of the vaccination service: authentication, roles, validation, then the
//! service. Every bad field is named; nothing is written before the checks pass.

use crate::service::{NewDose, NewLateEntry, Vaccination, from_ts};
use chrono::Utc;
use healthcode_auth::{Caller, TokenVerifier, require_any, roles};
use healthcode_crypto::VerifyingKey;
use healthcode_errors::fields::{self, request_id, text};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, Locale, SignedEnvelope,
};
use healthcode_proto::vaccination::v1 as pb;
use pb::vaccination_service_server::VaccinationService;
use pb::{CertificateKind, LateEntryDecision, LateEntryState, VaccineType};
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const MAX_RADIUS_M: u32 = 50_000;
pub const MAX_BATCHES: usize = 1_000;
pub const MAX_EVIDENCE: usize = 2 * 1024 * 1024;
pub const MAX_ARTWORK: usize = 256 * 1024;

pub struct VaccinationRpc {
    service: Arc<Vaccination>,
    verifier: TokenVerifier,
}

impl VaccinationRpc {
    pub fn new(service: Arc<Vaccination>, verifier: TokenVerifier) -> Self {
        VaccinationRpc { service, verifier }
    }

    fn caller<T>(&self, request: &Request<T>, allowed: &[&str]) -> Result<Caller, Status> {
        let caller = self.verifier.authenticate(request)?;
        if !allowed.is_empty() {
            require_any(&caller, allowed)?;
        }
        Ok(caller)
    }
}

fn ok<T>(result: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

fn division(v: &mut Violations, field: &str, code: &str, required: bool) {
    if (required || !code.is_empty())
        && (code.len() != 6 || !code.chars().all(|c| c.is_ascii_digit()))
    {
        v.add(field, "a GB/T 2260 division code: six digits");
    }
}

fn chinese(locale: &Option<Locale>) -> bool {
    locale
        .as_ref()
        .is_some_and(|l| l.tag.to_ascii_lowercase().starts_with("zh"))
}

fn check_vaccine(v: &mut Violations, x: &pb::Vaccine) {
    let f = |name: &str| format!("vaccine.{name}");
    if matches!(
        VaccineType::try_from(x.r#type),
        Ok(VaccineType::Unspecified) | Err(_)
    ) {
        v.add(
            f("type"),
            "INACTIVATED, RECOMBINANT_PROTEIN or ADENOVIRUS_VECTOR",
        );
    }
    for (name, value) in [
        ("name_zh", &x.name_zh),
        ("name_en", &x.name_en),
        ("maker_zh", &x.maker_zh),
        ("maker_en", &x.maker_en),
    ] {
        text(v, &f(name), value, 128, true);
    }
    fields::id(v, &f("approval_number"), &x.approval_number);
    if !(1..=5).contains(&x.doses_in_course) {
        v.add(f("doses_in_course"), "1 to 5");
    }
    let days = |d: &Option<prost_types::Duration>| d.as_ref().map(|d| d.seconds);
    if x.doses_in_course > 1 && days(&x.min_dose_interval).is_none_or(|s| s <= 0) {
        v.add(
            f("min_dose_interval"),
            "required for a course of several doses",
        );
    }
    if days(&x.min_dose_interval).is_some_and(|s| !(0..=365 * 86_400).contains(&s)) {
        v.add(f("min_dose_interval"), "0 to 365 days");
    }
    if days(&x.booster_interval).is_some_and(|s| !(86_400..=5 * 365 * 86_400).contains(&s)) {
        v.add(f("booster_interval"), "1 day to 5 years");
    }
    for (name, value) in [
        ("eu_medicinal_product", &x.eu_medicinal_product),
        (
            "eu_marketing_authorisation_holder",
            &x.eu_marketing_authorisation_holder,
        ),
        ("eu_vaccine_prophylaxis", &x.eu_vaccine_prophylaxis),
    ] {
        if value.len() > 64 || value.chars().any(|c| c.is_control()) {
            v.add(f(name), "at most 64 characters");
        }
    }
    if let Some(a) = &x.artwork {
        if a.image.len() > MAX_ARTWORK {
            v.add(f("artwork.image"), "at most 256 KiB");
        }
        text(v, &f("artwork.text_zh"), &a.text_zh, 500, false);
        text(v, &f("artwork.text_en"), &a.text_en, 500, false);
    }
    for (i, c) in x.recognised_countries.iter().enumerate() {
        if c.len() != 3 || !c.chars().all(|c| c.is_ascii_uppercase()) {
            v.add(
                format!("vaccine.recognised_countries[{i}]"),
                "ISO 3166-1 alpha-3",
            );
        }
    }
    check_batches(v, "vaccine.batches", &x.batches, false);
}

fn check_batches(v: &mut Violations, field: &str, batches: &[pb::VaccineBatch], required: bool) {
    if required && batches.is_empty() {
        v.add(field, "at least one batch");
    }
    if batches.len() > MAX_BATCHES {
        v.add(field, "at most 1,000 batches");
        return;
    }
    for (i, b) in batches.iter().enumerate() {
        fields::id(v, &format!("{field}[{i}].batch_number"), &b.batch_number);
        if from_ts(&b.expires_at).is_none() {
            v.add(format!("{field}[{i}].expires_at"), "required");
        }
    }
}

/// The worker's signed dose: an envelope whose payload is a complete `DoseClaims`.
fn signed_dose(
    v: &mut Violations,
    field: &str,
    envelope: &Option<SignedEnvelope>,
) -> Option<(SignedEnvelope, pb::DoseClaims)> {
    let Some(envelope) = envelope else {
        v.add(field, "required");
        return None;
    };
    if envelope.signature.is_empty() || envelope.signature.len() > 128 {
        v.add(
            format!("{field}.signature"),
            "required: a DER SM2 signature",
        );
    }
    fields::id(v, &format!("{field}.key_id"), &envelope.key_id);
    let Ok(claims) = pb::DoseClaims::decode(&envelope.payload[..]) else {
        v.add(format!("{field}.payload"), "not a DoseClaims message");
        return None;
    };
    let f = |name: &str| format!("{field}.payload.{name}");
    fields::person_ref(v, &f("person"), &claims.person);
    fields::id(v, &f("vaccine_id"), &claims.vaccine_id);
    fields::id(v, &f("batch_number"), &claims.batch_number);
    if !(1..=10).contains(&claims.dose_number) {
        v.add(f("dose_number"), "1 to 10");
    }
    match from_ts(&claims.administered_at) {
        None => v.add(f("administered_at"), "required"),
        Some(t) if t > Utc::now() + chrono::Duration::minutes(5) => {
            v.add(f("administered_at"), "must not be in the future")
        }
        Some(t) if t.timestamp() % 60 != 0 => v.add(f("administered_at"), "to the minute"),
        Some(_) => {}
    }
    fields::id(v, &f("site_id"), &claims.site_id);
    fields::id(v, &f("worker_id"), &claims.worker_id);
    Some((envelope.clone(), claims))
}

#[tonic::async_trait]
impl VaccinationService for VaccinationRpc {
    async fn register_vaccine(
        &self,
        request: Request<pb::RegisterVaccineRequest>,
    ) -> Result<Response<pb::Vaccine>, Status> {
        self.caller(&request, &[roles::HEALTH_ADMIN])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let vaccine = req.vaccine.unwrap_or_default();
        check_vaccine(&mut v, &vaccine);
        v.finish()?;
        ok(self
            .service
            .register_vaccine(&req.request_id, vaccine)
            .await)
    }

    async fn get_vaccine(
        &self,
        request: Request<pb::GetVaccineRequest>,
    ) -> Result<Response<pb::Vaccine>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "vaccine_id", &req.vaccine_id);
        v.finish()?;
        ok(self.service.vaccine(&req.vaccine_id).await)
    }

    async fn list_vaccines(
        &self,
        request: Request<pb::ListVaccinesRequest>,
    ) -> Result<Response<pb::ListVaccinesResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let kind = VaccineType::try_from(req.r#type).unwrap_or_else(|_| {
            v.add("type", "unknown vaccine type");
            VaccineType::Unspecified
        });
        let (offset, limit) = fields::page_request(&mut v, &req.page);
        v.finish()?;
        ok(self.service.list_vaccines(kind, offset, limit).await)
    }

    async fn add_batches(
        &self,
        request: Request<pb::AddBatchesRequest>,
    ) -> Result<Response<pb::Vaccine>, Status> {
        self.caller(&request, &[roles::HEALTH_ADMIN])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "vaccine_id", &req.vaccine_id);
        check_batches(&mut v, "batches", &req.batches, true);
        v.finish()?;
        ok(self
            .service
            .add_batches(&req.request_id, &req.vaccine_id, req.batches)
            .await)
    }

    async fn register_site(
        &self,
        request: Request<pb::RegisterSiteRequest>,
    ) -> Result<Response<pb::VaccinationSite>, Status> {
        self.caller(&request, &[roles::HEALTH_ADMIN])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let site = req.site.unwrap_or_default();
        text(&mut v, "site.name", &site.name, 128, true);
        fields::id(&mut v, "site.unit_code", &site.unit_code);
        text(&mut v, "site.address", &site.address, 256, false);
        fields::point(&mut v, "site.location", &site.location);
        division(&mut v, "site.division_code", &site.division_code, true);
        text(&mut v, "site.public_phone", &site.public_phone, 32, false);
        v.finish()?;
        ok(self.service.register_site(&req.request_id, site).await)
    }

    async fn get_site(
        &self,
        request: Request<pb::GetSiteRequest>,
    ) -> Result<Response<pb::VaccinationSite>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "site_id", &req.site_id);
        v.finish()?;
        ok(self.service.site(&req.site_id).await)
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let near = req
            .near
            .as_ref()
            .map(|_| fields::point(&mut v, "near", &req.near));
        let radius = match req.radius_m {
            0 => 5_000,
            r if r > MAX_RADIUS_M => {
                v.add("radius_m", "at most 50,000");
                0
            }
            r => r,
        };
        division(&mut v, "division_code", &req.division_code, false);
        let (offset, limit) = fields::page_request(&mut v, &req.page);
        v.finish()?;
        ok(self
            .service
            .list_sites(near.map(|p| (p, radius)), &req.division_code, offset, limit)
            .await)
    }

    async fn add_worker_key(
        &self,
        request: Request<pb::AddWorkerKeyRequest>,
    ) -> Result<Response<pb::WorkerKey>, Status> {
        let caller = self.caller(&request, &[roles::HEALTH_ADMIN, roles::VACCINATION_SITE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "site_id", &req.site_id);
        fields::id(&mut v, "worker_id", &req.worker_id);
        let key = req.key.unwrap_or_default();
        fields::id(&mut v, "key.key_id", &key.key_id);
        if !key.algorithm.eq_ignore_ascii_case("SM2") {
            v.add("key.algorithm", "SM2");
        }
        let verifying = v.check(
            "key.public_key_sec1",
            VerifyingKey::from_sec1(key.key_id.clone(), &key.public_key_sec1)
                .map_err(|_| "not an SM2 public key (SEC1 uncompressed point)"),
        );
        if let (Some(a), Some(b)) = (from_ts(&key.not_before), from_ts(&key.not_after))
            && a >= b
        {
            v.add("key.not_after", "must be after not_before");
        }
        v.finish()?;
        own_site(&caller, &req.site_id)?;
        let Some(verifying) = verifying else {
            return Err(Status::internal("key checked above"));
        };
        ok(self
            .service
            .add_worker_key(
                &req.request_id,
                &req.site_id,
                &req.worker_id,
                &key,
                &verifying,
            )
            .await)
    }

    async fn revoke_worker_key(
        &self,
        request: Request<pb::RevokeWorkerKeyRequest>,
    ) -> Result<Response<pb::WorkerKey>, Status> {
        let caller = self.caller(&request, &[roles::HEALTH_ADMIN, roles::VACCINATION_SITE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "site_id", &req.site_id);
        fields::id(&mut v, "key_id", &req.key_id);
        text(&mut v, "reason", &req.reason, 256, true);
        v.finish()?;
        own_site(&caller, &req.site_id)?;
        ok(self
            .service
            .revoke_worker_key(&req.request_id, &req.site_id, &req.key_id, &req.reason)
            .await)
    }

    async fn record_dose(
        &self,
        request: Request<pb::RecordDoseRequest>,
    ) -> Result<Response<pb::Dose>, Status> {
        let caller = self.caller(&request, &[roles::VACCINATION_SITE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let signed = signed_dose(&mut v, "worker_signature", &req.worker_signature);
        v.finish()?;
        let Some((envelope, claims)) = signed else {
            return Err(Status::internal("dose checked above"));
        };
        ok(self
            .service
            .record_dose(NewDose {
                request_id: &req.request_id,
                site_id: &caller.subject,
                envelope,
                claims,
            })
            .await)
    }

    async fn list_doses(
        &self,
        request: Request<pb::ListDosesRequest>,
    ) -> Result<Response<pb::ListDosesResponse>, Status> {
        self.caller(&request, &[roles::APP, roles::INTERNAL, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        v.finish()?;
        ok(self
            .service
            .list_doses(&person, req.include_unconfirmed)
            .await
            .map(|doses| pb::ListDosesResponse { doses }))
    }

    async fn request_late_entry(
        &self,
        request: Request<pb::RequestLateEntryRequest>,
    ) -> Result<Response<pb::LateEntry>, Status> {
        let caller = self.caller(&request, &[roles::APP, roles::VACCINATION_SITE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::person_ref(&mut v, "person", &req.person);
        fields::id(&mut v, "vaccine_id", &req.vaccine_id);
        fields::id(&mut v, "batch_number", &req.batch_number);
        if !(1..=10).contains(&req.dose_number) {
            v.add("dose_number", "1 to 10");
        }
        match from_ts(&req.administered_at) {
            None => v.add("administered_at", "required"),
            Some(t) if t > Utc::now() => v.add("administered_at", "must not be in the future"),
            Some(_) => {}
        }
        fields::id(&mut v, "site_id", &req.site_id);
        text(&mut v, "statement", &req.statement, 1_000, true);
        if req.evidence_image.len() > MAX_EVIDENCE {
            v.add("evidence_image", "at most 2 MiB");
        } else if !req.evidence_image.is_empty()
            && !req.evidence_image.starts_with(&[0xFF, 0xD8, 0xFF])
            && !req.evidence_image.starts_with(b"\x89PNG\r\n\x1a\n")
        {
            v.add("evidence_image", "a JPEG or PNG image");
        }
        v.finish()?;
        let entry = pb::LateEntry {
            person: req.person,
            vaccine_id: req.vaccine_id,
            batch_number: req.batch_number,
            dose_number: req.dose_number,
            administered_at: req.administered_at,
            site_id: req.site_id,
            statement: req.statement,
            ..Default::default()
        };
        ok(self
            .service
            .request_late_entry(
                NewLateEntry {
                    request_id: &req.request_id,
                    requested_by: &caller.subject,
                    entry,
                },
                req.evidence_image,
            )
            .await)
    }

    async fn review_late_entry(
        &self,
        request: Request<pb::ReviewLateEntryRequest>,
    ) -> Result<Response<pb::LateEntry>, Status> {
        let caller = self.caller(&request, &[roles::VACCINATION_SITE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "late_entry_id", &req.late_entry_id);
        let decision = match LateEntryDecision::try_from(req.decision) {
            Ok(LateEntryDecision::Approve) => true,
            Ok(LateEntryDecision::Reject) => {
                text(&mut v, "note", &req.note, 1_000, true);
                false
            }
            _ => {
                v.add("decision", "APPROVE or REJECT");
                false
            }
        };
        text(&mut v, "note", &req.note, 1_000, false);
        let signed = req
            .worker_signature
            .as_ref()
            .and_then(|_| signed_dose(&mut v, "worker_signature", &req.worker_signature));
        v.finish()?;
        let row = self
            .service
            .late_entry_row(self.service.db(), &req.late_entry_id)
            .await
            .map_err(Status::from)?;
        let entry: pb::LateEntry = crate::service::decode(&row.payload).map_err(Status::from)?;
        let allowed = match pb::ExceptionProcedure::try_from(entry.procedure) {
            Ok(pb::ExceptionProcedure::CdcConfirmation) => caller.has(roles::OFFICIAL),
            _ => caller.has(roles::VACCINATION_SITE) && caller.subject == entry.site_id,
        };
        if !allowed {
            return Err(Status::permission_denied(
                "this late entry is reviewed by another party (see its procedure)",
            ));
        }
        ok(self
            .service
            .review_late_entry(
                &req.request_id,
                row,
                &caller.subject,
                decision,
                &req.note,
                signed,
            )
            .await)
    }

    async fn list_late_entries(
        &self,
        request: Request<pb::ListLateEntriesRequest>,
    ) -> Result<Response<pb::ListLateEntriesResponse>, Status> {
        let caller = self.caller(
            &request,
            &[roles::APP, roles::VACCINATION_SITE, roles::OFFICIAL],
        )?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let state = match LateEntryState::try_from(req.state) {
            Ok(LateEntryState::Unspecified) => LateEntryState::Pending,
            Ok(s) => s,
            Err(_) => {
                v.add("state", "unknown state");
                LateEntryState::Pending
            }
        };
        let person = match &req.person {
            Some(_) => fields::person_ref(&mut v, "person", &req.person),
            None if caller.has(roles::OFFICIAL) || caller.has(roles::VACCINATION_SITE) => {
                String::new()
            }
            None => {
                v.add("person", "required for the app");
                String::new()
            }
        };
        if !req.site_id.is_empty() {
            fields::id(&mut v, "site_id", &req.site_id);
        }
        let (offset, limit) = fields::page_request(&mut v, &req.page);
        v.finish()?;
        // A site sees its own entries, with their evidence; officials all of them.
        let (site, evidence) = if caller.has(roles::OFFICIAL) {
            (req.site_id.clone(), true)
        } else if caller.has(roles::VACCINATION_SITE) {
            if !req.site_id.is_empty() && req.site_id != caller.subject {
                return Err(Status::permission_denied(
                    "a site lists its own late entries",
                ));
            }
            (caller.subject.clone(), true)
        } else {
            (req.site_id.clone(), false)
        };
        ok(self
            .service
            .list_late_entries(state, &site, &person, evidence, offset, limit)
            .await)
    }

    async fn issue_domestic_certificate(
        &self,
        request: Request<pb::IssueDomesticCertificateRequest>,
    ) -> Result<Response<pb::DomesticCertificate>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        v.finish()?;
        ok(self
            .service
            .issue_domestic(&person, req.include_qr_svg)
            .await)
    }

    async fn verify_domestic_certificate(
        &self,
        request: Request<pb::VerifyDomesticCertificateRequest>,
    ) -> Result<Response<pb::VerifyDomesticCertificateResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        if req.qr_payload.is_empty() || req.qr_payload.len() > 64 * 1024 {
            return Err(ServiceError::invalid("qr_payload", "required: at most 64 KiB").into());
        }
        ok(self.service.verify_domestic(&req.qr_payload).await)
    }

    async fn issue_international_certificate(
        &self,
        request: Request<pb::IssueInternationalCertificateRequest>,
    ) -> Result<Response<pb::InternationalCertificate>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        if !req.dose_id.is_empty() {
            fields::id(&mut v, "dose_id", &req.dose_id);
        }
        v.finish()?;
        ok(self
            .service
            .issue_international(&person, &req.dose_id, req.include_qr_svg)
            .await)
    }

    async fn get_signer_certificates(
        &self,
        _request: Request<pb::GetSignerCertificatesRequest>,
    ) -> Result<Response<pb::GetSignerCertificatesResponse>, Status> {
        Ok(Response::new(self.service.signer_certificates()))
    }

    async fn export_certificate_pdf(
        &self,
        request: Request<pb::ExportCertificatePdfRequest>,
    ) -> Result<Response<pb::ExportCertificatePdfResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        let kind = match CertificateKind::try_from(req.kind) {
            Ok(CertificateKind::Unspecified) | Err(_) => {
                v.add("kind", "DOMESTIC or INTERNATIONAL");
                CertificateKind::Unspecified
            }
            Ok(k) => k,
        };
        if !req.certificate_id.is_empty() {
            text(&mut v, "certificate_id", &req.certificate_id, 80, true);
        }
        v.finish()?;
        ok(self
            .service
            .export_pdf(&person, kind, &req.certificate_id, chinese(&req.locale))
            .await)
    }

    async fn list_booster_due(
        &self,
        request: Request<pb::ListBoosterDueRequest>,
    ) -> Result<Response<pb::ListBoosterDueResponse>, Status> {
        let caller = self.caller(&request, &[roles::APP, roles::OFFICIAL, roles::INTERNAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let due_before = match &req.due_before {
            None => Utc::now(),
            Some(_) => from_ts(&req.due_before).unwrap_or_else(|| {
                v.add("due_before", "not a valid time stamp");
                Utc::now()
            }),
        };
        division(&mut v, "division_code", &req.division_code, false);
        let person = match &req.person {
            Some(_) => fields::person_ref(&mut v, "person", &req.person),
            None if caller.has_any(&[roles::OFFICIAL, roles::INTERNAL]) => String::new(),
            None => {
                v.add("person", "required for the app");
                String::new()
            }
        };
        let (offset, limit) = fields::page_request(&mut v, &req.page);
        v.finish()?;
        ok(self
            .service
            .list_booster_due(due_before, &req.division_code, &person, offset, limit)
            .await)
    }

    async fn report_location(
        &self,
        request: Request<pb::ReportLocationRequest>,
    ) -> Result<Response<pb::ReportLocationResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        let at = fields::point(&mut v, "location", &req.location);
        let reported_at = match &req.reported_at {
            None => Utc::now(),
            Some(_) => from_ts(&req.reported_at)
                .filter(|t| *t <= Utc::now() + chrono::Duration::minutes(5))
                .unwrap_or_else(|| {
                    v.add("reported_at", "a time stamp not in the future");
                    Utc::now()
                }),
        };
        v.finish()?;
        ok(self
            .service
            .report_location(&person, at, reported_at, chinese(&req.locale))
            .await
            .map(|reminder| pb::ReportLocationResponse { reminder }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let keys =
            healthcode_codes::public_keys(&self.service.keys.signing, &self.service.keys.trusted);
        Ok(Response::new(GetPublicKeysResponse { keys }))
    }
}

/// A site's staff act for their own site only; health administrators for any.
fn own_site(caller: &Caller, site_id: &str) -> Result<(), Status> {
    if caller.has(roles::HEALTH_ADMIN) || caller.subject == site_id {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "a site manages its own worker keys",
        ))
    }
}
