//! Worker-id leases against a real nats-server: distinct ids for concurrent replicas,
//! reclaim after a restart, release, loss and re-acquisition, expiry of abandoned leases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use messages::{GatewayId, Snowflake};
use testkit::{NatsCluster, NatsServer};
use tokio::sync::watch;
use tokio::time::{sleep, timeout};
use ws_gateway::lease::{DEFAULT_BUCKET, LeaseConfig, LeaseKeeper, acquire};

/// Bound on every wait; generous because the machine may be busy compiling.
const WAIT: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> jetstream::Context {
    let client = timeout(WAIT, async_nats::connect(url))
        .await
        .unwrap()
        .unwrap();
    jetstream::new(client)
}

fn config(instance: &str, ttl: Duration) -> LeaseConfig {
    LeaseConfig {
        ttl,
        ..LeaseConfig::new(GatewayId::new(instance).unwrap())
    }
}

async fn bucket(js: &jetstream::Context) -> kv::Store {
    js.get_key_value(DEFAULT_BUCKET).await.unwrap()
}

async fn value(kv: &kv::Store, worker: u16) -> Option<String> {
    kv.get(format!("worker.{worker}"))
        .await
        .unwrap()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

/// Waits until the keeper reports a state matching `pred` and returns it.
async fn wait_state(
    rx: &mut watch::Receiver<Option<u16>>,
    pred: impl FnMut(&Option<u16>) -> bool,
) -> Option<u16> {
    *timeout(WAIT, rx.wait_for(pred))
        .await
        .expect("keeper state did not change in time")
        .unwrap()
}

/// Three replicas (`gw-a`, `gw-b`, `gw-c`) acquiring at the same time, each through its own
/// JetStream context; returns their worker ids in that order.
async fn acquire_three(js: [&jetstream::Context; 3], replicas: usize) -> [u16; 3] {
    let cfgs = ["gw-a", "gw-b", "gw-c"].map(|name| LeaseConfig {
        replicas,
        ..config(name, Duration::from_secs(10))
    });
    let (a, b, c) = timeout(WAIT, async {
        tokio::join!(
            acquire(js[0], &cfgs[0]),
            acquire(js[1], &cfgs[1]),
            acquire(js[2], &cfgs[2])
        )
    })
    .await
    .unwrap();
    [
        a.unwrap().worker_id(),
        b.unwrap().worker_id(),
        c.unwrap().worker_id(),
    ]
}

#[tokio::test]
async fn concurrent_replicas_get_distinct_ids() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let (ja, jb, jc) = tokio::join!(connect(&url), connect(&url), connect(&url));
    let ids = acquire_three([&ja, &jb, &jc], 1).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "ids {ids:?}");

    let kv = bucket(&ja).await;
    for (worker, name) in ids.iter().zip(["gw-a", "gw-b", "gw-c"]) {
        assert_eq!(value(&kv, *worker).await.as_deref(), Some(name));
    }
}

#[tokio::test]
async fn concurrent_replicas_on_a_cluster_get_distinct_ids() {
    let cluster = NatsCluster::start(3).unwrap();
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).unwrap().url()).collect();
    let (ja, jb, jc) = tokio::join!(connect(&urls[0]), connect(&urls[1]), connect(&urls[2]));
    let ids = acquire_three([&ja, &jb, &jc], 3).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "ids {ids:?}");
}

#[tokio::test]
async fn a_restarted_replica_gets_its_old_id_back() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    let cfg = config("gw-a", Duration::from_secs(10));
    let first = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let other = timeout(WAIT, acquire(&js, &config("gw-b", Duration::from_secs(10))))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(other.worker_id(), first.worker_id());

    // A new process with the same name, on a new connection, without a release.
    let js_again = connect(&server.url()).await;
    let again = timeout(WAIT, acquire(&js_again, &cfg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.worker_id(), first.worker_id());
    assert!(
        again.revision() > first.revision(),
        "reclaimed with a new write"
    );
}

