//! How every service serves: the same middleware in the same order, the standard health and
//! reflection services, and a graceful drain on SIGTERM.

use healthcode_config::{ConfigError, Env};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use healthcode_telemetry::ServerTraceLayer;
pub use tonic_health;

pub mod outbound;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `LISTEN_ADDR`; port 0 picks a free port (tests, the single-process mesh).
    pub listen_addr: SocketAddr,
    /// `MAX_CONCURRENT_REQUESTS`: beyond it requests are refused at once, never queued.
    pub max_concurrent_requests: usize,
    /// `REQUEST_TIMEOUT_MS`: the longest any handler may run, whatever deadline the caller set.
    pub request_timeout: Duration,
    /// `SHUTDOWN_GRACE_SECONDS`: how long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `SHUTDOWN_DRAIN_DELAY_MS`: how long to keep serving after reporting NOT_SERVING, so
    /// that load balancers and endpoints stop sending before the listener closes.
    pub drain_delay: Duration,
}

impl ServerSettings {
    pub fn from_env(env: &Env, default_listen_addr: SocketAddr) -> Result<Self, ConfigError> {
        let max_concurrent_requests = env.or("MAX_CONCURRENT_REQUESTS", 512usize)?;
        if max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "MAX_CONCURRENT_REQUESTS",
                "must be at least 1",
            ));
        }
        let timeout_ms = env.or("REQUEST_TIMEOUT_MS", 5_000u64)?;
        if timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "REQUEST_TIMEOUT_MS",
                "must be at least 1",
            ));
        }
        Ok(ServerSettings {
            listen_addr: env.or("LISTEN_ADDR", default_listen_addr)?,
            max_concurrent_requests,
            request_timeout: Duration::from_millis(timeout_ms),
            shutdown_grace: Duration::from_secs(env.or("SHUTDOWN_GRACE_SECONDS", 20u64)?),
            drain_delay: Duration::from_millis(env.or("SHUTDOWN_DRAIN_DELAY_MS", 0u64)?),
        })
    }
}

/// A server that is accepting requests.
pub struct RunningServer {
    local_addr: SocketAddr,
    health: HealthReporter,
    service_names: Vec<String>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
    drain_delay: Duration,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, reports NOT_SERVING, lets in-flight requests finish within the grace
    /// period, then returns.
    pub async fn shutdown(self) {
        for name in &self.service_names {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        tokio::time::sleep(self.drain_delay).await;
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        match tokio::time::timeout(self.grace, self.task).await {
            Ok(Ok(Ok(()))) => tracing::info!(addr = %self.local_addr, "server drained"),
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "server stopped with an error"),
            Ok(Err(err)) => tracing::error!(error = %err, "server task failed"),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "requests still running after the grace period; aborting");
                abort.abort();
            }
        }
    }
}

/// Binds `settings.listen_addr`, adds health and reflection to `routes`, and serves in the
/// background. `service_names` are the fully-qualified gRPC service names to report as
/// SERVING in the health service.
pub async fn start(
    settings: &ServerSettings,
    routes: Routes,
    service_names: &[&str],
    file_descriptor_set: &'static [u8],
) -> std::io::Result<RunningServer> {
    start_tls(settings, routes, service_names, file_descriptor_set, None).await
}

/// As [`start`], over TLS when `tls` is given (the exchange's partner listener, which
/// requires a client certificate). A TLS listener faces the outside: it serves health but
/// not reflection, which would describe every service of the mesh to a partner.
pub async fn start_tls(
    settings: &ServerSettings,
    routes: Routes,
    service_names: &[&str],
    file_descriptor_set: &'static [u8],
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> std::io::Result<RunningServer> {
    let listener = TcpListener::bind(settings.listen_addr).await?;
    let local_addr = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;

    let mut routes = routes.add_service(health_service);
    if tls.is_none() {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(file_descriptor_set)
            .build_v1()
            .map_err(std::io::Error::other)?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(file_descriptor_set)
            .build_v1alpha()
            .map_err(std::io::Error::other)?;
        routes = routes
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
    }

    let layers = tower::ServiceBuilder::new()
        // Outermost, so that even a refused request is a span in the caller's trace.
        .layer(ServerTraceLayer)
        // Refuse what is beyond capacity at once instead of queueing without bound, and end
        // what runs too long with DEADLINE_EXCEEDED; probes and reflection are exempt, so a
        // busy pod is not restarted for being busy.
        .layer(AdmissionLayer::new(
            settings.max_concurrent_requests,
            settings.request_timeout,
        ))
        .into_inner();

    let (stop, mut stopped) = watch::channel(false);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            // gRPC answers are small; Nagle's algorithm would only add latency.
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(std::io::Error::other)?;
    }
    let server = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(layers)
        .add_routes(routes);
    let task = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(addr = %local_addr, services = ?service_names, "serving");
    Ok(RunningServer {
        local_addr,
        health,
        service_names: service_names.iter().map(|s| s.to_string()).collect(),
        stop,
        task,
        grace: settings.shutdown_grace,
        drain_delay: settings.drain_delay,
    })
}

