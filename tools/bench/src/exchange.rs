//! The exchange between two provinces, each a whole mesh in this process on the machine's
//! PostgreSQL and Redis (own databases, own Redis key spaces), linked over mutual TLS:
//!
//! - propagation latency: from the risk service's commit of a color change in province A
//!   to province B's gateway showing it (outbox, stream, record issued and signed,
//!   Subscribe stream over TLS, checked and stored in B, outbox, pseudonym resolved by B's
//!   identity, merged by B's risk service, color cache, gateway), beside the same change
//!   shown by A's own gateway (everything but the crossing); and the same up to each
//!   province's exchange (B's merged color, A's own record);
//! - the same propagation to B again while a third partner of A holds its two streams open
//!   and reads nothing (A having issued enough records to fill their buffers and HTTP/2
//!   windows): a slow partner must not slow the others;
//! - records per second from one partner: PublishRecords batches of signed records,
//!   checked (SM2) and stored in sequence, beside bare SM2 verification (one per record).

use crate::baselines;
use crate::load::{Recorder, Stats};
use crate::report::{Compared, Row, comparison};
use healthcode_auth::roles;
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{CodeColor, PersonRef, ReasonCode, SignedEnvelope};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::risk::v1 as rk;
use integration_tests::authorized;
use integration_tests::exchange::{
    Province, THIRD, issue_alternating, linked_pair, public_key_of, register_province,
};
use std::time::{Duration, Instant};

