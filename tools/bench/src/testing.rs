//! The testing service under load, against the whole mesh started in this process on the
//! machine's PostgreSQL and Redis, with its baselines measured in the same run:
//!
//! - results ingested per second through UploadResults in batches, beside a bare
//!   multi-row PostgreSQL insert of rows as wide as a report (the floor of durable ingest);
//! - bookings per second when every booker competes for a few hot slots, beside the gRPC
//!   echo of this machine;
//! - "near me" over the seeded province (3,000 institutions with two days of slots).

use crate::baselines;
use crate::load::{self, Stats};
use crate::report::{self, Compared, Row};
use healthcode_auth::roles;
use healthcode_proto::common::v1::{GeoPoint, NucleicAcidResult, PersonRef};
use healthcode_proto::testing::v1 as pb;
use healthcode_proto::testing::v1::testing_service_client::TestingServiceClient;
use integration_tests::mesh::Mesh;
use integration_tests::{Backend, authorized};
use sea_orm::{ConnectionTrait, Database, EntityTrait};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testing::store::entities::{sample, sample_member, slot};

pub struct TestingRun {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    pub redis_url: String,
    /// Results per UploadResults call, and calls made.
    pub batch: usize,
    pub batches: usize,
    pub institutions: usize,
}

fn minute_ago(minutes: i64) -> Option<prost_types::Timestamp> {
    let t = chrono::Utc::now().timestamp() - minutes * 60;
    Some(prost_types::Timestamp {
        seconds: t - t.rem_euclid(60),
        nanos: 0,
    })
}

/// The floor: `rows` rows as wide as a report, inserted 1,000 per statement, one
/// transaction per `batch`, `parallel` at a time, into a scratch database.
async fn postgres_insert_baseline(
    batch: usize,
    batches: usize,
    parallel: usize,
) -> anyhow::Result<Stats> {
    let url = integration_tests::fresh_postgres_database().await;
    let db = Database::connect(url.as_str()).await?;
    db.execute_unprepared(
        "CREATE TABLE floor (id text PRIMARY KEY, person text NOT NULL, tube text NOT NULL, \
         result int NOT NULL, kind int NOT NULL, sampled timestamptz NOT NULL, \
         received timestamptz NOT NULL, reported timestamptz NOT NULL, site text NOT NULL, \
         lab text NOT NULL, created timestamptz NOT NULL)",
    )
    .await?;
    let db = Arc::new(db);
    let stats = load::fixed(batches, parallel, move |_| {
        let db = db.clone();
        async move {
            let mut sql = String::with_capacity(batch * 260);
            let txn = sea_orm::TransactionTrait::begin(&*db)
                .await
                .map_err(|e| e.to_string())?;
            for chunk in 0..batch.div_ceil(1000) {
                sql.clear();
                sql.push_str("INSERT INTO floor VALUES ");
                for i in 0..1000.min(batch - chunk * 1000) {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!(
                        "('{}','{}','{}',1,1,now(),now(),now(),'{}','{}',now())",
                        uuid::Uuid::new_v4(),
                        uuid::Uuid::new_v4(),
                        uuid::Uuid::new_v4(),
                        uuid::Uuid::new_v4(),
                        uuid::Uuid::new_v4()
                    ));
                }
                txn.execute_unprepared(&sql)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            txn.commit().await.map_err(|e| e.to_string())?;
            Ok(batch as u64)
        }
    })
    .await;
    integration_tests::drop_test_database(&url).await;
    Ok(stats)
}

pub async fn run(cfg: TestingRun) -> anyhow::Result<Compared> {
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
    let floor = postgres_insert_baseline(cfg.batch, cfg.batches, 2).await?;
    rows.push(Row::closed(
        format!(
            "baseline: PostgreSQL multi-row insert, {} rows a transaction",
            cfg.batch
        ),
        "rows",
        2,
        floor.clone(),
    ));
    eprintln!("hc-bench: starting the mesh on PostgreSQL and Redis");
    let mesh = Mesh::start(Backend::Real, Some(cfg.redis_url.clone())).await;
    let measured = scenarios(&cfg, &mesh, &mut rows).await;
    mesh.stop().await;
    let (ingest, booking) = measured?;
    let comparisons = vec![
        report::comparison(
            "results ingested / bare PostgreSQL insert",
            &ingest,
            floor.per_second,
            "rows/s",
        ),
        report::comparison(
            "bookings under contention / echo",
            &booking,
            echo.per_second,
            "calls/s",
        ),
    ];
    Ok(Compared { rows, comparisons })
}

