//! The health code QR payloads: issuing and verifying them, and drawing them as SVG.
//!
//! Used by the gateway and by offline scanners alike, so it does no I/O: the caller passes
//! keys, ciphers and the current time in.
//!
//! QR payloads are text: a four-character kind and version, a colon, then base64url (no
//! padding) of a serialised message (see `gateway.proto`):
//!
//! * `HCQ1:` online code, a [`SignedEnvelope`] of [`CodeTokenClaims`], signed by the gateway
//!   for one 30-second step. Only the gateway can tell whose it is (the person id is sealed).
//! * `HCO1:` offline code, an [`OfflinePresentation`]: a 24-hour credential signed by the
//!   province plus the holder device's own signature over the current step. A scanner checks
//!   it with nothing but the province's public keys.
//! * `HCP1:` place code, a [`SignedEnvelope`] of [`PlaceClaims`] printed on a venue poster.
//!
//! Codes step every [`STEP_SECONDS`]; a code is accepted for the step it was made in and the
//! step after, so one shown just before a step boundary still scans.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use healthcode_crypto::{CryptoError, FieldCipher, SigningKey, TrustedKeys, VerifyingKey};
use healthcode_proto::common::v1::{CodeColor, SignedEnvelope};
use healthcode_proto::gateway::v1::{
    CodeTokenClaims, OfflineCode, OfflineCredentialClaims, OfflinePresentation, PlaceClaims,
    ScanResult,
};
use prost::Message;
use qrcode::render::svg;
use qrcode::types::QrError;
use qrcode::{EcLevel, QrCode};

/// Length of one code step in seconds.
pub const STEP_SECONDS: u64 = 30;

/// Kind of an online code (the text starts `HCQ1:`).
pub const ONLINE_PREFIX: &str = "HCQ1";
/// Kind of an offline code (the text starts `HCO1:`).
pub const OFFLINE_PREFIX: &str = "HCO1";
/// Kind of a place code (the text starts `HCP1:`).
pub const PLACE_PREFIX: &str = "HCP1";

/// Longest QR text accepted, in bytes (the valid alphabet is ASCII, so also characters).
/// Real codes are a few hundred; the bound keeps attacker-supplied text cheap to reject.
pub const MAX_QR_TEXT_LEN: usize = 4096;

/// Associated data for a sealed person id: binds the ciphertext to code tokens, so a sealed
/// field lifted from elsewhere does not open as a token's person (and vice versa).
pub const PERSON_AAD: &[u8] = b"hc-code-token";

/// Longest validity of an offline credential (24 hours), in seconds.
pub const MAX_OFFLINE_VALIDITY_SECONDS: i64 = 24 * 60 * 60;

/// How far a scanner's clock may lag the issuer's: a credential is refused as expired only
/// when the scan is more than this before its `issued_at`.
pub const ISSUED_AT_LEEWAY_SECONDS: i64 = 300;

/// Module size in pixels of the SVG QR.
const MODULE_PX: u32 = 4;
/// Module size in pixels in care mode: twice as large, for older eyes and older scanners.
const CARE_MODULE_PX: u32 = 8;

/// Why a code could not be made, framed or read. Never carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The text or a message in it is not what it should be.
    #[error("malformed code: {0}")]
    Malformed(&'static str),
    /// Signing, verifying, sealing or opening failed.
    #[error("code crypto: {0}")]
    Crypto(String),
    /// The text is longer than [`MAX_QR_TEXT_LEN`] or than a QR symbol holds.
    #[error("code text too long")]
    TooLong,
    /// An offline credential's device key is not an SM2 SEC1 public key.
    #[error("device public key is not an SM2 SEC1 public key")]
    InvalidDeviceKey,
    /// An offline credential would be valid for more than 24 hours.
    #[error("offline credential valid for more than 24 hours")]
    ValidityTooLong,
}

