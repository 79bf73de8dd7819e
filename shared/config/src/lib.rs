//! Configuration from the environment: typed, read once at start-up, and fatal when wrong.
//!
//! Values are never echoed back in errors, because many of them are secrets (keys, URLs
//! with passwords).

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

/// Exit code for a configuration error (sysexits `EX_CONFIG`), distinct from a crash.
pub const EXIT_CONFIG: i32 = 78;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: String },
    #[error("{name} is invalid: {reason}")]
    Invalid { name: String, reason: String },
}

impl ConfigError {
    pub fn invalid(name: &str, reason: impl Display) -> Self {
        ConfigError::Invalid {
            name: name.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A snapshot of environment variables. Services read their configuration from one
/// snapshot so that tests (and the single-process mesh) can hand each service its own.
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    /// The process environment (variables that are not valid UTF-8 are skipped).
    pub fn from_process() -> Self {
        Env {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A copy with `name` set, for callers that derive one service's environment from another.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// The raw value; an empty value counts as unset.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    pub fn optional<T>(&self, name: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.raw(name)
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|e| ConfigError::invalid(name, e))
            })
            .transpose()
    }

    pub fn required<T>(&self, name: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.optional(name)?.ok_or_else(|| ConfigError::Missing {
            name: name.to_owned(),
        })
    }

    pub fn or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.optional(name)?.unwrap_or(default))
    }
}

/// Prints the error and exits with [`EXIT_CONFIG`]. For `main` only.
pub fn exit_on_config_error(err: &ConfigError) -> ! {
    eprintln!("configuration error: {err}");
    std::process::exit(EXIT_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_typed_values_defaults_and_errors_without_echoing_values() {
        let env = Env::from_pairs([("PORT", "8080"), ("BAD", "secret-value"), ("EMPTY", " ")]);
        assert_eq!(env.required::<u16>("PORT"), Ok(8080));
        assert_eq!(env.or::<u16>("MISSING", 7), Ok(7));
        assert_eq!(env.optional::<u16>("EMPTY"), Ok(None));
        assert!(matches!(
            env.required::<u16>("MISSING"),
            Err(ConfigError::Missing { .. })
        ));
        let err = env.required::<u16>("BAD").unwrap_err().to_string();
        assert!(err.starts_with("BAD is invalid"), "{err}");
        assert!(!err.contains("secret-value"), "{err}");
        assert!(!format!("{env:?}").contains("secret-value"));
    }
}
