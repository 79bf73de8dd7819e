//! EU Digital COVID Certificate (HCERT) encoding.
//!
//! Vaccination certificates are issued in the format of the EU Digital COVID Certificate
//! ("HCERT", eHealth Network *Technical Specifications for Digital Green Certificates*,
//! Volume 1), so that verifier apps built for that format accept them unchanged.
//!
//! The layers, from the inside out:
//!
//! 1. **Payload**: the health certificate as the JSON structure of schema 1.3.0
//!    ([`Hcert`]: `ver`, `nam`, `dob`, `v`), serialised as CBOR with text keys.
//! 2. **CWT** (RFC 8392): a CBOR map with integer keys, `1` ⇒ issuer (`iss`), `4` ⇒ expiry
//!    (`exp`), `6` ⇒ issued-at (`iat`) (integer seconds since the Unix epoch) and
//!    `-260` ⇒ `{ 1 ⇒ hcert }`.
//! 3. **COSE_Sign1** (RFC 9052), CBOR tag 18: protected header `{ 1 (alg) ⇒ -7 (ES256),
//!    4 (kid) ⇒ bstr }`, empty unprotected header, the CWT bytes as payload and a raw
//!    `r || s` ECDSA P-256 / SHA-256 signature (64 bytes, not DER) over the `Sig_structure`
//!    `["Signature1", protected, h'', payload]`.
//! 4. **zlib** compression (RFC 1950).
//! 5. **Base45** (RFC 9285), which fits the alphanumeric mode of QR codes.
//! 6. The context identifier prefix [`PREFIX`] (`"HC1:"`).
//!
//! The key identifier (`kid`) is the first 8 bytes of the SHA-256 hash of the DER encoding of
//! the document signer certificate (DSC), which is how verifiers find the certificate in the
//! trust list.
//!
//! [`Signer`] holds the ECDSA key and its DSC (self-signed for development, or loaded from
//! PKCS#8 and DER in production); [`decode`] and [`verify`] are the verifier side, and
//! [`conformance_vectors`] produces test files in the layout of the public EU `dcc-testdata`
//! repository.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use ciborium::Value;
use coset::iana::{self, EnumI64 as _};
use coset::{
    AsCborValue as _, CborSerializable, CoseSign1, CoseSign1Builder, Header, HeaderBuilder,
    ProtectedHeader, RegisteredLabelWithPrivate, TaggedCborSerializable as _,
};
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, SecretDocument,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder as _, CertificateBuilder};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension as _};
use x509_cert::name::Name as DistinguishedName;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::time::{Time, Validity};

/// Context identifier prefix of an HCERT in a QR code.
pub const PREFIX: &str = "HC1:";

/// Version of the HCERT JSON schema the payload follows.
pub const SCHEMA_VERSION: &str = "1.3.0";

/// COSE algorithm identifier of ECDSA P-256 with SHA-256.
pub const ALG_ES256: i64 = -7;

/// CWT claim key of the issuer.
const CWT_ISS: i64 = 1;
/// CWT claim key of the expiry time.
const CWT_EXP: i64 = 4;
/// CWT claim key of the issue time.
const CWT_IAT: i64 = 6;
/// CWT claim key of the health certificate container.
const CWT_HCERT: i64 = -260;
/// Key of the EU DCC inside the health certificate container.
const HCERT_EU_DCC: i64 = 1;

/// CBOR tag of COSE_Sign1.
const TAG_COSE_SIGN1: u64 = 18;
/// CBOR tag of a CWT (some issuers wrap the COSE_Sign1 in it).
const TAG_CWT: u64 = 61;

/// Upper bound of the inflated COSE size accepted by [`decode`] (a QR code holds a few KiB;
/// this only guards against decompression bombs).
const MAX_INFLATED: u64 = 256 * 1024;

/// Maximum length of the ICAO transliterated names (`fnt`, `gnt`) in schema 1.3.0.
const ICAO_MAX_LEN: usize = 80;

/// Extended key usage of a DSC allowed to sign vaccination certificates (DCC specification).
const EKU_DCC_VACCINATION: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.1847.2021.1.2");

/// Errors of encoding, decoding and verifying certificates.
#[derive(Debug, thiserror::Error)]
pub enum DccError {
    /// The text does not start with [`PREFIX`].
    #[error("missing HC1: prefix")]
    Prefix,
    /// The text after the prefix is not valid Base45.
    #[error("invalid Base45")]
    Base45,
    /// The data is not a valid zlib stream (or inflates beyond the size limit).
    #[error("invalid zlib data")]
    Inflate,
    /// Compression failed while encoding.
    #[error("compression failed: {0}")]
    Compression(String),
    /// The COSE_Sign1 structure is malformed.
    #[error("invalid COSE_Sign1: {0}")]
    Cose(String),
    /// The CWT claims or the health certificate payload are malformed.
    #[error("invalid CBOR payload: {0}")]
    Cbor(String),
    /// JSON serialisation failed (conformance vectors).
    #[error("JSON: {0}")]
    Json(String),
    /// The signature algorithm is not ES256.
    #[error("unsupported COSE algorithm {0}")]
    UnsupportedAlgorithm(i64),
    /// The signature does not verify.
    #[error("signature verification failed")]
    Signature,
    /// The key identifier does not belong to the given certificate.
    #[error("unknown key identifier")]
    UnknownKid,
    /// The certificate (or its signer certificate) has expired.
    #[error("certificate expired")]
    Expired,
    /// The certificate (or its signer certificate) is not valid yet.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// The document signer certificate is malformed or could not be built.
    #[error("document signer certificate: {0}")]
    Certificate(String),
    /// The signing key is invalid, does not match the certificate, or signing failed.
    #[error("key: {0}")]
    Key(String),
}

fn cose_err(e: impl std::fmt::Display) -> DccError {
    DccError::Cose(e.to_string())
}

fn cbor_err(e: impl std::fmt::Display) -> DccError {
    DccError::Cbor(e.to_string())
}

fn cert_err(e: impl std::fmt::Display) -> DccError {
    DccError::Certificate(e.to_string())
}

fn key_err(e: impl std::fmt::Display) -> DccError {
    DccError::Key(e.to_string())
}

fn json_err(e: impl std::fmt::Display) -> DccError {
    DccError::Json(e.to_string())
}

/// ICAO 9303 transliteration for the `fnt` / `gnt` fields: ASCII letters are upper-cased,
/// spaces and hyphens become `<`, all other characters are dropped, and the result is cut to
/// 80 characters.
pub fn icao(name: &str) -> String {
    let mut out: String = name
        .trim()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | 'A'..='Z' => Some(c.to_ascii_uppercase()),
            ' ' | '-' => Some('<'),
            _ => None,
        })
        .collect();
    // Only ASCII remains, so truncating at a byte index is safe.
    out.truncate(ICAO_MAX_LEN);
    out
}

/// Holder name (`nam`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Name {
    /// Family name(s) as written (`fn`).
    #[serde(rename = "fn", default)]
    pub family: String,
    /// Family name(s), ICAO 9303 transliterated (`fnt`), see [`icao`].
    #[serde(rename = "fnt")]
    pub family_t: String,
    /// Given name(s) as written (`gn`), omitted when empty.
    #[serde(rename = "gn", default, skip_serializing_if = "String::is_empty")]
    pub given: String,
    /// Given name(s), ICAO 9303 transliterated (`gnt`), omitted when empty.
    #[serde(rename = "gnt", default, skip_serializing_if = "String::is_empty")]
    pub given_t: String,
}

