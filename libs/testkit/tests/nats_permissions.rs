//! The per-service NATS users of `nats/auth.conf` (the file compose uses too) hold on a real
//! nats-server: a gateway credential may publish its upstream subjects and use its own KV
//! bucket, and is refused a scheduler subject, another service's bucket and others' traffic;
//! gateways forward long-poll requests to each other (`ws.lp.<worker>`), nobody else can.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::{Client, ConnectOptions, Event, ServerError};
use futures_util::StreamExt;
use testkit::{NatsServer, workspace_root};
use tokio::sync::mpsc;

const PASSWORDS: [(&str, &str); 5] = [
    ("RT_NATS_GATEWAY_PASSWORD", "gw-secret"),
    ("RT_NATS_API_PASSWORD", "api-secret"),
    ("RT_NATS_SCHEDULER_PASSWORD", "sched-secret"),
    ("RT_NATS_LOADTEST_PASSWORD", "load-secret"),
    ("RT_NATS_DEV_PASSWORD", "dev-secret"),
];

fn server() -> NatsServer {
    NatsServer::start_with_config(workspace_root().join("nats/single-auth.conf"), &PASSWORDS)
        .unwrap()
}

/// Connects as `user`; server errors (permission violations) arrive on the receiver.
async fn login(
    nats: &NatsServer,
    user: &str,
    password: &str,
) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(e) = event {
                    let text = match e {
                        ServerError::Other(s) => s,
                        other => format!("{other:?}"),
                    };
                    let _ = tx.send(text);
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    (client, rx)
}

/// The next server error within a second, if any.
async fn next_error(rx: &mut mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .ok()
        .flatten()
}

async fn received(sub: &mut async_nats::Subscriber, within: Duration) -> Option<String> {
    tokio::time::timeout(within, sub.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.subject.to_string())
}

