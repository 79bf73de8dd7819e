//! The gRPC face of the testing service: authentication, roles, validation, then the
//! service. Every bad field is named; nothing is written before the checks pass.

use crate::payments::Notification;
use crate::results::{MAX_UPLOAD, NewSample};
use crate::service::{BookingScope, MAX_POOL_SIZE, NewBooking, Testing, from_ts, minute};
use chrono::Utc;
use healthcode_auth::{Caller, TokenVerifier, require_any, roles};
use healthcode_errors::fields::{self, request_id, text};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1::{GeoPoint, GetPublicKeysRequest, GetPublicKeysResponse};
use healthcode_proto::testing::v1 as pb;
use pb::testing_service_server::TestingService;
use pb::{InstitutionKind, PaymentOutcome, PaymentProvider, RetestNoticeState, SampleKind};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const MAX_WINDOWS: usize = 2_000;
pub const MAX_RADIUS_M: u32 = 50_000;

pub struct TestingRpc {
    testing: Arc<Testing>,
    verifier: TokenVerifier,
}

impl TestingRpc {
    pub fn new(testing: Arc<Testing>, verifier: TokenVerifier) -> Self {
        TestingRpc { testing, verifier }
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

fn ok<T>(result: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(st)
}

fn sample_kind(v: &mut Violations, field: &str, value: i32, allow_unspecified: bool) -> SampleKind {
    match SampleKind::try_from(value) {
        Ok(SampleKind::Unspecified) if !allow_unspecified => {
            v.add(field, "SINGLE_TUBE or POOLED");
            SampleKind::Unspecified
        }
        Ok(kind) => kind,
        Err(_) => {
            v.add(field, "unknown sample kind");
            SampleKind::Unspecified
        }
    }
}

/// A time window; unset ends default to now and now + 24 hours.
fn window(
    v: &mut Violations,
    start: &Option<prost_types::Timestamp>,
    end: &Option<prost_types::Timestamp>,
) -> (chrono::DateTime<Utc>, chrono::DateTime<Utc>) {
    let now = Utc::now();
    let from = start.as_ref().map_or(Some(now), |_| from_ts(start));
    let to = end
        .as_ref()
        .map_or(from.map(|f| f + chrono::Duration::hours(24)), |_| {
            from_ts(end)
        });
    match (from, to) {
        (Some(from), Some(to)) if from < to => (from, to),
        (Some(_), Some(_)) => {
            v.add("window_end", "must be after window_start");
            (now, now)
        }
        _ => {
            v.add("window_start", "not a valid time stamp");
            (now, now)
        }
    }
}

fn check_institution(v: &mut Violations, i: &pb::Institution, prefix: &str) {
    let f = |name: &str| format!("{prefix}{name}");
    if matches!(
        InstitutionKind::try_from(i.kind),
        Ok(InstitutionKind::Unspecified) | Err(_)
    ) {
        v.add(f("kind"), "SAMPLING_SITE, LABORATORY or both");
    }
    text(v, &f("name"), &i.name, 128, true);
    text(v, &f("address"), &i.address, 256, false);
    fields::point(v, &f("location"), &i.location);
    if i.division_code.len() != 6 || !i.division_code.chars().all(|c| c.is_ascii_digit()) {
        v.add(f("division_code"), "a GB/T 2260 county code: six digits");
    }
    fields::id(v, &f("licence_number"), &i.licence_number);
    for (n, h) in i.opening_hours.iter().enumerate() {
        if !(1..=7).contains(&h.weekday) {
            v.add(f(&format!("opening_hours[{n}].weekday")), "1 (Monday) to 7");
        }
        if h.opens_at_minute >= h.closes_at_minute || h.closes_at_minute > 1440 {
            v.add(
                f(&format!("opening_hours[{n}]")),
                "opens before it closes, within the day (minutes 0 to 1440)",
            );
        }
    }
    if i.single_tube_price_fen < 0 || i.single_tube_price_fen > 100_000 {
        v.add(f("single_tube_price_fen"), "0 to 100000 fen");
    }
    if i.pooled_price_fen < 0 || i.pooled_price_fen > 100_000 {
        v.add(f("pooled_price_fen"), "0 to 100000 fen");
    }
    if i.pool_size != 0 && !(2..=MAX_POOL_SIZE).contains(&i.pool_size) {
        v.add(f("pool_size"), "2 to 20 (0 = 10)");
    }
    if i.public_phone.len() > 32
        || !i
            .public_phone
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == ' ')
    {
        v.add(f("public_phone"), "at most 32 digits, '-', '+' or spaces");
    }
    if i.sample_kinds.is_empty() {
        v.add(f("sample_kinds"), "at least one kind of test");
    }
    for (n, k) in i.sample_kinds.iter().enumerate() {
        sample_kind(v, &f(&format!("sample_kinds[{n}]")), *k, false);
    }
}

/// The institution a caller acts for: its token's subject when it is institution staff
/// (and not also a health administrator).
fn scope(caller: &Caller) -> BookingScope<'_> {
    if caller.has(roles::INSTITUTION) && !caller.has_any(&[roles::HEALTH_ADMIN, roles::APP]) {
        BookingScope::Institution(&caller.subject)
    } else {
        BookingScope::Any
    }
}