/// One vaccination event (an entry of `v`), with EU value-set codes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaccinationEntry {
    /// Disease or agent targeted (`"840539006"`, COVID-19).
    pub tg: String,
    /// Vaccine or prophylaxis (e.g. `"J07BX03"`).
    pub vp: String,
    /// Vaccine medicinal product (e.g. `"CoronaVac"`).
    pub mp: String,
    /// Marketing authorisation holder or manufacturer (e.g. `"Sinovac-Biotech"`).
    pub ma: String,
    /// Dose number.
    pub dn: u32,
    /// Total number of doses in the series.
    pub sd: u32,
    /// Date of vaccination, `YYYY-MM-DD`.
    pub dt: String,
    /// Country of vaccination, ISO 3166-1 alpha-2 (e.g. `"CN"`).
    pub co: String,
    /// Certificate issuer.
    pub is: String,
    /// Unique certificate identifier (UVCI).
    pub ci: String,
}

/// The health certificate (schema 1.3.0, vaccination).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hcert {
    /// Schema version, [`SCHEMA_VERSION`].
    pub ver: String,
    /// Holder name.
    pub nam: Name,
    /// Date of birth (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`).
    pub dob: String,
    /// Vaccination entries.
    pub v: Vec<VaccinationEntry>,
}

/// The CWT claims of a certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer country, ISO 3166-1 alpha-2 (claim 1).
    pub iss: String,
    /// Issued at, seconds since the Unix epoch (claim 6).
    pub iat: i64,
    /// Expiry, seconds since the Unix epoch (claim 4).
    pub exp: i64,
    /// The health certificate (claim -260, key 1).
    pub hcert: Hcert,
}

/// Every layer of an encoded certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The CWT payload (CBOR claims map).
    pub cbor: Vec<u8>,
    /// The tagged COSE_Sign1.
    pub cose: Vec<u8>,
    /// The zlib-compressed COSE_Sign1.
    pub compressed: Vec<u8>,
    /// Base45 of `compressed`.
    pub base45: String,
    /// [`PREFIX`] followed by `base45`: the QR code content.
    pub hc1: String,
}

/// What a verifier reads back from a certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// Key identifier (from the protected header, else the unprotected header).
    pub kid: Vec<u8>,
    /// COSE algorithm identifier ([`ALG_ES256`] for our certificates).
    pub alg: i64,
    /// The CWT claims.
    pub claims: Claims,
    /// The serialised protected header, as signed.
    pub protected: Vec<u8>,
    /// The CWT payload bytes, as signed.
    pub payload: Vec<u8>,
    /// The signature (`r || s`).
    pub signature: Vec<u8>,
}

/// Document signer: the ECDSA P-256 key and its document signer certificate (DSC).
pub struct Signer {
    key: SigningKey,
    pkcs8: SecretDocument,
    certificate: Vec<u8>,
    kid: [u8; 8],
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid_b64())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A self-signed document signer certificate (X.509 v3, ECDSA P-256 with SHA-256, subject
    /// `C=<country>, O=<organisation>, CN=<common name>`), for development and tests.
    ///
    /// The key is derived from `seed` when given (the 32 bytes are the secret scalar; an
    /// out-of-range value is [`DccError::Key`]), else drawn from the operating system's RNG.
    /// With a seed the certificate is fully deterministic.
    pub fn generate(
        country_alpha2: &str,
        organisation: &str,
        common_name: &str,
        not_before: DateTime<Utc>,
        not_after: DateTime<Utc>,
        seed: Option<[u8; 32]>,
        serial: u64,
    ) -> Result<Self, DccError> {
        if country_alpha2.len() != 2 || !country_alpha2.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(DccError::Certificate(format!(
                "country must be ISO 3166-1 alpha-2, got {country_alpha2:?}"
            )));
        }
        if organisation.is_empty() || common_name.is_empty() {
            return Err(DccError::Certificate(
                "organisation and common name must not be empty".into(),
            ));
        }
        if not_before >= not_after {
            return Err(DccError::Certificate(
                "not_before must be before not_after".into(),
            ));
        }

        let key = match seed {
            Some(seed) => SigningKey::from(
                p256::SecretKey::from_slice(&seed)
                    .map_err(|_| DccError::Key("seed is not a valid P-256 scalar".into()))?,
            ),
            None => SigningKey::try_generate().map_err(key_err)?,
        };

        // RFC 4514 string; the last RDN comes first in the encoding, so this yields C, O, CN.
        let subject = DistinguishedName::from_str(&format!(
            "CN={},O={},C={country_alpha2}",
            rdn_escape(common_name),
            rdn_escape(organisation)
        ))
        .map_err(cert_err)?;
        let validity = Validity::new(x509_time(not_before)?, x509_time(not_after)?);
        let spki = SubjectPublicKeyInfoOwned::from_key(key.verifying_key()).map_err(cert_err)?;

        let builder = CertificateBuilder::new(
            DocumentSignerProfile { subject },
            SerialNumber::from(serial),
            validity,
            spki,
        )
        .map_err(cert_err)?;
        let certificate = builder
            .build::<_, DerSignature>(&key)
            .map_err(cert_err)?
            .to_der()
            .map_err(cert_err)?;

        Self::from_parts(key, certificate)
    }

    /// Production: a PKCS#8 DER private key and the DSC (DER) issued for it by the country
    /// signing CA. The DSC's public key must match the key, else [`DccError::Key`].
    pub fn from_der(pkcs8_key_der: &[u8], certificate_der: &[u8]) -> Result<Self, DccError> {
        let key = SigningKey::from_pkcs8_der(pkcs8_key_der).map_err(key_err)?;
        let certificate = parse_certificate(certificate_der)?;
        if certificate_key(&certificate)? != *key.verifying_key() {
            return Err(DccError::Key(
                "the certificate's public key does not match the private key".into(),
            ));
        }
        Self::from_parts(key, certificate_der.to_vec())
    }

    fn from_parts(key: SigningKey, certificate: Vec<u8>) -> Result<Self, DccError> {
        let (not_before, not_after) = certificate_validity(&parse_certificate(&certificate)?)?;
        let pkcs8 = key.to_pkcs8_der().map_err(key_err)?;
        Ok(Self {
            kid: kid_of(&certificate),
            key,
            pkcs8,
            certificate,
            not_before,
            not_after,
        })
    }

    /// The private key as PKCS#8 DER (to export development secrets; handle as a secret).
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.pkcs8.as_bytes().to_vec()
    }

    /// The document signer certificate (DER).
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// Key identifier: the first 8 bytes of SHA-256 of the DSC DER.
    pub fn kid(&self) -> [u8; 8] {
        self.kid
    }

    /// Key identifier in standard Base64 with padding (as in trust lists).
    pub fn kid_b64(&self) -> String {
        BASE64.encode(self.kid)
    }

    /// Start of the DSC validity.
    pub fn not_before(&self) -> DateTime<Utc> {
        self.not_before
    }

    /// End of the DSC validity.
    pub fn not_after(&self) -> DateTime<Utc> {
        self.not_after
    }

    /// Encode and sign `claims`. Signing is deterministic (RFC 6979), so the same key and
    /// claims always give the same output.
    pub fn sign(&self, claims: &Claims) -> Result<Encoded, DccError> {
        let cbor = claims_to_cbor(claims)?;
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .key_id(self.kid.to_vec())
            .build();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .payload(cbor.clone())
            .try_create_signature(b"", |tbs| {
                let signature: Signature = self.key.try_sign(tbs)?;
                Ok::<_, p256::ecdsa::Error>(signature.to_vec())
            })
            .map_err(key_err)?
            .build();
        let cose = sign1.to_tagged_vec().map_err(cose_err)?;
        pack(cbor, cose)
    }
}

