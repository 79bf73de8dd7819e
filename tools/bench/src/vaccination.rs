//! The vaccination service under load, against the whole mesh started in this process on the
//! machine's PostgreSQL and Redis, with its baselines measured in the same run:
//!
//! - worker-signed doses recorded per second (fresh persons, dose 1), beside the gRPC echo;
//! - domestic certificates issued per second (two doses each: one SM2 signature by the
//!   service over claims that carry the workers' signatures) beside bare SM2 signing, and
//!   verified per second online (three SM2 verifications: issuer and two workers) beside
//!   bare SM2 verification;
//! - international certificates (EU DCC: CBOR, COSE ES256, zlib, Base45) issued per second
//!   beside bare P-256 signing, and verified offline with the published signer certificate
//!   beside bare P-256 verification.

use crate::baselines;
use crate::load::{self, Stats};
use crate::report::{Compared, Row, comparison};
use chrono::{Duration as Days, Utc};
use healthcode_proto::vaccination::v1 as pb;
use integration_tests::mesh::Mesh;
use integration_tests::vaccination::{World, person, rid, world};
use integration_tests::{Backend, authorized};
use pb::vaccination_service_client::VaccinationServiceClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub struct VaccinationRun {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    pub redis_url: String,
    /// Verified persons (two doses each) whose certificates are issued and verified.
    pub persons: u32,
    /// Fresh persons given a first dose in the RecordDose run.
    pub doses: usize,
    /// OS threads for the cryptographic baselines and the offline verification.
    pub threads: usize,
}

fn pick<T>(items: &[T], index: u64) -> &T {
    &items[(index % items.len() as u64) as usize]
}

pub async fn run(cfg: VaccinationRun) -> anyhow::Result<Compared> {
    let mut rows = Vec::new();
    eprintln!("hc-bench: baselines");
    let echo = baselines::echo_row(
        &mut rows,
        cfg.concurrency,
        cfg.warmup,
        cfg.duration,
        cfg.connections,
    )
    .await?;
    let threads = cfg.threads.max(1);
    let sm2_sign = baselines::sm2_sign_rate(threads, cfg.warmup, cfg.duration)?;
    let sm2_verify = baselines::sm2_verify_rate(threads, cfg.warmup, cfg.duration)?;
    let p256_sign = baselines::p256_sign_rate(threads, cfg.warmup, cfg.duration)?;
    let p256_verify = baselines::p256_verify_rate(threads, cfg.warmup, cfg.duration)?;
    for (name, unit, stats) in [
        ("baseline: SM2 sign", "signatures", &sm2_sign),
        ("baseline: SM2 verify", "verifications", &sm2_verify),
        ("baseline: P-256 ECDSA sign", "signatures", &p256_sign),
        (
            "baseline: P-256 ECDSA verify",
            "verifications",
            &p256_verify,
        ),
    ] {
        rows.push(Row::threads(name, unit, threads, stats.clone()));
    }

    eprintln!("hc-bench: starting the mesh on PostgreSQL and Redis");
    // Doses given months ago are recorded as on time: late entries are not what is measured.
    let mesh = Mesh::start_with(
        Backend::Real,
        Some(cfg.redis_url.clone()),
        &[("LATE_ENTRY_AFTER_HOURS", "100000")],
    )
    .await;
    let measured = scenarios(&cfg, &mesh, &mut rows).await;
    mesh.stop().await;
    let m = measured?;
    let comparisons = vec![
        comparison("RecordDose / echo", &m.record, echo.per_second, "calls/s"),
        comparison(
            "domestic issued / SM2 sign",
            &m.domestic_issue,
            sm2_sign.per_second,
            "per s",
        ),
        comparison(
            "domestic verified / (SM2 verify ÷ 3 signatures)",
            &m.domestic_verify,
            sm2_verify.per_second / 3.0,
            "per s",
        ),
        comparison(
            "EU DCC issued / P-256 sign",
            &m.dcc_issue,
            p256_sign.per_second,
            "per s",
        ),
        comparison(
            "EU DCC verified offline / P-256 verify",
            &m.dcc_verify,
            p256_verify.per_second,
            "per s",
        ),
    ];
    Ok(Compared { rows, comparisons })
}

