//! Exchanged records: who a person is across provinces (a keyed pseudonym), how a province
//! signs what it decided, how a receiver checks it, and how several provinces' colors merge
//! into the one color every side shows.
//!
//! Everything here is pure: the same records give the same answer on both sides of a border,
//! which is what makes the merged color agree.

use chrono::{DateTime, Duration, Utc};
use healthcode_crypto::{SigningKey, VerifyingKey};
use healthcode_proto::common::v1::{CodeColor, ReasonCode, SignedEnvelope};
use healthcode_proto::exchange::v1::{ExchangeRecord, SignedRecord};
use healthcode_proto::time::from_ts;
use prost::Message;
use std::collections::BTreeMap;

/// GB/T 2260 province-level divisions: the provinces, autonomous regions, municipalities and
/// special administrative regions that can issue records.
pub const PROVINCES: [(&str, &str); 34] = [
    ("110000", "北京市"),
    ("120000", "天津市"),
    ("130000", "河北省"),
    ("140000", "山西省"),
    ("150000", "内蒙古自治区"),
    ("210000", "辽宁省"),
    ("220000", "吉林省"),
    ("230000", "黑龙江省"),
    ("310000", "上海市"),
    ("320000", "江苏省"),
    ("330000", "浙江省"),
    ("340000", "安徽省"),
    ("350000", "福建省"),
    ("360000", "江西省"),
    ("370000", "山东省"),
    ("410000", "河南省"),
    ("420000", "湖北省"),
    ("430000", "湖南省"),
    ("440000", "广东省"),
    ("450000", "广西壮族自治区"),
    ("460000", "海南省"),
    ("500000", "重庆市"),
    ("510000", "四川省"),
    ("520000", "贵州省"),
    ("530000", "云南省"),
    ("540000", "西藏自治区"),
    ("610000", "陕西省"),
    ("620000", "甘肃省"),
    ("630000", "青海省"),
    ("640000", "宁夏回族自治区"),
    ("650000", "新疆维吾尔自治区"),
    ("710000", "台湾省"),
    ("810000", "香港特别行政区"),
    ("820000", "澳门特别行政区"),
];

/// Whether `code` is a GB/T 2260 province-level code.
pub fn is_province(code: &str) -> bool {
    PROVINCES.iter().any(|(c, _)| *c == code)
}

/// How far in the future a decision time may lie (clock skew between provinces).
pub const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);

/// Reasons a record may carry at most.
pub const MAX_REASONS: usize = 32;

/// The person's name across provinces: lower-case hex of HMAC-SM3 under the national
/// pseudonym key over `"<document type number>:<document number>"`, the number with leading
/// and trailing whitespace removed and ASCII letters upper-cased (nothing else changed), so
/// that every province derives the same pseudonym for the same document.
pub fn pseudonym(key: &[u8], document_type: i32, document_number: &str) -> String {
    healthcode_crypto::exchange_pseudonym(key, document_type, document_number)
}

/// A time both sides read the same way: nanoseconds in range (libraries differ on what
/// they do with others).
fn exact_time(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref()
        .filter(|t| (0..=999_999_999).contains(&t.nanos))
        .and_then(|_| from_ts(t))
}

