//! A vaccination world for tests and benchmarks: a vaccine with one batch, a site, a worker
//! key registered at it, and the calls that record doses with that worker's signature.

use crate::authorized;
use crate::mesh::Mesh;
use chrono::Utc;
use healthcode_auth::roles;
use healthcode_crypto::SigningKey;
use healthcode_proto::common::v1::{GeoPoint, Locale, PersonRef, PublicKey, SignedEnvelope};
use healthcode_proto::time::{minute, ts};
use healthcode_proto::vaccination::v1 as pb;
use pb::vaccination_service_client::VaccinationServiceClient;
use prost::Message;
use tonic::transport::Channel;

pub const SITE_AT: GeoPoint = GeoPoint {
    latitude: 30.2741,
    longitude: 120.1551,
};

pub struct World {
    pub client: VaccinationServiceClient<Channel>,
    pub admin: String,
    pub app: String,
    pub site: String,
    pub site_token: String,
    pub worker: std::sync::Arc<SigningKey>,
    pub vaccine: pb::Vaccine,
}

pub fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn person(id: &str) -> Option<PersonRef> {
    Some(PersonRef {
        person_id: id.to_owned(),
    })
}

pub fn days(n: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: n * 86_400,
        nanos: 0,
    })
}

/// A vaccine of `kind` with one batch, a site, and a worker key registered at it.
pub async fn world(mesh: &Mesh, kind: pb::VaccineType) -> World {
    let mut client = mesh.vaccination_client().await;
    let admin = mesh.keys.token("health-commission", &[roles::HEALTH_ADMIN]);
    let vaccine = client
        .register_vaccine(authorized(
            pb::RegisterVaccineRequest {
                request_id: rid(),
                vaccine: Some(pb::Vaccine {
                    r#type: kind as i32,
                    name_zh: "新冠病毒灭活疫苗".into(),
                    name_en: "COVID-19 Vaccine (Vero Cell), Inactivated".into(),
                    maker_zh: "示例生物".into(),
                    maker_en: "Example Biological Products".into(),
                    approval_number: format!("S{}", &rid()[..8]),
                    doses_in_course: 2,
                    min_dose_interval: days(21),
                    booster_interval: days(180),
                    eu_medicinal_product: "BBIBP-CorV".into(),
                    eu_marketing_authorisation_holder: "ORG-100020693".into(),
                    eu_vaccine_prophylaxis: "J07BX03".into(),
                    active: true,
                    batches: vec![pb::VaccineBatch {
                        batch_number: "B2026001".into(),
                        expires_at: Some(ts(Utc::now() + chrono::Duration::days(365))),
                    }],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("register vaccine")
        .into_inner();
    let site = client
        .register_site(authorized(
            pb::RegisterSiteRequest {
                request_id: rid(),
                site: Some(pb::VaccinationSite {
                    name: "西湖区社区卫生服务中心".into(),
                    unit_code: "12330106MB0000001X".into(),
                    address: "杭州市西湖区".into(),
                    location: Some(SITE_AT),
                    division_code: "330106".into(),
                    public_phone: "0571-88888888".into(),
                    active: true,
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("register site")
        .into_inner()
        .site_id;
    let site_token = mesh.keys.token(&site, &[roles::VACCINATION_SITE]);
    let worker = SigningKey::generate(format!("worker-{}", &rid()[..8])).unwrap();
    client
        .add_worker_key(authorized(
            pb::AddWorkerKeyRequest {
                request_id: rid(),
                site_id: site.clone(),
                worker_id: "nurse-7".into(),
                key: Some(PublicKey {
                    key_id: worker.key_id().to_owned(),
                    algorithm: "SM2".into(),
                    public_key_sec1: worker.verifying_key().sec1_bytes(),
                    ..Default::default()
                }),
            },
            &site_token,
        ))
        .await
        .expect("add worker key");
    World {
        client,
        admin,
        app: mesh.keys.app(),
        site,
        site_token,
        worker: std::sync::Arc::new(worker),
        vaccine,
    }
}

impl World {
    pub fn signed(
        &self,
        key: &SigningKey,
        person_id: &str,
        n: u32,
        at: chrono::DateTime<Utc>,
        batch: &str,
    ) -> SignedEnvelope {
        let claims = pb::DoseClaims {
            person: person(person_id),
            vaccine_id: self.vaccine.vaccine_id.clone(),
            batch_number: batch.into(),
            dose_number: n,
            administered_at: Some(ts(minute(at))),
            site_id: self.site.clone(),
            worker_id: "nurse-7".into(),
        };
        let payload = claims.encode_to_vec();
        SignedEnvelope {
            signature: key.sign(&payload).unwrap(),
            key_id: key.key_id().to_owned(),
            payload,
        }
    }

    pub async fn record(
        &mut self,
        request_id: &str,
        envelope: SignedEnvelope,
    ) -> Result<pb::Dose, tonic::Status> {
        self.client
            .record_dose(authorized(
                pb::RecordDoseRequest {
                    request_id: request_id.to_owned(),
                    worker_signature: Some(envelope),
                },
                &self.site_token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn report(&mut self, person_id: &str, at: GeoPoint) -> Option<pb::BoosterReminder> {
        self.client
            .report_location(authorized(
                pb::ReportLocationRequest {
                    person: person(person_id),
                    location: Some(at),
                    reported_at: None,
                    locale: Some(Locale {
                        tag: "zh-CN".into(),
                    }),
                },
                &self.app,
            ))
            .await
            .expect("report location")
            .into_inner()
            .reminder
    }
}
