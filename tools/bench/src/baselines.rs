//! Baselines: what this machine and this stack do with no service logic at all.
//!
//! A service's numbers mean little alone. Next to a bare tonic echo, a Redis GET and MGET,
//! and an SM2 signature and verification on the same machine, they show how much of the
//! cost is the service's own and how far it is from the ceiling.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use healthcode_crypto::SigningKey;
use healthcode_proto::bench::v1::echo_service_client::EchoServiceClient;
use healthcode_proto::bench::v1::echo_service_server::{EchoService, EchoServiceServer};
use healthcode_proto::bench::v1::{EchoRequest, EchoResponse};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use crate::load::{self, CallResult, Stats};

/// Echoed payload size: about a small health-code request.
pub const ECHO_PAYLOAD_BYTES: usize = 64;

/// Keys written for the Redis baselines: enough not to read one hot key over and over.
pub const REDIS_KEYS: usize = 10_000;

/// Value size of each key: about a cached health-code state.
pub const REDIS_VALUE_BYTES: usize = 64;

/// Signed and verified message size: about a health-code payload (person, colour, expiry).
pub const SM2_MESSAGE_BYTES: usize = 100;

/// Keys are written and deleted this many per command: one round trip each, none huge.
const REDIS_WRITE_CHUNK: usize = 1_000;

/// Longest wait for one Redis reply. Generous, so that a queue behind a large MGET shows as
/// latency rather than as errors.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys outlive the run by this much at most if the run dies before deleting them.
const REDIS_KEY_TTL_MARGIN: Duration = Duration::from_secs(600);

/// How long the echo server may take to close its connections when stopped.
const ECHO_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Answers with the request's payload: the least a gRPC handler can do.
#[derive(Debug, Clone, Copy, Default)]
struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let EchoRequest { payload } = request.into_inner();
        Ok(Response::new(EchoResponse { payload }))
    }
}

/// Stops a server started by [`start_echo_server`].
#[derive(Debug)]
pub struct EchoServerHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl EchoServerHandle {
    /// Stops accepting, lets open connections close, and reports how the server ended.
    /// Connections still open after a few seconds are cut.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // Fails only if the server already stopped; the join below says why.
        let _ = self.stop.send(());
        let abort = self.task.abort_handle();
        match tokio::time::timeout(ECHO_SHUTDOWN_GRACE, self.task).await {
            Ok(joined) => joined
                .context("echo server task failed")?
                .context("echo server failed"),
            Err(_) => {
                abort.abort();
                Ok(())
            }
        }
    }
}

/// Serves `EchoService` on 127.0.0.1 on a free port, on a bare tonic server: no admission
/// control, tracing or timeouts, so that it measures the transport alone.
pub async fn start_echo_server() -> anyhow::Result<(SocketAddr, EchoServerHandle)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the echo server")?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            // Small answers: Nagle's algorithm would only add latency.
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder().add_service(EchoServiceServer::new(Echo));
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stopped.await;
    }));
    Ok((addr, EchoServerHandle { stop, task }))
}

/// Closed-loop `Echo` calls with a [`ECHO_PAYLOAD_BYTES`] payload against a fresh
/// [`start_echo_server`], spread round-robin over `connections` HTTP/2 connections (one
/// connection is served by one task on each side, so it caps throughput on many cores).
pub async fn echo(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Stats> {
    let (addr, server) = start_echo_server().await?;
    let clients = match echo_clients(addr, connections.max(1)).await {
        Ok(clients) => Arc::new(clients),
        Err(err) => {
            let _ = server.shutdown().await;
            return Err(err);
        }
    };
    let payload = vec![0x5a_u8; ECHO_PAYLOAD_BYTES];
    let stats = load::closed_loop(concurrency, warmup, duration, move |index| {
        echo_once(pick(clients.as_slice(), index).clone(), payload.clone())
    })
    .await;
    // The closure, and with it every client, is dropped by now: the server can drain.
    server.shutdown().await?;
    Ok(stats)
}

async fn echo_clients(
    addr: SocketAddr,
    connections: usize,
) -> anyhow::Result<Vec<EchoServiceClient<Channel>>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .context("echo server address")?
        .tcp_nodelay(true);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        // Each `connect` opens its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the echo server at {addr}"))?;
        clients.push(EchoServiceClient::new(channel));
    }
    Ok(clients)
}

