//! The gRPC face of the risk service: authentication, roles, validation (one field
//! violation per bad field), then `ops`.

use crate::domain::policy::validate;
use crate::domain::time::{Time, from_proto};
use crate::ops::Page;
use crate::service::{Actor, Risk};
use healthcode_auth::{Caller, TokenVerifier, require_any, roles};
use healthcode_errors::fields::{self, request_id, text};
use healthcode_errors::{ServiceError, Violations};
use healthcode_proto::common::v1::{
    CodeColor, ItemError, NucleicAcidResult, PageRequest, PersonRef, ReasonCode,
};
use healthcode_proto::risk::v1 as pb;
use pb::risk_area::Extent;
use pb::risk_event::Event as EventKind;
use pb::risk_service_server::RiskService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const MAX_BATCH: usize = 1000;

pub struct RiskRpc {
    risk: Arc<Risk>,
    verifier: TokenVerifier,
}

impl RiskRpc {
    pub fn new(risk: Arc<Risk>, verifier: TokenVerifier) -> Self {
        RiskRpc { risk, verifier }
    }

    fn caller<T>(&self, request: &Request<T>, allowed: &[&str]) -> Result<Actor, Status> {
        let caller = self.verifier.authenticate(request)?;
        if !allowed.is_empty() {
            require_any(&caller, allowed)?;
        }
        Ok(actor(&caller))
    }
}

fn actor(caller: &Caller) -> Actor {
    Actor {
        subject: caller.subject.clone(),
        roles: caller.roles.iter().cloned().collect(),
    }
}

/// Reviewers (hotline, officials) read appeal statements; the app does not.
fn reviewer(actor: &Actor) -> bool {
    actor
        .roles
        .iter()
        .any(|r| r == roles::HOTLINE || r == roles::OFFICIAL)
}

fn st(err: ServiceError) -> Status {
    err.into()
}

// ---------------------------------------------------------------------------------------
// Field checks

pub fn person_id(v: &mut Violations, field: &str, person: &Option<PersonRef>) -> String {
    fields::person_id(v, field, person.as_ref().map(|p| p.person_id.as_str()))
}

pub fn page(v: &mut Violations, page: &Option<PageRequest>) -> Page {
    let page = page.clone().unwrap_or_default();
    let (offset, limit) = fields::page(v, page.page_size, &page.page_token);
    Page { offset, limit }
}

pub fn time(v: &mut Violations, field: &str, t: &Option<prost_types::Timestamp>) -> Option<Time> {
    let t = t.as_ref()?;
    let parsed = from_proto(t);
    if parsed.is_none() {
        v.add(field, "not a valid timestamp");
    }
    parsed
}

fn required_time(
    v: &mut Violations,
    field: &str,
    t: &Option<prost_types::Timestamp>,
) -> Option<Time> {
    if t.is_none() {
        v.add(field, "required");
    }
    time(v, field, t)
}

fn color(v: &mut Violations, field: &str, value: i32, allow_unspecified: bool) -> CodeColor {
    match CodeColor::try_from(value) {
        Ok(CodeColor::Unspecified) if !allow_unspecified => {
            v.add(field, "required");
            CodeColor::Unspecified
        }
        Ok(c) => c,
        Err(_) => {
            v.add(field, "unknown color");
            CodeColor::Unspecified
        }
    }
}

fn batch_len(v: &mut Violations, field: &str, len: usize) {
    if len == 0 || len > MAX_BATCH {
        v.add(field, format!("1 to {MAX_BATCH} items"));
    }
}

/// Problems with one risk event, as `events[i].…` field violations.
/// Whether an event from a stream (not an RPC) passes the same checks as RecordEvents.
pub fn valid_event(e: &pb::RiskEvent) -> bool {
    event_problems(e, 0, chrono::Utc::now()).is_empty()
}

