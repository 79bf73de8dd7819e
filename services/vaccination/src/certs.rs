//! Certificates: the domestic electronic vaccination certificate (SM2, verifiable offline),
//! the international one in the EU Digital COVID Certificate format (ECDSA P-256), and
//! their PDF export with a visible watermark and a signed digest.
//!
//! Issued certificates are kept sealed (SM4-GCM): an international certificate holds the
//! holder's Latin name and date of birth, which never land in plaintext in the database.

use crate::dcc;
use crate::pdf::{PdfCertificate, PdfLine};
use crate::service::{Vaccination, decode, from_ts, ts};
use crate::store::entities::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use healthcode_db::db_error;
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::{MaskedIdentity, PersonRef, SignedEnvelope};
use healthcode_proto::identity::v1::{GetMaskedPersonRequest, GetPersonRequest};
use healthcode_proto::vaccination::v1 as pb;
use healthcode_server::outbound::with_deadline;
use pb::{CertificateCheck, CertificateKind, DoseState};
use prost::Message;
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use std::collections::BTreeMap;

/// The domestic certificate's QR text: this prefix, then base64url (no padding) of the
/// serialised `SignedEnvelope`.
pub const DOMESTIC_PREFIX: &str = "HCV1:";
/// The target disease of every certificate: COVID-19 (SNOMED CT 840539006).
pub const DISEASE_COVID19: &str = "840539006";

fn unavailable(what: &str) -> impl Fn(tonic::Status) -> ServiceError + '_ {
    move |status| match status.code() {
        tonic::Code::NotFound => ServiceError::NotFound("no such person".into()),
        _ => ServiceError::Unavailable(format!("{what} is unavailable; retry later")),
    }
}

fn qr_svg(text: &str) -> Result<String, ServiceError> {
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::M)
        .map_err(ServiceError::internal)?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(256, 256)
        .build())
}

/// "YYYY-MM-DD" in China's time zone (UTC+8), as certificates print dates.
fn local_date(t: DateTime<Utc>) -> String {
    (t + chrono::Duration::hours(8))
        .date_naive()
        .format("%Y-%m-%d")
        .to_string()
}

/// The date of birth in a resident identity card number (digits 7 to 14), else empty: the
/// EU DCC schema allows an unknown date of birth.
pub fn birth_date(document_number: &str) -> String {
    let b = document_number.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return String::new();
    }
    let digits = &document_number[6..14];
    match chrono::NaiveDate::parse_from_str(digits, "%Y%m%d") {
        Ok(d) => d.format("%Y-%m-%d").to_string(),
        Err(_) => String::new(),
    }
}

/// A Latin name as the identity service holds it ("ZHANG SAN", family name first) split into
/// the DCC's family and given names with their ICAO 9303 transliterations.
pub fn dcc_name(latin: &str) -> dcc::Name {
    let mut words = latin.split_whitespace();
    let family = words.next().unwrap_or_default().to_owned();
    let given = words.collect::<Vec<_>>().join(" ");
    dcc::Name {
        family_t: dcc::icao(&family),
        given_t: dcc::icao(&given),
        family,
        given,
    }
}

impl Vaccination {
    async fn masked_holder(&self, person_id: &str) -> Result<MaskedIdentity, ServiceError> {
        let masked = self
            .identity
            .clone()
            .get_masked_person(with_deadline(
                GetMaskedPersonRequest {
                    person: Some(PersonRef {
                        person_id: person_id.to_owned(),
                    }),
                },
                self.timeout,
            ))
            .await
            .map_err(unavailable("identity"))?
            .into_inner();
        Ok(MaskedIdentity {
            masked_name: masked.masked_name,
            masked_document_number: masked.masked_document_number,
            document_type: masked.document_type,
        })
    }

