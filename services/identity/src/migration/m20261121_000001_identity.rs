use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Persons {
    Table,
    Id,
    DocType,
    DocIndex,
    DocNumberCt,
    IssuingCountry,
    NameCt,
    EnglishNameCt,
    PhoneCt,
    GuardianId,
    Relationship,
    RequestId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum VerificationSteps {
    Table,
    PersonId,
    Step,
    State,
    Reason,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PhoneChallenges {
    Table,
    PersonId,
    PhoneCt,
    CodeMac,
    ExpiresAt,
    AttemptsLeft,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Reviews {
    Table,
    Id,
    PersonId,
    Step,
    Reason,
    State,
    CreatedAt,
    DecidedAt,
    DecidedBy,
    NoteCt,
    PassportPageCt,
    VisaPageCt,
    LiveImageCt,
}

#[derive(DeriveIden)]
enum SmsSends {
    Table,
    Id,
    PhoneIndex,
    PersonId,
    SentAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Personal fields are `*_ct` columns: `<key id>:<base64 of nonce||ciphertext||tag>`.
        manager
            .create_table(
                Table::create()
                    .table(Persons::Table)
                    .if_not_exists()
                    .col(string_len(Persons::Id, 36).primary_key())
                    .col(integer(Persons::DocType))
                    // HMAC-SM3 blind index of the document: the only way to find a person by it.
                    .col(string_len_uniq(Persons::DocIndex, 64))
                    .col(text(Persons::DocNumberCt))
                    .col(string_len(Persons::IssuingCountry, 3))
                    .col(text(Persons::NameCt))
                    .col(text_null(Persons::EnglishNameCt))
                    .col(text_null(Persons::PhoneCt))
                    .col(string_len_null(Persons::GuardianId, 36))
                    .col(integer_null(Persons::Relationship))
                    .col(string_len_null(Persons::RequestId, 64).unique_key())
                    .col(timestamp_with_time_zone(Persons::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Persons::Table, Persons::GuardianId)
                            .to(Persons::Table, Persons::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_persons_guardian")
                    .table(Persons::Table)
                    .col(Persons::GuardianId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(VerificationSteps::Table)
                    .if_not_exists()
                    .col(string_len(VerificationSteps::PersonId, 36))
                    .col(integer(VerificationSteps::Step))
                    .col(integer(VerificationSteps::State))
                    .col(string_len(VerificationSteps::Reason, 64))
                    .col(timestamp_with_time_zone(VerificationSteps::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(VerificationSteps::PersonId)
                            .col(VerificationSteps::Step),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(VerificationSteps::Table, VerificationSteps::PersonId)
                            .to(Persons::Table, Persons::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PhoneChallenges::Table)
                    .if_not_exists()
                    .col(string_len(PhoneChallenges::PersonId, 36).primary_key())
                    .col(text(PhoneChallenges::PhoneCt))
                    // HMAC-SM3 of the code bound to the person: the code itself is never stored.
                    .col(string_len(PhoneChallenges::CodeMac, 64))
                    .col(timestamp_with_time_zone(PhoneChallenges::ExpiresAt))
                    .col(integer(PhoneChallenges::AttemptsLeft))
                    .col(timestamp_with_time_zone(PhoneChallenges::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(PhoneChallenges::Table, PhoneChallenges::PersonId)
                            .to(Persons::Table, Persons::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Reviews::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Reviews::Id))
                    .col(string_len(Reviews::PersonId, 36))
                    .col(integer(Reviews::Step))
                    .col(string_len(Reviews::Reason, 64))
                    .col(integer(Reviews::State))
                    .col(timestamp_with_time_zone(Reviews::CreatedAt))
                    .col(timestamp_with_time_zone_null(Reviews::DecidedAt))
                    .col(text_null(Reviews::DecidedBy))
                    // Reviewers type free text, which may name people: sealed like the rest.
                    .col(text_null(Reviews::NoteCt))
                    // What the reviewer must see (passport pages, a doubtful live image),
                    // sealed, and deleted with the decision.
                    .col(text_null(Reviews::PassportPageCt))
                    .col(text_null(Reviews::VisaPageCt))
                    .col(text_null(Reviews::LiveImageCt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Reviews::Table, Reviews::PersonId)
                            .to(Persons::Table, Persons::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_reviews_state")
                    .table(Reviews::Table)
                    .col(Reviews::State)
                    .col(Reviews::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // Every code sent, by the phone's blind index: the rate limit's record when the
        // cache is away.
        manager
            .create_table(
                Table::create()
                    .table(SmsSends::Table)
                    .if_not_exists()
                    .col(big_pk_auto(SmsSends::Id))
                    .col(string_len(SmsSends::PhoneIndex, 64))
                    .col(string_len(SmsSends::PersonId, 36))
                    .col(timestamp_with_time_zone(SmsSends::SentAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sms_sends_phone")
                    .table(SmsSends::Table)
                    .col(SmsSends::PhoneIndex)
                    .col(SmsSends::SentAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sms_sends_person")
                    .table(SmsSends::Table)
                    .col(SmsSends::PersonId)
                    .col(SmsSends::SentAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            SmsSends::Table.into_iden(),
            Reviews::Table.into_iden(),
            PhoneChallenges::Table.into_iden(),
            VerificationSteps::Table.into_iden(),
            Persons::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
