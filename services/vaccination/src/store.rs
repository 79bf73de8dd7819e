//! The vaccination service's tables: vaccines and their batches, sites and their workers'
//! keys, doses, late entries, certificates, booster schedules, stored replies and the
//! outbox of doses.

use sea_orm_migration::prelude::*;

pub mod entities {
    pub mod vaccine {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "vaccines")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub vaccine_id: String,
            #[sea_orm(unique)]
            pub approval_number: String,
            pub vaccine_type: i32,
            pub active: bool,
            /// The `Vaccine` message without its batches.
            pub payload: Vec<u8>,
            pub created_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod batch {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "batches")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub vaccine_id: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub batch_number: String,
            pub expires_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod site {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
        #[sea_orm(table_name = "sites")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub site_id: String,
            pub active: bool,
            pub lat: f64,
            pub lng: f64,
            pub division_code: String,
            /// The `VaccinationSite` message without its worker keys.
            pub payload: Vec<u8>,
            pub created_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod worker_key {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "worker_keys")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub key_id: String,
            pub site_id: String,
            pub worker_id: String,
            /// SEC1 uncompressed point.
            pub public_key: Vec<u8>,
            pub not_before: Option<DateTimeUtc>,
            pub not_after: Option<DateTimeUtc>,
            pub revoked_at: Option<DateTimeUtc>,
            pub revoke_reason: String,
            pub created_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod dose {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "doses")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub dose_id: String,
            pub person_id: String,
            pub vaccine_id: String,
            pub dose_number: i32,
            /// The dose number while the dose is not rejected, NULL after: unique per
            /// person, so a person has each dose number once.
            pub live_number: Option<i32>,
            pub state: i32,
            pub administered_at: DateTimeUtc,
            pub site_id: String,
            pub worker_key_id: String,
            /// The `Dose` message (with the worker's signed claims).
            pub payload: Vec<u8>,
            pub recorded_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod late_entry {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "late_entries")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub late_entry_id: String,
            pub person_id: String,
            pub site_id: String,
            pub state: i32,
            /// The dose number while pending, NULL once decided: one pending entry per dose.
            pub pending_number: Option<i32>,
            /// The `LateEntry` message without its evidence.
            pub payload: Vec<u8>,
            /// The evidence image, sealed (SM4-GCM) with `evidence_key_id`; emptied when
            /// the entry is decided.
            pub evidence: Vec<u8>,
            pub evidence_key_id: String,
            pub requested_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod certificate {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "certificates")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub certificate_id: String,
            pub person_id: String,
            pub kind: i32,
            pub issued_at: DateTimeUtc,
            pub revoked: bool,
            /// The issued certificate message, sealed with `key_id` (an international
            /// certificate holds the holder's Latin name and date of birth).
            pub sealed: Vec<u8>,
            pub key_id: String,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod booster {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "boosters")]
        pub struct Model {
            /// One schedule per person: the booster after their last completing dose.
            #[sea_orm(primary_key, auto_increment = false)]
            pub person_id: String,
            pub vaccine_id: String,
            pub last_dose_id: String,
            pub last_dose_number: i32,
            pub last_dose_at: DateTimeUtc,
            pub due_at: DateTimeUtc,
            /// The division of the last dose's site.
            pub division_code: String,
            /// Set once a reminder was produced for this booster.
            pub reminded_at: Option<DateTimeUtc>,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateVaccination),
            Box::new(healthcode_db::replies::migration::CreateReplies),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
        ]
    }
}

pub struct CreateVaccination;

impl MigrationName for CreateVaccination {
    fn name(&self) -> &str {
        "m20261121_000001_vaccination"
    }
}

use healthcode_db::schema::{col, create_indexes, drop_tables, id, null, table as t, time};

const TABLES: [&str; 8] = [
    "vaccines",
    "batches",
    "sites",
    "worker_keys",
    "doses",
    "late_entries",
    "certificates",
    "boosters",
];

