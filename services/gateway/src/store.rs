//! The gateway's own tables: places and their retirements, check records, offline
//! credentials, replies of retry-safe calls, and the outbox of place visits.

use sea_orm_migration::prelude::*;

pub mod entities {
    pub mod place {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "places")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub place_code: String,
            pub checking_unit_code: String,
            pub division_code: String,
            pub active: bool,
            pub payload: Vec<u8>,
            pub registered_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod check_record {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "check_records")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub scan_id: String,
            pub person_id: String,
            pub checked_at: DateTimeUtc,
            pub payload: Vec<u8>,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod credential {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "offline_credentials")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub credential_id: String,
            pub person_id: String,
            pub color_version: i64,
            pub expires_at: DateTimeUtc,
            pub revoked: bool,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod place_retirement {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "place_retirements")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub place_code: String,
            pub retired_by: String,
            pub reason: String,
            pub retired_at: DateTimeUtc,
        }
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod reply {
        use sea_orm::entity::prelude::*;
        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "replies")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub key: String,
            pub payload: Vec<u8>,
            pub created_at: DateTimeUtc,
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
            Box::new(CreateGateway),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
            Box::new(RetirePlaces),
        ]
    }
}

pub struct CreateGateway;

impl MigrationName for CreateGateway {
    fn name(&self) -> &str {
        "m20261121_000001_gateway"
    }
}

fn col(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name)).not_null().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for CreateGateway {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            Table::create()
                .table(Alias::new("places"))
                .if_not_exists()
                .col(col("place_code").string_len(16).primary_key())
                .col(col("checking_unit_code").string_len(128))
                .col(col("division_code").string_len(12))
                .col(col("active").boolean())
                .col(col("payload").binary())
                .col(col("registered_at").timestamp_with_time_zone())
                .to_owned(),
            Table::create()
                .table(Alias::new("check_records"))
                .if_not_exists()
                .col(col("scan_id").string_len(36).primary_key())
                .col(col("person_id").string_len(36))
                .col(col("checked_at").timestamp_with_time_zone())
                .col(col("payload").binary())
                .to_owned(),
            Table::create()
                .table(Alias::new("offline_credentials"))
                .if_not_exists()
                .col(col("credential_id").string_len(36).primary_key())
                .col(col("person_id").string_len(36))
                .col(col("color_version").big_integer())
                .col(col("expires_at").timestamp_with_time_zone())
                .col(col("revoked").boolean())
                .to_owned(),
            Table::create()
                .table(Alias::new("replies"))
                .if_not_exists()
                .col(col("key").string_len(300).primary_key())
                .col(col("payload").binary())
                .col(col("created_at").timestamp_with_time_zone())
                .to_owned(),
        ];
        for t in tables {
            manager.create_table(t).await?;
        }
        for (table, name, cols) in [
            (
                "check_records",
                "check_records_person",
                vec!["person_id", "checked_at"],
            ),
            ("check_records", "check_records_time", vec!["checked_at"]),
            ("places", "places_unit", vec!["checking_unit_code"]),
            (
                "offline_credentials",
                "credentials_person",
                vec!["person_id"],
            ),
        ] {
            let mut i = Index::create();
            i.if_not_exists().name(name).table(Alias::new(table));
            for c in cols {
                i.col(Alias::new(c));
            }
            manager.create_index(i.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in ["replies", "offline_credentials", "check_records", "places"] {
            manager
                .drop_table(Table::drop().table(Alias::new(t)).to_owned())
                .await?;
        }
        Ok(())
    }
}

/// Who retired a place code and why, and places by division (listing filters on it).
pub struct RetirePlaces;

impl MigrationName for RetirePlaces {
    fn name(&self) -> &str {
        "m20261122_000001_place_retirements"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for RetirePlaces {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Alias::new("place_retirements"))
                    .if_not_exists()
                    .col(col("place_code").string_len(16).primary_key())
                    .col(col("retired_by").string_len(128))
                    .col(col("reason").text())
                    .col(col("retired_at").timestamp_with_time_zone())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("places_division")
                    .table(Alias::new("places"))
                    .col(Alias::new("division_code"))
                    .col(Alias::new("place_code"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("places_division")
                    .table(Alias::new("places"))
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(
                Table::drop()
                    .table(Alias::new("place_retirements"))
                    .to_owned(),
            )
            .await
    }
}
