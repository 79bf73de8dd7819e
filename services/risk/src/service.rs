//! The risk service's operations. Every change follows one path: lock the persons (in a
//! fixed order), record the facts, re-evaluate, write colors + history + outbox event,
//! append the audit entries (last, so the chain lock is held briefly), commit, then write
//! the color cache through.

use crate::domain::evaluate::{Evaluation, evaluate};
use crate::domain::policy::bulk_threshold;
use crate::domain::time::{Time, opt_to_proto, to_proto};
use crate::policies::PolicyBook;
use crate::store::entities::*;
use crate::store::{self, Store, lock_key, reply_get, reply_put};
use healthcode_cache::{COLOR_TTL, SharedCache, color_key};
use healthcode_crypto::FieldCipher;
pub use healthcode_db::db_error;
use healthcode_errors::ServiceError;
use healthcode_events::Relay;
use healthcode_events::outbox;
use healthcode_proto::common::v1::{CodeColor, PersonRef};
use healthcode_proto::risk::v1 as pb;
use pb::{AuditAction, ChangeCause};
use prost::Message;
use sea_orm::{DatabaseTransaction, DbErr, EntityTrait, QueryOrder, Set, TransactionTrait};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The topic color changes are published on (the gateway and the exchange consume it).
pub const COLOR_TOPIC: &str = "risk.color_changed";

/// Who is acting, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    pub subject: String,
    pub roles: Vec<String>,
}

impl Actor {
    pub fn system() -> Self {
        Actor {
            subject: "system".into(),
            roles: Vec::new(),
        }
    }
}

/// Why a re-evaluation happens.
#[derive(Clone)]
pub struct Cause<'a> {
    pub actor: &'a Actor,
    pub cause: ChangeCause,
    pub request_id: &'a str,
    pub reason: &'a str,
    pub subject_id: &'a str,
}

pub struct Risk {
    store: Store,
    cache: SharedCache,
    relay: Relay,
    policies: Arc<PolicyBook>,
    cipher: Arc<FieldCipher>,
}

/// What one person's re-evaluation produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub color: pb::PersonColor,
    /// The color before (unspecified for a first evaluation).
    pub from: i32,
    /// A new version was written.
    pub changed: bool,
    /// A change waiting for double confirmation started with this evaluation.
    pub pending_started: bool,
}

impl Outcome {
    /// Whether the color a person shows moves, or a change of it starts waiting for
    /// confirmation (a first green is not a move).
    pub fn moves(&self) -> bool {
        let moved = self.from != self.color.color
            && !(self.from == CodeColor::Unspecified as i32
                && self.color.color == CodeColor::Green as i32);
        moved || self.pending_started
    }

    /// The color it moves to: the shown one, or the one a started pending change proposes.
    fn to_color(&self) -> i32 {
        match &self.color.pending {
            Some(p) if self.pending_started && self.from == self.color.color => p.proposed_color,
            _ => self.color.color,
        }
    }
}

/// What a change did: the outcomes it applied, or the bulk change that holds them back.
pub struct Applied {
    pub outcomes: Vec<Outcome>,
    pub held: Option<pb::BulkChange>,
}

/// The topic alerts go out on (held bulk changes), for the operators' alerting.
pub const ALERT_TOPIC: &str = "risk.alert";

/// Each directive that waits for the national check (payload `Directive` with its id,
/// person, state and issue time only; keyed by person): the exchange asks its
/// national-check partners and records the answer here.
pub const CONFIRMATION_TOPIC: &str = "risk.directive_pending";

