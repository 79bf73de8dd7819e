//! The whole mesh for a test or a benchmark: identity, risk, the gateway, testing,
//! vaccination and the exchange, started for real on port 0 over one backend, with helpers
//! to make verified persons.

use crate::{Backend, TestKeys, authorized, fresh_postgres_database, fresh_sqlite_url};
use healthcode_auth::roles;
use healthcode_config::Env;
use healthcode_events::Backends;
use healthcode_proto::common::v1::{DocumentType, PersonRef};
use healthcode_proto::exchange::v1::exchange_service_client::ExchangeServiceClient;
use healthcode_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use healthcode_proto::identity::v1 as id;
use healthcode_proto::identity::v1::identity_service_client::IdentityServiceClient;
use healthcode_proto::risk::v1::risk_service_client::RiskServiceClient;
use healthcode_proto::testing::v1::testing_service_client::TestingServiceClient;
use healthcode_proto::vaccination::v1::vaccination_service_client::VaccinationServiceClient;
use identity::providers::{LocalSms, Providers};
use std::sync::Arc;
use testing::notify::LocalNotifier;
use testing::payments::{Providers as PaymentProviders, SandboxProvider};
use tonic::transport::Channel;

pub const PROVINCE: &str = "330000";

pub struct Mesh {
    pub identity: identity::Application,
    pub risk: risk::Application,
    pub gateway: gateway::Application,
    pub testing: testing::Application,
    pub vaccination: vaccination::Application,
    pub exchange: exchange::Application,
    /// The testing service's sandbox payment provider and its notifier, as it sees them.
    pub sandbox: Arc<SandboxProvider>,
    pub notifier: Arc<LocalNotifier>,
    pub keys: TestKeys,
    pub sms: Arc<LocalSms>,
    pub backends: Backends,
    /// Cache and stream key prefix of this mesh (its own Redis key space).
    pub prefix: String,
    pub redis_url: Option<String>,
    /// The identity service's settings, for a test that starts another replica of it.
    pub identity_env: Env,
    databases: Vec<String>,
}

async fn database(backend: Backend) -> String {
    match backend {
        Backend::Real => fresh_postgres_database().await,
        Backend::Embedded => fresh_sqlite_url(),
    }
}

/// A resident identity card number with a valid GB 11643 check digit, distinct per `n`.
pub fn resident_id(n: u32) -> String {
    let day = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .unwrap_or_default()
        .checked_add_days(chrono::Days::new(u64::from(n / 900)))
        .unwrap_or_default();
    let body = format!("110105{}{:03}", day.format("%Y%m%d"), n % 900 + 100);
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let sum: u32 = body
        .bytes()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    format!("{body}{}", CHECK[(sum % 11) as usize] as char)
}

impl Mesh {
    /// Starts the three services; `redis_url` overrides the machine's Redis (a test that
    /// stops its own Redis mid-run).
    pub async fn start(backend: Backend, redis_url: Option<String>) -> Mesh {
        Self::start_with(backend, redis_url, &[]).await
    }

