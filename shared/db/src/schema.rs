//! Small builders for migrations, so every service declares its tables the same way.

use sea_orm_migration::prelude::*;

/// A NOT NULL column.
pub fn col(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name)).not_null().to_owned()
}

/// A nullable column.
pub fn null(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name)).null().to_owned()
}

/// A NOT NULL id column (UUIDs and other opaque ids, up to 64 characters).
pub fn id(name: &str) -> ColumnDef {
    col(name).string_len(64).to_owned()
}

/// A NOT NULL time stamp with time zone.
pub fn time(name: &str) -> ColumnDef {
    col(name).timestamp_with_time_zone().to_owned()
}

/// `CREATE TABLE IF NOT EXISTS name`.
pub fn table(name: &str) -> TableCreateStatement {
    let mut t = Table::create();
    t.table(Alias::new(name)).if_not_exists();
    t
}

/// Creates `(table, index name, columns, unique)` indexes if they do not exist.
pub async fn create_indexes(
    manager: &SchemaManager<'_>,
    indexes: &[(&str, &str, &[&str], bool)],
) -> Result<(), DbErr> {
    for (table, name, cols, unique) in indexes {
        let mut i = Index::create();
        i.if_not_exists().name(*name).table(Alias::new(*table));
        if *unique {
            i.unique();
        }
        for c in *cols {
            i.col(Alias::new(*c));
        }
        manager.create_index(i.to_owned()).await?;
    }
    Ok(())
}

/// Drops `tables` in reverse order, if they exist.
pub async fn drop_tables(manager: &SchemaManager<'_>, tables: &[&str]) -> Result<(), DbErr> {
    for t in tables.iter().rev() {
        manager
            .drop_table(Table::drop().table(Alias::new(*t)).if_exists().to_owned())
            .await?;
    }
    Ok(())
}
