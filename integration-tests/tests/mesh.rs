//! Risk, the color cache and the gateway together, started for real: on PostgreSQL and
//! Redis, and on the embedded default.

use healthcode_auth::roles;
use healthcode_cache::color_key;
use healthcode_codes::{CodeSigner, device_message, present_offline, step_at, verify_offline};
use healthcode_crypto::{FieldCipher, SigningKey, TrustedKeys, VerifyingKey};
use healthcode_proto::common::v1::{CodeColor, GetPublicKeysRequest, NucleicAcidResult, PersonRef};
use healthcode_proto::gateway::v1 as gw;
use healthcode_proto::risk::v1 as rk;
use integration_tests::mesh::Mesh;
use integration_tests::{Backend, authorized};
use prost::Message;
use tonic::Code;

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

fn now_ts(offset_seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + offset_seconds,
        nanos: 0,
    })
}

fn close_contact(person_id: &str) -> rk::RiskEvent {
    rk::RiskEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        person: person(person_id),
        observed_at: None,
        event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
            kind: rk::ContactKind::Close as i32,
            last_exposure_at: now_ts(-3600),
            case_reference: "case-0001".into(),
        })),
    }
}

async fn show(mesh: &Mesh, id: &str) -> gw::ShowMyCodeResponse {
    mesh.gateway_client()
        .await
        .show_my_code(authorized(
            gw::ShowMyCodeRequest {
                person: person(id),
                include_qr_svg: true,
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .expect("show my code")
        .into_inner()
}

async fn register_place(mesh: &Mesh, unit: &str) -> gw::Place {
    mesh.gateway_client()
        .await
        .register_place(authorized(
            gw::RegisterPlaceRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                place: Some(gw::Place {
                    name: "西湖银泰".into(),
                    address: "延安路 98 号".into(),
                    division_code: "330102".into(),
                    category: gw::PlaceCategory::Shop as i32,
                    checking_unit: "银泰商业".into(),
                    ..Default::default()
                }),
            },
            &mesh.keys.token(unit, &[roles::VENUE]),
        ))
        .await
        .expect("register place")
        .into_inner()
}

async fn record(mesh: &Mesh, events: Vec<rk::RiskEvent>) -> rk::RecordEventsResponse {
    mesh.risk_client()
        .await
        .record_events(authorized(
            rk::RecordEventsRequest { events },
            &mesh
                .keys
                .token("cdc-flow-team", &[roles::OFFICIAL, roles::INTERNAL]),
        ))
        .await
        .expect("record events")
        .into_inner()
}

async fn color_change_reaches_redis_and_the_gateway(backend: Backend) {
    let mesh = Mesh::start(backend, None).await;
    let id = mesh.verified_person(1).await;

    let code = show(&mesh, &id).await;
    assert_eq!(code.color, CodeColor::Green as i32);
    assert!(code.qr_payload.starts_with("HCQ1:"));
    assert!(code.qr_svg.contains("<svg"));
    assert_eq!(code.holder.as_ref().unwrap().masked_name, "王**");
    let green_version = code.color_version;

    // A close contact turns the person red: in the cache, and at the gateway.
    let event = close_contact(&id);
    let reply = record(&mesh, vec![event.clone()]).await;
    assert_eq!(reply.recorded, 1);
    assert_eq!(reply.changed.len(), 1);
    let cached = mesh
        .backends
        .cache
        .get_versioned(&color_key(&id))
        .await
        .unwrap()
        .unwrap();
    let cached_color = rk::PersonColor::decode(&cached.data[..]).unwrap();
    assert_eq!(cached_color.color, CodeColor::Red as i32);
    assert!(cached.version > green_version);
    let code = show(&mesh, &id).await;
    assert_eq!(code.color, CodeColor::Red as i32);
    assert_eq!(code.display.unwrap().color_name, "红码");

    // The same event again changes nothing.
    let again = record(&mesh, vec![event]).await;
    assert_eq!((again.recorded, again.duplicates), (0, 1));

    // A venue scans the code: current color, masked holder, no entry; the scan is recorded once.
    let place = register_place(&mesh, "913301000000000001").await;
    let venue = mesh.keys.token("913301000000000001", &[roles::VENUE]);
    let scan = gw::VerifyScanRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        qr_payload: code.qr_payload.clone(),
        place_code: place.place_code.clone(),
        scanner_id: "gate-1".into(),
    };
    let mut client = mesh.gateway_client().await;
    let first = client
        .verify_scan(authorized(scan.clone(), &venue))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.result, gw::ScanResult::Valid as i32);
    assert_eq!(first.color, CodeColor::Red as i32);
    assert!(!first.entry_allowed);
    assert_eq!(first.holder.unwrap().masked_name, "王**");
    let retried = client
        .verify_scan(authorized(scan, &venue))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.scan_id, first.scan_id);
    // Another unit may not scan at this place.
    let other = mesh.keys.token("913301000000000099", &[roles::VENUE]);
    let err = client
        .verify_scan(authorized(
            gw::VerifyScanRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                qr_payload: code.qr_payload.clone(),
                place_code: place.place_code.clone(),
                scanner_id: String::new(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let records = client
        .list_check_records(authorized(
            gw::ListCheckRecordsRequest {
                person: person(&id),
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].place_name, "西湖银泰");

    // The change is in the audit trail, whose chain verifies.
    let audit = mesh
        .risk_client()
        .await
        .list_audit_entries(authorized(
            rk::ListAuditEntriesRequest {
                person: person(&id),
                ..Default::default()
            },
            &mesh.keys.token("auditor-1", &[roles::AUDITOR]),
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let changed = audit
        .iter()
        .find(|e| e.action == rk::AuditAction::ColorChanged as i32)
        .unwrap();
    assert_eq!(changed.after.as_ref().unwrap().color, CodeColor::Red as i32);
    assert_eq!(changed.actor, "cdc-flow-team");
    assert!(mesh.risk.risk().verify_audit_chain().await.unwrap() >= 1);

    // The calendar shows the change.
    let calendar = client
        .get_health_calendar(authorized(
            gw::GetHealthCalendarRequest {
                person: person(&id),
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        calendar
            .entries
            .iter()
            .any(|e| e.kind == gw::CalendarEntryKind::ColorChange as i32)
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_color_change_reaches_redis_and_the_gateway_on_postgres_and_redis() {
    color_change_reaches_redis_and_the_gateway(Backend::Real).await;
}

#[tokio::test]
async fn a_color_change_reaches_the_gateway_on_the_embedded_default() {
    color_change_reaches_redis_and_the_gateway(Backend::Embedded).await;
}

#[tokio::test]
async fn versions_never_go_backwards_under_concurrent_writers() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let id = mesh.verified_person(2).await;
    let writers = (0..12).map(|i| {
        let mesh = &mesh;
        let id = id.clone();
        async move {
            let result = if i % 2 == 0 {
                NucleicAcidResult::Negative
            } else {
                NucleicAcidResult::PoolPositive
            };
            record(
                mesh,
                vec![rk::RiskEvent {
                    event_id: uuid::Uuid::new_v4().to_string(),
                    person: person(&id),
                    observed_at: None,
                    event: Some(rk::risk_event::Event::TestResult(rk::TestResultEvent {
                        report_id: format!("r-{i}"),
                        result: result as i32,
                        sampled_at: now_ts(-7200 + i * 60),
                        reported_at: now_ts(-3600 + i * 60),
                        pooled: result == NucleicAcidResult::PoolPositive,
                    })),
                }],
            )
            .await
        }
    });
    futures::future::join_all(writers).await;
    let record = mesh.risk.risk().get_color(&id).await.unwrap();
    let cached = mesh
        .backends
        .cache
        .get_versioned(&color_key(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cached.version, record.version,
        "the cache holds the newest version"
    );
    let cached = rk::PersonColor::decode(&cached.data[..]).unwrap();
    assert_eq!(
        (cached.color, &cached.reasons),
        (record.color, &record.reasons)
    );
    // A stale write-through arriving late does not win.
    let stale = mesh
        .backends
        .cache
        .set_if_newer(&color_key(&id), 1, b"old", None)
        .await
        .unwrap();
    assert!(!stale);
    let history = mesh
        .risk_client()
        .await
        .list_color_history(authorized(
            rk::ListColorHistoryRequest {
                person: person(&id),
                ..Default::default()
            },
            &mesh.keys.token("gateway", &[roles::INTERNAL]),
        ))
        .await
        .unwrap()
        .into_inner()
        .changes;
    let versions: Vec<u64> = history.iter().map(|c| c.version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] > w[1]),
        "{versions:?} strictly decreasing, newest first"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_stampede_on_a_cold_key_loads_once() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let id = mesh.verified_person(3).await;
    record(&mesh, vec![close_contact(&id)]).await;
    mesh.backends.cache.delete(&color_key(&id)).await.unwrap();
    let colors = &mesh.gateway.gateway().colors;
    let before = colors.loads();
    let reads = (0..1000).map(|_| colors.get(&id));
    let results = futures::future::join_all(reads).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().map(|c| c.color) == Ok(CodeColor::Red as i32))
    );
    assert_eq!(
        colors.loads() - before,
        1,
        "one load for 1,000 concurrent readers"
    );
    mesh.stop().await;
}

/// A Redis of the test's own, so that stopping it does not disturb other tests.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (stack.md)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        OwnRedis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn with_redis_stopped_the_answers_stay_right() {
    let mut redis = OwnRedis::start();
    let mesh = Mesh::start(Backend::Real, Some(redis.url())).await;
    let red = mesh.verified_person(4).await;
    let green = mesh.verified_person(5).await;
    record(&mesh, vec![close_contact(&red)]).await;
    assert_eq!(show(&mesh, &red).await.color, CodeColor::Red as i32);

    redis.stop();
    let probe = mesh.backends.cache.get_versioned("probe").await;
    assert!(probe.is_err(), "the cache is down: {probe:?}");
    for _ in 0..5 {
        assert_eq!(
            show(&mesh, &red).await.color,
            CodeColor::Red as i32,
            "never green by default"
        );
        assert_eq!(show(&mesh, &green).await.color, CodeColor::Green as i32);
    }
    assert!(
        mesh.gateway.gateway().colors.breaker().times_opened() >= 1,
        "the breaker opened"
    );
    // Changes go on being decided and shown while Redis is away.
    let yellow = mesh.verified_person(6).await;
    record(
        &mesh,
        vec![rk::RiskEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            person: person(&yellow),
            observed_at: None,
            event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
                kind: rk::ContactKind::Secondary as i32,
                last_exposure_at: now_ts(-600),
                case_reference: String::new(),
            })),
        }],
    )
    .await;
    assert_eq!(show(&mesh, &yellow).await.color, CodeColor::Yellow as i32);
    mesh.stop().await;
}

#[tokio::test]
async fn forged_expired_and_replayed_codes_are_refused() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let id = mesh.verified_person(7).await;
    let code = show(&mesh, &id).await;
    let place = register_place(&mesh, "913301000000000002").await;
    let venue = mesh.keys.token("913301000000000002", &[roles::VENUE]);
    let mut client = mesh.gateway_client().await;
    let scan_client = client.clone();
    let scan = |qr: String| {
        let request = gw::VerifyScanRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            qr_payload: qr,
            place_code: place.place_code.clone(),
            scanner_id: String::new(),
        };
        let venue = venue.clone();
        let mut client = scan_client.clone();
        async move {
            client
                .verify_scan(authorized(request, &venue))
                .await
                .unwrap()
                .into_inner()
                .result
        }
    };
    // Forged: signed by a key the gateway does not know, or a known key id on a forged key.
    let cipher =
        std::sync::Arc::new(FieldCipher::parse(&FieldCipher::generate_spec("x").unwrap()).unwrap());
    let now = chrono::Utc::now().timestamp();
    let stranger = CodeSigner::new(
        SigningKey::generate("stranger").unwrap(),
        cipher.clone(),
        "330000",
    );
    let forged = stranger.issue(&id, CodeColor::Green, 1, now).unwrap();
    assert_eq!(scan(forged).await, gw::ScanResult::UnknownKey as i32);
    let keys = client
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let impostor = CodeSigner::new(
        SigningKey::generate(keys[0].key_id.clone()).unwrap(),
        cipher,
        "330000",
    );
    assert_eq!(
        scan(impostor.issue(&id, CodeColor::Green, 1, now).unwrap()).await,
        gw::ScanResult::BadSignature as i32
    );
    // Tampered: one character of the payload changed.
    let mut tampered = code.qr_payload.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(
        matches!(scan(tampered).await, r if r == gw::ScanResult::BadSignature as i32 || r == gw::ScanResult::Malformed as i32)
    );
    assert_eq!(
        scan("not a code".into()).await,
        gw::ScanResult::Malformed as i32
    );
    // A screenshot replayed after its step (checked at the library with the gateway's clock
    // moved on two steps, as a live test cannot wait a minute).
    let trusted = TrustedKeys::parse(&format!(
        "{}:{}",
        keys[0].key_id,
        hex_of(&keys[0].public_key_sec1)
    ))
    .unwrap();
    let code_cipher = FieldCipher::parse("k:00000000000000000000000000000000").unwrap();
    let replay =
        healthcode_codes::verify_online(&code.qr_payload, &trusted, &code_cipher, now + 61);
    assert!(replay.is_err());
    // Two steps on at least (three when `now` is in a step's last second).
    assert!(step_at(now + 61) - step_at(now) >= 2);
    // A missing or foreign token is refused before anything is read.
    let err = client
        .verify_scan(tonic::Request::new(gw::VerifyScanRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .verify_scan(authorized(
            gw::VerifyScanRequest::default(),
            &mesh.keys.app(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    mesh.stop().await;
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn the_offline_credential_verifies_with_nothing_but_the_public_key() {
    let mesh = Mesh::start(Backend::Embedded, None).await;
    let id = mesh.verified_person(8).await;
    let device = SigningKey::generate("device").unwrap();
    let mut client = mesh.gateway_client().await;
    let offline = client
        .get_offline_code(authorized(
            gw::GetOfflineCodeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                person: person(&id),
                guardian: None,
                device_public_key: device.verifying_key().sec1_bytes(),
            },
            &mesh.keys.app(),
        ))
        .await
        .unwrap()
        .into_inner();
    // The verifier holds only what GetPublicKeys publishes.
    let published = client
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let mut trusted = TrustedKeys::parse("").unwrap();
    for k in &published {
        trusted.insert(VerifyingKey::from_sec1(k.key_id.clone(), &k.public_key_sec1).unwrap());
    }
    let now = chrono::Utc::now().timestamp();
    let step = step_at(now);
    let credential_id = offline.claims.as_ref().unwrap().credential_id.clone();
    let signature = device.sign(&device_message(&credential_id, step)).unwrap();
    let text = present_offline(offline.credential.clone().unwrap(), step, signature);
    let verified = verify_offline(&text, &trusted, now).expect("verifies offline");
    assert_eq!(verified.claims.color, CodeColor::Green as i32);
    // Signed by another device, or for an old step: refused.
    let other = SigningKey::generate("other").unwrap();
    let forged = present_offline(
        offline.credential.clone().unwrap(),
        step,
        other.sign(&device_message(&credential_id, step)).unwrap(),
    );
    assert_eq!(
        verify_offline(&forged, &trusted, now).unwrap_err(),
        gw::ScanResult::BadDeviceSignature
    );
    // Online, a color change revokes it.
    let venue = mesh.keys.token("913301000000000003", &[roles::VENUE]);
    let online = client
        .verify_offline_code(authorized(
            gw::VerifyOfflineCodeRequest {
                qr_payload: text.clone(),
                ..Default::default()
            },
            &venue,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(online.result, gw::ScanResult::Valid as i32);
    record(&mesh, vec![close_contact(&id)]).await;
    let online = client
        .verify_offline_code(authorized(
            gw::VerifyOfflineCodeRequest {
                qr_payload: text,
                ..Default::default()
            },
            &venue,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(online.result, gw::ScanResult::Revoked as i32);
    mesh.stop().await;
}

#[tokio::test]
async fn double_confirmation_and_two_approver_overrides() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let id = mesh.verified_person(9).await;
    let mut risk = mesh.risk_client().await;
    let official = mesh.keys.token("cdc-officer-1", &[roles::OFFICIAL]);
    let issued = risk
        .issue_directive(authorized(
            rk::IssueDirectiveRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                persons: vec![PersonRef {
                    person_id: id.clone(),
                }],
                kind: rk::DirectiveKind::HomeQuarantine as i32,
                starts_at: None,
                ends_at: now_ts(14 * 86_400),
                document_reference: "杭疾控〔2026〕12 号".into(),
                issuing_unit: "杭州市疾控中心".into(),
            },
            &official,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        issued.directives[0].state,
        rk::DirectiveState::PendingConfirmation as i32
    );
    // The local directive alone leaves the color pending.
    let code = show(&mesh, &id).await;
    assert_eq!(code.color, CodeColor::Green as i32);
    assert!(code.change_pending);
    let internal = mesh.keys.token("exchange", &[roles::INTERNAL]);
    let confirmed = risk
        .record_national_check(authorized(
            rk::RecordNationalCheckRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                person: person(&id),
                color: CodeColor::Red as i32,
                reasons: vec![],
                checked_at: None,
                check_reference: "nat-1".into(),
            },
            &internal,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.color.unwrap().color, CodeColor::Red as i32);
    assert_eq!(show(&mesh, &id).await.color, CodeColor::Red as i32);

    // A manual override needs a reason and two distinct approvers.
    let a = mesh.keys.token("approver-a", &[roles::APPROVER]);
    let b = mesh.keys.token("approver-b", &[roles::APPROVER]);
    let err = risk
        .propose_override(authorized(
            rk::ProposeOverrideRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                persons: vec![PersonRef {
                    person_id: id.clone(),
                }],
                color: CodeColor::Green as i32,
                reason: String::new(),
                holds_until: None,
            },
            &a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let proposed = risk
        .propose_override(authorized(
            rk::ProposeOverrideRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                persons: vec![PersonRef {
                    person_id: id.clone(),
                }],
                color: CodeColor::Green as i32,
                reason: "误判：同名同姓，已核实".into(),
                holds_until: None,
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        show(&mesh, &id).await.color,
        CodeColor::Red as i32,
        "nothing changes on a proposal"
    );
    let approve = |token: &str| {
        let request = rk::ApproveOverrideRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            override_id: proposed.override_id.clone(),
            note: String::new(),
        };
        let token = token.to_owned();
        let mut risk = risk.clone();
        async move { risk.approve_override(authorized(request, &token)).await }
    };
    assert_eq!(
        approve(&a).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let applied = approve(&b).await.unwrap().into_inner();
    assert_eq!(applied.state, rk::OverrideState::Applied as i32);
    let code = show(&mesh, &id).await;
    assert_eq!(code.color, CodeColor::Green as i32);
    assert_eq!(
        approve(&b).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    mesh.stop().await;
}

#[tokio::test]
async fn batch_check_answers_per_person() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let a = mesh.verified_person(10).await;
    let b = mesh.verified_person(11).await;
    record(&mesh, vec![close_contact(&b)]).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let items = [
        Some(a.as_str()),
        Some(unknown.as_str()),
        Some("bad"),
        Some(b.as_str()),
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| gw::BatchCheckItem {
        person: p.map(|p| PersonRef {
            person_id: p.to_owned(),
        }),
        item_id: format!("row-{i}"),
    })
    .collect();
    let checker = mesh
        .keys
        .token("913301000000000777", &[roles::BATCH_CHECKER]);
    let request = gw::BatchCheckRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        items,
    };
    let mut client = mesh.gateway_client().await;
    let reply = client
        .batch_check(authorized(request.clone(), &checker))
        .await
        .unwrap()
        .into_inner();
    let colors: Vec<(u32, i32)> = reply.results.iter().map(|r| (r.index, r.color)).collect();
    assert_eq!(
        colors,
        [(0, CodeColor::Green as i32), (3, CodeColor::Red as i32)]
    );
    let errors: Vec<(u32, &str)> = reply
        .errors
        .iter()
        .map(|e| (e.index, e.reason.as_str()))
        .collect();
    assert_eq!(errors, [(1, "UNKNOWN_PERSON"), (2, "INVALID_ITEM")]);
    // A retry answers the same and records no second check.
    let again = client
        .batch_check(authorized(request, &checker))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, reply);
    let records = client
        .list_check_records(authorized(
            gw::ListCheckRecordsRequest {
                person: person(&a),
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].checking_unit, "913301000000000777");
    // Over 10,000 is refused whole.
    let too_many = gw::BatchCheckRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        items: vec![
            gw::BatchCheckItem {
                person: person(&a),
                item_id: String::new()
            };
            10_001
        ],
    };
    let err = client
        .batch_check(authorized(too_many, &checker))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    mesh.stop().await;
}

#[tokio::test]
async fn itinerary_older_than_sixty_days_is_purged_and_history_stays() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let id = mesh.verified_person(12).await;
    let stay = |days_ago: i64| rk::RiskEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        person: person(&id),
        observed_at: None,
        event: Some(rk::risk_event::Event::AreaStay(rk::AreaStayEvent {
            division_code: "330106".into(),
            arrived_at: now_ts(-days_ago * 86_400),
            left_at: now_ts(-days_ago * 86_400 + 3600),
            source: rk::StaySource::Telecom as i32,
            ..Default::default()
        })),
    };
    let reply = record(&mesh, vec![stay(61), stay(59), close_contact(&id)]).await;
    assert_eq!(reply.recorded, 3);
    let purged = mesh.risk.risk().purge_once().await.unwrap();
    assert_eq!(purged, 1);
    assert_eq!(mesh.risk.risk().purge_once().await.unwrap(), 0);
    let history = mesh
        .risk
        .risk()
        .color_history(&id, None, None, None, 50)
        .await
        .unwrap()
        .0;
    assert!(
        history.iter().any(|c| c.to_color == CodeColor::Red as i32),
        "color history stays"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn bad_events_are_reported_per_item_and_change_nothing() {
    let mesh = Mesh::start(Backend::Embedded, None).await;
    let id = mesh.verified_person(13).await;
    let mut bad = close_contact(&id);
    bad.event = Some(rk::risk_event::Event::Contact(rk::ContactEvent {
        kind: 0,
        last_exposure_at: now_ts(86_400),
        case_reference: String::new(),
    }));
    let reply = record(&mesh, vec![bad]).await;
    assert_eq!(reply.recorded, 0);
    assert_eq!(reply.errors.len(), 1);
    assert!(reply.errors[0].message.contains("events[0].contact.kind"));
    assert!(
        reply.errors[0]
            .message
            .contains("events[0].contact.last_exposure_at")
    );
    assert_eq!(show(&mesh, &id).await.color, CodeColor::Green as i32);
    // A venue may not record contacts.
    let err = mesh
        .risk_client()
        .await
        .record_events(authorized(
            rk::RecordEventsRequest {
                events: vec![close_contact(&id)],
            },
            &mesh.keys.token("venue", &[roles::VENUE]),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    mesh.stop().await;
}
