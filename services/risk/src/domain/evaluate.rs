//! The evaluation: facts + policy + now → color, reasons, until when it holds, what is left
//! to clear it, and a change waiting for double confirmation. Pure, so every rule, every
//! clearance and the sampled-after rule are tested without a database.

use super::facts::{Facts, ForeignDecision, TestResult, color_of, rank, stricter};
use super::policy::pending_timeout;
use super::time::{Time, duration, opt_duration, to_proto};
use healthcode_proto::common::v1::{CodeColor, ColorReason, NucleicAcidResult, ReasonCode};
use healthcode_proto::risk::v1::rule::Condition;
use healthcode_proto::risk::v1::{
    ClearanceProgress, ConfirmationInput, DirectiveKind, DirectiveState, Policy, Rule,
};
use std::collections::HashMap;

/// A change that has one input of double confirmation and waits for the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub change_id: String,
    pub proposed_color: CodeColor,
    pub reasons: Vec<ColorReason>,
    pub received: ConfirmationInput,
    pub awaiting: ConfirmationInput,
    pub proposed_at: Time,
    pub expires_at: Time,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub color: CodeColor,
    /// Strictest first.
    pub reasons: Vec<ColorReason>,
    /// The next time the evaluation can change without a new fact.
    pub valid_until: Option<Time>,
    pub clearance: Option<ClearanceProgress>,
    pub pending: Option<Pending>,
    pub overridden: bool,
    /// This province's own decision, when another province's decision is merged in.
    pub local: Option<Local>,
}

/// What this province's own facts decide.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    pub color: CodeColor,
    pub reasons: Vec<ColorReason>,
    pub valid_until: Option<Time>,
}

/// One rule matched by one fact.
struct Trigger {
    occurred_at: Time,
    /// When the color was assigned: tests count toward clearance only if sampled after.
    assigned_at: Time,
    /// When the reason stops by itself (a directive's end), if it does.
    ends_at: Option<Time>,
    params: HashMap<String, String>,
}

struct Active<'a> {
    rule: &'a Rule,
    trigger: Trigger,
    holds_until: Option<Time>,
    progress: Option<ClearanceProgress>,
}

/// Evaluates `facts` under `policy` at `now`, then merges in the other provinces'
/// decisions that are yellow or red and still valid: the strictest color decides (a tie
/// keeps this province's reasons first), each such decision is a reason of its own, the
/// color holds until the first of them lapses, and `local` keeps what this province's own
/// facts decide (the exchange issues that, so decisions never echo back).
pub fn evaluate(policy: &Policy, facts: &Facts, now: Time) -> Evaluation {
    let own = evaluate_local(policy, facts, now);
    let mut foreign: Vec<&ForeignDecision> = facts
        .foreign
        .iter()
        .filter(|f| !f.withdrawn && rank(f.color) > rank(CodeColor::Green))
        .filter(|f| f.valid_until.is_none_or(|until| until > now))
        .collect();
    if foreign.is_empty() {
        return own;
    }
    foreign.sort_by(|a, b| a.province.cmp(&b.province));
    let mut merged = own.clone();
    merged.local = Some(Local {
        color: own.color,
        reasons: own.reasons.clone(),
        valid_until: own.valid_until,
    });
    for f in &foreign {
        merged.color = stricter(merged.color, f.color);
        merged.reasons.push(foreign_reason(f));
        if let Some(until) = f.valid_until {
            merged.valid_until = Some(merged.valid_until.map_or(until, |v| v.min(until)));
        }
    }
    // Stable: within a color, this province's reasons stay first.
    merged
        .reasons
        .sort_by_key(|r| std::cmp::Reverse(rank(color_of(r.color))));
    if foreign.iter().any(|f| rank(f.color) >= rank(merged.color)) {
        // What clears this province's color does not clear another province's decision.
        merged.clearance = None;
    }
    if merged.color != own.color {
        // The override no longer decides what is shown.
        merged.overridden = false;
    }
    if merged
        .pending
        .as_ref()
        .is_some_and(|p| rank(p.proposed_color) <= rank(merged.color))
    {
        // Nothing would change when it is confirmed; it comes back with the local
        // evaluation if the other province's decision lapses first.
        merged.pending = None;
    }
    merged
}

