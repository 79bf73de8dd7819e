//! `healthcode up` as a user runs it: a process on the embedded default that prints its
//! addresses and a token, answers a standard client, and exits cleanly on SIGTERM.

use healthcode_proto::common::v1::GetPublicKeysRequest;
use healthcode_proto::identity::v1::{
    GetVerificationStatusRequest, IdentityDocument, RegisterPersonRequest,
    identity_service_client::IdentityServiceClient,
};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn up_serves_on_the_embedded_default_and_stops_on_sigterm() {
    let data_dir = std::env::temp_dir().join(format!("hc-up-{}", uuid::Uuid::new_v4().simple()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_healthcode"))
        .args([
            "up",
            "--identity-port",
            "0",
            "--risk-port",
            "0",
            "--gateway-port",
            "0",
            "--data-dir",
        ])
        .arg(&data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn healthcode up");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut addr = None;
    let mut gateway_addr = None;
    let mut token = None;
    let mut previous = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (addr.is_none() || token.is_none()) && Instant::now() < deadline {
        let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if let Some(rest) = line.trim().strip_prefix("identity") {
            addr = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("gateway") {
            gateway_addr = Some(rest.trim().to_owned());
        }
        if previous.starts_with("development caller token") {
            token = Some(line.trim().to_owned());
        }
        previous = line;
    }
    let (addr, token) = (
        addr.expect("address printed"),
        token.expect("token printed"),
    );

    let mut gateway =
        healthcode_proto::gateway::v1::gateway_service_client::GatewayServiceClient::connect(
            format!("http://{}", gateway_addr.expect("gateway address printed")),
        )
        .await
        .expect("connect the gateway");
    let gateway_keys = gateway
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .expect("gateway answers")
        .into_inner()
        .keys;
    assert_eq!(gateway_keys[0].algorithm, "SM2");

    let mut client = IdentityServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let keys = client
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys[0].algorithm, "SM2");

    let mut request = tonic::Request::new(RegisterPersonRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        document: Some(IdentityDocument {
            r#type: 1,
            number: "11010519491231002X".into(),
            issuing_country: String::new(),
        }),
        name: "张三丰".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let person = client
        .register_person(request)
        .await
        .expect("register with the printed token")
        .into_inner()
        .person
        .unwrap();
    let mut status = tonic::Request::new(GetVerificationStatusRequest {
        person: Some(person),
    });
    status
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(
        client
            .get_verification_status(status)
            .await
            .unwrap()
            .into_inner()
            .level,
        1
    );

    // SIGTERM: the process drains and exits 0.
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "healthcode up did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(data_dir.join("identity.db").exists());
    assert!(data_dir.join("dev-secrets.env").exists());
    let _ = std::fs::remove_dir_all(&data_dir);
}
