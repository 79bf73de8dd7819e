//! The exchange service as its own process (one Deployment in Kubernetes).

use exchange::config::ExchangeConfig;
use healthcode_config::{Env, exit_on_config_error};

fn main() {
    let env = Env::from_process();
    let config = ExchangeConfig::from_env(&env).unwrap_or_else(|e| exit_on_config_error(&e));
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
        let app = match exchange::Application::build(config, backends).await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(error = %err, "exchange failed to start");
                return 1;
            }
        };
        tracing::info!(addr = %app.local_addr(), partner_addr = ?app.partner_addr(), "exchange ready");
        healthcode_server::shutdown_signal().await;
        app.shutdown().await;
        0
    });
    std::process::exit(code);
}