fn foreign_reason(f: &ForeignDecision) -> ColorReason {
    let codes: Vec<&str> = f
        .reason_codes
        .iter()
        .filter_map(|c| ReasonCode::try_from(*c).ok())
        .map(|c| c.as_str_name())
        .collect();
    ColorReason {
        code: ReasonCode::OtherProvinceDecision as i32,
        color: f.color as i32,
        occurred_at: Some(to_proto(f.decided_at)),
        holds_until: f.valid_until.map(to_proto),
        rule_id: String::new(),
        params: HashMap::from([
            ("province_code".to_owned(), f.province.clone()),
            ("reasons".to_owned(), codes.join(",")),
        ]),
    }
}

/// Evaluates this province's own facts under `policy` at `now`.
fn evaluate_local(policy: &Policy, facts: &Facts, now: Time) -> Evaluation {
    if let Some(o) = &facts.override_
        && o.holds_until.is_none_or(|until| now < until)
    {
        return overridden(o, now);
    }
    let mut next_change: Vec<Time> = Vec::new();
    if let Some(o) = &facts.override_
        && let Some(until) = o.holds_until
        && until > now
    {
        next_change.push(until);
    }
    let mut active = Vec::new();
    for rule in &policy.rules {
        for trigger in triggers(rule, facts, now, &mut next_change) {
            if let Some(a) = activate(rule, trigger, facts, now, &mut next_change) {
                active.push(a);
            }
        }
    }
    let color = decide_color(policy, &active);
    active.sort_by(|a, b| {
        rank(color_of(b.rule.color))
            .cmp(&rank(color_of(a.rule.color)))
            .then(b.trigger.occurred_at.cmp(&a.trigger.occurred_at))
    });
    let clearance = active
        .iter()
        .find(|a| color_of(a.rule.color) == color)
        .and_then(|a| a.progress);
    let reasons: Vec<ColorReason> = active.iter().map(reason_of).collect();
    let pending = pending(policy, facts, color, now, &mut next_change);
    Evaluation {
        color,
        reasons,
        valid_until: next_change.into_iter().filter(|t| *t > now).min(),
        clearance,
        pending,
        overridden: false,
        local: None,
    }
}

fn overridden(o: &super::facts::Override, _now: Time) -> Evaluation {
    Evaluation {
        color: o.color,
        reasons: vec![ColorReason {
            code: ReasonCode::ManualOverride as i32,
            color: o.color as i32,
            occurred_at: Some(to_proto(o.applied_at)),
            holds_until: o.holds_until.map(to_proto),
            rule_id: String::new(),
            params: HashMap::from([("override_id".to_owned(), o.override_id.clone())]),
        }],
        valid_until: o.holds_until,
        clearance: None,
        pending: None,
        overridden: true,
        local: None,
    }
}

