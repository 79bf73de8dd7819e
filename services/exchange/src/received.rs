//! Other provinces' decisions reach this province's colors. Each record stored from a
//! partner and each person registered here (identity's [`PSEUDONYM_TOPIC`]) names a
//! pseudonym through an event, and each key distrusted names the pseudonyms under it; this consumer reads the latest
//! record each province sent about them (the merge rule's view), finds the persons
//! registered here under each pseudonym (identity), and gives the risk service the decision,
//! or its withdrawal when the key that signed it is distrusted. Risk merges it into the
//! color the gateway shows. Idempotent: the risk event id is the record's province and
//! sequence with the person (and whether it withdraws).

use crate::service::{DISTRUSTED_TOPIC, Exchange, Identity, RECEIVED_TOPIC};
use crate::sync::Risk;
use healthcode_events::{Event, Handler, HandlerError};
use healthcode_proto::common::v1::PersonRef;
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::identity::v1::{ExchangePseudonym, ResolveExchangePseudonymsRequest};
use healthcode_proto::risk::v1::{
    OtherProvinceDecisionEvent, RecordEventsRequest, RiskEvent, risk_event,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tonic::Code;

/// The consumer group that applies received records.
pub const APPLY_GROUP: &str = "exchange-apply";

/// The consumer group that applies held records to persons who register here after they
/// arrived.
pub const REGISTERED_GROUP: &str = "exchange-registered";

/// The consumer group that withdraws the decisions of distrusted keys.
pub const WITHDRAW_GROUP: &str = "exchange-withdraw";

/// Identity's topic: each registration's exchange pseudonym (`ExchangePseudonym`).
pub const PSEUDONYM_TOPIC: &str = "identity.pseudonym_registered";

/// Pseudonyms per identity call and events per risk call (both services' batch limit).
const BATCH: usize = 1_000;

pub struct ApplyReceived {
    pub exchange: Arc<Exchange>,
    pub identity: Identity,
    pub risk: Risk,
}

/// The risk event of `record` for one person registered under its pseudonym: the decision,
/// or, when the key that signed it is no longer trusted, its withdrawal.
pub fn decision_event(record: &pb::ExchangeRecord, person_id: &str, trusted: bool) -> RiskEvent {
    RiskEvent {
        event_id: format!(
            "{}-{}-{}-{person_id}",
            if trusted { "xr" } else { "xw" },
            record.issuing_province,
            record.sequence
        ),
        person: Some(PersonRef {
            person_id: person_id.to_owned(),
        }),
        observed_at: None,
        event: Some(risk_event::Event::OtherProvinceDecision(
            OtherProvinceDecisionEvent {
                issuing_province: record.issuing_province.clone(),
                sequence: record.sequence,
                color: record.color,
                reason_codes: record.reason_codes.clone(),
                rule_version: record.rule_version,
                decided_at: record.decided_at,
                valid_until: record.valid_until,
                withdrawn: !trusted,
            },
        )),
    }
}

/// A call to `service` about `items` records failed. A refusal that retrying cannot mend
/// (INVALID_ARGUMENT: records the other service will never take) is logged and skipped, so
/// that it does not stall the topic. Everything else, including a configuration to mend
/// (no pseudonym key, a token without the role), is retried: the decisions wait, they are
/// not lost.
fn refused(service: &str, status: &tonic::Status, items: usize) -> Result<(), HandlerError> {
    if status.code() == Code::InvalidArgument {
        tracing::warn!(
            service,
            message = status.message(),
            items,
            "received records refused; skipped"
        );
        Ok(())
    } else {
        Err(HandlerError::Transient(format!(
            "{service}: {:?}",
            status.code()
        )))
    }
}

impl ApplyReceived {
    /// Person ids per pseudonym, for records made under `key_id`.
    async fn persons(
        &self,
        key_id: &str,
        pseudonyms: Vec<String>,
    ) -> Result<BTreeMap<String, Vec<String>>, HandlerError> {
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for chunk in pseudonyms.chunks(BATCH) {
            let answer = self
                .identity
                .clone()
                .resolve_exchange_pseudonyms(ResolveExchangePseudonymsRequest {
                    pseudonyms: chunk.to_vec(),
                    pseudonym_key_id: key_id.to_owned(),
                })
                .await;
            match answer {
                Ok(r) => {
                    for p in r.into_inner().persons {
                        if let Some(person) = p.person {
                            found.entry(p.pseudonym).or_default().push(person.person_id);
                        }
                    }
                }
                Err(status) => refused("identity", &status, chunk.len())?,
            }
        }
        Ok(found)
    }
}

/// The pseudonym an event of [`RECEIVED_TOPIC`] or [`PSEUDONYM_TOPIC`] names. Events that
/// an earlier version wrote carry the received `ExchangeRecord` itself.
fn named_pseudonym(e: &Event) -> Option<String> {
    let pseudonym = match ExchangePseudonym::decode(&e.payload[..]) {
        Ok(p) => p.pseudonym,
        Err(_) => match pb::ExchangeRecord::decode(&e.payload[..]) {
            Ok(r) => r.pseudonym,
            Err(err) => {
                tracing::warn!(event = %e.id, error = %err, "undecodable pseudonym event skipped");
                return None;
            }
        },
    };
    (!pseudonym.is_empty()).then_some(pseudonym)
}

#[async_trait::async_trait]
impl Handler for ApplyReceived {
    async fn handle(&self, events: &[Event]) -> Result<(), HandlerError> {
        let mut named = BTreeSet::new();
        for e in events {
            if e.topic == RECEIVED_TOPIC || e.topic == PSEUDONYM_TOPIC {
                named.extend(named_pseudonym(e));
            } else if e.topic == DISTRUSTED_TOPIC {
                match pb::PartnerKey::decode(&e.payload[..]) {
                    Ok(k) => self.distrusted(&k.key.unwrap_or_default().key_id).await?,
                    Err(err) => {
                        tracing::warn!(event = %e.id, error = %err, "undecodable key notice skipped")
                    }
                }
            }
        }
        self.apply(named.into_iter().collect()).await
    }
}

impl ApplyReceived {
    /// Applies again the held records of every pseudonym with a record under `key_id`, a
    /// page at a time (a redelivery starts over: applying is idempotent).
    async fn distrusted(&self, key_id: &str) -> Result<(), HandlerError> {
        let mut after = String::new();
        loop {
            let page = self
                .exchange
                .pseudonyms_under_key(key_id, &after, BATCH as u64)
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            let Some(last) = page.last().cloned() else {
                return Ok(());
            };
            self.apply(page).await?;
            after = last;
        }
    }

    /// Gives risk, for each pseudonym in `named`, each province's latest record held about
    /// it: the decision, for the one person registered here under it, or its withdrawal, for
    /// every person registered under it.
    async fn apply(&self, named: Vec<String>) -> Result<(), HandlerError> {
        let mut records = Vec::new();
        for chunk in named.chunks(BATCH) {
            records.extend(
                self.exchange
                    .latest_received(chunk)
                    .await
                    .map_err(|e| HandlerError::Transient(e.to_string()))?,
            );
        }
        let mut by_key: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (r, _) in &records {
            by_key
                .entry(r.pseudonym_key_id.as_str())
                .or_default()
                .insert(r.pseudonym.clone());
        }
        let mut persons: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (key_id, pseudonyms) in by_key {
            for (pseudonym, ids) in self
                .persons(key_id, pseudonyms.into_iter().collect())
                .await?
            {
                persons.insert((key_id.to_owned(), pseudonym), ids);
            }
        }
        let decisions: Vec<RiskEvent> = records
            .iter()
            .flat_map(|(r, trusted)| {
                let ids = persons
                    .get(&(r.pseudonym_key_id.clone(), r.pseudonym.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // The pseudonym covers the document's type and number, not its issuing
                // country: when two persons here share it, neither is given a decision that
                // may be the other's; a withdrawal reaches them all.
                let ids = if *trusted && ids.len() > 1 {
                    tracing::warn!(
                        persons = ids.len(),
                        "a received record matches several persons here; not applied"
                    );
                    &[]
                } else {
                    ids
                };
                ids.iter()
                    .map(move |person| decision_event(r, person, *trusted))
            })
            .collect();
        for chunk in decisions.chunks(BATCH) {
            match self
                .risk
                .clone()
                .record_events(RecordEventsRequest {
                    events: chunk.to_vec(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    if !r.errors.is_empty() {
                        tracing::warn!(
                            refused = r.errors.len(),
                            first_reason = %r.errors[0].reason,
                            "risk refused received decisions"
                        );
                    }
                }
                Err(status) => refused("risk", &status, chunk.len())?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: Vec<u8>) -> Event {
        Event {
            id: "1".into(),
            topic: RECEIVED_TOPIC.into(),
            key: String::new(),
            payload,
        }
    }

    #[test]
    fn an_event_names_its_pseudonym_in_either_payload() {
        let pseudonym = "ab".repeat(32);
        let notice = crate::service::received_notice(&pseudonym, "national-1").1;
        assert_eq!(named_pseudonym(&event(notice)), Some(pseudonym.clone()));
        // What an earlier version published: the received record itself.
        let record = pb::ExchangeRecord {
            issuing_province: "310000".into(),
            sequence: 7,
            pseudonym: pseudonym.clone(),
            pseudonym_key_id: "national-1".into(),
            color: 3,
            ..Default::default()
        };
        assert_eq!(
            named_pseudonym(&event(record.encode_to_vec())),
            Some(pseudonym)
        );
        assert_eq!(named_pseudonym(&event(b"\xff\xff garbage".to_vec())), None);
        assert_eq!(named_pseudonym(&event(Vec::new())), None);
    }

    #[test]
    fn a_withdrawal_has_an_event_id_of_its_own() {
        let record = pb::ExchangeRecord {
            issuing_province: "310000".into(),
            sequence: 7,
            color: 3,
            ..Default::default()
        };
        let decided = decision_event(&record, "p", true);
        let withdrawn = decision_event(&record, "p", false);
        assert_eq!(decided.event_id, "xr-310000-7-p");
        assert_eq!(withdrawn.event_id, "xw-310000-7-p");
        let Some(risk_event::Event::OtherProvinceDecision(d)) = withdrawn.event else {
            panic!("a decision event");
        };
        assert!(d.withdrawn && d.sequence == 7);
    }
}
