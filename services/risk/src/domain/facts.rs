//! The facts about one person that the policy reads, as the store loads them.

use super::time::Time;
use healthcode_proto::common::v1::{CodeColor, ColorReason, NucleicAcidResult};
use healthcode_proto::risk::v1::{ContactKind, DirectiveKind, DirectiveState, RiskAreaLevel};

#[derive(Debug, Clone)]
pub struct Contact {
    pub kind: ContactKind,
    pub last_exposure_at: Time,
    /// When the service learnt it: a color "is assigned" then.
    pub recorded_at: Time,
}

/// A stay that overlaps a risk area.
#[derive(Debug, Clone)]
pub struct AreaStay {
    pub area_id: String,
    pub area_name: String,
    pub level: RiskAreaLevel,
    pub stay_from: Time,
    pub stay_until: Time,
    /// The later of the stay being recorded and the area being declared.
    pub known_at: Time,
}

#[derive(Debug, Clone)]
pub struct TestResult {
    pub report_id: String,
    pub result: NucleicAcidResult,
    pub sampled_at: Time,
    pub reported_at: Time,
    pub pooled: bool,
    pub recorded_at: Time,
}

#[derive(Debug, Clone)]
pub struct Dose {
    pub dose_number: u32,
    pub completes_course: bool,
    pub booster: bool,
    pub administered_at: Time,
    pub booster_due_at: Option<Time>,
}

#[derive(Debug, Clone)]
pub struct Directive {
    pub directive_id: String,
    pub kind: DirectiveKind,
    pub starts_at: Time,
    pub ends_at: Option<Time>,
    /// As stored: PENDING_CONFIRMATION, ACTIVE, UNCONFIRMED or ENDED.
    pub state: DirectiveState,
    pub issued_at: Time,
}

#[derive(Debug, Clone)]
pub struct NationalCheck {
    pub check_id: String,
    pub color: CodeColor,
    pub reasons: Vec<ColorReason>,
    pub checked_at: Time,
}

#[derive(Debug, Clone)]
pub struct Override {
    pub override_id: String,
    pub color: CodeColor,
    pub holds_until: Option<Time>,
    pub applied_at: Time,
}

/// Another province's decision, from the latest exchange record of that province.
#[derive(Debug, Clone)]
pub struct ForeignDecision {
    pub province: String,
    pub sequence: u64,
    pub color: CodeColor,
    pub reason_codes: Vec<i32>,
    pub decided_at: Time,
    pub valid_until: Option<Time>,
    /// Withdrawn: the key that signed it was distrusted; it counts for nothing.
    pub withdrawn: bool,
}

/// Each province's latest decision: the highest sequence, and of one sequence the
/// withdrawal, which replaces the decision it withdraws.
pub fn latest_per_province(mut decisions: Vec<ForeignDecision>) -> Vec<ForeignDecision> {
    decisions.sort_by(|a, b| {
        (&a.province, b.sequence, b.withdrawn).cmp(&(&b.province, a.sequence, a.withdrawn))
    });
    decisions.dedup_by(|later, kept| later.province == kept.province);
    decisions
}

/// Everything known about one person that a policy may read.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub contacts: Vec<Contact>,
    pub stays: Vec<AreaStay>,
    pub tests: Vec<TestResult>,
    pub doses: Vec<Dose>,
    pub directives: Vec<Directive>,
    pub national_checks: Vec<NationalCheck>,
    /// The applied override, if one decides the color.
    pub override_: Option<Override>,
    /// Other provinces' decisions: the highest sequence of each province.
    pub foreign: Vec<ForeignDecision>,
}

/// Strictness order: red > yellow > green > unspecified.
pub fn rank(color: CodeColor) -> u8 {
    match color {
        CodeColor::Unspecified => 0,
        CodeColor::Green => 1,
        CodeColor::Yellow => 2,
        CodeColor::Red => 3,
    }
}

pub fn stricter(a: CodeColor, b: CodeColor) -> CodeColor {
    if rank(a) >= rank(b) { a } else { b }
}

pub fn color_of(value: i32) -> CodeColor {
    CodeColor::try_from(value).unwrap_or(CodeColor::Unspecified)
}