impl From<CryptoError> for CodeError {
    /// Crypto errors never carry secrets (see `healthcode_crypto`), so their text is kept.
    fn from(e: CryptoError) -> Self {
        CodeError::Crypto(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Steps and framing
// ---------------------------------------------------------------------------------------------

/// The step at `unix_seconds`: floor(seconds / 30). Times before 1970 are step 0, so a bad
/// clock cannot wrap around to a far-future step.
pub fn step_at(unix_seconds: i64) -> u64 {
    u64::try_from(unix_seconds).map_or(0, |s| s / STEP_SECONDS)
}

/// Whether `step` is the current step at `now_unix` or the one before. A step ahead of the
/// clock is refused too: a code cannot have been made in the future.
fn step_is_current(step: u64, now_unix: i64) -> bool {
    matches!(step_at(now_unix).checked_sub(step), Some(0 | 1))
}

/// The kind without its colon, so callers may pass `"HCQ1"` or `"HCQ1:"` alike.
fn kind(prefix: &str) -> &str {
    prefix.strip_suffix(':').unwrap_or(prefix)
}

/// Frames bytes as QR text: `<kind>:` + base64url without padding, so the text passes
/// through URLs, JSON and scanner keyboards unescaped.
pub fn encode_qr(prefix: &str, bytes: &[u8]) -> String {
    format!("{}:{}", kind(prefix), URL_SAFE_NO_PAD.encode(bytes))
}

/// Unframes QR text of the expected kind. The length is bounded before anything is decoded,
/// since the text comes straight from a camera.
pub fn decode_qr(expected_prefix: &str, text: &str) -> Result<Vec<u8>, CodeError> {
    if text.len() > MAX_QR_TEXT_LEN {
        return Err(CodeError::TooLong);
    }
    let body = text
        .strip_prefix(kind(expected_prefix))
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or(CodeError::Malformed("wrong kind of code"))?;
    if body.is_empty() {
        return Err(CodeError::Malformed("empty code"));
    }
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| CodeError::Malformed("not base64url without padding"))
}

/// Frames bytes as QR text, refusing text that [`decode_qr`] would refuse, so nothing is
/// issued that cannot be scanned back.
fn frame(prefix: &str, bytes: &[u8]) -> Result<String, CodeError> {
    let text = encode_qr(prefix, bytes);
    if text.len() > MAX_QR_TEXT_LEN {
        return Err(CodeError::TooLong);
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Signed envelopes
// ---------------------------------------------------------------------------------------------

/// Signs `payload` as it will be sent: verifiers check these exact bytes before parsing them.
fn sign_envelope(key: &SigningKey, payload: Vec<u8>) -> Result<SignedEnvelope, CodeError> {
    let signature = key.sign(&payload)?;
    Ok(SignedEnvelope {
        payload,
        signature,
        key_id: key.key_id().to_owned(),
    })
}

/// Unframes and parses an envelope. One without a key id or signature cannot be a code.
fn decode_envelope(prefix: &str, text: &str) -> Result<SignedEnvelope, CodeError> {
    let bytes = decode_qr(prefix, text)?;
    let envelope = SignedEnvelope::decode(bytes.as_slice())
        .map_err(|_| CodeError::Malformed("not a signed envelope"))?;
    if envelope.key_id.is_empty() || envelope.signature.is_empty() {
        return Err(CodeError::Malformed("envelope without key id or signature"));
    }
    Ok(envelope)
}

/// Checks an envelope's signature, telling an unknown key (rotated out, or another
/// province's) apart from a forgery or tampering, as a scan result.
fn check_envelope(envelope: &SignedEnvelope, keys: &TrustedKeys) -> Result<(), ScanResult> {
    let key = keys.get(&envelope.key_id).ok_or(ScanResult::UnknownKey)?;
    key.verify(&envelope.payload, &envelope.signature)
        .map_err(|_| ScanResult::BadSignature)
}

// ---------------------------------------------------------------------------------------------
// Sealed person ids
// ---------------------------------------------------------------------------------------------

/// Seals a person id for a code token or offline credential as
/// `key id || ':' || nonce || ciphertext || tag`. The key id travels with the ciphertext (as
/// in the identity store's `kid:base64` columns, minus the base64: the QR is base64 already),
/// so codes sealed before a key rotation still open. Key ids never contain `:`.
pub fn seal_person(cipher: &FieldCipher, person_id: &str) -> Result<Vec<u8>, CodeError> {
    let sealed = cipher.encrypt(person_id.as_bytes(), PERSON_AAD)?;
    let mut out = Vec::with_capacity(sealed.key_id.len() + 1 + sealed.ciphertext.len());
    out.extend_from_slice(sealed.key_id.as_bytes());
    out.push(b':');
    out.extend_from_slice(&sealed.ciphertext);
    Ok(out)
}

/// Opens what [`seal_person`] sealed, with whichever configured key sealed it.
pub fn open_person(cipher: &FieldCipher, sealed: &[u8]) -> Result<String, CodeError> {
    let mut parts = sealed.splitn(2, |&b| b == b':');
    let key_id = parts.next().unwrap_or_default();
    let ciphertext = parts
        .next()
        .ok_or(CodeError::Malformed("sealed person without key id"))?;
    let key_id = std::str::from_utf8(key_id)
        .map_err(|_| CodeError::Malformed("sealed person key id is not UTF-8"))?;
    let plaintext = cipher.decrypt(key_id, ciphertext, PERSON_AAD)?;
    String::from_utf8(plaintext).map_err(|_| CodeError::Malformed("person id is not UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// Online code (HCQ1)
// ---------------------------------------------------------------------------------------------

/// Issues online codes: the gateway's signing key, the cipher that hides who a code is for,
/// and the province it issues for.
#[derive(Debug)]
pub struct CodeSigner {
    key: SigningKey,
    person_cipher: Arc<FieldCipher>,
    province: String,
}

/// A genuine, current online code: who it is for and what it claimed when issued.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The person id, unsealed.
    pub person_id: String,
    /// The claims as signed (the color in them is the one at issue, not necessarily now).
    pub claims: CodeTokenClaims,
}

impl CodeSigner {
    /// A signer for `province` (GB/T 2260 code) with the gateway's key and person cipher.
    pub fn new(
        key: SigningKey,
        person_cipher: Arc<FieldCipher>,
        province: impl Into<String>,
    ) -> Self {
        Self {
            key,
            person_cipher,
            province: province.into(),
        }
    }

    /// The signing key, for issuing offline credentials and place codes with the same key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The issuing province, as put in the claims.
    pub fn province(&self) -> &str {
        &self.province
    }

    /// Seals a person id with this signer's cipher, e.g. for an offline credential's claims.
    pub fn seal_person(&self, person_id: &str) -> Result<Vec<u8>, CodeError> {
        seal_person(&self.person_cipher, person_id)
    }

    /// The QR text of a person's code for the step at `now_unix`. An unspecified color is
    /// refused: it must never be shown, let alone signed.
    pub fn issue(
        &self,
        person_id: &str,
        color: CodeColor,
        color_version: u64,
        now_unix: i64,
    ) -> Result<String, CodeError> {
        if color == CodeColor::Unspecified {
            return Err(CodeError::Malformed("color is unspecified"));
        }
        let claims = CodeTokenClaims {
            sealed_person: self.seal_person(person_id)?,
            step: step_at(now_unix),
            color: color as i32,
            color_version,
            issuing_province: self.province.clone(),
        };
        let envelope = sign_envelope(&self.key, claims.encode_to_vec())?;
        frame(ONLINE_PREFIX, &envelope.encode_to_vec())
    }
}

/// Verifies a scanned online code: framing, key, signature, then step, and only then opens
/// who it is for (so nothing unsigned is ever decrypted or parsed). A code that fails is a
/// [`ScanResult`] to answer, not an error; a well-signed code whose person does not open
/// (a key this gateway no longer holds) is `Malformed`.
pub fn verify_online(
    text: &str,
    keys: &TrustedKeys,
    cipher: &FieldCipher,
    now_unix: i64,
) -> Result<VerifiedToken, ScanResult> {
    let envelope = decode_envelope(ONLINE_PREFIX, text).map_err(|_| ScanResult::Malformed)?;
    check_envelope(&envelope, keys)?;
    let claims =
        CodeTokenClaims::decode(envelope.payload.as_slice()).map_err(|_| ScanResult::Malformed)?;
    if !step_is_current(claims.step, now_unix) {
        return Err(ScanResult::StepExpired);
    }
    let person_id =
        open_person(cipher, &claims.sealed_person).map_err(|_| ScanResult::Malformed)?;
    Ok(VerifiedToken { person_id, claims })
}

// ---------------------------------------------------------------------------------------------
// Place code (HCP1)
// ---------------------------------------------------------------------------------------------

/// The poster QR text of a place: signed so a forged poster cannot send scans elsewhere.
pub fn sign_place(key: &SigningKey, claims: &PlaceClaims) -> Result<String, CodeError> {
    let envelope = sign_envelope(key, claims.encode_to_vec())?;
    frame(PLACE_PREFIX, &envelope.encode_to_vec())
}

/// The claims of a place code, after its signature checks against `keys`.
pub fn verify_place(text: &str, keys: &TrustedKeys) -> Result<PlaceClaims, CodeError> {
    let envelope = decode_envelope(PLACE_PREFIX, text)?;
    keys.verify(&envelope.key_id, &envelope.payload, &envelope.signature)?;
    PlaceClaims::decode(envelope.payload.as_slice())
        .map_err(|_| CodeError::Malformed("not place claims"))
}

// ---------------------------------------------------------------------------------------------
// Offline code (HCO1)
// ---------------------------------------------------------------------------------------------

/// A genuine, unexpired offline code for the current step. Revocation is not known offline:
/// an online verifier checks `claims.credential_id` against its revocations.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedOffline {
    /// The credential's claims as the province signed them.
    pub claims: OfflineCredentialClaims,
    /// The step the device signed.
    pub step: u64,
}

/// The parts of an offline presentation, once it is known to carry a credential.
struct Presented {
    credential: SignedEnvelope,
    step: u64,
    device_signature: Vec<u8>,
}

/// Parses the device key the way scanners will, so a key they could not use is refused at
/// issue rather than discovered at a venue door.
fn device_key(sec1: &[u8]) -> Result<VerifyingKey, CodeError> {
    VerifyingKey::from_sec1("device", sec1).map_err(|_| CodeError::InvalidDeviceKey)
}

/// `(issued_at, expires_at)` in Unix seconds, with expiry after issue and at most 24 hours
/// later. Checked at issue and again by scanners, which should not trust a longer one even
/// if it is signed.
fn validity_window(claims: &OfflineCredentialClaims) -> Result<(i64, i64), CodeError> {
    let issued = claims.issued_at.as_ref().map(|t| t.seconds);
    let expires = claims.expires_at.as_ref().map(|t| t.seconds);
    let (Some(issued), Some(expires)) = (issued, expires) else {
        return Err(CodeError::Malformed(
            "issued_at and expires_at are required",
        ));
    };
    if expires <= issued {
        return Err(CodeError::Malformed("expires_at is not after issued_at"));
    }
    if expires.saturating_sub(issued) > MAX_OFFLINE_VALIDITY_SECONDS {
        return Err(CodeError::ValidityTooLong);
    }
    Ok((issued, expires))
}

/// What a credential must say besides its keys and times: who it is (an id to revoke it
/// by) and a real color (unspecified is never to be shown).
fn check_credential_fields(claims: &OfflineCredentialClaims) -> Result<(), CodeError> {
    if claims.credential_id.is_empty() {
        return Err(CodeError::Malformed("credential_id is empty"));
    }
    match CodeColor::try_from(claims.color) {
        Ok(CodeColor::Unspecified) | Err(_) => Err(CodeError::Malformed("color is unspecified")),
        Ok(_) => Ok(()),
    }
}

/// Signs an offline credential with the province key, after checking that scanners will be
/// able to use it: a parseable device key and at most 24 hours of validity.
pub fn issue_offline(
    key: &SigningKey,
    claims: OfflineCredentialClaims,
) -> Result<OfflineCode, CodeError> {
    device_key(&claims.device_public_key)?;
    validity_window(&claims)?;
    check_credential_fields(&claims)?;
    let credential = sign_envelope(key, claims.encode_to_vec())?;
    Ok(OfflineCode {
        claims: Some(claims),
        credential: Some(credential),
    })
}

/// What the device signs for a step: `HCO1|<credential id>|<step>`. The kind prefix keeps a
/// device signature from being replayed as a signature over anything else.
pub fn device_message(credential_id: &str, step: u64) -> Vec<u8> {
    format!("{OFFLINE_PREFIX}|{credential_id}|{step}").into_bytes()
}

/// The QR text a device shows: its stored credential, the step and its signature over
/// [`device_message`] for that step.
pub fn present_offline(credential: SignedEnvelope, step: u64, device_signature: Vec<u8>) -> String {
    let presentation = OfflinePresentation {
        credential: Some(credential),
        step,
        device_signature,
    };
    encode_qr(OFFLINE_PREFIX, &presentation.encode_to_vec())
}

/// Unframes a presentation; one without a credential is not an offline code.
fn decode_presentation(text: &str) -> Result<Presented, CodeError> {
    let bytes = decode_qr(OFFLINE_PREFIX, text)?;
    let presentation = OfflinePresentation::decode(bytes.as_slice())
        .map_err(|_| CodeError::Malformed("not an offline presentation"))?;
    let credential = presentation
        .credential
        .ok_or(CodeError::Malformed("presentation without credential"))?;
    Ok(Presented {
        credential,
        step: presentation.step,
        device_signature: presentation.device_signature,
    })
}

/// Checks the device's signature over this step with the key the credential binds, which is
/// what stops a screenshot of someone else's credential from being presented.
fn check_device_signature(
    claims: &OfflineCredentialClaims,
    step: u64,
    signature: &[u8],
) -> Result<(), ScanResult> {
    let key = device_key(&claims.device_public_key).map_err(|_| ScanResult::BadDeviceSignature)?;
    key.verify(&device_message(&claims.credential_id, step), signature)
        .map_err(|_| ScanResult::BadDeviceSignature)
}

/// Verifies an offline code as a scanner without a network does.
///
/// It needs nothing but the province's public keys: no cipher, no database, no call to the
/// gateway. That is the point of offline codes: a venue scanner that carries the published
/// keys can check a code when neither it nor the holder's phone is online. Checks, in order:
/// framing (`Malformed`), credential key (`UnknownKey`), credential signature
/// (`BadSignature`), claims (`Malformed`), expiry (`CredentialExpired`, with
/// [`ISSUED_AT_LEEWAY_SECONDS`] for a scanner clock behind the issuer's), device signature
/// (`BadDeviceSignature`), step (`StepExpired`). Revocation needs the gateway and is not
/// checked here.
pub fn verify_offline(
    text: &str,
    keys: &TrustedKeys,
    now_unix: i64,
) -> Result<VerifiedOffline, ScanResult> {
    let presented = decode_presentation(text).map_err(|_| ScanResult::Malformed)?;
    check_envelope(&presented.credential, keys)?;
    let claims = OfflineCredentialClaims::decode(presented.credential.payload.as_slice())
        .map_err(|_| ScanResult::Malformed)?;
    let (issued, expires) = validity_window(&claims).map_err(|_| ScanResult::Malformed)?;
    if now_unix >= expires || now_unix < issued.saturating_sub(ISSUED_AT_LEEWAY_SECONDS) {
        return Err(ScanResult::CredentialExpired);
    }
    check_device_signature(&claims, presented.step, &presented.device_signature)?;
    if !step_is_current(presented.step, now_unix) {
        return Err(ScanResult::StepExpired);
    }
    Ok(VerifiedOffline {
        claims,
        step: presented.step,
    })
}

// ---------------------------------------------------------------------------------------------
// QR as SVG
// ---------------------------------------------------------------------------------------------

/// QR library errors as ours: too much text is the only one our byte payloads can meet.
fn qr_error(e: QrError) -> CodeError {
    match e {
        QrError::DataTooLong => CodeError::TooLong,
        _ => CodeError::Malformed("text cannot be drawn as a QR code"),
    }
}

/// The QR of `text` as an SVG document. Error correction M (15%) survives a scratched phone
/// screen without making the symbol much denser; care mode doubles the module size for older
/// eyes and cheaper scanners. The quiet zone is kept: scanners need it to find the symbol.
pub fn qr_svg(text: &str, care_mode: bool) -> Result<String, CodeError> {
    if text.len() > MAX_QR_TEXT_LEN {
        return Err(CodeError::TooLong);
    }
    let code =
        QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).map_err(qr_error)?;
    let px = if care_mode { CARE_MODULE_PX } else { MODULE_PX };
    Ok(code
        .render::<svg::Color>()
        .module_dimensions(px, px)
        .quiet_zone(true)
        .build())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The SM2 keys a service publishes for offline checks: the active one first, then the
/// other trusted (retired) ones.
pub fn public_keys(
    active: &healthcode_crypto::SigningKey,
    trusted: &healthcode_crypto::TrustedKeys,
) -> Vec<healthcode_proto::common::v1::PublicKey> {
    let active = active.verifying_key();
    std::iter::once(&active)
        .chain(trusted.iter().filter(|k| k.key_id() != active.key_id()))
        .map(|k| healthcode_proto::common::v1::PublicKey {
            key_id: k.key_id().to_owned(),
            algorithm: "SM2".into(),
            public_key_sec1: k.sec1_bytes(),
            public_key_pem: k.to_pem().unwrap_or_default(),
            not_before: None,
            not_after: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use healthcode_proto::common::v1::MaskedIdentity;

    /// A step boundary: 1_700_000_010 = 30 × 56_666_667.
    const NOW: i64 = 1_700_000_010;
    const PERSON: &str = "0190b7e2-6c1f-7a3e-9d4b-2f6c1e8a9b70";
    const CIPHER_SPEC: &str = "k1:000102030405060708090a0b0c0d0e0f";

    fn cipher() -> Arc<FieldCipher> {
        Arc::new(FieldCipher::parse(CIPHER_SPEC).expect("cipher spec"))
    }

    fn signer(key_id: &str) -> CodeSigner {
        let key = SigningKey::generate(key_id).expect("generate");
        CodeSigner::new(key, cipher(), "440000")
    }

    /// Trusted keys built from public hex only, as a scanner or another service holds them.
    fn trusted(keys: &[&SigningKey]) -> TrustedKeys {
        let spec = keys
            .iter()
            .map(|k| format!("{}:{}", k.key_id(), k.verifying_key().to_hex()))
            .collect::<Vec<_>>()
            .join(",");
        TrustedKeys::parse(&spec).expect("trusted keys")
    }

    /// Decodes an envelope, lets `f` change it, and frames it again.
    fn edit_envelope(prefix: &str, text: &str, f: impl FnOnce(&mut SignedEnvelope)) -> String {
        let bytes = decode_qr(prefix, text).expect("decode");
        let mut envelope = SignedEnvelope::decode(bytes.as_slice()).expect("envelope");
        f(&mut envelope);
        encode_qr(prefix, &envelope.encode_to_vec())
    }

    fn flip_last_payload_byte(envelope: &mut SignedEnvelope) {
        let last = envelope.payload.last_mut().expect("non-empty payload");
        *last ^= 0x01;
    }

    // ----- steps and framing -----

    #[test]
    fn step_at_floors_and_clamps() {
        assert_eq!(step_at(-1), 0);
        assert_eq!(step_at(i64::MIN), 0);
        assert_eq!(step_at(0), 0);
        assert_eq!(step_at(29), 0);
        assert_eq!(step_at(30), 1);
        assert_eq!(step_at(NOW), 56_666_667);
    }

    #[test]
    fn framing_round_trip_and_refusals() {
        let text = encode_qr(ONLINE_PREFIX, b"\xfb\xff\x00abc");
        assert!(text.starts_with("HCQ1:"), "{text}");
        assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
        assert_eq!(decode_qr("HCQ1", &text), Ok(b"\xfb\xff\x00abc".to_vec()));
        assert_eq!(decode_qr("HCQ1:", &text), Ok(b"\xfb\xff\x00abc".to_vec()));
        assert_eq!(encode_qr("HCQ1:", b"x"), encode_qr("HCQ1", b"x"));

        for bad in [
            "HCP1:AAAA",
            "HCQ1AAAA",
            "HCQ1:",
            "HCQ1:!!!!",
            "HCQ1:QQ==",
            "hcq1:AAAA",
        ] {
            assert!(
                matches!(decode_qr(ONLINE_PREFIX, bad), Err(CodeError::Malformed(_))),
                "{bad}"
            );
        }
        let long = format!("HCQ1:{}", "A".repeat(MAX_QR_TEXT_LEN));
        assert_eq!(decode_qr(ONLINE_PREFIX, &long), Err(CodeError::TooLong));
    }

    #[test]
    fn sealed_person_survives_cipher_rotation() {
        let old = cipher();
        let sealed = seal_person(&old, PERSON).expect("seal");
        assert!(sealed.starts_with(b"k1:"));
        let rotated = FieldCipher::parse(&format!(
            "k2:f0e0d0c0b0a090807060504030201000,{CIPHER_SPEC}"
        ))
        .expect("rotated spec");
        assert_eq!(open_person(&rotated, &sealed).as_deref(), Ok(PERSON));
        assert!(open_person(&old, b"no key id").is_err());
    }

    // ----- online code -----

    #[test]
    fn online_round_trip() {
        let signer = signer("gw-1");
        let keys = trusted(&[signer.signing_key()]);
        let text = signer
            .issue(PERSON, CodeColor::Green, 7, NOW)
            .expect("issue");
        assert!(text.starts_with("HCQ1:"), "{text}");

        let token = verify_online(&text, &keys, &cipher(), NOW).expect("valid");
        assert_eq!(token.person_id, PERSON);
        assert_eq!(token.claims.step, step_at(NOW));
        assert_eq!(token.claims.color(), CodeColor::Green);
        assert_eq!(token.claims.color_version, 7);
        assert_eq!(token.claims.issuing_province, "440000");
        // The person id is not readable from the token.
        assert!(
            !token
                .claims
                .sealed_person
                .windows(PERSON.len())
                .any(|w| w == PERSON.as_bytes())
        );
    }

    #[test]
    fn online_unspecified_color_is_not_issued() {
        assert!(matches!(
            signer("gw-1").issue(PERSON, CodeColor::Unspecified, 1, NOW),
            Err(CodeError::Malformed(_))
        ));
    }

    #[test]
    fn online_other_key_id_is_unknown_key() {
        let trusted_signer = signer("gw-1");
        let keys = trusted(&[trusted_signer.signing_key()]);
        let text = signer("gw-2")
            .issue(PERSON, CodeColor::Green, 1, NOW)
            .expect("issue");
        assert_eq!(
            verify_online(&text, &keys, &cipher(), NOW),
            Err(ScanResult::UnknownKey)
        );
    }

    #[test]
    fn online_same_key_id_other_key_is_bad_signature() {
        let impostor = signer("gw-1");
        let genuine = SigningKey::generate("gw-1").expect("generate");
        let keys = trusted(&[&genuine]);
        let text = impostor
            .issue(PERSON, CodeColor::Green, 1, NOW)
            .expect("issue");
        assert_eq!(
            verify_online(&text, &keys, &cipher(), NOW),
            Err(ScanResult::BadSignature)
        );
    }

    #[test]
    fn online_flipped_payload_byte_is_bad_signature() {
        let signer = signer("gw-1");
        let keys = trusted(&[signer.signing_key()]);
        let text = signer.issue(PERSON, CodeColor::Red, 1, NOW).expect("issue");
        let tampered = edit_envelope(ONLINE_PREFIX, &text, flip_last_payload_byte);
        assert_eq!(
            verify_online(&tampered, &keys, &cipher(), NOW),
            Err(ScanResult::BadSignature)
        );
    }

    #[test]
    fn online_steps() {
        let signer = signer("gw-1");
        let keys = trusted(&[signer.signing_key()]);
        let text = signer
            .issue(PERSON, CodeColor::Green, 1, NOW)
            .expect("issue");
        let at = |now| verify_online(&text, &keys, &cipher(), now).map(|t| t.person_id);

        // Same step, last second of it, and the whole step after.
        assert_eq!(at(NOW).as_deref(), Ok(PERSON));
        assert_eq!(at(NOW + 29).as_deref(), Ok(PERSON));
        assert_eq!(at(NOW + 30).as_deref(), Ok(PERSON));
        assert_eq!(at(NOW + 59).as_deref(), Ok(PERSON));
        // Two steps back: a screenshot.
        assert_eq!(at(NOW + 60), Err(ScanResult::StepExpired));
        // From a step the scanner has not reached yet.
        assert_eq!(at(NOW - 1), Err(ScanResult::StepExpired));
    }

    #[test]
    fn online_garbage_and_wrong_kind_are_malformed() {
        let signer = signer("gw-1");
        let keys = trusted(&[signer.signing_key()]);
        let place = sign_place(
            signer.signing_key(),
            &PlaceClaims {
                place_code: "P1".into(),
                ..Default::default()
            },
        )
        .expect("place");
        let long = format!("HCQ1:{}", "A".repeat(5000));
        for text in [
            "",
            "hello",
            "HCQ1:",
            "HCQ1:!!!",
            "HCQ1:AAAA",
            "HCQ1:_w",
            place.as_str(),
            long.as_str(),
        ] {
            assert_eq!(
                verify_online(text, &keys, &cipher(), NOW),
                Err(ScanResult::Malformed),
                "{text}"
            );
        }
    }

    #[test]
    fn online_unsealable_person_after_good_signature_is_malformed() {
        let signer = signer("gw-1");
        let keys = trusted(&[signer.signing_key()]);
        let text = signer
            .issue(PERSON, CodeColor::Green, 1, NOW)
            .expect("issue");
        let other = FieldCipher::parse("k9:f0e0d0c0b0a090807060504030201000").expect("spec");
        assert_eq!(
            verify_online(&text, &keys, &other, NOW),
            Err(ScanResult::Malformed)
        );
    }

    // ----- place code -----

    fn place_claims() -> PlaceClaims {
        PlaceClaims {
            place_code: "GZ-TH-000123".into(),
            name: "天河体育中心".into(),
            division_code: "440106".into(),
            issued_at: Some(prost_types::Timestamp {
                seconds: NOW,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn place_round_trip() {
        let key = SigningKey::generate("gw-1").expect("generate");
        let text = sign_place(&key, &place_claims()).expect("sign");
        assert!(text.starts_with("HCP1:"), "{text}");
        assert_eq!(verify_place(&text, &trusted(&[&key])), Ok(place_claims()));
    }

    #[test]
    fn place_tampered_or_foreign_is_refused() {
        let key = SigningKey::generate("gw-1").expect("generate");
        let keys = trusted(&[&key]);
        let text = sign_place(&key, &place_claims()).expect("sign");

        let tampered = edit_envelope(PLACE_PREFIX, &text, flip_last_payload_byte);
        assert!(matches!(
            verify_place(&tampered, &keys),
            Err(CodeError::Crypto(_))
        ));
        let other = SigningKey::generate("gw-2").expect("generate");
        let foreign = sign_place(&other, &place_claims()).expect("sign");
        assert!(matches!(
            verify_place(&foreign, &keys),
            Err(CodeError::Crypto(_))
        ));
        let online = encode_qr(
            ONLINE_PREFIX,
            &decode_qr(PLACE_PREFIX, &text).expect("decode"),
        );
        assert!(matches!(
            verify_place(&online, &keys),
            Err(CodeError::Malformed(_))
        ));
    }

    // ----- offline code -----

    const CREDENTIAL_ID: &str = "0190b7e3-1111-7222-8333-944455566677";

    fn timestamp(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    fn offline_claims(device: &SigningKey, valid_for: i64) -> OfflineCredentialClaims {
        OfflineCredentialClaims {
            credential_id: CREDENTIAL_ID.into(),
            holder: Some(MaskedIdentity {
                masked_name: "张*".into(),
                masked_document_number: "1****************8".into(),
                ..Default::default()
            }),
            color: CodeColor::Green as i32,
            color_version: 3,
            device_public_key: device.verifying_key().sec1_bytes(),
            issued_at: Some(timestamp(NOW)),
            expires_at: Some(timestamp(NOW + valid_for)),
            issuing_province: "440000".into(),
            sealed_person: seal_person(&cipher(), PERSON).expect("seal"),
        }
    }

    /// A province key, a device key, and a credential binding them, valid 24 hours from NOW.
    fn offline_setup() -> (SigningKey, SigningKey, OfflineCode) {
        let province = SigningKey::generate("prov-440000-1").expect("generate");
        let device = SigningKey::generate("device").expect("generate");
        let claims = offline_claims(&device, MAX_OFFLINE_VALIDITY_SECONDS);
        let code = issue_offline(&province, claims).expect("issue");
        (province, device, code)
    }

    /// What the device shows at `now`, signing `signed_step` but claiming the step at `now`.
    fn present(code: &OfflineCode, device: &SigningKey, signed_step: u64, now: i64) -> String {
        let signature = device
            .sign(&device_message(CREDENTIAL_ID, signed_step))
            .expect("device sign");
        let credential = code.credential.clone().expect("credential");
        present_offline(credential, step_at(now), signature)
    }

    #[test]
    fn offline_verifies_with_nothing_but_the_province_public_key() {
        let (province, device, code) = offline_setup();
        // Exactly what a scanner is configured with: `key id:public hex`. No cipher, no secret.
        let scanner_keys = TrustedKeys::parse(&format!(
            "{}:{}",
            province.key_id(),
            province.verifying_key().to_hex()
        ))
        .expect("scanner keys");

        let text = present(&code, &device, step_at(NOW), NOW);
        assert!(text.starts_with("HCO1:"), "{text}");
        let verified = verify_offline(&text, &scanner_keys, NOW).expect("valid");
        assert_eq!(Some(&verified.claims), code.claims.as_ref());
        assert_eq!(verified.step, step_at(NOW));
        assert_eq!(verified.claims.color(), CodeColor::Green);

        // The step after is still fine; two steps after is a screenshot.
        assert!(verify_offline(&text, &scanner_keys, NOW + 30).is_ok());
        assert_eq!(
            verify_offline(&text, &scanner_keys, NOW + 60),
            Err(ScanResult::StepExpired)
        );
        // A scanner without the province's key cannot vouch for it.
        let stranger = trusted(&[&SigningKey::generate("prov-x").expect("generate")]);
        assert_eq!(
            verify_offline(&text, &stranger, NOW),
            Err(ScanResult::UnknownKey)
        );
    }

    #[test]
    fn offline_device_message_format() {
        assert_eq!(device_message("abc", 42), b"HCO1|abc|42".to_vec());
    }

    #[test]
    fn offline_expired_credential() {
        let (province, device, code) = offline_setup();
        let keys = trusted(&[&province]);
        let end = NOW + MAX_OFFLINE_VALIDITY_SECONDS;
        let last_second = present(&code, &device, step_at(end - 1), end - 1);
        assert!(verify_offline(&last_second, &keys, end - 1).is_ok());
        let at_expiry = present(&code, &device, step_at(end), end);
        assert_eq!(
            verify_offline(&at_expiry, &keys, end),
            Err(ScanResult::CredentialExpired)
        );
        // Scanned well before it was issued: a scanner clock far behind, or a forged time.
        let early = NOW - ISSUED_AT_LEEWAY_SECONDS - 1;
        let before = present(&code, &device, step_at(early), early);
        assert_eq!(
            verify_offline(&before, &keys, early),
            Err(ScanResult::CredentialExpired)
        );
    }

    #[test]
    fn offline_wrong_device_signature() {
        let (province, _device, code) = offline_setup();
        let thief = SigningKey::generate("device").expect("generate");
        let text = present(&code, &thief, step_at(NOW), NOW);
        assert_eq!(
            verify_offline(&text, &trusted(&[&province]), NOW),
            Err(ScanResult::BadDeviceSignature)
        );
    }

    #[test]
    fn offline_device_signature_for_another_step() {
        let (province, device, code) = offline_setup();
        let text = present(&code, &device, step_at(NOW) + 1, NOW);
        assert_eq!(
            verify_offline(&text, &trusted(&[&province]), NOW),
            Err(ScanResult::BadDeviceSignature)
        );
    }

    #[test]
    fn offline_tampered_credential_is_bad_signature() {
        let (province, device, mut code) = offline_setup();
        if let Some(credential) = code.credential.as_mut() {
            flip_last_payload_byte(credential);
        }
        let text = present(&code, &device, step_at(NOW), NOW);
        assert_eq!(
            verify_offline(&text, &trusted(&[&province]), NOW),
            Err(ScanResult::BadSignature)
        );
        assert_eq!(
            verify_offline("HCO1:AAAA", &trusted(&[&province]), NOW),
            Err(ScanResult::Malformed)
        );
    }

    #[test]
    fn offline_issue_refusals() {
        let province = SigningKey::generate("prov-1").expect("generate");
        let device = SigningKey::generate("device").expect("generate");
        let too_long = offline_claims(&device, MAX_OFFLINE_VALIDITY_SECONDS + 1);
        assert_eq!(
            issue_offline(&province, too_long),
            Err(CodeError::ValidityTooLong)
        );
        let mut bad_key = offline_claims(&device, 3600);
        bad_key.device_public_key = vec![0x04, 1, 2, 3];
        assert_eq!(
            issue_offline(&province, bad_key),
            Err(CodeError::InvalidDeviceKey)
        );
        let mut backwards = offline_claims(&device, 3600);
        backwards.expires_at = Some(timestamp(NOW - 1));
        assert!(matches!(
            issue_offline(&province, backwards),
            Err(CodeError::Malformed(_))
        ));
    }

    // ----- SVG -----

    /// The `width` attribute of the root element, in pixels.
    fn svg_width(svg: &str) -> u32 {
        let start = svg.find("width=\"").expect("width attribute") + "width=\"".len();
        let rest = &svg[start..];
        rest[..rest.find('"').expect("closing quote")]
            .parse()
            .expect("width number")
    }

    #[test]
    fn qr_svg_renders_and_care_mode_is_larger() {
        let text = signer("gw-1")
            .issue(PERSON, CodeColor::Green, 1, NOW)
            .expect("issue");
        let normal = qr_svg(&text, false).expect("svg");
        let care = qr_svg(&text, true).expect("svg");
        for svg in [&normal, &care] {
            assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"), "{svg}");
            assert!(svg.contains("</svg>"));
        }
        assert_eq!(svg_width(&care), 2 * svg_width(&normal));
        assert_eq!(
            qr_svg(&"A".repeat(MAX_QR_TEXT_LEN + 1), false),
            Err(CodeError::TooLong)
        );
    }
}
