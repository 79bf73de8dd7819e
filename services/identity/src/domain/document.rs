//! Identity documents, parsed so that an invalid one cannot be held.

use chrono::{Datelike, NaiveDate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocumentType {
    ResidentIdCard,
    HkMacauPermit,
    ForeignPassport,
    MilitaryOfficerCard,
}

impl DocumentType {
    pub fn code(self) -> i32 {
        match self {
            DocumentType::ResidentIdCard => 1,
            DocumentType::HkMacauPermit => 2,
            DocumentType::ForeignPassport => 3,
            DocumentType::MilitaryOfficerCard => 4,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(DocumentType::ResidentIdCard),
            2 => Some(DocumentType::HkMacauPermit),
            3 => Some(DocumentType::ForeignPassport),
            4 => Some(DocumentType::MilitaryOfficerCard),
            _ => None,
        }
    }
}

/// Province-level codes of GB/T 2260 (the first two digits of a resident identity number),
/// with 81, 82 and 83 used on the residence permits of Hong Kong, Macau and Taiwan residents.
const PROVINCES: &[u8] = &[
    11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52,
    53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
];

const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const CHECK_CHARS: &[u8; 11] = b"10X98765432";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("must be 18 characters: 17 digits and a check digit (0-9 or X)")]
    ResidentIdFormat,
    #[error("unknown province code (GB/T 2260)")]
    UnknownProvince,
    #[error("birth date is not a real date")]
    ImpossibleBirthDate,
    #[error("birth date is in the future")]
    FutureBirthDate,
    #[error("check digit does not match (GB 11643)")]
    CheckDigit,
    #[error("must be H or M followed by 8 or 10 digits")]
    PermitFormat,
    #[error("must be 5 to 17 letters and digits")]
    PassportFormat,
    #[error("must be an ISO 3166-1 alpha-3 code other than CHN")]
    IssuingCountry,
    #[error("must be 6 to 32 letters, digits or Chinese characters")]
    MilitaryFormat,
    #[error("document type must be set")]
    UnspecifiedType,
}

/// A document number valid for its type, stored upper-case without spaces.
#[derive(Clone, PartialEq, Eq)]
pub struct Document {
    kind: DocumentType,
    number: String,
    issuing_country: String,
}

// Never print a document number, even in a debug line.
impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("kind", &self.kind)
            .field("number", &"<redacted>")
            .finish()
    }
}

impl Document {
    /// Parses `number` as a document of `kind`; `today` bounds birth dates.
    pub fn parse(
        kind: DocumentType,
        number: &str,
        issuing_country: &str,
        today: NaiveDate,
    ) -> Result<Self, DocumentError> {
        let number: String = number
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_uppercase)
            .collect();
        let country = issuing_country.trim().to_ascii_uppercase();
        let issuing_country = match kind {
            DocumentType::ResidentIdCard => {
                parse_resident_id(&number, today)?;
                "CHN".to_owned()
            }
            DocumentType::HkMacauPermit => {
                let b = number.as_bytes();
                let ok = matches!(b.first(), Some(b'H' | b'M'))
                    && matches!(b.len(), 9 | 11)
                    && b[1..].iter().all(u8::is_ascii_digit);
                if !ok {
                    return Err(DocumentError::PermitFormat);
                }
                "CHN".to_owned()
            }
            DocumentType::ForeignPassport => {
                if !(5..=17).contains(&number.len())
                    || !number.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err(DocumentError::PassportFormat);
                }
                if country.len() != 3
                    || !country.bytes().all(|b| b.is_ascii_uppercase())
                    || country == "CHN"
                {
                    return Err(DocumentError::IssuingCountry);
                }
                country
            }
            DocumentType::MilitaryOfficerCard => {
                let len = number.chars().count();
                let ok = (6..=32).contains(&len)
                    && number.chars().all(|c| {
                        c.is_ascii_alphanumeric() || ('\u{4e00}'..='\u{9fff}').contains(&c)
                    });
                if !ok {
                    return Err(DocumentError::MilitaryFormat);
                }
                "CHN".to_owned()
            }
        };
        Ok(Document {
            kind,
            number,
            issuing_country,
        })
    }

    pub fn kind(&self) -> DocumentType {
        self.kind
    }

    pub fn number(&self) -> &str {
        &self.number
    }

    pub fn issuing_country(&self) -> &str {
        &self.issuing_country
    }

    /// The birth date a resident identity number carries (digits 7 to 14).
    pub fn birth_date(&self) -> Option<NaiveDate> {
        if self.kind != DocumentType::ResidentIdCard {
            return None;
        }
        let digits = self.number.get(6..14)?;
        NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
    }

    /// The bytes the blind index is computed over: type, country and number, so that the
    /// same number under two document types or countries is two documents.
    pub fn index_input(&self) -> Vec<u8> {
        format!(
            "doc:{}:{}:{}",
            self.kind.code(),
            self.issuing_country,
            self.number
        )
        .into_bytes()
    }
}

