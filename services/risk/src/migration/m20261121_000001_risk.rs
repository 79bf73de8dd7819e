use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub(super) fn ts(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

pub(super) fn ts_null(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}

pub(super) fn text(name: &str, len: u32) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .string_len(len)
        .not_null()
        .to_owned()
}

pub(super) fn text_null(name: &str, len: u32) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .string_len(len)
        .null()
        .to_owned()
}

pub(super) fn int(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .integer()
        .not_null()
        .to_owned()
}

pub(super) fn bigint(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .big_integer()
        .not_null()
        .to_owned()
}

pub(super) fn bytes(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .binary()
        .not_null()
        .to_owned()
}

pub(super) fn table(name: &str, pk: &[&str], cols: Vec<ColumnDef>) -> TableCreateStatement {
    let mut t = Table::create();
    t.table(Alias::new(name)).if_not_exists();
    for mut c in cols {
        t.col(&mut c);
    }
    let mut key = Index::create();
    for col in pk {
        key.col(Alias::new(*col));
    }
    t.primary_key(&mut key);
    t.to_owned()
}

pub(super) fn index(table: &str, name: &str, cols: &[&str], unique: bool) -> IndexCreateStatement {
    let mut i = Index::create();
    i.if_not_exists().name(name).table(Alias::new(table));
    for col in cols {
        i.col(Alias::new(*col));
    }
    if unique {
        i.unique();
    }
    i.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = vec![
            table(
                "policies",
                &["province_code", "version"],
                vec![
                    text("province_code", 6),
                    int("version"),
                    ts("effective_from"),
                    bytes("payload"),
                    ts("published_at"),
                ],
            ),
            table(
                "events",
                &["event_id"],
                vec![
                    text("event_id", 128),
                    text("person_id", 36),
                    text("kind", 16),
                    ts("occurred_at"),
                    bytes("payload"),
                    ts("recorded_at"),
                ],
            ),
            table(
                "risk_areas",
                &["area_id"],
                vec![
                    text("area_id", 36),
                    int("level"),
                    ts("valid_from"),
                    ts_null("valid_until"),
                    ts_null("lifted_at"),
                    bytes("payload"),
                    ts("declared_at"),
                ],
            ),
            table(
                "directives",
                &["directive_id"],
                vec![
                    text("directive_id", 36),
                    text("person_id", 36),
                    int("kind"),
                    int("state"),
                    ts("starts_at"),
                    ts_null("ends_at"),
                    ts("issued_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "national_checks",
                &["check_id"],
                vec![
                    text("check_id", 36),
                    text("person_id", 36),
                    int("color"),
                    ts("checked_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "overrides",
                &["override_id"],
                vec![
                    text("override_id", 36),
                    int("state"),
                    ts("proposed_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "override_persons",
                &["override_id", "person_id"],
                vec![text("override_id", 36), text("person_id", 36)],
            ),
            table(
                "colors",
                &["person_id"],
                vec![
                    text("person_id", 36),
                    bigint("version"),
                    int("color"),
                    int("policy_version"),
                    ts_null("valid_until"),
                    ts("evaluated_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "color_history",
                &["person_id", "version"],
                vec![
                    text("person_id", 36),
                    bigint("version"),
                    ts("changed_at"),
                    bytes("payload"),
                ],
            ),
            table(
                "audit_entries",
                &["sequence"],
                vec![
                    bigint("sequence"),
                    ts("recorded_at"),
                    text("actor", 128),
                    int("action"),
                    text_null("person_id", 36),
                    bytes("payload"),
                    bytes("digest"),
                ],
            ),
            table(
                "replies",
                &["key"],
                vec![text("key", 300), bytes("payload"), ts("created_at")],
            ),
        ];
        for t in tables {
            manager.create_table(t).await?;
        }
        let indexes = vec![
            index(
                "events",
                "events_person",
                &["person_id", "occurred_at"],
                false,
            ),
            index("events", "events_kind", &["kind", "occurred_at"], false),
            index("directives", "directives_person", &["person_id"], false),
            index(
                "national_checks",
                "national_checks_person",
                &["person_id", "checked_at"],
                false,
            ),
            index(
                "override_persons",
                "override_persons_person",
                &["person_id"],
                false,
            ),
            index("colors", "colors_valid_until", &["valid_until"], false),
            index("colors", "colors_policy", &["policy_version"], false),
            index(
                "audit_entries",
                "audit_person",
                &["person_id", "sequence"],
                false,
            ),
            index("risk_areas", "risk_areas_valid", &["valid_from"], false),
        ];
        for i in indexes {
            manager.create_index(i).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [
            "replies",
            "audit_entries",
            "color_history",
            "colors",
            "override_persons",
            "overrides",
            "national_checks",
            "directives",
            "risk_areas",
            "events",
            "policies",
        ] {
            manager
                .drop_table(Table::drop().table(Alias::new(name)).to_owned())
                .await?;
        }
        Ok(())
    }
}
