#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The store's operator records against real redb files: idempotency keys (replay, conflict,
//! per-caller, expiry and pruning, across a reopen) and the append-only audit log.

use std::collections::BTreeMap;

use messages::UserId;
use scheduler::store::{
    AgentRecord, AgentState, Created, IdempotencyClaim, NewAuditEntry, Store, StoreError,
    TargetState, Targets, TaskKind, TaskSpec,
};
use serde_json::json;

fn node(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        node_id: node(id),
        hostname: format!("{id}.example"),
        version: "0.1.0".into(),
        labels: BTreeMap::new(),
        addresses: vec![],
        registered_at_ms: 1,
        last_seen_ms: 1,
        state: AgentState::Online,
        via: None,
    }
}

fn spec(argv: &str) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Command {
            argv: vec![argv.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 1_000,
        },
        targets: Targets::Nodes(vec![node("n1")]),
        timeout_ms: 5_000,
        max_attempts: 1,
        traceparent: None,
    }
}

fn claim(actor: &str, key: &str, fingerprint: &str, not_before_ms: u64) -> IdempotencyClaim {
    IdempotencyClaim {
        actor: actor.into(),
        key: key.into(),
        fingerprint: fingerprint.into(),
        not_before_ms,
    }
}

fn entry(actor: &str, action: &str, target: String) -> NewAuditEntry {
    NewAuditEntry {
        actor: actor.into(),
        action: action.into(),
        target,
        detail: json!({"n": 1, "nested": {"list": [1, "two", null]}}),
        trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
    }
}

fn create(
    store: &Store,
    at: u64,
    c: Option<&IdempotencyClaim>,
    argv: &str,
) -> Result<Created, StoreError> {
    store
        .create_task_once(&spec(argv), at, c, |id| {
            entry("ops", "task.create", format!("task/{id}"))
        })
        .map(|(created, _)| created)
}

#[test]
fn a_key_creates_one_task_per_caller_and_refuses_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    store.upsert_agent(&agent("n1")).unwrap();

    let k = claim("ops", "k-1", "body-a", 0);
    let first = create(&store, 1_000, Some(&k), "uptime").unwrap();
    let Created::New(id) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        create(&store, 1_001, Some(&k), "uptime").unwrap(),
        Created::Replayed(id)
    );
    // A different request under the same key: refused, nothing stored.
    let other = claim("ops", "k-1", "body-b", 0);
    match create(&store, 1_002, Some(&other), "df") {
        Err(StoreError::IdempotencyConflict { key, task_id }) => {
            assert_eq!((key.as_str(), task_id), ("k-1", id));
        }
        r => panic!("{r:?}"),
    }
    // Another caller's key of the same name is its own.
    let ci = claim("ci", "k-1", "body-a", 0);
    let Created::New(ci_id) = create(&store, 1_003, Some(&ci), "uptime").unwrap() else {
        panic!("ci's key was taken for ops'")
    };
    assert_ne!(ci_id, id);
    // Without a key every request is new.
    assert!(matches!(
        create(&store, 1_004, None, "uptime").unwrap(),
        Created::New(_)
    ));
    assert_eq!(store.tasks(100, None).unwrap().len(), 3);
    // Only the creates were audited, not the replay or the conflict.
    let log = store.audit(0, 100).unwrap();
    assert_eq!(log.len(), 3);
    drop(store);

    // Reopened (a restart): the key still answers with the first task.
    let store = Store::open(&path).unwrap();
    assert_eq!(
        create(&store, 2_000, Some(&k), "uptime").unwrap(),
        Created::Replayed(id)
    );
    assert!(matches!(
        create(&store, 2_001, Some(&other), "df"),
        Err(StoreError::IdempotencyConflict { .. })
    ));
    assert_eq!(store.tasks(100, None).unwrap().len(), 3);
}

#[test]
fn expired_keys_count_as_new_and_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    store.upsert_agent(&agent("n1")).unwrap();

    let Created::New(old) =
        create(&store, 1_000, Some(&claim("ops", "k", "a", 0)), "uptime").unwrap()
    else {
        panic!()
    };
    create(
        &store,
        1_500,
        Some(&claim("ops", "other", "a", 0)),
        "uptime",
    )
    .unwrap();
    assert_eq!(store.idempotency_keys().unwrap(), 2);
    // Past the retention (keys from before 1_200 expired), the same key with any body is a
    // new request; the expired record of "k" is replaced and the other key stays.
    let fresh = create(&store, 3_000, Some(&claim("ops", "k", "b", 1_200)), "df").unwrap();
    assert!(matches!(fresh, Created::New(id) if id != old), "{fresh:?}");
    assert_eq!(store.idempotency_keys().unwrap(), 2);
    assert_eq!(
        create(&store, 3_001, Some(&claim("ops", "k", "b", 1_200)), "df").unwrap(),
        Created::Replayed(fresh.task_id())
    );
    // Pruning forgets what is older than the cut-off, and only that.
    assert_eq!(store.prune_idempotency(2_000).unwrap(), 1);
    assert_eq!(store.idempotency_keys().unwrap(), 1);
    assert_eq!(store.prune_idempotency(2_000).unwrap(), 0);
    assert_eq!(store.prune_idempotency(u64::MAX).unwrap(), 1);
    assert_eq!(store.idempotency_keys().unwrap(), 0);
}

#[test]
fn the_audit_log_appends_in_order_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    store.upsert_agent(&agent("n1")).unwrap();
    assert!(store.audit(0, 10).unwrap().is_empty());

    let id = create(&store, 1_000, None, "uptime").unwrap().task_id();
    let (cancelled, cancel_entry) = store
        .cancel_audited(id, 1_100, |c| NewAuditEntry {
            detail: json!({"cancelled": c.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()}),
            ..entry("ops", "task.cancel", format!("task/{id}"))
        })
        .unwrap();
    assert_eq!(cancelled, vec![(node("n1"), TargetState::Pending)]);
    assert_eq!(cancel_entry.seq, 2);
    assert_eq!(cancel_entry.detail, json!({"cancelled": ["n1"]}));
    let appended = store
        .append_audit(1_200, entry("dash", "agent.revoke", "agent/n1".into()))
        .unwrap();
    assert_eq!(appended.seq, 3);

    // A cancel of an unknown task changes nothing and records nothing.
    assert!(matches!(
        store.cancel_audited(999, 1_300, |_| entry(
            "ops",
            "task.cancel",
            "task/999".into()
        )),
        Err(StoreError::UnknownTask(999))
    ));

    let all = store.audit(0, 100).unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(
        (
            all[0].actor.as_str(),
            all[0].action.as_str(),
            all[0].target.as_str(),
            all[0].at_ms
        ),
        ("ops", "task.create", format!("task/{id}").as_str(), 1_000)
    );
    assert_eq!(
        all[0].detail,
        json!({"n": 1, "nested": {"list": [1, "two", null]}})
    );
    assert_eq!(
        all[0].trace_id.as_deref(),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    assert_eq!(all[2].actor, "dash");
    // Paging by sequence number.
    assert_eq!(store.audit(1, 1).unwrap()[0].seq, 2);
    assert!(store.audit(3, 10).unwrap().is_empty());
    assert!(store.audit(u64::MAX, 10).unwrap().is_empty());
    drop(store);

    // Durable, and numbering continues after a reopen.
    let store = Store::open(&path).unwrap();
    assert_eq!(store.audit(0, 100).unwrap(), all);
    let next = store
        .append_audit(1_400, entry("ops", "task.cancel", "task/1".into()))
        .unwrap();
    assert_eq!(next.seq, 4);
}