fn decide_color(policy: &Policy, active: &[Active<'_>]) -> CodeColor {
    let mut color = CodeColor::Green;
    let mut score = 0.0;
    let mut scored = std::collections::HashSet::new();
    for a in active {
        color = stricter(color, color_of(a.rule.color));
        if scored.insert(a.rule.rule_id.as_str()) {
            score += a.rule.weight;
        }
    }
    // A tiny epsilon so that 0.6 + 0.3 reaches a 0.9 threshold despite binary fractions.
    if policy.red_score > 0.0 && score + 1e-9 >= policy.red_score {
        color = stricter(color, CodeColor::Red);
    } else if policy.yellow_score > 0.0 && score + 1e-9 >= policy.yellow_score {
        color = stricter(color, CodeColor::Yellow);
    }
    color
}

fn reason_of(a: &Active<'_>) -> ColorReason {
    ColorReason {
        code: a.rule.reason_code,
        color: a.rule.color,
        occurred_at: Some(to_proto(a.trigger.occurred_at)),
        holds_until: a.holds_until.map(to_proto),
        rule_id: a.rule.rule_id.clone(),
        params: a.trigger.params.clone(),
    }
}

fn within(d: &Option<prost_types::Duration>) -> chrono::Duration {
    d.as_ref()
        .and_then(duration)
        .unwrap_or(chrono::Duration::zero())
}

/// The facts that match a rule's condition. Per rule only the latest trigger matters for
/// clearance, but every distinct fact is a reason the person may want to see; we keep the
/// latest, which carries the strictest clearance (tests must follow it).
fn triggers(rule: &Rule, facts: &Facts, now: Time, next_change: &mut Vec<Time>) -> Vec<Trigger> {
    let plain = |occurred_at: Time, assigned_at: Time| Trigger {
        occurred_at,
        assigned_at,
        ends_at: None,
        params: HashMap::new(),
    };
    let mut found: Vec<Trigger> = match &rule.condition {
        None => Vec::new(),
        Some(Condition::Contact(c)) => facts
            .contacts
            .iter()
            .filter(|f| f.kind as i32 == c.kind)
            .filter(|f| f.recorded_at - f.last_exposure_at <= within(&c.within))
            .map(|f| plain(f.last_exposure_at, f.recorded_at.max(f.last_exposure_at)))
            .collect(),
        Some(Condition::AreaStay(c)) => facts
            .stays
            .iter()
            .filter(|s| s.level as i32 >= c.min_level)
            .filter(|s| s.known_at - s.stay_until <= within(&c.within))
            .map(|s| {
                let mut t = plain(s.stay_until, s.known_at.max(s.stay_until));
                t.params.insert("area_name".into(), s.area_name.clone());
                t.params.insert("area_id".into(), s.area_id.clone());
                t
            })
            .collect(),
        Some(Condition::Test(c)) if !c.absent => facts
            .tests
            .iter()
            .filter(|t| t.result as i32 == c.result)
            .filter(|t| t.recorded_at.max(t.reported_at) - t.sampled_at <= within(&c.within))
            // Assigned when the laboratory reported it, not when the result reached this
            // service: a retest sampled after the report clears it even when delivery lagged.
            .map(|t| plain(t.sampled_at, t.reported_at))
            .collect(),
        Some(Condition::Test(c)) => {
            // "No such result within `within`": holds from the moment the last one ages out.
            let last = facts
                .tests
                .iter()
                .filter(|t| t.result as i32 == c.result)
                .map(|t| t.sampled_at)
                .max();
            match last.map(|at| at + within(&c.within)) {
                Some(ages_out) if ages_out > now => {
                    next_change.push(ages_out);
                    Vec::new()
                }
                Some(ages_out) => vec![plain(ages_out, ages_out)],
                None => vec![plain(now, now)],
            }
        }
        Some(Condition::Vaccination(c)) => {
            let mut out = Vec::new();
            if c.course_incomplete && !facts.doses.iter().any(|d| d.completes_course) {
                out.push(plain(now, now));
            }
            if let Some(overdue_by) = opt_duration(&c.booster_overdue_by) {
                let latest = facts.doses.iter().max_by_key(|d| d.administered_at);
                if let Some(due) = latest.and_then(|d| d.booster_due_at) {
                    let overdue_at = due + overdue_by;
                    if overdue_at <= now {
                        out.push(plain(overdue_at, overdue_at));
                    } else {
                        next_change.push(overdue_at);
                    }
                }
            }
            out
        }
        Some(Condition::Directive(c)) => facts
            .directives
            .iter()
            .filter(|d| d.kind as i32 == c.kind && d.state == DirectiveState::Active)
            .filter_map(|d| {
                if d.starts_at > now {
                    next_change.push(d.starts_at);
                    return None;
                }
                if d.ends_at.is_some_and(|end| end <= now) {
                    return None;
                }
                let mut t = plain(d.starts_at, d.starts_at);
                t.ends_at = d.ends_at;
                t.params
                    .insert("directive_id".into(), d.directive_id.clone());
                Some(t)
            })
            .collect(),
    };
    found.sort_by_key(|t| (t.assigned_at, t.occurred_at));
    found.pop().into_iter().collect()
}

/// Applies `holds_for` and the clearance; `None` when the trigger no longer counts.
fn activate<'a>(
    rule: &'a Rule,
    trigger: Trigger,
    facts: &Facts,
    now: Time,
    next_change: &mut Vec<Time>,
) -> Option<Active<'a>> {
    let mut ends = trigger.ends_at;
    if let Some(holds_for) = opt_duration(&rule.holds_for) {
        let until = trigger.occurred_at + holds_for;
        ends = Some(ends.map_or(until, |e| e.min(until)));
    }
    if ends.is_some_and(|end| end <= now) {
        return None;
    }
    let mut progress = None;
    if let Some(clearance) = &rule.clearance {
        let earliest =
            trigger.assigned_at + opt_duration(&clearance.min_elapsed).unwrap_or_default();
        let (recorded, tests_met) = negative_tests(
            &facts.tests,
            trigger.assigned_at,
            clearance.negative_tests,
            opt_duration(&clearance.tests_within),
        );
        if tests_met && earliest <= now {
            return None;
        }
        if tests_met || clearance.negative_tests == 0 {
            // Only time is left: the reason ends by itself then.
            ends = Some(ends.map_or(earliest, |e| e.min(earliest)));
        }
        progress = Some(ClearanceProgress {
            negative_tests_required: clearance.negative_tests,
            negative_tests_recorded: recorded.min(clearance.negative_tests),
            tests_window_start: Some(to_proto(trigger.assigned_at)),
            earliest_clear_at: Some(to_proto(earliest)),
        });
    }
    if let Some(end) = ends {
        next_change.push(end);
    }
    let mut trigger = trigger;
    if let Some(p) = &progress {
        let remaining = p.negative_tests_required - p.negative_tests_recorded;
        trigger
            .params
            .insert("negative_tests_remaining".into(), remaining.to_string());
    }
    Some(Active {
        rule,
        trigger,
        holds_until: ends,
        progress,
    })
}

