//! The exchange service's tables: the partner registry and its keys, the records this
//! province issued (with the counter that numbers them without gaps), the records received
//! from partners, where the exchange with each partner stands, and stored replies.

use sea_orm_migration::prelude::*;

pub mod entities {
    pub mod partner {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "partners")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub partner_id: String,
            pub kind: i32,
            pub name: String,
            pub sync_mode: i32,
            pub certificate_pem: String,
            /// SHA-256 of the certificate's DER, lower-case hex: who is calling.
            #[sea_orm(unique)]
            pub certificate_sha256: String,
            pub endpoint: String,
            pub state: i32,
            pub registered_at: DateTimeUtc,
            pub updated_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod partner_key {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "partner_keys")]
        pub struct Model {
            /// Unique across the registry: a received envelope names its key by id alone.
            #[sea_orm(primary_key, auto_increment = false)]
            pub key_id: String,
            pub partner_id: String,
            /// SEC1 uncompressed point.
            pub public_key: Vec<u8>,
            pub added_at: DateTimeUtc,
            pub revoked_at: Option<DateTimeUtc>,
            pub revoke_reason: String,
            pub distrust_earlier: bool,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod counter {
        use sea_orm::entity::prelude::*;
        /// Numbers issued records: updated in the transaction that inserts them, so the
        /// row lock orders concurrent issuers and a rolled-back batch leaves no gap.
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "exchange_counters")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub name: String,
            pub value: i64,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod issued {
        use sea_orm::entity::prelude::*;
        /// A record this province issued: sequence 1, 2, 3... without gaps.
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "issued_records")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub sequence: i64,
            pub pseudonym: String,
            /// The encoded `SignedEnvelope`.
            pub envelope: Vec<u8>,
            pub decided_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod issued_person {
        use sea_orm::entity::prelude::*;
        /// The last color version of a person this province considered, and what its last
        /// record said, so that a redelivered or older event issues nothing.
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "issued_persons")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub person_id: String,
            pub version: i64,
            /// SM3 of what the last record stated (color, reasons, valid until).
            pub material: Vec<u8>,
            pub last_sequence: i64,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod inbound {
        use sea_orm::entity::prelude::*;
        /// A record received from a partner, as it arrived (the envelope is the truth).
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "inbound_records")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub province: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub sequence: i64,
            pub pseudonym: String,
            pub key_id: String,
            pub envelope: Vec<u8>,
            pub decided_at: DateTimeUtc,
            pub received_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod follow_lease {
        use sea_orm::entity::prelude::*;
        /// Which replica follows a real-time partner: one stream per partner, not one per
        /// replica.
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "follow_leases")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub partner_id: String,
            pub holder: String,
            pub expires_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod sync_state {
        use sea_orm::entity::prelude::*;
        /// Where the exchange with one partner stands. Inbound fields change in the same
        /// transaction as the records they cover.
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "sync_state")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub partner_id: String,
            /// The partner's records held without gap.
            pub inbound_sequence: i64,
            /// The partner's cursor after the last record held (its Subscribe/PullChanges).
            pub inbound_cursor: String,
            pub last_received_at: Option<DateTimeUtc>,
            pub inbound_lag_ms: i64,
            /// The last of this province's records the partner is known to hold.
            pub outbound_sequence: i64,
            pub last_contact_at: Option<DateTimeUtc>,
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
            Box::new(CreateExchange),
            Box::new(healthcode_db::replies::migration::CreateReplies),
            Box::new(CreateFollowLeases),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
        ]
    }
}

pub struct CreateExchange;

impl MigrationName for CreateExchange {
    fn name(&self) -> &str {
        "m20261121_000001_exchange"
    }
}

use healthcode_db::schema::{col, create_indexes, drop_tables, id, null, table as t, time};

const TABLES: [&str; 7] = [
    "partners",
    "partner_keys",
    "exchange_counters",
    "issued_records",
    "issued_persons",
    "inbound_records",
    "sync_state",
];

/// The counter row that numbers issued records.
pub const ISSUED_COUNTER: &str = "issued";

#[async_trait::async_trait]
impl MigrationTrait for CreateExchange {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            t("partners")
                .col(id("partner_id").primary_key())
                .col(col("kind").integer())
                .col(col("name").string_len(128))
                .col(col("sync_mode").integer())
                .col(col("certificate_pem").text())
                .col(col("certificate_sha256").string_len(64))
                .col(col("endpoint").string_len(256))
                .col(col("state").integer())
                .col(time("registered_at"))
                .col(time("updated_at"))
                .to_owned(),
            t("partner_keys")
                .col(id("key_id").primary_key())
                .col(id("partner_id"))
                .col(col("public_key").binary())
                .col(time("added_at"))
                .col(null("revoked_at").timestamp_with_time_zone())
                .col(col("revoke_reason").string_len(256))
                .col(col("distrust_earlier").boolean())
                .to_owned(),
            t("exchange_counters")
                .col(id("name").primary_key())
                .col(col("value").big_integer())
                .to_owned(),
            t("issued_records")
                .col(col("sequence").big_integer().primary_key())
                .col(col("pseudonym").string_len(64))
                .col(col("envelope").binary())
                .col(time("decided_at"))
                .to_owned(),
            t("issued_persons")
                .col(id("person_id").primary_key())
                .col(col("version").big_integer())
                .col(col("material").binary())
                .col(col("last_sequence").big_integer())
                .to_owned(),
            t("inbound_records")
                .col(id("province"))
                .col(col("sequence").big_integer())
                .col(col("pseudonym").string_len(64))
                .col(id("key_id"))
                .col(col("envelope").binary())
                .col(time("decided_at"))
                .col(time("received_at"))
                .primary_key(
                    Index::create()
                        .col(Alias::new("province"))
                        .col(Alias::new("sequence")),
                )
                .to_owned(),
            t("sync_state")
                .col(id("partner_id").primary_key())
                .col(col("inbound_sequence").big_integer())
                .col(col("inbound_cursor").string_len(256))
                .col(null("last_received_at").timestamp_with_time_zone())
                .col(col("inbound_lag_ms").big_integer())
                .col(col("outbound_sequence").big_integer())
                .col(null("last_contact_at").timestamp_with_time_zone())
                .to_owned(),
        ];
        for table in tables {
            manager.create_table(table).await?;
        }
        create_indexes(
            manager,
            &[
                (
                    "partners",
                    "partners_certificate",
                    &["certificate_sha256"],
                    true,
                ),
                (
                    "partner_keys",
                    "partner_keys_partner",
                    &["partner_id"],
                    false,
                ),
                ("issued_records", "issued_pseudonym", &["pseudonym"], false),
                (
                    "inbound_records",
                    "inbound_pseudonym",
                    &["pseudonym"],
                    false,
                ),
            ],
        )
        .await?;
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "INSERT INTO exchange_counters (name, value) VALUES ('{ISSUED_COUNTER}', 0)"
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_tables(manager, &TABLES).await
    }
}

pub struct CreateFollowLeases;

impl MigrationName for CreateFollowLeases {
    fn name(&self) -> &str {
        "m20261121_000002_follow_leases"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateFollowLeases {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                t("follow_leases")
                    .col(id("partner_id").primary_key())
                    .col(col("holder").string_len(128))
                    .col(time("expires_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_tables(manager, &["follow_leases"]).await
    }
}