fn is_pseudonym(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every bad field of a record, as (field, description); empty when the record is well
/// formed. `now` bounds the decision time.
pub fn violations(record: &ExchangeRecord, now: DateTime<Utc>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad =
        |field: &str, description: &str| out.push((field.to_owned(), description.to_owned()));
    if !is_province(&record.issuing_province) {
        bad(
            "issuing_province",
            "must be a GB/T 2260 province-level code, e.g. 310000",
        );
    }
    if record.sequence == 0 {
        bad("sequence", "must be 1 or more");
    }
    if !is_pseudonym(&record.pseudonym) {
        bad("pseudonym", "must be 64 lower-case hex digits (HMAC-SM3)");
    }
    if record.pseudonym_key_id.is_empty() || record.pseudonym_key_id.len() > 64 {
        bad("pseudonym_key_id", "must be 1 to 64 characters");
    }
    if !matches!(
        CodeColor::try_from(record.color),
        Ok(CodeColor::Green | CodeColor::Yellow | CodeColor::Red)
    ) {
        bad("color", "must be green, yellow or red");
    }
    if record.reason_codes.len() > MAX_REASONS {
        bad("reason_codes", "at most 32 reasons");
    }
    if record.reason_codes.iter().any(|r| {
        matches!(
            ReasonCode::try_from(*r),
            Err(_) | Ok(ReasonCode::Unspecified)
        )
    }) {
        bad("reason_codes", "unknown reason code");
    }
    if record.rule_version == 0 {
        bad("rule_version", "must be 1 or more");
    }
    let decided = exact_time(&record.decided_at);
    match decided {
        None => bad("decided_at", "required, a valid time"),
        Some(t) if t > now + MAX_CLOCK_SKEW => bad("decided_at", "lies in the future"),
        Some(_) => {}
    }
    if record.valid_until.is_some() {
        match (exact_time(&record.valid_until), decided) {
            (None, _) => bad("valid_until", "not a valid time"),
            (Some(until), Some(decided)) if until <= decided => {
                bad("valid_until", "must be after decided_at")
            }
            _ => {}
        }
    }
    out
}

/// Signs `record` with this province's key: the envelope is what travels and what counts.
pub fn seal(
    key: &SigningKey,
    record: &ExchangeRecord,
) -> Result<SignedRecord, healthcode_crypto::CryptoError> {
    let payload = record.encode_to_vec();
    Ok(SignedRecord {
        envelope: Some(SignedEnvelope {
            signature: key.sign(&payload)?,
            key_id: key.key_id().to_owned(),
            payload,
        }),
        record: Some(record.clone()),
    })
}

/// A partner's signing key as the registry holds it.
#[derive(Debug, Clone)]
pub struct PartnerKey {
    /// The province (partner id) the key belongs to.
    pub province: String,
    pub key: VerifyingKey,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Why a received record was refused. Each maps to a reason code for the per-item error
/// (see `PublishRecords` in the contract).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the envelope holds no exchange record")]
    Undecodable,
    #[error("malformed record: {}", describe(.0))]
    Malformed(Vec<(String, String)>),
    #[error("the record was issued by province {issued}, not by the caller ({caller})")]
    NotOwnProvince { issued: String, caller: String },
    #[error("no key {0} is registered")]
    UnknownKey(String),
    #[error("key {key_id} belongs to {owner}, not to the issuing province")]
    ForeignKey { key_id: String, owner: String },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("key {0} is revoked")]
    RevokedKey(String),
}

fn describe(violations: &[(String, String)]) -> String {
    violations
        .iter()
        .map(|(f, d)| format!("{f}: {d}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl RecordError {
    /// The reason code of the per-item error.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::Undecodable | RecordError::Malformed(_) => "MALFORMED_RECORD",
            RecordError::NotOwnProvince { .. } => "NOT_OWN_PROVINCE",
            RecordError::UnknownKey(_)
            | RecordError::ForeignKey { .. }
            | RecordError::BadSignature
            | RecordError::RevokedKey(_) => "BAD_SIGNATURE",
        }
    }

    /// The gRPC code the refusal carries.
    pub fn code(&self) -> tonic::Code {
        match self {
            RecordError::NotOwnProvince { .. } => tonic::Code::PermissionDenied,
            _ => tonic::Code::InvalidArgument,
        }
    }
}

/// Opens a received envelope. The signature is checked first, with the registered key named
/// by the envelope (key ids are unique across the registry), unrevoked at `now` (the
/// receipt time); only then is the payload parsed: every field checked, the key's owner
/// must be the issuing province, and the issuing province must be `caller` (when the sender
/// is a partner publishing its own decisions).
pub fn open(
    envelope: &SignedEnvelope,
    caller: Option<&str>,
    key_of: impl Fn(&str) -> Option<PartnerKey>,
    now: DateTime<Utc>,
) -> Result<ExchangeRecord, RecordError> {
    let key =
        key_of(&envelope.key_id).ok_or_else(|| RecordError::UnknownKey(envelope.key_id.clone()))?;
    key.key
        .verify(&envelope.payload, &envelope.signature)
        .map_err(|_| RecordError::BadSignature)?;
    if key.revoked_at.is_some_and(|t| t <= now) {
        return Err(RecordError::RevokedKey(envelope.key_id.clone()));
    }
    let record =
        ExchangeRecord::decode(&envelope.payload[..]).map_err(|_| RecordError::Undecodable)?;
    let bad = violations(&record, now);
    if !bad.is_empty() {
        return Err(RecordError::Malformed(bad));
    }
    if key.province != record.issuing_province {
        return Err(RecordError::ForeignKey {
            key_id: envelope.key_id.clone(),
            owner: key.province,
        });
    }
    if let Some(caller) = caller
        && caller != record.issuing_province
    {
        return Err(RecordError::NotOwnProvince {
            issued: record.issuing_province,
            caller: caller.to_owned(),
        });
    }
    Ok(record)
}