/// Certificate profile of a self-signed document signer: an end-entity certificate whose key
/// signs digital signatures (health certificates) only.
struct DocumentSignerProfile {
    subject: DistinguishedName,
}

impl BuilderProfile for DocumentSignerProfile {
    fn get_issuer(&self, subject: &DistinguishedName) -> DistinguishedName {
        subject.clone()
    }

    fn get_subject(&self) -> DistinguishedName {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &x509_cert::TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let subject = tbs.subject();
        let ski = SubjectKeyIdentifier::try_from(spk)?;
        let mut extensions: Vec<Extension> = vec![
            AuthorityKeyIdentifier {
                key_identifier: Some(ski.0.clone()),
                ..Default::default()
            }
            .to_extension(subject, &[])?,
        ];
        extensions.push(
            BasicConstraints {
                ca: false,
                path_len_constraint: None,
            }
            .to_extension(subject, &extensions)?,
        );
        extensions
            .push(KeyUsage(KeyUsages::DigitalSignature.into()).to_extension(subject, &extensions)?);
        extensions
            .push(ExtendedKeyUsage(vec![EKU_DCC_VACCINATION]).to_extension(subject, &extensions)?);
        extensions.push(ski.to_extension(subject, &extensions)?);
        Ok(extensions)
    }
}

/// Escape an attribute value for an RFC 4514 string: everything but ASCII letters and digits
/// becomes `\XX` (hex of each UTF-8 byte), so no separator can appear unescaped.
fn rdn_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\{b:02X}");
        }
    }
    out
}

fn x509_time(t: DateTime<Utc>) -> Result<Time, DccError> {
    let secs = u64::try_from(t.timestamp())
        .map_err(|_| DccError::Certificate("validity before 1970".into()))?;
    let dt = x509_cert::der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs))
        .map_err(cert_err)?;
    Ok(Time::from(dt))
}

fn chrono_time(t: Time) -> Result<DateTime<Utc>, DccError> {
    let secs = i64::try_from(t.to_unix_duration().as_secs())
        .map_err(|_| DccError::Certificate("validity out of range".into()))?;
    DateTime::from_timestamp(secs, 0)
        .ok_or_else(|| DccError::Certificate("validity out of range".into()))
}

fn parse_certificate(der: &[u8]) -> Result<Certificate, DccError> {
    Certificate::from_der(der).map_err(cert_err)
}

fn certificate_validity(cert: &Certificate) -> Result<(DateTime<Utc>, DateTime<Utc>), DccError> {
    let validity = cert.tbs_certificate().validity();
    Ok((
        chrono_time(validity.not_before)?,
        chrono_time(validity.not_after)?,
    ))
}

/// The P-256 public key of a certificate's SubjectPublicKeyInfo.
fn certificate_key(cert: &Certificate) -> Result<VerifyingKey, DccError> {
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(cert_err)?;
    VerifyingKey::from_public_key_der(&spki).map_err(key_err)
}

/// Key identifier of a certificate: the first 8 bytes of SHA-256 of its DER encoding.
pub fn kid_of(certificate_der: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(certificate_der);
    let mut kid = [0u8; 8];
    kid.copy_from_slice(&digest[..8]);
    kid
}

/// Serialise the CWT claims map.
fn claims_to_cbor(claims: &Claims) -> Result<Vec<u8>, DccError> {
    let hcert = Value::serialized(&claims.hcert).map_err(cbor_err)?;
    let map = Value::Map(vec![
        (
            Value::Integer(CWT_ISS.into()),
            Value::Text(claims.iss.clone()),
        ),
        (
            Value::Integer(CWT_EXP.into()),
            Value::Integer(claims.exp.into()),
        ),
        (
            Value::Integer(CWT_IAT.into()),
            Value::Integer(claims.iat.into()),
        ),
        (
            Value::Integer(CWT_HCERT.into()),
            Value::Map(vec![(Value::Integer(HCERT_EU_DCC.into()), hcert)]),
        ),
    ]);
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).map_err(cbor_err)?;
    Ok(out)
}

/// Store a claim, rejecting duplicates.
fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), DccError> {
    if slot.replace(value).is_some() {
        return Err(DccError::Cbor(format!("duplicate {what}")));
    }
    Ok(())
}

/// A NumericDate (integer seconds; an integral float is tolerated).
fn numeric_date(value: &Value, what: &str) -> Result<i64, DccError> {
    match value {
        Value::Integer(i) => {
            i64::try_from(*i).map_err(|_| DccError::Cbor(format!("{what} out of range")))
        }
        Value::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 => Ok(*f as i64),
        _ => Err(DccError::Cbor(format!("{what} is not a number"))),
    }
}

/// Parse the CWT claims map.
fn parse_claims(payload: &[u8]) -> Result<Claims, DccError> {
    let value = <Value as CborSerializable>::from_slice(payload).map_err(cbor_err)?;
    let Value::Map(entries) = value else {
        return Err(DccError::Cbor("CWT claims are not a map".into()));
    };
    let (mut iss, mut iat, mut exp, mut hcert) = (None, None, None, None);
    for (key, value) in entries {
        // Text-keyed (non-standard) claims are ignored.
        let Some(label) = key.as_integer().map(i128::from) else {
            continue;
        };
        if label == i128::from(CWT_ISS) {
            let text = value
                .into_text()
                .map_err(|_| DccError::Cbor("iss is not text".into()))?;
            set_once(&mut iss, text, "iss")?;
        } else if label == i128::from(CWT_EXP) {
            set_once(&mut exp, numeric_date(&value, "exp")?, "exp")?;
        } else if label == i128::from(CWT_IAT) {
            set_once(&mut iat, numeric_date(&value, "iat")?, "iat")?;
        } else if label == i128::from(CWT_HCERT) {
            set_once(&mut hcert, parse_hcert_container(value)?, "hcert")?;
        }
    }
    Ok(Claims {
        iss: iss.unwrap_or_default(),
        iat: iat.ok_or_else(|| DccError::Cbor("missing iat".into()))?,
        exp: exp.ok_or_else(|| DccError::Cbor("missing exp".into()))?,
        hcert: hcert.ok_or_else(|| DccError::Cbor("missing hcert (-260)".into()))?,
    })
}

/// Parse the `-260` container `{ 1 => hcert }`.
fn parse_hcert_container(value: Value) -> Result<Hcert, DccError> {
    let Value::Map(entries) = value else {
        return Err(DccError::Cbor("hcert container is not a map".into()));
    };
    let mut found = None;
    for (key, value) in entries {
        if key.as_integer().map(i128::from) == Some(i128::from(HCERT_EU_DCC)) {
            set_once(&mut found, value, "EU DCC entry")?;
        }
    }
    found
        .ok_or_else(|| DccError::Cbor("missing EU DCC entry (1) in hcert".into()))?
        .deserialized::<Hcert>()
        .map_err(cbor_err)
}

