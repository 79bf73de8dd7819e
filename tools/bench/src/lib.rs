//! Load and benchmark tooling for the health code backend.
//!
//! - [`load`]: the engine, closed loop, open loop and OS threads, with latency histograms.
//! - [`baselines`]: what the machine and the stack do with no service logic (gRPC echo,
//!   Redis GET and MGET, SM2 sign and verify).
//! - [`report`]: results as a Markdown table in `BENCHMARKS.md`.
//!
//! A new scenario (a service's RPCs) drives its calls with [`load`], turns each result into a
//! [`report::Row`], and writes its rows under its own [`report::Markers`].

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod baselines;
pub mod exchange;
pub mod gateway;
pub mod load;
pub mod report;
pub mod testing;
pub mod vaccination;
