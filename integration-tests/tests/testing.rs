//! The testing service on a real mesh: the booking race, payment idempotency and expiry,
//! pooled positive → yellow → retest → green or red through the real risk service and
//! gateway, crash-safe delivery of results, certificates, and bad input.

use futures::future::join_all;
use healthcode_auth::roles;
use healthcode_proto::common::v1::{CodeColor, GeoPoint, NucleicAcidResult, PersonRef};
use healthcode_proto::gateway::v1 as gw;
use healthcode_proto::testing::v1 as pb;
use integration_tests::mesh::Mesh;
use integration_tests::{Backend, authorized, bad_fields, count, reason};
use pb::{BookingState, PaymentOutcome, PaymentProvider, PaymentState, SampleKind};
use sea_orm::ConnectionTrait;
use std::time::Duration;
use tonic::Code;

fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn at(offset_seconds: i64) -> Option<prost_types::Timestamp> {
    let now = chrono::Utc::now().timestamp() + offset_seconds;
    Some(prost_types::Timestamp {
        seconds: now - now.rem_euclid(60),
        nanos: 0,
    })
}

struct Tokens {
    admin: String,
    app: String,
    lab: String,
    official: String,
    provider: String,
}

fn tokens(mesh: &Mesh, institution_id: &str) -> Tokens {
    Tokens {
        admin: mesh.keys.token("health-commission", &[roles::HEALTH_ADMIN]),
        app: mesh.keys.app(),
        lab: mesh.keys.token(institution_id, &[roles::LAB]),
        official: mesh.keys.token("cdc-officer-7", &[roles::OFFICIAL]),
        provider: mesh
            .keys
            .token("sandbox-adapter", &[roles::PAYMENT_PROVIDER]),
    }
}

fn staff(mesh: &Mesh, institution_id: &str) -> String {
    mesh.keys.token(institution_id, &[roles::INSTITUTION])
}