fn event_problems(e: &pb::RiskEvent, i: usize, now: Time) -> Violations {
    let mut v = Violations::new();
    let f = |name: &str| format!("events[{i}].{name}");
    if e.event_id.is_empty() || e.event_id.len() > 128 || e.event_id.chars().any(|c| c.is_control())
    {
        v.add(f("event_id"), "required: 1 to 128 printable characters");
    }
    person_id(&mut v, &f("person"), &e.person);
    let not_future = |v: &mut Violations, name: &str, t: &Option<prost_types::Timestamp>| {
        if let Some(at) = required_time(v, &f(name), t)
            && at > now + chrono::Duration::minutes(5)
        {
            v.add(f(name), "is in the future");
        }
    };
    match &e.event {
        None => v.add(
            f("event"),
            "one of contact, area_stay, test_result, vaccination_dose, \
             other_province_decision is required",
        ),
        Some(EventKind::Contact(c)) => {
            if !matches!(pb::ContactKind::try_from(c.kind), Ok(k) if k != pb::ContactKind::Unspecified)
            {
                v.add(f("contact.kind"), "required");
            }
            not_future(&mut v, "contact.last_exposure_at", &c.last_exposure_at);
            text(
                &mut v,
                &f("contact.case_reference"),
                &c.case_reference,
                64,
                false,
            );
        }
        Some(EventKind::AreaStay(s)) => {
            not_future(&mut v, "area_stay.arrived_at", &s.arrived_at);
            if let (Some(a), Some(l)) = (
                s.arrived_at.as_ref().and_then(from_proto),
                time(&mut v, &f("area_stay.left_at"), &s.left_at),
            ) && l < a
            {
                v.add(f("area_stay.left_at"), "before arrived_at");
            }
            if s.division_code.is_empty() && s.location.is_none() && s.place_code.is_empty() {
                v.add(
                    f("area_stay"),
                    "one of division_code, location, place_code is required",
                );
            }
            if !s.division_code.is_empty()
                && (s.division_code.len() < 6
                    || s.division_code.len() > 12
                    || !s.division_code.chars().all(|c| c.is_ascii_digit()))
            {
                v.add(
                    f("area_stay.division_code"),
                    "6 to 12 digits (GB/T 2260 and finer)",
                );
            }
            if let Some(p) = &s.location
                && !(-90.0..=90.0).contains(&p.latitude) | !(-180.0..=180.0).contains(&p.longitude)
            {
                v.add(
                    f("area_stay.location"),
                    "latitude -90..90, longitude -180..180",
                );
            }
            text(&mut v, &f("area_stay.place_code"), &s.place_code, 32, false);
        }
        Some(EventKind::TestResult(t)) => {
            text(&mut v, &f("test_result.report_id"), &t.report_id, 64, true);
            if !matches!(NucleicAcidResult::try_from(t.result), Ok(r) if r != NucleicAcidResult::Unspecified)
            {
                v.add(f("test_result.result"), "required");
            }
            not_future(&mut v, "test_result.sampled_at", &t.sampled_at);
            not_future(&mut v, "test_result.reported_at", &t.reported_at);
            if let (Some(s), Some(r)) = (
                t.sampled_at.as_ref().and_then(from_proto),
                t.reported_at.as_ref().and_then(from_proto),
            ) && r < s
            {
                v.add(f("test_result.reported_at"), "before sampled_at");
            }
        }
        Some(EventKind::OtherProvinceDecision(d)) => {
            let name = |n: &str| f(&format!("other_province_decision.{n}"));
            if d.issuing_province.len() != 6
                || !d.issuing_province.bytes().all(|b| b.is_ascii_digit())
            {
                v.add(name("issuing_province"), "six digits (GB/T 2260)");
            }
            if d.sequence == 0 {
                v.add(name("sequence"), "from 1");
            }
            if !matches!(
                CodeColor::try_from(d.color),
                Ok(CodeColor::Green | CodeColor::Yellow | CodeColor::Red)
            ) {
                v.add(name("color"), "green, yellow or red");
            }
            if d.reason_codes.len() > 32
                || d.reason_codes.iter().any(
                    |c| !matches!(ReasonCode::try_from(*c), Ok(r) if r != ReasonCode::Unspecified),
                )
            {
                v.add(name("reason_codes"), "at most 32 known reason codes");
            }
            not_future(&mut v, "other_province_decision.decided_at", &d.decided_at);
            if let (Some(decided), Some(until)) = (
                d.decided_at.as_ref().and_then(from_proto),
                time(&mut v, &name("valid_until"), &d.valid_until),
            ) && until <= decided
            {
                v.add(name("valid_until"), "not after decided_at");
            }
        }
        Some(EventKind::VaccinationDose(d)) => {
            text(&mut v, &f("vaccination_dose.dose_id"), &d.dose_id, 64, true);
            if d.dose_number == 0 || d.dose_number > 10 {
                v.add(f("vaccination_dose.dose_number"), "1 to 10");
            }
            not_future(
                &mut v,
                "vaccination_dose.administered_at",
                &d.administered_at,
            );
            time(
                &mut v,
                &f("vaccination_dose.booster_due_at"),
                &d.booster_due_at,
            );
        }
    }
    v
}