    pub async fn start_with(
        backend: Backend,
        redis_url: Option<String>,
        extra: &[(&str, &str)],
    ) -> Mesh {
        let keys = TestKeys::new();
        let prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        let redis_url = match backend {
            Backend::Real => Some(redis_url.unwrap_or_else(crate::redis_url)),
            Backend::Embedded => None,
        };
        let base = |db: String| {
            let mut env = Env::from_pairs(Vec::<(String, String)>::new())
                .with("LISTEN_ADDR", "127.0.0.1:0")
                .with("AUTH_ISSUER_KEYS", keys.issuer.trusted_spec())
                .with("SHUTDOWN_GRACE_SECONDS", "5")
                .with("SHUTDOWN_DRAIN_DELAY_MS", "0")
                .with("CACHE_PREFIX", prefix.clone())
                .with("PROVINCE_CODE", PROVINCE)
                .with("DATABASE_URL", db);
            if let Some(url) = &redis_url {
                env = env
                    .with("REDIS_URL", url.clone())
                    .with("REDIS_TIMEOUT_MS", "200");
            }
            for (k, v) in extra {
                env = env.with(*k, *v);
            }
            env
        };
        let databases = vec![
            database(backend).await,
            database(backend).await,
            database(backend).await,
            database(backend).await,
            database(backend).await,
            database(backend).await,
        ];
        let mut identity_env = base(databases[0].clone()).with("PROVIDERS", "local");
        for (k, v) in identity::config::generate_dev_secrets().expect("secrets") {
            if extra.iter().all(|(name, _)| *name != k) {
                identity_env = identity_env.with(k, v);
            }
        }
        let settings = healthcode_cache::RedisSettings::from_env(&base(String::new()))
            .expect("redis settings");
        let backends = Backends::connect(settings.as_ref(), &prefix)
            .await
            .expect("backends");
        let (providers, sms) = Providers::local();
        let identity = identity::Application::build(
            identity::config::IdentityConfig::from_env(&identity_env).expect("identity config"),
            backends.clone(),
            providers,
        )
        .await
        .expect("identity starts");
        let mut risk_env = base(databases[1].clone())
            .with("SWEEP_INTERVAL_MS", "500")
            .with("CONSUMER_NAME", "risk-test");
        for (k, v) in risk::config::generate_dev_secrets().expect("secrets") {
            risk_env = risk_env.with(k, v);
        }
        let risk = risk::Application::build(
            risk::config::RiskConfig::from_env(&risk_env).expect("risk config"),
            backends.clone(),
        )
        .await
        .expect("risk starts");
        let mut gateway_env = base(databases[2].clone())
            .with("RISK_URL", format!("http://{}", risk.local_addr()))
            .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
            .with("SERVICE_TOKEN", keys.token("gateway", &[roles::INTERNAL]))
            .with("CONSUMER_NAME", "gateway-test");
        for (k, v) in gateway::config::generate_dev_secrets().expect("secrets") {
            gateway_env = gateway_env.with(k, v);
        }
        let gateway = gateway::Application::build(
            gateway::config::GatewayConfig::from_env(&gateway_env).expect("gateway config"),
            backends.clone(),
        )
        .await
        .expect("gateway starts");
        let mut testing_env = base(databases[3].clone())
            .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
            .with("GATEWAY_URL", format!("http://{}", gateway.local_addr()))
            .with("SERVICE_TOKEN", keys.token("testing", &[roles::INTERNAL]))
            .with("CONSUMER_NAME", "testing-test")
            .with("JOB_INTERVAL_MS", "200");
        for (k, v) in testing::config::generate_dev_secrets().expect("secrets") {
            if extra.iter().all(|(name, _)| *name != k) {
                testing_env = testing_env.with(k, v);
            }
        }
        let mut testing_config =
            testing::config::TestingConfig::from_env(&testing_env).expect("testing config");
        let sandbox = Arc::new(SandboxProvider::new(
            testing_config
                .sandbox_payment_key
                .take()
                .expect("sandbox key"),
        ));
        let notifier = Arc::new(LocalNotifier::default());
        let testing = testing::Application::build(
            testing_config,
            backends.clone(),
            testing::Externals {
                providers: PaymentProviders::default().with(sandbox.clone()),
                notifier: notifier.clone(),
            },
        )
        .await
        .expect("testing starts");
        let mut vaccination_env = base(databases[4].clone())
            .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
            .with(
                "SERVICE_TOKEN",
                keys.token("vaccination", &[roles::INTERNAL, roles::FULL_VIEW]),
            );
        for (k, v) in
            vaccination::config::generate_dev_secrets(chrono::Utc::now()).expect("secrets")
        {
            if extra.iter().all(|(name, _)| *name != k) {
                vaccination_env = vaccination_env.with(k, v);
            }
        }
        let vaccination = vaccination::Application::build(
            vaccination::config::VaccinationConfig::from_env(&vaccination_env)
                .expect("vaccination config"),
            backends.clone(),
        )
        .await
        .expect("vaccination starts");
        let mut exchange_env = base(databases[5].clone())
            .with("IDENTITY_URL", format!("http://{}", identity.local_addr()))
            .with("RISK_URL", format!("http://{}", risk.local_addr()))
            .with(
                "SERVICE_TOKEN",
                keys.token("exchange", &[roles::INTERNAL, roles::EXCHANGE]),
            )
            .with("CONSUMER_NAME", "exchange-test")
            .with("HEARTBEAT_MS", "500");
        for (k, v) in exchange::config::generate_dev_secrets().expect("secrets") {
            if extra.iter().all(|(name, _)| *name != k) {
                exchange_env = exchange_env.with(k, v);
            }
        }
        let exchange = exchange::Application::build(
            exchange::config::ExchangeConfig::from_env(&exchange_env).expect("exchange config"),
            backends.clone(),
        )
        .await
        .expect("exchange starts");
        Mesh {
            exchange,
            identity,
            risk,
            gateway,
            testing,
            vaccination,
            sandbox,
            notifier,
            keys,
            sms,
            backends,
            prefix,
            redis_url,
            identity_env,
            databases,
        }
    }

