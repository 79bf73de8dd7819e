//! The four verification steps as a state machine. Pure: the store applies what this decides.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    IdentityDetails,
    Phone,
    FaceMatch,
    BankCard,
}

impl Step {
    pub const ALL: [Step; 4] = [
        Step::IdentityDetails,
        Step::Phone,
        Step::FaceMatch,
        Step::BankCard,
    ];

    pub fn code(self) -> i32 {
        match self {
            Step::IdentityDetails => 1,
            Step::Phone => 2,
            Step::FaceMatch => 3,
            Step::BankCard => 4,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        Step::ALL.into_iter().find(|s| s.code() == code)
    }

    fn index(self) -> usize {
        (self.code() - 1) as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::IdentityDetails => "identity details",
            Step::Phone => "phone",
            Step::FaceMatch => "face match",
            Step::BankCard => "bank card",
        }
    }

    fn previous(self) -> Option<Step> {
        match self {
            Step::IdentityDetails => None,
            Step::Phone => Some(Step::IdentityDetails),
            Step::FaceMatch => Some(Step::Phone),
            Step::BankCard => Some(Step::FaceMatch),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    NotStarted,
    InProgress,
    PendingReview,
    Passed,
    Failed,
}

impl StepState {
    pub fn code(self) -> i32 {
        match self {
            StepState::NotStarted => 1,
            StepState::InProgress => 2,
            StepState::PendingReview => 3,
            StepState::Passed => 4,
            StepState::Failed => 5,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        [
            StepState::NotStarted,
            StepState::InProgress,
            StepState::PendingReview,
            StepState::Passed,
            StepState::Failed,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }
}

/// Why a step cannot be taken now. Each maps to FAILED_PRECONDITION with its reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("the {} step must pass first", .0.name())]
    PreviousStepNotPassed(Step),
    #[error("the {} step has already passed", .0.name())]
    AlreadyPassed(Step),
    #[error("the {} step is waiting for a manual review", .0.name())]
    AwaitingReview(Step),
    #[error("identity details were rejected by review; the registration cannot be verified")]
    IdentityRejected,
    #[error("a dependent is verified through the guardian and takes no further steps")]
    Dependent,
}

impl StepError {
    pub fn reason(&self) -> &'static str {
        match self {
            StepError::PreviousStepNotPassed(_) => "PREVIOUS_STEP_NOT_PASSED",
            StepError::AlreadyPassed(_) => "STEP_ALREADY_PASSED",
            StepError::AwaitingReview(_) => "STEP_AWAITING_REVIEW",
            StepError::IdentityRejected => "IDENTITY_REJECTED",
            StepError::Dependent => "DEPENDENT_NO_STEPS",
        }
    }
}

/// Face-match confidence, 0 to 100, as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceScore(pub u8);

/// At or above it a face match passes; below `FACE_REVIEW_FLOOR` it fails; between, a
/// person looks at it.
pub const FACE_PASS_SCORE: u8 = 80;
pub const FACE_REVIEW_FLOOR: u8 = 60;

impl FaceScore {
    pub fn outcome(self) -> (StepState, &'static str) {
        if self.0 >= FACE_PASS_SCORE {
            (StepState::Passed, "")
        } else if self.0 >= FACE_REVIEW_FLOOR {
            (StepState::PendingReview, "FACE_LOW_CONFIDENCE")
        } else {
            (StepState::Failed, "FACE_MISMATCH")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps([StepState; 4]);

impl Default for Steps {
    fn default() -> Self {
        Steps([StepState::NotStarted; 4])
    }
}

impl Steps {
    pub fn with(mut self, step: Step, state: StepState) -> Self {
        self.0[step.index()] = state;
        self
    }

    pub fn state(&self, step: Step) -> StepState {
        self.0[step.index()]
    }

    /// Whether `step` may be attempted (or attempted again) now.
    pub fn can_attempt(&self, step: Step, is_dependent: bool) -> Result<(), StepError> {
        if is_dependent && step != Step::IdentityDetails {
            return Err(StepError::Dependent);
        }
        if self.state(Step::IdentityDetails) == StepState::Failed {
            return Err(StepError::IdentityRejected);
        }
        if let Some(previous) = step.previous()
            && self.state(previous) != StepState::Passed
        {
            return Err(StepError::PreviousStepNotPassed(previous));
        }
        match self.state(step) {
            StepState::Passed => Err(StepError::AlreadyPassed(step)),
            StepState::PendingReview => Err(StepError::AwaitingReview(step)),
            _ => Ok(()),
        }
    }

    /// Identity details, phone and face match passed; the bank card only raises the level.
    pub fn all_required_passed(&self) -> bool {
        [Step::IdentityDetails, Step::Phone, Step::FaceMatch]
            .iter()
            .all(|s| self.state(*s) == StepState::Passed)
    }

    /// The number of steps passed in order.
    pub fn level(&self) -> u32 {
        Step::ALL
            .iter()
            .take_while(|s| self.state(**s) == StepState::Passed)
            .count() as u32
    }

    pub fn is_verified(&self, guardian_verified: Option<bool>) -> bool {
        match guardian_verified {
            Some(guardian) => guardian && self.state(Step::IdentityDetails) == StepState::Passed,
            None => self.all_required_passed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_must_be_taken_in_order() {
        let steps = Steps::default().with(Step::IdentityDetails, StepState::Passed);
        assert_eq!(steps.can_attempt(Step::Phone, false), Ok(()));
        assert_eq!(
            steps.can_attempt(Step::FaceMatch, false),
            Err(StepError::PreviousStepNotPassed(Step::Phone))
        );
        let steps = steps.with(Step::Phone, StepState::Passed);
        assert_eq!(
            steps.can_attempt(Step::Phone, false),
            Err(StepError::AlreadyPassed(Step::Phone))
        );
        assert_eq!(steps.can_attempt(Step::FaceMatch, false), Ok(()));
    }

    #[test]
    fn verified_needs_the_three_required_steps_and_the_bank_card_raises_the_level() {
        let mut steps = Steps::default();
        for step in [Step::IdentityDetails, Step::Phone] {
            steps = steps.with(step, StepState::Passed);
            assert!(!steps.is_verified(None));
        }
        steps = steps.with(Step::FaceMatch, StepState::Passed);
        assert!(steps.is_verified(None));
        assert_eq!(steps.level(), 3);
        assert_eq!(steps.with(Step::BankCard, StepState::Passed).level(), 4);
    }

    #[test]
    fn a_failed_step_can_be_retried_but_review_and_rejection_block() {
        let steps = Steps::default()
            .with(Step::IdentityDetails, StepState::Passed)
            .with(Step::Phone, StepState::Passed)
            .with(Step::FaceMatch, StepState::Failed);
        assert_eq!(steps.can_attempt(Step::FaceMatch, false), Ok(()));
        let steps = steps.with(Step::FaceMatch, StepState::PendingReview);
        assert_eq!(
            steps.can_attempt(Step::FaceMatch, false),
            Err(StepError::AwaitingReview(Step::FaceMatch))
        );
        let rejected = Steps::default().with(Step::IdentityDetails, StepState::Failed);
        assert_eq!(
            rejected.can_attempt(Step::Phone, false),
            Err(StepError::IdentityRejected)
        );
    }

    #[test]
    fn dependents_are_verified_through_their_guardian() {
        let steps = Steps::default().with(Step::IdentityDetails, StepState::Passed);
        assert!(steps.is_verified(Some(true)));
        assert!(!steps.is_verified(Some(false)));
        assert_eq!(
            steps.can_attempt(Step::Phone, true),
            Err(StepError::Dependent)
        );
    }

    #[test]
    fn face_scores_pass_fail_or_go_to_review() {
        assert_eq!(FaceScore(95).outcome().0, StepState::Passed);
        assert_eq!(
            FaceScore(70).outcome(),
            (StepState::PendingReview, "FACE_LOW_CONFIDENCE")
        );
        assert_eq!(FaceScore(10).outcome().0, StepState::Failed);
    }
}