fn person_ref(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

pub(crate) fn snapshot(c: &pb::PersonColor) -> pb::ColorSnapshot {
    pb::ColorSnapshot {
        color: c.color,
        reasons: c.reasons.clone(),
        valid_until: c.valid_until,
        version: c.version,
    }
}

/// The parts of a color a person or a verifier sees; a change in any is a new version.
fn visible(c: &pb::PersonColor) -> pb::PersonColor {
    pb::PersonColor {
        person: c.person.clone(),
        color: c.color,
        reasons: c.reasons.clone(),
        valid_until: c.valid_until,
        pending: c.pending.clone().map(|mut p| {
            p.change_id.clear();
            p
        }),
        overridden: c.overridden,
        local: c.local.clone(),
        ..Default::default()
    }
}

fn audit(
    cause: &Cause<'_>,
    action: AuditAction,
    person: Option<&str>,
    policy_version: u32,
) -> pb::AuditEntry {
    pb::AuditEntry {
        actor: cause.actor.subject.clone(),
        actor_roles: cause.actor.roles.clone(),
        action: action as i32,
        person: person.and_then(person_ref),
        reason: cause.reason.to_owned(),
        policy_version,
        subject_id: cause.subject_id.to_owned(),
        request_id: cause.request_id.to_owned(),
        ..Default::default()
    }
}

/// Appends entries to the hash-chained audit trail. Callers append last in their
/// transaction: the chain is one lock for the whole service.
pub async fn append_audit(
    txn: &DatabaseTransaction,
    entries: Vec<pb::AuditEntry>,
    now: Time,
) -> Result<(), DbErr> {
    if entries.is_empty() {
        return Ok(());
    }
    lock_key(txn, "risk:audit-chain").await?;
    let last = audit_entry::Entity::find()
        .order_by_desc(audit_entry::Column::Sequence)
        .one(txn)
        .await?;
    let (mut sequence, mut previous) = last
        .map(|l| (l.sequence, l.digest))
        .unwrap_or((0, Vec::new()));
    for mut entry in entries {
        sequence += 1;
        entry.sequence = sequence as u64;
        entry.recorded_at = Some(to_proto(now));
        entry.previous_digest = previous.clone();
        entry.digest = Vec::new();
        // The stored bytes are exactly the bytes digested: a re-encoding after decoding
        // need not match them (protobuf maps have no fixed order).
        let payload = entry.encode_to_vec();
        let digest = chain_digest(&previous, &payload);
        audit_entry::Entity::insert(audit_entry::ActiveModel {
            sequence: Set(sequence),
            recorded_at: Set(now),
            actor: Set(entry.actor.clone()),
            action: Set(entry.action),
            person_id: Set(entry.person.as_ref().map(|p| p.person_id.clone())),
            payload: Set(payload),
            digest: Set(digest.clone()),
        })
        .exec_without_returning(txn)
        .await?;
        previous = digest;
    }
    Ok(())
}

/// SM3 over the previous digest and the entry as stored (its own digest left empty).
pub fn chain_digest(previous: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = previous.to_vec();
    bytes.extend_from_slice(payload);
    healthcode_crypto::sm3_digest(&bytes).to_vec()
}

impl Risk {
    pub fn new(
        store: Store,
        cache: SharedCache,
        relay: Relay,
        policies: Arc<PolicyBook>,
        cipher: Arc<FieldCipher>,
    ) -> Self {
        Risk {
            store,
            cache,
            relay,
            policies,
            cipher,
        }
    }

    /// Seals free text people write (appeal statements) at rest.
    pub fn cipher(&self) -> &FieldCipher {
        &self.cipher
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn policies(&self) -> &PolicyBook {
        &self.policies
    }

    fn to_color(
        &self,
        person_id: &str,
        eval: &Evaluation,
        policy: &pb::Policy,
        now: Time,
    ) -> pb::PersonColor {
        pb::PersonColor {
            person: person_ref(person_id),
            color: eval.color as i32,
            reasons: eval.reasons.clone(),
            valid_until: opt_to_proto(eval.valid_until),
            version: 0,
            changed_at: Some(to_proto(now)),
            evaluated_at: Some(to_proto(now)),
            province_code: self.policies.province().to_owned(),
            policy_version: policy.version,
            pending: eval.pending.as_ref().map(|p| pb::PendingColorChange {
                change_id: p.change_id.clone(),
                proposed_color: p.proposed_color as i32,
                reasons: p.reasons.clone(),
                received: p.received as i32,
                awaiting: p.awaiting as i32,
                proposed_at: Some(to_proto(p.proposed_at)),
                expires_at: Some(to_proto(p.expires_at)),
            }),
            clearance: eval.clearance,
            overridden: eval.overridden,
            local: eval.local.as_ref().map(|l| pb::LocalDecision {
                color: l.color as i32,
                reasons: l.reasons.clone(),
                valid_until: opt_to_proto(l.valid_until),
            }),
        }
    }

    /// Locks `persons` (sorted, so two multi-person writers never deadlock).
    async fn lock_persons(
        txn: &DatabaseTransaction,
        persons: &BTreeSet<String>,
    ) -> Result<(), DbErr> {
        for p in persons {
            lock_key(txn, &format!("risk:person:{p}")).await?;
        }
        Ok(())
    }

    /// Re-evaluates locked persons inside the caller's transaction; audit entries for
    /// color changes are added to `audits`.
    async fn reevaluate_locked(
        &self,
        txn: &DatabaseTransaction,
        persons: &BTreeSet<String>,
        cause: &Cause<'_>,
        now: Time,
        audits: &mut Vec<pb::AuditEntry>,
    ) -> Result<Vec<Outcome>, DbErr> {
        let policy = self.policies.in_force(now);
        let horizon = now - chrono::Duration::days(store::RETENTION_DAYS);
        let areas = store::load_areas(txn, horizon).await?;
        let mut out = Vec::with_capacity(persons.len());
        for person_id in persons {
            let facts = store::load_facts(txn, person_id, &areas).await?;
            let eval = evaluate(&policy, &facts, now);
            let mut next = self.to_color(person_id, &eval, &policy, now);
            let current = color::Entity::find_by_id(person_id.clone())
                .one(txn)
                .await?;
            let previous = match &current {
                Some(row) => Some(
                    pb::PersonColor::decode(&row.payload[..])
                        .map_err(|e| DbErr::Custom(format!("stored color unreadable: {e}")))?,
                ),
                None => None,
            };
            let changed = previous
                .as_ref()
                .is_none_or(|prev| visible(prev) != visible(&next));
            match &previous {
                Some(prev) if !changed => {
                    next.version = prev.version;
                    next.changed_at = prev.changed_at;
                }
                Some(prev) => next.version = prev.version + 1,
                None => next.version = 1,
            }
            let model = color::ActiveModel {
                person_id: Set(person_id.clone()),
                version: Set(next.version as i64),
                color: Set(next.color),
                policy_version: Set(next.policy_version as i32),
                valid_until: Set(eval.valid_until),
                evaluated_at: Set(now),
                payload: Set(next.encode_to_vec()),
            };
            if current.is_some() {
                color::Entity::update(model).exec(txn).await?;
            } else {
                color::Entity::insert(model)
                    .exec_without_returning(txn)
                    .await?;
            }
            if changed {
                self.record_change(txn, previous.as_ref(), &next, cause, now, audits)
                    .await?;
            }
            let pending_started =
                next.pending.is_some() && previous.as_ref().is_none_or(|p| p.pending.is_none());
            out.push(Outcome {
                pending_started,
                from: previous
                    .as_ref()
                    .map(|p| p.color)
                    .unwrap_or(CodeColor::Unspecified as i32),
                color: next,
                changed,
            });
        }
        Ok(out)
    }

    /// History, outbox and audit for a new color version.
    async fn record_change(
        &self,
        txn: &DatabaseTransaction,
        previous: Option<&pb::PersonColor>,
        next: &pb::PersonColor,
        cause: &Cause<'_>,
        now: Time,
        audits: &mut Vec<pb::AuditEntry>,
    ) -> Result<(), DbErr> {
        let person_id = next
            .person
            .as_ref()
            .map(|p| p.person_id.as_str())
            .unwrap_or_default();
        let from = previous
            .map(|p| p.color)
            .unwrap_or(CodeColor::Unspecified as i32);
        if from != next.color {
            let change = pb::ColorChange {
                version: next.version,
                from_color: from,
                to_color: next.color,
                reasons: next.reasons.clone(),
                changed_at: Some(to_proto(now)),
                cause: cause.cause as i32,
                policy_version: next.policy_version,
            };
            color_history::Entity::insert(color_history::ActiveModel {
                person_id: Set(person_id.to_owned()),
                version: Set(next.version as i64),
                changed_at: Set(now),
                payload: Set(change.encode_to_vec()),
            })
            .exec_without_returning(txn)
            .await?;
        }
        outbox::enqueue(txn, COLOR_TOPIC, person_id, next.encode_to_vec()).await?;
        let first_green = previous.is_none() && next.color == CodeColor::Green as i32;
        let pending_started =
            next.pending.is_some() && previous.is_none_or(|p| p.pending.is_none());
        let action = if from != next.color && !first_green {
            Some(AuditAction::ColorChanged)
        } else if pending_started {
            Some(AuditAction::ChangePending)
        } else {
            None
        };
        if let Some(action) = action {
            let mut entry = audit(cause, action, Some(person_id), next.policy_version);
            entry.before = previous.map(snapshot);
            entry.after = Some(snapshot(next));
            audits.push(entry);
        }
        Ok(())
    }

    /// After commit: the cache gets every new version (an older one never overwrites a
    /// newer, whichever write arrives last), and the relay is woken.
    async fn after_commit(&self, outcomes: &[Outcome]) {
        self.relay.wake();
        for o in outcomes {
            self.cache_color(&o.color).await;
        }
    }

    pub async fn cache_color(&self, color: &pb::PersonColor) {
        let Some(person) = &color.person else { return };
        if let Err(err) = self
            .cache
            .set_if_newer(
                &color_key(&person.person_id),
                color.version,
                &color.encode_to_vec(),
                Some(COLOR_TTL),
            )
            .await
        {
            // The stream consumer of the gateway writes it later from the outbox event.
            tracing::warn!(error = %err, "color cache write-through failed");
        }
    }

    /// Runs `body` (which records facts) and re-evaluates `persons` in one transaction,
    /// idempotent under `reply_key`: a retry returns the stored reply and changes nothing.
    pub(crate) async fn change<T, R>(
        &self,
        reply_key: Option<String>,
        persons: BTreeSet<String>,
        cause: Cause<'_>,
        body: impl AsyncFnOnce(
            &DatabaseTransaction,
            &mut Vec<pb::AuditEntry>,
        ) -> Result<T, ServiceError>,
        reply: impl FnOnce(T, &[Outcome]) -> R,
    ) -> Result<R, ServiceError>
    where
        R: Message + Default,
    {
        self.change_holding(
            reply_key,
            persons,
            cause,
            false,
            body,
            async move |_, recorded, applied| Ok(reply(recorded, &applied.outcomes)),
        )
        .await
    }

    /// `change`, and with `hold`, subject to the bulk threshold: when the re-evaluation
    /// would move more colors than the policy allows, the color writes are rolled back, a
    /// bulk change is held (alert, audit) and `finish` must hold back the facts `body`
    /// recorded (mark them `held_by`). `finish` runs in the transaction either way.
    pub(crate) async fn change_holding<T, R>(
        &self,
        reply_key: Option<String>,
        persons: BTreeSet<String>,
        cause: Cause<'_>,
        hold: bool,
        body: impl AsyncFnOnce(
            &DatabaseTransaction,
            &mut Vec<pb::AuditEntry>,
        ) -> Result<T, ServiceError>,
        finish: impl AsyncFnOnce(&DatabaseTransaction, T, &Applied) -> Result<R, ServiceError>,
    ) -> Result<R, ServiceError>
    where
        R: Message + Default,
    {
        if let Some(key) = &reply_key
            && let Some(bytes) = reply_get(&self.store.db, key).await.map_err(db_error)?
        {
            return R::decode(&bytes[..]).map_err(ServiceError::internal);
        }
        let now = chrono::Utc::now();
        let write = self.store.write().await.map_err(db_error)?;
        Self::lock_persons(&write.txn, &persons)
            .await
            .map_err(db_error)?;
        if let Some(key) = &reply_key {
            // A concurrent retry may have finished while this one waited for the locks.
            lock_key(&write.txn, key).await.map_err(db_error)?;
            if let Some(bytes) = reply_get(&write.txn, key).await.map_err(db_error)? {
                return R::decode(&bytes[..]).map_err(ServiceError::internal);
            }
        }
        let mut audits = Vec::new();
        let recorded = body(&write.txn, &mut audits).await?;
        let applied = if hold {
            let threshold = bulk_threshold(&self.policies.in_force(now));
            let trial = write.txn.begin().await.map_err(db_error)?;
            let mark = audits.len();
            let outcomes = self
                .reevaluate_locked(&trial, &persons, &cause, now, &mut audits)
                .await
                .map_err(db_error)?;
            let moved = outcomes.iter().filter(|o| o.moves()).count();
            if moved > threshold as usize {
                trial.rollback().await.map_err(db_error)?;
                audits.truncate(mark);
                let held = self
                    .hold_bulk(&write.txn, &persons, &cause, &outcomes, threshold, now)
                    .await
                    .map_err(db_error)?;
                let mut entry = audit(
                    &cause,
                    AuditAction::BulkChangeHeld,
                    None,
                    self.policies.in_force(now).version,
                );
                entry.subject_id = held.bulk_change_id.clone();
                audits.push(entry);
                Applied {
                    outcomes: Vec::new(),
                    held: Some(held),
                }
            } else {
                trial.commit().await.map_err(db_error)?;
                Applied {
                    outcomes,
                    held: None,
                }
            }
        } else {
            let outcomes = self
                .reevaluate_locked(&write.txn, &persons, &cause, now, &mut audits)
                .await
                .map_err(db_error)?;
            Applied {
                outcomes,
                held: None,
            }
        };
        let reply = finish(&write.txn, recorded, &applied).await?;
        append_audit(&write.txn, audits, now)
            .await
            .map_err(db_error)?;
        if let Some(key) = &reply_key {
            reply_put(&write.txn, key, reply.encode_to_vec())
                .await
                .map_err(db_error)?;
        }
        write.commit().await.map_err(db_error)?;
        if let Some(held) = &applied.held {
            tracing::error!(
                alert = "bulk_change_held",
                bulk_change_id = %held.bulk_change_id,
                affected_persons = held.affected_persons,
                threshold = held.threshold,
                "a change moving more colors than the bulk threshold was held for two approvers"
            );
        }
        self.after_commit(&applied.outcomes).await;
        Ok(reply)
    }

    /// Records a held bulk change (and its alert on the outbox) in the caller's transaction.
    async fn hold_bulk(
        &self,
        txn: &DatabaseTransaction,
        persons: &BTreeSet<String>,
        cause: &Cause<'_>,
        trial: &[Outcome],
        threshold: u32,
        now: Time,
    ) -> Result<pb::BulkChange, DbErr> {
        let mut counts: std::collections::BTreeMap<(i32, i32), u32> = Default::default();
        for o in trial.iter().filter(|o| o.moves()) {
            *counts.entry((o.from, o.to_color())).or_default() += 1;
        }
        let held = pb::BulkChange {
            bulk_change_id: uuid::Uuid::new_v4().to_string(),
            cause: cause.cause as i32,
            source_id: cause.subject_id.to_owned(),
            affected_persons: counts.values().sum(),
            transitions: counts
                .into_iter()
                .map(|((from, to), n)| pb::ColorTransitionCount {
                    from_color: from,
                    to_color: to,
                    persons: n,
                })
                .collect(),
            threshold,
            state: pb::BulkChangeState::Held as i32,
            held_at: Some(to_proto(now)),
            ..Default::default()
        };
        bulk_change::Entity::insert(bulk_change::ActiveModel {
            bulk_change_id: Set(held.bulk_change_id.clone()),
            state: Set(held.state),
            caused_by: Set(cause.actor.subject.clone()),
            held_at: Set(now),
            payload: Set(held.encode_to_vec()),
        })
        .exec_without_returning(txn)
        .await?;
        let rows: Vec<bulk_change_person::ActiveModel> = persons
            .iter()
            .map(|p| bulk_change_person::ActiveModel {
                bulk_change_id: Set(held.bulk_change_id.clone()),
                person_id: Set(p.clone()),
            })
            .collect();
        for chunk in rows.chunks(500) {
            bulk_change_person::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(txn)
                .await?;
        }
        outbox::enqueue(txn, ALERT_TOPIC, &held.bulk_change_id, held.encode_to_vec()).await?;
        Ok(held)
    }
}