/// The roles that may record an event of this kind.
fn roles_for(e: &pb::RiskEvent) -> &'static [&'static str] {
    match &e.event {
        Some(EventKind::Contact(_)) => &[roles::OFFICIAL, roles::INTERNAL],
        Some(EventKind::AreaStay(_)) => &[roles::INTERNAL, roles::APP],
        Some(EventKind::TestResult(_) | EventKind::VaccinationDose(_)) | None => &[roles::INTERNAL],
        // Only the exchange has verified another province's signature.
        Some(EventKind::OtherProvinceDecision(_)) => &[roles::EXCHANGE],
    }
}

fn validate_area(v: &mut Violations, area: &Option<pb::RiskArea>) -> Option<(pb::RiskArea, Time)> {
    let Some(area) = area else {
        v.add("area", "required");
        return None;
    };
    text(v, "area.name", &area.name, 100, true);
    if !matches!(pb::RiskAreaLevel::try_from(area.level), Ok(l) if l != pb::RiskAreaLevel::Unspecified)
    {
        v.add("area.level", "required");
    }
    match &area.extent {
        None => v.add(
            "area.extent",
            "one of division_code, circle, places is required",
        ),
        Some(Extent::DivisionCode(code)) => {
            if code.len() < 6 || code.len() > 12 || !code.chars().all(|c| c.is_ascii_digit()) {
                v.add("area.division_code", "6 to 12 digits (GB/T 2260 and finer)");
            }
        }
        Some(Extent::Circle(c)) => {
            match &c.center {
                Some(p)
                    if (-90.0..=90.0).contains(&p.latitude)
                        && (-180.0..=180.0).contains(&p.longitude) => {}
                _ => v.add(
                    "area.circle.center",
                    "required: latitude -90..90, longitude -180..180",
                ),
            }
            if !(1.0..=50_000.0).contains(&c.radius_m) {
                v.add("area.circle.radius_m", "1 to 50,000 metres");
            }
        }
        Some(Extent::Places(p)) => {
            if p.place_codes.is_empty() || p.place_codes.len() > MAX_BATCH {
                v.add("area.places.place_codes", "1 to 1,000 place codes");
            }
            for (i, code) in p.place_codes.iter().enumerate() {
                text(v, &format!("area.places.place_codes[{i}]"), code, 32, true);
            }
        }
    }
    let from = required_time(v, "area.valid_from", &area.valid_from)?;
    if let Some(until) = time(v, "area.valid_until", &area.valid_until)
        && until <= from
    {
        v.add("area.valid_until", "must be after valid_from");
    }
    Some((area.clone(), from))
}

