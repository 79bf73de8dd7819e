//! Held bulk changes and appeals, through the risk service's RPCs on a real mesh: on
//! PostgreSQL and Redis, and (bulk changes, which lean on savepoints) on the embedded default.

use healthcode_auth::roles;
use healthcode_proto::common::v1::{CodeColor, PersonRef};
use healthcode_proto::risk::v1 as rk;
use integration_tests::mesh::{Mesh, PROVINCE};
use integration_tests::{Backend, authorized};
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

fn ts(offset_seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + offset_seconds,
        nanos: 0,
    })
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

const DAY: i64 = 86_400;

/// A stay of one hour in `division`, `days_ago` days back.
fn stay(person_id: &str, division: &str, days_ago: i64) -> rk::RiskEvent {
    rk::RiskEvent {
        event_id: rid(),
        person: person(person_id),
        observed_at: None,
        event: Some(rk::risk_event::Event::AreaStay(rk::AreaStayEvent {
            division_code: division.into(),
            arrived_at: ts(-days_ago * DAY),
            left_at: ts(-days_ago * DAY + 3600),
            source: rk::StaySource::Telecom as i32,
            ..Default::default()
        })),
    }
}

fn medium_area(division: &str, from_days_ago: i64) -> rk::RiskArea {
    rk::RiskArea {
        name: format!("{division} 中风险区"),
        level: rk::RiskAreaLevel::Medium as i32,
        extent: Some(rk::risk_area::Extent::DivisionCode(division.into())),
        valid_from: ts(-from_days_ago * DAY),
        ..Default::default()
    }
}

struct Tokens {
    internal: String,
    official: String,
    admin: String,
    approver_a: String,
    approver_b: String,
    hotline: String,
    app: String,
}

fn tokens(mesh: &Mesh) -> Tokens {
    Tokens {
        internal: mesh
            .keys
            .token("flow-team", &[roles::INTERNAL, roles::OFFICIAL]),
        official: mesh.keys.token("cdc-officer-7", &[roles::OFFICIAL]),
        admin: mesh.keys.token("policy-desk", &[roles::POLICY_ADMIN]),
        approver_a: mesh.keys.token("approver-a", &[roles::APPROVER]),
        approver_b: mesh.keys.token("approver-b", &[roles::APPROVER]),
        hotline: mesh
            .keys
            .token("hotline-12345-07", &[roles::HOTLINE, roles::APPROVER]),
        app: mesh.keys.app(),
    }
}

async fn record(mesh: &Mesh, t: &Tokens, events: Vec<rk::RiskEvent>) -> rk::RecordEventsResponse {
    mesh.risk_client()
        .await
        .record_events(authorized(rk::RecordEventsRequest { events }, &t.internal))
        .await
        .expect("record events")
        .into_inner()
}

async fn color(mesh: &Mesh, t: &Tokens, id: &str) -> rk::PersonColor {
    mesh.risk_client()
        .await
        .get_color(authorized(
            rk::GetColorRequest { person: person(id) },
            &t.internal,
        ))
        .await
        .expect("get color")
        .into_inner()
}

async fn declare(mesh: &Mesh, t: &Tokens, area: rk::RiskArea) -> rk::RiskArea {
    mesh.risk_client()
        .await
        .declare_risk_area(authorized(
            rk::DeclareRiskAreaRequest {
                request_id: rid(),
                area: Some(area),
            },
            &t.official,
        ))
        .await
        .expect("declare area")
        .into_inner()
}

/// Publishes the policy in force with another bulk threshold, effective in a second.
async fn set_bulk_threshold(mesh: &Mesh, t: &Tokens, threshold: u32) {
    let mut risk = mesh.risk_client().await;
    let mut policy = risk
        .get_policy(authorized(
            rk::GetPolicyRequest {
                province_code: PROVINCE.into(),
                ..Default::default()
            },
            &t.admin,
        ))
        .await
        .expect("get policy")
        .into_inner();
    policy.bulk_change_threshold = threshold;
    policy.effective_from = ts(2);
    policy.description = format!("bulk threshold {threshold}");
    risk.publish_policy(authorized(
        rk::PublishPolicyRequest {
            request_id: rid(),
            policy: Some(policy),
        },
        &t.admin,
    ))
    .await
    .expect("publish policy");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
}