pub struct ExchangeRun {
    /// Color changes whose propagation is timed, one after the other.
    pub samples: u32,
    /// Records published by one partner in the throughput run.
    pub records: usize,
    /// Records per PublishRecords call.
    pub batch: usize,
    /// Records A issues while a partner's streams read nothing, at least (enough to fill
    /// their HTTP/2 windows and buffers is always issued).
    pub stall_records: u64,
    pub threads: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

async fn close_contact(p: &Province, person_id: &str) -> Result<(), String> {
    p.mesh
        .risk_client()
        .await
        .record_events(authorized(
            rk::RecordEventsRequest {
                events: vec![rk::RiskEvent {
                    event_id: uuid::Uuid::new_v4().to_string(),
                    person: Some(PersonRef {
                        person_id: person_id.to_owned(),
                    }),
                    observed_at: None,
                    event: Some(rk::risk_event::Event::Contact(rk::ContactEvent {
                        kind: rk::ContactKind::Close as i32,
                        last_exposure_at: Some(prost_types::Timestamp {
                            seconds: chrono::Utc::now().timestamp() - 3600,
                            nanos: 0,
                        }),
                        case_reference: "bench".into(),
                    })),
                }],
            },
            &p.mesh
                .keys
                .token("bench", &[roles::OFFICIAL, roles::INTERNAL]),
        ))
        .await
        .map(|_| ())
        .map_err(crate::load::status)
}

async fn red(p: &Province, person_id: &str) -> bool {
    p.merged(person_id).await.color == CodeColor::Red as i32
}

pub async fn run(cfg: ExchangeRun) -> anyhow::Result<Compared> {
    let mut rows = Vec::new();
    let threads = cfg.threads.max(1);
    eprintln!("hc-bench: baselines");
    let sm2_verify = baselines::sm2_verify_rate(threads, cfg.warmup, cfg.duration)?;
    rows.push(Row::threads(
        "baseline: SM2 verify",
        "verifications",
        threads,
        sm2_verify.clone(),
    ));

    eprintln!("hc-bench: starting two provinces linked over mutual TLS");
    let (a, b) = linked_pair("330000", "310000").await;
    let mut persons = Vec::new();
    for n in 0..cfg.samples {
        persons.push((
            a.mesh.verified_person(7_000 + n).await,
            b.mesh.verified_person(7_000 + n).await,
        ));
    }

    eprintln!("hc-bench: propagation latency");
    let [local, remote, local_gateway, remote_gateway] = propagation(&a, &b, &persons).await;
    for (name, stats) in [
        (
            "color change shown by A's own gateway (baseline: no crossing)",
            &local_gateway,
        ),
        (
            "color change in A shown by B's gateway (over mutual TLS)",
            &remote_gateway,
        ),
        (
            "color change visible in A's own exchange (baseline: no crossing)",
            &local,
        ),
        (
            "color change in A visible in B's merged color (over mutual TLS)",
            &remote,
        ),
    ] {
        rows.push(Row::closed(name, "changes", 1, stats.clone()));
    }

    eprintln!("hc-bench: propagation beside a partner that reads nothing");
    let stalled = stall_a_partner(&a, cfg.stall_records).await?;
    // B follows every one of those records first: the figures below are not B catching up.
    let latest = a
        .mesh
        .exchange
        .service()
        .latest_sequence()
        .await
        .map_err(|e| anyhow::anyhow!("latest: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while b.status(&a.code).await.inbound_sequence < latest {
        anyhow::ensure!(Instant::now() < deadline, "B did not catch up with A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut more = Vec::new();
    for n in 0..cfg.samples {
        more.push((
            a.mesh.verified_person(8_000 + n).await,
            b.mesh.verified_person(8_000 + n).await,
        ));
    }
    let [_, remote_stalled, _, remote_gateway_stalled] = propagation(&a, &b, &more).await;
    drop(stalled);
    for (name, stats) in [
        (
            "color change in A shown by B's gateway, beside a partner of A reading nothing",
            &remote_gateway_stalled,
        ),
        (
            "color change in A visible in B's merged color, beside a partner of A reading nothing",
            &remote_stalled,
        ),
    ] {
        rows.push(Row::closed(name, "changes", 1, stats.clone()));
    }

    eprintln!("hc-bench: records per second from one partner");
    let published = publish_rate(&b, cfg.records, cfg.batch).await?;
    rows.push(Row::closed(
        format!(
            "PublishRecords, {} records per call, in sequence",
            cfg.batch
        ),
        "records",
        1,
        published.clone(),
    ));
    let single = publish_rate(&b, cfg.records.min(500), 1).await?;
    rows.push(Row::closed(
        "PublishRecords, 1 record per call",
        "records",
        1,
        single.clone(),
    ));
    a.stop().await;
    b.stop().await;

    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    let comparisons = vec![
        comparison(
            "records/s from one partner (batches) vs SM2 verifications/s (one per record)",
            &published,
            sm2_verify.per_second,
            "per second",
        ),
        (
            "propagation to the gateway p50: B over A's own".to_owned(),
            ms(remote_gateway.p50) / ms(local_gateway.p50).max(0.001),
            format!(
                "{:.1} ms vs {:.1} ms",
                ms(remote_gateway.p50),
                ms(local_gateway.p50)
            ),
        ),
        (
            "propagation to the gateway p99: B over A's own".to_owned(),
            ms(remote_gateway.p99) / ms(local_gateway.p99).max(0.001),
            format!(
                "{:.1} ms vs {:.1} ms",
                ms(remote_gateway.p99),
                ms(local_gateway.p99)
            ),
        ),
        (
            "propagation to B's gateway p50: beside a stalled partner over alone".to_owned(),
            ms(remote_gateway_stalled.p50) / ms(remote_gateway.p50).max(0.001),
            format!(
                "{:.1} ms vs {:.1} ms",
                ms(remote_gateway_stalled.p50),
                ms(remote_gateway.p50)
            ),
        ),
        (
            "propagation to B's gateway p99: beside a stalled partner over alone".to_owned(),
            ms(remote_gateway_stalled.p99) / ms(remote_gateway.p99).max(0.001),
            format!(
                "{:.1} ms vs {:.1} ms",
                ms(remote_gateway_stalled.p99),
                ms(remote_gateway.p99)
            ),
        ),
        (
            "propagation p50: B over A's own".to_owned(),
            ms(remote.p50) / ms(local.p50).max(0.001),
            format!("{:.1} ms vs {:.1} ms", ms(remote.p50), ms(local.p50)),
        ),
        (
            "propagation p99: B over A's own".to_owned(),
            ms(remote.p99) / ms(local.p99).max(0.001),
            format!("{:.1} ms vs {:.1} ms", ms(remote.p99), ms(local.p99)),
        ),
    ];
    Ok(Compared { rows, comparisons })
}

/// Times each person's color change in A (a close contact) until it is visible in A's
/// exchange, B's merged color, A's gateway and B's gateway, in that order of the result.
async fn propagation(a: &Province, b: &Province, persons: &[(String, String)]) -> [Stats; 4] {
    let mut recorders: [Recorder; 4] = std::array::from_fn(|_| Recorder::new());
    let started = Instant::now();
    for (ia, ib) in persons {
        if let Err(e) = close_contact(a, ia).await {
            for r in &mut recorders {
                r.record_error(e.clone());
            }
            continue;
        }
        let t0 = Instant::now();
        let mut seen: [Option<Duration>; 4] = [None; 4];
        while seen.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(30) {
            for (i, slot) in seen.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let red = match i {
                    0 => red(a, ia).await,
                    1 => red(b, ib).await,
                    2 => a.shows(ia).await == CodeColor::Red as i32,
                    _ => b.shows(ib).await == CodeColor::Red as i32,
                };
                if red {
                    *slot = Some(t0.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for (recorder, seen) in recorders.iter_mut().zip(seen) {
            match seen {
                Some(latency) => recorder.record(latency, Ok(1)),
                None => recorder.record_error("not visible within 30 s"),
            }
        }
    }
    let elapsed = started.elapsed();
    recorders.map(|r| r.into_stats(elapsed))
}

/// Registers a third province as a real-time partner of `a`, opens its two streams (its
/// limit) over mutual TLS and never reads them, then has `a` issue `records` records (one
/// person's alternating colors, issued directly), more than the streams' buffers and HTTP/2
/// windows hold, so that both stall. Returns the streams: the stall lasts while they are
/// held. B follows all of them and is waited for.
async fn stall_a_partner(
    a: &Province,
    records: u64,
) -> anyhow::Result<Vec<tonic::Streaming<pb::SubscribeResponse>>> {
    let key = SigningKey::generate(format!("exchange-{THIRD}-stalled"))?;
    register_province(
        &a.mesh,
        THIRD,
        pb::SyncMode::RealTime,
        &a.issued_to(THIRD).certificate_pem,
        &key,
    )
    .await?;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut client = a.partner_client(a.issued_to(THIRD)).await;
        streams.push(
            client
                .subscribe(pb::SubscribeRequest {
                    cursor: String::new(),
                })
                .await?
                .into_inner(),
        );
    }
    let filler = a.mesh.verified_person(9_999).await;
    let service = a.mesh.exchange.service();
    let issue =
        |n: u64| issue_alternating(service, &filler, n, [CodeColor::Yellow, CodeColor::Green]);
    issue(1).await.map_err(|e| anyhow::anyhow!("issue: {e}"))?;
    // What one record costs on a stream, to fill more than the client's HTTP/2 stream
    // window (hyper's default, 2 MiB) and the stream's 64-record buffer, with a margin.
    let latest = service
        .latest_sequence()
        .await
        .map_err(|e| anyhow::anyhow!("latest: {e}"))?;
    let item = service
        .issued_after(latest - 1, 1)
        .await
        .map_err(|e| anyhow::anyhow!("read: {e}"))?
        .pop()
        .map(|(sequence, record)| pb::SubscribeResponse {
            item: Some(pb::subscribe_response::Item::Record(record)),
            cursor: exchange::service::cursor(&a.code, sequence),
        })
        .ok_or_else(|| anyhow::anyhow!("no record issued"))?;
    let size = prost::Message::encoded_len(&item) as u64 + 9;
    let records = records.max((3 << 20) / size + 64);
    eprintln!(
        "hc-bench: {records} records of about {size} bytes ({:.1} MiB per stalled stream)",
        (records * size) as f64 / f64::from(1 << 20)
    );
    issue(records)
        .await
        .map_err(|e| anyhow::anyhow!("issue: {e}"))?;
    Ok(streams)
}

/// Registers a fresh partner (a third province) in `at`, then publishes `records` records
/// signed by it, `batch` per call, one call after the other (a partner's records go in
/// sequence order).
async fn publish_rate(at: &Province, records: usize, batch: usize) -> anyhow::Result<Stats> {
    let key = SigningKey::generate(format!(
        "bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))?;
    let partner_id = THIRD;
    let mut admin = at.mesh.exchange_client().await;
    let existing = admin
        .get_partner(authorized(
            pb::GetPartnerRequest {
                partner_id: partner_id.into(),
            },
            &at.admin(),
        ))
        .await;
    if existing.is_err() {
        register_province(
            &at.mesh,
            partner_id,
            pb::SyncMode::Manual,
            &at.issued_to(THIRD).certificate_pem,
            &key,
        )
        .await?;
    } else {
        admin
            .add_partner_key(authorized(
                pb::AddPartnerKeyRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    partner_id: partner_id.into(),
                    key: Some(public_key_of(&key)),
                },
                &at.admin(),
            ))
            .await?;
    }
    let from = at.status(partner_id).await.inbound_sequence + 1;
    let now = healthcode_proto::time::ts(chrono::Utc::now());
    let envelopes: Vec<SignedEnvelope> = (0..records as u64)
        .map(|i| {
            let record = pb::ExchangeRecord {
                issuing_province: partner_id.into(),
                sequence: from + i,
                pseudonym: format!("{:064x}", from + i),
                pseudonym_key_id: "national-1".into(),
                color: CodeColor::Yellow as i32,
                reason_codes: vec![ReasonCode::SecondaryContact as i32],
                rule_version: 1,
                valid_until: None,
                decided_at: Some(now),
            };
            exchange::records::seal(&key, &record)
                .map_err(|e| anyhow::anyhow!("seal: {e}"))
                .map(|s| s.envelope.unwrap_or_default())
        })
        .collect::<Result<_, _>>()?;
    let mut client = at.partner_client(at.issued_to(THIRD)).await;
    let mut recorder = Recorder::new();
    let started = Instant::now();
    for chunk in envelopes.chunks(batch.max(1)) {
        let t = Instant::now();
        let outcome = client
            .publish_records(pb::PublishRecordsRequest {
                records: chunk.to_vec(),
            })
            .await
            .map_err(crate::load::status)
            .and_then(|r| {
                let r = r.into_inner();
                match r.errors.first() {
                    Some(e) => Err(format!("{}: {}", e.reason, e.message)),
                    None => Ok(u64::from(r.accepted)),
                }
            });
        recorder.record(t.elapsed(), outcome);
    }
    Ok(recorder.into_stats(started.elapsed()))
}
