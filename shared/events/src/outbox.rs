//! The outbox table every producing service carries in its own schema: a fact and its
//! event commit together or not at all.

use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, Set};

pub mod entity {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox")]
    pub struct Model {
        /// Relay order.
        #[sea_orm(primary_key)]
        pub seq: i64,
        /// The event id consumers deduplicate on.
        #[sea_orm(unique)]
        pub id: String,
        pub topic: String,
        pub key: String,
        pub payload: Vec<u8>,
        pub created_at: DateTimeUtc,
        pub published_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Records an event in the caller's transaction; returns its id.
pub async fn enqueue<C: ConnectionTrait>(
    db: &C,
    topic: &str,
    key: &str,
    payload: Vec<u8>,
) -> Result<String, DbErr> {
    let id = Uuid::now_v7().to_string();
    entity::Entity::insert(entity::ActiveModel {
        id: Set(id.clone()),
        topic: Set(topic.to_owned()),
        key: Set(key.to_owned()),
        payload: Set(payload),
        created_at: Set(chrono::Utc::now()),
        published_at: Set(None),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await?;
    Ok(id)
}

/// Records many events of one topic in the caller's transaction, in order, with
/// multi-row inserts; `events` are `(key, payload)` pairs. Returns their ids.
pub async fn enqueue_many<C: ConnectionTrait>(
    db: &C,
    topic: &str,
    events: Vec<(String, Vec<u8>)>,
) -> Result<Vec<String>, DbErr> {
    let now = chrono::Utc::now();
    let mut ids = Vec::with_capacity(events.len());
    let rows: Vec<entity::ActiveModel> = events
        .into_iter()
        .map(|(key, payload)| {
            let id = Uuid::now_v7().to_string();
            ids.push(id.clone());
            entity::ActiveModel {
                id: Set(id),
                topic: Set(topic.to_owned()),
                key: Set(key),
                payload: Set(payload),
                created_at: Set(now),
                published_at: Set(None),
                ..Default::default()
            }
        })
        .collect();
    for chunk in rows.chunks(1000) {
        entity::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(ids)
}

/// The migration that creates the outbox; each service lists it in its own migrator.
pub mod migration {
    use sea_orm_migration::prelude::*;

    pub struct CreateOutbox;

    impl MigrationName for CreateOutbox {
        fn name(&self) -> &str {
            "m20261121_000100_outbox"
        }
    }

    #[derive(Iden)]
    enum Outbox {
        Table,
        Seq,
        Id,
        Topic,
        Key,
        Payload,
        CreatedAt,
        PublishedAt,
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateOutbox {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(Outbox::Table)
                        .if_not_exists()
                        .col(
                            ColumnDef::new(Outbox::Seq)
                                .big_integer()
                                .not_null()
                                .auto_increment()
                                .primary_key(),
                        )
                        .col(
                            ColumnDef::new(Outbox::Id)
                                .string_len(36)
                                .not_null()
                                .unique_key(),
                        )
                        .col(ColumnDef::new(Outbox::Topic).string_len(64).not_null())
                        .col(ColumnDef::new(Outbox::Key).string_len(64).not_null())
                        .col(ColumnDef::new(Outbox::Payload).binary().not_null())
                        .col(
                            ColumnDef::new(Outbox::CreatedAt)
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .col(ColumnDef::new(Outbox::PublishedAt).timestamp_with_time_zone())
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .if_not_exists()
                        .name("outbox_unpublished")
                        .table(Outbox::Table)
                        .col(Outbox::PublishedAt)
                        .col(Outbox::Seq)
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .drop_table(Table::drop().table(Outbox::Table).to_owned())
                .await
        }
    }
}