fn bad_items(errors: &mut Vec<ItemError>, index: usize, item_id: &str, problems: Violations) {
    if let Err(ServiceError::InvalidArgument(list)) = problems.finish() {
        let message = list
            .iter()
            .map(|f| format!("{}: {}", f.field, f.description))
            .collect::<Vec<_>>()
            .join("; ");
        errors.push(ItemError {
            index: index as u32,
            item_id: item_id.chars().take(128).collect(),
            code: tonic::Code::InvalidArgument as i32,
            reason: "INVALID_EVENT".into(),
            message,
        });
    }
}

#[tonic::async_trait]
impl RiskService for RiskRpc {
    async fn get_color(
        &self,
        request: Request<pb::GetColorRequest>,
    ) -> Result<Response<pb::PersonColor>, Status> {
        self.caller(&request, &[roles::APP, roles::INTERNAL, roles::OFFICIAL])?;
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", &request.get_ref().person);
        v.finish().map_err(st)?;
        Ok(Response::new(self.risk.get_color(&id).await.map_err(st)?))
    }

    async fn batch_get_colors(
        &self,
        request: Request<pb::BatchGetColorsRequest>,
    ) -> Result<Response<pb::BatchGetColorsResponse>, Status> {
        self.caller(&request, &[roles::INTERNAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        batch_len(&mut v, "persons", req.persons.len());
        v.finish().map_err(st)?;
        let mut errors = Vec::new();
        let mut ids = Vec::new();
        for (i, p) in req.persons.iter().enumerate() {
            let mut pv = Violations::new();
            let id = person_id(&mut pv, &format!("persons[{i}]"), &Some(p.clone()));
            if pv.is_empty() {
                ids.push(id);
            } else {
                bad_items(&mut errors, i, "", pv);
            }
        }
        let colors = if ids.is_empty() {
            Vec::new()
        } else {
            self.risk.get_colors(&ids).await.map_err(st)?
        };
        Ok(Response::new(pb::BatchGetColorsResponse { colors, errors }))
    }

    async fn list_color_history(
        &self,
        request: Request<pb::ListColorHistoryRequest>,
    ) -> Result<Response<pb::ListColorHistoryResponse>, Status> {
        self.caller(&request, &[roles::APP, roles::INTERNAL, roles::AUDITOR])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = person_id(&mut v, "person", &req.person);
        let since = time(&mut v, "since", &req.since);
        let until = time(&mut v, "until", &req.until);
        let p = req.page.clone().unwrap_or_default();
        let limit = match p.page_size {
            0 => 50,
            n if n > 500 => {
                v.add("page.page_size", "must be at most 500");
                50
            }
            n => n as u64,
        };
        let before = if p.page_token.is_empty() {
            None
        } else {
            v.check(
                "page.page_token",
                p.page_token
                    .parse::<i64>()
                    .map_err(|_| "is not a token this service issued"),
            )
        };
        v.finish().map_err(st)?;
        let (changes, next_page_token) = self
            .risk
            .color_history(&id, since, until, before, limit)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListColorHistoryResponse {
            changes,
            next_page_token,
        }))
    }

