//! The gRPC face of the exchange: who is calling (a partner by its TLS client certificate,
//! a service or operator by its token), what it may do, every bad field named, then the
//! service.

use crate::arrival::ArrivalRequest;
use crate::records::is_province;
use crate::service::{DEFAULT_PAGE, Exchange, MAX_PAGE, NewPartner, PartnerChanges};
use crate::store::entities::partner;
use crate::sync::PartnerSync;
use crate::tls::{peer_fingerprint, pem_fingerprint};
use chrono::Utc;
use healthcode_auth::{TokenVerifier, require_any, roles};
use healthcode_crypto::VerifyingKey;
use healthcode_errors::fields::{self, pseudonym, request_id, text};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1::{GetPublicKeysRequest, GetPublicKeysResponse, PublicKey};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::time::from_ts;
use pb::exchange_service_server::ExchangeService;
use pb::{PartnerKind, PartnerState, SyncMode};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Records per PublishRecords and pseudonyms per RefreshPersons.
pub const MAX_BATCH: usize = 1_000;

pub struct ExchangeRpc {
    service: Arc<Exchange>,
    sync: Arc<PartnerSync>,
    verifier: TokenVerifier,
}

impl ExchangeRpc {
    pub fn new(service: Arc<Exchange>, sync: Arc<PartnerSync>, verifier: TokenVerifier) -> Self {
        ExchangeRpc {
            service,
            sync,
            verifier,
        }
    }

    /// A service of this mesh or an operator, by its token, on the internal listener only:
    /// a call that came through the partner listener (it carries a client certificate)
    /// never reaches the registry or another person's data, whatever token it shows.
    fn internal<T>(&self, request: &Request<T>, allowed: &[&str]) -> Result<(), Status> {
        if request.peer_certs().is_some() {
            return Err(Status::permission_denied(
                "this call is served on the internal listener only",
            ));
        }
        let caller = self.verifier.authenticate(request)?;
        require_any(&caller, allowed)
    }

    /// The registered, active partner that presented the client certificate of this TLS
    /// connection, of one of `kinds`.
    async fn partner<T>(
        &self,
        request: &Request<T>,
        kinds: &[PartnerKind],
    ) -> Result<partner::Model, Status> {
        let fingerprint = peer_fingerprint(request).ok_or_else(|| {
            Status::unauthenticated(
                "partner calls come through the partner listener, with a TLS client certificate",
            )
        })?;
        let partner = self
            .service
            .partner_by_certificate(&fingerprint)
            .await?
            .ok_or_else(|| {
                Status::permission_denied("this client certificate is not registered to a partner")
            })?;
        if partner.state == PartnerState::Suspended as i32 {
            return Err(ServiceError::precondition(
                "PARTNER_SUSPENDED",
                "this partner is suspended",
            )
            .into());
        }
        if !kinds.iter().any(|k| *k as i32 == partner.kind) {
            return Err(Status::permission_denied(
                "this partner's kind may not make this call",
            ));
        }
        Ok(partner)
    }
}

const PROVINCES: &[PartnerKind] = &[
    PartnerKind::Province,
    PartnerKind::SpecialRegion,
    PartnerKind::NationalPlatform,
];

