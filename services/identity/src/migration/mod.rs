//! The identity schema. One file per migration: the migration's name is its file name.

use sea_orm_migration::prelude::*;

mod m20261121_000001_identity;
mod m20261121_000300_exchange_pseudonyms;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_identity::Migration),
            Box::new(m20261121_000300_exchange_pseudonyms::Migration),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
        ]
    }
}
