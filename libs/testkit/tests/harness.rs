//! The harness against a real nats-server: publish/receive, a restart on the same port
//! with a client that reconnects by itself, JetStream KV, and a 3-node cluster.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures_util::StreamExt;
use testkit::{NatsCluster, NatsServer};

async fn next_payload(sub: &mut async_nats::Subscriber) -> Vec<u8> {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("message within 10 s")
        .expect("subscription open");
    msg.payload.to_vec()
}

#[tokio::test]
async fn publishes_and_receives_through_a_real_server() {
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut sub = client.subscribe("harness.hello").await.unwrap();
    client.flush().await.unwrap();
    client.publish("harness.hello", "hi".into()).await.unwrap();
    assert_eq!(next_payload(&mut sub).await, b"hi");
}

#[tokio::test]
async fn restarts_on_the_same_port_and_clients_reconnect() {
    let mut server = NatsServer::start().unwrap();
    let port = server.port();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    let mut sub = client.subscribe("harness.restart").await.unwrap();
    client.flush().await.unwrap();

    server.kill();
    assert!(!server.is_running());
    server.start_again().unwrap();
    assert_eq!(server.port(), port);

    // The client resubscribes after reconnecting; keep publishing until one gets through.
    let publisher = client.clone();
    let pump = tokio::spawn(async move {
        loop {
            let _ = publisher.publish("harness.restart", "back".into()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(next_payload(&mut sub).await, b"back");
    pump.abort();
}

#[tokio::test]
async fn jetstream_key_value_works_and_survives_a_restart() {
    let mut server = NatsServer::start().unwrap();
    {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "harness".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        // A replicated stream right after the cluster formed may not take writes yet (its
        // leader is still being elected): the first puts can fail with "stream not found".
        let mut attempts = 0;
        while let Err(e) = kv.put("k", "v".into()).await {
            attempts += 1;
            assert!(
                attempts < 50,
                "the replicated bucket never took a write: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    server.restart().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value("harness").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().unwrap(), "v".as_bytes());
}

#[tokio::test]
async fn three_node_cluster_routes_messages_and_replicates_kv() {
    let cluster = NatsCluster::start(3).unwrap();
    assert_eq!(cluster.len(), 3);
    let a = async_nats::connect(cluster.node(0).unwrap().url())
        .await
        .unwrap();
    let c = async_nats::connect(cluster.node(2).unwrap().url())
        .await
        .unwrap();
    let mut sub = c.subscribe("harness.cluster").await.unwrap();
    c.flush().await.unwrap();
    // Route interest propagates asynchronously: publish until node 3 sees it.
    let publisher = a.clone();
    let pump = tokio::spawn(async move {
        loop {
            let _ = publisher.publish("harness.cluster", "across".into()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(next_payload(&mut sub).await, b"across");
    pump.abort();

    let js = async_nats::jetstream::new(a);
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "replicated".into(),
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    // A replicated stream right after the cluster formed may not take writes yet (its
    // leader is still being elected): the first puts can fail with "stream not found".
    let mut attempts = 0;
    while let Err(e) = kv.put("k", "v".into()).await {
        attempts += 1;
        assert!(
            attempts < 50,
            "the replicated bucket never took a write: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kv_c = async_nats::jetstream::new(c)
        .get_key_value("replicated")
        .await
        .unwrap();
    assert_eq!(kv_c.get("k").await.unwrap().unwrap(), "v".as_bytes());
}

#[test]
fn missing_binary_error_says_how_to_install() {
    let err = testkit::Error::BinaryMissing {
        local: ".tools/bin/nats-server".into(),
    };
    let text = err.to_string();
    assert!(text.contains("scripts/install-nats"), "{text}");
    assert_eq!(text.lines().count(), 1);
}
