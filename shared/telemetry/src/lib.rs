//! Tracing for every service: logs to stdout, spans to an OpenTelemetry collector over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace context carried across every
//! gRPC hop so that one request through the mesh is one trace.
//!
//! Span fields never hold personal data: only opaque ids, method names and outcomes.

use healthcode_config::{ConfigError, Env};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::task::{Context, Poll};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,sea_orm=warn,h2=warn,hyper=warn,tower=warn";
// The exporter itself speaks gRPC: its own spans must not be exported, or every export
// would produce more spans to export.
const DEFAULT_TRACE_FILTER: &str = "info,sqlx=warn,sea_orm=warn,h2=off,hyper=off,tower=off,tonic=off,opentelemetry=off,dev_sms=off";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub service_name: String,
    pub otlp_endpoint: Option<String>,
    pub log_filter: String,
    pub trace_filter: String,
    pub log_format: LogFormat,
}

impl TelemetryConfig {
    pub fn from_env(env: &Env, default_service_name: &str) -> Result<Self, ConfigError> {
        let log_filter = env.or("RUST_LOG", DEFAULT_LOG_FILTER.to_owned())?;
        let trace_filter = env.or("OTEL_TRACES_FILTER", DEFAULT_TRACE_FILTER.to_owned())?;
        EnvFilter::try_new(&log_filter).map_err(|e| ConfigError::invalid("RUST_LOG", e))?;
        EnvFilter::try_new(&trace_filter)
            .map_err(|e| ConfigError::invalid("OTEL_TRACES_FILTER", e))?;
        Ok(TelemetryConfig {
            service_name: env.or("OTEL_SERVICE_NAME", default_service_name.to_owned())?,
            otlp_endpoint: env.optional("OTEL_EXPORTER_OTLP_ENDPOINT")?,
            log_filter,
            trace_filter,
            log_format: env.or("LOG_FORMAT", LogFormat::Text)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Flushes and stops the span exporter when dropped; keep it alive for the whole of `main`.
#[must_use]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("telemetry shutdown: {err}");
        }
    }
}

/// Installs the global subscriber and propagator. Call it inside the tokio runtime (the
/// batch exporter spawns onto it). A second call keeps the first subscriber.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name(config.service_name.clone())
                            .build(),
                    )
                    .build(),
            )
        }
        None => None,
    };

    // Each layer has its own filter: a global one would also silence the span exporter.
    let log_filter = EnvFilter::new(&config.log_filter);
    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    }
    .with_filter(log_filter);
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(config.service_name.clone()))
            .with_filter(EnvFilter::new(&config.trace_filter))
    });
    // A second init (tests, the single-process mesh) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// Client interceptor that carries the caller's trace into the next service.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateTrace;

impl tonic::service::Interceptor for PropagateTrace {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(request.metadata_mut());
        Ok(request)
    }
}

/// Server layer: one span per request, child of the caller's trace when it sent one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl<S> tower_layer::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let method = request.uri().path();
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
        );
        // An invalid or absent parent leaves the span as a new root, which is what we want.
        let _ = span.set_parent(parent);
        self.inner.call(request).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn config_from_env_rejects_a_bad_log_format() {
        let env = Env::from_pairs([("LOG_FORMAT", "yaml")]);
        assert!(TelemetryConfig::from_env(&env, "identity").is_err());
        let env = Env::from_pairs([("OTEL_SERVICE_NAME", "id-1")]);
        let config = TelemetryConfig::from_env(&env, "identity").unwrap();
        assert_eq!(config.service_name, "id-1");
        assert_eq!(config.otlp_endpoint, None);
    }

    #[test]
    fn trace_context_round_trips_through_metadata() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(&headers))
        });
        let mut metadata = tonic::metadata::MetadataMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(&mut metadata))
        });
        let sent = metadata.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(
            sent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(cx.span().span_context().is_remote());
    }
}
