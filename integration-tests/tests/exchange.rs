//! The exchange between two provinces, each a whole mesh on PostgreSQL and Redis, linked
//! over mutual TLS: a color decided in one is seen in the other; a cut link catches up
//! with no gap or duplicate; forged, foreign and garbage records are refused and change
//! nothing; both provinces agree on every person's merged color.

use exchange::records;
use exchange::store::entities::{inbound, issued};
use healthcode_auth::roles;
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{CodeColor, PersonRef, ReasonCode, SignedEnvelope};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::identity::v1 as id;
use healthcode_proto::risk::v1 as rk;
use integration_tests::exchange::{
    Province, THIRD, eventually, issue_alternating, linked_pair, mesh_with_pseudonym_key,
    register_province,
};
use integration_tests::mesh::{Mesh, resident_id};
use integration_tests::{Backend, authorized, bad_fields, count};
use prost::Message;
use sea_orm::{EntityTrait, QueryOrder};
use std::time::{Duration, Instant};

const A: &str = "330000";
const B: &str = "310000";
const WAIT: Duration = Duration::from_secs(20);

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

/// A contact of `kind` an hour ago.
async fn contact(mesh: &Mesh, person_id: &str, kind: rk::ContactKind) {
    mesh.risk_client()
        .await
        .record_events(authorized(
            rk::RecordEventsRequest {
                events: vec![rk::RiskEvent {
                    event_id: uuid::Uuid::new_v4().to_string(),
                    person: person(person_id),
                    observed_at: None,
                    event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
                        kind: kind as i32,
                        last_exposure_at: Some(prost_types::Timestamp {
                            seconds: chrono::Utc::now().timestamp() - 3600,
                            nanos: 0,
                        }),
                        case_reference: "case-x".into(),
                    })),
                }],
            },
            &mesh
                .keys
                .token("cdc-flow-team", &[roles::OFFICIAL, roles::INTERNAL]),
        ))
        .await
        .expect("record events");
}

/// The records `province` issued, in sequence order, as (sequence, envelope bytes).
async fn issued_by(p: &Province) -> Vec<(i64, Vec<u8>)> {
    issued::Entity::find()
        .order_by_asc(issued::Column::Sequence)
        .all(p.mesh.exchange.db())
        .await
        .expect("issued")
        .into_iter()
        .map(|r| (r.sequence, r.envelope))
        .collect()
}

/// The records `at` received from `from`, in sequence order.
async fn received_from(at: &Province, from: &str) -> Vec<(i64, Vec<u8>)> {
    inbound::Entity::find()
        .order_by_asc(inbound::Column::Sequence)
        .all(at.mesh.exchange.db())
        .await
        .expect("inbound")
        .into_iter()
        .filter(|r| r.province == from)
        .map(|r| (r.sequence, r.envelope))
        .collect()
}

async fn latest(p: &Province) -> u64 {
    issued_by(p)
        .await
        .last()
        .map(|(s, _)| *s as u64)
        .unwrap_or(0)
}

