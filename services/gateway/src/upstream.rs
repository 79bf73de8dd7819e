//! Clients of the services the gateway asks: every call carries the gateway's caller token,
//! the trace context, and a deadline.

use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::risk::v1::risk_service_client::RiskServiceClient;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds the caller token and the W3C trace context to every outbound request.
#[derive(Clone)]
pub struct Outbound {
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for Outbound {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        healthcode_telemetry::inject_context(request.metadata_mut());
        Ok(request)
    }
}

pub type Risk = RiskServiceClient<InterceptedService<Channel, Outbound>>;
pub type Identity = IdentityServiceClient<InterceptedService<Channel, Outbound>>;

#[derive(Clone)]
pub struct Upstreams {
    pub risk: Risk,
    pub identity: Identity,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL {0}")]
    Url(String),
    #[error("SERVICE_TOKEN is not a valid header value")]
    Token,
}

fn channel(url: &str, timeout: Duration) -> Result<Channel, UpstreamError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|_| UpstreamError::Url(url.to_owned()))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        // Connects on first use and reconnects by itself: the gateway starts while its
        // upstreams are still coming up.
        .connect_lazy())
}

impl Upstreams {
    pub fn new(
        risk_url: &str,
        identity_url: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, UpstreamError> {
        let authorization: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| UpstreamError::Token)?;
        let outbound = Outbound { authorization };
        Ok(Upstreams {
            risk: RiskServiceClient::with_interceptor(
                channel(risk_url, timeout)?,
                outbound.clone(),
            ),
            identity: IdentityServiceClient::with_interceptor(
                channel(identity_url, timeout)?,
                outbound,
            ),
            timeout,
        })
    }

    /// A request with the deadline set, so the callee also knows when to give up.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}