async fn scenarios(
    cfg: &TestingRun,
    mesh: &Mesh,
    rows: &mut Vec<Row>,
) -> anyhow::Result<(Stats, Stats)> {
    let clients: Arc<Vec<_>> = Arc::new(
        load::channels(mesh.testing.local_addr(), cfg.connections)
            .await?
            .into_iter()
            .map(|c| TestingServiceClient::new(c).max_decoding_message_size(64 * 1024 * 1024))
            .collect(),
    );
    let app = mesh.keys.app();
    let db = mesh.testing.db().clone();

    eprintln!("hc-bench: seeding {} institutions", cfg.institutions);
    let seeded = Instant::now();
    testing::seed::seed(
        &db,
        &testing::seed::SeedPlan {
            count: cfg.institutions,
            days: 2,
            capacity: 1_000_000,
            seed: 7,
            from: chrono::Utc::now(),
        },
    )
    .await?;
    eprintln!(
        "hc-bench: seeded in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let lab = testing::service::derived_id("seed-institution:PDY0007000000");
    let lab_token = mesh.keys.token(&lab, &[roles::LAB]);

    // Ingest: tubes recorded up front (straight into the table: the sampling side is not
    // what is measured), then UploadResults in batches, 1 % positive.
    let tubes = cfg.batch * cfg.batches;
    eprintln!("hc-bench: recording {tubes} samples");
    let sampled_at =
        chrono::DateTime::from_timestamp(minute_ago(120).map(|t| t.seconds).unwrap_or_default(), 0)
            .unwrap_or_default();
    for chunk in 0..tubes.div_ceil(1000) {
        let range = chunk * 1000..(chunk * 1000 + 1000).min(tubes);
        let samples = range.clone().map(|i| {
            sample::ActiveModel::from(sample::Model {
                tube_id: format!("B{i:08}"),
                institution_id: lab.clone(),
                kind: pb::SampleKind::SingleTube as i32,
                sampled_at,
                sampled_at_given: true,
                recorded_at: sampled_at,
            })
        });
        sample::Entity::insert_many(samples)
            .exec_without_returning(&db)
            .await?;
        let members = range.map(|i| {
            sample_member::ActiveModel::from(sample_member::Model {
                tube_id: format!("B{i:08}"),
                person_id: uuid::Uuid::new_v4().to_string(),
                position: 0,
                booking_id: None,
            })
        });
        sample_member::Entity::insert_many(members)
            .exec_without_returning(&db)
            .await?;
    }
    let batch = cfg.batch;
    let upload = {
        let (clients, lab_token) = (clients.clone(), lab_token.clone());
        move |b: usize| {
            let mut client = clients[b % clients.len()].clone();
            let results = (b * batch..(b + 1) * batch)
                .map(|i| pb::LabResult {
                    result_id: format!("R{i:08}"),
                    tube_id: format!("B{i:08}"),
                    result: if i % 100 == 0 {
                        NucleicAcidResult::Positive
                    } else {
                        NucleicAcidResult::Negative
                    } as i32,
                    sampled_at: minute_ago(120),
                    received_at: minute_ago(90),
                    reported_at: minute_ago(30),
                    ct_orf1ab: 0.0,
                    ct_n: 0.0,
                })
                .collect();
            let request = authorized(pb::UploadResultsRequest { results }, &lab_token);
            async move {
                let r = client
                    .upload_results(request)
                    .await
                    .map_err(load::status)?
                    .into_inner();
                if !r.errors.is_empty() {
                    return Err(format!(
                        "{} rejected: {}",
                        r.errors.len(),
                        r.errors[0].reason
                    ));
                }
                Ok(u64::from(r.accepted))
            }
        }
    };
    eprintln!("hc-bench: ingest {} batches of {}", cfg.batches, cfg.batch);
    let ingest = load::fixed(cfg.batches, 2, upload).await;
    rows.push(Row::closed(
        format!("UploadResults x{}", cfg.batch),
        "results",
        2,
        ingest.clone(),
    ));

    // Booking under contention: every booker a new person on one of 8 hot slots.
    let hot: Vec<String> = slot::Entity::find()
        .all(&db)
        .await?
        .into_iter()
        .filter(|s| s.starts_at > chrono::Utc::now() + chrono::Duration::minutes(5))
        .take(8)
        .map(|s| s.slot_id)
        .collect();
    anyhow::ensure!(!hot.is_empty(), "no future slot to book");
    let hot = Arc::new(hot);
    let book = {
        let (clients, app, hot) = (clients.clone(), app.clone(), hot.clone());
        move |i: u64| {
            let mut client = clients[(i as usize) % clients.len()].clone();
            let request = authorized(
                pb::CreateBookingRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    person: Some(PersonRef {
                        person_id: uuid::Uuid::new_v4().to_string(),
                    }),
                    slot_id: hot[(i as usize) % hot.len()].clone(),
                    sample_kind: pb::SampleKind::SingleTube as i32,
                    ..Default::default()
                },
                &app,
            );
            async move {
                client
                    .create_booking(request)
                    .await
                    .map(|_| 1u64)
                    .map_err(load::status)
            }
        }
    };
    eprintln!("hc-bench: bookings on {} hot slots", hot.len());
    let booking = load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, book).await;
    rows.push(Row::closed(
        format!("CreateBooking, {} hot slots", hot.len()),
        "bookings",
        cfg.concurrency,
        booking.clone(),
    ));

    // Near me: random points within 10 km of Hangzhou's centre, 5 km radius.
    let near = {
        let (clients, app) = (clients.clone(), app.clone());
        move |i: u64| {
            let mut client = clients[(i as usize) % clients.len()].clone();
            let a = (i as f64 * 2.399_963) % std::f64::consts::TAU;
            let r = (i % 97) as f64 / 97.0 * 0.09;
            let request = authorized(
                pb::SearchInstitutionsRequest {
                    near: Some(pb::search_institutions_request::Near::Location(GeoPoint {
                        latitude: 30.274 + r * a.sin(),
                        longitude: 120.155 + r * a.cos(),
                    })),
                    ..Default::default()
                },
                &app,
            );
            async move {
                client
                    .search_institutions(request)
                    .await
                    .map(|_| 1u64)
                    .map_err(load::status)
            }
        }
    };
    eprintln!("hc-bench: near me");
    let search = load::closed_loop(cfg.concurrency, cfg.warmup, cfg.duration, near).await;
    rows.push(Row::closed(
        format!("SearchInstitutions 5 km, {} institutions", cfg.institutions),
        "searches",
        cfg.concurrency,
        search,
    ));
    Ok((ingest, booking))
}
