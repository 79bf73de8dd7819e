//! Policies are data: versioned rules per province, published with the time they take
//! effect. The default below is the one the requirements describe.

use super::time::{Time, opt_duration, proto_duration};
use healthcode_errors::Violations;
use healthcode_proto::common::v1::{CodeColor, NucleicAcidResult, ReasonCode};
use healthcode_proto::risk::v1::rule::Condition;
use healthcode_proto::risk::v1::{
    AreaStayCondition, Clearance, ContactCondition, ContactKind, DirectiveCondition, DirectiveKind,
    Policy, RiskAreaLevel, Rule, TestCondition,
};

pub const MAX_RULES: usize = 100;
/// The bulk threshold when a policy leaves it at 0.
pub const DEFAULT_BULK_THRESHOLD: u32 = 1000;

fn days(n: i64) -> Option<prost_types::Duration> {
    Some(proto_duration(chrono::Duration::days(n)))
}

fn clearance(
    negative_tests: u32,
    tests_within_days: i64,
    min_elapsed_days: i64,
) -> Option<Clearance> {
    Some(Clearance {
        negative_tests,
        tests_within: days(tests_within_days),
        min_elapsed: if min_elapsed_days > 0 {
            days(min_elapsed_days)
        } else {
            None
        },
    })
}

fn rule(
    id: &str,
    condition: Condition,
    color: CodeColor,
    weight: f64,
    reason: ReasonCode,
    clear: Option<Clearance>,
) -> Rule {
    Rule {
        rule_id: id.to_owned(),
        requires_double_confirmation: matches!(condition, Condition::Directive(_)),
        condition: Some(condition),
        color: color as i32,
        weight,
        reason_code: reason as i32,
        holds_for: None,
        clearance: clear,
    }
}

/// The requirements' policy: red (confirmed-case contact, high-risk stay, positive test,
/// quarantine) clears after 14 days and 5 negative tests; yellow (secondary contact,
/// medium-risk stay) after 2 negative tests within 3 days; a pooled positive is yellow until
/// a single negative retest. Contact weighs 0.6 and risk-area stays 0.3 toward red.
pub fn default_policy(province_code: &str, effective_from: Time) -> Policy {
    use CodeColor::{Red, Yellow};
    let contact = |kind: ContactKind| {
        Condition::Contact(ContactCondition {
            kind: kind as i32,
            within: days(14),
        })
    };
    let stay = |level: RiskAreaLevel| {
        Condition::AreaStay(AreaStayCondition {
            min_level: level as i32,
            within: days(14),
        })
    };
    let test = |result: NucleicAcidResult, within: i64| {
        Condition::Test(TestCondition {
            result: result as i32,
            within: days(within),
            absent: false,
        })
    };
    let directive =
        |kind: DirectiveKind| Condition::Directive(DirectiveCondition { kind: kind as i32 });
    let rules = vec![
        rule(
            "close-contact-red",
            contact(ContactKind::Close),
            Red,
            0.6,
            ReasonCode::CloseContact,
            clearance(5, 14, 14),
        ),
        rule(
            "secondary-contact-yellow",
            contact(ContactKind::Secondary),
            Yellow,
            0.3,
            ReasonCode::SecondaryContact,
            clearance(2, 3, 0),
        ),
        rule(
            "high-risk-area-red",
            stay(RiskAreaLevel::High),
            Red,
            0.3,
            ReasonCode::HighRiskAreaStay,
            clearance(5, 14, 14),
        ),
        rule(
            "medium-risk-area-yellow",
            stay(RiskAreaLevel::Medium),
            Yellow,
            0.3,
            ReasonCode::MediumRiskAreaStay,
            clearance(2, 3, 0),
        ),
        rule(
            "positive-test-red",
            test(NucleicAcidResult::Positive, 14),
            Red,
            1.0,
            ReasonCode::PositiveTest,
            clearance(5, 14, 14),
        ),
        rule(
            "pool-positive-yellow",
            test(NucleicAcidResult::PoolPositive, 7),
            Yellow,
            0.0,
            ReasonCode::PoolPositiveRetestPending,
            clearance(1, 7, 0),
        ),
        rule(
            "centralised-quarantine-red",
            directive(DirectiveKind::CentralisedQuarantine),
            Red,
            0.0,
            ReasonCode::CentralisedQuarantine,
            None,
        ),
        rule(
            "home-quarantine-red",
            directive(DirectiveKind::HomeQuarantine),
            Red,
            0.0,
            ReasonCode::HomeQuarantine,
            None,
        ),
        rule(
            "home-monitoring-yellow",
            directive(DirectiveKind::HomeMonitoring),
            Yellow,
            0.0,
            ReasonCode::HomeMonitoring,
            None,
        ),
    ];
    Policy {
        province_code: province_code.to_owned(),
        version: 1,
        effective_from: Some(super::time::to_proto(effective_from)),
        description: "Default policy of the requirements (section 3)".to_owned(),
        rules,
        yellow_score: 0.0,
        red_score: 0.9,
        bulk_change_threshold: DEFAULT_BULK_THRESHOLD,
        pending_confirmation_timeout: days(1),
        appeal_pre_review_window: days(7),
        published_by: "system".to_owned(),
        published_at: Some(super::time::to_proto(effective_from)),
    }
}

