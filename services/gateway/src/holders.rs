//! Who holds a code: the masked view from the identity service, cached briefly. Only the
//! masked view is ever cached: first character of the name, ends of the document number.

use crate::colors::{Breaker, cached_many};
use crate::upstream::Upstreams;
use futures::StreamExt;
use healthcode_cache::SharedCache;
use healthcode_proto::common::v1::PersonRef;
use healthcode_proto::identity::v1::{GetMaskedPersonRequest, MaskedPerson};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// How long a masked view is reused before identity is asked again (a verification that
/// completes shows within this time).
pub const HOLDER_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HolderError {
    #[error("no such person")]
    NotFound,
    #[error("identity unavailable: {0}")]
    Unavailable(String),
}

pub fn holder_key(person_id: &str) -> String {
    format!("holder:{{{person_id}}}")
}

pub struct HolderReader {
    cache: SharedCache,
    upstreams: Upstreams,
    /// Shared with the color reader: when Redis is down neither waits for it.
    breaker: Arc<Breaker>,
}

impl HolderReader {
    pub fn new(cache: SharedCache, upstreams: Upstreams, breaker: Arc<Breaker>) -> Self {
        HolderReader {
            cache,
            upstreams,
            breaker,
        }
    }

    pub async fn get(&self, person_id: &str) -> Result<MaskedPerson, HolderError> {
        if self.breaker.allows() {
            match self.cache.get_versioned(&holder_key(person_id)).await {
                Ok(Some(v)) => {
                    self.breaker.success();
                    if let Ok(found) = MaskedPerson::decode(&v.data[..]) {
                        return Ok(found);
                    }
                }
                Ok(None) => self.breaker.success(),
                Err(_) => self.breaker.failure(),
            }
        }
        self.fetch(person_id).await
    }

    async fn fetch(&self, person_id: &str) -> Result<MaskedPerson, HolderError> {
        let mut identity = self.upstreams.identity.clone();
        let request = self.upstreams.request(GetMaskedPersonRequest {
            person: Some(PersonRef {
                person_id: person_id.to_owned(),
            }),
        });
        match identity.get_masked_person(request).await {
            Ok(reply) => {
                let person = reply.into_inner();
                // Only verified persons are cached: a pending verification shows as soon as
                // it completes.
                if person.verified && self.breaker.allows() {
                    let _ = self
                        .cache
                        .set_if_newer(
                            &holder_key(person_id),
                            1,
                            &person.encode_to_vec(),
                            Some(HOLDER_TTL),
                        )
                        .await;
                }
                Ok(person)
            }
            Err(status)
                if status.code() == tonic::Code::NotFound
                    || status.code() == tonic::Code::InvalidArgument =>
            {
                Err(HolderError::NotFound)
            }
            Err(status) => Err(HolderError::Unavailable(status.message().to_owned())),
        }
    }

    /// Many holders in order: one MGET per 1,000, then identity for the misses, 16 at once.
    pub async fn get_many(&self, person_ids: &[String]) -> Vec<Result<MaskedPerson, HolderError>> {
        let keys = person_ids.iter().map(|id| holder_key(id)).collect();
        let mut out: Vec<Option<Result<MaskedPerson, HolderError>>> =
            cached_many(&self.cache, &self.breaker, keys, |data| {
                MaskedPerson::decode(data).ok()
            })
            .await
            .into_iter()
            .map(|hit| hit.map(Ok))
            .collect();
        let missing: Vec<usize> = (0..person_ids.len())
            .filter(|i| out[*i].is_none())
            .collect();
        let fetched: Vec<(usize, Result<MaskedPerson, HolderError>)> =
            futures::stream::iter(missing)
                .map(|i| async move { (i, self.fetch(&person_ids[i]).await) })
                .buffer_unordered(16)
                .collect()
                .await;
        for (i, r) in fetched {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(HolderError::Unavailable("not loaded".into()))))
            .collect()
    }
}