/// The item for call `index`, round-robin. `items` must not be empty.
fn pick<T>(items: &[T], index: u64) -> &T {
    let slot = index % items.len() as u64;
    &items[slot as usize]
}

async fn echo_once(mut client: EchoServiceClient<Channel>, payload: Vec<u8>) -> CallResult {
    let response = client
        .echo(EchoRequest { payload })
        .await
        .map_err(|status| status.to_string())?;
    if response.get_ref().payload.len() == ECHO_PAYLOAD_BYTES {
        Ok(1)
    } else {
        Err("echo returned a different payload".to_owned())
    }
}

/// Closed-loop GETs of one of [`REDIS_KEYS`] keys each, over one multiplexed connection as
/// the services use. Units are keys read.
pub async fn redis_get(
    url: &str,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let keyspace = Keyspace::fill(url, warmup + duration + REDIS_KEY_TTL_MARGIN).await?;
    let connection = keyspace.connection.clone();
    let keys = keyspace.keys.clone();
    let stats = load::closed_loop(concurrency, warmup, duration, move |index| {
        get_once(connection.clone(), keys.clone(), spread(index))
    })
    .await;
    keyspace.clear().await?;
    Ok(stats)
}

/// Closed-loop MGETs of `batch` consecutive keys each. Units are keys read, so the rate
/// compares directly with [`redis_get`]'s.
pub async fn redis_mget(
    url: &str,
    batch: usize,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let batch = batch.max(1);
    let keyspace = Keyspace::fill(url, warmup + duration + REDIS_KEY_TTL_MARGIN).await?;
    let connection = keyspace.connection.clone();
    let keys = keyspace.keys.clone();
    let stats = load::closed_loop(concurrency, warmup, duration, move |index| {
        mget_once(connection.clone(), keys.clone(), spread(index), batch)
    })
    .await;
    keyspace.clear().await?;
    Ok(stats)
}

/// Call `index`'s key slot: steps through every key in an order unrelated to the call order
/// (7,919 is prime, so coprime with the key count), without a random generator per call.
fn spread(index: u64) -> usize {
    (index.wrapping_mul(7_919) % REDIS_KEYS as u64) as usize
}

async fn get_once(
    mut connection: ConnectionManager,
    keys: Arc<[String]>,
    slot: usize,
) -> CallResult {
    let mut cmd = redis::cmd("GET");
    cmd.arg(keys[slot % keys.len()].as_str());
    let value: Option<Vec<u8>> = cmd
        .query_async(&mut connection)
        .await
        .map_err(|err| err.to_string())?;
    match value {
        Some(_) => Ok(1),
        None => Err("benchmark key missing".to_owned()),
    }
}

async fn mget_once(
    mut connection: ConnectionManager,
    keys: Arc<[String]>,
    first: usize,
    batch: usize,
) -> CallResult {
    let mut cmd = redis::cmd("MGET");
    for offset in 0..batch {
        cmd.arg(keys[(first + offset) % keys.len()].as_str());
    }
    let values: Vec<Option<Vec<u8>>> = cmd
        .query_async(&mut connection)
        .await
        .map_err(|err| err.to_string())?;
    let found = values.iter().filter(|value| value.is_some()).count();
    if found == batch {
        Ok(batch as u64)
    } else {
        Err(format!(
            "{} of {batch} benchmark keys missing",
            batch - found
        ))
    }
}

/// The keys of one run, under a random `hcbench:<hex>:` prefix so that concurrent runs (and
/// test runs) never read or delete each other's keys. They expire by themselves if the run
/// dies before [`Keyspace::clear`].
struct Keyspace {
    connection: ConnectionManager,
    keys: Arc<[String]>,
}

