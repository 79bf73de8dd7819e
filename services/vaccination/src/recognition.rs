//! Which countries recognise which vaccine type. This is data: the default table ships in
//! `data/recognition.json` (sized as the requirements' table: 52, 37 and 29 countries), and a
//! vaccine registered with its own `recognised_countries` overrides it.

use healthcode_proto::vaccination::v1::{Recognition, VaccineType};
use std::collections::BTreeMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("../data/recognition.json");

fn table() -> &'static BTreeMap<String, serde_json::Value> {
    static PARSED: OnceLock<BTreeMap<String, serde_json::Value>> = OnceLock::new();
    PARSED.get_or_init(|| serde_json::from_str(TABLE).unwrap_or_default())
}

/// The default countries (ISO 3166-1 alpha-3, sorted) recognising a vaccine type.
pub fn default_countries(vaccine_type: i32) -> Vec<String> {
    let Ok(t) = VaccineType::try_from(vaccine_type) else {
        return Vec::new();
    };
    table()
        .get(t.as_str_name())
        .and_then(|v| v.as_array())
        .map(|codes| {
            codes
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The recognition of each vaccine type among `vaccines` (type, countries), merged per
/// type and sorted by type.
pub fn recognitions<'a>(
    vaccines: impl IntoIterator<Item = (i32, &'a [String])>,
) -> Vec<Recognition> {
    let mut by_type: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for (t, countries) in vaccines {
        let entry = by_type.entry(t).or_default();
        entry.extend(countries.iter().cloned());
    }
    by_type
        .into_iter()
        .map(|(vaccine_type, mut country_codes)| {
            country_codes.sort();
            country_codes.dedup();
            Recognition {
                vaccine_type,
                country_codes,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_has_the_requirements_counts() {
        assert_eq!(default_countries(VaccineType::Inactivated as i32).len(), 52);
        assert_eq!(
            default_countries(VaccineType::RecombinantProtein as i32).len(),
            37
        );
        assert_eq!(
            default_countries(VaccineType::AdenovirusVector as i32).len(),
            29
        );
        assert!(default_countries(VaccineType::Unspecified as i32).is_empty());
        let codes = default_countries(VaccineType::Inactivated as i32);
        assert!(codes.windows(2).all(|w| w[0] < w[1]));
        assert!(
            codes
                .iter()
                .all(|c| c.len() == 3 && c.chars().all(|c| c.is_ascii_uppercase()))
        );
    }
}
