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

#[tokio::test]
async fn memory_backend_meets_the_contract() {
    let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new(&unique_prefix()));
    contract(cache.clone()).await;
    newest_wins_under_concurrency(cache).await;
}

#[tokio::test]
async fn redis_backend_meets_the_contract() {
    let cache: Arc<dyn Cache> = Arc::new(redis_cache().await);
    contract(cache.clone()).await;
    newest_wins_under_concurrency(cache).await;
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
