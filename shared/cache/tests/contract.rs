//! The same contract, run against the in-process backend and the real Redis on this machine.

use healthcode_cache::{Cache, MemoryCache, RedisCache, RedisSettings, Versioned};
use std::sync::Arc;
use std::time::Duration;

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4())
}

async fn redis_cache() -> RedisCache {
    let settings = RedisSettings {
        urls: vec![redis_url()],
        cluster: false,
        response_timeout: Duration::from_secs(2),
    };
    RedisCache::connect(&settings, &unique_prefix())
        .await
        .expect("redis")
}

async fn contract(cache: Arc<dyn Cache>) {
    assert_eq!(cache.get("absent").await.unwrap(), None);
    cache.set("k", b"v1", None).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    cache.delete("k").await.unwrap();
    assert_eq!(cache.get("k").await.unwrap(), None);

    cache
        .set("short", b"x", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(cache.get("short").await.unwrap(), None);

    assert_eq!(
        cache
            .incr_window("c", Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        cache
            .incr_window("c", Duration::from_secs(60))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        cache
            .incr_window("w", Duration::from_millis(50))
            .await
            .unwrap(),
        1
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        cache
            .incr_window("w", Duration::from_millis(50))
            .await
            .unwrap(),
        1
    );

    assert!(cache.set_if_newer("p", 2, b"two", None).await.unwrap());
    assert!(!cache.set_if_newer("p", 1, b"one", None).await.unwrap());
    assert!(!cache.set_if_newer("p", 2, b"again", None).await.unwrap());
    assert_eq!(
        cache.get_versioned("p").await.unwrap(),
        Some(Versioned {
            version: 2,
            data: b"two".to_vec()
        })
    );
    assert!(cache.set_if_newer("p", 3, b"three", None).await.unwrap());
    let many = cache
        .get_versioned_many(&["p".into(), "nobody".into()])
        .await
        .unwrap();
    assert_eq!(
        many,
        vec![
            Some(Versioned {
                version: 3,
                data: b"three".to_vec()
            }),
            None
        ]
    );
    assert!(
        cache.get_versioned("c").await.is_err(),
        "a counter is not versioned"
    );
}

/// Racing writers with random versions: the highest version always ends up stored.
async fn newest_wins_under_concurrency(cache: Arc<dyn Cache>) {
    let mut tasks = Vec::new();
    for version in (1..=200u64).rev() {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .set_if_newer("race", version, version.to_string().as_bytes(), None)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = cache.get_versioned("race").await.unwrap().unwrap();
    assert_eq!(stored.version, 200);
    assert_eq!(stored.data, b"200");
}

/// Both backends find the same members at the same distances: 499 m is in a 500 m radius,
/// 501 m is not, nearest first, and a removed member is gone.
async fn geo(cache: Arc<dyn Cache>) {
    use healthcode_cache::{GeoMember, GeoPoint};
    use healthcode_proto::geo::north_of;
    let centre = GeoPoint {
        latitude: 30.2741,
        longitude: 120.1551,
    };
    assert!(
        cache
            .geo_search("sites", centre, 500.0, 5)
            .await
            .unwrap()
            .is_empty()
    );
    let members = [("near", 499.0), ("far", 501.0), ("nearer", 120.0)].map(|(m, d)| GeoMember {
        member: m.to_owned(),
        at: north_of(&centre, d),
    });
    cache.geo_add("sites", &members).await.unwrap();
    let found = cache.geo_search("sites", centre, 500.0, 5).await.unwrap();
    let names: Vec<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["nearer", "near"]);
    assert!((found[1].1 - 499.0).abs() < 0.5, "{found:?}");
    assert_eq!(
        cache
            .geo_search("sites", centre, 500.0, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    cache
        .geo_remove("sites", &["nearer".to_owned()])
        .await
        .unwrap();
    let found = cache.geo_search("sites", centre, 600.0, 5).await.unwrap();
    let names: Vec<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["near", "far"]);
}

#[tokio::test]
async fn memory_backend_meets_the_contract() {
    let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new(&unique_prefix()));
    contract(cache.clone()).await;
    newest_wins_under_concurrency(cache.clone()).await;
    geo(cache).await;
}

#[tokio::test]
async fn redis_backend_meets_the_contract() {
    let cache: Arc<dyn Cache> = Arc::new(redis_cache().await);
    contract(cache.clone()).await;
    newest_wins_under_concurrency(cache.clone()).await;
    geo(cache).await;
}

#[tokio::test]
async fn redis_that_is_not_there_is_an_error_not_a_hang() {
    let settings = RedisSettings {
        // Nothing listens on port 1 of the loopback.
        urls: vec!["redis://127.0.0.1:1/0".into()],
        cluster: false,
        response_timeout: Duration::from_millis(200),
    };
    let cache = RedisCache::connect(&settings, "t:")
        .await
        .expect("lazy connect");
    let started = std::time::Instant::now();
    assert!(cache.get("k").await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A three-node Redis Cluster of this test's own: `redis-server` processes on free ports of
/// the loopback, stopped and removed when dropped.
struct LocalCluster {
    nodes: Vec<std::process::Child>,
    dir: std::path::PathBuf,
    ports: Vec<u16>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn local_cluster() -> LocalCluster {
    let dir = std::env::temp_dir().join(format!("hc-cluster-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // Cluster nodes also listen on port + 10000 for their bus.
    let ports: Vec<u16> = std::iter::repeat_with(free_port)
        .filter(|p| *p < 55_000)
        .take(3)
        .collect();
    let mut cluster = LocalCluster {
        nodes: Vec::new(),
        dir: dir.clone(),
        ports: ports.clone(),
    };
    for port in &ports {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (it runs the cache tests)");
        cluster.nodes.push(child);
    }
    for port in &ports {
        for _ in 0..100 {
            if redis_cli(*port, &["ping"]).contains("PONG") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for _ in 0..200 {
        if ports
            .iter()
            .all(|p| redis_cli(*p, &["cluster", "info"]).contains("cluster_state:ok"))
        {
            return cluster;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the local cluster did not become ready");
}

#[tokio::test]
async fn redis_cluster_backend_meets_the_contract() {
    let cluster = local_cluster().await;
    let settings = RedisSettings {
        urls: cluster
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect(),
        cluster: true,
        response_timeout: Duration::from_secs(2),
    };
    let cache: Arc<dyn Cache> = Arc::new(
        RedisCache::connect(&settings, &unique_prefix())
            .await
            .expect("cluster"),
    );
    contract(cache.clone()).await;
    newest_wins_under_concurrency(cache.clone()).await;
    // Keys spread over every node: one pipelined read still answers in order.
    let keys: Vec<String> = (0..200).map(|i| format!("spread-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        cache
            .set_if_newer(key, 1, i.to_string().as_bytes(), None)
            .await
            .unwrap();
    }
    let read = cache.get_versioned_many(&keys).await.unwrap();
    for (i, value) in read.into_iter().enumerate() {
        assert_eq!(value.unwrap().data, i.to_string().into_bytes());
    }
    drop(cluster);
}
