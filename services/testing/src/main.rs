//! The testing service as its own process (one Deployment in Kubernetes). Payment
//! providers other than the sandbox are adapters outside this repository; without
//! `SANDBOX_PAYMENT_KEY` no provider is configured and priced bookings cannot be paid.

use healthcode_config::{Env, exit_on_config_error};
use std::sync::Arc;
use testing::config::TestingConfig;
use testing::notify::LocalNotifier;
use testing::payments::{Providers, SandboxProvider};

fn main() {
    let mut config =
        TestingConfig::from_env(&Env::from_process()).unwrap_or_else(|e| exit_on_config_error(&e));
    let telemetry = config.telemetry.clone();
    healthcode_server::run_process("testing", &telemetry, async move {
        let backends =
            healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
                .await
                .map_err(|e| format!("cache or event bus unavailable: {e}"))?;
        let mut providers = Providers::default();
        if let Some(key) = config.sandbox_payment_key.take() {
            providers = providers.with(Arc::new(SandboxProvider::new(key)));
        }
        let externals = testing::Externals {
            providers,
            notifier: Arc::new(LocalNotifier::default()),
        };
        testing::Application::build(config, backends, externals)
            .await
            .map_err(|e| e.to_string())
    })
}
