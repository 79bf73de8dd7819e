//! The vaccination service on a real mesh: worker-signed doses checked against the course,
//! doses reaching the risk service through the outbox, domestic and international
//! certificates verified, PDF export, booster reminders at 499 m and not at 501 m, once;
//! late entries and their review; bad input.

use chrono::{Duration as Days, Utc};
use healthcode_auth::roles;
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{GeoPoint, GetPublicKeysRequest, Locale, SignedEnvelope};
use healthcode_proto::geo::north_of;
use healthcode_proto::time::ts;
use healthcode_proto::vaccination::v1 as pb;
use integration_tests::mesh::Mesh;
use integration_tests::vaccination::{SITE_AT, person, rid, world};
use integration_tests::{Backend, authorized, bad_fields, count, reason};
use pb::{CertificateCheck, CertificateKind, DoseState, LateEntryDecision, LateEntryState};
use prost::Message;
use std::time::Duration;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn doses_certificates_and_reminders_on_postgres_and_redis() {
    // Doses given months ago are recorded as on time here; late entries are tested below.
    let mesh = Mesh::start_with(Backend::Real, None, &[("LATE_ENTRY_AFTER_HOURS", "100000")]).await;
    let mut w = world(&mesh, pb::VaccineType::Inactivated).await;
    let p = mesh.verified_person_named(71, "Zhang San").await;
    let now = Utc::now();
    let first = now - Days::days(300);

    // The course is checked: dose 1, then the interval, the batch, the order, the signature.
    let key = w.worker.clone();
    let dose1 = w
        .record(&rid(), w.signed(&key, &p, 1, first, "B2026001"))
        .await
        .expect("dose 1");
    assert_eq!(dose1.state, DoseState::Recorded as i32);
    assert!(!dose1.completes_course);
    let err = w
        .record(
            &rid(),
            w.signed(&key, &p, 2, first + Days::days(2), "B2026001"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "INTERVAL_TOO_SHORT")
    );
    let err = w
        .record(
            &rid(),
            w.signed(&key, &p, 2, first + Days::days(30), "NOPE-1"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "UNKNOWN_BATCH")
    );
    let err = w
        .record(
            &rid(),
            w.signed(&key, &p, 3, first + Days::days(30), "B2026001"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "DOSE_OUT_OF_ORDER")
    );
    let stranger = SigningKey::generate(key.key_id()).unwrap();
    let err = w
        .record(
            &rid(),
            w.signed(&stranger, &p, 2, first + Days::days(30), "B2026001"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let second = first + Days::days(30);
    let request = rid();
    let dose2 = w
        .record(&request, w.signed(&key, &p, 2, second, "B2026001"))
        .await
        .expect("dose 2");
    assert!(dose2.completes_course && !dose2.booster);
    assert_eq!(
        w.record(&request, w.signed(&key, &p, 2, second, "B2026001"))
            .await
            .unwrap(),
        dose2,
        "a retry answers the same"
    );
    let err = w
        .record(&rid(), w.signed(&key, &p, 2, second, "B2026001"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::AlreadyExists, "DOSE_RECORDED")
    );

    // Both doses reach the risk service through the outbox, once each.
    let mut recorded = 0;
    for _ in 0..100 {
        recorded = count(
            mesh.risk.db(),
            "SELECT COUNT(*) FROM events WHERE kind = 'dose'",
        )
        .await;
        if recorded == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recorded, 2, "risk recorded both doses");

    // The domestic certificate verifies; an altered one does not.
    let domestic = w
        .client
        .issue_domestic_certificate(authorized(
            pb::IssueDomesticCertificateRequest {
                person: person(&p),
                include_qr_svg: true,
            },
            &w.app,
        ))
        .await
        .expect("domestic certificate")
        .into_inner();
    let claims = domestic.claims.clone().unwrap();
    assert_eq!(claims.doses.len(), 2);
    assert!(claims.course_complete);
    assert_eq!(claims.doses[1].batch_number, "B2026001");
    assert_eq!(claims.holder.as_ref().unwrap().masked_name, "王**");
    assert!(domestic.qr_payload.starts_with("HCV1:") && domestic.qr_svg.starts_with("<?xml"));
    assert_eq!(
        domestic.recognitions[0].country_codes.len(),
        52,
        "the default table"
    );
    let verify = |qr: String| {
        let mut client = w.client.clone();
        let token = w.app.clone();
        async move {
            client
                .verify_domestic_certificate(authorized(
                    pb::VerifyDomesticCertificateRequest { qr_payload: qr },
                    &token,
                ))
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(
        verify(domestic.qr_payload.clone()).await.unwrap().check,
        CertificateCheck::Valid as i32
    );
    let mut forged = domestic.signed.clone().unwrap();
    let mut altered = claims.clone();
    altered.doses[0].batch_number = "B2026999".into();
    forged.payload = altered.encode_to_vec();
    use base64::Engine;
    let qr = format!(
        "HCV1:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.encode_to_vec())
    );
    assert_eq!(
        verify(qr).await.unwrap().check,
        CertificateCheck::BadIssuerSignature as i32
    );
    assert_eq!(
        verify("HCV1:???".into()).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // The international certificate decodes and verifies with the published signer.
    let international = w
        .client
        .issue_international_certificate(authorized(
            pb::IssueInternationalCertificateRequest {
                person: person(&p),
                dose_id: String::new(),
                include_qr_svg: false,
            },
            &w.app,
        ))
        .await
        .expect("international certificate")
        .into_inner();
    let signers = w
        .client
        .get_signer_certificates(pb::GetSignerCertificatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert_eq!(signers[0].kid, international.signer_kid);
    assert_eq!(signers[0].algorithm, "ES256");
    let decoded = vaccination::dcc::decode(&international.hc1).expect("HC1 decodes");
    vaccination::dcc::verify(&decoded, &signers[0].certificate_der, Utc::now()).expect("verifies");
    let h = &decoded.claims.hcert;
    assert_eq!(
        (h.nam.family_t.as_str(), h.nam.given_t.as_str()),
        ("ZHANG", "SAN")
    );
    assert_eq!(h.dob.len(), 10, "date of birth from the resident card");
    assert_eq!(
        (h.v[0].dn, h.v[0].sd, h.v[0].ci.as_str()),
        (2, 2, international.certificate_id.as_str())
    );
    assert!(international.certificate_id.starts_with("URN:UVCI:01:CN:"));
    // The certificate holds personal data: it is sealed at rest.
    let raw = count(mesh.vaccination.db(), &format!(
        "SELECT COUNT(*) FROM certificates WHERE certificate_id = '{}' AND position('ZHANG' in encode(sealed, 'escape')) = 0",
        international.certificate_id
    )).await;
    assert_eq!(raw, 1, "no plaintext name in the certificates table");

    // PDF export: a current one in Chinese, a past one by id; the digest is signed.
    let pdf = w
        .client
        .export_certificate_pdf(authorized(
            pb::ExportCertificatePdfRequest {
                person: person(&p),
                kind: CertificateKind::Domestic as i32,
                certificate_id: claims.certificate_id.clone(),
                locale: Some(Locale {
                    tag: "zh-CN".into(),
                }),
            },
            &w.app,
        ))
        .await
        .expect("pdf")
        .into_inner();
    assert!(pdf.pdf.starts_with(b"%PDF-"));
    assert_eq!(pdf.certificate_id, claims.certificate_id);
    let text = String::from_utf8_lossy(&pdf.pdf);
    assert!(
        text.contains(&pdf.watermark_id),
        "the watermark id is in the document"
    );
    let signed = pdf.digest_signature.unwrap();
    assert_eq!(
        signed.payload,
        healthcode_crypto::sm3_digest(&pdf.pdf).to_vec()
    );
    let keys = w
        .client
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let key = healthcode_crypto::VerifyingKey::from_sec1(
        keys[0].key_id.clone(),
        &keys[0].public_key_sec1,
    )
    .unwrap();
    key.verify(&signed.payload, &signed.signature)
        .expect("digest signature");
    if let Ok(dir) = std::env::var("PDF_OUT") {
        std::fs::write(format!("{dir}/domestic.pdf"), &pdf.pdf).unwrap();
    }
    let pdf = w
        .client
        .export_certificate_pdf(authorized(
            pb::ExportCertificatePdfRequest {
                person: person(&p),
                kind: CertificateKind::International as i32,
                certificate_id: international.certificate_id.clone(),
                locale: None,
            },
            &w.app,
        ))
        .await
        .expect("international pdf")
        .into_inner();
    assert!(pdf.pdf.starts_with(b"%PDF-"));
    if let Ok(dir) = std::env::var("PDF_OUT") {
        std::fs::write(format!("{dir}/international.pdf"), &pdf.pdf).unwrap();
    }
    let err = w
        .client
        .export_certificate_pdf(authorized(
            pb::ExportCertificatePdfRequest {
                person: person(&p),
                kind: CertificateKind::Domestic as i32,
                certificate_id: uuid::Uuid::new_v4().to_string(),
                locale: None,
            },
            &w.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The booster fell due 90 days ago: a reminder at 499 m, none at 501 m, and only once.
    let due = w
        .client
        .list_booster_due(authorized(
            pb::ListBoosterDueRequest {
                person: person(&p),
                ..Default::default()
            },
            &w.app,
        ))
        .await
        .unwrap()
        .into_inner()
        .due;
    assert_eq!(due.len(), 1);
    assert!(due[0].reminded_at.is_none());
    assert!(
        w.report(&p, north_of(&SITE_AT, 501.0)).await.is_none(),
        "501 m is too far"
    );
    let reminder = w
        .report(&p, north_of(&SITE_AT, 499.0))
        .await
        .expect("a reminder at 499 m");
    assert_eq!(reminder.site.as_ref().unwrap().site_id, w.site);
    assert!(
        (498..=500).contains(&reminder.distance_m),
        "{}",
        reminder.distance_m
    );
    assert!(reminder.title.contains("加强针"));
    assert!(
        w.report(&p, north_of(&SITE_AT, 499.0)).await.is_none(),
        "once per booster"
    );
    assert!(w.report(&p, SITE_AT).await.is_none(), "once per booster");
    let due = w
        .client
        .list_booster_due(authorized(
            pb::ListBoosterDueRequest {
                person: person(&p),
                ..Default::default()
            },
            &w.admin,
        ))
        .await;
    assert_eq!(
        due.unwrap_err().code(),
        Code::PermissionDenied,
        "health_admin does not list persons"
    );
    let official = mesh.keys.token("cdc-1", &[roles::OFFICIAL]);
    let due = w
        .client
        .list_booster_due(authorized(
            pb::ListBoosterDueRequest {
                division_code: "330106".into(),
                ..Default::default()
            },
            &official,
        ))
        .await
        .unwrap()
        .into_inner()
        .due;
    assert_eq!(due.len(), 1);
    assert!(due[0].reminded_at.is_some());
    // A person with no booster due gets nothing, however near.
    let other = mesh.verified_person(72).await;
    assert!(w.report(&other, SITE_AT).await.is_none());
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_entries_revocation_and_bad_input_embedded() {
    let mesh = Mesh::start(Backend::Embedded, None).await;
    let mut w = world(&mesh, pb::VaccineType::RecombinantProtein).await;
    let p = uuid::Uuid::new_v4().to_string();
    let key = w.worker.clone();

    // Recorded three days after it was given: kept for the site's re-check.
    let late = w
        .record(
            &rid(),
            w.signed(&key, &p, 1, Utc::now() - Days::days(3), "B2026001"),
        )
        .await
        .expect("late dose");
    assert_eq!(late.state, DoseState::PendingReview as i32);
    assert!(!late.late_entry_id.is_empty());
    let shared = w.client.clone();
    let listed = |include: bool| {
        let mut client = shared.clone();
        let token = w.app.clone();
        let p = p.clone();
        async move {
            client
                .list_doses(authorized(
                    pb::ListDosesRequest {
                        person: person(&p),
                        include_unconfirmed: include,
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner()
                .doses
        }
    };
    assert!(listed(false).await.is_empty());
    assert_eq!(listed(true).await.len(), 1);
    let pending = w
        .client
        .list_late_entries(authorized(
            pb::ListLateEntriesRequest::default(),
            &w.site_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .late_entries;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].procedure,
        pb::ExceptionProcedure::UnitRecheck as i32
    );
    let review = |token: String, id: String, decision: LateEntryDecision, note: &str| {
        let mut client = shared.clone();
        let note = note.to_owned();
        async move {
            client
                .review_late_entry(authorized(
                    pb::ReviewLateEntryRequest {
                        request_id: rid(),
                        late_entry_id: id,
                        decision: decision as i32,
                        note,
                        worker_signature: None,
                    },
                    &token,
                ))
                .await
                .map(|r| r.into_inner())
        }
    };
    let other_site = mesh.keys.token("another-site", &[roles::VACCINATION_SITE]);
    let err = review(
        other_site,
        late.late_entry_id.clone(),
        LateEntryDecision::Approve,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = review(
        w.app.clone(),
        late.late_entry_id.clone(),
        LateEntryDecision::Approve,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let approved = review(
        w.site_token.clone(),
        late.late_entry_id.clone(),
        LateEntryDecision::Approve,
        "checked the register",
    )
    .await
    .unwrap();
    assert_eq!(approved.state, LateEntryState::Approved as i32);
    let err = review(
        w.site_token.clone(),
        late.late_entry_id.clone(),
        LateEntryDecision::Reject,
        "again",
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "LATE_ENTRY_DECIDED")
    );
    assert_eq!(listed(false).await[0].state, DoseState::Recorded as i32);

    // A person asks for a missing dose with a statement and evidence, both sealed; the site
    // sees them, rejects the entry, and they are deleted.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(b"paper record");
    let entry = w
        .client
        .request_late_entry(authorized(
            pb::RequestLateEntryRequest {
                request_id: rid(),
                person: person(&p),
                vaccine_id: w.vaccine.vaccine_id.clone(),
                batch_number: "B2026001".into(),
                dose_number: 2,
                administered_at: Some(ts(Utc::now() - Days::days(2))),
                site_id: w.site.clone(),
                statement: "given at the community centre, not in the record".into(),
                evidence_image: png.clone(),
            },
            &w.app,
        ))
        .await
        .expect("late entry requested")
        .into_inner();
    let seen = w
        .client
        .list_late_entries(authorized(
            pb::ListLateEntriesRequest::default(),
            &w.site_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .late_entries;
    assert_eq!(
        (
            seen[0].evidence_image.as_slice(),
            seen[0].statement.as_str()
        ),
        (
            png.as_slice(),
            "given at the community centre, not in the record"
        ),
        "the reviewer opens the evidence and the statement"
    );
    assert!(entry.statement.is_empty() && entry.evidence_image.is_empty());
    assert_eq!(
        count(
            mesh.vaccination.db(),
            "SELECT COUNT(*) FROM late_entries WHERE instr(payload, CAST('community centre' AS BLOB)) > 0"
        )
        .await,
        0,
        "the statement is not stored in the clear"
    );
    let rejected = review(
        w.site_token.clone(),
        entry.late_entry_id.clone(),
        LateEntryDecision::Reject,
        "no record at the site",
    )
    .await
    .unwrap();
    assert_eq!(rejected.state, LateEntryState::Rejected as i32);
    assert_eq!(
        count(
            mesh.vaccination.db(),
            "SELECT COUNT(*) FROM late_entries WHERE length(evidence) > 0"
        )
        .await,
        0
    );

    // A revoked key signs no more doses.
    w.client
        .revoke_worker_key(authorized(
            pb::RevokeWorkerKeyRequest {
                request_id: rid(),
                site_id: w.site.clone(),
                key_id: key.key_id().into(),
                reason: "device lost".into(),
            },
            &w.site_token,
        ))
        .await
        .expect("revoke");
    let err = w
        .record(
            &rid(),
            w.signed(&key, &p, 2, Utc::now() - Days::hours(1), "B2026001"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Bad input: one violation per bad field, nothing written.
    let err = w
        .client
        .register_vaccine(authorized(
            pb::RegisterVaccineRequest {
                request_id: String::new(),
                vaccine: Some(pb::Vaccine::default()),
            },
            &w.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&err),
        [
            "request_id",
            "vaccine.approval_number",
            "vaccine.doses_in_course",
            "vaccine.maker_en",
            "vaccine.maker_zh",
            "vaccine.name_en",
            "vaccine.name_zh",
            "vaccine.type",
        ]
    );
    let err = w
        .client
        .record_dose(authorized(
            pb::RecordDoseRequest {
                request_id: rid(),
                worker_signature: Some(SignedEnvelope {
                    payload: b"\xff\xff".to_vec(),
                    signature: vec![1],
                    key_id: "k".into(),
                }),
            },
            &w.site_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["worker_signature.payload"]);
    let err = w
        .client
        .record_dose(authorized(
            pb::RecordDoseRequest {
                request_id: rid(),
                worker_signature: None,
            },
            &w.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = w
        .client
        .report_location(authorized(
            pb::ReportLocationRequest {
                person: person("not-a-uuid"),
                location: Some(GeoPoint {
                    latitude: 91.0,
                    longitude: 0.0,
                }),
                ..Default::default()
            },
            &w.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["location.latitude", "person.person_id"]);
    let err = w
        .client
        .issue_domestic_certificate(authorized(
            pb::IssueDomesticCertificateRequest {
                person: person(&uuid::Uuid::new_v4().to_string()),
                include_qr_svg: false,
            },
            &w.app,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "NO_DOSES")
    );
    assert_eq!(
        count(mesh.vaccination.db(), "SELECT COUNT(*) FROM doses").await,
        1
    );
    mesh.stop().await;
}
