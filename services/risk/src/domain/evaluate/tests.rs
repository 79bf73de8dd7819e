use super::*;
use crate::domain::facts::{
    AreaStay, Contact, Directive, NationalCheck, Override, latest_per_province,
};
use crate::domain::policy::{default_policy, validate};
use chrono::{Duration, TimeZone, Utc};
use healthcode_errors::Violations;
use healthcode_proto::risk::v1::{ContactKind, RiskAreaLevel};

fn t0() -> Time {
    Utc.with_ymd_and_hms(2026, 5, 1, 8, 0, 0).unwrap()
}

fn policy() -> Policy {
    default_policy("330000", t0() - Duration::days(365))
}

fn contact(kind: ContactKind, exposure: Time, recorded: Time) -> Contact {
    Contact {
        kind,
        last_exposure_at: exposure,
        recorded_at: recorded,
    }
}

fn negative(sampled: Time) -> TestResult {
    test(NucleicAcidResult::Negative, sampled)
}

fn test(result: NucleicAcidResult, sampled: Time) -> TestResult {
    TestResult {
        report_id: format!("r-{}", sampled.timestamp()),
        result,
        sampled_at: sampled,
        reported_at: sampled + Duration::hours(6),
        pooled: false,
        recorded_at: sampled + Duration::hours(6),
    }
}

fn close_contact_facts() -> Facts {
    Facts {
        contacts: vec![contact(ContactKind::Close, t0() - Duration::days(1), t0())],
        ..Facts::default()
    }
}

fn codes(e: &Evaluation) -> Vec<i32> {
    e.reasons.iter().map(|r| r.code).collect()
}

#[test]
fn nothing_known_is_green_without_reasons() {
    let e = evaluate(&policy(), &Facts::default(), t0());
    assert_eq!(e.color, CodeColor::Green);
    assert!(e.reasons.is_empty());
    assert!(e.pending.is_none());
}

#[test]
fn close_contact_is_red_until_fourteen_days_and_five_negatives() {
    let mut facts = close_contact_facts();
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(1));
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(codes(&e), vec![ReasonCode::CloseContact as i32]);
    let progress = e.clearance.unwrap();
    assert_eq!(progress.negative_tests_required, 5);
    assert_eq!(progress.negative_tests_recorded, 0);

    // Five negatives on days 2..=6: tests met, but 14 days have not passed.
    for day in 2..=6 {
        facts.tests.push(negative(t0() + Duration::days(day)));
    }
    let e = evaluate(&policy(), &facts, t0() + Duration::days(7));
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(e.valid_until, Some(t0() + Duration::days(14)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(14));
    assert_eq!(e.color, CodeColor::Green);
}

#[test]
fn fourteen_days_alone_do_not_clear_red() {
    let mut facts = close_contact_facts();
    for day in 2..=5 {
        facts.tests.push(negative(t0() + Duration::days(day)));
    }
    let e = evaluate(&policy(), &facts, t0() + Duration::days(30));
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(e.clearance.unwrap().negative_tests_recorded, 4);
}

