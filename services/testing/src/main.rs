//! The testing service as its own process (one Deployment in Kubernetes). Payment
//! providers other than the sandbox are adapters outside this repository; without
//! `SANDBOX_PAYMENT_KEY` no provider is configured and priced bookings cannot be paid.

use healthcode_config::{Env, exit_on_config_error};
use std::sync::Arc;
use testing::config::TestingConfig;
use testing::notify::LocalNotifier;
use testing::payments::{Providers, SandboxProvider};

fn main() {
    let env = Env::from_process();
    let mut config = TestingConfig::from_env(&env).unwrap_or_else(|e| exit_on_config_error(&e));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let _telemetry = match healthcode_telemetry::init(&config.telemetry) {
            Ok(guard) => guard,
            Err(err) => {
                eprintln!("telemetry: {err}");
                return 1;
            }
        };
        let backends =
            match healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
                .await
            {
                Ok(b) => b,
                Err(err) => {
                    tracing::error!(error = %err, "cache or event bus unavailable at start");
                    return 1;
                }
            };
        let mut providers = Providers::default();
        if let Some(key) = config.sandbox_payment_key.take() {
            providers = providers.with(Arc::new(SandboxProvider::new(key)));
        }
        let externals = testing::Externals {
            providers,
            notifier: Arc::new(LocalNotifier::default()),
        };
        let app = match testing::Application::build(config, backends, externals).await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(error = %err, "testing failed to start");
                return 1;
            }
        };
        tracing::info!(addr = %app.local_addr(), "testing ready");
        healthcode_server::shutdown_signal().await;
        app.shutdown().await;
        0
    });
    std::process::exit(code);
}