fn ok<T>(result: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

/// A partner id fits its kind: a province-level code for provinces and special regions,
/// "national" for the national platform, a registered name (0-9, a-z, `-`) for transport.
fn partner_id(v: &mut Violations, field: &str, id: &str, kind: Option<PartnerKind>) {
    let name = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
    let fits = match kind {
        Some(PartnerKind::Province) | Some(PartnerKind::SpecialRegion) => is_province(id),
        Some(PartnerKind::NationalPlatform) => id == "national",
        Some(PartnerKind::Transport) => name && !is_province(id) && id != "national",
        _ => name,
    };
    if !fits {
        v.add(
            field,
            "a GB/T 2260 province-level code for provinces and special regions, \"national\" \
             for the national platform, 1 to 64 of 0-9, a-z and - for transport partners",
        );
    }
}

fn endpoint(v: &mut Violations, field: &str, value: &str) {
    if !value.is_empty()
        && (!value.starts_with("https://")
            || value.len() > 256
            || value.parse::<tonic::codegen::http::Uri>().is_err())
    {
        v.add(field, "an https:// URL of at most 256 characters");
    }
}

fn certificate(v: &mut Violations, field: &str, pem: &str) -> String {
    if pem.len() > 16 * 1024 {
        v.add(field, "at most 16 KiB");
        return String::new();
    }
    match pem_fingerprint(pem) {
        Ok(sha256) => sha256,
        Err(_) => {
            v.add(field, "required: a PEM X.509 certificate");
            String::new()
        }
    }
}

fn signing_key(v: &mut Violations, field: &str, key: Option<&PublicKey>) -> Option<VerifyingKey> {
    let Some(key) = key else {
        v.add(field, "required");
        return None;
    };
    fields::id(v, &format!("{field}.key_id"), &key.key_id);
    if !(key.algorithm.is_empty() || key.algorithm == "SM2") {
        v.add(format!("{field}.algorithm"), "SM2 only");
    }
    v.check(
        &format!("{field}.public_key_sec1"),
        VerifyingKey::from_sec1(key.key_id.clone(), &key.public_key_sec1)
            .map_err(|_| "an SM2 public key, SEC1 uncompressed"),
    )
}

fn known<E: TryFrom<i32>>(v: &mut Violations, field: &str, value: i32, unspecified_ok: bool) {
    if E::try_from(value).is_err() || (!unspecified_ok && value == 0) {
        v.add(field, "required: one of the listed values");
    }
}

fn check_partner(v: &mut Violations, p: &pb::Partner) -> (String, Vec<VerifyingKey>) {
    known::<PartnerKind>(v, "partner.kind", p.kind, false);
    partner_id(
        v,
        "partner.partner_id",
        &p.partner_id,
        PartnerKind::try_from(p.kind).ok(),
    );
    text(v, "partner.name", &p.name, 128, true);
    known::<SyncMode>(v, "partner.sync_mode", p.sync_mode, false);
    known::<PartnerState>(v, "partner.state", p.state, true);
    endpoint(v, "partner.endpoint", &p.endpoint);
    if p.sync_mode == SyncMode::RealTime as i32 && p.endpoint.is_empty() {
        v.add("partner.endpoint", "required for a real-time partner");
    }
    let sha256 = certificate(
        v,
        "partner.tls_client_certificate_pem",
        &p.tls_client_certificate_pem,
    );
    let is_transport = p.kind == PartnerKind::Transport as i32;
    if p.keys.is_empty() && !is_transport {
        v.add("partner.keys", "at least one signing key");
    }
    let keys = p
        .keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| {
            if k.revoked_at.is_some() {
                v.add(
                    format!("partner.keys[{i}].revoked_at"),
                    "keys are revoked through RevokePartnerKey",
                );
            }
            signing_key(v, &format!("partner.keys[{i}].key"), k.key.as_ref())
        })
        .collect::<Vec<_>>();
    let mut ids: Vec<&str> = keys.iter().map(|k| k.key_id()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        v.add("partner.keys", "key ids must differ");
    }
    (sha256, keys)
}

