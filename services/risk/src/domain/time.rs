//! Time on the wire is `google.protobuf.Timestamp`; inside, `chrono::DateTime<Utc>`.

use chrono::{DateTime, TimeZone, Utc};

pub type Time = DateTime<Utc>;

pub fn to_proto(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_to_proto(t: Option<Time>) -> Option<prost_types::Timestamp> {
    t.map(to_proto)
}

/// A timestamp from the wire; `None` when out of range (the caller reports the field).
pub fn from_proto(t: &prost_types::Timestamp) -> Option<Time> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    Utc.timestamp_opt(t.seconds, t.nanos as u32).single()
}

/// A protobuf duration as chrono; negative or absurd ones are `None`.
pub fn duration(d: &prost_types::Duration) -> Option<chrono::Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.seconds > 10 * 365 * 86_400 {
        return None;
    }
    Some(chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(d.nanos as i64))
}

pub fn opt_duration(d: &Option<prost_types::Duration>) -> Option<chrono::Duration> {
    d.as_ref().and_then(duration).filter(|d| !d.is_zero())
}

pub fn proto_duration(d: chrono::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: 0,
    }
}
