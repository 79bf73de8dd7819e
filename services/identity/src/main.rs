//! The identity service as its own process (one Deployment in Kubernetes).

use healthcode_config::{Env, exit_on_config_error};
use identity::config::{IdentityConfig, ProviderChoice};
use identity::providers::Providers;

fn main() {
    let config =
        IdentityConfig::from_env(&Env::from_process()).unwrap_or_else(|e| exit_on_config_error(&e));
    let telemetry = config.telemetry.clone();
    healthcode_server::run_process("identity", &telemetry, async move {
        let providers = match config.providers {
            ProviderChoice::Local => {
                tracing::warn!(
                    "PROVIDERS=local: SMS, face match and bank card are development stand-ins"
                );
                Providers::local().0
            }
        };
        let backends =
            healthcode_events::Backends::connect(config.redis.as_ref(), &config.cache_prefix)
                .await
                .map_err(|e| format!("cache or event bus unavailable: {e}"))?;
        identity::Application::build(config, backends, providers)
            .await
            .map_err(|e| e.to_string())
    })
}