/// Waits until `at` holds every record `from` issued.
async fn caught_up(at: &Province, from: &Province) -> bool {
    // Records are issued asynchronously (outbox, stream, consumer): the latest must stay
    // put between two looks, and the receiver hold it.
    let deadline = Instant::now() + WAIT;
    let (mut previous, mut stable) = (u64::MAX, 0);
    while Instant::now() < deadline {
        let now = latest(from).await;
        stable = if now == previous { stable + 1 } else { 0 };
        previous = now;
        if stable >= 3 && at.status(&from.code).await.inbound_sequence == now {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

fn envelope_of(key: &SigningKey, record: &pb::ExchangeRecord) -> SignedEnvelope {
    records::seal(key, record)
        .expect("seal")
        .envelope
        .expect("envelope")
}

fn record(province: &str, sequence: u64, pseudonym: &str, color: CodeColor) -> pb::ExchangeRecord {
    pb::ExchangeRecord {
        issuing_province: province.into(),
        sequence,
        pseudonym: pseudonym.into(),
        pseudonym_key_id: "national-1".into(),
        color: color as i32,
        reason_codes: vec![healthcode_proto::common::v1::ReasonCode::CloseContact as i32],
        rule_version: 1,
        valid_until: None,
        decided_at: Some(healthcode_proto::time::ts(chrono::Utc::now())),
    }
}

/// Tiny deterministic generator (xorshift), seeded and printed so a failing run repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn two_provinces_share_colors_over_mutual_tls() {
    let (a, b) = linked_pair(A, B).await;
    // The same residents registered in both provinces (same documents, so the same
    // pseudonyms).
    let mut persons = Vec::new();
    for n in 0..12 {
        persons.push((
            a.mesh.verified_person(500 + n).await,
            b.mesh.verified_person(500 + n).await,
        ));
    }

    // 1. Red in A is seen in B.
    let started = Instant::now();
    contact(&a.mesh, &persons[0].0, rk::ContactKind::Close).await;
    let (pa, pb_, first) = (&a, &b, &persons[0]);
    let seen = eventually(WAIT, || async move {
        let m = pb_.merged(&first.1).await;
        m.color == CodeColor::Red as i32 && m.deciding_province == A
    })
    .await;
    assert!(seen, "B shows the red A decided");
    println!("red in A visible in B after {:?}", started.elapsed());
    // B's gateway shows it too: B's risk service merged A's decision, kept apart from B's
    // own (green), which is what B goes on issuing.
    let shown = eventually(WAIT, || async move {
        pb_.shows(&first.1).await == CodeColor::Red as i32
    })
    .await;
    assert!(shown, "B's gateway shows the red A decided");
    println!(
        "red in A shown by B's gateway after {:?}",
        started.elapsed()
    );
    let in_b = b
        .mesh
        .risk_client()
        .await
        .get_color(authorized(
            rk::GetColorRequest {
                person: person(&first.1),
            },
            &b.internal(),
        ))
        .await
        .expect("B's color")
        .into_inner();
    assert_eq!(
        in_b.reasons[0].code,
        ReasonCode::OtherProvinceDecision as i32
    );
    assert_eq!(in_b.reasons[0].params["province_code"], A);
    assert_eq!(
        in_b.local.as_ref().map(|l| l.color),
        Some(CodeColor::Green as i32),
        "B's own decision is kept apart"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for (_, envelope) in issued_by(&b).await {
        let envelope = SignedEnvelope::decode(&envelope[..]).expect("envelope");
        let record = pb::ExchangeRecord::decode(&envelope.payload[..]).expect("record");
        assert_ne!(
            record.color,
            CodeColor::Red as i32,
            "B never issues A's decision as its own"
        );
    }
    let (in_a, in_b) = (pa.merged(&first.0).await, pb_.merged(&first.1).await);
    assert_eq!(in_a.pseudonym, in_b.pseudonym);
    assert_eq!(
        (in_a.color, &in_a.deciding_province),
        (in_b.color, &in_b.deciding_province)
    );

    // A person A turned red who registers in B only after the record arrived is shown it:
    // the registration reaches B's exchange, which applies what it already holds.
    let late_in_a = a.mesh.verified_person(600).await;
    contact(&a.mesh, &late_in_a, rk::ContactKind::Close).await;
    let late_in_a = &late_in_a;
    assert!(
        eventually(WAIT, || async move {
            pa.merged(late_in_a).await.color == CodeColor::Red as i32
        })
        .await
    );
    assert!(
        caught_up(&b, &a).await,
        "B holds A's red before the person registers"
    );
    let late = b.mesh.verified_person(600).await;
    let late = &late;
    assert!(
        eventually(WAIT, || async move {
            pb_.shows(late).await == CodeColor::Red as i32
        })
        .await,
        "a person registered after A's record arrived is shown A's red"
    );

    // Double confirmation across the border: B's official puts a person A already turned
    // red under home quarantine; the directive waits for the national check, which B's
    // exchange asks of A at once (NATIONAL_CHECK_PARTNERS), and A's red confirms it: B's
    // own decision turns red too.
    let checked_in_a = a.mesh.verified_person(601).await;
    contact(&a.mesh, &checked_in_a, rk::ContactKind::Close).await;
    let checked_in_a = &checked_in_a;
    assert!(
        eventually(WAIT, || async move {
            pa.merged(checked_in_a).await.color == CodeColor::Red as i32
        })
        .await
    );
    let checked = b.mesh.verified_person(601).await;
    let issued = b
        .mesh
        .risk_client()
        .await
        .issue_directive(authorized(
            rk::IssueDirectiveRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                persons: person(&checked).into_iter().collect(),
                kind: rk::DirectiveKind::HomeQuarantine as i32,
                starts_at: None,
                ends_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 14 * 86_400,
                    nanos: 0,
                }),
                document_reference: "沪疾控〔2026〕7 号".into(),
                issuing_unit: "上海市疾控中心".into(),
            },
            &b.mesh.keys.token("cdc-officer-1", &[roles::OFFICIAL]),
        ))
        .await
        .expect("directive")
        .into_inner();
    assert_eq!(
        issued.directives[0].state,
        rk::DirectiveState::PendingConfirmation as i32
    );
    let checked = &checked;
    let confirmed = eventually(WAIT, || async move {
        let c = pb_
            .mesh
            .risk_client()
            .await
            .get_color(authorized(
                rk::GetColorRequest {
                    person: person(checked),
                },
                &pb_.internal(),
            ))
            .await
            .expect("B's color")
            .into_inner();
        c.local.map_or(c.color, |l| l.color) == CodeColor::Red as i32
    })
    .await;
    assert!(
        confirmed,
        "A's answer to B's national check confirms B's directive"
    );

    // 2. The link is cut (B suspends A), A decides more, the link is restored: B catches
    // up with every record, each once, byte for byte.
    assert!(caught_up(&b, &a).await);
    set_state(&b, A, pb::PartnerState::Suspended).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before_cut = b.status(A).await.inbound_sequence;
    for (ia, _) in &persons[1..5] {
        contact(&a.mesh, ia, rk::ContactKind::Close).await;
    }
    assert!(
        eventually(WAIT, || async move { latest(pa).await >= before_cut + 4 }).await,
        "A issued while the link was down"
    );
    assert_eq!(
        b.status(A).await.inbound_sequence,
        before_cut,
        "nothing crosses a cut link"
    );
    set_state(&b, A, pb::PartnerState::Active).await;
    assert!(
        caught_up(&b, &a).await,
        "B catches up after the link is restored"
    );
    let sent = issued_by(&a).await;
    let got = received_from(&b, A).await;
    assert_eq!(got, sent, "every record A issued, in order, byte for byte");
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=sent.len() as i64).collect::<Vec<_>>(),
        "no gap"
    );

    // 3. Refused: forged, foreign, garbage, out of sequence; none changes anything.
    let held = latest(&a).await;
    let a_key = a.mesh.exchange.service().signing_key();
    let pseudonym = b.merged(&persons[0].1).await.pseudonym;
    let mut as_a = b.partner_client(b.issued_to(A)).await;
    let forged_key = SigningKey::generate(a_key.key_id()).expect("key");
    let third_key = SigningKey::generate("exchange-320000-1").expect("key");
    let mut garbage = envelope_of(a_key, &record(A, held + 1, &pseudonym, CodeColor::Green));
    garbage.payload = b"\xff\x01 not a record".to_vec();
    garbage.signature = a_key.sign(&garbage.payload).expect("sign");
    let cases: Vec<(&str, SignedEnvelope, &str)> = vec![
        (
            "forged signature",
            envelope_of(
                &forged_key,
                &record(A, held + 1, &pseudonym, CodeColor::Green),
            ),
            "BAD_SIGNATURE",
        ),
        (
            "tampered after signing",
            {
                let mut e = envelope_of(a_key, &record(A, held + 1, &pseudonym, CodeColor::Red));
                let mut r = pb::ExchangeRecord::decode(&e.payload[..]).unwrap();
                r.color = CodeColor::Green as i32;
                e.payload = r.encode_to_vec();
                e
            },
            "BAD_SIGNATURE",
        ),
        ("signed garbage", garbage, "MALFORMED_RECORD"),
        (
            "unsigned garbage",
            SignedEnvelope {
                payload: vec![7; 40],
                signature: vec![1; 70],
                key_id: "no-such-key".into(),
            },
            "BAD_SIGNATURE",
        ),
        (
            "sequence gap",
            envelope_of(a_key, &record(A, held + 5, &pseudonym, CodeColor::Green)),
            "SEQUENCE_GAP",
        ),
        (
            "a different record under a held sequence",
            envelope_of(a_key, &record(A, 1, &pseudonym, CodeColor::Green)),
            "STALE_SEQUENCE",
        ),
    ];
    let inbound_before = count(b.mesh.exchange.db(), "SELECT COUNT(*) FROM inbound_records").await;
    for (what, envelope, reason) in cases {
        let reply = as_a
            .publish_records(pb::PublishRecordsRequest {
                records: vec![envelope],
            })
            .await
            .unwrap_or_else(|s| panic!("{what}: {s:?}"))
            .into_inner();
        assert_eq!(reply.accepted, 0, "{what}");
        assert_eq!(reply.errors.len(), 1, "{what}");
        assert_eq!(
            reply.errors[0].reason, reason,
            "{what}: {:?}",
            reply.errors[0]
        );
        assert_eq!(reply.acknowledged_sequence, held, "{what}");
    }
    // A record A really issued, sent again: acknowledged without effect.
    let again = SignedEnvelope::decode(&sent[0].1[..]).unwrap();
    let reply = as_a
        .publish_records(pb::PublishRecordsRequest {
            records: vec![again.clone()],
        })
        .await
        .expect("duplicate")
        .into_inner();
    assert_eq!((reply.accepted, reply.duplicates), (0, 1));
    // Another province's partner publishing A's genuine record: not its own decision.
    register_province(
        &b.mesh,
        THIRD,
        pb::SyncMode::Manual,
        &b.issued_to(THIRD).certificate_pem,
        &third_key,
    )
    .await
    .expect("register the third province");
    let mut as_third = b.partner_client(b.issued_to(THIRD)).await;
    let reply = as_third
        .publish_records(pb::PublishRecordsRequest {
            records: vec![
                again,
                envelope_of(&third_key, &record(A, 1, &pseudonym, CodeColor::Red)),
            ],
        })
        .await
        .expect("publish as the third province")
        .into_inner();
    let reasons: Vec<&str> = reply.errors.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["NOT_OWN_PROVINCE", "BAD_SIGNATURE"]);
    assert_eq!(reply.errors[0].code, tonic::Code::PermissionDenied as i32);
    let foreign_refused = count(b.mesh.exchange.db(), "SELECT COUNT(*) FROM inbound_records").await;
    assert_eq!(
        foreign_refused, inbound_before,
        "nothing refused was stored"
    );

    // The third province publishing its own decisions: accepted in sequence, each item on
    // its own, a record signed again counted once.
    let third = |sequence: u64, color: CodeColor| {
        envelope_of(&third_key, &record(THIRD, sequence, &pseudonym, color))
    };
    let publish = |records: Vec<SignedEnvelope>| {
        let mut client = as_third.clone();
        async move {
            client
                .publish_records(pb::PublishRecordsRequest { records })
                .await
                .expect("publish")
                .into_inner()
        }
    };
    let second = third(2, CodeColor::Yellow);
    let first = publish(vec![third(1, CodeColor::Yellow), second.clone()]).await;
    assert_eq!((first.accepted, first.acknowledged_sequence), (2, 2));
    let two_again = SignedEnvelope {
        signature: third_key.sign(&second.payload).unwrap(),
        ..second
    };
    let mixed = publish(vec![
        third(3, CodeColor::Yellow),
        third(3, CodeColor::Red),
        third(4, CodeColor::Green),
        two_again,
    ])
    .await;
    assert_eq!(mixed.accepted, 2, "{mixed:?}");
    assert_eq!(
        mixed.duplicates, 1,
        "the record signed again is the same record"
    );
    assert_eq!(mixed.acknowledged_sequence, 4);
    assert_eq!(
        mixed
            .errors
            .iter()
            .map(|e| (e.index, e.reason.as_str()))
            .collect::<Vec<_>>(),
        [(1, "STALE_SEQUENCE")]
    );
    assert_eq!(
        count(b.mesh.exchange.db(), "SELECT COUNT(*) FROM inbound_records").await,
        inbound_before + 4
    );
    assert_eq!(b.status(A).await.inbound_sequence, held);
    // Partner calls need the partner listener; registry calls need the admin role.
    let plain = b
        .mesh
        .exchange_client()
        .await
        .pull_changes(pb::PullChangesRequest::default())
        .await
        .expect_err("no client certificate on the internal listener");
    assert_eq!(plain.code(), tonic::Code::Unauthenticated);
    let denied = b
        .mesh
        .exchange_client()
        .await
        .register_partner(authorized(
            pb::RegisterPartnerRequest::default(),
            &b.internal(),
        ))
        .await
        .expect_err("internal callers do not manage partners");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let bad = b
        .mesh
        .exchange_client()
        .await
        .register_partner(authorized(
            pb::RegisterPartnerRequest {
                request_id: "not a uuid".into(),
                partner: Some(pb::Partner {
                    partner_id: "999999".into(),
                    kind: pb::PartnerKind::Province as i32,
                    sync_mode: pb::SyncMode::RealTime as i32,
                    endpoint: "http://plain.example".into(),
                    tls_client_certificate_pem: "not a certificate".into(),
                    ..Default::default()
                }),
            },
            &b.admin(),
        ))
        .await
        .expect_err("bad registration");
    assert_eq!(
        bad_fields(&bad),
        [
            "partner.endpoint",
            "partner.keys",
            "partner.name",
            "partner.partner_id",
            "partner.tls_client_certificate_pem",
            "request_id",
        ]
    );
    // A cursor beyond what A issued (A restored from an old backup, seen from B's side).
    let ahead = as_a_client_of(&a).await;
    let err = ahead
        .clone()
        .pull_changes(pb::PullChangesRequest {
            cursor: exchange::service::cursor(A, held + 100),
            max_records: 10,
        })
        .await
        .expect_err("a cursor ahead of the latest");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    let err = ahead
        .clone()
        .pull_changes(pb::PullChangesRequest {
            cursor: exchange::service::cursor(B, 1),
            max_records: 10,
        })
        .await
        .expect_err("another province's cursor");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = ahead
        .clone()
        .subscribe(pb::SubscribeRequest {
            cursor: exchange::service::cursor(A, held + 100),
        })
        .await
        .expect_err("a stream from a cursor ahead of the latest");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    // A stream with nothing new sends heartbeats naming the latest sequence; a partner has
    // at most two streams open (B's follower holds one).
    let mut quiet = ahead
        .clone()
        .subscribe(pb::SubscribeRequest {
            cursor: exchange::service::cursor(A, held),
        })
        .await
        .expect("a stream from the latest")
        .into_inner();
    let first = tokio::time::timeout(WAIT, quiet.message())
        .await
        .expect("a heartbeat in time")
        .expect("stream open")
        .expect("an item");
    match first.item {
        Some(pb::subscribe_response::Item::Heartbeat(h)) => assert_eq!(h.latest_sequence, held),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert_eq!(first.cursor, exchange::service::cursor(A, held));
    // Whether B's follower is connected at this instant or not, a third stream is refused.
    let mut held_open = Vec::new();
    let mut refused = None;
    for _ in 0..2 {
        match ahead
            .clone()
            .subscribe(pb::SubscribeRequest {
                cursor: exchange::service::cursor(A, held),
            })
            .await
        {
            Ok(stream) => held_open.push(stream),
            Err(status) => {
                refused = Some(status.code());
                break;
            }
        }
    }
    assert_eq!(refused, Some(tonic::Code::ResourceExhausted));
    drop(held_open);
    drop(quiet);
    // The partner listener answers health checks but does not describe the mesh.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        a.mesh.exchange.partner_addr().unwrap().port()
    ))
    .unwrap()
    .tls_config(exchange::tls::client_tls(
        &a.pki.ca.certificate_pem,
        "localhost",
        a.issued_to(B),
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health on the partner listener")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A province that suspends a partner ends its live stream at once.
    assert!(
        eventually(WAIT, || async move { pa.status(B).await.subscribed }).await,
        "B follows A live"
    );
    set_state(&a, B, pb::PartnerState::Suspended).await;
    assert!(
        eventually(WAIT, || async move { !pa.status(B).await.subscribed }).await,
        "A ends the stream of a partner it suspends"
    );
    set_state(&a, B, pb::PartnerState::Active).await;
    assert!(
        eventually(WAIT, || async move { pa.status(B).await.subscribed }).await,
        "B resumes once A restores it"
    );

    // 4. The national check: B asks A before confirming a change, and risk records it.
    let check_in = |person_id: &str, partners: &[&str], request_id: &str, record: bool| {
        let request = pb::NationalCheckRequest {
            request_id: request_id.to_owned(),
            subject: Some(pb::national_check_request::Subject::Person(PersonRef {
                person_id: person_id.to_owned(),
            })),
            partner_ids: partners.iter().map(|p| p.to_string()).collect(),
            record_in_risk: record,
        };
        let (client, token) = (pb_.mesh.exchange_client(), pb_.internal());
        async move {
            client
                .await
                .national_check(authorized(request, &token))
                .await
                .map(|r| r.into_inner())
        }
    };
    let check = |person_id: &str, partners: &[&str], request_id: &str| {
        check_in(person_id, partners, request_id, true)
    };
    let check_id = uuid::Uuid::new_v4().to_string();
    let checked = check(&persons[0].1, &[A], &check_id)
        .await
        .expect("national check");
    assert_eq!(checked.color, CodeColor::Red as i32, "{checked:?}");
    assert_eq!(checked.records.len(), 1);
    assert_eq!(
        checked.records[0].record.as_ref().unwrap().issuing_province,
        A
    );
    assert!(checked.errors.is_empty(), "{:?}", checked.errors);
    assert!(!checked.check_reference.is_empty());
    let again = check(&persons[0].1, &[A], &check_id)
        .await
        .expect("retried check");
    assert_eq!(again, checked, "a retried check gives the first answer");
    let reused = check(&persons[1].1, &[A], &check_id)
        .await
        .expect("a request id reused for another person");
    assert_ne!(
        reused.pseudonym, checked.pseudonym,
        "another person's check never returns the first person's answer"
    );
    assert_ne!(reused.check_reference, checked.check_reference);
    let stranger = b.mesh.verified_person(990).await;
    let incomplete = check(
        &stranger,
        &[A, "national"],
        &uuid::Uuid::new_v4().to_string(),
    )
    .await
    .expect_err("a partner that cannot be asked");
    assert_eq!(
        (incomplete.code(), integration_tests::reason(&incomplete)),
        (tonic::Code::FailedPrecondition, "PARTNER_NOT_USABLE".into()),
        "an incomplete check is not recorded in risk as 'nothing held'"
    );
    let unknown = check_in(
        &stranger,
        &[A, "national"],
        &uuid::Uuid::new_v4().to_string(),
        false,
    )
    .await
    .expect("check of a person A never decided");
    assert_eq!(unknown.color, CodeColor::Unspecified as i32);
    let mut reasons: Vec<(&str, &str)> = unknown
        .errors
        .iter()
        .map(|e| (e.item_id.as_str(), e.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [(A, "PERSON_NOT_DECIDED"), ("national", "PARTNER_NOT_FOUND")]
    );

    // 5. Arrival codes for a rail partner of B, from the merged color.
    let rail_cert = b.issued_to(integration_tests::exchange::TRANSPORT);
    b.mesh
        .exchange_client()
        .await
        .register_partner(authorized(
            pb::RegisterPartnerRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                partner: Some(pb::Partner {
                    partner_id: integration_tests::exchange::TRANSPORT.into(),
                    kind: pb::PartnerKind::Transport as i32,
                    name: "12306".into(),
                    sync_mode: pb::SyncMode::Manual as i32,
                    tls_client_certificate_pem: rail_cert.certificate_pem.clone(),
                    ..Default::default()
                }),
            },
            &b.admin(),
        ))
        .await
        .expect("register the rail partner");
    let mut rail = b.partner_client(rail_cert).await;
    let arrival = |destination: &str, in_hours: i64, baggage: &str, request_id: &str| {
        pb::IssueArrivalCodeRequest {
            request_id: request_id.to_owned(),
            pseudonym: pseudonym.clone(),
            destination_division_code: destination.to_owned(),
            mode: pb::TransportMode::Rail as i32,
            trip_reference: "G1234 2026-11-22".into(),
            expected_arrival_at: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() + in_hours * 3600,
                nanos: 0,
            }),
            baggage_tag: baggage.to_owned(),
        }
    };
    let ticket = uuid::Uuid::new_v4().to_string();
    let asked = arrival("310101", 6, "", &ticket);
    let code = rail
        .issue_arrival_code(asked.clone())
        .await
        .expect("arrival code")
        .into_inner();
    let claims = code.claims.clone().unwrap();
    assert_eq!(claims.color, CodeColor::Red as i32);
    assert_eq!(claims.issuing_province, B);
    let signed = exchange::arrival::decode_qr(&code.qr_payload).expect("HCA1 payload");
    assert_eq!(Some(&signed), code.signed.as_ref());
    let b_key = healthcode_crypto::VerifyingKey::from_sec1(
        signed.key_id.clone(),
        &b.public_key().await.public_key_sec1,
    )
    .unwrap();
    b_key
        .verify(&signed.payload, &signed.signature)
        .expect("signed by B's published key");
    assert_eq!(
        pb::ArrivalCodeClaims::decode(&signed.payload[..]).unwrap(),
        claims
    );
    let retried = rail
        .issue_arrival_code(asked.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried, code, "a retried request gets the same code");
    // Even once the arrival has passed: the retry still gets its code, while a new request
    // for an arrival in the past is refused.
    let soon = pb::IssueArrivalCodeRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        expected_arrival_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() + 2,
            nanos: 0,
        }),
        ..asked.clone()
    };
    let first = rail
        .issue_arrival_code(soon.clone())
        .await
        .expect("an arrival in two seconds")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let again = rail
        .issue_arrival_code(soon.clone())
        .await
        .expect("a retry after the arrival")
        .into_inner();
    assert_eq!(again, first, "a retry after the arrival gets the same code");
    let past = rail
        .issue_arrival_code(pb::IssueArrivalCodeRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            ..soon
        })
        .await
        .expect_err("a new request for a past arrival");
    assert_eq!(bad_fields(&past), ["expected_arrival_at"]);
    let elsewhere = rail
        .issue_arrival_code(arrival("330100", 6, "", &uuid::Uuid::new_v4().to_string()))
        .await
        .expect_err("destination in another province");
    assert_eq!(elsewhere.code(), tonic::Code::FailedPrecondition);
    assert_eq!(integration_tests::reason(&elsewhere), "OUT_OF_PROVINCE");
    let bad = rail
        .issue_arrival_code(arrival("3101", -1, "BAG1", ""))
        .await
        .expect_err("bad request");
    assert_eq!(
        bad_fields(&bad),
        [
            "baggage_tag",
            "destination_division_code",
            "expected_arrival_at",
            "request_id"
        ]
    );
    let not_a_province = rail
        .publish_records(pb::PublishRecordsRequest {
            records: vec![SignedEnvelope::default()],
        })
        .await
        .expect_err("a rail partner publishes nothing");
    assert_eq!(not_a_province.code(), tonic::Code::PermissionDenied);

    // 6. A randomized run: both provinces decide about the same persons; afterwards they
    // agree on every person's merged color.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
        | 1;
    println!("randomized run seed {seed}");
    let mut rng = Rng(seed);
    for (ia, ib) in &persons[5..] {
        let kinds = [rk::ContactKind::Close, rk::ContactKind::Secondary];
        match rng.next() % 4 {
            0 => contact(&a.mesh, ia, kinds[(rng.next() % 2) as usize]).await,
            1 => contact(&b.mesh, ib, kinds[(rng.next() % 2) as usize]).await,
            2 => {
                contact(&a.mesh, ia, kinds[(rng.next() % 2) as usize]).await;
                contact(&b.mesh, ib, kinds[(rng.next() % 2) as usize]).await;
            }
            _ => {}
        }
    }
    assert!(caught_up(&b, &a).await, "B holds all of A's records");
    assert!(caught_up(&a, &b).await, "A holds all of B's records");
    let mut agree = 0;
    for (n, (ia, ib)) in persons.iter().enumerate() {
        let (ma, mb) = (a.merged(ia).await, b.merged(ib).await);
        assert_eq!(ma.pseudonym, mb.pseudonym);
        assert_eq!(
            (
                ma.color,
                &ma.deciding_province,
                &ma.reason_codes,
                ma.valid_until
            ),
            (
                mb.color,
                &mb.deciding_province,
                &mb.reason_codes,
                mb.valid_until
            ),
            "seed {seed}"
        );
        // Both gateways show that color (B's and A's risk services merge the same records);
        // green where neither province has decided anything.
        let color = if ma.color == CodeColor::Unspecified as i32 {
            CodeColor::Green as i32
        } else {
            ma.color
        };
        let (ra, rb) = (&a, &b);
        let shown = eventually(WAIT, || async move {
            ra.shows(ia).await == color && rb.shows(ib).await == color
        })
        .await;
        assert!(
            shown,
            "person {n}: both gateways show the merged color {color} (seed {seed}): A {}, B {}, B decided by {:?}",
            a.shows(ia).await,
            b.shows(ib).await,
            mb.deciding_province
        );
        agree += 1;
    }
    println!(
        "agreement {agree}/{} persons, at both exchanges and both gateways",
        persons.len()
    );

    // 7. B distrusts the key A signed everything with (compromised): A's decisions no
    // longer count in B, neither in its merged colors nor at its gateway. Persons 0 to 4
    // and the late one were decided by A alone.
    b.mesh
        .exchange_client()
        .await
        .revoke_partner_key(authorized(
            pb::RevokePartnerKeyRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                partner_id: A.into(),
                key_id: a_key.key_id().to_owned(),
                reason: "key compromised".into(),
                distrust_earlier: true,
            },
            &b.admin(),
        ))
        .await
        .expect("revoke with distrust");
    let decided_by_a_alone: Vec<&String> = persons[..5]
        .iter()
        .map(|(_, ib)| ib)
        .chain([late])
        .collect();
    for ib in decided_by_a_alone {
        assert_ne!(b.merged(ib).await.deciding_province, A);
        let withdrawn = eventually(WAIT, || async move {
            pb_.shows(ib).await == CodeColor::Green as i32
        })
        .await;
        assert!(withdrawn, "B's gateway no longer shows A's distrusted red");
    }

    a.stop().await;
    b.stop().await;
}

