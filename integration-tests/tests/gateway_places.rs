//! Places, check-ins and offline-code revocation at the gateway, with the whole mesh started
//! for real: on PostgreSQL and Redis, and on the embedded default. A retired place takes no
//! more scans or check-ins; a check-in is recorded once and feeds the risk service's
//! itinerary once; a bad request names every bad field.

use gateway::PLACE_VISIT_TOPIC;
use healthcode_auth::roles;
use healthcode_codes::{device_message, present_offline, sign_place, step_at};
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{CodeColor, GeoPoint, PageRequest, PersonRef};
use healthcode_proto::gateway::v1 as gw;
use healthcode_proto::risk::v1 as rk;
use integration_tests::mesh::Mesh;
use integration_tests::{Backend, authorized, bad_fields};
use prost::Message;
use sea_orm::{ConnectionTrait, Statement};
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

const UNIT_A: &str = "913301000000000201";
const UNIT_B: &str = "913301000000000202";

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn venue(mesh: &Mesh, unit: &str) -> String {
    mesh.keys.token(unit, &[roles::VENUE])
}

fn official(mesh: &Mesh) -> String {
    mesh.keys.token("cdc-officer-7", &[roles::OFFICIAL])
}

fn a_place(name: &str, division: &str) -> gw::Place {
    gw::Place {
        name: name.into(),
        address: "延安路 98 号".into(),
        division_code: division.into(),
        location: Some(GeoPoint {
            latitude: 30.2595,
            longitude: 120.1637,
        }),
        category: gw::PlaceCategory::Shop as i32,
        checking_unit: "银泰商业".into(),
        ..Default::default()
    }
}

async fn register(mesh: &Mesh, token: &str, place: gw::Place) -> gw::Place {
    mesh.gateway_client()
        .await
        .register_place(authorized(
            gw::RegisterPlaceRequest {
                request_id: request_id(),
                place: Some(place),
            },
            token,
        ))
        .await
        .expect("register place")
        .into_inner()
}

async fn list(
    mesh: &Mesh,
    token: &str,
    request: gw::ListPlacesRequest,
) -> Result<gw::ListPlacesResponse, tonic::Status> {
    mesh.gateway_client()
        .await
        .list_places(authorized(request, token))
        .await
        .map(|r| r.into_inner())
}