fn severity(color: i32) -> u8 {
    match CodeColor::try_from(color) {
        Ok(CodeColor::Red) => 3,
        Ok(CodeColor::Yellow) => 2,
        Ok(CodeColor::Green) => 1,
        _ => 0,
    }
}

/// Whether a record still counts at `now`: a known color, a trusted key, and not past its
/// `valid_until`.
pub fn still_valid(record: &ExchangeRecord, trusted: bool, now: DateTime<Utc>) -> bool {
    trusted
        && severity(record.color) > 0
        && (record.valid_until.is_none() || from_ts(&record.valid_until).is_some_and(|t| t > now))
}

/// The order that picks a province's latest record: the highest sequence; should two
/// differing records ever carry one sequence (a store must refuse the second), the
/// distrusted one, then the stricter, then the larger encoding, so both sides still agree.
fn latest_order(a: (&ExchangeRecord, bool), b: (&ExchangeRecord, bool)) -> std::cmp::Ordering {
    a.0.sequence
        .cmp(&b.0.sequence)
        .then_with(|| b.1.cmp(&a.1))
        .then_with(|| severity(a.0.color).cmp(&severity(b.0.color)))
        .then_with(|| a.0.encode_to_vec().cmp(&b.0.encode_to_vec()))
}

/// The latest record of each province (highest sequence), with whether its key is still
/// trusted, ordered by province.
pub fn latest_per_province<'a>(
    records: impl IntoIterator<Item = (&'a ExchangeRecord, bool)>,
) -> Vec<(&'a ExchangeRecord, bool)> {
    let mut latest: BTreeMap<&str, (&ExchangeRecord, bool)> = BTreeMap::new();
    for (record, trusted) in records {
        let entry = latest
            .entry(record.issuing_province.as_str())
            .or_insert((record, trusted));
        if latest_order((record, trusted), *entry).is_gt() {
            *entry = (record, trusted);
        }
    }
    latest.into_values().collect()
}

