//! The gRPC face of the gateway: authentication, roles, validation, then `service`.

use crate::display::{Lang, color_name};
use crate::service::{CheckIn, CodeRequest, Gateway, PlaceScope};
use healthcode_auth::{Caller, TokenVerifier, require_any, roles};
use healthcode_codes::{issue_offline, sign_place, verify_offline, verify_place};
use healthcode_crypto::VerifyingKey;
use healthcode_errors::fields::{self, request_id, text};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1::{
    CodeColor, GetPublicKeysRequest, GetPublicKeysResponse, ItemError, PersonRef,
};
use healthcode_proto::gateway::v1 as pb;
use healthcode_proto::risk::v1::ListColorHistoryRequest;
use pb::gateway_service_server::GatewayService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const MAX_BATCH_CHECK: usize = 10_000;

pub struct GatewayRpc {
    gateway: Arc<Gateway>,
    verifier: TokenVerifier,
}

impl GatewayRpc {
    pub fn new(gateway: Arc<Gateway>, verifier: TokenVerifier) -> Self {
        GatewayRpc { gateway, verifier }
    }

    fn caller<T>(&self, request: &Request<T>, allowed: &[&str]) -> Result<Caller, Status> {
        let caller = self.verifier.authenticate(request)?;
        if !allowed.is_empty() {
            require_any(&caller, allowed)?;
        }
        Ok(caller)
    }
}

fn st(err: ServiceError) -> Status {
    err.into()
}

fn person_id(v: &mut Violations, field: &str, person: &Option<PersonRef>) -> String {
    fields::person_id(v, field, person.as_ref().map(|p| p.person_id.as_str()))
}

fn page(
    v: &mut Violations,
    page: &Option<healthcode_proto::common::v1::PageRequest>,
) -> (u64, u64) {
    let page = page.clone().unwrap_or_default();
    fields::page(v, page.page_size, &page.page_token)
}

fn qr(v: &mut Violations, field: &str, value: &str) {
    if value.is_empty() {
        v.add(field, "required");
    } else if value.len() > healthcode_codes::MAX_QR_TEXT_LEN {
        v.add(field, "longer than any health code");
    }
}

fn guardian(v: &mut Violations, g: &Option<PersonRef>) -> Option<String> {
    g.as_ref().map(|_| person_id(v, "guardian", g))
}

fn lang(locale: &Option<healthcode_proto::common::v1::Locale>) -> Lang {
    Lang::from_tag(locale.as_ref().map(|l| l.tag.as_str()).unwrap_or(""))
}

/// A GB/T 2260 county-level division code.
fn division_code(v: &mut Violations, field: &str, value: &str) {
    if value.len() != 6 || !value.chars().all(|c| c.is_ascii_digit()) {
        v.add(field, "a GB/T 2260 county code: six digits");
    }
}

/// The places a caller acts on: a venue (even one that is also an official) those of the
/// checking unit its token names, an official any.
fn place_scope(caller: &Caller) -> PlaceScope<'_> {
    if caller.has(roles::OFFICIAL) && !caller.has(roles::VENUE) {
        PlaceScope::Any
    } else {
        PlaceScope::Unit(&caller.subject)
    }
}

fn new_place_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(10)
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

