//! The gateway as its own process (one Deployment in Kubernetes).

use gateway::config::GatewayConfig;
use healthcode_config::{Env, exit_on_config_error};

fn main() {
    let config =
        GatewayConfig::from_env(&Env::from_process()).unwrap_or_else(|e| exit_on_config_error(&e));
    let telemetry = config.telemetry.clone();
    healthcode_server::run_process("gateway", &telemetry, async move {
        let backends =
            healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
                .await
                .map_err(|e| format!("cache or event bus unavailable: {e}"))?;
        gateway::Application::build(config, backends)
            .await
            .map_err(|e| e.to_string())
    })
}
