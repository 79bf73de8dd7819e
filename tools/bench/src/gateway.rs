//! The gateway's RPCs under load, against the whole mesh started in this process on the
//! machine's PostgreSQL and Redis (load generator included, as in production tests of a
//! single node), with the baselines measured in the same run.

use crate::baselines;
use crate::load::{self, Stats};
use crate::report::Row;
use healthcode_auth::roles;
use healthcode_proto::common::v1::PersonRef;
use healthcode_proto::gateway::v1 as gw;
use healthcode_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use healthcode_proto::identity::v1::MaskedPerson;
use healthcode_proto::risk::v1::BatchGetColorsRequest;
use integration_tests::mesh::Mesh;
use integration_tests::{Backend, authorized};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

pub struct GatewayRun {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub persons: u32,
    pub batch: usize,
    pub connections: usize,
    pub redis_url: String,
    pub threads: usize,
}

/// Rows for the report, and the comparisons with the targets.
pub struct GatewayResults {
    pub rows: Vec<Row>,
    pub targets: Vec<(String, f64, f64, String)>,
}

fn pick<T>(items: &[T], index: u64) -> &T {
    &items[(index % items.len() as u64) as usize]
}

pub async fn run(cfg: GatewayRun) -> anyhow::Result<GatewayResults> {
    let mut rows = Vec::new();
    // Baselines first, in this run, on this machine.
    eprintln!("hc-bench: baselines");
    let echo = baselines::echo_row(
        &mut rows,
        cfg.concurrency,
        cfg.warmup,
        cfg.duration,
        cfg.connections,
    )
    .await?;
    let redis_get =
        baselines::redis_get(&cfg.redis_url, cfg.concurrency, cfg.warmup, cfg.duration).await?;
    rows.push(Row::closed(
        "baseline: Redis GET",
        "keys",
        cfg.concurrency,
        redis_get.clone(),
    ));
    let mget = baselines::redis_mget(
        &cfg.redis_url,
        1000,
        cfg.concurrency.min(8),
        cfg.warmup,
        cfg.duration,
    )
    .await?;
    rows.push(Row::closed(
        "baseline: Redis MGET x1000",
        "keys",
        cfg.concurrency.min(8),
        mget.clone(),
    ));
    let (threads, warmup, duration) = (cfg.threads, cfg.warmup, cfg.duration);
    let sm2 =
        tokio::task::spawn_blocking(move || baselines::sm2_verify_rate(threads, warmup, duration))
            .await??;
    rows.push(Row::threads(
        "baseline: SM2 verify",
        "verifications",
        threads,
        sm2.clone(),
    ));

    eprintln!("hc-bench: starting the mesh on PostgreSQL and Redis");
    let mesh = Mesh::start(Backend::Real, Some(cfg.redis_url.clone())).await;
    let results = scenarios(&cfg, &mesh, &mut rows).await;
    mesh.stop().await;
    let (show, scan, batch, half) = results?;

    let targets = vec![
        (
            "show my code (cache hit) / echo".to_owned(),
            show.per_second / echo.per_second.max(1.0),
            0.6,
            format!("{:.0} vs {:.0} calls/s", show.per_second, echo.per_second),
        ),
        (
            "batch check persons/s / Redis MGET keys/s".to_owned(),
            batch.per_second / mget.per_second.max(1.0),
            0.5,
            format!("{:.0} vs {:.0}", batch.per_second, mget.per_second),
        ),
        (
            "verify scan / SM2 verify".to_owned(),
            scan.per_second / sm2.per_second.max(1.0),
            0.75,
            format!("{:.0} vs {:.0} per s", scan.per_second, sm2.per_second),
        ),
        (
            "p99 at half load / (echo p99 + Redis p99), must be ≤ 2".to_owned(),
            half.p99.as_secs_f64() / (echo.p99 + redis_get.p99).as_secs_f64().max(1e-6),
            2.0,
            format!("{:?} vs {:?} + {:?}", half.p99, echo.p99, redis_get.p99),
        ),
    ];
    Ok(GatewayResults { rows, targets })
}