impl Keyspace {
    async fn fill(url: &str, ttl: Duration) -> anyhow::Result<Self> {
        let mut connection = connect_redis(url).await?;
        let prefix = format!("hcbench:{:016x}:", rand::random::<u64>());
        let keys: Arc<[String]> = (0..REDIS_KEYS).map(|i| format!("{prefix}{i}")).collect();
        let value = vec![0xa5_u8; REDIS_VALUE_BYTES];
        let ttl_seconds = ttl.as_secs().max(1);
        for chunk in keys.chunks(REDIS_WRITE_CHUNK) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("SET")
                    .arg(key.as_str())
                    .arg(value.as_slice())
                    .arg("EX")
                    .arg(ttl_seconds)
                    .ignore();
            }
            pipe.query_async::<()>(&mut connection)
                .await
                .context("writing the benchmark keys")?;
        }
        Ok(Keyspace { connection, keys })
    }

    async fn clear(mut self) -> anyhow::Result<()> {
        for chunk in self.keys.chunks(REDIS_WRITE_CHUNK) {
            let mut cmd = redis::cmd("DEL");
            for key in chunk {
                cmd.arg(key.as_str());
            }
            cmd.query_async::<()>(&mut self.connection)
                .await
                .context("deleting the benchmark keys")?;
        }
        Ok(())
    }
}

/// A connection manager that has answered a PING, so that a wrong URL fails here, clearly,
/// rather than as every call of the run failing.
async fn connect_redis(url: &str) -> anyhow::Result<ConnectionManager> {
    // The URL may hold a password: it stays out of the messages.
    let client = redis::Client::open(url).context("invalid Redis URL")?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
    let mut connection =
        ConnectionManager::new_lazy_with_config(client, config).context("Redis client")?;
    redis::cmd("PING")
        .query_async::<()>(&mut connection)
        .await
        .context("Redis does not answer PING")?;
    Ok(connection)
}

