//! Payment providers behind one interface. Real providers (WeChat Pay, Alipay, UnionPay)
//! are adapters outside this repository; the sandbox provider here behaves like them,
//! failures included, and is deterministic:
//!
//! - An order is de-duplicated on the merchant reference (our idempotency key), as real
//!   providers do: the same reference never makes a second order or a second charge.
//! - Creating an order for an amount whose last two digits are 99 fen times out, the way
//!   a provider that does not answer does (nothing is charged; a retry may succeed later).
//! - Notifications are JSON signed with the sandbox's SM2 key; [`SandboxProvider::notify`]
//!   produces them as the provider would (success, decline, timeout, refund), and sending
//!   one twice is the duplicate callback.

use async_trait::async_trait;
use healthcode_crypto::SigningKey;
use healthcode_proto::testing::v1::{PaymentOutcome, PaymentProvider};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub transaction_id: String,
    pub client_parameters: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("the payment provider did not answer in time")]
    Timeout,
    #[error("the payment provider is unavailable")]
    Unavailable,
}

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    fn provider(&self) -> PaymentProvider;
    /// Creates (or finds, for a reference seen before) the order for `merchant_ref`.
    async fn create_order(
        &self,
        merchant_ref: &str,
        payment_id: &str,
        amount_fen: i64,
    ) -> Result<Order, ProviderError>;
    /// Refunds a paid order; idempotent on `refund_ref`.
    async fn refund(
        &self,
        transaction_id: &str,
        refund_ref: &str,
        amount_fen: i64,
    ) -> Result<(), ProviderError>;
    /// Whether `signature` is the provider's signature over `raw`.
    fn verify(&self, raw: &[u8], signature: &[u8]) -> bool;
}

/// A provider's notification as it is signed (the body of the callback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub payment_id: String,
    pub notification_id: String,
    pub provider_transaction_id: String,
    /// `PaymentOutcome` value.
    pub outcome: i32,
    pub amount_fen: i64,
    /// Unix seconds.
    pub occurred_at: i64,
    #[serde(default)]
    pub decline_reason: String,
}

impl Notification {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        serde_json::from_slice(raw).ok()
    }
}

pub struct SandboxProvider {
    key: SigningKey,
    orders: Mutex<HashMap<String, Order>>,
    refunds: Mutex<HashSet<String>>,
}

impl SandboxProvider {
    pub fn new(key: SigningKey) -> Self {
        SandboxProvider {
            key,
            orders: Mutex::new(HashMap::new()),
            refunds: Mutex::new(HashSet::new()),
        }
    }

    /// Orders created so far (distinct merchant references).
    pub fn orders_created(&self) -> usize {
        self.orders.lock().map(|o| o.len()).unwrap_or(0)
    }

    /// Refunds made so far (distinct refund references).
    pub fn refunds_made(&self) -> usize {
        self.refunds.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// The signed callback the provider sends: `(raw notification, signature)`.
    pub fn notify(
        &self,
        notification: &Notification,
    ) -> Result<(Vec<u8>, Vec<u8>), healthcode_crypto::CryptoError> {
        let raw = serde_json::to_vec(notification).unwrap_or_default();
        let signature = self.key.sign(&raw)?;
        Ok((raw, signature))
    }

    /// A notification of `outcome` for an order this provider made.
    pub fn notification(
        &self,
        payment_id: &str,
        transaction_id: &str,
        outcome: PaymentOutcome,
        amount_fen: i64,
    ) -> Notification {
        Notification {
            payment_id: payment_id.to_owned(),
            notification_id: uuid::Uuid::new_v4().to_string(),
            provider_transaction_id: transaction_id.to_owned(),
            outcome: outcome as i32,
            amount_fen,
            occurred_at: chrono::Utc::now().timestamp(),
            decline_reason: if outcome == PaymentOutcome::Declined {
                "INSUFFICIENT_FUNDS".into()
            } else {
                String::new()
            },
        }
    }
}

#[async_trait]
impl PaymentGateway for SandboxProvider {
    fn provider(&self) -> PaymentProvider {
        PaymentProvider::Sandbox
    }

    async fn create_order(
        &self,
        merchant_ref: &str,
        payment_id: &str,
        amount_fen: i64,
    ) -> Result<Order, ProviderError> {
        if amount_fen % 100 == 99 {
            return Err(ProviderError::Timeout);
        }
        let mut orders = self.orders.lock().map_err(|_| ProviderError::Unavailable)?;
        let order = orders.entry(merchant_ref.to_owned()).or_insert_with(|| {
            let digest = healthcode_crypto::sm3_digest(merchant_ref.as_bytes());
            let transaction_id = format!("sbx{}", &hex::encode(digest)[..24]);
            Order {
                client_parameters: BTreeMap::from([
                    ("prepay_id".to_owned(), transaction_id.clone()),
                    ("payment_id".to_owned(), payment_id.to_owned()),
                ]),
                transaction_id,
            }
        });
        Ok(order.clone())
    }

    async fn refund(
        &self,
        _transaction_id: &str,
        refund_ref: &str,
        _amount_fen: i64,
    ) -> Result<(), ProviderError> {
        self.refunds
            .lock()
            .map_err(|_| ProviderError::Unavailable)?
            .insert(refund_ref.to_owned());
        Ok(())
    }

    fn verify(&self, raw: &[u8], signature: &[u8]) -> bool {
        self.key.verifying_key().verify(raw, signature).is_ok()
    }
}

/// The providers this deployment can take payments with.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: HashMap<i32, Arc<dyn PaymentGateway>>,
}

impl Providers {
    pub fn with(mut self, provider: Arc<dyn PaymentGateway>) -> Self {
        self.by_kind.insert(provider.provider() as i32, provider);
        self
    }

    pub fn get(&self, kind: i32) -> Option<&Arc<dyn PaymentGateway>> {
        self.by_kind.get(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sandbox_orders_once_per_reference_and_signs_notifications() {
        let sandbox = SandboxProvider::new(SigningKey::generate("t").unwrap());
        let a = sandbox.create_order("ref-1", "p1", 1500).await.unwrap();
        let b = sandbox.create_order("ref-1", "p1", 1500).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(sandbox.orders_created(), 1);
        assert_eq!(
            sandbox.create_order("ref-2", "p2", 1999).await,
            Err(ProviderError::Timeout)
        );
        let n = sandbox.notification("p1", &a.transaction_id, PaymentOutcome::Succeeded, 1500);
        let (raw, sig) = sandbox.notify(&n).unwrap();
        assert!(sandbox.verify(&raw, &sig));
        assert_eq!(Notification::parse(&raw), Some(n));
        let mut tampered = raw.clone();
        tampered[5] ^= 1;
        assert!(!sandbox.verify(&tampered, &sig));
    }
}