async fn scenarios(
    cfg: &GatewayRun,
    mesh: &Mesh,
    rows: &mut Vec<Row>,
) -> anyhow::Result<(Stats, Stats, Stats, Stats)> {
    eprintln!("hc-bench: {} verified persons", cfg.persons);
    let mut persons = Vec::new();
    for n in 0..cfg.persons {
        persons.push(mesh.verified_person(100_000 + n).await);
    }
    let persons = Arc::new(persons);
    let gateway: Arc<Vec<_>> = Arc::new(
        load::channels(mesh.gateway.local_addr(), cfg.connections)
            .await?
            .into_iter()
            .map(|c| GatewayServiceClient::new(c).max_decoding_message_size(64 * 1024 * 1024))
            .collect(),
    );
    let app = mesh.keys.app();

    // Show my code: every person once to warm the caches, then the loop.
    for id in persons.iter() {
        let mut client = gateway[0].clone();
        client
            .show_my_code(authorized(
                gw::ShowMyCodeRequest {
                    person: Some(PersonRef {
                        person_id: id.clone(),
                    }),
                    ..Default::default()
                },
                &app,
            ))
            .await?;
    }
    let show_call = {
        let (gateway, persons, app) = (gateway.clone(), persons.clone(), app.clone());
        move |index: u64| {
            let mut client = pick(&gateway, index).clone();
            let request = authorized(
                gw::ShowMyCodeRequest {
                    person: Some(PersonRef {
                        person_id: pick(&persons, index / 7).clone(),
                    }),
                    ..Default::default()
                },
                &app,
            );
            async move {
                client
                    .show_my_code(request)
                    .await
                    .map(|_| 1u64)
                    .map_err(load::status)
            }
        }
    };
    eprintln!("hc-bench: show my code");
    let show =
        load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, show_call.clone()).await;
    rows.push(Row::closed(
        "ShowMyCode (cache hit)",
        "calls",
        cfg.concurrency,
        show.clone(),
    ));

    eprintln!("hc-bench: show my code at half the maximum rate");
    let half_rate = (show.per_second / 2.0).max(1.0);
    let half = load::open_loop(half_rate, cfg.duration, cfg.concurrency * 4, show_call).await;
    rows.push(Row::open(
        "ShowMyCode at half the maximum",
        "calls",
        half_rate,
        half.clone(),
    ));

    // Verify a scan: fresh codes, one place, every scan recorded.
    let unit = "913300000000000001";
    let venue = mesh.keys.token(unit, &[roles::VENUE]);
    let place = gateway[0]
        .clone()
        .register_place(authorized(
            gw::RegisterPlaceRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                place: Some(gw::Place {
                    name: "Bench Mall".into(),
                    address: "1 Bench Road".into(),
                    division_code: "330106".into(),
                    checking_unit: "Bench Ltd".into(),
                    admits_up_to: healthcode_proto::common::v1::CodeColor::Yellow as i32,
                    ..Default::default()
                }),
            },
            &venue,
        ))
        .await?
        .into_inner();
    let mut codes = Vec::new();
    for id in persons.iter() {
        let mut client = gateway[0].clone();
        let code = client
            .show_my_code(authorized(
                gw::ShowMyCodeRequest {
                    person: Some(PersonRef {
                        person_id: id.clone(),
                    }),
                    ..Default::default()
                },
                &app,
            ))
            .await?
            .into_inner();
        codes.push(code.qr_payload);
    }
    let codes = Arc::new(codes);
    let scan_call = {
        let (gateway, codes, venue, place_code) = (
            gateway.clone(),
            codes.clone(),
            venue.clone(),
            place.place_code.clone(),
        );
        move |index: u64| {
            let mut client = pick(&gateway, index).clone();
            let request = authorized(
                gw::VerifyScanRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    qr_payload: pick(&codes, index).clone(),
                    place_code: place_code.clone(),
                    scanner_id: "bench".into(),
                },
                &venue,
            );
            async move {
                let reply = client
                    .verify_scan(request)
                    .await
                    .map_err(load::status)?
                    .into_inner();
                if reply.result == gw::ScanResult::Valid as i32 {
                    Ok(1)
                } else {
                    Err(format!("scan result {}", reply.result))
                }
            }
        }
    };
    eprintln!("hc-bench: verify scan");
    let scan_warmup = cfg.warmup.min(Duration::from_secs(2));
    let scan_duration = cfg.duration.min(Duration::from_secs(20));
    let scan = load::closed_loop(cfg.concurrency, scan_warmup, scan_duration, scan_call).await;
    rows.push(Row::closed(
        "VerifyScan (SM2 verify + scan record)",
        "scans",
        cfg.concurrency,
        scan.clone(),
    ));

    // Batch check: synthetic persons whose holder and color are in Redis (what a school
    // sees on its daily check), batches of `batch`.
    eprintln!("hc-bench: seeding {} persons for batch checks", cfg.batch);
    let ids: Vec<String> = (0..cfg.batch)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let holder = MaskedPerson {
        masked_name: "李*".into(),
        masked_document_number: "1****************X".into(),
        document_type: 1,
        verified: true,
        person: None,
    }
    .encode_to_vec();
    for id in &ids {
        mesh.backends
            .cache
            .set_if_newer(
                &::gateway::holders::holder_key(id),
                1,
                &holder,
                Some(Duration::from_secs(3600)),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut risk = mesh.risk_client().await;
    let internal = mesh.keys.token("bench", &[roles::INTERNAL]);
    for chunk in ids.chunks(1000) {
        risk.batch_get_colors(authorized(
            BatchGetColorsRequest {
                persons: chunk
                    .iter()
                    .map(|id| PersonRef {
                        person_id: id.clone(),
                    })
                    .collect(),
            },
            &internal,
        ))
        .await?;
    }
    let items: Arc<Vec<gw::BatchCheckItem>> = Arc::new(
        ids.iter()
            .enumerate()
            .map(|(i, id)| gw::BatchCheckItem {
                person: Some(PersonRef {
                    person_id: id.clone(),
                }),
                item_id: format!("s{i}"),
            })
            .collect(),
    );
    let checker = mesh
        .keys
        .token("913300000000000002", &[roles::BATCH_CHECKER]);
    let batch_call = {
        let (gateway, items, checker) = (gateway.clone(), items.clone(), checker.clone());
        move |index: u64| {
            let mut client = pick(&gateway, index).clone();
            let request = authorized(
                gw::BatchCheckRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    items: items.as_ref().clone(),
                },
                &checker,
            );
            async move {
                let reply = client
                    .batch_check(request)
                    .await
                    .map_err(load::status)?
                    .into_inner();
                if reply.errors.is_empty() {
                    Ok(reply.results.len() as u64)
                } else {
                    Err(format!("{} item errors", reply.errors.len()))
                }
            }
        }
    };
    eprintln!("hc-bench: batch check");
    let batch_concurrency = 2;
    let batch = load::closed_loop(batch_concurrency, cfg.warmup, cfg.duration, batch_call).await;
    rows.push(Row::closed(
        format!("BatchCheck x{}", cfg.batch),
        "persons",
        batch_concurrency,
        batch.clone(),
    ));
    Ok((show, scan, batch, half))
}