async fn institution(mesh: &Mesh, licence: &str, price: i64) -> pb::Institution {
    let admin = mesh.keys.token("health-commission", &[roles::HEALTH_ADMIN]);
    mesh.testing_client()
        .await
        .register_institution(authorized(
            pb::RegisterInstitutionRequest {
                request_id: rid(),
                institution: Some(pb::Institution {
                    kind: pb::InstitutionKind::SamplingSiteAndLaboratory as i32,
                    name: "西湖区核酸采样点".into(),
                    address: "杭州市西湖区文三路 1 号".into(),
                    location: Some(GeoPoint {
                        latitude: 30.2741,
                        longitude: 120.1551,
                    }),
                    division_code: "330106".into(),
                    licence_number: licence.into(),
                    single_tube_price_fen: price,
                    pooled_price_fen: 0,
                    pool_size: 10,
                    public_phone: "0571-88888888".into(),
                    active: true,
                    sample_kinds: vec![SampleKind::SingleTube as i32, SampleKind::Pooled as i32],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("register institution")
        .into_inner()
}

/// One slot of `capacity` starting `hours_ahead` hours from now.
async fn open_slot(mesh: &Mesh, institution_id: &str, capacity: u32, hours_ahead: i64) -> pb::Slot {
    let start = chrono::Utc::now().timestamp() + hours_ahead * 3600;
    slot_at(mesh, institution_id, capacity, start).await
}

/// Offsets from now, in seconds, of a moment before (at most two hours back) and a moment
/// after (at most one hour ahead) that both fall on today's local day (UTC+8), at least two
/// minutes clear of either midnight; within four minutes of midnight it waits the turn out.
async fn one_local_day() -> (i64, i64) {
    loop {
        let since = (chrono::Utc::now().timestamp() + 8 * 3600).rem_euclid(86_400);
        let until = 86_400 - since;
        if since >= 240 && until >= 240 {
            return (-(since - 120).min(7200), (until - 120).min(3600));
        }
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
}

/// Tomorrow at `hour` o'clock, local time (UTC+8), in Unix seconds.
fn tomorrow_at(hour: i64) -> i64 {
    let local = chrono::Utc::now().timestamp() + 8 * 3600;
    let midnight = local - local.rem_euclid(86_400) + 86_400;
    midnight + hour * 3600 - 8 * 3600
}

/// One slot of `capacity` starting at `start` (Unix seconds), half an hour long.
async fn slot_at(mesh: &Mesh, institution_id: &str, capacity: u32, start: i64) -> pb::Slot {
    mesh.testing_client()
        .await
        .set_slots(authorized(
            pb::SetSlotsRequest {
                request_id: rid(),
                institution_id: institution_id.into(),
                windows: vec![pb::SlotWindow {
                    starts_at: Some(prost_types::Timestamp {
                        seconds: start,
                        nanos: 0,
                    }),
                    ends_at: Some(prost_types::Timestamp {
                        seconds: start + 1800,
                        nanos: 0,
                    }),
                    capacity,
                }],
            },
            &staff(mesh, institution_id),
        ))
        .await
        .expect("set slots")
        .into_inner()
        .slots
        .remove(0)
}

async fn book(
    mesh: &Mesh,
    person_id: &str,
    slot_id: &str,
    request_id: &str,
) -> Result<pb::Booking, tonic::Status> {
    mesh.testing_client()
        .await
        .create_booking(authorized(
            pb::CreateBookingRequest {
                request_id: request_id.into(),
                person: person(person_id),
                slot_id: slot_id.into(),
                sample_kind: SampleKind::SingleTube as i32,
                ..Default::default()
            },
            &mesh.keys.app(),
        ))
        .await
        .map(|r| r.into_inner())
}

async fn booking_race(backend: Backend, bookers: usize, places: u32) {
    let mesh = Mesh::start(backend, None).await;
    let site = institution(&mesh, &format!("L{}", &rid()[..8]), 0).await;
    let slot = open_slot(&mesh, &site.institution_id, places, 2).await;
    let attempts = (0..bookers).map(|_| {
        let slot_id = slot.slot_id.clone();
        let mesh = &mesh;
        async move {
            // As a client should: a shed request is retried with backoff under the same
            // request id, so a retry never books twice.
            let (who, request) = (rid(), rid());
            let mut backoff = 10;
            loop {
                match book(mesh, &who, &slot_id, &request).await {
                    Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::Unavailable) => {
                        tokio::time::sleep(Duration::from_millis(backoff)).await;
                        backoff = (backoff * 2).min(200);
                    }
                    other => return other,
                }
            }
        }
    });
    let outcomes = join_all(attempts).await;
    let booked = outcomes.iter().filter(|o| o.is_ok()).count();
    for o in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(o.code(), Code::FailedPrecondition, "{o:?}");
        assert_eq!(reason(o), "SLOT_FULL");
    }
    assert_eq!(booked, places as usize, "exactly the places are booked");
    let db = mesh.testing.db();
    assert_eq!(
        count(db, "SELECT COUNT(*) FROM bookings").await,
        i64::from(places)
    );
    assert_eq!(
        count(db, "SELECT CAST(MAX(booked) AS BIGINT) FROM slots").await,
        i64::from(places)
    );

    // One open booking per person per day (two open slots of tomorrow); a retry returns
    // the first answer.
    let other = slot_at(&mesh, &site.institution_id, 5, tomorrow_at(9)).await;
    let later = slot_at(&mesh, &site.institution_id, 5, tomorrow_at(15)).await;
    let someone = rid();
    let request = rid();
    let first = book(&mesh, &someone, &other.slot_id, &request)
        .await
        .expect("book");
    let again = book(&mesh, &someone, &other.slot_id, &request)
        .await
        .expect("retry");
    assert_eq!(first, again);
    let second = book(&mesh, &someone, &later.slot_id, &rid())
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::AlreadyExists, "{second:?}");
    assert_eq!(reason(&second), "OPEN_BOOKING_THAT_DAY");
    // Another day is fine.
    let next_day = slot_at(&mesh, &site.institution_id, 5, tomorrow_at(9) + 86_400).await;
    book(&mesh, &someone, &next_day.slot_id, &rid())
        .await
        .expect("another day");
    // Cancelling frees the place, and the person may book that day again.
    let cancelled = mesh
        .testing_client()
        .await
        .cancel_booking(authorized(
            pb::CancelBookingRequest {
                request_id: rid(),
                booking_id: first.booking_id.clone(),
                reason: "PERSON_REQUEST".into(),
            },
            &mesh.keys.app(),
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, BookingState::Cancelled as i32);
    assert_eq!(cancelled.slot.expect("slot").booked, 0);
    book(&mesh, &someone, &later.slot_id, &rid())
        .await
        .expect("book that day again");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_bookings_take_exactly_a_hundred_places_on_postgres() {
    booking_race(Backend::Real, 1_000, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bookings_never_oversell_on_the_embedded_default() {
    booking_race(Backend::Embedded, 200, 20).await;
}

async fn pay(mesh: &Mesh, key: &str, booking_id: &str) -> Result<pb::Payment, tonic::Status> {
    mesh.testing_client()
        .await
        .start_payment(authorized(
            pb::StartPaymentRequest {
                idempotency_key: key.into(),
                booking_id: booking_id.into(),
                provider: PaymentProvider::Sandbox as i32,
            },
            &mesh.keys.app(),
        ))
        .await
        .map(|r| r.into_inner())
}

async fn callback(
    mesh: &Mesh,
    token: &str,
    n: &testing::payments::Notification,
    raw: Vec<u8>,
    signature: Vec<u8>,
) -> Result<pb::HandlePaymentCallbackResponse, tonic::Status> {
    mesh.testing_client()
        .await
        .handle_payment_callback(authorized(
            pb::HandlePaymentCallbackRequest {
                provider: PaymentProvider::Sandbox as i32,
                payment_id: n.payment_id.clone(),
                notification_id: n.notification_id.clone(),
                provider_transaction_id: n.provider_transaction_id.clone(),
                outcome: n.outcome,
                amount_fen: n.amount_fen,
                occurred_at: Some(prost_types::Timestamp {
                    seconds: n.occurred_at,
                    nanos: 0,
                }),
                raw_notification: raw,
                provider_signature: signature,
                decline_reason: n.decline_reason.clone(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn get_booking(mesh: &Mesh, id: &str) -> pb::Booking {
    mesh.testing_client()
        .await
        .get_booking(authorized(
            pb::GetBookingRequest {
                booking_id: id.into(),
            },
            &mesh.keys.app(),
        ))
        .await
        .expect("get booking")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_is_idempotent_duplicates_change_nothing_and_unpaid_bookings_expire() {
    let mesh = Mesh::start_with(Backend::Real, None, &[("PAYMENT_WINDOW_SECONDS", "2")]).await;
    let site = institution(&mesh, &format!("P{}", &rid()[..8]), 1600).await;
    let t = tokens(&mesh, &site.institution_id);
    let slot = open_slot(&mesh, &site.institution_id, 10, 2).await;
    let booking = book(&mesh, &rid(), &slot.slot_id, &rid())
        .await
        .expect("book");
    assert_eq!(booking.state, BookingState::AwaitingPayment as i32);
    assert_eq!(booking.price_fen, 1600);

    // The same key twice, and concurrently: one payment, one order at the provider.
    let key = rid();
    let (a, b) = tokio::join!(
        pay(&mesh, &key, &booking.booking_id),
        pay(&mesh, &key, &booking.booking_id)
    );
    let (a, b) = (a.expect("pay"), b.expect("pay"));
    assert_eq!(a.payment_id, b.payment_id);
    assert_eq!(
        pay(&mesh, &key, &booking.booking_id)
            .await
            .expect("retry")
            .payment_id,
        a.payment_id
    );
    assert_eq!(mesh.sandbox.orders_created(), 1);
    assert_eq!(a.state, PaymentState::Pending as i32);

    // A forged notification is refused; a real one confirms; its duplicate changes nothing.
    let n = mesh.sandbox.notification(
        &a.payment_id,
        &a.provider_transaction_id,
        PaymentOutcome::Succeeded,
        1600,
    );
    let (raw, sig) = mesh.sandbox.notify(&n).expect("sign");
    let mut forged = raw.clone();
    forged.extend_from_slice(b" ");
    let refused = callback(&mesh, &t.provider, &n, forged, sig.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let denied = callback(&mesh, &t.app, &n, raw.clone(), sig.clone())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let done = callback(&mesh, &t.provider, &n, raw.clone(), sig.clone())
        .await
        .expect("callback");
    assert!(!done.duplicate);
    assert_eq!(
        done.payment.as_ref().unwrap().state,
        PaymentState::Succeeded as i32
    );
    let twice = callback(&mesh, &t.provider, &n, raw, sig)
        .await
        .expect("duplicate");
    assert!(twice.duplicate);
    assert_eq!(twice.payment.unwrap().state, PaymentState::Succeeded as i32);
    assert_eq!(
        get_booking(&mesh, &booking.booking_id).await.state,
        BookingState::Confirmed as i32
    );
    let paid_again = pay(&mesh, &rid(), &booking.booking_id).await.unwrap_err();
    assert_eq!(reason(&paid_again), "BOOKING_NOT_AWAITING_PAYMENT");

    // A provider that does not answer: UNAVAILABLE, nothing recorded.
    let pricey = institution(&mesh, &format!("Q{}", &rid()[..8]), 1999).await;
    let pricey_slot = open_slot(&mesh, &pricey.institution_id, 10, 2).await;
    let unpaid = book(&mesh, &rid(), &pricey_slot.slot_id, &rid())
        .await
        .expect("book");
    let timeout = pay(&mesh, &rid(), &unpaid.booking_id).await.unwrap_err();
    assert_eq!(timeout.code(), Code::Unavailable);
    assert_eq!(
        count(mesh.testing.db(), "SELECT COUNT(*) FROM payments").await,
        1
    );

    // An unpaid booking expires and frees its place; a success arriving late is refunded.
    let late = book(&mesh, &rid(), &slot.slot_id, &rid())
        .await
        .expect("book");
    let late_payment = pay(&mesh, &rid(), &late.booking_id).await.expect("pay");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    mesh.testing
        .testing()
        .expire_once(100)
        .await
        .expect("expire");
    let expired = get_booking(&mesh, &late.booking_id).await;
    assert_eq!(expired.state, BookingState::Expired as i32);
    assert_eq!(
        expired.slot.unwrap().booked,
        1,
        "only the paid booking holds a place"
    );
    assert_eq!(
        get_booking(&mesh, &unpaid.booking_id).await.state,
        BookingState::Expired as i32
    );
    let n = mesh.sandbox.notification(
        &late_payment.payment_id,
        &late_payment.provider_transaction_id,
        PaymentOutcome::Succeeded,
        1600,
    );
    let (raw, sig) = mesh.sandbox.notify(&n).expect("sign");
    let late_done = callback(&mesh, &t.provider, &n, raw, sig)
        .await
        .expect("late callback");
    assert_eq!(
        late_done.payment.unwrap().state,
        PaymentState::RefundPending as i32
    );
    assert_eq!(
        mesh.testing
            .testing()
            .refund_once(10)
            .await
            .expect("refund"),
        1
    );
    assert_eq!(mesh.sandbox.refunds_made(), 1);
    let refunded = mesh
        .testing_client()
        .await
        .get_payment(authorized(
            pb::GetPaymentRequest {
                payment_id: late_payment.payment_id.clone(),
            },
            &t.app,
        ))
        .await
        .expect("get payment")
        .into_inner();
    assert_eq!(refunded.state, PaymentState::Refunded as i32);
    assert_eq!(
        get_booking(&mesh, &late.booking_id).await.state,
        BookingState::Expired as i32
    );
    let _ = t.admin;
    let _ = t.lab;
    let _ = t.official;
    mesh.stop().await;
}

async fn sample(
    mesh: &Mesh,
    institution_id: &str,
    tube: &str,
    kind: SampleKind,
    persons: &[String],
    sampled_at: Option<prost_types::Timestamp>,
) -> pb::Sample {
    mesh.testing_client()
        .await
        .record_sample(authorized(
            pb::RecordSampleRequest {
                request_id: rid(),
                tube_id: tube.into(),
                kind: kind as i32,
                persons: persons
                    .iter()
                    .map(|p| PersonRef {
                        person_id: p.clone(),
                    })
                    .collect(),
                sampled_at,
            },
            &staff(mesh, institution_id),
        ))
        .await
        .expect("record sample")
        .into_inner()
}

fn result(tube: &str, outcome: NucleicAcidResult, sampled: i64, reported: i64) -> pb::LabResult {
    pb::LabResult {
        result_id: format!("R-{tube}"),
        tube_id: tube.into(),
        result: outcome as i32,
        sampled_at: at(sampled),
        received_at: at(sampled + (reported - sampled) / 2),
        reported_at: at(reported),
        ct_orf1ab: 0.0,
        ct_n: 0.0,
    }
}

async fn upload(mesh: &Mesh, lab: &str, results: Vec<pb::LabResult>) -> pb::UploadResultsResponse {
    mesh.testing_client()
        .await
        .upload_results(authorized(pb::UploadResultsRequest { results }, lab))
        .await
        .expect("upload")
        .into_inner()
}

async fn color(mesh: &Mesh, id: &str) -> i32 {
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
        .color
}

/// Waits until the gateway shows `expected` for the person (results travel through the
/// outbox, the stream and the risk service).
async fn shows(mesh: &Mesh, id: &str, expected: CodeColor) {
    for _ in 0..100 {
        if color(mesh, id).await == expected as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the gateway never showed {expected:?}; it shows {}",
        color(mesh, id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_positive_pool_turns_members_yellow_and_the_retest_decides_each() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let site = institution(&mesh, &format!("M{}", &rid()[..8]), 0).await;
    let t = tokens(&mesh, &site.institution_id);
    let mut members = Vec::new();
    for n in 0..3 {
        members.push(mesh.verified_person(7_100 + n).await);
    }
    let bystander = mesh.verified_person(7_200).await;
    for id in members.iter().chain([&bystander]) {
        shows(&mesh, id, CodeColor::Green).await;
    }
    // Member 2 had a negative single tube before the pool.
    let earlier = format!("E{}", &rid()[..10]);
    sample(
        &mesh,
        &site.institution_id,
        &earlier,
        SampleKind::SingleTube,
        std::slice::from_ref(&members[2]),
        at(-6 * 3600),
    )
    .await;
    let up = upload(
        &mesh,
        &t.lab,
        vec![result(
            &earlier,
            NucleicAcidResult::Negative,
            -6 * 3600,
            -5 * 3600,
        )],
    )
    .await;
    assert_eq!(up.accepted, 1, "{up:?}");
    // Pool 1 (the three members) is positive; pool 2 (the bystander and someone else) is
    // negative.
    let pool = format!("T{}", &rid()[..10]);
    let clean = format!("T{}", &rid()[..10]);
    sample(
        &mesh,
        &site.institution_id,
        &pool,
        SampleKind::Pooled,
        &members,
        at(-4 * 3600),
    )
    .await;
    sample(
        &mesh,
        &site.institution_id,
        &clean,
        SampleKind::Pooled,
        &[bystander.clone(), rid()],
        at(-4 * 3600),
    )
    .await;
    let up = upload(
        &mesh,
        &t.lab,
        vec![
            result(&pool, NucleicAcidResult::Positive, -4 * 3600, -3 * 3600),
            result(&clean, NucleicAcidResult::Negative, -4 * 3600, -3 * 3600),
        ],
    )
    .await;
    assert_eq!(
        (up.accepted, up.duplicates, up.errors.len()),
        (2, 0, 0),
        "{up:?}"
    );
    for id in &members {
        shows(&mesh, id, CodeColor::Yellow).await;
    }
    shows(&mesh, &bystander, CodeColor::Green).await;

    // Each member got a retest notice and was told, once.
    let notices = mesh
        .testing_client()
        .await
        .list_retest_notices(authorized(
            pb::ListRetestNoticesRequest {
                state: pb::RetestNoticeState::Open as i32,
                ..Default::default()
            },
            &t.official,
        ))
        .await
        .expect("notices")
        .into_inner()
        .notices;
    assert_eq!(notices.len(), 3);
    for _ in 0..50 {
        if mesh.notifier.sent().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut told: Vec<String> = mesh.notifier.sent().into_iter().map(|(p, _)| p).collect();
    told.sort();
    let mut expected = members.clone();
    expected.sort();
    assert_eq!(told, expected);

    // Member 2's earlier negative certifies nothing while the pool waits for its retest.
    let reports = mesh
        .testing_client()
        .await
        .list_my_reports(authorized(
            pb::ListMyReportsRequest {
                person: person(&members[2]),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .expect("reports")
        .into_inner()
        .reports;
    assert_eq!(
        reports[0].result,
        NucleicAcidResult::PoolPositive as i32,
        "newest first"
    );
    let earlier_report = reports
        .iter()
        .find(|r| r.tube_id == earlier)
        .expect("earlier");
    let waiting = mesh
        .testing_client()
        .await
        .issue_negative_certificate(authorized(
            pb::IssueNegativeCertificateRequest {
                person: person(&members[2]),
                report_id: earlier_report.report_id.clone(),
                include_qr_svg: false,
            },
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&waiting), "RETEST_PENDING");
    // Member 0 has no negative yet.
    let pending = mesh
        .testing_client()
        .await
        .issue_negative_certificate(authorized(
            pb::IssueNegativeCertificateRequest {
                person: person(&members[0]),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&pending), "NOT_NEGATIVE");

    // Retests: free bookings from the notices, single tubes; member 0 negative, member 1
    // positive; member 2 not yet retested.
    // A sample consumes the booking of its own local day, so the retest samples and the
    // retest slot must share one whatever the hour the test runs at.
    let (back, ahead) = one_local_day().await;
    let retest_slot = slot_at(
        &mesh,
        &site.institution_id,
        10,
        chrono::Utc::now().timestamp() + ahead,
    )
    .await;
    let mut tubes = Vec::new();
    for (n, id) in members.iter().take(2).enumerate() {
        let notice = notices
            .iter()
            .find(|x| x.person.as_ref().unwrap().person_id == *id)
            .unwrap();
        let booking = mesh
            .testing_client()
            .await
            .create_booking(authorized(
                pb::CreateBookingRequest {
                    request_id: rid(),
                    person: person(id),
                    slot_id: retest_slot.slot_id.clone(),
                    sample_kind: SampleKind::SingleTube as i32,
                    retest_notice_id: notice.notice_id.clone(),
                    ..Default::default()
                },
                &t.app,
            ))
            .await
            .expect("retest booking")
            .into_inner();
        assert_eq!(booking.price_fen, 0);
        assert_eq!(booking.state, BookingState::Confirmed as i32);
        let tube = format!("S{n}{}", &rid()[..10]);
        let s = sample(
            &mesh,
            &site.institution_id,
            &tube,
            SampleKind::SingleTube,
            std::slice::from_ref(id),
            at(back),
        )
        .await;
        assert_eq!(s.booking_ids, vec![booking.booking_id.clone()]);
        tubes.push(tube);
    }
    let up = upload(
        &mesh,
        &t.lab,
        vec![
            result(&tubes[0], NucleicAcidResult::Negative, back, back / 2),
            result(&tubes[1], NucleicAcidResult::Positive, back, back / 2),
        ],
    )
    .await;
    assert_eq!(up.accepted, 2, "{up:?}");
    shows(&mesh, &members[0], CodeColor::Green).await;
    shows(&mesh, &members[1], CodeColor::Red).await;
    shows(&mesh, &members[2], CodeColor::Yellow).await;

    // Member 0 has a negative certificate that verifies offline with the published key.
    let cert = mesh
        .testing_client()
        .await
        .issue_negative_certificate(authorized(
            pb::IssueNegativeCertificateRequest {
                person: person(&members[0]),
                include_qr_svg: true,
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .expect("certificate")
        .into_inner();
    assert!(cert.qr_payload.starts_with("HCN1:"));
    assert!(cert.qr_svg.starts_with("<?xml") || cert.qr_svg.contains("<svg"));
    let claims = cert.claims.clone().unwrap();
    assert!(claims.holder.as_ref().unwrap().masked_name.contains('*'));
    let keys = mesh
        .testing_client()
        .await
        .get_public_keys(healthcode_proto::common::v1::GetPublicKeysRequest::default())
        .await
        .expect("keys")
        .into_inner()
        .keys;
    let signed = cert.signed.clone().unwrap();
    let key = keys
        .iter()
        .find(|k| k.key_id == signed.key_id)
        .expect("published key");
    let verifying =
        healthcode_crypto::VerifyingKey::from_sec1(key.key_id.clone(), &key.public_key_sec1)
            .unwrap();
    verifying
        .verify(&signed.payload, &signed.signature)
        .expect("offline verification");
    let mut tampered = signed.clone();
    tampered.payload[3] ^= 1;
    assert!(
        verifying
            .verify(&tampered.payload, &tampered.signature)
            .is_err()
    );
    let check = |qr: String| {
        let mesh = &mesh;
        async move {
            mesh.testing_client()
                .await
                .verify_negative_certificate(authorized(
                    pb::VerifyNegativeCertificateRequest { qr_payload: qr },
                    &mesh.keys.token("venue", &[roles::VENUE]),
                ))
                .await
                .map(|r| r.into_inner().check)
        }
    };
    assert_eq!(
        check(cert.qr_payload.clone()).await.unwrap(),
        pb::CertificateCheck::Valid as i32
    );
    let forged = healthcode_codes::encode_qr("HCN1", &prost::Message::encode_to_vec(&tampered));
    assert_eq!(
        check(forged).await.unwrap(),
        pb::CertificateCheck::BadSignature as i32
    );
    assert_eq!(
        check("HCN1:!!".into()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Member 1 is positive: no certificate.
    let refused = mesh
        .testing_client()
        .await
        .issue_negative_certificate(authorized(
            pb::IssueNegativeCertificateRequest {
                person: person(&members[1]),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "NOT_NEGATIVE");

    // The notices of the retested members are answered; the reports list newest first.
    let db = mesh.testing.db();
    assert_eq!(
        count(db, "SELECT COUNT(*) FROM retest_notices WHERE state = 3").await,
        2
    );
    let reports = mesh
        .testing_client()
        .await
        .list_my_reports(authorized(
            pb::ListMyReportsRequest {
                person: person(&members[0]),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .expect("reports")
        .into_inner()
        .reports;
    let results: Vec<i32> = reports.iter().map(|r| r.result).collect();
    assert_eq!(
        results,
        vec![
            NucleicAcidResult::Negative as i32,
            NucleicAcidResult::PoolPositive as i32
        ]
    );
    assert_eq!(reports[0].laboratory_name, "西湖区核酸采样点");
    mesh.stop().await;
}

/// Handles half of the first batch it is given, then hangs until killed: a consumer that
/// dies mid-batch, after some of its work committed and before it acknowledged any.
struct DiesMidBatch {
    inner: std::sync::Arc<dyn healthcode_events::Handler>,
    reached: tokio::sync::mpsc::UnboundedSender<usize>,
}

#[async_trait::async_trait]
impl healthcode_events::Handler for DiesMidBatch {
    async fn handle(
        &self,
        events: &[healthcode_events::Event],
    ) -> Result<(), healthcode_events::HandlerError> {
        let half = events.len() / 2;
        self.inner.handle(&events[..half]).await?;
        let _ = self.reached.send(half);
        futures::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_risk_once_when_the_consumer_dies_mid_batch_and_the_relay_repeats() {
    let mesh = Mesh::start(Backend::Real, None).await;
    let site = institution(&mesh, &format!("C{}", &rid()[..8]), 0).await;
    let t = tokens(&mesh, &site.institution_id);
    let n = 120;
    let mut results = Vec::new();
    for i in 0..n {
        let tube = format!("K{i:03}{}", &rid()[..8]);
        sample(
            &mesh,
            &site.institution_id,
            &tube,
            SampleKind::SingleTube,
            &[rid()],
            at(-3600),
        )
        .await;
        let outcome = if i % 10 == 0 {
            NucleicAcidResult::Positive
        } else {
            NucleicAcidResult::Negative
        };
        results.push(result(&tube, outcome, -3600, -600));
    }
    // A consumer of its own group, with the risk service's real handler, that dies
    // mid-batch; then the same consumer restarted.
    let group = "risk-test-results-crash";
    let settings = healthcode_events::ConsumerSettings {
        batch: 500,
        ..healthcode_events::ConsumerSettings::new(testing::RESULT_TOPIC, group, "crashy-0")
    };
    let handler: std::sync::Arc<dyn healthcode_events::Handler> = std::sync::Arc::new(
        risk::EventsFromTopic::new(mesh.risk.risk().clone(), "testing-results"),
    );
    // The group starts at the end of the stream: create it before anything is published.
    let bus = mesh.backends.bus.clone();
    bus.ensure_group(testing::RESULT_TOPIC, group)
        .await
        .expect("group");
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    let up = upload(&mesh, &t.lab, results.clone()).await;
    assert_eq!(up.accepted, n as u32);
    let published = async {
        for _ in 0..100 {
            if count(
                mesh.testing.db(),
                "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
            )
            .await
                == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the relay never published the results");
    };
    published.await;
    let dying = healthcode_events::Consumer::new(
        bus.clone(),
        settings.clone(),
        std::sync::Arc::new(DiesMidBatch {
            inner: handler.clone(),
            reached,
        }),
    );
    let task = tokio::spawn(async move { dying.poll_once().await });
    let half = tokio::time::timeout(Duration::from_secs(20), reached_rx.recv())
        .await
        .expect("the consumer got halfway")
        .expect("halfway");
    assert!(half > 0);
    task.abort();
    let _ = task.await;
    // The relay repeats everything too (as after a crash between publish and mark).
    mesh.testing
        .db()
        .execute_unprepared("UPDATE outbox SET published_at = NULL")
        .await
        .expect("unmark");
    for _ in 0..100 {
        if count(
            mesh.testing.db(),
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await
            == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Restarted under its name, it takes up its own pending entries first, then the rest.
    let restarted = healthcode_events::Consumer::new(bus.clone(), settings, handler);
    let mut handled = 0;
    for _ in 0..20 {
        let got = restarted.poll_once().await.expect("poll");
        handled += got;
        if got == 0 {
            break;
        }
    }
    assert_eq!(
        handled,
        2 * n,
        "every entry, including the repeats, is handled and acknowledged"
    );
    let risk_db = mesh.risk.db();
    assert_eq!(
        count(
            risk_db,
            "SELECT COUNT(*) FROM events WHERE kind = 'test_result'"
        )
        .await,
        n as i64,
        "each result recorded once"
    );
    // The risk service's own consumer saw the same entries: still once.
    let positives = results
        .iter()
        .filter(|r| r.result == NucleicAcidResult::Positive as i32)
        .count();
    let reds = async {
        for _ in 0..100 {
            let red = count(risk_db, "SELECT COUNT(*) FROM colors WHERE color = 3").await;
            if red == positives as i64 {
                return red;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        count(risk_db, "SELECT COUNT(*) FROM colors WHERE color = 3").await
    };
    assert_eq!(reds.await, positives as i64);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_every_bad_field_and_bad_items_are_reported_alone() {
    let mesh = Mesh::start(Backend::Embedded, None).await;
    let site = institution(&mesh, "LIC-BAD-1", 0).await;
    let t = tokens(&mesh, &site.institution_id);
    let mut client = mesh.testing_client().await;
    let err = client
        .create_booking(authorized(
            pb::CreateBookingRequest {
                request_id: "has space".into(),
                person: Some(PersonRef {
                    person_id: "NOT-A-UUID".into(),
                }),
                slot_id: String::new(),
                sample_kind: 0,
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&err),
        vec!["person.person_id", "request_id", "sample_kind", "slot_id"]
    );
    let err = client
        .register_institution(authorized(
            pb::RegisterInstitutionRequest {
                request_id: rid(),
                institution: Some(pb::Institution {
                    pool_size: 25,
                    location: Some(GeoPoint {
                        latitude: 91.0,
                        longitude: 0.0,
                    }),
                    ..Default::default()
                }),
            },
            &t.admin,
        ))
        .await
        .unwrap_err();
    let fields = bad_fields(&err);
    for f in [
        "institution.kind",
        "institution.name",
        "institution.location.latitude",
        "institution.division_code",
        "institution.licence_number",
        "institution.pool_size",
        "institution.sample_kinds",
    ] {
        assert!(fields.contains(&f.to_owned()), "{f} in {fields:?}");
    }
    // Wrong roles.
    let denied = client
        .register_institution(authorized(
            pb::RegisterInstitutionRequest::default(),
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client
        .upload_results(authorized(pb::UploadResultsRequest::default(), &t.app))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // A pool above the institution's size.
    let too_many: Vec<PersonRef> = (0..11).map(|_| PersonRef { person_id: rid() }).collect();
    let err = client
        .record_sample(authorized(
            pb::RecordSampleRequest {
                request_id: rid(),
                tube_id: "T-BIG".into(),
                kind: SampleKind::Pooled as i32,
                persons: too_many,
                sampled_at: None,
            },
            &staff(&mesh, &site.institution_id),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), vec!["persons"]);
    // A batch: one good result, and bad items each reported alone; the good one applies.
    let good = format!("G{}", &rid()[..8]);
    sample(
        &mesh,
        &site.institution_id,
        &good,
        SampleKind::SingleTube,
        &[rid()],
        at(-3600),
    )
    .await;
    let mut out_of_order = result(&good, NucleicAcidResult::Negative, -3600, -600);
    out_of_order.result_id = "R-ORDER".into();
    out_of_order.reported_at = at(-7200);
    let up = upload(
        &mesh,
        &t.lab,
        vec![
            result(&good, NucleicAcidResult::Negative, -3600, -600),
            result("NO-SUCH-TUBE", NucleicAcidResult::Negative, -3600, -600),
            out_of_order,
            pb::LabResult::default(),
        ],
    )
    .await;
    assert_eq!(up.accepted, 1);
    let reasons: Vec<(u32, String)> = up
        .errors
        .iter()
        .map(|e| (e.index, e.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, "UNKNOWN_TUBE".to_owned()),
            (2, "TIMESTAMPS_OUT_OF_ORDER".to_owned()),
            (3, "INVALID_RESULT_ID".to_owned()),
        ]
    );
    // The same result again is a duplicate; the same id with other content is refused.
    let again = upload(
        &mesh,
        &t.lab,
        vec![result(&good, NucleicAcidResult::Negative, -3600, -600)],
    )
    .await;
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    let changed = upload(
        &mesh,
        &t.lab,
        vec![result(&good, NucleicAcidResult::Positive, -3600, -600)],
    )
    .await;
    assert_eq!(changed.errors[0].reason, "ALREADY_REPORTED_DIFFERENTLY");
    assert_eq!(
        count(mesh.testing.db(), "SELECT COUNT(*) FROM reports").await,
        1
    );
    assert_eq!(
        count(
            mesh.testing.db(),
            "SELECT COUNT(*) FROM outbox WHERE topic = 'testing.result'"
        )
        .await,
        1
    );
    // Near me: the institution is found around its own location, and not 60 km away.
    let found = client
        .search_institutions(authorized(
            pb::SearchInstitutionsRequest {
                near: Some(pb::search_institutions_request::Near::Location(GeoPoint {
                    latitude: 30.2745,
                    longitude: 120.1555,
                })),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .expect("search")
        .into_inner();
    assert!(found.matches.is_empty(), "no free slot yet");
    open_slot(&mesh, &site.institution_id, 5, 2).await;
    let found = client
        .search_institutions(authorized(
            pb::SearchInstitutionsRequest {
                near: Some(pb::search_institutions_request::Near::Location(GeoPoint {
                    latitude: 30.2745,
                    longitude: 120.1555,
                })),
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .expect("search")
        .into_inner();
    assert_eq!(found.matches.len(), 1);
    assert!(found.matches[0].distance_m < 100);
    let err = client
        .search_institutions(authorized(
            pb::SearchInstitutionsRequest {
                radius_m: 60_000,
                ..Default::default()
            },
            &t.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), vec!["near", "radius_m"]);
    let _ = (t.official, t.provider);
    mesh.stop().await;
}
