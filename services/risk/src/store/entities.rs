//! Table mappings; `payload` columns hold the protobuf message of the row.

pub mod policy {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "policies")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub province_code: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i32,
        pub effective_from: DateTimeUtc,
        pub payload: Vec<u8>,
        pub published_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub event_id: String,
        pub person_id: String,
        pub kind: String,
        pub occurred_at: DateTimeUtc,
        pub payload: Vec<u8>,
        pub recorded_at: DateTimeUtc,
        /// The held bulk change that holds this fact back, if any.
        pub held_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod risk_area {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "risk_areas")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub area_id: String,
        pub level: i32,
        pub valid_from: DateTimeUtc,
        pub valid_until: Option<DateTimeUtc>,
        pub lifted_at: Option<DateTimeUtc>,
        pub payload: Vec<u8>,
        pub declared_at: DateTimeUtc,
        /// The held bulk change that holds this area back, if any.
        pub held_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod directive {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "directives")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub directive_id: String,
        pub person_id: String,
        pub kind: i32,
        pub state: i32,
        pub starts_at: DateTimeUtc,
        pub ends_at: Option<DateTimeUtc>,
        pub issued_at: DateTimeUtc,
        pub payload: Vec<u8>,
        /// The held bulk change that holds this directive back, if any.
        pub held_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod national_check {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "national_checks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub check_id: String,
        pub person_id: String,
        pub color: i32,
        pub checked_at: DateTimeUtc,
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod override_ {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "overrides")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub override_id: String,
        pub state: i32,
        pub proposed_at: DateTimeUtc,
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod override_person {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "override_persons")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub override_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub person_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod color {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "colors")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub person_id: String,
        pub version: i64,
        pub color: i32,
        pub policy_version: i32,
        pub valid_until: Option<DateTimeUtc>,
        pub evaluated_at: DateTimeUtc,
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod color_history {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "color_history")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub person_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        pub changed_at: DateTimeUtc,
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_entry {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_entries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        pub recorded_at: DateTimeUtc,
        pub actor: String,
        pub action: i32,
        pub person_id: Option<String>,
        pub payload: Vec<u8>,
        pub digest: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod reply {
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

pub mod bulk_change {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bulk_changes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub bulk_change_id: String,
        pub state: i32,
        /// Subject of the caller whose change was held; it may not approve it.
        pub caused_by: String,
        pub held_at: DateTimeUtc,
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod bulk_change_person {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bulk_change_persons")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub bulk_change_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub person_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod appeal {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "appeals")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub appeal_id: String,
        pub person_id: String,
        pub state: i32,
        pub channel: i32,
        pub submitted_at: DateTimeUtc,
        /// Set by a pre-review that found no overlap: stays known up to then no longer count.
        pub stays_cleared_at: Option<DateTimeUtc>,
        /// The override a manual correction proposed.
        pub override_id: Option<String>,
        /// Id of the `DATA_KEYS` key that sealed the statement.
        pub statement_key: Option<String>,
        /// The statement, SM4-GCM sealed (nonce || ciphertext || tag).
        pub statement_sealed: Option<Vec<u8>>,
        /// The `Appeal` message without its statement.
        pub payload: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