async fn held_bulk_changes_wait_for_two_approvers(backend: Backend) {
    let mesh = Mesh::start(backend, None).await;
    let t = tokens(&mesh);
    set_bulk_threshold(&mesh, &t, 2).await;
    let persons: Vec<String> = (0..3).map(|_| rid()).collect();
    let stays = persons.iter().map(|p| stay(p, "330105", 2)).collect();
    record(&mesh, &t, stays).await;
    for p in &persons {
        assert_eq!(color(&mesh, &t, p).await.color, CodeColor::Green as i32);
    }

    // Three colors would move: above the threshold of 2, so the area is held.
    let area = declare(&mesh, &t, medium_area("330105", 5)).await;
    assert!(!area.bulk_change_id.is_empty(), "the declaration is held");
    for p in &persons {
        assert_eq!(
            color(&mesh, &t, p).await.color,
            CodeColor::Green as i32,
            "nothing applies while held"
        );
    }
    let mut risk = mesh.risk_client().await;
    let listed = risk
        .list_risk_areas(authorized(rk::ListRiskAreasRequest::default(), &t.official))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.areas.iter().all(|a| a.area_id != area.area_id),
        "a held area is not in force"
    );
    let held = risk
        .list_bulk_changes(authorized(
            rk::ListBulkChangesRequest::default(),
            &t.approver_a,
        ))
        .await
        .unwrap()
        .into_inner()
        .bulk_changes;
    let bulk = held
        .iter()
        .find(|b| b.bulk_change_id == area.bulk_change_id)
        .expect("listed as held");
    assert_eq!(bulk.affected_persons, 3);
    assert_eq!(bulk.threshold, 2);
    assert_eq!(bulk.cause, rk::ChangeCause::RiskArea as i32);
    assert_eq!(
        bulk.transitions,
        vec![rk::ColorTransitionCount {
            from_color: CodeColor::Green as i32,
            to_color: CodeColor::Yellow as i32,
            persons: 3,
        }]
    );

    let approve = |token: &str, request_id: &str| {
        let request = rk::ApproveBulkChangeRequest {
            request_id: request_id.to_owned(),
            bulk_change_id: area.bulk_change_id.clone(),
            note: "核实无误".into(),
        };
        let token = token.to_owned();
        let mut risk = risk.clone();
        async move { risk.approve_bulk_change(authorized(request, &token)).await }
    };
    // The official who caused it cannot approve it, even holding the role.
    let both = mesh
        .keys
        .token("cdc-officer-7", &[roles::OFFICIAL, roles::APPROVER]);
    assert_eq!(
        approve(&both, &rid()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        approve(&t.official, &rid()).await.unwrap_err().code(),
        Code::PermissionDenied,
        "approving needs the approver role"
    );
    let first_id = rid();
    let first = approve(&t.approver_a, &first_id)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state, rk::BulkChangeState::Held as i32);
    assert_eq!(
        approve(&t.approver_a, &first_id)
            .await
            .unwrap()
            .into_inner(),
        first,
        "a retry returns the first answer"
    );
    assert_eq!(
        approve(&t.approver_a, &rid()).await.unwrap_err().code(),
        Code::PermissionDenied,
        "the same approver twice"
    );
    assert_eq!(
        color(&mesh, &t, &persons[0]).await.color,
        CodeColor::Green as i32
    );
    let applied = approve(&t.approver_b, &rid()).await.unwrap().into_inner();
    assert_eq!(applied.state, rk::BulkChangeState::Applied as i32);
    for p in &persons {
        assert_eq!(
            color(&mesh, &t, p).await.color,
            CodeColor::Yellow as i32,
            "applied with the second approver"
        );
    }
    assert_eq!(
        approve(&t.approver_b, &rid()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // A held batch of events, discarded: the colors stay as they were, for good.
    let others: Vec<String> = (0..3).map(|_| rid()).collect();
    let contacts = others
        .iter()
        .map(|p| rk::RiskEvent {
            event_id: rid(),
            person: person(p),
            observed_at: None,
            event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
                kind: rk::ContactKind::Close as i32,
                last_exposure_at: ts(-3600),
                case_reference: "case-0042".into(),
            })),
        })
        .collect();
    let reply = record(&mesh, &t, contacts).await;
    assert_eq!(reply.recorded, 3);
    assert!(!reply.bulk_change_id.is_empty());
    assert!(reply.changed.is_empty());
    let discard = rk::DiscardBulkChangeRequest {
        request_id: rid(),
        bulk_change_id: reply.bulk_change_id.clone(),
        note: String::new(),
    };
    let err = risk
        .discard_bulk_change(authorized(discard.clone(), &t.approver_a))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a discard needs a note");
    let discarded = risk
        .discard_bulk_change(authorized(
            rk::DiscardBulkChangeRequest {
                note: "批量导入有误".into(),
                ..discard
            },
            &t.approver_a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(discarded.state, rk::BulkChangeState::Discarded as i32);
    // A later re-evaluation of the same persons still ignores the discarded facts.
    record(&mesh, &t, vec![stay(&others[0], "330106", 1)]).await;
    for p in &others {
        assert_eq!(color(&mesh, &t, p).await.color, CodeColor::Green as i32);
    }

    // A directive batch whose pending changes exceed the threshold is held as well.
    let directed = risk
        .issue_directive(authorized(
            rk::IssueDirectiveRequest {
                request_id: rid(),
                persons: (0..3).map(|_| PersonRef { person_id: rid() }).collect(),
                kind: rk::DirectiveKind::HomeMonitoring as i32,
                starts_at: None,
                ends_at: ts(7 * DAY),
                document_reference: "杭疾控〔2026〕31 号".into(),
                issuing_unit: "杭州市疾控中心".into(),
            },
            &t.official,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !directed.bulk_change_id.is_empty(),
        "three pending changes > 2"
    );
    let err = risk
        .end_directive(authorized(
            rk::EndDirectiveRequest {
                request_id: rid(),
                directive_id: directed.directives[0].directive_id.clone(),
                reason: "解除".into(),
            },
            &t.official,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a held directive is not in force"
    );

    let audit = risk
        .list_audit_entries(authorized(
            rk::ListAuditEntriesRequest {
                action: rk::AuditAction::BulkChangeHeld as i32,
                ..Default::default()
            },
            &mesh.keys.token("auditor-1", &[roles::AUDITOR]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.entries.len(), 3, "every hold is in the audit trail");
    assert_eq!(
        mesh.risk
            .risk()
            .verify_audit_chain()
            .await
            .expect("audit chain") as usize,
        count(&mesh, "SELECT COUNT(*) FROM audit_entries").await
    );
    mesh.stop().await;
}

async fn count(mesh: &Mesh, sql: &str) -> usize {
    let db = mesh.risk.db();
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap() as usize
}

#[tokio::test]
async fn held_bulk_changes_wait_for_two_approvers_on_postgres() {
    held_bulk_changes_wait_for_two_approvers(Backend::Real).await;
}

#[tokio::test]
async fn held_bulk_changes_wait_for_two_approvers_on_the_embedded_default() {
    held_bulk_changes_wait_for_two_approvers(Backend::Embedded).await;
}

async fn submit(
    mesh: &Mesh,
    token: &str,
    id: &str,
    version: u64,
    statement: &str,
) -> Result<rk::Appeal, tonic::Status> {
    mesh.risk_client()
        .await
        .submit_appeal(authorized(
            rk::SubmitAppealRequest {
                request_id: rid(),
                person: person(id),
                color_version: version,
                statement: statement.into(),
                hotline_ticket: "12345-20261121-0007".into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn appeals_are_pre_reviewed_against_the_last_seven_days() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let t = tokens(&mesh);
    declare(&mesh, &t, medium_area("330108", 20)).await;

    // Ten days ago in the area, since then only elsewhere: the pre-review corrects.
    let cleared = rid();
    record(
        &mesh,
        &t,
        vec![stay(&cleared, "330108", 10), stay(&cleared, "330110", 1)],
    )
    .await;
    let before = color(&mesh, &t, &cleared).await;
    assert_eq!(before.color, CodeColor::Yellow as i32);
    let green = rid();
    record(&mesh, &t, vec![stay(&green, "330110", 1)]).await;
    let err = submit(
        &mesh,
        &t.app,
        &green,
        color(&mesh, &t, &green).await.version,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "green is not appealed"
    );
    let err = submit(&mesh, &t.app, &cleared, before.version + 1, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a stale version");
    let statement = "我只是路过，没有停留";
    let appeal = submit(&mesh, &t.app, &cleared, before.version, statement)
        .await
        .unwrap();
    assert_eq!(appeal.state, rk::AppealState::Corrected as i32);
    assert_eq!(appeal.channel, rk::AppealChannel::SelfService as i32);
    let review = appeal.pre_review.clone().unwrap();
    assert_eq!(review.outcome, rk::PreReviewOutcome::NoOverlap as i32);
    assert_eq!(review.stays_compared, 1);
    assert_eq!(
        appeal.corrected_to.as_ref().map(|c| c.color),
        Some(CodeColor::Green as i32)
    );
    assert_eq!(
        color(&mesh, &t, &cleared).await.color,
        CodeColor::Green as i32
    );
    // The statement is sealed at rest and opened for reviewers.
    let fetched = mesh
        .risk_client()
        .await
        .get_appeal(authorized(
            rk::GetAppealRequest {
                appeal_id: appeal.appeal_id.clone(),
            },
            &t.hotline,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.statement, statement);
    let by_app = mesh
        .risk_client()
        .await
        .get_appeal(authorized(
            rk::GetAppealRequest {
                appeal_id: appeal.appeal_id.clone(),
            },
            &t.app,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_app.state, rk::AppealState::Corrected as i32);
    assert!(
        by_app.statement.is_empty(),
        "statements are for reviewers only"
    );
    let needle = format!("position(convert_to('{statement}', 'UTF8') in");
    let plain = count(
        &mesh,
        &format!(
            "SELECT COUNT(*) FROM appeals WHERE {needle} payload) > 0 \
             OR {needle} statement_sealed) > 0"
        ),
    )
    .await;
    assert_eq!(plain, 0, "no plaintext statement in the database");
    let replies = count(
        &mesh,
        &format!("SELECT COUNT(*) FROM replies WHERE {needle} payload) > 0"),
    )
    .await;
    assert_eq!(replies, 0, "nor in stored replies");

    // Two days ago in the area: manual review, then a correction by two approvers.
    let overlap = rid();
    record(&mesh, &t, vec![stay(&overlap, "330108", 2)]).await;
    let current = color(&mesh, &t, &overlap).await;
    assert_eq!(current.color, CodeColor::Yellow as i32);
    let appeal = submit(&mesh, &t.app, &overlap, current.version, "")
        .await
        .unwrap();
    assert_eq!(appeal.state, rk::AppealState::InReview as i32);
    let review = appeal.pre_review.clone().unwrap();
    assert_eq!(review.outcome, rk::PreReviewOutcome::Overlap as i32);
    assert_eq!(review.overlaps.len(), 1);
    assert_eq!(
        submit(&mesh, &t.app, &overlap, current.version, "")
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists,
        "one open appeal per person"
    );
    let mut risk = mesh.risk_client().await;
    let listed = risk
        .list_appeals(authorized(rk::ListAppealsRequest::default(), &t.official))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .appeals
            .iter()
            .any(|a| a.appeal_id == appeal.appeal_id)
    );
    assert_eq!(
        risk.list_appeals(authorized(rk::ListAppealsRequest::default(), &t.app))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "the app lists one person's appeals only"
    );
    let decide = |token: &str, decision: rk::AppealDecision| {
        let request = rk::DecideAppealRequest {
            request_id: rid(),
            appeal_id: appeal.appeal_id.clone(),
            decision: decision as i32,
            note: "核实为基站漂移".into(),
            corrected_color: CodeColor::Green as i32,
            holds_until: ts(3 * DAY),
        };
        let token = token.to_owned();
        let mut risk = risk.clone();
        async move { risk.decide_appeal(authorized(request, &token)).await }
    };
    assert_eq!(
        decide(&t.official, rk::AppealDecision::Correct)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "correcting needs the approver role too"
    );
    let decider = mesh
        .keys
        .token("cdc-reviewer-2", &[roles::OFFICIAL, roles::APPROVER]);
    let pending = decide(&decider, rk::AppealDecision::Correct)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state, rk::AppealState::CorrectionPending as i32);
    assert_eq!(
        color(&mesh, &t, &overlap).await.color,
        CodeColor::Yellow as i32
    );
    let applied = risk
        .approve_override(authorized(
            rk::ApproveOverrideRequest {
                request_id: rid(),
                override_id: pending.override_id.clone(),
                note: String::new(),
            },
            &t.approver_b,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.state, rk::OverrideState::Applied as i32);
    assert_eq!(applied.appeal_id, appeal.appeal_id);
    assert_eq!(
        color(&mesh, &t, &overlap).await.color,
        CodeColor::Green as i32
    );
    let done = risk
        .get_appeal(authorized(
            rk::GetAppealRequest {
                appeal_id: appeal.appeal_id.clone(),
            },
            &t.app,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, rk::AppealState::Corrected as i32);
    assert_eq!(
        done.corrected_to.map(|c| c.color),
        Some(CodeColor::Green as i32)
    );

    // Red goes through the hotline only.
    let red = rid();
    let case = rk::RiskEvent {
        event_id: rid(),
        person: person(&red),
        observed_at: None,
        event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
            kind: rk::ContactKind::Close as i32,
            last_exposure_at: ts(-3600),
            case_reference: "case-0100".into(),
        })),
    };
    record(&mesh, &t, vec![case]).await;
    let current = color(&mesh, &t, &red).await;
    assert_eq!(current.color, CodeColor::Red as i32);
    let err = submit(&mesh, &t.app, &red, current.version, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("hotline"));
    let by_phone = submit(&mesh, &t.hotline, &red, current.version, "")
        .await
        .unwrap();
    assert_eq!(by_phone.channel, rk::AppealChannel::Hotline as i32);
    assert_eq!(
        by_phone.pre_review.unwrap().outcome,
        rk::PreReviewOutcome::NotApplicable as i32,
        "a contact is not explained by an itinerary"
    );
    let upheld = decide_other(&risk, &t.hotline, &by_phone.appeal_id).await;
    assert_eq!(upheld.state, rk::AppealState::Upheld as i32);
    assert_eq!(color(&mesh, &t, &red).await.color, CodeColor::Red as i32);

    // Bad input: one violation per bad field, nothing stored.
    let err = mesh
        .risk_client()
        .await
        .submit_appeal(authorized(
            rk::SubmitAppealRequest {
                request_id: String::new(),
                person: None,
                color_version: 0,
                statement: "x".repeat(2001),
                hotline_ticket: String::new(),
            },
            &t.hotline,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = err
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|f| f.field).collect())
        .unwrap_or_default();
    for field in [
        "request_id",
        "person",
        "color_version",
        "statement",
        "hotline_ticket",
    ] {
        assert!(
            fields.iter().any(|f| f.starts_with(field)),
            "{field} in {fields:?}"
        );
    }
    mesh.stop().await;
}

async fn decide_other(
    risk: &healthcode_proto::risk::v1::risk_service_client::RiskServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
    appeal_id: &str,
) -> rk::Appeal {
    risk.clone()
        .decide_appeal(authorized(
            rk::DecideAppealRequest {
                request_id: rid(),
                appeal_id: appeal_id.into(),
                decision: rk::AppealDecision::Uphold as i32,
                note: "接触者身份已核实".into(),
                corrected_color: 0,
                holds_until: None,
            },
            token,
        ))
        .await
        .expect("uphold")
        .into_inner()
}
