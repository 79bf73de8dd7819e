//! Two provinces, each a whole mesh with its own databases and Redis key space, linked
//! through their exchange services over mutual TLS: each province's CA issues the client
//! certificate the other presents, and each registers the other's certificate and record
//! signing key.

use crate::Backend;
use crate::authorized;
use crate::mesh::Mesh;
use exchange::service::Exchange;
use exchange::tls::{DevPki, Issued, client_tls, generate_dev_pki};
use healthcode_auth::roles;
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{
    CodeColor, ColorReason, GetPublicKeysRequest, PersonRef, PublicKey, ReasonCode,
};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::risk::v1::PersonColor;
use pb::exchange_service_client::ExchangeServiceClient;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

pub struct Province {
    pub code: String,
    pub mesh: Mesh,
    /// This province's CA, server certificate, and the client certificates it issued.
    pub pki: DevPki,
    dir: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("tls dir");
    std::fs::write(dir.join(name), text).expect("tls file");
}

impl Province {
    /// The client certificate this province issued to `partner`.
    pub fn issued_to(&self, partner: &str) -> &Issued {
        &self
            .pki
            .partners
            .iter()
            .find(|(id, _)| id == partner)
            .expect("a certificate for that partner")
            .1
    }

    /// A client of this province's partner listener presenting `client`.
    pub async fn partner_client(&self, client: &Issued) -> ExchangeServiceClient<Channel> {
        let addr = self.mesh.exchange.partner_addr().expect("partner listener");
        let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .expect("endpoint")
            .tls_config(client_tls(
                &self.pki.ca.certificate_pem,
                "localhost",
                client,
            ))
            .expect("tls")
            .connect()
            .await
            .expect("partner listener reachable");
        ExchangeServiceClient::new(channel)
    }

    pub fn admin(&self) -> String {
        self.mesh
            .keys
            .token("exchange-ops", &[roles::EXCHANGE_ADMIN])
    }

    pub fn internal(&self) -> String {
        self.mesh.keys.token("gateway", &[roles::INTERNAL])
    }

    pub async fn public_key(&self) -> healthcode_proto::common::v1::PublicKey {
        self.mesh
            .exchange_client()
            .await
            .get_public_keys(GetPublicKeysRequest::default())
            .await
            .expect("public keys")
            .into_inner()
            .keys
            .remove(0)
    }

