//! External providers that a province contracts (SMS gateway, face match against the
//! document photo, bank-card real-name check). Each sits behind a trait; the local
//! implementations here are deterministic stand-ins that fail the way the real ones do.

use crate::domain::{CardNumber, Document, FaceScore, Image, PersonName, PhoneCode, PhoneNumber};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Down, timed out or overloaded: the caller may retry later.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused this input (e.g. a number the carrier cannot reach).
    #[error("provider refused the request: {0}")]
    Rejected(String),
}

#[async_trait]
pub trait SmsSender: Send + Sync + 'static {
    async fn send_code(&self, phone: &PhoneNumber, code: &PhoneCode) -> Result<(), ProviderError>;
}

#[async_trait]
pub trait FaceMatcher: Send + Sync + 'static {
    /// Compares a live image with the photo the authority holds for the document.
    async fn compare(&self, document: &Document, live: &Image) -> Result<FaceScore, ProviderError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankCardOutcome {
    /// The card's holder has this real name and document.
    Match,
    NameMismatch,
}

#[async_trait]
pub trait BankCardVerifier: Send + Sync + 'static {
    async fn verify(
        &self,
        name: &PersonName,
        document: &Document,
        card: &CardNumber,
    ) -> Result<BankCardOutcome, ProviderError>;
}

#[derive(Clone)]
pub struct Providers {
    pub sms: Arc<dyn SmsSender>,
    pub face: Arc<dyn FaceMatcher>,
    pub bank_card: Arc<dyn BankCardVerifier>,
}

impl Providers {
    /// The deterministic local providers, with a handle on the SMS outbox.
    pub fn local() -> (Self, Arc<LocalSms>) {
        let sms = Arc::new(LocalSms::default());
        (
            Providers {
                sms: sms.clone(),
                face: Arc::new(LocalFaceMatcher),
                bank_card: Arc::new(LocalBankCard),
            },
            sms,
        )
    }
}

/// Delivers nothing: keeps the last code per number for tests, and logs it (with the number
/// masked) so that a developer running the mesh can finish the phone step. Numbers ending
/// in 0000 are refused by the "carrier"; numbers ending in 9999 find the gateway down.
#[derive(Debug, Default)]
pub struct LocalSms {
    sent: Mutex<HashMap<String, String>>,
}

impl LocalSms {
    /// The last code sent to `phone` (11 digits), if any.
    pub fn last_code(&self, phone: &str) -> Option<String> {
        self.sent.lock().ok()?.get(phone).cloned()
    }
}

#[async_trait]
impl SmsSender for LocalSms {
    async fn send_code(&self, phone: &PhoneNumber, code: &PhoneCode) -> Result<(), ProviderError> {
        if phone.as_str().ends_with("0000") {
            return Err(ProviderError::Rejected("number not reachable".into()));
        }
        if phone.as_str().ends_with("9999") {
            return Err(ProviderError::Unavailable("SMS gateway timed out".into()));
        }
        if let Ok(mut sent) = self.sent.lock() {
            sent.insert(phone.as_str().to_owned(), code.as_str().to_owned());
        }
        // Its own target, off in the span exporter's default filter: a code is a secret
        // even in development, and only the local console should show it.
        tracing::warn!(
            target: "dev_sms",
            phone_tail = &phone.as_str()[7..],
            code = code.as_str(),
            "local SMS sender (development only): one-time code"
        );
        Ok(())
    }
}

/// Scores a live image. A real photo scores 92; a test image may carry `score=NN` to ask
/// for another score, or `provider=down` to find the provider unavailable.
#[derive(Debug, Default)]
pub struct LocalFaceMatcher;

fn find_marker(bytes: &[u8], marker: &[u8]) -> Option<usize> {
    bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .map(|p| p + marker.len())
}

#[async_trait]
impl FaceMatcher for LocalFaceMatcher {
    async fn compare(
        &self,
        _document: &Document,
        live: &Image,
    ) -> Result<FaceScore, ProviderError> {
        let bytes = live.bytes();
        if find_marker(bytes, b"provider=down").is_some() {
            return Err(ProviderError::Unavailable("face service timed out".into()));
        }
        let score = find_marker(bytes, b"score=")
            .and_then(|start| {
                let digits: String = bytes[start..]
                    .iter()
                    .take(3)
                    .take_while(|b| b.is_ascii_digit())
                    .map(|b| char::from(*b))
                    .collect();
                digits.parse::<u8>().ok()
            })
            .unwrap_or(92);
        Ok(FaceScore(score.min(100)))
    }
}

/// Card numbers starting 4000 belong to someone else; 5000 finds the bank down.
#[derive(Debug, Default)]
pub struct LocalBankCard;

#[async_trait]
impl BankCardVerifier for LocalBankCard {
    async fn verify(
        &self,
        _name: &PersonName,
        _document: &Document,
        card: &CardNumber,
    ) -> Result<BankCardOutcome, ProviderError> {
        if card.as_str().starts_with("5000") {
            return Err(ProviderError::Unavailable(
                "bank interface timed out".into(),
            ));
        }
        if card.as_str().starts_with("4000") {
            return Ok(BankCardOutcome::NameMismatch);
        }
        Ok(BankCardOutcome::Match)
    }
}