#[async_trait::async_trait]
impl MigrationTrait for CreateVaccination {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            t("vaccines")
                .col(id("vaccine_id").primary_key())
                .col(col("approval_number").string_len(64).unique_key())
                .col(col("vaccine_type").integer())
                .col(col("active").boolean())
                .col(col("payload").binary())
                .col(time("created_at"))
                .to_owned(),
            t("batches")
                .col(id("vaccine_id"))
                .col(id("batch_number"))
                .col(time("expires_at"))
                .primary_key(
                    Index::create()
                        .col(Alias::new("vaccine_id"))
                        .col(Alias::new("batch_number")),
                )
                .to_owned(),
            t("sites")
                .col(id("site_id").primary_key())
                .col(col("active").boolean())
                .col(col("lat").double())
                .col(col("lng").double())
                .col(col("division_code").string_len(12))
                .col(col("payload").binary())
                .col(time("created_at"))
                .to_owned(),
            t("worker_keys")
                .col(id("key_id").primary_key())
                .col(id("site_id"))
                .col(id("worker_id"))
                .col(col("public_key").binary())
                .col(null("not_before").timestamp_with_time_zone())
                .col(null("not_after").timestamp_with_time_zone())
                .col(null("revoked_at").timestamp_with_time_zone())
                .col(col("revoke_reason").string_len(256))
                .col(time("created_at"))
                .to_owned(),
            t("doses")
                .col(id("dose_id").primary_key())
                .col(id("person_id"))
                .col(id("vaccine_id"))
                .col(col("dose_number").integer())
                .col(null("live_number").integer())
                .col(col("state").integer())
                .col(time("administered_at"))
                .col(id("site_id"))
                .col(id("worker_key_id"))
                .col(col("payload").binary())
                .col(time("recorded_at"))
                .to_owned(),
            t("late_entries")
                .col(id("late_entry_id").primary_key())
                .col(id("person_id"))
                .col(id("site_id"))
                .col(col("state").integer())
                .col(null("pending_number").integer())
                .col(col("payload").binary())
                .col(col("evidence").binary())
                .col(col("evidence_key_id").string_len(64))
                .col(time("requested_at"))
                .to_owned(),
            t("certificates")
                .col(id("certificate_id").primary_key())
                .col(id("person_id"))
                .col(col("kind").integer())
                .col(time("issued_at"))
                .col(col("revoked").boolean())
                .col(col("sealed").binary())
                .col(col("key_id").string_len(64))
                .to_owned(),
            t("boosters")
                .col(id("person_id").primary_key())
                .col(id("vaccine_id"))
                .col(id("last_dose_id"))
                .col(col("last_dose_number").integer())
                .col(time("last_dose_at"))
                .col(time("due_at"))
                .col(col("division_code").string_len(12))
                .col(null("reminded_at").timestamp_with_time_zone())
                .to_owned(),
        ];
        for table in tables {
            manager.create_table(table).await?;
        }
        create_indexes(
            manager,
            &[
                ("sites", "sites_location", &["lat", "lng"], false),
                ("worker_keys", "worker_keys_site", &["site_id"], false),
                // NULLs are distinct on both backends: rejected doses do not collide.
                (
                    "doses",
                    "doses_live_number",
                    &["person_id", "live_number"],
                    true,
                ),
                (
                    "doses",
                    "doses_person",
                    &["person_id", "dose_number"],
                    false,
                ),
                (
                    "late_entries",
                    "late_entries_pending",
                    &["person_id", "pending_number"],
                    true,
                ),
                (
                    "late_entries",
                    "late_entries_state",
                    &["state", "requested_at"],
                    false,
                ),
                (
                    "certificates",
                    "certificates_person",
                    &["person_id", "issued_at"],
                    false,
                ),
                ("boosters", "boosters_due", &["due_at"], false),
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_tables(manager, &TABLES).await
    }
}