    async fn record_events(
        &self,
        request: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let caller = self.verifier.authenticate(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        batch_len(&mut v, "events", req.events.len());
        v.finish().map_err(st)?;
        for e in &req.events {
            require_any(&caller, roles_for(e))?;
        }
        let now = chrono::Utc::now();
        let mut errors = Vec::new();
        let mut valid = Vec::new();
        for (i, e) in req.events.into_iter().enumerate() {
            let mut problems = event_problems(&e, i, now);
            if let Some(EventKind::OtherProvinceDecision(d)) = &e.event
                && d.issuing_province == self.risk.policies().province()
            {
                problems.add(
                    format!("events[{i}].other_province_decision.issuing_province"),
                    "is this province: its decisions are made here",
                );
            }
            if problems.is_empty() {
                valid.push(e);
            } else {
                bad_items(&mut errors, i, &e.event_id, problems);
            }
        }
        let mut reply = if valid.is_empty() {
            pb::RecordEventsResponse::default()
        } else {
            self.risk
                .record_events(&actor(&caller), valid)
                .await
                .map_err(st)?
        };
        reply.errors = errors;
        Ok(Response::new(reply))
    }

    async fn declare_risk_area(
        &self,
        request: Request<pb::DeclareRiskAreaRequest>,
    ) -> Result<Response<pb::RiskArea>, Status> {
        let actor = self.caller(&request, &[roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let area = validate_area(&mut v, &req.area);
        v.finish().map_err(st)?;
        let Some((area, _)) = area else {
            return Err(Status::invalid_argument("area: required"));
        };
        Ok(Response::new(
            self.risk
                .declare_risk_area(&actor, &req.request_id, area)
                .await
                .map_err(st)?,
        ))
    }

    async fn lift_risk_area(
        &self,
        request: Request<pb::LiftRiskAreaRequest>,
    ) -> Result<Response<pb::RiskArea>, Status> {
        let actor = self.caller(&request, &[roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "area_id", &req.area_id, 36, true);
        text(&mut v, "reason", &req.reason, 500, true);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .lift_risk_area(&actor, &req.request_id, &req.area_id, &req.reason)
                .await
                .map_err(st)?,
        ))
    }

    async fn list_risk_areas(
        &self,
        request: Request<pb::ListRiskAreasRequest>,
    ) -> Result<Response<pb::ListRiskAreasResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let at = time(&mut v, "at", &req.at).unwrap_or_else(chrono::Utc::now);
        if pb::RiskAreaLevel::try_from(req.min_level).is_err() {
            v.add("min_level", "unknown level");
        }
        let page = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let (areas, next_page_token) = self
            .risk
            .list_risk_areas(at, req.min_level, &page)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListRiskAreasResponse {
            areas,
            next_page_token,
        }))
    }

    async fn issue_directive(
        &self,
        request: Request<pb::IssueDirectiveRequest>,
    ) -> Result<Response<pb::IssueDirectiveResponse>, Status> {
        let actor = self.caller(&request, &[roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        batch_len(&mut v, "persons", req.persons.len());
        for (i, p) in req.persons.iter().enumerate() {
            person_id(&mut v, &format!("persons[{i}]"), &Some(p.clone()));
        }
        if !matches!(pb::DirectiveKind::try_from(req.kind), Ok(k) if k != pb::DirectiveKind::Unspecified)
        {
            v.add("kind", "required");
        }
        let starts = time(&mut v, "starts_at", &req.starts_at).unwrap_or_else(chrono::Utc::now);
        let ends = time(&mut v, "ends_at", &req.ends_at);
        if ends.is_some_and(|e| e <= starts) {
            v.add("ends_at", "must be after starts_at");
        }
        text(
            &mut v,
            "document_reference",
            &req.document_reference,
            64,
            true,
        );
        text(&mut v, "issuing_unit", &req.issuing_unit, 128, true);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .issue_directive(&actor, req, starts, ends)
                .await
                .map_err(st)?,
        ))
    }

    async fn end_directive(
        &self,
        request: Request<pb::EndDirectiveRequest>,
    ) -> Result<Response<pb::Directive>, Status> {
        let actor = self.caller(&request, &[roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "directive_id", &req.directive_id, 36, true);
        text(&mut v, "reason", &req.reason, 500, true);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .end_directive(&actor, &req.request_id, &req.directive_id, &req.reason)
                .await
                .map_err(st)?,
        ))
    }

    async fn record_national_check(
        &self,
        request: Request<pb::RecordNationalCheckRequest>,
    ) -> Result<Response<pb::RecordNationalCheckResponse>, Status> {
        let actor = self.caller(&request, &[roles::INTERNAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        person_id(&mut v, "person", &req.person);
        color(&mut v, "color", req.color, true);
        let checked_at =
            time(&mut v, "checked_at", &req.checked_at).unwrap_or_else(chrono::Utc::now);
        text(&mut v, "check_reference", &req.check_reference, 128, false);
        if req.reasons.len() > 20 {
            v.add("reasons", "at most 20");
        }
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .record_national_check(&actor, req, checked_at)
                .await
                .map_err(st)?,
        ))
    }

    async fn publish_policy(
        &self,
        request: Request<pb::PublishPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let actor = self.caller(&request, &[roles::POLICY_ADMIN])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        let Some(policy) = req.policy else {
            v.add("policy", "required");
            return Err(st(v
                .finish()
                .err()
                .unwrap_or_else(|| ServiceError::invalid("policy", "required"))));
        };
        let from = required_time(&mut v, "policy.effective_from", &policy.effective_from);
        if from.is_some_and(|f| f < chrono::Utc::now() - chrono::Duration::minutes(1)) {
            v.add("policy.effective_from", "must not be in the past");
        }
        if !policy.province_code.is_empty()
            && policy.province_code != self.risk.policies().province()
        {
            v.add(
                "policy.province_code",
                "this service decides its own province only",
            );
        }
        validate(&policy, &mut v);
        v.finish().map_err(st)?;
        let from = from.unwrap_or_else(chrono::Utc::now);
        Ok(Response::new(
            self.risk
                .publish_policy(&actor, &req.request_id, policy, from)
                .await
                .map_err(st)?,
        ))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let at = time(&mut v, "at", &req.at).unwrap_or_else(chrono::Utc::now);
        v.finish().map_err(st)?;
        let book = self.risk.policies();
        if !req.province_code.is_empty() && req.province_code != book.province() {
            return Err(Status::not_found(
                "this service holds its own province's policies only",
            ));
        }
        let found = if req.version == 0 {
            let p = book.in_force(at);
            book.get(p.version).filter(|_| !book.all().is_empty())
        } else {
            book.get(req.version)
        };
        found
            .map(|p| Response::new((*p).clone()))
            .ok_or_else(|| Status::not_found("no such policy version"))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.caller(&request, &[])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let page = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let book = self.risk.policies();
        if !req.province_code.is_empty() && req.province_code != book.province() {
            return Ok(Response::new(pb::ListPoliciesResponse::default()));
        }
        let mut all = book.all();
        all.reverse();
        let policies: Vec<pb::Policy> = all
            .into_iter()
            .skip(page.offset as usize)
            .take(page.limit as usize)
            .map(|p| (*p).clone())
            .collect();
        let next_page_token = if policies.len() as u64 == page.limit {
            (page.offset + page.limit).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPoliciesResponse {
            policies,
            next_page_token,
        }))
    }

    async fn propose_override(
        &self,
        request: Request<pb::ProposeOverrideRequest>,
    ) -> Result<Response<pb::Override>, Status> {
        let actor = self.caller(&request, &[roles::APPROVER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        batch_len(&mut v, "persons", req.persons.len());
        for (i, p) in req.persons.iter().enumerate() {
            person_id(&mut v, &format!("persons[{i}]"), &Some(p.clone()));
        }
        color(&mut v, "color", req.color, false);
        text(&mut v, "reason", &req.reason, 500, true);
        if time(&mut v, "holds_until", &req.holds_until).is_some_and(|u| u <= chrono::Utc::now()) {
            v.add("holds_until", "must be in the future");
        }
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk.propose_override(&actor, req).await.map_err(st)?,
        ))
    }

    async fn approve_override(
        &self,
        request: Request<pb::ApproveOverrideRequest>,
    ) -> Result<Response<pb::Override>, Status> {
        let actor = self.caller(&request, &[roles::APPROVER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "override_id", &req.override_id, 36, true);
        text(&mut v, "note", &req.note, 500, false);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .decide_override(&actor, &req.request_id, &req.override_id, &req.note, false)
                .await
                .map_err(st)?,
        ))
    }

    async fn reject_override(
        &self,
        request: Request<pb::RejectOverrideRequest>,
    ) -> Result<Response<pb::Override>, Status> {
        let actor = self.caller(&request, &[roles::APPROVER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "override_id", &req.override_id, 36, true);
        text(&mut v, "note", &req.note, 500, true);
        v.finish().map_err(st)?;
        Ok(Response::new(
            self.risk
                .decide_override(&actor, &req.request_id, &req.override_id, &req.note, true)
                .await
                .map_err(st)?,
        ))
    }

    async fn list_overrides(
        &self,
        request: Request<pb::ListOverridesRequest>,
    ) -> Result<Response<pb::ListOverridesResponse>, Status> {
        self.caller(&request, &[roles::APPROVER, roles::AUDITOR])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let person = req
            .person
            .as_ref()
            .map(|_| person_id(&mut v, "person", &req.person));
        if pb::OverrideState::try_from(req.state).is_err() {
            v.add("state", "unknown state");
        }
        let page = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let (overrides, next_page_token) = self
            .risk
            .list_overrides(req.state, person.as_deref(), &page)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListOverridesResponse {
            overrides,
            next_page_token,
        }))
    }

    async fn list_bulk_changes(
        &self,
        request: Request<pb::ListBulkChangesRequest>,
    ) -> Result<Response<pb::ListBulkChangesResponse>, Status> {
        self.caller(&request, &[roles::APPROVER, roles::AUDITOR])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        if pb::BulkChangeState::try_from(req.state).is_err() {
            v.add("state", "unknown state");
        }
        let page = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let (bulk_changes, next_page_token) = self
            .risk
            .list_bulk_changes(req.state, &page)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListBulkChangesResponse {
            bulk_changes,
            next_page_token,
        }))
    }

    async fn approve_bulk_change(
        &self,
        request: Request<pb::ApproveBulkChangeRequest>,
    ) -> Result<Response<pb::BulkChange>, Status> {
        let actor = self.caller(&request, &[roles::APPROVER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "bulk_change_id", &req.bulk_change_id, 36, true);
        text(&mut v, "note", &req.note, 1000, false);
        v.finish().map_err(st)?;
        let b = self
            .risk
            .approve_bulk_change(&actor, &req.request_id, &req.bulk_change_id, &req.note)
            .await
            .map_err(st)?;
        Ok(Response::new(b))
    }

    async fn discard_bulk_change(
        &self,
        request: Request<pb::DiscardBulkChangeRequest>,
    ) -> Result<Response<pb::BulkChange>, Status> {
        let actor = self.caller(&request, &[roles::APPROVER])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "bulk_change_id", &req.bulk_change_id, 36, true);
        text(&mut v, "note", &req.note, 1000, true);
        v.finish().map_err(st)?;
        let b = self
            .risk
            .discard_bulk_change(&actor, &req.request_id, &req.bulk_change_id, &req.note)
            .await
            .map_err(st)?;
        Ok(Response::new(b))
    }

    async fn list_audit_entries(
        &self,
        request: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        self.caller(&request, &[roles::AUDITOR])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.person.is_some() {
            person_id(&mut v, "person", &req.person);
        }
        time(&mut v, "since", &req.since);
        time(&mut v, "until", &req.until);
        if pb::AuditAction::try_from(req.action).is_err() {
            v.add("action", "unknown action");
        }
        let p = req.page.clone().unwrap_or_default();
        let limit = match p.page_size {
            0 => 50,
            n if n > 500 => {
                v.add("page.page_size", "must be at most 500");
                50
            }
            n => n as u64,
        };
        let after = if p.page_token.is_empty() {
            0
        } else {
            v.check(
                "page.page_token",
                p.page_token
                    .parse::<i64>()
                    .map_err(|_| "is not a token this service issued"),
            )
            .unwrap_or(0)
        };
        v.finish().map_err(st)?;
        let (entries, next_page_token) = self
            .risk
            .audit_entries(&req, after, limit)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries,
            next_page_token,
        }))
    }

    async fn submit_appeal(
        &self,
        request: Request<pb::SubmitAppealRequest>,
    ) -> Result<Response<pb::Appeal>, Status> {
        let actor = self.caller(&request, &[roles::APP, roles::HOTLINE])?;
        let hotline = actor.roles.iter().any(|r| r == roles::HOTLINE);
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        person_id(&mut v, "person", &req.person);
        if req.color_version == 0 {
            v.add(
                "color_version",
                "required: the version of the color the person saw",
            );
        }
        text(&mut v, "statement", &req.statement, 2000, false);
        text(&mut v, "hotline_ticket", &req.hotline_ticket, 64, hotline);
        v.finish().map_err(st)?;
        let channel = if hotline {
            pb::AppealChannel::Hotline
        } else {
            pb::AppealChannel::SelfService
        };
        let appeal = self
            .risk
            .submit_appeal(&actor, req, channel)
            .await
            .map_err(st)?;
        Ok(Response::new(appeal))
    }

    async fn get_appeal(
        &self,
        request: Request<pb::GetAppealRequest>,
    ) -> Result<Response<pb::Appeal>, Status> {
        let actor = self.caller(&request, &[roles::APP, roles::HOTLINE, roles::OFFICIAL])?;
        let mut v = Violations::new();
        text(&mut v, "appeal_id", &request.get_ref().appeal_id, 36, true);
        v.finish().map_err(st)?;
        let mut appeal = self
            .risk
            .appeal(&request.get_ref().appeal_id)
            .await
            .map_err(st)?;
        if !reviewer(&actor) {
            appeal.statement.clear();
        }
        Ok(Response::new(appeal))
    }

    async fn list_appeals(
        &self,
        request: Request<pb::ListAppealsRequest>,
    ) -> Result<Response<pb::ListAppealsResponse>, Status> {
        let actor = self.caller(&request, &[roles::APP, roles::HOTLINE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        if pb::AppealState::try_from(req.state).is_err() {
            v.add("state", "unknown state");
        }
        if pb::AppealChannel::try_from(req.channel).is_err() {
            v.add("channel", "unknown channel");
        }
        let person = req
            .person
            .as_ref()
            .map(|_| person_id(&mut v, "person", &req.person));
        let page = page(&mut v, &req.page);
        v.finish().map_err(st)?;
        let reviewer = reviewer(&actor);
        if !reviewer && person.is_none() {
            return Err(Status::permission_denied(
                "the app role lists the appeals of one person: set `person`",
            ));
        }
        let (mut appeals, next_page_token) = self
            .risk
            .list_appeals(req.state, req.channel, person.as_deref(), &page)
            .await
            .map_err(st)?;
        if !reviewer {
            for a in &mut appeals {
                a.statement.clear();
            }
        }
        Ok(Response::new(pb::ListAppealsResponse {
            appeals,
            next_page_token,
        }))
    }

    async fn decide_appeal(
        &self,
        request: Request<pb::DecideAppealRequest>,
    ) -> Result<Response<pb::Appeal>, Status> {
        let actor = self.caller(&request, &[roles::HOTLINE, roles::OFFICIAL])?;
        let req = request.into_inner();
        let mut v = Violations::new();
        request_id(&mut v, &req.request_id);
        text(&mut v, "appeal_id", &req.appeal_id, 36, true);
        text(&mut v, "note", &req.note, 1000, true);
        let mut holds_until = None;
        match pb::AppealDecision::try_from(req.decision) {
            Ok(pb::AppealDecision::Uphold) => {}
            Ok(pb::AppealDecision::Correct) => {
                color(&mut v, "corrected_color", req.corrected_color, false);
                holds_until = required_time(&mut v, "holds_until", &req.holds_until);
                if holds_until.is_some_and(|t| t <= chrono::Utc::now()) {
                    v.add("holds_until", "must be in the future");
                }
            }
            _ => v.add("decision", "required: UPHOLD or CORRECT"),
        }
        v.finish().map_err(st)?;
        let appeal = self
            .risk
            .decide_appeal(&actor, req, holds_until)
            .await
            .map_err(st)?;
        Ok(Response::new(appeal))
    }
}