    /// Registers `other` as a real-time partner of this province.
    pub async fn register(&self, other: &Province) -> pb::Partner {
        let addr = other
            .mesh
            .exchange
            .partner_addr()
            .expect("partner listener");
        self.mesh
            .exchange_client()
            .await
            .register_partner(authorized(
                pb::RegisterPartnerRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    partner: Some(pb::Partner {
                        partner_id: other.code.clone(),
                        kind: pb::PartnerKind::Province as i32,
                        name: format!("province {}", other.code),
                        sync_mode: pb::SyncMode::RealTime as i32,
                        keys: vec![pb::PartnerKey {
                            key: Some(other.public_key().await),
                            ..Default::default()
                        }],
                        tls_client_certificate_pem: self
                            .issued_to(&other.code)
                            .certificate_pem
                            .clone(),
                        endpoint: format!("https://localhost:{}", addr.port()),
                        ..Default::default()
                    }),
                },
                &self.admin(),
            ))
            .await
            .expect("register partner")
            .into_inner()
    }

    /// Where this province stands with `partner`.
    pub async fn status(&self, partner: &str) -> pb::SyncStatus {
        self.mesh
            .exchange_client()
            .await
            .list_sync_status(authorized(
                pb::ListSyncStatusRequest {
                    partner_ids: vec![partner.to_owned()],
                },
                &self.internal(),
            ))
            .await
            .expect("sync status")
            .into_inner()
            .statuses
            .remove(0)
    }

    pub async fn merged(&self, person_id: &str) -> pb::MergedColor {
        self.mesh
            .exchange_client()
            .await
            .get_merged_color(authorized(
                pb::GetMergedColorRequest {
                    subject: Some(pb::get_merged_color_request::Subject::Person(
                        healthcode_proto::common::v1::PersonRef {
                            person_id: person_id.to_owned(),
                        },
                    )),
                },
                &self.internal(),
            ))
            .await
            .expect("merged color")
            .into_inner()
    }

    /// The color this province's gateway shows the person.
    pub async fn shows(&self, person_id: &str) -> i32 {
        self.mesh
            .gateway_client()
            .await
            .show_my_code(authorized(
                healthcode_proto::gateway::v1::ShowMyCodeRequest {
                    person: Some(healthcode_proto::common::v1::PersonRef {
                        person_id: person_id.to_owned(),
                    }),
                    ..Default::default()
                },
                &self.mesh.keys.app(),
            ))
            .await
            .expect("show my code")
            .into_inner()
            .color
    }

    pub async fn stop(self) {
        self.mesh.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A third province whose client certificate each CA of a linked pair issues as well.
pub const THIRD: &str = "320000";

/// A rail partner whose client certificate each CA of a linked pair issues as well.
pub const TRANSPORT: &str = "rail-12306";

/// Starts provinces `a` and `b` (GB/T 2260 codes) on PostgreSQL and Redis, sharing the
/// national pseudonym key, and registers each as the other's real-time partner.
pub async fn linked_pair(a: &str, b: &str) -> (Province, Province) {
    let pseudonym_key = healthcode_crypto::PseudonymKey::generate_hex().expect("key");
    let names = vec!["localhost".to_owned()];
    // Each CA also issues a certificate to a third province (a partner that publishes what
    // it must not) and to a rail operator.
    let others = |o: &str| [o.to_owned(), THIRD.to_owned(), TRANSPORT.to_owned()];
    let pki_a = generate_dev_pki(a, &names, &others(b)).expect("pki");
    let pki_b = generate_dev_pki(b, &names, &others(a)).expect("pki");
    let root = std::env::temp_dir().join(format!("hc-exchange-{}", uuid::Uuid::new_v4().simple()));
    let start = |code: &str, own: &DevPki, other_code: &str, other: &DevPki| {
        let dir = root.join(code);
        let listener = dir.join("listener");
        write(&listener, "ca.pem", &own.ca.certificate_pem);
        write(&listener, "server.pem", &own.server.certificate_pem);
        write(&listener, "server-key.pem", &own.server.key_pem);
        let outbound = dir.join("outbound").join(other_code);
        let mine = &other
            .partners
            .iter()
            .find(|(id, _)| id == code)
            .expect("issued to me")
            .1;
        write(&outbound, "ca.pem", &other.ca.certificate_pem);
        write(&outbound, "client.pem", &mine.certificate_pem);
        write(&outbound, "client-key.pem", &mine.key_pem);
        (dir, listener, dir_outbound(&outbound))
    };
    let (dir_a, listener_a, outbound_a) = start(a, &pki_a, b, &pki_b);
    let (dir_b, listener_b, outbound_b) = start(b, &pki_b, a, &pki_a);
    // Each province stands in for the national platform in the other's double
    // confirmation.
    let mesh = |code: String, listener: PathBuf, outbound: PathBuf, other: String| {
        let key = pseudonym_key.clone();
        async move {
            let listener = listener.display().to_string();
            let outbound = outbound.display().to_string();
            Mesh::start_with(
                Backend::Real,
                None,
                &[
                    ("PROVINCE_CODE", code.as_str()),
                    ("PARTNER_TLS_DIR", listener.as_str()),
                    ("PARTNER_LISTEN_ADDR", "127.0.0.1:0"),
                    ("OUTBOUND_TLS_DIR", outbound.as_str()),
                    ("EXCHANGE_PSEUDONYM_KEY", key.as_str()),
                    ("NATIONAL_CHECK_PARTNERS", other.as_str()),
                ],
            )
            .await
        }
    };
    let pa = Province {
        code: a.to_owned(),
        mesh: mesh(a.to_owned(), listener_a, outbound_a, b.to_owned()).await,
        pki: pki_a,
        dir: dir_a,
    };
    let pb_ = Province {
        code: b.to_owned(),
        mesh: mesh(b.to_owned(), listener_b, outbound_b, a.to_owned()).await,
        pki: pki_b,
        dir: dir_b,
    };
    pa.register(&pb_).await;
    pb_.register(&pa).await;
    (pa, pb_)
}

/// The OUTBOUND_TLS_DIR holding one partner's directory.
fn dir_outbound(partner_dir: &Path) -> PathBuf {
    partner_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The public half of `key`, as a partner registration carries it.
pub fn public_key_of(key: &SigningKey) -> PublicKey {
    PublicKey {
        key_id: key.key_id().into(),
        algorithm: "SM2".into(),
        public_key_sec1: key.verifying_key().sec1_bytes(),
        ..Default::default()
    }
}

/// Registers province `partner_id` with `mesh`'s exchange, in `mode`, presenting
/// `certificate_pem` and signing with `key`. A real-time one is given an endpoint where
/// nothing listens: this mesh serves it but cannot follow it.
pub async fn register_province(
    mesh: &Mesh,
    partner_id: &str,
    mode: pb::SyncMode,
    certificate_pem: &str,
    key: &SigningKey,
) -> Result<pb::Partner, tonic::Status> {
    mesh.exchange_client()
        .await
        .register_partner(authorized(
            pb::RegisterPartnerRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                partner: Some(pb::Partner {
                    partner_id: partner_id.to_owned(),
                    kind: pb::PartnerKind::Province as i32,
                    name: format!("province {partner_id}"),
                    sync_mode: mode as i32,
                    keys: vec![pb::PartnerKey {
                        key: Some(public_key_of(key)),
                        ..Default::default()
                    }],
                    tls_client_certificate_pem: certificate_pem.to_owned(),
                    endpoint: if mode == pb::SyncMode::RealTime {
                        "https://localhost:9".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                }),
            },
            &mesh.keys.token("exchange-ops", &[roles::EXCHANGE_ADMIN]),
        ))
        .await
        .map(|r| r.into_inner())
}

/// Has `exchange` issue `n` records about `person_id` directly (as if risk's color stream
/// brought them): the color alternates between `colors`, each a newer version, so each
/// issues one.
pub async fn issue_alternating(
    exchange: &Exchange,
    person_id: &str,
    n: u64,
    colors: [CodeColor; 2],
) -> Result<(), String> {
    for v in 0..n {
        let color = colors[(v % 2) as usize];
        exchange
            .issue(&[PersonColor {
                person: Some(PersonRef {
                    person_id: person_id.to_owned(),
                }),
                color: color as i32,
                reasons: vec![ColorReason {
                    code: ReasonCode::CloseContact as i32,
                    color: color as i32,
                    ..Default::default()
                }],
                version: 1_000_000 + v,
                policy_version: 1,
                ..Default::default()
            }])
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A whole mesh (province 330000) whose identity holds a fresh national pseudonym key
/// (`national-1`), returned as hex.
pub async fn mesh_with_pseudonym_key(backend: Backend) -> (Mesh, String) {
    let key = healthcode_crypto::PseudonymKey::generate_hex().expect("key");
    let mesh = Mesh::start_with(backend, None, &[("EXCHANGE_PSEUDONYM_KEY", key.as_str())]).await;
    (mesh, key)
}