    async fn vaccines_of(
        &self,
        doses: &[pb::Dose],
    ) -> Result<BTreeMap<String, pb::Vaccine>, ServiceError> {
        let mut out = BTreeMap::new();
        for d in doses {
            if !out.contains_key(&d.vaccine_id) {
                out.insert(d.vaccine_id.clone(), self.vaccine(&d.vaccine_id).await?);
            }
        }
        Ok(out)
    }

    async fn store_certificate<M: Message>(
        &self,
        certificate_id: &str,
        person_id: &str,
        kind: CertificateKind,
        issued_at: DateTime<Utc>,
        certificate: &M,
    ) -> Result<(), ServiceError> {
        let sealed = self
            .keys
            .data
            .encrypt(&certificate.encode_to_vec(), certificate_id.as_bytes())
            .map_err(ServiceError::internal)?;
        certificate::ActiveModel {
            certificate_id: Set(certificate_id.to_owned()),
            person_id: Set(person_id.to_owned()),
            kind: Set(kind as i32),
            issued_at: Set(issued_at),
            revoked: Set(false),
            sealed: Set(sealed.ciphertext),
            key_id: Set(sealed.key_id),
        }
        .insert(&self.db)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// A stored certificate of the person, opened.
    async fn stored_certificate(
        &self,
        person_id: &str,
        certificate_id: &str,
        kind: CertificateKind,
    ) -> Result<Vec<u8>, ServiceError> {
        let row = certificate::Entity::find_by_id(certificate_id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .filter(|c| c.person_id == person_id && c.kind == kind as i32)
            .ok_or_else(|| ServiceError::NotFound("no such certificate of this person".into()))?;
        self.keys
            .data
            .decrypt(&row.key_id, &row.sealed, row.certificate_id.as_bytes())
            .map_err(ServiceError::internal)
    }

    // -----------------------------------------------------------------------------------
    // Domestic

    pub async fn issue_domestic(
        &self,
        person_id: &str,
        include_qr_svg: bool,
    ) -> Result<pb::DomesticCertificate, ServiceError> {
        let doses = self.list_doses(person_id, false).await?;
        if doses.is_empty() {
            return Err(ServiceError::precondition(
                "NO_DOSES",
                "the person has no recorded dose",
            ));
        }
        let vaccines = self.vaccines_of(&doses).await?;
        // Each unit once, without its worker keys: the doses carry their own signatures.
        let mut units: BTreeMap<&str, pb::VaccinationSite> = BTreeMap::new();
        for d in &doses {
            if !units.contains_key(d.site_id.as_str()) {
                let row = self.site_row(&self.db, &d.site_id).await?;
                units.insert(&d.site_id, crate::service::decode(&row.payload)?);
            }
        }
        let mut certified = Vec::with_capacity(doses.len());
        for d in &doses {
            let v = vaccines
                .get(&d.vaccine_id)
                .ok_or_else(|| ServiceError::internal("dose of an unknown vaccine"))?;
            let site = units
                .get(d.site_id.as_str())
                .cloned()
                .ok_or_else(|| ServiceError::internal("dose of an unknown site"))?;
            let signature = d.worker_signature.clone().unwrap_or_default();
            certified.push(pb::CertifiedDose {
                vaccine_name_zh: v.name_zh.clone(),
                vaccine_name_en: v.name_en.clone(),
                vaccine_type: v.r#type,
                maker_zh: v.maker_zh.clone(),
                batch_number: d.batch_number.clone(),
                dose_number: d.dose_number,
                administered_at: d.administered_at,
                unit_name: site.name,
                unit_code: site.unit_code,
                worker_id: d.worker_id.clone(),
                worker_signature: signature.signature,
                worker_key_id: signature.key_id,
                dose_claims: signature.payload,
            });
        }
        let holder = self.masked_holder(person_id).await?;
        let now = Utc::now();
        let claims = pb::DomesticCertificateClaims {
            certificate_id: uuid::Uuid::now_v7().to_string(),
            holder: Some(holder),
            doses: certified,
            course_complete: doses.iter().any(|d| d.completes_course),
            issued_at: Some(ts(now)),
            issuing_province: self.settings.province.clone(),
        };
        let payload = claims.encode_to_vec();
        let signed = SignedEnvelope {
            signature: self
                .keys
                .signing
                .sign(&payload)
                .map_err(ServiceError::internal)?,
            key_id: self.keys.signing.key_id().to_owned(),
            payload,
        };
        let qr_payload = format!(
            "{DOMESTIC_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(signed.encode_to_vec())
        );
        let mut artwork = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for v in vaccines.values() {
            if seen.insert(v.r#type)
                && let Some(a) = &v.artwork
            {
                artwork.push(a.clone());
            }
        }
        let recognitions = crate::recognition::recognitions(
            vaccines
                .values()
                .map(|v| (v.r#type, v.recognised_countries.as_slice())),
        );
        let mut certificate = pb::DomesticCertificate {
            claims: Some(claims.clone()),
            signed: Some(signed),
            qr_payload,
            qr_svg: String::new(),
            artwork,
            recognitions,
        };
        self.store_certificate(
            &claims.certificate_id,
            person_id,
            CertificateKind::Domestic,
            now,
            &certificate,
        )
        .await?;
        if include_qr_svg {
            certificate.qr_svg = qr_svg(&certificate.qr_payload)?;
        }
        Ok(certificate)
    }

    /// Checks a domestic certificate: issuer signature, then each dose's worker signature
    /// against the key registered for it, then revocation. Failing is an answer.
    pub async fn verify_domestic(
        &self,
        qr_payload: &str,
    ) -> Result<pb::VerifyDomesticCertificateResponse, ServiceError> {
        let bad = || ServiceError::invalid("qr_payload", "not a domestic vaccination certificate");
        let body = qr_payload.strip_prefix(DOMESTIC_PREFIX).ok_or_else(bad)?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        let signed = SignedEnvelope::decode(&bytes[..]).map_err(|_| bad())?;
        let claims =
            pb::DomesticCertificateClaims::decode(&signed.payload[..]).map_err(|_| bad())?;
        let answer =
            |check: CertificateCheck, index: usize| pb::VerifyDomesticCertificateResponse {
                check: check as i32,
                claims: Some(claims.clone()),
                failed_dose_index: index as u32,
            };
        let Some(issuer) = self.keys.trusted.get(&signed.key_id) else {
            return Ok(answer(CertificateCheck::UnknownKey, 0));
        };
        if issuer.verify(&signed.payload, &signed.signature).is_err() {
            return Ok(answer(CertificateCheck::BadIssuerSignature, 0));
        }
        for (i, d) in claims.doses.iter().enumerate() {
            let key = worker_key::Entity::find_by_id(d.worker_key_id.clone())
                .one(&self.db)
                .await
                .map_err(db_error)?;
            let at = from_ts(&d.administered_at);
            let Some((key, at)) = key.zip(at) else {
                return Ok(answer(CertificateCheck::UnknownKey, i));
            };
            if key.not_before.is_some_and(|t| at < t) || key.not_after.is_some_and(|t| at >= t) {
                return Ok(answer(CertificateCheck::UnknownKey, i));
            }
            let verifying =
                healthcode_crypto::VerifyingKey::from_sec1(key.key_id.clone(), &key.public_key)
                    .map_err(ServiceError::internal)?;
            let signed_claims = pb::DoseClaims::decode(&d.dose_claims[..]).ok();
            let matches = signed_claims.is_some_and(|c| {
                c.batch_number == d.batch_number
                    && c.dose_number == d.dose_number
                    && c.administered_at == d.administered_at
                    && c.worker_id == d.worker_id
                    && c.worker_id == key.worker_id
            });
            if !matches
                || verifying
                    .verify(&d.dose_claims, &d.worker_signature)
                    .is_err()
            {
                return Ok(answer(CertificateCheck::BadWorkerSignature, i));
            }
            if key.revoked_at.is_some_and(|t| t <= at) {
                return Ok(answer(CertificateCheck::Revoked, i));
            }
        }
        let revoked = certificate::Entity::find_by_id(claims.certificate_id.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .is_some_and(|c| c.revoked);
        if revoked {
            return Ok(answer(CertificateCheck::Revoked, 0));
        }
        Ok(answer(CertificateCheck::Valid, 0))
    }

    // -----------------------------------------------------------------------------------
    // International (EU DCC)

    pub async fn issue_international(
        &self,
        person_id: &str,
        dose_id: &str,
        include_qr_svg: bool,
    ) -> Result<pb::InternationalCertificate, ServiceError> {
        let doses = self.list_doses(person_id, false).await?;
        let dose = if dose_id.is_empty() {
            doses.last().cloned().ok_or_else(|| {
                ServiceError::precondition("NO_DOSES", "the person has no recorded dose")
            })?
        } else {
            doses
                .iter()
                .find(|d| d.dose_id == dose_id && d.state == DoseState::Recorded as i32)
                .cloned()
                .ok_or_else(|| {
                    ServiceError::NotFound("no such recorded dose of this person".into())
                })?
        };
        let vaccine = self.vaccine(&dose.vaccine_id).await?;
        let person = self
            .identity
            .clone()
            .get_person(with_deadline(
                GetPersonRequest {
                    person: Some(PersonRef {
                        person_id: person_id.to_owned(),
                    }),
                },
                self.timeout,
            ))
            .await
            .map_err(unavailable("identity"))?
            .into_inner();
        if person.english_name.trim().is_empty() {
            return Err(ServiceError::precondition(
                "NO_LATIN_NAME",
                "the identity record holds no name in Latin letters",
            ));
        }
        let dob = birth_date(
            &person
                .document
                .as_ref()
                .map(|d| d.number.clone())
                .unwrap_or_default(),
        );
        let now = Utc::now();
        let signer = &self.keys.dcc;
        let expires = (now
            + chrono::Duration::from_std(self.settings.dcc_validity)
                .unwrap_or(chrono::Duration::days(365)))
        .min(signer.not_after());
        let certificate_id = format!(
            "URN:UVCI:01:CN:{}",
            uuid::Uuid::now_v7()
                .simple()
                .to_string()
                .to_ascii_uppercase()
        );
        let administered = from_ts(&dose.administered_at).unwrap_or(now);
        let claims = dcc::Claims {
            iss: "CN".into(),
            iat: now.timestamp(),
            exp: expires.timestamp(),
            hcert: dcc::Hcert {
                ver: "1.3.0".into(),
                nam: dcc_name(&person.english_name),
                dob,
                v: vec![dcc::VaccinationEntry {
                    tg: DISEASE_COVID19.into(),
                    vp: non_empty(&vaccine.eu_vaccine_prophylaxis, "J07BX03"),
                    mp: vaccine.eu_medicinal_product.clone(),
                    ma: vaccine.eu_marketing_authorisation_holder.clone(),
                    dn: dose.dose_number,
                    sd: vaccine.doses_in_course.max(dose.dose_number),
                    dt: local_date(administered),
                    co: "CN".into(),
                    is: self.settings.dcc_issuer.clone(),
                    ci: certificate_id.clone(),
                }],
            },
        };
        let encoded = signer.sign(&claims).map_err(ServiceError::internal)?;
        let recognition = crate::recognition::recognitions([(
            vaccine.r#type,
            vaccine.recognised_countries.as_slice(),
        )])
        .into_iter()
        .next();
        let mut certificate = pb::InternationalCertificate {
            certificate_id: certificate_id.clone(),
            hc1: encoded.hc1,
            signer_kid: signer.kid_b64(),
            issued_at: Some(ts(now)),
            expires_at: Some(ts(expires)),
            vaccine_id: dose.vaccine_id.clone(),
            dose_number: dose.dose_number,
            doses_in_course: vaccine.doses_in_course,
            administered_at: dose.administered_at,
            recognition,
            qr_svg: String::new(),
        };
        self.store_certificate(
            &certificate_id,
            person_id,
            CertificateKind::International,
            now,
            &certificate,
        )
        .await?;
        if include_qr_svg {
            certificate.qr_svg = qr_svg(&certificate.hc1)?;
        }
        Ok(certificate)
    }

    pub fn signer_certificates(&self) -> pb::GetSignerCertificatesResponse {
        let s = &self.keys.dcc;
        pb::GetSignerCertificatesResponse {
            certificates: vec![pb::SignerCertificate {
                kid: s.kid_b64(),
                certificate_der: s.certificate_der().to_vec(),
                algorithm: "ES256".into(),
                not_before: Some(ts(s.not_before())),
                not_after: Some(ts(s.not_after())),
                revoked_at: None,
            }],
        }
    }

    // -----------------------------------------------------------------------------------
    // PDF

    pub async fn export_pdf(
        &self,
        person_id: &str,
        kind: CertificateKind,
        certificate_id: &str,
        chinese: bool,
    ) -> Result<pb::ExportCertificatePdfResponse, ServiceError> {
        let watermark_id = uuid::Uuid::now_v7().to_string();
        let province = self.settings.province.clone();
        let signing_key_id = self.keys.signing.key_id().to_owned();
        let render = |certificate_id: &str, document: PdfCertificate<'_>| {
            crate::pdf::render(&PdfCertificate {
                watermark_id: &watermark_id,
                watermark_text: format!("OFFICIAL COPY {province}"),
                footer: format!(
                    "Certificate {certificate_id}. Watermark {watermark_id}. The SM3 digest of this file is signed with key {signing_key_id}."
                ),
                ..document
            })
            .map_err(ServiceError::internal)
        };
        let (certificate_id, pdf) = match kind {
            CertificateKind::International => {
                let cert: pb::InternationalCertificate = if certificate_id.is_empty() {
                    self.issue_international(person_id, "", false).await?
                } else {
                    decode(
                        &self
                            .stored_certificate(person_id, certificate_id, kind)
                            .await?,
                    )?
                };
                let decoded = dcc::decode(&cert.hc1).map_err(ServiceError::internal)?;
                let pdf = render(
                    &cert.certificate_id,
                    international_pdf(&cert, &decoded.claims),
                )?;
                (cert.certificate_id, pdf)
            }
            _ => {
                let cert: pb::DomesticCertificate = if certificate_id.is_empty() {
                    self.issue_domestic(person_id, false).await?
                } else {
                    decode(
                        &self
                            .stored_certificate(person_id, certificate_id, kind)
                            .await?,
                    )?
                };
                let claims = cert.claims.clone().unwrap_or_default();
                let pdf = render(
                    &claims.certificate_id,
                    domestic_pdf(&cert, &claims, chinese),
                )?;
                (claims.certificate_id, pdf)
            }
        };
        let digest = healthcode_crypto::sm3_digest(&pdf).to_vec();
        let digest_signature = SignedEnvelope {
            signature: self
                .keys
                .signing
                .sign(&digest)
                .map_err(ServiceError::internal)?,
            key_id: self.keys.signing.key_id().to_owned(),
            payload: digest,
        };
        Ok(pb::ExportCertificatePdfResponse {
            certificate_id,
            pdf,
            watermark_id,
            digest_signature: Some(digest_signature),
        })
    }
}

fn non_empty(value: &str, default: &str) -> String {
    if value.is_empty() { default } else { value }.to_owned()
}

fn line(label: &str, value: impl Into<String>) -> PdfLine {
    PdfLine {
        label: label.to_owned(),
        value: value.into(),
    }
}

fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    from_ts(t).map(local_date).unwrap_or_default()
}

fn domestic_pdf<'a>(
    cert: &'a pb::DomesticCertificate,
    claims: &pb::DomesticCertificateClaims,
    chinese: bool,
) -> PdfCertificate<'a> {
    let holder = claims.holder.clone().unwrap_or_default();
    let (title, labels) = if chinese {
        (
            "新冠病毒疫苗接种电子凭证",
            [
                "姓名",
                "证件号码",
                "凭证编号",
                "签发时间",
                "签发省份",
                "疫苗",
                "生产企业",
                "批号",
                "剂次",
                "接种日期",
                "接种单位",
                "接种人员签名密钥",
            ],
        )
    } else {
        (
            "COVID-19 Vaccination Certificate",
            [
                "Name",
                "Document",
                "Certificate id",
                "Issued",
                "Issuing province",
                "Vaccine",
                "Maker",
                "Batch",
                "Dose",
                "Date",
                "Vaccinating unit",
                "Worker key",
            ],
        )
    };
    let doses = claims
        .doses
        .iter()
        .map(|d| {
            vec![
                line(
                    labels[5],
                    if chinese {
                        d.vaccine_name_zh.clone()
                    } else {
                        d.vaccine_name_en.clone()
                    },
                ),
                line(labels[6], d.maker_zh.clone()),
                line(labels[7], d.batch_number.clone()),
                line(labels[8], d.dose_number.to_string()),
                line(labels[9], time_text(&d.administered_at)),
                line(labels[10], format!("{} ({})", d.unit_name, d.unit_code)),
                line(labels[11], d.worker_key_id.clone()),
            ]
        })
        .collect();
    PdfCertificate {
        title: title.into(),
        subtitle: format!("{} {}", labels[4], claims.issuing_province),
        lines: vec![
            line(labels[0], holder.masked_name),
            line(labels[1], holder.masked_document_number),
            line(labels[2], claims.certificate_id.clone()),
            line(labels[3], time_text(&claims.issued_at)),
        ],
        doses,
        qr_payload: &cert.qr_payload,
        watermark_id: "",
        watermark_text: String::new(),
        footer: String::new(),
        chinese,
    }
}

fn international_pdf<'a>(
    cert: &'a pb::InternationalCertificate,
    claims: &dcc::Claims,
) -> PdfCertificate<'a> {
    let h = &claims.hcert;
    let doses =
        h.v.iter()
            .map(|v| {
                vec![
                    line("Disease or agent targeted", "COVID-19"),
                    line("Vaccine / prophylaxis", v.vp.clone()),
                    line("Vaccine medicinal product", v.mp.clone()),
                    line("Marketing authorisation holder", v.ma.clone()),
                    line("Dose", format!("{} / {}", v.dn, v.sd)),
                    line("Date of vaccination", v.dt.clone()),
                    line("Country of vaccination", v.co.clone()),
                    line("Certificate issuer", v.is.clone()),
                ]
            })
            .collect();
    PdfCertificate {
        title: "EU Digital COVID Certificate - Vaccination".into(),
        subtitle: "International certificate (HCERT), People's Republic of China".into(),
        lines: vec![
            line(
                "Surname(s) and forename(s)",
                format!("{}, {}", h.nam.family, h.nam.given),
            ),
            line("Date of birth", h.dob.clone()),
            line("Unique certificate identifier", cert.certificate_id.clone()),
            line("Valid until", time_text(&cert.expires_at)),
        ],
        doses,
        qr_payload: &cert.hc1,
        watermark_id: "",
        watermark_text: String::new(),
        footer: String::new(),
        chinese: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn birth_dates_come_from_resident_card_numbers_only() {
        assert_eq!(birth_date("11010519491231002X"), "1949-12-31");
        assert_eq!(birth_date("110105194913310021"), "");
        assert_eq!(birth_date("E12345678"), "");
    }

    #[test]
    fn latin_names_split_family_first() {
        let n = dcc_name("ZHANG SAN FENG");
        assert_eq!((n.family.as_str(), n.given.as_str()), ("ZHANG", "SAN FENG"));
        assert_eq!(n.given_t, "SAN<FENG");
    }
}
