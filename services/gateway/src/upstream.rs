//! Clients of the services the gateway asks: every call carries the gateway's caller token,
//! the trace context, and a deadline.

use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::risk::v1::risk_service_client::RiskServiceClient;
use healthcode_server::outbound::{Outbound, lazy_channel, with_deadline};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use healthcode_server::outbound::OutboundError as UpstreamError;

pub type Risk = RiskServiceClient<InterceptedService<Channel, Outbound>>;
pub type Identity = IdentityServiceClient<InterceptedService<Channel, Outbound>>;

#[derive(Clone)]
pub struct Upstreams {
    pub risk: Risk,
    pub identity: Identity,
    pub timeout: Duration,
}

impl Upstreams {
    pub fn new(
        risk_url: &str,
        identity_url: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, UpstreamError> {
        let outbound = Outbound::new(token)?;
        Ok(Upstreams {
            risk: RiskServiceClient::with_interceptor(
                lazy_channel(risk_url, timeout)?,
                outbound.clone(),
            ),
            identity: IdentityServiceClient::with_interceptor(
                lazy_channel(identity_url, timeout)?,
                outbound,
            ),
            timeout,
        })
    }

    /// A request with the deadline set, so the callee also knows when to give up.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_deadline(message, self.timeout)
    }
}