    pub async fn stop(self) {
        self.exchange.shutdown().await;
        self.vaccination.shutdown().await;
        self.testing.shutdown().await;
        self.gateway.shutdown().await;
        self.risk.shutdown().await;
        self.identity.shutdown().await;
        for db in &self.databases {
            crate::drop_test_database(db).await;
        }
    }

    pub async fn exchange_client(&self) -> ExchangeServiceClient<Channel> {
        ExchangeServiceClient::connect(format!("http://{}", self.exchange.local_addr()))
            .await
            .expect("exchange reachable")
    }

    pub async fn gateway_client(&self) -> GatewayServiceClient<Channel> {
        GatewayServiceClient::connect(format!("http://{}", self.gateway.local_addr()))
            .await
            .expect("connect gateway")
    }

    pub async fn risk_client(&self) -> RiskServiceClient<Channel> {
        RiskServiceClient::connect(format!("http://{}", self.risk.local_addr()))
            .await
            .expect("connect risk")
    }

    pub async fn testing_client(&self) -> TestingServiceClient<Channel> {
        TestingServiceClient::connect(format!("http://{}", self.testing.local_addr()))
            .await
            .expect("connect testing")
    }

    pub async fn vaccination_client(&self) -> VaccinationServiceClient<Channel> {
        VaccinationServiceClient::connect(format!("http://{}", self.vaccination.local_addr()))
            .await
            .expect("connect vaccination")
    }

    pub async fn identity_client(&self) -> IdentityServiceClient<Channel> {
        IdentityServiceClient::connect(format!("http://{}", self.identity.local_addr()))
            .await
            .expect("connect identity")
    }

    /// Registers person `n` and walks the identity, phone and face steps: a verified person.
    pub async fn verified_person(&self, n: u32) -> String {
        self.verified_person_named(n, "").await
    }

    /// A verified person with a name in Latin letters (empty for none).
    pub async fn verified_person_named(&self, n: u32, english_name: &str) -> String {
        let mut client = self.identity_client().await;
        let token = self.keys.app();
        let person_id = client
            .register_person(authorized(
                id::RegisterPersonRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    document: Some(id::IdentityDocument {
                        r#type: DocumentType::ResidentIdCard as i32,
                        number: resident_id(n),
                        issuing_country: String::new(),
                    }),
                    name: "王小二".into(),
                    english_name: english_name.into(),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .expect("register")
            .into_inner()
            .person
            .expect("person")
            .person_id;
        let person = Some(PersonRef {
            person_id: person_id.clone(),
        });
        let phone = format!("139{:07}1", n % 10_000_000);
        client
            .send_phone_code(authorized(
                id::SendPhoneCodeRequest {
                    person: person.clone(),
                    phone_number: phone.clone(),
                },
                &token,
            ))
            .await
            .expect("send code");
        let code = self.sms.last_code(&phone).expect("code sent");
        client
            .confirm_phone_code(authorized(
                id::ConfirmPhoneCodeRequest {
                    person: person.clone(),
                    code,
                },
                &token,
            ))
            .await
            .expect("confirm");
        let mut image = b"\x89PNG\r\n\x1a\n".to_vec();
        image.extend_from_slice(b"score=092");
        let status = client
            .submit_face_match(authorized(
                id::SubmitFaceMatchRequest {
                    person,
                    live_image: image,
                },
                &token,
            ))
            .await
            .expect("face")
            .into_inner();
        assert!(status.verified, "person {n} verified");
        person_id
    }
}