/// The record that decides the merged color: among each province's latest record that is
/// still valid, the strictest color; among equally strict ones, the latest decision; then the
/// lowest province code. `None` when no province holds a valid color (never read as
/// green). The same records give the same answer in any order.
pub fn deciding<'a>(
    records: impl IntoIterator<Item = (&'a ExchangeRecord, bool)>,
    now: DateTime<Utc>,
) -> Option<&'a ExchangeRecord> {
    latest_per_province(records)
        .into_iter()
        .filter(|(r, trusted)| still_valid(r, *trusted, now))
        .map(|(r, _)| r)
        .max_by(|a, b| {
            let decided = |r: &ExchangeRecord| from_ts(&r.decided_at);
            severity(a.color)
                .cmp(&severity(b.color))
                .then_with(|| decided(a).cmp(&decided(b)))
                .then_with(|| b.issuing_province.cmp(&a.issuing_province))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use healthcode_crypto::hmac_sm3;
    use healthcode_proto::time::ts;

    const KEY: &[u8] = b"national pseudonym key, test only";

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000, 0).unwrap()
    }

    fn record(province: &str, sequence: u64, color: CodeColor, minutes_ago: i64) -> ExchangeRecord {
        ExchangeRecord {
            issuing_province: province.into(),
            sequence,
            pseudonym: pseudonym(KEY, 1, "330106199001011234"),
            pseudonym_key_id: "np-2026".into(),
            color: color as i32,
            reason_codes: vec![ReasonCode::CloseContact as i32],
            rule_version: 3,
            valid_until: None,
            decided_at: Some(ts(now() - Duration::minutes(minutes_ago))),
        }
    }

    #[test]
    fn pseudonyms_agree_across_spellings_and_differ_by_key_and_type() {
        let a = pseudonym(KEY, 1, "33010619900101123x");
        assert_eq!(a, pseudonym(KEY, 1, " 33010619900101123X\t"));
        assert_ne!(
            a,
            pseudonym(KEY, 1, "330106 19900101123X"),
            "only the ends are trimmed"
        );
        assert!(is_pseudonym(&a));
        assert_ne!(a, pseudonym(b"another key", 1, "33010619900101123X"));
        assert_ne!(a, pseudonym(KEY, 2, "33010619900101123X"));
        assert_eq!(
            a,
            hex::encode(hmac_sm3(KEY, b"1:33010619900101123X")),
            "the contract's input string"
        );
        assert!(!a.contains("330106"), "the number does not show through");
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut r = record("999999", 0, CodeColor::Unspecified, 0);
        r.pseudonym = "33010619900101123X".into();
        r.pseudonym_key_id.clear();
        r.reason_codes = vec![999];
        r.rule_version = 0;
        r.decided_at = Some(ts(now() + Duration::hours(1)));
        let fields: Vec<String> = violations(&r, now()).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "issuing_province",
                "sequence",
                "pseudonym",
                "pseudonym_key_id",
                "color",
                "reason_codes",
                "rule_version",
                "decided_at"
            ]
        );
        let mut r = record("310000", 1, CodeColor::Red, 10);
        r.valid_until = r.decided_at;
        assert_eq!(violations(&r, now())[0].0, "valid_until");
        assert!(violations(&record("310000", 1, CodeColor::Red, 10), now()).is_empty());
    }

    fn registry(keys: Vec<PartnerKey>) -> impl Fn(&str) -> Option<PartnerKey> {
        move |id| keys.iter().find(|k| k.key.key_id() == id).cloned()
    }

    #[test]
    fn opening_checks_province_key_signature_and_revocation() {
        let shanghai = SigningKey::generate("sh-1").unwrap();
        let jiangsu = SigningKey::generate("js-1").unwrap();
        let keys = registry(vec![
            PartnerKey {
                province: "310000".into(),
                key: shanghai.verifying_key(),
                revoked_at: None,
            },
            PartnerKey {
                province: "320000".into(),
                key: jiangsu.verifying_key(),
                revoked_at: Some(now() - Duration::minutes(1)),
            },
        ]);
        let r = record("310000", 7, CodeColor::Red, 1);
        let signed = seal(&shanghai, &r).unwrap().envelope.unwrap();
        assert_eq!(open(&signed, Some("310000"), &keys, now()), Ok(r.clone()));
        assert_eq!(open(&signed, None, &keys, now()), Ok(r.clone()));

        // Shanghai's record published by Jiangsu.
        let err = open(&signed, Some("320000"), &keys, now()).unwrap_err();
        assert_eq!(
            (err.reason(), err.code()),
            ("NOT_OWN_PROVINCE", tonic::Code::PermissionDenied)
        );

        // A well-formed change (another sequence) under the old signature.
        let mut resequenced = r.clone();
        resequenced.sequence = 6;
        let forged = SignedEnvelope {
            payload: resequenced.encode_to_vec(),
            ..signed.clone()
        };
        assert_eq!(
            open(&forged, Some("310000"), &keys, now()),
            Err(RecordError::BadSignature)
        );
        // Garbage under a known key is refused by the signature, before any parsing.
        let unsigned = SignedEnvelope {
            payload: vec![0xff; 40],
            ..signed.clone()
        };
        assert_eq!(
            open(&unsigned, Some("320000"), &keys, now()),
            Err(RecordError::BadSignature)
        );
        // A revocation that takes effect later does not refuse the record now.
        let later = registry(vec![PartnerKey {
            province: "310000".into(),
            key: shanghai.verifying_key(),
            revoked_at: Some(now() + Duration::minutes(1)),
        }]);
        assert_eq!(open(&signed, Some("310000"), &later, now()), Ok(r.clone()));
        // Out-of-range nanoseconds are malformed, even when signed.
        let mut odd = record("310000", 9, CodeColor::Green, 0);
        odd.decided_at.as_mut().unwrap().nanos = 1_000_000_000;
        let err = open(
            &seal(&shanghai, &odd).unwrap().envelope.unwrap(),
            None,
            &keys,
            now(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "MALFORMED_RECORD");
        // Red changed to green under Shanghai's signature.
        let mut altered = r.clone();
        altered.color = CodeColor::Green as i32;
        let relabelled = SignedEnvelope {
            payload: altered.encode_to_vec(),
            ..signed.clone()
        };
        assert_eq!(
            open(&relabelled, Some("310000"), &keys, now()),
            Err(RecordError::BadSignature)
        );
        // A green record re-signed by a key that is not Shanghai's.
        let stranger = SigningKey::generate("sh-1").unwrap();
        let green = record("310000", 8, CodeColor::Green, 0);
        let err = open(
            &seal(&stranger, &green).unwrap().envelope.unwrap(),
            Some("310000"),
            &keys,
            now(),
        )
        .unwrap_err();
        assert_eq!(err, RecordError::BadSignature);
        // Jiangsu's key signing for Shanghai.
        let err = open(
            &seal(&jiangsu, &green).unwrap().envelope.unwrap(),
            Some("310000"),
            &keys,
            now(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "BAD_SIGNATURE");
        // Jiangsu's revoked key, for Jiangsu.
        let js = record("320000", 1, CodeColor::Green, 0);
        let err = open(
            &seal(&jiangsu, &js).unwrap().envelope.unwrap(),
            Some("320000"),
            &keys,
            now(),
        )
        .unwrap_err();
        assert_eq!(err, RecordError::RevokedKey("js-1".into()));
        // Unknown key; garbage.
        let unknown = SigningKey::generate("zz-9").unwrap();
        let err = open(
            &seal(&unknown, &green).unwrap().envelope.unwrap(),
            None,
            &keys,
            now(),
        )
        .unwrap_err();
        assert_eq!(err, RecordError::UnknownKey("zz-9".into()));
        assert_eq!(err.reason(), "BAD_SIGNATURE");
        let mut garbage = seal(&shanghai, &record("310000", 9, CodeColor::Green, 0))
            .unwrap()
            .envelope
            .unwrap();
        garbage.payload = vec![0xff; 40];
        garbage.signature = shanghai.sign(&garbage.payload).unwrap();
        assert_eq!(
            open(&garbage, None, &keys, now()).unwrap_err().reason(),
            "MALFORMED_RECORD",
            "signed garbage is refused when parsed"
        );
    }

    #[test]
    fn the_strictest_valid_color_decides_in_any_order() {
        let mut expired_red = record("310000", 4, CodeColor::Red, 120);
        expired_red.valid_until = Some(ts(now() - Duration::minutes(1)));
        let yellow_old = record("320000", 2, CodeColor::Yellow, 60);
        let yellow_new = record("340000", 9, CodeColor::Yellow, 5);
        let green = record("330000", 11, CodeColor::Green, 1);
        let superseded_red = record("330000", 10, CodeColor::Red, 30);
        let all = [
            (&expired_red, true),
            (&yellow_old, true),
            (&yellow_new, true),
            (&green, true),
            (&superseded_red, true),
        ];
        // Every rotation of the input gives the same answer: the newer yellow (Anhui).
        for shift in 0..all.len() {
            let mut rotated = all.to_vec();
            rotated.rotate_left(shift);
            rotated.reverse();
            assert_eq!(deciding(rotated.iter().copied(), now()), Some(&yellow_new));
        }
        // A distrusted key no longer counts.
        let distrusted = [(&yellow_old, true), (&yellow_new, false), (&green, true)];
        assert_eq!(deciding(distrusted, now()), Some(&yellow_old));
        // A red still valid beats everything; nothing valid gives nothing (not green).
        let red = record("310000", 5, CodeColor::Red, 200);
        assert_eq!(deciding([(&green, true), (&red, true)], now()), Some(&red));
        assert_eq!(deciding([(&expired_red, true)], now()), None);
        // Two differing records with one sequence: the same pick in either order.
        let twin_red = record("320000", 2, CodeColor::Red, 60);
        assert_eq!(
            deciding([(&yellow_old, true), (&twin_red, true)], now()),
            Some(&twin_red)
        );
        assert_eq!(
            deciding([(&twin_red, true), (&yellow_old, true)], now()),
            Some(&twin_red)
        );
        // A twin under a distrusted key is the one kept, and it does not count.
        assert_eq!(
            deciding([(&twin_red, false), (&yellow_old, true)], now()),
            None
        );
        assert_eq!(
            deciding([(&yellow_old, true), (&twin_red, false)], now()),
            None
        );
        // Equal color and time: the lower province code, on both sides.
        let a = record("310000", 1, CodeColor::Yellow, 5);
        let b = record("320000", 1, CodeColor::Yellow, 5);
        assert_eq!(deciding([(&a, true), (&b, true)], now()), Some(&a));
        assert_eq!(deciding([(&b, true), (&a, true)], now()), Some(&a));
    }
}