async fn show(mesh: &Mesh, id: &str) -> gw::ShowMyCodeResponse {
    mesh.gateway_client()
        .await
        .show_my_code(authorized(
            gw::ShowMyCodeRequest {
                person: person(id),
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .expect("show my code")
        .into_inner()
}

async fn scan(
    mesh: &Mesh,
    token: &str,
    request: gw::VerifyScanRequest,
) -> Result<gw::VerifyScanResponse, tonic::Status> {
    mesh.gateway_client()
        .await
        .verify_scan(authorized(request, token))
        .await
        .map(|r| r.into_inner())
}

async fn check_in(
    mesh: &Mesh,
    request: gw::CheckInRequest,
) -> Result<gw::CheckInResponse, tonic::Status> {
    mesh.gateway_client()
        .await
        .check_in(authorized(request, &mesh.keys.app()))
        .await
        .map(|r| r.into_inner())
}

async fn check_records(mesh: &Mesh, id: &str) -> Vec<gw::CheckRecord> {
    mesh.gateway_client()
        .await
        .list_check_records(authorized(
            gw::ListCheckRecordsRequest {
                person: person(id),
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .expect("list check records")
        .into_inner()
        .records
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// A number read from the gateway's own database.
async fn count(mesh: &Mesh, sql: &str) -> i64 {
    let db = mesh.gateway.db();
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("count query")
        .expect("one row")
        .try_get_by_index::<i64>(0)
        .expect("a count")
}

async fn place_visits_enqueued(mesh: &Mesh) -> i64 {
    count(
        mesh,
        &format!("SELECT COUNT(*) FROM outbox WHERE topic = '{PLACE_VISIT_TOPIC}'"),
    )
    .await
}

/// The place visits in the gateway's outbox, oldest first, as (key, event).
async fn place_visits(mesh: &Mesh) -> Vec<(String, rk::RiskEvent)> {
    let db = mesh.gateway.db();
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        format!(
            "SELECT \"key\", payload FROM outbox WHERE topic = '{PLACE_VISIT_TOPIC}' ORDER BY seq"
        ),
    ))
    .await
    .expect("outbox rows")
    .iter()
    .map(|row| {
        let key: String = row.try_get_by_index(0).expect("key");
        let payload: Vec<u8> = row.try_get_by_index(1).expect("payload");
        (
            key,
            rk::RiskEvent::decode(&payload[..]).expect("a RiskEvent"),
        )
    })
    .collect()
}

async fn places_are_listed_and_a_retired_place_refuses_scans(backend: Backend) {
    let mesh = Mesh::start(backend, None).await;
    let venue_a = venue(&mesh, UNIT_A);
    let venue_b = venue(&mesh, UNIT_B);
    let a1 = register(&mesh, &venue_a, a_place("西湖银泰", "330102")).await;
    let a2 = register(&mesh, &venue_a, a_place("湖滨银泰", "330106")).await;
    let mut for_b = a_place("武林银泰", "330102");
    for_b.checking_unit_code = UNIT_B.into();
    let b1 = register(&mesh, &official(&mesh), for_b).await;
    assert_eq!(b1.checking_unit_code, UNIT_B);

    // A venue lists its own places, by place code, page by page.
    let mut own = vec![a1.place_code.clone(), a2.place_code.clone()];
    own.sort();
    let all = list(&mesh, &venue_a, gw::ListPlacesRequest::default())
        .await
        .unwrap();
    let codes: Vec<String> = all.places.iter().map(|p| p.place_code.clone()).collect();
    assert_eq!(codes, own);
    assert!(all.next_page_token.is_empty());
    let page = |token: &str| gw::ListPlacesRequest {
        page: Some(PageRequest {
            page_size: 1,
            page_token: token.to_owned(),
        }),
        ..Default::default()
    };
    let first = list(&mesh, &venue_a, page("")).await.unwrap();
    assert_eq!(first.places.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = list(&mesh, &venue_a, page(&first.next_page_token))
        .await
        .unwrap();
    assert_eq!(second.places.len(), 1);
    assert!(second.next_page_token.is_empty());
    assert_eq!(
        [
            first.places[0].place_code.clone(),
            second.places[0].place_code.clone()
        ],
        [own[0].clone(), own[1].clone()]
    );
    // An official lists by division across units; a venue may not list another unit's.
    let in_division = list(
        &mesh,
        &official(&mesh),
        gw::ListPlacesRequest {
            division_code: "330102".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut expected = vec![a1.place_code.clone(), b1.place_code.clone()];
    expected.sort();
    let codes: Vec<String> = in_division
        .places
        .iter()
        .map(|p| p.place_code.clone())
        .collect();
    assert_eq!(codes, expected);
    let err = list(
        &mesh,
        &venue_a,
        gw::ListPlacesRequest {
            checking_unit_code: UNIT_B.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A scan at the place works, which also puts the place in the gateway's place cache.
    let id = mesh.verified_person(201).await;
    let scan_at = |place: &str| gw::VerifyScanRequest {
        request_id: request_id(),
        qr_payload: String::new(),
        place_code: place.to_owned(),
        scanner_id: "gate-1".into(),
    };
    let code = show(&mesh, &id).await;
    let scanned = scan(
        &mesh,
        &venue_a,
        gw::VerifyScanRequest {
            qr_payload: code.qr_payload.clone(),
            ..scan_at(&a1.place_code)
        },
    )
    .await
    .unwrap();
    assert_eq!(scanned.result, gw::ScanResult::Valid as i32);

    // Another unit may not retire it; its own unit may, once; a retry answers the same.
    let deactivate = gw::DeactivatePlaceRequest {
        request_id: request_id(),
        place_code: a1.place_code.clone(),
        reason: "门店停业".into(),
    };
    let mut client = mesh.gateway_client().await;
    let err = client
        .deactivate_place(authorized(deactivate.clone(), &venue_b))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let retired = client
        .deactivate_place(authorized(deactivate.clone(), &venue_a))
        .await
        .unwrap()
        .into_inner();
    assert!(!retired.active);
    assert_eq!(retired.place_code, a1.place_code);
    let again = client
        .deactivate_place(authorized(deactivate.clone(), &venue_a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, retired);
    let err = client
        .deactivate_place(authorized(
            gw::DeactivatePlaceRequest {
                request_id: request_id(),
                ..deactivate
            },
            &venue_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "PLACE_INACTIVE");

    // Scans and check-ins there are refused at once, though the place was cached active.
    let code = show(&mesh, &id).await;
    let err = scan(
        &mesh,
        &venue_a,
        gw::VerifyScanRequest {
            qr_payload: code.qr_payload.clone(),
            ..scan_at(&a1.place_code)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "PLACE_INACTIVE");
    let err = check_in(
        &mesh,
        gw::CheckInRequest {
            request_id: request_id(),
            person: person(&id),
            place_qr_payload: a1.qr_payload.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The other place still scans; the retired one is listed as inactive.
    let scanned = scan(
        &mesh,
        &venue_a,
        gw::VerifyScanRequest {
            qr_payload: code.qr_payload.clone(),
            ..scan_at(&a2.place_code)
        },
    )
    .await
    .unwrap();
    assert_eq!(scanned.result, gw::ScanResult::Valid as i32);
    let all = list(&mesh, &venue_a, gw::ListPlacesRequest::default())
        .await
        .unwrap();
    let active: Vec<(String, bool)> = all
        .places
        .iter()
        .map(|p| (p.place_code.clone(), p.active))
        .collect();
    assert!(active.contains(&(a1.place_code.clone(), false)));
    assert!(active.contains(&(a2.place_code.clone(), true)));
    mesh.stop().await;
}

#[tokio::test]
async fn places_are_listed_and_a_retired_place_refuses_scans_on_postgres_and_redis() {
    places_are_listed_and_a_retired_place_refuses_scans(Backend::Real).await;
}

#[tokio::test]
async fn places_are_listed_and_a_retired_place_refuses_scans_on_the_embedded_default() {
    places_are_listed_and_a_retired_place_refuses_scans(Backend::Embedded).await;
}

async fn a_check_in_is_recorded_once_and_feeds_the_itinerary_once(backend: Backend) {
    let mesh = Mesh::start(backend, None).await;
    let id = mesh.verified_person(202).await;
    let place = register(&mesh, &venue(&mesh, UNIT_A), a_place("西湖银泰", "330102")).await;
    let request = gw::CheckInRequest {
        request_id: request_id(),
        person: person(&id),
        place_qr_payload: place.qr_payload.clone(),
        ..Default::default()
    };
    let first = check_in(&mesh, request.clone()).await.unwrap();
    assert_eq!(first.place.as_ref().unwrap().place_code, place.place_code);
    let code = first.code.as_ref().unwrap();
    assert_eq!(code.color, CodeColor::Green as i32);
    assert!(code.qr_payload.starts_with("HCQ1:"));
    assert!(first.entry_allowed);
    assert!(!first.scan_id.is_empty());

    // A retry answers the same check-in and records nothing more.
    let retried = check_in(&mesh, request).await.unwrap();
    assert_eq!(retried.scan_id, first.scan_id);
    assert_eq!(retried.checked_in_at, first.checked_in_at);
    let records = check_records(&mesh, &id).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].scan_id, first.scan_id);
    assert_eq!(records[0].kind, gw::CheckKind::PlaceCheckIn as i32);
    assert_eq!(records[0].place_name, "西湖银泰");
    assert_eq!(place_visits_enqueued(&mesh).await, 1);

    // The outbox row is the itinerary point the risk service consumes.
    let visits = place_visits(&mesh).await;
    let (key, event) = &visits[0];
    assert_eq!(key, &id);
    assert_eq!(event.event_id, first.scan_id);
    assert_eq!(event.person, person(&id));
    assert_eq!(event.observed_at, first.checked_in_at);
    let Some(rk::risk_event::Event::AreaStay(stay)) = &event.event else {
        panic!("an area stay: {event:?}");
    };
    assert_eq!(stay.division_code, "330102");
    assert_eq!(stay.location, place.location);
    assert_eq!(stay.place_code, place.place_code);
    assert_eq!(stay.arrived_at, first.checked_in_at);
    assert_eq!(stay.left_at, None);
    assert_eq!(stay.source, rk::StaySource::VenueScan as i32);

    // A venue scan is a place visit too, also once however often it is retried.
    let code = show(&mesh, &id).await;
    let scan_request = gw::VerifyScanRequest {
        request_id: request_id(),
        qr_payload: code.qr_payload,
        place_code: place.place_code.clone(),
        scanner_id: String::new(),
    };
    let venue_a = venue(&mesh, UNIT_A);
    let scanned = scan(&mesh, &venue_a, scan_request.clone()).await.unwrap();
    let rescanned = scan(&mesh, &venue_a, scan_request).await.unwrap();
    assert_eq!(rescanned.scan_id, scanned.scan_id);
    assert_eq!(check_records(&mesh, &id).await.len(), 2);
    assert_eq!(place_visits_enqueued(&mesh).await, 2);
    let visits = place_visits(&mesh).await;
    assert_eq!(visits[1].1.event_id, scanned.scan_id);

    // The relay moves both to the stream the risk service reads.
    let bus = &mesh.backends.bus;
    bus.ensure_group(PLACE_VISIT_TOPIC, "it-risk")
        .await
        .unwrap();
    let mut delivered = Vec::new();
    for _ in 0..100 {
        delivered.extend(
            bus.read_new(PLACE_VISIT_TOPIC, "it-risk", "it-1", 10)
                .await
                .unwrap(),
        );
        if delivered.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = delivered
        .iter()
        .map(|d| {
            rk::RiskEvent::decode(&d.event.payload[..])
                .unwrap()
                .event_id
        })
        .collect();
    assert_eq!(ids, [first.scan_id.clone(), scanned.scan_id.clone()]);
    // The relay marks its rows once the stream has taken them.
    let mut published = 0;
    for _ in 0..100 {
        published = count(
            &mesh,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL",
        )
        .await;
        if published == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(published, 2);

    // The risk service's own consumer group turns both visits into itinerary stays, once
    // each: a medium-risk area declared over the place's division then turns the person
    // yellow at the gateway.
    let risk_db = mesh.risk.db();
    let stays_sql = format!("SELECT COUNT(*) FROM events WHERE person_id = '{id}'");
    let mut stays = 0;
    for _ in 0..200 {
        stays = risk_db
            .query_one_raw(Statement::from_string(
                risk_db.get_database_backend(),
                stays_sql.clone(),
            ))
            .await
            .expect("count stays")
            .expect("one row")
            .try_get_by_index::<i64>(0)
            .expect("a count");
        if stays == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stays, 2, "both visits are stays in the risk service");
    mesh.risk_client()
        .await
        .declare_risk_area(authorized(
            rk::DeclareRiskAreaRequest {
                request_id: request_id(),
                area: Some(rk::RiskArea {
                    name: "上城区中风险区".into(),
                    level: rk::RiskAreaLevel::Medium as i32,
                    extent: Some(rk::risk_area::Extent::DivisionCode("330102".into())),
                    valid_from: Some(prost_types::Timestamp {
                        seconds: chrono::Utc::now().timestamp() - 86_400,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            },
            &official(&mesh),
        ))
        .await
        .expect("declare area");
    assert_eq!(show(&mesh, &id).await.color, CodeColor::Yellow as i32);
    mesh.stop().await;
}

#[tokio::test]
async fn a_check_in_is_recorded_once_and_feeds_the_itinerary_once_on_postgres_and_redis() {
    a_check_in_is_recorded_once_and_feeds_the_itinerary_once(Backend::Real).await;
}

#[tokio::test]
async fn a_check_in_is_recorded_once_and_feeds_the_itinerary_once_on_the_embedded_default() {
    a_check_in_is_recorded_once_and_feeds_the_itinerary_once(Backend::Embedded).await;
}

async fn revoked_offline_codes_verify_as_revoked(backend: Backend) {
    let mesh = Mesh::start(backend, None).await;
    let id = mesh.verified_person(203).await;
    let mut client = mesh.gateway_client().await;
    let device = SigningKey::generate("device").unwrap();
    let issue = || gw::GetOfflineCodeRequest {
        request_id: request_id(),
        person: person(&id),
        guardian: None,
        device_public_key: device.verifying_key().sec1_bytes(),
    };
    let lost = client
        .get_offline_code(authorized(issue(), &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    let kept = client
        .get_offline_code(authorized(issue(), &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    let present = |code: &gw::OfflineCode| {
        let step = step_at(chrono::Utc::now().timestamp());
        let credential_id = &code.claims.as_ref().unwrap().credential_id;
        present_offline(
            code.credential.clone().unwrap(),
            step,
            device.sign(&device_message(credential_id, step)).unwrap(),
        )
    };
    let venue_token = venue(&mesh, UNIT_A);
    let verifier = client.clone();
    let verify = |text: String| {
        let mut client = verifier.clone();
        let token = venue_token.clone();
        async move {
            client
                .verify_offline_code(authorized(
                    gw::VerifyOfflineCodeRequest {
                        qr_payload: text,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner()
                .result
        }
    };
    assert_eq!(verify(present(&lost)).await, gw::ScanResult::Valid as i32);

    // One credential by id, retry-safe; the other stays valid.
    let revoke_one = gw::RevokeOfflineCodeRequest {
        request_id: request_id(),
        person: person(&id),
        credential_id: lost.claims.as_ref().unwrap().credential_id.clone(),
    };
    let revoked = client
        .revoke_offline_code(authorized(revoke_one.clone(), &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked, 1);
    let again = client
        .revoke_offline_code(authorized(revoke_one, &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, revoked);
    assert_eq!(verify(present(&lost)).await, gw::ScanResult::Revoked as i32);
    assert_eq!(verify(present(&kept)).await, gw::ScanResult::Valid as i32);

    // Every credential of the person: only the one still live is counted.
    let revoke_all = gw::RevokeOfflineCodeRequest {
        request_id: request_id(),
        person: person(&id),
        credential_id: String::new(),
    };
    let revoked = client
        .revoke_offline_code(authorized(revoke_all.clone(), &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked, 1);
    let again = client
        .revoke_offline_code(authorized(revoke_all, &mesh.keys.app()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revoked, 1, "a retry answers the first call");
    assert_eq!(verify(present(&kept)).await, gw::ScanResult::Revoked as i32);

    // A credential the person does not hold.
    let err = client
        .revoke_offline_code(authorized(
            gw::RevokeOfflineCodeRequest {
                request_id: request_id(),
                person: person(&id),
                credential_id: request_id(),
            },
            &mesh.keys.app(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    mesh.stop().await;
}

#[tokio::test]
async fn revoked_offline_codes_verify_as_revoked_on_postgres_and_redis() {
    revoked_offline_codes_verify_as_revoked(Backend::Real).await;
}

#[tokio::test]
async fn revoked_offline_codes_verify_as_revoked_on_the_embedded_default() {
    revoked_offline_codes_verify_as_revoked(Backend::Embedded).await;
}

#[tokio::test]
async fn bad_requests_name_every_bad_field_and_wrong_roles_are_refused() {
    let mesh = Mesh::start(Backend::Embedded, None).await;
    let id = mesh.verified_person(204).await;
    let venue_a = venue(&mesh, UNIT_A);
    let app = mesh.keys.app();
    let place = register(&mesh, &venue_a, a_place("西湖银泰", "330102")).await;
    let mut client = mesh.gateway_client().await;

    let err = client
        .check_in(authorized(
            gw::CheckInRequest {
                request_id: String::new(),
                person: person("not-a-uuid"),
                guardian: Some(PersonRef::default()),
                place_qr_payload: "HCP1:forged".into(),
                ..Default::default()
            },
            &app,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&err),
        [
            "guardian.person_id",
            "person.person_id",
            "place_qr_payload",
            "request_id"
        ]
    );
    let err = client
        .deactivate_place(authorized(
            gw::DeactivatePlaceRequest {
                request_id: "has space".into(),
                place_code: "X".repeat(17),
                reason: String::new(),
            },
            &venue_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["place_code", "reason", "request_id"]);
    let err = client
        .list_places(authorized(
            gw::ListPlacesRequest {
                checking_unit_code: "\u{7}".into(),
                division_code: "33".into(),
                page: Some(PageRequest {
                    page_size: 501,
                    page_token: "x".into(),
                }),
            },
            &venue_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&err),
        [
            "checking_unit_code",
            "division_code",
            "page.page_size",
            "page.page_token"
        ]
    );
    let err = client
        .revoke_offline_code(authorized(
            gw::RevokeOfflineCodeRequest {
                request_id: String::new(),
                person: None,
                credential_id: "nope".into(),
            },
            &app,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["credential_id", "person", "request_id"]);

    // A genuine place code for a place this gateway never registered.
    let unknown = sign_place(
        mesh.gateway.gateway().signer.signing_key(),
        &gw::PlaceClaims {
            place_code: "ZZZZZZZZZZ".into(),
            name: "nowhere".into(),
            division_code: "330102".into(),
            issued_at: None,
        },
    )
    .unwrap();
    let err = check_in(
        &mesh,
        gw::CheckInRequest {
            request_id: request_id(),
            person: person(&id),
            place_qr_payload: unknown,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A guardian who does not manage the person.
    let stranger = mesh.verified_person(205).await;
    let err = check_in(
        &mesh,
        gw::CheckInRequest {
            request_id: request_id(),
            person: person(&id),
            guardian: person(&stranger),
            place_qr_payload: place.qr_payload.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Roles: check-in and revocation are the app's; places are venues' and officials'.
    let err = client
        .check_in(authorized(
            gw::CheckInRequest {
                request_id: request_id(),
                person: person(&id),
                place_qr_payload: place.qr_payload.clone(),
                ..Default::default()
            },
            &venue_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .revoke_offline_code(authorized(
            gw::RevokeOfflineCodeRequest {
                request_id: request_id(),
                person: person(&id),
                credential_id: String::new(),
            },
            &venue_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .deactivate_place(authorized(
            gw::DeactivatePlaceRequest {
                request_id: request_id(),
                place_code: place.place_code.clone(),
                reason: "门店停业".into(),
            },
            &app,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .list_places(authorized(gw::ListPlacesRequest::default(), &app))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Nothing above was recorded.
    assert!(check_records(&mesh, &id).await.is_empty());
    assert_eq!(place_visits_enqueued(&mesh).await, 0);
    mesh.stop().await;
}