#[tokio::test]
async fn a_gateway_credential_cannot_publish_on_a_scheduler_subject() {
    let nats = server();
    let (dev, _) = login(&nats, "dev", "dev-secret").await;
    let mut watch = dev.subscribe(">").await.unwrap();
    dev.flush().await.unwrap();

    let (gw, mut gw_errors) = login(&nats, "ws-gateway", "gw-secret").await;

    // Its own upstream subject: allowed, delivered, no error.
    gw.publish("ws.msg.app.chat.send", "hi".into())
        .await
        .unwrap();
    gw.flush().await.unwrap();
    assert_eq!(
        received(&mut watch, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("ws.msg.app.chat.send")
    );
    assert_eq!(next_error(&mut gw_errors).await, None);

    // The scheduler's agent-state subject and a push to an agent: refused by the server.
    for subject in ["fleet.agent.state.edge-1", "ws.user.edge-1", "ws.ctl"] {
        gw.publish(subject, "forged".into()).await.unwrap();
        gw.flush().await.unwrap();
        let error = next_error(&mut gw_errors)
            .await
            .unwrap_or_else(|| panic!("no permission violation for {subject}"));
        assert!(
            error.contains("Permissions Violation for Publish") && error.contains(subject),
            "{subject}: {error}"
        );
        assert_eq!(
            received(&mut watch, Duration::from_millis(300)).await,
            None,
            "{subject} got through"
        );
    }

    // The scheduler's own credential may publish there.
    let (sched, mut sched_errors) = login(&nats, "scheduler", "sched-secret").await;
    sched
        .publish("fleet.agent.state.edge-1", "online".into())
        .await
        .unwrap();
    sched.flush().await.unwrap();
    assert_eq!(
        received(&mut watch, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("fleet.agent.state.edge-1")
    );
    assert_eq!(next_error(&mut sched_errors).await, None);
}

#[tokio::test]
async fn a_gateway_credential_cannot_read_other_services_traffic() {
    let nats = server();
    let (gw, mut gw_errors) = login(&nats, "ws-gateway", "gw-secret").await;
    // Upstream traffic of other gateways is for ws-api and the scheduler only.
    let _sub = gw.subscribe("ws.msg.>").await.unwrap();
    gw.flush().await.unwrap();
    let error = next_error(&mut gw_errors).await.expect("no violation");
    assert!(
        error.contains("Permissions Violation for Subscription"),
        "{error}"
    );
    // Its downstream subjects are fine.
    let _ok = gw.subscribe("ws.user.alice").await.unwrap();
    gw.flush().await.unwrap();
    assert_eq!(next_error(&mut gw_errors).await, None);
}

#[tokio::test]
async fn each_service_reaches_its_own_kv_bucket_and_no_other() {
    let nats = server();
    let buckets = [
        ("ws-gateway", "gw-secret", "ws_gateway_workers"),
        ("ws-api", "api-secret", "ws_sessions"),
        ("ws-api", "api-secret", "ws_push_receipts"),
        ("scheduler", "sched-secret", "scheduler_leader"),
    ];
    for (user, password, bucket) in buckets {
        let (client, _) = login(&nats, user, password).await;
        let js = jetstream::new(client);
        let store = js
            .create_key_value(kv::Config {
                bucket: bucket.into(),
                history: 1,
                max_age: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{user} creating {bucket}: {e}"));
        store.put("k", "v".into()).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        let rev = store.update("k", "w".into(), 0).await;
        assert!(rev.is_err(), "update with a wrong revision must fail");
        let mut watch = store.watch_all().await.unwrap();
        store.put("k2", "x".into()).await.unwrap();
        let entry = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("watch saw nothing")
            .unwrap()
            .unwrap();
        assert_eq!(entry.key, "k2", "{user} {bucket}");
        let mut keys: Vec<String> = store
            .keys()
            .await
            .unwrap()
            .map(|k| k.unwrap())
            .collect()
            .await;
        keys.sort();
        assert_eq!(keys, ["k", "k2"], "{user} {bucket}");
        store.delete("k2").await.unwrap();
        // The same client opening the bucket again (what a restart does) works too.
        js.get_key_value(bucket).await.unwrap();
    }
    // A gateway may not open ws-api's sessions or the scheduler's lease.
    let (gw, _) = login(&nats, "ws-gateway", "gw-secret").await;
    let js = jetstream::new(gw);
    for bucket in ["ws_sessions", "scheduler_leader"] {
        let opened = tokio::time::timeout(Duration::from_secs(3), js.get_key_value(bucket)).await;
        assert!(
            !matches!(opened, Ok(Ok(_))),
            "the gateway credential opened {bucket}"
        );
    }
}

#[tokio::test]
async fn without_credentials_nobody_gets_in() {
    let nats = server();
    let anonymous = ConnectOptions::new().connect(nats.url()).await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let wrong = ConnectOptions::with_user_and_password("ws-gateway".into(), "nope".into())
        .connect(nats.url())
        .await;
    assert!(wrong.is_err(), "a wrong password was accepted");
}

#[tokio::test]
async fn only_the_scheduler_may_publish_on_the_agent_channel() {
    let nats = server();
    // The gateway user may subscribe to the agent channel (it delivers to agents).
    let (watcher, _) = login(&nats, "ws-gateway", "gw-secret").await;
    let mut watch = watcher.subscribe("ws.agent.>").await.unwrap();
    watcher.flush().await.unwrap();
    // Product services (ws-api), the load generator and gateways hold credentials that
    // can push to users, rooms and everyone, never to an agent.
    for (user, password) in [
        ("ws-api", "api-secret"),
        ("loadtest", "load-secret"),
        ("ws-gateway", "gw-secret"),
    ] {
        let (client, mut errors) = login(&nats, user, password).await;
        client
            .publish("ws.agent.edge-1", "forged task".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let error = next_error(&mut errors)
            .await
            .unwrap_or_else(|| panic!("{user}: no permission violation"));
        assert!(
            error.contains("Permissions Violation for Publish") && error.contains("ws.agent"),
            "{user}: {error}"
        );
        assert_eq!(
            received(&mut watch, Duration::from_millis(300)).await,
            None,
            "{user} reached an agent"
        );
    }
    let (sched, mut sched_errors) = login(&nats, "scheduler", "sched-secret").await;
    sched
        .publish("ws.agent.edge-1", "signed task".into())
        .await
        .unwrap();
    sched.flush().await.unwrap();
    assert_eq!(
        received(&mut watch, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("ws.agent.edge-1")
    );
    assert_eq!(next_error(&mut sched_errors).await, None);
}

#[tokio::test]
async fn the_dev_user_only_watches_and_never_sees_agent_traffic() {
    let nats = server();
    let (dev, mut dev_errors) = login(&nats, "dev", "dev-secret").await;
    let mut watch = dev.subscribe(">").await.unwrap();
    dev.flush().await.unwrap();
    assert_eq!(next_error(&mut dev_errors).await, None);

    let (gw, _) = login(&nats, "ws-gateway", "gw-secret").await;
    let (sched, _) = login(&nats, "scheduler", "sched-secret").await;
    let mut agent_traffic = sched.subscribe("ws.msg.agent.>").await.unwrap();
    sched.flush().await.unwrap();

    // App traffic: watched.
    gw.publish("ws.msg.app.chat.send", "hi".into())
        .await
        .unwrap();
    gw.flush().await.unwrap();
    assert_eq!(
        received(&mut watch, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("ws.msg.app.chat.send")
    );
    // Agent traffic reaches the scheduler but not the watcher.
    gw.publish("ws.msg.agent.task.result", "secret output".into())
        .await
        .unwrap();
    gw.flush().await.unwrap();
    assert_eq!(
        received(&mut agent_traffic, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("ws.msg.agent.task.result")
    );
    assert_eq!(received(&mut watch, Duration::from_millis(300)).await, None);
    // Nor by asking for it directly.
    let _direct = dev.subscribe("ws.msg.agent.>").await.unwrap();
    dev.flush().await.unwrap();
    let error = next_error(&mut dev_errors).await.expect("no violation");
    assert!(
        error.contains("Permissions Violation for Subscription"),
        "{error}"
    );

    // It publishes nothing: not a push to a node, not a control message.
    let mut pushes = gw.subscribe("ws.user.>").await.unwrap();
    gw.flush().await.unwrap();
    for subject in ["ws.user.edge-1", "ws.ctl"] {
        dev.publish(subject, "forged".into()).await.unwrap();
        dev.flush().await.unwrap();
        let error = next_error(&mut dev_errors)
            .await
            .unwrap_or_else(|| panic!("no permission violation for {subject}"));
        assert!(
            error.contains("Permissions Violation for Publish") && error.contains(subject),
            "{subject}: {error}"
        );
    }
    assert_eq!(
        received(&mut pushes, Duration::from_millis(300)).await,
        None
    );
}

#[tokio::test]
async fn gateways_forward_long_polls_to_each_other_and_nobody_else_can() {
    let nats = server();
    let (owner, mut owner_errors) = login(&nats, "ws-gateway", "gw-secret").await;
    let (asker, mut asker_errors) = login(&nats, "ws-gateway", "gw-secret").await;
    let subject = messages::subject::longpoll_forward(3);
    let mut requests = owner.subscribe(subject.clone()).await.unwrap();
    owner.flush().await.unwrap();
    // Also the wait that lets the server register the subscription (a flush only writes
    // it; the asker is another connection).
    assert_eq!(next_error(&mut owner_errors).await, None, "subscribing");
    let answering = {
        let owner = owner.clone();
        tokio::spawn(async move {
            let request = requests.next().await.unwrap();
            // The answer goes to the asker's inbox: allowed as a response only.
            owner
                .publish(request.reply.unwrap(), "answer".into())
                .await
                .unwrap();
            owner.flush().await.unwrap();
        })
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        asker.request(subject.clone(), "poll".into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&reply.payload[..], b"answer");
    answering.await.unwrap();
    assert_eq!(next_error(&mut owner_errors).await, None);
    assert_eq!(next_error(&mut asker_errors).await, None);

    // ws-api cannot inject long-poll requests into a gateway.
    let (api, mut api_errors) = login(&nats, "ws-api", "api-secret").await;
    api.publish(subject.clone(), "forged".into()).await.unwrap();
    api.flush().await.unwrap();
    let error = next_error(&mut api_errors).await.expect("no violation");
    assert!(
        error.contains("Permissions Violation for Publish") && error.contains(&subject),
        "{error}"
    );
}

/// History (ADR 0017): ws-api creates WS_HISTORY and appends to it; the stream republishes
/// to the live subject; a gateway replays from it but cannot write to it.
#[tokio::test]
async fn ws_api_writes_history_and_a_gateway_only_reads_it() {
    use messages::frame::StreamRef;
    use messages::payload::JoinSince;
    use messages::{RoomId, UserId, headers, subject};

    let nats = server();
    let (api, mut api_errors) = login(&nats, "ws-api", "api-secret").await;
    let (gw, mut gw_errors) = login(&nats, "ws-gateway", "gw-secret").await;
    let js = jetstream::new(api.clone());
    let (src, dest) = subject::HISTORY_REPUBLISH;
    js.create_or_update_stream(jetstream::stream::Config {
        name: subject::HISTORY_STREAM.into(),
        subjects: subject::HISTORY_SUBJECTS.map(String::from).to_vec(),
        max_messages_per_subject: 10,
        allow_direct: true,
        republish: Some(jetstream::stream::Republish {
            source: src.into(),
            destination: dest.into(),
            headers_only: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let room = RoomId::new("chat.perm").unwrap();
    let mut live = gw.subscribe(subject::room(&room)).await.unwrap();
    gw.flush().await.unwrap();
    for offset in 1..=3u64 {
        let mut map = async_nats::HeaderMap::new();
        headers::set(&mut map, headers::EPOCH, "5").unwrap();
        headers::set(&mut map, headers::OFFSET, &offset.to_string()).unwrap();
        js.publish_with_headers(subject::history_room(&room), map, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(
        received(&mut live, Duration::from_secs(3)).await.as_deref(),
        Some(subject::room(&room).as_str()),
        "the stream republishes to the live subject"
    );
    let replay = ws_gateway::history::replay(
        gw.clone(),
        UserId::new("u").unwrap(),
        StreamRef::Room(room.clone()),
        JoinSince {
            epoch: 5,
            offset: 1,
        },
        10,
    )
    .await;
    assert!(replay.recovery.recovered, "{:?}", replay.recovery);
    assert_eq!(replay.frames.len(), 2);
    assert_eq!(next_error(&mut gw_errors).await, None);
    // The gateway cannot append to (or forge) history.
    gw.publish(subject::history_room(&room), "forged".into())
        .await
        .unwrap();
    gw.flush().await.unwrap();
    let error = next_error(&mut gw_errors).await.unwrap_or_default();
    assert!(
        error.to_lowercase().contains("permissions violation"),
        "{error}"
    );
    assert_eq!(next_error(&mut api_errors).await, None);
}
