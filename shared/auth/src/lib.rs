//! Who is calling. Internal callers present a caller token in the `authorization` metadata:
//!
//! `Bearer hc1.<key id>.<claims, base64url JSON>.<SM2 signature, base64url DER>`
//!
//! The signature covers `hc1.<key id>.<claims>`. Tokens are minted by the province's
//! operators with an issuer key (`healthcode token mint`); services trust the issuer public
//! keys listed in `AUTH_ISSUER_KEYS`, so an issuer key can rotate by listing two.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use healthcode_crypto::{SigningKey, TrustedKeys};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Roles a caller token can carry.
pub mod roles {
    /// The super-app backend acting for a person: register, verify, dependents.
    pub const APP: &str = "app";
    /// An epidemic-office official: may file military officer cards.
    pub const OFFICIAL: &str = "official";
    /// Decides the manual review queue.
    pub const REVIEWER: &str = "reviewer";
    /// May read unmasked personal data.
    pub const FULL_VIEW: &str = "full_view";
    /// A venue scanner: masked views only.
    pub const VENUE: &str = "venue";
    /// Another service of this mesh (the gateway asking risk, testing reporting results).
    pub const INTERNAL: &str = "internal";
    /// Publishes the province's risk policy versions.
    pub const POLICY_ADMIN: &str = "policy_admin";
    /// Approves manual color overrides and held bulk changes; two distinct ones are needed.
    pub const APPROVER: &str = "approver";
    /// Reads the audit trail.
    pub const AUDITOR: &str = "auditor";
    /// A 12345 hotline agent (red-code appeals).
    pub const HOTLINE: &str = "hotline";
    /// A school or employer system checking many persons at once.
    pub const BATCH_CHECKER: &str = "batch_checker";
    /// Registers testing institutions.
    pub const HEALTH_ADMIN: &str = "health_admin";
    /// Staff of one testing institution; the token's subject is the institution id.
    pub const INSTITUTION: &str = "institution";
    /// A laboratory uploading results; the token's subject is its institution id.
    pub const LAB: &str = "lab";
    /// The adapter that receives a payment provider's notifications.
    pub const PAYMENT_PROVIDER: &str = "payment_provider";
    /// Staff of one vaccination site; the token's subject is the site id.
    pub const VACCINATION_SITE: &str = "vaccination_site";
    /// Manages the exchange's partner registry.
    pub const EXCHANGE_ADMIN: &str = "exchange_admin";
    /// The exchange service itself: resolves exchange pseudonyms and records other
    /// provinces' decisions, which no other caller may.
    pub const EXCHANGE: &str = "exchange";
    pub const ALL: &[&str] = &[
        APP,
        OFFICIAL,
        REVIEWER,
        FULL_VIEW,
        VENUE,
        INTERNAL,
        POLICY_ADMIN,
        APPROVER,
        AUDITOR,
        HOTLINE,
        BATCH_CHECKER,
        HEALTH_ADMIN,
        INSTITUTION,
        LAB,
        PAYMENT_PROVIDER,
        VACCINATION_SITE,
        EXCHANGE_ADMIN,
        EXCHANGE,
    ];
}

const PREFIX: &str = "hc1";
pub const MAX_SUBJECT_LEN: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Who the caller is, e.g. `super-app` or `venue-scanner-0042`. Not personal data.
    pub sub: String,
    pub roles: BTreeSet<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub roles: BTreeSet<String>,
}

impl Caller {
    pub fn has(&self, role: &str) -> bool {
        self.roles.contains(role)
    }

    pub fn has_any(&self, roles: &[&str]) -> bool {
        roles.iter().any(|r| self.has(r))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing caller token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed caller token")]
    Malformed,
    #[error("caller token signed by an unknown issuer key")]
    UnknownKey,
    #[error("caller token signature is invalid")]
    BadSignature,
    #[error("caller token has expired")]
    Expired,
}

/// Mints caller tokens. Operators' tooling only; services never hold an issuer key.
pub struct TokenIssuer {
    key: SigningKey,
}

impl TokenIssuer {
    pub fn new(key: SigningKey) -> Self {
        TokenIssuer { key }
    }

