//! A realistic set of testing institutions for development and benchmarks: spread around
//! the cities of a province the way sampling sites are (dense in city centres, thinning
//! outwards), each with half-hour slots through the working day. Deterministic for a seed,
//! and safe to run twice: institutions are keyed by licence number.

use crate::service::{derived_id, institution_row};
use crate::store::entities::{institution, slot};
use chrono::{DateTime, Duration, TimeZone, Utc};
use healthcode_proto::common::v1::GeoPoint;
use healthcode_proto::testing::v1::{Institution, InstitutionKind, OpeningHours, SampleKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::sea_query::OnConflict;
use sea_orm::{DatabaseConnection, DbErr, EntityTrait};

/// Cities of Zhejiang (330000) with their GB/T 2260 prefixes and centres; other provinces
/// get the same layout shifted, which is enough for load and search tests.
const CITIES: [(&str, &str, f64, f64); 11] = [
    ("杭州", "3301", 30.274, 120.155),
    ("宁波", "3302", 29.868, 121.544),
    ("温州", "3303", 27.994, 120.699),
    ("嘉兴", "3304", 30.746, 120.755),
    ("湖州", "3305", 30.894, 120.086),
    ("绍兴", "3306", 29.997, 120.582),
    ("金华", "3307", 29.079, 119.647),
    ("衢州", "3308", 28.970, 118.859),
    ("舟山", "3309", 29.985, 122.207),
    ("台州", "3310", 28.656, 121.421),
    ("丽水", "3311", 28.468, 119.923),
];

pub struct SeedPlan {
    pub count: usize,
    /// Days of slots from `from`'s local day.
    pub days: u32,
    pub capacity: u32,
    pub seed: u64,
    pub from: DateTime<Utc>,
}

/// Where institution `n` of the plan stands.
fn place(rng: &mut StdRng) -> (usize, GeoPoint, String) {
    let city = rng.random_range(0..CITIES.len());
    let (_, prefix, lat, lng) = CITIES[city];
    // Distance from the centre: most within 8 km, a tail to 40 km.
    let r_km = if rng.random_bool(0.7) {
        rng.random_range(0.0..8.0)
    } else {
        rng.random_range(8.0..40.0)
    };
    let angle = rng.random_range(0.0..std::f64::consts::TAU);
    let dlat = r_km * angle.sin() / 111.32;
    let dlng = r_km * angle.cos() / (111.32 * lat.to_radians().cos());
    let county = format!("{prefix}{:02}", rng.random_range(2..12));
    (
        city,
        GeoPoint {
            latitude: lat + dlat,
            longitude: lng + dlng,
        },
        county,
    )
}

/// Inserts the plan's institutions and slots; returns how many institutions are new.
pub async fn seed(db: &DatabaseConnection, plan: &SeedPlan) -> Result<usize, DbErr> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let day0 = {
        let local = plan.from + Duration::hours(8);
        let midnight = local.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default();
        Utc.from_utc_datetime(&midnight) - Duration::hours(8)
    };
    let mut created = 0;
    let mut institutions = Vec::new();
    let mut slots = Vec::new();
    for n in 0..plan.count {
        let (city, location, county) = place(&mut rng);
        let licence = format!("PDY{:04}{n:06}", plan.seed % 10_000);
        let institution_id = derived_id(&format!("seed-institution:{licence}"));
        let lab = rng.random_bool(0.2);
        let i = Institution {
            institution_id: institution_id.clone(),
            kind: if lab {
                InstitutionKind::SamplingSiteAndLaboratory as i32
            } else {
                InstitutionKind::SamplingSite as i32
            },
            name: format!("{}核酸采样点{n:04}", CITIES[city].0),
            address: format!("{}市第{}街道{}号", CITIES[city].0, n % 97 + 1, n % 300 + 1),
            location: Some(location),
            division_code: county,
            licence_number: licence,
            opening_hours: (1..=7)
                .map(|weekday| OpeningHours {
                    weekday,
                    opens_at_minute: 8 * 60,
                    closes_at_minute: 18 * 60,
                })
                .collect(),
            slot_length: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
            single_tube_price_fen: if rng.random_bool(0.5) { 0 } else { 1600 },
            pooled_price_fen: 0,
            pool_size: 10,
            public_phone: format!("0571-8{:07}", n),
            active: true,
            sample_kinds: vec![SampleKind::SingleTube as i32, SampleKind::Pooled as i32],
        };
        institutions.push(institution_row(&i));
        for day in 0..plan.days {
            for half_hour in 0..20 {
                let starts_at = day0
                    + Duration::days(i64::from(day))
                    + Duration::minutes(8 * 60 + 30 * half_hour);
                slots.push(slot::ActiveModel::from(slot::Model {
                    slot_id: derived_id(&format!("seed-slot:{institution_id}:{starts_at}")),
                    institution_id: institution_id.clone(),
                    starts_at,
                    ends_at: starts_at + Duration::minutes(30),
                    capacity: plan.capacity as i32,
                    booked: 0,
                }));
            }
        }
        if institutions.len() == 500 {
            created += flush(db, &mut institutions, &mut slots).await?;
        }
    }
    created += flush(db, &mut institutions, &mut slots).await?;
    Ok(created)
}

async fn flush(
    db: &DatabaseConnection,
    institutions: &mut Vec<institution::ActiveModel>,
    slots: &mut Vec<slot::ActiveModel>,
) -> Result<usize, DbErr> {
    let mut created = 0;
    if !institutions.is_empty() {
        created = institution::Entity::insert_many(std::mem::take(institutions))
            .on_conflict(
                OnConflict::column(institution::Column::LicenceNumber)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await? as usize;
    }
    for chunk in std::mem::take(slots).chunks(1000) {
        slot::Entity::insert_many(chunk.to_vec())
            .on_conflict(
                OnConflict::column(slot::Column::SlotId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    Ok(created)
}
