//! The identity service, started for real on port 0, walked through registration and all
//! four verification steps, the review queue, dependents, and bad requests: once on
//! PostgreSQL and Redis, once on the embedded default (SQLite, in-process cache).

use healthcode_auth::roles;
use healthcode_crypto::VerifyingKey;
use healthcode_proto::common::v1::{self as common, PersonRef};
use healthcode_proto::identity::v1::{self as pb, identity_service_client::IdentityServiceClient};
use identity::Application;
use identity::config::IdentityConfig;
use identity::providers::{LocalSms, Providers};
use integration_tests::{Backend, TestKeys, authorized, identity_env};
use sea_orm::EntityTrait;
use std::sync::Arc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// 11010519491231002X is the worked example of GB 11643; the others are built the same way.
const RESIDENT_ID: &str = "11010519491231002X";
const CHILD_ID: &str = "440308201501010013";
const NAME: &str = "张三丰";
const CHILD_NAME: &str = "张小明";
const PHONE: &str = "13800138000";

struct Running {
    app: Application,
    database_url: String,
    client: IdentityServiceClient<Channel>,
    sms: Arc<LocalSms>,
    keys: TestKeys,
}

async fn start(backend: Backend, extra: &[(&str, &str)]) -> Running {
    let keys = TestKeys::new();
    let mut env = identity_env(backend, &keys).await;
    for (k, v) in extra {
        env = env.with(*k, *v);
    }
    let database_url = env.raw("DATABASE_URL").unwrap_or_default().to_owned();
    let config = IdentityConfig::from_env(&env).expect("config");
    let (providers, sms) = Providers::local();
    let backends =
        healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
            .await
            .expect("backends");
    let app = Application::build(config, backends, providers)
        .await
        .expect("identity starts");
    let client = IdentityServiceClient::connect(format!("http://{}", app.local_addr()))
        .await
        .expect("connect");
    Running {
        app,
        database_url,
        client,
        sms,
        keys,
    }
}

impl Running {
    async fn stop(app: Application, database_url: &str) {
        app.shutdown().await;
        integration_tests::drop_test_database(database_url).await;
    }
}

fn resident(number: &str) -> Option<pb::IdentityDocument> {
    Some(pb::IdentityDocument {
        r#type: common::DocumentType::ResidentIdCard as i32,
        number: number.into(),
        issuing_country: String::new(),
    })
}

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.into(),
    })
}

fn step_state(status: &pb::VerificationStatus, step: pb::VerificationStep) -> pb::StepState {
    status
        .steps
        .iter()
        .find(|s| s.step == step as i32)
        .map(|s| pb::StepState::try_from(s.state).unwrap())
        .expect("every step is reported")
}

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut fields: Vec<String> = status
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    fields
}

async fn person_count(app: &Application) -> usize {
    identity::store::entities::person::Entity::find()
        .all(app.db())
        .await
        .unwrap()
        .len()
}

/// A PNG header followed by the local face provider's score marker.
fn face_image(score: u8) -> Vec<u8> {
    let mut image = b"\x89PNG\r\n\x1a\n".to_vec();
    image.extend_from_slice(format!("score={score:03}").as_bytes());
    image
}

