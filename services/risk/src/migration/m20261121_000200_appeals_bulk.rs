//! Appeals, held bulk changes, and the `held_by` mark on facts a held bulk change holds back.

use super::m20261121_000001_risk::{bytes, index, int, table, text, text_null, ts, ts_null};
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Fact tables whose rows a held bulk change can hold back.
const HELD_TABLES: [&str; 3] = ["events", "risk_areas", "directives"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in HELD_TABLES {
            // One column per statement: SQLite alters one column at a time.
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(name))
                        .add_column(text_null("held_by", 36))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(index(name, &format!("{name}_held_by"), &["held_by"], false))
                .await?;
        }
        let tables = vec![
            table(
                "bulk_changes",
                &["bulk_change_id"],
                vec![
                    text("bulk_change_id", 36),
                    int("state"),
                    text("caused_by", 128),
                    ts("held_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "bulk_change_persons",
                &["bulk_change_id", "person_id"],
                vec![text("bulk_change_id", 36), text("person_id", 36)],
            ),
            table(
                "appeals",
                &["appeal_id"],
                vec![
                    text("appeal_id", 36),
                    text("person_id", 36),
                    int("state"),
                    int("channel"),
                    ts("submitted_at"),
                    // Stays known up to then no longer count for the person.
                    ts_null("stays_cleared_at"),
                    text_null("override_id", 36),
                    // The statement, sealed with SM4-GCM under `statement_key`.
                    text_null("statement_key", 64),
                    ColumnDef::new(Alias::new("statement_sealed"))
                        .binary()
                        .null()
                        .to_owned(),
                    bytes("payload"),
                ],
            ),
        ];
        for t in tables {
            manager.create_table(t).await?;
        }
        for i in [
            index(
                "bulk_changes",
                "bulk_changes_state",
                &["state", "held_at"],
                false,
            ),
            index("appeals", "appeals_person", &["person_id", "state"], false),
            index(
                "appeals",
                "appeals_state",
                &["state", "submitted_at"],
                false,
            ),
            index("appeals", "appeals_override", &["override_id"], false),
        ] {
            manager.create_index(i).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ["appeals", "bulk_change_persons", "bulk_changes"] {
            manager
                .drop_table(Table::drop().table(Alias::new(name)).to_owned())
                .await?;
        }
        for name in HELD_TABLES {
            manager
                .drop_index(
                    Index::drop()
                        .name(format!("{name}_held_by"))
                        .table(Alias::new(name))
                        .to_owned(),
                )
                .await?;
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(name))
                        .drop_column(Alias::new("held_by"))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