/// [`echo`] over `connections`, its row added to `rows`: the baseline every service scenario
/// starts with.
pub async fn echo_row(
    rows: &mut Vec<crate::report::Row>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Stats> {
    let stats = echo(concurrency, warmup, duration, connections).await?;
    rows.push(crate::report::Row::closed(
        format!("baseline: gRPC echo, {connections} conn."),
        "calls",
        concurrency,
        stats.clone(),
    ));
    Ok(stats)
}

/// SM2 verifications per second of one signature over a [`SM2_MESSAGE_BYTES`] message, on
/// `threads` OS threads: the ceiling for anything that checks signed health codes.
pub fn sm2_verify_rate(
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let key = SigningKey::generate("hc-bench").context("generating an SM2 key")?;
    let message = [0x42_u8; SM2_MESSAGE_BYTES];
    let signature = key
        .sign(&message)
        .context("signing the benchmark message")?;
    let verifying_key = key.verifying_key();
    Ok(load::threaded_loop(threads, warmup, duration, |_| {
        verifying_key
            .verify(&message, &signature)
            .map(|()| 1)
            .map_err(|err| err.to_string())
    }))
}

/// SM2 signatures per second over a [`SM2_MESSAGE_BYTES`] message on `threads` OS threads:
/// the ceiling for issuing health codes.
pub fn sm2_sign_rate(
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let key = SigningKey::generate("hc-bench").context("generating an SM2 key")?;
    let message = [0x42_u8; SM2_MESSAGE_BYTES];
    Ok(load::threaded_loop(threads, warmup, duration, |_| {
        key.sign(&message)
            .map(|_signature| 1)
            .map_err(|err| err.to_string())
    }))
}

/// A fixed P-256 key (the secret scalar 7): the baselines need a key, not a secret one.
fn p256_key() -> anyhow::Result<p256::ecdsa::SigningKey> {
    let mut scalar = [0_u8; 32];
    scalar[31] = 7;
    Ok(p256::ecdsa::SigningKey::from(
        p256::SecretKey::from_slice(&scalar).context("a P-256 scalar")?,
    ))
}

/// ECDSA P-256 (ES256) signatures per second over a [`SM2_MESSAGE_BYTES`] message on
/// `threads` OS threads: the ceiling for issuing EU DCC certificates.
pub fn p256_sign_rate(
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    use p256::ecdsa::signature::Signer as _;
    let key = p256_key()?;
    let message = [0x42_u8; SM2_MESSAGE_BYTES];
    Ok(load::threaded_loop(threads, warmup, duration, |_| {
        let signed: Result<p256::ecdsa::Signature, _> = key.try_sign(&message);
        signed.map(|_| 1).map_err(|err| err.to_string())
    }))
}

/// ECDSA P-256 verifications per second on `threads` OS threads: the ceiling for checking
/// EU DCC certificates.
pub fn p256_verify_rate(
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Stats> {
    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    let key = p256_key()?;
    let message = [0x42_u8; SM2_MESSAGE_BYTES];
    let signature: p256::ecdsa::Signature = key.try_sign(&message).context("signing")?;
    let verifying = *key.verifying_key();
    Ok(load::threaded_loop(threads, warmup, duration, |_| {
        verifying
            .verify(&message, &signature)
            .map(|()| 1)
            .map_err(|err| err.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(300);

    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    #[tokio::test]
    async fn echo_answers_over_several_connections() {
        let stats = echo(4, Duration::ZERO, SHORT, 2).await.expect("echo run");
        assert!(stats.requests > 0, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
        assert_eq!(stats.units, stats.requests);
    }

    #[tokio::test]
    async fn redis_get_and_mget_read_every_key_they_ask_for() {
        let url = redis_url();
        let get = redis_get(&url, 4, Duration::ZERO, SHORT)
            .await
            .expect("GET run");
        assert!(get.requests > 0, "{get:?}");
        assert_eq!(get.errors, 0, "{get:?}");

        let mget = redis_mget(&url, 100, 2, Duration::ZERO, SHORT)
            .await
            .expect("MGET run");
        assert!(mget.requests > 0, "{mget:?}");
        assert_eq!(mget.errors, 0, "{mget:?}");
        assert_eq!(mget.units, 100 * mget.requests);
    }

    #[tokio::test]
    async fn keyspace_is_deleted_after_the_run() {
        let keyspace = Keyspace::fill(&redis_url(), Duration::from_secs(60))
            .await
            .expect("fill");
        let mut connection = keyspace.connection.clone();
        let keys = keyspace.keys.clone();
        assert!(keys.iter().all(|key| key.starts_with("hcbench:")));
        let mut exists = redis::cmd("EXISTS");
        exists
            .arg(keys[0].as_str())
            .arg(keys[REDIS_KEYS - 1].as_str());
        let before: u64 = exists.query_async(&mut connection).await.expect("EXISTS");
        assert_eq!(before, 2);
        keyspace.clear().await.expect("clear");
        let after: u64 = exists.query_async(&mut connection).await.expect("EXISTS");
        assert_eq!(after, 0);
    }

    #[test]
    fn sm2_and_p256_sign_and_verify_run_without_errors() {
        type Rate = fn(usize, Duration, Duration) -> anyhow::Result<Stats>;
        let rates: [(&str, Rate); 4] = [
            ("SM2 verify", sm2_verify_rate),
            ("SM2 sign", sm2_sign_rate),
            ("P-256 verify", p256_verify_rate),
            ("P-256 sign", p256_sign_rate),
        ];
        for (name, rate) in rates {
            let stats = rate(1, Duration::ZERO, Duration::from_millis(200)).expect(name);
            assert!(stats.requests > 0, "{name}: {stats:?}");
            assert_eq!(stats.errors, 0, "{name}: {stats:?}");
        }
    }

    #[test]
    fn spread_visits_every_key() {
        let mut seen = vec![false; REDIS_KEYS];
        for index in 0..REDIS_KEYS as u64 {
            seen[spread(index)] = true;
        }
        assert!(seen.iter().all(|hit| *hit));
    }
}
