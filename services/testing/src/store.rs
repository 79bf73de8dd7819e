//! The testing service's tables: institutions and their slots, bookings and payments,
//! samples and their members, laboratory results and the reports they produce, retest
//! notices and the notifications sent for them, certificates, stored replies and the
//! outbox of results and notices.

use sea_orm_migration::prelude::*;

pub mod entities {
    pub mod institution {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
        #[sea_orm(table_name = "institutions")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub institution_id: String,
            #[sea_orm(unique)]
            pub licence_number: String,
            pub active: bool,
            pub lat: f64,
            pub lng: f64,
            pub division_code: String,
            /// The `Institution` message as last written.
            pub payload: Vec<u8>,
            pub updated_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod slot {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "slots")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub slot_id: String,
            pub institution_id: String,
            pub starts_at: DateTimeUtc,
            pub ends_at: DateTimeUtc,
            pub capacity: i32,
            pub booked: i32,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod booking {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "bookings")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub booking_id: String,
            pub person_id: String,
            pub institution_id: String,
            pub slot_id: String,
            pub sample_kind: i32,
            pub state: i32,
            /// The slot's local day while the booking is open (awaiting payment or
            /// confirmed), NULL after: unique per person, so one open booking a day.
            pub open_day: Option<String>,
            pub price_fen: i64,
            pub payment_due_at: Option<DateTimeUtc>,
            pub payment_id: Option<String>,
            pub place_code: String,
            pub retest_notice_id: Option<String>,
            pub created_at: DateTimeUtc,
            pub updated_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod payment {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "payments")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub payment_id: String,
            pub booking_id: String,
            #[sea_orm(unique)]
            pub idempotency_key: String,
            pub provider: i32,
            pub amount_fen: i64,
            pub state: i32,
            pub provider_transaction_id: String,
            pub decline_reason: String,
            /// JSON object of the provider's client parameters.
            pub client_parameters: String,
            pub created_at: DateTimeUtc,
            pub updated_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod payment_notification {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "payment_notifications")]
        pub struct Model {
            /// `<provider>:<notification id>`.
            #[sea_orm(primary_key, auto_increment = false)]
            pub key: String,
            pub payment_id: String,
            pub outcome: i32,
            pub received_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod sample {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "samples")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tube_id: String,
            pub institution_id: String,
            pub kind: i32,
            pub sampled_at: DateTimeUtc,
            /// Whether the institution gave the sampling time (else it is the recording
            /// time, and a laboratory's own sampling time is not checked against it).
            pub sampled_at_given: bool,
            pub recorded_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod sample_member {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "sample_members")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tube_id: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub person_id: String,
            pub position: i32,
            pub booking_id: Option<String>,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod lab_result {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "lab_results")]
        pub struct Model {
            /// `<laboratory id>:<result id>`.
            #[sea_orm(primary_key, auto_increment = false)]
            pub result_key: String,
            #[sea_orm(unique)]
            pub tube_id: String,
            pub laboratory_id: String,
            pub result: i32,
            /// SM3 of the uploaded `LabResult`: a re-upload must match it.
            pub digest: Vec<u8>,
            pub uploaded_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod report {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "reports")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub report_id: String,
            pub person_id: String,
            pub tube_id: String,
            pub result: i32,
            pub sample_kind: i32,
            pub sampled_at: DateTimeUtc,
            pub received_at: DateTimeUtc,
            pub reported_at: DateTimeUtc,
            pub sampling_institution_id: String,
            pub laboratory_id: String,
            pub retest_notice_id: Option<String>,
            pub created_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod retest_notice {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "retest_notices")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub notice_id: String,
            pub person_id: String,
            pub pool_tube_id: String,
            pub pool_report_id: String,
            pub state: i32,
            pub notified_at: DateTimeUtc,
            pub due_by: DateTimeUtc,
            pub booking_id: Option<String>,
            pub retest_report_id: Option<String>,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod sent_notification {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "sent_notifications")]
        pub struct Model {
            /// The retest notice it was sent for: sent once per notice.
            #[sea_orm(primary_key, auto_increment = false)]
            pub notice_id: String,
            pub person_id: String,
            pub channel: String,
            /// The notifier's message id.
            pub message_id: String,
            pub sent_at: DateTimeUtc,
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
            pub report_id: String,
            pub issued_at: DateTimeUtc,
            pub revoked: bool,
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
            Box::new(CreateTesting),
            Box::new(healthcode_db::replies::migration::CreateReplies),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
        ]
    }
}

pub struct CreateTesting;

impl MigrationName for CreateTesting {
    fn name(&self) -> &str {
        "m20261121_000001_testing"
    }
}

use healthcode_db::schema::{col, create_indexes, drop_tables, id, null, table as t, time};

const TABLES: [&str; 12] = [
    "institutions",
    "slots",
    "bookings",
    "payments",
    "payment_notifications",
    "samples",
    "sample_members",
    "lab_results",
    "reports",
    "retest_notices",
    "sent_notifications",
    "certificates",
];

