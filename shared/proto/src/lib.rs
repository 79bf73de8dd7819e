//! Rust types generated from the contracts in `proto/`. Services use the generated servers
//! and clients from here; they never import each other's crates.

/// Encoded `FileDescriptorSet` of every contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("healthcode.common.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("healthcode.identity.v1");
    }
}

pub mod risk {
    pub mod v1 {
        tonic::include_proto!("healthcode.risk.v1");
    }
}

pub mod testing {
    pub mod v1 {
        tonic::include_proto!("healthcode.testing.v1");
    }
}

pub mod vaccination {
    pub mod v1 {
        tonic::include_proto!("healthcode.vaccination.v1");
    }
}

pub mod exchange {
    pub mod v1 {
        tonic::include_proto!("healthcode.exchange.v1");
    }
}

pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("healthcode.gateway.v1");
    }
}

/// Not a service of the mesh: the echo contract `hc-bench` serves itself to measure the bare
/// cost of the gRPC stack.
pub mod bench {
    pub mod v1 {
        tonic::include_proto!("healthcode.bench.v1");
    }
}

/// Conversions between `google.protobuf.Timestamp` and `chrono`, shared by every service.
pub mod time {
    use chrono::{DateTime, Utc};

    /// A time stamp to the second.
    pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        }
    }

    /// A time stamp between 1970 and the end of 9999, or None: arithmetic on it cannot
    /// overflow.
    pub fn from_ts(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
        t.as_ref()
            .filter(|t| (0..=253_402_300_799).contains(&t.seconds))
            .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32))
    }

    /// Seconds and below truncated: sample, result and dose times are to the minute.
    pub fn minute(t: DateTime<Utc>) -> DateTime<Utc> {
        DateTime::from_timestamp(t.timestamp() - t.timestamp().rem_euclid(60), 0).unwrap_or(t)
    }
}

/// Distances on the earth.
pub mod geo {
    use crate::common::v1::GeoPoint;

    /// The earth radius Redis GEO uses: distances computed here agree with `GEOSEARCH`.
    pub const EARTH_RADIUS_M: f64 = 6_372_797.560_856;

    /// Great-circle (haversine) distance in metres.
    pub fn distance_m(a: &GeoPoint, b: &GeoPoint) -> f64 {
        let (la1, la2) = (a.latitude.to_radians(), b.latitude.to_radians());
        let dla = la2 - la1;
        let dlo = (b.longitude - a.longitude).to_radians();
        let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
    }

    /// The point `metres` north of `from` (for tests and seeding).
    pub fn north_of(from: &GeoPoint, metres: f64) -> GeoPoint {
        GeoPoint {
            latitude: from.latitude + (metres / EARTH_RADIUS_M).to_degrees(),
            longitude: from.longitude,
        }
    }
}
