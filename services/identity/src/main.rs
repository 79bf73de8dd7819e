//! The identity service as its own process (one Deployment in Kubernetes).

use healthcode_config::{Env, exit_on_config_error};
use identity::config::{IdentityConfig, ProviderChoice};
use identity::providers::Providers;

fn main() {
    let env = Env::from_process();
    let config = IdentityConfig::from_env(&env).unwrap_or_else(|e| exit_on_config_error(&e));
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
        let providers = match config.providers {
            ProviderChoice::Local => {
                tracing::warn!(
                    "PROVIDERS=local: SMS, face match and bank card are development stand-ins"
                );
                Providers::local().0
            }
        };
        let app = match identity::Application::build(config, providers).await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(error = %err, "identity failed to start");
                return 1;
            }
        };
        tracing::info!(addr = %app.local_addr(), "identity ready");
        healthcode_server::shutdown_signal().await;
        app.shutdown().await;
        0
    });
    std::process::exit(code);
}
