//! The risk service's schema. Most rows carry their protobuf message as `payload` beside
//! the columns queries filter on, so the wire format is the stored format.

use sea_orm_migration::prelude::*;

mod m20261121_000001_risk;
mod m20261121_000200_appeals_bulk;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_risk::Migration),
            Box::new(healthcode_events::outbox::migration::CreateOutbox),
            Box::new(m20261121_000200_appeals_bulk::Migration),
        ]
    }
}
