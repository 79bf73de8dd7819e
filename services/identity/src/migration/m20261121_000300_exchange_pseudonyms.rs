use sea_orm_migration::{prelude::*, schema::*};

/// Each person's national exchange pseudonym under each key id, so that other provinces'
/// records (which name persons only by pseudonym) find the persons registered here.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ExchangePseudonyms {
    Table,
    KeyId,
    Pseudonym,
    PersonId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ExchangePseudonyms::Table)
                    .if_not_exists()
                    .col(string_len(ExchangePseudonyms::KeyId, 64))
                    .col(string_len(ExchangePseudonyms::Pseudonym, 64))
                    .col(string_len(ExchangePseudonyms::PersonId, 36))
                    .primary_key(
                        Index::create()
                            .col(ExchangePseudonyms::KeyId)
                            .col(ExchangePseudonyms::Pseudonym)
                            .col(ExchangePseudonyms::PersonId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("exchange_pseudonyms_person")
                    .table(ExchangePseudonyms::Table)
                    .col(ExchangePseudonyms::PersonId)
                    .col(ExchangePseudonyms::KeyId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ExchangePseudonyms::Table).to_owned())
            .await
    }
}
