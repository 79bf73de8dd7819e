//! The identity domain: pure rules, no I/O. Most of the tests live here.

pub mod document;
pub mod fields;
pub mod verification;

pub use document::{Document, DocumentError, DocumentType};
pub use fields::{CardNumber, EnglishName, FieldError, Image, PersonName, PhoneCode, PhoneNumber};
pub use verification::{FaceScore, Step, StepError, StepState, Steps};
