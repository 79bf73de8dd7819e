//! The stream an outbox is relayed to. Streams are named by topic; a consumer group reads
//! each entry once per group, and an entry stays pending until acknowledged, so a consumer
//! that dies mid-batch leaves its entries for another to claim.

use async_trait::async_trait;
use healthcode_cache::{RedisConnection, RedisSettings};
use redis::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One fact, as the outbox recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The outbox id: unique, and what handlers deduplicate on.
    pub id: String,
    pub topic: String,
    /// What the fact is about (a person id): handlers may order by it.
    pub key: String,
    pub payload: Vec<u8>,
}

/// An event as read from a stream, with the entry id to acknowledge it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub entry_id: String,
    pub event: Event,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("malformed stream entry: {0}")]
    Malformed(String),
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Appends events to the streams of their topics, in order per topic.
    async fn publish(&self, events: &[Event]) -> Result<(), BusError>;

    /// Creates the group if it does not exist, reading from the start of the stream so that
    /// nothing published before the first consumer started is missed.
    async fn ensure_group(&self, topic: &str, group: &str) -> Result<(), BusError>;

    /// Entries never delivered to the group before, now pending for `consumer`.
    async fn read_new(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError>;

    /// Entries already delivered to `consumer` and not acknowledged: what it was doing when
    /// it stopped.
    async fn read_own_pending(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError>;

    /// Entries pending for any consumer of the group for at least `min_idle`, handed over
    /// to `consumer` (their owner died).
    async fn claim_stale(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError>;

    async fn ack(&self, topic: &str, group: &str, entry_ids: &[String]) -> Result<(), BusError>;
}

pub type SharedBus = Arc<dyn EventBus>;

/// Streams keep at most about this many entries; consumers are expected to keep up far
/// within it (it is days of color changes), and the outbox keeps the record.
const MAX_STREAM_LEN: usize = 1_000_000;

// ---------------------------------------------------------------------------------------
// Redis Streams

pub struct RedisBus {
    prefix: String,
    connection: RedisConnection,
}

fn unavailable(err: redis::RedisError) -> BusError {
    BusError::Unavailable(err.to_string())
}

impl RedisBus {
    pub async fn connect(settings: &RedisSettings, prefix: &str) -> Result<Self, BusError> {
        let connection = RedisConnection::open(settings)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(RedisBus {
            prefix: prefix.to_owned(),
            connection,
        })
    }

    fn key(&self, topic: &str) -> String {
        format!("{}stream:{}", self.prefix, topic)
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, BusError> {
        cmd.query_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)
    }

    async fn read_group(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
        from: &str,
    ) -> Result<Vec<Delivery>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("STREAMS")
            .arg(self.key(topic))
            .arg(from);
        let reply = self.query(&cmd).await?;
        parse_read_reply(topic, reply)
    }
}

#[async_trait]
impl EventBus for RedisBus {
    async fn publish(&self, events: &[Event]) -> Result<(), BusError> {
        // One pipeline per topic: a stream is one key, so each pipeline stays on one node
        // of a Cluster.
        let mut by_topic: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for event in events {
            by_topic.entry(&event.topic).or_default().push(event);
        }
        for (topic, events) in by_topic {
            let key = self.key(topic);
            let mut pipe = redis::pipe();
            for event in events {
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_STREAM_LEN)
                    .arg("*")
                    .arg("id")
                    .arg(&event.id)
                    .arg("key")
                    .arg(&event.key)
                    .arg("payload")
                    .arg(&event.payload[..])
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.connection.clone())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn ensure_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.key(topic))
            .arg(group)
            .arg("0")
            .arg("MKSTREAM");
        match cmd.query_async::<()>(&mut self.connection.clone()).await {
            Ok(()) => Ok(()),
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn read_new(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        self.read_group(topic, group, consumer, count, ">").await
    }

    async fn read_own_pending(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        self.read_group(topic, group, consumer, count, "0").await
    }

    async fn claim_stale(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(self.key(topic))
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1));
        match self.query(&cmd).await? {
            Value::Array(parts) if parts.len() >= 2 => {
                parse_entries(topic, parts.into_iter().nth(1).unwrap_or(Value::Nil))
            }
            other => Err(BusError::Malformed(format!(
                "XAUTOCLAIM reply {}",
                describe(&other)
            ))),
        }
    }

    async fn ack(&self, topic: &str, group: &str, entry_ids: &[String]) -> Result<(), BusError> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.key(topic)).arg(group).arg(entry_ids);
        self.query(&cmd).await.map(|_| ())
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Array(_) => "array",
        Value::BulkString(_) => "bulk string",
        Value::Int(_) => "integer",
        _ => "other",
    }
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// `[[stream, [[id, [field, value, ...]], ...]]]`, or nil when there is nothing.
fn parse_read_reply(topic: &str, reply: Value) -> Result<Vec<Delivery>, BusError> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for stream in streams {
                let Value::Array(mut pair) = stream else {
                    return Err(BusError::Malformed("stream reply".into()));
                };
                if pair.len() != 2 {
                    return Err(BusError::Malformed("stream reply".into()));
                }
                out.extend(parse_entries(topic, pair.remove(1))?);
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, entries) in streams {
                out.extend(parse_entries(topic, entries)?);
            }
            Ok(out)
        }
        other => Err(BusError::Malformed(format!(
            "XREADGROUP reply {}",
            describe(&other)
        ))),
    }
}

