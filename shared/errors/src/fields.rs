//! Checks every request of every service makes the same way, each adding a field violation
//! rather than failing at the first.

use crate::Violations;

/// A person id: a UUID in canonical (lower-case, hyphenated) form. Returns it, or an empty
/// string after adding a violation at `<field>.person_id`.
pub fn person_id(v: &mut Violations, field: &str, person_id: Option<&str>) -> String {
    match person_id {
        None => {
            v.add(field, "required");
            String::new()
        }
        Some(id) => match uuid::Uuid::parse_str(id) {
            Ok(parsed) if parsed.hyphenated().to_string() == id => id.to_owned(),
            _ => {
                v.add(
                    format!("{field}.person_id"),
                    "must be a UUID in canonical form",
                );
                String::new()
            }
        },
    }
}

/// A national exchange pseudonym: 64 lower-case hex characters (HMAC-SM3).
pub fn pseudonym(v: &mut Violations, field: &str, value: &str) {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        v.add(field, "a pseudonym: 64 lower-case hex characters");
    }
}

/// The idempotency key of a retry-safe call.
pub fn request_id(v: &mut Violations, value: &str) {
    if value.is_empty()
        || value.len() > 128
        || value.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        v.add(
            "request_id",
            "required: 1 to 128 printable characters (a UUID)",
        );
    }
}

/// Free text: at most `max` characters, no control characters (a newline is allowed).
pub fn text(v: &mut Violations, field: &str, value: &str, max: usize, required: bool) {
    if required && value.trim().is_empty() {
        v.add(field, "required");
    } else if value.chars().count() > max {
        v.add(field, format!("at most {max} characters"));
    } else if value.chars().any(|c| c.is_control() && c != '\n') {
        v.add(field, "control characters are not allowed");
    }
}

/// Page size (0 = 50, at most 500) and an offset token this service issued.
pub fn page(v: &mut Violations, page_size: u32, page_token: &str) -> (u64, u64) {
    let limit = match page_size {
        0 => 50,
        n if n > 500 => {
            v.add("page.page_size", "must be at most 500");
            50
        }
        n => u64::from(n),
    };
    let offset = if page_token.is_empty() {
        0
    } else {
        v.check(
            "page.page_token",
            page_token
                .parse::<u64>()
                .map_err(|_| "is not a token this service issued"),
        )
        .unwrap_or(0)
    };
    (offset, limit)
}

/// An id or code: printable ASCII, 1 to 64 characters.
pub fn id(v: &mut Violations, field: &str, value: &str) {
    if value.is_empty() || value.len() > 64 || !value.chars().all(|c| c.is_ascii_graphic()) {
        v.add(field, "required: 1 to 64 printable ASCII characters");
    }
}

/// The person a request names (`field.person_id`), canonical; empty when bad.
pub fn person_ref(
    v: &mut Violations,
    field: &str,
    person: &Option<healthcode_proto::common::v1::PersonRef>,
) -> String {
    person_id(v, field, person.as_ref().map(|p| p.person_id.as_str()))
}

/// Offset and limit of a request's page (see [`page`]).
pub fn page_request(
    v: &mut Violations,
    page_request: &Option<healthcode_proto::common::v1::PageRequest>,
) -> (u64, u64) {
    let p = page_request.clone().unwrap_or_default();
    page(v, p.page_size, &p.page_token)
}

/// A point on the earth: required, latitude -90 to 90, longitude -180 to 180.
pub fn point(
    v: &mut Violations,
    field: &str,
    p: &Option<healthcode_proto::common::v1::GeoPoint>,
) -> healthcode_proto::common::v1::GeoPoint {
    match p {
        None => {
            v.add(field, "required");
            Default::default()
        }
        Some(p) => {
            if !(-90.0..=90.0).contains(&p.latitude) {
                v.add(format!("{field}.latitude"), "-90 to 90");
            }
            if !(-180.0..=180.0).contains(&p.longitude) {
                v.add(format!("{field}.longitude"), "-180 to 180");
            }
            *p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_field_is_named() {
        let mut v = Violations::new();
        assert_eq!(person_id(&mut v, "person", None), "");
        person_id(
            &mut v,
            "guardian",
            Some("6F9619FF-8B86-D011-B42D-00C04FC964FF"),
        );
        request_id(&mut v, "has space");
        text(&mut v, "reason", "", 10, true);
        text(&mut v, "note", "x\u{7}", 10, false);
        page(&mut v, 501, "abc");
        let err = format!("{:?}", v.finish().unwrap_err());
        for field in [
            "person",
            "guardian.person_id",
            "request_id",
            "reason",
            "note",
            "page.page_size",
            "page.page_token",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
        let mut v = Violations::new();
        let id = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        assert_eq!(person_id(&mut v, "person", Some(id)), id);
        assert_eq!(page(&mut v, 0, "100"), (100, 50));
        assert!(v.is_empty());
    }
}