fn deflate(data: &[u8]) -> Result<Vec<u8>, DccError> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::best());
    encoder
        .write_all(data)
        .map_err(|e| DccError::Compression(e.to_string()))?;
    encoder
        .finish()
        .map_err(|e| DccError::Compression(e.to_string()))
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, DccError> {
    let mut out = Vec::new();
    ZlibDecoder::new(data)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|_| DccError::Inflate)?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(DccError::Inflate);
    }
    Ok(out)
}

/// Compress, Base45-encode and prefix a COSE_Sign1.
fn pack(cbor: Vec<u8>, cose: Vec<u8>) -> Result<Encoded, DccError> {
    let compressed = deflate(&cose)?;
    let base45 = base45::encode(&compressed);
    let hc1 = format!("{PREFIX}{base45}");
    Ok(Encoded {
        cbor,
        cose,
        compressed,
        base45,
        hc1,
    })
}

fn algorithm_value(alg: &coset::Algorithm) -> Result<i64, DccError> {
    match alg {
        RegisteredLabelWithPrivate::Assigned(a) => Ok(a.to_i64()),
        RegisteredLabelWithPrivate::PrivateUse(i) => Ok(*i),
        RegisteredLabelWithPrivate::Text(t) => {
            Err(DccError::Cose(format!("text algorithm label {t:?}")))
        }
    }
}

/// Strip the prefix, Base45-decode, inflate (zlib), parse the COSE_Sign1 (tag 18 optional)
/// and parse the CWT claims. Does not verify anything; see [`verify`].
pub fn decode(hc1: &str) -> Result<Decoded, DccError> {
    let body = hc1
        .trim_end_matches(['\r', '\n'])
        .strip_prefix(PREFIX)
        .ok_or(DccError::Prefix)?;
    let compressed = base45::decode(body).map_err(|_| DccError::Base45)?;
    let cose = inflate(&compressed)?;
    decode_cose(&cose)
}

/// Parse a COSE_Sign1 (tag 18 optional, an outer CWT tag 61 tolerated) and its CWT claims.
pub fn decode_cose(cose: &[u8]) -> Result<Decoded, DccError> {
    let value = <Value as CborSerializable>::from_slice(cose).map_err(cose_err)?;
    let value = match value {
        Value::Tag(TAG_CWT, inner) => *inner,
        other => other,
    };
    let value = match value {
        Value::Tag(TAG_COSE_SIGN1, inner) => *inner,
        Value::Tag(tag, _) => return Err(DccError::Cose(format!("unexpected CBOR tag {tag}"))),
        other => other,
    };
    let CoseSign1 {
        protected,
        unprotected,
        payload,
        signature,
    } = CoseSign1::from_cbor_value(value).map_err(cose_err)?;

    let payload = payload.ok_or_else(|| DccError::Cose("detached payload".into()))?;
    let alg = protected
        .header
        .alg
        .as_ref()
        .or(unprotected.alg.as_ref())
        .ok_or_else(|| DccError::Cose("missing alg".into()))?;
    let alg = algorithm_value(alg)?;
    // The specification puts the kid in the protected header; some issuers use the
    // unprotected one.
    let kid = if protected.header.key_id.is_empty() {
        unprotected.key_id
    } else {
        protected.header.key_id.clone()
    };
    if kid.is_empty() {
        return Err(DccError::Cose("missing kid".into()));
    }
    let protected = match protected.original_data {
        Some(bytes) => bytes,
        None => protected.header.to_vec().map_err(cose_err)?,
    };
    let claims = parse_claims(&payload)?;
    Ok(Decoded {
        kid,
        alg,
        claims,
        protected,
        payload,
        signature,
    })
}

/// Check the key identifier and the ES256 signature against a document signer certificate
/// (DER), without looking at any validity period.
pub fn verify_signature(decoded: &Decoded, certificate_der: &[u8]) -> Result<(), DccError> {
    if decoded.kid.as_slice() != kid_of(certificate_der).as_slice() {
        return Err(DccError::UnknownKid);
    }
    if decoded.alg != ALG_ES256 {
        return Err(DccError::UnsupportedAlgorithm(decoded.alg));
    }
    let key = certificate_key(&parse_certificate(certificate_der)?)?;
    let sign1 = CoseSign1 {
        protected: ProtectedHeader {
            original_data: Some(decoded.protected.clone()),
            header: Header::default(),
        },
        unprotected: Header::default(),
        payload: Some(decoded.payload.clone()),
        signature: decoded.signature.clone(),
    };
    sign1.verify_signature(b"", |signature, tbs| {
        let signature = Signature::from_slice(signature).map_err(|_| DccError::Signature)?;
        key.verify(tbs, &signature).map_err(|_| DccError::Signature)
    })
}

