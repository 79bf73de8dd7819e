//! Whether a stay falls in a risk area: place, division or circle, and time.

use super::time::{Time, from_proto};
use healthcode_proto::common::v1::GeoPoint;
use healthcode_proto::risk::v1::risk_area::Extent;
use healthcode_proto::risk::v1::{AreaStayEvent, RiskArea};

/// The interval in which stays count: [valid_from, the earliest of valid_until and lifted_at).
pub fn area_window(area: &RiskArea) -> (Option<Time>, Option<Time>) {
    let from = area.valid_from.as_ref().and_then(from_proto);
    let until = area.valid_until.as_ref().and_then(from_proto);
    let lifted = area.lifted_at.as_ref().and_then(from_proto);
    let end = match (until, lifted) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    (from, end)
}

/// The stay's interval; a point in time when it has no `left_at`.
pub fn stay_window(stay: &AreaStayEvent) -> Option<(Time, Time)> {
    let from = stay.arrived_at.as_ref().and_then(from_proto)?;
    let until = stay.left_at.as_ref().and_then(from_proto).unwrap_or(from);
    Some((from, until))
}

pub fn overlaps(area: &RiskArea, stay: &AreaStayEvent) -> bool {
    let Some((stay_from, stay_until)) = stay_window(stay) else {
        return false;
    };
    let (from, end) = area_window(area);
    if from.is_some_and(|f| stay_until < f) || end.is_some_and(|e| stay_from >= e) {
        return false;
    }
    match &area.extent {
        Some(Extent::DivisionCode(code)) => {
            !code.is_empty() && stay.division_code.starts_with(code.as_str())
        }
        Some(Extent::Circle(circle)) => match (&circle.center, &stay.location) {
            (Some(center), Some(at)) => distance_m(center, at) <= circle.radius_m,
            _ => false,
        },
        Some(Extent::Places(list)) => {
            !stay.place_code.is_empty() && list.place_codes.contains(&stay.place_code)
        }
        None => false,
    }
}

/// Great-circle distance (haversine), metres.
pub fn distance_m(a: &GeoPoint, b: &GeoPoint) -> f64 {
    const R: f64 = 6_371_008.8;
    let (la1, la2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dla = la2 - la1;
    let dlo = (b.longitude - a.longitude).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::to_proto;
    use chrono::{Duration, TimeZone, Utc};
    use healthcode_proto::risk::v1::Circle;

    fn at(h: i64) -> Time {
        Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap() + Duration::hours(h)
    }

    fn area(extent: Extent) -> RiskArea {
        RiskArea {
            extent: Some(extent),
            valid_from: Some(to_proto(at(0))),
            valid_until: Some(to_proto(at(48))),
            ..Default::default()
        }
    }

    fn stay(division: &str, h: i64) -> AreaStayEvent {
        AreaStayEvent {
            division_code: division.into(),
            arrived_at: Some(to_proto(at(h))),
            left_at: Some(to_proto(at(h + 1))),
            ..Default::default()
        }
    }

    #[test]
    fn division_prefix_and_time_window() {
        let a = area(Extent::DivisionCode("330106".into()));
        assert!(overlaps(&a, &stay("330106001", 5)));
        assert!(!overlaps(&a, &stay("330105", 5)));
        assert!(!overlaps(&a, &stay("330106", 50)), "after the area ended");
        assert!(!overlaps(&a, &stay("330106", -3)), "before it began");
        let mut lifted = a.clone();
        lifted.lifted_at = Some(to_proto(at(10)));
        assert!(!overlaps(&lifted, &stay("330106", 20)));
    }

    #[test]
    fn circle_by_distance() {
        let center = GeoPoint {
            latitude: 30.25,
            longitude: 120.15,
        };
        let a = area(Extent::Circle(Circle {
            center: Some(center),
            radius_m: 500.0,
        }));
        let mut near = stay("", 5);
        near.location = Some(GeoPoint {
            latitude: 30.253,
            longitude: 120.15,
        }); // ~333 m
        assert!(overlaps(&a, &near));
        let mut far = stay("", 5);
        far.location = Some(GeoPoint {
            latitude: 30.26,
            longitude: 120.15,
        }); // ~1.1 km
        assert!(!overlaps(&a, &far));
    }
}
