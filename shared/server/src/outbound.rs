//! What every outbound call of a service carries: the caller token, the W3C trace context
//! and a deadline, over a channel that connects on first use.

use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// Adds the caller token and the trace context to every outbound request.
#[derive(Clone)]
pub struct Outbound {
    authorization: MetadataValue<Ascii>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("invalid upstream URL {0}")]
    Url(String),
    #[error("SERVICE_TOKEN is not a valid header value")]
    Token,
}

impl Outbound {
    /// The interceptor for a service whose caller token is `token`.
    pub fn new(token: &str) -> Result<Self, OutboundError> {
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| OutboundError::Token)?;
        Ok(Outbound { authorization })
    }
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

/// A channel to `url` with `timeout` on every call. It connects on first use and reconnects
/// by itself: a service starts while its upstreams are still coming up.
pub fn lazy_channel(url: &str, timeout: Duration) -> Result<Channel, OutboundError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|_| OutboundError::Url(url.to_owned()))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A request with the deadline set, so the callee also knows when to give up.
pub fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}