#[tonic::async_trait]
impl TestingService for TestingRpc {
    async fn register_institution(
        &self,
        request: Request<pb::RegisterInstitutionRequest>,
    ) -> Result<Response<pb::Institution>, Status> {
        self.caller(&request, &[roles::HEALTH_ADMIN])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let institution = req.institution.unwrap_or_default();
        check_institution(&mut v, &institution, "institution.");
        v.finish().map_err(st)?;
        ok(self
            .testing
            .register_institution(&req.request_id, institution)
            .await)
    }

    async fn update_institution(
        &self,
        request: Request<pb::UpdateInstitutionRequest>,
    ) -> Result<Response<pb::Institution>, Status> {
        let caller = self.caller(&request, &[roles::HEALTH_ADMIN, roles::INSTITUTION])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let changes = req.institution.unwrap_or_default();
        fields::id(
            &mut v,
            "institution.institution_id",
            &changes.institution_id,
        );
        const ALLOWED: [&str; 10] = [
            "name",
            "address",
            "opening_hours",
            "slot_length",
            "single_tube_price_fen",
            "pooled_price_fen",
            "pool_size",
            "public_phone",
            "active",
            "sample_kinds",
        ];
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            v.add("update_mask", "name at least one field");
        }
        for p in &paths {
            if !ALLOWED.contains(&p.as_str()) {
                v.add("update_mask", format!("`{p}` cannot be changed"));
            }
        }
        // The changed fields are checked as a whole institution would be.
        let mut probe = changes.clone();
        probe.kind = InstitutionKind::SamplingSite as i32;
        probe.division_code = "000000".into();
        probe.licence_number = "x".into();
        probe.location = Some(GeoPoint::default());
        if !paths.iter().any(|p| p == "name") {
            probe.name = "x".into();
        }
        if !paths.iter().any(|p| p == "sample_kinds") {
            probe.sample_kinds = vec![SampleKind::SingleTube as i32];
        }
        check_institution(&mut v, &probe, "institution.");
        v.finish().map_err(st)?;
        ok(self
            .testing
            .update_institution(changes, &paths, scope(&caller))
            .await)
    }

    async fn get_institution(
        &self,
        request: Request<pb::GetInstitutionRequest>,
    ) -> Result<Response<pb::Institution>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "institution_id", &req.institution_id);
        v.finish().map_err(st)?;
        ok(self.testing.institution(&req.institution_id).await)
    }

    async fn search_institutions(
        &self,
        request: Request<pb::SearchInstitutionsRequest>,
    ) -> Result<Response<pb::SearchInstitutionsResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        use pb::search_institutions_request::Near;
        let near = match &req.near {
            Some(Near::Location(p)) => {
                Some(Near::Location(fields::point(&mut v, "location", &Some(*p))))
            }
            Some(Near::PlaceCode(code)) => {
                fields::id(&mut v, "place_code", code);
                Some(Near::PlaceCode(code.clone()))
            }
            None => {
                v.add("near", "a location or a place code");
                None
            }
        };
        if req.radius_m > MAX_RADIUS_M {
            v.add("radius_m", "at most 50000 metres");
        }
        let window = window(&mut v, &req.window_start, &req.window_end);
        let kind = sample_kind(&mut v, "sample_kind", req.sample_kind, true);
        let page = fields::page_request(&mut v, &req.page);
        v.finish().map_err(st)?;
        let center = match near {
            Some(Near::Location(p)) => p,
            Some(Near::PlaceCode(code)) => self.testing.place_location(&code).await.map_err(st)?,
            None => GeoPoint::default(),
        };
        let radius = if req.radius_m == 0 {
            5_000
        } else {
            req.radius_m
        };
        ok(self
            .testing
            .search(&center, f64::from(radius), window, kind, page)
            .await)
    }

    async fn set_slots(
        &self,
        request: Request<pb::SetSlotsRequest>,
    ) -> Result<Response<pb::SetSlotsResponse>, Status> {
        let caller = self.caller(&request, &[roles::HEALTH_ADMIN, roles::INSTITUTION])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "institution_id", &req.institution_id);
        if req.windows.is_empty() || req.windows.len() > MAX_WINDOWS {
            v.add("windows", "1 to 2000 windows");
        }
        let mut windows = Vec::with_capacity(req.windows.len());
        for (n, w) in req.windows.iter().enumerate() {
            match (from_ts(&w.starts_at), from_ts(&w.ends_at)) {
                (Some(s), Some(e)) if s < e && e - s <= chrono::Duration::hours(24) => {
                    if w.capacity > 10_000 {
                        v.add(format!("windows[{n}].capacity"), "at most 10000");
                    }
                    windows.push((s, e, w.capacity));
                }
                _ => v.add(
                    format!("windows[{n}]"),
                    "starts_at before ends_at, at most 24 hours apart",
                ),
            }
        }
        let mut sorted = windows.clone();
        sorted.sort_by_key(|w| w.0);
        if sorted.windows(2).any(|p| p[1].0 < p[0].1) {
            v.add("windows", "windows must not overlap");
        }
        v.finish().map_err(st)?;
        ok(self
            .testing
            .set_slots(
                &req.request_id,
                &req.institution_id,
                windows,
                scope(&caller),
            )
            .await)
    }

    async fn list_slots(
        &self,
        request: Request<pb::ListSlotsRequest>,
    ) -> Result<Response<pb::ListSlotsResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "institution_id", &req.institution_id);
        let window = window(&mut v, &req.window_start, &req.window_end);
        let page = fields::page_request(&mut v, &req.page);
        v.finish().map_err(st)?;
        ok(self
            .testing
            .list_slots(&req.institution_id, window, req.only_available, page)
            .await)
    }

    async fn create_booking(
        &self,
        request: Request<pb::CreateBookingRequest>,
    ) -> Result<Response<pb::Booking>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let person = fields::person_ref(&mut v, "person", &req.person);
        fields::id(&mut v, "slot_id", &req.slot_id);
        let kind = sample_kind(&mut v, "sample_kind", req.sample_kind, false);
        if !req.place_code.is_empty() {
            fields::id(&mut v, "place_code", &req.place_code);
        }
        if !req.retest_notice_id.is_empty() {
            fields::id(&mut v, "retest_notice_id", &req.retest_notice_id);
        }
        v.finish().map_err(st)?;
        ok(self
            .testing
            .create_booking(NewBooking {
                request_id: &req.request_id,
                person_id: &person,
                slot_id: &req.slot_id,
                sample_kind: kind,
                place_code: &req.place_code,
                retest_notice_id: (!req.retest_notice_id.is_empty())
                    .then_some(req.retest_notice_id.as_str()),
            })
            .await)
    }

    async fn cancel_booking(
        &self,
        request: Request<pb::CancelBookingRequest>,
    ) -> Result<Response<pb::Booking>, Status> {
        let caller = self.caller(&request, &[roles::APP, roles::INSTITUTION])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "booking_id", &req.booking_id);
        text(&mut v, "reason", &req.reason, 64, false);
        v.finish().map_err(st)?;
        ok(self
            .testing
            .cancel_booking(&req.request_id, &req.booking_id, scope(&caller))
            .await)
    }

    async fn get_booking(
        &self,
        request: Request<pb::GetBookingRequest>,
    ) -> Result<Response<pb::Booking>, Status> {
        let caller = self.caller(&request, &[roles::APP, roles::INSTITUTION])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "booking_id", &req.booking_id);
        v.finish().map_err(st)?;
        let b = self
            .testing
            .booking(&req.booking_id, scope(&caller))
            .await
            .map_err(st)?;
        ok(self.testing.booking_proto(&b).await)
    }

    async fn list_my_bookings(
        &self,
        request: Request<pb::ListMyBookingsRequest>,
    ) -> Result<Response<pb::ListMyBookingsResponse>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        let page = fields::page_request(&mut v, &req.page);
        v.finish().map_err(st)?;
        ok(self.testing.list_bookings(&person, page).await)
    }

    async fn start_payment(
        &self,
        request: Request<pb::StartPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.idempotency_key.is_empty()
            || req.idempotency_key.len() > 128
            || !req.idempotency_key.chars().all(|c| c.is_ascii_graphic())
        {
            v.add(
                "idempotency_key",
                "required: 1 to 128 printable characters (a UUID)",
            );
        }
        fields::id(&mut v, "booking_id", &req.booking_id);
        if matches!(
            PaymentProvider::try_from(req.provider),
            Ok(PaymentProvider::Unspecified) | Err(_)
        ) {
            v.add("provider", "a payment provider");
        }
        v.finish().map_err(st)?;
        ok(self
            .testing
            .start_payment(&req.idempotency_key, &req.booking_id, req.provider)
            .await)
    }

    async fn handle_payment_callback(
        &self,
        request: Request<pb::HandlePaymentCallbackRequest>,
    ) -> Result<Response<pb::HandlePaymentCallbackResponse>, Status> {
        self.caller(&request, &[roles::PAYMENT_PROVIDER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "payment_id", &req.payment_id);
        if req.notification_id.is_empty() || req.notification_id.len() > 128 {
            v.add("notification_id", "required: at most 128 characters");
        }
        if matches!(
            PaymentOutcome::try_from(req.outcome),
            Ok(PaymentOutcome::Unspecified) | Err(_)
        ) {
            v.add("outcome", "SUCCEEDED, DECLINED, TIMED_OUT or REFUNDED");
        }
        if req.amount_fen <= 0 {
            v.add("amount_fen", "a positive amount");
        }
        if req.raw_notification.is_empty() || req.raw_notification.len() > 16 * 1024 {
            v.add("raw_notification", "required: at most 16 KiB");
        }
        if req.provider_signature.is_empty() || req.provider_signature.len() > 256 {
            v.add("provider_signature", "required");
        }
        text(
            &mut v,
            "provider_transaction_id",
            &req.provider_transaction_id,
            128,
            false,
        );
        text(&mut v, "decline_reason", &req.decline_reason, 128, false);
        v.finish().map_err(st)?;
        let expected = Notification {
            payment_id: req.payment_id.clone(),
            notification_id: req.notification_id.clone(),
            provider_transaction_id: req.provider_transaction_id.clone(),
            outcome: req.outcome,
            amount_fen: req.amount_fen,
            occurred_at: req.occurred_at.map(|t| t.seconds).unwrap_or_default(),
            decline_reason: req.decline_reason.clone(),
        };
        ok(self
            .testing
            .payment_callback(
                req.provider,
                &req.raw_notification,
                &req.provider_signature,
                &expected,
            )
            .await)
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        self.caller(&request, &[roles::APP, roles::PAYMENT_PROVIDER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "payment_id", &req.payment_id);
        v.finish().map_err(st)?;
        ok(self.testing.payment(&req.payment_id).await)
    }

    async fn record_sample(
        &self,
        request: Request<pb::RecordSampleRequest>,
    ) -> Result<Response<pb::Sample>, Status> {
        let caller = self.caller(&request, &[roles::INSTITUTION])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        fields::id(&mut v, "tube_id", &req.tube_id);
        let kind = sample_kind(&mut v, "kind", req.kind, false);
        if req.persons.is_empty() || req.persons.len() > MAX_POOL_SIZE as usize {
            v.add("persons", "1 to 20 persons");
        }
        let mut persons = Vec::with_capacity(req.persons.len());
        for (n, p) in req.persons.iter().enumerate() {
            let id =
                fields::person_id(&mut v, &format!("persons[{n}]"), Some(p.person_id.as_str()));
            if persons.contains(&id) && !id.is_empty() {
                v.add(format!("persons[{n}]"), "listed twice");
            }
            persons.push(id);
        }
        let now = Utc::now();
        let sampled_at_given = req.sampled_at.is_some();
        let sampled_at = match &req.sampled_at {
            None => now,
            Some(_) => match from_ts(&req.sampled_at) {
                Some(t) if t <= now + chrono::Duration::minutes(1) => t,
                _ => {
                    v.add("sampled_at", "a time stamp not in the future");
                    now
                }
            },
        };
        v.finish().map_err(st)?;
        ok(self
            .testing
            .record_sample(NewSample {
                request_id: &req.request_id,
                institution_id: &caller.subject,
                tube_id: &req.tube_id,
                kind,
                persons,
                sampled_at: minute(sampled_at),
                sampled_at_given,
            })
            .await)
    }

    async fn upload_result(
        &self,
        request: Request<pb::UploadResultRequest>,
    ) -> Result<Response<pb::UploadResultResponse>, Status> {
        let caller = self.caller(&request, &[roles::LAB])?;
        let req = request.into_inner();
        let Some(result) = req.result else {
            return Err(st(ServiceError::invalid("result", "required")));
        };
        let uploaded = self
            .testing
            .upload(&caller.subject, std::slice::from_ref(&result))
            .await
            .map_err(st)?;
        if let Some(e) = uploaded.response.errors.first() {
            let code = tonic::Code::from_i32(e.code);
            let err = match code {
                tonic::Code::InvalidArgument => {
                    ServiceError::invalid("result", format!("{}: {}", e.reason, e.message))
                }
                tonic::Code::NotFound => {
                    ServiceError::NotFound(format!("{}: {}", e.reason, e.message))
                }
                tonic::Code::AlreadyExists => ServiceError::conflict(&e.reason, &e.message),
                _ => ServiceError::precondition(&e.reason, &e.message),
            };
            return Err(st(err));
        }
        let duplicate = uploaded.response.duplicates > 0;
        let reports = if duplicate {
            self.testing
                .tube_reports(&result.tube_id)
                .await
                .map_err(st)?
        } else {
            self.testing
                .reports_proto(&uploaded.reports)
                .await
                .map_err(st)?
        };
        Ok(Response::new(pb::UploadResultResponse {
            reports,
            duplicate,
        }))
    }

    async fn upload_results(
        &self,
        request: Request<pb::UploadResultsRequest>,
    ) -> Result<Response<pb::UploadResultsResponse>, Status> {
        let caller = self.caller(&request, &[roles::LAB])?;
        let req = request.into_inner();
        if req.results.is_empty() || req.results.len() > MAX_UPLOAD {
            return Err(st(ServiceError::invalid("results", "1 to 5000 results")));
        }
        ok(self
            .testing
            .upload(&caller.subject, &req.results)
            .await
            .map(|u| u.response))
    }

    async fn list_my_reports(
        &self,
        request: Request<pb::ListMyReportsRequest>,
    ) -> Result<Response<pb::ListMyReportsResponse>, Status> {
        self.caller(&request, &[roles::APP, roles::INTERNAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        let page = fields::page_request(&mut v, &req.page);
        let since = req.since.as_ref().and_then(|_| from_ts(&req.since));
        let until = req.until.as_ref().and_then(|_| from_ts(&req.until));
        if req.since.is_some() && since.is_none() {
            v.add("since", "not a valid time stamp");
        }
        if req.until.is_some() && until.is_none() {
            v.add("until", "not a valid time stamp");
        }
        v.finish().map_err(st)?;
        ok(self.testing.list_reports(&person, since, until, page).await)
    }

    async fn get_report(
        &self,
        request: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::TestReport>, Status> {
        self.caller(&request, &[roles::APP, roles::INTERNAL, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        fields::id(&mut v, "report_id", &req.report_id);
        v.finish().map_err(st)?;
        ok(self.testing.report(&req.report_id).await)
    }

    async fn list_retest_notices(
        &self,
        request: Request<pb::ListRetestNoticesRequest>,
    ) -> Result<Response<pb::ListRetestNoticesResponse>, Status> {
        let caller = self.caller(&request, &[roles::APP, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = req
            .person
            .as_ref()
            .map(|_| fields::person_ref(&mut v, "person", &req.person));
        if person.is_none() && !caller.has(roles::OFFICIAL) {
            v.add("person", "required (all notices are for officials)");
        }
        let state = RetestNoticeState::try_from(req.state).unwrap_or_else(|_| {
            v.add("state", "unknown state");
            RetestNoticeState::Unspecified
        });
        let page = fields::page_request(&mut v, &req.page);
        v.finish().map_err(st)?;
        ok(self
            .testing
            .list_notices(person.as_deref(), state, page)
            .await)
    }

    async fn issue_negative_certificate(
        &self,
        request: Request<pb::IssueNegativeCertificateRequest>,
    ) -> Result<Response<pb::NegativeCertificate>, Status> {
        self.caller(&request, &[roles::APP])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = fields::person_ref(&mut v, "person", &req.person);
        if !req.report_id.is_empty() {
            fields::id(&mut v, "report_id", &req.report_id);
        }
        v.finish().map_err(st)?;
        ok(self
            .testing
            .issue_certificate(
                &person,
                (!req.report_id.is_empty()).then_some(req.report_id.as_str()),
                req.include_qr_svg,
            )
            .await)
    }

    async fn verify_negative_certificate(
        &self,
        request: Request<pb::VerifyNegativeCertificateRequest>,
    ) -> Result<Response<pb::VerifyNegativeCertificateResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        if req.qr_payload.is_empty() {
            return Err(st(ServiceError::invalid("qr_payload", "required")));
        }
        ok(self.testing.verify_certificate(&req.qr_payload).await)
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let keys = healthcode_codes::public_keys(&self.testing.signing_key, &self.testing.keys);
        Ok(Response::new(GetPublicKeysResponse { keys }))
    }
}