#[tonic::async_trait]
impl ExchangeService for ExchangeRpc {
    async fn register_partner(
        &self,
        request: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &r.request_id);
        let mut partner = r.partner.unwrap_or_default();
        let (certificate_sha256, keys) = check_partner(&mut v, &partner);
        if partner.partner_id == self.service.province() {
            v.add(
                "partner.partner_id",
                "this province itself cannot be its own partner",
            );
        }
        v.finish()?;
        if partner.state == 0 {
            partner.state = PartnerState::Active as i32;
        }
        ok(self
            .service
            .register_partner(
                &r.request_id,
                NewPartner {
                    partner,
                    certificate_sha256,
                    keys,
                },
            )
            .await)
    }

    async fn update_partner(
        &self,
        request: Request<pb::UpdatePartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN])?;
        let r = request.into_inner();
        let p = r.partner.unwrap_or_default();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut v = Violations::new();
        partner_id(&mut v, "partner.partner_id", &p.partner_id, None);
        if paths.is_empty() {
            v.add("update_mask", "name at least one field");
        }
        let mut changes = PartnerChanges::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    text(&mut v, "partner.name", &p.name, 128, true);
                    changes.name = Some(p.name.clone());
                }
                "sync_mode" => {
                    known::<SyncMode>(&mut v, "partner.sync_mode", p.sync_mode, false);
                    changes.sync_mode = Some(p.sync_mode);
                }
                "endpoint" => {
                    endpoint(&mut v, "partner.endpoint", &p.endpoint);
                    changes.endpoint = Some(p.endpoint.clone());
                }
                "state" => {
                    known::<PartnerState>(&mut v, "partner.state", p.state, false);
                    changes.state = Some(p.state);
                }
                "tls_client_certificate_pem" => {
                    let sha256 = certificate(
                        &mut v,
                        "partner.tls_client_certificate_pem",
                        &p.tls_client_certificate_pem,
                    );
                    changes.certificate = Some((p.tls_client_certificate_pem.clone(), sha256));
                }
                other => v.add(
                    "update_mask",
                    format!(
                        "`{other}` cannot be updated (name, sync_mode, endpoint, state, tls_client_certificate_pem)"
                    ),
                ),
            }
        }
        v.finish()?;
        ok(self.service.update_partner(&p.partner_id, changes).await)
    }

    async fn get_partner(
        &self,
        request: Request<pb::GetPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN, roles::INTERNAL])?;
        let mut v = Violations::new();
        partner_id(&mut v, "partner_id", &request.get_ref().partner_id, None);
        v.finish()?;
        ok(self.service.partner(&request.get_ref().partner_id).await)
    }

    async fn list_partners(
        &self,
        request: Request<pb::ListPartnersRequest>,
    ) -> Result<Response<pb::ListPartnersResponse>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN, roles::INTERNAL])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        known::<PartnerKind>(&mut v, "kind", r.kind, true);
        known::<SyncMode>(&mut v, "sync_mode", r.sync_mode, true);
        let page = r.page.unwrap_or_default();
        let (offset, limit) = fields::page(&mut v, page.page_size, &page.page_token);
        v.finish()?;
        ok(self
            .service
            .list_partners(r.kind, r.sync_mode, offset, limit)
            .await)
    }

    async fn add_partner_key(
        &self,
        request: Request<pb::AddPartnerKeyRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &r.request_id);
        partner_id(&mut v, "partner_id", &r.partner_id, None);
        let key = signing_key(&mut v, "key", r.key.as_ref());
        v.finish()?;
        let Some(key) = key else {
            return Err(Status::invalid_argument("key: required"));
        };
        ok(self
            .service
            .add_partner_key(&r.request_id, &r.partner_id, key)
            .await)
    }

    async fn revoke_partner_key(
        &self,
        request: Request<pb::RevokePartnerKeyRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &r.request_id);
        partner_id(&mut v, "partner_id", &r.partner_id, None);
        fields::id(&mut v, "key_id", &r.key_id);
        text(&mut v, "reason", &r.reason, 256, true);
        v.finish()?;
        ok(self
            .service
            .revoke_partner_key(
                &r.request_id,
                &r.partner_id,
                &r.key_id,
                &r.reason,
                r.distrust_earlier,
            )
            .await)
    }

    type SubscribeStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let partner = self.partner(&request, PROVINCES).await?;
        if partner.sync_mode != SyncMode::RealTime as i32 {
            return Err(ServiceError::precondition(
                "NOT_REAL_TIME",
                "this partner is registered for manual sync: use PullChanges",
            )
            .into());
        }
        let (after, _) = self.service.position(&request.get_ref().cursor).await?;
        self.service
            .note_outbound(&partner.partner_id, after)
            .await?;
        let rx = self
            .service
            .subscribe(&partner.partner_id, &partner.certificate_sha256, after)?;
        tracing::info!(partner = %partner.partner_id, after, "partner subscribed");
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn pull_changes(
        &self,
        request: Request<pb::PullChangesRequest>,
    ) -> Result<Response<pb::PullChangesResponse>, Status> {
        let partner = self.partner(&request, PROVINCES).await?;
        let _permit = self.service.call_permit(&partner.partner_id)?;
        let r = request.get_ref();
        let max = match u64::from(r.max_records) {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(ServiceError::invalid("max_records", "at most 1,000").into());
            }
            n => n,
        };
        ok(self.service.pull(&partner.partner_id, &r.cursor, max).await)
    }

    async fn refresh_persons(
        &self,
        request: Request<pb::RefreshPersonsRequest>,
    ) -> Result<Response<pb::RefreshPersonsResponse>, Status> {
        let partner = self.partner(&request, PROVINCES).await?;
        let _permit = self.service.call_permit(&partner.partner_id)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        if r.pseudonyms.is_empty() || r.pseudonyms.len() > MAX_BATCH {
            v.add("pseudonyms", "1 to 1,000 pseudonyms");
        }
        for (i, p) in r.pseudonyms.iter().enumerate() {
            pseudonym(&mut v, &format!("pseudonyms[{i}]"), p);
        }
        v.finish()?;
        ok(self.service.refresh_persons(&r.pseudonyms).await)
    }

    async fn publish_records(
        &self,
        request: Request<pb::PublishRecordsRequest>,
    ) -> Result<Response<pb::PublishRecordsResponse>, Status> {
        let partner = self.partner(&request, PROVINCES).await?;
        let _permit = self.service.call_permit(&partner.partner_id)?;
        let r = request.get_ref();
        if r.records.is_empty() || r.records.len() > MAX_BATCH {
            return Err(ServiceError::invalid("records", "1 to 1,000 records").into());
        }
        let done = self
            .service
            .ingest(&partner.partner_id, &r.records, None, None)
            .await?;
        Ok(Response::new(pb::PublishRecordsResponse {
            accepted: done.received,
            duplicates: done.duplicates,
            errors: done.errors,
            acknowledged_sequence: done.acknowledged,
        }))
    }

    async fn national_check(
        &self,
        request: Request<pb::NationalCheckRequest>,
    ) -> Result<Response<pb::NationalCheckResponse>, Status> {
        use pb::national_check_request::Subject;
        if peer_fingerprint(&request).is_some() {
            // A partner asks about a person by pseudonym and gets this province's record.
            let partner = self.partner(&request, PROVINCES).await?;
            let _permit = self.service.call_permit(&partner.partner_id)?;
            let mut v = Violations::new();
            let Some(Subject::Pseudonym(p)) = &request.get_ref().subject else {
                return Err(ServiceError::invalid(
                    "pseudonym",
                    "partners name the person by pseudonym",
                )
                .into());
            };
            pseudonym(&mut v, "pseudonym", p);
            v.finish()?;
            return ok(self.service.own_answer(p).await);
        }
        self.internal(&request, &[roles::INTERNAL])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &r.request_id);
        let person = match &r.subject {
            Some(Subject::Person(p)) => {
                fields::person_id(&mut v, "person", Some(p.person_id.as_str()))
            }
            _ => {
                v.add(
                    "person",
                    "required: internal callers name the person by PersonRef",
                );
                String::new()
            }
        };
        let mut partners = r.partner_ids.clone();
        if partners.is_empty() {
            partners.push("national".into());
        }
        if partners.len() > crate::sync::MAX_CHECKED_PARTNERS {
            v.add("partner_ids", "at most 16 partners");
        }
        for (i, id) in partners.iter().enumerate() {
            partner_id(&mut v, &format!("partner_ids[{i}]"), id, None);
        }
        // Each partner once, in the order asked (per-partner errors index this list).
        let mut seen = std::collections::HashSet::new();
        partners.retain(|p| seen.insert(p.clone()));
        v.finish()?;
        ok(self
            .sync
            .national_check(&r.request_id, &person, &partners, r.record_in_risk)
            .await)
    }

    async fn get_merged_color(
        &self,
        request: Request<pb::GetMergedColorRequest>,
    ) -> Result<Response<pb::MergedColor>, Status> {
        use pb::get_merged_color_request::Subject;
        let pseudonym = if peer_fingerprint(&request).is_some() {
            let partner = self.partner(&request, &[PartnerKind::Transport]).await?;
            let _permit = self.service.call_permit(&partner.partner_id)?;
            match &request.get_ref().subject {
                Some(Subject::Pseudonym(p)) => {
                    let mut v = Violations::new();
                    pseudonym(&mut v, "pseudonym", p);
                    v.finish()?;
                    p.clone()
                }
                _ => {
                    return Err(ServiceError::invalid(
                        "pseudonym",
                        "transport partners name the person by pseudonym",
                    )
                    .into());
                }
            }
        } else {
            self.internal(&request, &[roles::INTERNAL])?;
            match &request.get_ref().subject {
                Some(Subject::Person(person)) => {
                    let mut v = Violations::new();
                    let id = fields::person_id(&mut v, "person", Some(person.person_id.as_str()));
                    v.finish()?;
                    self.service.pseudonym_of(&id).await?
                }
                Some(Subject::Pseudonym(p)) => {
                    let mut v = Violations::new();
                    pseudonym(&mut v, "pseudonym", p);
                    v.finish()?;
                    p.clone()
                }
                None => return Err(ServiceError::invalid("person", "required").into()),
            }
        };
        ok(self.service.merged_color(&pseudonym, Utc::now()).await)
    }

    async fn issue_arrival_code(
        &self,
        request: Request<pb::IssueArrivalCodeRequest>,
    ) -> Result<Response<pb::ArrivalCode>, Status> {
        let partner = self.partner(&request, &[PartnerKind::Transport]).await?;
        let _permit = self.service.call_permit(&partner.partner_id)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        request_id(&mut v, &r.request_id);
        pseudonym(&mut v, "pseudonym", &r.pseudonym);
        if r.destination_division_code.len() != 6
            || !r
                .destination_division_code
                .bytes()
                .all(|b| b.is_ascii_digit())
        {
            v.add(
                "destination_division_code",
                "a GB/T 2260 division code: six digits",
            );
        }
        let mode = pb::TransportMode::try_from(r.mode).unwrap_or_default();
        if mode == pb::TransportMode::Unspecified {
            v.add("mode", "RAIL or AIR");
        }
        text(&mut v, "trip_reference", &r.trip_reference, 64, true);
        if !r.baggage_tag.is_empty() {
            if mode != pb::TransportMode::Air {
                v.add("baggage_tag", "only an airport code carries a baggage tag");
            } else if r.baggage_tag.len() > 32
                || !r.baggage_tag.chars().all(|c| c.is_ascii_alphanumeric())
            {
                v.add("baggage_tag", "1 to 32 letters and digits");
            }
        }
        let now = Utc::now();
        let arrival = from_ts(&r.expected_arrival_at);
        let asked = ArrivalRequest {
            partner_id: &partner.partner_id,
            request_id: &r.request_id,
            pseudonym: &r.pseudonym,
            destination: &r.destination_division_code,
            mode: r.mode,
            trip_reference: &r.trip_reference,
            baggage_tag: &r.baggage_tag,
            expected_arrival_at: arrival.unwrap_or(now),
        };
        let outside = match arrival {
            None => Some("required"),
            Some(t) if t <= now => Some("must be in the future"),
            Some(t) if t > now + chrono::Duration::days(crate::arrival::MAX_DAYS_AHEAD) => {
                Some("at most 15 days ahead")
            }
            Some(_) => None,
        };
        if let Some(problem) = outside {
            // A retry of a request answered before its arrival passed gets its code.
            if v.is_empty()
                && arrival.is_some()
                && let Some(answer) = self.service.issued_arrival_code(&asked).await?
            {
                return Ok(Response::new(answer));
            }
            v.add("expected_arrival_at", problem);
        }
        v.finish()?;
        ok(self.service.issue_arrival_code(asked).await)
    }

    async fn refresh_from_partner(
        &self,
        request: Request<pb::RefreshFromPartnerRequest>,
    ) -> Result<Response<pb::RefreshFromPartnerResponse>, Status> {
        self.internal(&request, &[roles::INTERNAL, roles::EXCHANGE_ADMIN])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        partner_id(&mut v, "partner_id", &r.partner_id, None);
        if !r.persons.is_empty() {
            v.add(
                "persons",
                "refreshing named persons is not built yet; leave empty to pull every change",
            );
        }
        v.finish()?;
        ok(self.sync.refresh(&r.partner_id).await)
    }

    async fn list_sync_status(
        &self,
        request: Request<pb::ListSyncStatusRequest>,
    ) -> Result<Response<pb::ListSyncStatusResponse>, Status> {
        self.internal(&request, &[roles::EXCHANGE_ADMIN, roles::INTERNAL])?;
        let r = request.into_inner();
        let mut v = Violations::new();
        for (i, id) in r.partner_ids.iter().enumerate() {
            partner_id(&mut v, &format!("partner_ids[{i}]"), id, None);
        }
        v.finish()?;
        ok(self.service.sync_status(&r.partner_ids).await)
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let key = self.service.signing_key();
        let mut trusted = healthcode_crypto::TrustedKeys::default();
        trusted.insert(key.verifying_key());
        Ok(Response::new(GetPublicKeysResponse {
            keys: healthcode_codes::public_keys(key, &trusted),
        }))
    }
}