/// The pending-confirmation timeout of a policy (24 hours when unset).
pub fn pending_timeout(policy: &Policy) -> chrono::Duration {
    opt_duration(&policy.pending_confirmation_timeout).unwrap_or(chrono::Duration::days(1))
}

pub fn bulk_threshold(policy: &Policy) -> u32 {
    if policy.bulk_change_threshold == 0 {
        DEFAULT_BULK_THRESHOLD
    } else {
        policy.bulk_change_threshold
    }
}

fn valid_duration(
    v: &mut Violations,
    field: &str,
    d: &Option<prost_types::Duration>,
    required: bool,
) {
    match d {
        None if required => v.add(field, "required"),
        Some(d) if super::time::duration(d).is_none() => {
            v.add(field, "must be between 0 and 10 years")
        }
        _ => {}
    }
}

fn valid_enum<E: TryFrom<i32>>(v: &mut Violations, field: &str, value: i32, allow_zero: bool) {
    if E::try_from(value).is_err() || (!allow_zero && value == 0) {
        v.add(field, "unknown or unspecified value");
    }
}

/// Checks every rule; one field violation per problem, named `policy.rules[i].field`.
pub fn validate(policy: &Policy, v: &mut Violations) {
    if policy.rules.is_empty() {
        v.add("policy.rules", "at least one rule is required");
    }
    if policy.rules.len() > MAX_RULES {
        v.add("policy.rules", format!("at most {MAX_RULES} rules"));
    }
    if !(0.0..=100.0).contains(&policy.yellow_score) || !(0.0..=100.0).contains(&policy.red_score) {
        v.add("policy.yellow_score", "scores must be between 0 and 100");
    }
    if policy.description.chars().count() > 500 {
        v.add("policy.description", "at most 500 characters");
    }
    valid_duration(
        v,
        "policy.pending_confirmation_timeout",
        &policy.pending_confirmation_timeout,
        false,
    );
    valid_duration(
        v,
        "policy.appeal_pre_review_window",
        &policy.appeal_pre_review_window,
        false,
    );
    let mut ids = std::collections::HashSet::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        let f = |name: &str| format!("policy.rules[{i}].{name}");
        if rule.rule_id.is_empty()
            || rule.rule_id.len() > 64
            || !rule
                .rule_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            v.add(f("rule_id"), "1 to 64 letters, digits, '-' or '_'");
        } else if !ids.insert(rule.rule_id.clone()) {
            v.add(f("rule_id"), "duplicate rule id");
        }
        valid_enum::<CodeColor>(v, &f("color"), rule.color, true);
        valid_enum::<ReasonCode>(v, &f("reason_code"), rule.reason_code, false);
        if !(0.0..=1.0).contains(&rule.weight) || rule.weight.is_nan() {
            v.add(f("weight"), "between 0 and 1");
        }
        if rule.color == 0 && rule.weight == 0.0 {
            v.add(f("color"), "a rule needs a color or a weight");
        }
        valid_duration(v, &f("holds_for"), &rule.holds_for, false);
        if let Some(c) = &rule.clearance {
            valid_duration(v, &f("clearance.tests_within"), &c.tests_within, false);
            valid_duration(v, &f("clearance.min_elapsed"), &c.min_elapsed, false);
            if c.negative_tests > 20 {
                v.add(f("clearance.negative_tests"), "at most 20");
            }
        }
        match &rule.condition {
            None => v.add(f("condition"), "required"),
            Some(Condition::Contact(c)) => {
                valid_enum::<ContactKind>(v, &f("contact.kind"), c.kind, false);
                valid_duration(v, &f("contact.within"), &c.within, true);
            }
            Some(Condition::AreaStay(c)) => {
                valid_enum::<RiskAreaLevel>(v, &f("area_stay.min_level"), c.min_level, false);
                valid_duration(v, &f("area_stay.within"), &c.within, true);
            }
            Some(Condition::Test(c)) => {
                valid_enum::<NucleicAcidResult>(v, &f("test.result"), c.result, false);
                valid_duration(v, &f("test.within"), &c.within, true);
            }
            Some(Condition::Vaccination(c)) => {
                if !c.course_incomplete && c.booster_overdue_by.is_none() {
                    v.add(
                        f("vaccination"),
                        "set course_incomplete or booster_overdue_by",
                    );
                }
                valid_duration(
                    v,
                    &f("vaccination.booster_overdue_by"),
                    &c.booster_overdue_by,
                    false,
                );
            }
            Some(Condition::Directive(c)) => {
                valid_enum::<DirectiveKind>(v, &f("directive.kind"), c.kind, false);
                if rule.clearance.is_some() || rule.holds_for.is_some() {
                    v.add(
                        f("clearance"),
                        "a directive rule holds while the directive is in force",
                    );
                }
            }
        }
        if rule.requires_double_confirmation
            && !matches!(rule.condition, Some(Condition::Directive(_)))
        {
            v.add(
                f("requires_double_confirmation"),
                "double confirmation is supported on directive rules only so far",
            );
        }
    }
}