struct Measured {
    record: Stats,
    domestic_issue: Stats,
    domestic_verify: Stats,
    dcc_issue: Stats,
    dcc_verify: Stats,
}

/// Dose 1 and dose 2 of `person`, 300 and 270 days ago.
async fn two_doses(w: &mut World, person_id: &str) -> anyhow::Result<()> {
    let first = Utc::now() - Days::days(300);
    let key = w.worker.clone();
    for (n, at) in [(1, first), (2, first + Days::days(30))] {
        let envelope = w.signed(&key, person_id, n, at, "B2026001");
        w.record(&rid(), envelope)
            .await
            .map_err(|s| anyhow::anyhow!("dose {n}: {}", load::status(s)))?;
    }
    Ok(())
}

async fn scenarios(
    cfg: &VaccinationRun,
    mesh: &Mesh,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Measured> {
    let clients: Arc<Vec<VaccinationServiceClient<Channel>>> = Arc::new(
        load::channels(mesh.vaccination.local_addr(), cfg.connections)
            .await?
            .into_iter()
            .map(VaccinationServiceClient::new)
            .collect(),
    );
    let mut w = world(mesh, pb::VaccineType::Inactivated).await;

    eprintln!("hc-bench: {} verified persons, two doses each", cfg.persons);
    let mut persons = Vec::new();
    for n in 0..cfg.persons {
        let p = mesh.verified_person_named(200_000 + n, "Zhang San").await;
        two_doses(&mut w, &p).await?;
        persons.push(p);
    }
    let persons = Arc::new(persons);
    let w = Arc::new(w);

    // RecordDose: dose 1 of a fresh person each call, signed by the worker beforehand so
    // that the generator's SM2 signing is not in the window.
    eprintln!("hc-bench: RecordDose x{}", cfg.doses);
    let given = Utc::now() - Days::days(10);
    let envelopes: Arc<Vec<_>> = Arc::new(
        (0..cfg.doses)
            .map(|_| {
                w.signed(
                    &w.worker,
                    &uuid::Uuid::new_v4().to_string(),
                    1,
                    given,
                    "B2026001",
                )
            })
            .collect(),
    );
    let record = {
        let (clients, w, envelopes) = (clients.clone(), w.clone(), envelopes.clone());
        move |i: usize| {
            let mut client = pick(&clients, i as u64).clone();
            let request = authorized(
                pb::RecordDoseRequest {
                    request_id: rid(),
                    worker_signature: Some(envelopes[i].clone()),
                },
                &w.site_token,
            );
            async move {
                client
                    .record_dose(request)
                    .await
                    .map(|_| 1)
                    .map_err(load::status)
            }
        }
    };
    let record = load::fixed(cfg.doses, cfg.concurrency, record).await;
    rows.push(Row::closed(
        "RecordDose (worker-signed, dose 1)",
        "doses",
        cfg.concurrency,
        record.clone(),
    ));

    eprintln!("hc-bench: IssueDomesticCertificate");
    let issue_domestic = {
        let (clients, w, persons) = (clients.clone(), w.clone(), persons.clone());
        move |i: u64| {
            let mut client = pick(&clients, i).clone();
            let request = authorized(
                pb::IssueDomesticCertificateRequest {
                    person: person(pick::<String>(&persons, i)),
                    include_qr_svg: false,
                },
                &w.app,
            );
            async move {
                client
                    .issue_domestic_certificate(request)
                    .await
                    .map(|_| 1)
                    .map_err(load::status)
            }
        }
    };
    let domestic_issue =
        load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, issue_domestic).await;
    rows.push(Row::closed(
        "IssueDomesticCertificate (2 doses)",
        "certificates",
        cfg.concurrency,
        domestic_issue.clone(),
    ));

    // One certificate of each person to verify, and one EU DCC each to verify offline.
    let mut domestic = Vec::new();
    let mut international = Vec::new();
    let mut client = pick(&clients, 0).clone();
    for p in persons.iter() {
        domestic.push(
            client
                .issue_domestic_certificate(authorized(
                    pb::IssueDomesticCertificateRequest {
                        person: person(p),
                        include_qr_svg: false,
                    },
                    &w.app,
                ))
                .await?
                .into_inner()
                .qr_payload,
        );
        international.push(
            client
                .issue_international_certificate(authorized(
                    pb::IssueInternationalCertificateRequest {
                        person: person(p),
                        ..Default::default()
                    },
                    &w.app,
                ))
                .await?
                .into_inner()
                .hc1,
        );
    }

    eprintln!("hc-bench: VerifyDomesticCertificate");
    let domestic = Arc::new(domestic);
    let verify_domestic = {
        let (clients, w, domestic) = (clients.clone(), w.clone(), domestic.clone());
        move |i: u64| {
            let mut client = pick(&clients, i).clone();
            let request = authorized(
                pb::VerifyDomesticCertificateRequest {
                    qr_payload: pick::<String>(&domestic, i).clone(),
                },
                &w.app,
            );
            async move {
                let answer = client
                    .verify_domestic_certificate(request)
                    .await
                    .map_err(load::status)?
                    .into_inner();
                if answer.check == pb::CertificateCheck::Valid as i32 {
                    Ok(1)
                } else {
                    Err(format!("check {}", answer.check))
                }
            }
        }
    };
    let domestic_verify =
        load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, verify_domestic).await;
    rows.push(Row::closed(
        "VerifyDomesticCertificate (issuer + 2 workers)",
        "certificates",
        cfg.concurrency,
        domestic_verify.clone(),
    ));

    eprintln!("hc-bench: IssueInternationalCertificate");
    let issue_dcc = {
        let (clients, w, persons) = (clients.clone(), w.clone(), persons.clone());
        move |i: u64| {
            let mut client = pick(&clients, i).clone();
            let request = authorized(
                pb::IssueInternationalCertificateRequest {
                    person: person(pick::<String>(&persons, i)),
                    ..Default::default()
                },
                &w.app,
            );
            async move {
                client
                    .issue_international_certificate(request)
                    .await
                    .map(|_| 1)
                    .map_err(load::status)
            }
        }
    };
    let dcc_issue = load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, issue_dcc).await;
    rows.push(Row::closed(
        "IssueInternationalCertificate (EU DCC, ES256)",
        "certificates",
        cfg.concurrency,
        dcc_issue.clone(),
    ));

    eprintln!("hc-bench: EU DCC verified offline");
    let signer = client
        .get_signer_certificates(authorized(
            pb::GetSignerCertificatesRequest::default(),
            &w.app,
        ))
        .await?
        .into_inner()
        .certificates
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no signer certificate published"))?
        .certificate_der;
    let now = Utc::now();
    let dcc_verify = load::threaded_loop(cfg.threads.max(1), cfg.warmup, cfg.duration, |i| {
        let decoded = vaccination::dcc::decode(pick::<String>(&international, i))
            .map_err(|e| e.to_string())?;
        vaccination::dcc::verify(&decoded, &signer, now)
            .map(|()| 1)
            .map_err(|e| e.to_string())
    });
    rows.push(Row::threads(
        "EU DCC verify offline (Base45, zlib, COSE, ES256)",
        "certificates",
        cfg.threads.max(1),
        dcc_verify.clone(),
    ));
    Ok(Measured {
        record,
        domestic_issue,
        domestic_verify,
        dcc_issue,
        dcc_verify,
    })
}