#[async_trait::async_trait]
impl MigrationTrait for CreateTesting {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            t("institutions")
                .col(id("institution_id").primary_key())
                .col(col("licence_number").string_len(64).unique_key())
                .col(col("active").boolean())
                .col(col("lat").double())
                .col(col("lng").double())
                .col(col("division_code").string_len(12))
                .col(col("payload").binary())
                .col(time("updated_at"))
                .to_owned(),
            t("slots")
                .col(id("slot_id").primary_key())
                .col(id("institution_id"))
                .col(time("starts_at"))
                .col(time("ends_at"))
                .col(col("capacity").integer())
                .col(col("booked").integer())
                .to_owned(),
            t("bookings")
                .col(id("booking_id").primary_key())
                .col(id("person_id"))
                .col(id("institution_id"))
                .col(id("slot_id"))
                .col(col("sample_kind").integer())
                .col(col("state").integer())
                .col(null("open_day").string_len(10))
                .col(col("price_fen").big_integer())
                .col(null("payment_due_at").timestamp_with_time_zone())
                .col(null("payment_id").string_len(64))
                .col(col("place_code").string_len(16))
                .col(null("retest_notice_id").string_len(64))
                .col(time("created_at"))
                .col(time("updated_at"))
                .to_owned(),
            t("payments")
                .col(id("payment_id").primary_key())
                .col(id("booking_id"))
                .col(col("idempotency_key").string_len(128).unique_key())
                .col(col("provider").integer())
                .col(col("amount_fen").big_integer())
                .col(col("state").integer())
                .col(col("provider_transaction_id").string_len(128))
                .col(col("decline_reason").string_len(128))
                .col(col("client_parameters").text())
                .col(time("created_at"))
                .col(time("updated_at"))
                .to_owned(),
            t("payment_notifications")
                .col(col("key").string_len(200).primary_key())
                .col(id("payment_id"))
                .col(col("outcome").integer())
                .col(time("received_at"))
                .to_owned(),
            t("samples")
                .col(id("tube_id").primary_key())
                .col(id("institution_id"))
                .col(col("kind").integer())
                .col(time("sampled_at"))
                .col(col("sampled_at_given").boolean())
                .col(time("recorded_at"))
                .to_owned(),
            t("sample_members")
                .col(id("tube_id"))
                .col(id("person_id"))
                .col(col("position").integer())
                .col(null("booking_id").string_len(64))
                .primary_key(
                    Index::create()
                        .col(Alias::new("tube_id"))
                        .col(Alias::new("person_id")),
                )
                .to_owned(),
            t("lab_results")
                .col(col("result_key").string_len(140).primary_key())
                .col(id("tube_id").unique_key())
                .col(id("laboratory_id"))
                .col(col("result").integer())
                .col(col("digest").binary())
                .col(time("uploaded_at"))
                .to_owned(),
            t("reports")
                .col(id("report_id").primary_key())
                .col(id("person_id"))
                .col(id("tube_id"))
                .col(col("result").integer())
                .col(col("sample_kind").integer())
                .col(time("sampled_at"))
                .col(time("received_at"))
                .col(time("reported_at"))
                .col(id("sampling_institution_id"))
                .col(id("laboratory_id"))
                .col(null("retest_notice_id").string_len(64))
                .col(time("created_at"))
                .to_owned(),
            t("retest_notices")
                .col(id("notice_id").primary_key())
                .col(id("person_id"))
                .col(id("pool_tube_id"))
                .col(id("pool_report_id"))
                .col(col("state").integer())
                .col(time("notified_at"))
                .col(time("due_by"))
                .col(null("booking_id").string_len(64))
                .col(null("retest_report_id").string_len(64))
                .to_owned(),
            t("sent_notifications")
                .col(id("notice_id").primary_key())
                .col(id("person_id"))
                .col(col("channel").string_len(32))
                .col(col("message_id").string_len(128))
                .col(time("sent_at"))
                .to_owned(),
            t("certificates")
                .col(id("certificate_id").primary_key())
                .col(id("person_id"))
                .col(id("report_id"))
                .col(time("issued_at"))
                .col(col("revoked").boolean())
                .to_owned(),
        ];
        for table in tables {
            manager.create_table(table).await?;
        }
        let indexes: [(&str, &str, &[&str], bool); 10] = [
            ("institutions", "institutions_lat", &["lat", "lng"], false),
            // One slot per window start: concurrent SetSlots cannot both add a window.
            (
                "slots",
                "slots_institution",
                &["institution_id", "starts_at"],
                true,
            ),
            ("slots", "slots_start", &["starts_at"], false),
            // NULLs are distinct on both backends: only open bookings collide.
            (
                "bookings",
                "bookings_open_day",
                &["person_id", "open_day"],
                true,
            ),
            (
                "bookings",
                "bookings_person",
                &["person_id", "created_at"],
                false,
            ),
            (
                "bookings",
                "bookings_due",
                &["state", "payment_due_at"],
                false,
            ),
            (
                "payments",
                "payments_state",
                &["state", "updated_at"],
                false,
            ),
            (
                "reports",
                "reports_person",
                &["person_id", "sampled_at"],
                false,
            ),
            (
                "retest_notices",
                "notices_person",
                &["person_id", "state"],
                false,
            ),
            (
                "retest_notices",
                "notices_state",
                &["state", "notified_at"],
                false,
            ),
        ];
        create_indexes(manager, &indexes).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_tables(manager, &TABLES).await
    }
}
