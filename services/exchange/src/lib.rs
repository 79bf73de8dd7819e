//! The exchange service: cross-province mutual recognition of code colors.
//!
//! - [`records`]: keyed pseudonyms, signed exchange records, their checks on receipt, and
//!   the merge rule every province computes the same way.
//! - [`tls`]: mutual TLS between partners, and the development PKI.

pub mod records;
pub mod tls;