async fn full_walk(backend: Backend) {
    let Running {
        app,
        database_url,
        mut client,
        sms,
        keys,
    } = start(backend, &[("PHONE_CODES_PER_HOUR", "3")]).await;
    let app_token = keys.app();
    let reviewer = keys.token("reviewer-7", &[roles::REVIEWER]);
    let official = keys.token("epidemic-office-3", &[roles::OFFICIAL]);
    let venue = keys.token("venue-scanner-1", &[roles::VENUE]);
    let full_view = keys.token("case-officer-2", &[roles::FULL_VIEW]);

    // --- Callers: no token, and a token without the role.
    let register = |request_id: &str, number: &str| pb::RegisterPersonRequest {
        request_id: request_id.into(),
        document: resident(number),
        name: NAME.into(),
        ..Default::default()
    };
    let first_request = uuid::Uuid::new_v4().to_string();
    let err = client
        .register_person(tonic::Request::new(register(&first_request, RESIDENT_ID)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .register_person(authorized(register(&first_request, RESIDENT_ID), &venue))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // --- Malformed: every bad field is named, and nothing is written.
    let err = client
        .register_person(authorized(
            pb::RegisterPersonRequest {
                request_id: "not-a-uuid".into(),
                document: resident("110105194912310021"),
                name: "<b>".into(),
                ..Default::default()
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["document.number", "name", "request_id"]
    );
    let err = client
        .register_person(authorized(pb::RegisterPersonRequest::default(), &app_token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["document", "name"]);
    assert_eq!(person_count(&app).await, 0);

    // --- Registration: identity details pass at once for a resident card.
    let registered = client
        .register_person(authorized(
            register(&first_request, RESIDENT_ID),
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    let id = registered.person.unwrap().person_id;
    let status = registered.status.unwrap();
    assert_eq!(
        step_state(&status, pb::VerificationStep::IdentityDetails),
        pb::StepState::Passed
    );
    assert!(!status.verified);
    assert_eq!(status.level, 1);

    // The same request again is the same answer; another request for the document is a duplicate.
    let replayed = client
        .register_person(authorized(
            register(&first_request, RESIDENT_ID),
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.person.unwrap().person_id, id);
    let err = client
        .register_person(authorized(
            register(&uuid::Uuid::new_v4().to_string(), "11010519491231002x"),
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(!err.message().contains("1101"), "{}", err.message());
    assert_eq!(person_count(&app).await, 1);

    // --- Steps out of order are refused.
    let err = client
        .submit_face_match(authorized(
            pb::SubmitFaceMatchRequest {
                person: person(&id),
                live_image: face_image(95),
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_error_details().error_info().unwrap().reason,
        "PREVIOUS_STEP_NOT_PASSED"
    );

    // --- Phone: bad number, wrong code, right code.
    let err = client
        .send_phone_code(authorized(
            pb::SendPhoneCodeRequest {
                person: person(&id),
                phone_number: "12345".into(),
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["phone_number"]);
    let sent = client
        .send_phone_code(authorized(
            pb::SendPhoneCodeRequest {
                person: person(&id),
                phone_number: format!("+86{PHONE}"),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.attempts_allowed, 5);
    let code = sms.last_code(PHONE).expect("a code was sent");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let err = client
        .confirm_phone_code(authorized(
            pb::ConfirmPhoneCodeRequest {
                person: person(&id),
                code: wrong.into(),
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["code"]);
    assert!(
        err.message().contains("4 attempts left"),
        "{}",
        err.message()
    );
    let status = client
        .confirm_phone_code(authorized(
            pb::ConfirmPhoneCodeRequest {
                person: person(&id),
                code: code.clone(),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        step_state(&status, pb::VerificationStep::Phone),
        pb::StepState::Passed
    );
    // A code works once.
    let err = client
        .confirm_phone_code(authorized(
            pb::ConfirmPhoneCodeRequest {
                person: person(&id),
                code,
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // --- Face: a low-confidence match goes to review; the reviewer approves it.
    let err = client
        .submit_face_match(authorized(
            pb::SubmitFaceMatchRequest {
                person: person(&id),
                live_image: b"GIF89a".to_vec(),
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["live_image"]);
    let status = client
        .submit_face_match(authorized(
            pb::SubmitFaceMatchRequest {
                person: person(&id),
                live_image: face_image(70),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        step_state(&status, pb::VerificationStep::FaceMatch),
        pb::StepState::PendingReview
    );
    assert!(!status.verified);
    let err = client
        .list_reviews(authorized(pb::ListReviewsRequest::default(), &app_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let queue = client
        .list_reviews(authorized(pb::ListReviewsRequest::default(), &reviewer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queue.reviews.len(), 1);
    let review = &queue.reviews[0];
    assert_eq!(review.reason, "FACE_LOW_CONFIDENCE");
    assert_eq!(review.subject.as_ref().unwrap().masked_name, "张**");
    assert!(review.live_image.is_empty(), "lists carry no attachments");
    let full_review = client
        .get_review(authorized(
            pb::GetReviewRequest {
                review_id: review.review_id.clone(),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        full_review.live_image,
        face_image(70),
        "the reviewer sees the doubtful image"
    );
    let err = client
        .decide_review(authorized(
            pb::DecideReviewRequest {
                review_id: review.review_id.clone(),
                decision: pb::ReviewDecision::Reject as i32,
                note: String::new(),
            },
            &reviewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["note"]);
    let decided = client
        .decide_review(authorized(
            pb::DecideReviewRequest {
                review_id: review.review_id.clone(),
                decision: pb::ReviewDecision::Approve as i32,
                note: "matches the document photo".into(),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.state, pb::ReviewState::Approved as i32);
    assert_eq!(decided.decided_by, "reviewer-7");
    let err = client
        .decide_review(authorized(
            pb::DecideReviewRequest {
                review_id: review.review_id.clone(),
                decision: pb::ReviewDecision::Reject as i32,
                note: "changed my mind".into(),
            },
            &reviewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // --- Verified now, with an attestation any SM2 implementation can check.
    let status = client
        .get_verification_status(authorized(
            pb::GetVerificationStatusRequest {
                person: person(&id),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(status.verified);
    assert_eq!(status.level, 3);
    let keys_published = client
        .get_public_keys(common::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let published = &keys_published.keys[0];
    assert_eq!(published.key_id, status.key_id);
    assert!(
        published
            .public_key_pem
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let verifying =
        VerifyingKey::from_sec1(published.key_id.clone(), &published.public_key_sec1).unwrap();
    verifying
        .verify(&status.attestation, &status.signature)
        .unwrap();
    let statement = String::from_utf8(status.attestation.clone()).unwrap();
    assert!(statement.contains(&id), "{statement}");
    assert!(
        verifying
            .verify(b"something else", &status.signature)
            .is_err()
    );

    // --- Bank card: bad digits, someone else's card, then the person's own.
    for (card, expected) in [
        ("4111111111111112", Err(Code::InvalidArgument)),
        ("4000000000000002", Ok(pb::StepState::Failed)),
        ("4111111111111111", Ok(pb::StepState::Passed)),
    ] {
        let result = client
            .submit_bank_card_check(authorized(
                pb::SubmitBankCardCheckRequest {
                    person: person(&id),
                    card_number: card.into(),
                },
                &app_token,
            ))
            .await;
        match expected {
            Err(code) => assert_eq!(result.unwrap_err().code(), code),
            Ok(state) => assert_eq!(
                step_state(
                    &result.unwrap().into_inner(),
                    pb::VerificationStep::BankCard
                ),
                state
            ),
        }
    }
    let status = client
        .get_verification_status(authorized(
            pb::GetVerificationStatusRequest {
                person: person(&id),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.level, 4);

    // --- Rate limit per phone number: 3 codes an hour in this test.
    let other = client
        .register_person(authorized(
            pb::RegisterPersonRequest {
                request_id: String::new(),
                document: resident("440308199901010012"),
                name: "李四".into(),
                ..Default::default()
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .person
        .unwrap()
        .person_id;
    let send = |who: &str| {
        authorized(
            pb::SendPhoneCodeRequest {
                person: person(who),
                phone_number: PHONE.into(),
            },
            &app_token,
        )
    };
    client.send_phone_code(send(&other)).await.unwrap();
    client.send_phone_code(send(&other)).await.unwrap();
    let err = client.send_phone_code(send(&other)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // A number the carrier refuses is a clear precondition failure, not an internal error.
    let err = client
        .send_phone_code(authorized(
            pb::SendPhoneCodeRequest {
                person: person(&other),
                phone_number: "13800130000".into(),
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // --- Military officer card: only an official files it, and it waits for review.
    let military = pb::RegisterPersonRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        document: Some(pb::IdentityDocument {
            r#type: common::DocumentType::MilitaryOfficerCard as i32,
            number: "军字第20231234号".into(),
            issuing_country: String::new(),
        }),
        name: "王五".into(),
        ..Default::default()
    };
    let err = client
        .register_person(authorized(military.clone(), &app_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let filed = client
        .register_person(authorized(military, &official))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        step_state(
            filed.status.as_ref().unwrap(),
            pb::VerificationStep::IdentityDetails
        ),
        pb::StepState::PendingReview
    );

    // --- Foreign passport: English name and both images required; images leave with the review.
    let passport = |english: &str, pages: bool| pb::RegisterPersonRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        document: Some(pb::IdentityDocument {
            r#type: common::DocumentType::ForeignPassport as i32,
            number: "19FR12345".into(),
            issuing_country: "FRA".into(),
        }),
        name: "Jean Dupont".into(),
        english_name: english.into(),
        passport_data_page: if pages { face_image(0) } else { Vec::new() },
        visa_page: if pages { face_image(1) } else { Vec::new() },
    };
    let err = client
        .register_person(authorized(passport("", false), &app_token))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["english_name", "passport_data_page", "visa_page"]
    );
    client
        .register_person(authorized(passport("Jean Dupont", true), &app_token))
        .await
        .unwrap();
    let queue = client
        .list_reviews(authorized(pb::ListReviewsRequest::default(), &reviewer))
        .await
        .unwrap()
        .into_inner();
    let reasons: Vec<&str> = queue.reviews.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons, ["MILITARY_OFFICER_CARD", "FOREIGN_PASSPORT"]);
    let passport_review = client
        .get_review(authorized(
            pb::GetReviewRequest {
                review_id: queue.reviews[1].review_id.clone(),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(passport_review.passport_data_page, face_image(0));
    assert_eq!(passport_review.visa_page, face_image(1));
    // Paging: one at a time gives the same two reviews.
    let first_page = client
        .list_reviews(authorized(
            pb::ListReviewsRequest {
                state: 0,
                page: Some(common::PageRequest {
                    page_size: 1,
                    page_token: String::new(),
                }),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first_page.reviews.len(), 1);
    assert!(!first_page.next_page_token.is_empty());
    let decided = client
        .decide_review(authorized(
            pb::DecideReviewRequest {
                review_id: passport_review.review_id.clone(),
                decision: pb::ReviewDecision::Approve as i32,
                note: "visa valid".into(),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    let after = client
        .get_review(authorized(
            pb::GetReviewRequest {
                review_id: passport_review.review_id.clone(),
            },
            &reviewer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.state, pb::ReviewState::Approved as i32);
    assert!(
        after.passport_data_page.is_empty(),
        "deleted with the decision"
    );
    assert!(after.visa_page.is_empty());
    assert_eq!(after.note, "visa valid");

    // --- A dependent, verified through the guardian.
    let dependent = |guardian: &str| pb::RegisterDependentRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        guardian: person(guardian),
        document: resident(CHILD_ID),
        name: CHILD_NAME.into(),
        english_name: String::new(),
        relationship: pb::Relationship::Child as i32,
    };
    let err = client
        .register_dependent(authorized(dependent(&other), &app_token))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "an unverified guardian"
    );
    let err = client
        .register_dependent(authorized(
            pb::RegisterDependentRequest {
                relationship: 0,
                ..dependent(&id)
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["relationship"]);
    // An adult cannot be taken over as somebody's child.
    let err = client
        .register_dependent(authorized(
            pb::RegisterDependentRequest {
                document: resident("440308199901010012"),
                ..dependent(&id)
            },
            &app_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["relationship"]);
    let child_request = dependent(&id);
    let child = client
        .register_dependent(authorized(child_request.clone(), &app_token))
        .await
        .unwrap()
        .into_inner();
    // A retry is the same answer.
    let again = client
        .register_dependent(authorized(child_request.clone(), &app_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.person, child.person);
    let child_status = child.status.unwrap();
    assert!(child_status.verified);
    assert_eq!(child_status.guardian.unwrap().person_id, id);
    let listed = client
        .list_dependents(authorized(
            pb::ListDependentsRequest {
                guardian: person(&id),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.dependents.len(), 1);
    assert_eq!(
        listed.dependents[0].person.as_ref().unwrap().masked_name,
        "张**"
    );

    // --- Views: masked for a venue, full only for full_view.
    let masked = client
        .get_masked_person(authorized(
            pb::GetMaskedPersonRequest {
                person: person(&id),
            },
            &venue,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(masked.masked_name, "张**");
    assert_eq!(masked.masked_document_number, "1****************X");
    assert!(masked.verified);
    let err = client
        .get_person(authorized(
            pb::GetPersonRequest {
                person: person(&id),
            },
            &venue,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let full = client
        .get_person(authorized(
            pb::GetPersonRequest {
                person: person(&id),
            },
            &full_view,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.name, NAME);
    assert_eq!(full.document.unwrap().number, RESIDENT_ID);
    assert_eq!(full.phone_number, PHONE);
    let err = client
        .get_person(authorized(
            pb::GetPersonRequest {
                person: person(&uuid::Uuid::new_v4().to_string()),
            },
            &full_view,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let found = client
        .find_person_by_document(authorized(
            pb::FindPersonByDocumentRequest {
                document: resident(RESIDENT_ID),
            },
            &app_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.person.unwrap().person_id, id);

    // --- At rest: no plaintext name, document number or phone in any row.
    assert_no_plaintext(
        &app,
        &[
            NAME,
            RESIDENT_ID,
            PHONE,
            CHILD_NAME,
            CHILD_ID,
            "19FR12345",
            "DUPONT",
            "王五",
            "matches the document photo",
            "visa valid",
        ],
    )
    .await;

    // --- Health, then a graceful stop.
    let channel = Channel::from_shared(format!("http://{}", app.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "healthcode.identity.v1.IdentityService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    Running::stop(app, &database_url).await;
}

async fn assert_no_plaintext(app: &Application, secrets: &[&str]) {
    use identity::store::entities::{person, phone_challenge, review, sms_send, step};
    let db = app.db();
    let mut dump = String::new();
    for row in person::Entity::find().all(db).await.unwrap() {
        dump.push_str(&format!("{row:?}\n"));
    }
    for row in step::Entity::find().all(db).await.unwrap() {
        dump.push_str(&format!("{row:?}\n"));
    }
    for row in phone_challenge::Entity::find().all(db).await.unwrap() {
        dump.push_str(&format!("{row:?}\n"));
    }
    for row in review::Entity::find().all(db).await.unwrap() {
        dump.push_str(&format!("{row:?}\n"));
    }
    for row in sms_send::Entity::find().all(db).await.unwrap() {
        dump.push_str(&format!("{row:?}\n"));
    }
    assert!(dump.contains("dev-1:"), "sealed fields carry their key id");
    for secret in secrets {
        assert!(!dump.contains(secret), "plaintext {secret:?} found at rest");
    }
}

#[tokio::test]
async fn identity_end_to_end_on_postgres_and_redis() {
    full_walk(Backend::Real).await;
}

#[tokio::test]
async fn identity_end_to_end_on_the_embedded_default() {
    full_walk(Backend::Embedded).await;
}

#[tokio::test]
async fn concurrent_duplicate_registrations_create_one_person() {
    let Running {
        app,
        database_url,
        client,
        keys,
        ..
    } = start(Backend::Real, &[]).await;
    let token = keys.app();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = client.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .register_person(authorized(
                    pb::RegisterPersonRequest {
                        request_id: uuid::Uuid::new_v4().to_string(),
                        document: resident(RESIDENT_ID),
                        name: NAME.into(),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => created += 1,
            Err(code) => assert_eq!(code, Code::AlreadyExists),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(person_count(&app).await, 1);
    Running::stop(app, &database_url).await;
}

#[tokio::test]
async fn a_wrong_configuration_is_refused_before_anything_binds() {
    let keys = TestKeys::new();
    let env = identity_env(Backend::Embedded, &keys).await;
    for (name, value) in [
        ("DATA_KEYS", "k1:zz"),
        ("BLIND_INDEX_KEY", "00"),
        ("SIGNING_KEY", "not-hex"),
        ("DATABASE_URL", "mysql://nope"),
        ("LISTEN_ADDR", "nowhere"),
    ] {
        let err = IdentityConfig::from_env(&env.clone().with(name, value))
            .err()
            .unwrap_or_else(|| panic!("{name} should be refused"));
        let text = err.to_string();
        assert!(text.starts_with(name), "{text}");
        assert!(!text.contains(value) || value.len() < 3, "{text}");
    }
    integration_tests::drop_test_database(env.raw("DATABASE_URL").unwrap_or_default()).await;
}

/// Registers the GB 11643 example person and sends a code to [`PHONE`]; returns the id.
async fn register_and_send_code(
    client: &mut IdentityServiceClient<Channel>,
    token: &str,
) -> String {
    let id = client
        .register_person(authorized(
            pb::RegisterPersonRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                document: resident(RESIDENT_ID),
                name: NAME.into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("register")
        .into_inner()
        .person
        .expect("person")
        .person_id;
    client
        .send_phone_code(authorized(
            pb::SendPhoneCodeRequest {
                person: person(&id),
                phone_number: PHONE.into(),
            },
            token,
        ))
        .await
        .expect("send a code");
    id
}

#[tokio::test]
async fn registration_and_phone_codes_go_on_while_redis_is_down() {
    let Running {
        app,
        database_url,
        mut client,
        sms,
        keys,
    } = start(
        Backend::Real,
        // Nothing listens on port 1: every cache call fails fast.
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/0"),
            ("REDIS_TIMEOUT_MS", "200"),
        ],
    )
    .await;
    let token = keys.app();
    // Registration does not need the cache; the SMS rate limit falls back to the database.
    let id = register_and_send_code(&mut client, &token).await;
    let status = client
        .confirm_phone_code(authorized(
            pb::ConfirmPhoneCodeRequest {
                person: person(&id),
                code: sms.last_code(PHONE).unwrap(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        step_state(&status, pb::VerificationStep::Phone),
        pb::StepState::Passed
    );
    Running::stop(app, &database_url).await;
}

/// Sixteen wrong guesses at once against a code that allows five: five are counted as
/// wrong, the rest find the attempts spent, and the right code no longer works.
async fn concurrent_guesses_spend_one_attempt_each(backend: Backend) {
    let Running {
        app,
        database_url,
        client,
        sms,
        keys,
    } = start(backend, &[]).await;
    let token = keys.app();
    let mut c = client.clone();
    let id = register_and_send_code(&mut c, &token).await;
    let code = sms.last_code(PHONE).unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = client.clone();
        let (token, id) = (token.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            c.confirm_phone_code(authorized(
                pb::ConfirmPhoneCodeRequest {
                    person: person(&id),
                    code: wrong.into(),
                },
                &token,
            ))
            .await
            .unwrap_err()
            .code()
        }));
    }
    let mut wrong_counted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Code::InvalidArgument => wrong_counted += 1,
            other => assert_eq!(other, Code::FailedPrecondition),
        }
    }
    assert_eq!(wrong_counted, 5);
    let err = c
        .confirm_phone_code(authorized(
            pb::ConfirmPhoneCodeRequest {
                person: person(&id),
                code,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    Running::stop(app, &database_url).await;
}

#[tokio::test]
async fn concurrent_guesses_on_postgres() {
    concurrent_guesses_spend_one_attempt_each(Backend::Real).await;
}

#[tokio::test]
async fn concurrent_guesses_on_the_embedded_default() {
    concurrent_guesses_spend_one_attempt_each(Backend::Embedded).await;
}

#[tokio::test]
async fn retired_signing_keys_stay_published_after_a_rotation() {
    let old = healthcode_crypto::SigningKey::generate("identity-2025").unwrap();
    let retired = format!("identity-2025:{}", old.verifying_key().to_hex());
    let Running {
        app,
        database_url,
        mut client,
        ..
    } = start(
        Backend::Embedded,
        &[("SIGNING_RETIRED_KEYS", retired.as_str())],
    )
    .await;
    let keys = client
        .get_public_keys(common::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(
        ids,
        ["identity-dev-1", "identity-2025"],
        "the active key first"
    );
    // An attestation the old key made still verifies with what is published.
    let signature = old.sign(b"attested before the rotation").unwrap();
    VerifyingKey::from_sec1("identity-2025", &keys[1].public_key_sec1)
        .unwrap()
        .verify(b"attested before the rotation", &signature)
        .unwrap();
    Running::stop(app, &database_url).await;
}