fn parse_resident_id(number: &str, today: NaiveDate) -> Result<(), DocumentError> {
    let b = number.as_bytes();
    if b.len() != 18
        || !b[..17].iter().all(u8::is_ascii_digit)
        || !(b[17].is_ascii_digit() || b[17] == b'X')
    {
        return Err(DocumentError::ResidentIdFormat);
    }
    let digit = |i: usize| u32::from(b[i] - b'0');
    let province = (digit(0) * 10 + digit(1)) as u8;
    if !PROVINCES.contains(&province) {
        return Err(DocumentError::UnknownProvince);
    }
    let year = (6..10).fold(0, |acc, i| acc * 10 + digit(i)) as i32;
    let month = digit(10) * 10 + digit(11);
    let day = digit(12) * 10 + digit(13);
    let birth = NaiveDate::from_ymd_opt(year, month, day)
        .filter(|d| d.year() >= 1850)
        .ok_or(DocumentError::ImpossibleBirthDate)?;
    if birth > today {
        return Err(DocumentError::FutureBirthDate);
    }
    let sum: u32 = WEIGHTS.iter().enumerate().map(|(i, w)| w * digit(i)).sum();
    if CHECK_CHARS[(sum % 11) as usize] != b[17] {
        return Err(DocumentError::CheckDigit);
    }
    Ok(())
}

/// The check character GB 11643 gives for the first 17 digits (for tests and tooling).
pub fn resident_id_check_char(first17: &str) -> Option<char> {
    let b = first17.as_bytes();
    if b.len() != 17 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = WEIGHTS
        .iter()
        .zip(b)
        .map(|(w, d)| w * u32::from(d - b'0'))
        .sum();
    Some(char::from(CHECK_CHARS[(sum % 11) as usize]))
}

impl Document {
    /// A document read back from our own storage, where it was validated on the way in.
    pub fn from_stored(kind: DocumentType, number: String, issuing_country: String) -> Self {
        Document {
            kind,
            number,
            issuing_country,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()
    }

    fn resident(n: &str) -> Result<Document, DocumentError> {
        Document::parse(DocumentType::ResidentIdCard, n, "", today())
    }

    #[test]
    fn the_standards_own_example_with_an_x_check_digit_parses() {
        // GB 11643-1999 uses 11010519491231002X as its worked example.
        let doc = resident("11010519491231002x").unwrap();
        assert_eq!(doc.number(), "11010519491231002X");
        assert_eq!(doc.issuing_country(), "CHN");
        assert_eq!(resident_id_check_char("11010519491231002"), Some('X'));
    }

    #[test]
    fn a_numeric_check_digit_parses() {
        // 440308199901010012: Shenzhen, 1999-01-01; check digit computed per GB 11643.
        let first17 = "44030819990101001";
        let check = resident_id_check_char(first17).unwrap();
        assert!(resident(&format!("{first17}{check}")).is_ok());
    }

    #[test]
    fn a_wrong_check_digit_is_refused() {
        assert_eq!(
            resident("110105194912310021"),
            Err(DocumentError::CheckDigit)
        );
    }

    #[test]
    fn an_unknown_province_is_refused() {
        let first17 = "99010519491231002";
        let check = resident_id_check_char(first17).unwrap();
        assert_eq!(
            resident(&format!("{first17}{check}")),
            Err(DocumentError::UnknownProvince)
        );
    }

    #[test]
    fn impossible_and_future_birth_dates_are_refused() {
        for first17 in [
            "11010519490231002",
            "11010519491331002",
            "11010518000101002",
        ] {
            let check = resident_id_check_char(first17).unwrap();
            assert_eq!(
                resident(&format!("{first17}{check}")),
                Err(DocumentError::ImpossibleBirthDate),
                "{first17}"
            );
        }
        let first17 = "11010520300101002";
        let check = resident_id_check_char(first17).unwrap();
        assert_eq!(
            resident(&format!("{first17}{check}")),
            Err(DocumentError::FutureBirthDate)
        );
    }

    #[test]
    fn malformed_resident_numbers_are_refused() {
        for n in [
            "",
            "1101051949123100",
            "1101051949123100XX",
            "11010519491231002Y",
            "A1010519491231002X",
        ] {
            assert_eq!(resident(n), Err(DocumentError::ResidentIdFormat), "{n}");
        }
    }

    #[test]
    fn other_document_types_follow_their_formats() {
        let t = today();
        assert!(Document::parse(DocumentType::HkMacauPermit, "H12345678", "", t).is_ok());
        assert!(Document::parse(DocumentType::HkMacauPermit, "m1234567890", "", t).is_ok());
        assert_eq!(
            Document::parse(DocumentType::HkMacauPermit, "X12345678", "", t),
            Err(DocumentError::PermitFormat)
        );
        assert!(Document::parse(DocumentType::ForeignPassport, "19FR12345", "fra", t).is_ok());
        assert_eq!(
            Document::parse(DocumentType::ForeignPassport, "19FR12345", "CHN", t),
            Err(DocumentError::IssuingCountry)
        );
        assert_eq!(
            Document::parse(DocumentType::ForeignPassport, "AB-1", "FRA", t),
            Err(DocumentError::PassportFormat)
        );
        assert!(
            Document::parse(DocumentType::MilitaryOfficerCard, "军字第20231234号", "", t).is_ok()
        );
        assert_eq!(
            Document::parse(DocumentType::MilitaryOfficerCard, "12", "", t),
            Err(DocumentError::MilitaryFormat)
        );
    }

    #[test]
    fn a_resident_number_carries_its_birth_date() {
        let doc = resident("11010519491231002X").unwrap();
        assert_eq!(doc.birth_date(), NaiveDate::from_ymd_opt(1949, 12, 31));
        let permit =
            Document::parse(DocumentType::HkMacauPermit, "H12345678", "", today()).unwrap();
        assert_eq!(permit.birth_date(), None);
    }

    #[test]
    fn debug_output_never_shows_the_number() {
        let doc = resident("11010519491231002X").unwrap();
        assert!(!format!("{doc:?}").contains("1101"));
    }
}
