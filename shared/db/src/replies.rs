//! The stored answers of retry-safe calls: a call's effects and its reply commit together,
//! so a retry after a crash or a lost response gets the first answer and changes nothing.

use prost::Message;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, Set};

pub mod entity {
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

/// Stores `answer` under `key` in the caller's transaction. False when a concurrent retry
/// stored its answer first: the caller then rolls back and answers with [`load`].
pub async fn store<C: ConnectionTrait, M: Message>(
    db: &C,
    key: &str,
    answer: &M,
) -> Result<bool, DbErr> {
    let inserted = entity::Entity::insert(entity::ActiveModel {
        key: Set(key.to_owned()),
        payload: Set(answer.encode_to_vec()),
        created_at: Set(chrono::Utc::now()),
    })
    .on_conflict(
        OnConflict::column(entity::Column::Key)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(inserted > 0)
}

/// The answer stored under `key`, if any.
pub async fn load<C: ConnectionTrait, M: Message + Default>(
    db: &C,
    key: &str,
) -> Result<Option<M>, DbErr> {
    let found = entity::Entity::find_by_id(key.to_owned()).one(db).await?;
    found
        .map(|r| M::decode(&r.payload[..]).map_err(|e| DbErr::Custom(format!("stored reply: {e}"))))
        .transpose()
}

/// A transaction that will write. On SQLite it takes the write lock first: a deferred
/// transaction that reads and then writes fails with "busy" when another connection
/// committed in between.
pub async fn begin_write(
    db: &sea_orm::DatabaseConnection,
) -> Result<sea_orm::DatabaseTransaction, DbErr> {
    use sea_orm::TransactionTrait;
    let txn = db.begin().await?;
    if txn.get_database_backend() == sea_orm::DbBackend::Sqlite {
        txn.execute_unprepared("UPDATE replies SET key = key WHERE 1 = 0")
            .await?;
    }
    Ok(txn)
}

/// Stores `answer` under `key` and commits. When a concurrent retry stored its answer first,
/// rolls back and returns that one: either way every caller gets the same answer.
pub async fn commit_with<M: Message + Default>(
    db: &sea_orm::DatabaseConnection,
    txn: sea_orm::DatabaseTransaction,
    key: &str,
    answer: M,
) -> Result<M, DbErr> {
    if !store(&txn, key, &answer).await? {
        txn.rollback().await?;
        return load(db, key)
            .await?
            .ok_or_else(|| DbErr::Custom("stored reply vanished".into()));
    }
    txn.commit().await?;
    Ok(answer)
}

/// The migration that creates the table, for services that list it in their migrator.
pub mod migration {
    use sea_orm_migration::prelude::*;

    pub struct CreateReplies;

    impl MigrationName for CreateReplies {
        fn name(&self) -> &str {
            "m20261121_000090_replies"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateReplies {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(Alias::new("replies"))
                        .if_not_exists()
                        .col(
                            ColumnDef::new(Alias::new("key"))
                                .string_len(300)
                                .not_null()
                                .primary_key(),
                        )
                        .col(ColumnDef::new(Alias::new("payload")).binary().not_null())
                        .col(
                            ColumnDef::new(Alias::new("created_at"))
                                .timestamp_with_time_zone()
                                .not_null(),
                        )
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .drop_table(Table::drop().table(Alias::new("replies")).to_owned())
                .await
        }
    }
}