/// Negative results sampled after `assigned_at`: how many count, and whether `needed` of
/// them fall within one window of `window` (the latest `needed` consecutive ones).
fn negative_tests(
    tests: &[TestResult],
    assigned_at: Time,
    needed: u32,
    window: Option<chrono::Duration>,
) -> (u32, bool) {
    let mut samples: Vec<Time> = tests
        .iter()
        .filter(|t| t.result == NucleicAcidResult::Negative && t.sampled_at > assigned_at)
        .map(|t| t.sampled_at)
        .collect();
    samples.sort();
    samples.dedup();
    if needed == 0 {
        return (0, true);
    }
    let best = samples
        .iter()
        .map(|&end| {
            samples
                .iter()
                .filter(|&&s| s <= end && window.is_none_or(|w| end - s <= w))
                .count() as u32
        })
        .max()
        .unwrap_or(0);
    (best.min(needed), best >= needed)
}

/// The color a directive kind calls for under the policy (its directive rule's color).
pub fn directive_color(policy: &Policy, kind: DirectiveKind) -> Option<(CodeColor, &Rule)> {
    policy.rules.iter().find_map(|rule| match &rule.condition {
        Some(Condition::Directive(c)) if c.kind == kind as i32 => {
            Some((color_of(rule.color), rule))
        }
        _ => None,
    })
}

/// A stricter color with one input of double confirmation: a local directive waiting for
/// the national check, or a national check waiting for a local directive.
fn pending(
    policy: &Policy,
    facts: &Facts,
    current: CodeColor,
    now: Time,
    next_change: &mut Vec<Time>,
) -> Option<Pending> {
    let timeout = pending_timeout(policy);
    let local = facts
        .directives
        .iter()
        .filter(|d| d.state == DirectiveState::PendingConfirmation)
        .filter(|d| d.issued_at + timeout > now && d.ends_at.is_none_or(|e| e > now))
        .filter_map(|d| {
            let (color, rule) = directive_color(policy, d.kind)?;
            (rank(color) > rank(current)).then(|| Pending {
                change_id: d.directive_id.clone(),
                proposed_color: color,
                reasons: vec![ColorReason {
                    code: rule.reason_code,
                    color: color as i32,
                    occurred_at: Some(to_proto(d.starts_at)),
                    holds_until: d.ends_at.map(to_proto),
                    rule_id: rule.rule_id.clone(),
                    params: HashMap::from([("directive_id".to_owned(), d.directive_id.clone())]),
                }],
                received: ConfirmationInput::LocalDirective,
                awaiting: ConfirmationInput::NationalCheck,
                proposed_at: d.issued_at,
                expires_at: d.issued_at + timeout,
            })
        })
        .max_by_key(|p| (rank(p.proposed_color), p.proposed_at));
    let any_directive_since = |at: Time| {
        facts
            .directives
            .iter()
            .any(|d| d.issued_at >= at && d.state != DirectiveState::Unconfirmed)
    };
    let national = || {
        facts
            .national_checks
            .iter()
            .filter(|c| c.checked_at + timeout > now)
            .filter(|c| rank(c.color) > rank(current) && !any_directive_since(c.checked_at))
            .max_by_key(|c| c.checked_at)
            .map(|c| Pending {
                change_id: c.check_id.clone(),
                proposed_color: c.color,
                reasons: c.reasons.clone(),
                received: ConfirmationInput::NationalCheck,
                awaiting: ConfirmationInput::LocalDirective,
                proposed_at: c.checked_at,
                expires_at: c.checked_at + timeout,
            })
    };
    let found = local.or_else(national);
    if let Some(p) = &found {
        next_change.push(p.expires_at);
    }
    found
}

#[cfg(test)]
mod tests;