#[tokio::test]
async fn ids_minted_under_distinct_leases_never_collide() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    let workers = acquire_three([&js, &js, &js], 1).await;

    let minted: Vec<Vec<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .map(|&worker| {
                s.spawn(move || {
                    let ids = Snowflake::new(worker).unwrap();
                    let minted: Vec<_> = (0..20_000).map(|_| ids.next_id().unwrap()).collect();
                    assert!(minted.iter().all(|id| id.parts().worker == worker));
                    minted
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: HashSet<_> = minted.into_iter().flatten().collect();
    assert_eq!(all.len(), 60_000);
}

#[tokio::test]
async fn release_frees_the_id() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    let cfg = config("gw-a", Duration::from_secs(10));
    let lease = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let worker = lease.worker_id();
    let key = lease.key();
    let keeper = LeaseKeeper::spawn(js.clone(), cfg, lease);
    let mut state = keeper.watch();
    assert_eq!(keeper.worker_id(), Some(worker));

    let kv = bucket(&js).await;
    let taken = kv.create(&key, "gw-b".into()).await.unwrap_err();
    assert_eq!(taken.kind(), kv::CreateErrorKind::AlreadyExists);

    timeout(WAIT, keeper.release()).await.unwrap();
    assert_eq!(wait_state(&mut state, Option::is_none).await, None);
    assert_eq!(value(&kv, worker).await, None, "key deleted on release");
    kv.create(&key, "gw-b".into()).await.unwrap();
    assert_eq!(value(&kv, worker).await.as_deref(), Some("gw-b"));
}

#[tokio::test]
async fn release_leaves_a_key_that_is_no_longer_ours() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    // Long TTL: the keeper will not notice the takeover before it is released.
    let cfg = config("gw-a", Duration::from_secs(60));
    let lease = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let worker = lease.worker_id();
    let keeper = LeaseKeeper::spawn(js.clone(), cfg, lease);

    let kv = bucket(&js).await;
    kv.put(format!("worker.{worker}"), "intruder".into())
        .await
        .unwrap();
    timeout(WAIT, keeper.release()).await.unwrap();
    assert_eq!(value(&kv, worker).await.as_deref(), Some("intruder"));
}

#[tokio::test]
async fn a_lost_lease_is_reported_and_replaced() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    // The intruder's value expires with the TTL too; 3 s leaves it in place well past the
    // keeper's next refresh (every 1 s).
    let cfg = config("gw-a", Duration::from_secs(3));
    let lease = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let first = lease.worker_id();
    let keeper = LeaseKeeper::spawn(js.clone(), cfg, lease);
    let mut state = keeper.watch();
    let kv = bucket(&js).await;

    // Someone else overwrites our key: we must stop minting, then lease another id.
    kv.put(format!("worker.{first}"), "intruder".into())
        .await
        .unwrap();
    assert_eq!(wait_state(&mut state, Option::is_none).await, None);
    let second = wait_state(&mut state, Option::is_some).await.unwrap();
    assert_ne!(second, first, "the overwritten id belongs to the intruder");
    assert_eq!(value(&kv, second).await.as_deref(), Some("gw-a"));

    // Someone deletes our key: the same again (the id may come back, it is free now).
    kv.delete(format!("worker.{second}")).await.unwrap();
    assert_eq!(wait_state(&mut state, Option::is_none).await, None);
    let third = wait_state(&mut state, Option::is_some).await.unwrap();
    assert_eq!(value(&kv, third).await.as_deref(), Some("gw-a"));

    timeout(WAIT, keeper.release()).await.unwrap();
    assert_eq!(value(&kv, third).await, None);
}

#[tokio::test]
async fn an_abandoned_lease_expires() {
    let server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    let cfg = config("gw-a", Duration::from_secs(2));
    let lease = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let key = lease.key();
    let keeper = LeaseKeeper::spawn(js.clone(), cfg, lease);
    let mut state = keeper.watch();
    let kv = bucket(&js).await;

    // Held across several refreshes: nobody else can create the key.
    for _ in 0..3 {
        sleep(Duration::from_millis(500)).await;
        let err = kv.create(&key, "gw-b".into()).await.unwrap_err();
        assert_eq!(err.kind(), kv::CreateErrorKind::AlreadyExists);
        assert!(state.borrow().is_some());
    }

    // A crash: the keeper stops without deleting, and the watchers stop minting.
    drop(keeper);
    assert_eq!(wait_state(&mut state, Option::is_none).await, None);
    timeout(WAIT, async {
        loop {
            match kv.create(&key, "gw-b".into()).await {
                Ok(_) => break,
                Err(err) => assert_eq!(err.kind(), kv::CreateErrorKind::AlreadyExists),
            }
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("abandoned lease never expired");
    assert_eq!(
        kv.get(&key).await.unwrap().as_deref(),
        Some(b"gw-b".as_slice())
    );
}

#[tokio::test]
async fn a_nats_outage_longer_than_the_ttl_loses_the_lease_until_nats_is_back() {
    let mut server = NatsServer::start().unwrap();
    let js = connect(&server.url()).await;
    let cfg = config("gw-a", Duration::from_secs(2));
    let lease = timeout(WAIT, acquire(&js, &cfg)).await.unwrap().unwrap();
    let keeper = LeaseKeeper::spawn(js.clone(), cfg, lease);
    let mut state = keeper.watch();

    server.kill();
    assert_eq!(wait_state(&mut state, Option::is_none).await, None);
    let _server = tokio::task::spawn_blocking(move || {
        server.start_again().unwrap();
        server
    })
    .await
    .unwrap();
    let worker = wait_state(&mut state, Option::is_some).await.unwrap();
    assert_eq!(keeper.worker_id(), Some(worker));
    timeout(WAIT, keeper.release()).await.unwrap();
}