async fn set_state(at: &Province, partner: &str, state: pb::PartnerState) {
    at.mesh
        .exchange_client()
        .await
        .update_partner(authorized(
            pb::UpdatePartnerRequest {
                partner: Some(pb::Partner {
                    partner_id: partner.to_owned(),
                    state: state as i32,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["state".into()],
                }),
            },
            &at.admin(),
        ))
        .await
        .expect("update partner");
}

/// A client of A's partner listener presenting the certificate A issued to B.
async fn as_a_client_of(
    a: &Province,
) -> pb::exchange_service_client::ExchangeServiceClient<tonic::transport::Channel> {
    a.partner_client(a.issued_to(B)).await
}

#[tokio::test]
async fn records_are_issued_on_the_embedded_default() {
    let (mesh, key) = mesh_with_pseudonym_key(Backend::Embedded).await;
    let person_id = mesh.verified_person(31).await;

    // The pseudonym identity derives is the contract's, over the real document number.
    let got = mesh
        .identity_client()
        .await
        .get_exchange_pseudonyms(authorized(
            id::GetExchangePseudonymsRequest {
                persons: vec![
                    PersonRef {
                        person_id: person_id.clone(),
                    },
                    PersonRef {
                        person_id: uuid::Uuid::new_v4().to_string(),
                    },
                ],
            },
            &mesh
                .keys
                .token("exchange", &[roles::INTERNAL, roles::EXCHANGE]),
        ))
        .await
        .expect("pseudonyms")
        .into_inner();
    let expected = healthcode_crypto::PseudonymKey::from_hex("national-1", &key)
        .unwrap()
        .pseudonym(1, &resident_id(31));
    assert_eq!(got.pseudonyms.len(), 1);
    assert_eq!(got.pseudonyms[0].pseudonym, expected);
    assert_eq!(got.errors.len(), 1);
    assert_eq!(got.errors[0].index, 1);
    assert_eq!(got.errors[0].code, tonic::Code::NotFound as i32);
    // And back: the person registered under it (written at registration), nobody for a
    // pseudonym nobody here holds, every bad field named.
    let resolve = |pseudonyms: Vec<String>, key_id: &str| {
        let request = id::ResolveExchangePseudonymsRequest {
            pseudonyms,
            pseudonym_key_id: key_id.to_owned(),
        };
        let mesh = &mesh;
        async move {
            mesh.identity_client()
                .await
                .resolve_exchange_pseudonyms(authorized(
                    request,
                    &mesh
                        .keys
                        .token("exchange", &[roles::INTERNAL, roles::EXCHANGE]),
                ))
                .await
        }
    };
    let unknown = "0".repeat(64);
    let found = resolve(vec![unknown.clone(), expected.clone()], "national-1")
        .await
        .expect("resolved")
        .into_inner()
        .persons;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].pseudonym, expected);
    assert_eq!(found[0].person.as_ref().unwrap().person_id, person_id);
    assert!(
        resolve(vec![expected.clone()], "national-0")
            .await
            .expect("another key")
            .into_inner()
            .persons
            .is_empty()
    );
    let bad = resolve(vec![expected.to_uppercase(), "ab".into()], "")
        .await
        .expect_err("bad request");
    assert_eq!(
        bad_fields(&bad),
        ["pseudonym_key_id", "pseudonyms[0]", "pseudonyms[1]"]
    );
    // Only the exchange resolves pseudonyms and records other provinces' decisions: another
    // service of this mesh is refused, and nothing is recorded.
    let other_service = mesh.keys.token("gateway", &[roles::INTERNAL]);
    let denied = mesh
        .identity_client()
        .await
        .resolve_exchange_pseudonyms(authorized(
            id::ResolveExchangePseudonymsRequest {
                pseudonyms: vec![expected.clone()],
                pseudonym_key_id: "national-1".into(),
            },
            &other_service,
        ))
        .await
        .expect_err("not the exchange");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let forged_decision = rk::RiskEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        person: person(&person_id),
        observed_at: None,
        event: Some(rk::risk_event::Event::OtherProvinceDecision(
            rk::OtherProvinceDecisionEvent {
                issuing_province: "310000".into(),
                sequence: 1,
                color: CodeColor::Red as i32,
                reason_codes: vec![],
                rule_version: 1,
                decided_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                valid_until: None,
                withdrawn: false,
            },
        )),
    };
    let denied = mesh
        .risk_client()
        .await
        .record_events(authorized(
            rk::RecordEventsRequest {
                events: vec![forged_decision],
            },
            &other_service,
        ))
        .await
        .expect_err("not the exchange");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    contact(&mesh, &person_id, rk::ContactKind::Close).await;
    let internal = mesh.keys.token("gateway", &[roles::INTERNAL]);
    let (mesh_ref, person_ref, internal) = (&mesh, &person_id, &internal);
    let red = eventually(WAIT, || async move {
        let merged = mesh_ref
            .exchange_client()
            .await
            .get_merged_color(authorized(
                pb::GetMergedColorRequest {
                    subject: Some(pb::get_merged_color_request::Subject::Person(PersonRef {
                        person_id: person_ref.clone(),
                    })),
                },
                internal,
            ))
            .await
            .expect("merged color")
            .into_inner();
        merged.color == CodeColor::Red as i32 && merged.deciding_province == "330000"
    })
    .await;
    assert!(red, "the province's own record decides its merged color");
    let issued = count(mesh.exchange.db(), "SELECT COUNT(*) FROM issued_records").await;
    assert!(issued >= 1);
    // The record names the person by pseudonym only: not the document number, not the
    // person id.
    let rows = issued::Entity::find()
        .all(mesh.exchange.db())
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, issued);
    for row in rows {
        let envelope = SignedEnvelope::decode(&row.envelope[..]).unwrap();
        let record = pb::ExchangeRecord::decode(&envelope.payload[..]).unwrap();
        assert_eq!(record.pseudonym, expected);
        assert_eq!(record.issuing_province, "330000");
        for secret in [resident_id(31), person_id.clone()] {
            assert!(
                !envelope
                    .payload
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes()),
                "the record carries no personal identifier"
            );
        }
    }
    mesh.stop().await;
}