    /// The `AUTH_ISSUER_KEYS` entry (`key id:public key hex`) that trusts this issuer.
    pub fn trusted_spec(&self) -> String {
        format!(
            "{}:{}",
            self.key.key_id(),
            self.key.verifying_key().to_hex()
        )
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn mint(
        &self,
        subject: &str,
        roles: &[&str],
        iat: i64,
        ttl_seconds: i64,
    ) -> Result<String, healthcode_crypto::CryptoError> {
        let claims = Claims {
            sub: subject.to_owned(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            iat,
            exp: iat.saturating_add(ttl_seconds),
        };
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let signed = format!(
            "{PREFIX}.{}.{}",
            self.key.key_id(),
            URL_SAFE_NO_PAD.encode(json)
        );
        let signature = self.key.sign(signed.as_bytes())?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// Checks caller tokens against the trusted issuer keys.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: TrustedKeys,
    /// Tokens already verified, with their expiry: a caller sends the same token on every
    /// call, and an SM2 verification per call would cost more than the call itself.
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (Caller, i64)>>>,
}

/// Verified tokens remembered at most; the memory is cleared when full.
const VERIFIED_CACHE: usize = 10_000;

impl TokenVerifier {
    pub fn new(keys: TrustedKeys) -> Self {
        TokenVerifier {
            keys,
            verified: Default::default(),
        }
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<Caller, AuthError> {
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((caller, exp)) = verified.get(token) {
            if *exp > now {
                return Ok(caller.clone());
            }
            verified.remove(token);
        }
        drop(verified);
        let (caller, exp) = self.verify_signature(token, now)?;
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }

    fn verify_signature(&self, token: &str, now: i64) -> Result<(Caller, i64), AuthError> {
        let mut parts = token.split('.');
        let (Some(prefix), Some(kid), Some(claims_b64), Some(sig_b64), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(AuthError::Malformed);
        };
        if prefix != PREFIX {
            return Err(AuthError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| AuthError::Malformed)?;
        let key = self.keys.get(kid).ok_or(AuthError::UnknownKey)?;
        let signed_len = token.len() - sig_b64.len() - 1;
        key.verify(&token.as_bytes()[..signed_len], &signature)
            .map_err(|_| AuthError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
        // Subjects end up in audit columns and log lines: keep them short and printable.
        if claims.sub.is_empty()
            || claims.sub.len() > MAX_SUBJECT_LEN
            || claims.sub.chars().any(char::is_control)
        {
            return Err(AuthError::Malformed);
        }
        if claims.exp <= now {
            return Err(AuthError::Expired);
        }
        Ok((
            Caller {
                subject: claims.sub,
                roles: claims.roles,
            },
            claims.exp,
        ))
    }

    /// The caller of a gRPC request, as a status the handler can return directly.
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| tonic::Status::unauthenticated(AuthError::Missing.to_string()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| tonic::Status::unauthenticated(AuthError::Malformed.to_string()))?;
        self.verify(token.trim(), chrono::Utc::now().timestamp())
            .map_err(|e| tonic::Status::unauthenticated(e.to_string()))
    }
}

/// `PERMISSION_DENIED` unless the caller has one of `roles`.
pub fn require_any(caller: &Caller, roles: &[&str]) -> Result<(), tonic::Status> {
    if caller.has_any(roles) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "caller `{}` needs one of the roles: {}",
            caller.subject,
            roles.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (TokenIssuer, TokenVerifier) {
        let key = SigningKey::generate("issuer-1").unwrap();
        let public = key.verifying_key();
        let spec = format!("issuer-1:{}", public.to_hex());
        (
            TokenIssuer::new(key),
            TokenVerifier::new(TrustedKeys::parse(&spec).unwrap()),
        )
    }

    #[test]
    fn a_minted_token_verifies_with_its_roles() {
        let (issuer, verifier) = setup();
        let token = issuer.mint("super-app", &[roles::APP], 1_000, 60).unwrap();
        let caller = verifier.verify(&token, 1_030).unwrap();
        assert_eq!(caller.subject, "super-app");
        assert!(caller.has(roles::APP));
        assert!(!caller.has(roles::FULL_VIEW));
        assert!(require_any(&caller, &[roles::REVIEWER]).is_err());
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let (issuer, verifier) = setup();
        let token = issuer.mint("super-app", &[roles::APP], 1_000, 60).unwrap();
        assert_eq!(verifier.verify(&token, 1_060), Err(AuthError::Expired));

        // Claims swapped for ones granting more roles: the signature no longer matches.
        let forged_claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                sub: "super-app".into(),
                roles: [roles::FULL_VIEW.to_string()].into(),
                iat: 1_000,
                exp: 9_999,
            })
            .unwrap(),
        );
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}.{}", parts[0], parts[1], forged_claims, parts[3]);
        assert_eq!(
            verifier.verify(&forged, 1_010),
            Err(AuthError::BadSignature)
        );

        let (other_issuer, _) = setup();
        let foreign = other_issuer.mint("x", &[roles::APP], 1_000, 60).unwrap();
        // Same key id, different key.
        assert_eq!(
            verifier.verify(&foreign, 1_010),
            Err(AuthError::BadSignature)
        );
        assert_eq!(verifier.verify("garbage", 1_010), Err(AuthError::Malformed));
        let long = issuer
            .mint(&"x".repeat(MAX_SUBJECT_LEN + 1), &[roles::APP], 1_000, 60)
            .unwrap();
        assert_eq!(verifier.verify(&long, 1_010), Err(AuthError::Malformed));
        assert_eq!(
            verifier.verify("hc1.nokey.e30.AA", 1_010),
            Err(AuthError::UnknownKey)
        );
    }
}