/// What a service's process runs: its address, and a graceful shutdown.
pub trait Process {
    fn local_addr(&self) -> SocketAddr;
    fn shutdown(self) -> impl Future<Output = ()>;
}

/// Implements [`Process`] for a service's `Application` from its own `local_addr` and
/// `shutdown`.
#[macro_export]
macro_rules! process {
    ($app:ty) => {
        impl $crate::Process for $app {
            fn local_addr(&self) -> ::std::net::SocketAddr {
                <$app>::local_addr(self)
            }
            async fn shutdown(self) {
                <$app>::shutdown(self).await
            }
        }
    };
}

/// Runs one service as its own process (one Deployment in Kubernetes): a multi-threaded
/// runtime, telemetry, then `start`; serves until SIGTERM or Ctrl-C, then shuts down
/// gracefully and exits 0. Exits 1 when anything fails to start.
pub fn run_process<A: Process>(
    name: &str,
    telemetry: &healthcode_telemetry::TelemetryConfig,
    start: impl Future<Output = Result<A, String>>,
) -> ! {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let _telemetry = match healthcode_telemetry::init(telemetry) {
            Ok(guard) => guard,
            Err(err) => {
                eprintln!("telemetry: {err}");
                return 1;
            }
        };
        let app = match start.await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(error = %err, service = name, "failed to start");
                return 1;
            }
        };
        tracing::info!(addr = %app.local_addr(), service = name, "ready");
        shutdown_signal().await;
        app.shutdown().await;
        0
    });
    std::process::exit(code);
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received; draining"),
        _ = term => tracing::info!("SIGTERM received; draining"),
    }
}

/// Admission control shared by every connection of the process, and the server's own
/// deadline (the caller's `grpc-timeout` is honoured by tonic as well).
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl AdmissionLayer {
    pub fn new(max_concurrent: usize, timeout: Duration) -> Self {
        AdmissionLayer {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            timeout,
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: self.permits.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

impl<S, B, R> tower::Service<http::Request<B>> for Admission<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!("over capacity; request refused");
            let status =
                tonic::Status::resource_exhausted("server over capacity; retry with backoff");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let future = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            let outcome = tokio::time::timeout(timeout, future).await;
            drop(permit);
            match outcome {
                Ok(response) => response,
                Err(_) => {
                    tracing::warn!(?timeout, "request exceeded the server deadline");
                    Ok(
                        tonic::Status::deadline_exceeded("the server's deadline passed")
                            .into_http(),
                    )
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn grpc_status(response: &http::Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    /// An inner service that answers only when `release` is notified.
    fn gated(
        release: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<String>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok(http::Response::new("ok".to_owned()))
            }
        })
    }

    #[tokio::test]
    async fn beyond_capacity_is_refused_at_once_but_probes_pass() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = AdmissionLayer::new(1, Duration::from_secs(30));
        let mut first = layer.layer(gated(release.clone()));
        let held = tokio::spawn(first.ready().await.unwrap().call(request("/svc/Slow")));
        tokio::task::yield_now().await;

        let mut second = layer.layer(gated(release.clone()));
        let refused = second
            .ready()
            .await
            .unwrap()
            .call(request("/svc/Other"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&refused), Some("8"), "RESOURCE_EXHAUSTED");

        let probe = tokio::spawn(
            layer
                .layer(gated(release.clone()))
                .oneshot(request("/grpc.health.v1.Health/Check")),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.notify_waiters();
        assert_eq!(probe.await.unwrap().unwrap().body(), "ok");
        assert_eq!(held.await.unwrap().unwrap().body(), "ok");
    }

    #[tokio::test]
    async fn a_handler_past_the_deadline_gets_deadline_exceeded() {
        let never = Arc::new(tokio::sync::Notify::new());
        let response = AdmissionLayer::new(4, Duration::from_millis(50))
            .layer(gated(never))
            .oneshot(request("/svc/Slow"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), Some("4"), "DEADLINE_EXCEEDED");
    }
}