#[tonic::async_trait]
impl GatewayService for GatewayRpc {
    async fn show_my_code(
        &self,
        request: Request<pb::ShowMyCodeRequest>,
    ) -> Result<Response<pb::ShowMyCodeResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = person_id(&mut v, "person", &req.person);
        let guardian = guardian(&mut v, &req.guardian);
        v.finish().map_err(st)?;
        let code = self
            .gateway
            .show_code(CodeRequest {
                person_id: &person,
                guardian_id: guardian.as_deref(),
                lang: lang(&req.locale),
                care_mode: req.care_mode,
                include_svg: req.include_qr_svg,
            })
            .await
            .map_err(st)?;
        Ok(Response::new(code))
    }

    async fn get_offline_code(
        &self,
        request: Request<pb::GetOfflineCodeRequest>,
    ) -> Result<Response<pb::OfflineCode>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let person = person_id(&mut v, "person", &req.person);
        let guardian = guardian(&mut v, &req.guardian);
        if req.device_public_key.len() != 65
            || VerifyingKey::from_sec1("device", &req.device_public_key).is_err()
        {
            v.add(
                "device_public_key",
                "an SM2 public key, SEC1 uncompressed (65 bytes)",
            );
        }
        v.finish().map_err(st)?;
        let key = format!("offline:{person}:{}", req.request_id);
        if let Some(done) = self
            .gateway
            .reply::<pb::OfflineCode>(&key)
            .await
            .map_err(st)?
        {
            return Ok(Response::new(done));
        }
        // Same checks as showing the code (guardian, verified, a known color).
        let shown = self
            .gateway
            .show_code(CodeRequest {
                person_id: &person,
                guardian_id: guardian.as_deref(),
                lang: Lang::ZhCn,
                care_mode: false,
                include_svg: false,
            })
            .await
            .map_err(st)?;
        let now = chrono::Utc::now();
        let mut expires = now + chrono::Duration::hours(24);
        if let Some(until) = &shown.color_valid_until
            && until.seconds < expires.timestamp()
        {
            expires = chrono::DateTime::from_timestamp(until.seconds.max(now.timestamp() + 60), 0)
                .unwrap_or(expires);
        }
        let sealed = self
            .gateway
            .signer
            .seal_person(&person)
            .map_err(|e| st(ServiceError::internal(e.to_string())))?;
        let claims = pb::OfflineCredentialClaims {
            credential_id: uuid::Uuid::new_v4().to_string(),
            holder: shown.holder.clone(),
            color: shown.color,
            color_version: shown.color_version,
            device_public_key: req.device_public_key.clone(),
            issued_at: Some(ts(now)),
            expires_at: Some(ts(expires)),
            issuing_province: self.gateway.signer.province().to_owned(),
            sealed_person: sealed,
        };
        let code = issue_offline(self.gateway.signer.signing_key(), claims)
            .map_err(|e| st(ServiceError::internal(e.to_string())))?;
        let code = self
            .gateway
            .store_offline_code(&key, &person, code, expires)
            .await
            .map_err(st)?;
        Ok(Response::new(code))
    }

    async fn revoke_offline_code(
        &self,
        request: Request<pb::RevokeOfflineCodeRequest>,
    ) -> Result<Response<pb::RevokeOfflineCodeResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let person = person_id(&mut v, "person", &req.person);
        let credential = (!req.credential_id.is_empty()).then_some(req.credential_id.as_str());
        if let Some(id) = credential
            && !uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
        {
            v.add(
                "credential_id",
                "a credential id (UUID) from GetOfflineCode, or empty for every credential",
            );
        }
        v.finish().map_err(st)?;
        let key = format!("revoke:{person}:{}", req.request_id);
        Ok(Response::new(
            self.gateway
                .revoke_offline_codes(&key, &person, credential)
                .await
                .map_err(st)?,
        ))
    }

    async fn verify_offline_code(
        &self,
        request: Request<pb::VerifyOfflineCodeRequest>,
    ) -> Result<Response<pb::VerifyOfflineCodeResponse>, Status> {
        self.caller(&request, &[roles::VENUE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        qr(&mut v, "qr_payload", &req.qr_payload);
        let scanned = req
            .scanned_at
            .as_ref()
            .map(|t| t.seconds)
            .unwrap_or_else(|| chrono::Utc::now().timestamp());
        v.finish().map_err(st)?;
        let verified = match verify_offline(&req.qr_payload, &self.gateway.keys, scanned) {
            Ok(ok) => ok,
            Err(result) => {
                return Ok(Response::new(pb::VerifyOfflineCodeResponse {
                    result: result as i32,
                    ..Default::default()
                }));
            }
        };
        let claims = verified.claims;
        let row = self
            .gateway
            .offline_credential(&claims.credential_id)
            .await
            .map_err(st)?;
        let mut color = claims.color;
        let mut revocation_checked = false;
        if let Some(row) = row {
            let current = self.gateway.colors.get(&row.person_id).await.ok();
            revocation_checked = current.is_some();
            let changed = current
                .as_ref()
                .is_some_and(|c| c.version as i64 != row.color_version);
            if row.revoked || changed {
                return Ok(Response::new(pb::VerifyOfflineCodeResponse {
                    result: pb::ScanResult::Revoked as i32,
                    revocation_checked: true,
                    credential_expires_at: claims.expires_at,
                    ..Default::default()
                }));
            }
            if let Some(c) = current {
                color = c.color;
            }
        }
        Ok(Response::new(pb::VerifyOfflineCodeResponse {
            result: pb::ScanResult::Valid as i32,
            color,
            holder: claims.holder,
            entry_allowed: false,
            scan_id: String::new(),
            scanned_at: Some(prost_types::Timestamp {
                seconds: scanned,
                nanos: 0,
            }),
            credential_expires_at: claims.expires_at,
            revocation_checked,
        }))
    }

    async fn verify_scan(
        &self,
        request: Request<pb::VerifyScanRequest>,
    ) -> Result<Response<pb::VerifyScanResponse>, Status> {
        let caller = self.caller(&request, &[roles::VENUE])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        qr(&mut v, "qr_payload", &req.qr_payload);
        text(&mut v, "place_code", &req.place_code, 16, true);
        text(&mut v, "scanner_id", &req.scanner_id, 64, false);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.gateway
                .verify_scan(&caller.subject, &req)
                .await
                .map_err(st)?,
        ))
    }

    async fn register_place(
        &self,
        request: Request<pb::RegisterPlaceRequest>,
    ) -> Result<Response<pb::Place>, Status> {
        let caller = self.caller(&request, &[roles::VENUE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let Some(mut place) = req.place else {
            return Err(st(ServiceError::invalid("place", "required")));
        };
        text(&mut v, "place.name", &place.name, 100, true);
        text(&mut v, "place.address", &place.address, 200, true);
        text(
            &mut v,
            "place.checking_unit",
            &place.checking_unit,
            100,
            true,
        );
        division_code(&mut v, "place.division_code", &place.division_code);
        if let Some(p) = &place.location
            && (!(-90.0..=90.0).contains(&p.latitude) || !(-180.0..=180.0).contains(&p.longitude))
        {
            v.add("place.location", "latitude -90..90, longitude -180..180");
        }
        if pb::PlaceCategory::try_from(place.category).is_err() {
            v.add("place.category", "unknown category");
        }
        if CodeColor::try_from(place.admits_up_to).is_err() {
            v.add("place.admits_up_to", "unknown color");
        }
        match place_scope(&caller) {
            PlaceScope::Any => text(
                &mut v,
                "place.checking_unit_code",
                &place.checking_unit_code,
                128,
                true,
            ),
            PlaceScope::Unit(own) => place.checking_unit_code = own.to_owned(),
        }
        v.finish().map_err(st)?;
        let key = format!("place:{}:{}", caller.subject, req.request_id);
        if let Some(done) = self.gateway.reply::<pb::Place>(&key).await.map_err(st)? {
            return Ok(Response::new(done));
        }
        let now = chrono::Utc::now();
        place.place_code = new_place_code();
        place.active = true;
        place.registered_at = Some(ts(now));
        place.qr_payload = sign_place(
            self.gateway.signer.signing_key(),
            &pb::PlaceClaims {
                place_code: place.place_code.clone(),
                name: place.name.clone(),
                division_code: place.division_code.clone(),
                issued_at: Some(ts(now)),
            },
        )
        .map_err(|e| st(ServiceError::internal(e.to_string())))?;
        Ok(Response::new(
            self.gateway
                .register_place(&key, place, now)
                .await
                .map_err(st)?,
        ))
    }

    async fn get_place(
        &self,
        request: Request<pb::GetPlaceRequest>,
    ) -> Result<Response<pb::Place>, Status> {
        self.caller(&request, &[])?;
        let code = match request.into_inner().place {
            Some(pb::get_place_request::Place::PlaceCode(code)) => code,
            Some(pb::get_place_request::Place::QrPayload(text)) => {
                verify_place(&text, &self.gateway.keys)
                    .map_err(|_| {
                        st(ServiceError::invalid(
                            "qr_payload",
                            "not a place code signed by this province",
                        ))
                    })?
                    .place_code
            }
            None => {
                return Err(st(ServiceError::invalid(
                    "place",
                    "one of place_code, qr_payload is required",
                )));
            }
        };
        if code.is_empty() || code.len() > 16 {
            return Err(st(ServiceError::invalid(
                "place_code",
                "1 to 16 characters",
            )));
        }
        Ok(Response::new(self.gateway.place(&code).await.map_err(st)?))
    }

    async fn list_places(
        &self,
        request: Request<pb::ListPlacesRequest>,
    ) -> Result<Response<pb::ListPlacesResponse>, Status> {
        let caller = self.caller(&request, &[roles::VENUE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        text(
            &mut v,
            "checking_unit_code",
            &req.checking_unit_code,
            128,
            false,
        );
        if !req.division_code.is_empty() {
            division_code(&mut v, "division_code", &req.division_code);
        }
        let (offset, limit) = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let asked = (!req.checking_unit_code.is_empty()).then_some(req.checking_unit_code.as_str());
        let unit = match place_scope(&caller) {
            PlaceScope::Any => asked,
            PlaceScope::Unit(own) if asked.is_none_or(|u| u == own) => Some(own),
            PlaceScope::Unit(_) => {
                return Err(st(ServiceError::PermissionDenied(
                    "a venue lists only the places of its own checking unit".into(),
                )));
            }
        };
        let division = (!req.division_code.is_empty()).then_some(req.division_code.as_str());
        let (places, more) = self
            .gateway
            .list_places(unit, division, offset, limit)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListPlacesResponse {
            places,
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn deactivate_place(
        &self,
        request: Request<pb::DeactivatePlaceRequest>,
    ) -> Result<Response<pb::Place>, Status> {
        let caller = self.caller(&request, &[roles::VENUE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "place_code", &req.place_code, 16, true);
        text(&mut v, "reason", &req.reason, 200, true);
        v.finish().map_err(st)?;
        let key = format!("deactivate:{}:{}", caller.subject, req.request_id);
        Ok(Response::new(
            self.gateway
                .deactivate_place(
                    &key,
                    &req.place_code,
                    place_scope(&caller),
                    &caller.subject,
                    &req.reason,
                )
                .await
                .map_err(st)?,
        ))
    }

    async fn check_in(
        &self,
        request: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let person = person_id(&mut v, "person", &req.person);
        let guardian = guardian(&mut v, &req.guardian);
        let place = if req.place_qr_payload.is_empty() {
            v.add("place_qr_payload", "required");
            None
        } else if req.place_qr_payload.len() > healthcode_codes::MAX_QR_TEXT_LEN {
            v.add("place_qr_payload", "longer than any place code");
            None
        } else {
            v.check(
                "place_qr_payload",
                verify_place(&req.place_qr_payload, &self.gateway.keys)
                    .map_err(|_| "not a place code signed by this province"),
            )
        };
        v.finish().map_err(st)?;
        let Some(place) = place else {
            return Err(st(ServiceError::invalid("place_qr_payload", "required")));
        };
        Ok(Response::new(
            self.gateway
                .check_in(CheckIn {
                    request_id: &req.request_id,
                    person_id: &person,
                    guardian_id: guardian.as_deref(),
                    place_code: &place.place_code,
                    lang: lang(&req.locale),
                    care_mode: req.care_mode,
                })
                .await
                .map_err(st)?,
        ))
    }

    async fn list_check_records(
        &self,
        request: Request<pb::ListCheckRecordsRequest>,
    ) -> Result<Response<pb::ListCheckRecordsResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = person_id(&mut v, "person", &req.person);
        let guardian = guardian(&mut v, &req.guardian);
        let (offset, limit) = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        if let Some(g) = guardian {
            self.gateway.check_guardian(&g, &person).await.map_err(st)?;
        }
        let records = self
            .gateway
            .check_records(&person, offset, limit)
            .await
            .map_err(st)?;
        let next_page_token = if records.len() as u64 == limit {
            (offset + limit).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListCheckRecordsResponse {
            records,
            next_page_token,
        }))
    }

    async fn batch_check(
        &self,
        request: Request<pb::BatchCheckRequest>,
    ) -> Result<Response<pb::BatchCheckResponse>, Status> {
        let caller = self.caller(&request, &[roles::BATCH_CHECKER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        if req.items.is_empty() || req.items.len() > MAX_BATCH_CHECK {
            v.add("items", format!("1 to {MAX_BATCH_CHECK} persons"));
        }
        v.finish().map_err(st)?;
        let mut ids = Vec::with_capacity(req.items.len());
        let mut errors = Vec::new();
        for (i, item) in req.items.iter().enumerate() {
            let mut iv = Violations::new();
            let id = person_id(&mut iv, &format!("items[{i}].person"), &item.person);
            text(
                &mut iv,
                &format!("items[{i}].item_id"),
                &item.item_id,
                64,
                false,
            );
            if iv.is_empty() {
                ids.push((i, id));
            } else {
                errors.push(ItemError {
                    index: i as u32,
                    item_id: item.item_id.chars().take(64).collect(),
                    code: tonic::Code::InvalidArgument as i32,
                    reason: "INVALID_ITEM".into(),
                    message:
                        "person must be a UUID in canonical form; item_id at most 64 characters"
                            .into(),
                });
            }
        }
        Ok(Response::new(
            self.gateway
                .batch_check(&caller.subject, &req, ids, errors)
                .await
                .map_err(st)?,
        ))
    }

    async fn get_health_calendar(
        &self,
        request: Request<pb::GetHealthCalendarRequest>,
    ) -> Result<Response<pb::GetHealthCalendarResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = person_id(&mut v, "person", &req.person);
        let guardian = guardian(&mut v, &req.guardian);
        let now = chrono::Utc::now().timestamp();
        let until = req.until.map(|t| t.seconds).unwrap_or(now);
        let since = req.since.map(|t| t.seconds).unwrap_or(until - 90 * 86_400);
        if until < since || until - since > 366 * 86_400 {
            v.add(
                "since",
                "the window must be at most 366 days, since before until",
            );
        }
        v.finish().map_err(st)?;
        if let Some(g) = guardian {
            self.gateway.check_guardian(&g, &person).await.map_err(st)?;
        }
        let lang = lang(&req.locale);
        let wants =
            |k: pb::CalendarEntryKind| req.kinds.is_empty() || req.kinds.contains(&(k as i32));
        let mut entries = Vec::new();
        let mut unavailable = Vec::new();
        // Tests and vaccinations come with the testing and vaccination services (not built yet).
        for kind in [
            pb::CalendarEntryKind::Test,
            pb::CalendarEntryKind::Vaccination,
        ] {
            if wants(kind) {
                unavailable.push(kind as i32);
            }
        }
        if wants(pb::CalendarEntryKind::ColorChange) {
            let mut risk = self.gateway.upstreams.risk.clone();
            let reply = risk
                .list_color_history(self.gateway.upstreams.request(ListColorHistoryRequest {
                    person: Some(PersonRef {
                        person_id: person.clone(),
                    }),
                    since: Some(prost_types::Timestamp {
                        seconds: since,
                        nanos: 0,
                    }),
                    // Open-ended unless asked: a change in this very second is shown.
                    until: req.until,
                    page: None,
                }))
                .await;
            match reply {
                Ok(reply) => {
                    for change in reply.into_inner().changes {
                        let to =
                            CodeColor::try_from(change.to_color).unwrap_or(CodeColor::Unspecified);
                        entries.push(pb::CalendarEntry {
                            at: change.changed_at,
                            kind: pb::CalendarEntryKind::ColorChange as i32,
                            title: color_name(to, lang).to_owned(),
                            detail: String::new(),
                            entry: Some(pb::calendar_entry::Entry::ColorChange(
                                pb::ColorChangeEntry {
                                    from_color: change.from_color,
                                    to_color: change.to_color,
                                    reason_codes: change.reasons.iter().map(|r| r.code).collect(),
                                },
                            )),
                        });
                    }
                }
                Err(_) => unavailable.push(pb::CalendarEntryKind::ColorChange as i32),
            }
        }
        Ok(Response::new(pb::GetHealthCalendarResponse {
            entries,
            unavailable_kinds: unavailable,
        }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let keys =
            healthcode_codes::public_keys(self.gateway.signer.signing_key(), &self.gateway.keys);
        Ok(Response::new(GetPublicKeysResponse { keys }))
    }
}
