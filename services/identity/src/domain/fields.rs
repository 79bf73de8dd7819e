//! The other personal fields of a registration, parsed.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("contains characters a name cannot hold")]
    BadNameCharacters,
    #[error("must be Latin letters, spaces, hyphens, apostrophes or dots")]
    BadEnglishName,
    #[error("must be a mainland mobile number: 11 digits starting with 1, optionally +86")]
    BadPhone,
    #[error("must be 6 digits")]
    BadCode,
    #[error("must be 16 to 19 digits with a valid Luhn check digit")]
    BadCardNumber,
    #[error("must be a JPEG or PNG image of at most 2 MiB")]
    BadImage,
}

macro_rules! redacted_debug {
    ($t:ty) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($t), "(<redacted>)"))
            }
        }
    };
}

/// A legal name as on the document.
#[derive(Clone, PartialEq, Eq)]
pub struct PersonName(String);
redacted_debug!(PersonName);

impl PersonName {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(FieldError::Empty);
        }
        if name.chars().count() > 64 {
            return Err(FieldError::TooLong(64));
        }
        // Letters of any script, the middle dot of minority and foreign names, spaces,
        // hyphens and apostrophes; nothing that could be markup or a control character.
        let ok = name
            .chars()
            .all(|c| c.is_alphabetic() || matches!(c, '·' | '•' | ' ' | '-' | '\'' | '.'));
        if !ok {
            return Err(FieldError::BadNameCharacters);
        }
        Ok(PersonName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name in Latin letters, as on a passport.
#[derive(Clone, PartialEq, Eq)]
pub struct EnglishName(String);
redacted_debug!(EnglishName);

impl EnglishName {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let name = raw.split_whitespace().collect::<Vec<_>>().join(" ");
        if name.is_empty() {
            return Err(FieldError::Empty);
        }
        if name.len() > 100 {
            return Err(FieldError::TooLong(100));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphabetic() || matches!(c, ' ' | '-' | '\'' | '.'))
        {
            return Err(FieldError::BadEnglishName);
        }
        Ok(EnglishName(name.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A mainland mobile number, stored as its 11 digits.
#[derive(Clone, PartialEq, Eq)]
pub struct PhoneNumber(String);
redacted_debug!(PhoneNumber);

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let compact: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        let digits = compact
            .strip_prefix("+86")
            .or_else(|| compact.strip_prefix("0086"))
            .unwrap_or(&compact);
        let b = digits.as_bytes();
        if b.len() != 11
            || b[0] != b'1'
            || !(b'3'..=b'9').contains(&b[1])
            || !b.iter().all(u8::is_ascii_digit)
        {
            return Err(FieldError::BadPhone);
        }
        Ok(PhoneNumber(digits.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `138****1234`: what a log line or an operator may see.
    pub fn masked(&self) -> String {
        format!("{}****{}", &self.0[..3], &self.0[7..])
    }
}

/// The six digits of a one-time phone code.
#[derive(Clone, PartialEq, Eq)]
pub struct PhoneCode(String);
redacted_debug!(PhoneCode);

impl PhoneCode {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let code = raw.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::BadCode);
        }
        Ok(PhoneCode(code.to_owned()))
    }

    pub fn generate() -> Self {
        PhoneCode(format!("{:06}", rand::random_range(0..1_000_000u32)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A bank card number with a valid Luhn check digit. Held only for the provider call.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(String);
redacted_debug!(CardNumber);

impl CardNumber {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let digits: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        if !(16..=19).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::BadCardNumber);
        }
        let sum: u32 = digits
            .bytes()
            .rev()
            .enumerate()
            .map(|(i, b)| {
                let d = u32::from(b - b'0');
                if i % 2 == 1 {
                    let doubled = d * 2;
                    if doubled > 9 { doubled - 9 } else { doubled }
                } else {
                    d
                }
            })
            .sum();
        if !sum.is_multiple_of(10) {
            return Err(FieldError::BadCardNumber);
        }
        Ok(CardNumber(digits))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub const MAX_IMAGE_BYTES: usize = 2 * 1024 * 1024;

/// A JPEG or PNG image (checked by its magic bytes), at most 2 MiB.
#[derive(Clone, PartialEq, Eq)]
pub struct Image(Vec<u8>);
redacted_debug!(Image);

impl Image {
    pub fn parse(bytes: &[u8]) -> Result<Self, FieldError> {
        let is_jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
        let is_png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
        if bytes.is_empty() || bytes.len() > MAX_IMAGE_BYTES || !(is_jpeg || is_png) {
            return Err(FieldError::BadImage);
        }
        Ok(Image(bytes.to_vec()))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The first character of the name, an asterisk for each of the rest.
pub fn mask_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => std::iter::once(first)
            .chain(chars.filter(|c| !c.is_whitespace()).map(|_| '*'))
            .collect(),
        None => String::new(),
    }
}

/// The first and last characters of a document number, asterisks between.
pub fn mask_document_number(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    match chars.len() {
        0 => String::new(),
        1 | 2 => "*".repeat(chars.len()),
        n => {
            let mut out = String::with_capacity(n);
            out.push(chars[0]);
            out.extend(std::iter::repeat_n('*', n - 2));
            out.push(chars[n - 1]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_scripts_and_refuse_markup() {
        assert!(PersonName::parse("张三").is_ok());
        assert!(PersonName::parse("阿依古丽·买买提").is_ok());
        assert_eq!(PersonName::parse("  "), Err(FieldError::Empty));
        assert_eq!(
            PersonName::parse("<script>"),
            Err(FieldError::BadNameCharacters)
        );
        assert_eq!(
            EnglishName::parse(" jean  dupont ").unwrap().as_str(),
            "JEAN DUPONT"
        );
        assert_eq!(EnglishName::parse("让"), Err(FieldError::BadEnglishName));
    }

    #[test]
    fn phones_are_mainland_mobiles() {
        assert_eq!(
            PhoneNumber::parse("+86 138-0013-8000").unwrap().as_str(),
            "13800138000"
        );
        assert_eq!(
            PhoneNumber::parse("13800138000").unwrap().masked(),
            "138****8000"
        );
        for bad in ["12800138000", "1380013800", "abc", "+1 415 555 0100"] {
            assert_eq!(PhoneNumber::parse(bad), Err(FieldError::BadPhone), "{bad}");
        }
    }

    #[test]
    fn card_numbers_need_a_luhn_digit() {
        assert!(CardNumber::parse("4111111111111111").is_ok());
        assert!(CardNumber::parse("4111111111111112").is_err());
        assert!(CardNumber::parse("411111111111").is_err());
    }

    #[test]
    fn images_are_checked_by_their_magic() {
        assert!(Image::parse(b"\x89PNG\r\n\x1a\nrest").is_ok());
        assert!(Image::parse(&[0xFF, 0xD8, 0xFF, 0xE0]).is_ok());
        assert_eq!(Image::parse(b"GIF89a"), Err(FieldError::BadImage));
        assert_eq!(Image::parse(&[]), Err(FieldError::BadImage));
    }

    #[test]
    fn masks_keep_only_what_a_venue_may_see() {
        assert_eq!(mask_name("张三丰"), "张**");
        assert_eq!(mask_name("JEAN DUPONT"), "J*********");
        assert_eq!(
            mask_document_number("11010519491231002X"),
            "1****************X"
        );
        assert_eq!(mask_document_number("AB"), "**");
        assert!(!format!("{:?}", PhoneNumber::parse("13800138000").unwrap()).contains("138"));
    }
}