fn parse_entries(topic: &str, entries: Value) -> Result<Vec<Delivery>, BusError> {
    let Value::Array(entries) = entries else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        // A trimmed entry still pending reads as [id, nil]: nothing to deliver.
        let Value::Array(mut pair) = entry else {
            continue;
        };
        if pair.len() != 2 {
            return Err(BusError::Malformed("entry".into()));
        }
        let fields = pair.pop().unwrap_or(Value::Nil);
        let entry_id = pair
            .pop()
            .and_then(text)
            .ok_or_else(|| BusError::Malformed("entry id".into()))?;
        let Value::Array(fields) = fields else {
            continue;
        };
        out.push(Delivery {
            event: parse_fields(topic, fields, &entry_id)?,
            entry_id,
        });
    }
    Ok(out)
}

fn parse_fields(topic: &str, fields: Vec<Value>, entry_id: &str) -> Result<Event, BusError> {
    let mut id = None;
    let mut key = None;
    let mut payload = None;
    let mut it = fields.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        match text(name).as_deref() {
            Some("id") => id = text(value),
            Some("key") => key = text(value),
            Some("payload") => {
                if let Value::BulkString(bytes) = value {
                    payload = Some(bytes);
                }
            }
            _ => {}
        }
    }
    match (id, key, payload) {
        (Some(id), Some(key), Some(payload)) => Ok(Event {
            id,
            topic: topic.to_owned(),
            key,
            payload,
        }),
        _ => Err(BusError::Malformed(format!(
            "entry {entry_id} lacks id, key or payload"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// In-process

/// The embedded default's bus: the same semantics as Redis Streams (groups, pending entries,
/// claiming), in memory. Shared by every service of one process; lost with it, which the
/// outbox covers (unpublished rows are relayed again on the next start).
#[derive(Default)]
pub struct MemoryBus {
    streams: Mutex<HashMap<String, MemoryStream>>,
}

#[derive(Default)]
struct MemoryStream {
    next_seq: u64,
    entries: BTreeMap<u64, Event>,
    groups: HashMap<String, MemoryGroup>,
}

#[derive(Default)]
struct MemoryGroup {
    last_delivered: u64,
    pending: BTreeMap<u64, (String, Instant)>,
}

fn entry_id(seq: u64) -> String {
    format!("{seq}-0")
}

fn parse_entry_id(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

impl MemoryBus {
    pub fn new() -> Self {
        MemoryBus::default()
    }

    fn with_stream<T>(&self, topic: &str, f: impl FnOnce(&mut MemoryStream) -> T) -> T {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(streams.entry(topic.to_owned()).or_default())
    }
}

impl MemoryStream {
    fn deliver(&self, seqs: impl Iterator<Item = u64>) -> Vec<Delivery> {
        seqs.filter_map(|seq| {
            self.entries.get(&seq).map(|event| Delivery {
                entry_id: entry_id(seq),
                event: event.clone(),
            })
        })
        .collect()
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, events: &[Event]) -> Result<(), BusError> {
        for event in events {
            self.with_stream(&event.topic, |stream| {
                stream.next_seq += 1;
                stream.entries.insert(stream.next_seq, event.clone());
                while stream.entries.len() > MAX_STREAM_LEN {
                    stream.entries.pop_first();
                }
            });
        }
        Ok(())
    }

    async fn ensure_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        self.with_stream(topic, |stream| {
            stream.groups.entry(group.to_owned()).or_default();
        });
        Ok(())
    }

    async fn read_new(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        self.with_stream(topic, |stream| {
            let Some(state) = stream.groups.get_mut(group) else {
                return Err(BusError::Unavailable(format!("no group {group}")));
            };
            let seqs: Vec<u64> = stream
                .entries
                .range(state.last_delivered + 1..)
                .take(count.max(1))
                .map(|(seq, _)| *seq)
                .collect();
            let now = Instant::now();
            for seq in &seqs {
                state.last_delivered = *seq;
                state.pending.insert(*seq, (consumer.to_owned(), now));
            }
            Ok(stream.deliver(seqs.into_iter()))
        })
    }

    async fn read_own_pending(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        self.with_stream(topic, |stream| {
            let seqs: Vec<u64> = stream
                .groups
                .get(group)
                .map(|state| {
                    state
                        .pending
                        .iter()
                        .filter(|(_, (owner, _))| owner == consumer)
                        .take(count.max(1))
                        .map(|(seq, _)| *seq)
                        .collect()
                })
                .unwrap_or_default();
            Ok(stream.deliver(seqs.into_iter()))
        })
    }

    async fn claim_stale(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        self.with_stream(topic, |stream| {
            let now = Instant::now();
            let Some(state) = stream.groups.get_mut(group) else {
                return Ok(Vec::new());
            };
            let seqs: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, (_, since))| now.duration_since(*since) >= min_idle)
                .take(count.max(1))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in &seqs {
                state.pending.insert(*seq, (consumer.to_owned(), now));
            }
            Ok(stream.deliver(seqs.into_iter()))
        })
    }

    async fn ack(&self, topic: &str, group: &str, entry_ids: &[String]) -> Result<(), BusError> {
        self.with_stream(topic, |stream| {
            if let Some(state) = stream.groups.get_mut(group) {
                for id in entry_ids {
                    if let Some(seq) = parse_entry_id(id) {
                        state.pending.remove(&seq);
                    }
                }
            }
        });
        Ok(())
    }
}
