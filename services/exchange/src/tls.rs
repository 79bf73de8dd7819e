//! Mutual TLS between partners: who is calling is the certificate it presented, never
//! anything in the request.
//!
//! - [`generate_dev_pki`]: a development certificate authority, this province's server
//!   certificate and one client certificate per partner (ECDSA P-256, generated fresh by
//!   `healthcode exchange-pki`, never committed). Production uses certificates from the
//!   provinces' own CAs; only their PEM changes.
//! - [`fingerprint`] and [`peer_fingerprint`]: SHA-256 of a certificate's DER, the key the
//!   partner registry is looked up by.
//! - [`server_tls`] and [`client_tls`]: tonic configurations that require a client
//!   certificate from the given CA, and present one.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A certificate and its private key, PEM, with the SHA-256 of the certificate's DER.
#[derive(Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub key_pem: String,
    pub sha256: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// What `healthcode exchange-pki` writes: the CA, this province's server certificate, and a
/// client certificate per partner id.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca: Issued,
    pub server: Issued,
    pub partners: Vec<(String, Issued)>,
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The fingerprint of the first certificate of a PEM text.
pub fn pem_fingerprint(pem: &str) -> Result<String, TlsError> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END CERTIFICATE-----"))
        .collect();
    if body.is_empty() {
        return Err(TlsError::Invalid("no PEM certificate".into()));
    }
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|_| TlsError::Invalid("the PEM certificate is not base64".into()))?;
    Ok(fingerprint(&der))
}

/// The fingerprint of the client certificate the caller presented over TLS; `None` on a
/// connection without one (plain TCP, or TLS without client authentication).
pub fn peer_fingerprint<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    certs.first().map(|c| fingerprint(c.as_ref()))
}

fn issued(certificate: &rcgen::Certificate, key: &KeyPair) -> Issued {
    Issued {
        certificate_pem: certificate.pem(),
        key_pem: key.serialize_pem(),
        sha256: fingerprint(certificate.der()),
    }
}

/// A development CA for `province`, a server certificate for `server_names` (DNS names or
/// IP addresses) and a client certificate per partner id (its common name).
pub fn generate_dev_pki(
    province: &str,
    server_names: &[String],
    partner_ids: &[String],
) -> Result<DevPki, TlsError> {
    if server_names.is_empty() {
        return Err(TlsError::Invalid(
            "at least one server name is needed".into(),
        ));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("healthcode development exchange CA {province}"),
    );
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "healthcode development");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = issued(&ca_cert, &ca_key);
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>,
                common_name: &str,
                usage: ExtendedKeyUsagePurpose|
     -> Result<Issued, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(issued(&cert, &key))
    };
    let server = leaf(
        server_names.to_vec(),
        &format!("exchange.{province}"),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let partners = partner_ids
        .iter()
        .map(|id| {
            leaf(Vec::new(), id, ExtendedKeyUsagePurpose::ClientAuth).map(|i| (id.clone(), i))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DevPki {
        ca,
        server,
        partners,
    })
}

/// Serve with `server` as this province's identity, requiring every caller to present a
/// client certificate issued by `client_ca_pem`.
pub fn server_tls(server: &Issued, client_ca_pem: &str) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.certificate_pem, &server.key_pem))
        .client_ca_root(Certificate::from_pem(client_ca_pem))
}

/// Call a partner whose server certificate is issued by `server_ca_pem` for `domain`,
/// presenting `client` as this province's identity.
pub fn client_tls(server_ca_pem: &str, domain: &str, client: &Issued) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca_pem))
        .domain_name(domain)
        .identity(Identity::from_pem(&client.certificate_pem, &client.key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use healthcode_proto::bench::v1::echo_service_client::EchoServiceClient;
    use healthcode_proto::bench::v1::echo_service_server::{EchoService, EchoServiceServer};
    use healthcode_proto::bench::v1::{EchoRequest, EchoResponse};
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Response, Status};

    /// Answers with the fingerprint of the caller's certificate.
    struct WhoAmI;

    #[tonic::async_trait]
    impl EchoService for WhoAmI {
        async fn echo(
            &self,
            request: Request<EchoRequest>,
        ) -> Result<Response<EchoResponse>, Status> {
            let who = peer_fingerprint(&request)
                .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
            Ok(Response::new(EchoResponse {
                payload: who.into_bytes(),
            }))
        }
    }

    async fn serve(pki: &DevPki) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = server_tls(&pki.server, &pki.ca.certificate_pem);
        tokio::spawn(async move {
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(EchoServiceServer::new(WhoAmI))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    async fn call(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let reply = EchoServiceClient::new(channel)
            .echo(EchoRequest::default())
            .await
            .map_err(|s| format!("{s:?}"))?;
        Ok(String::from_utf8(reply.into_inner().payload).unwrap())
    }

    fn names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    #[tokio::test]
    async fn the_server_sees_which_partner_calls_and_refuses_strangers() {
        let pki = generate_dev_pki("330000", &names(), &["310000".into(), "320000".into()])
            .expect("dev pki");
        assert_eq!(pki.partners.len(), 2);
        assert_ne!(pki.partners[0].1.sha256, pki.partners[1].1.sha256);
        assert_eq!(
            pem_fingerprint(&pki.partners[0].1.certificate_pem).unwrap(),
            pki.partners[0].1.sha256
        );
        let addr = serve(&pki).await;

        // Each partner is told apart by its certificate.
        for (_, partner) in &pki.partners {
            let who = call(
                addr,
                client_tls(&pki.ca.certificate_pem, "localhost", partner),
            )
            .await
            .expect("a partner with its certificate gets in");
            assert_eq!(who, partner.sha256);
        }

        // No client certificate: refused by the handshake.
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca.certificate_pem))
            .domain_name("localhost");
        assert!(call(addr, anonymous).await.is_err());

        // A certificate from another CA: refused.
        let other = generate_dev_pki("440000", &names(), &["310000".into()]).unwrap();
        assert!(
            call(
                addr,
                client_tls(&pki.ca.certificate_pem, "localhost", &other.partners[0].1)
            )
            .await
            .is_err()
        );

        // A server this partner does not trust: refused by the client.
        assert!(
            call(
                addr,
                client_tls(&other.ca.certificate_pem, "localhost", &pki.partners[0].1)
            )
            .await
            .is_err()
        );
    }

    #[test]
    fn a_server_needs_a_name_and_pem_without_a_certificate_is_refused() {
        assert!(generate_dev_pki("330000", &[], &[]).is_err());
        assert!(pem_fingerprint("not a certificate").is_err());
    }
}
