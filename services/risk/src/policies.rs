//! The province's policy versions, held in memory and reloaded from the database, so that
//! a version takes effect at its time on every replica without a deploy.

use crate::domain::policy::default_policy;
use crate::domain::time::{Time, from_proto};
use crate::store::entities::policy;
use healthcode_proto::risk::v1::Policy;
use prost::Message;
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, Set};
use std::sync::{Arc, RwLock};

pub struct PolicyBook {
    province: String,
    /// Ascending by version.
    versions: RwLock<Vec<Arc<Policy>>>,
}

impl PolicyBook {
    pub fn new(province: &str) -> Self {
        PolicyBook {
            province: province.to_owned(),
            versions: RwLock::new(Vec::new()),
        }
    }

    pub fn province(&self) -> &str {
        &self.province
    }

    /// The version in force at `now`: the highest whose `effective_from` has come.
    pub fn in_force(&self, now: Time) -> Arc<Policy> {
        let versions = self.versions.read().unwrap_or_else(|p| p.into_inner());
        versions
            .iter()
            .rev()
            .find(|p| {
                p.effective_from
                    .as_ref()
                    .and_then(from_proto)
                    .is_some_and(|from| from <= now)
            })
            .cloned()
            .unwrap_or_else(|| Arc::new(default_policy(&self.province, now)))
    }

    pub fn all(&self) -> Vec<Arc<Policy>> {
        self.versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, version: u32) -> Option<Arc<Policy>> {
        self.all().into_iter().find(|p| p.version == version)
    }

    /// Seeds version 1 (the default policy) for a province that has none.
    pub async fn seed<C: ConnectionTrait>(&self, db: &C, epoch: Time) -> Result<(), DbErr> {
        let existing = policy::Entity::find()
            .filter(policy::Column::ProvinceCode.eq(&self.province))
            .one(db)
            .await?;
        if existing.is_none() {
            let p = default_policy(&self.province, epoch);
            let inserted = policy::Entity::insert(policy::ActiveModel {
                province_code: Set(self.province.clone()),
                version: Set(1),
                effective_from: Set(epoch),
                payload: Set(p.encode_to_vec()),
                published_at: Set(epoch),
            })
            .exec_without_returning(db)
            .await;
            // Another replica seeded it first.
            if let Err(err) = inserted
                && !healthcode_db::is_unique_violation(&err)
            {
                return Err(err);
            }
        }
        self.reload(db).await
    }

    pub async fn reload<C: ConnectionTrait>(&self, db: &C) -> Result<(), DbErr> {
        let rows = policy::Entity::find()
            .filter(policy::Column::ProvinceCode.eq(&self.province))
            .order_by_asc(policy::Column::Version)
            .all(db)
            .await?;
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            let p = Policy::decode(&row.payload[..])
                .map_err(|e| DbErr::Custom(format!("stored policy unreadable: {e}")))?;
            versions.push(Arc::new(p));
        }
        *self.versions.write().unwrap_or_else(|p| p.into_inner()) = versions;
        Ok(())
    }
}