/// Several issuers at once on PostgreSQL (as several replicas of the exchange would be):
/// every record gets its own sequence, and the sequences run 1, 2, 3... without a gap.
#[tokio::test]
async fn concurrent_issuers_number_records_without_gaps() {
    let (mesh, _) = mesh_with_pseudonym_key(Backend::Real).await;
    let mut persons = Vec::new();
    for n in 0..12 {
        persons.push(mesh.verified_person(40 + n).await);
    }
    let service = mesh.exchange.service().clone();
    let colors = [CodeColor::Red, CodeColor::Yellow, CodeColor::Red];
    let tasks: Vec<_> = persons
        .chunks(2)
        .map(|chunk| {
            let (service, chunk) = (service.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for (v, color) in colors.iter().enumerate() {
                    let batch: Vec<rk::PersonColor> = chunk
                        .iter()
                        .map(|id| rk::PersonColor {
                            person: person(id),
                            color: *color as i32,
                            reasons: vec![healthcode_proto::common::v1::ColorReason {
                                code: healthcode_proto::common::v1::ReasonCode::CloseContact as i32,
                                color: *color as i32,
                                ..Default::default()
                            }],
                            version: 1_000 + v as u64,
                            policy_version: 1,
                            ..Default::default()
                        })
                        .collect();
                    service.issue(&batch).await.expect("issue");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rows = issued::Entity::find()
        .order_by_asc(issued::Column::Sequence)
        .all(mesh.exchange.db())
        .await
        .unwrap();
    let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
    assert!(sequences.len() >= persons.len() * colors.len());
    assert_eq!(
        sequences,
        (1..=sequences.len() as i64).collect::<Vec<_>>(),
        "one sequence each, no gap"
    );
    // Each person's latest record states its newest color.
    for id in &persons {
        let merged = mesh
            .exchange_client()
            .await
            .get_merged_color(authorized(
                pb::GetMergedColorRequest {
                    subject: Some(pb::get_merged_color_request::Subject::Person(PersonRef {
                        person_id: id.clone(),
                    })),
                },
                &mesh.keys.token("gateway", &[roles::INTERNAL]),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(merged.color, CodeColor::Red as i32);
    }
    mesh.stop().await;
}

/// Replicas share the follow leases: one follows a partner at a time, and another takes
/// over when the holder stops renewing.
#[tokio::test]
async fn one_replica_follows_each_partner() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let replica = |name: &str| {
        exchange::sync::PartnerSync::new(
            mesh.exchange.service().clone(),
            name,
            None,
            Default::default(),
            Duration::from_secs(1),
            Duration::from_millis(100),
        )
    };
    let (first, second) = (replica("exchange-0"), replica("exchange-1"));
    assert!(first.hold_lease(B).await.unwrap(), "a free lease is taken");
    assert!(!second.hold_lease(B).await.unwrap(), "a held lease is not");
    assert!(first.hold_lease(B).await.unwrap(), "the holder renews");
    assert!(
        second.hold_lease(A).await.unwrap(),
        "leases are per partner"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        second.hold_lease(B).await.unwrap(),
        "an expired lease is taken over"
    );
    assert!(
        !first.hold_lease(B).await.unwrap(),
        "and the old holder has lost it"
    );
    mesh.stop().await;
}

/// Persons registered before the pseudonym key (or before a rotation) get their pseudonym
/// from the backfill a starting identity replica runs; until it is done, resolving answers
/// UNAVAILABLE rather than "nobody" (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_starting_identity_backfills_pseudonyms_under_a_rotated_key() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let mut persons = Vec::new();
    for n in 0..3 {
        persons.push(mesh.verified_person(900 + n).await);
    }
    let key = healthcode_crypto::PseudonymKey::generate_hex().unwrap();
    let env = mesh
        .identity_env
        .clone()
        .with("EXCHANGE_PSEUDONYM_KEY", key.as_str())
        .with("EXCHANGE_PSEUDONYM_KEY_ID", "national-2");
    let (providers, _) = identity::providers::Providers::local();
    let config = identity::config::IdentityConfig::from_env(&env).expect("config");
    let backends =
        healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
            .await
            .expect("backends");
    let replica = identity::Application::build(config, backends, providers)
        .await
        .expect("a second identity replica starts");
    let rotated = healthcode_crypto::PseudonymKey::from_hex("national-2", &key).unwrap();
    let pseudonyms: Vec<String> = (0..3)
        .map(|n| rotated.pseudonym(1, &resident_id(900 + n)))
        .collect();
    let mut client = id::identity_service_client::IdentityServiceClient::connect(format!(
        "http://{}",
        replica.local_addr()
    ))
    .await
    .expect("connect");
    let token = mesh
        .keys
        .token("exchange", &[roles::INTERNAL, roles::EXCHANGE]);
    let mut found = Vec::new();
    for _ in 0..100 {
        match client
            .resolve_exchange_pseudonyms(authorized(
                id::ResolveExchangePseudonymsRequest {
                    pseudonyms: pseudonyms.clone(),
                    pseudonym_key_id: "national-2".into(),
                },
                &token,
            ))
            .await
        {
            Ok(r) => {
                found = r.into_inner().persons;
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let ids: Vec<String> = found
        .iter()
        .map(|p| p.person.as_ref().unwrap().person_id.clone())
        .collect();
    assert_eq!(ids, persons, "every earlier person, in request order");
    replica.shutdown().await;
    mesh.stop().await;
}

/// Backpressure: a real-time partner that stops reading its stream fills its own bounded
/// buffer and waits there; another partner's stream receives every record meanwhile, and
/// the stalled one resumes without gap once it reads again.
#[tokio::test]
async fn a_partner_that_stops_reading_does_not_slow_the_others() {
    let (mesh, _) = mesh_with_pseudonym_key(Backend::Real).await;
    let pki = exchange::tls::generate_dev_pki(
        "330000",
        &["localhost".to_owned()],
        &["310000".to_owned(), "320000".to_owned()],
    )
    .expect("pki");
    for (partner, issued) in &pki.partners {
        let signing = SigningKey::generate(format!("exchange-{partner}-1")).expect("key");
        register_province(
            &mesh,
            partner,
            pb::SyncMode::RealTime,
            &issued.certificate_pem,
            &signing,
        )
        .await
        .expect("register partner");
    }
    let fingerprint = |partner: &str| {
        pki.partners
            .iter()
            .find(|(id, _)| id == partner)
            .map(|(_, issued)| issued.sha256.clone())
            .expect("certificate")
    };
    let service = mesh.exchange.service().clone();
    let mut slow = service
        .subscribe("320000", &fingerprint("320000"), 0)
        .expect("the slow partner's stream");
    let mut fast = service
        .subscribe("310000", &fingerprint("310000"), 0)
        .expect("the fast partner's stream");

    // 200 records about one person (the color alternates, so each version issues one).
    let person_id = mesh.verified_person(60).await;
    const RECORDS: u64 = 200;
    let first = service.latest_sequence().await.expect("latest") + 1;
    issue_alternating(
        &service,
        &person_id,
        RECORDS,
        [CodeColor::Yellow, CodeColor::Red],
    )
    .await
    .expect("issue");
    let last = service.latest_sequence().await.expect("latest");
    assert!(last >= first + RECORDS - 1);

    // The fast partner gets every record, in order, while the slow one reads nothing.
    let started = Instant::now();
    let got = read_records(&mut fast, last).await;
    println!(
        "fast partner: {} records in {:?} beside a partner reading nothing",
        got.len(),
        started.elapsed()
    );
    assert_eq!(
        got,
        (1..=last).collect::<Vec<_>>(),
        "every record, in order"
    );
    // The slow partner's buffer is full: it waits there, on its own.
    assert_eq!(
        slow.len(),
        slow.max_capacity(),
        "the slow partner's buffer is full"
    );
    // Reading again, it gets everything, without gap or duplicate.
    let got = read_records(&mut slow, last).await;
    assert_eq!(
        got,
        (1..=last).collect::<Vec<_>>(),
        "the slow partner resumes without gap"
    );
    drop((slow, fast));
    mesh.stop().await;
}

type Records = tokio::sync::mpsc::Receiver<Result<pb::SubscribeResponse, tonic::Status>>;

/// The sequences a stream delivers until it reaches `last` (or WAIT passes).
async fn read_records(rx: &mut Records, last: u64) -> Vec<u64> {
    let mut sequences = Vec::new();
    let deadline = Instant::now() + WAIT;
    while sequences.last().copied().unwrap_or(0) < last && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(Ok(item))) => {
                if let Some(pb::subscribe_response::Item::Record(r)) = item.item {
                    sequences.push(r.record.expect("record").sequence);
                }
            }
            Ok(Some(Err(status))) => panic!("stream ended: {status}"),
            Ok(None) => panic!("stream closed"),
            Err(_) => {}
        }
    }
    sequences
}