#[test]
fn a_test_sampled_before_the_color_was_assigned_does_not_clear_it() {
    let mut facts = Facts {
        contacts: vec![contact(
            ContactKind::Secondary,
            t0() - Duration::days(2),
            t0(),
        )],
        ..Facts::default()
    };
    // Two negatives sampled before the color was assigned, reported after.
    facts.tests.push(negative(t0() - Duration::hours(30)));
    facts.tests.push(negative(t0() - Duration::hours(6)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(1));
    assert_eq!(e.color, CodeColor::Yellow);
    facts.tests.push(negative(t0() + Duration::hours(2)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(1));
    assert_eq!(e.color, CodeColor::Yellow, "one negative after is not two");
    facts.tests.push(negative(t0() + Duration::hours(30)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(2));
    assert_eq!(e.color, CodeColor::Green);
}

#[test]
fn yellow_needs_two_negatives_within_three_days() {
    let mut facts = Facts {
        contacts: vec![contact(ContactKind::Secondary, t0(), t0())],
        ..Facts::default()
    };
    facts.tests.push(negative(t0() + Duration::days(1)));
    facts.tests.push(negative(t0() + Duration::days(5)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(6));
    assert_eq!(e.color, CodeColor::Yellow, "four days apart");
    facts.tests.push(negative(t0() + Duration::days(7)));
    let e = evaluate(&policy(), &facts, t0() + Duration::days(8));
    assert_eq!(e.color, CodeColor::Green, "days 5 and 7");
}

#[test]
fn a_contact_reported_long_after_exposure_does_not_count() {
    let facts = Facts {
        contacts: vec![contact(ContactKind::Close, t0() - Duration::days(20), t0())],
        ..Facts::default()
    };
    assert_eq!(evaluate(&policy(), &facts, t0()).color, CodeColor::Green);
}

fn stay(level: RiskAreaLevel, until: Time) -> AreaStay {
    AreaStay {
        area_id: "area-1".into(),
        area_name: "XX 小区".into(),
        level,
        stay_from: until - Duration::hours(1),
        stay_until: until,
        known_at: until + Duration::hours(1),
    }
}

#[test]
fn risk_area_stays_by_level() {
    let medium = Facts {
        stays: vec![stay(RiskAreaLevel::Medium, t0())],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &medium, t0() + Duration::hours(2));
    assert_eq!(e.color, CodeColor::Yellow);
    assert_eq!(
        e.reasons[0].params.get("area_name").map(String::as_str),
        Some("XX 小区")
    );
    let high = Facts {
        stays: vec![stay(RiskAreaLevel::High, t0())],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &high, t0() + Duration::hours(2));
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(e.reasons[0].code, ReasonCode::HighRiskAreaStay as i32);
    let low = Facts {
        stays: vec![stay(RiskAreaLevel::Low, t0())],
        ..Facts::default()
    };
    assert_eq!(evaluate(&policy(), &low, t0()).color, CodeColor::Green);
}

#[test]
fn score_reaches_red_from_weighted_reasons() {
    // Secondary contact (0.3) + medium stay (0.3) + high stay (0.3) = 0.9 = red_score.
    let facts = Facts {
        contacts: vec![contact(ContactKind::Secondary, t0(), t0())],
        stays: vec![stay(RiskAreaLevel::Medium, t0())],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(2));
    assert_eq!(e.color, CodeColor::Yellow, "0.6 is below 0.9");
    let mut p = policy();
    p.red_score = 0.6;
    let e = evaluate(&p, &facts, t0() + Duration::hours(2));
    assert_eq!(e.color, CodeColor::Red);
}

#[test]
fn pooled_positive_is_yellow_until_a_negative_retest() {
    let mut facts = Facts {
        tests: vec![test(NucleicAcidResult::PoolPositive, t0())],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(7));
    assert_eq!(e.color, CodeColor::Yellow);
    assert_eq!(
        e.reasons[0].code,
        ReasonCode::PoolPositiveRetestPending as i32
    );
    facts.tests.push(negative(t0() + Duration::hours(8)));
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(20));
    assert_eq!(e.color, CodeColor::Green);
    // A positive retest instead makes it red.
    facts.tests.pop();
    facts
        .tests
        .push(test(NucleicAcidResult::Positive, t0() + Duration::hours(8)));
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(20));
    assert_eq!(e.color, CodeColor::Red);
}

fn directive(state: DirectiveState, ends: Option<Time>) -> Directive {
    Directive {
        directive_id: "d-1".into(),
        kind: DirectiveKind::HomeQuarantine,
        starts_at: t0(),
        ends_at: ends,
        state,
        issued_at: t0(),
    }
}

#[test]
fn a_local_directive_alone_leaves_the_color_pending() {
    let facts = Facts {
        directives: vec![directive(DirectiveState::PendingConfirmation, None)],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(1));
    assert_eq!(e.color, CodeColor::Green);
    let pending = e.pending.unwrap();
    assert_eq!(pending.proposed_color, CodeColor::Red);
    assert_eq!(pending.awaiting, ConfirmationInput::NationalCheck);
    assert_eq!(
        e.valid_until,
        Some(t0() + Duration::days(1)),
        "lapses after the timeout"
    );
    // Past the timeout it lapses.
    let e = evaluate(&policy(), &facts, t0() + Duration::days(2));
    assert!(e.pending.is_none());
}

#[test]
fn a_confirmed_directive_holds_until_its_end() {
    let end = t0() + Duration::days(14);
    let facts = Facts {
        directives: vec![directive(DirectiveState::Active, Some(end))],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::days(1));
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(e.valid_until, Some(end));
    assert_eq!(evaluate(&policy(), &facts, end).color, CodeColor::Green);
}

#[test]
fn a_national_check_alone_waits_for_a_local_directive() {
    let facts = Facts {
        national_checks: vec![NationalCheck {
            check_id: "c-1".into(),
            color: CodeColor::Red,
            reasons: vec![],
            checked_at: t0(),
        }],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::hours(1));
    assert_eq!(e.color, CodeColor::Green);
    let pending = e.pending.unwrap();
    assert_eq!(pending.received, ConfirmationInput::NationalCheck);
    assert_eq!(pending.awaiting, ConfirmationInput::LocalDirective);
}

#[test]
fn an_override_decides_the_color_while_it_holds() {
    let facts = Facts {
        contacts: vec![contact(ContactKind::Close, t0(), t0())],
        override_: Some(Override {
            override_id: "o-1".into(),
            color: CodeColor::Green,
            holds_until: Some(t0() + Duration::days(2)),
            applied_at: t0(),
        }),
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0() + Duration::days(1));
    assert_eq!(e.color, CodeColor::Green);
    assert!(e.overridden);
    assert_eq!(codes(&e), vec![ReasonCode::ManualOverride as i32]);
    let e = evaluate(&policy(), &facts, t0() + Duration::days(3));
    assert_eq!(e.color, CodeColor::Red, "the evaluation decides again");
}

#[test]
fn the_default_policy_is_valid_and_bad_rules_are_named() {
    let mut v = Violations::new();
    validate(&policy(), &mut v);
    assert!(v.is_empty());
    let mut p = policy();
    p.rules[0].weight = 3.0;
    p.rules[1].rule_id = p.rules[0].rule_id.clone();
    p.rules[2].condition = None;
    let mut v = Violations::new();
    validate(&p, &mut v);
    let err = v.finish().unwrap_err();
    let text = format!("{err:?}");
    for field in [
        "policy.rules[0].weight",
        "policy.rules[1].rule_id",
        "policy.rules[2].condition",
    ] {
        assert!(text.contains(field), "{field} missing in {text}");
    }
}

fn foreign(province: &str, sequence: u64, color: CodeColor, hours: i64) -> ForeignDecision {
    ForeignDecision {
        province: province.into(),
        sequence,
        color,
        reason_codes: vec![ReasonCode::CloseContact as i32],
        decided_at: t0() - Duration::hours(1),
        valid_until: Some(t0() + Duration::hours(hours)),
        withdrawn: false,
    }
}

#[test]
fn a_withdrawal_replaces_the_decision_of_its_sequence_until_the_next_record() {
    let withdrawn = ForeignDecision {
        withdrawn: true,
        ..foreign("310000", 3, CodeColor::Red, 24)
    };
    // In either order, the withdrawal of sequence 3 is what counts of 310000.
    for held in [
        vec![foreign("310000", 3, CodeColor::Red, 24), withdrawn.clone()],
        vec![withdrawn.clone(), foreign("310000", 3, CodeColor::Red, 24)],
    ] {
        let mut held = held;
        held.push(foreign("310000", 2, CodeColor::Yellow, 24));
        held.push(foreign("320000", 1, CodeColor::Yellow, 24));
        let latest = latest_per_province(held);
        assert_eq!(latest.len(), 2);
        assert!(latest[0].withdrawn && latest[0].sequence == 3);
        let facts = Facts {
            foreign: latest,
            ..Facts::default()
        };
        let e = evaluate(&policy(), &facts, t0());
        assert_eq!(e.color, CodeColor::Yellow, "only 320000's decision counts");
        assert_eq!(e.reasons.len(), 1);
        assert_eq!(e.reasons[0].params["province_code"], "320000");
    }
    // Nothing else held: the withdrawn red is not shown at all.
    let facts = Facts {
        foreign: vec![withdrawn.clone()],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0());
    assert_eq!((e.color, e.local), (CodeColor::Green, None));
    // The province's next record counts again.
    let latest = latest_per_province(vec![withdrawn, foreign("310000", 4, CodeColor::Red, 24)]);
    assert_eq!((latest[0].sequence, latest[0].withdrawn), (4, false));
}

#[test]
fn another_provinces_decision_is_merged_while_valid_and_kept_apart_from_the_local_one() {
    let facts = Facts {
        foreign: vec![foreign("310000", 3, CodeColor::Red, 24)],
        ..Facts::default()
    };
    let e = evaluate(&policy(), &facts, t0());
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(codes(&e), vec![ReasonCode::OtherProvinceDecision as i32]);
    assert_eq!(e.reasons[0].params["province_code"], "310000");
    assert_eq!(e.reasons[0].params["reasons"], "REASON_CODE_CLOSE_CONTACT");
    assert_eq!(e.valid_until, Some(t0() + Duration::hours(24)));
    let local = e.local.expect("the local decision is kept");
    assert_eq!((local.color, local.reasons.len()), (CodeColor::Green, 0));
    // Lapsed: it no longer counts, and nothing local is reported apart.
    let later = evaluate(&policy(), &facts, t0() + Duration::hours(25));
    assert_eq!((later.color, later.local), (CodeColor::Green, None));
}

#[test]
fn a_local_red_stays_first_and_a_foreign_green_changes_nothing() {
    let mut facts = close_contact_facts();
    facts.foreign = vec![
        foreign("310000", 1, CodeColor::Yellow, 2),
        foreign("320000", 1, CodeColor::Green, 2),
    ];
    let alone = evaluate(&policy(), &close_contact_facts(), t0());
    let e = evaluate(&policy(), &facts, t0());
    assert_eq!(e.color, CodeColor::Red);
    assert_eq!(e.reasons[0], alone.reasons[0]);
    assert_eq!(
        e.reasons.last().map(|r| r.code),
        Some(ReasonCode::OtherProvinceDecision as i32)
    );
    assert_eq!(
        e.reasons.len(),
        alone.reasons.len() + 1,
        "the green adds nothing"
    );
    assert_eq!(
        e.clearance, alone.clearance,
        "the local color still decides"
    );
    assert_eq!(e.local.map(|l| l.color), Some(CodeColor::Red));
    // The yellow lapses in two hours: the color is re-evaluated then.
    assert_eq!(e.valid_until, Some(t0() + Duration::hours(2)));
}