/// Verify with the signer certificate (DER): the kid must be the certificate's
/// ([`DccError::UnknownKid`]), the ES256 signature over
/// `["Signature1", protected, h'', payload]` must verify ([`DccError::Signature`]), `now` must
/// lie in `[iat, exp)` of the claims and within the certificate validity
/// ([`DccError::NotYetValid`] / [`DccError::Expired`]).
pub fn verify(
    decoded: &Decoded,
    certificate_der: &[u8],
    now: DateTime<Utc>,
) -> Result<(), DccError> {
    verify_signature(decoded, certificate_der)?;
    let now_secs = now.timestamp();
    if now_secs < decoded.claims.iat {
        return Err(DccError::NotYetValid);
    }
    if now_secs >= decoded.claims.exp {
        return Err(DccError::Expired);
    }
    let (not_before, not_after) = certificate_validity(&parse_certificate(certificate_der)?)?;
    if now < not_before {
        return Err(DccError::NotYetValid);
    }
    if now > not_after {
        return Err(DccError::Expired);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Conformance vectors
// ---------------------------------------------------------------------------------------------

/// A fixed UTC instant (conformance data).
fn utc(year: i32, month: u32, day: u32, hour: u32) -> Result<DateTime<Utc>, DccError> {
    NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|d| d.and_hms_opt(hour, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| DccError::Json(format!("invalid date {year}-{month}-{day}")))
}

/// Made-up holder and vaccination for the conformance vectors.
fn sample_claims(
    family: &str,
    given: &str,
    dob: &str,
    entry: VaccinationEntry,
    iat: DateTime<Utc>,
    exp: DateTime<Utc>,
) -> Claims {
    Claims {
        iss: "CN".into(),
        iat: iat.timestamp(),
        exp: exp.timestamp(),
        hcert: Hcert {
            ver: SCHEMA_VERSION.into(),
            nam: Name {
                family: family.into(),
                family_t: icao(family),
                given: given.into(),
                given_t: icao(given),
            },
            dob: dob.into(),
            v: vec![entry],
        },
    }
}

fn vaccination(mp: &str, ma: &str, dn: u32, sd: u32, dt: &str, ci: &str) -> VaccinationEntry {
    VaccinationEntry {
        tg: "840539006".into(),
        vp: "J07BX03".into(),
        mp: mp.into(),
        ma: ma.into(),
        dn,
        sd,
        dt: dt.into(),
        co: "CN".into(),
        is: "Healthcode Vaccination Service (test)".into(),
        ci: ci.into(),
    }
}

/// One test file in the `dcc-testdata` layout.
fn vector(
    hcert: &Hcert,
    encoded: &Encoded,
    certificate_der: &[u8],
    clock: DateTime<Utc>,
    description: &str,
    expected: serde_json::Value,
) -> Result<serde_json::Value, DccError> {
    Ok(json!({
        "JSON": serde_json::to_value(hcert).map_err(json_err)?,
        "CBOR": hex::encode(&encoded.cbor),
        "COSE": hex::encode(&encoded.cose),
        "COMPRESSED": hex::encode(&encoded.compressed),
        "BASE45": encoded.base45,
        "PREFIX": encoded.hc1,
        "TESTCTX": {
            "VERSION": 1,
            "SCHEMA": SCHEMA_VERSION,
            "CERTIFICATE": BASE64.encode(certificate_der),
            "VALIDATIONCLOCK": clock.to_rfc3339_opts(SecondsFormat::Secs, true),
            "DESCRIPTION": description,
        },
        "EXPECTEDRESULTS": expected,
    }))
}

/// Conformance vectors in the public test-data layout of the EU DCC (the `dcc-testdata`
/// repository's `<COUNTRY>/2DCode/raw/<n>.json` files): each a JSON object with `"JSON"` (the
/// hcert JSON), `"CBOR"` (hex of the CWT payload), `"COSE"` (hex), `"COMPRESSED"` (hex),
/// `"BASE45"`, `"PREFIX"` (the full `HC1:` string), `"TESTCTX"` (`VERSION`, `SCHEMA`,
/// `CERTIFICATE` — Base64 DER of the DSC to verify with —, `VALIDATIONCLOCK`, `DESCRIPTION`)
/// and `"EXPECTEDRESULTS"` (only the flags that apply).
///
/// Deterministic: fixed keys (seeds), fixed clock, made-up holders. Cases:
/// 1. valid (first dose of two); 2. valid (second dose of two); 3. expired at the validation
///    clock (signature still valid); 4. verified with the wrong DSC; 5. payload altered after
///    signing (signature kept).
pub fn conformance_vectors() -> Result<Vec<(String, serde_json::Value)>, DccError> {
    let dsc_from = utc(2021, 1, 1, 0)?;
    let dsc_until = utc(2023, 1, 1, 0)?;
    let signer = Signer::generate(
        "CN",
        "Healthcode Test",
        "Healthcode DSC Test A",
        dsc_from,
        dsc_until,
        Some([0x01; 32]),
        1,
    )?;
    let other = Signer::generate(
        "CN",
        "Healthcode Test",
        "Healthcode DSC Test B",
        dsc_from,
        dsc_until,
        Some([0x02; 32]),
        2,
    )?;

    let expected_results = |verify: bool, expiration: bool, encode: bool| {
        let mut expected = json!({
            "EXPECTEDVALIDOBJECT": true,
            "EXPECTEDSCHEMAVALIDATION": true,
            "EXPECTEDDECODE": true,
            "EXPECTEDVERIFY": verify,
            "EXPECTEDUNPREFIX": true,
            "EXPECTEDVALIDJSON": true,
            "EXPECTEDCOMPRESSION": true,
            "EXPECTEDB45DECODE": true,
            "EXPECTEDEXPIRATIONCHECK": expiration,
        });
        if encode {
            expected["EXPECTEDENCODE"] = json!(true);
        }
        expected
    };
    let mut vectors = Vec::with_capacity(5);

    // 1. Valid: first dose of a two-dose series.
    let claims = sample_claims(
        "Zhang",
        "San",
        "1980-01-01",
        vaccination(
            "CoronaVac",
            "Sinovac-Biotech",
            1,
            2,
            "2021-05-10",
            "URN:UVCI:01:CN:HEALTHCODE/TEST0001",
        ),
        utc(2021, 6, 1, 8)?,
        utc(2022, 6, 1, 8)?,
    );
    let encoded = signer.sign(&claims)?;
    vectors.push((
        "1.json".to_owned(),
        vector(
            &claims.hcert,
            &encoded,
            signer.certificate_der(),
            utc(2021, 7, 1, 0)?,
            "Valid vaccination certificate, dose 1 of 2",
            expected_results(true, true, true),
        )?,
    ));

    // 2. Valid: second dose of two (series complete).
    let claims = sample_claims(
        "Mustermann-Gabler",
        "Erika",
        "1964-08-12",
        vaccination(
            "BBIBP-CorV",
            "ORG-100020693",
            2,
            2,
            "2021-05-31",
            "URN:UVCI:01:CN:HEALTHCODE/TEST0002",
        ),
        utc(2021, 6, 2, 8)?,
        utc(2022, 6, 2, 8)?,
    );
    let encoded = signer.sign(&claims)?;
    vectors.push((
        "2.json".to_owned(),
        vector(
            &claims.hcert,
            &encoded,
            signer.certificate_der(),
            utc(2021, 7, 1, 0)?,
            "Valid vaccination certificate, dose 2 of 2",
            expected_results(true, true, true),
        )?,
    ));

    // 3. Expired: the validation clock is after exp; the signature is still valid.
    let claims = sample_claims(
        "Zhang",
        "San",
        "1980-01-01",
        vaccination(
            "CoronaVac",
            "Sinovac-Biotech",
            2,
            2,
            "2021-05-31",
            "URN:UVCI:01:CN:HEALTHCODE/TEST0003",
        ),
        utc(2021, 6, 1, 8)?,
        utc(2021, 7, 1, 8)?,
    );
    let encoded = signer.sign(&claims)?;
    vectors.push((
        "3.json".to_owned(),
        vector(
            &claims.hcert,
            &encoded,
            signer.certificate_der(),
            utc(2021, 8, 1, 0)?,
            "Expired certificate: validation clock after exp, signature valid",
            expected_results(true, false, true),
        )?,
    ));

    // 4. Wrong key: verified against a different document signer certificate.
    let claims = sample_claims(
        "Zhang",
        "San",
        "1980-01-01",
        vaccination(
            "CoronaVac",
            "Sinovac-Biotech",
            1,
            2,
            "2021-05-10",
            "URN:UVCI:01:CN:HEALTHCODE/TEST0004",
        ),
        utc(2021, 6, 1, 8)?,
        utc(2022, 6, 1, 8)?,
    );
    let encoded = signer.sign(&claims)?;
    vectors.push((
        "4.json".to_owned(),
        vector(
            &claims.hcert,
            &encoded,
            other.certificate_der(),
            utc(2021, 7, 1, 0)?,
            "Signed by another key: the test certificate is not the signer's",
            expected_results(false, true, false),
        )?,
    ));

    // 5. Tampered: the payload is changed after signing (dose 1 → 2) and the old signature
    //    kept.
    let claims = sample_claims(
        "Zhang",
        "San",
        "1980-01-01",
        vaccination(
            "CoronaVac",
            "Sinovac-Biotech",
            1,
            2,
            "2021-05-10",
            "URN:UVCI:01:CN:HEALTHCODE/TEST0005",
        ),
        utc(2021, 6, 1, 8)?,
        utc(2022, 6, 1, 8)?,
    );
    let encoded = signer.sign(&claims)?;
    let mut tampered_claims = claims.clone();
    for entry in &mut tampered_claims.hcert.v {
        entry.dn = 2;
    }
    let tampered = tamper(&encoded, &tampered_claims)?;
    vectors.push((
        "5.json".to_owned(),
        vector(
            &tampered_claims.hcert,
            &tampered,
            signer.certificate_der(),
            utc(2021, 7, 1, 0)?,
            "Tampered payload: claims changed after signing, signature kept",
            expected_results(false, true, false),
        )?,
    ));

    Ok(vectors)
}

/// Replace the payload of a signed certificate by `claims`, keeping protected header and
/// signature (so the signature no longer verifies).
fn tamper(encoded: &Encoded, claims: &Claims) -> Result<Encoded, DccError> {
    let mut sign1 = CoseSign1::from_tagged_slice(&encoded.cose).map_err(cose_err)?;
    let cbor = claims_to_cbor(claims)?;
    sign1.payload = Some(cbor.clone());
    let cose = sign1.to_tagged_vec().map_err(cose_err)?;
    pack(cbor, cose)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value;

    fn test_signer(seed: u8, serial: u64) -> Signer {
        Signer::generate(
            "CN",
            "Healthcode Test",
            &format!("Healthcode DSC {seed}"),
            utc(2021, 1, 1, 0).unwrap(),
            utc(2031, 1, 1, 0).unwrap(),
            Some([seed; 32]),
            serial,
        )
        .unwrap()
    }

    fn claims() -> Claims {
        sample_claims(
            "Zhang",
            "San",
            "1980-01-01",
            vaccination(
                "CoronaVac",
                "Sinovac-Biotech",
                1,
                2,
                "2021-05-10",
                "URN:UVCI:01:CN:HEALTHCODE/UNIT0001",
            ),
            utc(2021, 6, 1, 8).unwrap(),
            utc(2022, 6, 1, 8).unwrap(),
        )
    }

    fn in_range() -> DateTime<Utc> {
        utc(2021, 7, 1, 0).unwrap()
    }

    #[test]
    fn round_trip() {
        let signer = test_signer(7, 1);
        let claims = claims();
        let encoded = signer.sign(&claims).unwrap();
        assert!(encoded.hc1.starts_with(PREFIX));
        assert_eq!(encoded.hc1, format!("{PREFIX}{}", encoded.base45));
        assert_eq!(encoded.cose[0], 0xD2, "tag 18");

        let decoded = decode(&encoded.hc1).unwrap();
        assert_eq!(decoded.claims, claims);
        assert_eq!(decoded.kid, signer.kid().to_vec());
        assert_eq!(decoded.alg, ALG_ES256);
        assert_eq!(decoded.payload, encoded.cbor);
        assert_eq!(decoded.signature.len(), 64);
        let mut protected = vec![0xA2, 0x01, 0x26, 0x04, 0x48];
        protected.extend_from_slice(&signer.kid());
        assert_eq!(decoded.protected, protected);
        verify(&decoded, signer.certificate_der(), in_range()).unwrap();

        // Deterministic (RFC 6979).
        assert_eq!(signer.sign(&claims).unwrap(), encoded);
    }

    #[test]
    fn signer_from_der_round_trip() {
        let signer = test_signer(7, 1);
        let loaded = Signer::from_der(&signer.pkcs8_der(), signer.certificate_der()).unwrap();
        assert_eq!(loaded.kid(), signer.kid());
        assert_eq!(loaded.not_before(), signer.not_before());
        assert_eq!(loaded.not_after(), signer.not_after());
        assert_eq!(
            loaded.sign(&claims()).unwrap(),
            signer.sign(&claims()).unwrap()
        );

        let other = test_signer(8, 2);
        assert!(matches!(
            Signer::from_der(&other.pkcs8_der(), signer.certificate_der()),
            Err(DccError::Key(_))
        ));
        assert!(matches!(
            Signer::from_der(b"not a key", signer.certificate_der()),
            Err(DccError::Key(_))
        ));
    }

    #[test]
    fn invalid_seed_is_key_error() {
        let result = Signer::generate(
            "CN",
            "Healthcode Test",
            "DSC",
            utc(2021, 1, 1, 0).unwrap(),
            utc(2022, 1, 1, 0).unwrap(),
            Some([0xFF; 32]),
            1,
        );
        assert!(matches!(result, Err(DccError::Key(_))));
        let zero = Signer::generate(
            "CN",
            "Healthcode Test",
            "DSC",
            utc(2021, 1, 1, 0).unwrap(),
            utc(2022, 1, 1, 0).unwrap(),
            Some([0; 32]),
            1,
        );
        assert!(matches!(zero, Err(DccError::Key(_))));
    }

    #[test]
    fn random_key_signer() {
        let signer = Signer::generate(
            "CN",
            "Healthcode Test, Inc.",
            "DSC + random=key",
            utc(2021, 1, 1, 0).unwrap(),
            utc(2031, 1, 1, 0).unwrap(),
            None,
            42,
        )
        .unwrap();
        let encoded = signer.sign(&claims()).unwrap();
        let decoded = decode(&encoded.hc1).unwrap();
        verify(&decoded, signer.certificate_der(), in_range()).unwrap();
    }

    #[test]
    fn certificate_is_x509_v3_self_signed() {
        let signer = test_signer(7, 99);
        let cert = Certificate::from_der(signer.certificate_der()).unwrap();
        let tbs = cert.tbs_certificate();
        assert!(matches!(tbs.version(), x509_cert::Version::V3));
        assert_eq!(tbs.subject(), tbs.issuer());
        assert_eq!(tbs.subject().country().unwrap().unwrap().as_str(), "CN");
        let first = tbs.subject().iter().next().unwrap();
        assert_eq!(first.oid.to_string(), "2.5.4.6", "C comes first");
        // ecdsa-with-SHA256
        assert_eq!(
            cert.signature_algorithm().oid.to_string(),
            "1.2.840.10045.4.3.2"
        );
        let (critical, bc) = tbs.get_extension::<BasicConstraints>().unwrap().unwrap();
        assert!(critical);
        assert!(!bc.ca);
        let (_, ku) = tbs.get_extension::<KeyUsage>().unwrap().unwrap();
        assert!(ku.digital_signature());
        assert_eq!(signer.not_before(), utc(2021, 1, 1, 0).unwrap());
        assert_eq!(signer.not_after(), utc(2031, 1, 1, 0).unwrap());
        // The certificate's own signature verifies with its key.
        let key = certificate_key(&cert).unwrap();
        let tbs_der = tbs.to_der().unwrap();
        let sig = p256::ecdsa::DerSignature::from_bytes(cert.signature().raw_bytes()).unwrap();
        key.verify(&tbs_der, &sig).unwrap();
    }

    #[test]
    fn icao_transliteration() {
        assert_eq!(icao("Mustermann-Gabler"), "MUSTERMANN<GABLER");
        assert_eq!(icao("Zhang San"), "ZHANG<SAN");
        assert_eq!(icao("  o'Brien "), "OBRIEN");
        assert_eq!(icao("张三"), "");
        assert_eq!(icao(&"a".repeat(100)).len(), 80);
    }

    #[test]
    fn tampered_cose_fails() {
        let signer = test_signer(7, 1);
        let claims = claims();
        let encoded = signer.sign(&claims).unwrap();

        let mut changed = claims.clone();
        changed.hcert.dob = "1980-01-02".into();
        let tampered = tamper(&encoded, &changed).unwrap();
        let decoded = decode(&tampered.hc1).unwrap();
        assert_eq!(decoded.claims, changed);
        assert!(matches!(
            verify(&decoded, signer.certificate_der(), in_range()),
            Err(DccError::Signature)
        ));

        // A flipped signature bit.
        let mut decoded = decode(&encoded.hc1).unwrap();
        decoded.signature[10] ^= 0x01;
        assert!(matches!(
            verify(&decoded, signer.certificate_der(), in_range()),
            Err(DccError::Signature)
        ));

        // A changed byte inside the COSE payload (the iss text "CN" → "CO").
        let mut cose = encoded.cose.clone();
        let start = cose
            .windows(encoded.cbor.len())
            .position(|w| w == encoded.cbor.as_slice())
            .unwrap();
        assert_eq!(cose[start..start + 5], [0xA4, 0x01, 0x62, b'C', b'N']);
        cose[start + 4] = b'O';
        let decoded = decode_cose(&cose).unwrap();
        assert_eq!(decoded.claims.iss, "CO");
        assert!(matches!(
            verify(&decoded, signer.certificate_der(), in_range()),
            Err(DccError::Signature)
        ));
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let signer = test_signer(7, 1);
        let claims = claims();
        let decoded = decode(&signer.sign(&claims).unwrap().hc1).unwrap();
        let at = |secs| DateTime::from_timestamp(secs, 0).unwrap();
        assert!(matches!(
            verify(&decoded, signer.certificate_der(), at(claims.exp)),
            Err(DccError::Expired)
        ));
        assert!(matches!(
            verify(&decoded, signer.certificate_der(), at(claims.iat - 1)),
            Err(DccError::NotYetValid)
        ));
        verify(&decoded, signer.certificate_der(), at(claims.iat)).unwrap();
        verify(&decoded, signer.certificate_der(), at(claims.exp - 1)).unwrap();
        // The signature itself stays valid.
        verify_signature(&decoded, signer.certificate_der()).unwrap();

        // Claims valid, but the DSC has expired.
        let short = Signer::generate(
            "CN",
            "Healthcode Test",
            "Short DSC",
            utc(2021, 1, 1, 0).unwrap(),
            utc(2021, 6, 15, 0).unwrap(),
            Some([9; 32]),
            3,
        )
        .unwrap();
        let decoded = decode(&short.sign(&claims).unwrap().hc1).unwrap();
        assert!(matches!(
            verify(&decoded, short.certificate_der(), in_range()),
            Err(DccError::Expired)
        ));
    }

    #[test]
    fn wrong_certificate_fails() {
        let signer = test_signer(7, 1);
        let other = test_signer(8, 2);
        let mut decoded = decode(&signer.sign(&claims()).unwrap().hc1).unwrap();
        assert!(matches!(
            verify(&decoded, other.certificate_der(), in_range()),
            Err(DccError::UnknownKid)
        ));
        // Even with the kid pointing at the other certificate, its key does not verify.
        decoded.kid = other.kid().to_vec();
        assert!(matches!(
            verify(&decoded, other.certificate_der(), in_range()),
            Err(DccError::Signature)
        ));
    }

    #[test]
    fn kid_is_sha256_prefix_of_certificate() {
        let signer = test_signer(7, 1);
        let digest = Sha256::digest(signer.certificate_der());
        assert_eq!(signer.kid(), digest[..8]);
        assert_eq!(kid_of(signer.certificate_der()), signer.kid());
        assert_eq!(
            BASE64.decode(signer.kid_b64()).unwrap(),
            signer.kid().to_vec()
        );
        assert_eq!(signer.kid_b64().len(), 12);
    }

    #[test]
    fn base45_known_answers() {
        assert_eq!(base45::encode(b"AB"), "BB8");
        assert_eq!(base45::encode(b"Hello!!"), "%69 VD92EX0");
        assert_eq!(base45::decode("BB8").unwrap(), b"AB");
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(matches!(decode(""), Err(DccError::Prefix)));
        assert!(matches!(decode("HC2:ABC"), Err(DccError::Prefix)));
        assert!(matches!(decode("HC1:abc"), Err(DccError::Base45)));
        assert!(matches!(decode("HC1:A"), Err(DccError::Base45)));
        assert!(matches!(decode("HC1:::::"), Err(DccError::Base45)));
        // Valid Base45 but not zlib.
        let not_zlib = format!("{PREFIX}{}", base45::encode(b"hello world"));
        assert!(matches!(decode(&not_zlib), Err(DccError::Inflate)));
        // zlib but not CBOR / not COSE.
        for junk in [&b"\xff\xff\xff"[..], b"\x83\x01\x02\x03", b"\xd2\x80", b""] {
            let hc1 = format!("{PREFIX}{}", base45::encode(deflate(junk).unwrap()));
            assert!(matches!(decode(&hc1), Err(DccError::Cose(_))), "{junk:?}");
        }
        // A decompression bomb is refused.
        let bomb = deflate(&vec![0u8; 2 * MAX_INFLATED as usize]).unwrap();
        let hc1 = format!("{PREFIX}{}", base45::encode(bomb));
        assert!(matches!(decode(&hc1), Err(DccError::Inflate)));
        // A valid COSE_Sign1 whose payload is not a CWT.
        let signer = test_signer(7, 1);
        let encoded = signer.sign(&claims()).unwrap();
        let mut sign1 = CoseSign1::from_tagged_slice(&encoded.cose).unwrap();
        sign1.payload = Some(vec![0x01]);
        let cose = sign1.to_tagged_vec().unwrap();
        assert!(matches!(decode_cose(&cose), Err(DccError::Cbor(_))));
        // Truncated inputs never panic.
        for n in 0..encoded.hc1.len() {
            let _ = decode(&encoded.hc1[..n]);
        }
        for n in 0..encoded.cose.len() {
            let _ = decode_cose(&encoded.cose[..n]);
        }
        // Untagged COSE_Sign1 is accepted.
        let untagged = CoseSign1::from_tagged_slice(&encoded.cose)
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(decode_cose(&untagged).unwrap().claims, claims());
    }

    /// Decode and verify without coset or `decode`: Base45 → zlib → CBOR → hand-built
    /// Sig_structure → P-256 key from the certificate's SubjectPublicKeyInfo.
    #[test]
    fn independent_decoding_path() {
        let signer = test_signer(7, 1);
        let claims = claims();
        let encoded = signer.sign(&claims).unwrap();

        let b45 = encoded.hc1.strip_prefix("HC1:").unwrap();
        let compressed = base45::decode(b45).unwrap();
        assert_eq!(compressed, encoded.compressed);
        let mut cose = Vec::new();
        flate2::read::ZlibDecoder::new(&compressed[..])
            .read_to_end(&mut cose)
            .unwrap();
        assert_eq!(cose, encoded.cose);

        let value: Value = ciborium::from_reader(&cose[..]).unwrap();
        let (tag, inner) = value.into_tag().unwrap();
        assert_eq!(tag, 18);
        let items = (*inner).into_array().unwrap();
        assert_eq!(items.len(), 4);
        let protected = items[0].as_bytes().unwrap().clone();
        assert_eq!(items[1], Value::Map(vec![]));
        let payload = items[2].as_bytes().unwrap().clone();
        let signature = items[3].as_bytes().unwrap().clone();
        assert_eq!(signature.len(), 64);

        // Protected header: { 1: -7, 4: kid }.
        let header: Value = ciborium::from_reader(&protected[..]).unwrap();
        let header = header.into_map().unwrap();
        assert_eq!(header.len(), 2);
        assert_eq!(header[0].0, Value::Integer(1.into()));
        assert_eq!(header[0].1, Value::Integer((-7).into()));
        assert_eq!(header[1].0, Value::Integer(4.into()));
        assert_eq!(
            header[1].1,
            Value::Bytes(kid_of(signer.certificate_der()).to_vec())
        );

        // CWT claims.
        let cwt: Value = ciborium::from_reader(&payload[..]).unwrap();
        let cwt = cwt.into_map().unwrap();
        let get = |k: i64| {
            cwt.iter()
                .find(|(key, _)| *key == Value::Integer(k.into()))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(1), Value::Text("CN".into()));
        assert_eq!(get(4), Value::Integer(claims.exp.into()));
        assert_eq!(get(6), Value::Integer(claims.iat.into()));
        let container = get(-260).into_map().unwrap();
        assert_eq!(container[0].0, Value::Integer(1.into()));
        let hcert = container[0].1.as_map().unwrap();
        let field = |name: &str| {
            hcert
                .iter()
                .find(|(k, _)| k.as_text() == Some(name))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(field("ver"), Value::Text("1.3.0".into()));
        assert_eq!(field("dob"), Value::Text("1980-01-01".into()));
        let v = field("v").into_array().unwrap();
        let entry = v[0].as_map().unwrap();
        let dn = entry
            .iter()
            .find(|(k, _)| k.as_text() == Some("dn"))
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(dn, Value::Integer(1.into()));

        // Sig_structure = ["Signature1", protected, h'', payload].
        let sig_structure = Value::Array(vec![
            Value::Text("Signature1".into()),
            Value::Bytes(protected),
            Value::Bytes(vec![]),
            Value::Bytes(payload),
        ]);
        let mut tbs = Vec::new();
        ciborium::into_writer(&sig_structure, &mut tbs).unwrap();

        // Public key from the certificate's SubjectPublicKeyInfo.
        let cert = Certificate::from_der(signer.certificate_der()).unwrap();
        let spki = cert.tbs_certificate().subject_public_key_info();
        assert_eq!(spki.algorithm.oid.to_string(), "1.2.840.10045.2.1");
        let key = VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).unwrap();
        let signature = Signature::from_slice(&signature).unwrap();
        key.verify(&tbs, &signature).unwrap();

        // And a changed payload does not verify.
        let mut bad = tbs.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert!(key.verify(&bad, &signature).is_err());
    }

    #[test]
    fn conformance_vectors_are_deterministic_and_consistent() {
        let vectors = conformance_vectors().unwrap();
        assert_eq!(vectors, conformance_vectors().unwrap());
        let names: Vec<&str> = vectors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["1.json", "2.json", "3.json", "4.json", "5.json"]);

        for (name, v) in &vectors {
            let prefix = v["PREFIX"].as_str().unwrap();
            assert_eq!(prefix, format!("HC1:{}", v["BASE45"].as_str().unwrap()));
            assert_eq!(
                hex::decode(v["COMPRESSED"].as_str().unwrap()).unwrap(),
                base45::decode(v["BASE45"].as_str().unwrap()).unwrap()
            );
            let decoded = decode(prefix).unwrap();
            assert_eq!(hex::encode(&decoded.payload), v["CBOR"].as_str().unwrap());
            assert_eq!(
                decode_cose(&hex::decode(v["COSE"].as_str().unwrap()).unwrap()).unwrap(),
                decoded
            );
            assert_eq!(
                serde_json::to_value(&decoded.claims.hcert).unwrap(),
                v["JSON"],
                "{name}"
            );

            let ctx = &v["TESTCTX"];
            assert_eq!(ctx["VERSION"], 1);
            assert_eq!(ctx["SCHEMA"], "1.3.0");
            let cert = BASE64.decode(ctx["CERTIFICATE"].as_str().unwrap()).unwrap();
            let clock = DateTime::parse_from_rfc3339(ctx["VALIDATIONCLOCK"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc);

            let expected = &v["EXPECTEDRESULTS"];
            let verifies = verify_signature(&decoded, &cert).is_ok();
            assert_eq!(
                verifies,
                expected["EXPECTEDVERIFY"].as_bool().unwrap(),
                "{name}"
            );
            let unexpired = clock.timestamp() < decoded.claims.exp;
            assert_eq!(
                unexpired,
                expected["EXPECTEDEXPIRATIONCHECK"].as_bool().unwrap(),
                "{name}"
            );
            if verifies && unexpired {
                verify(&decoded, &cert, clock).unwrap();
            }
        }
        assert!(matches!(
            verify(
                &decode(vectors[2].1["PREFIX"].as_str().unwrap()).unwrap(),
                &BASE64
                    .decode(vectors[2].1["TESTCTX"]["CERTIFICATE"].as_str().unwrap())
                    .unwrap(),
                utc(2021, 8, 1, 0).unwrap()
            ),
            Err(DccError::Expired)
        ));
    }

    /// Verifies an `HC1:` string with a certificate without coset or `decode`: Base45 →
    /// zlib → CBOR (ciborium) → hand-built Sig_structure → P-256 key from the certificate.
    fn independently_verifies(prefix: &str, certificate_der: &[u8]) -> bool {
        let Some(compressed) = prefix
            .strip_prefix("HC1:")
            .and_then(|b| base45::decode(b).ok())
        else {
            return false;
        };
        let mut cose = Vec::new();
        if flate2::read::ZlibDecoder::new(&compressed[..])
            .read_to_end(&mut cose)
            .is_err()
        {
            return false;
        }
        let Ok(value) = ciborium::from_reader::<Value, _>(&cose[..]) else {
            return false;
        };
        let Some(items) = value.into_tag().ok().and_then(|(_, v)| v.into_array().ok()) else {
            return false;
        };
        let (Some(protected), Some(payload), Some(signature)) = (
            items[0].as_bytes(),
            items[2].as_bytes(),
            items[3].as_bytes(),
        ) else {
            return false;
        };
        let mut tbs = Vec::new();
        ciborium::into_writer(
            &Value::Array(vec![
                Value::Text("Signature1".into()),
                Value::Bytes(protected.clone()),
                Value::Bytes(vec![]),
                Value::Bytes(payload.clone()),
            ]),
            &mut tbs,
        )
        .unwrap();
        let cert = Certificate::from_der(certificate_der).unwrap();
        let spki = cert.tbs_certificate().subject_public_key_info();
        let key = VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).unwrap();
        Signature::from_slice(signature).is_ok_and(|sig| key.verify(&tbs, &sig).is_ok())
    }

    /// The vectors shipped in `testdata/dcc/CN/2DCode/raw` (the public DCC test-data layout)
    /// are exactly what this code generates, and each gives its expected results through the
    /// independent decoding path. `UPDATE_DCC_VECTORS=1` rewrites them.
    #[test]
    fn shipped_conformance_vectors() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/dcc/CN/2DCode/raw");
        let generated = conformance_vectors().unwrap();
        if std::env::var_os("UPDATE_DCC_VECTORS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, v) in &generated {
                let text = serde_json::to_string_pretty(v).unwrap() + "\n";
                std::fs::write(dir.join(name), text).unwrap();
            }
        }
        for (name, v) in &generated {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let shipped: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(&shipped, v, "{name} differs from what the code generates");
            let cert = BASE64
                .decode(shipped["TESTCTX"]["CERTIFICATE"].as_str().unwrap())
                .unwrap();
            let prefix = shipped["PREFIX"].as_str().unwrap();
            assert_eq!(
                independently_verifies(prefix, &cert),
                shipped["EXPECTEDRESULTS"]["EXPECTEDVERIFY"]
                    .as_bool()
                    .unwrap(),
                "{name}"
            );
        }
    }
}
